//! SVHN, cropped-digits format: `train_32x32.mat`, `test_32x32.mat` and optionally
//! `extra_32x32.mat`, MATLAB v5 files (read with the `matfile` crate) holding `X`
//! (32 x 32 x 3 x N bytes, column-major) and `y` (N x 1, digits 1..10, 10 meaning 0).

use std::path::Path;

use matfile::{MatFile, NumericData};
use tch::{Kind, Tensor};

use crate::dataset::Dataset;
use crate::{DataError, Result};

fn as_u8(data: &NumericData) -> Option<Vec<u8>> {
    match data {
        NumericData::UInt8 { real, .. } => Some(real.clone()),
        _ => None,
    }
}

fn as_i64(data: &NumericData) -> Option<Vec<i64>> {
    Some(match data {
        NumericData::UInt8 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        NumericData::Int32 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        NumericData::Int64 { real, .. } => real.clone(),
        NumericData::Single { real, .. } => real.iter().map(|&v| v as i64).collect(),
        NumericData::Double { real, .. } => real.iter().map(|&v| v as i64).collect(),
        _ => return None,
    })
}

pub fn load_file(path: &Path) -> Result<Dataset> {
    if !path.is_file() {
        return Err(DataError::file(path, "missing: expected this SVHN .mat file"));
    }
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mat = MatFile::parse(std::io::BufReader::new(file))
        .map_err(|e| DataError::file(path, format!("not a readable MATLAB v5 file ({e})")))?;
    let x =
        mat.find_by_name("X").ok_or_else(|| DataError::file(path, "no variable X: expected X of 32x32x3xN bytes"))?;
    let y = mat.find_by_name("y").ok_or_else(|| DataError::file(path, "no variable y: expected y of Nx1 labels"))?;
    let size = x.size();
    if size.len() != 4 || size[0] != 32 || size[1] != 32 || size[2] != 3 {
        return Err(DataError::file(path, format!("X has size {size:?}, expected [32, 32, 3, N]")));
    }
    let n = size[3];
    let pixels = as_u8(x.data()).ok_or_else(|| DataError::file(path, "X is not uint8: expected bytes"))?;
    let labels = as_i64(y.data()).ok_or_else(|| DataError::file(path, "y is not numeric"))?;
    if labels.len() != n {
        return Err(DataError::file(path, format!("{} labels in y, expected {n} to match X", labels.len())));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| !(1..=10).contains(&l)) {
        return Err(DataError::file(path, format!("label {l} at {i} out of range: expected 1..10")));
    }
    // MATLAB order X(h, w, c, n), h fastest: as a row-major tensor that is [n, c, w, h].
    let images = Tensor::from_slice(&pixels).view([n as i64, 3, 32, 32]).transpose(2, 3).contiguous();
    let labels: Vec<i64> = labels.into_iter().map(|l| l % 10).collect();
    Dataset::new(images, Tensor::from_slice(&labels).to_kind(Kind::Int64), 10, path)
}

pub fn load(root: &Path, extra: bool) -> Result<(Dataset, Dataset)> {
    let mut train = load_file(&root.join("train_32x32.mat"))?;
    if extra {
        let more = load_file(&root.join("extra_32x32.mat"))?;
        train = Dataset {
            images: Tensor::cat(&[train.images, more.images], 0),
            labels: Tensor::cat(&[train.labels, more.labels], 0),
            num_classes: 10,
        };
    }
    Ok((train, load_file(&root.join("test_32x32.mat"))?))
}

/// Writes a MATLAB v5 file with uint8 `X` and double `y` (uncompressed), for tests and tools.
pub fn write_mat(path: &Path, x_size: &[usize], x: &[u8], y: &[f64]) -> std::io::Result<()> {
    fn element(out: &mut Vec<u8>, ty: u32, data: &[u8]) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    fn matrix(name: &str, class: u32, dims: &[usize], data_type: u32, data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        element(&mut body, 6, &[class.to_le_bytes(), 0u32.to_le_bytes()].concat()); // array flags
        let dims: Vec<u8> = dims.iter().flat_map(|&d| (d as i32).to_le_bytes()).collect();
        element(&mut body, 5, &dims);
        element(&mut body, 1, name.as_bytes());
        element(&mut body, data_type, data);
        let mut out = Vec::new();
        element(&mut out, 14, &body);
        out
    }
    let mut file = vec![b' '; 116];
    file[..22].copy_from_slice(b"MATLAB 5.0 MAT-file, l");
    file.extend_from_slice(&[0u8; 8]);
    file.extend_from_slice(&0x0100u16.to_le_bytes());
    file.extend_from_slice(b"IM");
    file.extend(matrix("X", 9, x_size, 2, x)); // mxUINT8_CLASS, miUINT8
    let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    file.extend(matrix("y", 6, &[y.len(), 1], 9, &yb)); // mxDOUBLE_CLASS, miDOUBLE
    std::fs::write(path, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mat_files_read_with_digit_ten_as_zero_and_images_row_major() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3;
        let mut x = vec![0u8; 32 * 32 * 3 * n];
        // X(h=4, w=9, c=1, n=2), column-major
        x[4 + 32 * 9 + 1024 + 3072 * 2] = 123;
        write_mat(&dir.path().join("train_32x32.mat"), &[32, 32, 3, n], &x, &[10.0, 1.0, 5.0]).unwrap();
        write_mat(&dir.path().join("test_32x32.mat"), &[32, 32, 3, 1], &x[..3072], &[2.0]).unwrap();
        let (train, test) = load(dir.path(), false).unwrap();
        assert_eq!(train.images.size(), vec![3, 3, 32, 32]);
        assert_eq!(train.images.int64_value(&[2, 1, 4, 9]), 123);
        assert_eq!(Vec::<i64>::try_from(&train.labels).unwrap(), vec![0, 1, 5]);
        assert_eq!(test.len(), 1);
        let e = load(dir.path(), true).unwrap_err().to_string();
        assert!(e.contains("extra_32x32.mat") && e.contains("missing"), "{e}");
    }

    #[test]
    fn bad_mat_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train_32x32.mat");
        write_mat(&p, &[32, 32, 3, 2], &vec![0u8; 6144], &[1.0, 11.0]).unwrap();
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains("train_32x32.mat") && e.contains("label 11"), "{e}");
        write_mat(&p, &[32, 32, 3, 2], &vec![0u8; 6144], &[1.0]).unwrap();
        assert!(load_file(&p).unwrap_err().to_string().contains("1 labels in y, expected 2"));
        write_mat(&p, &[28, 28, 3, 1], &vec![0u8; 28 * 28 * 3], &[1.0]).unwrap();
        assert!(load_file(&p).unwrap_err().to_string().contains("expected [32, 32, 3, N]"));
        std::fs::write(&p, b"not a mat file at all, just some text").unwrap();
        assert!(load_file(&p).unwrap_err().to_string().contains("not a readable MATLAB v5 file"));
    }
}
