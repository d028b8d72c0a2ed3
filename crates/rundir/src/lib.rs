//! What a run leaves on disk, and the only way to read it back: the run directory's
//! resolved config, status and metrics records ([`status`], [`metrics`]), and its
//! checkpoints ([`checkpoint`]). `plot`, `status`, `inspect`, `eval`, resume and the
//! daemon all read runs through here.

mod atomic;
pub mod checkpoint;
pub mod metrics;
pub mod status;
pub mod tfevents;

pub use status::{RunDir, RunState, Status};

/// Why a run's files cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is there but not what it should be (damaged, another format).
    #[error("{0}")]
    Invalid(String),
    /// A checkpoint that cannot resume the config given.
    #[error("config: {0}")]
    Mismatch(String),
}

impl Error {
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
