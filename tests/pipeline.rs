//! The pipeline engine: a pipelined run equals the sequential (reference-order) run bit for
//! bit, whatever the placement; the reported test error is what the weights give; and a
//! failing stage stops the whole pipeline promptly, saying where and why.

use layerwise_coordinator::{Error, RunOptions};
use layerwise_nn::arch::InputShape;
use layerwise_nn::{Architecture, Network};
use layerwise_pipeline::fault::{Fault, FaultKind};
use layerwise_pipeline::message::StageFailure;
use layerwise_plan::{PipelineMode, Placement, RunConfig, StageSpec};
use tch::{Device, Kind};

use layerwise_tests::{assert_same_run, data_dir, run_in_temp, small_run_config as config, Ran, WAIT_LIMIT};

fn run(config: &RunConfig) -> Ran {
    run_in_temp(config)
}

fn stages(groups: &[&[usize]]) -> Placement {
    Placement::Stages(groups.iter().map(|g| StageSpec { layers: g.to_vec(), device: "cpu".into() }).collect())
}

fn pipelined_equals_sequential(arch: &str, placements: Vec<Placement>) {
    pipelined_equals_sequential_with(arch, placements, |_| {});
}

/// The same, for a base config changed by `change`; gives the sequential run.
fn pipelined_equals_sequential_with(arch: &str, placements: Vec<Placement>, change: impl Fn(&mut RunConfig)) -> Ran {
    let data = data_dir();
    let mut base = config(data.path(), arch);
    change(&mut base);
    base.pipeline.mode = PipelineMode::Sequential;
    base.pipeline.placement = Placement::Single;
    let reference = run(&base);
    let state = reference.state().unwrap();
    let names: Vec<&String> = state.iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.ends_with("optim.layers") || n.contains(".optim.")), "optimizer state is compared");
    assert!(names.iter().any(|n| n.ends_with("bn.running_var")), "batch-norm buffers are compared");
    assert!(names.iter().any(|n| n.ends_with(".rng")), "generator state is compared");
    for placement in placements {
        for mode in [PipelineMode::Pipelined, PipelineMode::Sequential] {
            let mut c = base.clone();
            c.pipeline.mode = mode;
            c.pipeline.placement = placement.clone();
            let summary = run(&c);
            assert_same_run(&reference, &summary, &format!("{arch} {mode:?} {placement:?}"));
        }
    }
    reference
}

#[test]
fn pipelined_mlp_equals_sequential_bit_for_bit_for_every_placement() {
    let per_layer = Placement::PerLayer;
    pipelined_equals_sequential("mlp", vec![per_layer, stages(&[&[0, 1], &[2, 3]]), Placement::Single]);
}

#[test]
fn with_bf16_products_pipelined_still_equals_sequential_bit_for_bit() {
    let low =
        pipelined_equals_sequential_with("vgg6a", vec![stages(&[&[0, 1, 2], &[3, 4, 5]])], |c| c.model.bf16 = true);
    // The key took effect: float32 on the same data (written alike each time) ends elsewhere.
    let data = data_dir();
    let mut full = config(data.path(), "vgg6a");
    full.pipeline.mode = PipelineMode::Sequential;
    full.pipeline.placement = Placement::Single;
    let full = run(&full).state().unwrap();
    let low = low.state().unwrap();
    let weight = |state: &[(String, tch::Tensor)]| {
        state.iter().find(|(n, _)| n.ends_with("encoder.weight")).map(|(_, t)| t.shallow_clone()).unwrap()
    };
    assert!(!weight(&low).equal(&weight(&full)), "bf16 and float32 runs ended with the same first weights");
}

#[test]
fn pipelined_vgg_equals_sequential_bit_for_bit() {
    // vgg6a: 4 conv blocks, 1 linear block, the output layer
    pipelined_equals_sequential("vgg6a", vec![Placement::PerLayer, stages(&[&[0, 1, 2], &[3, 4, 5]])]);
}

#[test]
fn reported_test_error_equals_an_independent_evaluation_of_the_weights() {
    let data = data_dir();
    let mut c = config(data.path(), "mlp");
    c.pipeline.placement = Placement::PerLayer;
    c.train.steps_per_epoch = None;
    let summary = run(&c);
    let reported = summary.epochs.last().unwrap().test_error;

    let arch = Architecture::new(&c.model, InputShape { channels: 1, size: 28 }, 10).unwrap();
    let mut net = Network::new(&c.model, &c.optim, arch, 99, Device::Cpu).unwrap();
    net.load(&summary.state().unwrap()).unwrap();
    let splits = layerwise_data::load(&c.data).unwrap();
    let x = (splits.test.images.to_kind(Kind::Float) / 255.0 - 0.286) / 0.353;
    let wrong = net.predict(&x).argmax(1, false).ne_tensor(&splits.test.labels).sum(Kind::Int64).int64_value(&[]);
    let independent = 100.0 * wrong as f64 / splits.test.len() as f64;
    assert_eq!(reported, independent);
    assert!(reported < 60.0, "the model learned (chance is 90%): {reported}%");
}

#[test]
fn training_in_backprop_and_local_global_runs_as_one_stage_and_learns() {
    let data = data_dir();
    for training in [layerwise_nn::Training::Backprop, layerwise_nn::Training::LocalGlobal] {
        let mut c = config(data.path(), "mlp");
        c.model.training = training;
        c.pipeline.placement = Placement::PerLayer;
        let s = run(&c);
        assert_eq!(s.plan.len(), 1, "{training:?} runs as one stage");
        assert!(s.epochs.last().unwrap().test_error < 50.0, "{training:?}");
    }
}

/// The failure a run with `kind` injected into `layer` at step 7 stops with. A pipeline
/// that did not stop would never return: that fails here, after the wait limit.
fn failure(kind: FaultKind, layer: usize, mode: PipelineMode) -> (StageFailure, tempfile::TempDir) {
    let data = data_dir();
    let mut c = config(data.path(), "mlp");
    c.pipeline.mode = mode;
    c.pipeline.placement = Placement::PerLayer;
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let run_dir = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let options = RunOptions { fault: Some(Fault { layer, step: 7, kind }), ..Default::default() };
        let _ = tx.send(layerwise_coordinator::run(&c, &run_dir, options).map(|_| ()));
    });
    let result = rx.recv_timeout(WAIT_LIMIT).expect("the run stops");
    match result {
        Err(Error::Stage(f)) => (f, dir),
        other => panic!("expected a stage failure, got {other:?}"),
    }
}

#[test]
fn a_nan_is_reported_at_its_exact_step_when_losses_are_read_back_only_every_5_steps() {
    let data = data_dir();
    let mut c = config(data.path(), "mlp");
    c.pipeline.placement = Placement::PerLayer;
    c.train.check_finite_every = Some(5);
    let dir = tempfile::tempdir().unwrap();
    let fault = Fault { layer: 1, step: 7, kind: FaultKind::NonFinite };
    let e = layerwise_coordinator::run(&c, dir.path(), RunOptions { fault: Some(fault), ..Default::default() })
        .unwrap_err();
    match e {
        Error::Stage(f) => assert_eq!((f.stage, f.layer, f.step), (1, Some(1), Some(7)), "{f}"),
        other => panic!("expected a stage failure, got {other}"),
    }
}

#[test]
fn each_kind_of_stage_failure_stops_the_pipeline_and_says_where_and_why() {
    for (kind, layer, reason) in [
        (FaultKind::Error, 1, "injected error"),
        (FaultKind::Panic, 2, "injected panic"),
        (FaultKind::NonFinite, 0, "non-finite loss"),
        (FaultKind::OutOfMemory, 3, "out of memory"),
    ] {
        for mode in [PipelineMode::Pipelined, PipelineMode::Sequential] {
            let (f, dir) = failure(kind, layer, mode);
            assert_eq!((f.stage, f.layer, f.step), (layer, Some(layer), Some(7)), "{kind:?} {mode:?}: {f}");
            assert!(f.reason.contains(reason), "{kind:?}: {}", f.reason);
            let status: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap()).unwrap();
            assert_eq!(status["state"], "failed");
            assert!(status["reason"].as_str().unwrap().contains(&format!("stage {layer}")), "{status}");
        }
    }
}

/// Log lines of this test binary, captured by a global subscriber (the watchdog logs
/// from a thread of its own).
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct Sink(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || Sink(logs)).finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
}

#[test]
fn a_stalled_stage_is_reported_while_it_stalls() {
    let logs = captured_logs();
    let data = data_dir();
    let mut c = config(data.path(), "mlp");
    c.pipeline.placement = Placement::PerLayer;
    c.train.epochs = 1;
    c.train.stall_warning_s = 0.3;
    // Stage 2 holds step 5 until the warning is seen: the test waits for the log line, so a
    // slow machine only makes it slower; without a warning it never ends.
    static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let fault = Fault { layer: 2, step: 5, kind: FaultKind::Hold(&RELEASE) };
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().to_path_buf();
    let run = std::thread::spawn(move || {
        layerwise_coordinator::run(&c, &run_dir, RunOptions { fault: Some(fault), ..Default::default() }).map(|_| ())
    });
    let warning = layerwise_tests::wait_until("the stall warning", || {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        text.lines().find(|l| l.contains("stalled")).map(str::to_string)
    });
    RELEASE.store(true, std::sync::atomic::Ordering::SeqCst);
    run.join().unwrap().unwrap();
    assert!(warning.contains("stage 2") && warning.contains("train message"), "{warning}");
}
