//! The sequential trainer learns: on a small separable problem every training mode reaches
//! high accuracy within a few hundred steps, and the training loss falls.

use layerwise_nn::arch::InputShape;
use layerwise_nn::config::{LossKind, ModelConfig, OptimConfig, Training};
use layerwise_nn::rng::{LayerRng, Purpose};
use layerwise_nn::{Architecture, Network};
use tch::{Device, Kind, Tensor};

const CLASSES: i64 = 4;

/// Gaussian blobs that no linear classifier separates: class `c` is a mixture of two blobs
/// centred at `+m_c` and `-m_c` (a fixed random direction), with unit noise. A network
/// whose hidden layers learn nothing stays near chance (25%). Images of `channels` x `size`
/// x `size` so that conv nets see the same problem.
/// Drawn from a generator of its own: libtorch's global one is shared by parallel tests.
fn blobs(n: i64, channels: i64, size: i64, seed: usize) -> (Tensor, Tensor) {
    let dim = channels * size * size;
    let mut rng = LayerRng::new(1234, 0, Purpose::Data);
    let normals = |count: i64, rng: &mut LayerRng| -> Tensor {
        // Box-Muller
        let v: Vec<f32> = (0..count)
            .map(|_| {
                let (u1, u2) = (rng.uniform_f32(1e-7, 1.0), rng.uniform_f32(0.0, 1.0));
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_slice(&v)
    };
    let centres = normals(CLASSES * dim, &mut rng).view([CLASSES, dim]) * 2.5 / (dim as f64 / 16.0).sqrt();
    let mut rng = LayerRng::new(seed as u64, 0, Purpose::Data);
    let labels: Vec<i64> = (0..n).map(|_| (rng.next_u32() % CLASSES as u32) as i64).collect();
    let signs: Vec<f32> = (0..n).map(|_| if rng.next_u32().is_multiple_of(2) { 1.0 } else { -1.0 }).collect();
    let labels = Tensor::from_slice(&labels);
    let signs = Tensor::from_slice(&signs).unsqueeze(1);
    let x = centres.index_select(0, &labels) * signs + normals(n * dim, &mut rng).view([n, dim]);
    (x.view([n, channels, size, size]), labels)
}

fn accuracy(net: &mut Network, x: &Tensor, y: &Tensor) -> f64 {
    let pred = net.predict(x).argmax(1, false);
    pred.eq_tensor(y).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

fn train(arch: &str, training: Training, loss: LossKind) -> (f64, f64, f64) {
    tch::set_num_threads(1);
    let (channels, size) = if arch == "mlp" { (1, 4) } else { (3, 8) };
    let model = ModelConfig {
        arch: arch.into(),
        num_layers: if arch == "mlp" { 2 } else { 1 },
        num_hidden: 32,
        feat_mult: 1.0 / 8.0,
        training,
        loss,
        dropout: 0.05,
        dim_in_decoder: 64,
        target_proj_size: 16,
        ..Default::default()
    };
    let optim = OptimConfig { lr: 3e-3, ..Default::default() };
    let arch = Architecture::new(&model, InputShape { channels, size }, CLASSES).unwrap();
    let mut net = Network::new(&model, &optim, arch, 7, Device::Cpu).unwrap();
    let (train_x, train_y) = blobs(4096, channels, size, 1);
    let (test_x, test_y) = blobs(1024, channels, size, 2);
    let batch = 64;
    let mut losses = Vec::new();
    let steps: i64 = if channels == 1 { 300 } else { 600 };
    for step in 0..steps {
        let i = (step * batch) % 4096;
        let (x, y) = (train_x.narrow(0, i, batch), train_y.narrow(0, i, batch));
        let out = net.train_step(&x, &y).unwrap();
        let ce = out.logits.cross_entropy_for_logits(&y).double_value(&[]);
        losses.push(ce);
    }
    let first: f64 = losses[..20].iter().sum::<f64>() / 20.0;
    let last: f64 = losses[losses.len() - 20..].iter().sum::<f64>() / 20.0;
    (accuracy(&mut net, &test_x, &test_y), first, last)
}

fn assert_learns(arch: &str, training: Training, loss: LossKind) {
    let (acc, first, last) = train(arch, training, loss);
    eprintln!("{arch} {training:?} {loss:?}: accuracy {acc:.3}, loss {first:.3} -> {last:.3}");
    assert!(acc >= 0.95, "{arch} {training:?} {loss:?}: test accuracy {acc:.3} below 0.95");
    assert!(last < 0.5 * first, "{arch} {training:?} {loss:?}: loss went from {first:.3} to {last:.3}");
}

macro_rules! learning_tests {
    ($($name:ident: $arch:expr, $training:ident, $loss:ident;)*) => {$(
        #[test]
        fn $name() {
            assert_learns($arch, Training::$training, LossKind::$loss);
        }
    )*};
}

learning_tests! {
    mlp_pred_learns: "mlp", Local, Pred;
    mlp_sim_learns: "mlp", Local, Sim;
    mlp_predsim_learns: "mlp", Local, Predsim;
    mlp_backprop_learns: "mlp", Backprop, Predsim;
    mlp_local_global_learns: "mlp", LocalGlobal, Predsim;
    mlp_bio_learns: "mlp", Bio, Predsim;
    vgg_pred_learns: "vgg6a", Local, Pred;
    vgg_sim_learns: "vgg6a", Local, Sim;
    vgg_predsim_learns: "vgg6a", Local, Predsim;
    vgg_backprop_learns: "vgg6a", Backprop, Predsim;
    vgg_local_global_learns: "vgg6a", LocalGlobal, Predsim;
    vgg_bio_learns: "vgg6a", Bio, Predsim;
}
