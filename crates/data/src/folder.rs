//! Users' own images: `root/train/<class>/*.png|jpg` and `root/test/<class>/...`, decoded
//! once (with the `image` crate) and resized to `size` x `size`. Classes are the training
//! folder's subfolder names in sorted order; the test set must use the same names.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use tch::{Kind, Tensor};

use crate::dataset::Dataset;
use crate::{DataError, Result};

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    Ok(dirs)
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn load_split(dir: &Path, classes: &[String], size: u32, channels: i64) -> Result<Dataset> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (label, class) in classes.iter().enumerate() {
        let cdir = dir.join(class);
        if !cdir.is_dir() {
            continue;
        }
        let entries = std::fs::read_dir(&cdir).map_err(|source| DataError::Io { path: cdir.clone(), source })?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_image(p)).collect();
        files.sort();
        for f in files {
            let img = image::open(&f).map_err(|e| DataError::file(&f, format!("cannot decode image: {e}")))?;
            let img = img.resize_exact(size, size, FilterType::Triangle);
            match channels {
                1 => pixels.extend_from_slice(img.to_luma8().as_raw()),
                _ => {
                    // HWC -> CHW
                    let rgb = img.to_rgb8();
                    let raw = rgb.as_raw();
                    for c in 0..3 {
                        pixels.extend(raw.iter().skip(c).step_by(3));
                    }
                }
            }
            labels.push(label as i64);
        }
    }
    if labels.is_empty() {
        return Err(DataError::file(dir, "no images: expected <class>/*.png or *.jpg below this folder"));
    }
    let n = labels.len() as i64;
    let images = Tensor::from_slice(&pixels).view([n, channels, size as i64, size as i64]);
    Dataset::new(images, Tensor::from_slice(&labels).to_kind(Kind::Int64), classes.len() as i64, dir)
}

pub fn load(root: &Path, size: i64, channels: i64) -> Result<(Dataset, Dataset)> {
    if !(1..=4096).contains(&size) {
        return Err(DataError::Config(format!("data.image_size: expected 1..4096 pixels, got {size}")));
    }
    if channels != 1 && channels != 3 {
        return Err(DataError::Config(format!("data.image_channels: expected 1 or 3, got {channels}")));
    }
    let train_dir = root.join("train");
    let test_dir = root.join("test");
    for d in [&train_dir, &test_dir] {
        if !d.is_dir() {
            return Err(DataError::file(d, "missing: an image folder needs train/<class>/ and test/<class>/"));
        }
    }
    let classes: Vec<String> =
        subdirs(&train_dir)?.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    if classes.len() < 2 {
        return Err(DataError::file(&train_dir, format!("{} class folder(s): expected at least 2", classes.len())));
    }
    for t in subdirs(&test_dir)? {
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        if !classes.contains(&name) {
            return Err(DataError::file(&t, format!("class {name:?} is not among the training classes {classes:?}")));
        }
    }
    Ok((
        load_split(&train_dir, &classes, size as u32, channels)?,
        load_split(&test_dir, &classes, size as u32, channels)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
    }

    #[test]
    fn folders_become_classes_and_images_are_resized() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        png(&r.join("train/cat/a.png"), 40, 20, [255, 0, 0]);
        png(&r.join("train/cat/b.png"), 8, 8, [255, 0, 0]);
        png(&r.join("train/dog/a.png"), 16, 16, [0, 0, 255]);
        png(&r.join("test/dog/x.png"), 16, 16, [0, 0, 255]);
        let (train, test) = load(r, 12, 3).unwrap();
        assert_eq!(train.images.size(), vec![3, 3, 12, 12]);
        assert_eq!(Vec::<i64>::try_from(&train.labels).unwrap(), vec![0, 0, 1]);
        assert_eq!(train.images.int64_value(&[0, 0, 5, 5]), 255);
        assert_eq!(train.images.int64_value(&[2, 2, 5, 5]), 255);
        assert_eq!(train.images.int64_value(&[2, 0, 5, 5]), 0);
        assert_eq!(test.labels.int64_value(&[0]), 1);
        let (gray, _) = load(r, 6, 1).unwrap();
        assert_eq!(gray.images.size(), vec![3, 1, 6, 6]);
    }

    #[test]
    fn bad_folders_and_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        png(&r.join("train/cat/a.png"), 4, 4, [1, 2, 3]);
        png(&r.join("train/dog/a.png"), 4, 4, [1, 2, 3]);
        let e = load(r, 8, 3).unwrap_err().to_string();
        assert!(e.contains("test") && e.contains("missing"), "{e}");
        png(&r.join("test/bird/a.png"), 4, 4, [1, 2, 3]);
        let e = load(r, 8, 3).unwrap_err().to_string();
        assert!(e.contains("bird") && e.contains("not among the training classes"), "{e}");
        std::fs::remove_dir_all(r.join("test/bird")).unwrap();
        png(&r.join("test/cat/a.png"), 4, 4, [1, 2, 3]);
        std::fs::write(r.join("train/dog/broken.png"), b"not a png").unwrap();
        let e = load(r, 8, 3).unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("cannot decode"), "{e}");
    }
}
