//! `layerwise worker`, and `layerwise train` as the coordinator of workers: started by
//! hand (a placement naming workers), or by torchrun / Slurm (every rank runs `train`).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use layerwise_net::launch::{spread, Launch};
use layerwise_net::wire::{load_secret, Auth};
use layerwise_net::worker::{self, WorkerOptions};
use layerwise_net::Cluster;
use layerwise_plan::{DeviceId, Machine, Plan, RunConfig};

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// Where to listen for workers, when the placement names any (HOST:PORT; port 0 picks a
    /// free one). The address is also written to RUN_DIR/coordinator.addr.
    #[arg(long, default_value = "127.0.0.1:29400")]
    listen: String,
    /// A file holding the shared secret that authenticates workers (else LAYERWISE_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Encrypt every connection with workers (on, off); frames are authenticated either
    /// way, and a connection is encrypted when either end asks.
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = ENCRYPT_DEFAULT)]
    encrypt: bool,
    /// Seconds to wait for the workers the placement names (or the launcher's ranks) to
    /// register before the run fails naming the missing ones.
    #[arg(long, default_value_t = 600.0)]
    pub worker_wait: f64,
    /// Serve Prometheus metrics of this run on HOST:PORT (/metrics; port 0 picks one, written
    /// to RUN_DIR/http.addr). Beyond loopback, requests must carry the secret as a bearer token.
    #[arg(long)]
    pub http: Option<String>,
}

impl CoordinatorArgs {
    pub fn secret_file(&self) -> Option<&Path> {
        self.secret_file.as_deref()
    }
}

/// Starts the metrics listener on `addr` for `view`, its address written to `addr_file`.
pub fn start_http(
    addr: &str,
    view: layerwise_daemon::exposition::View,
    cluster: Option<Arc<Cluster>>,
    addr_file: &Path,
    secret_file: Option<&Path>,
) -> anyhow::Result<()> {
    let local: std::net::IpAddr = addr
        .rsplit_once(':')
        .and_then(|(h, _)| h.trim_matches(['[', ']']).parse().ok())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    // The secret only where it is needed: a loopback listener runs without one.
    let secret = if local.is_loopback() { None } else { Some(load_secret(secret_file)?) };
    let bound = layerwise_daemon::http::start(addr, view, cluster, secret).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(dir) = addr_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_address(addr_file, &bound.to_string())
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The coordinator, HOST:PORT.
    #[arg(long)]
    coordinator: String,
    /// This worker's name in placements (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Devices offered, comma-separated: cpu, cuda:0, ... (default: every CUDA device, else cpu).
    #[arg(long)]
    devices: Option<String>,
    /// A file holding the shared secret (else LAYERWISE_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Encrypt every connection (on, off), as `train --encrypt`.
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = ENCRYPT_DEFAULT)]
    encrypt: bool,
    /// The folder (on a shared filesystem) that every run directory of this worker's jobs
    /// lies in: an assignment naming a checkpoint folder outside it is refused.
    #[arg(long)]
    run_root: Option<PathBuf>,
    /// Exit after one job instead of waiting for the next.
    #[arg(long)]
    once: bool,
}

/// `--encrypt`'s default: on, as its cost was within the noise of a three-process mlp
/// predsim epoch on a 2-core machine (docs/benchmarks.md).
pub const ENCRYPT_DEFAULT: &str = "on";

/// The secret (from `secret_file`, else LAYERWISE_SECRET) and this process's wish for
/// encryption.
pub fn auth(secret_file: Option<&Path>, encrypt: bool) -> anyhow::Result<Auth> {
    Ok(Auth::new(load_secret(secret_file)?, encrypt))
}

fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(stop)
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let devices = match &args.devices {
        None => machine.visible(),
        Some(list) => list
            .split(',')
            .map(|d| DeviceId::parse(d.trim()).and_then(|d| machine.check(d)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--devices: {e}"))?,
    };
    let name = match args.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("--name not given and the host name cannot be read")?,
    };
    let options = WorkerOptions {
        coordinator: args.coordinator,
        name,
        devices,
        auth: auth(args.secret_file.as_deref(), args.encrypt)?,
        root: args.run_root,
        once: args.once,
        stop: stop_on_signals()?,
    };
    worker::serve(options)?;
    Ok(())
}

/// A rank other than 0 of a torchrun or Slurm launch: a worker for this one job.
pub fn rank_worker(launch: &Launch, net: &CoordinatorArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let device = launch.device(Machine::detect().cuda_devices)?;
    let options = WorkerOptions {
        coordinator: launch.coordinator(),
        name: Launch::name(launch.rank),
        devices: vec![device],
        auth: auth(net.secret_file.as_deref(), net.encrypt)?,
        root: None,
        once: true,
        stop,
    };
    worker::serve(options)?;
    Ok(())
}

/// The plan of this run, and the listener for its workers when it has any. Under a launch
/// (rank 0), waits for every other rank and, unless the placement names workers, spreads
/// the layers over the ranks.
pub fn coordinate(
    cfg: &mut RunConfig,
    launch: Option<&Launch>,
    net: &CoordinatorArgs,
    run_dir: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<(Plan, Option<Arc<Cluster>>)> {
    let machine = Machine::detect();
    let plan = Plan::build(cfg, machine)?;
    let listen = match launch {
        Some(l) => l.coordinator(),
        None if !plan.workers().is_empty() || !cfg.pipeline.workers.is_empty() => net.listen.clone(),
        None => return Ok((plan, None)),
    };
    let wait = crate::seconds("--worker-wait", net.worker_wait, 1.0)?;
    let cluster = Cluster::listen(&listen, auth(net.secret_file.as_deref(), net.encrypt)?, wait)?;
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    write_address(&run_dir.join("coordinator.addr"), &cluster.addr.to_string())?;
    let plan = match launch {
        Some(l) if plan.workers().is_empty() && cfg.pipeline.workers.is_empty() => {
            let names: Vec<String> = (1..l.world).map(Launch::name).collect();
            tracing::info!("rank 0 of {}: waiting for {names:?} on {}", l.world, cluster.addr);
            let workers = cluster.wait_for(&names, Some(stop))?;
            let mut devices = vec![l.device(machine.cuda_devices)?];
            devices.extend(workers.iter().map(|w| w.devices[0]));
            cfg.pipeline.placement = spread(plan.num_layers(), &devices)?;
            Plan::build(cfg, machine)?
        }
        _ => plan,
    };
    Ok((plan, Some(cluster)))
}

/// `serve --listen`: the listener for workers, its address written to RUNS/.coordinator.addr
/// (a dot name: no job can be called so).
pub fn listen_for_serve(
    listen: Option<&str>,
    secret_file: Option<&Path>,
    encrypt: bool,
    worker_wait: Duration,
    runs: &Path,
) -> anyhow::Result<Option<Arc<Cluster>>> {
    let Some(listen) = listen else { return Ok(None) };
    let cluster = Cluster::listen(listen, auth(secret_file, encrypt)?, worker_wait)?;
    std::fs::create_dir_all(runs).with_context(|| format!("cannot create {}", runs.display()))?;
    write_address(&runs.join(".coordinator.addr"), &cluster.addr.to_string())?;
    Ok(Some(cluster))
}

/// Writes the listening address whole or not at all (a temporary file renamed over it): a
/// script or worker that sees the file never reads it half-written.
fn write_address(path: &Path, addr: &str) -> anyhow::Result<()> {
    Ok(layerwise_rundir::status::write_atomic(path, format!("{addr}\n").as_bytes())?)
}

/// Whether links between GPUs in two processes can go over NCCL in this build and on this
/// machine: the NCCL version libtorch loaded, or why not.
pub fn nccl_status() -> String {
    match layerwise_nccl::version() {
        Ok(v) if tch::Cuda::device_count() > 0 => format!("NCCL {v} (links between GPUs of two processes use it)"),
        Ok(v) => format!("NCCL {v} loaded, but no GPU here: links between processes are TCP"),
        Err(e) => format!("unavailable ({e}): links between processes are TCP, GPU tensors pass through the host"),
    }
}
