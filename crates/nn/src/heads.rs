//! A block's local loss heads: the sim loss's learned transform and the pred loss's
//! decoder (or, backprop-free, its fixed feedback matrix), and the losses they give.

use tch::{Device, Kind, Tensor};

use crate::arch::{decoder_pool, LayerSpec};
use crate::config::{LossKind, ModelConfig, Training};
use crate::init;
use crate::losses::{feedback_alignment_linear, pred_loss, pred_loss_bce, sim_loss};
use crate::precision::product;
use crate::rng::LayerRng;
use crate::targets::Targets;

/// The local heads of a block: the sim loss's learned transform `g` and the pred loss's
/// decoder `W p(h) + b`, with `p` an average pool for conv blocks.
#[derive(Debug)]
pub(crate) struct Heads {
    /// Products in bfloat16 ([`crate::precision`]).
    bf16: bool,
    pub(crate) loss: LossKind,
    pub(crate) beta: f64,
    pub(crate) bio: bool,
    pub(crate) similarity_std: bool,
    /// Conv blocks: 3x3 conv weight C x C x 3 x 3; linear blocks: D x D. None in bio mode.
    pub(crate) sim_transform: Option<Tensor>,
    pub(crate) decoder_weight: Option<Tensor>,
    pub(crate) decoder_bias: Option<Tensor>,
    /// Bio mode: the fixed random matrix that carries the decoder's error back to `h`.
    pub(crate) feedback: Option<Tensor>,
    /// Average-pool kernel and padding of `p` (conv blocks), None for identity.
    pub(crate) pool: Option<((i64, i64), (i64, i64))>,
}

/// The local losses of one step. `total` is what the block's optimizer descends.
#[derive(Debug)]
pub struct LocalLosses {
    pub total: Tensor,
    pub pred: Option<Tensor>,
    pub sim: Option<Tensor>,
    pub logits: Option<Tensor>,
}

impl Heads {
    pub(crate) fn new(
        spec: &LayerSpec,
        num_classes: i64,
        model: &ModelConfig,
        rng: &mut LayerRng,
        device: Device,
    ) -> Self {
        let bio = model.training == Training::Bio;
        let wants_sim = matches!(model.loss, LossKind::Sim | LossKind::Predsim);
        let wants_pred = matches!(model.loss, LossKind::Pred | LossKind::Predsim);
        let (channels, dim_in, pool) = match *spec {
            LayerSpec::Conv { out_channels, size_out, .. } => {
                let (kernel, pad, n) = decoder_pool(out_channels, size_out, model.dim_in_decoder as i64);
                (out_channels, n, (kernel != (1, 1)).then_some((kernel, pad)))
            }
            LayerSpec::Linear { out_features, .. } => (out_features, out_features, None),
        };
        let sim_transform = (wants_sim && !bio).then(|| match spec {
            LayerSpec::Conv { .. } => init::channels_last(init::uniform(
                rng,
                &[channels, channels, 3, 3],
                init::default_bound(channels * 9),
                device,
            )),
            LayerSpec::Linear { .. } => {
                init::uniform(rng, &[channels, channels], init::default_bound(channels), device)
            }
        });
        let outputs = if bio { model.target_proj_size as i64 } else { num_classes };
        let bound = init::default_bound(dim_in);
        let (decoder_weight, decoder_bias, feedback) = if wants_pred {
            let w = init::zeros(&[outputs, dim_in], device);
            let b = init::uniform(rng, &[outputs], bound, device);
            let f = bio.then(|| init::uniform(rng, &[outputs, dim_in], bound, device).set_requires_grad(false));
            (Some(w), Some(b), f)
        } else {
            (None, None, None)
        };
        Heads {
            bf16: model.bf16,
            loss: model.loss,
            beta: model.beta,
            bio,
            similarity_std: model.similarity_std,
            sim_transform,
            decoder_weight,
            decoder_bias,
            feedback,
            pool,
        }
    }

    pub(crate) fn pooled(&self, h: &Tensor) -> Tensor {
        match self.pool {
            Some((kernel, pad)) => {
                h.avg_pool2d([kernel.0, kernel.1], [kernel.0, kernel.1], [pad.0, pad.1], false, true, None)
            }
            None => h.shallow_clone(),
        }
    }

    pub(crate) fn losses(&self, h: &Tensor, targets: &Targets) -> LocalLosses {
        let sim = matches!(self.loss, LossKind::Sim | LossKind::Predsim).then(|| {
            let transformed = match &self.sim_transform {
                Some(w) if h.dim() == 4 => {
                    product(self.bf16, h, w, None, |h, w, _| h.conv2d(w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1))
                }
                Some(w) => product(self.bf16, h, w, None, |h, w, _| h.linear(w, None::<Tensor>)),
                None => self.pooled(h),
            };
            sim_loss(&transformed, &targets.sim, self.similarity_std)
        });
        let (pred, logits) = match (&self.decoder_weight, &self.decoder_bias) {
            (Some(w), b) => {
                let features = self.pooled(h).flatten(1, -1);
                let logits = match &self.feedback {
                    Some(f) => product(self.bf16, &features, w, b.as_ref(), |x, w, b| {
                        let f = if self.bf16 { f.to_kind(Kind::BFloat16) } else { f.shallow_clone() };
                        feedback_alignment_linear(x, w, b, &f)
                    }),
                    None => product(self.bf16, &features, w, b.as_ref(), |x, w, b| x.linear(w, b)),
                };
                let loss = match &targets.bce {
                    Some(t) if self.bio => pred_loss_bce(&logits, t),
                    _ => pred_loss(&logits, &targets.labels),
                };
                (Some(loss), Some(logits))
            }
            _ => (None, None),
        };
        let total = match (self.loss, &pred, &sim) {
            (LossKind::Predsim, Some(p), Some(s)) => p * (1.0 - self.beta) + s * self.beta,
            (_, Some(p), None) => p.shallow_clone(),
            (_, None, Some(s)) => s.shallow_clone(),
            _ => unreachable!("a block with heads has a pred or a sim loss"),
        };
        LocalLosses { total, pred, sim, logits }
    }
}
