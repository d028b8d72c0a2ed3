//! The links of a stage: data in from the previous stage, data out to the next, reports out
//! to the coordinator. One interface each, so that stages in other processes or on other
//! hosts (TCP, NCCL) replace the in-process channels without the stage loop changing.

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::message::{Message, Report};

/// The other end is gone (its stage stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

pub trait LinkSender: Send {
    /// Blocks while the link is full: the pipeline's backpressure.
    fn send(&self, msg: Message) -> Result<(), Closed>;
    /// After a failed send: why, when the link broke (a peer that stalled, a record that
    /// failed its check) rather than closed as a stopping stage closes it.
    fn broken(&self) -> Option<String> {
        None
    }
}

pub trait LinkReceiver: Send {
    fn recv(&self) -> Result<Message, Closed>;
    /// Messages waiting now.
    fn depth(&self) -> usize;
    /// After a failed receive: why, when the link broke rather than closed.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// Links to stages in other processes, as the network layer makes them: the link into
/// `stage` from whichever process holds stage - 1 (waiting for it), or the link from
/// here into `stage` in the process that holds it.
pub trait RemoteLinks: Send + Sync {
    fn input(&self, stage: usize) -> Result<Box<dyn LinkReceiver>, String>;
    fn output(&self, stage: usize) -> Result<Box<dyn LinkSender>, String>;
}

/// A stage's link to the coordinator.
pub trait ReportSender: Send + Sync {
    fn send(&self, report: Report) -> Result<(), Closed>;
}

/// Within one process: every stage holds a clone of the coordinator's unbounded channel
/// (reports are few and small: one per evaluation batch, epoch and checkpoint).
impl ReportSender for Sender<Report> {
    fn send(&self, report: Report) -> Result<(), Closed> {
        Sender::send(self, report).map_err(|_| Closed)
    }
}

/// Within one process: a bounded crossbeam channel. Tensors move by reference; the
/// receiving stage copies them to its device.
pub fn in_process(capacity: usize) -> (ChannelSender, ChannelReceiver) {
    let (tx, rx) = bounded(capacity.max(1));
    (ChannelSender(tx), ChannelReceiver(rx))
}

pub struct ChannelSender(Sender<Message>);
pub struct ChannelReceiver(Receiver<Message>);

impl LinkSender for ChannelSender {
    fn send(&self, msg: Message) -> Result<(), Closed> {
        self.0.send(msg).map_err(|_| Closed)
    }
}

impl LinkReceiver for ChannelReceiver {
    fn recv(&self) -> Result<Message, Closed> {
        self.0.recv().map_err(|_| Closed)
    }

    fn depth(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Control;
    use std::time::{Duration, Instant};

    fn msg() -> Message {
        Message::control(Control::Shutdown)
    }

    /// A sender that fills `capacity` messages, then says it is about to send one more
    /// (the time taken before the signal, so the measured block is a lower bound whatever
    /// the machine's load), and returns how long that send took and what it returned.
    type Sending = std::thread::JoinHandle<(Duration, Result<(), Closed>)>;

    fn blocked_sender(capacity: usize) -> (ChannelReceiver, crossbeam_channel::Receiver<()>, Sending) {
        let (tx, rx) = in_process(capacity);
        for _ in 0..capacity {
            tx.send(msg()).unwrap();
        }
        let (about, about_rx) = crossbeam_channel::bounded(1);
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            about.send(()).unwrap();
            let r = tx.send(msg());
            (start.elapsed(), r)
        });
        (rx, about_rx, t)
    }

    #[test]
    fn a_full_link_blocks_its_sender_until_the_receiver_takes() {
        let (rx, about, t) = blocked_sender(2);
        about.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.depth(), 2, "the third message did not get in");
        rx.recv().unwrap();
        let (blocked, result) = t.join().unwrap();
        assert_eq!(result, Ok(()));
        assert!(blocked >= Duration::from_millis(100), "the sender waited for the receiver: {blocked:?}");
    }

    #[test]
    fn a_dropped_receiver_releases_a_blocked_sender() {
        let (rx, about, t) = blocked_sender(1);
        about.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(rx);
        let (blocked, result) = t.join().unwrap();
        // A send that did not block would have returned Ok before the receiver went away.
        assert_eq!(result, Err(Closed));
        assert!(blocked >= Duration::from_millis(50), "{blocked:?}");
    }
}
