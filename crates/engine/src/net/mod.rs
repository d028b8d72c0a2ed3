//! Stages in other processes and on other hosts. A coordinator (`layerwise train`, or a
//! rank 0 launched by torchrun or Slurm) listens; workers (`layerwise worker`, or the other
//! ranks) connect, prove the shared secret and offer their devices. For a job, the
//! coordinator sends each worker its assignment (the config, every stage's plan, the
//! checkpoint folder); each process starts the stages placed on it, and a stage whose
//! neighbour is elsewhere links to it over TCP (`link.rs`) instead of a channel. Reports
//! come back over the worker's control connection.
//!
//! Failures: every control connection carries a heartbeat each [`HEARTBEAT`]; silence for
//! [`PEER_TIMEOUT`], or a closed socket, loses the peer. Losing a worker fails the job
//! (naming the worker and its stages) and shuts every socket of the job, so no thread stays
//! blocked on a link; losing the coordinator makes a worker stop its stages and go back to
//! waiting for one.

pub mod cluster;
pub mod launch;
pub mod link;
pub mod wire;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::link::{LinkReceiver, LinkSender};
use crate::message::Report;
use crate::placement::StagePlan;
use wire::Role;

/// How often each side of a control connection says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a peer is lost. A closed socket (a process that died, on a host that
/// stays up) is noticed at once.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a worker is given to run: everything its stages need, nothing it must look up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub job: u64,
    pub config: RunConfig,
    /// The data's (channels, size, classes): the worker may not hold the data set.
    pub shape: (i64, i64, i64),
    /// Every stage of the plan (hosts named); the worker runs those placed on it.
    pub stages: Vec<StagePlan>,
    /// The run's checkpoint folder: stages write their parts there (a shared filesystem).
    pub checkpoints: PathBuf,
    /// The checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Where each host's stages take their input links ("" is the coordinator).
    pub hosts: BTreeMap<String, SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Assign(Box<Assignment>),
    Abort {
        job: u64,
        reason: String,
    },
    /// Registration refused (a worker of that name is registered already).
    Refused {
        reason: String,
    },
    Heartbeat,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToCoordinator {
    Report {
        job: u64,
        report: Report,
    },
    /// Every stage of the job on this worker has ended.
    Finished {
        job: u64,
    },
    Heartbeat,
}

/// The host key of a stage: its worker's name, or "" for the coordinator.
pub fn host_key(host: &Option<String>) -> &str {
    host.as_deref().unwrap_or("")
}

/// The sockets of one job in one process. Aborting shuts them all, which wakes every
/// thread blocked on them; a socket added after the abort is shut at once.
#[derive(Clone, Default)]
pub struct Sockets(Arc<Mutex<(bool, Vec<TcpStream>)>>);

impl Sockets {
    pub fn add(&self, s: &TcpStream) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 {
            let _ = s.shutdown(Shutdown::Both);
        } else if let Ok(c) = s.try_clone() {
            g.1.push(c);
        }
    }

    pub fn abort(&self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = true;
        for s in g.1.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn aborted(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// Incoming data links, waiting for the stage they feed: (job, stage) -> stream.
#[derive(Clone, Default)]
pub struct Rendezvous(Arc<(Mutex<Waiting>, Condvar)>);

/// Links arrived, by (job, stage they feed).
type Waiting = HashMap<(u64, usize), TcpStream>;

impl Rendezvous {
    pub fn arrive(&self, job: u64, stage: usize, s: TcpStream) {
        let (m, cv) = &*self.0;
        m.lock().unwrap_or_else(|p| p.into_inner()).insert((job, stage), s);
        cv.notify_all();
    }

    /// Waits for the link into `stage`, until it arrives or the job is aborted.
    pub fn take(&self, job: u64, stage: usize, sockets: &Sockets) -> Option<TcpStream> {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = g.remove(&(job, stage)) {
                return Some(s);
            }
            if sockets.aborted() {
                return None;
            }
            g = cv.wait_timeout(g, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Drops what a finished or failed job left waiting.
    pub fn forget(&self, job: u64) {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != job);
    }
}

/// How a process's stages reach neighbours in other processes.
pub struct Net {
    pub job: u64,
    pub secret: Arc<Vec<u8>>,
    pub hosts: BTreeMap<String, SocketAddr>,
    pub stages: Vec<StagePlan>,
    pub capacity: usize,
    pub sockets: Sockets,
    pub incoming: Rendezvous,
}

impl Net {
    /// The link into `stage` from whichever process holds stage - 1 (waits for it).
    pub fn input(&self, stage: usize) -> Result<Box<dyn LinkReceiver>, String> {
        let s = self
            .incoming
            .take(self.job, stage, &self.sockets)
            .ok_or_else(|| format!("the job stopped before the link into stage {stage} arrived"))?;
        self.sockets.add(&s);
        let rx = link::TcpReceiver::new(s, self.capacity, format!("stage-{stage}"))
            .map_err(|e| format!("link into stage {stage}: {e}"))?;
        Ok(Box::new(rx))
    }

    /// A link into `stage`, in the process that holds it.
    pub fn output(&self, stage: usize) -> Result<Box<dyn LinkSender>, String> {
        let key = host_key(&self.stages[stage].host);
        let addr = *self.hosts.get(key).ok_or_else(|| format!("no address for host {key:?} of stage {stage}"))?;
        let s = wire::connect(addr, &self.secret, Role::Link { job: self.job, stage })
            .map_err(|e| format!("link into stage {stage} at {addr}: {e}"))?;
        self.sockets.add(&s);
        Ok(Box::new(link::TcpSender::new(s, self.capacity)))
    }
}

/// A stage's report link in a worker: the control connection to the coordinator.
pub struct RemoteReports {
    pub job: u64,
    pub control: Arc<Mutex<TcpStream>>,
}

impl crate::link::ReportSender for RemoteReports {
    fn send(&self, report: Report) -> Result<(), crate::link::Closed> {
        let mut s = self.control.lock().unwrap_or_else(|p| p.into_inner());
        wire::write_frame(&mut *s, &ToCoordinator::Report { job: self.job, report }).map_err(|_| crate::link::Closed)
    }
}

/// Sends `beat` on `control` every [`HEARTBEAT`] until the connection fails or `stop` is set.
pub fn heartbeat<T: Serialize + Send + 'static>(
    control: Arc<Mutex<TcpStream>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    beat: fn() -> T,
) {
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || loop {
        std::thread::sleep(HEARTBEAT);
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut s = control.lock().unwrap_or_else(|p| p.into_inner());
        if wire::write_frame(&mut *s, &beat()).is_err() {
            return;
        }
    });
}
