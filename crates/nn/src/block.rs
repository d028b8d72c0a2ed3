//! A hidden block with its local loss heads ([`crate::heads`]): the unit that learns from
//! its own error.
//!
//! Conv block: `conv -> BatchNorm2d -> nonlin`, sends `pool(dropout2d(h))` on.
//! Linear block: `linear -> BatchNorm1d -> nonlin`, sends `dropout(h)` on.
//! The local losses read `h` itself, before dropout.

use tch::{Device, Kind, Tensor};

use crate::arch::{LayerSpec, Pool, PoolKind};
use crate::config::{ModelConfig, Nonlin, OptimConfig};
use crate::heads::{Heads, LocalLosses};
use crate::init;
use crate::optim::Optimizer;
use crate::precision::product;
use crate::rng::{LayerRng, Purpose};
use crate::stats::LayerStats;
use crate::targets::Targets;
use crate::{load_into, strip_prefix, Named, NnError, Result};

const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// The parts of one forward pass.
#[derive(Debug)]
pub struct BlockForward {
    /// `nonlin(bn(encoder(x)))`, what the local losses read.
    pub h: Tensor,
    /// What is sent on: `pool(dropout(h))`.
    pub out: Tensor,
}

/// What a local training step gives back.
#[derive(Debug)]
pub struct LocalStep {
    /// The activation sent on, detached.
    pub output: Tensor,
    /// The loss the block descended, detached.
    pub loss: Tensor,
}

/// One hidden block with its heads, generator, optimizer and statistics.
#[derive(Debug)]
pub struct HiddenBlock {
    pub index: usize,
    pub spec: LayerSpec,
    weight: Tensor,
    bias: Tensor,
    /// (weight, bias, running_mean, running_var)
    bn: Option<(Tensor, Tensor, Tensor, Tensor)>,
    nonlin: Nonlin,
    dropout: f64,
    /// Products in bfloat16 ([`crate::precision`]).
    bf16: bool,
    heads: Option<Heads>,
    pub rng: LayerRng,
    pub optimizer: Optimizer,
    pub stats: LayerStats,
    device: Device,
}

impl HiddenBlock {
    pub fn new(
        index: usize,
        spec: &LayerSpec,
        num_classes: i64,
        model: &ModelConfig,
        optim: &OptimConfig,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let mut rng = LayerRng::new(seed, index, Purpose::Init);
        let (weight, bias, out) = match *spec {
            LayerSpec::Conv { in_channels, out_channels, kernel, .. } => {
                let bound = init::default_bound(in_channels * kernel * kernel);
                let w = init::channels_last(init::uniform(
                    &mut rng,
                    &[out_channels, in_channels, kernel, kernel],
                    bound,
                    device,
                ));
                let b = init::uniform(&mut rng, &[out_channels], bound, device);
                (w, b, out_channels)
            }
            LayerSpec::Linear { in_features, out_features } => {
                let bound = init::default_bound(in_features);
                let w = init::uniform(&mut rng, &[out_features, in_features], bound, device);
                let b = init::uniform(&mut rng, &[out_features], bound, device);
                (w, b, out_features)
            }
        };
        let bn = model.batch_norm.then(|| {
            (
                init::ones(&[out], device),
                init::zeros(&[out], device),
                Tensor::zeros([out], (Kind::Float, device)),
                Tensor::ones([out], (Kind::Float, device)),
            )
        });
        let heads = model.has_local_heads().then(|| Heads::new(spec, num_classes, model, &mut rng, device));
        let mut block = Self {
            index,
            spec: spec.clone(),
            weight,
            bias,
            bn,
            nonlin: model.nonlin,
            dropout: model.dropout,
            bf16: model.bf16,
            heads,
            rng: LayerRng::new(seed, index, Purpose::Dropout),
            optimizer: Optimizer::new(optim, vec![]),
            stats: LayerStats::new(device),
            device,
        };
        block.optimizer = Optimizer::new(optim, block.parameters());
        Ok(block)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Trainable tensors with their PyTorch-style names: the block's, then its heads'.
    pub fn parameters(&self) -> Vec<Named> {
        let mut p = vec![
            ("encoder.weight".to_string(), self.weight.shallow_clone()),
            ("encoder.bias".to_string(), self.bias.shallow_clone()),
        ];
        if let Some((w, b, _, _)) = &self.bn {
            p.push(("bn.weight".into(), w.shallow_clone()));
            p.push(("bn.bias".into(), b.shallow_clone()));
        }
        if let Some(h) = &self.heads {
            let named = [
                ("sim_transform.weight", &h.sim_transform),
                ("decoder.weight", &h.decoder_weight),
                ("decoder.bias", &h.decoder_bias),
            ];
            for (name, t) in named {
                if let Some(t) = t {
                    p.push((name.to_string(), t.shallow_clone()));
                }
            }
        }
        p
    }

    /// Untrained state: batch-norm running statistics and bio mode's fixed feedback matrix.
    pub fn buffers(&self) -> Vec<Named> {
        let mut b = Vec::new();
        if let Some((_, _, mean, var)) = &self.bn {
            b.push(("bn.running_mean".to_string(), mean.shallow_clone()));
            b.push(("bn.running_var".to_string(), var.shallow_clone()));
        }
        if let Some(f) = self.heads.as_ref().and_then(|h| h.feedback.as_ref()) {
            b.push(("decoder.feedback".to_string(), f.shallow_clone()));
        }
        b
    }

    /// Whether the block has a local classifier whose error means something.
    pub fn has_classifier(&self) -> bool {
        self.heads.as_ref().is_some_and(|h| h.decoder_weight.is_some() && !h.bio)
    }

    /// Forward with dropout noise drawn from this block's generator.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> BlockForward {
        let h = self.hidden(x, train);
        let out = self.output(&h, train);
        BlockForward { h, out }
    }

    /// What the block sends on from its hidden activation `h`: dropout (drawn from the
    /// block's own generator when training), then pooling.
    fn output(&mut self, h: &Tensor, train: bool) -> Tensor {
        let noise = (train && self.dropout > 0.0).then(|| {
            let shape = match self.spec {
                LayerSpec::Conv { .. } => {
                    let s = h.size();
                    vec![s[0], s[1], 1, 1]
                }
                LayerSpec::Linear { .. } => h.size(),
            };
            self.rng.dropout_noise(&shape, self.dropout, self.device)
        });
        self.send_on(h, noise.as_ref())
    }

    /// Forward with given dropout noise (ATen's `mask / (1 - p)`), for checks against PyTorch.
    pub fn forward_with_noise(&self, x: &Tensor, train: bool, noise: Option<&Tensor>) -> BlockForward {
        let h = self.hidden(x, train);
        let out = self.send_on(&h, noise);
        BlockForward { h, out }
    }

    fn hidden(&self, x: &Tensor, train: bool) -> Tensor {
        let z = match self.spec {
            LayerSpec::Conv { stride, padding, .. } => {
                product(self.bf16, x, &self.weight, Some(&self.bias), |x, w, b| {
                    x.conv2d(w, b, [stride, stride], [padding, padding], [1, 1], 1)
                })
            }
            LayerSpec::Linear { .. } => {
                product(self.bf16, &x.flatten(1, -1), &self.weight, Some(&self.bias), |x, w, b| x.linear(w, b))
            }
        };
        let mut z = match &self.bn {
            Some((w, b, mean, var)) => {
                z.batch_norm(Some(w), Some(b), Some(mean), Some(var), train, BN_MOMENTUM, BN_EPS, true)
            }
            None => z,
        };
        // In place, as the reference does: neither the convolution (or matrix product) nor
        // batch norm keeps its output for the backward pass, and the nonlinearity's own
        // backward reads its result, which is positive exactly where its input was. Same
        // values and gradients, one activation-sized tensor fewer alive per layer.
        match self.nonlin {
            Nonlin::Relu => z.relu_(),
            Nonlin::Leakyrelu => z.leaky_relu_(),
        }
    }

    fn send_on(&self, h: &Tensor, noise: Option<&Tensor>) -> Tensor {
        let dropped = match noise {
            Some(n) => h * n,
            None => h.shallow_clone(),
        };
        match &self.spec {
            LayerSpec::Conv { pool_after: Some(pool), .. } => apply_pool(&dropped, pool),
            _ => dropped,
        }
    }

    /// The local losses of this block on `h` (no-op heads in backprop mode give zero).
    pub fn local_losses(&self, h: &Tensor, targets: &Targets) -> Result<LocalLosses> {
        let heads = self.heads.as_ref().ok_or_else(|| NnError::Model("backprop blocks have no local losses".into()))?;
        Ok(heads.losses(h, targets))
    }

    /// One local training step, the paper's method: forward, local loss, backward (reaching
    /// only this block and its heads), optimizer step. Returns the detached output, computed
    /// with the weights as they were before the step, and the detached loss.
    pub fn train_local(&mut self, x: &Tensor, targets: &Targets) -> Result<LocalStep> {
        let x = x.detach();
        let h = self.hidden(&x, true);
        // The output is sent on detached, so it is computed without a graph: with one, the
        // dropped activation and the pooling's indices would stay alive through the
        // backward pass (about 150 MB on vgg8b's second layer at batch 128).
        let output = tch::no_grad(|| self.output(&h, true));
        let losses = self.local_losses(&h, targets)?;
        let grads = Tensor::run_backward(&[&losses.total], &self.optimizer.tensors(), false, false);
        self.optimizer.step(&grads)?;
        self.stats.record(&losses, &targets.labels);
        Ok(LocalStep { output, loss: losses.total.detach() })
    }

    /// Records the statistics of losses computed outside (global modes).
    pub fn record_stats(&mut self, losses: &LocalLosses, labels: &Tensor) {
        self.stats.record(losses, labels);
    }

    /// The block's whole training state: parameters, buffers, optimizer state (`optim.*`)
    /// and dropout generator state (`rng`).
    pub fn state(&self) -> Vec<Named> {
        let mut out = self.parameters();
        out.extend(self.buffers());
        out.extend(self.optimizer.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        out.push(("rng".to_string(), self.rng.state()));
        out.extend(self.stats.state());
        out
    }

    /// Restores what [`HiddenBlock::state`] saved.
    pub fn load_state(&mut self, named: &[Named]) -> Result<()> {
        self.load(named)?;
        self.optimizer.load_state(&strip_prefix(named, "optim."))?;
        self.stats.load_state(named).map_err(|e| NnError::State(format!("layer {}: {e}", self.index)))?;
        let rng = named
            .iter()
            .find(|(n, _)| n == "rng")
            .ok_or_else(|| NnError::State(format!("layer {}: missing tensor \"rng\"", self.index)))?;
        self.rng.set_state(&rng.1)
    }

    /// Copies parameters and buffers from named tensors (a checkpoint, or golden values).
    /// Every tensor of the block must be present with its exact shape.
    pub fn load(&mut self, named: &[Named]) -> Result<()> {
        load_into(&self.parameters(), named, &format!("layer {}", self.index))?;
        load_into(&self.buffers(), named, &format!("layer {}", self.index))
    }
}

pub(crate) fn apply_pool(x: &Tensor, pool: &Pool) -> Tensor {
    let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
    match pool.kind {
        PoolKind::Max => x.max_pool2d([k, k], [s, s], [p, p], [1, 1], false),
        PoolKind::Avg => x.avg_pool2d([k, k], [s, s], [p, p], false, true, None),
    }
}
