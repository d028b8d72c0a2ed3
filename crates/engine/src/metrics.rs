//! One epoch's figures, gathered from the stages' reports, as logged and as written to
//! `metrics.jsonl`.

use serde::{Deserialize, Serialize};

use crate::message::{LayerReport, StageTiming};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub layer: usize,
    pub stage: usize,
    pub loss_pred: f64,
    pub loss_sim: f64,
    /// Local classifier error, percent (null where the layer has none).
    pub error: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageMetrics {
    pub stage: usize,
    pub device: String,
    pub layers: Vec<usize>,
    pub busy_s: f64,
    pub wait_input_s: f64,
    pub blocked_output_s: f64,
    /// Busy time over the epoch's wall time.
    pub utilisation: f64,
    pub queue_depth: f64,
    pub images_per_sec: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub train_error: f64,
    pub test_loss: f64,
    pub test_error: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_error: Option<f64>,
    pub images_per_sec: f64,
    pub train_seconds: f64,
    pub epoch_seconds: f64,
    /// Time the coordinator waited for the loader's batches during the epoch.
    #[serde(default)]
    pub data_wait_s: f64,
    pub layers: Vec<LayerMetrics>,
    pub stages: Vec<StageMetrics>,
}

impl LayerMetrics {
    pub fn from_report(r: &LayerReport, stage: usize) -> Self {
        Self {
            layer: r.layer,
            stage,
            loss_pred: r.loss_pred,
            loss_sim: r.loss_sim,
            error: r.error.is_finite().then_some(r.error),
        }
    }
}

impl StageMetrics {
    pub fn from_timing(stage: usize, device: String, layers: Vec<usize>, t: &StageTiming, wall: f64) -> Self {
        Self {
            stage,
            device,
            layers,
            busy_s: t.busy.as_secs_f64(),
            wait_input_s: t.wait_input.as_secs_f64(),
            blocked_output_s: t.blocked_output.as_secs_f64(),
            utilisation: if wall > 0.0 { t.busy.as_secs_f64() / wall } else { 0.0 },
            queue_depth: t.queue_depth,
            images_per_sec: if t.busy.as_secs_f64() > 0.0 {
                t.train_examples as f64 / t.busy.as_secs_f64()
            } else {
                0.0
            },
        }
    }
}
