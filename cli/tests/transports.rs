//! Training over each collective transport: the demo's MLP and the CNN example, as shipped,
//! reach the accuracy they reach over the default (within 0.5 point), and every f32 transport
//! sums in the same documented order, so their models are bitwise identical.

mod common;
use common::*;

/// Today's test accuracy of the example, on this project's reference machine.
fn train_each_transport(example: &str, today: f64) {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    let text = std::fs::read_to_string(repo().join("examples").join(example)).unwrap();
    let mut models = Vec::new();
    for (transport, wire) in [("shm", "f32"), ("tcp", "f32"), ("grpc", "f32"), ("tcp", "bf16")] {
        let spec = c.write_spec(&format!("{transport}-{wire}.toml"), &format!("{text}\n[aggregation]\ntransport = \"{transport}\"\nwire = \"{wire}\"\n"));
        let job = c.submit_follow(&spec);
        assert_eq!(job["state"], "succeeded", "{example} over {transport}/{wire}: {job}");
        assert_eq!(job["transport"], transport, "{job}");
        let acc = job["test_accuracy"].as_f64().unwrap();
        assert!(acc >= today - 0.005, "{example} over {transport}/{wire}: test accuracy {acc}, today {today}");
        let (a, b) = (&job["results"][0]["param_blake3"], &job["results"][1]["param_blake3"]);
        assert_eq!(a, b, "{example} over {transport}/{wire}: the ranks ended with different parameters");
        models.push((format!("{transport}/{wire}"), a.as_str().unwrap().to_string()));
    }
    let f32_models: Vec<_> = models.iter().filter(|(n, _)| n.ends_with("f32")).collect();
    assert!(f32_models.iter().all(|(_, m)| *m == f32_models[0].1), "f32 transports disagree: {models:?}");
    let bf16 = models.iter().find(|(n, _)| n.ends_with("bf16")).unwrap();
    assert_ne!(bf16.1, f32_models[0].1, "bf16 on the wire changed no bit: it was not used");
}

#[test]
fn the_demo_mlp_trains_over_every_transport() {
    train_each_transport("mnist-mlp.toml", 0.9405);
}

#[test]
fn the_cnn_example_trains_over_every_transport() {
    train_each_transport("mnist-cnn.toml", 0.9290);
}
