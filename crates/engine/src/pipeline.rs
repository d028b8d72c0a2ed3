//! The running pipeline: the plan's stages started and linked. Pipelined, each stage is a
//! thread that builds its own layers and runs the stage loop, linked to the next by a
//! bounded link; sequential, every stage is built here and a message goes through them all
//! in this thread (the reference's order). Either way the stages report over their report
//! links and give nothing back: a run's final state is its final checkpoint.

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::PipelineMode;
use crate::inbox::Inbox;
use crate::link::{in_process, LinkSender, ReportSender};
use crate::message::{Control, Message};
use crate::plan::Plan;
use crate::stage::{run_stage, Stage, StageEnv};
use crate::{EngineError, Result};

pub enum Pipeline {
    Threads { head: Box<dyn LinkSender>, workers: Vec<JoinHandle<()>> },
    Inline { stages: Vec<Stage> },
}

impl Pipeline {
    /// Starts every stage of `plan`; `env(i)` gives stage `i` its environment.
    pub fn start(plan: &Arc<Plan>, mut env: impl FnMut(usize) -> StageEnv) -> Result<Pipeline> {
        let n = plan.stages.len();
        match plan.config.pipeline.mode {
            PipelineMode::Sequential => {
                tch::set_num_threads(plan.stages[0].threads as i32);
                let stages = (0..n).map(|i| Stage::build(plan, i, env(i))).collect::<std::result::Result<_, _>>()?;
                Ok(Pipeline::Inline { stages })
            }
            PipelineMode::Pipelined => {
                let capacity = plan.config.pipeline.channel_capacity;
                let (head, mut rx) = in_process(capacity);
                let mut workers = Vec::with_capacity(n);
                for i in 0..n {
                    let (tx_next, rx_next) = in_process(capacity);
                    let output: Option<Box<dyn LinkSender>> = (i + 1 < n).then(|| Box::new(tx_next) as _);
                    let input = Box::new(std::mem::replace(&mut rx, rx_next));
                    let (plan, env) = (plan.clone(), env(i));
                    let worker = std::thread::Builder::new()
                        .name(format!("stage-{i}"))
                        .spawn(move || run_stage(&plan, i, env, input, output))
                        .map_err(|e| EngineError::Other(format!("cannot start stage {i}: {e}")))?;
                    workers.push(worker);
                }
                Ok(Pipeline::Threads { head: Box::new(head), workers })
            }
        }
    }

    /// Hands a message to stage 0 (pipelined) or through every stage (sequential). When the
    /// pipeline has come apart, the error is the failure a stage reported.
    pub fn feed(&mut self, msg: Message, inbox: &mut Inbox) -> Result<()> {
        match self {
            Pipeline::Threads { head, .. } => head.send(msg).map_err(|_| inbox.first_failure()),
            Pipeline::Inline { stages } => {
                let mut msg = Some(msg);
                for stage in stages.iter_mut() {
                    match msg.take() {
                        Some(m) => msg = stage.process(m)?,
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

/// A report link for in-process stages: a clone of the coordinator's channel.
pub fn report_link(tx: &crossbeam_channel::Sender<crate::message::Report>) -> Arc<dyn ReportSender> {
    Arc::new(tx.clone())
}
