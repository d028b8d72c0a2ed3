//! The worker's side: register with the coordinator, run the stages each assignment places
//! here, and go back to waiting (or exit, when launched for one job). A coordinator that
//! is lost stops this worker's stages; the worker then registers again when it can.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use layerwise_pipeline::link::{RemoteLinks, ReportSender};
use layerwise_pipeline::message::{Report, StageFailure};
use layerwise_pipeline::stage::StageEnv;
use layerwise_plan::checks::{limits, worker_name};
use layerwise_plan::machine::{device_memory, machine_id};
use layerwise_plan::{DataShape, DeviceId, Host, Machine, Placement, Plan, RunConfig};
use layerwise_rundir::checkpoint;

use crate::job::{JobLinks, Rendezvous, Sockets};
use crate::protocol::{heartbeat, Assignment, RemoteReports, ToCoordinator, ToWorker, PEER_TIMEOUT};
use crate::wire::{self, Role, WireError};
use crate::{Error, Result};

pub struct WorkerOptions {
    /// The coordinator's HOST:PORT.
    pub coordinator: String,
    pub name: String,
    /// The devices offered (checked present).
    pub devices: Vec<DeviceId>,
    pub secret: Vec<u8>,
    /// Exit after one job (a rank launched by torchrun or Slurm).
    pub once: bool,
    /// Set from outside (a signal): stop waiting, abort a running job, return.
    pub stop: Arc<AtomicBool>,
}

/// A worker launched for one job gives up after this long without reaching its
/// coordinator (a rank 0 that failed to start must not leave the others waiting for good).
const ONCE_CONNECT_LIMIT: Duration = Duration::from_secs(300);

/// How one job on this worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Done,
    Failed,
}

struct Running {
    id: u64,
    sockets: Sockets,
    /// Set just before the job's thread tells the coordinator it finished: from then on
    /// the coordinator may send the next job, and the thread only has to return.
    told: Arc<AtomicBool>,
    thread: JoinHandle<Ended>,
}

impl Running {
    fn over(&self) -> bool {
        self.told.load(Ordering::SeqCst) || self.thread.is_finished()
    }
}

/// Takes a job that is over (how it ended), leaving one that runs; drops the links it
/// left unclaimed.
fn reap(running: &mut Option<Running>, incoming: &Rendezvous) -> Option<Ended> {
    let job = running.take_if(|j| j.over())?;
    let ended = job.thread.join().unwrap_or(Ended::Failed);
    incoming.forget(job.id);
    Some(ended)
}

/// Serves the coordinator until `stop` (or, with `once`, until one job has ended).
pub fn serve(options: WorkerOptions) -> Result<()> {
    let name = worker_name(&options.name).map_err(|e| Error::Config(format!("--name: {e}")))?;
    let coordinator = resolve(&options.coordinator)?;
    let secret = Arc::new(options.secret);
    let incoming = Rendezvous::default();
    let data_addr = listen_for_links(coordinator, &secret, &incoming)?;
    let role = Role::Worker {
        name: name.clone(),
        devices: options.devices.clone(),
        memory: options.devices.iter().map(|d| device_memory(*d)).collect(),
        cores: Machine::detect().cores,
        machine: machine_id(),
        data_addr,
    };
    let mut waited_since: Option<Instant> = None;
    let first_try = Instant::now();
    loop {
        if options.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let stream = match wire::connect(coordinator, &secret, role.clone()) {
            Ok(s) => s,
            Err(WireError::Io(e)) if options.once && first_try.elapsed() >= ONCE_CONNECT_LIMIT => {
                return Err(Error::Other(format!(
                    "coordinator {coordinator} not reachable for {} s: {e}",
                    ONCE_CONNECT_LIMIT.as_secs()
                )));
            }
            Err(WireError::Io(e)) => {
                // Not up yet, or restarting: try again; say so now and then.
                if waited_since.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::info!("worker {name}: coordinator {coordinator} not reachable ({e}); retrying");
                    waited_since = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e @ WireError::Denied(_)) => {
                return Err(Error::Other(format!("worker {name} refused the coordinator {coordinator}: {e}")))
            }
            Err(e) => return Err(Error::Other(format!("coordinator {coordinator} refused worker {name}: {e}"))),
        };
        waited_since = None;
        tracing::info!("worker {name}: registered with {coordinator}; links on {data_addr}");
        let outcome = session(&name, stream, &secret, &incoming, &options.stop, options.once)?;
        match outcome {
            Some(Ended::Done) if options.once => return Ok(()),
            Some(Ended::Failed) if options.once => {
                return Err(Error::Other("the job failed (see the coordinator's log)".into()))
            }
            None if options.once => return Err(Error::Other(format!("lost the coordinator {coordinator}"))),
            _ => tracing::info!("worker {name}: waiting for the coordinator again"),
        }
    }
}

/// Listens for the data links into this worker's stages, on the address this host reaches
/// the coordinator from; each link that proves the secret waits for its stage. Returns
/// where it listens.
fn listen_for_links(coordinator: SocketAddr, secret: &Arc<Vec<u8>>, incoming: &Rendezvous) -> Result<SocketAddr> {
    let local_ip = UdpSocket::bind(if coordinator.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .and_then(|u| u.connect(coordinator).and_then(|_| u.local_addr()))
        .map_err(|e| Error::Other(format!("no route to the coordinator {coordinator}: {e}")))?
        .ip();
    let listener = TcpListener::bind(SocketAddr::new(local_ip, 0))
        .map_err(|e| Error::Other(format!("cannot listen for links on {local_ip}: {e}")))?;
    let data_addr = listener.local_addr().map_err(|e| Error::Other(e.to_string()))?;
    let (secret, incoming) = (secret.clone(), incoming.clone());
    std::thread::Builder::new()
        .name("links".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let (secret, incoming) = (secret.clone(), incoming.clone());
                let _ = std::thread::Builder::new().name("link-admit".into()).spawn(move || {
                    let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                    match wire::accept(&mut s, &secret) {
                        Ok(Role::Link { job, stage }) => incoming.arrive(job, stage, s),
                        Ok(other) => tracing::warn!("refused {other:?} from {peer}: this is a worker"),
                        Err(e) => tracing::warn!("refused a connection from {peer}: {e}"),
                    }
                });
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the link listener: {e}")))?;
    Ok(data_addr)
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::Config(format!("--coordinator {:?}: expected HOST:PORT", layerwise_plan::quote(addr))))
}

/// One connection to the coordinator: runs what it assigns until the connection is lost
/// (None), or, with `once`, until a job has ended (how it ended).
fn session(
    name: &str,
    stream: TcpStream,
    secret: &Arc<Vec<u8>>,
    incoming: &Rendezvous,
    stop: &Arc<AtomicBool>,
    once: bool,
) -> Result<Option<Ended>> {
    let control = Arc::new(Mutex::new(stream.try_clone().map_err(|e| Error::Other(e.to_string()))?));
    let beat_stop = Arc::new(AtomicBool::new(false));
    heartbeat(control.clone(), beat_stop.clone(), || ToCoordinator::Heartbeat);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut r = std::io::BufReader::new(&stream);
    let mut running: Option<Running> = None;
    let mut silent_since = Instant::now();
    let result = loop {
        // A finished job: with `once`, this worker's work is done.
        if let Some(ended) = reap(&mut running, incoming) {
            if once {
                break Ok(Some(ended));
            }
        }
        if stop.load(Ordering::SeqCst) {
            break Ok(Some(Ended::Failed));
        }
        match wire::read_frame::<ToWorker>(&mut r) {
            Ok(msg) => {
                silent_since = Instant::now();
                // A job that has told the coordinator it finished is not in the way of what
                // the coordinator sends next.
                if let Some(ended) = reap(&mut running, incoming) {
                    if once {
                        break Ok(Some(ended));
                    }
                }
                let links = (secret, incoming, &control);
                if let Err(e) = obey(msg, name, &mut running, links) {
                    break Err(e);
                }
            }
            Err(WireError::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                if silent_since.elapsed() >= PEER_TIMEOUT {
                    tracing::error!(
                        "worker {name}: no heartbeat from the coordinator for {} s",
                        PEER_TIMEOUT.as_secs()
                    );
                    break Ok(None);
                }
            }
            Err(e) => {
                tracing::error!("worker {name}: lost the coordinator: {e}");
                break Ok(None);
            }
        }
    };
    beat_stop.store(true, Ordering::SeqCst);
    let mut result = result;
    if let Some(j) = running.take() {
        // The coordinator is gone (or we stop): the job's stages end now. A job that had
        // told the coordinator it finished (which may then exit at once) ended as it did.
        j.sockets.abort();
        let ended = j.thread.join().unwrap_or(Ended::Failed);
        incoming.forget(j.id);
        if once && ended == Ended::Done && matches!(result, Ok(None)) {
            result = Ok(Some(Ended::Done));
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

/// Does what the coordinator says: abort a job, time layers, start a job (one at a time).
/// A refusal of this worker ends the session with its reason.
fn obey(
    msg: ToWorker,
    name: &str,
    running: &mut Option<Running>,
    (secret, incoming, control): (&Arc<Vec<u8>>, &Rendezvous, &Arc<Mutex<TcpStream>>),
) -> Result<()> {
    match msg {
        ToWorker::Heartbeat => {}
        ToWorker::Refused { reason } => {
            return Err(Error::Other(format!("the coordinator refused worker {name}: {reason}")))
        }
        ToWorker::Abort { job, reason } => {
            if let Some(j) = running.as_ref().filter(|j| j.id == job) {
                tracing::warn!("worker {name}: job {job:x} aborted: {reason}");
                j.sockets.abort();
            }
        }
        ToWorker::Measure { request, config, shape, device, threads } => {
            // In a thread of its own: heartbeats and aborts are still read meanwhile.
            let busy = running.as_ref().map(|j| j.id);
            answer_measure(control, request, busy, *config, shape, device, threads);
        }
        ToWorker::Assign(a) if running.is_some() => {
            tracing::error!("worker {name}: job {:x} while one runs; ignored", a.job);
        }
        ToWorker::Assign(a) => {
            let links = (secret.clone(), incoming.clone(), control.clone());
            *running = Some(begin(*a, name, links)?);
        }
    }
    Ok(())
}

/// Times the layers asked for, in a thread of its own, and answers request `request` on
/// `control` (refusing while job `busy` runs).
fn answer_measure(
    control: &Arc<Mutex<TcpStream>>,
    request: u64,
    busy: Option<u64>,
    config: RunConfig,
    shape: DataShape,
    device: DeviceId,
    threads: usize,
) {
    let answer = move |control: &Mutex<TcpStream>, times| {
        let mut s = control.lock().unwrap_or_else(|p| p.into_inner());
        let _ = wire::write_frame(&mut *s, &ToCoordinator::Measured { request, times });
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
fn begin(a: Assignment, name: &str, links: (Arc<Vec<u8>>, Rendezvous, Arc<Mutex<TcpStream>>)) -> Result<Running> {
    let (sockets, told) = (Sockets::default(), Arc::new(AtomicBool::new(false)));
    let (id, host) = (a.job, name.to_string());
    let (secret, incoming, control) = links;
    let (s, t) = (sockets.clone(), told.clone());
    let thread = std::thread::Builder::new()
        .name(format!("job-{id:x}"))
        .spawn(move || run_assignment(a, &host, secret, incoming, s, control, &t))
        .map_err(|e| Error::Other(format!("cannot start a job: {e}")))?;
    Ok(Running { id, sockets, told, thread })
}

/// Runs this worker's stages of an assignment to their end; tells the coordinator.
fn run_assignment(
    a: Assignment,
    host: &str,
    secret: Arc<Vec<u8>>,
    incoming: Rendezvous,
    sockets: Sockets,
    control: Arc<Mutex<TcpStream>>,
    told: &AtomicBool,
) -> Ended {
    let reports: Arc<dyn ReportSender> = Arc::new(RemoteReports { job: a.job, control: control.clone() });
    let mine: Vec<usize> = a.stages.iter().filter(|s| s.host.is_worker(host)).map(|s| s.index).collect();
    let _cudnn = layerwise_pipeline::cudnn::hold(a.config.train.deterministic);
    let started = start(&a, host, secret, incoming, sockets.clone(), reports.clone());
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
    let _ = wire::write_frame(&mut *s, &ToCoordinator::Finished { job: a.job });
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
    secret: Arc<Vec<u8>>,
    incoming: Rendezvous,
    sockets: Sockets,
    reports: Arc<dyn ReportSender>,
) -> Result<Vec<JoinHandle<bool>>> {
    let here = Host::Worker(host.to_string());
    let plan = Plan::assigned(&a.config, Machine::detect(), a.shape, a.stages.clone(), &here)?;
    let resume = a.resume.as_deref().map(checkpoint::open).transpose()?;
    let links = JobLinks::new(a.job, &plan, secret, a.hosts.clone(), sockets, incoming);
    let links: Arc<dyn RemoteLinks> = Arc::new(links);
    let plan = Arc::new(plan);
    let mut env = |_| StageEnv::new(a.checkpoints.clone(), resume.clone(), reports.clone());
    Ok(layerwise_pipeline::pipeline::spawn_stages(&plan, &here, None, &mut env, Some(links))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaped_job_leaves_no_link_waiting_and_a_running_one_keeps_its_own() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = || TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let incoming = Rendezvous::default();
        incoming.arrive(1, 0, link());
        incoming.arrive(2, 0, link());
        let (finish, finished) = crossbeam_channel::bounded::<()>(0);
        let job = |id: u64, thread: JoinHandle<Ended>| Running {
            id,
            sockets: Sockets::default(),
            told: Arc::new(AtomicBool::new(false)),
            thread,
        };
        let mut running =
            Some(job(2, std::thread::spawn(move || finished.recv().map_or(Ended::Failed, |_| Ended::Done))));
        assert_eq!(reap(&mut running, &incoming), None, "job 2 still runs");
        running.as_ref().unwrap().told.store(true, Ordering::SeqCst);
        finish.send(()).unwrap();
        assert_eq!(reap(&mut running, &incoming), Some(Ended::Done));
        let gone = Sockets::default();
        gone.abort();
        assert!(incoming.take(2, 0, &gone).is_none(), "job 2's unclaimed link was dropped");
        assert!(incoming.take(1, 0, &gone).is_some(), "another job's link stays");
    }

    /// A coordinator that cannot prove the secret: the worker gives up at once (it does not
    /// retry it as it would an unreachable coordinator), naming it.
    #[test]
    fn a_worker_refuses_a_coordinator_that_cannot_prove_the_secret() {
        let (addr, t) = crate::wire::testing::impostor();
        let options = WorkerOptions {
            coordinator: addr.to_string(),
            name: "w1".into(),
            devices: vec![DeviceId::Cpu],
            secret: b"the real secret, 16+".to_vec(),
            once: true,
            stop: Arc::default(),
        };
        let e = serve(options).unwrap_err().to_string();
        assert!(
            e.contains("worker w1 refused the coordinator") && e.contains("does not know the shared secret"),
            "{e}"
        );
        t.join().unwrap();
    }
}
