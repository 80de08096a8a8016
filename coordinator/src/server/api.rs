//! The client-facing gRPC service.

use super::*;

impl Api {
    /// Proposes a command and waits for its outcome. `request_id` (may be empty) makes a
    /// client's retries idempotent.
    async fn propose(&self, kind: command::Kind, request_id: String) -> Result<ApplyOutput, Status> {
        let cmd = Command { proposal_id: 0, request_id, kind: Some(kind) };
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
            Ok(Ok(Err(msg))) if msg.starts_with("not the leader") => Err(self.not_leader()),
            // Raft dropped it (a leader transfer under way, say): another try may take.
            Ok(Ok(Err(msg))) if msg.starts_with("leadership changed") || msg.starts_with("raft:") => Err(Status::unavailable(msg)),
            Ok(Ok(Err(msg))) if msg.starts_with("the request is") => Err(final_status(tonic::Code::InvalidArgument, msg)),
            Ok(Ok(Err(msg))) => Err(final_status(tonic::Code::FailedPrecondition, msg)),
            Ok(Ok(Ok(out))) => Ok(out),
        }
    }

    /// Waits until this replica's state holds every write committed before the call (raft's
    /// ReadIndex), so what a read returns next is never stale, on a follower or on a leader
    /// that was deposed without knowing it yet.
    async fn linearize(&self) -> Result<(), Status> {
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
    async fn change_member(&self, op: MemberOp, id: u64, address: String, request_id: String) -> Result<u64, Status> {
        let (tx, rx) = oneshot::channel::<ApplyResult>();
        self.0
            .inbox
            .try_send(Input::Member { op, id, address, request_id, reply: tx })
            .map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Err(_) => Err(Status::deadline_exceeded("the membership change did not commit in time")),
            Ok(Err(_)) => Err(Status::unavailable("the membership change was dropped; retry")),
            Ok(Ok(Err(msg))) if msg.starts_with("not the leader") => Err(self.not_leader()),
            Ok(Ok(Err(msg))) => Err(Status::unavailable(msg)),
            Ok(Ok(Ok(ApplyOutput::Member(id)))) => Ok(id),
            Ok(Ok(Ok(other))) => Err(Status::internal(format!("unexpected apply output {other:?}"))),
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

    pub(super) fn job_view(&self, job: &JobInfo) -> JobInfo {
        let mut job = job.clone();
        let vol = self.0.volatile.lock().expect("volatile lock");
        if let Some((generation, p, _)) = vol.progress.get(&job.id) {
            let newer = job.progress.as_ref().map(|q| p.step >= q.step).unwrap_or(true);
            if *generation == job.generation && job.state() == JobState::Running && newer {
                job.progress = Some(p.clone());
            }
        }
        job
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

#[tonic::async_trait]
impl Coordinator for Api {
    async fn add_coordinator(&self, r: Request<AddCoordinatorRequest>) -> Result<Response<MemberReply>, Status> {
        let AddCoordinatorRequest { address, request_id } = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        if let Some(id) = self.0.state.read().expect("state lock").member_for_request(&request_id).filter(|_| !request_id.is_empty()) {
            return Ok(Response::new(self.member_reply(id)));
        }
        if address.parse::<std::net::SocketAddr>().is_err() {
            return Err(final_status(tonic::Code::InvalidArgument, format!("{address:?} is not an address (HOST:PORT with a numeric host)")));
        }
        let addresses = self.0.addresses.read().expect("addresses lock").clone();
        if let Some((id, _)) = addresses.iter().find(|(_, a)| **a == address) {
            return Err(final_status(tonic::Code::AlreadyExists, format!("replica {id} is at {address} already")));
        }
        let id = addresses.keys().max().copied().unwrap_or(0) + 1;
        let id = self.change_member(MemberOp::AddLearner, id, address, request_id).await?;
        Ok(Response::new(self.member_reply(id)))
    }

    async fn remove_coordinator(&self, r: Request<RemoveCoordinatorRequest>) -> Result<Response<MemberReply>, Status> {
        let RemoveCoordinatorRequest { id, request_id } = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        let peers = self.peers();
        if !peers.iter().any(|p| p.id == id) {
            // Gone already (a retry after the change applied) or never there.
            return match self.0.state.read().expect("state lock").member_for_request(&request_id).filter(|_| !request_id.is_empty()) {
                Some(_) => Ok(Response::new(self.member_reply(id))),
                None => Err(final_status(tonic::Code::NotFound, format!("replica {id} is not a member of the group"))),
            };
        }
        if peers.iter().filter(|p| !p.learner && p.id != id).count() == 0 {
            return Err(final_status(tonic::Code::FailedPrecondition, format!("replica {id} is the last voter; a group needs one")));
        }
        if id == self.0.cfg.id {
            // The leader hands its role to another voter first; the client retries there.
            let to = peers.iter().find(|p| !p.learner && p.id != id).map(|p| p.id).expect("checked above");
            let _ = self.0.inbox.try_send(Input::TransferLeader(to));
            return Err(Status::unavailable(format!("replica {id} leads the group; handing the lead to replica {to} first; retry")));
        }
        self.change_member(MemberOp::Remove, id, String::new(), request_id).await?;
        Ok(Response::new(self.member_reply(id)))
    }

    async fn transfer_leader(&self, r: Request<TransferLeaderRequest>) -> Result<Response<MemberReply>, Status> {
        let id = r.into_inner().id;
        if self.0.view.read().expect("view lock").leader_id == id {
            return Ok(Response::new(self.member_reply(id)));
        }
        self.require_leader()?;
        if !self.peers().iter().any(|p| p.id == id && !p.learner) {
            return Err(final_status(tonic::Code::FailedPrecondition, format!("replica {id} is not a voter of the group")));
        }
        let _ = self.0.inbox.try_send(Input::TransferLeader(id));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.0.view.read().expect("view lock").leader_id == id {
                return Ok(Response::new(self.member_reply(id)));
            }
        }
        Err(Status::deadline_exceeded(format!("replica {id} did not take the lead in time")))
    }

    async fn get_status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        // Before the view lock below: `peers` takes it too (no lock is taken twice).
        let peers = self.peers();
        let v = self.0.view.read().expect("view lock");
        let state = self.0.state.read().expect("state lock");
        let node = CoordinatorStatus {
            id: self.0.cfg.id,
            address: self.0.address.clone(),
            role: if v.learners.contains(&self.0.cfg.id) { "learner".into() } else { v.role.to_string() },
            term: v.term,
            commit_index: v.commit,
            applied_index: state.applied_index,
            pid: std::process::id(),
            leader_id: v.leader_id,
            store_dir: self.0.cfg.store_dir.display().to_string(),
            cluster_id: self.0.cluster_id.clone(),
            dropped_raft_messages: self.0.dropped.load(std::sync::atomic::Ordering::Relaxed),
            snapshot_index: v.snapshot_index,
            state_hash: state.state_hash(),
        };
        let workers = state.workers().cloned().collect();
        Ok(Response::new(StatusResponse { node: Some(node), peers, workers }))
    }

    async fn register_dataset(&self, r: Request<RegisterDatasetRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        let ds = r.dataset.ok_or_else(|| final_status(tonic::Code::InvalidArgument, "no dataset in request"))?;
        match self.propose(command::Kind::RegisterDataset(ds), r.request_id).await? {
            ApplyOutput::Dataset(d) => Ok(Response::new(*d)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn set_dataset_settings(&self, r: Request<shoal_proto::DatasetSettingsRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        match self.propose(command::Kind::SetDatasetSettings(r), request_id).await? {
            ApplyOutput::Dataset(d) => Ok(Response::new(*d)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn list_datasets(&self, _: Request<ListDatasetsRequest>) -> Result<Response<ListDatasetsResponse>, Status> {
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        Ok(Response::new(ListDatasetsResponse { datasets: state.datasets().cloned().collect() }))
    }

    async fn get_dataset(&self, r: Request<GetDatasetRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        match state.dataset(&r.name, r.version) {
            Some(d) => Ok(Response::new(d.clone())),
            None if r.version == 0 => Err(final_status(tonic::Code::NotFound, format!("dataset {:?} does not exist", r.name))),
            None => Err(final_status(tonic::Code::NotFound, format!("dataset {:?} has no version {}", r.name, r.version))),
        }
    }

    async fn register_model(&self, r: Request<shoal_proto::RegisterModelRequest>) -> Result<Response<shoal_proto::ModelInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        expect_model(self.propose(command::Kind::RegisterModel(r), request_id).await?)
    }

    async fn set_model_alias(&self, r: Request<shoal_proto::ModelAliasRequest>) -> Result<Response<shoal_proto::ModelInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        expect_model(self.propose(command::Kind::SetModelAlias(r), request_id).await?)
    }

    async fn get_model(&self, r: Request<shoal_proto::GetModelRequest>) -> Result<Response<shoal_proto::ModelInfo>, Status> {
        let r = r.into_inner();
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        let found = state.models().find(|m| m.name == r.name).cloned();
        found.map(Response::new).ok_or_else(|| final_status(tonic::Code::NotFound, format!("there is no model {}", r.name)))
    }

    async fn list_models(&self, _: Request<shoal_proto::ListModelsRequest>) -> Result<Response<shoal_proto::ListModelsResponse>, Status> {
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        Ok(Response::new(shoal_proto::ListModelsResponse { models: state.models().cloned().collect() }))
    }

    async fn submit_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<JobInfo>, Status> {
        let SubmitJobRequest { spec_toml, request_id } = r.into_inner();
        // Only the leader pre-checks, on a state that holds every committed write: a lagging
        // replica could call a fresh dataset missing.
        self.require_leader()?;
        self.linearize().await?;
        // Check here first for a fast, clear error; apply checks again against the state
        // at its index.
        let checked = {
            let state = self.0.state.read().expect("state lock");
            match shoal_core::batch::is_batch(&spec_toml) {
                Ok(true) => state.check_batch(&spec_toml).map(|_| ()),
                Ok(false) => state.check_submission(&spec_toml).map(|_| ()),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Err(e) = checked {
            return Err(final_status(tonic::Code::InvalidArgument, e));
        }
        Ok(Response::new(expect_job(self.propose(command::Kind::SubmitJob(spec_toml), request_id).await?)?))
    }

    async fn schedule_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<shoal_proto::JobTemplate>, Status> {
        let SubmitJobRequest { spec_toml, request_id } = r.into_inner();
        match self.propose(command::Kind::ScheduleJob(spec_toml), request_id).await? {
            ApplyOutput::Template(t) => Ok(Response::new(*t)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn list_templates(&self, _: Request<shoal_proto::ListTemplatesRequest>) -> Result<Response<shoal_proto::ListTemplatesResponse>, Status> {
        self.linearize().await?;
        let templates = self.0.state.read().expect("state lock").templates().cloned().collect();
        Ok(Response::new(shoal_proto::ListTemplatesResponse { templates }))
    }

    async fn get_job(&self, r: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        let id = r.into_inner().id;
        self.linearize().await?;
        let job = self.0.state.read().expect("state lock").job(id).cloned();
        match job {
            Some(j) => Ok(Response::new(self.job_view(&j))),
            None => Err(final_status(tonic::Code::NotFound, format!("job {id} does not exist"))),
        }
    }

    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        self.linearize().await?;
        let jobs: Vec<JobInfo> = self.0.state.read().expect("state lock").jobs().cloned().collect();
        Ok(Response::new(ListJobsResponse { jobs: jobs.iter().map(|j| self.job_view(j)).collect() }))
    }

    async fn cancel_job(&self, r: Request<CancelJobRequest>) -> Result<Response<JobInfo>, Status> {
        let CancelJobRequest { id, request_id } = r.into_inner();
        Ok(Response::new(expect_job(self.propose(command::Kind::CancelJob(id), request_id).await?)?))
    }

    async fn register_worker(&self, r: Request<RegisterWorkerRequest>) -> Result<Response<RegisterWorkerResponse>, Status> {
        let req = r.into_inner();
        let request_id = req.request_id.clone();
        match self.propose(command::Kind::RegisterWorker(req), request_id).await? {
            ApplyOutput::WorkerId(id) => {
                let mut vol = self.0.volatile.lock().expect("volatile lock");
                vol.last_seen.insert(id.clone(), Instant::now());
                vol.heard.insert(id.clone());
                drop(vol);
                Ok(Response::new(RegisterWorkerResponse { worker_id: id, lease_ms: self.0.cfg.lease.as_millis() as u64 }))
            }
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn heartbeat(&self, r: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.require_leader()?;
        // A deposed leader that has not noticed yet must not hand out a stale assignment.
        self.linearize().await?;
        let id = r.into_inner().worker_id;
        let state = self.0.state.read().expect("state lock");
        match state.worker(&id) {
            Some(w) if w.state() != WorkerState::Lost => {
                let mut vol = self.0.volatile.lock().expect("volatile lock");
                vol.last_seen.insert(id.clone(), Instant::now());
                vol.heard.insert(id.clone());
                drop(vol);
                Ok(Response::new(HeartbeatResponse { assignment: state.assignment(&id), unknown_worker: false }))
            }
            _ => Ok(Response::new(HeartbeatResponse { assignment: None, unknown_worker: true })),
        }
    }

    async fn report_progress(&self, r: Request<ProgressReport>) -> Result<Response<Ack>, Status> {
        self.require_leader()?;
        let r = r.into_inner();
        if let Some(p) = r.progress {
            let mut vol = self.0.volatile.lock().expect("volatile lock");
            let flushed = vol.progress.get(&r.job_id).and_then(|(g, _, f)| if *g == r.generation { *f } else { None });
            vol.progress.insert(r.job_id, (r.generation, p, flushed));
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_outcome(&self, r: Request<OutcomeReport>) -> Result<Response<Ack>, Status> {
        // Outcomes are idempotent by (job, generation, rank) already.
        let r = r.into_inner();
        let (job, generation, reporter, peer_failure) = (r.job_id, r.generation, r.worker_id.clone(), r.peer_failure);
        self.propose(command::Kind::RankOutcome(r), String::new()).await?;
        if peer_failure {
            // A rank lost a peer: find out, without waiting for a lease, which of the job's
            // workers is gone.
            let api = self.clone();
            tokio::spawn(async move { api.probe_job_workers(job, generation, &reporter).await });
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_task(&self, r: Request<shoal_proto::TaskReport>) -> Result<Response<shoal_proto::TaskReply>, Status> {
        let mut r = r.into_inner();
        let (worker, job_id) = (r.worker_id.clone(), r.job_id);
        // The leader stamps the time into the entry, so every replica applies the same value.
        r.reported_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.propose(command::Kind::TaskReported(r), String::new()).await?;
        // Applied here, so the state holds the commit: the worker's next task, if any. A report
        // is a sign of life, like a heartbeat.
        let state = self.0.state.read().expect("state lock");
        let mut vol = self.0.volatile.lock().expect("volatile lock");
        vol.last_seen.insert(worker.clone(), Instant::now());
        vol.heard.insert(worker.clone());
        let mut reply = shoal_proto::TaskReply { next: state.assignment(&worker), ..Default::default() };
        if let Some(j) = state.job(job_id).filter(|j| j.state().is_terminal()) {
            let b = j.batch.clone().unwrap_or_default();
            reply.job_ended = true;
            reply.output_folder = b.output_folder;
            if j.state() == JobState::Succeeded {
                reply.keep = b.tasks.iter().filter_map(|t| t.result.as_ref()?.output.as_ref().map(|o| o.path.clone())).collect();
            }
        }
        Ok(Response::new(reply))
    }

    async fn resume_job(&self, r: Request<ResumeJobRequest>) -> Result<Response<JobInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        Ok(Response::new(expect_job(self.propose(command::Kind::ResumeJob(r), request_id).await?)?))
    }

    async fn deregister(&self, r: Request<DeregisterRequest>) -> Result<Response<Ack>, Status> {
        let worker_id = r.into_inner().worker_id;
        let lost = WorkerLost { worker_id, cause: "stopped (shut down on purpose)".into() };
        match self.propose(command::Kind::WorkerLost(lost), String::new()).await {
            Ok(_) => Ok(Response::new(Ack {})),
            // Already lost (a retry, or its lease ran out first): the same end state.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(Response::new(Ack {})),
            Err(s) => Err(s),
        }
    }

    async fn commit_checkpoint(&self, r: Request<CheckpointCommit>) -> Result<Response<CheckpointCommitReply>, Status> {
        let mut c = r.into_inner();
        // The leader stamps the time into the entry, so every replica applies the same value.
        if let Some(m) = c.manifest.as_mut() {
            m.committed_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        }
        let job = expect_job(self.propose(command::Kind::CheckpointCommitted(c), String::new()).await?)?;
        Ok(Response::new(CheckpointCommitReply { kept_steps: job.checkpoints.iter().map(|m| m.step).collect() }))
    }

    async fn report_checkpoint_error(&self, r: Request<CheckpointError>) -> Result<Response<Ack>, Status> {
        self.propose(command::Kind::CheckpointFailed(r.into_inner()), String::new()).await?;
        Ok(Response::new(Ack {}))
    }
}

/// Connection attempts, 100 ms apart, to a worker a peer reported gone.
const PROBES: u32 = 10;

impl Api {
    /// Probes the data-plane address of every worker of (job, generation) but `reporter`, up
    /// to `PROBES` times 100 ms apart. A live worker always listens there, so a refused
    /// connection means its process is gone: it is declared lost, which requeues the job
    /// without it. (A killed process closes its sockets only when its last thread has exited,
    /// which can be after its main thread shows as a zombie: hence more than one try.) A
    /// worker that accepts, or times out, proves nothing here: its lease decides.
    pub(super) async fn probe_job_workers(&self, job: u64, generation: u64, reporter: &str) {
        let targets: Vec<(String, String)> = {
            let state = self.0.state.read().expect("state lock");
            let Some(j) = state.job(job).filter(|j| j.generation == generation && j.state() == JobState::Running) else { return };
            j.workers.iter().filter(|w| *w != reporter).filter_map(|w| state.worker(w).map(|i| (w.clone(), i.address.clone()))).collect()
        };
        for (worker, address) in targets {
            for attempt in 0..PROBES {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if crate::client::refuses_connections(&address).await {
                    tracing::warn!(job, generation, %worker, %address, "a peer reported this worker gone and it refuses connections: declaring it lost");
                    let lost = WorkerLost { worker_id: worker.clone(), cause: format!("was lost (its peers lost it; nothing answers at {address})") };
                    if let Err(e) = self.propose(command::Kind::WorkerLost(lost), String::new()).await {
                        tracing::debug!(%worker, error = %e.message(), "declaring the worker lost");
                    }
                    break;
                }
            }
        }
    }

}
