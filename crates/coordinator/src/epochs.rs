//! The epoch loop: feeds stage 0 from the loader, sets the learning rate through the
//! stream, runs evaluation after each epoch's last training batch, inserts checkpoint
//! markers, and stops at a stop request with a checkpoint.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use layerwise_pipeline::loader::{EvalSource, Loaded};
use layerwise_pipeline::message::{unix_now, Control, EvalSet, Message};
use layerwise_pipeline::{Pipeline, Stopped};
use layerwise_plan::Plan;
use layerwise_rundir::checkpoint::{self, CoordinatorState, Manifest};
use layerwise_rundir::metrics::EpochMetrics;
use layerwise_rundir::{RunDir, RunState};

use crate::inbox::{log_epoch, Inbox};
use crate::options::RunOptions;
use crate::{Error, Result};

/// Where a run stands: what a checkpoint records of the coordinator.
pub struct Progress {
    pub step: u64,
    /// Next (epoch, batch index) to train on.
    pub position: (usize, usize),
    pub metrics: Vec<EpochMetrics>,
}

/// The epoch loop and what it needs.
pub struct EpochLoop<'a> {
    pub plan: &'a Plan,
    pub dir: &'a RunDir,
    pub batches: &'a Receiver<Loaded>,
    pub inbox: &'a mut Inbox,
    pub test: &'a mut EvalSource,
    pub validation: Option<&'a mut EvalSource>,
    pub steps: usize,
    /// Step of the last checkpoint taken (or resumed from).
    pub last_checkpoint: Option<u64>,
    pub seq: u64,
}

impl EpochLoop<'_> {
    /// Trains from `progress` to the end (Ok(false)) or to a stop request (Ok(true)).
    pub fn train(
        &mut self,
        pipeline: &mut Pipeline,
        progress: &mut Progress,
        options: &mut RunOptions,
    ) -> Result<bool> {
        let config = &self.plan.config;
        let (first_epoch, first_index) = progress.position;
        for epoch in first_epoch..=config.train.epochs {
            let lr = config.optim.lr_at_epoch(epoch);
            let start = unix_now();
            feed(pipeline, self.inbox, Message::control(Control::SetLr { lr }))?;
            let from = if epoch == first_epoch { first_index } else { 0 };
            let (mut data_wait, mut skipped) = (Duration::ZERO, 0u64);
            for index in from..self.steps {
                let waited = Instant::now();
                let batch = self
                    .batches
                    .recv()
                    .map_err(|_| Error::Other("the data loader stopped".into()))?
                    .map_err(|e| Error::Other(format!("the data loader failed at {e}")))?;
                data_wait += waited.elapsed();
                skipped += log_skipped(&batch.skipped, epoch, index);
                let (input, labels) = (batch.images, batch.labels);
                progress.step += 1;
                let step = progress.step;
                feed(pipeline, self.inbox, Message::with(Control::Train { epoch, step }, input, labels))?;
                progress.position = (epoch, index + 1);
                if let Some(f) = options.on_step.as_mut() {
                    f(epoch, index + 1, self.steps);
                }
                self.inbox.poll()?;
                let every = config.checkpoint.every_steps;
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
            let (sets_evaluated, eval_skipped) = self.evaluate(pipeline, epoch)?;
            skipped += eval_skipped;
            feed(pipeline, self.inbox, Message::control(Control::EpochEnd { epoch }))?;
            let mut metrics =
                self.inbox.collect_epoch(epoch, progress.step, lr, start, &self.plan.stages, sets_evaluated)?;
            metrics.data_wait_s = data_wait.as_secs_f64();
            metrics.skipped_images = skipped;
            if metrics.data_wait_s > 0.1 * metrics.train_seconds && metrics.data_wait_s > 0.5 {
                tracing::warn!(
                    epoch,
                    "the data stream cannot keep up: training waited {:.1} s for batches in {:.1} s of training; raise data.workers (a streamed set), data.prefetch, or simplify augmentation",
                    metrics.data_wait_s,
                    metrics.train_seconds
                );
            }
            log_epoch(&metrics);
            self.dir.append_metrics(&metrics)?;
            let error = metrics.validation_error.unwrap_or(metrics.test_error);
            progress.metrics.push(metrics);
            progress.position = (epoch + 1, 0);
            self.dir.set_status(RunState::Running, "", epoch, progress.step)?;
            let every = config.checkpoint.every_epochs;
            if (every > 0 && epoch % every == 0) || epoch == config.train.epochs {
                self.checkpoint(pipeline, progress, Some(error))?;
            }
        }
        Ok(false)
    }

    /// Feeds the held-out sets' batches; the last stage sums each set's batches and reports
    /// the set once, at the epoch's end. Returns (sets evaluated, images skipped).
    fn evaluate(&mut self, pipeline: &mut Pipeline, epoch: usize) -> Result<(usize, u64)> {
        let (mut sets_evaluated, mut skipped) = (0, 0);
        let sets = [(EvalSet::Test, Some(&mut *self.test)), (EvalSet::Validation, self.validation.as_deref_mut())];
        for (set, source) in sets {
            let Some(source) = source else { continue };
            for index in 0..source.batches {
                let b = source.source.batch(1, index)?;
                skipped += log_skipped(&b.skipped, epoch, index);
                feed(pipeline, self.inbox, Message::with(Control::Eval { set }, b.images, b.labels))?;
            }
            sets_evaluated += (source.batches > 0) as usize;
        }
        Ok((sets_evaluated, skipped))
    }

    /// Begins a checkpoint after the current step and sends its marker down the pipeline;
    /// each stage writes its layers as the marker passes.
    fn checkpoint(&mut self, pipeline: &mut Pipeline, progress: &Progress, error: Option<f64>) -> Result<()> {
        if self.last_checkpoint == Some(progress.step) && error.is_none() {
            return Ok(()); // this cut exists already
        }
        self.seq += 1;
        let config = &self.plan.config;
        let coordinator =
            CoordinatorState { step: progress.step, position: progress.position, metrics: progress.metrics.clone() };
        let manifest = Manifest {
            format_version: checkpoint::FORMAT_VERSION,
            step: progress.step,
            epoch: if progress.position.1 == 0 { progress.position.0 - 1 } else { progress.position.0 },
            position: progress.position,
            epochs_done: progress.metrics.len(),
            config_hash: checkpoint::config_hash(config),
            model: config.model.clone(),
            dataset: config.data.dataset,
            error,
            files: vec![],
            created: unix_now(),
        };
        self.inbox.cuts.begin(self.seq, coordinator, manifest)?;
        feed(pipeline, self.inbox, Message::control(Control::Checkpoint { step: progress.step, seq: self.seq }))?;
        self.last_checkpoint = Some(progress.step);
        Ok(())
    }
}

/// Logs the images a batch left out as unreadable; returns how many.
fn log_skipped(skipped: &[String], epoch: usize, index: usize) -> u64 {
    for what in skipped {
        tracing::warn!(epoch, batch = index, "skipped an unreadable image: {what}");
    }
    skipped.len() as u64
}

/// Hands `msg` to the pipeline; when the pipeline has come apart, the error is the failure
/// a stage reported (which the inbox has, or will have).
fn feed(pipeline: &mut Pipeline, inbox: &mut Inbox, msg: Message) -> Result<()> {
    pipeline.feed(msg).map_err(|stopped| match stopped {
        Stopped::Closed => inbox.first_failure(),
        Stopped::Failed(f) => Error::Stage(f),
    })
}
