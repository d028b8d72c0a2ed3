//! A job's stages on workers, from the coordinator's side: each worker checked (devices,
//! memory), held for the job (all or none), handed its assignment; the job's links here;
//! and the job's end (aborted everywhere, or waited for).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::Sender;
use layerwise_pipeline::message::Report;
use layerwise_plan::placement::{share_threads, this_process, Processes};
use layerwise_plan::{GpuLink, Host, Plan, StagePlan};

use crate::cluster::{Cluster, JobHold, WorkerConn};
use crate::job::{nccl_ends, JobLinks, Sockets};
use crate::protocol::{Assignment, ToWorker, PEER_TIMEOUT};
use crate::{Error, Result};

/// This process and `workers`: each one's cores and machine.
pub fn processes(plan: &Plan, workers: &[Arc<WorkerConn>]) -> Processes {
    let mut all = this_process(plan.machine.cores);
    all.extend(workers.iter().map(|w| (Host::Worker(w.name.clone()), (w.cores, w.machine.clone()))));
    all
}

/// Gives every CPU stage of `plan` its threads now that `workers` (those it places stages
/// on) have registered: stages on one machine share its cores, whichever process they are
/// in (a coordinator and two workers on one 2-core host get a thread each, not two each).
pub fn share_threads_with(plan: &mut Plan, workers: &[Arc<WorkerConn>]) {
    let processes = processes(plan, workers);
    share_threads(&mut plan.stages, &plan.config, &processes);
}

impl Cluster {
    /// Starts `plan`'s stages on `workers` (registered, those the plan names): checks each
    /// offers the devices placed on it with the memory its layers need, holds every one
    /// for the job (or none, if one is busy), hands each its assignment, and returns the
    /// job. Reports from the workers' stages go to `reports`.
    pub fn start_job(
        &self,
        plan: &Plan,
        workers: &[Arc<WorkerConn>],
        checkpoints: &Path,
        resume: Option<&Path>,
        reports: &Sender<Report>,
    ) -> Result<RemoteJob> {
        check_gpu_links(plan.config.pipeline.gpu_link, &plan.stages, layerwise_nccl::missing())?;
        let processes = processes(plan, workers);
        for w in workers {
            check_worker(plan, w, &processes)?;
        }
        let id = rand::random::<u64>();
        let sockets = Sockets::default();
        let mut hosts = vec![(Host::Coordinator, self.addr)];
        hosts.extend(workers.iter().map(|w| (Host::Worker(w.name.clone()), w.data_addr)));
        let run = crate::assignment::run_name(checkpoints);
        let links = JobLinks::new((id, &run), plan, &self.auth, hosts.clone(), sockets.clone(), self.incoming.clone());
        let job = RemoteJob { id, workers: workers.to_vec(), links: Arc::new(links), probe: Default::default() };
        job.hold(plan, reports, &sockets)?;
        // Resolved (no `.`, `..` or links): a worker refuses any other kind of path.
        let absolute = |p: &Path| {
            let resolved = match (p.parent(), p.file_name()) {
                (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => {
                    std::fs::canonicalize(dir).map(|d| d.join(name))
                }
                _ => std::path::absolute(p),
            };
            resolved.map_err(|e| Error::Other(format!("{}: {e}", p.display())))
        };
        let checkpoints = absolute(checkpoints)?;
        let probe = crate::wire::nonce();
        let probe_file = crate::protocol::probe_file(&checkpoints, id);
        if let Err(e) = layerwise_rundir::status::write_atomic(&probe_file, probe.as_bytes()) {
            job.abort("the run directory cannot be written");
            return Err(Error::Other(format!("cannot write {}: {e}", probe_file.display())));
        }
        *job.probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(probe_file);
        let mut assignment = Assignment {
            job: id,
            config: plan.config.clone(),
            shape: plan.shape,
            stages: plan.stages.clone(),
            checkpoints,
            resume: resume.map(absolute).transpose()?,
            probe,
            hosts,
        };
        for (k, w) in workers.iter().enumerate() {
            // The coordinator as this worker reaches it: a listener on 0.0.0.0 is not an address.
            assignment.hosts[0].1 = advertised(self.addr, w.coordinator_addr);
            if !w.send(&ToWorker::Assign(Box::new(assignment.clone()))) {
                job.abort("a worker was lost while the job started");
                workers[k..].iter().for_each(|w| w.release(id)); // not sent anything: nothing to end
                return Err(Error::Other(format!("worker {} ({}) was lost before its assignment", w.name, w.peer)));
            }
            let mine: Vec<usize> = plan.stages.iter().filter(|s| s.host.is_worker(&w.name)).map(|s| s.index).collect();
            tracing::info!("worker {} ({}) runs stage(s) {mine:?}", w.name, w.peer);
        }
        Ok(job)
    }
}

/// The coordinator's address for a worker that reached it at `seen`: the listener's own
/// address, unless that is a wildcard (0.0.0.0, ::), which no one can dial.
fn advertised(listening: SocketAddr, seen: SocketAddr) -> SocketAddr {
    if listening.ip().is_unspecified() {
        SocketAddr::new(seen.ip(), listening.port())
    } else {
        listening
    }
}

/// Refuses a worker that lacks a device placed on it, or the memory for its layers (with
/// the CPU stages of the other processes on its machine).
fn check_worker(plan: &Plan, w: &WorkerConn, processes: &Processes) -> Result<()> {
    for s in plan.stages.iter().filter(|s| s.host.is_worker(&w.name)) {
        if let Some(d) = s.devices.iter().find(|d| !w.devices.contains(d)) {
            let offers: Vec<String> = w.devices.iter().map(|d| d.to_string()).collect();
            return Err(Error::Config(format!(
                "pipeline.placement[{}].device: worker {} has no {d} (it offers {})",
                s.index,
                w.name,
                offers.join(", ")
            )));
        }
    }
    let host = Host::Worker(w.name.clone());
    let beside: Vec<Host> =
        processes.iter().filter(|(h, (_, m))| *m == w.machine && **h != host).map(|(h, _)| h.clone()).collect();
    let memory = |d| w.devices.iter().position(|o| *o == d).and_then(|i| w.memory[i]);
    Ok(plan.check_worker_memory(&w.name, &beside, memory)?)
}

/// A job's hold on its workers.
pub struct RemoteJob {
    pub id: u64,
    workers: Vec<Arc<WorkerConn>>,
    pub links: Arc<JobLinks>,
    /// The run directory's probe file, removed when the job is over.
    probe: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl Drop for RemoteJob {
    fn drop(&mut self) {
        if let Some(p) = self.probe.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl RemoteJob {
    /// Holds every worker for this job, or, when one is busy with another, none of them.
    fn hold(&self, plan: &Plan, reports: &Sender<Report>, sockets: &Sockets) -> Result<()> {
        for (k, w) in self.workers.iter().enumerate() {
            let mut held = w.lock_job();
            if let Some(other) = held.as_ref() {
                let busy = Error::Other(format!("worker {} is busy with another job ({:x})", w.name, other.id));
                drop(held);
                self.workers[..k].iter().for_each(|w| w.release(self.id));
                return Err(busy);
            }
            let stages: Vec<usize> =
                plan.stages.iter().filter(|s| s.host.is_worker(&w.name)).map(|s| s.index).collect();
            let (first_stage, runs_last) =
                (stages.first().copied().unwrap_or(0), stages.contains(&(plan.stages.len() - 1)));
            let (reports, sockets) = (reports.clone(), sockets.clone());
            *held = Some(JobHold { id: self.id, reports, sockets, first_stage, stages, runs_last });
        }
        Ok(())
    }

    /// Stops the job everywhere: the workers are told, and every socket of the job here is
    /// shut, so no stage of this process stays blocked on a link.
    pub fn abort(&self, reason: &str) {
        self.links.sockets.abort();
        for w in &self.workers {
            if w.job() == Some(self.id) {
                w.send(&ToWorker::Abort { job: self.id, reason: reason.into() });
            }
        }
    }

    /// Waits until each worker has ended its stages of the job (or was lost).
    pub fn finish(self) {
        for w in &self.workers {
            w.wait_released(self.id, 2 * PEER_TIMEOUT);
        }
        self.links.incoming.forget(self.id);
    }
}

/// Refuses, before any worker is held, a plan with a link between GPUs in two processes
/// that should go over NCCL when this build has none (`missing`: why).
fn check_gpu_links(gpu_link: GpuLink, stages: &[StagePlan], missing: Option<&str>) -> Result<()> {
    let Some(why) = missing else { return Ok(()) };
    for b in 1..stages.len() {
        if stages[b - 1].host != stages[b].host && nccl_ends(gpu_link, stages, b).is_some() {
            return Err(Error::Config(format!(
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
    use crate::cluster::testing::{fake_worker, next_message};
    use layerwise_plan::placement::one_layer_each;
    use layerwise_plan::{DeviceId, Machine, Placement, RunConfig, StageSpec};
    use std::time::Duration;

    fn listen(addr: &str) -> Arc<Cluster> {
        Cluster::listen(addr, crate::wire::testing::auth(), Duration::from_secs(600)).unwrap()
    }

    /// Layers 0 and 1 in this process, then two layers on each of `workers` (a hidden
    /// layer of 1024 features among them: 1 MiB is not enough).
    fn placed_on(workers: &[&str]) -> Plan {
        let mut c = RunConfig::default();
        c.model.num_layers = 2 * workers.len() + 1;
        let mut stages = vec![StageSpec { layers: vec![0, 1], device: "cpu".into() }];
        for (i, w) in workers.iter().enumerate() {
            stages.push(StageSpec { layers: vec![2 * i + 2, 2 * i + 3], device: format!("{w}/cpu") });
        }
        c.pipeline.placement = Placement::Stages(stages);
        Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap()
    }

    fn start(cluster: &Cluster, plan: &Plan, dir: &Path) -> Result<RemoteJob> {
        let names: Vec<String> = plan.workers().into_iter().collect();
        let workers = cluster.wait_for(&names, None)?;
        cluster.start_job(plan, &workers, dir, None, &crossbeam_channel::unbounded().0)
    }

    #[test]
    fn a_worker_without_the_memory_for_its_layers_is_refused_before_it_is_sent_anything() {
        let cluster = listen("127.0.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        let _small = fake_worker(&cluster, cluster.addr, "small", "elsewhere", 1 << 20);
        let e = start(&cluster, &placed_on(&["small"]), dir.path()).err().expect("1 MiB was given the job");
        let e = e.to_string();
        assert!(e.contains("worker small's host has 0.0 GiB") && e.contains("needs about"), "{e}");
        // Refused before the worker was held for the job, and still registered.
        let small = cluster.wait_for(&["small".to_string()], None).unwrap();
        assert_eq!(small[0].job(), None, "the refused job holds the worker");
        // A worker with the memory is sent the job.
        let mut big = fake_worker(&cluster, cluster.addr, "big", "elsewhere", 1 << 40);
        let job = start(&cluster, &placed_on(&["big"]), dir.path()).unwrap();
        let ToWorker::Assign(assigned) = next_message(&mut big).unwrap() else { panic!("not an assignment") };
        assert_eq!(assigned.job, job.id);
        job.abort("test over");
        // On this machine, a worker's host memory also holds this process's CPU stages:
        // memory for its own layers alone is not enough.
        let plan = placed_on(&["near"]);
        let near = Host::Worker("near".into());
        let alone = plan.device_needs(&near, &[])[&DeviceId::Cpu];
        let both = plan.device_needs(&near, &[Host::Coordinator])[&DeviceId::Cpu];
        assert!(both > alone * 1.01, "{both} against {alone}");
        let machine = layerwise_plan::machine::machine_id();
        let _near = fake_worker(&cluster, cluster.addr, "near", &machine, ((alone + both) / 2.0) as u64);
        let e = start(&cluster, &plan, dir.path()).err().expect("no memory for both processes' layers").to_string();
        assert!(e.contains("worker near's host has") && e.contains("with the CPU stages of the coordinator"), "{e}");
    }

    /// A job that finds its second worker busy holds neither: the first is free for the
    /// next job at once (before, it kept the refused job's hold and waited for good).
    #[test]
    fn a_job_that_finds_a_worker_busy_holds_none_of_its_workers() {
        let cluster = listen("127.0.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        let (_a, mut b) = (
            fake_worker(&cluster, cluster.addr, "a", "elsewhere", 1 << 40),
            fake_worker(&cluster, cluster.addr, "b", "elsewhere", 1 << 40),
        );
        let busy = start(&cluster, &placed_on(&["b"]), dir.path()).unwrap();
        assert!(matches!(next_message(&mut b).unwrap(), ToWorker::Assign(_)));
        let e = start(&cluster, &placed_on(&["a", "b"]), dir.path()).err().expect("b is busy").to_string();
        assert!(e.contains("worker b is busy"), "{e}");
        let a = cluster.wait_for(&["a".to_string()], None).unwrap();
        assert_eq!(a[0].job(), None, "worker a is still held by the refused job");
        let next = start(&cluster, &placed_on(&["a"]), dir.path()).expect("a takes the next job");
        next.abort("test over");
        busy.abort("test over");
    }

    /// A coordinator listening on 0.0.0.0 tells each worker the address the worker reached
    /// it at, with the listener's port; one listening on an address tells that address.
    #[test]
    fn a_coordinator_on_a_wildcard_address_advertises_the_one_its_worker_reached() {
        let cluster = listen("0.0.0.0:0");
        assert!(cluster.addr.ip().is_unspecified());
        let dir = tempfile::tempdir().unwrap();
        let reach: SocketAddr = format!("127.0.0.1:{}", cluster.addr.port()).parse().unwrap();
        let mut w = fake_worker(&cluster, reach, "w", "elsewhere", 1 << 40);
        let job = start(&cluster, &placed_on(&["w"]), dir.path()).unwrap();
        let ToWorker::Assign(a) = next_message(&mut w).unwrap() else { panic!("not an assignment") };
        assert_eq!(a.hosts[0], (Host::Coordinator, reach), "{:?}", a.hosts);
        job.abort("test over");
        let fixed: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        assert_eq!(advertised(fixed, reach), fixed);
    }

    /// A job started on one fake worker "w" (stage 0 here, stage 1 there), its assignment
    /// read: the cluster, the run folder, the worker's connection, the job, its reports.
    struct Started {
        cluster: Arc<Cluster>,
        dir: tempfile::TempDir,
        w: crate::wire::Conn,
        job: RemoteJob,
        reports: crossbeam_channel::Receiver<layerwise_pipeline::message::Report>,
    }

    fn started() -> Started {
        let cluster = listen("127.0.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        let mut w = fake_worker(&cluster, cluster.addr, "w", "elsewhere", 1 << 40);
        let plan = placed_on(&["w"]);
        let (reports_tx, reports) = crossbeam_channel::unbounded();
        let workers = cluster.wait_for(&["w".to_string()], None).unwrap();
        let job = cluster.start_job(&plan, &workers, dir.path(), None, &reports_tx).unwrap();
        assert!(matches!(next_message(&mut w).unwrap(), ToWorker::Assign(_)));
        let _ = reports_tx; // the job's hold keeps its own clone
        Started { cluster, dir, w, job, reports }
    }

    /// A worker's failure reason is free text from another process: it reaches the
    /// coordinator's reports (and so its log and status.json) bounded and without control
    /// characters.
    #[test]
    fn a_workers_failure_reason_arrives_bounded_and_printable() {
        use crate::protocol::{ToCoordinator, MAX_REASON};
        use layerwise_pipeline::message::{Report, StageFailure};
        let Started { cluster: _cluster, dir: _dir, mut w, job, reports } = started();
        let reason = format!("\u{1b}[2J\u{1b}[31mowned\r\n{}", "x".repeat(100_000));
        let sent = reason.len();
        let failure = StageFailure { stage: 1, layer: None, step: None, reason };
        let report = ToCoordinator::Report { job: job.id, report: Report::Failed(failure) };
        w.writer.frame(&report).unwrap();
        let Report::Failed(got) = reports.recv().unwrap() else { panic!("not a failure") };
        assert!(got.reason.len() <= MAX_REASON + 32, "{} bytes", got.reason.len());
        assert!(!got.reason.chars().any(char::is_control), "{:?}", &got.reason[..40]);
        let said = format!("({sent} bytes)");
        assert!(got.reason.starts_with("\\u{1b}[2J") && got.reason.ends_with(&said), "{}", &got.reason[..40]);
        job.abort("test over");
    }

    /// A worker speaks for its own stages only: its report for a stage another process
    /// runs fails the job naming it, instead of being taken as that stage's.
    #[test]
    fn a_report_for_a_stage_the_worker_does_not_run_fails_the_job() {
        use crate::protocol::ToCoordinator;
        use layerwise_pipeline::message::{EpochStats, Report, StageTiming};
        let cluster = listen("127.0.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        let mut w = fake_worker(&cluster, cluster.addr, "w", "elsewhere", 1 << 40);
        let plan = placed_on(&["w"]); // stage 0 here, stage 1 (the last) on w
        let (reports_tx, reports) = crossbeam_channel::unbounded();
        let workers = cluster.wait_for(&["w".to_string()], None).unwrap();
        let job = cluster.start_job(&plan, &workers, dir.path(), None, &reports_tx).unwrap();
        assert!(matches!(next_message(&mut w).unwrap(), ToWorker::Assign(_)));
        let stats = |stage| {
            let timing = StageTiming::default();
            Report::EpochStats(EpochStats { epoch: 1, stage, layers: vec![], output: None, timing, train_done: 0.0 })
        };
        for (report, taken) in [(stats(1), true), (stats(0), false)] {
            w.writer.frame(&ToCoordinator::Report { job: job.id, report: report.clone() }).unwrap();
            match reports.recv().unwrap() {
                Report::Failed(f) if !taken => {
                    assert!(f.reason.contains("worker w sent a report for stage 0, which it does not run"), "{f}")
                }
                got => assert_eq!((got, taken), (report, true)),
            }
        }
        job.abort("test over");
    }

    /// A worker that sends reports faster than they are read is dropped, and its job fails
    /// naming it, once REPORTS_WAITING are waiting: memory does not grow with a flood.
    #[test]
    fn a_worker_flooding_reports_is_dropped_and_its_job_fails() {
        use crate::cluster::REPORTS_WAITING;
        use crate::protocol::ToCoordinator;
        use layerwise_pipeline::message::{EpochStats, Report, StageTiming};
        let Started { cluster, dir: _dir, mut w, job, reports } = started();
        let timing = StageTiming::default();
        let stats = Report::EpochStats(EpochStats {
            epoch: 1,
            stage: 1,
            layers: vec![],
            output: None,
            timing,
            train_done: 0.0,
        });
        let report = ToCoordinator::Report { job: job.id, report: stats };
        for _ in 0..=REPORTS_WAITING {
            if w.writer.frame(&report).is_err() {
                break; // dropped, as it should be
            }
        }
        // Nothing is read until the coordinator has dropped the worker.
        while cluster.registered().contains(&"w".to_string()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut taken = 0;
        let f = loop {
            match reports.recv().unwrap() {
                Report::Failed(f) => break f,
                _ => taken += 1,
            }
        };
        assert_eq!(taken, REPORTS_WAITING, "the flood was cut at the bound");
        assert!(f.reason.contains("worker w") && f.reason.contains("faster than they are read"), "{f}");
        job.abort("test over");
    }

    #[test]
    fn a_gpu_link_over_nccl_without_nccl_is_refused_before_anything_starts() {
        let (gpu, cpu, w1) = (DeviceId::Cuda(0), DeviceId::Cpu, Host::Worker("w1".into()));
        let apart = one_layer_each(&[(Host::Coordinator, gpu), (w1.clone(), gpu)]);
        let e = check_gpu_links(GpuLink::Nccl, &apart, Some("no libtorch_cuda.so")).unwrap_err().to_string();
        assert!(
            e.contains("pipeline.gpu_link") && e.contains("stages 0 and 1") && e.contains("no libtorch_cuda.so"),
            "{e}"
        );
        assert!(check_gpu_links(GpuLink::Tcp, &apart, Some("none")).is_ok(), "tcp needs no NCCL");
        assert!(check_gpu_links(GpuLink::Nccl, &apart, None).is_ok(), "a build with NCCL");
        let together = one_layer_each(&[(w1.clone(), gpu), (w1.clone(), gpu)]);
        assert!(check_gpu_links(GpuLink::Nccl, &together, Some("none")).is_ok(), "one process: a channel");
        let via_cpu = one_layer_each(&[(Host::Coordinator, cpu), (w1, gpu)]);
        assert!(check_gpu_links(GpuLink::Nccl, &via_cpu, Some("none")).is_ok(), "from a CPU: TCP");
    }
}
