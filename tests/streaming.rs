//! Streamed data: an image folder read lazily and the same images packed into WebDataset
//! shards, decoded on several threads. A batch is the same whatever the thread count, the
//! format, or a resume; training on the folder and on the shards ends with the same
//! weights; bad data is named, or skipped and counted.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use layerwise_data::batches::{BatchSource, Sampler, Transform};
use layerwise_data::{examples, shards, synthetic, DataConfig, DatasetKind, Examples};
use layerwise_tests::{assert_same_run, run_in_temp, small_run_config};

/// 2,000 training images (1,600 JPEGs and 400 PNGs of 40x32, four classes) and 200 test
/// images, as a folder (`root/`) and as shards of 128 (`root/shards/`). Made once, in
/// cargo's temporary folder for tests, and kept for the next run (`done` is written last;
/// the tests only read them).
fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let r = Path::new(env!("CARGO_TARGET_TMPDIR")).join("streaming-images-1");
        if r.join("done").is_file() {
            return r;
        }
        let _ = std::fs::remove_dir_all(&r);
        synthetic::write_folder(&r.join("train"), 4, 400, (40, 32), "jpg", 1).unwrap();
        synthetic::write_folder(&r.join("train"), 4, 100, (40, 32), "png", 2).unwrap();
        synthetic::write_folder(&r.join("test"), 4, 50, (40, 32), "jpg", 3).unwrap();
        let classes: Vec<String> = (0..4).map(|c| format!("class{c:03}")).collect();
        for split in ["train", "test"] {
            synthetic::pack(&r.join(split), &classes, &r.join("shards").join(split), 128).unwrap();
        }
        std::fs::write(r.join("done"), "").unwrap();
        r
    })
}

fn streamed(dataset: DatasetKind, root: &Path) -> DataConfig {
    DataConfig {
        dataset,
        root: Some(root.to_path_buf()),
        stream: dataset == DatasetKind::ImageFolder,
        image_size: 24,
        random_resized_crop: true,
        ..Default::default()
    }
}

fn source(cfg: &DataConfig, threads: usize, shuffle_buffer: usize) -> BatchSource {
    let sets = examples::open(cfg, threads).unwrap();
    let transform = Transform::from_config(cfg, 3, 24).unwrap();
    let sampler = Sampler { batch_size: 100, drop_last: false, classes_per_batch: 0, seed: 5, shuffle_buffer };
    BatchSource::training(sets.train, transform, sampler)
}

/// Epoch 1 whole and the first batches of epoch 2, as (images, labels).
type Batches = Vec<(tch::Tensor, tch::Tensor)>;

fn batches(mut s: BatchSource) -> Batches {
    let n = s.batches_per_epoch();
    assert_eq!(n, 20);
    let order = (0..n).map(|i| (1, i)).chain((0..3).map(|i| (2, i)));
    order.map(|(e, i)| s.batch(e, i).unwrap()).map(|b| (b.images, b.labels)).collect()
}

fn assert_same(a: &[(tch::Tensor, tch::Tensor)], b: &[(tch::Tensor, tch::Tensor)], what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, ((ia, la), (ib, lb))) in a.iter().zip(b).enumerate() {
        assert!(ia.equal(ib) && la.equal(lb), "{what}: batch {k} differs");
    }
}

#[test]
fn a_batch_is_the_same_whatever_the_threads_the_format_or_a_resume() {
    let r = images();
    let folder = streamed(DatasetKind::ImageFolder, r);
    let tars = streamed(DatasetKind::WebDataset, &r.join("shards"));
    for buffer in [0, 300] {
        let reference = batches(source(&folder, 1, buffer));
        let (images, labels) = &reference[0];
        assert_eq!(images.size(), [100, 3, 24, 24]);
        assert_eq!(images.kind(), tch::Kind::Float);
        assert!(!reference[0].0.equal(&reference[20].0), "epochs draw other batches");
        let mut all: Vec<i64> = reference[..20].iter().flat_map(|b| Vec::<i64>::try_from(&b.1).unwrap()).collect();
        all.sort();
        assert_eq!(all, (0..2000).map(|i| i / 500).collect::<Vec<i64>>(), "every image once per epoch");
        assert!(labels.size() == [100]);
        for threads in [2, 5] {
            let f = batches(source(&folder, threads, buffer));
            assert_same(&reference, &f, &format!("folder, {threads} threads, buffer {buffer}"));
        }
        // a full shuffle draws the same order from both; a shuffle buffer reads shards (of
        // 128) where the folder has classes (of 500), so its order is the format's own
        let tars_reference = if buffer == 0 {
            reference.iter().map(|(a, b)| (a.shallow_clone(), b.shallow_clone())).collect()
        } else {
            batches(source(&tars, 1, buffer))
        };
        for threads in [1, 3] {
            let t = batches(source(&tars, threads, buffer));
            assert_same(&tars_reference, &t, &format!("shards, {threads} threads, buffer {buffer}"));
        }
        // a resumed run asks for batch 3 of epoch 2 first
        let mut resumed = source(&tars, 2, buffer);
        let b = resumed.batch(2, 2).unwrap();
        assert!(b.images.equal(&tars_reference[22].0) && b.labels.equal(&tars_reference[22].1), "resumed at (2, 2)");
    }
    // with a batch-wide augmentation between decode and normalisation (crop padding, cutout)
    let padded = DataConfig { crop_padding: Some(2), cutout_holes: 1, cutout_length: 4, ..folder.clone() };
    assert_same(&batches(source(&padded, 1, 0)), &batches(source(&padded, 3, 0)), "crop padding and cutout");
}

fn run_config(dataset: DatasetKind, root: &Path) -> layerwise_plan::RunConfig {
    let mut c = small_run_config(root, "mlp");
    c.data = DataConfig { workers: 2, validation_size: 100, ..streamed(dataset, root) };
    c.data.image_size = 16;
    c.train.steps_per_epoch = Some(6);
    c
}

#[test]
fn training_on_the_folder_and_on_its_shards_ends_the_same_and_resumes_exactly() {
    let r = images();
    let folder = run_in_temp(&run_config(DatasetKind::ImageFolder, r));
    let tars = run_in_temp(&run_config(DatasetKind::WebDataset, &r.join("shards")));
    assert_same_run(&folder, &tars, "folder and shards of the same images");

    // stopped mid-epoch 1 with a checkpoint, then resumed with other thread counts
    let mut cfg = run_config(DatasetKind::WebDataset, &r.join("shards"));
    cfg.data.shuffle_buffer = 256;
    let whole = run_in_temp(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let stop = layerwise_coordinator::RunOptions { stop_after_step: Some(4), ..Default::default() };
    layerwise_coordinator::run(&cfg, dir.path(), stop).unwrap();
    cfg.data.workers = 3;
    let resume = layerwise_coordinator::RunOptions { resume: true, ..Default::default() };
    let resumed = layerwise_coordinator::run(&cfg, dir.path(), resume).unwrap();
    assert_same_run(&whole, &resumed, "stopped at step 4 of 6 and resumed with 3 threads");
}

/// A copy of a few of the images: 3 classes of 8 JPEGs, and 4 test images.
fn small_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("data");
    synthetic::write_folder(&r.join("train"), 3, 8, (20, 20), "jpg", 4).unwrap();
    synthetic::write_folder(&r.join("test"), 3, 2, (20, 20), "jpg", 5).unwrap();
    (dir, r)
}

fn first_error(cfg: &DataConfig) -> String {
    let sets = examples::open(cfg, 2).map_err(|e| e.to_string());
    let mut train = match sets {
        Err(e) => return e,
        Ok(s) => BatchSource::evaluation(s.train, Transform::from_config(cfg, 3, 16).unwrap(), 64),
    };
    train.batch(1, 0).map(|_| String::new()).unwrap_or_else(|e| e.to_string())
}

#[test]
fn a_damaged_or_vanished_image_or_an_empty_class_is_named_or_skipped_and_counted() {
    let (_dir, r) = small_copy();
    let cfg = DataConfig { image_size: 16, ..streamed(DatasetKind::ImageFolder, &r) };
    let broken = r.join("train/class001/img00003.jpg");
    let bytes = std::fs::read(&broken).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 3]).unwrap();
    let e = first_error(&cfg);
    assert!(e.contains("class001/img00003.jpg") && e.contains("cannot decode") && e.contains("data.skip_bad"), "{e}");

    // skipped: the batch holds the others, and says which one it left out
    let skip = DataConfig { skip_bad: true, ..cfg.clone() };
    let sets = examples::open(&skip, 2).unwrap();
    let mut all = BatchSource::evaluation(sets.train, Transform::from_config(&skip, 3, 16).unwrap(), 64);
    let b = all.batch(1, 0).unwrap();
    assert_eq!(b.labels.size(), [23]);
    assert_eq!(b.skipped.len(), 1);
    assert!(b.skipped[0].contains("img00003.jpg"), "{:?}", b.skipped);

    // a run with skip_bad counts it in each epoch's metrics (the whole epoch is trained)
    let mut run = small_run_config(&r, "mlp");
    run.data = DataConfig { workers: 1, ..skip.clone() };
    run.train.steps_per_epoch = None;
    run.train.batch_size = 8;
    let ran = run_in_temp(&run);
    assert_eq!(ran.epochs.iter().map(|e| e.skipped_images).collect::<Vec<_>>(), [1, 1]);

    // a file gone after indexing
    std::fs::write(&broken, &bytes).unwrap();
    let sets = examples::open(&cfg, 2).unwrap();
    std::fs::remove_file(r.join("train/class002/img00000.jpg")).unwrap();
    let mut all = BatchSource::evaluation(sets.train, Transform::from_config(&cfg, 3, 16).unwrap(), 64);
    let e = all.batch(1, 0).unwrap_err().to_string();
    assert!(e.contains("class002/img00000.jpg") && e.contains("cannot read"), "{e}");

    // an empty class folder: an error naming it, or a class without images
    for f in std::fs::read_dir(r.join("train/class002")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let e = first_error(&cfg);
    assert!(e.contains("class002") && e.contains("empty class folder"), "{e}");
    let sets = examples::open(&skip, 2).unwrap();
    assert_eq!((sets.train.len(), sets.train.num_classes()), (16, 3));
}

/// Bytes of a shard file of `dir`, and its path.
fn shard(dir: &Path, i: usize) -> (PathBuf, Vec<u8>) {
    let p = dir.join(format!("train/shard-{i:06}.tar"));
    let b = std::fs::read(&p).unwrap();
    (p, b)
}

#[test]
fn a_shard_cut_short_or_damaged_is_named_or_skipped() {
    let (dir, r) = small_copy();
    let out = dir.path().join("shards");
    let classes: Vec<String> = (0..3).map(|c| format!("class{c:03}")).collect();
    for split in ["train", "test"] {
        synthetic::pack(&r.join(split), &classes, &out.join(split), 10).unwrap();
    }
    let cfg = DataConfig { image_size: 16, ..streamed(DatasetKind::WebDataset, &out) };
    assert_eq!(examples::open(&cfg, 1).unwrap().train.len(), 24);

    // cut in the middle of a member: the shard and member are named
    let (p, bytes) = shard(&out, 1);
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = first_error(&cfg);
    assert!(e.contains("shard-000001.tar") && e.contains("cut short"), "{e}");
    let skip = DataConfig { skip_bad: true, ..cfg.clone() };
    let sets = examples::open(&skip, 1).unwrap();
    let Examples::Stream(s) = &sets.train else { panic!("streamed") };
    assert!(s.index().skipped.iter().any(|l| l.contains("shard-000001.tar")), "{:?}", s.index().skipped);
    assert!(sets.train.len() > 10 && sets.train.len() < 24, "{} samples kept", sets.train.len());

    // a header overwritten with noise
    std::fs::write(&p, &bytes).unwrap();
    let mut noisy = bytes.clone();
    noisy[1024..1536].iter_mut().enumerate().for_each(|(i, b)| *b = (i * 7 % 251) as u8);
    std::fs::write(&p, &noisy).unwrap();
    let e = first_error(&cfg);
    assert!(e.contains("shard-000001.tar"), "{e}");

    // a test label no training sample has
    std::fs::write(&p, &bytes).unwrap();
    assert!(first_error(&cfg).is_empty());
    let test = out.join("test");
    let mut tar = tar::Builder::new(Vec::new());
    let jpg = std::fs::read(r.join("test/class000/img00000.jpg")).unwrap();
    for (name, data) in [("x.jpg", jpg.as_slice()), ("x.cls", b"7".as_slice())] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }
    std::fs::write(test.join("shard-000009.tar"), tar.into_inner().unwrap()).unwrap();
    let e = first_error(&cfg);
    assert!(e.contains("shard-000009.tar") && e.contains("class 7 is not among the 3 training classes"), "{e}");
}

#[test]
fn the_index_is_cached_and_made_again_when_the_data_changes() {
    let (_dir, r) = small_copy();
    let cfg = DataConfig { image_size: 16, ..streamed(DatasetKind::ImageFolder, &r) };
    assert_eq!(examples::open(&cfg, 1).unwrap().train.len(), 24);
    let cache = r.join(".layerwise-index-train");
    let text = std::fs::read_to_string(&cache).unwrap();
    assert_eq!(text.lines().filter(|l| l.contains("img0")).count(), 24, "{text}");
    // a cache with a claim out of range is not trusted
    std::fs::write(&cache, text.replace("2\t0\t0\t0\tclass002", "9\t0\t0\t0\tclass002")).unwrap();
    let sets = examples::open(&cfg, 1).unwrap();
    assert_eq!(sets.train.labels().iter().filter(|l| **l == 2).count(), 8);
    // nor is one that points outside its class folder
    let escape = text.replace("class002/img00000.jpg", "class002/../../../../etc/hostname");
    std::fs::write(&cache, &escape).unwrap();
    let sets = examples::open(&cfg, 1).unwrap();
    let Examples::Stream(s) = &sets.train else { panic!("streamed") };
    assert!((0..s.len()).all(|i| !s.index().name(i).contains("..")), "the cache was re-made");
    assert!((0..s.len()).any(|i| s.index().name(i) == "class002/img00000.jpg"));
    // an image added: the folder's time changes, the index is made again
    synthetic::write_folder(&r.join("train"), 1, 9, (20, 20), "jpg", 6).unwrap();
    assert_eq!(examples::open(&cfg, 1).unwrap().train.len(), 25);
    // the shards' index names their classes for the plan without reading pixels
    let out = r.join("shards");
    let classes: Vec<String> = (0..3).map(|c| format!("class{c:03}")).collect();
    synthetic::pack(&r.join("train"), &classes, &out.join("train"), 7).unwrap();
    assert_eq!(shards::index(&out.join("train"), None, false).unwrap().classes.len(), 3);
}

#[test]
fn the_imagenet_recipes_validate_without_data_and_refuse_a_missing_or_wrong_folder() {
    for px in [64, 224] {
        let path = layerwise_tests::repo_root().join(format!("configs/imagenet-{px}-vgg11b-predsim.json"));
        let mut config = layerwise_plan::RunConfig::load(&path, &[]).unwrap();
        assert_eq!((config.data.image_size, config.data.classes), (px, Some(1000)));
        let plan = layerwise_plan::Plan::check(&config, false).unwrap();
        assert_eq!(plan.shape.num_classes, 1000);
        config.data.root = Some(PathBuf::from("/nonexistent/imagenet"));
        let e = layerwise_plan::Plan::check(&config, true).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/imagenet") && e.contains("train/<class>/*.jpg"), "{e}");
        // a folder of 4 classes is not ImageNet's 1000
        config.data.root = Some(images().to_path_buf());
        let plan = layerwise_plan::Plan::check(&config, true).unwrap();
        let e = layerwise_pipeline::loader::load(&plan).err().unwrap().to_string();
        assert!(e.contains("4 classes, expected 1000"), "{e}");
    }
}
