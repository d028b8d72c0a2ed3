//! Users' own images in torchvision's `ImageFolder` layout: `root/train/<class>/*.png|jpg`
//! and `root/test/<class>/...` (or `root/val/...`). Classes are the training folder's
//! subfolder names in sorted order; the evaluation split must use the same names. Either
//! decoded once into memory here, or indexed ([`index`]) and streamed.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::dataset::Dataset;
use crate::decode::{Decode, Fit};
use crate::index::{self, Index, Layout, Stamp};
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

/// The training and evaluation folders of `root` (`test/`, else `val/`).
pub fn split_dirs(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let train = root.join("train");
    let eval = if root.join("test").is_dir() { root.join("test") } else { root.join("val") };
    for d in [&train, &eval] {
        if !d.is_dir() {
            return Err(DataError::file(d, "missing: expected train/ and test/ (or val/) below the data root"));
        }
    }
    Ok((train, eval))
}

/// The classes: the training folder's subfolders, sorted; the evaluation folder may hold
/// no others.
pub fn classes(train: &Path, eval: &Path) -> Result<Vec<String>> {
    let classes: Vec<String> =
        subdirs(train)?.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    if classes.len() < 2 {
        return Err(DataError::file(train, format!("{} class folder(s): expected at least 2", classes.len())));
    }
    for t in subdirs(eval)? {
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        if !classes.contains(&name) {
            return Err(DataError::file(&t, format!("class {name:?} is not among the training classes {classes:?}")));
        }
    }
    Ok(classes)
}

/// The index of `dir`'s images: class by class, file names sorted. An empty class folder is
/// an error (or, with `skip_bad`, a class without images, noted in `skipped`).
pub fn index(dir: &Path, classes: &[String], skip_bad: bool) -> Result<Index> {
    let mut stamp = Stamp::new().bytes(&[skip_bad as u8]).add_file(dir)?;
    for c in classes {
        stamp = stamp.bytes(c.as_bytes());
        if dir.join(c).is_dir() {
            stamp = stamp.add_file(&dir.join(c))?;
        }
    }
    index::cached(dir, stamp, false, || build(dir, classes, skip_bad))
}

fn build(dir: &Path, classes: &[String], skip_bad: bool) -> Result<Index> {
    let mut index = Index::new(Layout::Folder(dir.to_path_buf()), classes.to_vec());
    for (label, class) in classes.iter().enumerate() {
        let cdir = dir.join(class);
        if !cdir.is_dir() {
            continue;
        }
        let entries = std::fs::read_dir(&cdir).map_err(|source| DataError::Io { path: cdir.clone(), source })?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_image(p)).collect();
        files.sort();
        if files.is_empty() {
            let what = format!("{}: empty class folder: expected *.png or *.jpg", cdir.display());
            if !skip_bad {
                return Err(DataError::Config(format!("{what} (data.skip_bad keeps the class without images)")));
            }
            index.skipped.push(what);
        }
        for f in files {
            let Some(name) = f.file_name().and_then(|n| n.to_str()) else {
                return Err(DataError::file(&f, "file name is not UTF-8"));
            };
            index.push(label as u32, 0, 0, 0, &format!("{class}/{name}"))?;
        }
    }
    Ok(index)
}

fn load_split(dir: &Path, classes: &[String], size: u32, channels: i64) -> Result<Dataset> {
    decode_all(&build(dir, classes, false)?, dir, size, channels)
}

/// Every image of `index` decoded and resized whole into memory, on this thread.
pub fn decode_all(index: &Index, dir: &Path, size: u32, channels: i64) -> Result<Dataset> {
    if index.is_empty() {
        return Err(DataError::file(dir, "no images: expected <class>/*.png or *.jpg below this folder"));
    }
    let decode = Decode { size, channels: channels as u8, fit: Fit::Whole };
    let need = index.len() as u64 * decode.bytes() as u64;
    if let Some(available) = crate::system::meminfo("MemAvailable").filter(|a| need > *a) {
        return Err(DataError::file(
            dir,
            format!(
                "{} images of {channels}x{size}x{size} need {:.1} GiB decoded, more than the {:.1} GiB available: set data.stream to read them as batches need them",
                index.len(),
                need as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            ),
        ));
    }
    let mut pixels = vec![0u8; index.len() * decode.bytes()];
    let mut rng = ChaCha8Rng::seed_from_u64(0); // unused by a whole-image fit
    for (i, out) in pixels.chunks_exact_mut(decode.bytes()).enumerate() {
        let bytes = index.read(i).map_err(DataError::Config)?;
        decode.image(&bytes, &mut rng, out).map_err(|e| DataError::Config(format!("{}: {e}", index.describe(i))))?;
    }
    let labels: Vec<i64> = (0..index.len()).map(|i| index.label(i)).collect();
    let n = labels.len() as i64;
    let images = Tensor::from_slice(&pixels).view([n, channels, size as i64, size as i64]);
    Dataset::new(images, Tensor::from_slice(&labels).to_kind(Kind::Int64), index.classes.len() as i64, dir)
}

/// Checks `data.image_size` and `data.image_channels`.
pub fn check_shape(size: i64, channels: i64) -> Result<()> {
    if !(1..=4096).contains(&size) {
        return Err(DataError::Config(format!("data.image_size: expected 1..4096 pixels, got {size}")));
    }
    if channels != 1 && channels != 3 {
        return Err(DataError::Config(format!("data.image_channels: expected 1 or 3, got {channels}")));
    }
    Ok(())
}

pub fn load(root: &Path, size: i64, channels: i64) -> Result<(Dataset, Dataset)> {
    check_shape(size, channels)?;
    let (train, eval) = split_dirs(root)?;
    let classes = classes(&train, &eval)?;
    Ok((load_split(&train, &classes, size as u32, channels)?, load_split(&eval, &classes, size as u32, channels)?))
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
