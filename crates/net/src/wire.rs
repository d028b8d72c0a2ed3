//! How a TCP connection between layerwise processes opens: a magic line each way, then a
//! handshake in small length-prefixed frames that checks the peer's version and proves,
//! both ways, that each side knows the shared secret. Each side's proof is an HMAC-SHA256,
//! under the secret, of the hash of everything said before it (both versions, both fresh
//! nonces, both sides' wish for encryption, the opener's role), so a relay that changes any
//! of it breaks the proof; the secret itself never travels. The same transcript hash salts
//! the HKDF that derives the connection's two keys, with which every later frame is sealed
//! ([`crate::seal`]). The whole handshake has one deadline, and an unauthenticated peer is
//! read at most a few KiB.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use layerwise_plan::DeviceId;

use crate::deadline::Deadline;
use crate::seal::{self, Keys, SealReader, SealWriter};
use crate::secret::same;
pub use crate::secret::{load_secret, nonce, Auth};

/// The first bytes each side writes: anything else on the port is not a layerwise peer.
const MAGIC: &[u8; 8] = b"LWIRE01\n";
/// The wire format's version; peers of another version are refused with both named.
pub const WIRE_VERSION: u32 = 6;
/// The most bytes of one frame before the peer is authenticated.
pub const HANDSHAKE_FRAME_MAX: usize = 4096;
/// How long a handshake may take, all of it (a deadline, not a timeout per read).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// This build's identity on the wire: the release and the wire format (and byte order,
/// since tensors travel as raw bytes).
pub fn version() -> String {
    let order = if cfg!(target_endian = "little") { "le" } else { "be" };
    format!("layerwise {} wire {WIRE_VERSION} {order}", env!("CARGO_PKG_VERSION"))
}

pub use crate::seal::{WireError, WireResult};

/// Writes one handshake frame: u32 little-endian length, then the bytes.
fn write_plain(w: &mut impl Write, bytes: &[u8]) -> WireResult<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads one handshake frame of at most [`HANDSHAKE_FRAME_MAX`] bytes, refusing a longer
/// claim before allocating.
fn read_plain(r: &mut impl Read) -> WireResult<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > HANDSHAKE_FRAME_MAX {
        return Err(WireError::Garbage(format!(
            "a handshake frame claims {len} bytes (the limit is {HANDSHAKE_FRAME_MAX})"
        )));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> WireResult<T> {
    serde_json::from_slice(bytes).map_err(|e| WireError::Garbage(format!("a frame that does not parse: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("handshake frames always encode")
}

/// Who opens a connection, and for what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Role {
    /// A worker process offering its devices to a coordinator, with each device's memory
    /// in bytes where known (the host's for the CPU).
    Worker {
        name: String,
        devices: Vec<DeviceId>,
        memory: Vec<Option<u64>>,
        cores: usize,
        /// The machine it runs on (`plan::machine_id`): processes on one share its cores.
        machine: String,
        data_addr: SocketAddr,
    },
    /// The data link into stage `stage` of job `job`, from the process holding stage - 1
    /// (or the coordinator's loader, for stage 0).
    Link { job: u64, stage: usize },
}

/// The acceptor's opening: its version, a fresh nonce, whether it wants encryption.
#[derive(Serialize, Deserialize)]
struct Greeting {
    version: String,
    nonce: String,
    encrypt: bool,
}

/// The opener's answer: the same, and what it is. Its proof follows in a frame of its own.
#[derive(Serialize, Deserialize)]
struct Hello {
    version: String,
    nonce: String,
    encrypt: bool,
    role: Role,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    mac: String,
}

#[derive(Serialize, Deserialize)]
enum Answer {
    Accepted { mac: String },
    Refused { reason: String },
}

/// The hash of what both sides said before the proofs: the acceptor's greeting and the
/// opener's hello, byte for byte (versions, nonces, encryption wishes, the role).
fn transcript(greeting: &[u8], hello: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"layerwise handshake 1\n");
    for part in [greeting, hello] {
        h.update((part.len() as u32).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// A connection whose handshake is done: every frame after it sealed ([`crate::seal`]).
pub struct Conn {
    pub reader: SealReader,
    pub writer: SealWriter,
    pub peer: SocketAddr,
    pub encrypted: bool,
}

impl Conn {
    fn new(stream: TcpStream, keys: Keys, peer: SocketAddr) -> WireResult<Conn> {
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        let encrypted = keys.encrypt;
        let (reader, writer) = seal::split(stream, &keys, peer.to_string())?;
        Ok(Conn { reader, writer, peer, encrypted })
    }

    /// The socket under the connection (to shut it, or to set its timeouts).
    pub fn socket(&self) -> &TcpStream {
        self.writer.socket()
    }
}

fn read_magic(r: &mut impl Read) -> WireResult<()> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m)?;
    if &m != MAGIC {
        return Err(WireError::Garbage(format!("it opened with {:?}", String::from_utf8_lossy(&m))));
    }
    Ok(())
}

/// The opening side: says what it is, proves it knows the secret, checks the acceptor
/// knows it too; every frame after this is sealed.
pub fn connect(addr: SocketAddr, auth: &Auth, role: Role) -> WireResult<Conn> {
    let stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
    stream.set_nodelay(true)?;
    let mut io = Deadline::new(&stream, HANDSHAKE_TIMEOUT);
    io.write_all(MAGIC)?;
    read_magic(&mut io)?;
    let greeting_bytes = read_plain(&mut io)?;
    let greeting: Greeting = parse(&greeting_bytes)?;
    if greeting.version != version() {
        return Err(WireError::Refused(format!("{addr} runs {}, this is {}", greeting.version, version())));
    }
    let hello = encode(&Hello { version: version(), nonce: nonce(), encrypt: auth.encrypt, role });
    let th = transcript(&greeting_bytes, &hello);
    write_plain(&mut io, &hello)?;
    write_plain(&mut io, &encode(&Proof { mac: auth.mac("initiator", &th) }))?;
    match parse(&read_plain(&mut io)?)? {
        Answer::Refused { reason } => Err(WireError::Refused(reason)),
        Answer::Accepted { mac: theirs } => {
            if !same(&theirs, &auth.mac("acceptor", &th)) {
                return Err(WireError::Denied(format!("{addr} does not know the shared secret")));
            }
            let keys = auth.keys(&th, true, greeting.encrypt || auth.encrypt);
            Conn::new(stream, keys, addr)
        }
    }
}

/// The accepting side: checks the opener's version and proof; returns what it is, and the
/// connection.
pub fn accept(stream: TcpStream, auth: &Auth) -> WireResult<(Role, Conn)> {
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let mut io = Deadline::new(&stream, HANDSHAKE_TIMEOUT);
    io.write_all(MAGIC)?;
    let greeting = encode(&Greeting { version: version(), nonce: nonce(), encrypt: auth.encrypt });
    write_plain(&mut io, &greeting)?;
    read_magic(&mut io)?;
    let hello_bytes = read_plain(&mut io)?;
    let proof: Proof = parse(&read_plain(&mut io)?)?;
    let refuse = |io: &mut Deadline, reason: String| {
        let _ = write_plain(io, &encode(&Answer::Refused { reason: reason.clone() }));
        Err(WireError::Denied(reason))
    };
    let hello: Hello = match parse(&hello_bytes) {
        Ok(h) => h,
        Err(e) => return refuse(&mut io, e.to_string()),
    };
    if hello.version != version() {
        return refuse(&mut io, format!("this side runs {}, the peer {}", version(), hello.version));
    }
    let th = transcript(&greeting, &hello_bytes);
    if !same(&proof.mac, &auth.mac("initiator", &th)) {
        return refuse(&mut io, "wrong shared secret (LAYERWISE_SECRET or --secret-file)".into());
    }
    write_plain(&mut io, &encode(&Answer::Accepted { mac: auth.mac("acceptor", &th) }))?;
    let keys = auth.keys(&th, false, hello.encrypt || auth.encrypt);
    Ok((hello.role, Conn::new(stream, keys, peer)?))
}

/// Test helpers for this crate's tests of the handshake's users.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::net::TcpListener;

    /// A coordinator that does not know the secret but says "accepted" anyway (it cannot
    /// make the acceptor's proof): the worker refuses it instead of registering.
    pub fn impostor() -> (SocketAddr, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(MAGIC).unwrap();
            let greeting = encode(&Greeting { version: version(), nonce: nonce(), encrypt: false });
            write_plain(&mut s, &greeting).unwrap();
            read_magic(&mut s).unwrap();
            let hello = read_plain(&mut s).unwrap();
            let _proof = read_plain(&mut s).unwrap();
            let guess = Auth::new(b"a guess at the secret".to_vec(), false);
            let mac = guess.mac("acceptor", &transcript(&greeting, &hello));
            write_plain(&mut s, &encode(&Answer::Accepted { mac })).unwrap();
        });
        (addr, t)
    }

    /// An [`Auth`] of the tests' secret.
    pub fn auth() -> Auth {
        Auth::new(b"a secret of sixteen".to_vec(), false)
    }

    /// Both ends of a connection that has made its handshake: (opener, acceptor).
    pub fn sealed_pair(encrypt: bool) -> (Conn, Conn) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || accept(listener.accept().unwrap().0, &auth()).unwrap().1);
        let opened =
            connect(addr, &Auth::new(b"a secret of sixteen".to_vec(), encrypt), Role::Link { job: 1, stage: 1 });
        (opened.unwrap(), t.join().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn secret(s: &[u8], encrypt: bool) -> Auth {
        Auth::new(s.to_vec(), encrypt)
    }

    /// A listener that accepts one connection with `auth`: its address, and the outcome.
    fn acceptor(auth: Auth) -> (SocketAddr, std::thread::JoinHandle<WireResult<(Role, Conn)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || accept(listener.accept().unwrap().0, &auth));
        (addr, t)
    }

    fn pair(accepting: Auth, connecting: Auth) -> (WireResult<(Role, Conn)>, WireResult<Conn>) {
        let (addr, t) = acceptor(accepting);
        let opened = connect(addr, &connecting, Role::Link { job: 7, stage: 2 });
        (t.join().unwrap(), opened)
    }

    #[test]
    fn peers_with_one_secret_meet_and_talk_sealed_encrypted_when_either_asks() {
        for (a, c) in [(false, false), (true, false), (false, true), (true, true)] {
            let (accepted, opened) = pair(secret(b"0123456789abcdef", a), secret(b"0123456789abcdef", c));
            let (role, mut theirs) = accepted.unwrap();
            let mut ours = opened.unwrap();
            assert_eq!(role, Role::Link { job: 7, stage: 2 });
            assert_eq!((ours.encrypted, theirs.encrypted), (a || c, a || c));
            ours.writer.frame(&"to the acceptor").unwrap();
            theirs.writer.frame(&"to the opener").unwrap();
            assert_eq!(theirs.reader.frame::<String>().unwrap(), "to the acceptor");
            assert_eq!(ours.reader.frame::<String>().unwrap(), "to the opener");
        }
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides_with_a_reason() {
        let (accepted, opened) = pair(secret(b"0123456789abcdef", false), secret(b"fedcba9876543210", false));
        let e = accepted.err().expect("refused").to_string();
        assert!(e.contains("wrong shared secret"), "{e}");
        let e = opened.err().expect("refused").to_string();
        assert!(e.contains("wrong shared secret"), "{e}");
    }

    #[test]
    fn garbage_is_refused_without_reading_a_claimed_length() {
        let (addr, t) = acceptor(testing::auth());
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let e = t.join().unwrap().err().expect("refused").to_string();
        assert!(e.contains("not a layerwise peer"), "{e}");
        // The right magic and then a Hello of 4 GiB, or just over the few KiB allowed
        // before authentication: refused before any allocation.
        for claim in [u32::MAX, HANDSHAKE_FRAME_MAX as u32 + 1] {
            let (addr, t) = acceptor(testing::auth());
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(MAGIC).unwrap();
            s.write_all(&claim.to_le_bytes()).unwrap();
            let e = t.join().unwrap().err().expect("refused").to_string();
            assert!(e.contains(&format!("claims {claim} bytes")), "{e}");
        }
    }

    /// A peer that sends its handshake a byte at a time, each within any per-read timeout,
    /// is cut off at the handshake's deadline all the same.
    #[test]
    fn a_trickling_peer_meets_the_handshake_deadline() {
        let (addr, t) = acceptor(testing::auth());
        let s = TcpStream::connect(addr).unwrap();
        let trickle = std::thread::spawn(move || {
            let mut s = s;
            // A Hello of 100 bytes, announced and then sent a byte every half second.
            let len = 100u32.to_le_bytes();
            let opening = MAGIC.iter().chain(&len).copied();
            for b in opening.chain(std::iter::repeat(b' ')) {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let e = t.join().unwrap().err().expect("cut off").to_string();
        assert!(e.contains("the handshake took over 10 s"), "{e}");
        trickle.join().unwrap();
    }

    /// Each proof covers the whole transcript: a relay that rewrites the opener's role (or
    /// its wish for encryption) in transit breaks the proof, and the acceptor refuses it.
    #[test]
    fn a_relay_that_rewrites_the_role_in_the_handshake_is_refused() {
        let (addr, t) = acceptor(testing::auth());
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let r = std::thread::spawn(move || {
            let (mut opener, _) = relay.accept().unwrap();
            let mut acceptor = TcpStream::connect(addr).unwrap();
            let mut magic = [0u8; 8];
            acceptor.read_exact(&mut magic).unwrap();
            opener.write_all(&magic).unwrap();
            write_plain(&mut opener, &read_plain(&mut acceptor).unwrap()).unwrap();
            opener.read_exact(&mut magic).unwrap();
            acceptor.write_all(&magic).unwrap();
            let hello = String::from_utf8(read_plain(&mut opener).unwrap()).unwrap();
            let forged = hello.replace("\"stage\":2", "\"stage\":3");
            assert_ne!(forged, hello);
            write_plain(&mut acceptor, forged.as_bytes()).unwrap();
            write_plain(&mut acceptor, &read_plain(&mut opener).unwrap()).unwrap();
            write_plain(&mut opener, &read_plain(&mut acceptor).unwrap()).unwrap();
        });
        let e = connect(relay_addr, &testing::auth(), Role::Link { job: 7, stage: 2 }).err().expect("refused");
        assert!(e.to_string().contains("wrong shared secret"), "{e}");
        assert!(t.join().unwrap().is_err());
        r.join().unwrap();
    }

    #[test]
    fn proofs_and_keys_depend_on_every_input() {
        let (a, b) = (secret(b"k", false), secret(b"K", false));
        let (t1, t2) = (transcript(b"g", b"h"), transcript(b"g", b"i"));
        assert_ne!(t1, transcript(b"gh", b""), "the parts are length-prefixed");
        let base = a.mac("initiator", &t1);
        assert_ne!(base, b.mac("initiator", &t1));
        assert_ne!(base, a.mac("acceptor", &t1));
        assert_ne!(base, a.mac("initiator", &t2));
        assert!(same(&base, &a.mac("initiator", &t1)));
        let (opener, acceptor) = (a.keys(&t1, true, false), a.keys(&t1, false, false));
        assert_eq!((opener.send, opener.recv), (acceptor.recv, acceptor.send));
        assert_ne!(opener.send, opener.recv, "each direction has its own key");
        assert_ne!(opener.send, a.keys(&t2, true, false).send);
        assert_ne!(opener.send, b.keys(&t1, true, false).send);
    }

    #[test]
    fn a_coordinator_that_cannot_prove_the_secret_is_refused_by_the_worker() {
        let (addr, t) = testing::impostor();
        let role = Role::Link { job: 1, stage: 1 };
        let e = connect(addr, &secret(b"the real secret, 16+", false), role).err().expect("refused").to_string();
        assert!(e.contains("does not know the shared secret"), "{e}");
        t.join().unwrap();
    }
}
