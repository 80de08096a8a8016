//! The worker pool of a local cluster: `shoal worker list` and `add`, and a worker that loses
//! every coordinator for a whole lease stopping its task (and coming back as a new worker).

mod common;
use common::*;
use std::time::Duration;

/// A live process (a zombie waiting to be reaped by init has no command line).
fn running(pid: i64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn pids_alive(pids: &[i64]) -> usize {
    pids.iter().filter(|&&p| running(p)).count()
}

#[test]
fn worker_add_grows_the_pool_and_down_stops_every_worker() {
    let c = UpCluster::start(2);
    let list = json(&mut c.cmd(&["worker", "list", "--json"]));
    let workers = list.as_array().unwrap();
    assert_eq!(workers.len(), 2, "{list}");
    assert!(workers.iter().all(|w| w["state"] == "idle" && w["id"].is_string() && w["pid"].as_i64().unwrap() > 0), "{list}");

    let added = json(&mut c.cmd(&["worker", "add", "--count", "2", "--json"]));
    assert_eq!(added["added"].as_array().unwrap().len(), 2, "{added}");
    let list = json(&mut c.cmd(&["worker", "list", "--json"]));
    let live: Vec<i64> = list.as_array().unwrap().iter().filter(|w| w["state"] == "idle").map(|w| w["pid"].as_i64().unwrap()).collect();
    assert_eq!(live.len(), 4, "{list}");
    for a in added["added"].as_array().unwrap() {
        assert!(live.contains(&a["pid"].as_i64().unwrap()), "added worker {a} is not registered: {list}");
    }

    // The added workers take jobs like the others: a 4-worker job runs on them.
    c.import_mnist("mnist");
    let spec = mnist_spec("mnist", 1, 2048, 5, "[64]").replace("workers = 2", "workers = 4");
    let job = c.submit_follow(&c.write_spec("four.toml", &spec));
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["results"].as_array().unwrap().len(), 4, "{job}");

    let e = fails(&mut c.cmd(&["worker", "add", "--count", "0"]));
    assert!(e.contains("--count"), "{e}");
    ok(&mut c.cmd(&["down"]));
    wait_for("every worker to stop", Duration::from_secs(15), || (pids_alive(&live) == 0).then_some(()));
}

#[test]
fn a_worker_cut_off_from_the_coordinators_stops_its_task_and_the_job_recovers() {
    let c = UpCluster::start_with(&["--workers", "2", "--lease-ms", "1000"]);
    c.import_mnist("mnist");
    let spec = c.write_spec("long.toml", &mnist_spec("mnist", 12, 8000, 3, "[256]"));
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(&spec))["id"].to_string();
    c.wait_job(&id, "training to be under way", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 5);

    // Freeze the only coordinator for three leases: no worker can reach any coordinator.
    let status = json(&mut c.cmd(&["status", "--json"]));
    let pid = status["coordinators"][0]["pid"].as_i64().unwrap() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_millis(3000));
    let logs: Vec<String> = (1..=2).map(|n| std::fs::read_to_string(c.dir().join(format!("workers/{n}/log"))).unwrap_or_default()).collect();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for (n, log) in logs.iter().enumerate() {
        assert!(log.contains("no coordinator answered for a whole lease"), "worker {} kept training: {log}", n + 1);
    }

    // The coordinator declares the silent ids lost, the workers come back as new ones, and the
    // job continues (from its last checkpoint, or the start) to the end.
    let job = c.wait_end(&id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["restarts"].as_u64().unwrap() >= 1, "{job}");
    assert!(job["test_accuracy"].as_f64().unwrap() > 0.85, "{job}");
}

#[test]
fn a_job_goes_on_with_fewer_workers_and_waits_below_its_minimum() {
    let c = UpCluster::start_with(&["--workers", "3", "--lease-ms", "1000"]);
    c.import_mnist("mnist");
    let spec = mnist_spec("mnist", 40, 8000, 3, "[256]").replace("workers = 2", "workers = 2\nmin_workers = 2\nmax_workers = 3")
        + "[checkpoint]\nevery_steps = 25\n";
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec("pool.toml", &spec)))["id"].to_string();
    let job = c.wait_job(&id, "the job on all three workers", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 30);
    assert_eq!(job["world_size"], 3, "max_workers free: it takes them: {job}");

    let pid_of = |worker: &serde_json::Value| {
        let list = json(&mut c.cmd(&["worker", "list", "--json"]));
        list.as_array().unwrap().iter().find(|w| w["id"] == *worker).unwrap()["pid"].as_i64().unwrap() as i32
    };
    // Remove a busy one: it exits, and the job goes on, in memory, on the two that are left.
    let removed = job["workers"][2].as_str().unwrap().to_string();
    let victim = pid_of(&job["workers"][2]);
    let out = json(&mut c.cmd(&["worker", "remove", &removed, "--json"]));
    assert_eq!(out["pid"], victim, "{out}");
    assert!(!running(victim as i64), "the removed worker still runs");
    let job = c.wait_job(&id, "the job on two workers", Duration::from_secs(60), |j| j["state"] == "running" && j["world_size"] == 2);
    assert!(job["restarts"].as_u64().unwrap() >= 1, "{job}");
    assert!(!job["workers"].as_array().unwrap().iter().any(|w| *w == removed.as_str()), "{job}");
    let e = fails(&mut c.cmd(&["worker", "remove", "w999"]));
    assert!(e.contains("no worker w999"), "{e}");

    // Lose another (SIGKILL): one is fewer than min_workers, so the job waits in the queue...
    let victim = pid_of(&job["workers"][1]);
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    c.wait_job(&id, "the job to wait for workers", Duration::from_secs(30), |j| j["state"] == "queued");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.job(&id)["state"], "queued", "it must not start below min_workers");
    // ...until a worker is added.
    ok(&mut c.cmd(&["worker", "add"]));
    let job = c.wait_end(&id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["world_size"], 2, "{job}");
    assert!(job["test_accuracy"].as_f64().unwrap() > 0.85, "{job}");
    // Every generation is on record: why it began, on whom, from which step.
    let m = job["membership"].as_array().unwrap();
    let causes: Vec<&str> = m.iter().map(|c| c["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["start", "removed", "lost"], "{job}");
    let sizes: Vec<usize> = m.iter().map(|c| c["workers"].as_array().unwrap().len()).collect();
    assert_eq!(sizes, [3, 2, 2], "{job}");
    assert!(m.windows(2).all(|w| w[0]["generation"].as_u64() < w[1]["generation"].as_u64() && w[0]["step"].as_u64() <= w[1]["step"].as_u64()), "{job}");
    assert!(m[1]["step"].as_u64().unwrap() > 30, "the second generation goes on from where the first stopped: {job}");
}

#[test]
fn a_killed_worker_is_found_by_its_peers_and_the_job_goes_on_without_it() {
    // The default lease (5 s): the job must move on well before it.
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let spec = mnist_spec("mnist", 40, 8000, 3, "[256]").replace("workers = 2", "workers = 2\nmin_workers = 1") + "[checkpoint]\nevery_steps = 25\n";
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec("kill.toml", &spec)))["id"].to_string();
    let job = c.wait_job(&id, "training under way", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 30);
    let list = json(&mut c.cmd(&["worker", "list", "--json"]));
    let victim = list.as_array().unwrap().iter().find(|w| w["id"] == job["workers"][1]).unwrap()["pid"].as_i64().unwrap() as i32;
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let moved = c.wait_job(&id, "the job to move on without the dead worker", Duration::from_secs(30), |j| j["restarts"].as_u64().unwrap_or(0) >= 1 || j["state"] == "failed");
    assert_ne!(moved["state"], "failed", "a dead peer failed the job: {moved}");
    // The peers' report and the leader's probe moved it, not the lease running out (whose
    // cause reads "missed heartbeats"); how fast is measured in benches/, not asserted here.
    assert!(moved["restart_cause"].as_str().unwrap().contains("its peers lost it"), "{moved}");
    let job = c.wait_end(&id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["world_size"], 1, "{job}");
    let causes: Vec<&str> = job["membership"].as_array().unwrap().iter().map(|m| m["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["start", "lost"], "{job}");
}

#[test]
fn a_job_grows_toward_max_workers_when_a_worker_is_added() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let spec = mnist_spec("mnist", 40, 8000, 3, "[256]").replace("workers = 2", "workers = 2\nmax_workers = 3") + "[checkpoint]\nevery_steps = 25\n";
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec("grow.toml", &spec)))["id"].to_string();
    c.wait_job(&id, "training on two workers", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 30);
    ok(&mut c.cmd(&["worker", "add"]));
    c.wait_job(&id, "the job on three workers", Duration::from_secs(60), |j| j["state"] == "running" && j["world_size"] == 3);
    let job = c.wait_end(&id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["world_size"], 3, "{job}");
    let m = job["membership"].as_array().unwrap();
    let causes: Vec<&str> = m.iter().map(|c| c["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["start", "joined"], "{job}");
    // It joins at once, at a step boundary: the state comes from a peer, not a checkpoint.
    assert!(m[1]["step"].as_u64().unwrap() > 30, "{job}");
    assert_eq!(job["continued_from"], m[1]["step"], "it joins in memory: {job}");
    assert!(job["test_accuracy"].as_f64().unwrap() > 0.85, "{job}");
}
