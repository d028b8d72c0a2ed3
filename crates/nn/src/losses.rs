//! The local losses: similarity matching and the local classifier.

use tch::{Reduction, Tensor};

use crate::similarity::similarity_matrix;

/// `mse(S(x), target)`, mean over the B x B entries.
pub fn sim_loss(x: &Tensor, target: &Tensor, use_std: bool) -> Tensor {
    similarity_matrix(x, use_std).mse_loss(target, Reduction::Mean)
}

/// Cross-entropy of the local classifier's logits against the labels.
pub fn pred_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.cross_entropy_loss(labels, None::<Tensor>, Reduction::Mean, -100, 0.0)
}

/// Bio mode's pred loss: binary cross-entropy on logits against the binarised projection.
pub fn pred_loss_bce(logits: &Tensor, target: &Tensor) -> Tensor {
    logits.binary_cross_entropy_with_logits(target, None::<Tensor>, None::<Tensor>, Reduction::Mean)
}

/// A linear map whose backward sends the error through a fixed `feedback` matrix instead of
/// `weight^T` (feedback alignment). The forward value is exactly `x W^T + b`: the feedback
/// term is added and subtracted, which is zero in floating point for finite values.
pub fn feedback_alignment_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, feedback: &Tensor) -> Tensor {
    let through_w = x.detach().linear(weight, bias);
    let through_b = x.linear(feedback, None::<Tensor>);
    through_w + (&through_b - through_b.detach())
}
