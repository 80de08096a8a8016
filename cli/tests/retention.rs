//! Retention (issue 17, defect 2): finished jobs beyond `shoal coordinator settings` leave the
//! state, and their files leave the store only after that removal is committed; what a model
//! version refers to stays.

mod common;

use std::time::Duration;

use common::*;

fn spec(c: &UpCluster, name: &str, register: bool) -> std::path::PathBuf {
    let mut text = mnist_spec("mnist", 1, 512, 1, "[32]").replace("workers = 2", "workers = 1").replace("name = \"test-mlp\"", &format!("name = \"{name}\""));
    if register {
        text.push_str("[register]\nname = \"kept\"\n");
    }
    c.write_spec(&format!("{name}.toml"), &text)
}

fn job_folder(c: &UpCluster, id: u64) -> std::path::PathBuf {
    c.store().join(format!("jobs/{id}"))
}

#[test]
fn finished_jobs_beyond_retention_go_after_the_commit_and_pinned_ones_stay() {
    // The fault point drops the removal of files that follows a committed removal, as a crash
    // right after the commit would.
    let c = UpCluster::start_env(&["--workers", "1"], &[("SHOAL_FAILPOINTS", "prune-files-lost")]);
    c.import_mnist("mnist");
    let s = json(&mut c.cmd(&["coordinator", "settings", "--json"]));
    assert_eq!((s["keep_jobs"].as_u64(), s["keep_days"].as_u64()), (Some(1000), Some(7)), "defaults: {s}");
    let mut ids = Vec::new();
    for (i, register) in [true, false, false, false].into_iter().enumerate() {
        let j = c.submit_follow(&spec(&c, &format!("j{i}"), register));
        assert_eq!(j["state"], "succeeded", "{j}");
        ids.push(j["id"].as_u64().unwrap());
    }
    for id in &ids {
        assert!(job_folder(&c, *id).exists(), "job {id} wrote its checkpoints");
    }
    let s = json(&mut c.cmd(&["coordinator", "settings", "--keep-jobs", "1", "--keep-days", "0", "--json"]));
    assert_eq!((s["keep_jobs"].as_u64(), s["keep_days"].as_u64()), (Some(1), Some(0)), "{s}");
    // The leader applies retention on its own (every 10 s): jobs 2 and 3 go; job 1 is a model
    // version (pinned), job 4 the newest.
    wait_for("retention", Duration::from_secs(30), || {
        let jobs = json(&mut c.cmd(&["job", "list", "--json"]));
        (jobs.as_array().unwrap().len() == 2).then_some(())
    });
    let listed: Vec<u64> = json(&mut c.cmd(&["job", "list", "--json"])).as_array().unwrap().iter().map(|j| j["id"].as_u64().unwrap()).collect();
    assert_eq!(listed, vec![ids[3], ids[0]], "newest first, the pinned one kept");
    let e = fails(&mut c.cmd(&["job", "status", &ids[1].to_string()]));
    assert!(e.contains("retention removed it"), "{e}");
    // The removal committed, but its files stayed (the fault point): the folders of jobs that
    // are gone are left over, and `job prune` removes them; the kept jobs' stay.
    assert!(job_folder(&c, ids[1]).exists() && job_folder(&c, ids[2]).exists());
    let pruned = json(&mut c.cmd(&["job", "prune", "--json"]));
    let paths: Vec<&str> = pruned["removed_paths"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(paths.len(), 2, "{pruned}");
    assert_eq!(pruned["kept_pinned"], 1, "{pruned}");
    assert!(!job_folder(&c, ids[1]).exists() && !job_folder(&c, ids[2]).exists());
    assert!(job_folder(&c, ids[0]).exists() && job_folder(&c, ids[3]).exists(), "kept jobs keep their files");
    // The model still exports from the pinned job's checkpoint.
    let out = c.tmp.path().join("kept.safetensors");
    ok(c.cmd(&["model", "export", "kept@1"]).arg(&out));
    // Orphan dataset folders (an import that never registered) go with `data gc`.
    let orphan = c.store().join("datasets/mnist/import-orphan");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("shard-00000.safetensors"), b"x").unwrap();
    let young = json(&mut c.cmd(&["data", "gc", "--json"]));
    assert!(young["removed"].as_array().unwrap().is_empty() && orphan.exists(), "a young folder may be an import under way: {young}");
    let gc = json(&mut c.cmd(&["data", "gc", "--min-age-s", "0", "--json"]));
    assert_eq!(gc["removed"], serde_json::json!(["datasets/mnist/import-orphan"]), "{gc}");
    assert_eq!(json(&mut c.cmd(&["data", "show", "mnist", "--json"]))["version"], 1, "registered shards stay");
}
