//! The replicated state machine. `apply` is a pure function of (state, command): every replica
//! applying the same log reaches the same state. Commands are validated here again, so a stale
//! or duplicated proposal is rejected deterministically instead of corrupting state.
//!
//! Time: a command carries its proposer's clock (`Command.proposed_unix_ms`); applying it
//! reads that, never the replica's clock, so timestamps and retention agree on every replica.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod batch;
mod checkpoints;
mod datasets;
mod jobs;
mod pipelines;
mod placement;
mod registry;
mod templates;
mod workers;

pub use batch::is_batch;
pub use datasets::{page_number, page_range, DatasetView, PAGE};
use datasets::Dataset;
use jobs::carries_state;
use placement::pool_range;

use shoal_core::{dataset, JobSpec};
use shoal_proto::{
    command, request_record, Assignment, Command, CoordinatorSettings, DatasetInfo, DatasetSlice, DatasetVersion, GenerationCause, JobInfo, JobPlan, JobProgress, JobState,
    JobTemplate, MembershipChange, ModelAlias, ModelInfo, ModelVersion, PeerInfo, RankResult, RequestRecord, StateSnapshot, TemplateFiring, WorkerInfo, WorkerState,
};

/// What applying a command produced, handed back to whoever proposed it.
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyOutput {
    None,
    /// A coordinator replica joined, changed role or left.
    Member(u64),
    WorkerId(String),
    Dataset(Box<DatasetInfo>),
    Job(Box<JobInfo>),
    Model(Box<ModelInfo>),
    Template(Box<JobTemplate>),
    Pipeline(Box<shoal_proto::PipelineInfo>),
    PipelineRun(Box<shoal_proto::PipelineRun>),
    Settings(CoordinatorSettings),
    /// Jobs removed by retention, and finished jobs past it kept because something refers
    /// to them.
    Pruned { jobs: Vec<u64>, pinned: u32 },
}

pub type ApplyResult = Result<ApplyOutput, ApplyError>;

/// Why a command was not applied (or not even proposed). Callers match on the variant, never
/// on the text: the state machine says whether the request named something missing, was
/// malformed, or conflicts with the state; the core says whether another try may take.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// The request names something that does not exist (a job, dataset, model, worker).
    #[error("{0}")]
    NotFound(String),
    /// The request is wrong whatever the state (a bad spec, name, range or value).
    #[error("{0}")]
    Invalid(String),
    /// The request does not fit the state now (exists already, wrong job state, stale).
    #[error("{0}")]
    Conflict(String),
    /// This replica does not lead (the leader's id, 0 if unknown).
    #[error("not the leader (leader id {0}, 0 if unknown)")]
    NotLeader(u64),
    /// Raft did not take it or could not tell its outcome (a leadership change, a transfer
    /// under way, a dropped proposal): another try may take, with the same request id.
    #[error("{0}")]
    Retry(String),
    /// Larger than one Raft entry may carry.
    #[error("the request is {0} bytes; one coordinator write takes at most {max} bytes", max = crate::node::MAX_COMMAND)]
    TooLarge(usize),
}

impl ApplyError {
    /// Why the core could not propose: the caller may retry elsewhere or not at all.
    pub fn from_core(e: &crate::CoordError) -> ApplyError {
        match e {
            crate::CoordError::NotLeader(id) => ApplyError::NotLeader(*id),
            crate::CoordError::TooLarge(n) => ApplyError::TooLarge(*n),
            other => ApplyError::Retry(other.to_string()),
        }
    }
    pub fn not_found(m: impl Into<String>) -> ApplyError {
        ApplyError::NotFound(m.into())
    }
    pub fn invalid(m: impl ToString) -> ApplyError {
        ApplyError::Invalid(m.to_string())
    }
    pub fn conflict(m: impl Into<String>) -> ApplyError {
        ApplyError::Conflict(m.into())
    }
}

/// Messages built with `format!` that the state refuses on: a conflict with the state unless
/// the call site says otherwise (`not_found`, `invalid`).
impl From<String> for ApplyError {
    fn from(m: String) -> ApplyError {
        ApplyError::Conflict(m)
    }
}

impl From<&str> for ApplyError {
    fn from(m: &str) -> ApplyError {
        ApplyError::Conflict(m.to_string())
    }
}

/// What the shell must do once an entry is applied (the state machine does no IO). Each is
/// idempotent: a replica that replays the entry after a restart does it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Remove the store files of jobs that retention removed (`jobs/<id>/`).
    RemoveJobFiles(Vec<u64>),
}

/// What a write with a request id produced, enough to answer its retries.
#[derive(Clone, Debug, PartialEq)]
enum Recorded {
    Worker(String),
    Dataset(String, u64),
    Job(u64),
    Member(u64),
    Model(String),
    Template(u64),
    Pipeline(String),
    PipelineRun(String),
    Nothing,
}

impl Recorded {
    /// As a snapshot's request record holds it.
    fn outcome(&self) -> request_record::Outcome {
        match self {
            Recorded::Worker(w) => request_record::Outcome::WorkerId(w.clone()),
            Recorded::Dataset(name, version) => request_record::Outcome::Dataset(DatasetVersion { name: name.clone(), version: *version }),
            Recorded::Job(j) => request_record::Outcome::JobId(*j),
            Recorded::Member(m) => request_record::Outcome::MemberId(*m),
            Recorded::Model(m) => request_record::Outcome::Model(m.clone()),
            Recorded::Template(t) => request_record::Outcome::TemplateId(*t),
            Recorded::Pipeline(p) => request_record::Outcome::Pipeline(p.clone()),
            Recorded::PipelineRun(r) => request_record::Outcome::PipelineRun(r.clone()),
            Recorded::Nothing => request_record::Outcome::Nothing(true),
        }
    }
}

/// A change of the coordinator group, as a raft conf change applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberOp {
    AddLearner,
    Promote,
    Remove,
}

/// Most features one record may have (guards workers against absurd manifests).
const MAX_FEATURES: u64 = 1 << 28;
/// The most float targets a record may have.
const MAX_TARGETS: u32 = 1 << 16;

/// Request ids remembered for idempotent retries (oldest forgotten first).
const REMEMBERED_REQUESTS: usize = 100_000;

/// Retention when `shoal coordinator settings` never set it: a finished job goes once it is
/// neither among the newest 1000 nor a week old.
pub const DEFAULT_SETTINGS: CoordinatorSettings = CoordinatorSettings { keep_jobs: 1000, keep_days: 7 };

#[derive(Clone, Debug, Default)]
pub struct StateMachine {
    pub applied_index: u64,
    /// Outcomes of writes by client request id, and their order for eviction.
    requests: BTreeMap<String, Recorded>,
    request_order: VecDeque<String>,
    workers: BTreeMap<String, WorkerInfo>,
    next_worker: u64,
    datasets: BTreeMap<String, Dataset>,
    jobs: BTreeMap<u64, JobInfo>,
    next_job: u64,
    /// The coordinator group: every replica's id, address and role.
    members: BTreeMap<u64, PeerInfo>,
    /// The next id a new replica gets: ids are never reused, so a removed replica's id can
    /// never come back with another replica's log.
    next_member_id: u64,
    removed_members: BTreeSet<u64>,
    /// The model registry, by name.
    models: BTreeMap<String, ModelInfo>,
    /// Job templates fired by dataset appends, by id.
    templates: BTreeMap<u64, JobTemplate>,
    /// Retention; None: `DEFAULT_SETTINGS`.
    settings: Option<CoordinatorSettings>,
    /// blake3 chained over every entry applied (see `note_entry`).
    apply_digest: Vec<u8>,
    /// The clock of the command being applied (its proposer's), and its build.
    now_ms: u64,
    now_build: String,
    /// Effects of the entries applied since the shell last took them.
    effects: Vec<Effect>,
    /// Pipelines by name, and their runs by seq (with an index by run id).
    pipelines: BTreeMap<String, shoal_proto::PipelineInfo>,
    pipeline_runs: BTreeMap<u64, shoal_proto::PipelineRun>,
    run_ids: BTreeMap<String, u64>,
    next_run_seq: u64,
    /// Jobs of pipeline steps that ended in the entry being applied (empty between entries).
    ended_pipeline_jobs: Vec<u64>,
    /// The pipeline step cache, by key.
    pipeline_cache: BTreeMap<String, shoal_proto::PipelineCacheEntry>,
    /// Pipeline specs parsed once (derived from the texts above).
    specs: pipelines::SpecCache,
}

impl StateMachine {
    /// Jobs by state and workers by state (`idle`, `busy`, `lost`), for `/metrics`.
    pub fn counts(&self) -> (BTreeMap<&'static str, i64>, BTreeMap<&'static str, i64>) {
        let mut jobs = BTreeMap::new();
        for j in self.jobs.values() {
            *jobs.entry(j.state().label()).or_insert(0) += 1;
        }
        let mut workers = BTreeMap::new();
        for w in self.workers.values() {
            let s = match w.state() {
                shoal_proto::WorkerState::Idle => "idle",
                shoal_proto::WorkerState::Busy => "busy",
                shoal_proto::WorkerState::Lost => "lost",
                shoal_proto::WorkerState::Unspecified => "unknown",
            };
            *workers.entry(s).or_insert(0) += 1;
        }
        (jobs, workers)
    }

    /// The whole state, for a Raft snapshot. `from_snapshot` of it gives back an equal state.
    pub fn to_snapshot(&self) -> StateSnapshot {
        use shoal_proto::Message;
        StateSnapshot::decode(&self.encode_snapshot(self.applied_index)[..]).expect("the state encodes as a snapshot")
    }

    /// The bytes of `to_snapshot()` (with `applied_index` as given), encoded straight from the
    /// maps: no copy of the state is made, which keeps a snapshot's pause of the Ready loop
    /// to the encoding itself.
    pub fn encode_snapshot(&self, applied_index: u64) -> Vec<u8> {
        use prost::encoding::{bytes, message, uint64};
        let mut buf = Vec::new();
        uint64::encode(1, &applied_index, &mut buf);
        for id in &self.request_order {
            if let Some(rec) = self.requests.get(id) {
                message::encode(2, &RequestRecord { request_id: id.clone(), outcome: Some(rec.outcome()) }, &mut buf);
            }
        }
        for w in self.workers.values() {
            message::encode(3, w, &mut buf);
        }
        uint64::encode(4, &self.next_worker, &mut buf);
        for j in self.jobs.values() {
            message::encode(6, j, &mut buf);
        }
        uint64::encode(7, &self.next_job, &mut buf);
        for m in self.members.values() {
            message::encode(8, m, &mut buf);
        }
        bytes::encode(9, &self.apply_digest, &mut buf);
        for m in self.models.values() {
            message::encode(10, m, &mut buf);
        }
        for t in self.templates.values() {
            message::encode(11, t, &mut buf);
        }
        for d in self.datasets_for_snapshot() {
            message::encode(12, d, &mut buf);
        }
        if let Some(s) = &self.settings {
            message::encode(13, s, &mut buf);
        }
        uint64::encode(14, &self.next_member_id, &mut buf);
        for id in &self.removed_members {
            uint64::encode(15, id, &mut buf);
        }
        for p in self.pipelines.values() {
            message::encode(16, p, &mut buf);
        }
        for r in self.pipeline_runs.values() {
            message::encode(17, r, &mut buf);
        }
        if self.next_run_seq != 0 {
            uint64::encode(18, &self.next_run_seq, &mut buf);
        }
        let mut cache: Vec<&shoal_proto::PipelineCacheEntry> = self.pipeline_cache.values().collect();
        cache.sort_by_key(|e| (e.created_index, e.key.as_str()));
        for e in cache {
            message::encode(19, e, &mut buf);
        }
        buf
    }

    /// Chains the entry at `index` into the apply digest. The core calls it for every entry
    /// it applies (commands, a new leader's empty entry, membership changes).
    pub fn note_entry(&mut self, index: u64, bytes: &[u8]) {
        let mut h = blake3::Hasher::new();
        h.update(&self.apply_digest);
        h.update(&index.to_le_bytes());
        h.update(bytes);
        self.apply_digest = h.finalize().as_bytes().to_vec();
    }

    /// The apply digest: equal on replicas that applied the same entries up to `applied_index`.
    pub fn apply_digest(&self) -> &[u8] {
        &self.apply_digest
    }

    pub fn from_snapshot(s: StateSnapshot) -> Result<StateMachine, String> {
        let mut sm = StateMachine { applied_index: s.applied_index, next_worker: s.next_worker, next_job: s.next_job, ..Default::default() };
        for r in s.requests {
            let rec = match r.outcome.ok_or_else(|| format!("request {} has no outcome", r.request_id))? {
                request_record::Outcome::WorkerId(w) => Recorded::Worker(w),
                request_record::Outcome::Dataset(d) => Recorded::Dataset(d.name, d.version),
                request_record::Outcome::JobId(j) => Recorded::Job(j),
                request_record::Outcome::MemberId(m) => Recorded::Member(m),
                request_record::Outcome::Model(m) => Recorded::Model(m),
                request_record::Outcome::TemplateId(t) => Recorded::Template(t),
                request_record::Outcome::Pipeline(p) => Recorded::Pipeline(p),
                request_record::Outcome::PipelineRun(r) => Recorded::PipelineRun(r),
                request_record::Outcome::Nothing(_) => Recorded::Nothing,
            };
            sm.request_order.push_back(r.request_id.clone());
            sm.requests.insert(r.request_id, rec);
        }
        sm.workers = s.workers.into_iter().map(|w| (w.id.clone(), w)).collect();
        sm.restore_datasets(s.dataset_records, s.datasets);
        sm.jobs = s.jobs.into_iter().map(|j| (j.id, j)).collect();
        for job in sm.jobs.values_mut().filter(|j| j.plan.is_none()) {
            // A job from before plans were kept: parsed once more, here.
            job.plan = Some(jobs::plan_of(job));
        }
        sm.members = s.members.into_iter().map(|m| (m.id, m)).collect();
        sm.apply_digest = s.apply_digest;
        sm.models = s.models.into_iter().map(|m| (m.name.clone(), m)).collect();
        sm.templates = s.templates.into_iter().map(|t| (t.id, t)).collect();
        sm.settings = s.settings;
        sm.removed_members = s.removed_members.into_iter().collect();
        // Restored as it was (the state hash covers it); `next_member_id()` never gives an id
        // the group has or had.
        sm.next_member_id = s.next_member_id;
        sm.pipelines = s.pipelines.into_iter().map(|p| (p.name.clone(), p)).collect();
        sm.run_ids = s.pipeline_runs.iter().map(|r| (r.id.clone(), r.seq)).collect();
        sm.pipeline_runs = s.pipeline_runs.into_iter().map(|r| (r.seq, r)).collect();
        sm.next_run_seq = s.next_run_seq;
        sm.pipeline_cache = s.pipeline_cache.into_iter().map(|e| (e.key.clone(), e)).collect();
        Ok(sm)
    }

    /// Applies a change of the coordinator group (the raft conf change at `index`), keeping
    /// the members' addresses and roles beside raft's own view of the group.
    pub fn apply_member_change(&mut self, index: u64, op: MemberOp, id: u64, address: &str, request_id: &str) -> ApplyResult {
        self.applied_index = index;
        self.next_member_id = self.next_member_id.max(id + 1);
        match op {
            MemberOp::AddLearner => {
                let m = self.members.entry(id).or_insert_with(|| PeerInfo { id, address: address.to_string(), learner: true });
                m.learner = true;
                if !address.is_empty() {
                    m.address = address.to_string();
                }
            }
            MemberOp::Promote => {
                let m = self.members.entry(id).or_insert_with(|| PeerInfo { id, address: address.to_string(), learner: false });
                m.learner = false;
            }
            MemberOp::Remove => {
                self.members.remove(&id);
                self.removed_members.insert(id);
            }
        }
        if !request_id.is_empty() {
            self.remember(request_id.to_string(), Recorded::Member(id));
        }
        Ok(ApplyOutput::Member(id))
    }

    /// Makes the members exactly `voters` and `learners` (raft's configuration after a change
    /// was applied): a member not recorded yet (one of the group a cluster started with) is
    /// added without an address (the replicas' own configuration has it), and one no longer in
    /// the configuration is dropped.
    pub fn sync_members(&mut self, voters: &[u64], learners: &[u64]) {
        self.members.retain(|id, _| voters.contains(id) || learners.contains(id));
        for (ids, learner) in [(voters, false), (learners, true)] {
            for &id in ids {
                self.members.entry(id).or_insert_with(|| PeerInfo { id, address: String::new(), learner }).learner = learner;
            }
        }
        self.next_member_id = self.next_member_id.max(voters.iter().chain(learners).max().map_or(0, |m| m + 1));
    }

    /// The id that the member change with `request_id` already got, if it was applied.
    pub fn member_for_request(&self, request_id: &str) -> Option<u64> {
        match self.requests.get(request_id) {
            Some(Recorded::Member(id)) => Some(*id),
            _ => None,
        }
    }

    /// The coordinator group as recorded by the log (empty until its first leader records it).
    pub fn members(&self) -> impl Iterator<Item = &PeerInfo> {
        self.members.values()
    }

    /// The id the next replica added gets (never one the group had).
    pub fn next_member_id(&self) -> u64 {
        let highest = self.members.keys().chain(&self.removed_members).max().copied().unwrap_or(0);
        self.next_member_id.max(highest + 1)
    }

    /// Whether `id` was a member and was removed (it can never come back).
    pub fn was_removed(&self, id: u64) -> bool {
        self.removed_members.contains(&id)
    }

    /// Retention of finished jobs.
    pub fn settings(&self) -> CoordinatorSettings {
        self.settings.unwrap_or(DEFAULT_SETTINGS)
    }

    /// A digest of the whole state: replicas that applied the same log agree on it.
    pub fn state_hash(&self) -> String {
        blake3::hash(&self.encode_snapshot(self.applied_index)).to_hex().to_string()
    }

    /// What the shell must do for the entries applied since it last asked.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Applies the command of the Raft entry at `index`. A command whose request id was
    /// already applied returns the first outcome and changes nothing.
    pub fn apply(&mut self, index: u64, cmd: Command) -> ApplyResult {
        self.applied_index = index;
        self.now_ms = cmd.proposed_unix_ms;
        self.now_build = cmd.proposer_build.clone();
        let request_id = cmd.request_id.clone();
        if !request_id.is_empty() {
            if let Some(rec) = self.requests.get(&request_id) {
                return Ok(self.replay(rec));
            }
        }
        let out = self.apply_new(index, cmd);
        // Pipeline steps whose jobs this entry ended settle here, in the same apply.
        self.settle_pipeline_jobs(index);
        let out = out?;
        if !request_id.is_empty() {
            let rec = match &out {
                ApplyOutput::WorkerId(id) => Recorded::Worker(id.clone()),
                ApplyOutput::Dataset(d) => Recorded::Dataset(d.name.clone(), d.version),
                ApplyOutput::Job(j) => Recorded::Job(j.id),
                ApplyOutput::Member(m) => Recorded::Member(*m),
                ApplyOutput::Model(m) => Recorded::Model(m.name.clone()),
                ApplyOutput::Template(t) => Recorded::Template(t.id),
                ApplyOutput::Pipeline(p) => Recorded::Pipeline(p.name.clone()),
                ApplyOutput::PipelineRun(r) => Recorded::PipelineRun(r.id.clone()),
                ApplyOutput::None | ApplyOutput::Settings(_) | ApplyOutput::Pruned { .. } => Recorded::Nothing,
            };
            self.remember(request_id, rec);
        }
        Ok(out)
    }

    fn remember(&mut self, request_id: String, rec: Recorded) {
        self.requests.insert(request_id.clone(), rec);
        self.request_order.push_back(request_id);
        while self.request_order.len() > REMEMBERED_REQUESTS {
            if let Some(old) = self.request_order.pop_front() {
                self.requests.remove(&old);
            }
        }
    }

    fn replay(&self, rec: &Recorded) -> ApplyOutput {
        match rec {
            Recorded::Worker(id) => ApplyOutput::WorkerId(id.clone()),
            Recorded::Dataset(name, v) => self.dataset_view(name, *v, DatasetView::Newest).map(|d| ApplyOutput::Dataset(Box::new(d))).unwrap_or(ApplyOutput::None),
            Recorded::Job(id) => self.jobs.get(id).map(|j| ApplyOutput::Job(Box::new(j.clone()))).unwrap_or(ApplyOutput::None),
            Recorded::Member(id) => ApplyOutput::Member(*id),
            Recorded::Model(name) => self.model_page(name, 0).map(|m| ApplyOutput::Model(Box::new(m))).unwrap_or(ApplyOutput::None),
            Recorded::Template(id) => self.templates.get(id).map(|t| ApplyOutput::Template(Box::new(t.clone()))).unwrap_or(ApplyOutput::None),
            Recorded::Pipeline(name) => self.pipelines.get(name).map(|p| ApplyOutput::Pipeline(Box::new(p.clone()))).unwrap_or(ApplyOutput::None),
            Recorded::PipelineRun(id) => self.pipeline_run(id).map(|r| ApplyOutput::PipelineRun(Box::new(r.clone()))).unwrap_or(ApplyOutput::None),
            Recorded::Nothing => ApplyOutput::None,
        }
    }

    fn apply_new(&mut self, index: u64, cmd: Command) -> ApplyResult {
        let Some(kind) = cmd.kind else { return Err(ApplyError::invalid("empty command")) };
        match kind {
            command::Kind::SetMembers(list) => {
                if !self.members.is_empty() {
                    return Err(ApplyError::conflict("the coordinator group is recorded already"));
                }
                self.members = list.members.into_iter().map(|m| (m.id, m)).collect();
                self.next_member_id = self.next_member_id.max(self.members.keys().max().map(|m| m + 1).unwrap_or(1));
                Ok(ApplyOutput::None)
            }
            command::Kind::SetSettings(r) => {
                let mut s = self.settings();
                if r.keep_jobs == Some(0) {
                    return Err(ApplyError::invalid("--keep-jobs must be at least 1"));
                }
                s.keep_jobs = r.keep_jobs.unwrap_or(s.keep_jobs);
                s.keep_days = r.keep_days.unwrap_or(s.keep_days);
                self.settings = Some(s);
                Ok(ApplyOutput::Settings(s))
            }
            command::Kind::RegisterWorker(req) => self.register_worker(req),
            command::Kind::WorkerLost(lost) => self.worker_lost(lost),
            command::Kind::ForgetWorkers(f) => self.forget_workers(f),
            command::Kind::RegisterDataset(info) => Ok(ApplyOutput::Dataset(Box::new(self.register_dataset(index, info)?))),
            command::Kind::SetDatasetSettings(r) => Ok(ApplyOutput::Dataset(Box::new(self.set_dataset_settings(r)?))),
            command::Kind::RegisterModel(r) => {
                let job = self.jobs.get(&r.job_id).ok_or_else(|| ApplyError::not_found(format!("there is no job {}", r.job_id)))?.clone();
                let m = self.register_model(index, &r.name, &job)?;
                Ok(ApplyOutput::Model(Box::new(m)))
            }
            command::Kind::SetModelAlias(r) => self.set_model_alias(r),
            command::Kind::ScheduleJob(toml) => self.schedule_job(toml),
            command::Kind::TaskStarted(t) => self.task_started(t),
            command::Kind::TaskReported(r) => self.task_reported(index, r),
            command::Kind::TaskStopped(t) => self.task_stopped(t),
            command::Kind::SubmitJob(toml) => {
                let job = self.submit(toml)?;
                Ok(ApplyOutput::Job(Box::new(job)))
            }
            command::Kind::JobAssigned(a) => self.job_assigned(a),
            command::Kind::UpdateProgress(u) => self.update_progress(u),
            command::Kind::RankOutcome(r) => self.rank_outcome(index, r),
            command::Kind::CancelJob(id) => self.cancel_job(id),
            command::Kind::ResumeJob(r) => self.resume_job(r),
            command::Kind::CheckpointCommitted(c) => self.checkpoint_committed(c),
            command::Kind::CheckpointFailed(f) => self.checkpoint_failed(f),
            command::Kind::MetricChunk(r) => self.metric_chunk(r),
            command::Kind::JobStalled(s) => self.job_stalled(s),
            command::Kind::EventDelivered(d) => self.event_delivered(d),
            command::Kind::PruneJobs(_) => Ok(self.prune_jobs()),
            command::Kind::SubmitPipeline(toml) => self.submit_pipeline(toml),
            command::Kind::RunPipeline(r) => self.run_pipeline(index, r),
            command::Kind::CancelPipelineRun(id) => self.cancel_pipeline_run(id),
            command::Kind::PipelineStepTimeout(t) => self.pipeline_step_timeout(t),
            command::Kind::ResumePipelineRun(r) => self.resume_pipeline_run(index, r),
            command::Kind::PipelineTriggered(t) => self.pipeline_triggered(index, t),
            command::Kind::ScheduleFire(f) => self.schedule_fire(index, f),
            command::Kind::PausePipeline(r) => self.pause_pipeline(r),
            command::Kind::PipelineCacheVerdict(v) => self.pipeline_cache_verdict(index, v),
            command::Kind::PipelineIncoming(l) => self.pipeline_incoming(index, l),
            command::Kind::PipelineFileDigests(d) => self.pipeline_file_digests(index, d),
        }
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(after, before, "a refused append changed the state");
        // Sane statistics append.
        let feature = shoal_proto::FeatureStats { count: 100, sum: 5.0, sum_sq: 5.0, bins: vec![10; 10], ..Default::default() };
        ds.slices = vec![DatasetSlice { stats: Some(shoal_proto::SliceStats { features: vec![feature; 4], tokens: 0, label_counts: vec![50, 50] }), ..Default::default() }];
        sm.apply(10, cmd(command::Kind::RegisterDataset(ds))).unwrap();
    }
}
