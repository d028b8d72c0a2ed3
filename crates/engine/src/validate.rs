//! Full validation of a run config before anything runs: values in range, an architecture
//! that fits the data set's images, a placement on devices that are present, and (unless
//! asked not to) the data files where the config says. Errors name the key.

use layerwise_data::batches::Transform;
use layerwise_nn::arch::InputShape;
use layerwise_nn::Architecture;

use crate::config::RunConfig;
use crate::placement::resolve;
use crate::{EngineError, Result};

fn bad(key: &str, what: impl std::fmt::Display) -> EngineError {
    EngineError::Config(format!("{key}: {what}"))
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, what: &str) -> Result<()> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(bad(key, format!("expected {what}, got {v}")))
    }
}

pub fn validate(config: &RunConfig, check_data: bool) -> Result<()> {
    let t = &config.train;
    if t.epochs == 0 {
        return Err(bad("train.epochs", "expected at least 1"));
    }
    if t.batch_size == 0 {
        return Err(bad("train.batch_size", "expected at least 1"));
    }
    if t.eval_batch_size == 0 {
        return Err(bad("train.eval_batch_size", "expected at least 1"));
    }
    if t.steps_per_epoch == Some(0) {
        return Err(bad("train.steps_per_epoch", "expected at least 1, or leave it out"));
    }
    if t.eval_batches == Some(0) {
        return Err(bad("train.eval_batches", "expected at least 1, or leave it out"));
    }
    if t.cpu_threads == Some(0) {
        return Err(bad("train.cpu_threads", "expected at least 1, or leave it out"));
    }
    in_range("train.stall_warning_s", t.stall_warning_s, 0.001, 1e9, "a positive number of seconds")?;
    if config.pipeline.channel_capacity == 0 {
        return Err(bad("pipeline.channel_capacity", "expected at least 1"));
    }
    if config.checkpoint.keep == 0 {
        return Err(bad("checkpoint.keep", "expected at least 1"));
    }
    let o = &config.optim;
    in_range("optim.lr", o.lr, f64::MIN_POSITIVE, 1e3, "a positive learning rate")?;
    in_range("optim.weight_decay", o.weight_decay, 0.0, 1e3, "a value >= 0")?;
    in_range("optim.betas[0]", o.betas.0, 0.0, 1.0 - f64::EPSILON, "a value in [0, 1)")?;
    in_range("optim.betas[1]", o.betas.1, 0.0, 1.0 - f64::EPSILON, "a value in [0, 1)")?;
    in_range("optim.eps", o.eps, 0.0, 1.0, "a small value >= 0")?;
    in_range("optim.momentum", o.momentum, 0.0, 1.0, "a value in [0, 1]")?;
    in_range("optim.dampening", o.dampening, 0.0, 1.0, "a value in [0, 1]")?;
    in_range("optim.lr_decay", o.lr_decay, f64::MIN_POSITIVE, 1.0, "a factor in (0, 1]")?;
    if o.nesterov && (o.momentum == 0.0 || o.dampening != 0.0) {
        return Err(bad("optim.nesterov", "needs optim.momentum > 0 and optim.dampening = 0"));
    }
    if o.milestones.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("optim.milestones", format!("expected increasing epochs, got {:?}", o.milestones)));
    }
    let m = &config.model;
    in_range("model.dropout", m.dropout, 0.0, 0.999, "a probability in [0, 1)")?;
    in_range("model.beta", m.beta, 0.0, 1.0, "a value in [0, 1]")?;
    if m.dim_in_decoder == 0 {
        return Err(bad("model.dim_in_decoder", "expected at least 1"));
    }
    if m.target_proj_size == 0 {
        return Err(bad("model.target_proj_size", "expected at least 1"));
    }
    let (channels, size) = config.data.input_shape();
    Transform::from_config(&config.data, channels)?;
    if config.data.cutout_holes > 0 && config.data.cutout_length == 0 {
        return Err(bad("data.cutout_length", "expected a hole size in pixels (data.cutout_holes > 0)"));
    }
    let classes = config.data.num_classes().unwrap_or(10);
    let arch = Architecture::new(m, InputShape { channels, size }, classes)?;
    let cuda = tch::Cuda::device_count().max(0) as usize;
    resolve(&config.pipeline.placement, arch.hidden.len() + 1, m.training, cuda, 1, |_| {
        vec![1.0; arch.hidden.len() + 1]
    })?;
    if check_data {
        config.data.check_files()?;
    }
    Ok(())
}
