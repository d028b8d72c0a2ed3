//! A stage: a run of consecutive layers with their heads and optimizers, bound to a device.
//! It owns its layers from birth to checkpoint: the thread (later: the process) that runs it
//! builds them from (seed, layer index), loads them from their own files on resume, and at a
//! checkpoint marker writes them and reports what it wrote. Every stage runs the same loop:
//! take a message, handle it, pass it on. It talks only through its links.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use layerwise_nn::network::{eval_blocks, label_projection, train_global};
use layerwise_nn::{HiddenBlock, OutputLayer, Targets, Training};
use tch::{Device, Kind, Reduction, Tensor};

use crate::checkpoint::{self, FileEntry, Verified};
use crate::link::{LinkReceiver, LinkSender, ReportSender};
use crate::message::{unix_now, Control, EpochStats, EvalSet, LayerReport, Message, Report, StageFailure, StageTiming};
use crate::placement::StagePlan;
use crate::plan::Plan;
use crate::watchdog::Watch;

/// What a stage needs besides its part of the plan: where checkpoints go, the checkpoint
/// to resume from, its report link.
pub struct StageEnv {
    pub checkpoints: PathBuf,
    pub resume: Option<Verified>,
    pub reports: Arc<dyn ReportSender>,
    #[cfg(feature = "fault-injection")]
    pub fault: Option<crate::fault::Fault>,
    pub watch: Option<Arc<Watch>>,
}

pub struct Stage {
    pub index: usize,
    device: Device,
    blocks: Vec<HiddenBlock>,
    output: Option<OutputLayer>,
    training: Training,
    num_classes: i64,
    /// The model's output layer index (it names checkpoint parts).
    output_layer: usize,
    /// Bio mode's fixed label projection, on this stage's device.
    projection: Option<Tensor>,
    plan: StagePlan,
    env: StageEnv,
    timing: StageTiming,
    depth_samples: u64,
    train_done: Option<f64>,
    /// First non-finite loss noted on the device: step * LAYER_SLOTS + layer, or -1.
    first_bad: Option<Tensor>,
    /// The last stage's evaluation so far this epoch, per set, summed on the device and
    /// read back once, at the epoch's end.
    evals: Vec<(EvalSet, EvalSums)>,
}

/// An evaluation set's figures so far: batches and images seen, and on the device the
/// misclassified images (int64) and the summed loss (float64, each batch's float32 sum added
/// in order, as the coordinator added them when each batch was read back).
struct EvalSums {
    batches: usize,
    count: i64,
    wrong: Tensor,
    loss: Tensor,
}

/// Layer indices a non-finite mark can hold (the last slot: "the whole stage").
const LAYER_SLOTS: i64 = 1 << 16;

type Handled = Result<Option<Message>, StageFailure>;

/// The first line of a panic's message.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into());
    text.lines().next().unwrap_or("panicked").to_string()
}

impl Stage {
    /// Builds stage `index` of `plan`: its layers from (seed, layer index) on their devices,
    /// then, on resume, each layer's state from its own file in the checkpoint, checked
    /// against the manifest. Nothing else of the checkpoint is read.
    pub fn build(plan: &Plan, index: usize, env: StageEnv) -> Result<Stage, StageFailure> {
        let sp = plan.stages[index].clone();
        let fail = |layer: Option<usize>, reason: String| StageFailure { stage: index, layer, step: None, reason };
        let built = catch_unwind(AssertUnwindSafe(|| Self::build_layers(plan, &sp, env.resume.as_ref())));
        let (blocks, output) = built.map_err(|p| fail(None, panic_message(&*p)))?.map_err(|(l, e)| fail(l, e))?;
        let (model, arch) = (&plan.config.model, &plan.arch);
        let device = sp.device().tch();
        let projection = label_projection(model, arch, plan.config.train.seed).map(|p| p.to_device(device));
        Ok(Stage {
            index,
            device,
            blocks,
            output,
            training: model.training,
            num_classes: arch.num_classes,
            output_layer: plan.output_layer(),
            projection,
            plan: sp,
            env,
            timing: StageTiming::default(),
            depth_samples: 0,
            train_done: None,
            first_bad: None,
            evals: Vec::new(),
        })
    }

    #[allow(clippy::type_complexity)]
    fn build_layers(
        plan: &Plan,
        sp: &StagePlan,
        resume: Option<&Verified>,
    ) -> Result<(Vec<HiddenBlock>, Option<OutputLayer>), (Option<usize>, String)> {
        let (model, optim, arch) = (&plan.config.model, &plan.config.optim, &plan.arch);
        let seed = plan.config.train.seed;
        let out_index = plan.output_layer();
        let (mut blocks, mut output) = (Vec::new(), None);
        for (&layer, device) in sp.layers.iter().zip(&sp.devices) {
            let d = device.tch();
            let state = match resume {
                Some(v) => {
                    Some(v.part(&checkpoint::part_name(layer, out_index)).map_err(|e| (Some(layer), e.to_string()))?)
                }
                None => None,
            };
            let loaded = |r: layerwise_nn::Result<()>| r.map_err(|e| (Some(layer), e.to_string()));
            if layer == out_index {
                let mut o = OutputLayer::new(layer, arch.output_in, arch.num_classes, model, optim, seed, d);
                if let Some(s) = &state {
                    loaded(o.load_state(s))?;
                }
                output = Some(o);
            } else {
                let mut b = HiddenBlock::new(layer, &arch.hidden[layer], arch.num_classes, model, optim, seed, d)
                    .map_err(|e| (Some(layer), e.to_string()))?;
                if let Some(s) = &state {
                    loaded(b.load_state(s))?;
                }
                blocks.push(b);
            }
        }
        Ok((blocks, output))
    }

    fn fail(&self, layer: Option<usize>, step: Option<u64>, reason: impl Into<String>) -> StageFailure {
        StageFailure { stage: self.index, layer, step, reason: reason.into() }
    }

    /// [`Stage::handle`], with the time it takes counted as busy.
    pub fn process(&mut self, msg: Message) -> Handled {
        let t = Instant::now();
        if let Some(w) = &self.env.watch {
            w.busy(self.index, msg.kind());
        }
        let handled = self.handle(msg);
        if let Some(w) = &self.env.watch {
            w.idle(self.index);
        }
        self.timing.busy += t.elapsed();
        handled
    }

    /// Handles one message; returns what to pass on (None for the last stage's results).
    pub fn handle(&mut self, msg: Message) -> Handled {
        let is_last = self.output.is_some();
        let (control, payload) = (msg.control, msg.payload);
        let pass_on = || Ok(Some(Message::control(control)));
        match control {
            Control::Train { epoch, step } => {
                let p = payload.ok_or_else(|| self.fail(None, Some(step), "a training message without a batch"))?;
                let x = p.input.to_device(self.device);
                let labels = p.labels.to_device(self.device);
                // Only labels cross links: the targets are made here, on this stage's device.
                let targets =
                    self.guard(None, Some(step), |s| Targets::new(&labels, s.num_classes, s.projection.as_ref()))?;
                let out = if matches!(self.training, Training::Backprop | Training::LocalGlobal) {
                    self.train_global_step(&x, &targets, step)?
                } else {
                    self.train_local_step(x, &targets, step)?
                };
                self.timing.train_examples += labels.size()[0] as u64;
                Ok((!is_last).then(|| Message::with(Control::Train { epoch, step }, out, labels)))
            }
            Control::Eval { set } => {
                self.mark_train_done();
                let p = payload.ok_or_else(|| self.fail(None, None, "an evaluation message without a batch"))?;
                let x = p.input.to_device(self.device);
                let out = self.guard(None, None, |s| {
                    let x = eval_blocks(&mut s.blocks, &x);
                    match &s.output {
                        Some(o) => o.forward(&x.to_device(o.device())),
                        None => x,
                    }
                })?;
                if !is_last {
                    return Ok(Some(Message::with(control, out, p.labels)));
                }
                let labels = p.labels.to_device(out.device());
                self.guard(None, None, |s| {
                    let wrong = out.argmax(1, false).ne_tensor(&labels).sum(Kind::Int64);
                    let loss = out.cross_entropy_loss(&labels, None::<Tensor>, Reduction::Sum, -100, 0.0);
                    let loss = loss.to_kind(Kind::Double);
                    let count = labels.size()[0];
                    match s.evals.iter_mut().find(|(k, _)| *k == set) {
                        Some((_, e)) => {
                            (e.batches, e.count) = (e.batches + 1, e.count + count);
                            e.wrong = &e.wrong + wrong;
                            e.loss = &e.loss + loss;
                        }
                        None => s.evals.push((set, EvalSums { batches: 1, count, wrong, loss })),
                    }
                })?;
                Ok(None)
            }
            Control::SetLr { lr } => {
                for b in &mut self.blocks {
                    b.optimizer.set_lr(lr);
                }
                if let Some(o) = &mut self.output {
                    o.optimizer.set_lr(lr);
                }
                pass_on()
            }
            Control::EpochEnd { epoch } => {
                self.read_first_bad()?; // nothing non-finite reaches an epoch's figures
                self.mark_train_done();
                self.report_evals()?;
                self.report_epoch(epoch)?;
                pass_on()
            }
            Control::Checkpoint { step, seq } => {
                self.read_first_bad()?; // nor a checkpoint
                let files = self.write_checkpoint(step, seq).map_err(|e| e.to_string());
                if let Err(e) = &files {
                    tracing::error!(stage = self.index, step, "cannot write this stage's checkpoint files: {e}");
                }
                self.report(Report::CheckpointPart { seq, stage: self.index, files })?;
                pass_on()
            }
            Control::Shutdown => pass_on(),
        }
    }

    /// Reports this epoch's evaluation, one figure per set (read back from the device once).
    fn report_evals(&mut self) -> Result<(), StageFailure> {
        let figures = self.guard(None, None, |s| {
            s.evals
                .drain(..)
                .map(|(set, e)| Report::Eval {
                    set,
                    batches: e.batches,
                    wrong: e.wrong.int64_value(&[]),
                    count: e.count,
                    loss_sum: e.loss.double_value(&[]),
                })
                .collect::<Vec<_>>()
        })?;
        for r in figures {
            self.report(r)?;
        }
        Ok(())
    }

    /// Writes every layer of this stage into checkpoint `seq`'s folder, each file synced.
    fn write_checkpoint(&self, step: u64, seq: u64) -> crate::Result<Vec<FileEntry>> {
        let dir = checkpoint::partial_dir(&self.env.checkpoints, step, seq);
        let mut files = Vec::new();
        for b in &self.blocks {
            files.push(checkpoint::write_part(&dir, &self.part(b.index), &b.state())?);
        }
        if let Some(o) = &self.output {
            files.push(checkpoint::write_part(&dir, &self.part(o.index), &o.state())?);
        }
        Ok(files)
    }

    /// The checkpoint part of one of this stage's layers.
    fn part(&self, layer: usize) -> String {
        checkpoint::part_name(layer, self.output_layer)
    }

    fn report(&self, report: Report) -> Result<(), StageFailure> {
        self.env.reports.send(report).map_err(|_| self.fail(None, None, "the coordinator is gone"))
    }

    fn mark_train_done(&mut self) {
        self.train_done.get_or_insert_with(unix_now);
    }

    /// Runs `f` on this stage, turning a panic (libtorch errors, out of memory) into a failure.
    fn guard<T>(
        &mut self,
        layer: Option<usize>,
        step: Option<u64>,
        f: impl FnOnce(&mut Self) -> T,
    ) -> Result<T, StageFailure> {
        catch_unwind(AssertUnwindSafe(|| f(self))).map_err(|panic| StageFailure {
            stage: self.index,
            layer,
            step,
            reason: panic_message(&*panic),
        })
    }

    /// The test build's injected fault, if one is due here; the input as it is otherwise.
    fn inject(&self, layer: usize, step: u64, x: Tensor) -> Result<Tensor, StageFailure> {
        #[cfg(feature = "fault-injection")]
        if let Some(f) = self.env.fault.filter(|f| f.layer == layer && f.step == step) {
            return f.apply(x).map_err(|reason| self.fail(Some(layer), Some(step), reason));
        }
        let _ = (layer, step);
        Ok(x)
    }

    /// Notes, on the device and without waiting for it, the first (step, layer) whose loss
    /// is not finite; reads that back every `check_finite_every` steps. So the failure names
    /// the exact step while a GPU stage synchronises only once per interval.
    fn check_finite(&mut self, loss: &Tensor, layer: Option<usize>, step: u64) -> Result<(), StageFailure> {
        if self.plan.check_finite_every == 0 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let mark = step as i64 * LAYER_SLOTS + layer.map_or(LAYER_SLOTS - 1, |l| l as i64);
        let first = self.first_bad.get_or_insert_with(|| Tensor::from(-1i64).to_device(loss.device()));
        let keep = first.ge(0).logical_or(&loss.isfinite());
        *first = first.where_scalarother(&keep, mark);
        if step.is_multiple_of(self.plan.check_finite_every) {
            self.read_first_bad()?;
        }
        Ok(())
    }

    /// Fails if a non-finite loss was noted (read back from the device).
    fn read_first_bad(&self) -> Result<(), StageFailure> {
        let Some(first) = &self.first_bad else { return Ok(()) };
        let v = first.int64_value(&[]);
        if v < 0 {
            return Ok(());
        }
        let (step, slot) = ((v / LAYER_SLOTS) as u64, v % LAYER_SLOTS);
        let layer = (slot != LAYER_SLOTS - 1).then_some(slot as usize);
        Err(self.fail(layer, Some(step), "non-finite loss (NaN or infinity)"))
    }

    fn train_local_step(
        &mut self,
        mut x: Tensor,
        targets: &layerwise_nn::Targets,
        step: u64,
    ) -> Result<Tensor, StageFailure> {
        for i in 0..self.blocks.len() {
            let layer = self.blocks[i].index;
            let out = self.guard(Some(layer), Some(step), |s| {
                let x = s.inject(layer, step, x)?;
                s.blocks[i].train_local(&x, targets).map_err(|e| s.fail(Some(layer), Some(step), e.to_string()))
            })??;
            self.check_finite(&out.loss, Some(layer), step)?;
            x = out.output;
        }
        if let Some(layer) = self.output.as_ref().map(|o| o.index) {
            let loss = self.guard(Some(layer), Some(step), |s| {
                let x = s.inject(layer, step, x.shallow_clone())?;
                let out = s.output.as_mut().expect("checked").train_local(&x, &targets.labels);
                out.map(|(_, loss)| loss).map_err(|e| s.fail(Some(layer), Some(step), e.to_string()))
            })??;
            self.check_finite(&loss, Some(layer), step)?;
        }
        Ok(x)
    }

    fn train_global_step(
        &mut self,
        x: &Tensor,
        targets: &layerwise_nn::Targets,
        step: u64,
    ) -> Result<Tensor, StageFailure> {
        let first = self.blocks.first().map_or(0, |b| b.index);
        let with_local = self.training == Training::LocalGlobal;
        let logits = self.guard(None, Some(step), |s| {
            let x = s.inject(first, step, x.shallow_clone())?;
            let output = s.output.as_mut().expect("a global stage holds the output layer");
            train_global(&mut s.blocks, output, &x, targets, with_local)
                .map_err(|e| s.fail(None, Some(step), e.to_string()))
        })??;
        self.check_finite(&logits.sum(Kind::Float), None, step)?;
        Ok(logits)
    }

    fn report_epoch(&mut self, epoch: usize) -> Result<(), StageFailure> {
        let layers = self
            .blocks
            .iter_mut()
            .map(|b| {
                let s = b.stats.snapshot(b.has_classifier());
                b.stats.reset();
                LayerReport {
                    layer: b.index,
                    loss_pred: s.loss_pred,
                    loss_sim: s.loss_sim,
                    error: s.error,
                    examples: s.examples,
                }
            })
            .collect();
        let output = self.output.as_mut().map(|o| {
            let s = o.snapshot();
            o.reset_stats();
            s
        });
        let mut timing = std::mem::take(&mut self.timing);
        timing.queue_depth /= self.depth_samples.max(1) as f64;
        self.depth_samples = 0;
        let train_done = self.train_done.take().unwrap_or_else(unix_now);
        self.report(Report::EpochStats(EpochStats { epoch, stage: self.index, layers, output, timing, train_done }))
    }

    /// The worker loop: until shutdown, or until a neighbour is gone, or a failure (reported
    /// to the coordinator; dropping the links then stops the other stages). Returns whether
    /// it ended by a shutdown that passed through.
    pub fn run_loop(&mut self, input: Box<dyn LinkReceiver>, output: Option<Box<dyn LinkSender>>) -> bool {
        loop {
            let t0 = Instant::now();
            let depth = input.depth();
            let Ok(msg) = input.recv() else { return false };
            let t1 = Instant::now();
            self.timing.wait_input += t1 - t0;
            self.timing.queue_depth += depth as f64;
            self.depth_samples += 1;
            let shutdown = msg.control == Control::Shutdown;
            // Layers' work is guarded where the layer is known; this catches the rest.
            let handled = self.guard(None, None, |s| s.process(msg)).and_then(|h| h);
            let t2 = Instant::now();
            match handled {
                Err(failure) => {
                    tracing::error!(stage = self.index, "{failure}");
                    let _ = self.env.reports.send(Report::Failed(failure));
                    return false;
                }
                Ok(Some(next)) => {
                    if let Some(out) = &output {
                        if out.send(next).is_err() {
                            return false;
                        }
                        self.timing.blocked_output += t2.elapsed();
                    }
                }
                Ok(None) => {}
            }
            if shutdown {
                return true;
            }
        }
    }
}

/// Runs stage `index` of `plan` on the calling thread: builds it, then loops until shutdown.
/// A stage that cannot be built reports why, as any failing stage does. Returns whether
/// the stage ended by a shutdown.
pub fn run_stage(
    plan: &Plan,
    index: usize,
    env: StageEnv,
    input: Box<dyn LinkReceiver>,
    output: Option<Box<dyn LinkSender>>,
) -> bool {
    crate::set_thread_count(plan.stages[index].threads);
    let reports = env.reports.clone();
    match Stage::build(plan, index, env) {
        Ok(mut stage) => stage.run_loop(input, output),
        Err(failure) => {
            tracing::error!(stage = index, "{failure}");
            let _ = reports.send(Report::Failed(failure));
            false
        }
    }
}
