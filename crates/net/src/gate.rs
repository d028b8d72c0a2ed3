//! The door of a listening process (a coordinator, or a worker taking data links): what
//! a connection may cost before it has proved the secret. Each handshake runs in a thread
//! of its own under one deadline ([`crate::wire::HANDSHAKE_TIMEOUT`]) and reads at most a
//! few KiB; at most [`MAX_HANDSHAKES`] run at once, and a connection beyond them is closed
//! at once (its peer, if it is one of ours, tries again). An error from `accept` (out of
//! file descriptors, say) backs off instead of spinning.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::{self, Auth, Conn, Role};

/// Handshakes in progress at once, at most.
pub const MAX_HANDSHAKES: usize = 1024;
/// The longest pause after a failed `accept`.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One handshake's place among the [`MAX_HANDSHAKES`]; given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Slot> {
        let taken = count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_HANDSHAKES).then_some(n + 1));
        taken.ok().map(|_| Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `listener` in a thread named `name`: each connection that completes the
/// handshake with `auth` is handed to `admit` (in the connection's own thread), each that
/// fails is logged and closed.
pub fn serve<F>(listener: TcpListener, auth: Auth, name: &str, admit: F) -> std::io::Result<()>
where
    F: Fn(Role, Conn) + Send + Sync + 'static,
{
    let admit = Arc::new(admit);
    let in_progress = Arc::new(AtomicUsize::new(0));
    let what = name.to_string();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut backoff = Duration::ZERO;
        let mut said_full: Option<Instant> = None;
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), BACKOFF_MAX);
                    tracing::warn!("{what}: cannot accept a connection ({e}); pausing {} ms", backoff.as_millis());
                    std::thread::sleep(backoff);
                    continue;
                }
            };
            backoff = Duration::ZERO;
            let Some(slot) = Slot::take(&in_progress) else {
                if said_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!("{what}: {MAX_HANDSHAKES} handshakes in progress; closing new connections");
                    said_full = Some(Instant::now());
                }
                continue;
            };
            let (auth, admit) = (auth.clone(), admit.clone());
            let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a: SocketAddr| a.to_string());
            let spawned = std::thread::Builder::new().name("peer".into()).spawn(move || {
                let met = wire::accept(stream, &auth);
                drop(slot);
                match met {
                    Ok((role, conn)) => admit(role, conn),
                    Err(e) => tracing::warn!("refused a connection from {peer}: {e}"),
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("{what}: cannot start a thread for a connection: {e}");
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testing::auth;
    use std::net::TcpStream;

    #[test]
    fn slots_are_capped_and_given_back() {
        let count = Arc::new(AtomicUsize::new(0));
        let slots: Vec<Slot> = (0..MAX_HANDSHAKES).map(|_| Slot::take(&count).unwrap()).collect();
        assert!(Slot::take(&count).is_none(), "the cap holds");
        drop(slots);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        assert!(Slot::take(&count).is_some());
    }

    /// A thousand connections that never say a word hold handshake slots (or are closed
    /// when none is free); a peer that knows the secret still gets through at once.
    #[test]
    fn a_legitimate_peer_gets_in_while_a_thousand_idle_connections_are_open() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        serve(listener, auth(), "test-gate", move |role, _conn| {
            let _ = tx.send(role);
        })
        .unwrap();
        let idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let role = Role::Link { job: 3, stage: 1 };
        let conn = wire::connect(addr, &auth(), role.clone()).unwrap();
        assert_eq!(rx.recv().unwrap(), role);
        drop((idle, conn));
    }
}
