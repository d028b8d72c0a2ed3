//! Learning curves of one run or several, as PNG or SVG, drawn with plotters: `layerwise
//! plot`, and the dashboard's charts (drawn here, on the server, so that the page needs
//! no charting code of its own). Three panels over whole-number epochs: error (train, test, validation, and
//! each layer's local error for a single run; `--log` for a log scale), loss, and images/s;
//! the legend sits in a column of its own beside them, never over the curves.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use layerwise_rundir::metrics::EpochMetrics;
use layerwise_rundir::RunDir;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::sync::OnceLock;

/// Fonts tried for the labels (Debian's fonts-dejavu-core, installed by scripts/setup.sh).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
const SIZE: (u32, u32) = (1200, 960);
const LEGEND_WIDTH: u32 = 300;

/// Registers the labels' font, once per process.
fn load_font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(|| register_font().map_err(|e| e.to_string())).clone().map_err(|e| anyhow::anyhow!(e))
}

fn register_font() -> anyhow::Result<()> {
    let path = FONTS.iter().find(|p| Path::new(p).is_file()).with_context(|| {
        format!("no font for the labels: expected one of {} (Debian package fonts-dejavu-core)", FONTS.join(", "))
    })?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path}: not a usable font"))?;
    Ok(())
}

/// One line of one panel.
struct Curve {
    name: String,
    points: Vec<(i64, f64)>,
    color: RGBAColor,
    width: u32,
}

/// A run's metrics and its name on the plot.
struct Run {
    name: String,
    metrics: Vec<EpochMetrics>,
}

type Pick = fn(&EpochMetrics) -> Option<f64>;

fn series(run: &Run, what: &str, pick: &dyn Fn(&EpochMetrics) -> Option<f64>, color: RGBAColor, width: u32) -> Curve {
    let points = run.metrics.iter().filter_map(|m| Some((m.epoch as i64, pick(m)?))).filter(|p| p.1.is_finite());
    Curve { name: format!("{}{what}", run.name), points: points.collect(), color, width }
}

/// The three panels' curves: error, loss, images/s. Each run has its colour (a single run:
/// a colour for each curve); the test figure is drawn thicker than the train one.
fn panels(runs: &[Run]) -> [Vec<Curve>; 3] {
    let single = runs.len() == 1;
    let mut out: [Vec<Curve>; 3] = Default::default();
    for (r, run) in runs.iter().enumerate() {
        let c = |k: usize| Palette99::pick(if single { k } else { r }).to_rgba();
        let errors: [(&str, Pick, usize, u32); 3] = [
            ("train error", |m| Some(m.train_error), 0, 2),
            ("test error", |m| Some(m.test_error), 1, 3),
            ("validation error", |m| m.validation_error, 2, 2),
        ];
        for (what, pick, k, w) in errors {
            out[0].push(series(run, what, &pick, c(k), w));
        }
        if single {
            for i in 0..run.metrics.first().map_or(0, |m| m.layers.len()) {
                let pick = move |m: &EpochMetrics| m.layers.get(i)?.error;
                out[0].push(series(run, &format!("layer {i} local error"), &pick, c(3 + i), 1));
            }
        }
        out[1].push(series(run, "train loss", &|m| Some(m.train_loss), c(0), 2));
        out[1].push(series(run, "test loss", &|m| Some(m.test_loss), c(1), 3));
        out[2].push(series(run, "images/s", &|m| Some(m.images_per_sec), c(4), 2));
    }
    for panel in &mut out {
        panel.retain(|c| !c.points.is_empty());
    }
    out
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// One panel: `curves` over whole-number epochs 1..=`epochs`, its y axis `y_desc`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &[Curve],
    epochs: i64,
    y_desc: &str,
    log: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let ys = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let mut builder = ChartBuilder::on(area);
    builder.margin(10).x_label_area_size(34).y_label_area_size(64);
    let x = 1..epochs.max(2);
    let ticks = (epochs.max(2) as usize).min(12);
    macro_rules! draw_on {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(y_desc)
                .x_labels(ticks)
                .x_label_formatter(&|e| e.to_string())
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            for c in curves {
                let style = c.color.stroke_width(c.width);
                chart.draw_series(LineSeries::new(c.points.clone(), style)).map_err(err)?;
                if c.points.len() == 1 {
                    chart.draw_series(c.points.iter().map(|&p| Circle::new(p, 4, c.color.filled()))).map_err(err)?;
                }
            }
        }};
    }
    if log {
        let floor = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).filter(|y| *y > 0.0).fold(hi, f64::min);
        draw_on!(builder.build_cartesian_2d(x, (floor * 0.9..hi * 1.1).log_scale()).map_err(err)?);
    } else {
        let span = (hi - lo).max(1e-9);
        let bottom = if lo >= 0.0 && lo < span { 0.0 } else { lo - 0.05 * span };
        draw_on!(builder.build_cartesian_2d(x, bottom..hi + 0.05 * span).map_err(err)?);
    }
    Ok(())
}

/// The legend column: each curve's colour and name, panel by panel.
fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panels: &[Vec<Curve>; 3]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let mut y = 20;
    for (title, curves) in ["error", "loss", "speed"].iter().zip(panels) {
        area.draw(&Text::new(title.to_string(), (10, y), ("sans-serif", 15).into_font().style(FontStyle::Bold)))
            .map_err(err)?;
        y += 22;
        for c in curves {
            area.draw(&PathElement::new(vec![(10, y + 7), (34, y + 7)], c.color.stroke_width(c.width.max(2))))
                .map_err(err)?;
            area.draw(&Text::new(c.name.clone(), (42, y), ("sans-serif", 13))).map_err(err)?;
            y += 19;
        }
        y += 12;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, runs: &[Run], log: bool) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let (charts, side) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let epochs = runs.iter().flat_map(|r| r.metrics.iter().map(|m| m.epoch as i64)).max().unwrap_or(1);
    let panels = panels(runs);
    let (top, rest) = charts.split_vertically((SIZE.1 as f64 * 0.48) as u32);
    let (middle, bottom) = rest.split_vertically((SIZE.1 as f64 * 0.24) as u32);
    panel(&top, &panels[0], epochs, if log { "error (%), log scale" } else { "error (%)" }, log)?;
    panel(&middle, &panels[1], epochs, "loss", false)?;
    panel(&bottom, &panels[2], epochs, "images/s", false)?;
    legend(&side, &panels)?;
    root.present().map_err(err)?;
    Ok(())
}

fn read(run_dir: &Path, several: bool) -> anyhow::Result<Run> {
    let dir = RunDir { path: run_dir.to_path_buf() };
    let path = dir.metrics_path();
    if !path.is_file() {
        bail!("{}: no metrics to plot", path.display());
    }
    let metrics = dir.metrics();
    if metrics.is_empty() {
        bail!("{}: no complete epoch yet", path.display());
    }
    let base = run_dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned());
    Ok(Run { name: if several { format!("{base}: ") } else { String::new() }, metrics })
}

/// One run's curves as an SVG document (the dashboard's chart).
pub fn svg(run_dir: &Path, log: bool) -> anyhow::Result<String> {
    let runs = [read(run_dir, false)?];
    load_font()?;
    let name = run_dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let mut text = String::new();
    draw(SVGBackend::with_string(&mut text, SIZE).into_drawing_area(), &name, &runs, log)?;
    Ok(text)
}

/// Plots `run_dirs` into `out` (default: the first run's `curves.png`); returns the file.
pub fn plot(run_dirs: &[PathBuf], out: Option<PathBuf>, log: bool) -> anyhow::Result<PathBuf> {
    let first = run_dirs.first().context("no run directory given")?;
    let runs = run_dirs.iter().map(|d| read(d, run_dirs.len() > 1)).collect::<anyhow::Result<Vec<_>>>()?;
    let out = out.unwrap_or_else(|| first.join("curves.png"));
    load_font()?;
    let names: Vec<String> =
        run_dirs.iter().map(|d| d.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned())).collect();
    let title = format!("{}: learning curves", names.join(", "));
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(SVGBackend::new(&out, SIZE).into_drawing_area(), &title, &runs, log)?,
        Some("png") => draw(BitMapBackend::new(&out, SIZE).into_drawing_area(), &title, &runs, log)?,
        other => bail!("{}: expected a .png or .svg file, got {:?}", out.display(), other.unwrap_or("no extension")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory with `epochs` lines of metrics.
    fn run(dir: &Path, epochs: usize, shift: f64) {
        std::fs::create_dir_all(dir).unwrap();
        let lines: String = (1..=epochs)
            .map(|e| {
                let err = 50.0 / e as f64 + shift;
                let layers = serde_json::json!([{"layer": 0, "stage": 0, "loss_pred": 1.0, "loss_sim": 0.5, "error": err + 5.0}]);
                let line = serde_json::json!({"epoch": e, "step": e * 10, "lr": 1e-3, "train_loss": err / 50.0,
                    "train_error": err, "test_loss": err / 40.0, "test_error": err + 1.0, "images_per_sec": 3000.0 + e as f64,
                    "train_seconds": 1.0, "epoch_seconds": 1.2, "layers": layers, "stages": []});
                format!("{line}\n")
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    }

    /// Every text of an SVG: (x, y, text).
    fn texts(svg: &str) -> Vec<(f64, f64, String)> {
        svg.split("<text ")
            .skip(1)
            .filter_map(|t| {
                let attr = |k: &str| t.split(&format!("{k}=\"")).nth(1)?.split('"').next()?.parse::<f64>().ok();
                let body = t.split('>').nth(1)?.split('<').next()?.trim().to_string();
                Some((attr("x")?, attr("y")?, body))
            })
            .collect()
    }

    /// Two runs on one plot, log scale: each run's curves named in a legend column right of
    /// the charts, whole-number epoch ticks only, the three panels' axes named.
    #[test]
    fn two_runs_plot_with_whole_epochs_and_the_legend_beside_the_curves() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        run(&a, 12, 0.0);
        run(&b, 9, 3.0);
        let out = dir.path().join("curves.svg");
        plot(&[a, b], Some(out.clone()), true).unwrap();
        let t = texts(&std::fs::read_to_string(&out).unwrap());
        let chart_width = f64::from(SIZE.0 - LEGEND_WIDTH);
        for name in ["a: test error", "b: test error", "a: train loss", "b: images/s"] {
            let (x, _, _) = t.iter().find(|(_, _, s)| s == name).unwrap_or_else(|| panic!("{name} missing: {t:?}"));
            assert!(*x >= chart_width, "{name} at x {x}, over the curves");
        }
        assert!(!t.iter().any(|(_, _, s)| s.contains("layer 0")), "layers only for a single run");
        for axis in ["error (%), log scale", "loss", "images/s"] {
            assert!(t.iter().any(|(_, _, s)| s == axis), "{axis}: {t:?}");
        }
        // The x ticks: the texts on the line of the first "1".
        let (_, tick_y, _) = t.iter().find(|(_, _, s)| s == "1").unwrap().clone();
        let ticks: Vec<&String> = t.iter().filter(|(_, y, _)| *y == tick_y).map(|(_, _, s)| s).collect();
        assert!(ticks.len() >= 6 && ticks.iter().all(|s| s.parse::<i64>().is_ok()), "{ticks:?}");
        assert!(ticks.iter().any(|s| *s == "12"), "{ticks:?}");
    }
}
