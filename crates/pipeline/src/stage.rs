//! A stage: a run of consecutive layers with their heads and optimizers, bound to a device.
//! It owns its layers from birth to checkpoint: the thread (later: the process) that runs it
//! builds them from (seed, layer index), loads them from their own files on resume, and at a
//! checkpoint marker writes them and reports what it wrote. Every stage runs the same loop:
//! take a message, handle it, pass it on. It talks only through its links.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use layerwise_nn::network::{eval_blocks, label_projection};
use layerwise_nn::{HiddenBlock, OutputLayer, Targets, Training};
use layerwise_plan::{Plan, StagePlan};
use layerwise_rundir::checkpoint::{self, FileEntry, Verified};
use tch::{Device, Kind, Reduction, Tensor};

use crate::layers::Layers;
use crate::link::{LinkReceiver, LinkSender, ReportSender};
use crate::message::{unix_now, Control, EpochStats, EvalSet, LayerReport, Message, Report, StageFailure, StageTiming};
use crate::thread::{panic_message, set_thread_count};
use crate::watchdog::Watch;

mod train;

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

impl StageEnv {
    /// An environment with no fault to inject and no watchdog.
    pub fn new(checkpoints: PathBuf, resume: Option<Verified>, reports: Arc<dyn ReportSender>) -> Self {
        Self {
            checkpoints,
            resume,
            reports,
            #[cfg(feature = "fault-injection")]
            fault: None,
            watch: None,
        }
    }
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

impl Stage {
    /// Builds stage `index` of `plan`: its layers from (seed, layer index) on their devices,
    /// then, on resume, each layer's state from its own file in the checkpoint, checked
    /// against the manifest. Nothing else of the checkpoint is read.
    pub fn build(plan: &Plan, index: usize, env: StageEnv) -> Result<Stage, StageFailure> {
        let sp = plan.stages[index].clone();
        let fail = |layer: Option<usize>, reason: String| StageFailure { stage: index, layer, step: None, reason };
        let out_index = plan.output_layer();
        let resume = env.resume.as_ref();
        let state = |layer| {
            let part = resume.map(|v| v.part(&checkpoint::part_name(layer, out_index)));
            part.transpose().map_err(|e| e.to_string())
        };
        let on_devices = sp.layers.iter().zip(&sp.devices).map(|(&l, d)| (l, d.tch()));
        let built = catch_unwind(AssertUnwindSafe(|| Layers::build(plan, on_devices, state)));
        let Layers { blocks, output } =
            built.map_err(|p| fail(None, panic_message(&*p)))?.map_err(|(l, e)| fail(Some(l), e))?;
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
                let out = if self.training.is_global() {
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
    fn write_checkpoint(&self, step: u64, seq: u64) -> layerwise_rundir::Result<Vec<FileEntry>> {
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

    /// Ends the loop on a link that failed: a link that broke (rather than closed as its
    /// stage stopped) fails the job with its reason.
    fn link_broke(&self, why: Option<String>) -> bool {
        if let Some(why) = why {
            tracing::error!(stage = self.index, "{why}");
            let _ = self.env.reports.send(Report::Failed(self.fail(None, None, &why)));
        }
        false
    }

    /// The worker loop: until shutdown, or until a neighbour is gone, or a failure (reported
    /// to the coordinator; dropping the links then stops the other stages). Returns whether
    /// it ended by a shutdown that passed through.
    pub fn run_loop(&mut self, input: Box<dyn LinkReceiver>, output: Option<Box<dyn LinkSender>>) -> bool {
        loop {
            let t0 = Instant::now();
            let depth = input.depth();
            let Ok(msg) = input.recv() else { return self.link_broke(input.broken()) };
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
                            return self.link_broke(out.broken());
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
    set_thread_count(plan.stages[index].threads);
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
