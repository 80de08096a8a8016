//! Checkpoints: a written checkpoint becomes a job's resume point only once committed here.

use super::*;

/// Chunks a job's metric history may index: 100,000 chunks of up to 4,096 points. Past it,
/// points count as dropped (the log holds one small entry per chunk, never per point).
pub const MAX_METRIC_CHUNKS: usize = 100_000;

impl StateMachine {
    pub(super) fn checkpoint_committed(&mut self, c: shoal_proto::CheckpointCommit) -> ApplyResult {
        let manifest = c.manifest.ok_or_else(|| ApplyError::invalid("checkpoint commit without a manifest"))?;
        let job = self.running_job(c.job_id, c.generation)?;
        shoal_core::checkpoint::validate_manifest(&manifest, c.job_id).map_err(ApplyError::invalid)?;
        let plan = job.plan.clone().unwrap_or_default();
        let total = plan.total_steps;
        if manifest.step == 0 || manifest.step > total {
            return Err(ApplyError::invalid(format!("checkpoint step {} is outside job {}'s 1..={total} steps", manifest.step, c.job_id)));
        }
        job.checkpoints.retain(|m| m.step != manifest.step);
        let at = job.checkpoints.partition_point(|m| m.step < manifest.step);
        job.checkpoints.insert(at, manifest);
        let keep = plan.checkpoint_keep.max(1) as usize;
        if job.checkpoints.len() > keep {
            let extra = job.checkpoints.len() - keep;
            job.checkpoints.drain(..extra);
        }
        let step = job.checkpoints.last().map(|m| m.step).unwrap_or(0);
        // The last good step of a divergence: the job fails next, nothing restarts it.
        let diverged = job.checkpoints.last().is_some_and(|m| m.diverged_at > 0);
        // The step shown never trails the newest committed checkpoint.
        if let Some(p) = job.progress.as_mut() {
            p.step = p.step.max(step);
        }
        let out = job.clone();
        let (id, size, max) = (job.id, job.workers.len(), pool_range(job).1 as usize);
        // Grow toward max_workers at a checkpoint (nothing to redo), when a worker is
        // idle and no queued job is waiting for one.
        let idle = self.workers.values().any(|w| w.state() == WorkerState::Idle);
        let waiting = self.jobs.values().any(|j| j.state() == JobState::Queued && !is_batch(j)) || self.batch_wants_workers();
        if size < max && step < total && idle && !waiting && !diverged {
            self.requeue(id, format!("a free worker can join the {size} running"), GenerationCause::Joined);
        }
        Ok(ApplyOutput::Job(Box::new(out)))
    }

    /// A chunk of the job's metric history, from any generation of it (a generation that
    /// ended still reports the steps it applied); the same file twice is recorded once.
    pub(super) fn metric_chunk(&mut self, r: shoal_proto::MetricChunkReport) -> ApplyResult {
        let job = self.jobs.get_mut(&r.job_id).ok_or_else(|| ApplyError::not_found(format!("there is no job {}", r.job_id)))?;
        let Some(chunk) = r.chunk else { return Err(ApplyError::invalid("a metric chunk report without a chunk")) };
        let dir = format!("jobs/{}/metrics/", r.job_id);
        if !chunk.path.starts_with(&dir) || chunk.path.contains("..") || chunk.path[dir.len()..].contains('/') {
            return Err(ApplyError::invalid(format!("metric chunk path {:?} is not a file under {dir}", chunk.path)));
        }
        job.metrics_dropped = job.metrics_dropped.saturating_add(r.dropped);
        if job.metric_chunks.len() >= MAX_METRIC_CHUNKS {
            job.metrics_dropped = job.metrics_dropped.saturating_add(u64::from(chunk.points));
        } else if !job.metric_chunks.iter().any(|c| c.path == chunk.path) {
            job.metric_chunks.push(chunk);
        }
        Ok(ApplyOutput::None)
    }

    pub(super) fn checkpoint_failed(&mut self, f: shoal_proto::CheckpointError) -> ApplyResult {
        let job = self.running_job(f.job_id, f.generation)?;
        job.checkpoint_error = format!("checkpoint step {}: {}", f.step, f.message);
        if f.corrupt {
            job.checkpoints.retain(|m| m.step != f.step);
        }
        Ok(ApplyOutput::None)
    }
}
