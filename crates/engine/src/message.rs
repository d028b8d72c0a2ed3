//! What flows through the pipeline (one enum, in order) and what stages report back.

use std::time::Duration;

use layerwise_nn::Targets;
use tch::Tensor;

/// Which held-out set an evaluation batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSet {
    Test,
    Validation,
}

/// One message on a link. Every stage handles them in arrival order and passes them on.
#[derive(Debug)]
pub enum Message {
    /// A training batch: each stage trains its layers on it and sends their output on.
    Train { epoch: usize, step: u64, input: Tensor, targets: Targets },
    /// An evaluation batch: forward in eval mode; the last stage reports the errors.
    Eval { set: EvalSet, index: usize, input: Tensor, labels: Tensor },
    /// New learning rate for every optimizer, from the next training batch on.
    SetLr { lr: f64 },
    /// The epoch's last batch has passed: report statistics and reset them.
    EpochEnd { epoch: usize },
    /// Every layer has trained on steps 1..=step: copy the state out for a checkpoint,
    /// pass the marker on, go on training while the copy is written.
    Checkpoint { step: u64, seq: u64 },
    /// Stop after passing this on.
    Shutdown,
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Train { .. } => "train",
            Message::Eval { .. } => "eval",
            Message::SetLr { .. } => "set_lr",
            Message::EpochEnd { .. } => "epoch_end",
            Message::Checkpoint { .. } => "checkpoint",
            Message::Shutdown => "shutdown",
        }
    }
}

/// Local statistics of one hidden layer over an epoch (the reference's printout).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerReport {
    pub layer: usize,
    pub loss_pred: f64,
    pub loss_sim: f64,
    /// Local classifier error, percent (NaN where the layer has none).
    pub error: f64,
    pub examples: u64,
}

/// Where a stage's time went during an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTiming {
    pub busy: Duration,
    pub wait_input: Duration,
    pub blocked_output: Duration,
    /// Mean number of messages waiting on the input link when one was taken.
    pub queue_depth: f64,
    pub train_examples: u64,
}

/// A stage's share of a checkpoint, sent to the checkpoint writer.
#[derive(Debug)]
pub struct CheckpointPart {
    /// Which checkpoint of the run (two may share a step: one mid-run, one at epoch end).
    pub seq: u64,
    pub layers: Vec<crate::checkpoint::LayerPart>,
}

/// What a stage sends to the coordinator.
#[derive(Debug)]
pub enum Report {
    Eval {
        set: EvalSet,
        index: usize,
        wrong: i64,
        count: i64,
        loss_sum: f64,
    },
    EpochStats {
        epoch: usize,
        stage: usize,
        layers: Vec<LayerReport>,
        /// Output layer's (mean loss, error %) when this stage holds it.
        output: Option<(f64, f64)>,
        timing: StageTiming,
        /// When this stage finished the epoch's training batches.
        train_done: std::time::Instant,
    },
    Failed(StageFailure),
}

/// A stage that stopped: which one, where, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("stage {stage} failed{}{}: {reason}", layer.map(|l| format!(" in layer {l}")).unwrap_or_default(), step.map(|s| format!(" at step {s}")).unwrap_or_default())]
pub struct StageFailure {
    pub stage: usize,
    pub layer: Option<usize>,
    pub step: Option<u64>,
    pub reason: String,
}
