//! The plan: a run's config interpreted once, against the machine it runs on. Building it is
//! validation: every range check (here and nowhere else), the architecture against the
//! data's images, the stages with their typed devices and thread budgets. `validate`,
//! `train`, `serve`, `eval`, `export`, `inspect` and `bench` all start from a plan; nothing
//! after it parses the config's strings again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use layerwise_data::batches::Transform;
use layerwise_data::DatasetKind;
use layerwise_nn::arch::InputShape;
use layerwise_nn::{Architecture, Training};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::placement::{self, StagePlan};
use crate::{EngineError, Result};

/// A device as the engine names it: typed once parsed, `cpu` or `cuda:N` as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceId {
    Cpu,
    Cuda(usize),
}

impl DeviceId {
    /// `cpu`, `cuda` (device 0) or `cuda:N`; whether it is present is the machine's question.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceId::Cpu),
            "cuda" => Ok(DeviceId::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceId::Cuda)
                .ok_or_else(|| format!("{:?} is not a device: expected \"cpu\", \"cuda\" or \"cuda:N\"", quote(s))),
        }
    }

    pub fn tch(self) -> tch::Device {
        match self {
            DeviceId::Cpu => tch::Device::Cpu,
            DeviceId::Cuda(i) => tch::Device::Cuda(i),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceId::Cuda(_))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Cpu => write!(f, "cpu"),
            DeviceId::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceId {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        DeviceId::parse(&s)
    }
}

/// At most this much of a bad value is quoted back in an error.
pub fn quote(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
        None => s.to_string(),
    }
}

/// What a plan is made for: the devices present and the CPU cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub cuda_devices: usize,
    pub cores: usize,
}

impl Machine {
    pub fn detect() -> Self {
        Self {
            cuda_devices: tch::Cuda::device_count().max(0) as usize,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Every CUDA device, else the CPU: where automatic placements go.
    pub fn visible(&self) -> Vec<DeviceId> {
        if self.cuda_devices == 0 {
            vec![DeviceId::Cpu]
        } else {
            (0..self.cuda_devices).map(DeviceId::Cuda).collect()
        }
    }

    pub fn check(&self, d: DeviceId) -> std::result::Result<DeviceId, String> {
        match d {
            DeviceId::Cuda(i) if i >= self.cuda_devices => {
                Err(format!("{d} is not present: {} CUDA device(s) visible", self.cuda_devices))
            }
            _ => Ok(d),
        }
    }
}

/// The images and classes a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    pub input: InputShape,
    pub num_classes: i64,
}

impl DataShape {
    /// What the config's data set holds: known for the standard sets; an image folder's
    /// classes are its training folder's subfolders.
    pub fn of_config(data: &layerwise_data::DataConfig) -> Result<Self> {
        let (channels, size) = data.input_shape();
        let num_classes = match data.num_classes() {
            Some(n) => n,
            None => {
                debug_assert_eq!(data.dataset, DatasetKind::ImageFolder);
                let train = data.root().join("train");
                let rd = std::fs::read_dir(&train).map_err(|e| EngineError::io(&train, e))?;
                rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).count() as i64
            }
        };
        Ok(Self { input: InputShape { channels, size }, num_classes })
    }
}

/// A validated run: the config, its architecture, data transform and stages.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: RunConfig,
    pub shape: DataShape,
    pub arch: Architecture,
    pub transform: Transform,
    pub stages: Vec<StagePlan>,
    pub machine: Machine,
}

impl Plan {
    /// Validates `config` for `machine` and places its layers. An `auto` placement is split
    /// evenly here; [`Plan::measure_placement`] refines it on the devices before a run.
    pub fn build(config: &RunConfig, machine: Machine) -> Result<Plan> {
        let shape = DataShape::of_config(&config.data)?;
        Self::build_for(config, machine, shape)
    }

    /// As [`Plan::build`], for a data shape known otherwise (read from the data).
    pub fn build_for(config: &RunConfig, machine: Machine, shape: DataShape) -> Result<Plan> {
        let plan = Self::build_unplaced(config, machine, shape)?;
        if config.pipeline.workers.is_empty() {
            plan.check_memory(None)?;
        } else {
            // Spread over workers later: a net that fits only spread is not refused here,
            // but each layer must fit where it is measured; the stages are checked once
            // placed (this process's in `run`, each worker's before it is sent anything).
            for d in machine.visible() {
                plan.check_each_layer_fits(d)?;
            }
        }
        Ok(plan)
    }

    /// As [`Plan::build_for`], without the memory check: for a worker, whose stages come
    /// from the coordinator's plan; it checks them with [`Plan::check_memory`] once set.
    pub fn build_unplaced(config: &RunConfig, machine: Machine, shape: DataShape) -> Result<Plan> {
        check_ranges(config)?;
        let transform = Transform::from_config(&config.data, shape.input.channels, shape.input.size)?;
        let arch = Architecture::new(&config.model, shape.input, shape.num_classes)?;
        let stages = placement::resolve(config, arch.hidden.len() + 1, &machine, None)?;
        Ok(Plan { config: config.clone(), shape, arch, transform, stages, machine })
    }

    /// `validate`: the plan for this machine, and the data files present when asked.
    pub fn check(config: &RunConfig, check_data: bool) -> Result<Plan> {
        let plan = Plan::build(config, Machine::detect())?;
        if check_data {
            config.data.check_files()?;
        }
        Ok(plan)
    }

    /// Re-splits an `auto` placement by each layer's cost measured on the device it will
    /// run on. Other placements are left as they are.
    pub fn measure_placement(&mut self) -> Result<()> {
        if self.config.pipeline.workers.is_empty()
            && placement::wants_measurement(&self.config, self.stages.len(), &self.machine)
        {
            let costs = placement::measure_costs(self)?;
            let stages = placement::resolve(&self.config, self.num_layers(), &self.machine, Some(&costs))?;
            self.stages = if costs.one_thread.is_some() && stages.len() > 1 { self.try_split(stages)? } else { stages };
        }
        Ok(())
    }

    /// The CPU split `auto` chose, if it measures at least 5% faster than one stage with
    /// every thread, else one stage: the split's model (see `placement::cpu_split`) only
    /// predicts how its one-thread stages share the cores. Both are run the same way (a
    /// pipeline of threads and channels, see `placement::measure_split`), alternating,
    /// twice where that is quick; the margin covers what the trial leaves out (the loader,
    /// reports, statistics).
    fn try_split(&self, split: Vec<StagePlan>) -> Result<Vec<StagePlan>> {
        let sizes: Vec<usize> = split.iter().map(|s| s.layers.len()).collect();
        let threads = self.config.train.thread_budget(self.machine.cores);
        let started = std::time::Instant::now();
        let mut one_stage = placement::measure_split(self, &[self.num_layers()], threads, TRIAL_WINDOW)?;
        let mut measured = placement::measure_split(self, &sizes, 1, TRIAL_WINDOW)?;
        // Once more each, alternating, the faster kept, where that costs seconds, not minutes.
        if started.elapsed() < std::time::Duration::from_secs(10) {
            one_stage = one_stage.min(placement::measure_split(self, &[self.num_layers()], threads, TRIAL_WINDOW)?);
            measured = measured.min(placement::measure_split(self, &sizes, 1, TRIAL_WINDOW)?);
        }
        self.split_or_one_stage(split, measured, one_stage)
    }

    /// `split` if its measured step (`measured` seconds) is at least 5% under one stage's,
    /// else one stage with every thread.
    fn split_or_one_stage(&self, split: Vec<StagePlan>, measured: f64, one_stage: f64) -> Result<Vec<StagePlan>> {
        let take = measured <= 0.95 * one_stage;
        tracing::info!(
            "auto: stages of {:?} layers measured {:.1} ms a step, one stage {:.1} ms: {}",
            split.iter().map(|s| s.layers.len()).collect::<Vec<_>>(),
            measured * 1e3,
            one_stage * 1e3,
            if take { "split" } else { "keeping one stage" }
        );
        if take {
            return Ok(split);
        }
        let mut single = self.config.clone();
        single.pipeline.placement = crate::config::Placement::Named("single".into());
        placement::resolve(&single, self.num_layers(), &self.machine, None)
    }

    /// Places an `auto` placement with `pipeline.workers` once they have registered
    /// (`workers`: each one's name and devices, in the config's order; `processes`: the
    /// machine and cores of each, this process's included): one stage per device, this
    /// process's first; where any of those devices is a GPU, only the GPUs get stages (this
    /// process may then only load and feed). The layers are split by their step times
    /// measured on each host that gets a stage, once per host (its devices being taken to
    /// be alike), with the threads its stage will have: here, and on the workers through
    /// `measure_on` (see [`crate::net::cluster::Cluster::measure`]), all at once. A slower
    /// host gets fewer layers.
    pub fn place_over_workers(
        &mut self,
        workers: &[(String, Vec<DeviceId>)],
        processes: &placement::Processes,
        measure_on: impl FnOnce(&[placement::Ask]) -> Result<Vec<Vec<f64>>> + Send,
    ) -> Result<()> {
        let mut devices: Vec<(Option<&str>, DeviceId)> =
            self.machine.visible().into_iter().map(|d| (None, d)).collect();
        for (name, offered) in workers {
            devices.extend(offered.iter().map(|d| (Some(name.as_str()), *d)));
        }
        if devices.iter().any(|(_, d)| d.is_cuda()) {
            // Where there are GPUs, the CPUs only feed them (this process's loader).
            devices.retain(|(_, d)| d.is_cuda());
        }
        let parts = devices.len().min(self.num_layers());
        let sizes = if parts > 1 {
            // Each stage gets a device of its own; its threads are its machine's budget
            // shared among the CPU stages there, as they will be once placed.
            let mut provisional = placement::one_layer_each(&devices[..parts]);
            placement::share_threads(&mut provisional, &self.config, processes);
            let mut hosts: Vec<(Option<&str>, DeviceId, usize)> = Vec::new();
            for (stage, &(host, device)) in provisional.iter().zip(&devices) {
                if !hosts.iter().any(|h| h.0 == host) {
                    hosts.push((host, device, stage.threads));
                }
            }
            let asks: Vec<placement::Ask> = hosts
                .iter()
                .filter_map(|&(host, device, threads)| {
                    host.map(|name| placement::Ask { name: name.to_string(), device, threads })
                })
                .collect();
            let local = hosts.iter().find(|h| h.0.is_none()).map(|&(_, device, threads)| (device, threads));
            let (local, remote) = std::thread::scope(|s| {
                let remote = s.spawn(|| if asks.is_empty() { Ok(Vec::new()) } else { measure_on(&asks) });
                let local = local.map(|(device, threads)| placement::measure(self, device, threads)).transpose();
                (local, remote.join())
            });
            let remote = remote.map_err(|_| EngineError::Other("asking the workers to measure panicked".into()))?;
            let mut times = local?.into_iter().chain(remote?);
            let mut by_host: BTreeMap<Option<&str>, Vec<f64>> = BTreeMap::new();
            // `hosts` has this process first, as `devices` has, then the workers as asked.
            for &(host, device, threads) in &hosts {
                let times = times.next().unwrap_or_default();
                if times.len() != self.num_layers() || times.iter().any(|t| !t.is_finite() || *t < 0.0) {
                    return Err(EngineError::Other(format!(
                        "{}: measured {} step times for {} layers ({times:?}); expected one finite time a layer",
                        host.map_or("this process".into(), |w| format!("worker {w}")),
                        times.len(),
                        self.num_layers()
                    )));
                }
                tracing::info!(
                    "auto: {} on {} with {} thread(s): {:.2} ms a step for all {} layers",
                    host.unwrap_or("this process"),
                    device,
                    threads,
                    times.iter().sum::<f64>() * 1e3,
                    times.len()
                );
                by_host.insert(host, times);
            }
            let costs: Vec<Vec<f64>> = devices[..parts].iter().map(|(host, _)| by_host[host].clone()).collect();
            placement::balance_over(&costs)
        } else {
            vec![self.num_layers()]
        };
        let mut next = 0;
        let specs = sizes
            .iter()
            .zip(&devices)
            .map(|(&size, (host, device))| {
                let layers: Vec<usize> = (next..next + size).collect();
                next += size;
                let device = host.map_or_else(|| device.to_string(), |h| format!("{h}/{device}"));
                crate::config::StageSpec { layers, device }
            })
            .collect();
        let mut placed = self.config.clone();
        placed.pipeline.placement = crate::config::Placement::Stages(specs);
        placed.pipeline.workers.clear();
        self.stages = placement::resolve(&placed, self.num_layers(), &self.machine, None)?;
        let idle: Vec<&str> =
            workers.iter().map(|(n, _)| n.as_str()).filter(|n| !self.workers().contains(*n)).collect();
        if !idle.is_empty() {
            tracing::warn!(
                "workers {idle:?} get no stage: the model has {} layers for {} devices",
                self.num_layers(),
                devices.len()
            );
        }
        Ok(())
    }

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
    fn layer_memory(&self) -> Vec<LayerMemory> {
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
    pub fn check_memory(&self, host: Option<&str>) -> Result<()> {
        check_fits(&self.device_needs(host, &[]), device_memory, self.config.train.batch_size, None)
    }

    /// Refuses, naming it, a layer that alone needs more memory than `device` has: `auto`
    /// builds the layers there one at a time to time them.
    pub fn check_each_layer_fits(&self, device: DeviceId) -> Result<()> {
        let Some(have) = device_memory(device) else { return Ok(()) };
        for (i, layer) in self.layer_memory().iter().enumerate() {
            let need = combine(std::slice::from_ref(layer));
            if need > have as f64 {
                return Err(EngineError::Config(format!(
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
        beside: &[Option<&str>],
        have: impl Fn(DeviceId) -> Option<u64>,
    ) -> Result<()> {
        let also = match beside {
            [] => String::new(),
            _ => format!(
                ", with the CPU stages of {} on its machine",
                beside
                    .iter()
                    .map(|h| h.map_or("the coordinator".into(), |w| format!("worker {w}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        check_fits(&self.device_needs(Some(name), beside), have, self.config.train.batch_size, Some((name, &also)))
    }

    /// The memory each device of `host`'s stages needs, by [`combine`] of its layers; the
    /// CPU's also holds the CPU stages of the processes `beside` it on its machine (a CUDA
    /// index names a card only within a process, so cards are not summed).
    pub(crate) fn device_needs(&self, host: Option<&str>, beside: &[Option<&str>]) -> BTreeMap<DeviceId, f64> {
        let layers = self.layer_memory();
        let mut on: BTreeMap<DeviceId, Vec<LayerMemory>> = BTreeMap::new();
        for s in &self.stages {
            let mine = s.host.as_deref() == host;
            if !mine && !beside.contains(&s.host.as_deref()) {
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

    /// Hidden layers plus the output layer.
    pub fn num_layers(&self) -> usize {
        self.arch.hidden.len() + 1
    }

    /// The output layer's index (after the last hidden layer).
    pub fn output_layer(&self) -> usize {
        self.arch.hidden.len()
    }

    /// Every device the run uses.
    /// The devices of this process that the plan uses (workers' devices are theirs).
    pub fn devices(&self) -> BTreeSet<DeviceId> {
        self.stages.iter().filter(|s| s.host.is_none()).flat_map(|s| s.devices.iter().copied()).collect()
    }

    /// The workers the plan places stages on, by name.
    pub fn workers(&self) -> BTreeSet<String> {
        self.stages.iter().filter_map(|s| s.host.clone()).collect()
    }

    /// Every worker the run may use: those its stages are placed on, and those an `auto`
    /// placement will spread over (`pipeline.workers`) once they register.
    pub fn workers_wanted(&self) -> BTreeSet<String> {
        let mut all = self.workers();
        all.extend(self.config.pipeline.workers.iter().cloned());
        all
    }

    /// Refuses data whose images or classes are not the plan's, naming the data folder.
    pub fn check_data(&self, splits: &layerwise_data::dataset::Splits) -> Result<()> {
        let root = self.config.data.root();
        let want = (self.shape.input.channels, self.shape.input.size, self.shape.input.size);
        for (name, set) in [("training", &splits.train), ("test", &splits.test)] {
            if set.is_empty() {
                return Err(EngineError::Config(format!(
                    "data: {}: no {name} images: expected at least one",
                    root.display()
                )));
            }
            let got = set.image_shape();
            if got != want {
                return Err(EngineError::Config(format!(
                    "data: {}: {name} images are {}x{}x{}, expected {}x{}x{} (channels x height x width) for {:?}",
                    root.display(),
                    got.0,
                    got.1,
                    got.2,
                    want.0,
                    want.1,
                    want.2,
                    self.config.data.dataset
                )));
            }
            if set.num_classes != self.shape.num_classes {
                return Err(EngineError::Config(format!(
                    "data: {}: {name} set has {} classes, expected {}",
                    root.display(),
                    set.num_classes,
                    self.shape.num_classes
                )));
            }
        }
        Ok(())
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The least time `auto`'s trial of a CPU split times each way (see [`Plan::try_split`]).
const TRIAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// One layer's part of a plan's memory estimate, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct LayerMemory {
    /// Parameters (heads included) with their gradients and optimizer state.
    state: f64,
    /// Training activations with their gradients.
    train: f64,
    /// Evaluation activations (no gradients).
    eval: f64,
}

/// What a set of layers on one device needs: all their state, and the larger of all their
/// training activations and the largest evaluation activations of one.
fn combine(layers: &[LayerMemory]) -> f64 {
    let state: f64 = layers.iter().map(|l| l.state).sum();
    let train: f64 = layers.iter().map(|l| l.train).sum();
    let eval = layers.iter().map(|l| l.eval).fold(0.0, f64::max);
    state + train.max(eval)
}

/// Refuses the first device whose need is more than it has (`have`: its memory, where
/// known), naming the device (and its worker, `owner`) and both figures.
fn check_fits(
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
            return Err(EngineError::Config(format!(
                "the model does not fit: it needs about {:.1} GiB{part} (parameters with their optimizer state, and activations at a batch of {batch}), {what} has {:.1} GiB; lower model.num_hidden, model.num_layers, model.feat_mult or the batch sizes{hint}",
                need / GIB,
                have as f64 / GIB,
            )));
        }
    }
    Ok(())
}

/// Memory of a device of this process, where known: the host's for the CPU, the card's
/// for a CUDA device.
pub fn device_memory(device: DeviceId) -> Option<u64> {
    match device {
        DeviceId::Cpu => host_memory(),
        DeviceId::Cuda(i) => layerwise_nccl::cuda_total_memory(i),
    }
}

/// What tells this machine from others: its kernel's boot id (processes in containers on
/// one host share it, as they share its cores), else its host name, else a random string
/// (no other process is then taken to share this one's cores).
pub fn machine_id() -> String {
    ["/proc/sys/kernel/random/boot_id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty() && s.len() <= MACHINE_ID_MAX)
        .unwrap_or_else(|| format!("unknown-{:016x}", rand::random::<u64>()))
}

/// The longest machine id a worker may register.
pub const MACHINE_ID_MAX: usize = 256;

/// Physical memory of this host (MemTotal), where the system says.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Largest values the size keys take: past these a run is a typo, not an experiment.
pub mod limits {
    pub const NUM_LAYERS: usize = 256;
    pub const NUM_HIDDEN: usize = 1 << 20;
    pub const FEAT_MULT: f64 = 64.0;
    pub const CPU_THREADS: usize = 1024;
    pub const BATCH_SIZE: usize = 1 << 20;
    pub const TARGET_PROJ_SIZE: usize = 1 << 16;
    pub const DIM_IN_DECODER: usize = 1 << 24;
    pub const EPOCHS: usize = 1_000_000;
    pub const QUEUE: usize = 1024;
    pub const KEEP: usize = 10_000;
    pub const ARCH_NAME: usize = 64;
    pub const WORKERS: usize = 4096;
}

fn bad(key: &str, what: impl fmt::Display) -> EngineError {
    EngineError::Config(format!("{key}: {what}"))
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, what: &str) -> Result<()> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(bad(key, format!("expected {what}, got {v}")))
    }
}

fn count(key: &str, v: usize, max: usize) -> Result<()> {
    if v == 0 || v > max {
        return Err(bad(key, format!("expected 1..={max}, got {v}")));
    }
    Ok(())
}

fn optional(key: &str, v: Option<usize>, max: usize) -> Result<()> {
    match v {
        Some(v) if v == 0 || v > max => Err(bad(key, format!("expected 1..={max}, or leave it out; got {v}"))),
        _ => Ok(()),
    }
}

/// Every range check of a config, in one place.
fn check_ranges(config: &RunConfig) -> Result<()> {
    use limits::*;
    let t = &config.train;
    count("train.epochs", t.epochs, EPOCHS)?;
    count("train.batch_size", t.batch_size, BATCH_SIZE)?;
    optional("train.eval_batch_size", t.eval_batch_size, BATCH_SIZE)?;
    optional("train.steps_per_epoch", t.steps_per_epoch, usize::MAX)?;
    optional("train.eval_batches", t.eval_batches, usize::MAX)?;
    optional("train.cpu_threads", t.cpu_threads, CPU_THREADS)?;
    in_range("train.stall_warning_s", t.stall_warning_s, 0.001, 1e9, "a positive number of seconds")?;
    count("pipeline.channel_capacity", config.pipeline.channel_capacity, QUEUE)?;
    check_workers(&config.pipeline, config.model.training)?;
    count("data.prefetch", config.data.prefetch, QUEUE)?;
    count("checkpoint.keep", config.checkpoint.keep, KEEP)?;
    let o = &config.optim;
    in_range("optim.lr", o.lr, f64::MIN_POSITIVE, 1e3, "a positive learning rate")?;
    in_range("optim.weight_decay", o.weight_decay, 0.0, 1e3, "a value >= 0")?;
    in_range("optim.betas[0]", o.betas.0, 0.0, 1.0 - f64::EPSILON, "a value in [0, 1)")?;
    in_range("optim.betas[1]", o.betas.1, 0.0, 1.0 - f64::EPSILON, "a value in [0, 1)")?;
    in_range("optim.eps", o.eps, 0.0, 1.0, "a small value >= 0")?;
    in_range("optim.momentum", o.momentum, 0.0, 1.0, "a value in [0, 1]")?;
    in_range("optim.dampening", o.dampening, 0.0, 1.0, "a value in [0, 1]")?;
    in_range("optim.lr_decay", o.lr_decay, f64::MIN_POSITIVE, 1.0, "a factor in (0, 1]")?;
    if o.nesterov && (o.momentum == 0.0 || o.dampening != 0.0) {
        return Err(bad("optim.nesterov", "needs optim.momentum > 0 and optim.dampening = 0"));
    }
    if o.milestones.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("optim.milestones", format!("expected increasing epochs, got {:?}", o.milestones)));
    }
    let m = &config.model;
    if m.arch.len() > ARCH_NAME {
        return Err(bad(
            "model.arch",
            format!("expected a model name such as \"mlp\" or \"vgg8b\", got {:?}", quote(&m.arch)),
        ));
    }
    in_range("model.dropout", m.dropout, 0.0, 0.999, "a probability in [0, 1)")?;
    in_range("model.beta", m.beta, 0.0, 1.0, "a value in [0, 1]")?;
    in_range("model.feat_mult", m.feat_mult, 1e-3, FEAT_MULT, "a channel multiplier in [0.001, 64]")?;
    if m.num_layers > NUM_LAYERS {
        return Err(bad("model.num_layers", format!("expected at most {NUM_LAYERS}, got {}", m.num_layers)));
    }
    count("model.num_hidden", m.num_hidden, NUM_HIDDEN)?;
    count("model.dim_in_decoder", m.dim_in_decoder, DIM_IN_DECODER)?;
    count("model.target_proj_size", m.target_proj_size, TARGET_PROJ_SIZE)?;
    let (channels, size) = config.data.input_shape();
    if !(1..=4).contains(&channels) || !(1..=4096).contains(&size) {
        return Err(bad(
            "data.image_channels, data.image_size",
            format!("expected 1..=4 channels of 1..=4096 pixels, got {channels} x {size}"),
        ));
    }
    if config.data.cutout_holes > 0 && config.data.cutout_length == 0 {
        return Err(bad("data.cutout_length", "expected a hole size in pixels (data.cutout_holes > 0)"));
    }
    Ok(())
}

/// `pipeline.workers`: names as a placement gives them, each once, for an `auto` placement
/// of a pipelined local-loss run (the only one that spreads over processes by itself).
fn check_workers(p: &crate::config::PipelineConfig, training: Training) -> Result<()> {
    let key = "pipeline.workers";
    if p.workers.is_empty() {
        return Ok(());
    }
    if p.workers.len() > limits::WORKERS {
        return Err(bad(key, format!("expected at most {} workers, got {}", limits::WORKERS, p.workers.len())));
    }
    for (i, name) in p.workers.iter().enumerate() {
        placement::worker_name(name).map_err(|e| bad(&format!("{key}[{i}]"), e))?;
        if p.workers[..i].contains(name) {
            return Err(bad(&format!("{key}[{i}]"), format!("worker {name} is named twice")));
        }
    }
    if p.placement != crate::config::Placement::Named("auto".into()) {
        return Err(bad(
            key,
            "only an \"auto\" placement spreads over workers; a list of stages names each stage's worker in its device (\"w1/cpu\")",
        ));
    }
    if p.mode != crate::config::PipelineMode::Pipelined {
        return Err(bad(key, "pipeline.mode \"sequential\" runs in one process: workers need \"pipelined\""));
    }
    if placement::is_global(training) {
        return Err(bad(
            key,
            format!(
                "model.training {training:?} sends gradients through every layer, so its layers cannot span processes"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_to_typed_values_and_print_back() {
        assert_eq!(DeviceId::parse("cpu"), Ok(DeviceId::Cpu));
        assert_eq!(DeviceId::parse("cuda"), Ok(DeviceId::Cuda(0)));
        assert_eq!(DeviceId::parse("cuda:3"), Ok(DeviceId::Cuda(3)));
        assert_eq!(DeviceId::Cuda(3).to_string(), "cuda:3");
        assert!(DeviceId::parse("gpu0").unwrap_err().contains("expected \"cpu\""));
        let m = Machine { cuda_devices: 1, cores: 2 };
        assert!(m.check(DeviceId::Cuda(1)).unwrap_err().contains("1 CUDA device"));
    }

    /// `model.bf16` adds a bfloat16 copy of every parameter (2 bytes against Adam's 16 of
    /// float32 state) and one of each layer's activations (2 bytes against 16); evaluation
    /// is unchanged. A device that holds the float32 run can be too small for the bf16 one.
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
        c.pipeline.placement = crate::config::Placement::Stages(vec![
            crate::config::StageSpec { layers: vec![0, 1], device: "cuda:0".into() },
            crate::config::StageSpec { layers: vec![2, 3, 4], device: "cuda:1".into() },
        ]);
        let mut plan = Plan::build(&c, Machine { cuda_devices: 2, cores: 2 }).unwrap();
        let layers = plan.layer_memory();
        let (first, rest) = (combine(&layers[..2]), combine(&layers[2..]));
        assert_eq!(
            plan.device_needs(None, &[]),
            BTreeMap::from([(DeviceId::Cuda(0), first), (DeviceId::Cuda(1), rest)])
        );
        // A worker counts only the stages placed on it; a process beside it on its machine
        // adds only its CPU stages.
        plan.stages[1].host = Some("w1".into());
        assert_eq!(plan.device_needs(None, &[]), BTreeMap::from([(DeviceId::Cuda(0), first)]));
        assert_eq!(plan.device_needs(Some("w1"), &[]), BTreeMap::from([(DeviceId::Cuda(1), rest)]));
        assert_eq!(plan.device_needs(Some("w1"), &[None]), BTreeMap::from([(DeviceId::Cuda(1), rest)]));
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
        assert_eq!(plan.device_needs(Some("w1"), &[None]), BTreeMap::from([(DeviceId::Cpu, both)]));
        assert!(both > first.max(rest) * 1.01, "{both} against {first}, {rest}");
        let enough_for_one = Some(((first.max(rest) + both) / 2.0) as u64);
        assert!(plan.check_worker_memory("w1", &[], |_| enough_for_one).is_ok());
        let e = plan.check_worker_memory("w1", &[None], |_| enough_for_one).unwrap_err().to_string();
        assert!(
            e.contains("(the layers placed on it, with the CPU stages of the coordinator on its machine)")
                && e.contains("worker w1's host has"),
            "{e}"
        );
    }

    #[test]
    fn workers_for_auto_are_refused_where_a_run_cannot_spread_over_them() {
        let cpu = Machine { cuda_devices: 0, cores: 2 };
        let with = |workers: &[&str], edit: fn(&mut RunConfig)| {
            let mut c = RunConfig::default();
            c.pipeline.workers = workers.iter().map(|w| w.to_string()).collect();
            edit(&mut c);
            Plan::build(&c, cpu).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(with(&["w1", "w2"], |_| {}).is_ok());
        let e = with(&["w1", "w1"], |_| {}).unwrap_err();
        assert!(e.contains("pipeline.workers[1]") && e.contains("named twice"), "{e}");
        let e = with(&["w 1"], |_| {}).unwrap_err();
        assert!(e.contains("pipeline.workers[0]") && e.contains("not a worker name"), "{e}");
        let e =
            with(&["w1"], |c| c.pipeline.placement = crate::config::Placement::Named("per_layer".into())).unwrap_err();
        assert!(e.contains("pipeline.workers") && e.contains("only an \"auto\" placement"), "{e}");
        let e = with(&["w1"], |c| c.pipeline.mode = crate::config::PipelineMode::Sequential).unwrap_err();
        assert!(e.contains("pipeline.workers") && e.contains("sequential"), "{e}");
        let e = with(&["w1"], |c| c.model.training = Training::Backprop).unwrap_err();
        assert!(e.contains("pipeline.workers") && e.contains("cannot span processes"), "{e}");
        let many: Vec<String> = (0..=limits::WORKERS).map(|i| format!("w{i}")).collect();
        let e = with(&many.iter().map(String::as_str).collect::<Vec<_>>(), |_| {}).unwrap_err();
        assert!(e.contains("at most 4096 workers"), "{e}");
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
        let e = plan.check_memory(None).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "all of it here does not: {e}");
        // A layer that alone needs more than this host has is refused before anything is
        // built, here and on a worker that is asked to measure it.
        c.model.num_hidden = limits::NUM_HIDDEN;
        let e = Plan::build(&c, cpu).unwrap_err().to_string();
        assert!(e.contains("layer 0 alone needs about") && e.contains("cpu has"), "{e}");
        let plan = Plan::build_unplaced(&c, cpu, DataShape::of_config(&c.data).unwrap()).unwrap();
        let e = placement::measure(&plan, DeviceId::Cpu, 1).unwrap_err().to_string();
        assert!(e.contains("layer 0 alone needs about"), "{e}");
    }

    /// This process on a machine of 2 cores and each of `workers` on a machine of its own,
    /// but for those named in `beside`, which share this one's.
    fn processes(workers: &[(String, Vec<DeviceId>)], beside: &[&str]) -> placement::Processes {
        let mut all = placement::this_process(2);
        let here = all[""].1.clone();
        for (name, _) in workers {
            let machine = if beside.contains(&name.as_str()) { here.clone() } else { format!("{name}'s") };
            all.insert(name.clone(), (2, machine));
        }
        all
    }

    fn ask(name: &str, device: DeviceId, threads: usize) -> placement::Ask {
        placement::Ask { name: name.into(), device, threads }
    }

    #[test]
    fn auto_over_workers_gives_each_device_a_stage_this_process_first() {
        let mut c = RunConfig::default();
        c.model.num_layers = 3; // four layers with the output layer
        c.model.num_hidden = 64;
        c.pipeline.workers = vec!["w1".into(), "w2".into()];
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        // Layer costs are measured here (a tiny default net) and asked of the workers, all
        // at once: here each says 10 ms a layer, slower than this process, and every stage
        // still gets a layer. Each is asked with its stage's threads: w1 shares this
        // machine's two cores with this process's stage, w2 has its own two.
        let cpus = [("w1".to_string(), vec![DeviceId::Cpu]), ("w2".into(), vec![DeviceId::Cpu])];
        let mut asked = Vec::new();
        plan.place_over_workers(&cpus, &processes(&cpus, &["w1"]), |asks| {
            asked = asks.to_vec();
            Ok(vec![vec![1e-2; 4]; asks.len()])
        })
        .unwrap();
        assert_eq!(asked, vec![ask("w1", DeviceId::Cpu, 1), ask("w2", DeviceId::Cpu, 2)]);
        let placed: Vec<(Option<&str>, DeviceId, usize)> =
            plan.stages.iter().map(|s| (s.host.as_deref(), s.device(), s.layers.len())).collect();
        assert_eq!(
            placed,
            vec![(None, DeviceId::Cpu, 2), (Some("w1"), DeviceId::Cpu, 1), (Some("w2"), DeviceId::Cpu, 1)]
        );
        assert_eq!(plan.stages[0].threads, 2, "placed, this process's stage has its cores till they are shared");
        // GPUs among the devices: the CPUs get no stage, this process's included; each host
        // is asked once.
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let gpus =
            [("w1".to_string(), vec![DeviceId::Cuda(0)]), ("w2".into(), vec![DeviceId::Cuda(0), DeviceId::Cuda(1)])];
        let mut asked = Vec::new();
        plan.place_over_workers(&gpus, &processes(&gpus, &[]), |asks| {
            asked = asks.to_vec();
            Ok(vec![vec![1.0; 4], vec![2.0; 4]])
        })
        .unwrap();
        assert_eq!(asked, vec![ask("w1", DeviceId::Cuda(0), 1), ask("w2", DeviceId::Cuda(0), 1)]);
        let placed: Vec<(Option<&str>, DeviceId, usize)> =
            plan.stages.iter().map(|s| (s.host.as_deref(), s.device(), s.layers.len())).collect();
        assert_eq!(
            placed,
            vec![
                (Some("w1"), DeviceId::Cuda(0), 2),
                (Some("w2"), DeviceId::Cuda(0), 1),
                (Some("w2"), DeviceId::Cuda(1), 1)
            ]
        );
        // More devices than layers: the last workers get nothing and are not asked.
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let five: Vec<(String, Vec<DeviceId>)> = (1..=5).map(|i| (format!("w{i}"), vec![DeviceId::Cpu])).collect();
        let mut asked = Vec::new();
        plan.place_over_workers(&five, &processes(&five, &[]), |asks| {
            asked = asks.iter().map(|a| a.name.clone()).collect();
            Ok(vec![vec![1e-3; 4]; asks.len()])
        })
        .unwrap();
        assert_eq!(asked, vec!["w1", "w2", "w3"]);
        assert_eq!(plan.stages.len(), 4);
        assert_eq!(plan.workers(), BTreeSet::from(["w1".to_string(), "w2".into(), "w3".into()]));
        // A worker's answer that does not fit the net is an error naming it.
        let one = &five[..1];
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let e = plan.place_over_workers(one, &processes(one, &[]), |_| Ok(vec![vec![1.0; 3]])).unwrap_err().to_string();
        assert!(e.contains("worker w1") && e.contains("3 step times for 4 layers"), "{e}");
        let e = plan
            .place_over_workers(one, &processes(one, &[]), |_| Ok(vec![vec![f64::NAN; 4]]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker w1") && e.contains("finite"), "{e}");
        // So is a worker's failure to measure.
        let e = plan
            .place_over_workers(one, &processes(one, &[]), |_| Err(EngineError::Other("worker w1 is lost".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker w1 is lost"), "{e}");
    }

    #[test]
    fn auto_takes_a_cpu_split_only_when_it_measures_faster_than_one_stage() {
        let mut c = RunConfig::default();
        c.model.num_layers = 2;
        c.model.num_hidden = 64;
        c.train.batch_size = 16;
        let plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        // Three stages of one thread, one stage of two, and two stages, each really run.
        for (sizes, threads) in [(vec![1, 1, 1], 1), (vec![3], 2), (vec![2, 1], 1)] {
            let secs = placement::measure_split(&plan, &sizes, threads, std::time::Duration::ZERO).unwrap();
            assert!(secs > 0.0 && secs.is_finite(), "{sizes:?}: {secs}");
        }
        for bad in [vec![], vec![1, 0, 2], vec![1, 1]] {
            let e = placement::measure_split(&plan, &bad, 1, std::time::Duration::ZERO).unwrap_err().to_string();
            assert!(e.contains("covering the 3 layers"), "{bad:?}: {e}");
        }
        let mut per_layer = c.clone();
        per_layer.pipeline.placement = crate::config::Placement::Named("per_layer".into());
        let split = placement::resolve(&per_layer, 3, &plan.machine, None).unwrap();
        let kept = plan.split_or_one_stage(split.clone(), 0.97, 1.0).unwrap();
        assert_eq!(kept.len(), 1, "3% faster is not enough: {kept:?}");
        assert_eq!((kept[0].layers.clone(), kept[0].threads), (vec![0, 1, 2], 2));
        assert_eq!(plan.split_or_one_stage(split.clone(), 0.9, 1.0).unwrap(), split, "10% faster is taken");
        // The whole trial gives one of the two.
        let chosen = plan.try_split(split.clone()).unwrap();
        assert!(chosen == split || chosen == kept, "{chosen:?}");
    }

    #[test]
    fn a_long_bad_value_is_quoted_by_a_short_prefix() {
        let q = quote(&"x".repeat(1_000_000));
        assert!(q.len() < 100 && q.contains("1000000 bytes"), "{q}");
    }

    #[test]
    fn each_range_is_checked_once_naming_its_key() {
        let mut c = RunConfig::default();
        c.model.dropout = 1.0;
        let e = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap_err().to_string();
        assert!(e.contains("model.dropout") && e.contains("[0, 1)"), "{e}");
        let mut c = RunConfig::default();
        c.model.beta = 1.5;
        let e = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap_err().to_string();
        assert!(e.contains("model.beta"), "{e}");
    }
}
