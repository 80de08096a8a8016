//! No single point of failure in the control plane: with three coordinator replicas, killing
//! the leader mid-job elects another, and the job finishes with the same parameters a
//! failure-free run gives; restarted, the killed replica catches up from a snapshot.

mod common;
use std::time::Duration;

use common::*;

#[test]
fn killing_the_leader_mid_job_loses_nothing() {
    // Snapshots every 20 entries: the killed replica's log is soon behind every other's. Steps
    // of 20 ms, so the kill lands mid-job (96 steps).
    let c = UpCluster::start_env(&["--coordinators", "3", "--workers", "2", "--snapshot-every", "20"], &[("SHOAL_FAILPOINTS", "step-delay-ms=20")]);
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

    // The metric history lost no point to the kill: one loss point per applied step, none
    // dropped, and every surviving replica answers with the same history.
    let total = done["step"].as_u64().unwrap();
    assert_eq!(done["metrics_dropped"], 0, "{done}");
    let mut answers = Vec::new();
    for r in status["coordinators"].as_array().unwrap().iter().filter(|r| r["id"] != leader["id"] && r["reachable"] == true) {
        let m = json(&mut c.cmd(&["job", "metrics", &id, "--keys", "loss", "--json", "--endpoints", r["address"].as_str().unwrap()]));
        assert_eq!((m["dropped"].as_u64(), m["chunks_unreadable"].as_u64()), (Some(0), Some(0)), "{m}");
        let series = m["series"].as_array().unwrap();
        assert_eq!(series.len(), 1, "loss of rank 0 alone: {m}");
        let steps: Vec<u64> = series[0]["steps"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=total).collect::<Vec<_>>(), "a loss point for every applied step, once");
        answers.push(m);
    }
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0], answers[1], "the replicas answer alike");
    // As Parquet, read back by the parquet crate's own reader: a row per point.
    let all = json(&mut c.cmd(&["job", "metrics", &id, "--json"]));
    let points: usize = all["series"].as_array().unwrap().iter().map(|s| s["steps"].as_array().unwrap().len()).sum();
    let out = c.tmp.path().join("history.parquet");
    ok(&mut c.cmd(&["job", "metrics", &id, "--parquet", out.to_str().unwrap()]));
    {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let reader = SerializedFileReader::new(std::fs::File::open(&out).unwrap()).unwrap();
        let meta = reader.metadata().file_metadata();
        assert_eq!(meta.num_rows() as usize, points);
        let names: Vec<String> = meta.schema_descr().columns().iter().map(|c| c.name().to_string()).collect();
        assert_eq!(names, ["key", "rank", "step", "unix_ms", "value"]);
        let mut loss_steps = Vec::new();
        for row in reader.get_row_iter(None).unwrap() {
            let row = row.unwrap();
            use parquet::record::RowAccessor;
            if row.get_string(0).unwrap() == "loss" {
                loss_steps.push(row.get_ulong(2).unwrap());
            }
        }
        assert_eq!(loss_steps, (1..=total).collect::<Vec<_>>());
    }
    // TensorBoard event files under the job's folder: each rank's, every loss point in them.
    let tb = c.store().join(format!("jobs/{id}/tensorboard"));
    let files: Vec<_> = std::fs::read_dir(&tb).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 2, "one event file per rank: {files:?}");
    let mut loss_steps: Vec<i64> = files
        .iter()
        .flat_map(|f| shoal_worker::tensorboard::read_events(&std::fs::read(f).unwrap()).unwrap())
        .filter_map(|e| e.summary.filter(|s| s.value.first().is_some_and(|v| v.tag == "loss")).map(|_| e.step))
        .collect();
    loss_steps.sort_unstable();
    assert_eq!(loss_steps, (1..=total as i64).collect::<Vec<_>>());

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
    let mut verb = "import";
    while leader_now().and_then(|l| l["snapshot_index"].as_u64()).unwrap_or(0) <= leader["applied_index"].as_u64().unwrap() + 1 {
        ok(c.cmd(&["data", verb, "tiny"]).args(&files));
        verb = "append";
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
            .arg("--credentials")
            .arg(c.dir().join(format!("credentials/coordinator-{id}")))
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_group_grows_to_five_and_shrinks_to_three_while_a_job_runs() {
    let c = UpCluster::start_env(&["--coordinators", "3", "--workers", "2"], &[("SHOAL_FAILPOINTS", "step-delay-ms=30")]);
    c.import_mnist("mnist");
    let spec = c.write_spec("mlp.toml", &mnist_spec("mnist", 6, 4096, 3, "[64]"));
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(&spec))["id"].to_string();
    c.wait_job(&id, "the job to run", Duration::from_secs(60), |j| j["state"] == "running");
    let members = |c: &UpCluster| {
        let s = json(&mut c.cmd(&["status", "--json"]));
        let mut roles: Vec<(u64, String)> = s["coordinators"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["reachable"] == true)
            .map(|r| (r["id"].as_u64().unwrap(), r["role"].as_str().unwrap().to_string()))
            .collect();
        roles.sort();
        roles
    };
    for _ in 0..2 {
        let added = json(&mut c.cmd(&["coordinator", "add", &format!("127.0.0.1:{}", free_port()), "--json"]));
        assert!(added["result"].as_str().unwrap().contains("added"), "{added}");
    }
    let grown = wait_for("five voters", Duration::from_secs(60), || {
        let m = members(&c);
        (m.len() == 5 && m.iter().all(|(_, r)| r == "leader" || r == "follower")).then_some(m)
    });
    assert_eq!(grown.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    for gone in ["1", "2"] {
        ok(&mut c.cmd(&["coordinator", "remove", gone]));
    }
    let shrunk = wait_for("three voters", Duration::from_secs(60), || {
        let m = members(&c);
        (m.len() == 3 && m.iter().filter(|(_, r)| r == "leader").count() == 1).then_some(m)
    });
    assert_eq!(shrunk.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![3, 4, 5]);
    let done = c.wait_end(&id);
    assert_eq!(done["state"], "succeeded", "{done}");
    // The replicas that joined hold the same state as the one that was there from the start.
    wait_for("one state on every replica", Duration::from_secs(30), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        let hashes: std::collections::BTreeSet<String> = s["coordinators"].as_array().unwrap().iter().map(|r| format!("{}/{}", r["applied_index"], r["state_hash"])).collect();
        (hashes.len() == 1).then_some(())
    });
}
