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
mod tokens;
pub mod audit;
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
    /// A token created or revoked (its record, hash included: the API strips it).
    Token(Box<shoal_proto::TokenRecord>),
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
    Token(String),
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
            Recorded::Token(t) => request_record::Outcome::Token(t.clone()),
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
    /// Access tokens by id (hashes only), and whether the cluster's first ones are in.
    tokens: BTreeMap<String, shoal_proto::TokenRecord>,
    tokens_bootstrapped: bool,
    /// The audit trail's head, its unsealed entries and its segments' records.
    audit: shoal_proto::AuditState,
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
        for t in self.tokens.values() {
            message::encode(20, t, &mut buf);
        }
        if self.tokens_bootstrapped {
            prost::encoding::bool::encode(21, &self.tokens_bootstrapped, &mut buf);
        }
        if self.audit != shoal_proto::AuditState::default() {
            message::encode(22, &self.audit, &mut buf);
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
                request_record::Outcome::Token(t) => Recorded::Token(t),
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
        sm.tokens = s.tokens.into_iter().map(|t| (t.id.clone(), t)).collect();
        sm.tokens_bootstrapped = s.tokens_bootstrapped;
        sm.audit = s.audit.unwrap_or_default();
        Ok(sm)
    }

    /// Applies a change of the coordinator group (the raft conf change at `index`), keeping
    /// the members' addresses and roles beside raft's own view of the group.
    pub fn apply_member_change(&mut self, index: u64, op: MemberOp, id: u64, change: &shoal_proto::MemberChange, who: Option<shoal_proto::AuditContext>) -> ApplyResult {
        let (address, request_id) = (change.address.as_str(), change.request_id.as_str());
        // The time every replica applies with, as for a command (a replica restored from a
        // snapshot has no earlier command's).
        self.now_ms = change.proposed_unix_ms;
        let what = match op {
            MemberOp::AddLearner => ("add_coordinator", format!("replica {id} at {address}")),
            MemberOp::Promote => ("promote_coordinator", format!("replica {id}")),
            MemberOp::Remove => ("remove_coordinator", format!("replica {id}")),
        };
        let out = self.apply_member_op(index, op, id, address, request_id);
        self.audit(index, who, request_id, what, &out);
        out
    }

    fn apply_member_op(&mut self, index: u64, op: MemberOp, id: u64, address: &str, request_id: &str) -> ApplyResult {
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
        let audited = cmd.kind.as_ref().and_then(audit::audited);
        let who = cmd.audit.clone();
        let out = self.apply_new(index, cmd);
        if let Some(what) = audited {
            self.audit(index, who, &request_id, what, &out);
        }
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
                ApplyOutput::Token(t) => Recorded::Token(t.id.clone()),
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
            Recorded::Token(id) => self.tokens.get(id).map(|t| ApplyOutput::Token(Box::new(t.clone()))).unwrap_or(ApplyOutput::None),
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
            command::Kind::BootstrapTokens(b) => self.bootstrap_tokens(b),
            command::Kind::CreateToken(t) => self.create_token(t),
            command::Kind::RevokeToken(id) => self.revoke_token(&id),
            command::Kind::SealAudit(s) => self.seal_audit(s),
            // Only the audit trail keeps it (see `audit::audited`).
            command::Kind::StoreRemoved(_) => Ok(ApplyOutput::None),
        }
    }
}

#[cfg(test)]
mod tests;
