//! Which layers run where. A placement is resolved into stages before any layer is built:
//! contiguous runs of layers, each with its typed device(s) and its share of the CPU
//! threads. `auto` splits by each layer's cost, measured here on the device it will use.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use layerwise_nn::network::label_projection;
use layerwise_nn::{HiddenBlock, OutputLayer, Targets, Training};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::{PipelineMode, Placement, RunConfig};
use crate::plan::{DeviceId, Machine, Plan};
use crate::{EngineError, Result};

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
    /// The worker process that runs the stage (a placement's `"NAME/DEVICE"`); none for the
    /// coordinator's own process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl StagePlan {
    pub fn device(&self) -> DeviceId {
        self.devices[0]
    }
}

/// Seconds per training step of each layer alone (the output layer last), as `auto`
/// measures them.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// With every thread a one-stage run would have (all of a GPU).
    pub whole: Vec<f64>,
    /// On one CPU thread, as each stage of a split over every core runs; CPU only.
    pub one_thread: Option<Vec<f64>>,
}

/// Stage sizes for `auto` on a CPU with `threads` threads to give: one stage with all of
/// them, or `k >= threads` stages of one thread each, whichever the costs predict fastest.
/// Stages of one thread share the cores through the OS, so a step of `k` of them takes the
/// larger of the slowest stage and the whole work spread over the cores; between splits
/// that predict the same step, the one with the smaller slowest stage leaves the OS more
/// room to balance (measured: four stages of mlp predsim on 2 cores ran faster than three).
/// A split must predict a tenth less than one stage to be taken: a close call stays one
/// stage, which is never slower than itself. [`Plan::measure_placement`] then measures the
/// split chosen ([`measure_split`]) before taking it.
pub fn cpu_split(whole: &[f64], one_thread: &[f64], threads: usize) -> Vec<usize> {
    let n = whole.len();
    let one_stage = whole.iter().sum::<f64>();
    let spread = one_thread.iter().sum::<f64>() / threads.max(1) as f64;
    let mut best = (0.9 * one_stage, f64::INFINITY, vec![n]);
    for k in threads.max(2)..=n {
        let sizes = balance(one_thread, k);
        let mut start = 0;
        let slowest = sizes
            .iter()
            .map(|&len| {
                start += len;
                one_thread[start - len..start].iter().sum::<f64>()
            })
            .fold(0.0, f64::max);
        let step = slowest.max(spread);
        if step < best.0 || (step == best.0 && slowest < best.1) {
            best = (step, slowest, sizes);
        }
    }
    best.2
}

/// Splits `costs` into `parts` contiguous groups minimising the largest group's sum.
/// Returns the group sizes.
pub fn balance(costs: &[f64], parts: usize) -> Vec<usize> {
    let parts = parts.clamp(1, costs.len().max(1));
    balance_over(&vec![costs.to_vec(); parts])
}

/// Splits the layers into contiguous groups, group `k` on device `k`, minimising the
/// slowest group's step: `costs[k][i]` is layer `i`'s step time on device `k` (devices
/// unlike each other). Every group gets a layer or more; devices past the layer count get
/// none. Returns the group sizes, one per device used.
pub fn balance_over(costs: &[Vec<f64>]) -> Vec<usize> {
    let n = costs.first().map_or(0, Vec::len);
    let parts = costs.len().clamp(1, n.max(1));
    if n == 0 {
        return vec![0];
    }
    let prefix: Vec<Vec<f64>> = costs[..parts]
        .iter()
        .map(|c| {
            std::iter::once(0.0)
                .chain(c.iter().scan(0.0, |s, c| {
                    *s += c;
                    Some(*s)
                }))
                .collect()
        })
        .collect();
    // best[k][i]: minimal slowest group putting the first i layers on the first k devices;
    // cut[k][i]: where device k's group starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; parts + 1];
    let mut cut = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for k in 1..=parts {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[k - 1][i] - prefix[k - 1][j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut sizes = Vec::with_capacity(parts);
    let mut i = n;
    for k in (1..=parts).rev() {
        let j = cut[k][i];
        sizes.push(i - j);
        i = j;
    }
    sizes.reverse();
    sizes
}

/// Whether gradients cross layers (backprop, local+global): then every layer is in one
/// process, run one after the other.
pub fn is_global(training: Training) -> bool {
    matches!(training, Training::Backprop | Training::LocalGlobal)
}

/// How many stages `auto` makes: one per CUDA device, else one per CPU core.
fn auto_parts(num_layers: usize, machine: &Machine) -> usize {
    let devices = machine.visible();
    let parts = if devices == [DeviceId::Cpu] { machine.cores } else { devices.len() };
    parts.min(num_layers).max(1)
}

/// Whether an `auto` placement would split by measured costs.
pub fn wants_measurement(config: &RunConfig, layers: usize, machine: &Machine) -> bool {
    config.pipeline.placement == Placement::Named("auto".into())
        && !is_global(config.model.training)
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
    let mut groups = groups(&config.pipeline.placement, num_layers, machine, costs, threads)?;
    let remote = groups.iter().any(|g| g.host.is_some());
    if remote && config.pipeline.mode == PipelineMode::Sequential {
        return Err(EngineError::Config(
            "pipeline.mode: \"sequential\" runs every stage in one process; a placement on workers needs \"pipelined\""
                .into(),
        ));
    }
    if is_global(config.model.training) && groups.len() > 1 {
        // Global gradients cross every layer: one worker holds them all, each layer on the
        // device its stage named, run one after the other.
        if groups.iter().any(|g| g.host != groups[0].host) {
            return Err(EngineError::Config(format!(
                "pipeline.placement: model.training {:?} sends gradients through every layer, so its layers cannot span processes",
                config.model.training
            )));
        }
        let layers = (0..num_layers).collect();
        let devices = groups.iter().flat_map(|g| g.devices.clone()).collect();
        groups = vec![Group { layers, devices, host: groups[0].host.clone() }];
    }
    let mut stages: Vec<StagePlan> = groups
        .into_iter()
        .enumerate()
        .map(|(index, g)| {
            let cuda = g.devices[0].is_cuda();
            StagePlan {
                index,
                layers: g.layers,
                threads: 1,
                check_finite_every: config.train.check_finite_every.unwrap_or(if cuda { 50 } else { 1 }),
                devices: g.devices,
                host: g.host,
            }
        })
        .collect();
    share_threads(&mut stages, config, &this_process(machine.cores));
    Ok(stages)
}

/// A stage for each of `devices` (on its host, `None` for this process), stage i with
/// layer i and one thread: a sketch of a placement, before the layers are split.
pub fn one_layer_each(devices: &[(Option<&str>, DeviceId)]) -> Vec<StagePlan> {
    devices
        .iter()
        .enumerate()
        .map(|(index, (host, device))| StagePlan {
            index,
            layers: vec![index],
            devices: vec![*device],
            threads: 1,
            check_finite_every: 1,
            host: host.map(str::to_string),
        })
        .collect()
}

/// A question for `auto` over workers: worker `name`'s step time of each layer on
/// `device` with `threads` intra-op threads.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    pub name: String,
    pub device: DeviceId,
    pub threads: usize,
}

/// The processes of a run that this one knows of, by host key ("" for this one): each
/// one's cores and the machine it runs on ([`crate::plan::machine_id`]).
pub type Processes = BTreeMap<String, (usize, String)>;

/// This process alone: where a plan's stages start, before any worker has registered.
pub fn this_process(cores: usize) -> Processes {
    BTreeMap::from([(String::new(), (cores, crate::plan::machine_id()))])
}

/// Gives each CPU stage of `processes` its intra-op threads: a machine's budget
/// (`train.cpu_threads`, else its cores) shared among the CPU stages that run on it at
/// once, whichever of its processes they are in; all of it to the one thread of a
/// sequential run. A CUDA stage gets one. Stages of processes not known yet are left as
/// they are.
pub fn share_threads(stages: &mut [StagePlan], config: &RunConfig, processes: &Processes) {
    let machines: BTreeSet<&String> = processes.values().map(|(_, m)| m).collect();
    for machine in machines {
        let hosts: Vec<&String> = processes.iter().filter(|(_, (_, m))| m == machine).map(|(h, _)| h).collect();
        let cores = processes.values().filter(|(_, m)| m == machine).map(|(c, _)| *c).min().unwrap_or(1);
        let budget = config.train.thread_budget(cores);
        let here = |s: &StagePlan| hosts.iter().any(|h| *h == crate::net::host_key(&s.host));
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

struct Group {
    layers: Vec<usize>,
    devices: Vec<DeviceId>,
    host: Option<String>,
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
        let mut next = 0;
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, size)| {
                let layers: Vec<usize> = (next..next + size).collect();
                next += size;
                let d = visible[i % visible.len()];
                Group { devices: vec![d; layers.len()], layers, host: None }
            })
            .collect()
    };
    Ok(match placement {
        Placement::Named(name) => match name.as_str() {
            "single" => vec![Group { layers: (0..num_layers).collect(), devices: vec![visible[0]; num_layers], host: None }],
            "per_layer" => contiguous(vec![1; num_layers]),
            "auto" => match costs {
                Some(Costs { whole, one_thread: Some(one) }) => contiguous(cpu_split(whole, one, cpu_threads)),
                Some(Costs { whole, one_thread: None }) => contiguous(balance(whole, auto_parts(num_layers, machine))),
                None => contiguous(balance(&vec![1.0; num_layers], auto_parts(num_layers, machine))),
            },
            other => {
                return Err(EngineError::Config(format!(
                    "pipeline.placement: unknown placement {:?}, expected \"auto\", \"per_layer\", \"single\" or a list of stages",
                    crate::plan::quote(other)
                )))
            }
        },
        Placement::Stages(specs) => explicit(specs, num_layers, machine)?,
    })
}

fn explicit(specs: &[crate::config::StageSpec], num_layers: usize, machine: &Machine) -> Result<Vec<Group>> {
    if specs.is_empty() {
        return Err(EngineError::Config("pipeline.placement: expected at least one stage".into()));
    }
    let mut expected = 0;
    let mut groups = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (host, device) = match spec.device.split_once('/') {
            Some((host, device)) => (Some(host), device),
            None => (None, spec.device.as_str()),
        };
        let at = |e: String| EngineError::Config(format!("pipeline.placement[{i}].device: {e}"));
        let host = host.map(worker_name).transpose().map_err(at)?;
        // A worker's devices are checked against what it offers when the job starts.
        let device =
            DeviceId::parse(device).and_then(|d| if host.is_some() { Ok(d) } else { machine.check(d) }).map_err(at)?;
        if spec.layers.is_empty() {
            return Err(EngineError::Config(format!("pipeline.placement[{i}].layers: expected at least one layer")));
        }
        for (j, &l) in spec.layers.iter().enumerate() {
            if l != expected {
                return Err(EngineError::Config(format!(
                    "pipeline.placement[{i}].layers[{j}]: expected layer {expected} (stages hold contiguous layers in order, 0..={}), got {l}",
                    num_layers - 1
                )));
            }
            expected += 1;
        }
        groups.push(Group { layers: spec.layers.clone(), devices: vec![device; spec.layers.len()], host });
    }
    if expected != num_layers {
        return Err(EngineError::Config(format!(
            "pipeline.placement: layers {expected}..={} are not placed (the model has {} hidden layers and the output layer {})",
            num_layers - 1,
            num_layers - 1,
            num_layers - 1
        )));
    }
    Ok(groups)
}

/// A worker's name as a placement or the command line gives it: A-Z a-z 0-9 . _ - only.
pub fn worker_name(name: &str) -> std::result::Result<String, String> {
    let ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{:?} is not a worker name: expected 1 to 64 of A-Z a-z 0-9 . _ -, the first a letter or digit",
            crate::plan::quote(name)
        ))
    }
}

/// What `auto` splits by: each layer's step time with the threads of a one-stage run and,
/// on a CPU, with one thread.
pub fn measure_costs(plan: &Plan) -> Result<Costs> {
    let threads = plan.config.train.thread_budget(plan.machine.cores);
    let device = plan.machine.visible()[0];
    let whole = measure(plan, device, threads)?;
    let one_thread = match device {
        DeviceId::Cpu if threads > 1 => Some(measure(plan, device, 1)?),
        _ => None,
    };
    Ok(Costs { whole, one_thread })
}

/// Seconds per training step of each layer (the output layer last), measured on `device`
/// with `threads` intra-op threads: each layer is built alone, timed over three steps after one
/// warm-up step (synchronised on a GPU), and dropped before the next is built, so a net
/// that only fits when split still places. A layer that cannot be built or run there is an
/// error, not a guess. At the run's own batch size: how well threads scale depends on it
/// (vgg8b predsim at 64 images scaled 1.6x on two threads, at 128 about 2x, so timing at
/// 64 predicted a 1.28x gain for a split that ran at 0.94x of one stage).
pub fn measure(plan: &Plan, device: DeviceId, threads: usize) -> Result<Vec<f64>> {
    plan.check_each_layer_fits(device)?;
    let d = device.tch();
    let (model, optim, arch) = (&plan.config.model, &plan.config.optim, &plan.arch);
    let seed = plan.config.train.seed;
    let b = plan.config.train.batch_size as i64;
    let sync = || {
        if let DeviceId::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let time = |mut step: Box<dyn FnMut() + '_>| -> f64 {
        step();
        sync();
        (0..3)
            .map(|_| {
                let t = Instant::now();
                step();
                sync();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let failed = |layer: usize, what: String| {
        EngineError::Other(format!("measuring layer {layer} on {device} for the auto placement: {what}"))
    };
    let measure_all = || -> Result<Vec<f64>> {
        let labels = Tensor::zeros([b], (Kind::Int64, tch::Device::Cpu));
        let projection = label_projection(model, arch, seed);
        let targets = Targets::new(&labels, arch.num_classes, projection.as_ref()).to_device(d);
        let mut x = Tensor::randn([b, arch.input.channels, arch.input.size, arch.input.size], (Kind::Float, d));
        let mut costs = Vec::with_capacity(plan.num_layers());
        for (i, spec) in arch.hidden.iter().enumerate() {
            let mut block = HiddenBlock::new(i, spec, arch.num_classes, model, optim, seed, d)
                .map_err(|e| failed(i, e.to_string()))?;
            let mut out = Ok(x.shallow_clone());
            costs.push(time(Box::new(|| out = block.train_local(&x, &targets).map(|s| s.output))));
            x = out.map_err(|e| failed(i, e.to_string()))?;
        }
        let i = arch.hidden.len();
        let mut output = OutputLayer::new(i, arch.output_in, arch.num_classes, model, optim, seed, d);
        let labels = targets.labels.shallow_clone();
        let mut out = Ok(());
        costs.push(time(Box::new(|| out = output.train_local(&x, &labels).map(drop))));
        out.map_err(|e| failed(i, e.to_string()))?;
        Ok(costs)
    };
    // In a thread of its own: the OpenMP team it needs ends with it instead of staying with
    // the coordinator's thread, where idle teams would make the stages' teams sleep instead
    // of spin (see `crate::set_thread_count` and `run::run_inner`).
    std::thread::scope(|scope| {
        let measuring = std::thread::Builder::new().name("placement".into()).spawn_scoped(scope, || {
            crate::set_thread_count(threads);
            catch_unwind(AssertUnwindSafe(measure_all))
        });
        match measuring.map(|t| t.join()) {
            Ok(Ok(Ok(measured))) => measured,
            Ok(Ok(Err(panic)) | Err(panic)) => Err(failed(0, crate::stage::panic_message(&*panic))),
            Err(e) => Err(failed(0, format!("cannot start a thread: {e}"))),
        }
    })
}

/// A barrier that can be opened from outside (`std::sync::Barrier` cannot): threads that
/// arrive wait for all `n`, or for `open`.
struct Gate {
    state: std::sync::Mutex<(usize, bool)>,
    cv: std::sync::Condvar,
    n: usize,
}

impl Gate {
    fn new(n: usize) -> Self {
        Self { state: std::sync::Mutex::new((0, false)), cv: std::sync::Condvar::new(), n }
    }

    fn arrive(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        self.cv.notify_all();
        while g.0 < self.n && !g.1 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cv.notify_all();
    }
}

/// Seconds per step of a CPU split into contiguous stages of `sizes` layers, run as a
/// pipeline runs them: each stage on a thread of its own with `threads` intra-op threads, its
/// output handed to the next over a channel of `pipeline.channel_capacity`, the first
/// stage fed one random batch over and over until the last has its figure. Timed at the
/// last stage over at least eight steps and `window`, after three that fill the pipeline
/// (`auto` gives a second: that evens out the noise of a shared machine), so every stage is busy
/// throughout (a fixed number of steps would let the first stages finish early and leave
/// the cores to the last). `cpu_split` only models how one-thread stages share
/// the cores; `auto` measures the split it chose with this before taking it.
pub fn measure_split(plan: &Plan, sizes: &[usize], threads: usize, window: std::time::Duration) -> Result<f64> {
    const WARM: usize = 3;
    const STEPS: usize = 8;
    let (model, optim, arch) = (&plan.config.model, &plan.config.optim, &plan.arch);
    let (seed, b, d) = (plan.config.train.seed, plan.config.train.batch_size as i64, tch::Device::Cpu);
    let failed =
        |what: String| EngineError::Other(format!("measuring the split {sizes:?} for the auto placement: {what}"));
    if sizes.is_empty() || sizes.contains(&0) || sizes.iter().sum::<usize>() != plan.num_layers() {
        return Err(failed(format!("expected stages of one layer or more covering the {} layers", plan.num_layers())));
    }
    let mut stages = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &n in sizes {
        stages.push(start..start + n);
        start += n;
    }
    let last = stages.len() - 1;
    let capacity = plan.config.pipeline.channel_capacity;
    let (mut senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..last).map(|_| crossbeam_channel::bounded::<Tensor>(capacity)).map(|(s, r)| (Some(s), Some(r))).unzip();
    let gate = Gate::new(stages.len());
    let done = std::sync::atomic::AtomicBool::new(false);
    // One stage: its layers built, then (every thread at the gate once, whether or not its
    // setup failed, so none waits for good) its steps. A stage that fails drops its ends of
    // the channels, which stops its neighbours too: they end with `None`, not an error.
    let run_stage = |k: usize,
                     input: Option<crossbeam_channel::Receiver<Tensor>>,
                     output: Option<crossbeam_channel::Sender<Tensor>>|
     -> std::result::Result<f64, Option<EngineError>> {
        crate::set_thread_count(threads);
        let layers = stages[k].clone();
        let labels = Tensor::zeros([b], (Kind::Int64, d));
        let projection = label_projection(model, arch, seed);
        let targets = Targets::new(&labels, arch.num_classes, projection.as_ref());
        let built = catch_unwind(AssertUnwindSafe(|| -> Result<_> {
            let mut blocks = Vec::new();
            let mut out = None;
            for i in layers.clone() {
                match arch.hidden.get(i) {
                    Some(spec) => blocks.push(HiddenBlock::new(i, spec, arch.num_classes, model, optim, seed, d)?),
                    None => out = Some(OutputLayer::new(i, arch.output_in, arch.num_classes, model, optim, seed, d)),
                }
            }
            Ok((blocks, out))
        }));
        gate.arrive();
        let (mut blocks, mut out) = match built {
            Ok(built) => built.map_err(Some)?,
            Err(panic) => return Err(Some(failed(crate::stage::panic_message(&*panic)))),
        };
        let images = Tensor::randn([b, arch.input.channels, arch.input.size, arch.input.size], (Kind::Float, d));
        let mut step = |x: Tensor| -> std::result::Result<Tensor, Option<EngineError>> {
            let mut x = x;
            for block in blocks.iter_mut() {
                x = block.train_local(&x, &targets).map_err(|e| Some(e.into()))?.output;
            }
            if let Some(o) = out.as_mut() {
                let _ = o.train_local(&x, &labels).map_err(|e| Some(e.into()))?;
            }
            Ok(x)
        };
        let Some(tx) = &output else {
            // The last stage is timed, while every stage before it is busy.
            let (mut since, mut warm) = (Instant::now(), 0);
            let mut timed = 0;
            while timed < STEPS || since.elapsed() < window {
                let x = match &input {
                    Some(rx) => rx.recv().map_err(|_| None)?,
                    None => images.shallow_clone(),
                };
                let _ = step(x)?;
                if warm < WARM {
                    warm += 1;
                    since = Instant::now();
                } else {
                    timed += 1;
                }
            }
            done.store(true, Ordering::Relaxed);
            return Ok(since.elapsed().as_secs_f64() / timed as f64);
        };
        match &input {
            // The first stage feeds until the last has its figure (or a stage stopped).
            None => {
                while !done.load(Ordering::Relaxed) {
                    tx.send(step(images.shallow_clone())?).map_err(|_| None)?;
                }
            }
            // A stage between: until its input or its output closes.
            Some(rx) => {
                while let Ok(x) = rx.recv() {
                    tx.send(step(x)?).map_err(|_| None)?;
                }
            }
        }
        Ok(0.0)
    };
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..stages.len())
            .map(|k| {
                let input = if k > 0 { receivers[k - 1].take() } else { None };
                let output = if k < last { senders[k].take() } else { None };
                let run = &run_stage;
                std::thread::Builder::new()
                    .name("placement".into())
                    .spawn_scoped(scope, move || catch_unwind(AssertUnwindSafe(|| run(k, input, output))))
            })
            .collect();
        if threads.iter().any(|t| t.is_err()) {
            gate.open(); // the threads that started do not wait for the one that did not
        }
        let mut timed = Err(None);
        let mut cause = None;
        for t in threads {
            let r = match t.map_err(|e| failed(format!("cannot start a thread: {e}")))?.join() {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) | Err(panic) => Err(Some(failed(crate::stage::panic_message(&*panic)))),
            };
            if let Err(Some(e)) = &r {
                cause.get_or_insert(e.to_string());
            }
            timed = r; // the last stage's is kept
        }
        match (cause, timed) {
            (Some(e), _) => Err(failed(e)),
            (None, Ok(secs)) => Ok(secs),
            (None, Err(_)) => Err(failed("the stages stopped without an error".into())),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StageSpec;

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
    fn balancing_minimises_the_slowest_stage() {
        assert_eq!(balance(&[1.0, 1.0, 1.0, 1.0], 2), vec![2, 2]);
        assert_eq!(balance(&[8.0, 1.0, 1.0, 1.0, 1.0], 2), vec![1, 4]);
        assert_eq!(balance(&[1.0, 2.0, 3.0], 5), vec![1, 1, 1]);
    }

    #[test]
    fn balancing_over_unlike_devices_gives_the_slower_device_fewer_layers() {
        // Four like layers; the second device takes three times as long for each.
        let fast = vec![1.0; 4];
        let slow = vec![3.0; 4];
        assert_eq!(balance_over(&[fast.clone(), slow.clone()]), vec![3, 1]);
        assert_eq!(balance_over(&[slow.clone(), fast.clone()]), vec![1, 3]);
        // Alike, it is `balance`; more devices than layers leave the last out.
        assert_eq!(balance_over(&[fast.clone(), fast.clone()]), vec![2, 2]);
        assert_eq!(balance_over(&vec![vec![1.0, 2.0]; 3]), vec![1, 1]);
        // Every device used gets a layer, however slow.
        assert_eq!(balance_over(&[fast, vec![1e9; 4]]), vec![3, 1]);
    }

    #[test]
    fn auto_on_cpu_leaves_one_stage_only_for_a_predicted_gain() {
        // Threads that barely help one stage (one thread 1.6x slower than two): layers of
        // one thread each spread over both cores beat one stage of two threads; three
        // stages and four predict the same step, and four have the smaller slowest stage.
        let whole = [1.0, 1.0, 1.0, 0.1];
        let poor = [1.6, 1.6, 1.6, 0.16];
        assert_eq!(cpu_split(&whole, &poor, 2), vec![1, 1, 1, 1]);
        // Threads that scale perfectly: no split can be faster than one stage.
        let perfect = whole.map(|c| 2.0 * c);
        assert_eq!(cpu_split(&whole, &perfect, 2), vec![4]);
        // A gain under a tenth is not taken.
        let close = [1.85, 1.85, 1.85, 0.2];
        assert_eq!(cpu_split(&whole, &close, 2), vec![4]);
        // One dominant layer: its stage bounds every split.
        assert_eq!(cpu_split(&[3.0, 0.1, 0.1], &[5.0, 0.2, 0.2], 2), vec![3]);
        let c = config(Placement::Named("auto".into()), Training::Local);
        let costs = Costs { whole: whole.to_vec(), one_thread: Some(poor.to_vec()) };
        assert_eq!(layers(&resolve(&c, 4, &cpu(2), Some(&costs)).unwrap()), vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn auto_on_cpu_splits_by_measured_cost_into_one_stage_per_core() {
        let c = config(Placement::Named("auto".into()), Training::Local);
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
        let mut c = config(Placement::Named("per_layer".into()), Training::Local);
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
        assert!(e.contains("not placed"), "{e}");
        let one_gpu = Machine { cuda_devices: 1, cores: 2 };
        let e = resolve(&stages(vec![(vec![0, 1, 2], "cuda:1")]), 3, &one_gpu, None).unwrap_err().to_string();
        assert!(e.contains("placement[0].device") && e.contains("1 CUDA device"), "{e}");
    }

    #[test]
    fn global_modes_run_as_one_stage_spread_over_the_named_devices() {
        let c = config(Placement::Named("per_layer".into()), Training::Backprop);
        let plans = resolve(&c, 3, &cpu(2), None).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].layers, vec![0, 1, 2]);
        assert!(!wants_measurement(&config(Placement::Named("auto".into()), Training::Backprop), 3, &cpu(2)));
    }

    fn spec(layers: &[usize], device: &str) -> StageSpec {
        StageSpec { layers: layers.to_vec(), device: device.into() }
    }

    #[test]
    fn a_stage_may_name_a_worker_whose_devices_it_does_not_check_here() {
        let c = config(Placement::Stages(vec![spec(&[0, 1], "cpu"), spec(&[2, 3], "w1/cuda:3")]), Training::Local);
        let plans = resolve(&c, 4, &cpu(4), None).unwrap();
        assert_eq!(plans[0].host, None);
        assert_eq!((plans[1].host.as_deref(), plans[1].device()), (Some("w1"), DeviceId::Cuda(3)));
        // This process's CPU stage takes every core of its own.
        assert_eq!(plans[0].threads, 4);
        let mut mine = plans.clone();
        let processes = Processes::from([("".into(), (4, "a".into())), ("w1".into(), (8, "b".into()))]);
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
            ("".into(), (4, "a".into())),
            ("w1".into(), (4, "a".into())),
            ("w2".into(), (8, "b".into())),
        ]);
        let c = config(Placement::Named("auto".into()), Training::Local);
        let mut plans = stages(&["cpu", "w1/cpu", "w2/cpu", "w2/cuda:0"]);
        share_threads(&mut plans, &c, &processes);
        assert_eq!(threads(&plans), vec![2, 2, 8, 1]);
        // Four CPU stages on a machine of 2 cores: a thread each, never none.
        let mut plans = stages(&["cpu", "w1/cpu", "w1/cpu", "cpu", "w2/cpu"]);
        let mut two_cores = processes.clone();
        two_cores.insert("w1".into(), (2, "a".into())); // the least of the machine's figures
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
