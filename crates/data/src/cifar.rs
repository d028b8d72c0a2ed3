//! CIFAR-10 and CIFAR-100, binary version.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, records of one
//! label byte (0..9) and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major).
//! CIFAR-100: `train.bin` and `test.bin`, records of a coarse label (0..19), a fine label
//! (0..99) and the same 3072 pixel bytes.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::config::Cifar100Labels;
use crate::dataset::Dataset;
use crate::{DataError, Result};

const PIXELS: usize = 3 * 32 * 32;

/// Reads records of `label_bytes` labels + pixels; `label_index` picks which label,
/// `classes` bounds it.
fn read_records(paths: &[std::path::PathBuf], label_bytes: usize, label_index: usize, classes: i64) -> Result<Dataset> {
    let record = label_bytes + PIXELS;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for path in paths {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(DataError::file(
                path,
                format!(
                    "{} bytes: expected a whole number of {record}-byte records (truncated or not a CIFAR binary file)",
                    bytes.len()
                ),
            ));
        }
        for (i, r) in bytes.chunks_exact(record).enumerate() {
            let label = r[label_index] as i64;
            if label >= classes {
                return Err(DataError::file(
                    path,
                    format!("record {i}: label {label} out of range: expected 0..{}", classes - 1),
                ));
            }
            labels.push(label);
            pixels.extend_from_slice(&r[label_bytes..]);
        }
    }
    let n = labels.len() as i64;
    let images = Tensor::from_slice(&pixels).view([n, 3, 32, 32]);
    Dataset::new(images, Tensor::from_slice(&labels).to_kind(Kind::Int64), classes, &paths[0])
}

fn existing(root: &Path, names: &[String]) -> Result<Vec<std::path::PathBuf>> {
    names
        .iter()
        .map(|n| {
            let p = root.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(DataError::file(p, "missing: expected this CIFAR binary file"))
            }
        })
        .collect()
}

pub fn load_cifar10(root: &Path) -> Result<(Dataset, Dataset)> {
    let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    let train = read_records(&existing(root, &train)?, 1, 0, 10)?;
    let test = read_records(&existing(root, &["test_batch.bin".into()])?, 1, 0, 10)?;
    Ok((train, test))
}

pub fn load_cifar100(root: &Path, labels: Cifar100Labels) -> Result<(Dataset, Dataset)> {
    let (index, classes) = match labels {
        Cifar100Labels::Coarse => (0, 20),
        Cifar100Labels::Fine => (1, 100),
    };
    let train = read_records(&existing(root, &["train.bin".into()])?, 2, index, classes)?;
    let test = read_records(&existing(root, &["test.bin".into()])?, 2, index, classes)?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Record i: label i % 10 (CIFAR-10) and pixel p = (i + p) % 256.
    fn write(path: &Path, n: usize, labels: &[u8]) {
        let mut b = Vec::new();
        for i in 0..n {
            b.extend_from_slice(labels);
            b.extend((0..PIXELS).map(|p| ((i + p) % 256) as u8));
        }
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn cifar10_reads_all_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=5 {
            write(&dir.path().join(format!("data_batch_{i}.bin")), 3, &[i as u8]);
        }
        write(&dir.path().join("test_batch.bin"), 2, &[9]);
        let (train, test) = load_cifar10(dir.path()).unwrap();
        assert_eq!(train.images.size(), vec![15, 3, 32, 32]);
        assert_eq!(test.len(), 2);
        assert_eq!(train.labels.int64_value(&[14]), 5);
        // pixel (c=1, y=0, x=2) of record 1 is byte 1024 + 2 of its pixels
        assert_eq!(train.images.int64_value(&[1, 1, 0, 2]), ((1 + 1026) % 256) as i64);
    }

    #[test]
    fn cifar100_takes_fine_or_coarse_labels() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("train.bin"), 4, &[3, 77]);
        write(&dir.path().join("test.bin"), 1, &[19, 99]);
        let (train, test) = load_cifar100(dir.path(), Cifar100Labels::Fine).unwrap();
        assert_eq!((train.labels.int64_value(&[0]), test.labels.int64_value(&[0]), train.num_classes), (77, 99, 100));
        let (train, _) = load_cifar100(dir.path(), Cifar100Labels::Coarse).unwrap();
        assert_eq!((train.labels.int64_value(&[0]), train.num_classes), (3, 20));
    }

    #[test]
    fn bad_cifar_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=5 {
            write(&dir.path().join(format!("data_batch_{i}.bin")), 2, &[1]);
        }
        let e = load_cifar10(dir.path()).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("missing"), "{e}");
        write(&dir.path().join("test_batch.bin"), 2, &[10]);
        let e = load_cifar10(dir.path()).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("label 10 out of range"), "{e}");
        std::fs::write(dir.path().join("data_batch_3.bin"), vec![0u8; 3073 + 5]).unwrap();
        let e = load_cifar10(dir.path()).unwrap_err().to_string();
        assert!(e.contains("data_batch_3.bin") && e.contains("3078 bytes"), "{e}");
    }
}
