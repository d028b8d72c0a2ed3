//! Reading the configured data set from disk: the one place that picks its reader.

use crate::config::{DataConfig, DatasetKind};
use crate::dataset::Splits;
use crate::{cifar, folder, idx, shards, stl10, svhn, DataError, Result};

/// Reads the configured data set from disk.
pub fn load(config: &DataConfig) -> Result<Splits> {
    let root = config.root();
    if !root.is_dir() {
        return Err(DataError::file(
            &root,
            format!("data root of {:?} not found: expected {}", config.dataset, config.dataset.layout()),
        ));
    }
    let (train, test) = match config.dataset {
        DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Kmnist => idx::load_splits(&root)?,
        DatasetKind::Cifar10 => cifar::load_cifar10(&root)?,
        DatasetKind::Cifar100 => cifar::load_cifar100(&root, config.cifar100_labels)?,
        DatasetKind::Svhn => svhn::load(&root, config.svhn_extra)?,
        DatasetKind::Stl10 => stl10::load(&root)?,
        DatasetKind::ImageFolder => folder::load(&root, config.image_size, config.image_channels)?,
        DatasetKind::WebDataset => {
            // Shards decoded whole into memory: for tests and small sets; runs stream them.
            folder::check_shape(config.image_size, config.image_channels)?;
            let (train_dir, eval_dir) = folder::split_dirs(&root)?;
            let train = shards::index(&train_dir, None, false)?;
            let eval = shards::index(&eval_dir, Some(train.classes.len()), false)?;
            let (size, c) = (config.image_size as u32, config.image_channels);
            (folder::decode_all(&train, &train_dir, size, c)?, folder::decode_all(&eval, &eval_dir, size, c)?)
        }
    };
    Ok(Splits { train, test, validation: None, kind: config.dataset })
}
