//! Bytes the links between processes carried, for `/metrics`: one counter per run, stage
//! fed and direction, for the life of the process (a resumed run's counters go on).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which way the bytes went, seen from this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Sent,
    Received,
}

type Counters = BTreeMap<(String, usize, Direction), Arc<AtomicU64>>;

static COUNTERS: Mutex<Counters> = Mutex::new(BTreeMap::new());

/// The counter of `run`'s link into `stage`, in `direction` (made on first use).
pub fn counter(run: &str, stage: usize, direction: Direction) -> Arc<AtomicU64> {
    let mut all = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    all.entry((run.to_string(), stage, direction)).or_default().clone()
}

/// Every counter now: (run, stage fed, direction, bytes).
pub fn snapshot() -> Vec<(String, usize, Direction, u64)> {
    let all = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    all.iter().map(|((run, stage, d), c)| (run.clone(), *stage, *d, c.load(Ordering::Relaxed))).collect()
}
