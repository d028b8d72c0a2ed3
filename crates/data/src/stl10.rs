//! STL-10, binary version: `train_X.bin`/`train_y.bin`, `test_X.bin`/`test_y.bin`.
//! Images are 3 x 96 x 96 bytes, each channel stored column-major; labels are bytes 1..10.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::dataset::Dataset;
use crate::{DataError, Result};

const SIDE: i64 = 96;
const IMAGE: usize = 3 * 96 * 96;

fn read(path: &Path) -> Result<Vec<u8>> {
    if !path.is_file() {
        return Err(DataError::file(path, "missing: expected this STL-10 binary file"));
    }
    std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })
}

pub fn load_split(root: &Path, split: &str) -> Result<Dataset> {
    let xp = root.join(format!("{split}_X.bin"));
    let yp = root.join(format!("{split}_y.bin"));
    let x = read(&xp)?;
    let y = read(&yp)?;
    if x.is_empty() || x.len() % IMAGE != 0 {
        return Err(DataError::file(
            &xp,
            format!("{} bytes: expected a whole number of {IMAGE}-byte 96x96x3 images", x.len()),
        ));
    }
    let n = x.len() / IMAGE;
    if y.len() != n {
        return Err(DataError::file(&yp, format!("{} labels, expected {n} to match {}", y.len(), xp.display())));
    }
    if let Some((i, l)) = y.iter().enumerate().find(|(_, &l)| !(1..=10).contains(&l)) {
        return Err(DataError::file(&yp, format!("label {l} at {i} out of range: expected 1..10")));
    }
    // column-major channels: [N, C, x, y] -> [N, C, y, x]
    let images = Tensor::from_slice(&x).view([n as i64, 3, SIDE, SIDE]).transpose(2, 3).contiguous();
    let labels = Tensor::from_slice(&y).to_kind(Kind::Int64) - 1;
    Dataset::new(images, labels, 10, &xp)
}

pub fn load(root: &Path) -> Result<(Dataset, Dataset)> {
    Ok((load_split(root, "train")?, load_split(root, "test")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_major_images_come_out_row_major_and_labels_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = vec![0u8; 2 * IMAGE];
        // image 1, channel 2, row 5, column 7 -> column-major offset 7 * 96 + 5
        x[IMAGE + 2 * 96 * 96 + 7 * 96 + 5] = 200;
        std::fs::write(dir.path().join("train_X.bin"), &x).unwrap();
        std::fs::write(dir.path().join("train_y.bin"), [1u8, 10]).unwrap();
        let d = load_split(dir.path(), "train").unwrap();
        assert_eq!(d.images.int64_value(&[1, 2, 5, 7]), 200);
        assert_eq!(Vec::<i64>::try_from(&d.labels).unwrap(), vec![0, 9]);

        std::fs::write(dir.path().join("train_y.bin"), [1u8, 11]).unwrap();
        let e = load_split(dir.path(), "train").unwrap_err().to_string();
        assert!(e.contains("train_y.bin") && e.contains("label 11"), "{e}");
        std::fs::write(dir.path().join("train_y.bin"), [1u8]).unwrap();
        let e = load_split(dir.path(), "train").unwrap_err().to_string();
        assert!(e.contains("1 labels, expected 2"), "{e}");
        std::fs::write(dir.path().join("train_X.bin"), &x[..1000]).unwrap();
        let e = load_split(dir.path(), "train").unwrap_err().to_string();
        assert!(e.contains("train_X.bin") && e.contains("1000 bytes"), "{e}");
    }
}
