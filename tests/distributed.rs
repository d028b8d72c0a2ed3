//! Stages in other processes, through the real binary on 127.0.0.1: a coordinator and
//! workers started by hand, a torchrun-style launch, a worker killed mid-run. Each waits on
//! events (the coordinator's address file, a checkpoint folder, a process's exit).

use std::process::{Command, Output, Stdio};

use layerwise_tests::{assert_same_newest_checkpoint, newest_checkpoint_name, wait_until, OutputWithin};

mod cluster_support;
use cluster_support::*;

#[test]
fn log_timestamps_are_read_as_the_instants_they_name() {
    let at = |secs: f64| std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs);
    assert_eq!(logged_at("2026-12-06T05:13:57.5Z  INFO a line"), at(1_796_534_037.5));
    assert_eq!(logged_at("2024-02-29T23:59:59.25Z"), at(1_709_251_199.25));
    assert_eq!(logged_at("1970-01-01T00:00:00.0Z"), at(0.0));
}

/// Three processes train to the single process's weights, bit for bit; a run begun in one
/// process resumes in three and the reverse, bit for bit too. Strangers on the port (a
/// wrong secret, bytes that are not the protocol) are refused and the run goes on.
#[test]
fn three_processes_train_and_resume_bit_identical_to_one() {
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let whole = reference();

    // Three processes, with strangers knocking first.
    let run = d.join("three");
    let (coordinator, addr) = coordinator(c, &run, &[PLACED], false);
    let wrong = worker(&addr, "w1", "not-the-secret-at-all").output();
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("wrong shared secret"), "{}", text(&wrong));
    {
        use std::io::{Read, Write};
        let mut junk = std::net::TcpStream::connect(&addr).unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let _ = junk.read_to_end(&mut Vec::new()); // until the coordinator hangs up
    }
    let workers = [worker(&addr, "w1", SECRET), worker(&addr, "w2", SECRET)];
    let out = coordinator.output();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("not a layerwise peer") && log.contains("wrong shared secret"), "{log}");
    assert!(log.contains("worker w1") && log.contains("runs stage(s) [1]"), "{log}");
    assert!(log.contains("registered from") && log.contains("(encrypted)"), "on by default: {log}");
    for w in workers {
        assert!(w.output().status.success());
    }
    assert_same_newest_checkpoint(whole, &run, "three processes against one");

    // Begun in one process (epoch 1 of 2), finished in three whose processes do not
    // encrypt (authenticated only); and the reverse, the job asking for encryption.
    let unencrypted = ["--encrypt", "off"];
    let one_then_three = d.join("one-then-three");
    let first = train(c, &one_then_three, &["train.epochs=1"], false).output_within();
    assert!(first.status.success(), "{}", text(&first));
    let out = placed_run_with(c, &one_then_three, &[], true, &unencrypted);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resuming from"), "{}", text(&out));
    assert!(text(&out).contains("link into stage 1 at") && text(&out).contains(": authenticated"), "{}", text(&out));
    assert_same_newest_checkpoint(whole, &one_then_three, "begun in one process, resumed in three");

    let three_then_one = d.join("three-then-one");
    let out = placed_run_with(c, &three_then_one, &["train.epochs=1", "pipeline.encrypt=true"], false, &unencrypted);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("link into stage 1 at") && text(&out).contains(": encrypted"), "{}", text(&out));
    let out = train(c, &three_then_one, &[], true).output_within();
    assert!(out.status.success() && text(&out).contains("resuming from"), "{}", text(&out));
    assert_same_newest_checkpoint(whole, &three_then_one, "begun in three processes, resumed in one");
}

/// Each stage's intra-op threads, from the coordinator's "on N stage(s): [0]@cpux2 ..." line.
fn stage_threads(log: &str) -> Vec<usize> {
    let line = log.lines().find(|l| l.contains(" stage(s): ")).expect("the coordinator's stages line");
    line.split(" stage(s): ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take_while(|t| !t.contains('='))
        .filter_map(|t| t.split_once('@'))
        .map(|(_, at)| at.rsplit('x').next().unwrap().parse().unwrap())
        .collect()
}

/// `auto` with `pipeline.workers`: one stage here and one on each worker named, the layers
/// split by their cost measured in each process, trained to the single process's weights bit for bit.
#[test]
fn an_auto_placement_spreads_over_the_workers_named_and_trains_as_one_process() {
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let whole = reference();
    let run = d.join("auto");
    let (coordinator, addr) = coordinator(c, &run, &[r#"pipeline.workers=["w1","w2"]"#], false);
    let workers = [worker(&addr, "w1", SECRET), worker(&addr, "w2", SECRET)];
    let out = coordinator.output();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("on 3 stage(s)"), "{log}");
    // The three processes are on one machine: their stages share its cores, and each
    // worker measured the layers on its own device with the threads its stage then had.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = stage_threads(&log);
    assert_eq!(threads.len(), 3, "{log}");
    assert!(threads.iter().sum::<usize>() <= cores.max(3), "{threads:?} threads on {cores} cores: {log}");
    for (w, t) in [("w1", threads[1]), ("w2", threads[2])] {
        assert!(log.contains(&format!("auto: {w} on cpu with {t} thread(s): ")), "{w}, {t} thread(s): {log}");
    }
    assert!(log.contains("worker w1") && log.contains("runs stage(s) [1]"), "{log}");
    assert!(log.contains("worker w2") && log.contains("runs stage(s) [2]"), "{log}");
    for w in workers {
        assert!(w.output().status.success());
    }
    assert_same_newest_checkpoint(whole, &run, "auto over two workers against one process");
}

/// kill -9 of a worker mid-run: the coordinator fails the run at once, naming the worker,
/// the other worker stops, the run's status says failed; a rerun with --resume (with a new
/// set of workers) ends where the uninterrupted run does.
#[test]
fn a_worker_killed_mid_run_fails_the_run_naming_it_and_resume_ends_identical() {
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let sets = INTERRUPTIBLE;
    let (whole, placed) = interruptible(&s);
    let run = d.join("killed");
    let (mut coordinator, addr) = coordinator(c, &run, &placed, false);
    let w1 = worker(&addr, "w1", SECRET);
    let mut w2 = worker(&addr, "w2", SECRET);
    wait_for_a_checkpoint(&run, &mut coordinator);
    let killed = std::time::SystemTime::now();
    w2.child().kill().unwrap(); // SIGKILL
    let _ = w2.child().wait();
    let out = coordinator.output();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    // Noticed by the closed socket, not by the heartbeat's silence (which says "no heartbeat
    // for 10 s" and cannot fire before 10 s have passed since the kill): the coordinator
    // logged the loss within that bound of the kill (its own timestamp, so the teardown
    // that follows does not count).
    assert!(
        log.contains("stage 2 failed") && log.contains("worker w2") && log.contains("lost: connection closed"),
        "{log}"
    );
    assert!(!log.contains("no heartbeat"), "{log}");
    let line = log.lines().find(|l| l.contains("lost: connection closed")).unwrap();
    let noticed = logged_at(line).duration_since(killed).unwrap_or_default();
    assert!(
        noticed < PEER_TIMEOUT,
        "the loss was logged {noticed:?} after the kill: the heartbeat's bound, not the socket's: {line}"
    );
    let w1 = w1.output();
    assert!(!w1.status.success(), "w1's job was aborted: {}", text(&w1));
    let status = std::fs::read_to_string(run.join("status.json")).unwrap();
    assert!(status.contains("failed") && status.contains("worker w2"), "{status}");
    // 600 training images in batches of 32: 19 steps an epoch, 76 in all.
    assert!(
        *newest_checkpoint_name(&run) < *"step-0000000076",
        "killed before the end: {}",
        newest_checkpoint_name(&run)
    );

    let out = placed_run(c, &run, &sets, true);
    assert!(out.status.success(), "{}", text(&out));
    assert_same_newest_checkpoint(&whole, &run, "after a worker was killed, resumed");
}

/// torchrun's way: every rank runs the same `train` line; the environment says which is
/// which. The layers spread over the three ranks; the result is the single process's.
#[test]
fn a_torchrun_style_launch_spreads_the_layers_over_the_ranks() {
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let whole = reference();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let run = d.join("ranks");
    let ranks: Vec<Proc> = (0..3)
        .map(|rank| {
            train(c, &run, &[], false)
                .env("WORLD_SIZE", "3")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("LAYERWISE_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .proc()
        })
        .collect();
    let outs: Vec<Output> = ranks.into_iter().map(|r| r.output()).collect();
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(o));
    }
    let log = text(&outs[0]);
    assert!(log.contains("worker rank1") && log.contains("worker rank2"), "{log}");
    assert!(log.contains("[0, 1]@cpu"), "rank 0 holds layers 0 and 1: {log}");
    assert_same_newest_checkpoint(whole, &run, "three ranks against one process");
}

/// `serve --listen`: a job placed on two workers loses one to kill -9; the job is marked
/// failed naming the worker, and the service goes on: the next job runs on the worker
/// that is left, which went back to waiting for work.
#[test]
fn serve_fails_a_job_whose_worker_dies_and_goes_on_with_the_next() {
    let s = setup();
    let root = s.dir.path();
    let (jobs, runs) = (root.join("jobs"), root.join("runs"));
    let mut serve = Command::new(BIN)
        .args(["serve", "--scan-every", "0.1", "--listen", "127.0.0.1:0", "--jobs"])
        .arg(&jobs)
        .arg("--runs")
        .arg(&runs)
        .env("LAYERWISE_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .proc();
    wait_for(&runs.join(".coordinator.addr"), &mut serve);
    let addr = std::fs::read_to_string(runs.join(".coordinator.addr")).unwrap().trim().to_string();
    let spawn = |name: &str| {
        Command::new(BIN)
            .args(["worker", "--coordinator", &addr, "--name", name])
            .env("LAYERWISE_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .proc()
    };
    let (w1, mut w2) = (spawn("w1"), spawn("w2"));
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&s.config).unwrap()).unwrap();
    config["train"]["epochs"] = 4.into();
    config["train"]["steps_per_epoch"] = 40.into();
    config["model"]["num_hidden"] = 256.into();
    config["checkpoint"]["every_steps"] = 2.into();
    let placed = |stages: serde_json::Value| {
        let mut c = config.clone();
        c["pipeline"]["placement"] = stages;
        c
    };
    let submit = |name: &str, job: &serde_json::Value| {
        std::fs::create_dir_all(&jobs).unwrap();
        let tmp = jobs.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_string(job).unwrap()).unwrap();
        std::fs::rename(tmp, jobs.join(format!("{name}.json"))).unwrap();
    };
    let status = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(runs.join(name).join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    let wait_state = |name: &str, serve: &mut Proc| -> serde_json::Value {
        wait_until(format_args!("job {name} to end"), || {
            let st = status(name);
            assert!(serve.running(), "serve exited");
            (st["state"] == "done" || st["state"] == "failed").then_some(st)
        })
    };
    submit(
        "a-two-workers",
        &placed(serde_json::json!([
            {"layers": [0], "device": "cpu"}, {"layers": [1, 2], "device": "w1/cpu"}, {"layers": [3], "device": "w2/cpu"}
        ])),
    );
    let run = runs.join("a-two-workers");
    wait_for_a_checkpoint(&run, &mut serve);
    w2.child().kill().unwrap();
    let _ = w2.child().wait();
    let st = wait_state("a-two-workers", &mut serve);
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["reason"].as_str().unwrap().contains("worker w2"), "{st}");

    submit(
        "b-one-worker",
        &placed(serde_json::json!([{"layers": [0, 1], "device": "cpu"}, {"layers": [2, 3], "device": "w1/cpu"}])),
    );
    let st = wait_state("b-one-worker", &mut serve);
    assert_eq!(st["state"], "done", "the service and w1 went on: {st}");
    assert_eq!(st["step"], 76, "every step of 4 epochs of 19: {st}");

    // Two jobs that want w1, one placed on it, one `auto` over it: they take turns (the
    // second is not started while the first holds w1, and so is not refused as busy).
    let mut on_w1 = placed(serde_json::json!([{"layers": [0, 1, 2, 3], "device": "w1/cpu"}]));
    on_w1["train"]["epochs"] = 1.into();
    submit("c-on-w1", &on_w1);
    let mut auto = config.clone();
    auto["train"]["epochs"] = 1.into();
    auto["pipeline"]["workers"] = serde_json::json!(["w1"]);
    submit("d-auto-over-w1", &auto);
    for name in ["c-on-w1", "d-auto-over-w1"] {
        let st = wait_state(name, &mut serve);
        assert_eq!(st["state"], "done", "{name}: {st}");
    }

    assert!(Command::new("kill").args(["-TERM", &serve.child().id().to_string()]).status().unwrap().success());
    assert!(wait_until("serve to exit", || serve.child().try_wait().unwrap()).success());
    drop(w1); // a persistent worker: killed
}

/// A worker that hangs (SIGSTOP: its sockets stay open, it says nothing) is lost after
/// PEER_TIMEOUT (10 s) of silence: the run fails naming it, and the other worker stops.
#[test]
fn a_hung_worker_is_noticed_by_its_silence_and_the_run_fails_naming_it() {
    let s = setup();
    let (c, d) = (&s.config, s.dir.path());
    let run = d.join("hung");
    let sets = ["train.epochs=4", "model.num_hidden=256", "checkpoint.every_steps=2", PLACED];
    let (mut coordinator, addr) = coordinator(c, &run, &sets, false);
    let w1 = worker(&addr, "w1", SECRET);
    let mut w2 = worker(&addr, "w2", SECRET);
    wait_for_a_checkpoint(&run, &mut coordinator);
    let pid = w2.child().id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let out = coordinator.output();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("worker w2") && log.contains("no heartbeat for 10 s"), "{log}");
    assert!(!w1.output().status.success(), "w1's job was aborted");
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
}

/// A worker that never comes: after `--worker-wait` the run fails naming it, and the run
/// directory says so (a coordinator never waits for good).
#[test]
fn a_worker_that_never_registers_fails_the_run_after_the_wait_naming_it() {
    let s = setup();
    let run = s.dir.path().join("ghost");
    let placement = r#"pipeline.placement=[{"layers":[0,1],"device":"cpu"},{"layers":[2,3],"device":"ghost/cpu"}]"#;
    let out = train(&s.config, &run, &[placement], false)
        .args(["--listen", "127.0.0.1:0", "--worker-wait", "1"])
        .output_within();
    assert!(!out.status.success());
    let log = text(&out);
    assert!(log.contains("[\"ghost\"] did not register") && log.contains("within 1 s"), "{log}");
    let status = std::fs::read_to_string(run.join("status.json")).unwrap();
    assert!(status.contains("\"failed\"") && status.contains("ghost"), "{status}");
}

/// `train --http` as a coordinator of two workers: while it trains, /metrics counts the
/// bytes each link carried and says how long ago each worker was last heard.
#[test]
fn metrics_count_link_bytes_and_worker_heartbeats_while_a_placed_run_trains() {
    use std::io::{Read, Write};
    let s = setup();
    let run = s.dir.path().join("watched");
    let sets = ["train.epochs=1000", "checkpoint.every_steps=2", "model.num_hidden=64", PLACED];
    let (mut coordinator, addr) = coordinator_with(&s.config, &run, &sets, false, &["--http", "127.0.0.1:0"]);
    let _workers = [worker(&addr, "w1", SECRET), worker(&addr, "w2", SECRET)];
    wait_for_a_checkpoint(&run, &mut coordinator);
    wait_for(&run.join("http.addr"), &mut coordinator);
    let http = std::fs::read_to_string(run.join("http.addr")).unwrap().trim().to_string();
    let mut c = std::net::TcpStream::connect(&http).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let value = |prefix: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // The coordinator holds stage 0: it sends into stage 1 (w1) and hears w1 and w2.
    let sent = value(r#"layerwise_link_bytes_total{job="watched",stage="1",direction="sent"}"#);
    assert!(sent > 0.0, "{text}");
    for w in ["w1", "w2"] {
        let age = value(&format!(r#"layerwise_worker_heartbeat_age_seconds{{worker="{w}"}}"#));
        assert!((0.0..PEER_TIMEOUT.as_secs_f64()).contains(&age), "{w}: {age}");
    }
}
