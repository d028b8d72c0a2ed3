//! An NCCL link's group, met over the link's own sealed connection: the sending rank's
//! c10d sets the NCCL unique id in its in-memory store, and this code carries each such
//! set to the receiving rank's store in a sealed frame; no store listens on any port. The
//! communicator is made while the link is set up (one warm-up element crosses), so a
//! failure to meet shows then, naming the stage and GPU, not at the first batch.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use layerwise_nccl::{Group, Store};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::codec::{NCCL_RECEIVER, NCCL_SENDER};
use crate::wire::Conn;

/// The longest an NCCL link may take to meet its peer, and one transfer may take, before
/// c10d aborts it (a lost peer is normally noticed sooner, by
/// [`crate::protocol::PEER_TIMEOUT`], and the job's groups aborted then).
pub const NCCL_TIMEOUT: Duration = Duration::from_secs(120);

/// The key prefix of every link's group (each link has a store of its own).
const PREFIX: &str = "layerwise/link";

/// What the sending end says over the link while the group meets.
#[derive(Serialize, Deserialize)]
enum Meeting {
    /// c10d set `key` on the sending rank: set it on the receiving rank too.
    Set { key: String, value: Vec<u8> },
    /// The sending rank's side of the communicator is made: data follows.
    Met,
}

/// One element sent or received on `device`, in a thread of its own: it makes the
/// communicator, and waits for the peer to make its side.
fn warm_up(group: &Arc<Group>, device: usize, rank: usize) -> std::io::Result<JoinHandle<Result<(), String>>> {
    let group = group.clone();
    std::thread::Builder::new().name("nccl-meet".into()).spawn(move || {
        let mut t = Tensor::f_zeros([1], (Kind::Float, Device::Cuda(device))).map_err(|e| e.to_string())?;
        match rank {
            NCCL_SENDER => group.send(&t, NCCL_RECEIVER),
            _ => group.recv(&mut t, NCCL_SENDER),
        }
    })
}

fn joined(warm: JoinHandle<Result<(), String>>) -> Result<(), String> {
    warm.join().unwrap_or_else(|_| Err("the NCCL warm-up panicked".into()))
}

/// The sending end's group on cuda:`gpu`, met over `conn`.
pub fn sender(conn: &mut Conn, gpu: usize) -> Result<Arc<Group>, String> {
    let store = Arc::new(Store::new(NCCL_TIMEOUT)?);
    let group = Arc::new(Group::new(store.clone(), PREFIX, NCCL_SENDER, 2, NCCL_TIMEOUT)?);
    let warm = warm_up(&group, gpu, NCCL_SENDER).map_err(|e| e.to_string())?;
    let since = Instant::now();
    while !warm.is_finished() {
        if let Some((key, value)) = store.take(Duration::from_millis(200))? {
            conn.writer.frame(&Meeting::Set { key, value }).map_err(|e| e.to_string())?;
        } else if since.elapsed() > NCCL_TIMEOUT {
            // The warm-up fails on its own at c10d's timeout; this only bounds our wait.
            return Err(format!("the peer did not join within {} s", NCCL_TIMEOUT.as_secs()));
        }
    }
    joined(warm)?;
    conn.writer.frame(&Meeting::Met).map_err(|e| e.to_string())?;
    Ok(group)
}

/// The receiving end's group on cuda:`gpu`, met over `conn`.
pub fn receiver(conn: &mut Conn, gpu: usize) -> Result<Arc<Group>, String> {
    let store = Arc::new(Store::new(NCCL_TIMEOUT)?);
    let group = Arc::new(Group::new(store.clone(), PREFIX, NCCL_RECEIVER, 2, NCCL_TIMEOUT)?);
    let warm = warm_up(&group, gpu, NCCL_RECEIVER).map_err(|e| e.to_string())?;
    conn.socket().set_read_timeout(Some(NCCL_TIMEOUT)).map_err(|e| e.to_string())?;
    while let Meeting::Set { key, value } = conn.reader.frame::<Meeting>().map_err(|e| e.to_string())? {
        store.put(&key, &value)?;
    }
    joined(warm)?;
    Ok(group)
}
