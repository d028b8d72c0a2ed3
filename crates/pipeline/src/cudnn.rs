//! cuDNN's flags are one per process, and a daemon runs several jobs at once: each job
//! holds a [`Hold`] for its life, and the flags follow what the jobs running ask for. A job
//! that asks for exactness always gets it (benchmark off, deterministic algorithms); a job
//! that does not gets the benchmark only while no exact job runs in this process, which
//! costs it speed and never correctness.

use std::sync::Mutex;

/// Jobs running in this process that asked for exactness, and that did not.
static JOBS: Mutex<(usize, usize)> = Mutex::new((0, 0));

/// The flags (benchmark, deterministic) for `exact` and `fast` jobs running.
pub fn flags(exact: usize, fast: usize) -> (bool, bool) {
    (exact == 0 && fast > 0, exact > 0 || fast == 0)
}

/// A running job's claim on cuDNN's flags; released when dropped.
#[must_use = "the flags hold only while the Hold lives"]
pub struct Hold {
    exact: bool,
}

/// Claims the flags a job with `train.deterministic = exact` needs, for as long as the
/// returned [`Hold`] lives.
pub fn hold(exact: bool) -> Hold {
    update(|jobs| if exact { jobs.0 += 1 } else { jobs.1 += 1 });
    Hold { exact }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let exact = self.exact;
        update(|jobs| if exact { jobs.0 -= 1 } else { jobs.1 -= 1 });
    }
}

fn update(change: impl FnOnce(&mut (usize, usize))) {
    let mut jobs = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    change(&mut jobs);
    let (benchmark, deterministic) = flags(jobs.0, jobs.1);
    layerwise_nn::set_cudnn(benchmark, deterministic);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactness_wins_and_the_benchmark_runs_only_for_fast_jobs_alone() {
        // (benchmark, deterministic) for (exact, fast) jobs running.
        assert_eq!(flags(0, 0), (false, true), "nothing running: libtorch's exact defaults");
        assert_eq!(flags(0, 2), (true, false));
        assert_eq!(flags(1, 0), (false, true));
        assert_eq!(flags(1, 3), (false, true));
    }

    #[test]
    fn an_exact_job_sees_the_flags_of_exactness_whatever_else_runs() {
        // Other tests of this process may hold flags meanwhile: an exact hold must still win.
        let fast = hold(false);
        let exact = hold(true);
        assert_eq!(layerwise_nn::cudnn(), (false, true));
        drop(fast);
        assert_eq!(layerwise_nn::cudnn(), (false, true));
        drop(exact);
    }
}
