//! Regression end to end, with real processes: the diabetes table (data/diabetes) imported
//! with `--target`, trained with `loss = "mse"` (examples/diabetes-regression.toml) to an R²
//! within 0.05 of scikit-learn's Ridge on the same split; batch scoring reports the same
//! metrics and writes the predictions beside the targets; the `[promote]` gate reads a
//! lower-is-better metric in its direction; a loss that does not fit the data is refused
//! at submission.

mod common;

use common::*;

/// scikit-learn 1.9.1's `Ridge(alpha=0.1)` on records [0, 352) against [352, 442), features
/// as f32 (data/diabetes/LICENSE.md): computed once, recorded here.
const RIDGE_R2: f64 = 0.5340;
const RIDGE_RMSE: f64 = 54.681;

fn diabetes() -> std::path::PathBuf {
    repo().join("data/diabetes/diabetes.csv")
}

fn example() -> String {
    std::fs::read_to_string(repo().join("examples/diabetes-regression.toml")).unwrap()
}

fn metric(j: &serde_json::Value, key: &str) -> f64 {
    j[key].as_f64().unwrap_or_else(|| panic!("no {key}: {j}"))
}

#[test]
fn the_diabetes_example_trains_to_ridges_r2_and_scoring_and_the_gate_read_its_metrics() {
    // Structured logs: every process of this cluster writes one JSON object a line.
    let c = UpCluster::start_with(&["--workers", "3", "--log-format", "json"]);
    let d = json(c.cmd(&["data", "import", "diabetes", "--target", "progression", "--json"]).arg(diabetes()));
    assert_eq!((d["records"].as_u64(), d["classes"].as_u64(), d["target_width"].as_u64(), d["feature_shape"].clone()), (Some(442), Some(0), Some(1), serde_json::json!([10])), "{d}");

    // Trained with mean squared error: R² within 0.05 of Ridge's, RMSE near it.
    let job = c.submit_follow(&c.write_spec("reg.toml", &example()));
    assert_eq!(job["state"], "succeeded", "{job}");
    let (r2, rmse, loss) = (metric(&job, "test_r2"), metric(&job, "test_rmse"), metric(&job, "test_loss"));
    assert!(r2 >= RIDGE_R2 - 0.05, "test R² {r2} is more than 0.05 below Ridge's {RIDGE_R2}: {job}");
    assert!(rmse <= RIDGE_RMSE * 1.05, "test RMSE {rmse} against Ridge's {RIDGE_RMSE}: {job}");
    assert!((loss - rmse * rmse).abs() <= 1e-6 * loss, "test_loss is the MSE: {loss} against {rmse}²");
    assert!(job["test_accuracy"].is_null(), "a regression has no accuracy: {job}");
    let id = job["id"].to_string();
    // The plain status reads as a person reads it: no quotes, grouped digits, units.
    let plain = ok(&mut c.cmd(&["job", "status", &id]));
    assert!(plain.contains("  state: succeeded\n") && plain.contains(&format!("  test_r2: {:.4}\n", r2)), "{plain}");
    let sps = plain.lines().find_map(|l| l.strip_prefix("  samples_per_s: ")).unwrap_or_else(|| panic!("{plain}"));
    assert!(sps.chars().all(|c| c.is_ascii_digit() || c == ',') && (sps.len() < 4 || sps.contains(',')), "{sps}");
    let secs = plain.lines().find_map(|l| l.strip_prefix("  train_seconds: ")).unwrap_or_else(|| panic!("{plain}"));
    assert!(secs.ends_with(" ms") || secs.ends_with(" s"), "{secs}");

    // Batch scoring: the same metrics on the same records; predictions beside the targets.
    let score = format!(
        "name = \"score-reg\"\nkind = \"batch\"\n[input]\ndataset = \"diabetes\"\nrecords = [352, 442]\n\
         [operator]\nkind = \"score\"\nmodel = \"job:{id}\"\n[output]\ndataset = \"diabetes-pred\"\n[cluster]\nworkers = 2\n"
    );
    let scored = c.submit_follow(&c.write_spec("score.toml", &score));
    assert_eq!(scored["state"], "succeeded", "{scored}");
    for key in ["test_r2", "test_rmse", "test_loss"] {
        let (a, b) = (metric(&scored, key), metric(&job, key));
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "scoring's {key} {a} is not training's {b}");
    }
    let out = json(&mut c.cmd(&["data", "show", "diabetes-pred", "--json"]));
    assert_eq!((out["records"].as_u64(), out["feature_shape"].clone(), out["target_width"].as_u64()), (Some(90), serde_json::json!([1]), Some(1)), "{out}");

    // Every worker log line is a JSON object; once the worker registered, each names it, and
    // the job's lines carry the job and the rank.
    let mut job_lines = 0;
    for n in 1..=3 {
        let log = std::fs::read_to_string(c.dir().join("workers").join(n.to_string()).join("log")).unwrap();
        let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("worker {n}: {e}: {l}"))).collect();
        let at = lines.iter().position(|l| l["message"] == "registered").unwrap_or_else(|| panic!("worker {n} never registered: {log}"));
        let node = lines[at]["worker"].as_str().unwrap().to_string();
        assert!(lines[at..].iter().all(|l| l["node"] == node.as_str()), "worker {n}: a line without node {node}: {log}");
        for l in lines.iter().filter(|l| l["message"] == "joined the collective") {
            assert!(l["job_id"].as_u64().is_some() && l["rank"].as_u64().is_some(), "{l}");
            job_lines += 1;
        }
    }
    assert!(job_lines >= 2, "no job lines with job_id and rank");
    let coordinator = std::fs::read_to_string(c.dir().join("coordinators").join("1").join("log")).unwrap();
    assert!(coordinator.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["node"] == "coordinator-1")), "{coordinator}");

    // With lanes the regression's bits do not depend on the pool: 2 and 3 workers agree.
    let lanes = |workers: u32| example().replace("epochs = 120", "epochs = 10").replace("loss = \"mse\"", "loss = \"mse\"\nlanes = 4").replace("workers = 2", &format!("workers = {workers}"));
    let on2 = c.submit_follow(&c.write_spec("lanes2.toml", &lanes(2)));
    let on3 = c.submit_follow(&c.write_spec("lanes3.toml", &lanes(3)));
    assert_eq!((on2["world_size"].as_u64(), on3["world_size"].as_u64()), (Some(2), Some(3)), "{on2}\n{on3}");
    assert_eq!(on2["results"][0]["param_blake3"], on3["results"][0]["param_blake3"], "lanes: 2 and 3 workers end with different bits");
    assert_eq!(on2["test_r2"], on3["test_r2"], "the same model scores the same on any split of the test records");

    // The gate on a lower-is-better metric: a run of 2 epochs has a larger RMSE than the
    // holder's and is not promoted; the first had no holder and was.
    let gated = |epochs: u32| {
        example()
            .replace("epochs = 120", &format!("epochs = {epochs}"))
            .replace("name = \"diabetes-regression\"", &format!("name = \"diabetes-regression\"\ngroup = \"gate\"\ntags = [\"epochs-{epochs}\"]"))
            + "[register]\nname = \"diabetes-linear\"\n[promote]\nalias = \"production\"\nmetric = \"test_rmse\"\nmin_delta = 0.0\nholdout = \"diabetes\"\n"
    };
    let first = c.submit_follow(&c.write_spec("gate1.toml", &gated(120)));
    assert!(first["promotion"].as_str().unwrap_or_default().starts_with("promoted"), "{first}");
    let worse = c.submit_follow(&c.write_spec("gate2.toml", &gated(2)));
    let why = worse["promotion"].as_str().unwrap_or_default();
    assert!(why.starts_with("not promoted") && why.contains("holdout rmse") && why.contains("above version 1's"), "{worse}");
    // The PyTorch module of the registered model: one Linear(10, 1), its input the 10 features.
    let code = ok(&mut c.cmd(&["model", "torch", "diabetes-linear@1"]));
    assert!(code.contains("nn.Linear(10, 1, bias=True),  # 0: linear [10] -> [1]") && code.contains("INPUT_SHAPE = (10,)"), "{code}");
    // The two gated runs are the experiment "gate", newest first, with their tags.
    let group = json(&mut c.cmd(&["job", "list", "--group", "gate", "--json"]));
    let runs: Vec<(u64, String)> = group.as_array().unwrap().iter().map(|j| (j["id"].as_u64().unwrap(), j["tags"][0].as_str().unwrap().to_string())).collect();
    assert_eq!(runs, vec![(worse["id"].as_u64().unwrap(), "epochs-2".to_string()), (first["id"].as_u64().unwrap(), "epochs-120".to_string())], "{group}");
    assert_eq!(first["group"], "gate");
    let v = json(&mut c.cmd(&["model", "show", "diabetes-linear@2", "--json"]));
    assert_eq!(v["metric"], "test_rmse", "{v}");
    assert!(metric(&v, "holdout_score") > metric(&v, "holder_score"), "{v}");
    assert!(metric(&v, "test_r2") < r2, "{v}");

    // A loss or a head that does not fit the data is refused at submission, naming the key.
    for (edit, want) in [
        (example().replace("loss = \"mse\"", "loss = \"cross_entropy\""), "training.loss: the dataset has float targets"),
        (example().replace("loss = \"mse\"\n", ""), "set loss = \"mse\""),
        (example().replace("out = 1", "out = 2"), "model.layers[0] (linear): the last layer gives 2 outputs, but the dataset has 1 target(s) per record; set out = 1"),
        (gated(5).replace("metric = \"test_rmse\"", "metric = \"test_accuracy\""), "promote.metric: test_accuracy needs class labels"),
    ] {
        let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad.toml", &edit)));
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    // Class labels trained with "mse", and a slice of labels appended to targets: refused.
    let labelled = c.tmp.path().join("labelled.csv");
    let text = std::fs::read_to_string(diabetes()).unwrap();
    let mut rows: Vec<String> = text.lines().take(40).map(str::to_string).collect();
    rows[0] = rows[0].replace("progression", "label");
    for (i, r) in rows.iter_mut().enumerate().skip(1) {
        let cut = r.rfind(',').unwrap();
        r.replace_range(cut + 1.., &(i % 2).to_string());
    }
    std::fs::write(&labelled, rows.join("\n") + "\n").unwrap();
    ok(c.cmd(&["data", "import", "labelled", "--label", "label"]).arg(&labelled));
    let mse_on_labels = example().replace("name = \"diabetes\"", "name = \"labelled\"").replace("test = [352, 442]", "test = [32, 39]");
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad.toml", &mse_on_labels)));
    assert!(e.contains("training.loss: \"mse\" needs float targets, but the dataset has class labels"), "{e}");
    let e = fails(c.cmd(&["data", "append", "diabetes", "--label", "label"]).arg(&labelled));
    assert!(e.contains("the slice has class labels; the dataset has 1 float target(s) per record"), "{e}");
    let e = fails(c.cmd(&["data", "import", "nope", "--target", "nope"]).arg(diabetes()));
    assert!(e.contains("no column \"nope\" for the target"), "{e}");
}
