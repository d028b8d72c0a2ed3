//! The run configuration: one JSON document, parsed strictly (unknown keys are errors) into
//! typed settings, with `--set key.path=value` overrides applied before parsing. Errors name
//! the key by its dotted path and say what was expected.

use std::path::Path;

use layerwise_data::DataConfig;
use layerwise_nn::{ModelConfig, OptimConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{quote, Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub pipeline: PipelineConfig,
    pub checkpoint: CheckpointConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Cap on training batches per epoch (quick runs); all batches when absent.
    pub steps_per_epoch: Option<usize>,
    /// Cap on evaluation batches (quick runs); the whole test set when absent.
    pub eval_batches: Option<usize>,
    /// Images per evaluation batch; the training batch size when absent, so that evaluation
    /// never needs more memory than a training step (evaluation keeps no gradients).
    pub eval_batch_size: Option<usize>,
    /// Read back every this many steps whether a layer's loss went NaN/inf (0: never look).
    /// Losses are watched on the device every step, so the failure names the exact step;
    /// only the read-back waits for the device. Default: 1 on the CPU, 50 on GPUs.
    pub check_finite_every: Option<u64>,
    /// Intra-op CPU threads in all (divided among CPU stages); the machine's cores when absent.
    pub cpu_threads: Option<usize>,
    /// Warn when one message has held a stage this many seconds.
    pub stall_warning_s: f64,
    /// On GPUs, cuDNN's choice: true (the default) keeps its benchmark mode off and its
    /// algorithms deterministic, for runs that repeat bit for bit; false lets it time its
    /// algorithms for each shape and keep the fastest. No effect on the CPU.
    pub deterministic: bool,
}

impl TrainConfig {
    pub fn eval_batch(&self) -> usize {
        self.eval_batch_size.unwrap_or(self.batch_size)
    }

    /// Intra-op CPU threads to share among a process's stages: `cpu_threads`, else `cores`.
    pub fn thread_budget(&self, cores: usize) -> usize {
        self.cpu_threads.unwrap_or(cores).max(1)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 128,
            seed: 1,
            steps_per_epoch: None,
            eval_batches: None,
            eval_batch_size: None,
            check_finite_every: None,
            cpu_threads: None,
            stall_warning_s: 60.0,
            deterministic: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineMode {
    /// A thread per stage, activations streaming between them.
    Pipelined,
    /// One thread, layer after layer per batch (the reference's order).
    Sequential,
}

/// Which layers run where: `"auto"`, `"per_layer"`, `"single"`, or an explicit list of
/// stages `[{"layers": [0, 1], "device": "cuda:0"}, ...]`. Layer indices count the hidden
/// layers from 0; the output layer is the index after the last hidden layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PlacementText", into = "PlacementText")]
pub enum Placement {
    /// Split by each layer's measured cost: one stage per GPU, or on a CPU the split
    /// (or single stage) measured fastest.
    Auto,
    /// One stage per layer.
    PerLayer,
    /// Every layer in one stage.
    Single,
    /// Stages as listed.
    Stages(Vec<StageSpec>),
}

/// A placement as JSON writes it: a name or a list of stages.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PlacementText {
    Name(String),
    Stages(Vec<StageSpec>),
}

impl TryFrom<PlacementText> for Placement {
    type Error = String;
    fn try_from(p: PlacementText) -> std::result::Result<Self, String> {
        match p {
            PlacementText::Stages(stages) => Ok(Placement::Stages(stages)),
            PlacementText::Name(name) => match name.as_str() {
                "auto" => Ok(Placement::Auto),
                "per_layer" => Ok(Placement::PerLayer),
                "single" => Ok(Placement::Single),
                other => Err(format!(
                    "unknown placement {:?}, expected \"auto\", \"per_layer\", \"single\" or a list of stages",
                    quote(other)
                )),
            },
        }
    }
}

impl From<Placement> for PlacementText {
    fn from(p: Placement) -> Self {
        match p {
            Placement::Auto => PlacementText::Name("auto".into()),
            Placement::PerLayer => PlacementText::Name("per_layer".into()),
            Placement::Single => PlacementText::Name("single".into()),
            Placement::Stages(stages) => PlacementText::Stages(stages),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub layers: Vec<usize>,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub mode: PipelineMode,
    pub placement: Placement,
    /// Messages a link holds before its sender blocks: the backpressure bound.
    pub channel_capacity: usize,
    /// How activations on GPUs cross between processes.
    pub gpu_link: GpuLink,
    /// Workers an `auto` placement spreads over: one stage per device of this process and
    /// of each worker named, in that order, the layers split by their measured cost.
    pub workers: Vec<String>,
    /// Encrypt this job's links between processes (they are always authenticated), even
    /// where the processes were started without `--encrypt on`.
    pub encrypt: bool,
    /// Seconds a link between processes may make no progress (nothing sent, or nothing
    /// taken) before it fails the job, naming the peer.
    pub link_stall_s: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            mode: PipelineMode::Pipelined,
            placement: Placement::Auto,
            channel_capacity: 2,
            gpu_link: GpuLink::Nccl,
            workers: Vec::new(),
            encrypt: false,
            link_stall_s: 600.0,
        }
    }
}

/// The transport of a link between stages in two processes whose devices are both GPUs.
/// Control (and credits) always go over the link's TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuLink {
    /// NCCL point-to-point between the two GPUs (through libtorch's c10d).
    Nccl,
    /// Through the hosts: copied to the CPU, sent over TCP, copied to the receiving GPU.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Take a checkpoint every this many steps (0: never by steps).
    pub every_steps: u64,
    /// Take a checkpoint every this many epochs (0: never by epochs).
    pub every_epochs: usize,
    /// Newest checkpoints kept (the best one is kept besides).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 0, every_epochs: 1, keep: 2 }
    }
}

/// Sets `path` (dotted) in a JSON document to `value` (parsed as JSON, else taken as a
/// string), creating objects on the way.
pub fn set_path(doc: &mut Value, path: &str, value: &str) -> Result<()> {
    let parsed = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    let mut node = doc;
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!("--set {path}={value}: expected a dotted key path such as train.epochs")));
    }
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(map) = node else {
            return Err(Error::Config(format!("--set {path}: {} is not an object", parts[..i].join("."))));
        };
        if i == parts.len() - 1 {
            map.insert(part.to_string(), parsed);
            return Ok(());
        }
        node = map.entry(part.to_string()).or_insert_with(|| Value::Object(Default::default()));
    }
    unreachable!()
}

/// Parses JSON text, refusing a key given twice in one object (serde_json would keep the
/// last silently); the error names the key by its dotted path.
pub fn parse_strict(text: &str) -> std::result::Result<Value, String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    UniqueKeys(String::new()).deserialize(&mut de).map_err(|e| format!("not valid JSON: {e}"))?;
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

/// Walks a JSON document checking that no object repeats a key; carries the path so far.
struct UniqueKeys(String);

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.0.is_empty() { key.clone() } else { format!("{}.{key}", self.0) };
            if !seen.insert(key) {
                return Err(serde::de::Error::custom(format!("{}: duplicate key", quote(&path))));
            }
            map.next_value_seed(UniqueKeys(path))?;
        }
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(UniqueKeys(format!("{}[{i}]", self.0)))?.is_some() {
            i += 1;
        }
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }
}

/// The largest config file read (a config is a few KiB; a placement of 256 layers a few
/// more).
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;

impl RunConfig {
    /// Parses a document strictly; the error names the key path.
    pub fn from_value(doc: Value, source: &str) -> Result<Self> {
        serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            Error::Config(format!("{source}: {}: {}", if path == "." { "(top level)".into() } else { path }, e.inner()))
        })
    }

    /// Reads a config file and applies `KEY=VALUE` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let file =
            std::fs::File::open(path).map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
        Self::load_from(file, path, overrides)
    }

    /// [`RunConfig::load`] from a file opened by the caller (the service opens job files
    /// without following links). A file over [`CONFIG_MAX_BYTES`] is refused unread.
    pub fn load_from(file: std::fs::File, path: &Path, overrides: &[String]) -> Result<Self> {
        use std::io::Read;
        let cannot = |e: std::io::Error| Error::Config(format!("{}: cannot read: {e}", path.display()));
        let size = file.metadata().map_err(cannot)?.len();
        if size > CONFIG_MAX_BYTES {
            return Err(Error::Config(format!(
                "{}: {size} bytes; a config is at most {CONFIG_MAX_BYTES} bytes",
                path.display()
            )));
        }
        let mut text = String::new();
        file.take(CONFIG_MAX_BYTES + 1).read_to_string(&mut text).map_err(cannot)?;
        if text.len() as u64 > CONFIG_MAX_BYTES {
            return Err(Error::Config(format!("{}: grew past {CONFIG_MAX_BYTES} bytes while read", path.display())));
        }
        let mut doc = parse_strict(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        for o in overrides {
            let (k, v) = o.split_once('=').ok_or_else(|| Error::Config(format!("--set {o}: expected KEY=VALUE")))?;
            set_path(&mut doc, k.trim(), v.trim())?;
        }
        Self::from_value(doc, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_keys_are_named_by_path() {
        let e = RunConfig::from_value(json!({"train": {"epoch": 3}}), "job.json").unwrap_err().to_string();
        assert!(e.contains("job.json") && e.contains("train.epoch") && e.contains("unknown field"), "{e}");
        let e = RunConfig::from_value(json!({"model": {"nonlin": "tanh"}}), "job.json").unwrap_err().to_string();
        assert!(e.contains("model.nonlin") && e.contains("relu"), "{e}");
    }

    #[test]
    fn a_key_given_twice_is_refused_by_its_path() {
        let e = parse_strict(r#"{"train": {"epochs": 1, "epochs": 2}}"#).unwrap_err();
        assert!(e.contains("train.epochs: duplicate key"), "{e}");
        let e = parse_strict(r#"{"pipeline": {"placement": [{"layers": [0], "device": "cpu", "device": "cpu"}]}}"#)
            .unwrap_err();
        assert!(e.contains("pipeline.placement[0].device"), "{e}");
        assert!(parse_strict(r#"{"train": {"epochs": 1}, "model": {"epochs": 1}}"#).is_ok());
    }

    #[test]
    fn overrides_set_nested_keys_with_json_values() {
        let mut doc = json!({"train": {"epochs": 3}});
        set_path(&mut doc, "train.epochs", "1").unwrap();
        set_path(&mut doc, "pipeline.mode", "sequential").unwrap();
        set_path(&mut doc, "optim.milestones", "[1, 2]").unwrap();
        let c = RunConfig::from_value(doc, "x").unwrap();
        assert_eq!(c.train.epochs, 1);
        assert_eq!(c.pipeline.mode, PipelineMode::Sequential);
        assert_eq!(c.optim.milestones, vec![1, 2]);
        assert!(set_path(&mut json!({}), "train..epochs", "1").is_err());
    }

    #[test]
    fn placement_is_a_name_or_a_list_of_stages() {
        let named = |name: &str| RunConfig::from_value(json!({"pipeline": {"placement": name}}), "x");
        assert_eq!(named("per_layer").unwrap().pipeline.placement, Placement::PerLayer);
        let e = named("fastest").unwrap_err().to_string();
        assert!(e.contains("pipeline.placement") && e.contains("unknown placement \"fastest\""), "{e}");
        let back = serde_json::to_value(named("single").unwrap()).unwrap();
        assert_eq!(back["pipeline"]["placement"], "single");
        let c = RunConfig::from_value(json!({"pipeline": {"placement": [{"layers": [0, 1], "device": "cpu"}]}}), "x")
            .unwrap();
        assert_eq!(
            c.pipeline.placement,
            Placement::Stages(vec![StageSpec { layers: vec![0, 1], device: "cpu".into() }])
        );
    }
}
