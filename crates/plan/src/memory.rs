//! A plan's memory need by a rough count, and its refusal, before anything is built, where
//! a device cannot hold the layers placed on it: the estimate and the device's memory both
//! named, with what to lower.

use std::collections::BTreeMap;

use crate::machine::device_memory;
use crate::placement::Host;
use crate::{DeviceId, Error, Plan, Result};

impl Plan {
    /// Bytes a run of this plan needs at least, by a rough count: every parameter (heads
    /// included) with its gradient and optimizer state, and the larger of: every layer's
    /// training activations with their gradients, one layer's evaluation activations
    /// (evaluation keeps no gradients). With `model.bf16`, also the bfloat16 copies that
    /// the products keep for their backward pass: of every weight, and of each layer's
    /// activations (counted at its output's size).
    pub fn memory_estimate(&self) -> f64 {
        combine(&self.layer_memory())
    }

    /// Each layer's part of [`Plan::memory_estimate`] (hidden layers, then the output
    /// layer): its parameter state, its training activations, its evaluation activations.
    pub(crate) fn layer_memory(&self) -> Vec<LayerMemory> {
        let (m, t) = (&self.config.model, &self.config.train);
        let classes = self.arch.num_classes as f64;
        // float32 parameter, gradient and optimizer state; a bfloat16 copy under `bf16`.
        let state_per_param = 4.0
            * (2.0 + if self.config.optim.kind == layerwise_nn::OptimKind::Sgd { 1.0 } else { 2.0 })
            + if m.bf16 { 2.0 } else { 0.0 };
        // Four float32 tensors of a layer's output size; under `bf16`, a bfloat16 copy.
        let train_per_feature = 4.0 * 4.0 + if m.bf16 { 2.0 } else { 0.0 };
        let (batch, eval_batch) = (t.batch_size as f64, t.eval_batch() as f64);
        let mut layers: Vec<LayerMemory> = self
            .arch
            .hidden
            .iter()
            .map(|spec| {
                let (features, head) = match *spec {
                    layerwise_nn::LayerSpec::Conv { out_channels, size_out, .. } => {
                        let c = out_channels as f64;
                        ((c * (size_out * size_out) as f64), 9.0 * c * c + m.dim_in_decoder as f64 * classes)
                    }
                    layerwise_nn::LayerSpec::Linear { out_features, .. } => {
                        let d = out_features as f64;
                        (d, d * d + d * classes.max(m.target_proj_size as f64))
                    }
                };
                LayerMemory {
                    state: (spec.block_parameters(m.batch_norm) as f64 + head) * state_per_param,
                    train: train_per_feature * batch * features,
                    eval: 4.0 * 2.0 * eval_batch * features,
                }
            })
            .collect();
        let output = (self.arch.output_in * self.arch.num_classes + self.arch.num_classes) as f64;
        layers.push(LayerMemory { state: output * state_per_param, train: 0.0, eval: 0.0 });
        layers
    }

    /// Refuses a plan whose memory need is more than this process's devices have, with both
    /// figures: for each device of the stages run by `host` (the worker's name; none for
    /// the coordinator's own), the layers placed on it against its memory (the host's
    /// memory for the CPU).
    pub fn check_memory(&self, host: &Host) -> Result<()> {
        check_fits(&self.device_needs(host, &[]), device_memory, self.config.train.batch_size, None)
    }

    /// Refuses, naming it, a layer that alone needs more memory than `device` has: `auto`
    /// builds the layers there one at a time to time them.
    pub fn check_each_layer_fits(&self, device: DeviceId) -> Result<()> {
        let Some(have) = device_memory(device) else { return Ok(()) };
        for (i, layer) in self.layer_memory().iter().enumerate() {
            let need = combine(std::slice::from_ref(layer));
            if need > have as f64 {
                return Err(Error::Config(format!(
                    "the model does not fit: layer {i} alone needs about {:.1} GiB (parameters with their optimizer state, and activations at a batch of {}), {device} has {:.1} GiB; lower model.num_hidden, model.feat_mult or the batch sizes",
                    need / GIB,
                    self.config.train.batch_size,
                    have as f64 / GIB
                )));
            }
        }
        Ok(())
    }

    /// As [`Plan::check_memory`], on the coordinator's side: the stages placed on worker
    /// `name` against the memory it registered with (`have`), before it is sent anything.
    /// `beside`: the other processes on its machine (None for this one), whose CPU stages
    /// take the same host memory.
    pub fn check_worker_memory(
        &self,
        name: &str,
        beside: &[Host],
        have: impl Fn(DeviceId) -> Option<u64>,
    ) -> Result<()> {
        let also = match beside {
            [] => String::new(),
            _ => format!(
                ", with the CPU stages of {} on its machine",
                beside.iter().map(Host::to_string).collect::<Vec<_>>().join(", ")
            ),
        };
        check_fits(
            &self.device_needs(&Host::Worker(name.into()), beside),
            have,
            self.config.train.batch_size,
            Some((name, &also)),
        )
    }

    /// The memory each device of `host`'s stages needs, by [`combine`] of its layers; the
    /// CPU's also holds the CPU stages of the processes `beside` it on its machine (a CUDA
    /// index names a card only within a process, so cards are not summed).
    pub fn device_needs(&self, host: &Host, beside: &[Host]) -> BTreeMap<DeviceId, f64> {
        let layers = self.layer_memory();
        let mut on: BTreeMap<DeviceId, Vec<LayerMemory>> = BTreeMap::new();
        for s in &self.stages {
            let mine = s.host == *host;
            if !mine && !beside.contains(&s.host) {
                continue;
            }
            for (layer, device) in s.layers.iter().zip(&s.devices) {
                if mine || *device == DeviceId::Cpu {
                    on.entry(*device).or_default().push(layers[*layer]);
                }
            }
        }
        on.iter().map(|(d, l)| (*d, combine(l))).collect()
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// One layer's part of a plan's memory estimate, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LayerMemory {
    /// Parameters (heads included) with their gradients and optimizer state.
    state: f64,
    /// Training activations with their gradients.
    train: f64,
    /// Evaluation activations (no gradients).
    eval: f64,
}

/// What a set of layers on one device needs: all their state, and the larger of all their
/// training activations and the largest evaluation activations of one.
pub(crate) fn combine(layers: &[LayerMemory]) -> f64 {
    let state: f64 = layers.iter().map(|l| l.state).sum();
    let train: f64 = layers.iter().map(|l| l.train).sum();
    let eval = layers.iter().map(|l| l.eval).fold(0.0, f64::max);
    state + train.max(eval)
}

/// Refuses the first device whose need is more than it has (`have`: its memory, where
/// known), naming the device (and its worker, `owner`) and both figures.
pub(crate) fn check_fits(
    needs: &BTreeMap<DeviceId, f64>,
    have: impl Fn(DeviceId) -> Option<u64>,
    batch: usize,
    // A worker's name, and what else its host's memory holds.
    owner: Option<(&str, &str)>,
) -> Result<()> {
    for (&device, &need) in needs {
        let Some(have) = have(device) else { continue };
        if need > have as f64 {
            let spread = ", or spread the layers over more devices";
            let (what, part, hint) = match (device, owner) {
                (DeviceId::Cpu, None) => ("this machine".to_string(), String::new(), ""),
                (DeviceId::Cpu, Some((w, also))) => {
                    (format!("worker {w}'s host"), format!(" (the layers placed on it{also})"), spread)
                }
                (DeviceId::Cuda(_), None) => (device.to_string(), " (the layers placed on it)".into(), spread),
                (DeviceId::Cuda(_), Some((w, _))) => {
                    (format!("worker {w}'s {device}"), " (the layers placed on it)".into(), spread)
                }
            };
            return Err(Error::Config(format!(
                "the model does not fit: it needs about {:.1} GiB{part} (parameters with their optimizer state, and activations at a batch of {batch}), {what} has {:.1} GiB; lower model.num_hidden, model.num_layers, model.feat_mult or the batch sizes{hint}",
                need / GIB,
                have as f64 / GIB,
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::limits;
    use crate::{DataShape, Machine, Placement, RunConfig, StageSpec};

    #[test]
    fn bf16_copies_are_in_the_memory_estimate() {
        let mut c = RunConfig::default();
        c.model.num_hidden = 64;
        let machine = Machine { cuda_devices: 1, cores: 2 };
        let f32_plan = Plan::build(&c, machine).unwrap();
        c.model.bf16 = true;
        let bf16_plan = Plan::build(&c, machine).unwrap();
        for (a, b) in f32_plan.layer_memory().iter().zip(bf16_plan.layer_memory()) {
            assert!(a.state > 0.0);
            assert_eq!(b.state, a.state * 18.0 / 16.0, "parameters");
            assert_eq!(b.train, a.train * 18.0 / 16.0, "training activations");
            assert_eq!(b.eval, a.eval, "evaluation");
        }
        let (small, large) = (f32_plan.memory_estimate(), bf16_plan.memory_estimate());
        assert!(large > small * 1.05, "{large} against {small}");
        let bf16_need = BTreeMap::from([(DeviceId::Cuda(0), large)]);
        let have = |_| Some(((small + large) / 2.0) as u64);
        assert!(check_fits(&BTreeMap::from([(DeviceId::Cuda(0), small)]), have, 128, None).is_ok());
        let e = check_fits(&bf16_need, have, 128, None).unwrap_err().to_string();
        assert!(e.contains("cuda:0 has"), "{e}");
    }

    #[test]
    fn each_gpu_is_checked_for_the_layers_placed_on_it() {
        let mut c = RunConfig::default();
        c.model.num_layers = 4;
        c.pipeline.placement = Placement::Stages(vec![
            StageSpec { layers: vec![0, 1], device: "cuda:0".into() },
            StageSpec { layers: vec![2, 3, 4], device: "cuda:1".into() },
        ]);
        let mut plan = Plan::build(&c, Machine { cuda_devices: 2, cores: 2 }).unwrap();
        let layers = plan.layer_memory();
        let (first, rest) = (combine(&layers[..2]), combine(&layers[2..]));
        assert_eq!(
            plan.device_needs(&Host::Coordinator, &[]),
            BTreeMap::from([(DeviceId::Cuda(0), first), (DeviceId::Cuda(1), rest)])
        );
        // A worker counts only the stages placed on it; a process beside it on its machine
        // adds only its CPU stages.
        let w1 = Host::Worker("w1".into());
        plan.stages[1].host = w1.clone();
        assert_eq!(plan.device_needs(&Host::Coordinator, &[]), BTreeMap::from([(DeviceId::Cuda(0), first)]));
        assert_eq!(plan.device_needs(&w1, &[]), BTreeMap::from([(DeviceId::Cuda(1), rest)]));
        assert_eq!(plan.device_needs(&w1, &[Host::Coordinator]), BTreeMap::from([(DeviceId::Cuda(1), rest)]));
        let whole = plan.memory_estimate();
        assert!(first < whole && rest < whole && first + rest >= whole, "{first} + {rest} against {whole}");
        let needs = BTreeMap::from([(DeviceId::Cuda(0), first), (DeviceId::Cuda(1), rest)]);
        // A second GPU just too small for its share is refused, by name and with both figures.
        let small = (rest * 0.9) as u64;
        let e = check_fits(&needs, |d| Some(if d == DeviceId::Cuda(1) { small } else { u64::MAX }), 128, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cuda:1 has") && e.contains("(the layers placed on it)") && e.contains("more devices"),
            "{e}"
        );
        assert!(check_fits(&needs, |_| Some((first.max(rest) * 1.1) as u64), 128, None).is_ok());
        assert!(check_fits(&needs, |_| None, 128, None).is_ok(), "unknown memory is not refused");
        // A worker's device is named with the worker.
        let e = plan.check_worker_memory("w1", &[], |_| Some(small)).unwrap_err().to_string();
        assert!(e.contains("worker w1's cuda:1 has") && e.contains("needs about"), "{e}");
        assert!(plan.check_worker_memory("w1", &[], |_| Some((rest * 1.1) as u64)).is_ok());
        // CPU stages in two processes on one machine share its memory.
        for s in &mut plan.stages {
            s.devices.fill(DeviceId::Cpu);
        }
        let both = combine(&layers);
        assert_eq!(plan.device_needs(&w1, &[Host::Coordinator]), BTreeMap::from([(DeviceId::Cpu, both)]));
        assert!(both > first.max(rest) * 1.01, "{both} against {first}, {rest}");
        let enough_for_one = Some(((first.max(rest) + both) / 2.0) as u64);
        assert!(plan.check_worker_memory("w1", &[], |_| enough_for_one).is_ok());
        let e = plan.check_worker_memory("w1", &[Host::Coordinator], |_| enough_for_one).unwrap_err().to_string();
        assert!(
            e.contains("(the layers placed on it, with the CPU stages of the coordinator on its machine)")
                && e.contains("worker w1's host has"),
            "{e}"
        );
    }

    #[test]
    fn a_net_that_fits_only_spread_over_workers_is_refused_only_for_a_layer_too_big_alone() {
        let Some(host) = device_memory(DeviceId::Cpu) else { panic!("no MemTotal in /proc/meminfo") };
        let cpu = Machine { cuda_devices: 0, cores: 2 };
        // Layers of about two thirds of this host's memory each (a hidden layer holds about
        // 2 d^2 weights with its head, 16 bytes each: itself, its gradient, Adam's two
        // moments), six of them.
        let mut c = RunConfig::default();
        c.model.num_layers = 5;
        c.model.num_hidden = (host as f64 / 48.0).sqrt() as usize;
        let e = Plan::build(&c, cpu).unwrap_err().to_string();
        assert!(e.contains("does not fit") && e.contains("this machine has"), "{e}");
        c.pipeline.workers = vec!["w1".into(), "w2".into()];
        let plan = Plan::build(&c, cpu).expect("spread over two workers, each layer fits");
        let e = plan.check_memory(&Host::Coordinator).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "all of it here does not: {e}");
        // A layer that alone needs more than this host has is refused before anything is
        // built, here and on a worker that is asked to measure it (which checks this first).
        c.model.num_hidden = limits::NUM_HIDDEN;
        let e = Plan::build(&c, cpu).unwrap_err().to_string();
        assert!(e.contains("layer 0 alone needs about") && e.contains("cpu has"), "{e}");
        let plan = Plan::build_unplaced(&c, cpu, DataShape::of_config(&c.data).unwrap()).unwrap();
        let e = plan.check_each_layer_fits(DeviceId::Cpu).unwrap_err().to_string();
        assert!(e.contains("layer 0 alone needs about"), "{e}");
    }
}
