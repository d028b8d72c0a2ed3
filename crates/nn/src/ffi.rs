//! The C++ beside this crate (src/fused.cpp, built by build.rs): libtorch calls that tch
//! does not expose, behind plain C signatures.

use std::ffi::{c_char, c_int};

use tch::Tensor;

/// tch's tensor handle is libtorch's `at::Tensor*`.
pub type TensorPtr = *const torch_sys::C_tensor;

extern "C" {
    pub fn lw_fused_adam(
        params: *const TensorPtr,
        grads: *const TensorPtr,
        exp_avgs: *const TensorPtr,
        exp_avg_sqs: *const TensorPtr,
        max_exp_avg_sqs: *const TensorPtr,
        steps: *const TensorPtr,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        amsgrad: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    pub fn lw_set_cudnn(benchmark: c_int, deterministic: c_int);
    pub fn lw_cudnn(benchmark: *mut c_int, deterministic: *mut c_int);
}

/// The handles of `ts`, for an array argument.
pub fn ptrs<'a>(ts: impl Iterator<Item = &'a Tensor>) -> Vec<TensorPtr> {
    ts.map(|t| t.as_ptr()).collect()
}
