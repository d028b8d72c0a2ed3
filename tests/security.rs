//! The cluster as an attacker on the network sees it, through the real binary: a relay
//! that changes a byte after the handshake gets the job failed, naming the tampered
//! connection, before anything trains on the changed value.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use layerwise_tests::checkpoint_folders;

mod cluster_support;
use cluster_support::*;

/// Reads one length-prefixed handshake frame from `from` and passes it on to `to`.
fn pass_frame(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    from.read_exact(&mut body)?;
    to.write_all(&len)?;
    to.write_all(&body)
}

/// A relay in front of `target`: bytes to the target pass untouched; in the other
/// direction it passes the handshake (the magic, the greeting, the answer) and then flips
/// one bit in the body of the first sealed record over 1 KiB (a worker's assignment).
/// Returns its address, and a thread that says whether it flipped a bit.
fn tampering_relay(target: &str) -> (String, JoinHandle<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let target = target.to_string();
    let relay = std::thread::spawn(move || {
        let (mut near, _) = listener.accept().unwrap();
        let mut far = TcpStream::connect(&target).unwrap();
        let (mut up_from, mut up_to) = (near.try_clone().unwrap(), far.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_from, &mut up_to);
            let _ = up_to.shutdown(std::net::Shutdown::Write);
        });
        let mut magic = [0u8; 8];
        far.read_exact(&mut magic).unwrap();
        near.write_all(&magic).unwrap();
        pass_frame(&mut far, &mut near).unwrap(); // the greeting
        pass_frame(&mut far, &mut near).unwrap(); // the answer
        let mut tampered = false;
        loop {
            let mut len = [0u8; 4];
            if far.read_exact(&mut len).is_err() {
                return tampered;
            }
            let n = u32::from_le_bytes(len) as usize;
            let mut record = vec![0u8; n + 16];
            if far.read_exact(&mut record).is_err() {
                return tampered;
            }
            if !tampered && n > 1024 {
                record[n / 2] ^= 1;
                tampered = true;
            }
            if near.write_all(&len).and_then(|_| near.write_all(&record)).is_err() {
                return tampered;
            }
        }
    });
    (addr, relay)
}

#[test]
fn a_relay_that_changes_one_bit_of_an_assignment_fails_the_job_naming_the_connection() {
    let s = setup();
    let run = s.dir.path().join("tampered");
    let (coordinator, addr) = coordinator(&s.config, &run, &[PLACED], false);
    let (relay_addr, relay) = tampering_relay(&addr);
    let w1 = Command::new(BIN)
        .args(["worker", "--coordinator", &relay_addr, "--name", "w1", "--once"])
        .env("LAYERWISE_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .proc();
    let w2 = worker(&addr, "w2", SECRET);
    let out = coordinator.output();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(relay.join().unwrap(), "the relay changed a record");
    // The worker refused the changed frame and said why on its way out; the coordinator
    // failed the job naming the worker, its connection, and the failed check.
    let w1_log = text(&w1.output());
    assert!(w1_log.contains("tampered with: record") && w1_log.contains("fails authentication"), "{w1_log}");
    assert!(log.contains("worker w1") && log.contains("fails authentication"), "{log}");
    let status = std::fs::read_to_string(run.join("status.json")).unwrap();
    assert!(status.contains("\"failed\"") && status.contains("fails authentication"), "{status}");
    assert!(checkpoint_folders(&run).is_empty(), "nothing trained: {:?}", checkpoint_folders(&run));
    assert!(!w2.output().status.success(), "w2's job was aborted");
}
