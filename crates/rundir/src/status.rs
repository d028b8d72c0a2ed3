//! The run directory: the resolved config, one metrics line per epoch, and the run's status.
//! Files that are rewritten (status) are replaced atomically: written to a temporary name,
//! synced, renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::atomic::write_atomic;
use crate::metrics::EpochMetrics;
use crate::{Error, Result};
use layerwise_plan::RunConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    /// Interrupted with a checkpoint (a signal, a stop request); resumable.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    pub reason: String,
    pub epoch: usize,
    pub step: u64,
    /// Seconds since the Unix epoch.
    pub updated: f64,
}

#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl RunDir {
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { path: path.to_path_buf() })
    }

    pub fn write_config(&self, config: &RunConfig) -> Result<()> {
        let text = serde_json::to_string_pretty(config).expect("config serialises");
        write_atomic(&self.path.join("config.json"), text.as_bytes())
    }

    pub fn set_status(&self, state: RunState, reason: &str, epoch: usize, step: u64) -> Result<()> {
        let s = Status { state, reason: reason.to_string(), epoch, step, updated: now() };
        write_atomic(&self.path.join("status.json"), serde_json::to_string_pretty(&s).unwrap().as_bytes())
    }

    pub fn status(&self) -> Option<Status> {
        let text = std::fs::read_to_string(self.path.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// Appends one epoch's metrics as a JSON line and syncs it.
    /// TensorBoard's event file gets the same figures ([`crate::tfevents`]).
    pub fn append_metrics(&self, line: &EpochMetrics) -> Result<()> {
        let parsed = line;
        let line = serde_json::to_string(line).expect("metrics serialise");
        let path = self.metrics_path();
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&path, e))?;
        f.sync_data().map_err(|e| Error::io(&path, e))?;
        crate::tfevents::append(&self.path, parsed)
    }

    /// Replaces the metrics file with `lines` (on resume: the checkpoint's, dropping lines
    /// of epochs after it).
    pub fn rewrite_metrics(&self, lines: &[EpochMetrics]) -> Result<()> {
        let text: String =
            lines.iter().map(|l| format!("{}\n", serde_json::to_string(l).expect("metrics serialise"))).collect();
        write_atomic(&self.metrics_path(), text.as_bytes())?;
        crate::tfevents::rewrite(&self.path, lines)
    }

    /// Every metrics line written so far (lines that do not parse are skipped).
    pub fn metrics(&self) -> Vec<EpochMetrics> {
        std::fs::read_to_string(self.metrics_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
