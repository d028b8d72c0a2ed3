//! Using a trained run: evaluate a checkpoint on the test set, export the network for
//! inference (no loss heads) with PyTorch-style names and a JSON description.

use std::path::{Path, PathBuf};

use layerwise_data::batches::BatchSource;
use layerwise_nn::arch::{LayerSpec, PoolKind};
use layerwise_nn::{strip_prefix, Named, Network};
use serde_json::json;
use tch::{Device, Kind, Reduction, Tensor};

use layerwise_plan::{Machine, Plan, RunConfig};
use layerwise_rundir::checkpoint::{self, Verified};

use crate::{Error, Result};

/// A run directory or a checkpoint directory, resolved to (the run's plan on this machine,
/// verified checkpoint).
pub fn open(path: &Path) -> Result<(Plan, Verified)> {
    let (run_dir, verified) = if path.join("manifest.json").is_file() {
        let run_dir = path.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        (run_dir, checkpoint::open(path)?)
    } else {
        let root = path.join("checkpoints");
        let verified = checkpoint::latest(&root)
            .ok_or_else(|| Error::Other(format!("{}: no verified checkpoint in {}", path.display(), root.display())))?;
        (path.to_path_buf(), verified)
    };
    let config = RunConfig::load(&run_dir.join("config.json"), &[])?;
    checkpoint::check_compatible(&verified.manifest, &config, &verified.dir)?;
    Ok((Plan::build(&config, Machine::detect())?, verified))
}

/// The whole network of a checkpoint, on `device`, in one piece.
pub fn network(plan: &Plan, verified: &Verified, device: Device) -> Result<Network> {
    let config = &plan.config;
    let mut net = Network::new(&config.model, &config.optim, plan.arch.clone(), config.train.seed, device)?;
    let named = verified.model_tensors()?;
    net.load(&named).map_err(|e| Error::Other(format!("{}: {e}", verified.dir.display())))?;
    Ok(net)
}

pub struct Evaluation {
    pub test_error: f64,
    pub test_loss: f64,
    pub examples: i64,
    /// Predicted class of every test example, in order.
    pub predictions: Vec<i64>,
}

/// Evaluates a checkpoint on its data set's whole test set.
pub fn evaluate(plan: &Plan, verified: &Verified, device: Device) -> Result<Evaluation> {
    let sets = layerwise_data::examples::open(&plan.config.data, layerwise_pipeline::loader::decode_threads(plan))?;
    plan.check_data(&sets)?;
    let mut net = network(plan, verified, device)?;
    let mut source = BatchSource::evaluation(sets.test, plan.transform.clone(), plan.config.train.eval_batch());
    let (mut wrong, mut loss, mut predictions) = (0i64, 0.0, Vec::new());
    for i in 0..source.batches_per_epoch() {
        let b = source.batch(1, i)?;
        let logits = net.predict(&b.images.to_device(device));
        let labels = b.labels.to_device(device);
        let pred = logits.argmax(1, false);
        wrong += pred.ne_tensor(&labels).sum(Kind::Int64).int64_value(&[]);
        loss += logits.cross_entropy_loss(&labels, None::<Tensor>, Reduction::Sum, -100, 0.0).double_value(&[]);
        predictions.extend(Vec::<i64>::try_from(pred.to_device(Device::Cpu)).unwrap_or_default());
    }
    let n = predictions.len() as i64;
    Ok(Evaluation { test_error: 100.0 * wrong as f64 / n as f64, test_loss: loss / n as f64, examples: n, predictions })
}

/// Writes the network of a checkpoint for inference: `out` (safetensors; `layers.{i}.conv.*`
/// or `layers.{i}.linear.*`, `layers.{i}.bn.*`, `output.*`) and `out` with `.json`: the
/// architecture, the input normalisation and what each layer computes.
pub fn export(plan: &Plan, verified: &Verified, out: &Path) -> Result<PathBuf> {
    // The shapes come from the plan; the data set is not read.
    let (config, arch, transform) = (&plan.config, &plan.arch, &plan.transform);
    let (c, h, num_classes) = (arch.input.channels, arch.input.size, arch.num_classes);
    let mut tensors: Vec<Named> = Vec::new();
    let mut layers = Vec::new();
    for (i, spec) in arch.hidden.iter().enumerate() {
        let state = &verified.part(&checkpoint::part_name(i, plan.output_layer()))?;
        let kind = match spec {
            LayerSpec::Conv { .. } => "conv",
            LayerSpec::Linear { .. } => "linear",
        };
        for (name, t) in state {
            let exported = match name.as_str() {
                "encoder.weight" | "encoder.bias" => Some(name.replacen("encoder", kind, 1)),
                "bn.weight" | "bn.bias" | "bn.running_mean" | "bn.running_var" => Some(name.clone()),
                _ => None, // heads, optimizer, generator, statistics
            };
            if let Some(n) = exported {
                tensors.push((format!("layers.{i}.{n}"), t.shallow_clone()));
            }
        }
        let mut layer = match *spec {
            LayerSpec::Conv { in_channels, out_channels, kernel, stride, padding, pool_after, .. } => json!({
                "kind": "conv", "in_channels": in_channels, "out_channels": out_channels,
                "kernel": kernel, "stride": stride, "padding": padding,
                "pool_after": pool_after.map(|p| json!({
                    "kind": if p.kind == PoolKind::Max { "max" } else { "avg" },
                    "kernel": p.kernel, "stride": p.stride, "padding": p.padding,
                })),
            }),
            LayerSpec::Linear { in_features, out_features } => {
                json!({"kind": "linear", "in_features": in_features, "out_features": out_features})
            }
        };
        layer["batch_norm"] = json!(config.model.batch_norm.then(|| json!({"eps": 1e-5})));
        layer["nonlin"] = json!(config.model.nonlin);
        layers.push(layer);
    }
    let output = verified.part(&checkpoint::part_name(plan.output_layer(), plan.output_layer()))?;
    for (name, t) in strip_prefix(&output, "") {
        if name == "weight" || name == "bias" {
            tensors.push((format!("output.{name}"), t));
        }
    }
    let description = json!({
        "format": "layerwise-inference-1",
        "arch": config.model.arch,
        "input": {"channels": c, "size": h, "mean": transform.mean, "std": transform.std,
                  "scale": "pixels / 255, then (x - mean) / std per channel"},
        "layers": layers,
        "output": {"in_features": arch.output_in, "out_features": num_classes},
        "leaky_relu_slope": 0.01,
        "checkpoint": verified.dir, "step": verified.manifest.step,
    });
    let named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.contiguous())).collect();
    Tensor::write_safetensors(&named, out)
        .map_err(|e| Error::Other(format!("{}: cannot write: {e}", out.display())))?;
    let json_path = out.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&description).unwrap())
        .map_err(|e| Error::io(&json_path, e))?;
    Ok(json_path)
}
