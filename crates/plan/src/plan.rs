//! The plan: a run's config interpreted once, against the machine it runs on. Building it is
//! validation: every range check ([`crate::checks`]), the architecture against the data's
//! images, the stages with their typed devices and thread budgets. `validate`, `train`,
//! `serve`, `eval`, `export`, `inspect` and `bench` all start from a plan; nothing after it
//! parses the config's strings again.

use std::collections::BTreeSet;

use layerwise_data::batches::Transform;
use layerwise_data::DatasetKind;
use layerwise_nn::arch::InputShape;
use layerwise_nn::Architecture;
use serde::{Deserialize, Serialize};

use crate::checks::check_ranges;
use crate::config::RunConfig;
use crate::placement::{self, Host, StagePlan};
use crate::{DeviceId, Error, Machine, Result};

/// The images and classes a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataShape {
    pub input: InputShape,
    pub num_classes: i64,
}

impl DataShape {
    /// What the config's data set holds: known for the standard sets; an image folder's
    /// classes are its training folder's subfolders.
    pub fn of_config(data: &layerwise_data::DataConfig) -> Result<Self> {
        let (channels, size) = data.input_shape();
        let num_classes = match data.num_classes() {
            Some(n) => n,
            None if data.dataset == DatasetKind::WebDataset => {
                // the shards' index (cached beside them) knows the classes
                let train = data.root().join("train");
                layerwise_data::shards::index(&train, None, data.skip_bad)?.classes.len() as i64
            }
            None => {
                debug_assert_eq!(data.dataset, DatasetKind::ImageFolder);
                let train = data.root().join("train");
                let rd = std::fs::read_dir(&train).map_err(|e| Error::io(&train, e))?;
                rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).count() as i64
            }
        };
        Ok(Self { input: InputShape { channels, size }, num_classes })
    }
}

impl DataShape {
    /// Refuses a shape that is not the one `data` describes: its images as the config makes
    /// them, its classes the data set's (an image folder's, 1 to `limits::CLASSES`). A
    /// worker is sent the shape (it may not hold the data): it is input like any other.
    pub fn check_for(&self, data: &layerwise_data::DataConfig) -> Result<()> {
        let (channels, size) = data.input_shape();
        let classes = match data.num_classes() {
            Some(n) => self.num_classes == n,
            None => (1..=crate::checks::limits::CLASSES as i64).contains(&self.num_classes),
        };
        if self.input == (InputShape { channels, size }) && classes {
            return Ok(());
        }
        Err(Error::Config(format!(
            "data: images of {}x{}x{} in {} classes, expected {channels}x{size}x{size} in {} for {:?}",
            self.input.channels,
            self.input.size,
            self.input.size,
            self.num_classes,
            data.num_classes().map_or(format!("1 to {}", crate::checks::limits::CLASSES), |n| n.to_string()),
            data.dataset
        )))
    }
}

/// A validated run: the config, its architecture, data transform and stages.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: RunConfig,
    pub shape: DataShape,
    pub arch: Architecture,
    pub transform: Transform,
    pub stages: Vec<StagePlan>,
    pub machine: Machine,
}

impl Plan {
    /// Validates `config` for `machine` and places its layers. An `auto` placement is split
    /// evenly here; the coordinator refines it by measured costs before a run.
    pub fn build(config: &RunConfig, machine: Machine) -> Result<Plan> {
        let shape = DataShape::of_config(&config.data)?;
        Self::build_for(config, machine, shape)
    }

    /// As [`Plan::build`], for a data shape known otherwise (read from the data).
    pub fn build_for(config: &RunConfig, machine: Machine, shape: DataShape) -> Result<Plan> {
        let plan = Self::build_unplaced(config, machine, shape)?;
        if config.pipeline.workers.is_empty() {
            plan.check_memory(&Host::Coordinator)?;
        } else {
            // Spread over workers later: a net that fits only spread is not refused here,
            // but each layer must fit where it is measured; the stages are checked once
            // placed (this process's in `run`, each worker's before it is sent anything).
            for d in machine.visible() {
                plan.check_each_layer_fits(d)?;
            }
        }
        Ok(plan)
    }

    /// As [`Plan::build_for`], without the memory check: for a worker, whose stages come
    /// from the coordinator's plan; it checks them with [`Plan::check_memory`] once set.
    pub fn build_unplaced(config: &RunConfig, machine: Machine, shape: DataShape) -> Result<Plan> {
        check_ranges(config)?;
        shape.check_for(&config.data)?;
        let transform = Transform::from_config(&config.data, shape.input.channels, shape.input.size)?;
        let arch = Architecture::new(&config.model, shape.input, shape.num_classes)?;
        let stages = placement::resolve(config, arch.hidden.len() + 1, &machine, None)?;
        Ok(Plan { config: config.clone(), shape, arch, transform, stages, machine })
    }

    /// A worker's plan: `config`'s net with the coordinator's `stages`, which came over the
    /// network and are checked as any input is: they must be a placement of this net, and
    /// the devices of `host`'s stages must be present on this machine and hold its layers.
    pub fn assigned(
        config: &RunConfig,
        machine: Machine,
        shape: DataShape,
        stages: Vec<StagePlan>,
        host: &Host,
    ) -> Result<Plan> {
        // The coordinator resolved the placement (its devices are its own to check).
        let mut unplaced = config.clone();
        unplaced.pipeline.placement = crate::Placement::Single;
        unplaced.pipeline.workers.clear();
        let mut plan = Self::build_unplaced(&unplaced, machine, shape)?;
        crate::assigned::check_assigned(&stages, plan.num_layers(), config, &machine, host)?;
        plan.config = config.clone();
        plan.stages = stages;
        plan.check_memory(host)?;
        Ok(plan)
    }

    /// `validate`: the plan for this machine, and the data files present when asked.
    pub fn check(config: &RunConfig, check_data: bool) -> Result<Plan> {
        let plan = Plan::build(config, Machine::detect())?;
        if check_data {
            config.data.check_files()?;
        }
        Ok(plan)
    }
    /// Hidden layers plus the output layer.
    pub fn num_layers(&self) -> usize {
        self.arch.hidden.len() + 1
    }

    /// The output layer's index (after the last hidden layer).
    pub fn output_layer(&self) -> usize {
        self.arch.hidden.len()
    }

    /// The devices of this process that the plan uses (workers' devices are theirs).
    pub fn devices(&self) -> BTreeSet<DeviceId> {
        self.stages.iter().filter(|s| s.host == Host::Coordinator).flat_map(|s| s.devices.iter().copied()).collect()
    }

    /// The workers the plan places stages on, by name.
    pub fn workers(&self) -> BTreeSet<String> {
        self.stages.iter().filter_map(|s| s.host.worker().map(str::to_string)).collect()
    }

    /// Every worker the run may use: those its stages are placed on, and those an `auto`
    /// placement will spread over (`pipeline.workers`) once they register.
    pub fn workers_wanted(&self) -> BTreeSet<String> {
        let mut all = self.workers();
        all.extend(self.config.pipeline.workers.iter().cloned());
        all
    }

    /// Refuses data whose images or classes are not the plan's, naming the data folder.
    pub fn check_data(&self, splits: &layerwise_data::Sets) -> Result<()> {
        let root = self.config.data.root();
        let want = (self.shape.input.channels, self.shape.input.size, self.shape.input.size);
        for (name, set) in [("training", &splits.train), ("test", &splits.test)] {
            if set.is_empty() {
                return Err(Error::Config(format!(
                    "data: {}: no {name} images: expected at least one",
                    root.display()
                )));
            }
            let got = set.image_shape();
            if got != want {
                return Err(Error::Config(format!(
                    "data: {}: {name} images are {}x{}x{}, expected {}x{}x{} (channels x height x width) for {:?}",
                    root.display(),
                    got.0,
                    got.1,
                    got.2,
                    want.0,
                    want.1,
                    want.2,
                    self.config.data.dataset
                )));
            }
            if set.num_classes() != self.shape.num_classes {
                return Err(Error::Config(format!(
                    "data: {}: {name} set has {} classes, expected {}",
                    root.display(),
                    set.num_classes(),
                    self.shape.num_classes
                )));
            }
        }
        Ok(())
    }
}
