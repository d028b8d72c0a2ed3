//! The service: `layerwise serve --jobs DIR --runs DIR`.
//!
//! Tokio runs the control side: signals, the job directory, timers. Each job's training
//! runs on plain threads (the engine's stage workers), one job thread per job. The
//! lifecycle is one visible mechanism:
//!
//! - start: scan the jobs directory; jobs whose run stopped or crashed mid-way resume from
//!   their checkpoints, new ones are queued; tell systemd we are ready;
//! - run: start queued jobs whose devices are free (jobs on disjoint devices run at once);
//!   rescan on a timer and on SIGHUP; a removed job file or a `NAME.cancel` file cancels
//!   its job after a checkpoint; a failed job is recorded and the next one starts;
//! - stop (SIGTERM, SIGINT): every running job checkpoints and stops; exit 0.

pub mod charts;
pub mod dashboard;
pub mod exposition;
pub mod http;
pub mod joblog;
pub mod jobs;

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::jobs::{Finished, JobTable};

pub struct ServeOptions {
    pub jobs: PathBuf,
    pub runs: PathBuf,
    /// How often the jobs directory is rescanned.
    pub scan_every: Duration,
    /// How long running jobs get to checkpoint and stop after SIGTERM.
    pub stop_timeout: Duration,
    /// A job that was running each time the service died this many times is failed, not resumed.
    pub max_crash_restarts: u32,
    /// Listening for workers: jobs may place stages on them.
    pub cluster: Option<std::sync::Arc<layerwise_net::Cluster>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
}

fn notify(state: sd_notify::NotifyState) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(false, &[state]);
}

pub fn serve(options: ServeOptions) -> Result<(), DaemonError> {
    for dir in [&options.jobs, &options.runs] {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Io { path: dir.clone(), source })?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Runtime(format!("cannot start the control runtime: {e}")))?;
    runtime.block_on(control(options))
}

async fn control(options: ServeOptions) -> Result<(), DaemonError> {
    let sig = |kind| signal(kind).map_err(|e| DaemonError::Runtime(format!("cannot watch signals: {e}")));
    let (mut term, mut int, mut hup) =
        (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?, sig(SignalKind::hangup())?);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
    let mut table = JobTable::new(
        options.jobs.clone(),
        options.runs.clone(),
        options.max_crash_restarts,
        done_tx,
        options.cluster.clone(),
    );
    table.scan();
    table.start_ready();
    notify(sd_notify::NotifyState::Ready);
    tracing::info!(jobs = %options.jobs.display(), runs = %options.runs.display(), "serving");
    let mut tick = tokio::time::interval(options.scan_every);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: rescanning the jobs directory");
                table.scan();
                table.start_ready();
            }
            _ = tick.tick() => {
                table.scan();
                table.start_ready();
            }
            Some(done) = done_rx.recv() => {
                table.finished(done);
                table.start_ready();
            }
        }
    }
    notify(sd_notify::NotifyState::Stopping);
    let running = table.stop_all();
    tracing::info!(running, "stopping: every running job takes a checkpoint");
    let deadline = tokio::time::Instant::now() + options.stop_timeout;
    while table.running() > 0 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(done)) => table.finished(done),
            Ok(None) => break,
            Err(_) => {
                tracing::error!(still_running = table.running(), "jobs did not stop in time; exiting without them");
                break;
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}
