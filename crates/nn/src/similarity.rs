//! The similarity matrix of a batch, the quantity the sim loss matches.

use tch::{Kind, Tensor};

/// `S(x)`, a B x B matrix of cosine similarities between the centred rows of `x`.
///
/// A 4-D `x` with more than 3 channels and spatial size above 1 is first reduced to each
/// channel's standard deviation over space (unbiased), unless `use_std` is false; otherwise
/// `x` is flattened. Rows are centred, normalised by `1e-8 + ||row||`, multiplied and clamped
/// to [-1, 1]. The op sequence is PyTorch's reference one, so results agree to the last bit
/// where the kernels do.
pub fn similarity_matrix(x: &Tensor, use_std: bool) -> Tensor {
    let b = x.size()[0];
    let x = if x.dim() == 4 && use_std && x.size()[1] > 3 && x.size()[2] > 1 {
        let s = x.size();
        x.view([s[0], s[1], -1]).std_dim(2, true, false)
    } else {
        x.view([b, -1])
    };
    let xc = &x - x.mean_dim(1, false, None::<Kind>).unsqueeze(1);
    let norm = xc.pow_tensor_scalar(2).sum_dim_intlist(1, false, None::<Kind>).sqrt() + 1e-8;
    let xn = &xc / norm.unsqueeze(1);
    xn.matmul(&xn.transpose(1, 0)).clamp(-1.0, 1.0)
}
