//! Hosts on one machine: each a Linux network namespace of its own, with its own interface
//! and address (10.77.0.1, .2, .3 on veth pairs to a bridge that lives in a namespace of
//! its own too), made by the test and removed after; the processes of a run in different
//! namespaces reach each other only through those links, which a test can cut. They share
//! the filesystem (the run directory), as hosts sharing one would.
//!
//! These need root (CI runs as root). Where namespaces cannot be made, each test fails
//! saying so in one line; `LAYERWISE_SKIP_NETNS=1` selects them out for a quick loop.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use layerwise_tests::{assert_same_newest_checkpoint, OutputWithin};

mod cluster_support;
use cluster_support::*;

/// Hosts made of network namespaces, removed when dropped.
struct Hosts {
    prefix: String,
    count: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Hosts {
    /// `count` hosts on one switch, or None when the developer selected these tests out.
    fn make(count: usize) -> Option<Hosts> {
        if std::env::var_os("LAYERWISE_SKIP_NETNS").is_some() {
            eprintln!("skipped: LAYERWISE_SKIP_NETNS is set");
            return None;
        }
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("lw{}-{}", std::process::id(), MADE.fetch_add(1, Ordering::SeqCst));
        let hosts = Hosts { prefix, count };
        if let Err(e) = hosts.build() {
            panic!("network namespaces cannot be made here (root is needed; LAYERWISE_SKIP_NETNS=1 skips): {e}");
        }
        Some(hosts)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn build(&self) -> Result<(), String> {
        let sw = self.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..self.count {
            let (ns, port) = (self.ns(i), format!("p{i}"));
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &sw])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
        }
        Ok(())
    }

    /// Host `i`'s address.
    fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// The binary, run in host `i` with the test secret.
    fn layerwise(&self, i: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i), BIN]).env("LAYERWISE_SECRET", SECRET);
        c
    }

    /// Takes host `i`'s link down (`up` false) or back up: its processes live on, cut off.
    fn link(&self, i: usize, up: bool) {
        ip(&["-n", &self.ns(i), "link", "set", "eth0", if up { "up" } else { "down" }]).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}

/// `train` as the coordinator in host 0, listening on every interface there: the process,
/// and the address the other hosts reach it at.
fn coordinator_in(hosts: &Hosts, config: &Path, run: &Path, sets: &[&str], resume: bool) -> (Proc, String) {
    let addr_file = run.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = hosts.layerwise(0);
    cmd.arg("train").arg(config).arg("--run-dir").arg(run).args(["--listen", "0.0.0.0:0"]);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    if resume {
        cmd.arg("--resume");
    }
    let mut coordinator = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).proc();
    wait_for(&addr_file, &mut coordinator);
    let listening = std::fs::read_to_string(&addr_file).unwrap();
    let port = listening.trim().rsplit(':').next().unwrap().to_string();
    (coordinator, format!("{}:{port}", hosts.addr(0)))
}

/// Worker `name` in host `i`, reaching the coordinator at `addr`.
fn worker_in(hosts: &Hosts, i: usize, addr: &str, name: &str) -> Proc {
    hosts
        .layerwise(i)
        .args(["worker", "--coordinator", addr, "--name", name, "--once"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .proc()
}

/// A run over the three hosts: the coordinator in host 0, w1 in host 1, w2 in host 2.
fn three_host_run(hosts: &Hosts, config: &Path, run: &Path, sets: &[&str], resume: bool) -> Output {
    let mut sets = sets.to_vec();
    sets.push(PLACED);
    let (coordinator, addr) = coordinator_in(hosts, config, run, &sets, resume);
    let workers = [worker_in(hosts, 1, &addr, "w1"), worker_in(hosts, 2, &addr, "w2")];
    let out = coordinator.output();
    for w in workers {
        let w = w.output();
        assert!(w.status.success(), "a worker of a finished run exits 0: {}", text(&w));
    }
    out
}

/// Three hosts, each with its own address (the coordinator listening on 0.0.0.0, which it
/// must never hand a remote worker as its address), train bit-identical to one process; a
/// run begun in one process resumes over the three hosts, and the reverse.
#[test]
fn three_hosts_train_and_resume_bit_identical_to_one_process() {
    let Some(hosts) = Hosts::make(3) else { return };
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let whole = reference();

    let run = d.join("three-hosts");
    let out = three_host_run(&hosts, c, &run, &[], false);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for (w, host) in [("w1", hosts.addr(1)), ("w2", hosts.addr(2))] {
        assert!(log.contains(&format!("worker {w} registered from {host}:")), "{w} from {host}: {log}");
    }
    assert!(log.contains(&format!("link into stage 1 at {}:", hosts.addr(1))), "{log}");
    assert_same_newest_checkpoint(whole, &run, "three hosts against one process");
    let probes: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".layerwise-probe"))
        .collect();
    assert!(probes.is_empty(), "the coordinator's probe file is removed with the job: {probes:?}");

    let one_then_three = d.join("one-then-three-hosts");
    let first = train(c, &one_then_three, &["train.epochs=1"], false).output_within();
    assert!(first.status.success(), "{}", text(&first));
    let out = three_host_run(&hosts, c, &one_then_three, &[], true);
    assert!(out.status.success() && text(&out).contains("resuming from"), "{}", text(&out));
    assert_same_newest_checkpoint(whole, &one_then_three, "begun in one process, resumed over three hosts");

    let three_then_one = d.join("three-hosts-then-one");
    let out = three_host_run(&hosts, c, &three_then_one, &["train.epochs=1"], false);
    assert!(out.status.success(), "{}", text(&out));
    let out = train(c, &three_then_one, &[], true).output_within();
    assert!(out.status.success() && text(&out).contains("resuming from"), "{}", text(&out));
    assert_same_newest_checkpoint(whole, &three_then_one, "begun over three hosts, resumed in one process");
}

/// Host 1's link cut mid-run (its processes live on, unreachable): the coordinator loses
/// worker w1 within the heartbeat bound (10 s of silence), every process stops, the status
/// names the worker; with the link back, `--resume` with w1 again, and once with w1's
/// stages moved to host 2, ends bit-identical to an uninterrupted run.
#[test]
fn a_cut_link_fails_the_run_within_the_heartbeat_bound_and_resume_is_bit_identical() {
    let Some(hosts) = Hosts::make(3) else { return };
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let sets = INTERRUPTIBLE;
    let (whole, placed) = interruptible(&s);
    let run = d.join("cut");
    let (mut coordinator, addr) = coordinator_in(&hosts, c, &run, &placed, false);
    let (w1, w2) = (worker_in(&hosts, 1, &addr, "w1"), worker_in(&hosts, 2, &addr, "w2"));
    wait_for_a_checkpoint(&run, &mut coordinator);
    let cut = std::time::SystemTime::now();
    hosts.link(1, false);
    let out = coordinator.output();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let lost = log.lines().find(|l| l.contains("worker w1") && l.contains("lost")).unwrap_or_else(|| panic!("{log}"));
    assert!(lost.contains("no heartbeat for 10 s"), "{lost}");
    let after = logged_at(lost).duration_since(cut).unwrap_or_default();
    eprintln!("worker w1 lost {:.1} s after its link was cut (bound: 10 s of silence)", after.as_secs_f64());
    assert!(
        after >= PEER_TIMEOUT - std::time::Duration::from_secs(2),
        "lost before its silence could be noticed: {after:?}"
    );
    let status = std::fs::read_to_string(run.join("status.json")).unwrap();
    assert!(status.contains("\"failed\"") && status.contains("w1"), "{status}");
    // Every process stops: w2's job is aborted, and w1, cut off, loses its coordinator.
    assert!(!w2.output().status.success(), "w2's job was aborted");
    let w1 = w1.output();
    assert!(!w1.status.success() && text(&w1).contains("no heartbeat from the coordinator"), "{}", text(&w1));

    hosts.link(1, true);
    let moved = d.join("cut-moved");
    assert!(Command::new("cp").arg("-a").arg(&run).arg(&moved).status().unwrap().success());
    let out = three_host_run(&hosts, c, &run, &sets, true);
    assert!(out.status.success() && text(&out).contains("resuming from"), "{}", text(&out));
    assert_same_newest_checkpoint(&whole, &run, "cut, then resumed with w1 back");

    // w1's layers on w2, in host 2.
    let mut on_w2 = sets.to_vec();
    on_w2.push(r#"pipeline.placement=[{"layers":[0],"device":"cpu"},{"layers":[1,2,3],"device":"w2/cpu"}]"#);
    let (coordinator, addr) = coordinator_in(&hosts, c, &moved, &on_w2, true);
    let w2 = worker_in(&hosts, 2, &addr, "w2");
    let out = coordinator.output();
    assert!(out.status.success() && text(&out).contains("resuming from"), "{}", text(&out));
    assert!(w2.output().status.success());
    assert_same_newest_checkpoint(&whole, &moved, "cut, then resumed with w1's stages on w2");
}

/// Host 2 sees another folder at the run directory's path (a private mount over its
/// parent): the job is refused at start, naming the worker, the path and the need for one
/// shared filesystem; no checkpoint is begun, and every process exits.
#[test]
fn a_host_that_does_not_share_the_run_directory_is_refused_at_start() {
    let Some(hosts) = Hosts::make(3) else { return };
    let s = setup();
    let parent = s.dir.path().join("shared");
    let run = parent.join("run");
    std::fs::create_dir_all(&parent).unwrap();
    let (coordinator, addr) = coordinator_in(&hosts, &s.config, &run, &[PLACED], false);
    let w1 = worker_in(&hosts, 1, &addr, "w1");
    // w2 in a mount namespace of its own, an empty tmpfs over the run's parent folder.
    let w2 = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.ns(2),
            "unshare",
            "--mount",
            "sh",
            "-c",
            r#"mount -t tmpfs private "$0" && exec "$@""#,
        ])
        .arg(&parent)
        .args([BIN, "worker", "--coordinator", &addr, "--name", "w2", "--once"])
        .env("LAYERWISE_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .proc();
    let out = coordinator.output();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let said = format!("worker w2 does not see the run directory {}", run.display());
    assert!(log.contains(&said) && log.contains("one shared filesystem"), "{log}");
    let status = std::fs::read_to_string(run.join("status.json")).unwrap();
    assert!(status.contains("\"failed\"") && status.contains("shared filesystem"), "{status}");
    assert!(layerwise_tests::checkpoint_folders(&run).is_empty(), "{:?}", layerwise_tests::checkpoint_folders(&run));
    assert!(!w1.output().status.success() && !w2.output().status.success(), "both workers' jobs ended");
}

/// torch's own torchrun, started once in each of two hosts with the c10d rendezvous on
/// host 0, two processes a host: the four ranks train bit-identical to one process. (Each
/// torchrun is told its address, `--local-addr`, and which one hosts the rendezvous: the
/// hosts share one host name.)
#[test]
fn a_two_node_torchrun_trains_bit_identical_to_one_process() {
    let Some(hosts) = Hosts::make(2) else { return };
    let venv = std::env::var("LAYERWISE_TORCH_VENV").expect("LAYERWISE_TORCH_VENV (scripts/setup.sh exports it)");
    let torchrun = Path::new(&venv).join("bin/torchrun");
    assert!(torchrun.exists(), "{} is missing", torchrun.display());
    let s = setup();
    let whole = reference();
    let run = s.dir.path().join("torchrun");
    let nodes: Vec<Proc> = (0..2)
        .map(|i| {
            Command::new("ip")
                .args(["netns", "exec", &hosts.ns(i)])
                .arg(&torchrun)
                .args(["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-id=layerwise-test"])
                .arg(format!("--rdzv-endpoint={}:29500", hosts.addr(0)))
                .arg(format!("--rdzv-conf=is_host={}", u8::from(i == 0)))
                .arg(format!("--local-addr={}", hosts.addr(i)))
                .args(["--no-python", BIN, "train"])
                .arg(&s.config)
                .arg("--run-dir")
                .arg(&run)
                .env("LAYERWISE_SECRET", SECRET)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .proc()
        })
        .collect();
    let outs = all_succeed(nodes, "node");
    let log: String = outs.iter().map(text).collect();
    for rank in ["rank1", "rank2", "rank3"] {
        assert!(log.contains(&format!("worker {rank} registered from 10.77.0.")), "{rank}: {log}");
    }
    assert_same_newest_checkpoint(whole, &run, "a two-node torchrun against one process");
}

/// The outputs of `procs` once each has exited, every one of them successfully (else the
/// failing one's `what` and number, and its log).
fn all_succeed(procs: Vec<Proc>, what: &str) -> Vec<Output> {
    let outs: Vec<Output> = procs.into_iter().map(Proc::output).collect();
    for (i, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "{what} {i}: {}", text(o));
    }
    outs
}

/// deploy/slurm.sbatch's way, its variables set by hand in each of two hosts (two tasks a
/// host): the four tasks train bit-identical to one process.
#[test]
fn the_slurm_launch_over_two_hosts_trains_bit_identical_to_one_process() {
    let Some(hosts) = Hosts::make(2) else { return };
    let s = setup();
    let whole = reference();
    let run = s.dir.path().join("slurm");
    let port = "29400";
    let tasks: Vec<Proc> = (0..4)
        .map(|task| {
            let mut cmd = hosts.layerwise(task / 2);
            cmd.arg("train").arg(&s.config).arg("--run-dir").arg(&run).arg("--resume");
            cmd.env("SLURM_PROCID", task.to_string())
                .env("SLURM_NTASKS", "4")
                .env("SLURM_LOCALID", (task % 2).to_string())
                .env("MASTER_ADDR", hosts.addr(0))
                .env("LAYERWISE_PORT", port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .proc()
        })
        .collect();
    let outs = all_succeed(tasks, "task");
    assert!(text(&outs[0]).contains("worker rank3 registered from 10.77.0.2:"), "{}", text(&outs[0]));
    assert_same_newest_checkpoint(whole, &run, "a Slurm launch over two hosts against one process");
}
