//! Training jobs: submission, generations, outcomes, requeue and resume.

use super::*;

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
        let total = JobSpec::parse(&job.spec_toml).map(|s| s.total_steps_from(job.new_from)).map_err(|e| e.to_string())?;
        match job.checkpoints.last() {
            Some(c) if c.step == total => Ok(()),
            _ => Err(format!("the final checkpoint (step {total}) was not committed")),
        }
    }

    /// Puts a running job back in the queue; it continues from its last committed
    /// checkpoint in its next generation. Its other workers go back to idle.
    pub(super) fn requeue(&mut self, id: u64, cause: String, kind: &str) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if job.state() != JobState::Running {
            return;
        }
        job.state = JobState::Queued as i32;
        job.next_cause = kind.to_string();
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
        shoal_core::limits::check_job(&spec, &ds.feature_shape, ds.classes as u64)?;
        Ok((spec, ds))
    }
    /// Queues a job (its spec checked against the state as it is at this index).
    pub(super) fn submit(&mut self, toml: String) -> Result<JobInfo, String> {
        if shoal_core::batch::is_batch(&toml).map_err(|e| e.to_string())? {
            return self.submit_batch(&toml);
        }
        let (spec, ds) = self.check_submission(&toml)?;
        let dataset_version = ds.version;
        let holdout_version = match &spec.promote {
            Some(p) => {
                let (name, version) = p.holdout_ref().map_err(|e| e.to_string())?;
                let h = self.dataset(&name, version.unwrap_or(0)).ok_or_else(|| format!("promote.holdout: there is no dataset {}", p.holdout))?;
                if h.feature_shape != ds.feature_shape || h.classes > ds.classes {
                    return Err(format!("promote.holdout: {} has features {:?} and {} classes; the job's dataset {:?} and {}", p.holdout, h.feature_shape, h.classes, ds.feature_shape, ds.classes));
                }
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
            ));
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
            ..Default::default()
        };
        self.jobs.insert(job.id, job.clone());
        Ok(job)
    }

    /// `[init]`: the checkpoint to start from (a job that succeeded: its final checkpoint, or
    /// the committed one at the step named), and with `slices = "new"` the first record the
    /// model did not see (the record count of the dataset version it trained on, which must
    /// be a version of this job's dataset).
    pub(super) fn warm_start(&self, spec: &JobSpec) -> Result<(Option<shoal_proto::CheckpointManifest>, Option<u64>), String> {
        let model = spec.init.as_ref().and_then(|i| i.model.clone());
        let (id, step) = match (spec.init_checkpoint().map_err(|e| e.to_string())?, model) {
            (Some(c), _) => c,
            (None, Some(m)) => {
                let (_, v) = self.model_version(&m).map_err(|e| format!("init.model: {e}"))?;
                (v.job_id, v.checkpoint.as_ref().map(|c| c.step))
            }
            (None, None) => return Ok((None, None)),
        };
        let from = self.jobs.get(&id).ok_or_else(|| format!("init.checkpoint: there is no job {id}"))?;
        if from.state() != JobState::Succeeded {
            return Err(format!("init.checkpoint: job {id} is {}; warm starts come from jobs that succeeded", from.state().label()));
        }
        let m = match step {
            None => from.checkpoints.last(),
            Some(s) => from.checkpoints.iter().find(|c| c.step == s),
        };
        let kept: Vec<u64> = from.checkpoints.iter().map(|c| c.step).collect();
        let m = m.ok_or_else(|| format!("init.checkpoint: job {id} keeps no checkpoint at step {} (it keeps {kept:?})", step.unwrap_or_default()))?;
        let new_from = if spec.dataset.slices.as_deref() == Some("new") {
            if from.dataset_name != spec.dataset.name {
                return Err(format!("dataset.slices: \"new\" counts from the version job {id} trained on, but it trained on {:?}, not {:?}", from.dataset_name, spec.dataset.name));
            }
            let seen = self.dataset(&from.dataset_name, from.dataset_version).ok_or_else(|| format!("dataset {} v{} is gone", from.dataset_name, from.dataset_version))?;
            Some(seen.records)
        } else {
            None
        };
        Ok((Some(m.clone()), new_from))
    }

    pub(super) fn running_job(&mut self, id: u64, generation: u64) -> Result<&mut JobInfo, String> {
        let job = self.jobs.get_mut(&id).ok_or_else(|| format!("unknown job {id}"))?;
        if job.state() != JobState::Running || job.generation != generation || is_batch(job) {
            return Err(format!("job {id} generation {generation} is not running"));
        }
        Ok(job)
    }

    pub(super) fn finish_job(&mut self, id: u64, state: JobState, error: String) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        job.state = state as i32;
        job.error = error;
        // A batch job's attempts still running stop with it; their tasks never finished.
        for t in job.batch.iter_mut().flat_map(|b| &mut b.tasks) {
            if !t.running.is_empty() {
                t.running.clear();
                t.state = batch::PENDING.into();
            }
        }
        let workers = job.workers.clone();
        self.release_workers(id, &workers);
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
pub(super) fn carries_state(cause: &str) -> bool {
    matches!(cause, "lost" | "removed" | "joined")
}

/// Restarts after which a job whose workers keep losing each other fails instead.
pub(super) const MAX_RESTARTS: u32 = 16;
