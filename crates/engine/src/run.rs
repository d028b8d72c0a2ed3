//! One training job, from plan to final checkpoint: resume point, data, stages, the epoch
//! loop, and the run directory's status. How a run flows:
//! `plan.rs` (config -> validated plan) -> `run.rs` (this) -> `loader.rs` (batches) ->
//! `pipeline.rs` (stages started and linked) -> `stage.rs` (each stage's loop) ->
//! `inbox.rs` (reports -> metrics, `cut.rs` -> checkpoints).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use layerwise_nn::Named;

use crate::checkpoint::{self, Verified};
use crate::config::{PipelineMode, RunConfig};
use crate::cut::Cuts;
use crate::inbox::Inbox;
use crate::loader;
use crate::metrics::EpochMetrics;
use crate::pipeline::{report_link, Pipeline};
use crate::placement::StagePlan;
use crate::plan::{Machine, Plan};
use crate::rundir::{RunDir, RunState};
use crate::stage::StageEnv;
use crate::training::{Progress, Training};
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
    /// Inject a fault into a layer at a step (failure-handling tests; test build only).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<crate::fault::Fault>,
    /// Called after every training batch is handed to stage 0: (epoch, step in epoch, steps in epoch).
    pub on_step: Option<StepHook>,
    /// The coordinator's workers, for a plan that places stages on them.
    pub cluster: Option<Arc<crate::net::cluster::Cluster>>,
}

/// What a finished (or stopped) run gives back.
#[derive(Debug)]
pub struct RunSummary {
    /// Metrics of every completed epoch, those before a resume included.
    pub epochs: Vec<EpochMetrics>,
    pub plan: Vec<StagePlan>,
    pub parameter_count: i64,
    /// Steps taken in all.
    pub step: u64,
    /// Stopped early, with a checkpoint, by `stop` or `stop_after_step`.
    pub stopped: bool,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The run's final state: its last checkpoint.
    pub checkpoint: PathBuf,
}

impl RunSummary {
    /// Every layer's final state (`layers.{i}.*`, `output.*`), read from the last checkpoint.
    pub fn state(&self) -> Result<Vec<Named>> {
        checkpoint::open(&self.checkpoint)?.model_tensors()
    }
}

/// Runs one training job in `run_dir` on this machine (see [`run_plan`]).
pub fn run(config: &RunConfig, run_dir: &Path, options: RunOptions) -> Result<RunSummary> {
    run_plan(Plan::build(config, Machine::detect())?, run_dir, options)
}

/// Runs a planned job in `run_dir` and records its status there.
pub fn run_plan(plan: Plan, run_dir: &Path, options: RunOptions) -> Result<RunSummary> {
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
    match run_inner(plan, &dir, options) {
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
            // Partial checkpoints go first: on a full disk they free the room that the
            // failed state needs.
            checkpoint::remove_partials(&checkpoints_root);
            let (epoch, step) = dir.status().map_or((0, 0), |s| (s.epoch, s.step));
            if let Err(w) = dir.set_status(RunState::Failed, &e.to_string(), epoch, step) {
                tracing::error!("cannot record the failure in {}: {w}", dir.path.display());
            }
            Err(e)
        }
    }
}

/// The checkpoint to resume from (checked against the config), and where it leaves the run.
fn resume_point(plan: &Plan, dir: &RunDir, resume: bool) -> Result<(Option<Verified>, Progress)> {
    let root = dir.path.join("checkpoints");
    let fresh = Progress { step: 0, position: (1, 0), metrics: vec![] };
    if !resume {
        return Ok((None, fresh));
    }
    let Some(v) = checkpoint::latest(&root) else {
        tracing::info!("no checkpoint in {}: starting from the beginning", root.display());
        dir.rewrite_metrics(&[])?; // lines of a run that left no checkpoint are not this run's
        return Ok((None, fresh));
    };
    checkpoint::check_compatible(&v.manifest, &plan.config, &v.dir)?;
    tracing::info!(step = v.manifest.step, "resuming from {}", v.dir.display());
    let c = &v.coordinator;
    let progress = Progress { step: c.step, position: c.position, metrics: c.metrics.clone() };
    dir.rewrite_metrics(&progress.metrics)?;
    Ok((Some(v), progress))
}

fn run_inner(mut plan: Plan, dir: &RunDir, mut options: RunOptions) -> Result<RunSummary> {
    // Test build only: a panic in the setup of the run whose folder is named so.
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("LAYERWISE_TEST_SETUP_PANIC").is_some_and(|n| dir.path.file_name() == Some(&n)) {
        panic!("injected panic in the setup of {}", dir.path.display());
    }
    let _cudnn = crate::cudnn::hold(plan.config.train.deterministic);
    if plan.config.pipeline.mode == PipelineMode::Pipelined {
        // The stages compute; this thread only loads, feeds and collects. One intra-op
        // thread keeps it from holding an OpenMP team of its own: with more OpenMP threads
        // alive than cores, libgomp stops spinning between parallel regions, and a
        // one-stage pipeline ran at 0.75x of sequential for that alone.
        crate::set_thread_count(1);
    }
    let (resumed, mut progress) = resume_point(&plan, dir, options.resume)?;
    dir.write_config(&plan.config)?;
    let mut data = loader::load(&plan)?;
    plan.measure_placement()?;
    if !plan.config.pipeline.workers.is_empty() {
        let names = plan.config.pipeline.workers.clone();
        let cluster = options.cluster.as_ref().ok_or_else(|| {
            EngineError::Config(format!(
                "pipeline.workers names workers {names:?}, but this process does not listen for workers (serve: start it with --listen)"
            ))
        })?;
        let stop = options.stop.as_deref();
        let workers = cluster.wait_for(&names, stop)?;
        let offered: Vec<(String, Vec<_>)> = workers.iter().map(|w| (w.name.clone(), w.devices.clone())).collect();
        let asking = plan.clone();
        let processes = crate::net::cluster::processes(&plan, &workers);
        plan.place_over_workers(&offered, &processes, |asks| cluster.measure(asks, &asking, stop))?;
        plan.check_memory(None)?; // this process's share (each worker's is checked before it is sent anything)
    }
    if let (Some(cluster), false) = (&options.cluster, plan.workers().is_empty()) {
        cluster.share_threads(&mut plan, options.stop.as_deref())?;
    }
    let plan = Arc::new(plan);
    let config = &plan.config;
    tracing::info!(
        parameters = plan.arch.parameter_count(config.model.batch_norm),
        stages = plan.stages.len(),
        "model {} ({:?}, {:?}) on {} stage(s): {}",
        config.model.arch,
        config.model.training,
        config.model.loss,
        plan.stages.len(),
        plan.stages
            .iter()
            .map(|p| format!("{:?}@{}x{}", p.layers, p.device(), p.threads))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let checkpoints = dir.path.join("checkpoints");
    let (report_tx, reports) = crossbeam_channel::unbounded();
    let mut inbox = Inbox::new(reports, Cuts::new(checkpoints.clone(), config.checkpoint.keep, plan.stages.len()));
    let remote = match (&options.cluster, plan.workers().is_empty()) {
        (_, true) => None,
        (Some(cluster), false) => {
            let resume = resumed.as_ref().map(|v| v.dir.as_path());
            Some(cluster.start_job(&plan, &checkpoints, resume, &report_tx, options.stop.as_deref())?)
        }
        (None, false) => {
            return Err(EngineError::Config(format!(
                "pipeline.placement places stages on workers {:?}, but this process does not listen for workers (serve: start it with --listen)",
                plan.workers()
            )))
        }
    };
    let watch = crate::watchdog::Watch::new(plan.stages.len());
    let stage_layers = plan.stages.iter().map(|s| s.layers.clone()).collect();
    let stall = Duration::from_secs_f64(config.train.stall_warning_s);
    let _watchdog = crate::watchdog::Watchdog::spawn(watch.clone(), stall, stage_layers);
    let env = |_| StageEnv {
        checkpoints: checkpoints.clone(),
        resume: resumed.clone(),
        reports: report_link(&report_tx),
        #[cfg(feature = "fault-injection")]
        fault: options.fault,
        watch: Some(watch.clone()),
    };
    let mut pipeline = match Pipeline::start(&plan, env, remote.as_ref().map(|r| r.net.clone())) {
        Ok(p) => p,
        Err(e) => {
            if let Some(r) = remote {
                r.abort(&e.to_string());
                r.finish();
            }
            return Err(e);
        }
    };
    drop(report_tx); // the stages hold the only senders: a closed inbox means they are gone

    let batches_per_epoch = data.train.batches_per_epoch();
    let steps = config.train.steps_per_epoch.map_or(batches_per_epoch, |s| s.min(batches_per_epoch));
    let stream = loader::Stream {
        start: progress.position,
        epochs: config.train.epochs,
        steps,
        prefetch: config.data.prefetch,
        device: plan.stages[0].device().tch(),
    };
    let (batches, loader) = loader::spawn(data.train, stream)?;
    let mut training = Training {
        plan: &plan,
        dir,
        batches: &batches,
        inbox: &mut inbox,
        test: &mut data.test,
        validation: data.validation.as_mut(),
        steps,
        last_checkpoint: resumed.as_ref().map(|v| v.manifest.step),
        seq: 0,
    };
    let result = training.train(&mut pipeline, &mut progress, &mut options);
    if let (Err(e), Some(r)) = (&result, &remote) {
        r.abort(&e.to_string()); // no stage anywhere stays blocked on a link of this job
    }
    drop(batches);
    pipeline.finish();
    let _ = loader.join();
    let written = inbox.drain();
    if let Some(r) = remote {
        r.finish();
    }
    let stopped = result?;
    let last = written?;
    let expected = checkpoints.join(checkpoint::step_dir_name(progress.step));
    // A run resumed at its very end takes no new checkpoint: the one it resumed from is final.
    let last = last.or_else(|| resumed.as_ref().map(|v| v.dir.clone()));
    let checkpoint = last.filter(|d| *d == expected).ok_or_else(|| {
        EngineError::Other(format!("the final checkpoint {} could not be written (see the log)", expected.display()))
    })?;
    Ok(RunSummary {
        epochs: progress.metrics,
        plan: plan.stages.clone(),
        parameter_count: plan.arch.parameter_count(plan.config.model.batch_norm),
        step: progress.step,
        stopped,
        resumed_from: resumed.map(|v| v.dir),
        checkpoint,
    })
}
