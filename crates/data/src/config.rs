//! Settings of the data path, as read from a config file's `data` section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Mnist,
    FashionMnist,
    Kmnist,
    Cifar10,
    Cifar100,
    Svhn,
    Stl10,
    ImageFolder,
    /// Tar shards in the WebDataset layout: `root/train/*.tar`, `root/val/*.tar` (or
    /// `test/`), members `KEY.jpg|jpeg|png` and `KEY.cls`; always streamed.
    #[serde(rename = "webdataset")]
    WebDataset,
}

impl DatasetKind {
    /// (mean, std) per channel, as the reference normalises.
    pub fn normalisation(self) -> Option<(Vec<f64>, Vec<f64>)> {
        let (m, s): (&[f64], &[f64]) = match self {
            DatasetKind::Mnist => (&[0.1307], &[0.3081]),
            DatasetKind::FashionMnist => (&[0.286], &[0.353]),
            DatasetKind::Kmnist => (&[0.1904], &[0.3475]),
            DatasetKind::Cifar10 => (&[0.424, 0.415, 0.384], &[0.283, 0.278, 0.284]),
            DatasetKind::Cifar100 => (&[0.438, 0.418, 0.377], &[0.300, 0.287, 0.294]),
            DatasetKind::Svhn => (&[0.431, 0.430, 0.446], &[0.197, 0.198, 0.199]),
            DatasetKind::Stl10 => (&[0.447, 0.440, 0.407], &[0.260, 0.257, 0.271]),
            DatasetKind::ImageFolder | DatasetKind::WebDataset => return None,
        };
        Some((m.to_vec(), s.to_vec()))
    }

    /// The reference recipes' augmentation: (crop padding, horizontal flip).
    pub fn default_augmentation(self) -> (i64, bool) {
        match self {
            DatasetKind::Mnist => (2, false),
            DatasetKind::FashionMnist => (2, true),
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => (4, true),
            DatasetKind::Kmnist
            | DatasetKind::Svhn
            | DatasetKind::Stl10
            | DatasetKind::ImageFolder
            | DatasetKind::WebDataset => (0, false),
        }
    }

    pub fn default_root(self) -> PathBuf {
        PathBuf::from(match self {
            DatasetKind::FashionMnist => "/usr/share/datasets/fashion-mnist",
            DatasetKind::Mnist => "/usr/share/datasets/mnist",
            DatasetKind::Kmnist => "data/kmnist",
            DatasetKind::Cifar10 => "data/cifar-10-batches-bin",
            DatasetKind::Cifar100 => "data/cifar-100-binary",
            DatasetKind::Svhn => "data/svhn",
            DatasetKind::Stl10 => "data/stl10_binary",
            DatasetKind::ImageFolder => "data/images",
            DatasetKind::WebDataset => "data/shards",
        })
    }

    /// What the data root must hold, for messages.
    pub fn layout(self) -> &'static str {
        match self {
            DatasetKind::ImageFolder => "a folder holding train/<class>/*.jpg|png and test/<class>/ (or val/)",
            DatasetKind::WebDataset => "a folder holding train/*.tar and val/*.tar (or test/) in the WebDataset layout",
            _ => "a folder",
        }
    }

    /// Read image by image as batches need them (image folders with `data.stream`, shards).
    pub fn can_stream(self) -> bool {
        matches!(self, DatasetKind::ImageFolder | DatasetKind::WebDataset)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    /// Folder of the data set's files; the data set's usual place when absent.
    pub root: Option<PathBuf>,
    /// Per-channel (mean, std); the data set's constants when absent.
    pub mean: Option<Vec<f64>>,
    pub std: Option<Vec<f64>>,
    /// Random-crop padding in pixels (0: no crop); the recipe's when absent.
    pub crop_padding: Option<i64>,
    /// Random horizontal flip; the recipe's when absent.
    pub flip: Option<bool>,
    /// Cutout: number of square holes per image (0: none) and their side in pixels.
    pub cutout_holes: i64,
    pub cutout_length: i64,
    /// Examples held out of the training set for validation (seeded), 0 for none.
    pub validation_size: usize,
    /// Aim at this many classes per training batch (0: plain shuffling).
    pub classes_per_batch: usize,
    pub drop_last: bool,
    /// CIFAR-100: `fine` (100 classes, default) or `coarse` (20).
    pub cifar100_labels: Cifar100Labels,
    /// SVHN: add `extra_32x32.mat` to the training set.
    pub svhn_extra: bool,
    /// Image folder: side to which images are resized, and channels (1 or 3).
    pub image_size: i64,
    pub image_channels: i64,
    /// Batches prepared ahead of training.
    pub prefetch: usize,
    /// Bound in MiB on the batches prepared ahead (float32 pixels): fewer than `prefetch`
    /// are kept when they would not fit.
    pub prefetch_mib: usize,
    /// Image folder: read and decode images as batches need them, not all at the start.
    pub stream: bool,
    /// Streamed sets: decode threads (0: the cores the stages leave free).
    pub workers: usize,
    /// Streamed sets: a WebDataset-style shuffle buffer of this many examples over the
    /// shards (or files) in a shuffled order; 0: a full shuffle by index.
    pub shuffle_buffer: usize,
    /// Streamed sets: ImageNet's augmentation: random resized crop for training, resize
    /// and centre crop for evaluation (else images are resized to `image_size` whole).
    pub random_resized_crop: bool,
    /// Random resized crop: range of the crop's area, as a fraction of the image's.
    pub crop_scale: [f64; 2],
    /// Random resized crop: range of the crop's width / height.
    pub crop_ratio: [f64; 2],
    /// Evaluation with random resized crop: the shorter side is resized to
    /// `image_size * eval_resize`, then the centre `image_size` square is taken.
    pub eval_resize: f64,
    /// Image folder or shards: the number of classes, checked against the data when it is
    /// read (lets a config validate without its data); read from the data when absent.
    pub classes: Option<usize>,
    /// Streamed sets: skip an unreadable image (logged, counted in the epoch's metrics)
    /// instead of failing the run.
    pub skip_bad: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cifar100Labels {
    Fine,
    Coarse,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::FashionMnist,
            root: None,
            mean: None,
            std: None,
            crop_padding: None,
            flip: None,
            cutout_holes: 0,
            cutout_length: 0,
            validation_size: 0,
            classes_per_batch: 0,
            drop_last: false,
            cifar100_labels: Cifar100Labels::Fine,
            svhn_extra: false,
            image_size: 32,
            image_channels: 3,
            prefetch: 4,
            prefetch_mib: 1024,
            stream: false,
            workers: 0,
            shuffle_buffer: 0,
            random_resized_crop: false,
            crop_scale: [0.08, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            eval_resize: 256.0 / 224.0,
            skip_bad: false,
            classes: None,
        }
    }
}

impl DataConfig {
    /// (channels, height = width) of the data set's images, known without reading it.
    pub fn input_shape(&self) -> (i64, i64) {
        match self.dataset {
            DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Kmnist => (1, 28),
            DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::Svhn => (3, 32),
            DatasetKind::Stl10 => (3, 96),
            DatasetKind::ImageFolder | DatasetKind::WebDataset => (self.image_channels, self.image_size),
        }
    }

    pub fn num_classes(&self) -> Option<i64> {
        Some(match self.dataset {
            DatasetKind::Cifar100 if self.cifar100_labels == Cifar100Labels::Coarse => 20,
            DatasetKind::Cifar100 => 100,
            DatasetKind::ImageFolder | DatasetKind::WebDataset => return self.classes.map(|n| n as i64),
            _ => 10,
        })
    }

    /// Checks, without reading them, that the data set's files are where the config says;
    /// the error names the first missing one.
    pub fn check_files(&self) -> crate::Result<()> {
        let root = self.existing_root()?;
        let names: Vec<Vec<String>> = match self.dataset {
            DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Kmnist => [
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ]
            .iter()
            .map(|n| vec![format!("{n}.gz"), n.to_string()])
            .collect(),
            DatasetKind::Cifar10 => (1..=5)
                .map(|i| format!("data_batch_{i}.bin"))
                .chain(["test_batch.bin".to_string()])
                .map(|n| vec![n])
                .collect(),
            DatasetKind::Cifar100 => vec![vec!["train.bin".into()], vec!["test.bin".into()]],
            DatasetKind::Svhn => {
                let mut v = vec![vec!["train_32x32.mat".to_string()], vec!["test_32x32.mat".to_string()]];
                if self.svhn_extra {
                    v.push(vec!["extra_32x32.mat".into()]);
                }
                v
            }
            DatasetKind::Stl10 => {
                ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"].iter().map(|n| vec![n.to_string()]).collect()
            }
            DatasetKind::ImageFolder | DatasetKind::WebDataset => {
                vec![vec!["train".into()], vec!["test".into(), "val".into()]]
            }
        };
        for alternatives in names {
            if !alternatives.iter().any(|n| root.join(n).exists()) {
                return Err(crate::DataError::file(
                    root.join(&alternatives[0]),
                    format!("missing: {:?} needs {}", self.dataset, alternatives.join(" or ")),
                ));
            }
        }
        Ok(())
    }

    /// The data root, which must be a folder: the error names it and the layout it needs.
    pub fn existing_root(&self) -> crate::Result<PathBuf> {
        let root = self.root();
        if !root.is_dir() {
            return Err(crate::DataError::file(
                &root,
                format!("data root of {:?} not found: expected {}", self.dataset, self.dataset.layout()),
            ));
        }
        Ok(root)
    }

    pub fn root(&self) -> PathBuf {
        self.root.clone().unwrap_or_else(|| self.dataset.default_root())
    }

    pub fn crop_padding(&self) -> i64 {
        self.crop_padding.unwrap_or(self.dataset.default_augmentation().0)
    }

    /// Bytes of a batch of `batch` images as float32, as the loader keeps it.
    pub fn batch_bytes(&self, batch: usize) -> u64 {
        let (c, s) = self.input_shape();
        batch as u64 * (c * s * s) as u64 * 4
    }

    /// Training batches (of `batch` images) kept ready: `prefetch`, fewer where they would
    /// pass `prefetch_mib` (the plan refuses a single batch above it), at least one.
    pub fn prefetch_batches(&self, batch: usize) -> usize {
        let fit = ((self.prefetch_mib as u64) << 20) / self.batch_bytes(batch).max(1);
        self.prefetch.min(fit as usize).max(1)
    }

    /// Whether images are read as batches need them.
    pub fn streamed(&self) -> bool {
        self.dataset == DatasetKind::WebDataset || (self.dataset == DatasetKind::ImageFolder && self.stream)
    }

    /// Horizontal flip: the recipe's, or on with a random resized crop (ImageNet's recipe).
    pub fn flip(&self) -> bool {
        self.flip.unwrap_or(self.random_resized_crop || self.dataset.default_augmentation().1)
    }
}
