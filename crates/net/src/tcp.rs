//! Links between processes over TCP, behind the same [`LinkSender`]/[`LinkReceiver`]
//! interface as the in-process channels. A message is a JSON header (control, and each
//! tensor's dtype and shape) followed by the tensors' raw bytes, written from and read into
//! the tensors' own memory (no per-element encoding, no extra copy). Backpressure is by
//! credits: the sender starts with `capacity` and spends one per message; the receiver
//! returns one each time its stage takes a message. So at most `capacity` messages are in
//! flight per link, whatever the socket buffers hold, and memory stays flat.
//!
//! A link between two GPUs can carry its tensors over NCCL instead (`pipeline.gpu_link`):
//! the header still goes over TCP, marking each tensor that follows over NCCL, and the
//! receiver posts the matching receive into a tensor on its own GPU. Both sides take the
//! tensors in header order, so the two channels never disagree about what comes next.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use layerwise_nccl::Group;

use crossbeam_channel::{bounded, Receiver};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use layerwise_pipeline::link::{Closed, LinkReceiver, LinkSender};
use layerwise_pipeline::message::{Control, Message, Payload};

use crate::wire::{read_frame, write_frame, WireError, WireResult};

/// The most bytes one message's tensors may claim (a batch of activations is far smaller).
const MAX_PAYLOAD: u64 = 16 << 30;

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
pub fn write_message(w: &mut impl Write, msg: &Message, nccl: Option<&Group>) -> WireResult<()> {
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
    write_frame(w, &Header { control: msg.control, tensors: headers })?;
    for (t, over_nccl) in &tensors {
        match nccl {
            Some(group) if *over_nccl => group.send(t, NCCL_RECEIVER).map_err(WireError::Nccl)?,
            _ => w.write_all(bytes_of(t))?,
        }
    }
    w.flush()?;
    Ok(())
}

/// Reads one message, checking the header's claims before allocating. Tensors marked as
/// sent over NCCL are received from `nccl`'s group into its device.
pub fn read_message(r: &mut impl Read, nccl: Option<(&Group, Device)>) -> WireResult<Message> {
    let header: Header = read_frame(r)?;
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
        total = bytes.and_then(|b| total.checked_add(b)).filter(|&t| t <= MAX_PAYLOAD).ok_or_else(|| {
            WireError::Garbage(format!(
                "a tensor of shape {:?} ({}) is over the {MAX_PAYLOAD}-byte limit",
                h.shape, h.kind
            ))
        })?;
        if h.nccl {
            let (group, device) = nccl
                .ok_or_else(|| WireError::Garbage("a tensor sent over NCCL on a link that has no NCCL group".into()))?;
            let mut t = Tensor::empty(h.shape.as_slice(), (kind, device));
            group.recv(&mut t, NCCL_SENDER).map_err(WireError::Nccl)?;
            tensors.push(t);
            continue;
        }
        let t = Tensor::empty(h.shape.as_slice(), (kind, Device::Cpu));
        let len = bytes.unwrap_or(0) as usize;
        if len > 0 {
            // SAFETY: `t` was just allocated, contiguous on the CPU, with exactly `len` bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) };
            r.read_exact(dst)?;
        }
        tensors.push(t);
    }
    let payload = (tensors.len() == 2).then(|| {
        let labels = tensors.pop().expect("two");
        Payload { input: tensors.pop().expect("two"), labels }
    });
    Ok(Message { control: header.control, payload })
}

/// The sending end: spends a credit per message, waits for one when it has none.
pub struct TcpSender {
    stream: TcpStream,
    credits: Cell<usize>,
    nccl: Option<Arc<Group>>,
}

impl TcpSender {
    /// `nccl`: the link's group, over which tensors on GPUs go.
    pub fn new(stream: TcpStream, capacity: usize, nccl: Option<Arc<Group>>) -> Self {
        Self { stream, credits: Cell::new(capacity.max(1)), nccl }
    }
}

impl LinkSender for TcpSender {
    fn send(&self, msg: Message) -> Result<(), Closed> {
        while self.credits.get() == 0 {
            let mut got = [0u8; 64];
            match (&self.stream).read(&mut got) {
                Ok(0) | Err(_) => return Err(Closed),
                Ok(n) => self.credits.set(n),
            }
        }
        self.credits.set(self.credits.get() - 1);
        let mut w = std::io::BufWriter::with_capacity(1 << 16, &self.stream);
        write_message(&mut w, &msg, self.nccl.as_deref()).map_err(|e| {
            if matches!(e, WireError::Nccl(_)) {
                tracing::error!("link out: {e}");
            }
            Closed
        })
    }
}

/// The receiving end: a reader thread decodes messages (overlapping the stage's work) into
/// a channel as deep as the link's capacity; taking one returns a credit to the sender.
pub struct TcpReceiver {
    messages: Receiver<Message>,
    credit: TcpStream,
    _reader: JoinHandle<()>,
}

impl TcpReceiver {
    /// `nccl`: the link's group and this side's GPU, into which tensors sent over NCCL
    /// are received.
    pub fn new(
        stream: TcpStream,
        capacity: usize,
        what: String,
        nccl: Option<(Arc<Group>, Device)>,
    ) -> std::io::Result<Self> {
        let credit = stream.try_clone()?;
        let (tx, messages) = bounded(capacity.max(1));
        let reader = std::thread::Builder::new().name(format!("link-in-{what}")).spawn(move || {
            let mut r = std::io::BufReader::with_capacity(1 << 16, &stream);
            let nccl = nccl.as_ref().map(|(g, d)| (&**g, *d));
            loop {
                match read_message(&mut r, nccl) {
                    Ok(m) => {
                        let last = m.control == Control::Shutdown;
                        if tx.send(m).is_err() || last {
                            return;
                        }
                    }
                    Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                    Err(e) => {
                        tracing::error!("link into {what}: {e}");
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            }
        })?;
        Ok(Self { messages, credit, _reader: reader })
    }
}

impl LinkReceiver for TcpReceiver {
    fn recv(&self) -> Result<Message, Closed> {
        let m = self.messages.recv().map_err(|_| Closed)?;
        // A sender that is gone needs no credit; the message in hand is still handled.
        let _ = (&self.credit).write_all(&[1]);
        Ok(m)
    }

    fn depth(&self) -> usize {
        self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn linked(capacity: usize) -> (TcpSender, TcpReceiver) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (TcpSender::new(a, capacity, None), TcpReceiver::new(b, capacity, "test".into(), None).unwrap())
    }

    #[test]
    fn a_batch_crosses_bit_for_bit_with_its_control() {
        let (tx, rx) = linked(2);
        let input = Tensor::randn([3, 5, 7], (Kind::Float, Device::Cpu)).transpose(1, 2); // not contiguous
        let labels = Tensor::from_slice(&[4i64, 0, 9]);
        tx.send(Message::with(Control::Train { epoch: 2, step: 41 }, input.shallow_clone(), labels.shallow_clone()))
            .unwrap();
        tx.send(Message::control(Control::SetLr { lr: 0.25 })).unwrap();
        let m = rx.recv().unwrap();
        assert_eq!(m.control, Control::Train { epoch: 2, step: 41 });
        let p = m.payload.unwrap();
        assert_eq!(p.input.size(), vec![3, 7, 5]);
        assert!(p.input.equal(&input) && p.labels.equal(&labels));
        assert_eq!(rx.recv().unwrap().control, Control::SetLr { lr: 0.25 });
    }

    #[test]
    fn a_sender_without_credits_waits_for_the_receiver_to_take() {
        let (tx, rx) = linked(2);
        let (about, about_rx) = bounded(1);
        let t = std::thread::spawn(move || {
            for i in 0..3 {
                if i == 2 {
                    about.send(()).unwrap();
                }
                tx.send(Message::control(Control::EpochEnd { epoch: i })).unwrap();
            }
        });
        about_rx.recv().unwrap();
        // Two messages sent, the third waits for a credit: none is taken yet.
        while rx.depth() < 2 {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(rx.depth(), 2, "the third message is held by the sender");
        for i in 0..3 {
            assert_eq!(rx.recv().unwrap().control, Control::EpochEnd { epoch: i });
        }
        t.join().unwrap();
    }

    #[test]
    fn lies_in_a_header_are_refused_before_allocation() {
        let mut buf = Vec::new();
        let h = Header {
            control: Control::Train { epoch: 1, step: 1 },
            tensors: vec![
                TensorHeader { kind: "f32".into(), shape: vec![1 << 40, 1 << 20], nccl: false },
                TensorHeader { kind: "i64".into(), shape: vec![1], nccl: false },
            ],
        };
        write_frame(&mut buf, &h).unwrap();
        let e = read_message(&mut buf.as_slice(), None).unwrap_err().to_string();
        assert!(e.contains("over the"), "{e}");
        let mut buf = Vec::new();
        let h = Header {
            control: Control::Eval { set: layerwise_pipeline::message::EvalSet::Test },
            tensors: vec![
                TensorHeader { kind: "f32".into(), shape: vec![2, 3], nccl: true },
                TensorHeader { kind: "i64".into(), shape: vec![2], nccl: false },
            ],
        };
        write_frame(&mut buf, &h).unwrap();
        let e = read_message(&mut buf.as_slice(), None).unwrap_err().to_string();
        assert!(e.contains("has no NCCL group"), "{e}");
        let mut buf = Vec::new();
        write_frame(&mut buf, &Header { control: Control::Shutdown, tensors: vec![] }).unwrap();
        assert_eq!(read_message(&mut buf.as_slice(), None).unwrap().control, Control::Shutdown);
    }
}
