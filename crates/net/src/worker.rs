//! The worker's side: register with the coordinator, run the stages each assignment places
//! here, and go back to waiting (or exit, when launched for one job). A coordinator that
//! is lost stops this worker's stages; the worker then registers again when it can.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use layerwise_plan::checks::worker_name;
use layerwise_plan::machine::{device_memory, machine_id};
use layerwise_plan::{DeviceId, Machine};

use crate::assignment::{answer_measure, begin, reap, Ended, Here, Running};
use crate::job::Rendezvous;
use crate::protocol::{heartbeat, say, Control, ToCoordinator, ToWorker, PEER_TIMEOUT};
use crate::seal::SealReader;
use crate::wire::{self, Auth, Conn, Role, WireError, WireResult};
use crate::{Error, Result};

pub struct WorkerOptions {
    /// The coordinator's HOST:PORT.
    pub coordinator: String,
    pub name: String,
    /// The devices offered (checked present).
    pub devices: Vec<DeviceId>,
    /// The shared secret, and whether to encrypt.
    pub auth: Auth,
    /// The folder every run directory of this worker's jobs must lie in (a shared
    /// filesystem); without it, an assignment's resume point must still lie in the run's
    /// own checkpoint folder.
    pub root: Option<PathBuf>,
    /// Exit after one job (a rank launched by torchrun or Slurm).
    pub once: bool,
    /// Set from outside (a signal): stop waiting, abort a running job, return.
    pub stop: Arc<AtomicBool>,
}

/// A worker launched for one job gives up after this long without reaching its
/// coordinator (a rank 0 that failed to start must not leave the others waiting for good).
const ONCE_CONNECT_LIMIT: Duration = Duration::from_secs(300);

/// Serves the coordinator until `stop` (or, with `once`, until one job has ended).
pub fn serve(options: WorkerOptions) -> Result<()> {
    let name = worker_name(&options.name).map_err(|e| Error::Config(format!("--name: {e}")))?;
    let coordinator = resolve(&options.coordinator)?;
    let auth = options.auth;
    let incoming = Rendezvous::default();
    let data_addr = listen_for_links(coordinator, &auth, &incoming)?;
    let root = options.root.as_deref().map(crate::assignment::canonical_root).transpose()?;
    let here = Here { auth: auth.clone(), incoming: incoming.clone(), root };
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
        let conn = match wire::connect(coordinator, &auth, role.clone()) {
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
        let outcome = session(&name, conn, &here, &options.stop, options.once)?;
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
fn listen_for_links(coordinator: SocketAddr, auth: &Auth, incoming: &Rendezvous) -> Result<SocketAddr> {
    let local_ip = UdpSocket::bind(if coordinator.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .and_then(|u| u.connect(coordinator).and_then(|_| u.local_addr()))
        .map_err(|e| Error::Other(format!("no route to the coordinator {coordinator}: {e}")))?
        .ip();
    let listener = TcpListener::bind(SocketAddr::new(local_ip, 0))
        .map_err(|e| Error::Other(format!("cannot listen for links on {local_ip}: {e}")))?;
    let data_addr = listener.local_addr().map_err(|e| Error::Other(e.to_string()))?;
    let incoming = incoming.clone();
    crate::gate::serve(listener, auth.clone(), "links", move |role, conn| match role {
        Role::Link { job, stage } => incoming.arrive(job, stage, conn),
        Role::Worker { name, .. } => {
            tracing::warn!(
                "refused worker {:?} from {}: this is a worker",
                crate::protocol::printable(&name),
                conn.peer
            )
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

/// Reads the coordinator's frames in a thread of its own (so that a frame is never cut by
/// a timeout meant for the loop), until one fails: silence for [`PEER_TIMEOUT`] fails.
fn read_frames(mut r: SealReader) -> std::io::Result<Receiver<WireResult<ToWorker>>> {
    let (tx, rx) = crossbeam_channel::bounded(64);
    std::thread::Builder::new().name("control-in".into()).spawn(move || loop {
        let frame = r.frame::<ToWorker>();
        let failed = frame.is_err();
        if tx.send(frame).is_err() || failed {
            return;
        }
    })?;
    Ok(rx)
}

/// Why the control connection failed, in words.
fn lost(e: WireError) -> String {
    match e {
        WireError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            format!("no heartbeat from the coordinator for {} s", PEER_TIMEOUT.as_secs())
        }
        e => format!("lost the coordinator: {e}"),
    }
}

/// One connection to the coordinator: runs what it assigns until the connection is lost
/// (None), or, with `once`, until a job has ended (how it ended).
fn session(name: &str, conn: Conn, here: &Here, stop: &Arc<AtomicBool>, once: bool) -> Result<Option<Ended>> {
    let Conn { reader, writer, .. } = conn;
    let incoming = &here.incoming;
    let socket = writer.socket().try_clone().map_err(|e| Error::Other(e.to_string()))?;
    let io = |e: std::io::Error| Error::Other(format!("the control connection: {e}"));
    socket.set_read_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    socket.set_write_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    let control: Control = Arc::new(Mutex::new(writer));
    let frames = read_frames(reader).map_err(io)?;
    let beat_stop = Arc::new(AtomicBool::new(false));
    heartbeat(control.clone(), beat_stop.clone(), || ToCoordinator::Heartbeat);
    let mut running: Option<Running> = None;
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
        match frames.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(msg)) => {
                // A job that has told the coordinator it finished is not in the way of what
                // the coordinator sends next.
                if let Some(ended) = reap(&mut running, incoming) {
                    if once {
                        break Ok(Some(ended));
                    }
                }
                if let Err(e) = obey(msg, name, &mut running, (here, &control)) {
                    break Err(e);
                }
            }
            Ok(Err(e)) => {
                let reason = lost(e);
                tracing::error!("worker {name}: {reason}");
                say(&control, &ToCoordinator::Leaving { reason });
                break Ok(None);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Ok(None),
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
    let _ = socket.shutdown(std::net::Shutdown::Both);
    result
}

/// Does what the coordinator says: abort a job, time layers, start a job (one at a time).
/// A refusal of this worker ends the session with its reason.
fn obey(msg: ToWorker, name: &str, running: &mut Option<Running>, (here, control): (&Here, &Control)) -> Result<()> {
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
            let links = (here.clone(), control.clone());
            *running = Some(begin(*a, name, links)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Sockets;
    use std::thread::JoinHandle;

    #[test]
    fn a_reaped_job_leaves_no_link_waiting_and_a_running_one_keeps_its_own() {
        let link = || crate::wire::testing::sealed_pair(false).0;
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

    /// A coordinator that pauses in the middle of a frame (longer than the control loop's
    /// half-second tick) is not dropped, and the frame arrives whole: frames are read in
    /// a thread of their own, with no timeout shorter than a lost peer's.
    #[test]
    fn a_coordinator_pausing_mid_frame_is_read_whole() {
        use crate::seal::{split, Keys};
        use std::io::{Read, Write};
        let pair = || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (a, l.accept().unwrap().0)
        };
        // The sealed bytes of one frame, as the coordinator would send them.
        let (x, mut x_raw) = pair();
        let (_, mut w) = split(x, &Keys { send: [1; 32], recv: [2; 32], encrypt: true }, "worker".into()).unwrap();
        w.frame(&ToWorker::Abort { job: 7, reason: "x".repeat(4000) }).unwrap();
        drop(w);
        let mut bytes = Vec::new();
        x_raw.read_to_end(&mut bytes).unwrap();
        // Sent to the worker in two halves, with a pause between them.
        let (mut y_raw, y) = pair();
        let (r, _) = split(y, &Keys { send: [2; 32], recv: [1; 32], encrypt: true }, "coordinator".into()).unwrap();
        let frames = read_frames(r).unwrap();
        y_raw.write_all(&bytes[..bytes.len() / 2]).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        y_raw.write_all(&bytes[bytes.len() / 2..]).unwrap();
        match frames.recv().unwrap() {
            Ok(ToWorker::Abort { job: 7, reason }) => assert_eq!(reason.len(), 4000),
            other => panic!("{other:?}"),
        }
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
            auth: Auth::new(b"the real secret, 16+".to_vec(), false),
            root: None,
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
