//! Models written as layer lists, with real processes: the 3-conv-block example (dropout,
//! layer norm) trains on MNIST, resumes bitwise across `down`/`up`, and with lanes ends with
//! the same bits on 2 and on 3 workers; RGB images train through 3-channel convolutions; wrong
//! shapes are refused by `job submit`, each error naming the layer and the shapes.

mod common;
use std::time::Duration;

use common::*;

/// The example spec (examples/mnist-layers.toml) up to its `[dataset]` table: its name and
/// model.
fn example_model() -> String {
    let text = std::fs::read_to_string(repo().join("examples/mnist-layers.toml")).unwrap();
    text[..text.find("[dataset]").unwrap()].to_string()
}

/// The example's model on MNIST [0, train_end), 64 records a step.
fn spec(name: &str, train_end: u64, epochs: u32, extra: &str) -> String {
    format!(
        "{}\n[dataset]\nname = \"mnist\"\ntrain = [0, {train_end}]\ntest = [8000, 10000]\n\
         [training]\nepochs = {epochs}\nbatch_size = 64\nseed = 7\n{extra}\n\
         [training.optimizer]\nkind = \"adamw\"\nlr = 0.002\nweight_decay = 0.01\n",
        example_model().replace("name = \"mnist-layers\"", &format!("name = \"{name}\""))
    )
}

fn hash(job: &serde_json::Value) -> String {
    job["results"][0]["param_blake3"].as_str().unwrap_or_else(|| panic!("no results: {job}")).to_string()
}

#[test]
fn the_three_conv_example_trains_to_097_and_exports_the_sequentials_names() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let file = repo().join("examples/mnist-layers.toml");
    let job = c.submit_follow(&file);
    assert_eq!(job["state"], "succeeded", "{job}");
    let acc = job["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.97, "test accuracy {acc}: {job}");
    let id = job["id"].to_string();
    let out = c.tmp.path().join("model.safetensors");
    let exported = json(c.cmd(&["checkpoint", "export", &id, "--json"]).arg(&out));
    let names: Vec<&str> = exported["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias", "9.weight", "9.bias", "12.weight", "12.bias", "14.weight", "14.bias"], "{exported}");
    let shapes: Vec<serde_json::Value> = exported["tensors"].as_array().unwrap().iter().map(|t| t["shape"].clone()).collect();
    assert_eq!(shapes[0], serde_json::json!([16, 1, 3, 3]));
    assert_eq!(shapes[6], serde_json::json!([64, 3, 3]), "layer norm over C, H, W");
    assert_eq!(shapes[8], serde_json::json!([128, 576]));
    // The PyTorch code of the same Sequential, by job.
    let code = ok(&mut c.cmd(&["model", "torch", &format!("job:{id}")]));
    for line in ["nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1, bias=True),  # 0:", "nn.LayerNorm((64, 3, 3), eps=1e-5, elementwise_affine=True),  # 9:", "INPUT_SHAPE = (1, 28, 28)"] {
        assert!(code.contains(line), "{line} not in:\n{code}");
    }
}

#[test]
fn a_layer_list_resumes_bitwise_after_down_and_up_and_lanes_give_the_same_bits_on_2_and_3_workers() {
    let slow = ("SHOAL_FAILPOINTS", "step-delay-ms=20");
    let c = UpCluster::start_env(&["--workers", "3"], &[slow]);
    c.import_mnist("mnist");
    // 100 steps: 50 an epoch over [0, 3200), two epochs.
    let lanes = |workers: u32| spec("lanes", 3200, 2, "lanes = 8") + &format!("[cluster]\nworkers = {workers}\n");
    let on2 = c.submit_follow(&c.write_spec("lanes2.toml", &lanes(2)));
    let on3 = c.submit_follow(&c.write_spec("lanes3.toml", &lanes(3)));
    assert_eq!((on2["state"].as_str(), on3["state"].as_str()), (Some("succeeded"), Some("succeeded")), "{on2}\n{on3}");
    assert_eq!((on2["world_size"].as_u64(), on3["world_size"].as_u64()), (Some(2), Some(3)));
    assert_eq!(on2["step"].as_u64(), Some(100), "{on2}");
    assert_eq!(hash(&on2), hash(&on3), "lanes: 2 and 3 workers end with different bits");
    // `job compare`: the one spec key that differs, and the same final loss.
    let (id2, id3) = (on2["id"].to_string(), on3["id"].to_string());
    let cmp = json(&mut c.cmd(&["job", "compare", &id2, &id3, "--json"]));
    let differing: Vec<&String> = cmp["differing"].as_object().unwrap().keys().collect();
    assert_eq!(differing, ["cluster.workers"], "{cmp}");
    assert_eq!(cmp["differing"]["cluster.workers"], serde_json::json!([2, 3]), "{cmp}");
    assert_eq!(cmp["metrics"]["loss"][0], cmp["metrics"]["loss"][1], "lanes: the same loss on 2 and 3 workers: {cmp}");
    assert!(cmp["best"]["loss"][0].as_f64().is_some() && cmp["best"]["loss"] == cmp["best"]["loss"].as_array().unwrap().iter().rev().cloned().collect::<serde_json::Value>(), "the best loss from each history, the same on both: {cmp}");
    assert!(cmp["best_step"]["test_accuracy"][0].as_u64().is_some(), "{cmp}");
    let text = ok(&mut c.cmd(&["job", "compare", &id2, &id3]));
    assert!(text.contains("spec cluster.workers") && text.contains(&format!("job {id3}")), "{text}");
    assert!(fails(&mut c.cmd(&["job", "compare", &id2])).contains("2"), "one job is not a comparison");

    // A warmup and cosine schedule with clipping: the rate of each step comes back exactly.
    let schedule = "clip_norm = 0.5\n[training.schedule]\nkind = \"cosine\"\nwarmup_steps = 10\nmin_lr = 0.0001\n";
    let resume = spec("resume", 3200, 2, schedule) + "[cluster]\nworkers = 2\n[checkpoint]\nevery_steps = 20\n";
    let file = c.write_spec("resume.toml", &resume);
    let reference = c.submit_follow(&file);
    assert_eq!(reference["state"], "succeeded", "{reference}");
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(&file))["id"].to_string();
    c.wait_job(&id, "a committed checkpoint", Duration::from_secs(120), |j| j["checkpoint"].as_u64().is_some_and(|s| s >= 40));
    ok(&mut c.cmd(&["down"]));
    ok(shoal().args(["up", "--workers", "2", "--dir"]).arg(c.dir()).env(slow.0, slow.1));
    let done = c.wait_end(&id);
    assert_eq!(done["state"], "succeeded", "{done}");
    let from = done["resumed_from"].as_u64().unwrap_or_else(|| panic!("not resumed: {done}"));
    assert!((40..100).contains(&from), "resumed from {from}: {done}");
    assert_eq!(hash(&done), hash(&reference), "the resumed run differs from the uninterrupted one");
    assert_eq!(done["test_accuracy"], reference["test_accuracy"]);
}

/// Writes `n` random RGB images ([n, 3, 32, 32], u8) and labels (10 classes) as .npy files.
fn rgb_npy(dir: &std::path::Path, n: usize) -> [std::path::PathBuf; 2] {
    let npy = |descr: &str, shape: &str, body: Vec<u8>| {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(body);
        out
    };
    let mut rng = shoal_core::rng::SplitMix64::new(4);
    let labels: Vec<u8> = (0..n).map(|_| rng.below(10) as u8).collect();
    // Each image's mean brightness in its red channel tells its class: learnable.
    let mut x = Vec::with_capacity(n * 3 * 32 * 32);
    for &y in &labels {
        for ch in 0..3 {
            for _ in 0..32 * 32 {
                let base = if ch == 0 { y as u64 * 25 } else { 100 };
                x.push((base + rng.below(20)) as u8);
            }
        }
    }
    let (xp, yp) = (dir.join("rgb-x.npy"), dir.join("rgb-y.npy"));
    std::fs::write(&xp, npy("|u1", &format!("({n}, 3, 32, 32)"), x)).unwrap();
    std::fs::write(&yp, npy("|u1", &format!("({n},)"), labels)).unwrap();
    [xp, yp]
}

#[test]
fn rgb_images_train_through_three_channel_convolutions_and_wrong_shapes_are_refused_at_submit() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let [x, y] = rgb_npy(c.tmp.path(), 600);
    let imported = json(c.cmd(&["data", "import", "rgb", "--json"]).arg(&x).arg(&y));
    assert_eq!(imported["feature_shape"], serde_json::json!([3, 32, 32]), "{imported}");
    let text = std::fs::read_to_string(repo().join("examples/rgb-images.toml")).unwrap();
    // No `train`: every record outside `test`.
    let text = text.replace("train = [0, 40000]\n", "").replace("test = [40000, 50000]", "test = [500, 600]");
    let job = c.submit_follow(&c.write_spec("rgb.toml", &text));
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["test_accuracy"].as_f64().unwrap() >= 0.5, "the red channel tells the class: {job}");
    assert_eq!(job["epoch_records"][0]["records"], 448, "7 steps of 64 over the 500 records outside test: {job}");

    // (layers, what the error must say): each refused by `job submit`, nothing queued.
    let layer = |kind: &str, keys: &str| format!("[[model.layers]]\nkind = \"{kind}\"\n{keys}\n");
    let conv = |out: u32, kernel: u32| layer("conv2d", &format!("out = {out}\nkernel = {kernel}"));
    let wrong = [
        (
            conv(8, 3) + &layer("maxpool2d", "kernel = 2") + &layer("linear", "out = 10"),
            "model.layers[2] (linear): expects [features] or a sequence [positions, features], got [8, 13, 13]; add a flatten",
        ),
        (layer("flatten", "") + &conv(8, 3) + &layer("flatten", "") + &layer("linear", "out = 10"), "model.layers[1] (conv2d): expects an image [channels, height, width], got [784]"),
        (conv(8, 5) + &conv(8, 5) + &layer("maxpool2d", "kernel = 8") + &conv(8, 5) + &layer("flatten", "") + &layer("linear", "out = 10"), "model.layers[3] (conv2d)"),
        (conv(4, 3) + &layer("flatten", "") + &layer("linear", "out = 7"), "model.layers[2] (linear)"),
        (conv(4, 3) + &layer("batchnorm2d", "") + &layer("flatten", "") + &layer("linear", "out = 10"), "model.layers[1] (batchnorm2d): not supported: its batch statistics would have to be synchronized"),
    ];
    for (i, (layers, want)) in wrong.iter().enumerate() {
        let text = format!(
            "name = \"wrong-{i}\"\n[model]\n{layers}[dataset]\nname = \"mnist\"\ntrain = [0, 1000]\n[training]\nepochs = 1\nbatch_size = 64\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
        );
        let err = fails(c.cmd(&["job", "submit"]).arg(c.write_spec(&format!("wrong-{i}.toml"), &text)));
        assert!(err.contains(want), "spec {i}: expected {want:?} in: {err}");
    }
    let jobs = json(&mut c.cmd(&["job", "list", "--all", "--json"]));
    assert_eq!(jobs.as_array().map(|j| j.len()), Some(1), "only the RGB job was queued: {jobs}");
}
