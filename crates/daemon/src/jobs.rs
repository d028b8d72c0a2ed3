//! The job table: what the jobs directory asks for, what runs where, and each job's state
//! as its run directory's `status.json` records it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use layerwise_engine::rundir::{RunDir, RunState};
use layerwise_engine::{DeviceId, Plan, RunConfig, RunOptions};
use tokio::sync::mpsc::UnboundedSender;

/// A job thread's end.
pub struct Finished {
    pub name: String,
    /// Ok(stopped early) or the error.
    pub result: Result<bool, String>,
}

struct Running {
    devices: BTreeSet<DeviceId>,
    stop: Arc<AtomicBool>,
    /// Stop was asked for by a cancel (not by the daemon stopping).
    cancelled: bool,
}

struct Queued {
    name: String,
    plan: Plan,
    resume: bool,
}

pub struct JobTable {
    jobs_dir: PathBuf,
    runs_dir: PathBuf,
    /// Every job name seen, so that a finished job is not run again.
    known: BTreeSet<String>,
    queue: VecDeque<Queued>,
    running: BTreeMap<String, Running>,
    done_tx: UnboundedSender<Finished>,
}

impl JobTable {
    pub fn new(jobs_dir: PathBuf, runs_dir: PathBuf, done_tx: UnboundedSender<Finished>) -> Self {
        Self { jobs_dir, runs_dir, known: BTreeSet::new(), queue: VecDeque::new(), running: BTreeMap::new(), done_tx }
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

    /// Job names (file stems of `*.json`) in the jobs directory.
    fn job_files(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.jobs_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file())
                    .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cancel_requested(&self, name: &str) -> bool {
        self.jobs_dir.join(format!("{name}.cancel")).exists()
    }

    /// Picks up new job files and cancellations.
    pub fn scan(&mut self) {
        let files = self.job_files();
        for name in &files {
            if self.known.contains(name) {
                continue;
            }
            self.known.insert(name.clone());
            self.admit(name);
        }
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
    fn admit(&mut self, name: &str) {
        let previous = self.run_dir(name).status().map(|s| s.state);
        match previous {
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
        let plan = RunConfig::load(&path, &[]).and_then(|c| Plan::check(&c, true));
        match plan {
            Err(e) => {
                tracing::error!(job = name, "rejected: {e}");
                self.set_status(name, RunState::Failed, &e.to_string());
            }
            Ok(plan) => {
                let resume = matches!(previous, Some(RunState::Running | RunState::Stopped));
                if !resume {
                    self.set_status(name, RunState::Queued, "");
                }
                tracing::info!(job = name, resume, "queued");
                self.queue.push_back(Queued { name: name.to_string(), plan, resume });
            }
        }
    }

    /// Starts every queued job whose devices are free, in queue order.
    pub fn start_ready(&mut self) {
        let mut busy: BTreeSet<DeviceId> = self.running.values().flat_map(|r| r.devices.iter().copied()).collect();
        let mut waiting = VecDeque::new();
        while let Some(job) = self.queue.pop_front() {
            let devices = job.plan.devices();
            if devices.is_disjoint(&busy) {
                busy.extend(devices.iter().copied());
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
        tracing::info!(job = %name, devices = ?devices, resume = job.resume, "starting");
        let spawned = std::thread::Builder::new().name(format!("job-{name}")).spawn(move || {
            let options = RunOptions { resume: job.resume, stop: Some(flag), ..Default::default() };
            let span = tracing::info_span!("job", name = %job.name);
            let result = span.in_scope(|| layerwise_engine::run_plan(job.plan, &run_dir, options));
            let _ = tx.send(Finished { name: job.name, result: result.map(|s| s.stopped).map_err(|e| e.to_string()) });
        });
        match spawned {
            Ok(_) => {
                self.running.insert(name, Running { devices, stop, cancelled: false });
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

/// The status of every run directory under `runs`.
pub fn status_rows(runs: &Path) -> Vec<Row> {
    let mut rows: Vec<Row> = std::fs::read_dir(runs)
        .map(|rd| {
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
        })
        .unwrap_or_default();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}
