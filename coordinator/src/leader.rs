//! The leader's duties, sans IO: leases, placement, batch preemption, the progress flush,
//! retention, forgetting lost workers and promoting learners. `Duties::tick` reads the time
//! it is given, the replicated state and what raft says of the group, and returns what to
//! propose; the shell proposes it on a real clock, the simulation on a simulated one. Every
//! decision is a Raft proposal, so a new leader continues where the old one stopped.
//!
//! What it remembers (workers' last heartbeats, the latest progress reports) is this leader's
//! alone: a new leader starts afresh and gives every worker a full lease.

use std::collections::{BTreeMap, BTreeSet};

use shoal_proto::{command, ForgetWorkers, JobAssigned, JobProgress, JobStalled, JobState, LossCause, MemberList, PeerInfo, PipelineStepTimeout, UpdateProgress, WorkerLost, WorkerState};

use crate::membership::{check_live_quorum, Change};
use crate::state::StateMachine;

/// A learner whose log is within this many entries of the leader's commit is promoted.
pub const PROMOTE_LAG: u64 = 16;

/// How long a training job waits for batch attempts to end on their own before they are
/// stopped to free its workers (a shard's task usually ends well within it).
pub const PREEMPT_AFTER_MS: u64 = 2_000;

/// Progress is replicated at most this often (reports come every 250 ms).
pub const PROGRESS_FLUSH_MS: u64 = 2_000;

/// Retention is looked at this often.
pub const RETENTION_EVERY_MS: u64 = 10_000;

/// The same decision is not proposed again within this long (its first proposal is likely
/// still in flight).
const REPEAT_AFTER_MS: u64 = 2_000;

/// What the leader's raft node says of the group.
#[derive(Clone, Debug, Default)]
pub struct GroupView {
    pub commit: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Each member's match index (the leader's own included).
    pub matched: BTreeMap<u64, u64>,
    /// Members heard from recently, the leader included.
    pub live: BTreeSet<u64>,
    pub pending_conf: bool,
}

/// What the leader decided to do.
// A command lives here only on its way to be proposed: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Propose(command::Kind),
    /// Promote a learner that caught up to voter.
    Promote(u64),
    /// Read a possible cache hit's artifacts (path, blake3) and propose the verdict.
    VerifyCache(shoal_proto::PipelineCacheVerdict, Vec<shoal_proto::ShardInfo>),
    /// List an append step's incoming prefix in the store and propose what is there.
    ListIncoming(shoal_proto::PipelineIncoming, String),
    /// Hash the files an exec step names and propose the digests.
    HashFiles(shoal_proto::PipelineFileDigests, Vec<String>),
    /// Write these audit entries as a segment in the store, then propose the seal.
    SealAudit(shoal_proto::AuditSeal),
}

/// The leader's memory between ticks. Times are milliseconds of a monotonic clock. Ordered
/// maps, so a simulation that replays a seed proposes in the same order.
#[derive(Debug, Default)]
pub struct Duties {
    /// Workers' last sign of life.
    last_seen: BTreeMap<String, u64>,
    /// Workers heard from since this replica became leader: the only ones placed (a worker
    /// known from the log may be long dead).
    heard: BTreeSet<String>,
    /// Latest progress report per job: (generation, progress, when last replicated).
    progress: BTreeMap<u64, (u64, JobProgress, Option<u64>)>,
    /// Queued training jobs that batch attempts keep from starting, and since when.
    waiting_since: BTreeMap<u64, u64>,
    /// Decisions proposed lately, by key, and when.
    recent: BTreeMap<String, u64>,
    last_retention: Option<u64>,
    /// `[notify] stall_s` of each running job (in ms; None: no webhook), read once.
    stall_after: BTreeMap<u64, Option<u64>>,
    /// Per running job with a webhook: its (generation, step), since when it has been there,
    /// and whether that stall was proposed.
    stall_watch: BTreeMap<u64, (u64, u64, u64, bool)>,
}

impl Duties {
    /// Forgets what a previous term saw: every worker gets a full lease from now.
    pub fn new_term(&mut self) {
        self.last_seen.clear();
        self.heard.clear();
        self.recent.clear();
        self.last_retention = None;
        self.stall_watch.clear();
    }

    /// A worker showed it is alive (registration, heartbeat, task report).
    pub fn saw_worker(&mut self, id: &str, now: u64) {
        self.last_seen.insert(id.to_string(), now);
        self.heard.insert(id.to_string());
    }

    /// Rank 0's latest progress report for (job, generation).
    pub fn progress_report(&mut self, job: u64, generation: u64, p: JobProgress) {
        let flushed = self.progress.get(&job).and_then(|(g, _, f)| if *g == generation { *f } else { None });
        self.progress.insert(job, (generation, p, flushed));
    }

    /// The latest progress heard for `job`'s `generation`, newer than what the log holds.
    pub fn latest_progress(&self, job: u64, generation: u64) -> Option<&JobProgress> {
        self.progress.get(&job).filter(|(g, _, _)| *g == generation).map(|(_, p, _)| p)
    }

    /// What to propose now. `now` is the monotonic clock, `now_unix_ms` the wall clock that
    /// commands carry, `lease` how long a silent worker keeps its place, `peers` the group
    /// this replica was started with (recorded by the first leader).
    pub fn tick(&mut self, now: u64, now_unix_ms: u64, lease_ms: u64, peers: &BTreeMap<u64, String>, state: &StateMachine, group: &GroupView) -> Vec<Action> {
        let mut proposals: Vec<(String, command::Kind)> = Vec::new();
        if state.members().next().is_none() {
            // A group's first leader records the group it was started with.
            let members = peers.iter().map(|(id, a)| PeerInfo { id: *id, address: a.clone(), learner: false }).collect();
            proposals.push(("members".into(), command::Kind::SetMembers(MemberList { members })));
        }
        for w in state.workers().filter(|w| w.state() != WorkerState::Lost) {
            let seen = *self.last_seen.entry(w.id.clone()).or_insert(now);
            if now.saturating_sub(seen) > lease_ms {
                proposals.push((format!("lost/{}", w.id), command::Kind::WorkerLost(WorkerLost { worker_id: w.id.clone(), detail: String::new(), cause: LossCause::MissedHeartbeats as i32 })));
            }
        }
        // Placed only: workers heard from under this leader, with a heartbeat in the last half
        // lease (a dead one is not handed a job while its lease runs out).
        let (last_seen, heard) = (&self.last_seen, &self.heard);
        let fresh = |id: &str| heard.contains(id) && last_seen.get(id).is_some_and(|t| now.saturating_sub(*t) <= lease_ms / 2);
        if let Some((job_id, generation, workers)) = state.next_placement(fresh) {
            let last_step = self.progress.get(&job_id).filter(|(g, _, _)| *g + 1 == generation).map(|(_, p, _)| p.step).unwrap_or(0);
            proposals.push((format!("place/{job_id}/{generation}"), command::Kind::JobAssigned(JobAssigned { job_id, generation, workers, last_step })));
        }
        // Batch attempts on the workers still idle (not on those just placed for training).
        let placed = proposals.iter().any(|(_, k)| matches!(k, command::Kind::JobAssigned(_)));
        if !placed {
            if let Some((job, stops)) = state.batch_preemptions(fresh) {
                let since = *self.waiting_since.entry(job).or_insert(now);
                if now.saturating_sub(since) >= PREEMPT_AFTER_MS {
                    for t in stops {
                        tracing::info!(job = t.job_id, task = t.task, attempt = t.attempt, worker = %t.worker_id, training_job = job, "stopping a batch attempt for a waiting training job");
                        proposals.push((format!("stop/{}/{}", t.job_id, t.attempt), command::Kind::TaskStopped(t)));
                    }
                }
            } else {
                for t in state.next_batch_starts(fresh, now_unix_ms) {
                    let attempts = state.job(t.job_id).and_then(|j| j.batch.as_ref()).and_then(|b| b.tasks.get(t.task as usize)).map(|x| x.attempts).unwrap_or(0);
                    proposals.push((format!("task/{}/{}/{attempts}/{}", t.job_id, t.task, t.speculative), command::Kind::TaskStarted(t)));
                }
            }
        }
        for (job_id, (generation, progress, flushed)) in self.progress.iter_mut() {
            let due = flushed.is_none_or(|t| now.saturating_sub(t) >= PROGRESS_FLUSH_MS);
            // Not once any rank has reported its outcome: rank 0's carries the final progress.
            let running = state.job(*job_id).is_some_and(|j| j.state() == JobState::Running && j.generation == *generation && j.results.is_empty());
            if due && running {
                *flushed = Some(now);
                proposals.push((
                    format!("progress/{job_id}/{}", progress.step),
                    command::Kind::UpdateProgress(UpdateProgress { job_id: *job_id, generation: *generation, progress: Some(progress.clone()) }),
                ));
            }
        }
        // `[notify]`: a running job whose step has not moved for its `stall_s` has stalled.
        for j in state.jobs().filter(|j| j.state() == JobState::Running && !crate::state::is_batch(j)) {
            let after = *self.stall_after.entry(j.id).or_insert_with(|| shoal_core::JobSpec::parse(&j.spec_toml).ok().and_then(|s| s.notify).map(|n| n.stall_s.saturating_mul(1000)));
            let Some(after) = after else { continue };
            let step = self.latest_progress(j.id, j.generation).map(|p| p.step).unwrap_or_else(|| j.progress.as_ref().map(|p| p.step).unwrap_or(0));
            let watch = self.stall_watch.entry(j.id).or_insert((j.generation, step, now, false));
            if (watch.0, watch.1) != (j.generation, step) {
                *watch = (j.generation, step, now, false);
            } else if !watch.3 && now.saturating_sub(watch.2) >= after {
                watch.3 = true;
                proposals.push((format!("stall/{}/{}/{step}", j.id, j.generation), command::Kind::JobStalled(JobStalled { job_id: j.id, generation: j.generation, step })));
            }
        }
        // A pipeline step past its `timeout_s` (by the commands' clock, which its start carried).
        for run in state.pipeline_runs().filter(|r| r.state == "running") {
            for s in run.steps.iter().filter(|s| s.state == "running" && s.timeout_s > 0) {
                if now_unix_ms >= s.started_unix_ms.saturating_add(s.timeout_s.saturating_mul(1000)) {
                    let t = PipelineStepTimeout { run: run.id.clone(), step: s.name.clone(), attempt: s.attempts };
                    proposals.push((format!("timeout/{}/{}/{}", run.id, s.name, s.attempts), command::Kind::PipelineStepTimeout(t)));
                }
            }
        }
        // Schedules: the slot each one's catch-up rule picks (apply takes it once).
        for f in state.due_schedules(now_unix_ms) {
            let key = format!("slot/{}/{:?}", f.pipeline, (f.slots_ms.first(), f.slots_ms.last()));
            proposals.push((key, command::Kind::ScheduleFire(f)));
        }
        // Possible cache hits: their artifacts are read off the loop (once per attempt while
        // the first check is in flight).
        let mut checks: Vec<(String, Action)> = Vec::new();
        checks.extend(state.cache_checks().into_iter().map(|(v, files)| (format!("cache/{}/{}/{}", v.run, v.step, v.attempt), Action::VerifyCache(v, files))));
        checks.extend(state.hash_checks().into_iter().map(|(d, files)| (format!("hash/{}/{}/{}", d.run, d.step, d.attempt), Action::HashFiles(d, files))));
        checks.extend(state.incoming_checks().into_iter().map(|(l, prefix)| (format!("incoming/{}/{}/{}", l.run, l.step, l.attempt), Action::ListIncoming(l, prefix))));
        // Audit entries waiting for their segment: written off the loop, then sealed.
        if let Some(seal) = state.audit_seal_due(now_unix_ms) {
            checks.push((format!("audit/{}-{}", seal.first_seq, seal.last_seq), Action::SealAudit(seal)));
        }
        // Debounced pipeline triggers whose dataset has been quiet long enough.
        for t in state.due_triggers(now_unix_ms) {
            proposals.push((format!("trigger/{}/{}/{}", t.pipeline, t.from_version, t.to_version), command::Kind::PipelineTriggered(t)));
        }
        self.stall_after.retain(|id, _| state.job(*id).is_some_and(|j| !j.state().is_terminal()));
        self.stall_watch.retain(|id, _| state.job(*id).is_some_and(|j| j.state() == JobState::Running));
        self.progress.retain(|id, _| state.job(*id).is_some_and(|j| !j.state().is_terminal()));
        self.waiting_since.retain(|id, _| state.job(*id).is_some_and(|j| j.state() == JobState::Queued));
        if self.last_retention.is_none_or(|t| now.saturating_sub(t) >= RETENTION_EVERY_MS) {
            self.last_retention = Some(now);
            if !state.prunable_jobs(now_unix_ms).0.is_empty() {
                proposals.push(("prune".into(), command::Kind::PruneJobs(true)));
            }
            let gone = state.forgettable_workers(now_unix_ms, lease_ms);
            if !gone.is_empty() {
                proposals.push(("forget".into(), command::Kind::ForgetWorkers(ForgetWorkers { worker_ids: gone })));
            }
        }
        // The same decision is not proposed again while its first proposal is in flight.
        self.recent.retain(|_, t| now.saturating_sub(*t) < REPEAT_AFTER_MS);
        let mut actions = Vec::new();
        for (key, action) in checks.into_iter().chain(proposals.into_iter().map(|(key, kind)| (key, Action::Propose(kind)))) {
            if self.recent.contains_key(&key) {
                continue;
            }
            self.recent.insert(key, now);
            actions.push(action);
        }
        // A learner that has caught up becomes a voter (one that never answered has matched 0),
        // one at a time, and only if the larger group still has a live quorum.
        if !group.pending_conf {
            let caught_up = group.learners.iter().copied().find(|id| group.matched.get(id).is_some_and(|m| *m > 0 && m + PROMOTE_LAG >= group.commit));
            if let Some(id) = caught_up.filter(|id| check_live_quorum(&group.voters, Change::Promote(*id), &group.live).is_ok()) {
                if let std::collections::btree_map::Entry::Vacant(e) = self.recent.entry(format!("promote/{id}")) {
                    e.insert(now);
                    actions.push(Action::Promote(id));
                }
            }
        }
        actions
    }
}
