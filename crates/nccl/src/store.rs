//! One side of a link's c10d store (see the crate's documentation).

use std::ffi::c_void;
use std::time::Duration;

#[cfg(nccl)]
use std::ffi::CStr;

#[cfg(not(nccl))]
use crate::not_built;
#[cfg(nccl)]
use crate::{c_string, checked, ffi, millis, TextBuf, ERR_LEN};

/// The longest key, and the largest value, a [`Store`] carries (an NCCL unique id is 128
/// bytes; c10d's keys are short).
pub const STORE_KEY_MAX: usize = 512;
pub const STORE_VALUE_MAX: usize = 4096;

/// One side of a link's c10d store: in memory, listening on nothing. What c10d sets here is
/// queued for the caller to carry to the peer ([`Store::take`]); what the peer set arrives
/// with [`Store::put`].
pub struct Store {
    #[cfg_attr(not(nccl), allow(dead_code))]
    pub(crate) ptr: *mut c_void,
}

// SAFETY: c10d's stores are used from several threads by c10d itself (the store guards
// its maps with a mutex); the handle is only freed in Drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A store whose `get` waits up to `timeout` for a key.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn new(timeout: Duration) -> Result<Store, String> {
        #[cfg(nccl)]
        {
            let mut err = TextBuf::new();
            // SAFETY: err is ERR_LEN bytes, alive for the call.
            let ptr = unsafe { ffi::lw_store_new(millis(timeout), err.ptr(), ERR_LEN) };
            if ptr.is_null() {
                Err(format!("c10d store: {}", err.text()))
            } else {
                Ok(Store { ptr })
            }
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// Sets `key` as c10d does: stored, and queued for the peer.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        #[cfg(nccl)]
        {
            let k = c_string(key, "key")?;
            // SAFETY: live store, NUL-terminated key, `value` alive for the call, err of ERR_LEN bytes.
            checked(|err, len| unsafe {
                ffi::lw_store_set(self.ptr, k.as_ptr(), value.as_ptr(), value.len(), err, len)
            })
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// Stores what the peer set (checked against the limits first: it came off the wire).
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), String> {
        if key.len() > STORE_KEY_MAX || value.len() > STORE_VALUE_MAX {
            return Err(format!(
                "a store key of {} bytes or value of {} bytes (at most {STORE_KEY_MAX} and {STORE_VALUE_MAX})",
                key.len(),
                value.len()
            ));
        }
        #[cfg(nccl)]
        {
            let k = c_string(key, "key")?;
            // SAFETY: live store, NUL-terminated key, `value` alive for the call, err of ERR_LEN bytes.
            checked(|err, len| unsafe {
                ffi::lw_store_put(self.ptr, k.as_ptr(), value.as_ptr(), value.len(), err, len)
            })
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// The value under `key`, waiting for it up to the store's timeout.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        #[cfg(nccl)]
        {
            let k = c_string(key, "key")?;
            let mut out = vec![0u8; STORE_VALUE_MAX];
            let mut got = 0usize;
            // SAFETY: live store, NUL-terminated key, `out` of STORE_VALUE_MAX bytes, err of ERR_LEN bytes.
            checked(|err, len| unsafe {
                ffi::lw_store_get(self.ptr, k.as_ptr(), out.as_mut_ptr(), out.len(), &mut got, err, len)
            })?;
            out.truncate(got);
            Ok(out)
        }
        #[cfg(not(nccl))]
        not_built()
    }

    /// The oldest set made here (by c10d) and not yet taken, waiting up to `wait`: for the
    /// caller to carry to the peer.
    #[cfg_attr(not(nccl), allow(unused_variables))]
    pub fn take(&self, wait: Duration) -> Result<Option<(String, Vec<u8>)>, String> {
        #[cfg(nccl)]
        {
            let mut key = [0u8; STORE_KEY_MAX + 1];
            let mut value = vec![0u8; STORE_VALUE_MAX];
            let (mut got, mut err) = (0usize, TextBuf::new());
            // SAFETY: live store; buffers of the lengths passed, alive for the call.
            let rc = unsafe {
                ffi::lw_store_take(
                    self.ptr,
                    millis(wait),
                    key.as_mut_ptr().cast(),
                    key.len(),
                    value.as_mut_ptr(),
                    value.len(),
                    &mut got,
                    err.ptr(),
                    ERR_LEN,
                )
            };
            match rc {
                0 => Ok(None),
                1 => {
                    let key = CStr::from_bytes_until_nul(&key).map_err(|e| e.to_string())?;
                    value.truncate(got);
                    Ok(Some((key.to_string_lossy().into_owned(), value)))
                }
                _ => Err(err.text()),
            }
        }
        #[cfg(not(nccl))]
        not_built()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        #[cfg(nccl)]
        // SAFETY: `ptr` came from lw_store_new and is freed once, here.
        unsafe {
            ffi::lw_store_free(self.ptr)
        }
    }
}

#[cfg(all(test, nccl))]
mod tests {
    use super::*;

    /// What c10d sets on one side is queued to be carried; what the other side puts is
    /// read there, and is not queued back; a key never set times out with c10d's error.
    #[test]
    fn a_set_is_queued_for_the_peer_and_a_put_is_read_where_it_lands() {
        let (sending, receiving) =
            (Store::new(Duration::from_secs(30)).unwrap(), Store::new(Duration::from_millis(200)).unwrap());
        let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
        sending.set("layerwise/link/nccl_id", &id).unwrap();
        assert_eq!(sending.get("layerwise/link/nccl_id").unwrap(), id);
        let (key, value) = sending.take(Duration::from_secs(30)).unwrap().expect("queued");
        assert_eq!((key.as_str(), &value), ("layerwise/link/nccl_id", &id));
        assert_eq!(sending.take(Duration::from_millis(10)).unwrap(), None, "taken once");
        receiving.put(&key, &value).unwrap();
        assert_eq!(receiving.get(&key).unwrap(), id);
        assert_eq!(receiving.take(Duration::from_millis(10)).unwrap(), None, "a put is not carried back");
        let e = receiving.get("never/set").unwrap_err();
        assert!(e.to_lowercase().contains("timeout") || e.contains("never/set"), "{e}");
        let e = receiving.put(&"k".repeat(STORE_KEY_MAX + 1), b"v").unwrap_err();
        assert!(e.contains("at most 512"), "{e}");
    }
}
