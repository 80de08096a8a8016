//! The replicated state machine. `apply` is a pure function of (state, command): every replica
//! applying the same log reaches the same state. Commands are validated here again, so a stale
//! or duplicated proposal is rejected deterministically instead of corrupting state.

use std::collections::{BTreeMap, VecDeque};

use shoal_core::{dataset, JobSpec};
use shoal_proto::{command, Assignment, Command, DatasetInfo, JobInfo, JobProgress, JobState, RankResult, WorkerInfo, WorkerState};

/// What applying a command produced, handed back to whoever proposed it.
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyOutput {
    None,
    WorkerId(String),
    Dataset(DatasetInfo),
    Job(JobInfo),
}

pub type ApplyResult = Result<ApplyOutput, String>;

/// What a write with a request id produced, enough to answer its retries.
#[derive(Clone, Debug, PartialEq)]
enum Recorded {
    Worker(String),
    Dataset(String, u64),
    Job(u64),
    Nothing,
}

/// Most features one record may have (guards workers against absurd manifests).
const MAX_FEATURES: u64 = 1 << 28;

/// Request ids remembered for idempotent retries (oldest forgotten first).
const REMEMBERED_REQUESTS: usize = 100_000;

#[derive(Clone, Debug, Default)]
pub struct StateMachine {
    pub applied_index: u64,
    /// Outcomes of writes by client request id, and their order for eviction.
    requests: BTreeMap<String, Recorded>,
    request_order: VecDeque<String>,
    workers: BTreeMap<String, WorkerInfo>,
    next_worker: u64,
    /// Every version of each dataset, ascending.
    datasets: BTreeMap<String, Vec<DatasetInfo>>,
    jobs: BTreeMap<u64, JobInfo>,
    next_job: u64,
}

impl StateMachine {
    /// Applies the command of the Raft entry at `index`. A command whose request id was
    /// already applied returns the first outcome and changes nothing.
    pub fn apply(&mut self, index: u64, cmd: Command) -> ApplyResult {
        self.applied_index = index;
        let request_id = cmd.request_id.clone();
        if !request_id.is_empty() {
            if let Some(rec) = self.requests.get(&request_id) {
                return Ok(self.replay(rec));
            }
        }
        let out = self.apply_new(index, cmd)?;
        if !request_id.is_empty() {
            let rec = match &out {
                ApplyOutput::WorkerId(id) => Recorded::Worker(id.clone()),
                ApplyOutput::Dataset(d) => Recorded::Dataset(d.name.clone(), d.version),
                ApplyOutput::Job(j) => Recorded::Job(j.id),
                ApplyOutput::None => Recorded::Nothing,
            };
            self.requests.insert(request_id.clone(), rec);
            self.request_order.push_back(request_id);
            while self.request_order.len() > REMEMBERED_REQUESTS {
                if let Some(old) = self.request_order.pop_front() {
                    self.requests.remove(&old);
                }
            }
        }
        Ok(out)
    }

    fn replay(&self, rec: &Recorded) -> ApplyOutput {
        match rec {
            Recorded::Worker(id) => ApplyOutput::WorkerId(id.clone()),
            Recorded::Dataset(name, v) => self.dataset(name, *v).cloned().map(ApplyOutput::Dataset).unwrap_or(ApplyOutput::None),
            Recorded::Job(id) => self.jobs.get(id).cloned().map(ApplyOutput::Job).unwrap_or(ApplyOutput::None),
            Recorded::Nothing => ApplyOutput::None,
        }
    }

    fn apply_new(&mut self, index: u64, cmd: Command) -> ApplyResult {
        let Some(kind) = cmd.kind else { return Err("empty command".into()) };
        match kind {
            command::Kind::RegisterWorker(req) => {
                self.next_worker += 1;
                let id = format!("w{}", self.next_worker);
                self.workers.insert(
                    id.clone(),
                    WorkerInfo { id: id.clone(), address: req.address, state: WorkerState::Idle as i32, job_id: 0, pid: req.pid, device: req.device },
                );
                Ok(ApplyOutput::WorkerId(id))
            }
            command::Kind::WorkerLost(lost) => {
                let w = self.workers.get_mut(&lost.worker_id).ok_or_else(|| format!("unknown worker {}", lost.worker_id))?;
                if w.state() == WorkerState::Lost {
                    return Err(format!("worker {} is already lost", lost.worker_id));
                }
                let job = w.job_id;
                w.state = WorkerState::Lost as i32;
                w.job_id = 0;
                if job != 0 {
                    self.finish_job(job, JobState::Failed, format!("worker {} was lost (missed heartbeats)", lost.worker_id));
                }
                Ok(ApplyOutput::None)
            }
            command::Kind::RegisterDataset(mut info) => {
                dataset::validate_name(&info.name).map_err(|e| e.to_string())?;
                let next = self.dataset(&info.name, 0).map(|d| d.version).unwrap_or(0) + 1;
                if info.version != next {
                    return Err(format!("dataset {} version {} cannot be registered: the next version is {next}", info.name, info.version));
                }
                if info.shards.is_empty() || info.records == 0 {
                    return Err(format!("dataset {} has no records", info.name));
                }
                let feature_len = info.feature_shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
                if info.feature_shape.is_empty() || info.feature_shape.contains(&0) || info.classes == 0 || feature_len.is_none_or(|n| n > MAX_FEATURES) {
                    return Err(format!("dataset {}: feature shape {:?} and {} classes are not usable", info.name, info.feature_shape, info.classes));
                }
                // Shards must live in this version's folder of the store: no `..`, no absolute paths.
                let dir = dataset::version_dir(&info.name, info.version);
                for shard in &info.shards {
                    let p = std::path::Path::new(&shard.path);
                    let inside = p.starts_with(&dir) && p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
                    if !inside {
                        return Err(format!("dataset {}: shard path {:?} is outside {}", info.name, shard.path, dir.display()));
                    }
                }
                let sum = info.shards.iter().try_fold(0u64, |a, s| a.checked_add(s.records));
                if sum != Some(info.records) {
                    return Err(format!("dataset {}: shards hold {sum:?} records, manifest says {}", info.name, info.records));
                }
                info.created_index = index;
                self.datasets.entry(info.name.clone()).or_default().push(info.clone());
                Ok(ApplyOutput::Dataset(info))
            }
            command::Kind::SubmitJob(toml) => {
                let (spec, ds) = self.check_submission(&toml)?;
                let dataset_version = ds.version;
                self.next_job += 1;
                let job = JobInfo {
                    id: self.next_job,
                    name: spec.name.clone(),
                    spec_toml: toml,
                    state: JobState::Queued as i32,
                    generation: 0,
                    workers: vec![],
                    progress: Some(JobProgress { total_steps: spec.total_steps(), test_accuracy: -1.0, ..Default::default() }),
                    error: String::new(),
                    results: vec![],
                    dataset_version,
                    world_size: spec.cluster.workers,
                    dataset_name: spec.dataset.name.clone(),
                };
                self.jobs.insert(job.id, job.clone());
                Ok(ApplyOutput::Job(job))
            }
            command::Kind::JobAssigned(a) => {
                let job = self.jobs.get(&a.job_id).ok_or_else(|| format!("unknown job {}", a.job_id))?;
                if job.state() != JobState::Queued {
                    return Err(format!("job {} is {}, not queued", a.job_id, job.state().label()));
                }
                if a.generation != job.generation + 1 || a.workers.len() != job.world_size as usize {
                    return Err(format!("stale assignment for job {}", a.job_id));
                }
                for (i, w) in a.workers.iter().enumerate() {
                    if a.workers[..i].contains(w) {
                        return Err(format!("worker {w} assigned twice"));
                    }
                    match self.workers.get(w) {
                        Some(info) if info.state() == WorkerState::Idle => {}
                        _ => return Err(format!("worker {w} is not idle")),
                    }
                }
                for w in &a.workers {
                    let info = self.workers.get_mut(w).expect("checked above");
                    info.state = WorkerState::Busy as i32;
                    info.job_id = a.job_id;
                }
                let job = self.jobs.get_mut(&a.job_id).expect("checked above");
                job.state = JobState::Running as i32;
                job.generation = a.generation;
                job.workers = a.workers;
                Ok(ApplyOutput::Job(job.clone()))
            }
            command::Kind::UpdateProgress(u) => {
                let job = self.running_job(u.job_id, u.generation)?;
                if let Some(p) = u.progress {
                    job.progress = Some(p);
                }
                Ok(ApplyOutput::None)
            }
            command::Kind::RankOutcome(r) => {
                let job = self.running_job(r.job_id, r.generation)?;
                let Some(rank) = job.workers.iter().position(|w| *w == r.worker_id) else {
                    return Err(format!("worker {} is not part of job {}", r.worker_id, r.job_id));
                };
                if !r.ok {
                    let msg = format!("rank {rank} ({}) failed: {}", r.worker_id, r.error);
                    self.finish_job(r.job_id, JobState::Failed, msg);
                    return Ok(ApplyOutput::None);
                }
                let mut result = r.result.unwrap_or_default();
                result.rank = rank as u32;
                result.worker_id = r.worker_id.clone();
                if job.results.iter().any(|x| x.rank == result.rank) {
                    return Err(format!("rank {rank} of job {} already reported", r.job_id));
                }
                if rank == 0 {
                    if let Some(p) = r.progress {
                        job.progress = Some(p);
                    }
                }
                job.results.push(result);
                job.results.sort_by_key(|x: &RankResult| x.rank);
                if job.results.len() == job.workers.len() {
                    self.finish_job(r.job_id, JobState::Succeeded, String::new());
                }
                Ok(ApplyOutput::None)
            }
            command::Kind::CancelJob(id) => {
                let job = self.jobs.get(&id).ok_or_else(|| format!("job {id} does not exist"))?;
                if job.state().is_terminal() {
                    return Err(format!("job {id} already {}", job.state().label()));
                }
                self.finish_job(id, JobState::Cancelled, String::new());
                Ok(ApplyOutput::Job(self.jobs[&id].clone()))
            }
        }
    }

    /// Parses a spec and checks it against the registered datasets.
    pub fn check_submission(&self, toml: &str) -> Result<(JobSpec, &DatasetInfo), String> {
        let spec = JobSpec::parse(toml).map_err(|e| e.to_string())?;
        let ds = self.dataset(&spec.dataset.name, spec.dataset.version.unwrap_or(0)).ok_or_else(|| match spec.dataset.version {
            Some(v) if self.datasets.contains_key(&spec.dataset.name) => {
                format!("dataset.version: dataset {:?} has no version {v}", spec.dataset.name)
            }
            _ => format!("dataset.name: dataset {:?} does not exist", spec.dataset.name),
        })?;
        let check = |key: &str, [a, b]: [u64; 2]| {
            if b > ds.records {
                Err(format!("dataset.{key}: range [{a}, {b}) exceeds the {} records of {} v{}", ds.records, ds.name, ds.version))
            } else {
                Ok(())
            }
        };
        check("train", spec.dataset.train)?;
        if let Some(t) = spec.dataset.test {
            check("test", t)?;
        }
        if spec.model.model_kind() == shoal_core::spec::ModelKind::Cnn && ds.feature_shape.len() != 2 {
            return Err(format!("model.kind: cnn needs 2-d features (images); {} has shape {:?}", ds.name, ds.feature_shape));
        }
        Ok((spec, ds))
    }

    fn running_job(&mut self, id: u64, generation: u64) -> Result<&mut JobInfo, String> {
        let job = self.jobs.get_mut(&id).ok_or_else(|| format!("unknown job {id}"))?;
        if job.state() != JobState::Running || job.generation != generation {
            return Err(format!("job {id} generation {generation} is not running"));
        }
        Ok(job)
    }

    fn finish_job(&mut self, id: u64, state: JobState, error: String) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        job.state = state as i32;
        job.error = error;
        for w in &job.workers {
            if let Some(info) = self.workers.get_mut(w) {
                if info.job_id == id && info.state() == WorkerState::Busy {
                    info.state = WorkerState::Idle as i32;
                    info.job_id = 0;
                }
            }
        }
    }

    // ----- reads -----

    pub fn workers(&self) -> impl Iterator<Item = &WorkerInfo> {
        self.workers.values()
    }

    pub fn worker(&self, id: &str) -> Option<&WorkerInfo> {
        self.workers.get(id)
    }

    /// Version 0 means the latest.
    pub fn dataset(&self, name: &str, version: u64) -> Option<&DatasetInfo> {
        let versions = self.datasets.get(name)?;
        if version == 0 {
            versions.last()
        } else {
            versions.iter().find(|d| d.version == version)
        }
    }

    pub fn datasets(&self) -> impl Iterator<Item = &DatasetInfo> {
        self.datasets.values().flatten()
    }

    pub fn job(&self, id: u64) -> Option<&JobInfo> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &JobInfo> {
        self.jobs.values()
    }

    /// What `worker` should be running now, if anything.
    pub fn assignment(&self, worker: &str) -> Option<Assignment> {
        let w = self.workers.get(worker)?;
        let job = self.jobs.get(&w.job_id)?;
        if job.state() != JobState::Running {
            return None;
        }
        let rank = job.workers.iter().position(|x| x == worker)?;
        let peers = job.workers.iter().map(|id| self.workers.get(id).map(|w| w.address.clone()).unwrap_or_default()).collect();
        Some(Assignment {
            job_id: job.id,
            generation: job.generation,
            rank: rank as u32,
            world_size: job.workers.len() as u32,
            peers,
            spec_toml: job.spec_toml.clone(),
            dataset: self.dataset(&job.dataset_name, job.dataset_version).cloned(),
        })
    }

    /// The scheduler's next decision: the oldest queued job that the idle workers can hold,
    /// and which workers (lowest ids first, so every leader decides alike).
    pub fn next_placement(&self) -> Option<(u64, u64, Vec<String>)> {
        let mut idle: Vec<&WorkerInfo> = self.workers.values().filter(|w| w.state() == WorkerState::Idle).collect();
        idle.sort_by_key(|w| (w.id.len(), w.id.clone()));
        let job = self.jobs.values().find(|j| j.state() == JobState::Queued)?;
        if idle.len() < job.world_size as usize {
            return None;
        }
        let chosen = idle[..job.world_size as usize].iter().map(|w| w.id.clone()).collect();
        Some((job.id, job.generation + 1, chosen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{JobAssigned, OutcomeReport, RegisterWorkerRequest, ShardInfo, WorkerLost};

    fn cmd(kind: command::Kind) -> Command {
        Command { proposal_id: 0, request_id: String::new(), kind: Some(kind) }
    }

    #[test]
    fn a_retried_request_applies_once() {
        let mut sm = with_dataset();
        let submit = |id: &str| Command { proposal_id: 0, request_id: id.into(), kind: Some(command::Kind::SubmitJob(spec(2))) };
        let ApplyOutput::Job(a) = sm.apply(5, submit("req-1")).unwrap() else { panic!() };
        let ApplyOutput::Job(b) = sm.apply(6, submit("req-1")).unwrap() else { panic!() };
        assert_eq!(a.id, b.id);
        assert_eq!(sm.jobs().count(), 1);
        let ApplyOutput::Job(c) = sm.apply(7, submit("req-2")).unwrap() else { panic!() };
        assert_ne!(a.id, c.id);
        assert_eq!(sm.jobs().count(), 2);
    }

    fn spec(workers: u32) -> String {
        format!(
            "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 80]\ntest = [80, 100]\n\
             [training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = {workers}\n"
        )
    }

    fn with_dataset() -> StateMachine {
        let mut sm = StateMachine::default();
        let ds = DatasetInfo {
            name: "d".into(),
            version: 1,
            records: 100,
            feature_shape: vec![4],
            classes: 2,
            shards: vec![ShardInfo { path: "datasets/d/v1/shard-00000.safetensors".into(), records: 100, blake3: "h".into(), bytes: 1 }],
            created_index: 0,
        };
        sm.apply(1, cmd(command::Kind::RegisterDataset(ds))).unwrap();
        for i in 0..2 {
            let r = RegisterWorkerRequest { address: format!("127.0.0.1:{}", 9000 + i), pid: 1, device: "cpu".into(), request_id: String::new() };
            sm.apply(2 + i, cmd(command::Kind::RegisterWorker(r))).unwrap();
        }
        sm
    }

    #[test]
    fn job_lifecycle_to_success() {
        let mut sm = with_dataset();
        let ApplyOutput::Job(job) = sm.apply(5, cmd(command::Kind::SubmitJob(spec(2)))).unwrap() else { panic!() };
        let (id, gen, workers) = sm.next_placement().unwrap();
        assert_eq!((id, gen), (job.id, 1));
        sm.apply(6, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: workers.clone() }))).unwrap();
        // A duplicate of the same decision is rejected, not applied twice.
        assert!(sm.apply(7, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers: workers.clone() }))).is_err());
        let a = sm.assignment("w2").unwrap();
        assert_eq!((a.rank, a.world_size, a.peers.len()), (1, 2, 2));
        for w in &workers {
            let r = OutcomeReport { worker_id: w.clone(), job_id: id, generation: gen, ok: true, ..Default::default() };
            sm.apply(8, cmd(command::Kind::RankOutcome(r))).unwrap();
        }
        assert_eq!(sm.job(id).unwrap().state(), JobState::Succeeded);
        assert!(sm.workers().all(|w| w.state() == WorkerState::Idle));
        assert!(sm.assignment("w1").is_none());
    }

    #[test]
    fn lost_worker_fails_its_job_and_frees_the_others() {
        let mut sm = with_dataset();
        sm.apply(5, cmd(command::Kind::SubmitJob(spec(2)))).unwrap();
        let (id, gen, workers) = sm.next_placement().unwrap();
        sm.apply(6, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation: gen, workers }))).unwrap();
        sm.apply(7, cmd(command::Kind::WorkerLost(WorkerLost { worker_id: "w1".into() }))).unwrap();
        let job = sm.job(id).unwrap();
        assert_eq!(job.state(), JobState::Failed);
        assert!(job.error.contains("w1"));
        assert_eq!(sm.worker("w2").unwrap().state(), WorkerState::Idle);
    }

    #[test]
    fn submission_errors_name_the_problem_and_change_nothing() {
        let mut sm = with_dataset();
        let before = sm.jobs().count();
        let e = sm.apply(5, cmd(command::Kind::SubmitJob(spec(2).replace("name = \"d\"", "name = \"nope\"")))).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = sm.apply(6, cmd(command::Kind::SubmitJob(spec(2).replace("[80, 100]", "[80, 200]")))).unwrap_err();
        assert!(e.contains("dataset.test"), "{e}");
        assert_eq!(sm.jobs().count(), before);
    }

    #[test]
    fn dataset_versions_must_be_consecutive() {
        let mut sm = with_dataset();
        let mut ds = sm.dataset("d", 0).unwrap().clone();
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
        escaping.shards[0].path = "datasets/d/v2/../../../../etc/passwd".into();
        let e = sm.apply(9, cmd(command::Kind::RegisterDataset(escaping))).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        ds.shards[0].path = "datasets/d/v2/shard-00000.safetensors".into();
        sm.apply(9, cmd(command::Kind::RegisterDataset(ds))).unwrap();
        assert_eq!(sm.dataset("d", 0).unwrap().version, 2);
        assert_eq!(sm.dataset("d", 1).unwrap().version, 1);
    }
}
