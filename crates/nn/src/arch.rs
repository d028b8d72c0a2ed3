//! Architectures of the paper as a list of layer shapes: `mlp` and the VGG layer strings.
//!
//! An [`Architecture`] is computed from a [`ModelConfig`] and the input shape before any
//! tensor exists, so that a config can be validated, a placement balanced, and parameter
//! counts printed without building the model.

use crate::config::ModelConfig;
use crate::{NnError, Result};

/// A parameter-free pooling applied to a block's output before it is sent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub kind: PoolKind,
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
}

impl Pool {
    /// The reference's tokens: `M`/`A` (2, stride 2), `M3`/`A3` (3, stride 2, pad 1),
    /// `M4`/`A4` (4, stride 4).
    fn parse(token: &str) -> Option<Pool> {
        let kind = match token.chars().next()? {
            'M' => PoolKind::Max,
            'A' => PoolKind::Avg,
            _ => return None,
        };
        let (kernel, stride, padding) = match &token[1..] {
            "" => (2, 2, 0),
            "3" => (3, 2, 1),
            "4" => (4, 4, 0),
            _ => return None,
        };
        Some(Pool { kind, kernel, stride, padding })
    }

    pub fn output_size(&self, d: i64) -> i64 {
        (d + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// The shape of one trained layer.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSpec {
    Conv {
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
        /// Input height = width.
        size_in: i64,
        /// Output height = width of the block (before `pool_after`).
        size_out: i64,
        pool_after: Option<Pool>,
    },
    Linear {
        in_features: i64,
        out_features: i64,
    },
}

impl LayerSpec {
    /// Trained parameters of the block itself (encoder and batch norm), as PyTorch counts
    /// `model.parameters()` in backprop mode; heads not included.
    pub fn block_parameters(&self, batch_norm: bool) -> i64 {
        let (weights, out) = match *self {
            LayerSpec::Conv { in_channels, out_channels, kernel, .. } => {
                (in_channels * out_channels * kernel * kernel, out_channels)
            }
            LayerSpec::Linear { in_features, out_features } => (in_features * out_features, out_features),
        };
        weights + out + if batch_norm { 2 * out } else { 0 }
    }

    /// Elements of the activation this block sends on, per example.
    pub fn output_numel(&self) -> i64 {
        match *self {
            LayerSpec::Conv { out_channels, size_out, pool_after, .. } => {
                let d = pool_after.map_or(size_out, |p| p.output_size(size_out));
                out_channels * d * d
            }
            LayerSpec::Linear { out_features, .. } => out_features,
        }
    }

    /// Multiply-adds of the block's forward pass, per example (for balancing placements).
    pub fn forward_macs(&self) -> i64 {
        match *self {
            LayerSpec::Conv { in_channels, out_channels, kernel, size_out, .. } => {
                in_channels * out_channels * kernel * kernel * size_out * size_out
            }
            LayerSpec::Linear { in_features, out_features } => in_features * out_features,
        }
    }
}

/// Input images: channels x size x size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputShape {
    pub channels: i64,
    pub size: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub input: InputShape,
    pub hidden: Vec<LayerSpec>,
    /// Inputs of the output layer.
    pub output_in: i64,
    pub num_classes: i64,
}

fn vgg_layers(name: &str) -> Option<&'static str> {
    Some(match name {
        "vgg6a" => "128 M 256 M 512 M 512",
        "vgg6b" => "128 M 256 M 512 M 512 M",
        "vgg8" => "64 M 128 M 256 M 512 M 512 M",
        "vgg8a" => "128 256 M 256 512 M 512 M 512",
        "vgg8b" => "128 256 M 256 512 M 512 M 512 M",
        "vgg11" => "64 M 128 M 256 256 M 512 512 M 512 512 M",
        "vgg11b" => "128 128 128 256 M 256 512 M 512 512 M 512 M",
        "vgg13" => "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
        "vgg16" => "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
        "vgg19" => "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
        _ => return None,
    })
}

/// Names accepted for `model.arch`.
pub const ARCH_NAMES: &[&str] =
    &["mlp", "vgg6a", "vgg6b", "vgg8", "vgg8a", "vgg8b", "vgg11", "vgg11b", "vgg13", "vgg16", "vgg19"];

impl Architecture {
    pub fn new(model: &ModelConfig, input: InputShape, num_classes: i64) -> Result<Self> {
        if input.channels < 1 || input.size < 1 || num_classes < 2 {
            return Err(NnError::Model(format!(
                "input {}x{}x{} with {num_classes} classes: expected at least 1 channel, 1 pixel and 2 classes",
                input.channels, input.size, input.size
            )));
        }
        let num_hidden = model.num_hidden as i64;
        if num_hidden < 1 {
            return Err(NnError::Model("model.num_hidden: expected at least 1".into()));
        }
        let mut hidden = Vec::new();
        let mut features = input.channels * input.size * input.size;
        if model.arch == "mlp" {
            if model.num_layers == 0 {
                return Err(NnError::Model("model.num_layers: an mlp needs at least 1 hidden layer".into()));
            }
        } else {
            let layers = vgg_layers(&model.arch).ok_or_else(|| {
                NnError::Model(format!(
                    "model.arch: unknown architecture {:?}, expected one of {}",
                    model.arch,
                    ARCH_NAMES.join(", ")
                ))
            })?;
            if model.feat_mult.is_nan() || model.feat_mult <= 0.0 {
                return Err(NnError::Model(format!(
                    "model.feat_mult: expected a positive number, got {}",
                    model.feat_mult
                )));
            }
            let (mut channels, mut size) = (input.channels, input.size);
            for token in layers.split_whitespace() {
                if let Some(pool) = Pool::parse(token) {
                    let Some(LayerSpec::Conv { pool_after, size_out, .. }) = hidden.last_mut() else {
                        return Err(NnError::Model(format!("{}: pooling before any conv layer", model.arch)));
                    };
                    *pool_after = Some(pool);
                    size = pool.output_size(*size_out);
                    if size < 1 {
                        return Err(NnError::Model(format!(
                            "{}: input of {} px is too small, pooling leaves nothing",
                            model.arch, input.size
                        )));
                    }
                    continue;
                }
                let base: i64 = token.parse().expect("layer strings are ours");
                let out_channels = ((base as f64) * model.feat_mult) as i64;
                let (kernel, stride, padding) =
                    if hidden.is_empty() && input.size > 64 { (7, 2, 3) } else { (3, 1, 1) };
                let size_out = (size + 2 * padding - kernel) / stride + 1;
                hidden.push(LayerSpec::Conv {
                    in_channels: channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    size_in: size,
                    size_out,
                    pool_after: None,
                });
                channels = out_channels;
                size = size_out;
            }
            features = channels * size * size;
        }
        for _ in 0..model.num_layers {
            hidden.push(LayerSpec::Linear { in_features: features, out_features: num_hidden });
            features = num_hidden;
        }
        Ok(Self { input, hidden, output_in: features, num_classes })
    }

    /// Parameters of the network as the reference prints them in backprop mode.
    pub fn parameter_count(&self, batch_norm: bool) -> i64 {
        let blocks: i64 = self.hidden.iter().map(|l| l.block_parameters(batch_norm)).sum();
        blocks + self.output_in * self.num_classes + self.num_classes
    }

    /// Floating-point operations of one training step, per image, by a rough count: the
    /// matrix products and convolutions of the blocks and the output layer and, when layers
    /// learn locally, of their heads and similarity matrices (`batch` images each), two per
    /// multiply-add. Each product runs forward and backward to its weights, and backward to
    /// its input only where a gradient goes on from there: into a head's block, or across
    /// layers in the global modes, never into the image or into a detached input.
    /// A similarity matrix runs forward and back to its features. Pools, norms and
    /// elementwise work are left out: they are a small share of the time.
    pub fn training_flops_per_image(&self, model: &ModelConfig, batch: i64) -> f64 {
        use crate::config::{LossKind, Training};
        let local = model.training != Training::Backprop;
        let global = model.training.is_global();
        let sim = local && matches!(model.loss, LossKind::Sim | LossKind::Predsim);
        let pred = local && matches!(model.loss, LossKind::Pred | LossKind::Predsim);
        let bio = model.training == Training::Bio;
        let pred_outputs = if bio { model.target_proj_size as i64 } else { self.num_classes };
        let (on, on_and_back) = (2.0, 3.0);
        let crossing = if global { on_and_back } else { on };
        let mut products = crossing * (self.output_in * self.num_classes) as f64;
        for (i, spec) in self.hidden.iter().enumerate() {
            let (block, channels, pixels, decoder_in) = match *spec {
                LayerSpec::Conv { in_channels, out_channels, kernel, size_out, .. } => {
                    let pixels = size_out * size_out;
                    let (_, _, n) = decoder_pool(out_channels, size_out, model.dim_in_decoder as i64);
                    (in_channels * out_channels * kernel * kernel * pixels, out_channels, pixels, n)
                }
                LayerSpec::Linear { in_features, out_features } => {
                    (in_features * out_features, out_features, 1, out_features)
                }
            };
            products += if i == 0 { on } else { crossing } * block as f64;
            if sim {
                // The sim transform (a 3x3 convolution or a square matrix; none in bio mode,
                // which compares the pooled features), then the batch's similarity matrix.
                let kernel = if matches!(spec, LayerSpec::Conv { .. }) { 9 } else { 1 };
                let features = if bio { decoder_in } else { channels * pixels };
                if !bio {
                    products += on_and_back * (channels * channels * kernel * pixels) as f64;
                }
                products += on * (batch * features) as f64;
            }
            if pred {
                products += on_and_back * (decoder_in * pred_outputs) as f64;
            }
        }
        2.0 * products
    }
}

/// The reference's average-pool sizing for a conv block's pred decoder: for a block of
/// `channels` x `d` x `d`, the smallest power-of-two pooling that brings the flattened size
/// to at most `dim_in_decoder`. Returns `(kernel, padding, decoder inputs)`, kernel (1, 1)
/// meaning no pooling.
pub fn decoder_pool(channels: i64, d: i64, dim_in_decoder: i64) -> ((i64, i64), (i64, i64), i64) {
    let (mut kh, mut kw, mut dh, mut dw) = (1i64, 1i64, d, d);
    let ceil_div = |a: i64, b: i64| (a + b - 1) / b;
    let mut n = channels * dh * dw;
    while n > dim_in_decoder && kh < d {
        kh *= 2;
        dh = ceil_div(d, kh);
        n = channels * dh * dw;
        if n > dim_in_decoder {
            kw *= 2;
            dw = ceil_div(d, kw);
            n = channels * dh * dw;
        }
    }
    let pad = ((kh * (dh - d / kh)) / 2, (kw * (dw - d / kw)) / 2);
    ((kh, kw), pad, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(name: &str, ch: i64, size: i64) -> Architecture {
        let m = ModelConfig { arch: name.into(), num_layers: if name == "mlp" { 3 } else { 1 }, ..Default::default() };
        Architecture::new(&m, InputShape { channels: ch, size }, 10).unwrap()
    }

    #[test]
    fn training_flops_count_blocks_heads_and_similarity() {
        use crate::config::{LossKind, Training};
        // mlp 3x1024 on 28x28: 784x1024 + 2 x 1024x1024 blocks and a 1024x10 output layer.
        // Backprop: each product forward and back to its weights (2), and back to its input
        // but for the first block's (the image).
        let a = arch("mlp", 1, 28);
        let (first, rest, output) = (784.0 * 1024.0, 2.0 * 1024.0 * 1024.0, 1024.0 * 10.0);
        let mut m =
            ModelConfig { arch: "mlp".into(), num_layers: 3, training: Training::Backprop, ..Default::default() };
        assert_eq!(a.training_flops_per_image(&m, 128), 2.0 * (2.0 * first + 3.0 * (rest + output)));
        // predsim: every block's input is detached (2 each); per layer a 1024x1024 sim
        // transform and a 1024x10 classifier, each also back into the block (3), and a
        // 128-image similarity row of 1024 features, forward and back (2).
        (m.training, m.loss) = (Training::Local, LossKind::Predsim);
        let heads = 3.0 * (3.0 * (1024.0 * 1024.0 + 1024.0 * 10.0) + 2.0 * 128.0 * 1024.0);
        assert_eq!(a.training_flops_per_image(&m, 128), 2.0 * (2.0 * (first + rest + output) + heads));
        // local+global: the heads of predsim, the blocks of backprop.
        m.training = Training::LocalGlobal;
        assert_eq!(a.training_flops_per_image(&m, 128), 2.0 * (2.0 * first + 3.0 * (rest + output) + heads));
        // vgg6a on 3x32x32: convolutions 3->128 at 32x32, 128->256 at 16x16, 256->512 at
        // 8x8, 512->512 at 4x4, all 3x3; then one linear block 512x4x4 -> 1024 and the
        // output layer 1024 -> 10.
        let v = arch("vgg6a", 3, 32);
        assert_eq!(v.output_in, 1024);
        let convs = [(3.0, 128.0, 1024.0), (128.0, 256.0, 256.0), (256.0, 512.0, 64.0), (512.0, 512.0, 16.0)];
        let blocks: Vec<f64> =
            convs.iter().map(|(i, o, p)| i * o * 9.0 * p).chain([8192.0 * 1024.0, 10240.0]).collect();
        let c = ModelConfig { arch: "vgg6a".into(), training: Training::Backprop, ..Default::default() };
        let backprop = 2.0 * blocks[0] + 3.0 * blocks[1..].iter().sum::<f64>();
        assert_eq!(v.training_flops_per_image(&c, 64), 2.0 * backprop);
        // sim: a 3x3 convolution of the block's channels onto themselves (3), then a row of
        // the 64-image similarity matrix over every feature (2).
        let c = ModelConfig { training: Training::Local, loss: LossKind::Sim, ..c };
        let heads: f64 = convs.iter().map(|(_, o, p)| 3.0 * o * o * 9.0 * p + 2.0 * 64.0 * o * p).sum::<f64>()
            + 3.0 * 1024.0 * 1024.0
            + 2.0 * 64.0 * 1024.0;
        assert_eq!(v.training_flops_per_image(&c, 64), 2.0 * (2.0 * blocks.iter().sum::<f64>() + heads));
    }

    #[test]
    fn parameter_counts_match_the_reference() {
        assert_eq!(arch("mlp", 1, 28).parameter_count(true), 2_919_434);
        assert_eq!(arch("vgg8b", 1, 28).parameter_count(true), 7_328_266);
        let cifar = arch("vgg8b", 3, 32).parameter_count(true);
        assert!((8_800_000..9_000_000).contains(&cifar), "vgg8b on CIFAR: {cifar}");
    }

    #[test]
    fn decoder_pools_of_vgg8b_on_28px_match_the_worked_example() {
        let cases = [
            ((128, 28), ((8, 8), (4, 4))),
            ((256, 28), ((16, 8), (8, 4))),
            ((256, 14), ((8, 4), (4, 2))),
            ((512, 14), ((8, 8), (4, 4))),
            ((512, 7), ((4, 4), (2, 2))),
            ((512, 3), ((2, 2), (1, 1))),
        ];
        for ((c, d), (kernel, pad)) in cases {
            let (k, p, n) = decoder_pool(c, d, 2048);
            assert_eq!((k, p), (kernel, pad), "conv {c} @{d}");
            assert_eq!(n, 2048, "conv {c} @{d}");
        }
    }

    #[test]
    fn every_vgg_name_builds_and_wide_inputs_get_a_strided_first_layer() {
        for name in ARCH_NAMES {
            let a = arch(name, 3, 96);
            assert!(!a.hidden.is_empty());
            if *name != "mlp" {
                assert!(matches!(a.hidden[0], LayerSpec::Conv { kernel: 7, stride: 2, size_out: 48, .. }), "{name}");
            }
        }
        assert!(matches!(arch("vgg8b", 3, 32).hidden[0], LayerSpec::Conv { kernel: 3, stride: 1, size_out: 32, .. }));
    }

    #[test]
    fn unknown_architecture_is_named_in_the_error() {
        let m = ModelConfig { arch: "vgg7".into(), ..Default::default() };
        let e = Architecture::new(&m, InputShape { channels: 1, size: 28 }, 10).unwrap_err().to_string();
        assert!(e.contains("model.arch") && e.contains("vgg7"), "{e}");
    }
}
