//! Reading the configured data set from disk: the one place that picks its reader.

use crate::config::{DataConfig, DatasetKind};
use crate::dataset::Splits;
use crate::index::Index;
use crate::{cifar, folder, idx, shards, stl10, svhn, DataError, Result};

/// Reads the configured data set from disk.
pub fn load(config: &DataConfig) -> Result<Splits> {
    let root = config.existing_root()?;
    let (train, test) = match config.dataset {
        DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Kmnist => idx::load_splits(&root)?,
        DatasetKind::Cifar10 => cifar::load_cifar10(&root)?,
        DatasetKind::Cifar100 => cifar::load_cifar100(&root, config.cifar100_labels)?,
        DatasetKind::Svhn => svhn::load(&root, config.svhn_extra)?,
        DatasetKind::Stl10 => stl10::load(&root)?,
        DatasetKind::ImageFolder => folder::load(&root, config.image_size, config.image_channels)?,
        DatasetKind::WebDataset => {
            // Shards decoded whole into memory: for tests and small sets; runs stream them.
            let (train, eval) = indexes(config)?;
            let (size, c) = (config.image_size as u32, config.image_channels);
            (folder::decode_all(&train, &root, size, c)?, folder::decode_all(&eval, &root, size, c)?)
        }
    };
    Ok(Splits { train, test, validation: None, kind: config.dataset })
}

/// The training and evaluation indexes of a streamed data set; what indexing skipped is logged.
pub fn indexes(config: &DataConfig) -> Result<(Index, Index)> {
    folder::check_shape(config.image_size, config.image_channels)?;
    let root = config.existing_root()?;
    let (train_dir, eval_dir) = folder::split_dirs(&root)?;
    let (train, eval) = match config.dataset {
        DatasetKind::WebDataset => {
            let train = shards::index(&train_dir, None, config.skip_bad)?;
            let eval = shards::index(&eval_dir, Some(train.classes.len()), config.skip_bad)?;
            (train, eval)
        }
        _ => {
            let classes = folder::classes(&train_dir, &eval_dir)?;
            (
                folder::index(&train_dir, &classes, config.skip_bad)?,
                folder::index(&eval_dir, &classes, config.skip_bad)?,
            )
        }
    };
    for (dir, index) in [(&train_dir, &train), (&eval_dir, &eval)] {
        for line in index.skipped.iter().take(20) {
            tracing::warn!("skipped: {line}");
        }
        if !index.skipped.is_empty() {
            tracing::warn!(
                "{}: {} unreadable samples or empty classes skipped while indexing",
                dir.display(),
                index.skipped.len()
            );
        }
        if index.is_empty() {
            return Err(DataError::file(
                dir,
                "no images: expected <class>/*.jpg (folders) or *.tar shards with samples",
            ));
        }
    }
    if train.classes.len() < 2 {
        return Err(DataError::file(&train_dir, format!("{} class(es): expected at least 2", train.classes.len())));
    }
    Ok((train, eval))
}
