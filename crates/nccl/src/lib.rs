//! NCCL point-to-point between two processes, through libtorch's own c10d: a two-rank
//! `ProcessGroupNCCL` sends and receives; c10d orders the transfers against libtorch's
//! CUDA streams and keeps sent memory alive in its caching allocator until NCCL is done.
//!
//! The group meets through a [`Store`] that listens on no port: an in-memory c10d store
//! whose sets (the NCCL unique id, on the sending rank) the caller takes with
//! [`Store::take`] and carries over its own authenticated link, to [`Store::put`] on the
//! other side. No unauthenticated listener of ours is left open; NCCL's own connections
//! are not authenticated (as in every NCCL deployment: a trusted network).
//!
//! Built only against a libtorch with CUDA (see build.rs); elsewhere every call says why
//! NCCL is missing.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use tch::Tensor;

mod store;
pub use store::{Store, STORE_KEY_MAX, STORE_VALUE_MAX};

pub(crate) const ERR_LEN: usize = 1024;

/// Why NCCL cannot be used by this build, or `None` when it was built with NCCL.
pub fn missing() -> Option<&'static str> {
    option_env!("LAYERWISE_NCCL_MISSING")
}

#[cfg(nccl)]
pub(crate) mod ffi {
    use super::*;
    extern "C" {
        pub fn lw_cuda_total_memory(device: c_int) -> i64;
        pub fn lw_nccl_version(out: *mut c_char, len: usize, err: *mut c_char, errlen: usize) -> c_int;
        pub fn lw_store_new(timeout_ms: i64, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn lw_store_set(
            store: *mut c_void,
            key: *const c_char,
            value: *const u8,
            len: usize,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn lw_store_put(
            store: *mut c_void,
            key: *const c_char,
            value: *const u8,
            len: usize,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn lw_store_get(
            store: *mut c_void,
            key: *const c_char,
            out: *mut u8,
            len: usize,
            got: *mut usize,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn lw_store_take(
            store: *mut c_void,
            wait_ms: i64,
            key: *mut c_char,
            keylen: usize,
            value: *mut u8,
            valuelen: usize,
            got: *mut usize,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn lw_store_free(store: *mut c_void);
        pub fn lw_group_new(
            store: *mut c_void,
            prefix: *const c_char,
            rank: c_int,
            size: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            errlen: usize,
        ) -> *mut c_void;
        pub fn lw_group_send(
            group: *mut c_void,
            t: *const c_void,
            peer: c_int,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn lw_group_recv(group: *mut c_void, t: *mut c_void, peer: c_int, err: *mut c_char, errlen: usize)
            -> c_int;
        pub fn lw_group_abort(group: *mut c_void);
        pub fn lw_group_free(group: *mut c_void, clean: c_int);
    }
}

/// A text buffer a C call writes into (a value, or an error's first line).
pub(crate) struct TextBuf([u8; ERR_LEN]);

impl TextBuf {
    pub(crate) fn new() -> Self {
        Self([0; ERR_LEN])
    }
    pub(crate) fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr().cast()
    }
    pub(crate) fn text(&self) -> String {
        CStr::from_bytes_until_nul(&self.0).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Runs a shim call that returns 0, or nonzero with its error written into the buffer it
/// is handed (`ERR_LEN` bytes).
#[cfg(nccl)]
pub(crate) fn checked(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = TextBuf::new();
    if call(err.ptr(), ERR_LEN) == 0 {
        Ok(())
    } else {
        Err(err.text())
    }
}

pub(crate) fn c_string(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(not(nccl))]
pub(crate) fn not_built<T>() -> Result<T, String> {
    Err(format!("this build has no NCCL: {}", missing().unwrap_or("unknown reason")))
}

/// The NCCL version that libtorch loaded, such as "2.28.9".
pub fn version() -> Result<String, String> {
    #[cfg(nccl)]
    {
        let mut out = TextBuf::new();
        // SAFETY: both buffers are ERR_LEN bytes and outlive the call.
        checked(|err, len| unsafe { ffi::lw_nccl_version(out.ptr(), ERR_LEN, err, len) })?;
        Ok(out.text())
    }
    #[cfg(not(nccl))]
    not_built()
}

/// Total memory of CUDA device `index` in bytes, where libtorch can read it (none without
/// that device, or in a build without CUDA).
#[cfg_attr(not(nccl), allow(unused_variables))]
pub fn cuda_total_memory(index: usize) -> Option<u64> {
    #[cfg(nccl)]
    {
        let index = c_int::try_from(index).ok()?;
        // SAFETY: a plain query; the shim catches every C++ exception.
        let total = unsafe { ffi::lw_cuda_total_memory(index) };
        u64::try_from(total).ok()
    }
    #[cfg(not(nccl))]
    None
}

/// A two-rank NCCL process group for one link: rank 0 sends, rank 1 receives.
pub struct Group {
    #[cfg_attr(not(nccl), allow(dead_code))]
    ptr: *mut c_void,
    // The group holds the store through c10d's own reference; this keeps the server (on
    // the receiving side) alive for as long as the group.
    _store: std::sync::Arc<Store>,
}

// SAFETY: ProcessGroupNCCL is thread-safe (c10d calls it from user and watchdog threads);
// the handle is only freed in Drop.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    /// The group of `size` ranks meeting under `prefix` in `store`. No communicator exists
    /// (and no GPU is touched) until the first send or receive; `timeout` bounds each
    /// transfer, after which c10d's watchdog aborts the communicator.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn new(
        store: std::sync::Arc<Store>,
        prefix: &str,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Group, String> {
        #[cfg(nccl)]
        {
            let p = c_string(prefix, "prefix")?;
            let mut err = TextBuf::new();
            // SAFETY: live store, NUL-terminated prefix, err of ERR_LEN bytes.
            let ptr = unsafe {
                ffi::lw_group_new(
                    store.ptr,
                    p.as_ptr(),
                    rank as c_int,
                    size as c_int,
                    millis(timeout),
                    err.ptr(),
                    ERR_LEN,
                )
            };
            if ptr.is_null() {
                Err(format!("NCCL process group (rank {rank} of {size}): {}", err.text()))
            } else {
                Ok(Group { ptr, _store: store })
            }
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// Sends a CUDA tensor to `peer`; work queued afterwards on this thread's current
    /// stream runs after the send.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn send(&self, t: &Tensor, peer: usize) -> Result<(), String> {
        #[cfg(nccl)]
        {
            // SAFETY: `t.as_ptr()` is tch's at::Tensor*, alive for the call.
            checked(|err, len| unsafe {
                ffi::lw_group_send(self.ptr, t.as_ptr() as *const c_void, peer as c_int, err, len)
            })
            .map_err(|e| format!("NCCL send to rank {peer}: {e}"))
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// Receives into `t`, a contiguous CUDA tensor of the sent shape and type; work queued
    /// afterwards on this thread's current stream sees the data.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn recv(&self, t: &mut Tensor, peer: usize) -> Result<(), String> {
        #[cfg(nccl)]
        {
            let ptr = t.as_mut_ptr() as *mut c_void;
            // SAFETY: `ptr` is tch's at::Tensor* of `t`, alive and exclusively ours for the call.
            checked(|err, len| unsafe { ffi::lw_group_recv(self.ptr, ptr, peer as c_int, err, len) })
                .map_err(|e| format!("NCCL receive from rank {peer}: {e}"))
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// Ends the communicator now: NCCL work waiting on a lost peer returns (with an error).
    pub fn abort(&self) {
        #[cfg(nccl)]
        // SAFETY: `ptr` is a live group.
        unsafe {
            ffi::lw_group_abort(self.ptr)
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(nccl)]
        // SAFETY: `ptr` came from lw_group_new and is freed once, here; a clean shutdown
        // when no thread is panicking, an abort otherwise.
        unsafe {
            ffi::lw_group_free(self.ptr, (!std::thread::panicking()) as c_int)
        }
    }
}

/// What c10d does on an NCCL error or timeout, set for a service: abort the communicators
/// and report the error to the waiting call, never end the process (c10d's defaults tear
/// the process down, and a watchdog monitor kills it if the watchdog hangs). Values the
/// user set in the environment are kept. Call before any thread starts.
pub fn configure_environment() {
    for (key, value) in [("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"), ("TORCH_NCCL_ENABLE_MONITORING", "0")] {
        if std::env::var_os(key).is_none() {
            std::env::set_var(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(nccl)]
    #[test]
    fn a_device_that_is_not_there_has_no_memory() {
        let beyond = tch::Cuda::device_count() as usize;
        assert_eq!(cuda_total_memory(beyond), None);
        if beyond > 0 {
            assert!(cuda_total_memory(0).is_some_and(|b| b > 1 << 30));
        }
    }

    #[cfg(nccl)]
    #[test]
    fn the_loaded_nccl_has_a_version() {
        let v = version().unwrap();
        let parts: Vec<u32> = v.split('.').map(|p| p.parse().expect("numeric")).collect();
        assert!(parts.len() == 3 && parts[0] >= 2, "{v}");
    }

    #[cfg(not(nccl))]
    #[test]
    fn a_build_without_nccl_says_why() {
        let why = missing().expect("build.rs gives the reason");
        assert!(version().unwrap_err().contains(why));
    }
}
