//! Checks of a config's `data` keys that concern streaming: each key in its range, keys
//! that only a streamed set reads refused elsewhere, and a batch that cannot fit in the
//! prefetch bound refused with its size.

use layerwise_data::examples::MAX_WORKERS;
use layerwise_data::DataConfig;

use crate::{Error, Result};

/// Largest `data.prefetch_mib`: 1 TiB.
pub const PREFETCH_MIB: usize = 1 << 20;
/// Largest `data.shuffle_buffer`, in examples.
pub const SHUFFLE_BUFFER: usize = 1 << 24;

fn bad(key: &str, what: impl std::fmt::Display) -> Error {
    Error::Config(format!("{key}: {what}"))
}

fn range(key: &str, v: [f64; 2], lo: f64, hi: f64) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) && lo < v[0] && v[0] <= v[1] && v[1] <= hi {
        return Ok(());
    }
    Err(bad(key, format!("expected [low, high] with {lo} < low <= high <= {hi}, got {v:?}")))
}

/// `batch` is train.batch_size; `eval_batch` the evaluation's.
pub fn check(d: &DataConfig, batch: usize, eval_batch: usize) -> Result<()> {
    if d.workers > MAX_WORKERS {
        return Err(bad("data.workers", format!("expected 0 (automatic) to {MAX_WORKERS} threads, got {}", d.workers)));
    }
    if !(1..=PREFETCH_MIB).contains(&d.prefetch_mib) {
        return Err(bad("data.prefetch_mib", format!("expected 1..={PREFETCH_MIB} MiB, got {}", d.prefetch_mib)));
    }
    if d.shuffle_buffer > SHUFFLE_BUFFER {
        return Err(bad(
            "data.shuffle_buffer",
            format!("expected at most {SHUFFLE_BUFFER} examples, got {}", d.shuffle_buffer),
        ));
    }
    if let Some(k) = d.classes {
        if !(2..=1 << 16).contains(&k) || !d.dataset.can_stream() {
            return Err(bad(
                "data.classes",
                format!("expected 2..=65536 classes of an image-folder or webdataset, got {k} for {:?}", d.dataset),
            ));
        }
    }
    range("data.crop_scale", d.crop_scale, 0.0, 1.0)?;
    range("data.crop_ratio", d.crop_ratio, 0.0, 100.0)?;
    if !(1.0..=4.0).contains(&d.eval_resize) {
        return Err(bad(
            "data.eval_resize",
            format!("expected 1.0 to 4.0 (the shorter side over the crop), got {}", d.eval_resize),
        ));
    }
    if d.stream && d.dataset != layerwise_data::DatasetKind::ImageFolder {
        return Err(bad(
            "data.stream",
            format!(
                "only an image-folder is streamed on request; {:?} is read into memory (webdataset always streams)",
                d.dataset
            ),
        ));
    }
    let streamed_only = [
        ("data.workers", d.workers > 0),
        ("data.shuffle_buffer", d.shuffle_buffer > 0),
        ("data.random_resized_crop", d.random_resized_crop),
        ("data.skip_bad", d.skip_bad),
    ];
    if let Some((key, _)) = streamed_only.iter().find(|(_, set)| *set && !d.streamed()) {
        return Err(bad(key, format!("applies to streamed sets only (webdataset, or image-folder with data.stream); {:?} is read into memory", d.dataset)));
    }
    if d.shuffle_buffer > 0 && d.classes_per_batch > 0 {
        return Err(bad(
            "data.shuffle_buffer",
            "cannot be combined with data.classes_per_batch (it needs every example at hand)",
        ));
    }
    let (c, s) = d.input_shape();
    for (key, b) in [("train.batch_size", batch), ("train.eval_batch_size", eval_batch)] {
        let mib = d.batch_bytes(b) as f64 / (1 << 20) as f64;
        if mib > d.prefetch_mib as f64 {
            return Err(bad(
                "data.prefetch_mib",
                format!("one batch of {b} images ({key}) of {c}x{s}x{s} is {mib:.0} MiB as float32, more than the {} MiB bound: raise data.prefetch_mib or lower {key}", d.prefetch_mib),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_data::DatasetKind;

    fn err(edit: impl Fn(&mut DataConfig)) -> String {
        let mut d = DataConfig { dataset: DatasetKind::WebDataset, ..Default::default() };
        edit(&mut d);
        check(&d, 64, 64).unwrap_err().to_string()
    }

    #[test]
    fn each_streaming_key_is_checked_naming_it() {
        assert!(check(&DataConfig { dataset: DatasetKind::WebDataset, ..Default::default() }, 64, 64).is_ok());
        assert!(err(|d| d.workers = 257).contains("data.workers"));
        assert!(err(|d| d.prefetch_mib = 0).contains("data.prefetch_mib"));
        assert!(err(|d| d.shuffle_buffer = SHUFFLE_BUFFER + 1).contains("data.shuffle_buffer"));
        assert!(err(|d| d.crop_scale = [0.5, 0.2]).contains("data.crop_scale"));
        assert!(err(|d| d.crop_ratio = [0.0, 1.0]).contains("data.crop_ratio"));
        assert!(err(|d| d.crop_scale = [f64::NAN, 1.0]).contains("data.crop_scale"));
        assert!(err(|d| d.eval_resize = 0.5).contains("data.eval_resize"));
        let e = err(|d| {
            d.shuffle_buffer = 10;
            d.classes_per_batch = 2
        });
        assert!(e.contains("data.shuffle_buffer") && e.contains("classes_per_batch"), "{e}");
        let e = err(|d| {
            d.dataset = DatasetKind::Cifar10;
            d.skip_bad = true
        });
        assert!(e.contains("data.skip_bad") && e.contains("streamed sets only"), "{e}");
        assert!(err(|d| {
            d.dataset = DatasetKind::Mnist;
            d.stream = true
        })
        .contains("data.stream"));
    }

    #[test]
    fn a_batch_larger_than_the_prefetch_bound_is_refused_with_its_size() {
        let e = err(|d| {
            d.image_size = 224;
            d.prefetch_mib = 16
        });
        // 64 x 3 x 224 x 224 x 4 bytes = 36.75 MiB
        assert!(e.contains("37 MiB") && e.contains("16 MiB") && e.contains("train.batch_size"), "{e}");
    }
}
