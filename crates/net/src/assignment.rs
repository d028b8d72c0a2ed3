//! A worker's jobs: an assignment's stages started and run to their end, and the layer
//! timings a coordinator asks for, each in a thread of its own beside the control loop.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use layerwise_pipeline::link::{RemoteLinks, ReportSender};
use layerwise_pipeline::message::{Report, StageFailure};
use layerwise_pipeline::stage::StageEnv;
use layerwise_plan::checks::limits;
use layerwise_plan::{DataShape, DeviceId, Host, Machine, Placement, Plan, RunConfig};
use layerwise_rundir::checkpoint;

use crate::job::{JobLinks, Rendezvous, Sockets};
use crate::protocol::{say, Assignment, Control, RemoteReports, ToCoordinator};
use crate::wire::Auth;
use crate::{Error, Result};

/// A run's name: its folder's, the parent of its checkpoint folder.
pub(crate) fn run_name(checkpoints: &Path) -> String {
    checkpoints.parent().and_then(|d| d.file_name()).map_or("run".into(), |n| n.to_string_lossy().into_owned())
}

/// What every job on this worker shares: the secret, the data links that arrive, and the
/// folder its runs must lie in.
#[derive(Clone)]
pub(crate) struct Here {
    pub auth: Auth,
    pub incoming: Rendezvous,
    pub root: Option<PathBuf>,
}

/// `--run-root`, as the path its checks compare with (links resolved).
pub(crate) fn canonical_root(root: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(root).map_err(|e| Error::Config(format!("--run-root {}: {e}", root.display())))
}

/// Refuses an assignment's paths unless they are what a coordinator sends: an absolute
/// checkpoint folder with no `.` or `..` in it (inside `root` where the worker has one,
/// links resolved), and a resume point that is one `step-N` folder of it. A coordinator
/// that proves the secret still never makes a worker read or hash another file.
pub(crate) fn confine(checkpoints: &Path, resume: Option<&Path>, root: Option<&Path>) -> Result<()> {
    let refuse = |what: String| Err(Error::Config(format!("the assignment's {what}")));
    let plain = checkpoints.is_absolute()
        && checkpoints.components().skip(1).all(|c| matches!(c, Component::Normal(_)))
        && checkpoints.file_name().is_some_and(|n| n == "checkpoints");
    if !plain {
        return refuse(format!("checkpoint folder {} is not an absolute RUN/checkpoints", checkpoints.display()));
    }
    if let Some(root) = root {
        // The run directory as it resolves now (it may not exist yet on a first run).
        let run = checkpoints.parent().unwrap_or(checkpoints);
        let resolved = std::fs::canonicalize(run).unwrap_or_else(|_| run.to_path_buf());
        if !resolved.starts_with(root) {
            return refuse(format!("run directory {} is outside --run-root {}", resolved.display(), root.display()));
        }
    }
    if let Some(resume) = resume {
        let step = resume.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-"));
        let is_step = step.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
        if resume.parent() != Some(checkpoints) || !is_step {
            return refuse(format!(
                "resume point {} is not a step-N folder of {}",
                resume.display(),
                checkpoints.display()
            ));
        }
    }
    Ok(())
}

/// Refuses a job whose run directory this host does not see as the coordinator does (the
/// probe file the coordinator wrote there is missing or holds something else): its
/// checkpoint files would land where the coordinator never looks.
fn shares_run_directory(a: &Assignment, host: &str) -> Result<()> {
    let probe = crate::protocol::probe_file(&a.checkpoints, a.job);
    let mut seen = String::new();
    let read = std::fs::File::open(&probe)
        .and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, 256), &mut seen));
    if read.is_ok() && seen == a.probe {
        return Ok(());
    }
    let run = a.checkpoints.parent().unwrap_or(&a.checkpoints);
    Err(Error::Config(format!(
        "worker {host} does not see the run directory {} as the coordinator does ({} is {} here): every host needs the run directory on one shared filesystem, at the same path",
        run.display(),
        probe.display(),
        if read.is_ok() { "another file" } else { "missing" }
    )))
}

/// How one job on this worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Done,
    Failed,
}

pub(crate) struct Running {
    pub id: u64,
    pub sockets: Sockets,
    /// Set just before the job's thread tells the coordinator it finished: from then on
    /// the coordinator may send the next job, and the thread only has to return.
    pub told: Arc<AtomicBool>,
    pub thread: JoinHandle<Ended>,
}

impl Running {
    fn over(&self) -> bool {
        self.told.load(Ordering::SeqCst) || self.thread.is_finished()
    }
}

/// Takes a job that is over (how it ended), leaving one that runs; drops the links it
/// left unclaimed.
pub(crate) fn reap(running: &mut Option<Running>, incoming: &Rendezvous) -> Option<Ended> {
    let job = running.take_if(|j| j.over())?;
    let ended = job.thread.join().unwrap_or(Ended::Failed);
    incoming.forget(job.id);
    Some(ended)
}

/// Times the layers asked for, in a thread of its own, and answers request `request` on
/// `control` (refusing while job `busy` runs).
pub(crate) fn answer_measure(
    control: &Control,
    request: u64,
    busy: Option<u64>,
    config: RunConfig,
    shape: DataShape,
    device: DeviceId,
    threads: usize,
) {
    let answer = move |control: &Control, times| {
        say(control, &ToCoordinator::Measured { request, times });
    };
    let to = control.clone();
    let spawned = std::thread::Builder::new().name("measure".into()).spawn(move || {
        let times = match busy {
            Some(job) => Err(format!("busy with job {job:x}")),
            None => time_layers(&config, shape, device, threads).map_err(|e| e.to_string()),
        };
        answer(&to, times)
    });
    if let Err(e) = spawned {
        answer(control, Err(format!("cannot start a thread: {e}")));
    }
}

/// Starts assignment `a` in a thread of its own.
pub(crate) fn begin(a: Assignment, name: &str, links: (Here, Control)) -> Result<Running> {
    let (sockets, told) = (Sockets::default(), Arc::new(AtomicBool::new(false)));
    let (id, host) = (a.job, name.to_string());
    let (here, control) = links;
    let (s, t) = (sockets.clone(), told.clone());
    let thread = std::thread::Builder::new()
        .name(format!("job-{id:x}"))
        .spawn(move || run_assignment(a, &host, &here, s, control, &t))
        .map_err(|e| Error::Other(format!("cannot start a job: {e}")))?;
    Ok(Running { id, sockets, told, thread })
}

/// Runs this worker's stages of an assignment to their end; tells the coordinator.
fn run_assignment(
    a: Assignment,
    host: &str,
    here: &Here,
    sockets: Sockets,
    control: Control,
    told: &AtomicBool,
) -> Ended {
    let reports: Arc<dyn ReportSender> = Arc::new(RemoteReports { job: a.job, control: control.clone() });
    let mine: Vec<usize> = a.stages.iter().filter(|s| s.host.is_worker(host)).map(|s| s.index).collect();
    let _cudnn = layerwise_pipeline::cudnn::hold(a.config.train.deterministic);
    let started = start(&a, host, here, sockets.clone(), reports.clone());
    let ended = match started {
        Ok(threads) => {
            tracing::info!("job {:x}: running stage(s) {mine:?}", a.job);
            // A stage that ended otherwise than by a shutdown passing through saw its job fail.
            let clean = threads.into_iter().map(|t| t.join().unwrap_or(false)).filter(|ok| !ok).count() == 0;
            if !clean || sockets.aborted() {
                Ended::Failed
            } else {
                Ended::Done
            }
        }
        Err(e) => {
            let reason = format!("on worker {host}: {e}");
            tracing::error!("job {:x}: {reason}", a.job);
            let stage = mine.first().copied().unwrap_or(0);
            let _ = reports.send(Report::Failed(StageFailure { stage, layer: None, step: None, reason }));
            Ended::Failed
        }
    };
    let mut s = control.lock().unwrap_or_else(|p| p.into_inner());
    told.store(true, Ordering::SeqCst);
    let _ = s.frame(&ToCoordinator::Finished { job: a.job });
    ended
}

/// `config`'s net for data of `shape` on this machine, its placement left to the
/// coordinator.
fn unplaced(config: &RunConfig, machine: Machine, shape: DataShape) -> Result<Plan> {
    let mut config = config.clone();
    config.pipeline.placement = Placement::Single;
    config.pipeline.workers.clear();
    Ok(Plan::build_unplaced(&config, machine, shape)?)
}

/// Each layer's step time on `device` here with `threads` intra-op threads, for the
/// coordinator's `auto` placement.
fn time_layers(config: &RunConfig, shape: DataShape, device: DeviceId, threads: usize) -> Result<Vec<f64>> {
    let machine = Machine::detect();
    machine.check(device).map_err(Error::Config)?;
    let plan = unplaced(config, machine, shape)?;
    Ok(layerwise_pipeline::calibrate::layer_times(&plan, device, threads.clamp(1, limits::CPU_THREADS))?)
}

/// Starts this worker's stages of `a`: its plan checked (the coordinator's stages are
/// input like any other), the checkpoint to resume from verified, the job's links made.
fn start(
    a: &Assignment,
    host: &str,
    local: &Here,
    sockets: Sockets,
    reports: Arc<dyn ReportSender>,
) -> Result<Vec<JoinHandle<bool>>> {
    let here = Host::Worker(host.to_string());
    let plan = Plan::assigned(&a.config, Machine::detect(), a.shape, a.stages.clone(), &here)?;
    confine(&a.checkpoints, a.resume.as_deref(), local.root.as_deref())?;
    shares_run_directory(a, host)?;
    let resume = a.resume.as_deref().map(checkpoint::open).transpose()?;
    let run = run_name(&a.checkpoints);
    let links = JobLinks::new((a.job, &run), &plan, &local.auth, a.hosts.clone(), sockets, local.incoming.clone());
    let links: Arc<dyn RemoteLinks> = Arc::new(links);
    let plan = Arc::new(plan);
    let mut env = |_| StageEnv::new(a.checkpoints.clone(), resume.clone(), reports.clone());
    Ok(layerwise_pipeline::pipeline::spawn_stages(&plan, &here, None, &mut env, Some(links))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_names_only_its_run_checkpoints_and_one_step_of_them() {
        let ckpt = Path::new("/runs/job/checkpoints");
        assert!(confine(ckpt, None, None).is_ok());
        assert!(confine(ckpt, Some(&ckpt.join("step-0000000040")), None).is_ok());
        for resume in
            ["/dev/zero", "/runs/job/checkpoints/../../other/checkpoints/step-1", "/runs/job/checkpoints/step-"]
        {
            let e = confine(ckpt, Some(Path::new(resume)), None).unwrap_err().to_string();
            assert!(e.contains("is not a step-N folder of /runs/job/checkpoints"), "{resume}: {e}");
        }
        for bad in ["runs/job/checkpoints", "/runs/../etc/checkpoints", "/runs/job/elsewhere"] {
            let e = confine(Path::new(bad), None, None).unwrap_err().to_string();
            assert!(e.contains("is not an absolute RUN/checkpoints"), "{bad}: {e}");
        }
        let root = tempfile::tempdir().unwrap();
        let root = canonical_root(root.path()).unwrap();
        assert!(confine(&root.join("job/checkpoints"), None, Some(&root)).is_ok());
        let e = confine(ckpt, None, Some(&root)).unwrap_err().to_string();
        assert!(e.contains("is outside --run-root"), "{e}");
        // A link inside the root that leads out of it is resolved before the check.
        std::os::unix::fs::symlink("/tmp", root.join("out")).unwrap();
        let e = confine(&root.join("out/checkpoints"), None, Some(&root)).unwrap_err().to_string();
        assert!(e.contains("is outside --run-root"), "{e}");
    }
}
