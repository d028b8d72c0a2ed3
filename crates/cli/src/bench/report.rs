//! The table `bench train` prints last.

use layerwise_plan::Placement;

use super::Report;

pub(super) fn print_table(r: &Report) {
    println!(
        "{}: batch {}, {} measured epoch(s) of {} steps after a warm-up; {:.3} GFLOP per image per step",
        r.config.display(),
        r.batch_size,
        r.measured_epochs,
        r.steps_per_epoch,
        r.train_gflop_per_image
    );
    println!(
        "machine: {} cores, {}; matmul {n}x{n} in {}: {:.1} GFLOP/s",
        r.machine.cores,
        r.machine.device_names.join(", "),
        r.machine.matmul_kind,
        r.machine.matmul_gflops,
        n = r.machine.matmul_size
    );
    println!(
        "{:<11} {:<28} {:<22} {:>9} {:>8} {:>6} {:>6} {:>8} {:>9} {:>9}",
        "mode", "placement", "stages", "images/s", "speedup", "best", "eff", "GFLOP/s", "peak RSS", "peak dev"
    );
    for row in &r.runs {
        let m = &row.measured;
        let placement = match &m.placement {
            Placement::Stages(_) if m.processes > 1 => format!("listed, {} processes", m.processes),
            Placement::Stages(_) => "listed, 1 process".into(),
            named => serde_json::to_string(named).unwrap_or_default(),
        };
        let stages = m.stages.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join("");
        let gib = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        println!(
            "{:<11} {:<28} {:<22} {:>9.0} {:>7.2}x {:>5.2}x {:>6.2} {:>8.1} {:>9} {:>9}",
            format!("{:?}", m.mode).to_lowercase(),
            placement,
            stages,
            m.images_per_sec,
            row.speedup,
            row.best_speedup,
            row.efficiency,
            row.gflops,
            gib(m.peak_rss_bytes),
            m.peak_device_bytes.map_or("-".into(), gib)
        );
    }
}
