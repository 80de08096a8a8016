//! The coordinator keeps what it committed: concurrent writers, corrupt logs, stray messages
//! and wiped folders get a clear error or are dropped; nothing registered is lost.

mod common;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn concurrent_imports_of_one_name_never_touch_a_registered_version() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "0"]);
    let files = write_tiny_idx(c.tmp.path());
    let replicas: Vec<String> = c.endpoints().split(',').map(String::from).collect();
    // One import, then six appends to the same name at once, each through a different replica
    // (some of which are followers that may lag the leader).
    ok(c.cmd(&["data", "import", "tiny", "--records-per-shard", "100"]).args(&files));
    let children: Vec<_> = (0..6)
        .map(|i| {
            shoal()
                .args(["data", "append", "tiny", "--json", "--records-per-shard", "100", "--endpoints", &replicas[i % replicas.len()]])
                .arg("--dir")
                .arg(c.dir())
                .args(&files)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "an import failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let list = json(&mut c.cmd(&["data", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!((list[0]["version"].as_u64(), list[0]["slice_count"].as_u64()), (Some(7), Some(7)), "{list}");
    let versions: Vec<serde_json::Value> = (1..=7).map(|v| json(&mut c.cmd(&["data", "show", "tiny", "--version", &v.to_string(), "--json"]))).collect();
    for (k, d) in versions.iter().enumerate() {
        assert_eq!(d["slices"].as_array().unwrap().len(), k + 1, "version {} holds its own slice and every one before: {d}", k + 1);
        assert_eq!(d["records"].as_u64().unwrap(), 512 * (k as u64 + 1), "{d}");
    }
    let mut folders = std::collections::BTreeSet::new();
    for d in &versions {
        for s in d["shards"].as_array().unwrap() {
            let path = c.store().join(s["path"].as_str().unwrap());
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("version {}: {}: {e}", d["version"], path.display()));
            assert_eq!(blake3::hash(&bytes).to_hex().to_string(), s["blake3"].as_str().unwrap(), "version {}", d["version"]);
            folders.insert(path.parent().unwrap().to_path_buf());
        }
    }
    assert_eq!(folders.len(), 7, "every slice has a folder of its own");
}

fn coordinator(tmp: &std::path::Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = shoal();
    cmd.args(["serve", "coordinator", "--insecure", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.join(name))
        .arg("--store")
        .arg(tmp.join("store"))
        .args(args)
        .envs(envs.iter().copied());
    Proc::spawn(&mut cmd, &tmp.join(format!("{name}.log")))
}

#[test]
fn a_replica_whose_raft_loop_dies_stops_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = coordinator(tmp.path(), "c", &[], &[("SHOAL_FAILPOINTS", "raft-loop-panic@20")]);
    let status = p.wait_exit(Duration::from_secs(30)).expect("the replica kept running without its raft loop");
    assert!(!status.success());
    let log = std::fs::read_to_string(tmp.path().join("c.log")).unwrap();
    assert!(log.contains("the raft loop panicked"), "{log}");
}

#[test]
fn a_data_folder_of_another_replica_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first = coordinator(tmp.path(), "c", &["--id", "1"], &[]);
    wait_for("the identity file", Duration::from_secs(20), || tmp.path().join("c/identity.pb").exists().then_some(()));
    first.kill();
    let mut swapped = coordinator(tmp.path(), "c", &["--id", "2", "--peers", "2=127.0.0.1:0"], &[]);
    let status = swapped.wait_exit(Duration::from_secs(20)).expect("a swapped folder was accepted");
    assert!(!status.success());
    let log = std::fs::read_to_string(tmp.path().join("c.log")).unwrap();
    assert!(log.contains("holds the state of replica 1") && log.contains("as replica 2"), "{log}");
}

#[test]
fn a_wiped_replica_does_not_rejoin_its_cluster() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "0"]);
    ok(&mut c.cmd(&["down"]));
    let wiped = c.dir().join("coordinators/2");
    std::fs::remove_dir_all(&wiped).unwrap();
    std::fs::create_dir_all(&wiped).unwrap();
    let e = fails(shoal().args(["up", "--coordinators", "3", "--workers", "0", "--dir"]).arg(c.dir()));
    assert!(e.contains("holds no state") && e.contains("existing cluster"), "{e}");
    let _ = run(&mut c.cmd(&["down"]));
}

#[test]
fn a_stopped_leader_costs_clients_an_election_not_their_deadline() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "0"]);
    let files = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny"]).args(&files));
    let status = json(&mut c.cmd(&["status", "--json"]));
    let leader = status["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").unwrap().clone();
    let pid = leader["pid"].as_i64().unwrap() as i32;
    // SAFETY: signalling a process this test's cluster started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let started = std::time::Instant::now();
    // A write and a read, through every replica (the stopped one first in line, perhaps).
    let v2 = json(c.cmd(&["data", "append", "tiny", "--json"]).args(&files));
    assert_eq!(v2["version"], 2);
    let shown = json(&mut c.cmd(&["data", "show", "tiny", "--json"]));
    assert_eq!(shown["version"], 2);
    let took = started.elapsed();
    // A write sent to the paused leader alone: it cannot answer while paused; once it runs
    // again it finds itself deposed and the write goes through the new leader, once.
    let paused_endpoint = leader["address"].as_str().unwrap().to_string();
    let late = shoal()
        .args(["data", "append", "tiny", "--json", "--endpoints", &paused_endpoint])
        .arg("--dir")
        .arg(c.dir())
        .args(&files)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(took < Duration::from_secs(12), "a hung replica held the client for {took:?}");
    let late = late.wait_with_output().unwrap();
    assert!(late.status.success(), "{}", String::from_utf8_lossy(&late.stderr));
    let late: serde_json::Value = serde_json::from_slice(&late.stdout).unwrap();
    assert_eq!(late["version"], 3, "{late}");
    // A read through the replica that was paused is not stale: it sees every version.
    let seen = json(&mut c.cmd(&["data", "list", "--json", "--endpoints", &paused_endpoint]));
    assert_eq!(seen[0]["version"], 3, "a stale read from the deposed leader: {seen}");
    // Back, it steps down: one leader, in a newer term, and it is not the paused one.
    let (_, now) = wait_for("a single leader", Duration::from_secs(20), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        let leaders: Vec<_> = s["coordinators"].as_array().unwrap().iter().filter(|r| r["role"] == "leader").cloned().collect();
        (leaders.len() == 1).then(|| (s.clone(), leaders[0].clone()))
    });
    assert_ne!(now["id"], leader["id"]);
    assert!(now["term"].as_u64() > leader["term"].as_u64());
}

#[test]
fn garbage_on_every_port_changes_nothing() {
    use std::io::{Read, Write};
    let c = UpCluster::start_with(&["--workers", "1"]);
    let files = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny"]).args(&files));
    let before = json(&mut c.cmd(&["status", "--json"]));
    let coordinator = before["coordinators"][0]["address"].as_str().unwrap().to_string();
    let worker = before["workers"][0]["address"].as_str().unwrap().to_string();
    for addr in [&coordinator, &worker] {
        // Not HTTP/2 at all: the connection is dropped, the server goes on.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096));
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let after = json(&mut c.cmd(&["status", "--json"]));
    assert_eq!(after["coordinators"][0]["state_hash"], before["coordinators"][0]["state_hash"], "garbage changed the state");
    assert_eq!(after["coordinators"][0]["role"], "leader");
    assert_eq!(after["workers"][0]["state"], "idle");
    assert_eq!(json(&mut c.cmd(&["data", "list", "--json"])).as_array().unwrap().len(), 1);
}
