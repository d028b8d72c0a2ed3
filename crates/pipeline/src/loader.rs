//! The data side of a run: the data set read and checked against the plan, held-out sets
//! made into batches only as each evaluation needs them, and the loader thread that makes
//! training batches ahead of stage 0 (`data.prefetch` of them at most).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use layerwise_data::batches::{BatchSource, Sampler};
use layerwise_data::Examples;
use tch::{Device, Kind, Tensor};

use crate::thread::{panic_message, set_thread_count};
use crate::{Error, Result};
use layerwise_plan::Plan;

/// A held-out set: its source and how many batches an evaluation takes from it.
pub struct EvalSource {
    pub source: BatchSource,
    pub batches: usize,
}

/// The data of a run, read and split.
pub struct Data {
    pub train: BatchSource,
    pub test: EvalSource,
    pub validation: Option<EvalSource>,
}

pub fn load(plan: &Plan) -> Result<Data> {
    let config = &plan.config;
    let sets = layerwise_data::examples::open(&config.data, decode_threads(plan))?;
    plan.check_data(&sets)?;
    if let Examples::Stream(s) = &sets.train {
        tracing::info!(
            images = s.len(),
            test_images = sets.test.len(),
            threads = s.threads(),
            prefetch = config.data.prefetch_batches(config.train.batch_size),
            "streaming {} from {}",
            s.index().classes.len().to_string() + " classes",
            config.data.root().display()
        );
    }
    let (train, validation) = sets.train.split_validation(config.data.validation_size, config.train.seed)?;
    let sampler = Sampler {
        batch_size: config.train.batch_size,
        drop_last: config.data.drop_last,
        classes_per_batch: config.data.classes_per_batch,
        seed: config.train.seed,
        shuffle_buffer: config.data.shuffle_buffer,
    };
    let (eb, limit) = (config.train.eval_batch(), config.train.eval_batches);
    let eval = |set| {
        let source = BatchSource::evaluation(set, plan.transform.clone(), eb);
        let batches = source.batches_per_epoch().min(limit.unwrap_or(usize::MAX));
        EvalSource { source, batches }
    };
    let test = eval(sets.test);
    let validation = validation.map(eval);
    let train = BatchSource::training(train, plan.transform.clone(), sampler);
    if train.batches_per_epoch() == 0 {
        return Err(layerwise_plan::Error::Config(format!(
            "data: {}: no training batch (the training set holds {} images; train.batch_size {}, data.drop_last {})",
            config.data.root().display(),
            train.len(),
            config.train.batch_size,
            config.data.drop_last
        ))
        .into());
    }
    Ok(Data { train, test, validation })
}

/// Decode threads of a streamed set: `data.workers`, else the cores this process's stages
/// leave free (a CPU stage holds its intra-op threads, a GPU stage one core), at least one.
pub fn decode_threads(plan: &Plan) -> usize {
    if plan.config.data.workers > 0 {
        return plan.config.data.workers;
    }
    let local = plan.stages.iter().filter(|s| s.host.worker().is_none());
    let busy: usize =
        local.map(|s| if s.device() == layerwise_plan::DeviceId::Cpu { s.threads.max(1) } else { 1 }).sum();
    plan.machine.cores.saturating_sub(busy).max(1)
}

/// Which training batches the loader makes: from `start` = (epoch, batch index) to the end.
pub struct Stream {
    pub start: (usize, usize),
    pub epochs: usize,
    pub steps: usize,
    pub prefetch: usize,
    /// Stage 0's device: batches are left there (pinned, copied ahead on a GPU).
    pub device: Device,
}

/// One training batch for stage 0.
pub struct LoadedBatch {
    pub images: Tensor,
    pub labels: Tensor,
    /// Images left out as unreadable (`data.skip_bad`).
    pub skipped: Vec<String>,
}

/// A training batch, or why the loader stopped.
pub type Loaded = std::result::Result<LoadedBatch, String>;

pub fn spawn(mut source: BatchSource, stream: Stream) -> Result<(Receiver<Loaded>, JoinHandle<()>)> {
    let (tx, rx) = bounded(stream.prefetch.max(1));
    let handle = std::thread::Builder::new()
        .name("loader".into())
        .spawn(move || {
            set_thread_count(1);
            let (first_epoch, first_index) = stream.start;
            for epoch in first_epoch..=stream.epochs {
                let from = if epoch == first_epoch { first_index } else { 0 };
                for index in from..stream.steps {
                    let made = catch_unwind(AssertUnwindSafe(|| {
                        let batch = source.batch(epoch, index).map_err(|e| e.to_string())?;
                        let images = match stream.device {
                            Device::Cpu => batch.images,
                            d => batch.images.pin_memory(d).to_device_(d, Kind::Float, true, false),
                        };
                        let labels = batch.labels.to_device(stream.device);
                        Ok(LoadedBatch { images, labels, skipped: batch.skipped })
                    }));
                    let item = made
                        .unwrap_or_else(|p| Err(panic_message(&*p)))
                        .map_err(|e: String| format!("batch {index} of epoch {epoch}: {e}"));
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the loader thread: {e}")))?;
    Ok((rx, handle))
}
