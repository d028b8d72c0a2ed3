//! Balancing layers over stages: pure arithmetic on measured step times (seconds per
//! layer), no tensors. Every placement is contiguous runs of layers; [`ranges`] is the one
//! place that turns run lengths into layer ranges.

use std::ops::Range;

use crate::{DeviceId, Machine};

/// The layer ranges of contiguous stages of `sizes` layers each, from layer 0.
pub fn ranges(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            start += n;
            start - n..start
        })
        .collect()
}

/// `layers` split over `parts` contiguous stages as evenly as they allow, the first ones
/// taking one more.
pub fn even(layers: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts).map(|k| layers / parts + usize::from(k < layers % parts)).collect()
}

/// Seconds per training step of each layer alone (the output layer last), as `auto`
/// measures them.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// With every thread a one-stage run would have (all of a GPU).
    pub whole: Vec<f64>,
    /// On one CPU thread, as each stage of a split over every core runs; CPU only.
    pub one_thread: Option<Vec<f64>>,
}

/// Stage sizes for `auto` on a CPU with `threads` threads to give: one stage with all of
/// them, or `k >= threads` stages of one thread each, whichever the costs predict fastest.
/// Stages of one thread share the cores through the OS, so a step of `k` of them takes the
/// larger of the slowest stage and the whole work spread over the cores; between splits
/// that predict the same step, the one with the smaller slowest stage leaves the OS more
/// room to balance (measured: four stages of mlp predsim on 2 cores ran faster than three).
/// A split must predict a tenth less than one stage to be taken: a close call stays one
/// stage, which is never slower than itself. [`Plan::measure_placement`] then measures the
/// split chosen ([`measure_split`]) before taking it.
pub fn cpu_split(whole: &[f64], one_thread: &[f64], threads: usize) -> Vec<usize> {
    let n = whole.len();
    let one_stage = whole.iter().sum::<f64>();
    let spread = one_thread.iter().sum::<f64>() / threads.max(1) as f64;
    let mut best = (0.9 * one_stage, f64::INFINITY, vec![n]);
    for k in threads.max(2)..=n {
        let sizes = balance(one_thread, k);
        let slowest = ranges(&sizes).into_iter().map(|r| one_thread[r].iter().sum::<f64>()).fold(0.0, f64::max);
        let step = slowest.max(spread);
        if step < best.0 || (step == best.0 && slowest < best.1) {
            best = (step, slowest, sizes);
        }
    }
    best.2
}

/// Splits `costs` into `parts` contiguous groups minimising the largest group's sum.
/// Returns the group sizes.
pub fn balance(costs: &[f64], parts: usize) -> Vec<usize> {
    let parts = parts.clamp(1, costs.len().max(1));
    balance_over(&vec![costs.to_vec(); parts])
}

/// Splits the layers into contiguous groups, group `k` on device `k`, minimising the
/// slowest group's step: `costs[k][i]` is layer `i`'s step time on device `k` (devices
/// unlike each other). Every group gets a layer or more; devices past the layer count get
/// none. Returns the group sizes, one per device used.
pub fn balance_over(costs: &[Vec<f64>]) -> Vec<usize> {
    let n = costs.first().map_or(0, Vec::len);
    let parts = costs.len().clamp(1, n.max(1));
    if n == 0 {
        return vec![0];
    }
    let prefix: Vec<Vec<f64>> = costs[..parts]
        .iter()
        .map(|c| {
            std::iter::once(0.0)
                .chain(c.iter().scan(0.0, |s, c| {
                    *s += c;
                    Some(*s)
                }))
                .collect()
        })
        .collect();
    // best[k][i]: minimal slowest group putting the first i layers on the first k devices;
    // cut[k][i]: where device k's group starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; parts + 1];
    let mut cut = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for k in 1..=parts {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[k - 1][i] - prefix[k - 1][j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut sizes = Vec::with_capacity(parts);
    let mut i = n;
    for k in (1..=parts).rev() {
        let j = cut[k][i];
        sizes.push(i - j);
        i = j;
    }
    sizes.reverse();
    sizes
}

/// How many stages `auto` makes: one per CUDA device, else one per CPU core.
pub(crate) fn auto_parts(num_layers: usize, machine: &Machine) -> usize {
    let devices = machine.visible();
    let parts = if devices == [DeviceId::Cpu] { machine.cores } else { devices.len() };
    parts.min(num_layers).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lengths_become_contiguous_layer_ranges() {
        assert_eq!(ranges(&[2, 1, 3]), vec![0..2, 2..3, 3..6]);
        assert_eq!(ranges(&[]), Vec::<Range<usize>>::new());
        assert_eq!(even(7, 3), vec![3, 2, 2]);
        assert_eq!(even(6, 3), vec![2, 2, 2]);
        assert_eq!(even(2, 3), vec![1, 1, 0]);
    }

    #[test]
    fn balancing_minimises_the_slowest_stage() {
        assert_eq!(balance(&[1.0, 1.0, 1.0, 1.0], 2), vec![2, 2]);
        assert_eq!(balance(&[8.0, 1.0, 1.0, 1.0, 1.0], 2), vec![1, 4]);
        assert_eq!(balance(&[1.0, 2.0, 3.0], 5), vec![1, 1, 1]);
    }

    #[test]
    fn balancing_over_unlike_devices_gives_the_slower_device_fewer_layers() {
        // Four like layers; the second device takes three times as long for each.
        let fast = vec![1.0; 4];
        let slow = vec![3.0; 4];
        assert_eq!(balance_over(&[fast.clone(), slow.clone()]), vec![3, 1]);
        assert_eq!(balance_over(&[slow.clone(), fast.clone()]), vec![1, 3]);
        // Alike, it is `balance`; more devices than layers leave the last out.
        assert_eq!(balance_over(&[fast.clone(), fast.clone()]), vec![2, 2]);
        assert_eq!(balance_over(&vec![vec![1.0, 2.0]; 3]), vec![1, 1]);
        // Every device used gets a layer, however slow.
        assert_eq!(balance_over(&[fast, vec![1e9; 4]]), vec![3, 1]);
    }

    #[test]
    fn auto_on_cpu_leaves_one_stage_only_for_a_predicted_gain() {
        // Threads that barely help one stage (one thread 1.6x slower than two): layers of
        // one thread each spread over both cores beat one stage of two threads; three
        // stages and four predict the same step, and four have the smaller slowest stage.
        let whole = [1.0, 1.0, 1.0, 0.1];
        let poor = [1.6, 1.6, 1.6, 0.16];
        assert_eq!(cpu_split(&whole, &poor, 2), vec![1, 1, 1, 1]);
        // Threads that scale perfectly: no split can be faster than one stage.
        let perfect = whole.map(|c| 2.0 * c);
        assert_eq!(cpu_split(&whole, &perfect, 2), vec![4]);
        // A gain under a tenth is not taken.
        let close = [1.85, 1.85, 1.85, 0.2];
        assert_eq!(cpu_split(&whole, &close, 2), vec![4]);
        // One dominant layer: its stage bounds every split.
        assert_eq!(cpu_split(&[3.0, 0.1, 0.1], &[5.0, 0.2, 0.2], 2), vec![3]);
    }
}
