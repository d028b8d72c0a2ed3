//! A stage's training steps: its layers trained on one batch (local losses layer by layer,
//! or the global loss through all of them), each guarded so that a panic or an error
//! becomes a failure naming the layer and step, and each loss watched for NaN on the
//! device without waiting for it.

use std::panic::{catch_unwind, AssertUnwindSafe};

use layerwise_nn::network::train_global;
use layerwise_nn::Training;
use tch::{Kind, Tensor};

use super::{Stage, LAYER_SLOTS};
use crate::message::StageFailure;
use crate::thread::panic_message;

impl Stage {
    /// Runs `f` on this stage, turning a panic (libtorch errors, out of memory) into a failure.
    pub(super) fn guard<T>(
        &mut self,
        layer: Option<usize>,
        step: Option<u64>,
        f: impl FnOnce(&mut Self) -> T,
    ) -> Result<T, StageFailure> {
        catch_unwind(AssertUnwindSafe(|| f(self))).map_err(|panic| StageFailure {
            stage: self.index,
            layer,
            step,
            reason: panic_message(&*panic),
        })
    }

    /// The test build's injected fault, if one is due here; the input as it is otherwise.
    fn inject(&self, layer: usize, step: u64, x: Tensor) -> Result<Tensor, StageFailure> {
        #[cfg(feature = "fault-injection")]
        if let Some(f) = self.env.fault.filter(|f| f.layer == layer && f.step == step) {
            return f.apply(x).map_err(|reason| self.fail(Some(layer), Some(step), reason));
        }
        let _ = (layer, step);
        Ok(x)
    }

    /// Notes, on the device and without waiting for it, the first (step, layer) whose loss
    /// is not finite; reads that back every `check_finite_every` steps. So the failure names
    /// the exact step while a GPU stage synchronises only once per interval.
    pub(super) fn check_finite(&mut self, loss: &Tensor, layer: Option<usize>, step: u64) -> Result<(), StageFailure> {
        if self.plan.check_finite_every == 0 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let mark = step as i64 * LAYER_SLOTS + layer.map_or(LAYER_SLOTS - 1, |l| l as i64);
        let first = self.first_bad.get_or_insert_with(|| Tensor::from(-1i64).to_device(loss.device()));
        let keep = first.ge(0).logical_or(&loss.isfinite());
        *first = first.where_scalarother(&keep, mark);
        if step.is_multiple_of(self.plan.check_finite_every) {
            self.read_first_bad()?;
        }
        Ok(())
    }

    /// Fails if a non-finite loss was noted (read back from the device).
    pub(super) fn read_first_bad(&self) -> Result<(), StageFailure> {
        let Some(first) = &self.first_bad else { return Ok(()) };
        let v = first.int64_value(&[]);
        if v < 0 {
            return Ok(());
        }
        let (step, slot) = ((v / LAYER_SLOTS) as u64, v % LAYER_SLOTS);
        let layer = (slot != LAYER_SLOTS - 1).then_some(slot as usize);
        Err(self.fail(layer, Some(step), "non-finite loss (NaN or infinity)"))
    }

    pub(super) fn train_local_step(
        &mut self,
        mut x: Tensor,
        targets: &layerwise_nn::Targets,
        step: u64,
    ) -> Result<Tensor, StageFailure> {
        for i in 0..self.blocks.len() {
            let layer = self.blocks[i].index;
            let out = self.guard(Some(layer), Some(step), |s| {
                let x = s.inject(layer, step, x)?;
                s.blocks[i].train_local(&x, targets).map_err(|e| s.fail(Some(layer), Some(step), e.to_string()))
            })??;
            self.check_finite(&out.loss, Some(layer), step)?;
            x = out.output;
        }
        if let Some(layer) = self.output.as_ref().map(|o| o.index) {
            let loss = self.guard(Some(layer), Some(step), |s| {
                let x = s.inject(layer, step, x.shallow_clone())?;
                let out = s.output.as_mut().expect("checked").train_local(&x, &targets.labels);
                out.map(|(_, loss)| loss).map_err(|e| s.fail(Some(layer), Some(step), e.to_string()))
            })??;
            self.check_finite(&loss, Some(layer), step)?;
        }
        Ok(x)
    }

    pub(super) fn train_global_step(
        &mut self,
        x: &Tensor,
        targets: &layerwise_nn::Targets,
        step: u64,
    ) -> Result<Tensor, StageFailure> {
        let first = self.blocks.first().map_or(0, |b| b.index);
        let with_local = self.training == Training::LocalGlobal;
        let logits = self.guard(None, Some(step), |s| {
            let x = s.inject(first, step, x.shallow_clone())?;
            let output = s.output.as_mut().expect("a global stage holds the output layer");
            train_global(&mut s.blocks, output, &x, targets, with_local)
                .map_err(|e| s.fail(None, Some(step), e.to_string()))
        })??;
        self.check_finite(&logits.sum(Kind::Float), None, step)?;
        Ok(logits)
    }
}
