//! Checkpoints and exact resume: a run stopped after step N and resumed ends bit-identical
//! to the same run done in one go, under the same or another placement; damaged or
//! incompatible checkpoints are never resumed from.

use std::path::Path;

use layerwise_coordinator::{RunOptions, RunSummary};
use layerwise_plan::{PipelineMode, Placement, RunConfig, StageSpec};
use layerwise_rundir::checkpoint;
use layerwise_tests::{assert_same_run, data_dir, run_in_temp, small_run_config};

fn run(config: &RunConfig, dir: &Path, options: RunOptions) -> RunSummary {
    layerwise_coordinator::run(config, dir, options).unwrap()
}

fn pipelined(data: &Path, placement: Placement) -> RunConfig {
    let mut c = small_run_config(data, "mlp");
    c.pipeline.mode = PipelineMode::Pipelined;
    c.pipeline.placement = placement;
    c
}

fn stop_at(step: u64) -> RunOptions {
    RunOptions { stop_after_step: Some(step), ..Default::default() }
}

fn resume() -> RunOptions {
    RunOptions { resume: true, ..Default::default() }
}

#[test]
fn a_run_stopped_and_resumed_equals_the_run_done_in_one_go() {
    let data = data_dir();
    let config = pipelined(data.path(), Placement::PerLayer);
    let whole = run_in_temp(&config);
    // mid-epoch 2; just after the last batch of epoch 1, before its evaluation; at step 1
    for n in [17, 12, 1] {
        let dir = tempfile::tempdir().unwrap();
        let first = run(&config, dir.path(), stop_at(n));
        assert!(first.stopped && first.step == n, "stopped at {n}");
        let status: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap()).unwrap();
        assert_eq!(status["state"], "stopped");
        let resumed = run(&config, dir.path(), resume());
        assert!(resumed.resumed_from.is_some());
        assert_same_run(&whole, &resumed, &format!("stopped at step {n}"));
        let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2, "metrics.jsonl holds each epoch once");
    }
}

#[test]
fn a_conv_net_stopped_and_resumed_equals_the_run_done_in_one_go() {
    // Convolution weights and their Adam slots are channels-last in memory; checkpoints hold
    // them contiguous, and a resume must put every value back where it was.
    let data = data_dir();
    let config = pipelined(data.path(), Placement::PerLayer);
    let config = RunConfig { model: small_run_config(data.path(), "vgg6a").model, ..config };
    let whole = run_in_temp(&config);
    let dir = tempfile::tempdir().unwrap();
    let first = run(&config, dir.path(), stop_at(17));
    assert!(first.stopped && first.step == 17);
    let resumed = run(&config, dir.path(), resume());
    assert!(resumed.resumed_from.is_some());
    assert_same_run(&whole, &resumed, "vgg6a stopped at step 17");
}

#[test]
fn a_checkpoint_taken_under_one_placement_resumes_under_another() {
    let data = data_dir();
    let whole = run_in_temp(&pipelined(data.path(), Placement::PerLayer));
    let dir = tempfile::tempdir().unwrap();
    run(&pipelined(data.path(), Placement::PerLayer), dir.path(), stop_at(9));
    let mut single = pipelined(data.path(), Placement::Single);
    single.pipeline.mode = PipelineMode::Sequential;
    let mid = run(&single, dir.path(), RunOptions { resume: true, stop_after_step: Some(15), ..Default::default() });
    assert!(mid.stopped);
    let mut two = pipelined(data.path(), Placement::PerLayer);
    two.pipeline.placement = Placement::Stages(vec![
        StageSpec { layers: vec![0, 1], device: "cpu".into() },
        StageSpec { layers: vec![2, 3], device: "cpu".into() },
    ]);
    let resumed = run(&two, dir.path(), resume());
    assert_same_run(&whole, &resumed, "per-layer -> single sequential -> 2 stages");
}

#[test]
fn checkpoints_are_verified_and_a_damaged_newest_one_is_skipped() {
    let data = data_dir();
    let mut config = pipelined(data.path(), Placement::PerLayer);
    config.checkpoint.every_steps = 5;
    config.checkpoint.keep = 3;
    let dir = tempfile::tempdir().unwrap();
    run(&config, dir.path(), stop_at(13));
    let root = dir.path().join("checkpoints");
    let dirs = checkpoint::list(&root);
    let names: Vec<String> = dirs.iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["step-0000000013", "step-0000000012", "step-0000000010"], "the newest 3 are kept");
    for d in &dirs {
        let m = checkpoint::verify(d).unwrap();
        assert_eq!(m.files.len(), 5, "4 layers and the coordinator");
    }
    // flip a byte in the newest: it is refused and the previous one is used
    let victim = dirs[0].join("layer-001.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    let e = checkpoint::verify(&dirs[0]).unwrap_err().to_string();
    assert!(e.contains("layer-001.safetensors") && e.contains("damaged"), "{e}");
    // a crash mid-write leaves a partial directory, never taken for a checkpoint
    std::fs::create_dir_all(root.join("step-0000000099.partial")).unwrap();
    let latest = checkpoint::latest(&root).unwrap();
    assert_eq!(latest.manifest.step, 12);

    let whole = run_in_temp(&config);
    let resumed = run(&config, dir.path(), resume());
    assert_eq!(resumed.resumed_from.as_deref(), Some(dirs[1].as_path()));
    assert_same_run(&whole, &resumed, "resumed from the previous checkpoint");
    assert!(!root.join("step-0000000099.partial").exists(), "partial directories are cleaned up");
}

#[test]
fn a_checkpoint_of_another_model_is_refused_naming_what_differs() {
    let data = data_dir();
    let config = pipelined(data.path(), Placement::PerLayer);
    let dir = tempfile::tempdir().unwrap();
    run(&config, dir.path(), stop_at(3));
    let mut other = config.clone();
    other.model.num_hidden = 64;
    let e = layerwise_coordinator::run(&other, dir.path(), resume()).unwrap_err().to_string();
    assert!(e.contains("model.num_hidden") && e.contains("48") && e.contains("64"), "{e}");
}

/// A run whose final checkpoint cannot be written fails saying why, in its error and in
/// status.json (before, both said only "could not be written (see the log)"). The folder
/// the checkpoint must take is held by a file, so renaming the finished cut into place fails.
#[test]
fn a_final_checkpoint_that_cannot_be_written_fails_the_run_with_its_cause() {
    let data = data_dir();
    let mut config = pipelined(data.path(), Placement::PerLayer);
    config.train.epochs = 1;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(checkpoint::step_dir_name(12)), b"in the way").unwrap();
    let e = layerwise_coordinator::run(&config, dir.path(), RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("step-0000000012 could not be written: ") && e.contains("Not a directory"), "{e}");
    let status = std::fs::read_to_string(dir.path().join("status.json")).unwrap();
    assert!(status.contains("\"failed\"") && status.contains("Not a directory"), "{status}");
}

#[test]
fn the_best_checkpoint_is_kept_beside_the_newest() {
    let data = data_dir();
    let mut config = pipelined(data.path(), Placement::PerLayer);
    config.train.epochs = 3;
    config.checkpoint.keep = 1;
    let dir = tempfile::tempdir().unwrap();
    let s = run(&config, dir.path(), RunOptions::default());
    let root = dir.path().join("checkpoints");
    let kept = checkpoint::list(&root);
    let best = s.epochs.iter().map(|e| e.test_error).fold(f64::INFINITY, f64::min);
    let newest = checkpoint::verify(&kept[0]).unwrap();
    assert_eq!(newest.step, 36);
    assert!(kept.len() <= 2, "the newest and the best: {kept:?}");
    let errors: Vec<Option<f64>> = kept.iter().map(|d| checkpoint::verify(d).unwrap().error).collect();
    assert!(errors.contains(&Some(best)), "the best epoch's checkpoint ({best}%) is kept: {errors:?}");
}

/// Collects what a stage reports, for tests that drive one stage by hand.
#[derive(Default)]
struct Collect(std::sync::Mutex<Vec<layerwise_pipeline::message::Report>>);

impl layerwise_pipeline::link::ReportSender for Collect {
    fn send(&self, r: layerwise_pipeline::message::Report) -> Result<(), layerwise_pipeline::link::Closed> {
        self.0.lock().unwrap().push(r);
        Ok(())
    }
}

#[test]
fn a_stage_resumes_from_its_own_files_alone_and_writes_its_own_part_of_a_checkpoint() {
    use layerwise_pipeline::message::{Control, Message, Report};
    use layerwise_pipeline::stage::{Stage, StageEnv};
    use layerwise_plan::{Machine, Plan};
    use std::sync::Arc;

    let data = data_dir();
    let config = pipelined(data.path(), Placement::PerLayer);
    let dir = tempfile::tempdir().unwrap();
    run(&config, dir.path(), stop_at(5));
    let full = checkpoint::latest(&dir.path().join("checkpoints")).unwrap();
    // All that stage 2 (layer 2 alone) may see: the manifest and its own layer's file.
    let mine = tempfile::tempdir().unwrap();
    for f in ["manifest.json", "layer-002.safetensors"] {
        std::fs::copy(full.dir.join(f), mine.path().join(f)).unwrap();
    }
    let seen = checkpoint::Verified { dir: mine.path().to_path_buf(), ..full.clone() };
    let plan = Plan::build(&config, Machine::detect()).unwrap();
    let (out, reports) = (tempfile::tempdir().unwrap(), Arc::new(Collect::default()));
    let env = |resume| StageEnv::new(out.path().to_path_buf(), Some(resume), reports.clone());
    let mut stage = Stage::build(&plan, 2, env(seen.clone())).unwrap();
    std::fs::create_dir_all(checkpoint::partial_dir(out.path(), 5, 1)).unwrap();
    stage.handle(Message::control(Control::Checkpoint { step: 5, seq: 1 })).unwrap();
    // The stage wrote its layer itself and said what it wrote: the same bytes it resumed from.
    let reported = reports.0.lock().unwrap().clone();
    match &reported[..] {
        [Report::CheckpointPart { seq: 1, stage: 2, files: Ok(files) }] => {
            assert_eq!(files, &vec![full.manifest.part("layer-002").unwrap().clone()]);
            assert!(checkpoint::partial_dir(out.path(), 5, 1).join("layer-002.safetensors").is_file());
        }
        other => panic!("expected stage 2's checkpoint part, got {other:?}"),
    }
    // Its own file, damaged, is refused by name.
    let victim = mine.path().join("layer-002.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let e = Stage::build(&plan, 2, env(seen)).err().expect("a damaged layer file is refused");
    assert!(e.layer == Some(2) && e.reason.contains("layer-002.safetensors") && e.reason.contains("damaged"), "{e}");
}

#[test]
fn damaged_checkpoints_never_take_a_keep_slot_from_a_new_one() {
    let data = data_dir();
    let mut config = pipelined(data.path(), Placement::PerLayer);
    config.checkpoint.every_steps = 5;
    config.checkpoint.keep = 2;
    let dir = tempfile::tempdir().unwrap();
    run(&config, dir.path(), stop_at(13));
    let root = dir.path().join("checkpoints");
    let damaged = checkpoint::list(&root);
    assert_eq!(damaged.len(), 2);
    for d in &damaged {
        let victim = d.join("layer-000.safetensors");
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[200] ^= 0x10;
        std::fs::write(&victim, bytes).unwrap();
    }
    // Every checkpoint is damaged: the resume starts over, and its new checkpoint stays.
    let first = run(&config, dir.path(), RunOptions { resume: true, stop_after_step: Some(3), ..Default::default() });
    assert!(first.resumed_from.is_none() && first.stopped && first.step == 3);
    let kept = checkpoint::list(&root);
    assert_eq!(kept, vec![root.join("step-0000000003")], "the damaged ones are gone, the new one kept");
    let second = run(&config, dir.path(), resume());
    assert_eq!(second.resumed_from.as_deref(), Some(root.join("step-0000000003").as_path()));
    assert_same_run(&run_in_temp(&config), &second, "started over, stopped at 3, resumed");
}
