//! The pipeline state's tests: runs, retries, resume, triggers, schedules.
use super::super::tests::{cmd, commit, outcome, spec, with_dataset};
use super::*;
use shoal_proto::{JobAssigned, UpdateProgress};

/// spec(2) as the `[step.spec]` tables of a train step.
pub(super) fn train_table() -> String {
    spec(2).lines().map(|l| match l.strip_prefix('[') { Some(rest) => format!("[step.spec.{rest}"), None => l.to_string() }).collect::<Vec<_>>().join("\n")
}

/// train -> register (when accuracy >= 0.5) -> evaluate the registered model; `extra` is
/// appended to the train step.
fn pipeline(extra: &str) -> String {
    let train = train_table();
    format!(
        "name = \"p\"\n[[step]]\nname = \"train\"\nkind = \"train\"\n{extra}\n[step.spec]\n{train}\n\
         [[step]]\nname = \"reg\"\nkind = \"register\"\nneeds = [\"train\"]\nwhen = \"steps.train.test_accuracy >= 0.5\"\nmodel = \"{{steps.train.model}}\"\nas = \"m\"\nalias = \"candidate\"\n\
         [[step]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"reg\"]\nmodel = \"{{steps.reg.model}}\"\ndataset = \"d@1\"\nrecords = [80, 100]\n"
    )
}

pub(super) fn submit_and_run(sm: &mut StateMachine, text: &str) -> PipelineRun {
    let ApplyOutput::Pipeline(p) = sm.apply(10, cmd(command::Kind::SubmitPipeline(text.into()))).unwrap() else { panic!() };
    let ApplyOutput::PipelineRun(run) = sm.apply(11, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: p.name.clone(), request_id: String::new() }))).unwrap() else { panic!() };
    *run
}

pub(super) fn step<'a>(sm: &'a StateMachine, run: &str, name: &str) -> &'a StepRun {
    sm.pipeline_run(run).unwrap().steps.iter().find(|s| s.name == name).unwrap()
}

/// Runs job `id` to success on the idle workers with `accuracy`.
pub(super) fn succeed(sm: &mut StateMachine, index: u64, id: u64, accuracy: f64) {
    let (job, generation, workers) = sm.next_placement(|_| true).unwrap();
    assert_eq!(job, id);
    sm.apply(index, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation, workers: workers.clone(), last_step: 0 }))).unwrap();
    let progress = JobProgress { step: 10, total_steps: 10, test_accuracy: accuracy, ..Default::default() };
    sm.apply(index + 1, cmd(command::Kind::UpdateProgress(UpdateProgress { job_id: id, generation, progress: Some(progress) }))).unwrap();
    commit(sm, index + 2, id, generation, 10).unwrap();
    for w in &workers {
        outcome(sm, index + 3, id, generation, w, "same");
    }
    assert_eq!(sm.job(id).unwrap().state(), JobState::Succeeded);
}

#[test]
fn steps_start_when_their_upstream_succeeds_with_its_outputs_exactly_once() {
    let mut sm = with_dataset();
    let run = submit_and_run(&mut sm, &pipeline(""));
    assert_eq!(run.id, "p-1");
    let train = step(&sm, "p-1", "train").clone();
    assert_eq!((train.state.as_str(), train.attempts), (RUNNING, 1));
    assert_eq!(step(&sm, "p-1", "reg").state, PENDING);
    let job = sm.job(train.job_id).unwrap();
    assert_eq!((job.pipeline_run.as_str(), job.pipeline_step.as_str()), ("p-1", "train"));
    succeed(&mut sm, 20, train.job_id, 0.75);
    // In the same apply: train settled, reg registered the model, eval's job submitted.
    let train = step(&sm, "p-1", "train");
    assert_eq!(train.state, SUCCEEDED);
    assert_eq!(output(train, "model").unwrap(), format!("job:{}", train.job_id));
    assert_eq!(output(train, "test_accuracy").unwrap(), "0.75");
    let reg = step(&sm, "p-1", "reg");
    assert_eq!((reg.state.as_str(), output(reg, "model").as_deref()), (SUCCEEDED, Some("m@1")));
    let m = sm.model_page("m", 0).unwrap();
    assert_eq!(m.aliases[0].alias, "candidate");
    let eval = step(&sm, "p-1", "eval").clone();
    assert_eq!(eval.state, RUNNING);
    let batch = sm.job(eval.job_id).unwrap();
    assert_eq!(batch.batch.as_ref().unwrap().model, "m@1");
    assert!(batch.batch.as_ref().unwrap().output_dataset.is_empty(), "evaluate writes nothing");
    // Another entry that ends nothing changes nothing; the run goes on.
    assert_eq!(sm.pipeline_run("p-1").unwrap().state, RUNNING);
    // Cancelling the run stops the evaluation's job and cancels the run.
    let ApplyOutput::PipelineRun(r) = sm.apply(40, cmd(command::Kind::CancelPipelineRun("p-1".into()))).unwrap() else { panic!() };
    assert_eq!(r.state, CANCELLED);
    assert_eq!(sm.job(eval.job_id).unwrap().state(), JobState::Cancelled);
    assert_eq!(step(&sm, "p-1", "eval").state, CANCELLED);
    assert!(sm.apply(41, cmd(command::Kind::CancelPipelineRun("p-1".into()))).is_err());
}

#[test]
fn a_false_condition_skips_the_step_and_what_needs_it() {
    let mut sm = with_dataset();
    submit_and_run(&mut sm, &pipeline(""));
    let job = step(&sm, "p-1", "train").job_id;
    succeed(&mut sm, 20, job, 0.25);
    let run = sm.pipeline_run("p-1").unwrap();
    assert_eq!(step(&sm, "p-1", "reg").state, SKIPPED);
    assert_eq!(step(&sm, "p-1", "eval").state, SKIPPED);
    assert!(step(&sm, "p-1", "eval").reason.contains("\"reg\""));
    assert_eq!(run.state, SUCCEEDED);
    assert!(sm.models().next().is_none());
}

#[test]
fn a_failed_attempt_retries_and_an_old_attempts_job_settles_nothing() {
    let mut sm = with_dataset();
    submit_and_run(&mut sm, &pipeline("retries = 1\ntimeout_s = 60"));
    let first = step(&sm, "p-1", "train").job_id;
    // A timeout for another attempt is refused; the right one fails the job.
    let timeout = |attempt| cmd(command::Kind::PipelineStepTimeout(PipelineStepTimeout { run: "p-1".into(), step: "train".into(), attempt }));
    assert!(sm.apply(20, timeout(2)).is_err());
    sm.apply(21, timeout(1)).unwrap();
    assert_eq!(sm.job(first).unwrap().state(), JobState::Failed);
    let train = step(&sm, "p-1", "train").clone();
    assert_eq!((train.state.as_str(), train.attempts, train.jobs.len()), (RUNNING, 2, 2));
    assert!(train.error.contains("timeout_s = 60"), "{}", train.error);
    assert_ne!(train.job_id, first);
    // The second attempt fails too: out of retries, the run fails naming the step.
    sm.apply(22, cmd(command::Kind::CancelJob(train.job_id))).unwrap();
    let run = sm.pipeline_run("p-1").unwrap();
    assert_eq!((run.state.as_str(), step(&sm, "p-1", "train").state.as_str()), (FAILED, FAILED));
    assert!(run.error.starts_with("step train failed"), "{}", run.error);
    assert_eq!(step(&sm, "p-1", "reg").state, PENDING);

    // Resumed: the failed step runs again as attempt 3 with its retries renewed.
    let resume = |from: &str| cmd(command::Kind::ResumePipelineRun(shoal_proto::ResumePipelineRequest { id: "p-1".into(), from: from.into(), request_id: String::new() }));
    assert!(sm.apply(23, resume("nope")).is_err());
    sm.apply(24, resume("")).unwrap();
    let train = step(&sm, "p-1", "train").clone();
    assert_eq!((train.state.as_str(), train.attempts, train.retries), (RUNNING, 3, 3));
    assert!(sm.apply(25, resume("")).is_err(), "a running run is not resumed");
    succeed(&mut sm, 30, train.job_id, 0.75);
    let eval = step(&sm, "p-1", "eval").clone();
    sm.apply(40, cmd(command::Kind::CancelJob(eval.job_id))).unwrap();
    assert_eq!(sm.pipeline_run("p-1").unwrap().state, FAILED);
    // Only the failed step runs again; the others keep their outputs as they were.
    let (train, reg) = (step(&sm, "p-1", "train").clone(), step(&sm, "p-1", "reg").clone());
    sm.apply(41, resume("")).unwrap();
    assert_eq!((step(&sm, "p-1", "train"), step(&sm, "p-1", "reg")), (&train, &reg));
    let again = step(&sm, "p-1", "eval").clone();
    assert_eq!((again.state.as_str(), again.attempts), (RUNNING, 2));
    assert_ne!(again.job_id, eval.job_id);
    // The old attempt's job ending now (a duplicate cancel is refused; none can settle it).
    assert!(sm.apply(42, cmd(command::Kind::CancelJob(eval.job_id))).is_err());
    // --from a step that succeeded: it and everything downstream run again.
    sm.apply(43, cmd(command::Kind::CancelPipelineRun("p-1".into()))).unwrap();
    sm.apply(44, resume("train")).unwrap();
    let run = sm.pipeline_run("p-1").unwrap();
    assert_eq!(run.resumes, 3);
    let states: Vec<&str> = run.steps.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, [RUNNING, PENDING, PENDING]);
    assert_eq!(step(&sm, "p-1", "train").attempts, 4);
}

#[test]
fn a_step_that_cannot_start_fails_and_the_spec_is_versioned() {
    let mut sm = with_dataset();
    // The dataset does not exist: the train step cannot submit its job.
    let text = pipeline("").replace("name = \"d\"", "name = \"nope\"");
    let run = submit_and_run(&mut sm, &text);
    assert_eq!(run.state, FAILED);
    assert!(run.steps[0].error.contains("does not exist"), "{}", run.steps[0].error);
    assert_eq!(sm.jobs().count(), 0);
    // The same spec again keeps its version; another is the next one.
    let ApplyOutput::Pipeline(p) = sm.apply(30, cmd(command::Kind::SubmitPipeline(text.clone()))).unwrap() else { panic!() };
    assert_eq!((p.version, p.runs_started), (1, 1));
    let ApplyOutput::Pipeline(p) = sm.apply(31, cmd(command::Kind::SubmitPipeline(pipeline("")))).unwrap() else { panic!() };
    assert_eq!(p.version, 2);
    let ApplyOutput::PipelineRun(r) = sm.apply(32, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "p".into(), request_id: String::new() }))).unwrap() else { panic!() };
    assert_eq!((r.id.as_str(), r.version, r.state.as_str()), ("p-2", 2, RUNNING));
    // Runs survive a snapshot.
    let back = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
    assert_eq!(back.state_hash(), sm.state_hash());
    assert_eq!(back.pipeline_run("p-2").unwrap(), sm.pipeline_run("p-2").unwrap());
    assert!(sm.apply(33, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "q".into(), request_id: String::new() }))).is_err());
}

/// Appends `records` records to dataset d (the next version) at `index`.
pub(super) fn append(sm: &mut StateMachine, index: u64, records: u64) -> u64 {
    append_at(sm, index, records, 0)
}

fn append_at(sm: &mut StateMachine, index: u64, records: u64, ms: u64) -> u64 {
    let mut ds = sm.dataset_view("d", 0, crate::state::DatasetView::Shards).unwrap();
    (ds.stats, ds.append, ds.version, ds.records) = (None, true, 0, records);
    ds.slices.clear();
    ds.shards = vec![shoal_proto::ShardInfo { path: format!("datasets/d/import-{index}/shard-00000.safetensors"), records, blake3: "h".into(), bytes: 1 }];
    let c = Command { kind: Some(command::Kind::RegisterDataset(ds)), proposed_unix_ms: ms, ..Default::default() };
    let ApplyOutput::Dataset(d) = sm.apply(index, c).unwrap() else { panic!() };
    d.version
}

fn with_trigger(trigger: &str) -> String {
    pipeline("").replacen("name = \"p\"\n", &format!("name = \"p\"\n[trigger]\non_append = \"d\"\n{trigger}\n"), 1)
}

#[test]
fn an_append_starts_one_run_for_its_versions_in_its_own_apply() {
    let mut sm = with_dataset();
    sm.apply(10, cmd(command::Kind::SubmitPipeline(with_trigger("min_new_records = 30")))).unwrap();
    // Version 1 was there before the trigger: it never runs for it.
    assert_eq!(sm.pipeline_runs().count(), 0);
    assert_eq!(append(&mut sm, 11, 20), 2);
    assert_eq!(sm.pipeline_runs().count(), 0, "20 new records are fewer than 30");
    assert_eq!(append(&mut sm, 12, 20), 3);
    let runs: Vec<(String, String)> = sm.pipeline_runs().map(|r| (r.id.clone(), r.cause.clone())).collect();
    assert_eq!(runs, [("p@d-v2-v3".to_string(), "append d v2..v3".to_string())]);
    // The train step's job pinned the newest version.
    let job = sm.job(sm.pipeline_run("p@d-v2-v3").unwrap().steps[0].job_id).unwrap();
    assert_eq!(job.dataset_version, 3);
    // A leader's proposal for a range already run is refused and starts nothing.
    let t = |from, to| cmd(command::Kind::PipelineTriggered(shoal_proto::PipelineTriggered { pipeline: "p".into(), from_version: from, to_version: to }));
    assert!(sm.apply(13, t(2, 3)).is_err());
    assert_eq!(sm.pipeline_runs().count(), 1);
    assert_eq!(append(&mut sm, 14, 40), 4);
    assert_eq!(sm.pipeline_run("p@d-v4").unwrap().cause, "append d v4..v4");
    // Submitting the same spec again keeps the watermark; nothing runs twice.
    sm.apply(15, cmd(command::Kind::SubmitPipeline(with_trigger("min_new_records = 30")))).unwrap();
    assert_eq!(sm.pipelines["p"].trigger_watermark, 4);
}

#[test]
fn a_debounced_trigger_runs_once_the_dataset_is_quiet_for_the_range_it_proposes() {
    let mut sm = with_dataset();
    let at = |_index: u64, ms, kind| Command { kind: Some(kind), proposed_unix_ms: ms, ..Default::default() };
    sm.apply(10, at(10, 1_000, command::Kind::SubmitPipeline(with_trigger("debounce_s = 5")))).unwrap();
    assert!(sm.due_triggers(100_000).is_empty());
    for (i, ms) in [(11, 2_000), (12, 4_000), (13, 6_000)] {
        append_at(&mut sm, i, 10, ms);
    }
    assert_eq!(sm.pipeline_runs().count(), 0, "a debounced trigger waits");
    assert!(sm.due_triggers(10_999).is_empty(), "quiet for less than 5 s since the last append");
    let due = sm.due_triggers(11_000);
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].from_version, due[0].to_version), (2, 4));
    // The proposal applied twice (a retried or repeated one) starts one run.
    sm.apply(14, at(14, 11_000, command::Kind::PipelineTriggered(due[0].clone()))).unwrap();
    assert!(sm.apply(15, at(15, 11_100, command::Kind::PipelineTriggered(due[0].clone()))).is_err());
    let ids: Vec<&str> = sm.pipeline_runs().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["p@d-v2-v4"]);
    assert!(sm.due_triggers(60_000).is_empty());
}

/// A per-second schedule whose step fails at once (so runs never overlap), run by the
/// leader duties on a simulated clock through 100 leader changes, each after a random
/// outage of 0-8 s; proposals are lost, delayed and duplicated on the way to the log.
/// Returns (the runs' slots, the slots that passed, the slots inside outages).
fn schedule_sim(catchup: &str, seed: u64) -> (Vec<u64>, Vec<u64>, Vec<Vec<u64>>, u64) {
    use crate::leader::{Action, Duties, GroupView};
    let mut rng = shoal_core::rng::SplitMix64::new(seed);
    let mut sm = with_dataset();
    let t0 = 1_800_000_000_000u64;
    let text = format!(
        "name = \"s\"\n[schedule]\ncron = \"* * * * * *\"\ncatchup = \"{catchup}\"\nmax_catchup = 100\nconcurrency = \"allow\"\n\
         [[step]]\nname = \"r\"\nkind = \"register\"\nmodel = \"job:999\"\nas = \"m\"\n"
    );
    let mut index = 100;
    sm.apply(index, Command { kind: Some(command::Kind::SubmitPipeline(text)), proposed_unix_ms: t0, ..Default::default() }).unwrap();
    let peers = BTreeMap::new();
    let group = GroupView::default();
    let mut duties = Duties::default();
    // (apply at this tick, command)
    let mut delayed: Vec<(u64, Command)> = Vec::new();
    let (mut outages, mut down_until, mut kills) = (Vec::new(), 0u64, 0);
    // Runs as they are created (the state keeps only a pipeline's newest 100 finished).
    let mut runs: Vec<u64> = Vec::new();
    let end = t0 + 900_000;
    // Each slot by its label, as run causes name it.
    let slots: BTreeMap<String, u64> = (t0 / 1000..=end / 1000).map(|s| (shoal_core::cron::slot_label(s * 1000), s * 1000)).collect();
    let mut now = t0;
    while now < end {
        now += 100;
        // The last minute is calm, so a catch-up can finish before the checks.
        if now >= down_until && kills < 100 && now < end - 60_000 && rng.below(15) == 0 {
            // The leader dies: its queued proposals may still commit; a new leader
            // takes over after an outage with fresh duties.
            kills += 1;
            let outage = rng.below(9) * 1000;
            down_until = now + outage;
            // The slots that come due while no leader proposes (whole seconds in
            // (now, down_until]).
            outages.push((now / 1000 + 1..=down_until / 1000).map(|s| s * 1000).collect::<Vec<u64>>());
            duties = Duties::default();
        }
        if now >= down_until {
            for a in duties.tick(now, now, 2_000, &peers, &sm, &group) {
                let Action::Propose(kind) = a else { continue };
                let c = Command { kind: Some(kind), proposed_unix_ms: now, ..Default::default() };
                match rng.below(10) {
                    0 => {}
                    1 => delayed.push((now + rng.below(30) * 100, c)),
                    2 => {
                        delayed.push((now + rng.below(30) * 100, c.clone()));
                        delayed.push((now, c));
                    }
                    _ => delayed.push((now, c)),
                }
            }
        }
        delayed.sort_by_key(|(t, _)| *t);
        while delayed.first().is_some_and(|(t, _)| *t <= now) {
            let (_, c) = delayed.remove(0);
            index += 1;
            let before = sm.next_run_seq;
            let _ = sm.apply(index, c);
            runs.extend(sm.pipeline_runs().filter(|r| r.seq > before).map(|r| slots[r.cause.trim_start_matches("schedule ")]));
        }
    }
    let passed: Vec<u64> = (t0 / 1000 + 1..=(end - 5_000) / 1000).map(|s| s * 1000).collect();
    let runs: Vec<u64> = runs.into_iter().filter(|s| *s <= end - 5_000).collect();
    assert_eq!(kills, 100, "seed {seed}: {kills} leader changes");
    (runs, passed, outages, sm.pipeline("s").unwrap().slots_skipped)
}

#[test]
fn a_per_second_schedule_runs_each_slot_once_through_a_hundred_leader_changes() {
    for seed in 0..3 {
        // all: every slot runs once, none missing, also those inside an outage.
        let (runs, passed, outages, _) = schedule_sim("all", seed);
        let set: BTreeSet<u64> = runs.iter().copied().collect();
        assert_eq!(set.len(), runs.len(), "seed {seed}: a slot ran twice");
        assert!(runs.windows(2).all(|w| w[0] < w[1]), "seed {seed}: runs out of slot order");
        let missing: Vec<&u64> = passed.iter().filter(|s| !set.contains(s)).collect();
        assert!(missing.is_empty(), "seed {seed}: catchup all missed {} slots: {missing:?}", missing.len());
        assert!(outages.iter().any(|o| o.len() >= 5), "seed {seed}: no long outage");

        // latest: once each; slots outside the outages run (but for those whose proposal
        // was lost and a newer slot came before it was proposed again); of an outage's
        // slots at most the newest.
        let (runs, passed, outages, skipped) = schedule_sim("latest", seed);
        let set: BTreeSet<u64> = runs.iter().copied().collect();
        assert_eq!(set.len(), runs.len(), "seed {seed}: a slot ran twice");
        assert!(runs.windows(2).all(|w| w[0] < w[1]), "seed {seed}: runs out of slot order");
        let inside: BTreeSet<u64> = outages.iter().flatten().copied().collect();
        let outside: Vec<&u64> = passed.iter().filter(|s| !inside.contains(s) && !inside.contains(&(*s - 1000))).collect();
        let ran = outside.iter().filter(|s| set.contains(s)).count();
        assert!(ran * 10 >= outside.len() * 8, "seed {seed}: latest ran {ran} of the {} slots outside outages", outside.len());
        let older: Vec<u64> = outages.iter().flat_map(|o| o.iter().rev().skip(1)).copied().filter(|s| set.contains(s)).collect();
        assert!(older.is_empty(), "seed {seed}: latest ran older missed slots {older:?}: outages {outages:?}, runs {runs:?}");
        assert!(skipped == 0, "latest skips by jumping the watermark, not by skip entries");

        // none: a missed slot never runs late (more than the grace after its time).
        let (runs, _, outages, _) = schedule_sim("none", seed);
        let set: BTreeSet<u64> = runs.iter().copied().collect();
        assert_eq!(set.len(), runs.len(), "seed {seed}: a slot ran twice");
        // Slots 6 s or more before an outage's end: past the grace when a leader came.
        let late: Vec<u64> = outages.iter().flat_map(|o| o.iter().rev().skip(6)).copied().filter(|s| set.contains(s)).collect();
        assert!(late.is_empty(), "seed {seed}: catchup none ran slots late: {late:?}");
    }
}

#[test]
fn pause_unpause_and_an_edit_fire_nothing_extra_and_concurrency_decides_overlaps() {
    let mut sm = with_dataset();
    let at = |ms: u64, kind| Command { kind: Some(kind), proposed_unix_ms: ms, ..Default::default() };
    let t0 = 1_800_000_000_000u64;
    let spec = |cron: &str, concurrency: &str| {
        format!("name = \"s\"\n[schedule]\ncron = \"{cron}\"\nconcurrency = \"{concurrency}\"\n{}", pipeline("").trim_start_matches("name = \"p\"\n"))
    };
    sm.apply(1, at(t0, command::Kind::SubmitPipeline(spec("*/10 * * * * *", "forbid")))).unwrap();
    let fire = |slot: u64| command::Kind::ScheduleFire(shoal_proto::ScheduleFire { pipeline: "s".into(), slots_ms: vec![slot], skip: false });
    assert!(sm.apply(2, at(t0 + 5_000, fire(t0 + 10_000))).is_err(), "not due yet");
    assert!(sm.apply(3, at(t0 + 15_000, fire(t0 + 5_000))).is_err(), "not a slot");
    sm.apply(4, at(t0 + 10_100, fire(t0 + 10_000))).unwrap();
    assert!(sm.apply(5, at(t0 + 10_200, fire(t0 + 10_000))).is_err(), "a slot runs once");
    let first = sm.pipeline_run(&format!("s@{}", shoal_core::cron::slot_label(t0 + 10_000))).unwrap().clone();
    assert_eq!(first.state, RUNNING);
    // forbid: the next slot, while that run runs, is skipped.
    sm.apply(6, at(t0 + 20_000, fire(t0 + 20_000))).unwrap();
    assert_eq!((sm.pipeline_runs().count(), sm.pipeline("s").unwrap().slots_skipped), (1, 1));
    // Paused: nothing is due; unpaused: the slots that passed meanwhile never run.
    sm.apply(7, at(t0 + 21_000, command::Kind::PausePipeline(shoal_proto::PausePipelineRequest { name: "s".into(), paused: true, request_id: String::new() }))).unwrap();
    assert!(sm.due_schedules(t0 + 95_000).is_empty());
    assert!(sm.apply(8, at(t0 + 31_000, fire(t0 + 30_000))).is_err());
    sm.apply(9, at(t0 + 95_000, command::Kind::PausePipeline(shoal_proto::PausePipelineRequest { name: "s".into(), paused: false, request_id: String::new() }))).unwrap();
    assert!(sm.due_schedules(t0 + 99_000).is_empty(), "slots 30 s to 90 s passed while paused");
    assert_eq!(sm.due_schedules(t0 + 100_500).iter().map(|f| f.slots_ms.clone()).collect::<Vec<_>>(), [vec![t0 + 100_000]]);
    // replace: an edit (another concurrency, same cron) keeps the watermark; the next slot
    // cancels the running run and starts its own.
    sm.apply(10, at(t0 + 100_600, command::Kind::SubmitPipeline(spec("*/10 * * * * *", "replace")))).unwrap();
    sm.apply(11, at(t0 + 100_700, fire(t0 + 100_000))).unwrap();
    assert_eq!(sm.pipeline_run(&first.id).unwrap().state, CANCELLED);
    // An edit of the cron moves the watermark to the edit: nothing before it runs.
    sm.apply(12, at(t0 + 125_000, command::Kind::SubmitPipeline(spec("*/5 * * * * *", "queue")))).unwrap();
    assert!(sm.due_schedules(t0 + 125_000).is_empty());
    assert_eq!(sm.due_schedules(t0 + 130_000).iter().map(|f| f.slots_ms.clone()).collect::<Vec<_>>(), [vec![t0 + 130_000]]);
    // queue: the slot waits while a scheduled run runs (it stays due).
    assert_eq!(sm.apply(13, at(t0 + 130_100, fire(t0 + 130_000))).unwrap(), ApplyOutput::None);
    assert_eq!(sm.pipeline("s").unwrap().schedule_watermark_ms, t0 + 125_000);
    assert_eq!(sm.due_schedules(t0 + 130_200).len(), 1);
}

#[test]
fn a_validate_step_checks_the_version_in_place_and_fails_naming_what() {
    let mut sm = with_dataset();
    let text = |min: u64| format!(
        "name = \"v\"\n[[step]]\nname = \"check\"\nkind = \"validate\"\ndataset = \"d\"\nmin_records = {min}\nclasses = 2\nfeature_shape = [4]\nmax_label_js = 0.1\n\
         [[step]]\nname = \"after\"\nkind = \"validate\"\nneeds = [\"check\"]\ndataset = \"{{steps.check.dataset}}\"\n"
    );
    let run = submit_and_run(&mut sm, &text(50));
    assert_eq!(run.state, SUCCEEDED, "{run:?}");
    assert_eq!(output(&run.steps[0], "dataset").as_deref(), Some("d@1"));
    assert_eq!(output(&run.steps[1], "records").as_deref(), Some("100"));
    let ApplyOutput::Pipeline(_) = sm.apply(20, cmd(command::Kind::SubmitPipeline(text(1000)))).unwrap() else { panic!() };
    let ApplyOutput::PipelineRun(run) = sm.apply(21, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "v".into(), request_id: String::new() }))).unwrap() else { panic!() };
    assert_eq!(run.state, FAILED);
    assert!(run.error.contains("d@1 has 100 records, fewer than min_records = 1000"), "{}", run.error);
    assert!(PipelineSpec::parse(&text(5).replace("max_label_js = 0.1", "max_label_js = 2.0")).unwrap_err().to_string().contains("max_label_js"));
}

#[test]
fn an_append_step_imports_only_the_files_no_slice_holds_yet() {
    use shoal_proto::{DatasetSlice, PipelineIncoming, ShardInfo};
    let mut sm = with_dataset();
    let text = "name = \"a\"\n[[step]]\nname = \"add\"\nkind = \"append\"\ndataset = \"d\"\nformat = \"csv\"\nlabel = \"y\"\n";
    submit_and_run(&mut sm, text);
    let s = step(&sm, "a-1", "add").clone();
    assert_eq!((s.state.as_str(), s.incoming.as_str(), s.job_id), (RUNNING, "incoming/d/", 0));
    let (l, prefix) = sm.incoming_checks().pop().unwrap();
    assert_eq!((l.attempt, prefix.as_str()), (1, "incoming/d/"));
    let listing = |run: &str, attempt, files: &[&str]| {
        cmd(command::Kind::PipelineIncoming(PipelineIncoming { run: run.into(), step: "add".into(), attempt, files: files.iter().map(|f| f.to_string()).collect(), error: String::new() }))
    };
    assert!(sm.apply(20, listing("a-1", 2, &["incoming/d/a.csv"])).is_err(), "another attempt's listing");
    // Files of another folder or format are not this step's.
    sm.apply(21, listing("a-1", 1, &["incoming/d/b.csv", "incoming/d/a.csv", "incoming/d/notes.txt", "incoming/e/c.csv"])).unwrap();
    let s = step(&sm, "a-1", "add").clone();
    assert!(s.incoming.is_empty() && s.job_id != 0, "{s:?}");
    let job = sm.job(s.job_id).unwrap();
    let spec = shoal_core::batch::BatchSpec::parse(&job.spec_toml).unwrap();
    assert_eq!(spec.operator.files.unwrap(), ["incoming/d/a.csv", "incoming/d/b.csv"]);
    assert_eq!(job.batch.as_ref().unwrap().tasks.len(), 2, "a task per file");
    assert!(sm.incoming_checks().is_empty());
    assert!(sm.apply(22, listing("a-1", 1, &["incoming/d/a.csv"])).is_err(), "a repeated listing starts nothing");

    // Once a slice holds a.csv (as the import's registration names it), a run takes only
    // what is new; with nothing new there is no job and no version.
    sm.apply(23, cmd(command::Kind::CancelPipelineRun("a-1".into()))).unwrap();
    let mut ds = sm.dataset_view("d", 0, crate::state::DatasetView::Shards).unwrap();
    (ds.stats, ds.append, ds.version, ds.records) = (None, true, 0, 10);
    ds.shards = vec![ShardInfo { path: "datasets/d/batch-9/task-00000-a1.safetensors".into(), records: 10, blake3: "h".into(), bytes: 1 }];
    ds.slices = vec![DatasetSlice { sources: vec!["incoming/d/a.csv".into()], ..Default::default() }];
    sm.apply(24, cmd(command::Kind::RegisterDataset(ds))).unwrap();
    let run = |sm: &mut StateMachine, index| {
        let ApplyOutput::PipelineRun(r) = sm.apply(index, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "a".into(), request_id: String::new() }))).unwrap() else { panic!() };
        r.id
    };
    let id = run(&mut sm, 25);
    sm.apply(26, listing(&id, 1, &["incoming/d/a.csv"])).unwrap();
    let s = step(&sm, &id, "add");
    assert_eq!((s.state.as_str(), s.job_id), (SUCCEEDED, 0));
    assert_eq!((output(s, "new_records").as_deref(), output(s, "version").as_deref(), output(s, "dataset").as_deref()), (Some("0"), Some("2"), Some("d@2")));
    let id = run(&mut sm, 27);
    sm.apply(28, listing(&id, 1, &["incoming/d/a.csv", "incoming/d/b.csv"])).unwrap();
    let job = sm.job(step(&sm, &id, "add").job_id).unwrap();
    assert_eq!(shoal_core::batch::BatchSpec::parse(&job.spec_toml).unwrap().operator.files.unwrap(), ["incoming/d/b.csv"]);
    // A listing that failed fails the attempt, naming why.
    let id = run(&mut sm, 29);
    let failed = PipelineIncoming { run: id.clone(), step: "add".into(), attempt: 1, files: vec![], error: "the store is unreachable".into() };
    sm.apply(30, cmd(command::Kind::PipelineIncoming(failed))).unwrap();
    assert!(step(&sm, &id, "add").error.contains("listing the incoming files: the store is unreachable"));
    // No such dataset: the attempt fails at once.
    let bad = submit_and_run(&mut sm, &text.replace("name = \"a\"", "name = \"b\"").replace("dataset = \"d\"", "dataset = \"nope\""));
    assert!(bad.steps[0].error.contains("there is no dataset \"nope\""), "{:?}", bad.steps[0]);
}
