//! Timed trials for `auto`: each layer's training step measured on the device it will run
//! on ([`layer_times`], [`costs`]), and a CPU split measured as a pipeline runs it
//! ([`split_step_time`]). Runtime work: the plan's balancing takes the figures as they are.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use layerwise_nn::network::label_projection;
use layerwise_nn::Targets;
use layerwise_plan::balance::{ranges, Costs};
use layerwise_plan::{DeviceId, Plan};
use tch::{Device, Kind, Tensor};

use crate::layers::Layers;
use crate::thread::{panic_message, set_thread_count};
use crate::{Error, Result};

/// What `auto` splits by: each layer's step time with the threads of a one-stage run and,
/// on a CPU, with one thread.
pub fn costs(plan: &Plan) -> Result<Costs> {
    let threads = plan.config.train.thread_budget(plan.machine.cores);
    let device = plan.machine.visible()[0];
    let whole = layer_times(plan, device, threads)?;
    let one_thread = match device {
        DeviceId::Cpu if threads > 1 => Some(layer_times(plan, device, 1)?),
        _ => None,
    };
    Ok(Costs { whole, one_thread })
}

/// Seconds per training step of each layer (the output layer last), measured on `device`
/// with `threads` intra-op threads: each layer is built alone, timed over three steps after
/// one warm-up step (synchronised on a GPU), and dropped before the next is built, so a net
/// that only fits when split still places. A layer that cannot be built or run there is
/// an error, not a guess. At the run's own batch size: how well threads scale depends on it
/// (vgg8b predsim at 64 images scaled 1.6x on two threads, at 128 about 2x, so timing at
/// 64 predicted a 1.28x gain for a split that ran at 0.94x of one stage).
pub fn layer_times(plan: &Plan, device: DeviceId, threads: usize) -> Result<Vec<f64>> {
    plan.check_each_layer_fits(device)?;
    let failed = |layer: usize, what: String| {
        Error::Other(format!("measuring layer {layer} on {device} for the auto placement: {what}"))
    };
    // In a thread of its own: the OpenMP team it needs ends with it instead of staying with
    // the coordinator's thread, where idle teams would make the stages' teams sleep instead
    // of spin (see `set_thread_count`).
    std::thread::scope(|scope| {
        let measuring = std::thread::Builder::new().name("calibrate".into()).spawn_scoped(scope, || {
            set_thread_count(threads);
            catch_unwind(AssertUnwindSafe(|| time_each_layer(plan, device)))
        });
        match measuring.map(|t| t.join()) {
            Ok(Ok(Ok(times))) => times.map_err(|(layer, e)| failed(layer, e)),
            Ok(Ok(Err(panic)) | Err(panic)) => Err(failed(0, panic_message(&*panic))),
            Err(e) => Err(failed(0, format!("cannot start a thread: {e}"))),
        }
    })
}

/// The best of three timed steps of `step`, after one to warm up.
fn best_of_three(device: DeviceId, mut step: impl FnMut()) -> f64 {
    let sync = || {
        if let DeviceId::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
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
}

/// [`layer_times`] on the calling thread; an error names its layer.
fn time_each_layer(plan: &Plan, device: DeviceId) -> std::result::Result<Vec<f64>, (usize, String)> {
    let d = device.tch();
    let (b, input) = (plan.config.train.batch_size as i64, plan.arch.input);
    let targets = trial_targets(plan, d);
    let mut x = Tensor::randn([b, input.channels, input.size, input.size], (Kind::Float, d));
    let mut times = Vec::with_capacity(plan.num_layers());
    for i in 0..plan.num_layers() {
        let mut layers = Layers::default();
        layers.add(plan, i, d, None).map_err(|e| (i, e.to_string()))?;
        let mut out = Ok(None);
        times.push(match (layers.blocks.first_mut(), layers.output.as_mut()) {
            (Some(block), _) => best_of_three(device, || out = block.train_local(&x, &targets).map(|s| Some(s.output))),
            (None, Some(o)) => best_of_three(device, || out = o.train_local(&x, &targets.labels).map(|_| None)),
            (None, None) => unreachable!("Layers::add adds a layer"),
        });
        if let Some(next) = out.map_err(|e| (i, e.to_string()))? {
            x = next;
        }
    }
    Ok(times)
}

/// Targets of a trial batch (all of class 0) on `device`.
fn trial_targets(plan: &Plan, device: Device) -> Targets {
    let labels = Tensor::zeros([plan.config.train.batch_size as i64], (Kind::Int64, Device::Cpu));
    let projection = label_projection(&plan.config.model, &plan.arch, plan.config.train.seed);
    Targets::new(&labels, plan.arch.num_classes, projection.as_ref()).to_device(device)
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

/// Steps that fill the pipeline before the timing starts, and the fewest timed.
const WARM: usize = 3;
const STEPS: usize = 8;

/// Seconds per step of a CPU split into contiguous stages of `sizes` layers, run as a
/// pipeline runs them: each stage on a thread of its own with `threads` intra-op threads,
/// its output handed to the next over a channel of `pipeline.channel_capacity`, the first
/// stage fed one random batch over and over until the last has its figure. Timed at the
/// last stage over at least eight steps and `window`, after three that fill the pipeline
/// (`auto` gives a second: that evens out the noise of a shared machine), so every stage
/// is busy throughout (a fixed number of steps would let the first stages finish early and
/// leave the cores to the last). `cpu_split` only models how one-thread stages share the
/// cores; `auto` measures the split it chose with this before taking it.
pub fn split_step_time(plan: &Plan, sizes: &[usize], threads: usize, window: Duration) -> Result<f64> {
    let failed = |what: String| Error::Other(format!("measuring the split {sizes:?} for the auto placement: {what}"));
    if sizes.is_empty() || sizes.contains(&0) || sizes.iter().sum::<usize>() != plan.num_layers() {
        return Err(failed(format!("expected stages of one layer or more covering the {} layers", plan.num_layers())));
    }
    let stages = ranges(sizes);
    let trial = Trial { plan, threads, window, gate: Gate::new(stages.len()), done: AtomicBool::new(false) };
    let capacity = plan.config.pipeline.channel_capacity;
    let (mut senders, mut receivers): (Vec<_>, Vec<_>) = (1..stages.len())
        .map(|_| crossbeam_channel::bounded::<Tensor>(capacity))
        .map(|(s, r)| (Some(s), Some(r)))
        .unzip();
    std::thread::scope(|scope| {
        let last = stages.len() - 1;
        let threads: Vec<_> = stages
            .iter()
            .enumerate()
            .map(|(k, layers)| {
                let input = if k > 0 { receivers[k - 1].take() } else { None };
                let output = if k < last { senders[k].take() } else { None };
                let (trial, layers) = (&trial, layers.clone());
                std::thread::Builder::new().name("calibrate".into()).spawn_scoped(scope, move || {
                    catch_unwind(AssertUnwindSafe(|| trial.run_stage(layers, input, output)))
                })
            })
            .collect();
        if threads.iter().any(|t| t.is_err()) {
            trial.gate.open(); // the threads that started do not wait for the one that did not
        }
        let mut timed = Err(None);
        let mut cause = None;
        for t in threads {
            let r = match t.map_err(|e| failed(format!("cannot start a thread: {e}")))?.join() {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) | Err(panic) => Err(Some(panic_message(&*panic))),
            };
            if let Err(Some(e)) = &r {
                cause.get_or_insert(e.clone());
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

/// What the stages of a split trial share.
struct Trial<'a> {
    plan: &'a Plan,
    threads: usize,
    window: Duration,
    /// Every stage waits here until all have built their layers (or failed to).
    gate: Gate,
    /// Set by the last stage once it has its figure: the first stops feeding.
    done: AtomicBool,
}

/// A trial stage's end: its figure (the last stage's seconds a step), or why it stopped
/// (None: a neighbour stopped, which is that neighbour's error, not this one's).
type StageEnd = std::result::Result<f64, Option<String>>;

impl Trial<'_> {
    /// One stage: its layers built, then (every thread at the gate once, whether or not its
    /// setup failed, so none waits for good) its steps. A stage that fails drops its ends
    /// of the channels, which stops its neighbours too.
    fn run_stage(
        &self,
        layers: Range<usize>,
        input: Option<Receiver<Tensor>>,
        output: Option<Sender<Tensor>>,
    ) -> StageEnd {
        set_thread_count(self.threads);
        let (plan, d) = (self.plan, Device::Cpu);
        let targets = trial_targets(plan, d);
        let built = catch_unwind(AssertUnwindSafe(|| Layers::build(plan, layers.map(|i| (i, d)), |_| Ok(None))));
        self.gate.arrive();
        let mut layers = match built {
            Ok(built) => built.map_err(|(i, e)| Some(format!("layer {i}: {e}")))?,
            Err(panic) => return Err(Some(panic_message(&*panic))),
        };
        let (b, input_shape) = (plan.config.train.batch_size as i64, plan.arch.input);
        let images = Tensor::randn([b, input_shape.channels, input_shape.size, input_shape.size], (Kind::Float, d));
        let mut step = |mut x: Tensor| -> std::result::Result<Tensor, Option<String>> {
            for block in layers.blocks.iter_mut() {
                x = block.train_local(&x, &targets).map_err(|e| Some(e.to_string()))?.output;
            }
            if let Some(o) = layers.output.as_mut() {
                let _ = o.train_local(&x, &targets.labels).map_err(|e| Some(e.to_string()))?;
            }
            Ok(x)
        };
        let next = |input: &Option<Receiver<Tensor>>| match input {
            Some(rx) => rx.recv().map_err(|_| None),
            None => Ok(images.shallow_clone()),
        };
        let Some(tx) = &output else {
            return self.time_last_stage(|| step(next(&input)?).map(drop));
        };
        // The first stage feeds until the last has its figure; one between, until its input
        // or its output closes.
        while input.is_some() || !self.done.load(Ordering::Relaxed) {
            tx.send(step(next(&input)?)?).map_err(|_| None)?;
        }
        Ok(0.0)
    }

    /// The last stage's seconds a step, timed while every stage before it is busy.
    fn time_last_stage(&self, mut step: impl FnMut() -> std::result::Result<(), Option<String>>) -> StageEnd {
        let (mut since, mut warm, mut timed) = (Instant::now(), 0, 0);
        while timed < STEPS || since.elapsed() < self.window {
            step()?;
            if warm < WARM {
                warm += 1;
                since = Instant::now();
            } else {
                timed += 1;
            }
        }
        self.done.store(true, Ordering::Relaxed);
        Ok(since.elapsed().as_secs_f64() / timed as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_plan::{Machine, RunConfig};

    fn plan(layers: usize) -> Plan {
        let mut c = RunConfig::default();
        c.model.num_layers = layers;
        c.model.num_hidden = 64;
        c.train.batch_size = 16;
        Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap()
    }

    #[test]
    fn each_layer_is_timed_on_its_device_the_output_layer_last() {
        let plan = plan(2);
        let times = layer_times(&plan, DeviceId::Cpu, 1).unwrap();
        assert_eq!(times.len(), 3);
        assert!(times.iter().all(|t| *t > 0.0 && t.is_finite()), "{times:?}");
        let costs = costs(&plan).unwrap();
        assert_eq!((costs.whole.len(), costs.one_thread.map(|t| t.len())), (3, Some(3)), "two cores: both timings");
    }

    #[test]
    fn a_layer_too_big_for_the_device_is_refused_before_it_is_built() {
        let mut c = RunConfig::default();
        c.model.num_hidden = layerwise_plan::checks::limits::NUM_HIDDEN;
        let cpu = Machine { cuda_devices: 0, cores: 2 };
        let plan = Plan::build_unplaced(&c, cpu, layerwise_plan::DataShape::of_config(&c.data).unwrap()).unwrap();
        let e = layer_times(&plan, DeviceId::Cpu, 1).unwrap_err().to_string();
        assert!(e.contains("layer 0 alone needs about"), "{e}");
    }

    #[test]
    fn a_split_is_timed_as_a_pipeline_of_its_stages() {
        let plan = plan(2);
        // Three stages of one thread, one stage of two, and two stages, each really run.
        for (sizes, threads) in [(vec![1, 1, 1], 1), (vec![3], 2), (vec![2, 1], 1)] {
            let secs = split_step_time(&plan, &sizes, threads, Duration::ZERO).unwrap();
            assert!(secs > 0.0 && secs.is_finite(), "{sizes:?}: {secs}");
        }
        for bad in [vec![], vec![1, 0, 2], vec![1, 1]] {
            let e = split_step_time(&plan, &bad, 1, Duration::ZERO).unwrap_err().to_string();
            assert!(e.contains("covering the 3 layers"), "{bad:?}: {e}");
        }
    }
}
