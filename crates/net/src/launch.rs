//! Launching the way cluster users launch distributed PyTorch: every rank runs the same
//! `layerwise train` line, and the environment that torchrun or Slurm sets says which rank
//! this is. Rank 0 is the coordinator; every other rank is a worker for this one job,
//! named `rankN`, offering `cuda:LOCAL_RANK` (or the CPU where there is no GPU).

use layerwise_plan::balance::{even, ranges};
use layerwise_plan::{quote, DeviceId, Placement, StageSpec};

use crate::{Error, Result};

/// Where this process stands in a launch of several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// The coordinator's host (MASTER_ADDR).
    pub master: String,
    /// The coordinator's port: LAYERWISE_PORT, else MASTER_PORT + 1 (torchrun's own store
    /// holds MASTER_PORT), else 29401.
    pub port: u16,
}

impl Launch {
    /// Reads the launch from `get` (the environment): torchrun's RANK, WORLD_SIZE,
    /// LOCAL_RANK, or Slurm's SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; with MASTER_ADDR.
    /// None when this is not a launch of more than one process.
    pub fn from(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |key: &str| -> Result<Option<usize>> {
            get(key)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Config(format!("environment {key}={:?}: expected a whole number", quote(&v)))
                    })
                })
                .transpose()
        };
        let (rank_key, world_key, local_key) = if get("WORLD_SIZE").is_some() {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        };
        let Some(world) = number(world_key)? else { return Ok(None) };
        if world <= 1 {
            return Ok(None);
        }
        let rank = number(rank_key)?
            .ok_or_else(|| Error::Config(format!("environment: {world_key} is set, {rank_key} is not")))?;
        if rank >= world {
            return Err(Error::Config(format!(
                "environment {rank_key}={rank}: expected less than {world_key}={world}"
            )));
        }
        let local_rank = number(local_key)?.unwrap_or(0);
        let master = get("MASTER_ADDR").filter(|m| !m.is_empty()).ok_or_else(|| {
            Error::Config(format!(
                "environment: {world_key}={world} but MASTER_ADDR is not set (the coordinator's host; under Slurm, export it in the batch script)"
            ))
        })?;
        let port = match (get("LAYERWISE_PORT"), number("MASTER_PORT")?) {
            (Some(p), _) => p.trim().parse::<u16>().map_err(|_| {
                Error::Config(format!("environment LAYERWISE_PORT={:?}: expected a port number", quote(&p)))
            })?,
            (None, Some(p)) => u16::try_from(p + 1)
                .map_err(|_| Error::Config(format!("environment MASTER_PORT={p}: expected a port below 65535")))?,
            (None, None) => 29401,
        };
        Ok(Some(Launch { rank, world, local_rank, master, port }))
    }

    pub fn from_env() -> Result<Option<Launch>> {
        Self::from(|k| std::env::var(k).ok())
    }

    /// The worker name of `rank`.
    pub fn name(rank: usize) -> String {
        format!("rank{rank}")
    }

    /// This rank's device: `cuda:LOCAL_RANK` where there are GPUs (the one GPU, where the
    /// launcher gave each process its own), else the CPU.
    pub fn device(&self, cuda_devices: usize) -> Result<DeviceId> {
        match cuda_devices {
            0 => Ok(DeviceId::Cpu),
            1 => Ok(DeviceId::Cuda(0)),
            n if self.local_rank < n => Ok(DeviceId::Cuda(self.local_rank)),
            n => Err(Error::Config(format!("LOCAL_RANK {} but only {n} CUDA device(s) visible", self.local_rank))),
        }
    }

    pub fn coordinator(&self) -> String {
        if self.master.contains(':') && !self.master.starts_with('[') {
            format!("[{}]:{}", self.master, self.port) // an IPv6 address
        } else {
            format!("{}:{}", self.master, self.port)
        }
    }
}

/// The placement of a launch: `num_layers` layers over `devices.len()` ranks in order,
/// contiguous, as evenly as the layers allow (the first ranks take one more); rank 0's
/// stage stays in the coordinator, rank r's goes to worker `rankr`.
pub fn spread(num_layers: usize, devices: &[DeviceId]) -> Result<Placement> {
    let world = devices.len();
    if num_layers < world {
        return Err(Error::Config(format!(
            "{world} ranks but the model has {num_layers} layers (hidden and output): launch at most {num_layers}"
        )));
    }
    let stages = ranges(&even(num_layers, world))
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(rank, (layers, device))| {
            let device = if rank == 0 { device.to_string() } else { format!("{}/{device}", Launch::name(rank)) };
            StageSpec { layers: layers.collect(), device }
        })
        .collect();
    Ok(Placement::Stages(stages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_and_slurm_environments_are_read() {
        let t = Launch::from(env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t, Launch { rank: 2, world: 4, local_rank: 0, master: "node1".into(), port: 29501 });
        let s = Launch::from(env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "10.0.0.5"),
            ("LAYERWISE_PORT", "4000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank, s.coordinator()), (1, 2, 1, "10.0.0.5:4000".to_string()));
        assert_eq!(Launch::from(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        assert_eq!(Launch::from(env(&[])).unwrap(), None);
    }

    #[test]
    fn a_bad_launch_environment_names_the_variable() {
        let e = Launch::from(env(&[("WORLD_SIZE", "two")])).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE") && e.contains("whole number"), "{e}");
        let e = Launch::from(env(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a")])).unwrap_err().to_string();
        assert!(e.contains("RANK=2") && e.contains("less than"), "{e}");
        let e = Launch::from(env(&[("WORLD_SIZE", "2"), ("RANK", "1")])).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn layers_spread_over_ranks_contiguous_and_even() {
        let d = [DeviceId::Cpu, DeviceId::Cuda(0), DeviceId::Cuda(1)];
        let Placement::Stages(s) = spread(7, &d).unwrap() else { panic!() };
        let got: Vec<(Vec<usize>, String)> = s.into_iter().map(|s| (s.layers, s.device)).collect();
        assert_eq!(
            got,
            vec![
                (vec![0, 1, 2], "cpu".to_string()),
                (vec![3, 4], "rank1/cuda:0".to_string()),
                (vec![5, 6], "rank2/cuda:1".to_string())
            ]
        );
        assert!(spread(2, &d).unwrap_err().to_string().contains("3 ranks"));
        let l = Launch { rank: 1, world: 2, local_rank: 3, master: "m".into(), port: 1 };
        assert_eq!(l.device(0).unwrap(), DeviceId::Cpu);
        assert_eq!(l.device(1).unwrap(), DeviceId::Cuda(0), "a process given one GPU uses it");
        assert_eq!(l.device(4).unwrap(), DeviceId::Cuda(3));
        assert!(l.device(2).unwrap_err().to_string().contains("LOCAL_RANK 3"));
    }
}
