//! One image file's bytes to `channels` x `size` x `size` uint8 pixels: decoded with the
//! `image` crate under limits (a hostile file cannot ask for gigabytes), then cropped and
//! resized in one pass by `fast_image_resize` (SIMD; a bilinear filter that widens when it
//! shrinks, as PIL's does).
//!
//! Three ways to fit an image to the square: the whole image stretched (`Whole`, what the
//! in-memory folder reader has always done), ImageNet training's random resized crop, and
//! ImageNet evaluation's resize of the shorter side and centre crop.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageReader, Limits};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Largest side of an image we decode, in pixels.
pub const MAX_SIDE: u32 = 16_384;
/// Most bytes one image may decode to.
pub const MAX_DECODED: u64 = 256 << 20;

/// How an image is fitted to the output square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fit {
    /// The whole image resized to the square (aspect not kept).
    Whole,
    /// A random crop of `scale` of the area and `ratio` of width / height, resized.
    RandomResized { scale: [f64; 2], ratio: [f64; 2] },
    /// Shorter side resized to `size * resize`, then the centre square of `size`.
    Centre { resize: f64 },
}

/// What every image of a set becomes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decode {
    pub size: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
    pub fit: Fit,
}

impl Decode {
    /// Bytes of one decoded image.
    pub fn bytes(&self) -> usize {
        self.channels as usize * self.size as usize * self.size as usize
    }

    /// Decodes `bytes` into `out` (channels x size x size). `rng` draws the random crop; it
    /// is used for nothing else, so an image's crop depends only on its own generator.
    pub fn image(&self, bytes: &[u8], rng: &mut ChaCha8Rng, out: &mut [u8]) -> Result<(), String> {
        debug_assert_eq!(out.len(), self.bytes());
        to_planes(&self.fitted(bytes, rng)?, self.channels as usize, out);
        Ok(())
    }

    /// Decodes `bytes` into `out` as float32 (channels x size x size), normalised, and
    /// mirrored when `norm.flip` and a coin drawn from `rng` after the crop say so.
    pub fn image_normalised(
        &self,
        bytes: &[u8],
        rng: &mut ChaCha8Rng,
        norm: &Normalise,
        out: &mut [f32],
    ) -> Result<(), String> {
        debug_assert_eq!(out.len(), self.bytes());
        let hwc = self.fitted(bytes, rng)?;
        let mirror = norm.flip && rng.gen_bool(0.5);
        let (c, side) = (self.channels as usize, self.size as usize);
        let plane = side * side;
        for ch in 0..c {
            let (scale, shift) = ((1.0 / (255.0 * norm.std[ch])) as f32, (-norm.mean[ch] / norm.std[ch]) as f32);
            let dst = &mut out[ch * plane..(ch + 1) * plane];
            for (y, row) in dst.chunks_exact_mut(side).enumerate() {
                let src = &hwc[y * side * c..(y + 1) * side * c];
                for (x, v) in row.iter_mut().enumerate() {
                    let sx = if mirror { side - 1 - x } else { x };
                    *v = src[sx * c + ch] as f32 * scale + shift;
                }
            }
        }
        Ok(())
    }

    /// The image decoded, fitted and resized: size x size x channels.
    fn fitted(&self, bytes: &[u8], rng: &mut ChaCha8Rng) -> Result<Vec<u8>, String> {
        let img = decode(bytes)?;
        let (w, h) = (img.width(), img.height());
        let (pixels, pixel_type) = match self.channels {
            1 => (img.into_luma8().into_raw(), PixelType::U8),
            _ => (img.into_rgb8().into_raw(), PixelType::U8x3),
        };
        let src = Image::from_vec_u8(w, h, pixels, pixel_type).map_err(|e| format!("image of {w}x{h}: {e}"))?;
        let (left, top, cw, ch) = match self.fit {
            Fit::Whole => (0.0, 0.0, w as f64, h as f64),
            Fit::RandomResized { scale, ratio } => random_resized_box(w, h, scale, ratio, rng),
            Fit::Centre { resize } => {
                let side = (self.size as f64 * resize).round().max(1.0);
                let shown = self.size as f64 * w.min(h) as f64 / side;
                let (cw, ch) = (shown.min(w as f64), shown.min(h as f64));
                ((w as f64 - cw) / 2.0, (h as f64 - ch) / 2.0, cw, ch)
            }
        };
        let mut dst = Image::new(self.size, self.size, pixel_type);
        let options =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(left, top, cw, ch);
        Resizer::new().resize(&src, &mut dst, &options).map_err(|e| format!("cannot resize: {e}"))?;
        Ok(dst.into_vec())
    }
}

/// Normalisation (and flip) done as each image is decoded: `(pixel / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalise {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub flip: bool,
}

fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read image: {e}"))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err("cannot decode image: not a JPEG or PNG".into());
    }
    reader.decode().map_err(|e| format!("cannot decode image: {e}"))
}

/// HWC -> CHW.
fn to_planes(hwc: &[u8], channels: usize, out: &mut [u8]) {
    if channels == 1 {
        out.copy_from_slice(hwc);
        return;
    }
    let plane = hwc.len() / channels;
    for (i, px) in hwc.chunks_exact(channels).enumerate() {
        for (c, v) in px.iter().enumerate() {
            out[c * plane + i] = *v;
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at an area in `scale` of the
/// image's and a log-uniform aspect ratio in `ratio`; failing that, the centre crop of the
/// whole image with its ratio clamped to `ratio`. Returns (left, top, width, height).
pub fn random_resized_box(
    w: u32,
    h: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut ChaCha8Rng,
) -> (f64, f64, f64, f64) {
    let (wf, hf) = (w as f64, h as f64);
    let area = wf * hf;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale[0]..=scale[1]);
        let aspect = rng.gen_range(log_lo..=log_hi).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= wf && ch <= hf {
            let top = rng.gen_range(0..=(h - ch as u32)) as f64;
            let left = rng.gen_range(0..=(w - cw as u32)) as f64;
            return (left, top, cw, ch);
        }
    }
    let in_ratio = wf / hf;
    let (cw, ch) = if in_ratio < ratio[0] {
        (wf, (wf / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((hf * ratio[1]).round(), hf)
    } else {
        (wf, hf)
    };
    (((wf - cw) / 2.0).floor(), ((hf - ch) / 2.0).floor(), cw, ch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient_png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn random_boxes_stay_inside_the_image_and_within_the_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (scale, ratio) = ([0.08, 1.0], [0.75, 4.0 / 3.0]);
        for (w, h) in [(500, 375), (64, 64), (3, 900), (1, 1)] {
            for _ in 0..500 {
                let (l, t, cw, ch) = random_resized_box(w, h, scale, ratio, &mut rng);
                assert!(l >= 0.0 && t >= 0.0 && cw >= 1.0 && ch >= 1.0, "{w}x{h}: {l} {t} {cw} {ch}");
                assert!(l + cw <= w as f64 && t + ch <= h as f64, "{w}x{h}: {l} {t} {cw} {ch}");
            }
        }
        // a wide image: the ten tries fit, so areas spread over the scale range
        let areas: Vec<f64> = (0..2000)
            .map(|_| {
                let (_, _, cw, ch) = random_resized_box(500, 375, scale, ratio, &mut rng);
                cw * ch / (500.0 * 375.0)
            })
            .collect();
        let below_half = areas.iter().filter(|a| **a < 0.5).count();
        assert!(areas.iter().all(|a| *a <= 1.0 + 1e-9 && *a >= 0.07), "{areas:?}");
        assert!(below_half > 800 && below_half < 1600, "{below_half} of 2000 crops below half the area");
    }

    #[test]
    fn whole_and_centre_fits_keep_a_gradient_in_place() {
        let bytes = gradient_png(200, 100);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let whole = Decode { size: 10, channels: 3, fit: Fit::Whole };
        let mut out = vec![0u8; whole.bytes()];
        whole.image(&bytes, &mut rng, &mut out).unwrap();
        // red rises left to right over the whole width, green top to bottom, blue is flat
        assert!(out[0] < 20 && out[9] > 235, "{:?}", &out[..10]);
        assert!(out[100] < 20 && out[190] > 235);
        assert!(out[200..].iter().all(|v| *v == 128));
        let centre = Decode { fit: Fit::Centre { resize: 1.0 }, ..whole };
        centre.image(&bytes, &mut rng, &mut out).unwrap();
        // the centre 100x100 of a 200-wide image: red spans only its middle half
        assert!(out[0] > 55 && out[0] < 80 && out[9] > 175 && out[9] < 200, "{:?}", &out[..10]);
        let grey = Decode { channels: 1, ..whole };
        let mut out = vec![0u8; grey.bytes()];
        grey.image(&bytes, &mut rng, &mut out).unwrap();
    }

    #[test]
    fn normalised_output_is_the_pixels_normalised_and_mirrored_when_the_coin_says_so() {
        let bytes = gradient_png(30, 20);
        let d = Decode { size: 8, channels: 3, fit: Fit::Whole };
        let mut pixels = vec![0u8; d.bytes()];
        d.image(&bytes, &mut ChaCha8Rng::seed_from_u64(0), &mut pixels).unwrap();
        let norm = Normalise { mean: vec![0.4, 0.5, 0.6], std: vec![0.2, 0.25, 0.3], flip: true };
        let expect = |mirror: bool| -> Vec<f32> {
            (0..pixels.len())
                .map(|i| {
                    let (c, y, x) = (i / 64, i / 8 % 8, i % 8);
                    let x = if mirror { 7 - x } else { x };
                    let v = pixels[c * 64 + y * 8 + x] as f64;
                    ((v / 255.0 - norm.mean[c]) / norm.std[c]) as f32
                })
                .collect()
        };
        let (plain, mirrored) = (expect(false), expect(true));
        let mut seen = [0, 0];
        let mut out = vec![0f32; d.bytes()];
        for seed in 0..40 {
            d.image_normalised(&bytes, &mut ChaCha8Rng::seed_from_u64(seed), &norm, &mut out).unwrap();
            let near = |e: &[f32]| out.iter().zip(e).all(|(a, b)| (a - b).abs() < 1e-5);
            match (near(&plain), near(&mirrored)) {
                (true, false) => seen[0] += 1,
                (false, true) => seen[1] += 1,
                other => panic!("seed {seed}: neither the image nor its mirror: {other:?}"),
            }
        }
        assert!(seen[0] > 5 && seen[1] > 5, "{seen:?}");
        let no_flip = Normalise { flip: false, ..norm.clone() };
        d.image_normalised(&bytes, &mut ChaCha8Rng::seed_from_u64(3), &no_flip, &mut out).unwrap();
        assert!(out.iter().zip(&plain).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn damaged_and_oversized_images_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let d = Decode { size: 8, channels: 3, fit: Fit::Whole };
        let mut out = vec![0u8; d.bytes()];
        assert!(d.image(b"not an image", &mut rng, &mut out).unwrap_err().contains("not a JPEG or PNG"));
        let bytes = gradient_png(64, 64);
        let e = d.image(&bytes[..bytes.len() / 2], &mut rng, &mut out).unwrap_err();
        assert!(e.contains("cannot decode"), "{e}");
        // a PNG header claiming 100,000 x 100,000 pixels
        let mut huge = bytes.clone();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let e = d.image(&huge, &mut rng, &mut out).unwrap_err();
        assert!(e.contains("cannot decode"), "{e}");
    }
}
