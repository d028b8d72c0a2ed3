//! A layer's statistics over an epoch (the reference's printout), summed on the device.

use tch::{Device, Kind, Tensor};

use crate::heads::LocalLosses;
use crate::{Named, NnError, Result};

/// The reference's per-layer statistics, summed on the device so that reading them (once
/// per epoch) is the only synchronisation.
#[derive(Debug)]
pub struct LayerStats {
    /// [sum of pred loss x B, sum of sim loss x B, local classifier errors]
    sums: Tensor,
    pub examples: u64,
}

/// Statistics read back as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerStatsSnapshot {
    pub loss_pred: f64,
    pub loss_sim: f64,
    /// Percent of examples the local classifier got wrong (NaN where it has none).
    pub error: f64,
    pub examples: u64,
}

impl LayerStats {
    pub fn new(device: Device) -> Self {
        Self { sums: Tensor::zeros([3], (Kind::Double, device)), examples: 0 }
    }

    pub(crate) fn record(&mut self, losses: &LocalLosses, labels: &Tensor) {
        let _guard = tch::no_grad_guard();
        let b = labels.size()[0];
        let zero = || Tensor::zeros([], (Kind::Double, labels.device()));
        let scaled = |t: &Option<Tensor>| t.as_ref().map_or_else(zero, |t| t.detach().to_kind(Kind::Double) * b as f64);
        let wrong = match &losses.logits {
            Some(logits) if logits.size()[1] != 1 && labels.kind() == Kind::Int64 && logits.size().len() == 2 => {
                logits.argmax(1, false).ne_tensor(labels).sum(Kind::Double)
            }
            _ => zero(),
        };
        let step = Tensor::stack(&[scaled(&losses.pred), scaled(&losses.sim), wrong], 0);
        self.sums += step;
        self.examples += b as u64;
    }

    /// Means since the last reset; `has_classifier` says whether `error` means anything.
    pub fn snapshot(&self, has_classifier: bool) -> LayerStatsSnapshot {
        let n = self.examples.max(1) as f64;
        let v: Vec<f64> = Vec::<f64>::try_from(self.sums.to_device(Device::Cpu)).unwrap_or_default();
        LayerStatsSnapshot {
            loss_pred: v[0] / n,
            loss_sim: v[1] / n,
            error: if has_classifier { 100.0 * v[2] / n } else { f64::NAN },
            examples: self.examples,
        }
    }

    pub fn reset(&mut self) {
        let _ = self.sums.zero_();
        self.examples = 0;
    }

    /// The running sums as named tensors (`stats.sums`, `stats.examples`), so that an
    /// epoch interrupted by a checkpoint reports the same figures when resumed.
    pub fn state(&self) -> Vec<Named> {
        stats_state(&self.sums, self.examples)
    }

    pub fn load_state(&mut self, named: &[Named]) -> Result<()> {
        self.examples = load_stats(&mut self.sums, named)?;
        Ok(())
    }
}

pub(crate) fn stats_state(sums: &Tensor, examples: u64) -> Vec<Named> {
    vec![
        ("stats.sums".to_string(), sums.shallow_clone()),
        ("stats.examples".to_string(), Tensor::from(examples as i64)),
    ]
}

pub(crate) fn load_stats(sums: &mut Tensor, named: &[Named]) -> Result<u64> {
    let find = |key: &str| {
        named
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t)
            .ok_or_else(|| NnError::State(format!("missing tensor {key:?}")))
    };
    let s = find("stats.sums")?;
    if s.size() != sums.size() {
        return Err(NnError::State(format!("stats.sums has shape {:?}, expected {:?}", s.size(), sums.size())));
    }
    sums.copy_(&s.to_kind(Kind::Double));
    Ok(find("stats.examples")?.int64_value(&[]) as u64)
}
