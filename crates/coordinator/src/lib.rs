//! One run end to end. [`run`] takes a validated plan and goes through a run's steps in
//! order: the resume point, the data, the placement refined by measurement ([`place`],
//! over workers too), the stages started (here and on workers), the epoch loop
//! ([`epochs`]: feeding, the schedule, evaluation, checkpoint markers), the stages'
//! reports gathered ([`inbox`]: metrics, failures, checkpoint parts completed into cuts by
//! [`cut`]), and teardown. [`evaluate`] uses a finished run: evaluation and export.

pub mod cut;
pub mod epochs;
pub mod evaluate;
pub mod inbox;
pub mod options;
pub mod place;
pub mod run;

pub use options::{RunOptions, RunSummary, StepHook};
pub use run::{run, run_plan};

use layerwise_pipeline::StageFailure;

/// Why a run failed: a stage's failure by name, or the error of the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Stage(StageFailure),
    #[error(transparent)]
    Plan(#[from] layerwise_plan::Error),
    #[error(transparent)]
    RunDir(#[from] layerwise_rundir::Error),
    #[error(transparent)]
    Pipeline(layerwise_pipeline::Error),
    #[error(transparent)]
    Net(#[from] layerwise_net::Error),
    #[error(transparent)]
    Data(#[from] layerwise_data::DataError),
    #[error(transparent)]
    Model(#[from] layerwise_nn::NnError),
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A file of the run's that cannot be written or read.
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::RunDir(layerwise_rundir::Error::io(path, source))
    }
}

/// A stage's failure stays a stage's failure, whichever crate reports it.
impl From<layerwise_pipeline::Error> for Error {
    fn from(e: layerwise_pipeline::Error) -> Self {
        match e {
            layerwise_pipeline::Error::Stage(f) => Error::Stage(f),
            other => Error::Pipeline(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
