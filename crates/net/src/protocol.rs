//! What the coordinator and its workers say to each other over a worker's control
//! connection (authenticated by [`crate::wire`], sealed by [`crate::seal`]), and the heartbeat that tells
//! each side the other is alive.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use layerwise_pipeline::link::{Closed, ReportSender};
use layerwise_pipeline::message::Report;
use layerwise_plan::{DataShape, DeviceId, Host, RunConfig, StagePlan};
use serde::{Deserialize, Serialize};

use crate::seal::SealWriter;

/// How often each side of a control connection says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a peer is lost. A closed socket (a process that died, on a host that
/// stays up) is noticed at once.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// The file by which a worker checks that it sees job `job`'s run directory (the parent
/// of `checkpoints`) as the coordinator does.
pub fn probe_file(checkpoints: &std::path::Path, job: u64) -> PathBuf {
    checkpoints.parent().unwrap_or(checkpoints).join(format!(".layerwise-probe-{job:016x}"))
}

/// What a worker is given to run: everything its stages need, nothing it must look up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub job: u64,
    pub config: RunConfig,
    /// The data's images and classes: the worker may not hold the data set.
    pub shape: DataShape,
    /// Every stage of the plan (hosts named); the worker runs those placed on it.
    pub stages: Vec<StagePlan>,
    /// The run's checkpoint folder: stages write their parts there (a shared filesystem).
    pub checkpoints: PathBuf,
    /// The checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// What the coordinator wrote into the run directory's probe file
    /// ([`probe_file`]): a worker that reads anything else there does not share the run
    /// directory, and refuses the job.
    pub probe: String,
    /// Where each host's stages take their input links, as this worker reaches them.
    pub hosts: Vec<(Host, SocketAddr)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Assign(Box<Assignment>),
    /// Time each layer's training step on `device` (for `auto` over workers); answered by
    /// [`ToCoordinator::Measured`] with the same `request`.
    Measure {
        request: u64,
        config: Box<RunConfig>,
        /// The data's images and classes.
        shape: DataShape,
        device: DeviceId,
        /// Intra-op threads to time them with: the worker's share of its machine's budget
        /// once the stages are placed (see [`layerwise_plan::placement::share_threads`]).
        threads: usize,
    },
    Abort {
        job: u64,
        reason: String,
    },
    /// Registration refused (a worker of that name is registered already).
    Refused {
        reason: String,
    },
    Heartbeat,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToCoordinator {
    Report {
        job: u64,
        report: Report,
    },
    /// Every stage of the job on this worker has ended.
    Finished {
        job: u64,
    },
    Measured {
        request: u64,
        times: Measurement,
    },
    /// The worker hangs up, and why (a frame from the coordinator that failed its check).
    Leaving {
        reason: String,
    },
    Heartbeat,
}

/// The most bytes of free text (a failure's reason) a report from another process keeps.
pub const MAX_REASON: usize = 1024;

/// Text from another process made safe to log, print and write to `status.json`: control
/// characters shown escaped, at most [`MAX_REASON`] bytes kept.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REASON));
    for c in text.chars() {
        let shown: String = if c.is_control() { c.escape_default().collect() } else { c.to_string() };
        if out.len() + shown.len() > MAX_REASON {
            out.push_str(&format!("... ({} bytes)", text.len()));
            break;
        }
        out.push_str(&shown);
    }
    out
}

/// A report from a worker with its free text made [`printable`].
pub fn tamed(report: Report) -> Report {
    match report {
        Report::Failed(mut f) => {
            f.reason = printable(&f.reason);
            Report::Failed(f)
        }
        Report::CheckpointPart { seq, stage, files: Err(e) } => {
            Report::CheckpointPart { seq, stage, files: Err(printable(&e)) }
        }
        other => other,
    }
}

/// A worker's answer to [`ToWorker::Measure`]: seconds per training step of each layer
/// (the output layer last), or why it could not measure.
pub type Measurement = std::result::Result<Vec<f64>, String>;

/// A stage's report link in a worker: the control connection to the coordinator.
pub struct RemoteReports {
    pub job: u64,
    pub control: Control,
}

/// The writing half of a control connection, shared by the threads that speak on it
/// (its records are numbered, so they go out one at a time).
pub type Control = Arc<Mutex<SealWriter>>;

/// Sends `msg` on `control`; false when the connection has failed.
pub fn say<T: Serialize>(control: &Mutex<SealWriter>, msg: &T) -> bool {
    control.lock().unwrap_or_else(|p| p.into_inner()).frame(msg).is_ok()
}

impl ReportSender for RemoteReports {
    fn send(&self, report: Report) -> Result<(), Closed> {
        say(&self.control, &ToCoordinator::Report { job: self.job, report }).then_some(()).ok_or(Closed)
    }
}

/// Sends `beat` on `control` every [`HEARTBEAT`] until the connection fails or `stop` is set.
pub fn heartbeat<T: Serialize + Send + 'static>(
    control: Control,
    stop: Arc<std::sync::atomic::AtomicBool>,
    beat: fn() -> T,
) {
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || loop {
        std::thread::sleep(HEARTBEAT);
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if !say(&control, &beat()) {
            return;
        }
    });
}
