//! Which layers run where. A placement is resolved into stages before any layer is built:
//! contiguous runs of layers, each on a host (the coordinator's process or a named worker)
//! with its typed device(s) and its share of the CPU threads. `auto` splits by each
//! layer's cost ([`crate::balance`]); the costs are measured elsewhere and handed in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::balance::{auto_parts, balance, cpu_split, ranges, Costs};
use crate::checks::worker_name;
use crate::config::{PipelineMode, Placement, RunConfig, StageSpec};
use crate::machine::machine_id;
use crate::{DeviceId, Error, Machine, Result};

/// The process that runs a stage: the coordinator's own, or a worker by its name.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Host {
    #[default]
    Coordinator,
    Worker(String),
}

impl Host {
    /// The worker's name; none for the coordinator.
    pub fn worker(&self) -> Option<&str> {
        match self {
            Host::Coordinator => None,
            Host::Worker(name) => Some(name),
        }
    }

    pub fn is_worker(&self, name: &str) -> bool {
        self.worker() == Some(name)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Coordinator => write!(f, "the coordinator"),
            Host::Worker(name) => write!(f, "worker {name}"),
        }
    }
}

/// One stage of a resolved placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    /// Layer indices, ascending and contiguous; the output layer is `num_hidden`.
    pub layers: Vec<usize>,
    /// The device of each of `layers` (one device for a local-loss stage).
    pub devices: Vec<DeviceId>,
    /// Intra-op CPU threads of the worker that runs the stage.
    pub threads: usize,
    /// Read back every this many steps whether a loss went non-finite.
    pub check_finite_every: u64,
    /// The process that runs the stage.
    #[serde(default)]
    pub host: Host,
}

impl StagePlan {
    pub fn device(&self) -> DeviceId {
        self.devices[0]
    }
}

/// Whether an `auto` placement would split by measured costs.
pub fn wants_measurement(config: &RunConfig, layers: usize, machine: &Machine) -> bool {
    config.pipeline.placement == Placement::Auto
        && !config.model.training.is_global()
        && layers > 1
        && auto_parts(layers, machine) > 1
}

/// Resolves the config's placement for `num_layers` layers (hidden layers plus the output
/// layer). `costs` (one per layer) balance an `auto` placement; without them it splits evenly.
pub fn resolve(
    config: &RunConfig,
    num_layers: usize,
    machine: &Machine,
    costs: Option<&Costs>,
) -> Result<Vec<StagePlan>> {
    let threads = config.train.thread_budget(machine.cores);
    let groups = groups(&config.pipeline.placement, num_layers, machine, costs, threads)?;
    stages(config, machine, groups)
}

/// The stages of a placement over `devices` (each on its host): stage k holds the next
/// `sizes[k]` layers on `devices[k]`. How `auto` over workers places, once it has measured.
pub fn over_devices(
    config: &RunConfig,
    machine: &Machine,
    devices: &[(Host, DeviceId)],
    sizes: &[usize],
) -> Result<Vec<StagePlan>> {
    let groups = ranges(sizes).into_iter().zip(devices).map(|(r, (h, d))| Group::on(r, *d, h.clone())).collect();
    stages(config, machine, groups)
}

/// A stage for each of `devices`, stage i with layer i and one thread: a sketch of a
/// placement, before the layers are split.
pub fn one_layer_each(devices: &[(Host, DeviceId)]) -> Vec<StagePlan> {
    let groups = devices.iter().enumerate().map(|(i, (h, d))| Group::on(i..i + 1, *d, h.clone()));
    groups.enumerate().map(|(index, g)| g.into_stage(index, 1)).collect()
}

/// A question for `auto` over workers: worker `name`'s step time of each layer on
/// `device` with `threads` intra-op threads.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    pub name: String,
    pub device: DeviceId,
    pub threads: usize,
}

/// The processes of a run that this one knows of: each one's cores and the machine it runs
/// on ([`crate::machine::machine_id`]).
pub type Processes = BTreeMap<Host, (usize, String)>;

/// This process alone: where a plan's stages start, before any worker has registered.
pub fn this_process(cores: usize) -> Processes {
    BTreeMap::from([(Host::Coordinator, (cores, machine_id()))])
}

/// Gives each CPU stage of `processes` its intra-op threads: a machine's budget
/// (`train.cpu_threads`, else its cores) shared among the CPU stages that run on it at
/// once, whichever of its processes they are in; all of it to the one thread of a
/// sequential run. A CUDA stage gets one. Stages of processes not known yet are left as
/// they are.
pub fn share_threads(stages: &mut [StagePlan], config: &RunConfig, processes: &Processes) {
    let machines: BTreeSet<&String> = processes.values().map(|(_, m)| m).collect();
    for machine in machines {
        let hosts: Vec<&Host> = processes.iter().filter(|(_, (_, m))| m == machine).map(|(h, _)| h).collect();
        let cores = processes.values().filter(|(_, m)| m == machine).map(|(c, _)| *c).min().unwrap_or(1);
        let budget = config.train.thread_budget(cores);
        let here = |s: &StagePlan| hosts.contains(&&s.host);
        let cpu_stages = stages.iter().filter(|s| here(s) && s.device() == DeviceId::Cpu).count().max(1);
        let threads = match config.pipeline.mode {
            PipelineMode::Sequential => budget,
            PipelineMode::Pipelined => (budget / cpu_stages).max(1),
        };
        for s in stages.iter_mut().filter(|s| here(s)) {
            s.threads = if s.device().is_cuda() { 1 } else { threads };
        }
    }
}

/// Layers of a stage-to-be, with their devices and host.
struct Group {
    layers: Vec<usize>,
    devices: Vec<DeviceId>,
    host: Host,
}

impl Group {
    fn on(layers: Range<usize>, device: DeviceId, host: Host) -> Self {
        Group { devices: vec![device; layers.len()], layers: layers.collect(), host }
    }

    fn into_stage(self, index: usize, check_finite_every: u64) -> StagePlan {
        StagePlan { index, layers: self.layers, devices: self.devices, threads: 1, check_finite_every, host: self.host }
    }
}

/// The stages of `groups`: checked against the mode and the training (global gradients
/// keep every layer in one stage), with their threads shared as in this process alone.
fn stages(config: &RunConfig, machine: &Machine, mut groups: Vec<Group>) -> Result<Vec<StagePlan>> {
    let remote = groups.iter().any(|g| g.host != Host::Coordinator);
    if remote && config.pipeline.mode == PipelineMode::Sequential {
        return Err(Error::Config(
            "pipeline.mode: \"sequential\" runs every stage in one process; a placement on workers needs \"pipelined\""
                .into(),
        ));
    }
    if config.model.training.is_global() && groups.len() > 1 {
        // Global gradients cross every layer: one worker holds them all, each layer on the
        // device its stage named, run one after the other.
        if groups.iter().any(|g| g.host != groups[0].host) {
            return Err(Error::Config(format!(
                "pipeline.placement: model.training {:?} sends gradients through every layer, so its layers cannot span processes",
                config.model.training
            )));
        }
        let layers = groups.iter().flat_map(|g| g.layers.clone()).collect();
        let devices = groups.iter().flat_map(|g| g.devices.clone()).collect();
        groups = vec![Group { layers, devices, host: groups[0].host.clone() }];
    }
    let mut stages: Vec<StagePlan> = groups
        .into_iter()
        .enumerate()
        .map(|(index, g)| {
            let cuda = g.devices[0].is_cuda();
            g.into_stage(index, config.train.check_finite_every.unwrap_or(if cuda { 50 } else { 1 }))
        })
        .collect();
    share_threads(&mut stages, config, &this_process(machine.cores));
    Ok(stages)
}

fn groups(
    placement: &Placement,
    num_layers: usize,
    machine: &Machine,
    costs: Option<&Costs>,
    cpu_threads: usize,
) -> Result<Vec<Group>> {
    let visible = machine.visible();
    let contiguous = |sizes: Vec<usize>| -> Vec<Group> {
        let on = |(i, r)| Group::on(r, visible[i % visible.len()], Host::Coordinator);
        ranges(&sizes).into_iter().enumerate().map(on).collect()
    };
    Ok(match placement {
        Placement::Single => contiguous(vec![num_layers]),
        Placement::PerLayer => contiguous(vec![1; num_layers]),
        Placement::Auto => match costs {
            Some(Costs { whole, one_thread: Some(one) }) => contiguous(cpu_split(whole, one, cpu_threads)),
            Some(Costs { whole, one_thread: None }) => contiguous(balance(whole, auto_parts(num_layers, machine))),
            None => contiguous(balance(&vec![1.0; num_layers], auto_parts(num_layers, machine))),
        },
        Placement::Stages(specs) => explicit(specs, num_layers, machine)?,
    })
}

/// A stage's device as a placement names it: `DEVICE` in the coordinator's process, or
/// `WORKER/DEVICE` on a worker (whose devices are checked against what it offers when the
/// job starts).
fn stage_device(spec: &str, machine: &Machine) -> std::result::Result<(Host, DeviceId), String> {
    match spec.split_once('/') {
        Some((worker, device)) => Ok((Host::Worker(worker_name(worker)?), DeviceId::parse(device)?)),
        None => Ok((Host::Coordinator, machine.check(DeviceId::parse(spec)?)?)),
    }
}

fn explicit(specs: &[StageSpec], num_layers: usize, machine: &Machine) -> Result<Vec<Group>> {
    if specs.is_empty() {
        return Err(Error::Config("pipeline.placement: expected at least one stage".into()));
    }
    let last = num_layers - 1;
    let mut expected = 0;
    let mut groups = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (host, device) = stage_device(&spec.device, machine)
            .map_err(|e| Error::Config(format!("pipeline.placement[{i}].device: {e}")))?;
        if spec.layers.is_empty() {
            return Err(Error::Config(format!("pipeline.placement[{i}].layers: expected at least one layer")));
        }
        for (j, &l) in spec.layers.iter().enumerate() {
            let at = format!("pipeline.placement[{i}].layers[{j}]");
            if l > last {
                return Err(Error::Config(format!(
                    "{at}: layer {l} does not exist: the model has layers 0..={last} ({last} hidden layers, then the output layer {last})"
                )));
            }
            if l != expected {
                return Err(Error::Config(format!(
                    "{at}: expected layer {expected} (stages hold contiguous layers in order, 0..={last}), got {l}"
                )));
            }
            expected += 1;
        }
        groups.push(Group::on(spec.layers[0]..expected, device, host));
    }
    if expected != num_layers {
        return Err(Error::Config(format!(
            "pipeline.placement: layers {expected}..={last} are not placed (the model has {last} hidden layers and the output layer {last})"
        )));
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_nn::Training;

    fn cpu(cores: usize) -> Machine {
        Machine { cuda_devices: 0, cores }
    }

    fn config(placement: Placement, training: Training) -> RunConfig {
        let mut c = RunConfig::default();
        c.pipeline.placement = placement;
        c.model.training = training;
        c
    }

    fn layers(plans: &[StagePlan]) -> Vec<Vec<usize>> {
        plans.iter().map(|p| p.layers.clone()).collect()
    }

    #[test]
    fn auto_on_cpu_takes_the_split_the_costs_predict() {
        // One thread 1.6x slower than two: layers of one thread each beat one stage.
        let costs = Costs { whole: vec![1.0, 1.0, 1.0, 0.1], one_thread: Some(vec![1.6, 1.6, 1.6, 0.16]) };
        let plans = resolve(&config(Placement::Auto, Training::Local), 4, &cpu(2), Some(&costs)).unwrap();
        assert_eq!(layers(&plans), vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn auto_on_cpu_splits_by_measured_cost_into_one_stage_per_core() {
        let c = config(Placement::Auto, Training::Local);
        let costs = Costs { whole: vec![5.0, 1.0, 1.0, 1.0], one_thread: None };
        let plans = resolve(&c, 4, &cpu(2), Some(&costs)).unwrap();
        assert_eq!(layers(&plans), vec![vec![0], vec![1, 2, 3]]);
        assert!(wants_measurement(&c, 4, &cpu(2)));
        assert!(!wants_measurement(&c, 4, &cpu(1)), "one core: one stage, nothing to measure");
        let even = resolve(&c, 4, &cpu(2), None).unwrap();
        assert_eq!(layers(&even), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn cpu_threads_are_shared_among_pipelined_cpu_stages_and_all_go_to_a_sequential_run() {
        let mut c = config(Placement::PerLayer, Training::Local);
        c.train.cpu_threads = Some(8);
        let plans = resolve(&c, 4, &cpu(2), None).unwrap();
        assert!(plans.iter().all(|p| p.threads == 2), "{plans:?}");
        c.pipeline.mode = PipelineMode::Sequential;
        let plans = resolve(&c, 4, &cpu(2), None).unwrap();
        assert!(plans.iter().all(|p| p.threads == 8), "{plans:?}");
    }

    #[test]
    fn explicit_stages_must_cover_all_layers_in_order_on_present_devices() {
        let stages = |v: Vec<(Vec<usize>, &str)>| {
            config(
                Placement::Stages(v.into_iter().map(|(layers, d)| StageSpec { layers, device: d.into() }).collect()),
                Training::Local,
            )
        };
        let ok = resolve(&stages(vec![(vec![0, 1], "cpu"), (vec![2], "cpu")]), 3, &cpu(2), None).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].devices, vec![DeviceId::Cpu]);
        let e = resolve(&stages(vec![(vec![0, 2], "cpu")]), 3, &cpu(2), None).unwrap_err().to_string();
        assert!(e.contains("placement[0].layers[1]") && e.contains("expected layer 1"), "{e}");
        let e = resolve(&stages(vec![(vec![0, 1], "cpu")]), 3, &cpu(2), None).unwrap_err().to_string();
        assert!(e.contains("layers 2..=2 are not placed"), "{e}");
        // Too many layers name the first that does not exist, not a range running backwards.
        let e = resolve(&stages(vec![(vec![0, 1], "cpu"), (vec![2, 3, 4], "cpu")]), 3, &cpu(2), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("placement[1].layers[1]: layer 3 does not exist") && e.contains("0..=2"), "{e}");
        let one_gpu = Machine { cuda_devices: 1, cores: 2 };
        let e = resolve(&stages(vec![(vec![0, 1, 2], "cuda:1")]), 3, &one_gpu, None).unwrap_err().to_string();
        assert!(e.contains("placement[0].device") && e.contains("1 CUDA device"), "{e}");
    }

    #[test]
    fn global_modes_run_as_one_stage_spread_over_the_named_devices() {
        let c = config(Placement::PerLayer, Training::Backprop);
        let plans = resolve(&c, 3, &cpu(2), None).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].layers, vec![0, 1, 2]);
        assert!(!wants_measurement(&config(Placement::Auto, Training::Backprop), 3, &cpu(2)));
    }

    fn worker(name: &str) -> Host {
        Host::Worker(name.into())
    }

    fn spec(layers: &[usize], device: &str) -> StageSpec {
        StageSpec { layers: layers.to_vec(), device: device.into() }
    }

    #[test]
    fn a_stage_may_name_a_worker_whose_devices_it_does_not_check_here() {
        let c = config(Placement::Stages(vec![spec(&[0, 1], "cpu"), spec(&[2, 3], "w1/cuda:3")]), Training::Local);
        let plans = resolve(&c, 4, &cpu(4), None).unwrap();
        assert_eq!(plans[0].host, Host::Coordinator);
        assert_eq!((plans[1].host.worker(), plans[1].device()), (Some("w1"), DeviceId::Cuda(3)));
        // This process's CPU stage takes every core of its own.
        assert_eq!(plans[0].threads, 4);
        let mut mine = plans.clone();
        let processes = Processes::from([(Host::Coordinator, (4, "a".into())), (worker("w1"), (8, "b".into()))]);
        share_threads(&mut mine, &c, &processes);
        assert_eq!((mine[0].threads, mine[1].threads), (4, 1), "a CUDA stage keeps one thread");
    }

    #[test]
    fn stages_on_one_machine_share_its_cores_whichever_process_they_are_in() {
        let stages = |devices: &[&str]| {
            let specs = devices.iter().enumerate().map(|(i, d)| spec(&[i], d)).collect();
            resolve(&config(Placement::Stages(specs), Training::Local), devices.len(), &cpu(4), None).unwrap()
        };
        let threads = |plans: &[StagePlan]| plans.iter().map(|s| s.threads).collect::<Vec<_>>();
        // This process and w1 on machine a (4 cores), w2 on machine b (8 cores).
        let processes = Processes::from([
            (Host::Coordinator, (4, "a".into())),
            (worker("w1"), (4, "a".into())),
            (worker("w2"), (8, "b".into())),
        ]);
        let c = config(Placement::Auto, Training::Local);
        let mut plans = stages(&["cpu", "w1/cpu", "w2/cpu", "w2/cuda:0"]);
        share_threads(&mut plans, &c, &processes);
        assert_eq!(threads(&plans), vec![2, 2, 8, 1]);
        // Four CPU stages on a machine of 2 cores: a thread each, never none.
        let mut plans = stages(&["cpu", "w1/cpu", "w1/cpu", "cpu", "w2/cpu"]);
        let mut two_cores = processes.clone();
        two_cores.insert(worker("w1"), (2, "a".into())); // the least of the machine's figures
        share_threads(&mut plans, &c, &two_cores);
        assert_eq!(threads(&plans), vec![1, 1, 1, 1, 8]);
        // `train.cpu_threads` is a machine's budget.
        let mut c6 = c.clone();
        c6.train.cpu_threads = Some(6);
        let mut plans = stages(&["cpu", "w1/cpu", "w2/cpu"]);
        share_threads(&mut plans, &c6, &processes);
        assert_eq!(threads(&plans), vec![3, 3, 6]);
        // A process not known yet keeps what it had.
        let mut plans = stages(&["cpu", "w3/cpu"]);
        share_threads(&mut plans, &c, &processes);
        assert_eq!(threads(&plans), vec![4, 1]);
    }

    #[test]
    fn placements_on_workers_that_cannot_run_are_refused_naming_why() {
        let bad = config(Placement::Stages(vec![spec(&[0, 1], "cpu"), spec(&[2, 3], "../x/cpu")]), Training::Local);
        let e = resolve(&bad, 4, &cpu(2), None).unwrap_err().to_string();
        assert!(e.contains("placement[1].device") && e.contains("not a worker name"), "{e}");
        let mut seq = config(Placement::Stages(vec![spec(&[0, 1], "cpu"), spec(&[2, 3], "w1/cpu")]), Training::Local);
        seq.pipeline.mode = PipelineMode::Sequential;
        let e = resolve(&seq, 4, &cpu(2), None).unwrap_err().to_string();
        assert!(e.contains("pipeline.mode") && e.contains("pipelined"), "{e}");
        let global = config(Placement::Stages(vec![spec(&[0, 1], "cpu"), spec(&[2, 3], "w1/cpu")]), Training::Backprop);
        let e = resolve(&global, 4, &cpu(2), None).unwrap_err().to_string();
        assert!(e.contains("cannot span processes"), "{e}");
    }
}
