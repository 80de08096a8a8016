//! How the API reaches the replicated state: proposals and their outcomes, linearizable
//! reads, membership changes, leadership checks and the statuses refusals become; and the
//! checks and views the service's methods share.

use super::*;
use shoal_core::store::Store;

impl Api {
    /// Proposes a command and waits for its outcome. `request_id` (may be empty) makes a
    /// client's retries idempotent.
    pub(super) async fn propose(&self, kind: command::Kind, request_id: String) -> Result<ApplyOutput, Status> {
        self.require_running()?;
        let cmd = Command { request_id, kind: Some(kind), audit: auth::call_context(), ..Default::default() };
        // Checked here too (the core checks again), so the caller gets a final answer.
        if cmd.encoded_len() > crate::node::MAX_COMMAND {
            return Err(final_status(tonic::Code::InvalidArgument, CoordError::TooLarge(cmd.encoded_len()).to_string()));
        }
        let (tx, rx) = oneshot::channel::<ApplyResult>();
        self.0
            .inbox
            .try_send(Input::Propose(cmd, tx))
            .map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Err(_) => Err(Status::deadline_exceeded("the proposal did not commit in time")),
            Ok(Err(_)) => Err(Status::unavailable("the proposal was dropped; retry")),
            Ok(Ok(Err(e))) => Err(self.refusal(e)),
            Ok(Ok(Ok(out))) => Ok(out),
        }
    }

    /// Proposes a pipeline command whose outcome is the pipeline.
    pub(super) async fn propose_pipeline(&self, kind: command::Kind, request_id: String) -> Result<Response<shoal_proto::PipelineInfo>, Status> {
        match self.propose(kind, request_id).await? {
            ApplyOutput::Pipeline(p) => Ok(Response::new(*p)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    /// Proposes a pipeline command whose outcome is a run.
    pub(super) async fn propose_run(&self, kind: command::Kind, request_id: String) -> Result<Response<shoal_proto::PipelineRun>, Status> {
        match self.propose(kind, request_id).await? {
            ApplyOutput::PipelineRun(run) => Ok(Response::new(*run)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    /// Waits until this replica's state holds every write committed before the call (raft's
    /// ReadIndex), so what a read returns next is never stale, on a follower or on a leader
    /// that was deposed without knowing it yet.
    pub(super) async fn linearize(&self) -> Result<(), Status> {
        self.require_running()?;
        let (tx, rx) = oneshot::channel();
        self.0.inbox.try_send(Input::Read(tx)).map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(READ_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(msg))) => Err(Status::unavailable(msg)),
            _ => Err(Status::unavailable("the read could not be confirmed by a quorum in time; retry")),
        }
    }

    /// The group as this replica's state machine records it: every member's id, address and
    /// role.
    pub(super) fn peers(&self) -> Vec<PeerInfo> {
        effective_members(&self.0)
    }

    pub(super) fn member_reply(&self, id: u64) -> MemberReply {
        MemberReply { id, cluster_id: self.0.cluster_id.clone(), peers: self.peers() }
    }

    /// Sends a member change to the Ready loop and waits until it is applied.
    pub(super) async fn change_member(&self, op: MemberOp, id: u64, address: String, request_id: String, force: bool) -> Result<u64, Status> {
        let (tx, rx) = oneshot::channel::<ApplyResult>();
        self.0
            .inbox
            .try_send(Input::Member { op, id, address, request_id, who: auth::call_context(), force, reply: tx })
            .map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Err(_) => Err(Status::deadline_exceeded("the membership change did not commit in time")),
            Ok(Err(_)) => Err(Status::unavailable("the membership change was dropped; retry")),
            Ok(Ok(Err(e))) => Err(self.refusal(e)),
            Ok(Ok(Ok(ApplyOutput::Member(id)))) => Ok(id),
            Ok(Ok(Ok(other))) => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    /// The status a refused or unproposed command gets: the state machine's refusals are
    /// final (another replica would refuse alike); the core's are retried elsewhere.
    pub(super) fn refusal(&self, e: ApplyError) -> Status {
        match e {
            ApplyError::NotFound(m) => final_status(tonic::Code::NotFound, m),
            ApplyError::Invalid(m) => final_status(tonic::Code::InvalidArgument, m),
            ApplyError::Conflict(m) => final_status(tonic::Code::FailedPrecondition, m),
            ApplyError::NotLeader(_) => self.not_leader(),
            // Raft dropped it (a leader transfer under way, say): another try may take.
            ApplyError::Retry(m) => Status::unavailable(m),
            e @ ApplyError::TooLarge(_) => final_status(tonic::Code::InvalidArgument, e.to_string()),
        }
    }

    /// `Unavailable` while the replica has not started its Raft loop (an empty folder waiting
    /// for its peers, or checking that it may join).
    pub(super) fn require_running(&self) -> Result<(), Status> {
        match *self.0.phase.read().expect("phase lock") {
            Phase::Running => Ok(()),
            Phase::Fresh => Err(Status::unavailable(format!("replica {} is starting: its peers have not yet confirmed that the group is new", self.0.cfg.id))),
            Phase::Joining => Err(Status::unavailable(format!("replica {} is starting: it is checking that it may join the group", self.0.cfg.id))),
        }
    }

    pub(super) fn require_leader(&self) -> Result<(), Status> {
        if self.0.view.read().expect("view lock").role == "leader" {
            return Ok(());
        }
        Err(self.not_leader())
    }

    /// `Unavailable`, with the leader's address (when known) in the `shoal-leader` metadata,
    /// so a client goes there next in one round trip.
    pub(super) fn not_leader(&self) -> Status {
        let leader = self.0.view.read().expect("view lock").leader_id;
        match self.0.addresses.read().expect("addresses lock").get(&leader).cloned().filter(|_| leader != 0) {
            Some(addr) => {
                let mut s = Status::unavailable(format!("not the leader; leader is {leader} at {addr}"));
                if let Ok(v) = addr.parse() {
                    s.metadata_mut().insert("shoal-leader", v);
                }
                s
            }
            None => Status::unavailable("not the leader; no leader known yet"),
        }
    }

    /// A job as shown: its latest progress report (which the leader replicates only now and
    /// then) when newer than the log's.
    pub(super) fn job_view(&self, job: &JobInfo) -> JobInfo {
        let mut job = job.clone();
        // The history's index is for GetJobMetrics; status and listings carry its size only.
        job.metric_chunks.clear();
        let duties = self.0.duties.lock().expect("duties lock");
        if let Some(p) = duties.latest_progress(job.id, job.generation) {
            let newer = job.progress.as_ref().map(|q| p.step >= q.step).unwrap_or(true);
            if job.state() == JobState::Running && job.results.is_empty() && newer {
                let checkpoint = job.checkpoints.last().map(|c| c.step).unwrap_or(0);
                let mut p = p.clone();
                p.step = p.step.max(checkpoint);
                job.progress = Some(p);
            }
        }
        job
    }

    /// The state hash and size (as a snapshot encodes it) at the applied index, computed
    /// once per index.
    pub(super) fn state_hash(&self, state: &StateMachine) -> (String, u64) {
        let mut cache = self.0.hash_cache.lock().expect("hash lock");
        match cache.as_ref() {
            Some((at, h, n)) if *at == state.applied_index => (h.clone(), *n),
            _ => {
                let bytes = state.encode_snapshot(state.applied_index);
                let h = blake3::hash(&bytes).to_hex().to_string();
                *cache = Some((state.applied_index, h.clone(), bytes.len() as u64));
                (h, bytes.len() as u64)
            }
        }
    }

    /// Removes the store folders under `root` (relative to the store) that `keep` says are not
    /// referenced, older than `min_age`; returns what went.
    /// A folder is the first `depth` parts below `root`; its age is its newest object's.
    /// Blocking: the store's calls are IO.
    pub(super) fn remove_unreferenced(store: &Store, root: &str, depth: usize, keep: impl Fn(&str) -> bool, min_age: Duration) -> Vec<String> {
        let entries = match store.list(root) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(root, error = %e, "could not list the store");
                return Vec::new();
            }
        };
        // Folder -> its newest object's time (an object directly in a folder's parent is none).
        let mut folders: BTreeMap<String, u64> = BTreeMap::new();
        for e in &entries {
            let Some(below) = e.key.strip_prefix(root).and_then(|r| r.strip_prefix('/')) else { continue };
            let parts: Vec<&str> = below.split('/').collect();
            if parts.len() <= depth {
                continue;
            }
            let newest = folders.entry(format!("{root}/{}", parts[..depth].join("/"))).or_default();
            *newest = (*newest).max(e.modified_unix_ms);
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut removed = Vec::new();
        for (rel, newest) in folders {
            if keep(&rel) || now.saturating_sub(newest) < min_age.as_millis() as u64 {
                continue;
            }
            match store.delete_prefix(&rel) {
                Ok(_) => removed.push(rel),
                Err(err) => tracing::warn!(path = rel, error = %err, "could not remove an unreferenced folder"),
            }
        }
        removed
    }
}

/// A key a client may write: a file of a new import's folder, `datasets/NAME/import-ID/FILE`.
pub(super) fn import_key(key: &str) -> Result<(), String> {
    shoal_core::store::check_key(key).map_err(|e| e.to_string())?;
    let parts: Vec<&str> = key.split('/').collect();
    match parts[..] {
        ["datasets", name, import, _] if shoal_core::dataset::validate_name(name).is_ok() && import.starts_with("import-") => Ok(()),
        _ => Err(format!("{key:?}: clients write only a new import's files (datasets/NAME/import-ID/FILE)")),
    }
}

pub(super) fn expect_model(out: ApplyOutput) -> Result<Response<shoal_proto::ModelInfo>, Status> {
    match out {
        ApplyOutput::Model(m) => Ok(Response::new(*m)),
        other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
    }
}

pub(super) fn expect_job(out: ApplyOutput) -> Result<JobInfo, Status> {
    match out {
        ApplyOutput::Job(j) => Ok(*j),
        other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
    }
}
