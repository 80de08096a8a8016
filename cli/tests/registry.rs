//! The model registry: jobs register their models as versions of a name (by `[register]` or
//! `shoal model register`), with lineage; aliases move by compare-and-set; a job warm-starts
//! from `NAME@ALIAS`; a version exports for PyTorch.

mod common;
use common::*;

fn spec(name: &str, train: [u64; 2], extra: &str, tail: &str) -> String {
    format!(
        "name = \"{name}\"\n[model]\nkind = \"mlp\"\nhidden = [64]\n[dataset]\nname = \"digits\"\ntrain = [{}, {}]\ntest = [0, 2000]\n{extra}\n\
         [training]\nepochs = 2\nbatch_size = 128\nseed = 3\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n[cluster]\nworkers = 2\n{tail}",
        train[0], train[1]
    )
}

#[test]
fn models_register_with_lineage_move_aliases_by_compare_and_set_and_warm_start_jobs() {
    let c = UpCluster::start(2);
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "import", "digits", "--records", "8000:10000"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "append", "digits", "--records", "0:4000"]).arg(&x).arg(&y));

    let first = c.submit_follow(&c.write_spec("v1.toml", &spec("v1", [2000, 6000], "", "[register]\nname = \"digits-mlp\"\n")));
    assert_eq!((first["state"].as_str(), first["registered_model"].as_str()), (Some("succeeded"), Some("digits-mlp@1")), "{first}");
    let v1 = json(&mut c.cmd(&["model", "show", "digits-mlp@1", "--json"]));
    assert_eq!((v1["job"].clone(), v1["dataset_version"].as_u64(), v1["parent"].is_null()), (first["id"].clone(), Some(2), true), "{v1}");
    assert_eq!(v1["test_accuracy"], first["test_accuracy"], "{v1}");

    // Aliases: compare-and-set.
    ok(&mut c.cmd(&["model", "alias", "digits-mlp", "1", "production", "--expect", "0"]));
    let e = fails(&mut c.cmd(&["model", "alias", "digits-mlp", "1", "production", "--expect", "0"]));
    assert!(e.contains("held by version 1"), "{e}");

    // New data; a job warm-starts from the production model on it and registers version 2.
    ok(c.cmd(&["data", "append", "digits", "--records", "4000:8000"]).arg(&x).arg(&y));
    let warm = spec("v2", [2000, 10000], "slices = \"new\"\nreplay = 0.2", "[init]\nmodel = \"digits-mlp@production\"\n[register]\nname = \"digits-mlp\"\n");
    let second = c.submit_follow(&c.write_spec("v2.toml", &warm));
    assert_eq!((second["state"].as_str(), second["registered_model"].as_str()), (Some("succeeded"), Some("digits-mlp@2")), "{second}");
    assert_eq!((second["init"]["job"].clone(), second["new_from"].as_u64()), (first["id"].clone(), Some(6000)), "{second}");
    let lineage = json(&mut c.cmd(&["model", "lineage", "digits-mlp@2", "--json"]));
    let chain: Vec<(u64, u64)> = lineage.as_array().unwrap().iter().map(|v| (v["version"].as_u64().unwrap(), v["dataset_version"].as_u64().unwrap())).collect();
    assert_eq!(chain, [(2, 3), (1, 2)], "{lineage}");
    assert_eq!(lineage[0]["parent"], "digits-mlp@1");

    let moved = json(&mut c.cmd(&["model", "alias", "digits-mlp", "2", "production", "--expect", "1", "--json"]));
    assert_eq!(moved["aliases"]["production"], 2, "{moved}");
    let out = c.tmp.path().join("production.safetensors");
    let exported = json(c.cmd(&["model", "export", "digits-mlp@production", "--json"]).arg(&out));
    assert_eq!((exported["version"].as_u64(), exported["tensors"].as_array().unwrap().len()), (Some(2), 4), "{exported}");
    assert!(std::fs::metadata(&out).unwrap().len() > 4 * (784 * 64), "the export holds the weights");
    let list = json(&mut c.cmd(&["model", "list", "--json"]));
    assert_eq!(list[0]["version_count"], 2, "{list}");

    // What is refused, and says why.
    let id = first["id"].to_string();
    let e = fails(&mut c.cmd(&["model", "register", "digits-mlp", "--job", &id]));
    assert!(e.contains("already version 1"), "{e}");
    let e = fails(&mut c.cmd(&["model", "register", "digits-mlp", "--job", "99"]));
    assert!(e.contains("no job 99"), "{e}");
    let e = fails(&mut c.cmd(&["model", "alias", "digits-mlp", "7", "production"]));
    assert!(e.contains("no version 7"), "{e}");
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad.toml", &spec("b", [2000, 10000], "", "[init]\nmodel = \"digits-mlp@staging\"\n"))));
    assert!(e.contains("init.model") && e.contains("no alias staging"), "{e}");
    let registered = json(&mut c.cmd(&["model", "register", "other", "--job", &id, "--json"]));
    assert_eq!((registered["name"].as_str(), registered["version"].as_u64()), (Some("other"), Some(1)), "{registered}");
}
