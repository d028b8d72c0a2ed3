//! `bench link`: what a link between two processes carries per second over loopback, as
//! the pipeline uses it (a batch of activations per message, credits back), sealed with
//! authentication only and with encryption: the cost of each beside a training step.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use layerwise_net::tcp::{Inbound, TcpReceiver, TcpSender};
use layerwise_net::wire::{self, Auth, Role};
use layerwise_pipeline::link::{LinkReceiver, LinkSender};
use layerwise_pipeline::message::{Control, Message};
use tch::{Device, Kind, Tensor};

/// MB/s through one sealed link of `messages` messages of `bytes` bytes each.
fn measure(encrypt: bool, messages: usize, bytes: usize) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let auth = Auth::new(wire::nonce().into_bytes(), encrypt);
    let acceptor = auth.clone();
    let accepted =
        std::thread::spawn(move || wire::accept(listener.accept()?.0, &acceptor).map_err(anyhow::Error::from));
    let out = wire::connect(addr, &auth, Role::Link { job: 1, stage: 1 })?;
    let (_, inp) = accepted.join().map_err(|_| anyhow::anyhow!("the accepting thread panicked"))??;
    let stall = Duration::from_secs(600);
    let received = Default::default();
    let inbound = Inbound { capacity: 2, limit: 2 * bytes as u64, stall, what: "bench".into(), received };
    let rx = TcpReceiver::new(inp, inbound, None)?;
    let features = (bytes / 4 / 128).max(1) as i64;
    let input = Tensor::randn([128, features], (Kind::Float, Device::Cpu));
    let labels = Tensor::zeros([128], (Kind::Int64, Device::Cpu));
    let sender = std::thread::spawn(move || {
        let tx = TcpSender::new(out, 2, None, stall)?;
        for step in 0..messages as u64 {
            let m = Message::with(Control::Train { epoch: 1, step }, input.shallow_clone(), labels.shallow_clone());
            tx.send(m).map_err(|_| anyhow::anyhow!("the link closed"))?;
        }
        anyhow::Ok(())
    });
    let start = Instant::now();
    for _ in 0..messages {
        rx.recv().map_err(|_| anyhow::anyhow!("the link closed"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
    Ok((messages * (bytes + 128 * 8)) as f64 / secs / 1e6)
}

pub fn link(messages: usize, kib: usize) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1_000_000).contains(&messages), "--messages: expected 1 to 1000000, got {messages}");
    anyhow::ensure!((1..=1 << 20).contains(&kib), "--kib: expected 1 to 1048576 (1 GiB), got {kib}");
    let bytes = kib * 1024;
    println!("{messages} messages of a {kib} KiB batch each, over loopback, one link:");
    for (name, encrypt) in [("authenticated", false), ("encrypted", true)] {
        let _ = measure(encrypt, messages.min(20), bytes)?; // warm-up
        let mb = measure(encrypt, messages, bytes)?;
        println!("  {name:<14} {mb:>8.0} MB/s  ({:.2} ms a message)", bytes as f64 / 1e6 / mb * 1e3);
    }
    Ok(())
}
