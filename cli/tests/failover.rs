//! No single point of failure in the control plane: with three coordinator replicas, killing
//! the leader mid-job elects another, and the job finishes with the same parameters a
//! failure-free run gives.

mod common;
use std::time::Duration;

use common::*;

#[test]
fn killing_the_leader_mid_job_loses_nothing() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "2"]);
    c.import_mnist("mnist");
    let spec = c.write_spec("mlp.toml", &mnist_spec("mnist", 3, 4096, 11, "[64]"));
    let job = json(c.cmd(&["job", "submit", "--json"]).arg(&spec));
    let id = job["id"].to_string();
    wait_for("the job to make progress", Duration::from_secs(60), || {
        let j = json(&mut c.cmd(&["job", "status", &id, "--json"]));
        (j["step"].as_u64().unwrap_or(0) >= 5).then_some(())
    });
    let status = json(&mut c.cmd(&["status", "--json"]));
    let leader = status["coordinators"].as_array().unwrap().iter().find(|c| c["role"] == "leader").expect("a leader").clone();
    // SAFETY: signalling a process this test's cluster started.
    assert_eq!(unsafe { libc::kill(leader["pid"].as_i64().unwrap() as i32, libc::SIGKILL) }, 0);

    let done = wait_for("the job to end", Duration::from_secs(120), || {
        let j = json(&mut c.cmd(&["job", "status", &id, "--json"]));
        (j["state"] != "running" && j["state"] != "queued").then_some(j)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    // An election may be under way at any instant on a loaded machine: wait for a leader.
    let (status, new_leader) = wait_for("a leader among the survivors", Duration::from_secs(20), || {
        let status = json(&mut c.cmd(&["status", "--json"]));
        let leader = status["coordinators"].as_array().unwrap().iter().find(|c| c["role"] == "leader").cloned();
        leader.map(|l| (status, l))
    });
    assert_ne!(new_leader["id"], leader["id"]);
    assert!(new_leader["term"].as_u64() > leader["term"].as_u64());
    assert_eq!(status["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "idle").count(), 2, "{status}");

    // The same spec again, without failures, on the surviving replicas: identical parameters.
    let again = c.submit_follow(&spec);
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["results"][0]["param_blake3"], done["results"][0]["param_blake3"]);
}
