//! The cluster's shared secret: where it is read from, what may read it, and how the
//! handshake proves it ([`Auth`]: HMAC-SHA256 proofs and HKDF-SHA256 session keys, both over
//! the handshake's transcript).

use std::sync::{Arc, OnceLock};

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::seal::Keys;

/// What proves a peer: the cluster's shared secret, and whether this process asks for its
/// connections to be encrypted (a connection is encrypted when either end asks).
#[derive(Clone)]
pub struct Auth {
    secret: Arc<Vec<u8>>,
    pub encrypt: bool,
}

impl Auth {
    pub fn new(secret: Vec<u8>, encrypt: bool) -> Self {
        Self { secret: Arc::new(secret), encrypt }
    }

    /// The same secret, asking for encryption when `also` (a job's `pipeline.encrypt`).
    pub fn encrypting_if(&self, also: bool) -> Self {
        Self { secret: self.secret.clone(), encrypt: self.encrypt || also }
    }

    pub(crate) fn mac(&self, label: &str, transcript: &[u8; 32]) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        m.update(label.as_bytes());
        m.update(transcript);
        hex(&m.finalize().into_bytes())
    }

    /// The two directions' keys of a connection with this transcript: HKDF-SHA256 of the
    /// secret, salted with the transcript's hash.
    pub(crate) fn keys(&self, transcript: &[u8; 32], initiator: bool, encrypt: bool) -> Keys {
        let kdf = Hkdf::<Sha256>::new(Some(transcript), &self.secret);
        let mut to_acceptor = [0u8; 32];
        let mut to_initiator = [0u8; 32];
        kdf.expand(b"layerwise 1 initiator to acceptor", &mut to_acceptor).expect("32 bytes is a valid length");
        kdf.expand(b"layerwise 1 acceptor to initiator", &mut to_initiator).expect("32 bytes is a valid length");
        if initiator {
            Keys { send: to_acceptor, recv: to_initiator, encrypt }
        } else {
            Keys { send: to_initiator, recv: to_acceptor, encrypt }
        }
    }
}

/// 32 random bytes as hex: a handshake's nonce, or a fresh secret for processes started
/// together (`bench train`'s workers).
pub fn nonce() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two MACs in time independent of where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// LAYERWISE_SECRET, as it was when [`take_from_environment`] took it out of the
/// environment (or as it is now, if that was never called).
static FROM_ENVIRONMENT: OnceLock<Vec<u8>> = OnceLock::new();

/// Takes LAYERWISE_SECRET out of this process's environment, keeping it for
/// [`load_secret`]: no child process (a data set's helper, a shell a job runs) inherits it.
/// Call before any thread starts.
pub fn take_from_environment() {
    let secret = std::env::var_os("LAYERWISE_SECRET").map(|s| s.into_encoded_bytes()).unwrap_or_default();
    let _ = FROM_ENVIRONMENT.set(secret);
    std::env::remove_var("LAYERWISE_SECRET");
}

fn from_environment() -> Vec<u8> {
    FROM_ENVIRONMENT
        .get()
        .cloned()
        .unwrap_or_else(|| std::env::var_os("LAYERWISE_SECRET").map(|s| s.into_encoded_bytes()).unwrap_or_default())
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
        None => from_environment(),
    };
    if secret.len() < 16 {
        return Err(crate::Error::Config(format!(
            "a shared secret of at least 16 bytes authenticates workers: set LAYERWISE_SECRET or pass --secret-file ({})",
            if secret.is_empty() { "none given".to_string() } else { format!("{} bytes given", secret.len()) }
        )));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

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
