//! TensorBoard's event files beside `metrics.jsonl`: the same figures, one scalar per tag
//! and epoch (the step TensorBoard plots against), so that `tensorboard --logdir runs/`
//! shows every run. A file is TFRecord framing (a length, a masked CRC-32C of it, the
//! bytes, a masked CRC-32C of them) around `Event` protocol buffers, encoded with `prost`
//! from the few fields of TensorBoard's `event.proto` and `summary.proto` used here; the
//! CRC is the `crc32c` crate's.
//!
//! The file follows `metrics.jsonl`: each epoch's line appends its scalars; when the lines
//! are rewritten (a resume drops the epochs after its checkpoint) the file is written
//! anew under a new name and the old one removed, so TensorBoard never shows an epoch
//! twice.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::metrics::EpochMetrics;
use crate::{Error, Result};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    /// One of the `what` oneof: the file's first record.
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    /// The other member of `what` used here.
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    /// A member of TensorFlow's `oneof value`: always written, 0 included (a plain proto3
    /// float of 0 is left off the wire, and TensorBoard then sees no scalar at all).
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

const PREFIX: &str = "events.out.tfevents.";

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the bytes, their masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked(crc32c::crc32c(&len)).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked(crc32c::crc32c(data)).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The scalars of one epoch, tagged as TensorBoard groups them (`error/train`, ...).
fn scalars(m: &EpochMetrics) -> Vec<Value> {
    let mut v = vec![
        ("error/train", m.train_error),
        ("error/test", m.test_error),
        ("loss/train", m.train_loss),
        ("loss/test", m.test_loss),
        ("lr", m.lr),
        ("images_per_sec", m.images_per_sec),
        ("seconds/epoch", m.epoch_seconds),
        ("data/wait_seconds", m.data_wait_s),
        ("data/skipped_images", m.skipped_images as f64),
    ];
    if let Some(e) = m.validation_error {
        v.push(("error/validation", e));
    }
    let mut values: Vec<Value> =
        v.into_iter().map(|(t, x)| Value { tag: t.into(), simple_value: Some(x as f32) }).collect();
    for l in &m.layers {
        let mut add = |what: &str, x: f64| {
            values.push(Value { tag: format!("layer{}/{what}", l.layer), simple_value: Some(x as f32) });
        };
        add("loss_pred", l.loss_pred);
        add("loss_sim", l.loss_sim);
        if let Some(e) = l.error {
            add("error", e);
        }
    }
    for s in &m.stages {
        values.push(Value { tag: format!("stage{}/utilisation", s.stage), simple_value: Some(s.utilisation as f32) });
    }
    values
}

fn epoch_record(m: &EpochMetrics) -> Vec<u8> {
    let event = Event {
        wall_time: now(),
        step: m.epoch as i64,
        file_version: None,
        summary: Some(Summary { value: scalars(m) }),
    };
    record(&prost::Message::encode_to_vec(&event))
}

fn header() -> Vec<u8> {
    let event = Event { wall_time: now(), step: 0, file_version: Some("brain.Event:2".into()), summary: None };
    record(&prost::Message::encode_to_vec(&event))
}

/// The run's event files, oldest name first.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Appends one epoch's scalars to the run's event file (made, with its header, if there
/// is none yet).
pub fn append(dir: &Path, m: &EpochMetrics) -> Result<()> {
    let (path, fresh) = match event_files(dir).pop() {
        Some(p) => (p, false),
        None => (dir.join(format!("{PREFIX}{}.layerwise", now() as u64)), true),
    };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
    let mut bytes = if fresh { header() } else { Vec::new() };
    bytes.extend(epoch_record(m));
    f.write_all(&bytes).map_err(|e| Error::io(&path, e))
}

/// Writes the event file anew from `lines` (a new name, the old files removed).
pub fn rewrite(dir: &Path, lines: &[EpochMetrics]) -> Result<()> {
    let old = event_files(dir);
    // A name after every old one, so that TensorBoard reads the new file last.
    let stamp = old
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix(PREFIX)?.split('.').next()?.parse::<u64>().ok())
        .max()
        .map_or(now() as u64, |t| t.max(now() as u64) + 1);
    let path = dir.join(format!("{PREFIX}{stamp}.layerwise"));
    let mut bytes = header();
    lines.iter().for_each(|m| bytes.extend(epoch_record(m)));
    crate::atomic::write_atomic(&path, &bytes)?;
    for p in old {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TFRecord's framing: the length, its CRC-32C masked by the published formula (written
    /// out here with shifts, independently of the module's rotate), the bytes, their CRC.
    #[test]
    #[allow(clippy::manual_rotate)]
    fn a_record_is_framed_with_masked_crcs_of_its_length_and_bytes() {
        // CRC-32C check value from RFC 3720 (iSCSI): "123456789" -> 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        let crc = crc32c::crc32c(&3u64.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            ((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8)
        );
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
    }
}
