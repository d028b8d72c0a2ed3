//! Helpers shared by the project-level tests: golden files written by `scripts/golden.py`,
//! float comparisons with stated tolerances, and waits that end in a failure instead of
//! hanging CI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

/// How long a test waits for an event (a file, a state, a process's exit) before it fails.
/// Generous: a loaded 2-core CI machine never reaches it; a broken feature fails at it
/// instead of hanging CI.
pub const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// Polls `poll` until it gives a value; fails, naming `what`, after [`WAIT_LIMIT`].
pub fn wait_until<T>(what: impl std::fmt::Display, mut poll: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = poll() {
            return v;
        }
        assert!(start.elapsed() < WAIT_LIMIT, "waited {} s for {what}", WAIT_LIMIT.as_secs());
        std::thread::park_timeout(Duration::from_millis(5));
    }
}

/// Waits for `child` to exit and reads its output; after [`WAIT_LIMIT`], kills it and
/// fails naming `what`.
pub fn output_within(child: Child, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(WAIT_LIMIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{what} did not exit within {} s", WAIT_LIMIT.as_secs())
        }
    }
}

/// `Command::output`, bounded: the command's output once it exits, or a failure after
/// [`WAIT_LIMIT`].
pub trait OutputWithin {
    fn output_within(&mut self) -> Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self) -> Output {
        let what = format!("{:?}", self);
        let child =
            self.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        output_within(child, &what)
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// One golden case: its tensors and the settings PyTorch computed them with.
pub struct Golden {
    pub case: String,
    pub tensors: HashMap<String, Tensor>,
    pub config: serde_json::Value,
}

impl Golden {
    pub fn load(case: &str) -> Golden {
        let path = repo_root().join("tests/golden").join(format!("{case}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/golden.py)", path.display()));
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).expect("safetensors header");
        let config = header["__metadata__"]["config"]
            .as_str()
            .map_or(serde_json::Value::Null, |s| serde_json::from_str(s).expect("config metadata is JSON"));
        let tensors = Tensor::read_safetensors(&path).expect("golden file").into_iter().collect();
        Golden { case: case.to_string(), tensors, config }
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor {name:?}", self.case))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensors whose names start with `prefix`, with the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n.to_string(), t.shallow_clone())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn str(&self, key: &str) -> &str {
        self.config[key].as_str().unwrap_or_else(|| panic!("{}: config has no string {key:?}", self.case))
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.config[key].as_f64().unwrap_or_else(|| panic!("{}: config has no number {key:?}", self.case))
    }

    pub fn i64(&self, key: &str) -> i64 {
        self.config[key].as_i64().unwrap_or_else(|| panic!("{}: config has no integer {key:?}", self.case))
    }

    pub fn bool(&self, key: &str) -> bool {
        self.config[key].as_bool().unwrap_or_else(|| panic!("{}: config has no bool {key:?}", self.case))
    }
}

/// Largest `|a - e| / (|e| + floor)` over the elements, computed in float64.
pub fn max_rel_error(actual: &Tensor, expected: &Tensor, floor: f64) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let err = (&a - &e).abs() / (e.abs() + floor);
    if err.numel() == 0 {
        0.0
    } else {
        err.max().double_value(&[])
    }
}

/// Asserts `actual` is within relative error `rtol` of `expected`; values of magnitude
/// below `floor` are compared absolutely against `rtol * floor`.
#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64, floor: f64) {
    let err = max_rel_error(actual, expected, floor);
    assert!(err <= rtol, "{what}: relative error {err:e} exceeds {rtol:e}");
}

/// Asserts the two tensors are bit-identical.
#[track_caller]
pub fn assert_bit_identical(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.size(), expected.size(), "{what}: shapes differ");
    assert_eq!(actual.kind(), expected.kind(), "{what}: kinds differ");
    assert!(
        actual.equal(expected),
        "{what}: not bit-identical (max rel error {:e})",
        max_rel_error(actual, expected, 1e-30)
    );
}

/// Writes a small MNIST-format data set (gzip IDX files) to `dir`: 28x28 images whose
/// class (0..9) decides where a bright bar sits, plus noise. Learnable in a few dozen steps.
pub fn write_idx_dataset(dir: &Path, train: usize, test: usize) {
    use layerwise_data::idx;
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut pixels = vec![0u8; n * 784];
        let mut labels = vec![0u8; n];
        for i in 0..n {
            let c = (next() % 10) as usize;
            labels[i] = c as u8;
            for p in 0..784 {
                let (y, x) = (p / 28, p % 28);
                let on = y >= 2 + 2 * c && y < 4 + 2 * c && (4..24).contains(&x);
                let noise = (next() % 60) as u8;
                pixels[i * 784 + p] = if on { 200u8.saturating_add(noise / 2) } else { noise };
            }
        }
        idx::write(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), &[n, 28, 28], &pixels, true).unwrap();
        idx::write(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), &[n], &labels, true).unwrap();
    }
}

/// A temporary folder holding a small MNIST-format data set.
pub fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_idx_dataset(dir.path(), 600, 200);
    dir
}

/// A small predsim run with dropout, batch norm, augmentation and cutout: 2 epochs of 12
/// steps, a learning-rate milestone between them, one intra-op thread per stage.
pub fn small_run_config(data: &Path, arch: &str) -> layerwise_plan::RunConfig {
    let mut c = layerwise_plan::RunConfig::default();
    c.data.root = Some(data.to_path_buf());
    c.data.cutout_holes = 1;
    c.data.cutout_length = 6;
    c.model.arch = arch.into();
    c.model.num_layers = if arch == "mlp" { 3 } else { 1 };
    c.model.num_hidden = 48;
    c.model.feat_mult = 1.0 / 16.0;
    c.model.dropout = 0.2;
    c.model.dim_in_decoder = 128;
    c.optim.lr = 2e-3;
    c.optim.milestones = vec![1];
    c.train.epochs = 2;
    c.train.batch_size = 32;
    c.train.steps_per_epoch = Some(12);
    c.train.eval_batch_size = Some(50);
    c.train.cpu_threads = Some(1);
    c
}

/// A finished run and the folder that holds it: its final state is its last checkpoint,
/// so the folder lives as long as the summary is used.
pub struct Ran {
    pub summary: layerwise_coordinator::RunSummary,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for Ran {
    type Target = layerwise_coordinator::RunSummary;
    fn deref(&self) -> &Self::Target {
        &self.summary
    }
}

/// Runs `config` in a new temporary folder.
pub fn run_in_temp(config: &layerwise_plan::RunConfig) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let summary = layerwise_coordinator::run(config, dir.path(), Default::default()).unwrap();
    Ran { summary, dir }
}

/// Asserts two runs ended in the same state, bit for bit: every tensor of every layer
/// (parameters, buffers, optimizer, generator, statistics) and every epoch's figures.
#[track_caller]
pub fn assert_same_run(a: &layerwise_coordinator::RunSummary, b: &layerwise_coordinator::RunSummary, what: &str) {
    let (sa, sb) = (a.state().unwrap(), b.state().unwrap());
    assert_eq!(sa.len(), sb.len(), "{what}: same tensors");
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb, "{what}: same names in the same order");
        assert!(ta.equal(tb), "{what}: {na} differs");
    }
    assert_eq!(a.epochs.len(), b.epochs.len(), "{what}: epochs");
    for (ea, eb) in a.epochs.iter().zip(&b.epochs) {
        assert_eq!(ea.test_error.to_bits(), eb.test_error.to_bits(), "{what}: test error");
        assert_eq!(ea.test_loss.to_bits(), eb.test_loss.to_bits(), "{what}: test loss");
        assert_eq!(ea.train_loss.to_bits(), eb.train_loss.to_bits(), "{what}: train loss");
        assert_eq!(ea.train_error.to_bits(), eb.train_error.to_bits(), "{what}: train error");
        assert_eq!(ea.lr, eb.lr, "{what}: lr");
        let numbers =
            |e: &layerwise_rundir::metrics::EpochMetrics| e.layers.iter().map(|l| l.layer).collect::<Vec<_>>();
        assert_eq!(numbers(ea), numbers(eb), "{what}: epoch {}: the same layers reported", ea.epoch);
        for (la, lb) in ea.layers.iter().zip(&eb.layers) {
            assert_eq!(la.loss_sim.to_bits(), lb.loss_sim.to_bits(), "{what}: layer {} sim loss", la.layer);
            assert_eq!(la.loss_pred.to_bits(), lb.loss_pred.to_bits(), "{what}: layer {} pred loss", la.layer);
            assert_eq!(la.error.map(f64::to_bits), lb.error.map(f64::to_bits), "{what}: layer {} error", la.layer);
        }
    }
}

/// The names of a run's checkpoint folders, sorted: `step-N`, and `step-N.SEQ.partial`
/// while a cut is being written (or after a kill during one). None without a folder.
pub fn checkpoint_folders(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with("step-"));
    names.sort();
    names
}

/// The folder name of a run's newest complete checkpoint (`step-N`), or "" when none.
pub fn newest_checkpoint_name(run: &Path) -> String {
    checkpoint_folders(run).into_iter().rfind(|n| !n.ends_with(".partial")).unwrap_or_default()
}

/// Every tensor of a run's newest complete checkpoint, named `file/tensor`, in order.
pub fn newest_checkpoint_tensors(run: &Path) -> Vec<(String, Tensor)> {
    let newest = newest_checkpoint_name(run);
    assert!(!newest.is_empty(), "{}: no checkpoint", run.display());
    let dir = run.join("checkpoints").join(newest);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "safetensors")) {
        let mut t = Tensor::read_safetensors(f).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(t.into_iter().map(|(n, t)| (format!("{}/{n}", f.file_name().unwrap().to_string_lossy()), t)));
    }
    out
}

/// Asserts two runs' newest checkpoints hold the same tensors, bit for bit.
#[track_caller]
pub fn assert_same_newest_checkpoint(a: &Path, b: &Path, what: &str) {
    let (a, b) = (newest_checkpoint_tensors(a), newest_checkpoint_tensors(b));
    assert!(a.len() > 20, "{what}: {} tensors", a.len());
    assert_eq!(a.len(), b.len(), "{what}: same tensors");
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb, "{what}: same names");
        assert!(ta.equal(tb), "{na} differs {what}");
    }
}
