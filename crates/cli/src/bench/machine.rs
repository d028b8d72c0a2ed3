//! What `bench train` says of the machine: its matrix-product rate, its devices, and a
//! process's peak memory.

use std::time::Instant;

use layerwise_pipeline::thread::set_thread_count;
use layerwise_plan::{DeviceId, Machine};
use tch::{Kind, Tensor};

/// This process's peak resident memory (`VmHWM`).
pub(super) fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// GFLOP/s of a square matrix product of `kind` on the first device (every core on a CPU),
/// best of five after a warm-up, and the size used.
pub(super) fn matmul_rate(machine: &Machine, kind: Kind) -> (f64, i64) {
    let device = machine.visible()[0];
    let n: i64 = if matches!(device, DeviceId::Cuda(_)) { 8192 } else { 1024 };
    let cores = machine.cores;
    let secs = std::thread::scope(|s| {
        s.spawn(|| {
            set_thread_count(cores);
            let d = device.tch();
            let a = Tensor::randn([n, n], (Kind::Float, d)).to_kind(kind);
            let b = Tensor::randn([n, n], (Kind::Float, d)).to_kind(kind);
            let sync = || {
                if let DeviceId::Cuda(i) = device {
                    tch::Cuda::synchronize(i as i64);
                }
            };
            let _ = a.matmul(&b);
            sync();
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let _ = a.matmul(&b);
                    sync();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        })
        .join()
        .unwrap_or(f64::NAN)
    });
    (2.0 * (n as f64).powi(3) / secs / 1e9, n)
}

/// The CPU's model name and each GPU's, as the system reports them.
pub(super) fn device_names(machine: &Machine) -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "cpu".into());
    let mut names = vec![format!("cpu: {cpu}")];
    let mut gpus: Vec<String> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("information")).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string())))
        .collect();
    gpus.truncate(machine.cuda_devices);
    names.extend(gpus.into_iter().enumerate().map(|(i, g)| format!("cuda:{i}: {g}")));
    names
}
