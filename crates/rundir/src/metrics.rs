//! One epoch's figures, gathered from the stages' reports, as logged, as written to
//! `metrics.jsonl` and as kept in checkpoints. One type for every reader (`plot`, `status`,
//! `inspect`, resume). JSON has no NaN: serde_json writes it as `null`, read back as NaN.

use layerwise_plan::DeviceId;
use serde::{Deserialize, Deserializer, Serialize};

/// Reads a number, or `null` as NaN.
pub fn number_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub layer: usize,
    pub stage: usize,
    #[serde(deserialize_with = "number_or_nan")]
    pub loss_pred: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub loss_sim: f64,
    /// Local classifier error, percent (null where the layer has none).
    pub error: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageMetrics {
    pub stage: usize,
    /// The process that ran it: "coordinator", or the worker's name (empty in lines
    /// written before it was recorded).
    #[serde(default)]
    pub host: String,
    pub device: DeviceId,
    pub layers: Vec<usize>,
    #[serde(deserialize_with = "number_or_nan")]
    pub busy_s: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub wait_input_s: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub blocked_output_s: f64,
    /// Busy time over the epoch's wall time.
    #[serde(deserialize_with = "number_or_nan")]
    pub utilisation: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub queue_depth: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub images_per_sec: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: u64,
    #[serde(deserialize_with = "number_or_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub train_error: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub test_loss: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub test_error: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_error: Option<f64>,
    #[serde(deserialize_with = "number_or_nan")]
    pub images_per_sec: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub train_seconds: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub epoch_seconds: f64,
    /// Time the coordinator waited for the loader's batches during the epoch.
    #[serde(default, deserialize_with = "number_or_nan")]
    pub data_wait_s: f64,
    /// Images left out of the epoch's batches as unreadable (`data.skip_bad`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_images: u64,
    pub layers: Vec<LayerMetrics>,
    pub stages: Vec<StageMetrics>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_with_nan_survive_a_json_round_trip() {
        let m = LayerMetrics { layer: 0, stage: 0, loss_pred: f64::NAN, loss_sim: 0.5, error: None };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"loss_pred\":null"), "{text}");
        let back: LayerMetrics = serde_json::from_str(&text).unwrap();
        assert!(back.loss_pred.is_nan() && back.loss_sim == 0.5);
    }
}
