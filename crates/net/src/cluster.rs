//! The coordinator's side of the network: a listener that admits workers (and data links
//! into the coordinator's own stages) and the registry of workers, each with its control
//! connection and the job that holds it. Starting a job on workers is [`crate::remote_job`];
//! asking them to time layers is [`crate::ask`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use layerwise_pipeline::message::{Report, StageFailure};
use layerwise_plan::checks::worker_name;
use layerwise_plan::machine::MACHINE_ID_MAX;
use layerwise_plan::DeviceId;

use crate::job::{Rendezvous, Sockets};
use crate::protocol::{heartbeat, printable, say, tamed, Control, Measurement, ToCoordinator, ToWorker, PEER_TIMEOUT};
use crate::seal::SealReader;
use crate::wire::{self, Auth, Conn, Role};
use crate::{Error, Result};

/// Reports from workers waiting to be read, at most, when a worker's next one arrives:
/// past it, the worker is dropped (and its job fails) rather than memory growing.
pub const REPORTS_WAITING: usize = 1 << 16;

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
    /// The address this worker reached the coordinator at: where it dials the links into
    /// the coordinator's stages (never the listener's 0.0.0.0).
    pub coordinator_addr: SocketAddr,
    control: Control,
    /// The job it runs now; cleared when the worker says it finished, or is lost.
    job: Mutex<Option<JobHold>>,
    changed: Condvar,
    /// The measurement asked of it and where its answer goes; dropped when it is lost.
    pub(crate) measuring: Mutex<Option<(u64, Sender<Measurement>)>>,
    /// When its last frame (a heartbeat, at least every second) arrived.
    last_heard: Mutex<Instant>,
}

/// A job's hold on a worker: where the worker's reports of that job go, and what to shut
/// if the worker is lost.
pub(crate) struct JobHold {
    pub id: u64,
    pub reports: Sender<Report>,
    pub sockets: Sockets,
    pub first_stage: usize,
    /// The stages of the job this worker runs: it reports for these alone.
    pub stages: Vec<usize>,
    /// Whether it runs the last stage, the one that reports evaluations.
    pub runs_last: bool,
}

impl JobHold {
    /// `report` as this worker sent it, if its stage is one the worker runs; else a failure
    /// of the job naming the worker (a worker speaks for its own stages only).
    fn own(&self, report: Report, worker: &str) -> Report {
        let stage = match &report {
            Report::Failed(f) => Some(f.stage),
            Report::EpochStats(s) => Some(s.stage),
            Report::CheckpointPart { stage, .. } => Some(*stage),
            Report::Eval { .. } => None,
        };
        if stage.map_or(self.runs_last, |s| self.stages.contains(&s)) {
            return report;
        }
        let what = stage.map_or("an evaluation (the last stage's)".into(), |s| format!("a report for stage {s}"));
        let reason = format!("worker {worker} sent {what}, which it does not run");
        Report::Failed(StageFailure { stage: self.first_stage, layer: None, step: None, reason })
    }
}

impl WorkerConn {
    pub(crate) fn send(&self, msg: &ToWorker) -> bool {
        say(&self.control, msg)
    }

    pub(crate) fn lock_job(&self) -> MutexGuard<'_, Option<JobHold>> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job that holds this worker now, if any.
    pub fn job(&self) -> Option<u64> {
        self.lock_job().as_ref().map(|h| h.id)
    }

    /// Releases this worker from job `id`, if that job holds it.
    pub(crate) fn release(&self, id: u64) {
        let mut held = self.lock_job();
        if held.as_ref().is_some_and(|h| h.id == id) {
            *held = None;
        }
        self.changed.notify_all();
    }

    /// Waits until job `id` no longer holds this worker; past `limit`, releases it.
    pub(crate) fn wait_released(&self, id: u64, limit: Duration) {
        let mut held = self.lock_job();
        let since = Instant::now();
        while held.as_ref().is_some_and(|h| h.id == id) {
            if since.elapsed() > limit {
                tracing::warn!("worker {} has not ended its stages of the finished job; released", self.name);
                *held = None;
                return;
            }
            held = self.changed.wait_timeout(held, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

pub(crate) type Registry = Arc<(Mutex<BTreeMap<String, Arc<WorkerConn>>>, Condvar)>;

/// The coordinator's listener and its workers.
pub struct Cluster {
    pub addr: SocketAddr,
    /// How long a job waits for the workers it names to register before it fails.
    wait_limit: Duration,
    pub(crate) auth: Auth,
    pub(crate) workers: Registry,
    pub(crate) incoming: Rendezvous,
}

impl Cluster {
    /// Listens on `addr` for workers and links; a job waits at most `wait_limit` for the
    /// workers it names.
    pub fn listen(addr: &str, auth: Auth, wait_limit: Duration) -> Result<Arc<Cluster>> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::Config(format!("--listen {addr}: cannot listen there: {e}")))?;
        let addr = listener.local_addr().map_err(|e| Error::Other(e.to_string()))?;
        let cluster = Arc::new(Cluster {
            addr,
            wait_limit,
            auth: auth.clone(),
            workers: Arc::default(),
            incoming: Rendezvous::default(),
        });
        let (workers, incoming) = (cluster.workers.clone(), cluster.incoming.clone());
        crate::gate::serve(listener, auth, "listener", move |role, conn| admit(role, conn, &workers, &incoming))
            .map_err(|e| Error::Other(format!("cannot start the listener: {e}")))?;
        tracing::info!("listening for workers on {addr}");
        Ok(cluster)
    }

    /// Each registered worker's name and the seconds since its last frame.
    pub fn heard(&self) -> Vec<(String, f64)> {
        let workers = self.workers.0.lock().unwrap_or_else(|p| p.into_inner());
        let age = |w: &WorkerConn| w.last_heard.lock().unwrap_or_else(|p| p.into_inner()).elapsed().as_secs_f64();
        workers.values().map(|w| (w.name.clone(), age(w))).collect()
    }

    /// Names of the workers registered now.
    pub fn registered(&self) -> Vec<String> {
        self.workers.0.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Whether `w` is still the worker registered under its name (not lost, not replaced).
    pub(crate) fn still_registered(&self, w: &Arc<WorkerConn>) -> bool {
        let workers = self.workers.0.lock().unwrap_or_else(|p| p.into_inner());
        workers.get(&w.name).is_some_and(|r| Arc::ptr_eq(r, w))
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
                return Err(Error::Other(format!("stopped while waiting for workers {missing:?}")));
            }
            if start.elapsed() >= self.wait_limit {
                return Err(Error::Other(format!(
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
}

/// Handles one connection that proved the secret: a data link is handed to its stage; a
/// worker is registered and then served until it goes.
fn admit(role: Role, conn: Conn, workers: &Registry, incoming: &Rendezvous) {
    match role {
        Role::Link { job, stage } => incoming.arrive(job, stage, conn),
        worker @ Role::Worker { .. } => {
            let Conn { reader, writer, peer, encrypted } = conn;
            let Some(conn) = register((peer, encrypted), writer, worker, workers) else { return };
            let stop = Arc::new(AtomicBool::new(false));
            heartbeat(conn.control.clone(), stop.clone(), || ToWorker::Heartbeat);
            let lost = serve_worker(&conn, reader);
            stop.store(true, Ordering::SeqCst);
            forget(&conn, workers, &lost);
        }
    }
}

/// Registers a worker that has proved the secret, or refuses it (telling it why).
fn register(
    (peer, encrypted): (SocketAddr, bool),
    writer: crate::seal::SealWriter,
    role: Role,
    workers: &Registry,
) -> Option<Arc<WorkerConn>> {
    let Role::Worker { name, devices, memory, cores, machine, data_addr } = role else { return None };
    let coordinator_addr = writer.socket().local_addr().ok()?;
    // A worker that stops reading for as long as a missed heartbeat is lost.
    writer.socket().set_write_timeout(Some(PEER_TIMEOUT)).ok()?;
    let conn = Arc::new(WorkerConn {
        name,
        devices,
        memory,
        cores,
        machine,
        data_addr,
        peer,
        coordinator_addr,
        control: Arc::new(Mutex::new(writer)),
        job: Mutex::new(None),
        changed: Condvar::new(),
        measuring: Mutex::new(None),
        last_heard: Mutex::new(Instant::now()),
    });
    let (m, cv) = &**workers;
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    let refusal = refusal(&conn)
        .or_else(|| g.contains_key(&conn.name).then(|| format!("a worker named {} is registered already", conn.name)));
    if let Some(reason) = refusal {
        conn.send(&ToWorker::Refused { reason: reason.clone() });
        tracing::warn!("refused worker {} from {}: {reason}", conn.name, conn.peer);
        return None;
    }
    g.insert(conn.name.clone(), conn.clone());
    cv.notify_all();
    let devices: Vec<String> = conn.devices.iter().map(|d| d.to_string()).collect();
    let sealed = if encrypted { "encrypted" } else { "authenticated" };
    let (name, peer, cores) = (&conn.name, conn.peer, conn.cores);
    tracing::info!("worker {name} registered from {peer} ({sealed}): {} ({cores} cores)", devices.join(", "));
    Some(conn)
}

/// Why a worker's registration does not hold together, if it does not.
fn refusal(conn: &WorkerConn) -> Option<String> {
    if let Err(e) = worker_name(&conn.name) {
        return Some(e); // quoted short: the name came from the wire
    }
    let name = &conn.name;
    if conn.memory.len() != conn.devices.len() {
        return Some(format!(
            "worker {name} gave {} memory sizes for {} devices",
            conn.memory.len(),
            conn.devices.len()
        ));
    }
    if conn.machine.is_empty() || conn.machine.len() > MACHINE_ID_MAX {
        let len = conn.machine.len();
        return Some(format!("worker {name}: a machine id of {len} bytes (expected 1 to {MACHINE_ID_MAX})"));
    }
    if conn.devices.is_empty() {
        return Some(format!("worker {name} offers no device"));
    }
    None
}

/// Drops a worker that is gone: a job it held fails, naming the worker and why, and the
/// job's sockets here are shut.
fn forget(conn: &WorkerConn, workers: &Registry, lost: &str) {
    let (name, peer) = (&conn.name, conn.peer);
    workers.0.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    conn.measuring.lock().unwrap_or_else(|p| p.into_inner()).take();
    match conn.lock_job().take() {
        None => tracing::info!("worker {name} ({peer}) left: {lost}"),
        Some(h) => {
            let reason = format!("worker {name} ({peer}) lost: {lost}");
            tracing::error!("{reason}");
            let failure = StageFailure { stage: h.first_stage, layer: None, step: None, reason };
            let _ = h.reports.send(Report::Failed(failure));
            h.sockets.abort();
        }
    }
    conn.changed.notify_all();
}

/// Reads a worker's frames until it is lost; returns why.
fn serve_worker(conn: &WorkerConn, mut r: SealReader) -> String {
    if let Err(e) = r.socket().set_read_timeout(Some(PEER_TIMEOUT)) {
        return e.to_string();
    }
    loop {
        let frame = r.frame::<ToCoordinator>();
        *conn.last_heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        match frame {
            Ok(ToCoordinator::Heartbeat) => {}
            Ok(ToCoordinator::Report { job, report }) => {
                if let Some(h) = conn.lock_job().as_ref().filter(|h| h.id == job) {
                    if h.reports.len() >= REPORTS_WAITING {
                        return format!("it sent reports faster than they are read ({REPORTS_WAITING} waiting)");
                    }
                    let _ = h.reports.send(h.own(tamed(report), &conn.name));
                }
            }
            Ok(ToCoordinator::Measured { request, times }) => {
                let mut asked = conn.measuring.lock().unwrap_or_else(|p| p.into_inner());
                if asked.as_ref().is_some_and(|(r, _)| *r == request) {
                    let (_, answer) = asked.take().expect("checked");
                    let _ = answer.send(times);
                }
            }
            Ok(ToCoordinator::Finished { job }) => conn.release(job),
            Ok(ToCoordinator::Leaving { reason }) => return format!("it hung up: {}", printable(&reason)),
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

/// Test helpers: a worker that registers but runs nothing, so that the tests play its part.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The reason the coordinator refuses a worker that registers as `role`.
    pub fn refused_as(cluster: &Cluster, role: Role) -> String {
        let mut conn = wire::connect(cluster.addr, &cluster.auth, role).unwrap();
        match next_message(&mut conn).unwrap() {
            ToWorker::Refused { reason } => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Registers a worker named `name` on `machine` whose CPU has `memory` bytes, through
    /// `addr`; returns its control socket once the coordinator lists it.
    pub fn fake_worker(cluster: &Cluster, addr: SocketAddr, name: &str, machine: &str, memory: u64) -> Conn {
        let role = Role::Worker {
            name: name.into(),
            devices: vec![DeviceId::Cpu],
            memory: vec![Some(memory)],
            cores: 1,
            machine: machine.into(),
            data_addr: "127.0.0.1:9".parse().unwrap(),
        };
        let conn = wire::connect(addr, &cluster.auth, role).unwrap();
        cluster.wait_for(&[name.to_string()], None).unwrap();
        conn
    }

    /// The next message to a fake worker that is not a heartbeat.
    pub fn next_message(worker: &mut Conn) -> wire::WireResult<ToWorker> {
        loop {
            match worker.reader.frame::<ToWorker>()? {
                ToWorker::Heartbeat => continue,
                other => return Ok(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::refused_as;
    use super::*;

    fn role(name: &str) -> Role {
        Role::Worker {
            name: name.into(),
            devices: vec![DeviceId::Cpu],
            memory: vec![Some(1 << 30)],
            cores: 1,
            machine: "m".into(),
            data_addr: "127.0.0.1:9".parse().unwrap(),
        }
    }

    /// What a worker says of itself comes from the wire: a name a placement could not hold
    /// (or one that would carry control characters into logs and status), a device list
    /// without its memory sizes, an empty or huge machine id, are refused with the reason.
    #[test]
    fn a_registration_that_does_not_hold_together_is_refused_saying_why() {
        let cluster = Cluster::listen("127.0.0.1:0", wire::testing::auth(), Duration::from_secs(600)).unwrap();
        for name in ["../w", "w\u{1b}[2J", "", &"w".repeat(65)] {
            let reason = refused_as(&cluster, role(name));
            assert!(reason.contains("is not a worker name"), "{name:?}: {reason}");
        }
        let Role::Worker { name, devices, cores, machine, data_addr, .. } = role("w1") else { unreachable!() };
        let two = Role::Worker { name, devices, memory: vec![None, None], cores, machine, data_addr };
        assert!(refused_as(&cluster, two).contains("2 memory sizes for 1 devices"));
        let Role::Worker { name, devices, memory, cores, data_addr, .. } = role("w1") else { unreachable!() };
        let huge = Role::Worker { name, devices, memory, cores, machine: "m".repeat(MACHINE_ID_MAX + 1), data_addr };
        assert!(refused_as(&cluster, huge).contains("a machine id of 257 bytes"));
        assert!(cluster.registered().is_empty(), "{:?}", cluster.registered());
    }
}
