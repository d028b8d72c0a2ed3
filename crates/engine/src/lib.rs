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
