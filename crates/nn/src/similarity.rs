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
        x.reshape([s[0], s[1], -1]).std_dim(2, true, false)
    } else {
        x.reshape([b, -1])
    };
    let xc = &x - x.mean_dim(1, false, None::<Kind>).unsqueeze(1);
    let norm = xc.pow_tensor_scalar(2).sum_dim_intlist(1, false, None::<Kind>).sqrt() + 1e-8;
    let xn = &xc / norm.unsqueeze(1);
    xn.matmul(&xn.transpose(1, 0)).clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The similarity matrix computed independently in float64 with plain loops.
    fn reference(x: &[f64], b: usize, c: usize, hw: usize, use_std: bool) -> Vec<f64> {
        let rows: Vec<Vec<f64>> = (0..b)
            .map(|i| {
                let sample = &x[i * c * hw..(i + 1) * c * hw];
                if use_std && hw > 1 && c > 3 {
                    (0..c)
                        .map(|ch| {
                            let v = &sample[ch * hw..(ch + 1) * hw];
                            let mean = v.iter().sum::<f64>() / hw as f64;
                            (v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (hw as f64 - 1.0)).sqrt()
                        })
                        .collect()
                } else {
                    sample.to_vec()
                }
            })
            .map(|row| {
                let mean = row.iter().sum::<f64>() / row.len() as f64;
                let centred: Vec<f64> = row.iter().map(|a| a - mean).collect();
                let norm = 1e-8 + centred.iter().map(|a| a * a).sum::<f64>().sqrt();
                centred.iter().map(|a| a / norm).collect()
            })
            .collect();
        let mut s = vec![0.0; b * b];
        for i in 0..b {
            for j in 0..b {
                let dot: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
                s[i * b + j] = dot.clamp(-1.0, 1.0);
            }
        }
        s
    }

    fn check(shape: &[i64], use_std: bool) {
        let n: i64 = shape.iter().product();
        // deterministic values with structure: sines of the index, different per sample
        let x: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37).sin() * (1.0 + (i % 7) as f64)).collect();
        let (b, c) = (shape[0] as usize, shape[1] as usize);
        let hw = (n as usize) / b / c;
        let expected = reference(&x, b, c, hw, use_std && shape.len() == 4);
        let t = Tensor::from_slice(&x).to_kind(Kind::Float).view(shape);
        let got = Vec::<f64>::try_from(similarity_matrix(&t, use_std).to_kind(Kind::Double).view([-1])).unwrap();
        let err = got.iter().zip(&expected).map(|(a, e)| (a - e).abs()).fold(0.0, f64::max);
        assert!(err < 2e-6, "{shape:?} std={use_std}: max abs error {err} against float64");
        assert!((0..b).all(|i| (got[i * b + i] - 1.0).abs() < 1e-5), "unit diagonal");
    }

    #[test]
    fn similarity_matrix_matches_a_float64_recomputation() {
        check(&[6, 8, 5, 5], true); // per-channel std over space
        check(&[6, 8, 5, 5], false); // flattened
        check(&[6, 3, 4, 4], true); // 3 channels: flattened even with std on
        check(&[6, 5, 1, 1], true); // spatial size 1: flattened
        check(&[9, 20], true); // linear activations
    }
}
