//! The pipeline engine: layers grouped into stages, each stage a worker thread bound to its
//! device, stages connected by bounded links, and a coordinator that feeds data, applies the
//! schedule, runs evaluation and reports metrics.
//!
//! Data flows one way: loader -> stage 0 -> ... -> last stage (output layer) -> reports to
//! the coordinator. Nothing flows backwards; a full link blocks its sender, which keeps
//! memory flat.

pub mod checkpoint;
pub mod config;
pub mod coordinator;
pub mod evaluate;
pub mod link;
pub mod message;
pub mod metrics;
pub mod placement;
pub mod rundir;
pub mod stage;
pub mod validate;
pub mod watchdog;

pub use config::{PipelineMode, RunConfig};
pub use coordinator::{run, RunOptions, RunSummary};

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
