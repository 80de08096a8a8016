//! Triggers: a job template (`shoal job schedule`, `[trigger] on_append`) starts exactly one
//! job for every new version of its dataset, also when the leader dies right after the append.

mod common;
use common::*;
use std::time::Duration;

const TEMPLATE: &str = r#"name = "retrain-digits"
[model]
kind = "mlp"
hidden = [64]
[dataset]
name = "digits"
train = [0, 8000]
slices = "new"
replay = 0.2
[training]
epochs = 1
batch_size = 128
seed = 3
[training.optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
[cluster]
workers = 2
[init]
model = "digits-mlp@production"
[register]
name = "digits-mlp"
[promote]
alias = "production"
metric = "test_accuracy"
min_delta = 0.0
holdout = "digits-holdout"
[trigger]
on_append = "digits"
"#;

/// Jobs started by template `t` for dataset version `v`.
fn fired(c: &UpCluster, t: u64, v: u64) -> Vec<serde_json::Value> {
    let jobs = json(&mut c.cmd(&["job", "list", "--json"]));
    jobs.as_array().unwrap().iter().filter(|j| j["template"] == t && j["trigger_version"] == v).cloned().collect()
}

/// MNIST records 0-3999 as `digits` (version 1) and 8000-9999 as `digits-holdout`; model
/// digits-mlp@1 trained on digits, aliased production; the retraining template scheduled.
fn setup(c: &UpCluster) -> u64 {
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "digits", "--records", "0:4000"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "import", "digits-holdout", "--records", "8000:10000"]).arg(&x).arg(&y));
    let first = TEMPLATE.replace("[promote]\nalias = \"production\"\nmetric = \"test_accuracy\"\nmin_delta = 0.0\nholdout = \"digits-holdout\"\n", "").replace("slices = \"new\"\nreplay = 0.2\n", "").replace("[init]\nmodel = \"digits-mlp@production\"\n", "").replace("[trigger]\non_append = \"digits\"\n", "").replace("train = [0, 8000]", "train = [0, 4000]");
    let job = c.submit_follow(&c.write_spec("first.toml", &first));
    assert_eq!(job["registered_model"], "digits-mlp@1", "{job}");
    ok(&mut c.cmd(&["model", "alias", "digits-mlp", "1", "production"]));
    let t = json(c.cmd(&["job", "schedule", "--json"]).arg(c.write_spec("template.toml", TEMPLATE)));
    t["id"].as_u64().unwrap()
}

#[test]
fn every_append_starts_exactly_one_retraining_job_with_lineage() {
    let c = UpCluster::start(2);
    let t = setup(&c);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "append", "digits", "--records", "4000:8000"]).arg(&x).arg(&y));
    let jobs = fired(&c, t, 2);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = c.wait_end(&jobs[0]["id"].to_string());
    assert_eq!((job["state"].as_str(), job["registered_model"].as_str(), job["new_from"].as_u64()), (Some("succeeded"), Some("digits-mlp@2"), Some(4000)), "{job}");
    let v2 = json(&mut c.cmd(&["model", "show", "digits-mlp@2", "--json"]));
    assert_eq!((v2["parent"].as_str(), v2["dataset_version"].as_u64()), (Some("digits-mlp@1"), Some(2)), "{v2}");
    // The gate: both models scored on digits-holdout, the alias moved only if v2 is not worse.
    let (cand, held) = (v2["holdout_accuracy"].as_f64().unwrap(), v2["holder_accuracy"].as_f64().unwrap());
    assert_eq!(v2["holder_version"], 1, "{v2}");
    let production = json(&mut c.cmd(&["model", "show", "digits-mlp@production", "--json"]));
    assert_eq!(production["version"].as_u64(), Some(if cand >= held { 2 } else { 1 }), "{cand} against {held}: {v2}");
    assert!(v2["promotion"].as_str().unwrap().contains(&format!("{cand:.4}")), "{v2}");
    assert_eq!(job["promotion"], v2["promotion"]);
    let holder = production["version"].as_u64().unwrap();
    // A gate no model can pass leaves the alias where it is, and says why.
    let strict = TEMPLATE.replace("[trigger]\non_append = \"digits\"\n", "").replace("min_delta = 0.0", "min_delta = 0.5").replace("slices = \"new\"\nreplay = 0.2\n", "");
    let strict = c.submit_follow(&c.write_spec("strict.toml", &strict));
    assert!(strict["promotion"].as_str().unwrap().starts_with("not promoted"), "{strict}");
    assert_eq!(json(&mut c.cmd(&["model", "show", "digits-mlp@production", "--json"]))["version"].as_u64(), Some(holder));

    // The next version fires once more, and nothing fires twice. If production is version 2
    // (it saw records 0-7999), nothing new lies in the template's train range: the firing
    // starts no job and says why; else version 1's successor trains.
    ok(c.cmd(&["data", "append", "digits", "--records", "9000:9500"]).arg(&x).arg(&y));
    let templates = json(&mut c.cmd(&["job", "templates", "--json"]));
    let versions: Vec<u64> = templates[0]["firings"].as_array().unwrap().iter().map(|f| f["dataset_version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [2, 3], "{templates}");
    assert_eq!(fired(&c, t, 2).len(), 1);
    if holder == 2 {
        assert_eq!(fired(&c, t, 3).len(), 0);
        assert!(templates[0]["firings"][1]["error"].as_str().unwrap().contains("fewer than one batch"), "{templates}");
    } else {
        assert_eq!(fired(&c, t, 3).len(), 1, "{templates}");
    }
    let e = fails(c.cmd(&["job", "schedule"]).arg(c.write_spec("plain.toml", &TEMPLATE.replace("[trigger]\non_append = \"digits\"\n", ""))));
    assert!(e.contains("[trigger]"), "{e}");
}

#[test]
fn a_leader_killed_right_after_the_append_fires_the_template_once() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "2"]);
    let t = setup(&c);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "append", "digits", "--records", "4000:8000"]).arg(&x).arg(&y));
    let status = json(&mut c.cmd(&["status", "--json"]));
    let leader = status["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").unwrap().clone();
    assert_eq!(unsafe { libc::kill(leader["pid"].as_i64().unwrap() as i32, libc::SIGKILL) }, 0);
    wait_for("a new leader", Duration::from_secs(30), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        s["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader" && r["id"] != leader["id"]).cloned()
    });
    let jobs = fired(&c, t, 2);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = c.wait_end(&jobs[0]["id"].to_string());
    assert_eq!(job["state"], "succeeded", "{job}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fired(&c, t, 2).len(), 1, "the new leader fired it again");
}
