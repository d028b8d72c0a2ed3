//! Per-layer random generators.
//!
//! libtorch's random ops draw from one global generator, so masks drawn by several worker
//! threads would depend on how the threads interleave. Every layer instead owns a ChaCha8
//! stream keyed by (run seed, layer index, purpose). Masks are drawn on the CPU and moved to
//! the layer's device; the state is 56 bytes that a checkpoint saves and restores exactly.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::{NnError, Result};

/// What a generator is used for; each purpose is its own stream, so adding draws of one
/// kind never shifts another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Init = 1,
    Dropout = 2,
    Data = 3,
}

#[derive(Debug, Clone)]
pub struct LayerRng {
    inner: ChaCha8Rng,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const STATE_BYTES: usize = 32 + 8 + 16;

impl LayerRng {
    pub fn new(run_seed: u64, layer: usize, purpose: Purpose) -> Self {
        let key = splitmix64(run_seed) ^ splitmix64(0xA5A5_0000 + layer as u64);
        let mut inner = ChaCha8Rng::seed_from_u64(key);
        inner.set_stream(purpose as u64);
        Self { inner }
    }

    pub fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    pub fn uniform_f32(&mut self, low: f32, high: f32) -> f32 {
        self.inner.gen_range(low..high)
    }

    /// ATen's dropout noise: Bernoulli(1 - p) as 0/1 floats, divided by `1 - p` with the
    /// same tensor op as `noise.div_(1 - p)`, on `device`.
    pub fn dropout_noise(&mut self, shape: &[i64], p: f64, device: Device) -> Tensor {
        let n: i64 = shape.iter().product();
        // keep when u < (1 - p) * 2^32, u uniform on 32 bits
        let threshold = ((1.0 - p) * 4_294_967_296.0) as u64;
        let mut words = vec![0u32; n as usize];
        self.inner.fill(&mut words[..]);
        let mask: Vec<f32> = words.iter().map(|&u| if (u as u64) < threshold { 1.0 } else { 0.0 }).collect();
        let mut noise = Tensor::from_slice(&mask).view(shape).to_device(device);
        let _ = noise.g_div_scalar_(1.0 - p);
        noise
    }

    /// The exact state: seed, stream and position, as a uint8 tensor.
    pub fn state(&self) -> Tensor {
        let mut bytes = Vec::with_capacity(STATE_BYTES);
        bytes.extend_from_slice(&self.inner.get_seed());
        bytes.extend_from_slice(&self.inner.get_stream().to_le_bytes());
        bytes.extend_from_slice(&self.inner.get_word_pos().to_le_bytes());
        Tensor::from_slice(&bytes)
    }

    pub fn set_state(&mut self, state: &Tensor) -> Result<()> {
        if state.kind() != Kind::Uint8 || state.numel() != STATE_BYTES {
            return Err(NnError::State(format!(
                "generator state must be {STATE_BYTES} uint8 values, got {} of {:?}",
                state.numel(),
                state.kind()
            )));
        }
        let mut bytes = vec![0u8; STATE_BYTES];
        state.to_device(Device::Cpu).contiguous().copy_data(&mut bytes, STATE_BYTES);
        let seed: [u8; 32] = bytes[..32].try_into().unwrap();
        let stream = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
        let pos = u128::from_le_bytes(bytes[40..56].try_into().unwrap());
        let mut inner = ChaCha8Rng::from_seed(seed);
        inner.set_stream(stream);
        inner.set_word_pos(pos);
        self.inner = inner;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_generator_continues_the_same_sequence() {
        let mut a = LayerRng::new(7, 3, Purpose::Dropout);
        let _ = a.dropout_noise(&[5, 7], 0.3, Device::Cpu);
        let saved = a.state();
        let next = a.dropout_noise(&[64], 0.3, Device::Cpu);
        let mut b = LayerRng::new(0, 0, Purpose::Init);
        b.set_state(&saved).unwrap();
        assert!(b.dropout_noise(&[64], 0.3, Device::Cpu).equal(&next));
    }

    #[test]
    fn layers_and_purposes_draw_different_streams() {
        let draw = |layer, purpose| {
            let mut r = LayerRng::new(1, layer, purpose);
            (0..4).map(|_| r.next_u32()).collect::<Vec<_>>()
        };
        assert_ne!(draw(0, Purpose::Dropout), draw(1, Purpose::Dropout));
        assert_ne!(draw(0, Purpose::Dropout), draw(0, Purpose::Init));
        assert_eq!(draw(2, Purpose::Data), draw(2, Purpose::Data));
    }

    #[test]
    fn dropout_noise_keeps_about_one_minus_p_scaled() {
        let mut r = LayerRng::new(1, 0, Purpose::Dropout);
        let noise = r.dropout_noise(&[100_000], 0.25, Device::Cpu);
        let kept = noise.ne(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
        let max = noise.max().double_value(&[]);
        assert!((max - 1.0 / 0.75).abs() < 1e-6);
    }

    #[test]
    fn bad_state_is_refused() {
        let mut r = LayerRng::new(1, 0, Purpose::Dropout);
        assert!(r.set_state(&Tensor::from_slice(&[1u8, 2, 3])).is_err());
    }
}
