//! What the tests of several processes share: the real binary as coordinator and
//! workers on 127.0.0.1, each child killed if a test fails before waiting for it.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use layerwise_tests::{data_dir, newest_checkpoint_name, output_within, small_run_config, wait_until, OutputWithin};

pub const BIN: &str = env!("CARGO_BIN_EXE_layerwise");

/// A child process that is killed if the test fails before it is waited for, so that a
/// failing test leaves no coordinator or worker behind.
pub struct Proc(Option<Child>);

pub trait Spawn {
    fn proc(&mut self) -> Proc;
}

impl Spawn for Command {
    fn proc(&mut self) -> Proc {
        Proc(Some(self.spawn().unwrap()))
    }
}

impl Proc {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("not waited for yet")
    }

    /// Its output once it exits (a failure, and the process killed, past the wait limit).
    pub fn output(mut self) -> Output {
        output_within(self.0.take().expect("not waited for yet"), BIN)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child().try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
pub const SECRET: &str = "a-test-secret-of-enough-bytes";

/// Silence after which a peer is lost (the net crate's PEER_TIMEOUT).
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// mlp predsim over three processes: layer 0 here, layers 1-2 on w1, the output on w2.
/// A run long enough to be interrupted mid-way (4 epochs of 40 steps, a checkpoint every 2).
pub const INTERRUPTIBLE: [&str; 4] =
    ["train.epochs=4", "train.steps_per_epoch=40", "model.num_hidden=256", "checkpoint.every_steps=2"];

pub const PLACED: &str = r#"pipeline.placement=[{"layers":[0],"device":"cpu"},{"layers":[1,2],"device":"w1/cpu"},{"layers":[3],"device":"w2/cpu"}]"#;

pub struct Setup {
    pub dir: tempfile::TempDir,
    _data: tempfile::TempDir,
    pub config: PathBuf,
}

/// The small predsim mlp of the other tests, as a config file.
pub fn setup() -> Setup {
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mlp.json");
    let c = small_run_config(data.path(), "mlp");
    std::fs::write(&config, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    Setup { dir, _data: data, config }
}

/// The shared config's one-process run, trained once for all the tests that compare
/// a run over several processes with it (the same claim each time: the same weights).
pub fn reference() -> &'static Path {
    static REFERENCE: std::sync::OnceLock<(Setup, PathBuf)> = std::sync::OnceLock::new();
    let (_, whole) = REFERENCE.get_or_init(|| {
        let s = setup();
        let whole = s.dir.path().join("whole");
        let out = train(&s.config, &whole, &[], false).output_within();
        assert!(out.status.success(), "{}", text(&out));
        (s, whole)
    });
    whole
}

/// The uninterrupted one-process run of [`INTERRUPTIBLE`] in `s`'s folder, and the sets
/// that place the same run over three processes ([`PLACED`]): for the tests that interrupt
/// it there and resume it.
pub fn interruptible(s: &Setup) -> (PathBuf, Vec<&'static str>) {
    let whole = s.dir.path().join("whole");
    let out = train(&s.config, &whole, &INTERRUPTIBLE, false).output_within();
    assert!(out.status.success(), "{}", text(&out));
    let mut placed = INTERRUPTIBLE.to_vec();
    placed.push(PLACED);
    (whole, placed)
}

pub fn train(config: &Path, run: &Path, sets: &[&str], resume: bool) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("train").arg(config).arg("--run-dir").arg(run).env("LAYERWISE_SECRET", SECRET);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

pub fn worker(addr: &str, name: &str, secret: &str) -> Proc {
    worker_with(addr, name, secret, &[])
}

/// A worker `--once` with more `flags`.
pub fn worker_with(addr: &str, name: &str, secret: &str, flags: &[&str]) -> Proc {
    Command::new(BIN)
        .args(["worker", "--coordinator", addr, "--name", name, "--once"])
        .args(flags)
        .env("LAYERWISE_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .proc()
}

/// Waits for `path` to exist while `child` runs.
pub fn wait_for(path: &Path, child: &mut Proc) {
    wait_until(format_args!("{}", path.display()), || {
        assert!(child.running(), "{} exited before {} appeared", BIN, path.display());
        path.exists().then_some(())
    })
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `train` as a coordinator on a free port (`sets` place stages on workers): the process,
/// once it listens, and the address it listens on.
pub fn coordinator(config: &Path, run: &Path, sets: &[&str], resume: bool) -> (Proc, String) {
    coordinator_with(config, run, sets, resume, &[])
}

/// [`coordinator`] with more `flags`.
pub fn coordinator_with(config: &Path, run: &Path, sets: &[&str], resume: bool, flags: &[&str]) -> (Proc, String) {
    let addr_file = run.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file); // an earlier coordinator's
    let mut coordinator = train(config, run, sets, resume)
        .args(["--listen", "127.0.0.1:0"])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .proc();
    wait_for(&addr_file, &mut coordinator);
    let addr = std::fs::read_to_string(&addr_file).unwrap().trim().to_string();
    (coordinator, addr)
}

/// Waits for the run's first checkpoint while its coordinator (train or serve) runs.
pub fn wait_for_a_checkpoint(run: &Path, coordinator: &mut Proc) {
    wait_until("the run's first checkpoint", || {
        assert!(coordinator.running(), "the coordinator exited before the first checkpoint");
        (!newest_checkpoint_name(run).is_empty()).then_some(())
    })
}

/// A coordinator on a free port with workers w1 and w2; returns its output.
pub fn placed_run(config: &Path, run: &Path, sets: &[&str], resume: bool) -> Output {
    placed_run_with(config, run, sets, resume, &[])
}

/// [`placed_run`], every process started with more `flags`.
pub fn placed_run_with(config: &Path, run: &Path, sets: &[&str], resume: bool, flags: &[&str]) -> Output {
    let mut sets = sets.to_vec();
    sets.push(PLACED);
    let (coordinator, addr) = coordinator_with(config, run, &sets, resume, flags);
    let workers = [worker_with(&addr, "w1", SECRET, flags), worker_with(&addr, "w2", SECRET, flags)];
    let out = coordinator.output();
    for w in workers {
        let w = w.output();
        assert!(w.status.success(), "a worker of a finished run exits 0: {}", text(&w));
    }
    out
}

/// When a log line was written: its leading UTC timestamp (`2026-12-06T05:13:57.429999Z`).
pub fn logged_at(line: &str) -> std::time::SystemTime {
    let (date, time) = line.split_once('T').unwrap_or_else(|| panic!("no timestamp: {line}"));
    let n = |s: &str| s.parse::<i64>().unwrap_or_else(|_| panic!("no timestamp: {line}"));
    let ymd: Vec<i64> = date.split('-').map(n).collect();
    let (y, m, d) = (ymd[0] - i64::from(ymd[1] <= 2), ymd[1], ymd[2]);
    // Days since 1970-01-01 of a proleptic Gregorian date (the civil-from-days inverse).
    let era = y.div_euclid(400);
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = (y - era * 400) * 365 + (y - era * 400) / 4 - (y - era * 400) / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let clock = time.split('Z').next().unwrap();
    let hms: Vec<&str> = clock.split(':').collect();
    let secs = days * 86_400 + n(hms[0]) * 3_600 + n(hms[1]) * 60;
    let fraction: f64 = hms[2].parse().unwrap_or_else(|_| panic!("no timestamp: {line}"));
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64) + std::time::Duration::from_secs_f64(fraction)
}
