//! The data's random numbers: a generator per (seed, epoch, batch, purpose), so that any
//! batch is a pure function of where it is in the stream, and a resumed run draws what an
//! uninterrupted one would.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A generator for one (seed, epoch, batch, purpose): independent of every other batch.
pub fn batch_rng(seed: u64, epoch: usize, index: usize, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c61_7965_7277_6973);
    rng.set_stream(((epoch as u64) << 40) ^ ((index as u64) << 4) ^ purpose);
    rng
}
