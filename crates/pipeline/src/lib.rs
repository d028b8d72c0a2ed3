//! The stages of one process. A stage is a run of consecutive layers bound to a device
//! ([`stage`]); every stage runs the same loop over [`message`]s that arrive on its input
//! [`link`] and leave on its output link, and reports to the coordinator over its report
//! link. [`pipeline`] starts a plan's stages and links them (in-process channels here;
//! [`link::RemoteLinks`] for neighbours in other processes). Around them: the [`loader`]
//! that makes batches ahead of stage 0, the [`calibrate`] trials that time layers for
//! `auto`, the [`watchdog`] for stalled stages, and cuDNN's switches ([`cudnn`]).
//!
//! Data flows one way: loader -> stage 0 -> ... -> last stage (output layer) -> reports.
//! Nothing flows backwards; a full link blocks its sender, which keeps memory flat.

pub mod calibrate;
pub mod cudnn;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod layers;
pub mod link;
pub mod loader;
pub mod message;
pub mod pipeline;
pub mod stage;
pub mod thread;
pub mod watchdog;

pub use message::StageFailure;
pub use pipeline::{Pipeline, Stopped};

/// Why stages could not be started or measured.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plan(#[from] layerwise_plan::Error),
    #[error(transparent)]
    RunDir(#[from] layerwise_rundir::Error),
    #[error(transparent)]
    Data(#[from] layerwise_data::DataError),
    #[error("{0}")]
    Stage(#[from] StageFailure),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;
