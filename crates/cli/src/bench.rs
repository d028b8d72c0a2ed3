//! `layerwise bench`: figures, printed, never asserted. `bench train` runs a config
//! sequentially and pipelined under several placements, each in a child process, and
//! reports images/s, speedup against the best `auto` could reach, and peak memory
//! ([`report`] prints the table); `bench data` ([`data`]) times the loader.

mod data;
mod link;
mod machine;
mod report;

use machine::{device_names, matmul_rate, peak_rss_bytes};

pub use data::data;
pub use link::link;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use layerwise_coordinator::RunOptions;
use layerwise_net::wire::Auth;
use layerwise_net::Cluster;
use layerwise_nn::config::Training;
use layerwise_pipeline::calibrate;
use layerwise_plan::balance::Costs;
use layerwise_plan::{DeviceId, Machine, PipelineMode, Placement, Plan, RunConfig};
use serde::{Deserialize, Serialize};
use tch::Kind;

/// What `bench train` is asked.
pub struct TrainBench {
    pub config: PathBuf,
    pub steps: usize,
    pub repeats: usize,
    pub rounds: usize,
    pub overrides: Vec<String>,
    pub json: bool,
    /// Where each measured run's directory is kept (else a temporary folder): with `one`,
    /// that run's own directory.
    pub keep_runs: Option<PathBuf>,
    /// Internal: run only this one of the runs, in this process, and print its result.
    pub one: Option<usize>,
}

/// One run of `bench train`.
#[derive(Debug, Clone)]
struct BenchRun {
    mode: PipelineMode,
    placement: Placement,
}

/// The runs compared: sequential, then pipelined under the config's placement, under
/// `auto` and one stage per layer (a placement already listed is not run twice). On a CPU
/// machine, with three layers or more, also a pair alike in all but processes: three
/// stages in this process, and the same three stages in three processes on 127.0.0.1 (this
/// one and two workers, linked over TCP); in both, the three stages share the cores.
fn runs(config: &RunConfig, machine: &Machine) -> anyhow::Result<Vec<BenchRun>> {
    let run = |mode, placement| BenchRun { mode, placement };
    let mut runs = vec![run(PipelineMode::Sequential, Placement::Single)];
    for placement in [config.pipeline.placement.clone(), Placement::Auto, Placement::PerLayer] {
        if !runs.iter().any(|r| r.mode == PipelineMode::Pipelined && r.placement == placement) {
            runs.push(run(PipelineMode::Pipelined, placement));
        }
    }
    let layers = Plan::build(config, *machine)?.num_layers();
    if machine.cuda_devices == 0 && layers >= 3 && !config.model.training.is_global() {
        // As a launch of three ranks spreads them: stage r > 0 on worker `rankr`.
        let Placement::Stages(apart) = layerwise_net::launch::spread(layers, &[DeviceId::Cpu; 3])? else {
            unreachable!("spread gives stages")
        };
        let mut together = apart.clone();
        for s in &mut together {
            s.device = "cpu".into();
        }
        for placement in [together, apart] {
            runs.push(run(PipelineMode::Pipelined, Placement::Stages(placement)));
        }
    }
    Ok(runs)
}

/// One run's figures, measured in a process of its own (a fresh allocator and OpenMP
/// teams, and its own peak memory).
#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    mode: PipelineMode,
    placement: Placement,
    /// Processes the run's stages ran in (this one and its workers).
    processes: usize,
    /// The layers of each stage, as the run placed them.
    stages: Vec<Vec<usize>>,
    /// Intra-op threads of each stage.
    threads: Vec<usize>,
    devices: Vec<String>,
    /// Images/s of each measured epoch (the warm-up epoch left out).
    epochs_images_per_sec: Vec<f64>,
    images_per_sec: f64,
    peak_rss_bytes: u64,
    /// Largest device memory the process held on any GPU (`nvidia-smi`), where there is one.
    peak_device_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Row {
    #[serde(flatten)]
    measured: Measured,
    speedup: f64,
    /// The best speed-up over sequential that the split allows here (see `best_speedup`).
    best_speedup: f64,
    efficiency: f64,
    gflops: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    config: PathBuf,
    machine: MachineInfo,
    /// Rounds over the list of runs (see `--rounds`).
    rounds: usize,
    steps_per_epoch: usize,
    measured_epochs: usize,
    batch_size: usize,
    train_gflop_per_image: f64,
    /// Seconds per training step of each layer alone (the output layer last), at the run's
    /// batch size, as `auto` measures them: the basis of `best_speedup`.
    /// None where layers have no local losses to time them by (backprop).
    layer_step_seconds: Option<Vec<f64>>,
    /// The same on one thread (CPU only): what each stage of a split over the cores runs at.
    layer_step_seconds_one_thread: Option<Vec<f64>>,
    runs: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct MachineInfo {
    cores: usize,
    cuda_devices: usize,
    device_names: Vec<String>,
    /// A square matrix product on the first device with every core (CPU) or the device
    /// alone, in the precision the config's products run in (`matmul_kind`): the rate to
    /// compare `gflops` with.
    matmul_gflops: f64,
    matmul_size: i64,
    matmul_kind: &'static str,
}

pub fn train(args: TrainBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps >= 1, "--steps: expected at least 1");
    anyhow::ensure!((1..=100).contains(&args.repeats), "--repeats: expected 1 to 100, got {}", args.repeats);
    anyhow::ensure!((1..=100).contains(&args.rounds), "--rounds: expected 1 to 100, got {}", args.rounds);
    let base = RunConfig::load(&args.config, &args.overrides)?;
    let machine = Machine::detect();
    let runs = runs(&base, &machine)?;
    if let Some(i) = args.one {
        let run = runs.get(i).ok_or_else(|| anyhow::anyhow!("--one {i}: no such run"))?.clone();
        let measured = measure_one(&base, run, args.steps, args.repeats, args.keep_runs.as_deref())?;
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    let plan = Plan::build(&base, machine)?;
    let flops = plan.arch.training_flops_per_image(&base.model, base.train.batch_size as i64);
    // Layers without local losses (backprop) cannot be timed alone.
    let costs = match base.model.training {
        Training::Backprop => None,
        _ => Some(calibrate::costs(&plan)?),
    };
    let (matmul_kind, matmul_kind_name) =
        if base.model.bf16 { (Kind::BFloat16, "bfloat16") } else { (Kind::Float, "float32") };
    let (matmul_gflops, matmul_size) = matmul_rate(&machine, matmul_kind);
    let mut rounds: Vec<Vec<Measured>> = (0..runs.len()).map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (i, BenchRun { mode, placement }) in runs.iter().enumerate() {
            eprintln!(
                "bench: round {round} of {}, run {} of {}: {mode:?} {}",
                args.rounds,
                i + 1,
                runs.len(),
                serde_json::to_string(placement)?
            );
            let keep = args.keep_runs.as_ref().map(|d| d.join(format!("round-{round}-run-{i}")));
            rounds[i].push(measure_in_child(&args, i, keep.as_deref())?);
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    for (BenchRun { mode, .. }, measured) in runs.iter().zip(rounds) {
        let measured = over_rounds(measured);
        let sequential = rows.first().map_or(measured.images_per_sec, |r| r.measured.images_per_sec);
        let speedup = measured.images_per_sec / sequential;
        let best_speedup =
            if *mode == PipelineMode::Sequential { 1.0 } else { best_speedup(&measured, costs.as_ref(), &machine) };
        rows.push(Row {
            speedup,
            best_speedup,
            efficiency: speedup / best_speedup,
            gflops: measured.images_per_sec * flops / 1e9,
            measured,
        });
    }
    let report = Report {
        config: args.config.clone(),
        rounds: args.rounds,
        machine: MachineInfo {
            cores: machine.cores,
            cuda_devices: machine.cuda_devices,
            device_names: device_names(&machine),
            matmul_gflops,
            matmul_size,
            matmul_kind: matmul_kind_name,
        },
        steps_per_epoch: args.steps,
        measured_epochs: args.repeats,
        batch_size: base.train.batch_size,
        train_gflop_per_image: flops / 1e9,
        layer_step_seconds: costs.as_ref().map(|c| c.whole.clone()),
        layer_step_seconds_one_thread: costs.and_then(|c| c.one_thread),
        runs: rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report::print_table(&report);
    }
    Ok(())
}

/// The speed-up over sequential that a run's split allows on this machine, by the model
/// `auto` chooses with (`placement::cpu_split`): sequential takes the layers' summed step
/// times with every thread; a stage takes its layers' times at its own thread count (with
/// every thread, or with one), and a pipelined step takes the larger of the slowest stage
/// and the CPU time of all stages spread over the cores. So a split can only gain what the
/// sequential run's own threads leave unused: where threads scale perfectly, the best is
/// 1.0. On GPUs, each device runs its stages alone: the stages' summed times over the
/// slowest device's. Without layer times (backprop), the units alone bound it.
fn best_speedup(m: &Measured, costs: Option<&Costs>, machine: &Machine) -> f64 {
    let mut gpus: Vec<&String> = m.devices.iter().filter(|d| d.starts_with("cuda")).collect();
    gpus.dedup();
    let units = if gpus.is_empty() { machine.cores.min(m.stages.len()) } else { gpus.len() }.max(1) as f64;
    let Some(costs) = costs else { return units };
    let sum = |c: &[f64], layers: &[usize]| layers.iter().map(|&l| c[l]).sum::<f64>();
    let sequential: f64 = costs.whole.iter().sum();
    let step = match &costs.one_thread {
        Some(one) if gpus.is_empty() => {
            let (slowest, cpu_time) = m.stages.iter().zip(&m.threads).fold((0.0f64, 0.0), |(slowest, cpu), (l, &t)| {
                let stage = if t == 1 { sum(one, l) } else { sum(&costs.whole, l) };
                (slowest.max(stage), cpu + stage * t as f64)
            });
            slowest.max(cpu_time / machine.cores.max(1) as f64)
        }
        _ => {
            let slowest = m.stages.iter().map(|l| sum(&costs.whole, l)).fold(0.0, f64::max);
            slowest.max(sequential / units)
        }
    };
    sequential / step
}

/// Runs `runs()[i]` in a child process (this binary, `--one i`) and reads its result; the
/// child's log is shown only when it fails. On a GPU machine, `nvidia-smi` is polled for the
/// child's device memory meanwhile.
fn measure_in_child(args: &TrainBench, i: usize, keep: Option<&std::path::Path>) -> anyhow::Result<Measured> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("bench").arg("train").arg(&args.config);
    cmd.args(["--steps", &args.steps.to_string(), "--repeats", &args.repeats.to_string(), "--one", &i.to_string()]);
    if let Some(dir) = keep {
        cmd.arg("--keep-runs").arg(dir);
    }
    for o in &args.overrides {
        cmd.args(["--set", o]);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let done = AtomicBool::new(false);
    let (output, device_peak) = std::thread::scope(|s| {
        let poll = s.spawn(|| poll_device_memory(pid, &done));
        let output = child.wait_with_output();
        done.store(true, Ordering::Relaxed);
        (output, poll.join().ok().flatten())
    });
    let output = output?;
    if !output.status.success() {
        let log = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        anyhow::bail!(
            "bench run {i} failed ({}):\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().ok_or_else(|| anyhow::anyhow!("bench run {i} printed nothing"))?;
    let mut measured: Measured = serde_json::from_str(line)?;
    measured.peak_device_bytes = device_peak;
    Ok(measured)
}

/// The largest `used_memory` that `nvidia-smi` reports for `pid` until `done`; none where
/// there is no `nvidia-smi` or it never lists the process.
fn poll_device_memory(pid: u32, done: &AtomicBool) -> Option<u64> {
    let mut peak: Option<u64> = None;
    while !done.load(Ordering::Relaxed) {
        let out = Command::new("nvidia-smi")
            .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut fields = line.split(',').map(str::trim);
            if fields.next() == Some(pid.to_string().as_str()) {
                if let Some(mib) = fields.next().and_then(|v| v.parse::<u64>().ok()) {
                    peak = Some(peak.unwrap_or(0).max(mib << 20));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    peak
}

/// One run, in this process: `repeats` measured epochs of `steps` steps after a warm-up epoch.
/// A run with stages on workers listens on 127.0.0.1 and starts them as child processes of
/// this binary (`worker --once`, sharing a fresh secret).
fn measure_one(
    base: &RunConfig,
    run: BenchRun,
    steps: usize,
    repeats: usize,
    keep: Option<&std::path::Path>,
) -> anyhow::Result<Measured> {
    let BenchRun { mode, placement } = run;
    let mut c = base.clone();
    c.pipeline.mode = mode;
    c.pipeline.placement = placement.clone();
    c.pipeline.workers.clear();
    c.train.epochs = 1 + repeats;
    c.train.steps_per_epoch = Some(steps);
    c.train.eval_batches = Some(1);
    c.checkpoint.every_epochs = 0;
    c.checkpoint.every_steps = 0;
    let temporary = tempfile::tempdir()?;
    let dir = keep.unwrap_or(temporary.path());
    let workers = Plan::build(&c, Machine::detect())?.workers();
    let mut options = RunOptions::default();
    let mut children = Vec::new();
    if !workers.is_empty() {
        let secret = layerwise_net::wire::nonce();
        let cluster =
            Cluster::listen("127.0.0.1:0", Auth::new(secret.clone().into_bytes(), false), Duration::from_secs(120))?;
        for name in &workers {
            let child = Command::new(std::env::current_exe()?)
                .args(["worker", "--coordinator", &cluster.addr.to_string(), "--name", name, "--once"])
                // The job's pipeline.encrypt decides, so that a bench compares the two.
                .args(["--encrypt", "off"])
                .env("LAYERWISE_SECRET", &secret)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            children.push(KillOnDrop(child));
        }
        options.cluster = Some(cluster);
    }
    let summary = layerwise_coordinator::run(&c, dir, options)?;
    for mut child in children {
        child.0.wait()?;
    }
    let epochs: Vec<f64> = summary.epochs.iter().skip(1).map(|e| e.images_per_sec).collect();
    Ok(Measured {
        mode,
        processes: 1 + workers.len(),
        placement,
        stages: summary.plan.iter().map(|s| s.layers.clone()).collect(),
        threads: summary.plan.iter().map(|s| s.threads).collect(),
        devices: summary.plan.iter().map(|s| s.devices[0].to_string()).collect(),
        images_per_sec: median(&epochs),
        epochs_images_per_sec: epochs,
        peak_rss_bytes: peak_rss_bytes(),
        peak_device_bytes: None,
    })
}

/// A child process ended when its handle goes (a bench run that failed leaves no worker).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One run's rounds as one: the median of the rounds' images/s, every measured epoch, the
/// largest memory peaks.
fn over_rounds(rounds: Vec<Measured>) -> Measured {
    let images_per_sec = median(&rounds.iter().map(|m| m.images_per_sec).collect::<Vec<_>>());
    let epochs = rounds.iter().flat_map(|m| m.epochs_images_per_sec.clone()).collect();
    let peak_rss_bytes = rounds.iter().map(|m| m.peak_rss_bytes).max().unwrap_or(0);
    let peak_device_bytes = rounds.iter().filter_map(|m| m.peak_device_bytes).max();
    let first = rounds.into_iter().next().expect("one round or more");
    Measured { images_per_sec, epochs_images_per_sec: epochs, peak_rss_bytes, peak_device_bytes, ..first }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
