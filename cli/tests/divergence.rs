//! Bad values with real processes: control values stay exact on a bf16 wire, a NaN gradient
//! stops the job before it is applied (the error names the step, the tensor and the rank, and
//! the last good step is the job's checkpoint, bitwise), and missing feature values are refused
//! or filled (`[dataset] fill_missing`).

mod common;
use common::*;
use shoal_core::rng::RecordDigest;

/// The MLP 784-16-10 on MNIST records [0, train_end), two workers over `transport`/`wire`.
fn spec(name: &str, train_end: u64, batch: u32, epochs: u32, aggregation: &str) -> String {
    mnist_spec("mnist", epochs, train_end, 3, "[16]").replace("test-mlp", name).replace("batch_size = 128", &format!("batch_size = {batch}")) + aggregation
}

/// `job submit --follow --json`: the job as it ended (the command fails when the job did).
fn submit_follow(c: &UpCluster, file: &str, text: &str) -> serde_json::Value {
    let out = run(c.cmd(&["job", "submit", "--follow", "--json"]).arg(c.write_spec(file, text)));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad json ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_bf16_wire_counts_every_record_and_digest_exactly() {
    let c = UpCluster::start(2);
    c.import_mnist("mnist");
    // 257 records per rank and step: not a bf16 number (8 bits of mantissa), nor are the
    // 12-bit digest halves. 10 steps an epoch cover [0, 5140) exactly.
    let mut seen = Vec::new();
    for wire in ["f32", "bf16"] {
        let text = spec(&format!("wire-{wire}"), 5140, 514, 2, &format!("[aggregation]\ntransport = \"tcp\"\nwire = \"{wire}\"\n"));
        let job = submit_follow(&c, &format!("{wire}.toml"), &text);
        assert_eq!(job["state"], "succeeded", "{wire}: {job}");
        assert_eq!(job["transport"], "tcp", "{job}");
        let want = RecordDigest::of(0..5140).packed() as u64;
        for (e, x) in job["epoch_records"].as_array().unwrap().iter().enumerate() {
            assert_eq!((x["records"].as_u64(), x["digest"].as_u64()), (Some(5140), Some(want)), "{wire}, epoch {e}: {job}");
        }
        seen.push((job["epoch_records"].clone(), job["results"][0]["param_blake3"].clone()));
    }
    assert_eq!(seen[0].0, seen[1].0, "the wires count records differently");
    assert_ne!(seen[0].1, seen[1].1, "bf16 on the wire changed no bit: it was not used");
}

#[test]
fn a_nan_gradient_stops_the_job_before_it_is_applied_and_keeps_the_step_before() {
    // Rank 1 writes a NaN into its own gradient of step 5 (the classifier's bias).
    let c = UpCluster::start_env(&["--workers", "2"], &[("SHOAL_FAILPOINTS", "nan-gradient@5=1")]);
    c.import_mnist("mnist");
    // 4 steps an epoch: the bad run's step 5 is its second epoch's first; the clean run ends
    // at step 4, on the same trajectory (the data order depends on the seed and the epoch).
    let bad = submit_follow(&c, "bad.toml", &spec("bad", 512, 128, 2, ""));
    assert_eq!(bad["state"], "failed", "{bad}");
    let error = bad["error"].as_str().unwrap();
    assert!(error.contains("diverged at step 5: "), "{error}");
    assert!(error.contains("the gradient of tensor 2.bias is NaN") && error.contains("first produced by rank 1"), "{error}");
    assert!(error.contains("committed as checkpoint step 4"), "{error}");
    assert_eq!(bad["checkpoint"].as_u64(), Some(4), "{bad}");

    let clean = submit_follow(&c, "clean.toml", &spec("clean", 512, 128, 1, ""));
    assert_eq!((clean["state"].as_str(), clean["checkpoint"].as_u64()), (Some("succeeded"), Some(4)), "{clean}");
    let (bad_id, clean_id) = (bad["id"].to_string(), clean["id"].to_string());
    // The whole state, parameters and momentum, bit for bit: the same parts.
    let files = |id: &str| {
        let m = json(&mut c.cmd(&["checkpoint", "show", id, "4", "--json"]));
        m["files"].as_array().unwrap().iter().map(|f| (f["name"].clone(), f["blake3"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(files(&bad_id), files(&clean_id), "the kept checkpoint is not the step before the bad one");
    let export = |id: &str| {
        let out = c.tmp.path().join(format!("{id}.safetensors"));
        ok(c.cmd(&["checkpoint", "export", id]).arg(&out));
        std::fs::read(out).unwrap()
    };
    assert_eq!(export(&bad_id), export(&clean_id));
}

/// Iris with some petal lengths (feature 2) blanked out.
fn iris_with_holes(c: &UpCluster) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join("data/iris/iris.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for i in (1..lines.len()).step_by(7) {
        let mut cells: Vec<&str> = lines[i].split(',').collect();
        cells[2] = "";
        lines[i] = cells.join(",");
    }
    let p = c.tmp.path().join("holes.csv");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn iris_spec(fill: &str) -> String {
    format!(
        "name = \"iris\"\n[model]\nkind = \"mlp\"\nhidden = [16]\n[dataset]\nname = \"iris\"\ntrain = [0, 120]\ntest = [120, 150]\n{fill}\n\
         [training]\nepochs = 60\nbatch_size = 30\nseed = 1\n[training.optimizer]\nkind = \"adamw\"\nlr = 0.01\n[cluster]\nworkers = 2\n"
    )
}

#[test]
fn missing_values_are_refused_unless_filled() {
    let c = UpCluster::start(2);
    let d = json(c.cmd(&["data", "import", "iris", "--label", "species", "--json"]).arg(iris_with_holes(&c)));
    assert_eq!(d["stats"]["features"][2]["missing"].as_u64(), Some(22), "{d}");

    // Refused at submission (the coordinator's check), or by the worker when it meets one.
    let path = c.write_spec("nofill.toml", &iris_spec(""));
    let out = run(c.cmd(&["job", "submit", "--follow", "--json"]).arg(&path));
    let said = if out.status.success() {
        let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(job["state"], "failed", "{job}");
        job["error"].as_str().unwrap().to_string()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(said.contains("feature 2") && said.contains("missing") && said.contains("fill_missing"), "{said}");
    assert!(!said.contains("diverged"), "{said}");

    for fill in ["fill_missing = \"mean\"", "fill_missing = 0"] {
        let job = submit_follow(&c, "fill.toml", &iris_spec(fill));
        assert_eq!(job["state"], "succeeded", "{fill}: {job}");
        assert!(job["test_accuracy"].as_f64().unwrap() > 0.8, "{fill}: {job}");
    }
}
