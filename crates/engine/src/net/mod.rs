//! Stages in other processes and on other hosts. A coordinator (`layerwise train`, or a
//! rank 0 launched by torchrun or Slurm) listens; workers (`layerwise worker`, or the other
//! ranks) connect, prove the shared secret and offer their devices (and say which machine
//! they run on: stages on one machine share its cores). For `auto` over workers, the
//! coordinator first asks each to time the layers on its device. For a job, the
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

use layerwise_nccl::{Group, Store};

use crate::config::{GpuLink, RunConfig};
use crate::link::{LinkReceiver, LinkSender};
use crate::message::Report;
use crate::placement::StagePlan;
use crate::plan::DeviceId;
use wire::Role;

/// How often each side of a control connection says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a peer is lost. A closed socket (a process that died, on a host that
/// stays up) is noticed at once.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an NCCL link may take to meet its peer, and one transfer may take, before
/// c10d aborts it (a lost peer is normally noticed sooner, by [`PEER_TIMEOUT`], and the
/// job's groups aborted then).
pub const NCCL_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// Time each layer's training step on `device` (for `auto` over workers); answered by
    /// [`ToCoordinator::Measured`] with the same `request`.
    Measure {
        request: u64,
        config: Box<RunConfig>,
        /// The data's (channels, size, classes).
        shape: (i64, i64, i64),
        device: DeviceId,
        /// Intra-op threads to time them with: the worker's share of its machine's budget
        /// once the stages are placed (see [`crate::placement::share_threads`]).
        threads: usize,
    },
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
    Measured {
        request: u64,
        times: Measurement,
    },
    Heartbeat,
}

/// A worker's answer to [`ToWorker::Measure`]: seconds per training step of each layer
/// (the output layer last), or why it could not measure.
pub type Measurement = std::result::Result<Vec<f64>, String>;

/// The host key of a stage: its worker's name, or "" for the coordinator.
pub fn host_key(host: &Option<String>) -> &str {
    host.as_deref().unwrap_or("")
}

/// The sockets and NCCL groups of one job in one process. Aborting shuts the sockets and
/// aborts the groups, which wakes every thread blocked on them and ends NCCL work stuck on
/// a lost peer; one added after the abort is shut at once.
#[derive(Clone, Default)]
pub struct Sockets(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    aborted: bool,
    sockets: Vec<TcpStream>,
    groups: Vec<Arc<Group>>,
}

impl Sockets {
    pub fn add(&self, s: &TcpStream) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.aborted {
            let _ = s.shutdown(Shutdown::Both);
        } else if let Ok(c) = s.try_clone() {
            g.sockets.push(c);
        }
    }

    pub fn add_group(&self, group: &Arc<Group>) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.aborted {
            group.abort();
        } else {
            g.groups.push(group.clone());
        }
    }

    pub fn abort(&self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.aborted = true;
        for s in g.sockets.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for group in g.groups.drain(..) {
            group.abort();
        }
    }

    pub fn aborted(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).aborted
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
    pub gpu_link: GpuLink,
    pub sockets: Sockets,
    pub incoming: Rendezvous,
}

/// What the receiving end of an NCCL link tells the sender, over the link's authenticated
/// TCP connection: where its TCPStore listens and the key prefix of this link's group.
#[derive(Serialize, Deserialize)]
struct NcclOffer {
    port: u16,
    prefix: String,
}

/// The GPUs at both ends of the link into `stage` when that link, should it cross
/// processes, goes over NCCL: the sending stage's last device and the receiving stage's
/// first, both GPUs, with `pipeline.gpu_link` "nccl". Every process decides from the same
/// plan.
pub fn nccl_ends(gpu_link: GpuLink, stages: &[StagePlan], stage: usize) -> Option<(usize, usize)> {
    if gpu_link != GpuLink::Nccl || stage == 0 {
        return None;
    }
    match (stages[stage - 1].devices.last()?, stages.get(stage)?.devices.first()?) {
        (DeviceId::Cuda(from), DeviceId::Cuda(to)) => Some((*from, *to)),
        _ => None,
    }
}

/// The store key by which the sender of an NCCL link says it has joined the receiver's
/// store (outside the prefix that c10d's keys take).
fn joined_key(prefix: &str) -> String {
    format!("{prefix}:joined")
}

impl Net {
    /// [`nccl_ends`] of the link into `stage`, in this job's plan.
    pub fn nccl_ends(&self, stage: usize) -> Option<(usize, usize)> {
        nccl_ends(self.gpu_link, &self.stages, stage)
    }

    /// The link into `stage` from whichever process holds stage - 1 (waits for it).
    pub fn input(&self, stage: usize) -> Result<Box<dyn LinkReceiver>, String> {
        let mut s = self
            .incoming
            .take(self.job, stage, &self.sockets)
            .ok_or_else(|| format!("the job stopped before the link into stage {stage} arrived"))?;
        self.sockets.add(&s);
        let nccl = match self.nccl_ends(stage) {
            None => None,
            Some((_, gpu)) => {
                let store = Store::serve(NCCL_TIMEOUT).map_err(|e| format!("link into stage {stage}: {e}"))?;
                let offer = NcclOffer { port: store.port(), prefix: format!("layerwise/{}", wire::nonce()) };
                wire::write_frame(&mut s, &offer).map_err(|e| format!("link into stage {stage}: {e}"))?;
                // The store must outlive the sender's joining it, whatever happens here next.
                store.get(&joined_key(&offer.prefix)).map_err(|e| format!("link into stage {stage}: {e}"))?;
                let group = Group::new(Arc::new(store), &offer.prefix, link::NCCL_RECEIVER, 2, NCCL_TIMEOUT)
                    .map(Arc::new)
                    .map_err(|e| format!("link into stage {stage} (cuda:{gpu}): {e}"))?;
                self.sockets.add_group(&group);
                Some((group, tch::Device::Cuda(gpu)))
            }
        };
        let rx = link::TcpReceiver::new(s, self.capacity, format!("stage-{stage}"), nccl)
            .map_err(|e| format!("link into stage {stage}: {e}"))?;
        Ok(Box::new(rx))
    }

    /// A link into `stage`, in the process that holds it.
    pub fn output(&self, stage: usize) -> Result<Box<dyn LinkSender>, String> {
        let key = host_key(&self.stages[stage].host);
        let addr = *self.hosts.get(key).ok_or_else(|| format!("no address for host {key:?} of stage {stage}"))?;
        let mut s = wire::connect(addr, &self.secret, Role::Link { job: self.job, stage })
            .map_err(|e| format!("link into stage {stage} at {addr}: {e}"))?;
        self.sockets.add(&s);
        let nccl = match self.nccl_ends(stage) {
            None => None,
            Some((gpu, _)) => {
                let what = |e: String| format!("NCCL link into stage {stage} at {addr} (from cuda:{gpu}): {e}");
                s.set_read_timeout(Some(wire::HANDSHAKE_TIMEOUT)).map_err(|e| what(e.to_string()))?;
                let offer: NcclOffer = wire::read_frame(&mut s).map_err(|e| what(e.to_string()))?;
                s.set_read_timeout(None).map_err(|e| what(e.to_string()))?;
                let store = Store::connect(&addr.ip().to_string(), offer.port, NCCL_TIMEOUT).map_err(what)?;
                store.set(&joined_key(&offer.prefix), "1").map_err(what)?;
                let group = Group::new(Arc::new(store), &offer.prefix, link::NCCL_SENDER, 2, NCCL_TIMEOUT)
                    .map(Arc::new)
                    .map_err(what)?;
                self.sockets.add_group(&group);
                Some(group)
            }
        };
        Ok(Box::new(link::TcpSender::new(s, self.capacity, nccl)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn net(gpu_link: GpuLink, devices: [DeviceId; 2], addr: SocketAddr) -> Net {
        let stage = |index: usize, device: DeviceId, host: Option<&str>| StagePlan {
            index,
            layers: vec![index],
            devices: vec![device],
            threads: 1,
            check_finite_every: 1,
            host: host.map(str::to_string),
        };
        Net {
            job: 5,
            secret: Arc::new(b"a secret of sixteen".to_vec()),
            hosts: [("w".to_string(), addr)].into(),
            stages: vec![stage(0, devices[0], None), stage(1, devices[1], Some("w"))],
            capacity: 2,
            gpu_link,
            sockets: Sockets::default(),
            incoming: Rendezvous::default(),
        }
    }

    #[test]
    fn only_a_link_between_two_gpus_with_gpu_link_nccl_goes_over_nccl() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (cpu, gpu0, gpu1) = (DeviceId::Cpu, DeviceId::Cuda(0), DeviceId::Cuda(1));
        assert_eq!(net(GpuLink::Nccl, [gpu0, gpu1], addr).nccl_ends(1), Some((0, 1)));
        assert_eq!(net(GpuLink::Nccl, [gpu0, gpu1], addr).nccl_ends(0), None, "the loader's link is the host's");
        assert_eq!(net(GpuLink::Nccl, [cpu, gpu1], addr).nccl_ends(1), None);
        assert_eq!(net(GpuLink::Nccl, [gpu0, cpu], addr).nccl_ends(1), None);
        assert_eq!(net(GpuLink::Tcp, [gpu0, gpu1], addr).nccl_ends(1), None);
    }

    /// Both ends of an NCCL link meet over the authenticated TCP link (the receiver's
    /// TCPStore port and key prefix cross it, the sender connects to that store) and only
    /// then need a GPU: on a machine without one, each end fails naming its stage, its
    /// device and the reason. (scripts/gpu-check.sh sends over the link on GPUs.)
    #[test]
    fn the_ends_of_an_nccl_link_meet_and_then_name_the_missing_gpu() {
        if tch::Cuda::device_count() > 0 {
            eprintln!("this machine has GPUs: scripts/gpu-check.sh checks NCCL links on it");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let receiving = Arc::new(net(GpuLink::Nccl, [DeviceId::Cuda(0), DeviceId::Cuda(1)], addr));
        let (secret, incoming) = (receiving.secret.clone(), receiving.incoming.clone());
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert_eq!(wire::accept(&mut s, &secret).unwrap(), Role::Link { job: 5, stage: 1 });
            incoming.arrive(5, 1, s);
        });
        let r = receiving.clone();
        let input = std::thread::spawn(move || r.input(1).err().expect("no GPU to receive on"));
        let sending = net(GpuLink::Nccl, [DeviceId::Cuda(0), DeviceId::Cuda(1)], addr);
        let out = sending.output(1).err().expect("no GPU to send from");
        let inp = input.join().unwrap();
        assert!(out.contains("stage 1") && out.contains("from cuda:0") && out.contains("no GPUs found"), "{out}");
        assert!(inp.contains("link into stage 1 (cuda:1)") && inp.contains("no GPUs found"), "{inp}");
    }
}
