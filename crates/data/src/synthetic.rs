//! Image sets made on the spot, for tests and `bench data`: photograph-like images (smooth
//! shapes and grain, so that JPEG spends on them about what it spends on a photograph) in
//! the ImageFolder layout, and the same images packed into WebDataset tar shards.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::{DataError, Result};

/// A `w` x `h` image: a few soft colour waves and per-pixel grain, all drawn from `seed`;
/// `class` tints it, so that classes differ in their colours.
pub fn photo(w: u32, h: u32, class: usize, seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let waves: Vec<[f32; 4]> = (0..4)
        .map(|_| {
            [rng.gen_range(0.005..0.05), rng.gen_range(0.005..0.05), rng.gen_range(0.0..6.3), rng.gen_range(30.0..70.0)]
        })
        .collect();
    let tint = [(class * 53 % 256) as f32, (class * 97 % 256) as f32, (class * 151 % 256) as f32];
    let mut img = RgbImage::new(w, h);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let wave: f32 = waves.iter().map(|v| v[3] * (v[0] * x as f32 + v[1] * y as f32 + v[2]).sin()).sum();
        for (c, (v, t)) in px.0.iter_mut().zip(tint).enumerate() {
            let grain = rng.gen_range(-40.0..40.0f32);
            *v = (0.5 * t + 64.0 + wave * (0.6 + 0.2 * c as f32) + grain).clamp(0.0, 255.0) as u8;
        }
    }
    img
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// Writes `per_class` images of `w` x `h` for each of `classes` classes under
/// `split/<class>/`, as `ext` (`jpg` or `png`), on all cores; returns the files written.
pub fn write_folder(
    split: &Path,
    classes: usize,
    per_class: usize,
    (w, h): (u32, u32),
    ext: &str,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    let format = if ext == "png" { ImageFormat::Png } else { ImageFormat::Jpeg };
    for c in 0..classes {
        let dir = split.join(format!("class{c:03}"));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    }
    (0..classes * per_class)
        .into_par_iter()
        .map(|k| {
            let (c, i) = (k / per_class, k % per_class);
            let path = split.join(format!("class{c:03}/img{i:05}.{ext}"));
            let img = photo(w, h, c, seed ^ ((c as u64) << 32) ^ i as u64);
            img.save_with_format(&path, format).map_err(|e| DataError::file(&path, format!("cannot write: {e}")))?;
            Ok(path)
        })
        .collect()
}

/// Packs the ImageFolder split `folder` (of the training split's `classes`) into WebDataset
/// shards of `per_shard` samples in `out` (`shard-000000.tar`, ...): classes and files in
/// the folder reader's order, the class number in `KEY.cls`. Returns the shards written.
pub fn pack(folder: &Path, classes: &[String], out: &Path, per_shard: usize) -> Result<Vec<PathBuf>> {
    let index = crate::folder::index(folder, classes, false)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut shards = Vec::new();
    for (s, start) in (0..index.len()).step_by(per_shard.max(1)).enumerate() {
        let path = out.join(format!("shard-{s:06}.tar"));
        let mut tar = tar::Builder::new(Vec::new());
        for i in start..(start + per_shard).min(index.len()) {
            let bytes = index.read(i).map_err(DataError::Config)?;
            let ext = index.name(i).rsplit('.').next().unwrap_or("jpg").to_string();
            let label = index.label(i).to_string();
            for (name, data) in [(format!("{i:08}.{ext}"), bytes.as_slice()), (format!("{i:08}.cls"), label.as_bytes())]
            {
                let mut header = tar::Header::new_ustar();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, name, Cursor::new(data)).map_err(io(&path))?;
            }
        }
        let bytes = tar.into_inner().map_err(io(&path))?;
        std::fs::write(&path, bytes).map_err(io(&path))?;
        shards.push(path);
    }
    Ok(shards)
}
