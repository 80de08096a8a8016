//! The Ready loop: the only place the core is touched. It ticks the clock, hands the leader's
//! duties (`leader::Duties`, sans IO) the time, and carries out what applied entries ask for.

use super::*;
use crate::leader::Action;
use crate::state::Effect;

/// Inputs taken into one Ready at most.
const BATCH: usize = 1024;

pub(super) fn handle(core: &mut Core, input: Input, shared: &Shared) {
    match input {
        Input::Propose(cmd, reply) => {
            if !core.is_leader() {
                let _ = reply.send(Err(ApplyError::NotLeader(core.leader_id())));
            } else if let Err(e) = core.propose(cmd, Some(reply)) {
                tracing::warn!(error = %e, "proposal dropped");
            }
        }
        Input::Raft(m) => {
            if !core.step(m) {
                shared.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Input::SnapshotSent { to, delivered } => core.report_snapshot(to, delivered),
        Input::Read(reply) => core.read_index(reply),
        Input::Member { op, id, address, request_id, who, force, reply } => core.propose_member_as(op, id, address, request_id, who, force, Some(reply)),
        Input::TransferLeader(id, reply) => {
            let _ = reply.send(core.transfer_leader(id));
        }
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
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                ticks += 1;
                if shoal_core::failpoint::hit("raft-loop-panic", ticks) {
                    panic!("failpoint raft-loop-panic at tick {ticks}");
                }
                core.set_clock(unix_ms());
                core.tick();
                core.sweep_pending();
                if core.is_leader() {
                    leader_duties(&mut core, &shared, !was_leader);
                    notify::deliver(&shared);
                }
                was_leader = core.is_leader();
            }
            input = rx.recv() => {
                let Some(input) = input else { return Err(CoordError::Raft("the request channel closed".into())) };
                core.set_clock(unix_ms());
                handle(&mut core, input, &shared);
                // Everything else already waiting goes into the same Ready: one fsync and one
                // round of messages for a batch of writes, not one each.
                for _ in 0..BATCH {
                    match rx.try_recv() {
                        Ok(input) => handle(&mut core, input, &shared),
                        Err(_) => break,
                    }
                }
            }
        }
        // A replica that cannot persist must stop: acknowledging unpersisted entries would
        // break Raft's guarantees.
        core.on_ready(&mut log, &mut |msgs| msgs.into_iter().for_each(|m| peers.send(m)))?;
        core.maybe_snapshot(&mut log, shared.cfg.snapshot_every)?;
        let effects = shared.state.write().expect("state lock").take_effects();
        for e in effects {
            carry_out(&shared, e);
        }
        let mut v = shared.view.write().expect("view lock");
        v.role = core.role();
        v.term = core.term();
        v.commit = core.commit_index();
        v.last_index = core.last_index();
        v.leader_id = core.leader_id();
        v.snapshot_index = core.snapshot_index();
        (v.voters, v.learners) = core.conf();
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

/// What an applied entry asks of the shell, done off the loop. Every replica does it (each
/// may have a store of its own; on a shared one the second removal finds nothing), and a
/// replica that replays the entry after a crash does it again: the removal happens after the
/// entry committed, never before.
fn carry_out(shared: &Shared, effect: Effect) {
    match effect {
        // Test fault point: as if the replica crashed right after the commit, before it
        // removed anything (`shoal job prune` removes such leftovers).
        Effect::RemoveJobFiles(_) if shoal_core::failpoint::hit("prune-files-lost", 0) => {}
        Effect::RemoveJobFiles(jobs) => {
            let store = shared.cfg.store.clone();
            tokio::task::spawn_blocking(move || {
                for id in jobs {
                    let dir = format!("jobs/{id}");
                    match store.delete_prefix(&dir) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(job = id, dir, objects = n, "removed the files of a job that retention removed"),
                        Err(e) => tracing::warn!(job = id, dir, error = %e, "could not remove a pruned job's files (`shoal job prune` tries again)"),
                    }
                }
            });
        }
    }
}

/// The leader's duties (`leader::Duties::tick`), proposed.
fn leader_duties(core: &mut Core, shared: &Shared, new_leader: bool) {
    let group = core.group_view();
    let actions = {
        let state = shared.state.read().expect("state lock");
        let mut duties = shared.duties.lock().expect("duties lock");
        if new_leader {
            duties.new_term();
        }
        duties.tick(shared.now(), unix_ms(), shared.cfg.lease.as_millis() as u64, &shared.cfg.peers, &state, &group)
    };
    // The cluster's first tokens: proposed by whoever leads first, again every 2 s until one
    // commits (apply takes only the first).
    if let Some(auth) = shared.cfg.auth.as_ref().filter(|a| !a.bootstrap.is_empty()) {
        let now = shared.now().max(1);
        let last = shared.bootstrap_proposed.load(std::sync::atomic::Ordering::Relaxed);
        if (last == 0 || now >= last + 2000) && !shared.state.read().expect("state lock").tokens_bootstrapped() {
            shared.bootstrap_proposed.store(now, std::sync::atomic::Ordering::Relaxed);
            let tokens = shoal_proto::TokenBootstrap { tokens: auth.bootstrap.clone() };
            let _ = core.propose(Command { kind: Some(command::Kind::BootstrapTokens(tokens)), ..Default::default() }, None);
        }
    }
    for action in actions {
        match action {
            Action::Propose(kind) => {
                let _ = core.propose(Command { kind: Some(kind), ..Default::default() }, None);
            }
            Action::VerifyCache(mut verdict, files) => {
                let store = shared.cfg.store.clone();
                propose_off_loop(shared, move || {
                    match super::verify_artifacts(&store, &files) {
                        Ok(()) => verdict.ok = true,
                        Err(e) => verdict.detail = e,
                    }
                    command::Kind::PipelineCacheVerdict(verdict)
                });
            }
            Action::HashFiles(mut d, files) => {
                // Hashed where the leader runs: the same files on every host is the
                // deployment's part (an image).
                propose_off_loop(shared, move || {
                    d.digests = files.iter().map(|f| format!("{f} {}", file_digest(f))).collect();
                    command::Kind::PipelineFileDigests(d)
                });
            }
            Action::ListIncoming(mut listing, prefix) => {
                let store = shared.cfg.store.clone();
                propose_off_loop(shared, move || {
                    match store.list(prefix.trim_end_matches('/')) {
                        Ok(entries) => listing.files = entries.into_iter().map(|e| e.key).collect(),
                        Err(e) => listing.error = e.to_string(),
                    }
                    command::Kind::PipelineIncoming(listing)
                });
            }
            Action::SealAudit(seal) => {
                let Some(entries) = shared.state.read().expect("state lock").audit_entries(&seal) else { continue };
                let store = shared.cfg.store.clone();
                let inbox = shared.inbox.clone();
                tokio::task::spawn_blocking(move || {
                    use shoal_proto::Message as _;
                    let file = shoal_proto::AuditSegmentFile { entries }.encode_to_vec();
                    // Not sealed when the write fails: the entries wait in the state, and the
                    // duty asks again.
                    match store.put(&seal.key, &[&file]) {
                        Ok(()) => {
                            let (tx, _rx) = tokio::sync::oneshot::channel();
                            let _ = inbox.try_send(super::Input::Propose(Command { kind: Some(command::Kind::SealAudit(seal)), ..Default::default() }, tx));
                        }
                        Err(e) => tracing::warn!(key = %seal.key, error = %e, "writing an audit segment failed; retrying later"),
                    }
                });
            }
            Action::Promote(id) => {
                tracing::info!(id, "learner caught up; promoting it to voter");
                let address = shared.addresses.read().expect("addresses lock").get(&id).cloned().unwrap_or_default();
                core.propose_member(MemberOp::Promote, id, address, String::new(), false, None);
            }
        }
    }
}

/// Runs `io` (store or file reads a leader duty needs) on a blocking thread and proposes the
/// command it returns. A full inbox drops it: the duty asks again after a while.
fn propose_off_loop(shared: &Shared, io: impl FnOnce() -> command::Kind + Send + 'static) {
    let inbox = shared.inbox.clone();
    tokio::task::spawn_blocking(move || {
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let _ = inbox.try_send(super::Input::Propose(Command { kind: Some(io()), ..Default::default() }, tx));
    });
}

/// A file's digest for a cache key: `blake3 HEX` of a regular file's bytes (streamed, and no
/// more than its size says, so a special file cannot make it read forever), else `absent` or
/// `not a file`.
fn file_digest(path: &str) -> String {
    use std::io::Read;
    let Ok(meta) = std::fs::metadata(path) else { return "absent".into() };
    if !meta.is_file() {
        return "not a file".into();
    }
    let Ok(file) = std::fs::File::open(path) else { return "unreadable".into() };
    let mut h = blake3::Hasher::new();
    let mut reader = file.take(meta.len());
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
            }
            Err(_) => return "unreadable".into(),
        }
    }
    format!("blake3 {}", h.finalize().to_hex())
}
