//! Optimizers written on tensors, so that their state is a set of named tensors that a
//! checkpoint saves (tch's own optimizers hide theirs).
//!
//! Adam and AMSGrad run libtorch's fused kernel by default (`optim.fused`), as
//! `torch.optim.Adam(fused=True)` does. Otherwise, and for SGD, each step follows
//! `torch.optim`'s single-tensor path op for op, with fused equivalents where tch lacks the
//! `alpha`/`value` arguments. On CPU either path is bit-identical to PyTorch's same path
//! (checked by the golden tests).

use std::ffi::{c_int, CStr};

use tch::{Kind, Tensor};

use crate::config::{OptimConfig, OptimKind};
use crate::ffi;
use crate::load_into;
use crate::{Named, NnError, Result};

#[derive(Debug)]
struct ParamState {
    name: String,
    param: Tensor,
    /// Steps taken by this parameter (PyTorch counts per parameter).
    step: i64,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    max_exp_avg_sq: Option<Tensor>,
    momentum_buffer: Option<Tensor>,
    /// `step` as a float32 scalar on the parameter's device, which the fused kernel reads;
    /// made from `step` when first needed (and again after a restore).
    step_tensor: Option<Tensor>,
}

#[derive(Debug)]
pub struct Optimizer {
    config: OptimConfig,
    lr: f64,
    params: Vec<ParamState>,
}

/// `a + alpha * b` with PyTorch's rounding (its `add(b, alpha)` is a fused multiply-add).
fn add_scaled(a: &Tensor, b: &Tensor, alpha: f64) -> Tensor {
    a.addcmul(b, &Tensor::from(alpha))
}

impl Optimizer {
    pub fn new(config: &OptimConfig, params: Vec<Named>) -> Self {
        let params = params
            .into_iter()
            .map(|(name, param)| ParamState {
                name,
                param,
                step: 0,
                exp_avg: None,
                exp_avg_sq: None,
                max_exp_avg_sq: None,
                momentum_buffer: None,
                step_tensor: None,
            })
            .collect();
        Self { config: config.clone(), lr: config.lr, params }
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Number of parameters this optimizer updates.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The parameters, in the order `step` expects their gradients.
    pub fn tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.param.shallow_clone()).collect()
    }

    /// One update. `grads[i]` belongs to the i-th parameter; an undefined gradient (the
    /// parameter took no part in the loss) skips that parameter, as PyTorch skips `None`.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        if c.fused && matches!(c.kind, OptimKind::Adam | OptimKind::Amsgrad) {
            return fused_adam_step(&mut self.params, grads, c, self.lr);
        }
        for (state, grad) in self.params.iter_mut().zip(grads) {
            if !grad.defined() {
                continue;
            }
            state.step += 1;
            let grad = if c.weight_decay != 0.0 {
                add_scaled(grad, &state.param, c.weight_decay)
            } else {
                grad.shallow_clone()
            };
            match c.kind {
                OptimKind::Adam | OptimKind::Amsgrad => adam_update(state, &grad, c, self.lr),
                OptimKind::Sgd => sgd_update(state, grad, c, self.lr),
            }
        }
        Ok(())
    }

    /// The state as named tensors: `{param}.step` (int64), `.exp_avg`, `.exp_avg_sq`,
    /// `.max_exp_avg_sq`, `.momentum_buffer` where they exist, and `lr` (float64).
    pub fn state(&self) -> Vec<Named> {
        let mut out = vec![("lr".to_string(), Tensor::from(self.lr))];
        for p in &self.params {
            out.push((format!("{}.step", p.name), Tensor::from(p.step)));
            let parts = [
                ("exp_avg", &p.exp_avg),
                ("exp_avg_sq", &p.exp_avg_sq),
                ("max_exp_avg_sq", &p.max_exp_avg_sq),
                ("momentum_buffer", &p.momentum_buffer),
            ];
            for (suffix, t) in parts {
                if let Some(t) = t {
                    out.push((format!("{}.{suffix}", p.name), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores what [`Optimizer::state`] saved, for the same parameters.
    pub fn load_state(&mut self, named: &[Named]) -> Result<()> {
        let find = |key: &str| named.iter().find(|(n, _)| n == key).map(|(_, t)| t);
        let lr = find("lr").ok_or_else(|| NnError::State("optimizer: missing \"lr\"".into()))?;
        self.lr = lr.double_value(&[]);
        for p in &mut self.params {
            let step = find(&format!("{}.step", p.name))
                .ok_or_else(|| NnError::State(format!("optimizer: missing \"{}.step\"", p.name)))?;
            p.step = step.int64_value(&[]);
            p.step_tensor = None;
            let slot = |suffix: &str| -> Result<Option<Tensor>> {
                match find(&format!("{}.{suffix}", p.name)) {
                    None => Ok(None),
                    Some(t) if t.size() != p.param.size() => Err(NnError::State(format!(
                        "optimizer: \"{}.{suffix}\" has shape {:?}, expected {:?}",
                        p.name,
                        t.size(),
                        p.param.size()
                    ))),
                    Some(t) => {
                        // In the parameter's own layout (channels-last convolutions).
                        let mut slot = p.param.zeros_like();
                        slot.copy_(&t.to_kind(Kind::Float));
                        Ok(Some(slot))
                    }
                }
            };
            p.exp_avg = slot("exp_avg")?;
            p.exp_avg_sq = slot("exp_avg_sq")?;
            p.max_exp_avg_sq = slot("max_exp_avg_sq")?;
            p.momentum_buffer = slot("momentum_buffer")?;
        }
        Ok(())
    }

    /// Copies parameter values from named tensors (used when loading a model).
    pub fn load_parameters(&self, named: &[Named], owner: &str) -> Result<()> {
        let params: Vec<Named> = self.params.iter().map(|p| (p.name.clone(), p.param.shallow_clone())).collect();
        load_into(&params, named, owner)
    }
}

/// One step of every parameter with a gradient, in libtorch's fused Adam kernel.
fn fused_adam_step(params: &mut [ParamState], grads: &[Tensor], c: &OptimConfig, lr: f64) -> Result<()> {
    let amsgrad = c.kind == OptimKind::Amsgrad;
    let mut taking: Vec<(&ParamState, &Tensor)> = Vec::with_capacity(params.len());
    for (state, grad) in params.iter_mut().zip(grads) {
        if !grad.defined() {
            continue;
        }
        state.step += 1;
        let step = state.step as f64;
        match state.step_tensor.as_mut() {
            Some(t) => {
                let _ = t.g_add_scalar_(1.0);
            }
            None => state.step_tensor = Some(Tensor::from(step as f32).to_device(state.param.device())),
        }
        let zeros = || state.param.zeros_like();
        state.exp_avg.get_or_insert_with(zeros);
        state.exp_avg_sq.get_or_insert_with(zeros);
        if amsgrad {
            state.max_exp_avg_sq.get_or_insert_with(zeros);
        }
        taking.push((state, grad));
    }
    if taking.is_empty() {
        return Ok(());
    }
    let slot = |f: fn(&ParamState) -> &Option<Tensor>| -> Vec<ffi::TensorPtr> {
        ffi::ptrs(taking.iter().map(|(s, _)| f(s).as_ref().expect("made above")))
    };
    let p = ffi::ptrs(taking.iter().map(|(s, _)| &s.param));
    let g = ffi::ptrs(taking.iter().map(|(_, g)| *g));
    let (m, v, steps) = (slot(|s| &s.exp_avg), slot(|s| &s.exp_avg_sq), slot(|s| &s.step_tensor));
    let vmax = if amsgrad { slot(|s| &s.max_exp_avg_sq) } else { Vec::new() };
    let mut err = [0u8; 1024];
    // SAFETY: every pointer is a live tensor handle borrowed for the call; each list holds
    // `p.len()` of them (`vmax` too when AMSGrad reads it); `err` is as long as said.
    let rc = unsafe {
        ffi::lw_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            if amsgrad { vmax.as_ptr() } else { std::ptr::null() },
            steps.as_ptr(),
            p.len(),
            lr,
            c.betas.0,
            c.betas.1,
            c.weight_decay,
            c.eps,
            amsgrad as c_int,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let why = CStr::from_bytes_until_nul(&err).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    Err(NnError::Model(format!("optimizer step (fused Adam): {why}")))
}

fn adam_update(state: &mut ParamState, grad: &Tensor, c: &OptimConfig, lr: f64) {
    let (beta1, beta2) = c.betas;
    let exp_avg = state.exp_avg.get_or_insert_with(|| state.param.zeros_like());
    let exp_avg_sq = state.exp_avg_sq.get_or_insert_with(|| state.param.zeros_like());
    let _ = exp_avg.lerp_(grad, 1.0 - beta1);
    let _ = exp_avg_sq.g_mul_scalar_(beta2);
    let _ = exp_avg_sq.addcmul_(&grad.g_mul_scalar(1.0 - beta2), grad);
    let step = state.step as f64;
    let bias_correction1 = 1.0 - beta1.powf(step);
    let bias_correction2 = 1.0 - beta2.powf(step);
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.sqrt();
    let second = if c.kind == OptimKind::Amsgrad {
        let max = state.max_exp_avg_sq.get_or_insert_with(|| state.param.zeros_like());
        let _ = max.maximum_out(max, exp_avg_sq);
        max.shallow_clone()
    } else {
        exp_avg_sq.shallow_clone()
    };
    let mut denom = second.sqrt().g_div_scalar(bias_correction2_sqrt);
    let _ = denom.g_add_scalar_(c.eps);
    let _ = state.param.addcdiv_(&exp_avg.g_mul_scalar(-step_size), &denom);
}

fn sgd_update(state: &mut ParamState, grad: Tensor, c: &OptimConfig, lr: f64) {
    let grad = if c.momentum != 0.0 {
        let buf = match state.momentum_buffer.take() {
            None => grad.copy(),
            Some(mut buf) => {
                let _ = buf.g_mul_scalar_(c.momentum);
                if c.dampening == 0.0 {
                    let _ = buf.g_add_(&grad);
                } else {
                    let _ = buf.addcmul_(&grad, &Tensor::from(1.0 - c.dampening));
                }
                buf
            }
        };
        let g = if c.nesterov { add_scaled(&grad, &buf, c.momentum) } else { buf.shallow_clone() };
        state.momentum_buffer = Some(buf);
        g
    } else {
        grad
    };
    let _ = state.param.addcmul_(&grad, &Tensor::from(-lr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn adam(fused: bool, kind: OptimKind) -> OptimConfig {
        OptimConfig { kind, lr: 0.1, weight_decay: 1e-3, fused, ..Default::default() }
    }

    /// A conv weight kept channels-last, stepped with gradients in either layout.
    fn stepped(config: &OptimConfig, grads_channels_last: bool) -> Vec<Named> {
        // A generator of its own: libtorch's global one is shared with the tests beside.
        let mut rng = crate::rng::LayerRng::new(3, 0, crate::rng::Purpose::Init);
        let mut draw = || crate::init::uniform(&mut rng, &[6, 4, 3, 3], 2.0, Device::Cpu);
        let w = crate::init::channels_last(draw());
        let mut opt = Optimizer::new(config, vec![("w".into(), w.shallow_clone())]);
        for _ in 0..3 {
            let g = draw();
            let g = if grads_channels_last { crate::init::channels_last(g) } else { g };
            opt.step(&[g]).unwrap();
        }
        let mut out = opt.state();
        out.push(("w".into(), w.contiguous()));
        out
    }

    #[test]
    fn the_fused_kernel_steps_a_channels_last_weight_right_whatever_its_gradients_layout() {
        for kind in [OptimKind::Adam, OptimKind::Amsgrad] {
            let single = stepped(&adam(false, kind), false);
            for grads_channels_last in [false, true] {
                let fused = stepped(&adam(true, kind), grads_channels_last);
                assert_eq!(fused.len(), single.len(), "{kind:?}: the same state");
                for ((name, a), (_, b)) in fused.iter().zip(&single) {
                    // The two paths round the final update differently: a few ulps apart.
                    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
                    assert!(diff < 1e-6, "{kind:?}, channels-last grads {grads_channels_last}: {name} off by {diff}");
                }
            }
        }
    }

    #[test]
    fn a_parameter_without_a_gradient_is_left_alone_by_the_fused_step() {
        let (a, b) = (Tensor::ones([3], (Kind::Float, Device::Cpu)), Tensor::ones([2], (Kind::Float, Device::Cpu)));
        let mut opt = Optimizer::new(
            &adam(true, OptimKind::Adam),
            vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())],
        );
        opt.step(&[Tensor::ones([3], (Kind::Float, Device::Cpu)), Tensor::new()]).unwrap();
        opt.step(&[Tensor::ones([3], (Kind::Float, Device::Cpu)), Tensor::new()]).unwrap();
        assert_eq!(b, Tensor::ones([2], (Kind::Float, Device::Cpu)), "b took no step");
        let state: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
        assert!(state.contains(&"a.exp_avg".to_string()) && !state.contains(&"b.exp_avg".to_string()), "{state:?}");
        let step = opt.state().into_iter().find(|(n, _)| n == "a.step").unwrap().1.int64_value(&[]);
        assert_eq!(step, 2);
    }
}
