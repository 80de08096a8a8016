//! The Ready loop: the only place the core is touched, and the leader's duties.

use super::*;

/// The Ready loop: the only place the core is touched.
/// Inputs taken into one Ready at most.
const BATCH: usize = 1024;

pub(super) fn handle(core: &mut Core, shared: &Shared, input: Input) {
    match input {
        Input::Propose(cmd, reply) => {
            if !core.is_leader() {
                let _ = reply.send(Err(not_leader_text(shared, &CoordError::NotLeader(core.leader_id()))));
            } else if let Err(e) = core.propose(cmd, Some(reply)) {
                tracing::warn!(error = %e, "proposal dropped");
            }
        }
        Input::Raft(m) => core.step(m),
        Input::SnapshotSent { to, delivered } => core.report_snapshot(to, delivered),
        Input::Read(reply) => core.read_index(reply),
        Input::Member { op, id, address, request_id, reply } => core.propose_member(op, id, address, request_id, Some(reply)),
        Input::TransferLeader(id) => core.transfer_leader(id),
    }
}

/// Returns Ok when this replica was removed from the group.
pub(super) async fn drive(mut core: Core, mut log: LogFile, mut rx: mpsc::Receiver<Input>, shared: Arc<Shared>) -> Result<(), CoordError> {
    let mut peers = Senders(HashMap::new());
    peers.sync(&shared);
    let mut was_member = false;
    let mut ticker = tokio::time::interval(TICK);
    let mut ticks = 0u64;
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    let mut recent: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                ticks += 1;
                if shoal_core::failpoint::hit("raft-loop-panic", ticks) {
                    panic!("failpoint raft-loop-panic at tick {ticks}");
                }
                core.tick();
                core.sweep_pending();
                if core.is_leader() {
                    leader_duties(&mut core, &shared, !was_leader, &mut recent);
                }
                was_leader = core.is_leader();
            }
            input = rx.recv() => {
                let Some(input) = input else { return Err(CoordError::Raft("the request channel closed".into())) };
                handle(&mut core, &shared, input);
                // Everything else already waiting goes into the same Ready: one fsync and one
                // round of messages for a batch of writes, not one each.
                for _ in 0..BATCH {
                    match rx.try_recv() {
                        Ok(input) => handle(&mut core, &shared, input),
                        Err(_) => break,
                    }
                }
            }
        }
        // A replica that cannot persist must stop: acknowledging unpersisted entries would
        // break Raft's guarantees.
        core.on_ready(&mut log, &mut |msgs| msgs.into_iter().for_each(|m| peers.send(m)))?;
        core.maybe_snapshot(&mut log, shared.cfg.snapshot_every)?;
        let mut v = shared.view.write().expect("view lock");
        v.role = core.role();
        v.term = core.term();
        v.commit = core.commit_index();
        v.leader_id = core.leader_id();
        v.snapshot_index = core.snapshot_index();
        v.learners = core.conf().1;
        drop(v);
        let addresses = effective_addresses(&shared);
        let recorded = shared.state.read().expect("state lock").members().next().is_some();
        let member = addresses.contains_key(&shared.cfg.id);
        if *shared.addresses.read().expect("addresses lock") != addresses {
            tracing::info!(?addresses, "coordinator group changed");
            *shared.addresses.write().expect("addresses lock") = addresses;
            peers.sync(&shared);
        }
        if recorded && member {
            was_member = true;
        } else if recorded && was_member {
            // Removed from the group: nothing left to serve.
            return Ok(());
        }
    }
}

/// Leases, scheduling and progress flushing: decisions the leader makes and replicates.
pub(super) fn leader_duties(core: &mut Core, shared: &Shared, new_leader: bool, recent: &mut HashMap<String, Instant>) {
    let now = Instant::now();
    let lease = shared.cfg.lease;
    let mut proposals = Vec::new();
    let mut promote = Vec::new();
    {
        let state = shared.state.read().expect("state lock");
        if state.members().next().is_none() {
            // A group's first leader records the group it was started with.
            let members = shared.cfg.peers.iter().map(|(id, a)| PeerInfo { id: *id, address: a.clone(), learner: false }).collect();
            proposals.push(("members".to_string(), command::Kind::SetMembers(MemberList { members })));
        }
        // A learner that has caught up becomes a voter (one that never answered has matched 0).
        let commit = core.commit_index();
        for id in core.conf().1 {
            if core.matched(id).is_some_and(|m| m > 0 && m + PROMOTE_LAG >= commit) && !core.has_pending_conf() {
                promote.push(id);
            }
        }
        let mut vol = shared.volatile.lock().expect("volatile lock");
        if new_leader {
            // Grace period: every worker gets a full lease from the moment this leader starts.
            vol.last_seen.clear();
            vol.heard.clear();
        }
        for w in state.workers().filter(|w| w.state() != WorkerState::Lost) {
            let seen = *vol.last_seen.entry(w.id.clone()).or_insert(now);
            if now.duration_since(seen) > lease {
                proposals.push((format!("lost/{}", w.id), command::Kind::WorkerLost(WorkerLost { worker_id: w.id.clone(), cause: String::new() })));
            }
        }
        // Placed only: workers heard from under this leader, with a heartbeat in the last half
        // lease (a dead one is not handed a job while its lease runs out).
        let fresh = |id: &str| vol.heard.contains(id) && vol.last_seen.get(id).is_some_and(|t| now.duration_since(*t) <= lease / 2);
        if let Some((job_id, generation, workers)) = state.next_placement(fresh) {
            let last_step = vol.progress.get(&job_id).filter(|(g, _, _)| *g + 1 == generation).map(|(_, p, _)| p.step).unwrap_or(0);
            proposals.push((format!("place/{job_id}/{generation}"), command::Kind::JobAssigned(JobAssigned { job_id, generation, workers, last_step })));
        }
        // Batch attempts on the workers still idle (not on those just placed for training).
        let placed: Vec<String> = proposals.iter().filter_map(|(_, k)| if let command::Kind::JobAssigned(a) = k { Some(a.workers.clone()) } else { None }).flatten().collect();
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let preempt = if placed.is_empty() { state.batch_preemptions(fresh) } else { None };
        if let Some((job, stops)) = preempt {
            let since = *vol.waiting_since.entry(job).or_insert(now);
            if now.duration_since(since) >= PREEMPT_AFTER {
                for t in stops {
                    tracing::info!(job = t.job_id, task = t.task, attempt = t.attempt, worker = %t.worker_id, training_job = job, "stopping a batch attempt for a waiting training job");
                    proposals.push((format!("stop/{}/{}", t.job_id, t.attempt), command::Kind::TaskStopped(t)));
                }
            }
        } else if placed.is_empty() {
            for t in state.next_batch_starts(fresh, now_ms) {
                let attempts = state.job(t.job_id).and_then(|j| j.batch.as_ref()).and_then(|b| b.tasks.get(t.task as usize)).map(|x| x.attempts).unwrap_or(0);
                proposals.push((format!("task/{}/{}/{attempts}/{}", t.job_id, t.task, t.speculative), command::Kind::TaskStarted(t)));
            }
        }
        for (job_id, (generation, progress, flushed)) in vol.progress.iter_mut() {
            let due = flushed.map(|t| now.duration_since(t) >= PROGRESS_FLUSH).unwrap_or(true);
            let running = state.job(*job_id).map(|j| j.state() == JobState::Running && j.generation == *generation).unwrap_or(false);
            if due && running {
                *flushed = Some(now);
                proposals.push((
                    format!("progress/{job_id}/{}", progress.step),
                    command::Kind::UpdateProgress(UpdateProgress { job_id: *job_id, generation: *generation, progress: Some(progress.clone()) }),
                ));
            }
        }
        vol.progress.retain(|id, _| state.job(*id).map(|j| !j.state().is_terminal()).unwrap_or(false));
        vol.waiting_since.retain(|id, _| state.job(*id).is_some_and(|j| j.state() == JobState::Queued));
    }
    // The same decision is not proposed again while its first proposal is in flight.
    recent.retain(|_, t| now.duration_since(*t) < Duration::from_secs(2));
    for (key, kind) in proposals {
        if recent.contains_key(&key) {
            continue;
        }
        recent.insert(key, now);
        let _ = core.propose(Command { proposal_id: 0, request_id: String::new(), kind: Some(kind) }, None);
    }
    if let Some(id) = promote.first() {
        if let std::collections::hash_map::Entry::Vacant(e) = recent.entry(format!("promote/{id}")) {
            e.insert(now);
            tracing::info!(id, "learner caught up; promoting it to voter");
            let address = shared.addresses.read().expect("addresses lock").get(id).cloned().unwrap_or_default();
            core.propose_member(MemberOp::Promote, *id, address, String::new(), None);
        }
    }
}
