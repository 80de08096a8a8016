//! Deterministic simulation of a coordinator group: several `node::Core`s in one thread, a
//! seeded RNG that drops, delays and reorders messages, partitions the group and crashes and
//! restarts replicas (from what they persisted). Checks Raft's safety properties on the real
//! core and state machine, and that the group converges once the faults stop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use raft::eraftpb::{ConfState, Entry, HardState, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use shoal_coordinator::node::{Core, Persist, RaftStore};
use shoal_coordinator::state::StateMachine;
use shoal_coordinator::CoordError;
use shoal_core::rng::SplitMix64;
use shoal_proto::{command, Command, RegisterWorkerRequest};

/// What a replica persisted; only what was synced survives its crashes.
#[derive(Default, Clone)]
struct MemLog {
    entries: Vec<Entry>,
    hard_state: HardState,
    synced_entries: Vec<Entry>,
    synced_hs: HardState,
    /// The base of the log (saved durably at once, as `LogFile::save_snapshot` does).
    snapshot: Option<Snapshot>,
}

impl Persist for MemLog {
    fn append_entries(&mut self, entries: &[Entry]) -> Result<(), CoordError> {
        if let Some(first) = entries.first() {
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend_from_slice(entries);
        }
        Ok(())
    }
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), CoordError> {
        self.hard_state = hs.clone();
        Ok(())
    }
    fn sync(&mut self) -> Result<(), CoordError> {
        self.synced_entries = self.entries.clone();
        self.synced_hs = self.hard_state.clone();
        Ok(())
    }
    fn save_snapshot(&mut self, snap: &Snapshot, keep: &[Entry], hs: &HardState) -> Result<(), CoordError> {
        self.snapshot = Some(snap.clone());
        self.entries = keep.to_vec();
        self.synced_entries = keep.to_vec();
        self.hard_state = hs.clone();
        self.synced_hs = hs.clone();
        Ok(())
    }
}

/// Snapshots (and log compaction) come this often, so crashed or partitioned replicas often
/// need one from the leader to catch up.
const SNAPSHOT_EVERY: u64 = 25;

struct Replica {
    core: Option<Core>,
    state: Arc<RwLock<StateMachine>>,
    log: MemLog,
}

fn boot(id: u64, voters: &[u64], log: &MemLog) -> (Core, Arc<RwLock<StateMachine>>) {
    let storage = MemStorage::new_with_conf_state(ConfState::from((voters.to_vec(), vec![])));
    let base = log.snapshot.as_ref().map(|s| s.get_metadata().index).unwrap_or(0);
    if let Some(s) = &log.snapshot {
        storage.wl().apply_snapshot(s.clone()).unwrap();
    }
    let after: Vec<Entry> = log.synced_entries.iter().filter(|e| e.index > base).cloned().collect();
    storage.wl().append(&after).unwrap();
    let mut hs = log.synced_hs.clone();
    hs.commit = hs.commit.max(base);
    storage.wl().set_hardstate(hs);
    let state = Arc::new(RwLock::new(StateMachine::default()));
    let mut core = Core::new(id, RaftStore::new(storage, log.snapshot.clone()), state.clone()).unwrap();
    core.campaign_if_alone();
    (core, state)
}

/// (worker id, address) pairs a replica has applied.
fn applied(state: &Arc<RwLock<StateMachine>>) -> BTreeMap<String, String> {
    state.read().unwrap().workers().map(|w| (w.id.clone(), w.address.clone())).collect()
}

fn simulate(seed: u64, n: u64) {
    let voters: Vec<u64> = (1..=n).collect();
    let mut rng = SplitMix64::new(seed);
    let mut replicas: BTreeMap<u64, Replica> = BTreeMap::new();
    for &id in &voters {
        let (core, state) = boot(id, &voters, &MemLog::default());
        replicas.insert(id, Replica { core: Some(core), state, log: MemLog::default() });
    }
    // (delivery round, message, lost on the way)
    let mut in_flight: Vec<(u64, Message, bool)> = Vec::new();
    let mut leaders_by_term: HashMap<u64, u64> = HashMap::new();
    let mut proposed = 0u64;
    let mut partition: Option<Vec<u64>> = None;
    let fault_rounds = 3000u64;

    for round in 0..fault_rounds + 1500 {
        let faults = round < fault_rounds;
        // Partitions come and go; replicas crash (losing unsynced data) and restart.
        if faults && rng.below(200) == 0 {
            partition = if partition.is_some() || rng.below(2) == 0 {
                None
            } else {
                Some(voters.iter().copied().filter(|_| rng.below(2) == 0).collect())
            };
        }
        if !faults {
            partition = None;
        }
        for &id in &voters {
            let r = replicas.get_mut(&id).unwrap();
            let crashed = r.core.is_none();
            if faults && !crashed && rng.below(400) == 0 {
                r.core = None;
                r.log.entries = r.log.synced_entries.clone();
                r.log.hard_state = r.log.synced_hs.clone();
            } else if crashed && (!faults || rng.below(50) == 0) {
                let (core, state) = boot(id, &voters, &r.log);
                r.core = Some(core);
                r.state = state;
            }
        }
        // Deliver what is due; random delays make a random order.
        let mut due = Vec::new();
        in_flight.retain(|(at, m, dropped)| {
            if *at <= round {
                due.push((m.clone(), *dropped));
                false
            } else {
                true
            }
        });
        for (m, dropped) in due {
            let cut = dropped || partition.as_ref().map(|p| p.contains(&m.from) != p.contains(&m.to)).unwrap_or(false);
            let receiver_up = replicas[&m.to].core.is_some();
            // The transport tells a sender whether a snapshot arrived (a gRPC call's outcome).
            if m.get_msg_type() == MessageType::MsgSnapshot {
                if let Some(core) = replicas.get_mut(&m.from).unwrap().core.as_mut() {
                    core.report_snapshot(m.to, !cut && receiver_up);
                }
            }
            if cut {
                continue;
            }
            if let Some(core) = replicas.get_mut(&m.to).unwrap().core.as_mut() {
                core.step(m);
            }
        }
        // Tick, propose on a leader now and then, process Ready.
        for &id in &voters {
            let r = replicas.get_mut(&id).unwrap();
            let Some(core) = r.core.as_mut() else { continue };
            core.tick();
            if core.is_leader() {
                let prev = leaders_by_term.insert(core.term(), id);
                assert!(prev.is_none() || prev == Some(id), "seed {seed}: two leaders in term {}: {prev:?} and {id}", core.term());
                // Proposals stop well before the end so the last ones can reach everyone.
                if round < fault_rounds + 500 && rng.below(5) == 0 {
                    proposed += 1;
                    let req = RegisterWorkerRequest { address: format!("sim-{proposed}"), pid: 0, device: "cpu".into(), request_id: String::new() };
                    core.propose(Command { proposal_id: 0, request_id: String::new(), kind: Some(command::Kind::RegisterWorker(req)) }, None).unwrap();
                }
            }
            let msgs = core.on_ready(&mut r.log).unwrap();
            core.maybe_snapshot(&mut r.log, SNAPSHOT_EVERY).unwrap();
            for m in msgs {
                let dropped = faults && rng.below(10) == 0;
                let delay = if faults { rng.below(4) } else { rng.below(2) };
                in_flight.push((round + 1 + delay, m, dropped));
            }
        }
        // State machine safety: replicas agree on every entry they have both applied.
        if round % 10 != 0 {
            continue;
        }
        let views: Vec<BTreeMap<String, String>> = replicas.values().filter(|r| r.core.is_some()).map(|r| applied(&r.state)).collect();
        for a in &views {
            for b in &views {
                for (id, addr) in a {
                    if let Some(other) = b.get(id) {
                        assert_eq!(addr, other, "seed {seed}: replicas applied different commands as {id}");
                    }
                }
            }
        }
    }
    // Liveness: once the faults stop, every replica converges and the group made progress.
    let views: Vec<BTreeMap<String, String>> = replicas.values().map(|r| applied(&r.state)).collect();
    if !views.iter().all(|v| *v == views[0]) {
        for (id, r) in &replicas {
            let c = r.core.as_ref().unwrap();
            eprintln!("replica {id}: role {} term {} commit {} applied {} snapshot {} state applied {} workers {}", c.role(), c.term(), c.commit_index(), c.applied_index(), c.snapshot_index(), r.state.read().unwrap().applied_index, applied(&r.state).len());
        }
    }
    assert!(views.iter().all(|v| *v == views[0]), "seed {seed}: replicas did not converge");
    let hashes: BTreeSet<String> = replicas.values().map(|r| r.state.read().unwrap().state_hash()).collect();
    assert_eq!(hashes.len(), 1, "seed {seed}: replicas hold different states");
    let snapshots: Vec<u64> = replicas.values().map(|r| r.core.as_ref().unwrap().snapshot_index()).collect();
    assert!(snapshots.iter().all(|&s| s > 0), "seed {seed}: no snapshots were taken: {snapshots:?}");
    assert!(views[0].len() > 50, "seed {seed}: only {} of {proposed} proposals committed", views[0].len());
    // Ids are dense: nothing was applied twice or skipped.
    let ids: BTreeSet<u64> = views[0].keys().map(|k| k[1..].parse().unwrap()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(*id, i as u64 + 1, "seed {seed}: worker ids have a gap");
    }
    // Each committed address was proposed once, so it appears once.
    let addrs: BTreeSet<&String> = views[0].values().collect();
    assert_eq!(addrs.len(), views[0].len(), "seed {seed}: a proposal was applied twice");
}

#[test]
fn three_replicas_stay_safe_and_converge_under_faults() {
    for seed in 0..8 {
        simulate(seed, 3);
    }
}

#[test]
fn five_replicas_stay_safe_and_converge_under_faults() {
    for seed in 100..104 {
        simulate(seed, 5);
    }
}

#[test]
fn a_single_replica_recovers_its_state_across_crashes() {
    simulate(42, 1);
}
