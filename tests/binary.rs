//! The real `layerwise` binary: how it is linked, and training end to end on real
//! Fashion-MNIST (installed by scripts/setup.sh from Debian's package).

use std::path::Path;
use std::process::Command;

use layerwise_tests::repo_root;

const BIN: &str = env!("CARGO_BIN_EXE_layerwise");

/// `ldd` of the binary with no LD_LIBRARY_PATH: it must find libtorch by itself (rpath)
/// and keep libtorch_cuda.so, without which CUDA silently disappears on GPU machines.
#[test]
fn binary_keeps_libtorch_cuda_and_finds_torch_without_ld_library_path() {
    let out = Command::new("ldd").arg(BIN).env_remove("LD_LIBRARY_PATH").output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    for lib in ["libtorch_cuda.so", "libtorch_cpu.so", "libc10.so"] {
        let line = text.lines().find(|l| l.contains(lib)).unwrap_or_else(|| panic!("{lib} not linked:\n{text}"));
        assert!(!line.contains("not found"), "{lib} not found without LD_LIBRARY_PATH: {line}");
    }
    let run = Command::new(BIN).arg("devices").env_remove("LD_LIBRARY_PATH").output().expect("run layerwise");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("cuda devices"));
}

fn train(run_dir: &Path, sets: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(repo_root()).arg("train").arg("configs/demo.json").arg("--run-dir").arg(run_dir);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.output().expect("run layerwise train")
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
}

#[test]
fn a_bad_override_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(&dir.path().join("run"), &["train.epoch=1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("train.epoch") && stderr.contains("unknown field"), "{stderr}");
}
