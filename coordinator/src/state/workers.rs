//! Workers: registration, loss (with its cause), and forgetting the lost a lease later.

use super::*;
use shoal_proto::{ForgetWorkers, LossCause, RegisterWorkerRequest, WorkerLost};

impl StateMachine {
    pub(super) fn register_worker(&mut self, req: RegisterWorkerRequest) -> ApplyResult {
        self.next_worker += 1;
        let id = format!("w{}", self.next_worker);
        self.workers.insert(
            id.clone(),
            WorkerInfo {
                id: id.clone(),
                address: req.address,
                state: WorkerState::Idle as i32,
                job_id: 0,
                pid: req.pid,
                device: req.device,
                ring_address: req.ring_address,
                host_id: req.host_id,
                lost_unix_ms: 0,
            },
        );
        // A new worker can join a running job below its maximum right away (its state
        // comes from a peer), unless a queued job is waiting for a worker.
        let waiting = self.jobs.values().any(|j| j.state() == JobState::Queued && !is_batch(j)) || self.batch_wants_workers();
        let grow = self.jobs.values().find(|j| j.state() == JobState::Running && !is_batch(j) && (j.workers.len() as u32) < pool_range(j).1).map(|j| (j.id, j.workers.len()));
        if let (false, Some((job, size))) = (waiting, grow) {
            self.requeue(job, format!("worker {id} can join the {size} running"), GenerationCause::Joined);
        }
        Ok(ApplyOutput::WorkerId(id))
    }

    pub(super) fn worker_lost(&mut self, lost: WorkerLost) -> ApplyResult {
        let now = self.now_ms;
        let w = self.workers.get_mut(&lost.worker_id).ok_or_else(|| ApplyError::not_found(format!("unknown worker {}", lost.worker_id)))?;
        if w.state() == WorkerState::Lost {
            return Err(ApplyError::conflict(format!("worker {} is already lost", lost.worker_id)));
        }
        let job = w.job_id;
        w.state = WorkerState::Lost as i32;
        w.job_id = 0;
        w.lost_unix_ms = now;
        let how = match (lost.cause(), lost.detail.is_empty()) {
            (_, false) => lost.detail.clone(),
            (LossCause::MissedHeartbeats, true) => "was lost (missed heartbeats)".to_string(),
            (LossCause::Deregistered, true) => "stopped (shut down on purpose)".to_string(),
            (LossCause::PeersLostIt, true) => "was lost (its peers lost it)".to_string(),
        };
        if self.jobs.get(&job).is_some_and(is_batch) {
            self.batch_worker_gone(job, &lost.worker_id, &how);
        } else if job != 0 {
            // A worker that deregistered left on purpose; any other was lost.
            let kind = if lost.cause() == LossCause::Deregistered { GenerationCause::Removed } else { GenerationCause::Lost };
            self.requeue(job, format!("worker {} {how}", lost.worker_id), kind);
        }
        Ok(ApplyOutput::None)
    }

    /// Drops workers declared lost (the leader proposes it a lease after): nothing refers to
    /// a lost worker by more than its id, which jobs keep as text.
    pub(super) fn forget_workers(&mut self, f: ForgetWorkers) -> ApplyResult {
        for id in f.worker_ids {
            if self.workers.get(&id).is_some_and(|w| w.state() == WorkerState::Lost) {
                self.workers.remove(&id);
            }
        }
        Ok(ApplyOutput::None)
    }

    /// Workers declared lost at least `after_ms` before `now_ms` (the leader's clock).
    pub fn forgettable_workers(&self, now_ms: u64, after_ms: u64) -> Vec<String> {
        self.workers.values().filter(|w| w.state() == WorkerState::Lost && now_ms.saturating_sub(w.lost_unix_ms) >= after_ms).map(|w| w.id.clone()).collect()
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerInfo> {
        self.workers.values()
    }

    pub fn worker(&self, id: &str) -> Option<&WorkerInfo> {
        self.workers.get(id)
    }
}
