//! layerwise computes what PyTorch computes: similarity matrices, every block's forward,
//! local losses and gradients in every mode, optimizer steps, and whole training steps of
//! small networks. Golden values come from `scripts/golden.py` (PyTorch 2.11, CPU, one
//! thread); each test states its tolerance.

use layerwise_nn::arch::{InputShape, LayerSpec, Pool, PoolKind};
use layerwise_nn::block::HiddenBlock;
use layerwise_nn::config::{ModelConfig, OptimConfig, OptimKind};
use layerwise_nn::{similarity_matrix, Architecture, Network, Optimizer, Targets};
use layerwise_tests::{assert_bit_identical, assert_close, Golden};
use tch::{Device, Tensor};

/// Forward values and similarity matrices: same ops as PyTorch, float32.
const RTOL_FORWARD: f64 = 1e-5;
/// Gradients go through longer reductions (batch norm, similarity): float32 rounding of
/// differently ordered sums.
const RTOL_GRAD: f64 = 1e-4;
const FLOOR: f64 = 1e-6;

fn one_thread() {
    tch::set_num_threads(1);
}

fn model_config(g: &Golden) -> ModelConfig {
    fn parse<T: serde::de::DeserializeOwned>(g: &Golden, key: &str) -> T {
        serde_json::from_value(g.config[key].clone()).unwrap_or_else(|e| panic!("{key}: {e}"))
    }
    ModelConfig {
        nonlin: parse(g, "nonlin"),
        batch_norm: g.bool("batch_norm"),
        training: parse(g, "training"),
        loss: parse(g, "loss"),
        beta: g.f64("beta"),
        dim_in_decoder: g.i64("dim_in_decoder") as usize,
        similarity_std: g.bool("similarity_std"),
        target_proj_size: g.i64("target_proj_size") as usize,
        dropout: g.f64("dropout"),
        bf16: g.config.get("bf16").and_then(|v| v.as_bool()).unwrap_or(false),
        ..Default::default()
    }
}

/// A 3x3 conv block keeping its size, max-pooled 2x2 after (what the golden script builds).
fn conv3x3(in_channels: i64, out_channels: i64, size: i64) -> LayerSpec {
    let pool_after = Some(Pool { kind: PoolKind::Max, kernel: 2, stride: 2, padding: 0 });
    LayerSpec::Conv {
        in_channels,
        out_channels,
        kernel: 3,
        stride: 1,
        padding: 1,
        size_in: size,
        size_out: size,
        pool_after,
    }
}

#[test]
fn similarity_matrices_match_pytorch() {
    one_thread();
    let g = Golden::load("similarity");
    for (input, key, use_std) in [
        ("conv_std", "conv_std.S", true),
        ("conv_std", "conv_std.S_nostd", false),
        ("conv_three_channels", "conv_three_channels.S", true),
        ("linear", "linear.S", true),
    ] {
        assert_close(key, &similarity_matrix(g.get(input), use_std), g.get(key), RTOL_FORWARD, FLOOR);
    }
}

fn check_block(case: &str) {
    one_thread();
    let g = Golden::load(case);
    let model = model_config(&g);
    let (cin, cout, size, classes) = (g.i64("cin"), g.i64("cout"), g.i64("size"), g.i64("classes"));
    let spec = match g.str("kind") {
        "conv" => conv3x3(cin, cout, size),
        _ => LayerSpec::Linear { in_features: cin, out_features: cout },
    };
    let mut block = HiddenBlock::new(0, &spec, classes, &model, &OptimConfig::default(), 0, Device::Cpu).unwrap();
    block.load(&g.with_prefix("init.")).unwrap();

    let projection = g.has("projection").then(|| g.get("projection").shallow_clone());
    let targets = Targets::new(g.get("y"), classes, projection.as_ref());
    assert_close("sim target", &targets.sim, g.get("targets.sim"), RTOL_FORWARD, FLOOR);
    if let Some(bce) = &targets.bce {
        assert_bit_identical("bce target", bce, g.get("targets.bce"));
    }

    let fwd = block.forward_with_noise(g.get("x"), true, Some(g.get("noise")));
    assert_close("h", &fwd.h, g.get("h"), RTOL_FORWARD, FLOOR);
    assert_close("out", &fwd.out, g.get("out"), RTOL_FORWARD, FLOOR);
    let losses = block.local_losses(&fwd.h, &targets).unwrap();
    assert_close("total loss", &losses.total, g.get("loss.total"), RTOL_FORWARD, FLOOR);
    assert_eq!(losses.pred.is_some(), g.has("loss.pred"), "pred loss present");
    assert_eq!(losses.sim.is_some(), g.has("loss.sim"), "sim loss present");
    if let Some(pred) = &losses.pred {
        assert_close("pred loss", pred, g.get("loss.pred"), RTOL_FORWARD, FLOOR);
        assert_close("local logits", losses.logits.as_ref().unwrap(), g.get("logits"), RTOL_FORWARD, FLOOR);
    }
    if let Some(sim) = &losses.sim {
        assert_close("sim loss", sim, g.get("loss.sim"), RTOL_FORWARD, FLOOR);
    }

    let params = block.parameters();
    let expected_grads = g.with_prefix("grad.");
    assert_eq!(
        params.len(),
        expected_grads.len(),
        "{case}: trainable tensors {:?}",
        params.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let grads = Tensor::run_backward(&[&losses.total], &tensors, false, false);
    for ((name, _), grad) in params.iter().zip(&grads) {
        assert_close(&format!("{case}: grad of {name}"), grad, g.get(&format!("grad.{name}")), RTOL_GRAD, 1e-5);
    }
    // Every buffer PyTorch recorded is compared: a tensor renamed on either side fails here
    // instead of dropping out of the comparison.
    let recorded = g.with_prefix("after.");
    let buffers = block.buffers();
    for (name, expected) in &recorded {
        let (_, t) = buffers.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{case}: no buffer {name}"));
        assert_close(&format!("{case}: {name} after forward"), t, expected, RTOL_FORWARD, FLOOR);
    }
    let batch_norm = buffers.iter().filter(|(n, _)| n.starts_with("bn.running_")).count();
    assert_eq!(
        recorded.len(),
        batch_norm,
        "{case}: PyTorch recorded {} buffers, the block has {batch_norm} running statistics",
        recorded.len()
    );
}

macro_rules! block_goldens {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            check_block(stringify!($name));
        }
    )*};
}

block_goldens!(
    block_linear_pred,
    block_linear_sim,
    block_linear_predsim,
    block_linear_bio_pred,
    block_linear_bio_sim,
    block_linear_bio_predsim,
    block_linear_leaky_nobn_nostd,
    block_conv_pred,
    block_conv_sim,
    block_conv_predsim,
    block_conv_bio_pred,
    block_conv_bio_sim,
    block_conv_bio_predsim,
    block_conv_leaky_nobn_nostd,
    // model.bf16: PyTorch casts each product's operands to bfloat16 and its result back.
    block_linear_bf16_predsim,
    block_conv_bf16_predsim,
);

/// Five steps of each optimizer equal `torch.optim`'s to the last bit.
fn check_optimizer(case: &str) {
    one_thread();
    let g = Golden::load(case);
    let kind: OptimKind = serde_json::from_value(g.config["kind"].clone()).unwrap();
    let config = OptimConfig {
        kind,
        lr: g.f64("lr"),
        weight_decay: g.f64("weight_decay"),
        momentum: g.config["momentum"].as_f64().unwrap_or(0.0),
        nesterov: g.config["nesterov"].as_bool().unwrap_or(false),
        fused: g.config["fused"].as_bool().unwrap_or(false),
        ..Default::default()
    };
    let param = g.get("init").copy().set_requires_grad(true);
    let mut opt = Optimizer::new(&config, vec![("p".into(), param.shallow_clone())]);
    for i in 0..5 {
        opt.step(&[g.get(&format!("grad.{i}")).shallow_clone()]).unwrap();
        assert_bit_identical(
            &format!("{case}: parameter after step {}", i + 1),
            &param.detach(),
            g.get(&format!("after.{i}")),
        );
    }
    // Every state tensor PyTorch recorded is compared, by name.
    let recorded = g.with_prefix("state.");
    assert!(!recorded.is_empty() || kind == OptimKind::Sgd, "{case}: no optimizer state recorded");
    let state = opt.state();
    for (key, expected) in &recorded {
        let name = format!("p.{key}");
        let (_, t) = state.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{case}: no state {name}"));
        assert_bit_identical(&format!("{case}: state {key}"), t, expected);
    }
}

#[test]
fn adam_with_weight_decay_is_bit_identical_to_torch_optim() {
    check_optimizer("optim_adam");
}

#[test]
fn amsgrad_is_bit_identical_to_torch_optim() {
    check_optimizer("optim_amsgrad");
}

#[test]
fn fused_adam_with_weight_decay_is_bit_identical_to_torch_optims_fused_kernel() {
    check_optimizer("optim_adam_fused");
}

#[test]
fn fused_amsgrad_is_bit_identical_to_torch_optims_fused_kernel() {
    check_optimizer("optim_amsgrad_fused");
}

#[test]
fn sgd_with_momentum_and_weight_decay_is_bit_identical_to_torch_optim() {
    check_optimizer("optim_sgd_momentum");
}

#[test]
fn sgd_nesterov_is_bit_identical_to_torch_optim() {
    check_optimizer("optim_sgd_nesterov");
}

#[test]
fn plain_sgd_is_bit_identical_to_torch_optim() {
    check_optimizer("optim_sgd_plain");
}

/// Whole training steps (forward, every loss, backward, one Adam per layer) of small
/// networks in each training mode.
fn check_network(case: &str) {
    one_thread();
    let g = Golden::load(case);
    let model = model_config(&g);
    let classes = g.i64("classes");
    let (input, hidden) = match g.str("arch") {
        "mlp" => (
            InputShape { channels: 12, size: 1 },
            vec![
                LayerSpec::Linear { in_features: 12, out_features: 16 },
                LayerSpec::Linear { in_features: 16, out_features: 16 },
            ],
        ),
        _ => {
            let conv = conv3x3;
            (
                InputShape { channels: 3, size: 8 },
                vec![conv(3, 4, 8), conv(4, 6, 4), LayerSpec::Linear { in_features: 24, out_features: 16 }],
            )
        }
    };
    let arch = Architecture { input, hidden, output_in: 16, num_classes: classes };
    let optim = OptimConfig { lr: g.f64("lr"), ..Default::default() };
    let mut net = Network::new(&model, &optim, arch, 0, Device::Cpu).unwrap();
    net.load(&g.with_prefix("init.")).unwrap();
    if g.has("projection") {
        net.label_projection = Some(g.get("projection").shallow_clone());
    }
    for step in 0..g.i64("steps") {
        let out = net.train_step(g.get(&format!("x.{step}")), g.get(&format!("y.{step}"))).unwrap();
        assert_close(
            &format!("{case}: logits of step {step}"),
            &out.logits,
            g.get(&format!("logits.{step}")),
            RTOL_GRAD,
            1e-5,
        );
    }
    let state = net.state();
    let mut compared = 0;
    for (name, expected) in g.with_prefix("final.") {
        let (_, actual) = state.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{case}: no tensor {name}"));
        // Adam normalises the step, so parameters agree far better than raw gradients. Each
        // step moves a weight by about `lr`, so a weight that two steps brought near zero
        // keeps the float32 rounding of weights of size `lr`: the floor is `lr / 100`.
        assert_close(&format!("{case}: {name} after training"), actual, &expected, RTOL_GRAD, g.f64("lr") / 100.0);
        compared += 1;
    }
    assert!(compared >= 8, "{case}: compared only {compared} tensors");
}

#[test]
fn mlp_local_training_steps_match_pytorch() {
    check_network("network_mlp_local");
}

#[test]
fn mlp_backprop_training_steps_match_pytorch() {
    check_network("network_mlp_backprop");
}

#[test]
fn mlp_local_global_training_steps_match_pytorch() {
    check_network("network_mlp_local_global");
}

#[test]
fn mlp_bio_training_steps_match_pytorch() {
    check_network("network_mlp_bio");
}

#[test]
fn mlp_sim_only_leaky_training_steps_match_pytorch() {
    check_network("network_mlp_local_sim_leaky");
}

#[test]
fn conv_local_training_steps_match_pytorch() {
    check_network("network_conv_local");
}

#[test]
fn conv_local_global_training_steps_match_pytorch() {
    check_network("network_conv_local_global");
}

#[test]
fn mlp_local_training_steps_with_bf16_products_match_pytorch() {
    check_network("network_mlp_local_bf16");
}

#[test]
fn conv_local_training_steps_with_bf16_products_match_pytorch() {
    check_network("network_conv_local_bf16");
}

#[test]
fn conv_bio_training_steps_match_pytorch() {
    check_network("network_conv_bio");
}
