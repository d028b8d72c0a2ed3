//! Per-layer random generators.
//!
//! libtorch's random ops draw from one global generator, so masks drawn by several worker
//! threads would depend on how the threads interleave. Every layer instead owns a ChaCha8
//! stream keyed by (run seed, layer index, purpose); the state is 56 bytes that a
//! checkpoint saves and restores exactly. On the CPU, masks are drawn from the stream; on
//! a GPU, from a counter-based hash of the same key and position computed on the device
//! itself (nothing drawn on the host and copied each step), the position then moved on
//! past the words used, so the state and its checkpoint stay the same.

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
    /// same tensor op as `noise.div_(1 - p)`, on `device`: drawn from the stream on the
    /// CPU, hashed on the device elsewhere ([`Self::dropout_noise_hashed`]).
    pub fn dropout_noise(&mut self, shape: &[i64], p: f64, device: Device) -> Tensor {
        if device != Device::Cpu {
            return self.dropout_noise_hashed(shape, p, device);
        }
        let n: i64 = shape.iter().product();
        let threshold = keep_below(p);
        let mut words = vec![0u32; n as usize];
        self.inner.fill(&mut words[..]);
        let mask: Vec<f32> = words.iter().map(|&u| if (u as u64) < threshold { 1.0 } else { 0.0 }).collect();
        let mut noise = Tensor::from_slice(&mask).view(shape).to_device(device);
        let _ = noise.g_div_scalar_(1.0 - p);
        noise
    }

    /// Dropout noise computed on `device` from this generator's key and position: word
    /// `i` of the draw is [`hash_word`] of the key and position + i, made with integer
    /// tensor ops that stay below 2^49 (no overflow on any device); then the position
    /// moves on by the words used, as a draw from the stream would move it.
    pub fn dropout_noise_hashed(&mut self, shape: &[i64], p: f64, device: Device) -> Tensor {
        let n: i64 = shape.iter().product();
        let (k1, k2) = self.hash_key();
        let pos = self.inner.get_word_pos();
        // The counter runs modulo 2^62 (no int64 overflow whatever position a checkpoint
        // holds; a generator reaches 2^62 words only after centuries of draws).
        let start = (pos % (1u128 << 62)) as i64;
        let opts = (Kind::Int64, device);
        let counter = Tensor::arange(n, opts) + start;
        let low = counter.bitwise_and(0xFFFF_FFFF_i64);
        let high = counter.bitwise_right_shift_tensor_scalar(32);
        let words =
            mix_tensor(&mix_tensor(&low.bitwise_xor(k1 as i64)).bitwise_xor_tensor(&high).bitwise_xor(k2 as i64));
        let mut noise = words.lt(keep_below(p) as i64).to_kind(Kind::Float).view(shape);
        let _ = noise.g_div_scalar_(1.0 - p);
        self.inner.set_word_pos(pos + n as u128);
        noise
    }

    /// Two 32-bit words of key for [`hash_word`], from the stream's seed and number.
    fn hash_key(&self) -> (u32, u32) {
        let seed = self.inner.get_seed();
        let word = |i: usize| u32::from_le_bytes(seed[i..i + 4].try_into().unwrap());
        (word(0) ^ self.inner.get_stream() as u32, word(4))
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

/// Words below this are kept: u < (1 - p) * 2^32 for u uniform on 32 bits.
fn keep_below(p: f64) -> u64 {
    ((1.0 - p) * 4_294_967_296.0) as u64
}

/// A 32-bit integer hash (xorshift-multiply, two rounds of multiplication): every output bit
/// depends on every input bit.
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// Word `counter` of the hashed stream of key (`k1`, `k2`): what
/// [`LayerRng::dropout_noise_hashed`] computes on a device, one word at a time.
pub fn hash_word(k1: u32, k2: u32, counter: u64) -> u32 {
    mix32(mix32(counter as u32 ^ k1) ^ (counter >> 32) as u32 ^ k2)
}

/// [`mix32`] over an int64 tensor of values below 2^32.
fn mix_tensor(x: &Tensor) -> Tensor {
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = mul32(&x, 0x7FEB_352D);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    let x = mul32(&x, 0x846C_A68B);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// `x * c mod 2^32` for int64 values below 2^32, by 16-bit halves so that no product
/// reaches 2^49: (lo * c + ((hi * c) mod 2^16) * 2^16) mod 2^32.
fn mul32(x: &Tensor, c: i64) -> Tensor {
    let lo = x.bitwise_and(0xFFFF_i64) * c;
    let hi = (x.bitwise_right_shift_tensor_scalar(16) * c).bitwise_and(0xFFFF_i64).bitwise_left_shift_tensor_scalar(16);
    (lo + hi).bitwise_and(0xFFFF_FFFF_i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_noise_is_the_hash_of_key_and_position_and_moves_the_position_on() {
        let mut r = LayerRng::new(7, 2, Purpose::Dropout);
        let _ = r.dropout_noise(&[5, 3], 0.3, Device::Cpu); // the stream is at word 15
        let (k1, k2) = r.hash_key();
        let p = 0.3;
        let noise = r.dropout_noise_hashed(&[4, 1000], p, Device::Cpu);
        assert_eq!(noise.size(), vec![4, 1000]);
        let got = Vec::<f32>::try_from(noise.flatten(0, -1)).unwrap();
        let scale = Tensor::from(1.0f32).g_div_scalar(1.0 - p).double_value(&[]) as f32;
        for (i, g) in got.iter().enumerate() {
            let word = hash_word(k1, k2, 15 + i as u64);
            let want = if (word as u64) < keep_below(p) { scale } else { 0.0 };
            assert_eq!(*g, want, "word {i}");
        }
        let kept = got.iter().filter(|g| **g != 0.0).count() as f64 / got.len() as f64;
        assert!((kept - 0.7).abs() < 0.03, "kept fraction {kept}");
        // The position moved past the 4,000 words, as a draw from the stream moves it:
        // a saved and restored generator continues where it was.
        assert_eq!(r.inner.get_word_pos(), 15 + 4000);
        let saved = r.state();
        let next = r.dropout_noise_hashed(&[64], p, Device::Cpu);
        let mut b = LayerRng::new(0, 0, Purpose::Init);
        b.set_state(&saved).unwrap();
        assert!(b.dropout_noise_hashed(&[64], p, Device::Cpu).equal(&next));
        // Four words at p = 0.5 from counter `start` on, computed word by word.
        let want = |start: u64| -> Vec<f32> {
            (0..4)
                .map(|i| hash_word(k1, k2, start + i))
                .map(|w| if (w as u64) < keep_below(0.5) { 2.0 } else { 0.0 })
                .collect()
        };
        // Above 2^32 words the high half of the position takes part.
        r.inner.set_word_pos((1u128 << 32) - 2);
        let across = Vec::<f32>::try_from(r.dropout_noise_hashed(&[4], 0.5, Device::Cpu)).unwrap();
        assert_eq!(across, want((1u64 << 32) - 2));
        // A position past 2^62 (only a crafted checkpoint holds one) wraps, and is no panic.
        r.inner.set_word_pos((1u128 << 66) + 7);
        assert_eq!(r.inner.get_word_pos(), (1u128 << 66) + 7);
        let far = Vec::<f32>::try_from(r.dropout_noise_hashed(&[4], 0.5, Device::Cpu)).unwrap();
        assert_eq!(far, want(7));
    }

    #[test]
    fn mix32_spreads_every_bit() {
        // Flipping any one input bit flips about half the output bits, on average.
        let mut flipped = 0u32;
        for x in 0..256u32 {
            for bit in 0..32 {
                flipped += (mix32(x) ^ mix32(x ^ (1 << bit))).count_ones();
            }
        }
        let mean = flipped as f64 / (256.0 * 32.0);
        assert!((mean - 16.0).abs() < 0.5, "{mean} bits of 32");
    }

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
