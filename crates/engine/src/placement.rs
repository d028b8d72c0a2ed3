//! Which layers run where. A placement is resolved into stages before any layer is built:
//! contiguous runs of layers, each with its device(s).

use layerwise_nn::Training;
use tch::Device;

use crate::config::Placement;
use crate::{EngineError, Result};

/// One stage of a resolved placement.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    pub index: usize,
    /// Layer indices, ascending and contiguous; the output layer is `num_hidden`.
    pub layers: Vec<usize>,
    /// The device of each of `layers` (one device for a local-loss stage).
    pub devices: Vec<Device>,
}

impl StagePlan {
    pub fn device(&self) -> Device {
        self.devices[0]
    }
}

/// `cpu`, `cuda` (device 0) or `cuda:N`, checked against the devices present.
pub fn parse_device(s: &str, cuda_count: usize) -> std::result::Result<Device, String> {
    let d = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("{s:?} is not a device: expected \"cpu\", \"cuda\" or \"cuda:N\""))?,
    };
    if d >= cuda_count {
        return Err(format!("{s} is not present: {cuda_count} CUDA device(s) visible"));
    }
    Ok(Device::Cuda(d))
}

/// Visible devices for automatic placements: every CUDA device, else the CPU.
fn visible(cuda_count: usize) -> Vec<Device> {
    if cuda_count == 0 {
        vec![Device::Cpu]
    } else {
        (0..cuda_count).map(Device::Cuda).collect()
    }
}

/// Splits `costs` into `parts` contiguous groups minimising the largest group's sum.
/// Returns the group sizes.
pub fn balance(costs: &[f64], parts: usize) -> Vec<usize> {
    let n = costs.len();
    let parts = parts.clamp(1, n.max(1));
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |s, c| {
            *s += c;
            Some(*s)
        }))
        .collect();
    // best[k][i]: minimal max-sum splitting the first i costs into k groups; cut[k][i]: last cut
    let mut best = vec![vec![f64::INFINITY; n + 1]; parts + 1];
    let mut cut = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for k in 1..=parts {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[i] - prefix[j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut sizes = Vec::with_capacity(parts);
    let mut i = n;
    for k in (1..=parts).rev() {
        let j = cut[k][i];
        sizes.push(i - j);
        i = j;
    }
    sizes.reverse();
    sizes
}

/// Resolves a placement for `num_layers` layers (hidden layers plus the output layer).
/// `measure` gives each layer's cost on a device (a short timed warm-up); it is called only
/// for `auto`.
pub fn resolve(
    placement: &Placement,
    num_layers: usize,
    training: Training,
    cuda_count: usize,
    cpu_cores: usize,
    measure: impl FnOnce(Device) -> Vec<f64>,
) -> Result<Vec<StagePlan>> {
    let global = matches!(training, Training::Backprop | Training::LocalGlobal);
    let mut plans = match placement {
        Placement::Named(name) => match name.as_str() {
            "single" => vec![StagePlan { index: 0, layers: (0..num_layers).collect(), devices: vec![visible(cuda_count)[0]; num_layers] }],
            "per_layer" => {
                let devices = visible(cuda_count);
                (0..num_layers)
                    .map(|i| StagePlan { index: i, layers: vec![i], devices: vec![devices[i % devices.len()]] })
                    .collect()
            }
            "auto" => {
                let devices = visible(cuda_count);
                let parts = if devices == [Device::Cpu] { cpu_cores.min(num_layers) } else { devices.len().min(num_layers) };
                let costs = if global || parts == 1 { vec![1.0; num_layers] } else { measure(devices[0]) };
                let mut next = 0;
                balance(&costs, parts)
                    .into_iter()
                    .enumerate()
                    .map(|(i, size)| {
                        let layers: Vec<usize> = (next..next + size).collect();
                        next += size;
                        let d = devices[i % devices.len()];
                        StagePlan { index: i, devices: vec![d; layers.len()], layers }
                    })
                    .collect()
            }
            other => {
                return Err(EngineError::Config(format!(
                    "pipeline.placement: unknown placement {other:?}, expected \"auto\", \"per_layer\", \"single\" or a list of stages"
                )))
            }
        },
        Placement::Stages(specs) => {
            if specs.is_empty() {
                return Err(EngineError::Config("pipeline.placement: expected at least one stage".into()));
            }
            let mut expected = 0;
            let mut plans = Vec::new();
            for (i, spec) in specs.iter().enumerate() {
                let device = parse_device(&spec.device, cuda_count)
                    .map_err(|e| EngineError::Config(format!("pipeline.placement[{i}].device: {e}")))?;
                if spec.layers.is_empty() {
                    return Err(EngineError::Config(format!("pipeline.placement[{i}].layers: expected at least one layer")));
                }
                for (j, &l) in spec.layers.iter().enumerate() {
                    if l != expected {
                        return Err(EngineError::Config(format!(
                            "pipeline.placement[{i}].layers[{j}]: expected layer {expected} (stages hold contiguous layers in order, 0..={}), got {l}",
                            num_layers - 1
                        )));
                    }
                    expected += 1;
                }
                plans.push(StagePlan { index: i, layers: spec.layers.clone(), devices: vec![device; spec.layers.len()] });
            }
            if expected != num_layers {
                return Err(EngineError::Config(format!(
                    "pipeline.placement: layers {expected}..={} are not placed (the model has {} hidden layers and the output layer {})",
                    num_layers - 1,
                    num_layers - 1,
                    num_layers - 1
                )));
            }
            plans
        }
    };
    if global && plans.len() > 1 {
        // Global gradients cross every layer: one worker holds them all, each layer on the
        // device its stage named, run one after the other.
        let layers = (0..num_layers).collect();
        let devices = plans.iter().flat_map(|p| p.devices.clone()).collect();
        plans = vec![StagePlan { index: 0, layers, devices }];
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StageSpec;

    #[test]
    fn balancing_minimises_the_slowest_stage() {
        assert_eq!(balance(&[1.0, 1.0, 1.0, 1.0], 2), vec![2, 2]);
        assert_eq!(balance(&[8.0, 1.0, 1.0, 1.0, 1.0], 2), vec![1, 4]);
        assert_eq!(balance(&[1.0, 2.0, 3.0], 5), vec![1, 1, 1]);
    }

    #[test]
    fn auto_on_cpu_splits_by_measured_cost_into_one_stage_per_core() {
        let plans =
            resolve(&Placement::Named("auto".into()), 4, Training::Local, 0, 2, |_| vec![5.0, 1.0, 1.0, 1.0]).unwrap();
        assert_eq!(plans.iter().map(|p| p.layers.clone()).collect::<Vec<_>>(), vec![vec![0], vec![1, 2, 3]]);
    }

    #[test]
    fn explicit_stages_must_cover_all_layers_in_order_on_present_devices() {
        let stages = |v: Vec<(Vec<usize>, &str)>| {
            Placement::Stages(v.into_iter().map(|(layers, d)| StageSpec { layers, device: d.into() }).collect())
        };
        let ok = resolve(&stages(vec![(vec![0, 1], "cpu"), (vec![2], "cpu")]), 3, Training::Local, 0, 2, |_| vec![])
            .unwrap();
        assert_eq!(ok.len(), 2);
        let e =
            resolve(&stages(vec![(vec![0, 2], "cpu")]), 3, Training::Local, 0, 2, |_| vec![]).unwrap_err().to_string();
        assert!(e.contains("placement[0].layers[1]") && e.contains("expected layer 1"), "{e}");
        let e =
            resolve(&stages(vec![(vec![0, 1], "cpu")]), 3, Training::Local, 0, 2, |_| vec![]).unwrap_err().to_string();
        assert!(e.contains("not placed"), "{e}");
        let e = resolve(&stages(vec![(vec![0, 1, 2], "cuda:1")]), 3, Training::Local, 1, 2, |_| vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("placement[0].device") && e.contains("1 CUDA device"), "{e}");
    }

    #[test]
    fn global_modes_run_as_one_stage_spread_over_the_named_devices() {
        let plans = resolve(&Placement::Named("per_layer".into()), 3, Training::Backprop, 0, 2, |_| vec![]).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].layers, vec![0, 1, 2]);
    }
}
