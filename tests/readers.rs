//! The readers read what an independent writer wrote: `scripts/reader_fixtures.py` writes
//! small CIFAR-10, CIFAR-100, SVHN (MATLAB v5, through scipy.io.savemat) and STL-10 sets
//! with numpy from each format's description, with the images and labels a reader must
//! return beside them. (IDX is read from the real Fashion-MNIST in tests/real_data.rs.)

use std::path::Path;

use layerwise_data::{DataConfig, Dataset, DatasetKind};
use layerwise_tests::OutputWithin;
use tch::Tensor;

/// The fixtures, written by the script with the project's Python (scripts/setup.sh
/// installs numpy and scipy beside torch).
fn fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let python = std::env::var("LAYERWISE_TORCH_VENV").map_or("python3".into(), |v| format!("{v}/bin/python3"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reader_fixtures.py");
    let out = std::process::Command::new(&python).arg(script).arg(dir.path()).output_within();
    assert!(
        out.status.success(),
        "{python} scripts/reader_fixtures.py (run scripts/setup.sh first): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.flatten(0, -1)).unwrap()
}

/// `set` read as `split` holds exactly the images and labels the writer recorded.
fn assert_read_as_written(folder: &Path, split: &str, set: &Dataset) {
    let images = std::fs::read(folder.join(format!("expected-{split}-images.u8"))).unwrap();
    let labels = std::fs::read(folder.join(format!("expected-{split}-labels.u8"))).unwrap();
    let what = format!("{} {split}", folder.display());
    assert_eq!(set.len() as usize, labels.len(), "{what}: images");
    assert_eq!(bytes(&set.images), images, "{what}: pixels");
    let read: Vec<i64> = Vec::try_from(&set.labels).unwrap();
    assert_eq!(read, labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), "{what}: labels");
}

#[test]
fn every_reader_reads_what_an_independent_writer_wrote() {
    let dir = fixtures();
    for (name, dataset, channels, side) in [
        ("cifar10", DatasetKind::Cifar10, 3, 32),
        ("cifar100", DatasetKind::Cifar100, 3, 32),
        ("svhn", DatasetKind::Svhn, 3, 32),
        ("stl10", DatasetKind::Stl10, 3, 96),
    ] {
        let folder = dir.path().join(name);
        let config = DataConfig { dataset, root: Some(folder.clone()), ..Default::default() };
        let splits = layerwise_data::load(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(splits.train.image_shape(), (channels, side, side), "{name}");
        assert_read_as_written(&folder, "train", &splits.train);
        assert_read_as_written(&folder, "test", &splits.test);
    }
}

/// Differences of `ours` from Pillow's `reference` (uint8 planes): (largest, mean).
fn differences(ours: &[u8], reference: &[u8]) -> (u8, f64) {
    assert_eq!(ours.len(), reference.len());
    assert!(reference.iter().any(|&v| v != reference[0]), "a reference with something in it");
    let d: Vec<u8> = ours.iter().zip(reference).map(|(a, b)| a.abs_diff(*b)).collect();
    let (max, mean) = (*d.iter().max().unwrap(), d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64);
    eprintln!("against Pillow: largest difference {max}, mean {mean:.3}");
    (max, mean)
}

#[test]
fn images_are_decoded_and_resized_as_pillow_does() {
    use layerwise_data::decode::{Decode, Fit};
    use rand::SeedableRng;
    let dir = tempfile::tempdir().unwrap();
    let python = std::env::var("LAYERWISE_TORCH_VENV").map_or("python3".into(), |v| format!("{v}/bin/python3"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image_fixtures.py");
    let out = std::process::Command::new(&python).arg(script).arg(dir.path()).output_within();
    assert!(out.status.success(), "{python} scripts/image_fixtures.py: {}", String::from_utf8_lossy(&out.stderr));
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let ours = |file: &str, fit| {
        let mut out = vec![0u8; 3 * 24 * 24];
        Decode { size: 24, channels: 3, fit }.image(&read(file), &mut rng.clone(), &mut out).unwrap();
        out
    };
    // The same filter on the same pixels: both round fixed-point sums.
    let (max, mean) = differences(&ours("photo.png", Fit::Whole), &read("whole.u8"));
    assert!(max <= 2 && mean < 0.5, "whole image: largest difference {max}, mean {mean:.3}");
    // The centre square's fractional window, computed by the script from its definition.
    let (max, mean) = differences(&ours("photo.png", Fit::Centre { resize: 256.0 / 224.0 }), &read("centre.u8"));
    assert!(max <= 2 && mean < 0.5, "centre crop: largest difference {max}, mean {mean:.3}");
    // zune-jpeg against libjpeg: both exact IDCTs to within rounding.
    let (max, mean) = differences(&ours("photo.jpg", Fit::Whole), &read("jpeg.u8"));
    assert!(max <= 3 && mean < 0.6, "JPEG: largest difference {max}, mean {mean:.3}");
}
