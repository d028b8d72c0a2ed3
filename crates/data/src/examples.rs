//! A split's examples, wherever they are: decoded in memory (the paper's small sets, and
//! image folders by default), or streamed from disk as batches ask for them (image folders
//! with `data.stream`, and tar shards).

use std::sync::Arc;

use crate::config::{DataConfig, DatasetKind};
use crate::dataset::{validation_split, Dataset};
use crate::decode::{Decode, Fit};
use crate::stream::StreamSet;
use crate::{DataError, Result};

/// Most decode threads.
pub const MAX_WORKERS: usize = 256;

#[derive(Debug)]
pub enum Examples {
    Memory(Dataset),
    Stream(StreamSet),
}

impl From<Dataset> for Examples {
    fn from(d: Dataset) -> Self {
        Examples::Memory(d)
    }
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Memory(d) => d.len() as usize,
            Examples::Stream(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (channels, height, width).
    pub fn image_shape(&self) -> (i64, i64, i64) {
        match self {
            Examples::Memory(d) => d.image_shape(),
            Examples::Stream(s) => s.image_shape(),
        }
    }

    pub fn num_classes(&self) -> i64 {
        match self {
            Examples::Memory(d) => d.num_classes,
            Examples::Stream(s) => s.num_classes(),
        }
    }

    pub fn labels(&self) -> Vec<i64> {
        match self {
            Examples::Memory(d) => Vec::<i64>::try_from(&d.labels).unwrap_or_default(),
            Examples::Stream(s) => s.labels(),
        }
    }

    /// Holds `size` examples out, as [`Dataset::split_validation`] does (the same ones for
    /// the same seed, in memory or streamed).
    pub fn split_validation(self, size: usize, seed: u64) -> Result<(Examples, Option<Examples>)> {
        let set = match self {
            Examples::Memory(d) => {
                let (rest, held) = d.split_validation(size, seed)?;
                return Ok((rest.into(), held.map(Examples::Memory)));
            }
            Examples::Stream(s) => s,
        };
        let Some((rest, held)) = validation_split(set.len(), size, seed)? else {
            return Ok((Examples::Stream(set), None));
        };
        Ok((Examples::Stream(set.subset(&rest)), Some(Examples::Stream(set.subset(&held)))))
    }
}

/// Training and evaluation examples of a configured data set.
#[derive(Debug)]
pub struct Sets {
    pub train: Examples,
    pub test: Examples,
    pub kind: DatasetKind,
}

/// Opens the configured data set: read into memory, or indexed for streaming with
/// `workers` decode threads.
pub fn open(config: &DataConfig, workers: usize) -> Result<Sets> {
    if !config.streamed() {
        let s = crate::read::load(config)?;
        return Ok(Sets { train: s.train.into(), test: s.test.into(), kind: s.kind });
    }
    if !(1..=MAX_WORKERS).contains(&workers) {
        return Err(DataError::Config(format!("data.workers: expected 1..={MAX_WORKERS} threads, got {workers}")));
    }
    let (train, test) = crate::read::indexes(config)?;
    let size = config.image_size as u32;
    let channels = config.image_channels as u8;
    let (train_fit, eval_fit) = match config.random_resized_crop {
        true => (
            Fit::RandomResized { scale: config.crop_scale, ratio: config.crop_ratio },
            Fit::Centre { resize: config.eval_resize },
        ),
        false => (Fit::Whole, Fit::Whole),
    };
    let decode = |fit| Decode { size, channels, fit };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .map_err(|e| DataError::Config(format!("data.workers: cannot start {workers} decode threads: {e}")))?;
    let pool = Arc::new(pool);
    let set = |index| StreamSet::new(index, decode(train_fit), decode(eval_fit), pool.clone(), config.skip_bad);
    Ok(Sets { train: Examples::Stream(set(train)), test: Examples::Stream(set(test)), kind: config.dataset })
}
