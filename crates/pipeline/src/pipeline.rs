//! The running pipeline: the plan's stages started and linked. Pipelined, each stage is a
//! thread that builds its own layers and runs the stage loop, linked to the next by a
//! bounded link; sequential, every stage is built here and a message goes through them all
//! in this thread (the reference's order). Either way the stages report over their report
//! links and give nothing back: a run's final state is its final checkpoint.

use std::sync::Arc;
use std::thread::JoinHandle;

use layerwise_plan::{Host, PipelineMode, Plan};

use crate::link::{in_process, ChannelReceiver, ChannelSender, LinkReceiver, LinkSender, RemoteLinks, ReportSender};
use crate::message::{Control, Message, Report, StageFailure};
use crate::stage::{run_stage, Stage, StageEnv};
use crate::thread::set_thread_count;
use crate::{Error, Result};

/// Why a message could not be fed: the pipeline came apart (a stage stopped; what it
/// reported says why), or, run inline, a stage failed on it.
#[derive(Debug)]
pub enum Stopped {
    Closed,
    Failed(StageFailure),
}

pub enum Pipeline {
    Threads { head: Box<dyn LinkSender>, workers: Vec<JoinHandle<bool>> },
    Inline { stages: Vec<Stage> },
}

impl Pipeline {
    /// Starts the stages of `plan` that run in the coordinator's process; `env(i)` gives
    /// stage `i` its environment. Stages elsewhere are reached through `remote`.
    pub fn start(
        plan: &Arc<Plan>,
        mut env: impl FnMut(usize) -> StageEnv,
        remote: Option<Arc<dyn RemoteLinks>>,
    ) -> Result<Pipeline> {
        let n = plan.stages.len();
        match plan.config.pipeline.mode {
            PipelineMode::Sequential => {
                set_thread_count(plan.stages[0].threads);
                let stages = (0..n).map(|i| Stage::build(plan, i, env(i))).collect::<std::result::Result<_, _>>()?;
                Ok(Pipeline::Inline { stages })
            }
            PipelineMode::Pipelined => {
                let capacity = plan.config.pipeline.channel_capacity;
                let (head, first): (Box<dyn LinkSender>, _) = if plan.stages[0].host == Host::Coordinator {
                    let (tx, rx) = in_process(capacity);
                    (Box::new(tx), Some(rx))
                } else {
                    let remote = remote
                        .as_ref()
                        .ok_or_else(|| Error::Other("stage 0 is on a worker, without a network".into()))?;
                    (remote.output(0).map_err(Error::Other)?, None)
                };
                let workers = spawn_stages(plan, &Host::Coordinator, first, &mut env, remote)?;
                Ok(Pipeline::Threads { head, workers })
            }
        }
    }

    /// Hands a message to stage 0 (pipelined) or through every stage (sequential).
    pub fn feed(&mut self, msg: Message) -> std::result::Result<(), Stopped> {
        match self {
            Pipeline::Threads { head, .. } => head.send(msg).map_err(|_| Stopped::Closed),
            Pipeline::Inline { stages } => {
                let mut msg = Some(msg);
                for stage in stages.iter_mut() {
                    match msg.take() {
                        Some(m) => msg = stage.process(m).map_err(Stopped::Failed)?,
                        None => break,
                    }
                }
                Ok(())
            }
        }
    }

    /// Stops the stages after what they hold (checkpoint markers included) and waits for them.
    pub fn finish(self) {
        match self {
            Pipeline::Threads { head, workers } => {
                let _ = head.send(Message::control(Control::Shutdown));
                drop(head);
                for w in workers {
                    let _ = w.join();
                }
            }
            Pipeline::Inline { stages } => drop(stages),
        }
    }
}

/// Where a stage's input comes from, or its output goes.
enum End<T> {
    /// A channel to a stage in this process.
    Local(T),
    /// A TCP link to another process (made in the stage's thread: it may wait).
    Remote,
    /// None: the last stage's results go to the coordinator as reports.
    Nothing,
}

/// Starts, each in its own thread, the stages of `plan` placed on `host`, linking
/// neighbours here by channels and others through `remote`. `first` is stage 0's input
/// when the coordinator feeds it in this process.
pub fn spawn_stages(
    plan: &Arc<Plan>,
    host: &Host,
    first: Option<ChannelReceiver>,
    env: &mut dyn FnMut(usize) -> StageEnv,
    remote: Option<Arc<dyn RemoteLinks>>,
) -> Result<Vec<JoinHandle<bool>>> {
    let (n, capacity) = (plan.stages.len(), plan.config.pipeline.channel_capacity);
    let here = |i: usize| plan.stages[i].host == *host;
    let mut previous = first;
    let mut workers = Vec::new();
    for i in (0..n).filter(|&i| here(i)) {
        let input = match previous.take() {
            Some(rx) if i == 0 || here(i - 1) => End::Local(rx),
            _ => End::Remote,
        };
        let output = if i + 1 == n {
            End::Nothing
        } else if here(i + 1) {
            let (tx, rx) = in_process(capacity);
            previous = Some(rx);
            End::Local(tx)
        } else {
            End::Remote
        };
        let (plan, env, remote) = (plan.clone(), env(i), remote.clone());
        let worker = std::thread::Builder::new()
            .name(format!("stage-{i}"))
            .spawn(move || {
                let reports = env.reports.clone();
                let linked = link_stage(i, input, output, remote.as_deref());
                match linked {
                    Ok((input, output)) => run_stage(&plan, i, env, input, output),
                    Err(reason) => {
                        let failure = StageFailure { stage: i, layer: None, step: None, reason };
                        tracing::error!(stage = i, "{failure}");
                        let _ = reports.send(Report::Failed(failure));
                        false
                    }
                }
            })
            .map_err(|e| Error::Other(format!("cannot start stage {i}: {e}")))?;
        workers.push(worker);
    }
    Ok(workers)
}

type Ends = (Box<dyn LinkReceiver>, Option<Box<dyn LinkSender>>);

fn link_stage(
    i: usize,
    input: End<ChannelReceiver>,
    output: End<ChannelSender>,
    remote: Option<&dyn RemoteLinks>,
) -> std::result::Result<Ends, String> {
    let remote = || remote.ok_or_else(|| format!("stage {i} has a neighbour in another process, without a network"));
    let input: Box<dyn LinkReceiver> = match input {
        End::Local(rx) => Box::new(rx),
        _ => remote()?.input(i)?,
    };
    let output: Option<Box<dyn LinkSender>> = match output {
        End::Local(tx) => Some(Box::new(tx)),
        End::Remote => Some(remote()?.output(i + 1)?),
        End::Nothing => None,
    };
    Ok((input, output))
}

/// A report link for in-process stages: a clone of the coordinator's channel.
pub fn report_link(tx: &crossbeam_channel::Sender<Report>) -> Arc<dyn ReportSender> {
    Arc::new(tx.clone())
}
