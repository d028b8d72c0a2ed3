//! IDX files (MNIST, Fashion-MNIST, Kuzushiji-MNIST), raw or gzip-compressed.
//!
//! Layout: two zero bytes, a type byte (0x08: unsigned bytes), the number of dimensions,
//! then each dimension as a big-endian u32, then the data. Images are 3-D (N x H x W),
//! labels 1-D (N).

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use tch::Tensor;

use crate::dataset::Dataset;
use crate::{DataError, Result};

const UBYTE: u8 = 0x08;

/// Reads a whole file, inflating it when it starts with the gzip magic.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::file(path, format!("damaged gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX buffer of unsigned bytes with `dims` dimensions: (shape, data).
pub fn parse(bytes: &[u8], dims: usize, path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let header_len = 4 + 4 * dims;
    if bytes.len() < header_len {
        return Err(DataError::file(
            path,
            format!("truncated: {} bytes, expected an IDX header of {header_len}", bytes.len()),
        ));
    }
    let magic = &bytes[..4];
    if magic[0] != 0 || magic[1] != 0 || magic[2] != UBYTE || magic[3] as usize != dims {
        return Err(DataError::file(
            path,
            format!(
                "wrong magic number {:02x}{:02x}{:02x}{:02x}: expected 000008{dims:02x} (IDX, unsigned bytes, {dims} dimensions)",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    let shape: Vec<usize> =
        (0..dims).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let expected = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| {
        DataError::file(path, format!("header dimensions {shape:?} overflow: not an IDX file of this format"))
    })?;
    let data = &bytes[header_len..];
    if data.len() != expected {
        let kind = if data.len() < expected { "truncated" } else { "trailing bytes" };
        return Err(DataError::file(
            path,
            format!("{kind}: {} data bytes, expected {expected} for shape {shape:?}", data.len()),
        ));
    }
    Ok((shape, data.to_vec()))
}

/// The first of `name.gz` and `name` that exists in `root`.
fn find(root: &Path, name: &str) -> Result<PathBuf> {
    [format!("{name}.gz"), name.to_string()].into_iter().map(|n| root.join(n)).find(|p| p.is_file()).ok_or_else(|| {
        DataError::file(
            root.join(format!("{name}.gz")),
            format!("missing: expected {name}.gz or {name} in this folder"),
        )
    })
}

/// Reads one split (`train` or `t10k`) of an MNIST-like data set with 10 classes.
pub fn load_split(root: &Path, prefix: &str) -> Result<Dataset> {
    let images_path = find(root, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find(root, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (shape, pixels) = parse(&read_maybe_gz(&images_path)?, 3, &images_path)?;
    let (lshape, labels) = parse(&read_maybe_gz(&labels_path)?, 1, &labels_path)?;
    if shape[0] != lshape[0] {
        return Err(DataError::file(
            &labels_path,
            format!("{} labels, expected {} to match {}", lshape[0], shape[0], images_path.display()),
        ));
    }
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        return Err(DataError::file(&labels_path, format!("label {bad} out of range: expected 0..9")));
    }
    let (n, h, w) = (shape[0] as i64, shape[1] as i64, shape[2] as i64);
    let images = Tensor::from_slice(&pixels).view([n, 1, h, w]);
    let labels = Tensor::from_slice(&labels).to_kind(tch::Kind::Int64);
    Dataset::new(images, labels, 10, &images_path)
}

pub fn load_splits(root: &Path) -> Result<(Dataset, Dataset)> {
    Ok((load_split(root, "train")?, load_split(root, "t10k")?))
}

/// Writes an IDX file of unsigned bytes (tests and tools), gzip-compressed if `gz`.
pub fn write(path: &Path, shape: &[usize], data: &[u8], gz: bool) -> std::io::Result<()> {
    let mut bytes = vec![0, 0, UBYTE, shape.len() as u8];
    for d in shape {
        bytes.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(data);
    if gz {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes)?;
        bytes = enc.finish()?;
    }
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_set(dir: &Path, prefix: &str, n: usize, gz: bool) {
        let pixels: Vec<u8> = (0..n * 28 * 28).map(|i| (i % 251) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        write(
            &dir.join(format!("{prefix}-images-idx3-ubyte{}", if gz { ".gz" } else { "" })),
            &[n, 28, 28],
            &pixels,
            gz,
        )
        .unwrap();
        write(&dir.join(format!("{prefix}-labels-idx1-ubyte{}", if gz { ".gz" } else { "" })), &[n], &labels, gz)
            .unwrap();
    }

    #[test]
    fn gzip_and_raw_files_read_back_exactly() {
        for gz in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            write_set(dir.path(), "train", 12, gz);
            let d = load_split(dir.path(), "train").unwrap();
            assert_eq!(d.images.size(), vec![12, 1, 28, 28]);
            assert_eq!(d.images.int64_value(&[0, 0, 1, 2]), (28 + 2));
            assert_eq!(d.labels.int64_value(&[11]), 1);
            assert_eq!(d.label_histogram().iter().sum::<i64>(), 12);
        }
    }

    fn error_of(setup: impl Fn(&Path)) -> String {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), "train", 5, false);
        setup(dir.path());
        load_split(dir.path(), "train").unwrap_err().to_string()
    }

    #[test]
    fn damaged_files_are_named_with_what_was_expected() {
        let e = error_of(|d| std::fs::remove_file(d.join("train-labels-idx1-ubyte")).unwrap());
        assert!(e.contains("train-labels-idx1-ubyte") && e.contains("missing"), "{e}");

        let e = error_of(|d| {
            let p = d.join("train-images-idx3-ubyte");
            let mut b = std::fs::read(&p).unwrap();
            b[2] = 0x09;
            std::fs::write(&p, b).unwrap();
        });
        assert!(e.contains("wrong magic") && e.contains("train-images"), "{e}");

        let e = error_of(|d| {
            let p = d.join("train-images-idx3-ubyte");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() - 100]).unwrap();
        });
        assert!(e.contains("truncated") && e.contains("expected 3920"), "{e}");

        let e = error_of(|d| write(&d.join("train-labels-idx1-ubyte"), &[5], &[0, 1, 2, 10, 4], false).unwrap());
        assert!(e.contains("label 10 out of range"), "{e}");

        let e = error_of(|d| write(&d.join("train-labels-idx1-ubyte"), &[4], &[0, 1, 2, 3], false).unwrap());
        assert!(e.contains("4 labels, expected 5"), "{e}");

        let e = error_of(|d| std::fs::write(d.join("train-images-idx3-ubyte"), [0x1f, 0x8b, 1, 2, 3]).unwrap());
        assert!(e.contains("damaged gzip"), "{e}");
    }
}
