//! docs/configuration.md is the config's reference: it lists every key the code reads, with
//! the code's default, and every integer bound it writes as `A..=B` is the one the checks
//! enforce. Read from both sides, so neither can drift from the other.

use std::collections::BTreeMap;
use std::path::Path;

use layerwise_plan::{DataShape, Machine, Plan, RunConfig};
use serde_json::Value;

/// One row of the reference: its default (JSON) and what it says is accepted.
struct Row {
    default: Value,
    accepted: String,
}

/// The rows of every table of the reference, by key.
fn reference() -> BTreeMap<String, Row> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 4, "{line}");
        let ticked =
            |cell: &str| cell.split('`').nth(1).unwrap_or_else(|| panic!("no `value` in {cell:?}")).to_string();
        let default = serde_json::from_str(&ticked(cells[1])).unwrap_or_else(|e| panic!("{line}: {e}"));
        let previous = rows.insert(ticked(cells[0]), Row { default, accepted: cells[2].to_string() });
        assert!(previous.is_none(), "{line}: listed twice");
    }
    rows
}

/// Every leaf of a JSON document by its dotted path.
fn leaves(doc: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match doc {
        Value::Object(map) => {
            for (k, v) in map {
                leaves(v, &format!("{prefix}{k}."), out);
            }
        }
        other => {
            out.insert(prefix.trim_end_matches('.').to_string(), other.clone());
        }
    }
}

#[test]
fn every_key_of_the_config_is_in_the_reference_with_its_default() {
    let mut defaults = BTreeMap::new();
    leaves(&serde_json::to_value(RunConfig::default()).unwrap(), "", &mut defaults);
    let rows = reference();
    let missing: Vec<&String> = defaults.keys().filter(|k| !rows.contains_key(*k)).collect();
    assert!(missing.is_empty(), "keys of the code that docs/configuration.md does not list: {missing:?}");
    let unknown: Vec<&String> = rows.keys().filter(|k| !defaults.contains_key(*k)).collect();
    assert!(unknown.is_empty(), "keys docs/configuration.md lists that the code does not read: {unknown:?}");
    for (key, row) in &rows {
        assert_eq!(row.default, defaults[key], "{key}: the reference's default against the code's");
    }
}

/// `A..=B` in the accepted column: the inclusive integer bounds it names.
fn integer_bounds(accepted: &str) -> Option<(u64, u64)> {
    let (lo, hi) = accepted.split_once("..=")?;
    Some((lo.trim().parse().ok()?, hi.split_whitespace().next()?.parse().ok()?))
}

/// The plan of the default config with `key` set to `value` (image-folder keys with an
/// image folder's shape, read from the config rather than from a folder).
fn plan_with(key: &str, value: u64) -> Result<Plan, String> {
    let mut doc = serde_json::to_value(RunConfig::default()).unwrap();
    if key.starts_with("data.image_") || key == "data.classes" {
        doc["data"]["dataset"] = "image-folder".into();
    }
    layerwise_plan::config::set_path(&mut doc, key, &value.to_string()).unwrap();
    let config = RunConfig::from_value(doc, "test").map_err(|e| e.to_string())?;
    let (channels, size) = config.data.input_shape();
    let input = layerwise_nn::arch::InputShape { channels, size };
    let shape = DataShape { input, num_classes: config.data.num_classes().unwrap_or(10) };
    Plan::build_for(&config, Machine { cuda_devices: 0, cores: 2 }, shape).map_err(|e| e.to_string())
}

#[test]
fn every_integer_bound_in_the_reference_is_the_one_enforced() {
    let rows = reference();
    let bounded: Vec<(&String, (u64, u64))> =
        rows.iter().filter_map(|(k, r)| integer_bounds(&r.accepted).map(|b| (k, b))).collect();
    assert!(
        bounded.len() >= 12,
        "the reference's integer bounds: {:?}",
        bounded.iter().map(|b| b.0).collect::<Vec<_>>()
    );
    for (key, (lo, hi)) in bounded {
        // Refused by this key's check (not, say, by the memory that a large value needs).
        let refused = |v: u64| plan_with(key, v).err().filter(|e| e.contains(key.as_str()) && e.contains("expected"));
        let e =
            refused(hi + 1).unwrap_or_else(|| panic!("{key} = {} (above {lo}..={hi}) is not refused by name", hi + 1));
        assert!(e.contains(&hi.to_string()), "{key}: the error names the bound: {e}");
        assert_eq!(refused(hi), None, "{key} = {hi}, the reference's upper bound, is refused");
        if lo > 0 {
            assert!(refused(lo - 1).is_some(), "{key} = {} (below {lo}..={hi}) is not refused by name", lo - 1);
        }
        assert_eq!(refused(lo), None, "{key} = {lo}, the reference's lower bound, is refused");
    }
}
