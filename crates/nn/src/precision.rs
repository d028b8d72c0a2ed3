//! Optional bfloat16 for the products (`model.bf16`): a convolution or matrix product casts
//! its operands to bfloat16 and its result back to float32, as autocast would run it, and
//! everything else stays float32: batch norm, nonlinearities, dropout, similarity matrices,
//! losses, weights and optimizer state. Gradients flow back through the casts into the
//! float32 weights. Off, the products run exactly as before, bit for bit.

use tch::{Kind, Tensor};

/// `product(x, w, b)` in bfloat16 when `bf16`, with its result in float32; as is otherwise.
pub fn product(
    bf16: bool,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    product: impl FnOnce(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
) -> Tensor {
    if !bf16 {
        return product(x, w, b);
    }
    let low = |t: &Tensor| t.to_kind(Kind::BFloat16);
    product(&low(x), &low(w), b.map(low).as_ref()).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use crate::arch::LayerSpec;
    use crate::config::{LossKind, ModelConfig, Nonlin, OptimConfig, Training};
    use crate::rng::{LayerRng, Purpose};
    use crate::{HiddenBlock, Targets};

    use super::*;

    fn block(bf16: bool, batch_norm: bool) -> HiddenBlock {
        let model = ModelConfig {
            bf16,
            batch_norm,
            nonlin: Nonlin::Relu,
            training: Training::Local,
            loss: LossKind::Predsim,
            ..Default::default()
        };
        let spec = LayerSpec::Linear { in_features: 64, out_features: 48 };
        HiddenBlock::new(0, &spec, 10, &model, &OptimConfig::default(), 3, Device::Cpu).unwrap()
    }

    /// Values in [-2, 2) from a generator of their own (libtorch's global one is shared with
    /// the tests running beside these).
    fn uniform(seed: u64, shape: &[i64]) -> Tensor {
        crate::init::uniform(&mut LayerRng::new(seed, 0, Purpose::Init), shape, 2.0, Device::Cpu)
    }

    fn named(b: &HiddenBlock, name: &str) -> Tensor {
        b.parameters().into_iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn a_bf16_product_is_the_product_of_rounded_operands_rounded_once() {
        let x = uniform(5, &[32, 64]);
        let (low, full) = (block(true, false), block(false, false));
        let h = low.forward_with_noise(&x, false, None).h.to_kind(Kind::Double);
        assert_eq!(low.forward_with_noise(&x, false, None).h.kind(), Kind::Float, "the result comes back in float32");
        // Independently, in float64: operands rounded to bfloat16, then the exact product.
        let round = |t: &Tensor| t.to_kind(Kind::BFloat16).to_kind(Kind::Double);
        let (w, b) = (named(&low, "encoder.weight"), named(&low, "encoder.bias"));
        let z = round(&x).matmul(&round(&w).tr()) + round(&b);
        let want = z.relu();
        // Its one or two roundings to bfloat16 (8 significant bits) are all that may differ.
        let slack = (z.abs() + round(&b).abs()) * 2f64.powi(-7) + 1e-6;
        let over = ((&h - &want).abs() - slack).max().double_value(&[]);
        assert!(over <= 0.0, "off the float64 product of rounded operands by {over} past the slack");
        // ... and it is not the float32 product.
        let h32 = full.forward_with_noise(&x, false, None).h.to_kind(Kind::Double);
        let apart = (&h - &h32).abs().max().double_value(&[]);
        assert!(apart > 1e-4, "bf16 and float32 products agree to {apart}");
    }

    #[test]
    fn bf16_training_keeps_losses_weights_and_state_in_float32_and_follows_float32() {
        let x = uniform(6, &[64, 64]);
        let mut draw = LayerRng::new(6, 1, Purpose::Data);
        let labels: Vec<i64> = (0..64).map(|_| (draw.next_u32() % 10) as i64).collect();
        let labels = Tensor::from_slice(&labels);
        let targets = Targets::new(&labels, 10, None);
        let (mut low, mut full) = (block(true, true), block(false, true));
        let before = named(&low, "encoder.weight").copy();
        let (mut first, mut last) = (vec![], vec![]);
        for step in 0..12 {
            let a = low.train_local(&x, &targets).unwrap();
            let b = full.train_local(&x, &targets).unwrap();
            assert_eq!((a.loss.kind(), a.output.kind()), (Kind::Float, Kind::Float));
            let pair = (a.loss.double_value(&[]), b.loss.double_value(&[]));
            if step == 0 {
                first.push(pair);
            }
            last = vec![pair];
        }
        let state = low.optimizer.state();
        let moments = state.iter().filter(|(n, _)| n.contains("exp_avg"));
        assert_eq!(moments.clone().count(), 2 * low.parameters().len());
        for (name, t) in low.parameters().iter().chain(moments) {
            assert_eq!(t.kind(), Kind::Float, "{name}");
        }
        assert!(!named(&low, "encoder.weight").equal(&before), "the float32 weights learned through the casts");
        let ((low0, full0), (low1, full1)) = (first[0], last[0]);
        assert!(low1 < 0.8 * low0 && full1 < 0.8 * full0, "losses {low0} -> {low1} (bf16), {full0} -> {full1}");
        assert!((low1 - full1).abs() <= 0.05 * full1, "bf16 ends at {low1}, float32 at {full1}");
    }
}
