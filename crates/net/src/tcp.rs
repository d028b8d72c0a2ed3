//! Links between processes over TCP, behind the same [`LinkSender`]/[`LinkReceiver`]
//! interface as the in-process channels. A message ([`crate::codec`]) is a JSON header
//! followed by the tensors' raw bytes in sealed records, written from and read into the
//! tensors' own memory (no per-element encoding). Backpressure is by
//! credits: the sender starts with `capacity` and spends one per message; the receiver
//! returns one each time its stage takes a message. So at most `capacity` messages are in
//! flight per link, whatever the socket buffers hold, and memory stays flat.
//!
//! A link between two GPUs can carry its tensors over NCCL instead (`pipeline.gpu_link`):
//! the header still goes over TCP, marking each tensor that follows over NCCL, and the
//! receiver posts the matching receive into a tensor on its own GPU. Both sides take the
//! tensors in header order, so the two channels never disagree about what comes next.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use layerwise_nccl::Group;

use crossbeam_channel::{bounded, Receiver};
use tch::Device;

use layerwise_pipeline::link::{Closed, LinkReceiver, LinkSender};
use layerwise_pipeline::message::{Control, Message};

use crate::codec::{read_message, write_message};
use crate::seal::{SealReader, SealWriter};
use crate::wire::{Conn, WireError};

/// The sending end: spends a credit per message, waits for one when it has none. Credits
/// come back as sealed records like everything else on the link.
pub struct TcpSender {
    out: RefCell<SealWriter>,
    credits_in: RefCell<SealReader>,
    credits: Cell<usize>,
    nccl: Option<Arc<Group>>,
    stall: Duration,
    broken: RefCell<Option<String>>,
    /// Where the bytes sent are counted (`crate::traffic`).
    sent: Arc<std::sync::atomic::AtomicU64>,
}

impl TcpSender {
    /// `nccl`: the link's group, over which tensors on GPUs go. `stall`: how long the
    /// receiver may go without taking a message (or without reading what is sent), after
    /// which the link fails.
    pub fn new(conn: Conn, capacity: usize, nccl: Option<Arc<Group>>, stall: Duration) -> std::io::Result<Self> {
        conn.socket().set_read_timeout(Some(stall))?;
        conn.socket().set_write_timeout(Some(stall))?;
        let Conn { reader, writer, .. } = conn;
        let (out, credits_in) = (RefCell::new(writer), RefCell::new(reader));
        let credits = Cell::new(capacity.max(1));
        let sent = Arc::default();
        Ok(Self { out, credits_in, credits, nccl, stall, broken: RefCell::new(None), sent })
    }

    /// Counts the bytes this link sends into `counter`.
    pub fn counting(mut self, counter: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.sent = counter;
        self
    }
}

impl LinkSender for TcpSender {
    fn send(&self, msg: Message) -> Result<(), Closed> {
        let mut credits_in = self.credits_in.borrow_mut();
        while self.credits.get() == 0 {
            match credits_in.record(1) {
                Ok(_) => self.credits.set(1),
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(Closed),
                Err(e) => return Err(self.broke(&credits_in, e, "take a message")),
            }
        }
        self.credits.set(self.credits.get() - 1);
        let mut out = self.out.borrow_mut();
        let before = out.written;
        write_message(&mut out, &msg, self.nccl.as_deref())
            .map_err(|e| self.broke(&credits_in, e, "read a message"))?;
        self.sent.fetch_add(out.written - before, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn broken(&self) -> Option<String> {
        self.broken.borrow().clone()
    }
}

impl TcpSender {
    /// Keeps why the link broke (a clean close by the peer is no break).
    fn broke(&self, link: &SealReader, e: WireError, what: &str) -> Closed {
        let closed = matches!(&e, WireError::Io(io) if matches!(io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof));
        if !closed {
            *self.broken.borrow_mut() = Some(format!("link to {}: {}", link.peer(), stalled(e, self.stall, what)));
        }
        Closed
    }
}

/// `e`, said as a stall when it is a timeout: the peer did not `what` within `stall`.
fn stalled(e: WireError, stall: Duration, what: &str) -> String {
    match e {
        WireError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            format!("stalled: the peer did not {what} for {} s (pipeline.link_stall_s)", stall.as_secs())
        }
        other => other.to_string(),
    }
}

/// The receiving end: a reader thread decodes messages (overlapping the stage's work) into
/// a channel as deep as the link's capacity; taking one returns a credit to the sender.
pub struct TcpReceiver {
    messages: Receiver<Message>,
    credit: RefCell<SealWriter>,
    /// Why the reader thread stopped, when the link broke.
    broken: Arc<std::sync::Mutex<Option<String>>>,
    _reader: JoinHandle<()>,
}

/// What a link's receiving end needs to know of its stage.
pub struct Inbound {
    /// Messages in flight at most.
    pub capacity: usize,
    /// The most bytes one message's tensors may hold.
    pub limit: u64,
    /// How long the sender may go without sending, after which the link fails.
    pub stall: Duration,
    /// The stage it feeds, for the reader thread's name and the log.
    pub what: String,
    /// Where the bytes received are counted (`crate::traffic`).
    pub received: Arc<std::sync::atomic::AtomicU64>,
}

impl TcpReceiver {
    /// `nccl`: the link's group and this side's GPU, into which tensors sent over NCCL
    /// are received.
    pub fn new(conn: Conn, inbound: Inbound, nccl: Option<(Arc<Group>, Device)>) -> std::io::Result<Self> {
        conn.socket().set_read_timeout(Some(inbound.stall))?;
        conn.socket().set_write_timeout(Some(inbound.stall))?;
        let Conn { reader: mut r, writer, .. } = conn;
        let (tx, messages) = bounded(inbound.capacity.max(1));
        let Inbound { limit, stall, what, received, .. } = inbound;
        let broken = Arc::new(std::sync::Mutex::new(None));
        let why = broken.clone();
        let reader = std::thread::Builder::new().name(format!("link-in-{what}")).spawn(move || {
            let nccl = nccl.as_ref().map(|(g, d)| (&**g, *d));
            loop {
                let before = r.read;
                let read = read_message(&mut r, limit, nccl);
                received.fetch_add(r.read - before, std::sync::atomic::Ordering::Relaxed);
                match read {
                    Ok(m) => {
                        let last = m.control == Control::Shutdown;
                        if tx.send(m).is_err() || last {
                            return;
                        }
                    }
                    Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                    Err(e) => {
                        let reason =
                            format!("link into {what} from {}: {}", r.peer(), stalled(e, stall, "send a message"));
                        *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                        let _ = r.socket().shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            }
        })?;
        Ok(Self { messages, credit: RefCell::new(writer), broken, _reader: reader })
    }
}

impl LinkReceiver for TcpReceiver {
    fn recv(&self) -> Result<Message, Closed> {
        let m = self.messages.recv().map_err(|_| Closed)?;
        // A sender that is gone needs no credit; the message in hand is still handled.
        let mut credit = self.credit.borrow_mut();
        let _ = credit.record(&[1]).and_then(|_| credit.flush());
        Ok(m)
    }

    fn depth(&self) -> usize {
        self.messages.len()
    }

    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testing::sealed_pair;
    use tch::{Kind, Tensor};

    const STALL: Duration = Duration::from_secs(600);

    fn inbound(capacity: usize, stall: Duration) -> Inbound {
        Inbound { capacity, limit: 1 << 20, stall, what: "stage-1".into(), received: Arc::default() }
    }

    fn linked(capacity: usize, encrypt: bool) -> (TcpSender, TcpReceiver) {
        let (a, b) = sealed_pair(encrypt);
        (
            TcpSender::new(a, capacity, None, STALL).unwrap(),
            TcpReceiver::new(b, inbound(capacity, STALL), None).unwrap(),
        )
    }

    #[test]
    fn a_batch_crosses_bit_for_bit_with_its_control() {
        for encrypt in [false, true] {
            batch_crosses(encrypt);
        }
    }

    fn batch_crosses(encrypt: bool) {
        let (tx, rx) = linked(2, encrypt);
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
        let (tx, rx) = linked(2, false);
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

    /// A live peer that stops making progress fails the link after `stall`, naming the
    /// peer: a sender that sends nothing, a receiver that takes nothing.
    #[test]
    fn a_link_that_makes_no_progress_fails_naming_the_peer() {
        let second = Duration::from_secs(1);
        let (a, b) = sealed_pair(false);
        let peer = a.socket().local_addr().unwrap().to_string();
        let (tx, rx) =
            (TcpSender::new(a, 1, None, second).unwrap(), TcpReceiver::new(b, inbound(1, second), None).unwrap());
        assert!(rx.recv().is_err());
        let why = rx.broken().expect("broken, not closed");
        assert!(
            why.contains(&format!("link into stage-1 from {peer}")) && why.contains("did not send a message for 1 s"),
            "{why}"
        );
        drop((tx, rx));
        let (a, b) = sealed_pair(false);
        let (tx, _rx) =
            (TcpSender::new(a, 1, None, second).unwrap(), TcpReceiver::new(b, inbound(1, STALL), None).unwrap());
        tx.send(Message::control(Control::EpochEnd { epoch: 1 })).unwrap();
        assert!(tx.send(Message::control(Control::EpochEnd { epoch: 2 })).is_err(), "no credit came back");
        let why = tx.broken().expect("broken, not closed");
        assert!(why.contains("did not take a message for 1 s"), "{why}");
    }
}
