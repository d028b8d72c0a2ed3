//! The job table: what the jobs directory asks for, what runs where, and each job's state
//! as its run directory's `status.json` records it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use layerwise_coordinator::RunOptions;
use layerwise_net::Cluster;
use layerwise_plan::{DeviceId, Plan, RunConfig};
use layerwise_rundir::{RunDir, RunState};
use tokio::sync::mpsc::UnboundedSender;

/// A job thread's end.
pub struct Finished {
    pub name: String,
    /// Ok(stopped early) or the error.
    pub result: Result<bool, String>,
}

struct Running {
    devices: BTreeSet<DeviceId>,
    /// Workers whose stages the job runs (a worker runs one job at a time).
    workers: BTreeSet<String>,
    stop: Arc<AtomicBool>,
    /// Stop was asked for by a cancel (not by the daemon stopping).
    cancelled: bool,
}

struct Queued {
    name: String,
    plan: Plan,
    resume: bool,
}

/// A job file as last seen: its size and modification time.
type Seen = (u64, SystemTime);

/// Job names: letters, digits, `.`, `_`, `-`, not starting with a dot, at most 100 bytes;
/// so that a job's files stay inside its own `runs/NAME/`.
pub fn check_job_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "job name {:?}: expected 1 to 100 of A-Z a-z 0-9 . _ - not starting with a dot",
            layerwise_plan::quote(name)
        ))
    }
}

/// The job's record of a job file refused at admission: read again once the file changes.
const REJECTED: &str = "rejected.json";
/// How many times the service died while the job ran, counted at each start.
const CRASHES: &str = "crashes";

fn seen(path: &Path) -> Option<Seen> {
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn seen_json(s: Seen) -> serde_json::Value {
    let t = s.1.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    serde_json::json!({"size": s.0, "mtime_ns": t.as_nanos() as u64})
}

pub struct JobTable {
    jobs_dir: PathBuf,
    runs_dir: PathBuf,
    /// A job that was running each time the service died this many times is failed.
    max_crash_restarts: u32,
    /// Every job name seen, so that a finished job is not run again.
    known: BTreeSet<String>,
    /// Files seen changing at the last scan: read once they have stood still.
    settling: BTreeMap<String, Seen>,
    /// Files with a name that is refused, logged once.
    bad_names: BTreeSet<String>,
    queue: VecDeque<Queued>,
    running: BTreeMap<String, Running>,
    done_tx: UnboundedSender<Finished>,
    /// The listener for workers (serve --listen).
    cluster: Option<Arc<Cluster>>,
}

impl JobTable {
    pub fn new(
        jobs_dir: PathBuf,
        runs_dir: PathBuf,
        max_crash_restarts: u32,
        done_tx: UnboundedSender<Finished>,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            jobs_dir,
            runs_dir,
            max_crash_restarts,
            known: BTreeSet::new(),
            settling: BTreeMap::new(),
            bad_names: BTreeSet::new(),
            queue: VecDeque::new(),
            running: BTreeMap::new(),
            done_tx,
            cluster,
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    fn run_dir(&self, name: &str) -> RunDir {
        RunDir { path: self.runs_dir.join(name) }
    }

    fn set_status(&self, name: &str, state: RunState, reason: &str) {
        let dir = self.run_dir(name);
        let _ = std::fs::create_dir_all(&dir.path);
        let (epoch, step) = dir.status().map_or((0, 0), |s| (s.epoch, s.step));
        if let Err(e) = dir.set_status(state, reason, epoch, step) {
            tracing::error!(job = name, "cannot record status: {e}");
        }
    }

    /// Job names (file stems of `*.json`) in the jobs directory: regular files only. A link
    /// is not followed (whoever may write the jobs folder must not make the service read
    /// what a link points at); it is refused, once, with a word in the log.
    fn job_files(&mut self) -> BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(&self.jobs_dir) else { return BTreeSet::new() };
        let mut names = BTreeSet::new();
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else { continue };
            match e.file_type() {
                Ok(t) if t.is_file() => {
                    names.insert(name);
                }
                Ok(t) if t.is_symlink() && self.bad_names.insert(name.clone()) => {
                    tracing::error!("refused {}: a link (job files are read only as regular files)", path.display());
                }
                _ => {}
            }
        }
        names
    }

    fn cancel_requested(&self, name: &str) -> bool {
        self.jobs_dir.join(format!("{name}.cancel")).exists()
    }

    /// Whether a job file is complete: a file whose size or time changed since the last
    /// scan, or in the last second, is left for a later scan (a slow copy, an editor).
    fn settled(&mut self, name: &str) -> Option<Seen> {
        let now = seen(&self.jobs_dir.join(format!("{name}.json")))?;
        let fresh = SystemTime::now().duration_since(now.1).map_or(true, |age| age < Duration::from_secs(1));
        let changed = self.settling.insert(name.to_string(), now) != Some(now);
        if fresh || changed {
            return None;
        }
        self.settling.remove(name);
        Some(now)
    }

    /// A job refused at admission whose file has changed since: admit it again.
    fn rejected_file_changed(&self, name: &str, now: Seen) -> bool {
        let path = self.run_dir(name).path.join(REJECTED);
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|was| was != seen_json(now))
    }

    /// Picks up new (complete) job files, changed refused ones, and cancellations.
    pub fn scan(&mut self) {
        let files = self.job_files();
        for name in &files {
            if let Err(e) = check_job_name(name) {
                if self.bad_names.insert(name.clone()) {
                    tracing::error!("refused {}: {e}", self.jobs_dir.join(format!("{name}.json")).display());
                }
                continue;
            }
            let Some(now) = self.settled(name) else { continue };
            if self.known.contains(name) {
                if !self.running.contains_key(name) && self.rejected_file_changed(name, now) {
                    tracing::info!(job = %name, "job file changed since it was refused: reading it again");
                    let _ = std::fs::remove_file(self.run_dir(name).path.join(REJECTED));
                    self.queue.retain(|q| q.name != *name);
                    self.admit(name, now, true);
                }
                continue;
            }
            self.known.insert(name.clone());
            let again = self.rejected_file_changed(name, now);
            self.admit(name, now, again);
        }
        let files: BTreeSet<String> = files.into_iter().filter(|n| check_job_name(n).is_ok()).collect();
        // cancellations: the file is gone, or NAME.cancel exists
        let cancel: Vec<String> =
            self.known.iter().filter(|n| !files.contains(*n) || self.cancel_requested(n)).cloned().collect();
        for name in cancel {
            if let Some(pos) = self.queue.iter().position(|q| q.name == name) {
                self.queue.remove(pos);
                tracing::info!(job = %name, "cancelled before it started");
                self.set_status(&name, RunState::Cancelled, "cancelled before it started");
            }
            if let Some(r) = self.running.get_mut(&name) {
                if !r.cancelled {
                    tracing::info!(job = %name, "cancel requested: stopping after a checkpoint");
                    r.cancelled = true;
                    r.stop.store(true, Ordering::SeqCst);
                }
            }
            if !files.contains(&name) && !self.running.contains_key(&name) {
                self.known.remove(&name); // a job file put back later is a new job
            }
        }
    }

    /// Decides what a newly seen job file needs: nothing (finished before), a resume, or a
    /// fresh start; an invalid job fails here, before anything runs.
    fn admit(&mut self, name: &str, file: Seen, reread: bool) {
        let previous = self.run_dir(name).status().map(|s| s.state);
        match previous {
            Some(RunState::Failed) if reread => {}
            Some(RunState::Done | RunState::Failed | RunState::Cancelled) => {
                tracing::debug!(job = name, "already finished; remove its run directory to run it again");
                return;
            }
            _ if self.cancel_requested(name) => {
                self.set_status(name, RunState::Cancelled, "cancel file present");
                return;
            }
            _ => {}
        }
        let path = self.jobs_dir.join(format!("{name}.json"));
        let plan =
            open_job_file(&path).and_then(|f| RunConfig::load_from(f, &path, &[])).and_then(|c| Plan::check(&c, true));
        match plan {
            Err(e) => {
                tracing::error!(job = name, "rejected: {e}");
                self.set_status(name, RunState::Failed, &e.to_string());
                let record = self.run_dir(name).path.join(REJECTED);
                if let Err(e) = std::fs::write(&record, seen_json(file).to_string()) {
                    tracing::error!(job = name, "cannot record {}: {e}", record.display());
                }
            }
            Ok(plan) => {
                if previous == Some(RunState::Running) && !self.count_crash(name) {
                    return;
                }
                let resume = matches!(previous, Some(RunState::Running | RunState::Stopped));
                if !resume {
                    self.set_status(name, RunState::Queued, "");
                }
                tracing::info!(job = name, resume, "queued");
                self.queue.push_back(Queued { name: name.to_string(), plan, resume });
            }
        }
    }

    /// A job found `running` at start was running when the service died. Counts it; past
    /// the limit the job is failed instead of resumed (it may be what killed the service).
    fn count_crash(&self, name: &str) -> bool {
        let path = self.run_dir(name).path.join(CRASHES);
        let crashes = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u32>().ok()).unwrap_or(0) + 1;
        if let Err(e) = std::fs::write(&path, crashes.to_string()) {
            tracing::error!(job = name, "cannot record {}: {e}", path.display());
        }
        if crashes > self.max_crash_restarts {
            let reason = format!(
                "the service stopped without a clean stop {crashes} times while this job ran (limit {}); not resumed again",
                self.max_crash_restarts
            );
            tracing::error!(job = name, "{reason}");
            self.set_status(name, RunState::Failed, &reason);
            return false;
        }
        tracing::warn!(job = name, crashes, "the service died while this job ran; resuming it");
        true
    }

    /// Starts every queued job whose devices and workers are free, in queue order.
    pub fn start_ready(&mut self) {
        let mut busy: BTreeSet<DeviceId> = self.running.values().flat_map(|r| r.devices.iter().copied()).collect();
        let mut busy_workers: BTreeSet<String> = self.running.values().flat_map(|r| r.workers.clone()).collect();
        let mut waiting = VecDeque::new();
        while let Some(job) = self.queue.pop_front() {
            let (devices, workers) = (job.plan.devices(), job.plan.workers_wanted());
            if devices.is_disjoint(&busy) && workers.is_disjoint(&busy_workers) {
                busy.extend(devices.iter().copied());
                busy_workers.extend(workers.iter().cloned());
                self.start(job, devices);
            } else {
                waiting.push_back(job);
            }
        }
        self.queue = waiting;
    }

    fn start(&mut self, job: Queued, devices: BTreeSet<DeviceId>) {
        let stop = Arc::new(AtomicBool::new(false));
        let run_dir = self.run_dir(&job.name).path;
        let (name, tx, flag) = (job.name.clone(), self.done_tx.clone(), stop.clone());
        let (workers, cluster) = (job.plan.workers_wanted(), self.cluster.clone());
        tracing::info!(job = %name, devices = ?devices, workers = ?workers, resume = job.resume, "starting");
        let spawned = std::thread::Builder::new().name(format!("job-{name}")).spawn(move || {
            let options = RunOptions { resume: job.resume, stop: Some(flag), cluster, ..Default::default() };
            let span = tracing::info_span!("job", name = %job.name);
            // Whatever happens in the job (a panic in its setup included) ends here, reported.
            let result = catch_unwind(AssertUnwindSafe(|| {
                span.in_scope(|| layerwise_coordinator::run_plan(job.plan, &run_dir, options))
            }));
            let result = match result {
                Ok(r) => r.map(|s| s.stopped).map_err(|e| e.to_string()),
                Err(panic) => {
                    let reason = format!("panicked: {}", layerwise_pipeline::thread::panic_message(&*panic));
                    let dir = RunDir { path: run_dir.clone() };
                    let (epoch, step) = dir.status().map_or((0, 0), |s| (s.epoch, s.step));
                    let _ = dir.set_status(RunState::Failed, &reason, epoch, step);
                    Err(reason)
                }
            };
            let _ = tx.send(Finished { name: job.name, result });
        });
        match spawned {
            Ok(_) => {
                self.running.insert(name, Running { devices, workers, stop, cancelled: false });
            }
            Err(e) => self.set_status(&name, RunState::Failed, &format!("cannot start a thread: {e}")),
        }
    }

    /// Records a job thread's end.
    pub fn finished(&mut self, done: Finished) {
        let Some(r) = self.running.remove(&done.name) else { return };
        match done.result {
            Ok(true) if r.cancelled => {
                let step = self.run_dir(&done.name).status().map_or(0, |s| s.step);
                self.set_status(
                    &done.name,
                    RunState::Cancelled,
                    &format!("cancelled after a checkpoint at step {step}"),
                );
                tracing::info!(job = %done.name, step, "cancelled");
            }
            Ok(true) => tracing::info!(job = %done.name, "stopped with a checkpoint; resumes on the next start"),
            Ok(false) => tracing::info!(job = %done.name, "done"),
            Err(e) => tracing::error!(job = %done.name, "failed: {e}"),
        }
    }

    /// Asks every running job to checkpoint and stop; returns how many run.
    pub fn stop_all(&mut self) -> usize {
        for r in self.running.values() {
            r.stop.store(true, Ordering::SeqCst);
        }
        self.running.len()
    }
}

/// One row of `layerwise status`.
pub struct Row {
    pub name: String,
    pub state: String,
    pub epoch: usize,
    pub step: u64,
    pub updated: f64,
    pub reason: String,
}

/// The status of every run directory under `runs`; an error when `runs` is not a folder.
pub fn status_rows(runs: &Path) -> std::io::Result<Vec<Row>> {
    let mut rows: Vec<Row> = std::fs::read_dir(runs).map(|rd| {
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                let dir = RunDir { path: e.path() };
                let s = dir.status()?;
                let state = serde_json::to_value(s.state).ok()?.as_str()?.to_string();
                Some(Row {
                    name: e.file_name().to_string_lossy().into_owned(),
                    state,
                    epoch: s.epoch,
                    step: s.step,
                    updated: s.updated,
                    reason: s.reason,
                })
            })
            .collect()
    })?;
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// A job file opened for reading without following a link (a link swapped in after the
/// scan is refused here, not read).
fn open_job_file(path: &Path) -> layerwise_plan::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| {
        layerwise_plan::Error::Config(format!("{}: cannot read (links are not followed): {e}", path.display()))
    })
}

/// Writes a job file atomically (a temporary name, synced, renamed) for `serve` to pick up.
pub fn submit(config: &Path, name: Option<&str>, jobs: &Path) -> Result<PathBuf, String> {
    let name = match name {
        Some(n) => n.to_string(),
        None => config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    check_job_name(&name)?;
    let plan = RunConfig::load(config, &[]).and_then(|c| Plan::check(&c, false)).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(jobs).map_err(|e| format!("{}: {e}", jobs.display()))?;
    let text = serde_json::to_string_pretty(&plan.config).expect("config serialises");
    let path = jobs.join(format!("{name}.json"));
    layerwise_rundir::status::write_atomic(&path, text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(path)
}
