//! A checkpoint cut, as the coordinator completes it. The coordinator makes the cut's
//! folder and sends a marker down the pipeline; as the marker passes, each stage writes its
//! own layers' files there and reports what it wrote (name, size, SHA-256). Once every stage
//! has reported, the coordinator adds `coordinator.json` and the manifest (last), renames
//! the folder into place and prunes old checkpoints. No tensor travels to the coordinator.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use layerwise_plan::Plan;
use layerwise_rundir::checkpoint::{self, CoordinatorState, FileEntry, Manifest};

use crate::{Error, Result};

struct Pending {
    coordinator: CoordinatorState,
    manifest: Manifest,
    files: Vec<FileEntry>,
    /// The stages whose part has arrived (each counts once).
    reported: BTreeSet<usize>,
    failures: Vec<String>,
}

/// The files each stage of `plan` writes into a cut: its layers' part files, sorted.
pub fn parts_of(plan: &Plan) -> Vec<Vec<String>> {
    let part = |layer| checkpoint::part_file(&checkpoint::part_name(layer, plan.output_layer()));
    plan.stages
        .iter()
        .map(|s| s.layers.iter().map(|&l| part(l)).collect::<BTreeSet<_>>().into_iter().collect())
        .collect()
}

pub struct Cuts {
    root: PathBuf,
    keep: usize,
    /// The files each stage must report for a cut ([`parts_of`]).
    parts: Vec<Vec<String>>,
    pending: BTreeMap<u64, Pending>,
    /// What each checkpoint folder verified to (None: damaged), so each is hashed once.
    verified: HashMap<PathBuf, Option<Manifest>>,
    /// The newest checkpoint this run completed.
    pub last_written: Option<PathBuf>,
    /// Why the last cut that failed failed (the first cause, as a stage or this side gave it).
    pub last_failure: Option<String>,
}

impl Cuts {
    /// Cuts of a run under `root`; partial folders an earlier crash left there are removed.
    pub fn new(root: PathBuf, keep: usize, parts: Vec<Vec<String>>) -> Self {
        checkpoint::remove_partials(&root);
        Self {
            root,
            keep,
            parts,
            pending: BTreeMap::new(),
            verified: HashMap::new(),
            last_written: None,
            last_failure: None,
        }
    }

    /// Makes a fresh folder for cut `seq`, which the stages fill when its marker reaches them.
    pub fn begin(&mut self, seq: u64, coordinator: CoordinatorState, manifest: Manifest) -> Result<()> {
        let dir = checkpoint::partial_dir(&self.root, coordinator.step, seq);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let reported = BTreeSet::new();
        self.pending.insert(seq, Pending { coordinator, manifest, files: vec![], reported, failures: vec![] });
        Ok(())
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A stage's part of cut `seq`. When it was the last part, the cut is completed (or,
    /// if a stage could not write, abandoned) and the result returned. A part comes from
    /// another process as often as not: it counts once per stage of the run, and its files
    /// must be exactly that stage's part files (no other name reaches the manifest).
    pub fn part(
        &mut self,
        seq: u64,
        stage: usize,
        files: std::result::Result<Vec<FileEntry>, String>,
    ) -> Option<Result<PathBuf>> {
        let p = self.pending.get_mut(&seq)?;
        let expected = self.parts.get(stage);
        match (expected, files) {
            (None, _) => p.failures.push(format!("a part for stage {stage} of a run of {} stages", self.parts.len())),
            (Some(_), _) if !p.reported.insert(stage) => p.failures.push(format!("stage {stage} reported twice")),
            (Some(_), Err(e)) => p.failures.push(format!("stage {stage}: {e}")),
            (Some(want), Ok(f)) => {
                let mut names: Vec<&str> = f.iter().map(|e| e.name.as_str()).collect();
                names.sort_unstable();
                if names != want.iter().map(String::as_str).collect::<Vec<_>>() {
                    let quoted: Vec<String> = names.iter().take(8).map(|n| layerwise_plan::quote(n)).collect();
                    p.failures.push(format!("stage {stage} reported files {quoted:?}, expected {want:?}"));
                } else {
                    p.files.extend(f);
                }
            }
        }
        if p.reported.len() < self.parts.len() {
            return None;
        }
        let p = self.pending.remove(&seq)?;
        let partial = checkpoint::partial_dir(&self.root, p.coordinator.step, seq);
        let (step, failures) = (p.coordinator.step, p.failures.clone());
        let result = if failures.is_empty() {
            self.complete(&partial, p)
        } else {
            let _ = std::fs::remove_dir_all(&partial);
            Err(Error::Other(format!("checkpoint at step {step}: {}", failures.join("; "))))
        };
        if let Err(e) = &result {
            self.last_failure = Some(e.to_string());
        }
        Some(result)
    }

    fn complete(&mut self, partial: &Path, mut p: Pending) -> Result<PathBuf> {
        p.files.sort_by(|a, b| a.name.cmp(&b.name));
        let coordinator = serde_json::to_vec_pretty(&p.coordinator).expect("coordinator state serialises");
        p.files.push(checkpoint::write_synced(&partial.join("coordinator.json"), &coordinator)?);
        p.manifest.files = p.files;
        let manifest = serde_json::to_vec_pretty(&p.manifest).expect("manifest serialises");
        checkpoint::write_synced(&partial.join("manifest.json"), &manifest)?;
        checkpoint::sync_dir(partial);
        let dir = self.root.join(checkpoint::step_dir_name(p.coordinator.step));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(partial, &dir).map_err(|e| Error::io(&dir, e))?;
        checkpoint::sync_dir(&self.root);
        self.verified.insert(dir.clone(), Some(p.manifest));
        let verified = &mut self.verified;
        checkpoint::prune(&self.root, self.keep, &dir, |d| {
            verified.entry(d.to_path_buf()).or_insert_with(|| checkpoint::verify(d).ok()).clone()
        });
        self.last_written = Some(dir.clone());
        Ok(dir)
    }

    /// Cuts that can no longer complete (the pipeline is gone): their folders are removed.
    pub fn abandon(&mut self) -> Vec<Error> {
        let abandoned: Vec<Error> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(seq, p)| {
                let _ = std::fs::remove_dir_all(checkpoint::partial_dir(&self.root, p.coordinator.step, seq));
                let causes: String = p.failures.iter().map(|f| format!("; {f}")).collect();
                Error::Other(format!(
                    "checkpoint at step {} incomplete: {} of {} stages wrote their layers{causes}",
                    p.coordinator.step,
                    p.reported.len(),
                    self.parts.len()
                ))
            })
            .collect();
        if let Some(e) = abandoned.last() {
            self.last_failure.get_or_insert_with(|| e.to_string());
        }
        abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_data::DatasetKind;
    use layerwise_nn::ModelConfig;

    /// A run of two stages: layer 0, then the output layer.
    fn two_stages() -> Vec<Vec<String>> {
        vec![vec!["layer-000.safetensors".into()], vec!["output.safetensors".into()]]
    }

    fn file(name: &str) -> FileEntry {
        FileEntry { name: name.into(), size: 0, sha256: String::new() }
    }

    fn begin(cuts: &mut Cuts, seq: u64, step: u64) {
        let coordinator = CoordinatorState { step, position: (1, step as usize), metrics: vec![] };
        let manifest = Manifest {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            epoch: 1,
            position: (1, step as usize),
            epochs_done: 0,
            config_hash: String::new(),
            model: ModelConfig::default(),
            dataset: DatasetKind::FashionMnist,
            error: None,
            files: vec![],
            created: 0.0,
        };
        cuts.begin(seq, coordinator, manifest).unwrap();
    }

    /// A cut that a stage could not write leaves no folder and remembers why, so that the
    /// run's error can say it (before, the run said only "see the log").
    #[test]
    fn a_failed_cut_keeps_its_cause_and_leaves_no_folder() {
        let root = tempfile::tempdir().unwrap();
        let mut cuts = Cuts::new(root.path().to_path_buf(), 2, two_stages());
        begin(&mut cuts, 1, 10);
        assert!(cuts.part(1, 0, Ok(vec![file("layer-000.safetensors")])).is_none(), "one stage of two");
        let e = cuts.part(1, 1, Err("No space left on device (os error 28)".into())).unwrap().unwrap_err();
        assert!(e.to_string().contains("stage 1: No space left on device"), "{e}");
        assert!(cuts.last_failure.as_deref().unwrap().contains("No space left on device"));
        assert!(checkpoint::list(root.path()).is_empty() && std::fs::read_dir(root.path()).unwrap().count() == 0);
        // A cut whose stages are gone is abandoned, and says how far it got.
        let mut cuts = Cuts::new(root.path().to_path_buf(), 2, two_stages());
        begin(&mut cuts, 2, 20);
        cuts.part(2, 0, Ok(vec![file("layer-000.safetensors")]));
        assert_eq!(cuts.abandon().len(), 1);
        assert!(cuts.last_failure.unwrap().contains("1 of 2 stages wrote their layers"));
    }

    /// Parts come from other processes: a stage's second part, a part for a stage that is
    /// not there, and files that are not exactly the stage's part files all fail the cut
    /// (no folder kept, the cause said) instead of completing it with layers missing or
    /// putting another path into the manifest.
    #[test]
    fn a_cut_takes_each_stages_own_files_once() {
        let root = tempfile::tempdir().unwrap();
        // Each case: the parts sent, (stage, file names), and the cause the cut must give.
        type Case<'a> = (Vec<(usize, Vec<&'a str>)>, &'a str);
        let bad_parts: [Case; 4] = [
            (vec![(0, vec!["layer-000.safetensors"]), (0, vec!["layer-000.safetensors"])], "stage 0 reported twice"),
            (vec![(0, vec!["layer-000.safetensors"]), (5, vec!["output.safetensors"])], "stage 5 of a run of 2"),
            (vec![(0, vec!["/dev/zero"]), (1, vec!["output.safetensors"])], "reported files [\"/dev/zero\"]"),
            (
                vec![(0, vec!["layer-000.safetensors", "../elsewhere"]), (1, vec!["output.safetensors"])],
                "reported files [\"../elsewhere\"",
            ),
        ];
        for (case, (parts, cause)) in bad_parts.into_iter().enumerate() {
            let mut cuts = Cuts::new(root.path().to_path_buf(), 2, two_stages());
            begin(&mut cuts, 1, 10);
            for (stage, names) in parts {
                let _ = cuts.part(1, stage, Ok(names.into_iter().map(file).collect()));
            }
            // However they came, the cut has not completed with what it was sent.
            assert!(checkpoint::list(root.path()).is_empty(), "case {case}");
            let e = match cuts.pending() {
                0 => cuts.last_failure.clone().unwrap(),
                _ => cuts.abandon().pop().unwrap().to_string(),
            };
            assert!(e.contains(cause), "case {case}: {e}");
        }
    }
}
