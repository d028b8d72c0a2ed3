//! Parameter initialisation, PyTorch's defaults drawn from a layer's own generator.
//!
//! `nn.Linear` and `nn.Conv2d` draw weight and bias uniformly in `±1/sqrt(fan_in)`
//! (kaiming-uniform with `a = sqrt(5)`). Drawing them from [`LayerRng`] rather than
//! libtorch's global generator makes a model a pure function of (seed, layer).

use tch::{Device, Kind, Tensor};

use crate::rng::LayerRng;

/// Uniform in `±bound`, of `shape`, on `device`, as a trainable leaf.
pub fn uniform(rng: &mut LayerRng, shape: &[i64], bound: f64, device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let b = bound as f32;
    let values: Vec<f32> = (0..n).map(|_| rng.uniform_f32(-b, b)).collect();
    Tensor::from_slice(&values).view(shape).to_device(device).set_requires_grad(true)
}

/// PyTorch's default bound for a layer with `fan_in` inputs per output.
pub fn default_bound(fan_in: i64) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

pub fn zeros(shape: &[i64], device: Device) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, device)).set_requires_grad(true)
}

pub fn ones(shape: &[i64], device: Device) -> Tensor {
    Tensor::ones(shape, (Kind::Float, device)).set_requires_grad(true)
}
