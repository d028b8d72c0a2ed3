//! Every byte after the handshake travels in sealed records: a length, the body, and a
//! 16-byte ChaCha20-Poly1305 tag (RFC 8439, RustCrypto's `chacha20poly1305`). Each
//! direction of a connection has its own key (derived from the handshake, see
//! [`crate::wire`]) and numbers its records from 0; the nonce is the record's number and
//! its length, so a record that is changed, replayed, reordered, dropped or cut short fails
//! its tag, and the connection ends with an error naming the peer. Nothing read is used
//! before its tag checks.
//!
//! With encryption on, the body is encrypted; off, the body is only authenticated (it is
//! the AEAD's associated data, its plaintext empty): one construction, two uses.
//!
//! A record holds at most [`RECORD_MAX`] bytes; larger payloads (tensors) go as a run of
//! records of at most [`CHUNK`] bytes, read straight into the tensor's memory and checked
//! there, never used when a tag fails.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a layerwise peer: {0}")]
    Garbage(String),
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// This side refused the peer.
    #[error("refused: {0}")]
    Denied(String),
    /// A sealed record failed its check: changed, replayed, reordered or cut in transit.
    #[error("tampered with: {0}")]
    Forged(String),
    #[error("{0}")]
    Nccl(String),
}

pub type WireResult<T> = std::result::Result<T, WireError>;

/// The most bytes one record carries (a control frame: a config, an assignment).
pub const RECORD_MAX: usize = 16 << 20;
/// The size of the records a long payload (a tensor's bytes) is cut into.
pub const CHUNK: usize = 1 << 20;
const TAG_LEN: usize = 16;

/// One direction's key and the number of its next record.
struct Direction {
    cipher: ChaCha20Poly1305,
    seq: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(Key::from_slice(key)), seq: 0 }
    }

    /// The nonce of the next record of `len` bytes: its number and its length (a number is
    /// never used twice under one key).
    fn next(&mut self, len: usize) -> Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.seq.to_le_bytes());
        n[8..].copy_from_slice(&(len as u32).to_le_bytes());
        self.seq += 1;
        *Nonce::from_slice(&n)
    }
}

/// The keys a handshake agreed on, one per direction, and whether bodies are encrypted.
pub struct Keys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
    pub encrypt: bool,
}

/// The writing half of a sealed connection.
pub struct SealWriter {
    out: BufWriter<TcpStream>,
    /// Bytes written on the wire so far (records with their framing).
    pub written: u64,
    dir: Direction,
    encrypt: bool,
    /// The body being encrypted (the caller's bytes stay as they are).
    scratch: Vec<u8>,
}

/// The reading half of a sealed connection; `peer` names it in errors.
pub struct SealReader {
    input: BufReader<TcpStream>,
    /// Bytes read off the wire so far (records with their framing).
    pub read: u64,
    dir: Direction,
    encrypt: bool,
    peer: String,
}

/// Both halves of a connection whose handshake is done, over two handles of one socket.
pub fn split(stream: TcpStream, keys: &Keys, peer: String) -> std::io::Result<(SealReader, SealWriter)> {
    let writer = SealWriter {
        out: BufWriter::with_capacity(1 << 16, stream.try_clone()?),
        written: 0,
        dir: Direction::new(&keys.send),
        encrypt: keys.encrypt,
        scratch: Vec::new(),
    };
    let reader = SealReader {
        input: BufReader::with_capacity(1 << 16, stream),
        read: 0,
        dir: Direction::new(&keys.recv),
        encrypt: keys.encrypt,
        peer,
    };
    Ok((reader, writer))
}

impl SealWriter {
    /// Writes one record holding `body` (at most [`RECORD_MAX`] bytes); not flushed.
    pub fn record(&mut self, body: &[u8]) -> WireResult<()> {
        if body.len() > RECORD_MAX {
            return Err(WireError::Garbage(format!("a record of {} bytes is over the limit", body.len())));
        }
        let nonce = self.dir.next(body.len());
        let sealed = |e| WireError::Garbage(format!("cannot seal a record: {e}"));
        self.out.write_all(&(body.len() as u32).to_le_bytes())?;
        let tag = if self.encrypt {
            self.scratch.clear();
            self.scratch.extend_from_slice(body);
            let tag = self.dir.cipher.encrypt_in_place_detached(&nonce, b"", &mut self.scratch).map_err(sealed)?;
            self.out.write_all(&self.scratch)?;
            tag
        } else {
            self.out.write_all(body)?;
            self.dir.cipher.encrypt_in_place_detached(&nonce, body, &mut []).map_err(sealed)?
        };
        self.out.write_all(&tag)?;
        self.written += (4 + body.len() + TAG_LEN) as u64;
        Ok(())
    }

    /// Writes `bytes` as records of at most [`CHUNK`] bytes; not flushed.
    pub fn bytes(&mut self, bytes: &[u8]) -> WireResult<()> {
        bytes.chunks(CHUNK).try_for_each(|c| self.record(c))
    }

    /// Writes `value` as one JSON record, and sends it.
    pub fn frame<T: Serialize>(&mut self, value: &T) -> WireResult<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| WireError::Garbage(format!("cannot encode a frame: {e}")))?;
        self.record(&bytes)?;
        self.flush()
    }

    pub fn flush(&mut self) -> WireResult<()> {
        Ok(self.out.flush()?)
    }

    /// The socket under this half (to shut it, or set its timeouts).
    pub fn socket(&self) -> &TcpStream {
        self.out.get_ref()
    }
}

impl SealReader {
    /// Reads the next record's length, refusing one over `max` before reading its body.
    fn length(&mut self, max: usize) -> WireResult<usize> {
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > max {
            return Err(WireError::Garbage(format!(
                "{} sent a record of {len} bytes where at most {max} fit",
                self.peer
            )));
        }
        Ok(len)
    }

    /// Reads a body of `body.len()` bytes into `body` and checks (and decrypts) it there.
    fn open_into(&mut self, body: &mut [u8]) -> WireResult<()> {
        self.input.read_exact(body)?;
        let mut tag = [0u8; TAG_LEN];
        self.input.read_exact(&mut tag)?;
        self.read += (4 + body.len() + TAG_LEN) as u64;
        let (seq, nonce) = (self.dir.seq, self.dir.next(body.len()));
        let tag = Tag::from_slice(&tag);
        let checked = if self.encrypt {
            self.dir.cipher.decrypt_in_place_detached(&nonce, b"", body, tag)
        } else {
            self.dir.cipher.decrypt_in_place_detached(&nonce, body, &mut [], tag)
        };
        checked.map_err(|_| {
            WireError::Forged(format!(
                "record {seq} from {} fails authentication (changed, replayed, reordered or cut in transit)",
                self.peer
            ))
        })
    }

    /// The next record's body, at most `max` bytes.
    pub fn record(&mut self, max: usize) -> WireResult<Vec<u8>> {
        let len = self.length(max.min(RECORD_MAX))?;
        let mut body = vec![0u8; len];
        self.open_into(&mut body)?;
        Ok(body)
    }

    /// The next record, parsed as JSON.
    pub fn frame<T: DeserializeOwned>(&mut self) -> WireResult<T> {
        let body = self.record(RECORD_MAX)?;
        serde_json::from_slice(&body)
            .map_err(|e| WireError::Garbage(format!("{} sent a frame that does not parse: {e}", self.peer)))
    }

    /// Fills `dst` from records of at most [`CHUNK`] bytes each (as [`SealWriter::bytes`]
    /// writes them), each checked in place.
    pub fn bytes_into(&mut self, dst: &mut [u8]) -> WireResult<()> {
        let mut at = 0;
        while at < dst.len() {
            let want = (dst.len() - at).min(CHUNK);
            let len = self.length(want)?;
            if len != want {
                return Err(WireError::Garbage(format!("{} sent a record of {len} bytes, {want} expected", self.peer)));
            }
            self.open_into(&mut dst[at..at + len])?;
            at += len;
        }
        Ok(())
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The socket under this half.
    pub fn socket(&self) -> &TcpStream {
        self.input.get_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Two sealed ends of one loopback connection, with the given keys (the accepting end's
    /// keys mirrored), and a raw handle on the connecting end's socket.
    fn sealed(encrypt: bool) -> ((SealReader, SealWriter), (SealReader, SealWriter)) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let ka = Keys { send: k1, recv: k2, encrypt };
        let kb = Keys { send: k2, recv: k1, encrypt };
        (split(a, &ka, "a".into()).unwrap(), split(b, &kb, "peer b".into()).unwrap())
    }

    #[test]
    fn records_cross_in_order_in_both_modes_and_encryption_hides_the_body() {
        for encrypt in [false, true] {
            let ((_, mut w), (mut r, _)) = sealed(encrypt);
            w.frame(&serde_json::json!({"lr": 0.25})).unwrap();
            let big: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i * 7) as u8).collect();
            w.bytes(&big).unwrap();
            w.flush().unwrap();
            let v: serde_json::Value = r.frame().unwrap();
            assert_eq!(v["lr"], 0.25);
            let mut got = vec![0u8; big.len()];
            r.bytes_into(&mut got).unwrap();
            assert_eq!(got, big);
        }
        // What goes on the wire: the body itself when only authenticated, not when encrypted.
        for (encrypt, shown) in [(false, true), (true, false)] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut b, _) = l.accept().unwrap();
            let (_, mut w) = split(a, &Keys { send: [3; 32], recv: [4; 32], encrypt }, "b".into()).unwrap();
            w.record(b"the training data").unwrap();
            w.flush().unwrap();
            let mut wire = vec![0u8; 4 + 17 + TAG_LEN];
            b.read_exact(&mut wire).unwrap();
            assert_eq!(wire.windows(17).any(|x| x == b"the training data"), shown, "encrypt {encrypt}");
        }
    }

    #[test]
    fn a_record_from_a_different_key_or_out_of_turn_is_refused_naming_the_peer() {
        let ((_, mut w), (mut r, _)) = sealed(false);
        // The writer's third record arrives where the reader expects its first.
        let mut other = Direction::new(&[1u8; 32]);
        other.seq = 2;
        let nonce = other.next(2);
        let tag = other.cipher.encrypt_in_place_detached(&nonce, b"hi", &mut []).unwrap();
        let out = w.out.get_mut();
        out.write_all(&2u32.to_le_bytes()).unwrap();
        out.write_all(b"hi").unwrap();
        out.write_all(&tag).unwrap();
        let e = r.record(64).unwrap_err().to_string();
        assert!(e.contains("record 0 from peer b fails authentication"), "{e}");
    }

    #[test]
    fn a_length_over_what_the_reader_expects_is_refused_before_reading_the_body() {
        let ((_, mut w), (mut r, _)) = sealed(true);
        w.out.get_mut().write_all(&u32::MAX.to_le_bytes()).unwrap();
        let e = r.record(RECORD_MAX).unwrap_err().to_string();
        assert!(e.contains("peer b sent a record of 4294967295 bytes where at most 16777216 fit"), "{e}");
        let ((_, mut w), (mut r, _)) = sealed(true);
        w.record(&[0u8; 10]).unwrap();
        w.flush().unwrap();
        let e = r.bytes_into(&mut [0u8; 20]).unwrap_err().to_string();
        assert!(e.contains("a record of 10 bytes, 20 expected"), "{e}");
    }
}
