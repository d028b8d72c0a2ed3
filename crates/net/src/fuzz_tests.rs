//! Random and mutated bytes against every decoder a peer reaches: the handshake (before
//! the peer is authenticated) and sealed messages (after). Each case must end in an error,
//! never a panic, a hang or an allocation past the limits; only the unchanged stream reads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use layerwise_pipeline::message::{Control, Message};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::codec::{read_message, write_message};
use crate::seal::{split, Keys};
use crate::wire::{accept, testing::auth};

fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    (a, l.accept().unwrap().0)
}

const KEYS: fn() -> Keys = || Keys { send: [7; 32], recv: [7; 32], encrypt: true };

/// The bytes a sealed writer puts on the wire for a batch and a control message.
fn sealed_stream() -> Vec<u8> {
    let (a, mut b) = socket_pair();
    let (_, mut w) = split(a, &KEYS(), "writer".into()).unwrap();
    let batch = Message::with(
        Control::Train { epoch: 1, step: 3 },
        Tensor::randn([4, 6], (Kind::Float, tch::Device::Cpu)),
        Tensor::from_slice(&[1i64, 2, 3, 0]),
    );
    write_message(&mut w, &batch, None).unwrap();
    write_message(&mut w, &Message::control(Control::EpochEnd { epoch: 1 }), None).unwrap();
    drop(w);
    let mut bytes = Vec::new();
    b.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Both messages read back from `bytes` (then the end of the stream), or the first error.
fn read_back(bytes: &[u8]) -> Result<(), String> {
    let (mut a, b) = socket_pair();
    let (mut r, _) = split(b, &KEYS(), "peer".into()).unwrap();
    a.write_all(bytes).unwrap();
    drop(a);
    for _ in 0..2 {
        read_message(&mut r, 1 << 20, None).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn mutated_sealed_messages_are_errors_and_only_the_original_reads() {
    let original = sealed_stream();
    assert_eq!(read_back(&original), Ok(()));
    let mut rng = StdRng::seed_from_u64(25);
    for case in 0..2000 {
        let mut bytes = original.clone();
        match case % 4 {
            0 => {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => bytes.truncate(rng.gen_range(0..bytes.len())),
            2 => {
                let (i, n) = (rng.gen_range(0..bytes.len()), rng.gen_range(1..64));
                let chunk: Vec<u8> = bytes[i..(i + n).min(bytes.len())].to_vec();
                bytes.splice(i..i, chunk);
            }
            _ => bytes = (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect(),
        }
        // What reads is the original, byte for byte; bytes after it are the next read's.
        let read = read_back(&bytes).is_ok();
        assert!(!read || bytes.starts_with(&original), "case {case}: a changed stream read as sound");
    }
}

#[test]
fn random_and_mutated_handshakes_are_refused() {
    let mut rng = StdRng::seed_from_u64(29);
    for case in 0..1000 {
        let mut bytes: Vec<u8> = b"LWIRE01\n".to_vec();
        if case % 2 == 0 {
            bytes.clear();
        }
        // A plausible frame length now and then, so that the JSON parser is reached.
        if case % 3 == 0 {
            bytes.extend_from_slice(&rng.gen_range(0u32..300).to_le_bytes());
        }
        bytes.extend((0..rng.gen_range(0..300)).map(|_| rng.gen::<u8>()));
        let (mut a, b) = socket_pair();
        a.write_all(&bytes).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(accept(b, &auth()).is_err(), "case {case}: accepted");
    }
}
