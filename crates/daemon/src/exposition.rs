//! What `/metrics` says, in Prometheus' text format (the `prometheus-client` crate's
//! encoder): read at each scrape from the run directories (`status.json`, the last line of
//! `metrics.jsonl`, the newest checkpoint), so that it shows exactly what the files do,
//! for the one run of `train` or every job of `serve`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use layerwise_rundir::status::RunDir;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Which runs a listener shows.
#[derive(Clone, Debug)]
pub enum View {
    /// Every run directory under a runs folder (`serve`).
    Runs(PathBuf),
    /// One run directory (`train`).
    Run(PathBuf),
}

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// The families of one scrape, filled from the run directories.
struct Scrape {
    registry: Registry,
    families: Vec<(&'static str, Gauges)>,
    byte_counters: Option<Family<Labels, Counter>>,
    crash_counters: Option<Family<Labels, Counter>>,
}

const STATES: [&str; 6] = ["queued", "running", "done", "failed", "cancelled", "stopped"];

impl Scrape {
    fn new() -> Self {
        Self {
            registry: Registry::with_prefix("layerwise"),
            families: Vec::new(),
            byte_counters: None,
            crash_counters: None,
        }
    }

    /// The family `name` (created on first use, with `help` and `unit`).
    fn family(&mut self, name: &'static str, help: &str, unit: Option<Unit>) -> Gauges {
        if let Some((_, f)) = self.families.iter().find(|(n, _)| *n == name) {
            return f.clone();
        }
        let family = Gauges::default();
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, family.clone()),
            None => self.registry.register(name, help, family.clone()),
        }
        self.families.push((name, family.clone()));
        family
    }

    /// The family of crash restarts (its samples end in `_total`).
    fn crash_counters(&mut self, help: &str) -> Family<Labels, Counter> {
        if self.crash_counters.is_none() {
            let family = Family::<Labels, Counter>::default();
            self.registry.register("job_crash_restarts", help, family.clone());
            self.crash_counters = Some(family);
        }
        self.crash_counters.clone().expect("made above")
    }

    /// The counter family `name` in bytes (its samples end in `_bytes_total`).
    fn counters(&mut self, name: &'static str, help: &str) -> Family<Labels, Counter> {
        if self.byte_counters.is_none() {
            let family = Family::<Labels, Counter>::default();
            self.registry.register_with_unit(name, help, Unit::Bytes, family.clone());
            self.byte_counters = Some(family);
        }
        self.byte_counters.clone().expect("made above")
    }

    fn set(&mut self, name: &'static str, help: &str, unit: Option<Unit>, labels: &[(&str, String)], value: f64) {
        let labels: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        self.family(name, help, unit).get_or_create(&labels).set(value);
    }
}

/// A checkpoint's duration: from its cut's start (the manifest's `created`) to its
/// manifest's writing (the file's time).
fn checkpoint_seconds(dir: &Path) -> Option<f64> {
    let path = dir.join("manifest.json");
    let text = std::fs::read(&path).ok()?;
    let began = serde_json::from_slice::<serde_json::Value>(&text).ok()?.get("created")?.as_f64()?;
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    let written = written.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    Some((written - began).max(0.0))
}

fn age_seconds(path: &Path) -> Option<f64> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some(SystemTime::now().duration_since(modified).map_or(0.0, |d| d.as_secs_f64()))
}

/// One run's families; its state, for the service's counts.
fn run(s: &mut Scrape, job: &str, dir: &RunDir) -> Option<String> {
    let status = dir.status()?;
    let state = format!("{:?}", status.state).to_lowercase();
    let job_l = || ("job", job.to_string());
    for st in STATES {
        let help = "1 for the state the job is in (queued, running, done, failed, cancelled, stopped)";
        s.set("job_state", help, None, &[job_l(), ("state", st.into())], f64::from(u8::from(st == state)));
    }
    s.set("job_epoch", "Epochs the job has finished", None, &[job_l()], status.epoch as f64);
    s.set("job_step", "Training steps the job has taken", None, &[job_l()], status.step as f64);
    if let Some(age) = age_seconds(&dir.path.join("status.json")) {
        let help = "Seconds since the job's status last changed (an epoch ended, or its state changed)";
        s.set("job_status_age", help, Some(Unit::Seconds), &[job_l()], age);
    }
    let newest = layerwise_rundir::checkpoint::list(&dir.path.join("checkpoints")).into_iter().next();
    if let Some(took) = newest.as_deref().and_then(checkpoint_seconds) {
        let help = "Seconds the newest checkpoint took, from its cut's start to its manifest";
        s.set("job_last_checkpoint_duration", help, Some(Unit::Seconds), &[job_l()], took);
    }
    let crashes = std::fs::read_to_string(dir.path.join("crashes")).ok().and_then(|t| t.trim().parse::<u64>().ok());
    let help = "Times the service died while this job ran and resumed it";
    s.crash_counters(help).get_or_create(&vec![("job".to_string(), job.to_string())]).inc_by(crashes.unwrap_or(0));
    if let Some(age) = newest.and_then(|c| age_seconds(&c.join("manifest.json"))) {
        s.set(
            "job_last_checkpoint_age",
            "Seconds since the newest checkpoint was written",
            Some(Unit::Seconds),
            &[job_l()],
            age,
        );
    }
    if let Some(m) = dir.metrics().pop() {
        last_epoch(s, job, &m);
    }
    Some(state)
}

/// The figures of a job's last epoch (`metrics.jsonl`'s last line).
fn last_epoch(s: &mut Scrape, job: &str, m: &layerwise_rundir::metrics::EpochMetrics) {
    let job_l = || ("job", job.to_string());
    let rate = "Training images a second in the last epoch";
    s.set("job_images_per_second", rate, None, &[job_l()], m.images_per_sec);
    let wait = "Seconds training waited for the data loader in the last epoch";
    s.set("job_data_wait", wait, Some(Unit::Seconds), &[job_l()], m.data_wait_s);
    let skipped = "Images the last epoch left out as unreadable (data.skip_bad)";
    s.set("job_skipped_images", skipped, None, &[job_l()], m.skipped_images as f64);
    let mut sets = vec![("train", m.train_error, m.train_loss), ("test", m.test_error, m.test_loss)];
    if let Some(v) = m.validation_error {
        sets.push(("validation", v, f64::NAN));
    }
    for (set, error, loss) in sets {
        let labels = [job_l(), ("set", set.to_string())];
        s.set(
            "job_error",
            "Classification error of the last epoch (0 to 1)",
            Some(Unit::Other("ratio".into())),
            &labels,
            error / 100.0,
        );
        if !loss.is_nan() {
            s.set("job_loss", "Loss of the last epoch", None, &labels, loss);
        }
    }
    for l in &m.layers {
        let layer = ("layer", l.layer.to_string());
        for (kind, v) in [("pred", l.loss_pred), ("sim", l.loss_sim)] {
            let help = "A layer's local loss in the last epoch (pred: its classifier, sim: similarity matching)";
            s.set("layer_loss", help, None, &[job_l(), layer.clone(), ("loss", kind.into())], v);
        }
        if let Some(e) = l.error {
            let help = "A layer's local classifier error in the last epoch (0 to 1)";
            s.set("layer_error", help, Some(Unit::Other("ratio".into())), &[job_l(), layer.clone()], e / 100.0);
        }
    }
    for st in &m.stages {
        let labels =
            [job_l(), ("stage", st.stage.to_string()), ("device", st.device.to_string()), ("host", st.host.clone())];
        s.set(
            "stage_utilisation",
            "A stage's busy time over the last epoch's (0 to 1)",
            Some(Unit::Other("ratio".into())),
            &labels,
            st.utilisation,
        );
        s.set(
            "stage_wait_input",
            "Seconds a stage waited for its input in the last epoch",
            Some(Unit::Seconds),
            &labels,
            st.wait_input_s,
        );
        s.set(
            "stage_blocked_output",
            "Seconds a stage waited to hand its output on in the last epoch",
            Some(Unit::Seconds),
            &labels,
            st.blocked_output_s,
        );
        s.set(
            "stage_queue_depth",
            "Mean messages waiting on a stage's input link in the last epoch",
            None,
            &labels,
            st.queue_depth,
        );
    }
}

/// What this process knows live: the bytes its links carried, and (as a coordinator that
/// listens for workers) each worker's heartbeat age.
fn live(s: &mut Scrape, cluster: Option<&layerwise_net::Cluster>) {
    use layerwise_net::traffic::{snapshot, Direction};
    let help = "Bytes a link between processes carried, seen from this process (records with their framing)";
    for (run, stage, direction, bytes) in snapshot() {
        let d = if direction == Direction::Sent { "sent" } else { "received" };
        let labels: Labels =
            vec![("job".into(), run), ("stage".into(), stage.to_string()), ("direction".into(), d.into())];
        s.counters("link", help).get_or_create(&labels).inc_by(bytes);
    }
    for (worker, age) in cluster.map(|c| c.heard()).unwrap_or_default() {
        let help = "Seconds since a registered worker's last frame (it sends a heartbeat every second)";
        s.set("worker_heartbeat_age", help, Some(Unit::Seconds), &[("worker", worker)], age);
    }
}

/// The text a scrape returns.
pub fn render(view: &View, cluster: Option<&layerwise_net::Cluster>) -> String {
    let mut s = Scrape::new();
    live(&mut s, cluster);
    match view {
        View::Run(path) => {
            let job = path.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned());
            run(&mut s, &job, &RunDir { path: path.clone() });
        }
        View::Runs(runs) => {
            let mut counts = [0usize; STATES.len()];
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(runs)
                .map(|rd| rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
                .unwrap_or_default();
            dirs.sort();
            for path in dirs {
                let job = path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
                if let Some(state) = run(&mut s, &job, &RunDir { path }) {
                    if let Some(i) = STATES.iter().position(|st| *st == state) {
                        counts[i] += 1;
                    }
                }
            }
            for (st, n) in STATES.iter().zip(counts) {
                s.set("jobs", "Jobs of the service in each state", None, &[("state", st.to_string())], n as f64);
            }
        }
    }
    let mut text = String::new();
    encode(&mut text, &s.registry).expect("writing into a String cannot fail");
    text
}
