//! `bench data`: how fast the loader makes training batches (augmentation included): on one
//! thread for a config's data set and for CIFAR-shaped data; and for a streamed JPEG set
//! (decode + random resized crop + flip + normalisation), as an image folder and as tar
//! shards, with 1, 2 and all decode threads, with the peak resident memory of each. Compare
//! with training's images/s, which the loader must exceed for data never to limit training.

use std::path::Path;
use std::time::Instant;

use layerwise_data::batches::{BatchSource, Sampler, Transform};
use layerwise_data::Dataset;
use layerwise_data::{examples, synthetic, DataConfig, DatasetKind};
use layerwise_pipeline::thread::set_thread_count;
use layerwise_plan::RunConfig;
use tch::{Kind, Tensor};

/// Times `batches` training batches of epoch 1 (after one of epoch 2 as a warm-up).
fn time(source: &mut BatchSource, batches: usize) -> anyhow::Result<(i64, f64)> {
    let n = batches.min(source.batches_per_epoch());
    source.batch(2, 0)?;
    let start = Instant::now();
    let mut images = 0;
    for i in 0..n {
        images += source.batch(1, i)?.labels.size()[0];
    }
    Ok((images, start.elapsed().as_secs_f64()))
}

fn measure(name: &str, mut source: BatchSource, batches: usize) -> anyhow::Result<()> {
    let (images, secs) = time(&mut source, batches)?;
    println!("{name:<48} {:>10.0} images/s  ({images} images in {secs:.2} s, 1 thread)", images as f64 / secs);
    Ok(())
}

/// `streamed`: the streamed set's folder, how many images to make there, crop side.
pub fn data(config: Option<&Path>, batches: usize, streamed: (Option<&Path>, usize, u32)) -> anyhow::Result<()> {
    set_thread_count(1);
    let cfg = match config {
        Some(p) => RunConfig::load(p, &[])?,
        None => RunConfig::default(),
    };
    let sampler = Sampler {
        batch_size: cfg.train.batch_size,
        drop_last: false,
        classes_per_batch: 0,
        seed: 1,
        shuffle_buffer: 0,
    };
    let splits = layerwise_data::load(&cfg.data)?;
    let (channels, size, _) = splits.train.image_shape();
    let transform = Transform::from_config(&cfg.data, channels, size)?;
    let label = format!(
        "{:?} (crop {}, flip {}, cutout {}x{})",
        cfg.data.dataset, transform.crop_padding, transform.flip, transform.cutout_holes, transform.cutout_length
    );
    measure(&label, BatchSource::training(splits.train, transform, sampler.clone()), batches)?;

    // CIFAR-shaped: 50,000 random 3x32x32 images with the CIFAR recipe and cutout.
    let cifar = DataConfig { dataset: DatasetKind::Cifar10, cutout_holes: 1, cutout_length: 16, ..Default::default() };
    let images = Tensor::randint(256, [50_000, 3, 32, 32], (Kind::Uint8, tch::Device::Cpu));
    let labels = Tensor::randint(10, [50_000], (Kind::Int64, tch::Device::Cpu));
    let set = Dataset { images, labels, num_classes: 10 };
    measure(
        "CIFAR-shaped (crop 4, flip, cutout 1x16)",
        BatchSource::training(set, Transform::from_config(&cifar, 3, 32)?, sampler),
        batches,
    )?;
    self::streamed(streamed.0, streamed.1, streamed.2)
}

/// Resets the kernel's peak-resident-memory mark of this process (Linux `clear_refs`).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A line of /proc/self/status in MiB: `VmHWM:` (peak resident since the last reset) or `VmRSS:`.
fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok());
    kib.unwrap_or(f64::NAN) / 1024.0
}

/// The streamed part of `bench data`: `dir` (made when it has no `train/`) as an image
/// folder and as shards, training batches of 64 at `size` px with ImageNet's augmentation.
pub fn streamed(dir: Option<&Path>, count: usize, size: u32) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = dir.map_or_else(|| tmp.path().to_path_buf(), Path::to_path_buf);
    let shards = root.join("shards");
    if !root.join("train").is_dir() {
        let classes = 8.min(count.max(1));
        let made = Instant::now();
        let per_class = count.div_ceil(classes);
        synthetic::write_folder(&root.join("train"), classes, per_class, (500, 375), "jpg", 7)?;
        synthetic::write_folder(&root.join("test"), classes, per_class.div_ceil(10), (500, 375), "jpg", 8)?;
        let names: Vec<String> = (0..classes).map(|c| format!("class{c:03}")).collect();
        for split in ["train", "test"] {
            synthetic::pack(&root.join(split), &names, &shards.join(split), 128)?;
        }
        println!(
            "made {} 500x375 JPEGs in {} ({:.1} s)",
            classes * (per_class + per_class.div_ceil(10)),
            root.display(),
            made.elapsed().as_secs_f64()
        );
    }
    let bytes: u64 = walk_bytes(&root.join("train"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1, 2, cores];
    threads.dedup();
    for (format, dataset, at) in
        [("image folder", DatasetKind::ImageFolder, &root), ("tar shards", DatasetKind::WebDataset, &shards)]
    {
        if !at.join("train").is_dir() {
            continue;
        }
        for &t in &threads {
            let cfg = DataConfig {
                dataset,
                root: Some(at.clone()),
                stream: true,
                random_resized_crop: true,
                image_size: size as i64,
                mean: Some(vec![0.485, 0.456, 0.406]),
                std: Some(vec![0.229, 0.224, 0.225]),
                ..Default::default()
            };
            reset_peak();
            let before = status_mib("VmRSS:");
            let sets = examples::open(&cfg, t)?;
            let n = sets.train.len();
            let transform = Transform::from_config(&cfg, 3, size as i64)?;
            let sampler =
                Sampler { batch_size: 64, drop_last: false, classes_per_batch: 0, seed: 1, shuffle_buffer: 0 };
            let mut source = BatchSource::training(sets.train, transform, sampler);
            let (images, secs) = time(&mut source, usize::MAX)?;
            println!(
                "{format:<13} JPEG -> random resized crop {size} px, {t:>2} thread(s): {:>7.0} images/s ({:.0} per thread; {images} images, {:.0} KB each on average, in {secs:.2} s), peak RSS {:.0} MiB (+{:.0} over the {before:.0} before)",
                images as f64 / secs,
                images as f64 / secs / t as f64,
                bytes as f64 / n as f64 / 1000.0,
                status_mib("VmHWM:"),
                status_mib("VmHWM:") - before
            );
        }
    }
    Ok(())
}

fn walk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}
