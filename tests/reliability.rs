//! Bad inputs, driven through the real binary: each is refused before anything runs (or
//! fails the run) with a short error that names the key or the file, never a panic, an
//! abort, a C++ backtrace or a hang.

use std::path::Path;
use std::process::{Command, Output};

use layerwise_data::idx;
use layerwise_tests::write_idx_dataset;

const BIN: &str = env!("CARGO_BIN_EXE_layerwise");

fn base(data: &Path) -> serde_json::Value {
    serde_json::json!({
        "data": {"dataset": "mnist", "root": data},
        "model": {"arch": "mlp", "num_layers": 2, "num_hidden": 16},
        "train": {"epochs": 1, "batch_size": 32, "steps_per_epoch": 2, "eval_batches": 1, "cpu_threads": 1},
        "pipeline": {"placement": "per_layer"}
    })
}

fn train_text(dir: &Path, text: &str, sets: &[&str]) -> Output {
    let config = dir.join("job.json");
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("train").arg(&config).arg("--run-dir").arg(dir.join("run"));
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

/// Asserts a refusal: non-zero exit, the expected words, and no panic, backtrace or flood.
#[track_caller]
fn refused(out: &Output, words: &[&str], what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: exit 0\n{err}");
    assert_eq!(out.status.code(), Some(1), "{what}: ended by {:?}, not an error exit\n{err}", out.status);
    for w in words {
        assert!(err.contains(w), "{what}: {w:?} not in:\n{err}");
    }
    for noise in ["panicked", "stack backtrace", "Exception raised from", "frame #"] {
        assert!(!err.contains(noise), "{what}: {noise:?} in:\n{err}");
    }
    assert!(err.len() < 2000, "{what}: {} bytes of errors", err.len());
}

#[test]
fn bad_config_values_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_idx_dataset(&data, 100, 50);
    let text = base(&data).to_string();
    let cases: &[(&[&str], &[&str])] = &[
        (&["train.cpu_threads=2147483648"], &["train.cpu_threads", "1..=1024"]),
        (&["data.crop_padding=100000"], &["data.crop_padding", "28x28"]),
        (&["model.training=bio", "model.target_proj_size=1000000000000"], &["model.target_proj_size"]),
        (&["data.cutout_holes=1000000000", "data.cutout_length=4"], &["data.cutout_holes"]),
        (&["model.num_hidden=1000000000"], &["model.num_hidden"]),
        (&["model.num_layers=100000"], &["model.num_layers"]),
        (&["model.feat_mult=1000"], &["model.feat_mult"]),
        // within every bound, but far more than this machine holds
        (&["model.num_layers=1", "model.num_hidden=1048576"], &["does not fit", "GiB"]),
    ];
    for (sets, words) in cases {
        let out = train_text(dir.path(), &text, sets);
        refused(&out, words, &format!("{sets:?}"));
        assert!(!dir.path().join("run").exists(), "{sets:?}: nothing is written for a refused config");
    }
}

#[test]
fn a_huge_value_is_quoted_by_a_prefix_and_a_repeated_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_idx_dataset(&data, 100, 50);
    let mut huge = base(&data);
    huge["model"]["arch"] = "x".repeat(900_000).into();
    refused(&train_text(dir.path(), &huge.to_string(), &[]), &["model.arch", "900000 bytes"], "900 kB arch");
    // A file over 1 MiB is refused unread, naming its size.
    huge["model"]["arch"] = "x".repeat(20 << 20).into();
    refused(
        &train_text(dir.path(), &huge.to_string(), &[]),
        &["job.json", "a config is at most 1048576 bytes"],
        "20 MB file",
    );
    let twice = r#"{"train": {"epochs": 1, "epochs": 2}}"#;
    refused(&train_text(dir.path(), twice, &[]), &["train.epochs", "duplicate key"], "repeated key");
}

#[test]
fn bad_data_files_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Header dimensions whose product overflows.
    let overflow = dir.path().join("overflow");
    write_idx_dataset(&overflow, 100, 50);
    let mut bytes = vec![0u8, 0, 8, 3];
    for d in [1u32 << 22, 1 << 21, 1 << 21] {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    std::fs::remove_file(overflow.join("train-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(overflow.join("train-images-idx3-ubyte"), bytes).unwrap();
    let out = train_text(dir.path(), &base(&overflow).to_string(), &[]);
    refused(&out, &["train-images-idx3-ubyte", "overflow"], "IDX overflow");
    let status = std::fs::read_to_string(dir.path().join("run/status.json")).unwrap();
    assert!(status.contains("\"failed\""), "{status}");

    // Test images of another size than the training images.
    let mixed = dir.path().join("mixed");
    write_idx_dataset(&mixed, 100, 50);
    idx::write(&mixed.join("t10k-images-idx3-ubyte.gz"), &[50, 32, 32], &vec![0u8; 50 * 32 * 32], true).unwrap();
    let _ = std::fs::remove_dir_all(dir.path().join("run"));
    let out = train_text(dir.path(), &base(&mixed).to_string(), &[]);
    refused(&out, &["test images are 1x32x32", "expected 1x28x28"], "mismatched test set");

    // No training images at all.
    let empty = dir.path().join("empty");
    write_idx_dataset(&empty, 100, 50);
    idx::write(&empty.join("train-images-idx3-ubyte.gz"), &[0, 28, 28], &[], true).unwrap();
    idx::write(&empty.join("train-labels-idx1-ubyte.gz"), &[0], &[], true).unwrap();
    let _ = std::fs::remove_dir_all(dir.path().join("run"));
    let out = train_text(dir.path(), &base(&empty).to_string(), &[]);
    refused(&out, &["train"], "no training images");
    assert!(!dir.path().join("run/checkpoints").read_dir().is_ok_and(|mut d| d.next().is_some()), "no checkpoint");
}

#[test]
fn status_of_a_missing_runs_folder_is_an_error() {
    let out = Command::new(BIN).args(["status", "--runs", "/does/not/exist"]).output().unwrap();
    refused(&out, &["/does/not/exist"], "status");
}
