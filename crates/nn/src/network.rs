//! A whole network trained in one thread, layer after layer per batch: the reference's
//! order, the baselines' only order, and the yardstick the pipelined engine must equal.
//! The per-layer steps here are the ones the engine's stages run.

use tch::{Device, Tensor};

use crate::arch::Architecture;
use crate::block::HiddenBlock;
use crate::config::{ModelConfig, OptimConfig, Training};
use crate::init;
use crate::output::OutputLayer;
use crate::rng::{LayerRng, Purpose};
use crate::targets::Targets;
use crate::{strip_prefix, Named, Result};

#[derive(Debug)]
pub struct Network {
    pub model: ModelConfig,
    pub arch: Architecture,
    pub blocks: Vec<HiddenBlock>,
    pub output: OutputLayer,
    /// Bio mode's fixed label projection `P`, `target_proj_size` x C.
    pub label_projection: Option<Tensor>,
}

/// What one training step gives back.
#[derive(Debug)]
pub struct StepOutput {
    /// The output layer's logits for the batch (computed before the update).
    pub logits: Tensor,
}

impl Network {
    pub fn new(
        model: &ModelConfig,
        optim: &OptimConfig,
        arch: Architecture,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let devices = vec![device; arch.hidden.len() + 1];
        let (blocks, output) = build_layers(model, optim, &arch, seed, &devices)?;
        let label_projection = label_projection(model, &arch, seed).map(|p| p.to_device(device));
        Ok(Self { model: model.clone(), arch, blocks, output, label_projection })
    }

    pub fn targets(&self, labels: &Tensor) -> Targets {
        Targets::new(labels, self.arch.num_classes, self.label_projection.as_ref())
    }

    pub fn set_lr(&mut self, lr: f64) {
        for b in &mut self.blocks {
            b.optimizer.set_lr(lr);
        }
        self.output.optimizer.set_lr(lr);
    }

    /// One training step on a batch, in the reference's order.
    pub fn train_step(&mut self, x: &Tensor, labels: &Tensor) -> Result<StepOutput> {
        let targets = self.targets(labels);
        let logits = match self.model.training {
            Training::Local | Training::Bio => {
                let x = train_local_blocks(&mut self.blocks, x, &targets)?;
                self.output.train_local(&x, labels)?.0
            }
            Training::Backprop | Training::LocalGlobal => {
                let with_local = self.model.training == Training::LocalGlobal;
                train_global(&mut self.blocks, &mut self.output, x, &targets, with_local)?
            }
        };
        Ok(StepOutput { logits })
    }

    /// Logits in evaluation mode (running batch-norm statistics, no dropout, no heads).
    pub fn predict(&mut self, x: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let x = eval_blocks(&mut self.blocks, x);
        self.output.forward(&x)
    }

    /// Every tensor of the training state, named `layers.{i}.{name}` and `output.{name}`
    /// (see [`HiddenBlock::state`] and [`OutputLayer::state`]).
    pub fn state(&self) -> Vec<Named> {
        let mut out = Vec::new();
        for b in &self.blocks {
            out.extend(b.state().into_iter().map(|(n, t)| (format!("layers.{}.{n}", b.index), t)));
        }
        out.extend(self.output.state().into_iter().map(|(n, t)| (format!("output.{n}"), t)));
        out
    }

    /// Copies parameters and buffers from tensors named as in [`Network::state`]; every
    /// one must be present.
    pub fn load(&mut self, named: &[Named]) -> Result<()> {
        for block in &mut self.blocks {
            block.load(&strip_prefix(named, &format!("layers.{}.", block.index)))?;
        }
        self.output.load(&strip_prefix(named, "output."))
    }

    /// Trained parameters of the network without the local heads (what backprop counts).
    pub fn parameter_count(&self) -> i64 {
        self.arch.parameter_count(self.model.batch_norm)
    }
}

/// Builds every layer of `arch`, layer `i` on `devices[i]` (the output layer last). Each
/// layer's initial values depend only on (seed, layer index), never on where it lives.
pub fn build_layers(
    model: &ModelConfig,
    optim: &OptimConfig,
    arch: &Architecture,
    seed: u64,
    devices: &[Device],
) -> Result<(Vec<HiddenBlock>, OutputLayer)> {
    assert_eq!(devices.len(), arch.hidden.len() + 1, "one device per layer");
    let blocks = arch
        .hidden
        .iter()
        .enumerate()
        .map(|(i, spec)| HiddenBlock::new(i, spec, arch.num_classes, model, optim, seed, devices[i]))
        .collect::<Result<Vec<_>>>()?;
    let out_index = blocks.len();
    let output = OutputLayer::new(out_index, arch.output_in, arch.num_classes, model, optim, seed, devices[out_index]);
    Ok((blocks, output))
}

/// Bio mode's fixed label projection `P` (`target_proj_size` x C, on the CPU), keyed past
/// the output layer so that it never shares a stream with a layer; None in other modes.
pub fn label_projection(model: &ModelConfig, arch: &Architecture, seed: u64) -> Option<Tensor> {
    (model.training == Training::Bio).then(|| {
        let mut rng = LayerRng::new(seed, arch.hidden.len() + 1, Purpose::Init);
        let c = arch.num_classes;
        init::uniform(&mut rng, &[model.target_proj_size as i64, c], init::default_bound(c), Device::Cpu)
            .set_requires_grad(false)
    })
}

/// Evaluation-mode forward through `blocks` (no gradient, no dropout, running statistics).
pub fn eval_blocks(blocks: &mut [HiddenBlock], x: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    let mut x = x.shallow_clone();
    for block in blocks {
        x = block.forward(&x.to_device(block.device()), false).out;
    }
    x
}

/// One local step through `blocks`, each on its own loss, in order; the detached output.
pub fn train_local_blocks(blocks: &mut [HiddenBlock], x: &Tensor, targets: &Targets) -> Result<Tensor> {
    let mut x = x.shallow_clone();
    for block in blocks {
        x = block.train_local(&x, targets)?.output;
    }
    Ok(x)
}

/// Backprop and local+global: one graph through all layers, one backward, and every
/// layer's optimizer steps on its share of the gradient (per-parameter optimizers make
/// this the same as one optimizer over all parameters). Returns the logits.
pub fn train_global(
    blocks: &mut [HiddenBlock],
    output: &mut OutputLayer,
    x: &Tensor,
    targets: &Targets,
    with_local: bool,
) -> Result<Tensor> {
    let mut x = x.shallow_clone();
    let mut total: Option<Tensor> = None;
    let mut local = Vec::new();
    for block in blocks.iter_mut() {
        // Layers of one global stage may sit on several devices, run one after the other.
        let fwd = block.forward(&x.to_device(block.device()), true);
        if with_local {
            let losses = block.local_losses(&fwd.h, &targets.to_device(block.device()))?;
            let t = losses.total.to_device(output.device());
            total = Some(match total {
                None => t,
                Some(acc) => acc + t,
            });
            local.push(losses);
        }
        x = fwd.out;
    }
    let logits = output.forward(&x.to_device(output.device()));
    let labels = targets.labels.to_device(output.device());
    let (scaled, ce) = output.loss(&logits, &labels);
    let total = match total {
        None => scaled,
        Some(t) => t + scaled,
    };
    let mut params: Vec<Tensor> = Vec::new();
    for block in blocks.iter() {
        params.extend(block.optimizer.tensors());
    }
    params.extend(output.optimizer.tensors());
    let grads = Tensor::run_backward(&[&total], &params, false, false);
    let mut rest = &grads[..];
    for block in blocks.iter_mut() {
        let n = block.optimizer.len();
        block.optimizer.step(&rest[..n])?;
        rest = &rest[n..];
    }
    output.optimizer.step(rest)?;
    for (block, losses) in blocks.iter_mut().zip(&local) {
        block.record_stats(losses, &targets.labels.to_device(block.device()));
    }
    output.record(&logits, &ce, &labels);
    Ok(logits.detach())
}
