//! Every range check of a config, here and nowhere else: each bound a user can set has a
//! limit, checked before anything runs, and an error that names the key and what was
//! expected.

use std::fmt;

use layerwise_nn::Training;

use crate::config::{PipelineConfig, PipelineMode, Placement, RunConfig};
use crate::{quote, Error, Result};

pub mod limits {
    pub const NUM_LAYERS: usize = 256;
    pub const NUM_HIDDEN: usize = 1 << 20;
    pub const FEAT_MULT: f64 = 64.0;
    pub const CPU_THREADS: usize = 1024;
    pub const BATCH_SIZE: usize = 1 << 20;
    pub const TARGET_PROJ_SIZE: usize = 1 << 16;
    pub const DIM_IN_DECODER: usize = 1 << 24;
    pub const EPOCHS: usize = 1_000_000;
    pub const QUEUE: usize = 1024;
    pub const KEEP: usize = 10_000;
    pub const ARCH_NAME: usize = 64;
    pub const WORKERS: usize = 4096;
    /// Classes of an image folder (its subfolders).
    pub const CLASSES: usize = 1 << 16;
}

fn bad(key: &str, what: impl fmt::Display) -> Error {
    Error::Config(format!("{key}: {what}"))
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, what: &str) -> Result<()> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(bad(key, format!("expected {what}, got {v}")))
    }
}

fn count(key: &str, v: usize, max: usize) -> Result<()> {
    if v == 0 || v > max {
        return Err(bad(key, format!("expected 1..={max}, got {v}")));
    }
    Ok(())
}

fn optional(key: &str, v: Option<usize>, max: usize) -> Result<()> {
    match v {
        Some(v) if v == 0 || v > max => Err(bad(key, format!("expected 1..={max}, or leave it out; got {v}"))),
        _ => Ok(()),
    }
}

/// Every range check of a config, in one place.
pub(crate) fn check_ranges(config: &RunConfig) -> Result<()> {
    use limits::*;
    let t = &config.train;
    count("train.epochs", t.epochs, EPOCHS)?;
    count("train.batch_size", t.batch_size, BATCH_SIZE)?;
    optional("train.eval_batch_size", t.eval_batch_size, BATCH_SIZE)?;
    optional("train.steps_per_epoch", t.steps_per_epoch, usize::MAX)?;
    optional("train.eval_batches", t.eval_batches, usize::MAX)?;
    optional("train.cpu_threads", t.cpu_threads, CPU_THREADS)?;
    in_range("train.stall_warning_s", t.stall_warning_s, 0.001, 1e9, "a positive number of seconds")?;
    count("pipeline.channel_capacity", config.pipeline.channel_capacity, QUEUE)?;
    in_range("pipeline.link_stall_s", config.pipeline.link_stall_s, 1.0, 86_400.0, "1 to 86400 seconds")?;
    check_workers(&config.pipeline, config.model.training)?;
    count("data.prefetch", config.data.prefetch, QUEUE)?;
    count("checkpoint.keep", config.checkpoint.keep, KEEP)?;
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
    if m.arch.len() > ARCH_NAME {
        return Err(bad(
            "model.arch",
            format!("expected a model name such as \"mlp\" or \"vgg8b\", got {:?}", quote(&m.arch)),
        ));
    }
    in_range("model.dropout", m.dropout, 0.0, 0.999, "a probability in [0, 1)")?;
    in_range("model.beta", m.beta, 0.0, 1.0, "a value in [0, 1]")?;
    in_range("model.feat_mult", m.feat_mult, 1e-3, FEAT_MULT, "a channel multiplier in [0.001, 64]")?;
    if m.num_layers > NUM_LAYERS {
        return Err(bad("model.num_layers", format!("expected at most {NUM_LAYERS}, got {}", m.num_layers)));
    }
    count("model.num_hidden", m.num_hidden, NUM_HIDDEN)?;
    count("model.dim_in_decoder", m.dim_in_decoder, DIM_IN_DECODER)?;
    count("model.target_proj_size", m.target_proj_size, TARGET_PROJ_SIZE)?;
    let (channels, size) = config.data.input_shape();
    if !(1..=4).contains(&channels) || !(1..=4096).contains(&size) {
        return Err(bad(
            "data.image_channels, data.image_size",
            format!("expected 1..=4 channels of 1..=4096 pixels, got {channels} x {size}"),
        ));
    }
    crate::data_checks::check(&config.data, t.batch_size, t.eval_batch())?;
    if config.data.cutout_holes > 0 && config.data.cutout_length == 0 {
        return Err(bad("data.cutout_length", "expected a hole size in pixels (data.cutout_holes > 0)"));
    }
    Ok(())
}

/// `pipeline.workers`: names as a placement gives them, each once, for an `auto` placement
/// of a pipelined local-loss run (the only one that spreads over processes by itself).
fn check_workers(p: &PipelineConfig, training: Training) -> Result<()> {
    let key = "pipeline.workers";
    if p.workers.is_empty() {
        return Ok(());
    }
    if p.workers.len() > limits::WORKERS {
        return Err(bad(key, format!("expected at most {} workers, got {}", limits::WORKERS, p.workers.len())));
    }
    for (i, name) in p.workers.iter().enumerate() {
        worker_name(name).map_err(|e| bad(&format!("{key}[{i}]"), e))?;
        if p.workers[..i].contains(name) {
            return Err(bad(&format!("{key}[{i}]"), format!("worker {name} is named twice")));
        }
    }
    if p.placement != Placement::Auto {
        return Err(bad(
            key,
            "only an \"auto\" placement spreads over workers; a list of stages names each stage's worker in its device (\"w1/cpu\")",
        ));
    }
    if p.mode != PipelineMode::Pipelined {
        return Err(bad(key, "pipeline.mode \"sequential\" runs in one process: workers need \"pipelined\""));
    }
    if training.is_global() {
        return Err(bad(
            key,
            format!(
                "model.training {training:?} sends gradients through every layer, so its layers cannot span processes"
            ),
        ));
    }
    Ok(())
}

/// A worker's name as a placement or the command line gives it: A-Z a-z 0-9 . _ - only.
pub fn worker_name(name: &str) -> std::result::Result<String, String> {
    let ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{:?} is not a worker name: expected 1 to 64 of A-Z a-z 0-9 . _ -, the first a letter or digit",
            quote(name)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Machine, Plan};

    #[test]
    fn each_range_is_checked_once_naming_its_key() {
        let mut c = RunConfig::default();
        c.model.dropout = 1.0;
        let e = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap_err().to_string();
        assert!(e.contains("model.dropout") && e.contains("[0, 1)"), "{e}");
        let mut c = RunConfig::default();
        c.model.beta = 1.5;
        let e = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap_err().to_string();
        assert!(e.contains("model.beta"), "{e}");
    }

    #[test]
    fn workers_for_auto_are_refused_where_a_run_cannot_spread_over_them() {
        let cpu = Machine { cuda_devices: 0, cores: 2 };
        let with = |workers: &[&str], edit: fn(&mut RunConfig)| {
            let mut c = RunConfig::default();
            c.pipeline.workers = workers.iter().map(|w| w.to_string()).collect();
            edit(&mut c);
            Plan::build(&c, cpu).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(with(&["w1", "w2"], |_| {}).is_ok());
        let e = with(&["w1", "w1"], |_| {}).unwrap_err();
        assert!(e.contains("pipeline.workers[1]") && e.contains("named twice"), "{e}");
        let e = with(&["w 1"], |_| {}).unwrap_err();
        assert!(e.contains("pipeline.workers[0]") && e.contains("not a worker name"), "{e}");
        let e = with(&["w1"], |c| c.pipeline.placement = Placement::PerLayer).unwrap_err();
        assert!(e.contains("pipeline.workers") && e.contains("only an \"auto\" placement"), "{e}");
        let e = with(&["w1"], |c| c.pipeline.mode = PipelineMode::Sequential).unwrap_err();
        assert!(e.contains("pipeline.workers") && e.contains("sequential"), "{e}");
        let e = with(&["w1"], |c| c.model.training = Training::Backprop).unwrap_err();
        assert!(e.contains("pipeline.workers") && e.contains("cannot span processes"), "{e}");
        let many: Vec<String> = (0..=limits::WORKERS).map(|i| format!("w{i}")).collect();
        let e = with(&many.iter().map(String::as_str).collect::<Vec<_>>(), |_| {}).unwrap_err();
        assert!(e.contains("at most 4096 workers"), "{e}");
    }
}
