//! No single point of failure in the control plane: with three coordinator replicas, killing
//! the leader mid-job elects another, and the job finishes with the same parameters a
//! failure-free run gives; restarted, the killed replica catches up from a snapshot.

mod common;
use std::time::Duration;

use common::*;

#[test]
fn killing_the_leader_mid_job_loses_nothing() {
    // Snapshots every 20 entries: the killed replica's log is soon behind every other's.
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "2", "--snapshot-every", "20"]);
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
    let peers: Vec<String> = status["coordinators"].as_array().unwrap().iter().map(|r| format!("{}={}", r["id"], r["address"].as_str().unwrap())).collect();
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

    // More writes, until the survivors' snapshots cover more than the killed replica ever saw:
    // it can only catch up from a snapshot, not from their logs.
    let files = write_tiny_idx(c.tmp.path());
    let leader_now = || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        s["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").cloned()
    };
    while leader_now().and_then(|l| l["snapshot_index"].as_u64()).unwrap_or(0) <= leader["applied_index"].as_u64().unwrap() + 1 {
        ok(c.cmd(&["data", "import", "tiny"]).args(&files));
    }
    let id = leader["id"].as_u64().unwrap();
    let addr = leader["address"].as_str().unwrap();
    let cluster_id = std::fs::read_to_string(c.dir().join("cluster-id")).unwrap();
    let _back = Proc::spawn(
        shoal()
            .args(["serve", "coordinator", "--id", &id.to_string(), "--listen", addr, "--peers", &peers.join(",")])
            .arg("--data")
            .arg(c.dir().join(format!("coordinators/{id}")))
            .arg("--store")
            .arg(c.store())
            .args(["--cluster-id", cluster_id.trim(), "--initial-state", "existing", "--snapshot-every", "20"]),
        &c.tmp.path().join("restarted.log"),
    );
    let (back, lead) = wait_for("the restarted replica to catch up", Duration::from_secs(60), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        let rs = s["coordinators"].as_array().unwrap();
        let back = rs.iter().find(|r| r["id"] == id && r["reachable"] == true)?.clone();
        let lead = rs.iter().find(|r| r["role"] == "leader")?.clone();
        (back["applied_index"] == lead["applied_index"] && back["state_hash"] == lead["state_hash"]).then_some((back, lead))
    });
    assert_eq!(back["role"], "follower");
    assert!(back["snapshot_index"].as_u64().unwrap() > leader["applied_index"].as_u64().unwrap(), "it caught up from a snapshot: {back} vs {lead}");
}
