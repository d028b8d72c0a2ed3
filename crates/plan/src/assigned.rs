//! The stages a worker is handed: they come over the network, so they are checked as any
//! input is before the worker builds or runs anything from them.

use crate::checks::limits::CPU_THREADS;
use crate::config::{PipelineMode, RunConfig};
use crate::placement::{Host, StagePlan};
use crate::{quote, Error, Machine, Result};

/// Checks stages that came from elsewhere (a worker's assignment) as hostile input: stage
/// `i` has index `i`, the stages hold every layer once, contiguous and in order, each layer
/// with a device, threads within limits, a mode and training that allow this many stages,
/// and every device of `host`'s stages present here.
pub fn check_assigned(
    stages: &[StagePlan],
    num_layers: usize,
    config: &RunConfig,
    machine: &Machine,
    host: &Host,
) -> Result<()> {
    let bad = |i: usize, what: String| Err(Error::Config(format!("the coordinator's stage {i}: {what}")));
    if stages.is_empty() {
        return Err(Error::Config("the coordinator's plan has no stage".into()));
    }
    if stages.len() > 1 && (config.model.training.is_global() || config.pipeline.mode == PipelineMode::Sequential) {
        return Err(Error::Config(format!(
            "the coordinator's plan has {} stages, but model.training {:?} with pipeline.mode {:?} runs as one",
            stages.len(),
            config.model.training,
            config.pipeline.mode
        )));
    }
    let mut expected = 0;
    for (i, s) in stages.iter().enumerate() {
        if s.index != i {
            return bad(i, format!("numbered {}", s.index));
        }
        if s.layers.is_empty() || s.layers.iter().enumerate().any(|(k, &l)| l != expected + k) {
            return bad(
                i,
                format!("layers {}, expected contiguous layers from {expected}", quote(&format!("{:?}", s.layers))),
            );
        }
        expected += s.layers.len();
        if expected > num_layers {
            return bad(i, format!("layers up to {}, but the model has {num_layers}", expected - 1));
        }
        if s.devices.len() != s.layers.len() {
            return bad(i, format!("{} devices for {} layers", s.devices.len(), s.layers.len()));
        }
        if !(1..=CPU_THREADS).contains(&s.threads) {
            return bad(i, format!("{} threads, expected 1..={}", s.threads, CPU_THREADS));
        }
        if s.host == *host {
            for d in &s.devices {
                machine.check(*d).map_err(|e| Error::Config(format!("the coordinator's stage {i}: {e}")))?;
            }
        }
    }
    if expected != num_layers {
        return Err(Error::Config(format!(
            "the coordinator's stages hold {expected} of the model's {num_layers} layers"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::resolve;
    use crate::{DeviceId, Placement, StageSpec};
    use layerwise_nn::Training;

    #[test]
    fn stages_from_the_network_are_checked_before_a_worker_runs_them() {
        let c = {
            let mut c = RunConfig::default();
            c.model.num_layers = 3; // four layers with the output layer
            let spec = |layers: Vec<usize>, device: &str| StageSpec { layers, device: device.into() };
            c.pipeline.placement = Placement::Stages(vec![spec(vec![0, 1], "cpu"), spec(vec![2, 3], "w1/cpu")]);
            c
        };
        let cpu = Machine { cuda_devices: 0, cores: 2 };
        let good = resolve(&c, 4, &cpu, None).unwrap();
        let w1 = Host::Worker("w1".into());
        assert!(check_assigned(&good, 4, &c, &cpu, &w1).is_ok());
        let refused = |edit: fn(&mut Vec<StagePlan>)| {
            let mut stages = good.clone();
            edit(&mut stages);
            check_assigned(&stages, 4, &c, &cpu, &w1).unwrap_err().to_string()
        };
        assert!(refused(|s| s[1].index = 7).contains("stage 1: numbered 7"));
        assert!(refused(|s| s[1].layers = vec![3, 4]).contains("expected contiguous layers from 2"));
        assert!(refused(|s| s[1].layers = vec![2, 3, 4, 5]).contains("the model has 4"));
        assert!(refused(|s| s.truncate(1)).contains("hold 2 of the model's 4 layers"));
        assert!(refused(|s| s[1].devices.clear()).contains("0 devices for 2 layers"));
        assert!(refused(|s| s[1].threads = 0).contains("0 threads"));
        assert!(refused(|s| s[1].devices = vec![DeviceId::Cuda(0); 2]).contains("cuda:0 is not present"));
        assert!(refused(|s| s.clear()).contains("no stage"));
        // A worker's plan is built only from stages that pass, whatever devices the
        // coordinator's own stages name.
        let mut c = c.clone();
        c.pipeline.placement = Placement::Stages(vec![
            StageSpec { layers: vec![0, 1], device: "cuda:5".into() },
            StageSpec { layers: vec![2, 3], device: "w1/cpu".into() },
        ]);
        let shape = crate::DataShape::of_config(&c.data).unwrap();
        let mut numbered_wrong = good.clone();
        numbered_wrong[1].index = 7;
        let e = crate::Plan::assigned(&c, cpu, shape, numbered_wrong, &w1).unwrap_err().to_string();
        assert!(e.contains("stage 1: numbered 7"), "{e}");
        assert_eq!(crate::Plan::assigned(&c, cpu, shape, good.clone(), &w1).unwrap().stages, good);
        // Another host's devices are that host's to check.
        let mut theirs = good.clone();
        theirs[0].devices = vec![DeviceId::Cuda(3); 2];
        assert!(check_assigned(&theirs, 4, &c, &cpu, &w1).is_ok());
        let mut global = c.clone();
        global.model.training = Training::Backprop;
        let e = check_assigned(&good, 4, &global, &cpu, &w1).unwrap_err().to_string();
        assert!(e.contains("runs as one"), "{e}");
    }

    /// The data's shape comes over the network beside the stages: one that is not what the
    /// config describes (channels x size x size could claim any size) is refused.
    #[test]
    fn a_data_shape_the_config_does_not_describe_is_refused() {
        let c = RunConfig::default(); // Fashion-MNIST: 1 x 28 x 28, 10 classes
        let cpu = Machine { cuda_devices: 0, cores: 2 };
        let good = crate::DataShape::of_config(&c.data).unwrap();
        let stages = resolve(&c, 2, &cpu, None).unwrap();
        let coordinator = Host::Coordinator;
        assert!(crate::Plan::assigned(&c, cpu, good, stages.clone(), &coordinator).is_ok());
        let input = |channels, size| layerwise_nn::arch::InputShape { channels, size };
        for shape in [
            crate::DataShape { input: input(3, 28), ..good },
            crate::DataShape { input: input(1, 1 << 40), ..good },
            crate::DataShape { num_classes: 11, ..good },
        ] {
            let e = crate::Plan::assigned(&c, cpu, shape, stages.clone(), &coordinator).unwrap_err().to_string();
            assert!(e.contains("expected 1x28x28 in 10 for FashionMnist"), "{shape:?}: {e}");
        }
        // An image folder's classes are its own: any count up to the limit.
        let mut folder = c.clone();
        folder.data.dataset = layerwise_data::DatasetKind::ImageFolder;
        let (channels, size) = folder.data.input_shape();
        let shape = |num_classes| crate::DataShape { input: input(channels, size), num_classes };
        let stages = resolve(&folder, 2, &cpu, None).unwrap();
        assert!(crate::Plan::assigned(&folder, cpu, shape(37), stages.clone(), &coordinator).is_ok());
        let e = crate::Plan::assigned(&folder, cpu, shape(1 << 20), stages, &coordinator).unwrap_err().to_string();
        assert!(e.contains("in 1048576 classes, expected 3x32x32 in 1 to 65536"), "{e}");
    }
}
