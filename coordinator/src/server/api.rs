//! The client-facing gRPC service.

use super::proposals::{expect_job, expect_model, import_key};
use super::*;

/// Largest object a client may write through `PutObjects` (each is held whole while written).
const MAX_PUT_OBJECT: usize = 1 << 30;
/// Objects `PutObjects` writes at once.
const PUTS_IN_FLIGHT: usize = 4;
/// Bytes per chunk `GetObject` streams.
const OBJECT_CHUNK: u64 = 1 << 20;

#[tonic::async_trait]
impl Coordinator for Api {
    async fn add_coordinator(&self, r: Request<AddCoordinatorRequest>) -> Result<Response<MemberReply>, Status> {
        let AddCoordinatorRequest { address, request_id } = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        if let Some(id) = self.0.state.read().expect("state lock").member_for_request(&request_id).filter(|_| !request_id.is_empty()) {
            return Ok(Response::new(self.member_reply(id)));
        }
        crate::membership::check_dialable(&address).map_err(|e| final_status(tonic::Code::InvalidArgument, e))?;
        let addresses = self.0.addresses.read().expect("addresses lock").clone();
        if let Some((id, _)) = addresses.iter().find(|(_, a)| **a == address) {
            return Err(final_status(tonic::Code::AlreadyExists, format!("replica {id} is at {address} already")));
        }
        // Never an id the group had: a removed replica's id never comes back.
        let id = self.0.state.read().expect("state lock").next_member_id().max(addresses.keys().max().copied().unwrap_or(0) + 1);
        let id = self.change_member(MemberOp::AddLearner, id, address, request_id, false).await?;
        Ok(Response::new(self.member_reply(id)))
    }

    async fn remove_coordinator(&self, r: Request<RemoveCoordinatorRequest>) -> Result<Response<MemberReply>, Status> {
        let RemoveCoordinatorRequest { id, request_id, force } = r.into_inner();
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
        // The core checks the rest against raft's own view: a live quorum after the change
        // (unless forced), and a leader that removes itself hands its role on first.
        self.change_member(MemberOp::Remove, id, String::new(), request_id, force).await?;
        Ok(Response::new(self.member_reply(id)))
    }

    async fn transfer_leader(&self, r: Request<TransferLeaderRequest>) -> Result<Response<MemberReply>, Status> {
        let id = r.into_inner().id;
        if self.0.view.read().expect("view lock").leader_id == id {
            return Ok(Response::new(self.member_reply(id)));
        }
        self.require_leader()?;
        let (tx, rx) = oneshot::channel();
        self.0.inbox.try_send(Input::TransferLeader(id, tx)).map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(READ_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => return Err(final_status(tonic::Code::FailedPrecondition, format!("cannot hand the lead to replica {id}: {why}"))),
            _ => return Err(Status::unavailable("the transfer could not be started; retry")),
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.0.view.read().expect("view lock").leader_id == id {
                return Ok(Response::new(self.member_reply(id)));
            }
        }
        Err(Status::deadline_exceeded(format!("replica {id} did not take the lead in time")))
    }

    async fn check_join(&self, r: Request<JoinCheckRequest>) -> Result<Response<JoinCheckReply>, Status> {
        let r = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        let no = |reason: String| Ok(Response::new(JoinCheckReply { ok: false, reason }));
        if r.cluster_id != self.0.cluster_id {
            return no(format!("it names cluster {:?}; this is cluster {}", r.cluster_id, self.0.cluster_id));
        }
        let state = self.0.state.read().expect("state lock");
        if state.was_removed(r.id) {
            return no(format!("replica {} was removed from the group, and ids are never reused: add a new replica (`shoal coordinator add HOST:PORT`) and start it with the id it gets", r.id));
        }
        let member = state.members().find(|m| m.id == r.id).map(|m| m.learner);
        drop(state);
        match member {
            Some(true) => Ok(Response::new(JoinCheckReply { ok: true, reason: String::new() })),
            Some(_) => no(format!(
                "replica {} is a voter of the group: a voter's folder cannot start empty (its votes and log are gone). Replace it: `shoal coordinator remove {}`, then `shoal coordinator add HOST:PORT`",
                r.id, r.id
            )),
            None => no(format!("replica {} is not a member of the group: `shoal coordinator add HOST:PORT` first, and start the replica with the id it gets", r.id)),
        }
    }

    async fn get_status(&self, r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let r = r.into_inner();
        // Before the view lock below: `peers` takes it too (no lock is taken twice).
        let peers = self.peers();
        if r.members_only {
            return Ok(Response::new(StatusResponse { peers, ..Default::default() }));
        }
        let v = self.0.view.read().expect("view lock");
        let state = self.0.state.read().expect("state lock");
        let node = CoordinatorStatus {
            id: self.0.cfg.id,
            address: self.0.address.clone(),
            role: v.role_of(self.0.cfg.id, *self.0.phase.read().expect("phase lock")).into(),
            term: v.term,
            commit_index: v.commit,
            applied_index: state.applied_index,
            pid: std::process::id(),
            leader_id: v.leader_id,
            store_dir: self.0.cfg.store.location(),
            cluster_id: self.0.cluster_id.clone(),
            dropped_raft_messages: self.0.dropped.load(std::sync::atomic::Ordering::Relaxed),
            refused_calls: self.0.refused.load(std::sync::atomic::Ordering::Relaxed),
            auth: if self.0.cfg.auth.is_some() { "tokens" } else { "none" }.into(),
            tls: self.0.cfg.tls.is_some(),
            snapshot_index: v.snapshot_index,
            state_hash: String::new(),
            state_bytes: 0,
        };
        let mut node = node;
        if r.state_hash {
            (node.state_hash, node.state_bytes) = self.state_hash(&state);
        }
        let workers = state.workers().cloned().collect();
        Ok(Response::new(StatusResponse { node: Some(node), peers, workers, settings: Some(state.settings()) }))
    }

    async fn set_settings(&self, r: Request<SettingsRequest>) -> Result<Response<CoordinatorSettings>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        match self.propose(command::Kind::SetSettings(r), request_id).await? {
            ApplyOutput::Settings(s) => Ok(Response::new(s)),
            // A retry of one that applied: the settings as they are.
            ApplyOutput::None => Ok(Response::new(self.0.state.read().expect("state lock").settings())),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn prune_jobs(&self, r: Request<PruneRequest>) -> Result<Response<PruneReply>, Status> {
        let r = r.into_inner();
        let mut reply = PruneReply::default();
        if let ApplyOutput::Pruned { jobs, pinned } = self.propose(command::Kind::PruneJobs(true), r.request_id).await? {
            (reply.removed_jobs, reply.kept_pinned) = (jobs, pinned);
        }
        // Committed and applied here: the folders of jobs the state no longer holds go (those
        // a crash kept from going with their removal, too). A folder for an id above every
        // job given may be a job in the making, and stays.
        self.linearize().await?;
        let (jobs, last): (BTreeSet<u64>, u64) = {
            let state = self.0.state.read().expect("state lock");
            (state.jobs().map(|j| j.id).collect(), state.last_job_id())
        };
        let keep = move |rel: &str| rel.rsplit('/').next().and_then(|n| n.parse::<u64>().ok()).is_none_or(|id| id > last || jobs.contains(&id));
        let store = self.0.cfg.store.clone();
        reply.removed_paths = tokio::task::spawn_blocking(move || Self::remove_unreferenced(&store, "jobs", 1, keep, Duration::ZERO))
            .await
            .map_err(|e| Status::internal(format!("pruning job folders: {e}")))?;
        Ok(Response::new(reply))
    }

    async fn collect_datasets(&self, r: Request<PruneRequest>) -> Result<Response<PruneReply>, Status> {
        let r = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        let folders: BTreeSet<String> = self.0.state.read().expect("state lock").dataset_folders().map(|(_, f)| f.to_string()).collect();
        let min_age = Duration::from_secs(r.min_age_s);
        let store = self.0.cfg.store.clone();
        // Folders `datasets/NAME/FOLDER`, in one listing. A batch job's folder holds its output
        // until it is registered: a running job's stays (its id is above nothing we can tell
        // cheaply, so age decides, as for imports).
        let removed = tokio::task::spawn_blocking(move || Self::remove_unreferenced(&store, "datasets", 2, |rel| folders.contains(rel), min_age))
        .await
        .map_err(|e| Status::internal(format!("collecting datasets: {e}")))?;
        if !removed.is_empty() {
            // Removed already: the trail says so (a failed proposal fails the call, and its
            // retry finds nothing more to remove).
            self.propose(command::Kind::StoreRemoved(shoal_proto::StoreRemoval { cause: shoal_proto::store_removal::Cause::CollectDatasets as i32, paths: removed.clone() }), String::new()).await?;
        }
        Ok(Response::new(PruneReply { removed_paths: removed, ..Default::default() }))
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

    async fn list_datasets(&self, r: Request<ListDatasetsRequest>) -> Result<Response<ListDatasetsResponse>, Status> {
        let page = crate::state::page_number(&r.into_inner().page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let (datasets, next_page) = self.0.state.read().expect("state lock").datasets_page(page);
        Ok(Response::new(ListDatasetsResponse { datasets, next_page }))
    }

    async fn get_dataset(&self, r: Request<GetDatasetRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        let view = if r.shards_only { DatasetView::Shards } else { DatasetView::Page(crate::state::page_number(&r.page).map_err(|e| self.refusal(e))?) };
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        match state.dataset_view(&r.name, r.version, view) {
            Some(d) => Ok(Response::new(d)),
            None if r.version == 0 || !state.has_dataset(&r.name) => Err(final_status(tonic::Code::NotFound, format!("dataset {:?} does not exist", r.name))),
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
        let page = crate::state::page_number(&r.page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let found = self.0.state.read().expect("state lock").model_page(&r.name, page);
        found.map(Response::new).ok_or_else(|| final_status(tonic::Code::NotFound, format!("there is no model {}", r.name)))
    }

    async fn list_models(&self, r: Request<shoal_proto::ListModelsRequest>) -> Result<Response<shoal_proto::ListModelsResponse>, Status> {
        let page = crate::state::page_number(&r.into_inner().page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let (models, next_page) = self.0.state.read().expect("state lock").models_page(page);
        Ok(Response::new(shoal_proto::ListModelsResponse { models, next_page }))
    }

    async fn create_token(&self, r: Request<shoal_proto::CreateTokenRequest>) -> Result<Response<shoal_proto::TokenInfo>, Status> {
        self.create_token_rpc(r.into_inner()).await
    }

    async fn list_tokens(&self, _: Request<shoal_proto::ListTokensRequest>) -> Result<Response<shoal_proto::ListTokensResponse>, Status> {
        self.list_tokens_rpc().await
    }

    async fn revoke_token(&self, r: Request<shoal_proto::RevokeTokenRequest>) -> Result<Response<shoal_proto::TokenInfo>, Status> {
        self.revoke_token_rpc(r.into_inner()).await
    }

    async fn list_audit(&self, r: Request<shoal_proto::ListAuditRequest>) -> Result<Response<shoal_proto::ListAuditResponse>, Status> {
        let r = r.into_inner();
        let limit = if r.limit == 0 { 1000 } else { r.limit.min(100_000) } as usize;
        self.linearize().await?;
        let audit = self.0.state.read().expect("state lock").audit_state().clone();
        let store = self.0.cfg.store.clone();
        // Segments that may hold entries at or after `since`, read off the runtime's threads.
        let reply = tokio::task::spawn_blocking(move || -> Result<shoal_proto::ListAuditResponse, Status> {
            let mut entries = Vec::new();
            for seg in audit.segments.iter().filter(|s| s.last_unix_ms >= r.since_unix_ms) {
                let bytes = store.get(&seg.key).map_err(|e| store_status("reading", e))?;
                let file = shoal_proto::AuditSegmentFile::decode(&bytes[..]).map_err(|e| Status::data_loss(format!("{}: not an audit segment: {e}", seg.key)))?;
                entries.extend(file.entries.into_iter().filter(|e| e.unix_ms >= r.since_unix_ms));
                if entries.len() > limit {
                    break;
                }
            }
            entries.extend(audit.pending.into_iter().filter(|e| e.unix_ms >= r.since_unix_ms));
            let truncated = entries.len() > limit;
            entries.truncate(limit);
            Ok(shoal_proto::ListAuditResponse { entries, truncated, retained_from: audit.retained_from })
        });
        Ok(Response::new(reply.await.map_err(|e| Status::internal(e.to_string()))??))
    }

    async fn verify_audit(&self, _: Request<shoal_proto::VerifyAuditRequest>) -> Result<Response<shoal_proto::VerifyAuditResponse>, Status> {
        self.linearize().await?;
        let audit = self.0.state.read().expect("state lock").audit_state().clone();
        let store = self.0.cfg.store.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let (entries, segments, problems) = crate::state::audit::verify(&audit, |key| store.get(key).map_err(|e| e.to_string()));
            shoal_proto::VerifyAuditResponse { ok: problems.is_empty(), entries, segments, problems, retained_from: audit.retained_from, head: audit.head }
        });
        Ok(Response::new(reply.await.map_err(|e| Status::internal(e.to_string()))?))
    }

    async fn submit_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<JobInfo>, Status> {
        let caller = auth::caller(&self.0, &r)?;
        let SubmitJobRequest { spec_toml, request_id } = r.into_inner();
        auth::check_exec(&caller, auth::spec_runs_commands(&spec_toml))?;
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
                Err(e) => Err(ApplyError::invalid(e)),
            }
        };
        if let Err(e) = checked {
            return Err(self.refusal(e));
        }
        Ok(Response::new(expect_job(self.propose(command::Kind::SubmitJob(spec_toml), request_id).await?)?))
    }

    async fn schedule_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<shoal_proto::JobTemplate>, Status> {
        let caller = auth::caller(&self.0, &r)?;
        let SubmitJobRequest { spec_toml, request_id } = r.into_inner();
        auth::check_exec(&caller, auth::spec_runs_commands(&spec_toml))?;
        match self.propose(command::Kind::ScheduleJob(spec_toml), request_id).await? {
            ApplyOutput::Template(t) => Ok(Response::new(*t)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn submit_pipeline(&self, r: Request<shoal_proto::SubmitPipelineRequest>) -> Result<Response<shoal_proto::PipelineInfo>, Status> {
        let caller = auth::caller(&self.0, &r)?;
        let shoal_proto::SubmitPipelineRequest { spec_toml, request_id } = r.into_inner();
        auth::check_exec(&caller, auth::pipeline_runs_commands(&spec_toml))?;
        shoal_core::pipeline::PipelineSpec::parse(&spec_toml).map_err(|e| self.refusal(ApplyError::invalid(e)))?;
        self.propose_pipeline(command::Kind::SubmitPipeline(spec_toml), request_id).await
    }

    async fn run_pipeline(&self, r: Request<shoal_proto::RunPipelineRequest>) -> Result<Response<shoal_proto::PipelineRun>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        self.propose_run(command::Kind::RunPipeline(r), request_id).await
    }

    async fn cancel_pipeline_run(&self, r: Request<shoal_proto::PipelineRunRequest>) -> Result<Response<shoal_proto::PipelineRun>, Status> {
        let shoal_proto::PipelineRunRequest { id, request_id } = r.into_inner();
        self.propose_run(command::Kind::CancelPipelineRun(id), request_id).await
    }

    async fn resume_pipeline_run(&self, r: Request<shoal_proto::ResumePipelineRequest>) -> Result<Response<shoal_proto::PipelineRun>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        self.propose_run(command::Kind::ResumePipelineRun(r), request_id).await
    }

    async fn pause_pipeline(&self, r: Request<shoal_proto::PausePipelineRequest>) -> Result<Response<shoal_proto::PipelineInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        self.propose_pipeline(command::Kind::PausePipeline(r), request_id).await
    }

    async fn get_pipeline_run(&self, r: Request<shoal_proto::PipelineRunRequest>) -> Result<Response<shoal_proto::PipelineRun>, Status> {
        let id = r.into_inner().id;
        self.linearize().await?;
        let run = self.0.state.read().expect("state lock").pipeline_run(&id).cloned();
        run.map(Response::new).ok_or_else(|| final_status(tonic::Code::NotFound, format!("there is no pipeline run {id}")))
    }

    async fn list_pipelines(&self, r: Request<shoal_proto::ListPipelinesRequest>) -> Result<Response<shoal_proto::ListPipelinesResponse>, Status> {
        let page = crate::state::page_number(&r.into_inner().page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let (pipelines, next_page) = self.0.state.read().expect("state lock").pipelines_page(page);
        Ok(Response::new(shoal_proto::ListPipelinesResponse { pipelines, next_page }))
    }

    async fn list_pipeline_runs(&self, r: Request<shoal_proto::ListPipelineRunsRequest>) -> Result<Response<shoal_proto::ListPipelineRunsResponse>, Status> {
        let r = r.into_inner();
        let page = crate::state::page_number(&r.page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let (runs, next_page) = self.0.state.read().expect("state lock").pipeline_runs_page(&r.pipeline, page);
        Ok(Response::new(shoal_proto::ListPipelineRunsResponse { runs, next_page }))
    }

    async fn plan_pipeline(&self, r: Request<shoal_proto::PlanPipelineRequest>) -> Result<Response<shoal_proto::PipelinePlan>, Status> {
        let r = r.into_inner();
        self.linearize().await?;
        let (spec, steps, artifacts) = {
            let state = self.0.state.read().expect("state lock");
            let text = if r.spec_toml.is_empty() {
                state.pipeline(&r.name).map(|p| p.spec_toml.clone()).ok_or_else(|| final_status(tonic::Code::NotFound, format!("there is no pipeline {:?}", r.name)))?
            } else {
                r.spec_toml
            };
            let spec = shoal_core::pipeline::PipelineSpec::parse(&text).map_err(|e| self.refusal(ApplyError::invalid(e)))?;
            let (steps, artifacts) = state.plan_pipeline(&spec, &self.0.cfg.build);
            (spec, steps, artifacts)
        };
        // A predicted hit holds only if its artifacts still verify; if not, it and what needs
        // it are not known to hit.
        let store = self.0.cfg.store.clone();
        let mut steps = tokio::task::spawn_blocking(move || {
            let mut steps = steps;
            for (i, files) in artifacts.iter().enumerate() {
                if steps[i].prediction != "hit" {
                    continue;
                }
                if let Err(e) = super::verify_artifacts(&store, files) {
                    steps[i].prediction = "miss".into();
                    steps[i].detail = format!("its cached artifacts do not verify: {e}");
                }
            }
            steps
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        for i in 0..steps.len() {
            let upstream = spec.upstream(&steps[i].name);
            if steps[i].prediction == "hit" {
                if let Some(m) = steps[..i].iter().find(|s| upstream.contains(&s.name) && s.prediction == "miss" && s.detail.starts_with("its cached")) {
                    (steps[i].prediction, steps[i].detail) = ("unknown".into(), format!("needs {:?}, which will run", m.name));
                }
            }
        }
        Ok(Response::new(shoal_proto::PipelinePlan { pipeline: spec.name.clone(), build: self.0.cfg.build.clone(), steps }))
    }

    async fn list_templates(&self, r: Request<shoal_proto::ListTemplatesRequest>) -> Result<Response<shoal_proto::ListTemplatesResponse>, Status> {
        let page = crate::state::page_number(&r.into_inner().page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        let (templates, next_page) = state.templates_page(page);
        Ok(Response::new(shoal_proto::ListTemplatesResponse { templates: templates.into_iter().cloned().collect(), next_page }))
    }

    async fn get_job(&self, r: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        let id = r.into_inner().id;
        self.linearize().await?;
        let (job, last) = {
            let state = self.0.state.read().expect("state lock");
            (state.job(id).cloned(), state.last_job_id())
        };
        match job {
            Some(j) => Ok(Response::new(self.job_view(&j))),
            None if id > 0 && id <= last => Err(final_status(tonic::Code::NotFound, format!("job {id} is gone: it finished and retention removed it (`shoal coordinator settings`)"))),
            None => Err(final_status(tonic::Code::NotFound, format!("job {id} does not exist"))),
        }
    }

    async fn list_jobs(&self, r: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let req = r.into_inner();
        let page = crate::state::page_number(&req.page).map_err(|e| self.refusal(e))?;
        self.linearize().await?;
        let (jobs, next_page): (Vec<JobInfo>, String) = {
            let state = self.0.state.read().expect("state lock");
            let (jobs, next) = state.jobs_page(page, &req.group);
            (jobs.into_iter().cloned().collect(), next)
        };
        Ok(Response::new(ListJobsResponse { jobs: jobs.iter().map(|j| self.job_view(j)).collect(), next_page }))
    }

    async fn cancel_job(&self, r: Request<CancelJobRequest>) -> Result<Response<JobInfo>, Status> {
        let CancelJobRequest { id, request_id } = r.into_inner();
        let j = expect_job(self.propose(command::Kind::CancelJob(id), request_id).await?)?;
        // A cancelled batch job adds no version: what its attempts wrote goes (an attempt
        // still writing is refused when it reports, and removes its own object).
        let folder = j.batch.as_ref().map(|b| b.output_folder.clone()).filter(|f| f.starts_with("datasets/") && shoal_core::store::check_key(f).is_ok());
        if let (Some(folder), JobState::Cancelled) = (folder, j.state()) {
            let store = self.0.cfg.store.clone();
            let removal = tokio::task::spawn_blocking(move || {
                if let Err(e) = store.delete_prefix(&folder) {
                    tracing::warn!(folder, error = %e, "could not remove a cancelled batch job's outputs (`shoal data gc` does)");
                }
            });
            // Gone when the reply says cancelled (a slow store gets a while; then the removal
            // goes on after the reply).
            let _ = tokio::time::timeout(Duration::from_secs(10), removal).await;
        }
        Ok(Response::new(j))
    }

    async fn register_worker(&self, r: Request<RegisterWorkerRequest>) -> Result<Response<RegisterWorkerResponse>, Status> {
        let req = r.into_inner();
        let request_id = req.request_id.clone();
        match self.propose(command::Kind::RegisterWorker(req), request_id).await? {
            ApplyOutput::WorkerId(id) => {
                self.0.duties.lock().expect("duties lock").saw_worker(&id, self.0.now());
                let worker_key = self.0.cfg.auth.as_ref().map(|a| a.key.worker_key(&id).to_vec()).unwrap_or_default();
                Ok(Response::new(RegisterWorkerResponse { worker_id: id, lease_ms: self.0.cfg.lease.as_millis() as u64, worker_key }))
            }
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn heartbeat(&self, r: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.check_worker(&r, &r.get_ref().worker_id)?;
        self.require_leader()?;
        // A deposed leader that has not noticed yet must not hand out a stale assignment.
        self.linearize().await?;
        let HeartbeatRequest { worker_id: id, job_id, generation } = r.into_inner();
        let state = self.0.state.read().expect("state lock");
        match state.worker(&id) {
            Some(w) if w.state() != WorkerState::Lost => {
                self.0.duties.lock().expect("duties lock").saw_worker(&id, self.0.now());
                // The worker runs what it should: a few bytes, not its job's spec and dataset.
                if job_id != 0 && state.assignment_key(&id) == Some((job_id, generation)) {
                    return Ok(Response::new(HeartbeatResponse { unchanged: true, ..Default::default() }));
                }
                Ok(Response::new(HeartbeatResponse { assignment: self.with_ring_key(state.assignment(&id)), ..Default::default() }))
            }
            _ => Ok(Response::new(HeartbeatResponse { unknown_worker: true, ..Default::default() })),
        }
    }

    async fn report_progress(&self, r: Request<ProgressReport>) -> Result<Response<Ack>, Status> {
        self.check_worker(&r, &r.get_ref().worker_id)?;
        self.require_leader()?;
        let r = r.into_inner();
        if let Some(p) = r.progress {
            self.0.duties.lock().expect("duties lock").progress_report(r.job_id, r.generation, p);
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_outcome(&self, r: Request<OutcomeReport>) -> Result<Response<Ack>, Status> {
        self.check_worker(&r, &r.get_ref().worker_id)?;
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
        self.check_worker(&r, &r.get_ref().worker_id)?;
        let mut r = r.into_inner();
        let (worker, job_id) = (r.worker_id.clone(), r.job_id);
        // The leader stamps the time into the entry, so every replica applies the same value.
        r.reported_unix_ms = unix_ms();
        self.propose(command::Kind::TaskReported(r), String::new()).await?;
        // Applied here, so the state holds the commit: the worker's next task, if any. A report
        // is a sign of life, like a heartbeat.
        let state = self.0.state.read().expect("state lock");
        self.0.duties.lock().expect("duties lock").saw_worker(&worker, self.0.now());
        let mut reply = shoal_proto::TaskReply { next: self.with_ring_key(state.assignment(&worker)), ..Default::default() };
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
        self.check_worker(&r, &r.get_ref().worker_id)?;
        let worker_id = r.into_inner().worker_id;
        let lost = WorkerLost { worker_id, detail: String::new(), cause: LossCause::Deregistered as i32 };
        match self.propose(command::Kind::WorkerLost(lost), String::new()).await {
            Ok(_) => Ok(Response::new(Ack {})),
            // Already lost (a retry, or its lease ran out first): the same end state.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(Response::new(Ack {})),
            Err(s) => Err(s),
        }
    }

    async fn commit_checkpoint(&self, r: Request<CheckpointCommit>) -> Result<Response<CheckpointCommitReply>, Status> {
        self.check_worker(&r, &r.get_ref().worker_id)?;
        let mut c = r.into_inner();
        // The leader stamps the time into the entry, so every replica applies the same value.
        if let Some(m) = c.manifest.as_mut() {
            m.committed_unix_ms = unix_ms();
        }
        let job = expect_job(self.propose(command::Kind::CheckpointCommitted(c), String::new()).await?)?;
        Ok(Response::new(CheckpointCommitReply { kept_steps: job.checkpoints.iter().map(|m| m.step).collect() }))
    }

    async fn record_metrics(&self, r: Request<shoal_proto::MetricChunkReport>) -> Result<Response<Ack>, Status> {
        self.check_worker(&r, &r.get_ref().worker_id)?;
        self.propose(command::Kind::MetricChunk(r.into_inner()), String::new()).await?;
        Ok(Response::new(Ack {}))
    }

    async fn put_objects(&self, r: Request<tonic::Streaming<ObjectChunk>>) -> Result<Response<PutObjectsReply>, Status> {
        let mut chunks = r.into_inner();
        let store = self.0.cfg.store.clone();
        let mut reply = PutObjectsReply::default();
        // Objects are written while the next ones arrive, a few at a time (each fsyncs).
        let mut writes: tokio::task::JoinSet<Result<(), Status>> = tokio::task::JoinSet::new();
        // The object being received: its key and bytes so far.
        let mut current: Option<(String, Vec<u8>)> = None;
        while let Some(c) = chunks.message().await? {
            let (key, mut data) = match current.take() {
                Some((key, data)) if key == c.key => (key, data),
                Some((key, _)) => return Err(final_status(tonic::Code::InvalidArgument, format!("object {key} ended without its last chunk"))),
                None => {
                    import_key(&c.key).map_err(|e| final_status(tonic::Code::InvalidArgument, e))?;
                    (c.key.clone(), Vec::new())
                }
            };
            if data.len() + c.data.len() > MAX_PUT_OBJECT {
                return Err(final_status(tonic::Code::InvalidArgument, format!("object {key} is over {MAX_PUT_OBJECT} bytes (write smaller shards)")));
            }
            data.extend_from_slice(&c.data);
            if !c.last {
                current = Some((key, data));
                continue;
            }
            while writes.len() >= PUTS_IN_FLIGHT {
                writes.join_next().await.expect("a write is in flight").map_err(|e| Status::internal(e.to_string()))??;
            }
            let store = store.clone();
            reply.bytes += data.len() as u64;
            reply.keys.push(key.clone());
            writes.spawn_blocking(move || store.put(&key, &[&data]).map_err(|e| store_status("writing to", e)));
        }
        while let Some(done) = writes.join_next().await {
            done.map_err(|e| Status::internal(e.to_string()))??;
        }
        if let Some((key, _)) = current {
            return Err(final_status(tonic::Code::InvalidArgument, format!("object {key} ended without its last chunk")));
        }
        Ok(Response::new(reply))
    }

    async fn drop_import(&self, r: Request<DropImportRequest>) -> Result<Response<Ack>, Status> {
        let folder = r.into_inner().folder;
        import_key(&format!("{folder}/x")).map_err(|_| final_status(tonic::Code::InvalidArgument, format!("{folder:?} is not an import's folder (datasets/NAME/import-ID)")))?;
        self.linearize().await?;
        if self.0.state.read().expect("state lock").dataset_folders().any(|(_, f)| f == folder) {
            return Err(final_status(tonic::Code::FailedPrecondition, format!("{folder} holds a registered slice: it stays")));
        }
        let store = self.0.cfg.store.clone();
        let removing = folder.clone();
        tokio::task::spawn_blocking(move || store.delete_prefix(&removing))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| store_status("removing from", e))?;
        // Recorded once removed (a retry removes nothing more and records it again).
        self.propose(command::Kind::StoreRemoved(shoal_proto::StoreRemoval { cause: shoal_proto::store_removal::Cause::DropImport as i32, paths: vec![folder] }), String::new()).await?;
        Ok(Response::new(Ack {}))
    }

    type GetObjectStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ObjectChunk, Status>> + Send>>;

    async fn get_object(&self, r: Request<GetObjectRequest>) -> Result<Response<Self::GetObjectStream>, Status> {
        let key = r.into_inner().key;
        let readable = shoal_core::store::check_key(&key).is_ok() && (key.starts_with("datasets/") || key.starts_with("jobs/"));
        if !readable {
            return Err(final_status(tonic::Code::InvalidArgument, format!("{key:?}: only objects of datasets (datasets/...) and jobs (jobs/...) can be read")));
        }
        let store = self.0.cfg.store.clone();
        let size = {
            let (store, key) = (store.clone(), key.clone());
            tokio::task::spawn_blocking(move || store.size(&key)).await.map_err(|e| Status::internal(e.to_string()))?
        };
        let size = size.map_err(|e| store_status("reading", e))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut at = 0u64;
            loop {
                let end = (at + OBJECT_CHUNK).min(size);
                let piece = store.get_range(&key, at..end).map_err(|e| store_status("reading", e));
                let failed = piece.is_err();
                let sent = tx.blocking_send(piece.map(|data| ObjectChunk { key: key.clone(), data, last: end == size }));
                if sent.is_err() || failed || end == size {
                    return;
                }
                at = end;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_job_metrics(&self, r: Request<shoal_proto::JobMetricsRequest>) -> Result<Response<shoal_proto::JobMetrics>, Status> {
        let req = r.into_inner();
        self.linearize().await?;
        let job = self.0.state.read().expect("state lock").job(req.id).cloned();
        let job = job.ok_or_else(|| final_status(tonic::Code::NotFound, format!("job {} does not exist (or retention removed it)", req.id)))?;
        let store = self.0.cfg.store.clone();
        // Reading the chunks is store IO: off the async threads.
        let metrics = tokio::task::spawn_blocking(move || {
            let mut chunks = Vec::with_capacity(job.metric_chunks.len());
            let mut unreadable = 0u32;
            for c in &job.metric_chunks {
                let read = store.get(&c.path).ok().filter(|b| blake3::hash(b).to_hex().as_str() == c.blake3);
                match read.and_then(|b| shoal_proto::MetricChunk::decode(&b[..]).ok()) {
                    Some(chunk) => chunks.push(chunk),
                    None => unreadable += 1,
                }
            }
            shoal_proto::JobMetrics {
                job_id: job.id,
                series: shoal_core::history::merge(&chunks, &req.keys),
                dropped: job.metrics_dropped,
                chunks: job.metric_chunks.len() as u32,
                chunks_unreadable: unreadable,
            }
        })
        .await
        .map_err(|e| Status::internal(format!("reading the metric chunks: {e}")))?;
        Ok(Response::new(metrics))
    }

    async fn report_checkpoint_error(&self, r: Request<CheckpointError>) -> Result<Response<Ack>, Status> {
        self.check_worker(&r, &r.get_ref().worker_id)?;
        self.propose(command::Kind::CheckpointFailed(r.into_inner()), String::new()).await?;
        Ok(Response::new(Ack {}))
    }
}

/// Connection attempts, 100 ms apart, to a worker a peer reported gone.
const PROBES: u32 = 10;

impl Api {
    /// With credentials, a call made for a worker must carry that worker's key (from its
    /// registration): the worker token is shared by every worker, the key is not. Refusals
    /// are counted with the guard's.
    fn check_worker<T>(&self, r: &Request<T>, worker_id: &str) -> Result<(), Status> {
        let Some(auth) = &self.0.cfg.auth else { return Ok(()) };
        let header = r.metadata().get(shoal_core::auth::WORKER_KEY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if auth.key.check_worker(worker_id, header) {
            return Ok(());
        }
        self.0.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let why = if header.is_empty() { "carries no worker key" } else { "carries a key that is not this worker's" };
        Err(Status::permission_denied(format!("a call for worker {worker_id:?} {why} (a worker's calls carry the key its registration gave it)")))
    }

    /// With credentials, the generation's ranks prove their membership to each other on the
    /// data plane with a key only the coordinators can derive: it goes with the assignment.
    fn with_ring_key(&self, mut assignment: Option<Assignment>) -> Option<Assignment> {
        if let (Some(a), Some(auth)) = (assignment.as_mut(), &self.0.cfg.auth) {
            a.ring_key = auth.key.ring_key(a.job_id, a.generation).to_vec();
        }
        assignment
    }

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
                    let lost = WorkerLost { worker_id: worker.clone(), detail: format!("was lost (its peers lost it; nothing answers at {address})"), cause: LossCause::PeersLostIt as i32 };
                    if let Err(e) = self.propose(command::Kind::WorkerLost(lost), String::new()).await {
                        tracing::debug!(%worker, error = %e.message(), "declaring the worker lost");
                    }
                    break;
                }
            }
        }
    }

}

/// A store error as a status: a refused key or a missing object is final (another replica
/// would answer the same), anything else may pass.
fn store_status(doing: &str, e: shoal_core::store::StoreError) -> Status {
    use shoal_core::store::StoreError;
    match e {
        StoreError::NotFound { .. } => final_status(tonic::Code::NotFound, e.to_string()),
        StoreError::Refused(_) => final_status(tonic::Code::InvalidArgument, e.to_string()),
        e => Status::unavailable(format!("{doing} the store: {e}")),
    }
}
