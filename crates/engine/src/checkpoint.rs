//! Checkpoints: consistent cuts of every layer's state plus the coordinator's, written so
//! that a crash at any instant leaves the previous complete checkpoint or the new one.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNNNNN/` holding one safetensors file
//! per layer (layers are the unit, not stages, so a run resumes under another placement),
//! `coordinator.json` (data position, step, metrics so far) and `manifest.json`, written
//! last, listing every file with its size and SHA-256. Files are written under a temporary
//! directory, each synced, then the directory is renamed into place and its parent synced.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use layerwise_data::DatasetKind;
use layerwise_nn::{ModelConfig, Named};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::config::RunConfig;
use crate::{EngineError, Result};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Training steps taken by every layer.
    pub step: u64,
    /// The epoch the last step belongs to (0 before any).
    pub epoch: usize,
    /// Where the data stream resumes: (epoch from 1, batch index in it).
    pub position: (usize, usize),
    /// Epochs completed (evaluated and reported).
    pub epochs_done: usize,
    /// SHA-256 of the whole config, for the record.
    pub config_hash: String,
    /// What must match for a run to resume from this checkpoint.
    pub model: ModelConfig,
    pub dataset: DatasetKind,
    /// Test (or validation) error of the last completed epoch, when known.
    pub error: Option<f64>,
    pub files: Vec<FileEntry>,
    /// Seconds since the Unix epoch.
    pub created: f64,
}

/// The coordinator's part of a cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorState {
    pub step: u64,
    pub position: (usize, usize),
    /// Every metrics line written so far.
    pub metrics: Vec<serde_json::Value>,
}

/// One layer's state, copied out of training: `layer-NNN` or `output`.
pub type LayerPart = (String, Vec<Named>);

pub fn config_hash(config: &RunConfig) -> String {
    hex(&Sha256::digest(serde_json::to_vec(config).expect("config serialises")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A copy of `t` on the CPU that training can no longer change.
pub fn snapshot(t: &Tensor) -> Tensor {
    let t = t.detach();
    if t.device() == Device::Cpu {
        t.copy()
    } else {
        t.to_device(Device::Cpu)
    }
}

pub fn layer_file(name: &str) -> String {
    format!("{name}.safetensors")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| EngineError::io(path, e))?;
    f.write_all(bytes).map_err(|e| EngineError::io(path, e))?;
    f.sync_all().map_err(|e| EngineError::io(path, e))
}

fn entry(path: &Path) -> Result<FileEntry> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    Ok(FileEntry {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        size: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
    })
}

/// Writes a complete checkpoint under `root` and returns its directory.
pub fn write(
    root: &Path,
    layers: &[LayerPart],
    coordinator: &CoordinatorState,
    mut manifest: Manifest,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| EngineError::io(root, e))?;
    let final_dir = root.join(step_dir_name(coordinator.step));
    let tmp = root.join(format!("{}.partial", step_dir_name(coordinator.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    let mut files = Vec::new();
    for (name, tensors) in layers {
        let path = tmp.join(layer_file(name));
        let named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.contiguous())).collect();
        Tensor::write_safetensors(&named, &path)
            .map_err(|e| EngineError::Other(format!("{}: cannot write: {e}", path.display())))?;
        std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| EngineError::io(&path, e))?;
        files.push(entry(&path)?);
    }
    let coord = tmp.join("coordinator.json");
    write_synced(&coord, &serde_json::to_vec_pretty(coordinator).unwrap())?;
    files.push(entry(&coord)?);
    manifest.files = files;
    write_synced(&tmp.join("manifest.json"), &serde_json::to_vec_pretty(&manifest).unwrap())?;
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| EngineError::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| EngineError::io(&final_dir, e))?;
    sync_dir(root);
    Ok(final_dir)
}

/// Reads a checkpoint's manifest and checks every file it lists.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| EngineError::Other(format!("{}: not a valid manifest: {e}", path.display())))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(EngineError::Other(format!(
            "{}: format version {}, this layerwise reads {FORMAT_VERSION}",
            path.display(),
            manifest.format_version
        )));
    }
    for f in &manifest.files {
        let p = dir.join(&f.name);
        let actual = entry(&p)?;
        if actual.size != f.size || actual.sha256 != f.sha256 {
            return Err(EngineError::Other(format!(
                "{}: damaged: {} bytes with SHA-256 {}, the manifest says {} bytes with {}",
                p.display(),
                actual.size,
                &actual.sha256[..16],
                f.size,
                &f.sha256[..16]
            )));
        }
    }
    Ok(manifest)
}

/// Complete checkpoint directories under `root`, newest (highest step) first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".partial"))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// A verified checkpoint, read back.
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub coordinator: CoordinatorState,
    /// Each layer's tensors by part name (`layer-NNN`, `output`).
    pub layers: BTreeMap<String, Vec<Named>>,
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let manifest = verify(dir)?;
    let coord_path = dir.join("coordinator.json");
    let coordinator: CoordinatorState =
        serde_json::from_str(&std::fs::read_to_string(&coord_path).map_err(|e| EngineError::io(&coord_path, e))?)
            .map_err(|e| EngineError::Other(format!("{}: {e}", coord_path.display())))?;
    let mut layers = BTreeMap::new();
    for f in manifest.files.iter().filter(|f| f.name.ends_with(".safetensors")) {
        let p = dir.join(&f.name);
        let tensors = Tensor::read_safetensors(&p).map_err(|e| EngineError::Other(format!("{}: {e}", p.display())))?;
        layers.insert(f.name.trim_end_matches(".safetensors").to_string(), tensors);
    }
    Ok(Loaded { dir: dir.to_path_buf(), manifest, coordinator, layers })
}

/// The newest checkpoint under `root` that verifies; damaged newer ones are reported
/// (logged) and skipped.
pub fn latest(root: &Path) -> Result<Option<Loaded>> {
    for dir in list(root) {
        match load(&dir) {
            Ok(l) => return Ok(Some(l)),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e}", dir.display()),
        }
    }
    Ok(None)
}

/// Refuses a checkpoint whose model or data set differs from the config's, naming the keys.
pub fn check_compatible(manifest: &Manifest, config: &RunConfig, dir: &Path) -> Result<()> {
    let mut diffs = Vec::new();
    if manifest.dataset != config.data.dataset {
        diffs.push(format!("data.dataset: checkpoint {:?}, config {:?}", manifest.dataset, config.data.dataset));
    }
    let a = serde_json::to_value(&manifest.model).unwrap();
    let b = serde_json::to_value(&config.model).unwrap();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, va) in a {
            if b.get(k) != Some(va) {
                diffs.push(format!(
                    "model.{k}: checkpoint {va}, config {}",
                    b.get(k).unwrap_or(&serde_json::Value::Null)
                ));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Config(format!(
            "checkpoint {} was taken with another model or data set and cannot resume this config: {}",
            dir.display(),
            diffs.join("; ")
        )))
    }
}

/// The checkpoint with the lowest recorded error, if any recorded one.
pub fn best(root: &Path) -> Option<PathBuf> {
    list(root)
        .into_iter()
        .filter_map(|d| {
            let text = std::fs::read_to_string(d.join("manifest.json")).ok()?;
            let m: Manifest = serde_json::from_str(&text).ok()?;
            m.error.filter(|e| e.is_finite()).map(|e| (e, d))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, d)| d)
}

/// Keeps the newest `keep` checkpoints and the best one; removes the rest and any partial
/// directories left by a crash.
pub fn prune(root: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(root) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().ends_with(".partial") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let best = best(root);
    for (i, dir) in list(root).into_iter().enumerate() {
        if i >= keep.max(1) && Some(&dir) != best.as_ref() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A checkpoint to write once every stage has sent its part.
pub struct Job {
    pub seq: u64,
    pub coordinator: CoordinatorState,
    pub manifest: Manifest,
    pub stages: usize,
}

/// The checkpoint writer: a thread that gathers the stages' parts of each cut and writes
/// them, so that training goes on while files are written.
pub struct Writer {
    jobs: Option<crossbeam_channel::Sender<Job>>,
    results: crossbeam_channel::Receiver<Result<PathBuf>>,
    handle: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl Writer {
    pub fn spawn(
        root: PathBuf,
        keep: usize,
        parts: crossbeam_channel::Receiver<crate::message::CheckpointPart>,
    ) -> Self {
        let (jobs_tx, jobs) = crossbeam_channel::unbounded::<Job>();
        let (results_tx, results) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                let mut pending: BTreeMap<u64, (Option<Job>, Vec<LayerPart>, usize)> = BTreeMap::new();
                let (mut jobs_open, mut parts_open) = (true, true);
                while jobs_open || parts_open {
                    crossbeam_channel::select! {
                        recv(jobs) -> j => match j {
                            Ok(job) => {
                                let seq = job.seq;
                                pending.entry(seq).or_insert_with(|| (None, vec![], 0)).0 = Some(job);
                            }
                            Err(_) => { jobs_open = false; continue; }
                        },
                        recv(parts) -> p => match p {
                            Ok(part) => {
                                let e = pending.entry(part.seq).or_insert_with(|| (None, vec![], 0));
                                e.1.extend(part.layers);
                                e.2 += 1;
                            }
                            // Every stage is gone: what is pending can no longer complete.
                            Err(_) => { parts_open = false; jobs_open = false; continue; }
                        },
                    }
                    let ready: Vec<u64> = pending
                        .iter()
                        .filter(|(_, (job, _, n))| job.as_ref().is_some_and(|j| *n == j.stages))
                        .map(|(s, _)| *s)
                        .collect();
                    for seq in ready {
                        let (job, mut layers, _) = pending.remove(&seq).unwrap();
                        let job = job.unwrap();
                        layers.sort_by(|a, b| a.0.cmp(&b.0));
                        let result = write(&root, &layers, &job.coordinator, job.manifest);
                        if result.is_ok() {
                            prune(&root, keep);
                        }
                        let _ = results_tx.send(result);
                    }
                }
                for (_, (job, _, n)) in pending {
                    if let Some(job) = job {
                        let _ = results_tx.send(Err(EngineError::Other(format!(
                            "checkpoint at step {} incomplete: {n} of {} stages sent their state",
                            job.coordinator.step, job.stages
                        ))));
                    }
                }
            })
            .expect("spawn checkpoint writer");
        Self { jobs: Some(jobs_tx), results, handle: Some(handle), in_flight: 0 }
    }

    pub fn submit(&mut self, job: Job) {
        self.in_flight += 1;
        if let Some(j) = &self.jobs {
            let _ = j.send(job);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Waits until at most `limit` checkpoints are in flight, returning the finished ones
    /// results. Bounds the memory held by copies of the model awaiting their write.
    pub fn wait_below(&mut self, limit: usize) -> Vec<Result<PathBuf>> {
        let mut done = Vec::new();
        while self.in_flight > limit {
            match self.results.recv() {
                Ok(r) => {
                    self.in_flight -= 1;
                    done.push(r);
                }
                Err(_) => {
                    self.in_flight = 0;
                    done.push(Err(EngineError::Other("the checkpoint writer stopped".into())));
                }
            }
        }
        done
    }

    /// Results of the checkpoints finished since the last call.
    pub fn poll(&mut self) -> Vec<Result<PathBuf>> {
        let done: Vec<_> = self.results.try_iter().collect();
        self.in_flight -= done.len();
        done
    }

    /// Waits for every submitted checkpoint; the stages' part senders must be dropped
    /// first (or have sent everything), else incomplete cuts are reported as errors.
    pub fn finish(mut self) -> Vec<Result<PathBuf>> {
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.results.try_iter().collect()
    }
}
