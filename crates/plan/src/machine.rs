//! The machine a plan is made for: its devices, typed once parsed, their memory, its
//! cores, and what tells it from other machines (processes on one share its cores).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::quote;

/// A device as the engine names it: typed once parsed, `cpu` or `cuda:N` as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceId {
    Cpu,
    Cuda(usize),
}

impl DeviceId {
    /// `cpu`, `cuda` (device 0) or `cuda:N`; whether it is present is the machine's question.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceId::Cpu),
            "cuda" => Ok(DeviceId::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceId::Cuda)
                .ok_or_else(|| format!("{:?} is not a device: expected \"cpu\", \"cuda\" or \"cuda:N\"", quote(s))),
        }
    }

    pub fn tch(self) -> tch::Device {
        match self {
            DeviceId::Cpu => tch::Device::Cpu,
            DeviceId::Cuda(i) => tch::Device::Cuda(i),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceId::Cuda(_))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Cpu => write!(f, "cpu"),
            DeviceId::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceId {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        DeviceId::parse(&s)
    }
}

/// What a plan is made for: the devices present and the CPU cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub cuda_devices: usize,
    pub cores: usize,
}

impl Machine {
    pub fn detect() -> Self {
        Self {
            cuda_devices: tch::Cuda::device_count().max(0) as usize,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Every CUDA device, else the CPU: where automatic placements go.
    pub fn visible(&self) -> Vec<DeviceId> {
        if self.cuda_devices == 0 {
            vec![DeviceId::Cpu]
        } else {
            (0..self.cuda_devices).map(DeviceId::Cuda).collect()
        }
    }

    pub fn check(&self, d: DeviceId) -> std::result::Result<DeviceId, String> {
        match d {
            DeviceId::Cuda(i) if i >= self.cuda_devices => {
                Err(format!("{d} is not present: {} CUDA device(s) visible", self.cuda_devices))
            }
            _ => Ok(d),
        }
    }
}
/// Memory of a device of this process, where known: the host's for the CPU, the card's
/// for a CUDA device.
pub fn device_memory(device: DeviceId) -> Option<u64> {
    match device {
        DeviceId::Cpu => host_memory(),
        DeviceId::Cuda(i) => layerwise_nccl::cuda_total_memory(i),
    }
}

/// What tells this machine from others: its kernel's boot id (processes in containers on
/// one host share it, as they share its cores), else its host name, else a random string
/// (no other process is then taken to share this one's cores).
pub fn machine_id() -> String {
    ["/proc/sys/kernel/random/boot_id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty() && s.len() <= MACHINE_ID_MAX)
        .unwrap_or_else(|| format!("unknown-{:016x}", rand::random::<u64>()))
}

/// The longest machine id a worker may register.
pub const MACHINE_ID_MAX: usize = 256;

/// Physical memory of this host (MemTotal), where the system says.
fn host_memory() -> Option<u64> {
    layerwise_data::system::meminfo("MemTotal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_to_typed_values_and_print_back() {
        assert_eq!(DeviceId::parse("cpu"), Ok(DeviceId::Cpu));
        assert_eq!(DeviceId::parse("cuda"), Ok(DeviceId::Cuda(0)));
        assert_eq!(DeviceId::parse("cuda:3"), Ok(DeviceId::Cuda(3)));
        assert_eq!(DeviceId::Cuda(3).to_string(), "cuda:3");
        assert!(DeviceId::parse("gpu0").unwrap_err().contains("expected \"cpu\""));
        let m = Machine { cuda_devices: 1, cores: 2 };
        assert!(m.check(DeviceId::Cuda(1)).unwrap_err().contains("1 CUDA device"));
    }
}
