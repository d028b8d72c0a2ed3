//! Optimizers written on tensors, so that their state is a set of named tensors that a
//! checkpoint saves (tch's own optimizers hide theirs).
//!
//! Each step follows `torch.optim`'s single-tensor path op for op, with fused equivalents
//! where tch lacks the `alpha`/`value` arguments, so that on CPU the result is bit-identical
//! to PyTorch's (checked by the golden tests).

use tch::{Kind, Tensor};

use crate::block::load_into;
use crate::config::{OptimConfig, OptimKind};
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
    pub fn step(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        let _guard = tch::no_grad_guard();
        let c = &self.config;
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
