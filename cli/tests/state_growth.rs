//! The replicated state grows by what is appended, never by copies of what was there, and
//! every reply stays bounded (issue 17, defect 2): 1,000 appends of 100 records to one
//! dataset on 3 replicas.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::*;

fn leader(c: &UpCluster) -> serde_json::Value {
    wait_for("a leader", Duration::from_secs(20), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        s["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").cloned()
    })
}

/// The bytes a snapshot of the leader's state holds now.
fn snapshot_bytes(c: &UpCluster) -> u64 {
    leader(c)["state_bytes"].as_u64().unwrap()
}

/// `count` appends of records 100..200 of the tiny files, on `threads` clients at once.
fn append(c: &UpCluster, files: &[std::path::PathBuf; 2], count: usize, threads: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let n = count / threads + usize::from(t < count % threads);
            s.spawn(move || {
                for _ in 0..n {
                    ok(c.cmd(&["data", "append", "t", "--records", "100:200"]).args(files));
                }
            });
        }
    });
}

#[test]
fn a_thousand_appends_keep_the_state_linear_and_every_reply_bounded() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "0", "--snapshot-every", "50"]);
    let files = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "t", "--records", "0:100"]).args(&files));
    append(&c, &files, 99, 2);
    let at_100 = snapshot_bytes(&c);
    assert!(at_100 > 0);

    // A follower goes down for the last hundred appends: it must catch up from a snapshot.
    let s = json(&mut c.cmd(&["status", "--json"]));
    let follower = s["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "follower").unwrap().clone();
    let (fid, fpid) = (follower["id"].as_u64().unwrap(), follower["pid"].as_i64().unwrap() as i32);
    let raw = std::fs::read(format!("/proc/{fpid}/cmdline")).unwrap();
    let args: Vec<String> = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).skip(1).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    append(&c, &files, 800, 2);
    // SAFETY: a replica this test's cluster started.
    unsafe { libc::kill(fpid, libc::SIGKILL) };
    append(&c, &files, 100, 2);
    let lid = leader(&c)["id"].as_u64().unwrap();
    let at_1000 = snapshot_bytes(&c);
    let _ = writeln!(std::io::stderr(), "state_growth: snapshot bytes after 100 versions {at_100}, after 1,000 {at_1000} ({:.2}x)", at_1000 as f64 / at_100 as f64);
    assert!(at_1000 <= 11 * at_100, "the snapshot grew {at_100} -> {at_1000} bytes: faster than the appends");

    // Every reply answers, and none grows with the history.
    let list = json(&mut c.cmd(&["data", "list", "--json"]));
    assert_eq!((list[0]["version"].as_u64(), list[0]["slice_count"].as_u64(), list[0]["records"].as_u64()), (Some(1000), Some(1000), Some(100_000)), "{list}");
    let page = json(&mut c.cmd(&["data", "show", "t", "--json"]));
    assert_eq!((page["slices"].as_array().unwrap().len(), page["versions"].as_array().unwrap().len()), (100, 100));
    assert_eq!(page["slices"][0]["index_range"], serde_json::json!([99_900, 100_000]), "newest first");
    let next = page["next_page"].as_str().expect("more pages").to_string();
    let second = json(&mut c.cmd(&["data", "show", "t", "--json", "--page", &next]));
    assert_eq!(second["slices"][0]["index_range"], serde_json::json!([89_900, 90_000]));
    let all = json(&mut c.cmd(&["data", "show", "t", "--json", "--all"]));
    assert_eq!((all["slices"].as_array().unwrap().len(), all["shards"].as_array().unwrap().len()), (1000, 1000));
    assert!(all["next_page"].is_null());
    let old = json(&mut c.cmd(&["data", "show", "t", "--version", "10", "--json"]));
    assert_eq!((old["records"].as_u64(), old["slices"].as_array().unwrap().len()), (Some(1000), 10), "{old}");
    assert_eq!(old["stats"]["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>(), 1000);
    let status = json(&mut c.cmd(&["status", "--json"]));
    assert_eq!(status["leader"].as_u64(), Some(lid));

    // The follower comes back far behind the leader's compacted log: a snapshot brings it level.
    let mut back = Proc::spawn(shoal().args(&args), &c.tmp.path().join("follower.log"));
    let (hash, applied) = wait_for("the follower to catch up", Duration::from_secs(60), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        let rs = s["coordinators"].as_array().unwrap().clone();
        let f = rs.iter().find(|r| r["id"] == fid)?;
        let l = rs.iter().find(|r| r["role"] == "leader")?;
        (f["applied_index"] == l["applied_index"] && f["state_hash"] == l["state_hash"] && f["snapshot_index"].as_u64() > Some(0)).then(|| (l["state_hash"].clone(), l["applied_index"].clone()))
    });
    assert!(applied.as_u64().unwrap() > 1000, "{applied}");
    back.kill();

    // A restart of the whole cluster keeps it all.
    ok(&mut c.cmd(&["down"]));
    ok(&mut c.cmd(&["up", "--coordinators", "3", "--workers", "0", "--snapshot-every", "50"]));
    let again = json(&mut c.cmd(&["data", "show", "t", "--json"]));
    assert_eq!((again["version"].as_u64(), again["slice_count"].as_u64()), (Some(1000), Some(1000)));
    let _ = hash;
}
