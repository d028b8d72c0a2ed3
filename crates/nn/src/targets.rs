//! What the local losses compare against, computed once per batch and shared by all layers.

use tch::{Kind, Tensor};

use crate::similarity::similarity_matrix;

#[derive(Debug)]
pub struct Targets {
    /// Class indices, int64, B.
    pub labels: Tensor,
    /// The sim loss's target: `S(Y)`, or `S(P Y)` in bio mode. B x B, no gradient.
    pub sim: Tensor,
    /// Bio mode's pred target: `(P Y > 0)` as 0/1 floats, B x `target_proj_size`.
    pub bce: Option<Tensor>,
}

impl Targets {
    /// `projection` is bio mode's fixed `P` (`target_proj_size` x C, applied as a linear map).
    pub fn new(labels: &Tensor, num_classes: i64, projection: Option<&Tensor>) -> Self {
        let onehot = labels.onehot(num_classes).to_kind(Kind::Float);
        let _guard = tch::no_grad_guard();
        match projection {
            None => Targets { labels: labels.shallow_clone(), sim: similarity_matrix(&onehot, true), bce: None },
            Some(p) => {
                let projected = onehot.linear(p, None::<Tensor>);
                Targets {
                    labels: labels.shallow_clone(),
                    sim: similarity_matrix(&projected, true),
                    bce: Some(projected.gt(0.0).to_kind(Kind::Float)),
                }
            }
        }
    }

    pub fn to_device(&self, device: tch::Device) -> Self {
        Targets {
            labels: self.labels.to_device(device),
            sim: self.sim.to_device(device),
            bce: self.bce.as_ref().map(|t| t.to_device(device)),
        }
    }
}
