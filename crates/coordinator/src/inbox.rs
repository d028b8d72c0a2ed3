//! The coordinator's inbox: every stage's reports arrive here. Checkpoint parts complete
//! their cuts as they come; a failure ends the run; evaluation counts and epoch statistics
//! become one [`EpochMetrics`] per epoch, logged and written to `metrics.jsonl`.

use std::collections::VecDeque;
use std::path::PathBuf;

use crossbeam_channel::Receiver;

use layerwise_pipeline::message::{unix_now, EpochStats, EvalSet, LayerReport, Report, StageFailure, StageTiming};
use layerwise_plan::{DeviceId, StagePlan};
use layerwise_rundir::metrics::{EpochMetrics, LayerMetrics, StageMetrics};

use crate::cut::Cuts;
use crate::{Error, Result};

/// Epoch figures held at most: a run's stages send one a stage each epoch and one an
/// evaluation batch, far fewer.
pub const HELD_MAX: usize = 1 << 16;

pub struct Inbox {
    rx: Receiver<Report>,
    pub cuts: Cuts,
    /// Epoch figures that arrived while the coordinator was doing something else.
    held: VecDeque<Report>,
}

impl Inbox {
    pub fn new(rx: Receiver<Report>, cuts: Cuts) -> Self {
        Self { rx, cuts, held: VecDeque::new() }
    }

    /// Takes what has arrived, without waiting: completes checkpoints, fails on a failure.
    pub fn poll(&mut self) -> Result<()> {
        while let Ok(r) = self.rx.try_recv() {
            self.take(r)?;
        }
        Ok(())
    }

    fn take(&mut self, report: Report) -> Result<()> {
        match report {
            Report::CheckpointPart { seq, stage, files } => {
                match self.cuts.part(seq, stage, files) {
                    Some(Ok(dir)) => tracing::info!("checkpoint written: {}", dir.display()),
                    Some(Err(e)) => {
                        tracing::error!("checkpoint failed (training goes on; the previous one stays): {e}")
                    }
                    None => {}
                }
                Ok(())
            }
            Report::Failed(f) => Err(Error::Stage(f)),
            _ if self.held.len() >= HELD_MAX => Err(Error::Other(format!(
                "{HELD_MAX} reports arrived unasked for: more than a run sends (a stage or a worker floods them)"
            ))),
            other => {
                self.held.push_back(other);
                Ok(())
            }
        }
    }

    /// The failure a stage reported, once the pipeline has come apart.
    pub fn first_failure(&mut self) -> Error {
        loop {
            match self.rx.recv() {
                Ok(r) => {
                    if let Err(e) = self.take(r) {
                        return e;
                    }
                }
                Err(_) => return Error::Other("the pipeline stopped without saying why".into()),
            }
        }
    }

    /// Waits until every checkpoint begun is complete or can no longer complete; returns
    /// the newest checkpoint written.
    pub fn drain(&mut self) -> Result<Option<PathBuf>> {
        while self.cuts.pending() > 0 {
            match self.rx.recv() {
                Ok(r) => self.take(r)?,
                Err(_) => {
                    for e in self.cuts.abandon() {
                        tracing::error!("{e}");
                    }
                }
            }
        }
        Ok(self.cuts.last_written.clone())
    }

    fn next(&mut self, step: u64) -> Result<Report> {
        if let Some(r) = self.held.pop_front() {
            return Ok(r);
        }
        loop {
            let r = self.rx.recv().map_err(|_| {
                Error::Stage(StageFailure {
                    stage: 0,
                    layer: None,
                    step: Some(step),
                    reason: "pipeline stopped".into(),
                })
            })?;
            match r {
                Report::Eval { .. } | Report::EpochStats(_) => return Ok(r),
                other => self.take(other)?,
            }
        }
    }

    /// Waits for every stage's end-of-epoch report and the evaluation of each of the
    /// `eval_sets` sets evaluated (the last stage reports one a set).
    /// `start` is when the epoch began (seconds since the Unix epoch).
    pub fn collect_epoch(
        &mut self,
        epoch: usize,
        step: u64,
        lr: f64,
        start: f64,
        stages: &[StagePlan],
        eval_sets: usize,
    ) -> Result<EpochMetrics> {
        let (mut stats, mut evals): (Vec<EpochStats>, Vec<Report>) = (Vec::new(), Vec::new());
        while stats.len() < stages.len() || evals.len() < eval_sets {
            match self.next(step)? {
                // A stage number from another process is checked before it indexes anything.
                Report::EpochStats(s) if s.stage >= stages.len() || stats.iter().any(|o| o.stage == s.stage) => {
                    return Err(Error::Other(format!(
                        "epoch {epoch}: a report for stage {} of a run of {} stages, or its second",
                        s.stage,
                        stages.len()
                    )))
                }
                Report::EpochStats(s) => stats.push(s),
                r => evals.push(r),
            }
        }
        let wall = unix_now() - start;
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
        let mut stage_metrics = Vec::new();
        let (mut train_loss, mut train_error, mut train_done) = (f64::NAN, f64::NAN, start);
        let mut train_examples = 0;
        for s in &stats {
            layers.extend(s.layers.iter().map(|l| layer_metrics(l, s.stage)));
            let p = &stages[s.stage];
            let mut m = stage_metrics_of(s.stage, p.device(), p.layers.clone(), &s.timing, wall);
            m.host = match &p.host {
                layerwise_plan::Host::Coordinator => "coordinator".into(),
                layerwise_plan::Host::Worker(name) => name.clone(),
            };
            stage_metrics.push(m);
            if let Some((loss, err)) = s.output {
                train_loss = loss;
                train_error = err;
                train_done = s.train_done;
                train_examples = s.timing.train_examples;
            }
        }
        layers.sort_by_key(|l| l.layer);
        stage_metrics.sort_by_key(|s| s.stage);
        let train_seconds = (train_done - start).max(0.0);
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
            skipped_images: 0,
            train_seconds,
            epoch_seconds: wall,
            layers,
            stages: stage_metrics,
        })
    }
}

/// A layer's line of the epoch's metrics, from its stage's report.
fn layer_metrics(r: &LayerReport, stage: usize) -> LayerMetrics {
    LayerMetrics {
        layer: r.layer,
        stage,
        loss_pred: r.loss_pred,
        loss_sim: r.loss_sim,
        error: r.error.is_finite().then_some(r.error),
    }
}

/// A stage's line of the epoch's metrics: where its time went over the epoch's `wall` seconds.
fn stage_metrics_of(stage: usize, device: DeviceId, layers: Vec<usize>, t: &StageTiming, wall: f64) -> StageMetrics {
    let busy = t.busy.as_secs_f64();
    StageMetrics {
        stage,
        host: String::new(),
        device,
        layers,
        busy_s: busy,
        wait_input_s: t.wait_input.as_secs_f64(),
        blocked_output_s: t.blocked_output.as_secs_f64(),
        utilisation: if wall > 0.0 { busy / wall } else { 0.0 },
        queue_depth: t.queue_depth,
        images_per_sec: if busy > 0.0 { t.train_examples as f64 / busy } else { 0.0 },
    }
}

pub fn log_epoch(m: &EpochMetrics) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_pipeline::message::StageTiming;
    use layerwise_plan::placement::one_layer_each;
    use layerwise_plan::Host;

    fn stats(stage: usize) -> Report {
        let timing = StageTiming::default();
        Report::EpochStats(EpochStats { epoch: 1, stage, layers: vec![], output: None, timing, train_done: 0.0 })
    }

    #[test]
    fn reports_beyond_what_a_run_sends_fail_it_instead_of_piling_up() {
        let root = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut inbox = Inbox::new(rx, Cuts::new(root.path().to_path_buf(), 1, vec![vec![]; 2]));
        (0..HELD_MAX).for_each(|_| tx.send(stats(0)).unwrap());
        inbox.poll().unwrap();
        tx.send(stats(0)).unwrap();
        let e = inbox.poll().unwrap_err().to_string();
        assert!(e.contains("65536 reports arrived unasked for"), "{e}");
    }

    /// Stage numbers come from other processes: one out of range, or one reported twice, is
    /// an error naming it, never an index out of bounds in the coordinator.
    #[test]
    fn an_epoch_report_for_a_stage_that_is_not_there_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let stages = one_layer_each(&[(Host::Coordinator, DeviceId::Cpu), (Host::Coordinator, DeviceId::Cpu)]);
        for reports in [vec![stats(0), stats(7)], vec![stats(1), stats(1)]] {
            let (tx, rx) = crossbeam_channel::unbounded();
            let mut inbox = Inbox::new(rx, Cuts::new(root.path().to_path_buf(), 1, vec![vec![]; 2]));
            reports.into_iter().for_each(|r| tx.send(r).unwrap());
            let e = inbox.collect_epoch(1, 10, 1e-3, 0.0, &stages, 0).unwrap_err().to_string();
            assert!(e.contains("a report for stage") && e.contains("of a run of 2 stages"), "{e}");
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut inbox = Inbox::new(rx, Cuts::new(root.path().to_path_buf(), 1, vec![vec![]; 2]));
        [stats(1), stats(0)].into_iter().for_each(|r| tx.send(r).unwrap());
        let m = inbox.collect_epoch(1, 10, 1e-3, 0.0, &stages, 0).unwrap();
        assert_eq!(m.stages.iter().map(|s| s.stage).collect::<Vec<_>>(), vec![0, 1]);
    }
}
