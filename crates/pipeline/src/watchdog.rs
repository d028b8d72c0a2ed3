//! Warnings for a stalled stage: a thread that looks every second at what each stage is
//! busy with, and warns once when one message has held a stage longer than the limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What each stage is doing: the time (ms since `start`, 0 when idle) it took its current
/// message, and the message's kind.
pub struct Watch {
    start: Instant,
    since: Vec<AtomicU64>,
    kind: Mutex<Vec<&'static str>>,
}

impl Watch {
    pub fn new(stages: usize) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            since: (0..stages).map(|_| AtomicU64::new(0)).collect(),
            kind: Mutex::new(vec![""; stages]),
        })
    }

    pub fn busy(&self, stage: usize, kind: &'static str) {
        self.since[stage].store(self.start.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        if let Ok(mut k) = self.kind.lock() {
            k[stage] = kind;
        }
    }

    pub fn idle(&self, stage: usize) {
        self.since[stage].store(0, Ordering::Relaxed);
    }
}

pub struct Watchdog {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub fn spawn(watch: Arc<Watch>, limit: Duration, stage_layers: Vec<Vec<usize>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut warned = vec![0u64; watch.since.len()];
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = watch.start.elapsed().as_millis() as u64 + 1;
                    for (i, since) in watch.since.iter().enumerate() {
                        let s = since.load(Ordering::Relaxed);
                        if s != 0 && s != warned[i] && now - s > limit.as_millis() as u64 {
                            warned[i] = s;
                            let kind = watch.kind.lock().map(|k| k[i]).unwrap_or("?");
                            tracing::warn!(
                                stage = i,
                                "stage {i} (layers {:?}) has been busy with one {kind} message for {:.0} s: stalled, or far slower than the others",
                                stage_layers[i],
                                (now - s) as f64 / 1000.0
                            );
                        }
                    }
                }
            })
            .expect("spawn watchdog");
        Self { stop, handle: Some(handle) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
