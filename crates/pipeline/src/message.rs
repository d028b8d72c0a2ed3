//! What flows through the pipeline and what stages report back.
//!
//! A [`Message`] is a plain, serialisable [`Control`] with, for training and evaluation
//! batches, a [`Payload`] of tensors beside it (their dtype and shape travel with them).
//! Only labels cross links: each stage derives the targets it needs on its own device.
//! Reports are serialisable too, so that a stage in another process can send them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use layerwise_rundir::checkpoint::FileEntry;

/// Which held-out set an evaluation batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvalSet {
    Test,
    Validation,
}

/// The control part of a message. Every stage handles them in arrival order and passes them on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// A training batch: each stage trains its layers on it and sends their output on.
    Train { epoch: usize, step: u64 },
    /// An evaluation batch: forward in eval mode; the last stage adds its errors and loss
    /// to the set's figures, which it reports at the epoch's end.
    Eval { set: EvalSet },
    /// New learning rate for every optimizer, from the next training batch on.
    SetLr { lr: f64 },
    /// The epoch's last batch has passed: report statistics and reset them.
    EpochEnd { epoch: usize },
    /// Every layer has trained on steps 1..=step: write this stage's layers into the
    /// checkpoint's folder, report the files, pass the marker on.
    Checkpoint { step: u64, seq: u64 },
    /// Stop after passing this on.
    Shutdown,
}

/// The tensors of a batch: the previous stage's output (or the images) and the labels.
#[derive(Debug)]
pub struct Payload {
    pub input: Tensor,
    pub labels: Tensor,
}

/// One message on a link.
#[derive(Debug)]
pub struct Message {
    pub control: Control,
    /// Present on `Train` and `Eval`.
    pub payload: Option<Payload>,
}

impl Message {
    pub fn control(control: Control) -> Self {
        Self { control, payload: None }
    }

    pub fn with(control: Control, input: Tensor, labels: Tensor) -> Self {
        Self { control, payload: Some(Payload { input, labels }) }
    }

    pub fn kind(&self) -> &'static str {
        match self.control {
            Control::Train { .. } => "train",
            Control::Eval { .. } => "eval",
            Control::SetLr { .. } => "set_lr",
            Control::EpochEnd { .. } => "epoch_end",
            Control::Checkpoint { .. } => "checkpoint",
            Control::Shutdown => "shutdown",
        }
    }
}

/// Local statistics of one hidden layer over an epoch (the reference's printout).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub loss_pred: f64,
    pub loss_sim: f64,
    /// Local classifier error, percent (NaN where the layer has none).
    pub error: f64,
    pub examples: u64,
}

/// Where a stage's time went during an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub busy: Duration,
    pub wait_input: Duration,
    pub blocked_output: Duration,
    /// Mean number of messages waiting on the input link when one was taken.
    pub queue_depth: f64,
    pub train_examples: u64,
}

/// A stage's figures for one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub stage: usize,
    pub layers: Vec<LayerReport>,
    /// Output layer's (mean loss, error %) when this stage holds it.
    pub output: Option<(f64, f64)>,
    pub timing: StageTiming,
    /// When this stage finished the epoch's training batches: seconds since the Unix epoch
    /// (wall clock, so that it means the same in another process).
    pub train_done: f64,
}

/// What a stage sends to the coordinator, over its report link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Report {
    /// A set's evaluation this epoch, over its `batches` batches.
    Eval {
        set: EvalSet,
        batches: usize,
        wrong: i64,
        count: i64,
        loss_sum: f64,
    },
    EpochStats(EpochStats),
    /// This stage's files of checkpoint `seq` are written and synced (or could not be).
    CheckpointPart {
        seq: u64,
        stage: usize,
        files: Result<Vec<FileEntry>, String>,
    },
    Failed(StageFailure),
}

/// A stage that stopped: which one, where, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("stage {stage} failed{}{}: {reason}", layer.map(|l| format!(" in layer {l}")).unwrap_or_default(), step.map(|s| format!(" at step {s}")).unwrap_or_default())]
pub struct StageFailure {
    pub stage: usize,
    pub layer: Option<usize>,
    pub step: Option<u64>,
    pub reason: String,
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
