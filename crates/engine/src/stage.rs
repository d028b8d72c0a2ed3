//! A stage: a run of consecutive layers with their heads and optimizers, bound to a device.
//! Every stage runs the same loop: take a message, handle it, pass it on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use layerwise_nn::network::{eval_blocks, train_global};
use layerwise_nn::{HiddenBlock, OutputLayer, Training};
use tch::{Device, Kind, Reduction, Tensor};

use crate::checkpoint::snapshot;
use crate::link::{LinkReceiver, LinkSender};
use crate::message::{CheckpointPart, LayerReport, Message, Report, StageFailure, StageTiming};

/// A fault to inject, for tests of failure handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The layer returns an error.
    Error,
    /// The layer panics.
    Panic,
    /// The layer's input turns to NaN, so its loss does.
    NonFinite,
    /// The layer asks for more memory than any machine has.
    OutOfMemory,
    /// The layer takes this many milliseconds longer (a stall).
    Sleep(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub layer: usize,
    pub step: u64,
    pub kind: FaultKind,
}

pub struct Stage {
    pub index: usize,
    pub device: Device,
    pub blocks: Vec<HiddenBlock>,
    pub output: Option<OutputLayer>,
    training: Training,
    /// Intra-op threads of this stage's worker (CPU).
    threads: usize,
    check_finite_every: u64,
    reports: Sender<Report>,
    checkpoints: Sender<CheckpointPart>,
    timing: StageTiming,
    depth_samples: u64,
    train_done: Option<Instant>,
    fault: Option<Fault>,
    watch: Option<std::sync::Arc<crate::watchdog::Watch>>,
    /// First non-finite loss noted on the device: step * LAYER_SLOTS + layer, or -1.
    first_bad: Option<Tensor>,
}

/// Layer indices a non-finite mark can hold (the last slot: "the whole stage").
const LAYER_SLOTS: i64 = 1 << 16;

type Handled = Result<Option<Message>, StageFailure>;

impl Stage {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        device: Device,
        blocks: Vec<HiddenBlock>,
        output: Option<OutputLayer>,
        training: Training,
        threads: usize,
        check_finite_every: u64,
        reports: Sender<Report>,
        checkpoints: Sender<CheckpointPart>,
        fault: Option<Fault>,
    ) -> Self {
        Self {
            index,
            device,
            blocks,
            output,
            training,
            threads,
            check_finite_every,
            reports,
            checkpoints,
            timing: StageTiming::default(),
            depth_samples: 0,
            train_done: None,
            fault,
            watch: None,
            first_bad: None,
        }
    }

    /// The layer indices this stage holds (the output layer last, if here).
    pub fn layer_indices(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.blocks.iter().map(|b| b.index).collect();
        if let Some(o) = &self.output {
            v.push(o.index);
        }
        v
    }

    fn fail(&self, layer: Option<usize>, step: Option<u64>, reason: impl Into<String>) -> StageFailure {
        StageFailure { stage: self.index, layer, step, reason: reason.into() }
    }

    /// [`Stage::handle`], with the time it takes counted as busy.
    pub fn process(&mut self, msg: Message) -> Handled {
        let t = Instant::now();
        if let Some(w) = &self.watch {
            w.busy(self.index, msg.kind());
        }
        let handled = self.handle(msg);
        if let Some(w) = &self.watch {
            w.idle(self.index);
        }
        self.timing.busy += t.elapsed();
        handled
    }

    /// Lets a watchdog see when this stage is stuck on one message.
    pub fn watch(&mut self, watch: std::sync::Arc<crate::watchdog::Watch>) {
        self.watch = Some(watch);
    }

    /// Handles one message; returns what to pass on (None for the last stage's results).
    pub fn handle(&mut self, msg: Message) -> Handled {
        let is_last = self.output.is_some();
        match msg {
            Message::Train { epoch, step, input, targets } => {
                let x = input.to_device(self.device);
                let targets = targets.to_device(self.device);
                let out = if matches!(self.training, Training::Backprop | Training::LocalGlobal) {
                    self.train_global_step(&x, &targets, step)?
                } else {
                    self.train_local_step(x, &targets, step)?
                };
                self.timing.train_examples += targets.labels.size()[0] as u64;
                Ok((!is_last).then(|| Message::Train { epoch, step, input: out, targets }))
            }
            Message::Eval { set, index, input, labels } => {
                self.mark_train_done();
                let x = input.to_device(self.device);
                let out = self.guard(None, None, |s| {
                    let x = eval_blocks(&mut s.blocks, &x);
                    match &s.output {
                        Some(o) => o.forward(&x.to_device(o.device())),
                        None => x,
                    }
                })?;
                if is_last {
                    let labels = labels.to_device(out.device());
                    let wrong = out.argmax(1, false).ne_tensor(&labels).sum(Kind::Int64).int64_value(&[]);
                    let loss_sum =
                        out.cross_entropy_loss(&labels, None::<Tensor>, Reduction::Sum, -100, 0.0).double_value(&[]);
                    let _ = self.reports.send(Report::Eval { set, index, wrong, count: labels.size()[0], loss_sum });
                    Ok(None)
                } else {
                    Ok(Some(Message::Eval { set, index, input: out, labels }))
                }
            }
            Message::SetLr { lr } => {
                for b in &mut self.blocks {
                    b.optimizer.set_lr(lr);
                }
                if let Some(o) = &mut self.output {
                    o.optimizer.set_lr(lr);
                }
                Ok(Some(Message::SetLr { lr }))
            }
            Message::EpochEnd { epoch } => {
                self.read_first_bad()?; // nothing non-finite reaches an epoch's figures
                self.mark_train_done();
                self.report_epoch(epoch);
                Ok(Some(Message::EpochEnd { epoch }))
            }
            Message::Checkpoint { step, seq } => {
                self.read_first_bad()?; // nor a checkpoint
                let layers = self.snapshot();
                self.checkpoints
                    .send(CheckpointPart { seq, layers })
                    .map_err(|_| self.fail(None, Some(step), "the checkpoint writer is gone"))?;
                Ok(Some(Message::Checkpoint { step, seq }))
            }
            Message::Shutdown => Ok(Some(Message::Shutdown)),
        }
    }

    /// Copies of every layer's state, on the CPU, named by layer (`layer-NNN`, `output`).
    pub fn snapshot(&self) -> Vec<crate::checkpoint::LayerPart> {
        let copy = |named: Vec<layerwise_nn::Named>| named.into_iter().map(|(n, t)| (n, snapshot(&t))).collect();
        let mut parts: Vec<_> =
            self.blocks.iter().map(|b| (format!("layer-{:03}", b.index), copy(b.state()))).collect();
        if let Some(o) = &self.output {
            parts.push(("output".to_string(), copy(o.state())));
        }
        parts
    }

    fn mark_train_done(&mut self) {
        self.train_done.get_or_insert_with(Instant::now);
    }

    /// Runs `f` on this stage, turning a panic (libtorch errors, out of memory) into a failure.
    fn guard<T>(
        &mut self,
        layer: Option<usize>,
        step: Option<u64>,
        f: impl FnOnce(&mut Self) -> T,
    ) -> Result<T, StageFailure> {
        catch_unwind(AssertUnwindSafe(|| f(self))).map_err(|panic| {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into());
            let reason = reason.lines().next().unwrap_or("panicked").to_string();
            StageFailure { stage: self.index, layer, step, reason }
        })
    }

    fn inject(&self, layer: usize, step: u64, x: Tensor) -> Result<Tensor, StageFailure> {
        match self.fault {
            Some(f) if f.layer == layer && f.step == step => match f.kind {
                FaultKind::Error => Err(self.fail(Some(layer), Some(step), "injected error")),
                FaultKind::Panic => panic!("injected panic"),
                FaultKind::NonFinite => Ok(x * f64::NAN),
                FaultKind::Sleep(ms) => {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    Ok(x)
                }
                FaultKind::OutOfMemory => {
                    let huge = Tensor::f_empty([1 << 46], (Kind::Float, x.device())).map_err(|e| {
                        self.fail(
                            Some(layer),
                            Some(step),
                            format!("out of memory: {}", e.to_string().lines().next().unwrap_or("")),
                        )
                    })?;
                    Ok(x + huge.sum(Kind::Float))
                }
            },
            _ => Ok(x),
        }
    }

    /// Notes, on the device and without waiting for it, the first (step, layer) whose loss
    /// is not finite; reads that back every `check_finite_every` steps. So the failure names
    /// the exact step while a GPU stage synchronises only once per interval.
    fn check_finite(&mut self, loss: &Tensor, layer: Option<usize>, step: u64) -> Result<(), StageFailure> {
        if self.check_finite_every == 0 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let mark = step as i64 * LAYER_SLOTS + layer.map_or(LAYER_SLOTS - 1, |l| l as i64);
        let first = self.first_bad.get_or_insert_with(|| Tensor::from(-1i64).to_device(loss.device()));
        let keep = first.ge(0).logical_or(&loss.isfinite());
        *first = first.where_scalarother(&keep, mark);
        if step.is_multiple_of(self.check_finite_every) {
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
                Ok(s.output.as_mut().expect("checked").train_local(&x, &targets.labels).1)
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

    fn report_epoch(&mut self, epoch: usize) {
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
        let train_done = self.train_done.take().unwrap_or_else(Instant::now);
        let _ = self.reports.send(Report::EpochStats { epoch, stage: self.index, layers, output, timing, train_done });
    }

    /// The worker loop: until shutdown, or until a neighbour is gone, or a failure (reported
    /// to the coordinator; dropping the links then stops the other stages).
    pub fn run_loop(&mut self, input: Box<dyn LinkReceiver>, output: Option<Box<dyn LinkSender>>) {
        tch::set_num_threads(self.threads as i32);
        loop {
            let t0 = Instant::now();
            let depth = input.depth();
            let Ok(msg) = input.recv() else { return };
            let t1 = Instant::now();
            self.timing.wait_input += t1 - t0;
            self.timing.queue_depth += depth as f64;
            self.depth_samples += 1;
            let shutdown = matches!(msg, Message::Shutdown);
            // Layers' work is guarded where the layer is known; this catches the rest.
            let handled = self.guard(None, None, |s| s.process(msg)).and_then(|h| h);
            let t2 = Instant::now();
            match handled {
                Err(failure) => {
                    tracing::error!(stage = self.index, "{failure}");
                    let _ = self.reports.send(Report::Failed(failure));
                    return;
                }
                Ok(Some(next)) => {
                    if let Some(out) = &output {
                        if out.send(next).is_err() {
                            return;
                        }
                        self.timing.blocked_output += t2.elapsed();
                    }
                }
                Ok(None) => {}
            }
            if shutdown {
                return;
            }
        }
    }
}

/// Seconds of a duration, for reports.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
