//! The output layer: a plain linear classifier on the last hidden block's output.

use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, OptimConfig};
use crate::init;
use crate::load_into;
use crate::losses::pred_loss;
use crate::optim::Optimizer;
use crate::rng::{LayerRng, Purpose};
use crate::stats::{load_stats, stats_state};
use crate::{strip_prefix, Named, Result};

#[derive(Debug)]
pub struct OutputLayer {
    /// Position after the hidden blocks (its generator key).
    pub index: usize,
    weight: Tensor,
    bias: Tensor,
    /// `1 - beta` for predsim, else 1 (the reference's scaling of the output loss).
    loss_scale: f64,
    /// The product in bfloat16 ([`crate::precision`]).
    bf16: bool,
    pub optimizer: Optimizer,
    /// [sum of loss x B, errors]
    sums: Tensor,
    pub examples: u64,
}

impl OutputLayer {
    pub fn new(
        index: usize,
        in_features: i64,
        num_classes: i64,
        model: &ModelConfig,
        optim: &OptimConfig,
        seed: u64,
        device: Device,
    ) -> Self {
        let mut rng = LayerRng::new(seed, index, Purpose::Init);
        let bound = init::default_bound(in_features);
        let mut weight = init::uniform(&mut rng, &[num_classes, in_features], bound, device);
        let bias = init::uniform(&mut rng, &[num_classes], bound, device);
        if model.has_local_heads() {
            // The reference zeroes the output weight when training locally.
            weight = init::zeros(&[num_classes, in_features], device);
        }
        let params = vec![("weight".to_string(), weight.shallow_clone()), ("bias".to_string(), bias.shallow_clone())];
        Self {
            index,
            weight,
            bias,
            loss_scale: model.output_loss_scale(),
            bf16: model.bf16,
            optimizer: Optimizer::new(optim, params),
            sums: Tensor::zeros([2], (Kind::Double, device)),
            examples: 0,
        }
    }

    pub fn device(&self) -> Device {
        self.weight.device()
    }

    pub fn parameters(&self) -> Vec<Named> {
        vec![("weight".into(), self.weight.shallow_clone()), ("bias".into(), self.bias.shallow_clone())]
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        crate::precision::product(self.bf16, &x.flatten(1, -1), &self.weight, Some(&self.bias), |x, w, b| {
            x.linear(w, b)
        })
    }

    /// The loss the output layer descends (scaled for predsim) and the plain cross-entropy.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let ce = pred_loss(logits, labels);
        let scaled = if self.loss_scale != 1.0 { &ce * self.loss_scale } else { ce.shallow_clone() };
        (scaled, ce)
    }

    /// One local step on a detached input; returns the logits (before the update) and the
    /// loss descended, both detached.
    pub fn train_local(&mut self, x: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.forward(&x.detach());
        let (scaled, ce) = self.loss(&logits, labels);
        let grads = Tensor::run_backward(&[&scaled], &self.optimizer.tensors(), false, false);
        self.optimizer.step(&grads)?;
        self.record(&logits, &ce, labels);
        Ok((logits.detach(), scaled.detach()))
    }

    pub fn record(&mut self, logits: &Tensor, ce: &Tensor, labels: &Tensor) {
        let _guard = tch::no_grad_guard();
        let b = labels.size()[0];
        let wrong = logits.argmax(1, false).ne_tensor(labels).sum(Kind::Double);
        self.sums += Tensor::stack(&[ce.detach().to_kind(Kind::Double) * b as f64, wrong], 0);
        self.examples += b as u64;
    }

    /// (mean training loss, training error %) since the last reset.
    pub fn snapshot(&self) -> (f64, f64) {
        let n = self.examples.max(1) as f64;
        let v: Vec<f64> = Vec::<f64>::try_from(self.sums.to_device(Device::Cpu)).unwrap_or_default();
        (v[0] / n, 100.0 * v[1] / n)
    }

    pub fn reset_stats(&mut self) {
        let _ = self.sums.zero_();
        self.examples = 0;
    }

    /// Parameters and optimizer state (`optim.*`).
    pub fn state(&self) -> Vec<Named> {
        let mut out = self.parameters();
        out.extend(self.optimizer.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        out.extend(stats_state(&self.sums, self.examples));
        out
    }

    pub fn load_state(&mut self, named: &[Named]) -> Result<()> {
        self.load(named)?;
        self.optimizer.load_state(&strip_prefix(named, "optim."))?;
        self.examples = load_stats(&mut self.sums, named)?;
        Ok(())
    }

    pub fn load(&mut self, named: &[Named]) -> Result<()> {
        load_into(&self.parameters(), named, "output layer")
    }
}
