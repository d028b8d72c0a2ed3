//! Building a plan's layers: the one place that turns (plan, layer index, device) into a
//! hidden block or the output layer, each from (seed, layer index), so any placement and
//! any process builds the same layer.

use layerwise_nn::{HiddenBlock, Named, OutputLayer};
use layerwise_plan::Plan;
use tch::Device;

/// The layers a stage (or a trial) holds: its hidden blocks in order, then the output
/// layer if it holds it.
#[derive(Default)]
pub(crate) struct Layers {
    pub blocks: Vec<HiddenBlock>,
    pub output: Option<OutputLayer>,
}

impl Layers {
    /// Layers `layers` of `plan`, layer `i` on `device(i)`, each loaded from `state(i)`
    /// where that gives one. An error names the layer.
    pub fn build(
        plan: &Plan,
        layers: impl IntoIterator<Item = (usize, Device)>,
        mut state: impl FnMut(usize) -> Result<Option<Vec<Named>>, String>,
    ) -> Result<Layers, (usize, String)> {
        let mut built = Layers::default();
        for (i, device) in layers {
            let state = state(i).map_err(|e| (i, e))?;
            built.add(plan, i, device, state.as_deref()).map_err(|e| (i, e.to_string()))?;
        }
        Ok(built)
    }

    /// Builds layer `i` of `plan` on `device`, loads `state` into it, and adds it.
    pub fn add(&mut self, plan: &Plan, i: usize, device: Device, state: Option<&[Named]>) -> layerwise_nn::Result<()> {
        let (model, optim, arch, seed) = (&plan.config.model, &plan.config.optim, &plan.arch, plan.config.train.seed);
        match arch.hidden.get(i) {
            Some(spec) => {
                let mut block = HiddenBlock::new(i, spec, arch.num_classes, model, optim, seed, device)?;
                if let Some(s) = state {
                    block.load_state(s)?;
                }
                self.blocks.push(block);
            }
            None => {
                let mut output = OutputLayer::new(i, arch.output_in, arch.num_classes, model, optim, seed, device);
                if let Some(s) = state {
                    output.load_state(s)?;
                }
                self.output = Some(output);
            }
        }
        Ok(())
    }
}
