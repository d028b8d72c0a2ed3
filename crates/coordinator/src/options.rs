//! What a caller gives a run besides its plan (resume, stop, hooks, the cluster of
//! workers), and what a finished run gives back.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use layerwise_net::Cluster;
use layerwise_nn::Named;
use layerwise_plan::StagePlan;
use layerwise_rundir::checkpoint;
use layerwise_rundir::metrics::EpochMetrics;

use crate::Result;

/// Called with (epoch, step in epoch, steps in epoch).
pub type StepHook = Box<dyn FnMut(usize, usize, usize)>;

/// Hooks for callers and tests.
#[derive(Default)]
pub struct RunOptions {
    /// Resume from the newest verified checkpoint in the run directory, if there is one.
    pub resume: bool,
    /// Set from outside (a signal, a cancel request): take a checkpoint at the next step
    /// boundary and stop.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop (with a checkpoint) after this step, as `stop` would (tests, tools).
    pub stop_after_step: Option<u64>,
    /// Inject a fault into a layer at a step (failure-handling tests; test build only).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<layerwise_pipeline::fault::Fault>,
    /// Called after every training batch is handed to stage 0: (epoch, step in epoch, steps in epoch).
    pub on_step: Option<StepHook>,
    /// The coordinator's workers, for a plan that places stages on them.
    pub cluster: Option<Arc<Cluster>>,
}

/// What a finished (or stopped) run gives back.
#[derive(Debug)]
pub struct RunSummary {
    /// Metrics of every completed epoch, those before a resume included.
    pub epochs: Vec<EpochMetrics>,
    pub plan: Vec<StagePlan>,
    pub parameter_count: i64,
    /// Steps taken in all.
    pub step: u64,
    /// Stopped early, with a checkpoint, by `stop` or `stop_after_step`.
    pub stopped: bool,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The run's final state: its last checkpoint.
    pub checkpoint: PathBuf,
}

impl RunSummary {
    /// Every layer's final state (`layers.{i}.*`, `output.*`), read from the last checkpoint.
    pub fn state(&self) -> Result<Vec<Named>> {
        Ok(checkpoint::open(&self.checkpoint)?.model_tensors()?)
    }
}
