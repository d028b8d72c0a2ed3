//! The coordinator: builds the stages from a validated plan, feeds stage 0 from the loader,
//! applies the learning-rate schedule through the stream, runs evaluation after each
//! epoch's last training batch, gathers the stages' reports into per-epoch metrics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver};
use layerwise_data::batches::{BatchSource, Sampler, Transform};
use layerwise_data::dataset;
use layerwise_nn::arch::InputShape;
use layerwise_nn::network::{build_layers, label_projection, train_local_blocks};
use layerwise_nn::{Architecture, Named, Targets};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CoordinatorState, Manifest};
use crate::config::{PipelineMode, RunConfig};
use crate::link::{in_process, LinkSender};
use crate::message::{EvalSet, Message, Report, StageFailure};
use crate::metrics::{EpochMetrics, LayerMetrics, StageMetrics};
use crate::placement::{resolve, StagePlan};
use crate::rundir::{RunDir, RunState};
use crate::stage::{Fault, Stage};
use crate::{EngineError, Result};

/// Called with (epoch, step in epoch, steps in epoch).
pub type StepHook = Box<dyn FnMut(usize, usize, usize)>;

/// Hooks for callers and tests.
#[derive(Default)]
pub struct RunOptions {
    /// Resume from the newest verified checkpoint in the run directory, if there is one.
    pub resume: bool,
    /// Set from outside (a signal, a cancel request): take a checkpoint at the next step
    /// boundary and stop.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop (with a checkpoint) after this step, as `stop` would (tests, tools).
    pub stop_after_step: Option<u64>,
    /// Inject a fault into a layer at a step (failure-handling tests).
    pub fault: Option<Fault>,
    /// Called after every training batch is handed to stage 0: (epoch, step in epoch, steps in epoch).
    pub on_step: Option<StepHook>,
}

/// What a finished (or stopped) run gives back.
#[derive(Debug)]
pub struct RunSummary {
    /// Metrics of every completed epoch, those before a resume included.
    pub epochs: Vec<EpochMetrics>,
    /// The final training state of every layer (`layers.{i}.*`, `output.*`), on the CPU.
    pub state: Vec<Named>,
    pub plan: Vec<StagePlan>,
    pub parameter_count: i64,
    /// Steps taken in all.
    pub step: u64,
    /// Stopped early, with a checkpoint, by `stop` or `stop_after_step`.
    pub stopped: bool,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<PathBuf>,
}

/// Runs one training job in `run_dir` and records its status there.
pub fn run(config: &RunConfig, run_dir: &Path, options: RunOptions) -> Result<RunSummary> {
    // Refused before anything is written, so that the earlier run's files stay as they are.
    let checkpoints_root = run_dir.join("checkpoints");
    if !options.resume && !checkpoint::list(&checkpoints_root).is_empty() {
        return Err(EngineError::Config(format!(
            "{} holds checkpoints of an earlier run: resume it (--resume) or use another run directory",
            checkpoints_root.display()
        )));
    }
    let dir = RunDir::create(run_dir)?;
    dir.set_status(RunState::Running, "", 0, 0)?;
    match run_inner(config, &dir, options) {
        Ok(summary) => {
            let (state, reason) = if summary.stopped {
                (RunState::Stopped, format!("stopped at step {} with a checkpoint; resume to continue", summary.step))
            } else {
                (RunState::Done, String::new())
            };
            dir.set_status(state, &reason, summary.epochs.len(), summary.step)?;
            Ok(summary)
        }
        Err(e) => {
            let _ = dir.set_status(RunState::Failed, &e.to_string(), 0, 0);
            Err(e)
        }
    }
}

/// The data of a run, read and split.
struct Data {
    train: BatchSource,
    test: EvalSource,
    validation: Option<EvalSource>,
    input: InputShape,
    num_classes: i64,
}

/// A held-out set, made into normalised batches only as each evaluation needs them, so that
/// memory holds the set's bytes and not a float copy of it.
struct EvalSource {
    source: BatchSource,
    batches: usize,
}

impl EvalSource {
    fn new(source: BatchSource, limit: Option<usize>) -> Self {
        let batches = source.batches_per_epoch().min(limit.unwrap_or(usize::MAX));
        Self { source, batches }
    }
}

fn load_data(config: &RunConfig) -> Result<Data> {
    let splits = dataset::load(&config.data)?;
    let (c, h, w) = splits.train.image_shape();
    if h != w {
        return Err(EngineError::Config(format!("data: images are {h}x{w}; expected square images")));
    }
    let transform = Transform::from_config(&config.data, c)?;
    let num_classes = splits.train.num_classes;
    let (train, validation) = splits.train.split_validation(config.data.validation_size, config.train.seed)?;
    let sampler = Sampler {
        batch_size: config.train.batch_size,
        drop_last: config.data.drop_last,
        classes_per_batch: config.data.classes_per_batch,
        seed: config.train.seed,
    };
    let eb = config.train.eval_batch_size;
    let limit = config.train.eval_batches;
    let test = EvalSource::new(BatchSource::evaluation(splits.test, transform.clone(), eb), limit);
    let validation = validation.map(|v| EvalSource::new(BatchSource::evaluation(v, transform.clone(), eb), limit));
    Ok(Data {
        train: BatchSource::training(train, transform, sampler),
        test,
        validation,
        input: InputShape { channels: c, size: h },
        num_classes,
    })
}

/// Short timed warm-up of every layer on `device`, for balancing an automatic placement.
fn measure_layers(config: &RunConfig, arch: &Architecture, device: Device) -> Vec<f64> {
    let devices = vec![device; arch.hidden.len() + 1];
    let Ok((mut blocks, mut output)) = build_layers(&config.model, &config.optim, arch, config.train.seed, &devices)
    else {
        return vec![1.0; arch.hidden.len() + 1];
    };
    let b = config.train.batch_size.min(64) as i64;
    let labels = Tensor::zeros([b], (Kind::Int64, device));
    let projection = label_projection(&config.model, arch, config.train.seed);
    let targets = Targets::new(&labels.to_device(Device::Cpu), arch.num_classes, projection.as_ref()).to_device(device);
    let mut x = Tensor::randn([b, arch.input.channels, arch.input.size, arch.input.size], (Kind::Float, device));
    let mut costs = Vec::new();
    for block in blocks.iter_mut() {
        let mut best = f64::INFINITY;
        let mut out = x.shallow_clone();
        for _ in 0..3 {
            let t = Instant::now();
            out = train_local_blocks(std::slice::from_mut(block), &x, &targets).unwrap_or(out);
            if device.is_cuda() {
                tch::Cuda::synchronize(match device {
                    Device::Cuda(i) => i as i64,
                    _ => 0,
                });
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        costs.push(best);
        x = out;
    }
    let t = Instant::now();
    let _ = output.train_local(&x, &labels);
    costs.push(t.elapsed().as_secs_f64());
    costs
}

/// The stream of training batches from `start` = (epoch, batch index) on, produced ahead on
/// a thread of its own and left on `device` (stage 0's), with their targets.
pub struct LoaderPlan {
    pub start: (usize, usize),
    pub epochs: usize,
    pub steps: usize,
    pub num_classes: i64,
    pub projection: Option<Tensor>,
    pub prefetch: usize,
    pub device: Device,
}

fn spawn_loader(mut source: BatchSource, plan: LoaderPlan) -> (Receiver<(Tensor, Targets)>, JoinHandle<()>) {
    let (tx, rx) = bounded(plan.prefetch.max(1));
    let handle = std::thread::Builder::new()
        .name("loader".into())
        .spawn(move || {
            tch::set_num_threads(1);
            let (first_epoch, first_index) = plan.start;
            for epoch in first_epoch..=plan.epochs {
                let from = if epoch == first_epoch { first_index } else { 0 };
                for index in from..plan.steps {
                    let batch = source.batch(epoch, index);
                    let targets = Targets::new(&batch.labels, plan.num_classes, plan.projection.as_ref());
                    let images = match plan.device {
                        Device::Cpu => batch.images,
                        d => batch.images.pin_memory(d).to_device_(d, Kind::Float, true, false),
                    };
                    if tx.send((images, targets.to_device(plan.device))).is_err() {
                        return;
                    }
                }
            }
        })
        .expect("spawn loader thread");
    (rx, handle)
}

/// Where messages go: a thread per stage, or all stages in this thread.
enum Pipeline {
    Threads { head: Box<dyn LinkSender>, workers: Vec<JoinHandle<Stage>> },
    Inline { stages: Vec<Stage> },
}

impl Pipeline {
    /// Hands a message to stage 0 (pipelined) or through every stage (sequential).
    fn feed(&mut self, msg: Message, reports: &Receiver<Report>) -> Result<()> {
        match self {
            Pipeline::Threads { head, .. } => head.send(msg).map_err(|_| first_failure(reports)),
            Pipeline::Inline { stages } => {
                let mut msg = Some(msg);
                for stage in stages.iter_mut() {
                    match msg.take() {
                        Some(m) => msg = stage.process(m)?,
                        None => break,
                    }
                }
                Ok(())
            }
        }
    }

    /// Stops the workers and gives the stages back.
    fn finish(self) -> Vec<Stage> {
        match self {
            Pipeline::Threads { head, workers } => {
                let _ = head.send(Message::Shutdown);
                drop(head);
                workers.into_iter().filter_map(|w| w.join().ok()).collect()
            }
            Pipeline::Inline { stages } => stages,
        }
    }
}

/// The failure a stage reported, once the pipeline has come apart.
fn first_failure(reports: &Receiver<Report>) -> EngineError {
    loop {
        match reports.recv_timeout(Duration::from_secs(30)) {
            Ok(Report::Failed(f)) => return EngineError::Stage(f),
            Ok(_) => continue,
            Err(_) => return EngineError::Other("the pipeline stopped without saying why".into()),
        }
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

fn run_inner(config: &RunConfig, dir: &RunDir, mut options: RunOptions) -> Result<RunSummary> {
    crate::validate::validate(config, true)?;
    let checkpoints_root = dir.path.join("checkpoints");
    let resumed = if options.resume { checkpoint::latest(&checkpoints_root)? } else { None };
    if let Some(l) = &resumed {
        checkpoint::check_compatible(&l.manifest, config, &l.dir)?;
        tracing::info!(step = l.manifest.step, "resuming from {}", l.dir.display());
    } else if options.resume {
        tracing::info!("no checkpoint in {}: starting from the beginning", checkpoints_root.display());
        dir.rewrite_metrics(&[])?; // lines of a run that left no checkpoint are not this run's
    }
    dir.write_config(config)?;
    let mut data = load_data(config)?;
    let arch = Architecture::new(&config.model, data.input, data.num_classes)?;
    let num_layers = arch.hidden.len() + 1;
    let cuda_count = tch::Cuda::device_count().max(0) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = resolve(&config.pipeline.placement, num_layers, config.model.training, cuda_count, cores, |d| {
        measure_layers(config, &arch, d)
    })?;

    let seed = config.train.seed;
    let devices: Vec<Device> = plan.iter().flat_map(|p| p.devices.clone()).collect();
    let (mut blocks, mut output) = build_layers(&config.model, &config.optim, &arch, seed, &devices)?;
    let mut progress = Progress { step: 0, position: (1, 0), metrics: vec![] };
    if let Some(l) = &resumed {
        for b in &mut blocks {
            let part = format!("layer-{:03}", b.index);
            let named = l.layers.get(&part).ok_or_else(|| {
                EngineError::Other(format!(
                    "{}: no {} for layer {}",
                    l.dir.display(),
                    checkpoint::layer_file(&part),
                    b.index
                ))
            })?;
            b.load_state(named).map_err(|e| EngineError::Other(format!("{}: {e}", l.dir.display())))?;
        }
        let named = l
            .layers
            .get("output")
            .ok_or_else(|| EngineError::Other(format!("{}: no output.safetensors", l.dir.display())))?;
        output.load_state(named).map_err(|e| EngineError::Other(format!("{}: {e}", l.dir.display())))?;
        progress = Progress {
            step: l.coordinator.step,
            position: l.coordinator.position,
            metrics: l.coordinator.metrics.clone(),
        };
        dir.rewrite_metrics(&progress.metrics)?;
    }
    let projection = label_projection(&config.model, &arch, seed);
    let cpu_stages = plan.iter().filter(|p| p.device() == Device::Cpu).count().max(1);
    let threads = (config.train.cpu_threads.unwrap_or(cores) / cpu_stages).max(1);
    tracing::info!(
        parameters = arch.parameter_count(config.model.batch_norm),
        stages = plan.len(),
        threads_per_stage = threads,
        "model {} ({:?}, {:?}) on {} stage(s): {}",
        config.model.arch,
        config.model.training,
        config.model.loss,
        plan.len(),
        plan.iter().map(|p| format!("{:?}@{}", p.layers, device_name(p.device()))).collect::<Vec<_>>().join(" ")
    );

    let (report_tx, reports) = unbounded();
    let (parts_tx, parts) = unbounded();
    let mut writer = checkpoint::Writer::spawn(checkpoints_root, config.checkpoint.keep, parts);
    let mut stages = Vec::new();
    let mut blocks = blocks.into_iter();
    let mut output = Some(output);
    for p in &plan {
        let n_hidden = p.layers.iter().filter(|&&l| l < num_layers - 1).count();
        let mine: Vec<_> = blocks.by_ref().take(n_hidden).collect();
        let out = if p.layers.contains(&(num_layers - 1)) { output.take() } else { None };
        stages.push(Stage::new(
            p.index,
            p.device(),
            mine,
            out,
            config.model.training,
            threads,
            config.train.check_finite_every.unwrap_or(if p.device().is_cuda() { 50 } else { 1 }),
            report_tx.clone(),
            parts_tx.clone(),
            options.fault,
        ));
    }
    drop(parts_tx);
    let watch = crate::watchdog::Watch::new(stages.len());
    for s in &mut stages {
        s.watch(watch.clone());
    }
    let stage_layers: Vec<Vec<usize>> = stages.iter().map(|s| s.layer_indices()).collect();
    let _watchdog =
        crate::watchdog::Watchdog::spawn(watch, Duration::from_secs_f64(config.train.stall_warning_s), stage_layers);
    let mut pipeline = match config.pipeline.mode {
        PipelineMode::Sequential => {
            tch::set_num_threads(threads as i32);
            Pipeline::Inline { stages }
        }
        PipelineMode::Pipelined => {
            drop(report_tx);
            let (head, mut rx) = in_process(config.pipeline.channel_capacity);
            let n = stages.len();
            let mut workers = Vec::new();
            for (i, stage) in stages.into_iter().enumerate() {
                let (tx_next, rx_next) = in_process(config.pipeline.channel_capacity);
                let out: Option<Box<dyn LinkSender>> = (i + 1 < n).then(|| Box::new(tx_next) as Box<dyn LinkSender>);
                let input = Box::new(std::mem::replace(&mut rx, rx_next));
                workers.push(
                    std::thread::Builder::new()
                        .name(format!("stage-{i}"))
                        .spawn(move || {
                            let mut stage = stage;
                            stage.run_loop(input, out);
                            stage
                        })
                        .map_err(|e| EngineError::Other(format!("cannot start stage {i}: {e}")))?,
                );
            }
            Pipeline::Threads { head: Box::new(head), workers }
        }
    };

    let steps =
        config.train.steps_per_epoch.map_or(data.train.batches_per_epoch(), |s| s.min(data.train.batches_per_epoch()));
    let loader_plan = LoaderPlan {
        start: progress.position,
        epochs: config.train.epochs,
        steps,
        num_classes: data.num_classes,
        projection,
        prefetch: config.data.prefetch,
        device: plan[0].devices[0],
    };
    let (batches, loader) = spawn_loader(data.train, loader_plan);
    let mut ctx = Training {
        config,
        dir,
        batches: &batches,
        reports: &reports,
        test: &mut data.test,
        validation: data.validation.as_mut(),
        steps,
        plan: &plan,
        writer: &mut writer,
        stages: plan.len(),
        last_checkpoint: resumed.as_ref().map(|l| l.manifest.step),
        seq: 0,
    };
    let result = ctx.train(&mut pipeline, &mut progress, &mut options);
    drop(batches);
    let stages = pipeline.finish();
    let _ = loader.join();

    let mut state = Vec::new();
    for s in &stages {
        for b in &s.blocks {
            state.extend(
                b.state().into_iter().map(|(n, t)| (format!("layers.{}.{n}", b.index), t.to_device(Device::Cpu))),
            );
        }
        if let Some(o) = &s.output {
            state.extend(o.state().into_iter().map(|(n, t)| (format!("output.{n}"), t.to_device(Device::Cpu))));
        }
    }
    let complete = stages.iter().map(|s| s.layer_indices().len()).sum::<usize>() == num_layers;
    drop(stages);
    let written = writer.finish();
    let stopped = result?;
    for w in written {
        w?;
    }
    if !complete {
        return Err(EngineError::Other("a stage did not come back from its thread".into()));
    }
    let epochs = progress.metrics.iter().filter_map(|m| serde_json::from_value(m.clone()).ok()).collect();
    Ok(RunSummary {
        epochs,
        state,
        plan,
        parameter_count: arch.parameter_count(config.model.batch_norm),
        step: progress.step,
        stopped,
        resumed_from: resumed.map(|l| l.dir),
    })
}

/// Where a run stands: what a checkpoint records of the coordinator.
struct Progress {
    step: u64,
    /// Next (epoch, batch index) to train on.
    position: (usize, usize),
    metrics: Vec<serde_json::Value>,
}

/// The epoch loop and what it needs.
struct Training<'a> {
    config: &'a RunConfig,
    dir: &'a RunDir,
    batches: &'a Receiver<(Tensor, Targets)>,
    reports: &'a Receiver<Report>,
    test: &'a mut EvalSource,
    validation: Option<&'a mut EvalSource>,
    steps: usize,
    plan: &'a [StagePlan],
    writer: &'a mut checkpoint::Writer,
    stages: usize,
    /// Step of the last checkpoint taken (or resumed from).
    last_checkpoint: Option<u64>,
    seq: u64,
}

impl Training<'_> {
    /// Trains from `progress` to the end (Ok(false)) or to a stop request (Ok(true)).
    fn train(&mut self, pipeline: &mut Pipeline, progress: &mut Progress, options: &mut RunOptions) -> Result<bool> {
        let (first_epoch, first_index) = progress.position;
        for epoch in first_epoch..=self.config.train.epochs {
            let lr = self.config.optim.lr_at_epoch(epoch);
            let start = Instant::now();
            pipeline.feed(Message::SetLr { lr }, self.reports)?;
            let from = if epoch == first_epoch { first_index } else { 0 };
            let mut data_wait = Duration::ZERO;
            for index in from..self.steps {
                let waited = Instant::now();
                let (input, targets) =
                    self.batches.recv().map_err(|_| EngineError::Other("the data loader stopped".into()))?;
                data_wait += waited.elapsed();
                progress.step += 1;
                let step = progress.step;
                pipeline.feed(Message::Train { epoch, step, input, targets }, self.reports)?;
                progress.position = (epoch, index + 1);
                if let Some(f) = options.on_step.as_mut() {
                    f(epoch, index + 1, self.steps);
                }
                self.poll_writer();
                let every = self.config.checkpoint.every_steps;
                let stop = options.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
                    || options.stop_after_step.is_some_and(|s| step >= s);
                if stop || (every > 0 && step.is_multiple_of(every)) {
                    self.checkpoint(pipeline, progress, None)?;
                }
                if stop {
                    tracing::info!(step, "stopping with a checkpoint");
                    return Ok(true);
                }
            }
            let mut n_eval = 0;
            let sets = [(EvalSet::Test, Some(&mut *self.test)), (EvalSet::Validation, self.validation.as_deref_mut())];
            for (set, source) in sets {
                let Some(source) = source else { continue };
                for index in 0..source.batches {
                    let b = source.source.batch(1, index);
                    pipeline.feed(Message::Eval { set, index, input: b.images, labels: b.labels }, self.reports)?;
                    n_eval += 1;
                }
            }
            pipeline.feed(Message::EpochEnd { epoch }, self.reports)?;
            let mut metrics = collect_epoch(epoch, progress.step, lr, start, self.reports, self.plan, n_eval)?;
            metrics.data_wait_s = data_wait.as_secs_f64();
            if metrics.data_wait_s > 0.1 * metrics.train_seconds && metrics.data_wait_s > 0.5 {
                tracing::warn!(
                    epoch,
                    "the data stream cannot keep up: training waited {:.1} s for batches in {:.1} s of training; raise data.prefetch or simplify augmentation",
                    metrics.data_wait_s,
                    metrics.train_seconds
                );
            }
            log_epoch(&metrics);
            let line = serde_json::to_value(&metrics).expect("metrics serialise");
            self.dir.append_metrics(&line)?;
            progress.metrics.push(line);
            progress.position = (epoch + 1, 0);
            self.dir.set_status(RunState::Running, "", epoch, progress.step)?;
            let every = self.config.checkpoint.every_epochs;
            let last = epoch == self.config.train.epochs;
            if (every > 0 && epoch % every == 0) || last {
                let error = metrics.validation_error.unwrap_or(metrics.test_error);
                self.checkpoint(pipeline, progress, Some(error))?;
            }
        }
        Ok(false)
    }

    /// Inserts a checkpoint marker after the current step and hands the coordinator's part
    /// to the writer; the stages send theirs as the marker reaches them.
    fn checkpoint(&mut self, pipeline: &mut Pipeline, progress: &Progress, error: Option<f64>) -> Result<()> {
        if self.last_checkpoint == Some(progress.step) && error.is_none() {
            return Ok(()); // this cut exists already
        }
        self.seq += 1;
        // At most one copy of the model waits for the writer besides the new one.
        for r in self.writer.wait_below(1) {
            log_written(r);
        }
        let coordinator =
            CoordinatorState { step: progress.step, position: progress.position, metrics: progress.metrics.clone() };
        let manifest = Manifest {
            format_version: checkpoint::FORMAT_VERSION,
            step: progress.step,
            epoch: if progress.position.1 == 0 { progress.position.0 - 1 } else { progress.position.0 },
            position: progress.position,
            epochs_done: progress.metrics.len(),
            config_hash: checkpoint::config_hash(self.config),
            model: self.config.model.clone(),
            dataset: self.config.data.dataset,
            error,
            files: vec![],
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        self.writer.submit(checkpoint::Job { seq: self.seq, coordinator, manifest, stages: self.stages });
        pipeline.feed(Message::Checkpoint { step: progress.step, seq: self.seq }, self.reports)?;
        self.last_checkpoint = Some(progress.step);
        Ok(())
    }

    fn poll_writer(&mut self) {
        for r in self.writer.poll() {
            log_written(r);
        }
    }
}

fn log_written(r: Result<PathBuf>) {
    match r {
        Ok(dir) => tracing::info!("checkpoint written: {}", dir.display()),
        Err(e) => tracing::error!("checkpoint failed (training goes on; the previous one stays): {e}"),
    }
}

/// Waits for every stage's end-of-epoch report and every evaluation result.
fn collect_epoch(
    epoch: usize,
    step: u64,
    lr: f64,
    start: Instant,
    reports: &Receiver<Report>,
    plan: &[StagePlan],
    eval_batches: usize,
) -> Result<EpochMetrics> {
    let (mut stats, mut evals) = (Vec::new(), Vec::new());
    while stats.len() < plan.len() || evals.len() < eval_batches {
        match reports.recv() {
            Ok(Report::Failed(f)) => return Err(EngineError::Stage(f)),
            Ok(r @ Report::EpochStats { .. }) => stats.push(r),
            Ok(r @ Report::Eval { .. }) => evals.push(r),
            Err(_) => {
                return Err(EngineError::Stage(StageFailure {
                    stage: 0,
                    layer: None,
                    step: Some(step),
                    reason: "pipeline stopped".into(),
                }))
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let (mut wrong, mut count, mut loss_sum) = ([0i64; 2], [0i64; 2], 0.0);
    for r in &evals {
        if let Report::Eval { set, wrong: w, count: c, loss_sum: l, .. } = r {
            let k = (*set == EvalSet::Validation) as usize;
            wrong[k] += w;
            count[k] += c;
            if k == 0 {
                loss_sum += l;
            }
        }
    }
    let mut layers = Vec::new();
    let mut stages = Vec::new();
    let (mut train_loss, mut train_error, mut train_done) = (f64::NAN, f64::NAN, start);
    let mut train_examples = 0;
    for r in &stats {
        if let Report::EpochStats { stage, layers: ls, output, timing, train_done: done, .. } = r {
            layers.extend(ls.iter().map(|l| LayerMetrics::from_report(l, *stage)));
            let p = &plan[*stage];
            stages.push(StageMetrics::from_timing(*stage, device_name(p.device()), p.layers.clone(), timing, wall));
            if let Some((loss, err)) = output {
                train_loss = *loss;
                train_error = *err;
                train_done = *done;
                train_examples = timing.train_examples;
            }
        }
    }
    layers.sort_by_key(|l| l.layer);
    stages.sort_by_key(|s| s.stage);
    let train_seconds = (train_done - start).as_secs_f64();
    let pct = |w: i64, c: i64| if c > 0 { 100.0 * w as f64 / c as f64 } else { f64::NAN };
    Ok(EpochMetrics {
        epoch,
        step,
        lr,
        train_loss,
        train_error,
        test_loss: if count[0] > 0 { loss_sum / count[0] as f64 } else { f64::NAN },
        test_error: pct(wrong[0], count[0]),
        validation_error: (count[1] > 0).then(|| pct(wrong[1], count[1])),
        images_per_sec: if train_seconds > 0.0 { train_examples as f64 / train_seconds } else { 0.0 },
        data_wait_s: 0.0,
        train_seconds,
        epoch_seconds: wall,
        layers,
        stages,
    })
}

fn log_epoch(m: &EpochMetrics) {
    let utilisation: Vec<String> = m.stages.iter().map(|s| format!("{:.0}%", 100.0 * s.utilisation)).collect();
    tracing::info!(
        epoch = m.epoch,
        lr = m.lr,
        train_error = m.train_error,
        test_error = m.test_error,
        images_per_sec = m.images_per_sec.round(),
        "epoch {}: lr {:.2e}, train loss {:.4} error {:.2}%, test loss {:.4} error {:.2}%{}, {:.0} images/s, stage utilisation {}",
        m.epoch,
        m.lr,
        m.train_loss,
        m.train_error,
        m.test_loss,
        m.test_error,
        m.validation_error.map(|v| format!(", validation error {v:.2}%")).unwrap_or_default(),
        m.images_per_sec,
        utilisation.join(" ")
    );
    for l in &m.layers {
        tracing::info!(
            epoch = m.epoch,
            layer = l.layer,
            "layer {}: loss_pred {:.4}, loss_sim {:.4}, local error {}",
            l.layer,
            l.loss_pred,
            l.loss_sim,
            l.error.map_or("-".into(), |e| format!("{e:.2}%"))
        );
    }
}
