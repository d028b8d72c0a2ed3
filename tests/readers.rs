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
