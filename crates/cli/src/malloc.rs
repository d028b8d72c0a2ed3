//! glibc's allocator, set for tensors before anything is allocated.
//!
//! By default glibc raises its mmap threshold to the size of the largest block freed (up to
//! 32 MiB), after which tensors up to that size come from its heaps and stay there when
//! freed. On vgg8b predsim (5 steps and an evaluation batch, sequential) that held 2.31 GB
//! at peak against 1.76 GB with the settings below. Fixed settings instead: blocks of
//! 8 MiB and more (a conv net's activations, its larger weight gradients) are mapped and
//! given back to the system when freed; smaller ones (an MLP's batches, 4 MiB weights)
//! stay in the heaps, whose tops are kept up to 256 MiB instead of being trimmed and
//! faulted in again every step. A `MALLOC_*` variable in the environment leaves glibc as
//! the user set it.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    use std::os::raw::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_")) {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; called before any other thread runs.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 8 << 20);
        mallopt(M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
