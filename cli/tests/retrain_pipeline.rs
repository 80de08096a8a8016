//! The README's worked example, end to end with real processes: a first model promoted to
//! production, then `examples/retrain-pipeline.toml` started by an append: validate, retrain
//! from production with replay, evaluate on the holdout, register, gate, score the new slice.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn the_retraining_example_runs_on_an_append_and_gates_against_production() {
    let c = UpCluster::start_with(&["--workers", "2"]);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records", "0:6000"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "import", "mnist-holdout", "--records", "8000:10000"]).arg(&x).arg(&y));
    let examples = repo().join("examples");
    let first = c.submit_follow(&examples.join("retrain-first.toml"));
    assert_eq!((first["state"].as_str(), first["registered_model"].as_str()), (Some("succeeded"), Some("mnist-mlp@1")), "{first}");
    assert_eq!(json(&mut c.cmd(&["model", "show", "mnist-mlp@production", "--json"]))["version"], 1);

    ok(c.cmd(&["pipeline", "submit"]).arg(examples.join("retrain-pipeline.toml")));
    // Before any append: validate runs (it is never cached), retrain would train, and what
    // follows depends on it.
    let plan = json(&mut c.cmd(&["pipeline", "plan", "retrain", "--json"]));
    let predicted: Vec<&str> = plan["steps"].as_array().unwrap().iter().map(|s| s["prediction"].as_str().unwrap()).collect();
    assert_eq!(predicted, ["runs", "miss", "unknown", "unknown", "unknown", "unknown"], "{plan}");

    // New records arrive: the append's apply starts the run for version 2.
    ok(c.cmd(&["data", "append", "mnist", "--records", "6000:8000"]).arg(&x).arg(&y));
    let run = wait_for("the retraining run to end", Duration::from_secs(240), || {
        let r = json(&mut c.cmd(&["pipeline", "show", "retrain@mnist-v2", "--json"]));
        (r["state"] != "running").then_some(r)
    });
    assert_eq!((run["state"].as_str(), run["cause"].as_str()), (Some("succeeded"), Some("append mnist v2..v2")), "{run}");
    let step = |name: &str| run["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    for s in run["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "succeeded", "{s}");
    }
    let validate = step("validate");
    assert_eq!((validate["outputs"]["version"].as_str(), validate["outputs"]["slice_start"].as_str(), validate["outputs"]["slice_records"].as_str()), (Some("2"), Some("6000"), Some("2000")), "{validate}");
    // The retraining job warm-started from production and trained on the new records (plus
    // a replay of half as many older ones).
    let retrain = c.job(&step("retrain")["job"].to_string());
    assert_eq!((retrain["dataset_version"].as_u64(), retrain["new_from"].as_u64()), (Some(2), Some(6000)), "{retrain}");
    let lineage = json(&mut c.cmd(&["model", "lineage", "mnist-mlp@2", "--json"]));
    assert!(lineage.to_string().contains("mnist-mlp@1"), "the new version's parent is production: {lineage}");
    // The gate scored the candidate on the same holdout records as evaluate did, to the bit,
    // and production is where its decision says.
    let (evaluate, gate) = (step("evaluate"), step("gate"));
    assert_eq!(gate["outputs"]["candidate_score"], evaluate["outputs"]["test_accuracy"], "{gate}");
    assert_eq!((gate["outputs"]["model"].as_str(), gate["outputs"]["holder_version"].as_str()), (Some("mnist-mlp@2"), Some("1")), "{gate}");
    assert!(gate["outputs"]["holder_score"].as_str().is_some() && gate["jobs"].as_array().unwrap().len() == 2, "candidate and holder were scored: {gate}");
    let promoted = gate["outputs"]["promoted"] == "true";
    let production = json(&mut c.cmd(&["model", "show", "mnist-mlp@production", "--json"]));
    assert_eq!(production["version"], if promoted { 2 } else { 1 }, "{gate} {production}");
    // The new slice was scored with production as it stood after the gate.
    let score = c.job(&step("score")["job"].to_string());
    assert_eq!(score["output_dataset"], "mnist-scored", "{score}");
    let scored = json(&mut c.cmd(&["data", "show", "mnist-scored", "--json"]));
    assert_eq!(scored["records"], 2000, "{scored}");
}
