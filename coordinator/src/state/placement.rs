//! What each worker runs: assignments and the placement rule.

use super::*;

impl StateMachine {
    /// Which assignment `worker` should be running: (job, generation), or for a batch task
    /// (job, attempt); what a heartbeat compares without building the assignment.
    pub fn assignment_key(&self, worker: &str) -> Option<(u64, u64)> {
        let w = self.workers.get(worker)?;
        let job = self.jobs.get(&w.job_id).filter(|j| j.state() == JobState::Running)?;
        if is_batch(job) {
            let b = job.batch.as_ref()?;
            return b.tasks.iter().find_map(|t| t.running.iter().find(|a| a.worker_id == worker)).map(|a| (job.id, a.attempt));
        }
        job.workers.iter().any(|x| x == worker).then_some((job.id, job.generation))
    }

    /// What `worker` should be running now, if anything.
    pub fn assignment(&self, worker: &str) -> Option<Assignment> {
        let w = self.workers.get(worker)?;
        let job = self.jobs.get(&w.job_id)?;
        if job.state() != JobState::Running {
            return None;
        }
        if is_batch(job) {
            return self.batch_assignment(job, worker);
        }
        let rank = job.workers.iter().position(|x| x == worker)?;
        // `[promote]`: the holdout records, and the alias's holder now (rank 0 scores both).
        let (mut holdout, mut holder, mut holder_version) = (None, None, 0);
        let plan = job.plan.as_ref();
        if let (true, Some(promote), Some(register)) = (job.holdout_version > 0 && rank == 0, plan.and_then(|p| p.promote.as_ref()), plan.map(|p| &p.register_name).filter(|n| !n.is_empty())) {
            holdout = self.dataset_view(&promote.holdout_name, job.holdout_version, DatasetView::Shards);
            if let Ok((_, v)) = self.model_version(&format!("{register}@{}", promote.alias)) {
                (holder, holder_version) = (v.checkpoint.clone(), v.version);
            }
        }
        let field = |f: fn(&WorkerInfo) -> &String| job.workers.iter().map(|id| self.workers.get(id).map(|w| f(w).clone()).unwrap_or_default()).collect();
        let (peers, ring_peers, hosts) = (field(|w| &w.address), field(|w| &w.ring_address), field(|w| &w.host_id));
        Some(Assignment {
            job_id: job.id,
            generation: job.generation,
            rank: rank as u32,
            world_size: job.workers.len() as u32,
            peers,
            spec_toml: job.spec_toml.clone(),
            dataset: self.dataset_view(&job.dataset_name, job.dataset_version, DatasetView::Shards),
            checkpoints: job.checkpoints.iter().rev().cloned().collect(),
            ring_peers,
            hosts,
            carry_state: job.membership.last().is_some_and(|m| carries_state(m.kind())),
            init: job.init.clone(),
            new_from: job.new_from,
            holdout,
            holder,
            holder_version,
            ..Default::default()
        })
    }

    /// The scheduler's next decision: the oldest queued job that the idle workers can hold,
    /// and which workers (lowest ids first, so every leader decides alike). A job that needs
    /// more workers than are idle does not hold back the smaller ones queued after it. Only
    /// workers for which `eligible` says yes (the leader's: heard from lately) are placed.
    pub fn next_placement(&self, eligible: impl Fn(&str) -> bool) -> Option<(u64, u64, Vec<String>)> {
        let mut idle: Vec<&WorkerInfo> = self.workers.values().filter(|w| w.state() == WorkerState::Idle && eligible(&w.id)).collect();
        idle.sort_by_key(|w| (w.id.len(), w.id.clone()));
        let job = self.jobs.values().find(|j| j.state() == JobState::Queued && !is_batch(j) && pool_range(j).0 as usize <= idle.len())?;
        // As many as are idle, up to the job's maximum.
        let n = idle.len().min(pool_range(job).1 as usize);
        let chosen = idle[..n].iter().map(|w| w.id.clone()).collect();
        Some((job.id, job.generation + 1, chosen))
    }
}

/// The sizes a job's next generation may have: `[cluster] min_workers ..= max_workers`
/// (jobs from before the range existed: exactly their world size).
pub(super) fn pool_range(job: &JobInfo) -> (u32, u32) {
    if job.min_workers == 0 {
        (job.world_size, job.world_size)
    } else {
        (job.min_workers, job.max_workers.max(job.min_workers))
    }
}
