//! Checkpoints and exact resume with real processes: every worker killed mid-epoch, the
//! cluster stopped and started, a crash at each point of a checkpoint write, a corrupted file,
//! a full disk, a resume on more workers, and the export for PyTorch.
//!
//! Resumed runs are compared bitwise with an uninterrupted run of the same spec on the same
//! kind of workers (one compute thread each). Steps are slowed down (a test fault point) only
//! where a test must interrupt a job mid-flight.

mod common;
use std::path::Path;
use std::time::Duration;

use common::*;

const SLOW: (&str, &str) = ("SHOAL_FAILPOINTS", "step-delay-ms=30");

/// MLP 784-64-10 on 4096 records: 32 steps an epoch, 3 epochs (96 steps), a checkpoint every
/// 10 steps (so most are mid-epoch).
fn spec(optimizer: &str, keep: u32) -> String {
    format!(
        r#"name = "ckpt"
[model]
kind = "mlp"
hidden = [64]
[dataset]
name = "mnist"
train = [0, 4096]
test = [8000, 10000]
[training]
epochs = 3
batch_size = 128
seed = 5
[training.optimizer]
{optimizer}
[cluster]
workers = 2
[checkpoint]
every_steps = 10
keep = {keep}
"#
    )
}

const SGD: &str = "kind = \"sgd\"\nlr = 0.05\nmomentum = 0.9";
const ADAMW: &str = "kind = \"adamw\"\nlr = 0.002";

fn submit(c: &UpCluster, spec: &Path) -> String {
    json(c.cmd(&["job", "submit", "--json"]).arg(spec))["id"].to_string()
}

fn hash(job: &serde_json::Value) -> &str {
    job["results"][0]["param_blake3"].as_str().unwrap_or_else(|| panic!("no results: {job}"))
}

/// Submits `spec`, cancels it once a checkpoint at `min_step` or later is committed, and
/// returns its id and committed steps.
fn run_then_cancel(c: &UpCluster, spec: &Path, min_step: u64) -> (String, Vec<u64>) {
    let id = submit(c, spec);
    c.wait_job(&id, "a committed checkpoint", Duration::from_secs(60), |j| j["checkpoint"].as_u64().is_some_and(|s| s >= min_step));
    ok(&mut c.cmd(&["job", "cancel", &id]));
    let steps = checkpoint_steps(c, &id);
    (id, steps)
}

fn checkpoint_steps(c: &UpCluster, id: &str) -> Vec<u64> {
    let l = json(&mut c.cmd(&["checkpoint", "list", id, "--json"]));
    l.as_array().unwrap().iter().map(|m| m["step"].as_u64().unwrap()).collect()
}

/// The resumed run ended where the uninterrupted one did, to the bit, from a checkpoint
/// taken mid-epoch.
fn assert_resumed_exactly(done: &serde_json::Value, reference: &serde_json::Value, min_step: u64) -> u64 {
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(hash(done), hash(reference), "resumed run differs from the uninterrupted one: {done}");
    assert_eq!(done["test_accuracy"], reference["test_accuracy"]);
    let from = done["resumed_from"].as_u64().unwrap_or_else(|| panic!("not resumed: {done}"));
    assert!(from >= min_step && from.is_multiple_of(10) && from < 96, "resumed from step {from}: {done}");
    assert!(done["restarts"].as_u64().unwrap() >= 1, "{done}");
    assert!(done["generation"].as_u64().unwrap() >= 2, "{done}");
    from
}

#[test]
fn killing_every_worker_mid_epoch_resumes_bitwise() {
    let c = UpCluster::start_with(&["--workers", "0", "--lease-ms", "1000"]);
    c.import_mnist("mnist");
    let mut workers = c.spawn_workers(2, &[SLOW]);
    // AdamW: its moments and step count must come back exactly too.
    let spec = c.write_spec("adamw.toml", &spec(ADAMW, 3));
    let reference = c.submit_follow(&spec);
    assert_eq!(reference["state"], "succeeded", "{reference}");
    assert!(reference["resumed_from"].is_null() && reference["restarts"] == 0, "{reference}");

    let id = submit(&c, &spec);
    c.wait_job(&id, "a committed checkpoint", Duration::from_secs(60), |j| j["checkpoint"].as_u64().is_some_and(|s| s >= 20));
    for w in &mut workers {
        w.kill();
    }
    let killed_at = c.job(&id)["step"].as_u64().unwrap();
    assert!(killed_at < 96, "the job ended before the kill");
    let _fresh = c.spawn_workers(2, &[SLOW]);
    let done = c.wait_end(&id);
    let from = assert_resumed_exactly(&done, &reference, 20);
    assert_ne!(from % 32, 0, "step {from} is an epoch boundary, not mid-epoch");
}

#[test]
fn stopping_and_starting_the_cluster_resumes_bitwise() {
    let c = UpCluster::start_env(&["--workers", "2"], &[SLOW]);
    c.import_mnist("mnist");
    let spec = c.write_spec("sgd.toml", &spec(SGD, 3));
    let reference = c.submit_follow(&spec);
    let id = submit(&c, &spec);
    c.wait_job(&id, "a committed checkpoint", Duration::from_secs(60), |j| j["checkpoint"].as_u64().is_some_and(|s| s >= 20));
    ok(&mut c.cmd(&["down"]));
    ok(shoal().args(["up", "--workers", "2", "--dir"]).arg(c.dir()).env(SLOW.0, SLOW.1));
    let done = c.wait_end(&id);
    assert_resumed_exactly(&done, &reference, 20);
    assert!(done["restart_cause"].as_str().unwrap().contains("stopped"), "{done}");
}

#[test]
fn a_crash_at_each_point_of_a_write_keeps_the_previous_checkpoint() {
    let c = UpCluster::start_with(&["--workers", "0", "--lease-ms", "1000"]);
    c.import_mnist("mnist");
    let spec = c.write_spec("sgd.toml", &spec(SGD, 3));
    let reference = {
        let _w = c.spawn_workers(2, &[]);
        c.submit_follow(&spec)
    };
    // (fault point, workers it crashes, what it leaves in the step-20 folder)
    for (point, crashes, leaves) in [
        ("checkpoint-after-files", 2, ".part-"),
        ("checkpoint-after-rename", 2, "part-0.safetensors"),
        ("checkpoint-before-commit", 1, "manifest.pb"),
    ] {
        // Slow steps: a fast run would skip checkpoint 20 while 10 is still being written.
        let armed = format!("step-delay-ms=30,{point}@20");
        let mut workers = c.spawn_workers(2, &[("SHOAL_FAILPOINTS", &armed)]);
        let id = submit(&c, &spec);
        wait_for(&format!("{crashes} worker(s) to crash at {point}"), Duration::from_secs(60), || {
            (workers.iter_mut().map(|w| w.exited()).filter(|&e| e).count() >= crashes).then_some(())
        });
        for w in &mut workers {
            w.kill();
        }
        let j = c.job(&id);
        assert_eq!(j["checkpoint"], 10, "{point}: the previous checkpoint must stay the resume point: {j}");
        let folder = c.store().join(format!("jobs/{id}/checkpoints/step-20"));
        let names: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().any(|n| n.starts_with(leaves)), "{point}: expected {leaves}* in {names:?}");

        let _clean = c.spawn_workers(2, &[]);
        let done = c.wait_end(&id);
        let from = assert_resumed_exactly(&done, &reference, 10);
        assert_eq!(from, 10, "{point}");
    }
}

#[test]
fn a_corrupted_checkpoint_is_named_and_the_one_before_it_loads() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    c.import_mnist("mnist");
    let _workers = c.spawn_workers(2, &[SLOW]);
    let spec = c.write_spec("sgd.toml", &spec(SGD, 10));
    let reference = c.submit_follow(&spec);
    let (id, steps) = run_then_cancel(&c, &spec, 30);
    let (latest, previous) = (steps[steps.len() - 1], steps[steps.len() - 2]);
    let victim = c.store().join(format!("jobs/{id}/checkpoints/step-{latest}/part-1.safetensors"));
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();

    let resumed = json(&mut c.cmd(&["job", "resume", &id, "--json"]));
    assert_eq!(resumed["state"], "queued", "{resumed}");
    let done = c.wait_end(&id);
    assert_eq!(assert_resumed_exactly(&done, &reference, 10), previous, "{done}");
    let err = done["checkpoint_error"].as_str().unwrap_or_else(|| panic!("the corruption was not reported: {done}"));
    assert!(err.contains(&format!("step {latest}")) && err.contains("part-1.safetensors") && err.contains("blake3"), "{err}");
}

#[test]
fn a_failed_write_is_reported_and_training_goes_on() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    c.import_mnist("mnist");
    let spec = c.write_spec("sgd.toml", &spec(SGD, 20));
    let full = {
        let _w = c.spawn_workers(2, &[("SHOAL_FAILPOINTS", "step-delay-ms=30,checkpoint-enospc@20")]);
        c.submit_follow(&spec)
    };
    assert_eq!(full["state"], "succeeded", "{full}");
    let err = full["checkpoint_error"].as_str().unwrap_or_else(|| panic!("no error reported: {full}"));
    assert!(err.contains("step 20") && err.contains("No space left on device"), "{err}");
    let id = full["id"].to_string();
    // Every checkpoint but 20 was written, or skipped (counted) when it came due while the one
    // before was still being written.
    let steps = checkpoint_steps(&c, &id);
    assert!(steps.first() == Some(&10) && steps.last() == Some(&96) && !steps.contains(&20), "{steps:?}");
    assert_eq!(steps.len() as u64 + full["checkpoints_skipped"].as_u64().unwrap(), 9, "{steps:?}: {full}");
    let folder = c.store().join(format!("jobs/{id}/checkpoints/step-20"));
    let left: Vec<_> = std::fs::read_dir(&folder).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "a failed write left files behind: {left:?}");

    let _w = c.spawn_workers(2, &[]);
    let clean = c.submit_follow(&spec);
    assert_eq!(hash(&full), hash(&clean), "a failed checkpoint write changed the training");
}

#[test]
fn a_two_worker_checkpoint_resumes_on_three_workers() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    c.import_mnist("mnist");
    let _workers = c.spawn_workers(3, &[SLOW]);
    let spec = c.write_spec("sgd.toml", &spec(SGD, 20));
    let reference = c.submit_follow(&spec);
    let (id, before) = run_then_cancel(&c, &spec, 20);
    let resumed = json(&mut c.cmd(&["job", "resume", &id, "--workers", "3", "--json"]));
    assert_eq!((resumed["state"].as_str(), resumed["world_size"].as_u64()), (Some("queued"), Some(3)), "{resumed}");
    let done = c.wait_end(&id);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["workers"].as_array().unwrap().len(), 3, "{done}");
    assert_eq!(done["resumed_from"].as_u64(), before.last().copied(), "{done}");
    let (acc, want) = (done["test_accuracy"].as_f64().unwrap(), reference["test_accuracy"].as_f64().unwrap());
    assert!((acc - want).abs() <= 0.01, "3-worker resume reached {acc}, the 2-worker run {want}");
    let list = json(&mut c.cmd(&["checkpoint", "list", &id, "--json"]));
    let worlds: Vec<u64> = list.as_array().unwrap().iter().map(|m| m["world_size"].as_u64().unwrap()).collect();
    assert!(worlds.first() == Some(&2) && worlds.last() == Some(&3), "{worlds:?}");
    assert_eq!(list.as_array().unwrap().last().unwrap()["files"].as_array().unwrap().len(), 3, "each of 3 ranks wrote a part");
}

/// A plain forward pass of the exported MLP (PyTorch layout: `y = x W^T + b`), no candle.
fn reference_accuracy(model: &safetensors::SafeTensors, images: &[u8], labels: &[u8], records: std::ops::Range<usize>) -> f64 {
    let tensor = |name: &str| {
        let t = model.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        (t.shape().to_vec(), v)
    };
    let layers: Vec<_> = (0..).map(|i| 2 * i).take_while(|i| model.tensor(&format!("{i}.weight")).is_ok()).map(|i| (tensor(&format!("{i}.weight")), tensor(&format!("{i}.bias")).1)).collect();
    let mut correct = 0;
    for r in records.clone() {
        let mut h: Vec<f32> = images[r * 784..(r + 1) * 784].iter().map(|&p| p as f32 / 255.0).collect();
        for (l, ((shape, w), b)) in layers.iter().enumerate() {
            let (out, inp) = (shape[0], shape[1]);
            let mut next: Vec<f32> = (0..out).map(|o| b[o] + (0..inp).map(|i| w[o * inp + i] * h[i]).sum::<f32>()).collect();
            if l + 1 < layers.len() {
                next.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            h = next;
        }
        let pred = (0..h.len()).max_by(|&a, &b| h[a].total_cmp(&h[b])).unwrap();
        correct += (pred == labels[r] as usize) as usize;
    }
    correct as f64 / records.len() as f64
}

#[test]
fn checkpoints_list_show_and_export_for_pytorch() {
    let c = UpCluster::start_env(&["--workers", "2"], &[SLOW]);
    c.import_mnist("mnist");
    let job = c.submit_follow(&c.write_spec("sgd.toml", &spec(SGD, 3)));
    assert_eq!(job["state"], "succeeded", "{job}");
    let id = job["id"].to_string();

    let list = json(&mut c.cmd(&["checkpoint", "list", &id, "--json"]));
    let list = list.as_array().unwrap();
    let steps: Vec<u64> = list.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    // keep = 3; a periodic one may have been skipped (counted) while another was written.
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(steps[2] == 96 && steps[..2].iter().all(|s| s % 10 == 0 && *s >= 60), "{steps:?}");
    for m in list {
        assert_eq!(m["world_size"], 2);
        assert!(m["bytes"].as_u64().unwrap() > 2 * 4 * 50_000, "{m}");
        assert!(m["committed"].as_str().unwrap().ends_with('Z'), "{m}");
        for f in m["files"].as_array().unwrap() {
            let path = c.store().join(m["dir"].as_str().unwrap()).join(f["name"].as_str().unwrap());
            assert_eq!(blake3::hash(&std::fs::read(path).unwrap()).to_hex().to_string(), f["blake3"].as_str().unwrap());
        }
    }
    assert_eq!(list[1]["epoch"].as_u64(), Some(steps[1] / 32));
    assert_eq!(list[1]["position"].as_u64(), Some(steps[1] % 32));
    for gone in [10, 20, 50] {
        assert!(!c.store().join(format!("jobs/{id}/checkpoints/step-{gone}")).exists(), "step {gone} outlived retention");
    }
    let latest = json(&mut c.cmd(&["checkpoint", "show", &id, "--json"]));
    assert_eq!(latest["step"], 96);
    assert_eq!((latest["model_kind"].as_str(), latest["optimizer_kind"].as_str()), (Some("mlp"), Some("sgd")));
    let middle = steps[1].to_string();
    assert_eq!(json(&mut c.cmd(&["checkpoint", "show", &id, &middle, "--json"]))["step"], steps[1]);
    let e = fails(&mut c.cmd(&["checkpoint", "show", &id, "11"]));
    assert!(e.contains("no committed checkpoint at step 11") && e.contains(&format!("{middle}, 96")), "{e}");

    let out = c.tmp.path().join("model.safetensors");
    let exported = json(c.cmd(&["checkpoint", "export", &id, "--json"]).arg(&out));
    assert_eq!(exported["step"], 96);
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    names.sort();
    let want = [("0.bias", vec![64]), ("0.weight", vec![64, 784]), ("2.bias", vec![10]), ("2.weight", vec![10, 64])];
    assert_eq!(names, want.iter().map(|(n, s)| (n.to_string(), s.clone())).collect::<Vec<_>>());
    let [x, y] = mnist_files();
    let (images, labels) = (shoal_core::idx::read_idx_file(&x).unwrap(), shoal_core::idx::read_idx_file(&y).unwrap());
    let (shoal_core::idx::IdxData::U8(images), shoal_core::idx::IdxData::U8(labels)) = (images.data, labels.data) else { panic!("MNIST is u8") };
    let acc = reference_accuracy(&st, &images, &labels, 8000..10000);
    let reported = job["test_accuracy"].as_f64().unwrap();
    // The same parameters; only the order of float sums differs, which may flip a near tie.
    assert!((acc - reported).abs() <= 1.0 / 2000.0 + 1e-9, "reference forward {acc}, shoal reported {reported}");

    // Bad input: a clear error, nothing changed.
    let e = fails(&mut c.cmd(&["job", "resume", &id]));
    assert!(e.contains("already succeeded"), "{e}");
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("keep0.toml", &spec(SGD, 0))));
    assert!(e.contains("checkpoint.keep"), "{e}");
    let big = c.write_spec("big.toml", &spec(SGD, 3).replace("workers = 2", "workers = 3"));
    let waiting = submit(&c, &big);
    let e = fails(c.cmd(&["checkpoint", "export", &waiting]).arg(c.tmp.path().join("none.safetensors")));
    assert!(e.contains("has no committed checkpoint"), "{e}");
    let e = fails(&mut c.cmd(&["job", "resume", &waiting]));
    assert!(e.contains("queued") && e.contains("failed or cancelled"), "{e}");
    assert!(!c.tmp.path().join("none.safetensors").exists());
    ok(&mut c.cmd(&["job", "cancel", &waiting]));
    assert_eq!(c.job(&id)["state"], "succeeded");
}

#[test]
fn checkpoints_come_due_by_the_clock_too() {
    let c = UpCluster::start_env(&["--workers", "2"], &[SLOW]);
    c.import_mnist("mnist");
    // No step interval: only rank 0's clock (every 0.4 s of ~3 s of training) and the end.
    let text = spec(SGD, 100).replace("every_steps = 10\n", "every_seconds = 0.4\n");
    let job = c.submit_follow(&c.write_spec("clock.toml", &text));
    assert_eq!(job["state"], "succeeded", "{job}");
    let steps = checkpoint_steps(&c, &job["id"].to_string());
    assert!(steps.len() >= 4, "expected several timed checkpoints: {steps:?}");
    assert_eq!(steps.last(), Some(&96));
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
}
