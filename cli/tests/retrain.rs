//! Incremental retraining: a job warm-started from another job's model (`[init] checkpoint`),
//! trained only on the slices added since the dataset version that model saw
//! (`[dataset] slices = "new"`) plus a replay sample of the older records.

mod common;
use common::*;

fn spec(name: &str, version: u64, train: [u64; 2], epochs: u32, extra: &str, init: &str) -> String {
    format!(
        r#"name = "{name}"
[model]
kind = "mlp"
hidden = [128]
[dataset]
name = "digits"
version = {version}
train = [{}, {}]
test = [0, 2000]
{extra}
[training]
epochs = {epochs}
batch_size = 128
seed = 9
[training.optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
[cluster]
workers = 2
{init}"#,
        train[0], train[1]
    )
}

#[test]
fn retraining_on_the_new_slice_with_replay_matches_training_from_scratch_in_fewer_steps() {
    let c = UpCluster::start(2);
    let [x, y] = mnist_files();
    // Slice 1: the test records (MNIST 8000-9999), never trained on; slice 2: MNIST 0-3999;
    // slice 3, the new data: MNIST 4000-7999.
    ok(c.cmd(&["data", "import", "digits", "--records", "8000:10000"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "append", "digits", "--records", "0:4000"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "append", "digits", "--records", "4000:8000"]).arg(&x).arg(&y));

    let first = c.submit_follow(&c.write_spec("v1.toml", &spec("v1", 2, [2000, 6000], 5, "", "")));
    assert_eq!(first["state"], "succeeded", "{first}");
    let scratch = c.submit_follow(&c.write_spec("scratch.toml", &spec("scratch", 3, [2000, 10000], 5, "", "")));
    assert_eq!(scratch["state"], "succeeded", "{scratch}");

    let init = format!("[init]\ncheckpoint = \"{}\"\n", first["id"]);
    let warm = spec("warm", 3, [2000, 10000], 5, "slices = \"new\"\nreplay = 0.2", &init);
    let warm = c.submit_follow(&c.write_spec("warm.toml", &warm));
    assert_eq!(warm["state"], "succeeded", "{warm}");
    assert_eq!((warm["init"]["job"].clone(), warm["init"]["step"].clone()), (first["id"].clone(), first["total_steps"].clone()), "{warm}");
    assert_eq!(warm["new_from"], 6000, "version 2 held 6000 records: {warm}");
    // 4000 new records and 800 replayed: 37 batches an epoch.
    assert_eq!(warm["epoch_records"][0]["records"], 37 * 128, "{warm}");

    let (w, s) = (warm["test_accuracy"].as_f64().unwrap(), scratch["test_accuracy"].as_f64().unwrap());
    let (ws, ss) = (warm["total_steps"].as_u64().unwrap(), scratch["total_steps"].as_u64().unwrap());
    eprintln!("retrain: warm {w} in {ws} steps; scratch {s} in {ss} steps; first model {}", first["test_accuracy"]);
    assert!(ws < ss, "{ws} steps against {ss}");
    assert!(w >= s - 0.005, "warm start {w}, from scratch {s}");

    // Bad references are refused when submitted.
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad1.toml", &spec("b", 3, [2000, 10000], 1, "slices = \"new\"", ""))));
    assert!(e.contains("dataset.slices") && e.contains("[init]"), "{e}");
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad2.toml", &spec("b", 3, [2000, 10000], 1, "", "[init]\ncheckpoint = \"99\"\n"))));
    assert!(e.contains("no job 99"), "{e}");
    let at = format!("[init]\ncheckpoint = \"{}@7\"\n", first["id"]);
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad3.toml", &spec("b", 3, [2000, 10000], 1, "", &at))));
    assert!(e.contains("no checkpoint at step 7"), "{e}");
}
