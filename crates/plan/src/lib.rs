//! What a run asks for, on paper. A config ([`config`]) is read strictly, checked
//! ([`checks`]) and interpreted once against the machine it runs on ([`machine`]) into a
//! validated [`Plan`]: the architecture, the data transform, and the stages of its
//! [`placement`] (balanced by [`balance`]), refused up front where it cannot fit
//! ([`memory`]). Nothing here runs a layer: timing layers for `auto` is runtime work, done
//! by the pipeline and handed back as costs.

pub mod assigned;
pub mod balance;
pub mod checks;
pub mod config;
pub mod data_checks;
pub mod machine;
pub mod memory;
pub mod placement;
mod plan;

pub use config::{GpuLink, PipelineMode, Placement, RunConfig, StageSpec};
pub use machine::{DeviceId, Machine};
pub use placement::{Host, StagePlan};
pub use plan::{DataShape, Plan};

/// Why a config cannot become a plan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] layerwise_data::DataError),
    #[error(transparent)]
    Model(#[from] layerwise_nn::NnError),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// At most this much of a bad value is quoted back in an error.
pub fn quote(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_bad_value_is_quoted_by_a_short_prefix() {
        let q = super::quote(&"x".repeat(1_000_000));
        assert!(q.len() < 100 && q.contains("1000000 bytes"), "{q}");
    }
}
