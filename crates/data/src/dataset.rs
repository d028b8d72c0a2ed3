//! A data set in memory: uint8 images N x C x H x W and int64 labels.

use rand::seq::SliceRandom;
use tch::{Kind, Tensor};

use crate::config::DatasetKind;
use crate::rng::batch_rng;
use crate::{DataError, Result};

#[derive(Debug)]
pub struct Dataset {
    /// uint8, N x C x H x W, on the CPU.
    pub images: Tensor,
    /// int64, N.
    pub labels: Tensor,
    pub num_classes: i64,
}

impl Dataset {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (channels, height, width).
    pub fn image_shape(&self) -> (i64, i64, i64) {
        let s = self.images.size();
        (s[1], s[2], s[3])
    }

    /// Counts of each label, for checks and reports.
    pub fn label_histogram(&self) -> Vec<i64> {
        let counts = self.labels.bincount(None::<Tensor>, self.num_classes);
        Vec::<i64>::try_from(counts.to_kind(Kind::Int64)).unwrap_or_default()
    }

    /// Holds `size` examples, chosen by a permutation seeded with `seed`, out of this set:
    /// (the rest, the held-out ones), both in their original order.
    pub fn split_validation(self, size: usize, seed: u64) -> Result<(Dataset, Option<Dataset>)> {
        let Some((rest, held)) = validation_split(self.len() as usize, size, seed)? else {
            return Ok((self, None));
        };
        let pick = |idx: &[usize]| {
            let i = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
            Dataset {
                images: self.images.index_select(0, &i),
                labels: self.labels.index_select(0, &i),
                num_classes: self.num_classes,
            }
        };
        Ok((pick(&rest), Some(pick(&held))))
    }

    /// Builds a data set from raw parts, checking shapes and label range.
    pub fn new(images: Tensor, labels: Tensor, num_classes: i64, source: &std::path::Path) -> Result<Self> {
        if images.dim() != 4 || images.kind() != Kind::Uint8 {
            return Err(DataError::file(
                source,
                format!("expected uint8 images N x C x H x W, got {:?} {:?}", images.kind(), images.size()),
            ));
        }
        if images.size()[0] != labels.size()[0] {
            return Err(DataError::file(
                source,
                format!("{} images but {} labels", images.size()[0], labels.size()[0]),
            ));
        }
        if labels.numel() > 0 {
            let (min, max) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
            if min < 0 || max >= num_classes {
                return Err(DataError::file(
                    source,
                    format!("label {} out of range: expected 0..{}", if min < 0 { min } else { max }, num_classes - 1),
                ));
            }
        }
        Ok(Self { images, labels, num_classes })
    }
}

/// Of `n` examples, (the rest, the `size` held out for validation), each sorted: the first
/// `size` of a permutation seeded with `seed`. None for no validation set (`size` 0).
pub fn validation_split(n: usize, size: usize, seed: u64) -> Result<Option<(Vec<usize>, Vec<usize>)>> {
    if size == 0 {
        return Ok(None);
    }
    if size >= n {
        return Err(DataError::Config(format!("data.validation_size: {size} is not below the {n} training examples")));
    }
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut batch_rng(seed, 0, 0, 7));
    let (held, rest) = perm.split_at(size);
    let (mut held, mut rest) = (held.to_vec(), rest.to_vec());
    held.sort_unstable();
    rest.sort_unstable();
    Ok(Some((rest, held)))
}

/// Training and test sets, and the validation set held out of training when asked for.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
    pub validation: Option<Dataset>,
    pub kind: DatasetKind,
}
