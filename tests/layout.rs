//! The code's layout holds what the README promises a newcomer: crates that import only
//! downward in the order a run flows, no import circle between the files of a crate, no
//! file over 450 lines and no function over 80. Read from the sources themselves, so a
//! change that breaks one of these fails here, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates from the bottom up: each may use only those before it.
const ORDER: [&str; 10] = ["nn", "data", "nccl", "plan", "rundir", "pipeline", "net", "coordinator", "daemon", "cli"];
const MAX_FILE_LINES: usize = 450;
const MAX_FN_LINES: usize = 80;

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A source's lines with `//` comments dropped (string contents are left: a `//` inside a
/// string only shortens what is searched).
fn code_lines(text: &str) -> Vec<&str> {
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect()
}

#[test]
fn crates_are_listed_in_the_order_a_run_flows_and_each_uses_only_those_below_it() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(crates_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, ORDER.iter().map(|s| s.to_string()).collect(), "a crate is missing from ORDER");
    for (rank, name) in ORDER.iter().enumerate() {
        let manifest = std::fs::read_to_string(crates_dir().join(name).join("Cargo.toml")).unwrap();
        let deps = manifest.split("[dependencies]").nth(1).unwrap_or("").split("\n[").next().unwrap_or("");
        for line in deps.lines() {
            let Some(dep) = line.trim().strip_prefix("layerwise-") else { continue };
            let dep = dep.split([' ', '=', '.']).next().unwrap();
            let dep_rank = ORDER.iter().position(|c| *c == dep).unwrap_or_else(|| panic!("{name}: unknown {dep}"));
            assert!(dep_rank < rank, "crates/{name} uses crates/{dep}, which is above it in {ORDER:?}");
        }
    }
}

#[test]
fn no_file_is_over_450_lines() {
    for file in rust_files(&crates_dir()) {
        let lines = std::fs::read_to_string(&file).unwrap().lines().count();
        assert!(lines <= MAX_FILE_LINES, "{} has {lines} lines (at most {MAX_FILE_LINES})", file.display());
    }
}

/// Where each `fn` item's body ends, by its braces: (line of `fn`, lines it spans).
fn function_lengths(text: &str) -> Vec<(usize, usize)> {
    let lines = code_lines(text);
    let mut out = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub ").or_else(|| t.strip_prefix("pub(crate) ")).unwrap_or(t);
        let t = t.strip_prefix("pub(super) ").unwrap_or(t);
        if !(t.starts_with("fn ") || t.starts_with("unsafe fn ") || t.starts_with("async fn ")) {
            continue;
        }
        let (mut depth, mut opened) = (0i64, false);
        for (k, l) in lines[start..].iter().enumerate() {
            if !opened && l.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            for c in l.chars() {
                match c {
                    '{' => (depth, opened) = (depth + 1, true),
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                out.push((start + 1, k + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_is_over_80_lines() {
    let sample = "fn a() {\n    let x = 1;\n}\n\nfn b();\npub fn c(\n    y: u8,\n) -> u8 {\n    y\n}\n";
    assert_eq!(function_lengths(sample), vec![(1, 3), (6, 5)], "the counter itself");
    for file in rust_files(&crates_dir()) {
        for (line, n) in function_lengths(&std::fs::read_to_string(&file).unwrap()) {
            assert!(n <= MAX_FN_LINES, "{}:{line}: a function of {n} lines (at most {MAX_FN_LINES})", file.display());
        }
    }
}

/// The crate's top-level modules each file uses through `crate::` paths: module -> used.
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let module_of = |p: &Path| {
        let rel = p.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        first.trim_end_matches(".rs").to_string()
    };
    let files = rust_files(src);
    let modules: BTreeSet<String> = files.iter().map(|p| module_of(p)).filter(|m| m != "lib" && m != "main").collect();
    let mut imports: BTreeMap<String, BTreeSet<String>> =
        modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let from = module_of(file);
        let Some(uses) = imports.get_mut(&from) else { continue };
        let text = code_lines(&std::fs::read_to_string(file).unwrap()).join("\n");
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("")],
            };
            uses.extend(names.into_iter().filter(|n| modules.contains(*n) && *n != from).map(str::to_string));
        }
    }
    imports
}

/// A circle of modules in `imports`, if there is one.
fn circle(imports: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            return Some(path[i..].to_vec());
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for next in &imports[m] {
            if let Some(c) = visit(next, imports, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    imports.keys().find_map(|m| visit(m, imports, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_circle_between_its_files() {
    let toy = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(circle(&toy), Some(vec!["a".to_string(), "b".to_string()]), "the finder itself");
    for name in ORDER {
        let imports = module_imports(&crates_dir().join(name).join("src"));
        assert!(!imports.is_empty() || name == "nccl", "crates/{name}: no modules found");
        if let Some(c) = circle(&imports) {
            panic!("crates/{name}: the files {} import each other in a circle", c.join(" -> "));
        }
    }
}
