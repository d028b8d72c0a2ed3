//! The coordinator's side: a listener that admits workers (and data links into the
//! coordinator's own stages), the registry of workers, and a job's hold on the workers it
//! uses.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::wire::{self, Role};
use super::{
    heartbeat, host_key, Assignment, Measurement, Net, Rendezvous, Sockets, ToCoordinator, ToWorker, PEER_TIMEOUT,
};
use crate::config::GpuLink;
use crate::message::{Report, StageFailure};
use crate::placement::StagePlan;
use crate::plan::{DeviceId, Plan};
use crate::{EngineError, Result};

/// A registered worker.
pub struct WorkerConn {
    pub name: String,
    pub devices: Vec<DeviceId>,
    /// Each device's memory in bytes, where the worker knows it.
    pub memory: Vec<Option<u64>>,
    pub cores: usize,
    /// The machine it runs on: processes on one share its cores.
    pub machine: String,
    pub data_addr: SocketAddr,
    pub peer: SocketAddr,
    control: Arc<Mutex<TcpStream>>,
    /// The job it runs now; cleared when the worker says it finished, or is lost.
    job: Mutex<Option<Held>>,
    changed: Condvar,
    /// The measurement asked of it and where its answer goes; dropped when it is lost.
    measuring: Mutex<Option<(u64, Sender<Measurement>)>>,
}

struct Held {
    id: u64,
    reports: Sender<Report>,
    sockets: Sockets,
    first_stage: usize,
}

impl WorkerConn {
    fn send(&self, msg: &ToWorker) -> bool {
        let mut s = self.control.lock().unwrap_or_else(|p| p.into_inner());
        wire::write_frame(&mut *s, msg).is_ok()
    }

    fn lock_job(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Registry = Arc<(Mutex<BTreeMap<String, Arc<WorkerConn>>>, Condvar)>;

/// The coordinator's listener and its workers.
pub struct Cluster {
    pub addr: SocketAddr,
    /// How long a job waits for the workers it names to register before it fails.
    wait_limit: Duration,
    secret: Arc<Vec<u8>>,
    workers: Registry,
    incoming: Rendezvous,
}

impl Cluster {
    /// Listens on `addr` for workers and links; a job waits at most `wait_limit` for the
    /// workers it names.
    pub fn listen(addr: &str, secret: Vec<u8>, wait_limit: Duration) -> Result<Arc<Cluster>> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| EngineError::Config(format!("--listen {addr}: cannot listen there: {e}")))?;
        let addr = listener.local_addr().map_err(|e| EngineError::Other(e.to_string()))?;
        let cluster = Arc::new(Cluster {
            addr,
            wait_limit,
            secret: Arc::new(secret),
            workers: Arc::default(),
            incoming: Rendezvous::default(),
        });
        let (secret, workers, incoming) = (cluster.secret.clone(), cluster.workers.clone(), cluster.incoming.clone());
        std::thread::Builder::new()
            .name("listener".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(stream) = conn else { continue };
                    let (secret, workers, incoming) = (secret.clone(), workers.clone(), incoming.clone());
                    let _ = std::thread::Builder::new()
                        .name("peer".into())
                        .spawn(move || admit(stream, &secret, &workers, &incoming));
                }
            })
            .map_err(|e| EngineError::Other(format!("cannot start the listener: {e}")))?;
        tracing::info!("listening for workers on {addr}");
        Ok(cluster)
    }

    /// Names of the workers registered now.
    pub fn registered(&self) -> Vec<String> {
        self.workers.0.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Waits until every worker named has registered; fails naming the missing ones after
    /// the wait limit (or when `stop` is set).
    pub fn wait_for(&self, names: &[String], stop: Option<&AtomicBool>) -> Result<Vec<Arc<WorkerConn>>> {
        let (m, cv) = &*self.workers;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let mut said: Option<Instant> = None;
        loop {
            let missing: Vec<&String> = names.iter().filter(|n| !g.contains_key(*n)).collect();
            if missing.is_empty() {
                return Ok(names.iter().map(|n| g[n].clone()).collect());
            }
            if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                return Err(EngineError::Other(format!("stopped while waiting for workers {missing:?}")));
            }
            if start.elapsed() >= self.wait_limit {
                return Err(EngineError::Other(format!(
                    "workers {missing:?} did not register on {} within {} s (--worker-wait)",
                    self.addr,
                    self.wait_limit.as_secs_f64()
                )));
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                tracing::info!("waiting for workers {missing:?} to register on {}", self.addr);
                said = Some(Instant::now());
            }
            g = cv.wait_timeout(g, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Gives every CPU stage of `plan` its threads once the workers it places stages on
    /// have registered: stages on one machine share its cores, whichever process they are
    /// in (a coordinator and two workers on one 2-core host get a thread each, not two
    /// each).
    pub fn share_threads(&self, plan: &mut Plan, stop: Option<&AtomicBool>) -> Result<()> {
        let names: Vec<String> = plan.workers().into_iter().collect();
        let processes = processes(plan, &self.wait_for(&names, stop)?);
        crate::placement::share_threads(&mut plan.stages, &plan.config, &processes);
        Ok(())
    }

    /// Starts `plan`'s remote stages: checks each worker offers the devices placed on it,
    /// with the memory its layers need, hands each its assignment, and returns the job's
    /// network. Reports from the workers' stages go to `reports`.
    pub fn start_job(
        &self,
        plan: &Plan,
        checkpoints: &Path,
        resume: Option<&Path>,
        reports: &Sender<Report>,
        stop: Option<&AtomicBool>,
    ) -> Result<RemoteJob> {
        check_gpu_links(plan.config.pipeline.gpu_link, &plan.stages, layerwise_nccl::missing())?;
        let names: Vec<String> = plan.workers().into_iter().collect();
        let workers = self.wait_for(&names, stop)?;
        let mut hosts = BTreeMap::from([(String::new(), self.addr)]);
        let processes = processes(plan, &workers);
        for w in &workers {
            hosts.insert(w.name.clone(), w.data_addr);
            for s in plan.stages.iter().filter(|s| s.host.as_deref() == Some(w.name.as_str())) {
                if let Some(d) = s.devices.iter().find(|d| !w.devices.contains(d)) {
                    return Err(EngineError::Config(format!(
                        "pipeline.placement[{}].device: worker {} has no {d} (it offers {})",
                        s.index,
                        w.name,
                        w.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            // The other processes on its machine share its memory.
            let beside: Vec<Option<&str>> = processes
                .iter()
                .filter(|(h, (_, m))| *m == w.machine && **h != w.name)
                .map(|(h, _)| Some(h.as_str()).filter(|h| !h.is_empty()))
                .collect();
            let memory = |d| w.devices.iter().position(|o| *o == d).and_then(|i| w.memory[i]);
            plan.check_worker_memory(&w.name, &beside, memory)?;
        }
        let id = rand::random::<u64>();
        let sockets = Sockets::default();
        let assignment = Assignment {
            job: id,
            config: plan.config.clone(),
            shape: (plan.shape.input.channels, plan.shape.input.size, plan.shape.num_classes),
            stages: plan.stages.clone(),
            checkpoints: std::path::absolute(checkpoints).map_err(|e| EngineError::io(checkpoints, e))?,
            resume: resume.map(std::path::absolute).transpose().map_err(|e| EngineError::Other(e.to_string()))?,
            hosts: hosts.clone(),
        };
        let job = RemoteJob {
            id,
            workers: workers.clone(),
            net: Arc::new(Net {
                job: id,
                secret: self.secret.clone(),
                hosts,
                stages: plan.stages.clone(),
                capacity: plan.config.pipeline.channel_capacity,
                gpu_link: plan.config.pipeline.gpu_link,
                sockets: sockets.clone(),
                incoming: self.incoming.clone(),
            }),
        };
        for w in &workers {
            let first_stage = plan.stages.iter().find(|s| host_key(&s.host) == w.name).map_or(0, |s| s.index);
            {
                let mut held = w.lock_job();
                if let Some(h) = held.as_ref() {
                    return Err(EngineError::Other(format!("worker {} is busy with another job ({:x})", w.name, h.id)));
                }
                *held = Some(Held { id, reports: reports.clone(), sockets: sockets.clone(), first_stage });
            }
            if !w.send(&ToWorker::Assign(Box::new(assignment.clone()))) {
                job.abort("a worker was lost while the job started");
                return Err(EngineError::Other(format!(
                    "worker {} ({}) was lost before its assignment",
                    w.name, w.peer
                )));
            }
            tracing::info!(
                "worker {} ({}) runs stage(s) {:?}",
                w.name,
                w.peer,
                plan.stages.iter().filter(|s| host_key(&s.host) == w.name).map(|s| s.index).collect::<Vec<_>>()
            );
        }
        Ok(job)
    }
}

/// This process and `workers`, by host key: each one's cores and machine (see
/// [`crate::placement::Processes`]).
pub(crate) fn processes(plan: &Plan, workers: &[Arc<WorkerConn>]) -> crate::placement::Processes {
    let mut all = crate::placement::this_process(plan.machine.cores);
    all.extend(workers.iter().map(|w| (w.name.clone(), (w.cores, w.machine.clone()))));
    all
}

/// The longest a worker may take to measure its layers for `auto` (a worker that dies or
/// goes silent meanwhile is noticed sooner, by [`PEER_TIMEOUT`]).
pub const MEASURE_LIMIT: Duration = Duration::from_secs(600);

impl Cluster {
    /// Asks each worker of `asks` for each layer's step time (seconds, the output layer
    /// last), for `auto` over workers: the worker builds the layers of `plan`'s net one at a
    /// time on its device and times them, as this process does its own. All are asked at
    /// once and measure side by side, as their stages will run. Fails, naming the first
    /// worker that is busy with a job, is lost, cannot measure, or takes longer than
    /// [`MEASURE_LIMIT`].
    pub fn measure(
        &self,
        asks: &[crate::placement::Ask],
        plan: &Plan,
        stop: Option<&AtomicBool>,
    ) -> Result<Vec<Vec<f64>>> {
        let names: Vec<String> = asks.iter().map(|a| a.name.clone()).collect();
        let workers = self.wait_for(&names, stop)?;
        let config = Box::new(plan.config.clone());
        let shape = (plan.shape.input.channels, plan.shape.input.size, plan.shape.num_classes);
        let mut pending = Vec::with_capacity(asks.len());
        for (ask, w) in asks.iter().zip(workers) {
            let failed = move |why: String| {
                EngineError::Other(format!("worker {} could not measure its {}: {why}", ask.name, ask.device))
            };
            if let Some(h) = w.lock_job().as_ref() {
                return Err(failed(format!("it is busy with another job ({:x})", h.id)));
            }
            let request = rand::random::<u64>();
            let (tx, rx) = crossbeam_channel::bounded(1);
            *w.measuring.lock().unwrap_or_else(|p| p.into_inner()) = Some((request, tx));
            let (device, threads) = (ask.device, ask.threads);
            if !w.send(&ToWorker::Measure { request, config: config.clone(), shape, device, threads }) {
                return Err(failed("it was lost".into()));
            }
            pending.push((w, rx, failed));
        }
        let since = Instant::now();
        let mut answers = Vec::with_capacity(pending.len());
        for (w, rx, failed) in pending {
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(times) => {
                        answers.push(times.map_err(&failed)?);
                        break;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(failed("it was lost".into())),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        // Lost before the question was recorded: nobody drops the answer's end.
                        let workers = self.workers.0.lock().unwrap_or_else(|p| p.into_inner());
                        if !workers.get(&w.name).is_some_and(|r| Arc::ptr_eq(r, &w)) {
                            return Err(failed("it was lost".into()));
                        }
                        drop(workers);
                        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                            return Err(failed("stopped while it measured".into()));
                        }
                        if since.elapsed() >= MEASURE_LIMIT {
                            return Err(failed(format!("no answer within {} s", MEASURE_LIMIT.as_secs())));
                        }
                    }
                }
            }
        }
        Ok(answers)
    }
}

/// A job's hold on its workers.
pub struct RemoteJob {
    pub id: u64,
    workers: Vec<Arc<WorkerConn>>,
    pub net: Arc<Net>,
}

impl RemoteJob {
    /// Stops the job everywhere: the workers are told, and every socket of the job here is
    /// shut, so no stage of this process stays blocked on a link.
    pub fn abort(&self, reason: &str) {
        self.net.sockets.abort();
        for w in &self.workers {
            if w.lock_job().as_ref().is_some_and(|h| h.id == self.id) {
                w.send(&ToWorker::Abort { job: self.id, reason: reason.into() });
            }
        }
    }

    /// Waits until each worker has ended its stages of the job (or was lost).
    pub fn finish(self) {
        for w in &self.workers {
            let mut held = w.lock_job();
            let since = Instant::now();
            while held.as_ref().is_some_and(|h| h.id == self.id) {
                if since.elapsed() > 2 * PEER_TIMEOUT {
                    tracing::warn!("worker {} has not ended its stages of the finished job; released", w.name);
                    *held = None;
                    break;
                }
                held = w.changed.wait_timeout(held, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        self.net.incoming.forget(self.id);
    }
}

/// Handles one connection to the listener: a data link is handed to its stage; a worker is
/// registered and then served until it goes.
fn admit(mut stream: TcpStream, secret: &[u8], workers: &Registry, incoming: &Rendezvous) {
    let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    let role = match wire::accept(&mut stream, secret) {
        Ok(role) => role,
        Err(e) => {
            tracing::warn!("refused a connection from {peer}: {e}");
            return;
        }
    };
    match role {
        Role::Link { job, stage } => incoming.arrive(job, stage, stream),
        Role::Worker { name, devices, memory, cores, machine, data_addr } => {
            let Ok(control) = stream.try_clone() else { return };
            let conn = Arc::new(WorkerConn {
                name: name.clone(),
                devices,
                memory,
                cores,
                machine,
                data_addr,
                peer: stream.peer_addr().unwrap_or(data_addr),
                control: Arc::new(Mutex::new(control)),
                job: Mutex::new(None),
                changed: Condvar::new(),
                measuring: Mutex::new(None),
            });
            {
                let (m, cv) = &**workers;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                if conn.memory.len() != conn.devices.len() {
                    conn.send(&ToWorker::Refused {
                        reason: format!(
                            "worker {name} gave {} memory sizes for {} devices",
                            conn.memory.len(),
                            conn.devices.len()
                        ),
                    });
                    tracing::warn!("refused worker {name} from {peer}: memory sizes do not match its devices");
                    return;
                }
                if conn.machine.is_empty() || conn.machine.len() > crate::plan::MACHINE_ID_MAX {
                    conn.send(&ToWorker::Refused {
                        reason: format!(
                            "worker {name}: a machine id of {} bytes (expected 1 to {})",
                            conn.machine.len(),
                            crate::plan::MACHINE_ID_MAX
                        ),
                    });
                    tracing::warn!("refused worker {name} from {peer}: a machine id of {} bytes", conn.machine.len());
                    return;
                }
                if conn.devices.is_empty() {
                    conn.send(&ToWorker::Refused { reason: format!("worker {name} offers no device") });
                    tracing::warn!("refused worker {name} from {peer}: it offers no device");
                    return;
                }
                if g.contains_key(&name) {
                    conn.send(&ToWorker::Refused { reason: format!("a worker named {name} is registered already") });
                    tracing::warn!("refused a second worker named {name} from {peer}");
                    return;
                }
                g.insert(name.clone(), conn.clone());
                cv.notify_all();
            }
            tracing::info!(
                "worker {name} registered from {peer}: {} ({} cores)",
                conn.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                conn.cores
            );
            let stop = Arc::new(AtomicBool::new(false));
            heartbeat(conn.control.clone(), stop.clone(), || ToWorker::Heartbeat);
            let lost = serve_worker(&conn, stream);
            stop.store(true, Ordering::SeqCst);
            workers.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            conn.measuring.lock().unwrap_or_else(|p| p.into_inner()).take();
            let held = conn.lock_job().take();
            if held.is_none() {
                tracing::info!("worker {name} ({peer}) left: {lost}");
            }
            if let Some(h) = held {
                let reason = format!("worker {name} ({peer}) lost: {lost}");
                tracing::error!("{reason}");
                let _ = h.reports.send(Report::Failed(StageFailure {
                    stage: h.first_stage,
                    layer: None,
                    step: None,
                    reason,
                }));
                h.sockets.abort();
            }
            conn.changed.notify_all();
        }
    }
}

/// Reads a worker's frames until it is lost; returns why.
fn serve_worker(conn: &WorkerConn, mut stream: TcpStream) -> String {
    if let Err(e) = stream.set_read_timeout(Some(PEER_TIMEOUT)) {
        return e.to_string();
    }
    let mut r = std::io::BufReader::new(&mut stream);
    loop {
        match wire::read_frame::<ToCoordinator>(&mut r) {
            Ok(ToCoordinator::Heartbeat) => {}
            Ok(ToCoordinator::Report { job, report }) => {
                if let Some(h) = conn.lock_job().as_ref().filter(|h| h.id == job) {
                    let _ = h.reports.send(report);
                }
            }
            Ok(ToCoordinator::Measured { request, times }) => {
                let mut asked = conn.measuring.lock().unwrap_or_else(|p| p.into_inner());
                if asked.as_ref().is_some_and(|(r, _)| *r == request) {
                    let (_, answer) = asked.take().expect("checked");
                    let _ = answer.send(times);
                }
            }
            Ok(ToCoordinator::Finished { job }) => {
                let mut held = conn.lock_job();
                if held.as_ref().is_some_and(|h| h.id == job) {
                    *held = None;
                }
                conn.changed.notify_all();
            }
            Err(wire::WireError::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                return format!("no heartbeat for {} s", PEER_TIMEOUT.as_secs())
            }
            Err(wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "connection closed".into()
            }
            Err(e) => return e.to_string(),
        }
    }
}

/// Refuses, before any worker is waited for, a plan with a link between GPUs in two
/// processes that should go over NCCL when this build has none (`missing`: why).
fn check_gpu_links(gpu_link: GpuLink, stages: &[StagePlan], missing: Option<&str>) -> Result<()> {
    let Some(why) = missing else { return Ok(()) };
    for b in 1..stages.len() {
        if stages[b - 1].host != stages[b].host && super::nccl_ends(gpu_link, stages, b).is_some() {
            return Err(EngineError::Config(format!(
                "pipeline.gpu_link: stages {} and {b} are GPUs in two processes, and \"nccl\" is asked for, but this build has no NCCL ({why}); set pipeline.gpu_link to \"tcp\" to send through the hosts",
                b - 1
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Placement, RunConfig, StageSpec};
    use crate::plan::{DeviceId, Machine};

    /// Registers a worker named `name` on `machine` whose CPU has `memory` bytes; returns
    /// its control socket.
    fn fake_worker(cluster: &Cluster, name: &str, machine: &str, memory: u64) -> TcpStream {
        let role = Role::Worker {
            name: name.into(),
            devices: vec![DeviceId::Cpu],
            memory: vec![Some(memory)],
            cores: 1,
            machine: machine.into(),
            data_addr: "127.0.0.1:9".parse().unwrap(),
        };
        let stream = wire::connect(cluster.addr, b"s", role).unwrap();
        cluster.wait_for(&[name.to_string()], None).unwrap();
        stream
    }

    fn placed_on(worker: &str) -> Plan {
        let mut c = RunConfig::default();
        c.model.num_layers = 3;
        c.pipeline.placement = Placement::Stages(vec![
            StageSpec { layers: vec![0, 1], device: "cpu".into() },
            StageSpec { layers: vec![2, 3], device: format!("{worker}/cpu") },
        ]);
        Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap()
    }

    #[test]
    fn a_worker_without_the_memory_for_its_layers_is_refused_before_it_is_sent_anything() {
        let cluster = Cluster::listen("127.0.0.1:0", b"s".to_vec(), Duration::from_secs(600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (reports, _) = crossbeam_channel::unbounded();
        let _small = fake_worker(&cluster, "small", "elsewhere", 1 << 20);
        let e = match cluster.start_job(&placed_on("small"), dir.path(), None, &reports, None) {
            Ok(_) => panic!("a worker with 1 MiB was given the job"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("worker small's host has 0.0 GiB") && e.contains("needs about"), "{e}");
        // Refused before the worker was held for the job (it is held before it is sent its
        // assignment), and still registered.
        let small = cluster.wait_for(&["small".to_string()], None).unwrap();
        assert!(small[0].lock_job().is_none(), "the refused job holds the worker");
        // A worker with the memory is sent the job.
        let mut big = fake_worker(&cluster, "big", "elsewhere", 1 << 40);
        let plan = placed_on("big");
        let job = cluster.start_job(&plan, dir.path(), None, &reports, None).unwrap();
        let assigned = loop {
            match wire::read_frame::<ToWorker>(&mut big).unwrap() {
                ToWorker::Heartbeat => continue,
                ToWorker::Assign(a) => break a,
                other => panic!("sent {other:?}"),
            }
        };
        assert_eq!(assigned.job, job.id);
        job.abort("test over");
        // On this machine, a worker's host memory also holds this process's CPU stages:
        // memory for its own layers alone is not enough.
        let plan = placed_on("near");
        let alone = plan.device_needs(Some("near"), &[])[&DeviceId::Cpu];
        let both = plan.device_needs(Some("near"), &[None])[&DeviceId::Cpu];
        assert!(both > alone * 1.01, "{both} against {alone}");
        let _near = fake_worker(&cluster, "near", &crate::plan::machine_id(), ((alone + both) / 2.0) as u64);
        let e = match cluster.start_job(&plan, dir.path(), None, &reports, None) {
            Ok(_) => panic!("a worker without the memory for both processes' layers was given the job"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("worker near's host has") && e.contains("with the CPU stages of the coordinator"), "{e}");
    }

    #[test]
    fn auto_over_workers_asks_the_workers_at_once_and_gives_slower_ones_fewer_layers() {
        use crate::placement::Ask;
        let cluster = Cluster::listen("127.0.0.1:0", b"s".to_vec(), Duration::from_secs(600)).unwrap();
        let mut c = RunConfig::default();
        c.model.num_layers = 3; // four layers with the output layer
        c.pipeline.workers = vec!["slow".into(), "far".into()];
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let shape = (plan.shape.input.channels, plan.shape.input.size, plan.shape.num_classes);
        let (mut slow, mut far) =
            (fake_worker(&cluster, "slow", "elsewhere", 1 << 40), fake_worker(&cluster, "far", "afar", 1 << 40));
        let measure_request = |worker: &mut TcpStream| loop {
            match wire::read_frame::<ToWorker>(worker) {
                Ok(ToWorker::Heartbeat) => continue,
                Ok(ToWorker::Measure { request, config, shape, device, threads }) => {
                    return Some((request, (config.model.num_layers, shape, device, threads)))
                }
                Ok(other) => panic!("sent {other:?}"),
                Err(_) => return None,
            }
        };
        // Each worker answers a second a layer (far slower than this process). "slow" answers
        // only once "far" has its question too (or, were they asked one after the other,
        // after a long wait, with an error), and first answers a request never made.
        let (far_asked, far_was_asked) = crossbeam_channel::bounded(1);
        let far_answers = std::thread::spawn(move || {
            let (request, asked) = measure_request(&mut far).unwrap();
            far_asked.send(()).unwrap();
            wire::write_frame(&mut far, &ToCoordinator::Measured { request, times: Ok(vec![1.0; 4]) }).unwrap();
            (asked, far)
        });
        let slow_answers = std::thread::spawn(move || {
            let mut asked = Vec::new();
            while let Some((request, question)) = measure_request(&mut slow) {
                asked.push(question);
                let answers: Vec<(u64, Measurement)> = match asked.len() {
                    1 => match far_was_asked.recv_timeout(Duration::from_secs(120)) {
                        Ok(()) => vec![(request.wrapping_add(1), Ok(vec![0.0; 4])), (request, Ok(vec![1.0; 4]))],
                        Err(_) => vec![(request, Err("asked one after the other".into()))],
                    },
                    2 => vec![(request, Err("the card fell off".into()))],
                    _ => break,
                };
                for (request, times) in answers {
                    wire::write_frame(&mut slow, &ToCoordinator::Measured { request, times }).unwrap();
                }
            }
            asked
        });
        let asking = plan.clone();
        let mut processes = crate::placement::this_process(2);
        processes.insert("slow".into(), (1, "elsewhere".into()));
        processes.insert("far".into(), (1, "afar".into()));
        let offered = [("slow".to_string(), vec![DeviceId::Cpu]), ("far".into(), vec![DeviceId::Cpu])];
        plan.place_over_workers(&offered, &processes, |asks| cluster.measure(asks, &asking, None)).unwrap();
        let placed: Vec<(Option<&str>, usize)> =
            plan.stages.iter().map(|s| (s.host.as_deref(), s.layers.len())).collect();
        assert_eq!(placed, vec![(None, 2), (Some("slow"), 1), (Some("far"), 1)]);
        let (far_question, _far) = far_answers.join().unwrap();
        assert_eq!(far_question, (3, shape, DeviceId::Cpu, 1));
        let slow_alone = [Ask { name: "slow".into(), device: DeviceId::Cpu, threads: 1 }];
        let e = cluster.measure(&slow_alone, &asking, None).unwrap_err().to_string();
        assert!(e.contains("worker slow could not measure its cpu: the card fell off"), "{e}");
        let e = cluster.measure(&slow_alone, &asking, None).unwrap_err().to_string();
        assert!(e.contains("worker slow") && e.contains("lost"), "{e}");
        assert_eq!(slow_answers.join().unwrap(), vec![(3, shape, DeviceId::Cpu, 1); 3]);
    }

    fn stages(devices: [(Option<&str>, DeviceId); 2]) -> Vec<StagePlan> {
        crate::placement::one_layer_each(&devices)
    }

    #[test]
    fn a_gpu_link_over_nccl_without_nccl_is_refused_before_anything_starts() {
        let (gpu, cpu) = (DeviceId::Cuda(0), DeviceId::Cpu);
        let apart = stages([(None, gpu), (Some("w1"), gpu)]);
        let e = check_gpu_links(GpuLink::Nccl, &apart, Some("no libtorch_cuda.so")).unwrap_err().to_string();
        assert!(
            e.contains("pipeline.gpu_link") && e.contains("stages 0 and 1") && e.contains("no libtorch_cuda.so"),
            "{e}"
        );
        assert!(check_gpu_links(GpuLink::Tcp, &apart, Some("none")).is_ok(), "tcp needs no NCCL");
        assert!(check_gpu_links(GpuLink::Nccl, &apart, None).is_ok(), "a build with NCCL");
        let together = stages([(Some("w1"), gpu), (Some("w1"), gpu)]);
        assert!(check_gpu_links(GpuLink::Nccl, &together, Some("none")).is_ok(), "one process: a channel");
        let via_cpu = stages([(None, cpu), (Some("w1"), gpu)]);
        assert!(check_gpu_links(GpuLink::Nccl, &via_cpu, Some("none")).is_ok(), "from a CPU: TCP");
    }
}
