//! The state machine's tests: commands, jobs, datasets, checkpoints, snapshots.
use super::*;
use jobs::cause_label;
use shoal_proto::Message;
use shoal_proto::{
    CheckpointCommit, CheckpointError, CheckpointFile, CheckpointManifest, DatasetSlice, JobAssigned, JobProgress, OutcomeReport, RegisterWorkerRequest,
    ResumeJobRequest, ShardInfo, UpdateProgress, WorkerLost,
};

pub(super) fn cmd(kind: command::Kind) -> Command {
    Command { kind: Some(kind), ..Default::default() }
}

#[test]
fn a_retried_request_applies_once() {
    let mut sm = with_dataset();
    let submit = |id: &str| Command { request_id: id.into(), kind: Some(command::Kind::SubmitJob(spec(2))), ..Default::default() };
    let ApplyOutput::Job(a) = sm.apply(5, submit("req-1")).unwrap() else { panic!() };
    let ApplyOutput::Job(b) = sm.apply(6, submit("req-1")).unwrap() else { panic!() };
    assert_eq!(a.id, b.id);
    assert_eq!(sm.jobs().count(), 1);
    let ApplyOutput::Job(c) = sm.apply(7, submit("req-2")).unwrap() else { panic!() };
    assert_ne!(a.id, c.id);
    assert_eq!(sm.jobs().count(), 2);
}

pub(super) fn spec(workers: u32) -> String {
    format!(
        "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 80]\ntest = [80, 100]\n\
         [training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = {workers}\n"
    )
}

pub(super) fn with_dataset() -> StateMachine {
    let mut sm = StateMachine::default();
    let ds = DatasetInfo {
        name: "d".into(),
        version: 1,
        records: 100,
        feature_shape: vec![4],
        classes: 2,
        shards: vec![ShardInfo { path: "datasets/d/import-1/shard-00000.safetensors".into(), records: 100, blake3: "h".into(), bytes: 1 }],
        ..Default::default()
    };
    sm.apply(1, cmd(command::Kind::RegisterDataset(ds))).unwrap();
    for i in 0..2 {
        let r = RegisterWorkerRequest { address: format!("127.0.0.1:{}", 9000 + i), pid: 1, device: "cpu".into(), request_id: String::new(), ..Default::default() };
        sm.apply(2 + i, cmd(command::Kind::RegisterWorker(r))).unwrap();
    }
    sm
}

fn manifest(job: u64, step: u64) -> CheckpointManifest {
    CheckpointManifest {
        job_id: job,
        step,
        world_size: 2,
        dir: shoal_core::checkpoint::checkpoint_dir(job, step),
        files: vec![CheckpointFile { name: "part-0.safetensors".into(), bytes: 8, blake3: "0".repeat(64), rank: 0 }],
        ..Default::default()
    }
}

pub(super) fn commit(sm: &mut StateMachine, index: u64, job: u64, generation: u64, step: u64) -> ApplyResult {
    let c = CheckpointCommit { worker_id: "w1".into(), job_id: job, generation, manifest: Some(manifest(job, step)) };
    sm.apply(index, cmd(command::Kind::CheckpointCommitted(c)))
}

pub(super) fn outcome(sm: &mut StateMachine, index: u64, job: u64, generation: u64, worker: &str, hash: &str) {
    let result = RankResult { param_blake3: hash.into(), ..Default::default() };
    let r = OutcomeReport { worker_id: worker.into(), job_id: job, generation, ok: true, result: Some(result), ..Default::default() };
    sm.apply(index, cmd(command::Kind::RankOutcome(r))).unwrap();
}

/// Submits spec(2) (10 steps) and places it on the idle workers; returns (job, generation).
fn running_job(sm: &mut StateMachine) -> (u64, u64) {
    let ApplyOutput::Job(job) = sm.apply(5, cmd(command::Kind::SubmitJob(spec(2)))).unwrap() else { panic!() };
    let (id, gen, workers) = sm.next_placement(|_| true).unwrap();
    assert_eq!((id, gen), (job.id, 1));
    sm.apply(6, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers, last_step: 0 }))).unwrap();
    (id, gen)
}

#[test]
fn a_dataset_grows_by_slices_that_match_its_schema() {
    let mut sm = StateMachine::default();
    let slice = |folder: &str, records: u64, shape: Vec<u64>, dtype: &str, classes: u32, append: bool| {
        let shards = vec![ShardInfo { path: format!("datasets/d/{folder}/shard-00000.safetensors"), records, blake3: format!("h-{folder}"), bytes: 1 }];
        let src = DatasetSlice { sources: vec![format!("{folder}.idx")], ..Default::default() };
        cmd(command::Kind::RegisterDataset(DatasetInfo {
            name: "d".into(),
            records,
            feature_shape: shape,
            classes,
            shards,
            slices: vec![src],
            feature_dtype: dtype.into(),
            append,
            ..Default::default()
        }))
    };
    let e = sm.apply(1, slice("a", 40, vec![4], "u8", 10, true)).unwrap_err().to_string();
    assert!(e.contains("does not exist") && e.contains("data import"), "{e}");
    let ApplyOutput::Dataset(v1) = sm.apply(2, slice("a", 40, vec![4], "u8", 10, false)).unwrap() else { panic!() };
    assert_eq!((v1.version, v1.slices.len(), v1.slices[0].first, v1.slices[0].records, v1.append), (1, 1, 0, 40, false));
    let e = sm.apply(3, slice("b", 10, vec![4], "u8", 10, false)).unwrap_err().to_string();
    assert!(e.contains("exists") && e.contains("shoal data append d"), "{e}");
    // Slices that do not fit the schema: nothing is added.
    for (bad, what) in [
        (slice("b", 10, vec![5], "u8", 10, true), "shape"),
        (slice("b", 10, vec![4], "f32", 10, true), "f32"),
        (slice("b", 10, vec![4], "u8", 11, true), "label 10"),
        (slice("a", 10, vec![4], "u8", 10, true), "already holds"),
    ] {
        let e = sm.apply(4, bad).unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
    assert_eq!(sm.dataset("d", 0).unwrap().version, 1);
    // A slice with fewer classes than the dataset is fine: its labels are known ones.
    let ApplyOutput::Dataset(added) = sm.apply(5, slice("b", 10, vec![4], "u8", 2, true)).unwrap() else { panic!() };
    // The registration answers with the new slice alone.
    assert_eq!((added.version, added.records, added.slices.len(), added.shards.len(), added.slice_count), (2, 50, 1, 1, 2));
    let v2 = sm.dataset_view("d", 2, DatasetView::Page(0)).unwrap();
    assert_eq!((v2.version, v2.records, v2.classes, v2.shards.len()), (2, 50, 10, 2));
    // Newest first.
    assert_eq!((v2.slices[0].first, v2.slices[0].records, v2.slices[0].folder.as_str()), (40, 10, "datasets/d/b"));
    assert_eq!(v2.shards[0], v1.shards[0], "the old records keep their indices");
    assert_eq!(sm.dataset_view("d", 2, DatasetView::Shards).unwrap().shards, v2.shards);
    assert_eq!(sm.dataset("d", 1).unwrap().records, 40, "versions are immutable");
    assert_eq!(sm.dataset_view("d", 1, DatasetView::Shards).unwrap().shards, v1.shards);
}

#[test]
fn a_job_below_its_maximum_grows_when_a_worker_registers() {
    let mut sm = with_dataset(); // w1, w2
    let text = spec(2).replace("workers = 2", "workers = 2\nmax_workers = 3");
    let ApplyOutput::Job(job) = sm.apply(5, cmd(command::Kind::SubmitJob(text))).unwrap() else { panic!() };
    let (id, gen, two) = sm.next_placement(|_| true).unwrap();
    sm.apply(6, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: two, last_step: 0 }))).unwrap();
    commit(&mut sm, 7, id, gen, 2).unwrap();
    assert_eq!(sm.job(id).unwrap().state(), JobState::Running, "no idle worker: nothing to grow into");
    let p = JobProgress { step: 7, ..Default::default() };
    sm.apply(8, cmd(command::Kind::UpdateProgress(UpdateProgress { job_id: id, generation: gen, progress: Some(p) }))).unwrap();
    let r = RegisterWorkerRequest { address: "127.0.0.1:9100".into(), pid: 1, device: "cpu".into(), ..Default::default() };
    sm.apply(9, cmd(command::Kind::RegisterWorker(r))).unwrap();
    let j = sm.job(id).unwrap();
    assert_eq!((j.state(), cause_label(j.next_generation_cause())), (JobState::Queued, "joined"), "a new worker joins at once");
    let (_, gen2, three) = sm.next_placement(|_| true).unwrap();
    sm.apply(10, cmd(command::Kind::JobAssigned(JobAssigned { job_id: job.id, generation: gen2, workers: three, last_step: 0 }))).unwrap();
    let j = sm.job(id).unwrap();
    // Where the last generation got to, not the checkpoint (step 2): the state is in memory.
    assert_eq!((j.world_size, j.membership.last().unwrap().cause.as_str(), j.membership.last().unwrap().step), (3, "joined", 7));
    assert!(sm.assignment("w3").unwrap().carry_state, "a change of workers carries the state in memory");
    // Rank 0 reports where the generation really started (in memory, past the checkpoint).
    let p = JobProgress { step: 5, continued_from: Some(5), ..Default::default() };
    let u = UpdateProgress { job_id: id, generation: gen2, progress: Some(p) };
    sm.apply(11, cmd(command::Kind::UpdateProgress(u))).unwrap();
    assert_eq!(sm.job(id).unwrap().membership.last().unwrap().step, 5);
    // Reports can arrive out of order: an older one does not move progress back.
    let late = JobProgress { step: 4, continued_from: Some(4), ..Default::default() };
    sm.apply(12, cmd(command::Kind::UpdateProgress(UpdateProgress { job_id: id, generation: gen2, progress: Some(late) }))).unwrap();
    let j = sm.job(id).unwrap();
    assert_eq!((j.progress.as_ref().unwrap().step, j.membership.last().unwrap().step), (5, 5));
}

#[test]
fn a_job_below_its_maximum_grows_at_a_checkpoint_when_a_worker_is_idle() {
    let mut sm = with_dataset(); // w1, w2
    let r = RegisterWorkerRequest { address: "127.0.0.1:9100".into(), pid: 1, device: "cpu".into(), ..Default::default() };
    sm.apply(3, cmd(command::Kind::RegisterWorker(r))).unwrap();
    let ApplyOutput::Job(small) = sm.apply(4, cmd(command::Kind::SubmitJob(spec(1)))).unwrap() else { panic!() };
    let text = spec(2).replace("workers = 2", "workers = 2\nmax_workers = 3");
    let ApplyOutput::Job(job) = sm.apply(5, cmd(command::Kind::SubmitJob(text))).unwrap() else { panic!() };
    let (s, sgen, one) = sm.next_placement(|_| true).unwrap();
    assert_eq!((s, one.len()), (small.id, 1));
    sm.apply(6, cmd(command::Kind::JobAssigned(JobAssigned { job_id: s, generation: sgen, workers: one.clone(), last_step: 0 }))).unwrap();
    let (id, gen, two) = sm.next_placement(|_| true).unwrap();
    assert_eq!((id, two.len()), (job.id, 2));
    sm.apply(7, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: two, last_step: 0 }))).unwrap();
    commit(&mut sm, 8, s, sgen, 10).unwrap();
    outcome(&mut sm, 9, s, sgen, &one[0], "h");
    assert_eq!(sm.job(s).unwrap().state(), JobState::Succeeded);
    assert_eq!(sm.job(id).unwrap().state(), JobState::Running);
    commit(&mut sm, 10, id, gen, 4).unwrap();
    let j = sm.job(id).unwrap();
    assert_eq!((j.state(), cause_label(j.next_generation_cause())), (JobState::Queued, "joined"), "the freed worker joins at the checkpoint");
    let (_, gen2, three) = sm.next_placement(|_| true).unwrap();
    sm.apply(11, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen2, workers: three, last_step: 0 }))).unwrap();
    let j = sm.job(id).unwrap();
    assert_eq!((j.world_size, j.membership.last().unwrap().cause.as_str(), j.membership.last().unwrap().step), (3, "joined", 4));
}

#[test]
fn a_peer_failure_waits_for_the_leader_unless_every_rank_reports_one() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    let lost_peer = |w: &str| OutcomeReport { worker_id: w.into(), job_id: id, generation: gen, ok: false, error: "rank 1 is gone".into(), peer_failure: true, ..Default::default() };
    sm.apply(7, cmd(command::Kind::RankOutcome(lost_peer("w1")))).unwrap();
    sm.apply(8, cmd(command::Kind::RankOutcome(lost_peer("w1")))).unwrap();
    let job = sm.job(id).unwrap();
    assert_eq!((job.state(), job.peer_failures.clone()), (JobState::Running, vec![0]), "one report neither fails nor moves the job");
    sm.apply(9, cmd(command::Kind::RankOutcome(lost_peer("w2")))).unwrap();
    let job = sm.job(id).unwrap();
    assert_eq!((job.state(), job.restarts), (JobState::Queued, 1), "every rank lost its peers: back to the checkpoint");
    assert!(job.restart_cause.contains("every worker lost its peers"), "{}", job.restart_cause);
    assert!(job.peer_failures.is_empty());
}

#[test]
fn job_lifecycle_to_success() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    let workers = sm.job(id).unwrap().workers.clone();
    // A duplicate of the same decision is rejected, not applied twice.
    assert!(sm.apply(7, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: workers.clone(), last_step: 0 }))).is_err());
    let a = sm.assignment("w2").unwrap();
    assert_eq!((a.rank, a.world_size, a.peers.len()), (1, 2, 2));
    commit(&mut sm, 8, id, gen, 10).unwrap();
    for w in &workers {
        outcome(&mut sm, 9, id, gen, w, "same");
    }
    assert_eq!(sm.job(id).unwrap().state(), JobState::Succeeded);
    assert!(sm.workers().all(|w| w.state() == WorkerState::Idle));
    assert!(sm.assignment("w1").is_none());
}

#[test]
fn success_needs_agreeing_ranks_and_the_final_checkpoint() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    commit(&mut sm, 7, id, gen, 10).unwrap();
    outcome(&mut sm, 8, id, gen, "w1", "aaa");
    outcome(&mut sm, 9, id, gen, "w2", "bbb");
    let job = sm.job(id).unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert!(job.error.contains("different parameters"), "{}", job.error);

    let (id, gen) = running_job(&mut sm);
    commit(&mut sm, 12, id, gen, 5).unwrap();
    outcome(&mut sm, 13, id, gen, "w1", "h");
    outcome(&mut sm, 14, id, gen, "w2", "h");
    let job = sm.job(id).unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert!(job.error.contains("final checkpoint (step 10)"), "{}", job.error);
}

#[test]
fn checkpoints_commit_in_step_order_and_keep_the_newest() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    for (i, step) in [2u64, 4, 6, 8].into_iter().enumerate() {
        commit(&mut sm, 7 + i as u64, id, gen, step).unwrap();
    }
    // keep defaults to 3: the oldest went.
    let steps = |sm: &StateMachine| sm.job(id).unwrap().checkpoints.iter().map(|m| m.step).collect::<Vec<_>>();
    assert_eq!(steps(&sm), vec![4, 6, 8]);
    // The assignment lists them newest first.
    let a = sm.assignment("w1").unwrap();
    assert_eq!(a.checkpoints.iter().map(|m| m.step).collect::<Vec<_>>(), vec![8, 6, 4]);
    // Bad commits change nothing: another generation, a step past the end, a bad manifest.
    assert!(commit(&mut sm, 20, id, gen + 1, 9).is_err());
    assert!(commit(&mut sm, 21, id, gen, 11).is_err());
    let mut bad = manifest(id, 9);
    bad.files[0].name = "../x".into();
    let c = CheckpointCommit { worker_id: "w1".into(), job_id: id, generation: gen, manifest: Some(bad) };
    assert!(sm.apply(22, cmd(command::Kind::CheckpointCommitted(c))).is_err());
    assert_eq!(steps(&sm), vec![4, 6, 8]);
    // A checkpoint found corrupt stops being a resume point.
    let f = CheckpointError { worker_id: "w1".into(), job_id: id, generation: gen, step: 8, message: "part-1: blake3 mismatch".into(), corrupt: true };
    sm.apply(23, cmd(command::Kind::CheckpointFailed(f))).unwrap();
    assert_eq!(steps(&sm), vec![4, 6]);
    assert!(sm.job(id).unwrap().checkpoint_error.contains("step 8"));
}

#[test]
fn a_job_with_a_pool_range_runs_on_as_many_idle_workers_as_its_maximum_allows() {
    let mut sm = with_dataset(); // workers w1 and w2
    for i in 2..4 {
        let r = RegisterWorkerRequest { address: format!("127.0.0.1:{}", 9000 + i), pid: 1, device: "cpu".into(), ..Default::default() };
        sm.apply(10 + i, cmd(command::Kind::RegisterWorker(r))).unwrap();
    }
    let text = spec(2).replace("workers = 2", "workers = 2\nmin_workers = 2\nmax_workers = 3");
    let ApplyOutput::Job(job) = sm.apply(20, cmd(command::Kind::SubmitJob(text))).unwrap() else { panic!() };
    assert_eq!((job.min_workers, job.max_workers), (2, 3));
    assert_eq!(sm.next_placement(|w| w == "w1"), None, "one free worker is fewer than min_workers");
    let (_, _, two) = sm.next_placement(|w| w == "w1" || w == "w4").unwrap();
    assert_eq!(two, vec!["w1".to_string(), "w4".to_string()], "two is enough to start");
    let (_, g, three) = sm.next_placement(|_| true).unwrap();
    assert_eq!(three.len(), 3, "never more than max_workers");
    // An assignment outside the range is refused when applied; one inside sets the world size.
    let four: Vec<String> = ["w1", "w2", "w3", "w4"].map(String::from).to_vec();
    assert!(sm.apply(21, cmd(command::Kind::JobAssigned(JobAssigned { job_id: job.id, generation: g, workers: four, last_step: 0 }))).is_err());
    sm.apply(22, cmd(command::Kind::JobAssigned(JobAssigned { job_id: job.id, generation: g, workers: three, last_step: 0 }))).unwrap();
    assert_eq!(sm.job(job.id).unwrap().world_size, 3);
}

#[test]
fn a_lost_worker_requeues_its_job_to_resume_from_its_checkpoint() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    commit(&mut sm, 7, id, gen, 4).unwrap();
    sm.apply(8, cmd(command::Kind::WorkerLost(WorkerLost { worker_id: "w1".into(), ..Default::default() }))).unwrap();
    let job = sm.job(id).unwrap();
    assert_eq!(job.state(), JobState::Queued);
    assert_eq!(job.restarts, 1);
    assert!(job.restart_cause.contains("w1") && job.restart_cause.contains("step 4"), "{}", job.restart_cause);
    assert_eq!(sm.worker("w2").unwrap().state(), WorkerState::Idle);
    assert!(sm.assignment("w2").is_none());
    // Placed again (generation 2) once two workers are there; it starts from step 4.
    let r = RegisterWorkerRequest { address: "127.0.0.1:9100".into(), pid: 1, device: "cpu".into(), request_id: String::new(), ..Default::default() };
    sm.apply(9, cmd(command::Kind::RegisterWorker(r))).unwrap();
    assert_eq!(sm.next_placement(|w| w != "w3"), None, "an ineligible worker is not placed");
    let (_, gen2, workers) = sm.next_placement(|_| true).unwrap();
    assert_eq!((gen2, workers.clone()), (2, vec!["w2".to_string(), "w3".to_string()]));
    sm.apply(10, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen2, workers, last_step: 0 }))).unwrap();
    assert_eq!(sm.job(id).unwrap().progress.as_ref().unwrap().step, 4);
    assert_eq!(sm.assignment("w3").unwrap().checkpoints[0].step, 4);
    let m = &sm.job(id).unwrap().membership;
    assert_eq!(m.iter().map(|c| (c.generation, c.step, c.cause.as_str())).collect::<Vec<_>>(), vec![(1, 0, "start"), (2, 4, "lost")]);
    assert_eq!(m[1].workers, vec!["w2".to_string(), "w3".to_string()]);
}

#[test]
fn the_direct_encoding_is_the_snapshot_message() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    commit(&mut sm, 7, id, gen, 4).unwrap();
    sm.note_entry(8, b"x");
    let mut want = sm.to_snapshot();
    want.applied_index = 99;
    let got = StateSnapshot::decode(&sm.encode_snapshot(99)[..]).unwrap();
    assert_eq!(got, want);
}

#[test]
fn a_snapshot_restores_an_equal_state() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    commit(&mut sm, 7, id, gen, 4).unwrap();
    let submit = Command { request_id: "req-9".into(), kind: Some(command::Kind::SubmitJob(spec(2))), ..Default::default() };
    sm.apply(8, submit.clone()).unwrap();
    let copy = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
    assert_eq!(copy.state_hash(), sm.state_hash());
    assert_eq!(copy.to_snapshot(), sm.to_snapshot());
    // It remembers request ids: a retry after the snapshot still applies once.
    let mut copy = copy;
    let before = copy.jobs().count();
    copy.apply(9, submit).unwrap();
    assert_eq!(copy.jobs().count(), before);
    assert_eq!(copy.assignment("w1").unwrap().checkpoints[0].step, 4);
}

#[test]
fn a_job_too_big_for_the_pool_does_not_block_smaller_ones() {
    let mut sm = with_dataset();
    let ApplyOutput::Job(big) = sm.apply(5, cmd(command::Kind::SubmitJob(spec(3)))).unwrap() else { panic!() };
    let ApplyOutput::Job(small) = sm.apply(6, cmd(command::Kind::SubmitJob(spec(2)))).unwrap() else { panic!() };
    let (id, _, workers) = sm.next_placement(|_| true).unwrap();
    assert_eq!((id, workers.len()), (small.id, 2), "the 2-worker job goes first on 2 workers");
    assert_ne!(id, big.id);
}

#[test]
fn only_failed_or_cancelled_jobs_resume() {
    let mut sm = with_dataset();
    let (id, _) = running_job(&mut sm);
    let resume = |workers| cmd(command::Kind::ResumeJob(ResumeJobRequest { id, workers, request_id: String::new() }));
    let e = sm.apply(7, resume(0)).unwrap_err().to_string();
    assert!(e.contains("running") && e.contains("failed or cancelled"), "{e}");
    sm.apply(8, cmd(command::Kind::CancelJob(id))).unwrap();
    let e = sm.apply(9, resume(9)).unwrap_err().to_string();
    assert!(e.contains("--workers 9") && e.contains("training.batch_size"), "{e}");
    assert_eq!(sm.job(id).unwrap().state(), JobState::Cancelled, "a rejected resume changes nothing");
    let ApplyOutput::Job(j) = sm.apply(10, resume(3)).unwrap() else { panic!() };
    assert_eq!((j.state(), j.world_size), (JobState::Queued, 3));
    let e = sm.apply(11, cmd(command::Kind::ResumeJob(ResumeJobRequest { id: 99, workers: 0, request_id: String::new() }))).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn submission_errors_name_the_problem_and_change_nothing() {
    let mut sm = with_dataset();
    let before = sm.jobs().count();
    let e = sm.apply(5, cmd(command::Kind::SubmitJob(spec(2).replace("name = \"d\"", "name = \"nope\"")))).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    let e = sm.apply(6, cmd(command::Kind::SubmitJob(spec(2).replace("[80, 100]", "[80, 200]")))).unwrap_err().to_string();
    assert!(e.contains("dataset.test"), "{e}");
    // A model past the collective's limit is refused at submission, naming the limit.
    let e = sm.apply(7, cmd(command::Kind::SubmitJob(spec(2).replace("kind = \"mlp\"", "kind = \"mlp\"\nhidden = [60000, 60000]")))).unwrap_err().to_string();
    assert!(e.starts_with("model:") && e.contains("parameters"), "{e}");
    assert_eq!(sm.jobs().count(), before);
}

#[test]
fn dataset_versions_must_be_consecutive() {
    let mut sm = with_dataset();
    let mut ds = sm.dataset_view("d", 0, DatasetView::Shards).unwrap();
    ds.stats = None;
    ds.append = true;
    ds.slices.clear();
    ds.version = 3;
    assert!(sm.apply(9, cmd(command::Kind::RegisterDataset(ds.clone()))).is_err());
    ds.version = 2;
    let mut overflowing = ds.clone();
    overflowing.shards.push(overflowing.shards[0].clone());
    overflowing.shards[0].records = u64::MAX;
    assert!(sm.apply(9, cmd(command::Kind::RegisterDataset(overflowing))).is_err());
    let mut huge = ds.clone();
    huge.feature_shape = vec![1 << 32, 1 << 32];
    assert!(sm.apply(9, cmd(command::Kind::RegisterDataset(huge))).is_err());
    let mut fresh = ds.clone();
    fresh.name = "other".into();
    fresh.version = 5;
    assert!(sm.apply(9, cmd(command::Kind::RegisterDataset(fresh))).is_err());
    assert!(!sm.datasets.contains_key("other"), "a rejected registration left a trace");
    let mut escaping = ds.clone();
    escaping.shards[0].path = "datasets/d/import-2/../../../../etc/passwd".into();
    let e = sm.apply(9, cmd(command::Kind::RegisterDataset(escaping))).unwrap_err().to_string();
    assert!(e.contains("not a file in a folder of datasets/d"), "{e}");
    let e = sm.apply(9, cmd(command::Kind::RegisterDataset(ds.clone()))).unwrap_err().to_string();
    assert!(e.contains("already holds version 1"), "{e}");
    ds.shards[0].path = "datasets/d/import-2/shard-00000.safetensors".into();
    // Version 0: the next one, whatever it is by then.
    ds.version = 0;
    let ApplyOutput::Dataset(d) = sm.apply(9, cmd(command::Kind::RegisterDataset(ds))).unwrap() else { panic!() };
    assert_eq!(d.version, 2);
    assert_eq!(sm.dataset("d", 0).unwrap().version, 2);
    assert_eq!(sm.dataset("d", 1).unwrap().version, 1);
}

/// Issue 17's retention test: 10,000 finished jobs with retention of 100 leave 100 in the
/// state (and those something refers to); the removed jobs' files are an effect of the
/// applied removal, never of anything before it.
#[test]
fn retention_keeps_the_newest_finished_jobs_and_the_pinned_ones() {
    let mut sm = with_dataset();
    let mut index = 10;
    let mut at = |sm: &mut StateMachine, now: u64, kind: command::Kind| {
        index += 1;
        sm.apply(index, Command { kind: Some(kind), proposed_unix_ms: now, ..Default::default() })
    };
    at(&mut sm, 0, command::Kind::SetSettings(shoal_proto::SettingsRequest { keep_jobs: Some(100), keep_days: Some(1), request_id: String::new() })).unwrap();
    for n in 0..10_000u64 {
        let now = n * 1_000;
        let ApplyOutput::Job(job) = at(&mut sm, now, command::Kind::SubmitJob(spec(1))).unwrap() else { panic!() };
        let (id, gen, workers) = sm.next_placement(|_| true).unwrap();
        assert_eq!(id, job.id);
        at(&mut sm, now, command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: workers.clone(), last_step: 0 })).unwrap();
        let c = CheckpointCommit { worker_id: workers[0].clone(), job_id: id, generation: gen, manifest: Some(manifest(id, 10)) };
        at(&mut sm, now, command::Kind::CheckpointCommitted(c)).unwrap();
        let r = OutcomeReport { worker_id: workers[0].clone(), job_id: id, generation: gen, ok: true, result: Some(RankResult { param_blake3: "h".into(), ..Default::default() }), ..Default::default() };
        at(&mut sm, now, command::Kind::RankOutcome(r)).unwrap();
        assert_eq!(sm.job(id).unwrap().state(), JobState::Succeeded);
        if n == 5 {
            // A model version refers to job 6: it stays.
            at(&mut sm, now, command::Kind::RegisterModel(shoal_proto::RegisterModelRequest { name: "m".into(), job_id: id, request_id: String::new() })).unwrap();
        }
    }
    assert_eq!(sm.jobs().count(), 10_000);
    assert!(sm.take_effects().is_empty(), "nothing is removed before a removal is applied");
    // Every job finished within the last day: none is old enough to go yet...
    let ApplyOutput::Pruned { jobs, .. } = at(&mut sm, 10_000_000, command::Kind::PruneJobs(true)).unwrap() else { panic!() };
    assert!(jobs.is_empty(), "jobs finished within keep_days stay");
    // ...a day later, every finished job beyond the newest 100 goes, but the pinned one.
    let ApplyOutput::Pruned { jobs, pinned } = at(&mut sm, 200_000_000, command::Kind::PruneJobs(true)).unwrap() else { panic!() };
    assert_eq!((sm.jobs().count(), pinned), (101, 1));
    assert!(sm.job(6).is_some() && sm.job(10_000).is_some() && sm.job(9_901).is_some() && sm.job(9_900).is_none());
    assert_eq!(jobs.len(), 10_000 - 101);
    let effects = sm.take_effects();
    assert_eq!(effects, vec![Effect::RemoveJobFiles(jobs)], "the files of exactly the removed jobs, once the removal is applied");
    // A pruned job's snapshot restores, and the state keeps what retention needs.
    let copy = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
    assert_eq!(copy.state_hash(), sm.state_hash());
    assert_eq!(copy.settings(), shoal_proto::CoordinatorSettings { keep_jobs: 100, keep_days: 1 });
    // Ids are never given twice, though most jobs are gone.
    let ApplyOutput::Job(next) = at(&mut sm, 200_000_001, command::Kind::SubmitJob(spec(1))).unwrap() else { panic!() };
    assert_eq!(next.id, 10_001);
}

/// Defect 6: the leader's periodic flush of rank 0's last in-loop progress, proposed after
/// rank 0's final outcome (same step), must not overwrite the gate's holdout scores.
#[test]
fn a_late_progress_report_does_not_erase_the_gates_scores() {
    let mut sm = with_dataset();
    let text = format!("{}[register]\nname = \"m\"\n[promote]\nalias = \"prod\"\nholdout = \"d\"\n", spec(2));
    let ApplyOutput::Job(job) = sm.apply(5, cmd(command::Kind::SubmitJob(text))).unwrap() else { panic!() };
    let (id, gen, workers) = sm.next_placement(|_| true).unwrap();
    sm.apply(6, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: workers.clone(), last_step: 0 }))).unwrap();
    assert_eq!(id, job.id);
    commit(&mut sm, 7, id, gen, 10).unwrap();
    let scored = JobProgress { step: 10, total_steps: 10, holdout_accuracy: 0.9, holder_accuracy: -1.0, ..Default::default() };
    let r = OutcomeReport { worker_id: workers[0].clone(), job_id: id, generation: gen, ok: true, result: Some(RankResult { param_blake3: "h".into(), ..Default::default() }), progress: Some(scored), ..Default::default() };
    sm.apply(8, cmd(command::Kind::RankOutcome(r))).unwrap();
    // The flush of the last in-loop report: the same step, no scores.
    let late = JobProgress { step: 10, total_steps: 10, holdout_accuracy: -1.0, ..Default::default() };
    sm.apply(9, cmd(command::Kind::UpdateProgress(UpdateProgress { job_id: id, generation: gen, progress: Some(late) }))).unwrap();
    outcome(&mut sm, 10, id, gen, &workers[1], "h");
    let j = sm.job(id).unwrap();
    assert_eq!(j.state(), JobState::Succeeded);
    assert!(j.promotion.starts_with("promoted to m@prod"), "{}", j.promotion);
    let (_, v) = sm.model_version("m@1").unwrap();
    assert_eq!(v.holdout_accuracy, 0.9);
}

/// Defect 10: after `job cancel`, the step shown never trails the last committed
/// checkpoint (progress is replicated only now and then; the commit is exact).
#[test]
fn the_step_never_trails_the_last_checkpoint() {
    let mut sm = with_dataset();
    let (id, gen) = running_job(&mut sm);
    let p = JobProgress { step: 3, ..Default::default() };
    sm.apply(7, cmd(command::Kind::UpdateProgress(UpdateProgress { job_id: id, generation: gen, progress: Some(p) }))).unwrap();
    commit(&mut sm, 8, id, gen, 7).unwrap();
    assert_eq!(sm.job(id).unwrap().progress.as_ref().unwrap().step, 7);
    sm.apply(9, cmd(command::Kind::CancelJob(id))).unwrap();
    assert_eq!(sm.job(id).unwrap().progress.as_ref().unwrap().step, 7);
}

/// Defect 10: an append's statistics are checked before they are added up: counts beyond
/// the slice's records (which would overflow the sums, panicking debug builds on every
/// replica and on replay) are refused, and change nothing.
#[test]
fn absurd_slice_statistics_are_refused_before_they_are_added() {
    let mut sm = with_dataset();
    let before = sm.to_snapshot();
    let mut ds = sm.dataset_view("d", 0, DatasetView::Shards).unwrap();
    ds.stats = None;
    ds.append = true;
    ds.version = 0;
    ds.shards[0].path = "datasets/d/import-2/shard-00000.safetensors".into();
    let feature = shoal_proto::FeatureStats { count: u64::MAX, sum: 1.0, bins: vec![u64::MAX; 10], ..Default::default() };
    ds.slices = vec![DatasetSlice { stats: Some(shoal_proto::SliceStats { features: vec![feature; 4], tokens: 0, label_counts: vec![u64::MAX, 1] }), ..Default::default() }];
    let e = sm.apply(9, cmd(command::Kind::RegisterDataset(ds.clone()))).unwrap_err();
    assert!(matches!(&e, ApplyError::Invalid(m) if m.contains("not those of 100 records")), "{e}");
    let mut after = sm.to_snapshot();
    after.applied_index = before.applied_index;
    // Only the audit trail records the refusal.
    let trail = after.audit.take().unwrap();
    assert!(trail.pending.last().unwrap().outcome.contains("not those of 100 records"));
    let mut before = before;
    before.audit = None;
    assert_eq!(after, before, "a refused append changed the state");
    // Sane statistics append.
    let feature = shoal_proto::FeatureStats { count: 100, sum: 5.0, sum_sq: 5.0, bins: vec![10; 10], ..Default::default() };
    ds.slices = vec![DatasetSlice { stats: Some(shoal_proto::SliceStats { features: vec![feature; 4], tokens: 0, label_counts: vec![50, 50] }), ..Default::default() }];
    sm.apply(10, cmd(command::Kind::RegisterDataset(ds))).unwrap();
}
