//! The dashboard at `/`: one page (`dashboard.html`, served by the binary: no build step,
//! no CDN) that polls `/api/jobs` every two seconds and shows each job's state, progress,
//! placement with each stage's utilisation, newest checkpoints and, for the job chosen,
//! its last log lines ([`crate::joblog`]) and its learning curves as SVG drawn here by
//! [`crate::charts`] (`/api/curves/JOB.svg`).

use std::path::PathBuf;

use layerwise_rundir::status::RunDir;
use serde_json::{json, Value};

use crate::exposition::View;

pub const PAGE: &str = include_str!("dashboard.html");

/// The runs a view shows: (name, folder), sorted by name.
pub fn runs(view: &View) -> Vec<(String, PathBuf)> {
    let name = |p: &PathBuf| p.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let mut dirs = match view {
        View::Run(path) => vec![path.clone()],
        View::Runs(runs) => std::fs::read_dir(runs)
            .map(|rd| rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
            .unwrap_or_default(),
    };
    dirs.sort();
    dirs.into_iter().map(|p| (name(&p), p)).collect()
}

/// One job as the page shows it.
fn job(name: &str, dir: &RunDir) -> Option<Value> {
    let status = dir.status()?;
    let metrics = dir.metrics();
    let last = metrics.last();
    let stages: Vec<Value> = last.map_or(vec![], |m| {
        m.stages
            .iter()
            .map(|s| json!({"stage": s.stage, "host": s.host, "device": s.device.to_string(), "layers": s.layers, "utilisation": s.utilisation}))
            .collect()
    });
    let checkpoints: Vec<String> = layerwise_rundir::checkpoint::list(&dir.path.join("checkpoints"))
        .iter()
        .take(5)
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
    Some(json!({
        "name": name,
        "state": format!("{:?}", status.state).to_lowercase(),
        "reason": status.reason,
        "epoch": status.epoch,
        "step": status.step,
        "epochs_recorded": metrics.len(),
        "images_per_sec": last.map(|m| finite(m.images_per_sec)),
        "train_error": last.map(|m| finite(m.train_error)),
        "test_error": last.map(|m| finite(m.test_error)),
        "stages": stages,
        "checkpoints": checkpoints,
        "log": crate::joblog::lines(name),
    }))
}

/// `/api/jobs`: every job of the view.
pub fn jobs(view: &View) -> String {
    let all: Vec<Value> = runs(view).iter().filter_map(|(n, p)| job(n, &RunDir { path: p.clone() })).collect();
    Value::Array(all).to_string()
}

/// `/api/curves/NAME.svg`: the curves of the job of that exact name (none for any other
/// name: nothing from the request becomes a path).
pub fn curves(view: &View, file: &str, log: bool) -> Option<Result<String, String>> {
    let name = file.strip_suffix(".svg")?;
    let (_, path) = runs(view).into_iter().find(|(n, _)| n == name)?;
    Some(crate::charts::svg(&path, log).map_err(|e| e.to_string()))
}
