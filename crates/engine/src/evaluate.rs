//! Using a trained run: evaluate a checkpoint on the test set, export the network for
//! inference (no loss heads) with PyTorch-style names and a JSON description.

use std::path::{Path, PathBuf};

use layerwise_data::batches::{BatchSource, Transform};
use layerwise_data::dataset;
use layerwise_nn::arch::{InputShape, LayerSpec, PoolKind};
use layerwise_nn::{strip_prefix, Architecture, Named, Network};
use serde_json::json;
use tch::{Device, Kind, Reduction, Tensor};

use crate::checkpoint::{self, Loaded};
use crate::config::RunConfig;
use crate::{EngineError, Result};

/// A run directory or a checkpoint directory, resolved to (config, verified checkpoint).
pub fn open(path: &Path) -> Result<(RunConfig, Loaded)> {
    let (run_dir, loaded) = if path.join("manifest.json").is_file() {
        let run_dir = path.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        (run_dir, checkpoint::load(path)?)
    } else {
        let root = path.join("checkpoints");
        let loaded = checkpoint::latest(&root)?.ok_or_else(|| {
            EngineError::Other(format!("{}: no verified checkpoint in {}", path.display(), root.display()))
        })?;
        (path.to_path_buf(), loaded)
    };
    let config_path = run_dir.join("config.json");
    let config = RunConfig::load(&config_path, &[])?;
    checkpoint::check_compatible(&loaded.manifest, &config, &loaded.dir)?;
    Ok((config, loaded))
}

/// The whole network of a checkpoint, on `device`, in one piece.
pub fn network(
    config: &RunConfig,
    loaded: &Loaded,
    input: InputShape,
    num_classes: i64,
    device: Device,
) -> Result<Network> {
    let arch = Architecture::new(&config.model, input, num_classes)?;
    let mut net = Network::new(&config.model, &config.optim, arch, config.train.seed, device)?;
    let mut named: Vec<Named> = Vec::new();
    for (part, tensors) in &loaded.layers {
        let prefix = match part.strip_prefix("layer-") {
            Some(i) => format!("layers.{}", i.parse::<usize>().unwrap_or(usize::MAX)),
            None => part.clone(),
        };
        named.extend(tensors.iter().map(|(n, t)| (format!("{prefix}.{n}"), t.shallow_clone())));
    }
    net.load(&named).map_err(|e| EngineError::Other(format!("{}: {e}", loaded.dir.display())))?;
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
pub fn evaluate(config: &RunConfig, loaded: &Loaded, device: Device) -> Result<Evaluation> {
    let splits = dataset::load(&config.data)?;
    let (c, h, _) = splits.test.image_shape();
    let transform = Transform::from_config(&config.data, c)?;
    let num_classes = splits.test.num_classes;
    let mut net = network(config, loaded, InputShape { channels: c, size: h }, num_classes, device)?;
    let mut source = BatchSource::evaluation(splits.test, transform, config.train.eval_batch_size);
    let (mut wrong, mut loss, mut predictions) = (0i64, 0.0, Vec::new());
    for i in 0..source.batches_per_epoch() {
        let b = source.batch(1, i);
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
pub fn export(config: &RunConfig, loaded: &Loaded, out: &Path) -> Result<PathBuf> {
    // The shapes come from the config and the checkpoint; the data set is not read.
    let (c, h) = config.data.input_shape();
    let num_classes = loaded
        .layers
        .get("output")
        .and_then(|o| o.iter().find(|(n, _)| n == "weight"))
        .map(|(_, w)| w.size()[0])
        .ok_or_else(|| EngineError::Other(format!("{}: no output layer weight", loaded.dir.display())))?;
    let transform = Transform::from_config(&config.data, c)?;
    let input = InputShape { channels: c, size: h };
    let arch = Architecture::new(&config.model, input, num_classes)?;
    let mut tensors: Vec<Named> = Vec::new();
    let mut layers = Vec::new();
    for (i, spec) in arch.hidden.iter().enumerate() {
        let part = format!("layer-{i:03}");
        let state = loaded
            .layers
            .get(&part)
            .ok_or_else(|| EngineError::Other(format!("{}: no {part}", loaded.dir.display())))?;
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
    let output = loaded
        .layers
        .get("output")
        .ok_or_else(|| EngineError::Other(format!("{}: no output", loaded.dir.display())))?;
    for (name, t) in strip_prefix(output, "") {
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
        "checkpoint": loaded.dir, "step": loaded.manifest.step,
    });
    let named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.contiguous())).collect();
    Tensor::write_safetensors(&named, out)
        .map_err(|e| EngineError::Other(format!("{}: cannot write: {e}", out.display())))?;
    let json_path = out.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&description).unwrap())
        .map_err(|e| EngineError::io(&json_path, e))?;
    Ok(json_path)
}
