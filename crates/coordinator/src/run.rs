//! One training job, from plan to final checkpoint, as a sequence of steps: the resume
//! point, the data, the placement (measured; over workers too), the stages started here
//! and on workers, the epoch loop, teardown, and the run directory's status.
//! How a run flows, crate by crate: `plan` (config -> validated plan) -> `coordinator`
//! (this) -> `pipeline` (loader, stages linked, each stage's loop; `net` for links between
//! processes) -> reports back here (`inbox`: metrics, `cut`: checkpoints) -> `rundir`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use layerwise_net::remote_job::{processes, share_threads_with};
use layerwise_net::{RemoteJob, WorkerConn};
use layerwise_pipeline::link::RemoteLinks;
use layerwise_pipeline::loader::{self, Data};
use layerwise_pipeline::message::Report;
use layerwise_pipeline::pipeline::report_link;
use layerwise_pipeline::stage::StageEnv;
use layerwise_pipeline::thread::set_thread_count;
use layerwise_pipeline::watchdog::{Watch, Watchdog};
use layerwise_pipeline::{cudnn, Pipeline};
use layerwise_plan::{Host, Machine, PipelineMode, Plan, RunConfig};
use layerwise_rundir::checkpoint::{self, Verified};
use layerwise_rundir::{RunDir, RunState};

use crate::cut::{parts_of, Cuts};
use crate::epochs::{EpochLoop, Progress};
use crate::inbox::Inbox;
use crate::options::{RunOptions, RunSummary};
use crate::place;
use crate::{Error, Result};

/// Runs one training job in `run_dir` on this machine (see [`run_plan`]).
pub fn run(config: &RunConfig, run_dir: &Path, options: RunOptions) -> Result<RunSummary> {
    run_plan(Plan::build(config, Machine::detect())?, run_dir, options)
}

/// Runs a planned job in `run_dir` and records its status there.
pub fn run_plan(plan: Plan, run_dir: &Path, options: RunOptions) -> Result<RunSummary> {
    // Refused before anything is written, so that the earlier run's files stay as they are.
    let checkpoints_root = run_dir.join("checkpoints");
    if !options.resume && !checkpoint::list(&checkpoints_root).is_empty() {
        return Err(Error::Config(format!(
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
    #[cfg(feature = "fault-injection")]
    injected_setup_panic(dir);
    let _cudnn = cudnn::hold(plan.config.train.deterministic);
    if plan.config.pipeline.mode == PipelineMode::Pipelined {
        // The stages compute; this thread only loads, feeds and collects. One intra-op
        // thread keeps it from holding an OpenMP team of its own: with more OpenMP threads
        // alive than cores, libgomp stops spinning between parallel regions, and a
        // one-stage pipeline ran at 0.75x of sequential for that alone.
        set_thread_count(1);
    }
    let (resumed, mut progress) = resume_point(&plan, dir, options.resume)?;
    dir.write_config(&plan.config)?;
    let data = loader::load(&plan)?;
    let workers = place(&mut plan, &options)?;
    let plan = Arc::new(plan);
    log_placement(&plan);
    let checkpoints = dir.path.join("checkpoints");
    let (report_tx, reports) = crossbeam_channel::unbounded();
    let cuts = Cuts::new(checkpoints.clone(), plan.config.checkpoint.keep, parts_of(&plan));
    let mut inbox = Inbox::new(reports, cuts);
    let remote = start_on_workers(&plan, &options, &workers, &checkpoints, resumed.as_ref(), &report_tx)?;
    let watch = Watch::new(plan.stages.len());
    let stall = Duration::from_secs_f64(plan.config.train.stall_warning_s);
    let _watchdog = Watchdog::spawn(watch.clone(), stall, plan.stages.iter().map(|s| s.layers.clone()).collect());
    let env = |_| {
        let mut env = StageEnv::new(checkpoints.clone(), resumed.clone(), report_link(&report_tx));
        env.watch = Some(watch.clone());
        #[cfg(feature = "fault-injection")]
        {
            env.fault = options.fault;
        }
        env
    };
    let links = remote.as_ref().map(|r| r.links.clone() as Arc<dyn RemoteLinks>);
    let mut pipeline = match Pipeline::start(&plan, env, links) {
        Ok(p) => p,
        Err(e) => {
            if let Some(r) = remote {
                r.abort(&e.to_string()); // the workers' stages stop too, and are waited for
                r.finish();
            }
            return Err(e.into());
        }
    };
    drop(report_tx); // the stages hold the only senders: a closed inbox means they are gone
    let result = train(&plan, dir, data, &mut pipeline, &mut inbox, &mut progress, &mut options, &resumed);
    if let (Err(e), Some(r)) = (&result, &remote) {
        r.abort(&e.to_string()); // no stage anywhere stays blocked on a link of this job
    }
    pipeline.finish();
    let written = inbox.drain();
    if let Some(r) = remote {
        r.finish();
    }
    let stopped = result?;
    let checkpoint = final_checkpoint(&checkpoints, progress.step, written?, resumed.as_ref(), &inbox.cuts)?;
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

/// Test build only: a panic in the setup of the run whose folder is named so.
#[cfg(feature = "fault-injection")]
fn injected_setup_panic(dir: &RunDir) {
    if std::env::var_os("LAYERWISE_TEST_SETUP_PANIC").is_some_and(|n| dir.path.file_name() == Some(&n)) {
        panic!("injected panic in the setup of {}", dir.path.display());
    }
}

/// Places the layers for good: an `auto` placement of this process by measurement; over
/// `pipeline.workers`, by each host's measurement once they have registered; stages on
/// workers with their threads shared by machine. Returns the workers the run uses (waited
/// for here, once).
fn place(plan: &mut Plan, options: &RunOptions) -> Result<Vec<Arc<WorkerConn>>> {
    place::by_measurement(plan)?;
    let wanted: Vec<String> = plan.workers_wanted().into_iter().collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let Some(cluster) = options.cluster.as_ref() else {
        return Err(Error::Config(format!(
            "the config places stages on workers {wanted:?} (pipeline.placement or pipeline.workers), but this process does not listen for workers (serve: start it with --listen)"
        )));
    };
    let stop = options.stop.as_deref();
    let workers = cluster.wait_for(&wanted, stop)?;
    if !plan.config.pipeline.workers.is_empty() {
        let offered: Vec<(String, Vec<_>)> = workers.iter().map(|w| (w.name.clone(), w.devices.clone())).collect();
        let asking = plan.clone();
        let processes = processes(plan, &workers);
        let measure = |asks: &[_]| Ok(cluster.ask_layer_times(asks, &asking, &workers, stop)?);
        place::over_workers(plan, &offered, &processes, measure)?;
        plan.check_memory(&Host::Coordinator)?; // each worker's share is checked before it is sent anything
    }
    let used = plan.workers();
    let workers: Vec<Arc<WorkerConn>> = workers.into_iter().filter(|w| used.contains(&w.name)).collect();
    share_threads_with(plan, &workers);
    Ok(workers)
}

fn log_placement(plan: &Plan) {
    let config = &plan.config;
    let stages: Vec<String> =
        plan.stages.iter().map(|p| format!("{:?}@{}x{}", p.layers, p.device(), p.threads)).collect();
    tracing::info!(
        parameters = plan.arch.parameter_count(config.model.batch_norm),
        stages = plan.stages.len(),
        "model {} ({:?}, {:?}) on {} stage(s): {}",
        config.model.arch,
        config.model.training,
        config.model.loss,
        plan.stages.len(),
        stages.join(" ")
    );
}

/// Hands each worker its stages, when the plan places any on workers.
fn start_on_workers(
    plan: &Plan,
    options: &RunOptions,
    workers: &[Arc<WorkerConn>],
    checkpoints: &Path,
    resumed: Option<&Verified>,
    reports: &Sender<Report>,
) -> Result<Option<RemoteJob>> {
    let Some(cluster) = options.cluster.as_ref().filter(|_| !workers.is_empty()) else { return Ok(None) };
    let resume = resumed.map(|v| v.dir.as_path());
    Ok(Some(cluster.start_job(plan, workers, checkpoints, resume, reports)?))
}

/// The epoch loop, fed by the loader thread from where the run stands.
#[allow(clippy::too_many_arguments)]
fn train(
    plan: &Plan,
    dir: &RunDir,
    data: Data,
    pipeline: &mut Pipeline,
    inbox: &mut Inbox,
    progress: &mut Progress,
    options: &mut RunOptions,
    resumed: &Option<Verified>,
) -> Result<bool> {
    let config = &plan.config;
    let Data { train, mut test, mut validation } = data;
    let batches_per_epoch = train.batches_per_epoch();
    let steps = config.train.steps_per_epoch.map_or(batches_per_epoch, |s| s.min(batches_per_epoch));
    let stream = loader::Stream {
        start: progress.position,
        epochs: config.train.epochs,
        steps,
        prefetch: config.data.prefetch_batches(config.train.batch_size),
        device: plan.stages[0].device().tch(),
    };
    let (batches, loader) = loader::spawn(train, stream)?;
    let mut epochs = EpochLoop {
        plan,
        dir,
        batches: &batches,
        inbox,
        test: &mut test,
        validation: validation.as_mut(),
        steps,
        last_checkpoint: resumed.as_ref().map(|v| v.manifest.step),
        seq: 0,
    };
    let result = epochs.train(pipeline, progress, options);
    drop(batches);
    let _ = loader.join();
    result
}

/// The run's final checkpoint: the one taken at its last step (`written`, the newest this
/// run completed, or the one it resumed from, when it resumed at its very end). When it
/// could not be written, the error says why.
fn final_checkpoint(
    checkpoints: &Path,
    step: u64,
    written: Option<PathBuf>,
    resumed: Option<&Verified>,
    cuts: &Cuts,
) -> Result<PathBuf> {
    let expected = checkpoints.join(checkpoint::step_dir_name(step));
    let last = written.or_else(|| resumed.map(|v| v.dir.clone()));
    last.filter(|d| *d == expected).ok_or_else(|| {
        let why = cuts.last_failure.as_deref().unwrap_or("no stage reported writing it");
        Error::Other(format!("the final checkpoint {} could not be written: {why}", expected.display()))
    })
}
