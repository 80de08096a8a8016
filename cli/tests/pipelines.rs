//! Pipelines with real processes: a DAG of train, evaluate, register and batch steps runs each
//! step once with its upstream's outputs, also when the leader is killed mid-run; a failing
//! step is retried as a new job and then fails the run, naming the step.

mod common;
use common::*;
use std::time::Duration;

/// The train step's job spec, as a table of the pipeline.
/// (Pinned to version 1: the cache keys below must not move when mnist grows.)
fn train_table() -> String {
    mnist_spec("mnist", 1, 4000, 7, "[64]").replace("name = \"mnist\"\n", "name = \"mnist\"\nversion = 1\n").lines().map(|l| match l.strip_prefix('[') { Some(rest) => format!("[step.spec.{rest}"), None => l.to_string() }).collect::<Vec<_>>().join("\n")
}

fn pipeline() -> String {
    format!(
        r#"name = "digits"
[[step]]
name = "train"
kind = "train"
[step.spec]
{train}

[[step]]
name = "evaluate"
kind = "evaluate"
needs = ["train"]
model = "{{steps.train.model}}"
dataset = "mnist@1"
records = [8000, 10000]

[[step]]
name = "register"
kind = "register"
needs = ["evaluate"]
when = "steps.evaluate.test_accuracy >= 0.5"
model = "{{steps.train.model}}"
as = "digits-mlp"
alias = "candidate"

[[step]]
name = "never"
kind = "register"
needs = ["evaluate"]
when = "steps.evaluate.test_accuracy > 1.5"
model = "{{steps.train.model}}"
as = "never"

[[step]]
name = "score"
kind = "batch"
needs = ["register"]
[step.spec]
name = "score"
[step.spec.input]
dataset = "mnist"
records = [9000, 10000]
[step.spec.operator]
kind = "score"
model = "{{steps.register.model}}"
[step.spec.output]
dataset = "digits-scores"
"#,
        train = train_table()
    )
}

fn leader(c: &UpCluster) -> serde_json::Value {
    wait_for("a leader", Duration::from_secs(30), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        s["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").cloned()
    })
}

fn wait_run(c: &UpCluster, id: &str) -> serde_json::Value {
    wait_for(&format!("pipeline run {id} to end"), Duration::from_secs(180), || {
        let r = json(&mut c.cmd(&["pipeline", "show", id, "--json"]));
        (r["state"] != "running").then_some(r)
    })
}

fn step<'a>(run: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    run["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

#[test]
fn a_pipeline_runs_each_step_once_with_its_upstream_outputs_through_a_leader_kill() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "2"]);
    c.import_mnist("mnist");

    // Validation at submit names the step and the key, and records nothing.
    let e = fails(c.cmd(&["pipeline", "submit"]).arg(c.write_spec("bad.toml", &pipeline().replace("{steps.register.model}", "{steps.registr.model}"))));
    assert!(e.contains("step \"score\": spec.operator.model") && e.contains("no step \"registr\""), "{e}");
    let e = fails(c.cmd(&["pipeline", "submit"]).arg(c.write_spec("cycle.toml", &pipeline().replace("needs = [\"train\"]", "needs = [\"score\"]"))));
    assert!(e.contains("step \"evaluate\": needs: \"score\" comes later"), "{e}");
    assert_eq!(json(&mut c.cmd(&["pipeline", "list", "--json"])).as_array().unwrap().len(), 0);

    let spec = c.write_spec("digits.toml", &pipeline());
    let p = json(c.cmd(&["pipeline", "submit", "--json"]).arg(&spec));
    assert_eq!((p["name"].as_str(), p["version"].as_u64(), p["steps"].as_u64()), (Some("digits"), Some(1), Some(5)), "{p}");
    // The same spec again is the same version.
    assert_eq!(json(c.cmd(&["pipeline", "submit", "--json"]).arg(&spec))["version"], 1);

    let run = json(&mut c.cmd(&["pipeline", "run", "digits", "--json"]));
    let id = run["id"].as_str().unwrap().to_string();
    assert_eq!(id, "digits-1");
    assert_eq!(step(&run, "train")["state"], "running", "{run}");
    // The leader dies while the train step runs: the new one carries on from the log.
    let old = leader(&c);
    assert_eq!(unsafe { libc::kill(old["pid"].as_i64().unwrap() as i32, libc::SIGKILL) }, 0);
    wait_for("a new leader", Duration::from_secs(30), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        s["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader" && r["id"] != old["id"]).cloned()
    });
    let run = wait_run(&c, &id);
    assert_eq!(run["state"], "succeeded", "{run}");

    // Every step that runs a job ran exactly one, submitted by this run and step.
    let jobs = json(&mut c.cmd(&["job", "list", "--json"]));
    let mine: Vec<&serde_json::Value> = jobs.as_array().unwrap().iter().filter(|j| j["pipeline_run"] == id.as_str()).collect();
    assert_eq!(mine.len(), 3, "{jobs}");
    for name in ["train", "evaluate", "score"] {
        let s = step(&run, name);
        assert_eq!((s["state"].as_str(), s["attempts"].as_u64(), s["jobs"].as_array().unwrap().len()), (Some("succeeded"), Some(1), 1), "{s}");
        assert!(mine.iter().any(|j| j["id"] == s["job"] && j["pipeline_step"] == name), "{s}");
    }
    // Outputs flow downstream: evaluate scored train's model on train's own test records,
    // so it measured the accuracy the training job reported, to the bit.
    let (train, evaluate) = (step(&run, "train"), step(&run, "evaluate"));
    assert_eq!(train["outputs"]["model"], format!("job:{}", train["job"]));
    assert_eq!(evaluate["outputs"]["test_accuracy"], train["outputs"]["test_accuracy"], "{run}");
    let reg = step(&run, "register");
    assert_eq!((reg["state"].as_str(), reg["outputs"]["model"].as_str()), (Some("succeeded"), Some("digits-mlp@1")), "{reg}");
    let model = json(&mut c.cmd(&["model", "show", "digits-mlp@candidate", "--json"]));
    assert_eq!(model["job"], train["job"], "{model}");
    // The lineage reaches through the run: which pipeline version, step and shoal build.
    let lineage = json(&mut c.cmd(&["model", "lineage", "digits-mlp@1", "--json"]));
    let through = &lineage[0]["pipeline_run"];
    assert_eq!((through["id"].as_str(), through["step"].as_str(), through["version"].as_u64()), (Some(id.as_str()), Some("train"), Some(1)), "{lineage}");
    assert_eq!((&through["spec_blake3"], &through["build"]), (&run["spec_blake3"], &run["build"]), "{lineage}");
    assert!(run["build"].as_str().is_some_and(|b| b.len() == 40 || b == "unknown"), "{run}");
    let never = step(&run, "never");
    assert_eq!((never["state"].as_str(), never["reason"].as_str()), (Some("skipped"), Some("its when condition is false")), "{never}");
    let score = c.job(&step(&run, "score")["job"].to_string());
    assert_eq!(score["output_dataset"], "digits-scores", "{score}");
    let scores = json(&mut c.cmd(&["data", "show", "digits-scores", "--json"]));
    assert_eq!(scores["records"], 1000, "{scores}");

    // The cache: another pipeline whose train and evaluate steps are the same work (spec,
    // data, model and shoal build) is served digits-1's results. The plan says so first.
    let cached_spec = c.write_spec("cached.toml", &cached());
    let plan = json(c.cmd(&["pipeline", "plan", "--json"]).arg(&cached_spec));
    let predicted: Vec<&str> = plan["steps"].as_array().unwrap().iter().map(|s| s["prediction"].as_str().unwrap()).collect();
    assert_eq!(predicted, ["hit", "hit"], "{plan}");
    assert_eq!(plan["steps"][0]["key"], train["cache_key"], "{plan}");
    assert!(plan["steps"][0]["cached_from"].as_str().unwrap().starts_with(&format!("{id}/train")), "{plan}");
    let jobs_before = json(&mut c.cmd(&["job", "list", "--json"])).as_array().unwrap().len();
    let hit = json(c.cmd(&["pipeline", "submit", "--run", "--wait", "--json"]).arg(&cached_spec));
    assert_eq!(hit["state"], "succeeded", "{hit}");
    for name in ["train", "evaluate"] {
        let s = step(&hit, name);
        assert_eq!((s["cache"].as_str(), s["job"].as_u64()), (Some("hit"), Some(0)), "{s}");
        assert_eq!(s["outputs"], step(&run, name)["outputs"], "the outputs are digits-1's, byte for byte");
    }
    assert_eq!(json(&mut c.cmd(&["job", "list", "--json"])).as_array().unwrap().len(), jobs_before, "a hit runs no job");

    // A step that fails is retried as a new job, then fails the run naming the step; the
    // steps after it never start. The command fails until a marker file exists.
    let marker = c.dir().join("exec-may-succeed");
    let failing = format!(
        "name = \"fails\"\n[[step]]\nname = \"first\"\nkind = \"evaluate\"\nmodel = \"job:{job}\"\ndataset = \"mnist\"\nrecords = [0, 500]\n\
         [[step]]\nname = \"exec\"\nkind = \"batch\"\nneeds = [\"first\"]\nretries = 1\n[step.spec]\nname = \"exit3\"\n\
         [step.spec.input]\ndataset = \"mnist\"\nrecords = [0, 100]\n[step.spec.operator]\nkind = \"exec\"\n\
         command = [\"sh\", \"-c\", \"test -f {marker} || exit 3; cp \\\"$0\\\" \\\"$1\\\"\", \"{{input}}\", \"{{output}}\"]\n[step.spec.output]\ndataset = \"exec-out\"\n\
         [step.spec.cluster]\nmax_attempts = 1\n\
         [[step]]\nname = \"after\"\nkind = \"register\"\nneeds = [\"exec\"]\nmodel = \"{{steps.train.model}}\"\nas = \"x\"\n",
        job = train["job"],
        marker = marker.display()
    );
    let e = fails(c.cmd(&["pipeline", "submit"]).arg(c.write_spec("fails-bad.toml", &failing)));
    assert!(e.contains("step \"after\": model") && e.contains("names no step \"train\""), "{e}");
    let failing = failing.replace("model = \"{steps.train.model}\"\nas", &format!("model = \"job:{}\"\nas", train["job"]));
    let out = common::run(c.cmd(&["pipeline", "submit", "--run", "--wait", "--json"]).arg(c.write_spec("fails.toml", &failing)));
    assert!(!out.status.success(), "a failed run exits non-zero");
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["state"], "failed", "{run}");
    let exec = step(&run, "exec");
    assert_eq!((exec["state"].as_str(), exec["attempts"].as_u64(), exec["jobs"].as_array().unwrap().len()), (Some("failed"), Some(2), 2), "{exec}");
    assert!(run["error"].as_str().unwrap().starts_with("step exec failed: attempt 2: job"), "{run}");
    assert_eq!(step(&run, "after")["state"], "pending");

    // Resumed once the command can succeed: only the failed step and what follows run; the
    // step that succeeded keeps its job and outputs exactly.
    let first = step(&run, "first").clone();
    std::fs::write(&marker, "").unwrap();
    let resumed = json(&mut c.cmd(&["pipeline", "resume", "fails-1", "--wait", "--json"]));
    assert_eq!((resumed["state"].as_str(), resumed["resumes"].as_u64()), (Some("succeeded"), Some(1)), "{resumed}");
    assert_eq!(step(&resumed, "first"), &first);
    let exec = step(&resumed, "exec");
    assert_eq!((exec["attempts"].as_u64(), exec["jobs"].as_array().unwrap().len()), (Some(3), 3), "{exec}");
    assert_eq!(step(&resumed, "after")["outputs"]["model"], "x@1");

    // An exec step with cache = true is keyed with the bytes of the script it names: the
    // second run hits, and once the script changed a run executes it again.
    let script = c.dir().join("copy.sh");
    std::fs::write(&script, "cp \"$1\" \"$2\"\n").unwrap();
    let exec = format!(
        "name = \"copy\"\n[[step]]\nname = \"copy\"\nkind = \"batch\"\ncache = true\n[step.spec]\nname = \"copy\"\n[step.spec.input]\ndataset = \"mnist\"\nversion = 1\nrecords = [0, 100]\n\
         [step.spec.operator]\nkind = \"exec\"\ncommand = [\"sh\", \"{script}\", \"{{input}}\", \"{{output}}\"]\n[step.spec.output]\ndataset = \"copies\"\n",
        script = script.display()
    );
    let first = json(c.cmd(&["pipeline", "submit", "--run", "--wait", "--json"]).arg(c.write_spec("copy.toml", &exec)));
    let copy = step(&first, "copy");
    assert_eq!((first["state"].as_str(), copy["cache"].as_str()), (Some("succeeded"), Some("miss")), "{first}");
    assert!(copy["inputs"].as_array().unwrap().iter().any(|i| i.as_str().unwrap().starts_with(&format!("file {} blake3 ", script.display()))), "{copy}");
    let second = json(&mut c.cmd(&["pipeline", "run", "copy", "--wait", "--json"]));
    let hit = step(&second, "copy");
    assert_eq!((hit["cache"].as_str(), hit["job"].as_u64(), &hit["outputs"]), (Some("hit"), Some(0), &copy["outputs"]), "{second}");
    std::fs::write(&script, "# changed\ncp \"$1\" \"$2\"\n").unwrap();
    let third = json(&mut c.cmd(&["pipeline", "run", "copy", "--wait", "--json"]));
    let again = step(&third, "copy");
    assert_eq!(again["cache"], "miss", "{third}");
    assert!(again["job"].as_u64().unwrap() > copy["job"].as_u64().unwrap(), "{third}");

    // A pipeline with [trigger] on_append: an append starts one run for its version.
    let triggered = format!(
        "name = \"on-append\"\n[trigger]\non_append = \"mnist\"\n[[step]]\nname = \"eval\"\nkind = \"evaluate\"\nmodel = \"job:{job}\"\ndataset = \"mnist\"\nrecords = [0, 200]\n",
        job = train["job"]
    );
    ok(c.cmd(&["pipeline", "submit"]).arg(c.write_spec("on-append.toml", &triggered)));
    assert!(json(&mut c.cmd(&["pipeline", "list", "on-append", "--json"])).as_array().unwrap().is_empty(), "version 1 was there before the trigger");
    let [x, y] = mnist_files();
    ok(c.cmd(&["data", "append", "mnist", "--records", "0:200"]).arg(&x).arg(&y));
    let run = wait_run(&c, "on-append@mnist-v2");
    assert_eq!((run["state"].as_str(), run["cause"].as_str()), (Some("succeeded"), Some("append mnist v2..v2")), "{run}");
    assert_eq!(json(&mut c.cmd(&["pipeline", "list", "on-append", "--json"])).as_array().unwrap().len(), 1);

    // A schedule every second: a run per slot, named by the slot; paused, no more runs.
    let scheduled = format!(
        "name = \"tick\"\n[schedule]\ncron = \"* * * * * *\"\nconcurrency = \"allow\"\n[[step]]\nname = \"reg\"\nkind = \"register\"\nmodel = \"job:{job}\"\nas = \"ticks\"\n",
        job = train["job"]
    );
    ok(c.cmd(&["pipeline", "submit"]).arg(c.write_spec("tick.toml", &scheduled)));
    let runs = wait_for("three scheduled runs", Duration::from_secs(30), || {
        let runs = json(&mut c.cmd(&["pipeline", "list", "tick", "--json"]));
        (runs.as_array().unwrap().len() >= 3).then_some(runs)
    });
    ok(&mut c.cmd(&["pipeline", "pause", "tick"]));
    let runs = runs.as_array().unwrap();
    for r in runs {
        let slot = r["cause"].as_str().unwrap().strip_prefix("schedule ").unwrap();
        assert_eq!(r["id"], format!("tick@{slot}"), "{r}");
    }
    // The first slot's run registered the model; the later ones find it registered.
    assert_eq!(runs.iter().filter(|r| r["state"] == "succeeded").count(), 1, "{runs:?}");
    assert!(runs.iter().filter(|r| r["state"] == "failed").all(|r| r["error"].as_str().unwrap().contains("already version 1 of model ticks")), "{runs:?}");
    let paused = json(&mut c.cmd(&["pipeline", "list", "tick", "--json"])).as_array().unwrap().len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(json(&mut c.cmd(&["pipeline", "list", "tick", "--json"])).as_array().unwrap().len(), paused, "a paused schedule ran");

    // A cached artifact that no longer verifies is a miss, not an error: the plan says so,
    // and a run trains again (the corrupted checkpoint is digits-1's, used by nothing after).
    let job = train["job"].as_u64().unwrap();
    let folder = c.store().join(format!("jobs/{job}/checkpoints"));
    let last = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).max_by_key(|p| p.file_name().unwrap().to_str().unwrap().trim_start_matches("step-").parse::<u64>().unwrap_or(0)).unwrap();
    let victim = std::fs::read_dir(&last).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_str().unwrap().ends_with(".safetensors")).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let plan = json(c.cmd(&["pipeline", "plan", "--json"]).arg(&cached_spec));
    assert_eq!((plan["steps"][0]["prediction"].as_str(), plan["steps"][1]["prediction"].as_str()), (Some("miss"), Some("unknown")), "{plan}");
    assert!(plan["steps"][0]["detail"].as_str().unwrap().contains("blake3"), "{plan}");
    let again = json(&mut c.cmd(&["pipeline", "run", "cached", "--wait", "--json"]));
    assert_eq!(again["state"], "succeeded", "{again}");
    let retrained = step(&again, "train");
    assert_eq!(retrained["cache"], "stale", "{retrained}");
    assert!(retrained["reason"].as_str().unwrap().contains("blake3") && retrained["job"].as_u64().unwrap() > job, "{retrained}");
}

/// The digits pipeline's train and evaluate steps, in a pipeline of their own.
fn cached() -> String {
    format!(
        "name = \"cached\"\n[[step]]\nname = \"train\"\nkind = \"train\"\n[step.spec]\n{train}\n\n[[step]]\nname = \"evaluate\"\nkind = \"evaluate\"\nneeds = [\"train\"]\n\
         model = \"{{steps.train.model}}\"\ndataset = \"mnist@1\"\nrecords = [8000, 10000]\n",
        train = train_table()
    )
}
