//! The real `layerwise` binary: how it is linked, and training end to end on real
//! Fashion-MNIST (installed by scripts/setup.sh from Debian's package).

use std::path::Path;
use std::process::Command;

use layerwise_tests::{
    assert_same_newest_checkpoint, checkpoint_folders, newest_checkpoint_name, output_within, repo_root, wait_until,
    OutputWithin,
};

const BIN: &str = env!("CARGO_BIN_EXE_layerwise");

/// `ldd` of the binary with no LD_LIBRARY_PATH: it must find libtorch by itself (rpath)
/// and keep libtorch_cuda.so, without which CUDA silently disappears on GPU machines.
#[test]
fn binary_keeps_libtorch_cuda_and_finds_torch_without_ld_library_path() {
    let out = Command::new("ldd").arg(BIN).env_remove("LD_LIBRARY_PATH").output_within();
    let text = String::from_utf8_lossy(&out.stdout);
    for lib in ["libtorch_cuda.so", "libtorch_cpu.so", "libc10.so"] {
        let line = text.lines().find(|l| l.contains(lib)).unwrap_or_else(|| panic!("{lib} not linked:\n{text}"));
        assert!(!line.contains("not found"), "{lib} not found without LD_LIBRARY_PATH: {line}");
    }
    let run = Command::new(BIN).arg("devices").env_remove("LD_LIBRARY_PATH").output_within();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("cuda devices"), "{stdout}");
    // The CPU's bfloat16 units, as its flags name them.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has = |unit: &str| flags.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == unit));
    let line = stdout.lines().find(|l| l.starts_with("cpu: ")).unwrap_or_else(|| panic!("no cpu line: {stdout}"));
    for unit in ["avx512_bf16", "amx_bf16"] {
        assert_eq!(line.contains(unit), has(unit), "{unit}: {line}");
    }
    assert_eq!(line.contains("none"), !has("avx512_bf16") && !has("amx_bf16"), "{line}");
}

/// `layerwise train configs/demo.json --run-dir RUN_DIR [--resume] --set ...`.
fn train_command(run_dir: &Path, sets: &[&str], resume: bool) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(repo_root()).arg("train").arg("configs/demo.json").arg("--run-dir").arg(run_dir);
    if resume {
        cmd.arg("--resume");
    }
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd
}

fn train(run_dir: &Path, sets: &[&str]) -> std::process::Output {
    train_command(run_dir, sets, false).output_within()
}

/// The README's demo, shortened: a predsim mlp, one stage per layer, pipelined, on real
/// Fashion-MNIST. 150 steps already bring the test error far below chance (90%).
#[test]
fn demo_trains_on_real_fashion_mnist_and_writes_its_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = train(&run, &["train.steps_per_epoch=150", "train.eval_batches=4", "model.num_hidden=256"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "layerwise train failed:\n{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("test error"));

    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "done", "{status}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["train"]["steps_per_epoch"], 150, "overrides land in the resolved config");
    assert_eq!(config["model"]["num_hidden"], 256);

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    let m = &lines[0];
    for key in ["epoch", "lr", "train_error", "test_error", "images_per_sec", "layers", "stages"] {
        assert!(m.get(key).is_some(), "metrics line lacks {key}: {m}");
    }
    let test_error = m["test_error"].as_f64().unwrap();
    assert!(test_error < 30.0, "test error {test_error}% after 150 steps");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for l in layers {
        assert!(l["loss_pred"].as_f64().unwrap() > 0.0 && l["loss_sim"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["error"].as_f64().unwrap() < 50.0, "{l}");
    }
    assert_eq!(m["stages"].as_array().unwrap().len(), 4, "one stage per layer");

    // eval agrees with the run's own figure; the export, run by PyTorch, predicts the same
    let eval = Command::new(BIN)
        .arg("eval")
        .arg(&run)
        .arg("--json")
        .arg("--predictions")
        .arg(dir.path().join("pred.txt"))
        .output_within();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let e: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(e["examples"], 10_000);
    let model = dir.path().join("model.safetensors");
    let export = Command::new(BIN).arg("export").arg(&run).arg("--out").arg(&model).output_within();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let python = std::env::var("LAYERWISE_TORCH_VENV").map_or("python3".into(), |v| format!("{v}/bin/python3"));
    let check = Command::new(python)
        .args(["-W", "ignore"])
        .arg(repo_root().join("scripts/export_check.py"))
        .arg(&model)
        .arg("/usr/share/datasets/fashion-mnist")
        .arg(dir.path().join("pred.txt"))
        .output()
        .expect("run python3 scripts/export_check.py");
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "PyTorch disagrees with layerwise eval: {report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(r["same_predictions"], 10_000);
    let pytorch_error = r["test_error"].as_f64().unwrap();
    assert!((pytorch_error - e["test_error"].as_f64().unwrap()).abs() < 1e-3, "{r} vs {e}");

    let inspect = Command::new(BIN).arg("inspect").arg(&run).output_within();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success() && text.contains("step         150 (epoch 1)") && text.contains("layer-002"),
        "{text}"
    );
}

/// `--resume` continues a run from its checkpoint to the same end as one uninterrupted run;
/// both runs' TensorBoard event files hold what their metrics.jsonl holds.
#[test]
fn train_resume_continues_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let sets = ["train.steps_per_epoch=20", "train.eval_batches=1", "model.num_hidden=64", "train.epochs=2"];
    let whole = dir.path().join("whole");
    assert!(train(&whole, &sets).status.success());
    let part = dir.path().join("part");
    assert!(train(&part, &[&sets[..3], &["train.epochs=1"]].concat()).status.success());
    let out = train_command(&part, &sets, true).output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    let lines = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (lines(&whole), lines(&part));
    assert_eq!(b.len(), 2);
    for key in ["train_loss", "train_error", "test_error", "test_loss", "layers"] {
        assert_eq!(a[1][key], b[1][key], "{key}");
    }
    // TensorBoard's own reader finds every epoch's figures once, equal to metrics.jsonl,
    // in one event file (the resume wrote it anew, then appended).
    for run in [&whole, &part] {
        let events: Vec<_> = std::fs::read_dir(run)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents."))
            .collect();
        assert_eq!(events.len(), 1, "{}", run.display());
        let python = std::env::var("LAYERWISE_TORCH_VENV").map_or("python3".into(), |v| format!("{v}/bin/python3"));
        let check = Command::new(python)
            .args(["-W", "ignore"])
            .arg(repo_root().join("scripts/tensorboard_check.py"))
            .arg(run)
            .output()
            .expect("run python3 scripts/tensorboard_check.py (scripts/setup.sh installs tensorboard)");
        let said = String::from_utf8_lossy(&check.stdout);
        assert!(check.status.success(), "{said}{}", String::from_utf8_lossy(&check.stderr));
        assert!(said.contains("\"epochs\": [1, 2]"), "{said}");
    }
}

#[test]
fn a_fresh_start_in_a_run_directory_with_checkpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let sets = ["train.steps_per_epoch=3", "train.eval_batches=1", "model.num_hidden=16"];
    assert!(train(&run, &sets).status.success());
    let again = train(&run, &sets);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("--resume") && stderr.contains("checkpoints"), "{stderr}");
    let status = std::fs::read_to_string(run.join("status.json")).unwrap();
    assert!(status.contains("\"done\""), "the earlier run's status stays: {status}");
}

#[test]
fn a_bad_override_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(&dir.path().join("run"), &["train.epoch=1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("train.epoch") && stderr.contains("unknown field"), "{stderr}");
}

/// Ctrl-C (SIGINT) during `layerwise train`: a checkpoint at the next step, exit 0, and
/// `--resume` carries on from there.
#[test]
fn sigint_stops_train_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let sets = ["train.epochs=50", "train.steps_per_epoch=30", "train.eval_batches=1", "model.num_hidden=64"];
    let child = train_command(&run, &sets, false)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the first epoch's metrics", || {
        std::fs::read_to_string(run.join("metrics.jsonl")).ok().filter(|m| !m.is_empty())
    });
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = output_within(child, "train after SIGINT");
    assert!(out.status.success(), "exit {:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "stopped", "{status}");
    let step = status["step"].as_u64().unwrap();
    assert!(step < 1500, "stopped early, at step {step}");
    assert!(run.join("checkpoints").join(format!("step-{step:010}")).join("manifest.json").is_file());
}

/// The steps (`step-N`) of the checkpoints of `run` being written now: their cuts'
/// `.partial` folders.
fn partial_steps(run: &Path) -> Vec<String> {
    let partial = checkpoint_folders(run).into_iter().filter(|n| n.ends_with(".partial"));
    partial.map(|n| n.split('.').next().unwrap_or_default().to_string()).collect()
}

/// kill -9 at instants spread over the step, then --resume: the run ends exactly where an
/// uninterrupted one does. Checkpoints are taken every 2 steps; the kills alternate between
/// two events: a cut's `.partial` folder appearing (the stages are writing their layers,
/// so the kill lands inside a write), and a newer complete checkpoint appearing (between
/// writes, while the stages train). Each waits for its event, not for a time. How many
/// kills found a write still under way is printed (a fast write can finish first).
#[test]
fn sigkill_at_any_instant_then_resume_ends_like_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "train.epochs=6",
        "train.steps_per_epoch=40",
        "train.eval_batches=1",
        "model.num_hidden=256",
        "checkpoint.every_steps=2",
        "train.cpu_threads=4",
    ];
    let whole = dir.path().join("whole");
    assert!(train(&whole, &sets).status.success());
    let run = dir.path().join("killed");
    let (mut seen, mut inside) = (String::new(), 0);
    const KILLS: usize = 6;
    for k in 0..KILLS {
        let mut child = train_command(&run, &sets, true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let during_a_write = k % 2 == 0;
        wait_until(if during_a_write { "a checkpoint write" } else { "the next checkpoint" }, || {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before the kill");
            if during_a_write {
                // a cut newer than the last complete checkpoint (not one a kill left behind)
                partial_steps(&run).iter().any(|p| *p > seen).then_some(())
            } else {
                (newest_checkpoint_name(&run) > seen).then_some(())
            }
        });
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        seen = newest_checkpoint_name(&run);
        // A cut newer than every complete checkpoint was killed while being written.
        inside += usize::from(partial_steps(&run).iter().any(|p| *p > seen));
    }
    eprintln!("{inside} of {KILLS} kills landed inside a checkpoint write");
    // the kills landed mid-training: the last step is not there yet
    assert!(*seen < *"step-0000000240", "{seen}");
    let out = train_command(&run, &sets, true).output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("resuming from"), "the last start resumed: {log}");
    assert!(partial_steps(&run).is_empty(), "the resumed run removed what killed writes left");
    assert_same_newest_checkpoint(&whole, &run, "after kill -9 and resume");
}

/// `bench train --json` runs each placement in a process of its own (here in two rounds over
/// the list) and reports, for every run, figures that agree with each other and with the
/// plan it used.
#[test]
fn bench_train_prints_one_json_object_of_consistent_figures() {
    let kept = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(BIN)
        .current_dir(repo_root())
        .args(["bench", "train", "configs/demo.json", "--steps", "2", "--repeats", "1", "--rounds", "2", "--json"])
        .args(["--set", "model.num_hidden=32", "--set", "train.batch_size=16", "--keep-runs"])
        .arg(kept.path())
        .output_within();
    let wall = started.elapsed().as_secs_f64();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let num = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"));
    assert!(num(&report["machine"], "cores") >= 1.0);
    assert!(num(&report["machine"], "matmul_gflops") > 0.0);
    assert_eq!(report["machine"]["matmul_kind"], "float32", "demo.json's products are float32");
    let flop = num(&report, "train_gflop_per_image");
    assert!(flop > 0.0);
    let layers = report["layer_step_seconds"].as_array().expect("demo.json learns locally: layers are timed").len();
    let runs = report["runs"].as_array().unwrap();
    let modes: Vec<(&str, String)> =
        runs.iter().map(|r| (r["mode"].as_str().unwrap(), r["placement"].to_string())).collect();
    assert_eq!(modes[0], ("sequential", "\"single\"".into()));
    assert!(modes.contains(&("pipelined", "\"auto\"".into())), "{modes:?}");
    assert!(modes.contains(&("pipelined", "\"per_layer\"".into())), "{modes:?}");
    assert_eq!(num(&runs[0], "speedup"), 1.0);
    assert_eq!(num(&report, "rounds"), 2.0);
    for r in runs {
        let ips = num(r, "images_per_sec");
        // One measured epoch in each of two rounds; the run's figure is their median.
        let epochs: Vec<f64> = serde_json::from_value(r["epochs_images_per_sec"].clone()).unwrap();
        assert_eq!(epochs.len(), 2, "{r}");
        assert!((ips - (epochs[0] + epochs[1]) / 2.0).abs() <= 1e-9 * ips, "{r}");
        assert!(ips > 0.0 && num(r, "peak_rss_bytes") > 1e6, "{r}");
        assert_eq!(num(r, "speedup"), ips / num(&runs[0], "images_per_sec"));
        assert_eq!(num(r, "efficiency"), num(r, "speedup") / num(r, "best_speedup"));
        assert!((num(r, "gflops") - ips * flop).abs() <= 1e-9 * ips * flop, "{r}");
        let stages: Vec<Vec<u64>> = serde_json::from_value(r["stages"].clone()).unwrap();
        assert_eq!(stages.concat(), (0..layers as u64).collect::<Vec<_>>(), "{r}");
        assert_eq!(r["threads"].as_array().unwrap().len(), stages.len());
    }
    // Against a clock the bench does not read: every measured epoch trained 2 steps of 16
    // images, so its figure says it took 32 / images_per_sec seconds; all of them together
    // cannot have taken longer than the whole command did.
    let claimed: f64 = runs
        .iter()
        .flat_map(|r| serde_json::from_value::<Vec<f64>>(r["epochs_images_per_sec"].clone()).unwrap())
        .map(|ips| 32.0 / ips)
        .sum();
    assert!(claimed > 0.0 && claimed < wall, "the epochs claim {claimed:.3} s of training in a {wall:.3} s command");
    // Against each run's own record: the figures the bench reports for run I in round R are
    // the images/s its run wrote to metrics.jsonl for each measured epoch (the first epoch
    // warms up), and the run trained the steps asked for.
    for (i, r) in runs.iter().enumerate() {
        let epochs: Vec<f64> = serde_json::from_value(r["epochs_images_per_sec"].clone()).unwrap();
        for (round, figure) in epochs.iter().enumerate() {
            let dir = kept.path().join(format!("round-{}-run-{i}", round + 1));
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 2, "a warm-up epoch and one measured: {}", dir.display());
            assert_eq!(lines[1]["images_per_sec"].as_f64(), Some(*figure), "{}: {r}", dir.display());
            assert_eq!(lines[1]["step"].as_u64(), Some(4), "{}", dir.display());
        }
    }
    let per_layer = runs.iter().find(|r| r["placement"] == "per_layer").unwrap();
    assert_eq!(per_layer["stages"].as_array().unwrap().len(), layers);
    // The process pair: the same three stages in one process and in three (two workers).
    let processes: Vec<u64> = runs.iter().map(|r| r["processes"].as_u64().unwrap()).collect();
    assert_eq!(processes.iter().filter(|&&p| p == 3).count(), 1, "{processes:?}");
    let (together, apart) = (&runs[runs.len() - 2], &runs[runs.len() - 1]);
    assert_eq!((together["processes"].as_u64(), apart["processes"].as_u64()), (Some(1), Some(3)));
    assert_eq!(together["stages"], apart["stages"]);
    assert_eq!(together["threads"], apart["threads"]);
    assert_eq!(apart["stages"].as_array().unwrap().len(), 3);
}
