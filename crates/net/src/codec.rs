//! One pipeline message on a sealed connection: a JSON header (control, and each tensor's
//! type and shape), then each tensor's bytes in sealed records read straight into the
//! tensor's memory, or, for a tensor on a GPU on an NCCL link, an NCCL transfer. A header's
//! claims are checked against what the receiving stage can be sent before anything is
//! allocated.

use layerwise_nccl::Group;
use layerwise_pipeline::message::{Control, Message, Payload};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::seal::{SealReader, SealWriter};
use crate::wire::{WireError, WireResult};

#[derive(Serialize, Deserialize)]
struct TensorHeader {
    kind: String,
    shape: Vec<i64>,
    /// The bytes follow over the link's NCCL group, not the TCP stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    nccl: bool,
}

#[derive(Serialize, Deserialize)]
struct Header {
    control: Control,
    /// Input then labels, when the message carries a batch.
    tensors: Vec<TensorHeader>,
}

const KINDS: [(Kind, &str); 9] = [
    (Kind::Float, "f32"),
    (Kind::Double, "f64"),
    (Kind::Half, "f16"),
    (Kind::BFloat16, "bf16"),
    (Kind::Int64, "i64"),
    (Kind::Int, "i32"),
    (Kind::Int8, "i8"),
    (Kind::Uint8, "u8"),
    (Kind::Bool, "bool"),
];

fn kind_name(kind: Kind) -> WireResult<&'static str> {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, n)| *n)
        .ok_or_else(|| WireError::Garbage(format!("cannot send a tensor of {kind:?}")))
}

fn kind_of(name: &str) -> WireResult<Kind> {
    KINDS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(k, _)| *k)
        .ok_or_else(|| WireError::Garbage(format!("unknown tensor type {name:?}")))
}

/// A tensor's bytes as they lie in memory, on the host.
fn host_contiguous(t: &Tensor) -> Tensor {
    let t = if t.device() == Device::Cpu { t.shallow_clone() } else { t.to_device(Device::Cpu) };
    t.contiguous()
}

fn bytes_of(t: &Tensor) -> &[u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor (see host_contiguous) of `len` bytes, alive
    // and unchanged while the returned slice is borrowed from it.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// Ranks within a link's NCCL group.
pub const NCCL_SENDER: usize = 0;
pub const NCCL_RECEIVER: usize = 1;

/// Writes one message: header frame, then each tensor: its bytes on `w`, or, for a tensor
/// on a GPU when the link has an NCCL group, an NCCL send.
pub fn write_message(w: &mut SealWriter, msg: &Message, nccl: Option<&Group>) -> WireResult<()> {
    let tensors: Vec<(Tensor, bool)> = match &msg.payload {
        Some(p) => [&p.input, &p.labels]
            .into_iter()
            .map(|t| match nccl {
                Some(_) if t.device().is_cuda() => (t.contiguous(), true),
                _ => (host_contiguous(t), false),
            })
            .collect(),
        None => vec![],
    };
    let headers = tensors
        .iter()
        .map(|(t, nccl)| Ok(TensorHeader { kind: kind_name(t.kind())?.into(), shape: t.size(), nccl: *nccl }))
        .collect::<WireResult<Vec<_>>>()?;
    let header = serde_json::to_vec(&Header { control: msg.control, tensors: headers })
        .map_err(|e| WireError::Garbage(format!("cannot encode a header: {e}")))?;
    w.record(&header)?;
    if tensors.iter().any(|(_, over_nccl)| *over_nccl) {
        w.flush()?; // the receiver posts its NCCL receives once it has the header
    }
    for (t, over_nccl) in &tensors {
        match nccl {
            Some(group) if *over_nccl => group.send(t, NCCL_RECEIVER).map_err(WireError::Nccl)?,
            _ => w.bytes(bytes_of(t))?,
        }
    }
    w.flush()
}

/// Reads one message, checking the header's claims before allocating: its tensors hold at
/// most `limit` bytes together (what the receiving stage can be sent). Tensors marked as
/// sent over NCCL are received from `nccl`'s group into its device.
pub fn read_message(r: &mut SealReader, limit: u64, nccl: Option<(&Group, Device)>) -> WireResult<Message> {
    let header: Header = r.frame()?;
    let with_batch = matches!(header.control, Control::Train { .. } | Control::Eval { .. });
    if header.tensors.len() != if with_batch { 2 } else { 0 } {
        return Err(WireError::Garbage(format!(
            "a {:?} message with {} tensors",
            header.control,
            header.tensors.len()
        )));
    }
    let mut total = 0u64;
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for h in &header.tensors {
        let kind = kind_of(&h.kind)?;
        let numel = h.shape.iter().try_fold(1u64, |n, &d| u64::try_from(d).ok().and_then(|d| n.checked_mul(d)));
        let bytes = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        total = bytes.and_then(|b| total.checked_add(b)).filter(|&t| t <= limit).ok_or_else(|| {
            WireError::Garbage(format!(
                "{} sent a tensor of shape {:?} ({}): over the {limit} bytes a message to this stage may hold",
                r.peer(),
                h.shape,
                h.kind
            ))
        })?;
        let device = match (h.nccl, nccl) {
            (false, _) => Device::Cpu,
            (true, Some((_, device))) => device,
            (true, None) => {
                return Err(WireError::Garbage("a tensor sent over NCCL on a link that has no NCCL group".into()))
            }
        };
        let mut t = Tensor::f_empty(h.shape.as_slice(), (kind, device)).map_err(|e| {
            WireError::Garbage(format!("cannot allocate a tensor of shape {:?} on {device:?}: {e}", h.shape))
        })?;
        match nccl {
            Some((group, _)) if h.nccl => group.recv(&mut t, NCCL_SENDER).map_err(WireError::Nccl)?,
            _ => {
                let len = bytes.unwrap_or(0) as usize;
                if len > 0 {
                    // SAFETY: `t` was just allocated, contiguous on the CPU, with exactly `len` bytes.
                    let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) };
                    r.bytes_into(dst)?;
                }
            }
        }
        tensors.push(t);
    }
    let payload = (tensors.len() == 2).then(|| {
        let labels = tensors.pop().expect("two");
        Payload { input: tensors.pop().expect("two"), labels }
    });
    Ok(Message { control: header.control, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testing::sealed_pair;

    /// A message written into a sealed pair's opener, read back at its acceptor.
    fn through(h: &Header) -> WireResult<Message> {
        let (mut a, mut b) = sealed_pair(false);
        a.writer.frame(h).unwrap();
        read_message(&mut b.reader, 1 << 20, None)
    }

    #[test]
    fn lies_in_a_header_are_refused_before_allocation() {
        // Over what a message to the stage may hold (1 MiB here), or over u64 altogether.
        for shape in [vec![1 << 40, 1 << 20], vec![512, 513]] {
            let h = Header {
                control: Control::Train { epoch: 1, step: 1 },
                tensors: vec![
                    TensorHeader { kind: "f32".into(), shape: shape.clone(), nccl: false },
                    TensorHeader { kind: "i64".into(), shape: vec![1], nccl: false },
                ],
            };
            let Err(e) = through(&h) else { panic!("{shape:?} accepted") };
            let e = e.to_string();
            assert!(e.contains("over the 1048576 bytes a message to this stage may hold"), "{shape:?}: {e}");
        }
        let h = Header {
            control: Control::Eval { set: layerwise_pipeline::message::EvalSet::Test },
            tensors: vec![
                TensorHeader { kind: "f32".into(), shape: vec![2, 3], nccl: true },
                TensorHeader { kind: "i64".into(), shape: vec![2], nccl: false },
            ],
        };
        let Err(e) = through(&h) else { panic!("accepted") };
        let e = e.to_string();
        assert!(e.contains("has no NCCL group"), "{e}");
        let Ok(shutdown) = through(&Header { control: Control::Shutdown, tensors: vec![] }) else { panic!("refused") };
        assert_eq!(shutdown.control, Control::Shutdown);
    }
}
