//! What goes over a TCP connection between layerwise processes: a magic line, then
//! length-prefixed frames. Every connection opens with a handshake that checks the peer's
//! version and proves, both ways, that each side knows the shared secret (HMAC-SHA256 over
//! both sides' fresh nonces; the secret itself never travels).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use layerwise_plan::DeviceId;

/// The first bytes each side writes: anything else on the port is not a layerwise peer.
const MAGIC: &[u8; 8] = b"LWIRE01\n";
/// The wire format's version; peers of another version are refused with both named.
pub const WIRE_VERSION: u32 = 5;
/// A control frame is a JSON object: configs, plans, reports. Larger is garbage.
pub const MAX_CONTROL_FRAME: usize = 16 << 20;
/// How long a peer may take over its part of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// This build's identity on the wire: the release and the wire format (and byte order,
/// since tensors travel as raw bytes).
pub fn version() -> String {
    let order = if cfg!(target_endian = "little") { "le" } else { "be" };
    format!("layerwise {} wire {WIRE_VERSION} {order}", env!("CARGO_PKG_VERSION"))
}

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
    #[error("{0}")]
    Nccl(String),
}

pub type WireResult<T> = std::result::Result<T, WireError>;

/// Writes one JSON frame: u32 little-endian length, then the bytes.
pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> WireResult<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| WireError::Garbage(format!("cannot encode a frame: {e}")))?;
    if bytes.len() > MAX_CONTROL_FRAME {
        return Err(WireError::Garbage(format!("a frame of {} bytes is over the limit", bytes.len())));
    }
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads one JSON frame, refusing lengths over [`MAX_CONTROL_FRAME`] before allocating.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> WireResult<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(WireError::Garbage(format!("a frame claims {len} bytes (the limit is {MAX_CONTROL_FRAME})")));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| WireError::Garbage(format!("a frame that does not parse: {e}")))
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

#[derive(Serialize, Deserialize)]
struct Greeting {
    version: String,
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    version: String,
    nonce: String,
    mac: String,
    role: Role,
}

#[derive(Serialize, Deserialize)]
enum Answer {
    Accepted { mac: String },
    Refused { reason: String },
}

/// 32 random bytes as hex: a handshake's nonce, or a fresh secret for processes started
/// together (`bench train`'s workers).
pub fn nonce() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mac(secret: &[u8], label: &str, first: &str, second: &str) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    for part in [label, "\n", first, "\n", second] {
        m.update(part.as_bytes());
    }
    hex(&m.finalize().into_bytes())
}

/// Compares two MACs in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_magic(stream: &mut TcpStream) -> WireResult<()> {
    let mut m = [0u8; 8];
    stream.read_exact(&mut m)?;
    if &m != MAGIC {
        return Err(WireError::Garbage(format!("it opened with {:?}", String::from_utf8_lossy(&m))));
    }
    Ok(())
}

/// The opening side: proves it knows `secret`, says what it is, checks the acceptor knows
/// the secret too.
pub fn connect(addr: SocketAddr, secret: &[u8], role: Role) -> WireResult<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.write_all(MAGIC)?;
    read_magic(&mut stream)?;
    let greeting: Greeting = read_frame(&mut stream)?;
    if greeting.version != version() {
        return Err(WireError::Refused(format!("{addr} runs {}, this is {}", greeting.version, version())));
    }
    let own = nonce();
    let hello =
        Hello { version: version(), mac: mac(secret, "initiator", &greeting.nonce, &own), nonce: own.clone(), role };
    write_frame(&mut stream, &hello)?;
    match read_frame(&mut stream)? {
        Answer::Refused { reason } => Err(WireError::Refused(reason)),
        Answer::Accepted { mac: theirs } => {
            if !same(&theirs, &mac(secret, "acceptor", &own, &greeting.nonce)) {
                return Err(WireError::Denied(format!("{addr} does not know the shared secret")));
            }
            stream.set_read_timeout(None)?;
            Ok(stream)
        }
    }
}

/// The accepting side: checks the opener's version and proof; returns what it is.
pub fn accept(stream: &mut TcpStream, secret: &[u8]) -> WireResult<Role> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.write_all(MAGIC)?;
    let own = nonce();
    write_frame(stream, &Greeting { version: version(), nonce: own.clone() })?;
    read_magic(stream)?;
    let hello: Hello = read_frame(stream)?;
    let refuse = |stream: &mut TcpStream, reason: String| {
        let _ = write_frame(stream, &Answer::Refused { reason: reason.clone() });
        Err(WireError::Denied(reason))
    };
    if hello.version != version() {
        return refuse(stream, format!("this side runs {}, the peer {}", version(), hello.version));
    }
    if !same(&hello.mac, &mac(secret, "initiator", &own, &hello.nonce)) {
        return refuse(stream, "wrong shared secret (LAYERWISE_SECRET or --secret-file)".into());
    }
    write_frame(stream, &Answer::Accepted { mac: mac(secret, "acceptor", &hello.nonce, &own) })?;
    stream.set_read_timeout(None)?;
    Ok(hello.role)
}

/// The shared secret: the file named (trailing newline dropped), else `LAYERWISE_SECRET`.
/// Never a command-line value: those show in `ps`.
pub fn load_secret(file: Option<&std::path::Path>) -> crate::Result<Vec<u8>> {
    let secret = match file {
        Some(path) => {
            let meta = std::fs::metadata(path)
                .map_err(|e| crate::Error::Config(format!("{}: cannot read the secret: {e}", path.display())))?;
            // As ssh refuses a private key others can read: the secret is the cluster's key.
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
            if mode & 0o077 != 0 {
                return Err(crate::Error::Config(format!(
                    "{}: the secret is readable by group or others (mode {mode:03o}): chmod 600 it",
                    path.display()
                )));
            }
            let text = std::fs::read(path)
                .map_err(|e| crate::Error::Config(format!("{}: cannot read the secret: {e}", path.display())))?;
            let end = text.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
            text[..end].to_vec()
        }
        None => std::env::var_os("LAYERWISE_SECRET").map(|s| s.into_encoded_bytes()).unwrap_or_default(),
    };
    if secret.len() < 16 {
        return Err(crate::Error::Config(format!(
            "a shared secret of at least 16 bytes authenticates workers: set LAYERWISE_SECRET or pass --secret-file ({})",
            if secret.is_empty() { "none given".to_string() } else { format!("{} bytes given", secret.len()) }
        )));
    }
    Ok(secret)
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
            let own = nonce();
            write_frame(&mut s, &Greeting { version: version(), nonce: own.clone() }).unwrap();
            read_magic(&mut s).unwrap();
            let hello: Hello = read_frame(&mut s).unwrap();
            let guess = mac(b"a guess at the secret", "acceptor", &hello.nonce, &own);
            write_frame(&mut s, &Answer::Accepted { mac: guess }).unwrap();
        });
        (addr, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A listener that accepts one connection with `secret`: its address, and the outcome.
    fn acceptor(secret: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<WireResult<Role>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            accept(&mut s, secret)
        });
        (addr, t)
    }

    fn pair(accept_secret: &'static [u8], connect_secret: &'static [u8]) -> (WireResult<Role>, WireResult<TcpStream>) {
        let (addr, t) = acceptor(accept_secret);
        let opened = connect(addr, connect_secret, Role::Link { job: 7, stage: 2 });
        (t.join().unwrap(), opened)
    }

    #[test]
    fn peers_with_one_secret_meet_and_the_acceptor_learns_the_role() {
        let (role, stream) = pair(b"0123456789abcdef", b"0123456789abcdef");
        assert_eq!(role.unwrap(), Role::Link { job: 7, stage: 2 });
        assert!(stream.is_ok());
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides_with_a_reason() {
        let (role, stream) = pair(b"0123456789abcdef", b"fedcba9876543210");
        assert!(matches!(role, Err(WireError::Denied(ref r)) if r.contains("wrong shared secret")), "{role:?}");
        let e = stream.unwrap_err().to_string();
        assert!(e.contains("wrong shared secret"), "{e}");
    }

    #[test]
    fn garbage_is_refused_without_reading_a_claimed_length() {
        let (addr, t) = acceptor(b"0123456789abcdef");
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("not a layerwise peer"), "{e}");
        // The right magic and then a length of 4 GiB: refused before any allocation.
        let (addr, t) = acceptor(b"0123456789abcdef");
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(MAGIC).unwrap();
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("claims 4294967295 bytes"), "{e}");
    }

    #[test]
    fn macs_depend_on_every_input() {
        let base = mac(b"k", "initiator", "a", "b");
        assert_ne!(base, mac(b"K", "initiator", "a", "b"));
        assert_ne!(base, mac(b"k", "acceptor", "a", "b"));
        assert_ne!(base, mac(b"k", "initiator", "b", "a"));
        assert!(same(&base, &mac(b"k", "initiator", "a", "b")));
    }

    #[test]
    fn a_coordinator_that_cannot_prove_the_secret_is_refused_by_the_worker() {
        let (addr, t) = testing::impostor();
        let role = Role::Link { job: 1, stage: 1 };
        let e = connect(addr, b"the real secret, 16+", role).unwrap_err().to_string();
        assert!(e.contains("does not know the shared secret"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_secret_under_16_bytes_or_readable_by_others_is_refused_before_anything_listens() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        let write = |bytes: &[u8], mode: u32| {
            std::fs::write(&file, bytes).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(b"fifteen bytes!!\n", 0o600); // the newline is not counted
        let e = load_secret(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("at least 16 bytes") && e.contains("15 bytes given"), "{e}");
        write(b"sixteen bytes!!!\n", 0o600);
        assert_eq!(load_secret(Some(&file)).unwrap(), b"sixteen bytes!!!");
        // Readable by others or by the group: refused, whatever it holds.
        for mode in [0o644, 0o640, 0o604] {
            write(b"sixteen bytes!!!\n", mode);
            let e = load_secret(Some(&file)).unwrap_err().to_string();
            assert!(e.contains("readable by group or others") && e.contains(&format!("{mode:03o}")), "{e}");
        }
        let e = load_secret(Some(&dir.path().join("missing"))).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("cannot read the secret"), "{e}");
    }
}
