//! `layerwise bench`: figures, printed, never asserted. `bench data` measures how fast the
//! loader makes training batches (augmentation included) on one thread, for a config's data
//! set and for CIFAR-shaped data; compare with training's images/s, which it must exceed
//! many times over for data never to limit training.

use std::path::Path;
use std::time::Instant;

use layerwise_data::batches::{BatchSource, Sampler, Transform};
use layerwise_data::dataset::{self, Dataset};
use layerwise_data::{DataConfig, DatasetKind};
use layerwise_engine::config::Placement;
use layerwise_engine::{PipelineMode, RunConfig, RunOptions};
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
    layerwise_engine::set_thread_count(1);
    let cfg = match config {
        Some(p) => RunConfig::load(p, &[])?,
        None => RunConfig::default(),
    };
    let sampler = Sampler { batch_size: cfg.train.batch_size, drop_last: false, classes_per_batch: 0, seed: 1 };
    let splits = dataset::load(&cfg.data)?;
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

/// Training throughput of a config, sequential (one stage, one thread of work per layer
/// after layer) and pipelined under the config's placement and under one stage per layer:
/// images/s of the measured epoch (the first, shorter one warms up).
pub fn train(config: &Path, steps: usize, overrides: &[String]) -> anyhow::Result<()> {
    let base = RunConfig::load(config, overrides)?;
    let mut runs = vec![("sequential", PipelineMode::Sequential, Placement::Named("single".into()))];
    runs.push(("pipelined", PipelineMode::Pipelined, base.pipeline.placement.clone()));
    if base.pipeline.placement != Placement::Named("per_layer".into()) {
        runs.push(("pipelined", PipelineMode::Pipelined, Placement::Named("per_layer".into())));
    }
    let mut first = None;
    println!("{:<12} {:<36} {:>8} {:>12} {:>9}", "mode", "placement", "stages", "images/s", "vs first");
    for (name, mode, placement) in runs {
        let mut c = base.clone();
        c.pipeline.mode = mode;
        c.pipeline.placement = placement.clone();
        c.train.epochs = 2;
        c.train.steps_per_epoch = Some(steps);
        c.train.eval_batches = Some(1);
        c.checkpoint.every_epochs = 0;
        c.checkpoint.every_steps = 0;
        let dir = tempfile::tempdir()?;
        let summary = layerwise_engine::run(&c, dir.path(), RunOptions::default())?;
        let ips = summary.epochs.last().map_or(0.0, |e| e.images_per_sec);
        let base_ips = *first.get_or_insert(ips);
        let placement = serde_json::to_string(&placement)?;
        println!("{name:<12} {placement:<36} {:>8} {ips:>12.0} {:>8.2}x", summary.plan.len(), ips / base_ips);
    }
    Ok(())
}
