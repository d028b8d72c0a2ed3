//! Commands that use a trained run: `eval`, `export`, `inspect`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use layerwise_coordinator::evaluate;
use tch::Device;

fn device() -> Device {
    if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

pub fn eval(path: &Path, json: bool, predictions: Option<&Path>) -> anyhow::Result<()> {
    let (plan, loaded) = evaluate::open(path)?;
    let e = evaluate::evaluate(&plan, &loaded, device())?;
    if let Some(p) = predictions {
        let mut f = std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("{}", p.display()))?);
        for c in &e.predictions {
            writeln!(f, "{c}")?;
        }
    }
    if json {
        let out = serde_json::json!({
            "test_error": e.test_error, "test_loss": e.test_loss, "examples": e.examples,
            "checkpoint": loaded.dir, "step": loaded.manifest.step,
        });
        println!("{out}");
    } else {
        println!(
            "{}: test error {:.2}% (loss {:.4}) on {} examples, checkpoint at step {}",
            loaded.dir.display(),
            e.test_error,
            e.test_loss,
            e.examples,
            loaded.manifest.step
        );
    }
    Ok(())
}

pub fn export(path: &Path, out: &Path) -> anyhow::Result<()> {
    let (plan, loaded) = evaluate::open(path)?;
    let json = evaluate::export(&plan, &loaded, out)?;
    println!("wrote {} and {}", out.display(), json.display());
    Ok(())
}

pub fn inspect(path: &Path) -> anyhow::Result<()> {
    let (_, loaded) = evaluate::open(path)?;
    let m = &loaded.manifest;
    println!("checkpoint   {}", loaded.dir.display());
    println!("format       {}", m.format_version);
    println!("step         {} (epoch {})", m.step, m.epoch);
    println!("position     epoch {}, batch {}", m.position.0, m.position.1);
    println!("epochs done  {}", m.epochs_done);
    println!("error        {}", m.error.map_or("-".into(), |e| format!("{e:.2}%")));
    println!("model        {} ({:?}, {:?}), data set {:?}", m.model.arch, m.model.training, m.model.loss, m.dataset);
    println!("config hash  {}", m.config_hash);
    for line in &loaded.coordinator.metrics {
        println!(
            "epoch {:>4}   lr {:.2e}  train error {:>6.2}%  test error {:>6.2}%",
            line.epoch, line.lr, line.train_error, line.test_error
        );
    }
    for f in &m.files {
        println!("file         {} ({} bytes, sha256 {}..)", f.name, f.size, f.sha256.get(..16).unwrap_or(&f.sha256));
    }
    for f in m.files.iter().filter(|f| f.name.ends_with(".safetensors")) {
        let part = f.name.trim_end_matches(".safetensors");
        let tensors = loaded.part(part)?;
        for (name, t) in
            tensors.iter().filter(|(n, _)| !n.starts_with("optim.") && !n.starts_with("stats.") && n != "rng")
        {
            println!("{part:<10} {name:<24} {:?}", t.size());
        }
    }
    Ok(())
}
