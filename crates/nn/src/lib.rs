//! The tensor math of training with local error signals (Nøkland & Eidnes, 2019).
//!
//! This crate owns the numbers: hidden blocks and their local loss heads, the similarity
//! matrix, the architectures of the paper, optimizers whose state can be saved, and the
//! per-layer random generators. It knows nothing of threads, files or logs: the pipeline
//! engine moves [`HiddenBlock`]s and the [`OutputLayer`] into workers, and the data flows
//! through them as plain tensors.

pub mod arch;
pub mod block;
pub mod config;
mod ffi;
mod heads;
pub mod init;
pub mod losses;
pub mod network;
pub mod optim;
pub mod output;
pub mod precision;
pub mod rng;
pub mod similarity;
pub mod stats;
pub mod targets;

pub use arch::{Architecture, LayerSpec, Pool, PoolKind};
pub use block::{BlockForward, HiddenBlock, LocalStep};
pub use config::{LossKind, ModelConfig, Nonlin, OptimConfig, OptimKind, Training};
pub use heads::LocalLosses;
pub use network::{Network, StepOutput};
pub use optim::Optimizer;
pub use output::OutputLayer;
pub use rng::LayerRng;
pub use similarity::similarity_matrix;
pub use stats::LayerStats;
pub use targets::Targets;

/// Errors of the math crate: a model that cannot be built from its settings, or a state
/// that does not fit the model it is loaded into.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("model: {0}")]
    Model(String),
    #[error("state: {0}")]
    State(String),
    #[error("non-finite loss in layer {layer}: {what} = {value}")]
    NonFinite { layer: usize, what: &'static str, value: f64 },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, NnError>;

/// cuDNN's process-wide flags (benchmark, deterministic): see [`set_cudnn`].
pub fn cudnn() -> (bool, bool) {
    let (mut benchmark, mut deterministic) = (0, 0);
    // SAFETY: two plain flags of libtorch's global context, written into our two ints.
    unsafe { ffi::lw_cudnn(&mut benchmark, &mut deterministic) };
    (benchmark != 0, deterministic != 0)
}

/// Sets cuDNN's process-wide flags: `benchmark` times its convolution algorithms for each
/// new shape and keeps the fastest; `deterministic` allows only algorithms whose results do
/// not depend on scheduling. Without CUDA they are kept and have no effect.
pub fn set_cudnn(benchmark: bool, deterministic: bool) {
    // SAFETY: two plain flags of libtorch's global context.
    unsafe { ffi::lw_set_cudnn(benchmark.into(), deterministic.into()) }
}

/// A tensor with the name it is saved under (PyTorch-style dotted names).
pub type Named = (String, tch::Tensor);

/// The tensors whose names start with `prefix`, with the prefix removed.
pub fn strip_prefix(named: &[Named], prefix: &str) -> Vec<Named> {
    named.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n.to_string(), t.shallow_clone()))).collect()
}

/// Copies each of `targets` from the tensor of the same name in `source`, shapes checked.
pub(crate) fn load_into(targets: &[Named], source: &[Named], owner: &str) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, t) in targets {
        let (_, src) = source
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| NnError::State(format!("{owner}: missing tensor {name:?}")))?;
        if src.size() != t.size() {
            return Err(NnError::State(format!(
                "{owner}: tensor {name:?} has shape {:?}, expected {:?}",
                src.size(),
                t.size()
            )));
        }
        t.shallow_clone().copy_(&src.to_kind(t.kind()));
    }
    Ok(())
}
