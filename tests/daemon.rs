//! The service, driven through the real binary: jobs dropped into the jobs folder run to
//! `done`; a bad job fails with its reason while the next one runs; a cancel file cancels
//! after a checkpoint; SIGTERM mid-training checkpoints and exits 0, and a new `serve`
//! resumes the job to the same final weights as an uninterrupted run. Every file in
//! configs/ validates.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use layerwise_tests::{
    assert_same_newest_checkpoint, repo_root, wait_until, write_idx_dataset, OutputWithin, WAIT_LIMIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_layerwise");

fn job(data: &Path, epochs: usize, steps: usize, hidden: usize) -> serde_json::Value {
    serde_json::json!({
        "data": {"dataset": "mnist", "root": data},
        "model": {"arch": "mlp", "num_layers": 3, "num_hidden": hidden, "dropout": 0.1},
        "optim": {"lr": 1e-3},
        "train": {"epochs": epochs, "batch_size": 32, "steps_per_epoch": steps, "eval_batch_size": 100, "cpu_threads": 4},
        "pipeline": {"placement": "per_layer"},
        "checkpoint": {"every_epochs": 1, "keep": 2}
    })
}

struct Service {
    child: Child,
    jobs: PathBuf,
    runs: PathBuf,
}

impl Service {
    fn start(root: &Path) -> Service {
        Service::start_with(root, &[])
    }

    fn start_with(root: &Path, args: &[&str]) -> Service {
        let (jobs, runs) = (root.join("jobs"), root.join("runs"));
        let child = Command::new(BIN)
            .args(["serve", "--scan-every", "0.1"])
            .args(args)
            .arg("--jobs")
            .arg(&jobs)
            .arg("--runs")
            .arg(&runs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start layerwise serve");
        Service { child, jobs, runs }
    }

    fn submit(&self, name: &str, job: &serde_json::Value) {
        std::fs::create_dir_all(&self.jobs).unwrap();
        let tmp = self.jobs.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(job).unwrap()).unwrap();
        std::fs::rename(tmp, self.jobs.join(format!("{name}.json"))).unwrap();
    }

    fn status(&self, name: &str) -> serde_json::Value {
        std::fs::read_to_string(self.runs.join(name).join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until job `name`'s status satisfies `what`; fails at once if the job ends
    /// otherwise.
    fn wait_for(&self, name: &str, what: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        self.wait_for_state(name, what, true)
    }

    /// As `wait_for`, for a job that may end and then run again (a job file rewritten).
    fn wait_for_state(
        &self,
        name: &str,
        what: impl Fn(&serde_json::Value) -> bool,
        fail_on_end: bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let s = self.status(name);
            if what(&s) {
                return s;
            }
            // A job that has ended otherwise will not get there: fail now, not at the limit.
            let ended = matches!(s["state"].as_str(), Some("done" | "failed" | "cancelled"));
            assert!(!(fail_on_end && ended), "{name}: ended as {s}, not as the test waits for");
            assert!(start.elapsed() < WAIT_LIMIT, "{name}: still {s} after {} s", WAIT_LIMIT.as_secs());
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success());
    }

    fn wait_exit(mut self) -> std::process::ExitStatus {
        wait_until("serve to exit", || self.child.try_wait().unwrap())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Held by each test whose jobs train for long (hundreds of epochs until cancelled or
/// killed, or a full run twice): they take turns, so that on 2 cores no test's jobs starve
/// another's waits.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

fn state_is(s: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |v| v["state"] == s
}

#[test]
fn jobs_run_to_done_and_a_bad_job_fails_without_stopping_the_next() {
    let root = tempfile::tempdir().unwrap();
    write_idx_dataset(&root.path().join("data"), 300, 100);
    let service = Service::start(root.path());
    let mut bad = job(&root.path().join("data"), 1, 3, 16);
    bad["model"]["arch"] = "vgg7".into();
    service.submit("a-bad", &bad);
    let mut missing = job(&root.path().join("data"), 1, 3, 16);
    missing["data"]["root"] = "/nonexistent/data".into();
    service.submit("b-missing-data", &missing);
    service.submit("c-good", &job(&root.path().join("data"), 2, 4, 16));

    let s = service.wait_for("a-bad", state_is("failed"));
    assert!(s["reason"].as_str().unwrap().contains("model.arch"), "{s}");
    let s = service.wait_for("b-missing-data", state_is("failed"));
    assert!(s["reason"].as_str().unwrap().contains("/nonexistent/data"), "{s}");
    let s = service.wait_for("c-good", state_is("done"));
    assert_eq!((s["epoch"].as_u64(), s["step"].as_u64()), (Some(2), Some(8)), "{s}");
    let metrics = std::fs::read_to_string(service.runs.join("c-good/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);

    let table = Command::new(BIN).arg("status").arg("--runs").arg(&service.runs).output_within();
    let table = String::from_utf8_lossy(&table.stdout);
    for row in ["a-bad", "failed", "c-good", "done"] {
        assert!(table.contains(row), "{table}");
    }
    service.signal("TERM");
    assert!(service.wait_exit().success());
}

#[test]
fn a_cancel_file_or_a_removed_job_file_cancels_a_running_job_after_a_checkpoint() {
    let _turn = heavy();
    let root = tempfile::tempdir().unwrap();
    write_idx_dataset(&root.path().join("data"), 300, 100);
    let service = Service::start(root.path());
    // No checkpoints by epoch or step: the only one there can be is the cancel's own.
    let mut long = job(&root.path().join("data"), 200, 9, 32);
    long["checkpoint"]["every_epochs"] = 0.into();
    service.submit("long", &long);
    service.wait_for("long", |s| s["state"] == "running" && s["epoch"].as_u64() >= Some(1));
    std::fs::write(service.jobs.join("long.cancel"), "").unwrap();
    let s = service.wait_for("long", state_is("cancelled"));
    let reason = s["reason"].as_str().unwrap();
    let step: u64 = reason.rsplit("at step ").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{s}"));
    assert!(step > 9, "cancelled after the first epoch: {s}");
    let checkpoints = service.runs.join("long/checkpoints");
    let names: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("step-{step:010}")], "one checkpoint, at the step the cancel stopped at");

    // removing the job file cancels too
    service.submit("long2", &job(&root.path().join("data"), 200, 9, 32));
    service.wait_for("long2", |s| s["state"] == "running" && s["epoch"].as_u64() >= Some(1));
    std::fs::remove_file(service.jobs.join("long2.json")).unwrap();
    let s = service.wait_for("long2", state_is("cancelled"));
    assert!(s["reason"].as_str().unwrap().contains("checkpoint"), "{s}");
    service.signal("TERM");
    assert!(service.wait_exit().success());
}

#[test]
fn sigterm_checkpoints_and_a_new_serve_resumes_to_the_uninterrupted_result() {
    let _turn = heavy();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 600, 100);
    // 20 epochs: SIGTERM follows the first, so the stop lands far from the end on any machine.
    let spec = job(&data, 20, 12, 96);

    // the uninterrupted run, with `layerwise train`
    let config = root.path().join("job.json");
    std::fs::write(&config, spec.to_string()).unwrap();
    let whole = root.path().join("whole");
    let out = Command::new(BIN).arg("train").arg(&config).arg("--run-dir").arg(&whole).output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let service = Service::start(root.path());
    service.submit("job", &spec);
    service.wait_for("job", |s| s["state"] == "running" && s["epoch"].as_u64() >= Some(1));
    service.signal("TERM");
    assert!(service.wait_exit().success(), "serve exits 0 after SIGTERM");
    let service = Service {
        child: Command::new("true").spawn().unwrap(),
        jobs: root.path().join("jobs"),
        runs: root.path().join("runs"),
    };
    let s = service.status("job");
    assert_eq!(s["state"], "stopped", "{s}");
    let stopped_at = s["step"].as_u64().unwrap();
    assert!(stopped_at < 240, "stopped mid-training, at step {stopped_at}");
    drop(service);

    let service = Service::start(root.path());
    service.wait_for("job", state_is("done"));
    service.signal("TERM");
    assert!(service.wait_exit().success());

    let what = format!("after SIGTERM at step {stopped_at} and resume");
    assert_same_newest_checkpoint(&whole, &root.path().join("runs/job"), &what);
}

#[test]
fn every_config_in_configs_validates() {
    let configs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert!(configs.len() >= 20, "the paper's recipes are there");
    let out = Command::new(BIN).arg("validate").arg("--no-data").args(&configs).output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // the Fashion-MNIST ones fully, data files included (Debian's package is installed)
    let fashion: Vec<&PathBuf> = configs
        .iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("fashion") || p.ends_with("demo.json"))
        .collect();
    let out = Command::new(BIN).arg("validate").args(&fashion).output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // and a bad one is named with its key
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"optim": {"lr": -1}}"#).unwrap();
    let out = Command::new(BIN).arg("validate").arg("--no-data").arg(&bad).output_within();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("optim.lr"));
    // --set applies to every config named, and the estimate follows it: bf16 copies and a
    // larger batch need more.
    let estimate = |sets: &[&str]| -> f64 {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(repo_root()).args(["validate", "--no-data", "configs/demo.json"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output_within();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}");
        let gib =
            text.split("needs about ").nth(1).and_then(|t| t.split(' ').next()).unwrap_or_else(|| panic!("{text}"));
        gib.parse().unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let base = estimate(&[]);
    assert!(base > 0.0);
    assert!(estimate(&["model.bf16=true"]) > base);
    assert!(estimate(&["train.batch_size=1024"]) > base);
    let out =
        Command::new(BIN).arg("validate").arg("--no-data").arg(&bad).args(["--set", "optim.lr=0.1"]).output_within();
    assert!(out.status.success(), "--set mends the bad key: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn job_files_with_names_outside_their_folder_links_or_too_large_are_refused_and_the_service_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 300, 100);
    let service = Service::start(root.path());
    std::fs::create_dir_all(&service.jobs).unwrap();
    // job names "..", "." and one with a space
    for file in ["...json", "..json", "bad name.json"] {
        std::fs::write(service.jobs.join(file), job(&data, 1, 2, 16).to_string()).unwrap();
    }
    // A link to a job elsewhere is not followed; a job file over 1 MiB is refused unread.
    let elsewhere = root.path().join("elsewhere.json");
    std::fs::write(&elsewhere, job(&data, 1, 2, 16).to_string()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, service.jobs.join("linked.json")).unwrap();
    let padded = format!("{}{}", job(&data, 1, 2, 16), " ".repeat(1 << 20));
    std::fs::write(service.jobs.join("huge.json"), padded).unwrap();
    service.submit("good", &job(&data, 1, 2, 16));
    service.wait_for("good", state_is("done"));
    let huge = service.wait_for("huge", state_is("failed"));
    assert!(huge["reason"].as_str().unwrap().contains("a config is at most 1048576 bytes"), "{huge}");
    // Every file was scanned before "good" was admitted: nothing outside runs/good, and
    // the link had no run.
    let mut runs: Vec<String> = std::fs::read_dir(&service.runs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort();
    assert_eq!(runs, vec!["good".to_string(), "huge".to_string()]);
    for stray in ["status.json", "config.json", "metrics.jsonl", "checkpoints"] {
        assert!(!root.path().join(stray).exists() && !service.runs.join(stray).exists(), "{stray} written outside");
    }
}

#[test]
fn a_job_file_copied_in_two_halves_runs_once_it_is_complete() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 300, 100);
    let service = Service::start(root.path());
    std::fs::create_dir_all(&service.jobs).unwrap();
    let text = serde_json::to_string_pretty(&job(&data, 1, 2, 16)).unwrap();
    let (first, rest) = text.split_at(text.len() / 2);
    let path = service.jobs.join("slow.json");
    std::fs::write(&path, first).unwrap();
    // Half a file that stood still is refused, with the reason...
    let s = service.wait_for("slow", state_is("failed"));
    assert!(s["reason"].as_str().unwrap().contains("not valid JSON"), "{s}");
    // ...and read again when the rest arrives: it runs.
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(rest.as_bytes()).unwrap();
    let s = service.wait_for_state("slow", state_is("done"), false);
    assert_eq!(s["step"].as_u64(), Some(2), "{s}");
}

#[test]
fn a_job_running_whenever_the_service_died_is_failed_past_the_limit_and_the_service_goes_on() {
    let _turn = heavy();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 300, 100);
    let mut service = Service::start_with(root.path(), &["--max-crash-restarts", "1"]);
    service.submit("long", &job(&data, 500, 8, 32));
    for restart in 1..=2 {
        // the job has made progress under this service (its epoch count grows), then the service dies
        let before = service.status("long")["epoch"].as_u64().unwrap_or(0);
        service.wait_for("long", |s| s["state"] == "running" && s["epoch"].as_u64() > Some(before));
        let _ = service.child.kill();
        let _ = service.child.wait();
        service = Service::start_with(root.path(), &["--max-crash-restarts", "1"]);
        if restart == 1 {
            // within the limit: resumed
            service.wait_for("long", |s| s["state"] == "running" && s["epoch"].as_u64() > Some(before + 1));
        }
    }
    let s = service.wait_for("long", state_is("failed"));
    assert!(s["reason"].as_str().unwrap().contains("not resumed again"), "{s}");
    service.submit("next", &job(&data, 1, 2, 16));
    service.wait_for("next", state_is("done"));
}

#[test]
fn a_panic_in_a_jobs_setup_fails_that_job_frees_its_device_and_the_service_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 300, 100);
    let (jobs, runs) = (root.path().join("jobs"), root.path().join("runs"));
    // The test build's hook: the setup of the run in folder "boom" panics.
    let child = Command::new(BIN)
        .env("LAYERWISE_TEST_SETUP_PANIC", "boom")
        .args(["serve", "--scan-every", "0.1", "--stop-timeout", "600", "--jobs"])
        .arg(&jobs)
        .arg("--runs")
        .arg(&runs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let service = Service { child, jobs, runs };
    service.submit("boom", &job(&data, 1, 2, 16));
    let s = service.wait_for("boom", state_is("failed"));
    assert!(s["reason"].as_str().unwrap().contains("injected panic in the setup"), "{s}");
    // the CPU it held is free again: the next job runs on it
    service.submit("next", &job(&data, 1, 2, 16));
    service.wait_for("next", state_is("done"));
    // and a stop does not wait for the dead job (the stop timeout is 600 s)
    service.signal("TERM");
    let mut service = service;
    let mut log = String::new();
    std::io::Read::read_to_string(service.child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(service.child.wait().unwrap().success());
    assert!(!log.contains("panicked at"), "the panic is one error line, not stderr noise:\n{log}");
    assert_eq!(log.matches("injected panic in the setup").count(), 1, "logged once:\n{log}");
}

/// One request over a raw connection: the status line's code (0 when the server closed
/// the connection without one).
fn http_status(addr: &str, request: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let _ = s.write_all(request.as_bytes());
    let mut head = Vec::new();
    let _ = s.read_to_end(&mut head);
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// `serve --http` beyond loopback: /metrics parses with the official Prometheus client's
/// OpenMetrics parser, with the service's and the job's families, their types and labels;
/// a request without the secret as a bearer token, an unknown path, a write, a huge head
/// and a thousand idle connections get an HTTP error or a closed connection, and the
/// service goes on training and answering.
#[test]
fn serve_exposes_prometheus_metrics_and_refuses_bad_requests() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 300, 100);
    let secret = "a-metrics-secret-of-enough-bytes";
    let (jobs, runs) = (root.path().join("jobs"), root.path().join("runs"));
    let child = Command::new(BIN)
        .args(["serve", "--scan-every", "0.1", "--http", "0.0.0.0:0"])
        .arg("--jobs")
        .arg(&jobs)
        .arg("--runs")
        .arg(&runs)
        .env("LAYERWISE_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let service = Service { child, jobs, runs };
    let addr_file = service.runs.join(".http.addr");
    let port = wait_until("serve's .http.addr", || std::fs::read_to_string(&addr_file).ok())
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let addr = format!("127.0.0.1:{port}");
    // A thousand connections that say nothing, held while a job trains.
    let idle: Vec<std::net::TcpStream> = (0..1000).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    service.submit("watched", &job(&data, 2, 3, 16));
    service.wait_for("watched", state_is("done"));
    drop(idle);
    // Once the listener has seen them close, it answers again (until then a new connection
    // finds every slot taken and is closed at once).
    let page = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    wait_until("the listener to answer after the idle connections close", || {
        (http_status(&addr, page) == 200).then_some(())
    });
    let get = |path: &str, auth: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let bearer = format!("Authorization: Bearer {secret}\r\n");
    assert_eq!(http_status(&addr, &get("/metrics", "")), 401, "no token");
    assert_eq!(http_status(&addr, &get("/metrics", "Authorization: Bearer not-the-secret\r\n")), 401);
    assert_eq!(http_status(&addr, &get("/nothing", &bearer)), 404);
    // The dashboard's API: behind the token too; a job is named, never a path.
    assert_eq!(http_status(&addr, &get("/api/jobs", "")), 401);
    assert_eq!(http_status(&addr, &get("/", "")), 200, "the page holds no data: it asks for the token");
    assert_eq!(http_status(&addr, &get("/api/jobs", &bearer)), 200);
    assert_eq!(http_status(&addr, &get("/api/curves/watched.svg", &bearer)), 200);
    for path in ["/api/curves/../watched.svg", "/api/curves/..%2Fwatched.svg", "/api/curves/nobody.svg"] {
        assert_eq!(http_status(&addr, &get(path, &bearer)), 404, "{path}");
    }
    let post = format!("POST /metrics HTTP/1.1\r\nHost: x\r\n{bearer}Content-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(http_status(&addr, &post), 405);
    // A client that sends half a request head and then nothing is cut off (the head must
    // come within 10 s), never answered.
    assert_ne!(http_status(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n"), 200, "a slow client");
    let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(64 << 10));
    assert!(matches!(http_status(&addr, &huge), 431 | 400 | 0), "a huge head is refused");

    let python = std::env::var("LAYERWISE_TORCH_VENV").map_or("python3".into(), |v| format!("{v}/bin/python3"));
    let check = Command::new(python)
        .arg(repo_root().join("scripts/metrics_check.py"))
        .arg(format!("http://{addr}/metrics"))
        .arg(secret)
        .output()
        .expect("run scripts/metrics_check.py (scripts/setup.sh installs prometheus_client)");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let got: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert!(got["content_type"].as_str().unwrap().starts_with("application/openmetrics-text"), "{got}");
    let f = &got["families"];
    for (family, labels) in [
        ("layerwise_jobs", vec!["state"]),
        ("layerwise_job_state", vec!["job", "state"]),
        ("layerwise_job_epoch", vec!["job"]),
        ("layerwise_job_images_per_second", vec!["job"]),
        ("layerwise_job_data_wait_seconds", vec!["job"]),
        ("layerwise_job_skipped_images", vec!["job"]),
        ("layerwise_job_error_ratio", vec!["job", "set"]),
        ("layerwise_job_loss", vec!["job", "set"]),
        ("layerwise_job_last_checkpoint_age_seconds", vec!["job"]),
        ("layerwise_job_last_checkpoint_duration_seconds", vec!["job"]),
        ("layerwise_layer_loss", vec!["job", "layer", "loss"]),
        ("layerwise_layer_error_ratio", vec!["job", "layer"]),
        ("layerwise_stage_utilisation_ratio", vec!["device", "host", "job", "stage"]),
        ("layerwise_stage_wait_input_seconds", vec!["device", "host", "job", "stage"]),
    ] {
        assert_eq!(f[family]["type"], "gauge", "{family}: {got}");
        assert_eq!(f[family]["labels"], serde_json::json!(labels), "{family}");
    }
    let sample = |family: &str, labels: serde_json::Value| {
        f[family]["samples"].as_array().unwrap().iter().find(|s| s[1] == labels).map(|s| s[2].as_f64().unwrap())
    };
    assert_eq!(sample("layerwise_jobs", serde_json::json!({"state": "done"})), Some(1.0));
    assert_eq!(f["layerwise_job_crash_restarts"]["type"], "counter", "{got}");
    assert_eq!(sample("layerwise_job_crash_restarts", serde_json::json!({"job": "watched"})), Some(0.0));
    assert_eq!(sample("layerwise_job_epoch", serde_json::json!({"job": "watched"})), Some(2.0));
    assert_eq!(sample("layerwise_job_state", serde_json::json!({"job": "watched", "state": "done"})), Some(1.0));
    let metrics = std::fs::read_to_string(service.runs.join("watched/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let test_error = sample("layerwise_job_error_ratio", serde_json::json!({"job": "watched", "set": "test"})).unwrap();
    assert!((test_error - last["test_error"].as_f64().unwrap() / 100.0).abs() < 1e-12, "{test_error} {last}");
}

/// The dashboard in a real headless browser (Debian's chromium driven by Playwright,
/// `scripts/dashboard_check.py`) while a job trains: its row appears, its curve gains an
/// epoch while the page watches, the page fits a phone's width, and the console shows no
/// error.
#[test]
fn the_dashboard_shows_a_training_job_and_its_curve_grows_in_a_real_browser() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_idx_dataset(&data, 300, 100);
    let service = Service::start_with(root.path(), &["--http", "127.0.0.1:0"]);
    let addr_file = service.runs.join(".http.addr");
    service.submit("watched", &job(&data, 100_000, 3, 16));
    let addr = wait_until("serve's .http.addr", || std::fs::read_to_string(&addr_file).ok());
    let python = std::env::var("LAYERWISE_TORCH_VENV").map_or("python3".into(), |v| format!("{v}/bin/python3"));
    let check = Command::new(python)
        .arg(repo_root().join("scripts/dashboard_check.py"))
        .arg(format!("http://{}/", addr.trim()))
        .arg("watched")
        .output_within();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}{}", String::from_utf8_lossy(&check.stderr));
    let got: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert!(got["later"].as_u64() > got["first"].as_u64(), "{got}");
    assert_eq!(got["state"], "running", "{got}");
    assert!(got["log"].as_array().is_some_and(|l| !l.is_empty()), "{got}");
    std::fs::write(service.jobs.join("watched.cancel"), "").unwrap();
}
