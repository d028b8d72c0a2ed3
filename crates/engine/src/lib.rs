//! The pipeline engine: a config becomes a validated [`Plan`]; the plan's stages, each a
//! worker bound to its device that owns its layers, are connected by bounded links; the
//! coordinator (`run.rs`, `training.rs`, `inbox.rs`) feeds data, applies the schedule, runs
//! evaluation, completes checkpoints and reports metrics.
//!
//! Data flows one way: loader -> stage 0 -> ... -> last stage (output layer) -> reports to
//! the coordinator. Nothing flows backwards; a full link blocks its sender, which keeps
//! memory flat.

pub mod checkpoint;
pub mod config;
pub mod cudnn;
pub mod cut;
pub mod evaluate;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod inbox;
pub mod link;
pub mod loader;
pub mod message;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod placement;
pub mod plan;
pub mod run;
pub mod rundir;
pub mod stage;
pub mod training;
pub mod watchdog;

pub use config::{PipelineMode, RunConfig};
pub use plan::{DeviceId, Machine, Plan};
pub use run::{run, run_plan, RunOptions, RunSummary};

/// Gives the calling thread `n` intra-op threads (OpenMP and MKL), for good.
///
/// `at::set_num_threads` alone is not enough in a thread of its own: it also records `n`
/// process-wide, and a thread's first ATen operation re-applies whatever was recorded last
/// (`lazy_init_num_threads`). A stage that set 2 and then saw the loader thread set 1
/// before its first operation ran on one core: the pipelined path lost a third of its
/// speed, more or less from run to run. Reading the count first spends that first-use
/// initialisation, so what is set here is what the thread keeps.
pub fn set_thread_count(n: usize) {
    let _ = tch::get_num_threads();
    tch::set_num_threads(n.clamp(1, i32::MAX as usize) as i32);
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] layerwise_data::DataError),
    #[error(transparent)]
    Model(#[from] layerwise_nn::NnError),
    #[error("{0}")]
    Stage(#[from] message::StageFailure),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl EngineError {
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    /// The order that slowed every pipelined run: a stage sets its count, another thread sets
    /// a different one before the stage's first operation. The stage must keep its own.
    #[test]
    fn a_thread_keeps_the_count_it_set_when_another_thread_sets_another() {
        let (set_tx, set_rx) = channel();
        let (other_tx, other_rx) = channel();
        let stage = std::thread::spawn(move || {
            super::set_thread_count(3);
            set_tx.send(()).unwrap();
            other_rx.recv().unwrap(); // the other thread has set 1 by now
            let _ = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
            tch::get_num_threads()
        });
        set_rx.recv().unwrap();
        std::thread::spawn(|| super::set_thread_count(1)).join().unwrap();
        other_tx.send(()).unwrap();
        assert_eq!(stage.join().unwrap(), 3);
    }
}
