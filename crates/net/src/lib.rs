//! Stages in other processes and on other hosts. A coordinator (`layerwise train`, or a
//! rank 0 launched by torchrun or Slurm) listens; workers (`layerwise worker`, or the other
//! ranks) connect, prove the shared secret and offer their devices (and say which machine
//! they run on: stages on one machine share its cores). For `auto` over workers, the
//! coordinator first asks each to time the layers on its device. For a job, the
//! coordinator sends each worker its assignment (the config, every stage's plan, the
//! checkpoint folder); each process starts the stages placed on it, and a stage whose
//! neighbour is elsewhere links to it over TCP ([`tcp`]) instead of a channel. Reports
//! come back over the worker's control connection.
//!
//! Failures: every control connection carries a heartbeat each [`HEARTBEAT`]; silence for
//! [`PEER_TIMEOUT`], or a closed socket, loses the peer. Losing a worker fails the job
//! (naming the worker and its stages) and shuts every socket of the job, so no thread stays
//! blocked on a link; losing the coordinator makes a worker stop its stages and go back to
//! waiting for one.
//!
//! The rooms: [`wire`] opens and authenticates connections, [`seal`] seals every frame
//! after that, [`gate`] bounds what an unauthenticated peer costs; [`protocol`] is what
//! the coordinator and workers say to each other; [`tcp`] carries a stage's messages
//! between processes (tensors over NCCL between GPUs); [`job`] is one job's links in one
//! process; [`cluster`], [`remote_job`] and [`ask`] are the coordinator's side; [`worker`] the
//! worker's; [`launch`] reads torchrun's and Slurm's environment.

pub mod ask;
pub mod assignment;
pub mod cluster;
pub mod codec;
mod deadline;
pub mod gate;
pub mod job;
pub mod launch;
pub mod nccl_link;
pub mod protocol;
pub mod remote_job;
pub mod seal;
pub mod secret;
pub mod tcp;
pub mod traffic;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod fuzz_tests;

pub use cluster::{Cluster, WorkerConn};
pub use job::JobLinks;
pub use remote_job::RemoteJob;

/// Why a network step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plan(#[from] layerwise_plan::Error),
    #[error(transparent)]
    RunDir(#[from] layerwise_rundir::Error),
    #[error(transparent)]
    Pipeline(#[from] layerwise_pipeline::Error),
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;
