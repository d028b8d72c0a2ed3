//! The run directory: the resolved config, one metrics line per epoch, and the run's status.
//! Files that are rewritten (status) are replaced atomically: written to a temporary name,
//! synced, renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // A fresh random name, created exclusively: an existing file or a link planted under a
    // guessable name is never written through.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file planted under the temporary name an older version used (a link to a victim
    /// file) is neither written through nor followed: the temporary name is fresh and
    /// created exclusively, and none is left behind.
    #[test]
    fn an_atomic_write_never_writes_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let target = dir.path().join("x.json");
        for planted in ["x.json.tmp", ".x.json.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(planted)).unwrap();
        }
        write_atomic(&target, b"{}").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(left, [".x.json.tmp", "victim", "x.json", "x.json.tmp"]);
    }
}
