//! Checkpoints on disk: their layout, names and format, and reading them back.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNNNNN/` holding one safetensors file
//! per layer (`layer-NNN`, `output`: layers are the unit, not stages, so a run resumes
//! under another placement), `coordinator.json` (data position, step, metrics so far) and
//! `manifest.json`, written last, listing every file with its size and SHA-256. Each stage
//! writes its own layers' files into `step-N.SEQ.partial/` and reports what it wrote; the
//! coordinator adds its own file and the manifest, then renames the folder into place
//! (see `cut.rs`). A crash at any instant leaves the previous complete checkpoint or the new one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use layerwise_data::DatasetKind;
use layerwise_nn::{ModelConfig, Named};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::metrics::EpochMetrics;
use crate::{Error, Result};
use layerwise_plan::RunConfig;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl Manifest {
    /// The entry of a part (`layer-NNN`, `output`), if this checkpoint has it.
    pub fn part(&self, part: &str) -> Option<&FileEntry> {
        let name = part_file(part);
        self.files.iter().find(|f| f.name == name)
    }
}

/// The coordinator's part of a cut.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinatorState {
    pub step: u64,
    pub position: (usize, usize),
    /// Every metrics line written so far.
    pub metrics: Vec<EpochMetrics>,
}

/// The part (file stem) of layer `layer` in a model whose output layer is `output_layer`.
pub fn part_name(layer: usize, output_layer: usize) -> String {
    if layer == output_layer {
        "output".into()
    } else {
        format!("layer-{layer:03}")
    }
}

pub fn part_file(part: &str) -> String {
    format!("{part}.safetensors")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// Where the stages write checkpoint `seq` (at `step`) before it is complete.
pub fn partial_dir(root: &Path, step: u64, seq: u64) -> PathBuf {
    root.join(format!("{}.{seq}.partial", step_dir_name(step)))
}

pub fn config_hash(config: &RunConfig) -> String {
    hex(&Sha256::digest(serde_json::to_vec(config).expect("config serialises")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileEntry> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    entry(path)
}

/// Size and SHA-256 of a file, read in pieces.
fn entry(path: &Path) -> Result<FileEntry> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let (mut hasher, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(FileEntry { name, size, sha256: hex(&hasher.finalize()) })
}

/// Writes one layer's tensors as `dir/PART.safetensors`, synced; returns its entry. Tensors
/// on a GPU are copied to the host first; host tensors are written as they are.
pub fn write_part(dir: &Path, part: &str, tensors: &[Named]) -> Result<FileEntry> {
    let path = dir.join(part_file(part));
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = t.detach();
            let t = if t.device() == Device::Cpu { t } else { t.to_device(Device::Cpu) };
            (n.clone(), t.contiguous())
        })
        .collect();
    Tensor::write_safetensors(&named, &path)
        .map_err(|e| Error::Invalid(format!("{}: cannot write: {}", path.display(), first_line(&e.to_string()))))?;
    std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io(&path, e))?;
    entry(&path)
}

/// Reads one part of a checkpoint after checking it against its manifest entry.
pub fn read_part(dir: &Path, manifest: &Manifest, part: &str) -> Result<Vec<Named>> {
    let expected = manifest
        .part(part)
        .ok_or_else(|| Error::Invalid(format!("{}: the manifest lists no {}", dir.display(), part_file(part))))?;
    let path = dir.join(&expected.name);
    check_entry(&path, expected)?;
    let mut tensors =
        Tensor::read_safetensors(&path).map_err(|e| Error::Invalid(format!("{}: {}", path.display(), e)))?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

fn check_entry(path: &Path, expected: &FileEntry) -> Result<()> {
    let actual = entry(path)?;
    if actual.size != expected.size || actual.sha256 != expected.sha256 {
        return Err(Error::Invalid(format!(
            "{}: damaged: {} bytes with SHA-256 {}, the manifest says {} bytes with {}",
            path.display(),
            actual.size,
            &actual.sha256[..16],
            expected.size,
            expected.sha256.get(..16).unwrap_or(&expected.sha256)
        )));
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Reads a checkpoint's manifest (not its files).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not a valid manifest: {e}", path.display())))?;
    // Every name is joined to the folder and read: only plain names of its own files.
    if let Some(f) = manifest.files.iter().find(|f| !layerwise_data::system::is_file_name(&f.name)) {
        return Err(Error::Invalid(format!(
            "{}: lists {:?}, which is not a file name of this folder",
            path.display(),
            layerwise_plan::quote(&f.name)
        )));
    }
    if manifest.format_version != FORMAT_VERSION {
        return Err(Error::Invalid(format!(
            "{}: format version {}, this layerwise reads {FORMAT_VERSION}",
            path.display(),
            manifest.format_version
        )));
    }
    Ok(manifest)
}

/// Reads a checkpoint's manifest and checks every file it lists.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    for f in &manifest.files {
        check_entry(&dir.join(&f.name), f)?;
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

/// A verified checkpoint: where it is and what it says. Each stage reads its own layers'
/// files from it ([`read_part`]); nobody reads them all but tools that want the whole model.
#[derive(Debug, Clone)]
pub struct Verified {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub coordinator: CoordinatorState,
}

pub fn open(dir: &Path) -> Result<Verified> {
    let manifest = verify(dir)?;
    let coord_path = dir.join("coordinator.json");
    let text = std::fs::read_to_string(&coord_path).map_err(|e| Error::io(&coord_path, e))?;
    let coordinator: CoordinatorState =
        serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", coord_path.display())))?;
    Ok(Verified { dir: dir.to_path_buf(), manifest, coordinator })
}

/// The newest checkpoint under `root` that verifies; damaged newer ones are reported
/// (logged) and skipped.
pub fn latest(root: &Path) -> Option<Verified> {
    for dir in list(root) {
        match open(&dir) {
            Ok(v) => return Some(v),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e}", dir.display()),
        }
    }
    None
}

impl Verified {
    /// Every layer's tensors, named as the whole model names them (`layers.{i}.{name}`,
    /// `output.{name}`), in part order.
    pub fn model_tensors(&self) -> Result<Vec<Named>> {
        let mut out = Vec::new();
        for f in self.manifest.files.iter().filter(|f| f.name.ends_with(".safetensors")) {
            let part = f.name.trim_end_matches(".safetensors");
            let prefix = match part.strip_prefix("layer-").and_then(|i| i.parse::<usize>().ok()) {
                Some(i) => format!("layers.{i}"),
                None => part.to_string(),
            };
            let tensors = read_part(&self.dir, &self.manifest, part)?;
            out.extend(tensors.into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)));
        }
        Ok(out)
    }

    /// One part's tensors (`layer-NNN`, `output`).
    pub fn part(&self, part: &str) -> Result<Vec<Named>> {
        read_part(&self.dir, &self.manifest, part)
    }
}

/// Refuses a checkpoint whose model or data set differs from the config's, naming the keys.
pub fn check_compatible(manifest: &Manifest, config: &RunConfig, dir: &Path) -> Result<()> {
    let mut diffs = Vec::new();
    if manifest.dataset != config.data.dataset {
        diffs.push(format!("data.dataset: checkpoint {:?}, config {:?}", manifest.dataset, config.data.dataset));
    }
    let a = serde_json::to_value(&manifest.model).unwrap_or_default();
    let b = serde_json::to_value(&config.model).unwrap_or_default();
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
        Err(Error::Mismatch(format!(
            "checkpoint {} was taken with another model or data set and cannot resume this config: {}",
            dir.display(),
            diffs.join("; ")
        )))
    }
}

/// Removes the partial folders a crash left under `root` (call it before any cut begins).
pub fn remove_partials(root: &Path) {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Keeps the newest `keep` good checkpoints, the best good one and `just_written`; removes
/// the rest: older ones, and damaged or manifest-less folders (which never count toward
/// `keep`). `good` answers whether a folder verifies (callers cache it: each is hashed once).
pub fn prune(root: &Path, keep: usize, just_written: &Path, mut good: impl FnMut(&Path) -> Option<Manifest>) {
    let dirs: Vec<(PathBuf, Option<Manifest>)> = list(root).into_iter().map(|d| (d.clone(), good(&d))).collect();
    let best = dirs
        .iter()
        .filter_map(|(d, m)| m.as_ref()?.error.filter(|e| e.is_finite()).map(|e| (e, d)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, d)| d.clone());
    let mut kept = 0;
    for (dir, manifest) in &dirs {
        let newest = manifest.is_some() && kept < keep.max(1);
        if newest {
            kept += 1;
        }
        if !(newest || Some(dir) == best.as_ref() || dir == just_written) {
            if manifest.is_none() {
                tracing::warn!("removing damaged checkpoint {}", dir.display());
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(root: &Path, step: u64, error: Option<f64>) -> PathBuf {
        let dir = root.join(step_dir_name(step));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            step,
            epoch: 1,
            position: (2, 0),
            epochs_done: 1,
            config_hash: String::new(),
            model: ModelConfig::default(),
            dataset: DatasetKind::FashionMnist,
            error,
            files: vec![],
            created: 0.0,
        };
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
        dir
    }

    #[test]
    fn pruning_keeps_the_newest_the_best_and_the_one_just_written_and_drops_damaged_ones() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let (a, b, c) = (fake(r, 10, Some(5.0)), fake(r, 20, Some(3.0)), fake(r, 30, Some(4.0)));
        let damaged = fake(r, 40, Some(1.0));
        std::fs::write(damaged.join("manifest.json"), b"{").unwrap();
        let just = fake(r, 50, None);
        prune(r, 1, &just, |d| read_manifest(d).ok());
        // keep 1: the newest good one (50, just written), the best (20); 10, 30 and the damaged 40 go
        assert_eq!(list(r), vec![just.clone(), b.clone()]);
        assert!(!a.exists() && !c.exists() && !damaged.exists());
        // the one just written stays even when it is neither newest nor best
        let newer = fake(r, 60, Some(9.0));
        prune(r, 1, &just, |d| read_manifest(d).ok());
        assert_eq!(list(r), vec![newer, just, b]);
    }

    /// A manifest is read from disk: a name that is not a plain file name of its folder
    /// (an absolute path, `..`, a folder) is refused before anything is opened or hashed.
    #[test]
    fn a_manifest_naming_a_file_outside_its_folder_is_refused_unread() {
        let root = tempfile::tempdir().unwrap();
        let dir = fake(root.path(), 10, None);
        let good = read_manifest(&dir).unwrap();
        for name in ["/dev/zero", "../step-0000000009/layer-000.safetensors", "..", "sub/x", ""] {
            let mut m = good.clone();
            m.files = vec![FileEntry { name: name.into(), size: 0, sha256: String::new() }];
            std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
            let e = verify(&dir).unwrap_err().to_string();
            assert!(e.contains("not a file name of this folder"), "{name:?}: {e}");
        }
    }
}
