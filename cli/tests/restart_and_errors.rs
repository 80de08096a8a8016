//! Durability across a coordinator restart, cancellation, and bad input: each bad input gets
//! a clear error and changes nothing.

mod common;
use std::time::Duration;

use common::*;

const TINY_SPEC: &str = r#"
name = "tiny"
[model]
kind = "mlp"
hidden = [16]
[dataset]
name = "tiny"
train = [0, 448]
test = [448, 512]
[training]
epochs = 2
batch_size = 32
[training.optimizer]
kind = "adamw"
lr = 0.01
[cluster]
workers = 1
"#;

fn start_coordinator(tmp: &std::path::Path, log: &str) -> (Proc, String) {
    let addr_file = tmp.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let p = Proc::spawn(
        shoal()
            .args(["serve", "coordinator", "--insecure", "--listen", "127.0.0.1:0", "--data"])
            .arg(tmp.join("coord"))
            .arg("--store")
            .arg(tmp.join("store"))
            .arg("--addr-file")
            .arg(&addr_file),
        &tmp.join(log),
    );
    let addr = wait_for("coordinator address", Duration::from_secs(20), || std::fs::read_to_string(&addr_file).ok());
    (p, addr)
}

#[test]
fn coordinator_restart_keeps_datasets_and_finished_jobs() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_tiny_idx(tmp.path());
    let spec = tmp.path().join("tiny.toml");
    std::fs::write(&spec, TINY_SPEC).unwrap();

    let (mut coord, addr) = start_coordinator(tmp.path(), "coord1.log");
    let ep = |a: &str| vec!["--endpoints".to_string(), a.to_string()];
    let mut worker = Proc::spawn(
        shoal().args(["serve", "worker", "--insecure", "--endpoints", &addr, "--threads", "1", "--store"]).arg(tmp.path().join("store")),
        &tmp.path().join("worker.log"),
    );
    ok(shoal().args(["data", "import", "tiny"]).args(&files).args(ep(&addr)));
    let job = json(shoal().args(["job", "submit", "--follow", "--json"]).arg(&spec).args(ep(&addr)));
    assert_eq!(job["state"], "succeeded", "{job}");
    let acc = job["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "the tiny task is learnable; accuracy {acc}");

    // Kill -9: no graceful shutdown, then start again on the same folder.
    coord.kill();
    worker.kill();
    let (_coord, addr2) = start_coordinator(tmp.path(), "coord2.log");
    let datasets = json(shoal().args(["data", "list", "--json"]).args(ep(&addr2)));
    assert_eq!(datasets.as_array().unwrap().len(), 1, "{datasets}");
    assert_eq!(datasets[0]["name"], "tiny");
    assert_eq!(datasets[0]["records"], 512);
    let again = json(shoal().args(["job", "status", "1", "--json"]).args(ep(&addr2)));
    for key in ["state", "step", "epoch", "loss", "test_accuracy", "results", "workers"] {
        assert_eq!(again[key], job[key], "{key} changed across the restart");
    }
    // And it still takes writes: the next slice is version 2.
    let v2 = json(shoal().args(["data", "append", "tiny", "--json"]).args(&files).args(ep(&addr2)));
    assert_eq!(v2["version"], 2);
}

#[test]
fn bad_input_is_rejected_clearly_and_changes_nothing() {
    let c = UpCluster::start(0);
    let tmp = c.tmp.path();
    let files = write_tiny_idx(tmp);
    ok(c.cmd(&["data", "import", "tiny"]).args(&files));

    // A file that is not IDX.
    let notes = tmp.join("notes.txt");
    std::fs::write(&notes, "these are not the digits you are looking for").unwrap();
    let e = fails(c.cmd(&["data", "import", "other"]).arg(&notes).arg(&files[1]));
    assert!(e.contains("notes.txt") && e.contains("not an IDX file"), "{e}");
    assert!(!c.store().join("datasets/other").exists(), "a failed import left files behind");

    // Specs with an unknown model kind, a negative learning rate, a missing dataset.
    let submit = |text: String| {
        let p = c.write_spec("bad.toml", &text);
        fails(c.cmd(&["job", "submit"]).arg(p))
    };
    let e = submit(TINY_SPEC.replace("kind = \"mlp\"", "kind = \"transformer\""));
    assert!(e.contains("model.kind") && e.contains("transformer"), "{e}");
    let e = submit(TINY_SPEC.replace("lr = 0.01", "lr = -0.01"));
    assert!(e.contains("training.optimizer.lr"), "{e}");
    let e = submit(TINY_SPEC.replace("name = \"tiny\"\ntrain", "name = \"no-such-data\"\ntrain"));
    assert!(e.contains("no-such-data") && e.contains("does not exist"), "{e}");
    let e = submit(TINY_SPEC.replace("epochs = 2", "epochs = 2\nwarmup_steps = 5"));
    assert!(e.contains("warmup_steps"), "{e}");

    // A second `up` on a folder with a running cluster.
    let e = fails(&mut c.cmd(&["up", "--workers", "1"]));
    assert!(e.contains("already running"), "{e}");

    // Nothing changed: one dataset, no jobs, the cluster still answers.
    let ds = json(&mut c.cmd(&["data", "list", "--json"]));
    assert_eq!(ds.as_array().unwrap().len(), 1, "{ds}");
    let jobs = json(&mut c.cmd(&["job", "list", "--json"]));
    assert_eq!(jobs.as_array().unwrap().len(), 0, "{jobs}");
    let status = json(&mut c.cmd(&["status", "--json"]));
    assert_eq!(status["coordinators"][0]["role"], "leader");
    assert!(status["workers"].as_array().unwrap().is_empty());
}

#[test]
fn a_cancelled_job_stops_and_frees_its_workers() {
    let c = UpCluster::start(1);
    let files = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny"]).args(&files));
    // Long enough that it is still running when cancelled.
    let spec = c.write_spec("long.toml", &TINY_SPEC.replace("epochs = 2", "epochs = 100000"));
    let job = json(c.cmd(&["job", "submit", "--json"]).arg(&spec));
    let id = job["id"].to_string();
    wait_for("the job to run", Duration::from_secs(30), || {
        let j = json(&mut c.cmd(&["job", "status", &id, "--json"]));
        (j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let j = json(&mut c.cmd(&["job", "cancel", &id, "--json"]));
    assert_eq!(j["state"], "cancelled");
    let e = fails(&mut c.cmd(&["job", "cancel", &id]));
    assert!(e.contains("already cancelled"), "{e}");
    wait_for("the worker to be idle", Duration::from_secs(20), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        (s["workers"][0]["state"] == "idle").then_some(())
    });
    // The worker took the next job after the cancelled one.
    let next = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("short.toml", TINY_SPEC)));
    assert_eq!(next["state"], "succeeded", "{next}");
}

#[test]
fn a_worker_that_stops_heartbeating_is_declared_lost_and_its_job_waits_for_workers() {
    let c = UpCluster::start_with(&["--workers", "2", "--lease-ms", "1000"]);
    let files = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny"]).args(&files));
    let spec = TINY_SPEC.replace("epochs = 2", "epochs = 100000").replace("workers = 1", "workers = 2");
    let job = json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec("two.toml", &spec)));
    let id = job["id"].to_string();
    wait_for("the job to run", Duration::from_secs(30), || {
        let j = json(&mut c.cmd(&["job", "status", &id, "--json"]));
        (j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let status = json(&mut c.cmd(&["status", "--json"]));
    let victim = status["workers"][1].clone();
    let pid = victim["pid"].as_i64().unwrap() as i32;
    // SIGKILL: no goodbye, just silence.
    // SAFETY: signalling a process this test's cluster started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // The job goes back to the queue (to resume from its checkpoint), and waits there: one
    // worker is not enough for it.
    let queued = wait_for("the job to be requeued", Duration::from_secs(30), || {
        let j = json(&mut c.cmd(&["job", "status", &id, "--json"]));
        (j["state"] == "queued").then_some(j)
    });
    let cause = queued["restart_cause"].as_str().unwrap();
    assert!(cause.contains(victim["id"].as_str().unwrap()) && cause.contains("lost"), "{queued}");
    assert_eq!(queued["restarts"], 1, "{queued}");
    let status = json(&mut c.cmd(&["status", "--json"]));
    let states: Vec<&str> = status["workers"].as_array().unwrap().iter().map(|w| w["state"].as_str().unwrap()).collect();
    assert_eq!(states, vec!["idle", "lost"], "{status}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(json(&mut c.cmd(&["job", "status", &id, "--json"]))["state"], "queued");
    ok(&mut c.cmd(&["job", "cancel", &id]));
}
