//! `bench data`: how fast the loader makes training batches (augmentation included) on one
//! thread, for a config's data set and for CIFAR-shaped data; compare with training's
//! images/s, which it must exceed many times over for data never to limit training.

use std::path::Path;
use std::time::Instant;

use layerwise_data::batches::{BatchSource, Sampler, Transform};
use layerwise_data::Dataset;
use layerwise_data::{DataConfig, DatasetKind};
use layerwise_pipeline::thread::set_thread_count;
use layerwise_plan::RunConfig;
use tch::{Kind, Tensor};

fn measure(name: &str, mut source: BatchSource, batches: usize) {
    let n = batches.min(source.batches_per_epoch());
    let _ = source.batch(1, 0); // warm-up: builds the epoch's order
    let start = Instant::now();
    let mut images = 0;
    for i in 0..n {
        images += source.batch(1, i).labels.size()[0];
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{name:<48} {:>10.0} images/s  ({images} images in {secs:.2} s, 1 thread)", images as f64 / secs);
}

pub fn data(config: Option<&Path>, batches: usize) -> anyhow::Result<()> {
    set_thread_count(1);
    let cfg = match config {
        Some(p) => RunConfig::load(p, &[])?,
        None => RunConfig::default(),
    };
    let sampler = Sampler { batch_size: cfg.train.batch_size, drop_last: false, classes_per_batch: 0, seed: 1 };
    let splits = layerwise_data::load(&cfg.data)?;
    let (channels, size, _) = splits.train.image_shape();
    let transform = Transform::from_config(&cfg.data, channels, size)?;
    let label = format!(
        "{:?} (crop {}, flip {}, cutout {}x{})",
        cfg.data.dataset, transform.crop_padding, transform.flip, transform.cutout_holes, transform.cutout_length
    );
    measure(&label, BatchSource::training(splits.train, transform, sampler.clone()), batches);

    // CIFAR-shaped: 50,000 random 3x32x32 images with the CIFAR recipe and cutout.
    let cifar = DataConfig { dataset: DatasetKind::Cifar10, cutout_holes: 1, cutout_length: 16, ..Default::default() };
    let images = Tensor::randint(256, [50_000, 3, 32, 32], (Kind::Uint8, tch::Device::Cpu));
    let labels = Tensor::randint(10, [50_000], (Kind::Int64, tch::Device::Cpu));
    let set = Dataset { images, labels, num_classes: 10 };
    measure(
        "CIFAR-shaped (crop 4, flip, cutout 1x16)",
        BatchSource::training(set, Transform::from_config(&cifar, 3, 32)?, sampler),
        batches,
    );
    Ok(())
}
