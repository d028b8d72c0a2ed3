//! Asking workers to time the layers on their devices, for `auto` over workers: all are
//! asked at once (they measure side by side, as their stages will run), and each answer is
//! matched to its question.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use layerwise_plan::placement::Ask;
use layerwise_plan::Plan;

use crate::cluster::{Cluster, WorkerConn};
use crate::protocol::ToWorker;
use crate::{Error, Result};

/// The longest a worker may take to time its layers for `auto` (a worker that dies or goes
/// silent meanwhile is noticed sooner, by [`crate::protocol::PEER_TIMEOUT`]).
pub const MEASURE_LIMIT: Duration = Duration::from_secs(600);

impl Cluster {
    /// Asks each worker of `asks` (among `workers`, registered) for each layer's step time
    /// (seconds, the output layer last): the worker builds the layers of `plan`'s net one at
    /// a time on its device and times them, as this process does its own. Fails, naming the
    /// first worker that is busy with a job, is lost, cannot measure, or takes longer than
    /// [`MEASURE_LIMIT`].
    pub fn ask_layer_times(
        &self,
        asks: &[Ask],
        plan: &Plan,
        workers: &[Arc<WorkerConn>],
        stop: Option<&AtomicBool>,
    ) -> Result<Vec<Vec<f64>>> {
        let config = Box::new(plan.config.clone());
        let mut pending = Vec::with_capacity(asks.len());
        for ask in asks {
            let failed = move |why: String| {
                Error::Other(format!("worker {} could not measure its {}: {why}", ask.name, ask.device))
            };
            let Some(w) = workers.iter().find(|w| w.name == ask.name) else {
                return Err(failed("it is not registered".into()));
            };
            if let Some(job) = w.job() {
                return Err(failed(format!("it is busy with another job ({job:x})")));
            }
            let request = rand::random::<u64>();
            let (tx, rx) = crossbeam_channel::bounded(1);
            *w.measuring.lock().unwrap_or_else(|p| p.into_inner()) = Some((request, tx));
            let (device, threads, shape) = (ask.device, ask.threads, plan.shape);
            if !w.send(&ToWorker::Measure { request, config: config.clone(), shape, device, threads }) {
                return Err(failed("it was lost".into()));
            }
            pending.push((w, rx, failed));
        }
        let since = Instant::now();
        let mut answers = Vec::with_capacity(pending.len());
        for (w, rx, failed) in pending {
            let times = loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(times) => break times.map_err(|why| failed(crate::protocol::printable(&why)))?,
                    Err(RecvTimeoutError::Disconnected) => return Err(failed("it was lost".into())),
                    // Lost before the question was recorded: nobody drops the answer's end.
                    Err(RecvTimeoutError::Timeout) if !self.still_registered(w) => {
                        return Err(failed("it was lost".into()))
                    }
                    Err(RecvTimeoutError::Timeout) if stop.is_some_and(|s| s.load(Ordering::SeqCst)) => {
                        return Err(failed("stopped while it measured".into()))
                    }
                    Err(RecvTimeoutError::Timeout) if since.elapsed() >= MEASURE_LIMIT => {
                        return Err(failed(format!("no answer within {} s", MEASURE_LIMIT.as_secs())))
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            };
            answers.push(times);
        }
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{fake_worker, next_message};
    use crate::protocol::{Measurement, ToCoordinator};
    use crate::wire;
    use crate::wire::Conn;
    use layerwise_plan::{DataShape, DeviceId, Machine, RunConfig};

    type Question = (usize, DataShape, DeviceId, usize);

    /// The next measurement asked of a fake worker: its request id and what it asks.
    fn question(worker: &mut Conn) -> Option<(u64, Question)> {
        match next_message(worker).ok()? {
            ToWorker::Measure { request, config, shape, device, threads } => {
                Some((request, (config.model.num_layers, shape, device, threads)))
            }
            other => panic!("sent {other:?}"),
        }
    }

    fn answer(worker: &mut Conn, request: u64, times: Measurement) {
        worker.writer.frame(&ToCoordinator::Measured { request, times }).unwrap();
    }

    #[test]
    fn workers_are_asked_at_once_and_each_answer_is_matched_to_its_question() {
        let cluster = Cluster::listen("127.0.0.1:0", wire::testing::auth(), Duration::from_secs(600)).unwrap();
        let mut c = RunConfig::default();
        c.model.num_layers = 3; // four layers with the output layer
        let plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let (mut slow, mut far) = (
            fake_worker(&cluster, cluster.addr, "slow", "elsewhere", 1 << 40),
            fake_worker(&cluster, cluster.addr, "far", "afar", 1 << 40),
        );
        let workers = cluster.wait_for(&["slow".into(), "far".into()], None).unwrap();
        // "slow" answers only once "far" has its question too (were they asked one after the
        // other, it would answer with an error after a long wait), and first answers a
        // request never made.
        let (far_asked, far_was_asked) = crossbeam_channel::bounded(1);
        let far_answers = std::thread::spawn(move || {
            let (request, asked) = question(&mut far).unwrap();
            far_asked.send(()).unwrap();
            answer(&mut far, request, Ok(vec![2.0; 4]));
            (asked, far)
        });
        let slow_answers = std::thread::spawn(move || {
            let mut asked = Vec::new();
            while let Some((request, q)) = question(&mut slow) {
                asked.push(q);
                match asked.len() {
                    1 => match far_was_asked.recv_timeout(Duration::from_secs(120)) {
                        Ok(()) => {
                            answer(&mut slow, request.wrapping_add(1), Ok(vec![0.0; 4]));
                            answer(&mut slow, request, Ok(vec![1.0; 4]));
                        }
                        Err(_) => answer(&mut slow, request, Err("asked one after the other".into())),
                    },
                    2 => answer(&mut slow, request, Err("the card fell off".into())),
                    _ => break, // and hangs up
                }
            }
            asked
        });
        let ask = |name: &str| Ask { name: name.into(), device: DeviceId::Cpu, threads: 1 };
        let times = cluster.ask_layer_times(&[ask("slow"), ask("far")], &plan, &workers, None).unwrap();
        assert_eq!(times, vec![vec![1.0; 4], vec![2.0; 4]]);
        let (far_question, _far) = far_answers.join().unwrap();
        assert_eq!(far_question, (3, plan.shape, DeviceId::Cpu, 1));
        let e = cluster.ask_layer_times(&[ask("slow")], &plan, &workers, None).unwrap_err().to_string();
        assert!(e.contains("worker slow could not measure its cpu: the card fell off"), "{e}");
        let e = cluster.ask_layer_times(&[ask("slow")], &plan, &workers, None).unwrap_err().to_string();
        assert!(e.contains("worker slow") && e.contains("lost"), "{e}");
        assert_eq!(slow_answers.join().unwrap(), vec![(3, plan.shape, DeviceId::Cpu, 1); 3]);
    }
}
