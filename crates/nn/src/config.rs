//! Plain settings of a model and its optimizer, as read from a config file. Defaults are the
//! paper's defaults (the reference implementation's command-line defaults).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nonlin {
    Relu,
    /// LeakyReLU with negative slope 0.01.
    Leakyrelu,
}

/// Which supervised local loss every hidden block learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    Pred,
    Sim,
    Predsim,
}

/// How gradients are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Training {
    /// Local losses only; every block's output is detached (the paper's method).
    Local,
    /// Global backprop of the output loss alone; no local heads (the baseline).
    Backprop,
    /// Local losses and the global loss, no detach: gradients cross layers.
    LocalGlobal,
    /// Backprop-free: feedback-alignment decoders and a fixed random label projection.
    Bio,
}

impl Training {
    /// Whether gradients cross layers (backprop, local+global): then every layer is in one
    /// process, trained one after the other.
    pub fn is_global(self) -> bool {
        matches!(self, Training::Backprop | Training::LocalGlobal)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `mlp`, or a VGG name of the paper (`vgg8b`, `vgg11b`, ...).
    pub arch: String,
    /// Hidden linear blocks (all of an mlp; the trailing ones of a VGG net).
    pub num_layers: usize,
    pub num_hidden: usize,
    pub feat_mult: f64,
    pub nonlin: Nonlin,
    pub dropout: f64,
    pub batch_norm: bool,
    pub training: Training,
    pub loss: LossKind,
    pub beta: f64,
    pub dim_in_decoder: usize,
    pub similarity_std: bool,
    pub target_proj_size: usize,
    /// Convolutions and matrix products in bfloat16, all else in float32 (see
    /// [`crate::precision`]); off by default.
    pub bf16: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: "mlp".into(),
            num_layers: 1,
            num_hidden: 1024,
            feat_mult: 1.0,
            nonlin: Nonlin::Relu,
            dropout: 0.0,
            batch_norm: true,
            training: Training::Local,
            loss: LossKind::Predsim,
            beta: 0.99,
            dim_in_decoder: 4096,
            similarity_std: true,
            target_proj_size: 128,
            bf16: false,
        }
    }
}

impl ModelConfig {
    /// Whether hidden blocks carry local loss heads.
    pub fn has_local_heads(&self) -> bool {
        self.training != Training::Backprop
    }

    /// The factor on the output layer's loss: `1 - beta` for predsim, as the reference.
    pub fn output_loss_scale(&self) -> f64 {
        if self.has_local_heads() && self.loss == LossKind::Predsim {
            1.0 - self.beta
        } else {
            1.0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    Adam,
    Amsgrad,
    Sgd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f64,
    /// L2 penalty added to the gradient (`torch.optim` semantics).
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    /// Adam and AMSGrad in libtorch's fused kernel (`torch.optim.Adam(fused=True)`): one
    /// pass over each parameter instead of about ten. `false` takes `torch.optim`'s default
    /// single-tensor path instead, bit for bit; the two differ in the last bit of some
    /// updates. SGD always takes the single-tensor path.
    pub fused: bool,
    /// Epochs after which the learning rate is multiplied by `lr_decay`.
    pub milestones: Vec<usize>,
    pub lr_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimKind::Adam,
            lr: 5e-4,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            fused: true,
            milestones: vec![],
            lr_decay: 0.25,
        }
    }
}

impl OptimConfig {
    /// The learning rate of 1-based `epoch`: `lr * decay^(milestones <= epoch - 1)`,
    /// exactly as the reference's schedule.
    pub fn lr_at_epoch(&self, epoch: usize) -> f64 {
        let passed = self.milestones.iter().filter(|&&m| m <= epoch.saturating_sub(1)).count();
        self.lr * self.lr_decay.powi(passed as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_decays_after_each_milestone() {
        let c = OptimConfig { lr: 1.0, milestones: vec![2, 4], lr_decay: 0.5, ..Default::default() };
        let lrs: Vec<f64> = (1..=6).map(|e| c.lr_at_epoch(e)).collect();
        assert_eq!(lrs, vec![1.0, 1.0, 0.5, 0.5, 0.25, 0.25]);
    }
}
