//! End to end: real processes on loopback (1 coordinator, 2 workers), MNIST imported,
//! data-parallel training, and the properties the design promises.

mod common;
use common::*;

#[test]
fn two_workers_train_mnist_to_accuracy_with_identical_parameters() {
    let c = UpCluster::start(2);
    let status = json(&mut c.cmd(&["status", "--json"]));
    assert_eq!(status["coordinators"][0]["role"], "leader", "{status}");
    assert_eq!(status["workers"].as_array().unwrap().len(), 2, "{status}");

    let ds = c.import_mnist("mnist");
    assert_eq!(ds["records"], 10000);
    assert_eq!(ds["classes"], 10);
    assert_eq!(ds["feature_shape"], serde_json::json!([28, 28]));
    for s in ds["shards"].as_array().unwrap() {
        let bytes = std::fs::read(c.store().join(s["path"].as_str().unwrap())).unwrap();
        assert_eq!(blake3::hash(&bytes).to_hex().to_string(), s["blake3"].as_str().unwrap());
    }

    // Three epochs: about 0.92 here, a margin over the 0.90 bar that holds on other CPUs, whose
    // gemm kernels round differently (bits and accuracy move a little).
    let spec = c.write_spec("mlp.toml", &mnist_spec("mnist", 3, 8000, 42, "[512, 256]"));
    let job = c.submit_follow(&spec);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["epoch"], 3);
    assert_eq!(job["step"], job["total_steps"]);
    let acc = job["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.90, "test accuracy {acc} < 0.90: {job}");
    assert!(job["samples_per_s"].as_f64().unwrap() > 0.0);

    // Both ranks hold the same final parameters, and the job has one model: its final
    // checkpoint, committed at the last step.
    let results = job["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{job}");
    assert_eq!(results[0]["rank"], 0);
    assert_eq!(results[1]["rank"], 1);
    assert_eq!(results[0]["param_blake3"], results[1]["param_blake3"]);
    assert_eq!(job["checkpoint"], job["total_steps"], "{job}");
    let model = job["model"].as_str().unwrap();
    assert_eq!(model, format!("jobs/1/checkpoints/step-{}", job["total_steps"]));
    assert_eq!(results[0]["model_path"], model);
    assert!(!c.store().join("jobs/1/gen-1").exists(), "per-rank copies of the parameters are gone");

    // The model exports as real safetensors with the MLP's layers, in PyTorch's names.
    let out = c.tmp.path().join("mlp.safetensors");
    ok(c.cmd(&["checkpoint", "export", "1"]).arg(&out));
    let a = std::fs::read(&out).unwrap();
    assert!(a.len() > 2_000_000, "model file too small: {}", a.len());
    let st = safetensors::SafeTensors::deserialize(&a).unwrap();
    assert_eq!(st.tensor("0.weight").unwrap().shape(), &[512, 784]);
    assert_eq!(st.tensor("4.weight").unwrap().shape(), &[10, 256]);

    let status = json(&mut c.cmd(&["job", "status", "1", "--json"]));
    for key in ["id", "state", "step", "epoch", "loss", "test_accuracy", "samples_per_s", "workers"] {
        assert!(!status[key].is_null(), "job status lacks {key}: {status}");
    }
    let workers = json(&mut c.cmd(&["status", "--json"]));
    assert!(workers["workers"].as_array().unwrap().iter().all(|w| w["state"] == "idle"), "{workers}");
}

#[test]
fn same_spec_and_seed_give_bitwise_identical_parameters() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let spec = c.write_spec("small.toml", &mnist_spec("mnist", 1, 2048, 7, "[64]"));
    let other_seed = c.write_spec("seed8.toml", &mnist_spec("mnist", 1, 2048, 8, "[64]"));
    let model = |job: &serde_json::Value| {
        assert_eq!(job["state"], "succeeded", "{job}");
        job["results"][0]["param_blake3"].as_str().unwrap().to_string()
    };
    let first = model(&c.submit_follow(&spec));
    let second = model(&c.submit_follow(&spec));
    assert!(first == second, "two runs of the same spec and seed differ");
    let third = model(&c.submit_follow(&other_seed));
    assert!(first != third, "a different seed gave the same parameters: the check above proves nothing");
}

#[test]
fn a_cnn_trains_with_adamw_across_two_workers() {
    let c = UpCluster::start(2);
    c.import_mnist("digits");
    let spec = c.write_spec(
        "cnn.toml",
        r#"name = "test-cnn"
[model]
kind = "cnn"
channels = [4, 8]
hidden = [32]
[dataset]
name = "digits"
train = [0, 4096]
test = [8000, 9000]
[training]
epochs = 2
batch_size = 64
seed = 3
[training.optimizer]
kind = "adamw"
lr = 0.005
[cluster]
workers = 2
"#,
    );
    let job = c.submit_follow(&spec);
    assert_eq!(job["state"], "succeeded", "{job}");
    let acc = job["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.85, "cnn test accuracy {acc}: {job}");
    assert_eq!(job["results"][0]["param_blake3"], job["results"][1]["param_blake3"], "cnn ranks diverged");
    let out = c.tmp.path().join("cnn.safetensors");
    ok(c.cmd(&["checkpoint", "export", &job["id"].to_string()]).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // PyTorch's nn.Sequential(Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, MaxPool2d, Flatten, Linear, ReLU, Linear).
    assert_eq!(st.tensor("0.weight").unwrap().shape(), &[4, 1, 3, 3]);
    assert_eq!(st.tensor("3.weight").unwrap().shape(), &[8, 4, 3, 3]);
    assert_eq!(st.tensor("7.weight").unwrap().shape(), &[32, 8 * 7 * 7]);
    assert_eq!(st.tensor("9.bias").unwrap().shape(), &[10]);
}
