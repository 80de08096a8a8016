//! The README's worked example, end to end with real processes: a first model promoted to
//! production, then `examples/retrain-pipeline.toml`: append the new files of incoming/,
//! validate, retrain from production with replay, evaluate on the holdout, register, gate,
//! score the new slice.
//! And an `append` step: files put in the store's `incoming/` become a slice, each once.

mod common;
use common::*;

#[test]
fn the_retraining_example_appends_new_files_and_gates_against_production() {
    let c = UpCluster::start_with(&["--workers", "2"]);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records", "0:6000"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "import", "mnist-holdout", "--records", "8000:10000"]).arg(&x).arg(&y));
    let examples = repo().join("examples");
    let first = c.submit_follow(&examples.join("retrain-first.toml"));
    assert_eq!((first["state"].as_str(), first["registered_model"].as_str()), (Some("succeeded"), Some("mnist-mlp@1")), "{first}");
    assert_eq!(json(&mut c.cmd(&["model", "show", "mnist-mlp@production", "--json"]))["version"], 1);

    ok(c.cmd(&["pipeline", "submit"]).arg(examples.join("retrain-pipeline.toml")));
    // Its daily slot must not run in the middle of this test.
    ok(&mut c.cmd(&["pipeline", "pause", "retrain"]));
    // The plan: append always runs, and everything after it depends on what it adds.
    let plan = json(&mut c.cmd(&["pipeline", "plan", "retrain", "--json"]));
    let predicted: Vec<&str> = plan["steps"].as_array().unwrap().iter().map(|s| s["prediction"].as_str().unwrap()).collect();
    assert_eq!(predicted, ["runs", "unknown", "unknown", "unknown", "unknown", "unknown", "unknown"], "{plan}");

    // New records arrive as safetensors files in incoming/mnist/ (here: the shards of a
    // staging import of MNIST 6000-7999, which are such files).
    ok(c.cmd(&["data", "import", "staging", "--records", "6000:8000"]).arg(&x).arg(&y));
    let incoming = c.store().join("incoming/mnist");
    std::fs::create_dir_all(&incoming).unwrap();
    let staging = std::fs::read_dir(c.store().join("datasets/staging")).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    for (n, shard) in std::fs::read_dir(&staging).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).enumerate() {
        std::fs::copy(&shard, incoming.join(format!("day-1-{n}.safetensors"))).unwrap();
    }
    let run = json(&mut c.cmd(&["pipeline", "run", "retrain", "--wait", "--json"]));
    assert_eq!(run["state"], "succeeded", "{run}");
    let step = |run: &serde_json::Value, name: &str| run["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    for s in run["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "succeeded", "{s}");
    }
    let append = step(&run, "append");
    assert_eq!((append["outputs"]["dataset"].as_str(), append["outputs"]["new_records"].as_str()), (Some("mnist@2"), Some("2000")), "{append}");
    let validate = step(&run, "validate");
    assert_eq!((validate["outputs"]["version"].as_str(), validate["outputs"]["slice_start"].as_str(), validate["outputs"]["slice_records"].as_str()), (Some("2"), Some("6000"), Some("2000")), "{validate}");
    // The retraining job warm-started from production and trained on the new records (plus
    // a replay of half as many older ones).
    let retrain = c.job(&step(&run, "retrain")["job"].to_string());
    assert_eq!((retrain["dataset_version"].as_u64(), retrain["new_from"].as_u64()), (Some(2), Some(6000)), "{retrain}");
    let lineage = json(&mut c.cmd(&["model", "lineage", "mnist-mlp@2", "--json"]));
    assert!(lineage.to_string().contains("mnist-mlp@1"), "the new version's parent is production: {lineage}");
    // The gate scored the candidate on the same holdout records as evaluate did, to the bit,
    // and production is where its decision says.
    let (evaluate, gate) = (step(&run, "evaluate"), step(&run, "gate"));
    assert_eq!(gate["outputs"]["candidate_score"], evaluate["outputs"]["test_accuracy"], "{gate}");
    assert_eq!((gate["outputs"]["model"].as_str(), gate["outputs"]["holder_version"].as_str()), (Some("mnist-mlp@2"), Some("1")), "{gate}");
    assert!(gate["outputs"]["holder_score"].as_str().is_some() && gate["jobs"].as_array().unwrap().len() == 2, "candidate and holder were scored: {gate}");
    let promoted = gate["outputs"]["promoted"] == "true";
    let production = json(&mut c.cmd(&["model", "show", "mnist-mlp@production", "--json"]));
    assert_eq!(production["version"], if promoted { 2 } else { 1 }, "{gate} {production}");
    // The new slice was scored with production as it stood after the gate.
    let score = c.job(&step(&run, "score")["job"].to_string());
    assert_eq!(score["output_dataset"], "mnist-scored", "{score}");
    let scored = json(&mut c.cmd(&["data", "show", "mnist-scored", "--json"]));
    assert_eq!(scored["records"], 2000, "{scored}");

    // The next run finds nothing new: no version, and every later step is skipped.
    let idle = json(&mut c.cmd(&["pipeline", "run", "retrain", "--wait", "--json"]));
    assert_eq!((idle["state"].as_str(), step(&idle, "append")["outputs"]["new_records"].as_str()), (Some("succeeded"), Some("0")), "{idle}");
    assert!(idle["steps"].as_array().unwrap()[1..].iter().all(|s| s["state"] == "skipped"), "{idle}");
    assert_eq!(json(&mut c.cmd(&["data", "show", "mnist", "--json"]))["version"], 2);
}

/// A CSV table of `rows` records (features a, b; label y in 0..3) from `seed`.
fn csv(rows: usize, seed: usize) -> String {
    let mut out = String::from("a,b,y\n");
    for i in 0..rows {
        let k = (i * 7 + seed * 13) % 97;
        out += &format!("{}.5,{},{}\n", k % 10, k / 10, k % 3);
    }
    out
}

#[test]
fn an_append_step_adds_each_incoming_file_once_through_the_workers() {
    let c = UpCluster::start_with(&["--workers", "2"]);
    let first = c.write_spec("rows.csv", &csv(300, 0));
    ok(c.cmd(&["data", "import", "rows", "--label", "y"]).arg(&first));
    let incoming = c.store().join("incoming/rows");
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::write(incoming.join("day-1.csv"), csv(120, 1)).unwrap();
    std::fs::write(incoming.join("day-2.csv"), csv(80, 2)).unwrap();
    std::fs::write(incoming.join("README.txt"), "not a table").unwrap();
    let spec = "name = \"ingest\"\n[[step]]\nname = \"add\"\nkind = \"append\"\ndataset = \"rows\"\nformat = \"csv\"\nlabel = \"y\"\n\
                [[step]]\nname = \"check\"\nkind = \"validate\"\nneeds = [\"add\"]\ndataset = \"{steps.add.dataset}\"\nmin_records = 300\n";
    let run = json(c.cmd(&["pipeline", "submit", "--run", "--wait", "--json"]).arg(c.write_spec("ingest.toml", spec)));
    assert_eq!(run["state"], "succeeded", "{run}");
    let add = &run["steps"][0];
    assert_eq!((add["outputs"]["dataset"].as_str(), add["outputs"]["new_records"].as_str(), add["outputs"]["files"].as_str()), (Some("rows@2"), Some("200"), Some("2")), "{add}");
    let job = c.job(&add["job"].to_string());
    assert_eq!(job["workers"].as_array().map(|w| w.len()), Some(0), "the import ran on the workers and released them: {job}");
    let rows = json(&mut c.cmd(&["data", "show", "rows", "--json"]));
    assert_eq!((rows["version"].as_u64(), rows["records"].as_u64()), (Some(2), Some(500)), "{rows}");
    assert_eq!(run["steps"][1]["outputs"]["records"], "500", "{run}");
    // Nothing new: no job, no version.
    let again = json(&mut c.cmd(&["pipeline", "run", "ingest", "--wait", "--json"]));
    assert_eq!((again["steps"][0]["job"].as_u64(), again["steps"][0]["outputs"]["new_records"].as_str()), (Some(0), Some("0")), "{again}");
    assert_eq!(json(&mut c.cmd(&["data", "show", "rows", "--json"]))["version"], 2);
    // A new file: only it is added.
    std::fs::write(incoming.join("day-3.csv"), csv(50, 3)).unwrap();
    let third = json(&mut c.cmd(&["pipeline", "run", "ingest", "--wait", "--json"]));
    assert_eq!((third["steps"][0]["outputs"]["new_records"].as_str(), third["steps"][0]["outputs"]["dataset"].as_str()), (Some("50"), Some("rows@3")), "{third}");
    // A file that does not parse fails the step naming it, and adds nothing.
    std::fs::write(incoming.join("day-4.csv"), "a,b\n1,2\n").unwrap();
    let out = common::run(&mut c.cmd(&["pipeline", "run", "ingest", "--wait", "--json"]));
    let bad: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bad["state"], "failed", "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("day-4.csv"), "{bad}");
    assert_eq!(json(&mut c.cmd(&["data", "show", "rows", "--json"]))["version"], 3);
}
