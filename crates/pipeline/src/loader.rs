//! The data side of a run: the data set read and checked against the plan, held-out sets
//! made into batches only as each evaluation needs them, and the loader thread that makes
//! training batches ahead of stage 0 (`data.prefetch` of them at most).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use layerwise_data::batches::{BatchSource, Sampler};
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
    let splits = layerwise_data::load(&config.data)?;
    plan.check_data(&splits)?;
    let (train, validation) = splits.train.split_validation(config.data.validation_size, config.train.seed)?;
    let sampler = Sampler {
        batch_size: config.train.batch_size,
        drop_last: config.data.drop_last,
        classes_per_batch: config.data.classes_per_batch,
        seed: config.train.seed,
    };
    let (eb, limit) = (config.train.eval_batch(), config.train.eval_batches);
    let eval = |set| {
        let source = BatchSource::evaluation(set, plan.transform.clone(), eb);
        let batches = source.batches_per_epoch().min(limit.unwrap_or(usize::MAX));
        EvalSource { source, batches }
    };
    let test = eval(splits.test);
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

/// Which training batches the loader makes: from `start` = (epoch, batch index) to the end.
pub struct Stream {
    pub start: (usize, usize),
    pub epochs: usize,
    pub steps: usize,
    pub prefetch: usize,
    /// Stage 0's device: batches are left there (pinned, copied ahead on a GPU).
    pub device: Device,
}

/// Images and labels of one training batch, or why the loader stopped.
pub type Loaded = std::result::Result<(Tensor, Tensor), String>;

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
                        let batch = source.batch(epoch, index);
                        let images = match stream.device {
                            Device::Cpu => batch.images,
                            d => batch.images.pin_memory(d).to_device_(d, Kind::Float, true, false),
                        };
                        (images, batch.labels.to_device(stream.device))
                    }));
                    let item = made.map_err(|p| format!("batch {index} of epoch {epoch}: {}", panic_message(&*p)));
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
