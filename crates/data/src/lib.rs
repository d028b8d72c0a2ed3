//! Data for layerwise: readers of the paper's image sets and of users' image folders and
//! tar shards (in memory, or streamed and decoded on several threads), normalisation and
//! augmentation, and a deterministic, resumable stream of batches.
//!
//! Every reader validates what it reads (magic numbers, sizes, counts, label range) and
//! names the file and what was expected when something is off: a short or damaged data set
//! is an error, never a silently smaller one.

pub mod atomic;
pub mod batches;
pub mod cifar;
pub mod config;
pub mod dataset;
pub mod decode;
pub mod examples;
pub mod folder;
pub mod idx;
pub mod index;
pub mod read;
pub mod rng;
pub mod sampler;
pub mod shards;
pub mod stl10;
pub mod stream;
pub mod svhn;
pub mod synthetic;
pub mod system;

pub use config::{DataConfig, DatasetKind};
pub use dataset::{Dataset, Splits};
pub use examples::{Examples, Sets};
pub use read::load;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data: {0}")]
    Config(String),
}

impl DataError {
    pub fn file(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        DataError::File { path: path.into(), what: what.into() }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
