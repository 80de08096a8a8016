//! Elastic pools that keep the survivors: a lost worker and an added one change the job's
//! generation, the workers carry the state over in memory (a joining worker gets it from a
//! peer), every epoch still trains each record exactly once, and with `[training] lanes`
//! the final parameters are bitwise those of a fault-free run on any number of workers.

mod common;
use common::*;
use shoal_core::rng::RecordDigest;
use std::time::Duration;

/// Slows every step a little, so that a test can act mid-epoch.
const SLOW: (&str, &str) = ("SHOAL_FAILPOINTS", "step-delay-ms=25");

/// 4096 training records, batch 128 (32 steps an epoch, every record each epoch), 8 lanes.
fn lanes_spec(workers: &str) -> String {
    mnist_spec("mnist", 3, 4096, 11, "[64]").replace("batch_size = 128", "batch_size = 128\nlanes = 8").replace("workers = 2", workers)
}

fn submit(c: &UpCluster, file: &str, spec: &str) -> String {
    json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec(file, spec)))["id"].to_string()
}

fn params_hash(job: &serde_json::Value) -> String {
    assert_eq!(job["state"], "succeeded", "{job}");
    let r = job["results"].as_array().unwrap();
    assert!(r.iter().all(|x| x["param_blake3"] == r[0]["param_blake3"]), "{job}");
    r[0]["param_blake3"].as_str().unwrap().to_string()
}

fn pid_of(c: &UpCluster, worker: &serde_json::Value) -> i64 {
    let list = json(&mut c.cmd(&["worker", "list", "--json"]));
    list.as_array().unwrap().iter().find(|w| w["id"] == *worker).unwrap_or_else(|| panic!("no worker {worker}: {list}"))["pid"].as_i64().unwrap()
}

/// Every epoch trained each of the records [0, n) exactly once: the job's own counters, summed
/// where the ranks read the records, match the count and digest of the whole range.
fn each_record_once_per_epoch(job: &serde_json::Value, epochs: usize, n: u64) {
    let want = RecordDigest::of(0..n).packed();
    let e = job["epoch_records"].as_array().unwrap();
    assert_eq!(e.len(), epochs, "{job}");
    for (i, x) in e.iter().enumerate() {
        assert_eq!((x["records"].as_u64(), x["digest"].as_u64()), (Some(n), Some(want as u64)), "epoch {i}: {job}");
    }
}

/// The second generation took over the first's state in memory (no checkpoint exists to load).
fn continued_in_memory(job: &serde_json::Value, cause: &str) -> u64 {
    let m = job["membership"].as_array().unwrap();
    let causes: Vec<&str> = m.iter().map(|c| c["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["start", cause], "{job}");
    let step = m[1]["step"].as_u64().unwrap();
    assert!(step > 0, "the second generation started over: {job}");
    assert_eq!(job["continued_from"].as_u64(), Some(step), "{job}");
    assert!(job["resumed_from"].is_null() && job["checkpoint"].as_u64() == Some(96), "only the final checkpoint: {job}");
    step
}

#[test]
fn with_lanes_a_lost_and_an_added_worker_end_bitwise_where_a_static_pool_does() {
    let c = UpCluster::start_env(&["--workers", "3"], &[SLOW]);
    c.import_mnist("mnist");

    // Fault-free, on three workers and on two.
    let three = c.wait_end(&submit(&c, "three.toml", &lanes_spec("workers = 3")));
    let two = c.wait_end(&submit(&c, "two.toml", &lanes_spec("workers = 2")));
    let want = params_hash(&three);
    assert_eq!(params_hash(&two), want, "lanes make the result independent of the world size");
    each_record_once_per_epoch(&three, 3, 4096);

    // Three workers, rank 0's SIGKILLed mid-epoch: the other two go on in memory, in their
    // processes.
    let id = submit(&c, "lost.toml", &lanes_spec("workers = 3\nmin_workers = 2"));
    let job = c.wait_job(&id, "training on three workers", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 45);
    let workers = job["workers"].as_array().unwrap().clone();
    let survivors: Vec<(serde_json::Value, i64)> = workers[1..].iter().map(|w| (w.clone(), pid_of(&c, w))).collect();
    let victim = pid_of(&c, &workers[0]);
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let lost = c.wait_end(&id);
    assert_eq!(params_hash(&lost), want, "a run that lost a worker ends where the static runs do");
    let step = continued_in_memory(&lost, "lost");
    assert!(step > 45, "{lost}");
    assert_eq!(lost["workers"].as_array().unwrap(), &survivors.iter().map(|s| s.0.clone()).collect::<Vec<_>>(), "{lost}");
    for (w, pid) in &survivors {
        assert_eq!(pid_of(&c, w), *pid, "survivor {w} was restarted");
    }
    each_record_once_per_epoch(&lost, 3, 4096);
    // The metric history kept every step's loss, though the worker that recorded it as rank 0
    // died with its last points: every rank records the job's figures.
    let history = json(&mut c.cmd(&["job", "metrics", &id, "--keys", "loss", "--json"]));
    let steps: Vec<u64> = history["series"][0]["steps"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=lost["step"].as_u64().unwrap()).collect::<Vec<_>>(), "{history}");

    // Two workers, then one added mid-job: it gets the state from a peer and joins.
    let id = submit(&c, "grow.toml", &lanes_spec("workers = 2\nmax_workers = 3"));
    c.wait_job(&id, "training on two workers", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 40);
    ok(&mut c.cmd(&["worker", "add"]));
    let grown = c.wait_end(&id);
    assert_eq!(grown["world_size"], 3, "{grown}");
    assert_eq!(params_hash(&grown), want, "a run that gained a worker ends where the static runs do");
    continued_in_memory(&grown, "joined");
    each_record_once_per_epoch(&grown, 3, 4096);
}

#[test]
fn without_lanes_a_lost_worker_costs_no_accuracy_and_no_record_twice() {
    let c = UpCluster::start_env(&["--workers", "2"], &[SLOW]);
    c.import_mnist("mnist");
    let spec = mnist_spec("mnist", 3, 4096, 5, "[64]");
    let fault_free = c.wait_end(&submit(&c, "static.toml", &spec));
    assert_eq!(fault_free["state"], "succeeded", "{fault_free}");

    let id = submit(&c, "lost.toml", &spec.replace("workers = 2", "workers = 2\nmin_workers = 1"));
    let job = c.wait_job(&id, "training on two workers", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 40);
    let victim = pid_of(&c, &job["workers"][1]);
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let lost = c.wait_end(&id);
    assert_eq!(lost["state"], "succeeded", "{lost}");
    assert_eq!(lost["world_size"], 1, "{lost}");
    continued_in_memory(&lost, "lost");
    let (a, b) = (lost["test_accuracy"].as_f64().unwrap(), fault_free["test_accuracy"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.01, "accuracy {a} after losing a worker, {b} without");
    each_record_once_per_epoch(&lost, 3, 4096);
}
