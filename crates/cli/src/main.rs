//! `layerwise`: train neural networks with local error signals, layer by layer and
//! pipeline-parallel across devices.

mod bench;
mod distributed;
mod malloc;
mod use_run;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use layerwise_coordinator::RunOptions;
use layerwise_plan::{Plan, RunConfig};

#[derive(Parser)]
#[command(
    name = "layerwise",
    version,
    about = "Training with local error signals, layer by layer and pipeline-parallel"
)]
struct Cli {
    /// Log lines as text (terminals) or JSON (journald, log shippers). Filter with RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one training job.
    Train {
        /// The job's config file (JSON).
        config: PathBuf,
        /// Where the run's files go (default: runs/<config name>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Override a config key by its dotted path, e.g. --set train.epochs=1.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Resume from the newest verified checkpoint in the run directory (if any).
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        net: distributed::CoordinatorArgs,
    },
    /// Offer this host's devices to a coordinator and run the stages it places here.
    Worker(distributed::WorkerArgs),
    /// Evaluate a run's newest checkpoint (or a given checkpoint) on the test set.
    Eval {
        /// A run directory or a checkpoint directory (run/checkpoints/step-N).
        path: PathBuf,
        /// Print one JSON object (with `test_error`, percent).
        #[arg(long)]
        json: bool,
        /// Write the predicted class of every test example, one per line, to this file.
        #[arg(long)]
        predictions: Option<PathBuf>,
    },
    /// Write the trained network for inference: FILE.safetensors and FILE.json.
    Export {
        /// A run directory or a checkpoint directory.
        path: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a checkpoint's manifest, metrics and layer shapes.
    Inspect {
        /// A run directory or a checkpoint directory.
        path: PathBuf,
    },
    /// Run as a service: pick up job files from --jobs, run each in --runs/<job name>.
    Serve {
        /// Folder of job files (`NAME.json`; `NAME.cancel` cancels NAME).
        #[arg(long)]
        jobs: PathBuf,
        /// Folder of run directories.
        #[arg(long)]
        runs: PathBuf,
        /// Seconds between scans of the jobs folder (SIGHUP scans at once).
        #[arg(long, default_value_t = 2.0)]
        scan_every: f64,
        /// Seconds running jobs get to checkpoint and stop after SIGTERM.
        #[arg(long, default_value_t = 120.0)]
        stop_timeout: f64,
        /// A job that was running each time the service died this many times is failed
        /// instead of resumed (it may be what kills the service).
        #[arg(long, default_value_t = 2)]
        max_crash_restarts: u32,
        /// Listen for workers on HOST:PORT, so that jobs may place stages on them (port 0
        /// picks one; the address is written to RUNS/.coordinator.addr). Needs the secret.
        #[arg(long)]
        listen: Option<String>,
        /// A file holding the shared secret (else LAYERWISE_SECRET).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Encrypt every connection with workers (on, off), as `train --encrypt`.
        #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = distributed::ENCRYPT_DEFAULT)]
        encrypt: bool,
        /// Seconds a job waits for the workers it names to register before it fails.
        #[arg(long, default_value_t = 600.0)]
        worker_wait: f64,
        /// Serve Prometheus metrics of every job on HOST:PORT (/metrics; port 0 picks one,
        /// written to RUNS/.http.addr). Beyond loopback, requests must carry the secret.
        #[arg(long)]
        http: Option<String>,
    },
    /// Hand a config to a running service: written into --jobs atomically, as NAME.json.
    Submit {
        config: PathBuf,
        /// Folder of job files that `serve` watches.
        #[arg(long)]
        jobs: PathBuf,
        /// Job name (default: the config's file name); A-Z a-z 0-9 . _ - only.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the state of every run under a runs folder.
    Status {
        #[arg(long)]
        runs: PathBuf,
    },
    /// Check config files without running them, and say how much memory each needs.
    Validate {
        configs: Vec<PathBuf>,
        /// Do not check that the data files are present.
        #[arg(long)]
        no_data: bool,
        /// Override a config key in every config, as `train --set` does.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Draw a run's learning curves (PNG or SVG, by the file's extension).
    Plot {
        /// One run directory, or several to compare on one plot.
        #[arg(required = true)]
        run_dirs: Vec<PathBuf>,
        /// Output file, .png or .svg (default: the first run's curves.png).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A log scale for the error axis.
        #[arg(long)]
        log: bool,
    },
    /// Print what this binary can see: libtorch, CUDA devices.
    Devices,
    /// Measure and print figures (nothing is asserted).
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand)]
enum Bench {
    /// Training throughput: sequential against pipelined, for a config.
    Train {
        config: PathBuf,
        /// Steps per epoch; the first epoch warms up, the next `--repeats` are measured.
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Measured epochs per run (their median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Times the whole list of runs is measured, round after round (each run in a fresh
        /// process each round): on a shared machine whose speed drifts, every run then sees
        /// the drift alike. A run reports the median of its rounds.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep each measured run's directory (config, metrics.jsonl, status) here, as
        /// `round-R-run-I`, instead of in a temporary folder.
        #[arg(long, value_name = "DIR")]
        keep_runs: Option<PathBuf>,
        /// Internal: run one of the compared runs in this process and print its figures.
        #[arg(long, hide = true)]
        one: Option<usize>,
    },
    /// A link between processes: MB/s over loopback, authenticated and encrypted.
    Link {
        /// Messages to time.
        #[arg(long, default_value_t = 400)]
        messages: usize,
        /// Bytes of each message's batch, in KiB (an mlp's 1024 features at batch 128: 512).
        #[arg(long, default_value_t = 512)]
        kib: usize,
    },
    /// Loader throughput with augmentation: a config's data set, CIFAR-shaped data, and a
    /// streamed JPEG set as an image folder and as tar shards with 1, 2 and all threads.
    Data {
        /// Config whose data section to measure (default: Fashion-MNIST); batches to time.
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 200)]
        batches: usize,
        /// Streamed set's folder (`train/<class>/*.jpg`), made (and packed into `DIR/shards`)
        /// when it has no `train/`. Default: a temporary folder.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Images to make, 500x375 JPEGs; side of the random resized crop.
        #[arg(long, default_value_t = 512)]
        count: usize,
        #[arg(long, default_value_t = 224)]
        size: u32,
    },
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Each job's last lines are kept for the dashboard besides.
    let registry = tracing_subscriber::registry().with(filter).with(layerwise_daemon::joblog::JobLog);
    match format {
        LogFormat::Text => registry.with(fmt.with_ansi(std::io::stderr().is_terminal())).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
}

fn train(
    config: PathBuf,
    run_dir: Option<PathBuf>,
    overrides: Vec<String>,
    resume: bool,
    net: distributed::CoordinatorArgs,
) -> anyhow::Result<()> {
    let mut cfg = RunConfig::load(&config, &overrides)?;
    // SIGINT or SIGTERM: checkpoint at the next step and stop; a second one ends at once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let launch = layerwise_net::launch::Launch::from_env()?;
    if let Some(launch) = launch.as_ref().filter(|l| l.rank > 0) {
        return distributed::rank_worker(launch, &net, stop);
    }
    let run_dir = run_dir.unwrap_or_else(|| {
        PathBuf::from("runs").join(config.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned()))
    });
    let (plan, cluster) = distributed::coordinate(&mut cfg, launch.as_ref(), &net, &run_dir, &stop)?;
    if let Some(addr) = &net.http {
        let view = layerwise_daemon::exposition::View::Run(run_dir.clone());
        distributed::start_http(addr, view, cluster.clone(), &run_dir.join("http.addr"), net.secret_file())?;
    }
    let on_step = std::io::stderr().is_terminal().then(|| progress_bar(cfg.train.batch_size, cfg.train.epochs));
    let options = RunOptions { resume, on_step, stop: Some(stop), cluster, ..Default::default() };
    let name = run_dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let _job = tracing::info_span!("job", name = %name).entered();
    let summary = layerwise_coordinator::run_plan(plan, &run_dir, options)
        .with_context(|| format!("run {} failed", run_dir.display()))?;
    if summary.stopped {
        println!(
            "{}: stopped at step {} with a checkpoint; continue with: layerwise train {} --run-dir {} --resume",
            config.display(),
            summary.step,
            config.display(),
            run_dir.display()
        );
        return Ok(());
    }
    let last = summary.epochs.last().context("no epoch ran")?;
    println!(
        "{}: {} epoch(s), test error {:.2}%, train error {:.2}%, {:.0} images/s; files in {}",
        config.display(),
        summary.epochs.len(),
        last.test_error,
        last.train_error,
        last.images_per_sec,
        run_dir.display()
    );
    Ok(())
}

/// A terminal progress bar: epoch, images, images/s, ETA of the epoch.
#[allow(clippy::type_complexity)]
fn progress_bar(batch_size: usize, epochs: usize) -> Box<dyn FnMut(usize, usize, usize)> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    Box::new(move |epoch, step, steps| {
        if step == 1 {
            bar.reset();
            bar.set_length((steps * batch_size) as u64);
        }
        bar.set_message(format!("epoch {epoch}/{epochs} step {step}/{steps}"));
        bar.set_position((step * batch_size) as u64);
        if step == steps {
            bar.finish_and_clear();
        }
    })
}

fn status(runs: &std::path::Path) -> anyhow::Result<()> {
    let rows = layerwise_daemon::jobs::status_rows(runs)
        .with_context(|| format!("{}: cannot read the runs folder", runs.display()))?;
    println!("{:<28} {:<10} {:>6} {:>9}  REASON", "JOB", "STATE", "EPOCH", "STEP");
    for r in rows {
        println!("{:<28} {:<10} {:>6} {:>9}  {}", r.name, r.state, r.epoch, r.step, r.reason);
    }
    Ok(())
}

fn validate(configs: &[PathBuf], overrides: &[String], check_data: bool) -> anyhow::Result<()> {
    let mut bad = 0;
    for path in configs {
        match RunConfig::load(path, overrides).and_then(|c| Plan::check(&c, check_data)) {
            Ok(plan) => println!(
                "{}: ok ({} stage(s) here; needs about {:.2} GiB, by a rough count)",
                path.display(),
                plan.stages.len(),
                plan.memory_estimate() / (1u64 << 30) as f64
            ),
            Err(e) => {
                bad += 1;
                println!("{}: {e}", path.display());
            }
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {} config(s) invalid", configs.len());
    }
    Ok(())
}

/// A duration flag: at least `min` seconds, at most a year.
fn seconds(flag: &str, v: f64, min: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v >= min && v <= 3.2e7) {
        anyhow::bail!("{flag}: expected {min} to 32000000 seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// Panics inside a job or a stage are caught and reported once, as an error line naming
/// the stage or job, by the code that catches them: the hook keeps the raw message and
/// backtrace off stderr (debug level). A panic on the main thread is a bug: logged as an error.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info.to_string();
        if thread.name() == Some("main") {
            tracing::error!("{}", message.lines().next().unwrap_or("panicked"));
        }
        tracing::debug!(
            thread = thread.name().unwrap_or("?"),
            "{message}\n{}",
            std::backtrace::Backtrace::force_capture()
        );
    }));
}

fn main() -> ExitCode {
    malloc::tune();
    layerwise_nccl::configure_environment();
    layerwise_net::secret::take_from_environment();
    let cli = Cli::parse();
    init_logs(cli.log_format);
    quiet_panics();
    let result = match cli.command {
        Command::Train { config, run_dir, overrides, resume, net } => train(config, run_dir, overrides, resume, net),
        Command::Worker(args) => distributed::worker(args),
        Command::Eval { path, json, predictions } => use_run::eval(&path, json, predictions.as_deref()),
        Command::Export { path, out } => use_run::export(&path, &out),
        Command::Inspect { path } => use_run::inspect(&path),
        Command::Bench(Bench::Data { config, batches, images, count, size }) => {
            bench::data(config.as_deref(), batches, (images.as_deref(), count, size))
        }
        Command::Bench(Bench::Link { messages, kib }) => bench::link(messages, kib),
        Command::Bench(Bench::Train { config, steps, repeats, rounds, overrides, json, keep_runs, one }) => {
            bench::train(bench::TrainBench { config, steps, repeats, rounds, overrides, json, keep_runs, one })
        }
        Command::Serve {
            jobs,
            runs,
            scan_every,
            stop_timeout,
            max_crash_restarts,
            listen,
            secret_file,
            encrypt,
            worker_wait,
            http,
        } => seconds("--scan-every", scan_every, 0.05).and_then(|scan_every| {
            let stop_timeout = seconds("--stop-timeout", stop_timeout, 0.0)?;
            let worker_wait = seconds("--worker-wait", worker_wait, 1.0)?;
            let cluster =
                distributed::listen_for_serve(listen.as_deref(), secret_file.as_deref(), encrypt, worker_wait, &runs)?;
            if let Some(addr) = &http {
                let view = layerwise_daemon::exposition::View::Runs(runs.clone());
                distributed::start_http(addr, view, cluster.clone(), &runs.join(".http.addr"), secret_file.as_deref())?;
            }
            let options =
                layerwise_daemon::ServeOptions { jobs, runs, scan_every, stop_timeout, max_crash_restarts, cluster };
            layerwise_daemon::serve(options).map_err(Into::into)
        }),
        Command::Submit { config, jobs, name } => layerwise_daemon::jobs::submit(&config, name.as_deref(), &jobs)
            .map(|p| println!("submitted {}", p.display()))
            .map_err(|e| anyhow::anyhow!(e)),
        Command::Status { runs } => status(&runs),
        Command::Validate { configs, no_data, overrides } => validate(&configs, &overrides, !no_data),
        Command::Plot { run_dirs, out, log } => {
            layerwise_daemon::charts::plot(&run_dirs, out, log).map(|p| println!("wrote {}", p.display()))
        }
        Command::Devices => {
            println!("cpu: {} cores, bfloat16 products: {}", layerwise_plan::Machine::detect().cores, cpu_bf16());
            println!("cuda available: {}", tch::Cuda::is_available());
            println!("cuda devices: {}", tch::Cuda::device_count());
            println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
            println!("nccl: {}", distributed::nccl_status());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this CPU multiplies bfloat16 in hardware (the instructions oneDNN's bfloat16
/// products use), as its flags in /proc/cpuinfo say: `model.bf16` speeds up CPU stages
/// only where it does.
fn cpu_bf16() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> =
        cpuinfo.lines().find_map(|l| l.strip_prefix("flags")).map_or(vec![], |f| f.split_whitespace().collect());
    let units: Vec<&str> = ["avx512_bf16", "amx_bf16"].into_iter().filter(|u| flags.contains(u)).collect();
    match units.as_slice() {
        [] => "none (model.bf16 would slow CPU products down)".into(),
        u => format!("{} (model.bf16 speeds CPU products up)", u.join(", ")),
    }
}
