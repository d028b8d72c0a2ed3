//! How a training set is cut into batches each epoch: a full shuffle, batches of few
//! classes, or the order of a WebDataset-style shuffle buffer over shards. Every order is a
//! pure function of (seed, epoch).

use std::ops::Range;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::rng::batch_rng;

/// How the training set is cut into batches each epoch.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub batch_size: usize,
    pub drop_last: bool,
    pub classes_per_batch: usize,
    pub seed: u64,
    /// A WebDataset-style shuffle buffer of this many examples (0: a full shuffle).
    pub shuffle_buffer: usize,
}

impl Sampler {
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The example indices of every batch of `epoch` (1-based), in order.
    pub fn epoch_order(&self, labels: &[i64], num_classes: usize, epoch: usize) -> Vec<Vec<usize>> {
        let mut rng = batch_rng(self.seed, epoch, usize::MAX >> 8, 1);
        let n = labels.len();
        let order: Vec<usize> = if self.classes_per_batch == 0 {
            let mut p: Vec<usize> = (0..n).collect();
            p.shuffle(&mut rng);
            p
        } else {
            self.class_grouped_order(labels, num_classes, &mut rng)
        };
        self.cut(order)
    }

    /// The examples' order as a shuffle buffer of `shuffle_buffer` would give it, reading
    /// `groups` (runs of examples: shards) in a shuffled order: fill the buffer, then for
    /// each new example emit a random one of the buffer and put the new one in its place;
    /// at the end, the buffer in a random order. A pure function of (seed, epoch), so a
    /// resumed run reads on exactly where it stopped.
    pub fn buffered_order(&self, groups: &[Range<usize>], epoch: usize) -> Vec<Vec<usize>> {
        let mut rng = batch_rng(self.seed, epoch, usize::MAX >> 8, 3);
        let mut groups = groups.to_vec();
        groups.shuffle(&mut rng);
        let mut buffer = Vec::with_capacity(self.shuffle_buffer);
        let mut order = Vec::with_capacity(groups.iter().map(|g| g.len()).sum());
        for i in groups.into_iter().flatten() {
            if buffer.len() < self.shuffle_buffer {
                buffer.push(i);
            } else {
                let j = rng.gen_range(0..buffer.len());
                order.push(std::mem::replace(&mut buffer[j], i));
            }
        }
        buffer.shuffle(&mut rng);
        order.extend(buffer);
        self.cut(order)
    }

    fn cut(&self, order: Vec<usize>) -> Vec<Vec<usize>> {
        let mut batches: Vec<Vec<usize>> = order.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        if self.drop_last && batches.last().is_some_and(|b| b.len() < self.batch_size) {
            batches.pop();
        }
        batches
    }

    /// Each batch draws from `classes_per_batch` classes chosen at random among those with
    /// examples left; every example still appears once per epoch.
    fn class_grouped_order(&self, labels: &[i64], num_classes: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let mut pools: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
        for (i, &l) in labels.iter().enumerate() {
            pools[l as usize].push(i);
        }
        for p in &mut pools {
            p.shuffle(rng);
        }
        let mut order = Vec::with_capacity(labels.len());
        while order.len() < labels.len() {
            let mut live: Vec<usize> = (0..num_classes).filter(|&c| !pools[c].is_empty()).collect();
            live.shuffle(rng);
            let chosen: Vec<usize> = live.into_iter().take(self.classes_per_batch.max(1)).collect();
            let mut taken = 0;
            // Round-robin over the chosen classes; a batch they cannot fill ends early and the
            // next one picks among the classes that are left.
            'fill: while taken < self.batch_size {
                let mut progressed = false;
                for &c in &chosen {
                    if let Some(i) = pools[c].pop() {
                        order.push(i);
                        taken += 1;
                        progressed = true;
                        if taken == self.batch_size {
                            break 'fill;
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_appears_once_per_epoch_and_the_last_partial_batch_is_kept() {
        let labels: Vec<i64> = (0..103).map(|i| i % 7).collect();
        for cpb in [0, 2] {
            let s = Sampler { batch_size: 10, drop_last: false, classes_per_batch: cpb, seed: 3, shuffle_buffer: 0 };
            let batches = s.epoch_order(&labels, 7, 1);
            assert_eq!(batches.len(), 11);
            assert_eq!(batches.last().unwrap().len(), 3);
            let mut all: Vec<usize> = batches.concat();
            all.sort();
            assert_eq!(all, (0..103).collect::<Vec<_>>());
            assert_ne!(s.epoch_order(&labels, 7, 1), s.epoch_order(&labels, 7, 2), "epochs are shuffled differently");
        }
        let s = Sampler { batch_size: 10, drop_last: true, classes_per_batch: 0, seed: 3, shuffle_buffer: 0 };
        assert_eq!(s.epoch_order(&labels, 7, 1).len(), 10);
    }

    #[test]
    fn class_grouped_batches_hold_few_classes() {
        let labels: Vec<i64> = (0..1000).map(|i| i % 10).collect();
        let s = Sampler { batch_size: 20, drop_last: false, classes_per_batch: 2, seed: 3, shuffle_buffer: 0 };
        let batches = s.epoch_order(&labels, 10, 1);
        let few = batches
            .iter()
            .filter(|b| {
                let mut c: Vec<i64> = b.iter().map(|&i| labels[i]).collect();
                c.sort();
                c.dedup();
                c.len() <= 2
            })
            .count();
        assert!(few >= batches.len() * 9 / 10, "{few} of {} batches hold at most 2 classes", batches.len());
    }

    #[test]
    fn a_shuffle_buffer_emits_each_example_once_and_only_from_near_its_read_position() {
        let groups: Vec<Range<usize>> = (0..20).map(|g| g * 50..(g + 1) * 50).collect();
        let s = Sampler { batch_size: 64, drop_last: false, classes_per_batch: 0, seed: 9, shuffle_buffer: 100 };
        let order: Vec<usize> = s.buffered_order(&groups, 1).concat();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        // nothing is emitted before it is read: the first t examples out come from the
        // first (t + buffer) read, i.e. from at most ceil((t + 100) / 50) shards (a full
        // shuffle would draw the first 50 from nearly all 20)
        for t in (50..1000).step_by(50) {
            let mut shards: Vec<usize> = order[..t].iter().map(|i| i / 50).collect();
            shards.sort();
            shards.dedup();
            assert!(shards.len() <= (t + 100).div_ceil(50), "{} shards in the first {t}", shards.len());
        }
        assert_eq!(s.buffered_order(&groups, 1), s.buffered_order(&groups, 1), "a pure function");
        assert_ne!(s.buffered_order(&groups, 1), s.buffered_order(&groups, 2), "epochs differ");
        let no_buffer = Sampler { shuffle_buffer: 1, ..s.clone() }.buffered_order(&groups, 1).concat();
        assert!(no_buffer.chunks(50).all(|c| c.iter().all(|i| i / 50 == c[0] / 50)), "buffer 1: whole shards in turn");
    }
}
