//! A streamed split: its index, and the decode threads that turn a batch's picks into
//! pixels. Each image is decoded with a generator of its own, keyed by (seed, epoch, batch,
//! slot in the batch), so a batch is the same whatever the number of threads and whichever
//! thread takes which image.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use crate::decode::{Decode, Normalise};
use crate::index::Index;
use crate::{DataError, Result};

/// The generator of one image of one batch: independent of every other image's.
pub fn example_rng(seed: u64, epoch: usize, batch: usize, slot: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, v) in [seed ^ 0x696d_6167_6573_7472, epoch as u64, batch as u64, slot as u64].iter().enumerate() {
        key[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A batch's pixels (uint8, B x C x H x W), labels, and the images skipped as unreadable.
pub struct Pixels {
    pub images: Tensor,
    pub labels: Tensor,
    pub skipped: Vec<String>,
}

/// Images of one split, read and decoded as batches ask for them.
#[derive(Clone)]
pub struct StreamSet {
    index: Arc<Index>,
    /// The index positions this set holds, in order (all of them when None).
    members: Option<Arc<Vec<u32>>>,
    pub train: Decode,
    pub eval: Decode,
    pool: Arc<rayon::ThreadPool>,
    skip_bad: bool,
}

impl StreamSet {
    pub fn new(index: Index, train: Decode, eval: Decode, pool: Arc<rayon::ThreadPool>, skip_bad: bool) -> Self {
        Self { index: Arc::new(index), members: None, train, eval, pool, skip_bad }
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn describe(&self, i: usize) -> String {
        self.index.describe(self.position(i))
    }

    fn position(&self, i: usize) -> usize {
        self.members.as_ref().map_or(i, |m| m[i] as usize)
    }

    pub fn len(&self) -> usize {
        self.members.as_ref().map_or(self.index.len(), |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn labels(&self) -> Vec<i64> {
        (0..self.len()).map(|i| self.index.label(self.position(i))).collect()
    }

    pub fn num_classes(&self) -> i64 {
        self.index.classes.len() as i64
    }

    /// (channels, height, width) of the decoded images.
    pub fn image_shape(&self) -> (i64, i64, i64) {
        (self.train.channels as i64, self.train.size as i64, self.train.size as i64)
    }

    /// Runs of consecutive examples from one shard (or class folder), for a shuffle buffer.
    pub fn groups(&self) -> Vec<Range<usize>> {
        let Some(members) = &self.members else { return self.index.groups() };
        let mut group_of = vec![0u32; self.index.len()];
        for (g, r) in self.index.groups().into_iter().enumerate() {
            group_of[r].fill(g as u32);
        }
        let mut groups: Vec<Range<usize>> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            match groups.last_mut() {
                Some(r) if group_of[members[r.start] as usize] == group_of[*m as usize] => r.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
        groups
    }

    /// The set holding only `picks` (sorted positions of this set).
    pub fn subset(&self, picks: &[usize]) -> StreamSet {
        let members = picks.iter().map(|&p| self.position(p) as u32).collect();
        StreamSet { members: Some(Arc::new(members)), ..self.clone() }
    }

    /// Decodes examples `picks` as one batch, on the decode threads: training images with
    /// generators keyed by `key` = (seed, epoch, batch), evaluation images (`key` None)
    /// fitted without randomness. With `norm`, the images come out normalised (float32),
    /// else as uint8 pixels. An unreadable image fails the batch naming its file, or with
    /// `data.skip_bad` is left out and reported in `skipped`.
    pub fn pixels(
        &self,
        picks: &[usize],
        key: Option<(u64, usize, usize)>,
        norm: Option<&Normalise>,
    ) -> Result<Pixels> {
        let decode = if key.is_some() { self.train } else { self.eval };
        let (c, h, w) = self.image_shape();
        let shape = [picks.len() as i64, c, h, w];
        let read = |slot: usize, pick: usize| -> std::result::Result<(Vec<u8>, ChaCha8Rng), String> {
            let (seed, epoch, batch) = key.unwrap_or_default();
            Ok((self.index.read(self.position(pick))?, example_rng(seed, epoch, batch, slot)))
        };
        let named = |pick: usize| move |e: String| format!("{}: {e}", self.describe(pick));
        let (images, results) = match norm {
            None => self.each(shape, Kind::Uint8, picks, |slot, out: &mut [u8], pick| {
                let (bytes, mut rng) = read(slot, pick)?;
                decode.image(&bytes, &mut rng, out).map_err(named(pick))
            }),
            Some(norm) => self.each(shape, Kind::Float, picks, |slot, out: &mut [f32], pick| {
                let (bytes, mut rng) = read(slot, pick)?;
                decode.image_normalised(&bytes, &mut rng, norm, out).map_err(named(pick))
            }),
        };
        let skipped: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
        if let Some(first) = skipped.first().filter(|_| !self.skip_bad) {
            return Err(DataError::Config(format!("{first} (data.skip_bad skips such images)")));
        }
        let kept: Vec<i64> = (0..picks.len() as i64).filter(|&s| results[s as usize].is_ok()).collect();
        if kept.is_empty() && !picks.is_empty() {
            return Err(DataError::Config(format!(
                "every image of a batch of {} is unreadable; the first: {}",
                picks.len(),
                skipped[0]
            )));
        }
        let labels: Vec<i64> = kept.iter().map(|&s| self.index.label(self.position(picks[s as usize]))).collect();
        let images = if skipped.is_empty() { images } else { images.index_select(0, &Tensor::from_slice(&kept)) };
        Ok(Pixels { images, labels: Tensor::from_slice(&labels).to_kind(Kind::Int64), skipped })
    }

    /// A fresh tensor of `shape`, each image's slice of it filled by `one(slot, out, pick)`
    /// on the decode threads; a failure (or a panic) is that image's error.
    fn each<T: tch::kind::Element + Send>(
        &self,
        shape: [i64; 4],
        kind: Kind,
        picks: &[usize],
        one: impl Fn(usize, &mut [T], usize) -> std::result::Result<(), String> + Sync,
    ) -> (Tensor, Vec<std::result::Result<(), String>>) {
        let images = Tensor::empty(shape, (kind, tch::Device::Cpu));
        let per = (shape[1] * shape[2] * shape[3]) as usize;
        debug_assert_eq!(T::KIND, kind);
        // SAFETY: `images` is a new contiguous CPU tensor of `picks.len() * per` elements of
        // kind T; nothing else refers to its storage while this slice lives.
        let out = unsafe { std::slice::from_raw_parts_mut(images.data_ptr() as *mut T, picks.len() * per) };
        let results = self.pool.install(|| {
            out.par_chunks_mut(per.max(1))
                .zip(picks.par_iter())
                .enumerate()
                .map(|(slot, (out, &pick))| {
                    catch_unwind(AssertUnwindSafe(|| one(slot, out, pick)))
                        .unwrap_or_else(|_| Err(format!("{}: the decoder panicked on this image", self.describe(pick))))
                })
                .collect()
        });
        (images, results)
    }
}

impl std::fmt::Debug for StreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSet({} images, {} threads)", self.len(), self.threads())
    }
}
