//! Batch jobs (issue 11): scoring against the training job's accuracy and a plain forward
//! pass, a worker SIGKILLed mid-job, exec retries and timeouts, a fitted transform applied in
//! scoring, statistics, and a straggler's speculative copy.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Features and labels of MNIST as stored (u8).
fn mnist() -> (Vec<u8>, Vec<u8>) {
    let [x, y] = mnist_files();
    let (images, labels) = (shoal_core::idx::read_idx_file(&x).unwrap(), shoal_core::idx::read_idx_file(&y).unwrap());
    let (shoal_core::idx::IdxData::U8(images), shoal_core::idx::IdxData::U8(labels)) = (images.data, labels.data) else { panic!("MNIST is u8") };
    (images, labels)
}

/// A plain f64 forward pass of an exported MLP (PyTorch layout: y = x W^T + b): the
/// predicted class (first on ties) and the gap between its logit and the runner-up's.
fn reference_predict(model: &safetensors::SafeTensors, x: &[f32]) -> (usize, f64) {
    let tensor = |name: &str| -> (Vec<usize>, Vec<f64>) {
        let t = model.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect())
    };
    let layers: Vec<_> = (0..).map(|i| 2 * i).take_while(|i| model.tensor(&format!("{i}.weight")).is_ok()).map(|i| (tensor(&format!("{i}.weight")), tensor(&format!("{i}.bias")).1)).collect();
    let mut h: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (l, ((shape, w), b)) in layers.iter().enumerate() {
        let (out, inp) = (shape[0], shape[1]);
        h = (0..out).map(|o| b[o] + (0..inp).map(|i| w[o * inp + i] * h[i]).sum::<f64>()).map(|v| if l + 1 < layers.len() { v.max(0.0) } else { v }).collect();
    }
    let best = (0..h.len()).fold(0, |b, k| if h[k] > h[b] { k } else { b });
    let runner_up = (0..h.len()).filter(|&k| k != best).map(|k| h[k]).fold(f64::NEG_INFINITY, f64::max);
    (best, h[best] - runner_up)
}

/// Every shard of a dataset version, in order: the tensors' bytes by name.
fn shards(c: &UpCluster, name: &str, version: u64) -> Vec<std::collections::BTreeMap<String, Vec<u8>>> {
    let d = json(&mut c.cmd(&["data", "show", name, "--version", &version.to_string(), "--json"]));
    d["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let bytes = std::fs::read(c.store().join(s["path"].as_str().unwrap())).unwrap();
            assert_eq!(blake3::hash(&bytes).to_hex().to_string(), s["blake3"].as_str().unwrap());
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect()
        })
        .collect()
}

/// One tensor of every shard, concatenated.
fn column(shards: &[std::collections::BTreeMap<String, Vec<u8>>], name: &str) -> Vec<u8> {
    shards.iter().flat_map(|s| s[name].clone()).collect()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn batch_spec(name: &str, input: &str, records: Option<[u64; 2]>, operator: &str, output: Option<&str>, cluster: &str) -> String {
    let records = records.map(|[a, b]| format!("records = [{a}, {b}]\n")).unwrap_or_default();
    let output = output.map(|o| format!("[output]\ndataset = \"{o}\"\n")).unwrap_or_default();
    format!("name = \"{name}\"\nkind = \"batch\"\n[input]\ndataset = \"{input}\"\n{records}[operator]\n{operator}\n{output}[cluster]\n{cluster}\n")
}

fn submit(c: &UpCluster, file: &str, text: &str) -> String {
    let j = json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec(file, text)));
    j["id"].to_string()
}

fn train(c: &UpCluster, dataset: &str, train: [u64; 2], test: [u64; 2]) -> serde_json::Value {
    let spec = format!(
        "name = \"mlp\"\n[model]\nkind = \"mlp\"\nhidden = [64]\n[dataset]\nname = \"{dataset}\"\ntrain = [{}, {}]\ntest = [{}, {}]\n\
         [training]\nepochs = 2\nbatch_size = 128\nseed = 3\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n[cluster]\nworkers = 2\n",
        train[0], train[1], test[0], test[1]
    );
    let job = c.submit_follow(&c.write_spec("train.toml", &spec));
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

/// Exports job `id`'s model and checks every scored record's prediction against a plain
/// forward pass over it; `x(r)` gives record r's features as the model reads them.
fn check_against_reference(c: &UpCluster, id: &str, preds: &[i64], records: std::ops::Range<usize>, x: impl Fn(usize) -> Vec<f32>) {
    let out = c.tmp.path().join(format!("model-{id}.safetensors"));
    ok(c.cmd(&["checkpoint", "export", id]).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    let model = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(preds.len(), records.len());
    let mut ties = 0;
    for (r, &pred) in records.zip(preds) {
        let (want, gap) = reference_predict(&model, &x(r));
        if pred as usize != want {
            // Only a near tie may flip between a gemm's sum order and a plain loop's.
            assert!(gap < 1e-4, "record {r}: shoal predicted {pred}, the reference {want} (logit gap {gap})");
            ties += 1;
        }
    }
    assert!(ties <= 2, "{ties} near ties flipped");
}

#[test]
fn scoring_gives_the_training_accuracy_and_the_reference_predictions() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let trained = train(&c, "mnist", [0, 8000], [8000, 10000]);
    let id = trained["id"].to_string();
    let spec = batch_spec("score-test", "mnist", Some([8000, 10000]), &format!("kind = \"score\"\nmodel = \"job:{id}\""), Some("mnist-scores"), "workers = 2\nmax_attempts = 3");
    let job = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("score.toml", &spec)));
    assert_eq!((job["state"].as_str(), job["kind"].as_str()), (Some("succeeded"), Some("batch")), "{job}");
    assert_eq!(job["accuracy"], trained["test_accuracy"], "scoring must reproduce the training job's test accuracy exactly: {job}");
    // Records 8000-9999 lie in two of the five 2048-record shards: two tasks.
    assert_eq!((job["records_out"].as_u64(), job["tasks_total"].as_u64(), job["tasks_done"].as_u64(), job["tasks_failed"].as_u64()), (Some(2000), Some(2), Some(2), Some(0)), "{job}");
    assert_eq!(job["output_version"], 1);

    // The output: probabilities, predictions and the input's labels, with lineage.
    let d = json(&mut c.cmd(&["data", "show", "mnist-scores", "--json"]));
    assert_eq!((d["records"].as_u64(), d["feature_shape"].clone(), d["feature_dtype"].as_str()), (Some(2000), serde_json::json!([10]), Some("f32")), "{d}");
    let lineage = &d["slices"][0]["lineage"];
    assert_eq!((lineage["job"].to_string(), lineage["operator"].as_str(), lineage["model"].as_str()), (job["id"].to_string(), Some("score"), Some(format!("job:{id}").as_str())), "{d}");
    assert!(lineage["input"].as_str().unwrap().starts_with("mnist@1 [8000, 10000)"), "{d}");
    let out = shards(&c, "mnist-scores", 1);
    let (preds, labels, probs) = (i64s(&column(&out, "pred")), i64s(&column(&out, "y")), f32s(&column(&out, "x")));
    let (images, mnist_labels) = mnist();
    assert_eq!(labels, mnist_labels[8000..10000].iter().map(|&l| l as i64).collect::<Vec<_>>());
    for (row, &p) in probs.chunks_exact(10).zip(&preds) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4 && (0..10).all(|k| row[k] <= row[p as usize]), "{row:?} predicted {p}");
    }
    let correct = preds.iter().zip(&labels).filter(|(p, l)| p == l).count();
    assert_eq!(correct as f64 / 2000.0, job["accuracy"].as_f64().unwrap());
    check_against_reference(&c, &id, &preds, 8000..10000, |r| images[r * 784..(r + 1) * 784].iter().map(|&p| p as f32 / 255.0).collect());

    // By registry name, appended to the same output as version 2: the same predictions.
    ok(&mut c.cmd(&["model", "register", "digits", "--job", &id]));
    let spec = batch_spec("score-by-name", "mnist", Some([8000, 10000]), "kind = \"score\"\nmodel = \"digits@1\"", Some("mnist-scores"), "workers = 2");
    let again = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("score2.toml", &spec)));
    assert_eq!((again["state"].as_str(), again["output_version"].as_u64(), again["model"].as_str()), (Some("succeeded"), Some(2), Some("digits@1")), "{again}");
    let v2 = shards(&c, "mnist-scores", 2);
    assert_eq!(i64s(&column(&v2, "pred"))[2000..], preds[..], "version 2 = version 1 plus the new slice");

    // Bad input: a clear error naming the key, nothing queued.
    for (edit, want) in [
        (spec.replace("digits@1", "digits@9"), "operator.model: model digits has no version 9"),
        (spec.replace("records = [8000, 10000]", "records = [8000, 20000]"), "input.records"),
        (spec.replace("kind = \"score\"", "kind = \"score\"\ncolour = 3"), "colour"),
        (spec.replace("dataset = \"mnist\"", "dataset = \"nope\""), "input.dataset"),
    ] {
        let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad.toml", &edit)));
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    let jobs = json(&mut c.cmd(&["job", "list", "--json"]));
    assert_eq!(jobs.as_array().unwrap().len(), 3, "{jobs}");
}

#[test]
fn a_worker_killed_mid_job_leaves_exactly_the_fault_free_output() {
    let c = UpCluster::start_with(&["--workers", "0", "--lease-ms", "1500"]);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records-per-shard", "500"]).arg(&x).arg(&y));
    // Every task takes at least 300 ms, so the kill lands mid-job.
    let mut workers = c.spawn_workers(2, &[("SHOAL_FAILPOINTS", "batch_task_delay=300")]);
    let op = "kind = \"transform\"\nmethod = \"minmax\"";
    let clean = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("a.toml", &batch_spec("clean", "mnist", None, op, Some("clean"), "workers = 2"))));
    assert_eq!((clean["state"].as_str(), clean["records_out"].as_u64()), (Some("succeeded"), Some(10_000)), "{clean}");

    let id = submit(&c, "b.toml", &batch_spec("faulty", "mnist", None, op, Some("faulty"), "workers = 2\nmax_attempts = 3"));
    // 20 tasks per phase: kill a worker in the second phase, with output already committed.
    c.wait_job(&id, "tasks of the second phase to commit", Duration::from_secs(60), |j| j["tasks_done"].as_u64().unwrap_or(0) >= 24);
    workers[0].kill();
    let done = c.wait_end(&id);
    assert_eq!((done["state"].as_str(), done["records_out"].as_u64()), (Some("succeeded"), Some(10_000)), "{done}");
    let retried = done["tasks"].as_array().unwrap().iter().filter(|t| t["attempts"].as_u64() > Some(1)).count();
    assert!(retried >= 1, "the killed worker's task was retried elsewhere: {done}");
    let (a, b) = (shards(&c, "clean", 1), shards(&c, "faulty", 1));
    assert_eq!(a.len(), 20);
    for t in ["x", "y"] {
        let (ca, cb) = (column(&a, t), column(&b, t));
        assert_eq!(ca.len(), cb.len(), "tensor {t}: the same record count");
        assert_eq!(blake3::hash(&ca), blake3::hash(&cb), "tensor {t}: the same content, none missing, none twice");
    }
    // Only the committed shards remain: whatever the killed worker left was tidied away.
    let folder = c.store().join(format!("datasets/faulty/batch-{id}"));
    let files = std::fs::read_dir(&folder).unwrap().count();
    assert_eq!(files, 20, "files in {}", folder.display());
}

#[test]
fn exec_retries_a_failing_command_then_reports_its_exit_code_and_stderr_and_kills_a_hung_one() {
    let c = UpCluster::start(2);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records", "0:2000", "--records-per-shard", "500"]).arg(&x).arg(&y));
    let exec = |cmd: &str, extra: &str| format!("kind = \"exec\"\ncommand = [\"sh\", \"-c\", {cmd:?}, \"{{input}}\", \"{{output}}\"]\n{extra}");
    // A command that copies its input shard: the output is the input, record for record.
    let copy = exec("cp \"$0\" \"$1\"", "");
    let job = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("copy.toml", &batch_spec("copy", "mnist", Some([250, 1750]), &copy, Some("copied"), "workers = 2"))));
    assert_eq!((job["state"].as_str(), job["records_out"].as_u64(), job["tasks_total"].as_u64()), (Some("succeeded"), Some(1500), Some(4)), "{job}");
    let (images, _) = mnist();
    assert_eq!(column(&shards(&c, "copied", 1), "x"), images[250 * 784..1750 * 784]);

    // Fails on task 2, every time: three attempts, then the job fails with what it said.
    let failing = exec("if [ \"$SHOAL_TASK\" = 2 ]; then echo \"cannot read shard $SHOAL_TASK\" >&2; exit 7; fi; cp \"$0\" \"$1\"", "");
    let id = submit(&c, "fail.toml", &batch_spec("fail", "mnist", None, &failing, Some("never"), "workers = 2\nmax_attempts = 3"));
    let done = c.wait_end(&id);
    assert_eq!(done["state"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("task 2") && error.contains("failed 3 times") && error.contains("exit code 7") && error.contains("cannot read shard 2"), "{error}");
    assert_eq!((done["tasks_failed"].as_u64(), done["tasks"][2]["attempts"].as_u64()), (Some(1), Some(3)), "{done}");
    // Three attempts, plus any speculative copy of a slow one (not counted as an attempt).
    assert!(done["attempts_failed"].as_u64() >= Some(3), "{done}");
    let e = fails(&mut c.cmd(&["data", "show", "never"]));
    assert!(e.contains("never"), "a failed job adds no dataset: {e}");
    assert!(!c.store().join(format!("datasets/never/batch-{id}")).exists(), "and leaves no files");

    // Hangs: killed at its timeout.
    let hung = exec("sleep 60", "timeout_s = 1.0");
    let started = Instant::now();
    let id = submit(&c, "hang.toml", &batch_spec("hang", "mnist", Some([0, 500]), &hung, Some("never"), "workers = 1\nmax_attempts = 1"));
    let done = c.wait_end(&id);
    assert!(started.elapsed() < Duration::from_secs(50), "the command was not killed at its timeout");
    assert_eq!(done["state"], "failed", "{done}");
    assert!(done["error"].as_str().unwrap().contains("timed out after 1.0 s"), "{done}");

    // Cancelled while its command runs: the command is killed, the workers are free again and
    // nothing is left in the job's folder.
    let half = exec("if [ $SHOAL_TASK -ge 2 ]; then sleep 60; fi; cp \"$0\" \"$1\"", "");
    let id = submit(&c, "hang2.toml", &batch_spec("hang2", "mnist", None, &half, Some("never"), "workers = 2"));
    c.wait_job(&id, "two tasks to commit and two to hang", Duration::from_secs(30), |j| j["tasks_done"] == 2 && j["workers"].as_array().is_some_and(|w| w.len() == 2));
    let folder = c.store().join(format!("datasets/never/batch-{id}"));
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 2, "the committed shards");
    assert_eq!(json(&mut c.cmd(&["job", "cancel", &id, "--json"]))["state"], "cancelled");
    assert!(!folder.exists(), "a cancelled job leaves no files");
    wait_for("the workers to be idle", Duration::from_secs(20), || {
        let w = json(&mut c.cmd(&["worker", "list", "--json"]));
        w.as_array().unwrap().iter().all(|w| w["state"] == "idle").then_some(())
    });
}

#[test]
fn a_fitted_transform_scores_like_the_same_transform_applied_by_hand() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    // Fit standardization on the training records 0-3999 and write them transformed.
    let spec = batch_spec("fit", "mnist", Some([0, 4000]), "kind = \"transform\"\nmethod = \"standardize\"", Some("mnist-std"), "workers = 2");
    let fit = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("fit.toml", &spec)));
    assert_eq!((fit["state"].as_str(), fit["records_out"].as_u64(), fit["tasks_total"].as_u64()), (Some("succeeded"), Some(4000), Some(4)), "{fit}");
    let d = json(&mut c.cmd(&["data", "show", "mnist-std", "--json"]));
    let t = &d["transform"];
    let shift: Vec<f64> = t["shift"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let scale: Vec<f64> = t["scale"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!((t["method"].as_str(), shift.len()), (Some("standardize"), 784), "{d}");
    let apply = |pixels: &[u8]| -> Vec<f32> { pixels.iter().enumerate().map(|(j, &p)| ((p as f32 / 255.0) as f64 - shift[j]) * scale[j]).map(|v| v as f32).collect() };
    // The transformed dataset holds the training records standardized.
    let (images, _) = mnist();
    let stored = f32s(&column(&shards(&c, "mnist-std", 1), "x"));
    assert_eq!(stored[784 * 17..784 * 18], apply(&images[784 * 17..784 * 18])[..]);
    let means = d["stats"]["features"].as_array().unwrap();
    assert!(means.iter().all(|f| f["mean"].as_f64().unwrap().abs() < 1e-4), "standardized features have mean 0");

    // Train on the transformed records, then score raw test records through the same fit.
    let trained = train(&c, "mnist-std", [0, 3000], [3000, 4000]);
    let id = trained["id"].to_string();
    let spec = batch_spec("score", "mnist", Some([8000, 10000]), &format!("kind = \"score\"\nmodel = \"job:{id}\"\ntransform = \"mnist-std\""), Some("scores"), "workers = 2");
    let scored = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("score.toml", &spec)));
    assert_eq!(scored["state"], "succeeded", "{scored}");
    assert!(scored["accuracy"].as_f64().unwrap() > 0.8, "{scored}");
    let preds = i64s(&column(&shards(&c, "scores", 1), "pred"));
    check_against_reference(&c, &id, &preds, 8000..10000, |r| apply(&images[r * 784..(r + 1) * 784]));

    // Statistics of a dataset version, as `data show` reports them.
    let stats = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec("stats.toml", &batch_spec("stats", "mnist", None, "kind = \"stats\"", None, "workers = 2"))));
    assert_eq!(stats["state"], "succeeded", "{stats}");
    let shown = json(&mut c.cmd(&["data", "show", "mnist", "--json"]))["stats"].clone();
    assert_eq!(stats["stats"]["labels"], shown["labels"]);
    for (a, b) in stats["stats"]["features"].as_array().unwrap().iter().zip(shown["features"].as_array().unwrap()) {
        assert_eq!((&a["min"], &a["max"], &a["missing"]), (&b["min"], &b["max"], &b["missing"]));
        for k in ["mean", "std"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{k}: {x} vs {y}");
        }
    }
}

#[test]
fn a_straggler_gets_a_speculative_copy_and_the_first_commit_wins() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records", "0:4000", "--records-per-shard", "400"]).arg(&x).arg(&y));
    // Attempt 1 (the first task's first) sleeps 60 s; every other attempt is quick.
    let _w = c.spawn_workers(2, &[("SHOAL_FAILPOINTS", "batch_slow_attempt@1=60000")]);
    let copy = "kind = \"exec\"\ncommand = [\"cp\", \"{input}\", \"{output}\"]";
    let started = Instant::now();
    let id = submit(&c, "copy.toml", &batch_spec("copy", "mnist", None, copy, Some("copied"), "workers = 2\nspeculation = 2.0"));
    let done = c.wait_end(&id);
    assert_eq!((done["state"].as_str(), done["records_out"].as_u64()), (Some("succeeded"), Some(4000)), "{done}");
    assert!(started.elapsed() < Duration::from_secs(50), "the job waited for its straggler");
    let first = done["tasks"].as_array().unwrap().iter().find(|t| t["attempts"].as_u64() == Some(1) && t["index"] == 0).expect("task 0");
    assert!(!first["output"].as_str().unwrap().ends_with("-a1.safetensors"), "the speculative copy committed, not the straggler's attempt 1: {done}");
    let (images, _) = mnist();
    assert_eq!(column(&shards(&c, "copied", 1), "x"), images[..4000 * 784], "every record once, in order");
    // The straggler was stopped: it wrote nothing.
    let folder = c.store().join(format!("datasets/copied/batch-{id}"));
    assert!(!Path::new(&folder.join("task-00000-a1.safetensors")).exists());
}

#[test]
fn a_training_job_starts_while_a_batch_job_runs_and_the_batch_job_finishes_after() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records-per-shard", "500"]).arg(&x).arg(&y));
    let _w = c.spawn_workers(2, &[("SHOAL_FAILPOINTS", "batch_task_delay=300")]);
    let id = submit(&c, "stats.toml", &batch_spec("stats", "mnist", None, "kind = \"stats\"", None, "workers = 2"));
    c.wait_job(&id, "the batch job to get going", Duration::from_secs(30), |j| j["tasks_done"].as_u64() >= Some(2));
    // A training job that needs both workers: the batch tasks hand them over as they end.
    let spec = mnist_spec("mnist", 1, 2000, 1, "[32]");
    let trained = c.submit_follow(&c.write_spec("train.toml", &spec));
    assert_eq!(trained["state"], "succeeded", "{trained}");
    let mid = c.job(&id);
    assert!(mid["tasks_done"].as_u64() < Some(20), "the training job did not wait for the whole batch job: {mid}");
    let done = c.wait_end(&id);
    assert_eq!((done["state"].as_str(), done["tasks_done"].as_u64()), (Some("succeeded"), Some(20)), "{done}");
    let shown = json(&mut c.cmd(&["data", "show", "mnist", "--json"]))["stats"].clone();
    assert_eq!(done["stats"]["labels"], shown["labels"]);
}

#[test]
fn a_training_job_does_not_wait_for_long_batch_attempts() {
    let c = UpCluster::start(2);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "mnist", "--records-per-shard", "4000"]).arg(&x).arg(&y));
    // The first two attempts would take a minute; the job's later attempts are quick.
    let slow = "kind = \"exec\"\ncommand = [\"sh\", \"-c\", \"if [ $SHOAL_ATTEMPT -le 2 ]; then sleep 60; fi; cp \\\"$0\\\" \\\"$1\\\"\", \"{input}\", \"{output}\"]";
    let id = submit(&c, "slow.toml", &batch_spec("slow", "mnist", Some([0, 8000]), slow, Some("copied"), "workers = 2"));
    c.wait_job(&id, "both attempts to run", Duration::from_secs(30), |j| j["workers"].as_array().is_some_and(|w| w.len() == 2));
    let started = Instant::now();
    let trained = c.submit_follow(&c.write_spec("train.toml", &mnist_spec("mnist", 1, 2000, 1, "[32]")));
    assert_eq!(trained["state"], "succeeded", "{trained}");
    assert!(started.elapsed() < Duration::from_secs(40), "the training job waited for the batch attempts");
    // The stopped attempts were not the tasks' failures: each task committed on its next try.
    let done = c.wait_end(&id);
    assert_eq!((done["state"].as_str(), done["records_out"].as_u64(), done["attempts_failed"].as_u64()), (Some("succeeded"), Some(8000), Some(0)), "{done}");
    assert!(done["tasks"].as_array().unwrap().iter().all(|t| t["attempts"] == 1), "{done}");
}
