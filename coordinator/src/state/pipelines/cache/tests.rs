//! The step cache and gate steps: keys, hits, misses, verification, and the gate's rule.
use super::super::tests::{append, step, submit_and_run, succeed, train_table};
use super::*;
use crate::state::tests::{cmd, with_dataset};
use shoal_proto::{RunPipelineRequest, TaskReport, TaskResult, TaskStarted};

/// train -> evaluate the trained model on d@1; `extra` goes into the train step.
fn pipeline(extra: &str) -> String {
    let train = train_table();
    format!(
        "name = \"p\"\n[[step]]\nname = \"train\"\nkind = \"train\"\n{extra}\n[step.spec]\n{train}\n\
         [[step]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"train\"]\nmodel = \"{{steps.train.model}}\"\ndataset = \"d@1\"\nrecords = [80, 100]\n"
    )
}

fn run(sm: &mut StateMachine, index: u64) -> String {
    let ApplyOutput::PipelineRun(r) = sm.apply(index, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "p".into(), request_id: String::new() }))).unwrap() else { panic!() };
    r.id
}

/// The train step's key as a run now would compute it, for `build`.
fn train_key(sm: &StateMachine, text: &str, build: &str) -> String {
    let (plans, _) = sm.plan_pipeline(&PipelineSpec::parse(text).unwrap(), build);
    assert_eq!(plans[0].name, "train");
    assert!(!plans[0].key.is_empty(), "{:?}", plans[0]);
    plans[0].key.clone()
}

fn verdict(sm: &mut StateMachine, index: u64, ok: bool) -> ApplyResult {
    let (mut v, _) = sm.cache_checks().pop().expect("a step is verifying");
    (v.ok, v.detail) = (ok, if ok { String::new() } else { "checkpoints/x has blake3 1234, not 0000".into() });
    sm.apply(index, cmd(command::Kind::PipelineCacheVerdict(v)))
}

/// Runs every task of batch job `id` on the idle workers, `correct` of each task's records
/// predicted right.
fn finish_batch(sm: &mut StateMachine, mut index: u64, id: u64, correct: f64) {
    let tasks: Vec<(u32, u64)> = sm.job(id).unwrap().batch.as_ref().unwrap().tasks.iter().map(|t| (t.index, t.end - t.start)).collect();
    for (task, records) in tasks {
        let worker = sm.workers().find(|w| w.state() == shoal_proto::WorkerState::Idle).unwrap().id.clone();
        sm.apply(index, cmd(command::Kind::TaskStarted(TaskStarted { job_id: id, task, worker_id: worker.clone(), attempt: 0, started_unix_ms: 1, speculative: false }))).unwrap();
        let attempt = sm.assignment(&worker).unwrap().generation;
        let result = TaskResult { records_out: records, correct: (records as f64 * correct) as u64, loss_sum: Some(records as f64 * 0.5), classes: 2, ..Default::default() };
        let r = TaskReport { worker_id: worker, job_id: id, attempt, task, ok: true, result: Some(result), ..Default::default() };
        sm.apply(index + 1, cmd(command::Kind::TaskReported(r))).unwrap();
        index += 2;
    }
    assert_eq!(sm.job(id).unwrap().state(), JobState::Succeeded);
}

#[test]
fn a_second_run_hits_once_its_artifacts_verify_and_reuses_the_outputs_exactly() {
    let mut sm = with_dataset();
    submit_and_run(&mut sm, &pipeline(""));
    let first = step(&sm, "p-1", "train").clone();
    assert_eq!((first.cache.as_str(), first.cache_key.len(), first.inputs.len()), (CACHE_MISS, 64, 1));
    assert!(first.inputs[0].starts_with("dataset d@1 "), "{:?}", first.inputs);
    succeed(&mut sm, 20, first.job_id, 0.75);
    let eval1 = step(&sm, "p-1", "eval").clone();
    finish_batch(&mut sm, 30, eval1.job_id, 0.9);
    let eval1 = step(&sm, "p-1", "eval").clone();
    assert_eq!(output(&eval1, "test_accuracy").as_deref(), Some("0.9"));
    assert_eq!(sm.pipeline_run("p-1").unwrap().state, SUCCEEDED);
    let jobs = sm.jobs().count();

    // The second run: train waits for its checkpoint to be read; nothing is submitted.
    let id = run(&mut sm, 40);
    let train = step(&sm, &id, "train").clone();
    assert_eq!((train.state.as_str(), train.cache.as_str(), train.job_id), (RUNNING, CACHE_VERIFYING, 0));
    assert_eq!(train.cache_key, sm.pipeline_run("p-1").unwrap().steps[0].cache_key);
    let (check, files) = sm.cache_checks().pop().unwrap();
    assert_eq!((check.run.as_str(), check.step.as_str(), check.attempt), (id.as_str(), "train", 1));
    assert_eq!(files.len(), 1);
    assert!(files[0].path.ends_with("part-0.safetensors"));
    // A verdict for another attempt or key changes nothing.
    let mut wrong = check.clone();
    (wrong.attempt, wrong.ok) = (2, true);
    assert!(sm.apply(41, cmd(command::Kind::PipelineCacheVerdict(wrong))).is_err());
    verdict(&mut sm, 42, true).unwrap();
    let hit = step(&sm, &id, "train").clone();
    assert_eq!((hit.state.as_str(), hit.cache.as_str()), (SUCCEEDED, CACHE_HIT));
    assert_eq!(hit.outputs, step(&sm, "p-1", "train").outputs, "the outputs are the first run's, byte for byte");
    assert_eq!(hit.cached_from, format!("p-1/train (job {})", first.job_id));
    // evaluate has no artifact to read (metrics only): a hit in the same apply.
    let eval = step(&sm, &id, "eval");
    assert_eq!((eval.state.as_str(), eval.cache.as_str(), &eval.outputs), (SUCCEEDED, CACHE_HIT, &eval1.outputs));
    assert_eq!(sm.pipeline_run(&id).unwrap().state, SUCCEEDED);
    assert_eq!(sm.jobs().count(), jobs, "no job ran");
    // The cache survives a snapshot.
    let back = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
    assert_eq!(back.state_hash(), sm.state_hash());
    assert_eq!(back.cache_entry(&hit.cache_key), sm.cache_entry(&hit.cache_key));
}

#[test]
fn a_cached_artifact_that_does_not_verify_is_a_miss_not_an_error() {
    let mut sm = with_dataset();
    submit_and_run(&mut sm, &pipeline(""));
    let first = step(&sm, "p-1", "train").job_id;
    succeed(&mut sm, 20, first, 0.75);
    let id = run(&mut sm, 40);
    verdict(&mut sm, 41, false).unwrap();
    let train = step(&sm, &id, "train").clone();
    assert_eq!((train.state.as_str(), train.cache.as_str(), train.attempts), (RUNNING, CACHE_STALE, 1));
    assert!(train.reason.contains("blake3"), "{}", train.reason);
    assert!(train.job_id != 0 && train.job_id != first, "its job runs");
    assert!(sm.cache_entry(&train.cache_key).is_none(), "the bad entry is gone");
    // Its success leaves a fresh entry, which the next run may use.
    succeed(&mut sm, 50, train.job_id, 0.8);
    assert_eq!(sm.cache_entry(&train.cache_key).unwrap().job_id, train.job_id);
    // A job that is gone (pruned) leaves nothing to hit.
    sm.jobs.remove(&train.job_id);
    assert!(sm.cache_entry(&train.cache_key).is_none());
}

#[test]
fn every_key_input_changes_the_key_and_an_ignored_field_does_not() {
    let mut sm = with_dataset();
    let base = pipeline("");
    let key = train_key(&sm, &base, "build-a");
    assert_eq!(key, train_key(&sm, &base, "build-a"), "the key is a function of its inputs");
    // The build shoal runs.
    assert_ne!(key, train_key(&sm, &base, "build-b"));
    // The spec (a training setting), and the step's kind of course.
    assert_ne!(key, train_key(&sm, &base.replace("lr = 0.1", "lr = 0.2"), "build-a"));
    // A field the step ignores, and one it does not.
    let renamed = |extra: &str| pipeline(extra).replacen("name = \"t\"", "name = \"t2\"", 1);
    assert_ne!(key, train_key(&sm, &renamed(""), "build-a"));
    let ignoring = train_key(&sm, &pipeline("cache_ignore = [\"spec.name\"]"), "build-a");
    assert_eq!(ignoring, train_key(&sm, &renamed("cache_ignore = [\"spec.name\"]"), "build-a"));
    // The data: a new version of the dataset (the spec reads the newest).
    append(&mut sm, 30, 20);
    assert_ne!(key, train_key(&sm, &base, "build-a"));
    // An upstream output: evaluating another job's model keys differently.
    let eval = |model: u64| {
        let text = format!("name = \"e\"\n[[step]]\nname = \"eval\"\nkind = \"evaluate\"\nmodel = \"job:{model}\"\ndataset = \"d@1\"\n");
        sm.plan_pipeline(&PipelineSpec::parse(&text).unwrap(), "b").0[0].clone()
    };
    // No such job: not keyable now (the run would fail to submit), a predicted miss.
    assert_eq!(eval(1).prediction, "miss");
    assert!(eval(1).detail.contains("job"), "{}", eval(1).detail);
}

#[test]
fn the_checkpoint_a_step_reads_is_keyed_by_its_contents() {
    let mut sm = with_dataset();
    submit_and_run(&mut sm, &pipeline(""));
    let job = step(&sm, "p-1", "train").job_id;
    succeed(&mut sm, 20, job, 0.75);
    // Scoring job N and warm-starting from it: both keyed by its checkpoint's file hashes.
    let text = format!(
        "name = \"e\"\n[[step]]\nname = \"eval\"\nkind = \"evaluate\"\nmodel = \"job:{job}\"\ndataset = \"d@1\"\n\
         [[step]]\nname = \"train\"\nkind = \"train\"\n[step.spec]\n{}\n[step.spec.init]\ncheckpoint = \"{job}\"\n",
        train_table()
    );
    let spec = PipelineSpec::parse(&text).unwrap();
    let keys = |sm: &StateMachine| sm.plan_pipeline(&spec, "b").0.iter().map(|p| (p.key.clone(), p.inputs.clone())).collect::<Vec<_>>();
    let before = keys(&sm);
    assert!(before.iter().all(|(k, inputs)| k.len() == 64 && inputs.iter().any(|i| i.starts_with(&format!("checkpoint job:{job} step 10 ")))), "{before:?}");
    // The same reference, other bytes (a job rewritten in place): other keys.
    let files = &mut sm.jobs.get_mut(&job).unwrap().checkpoints.last_mut().unwrap().files;
    files[0].blake3 = "f".repeat(64);
    let after = keys(&sm);
    assert!(before.iter().zip(&after).all(|(a, b)| a.0 != b.0), "{before:?} {after:?}");
}

#[test]
fn cache_false_always_runs_and_the_plan_predicts_each_step() {
    let mut sm = with_dataset();
    submit_and_run(&mut sm, &pipeline("cache = false"));
    let job = step(&sm, "p-1", "train").job_id;
    assert_eq!(step(&sm, "p-1", "train").cache, CACHE_OFF);
    succeed(&mut sm, 20, job, 0.75);
    let id = run(&mut sm, 30);
    let again = step(&sm, &id, "train");
    assert!(again.job_id != 0 && again.job_id != job && again.cache == CACHE_OFF);
    // The plan: off, then unknown (it needs a step that will run).
    let (plans, _) = sm.plan_pipeline(&PipelineSpec::parse(&pipeline("cache = false")).unwrap(), "");
    let got: Vec<&str> = plans.iter().map(|p| p.prediction.as_str()).collect();
    assert_eq!(got, ["off", "unknown"]);
    // With the cache on, nothing cached yet: a miss, then unknown.
    let (plans, _) = sm.plan_pipeline(&PipelineSpec::parse(&pipeline("")).unwrap(), "");
    assert_eq!(plans.iter().map(|p| p.prediction.as_str()).collect::<Vec<_>>(), ["miss", "unknown"]);
}

/// train -> register as m -> gate m@production on d@1's last 20 records.
fn gated(min_delta: f64) -> String {
    let train = train_table();
    format!(
        "name = \"g\"\n[[step]]\nname = \"train\"\nkind = \"train\"\ncache = false\n[step.spec]\n{train}\n\
         [[step]]\nname = \"reg\"\nkind = \"register\"\nneeds = [\"train\"]\nmodel = \"{{steps.train.model}}\"\nas = \"m\"\n\
         [[step]]\nname = \"gate\"\nkind = \"gate\"\nneeds = [\"reg\"]\nmodel = \"{{steps.reg.model}}\"\nalias = \"production\"\nholdout = \"d@1\"\nrecords = [80, 100]\nmin_delta = {min_delta:?}\n"
    )
}

/// Runs pipeline g: its train job reaches `accuracy`; the gate's score jobs score
/// `candidate` (and `holder`, if it runs one). Returns the run id.
fn gate_run(sm: &mut StateMachine, index: u64, candidate: f64, holder: Option<f64>) -> String {
    let ApplyOutput::PipelineRun(r) = sm.apply(index, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "g".into(), request_id: String::new() }))).unwrap() else { panic!() };
    succeed(sm, index + 1, step(sm, &r.id, "train").job_id, 0.75);
    let first = step(sm, &r.id, "gate").job_id;
    finish_batch(sm, index + 10, first, candidate);
    if let Some(h) = holder {
        let second = step(sm, &r.id, "gate").job_id;
        assert_ne!(second, first, "the holder is scored by a job of its own");
        assert_eq!(step(sm, &r.id, "gate").state, RUNNING);
        finish_batch(sm, index + 20, second, h);
    }
    r.id
}

#[test]
fn a_gate_promotes_a_model_that_is_not_worse_than_the_holder_and_keeps_a_worse_one_out() {
    let mut sm = with_dataset();
    sm.apply(10, cmd(command::Kind::SubmitPipeline(gated(0.0)))).unwrap();
    // No holder yet: the first candidate is promoted after one score job.
    let id = gate_run(&mut sm, 100, 0.8, None);
    let gate = step(&sm, &id, "gate").clone();
    assert_eq!((gate.state.as_str(), output(&gate, "promoted").as_deref()), (SUCCEEDED, Some("true")));
    assert_eq!(output(&gate, "candidate_score").as_deref(), Some("0.8"));
    let alias = |sm: &StateMachine| sm.model_page("m", 0).unwrap().aliases.iter().find(|a| a.alias == "production").map(|a| a.version);
    assert_eq!(alias(&sm), Some(1));
    // A worse candidate: version 2 scores 0.6 against version 1's 0.8; the alias stays.
    let id = gate_run(&mut sm, 200, 0.6, Some(0.8));
    let gate = step(&sm, &id, "gate").clone();
    assert_eq!(output(&gate, "promoted").as_deref(), Some("false"));
    assert_eq!((output(&gate, "holder_version").as_deref(), output(&gate, "holder_score").as_deref()), (Some("1"), Some("0.8")));
    assert!(output(&gate, "decision").unwrap().contains("not promoted"), "{:?}", gate.outputs);
    assert_eq!(alias(&sm), Some(1));
    assert_eq!(sm.pipeline_run(&id).unwrap().state, SUCCEEDED, "a gate that says no is not a failure");
    // A better one (version 3) moves it.
    let id = gate_run(&mut sm, 300, 0.95, Some(0.8));
    assert_eq!(output(step(&sm, &id, "gate"), "promoted").as_deref(), Some("true"));
    assert_eq!(alias(&sm), Some(3));
    assert!(sm.model_page("m", 0).unwrap().versions.iter().find(|v| v.version == 3).unwrap().promotion.starts_with("promoted"));
    // min_delta: a candidate must beat the holder by it.
    sm.apply(400, cmd(command::Kind::SubmitPipeline(gated(0.1)))).unwrap();
    let id = gate_run(&mut sm, 500, 0.95, Some(0.95));
    assert_eq!(output(step(&sm, &id, "gate"), "promoted").as_deref(), Some("false"));
    assert_eq!(alias(&sm), Some(3));
}

#[test]
fn an_exec_step_is_keyed_with_the_digests_of_the_files_it_names() {
    let mut sm = with_dataset();
    let text = "name = \"x\"\n[[step]]\nname = \"copy\"\nkind = \"batch\"\ncache = true\n[step.spec]\nname = \"copy\"\n[step.spec.input]\ndataset = \"d\"\n\
                [step.spec.operator]\nkind = \"exec\"\ncommand = [\"sh\", \"/opt/copy.sh\", \"--log=/var/log/x\", \"{input}\", \"{output}\"]\n[step.spec.output]\ndataset = \"o\"\n";
    let (plans, _) = sm.plan_pipeline(&PipelineSpec::parse(text).unwrap(), "b");
    assert_eq!(plans[0].prediction, "unknown", "{:?}", plans[0]);
    let run = |sm: &mut StateMachine, index| {
        let ApplyOutput::PipelineRun(r) = sm.apply(index, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "x".into(), request_id: String::new() }))).unwrap() else { panic!() };
        r.id
    };
    sm.apply(10, cmd(command::Kind::SubmitPipeline(text.into()))).unwrap();
    let digests = |sm: &mut StateMachine, index, id: &str, d: &[&str]| {
        let v = shoal_proto::PipelineFileDigests { run: id.into(), step: "copy".into(), attempt: 1, digests: d.iter().map(|s| s.to_string()).collect() };
        sm.apply(index, cmd(command::Kind::PipelineFileDigests(v)))
    };
    let mut keys = Vec::new();
    for (n, script) in [(0, "aa"), (1, "aa"), (2, "bb")] {
        let id = run(&mut sm, 20 + n * 10);
        let s = step(&sm, &id, "copy").clone();
        assert_eq!((s.cache.as_str(), s.hashing.clone(), s.job_id), (CACHE_HASHING, vec!["/opt/copy.sh".to_string(), "/var/log/x".to_string()], 0));
        let (check, files) = sm.hash_checks().into_iter().find(|(c, _)| c.run == id).unwrap();
        assert_eq!((check.attempt, files.len()), (1, 2));
        assert!(digests(&mut sm, 21 + n * 10, &id, &["/elsewhere blake3 aa", "/var/log/x absent"]).is_err(), "digests of other files");
        let script = format!("/opt/copy.sh blake3 {script}");
        digests(&mut sm, 22 + n * 10, &id, &[&script, "/var/log/x absent"]).unwrap();
        let s = step(&sm, &id, "copy");
        assert!(s.job_id != 0 && s.cache == CACHE_MISS && s.hashing.is_empty(), "{s:?}");
        assert!(s.inputs.contains(&format!("file {script}")), "{:?}", s.inputs);
        keys.push(s.cache_key.clone());
        assert!(digests(&mut sm, 23 + n * 10, &id, &[&script, "/var/log/x absent"]).is_err(), "once");
    }
    assert_eq!(keys[0], keys[1], "the same files: the same key");
    assert_ne!(keys[0], keys[2], "a changed script: another key");
}
