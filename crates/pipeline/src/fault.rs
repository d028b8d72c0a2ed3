//! Faults injected into a stage at a given layer and step, for the tests of failure
//! handling. Compiled only with the `fault-injection` feature (the test build), never into
//! the release binary.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub enum FaultKind {
    /// The layer returns an error.
    Error,
    /// The layer panics.
    Panic,
    /// The layer's input turns to NaN, so its loss does.
    NonFinite,
    /// The layer asks for more memory than any machine has.
    OutOfMemory,
    /// The layer stalls until the flag is set (by the test that watches for the stall).
    Hold(&'static AtomicBool),
}

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub layer: usize,
    pub step: u64,
    pub kind: FaultKind,
}

impl Fault {
    /// Applies the fault to the layer's input: the input to go on with, or why the layer fails.
    pub fn apply(&self, x: Tensor) -> Result<Tensor, String> {
        match self.kind {
            FaultKind::Error => Err("injected error".into()),
            FaultKind::Panic => panic!("injected panic"),
            FaultKind::NonFinite => Ok(x * f64::NAN),
            FaultKind::Hold(release) => {
                while !release.load(Ordering::SeqCst) {
                    std::thread::park_timeout(std::time::Duration::from_millis(5));
                }
                Ok(x)
            }
            FaultKind::OutOfMemory => {
                let huge = Tensor::f_empty([1 << 46], (Kind::Float, x.device()))
                    .map_err(|e| format!("out of memory: {}", e.to_string().lines().next().unwrap_or("")))?;
                Ok(x + huge.sum(Kind::Float))
            }
        }
    }
}
