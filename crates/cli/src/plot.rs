//! `layerwise plot`: learning curves of a run (train and test error per epoch, and each
//! layer's local error) as PNG or SVG, drawn with plotters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use layerwise_rundir::metrics::EpochMetrics;
use layerwise_rundir::RunDir;
use plotters::prelude::*;

/// Fonts tried for the labels (Debian's fonts-dejavu-core, installed by scripts/setup.sh).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> anyhow::Result<()> {
    let path = FONTS.iter().find(|p| Path::new(p).is_file()).with_context(|| {
        format!("no font for the labels: expected one of {} (Debian package fonts-dejavu-core)", FONTS.join(", "))
    })?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path}: not a usable font"))?;
    Ok(())
}

struct Curve {
    name: String,
    points: Vec<(f64, f64)>,
}

fn curves(metrics: &[EpochMetrics]) -> Vec<Curve> {
    let series = |name: &str, f: &dyn Fn(&EpochMetrics) -> Option<f64>| Curve {
        name: name.to_string(),
        points: metrics.iter().filter_map(|m| Some((m.epoch as f64, f(m)?))).filter(|p| p.1.is_finite()).collect(),
    };
    let mut out = vec![
        series("train error", &|m| Some(m.train_error)),
        series("test error", &|m| Some(m.test_error)),
        series("validation error", &|m| m.validation_error),
    ];
    let layers = metrics.first().map_or(0, |m| m.layers.len());
    for i in 0..layers {
        out.push(series(&format!("layer {i} local error"), &|m| m.layers.get(i)?.error));
    }
    out.retain(|c| !c.points.is_empty());
    out
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    curves: &[Curve],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_epoch = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).fold(1.0, f64::max);
    let max_err = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(if max_epoch > 1.0 { 1.0..max_epoch } else { 0.5..1.5 }, 0.0..(max_err * 1.05))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("error (%)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, c) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = if i < 2 { 3 } else { 1 };
        chart
            .draw_series(LineSeries::new(c.points.clone(), color.stroke_width(width)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(c.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(width)));
        if c.points.len() == 1 {
            chart
                .draw_series(c.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

pub fn plot(run_dir: &Path, out: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = RunDir { path: run_dir.to_path_buf() };
    let path = dir.metrics_path();
    if !path.is_file() {
        bail!("{}: no metrics to plot", path.display());
    }
    let metrics = dir.metrics();
    if metrics.is_empty() {
        bail!("{}: no complete epoch yet", path.display());
    }
    let out = out.unwrap_or_else(|| run_dir.join("curves.png"));
    let curves = curves(&metrics);
    load_font()?;
    let title =
        format!("{}: learning curves", run_dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned()));
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(SVGBackend::new(&out, (960, 600)).into_drawing_area(), &title, &curves)?,
        Some("png") => draw(BitMapBackend::new(&out, (960, 600)).into_drawing_area(), &title, &curves)?,
        other => bail!("{}: expected a .png or .svg file, got {:?}", out.display(), other.unwrap_or("no extension")),
    }
    Ok(out)
}
