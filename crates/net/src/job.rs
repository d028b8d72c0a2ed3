//! One job's links in one process: the sockets and NCCL groups to shut when the job
//! aborts, the data links that arrived before their stage asked for them, and the links
//! to stages in other processes that the pipeline asks for ([`JobLinks`], through
//! [`RemoteLinks`]).

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use layerwise_nccl::Group;
use layerwise_pipeline::link::{LinkReceiver, LinkSender, RemoteLinks};
use layerwise_plan::{DeviceId, GpuLink, Host, Plan, StagePlan};

use crate::wire::{self, Auth, Conn, Role};
use crate::{nccl_link, tcp};

/// The sockets and NCCL groups of one job in one process. Aborting shuts the sockets and
/// aborts the groups, which wakes every thread blocked on them and ends NCCL work stuck on
/// a lost peer; one added after the abort is shut at once.
#[derive(Clone, Default)]
pub struct Sockets(Arc<Mutex<Open>>);

/// What a job has open, until it is aborted.
#[derive(Default)]
struct Open {
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

/// Incoming data links, waiting for the stage they feed: (job, stage) -> connection.
#[derive(Clone, Default)]
pub struct Rendezvous(Arc<(Mutex<Waiting>, Condvar)>);

/// Links arrived, by (job, stage they feed), with when each arrived.
type Waiting = HashMap<(u64, usize), (Conn, Instant)>;

/// How long an arrived link waits for its stage before it is dropped (a job that never
/// starts here leaves none behind for good).
pub const LINK_UNCLAIMED: Duration = Duration::from_secs(600);
/// Links waiting at once in one process, at most.
pub const LINKS_WAITING: usize = 4096;

impl Rendezvous {
    /// A link that proved the secret, for the stage it names. A second link for a stage
    /// that has one waiting is refused (the first is kept), as is one past
    /// [`LINKS_WAITING`]; links unclaimed for [`LINK_UNCLAIMED`] are dropped.
    pub fn arrive(&self, job: u64, stage: usize, s: Conn) {
        self.arrive_at(job, stage, s, Instant::now())
    }

    fn arrive_at(&self, job: u64, stage: usize, s: Conn, at: Instant) {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|_, (_, arrived)| arrived.elapsed() < LINK_UNCLAIMED);
        let refused = if g.contains_key(&(job, stage)) {
            "a link into that stage is waiting already"
        } else if g.len() >= LINKS_WAITING {
            "too many links are waiting"
        } else {
            g.insert((job, stage), (s, at));
            cv.notify_all();
            return;
        };
        tracing::warn!("refused a link into stage {stage} of job {job:x} from {}: {refused}", s.peer);
    }

    /// Waits for the link into `stage`, until it arrives or the job is aborted.
    pub fn take(&self, job: u64, stage: usize, sockets: &Sockets) -> Option<Conn> {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((s, _)) = g.remove(&(job, stage)) {
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

/// How a process's stages reach neighbours in other processes, in one job.
pub struct JobLinks {
    pub job: u64,
    /// The secret, asking for encryption when this process or the job does.
    pub auth: Auth,
    /// Where each host takes the links into its stages.
    pub hosts: Vec<(Host, SocketAddr)>,
    pub stages: Vec<StagePlan>,
    pub capacity: usize,
    pub gpu_link: GpuLink,
    pub sockets: Sockets,
    pub incoming: Rendezvous,
    /// How long a link may make no progress before it fails (`pipeline.link_stall_s`).
    pub stall: Duration,
    /// The most bytes one message into each stage may hold.
    pub limits: Vec<u64>,
    /// The run's name (its folder's), under which the links' bytes are counted.
    pub run: String,
}

/// The most bytes one message into each stage of `plan` can hold: its largest batch of
/// inputs (the data for stage 0, the previous stage's output after) and labels, counted
/// at 8 bytes an element; a header that claims more is refused before anything is
/// allocated.
pub fn message_limits(plan: &Plan) -> Vec<u64> {
    let batch = plan.config.train.batch_size.max(plan.config.train.eval_batch()) as u64;
    let input = plan.arch.input.channels * plan.arch.input.size * plan.arch.input.size;
    let data = plan.shape.input.channels * plan.shape.input.size * plan.shape.input.size;
    let per_example = |s: &StagePlan| match s.index {
        0 => input.max(data),
        i => plan.stages[i - 1].layers.last().and_then(|&l| plan.arch.hidden.get(l)).map_or(0, |l| l.output_numel()),
    };
    let bytes = |s: &StagePlan| batch.saturating_mul(u64::try_from(per_example(s)).unwrap_or(0).saturating_add(1) * 8);
    plan.stages.iter().map(bytes).collect()
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

impl JobLinks {
    /// The links of job `job` of `plan` in one process (the coordinator's or a worker's).
    pub fn new(
        (job, run): (u64, &str),
        plan: &Plan,
        auth: &Auth,
        hosts: Vec<(Host, SocketAddr)>,
        sockets: Sockets,
        incoming: Rendezvous,
    ) -> Self {
        let pipeline = &plan.config.pipeline;
        let (stages, capacity, gpu_link) = (plan.stages.clone(), pipeline.channel_capacity, pipeline.gpu_link);
        let auth = auth.encrypting_if(pipeline.encrypt);
        let (stall, limits) = (Duration::from_secs_f64(pipeline.link_stall_s), message_limits(plan));
        Self { job, auth, hosts, stages, capacity, gpu_link, sockets, incoming, stall, limits, run: run.to_string() }
    }

    /// [`nccl_ends`] of the link into `stage`, in this job's plan.
    pub fn nccl_ends(&self, stage: usize) -> Option<(usize, usize)> {
        nccl_ends(self.gpu_link, &self.stages, stage)
    }
}

impl RemoteLinks for JobLinks {
    /// The link into `stage` from whichever process holds stage - 1 (waits for it).
    fn input(&self, stage: usize) -> Result<Box<dyn LinkReceiver>, String> {
        let mut s = self
            .incoming
            .take(self.job, stage, &self.sockets)
            .ok_or_else(|| format!("the job stopped before the link into stage {stage} arrived"))?;
        self.sockets.add(s.socket());
        let nccl = match self.nccl_ends(stage) {
            None => None,
            Some((_, gpu)) => {
                let group = nccl_link::receiver(&mut s, gpu)
                    .map_err(|e| format!("link into stage {stage} (cuda:{gpu}): {e}"))?;
                self.sockets.add_group(&group);
                Some((group, tch::Device::Cuda(gpu)))
            }
        };
        let inbound = tcp::Inbound {
            capacity: self.capacity,
            limit: self.limits[stage],
            stall: self.stall,
            what: format!("stage {stage}"),
            received: crate::traffic::counter(&self.run, stage, crate::traffic::Direction::Received),
        };
        let rx = tcp::TcpReceiver::new(s, inbound, nccl).map_err(|e| format!("link into stage {stage}: {e}"))?;
        Ok(Box::new(rx))
    }

    /// A link into `stage`, in the process that holds it.
    fn output(&self, stage: usize) -> Result<Box<dyn LinkSender>, String> {
        let host = &self.stages[stage].host;
        let addr = self.hosts.iter().find(|(h, _)| h == host).map(|(_, a)| *a);
        let addr = addr.ok_or_else(|| format!("no address for {host}, which holds stage {stage}"))?;
        let mut s = wire::connect(addr, &self.auth, Role::Link { job: self.job, stage })
            .map_err(|e| format!("link into stage {stage} at {addr}: {e}"))?;
        self.sockets.add(s.socket());
        let nccl = match self.nccl_ends(stage) {
            None => None,
            Some((gpu, _)) => {
                let group = nccl_link::sender(&mut s, gpu)
                    .map_err(|e| format!("NCCL link into stage {stage} at {addr} (from cuda:{gpu}): {e}"))?;
                self.sockets.add_group(&group);
                Some(group)
            }
        };
        let sealed = if s.encrypted { "encrypted" } else { "authenticated" };
        tracing::info!("link into stage {stage} at {addr}: {sealed}");
        let tx = tcp::TcpSender::new(s, self.capacity, nccl, self.stall)
            .map_err(|e| format!("link into stage {stage} at {addr}: {e}"))?
            .counting(crate::traffic::counter(&self.run, stage, crate::traffic::Direction::Sent));
        Ok(Box::new(tx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_plan::placement::one_layer_each;
    use std::net::TcpListener;

    fn net(gpu_link: GpuLink, devices: [DeviceId; 2], addr: SocketAddr) -> JobLinks {
        let w = Host::Worker("w".into());
        JobLinks {
            job: 5,
            auth: wire::testing::auth(),
            hosts: vec![(w.clone(), addr)],
            stages: one_layer_each(&[(Host::Coordinator, devices[0]), (w, devices[1])]),
            capacity: 2,
            gpu_link,
            sockets: Sockets::default(),
            incoming: Rendezvous::default(),
            stall: Duration::from_secs(600),
            limits: vec![1 << 20; 2],
            run: "test".into(),
        }
    }

    /// A second link for a stage does not replace the one waiting; a link left unclaimed
    /// past LINK_UNCLAIMED is dropped when the next arrives.
    #[test]
    fn a_waiting_link_is_neither_replaced_nor_kept_for_good() {
        let incoming = Rendezvous::default();
        let (first, second) = (wire::testing::sealed_pair(false).1, wire::testing::sealed_pair(false).1);
        let first_peer = first.peer;
        incoming.arrive(1, 1, first);
        incoming.arrive(1, 1, second);
        let open = Sockets::default();
        assert_eq!(incoming.take(1, 1, &open).map(|c| c.peer), Some(first_peer), "the first stays");
        let long_ago = Instant::now().checked_sub(LINK_UNCLAIMED + Duration::from_secs(1)).unwrap();
        incoming.arrive_at(2, 1, wire::testing::sealed_pair(false).1, long_ago);
        incoming.arrive(3, 1, wire::testing::sealed_pair(false).1);
        let gone = Sockets::default();
        gone.abort();
        assert!(incoming.take(2, 1, &gone).is_none(), "the stale link was dropped");
        assert!(incoming.take(3, 1, &gone).is_some());
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

    /// Both ends of an NCCL link make their group over the authenticated link and only
    /// then need a GPU: on a machine without one, each end fails naming its stage, its
    /// device and the reason. (scripts/gpu-check.sh sends over the link on GPUs.)
    #[test]
    fn the_ends_of_an_nccl_link_meet_and_then_name_the_missing_gpu() {
        // Where there are GPUs this claim does not hold: there, skip this test by name
        // (`--skip the_ends_of_an_nccl_link`); scripts/gpu-check.sh sends over the link.
        assert_eq!(tch::Cuda::device_count(), 0, "a test of the GPU-less path, on a machine with GPUs");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let receiving = Arc::new(net(GpuLink::Nccl, [DeviceId::Cuda(0), DeviceId::Cuda(1)], addr));
        let (auth, incoming) = (receiving.auth.clone(), receiving.incoming.clone());
        std::thread::spawn(move || {
            let (role, conn) = wire::accept(listener.accept().unwrap().0, &auth).unwrap();
            assert_eq!(role, Role::Link { job: 5, stage: 1 });
            incoming.arrive(5, 1, conn);
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
