//! Training jobs: submission, generations, outcomes, requeue and resume.

use super::*;
use shoal_proto::JobEvent;

impl StateMachine {
    /// Whether a job whose ranks all reported success really succeeded: they hold the same
    /// parameters, and its final checkpoint (its model) is committed.
    pub(super) fn verdict(job: &JobInfo) -> Result<(), String> {
        if let Some(odd) = job.results.iter().find(|r| r.param_blake3 != job.results[0].param_blake3) {
            return Err(format!(
                "ranks hold different parameters: rank 0 has blake3 {}, rank {} has {}",
                job.results[0].param_blake3, odd.rank, odd.param_blake3
            ));
        }
        let total = job.plan.as_ref().map(|p| p.total_steps).unwrap_or_default();
        match job.checkpoints.last() {
            Some(c) if c.step == total => Ok(()),
            _ => Err(format!("the final checkpoint (step {total}) was not committed")),
        }
    }

    /// Puts a running job back in the queue; it continues from its last committed
    /// checkpoint in its next generation. Its other workers go back to idle.
    pub(super) fn requeue(&mut self, id: u64, cause: String, kind: GenerationCause) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if job.state() != JobState::Running {
            return;
        }
        job.state = JobState::Queued as i32;
        job.set_next_generation_cause(kind);
        job.peer_failures.clear();
        job.restarts += 1;
        // Survivors of a change of workers carry the state in memory; the checkpoint is the
        // fallback when none of the next generation's ranks holds it.
        job.restart_cause = match job.checkpoints.last() {
            Some(c) => format!("{cause}; continuing from the workers' memory, else from checkpoint step {}", c.step),
            None => format!("{cause}; continuing from the workers' memory, else from step 0 (no checkpoint yet)"),
        };
        job.results.clear();
        let workers = std::mem::take(&mut job.workers);
        self.release_workers(id, &workers);
    }

    /// Parses a spec and checks it against the registered datasets.
    pub fn check_submission(&self, toml: &str) -> Result<(JobSpec, DatasetInfo), ApplyError> {
        let mut spec = JobSpec::parse(toml).map_err(ApplyError::invalid)?;
        let ds = self.dataset(&spec.dataset.name, spec.dataset.version.unwrap_or(0)).ok_or_else(|| match spec.dataset.version {
            Some(v) if self.datasets.contains_key(&spec.dataset.name) => {
                ApplyError::invalid(format!("dataset.version: dataset {:?} has no version {v}", spec.dataset.name))
            }
            _ => ApplyError::invalid(format!("dataset.name: dataset {:?} does not exist", spec.dataset.name)),
        })?;
        let check = |key: &str, [a, b]: [u64; 2]| {
            if b > ds.records {
                Err(ApplyError::invalid(format!("dataset.{key}: range [{a}, {b}) exceeds the {} records of {} v{}", ds.records, ds.name, ds.version)))
            } else {
                Ok(())
            }
        };
        if let Some(t) = spec.dataset.train {
            check("train", t)?;
        }
        if let Some(t) = spec.dataset.test {
            check("test", t)?;
        }
        // A default `train` is every record of the pinned version outside `test`.
        spec.pin_records(ds.records);
        if spec.train_len(None) < spec.training.batch_size as u64 {
            return Err(ApplyError::invalid(format!(
                "training.batch_size: {} is more than the {} training records of {} v{}",
                spec.training.batch_size,
                spec.train_len(None),
                ds.name,
                ds.version
            )));
        }
        // The model's shapes against the records' (an error names the layer), then the limits.
        let head = shoal_core::model::Head::of(spec.loss(), ds.classes as u64, ds.target_width as u64, ds.context as u64).map_err(ApplyError::invalid)?;
        shoal_core::limits::check_job(&spec, &ds.feature_shape, head)?;
        self.check_missing(&spec, &ds.name, ds.version)?;
        Ok((spec, ds))
    }

    /// Missing values (empty CSV cells) would train as NaN: the data error is named at
    /// submission, rather than as a divergence at step 1, unless the spec says how to fill
    /// them (the mean needs the version's statistics).
    fn check_missing(&self, spec: &JobSpec, name: &str, version: u64) -> Result<(), ApplyError> {
        let stats = self.dataset_view(name, version, DatasetView::Shards).and_then(|d| d.stats);
        match (spec.dataset.fill_missing, stats.as_ref().and_then(shoal_core::stats::first_missing)) {
            (None, Some((feature, n))) => Err(ApplyError::invalid(format!(
                "dataset.fill_missing: {name} v{version} has {n} missing values in feature {feature} (and maybe others): say how to fill them, `fill_missing = \"mean\"` or a number"
            ))),
            (Some(shoal_core::spec::FillMissing::Mean), _) if stats.is_none() => {
                Err(ApplyError::invalid(format!("dataset.fill_missing: \"mean\" needs the statistics of {name} v{version}, which it has none of; give a number")))
            }
            _ => Ok(()),
        }
    }
    /// Queues a job (its spec checked against the state as it is at this index).
    pub(super) fn submit(&mut self, toml: String) -> Result<JobInfo, ApplyError> {
        if shoal_core::batch::is_batch(&toml).map_err(ApplyError::invalid)? {
            let mut job = self.submit_batch(&toml)?;
            job.plan = Some(plan_of(&job));
            job.submitted_unix_ms = self.now_ms;
            self.jobs.insert(job.id, job.clone());
            return Ok(job);
        }
        let (spec, ds) = self.check_submission(&toml)?;
        let dataset_version = ds.version;
        let holdout_version = match &spec.promote {
            Some(p) => {
                let (name, version) = p.holdout_ref().map_err(|e| e.to_string())?;
                let h = self.dataset(&name, version.unwrap_or(0)).ok_or_else(|| ApplyError::invalid(format!("promote.holdout: there is no dataset {}", p.holdout)))?;
                if h.feature_shape != ds.feature_shape || h.classes > ds.classes || h.target_width != ds.target_width {
                    return Err(format!(
                        "promote.holdout: {} has features {:?}, {} classes and {} targets per record; the job's dataset {:?}, {} and {}",
                        p.holdout, h.feature_shape, h.classes, h.target_width, ds.feature_shape, ds.classes, ds.target_width
                    )
                    .into());
                }
                self.check_missing(&spec, &h.name, h.version)?;
                h.version
            }
            None => 0,
        };
        let (init, new_from) = self.warm_start(&spec)?;
        let total_steps = spec.total_steps_from(new_from);
        if total_steps == 0 {
            return Err(format!(
                "dataset.slices: the {} records to train are fewer than one batch ({})",
                spec.train_len(new_from),
                spec.training.batch_size
            ).into());
        }
        self.next_job += 1;
        let job = JobInfo {
            id: self.next_job,
            name: spec.name.clone(),
            spec_toml: toml,
            state: JobState::Queued as i32,
            generation: 0,
            workers: vec![],
            progress: Some(JobProgress { total_steps, test_accuracy: -1.0, ..Default::default() }),
            error: String::new(),
            results: vec![],
            dataset_version,
            world_size: spec.cluster.workers,
            dataset_name: spec.dataset.name.clone(),
            min_workers: spec.cluster.min(),
            max_workers: spec.cluster.max(),
            init,
            new_from,
            holdout_version,
            plan: Some(plan_for(&spec, total_steps)),
            submitted_unix_ms: self.now_ms,
            group: spec.group.clone().unwrap_or_default(),
            tags: spec.tags.clone(),
            ..Default::default()
        };
        self.jobs.insert(job.id, job.clone());
        Ok(job)
    }

    /// `[init]`: the checkpoint to start from (a job that succeeded: its final checkpoint, or
    /// the committed one at the step named), and with `slices = "new"` the first record the
    /// model did not see (the record count of the dataset version it trained on, which must
    /// be a version of this job's dataset).
    pub(super) fn warm_start(&self, spec: &JobSpec) -> Result<(Option<shoal_proto::CheckpointManifest>, Option<u64>), ApplyError> {
        let model = spec.init.as_ref().and_then(|i| i.model.clone());
        let (id, step) = match (spec.init_checkpoint().map_err(|e| e.to_string())?, model) {
            (Some(c), _) => c,
            (None, Some(m)) => {
                let (_, v) = self.model_version(&m).map_err(|e| format!("init.model: {e}"))?;
                (v.job_id, v.checkpoint.as_ref().map(|c| c.step))
            }
            (None, None) => return Ok((None, None)),
        };
        let from = self.jobs.get(&id).ok_or_else(|| ApplyError::invalid(format!("init.checkpoint: there is no job {id}")))?;
        if from.state() != JobState::Succeeded {
            return Err(format!("init.checkpoint: job {id} is {}; warm starts come from jobs that succeeded", from.state().label()).into());
        }
        let m = match step {
            None => from.checkpoints.last(),
            Some(s) => from.checkpoints.iter().find(|c| c.step == s),
        };
        let kept: Vec<u64> = from.checkpoints.iter().map(|c| c.step).collect();
        let m = m.ok_or_else(|| format!("init.checkpoint: job {id} keeps no checkpoint at step {} (it keeps {kept:?})", step.unwrap_or_default()))?;
        let new_from = if spec.dataset.slices.as_deref() == Some("new") {
            if from.dataset_name != spec.dataset.name {
                return Err(format!("dataset.slices: \"new\" counts from the version job {id} trained on, but it trained on {:?}, not {:?}", from.dataset_name, spec.dataset.name).into());
            }
            let seen = self.dataset(&from.dataset_name, from.dataset_version).ok_or_else(|| format!("dataset {} v{} is gone", from.dataset_name, from.dataset_version))?;
            Some(seen.records)
        } else {
            None
        };
        Ok((Some(m.clone()), new_from))
    }

    pub(super) fn running_job(&mut self, id: u64, generation: u64) -> Result<&mut JobInfo, ApplyError> {
        let job = self.jobs.get_mut(&id).ok_or_else(|| ApplyError::not_found(format!("unknown job {id}")))?;
        if job.state() != JobState::Running || job.generation != generation || is_batch(job) {
            return Err(format!("job {id} generation {generation} is not running").into());
        }
        Ok(job)
    }

    pub(super) fn finish_job(&mut self, id: u64, state: JobState, error: String) {
        let now = self.now_ms;
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let event = match state {
            JobState::Succeeded => Some("succeeded"),
            JobState::Failed if error.contains("diverged") => Some("diverged"),
            JobState::Failed => Some("failed"),
            _ => None,
        };
        if let Some(event) = event.filter(|_| notifies(job)) {
            let step = job.progress.as_ref().map(|p| p.step).unwrap_or(0).max(job.checkpoints.last().map(|c| c.step).unwrap_or(0));
            push_event(job, JobEvent { event_id: format!("job-{id}-{event}-g{}", job.generation), event: event.into(), generation: job.generation, step, unix_ms: now, error: error.clone(), delivered: false });
        }
        job.state = state as i32;
        job.error = error;
        job.finished_unix_ms = now;
        // The step never trails the last committed checkpoint (progress is replicated only
        // now and then; the checkpoint's commit is exact).
        if let (Some(p), Some(c)) = (job.progress.as_mut(), job.checkpoints.last()) {
            p.step = p.step.max(c.step);
        }
        // A batch job's attempts still running stop with it; their tasks never finished.
        for t in job.batch.iter_mut().flat_map(|b| &mut b.tasks) {
            if !t.running.is_empty() {
                t.running.clear();
                t.state = batch::PENDING.into();
            }
        }
        if !job.pipeline_run.is_empty() {
            self.ended_pipeline_jobs.push(id);
        }
        let workers = job.workers.clone();
        self.release_workers(id, &workers);
    }

    /// The leader saw no step for `[notify] stall_s`: a `stalled` event, once per (generation,
    /// step).
    pub(super) fn job_stalled(&mut self, s: shoal_proto::JobStalled) -> ApplyResult {
        let now = self.now_ms;
        let job = self.running_job(s.job_id, s.generation)?;
        if notifies(job) {
            let event_id = format!("job-{}-stalled-g{}-s{}", s.job_id, s.generation, s.step);
            if !job.events.iter().any(|e| e.event_id == event_id) {
                push_event(job, JobEvent { event_id, event: "stalled".into(), generation: s.generation, step: s.step, unix_ms: now, error: String::new(), delivered: false });
            }
        }
        Ok(ApplyOutput::None)
    }

    pub(super) fn event_delivered(&mut self, d: shoal_proto::EventDelivered) -> ApplyResult {
        if let Some(e) = self.jobs.get_mut(&d.job_id).and_then(|j| j.events.iter_mut().find(|e| e.event_id == d.event_id)) {
            e.delivered = true;
        }
        Ok(ApplyOutput::None)
    }

    pub(super) fn release_workers(&mut self, job: u64, workers: &[String]) {
        for w in workers {
            if let Some(info) = self.workers.get_mut(w) {
                if info.job_id == job && info.state() == WorkerState::Busy {
                    info.state = WorkerState::Idle as i32;
                    info.job_id = 0;
                }
            }
        }
    }

    pub fn job(&self, id: u64) -> Option<&JobInfo> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &JobInfo> {
        self.jobs.values()
    }
}

/// Whether a generation begun for `cause` continues from the state its workers hold in
/// memory (a change of workers), rather than from a checkpoint (a start or a resume).
pub(super) fn carries_state(cause: GenerationCause) -> bool {
    matches!(cause, GenerationCause::Lost | GenerationCause::Removed | GenerationCause::Joined)
}

/// How a generation's cause shows in its membership record (and `job status`).
pub(super) fn cause_label(cause: GenerationCause) -> &'static str {
    match cause {
        GenerationCause::Start => "start",
        GenerationCause::Lost => "lost",
        GenerationCause::Removed => "removed",
        GenerationCause::Joined => "joined",
        GenerationCause::Resumed => "resumed",
    }
}

/// What the coordinator keeps of a training spec (see `JobPlan`).
fn plan_for(spec: &JobSpec, total_steps: u64) -> JobPlan {
    JobPlan {
        total_steps,
        checkpoint_keep: spec.checkpoint.keep.max(1),
        batch_size: spec.training.batch_size,
        lanes: spec.training.lanes.unwrap_or(0),
        register_name: spec.register.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
        promote: spec.promote.as_ref().map(|p| shoal_proto::PromotePlan {
            alias: p.alias.clone(),
            min_delta: p.min_delta,
            holdout_name: p.holdout_ref().map(|(n, _)| n).unwrap_or_default(),
            metric: p.metric.clone(),
        }),
        trigger_on_append: spec.trigger.as_ref().map(|t| t.on_append.clone()).unwrap_or_default(),
        batch_method: String::new(),
    }
}

/// A job's plan from its spec (jobs submitted before plans were kept, and batch jobs).
pub(super) fn plan_of(job: &JobInfo) -> JobPlan {
    if is_batch(job) {
        let method = shoal_core::batch::BatchSpec::parse(&job.spec_toml).ok().and_then(|s| s.operator.method).unwrap_or_else(|| "standardize".into());
        return JobPlan { batch_method: method, ..Default::default() };
    }
    match JobSpec::parse(&job.spec_toml) {
        Ok(spec) => plan_for(&spec, spec.total_steps_from(job.new_from)),
        Err(_) => JobPlan::default(),
    }
}

/// Restarts after which a job whose workers keep losing each other fails instead.
pub(super) const MAX_RESTARTS: u32 = 16;

impl StateMachine {
    pub(super) fn job_assigned(&mut self, a: shoal_proto::JobAssigned) -> ApplyResult {
        let job = self.jobs.get(&a.job_id).ok_or_else(|| ApplyError::not_found(format!("unknown job {}", a.job_id)))?;
        if job.state() != JobState::Queued {
            return Err(ApplyError::conflict(format!("job {} is {}, not queued", a.job_id, job.state().label())));
        }
        let (min, max) = pool_range(job);
        if a.generation != job.generation + 1 || !(min as usize..=max as usize).contains(&a.workers.len()) {
            return Err(ApplyError::conflict(format!("stale assignment for job {}", a.job_id)));
        }
        for (i, w) in a.workers.iter().enumerate() {
            if a.workers[..i].contains(w) {
                return Err(ApplyError::invalid(format!("worker {w} assigned twice")));
            }
            match self.workers.get(w) {
                Some(info) if info.state() == WorkerState::Idle => {}
                _ => return Err(ApplyError::conflict(format!("worker {w} is not idle"))),
            }
        }
        for w in &a.workers {
            let info = self.workers.get_mut(w).expect("checked above");
            info.state = WorkerState::Busy as i32;
            info.job_id = a.job_id;
        }
        let last_step = a.last_step;
        let job = self.jobs.get_mut(&a.job_id).expect("checked above");
        job.state = JobState::Running as i32;
        job.generation = a.generation;
        job.world_size = a.workers.len() as u32;
        job.peer_failures.clear();
        job.workers = a.workers;
        let cause = job.next_generation_cause();
        job.set_next_generation_cause(GenerationCause::Start);
        // Where the new generation starts, until its rank 0 says: after a change of
        // workers, where the last one got to (the workers carry the state over);
        // otherwise the newest checkpoint.
        let checkpoint = job.checkpoints.last().map(|c| c.step).unwrap_or(0);
        let start = match (&job.progress, carries_state(cause)) {
            (Some(p), true) => p.step.max(last_step).max(checkpoint),
            _ => checkpoint,
        };
        if let Some(p) = job.progress.as_mut() {
            p.step = start;
            p.resumed_from = None;
            p.continued_from = None;
        }
        // Bounded: a job that restarts forever keeps its latest changes.
        if job.membership.len() >= 256 {
            job.membership.remove(0);
        }
        job.membership.push(MembershipChange {
            generation: job.generation,
            step: start,
            workers: job.workers.clone(),
            cause: cause_label(cause).into(),
            kind: cause as i32,
            detail: if job.restarts == 0 { String::new() } else { job.restart_cause.clone() },
        });
        Ok(ApplyOutput::Job(Box::new(job.clone())))
    }

    pub(super) fn update_progress(&mut self, u: shoal_proto::UpdateProgress) -> ApplyResult {
        let job = self.running_job(u.job_id, u.generation)?;
        let Some(p) = u.progress else { return Ok(ApplyOutput::None) };
        if job.results.iter().any(|r| r.rank == 0) {
            // Rank 0's outcome carried its final progress (the gate's scores with it): a
            // periodic report of the same step flushed after it must not overwrite it.
            return Ok(ApplyOutput::None);
        }
        let current = job.progress.as_ref().map(|c| c.step).unwrap_or(0);
        if job.progress_generation == u.generation && p.step < current {
            // An older report that arrived late.
            return Ok(ApplyOutput::None);
        }
        // Rank 0 says where this generation really started: in memory or from a
        // checkpoint (the assignment could only guess).
        let started = p.continued_from.or(p.resumed_from);
        if let (Some(step), Some(m)) = (started, job.membership.last_mut()) {
            if m.generation == u.generation {
                m.step = step;
            }
        }
        job.progress_generation = u.generation;
        job.progress = Some(p);
        Ok(ApplyOutput::None)
    }

    pub(super) fn rank_outcome(&mut self, index: u64, r: shoal_proto::OutcomeReport) -> ApplyResult {
        let job = self.running_job(r.job_id, r.generation)?;
        let Some(rank) = job.workers.iter().position(|w| *w == r.worker_id) else {
            return Err(ApplyError::conflict(format!("worker {} is not part of job {}", r.worker_id, r.job_id)));
        };
        if !r.ok && r.peer_failure {
            // Not this rank's failure: a peer is gone. The leader probes the job's
            // workers and declares the dead ones lost (which requeues the job). If every
            // rank says so, nobody can tell who died: back to the last checkpoint.
            let rank = rank as u32;
            if !job.peer_failures.contains(&rank) {
                job.peer_failures.push(rank);
            }
            if job.peer_failures.len() == job.workers.len() {
                let id = job.id;
                if job.restarts >= MAX_RESTARTS {
                    let msg = format!("every worker lost its peers, and the job has restarted {} times: giving up ({})", job.restarts, r.error);
                    self.finish_job(id, JobState::Failed, msg);
                } else {
                    self.requeue(id, format!("every worker lost its peers ({})", r.error), GenerationCause::Lost);
                }
            }
            return Ok(ApplyOutput::None);
        }
        if !r.ok {
            // A divergence names its step, tensor and rank itself; it is the job's error.
            let msg = if r.diverged { r.error.clone() } else { format!("rank {rank} ({}) failed: {}", r.worker_id, r.error) };
            self.finish_job(r.job_id, JobState::Failed, msg);
            return Ok(ApplyOutput::None);
        }
        let mut result = r.result.unwrap_or_default();
        result.rank = rank as u32;
        result.worker_id = r.worker_id.clone();
        if job.results.iter().any(|x| x.rank == result.rank) {
            return Err(ApplyError::conflict(format!("rank {rank} of job {} already reported", r.job_id)));
        }
        if rank == 0 {
            if let Some(p) = r.progress {
                job.progress = Some(p);
            }
        }
        job.results.push(result);
        job.results.sort_by_key(|x: &RankResult| x.rank);
        if job.results.len() == job.workers.len() {
            let (id, verdict) = (job.id, Self::verdict(job));
            match verdict {
                Ok(()) => {
                    self.finish_job(id, JobState::Succeeded, String::new());
                    self.register_on_success(index, id);
                }
                Err(e) => self.finish_job(id, JobState::Failed, e),
            }
        }
        Ok(ApplyOutput::None)
    }

    pub(super) fn cancel_job(&mut self, id: u64) -> ApplyResult {
        let job = self.jobs.get(&id).ok_or_else(|| ApplyError::not_found(format!("job {id} does not exist")))?;
        if job.state().is_terminal() {
            return Err(ApplyError::conflict(format!("job {id} already {}", job.state().label())));
        }
        self.finish_job(id, JobState::Cancelled, String::new());
        Ok(ApplyOutput::Job(Box::new(self.jobs[&id].clone())))
    }

    pub(super) fn resume_job(&mut self, r: shoal_proto::ResumeJobRequest) -> ApplyResult {
        let job = self.jobs.get_mut(&r.id).ok_or_else(|| ApplyError::not_found(format!("job {} does not exist", r.id)))?;
        if is_batch(job) {
            return Err(ApplyError::conflict(format!("job {} is a batch job: submit its spec again (its committed output, if any, is in place)", r.id)));
        }
        match job.state() {
            JobState::Failed | JobState::Cancelled => {}
            JobState::Succeeded => return Err(ApplyError::conflict(format!("job {} already succeeded: there is nothing to resume", r.id))),
            other => return Err(ApplyError::conflict(format!("job {} is {}: only a failed or cancelled job can be resumed", r.id, other.label()))),
        }
        if r.workers != 0 {
            // A request by a person, rare: the spec is parsed again for its rules.
            let spec = JobSpec::parse(&job.spec_toml).map_err(ApplyError::invalid)?;
            spec.check_world_size(r.workers).map_err(|e| ApplyError::invalid(format!("--workers {}: {e}", r.workers)))?;
            // Asked for by name: this many, no range.
            job.world_size = r.workers;
            job.min_workers = r.workers;
            job.max_workers = r.workers;
        }
        job.state = JobState::Queued as i32;
        job.error.clear();
        job.results.clear();
        job.workers.clear();
        job.restarts += 1;
        job.finished_unix_ms = 0;
        job.set_next_generation_cause(GenerationCause::Resumed);
        job.restart_cause = match job.checkpoints.last() {
            Some(c) => format!("resumed by request from checkpoint step {}", c.step),
            None => "resumed by request; no checkpoint, so from step 0".into(),
        };
        Ok(ApplyOutput::Job(Box::new(job.clone())))
    }

    /// Finished jobs that retention removes at `now_ms`, and how many past it are pinned: a
    /// finished job goes once it is neither among the `keep_jobs` newest finished jobs nor
    /// finished within `keep_days`, unless a model version, a template's firing or another
    /// job's warm start refers to it.
    pub fn prunable_jobs(&self, now_ms: u64) -> (Vec<u64>, u32) {
        let s = self.settings();
        let mut finished: Vec<(u64, u64)> = self.jobs.values().filter(|j| j.state().is_terminal()).map(|j| (j.finished_unix_ms, j.id)).collect();
        if finished.len() <= s.keep_jobs as usize {
            return (Vec::new(), 0);
        }
        finished.sort_unstable();
        let window = u64::from(s.keep_days) * 86_400_000;
        let old = &finished[..finished.len() - s.keep_jobs as usize];
        let candidates: Vec<u64> = old.iter().filter(|(t, _)| now_ms.saturating_sub(*t) >= window).map(|(_, id)| *id).collect();
        if candidates.is_empty() {
            return (Vec::new(), 0);
        }
        let mut pinned: BTreeSet<u64> = BTreeSet::new();
        for m in self.models.values() {
            pinned.extend(m.versions.iter().flat_map(|v| [v.job_id, v.checkpoint.as_ref().map(|c| c.job_id).unwrap_or(0)]));
        }
        for t in self.templates.values() {
            pinned.extend(t.firings.iter().map(|f| f.job_id));
        }
        pinned.extend(self.jobs.values().filter_map(|j| j.init.as_ref().map(|i| i.job_id)));
        let (kept, removed): (Vec<u64>, Vec<u64>) = candidates.into_iter().partition(|id| pinned.contains(id));
        (removed, kept.len() as u32)
    }

    /// Retention at the command's time: the jobs go from the state, and their files from the
    /// store once the shell sees this entry applied (never before the removal commits).
    pub(super) fn prune_jobs(&mut self) -> ApplyOutput {
        let (removed, pinned) = self.prunable_jobs(self.now_ms);
        for id in &removed {
            self.jobs.remove(id);
        }
        if !removed.is_empty() {
            self.effects.push(Effect::RemoveJobFiles(removed.clone()));
        }
        ApplyOutput::Pruned { jobs: removed, pinned }
    }

    /// The highest job id ever given (a job folder of a higher id may be a job being made).
    pub fn last_job_id(&self) -> u64 {
        self.next_job
    }

    /// One page of the jobs, newest first, and the next page's token.
    /// A page of jobs, newest first; with `group`, of that group's jobs only.
    pub fn jobs_page(&self, page: usize, group: &str) -> (Vec<&JobInfo>, String) {
        if !group.is_empty() {
            let matching: Vec<&JobInfo> = self.jobs.values().filter(|j| j.group == group).collect();
            let (range, next) = page_range(matching.len(), page);
            return (matching[range].iter().rev().copied().collect(), next);
        }
        let (range, next) = page_range(self.jobs.len(), page);
        // Pages count from the newest: skip `range.start` from the oldest end.
        let list = self.jobs.values().skip(range.start).take(range.len()).rev().collect();
        (list, next)
    }
}

/// Events a job keeps at most (the oldest delivered ones go first).
const MAX_EVENTS: usize = 64;

/// Whether the job's spec has a `[notify]` webhook.
pub(super) fn notifies(job: &JobInfo) -> bool {
    shoal_core::JobSpec::parse(&job.spec_toml).is_ok_and(|s| s.notify.is_some())
}

fn push_event(job: &mut JobInfo, e: JobEvent) {
    if job.events.len() >= MAX_EVENTS {
        if let Some(i) = job.events.iter().position(|e| e.delivered) {
            job.events.remove(i);
        } else {
            return;
        }
    }
    job.events.push(e);
}
