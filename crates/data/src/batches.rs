//! Batches: shuffling, augmentation as whole-batch tensor ops, normalisation, and a stream
//! whose every batch is a pure function of (seed, epoch, batch index).
//!
//! Purity is what makes runs repeatable whatever the thread timing, and resumable exactly:
//! a run restarted at batch k of epoch e asks for (e, k) and gets the batch an
//! uninterrupted run would have trained on.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::rng::batch_rng;
use tch::{Device, Kind, Tensor};

use crate::config::DataConfig;
use crate::decode::Normalise;
use crate::examples::Examples;
pub use crate::sampler::Sampler;
use crate::{DataError, Result};

/// One batch, ready for the first stage.
#[derive(Debug)]
pub struct Batch {
    pub epoch: usize,
    /// Position in the epoch, from 0.
    pub index: usize,
    /// float32, normalised, B x C x H x W.
    pub images: Tensor,
    /// int64, B.
    pub labels: Tensor,
    /// Images left out as unreadable (streamed sets with `data.skip_bad`), one line each.
    pub skipped: Vec<String>,
}

/// Augmentation and normalisation settings resolved for one data set.
#[derive(Debug, Clone)]
pub struct Transform {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub crop_padding: i64,
    pub flip: bool,
    pub cutout_holes: i64,
    pub cutout_length: i64,
}

/// Cutout holes per image, at most: more would only repeat work on a covered image.
pub const MAX_CUTOUT_HOLES: i64 = 64;

impl Transform {
    /// The transform for images of `channels` x `size` x `size`; every augmentation key is
    /// checked here against the image it applies to.
    pub fn from_config(config: &DataConfig, channels: i64, size: i64) -> Result<Self> {
        let (dm, ds) = config
            .dataset
            .normalisation()
            .unwrap_or_else(|| (vec![0.5; channels as usize], vec![0.5; channels as usize]));
        let mean = config.mean.clone().unwrap_or(dm);
        let std = config.std.clone().unwrap_or(ds);
        if mean.len() != channels as usize {
            return Err(DataError::Config(format!(
                "data.mean: expected {channels} values (one per channel), got {}",
                mean.len()
            )));
        }
        if std.len() != channels as usize || std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(DataError::Config(format!("data.std: expected {channels} positive values, got {std:?}")));
        }
        let t = Transform {
            mean,
            std,
            crop_padding: config.crop_padding(),
            flip: config.flip(),
            cutout_holes: config.cutout_holes,
            cutout_length: config.cutout_length,
        };
        let bounds = [
            ("data.crop_padding", t.crop_padding, size, "pixels, at most the image size"),
            ("data.cutout_length", t.cutout_length, size, "pixels, at most the image size"),
            ("data.cutout_holes", t.cutout_holes, MAX_CUTOUT_HOLES, "holes per image"),
        ];
        for (key, v, max, what) in bounds {
            if !(0..=max).contains(&v) {
                return Err(DataError::Config(format!(
                    "{key}: expected 0..={max} {what} ({size}x{size} images), got {v}"
                )));
            }
        }
        if t.mean.iter().chain(&t.std).any(|v| !v.is_finite()) {
            return Err(DataError::Config(format!(
                "data.mean, data.std: expected finite values, got {:?}, {:?}",
                t.mean, t.std
            )));
        }
        Ok(t)
    }

    /// Evaluation: normalisation only.
    pub fn normalise(&self, images: &Tensor) -> Tensor {
        let c = self.mean.len() as i64;
        let mean = Tensor::from_slice(&self.mean).to_kind(Kind::Float).view([1, c, 1, 1]);
        let std = Tensor::from_slice(&self.std).to_kind(Kind::Float).view([1, c, 1, 1]);
        (images.to_kind(Kind::Float) / 255.0 - mean) / std
    }

    /// Training: random crop with zero padding and horizontal flip on the pixels, then
    /// normalisation, then cutout (the reference's order). `rng` decides everything random.
    pub fn augment(&self, images: &Tensor, rng: &mut ChaCha8Rng) -> Tensor {
        let (b, _, h, w) = images.size4().expect("images are 4-D");
        let mut x = images.to_kind(Kind::Float);
        if self.crop_padding > 0 {
            let p = self.crop_padding;
            let dy: Vec<i64> = (0..b).map(|_| rng.gen_range(0..=2 * p)).collect();
            let dx: Vec<i64> = (0..b).map(|_| rng.gen_range(0..=2 * p)).collect();
            x = crop(&x.constant_pad_nd([p, p, p, p]), &dy, &dx, h, w);
        }
        if self.flip {
            let flips: Vec<bool> = (0..b).map(|_| rng.gen_bool(0.5)).collect();
            let mask = Tensor::from_slice(&flips).view([b, 1, 1, 1]);
            x = x.flip([3]).where_self(&mask, &x);
        }
        let mut x = self.normalise_float(&x);
        for _ in 0..self.cutout_holes {
            let cy: Vec<i64> = (0..b).map(|_| rng.gen_range(0..h)).collect();
            let cx: Vec<i64> = (0..b).map(|_| rng.gen_range(0..w)).collect();
            x *= cutout_mask(&cy, &cx, self.cutout_length, h, w);
        }
        x
    }

    fn normalise_float(&self, pixels: &Tensor) -> Tensor {
        let c = self.mean.len() as i64;
        let mean = Tensor::from_slice(&self.mean).to_kind(Kind::Float).view([1, c, 1, 1]);
        let std = Tensor::from_slice(&self.std).to_kind(Kind::Float).view([1, c, 1, 1]);
        (pixels / 255.0 - mean) / std
    }
}

/// Per-image windows of `h` x `w` at offsets (dy, dx) of a padded batch, by two gathers.
fn crop(padded: &Tensor, dy: &[i64], dx: &[i64], h: i64, w: i64) -> Tensor {
    let (b, c, _, pw) = padded.size4().unwrap();
    let rows =
        Tensor::from_slice(dy).view([b, 1, 1, 1]) + Tensor::arange(h, (Kind::Int64, Device::Cpu)).view([1, 1, h, 1]);
    let by_rows = padded.gather(2, &rows.expand([b, c, h, pw], false), false);
    let cols =
        Tensor::from_slice(dx).view([b, 1, 1, 1]) + Tensor::arange(w, (Kind::Int64, Device::Cpu)).view([1, 1, 1, w]);
    by_rows.gather(3, &cols.expand([b, c, h, w], false), false)
}

/// 0 inside each image's square hole (centre (cy, cx), side `length`, clipped), else 1.
fn cutout_mask(cy: &[i64], cx: &[i64], length: i64, h: i64, w: i64) -> Tensor {
    let b = cy.len() as i64;
    let half = length / 2;
    let span = |centre: &[i64], size: i64| {
        let lo: Vec<i64> = centre.iter().map(|c| (c - half).clamp(0, size)).collect();
        let hi: Vec<i64> = centre.iter().map(|c| (c + half).clamp(0, size)).collect();
        let pos = Tensor::arange(size, (Kind::Int64, Device::Cpu)).view([1, size]);
        pos.ge_tensor(&Tensor::from_slice(&lo).view([b, 1]))
            .logical_and(&pos.lt_tensor(&Tensor::from_slice(&hi).view([b, 1])))
    };
    let inside = span(cy, h).view([b, 1, h, 1]).logical_and(&span(cx, w).view([b, 1, 1, w]));
    inside.logical_not().to_kind(Kind::Float)
}

/// Deterministic batches of one data set: `batch(epoch, index)` is a pure function.
pub struct BatchSource {
    examples: Examples,
    labels: Vec<i64>,
    transform: Transform,
    sampler: Sampler,
    augment: bool,
    /// The batch order of the epoch last asked for.
    cached: Option<(usize, Vec<Vec<usize>>)>,
}

impl BatchSource {
    pub fn training(examples: impl Into<Examples>, transform: Transform, sampler: Sampler) -> Self {
        let examples = examples.into();
        let labels = examples.labels();
        Self { examples, labels, transform, sampler, augment: true, cached: None }
    }

    /// Evaluation: in order, no shuffling, no augmentation, every example.
    pub fn evaluation(examples: impl Into<Examples>, transform: Transform, batch_size: usize) -> Self {
        let examples = examples.into();
        let labels = examples.labels();
        let sampler = Sampler { batch_size, drop_last: false, classes_per_batch: 0, seed: 0, shuffle_buffer: 0 };
        Self { examples, labels, transform, sampler, augment: false, cached: None }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.sampler.batches_per_epoch(self.labels.len())
    }

    fn indices(&mut self, epoch: usize, index: usize) -> Vec<usize> {
        if !self.augment {
            let start = index * self.sampler.batch_size;
            let end = (start + self.sampler.batch_size).min(self.labels.len());
            return (start..end).collect();
        }
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let order = match &self.examples {
                Examples::Stream(s) if self.sampler.shuffle_buffer > 0 => {
                    self.sampler.buffered_order(&s.groups(), epoch)
                }
                e => self.sampler.epoch_order(&self.labels, e.num_classes() as usize, epoch),
            };
            self.cached = Some((epoch, order));
        }
        self.cached.as_ref().unwrap().1[index].clone()
    }

    /// Batch `index` (from 0) of `epoch` (from 1). Only a streamed set can fail: an image
    /// that cannot be read (unless `data.skip_bad`).
    pub fn batch(&mut self, epoch: usize, index: usize) -> Result<Batch> {
        let picks = self.indices(epoch, index);
        let (pixels, labels, skipped) = match &self.examples {
            Examples::Memory(d) => {
                let idx = Tensor::from_slice(&picks.iter().map(|&i| i as i64).collect::<Vec<_>>());
                (d.images.index_select(0, &idx), d.labels.index_select(0, &idx), vec![])
            }
            Examples::Stream(s) => {
                let key = self.augment.then_some((self.sampler.seed, epoch, index));
                // flip and normalisation as each image is decoded, on the decode threads,
                // unless a batch-wide augmentation (crop padding, cutout) comes between
                let t = &self.transform;
                let fused = (t.crop_padding == 0 && t.cutout_holes == 0).then(|| Normalise {
                    mean: t.mean.clone(),
                    std: t.std.clone(),
                    flip: self.augment && t.flip,
                });
                let p = s.pixels(&picks, key, fused.as_ref())?;
                if fused.is_some() {
                    return Ok(Batch { epoch, index, images: p.images, labels: p.labels, skipped: p.skipped });
                }
                (p.images, p.labels, p.skipped)
            }
        };
        let images = if self.augment {
            self.transform.augment(&pixels, &mut batch_rng(self.sampler.seed, epoch, index, 2))
        } else {
            self.transform.normalise(&pixels)
        };
        Ok(Batch { epoch, index, images, labels, skipped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Dataset;

    fn plain() -> Transform {
        Transform { mean: vec![0.0], std: vec![1.0], crop_padding: 0, flip: false, cutout_holes: 0, cutout_length: 0 }
    }

    fn numbered(b: i64, h: i64, w: i64) -> Tensor {
        Tensor::arange(b * h * w, (Kind::Float, Device::Cpu)).view([b, 1, h, w])
    }

    #[test]
    fn crop_takes_each_images_own_window_of_the_zero_padded_batch() {
        let x = numbered(2, 3, 3);
        let out = crop(&x.constant_pad_nd([1, 1, 1, 1]), &[0, 2], &[1, 0], 3, 3);
        // image 0 shifted down by one row (zeros on top); image 1 up by one, right by one
        let expected0 = Tensor::from_slice(&[0f32, 0., 0., 0., 1., 2., 3., 4., 5.]).view([1, 1, 3, 3]);
        let expected1 = Tensor::from_slice(&[0f32, 12., 13., 0., 15., 16., 0., 0., 0.]).view([1, 1, 3, 3]);
        assert!(out.narrow(0, 0, 1).equal(&expected0), "{out}");
        assert!(out.narrow(0, 1, 1).equal(&expected1), "{out}");
    }

    #[test]
    fn cutout_zeroes_a_clipped_square_around_the_centre() {
        let m = cutout_mask(&[0, 2], &[0, 2], 2, 4, 4);
        assert_eq!(m.sum(Kind::Float).double_value(&[]), 32.0 - 1.0 - 4.0);
        assert_eq!(m.double_value(&[0, 0, 0, 0]), 0.0);
        assert_eq!(m.double_value(&[1, 0, 1, 1]), 0.0);
        assert_eq!(m.double_value(&[1, 0, 3, 3]), 1.0);
    }

    #[test]
    fn flip_mirrors_only_the_chosen_images() {
        let t = Transform { flip: true, ..plain() };
        let x = numbered(64, 2, 3) * (1.0 / 1000.0);
        let out = t.augment(&(&x * 255.0), &mut batch_rng(1, 1, 0, 2));
        let same = out.isclose(&x, 1e-4, 1e-4, false).all_dim(3, false).all_dim(2, false).squeeze();
        let flipped = out.isclose(&x.flip([3]), 1e-4, 1e-4, false).all_dim(3, false).all_dim(2, false).squeeze();
        let n_same = same.sum(Kind::Int64).int64_value(&[]);
        assert_eq!(n_same + flipped.sum(Kind::Int64).int64_value(&[]), 64);
        assert!(n_same > 16 && n_same < 48, "{n_same} of 64 unflipped");
    }

    fn source(seed: u64) -> BatchSource {
        let n = 300;
        let images =
            Tensor::arange(n * 64, (Kind::Int64, Device::Cpu)).remainder(251).to_kind(Kind::Uint8).view([n, 1, 8, 8]);
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(10);
        let set = Dataset { images, labels, num_classes: 10 };
        let t = Transform { crop_padding: 2, flip: true, cutout_holes: 1, cutout_length: 3, ..plain() };
        BatchSource::training(
            set,
            t,
            Sampler { batch_size: 32, drop_last: false, classes_per_batch: 0, seed, shuffle_buffer: 0 },
        )
    }

    #[test]
    fn a_batch_is_a_pure_function_of_seed_epoch_and_index() {
        let mut uninterrupted = source(5);
        let mut seen = Vec::new();
        for epoch in 1..=2 {
            for i in 0..uninterrupted.batches_per_epoch() {
                seen.push(uninterrupted.batch(epoch, i).unwrap());
            }
        }
        // a resumed source asked for batch 4 of epoch 2 directly
        let mut resumed = source(5);
        let b = resumed.batch(2, 4).unwrap();
        let same = &seen[uninterrupted.batches_per_epoch() + 4];
        assert!(b.images.equal(&same.images) && b.labels.equal(&same.labels));
        assert!(!source(6).batch(2, 4).unwrap().images.equal(&b.images), "another seed, other batches");
    }

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let n = 100;
        let images = Tensor::arange(n, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8).view([n, 1, 1, 1]);
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(10);
        let set = || Dataset { images: images.copy(), labels: labels.copy(), num_classes: 10 };
        let (train, val) = set().split_validation(20, 3).unwrap();
        let val = val.unwrap();
        assert_eq!((train.len(), val.len()), (80, 20));
        let mut ids: Vec<i64> = Vec::<i64>::try_from(&train.images.view([-1]).to_kind(Kind::Int64)).unwrap();
        ids.extend(Vec::<i64>::try_from(&val.images.view([-1]).to_kind(Kind::Int64)).unwrap());
        ids.sort();
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
        let (_, again) = set().split_validation(20, 3).unwrap();
        assert!(again.unwrap().images.equal(&val.images));
        assert!(set().split_validation(100, 3).is_err());
    }
}
