//! Deterministic simulation of a coordinator group: real `node::Core`s, the real state machine
//! and the real log code (`storage::LogFile`) on a simulated disk, in one thread, driven by a
//! seeded RNG. The network drops, duplicates, delays and reorders messages and partitions the
//! group (one node, a minority, the leader); replicas crash at any moment, also inside a Ready
//! between persisting and sending, lose what they had not synced (the last write may be torn),
//! and see fsyncs fail; replicas join and leave the group while all this goes on, and
//! snapshots and compaction run every 25 entries. Clients submit real commands (register
//! workers and datasets, submit and cancel jobs) with request ids, and make linearizable reads.
//!
//! Checked after every round: at most one leader per term; every replica that applied index i
//! holds the same apply digest there (no committed entry lost or changed, one order for all).
//! At the end, once the faults heal: progress; every member agrees; every acknowledged write is
//! in the state exactly once; the history is linearizable (each kind of write takes its id in
//! log order, so ids must respect real-time order, and no read misses a write acknowledged
//! before it began).
//!
//! `SHOAL_SIM_SEEDS=N` runs N seeds instead of the default; `SHOAL_SIM_SEED=S` replays one.
//! A failure names its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use raft::eraftpb::{Message, MessageType};
use shoal_coordinator::node::{Core, RaftStore, Reply};
use shoal_coordinator::state::{ApplyOutput, MemberOp, StateMachine};
use shoal_coordinator::storage::{Disk, LogFile};
use shoal_core::rng::SplitMix64;
use shoal_proto::{command, Command, DatasetInfo, RegisterWorkerRequest, ShardInfo};

// ------------------------------------------------------------------------------------------
// A disk that loses what was not synced.
// ------------------------------------------------------------------------------------------

#[derive(Default, Clone)]
struct SimFile {
    durable: Vec<u8>,
    /// Written but not yet synced: lost on a crash, except a torn prefix of it.
    pending: Vec<u8>,
}

#[derive(Default)]
struct DiskState {
    files: BTreeMap<String, SimFile>,
    fail_next_sync: bool,
}

#[derive(Clone, Default)]
struct SimDisk(Arc<Mutex<DiskState>>);

impl Disk for SimDisk {
    fn read(&mut self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        let d = self.0.lock().unwrap();
        Ok(d.files.get(name).map(|f| [f.durable.as_slice(), f.pending.as_slice()].concat()))
    }
    fn append(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().files.entry(name.into()).or_default().pending.extend_from_slice(bytes);
        Ok(())
    }
    fn sync(&mut self, name: &str) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        if std::mem::take(&mut d.fail_next_sync) {
            return Err(std::io::Error::other("simulated fsync failure"));
        }
        let f = d.files.entry(name.into()).or_default();
        let p = std::mem::take(&mut f.pending);
        f.durable.extend(p);
        Ok(())
    }
    fn truncate(&mut self, name: &str, len: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let f = d.files.entry(name.into()).or_default();
        let mut all = [f.durable.as_slice(), f.pending.as_slice()].concat();
        all.truncate(len as usize);
        *f = SimFile { durable: all, pending: Vec::new() };
        Ok(())
    }
    fn replace(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().files.insert(name.into(), SimFile { durable: bytes.to_vec(), pending: Vec::new() });
        Ok(())
    }
    fn describe(&self, name: &str) -> String {
        format!("sim:{name}")
    }
}

impl SimDisk {
    /// A crash: unsynced writes are lost, but a prefix of the last one may have reached the
    /// disk (a torn write).
    fn crash(&self, rng: &mut SplitMix64) {
        let mut d = self.0.lock().unwrap();
        d.fail_next_sync = false;
        for f in d.files.values_mut() {
            let p = std::mem::take(&mut f.pending);
            if !p.is_empty() && rng.below(2) == 0 {
                let keep = rng.below(p.len() as u64) as usize;
                f.durable.extend_from_slice(&p[..keep]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Replicas.
// ------------------------------------------------------------------------------------------

const SNAPSHOT_EVERY: u64 = 25;
const PROMOTE_LAG: u64 = 16;

struct Replica {
    core: Option<(Core, LogFile)>,
    state: Arc<RwLock<StateMachine>>,
    disk: SimDisk,
    /// Started as a joiner (no voters of its own).
    joiner: bool,
    /// Applied its own removal: it stops for good.
    removed: bool,
    was_member: bool,
    boots: u64,
}

fn boot(id: u64, voters: &[u64], r: &mut Replica, seed: u64) {
    let own: &[u64] = if r.joiner { &[] } else { voters };
    let (log, rec) = LogFile::open_on(Box::new(r.disk.clone()), own).unwrap_or_else(|e| panic!("seed {seed}: replica {id} cannot reopen its log: {e}"));
    let state = Arc::new(RwLock::new(StateMachine::default()));
    r.boots += 1;
    let proposals = seed.wrapping_mul(1_000_003) ^ (id << 48) ^ (r.boots << 40);
    let mut core = Core::new_simulated(id, RaftStore::new(rec.storage, rec.snapshot), state.clone(), proposals).unwrap();
    core.campaign_if_alone();
    r.state = state;
    r.core = Some((core, log));
}

fn crash(r: &mut Replica, rng: &mut SplitMix64) {
    r.core = None;
    r.disk.crash(rng);
}

// ------------------------------------------------------------------------------------------
// Clients and their history.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Kind {
    Worker,
    /// Registers a slice of dataset "d": a new dataset (false) or an append (true).
    Dataset(bool),
    Submit,
    Cancel(u64),
    Read,
}

#[derive(Clone, Debug)]
enum Outcome {
    Pending,
    /// Acknowledged: the id it got (worker number, dataset version, job id), or for a read,
    /// the highest job id it saw.
    Ok(u64),
    Refused,
    /// Timed out or its replica crashed: it may or may not have been applied.
    Unknown,
}

#[derive(Clone, Debug)]
struct Op {
    kind: Kind,
    request_id: String,
    invoked: u64,
    done: u64,
    outcome: Outcome,
}

enum Waiting {
    Write(tokio::sync::oneshot::Receiver<Result<ApplyOutput, shoal_coordinator::state::ApplyError>>),
    /// A read, with the boot count of the replica asked: after a restart its state is rebuilt
    /// from scratch, so what it holds now is not what the answer was about.
    Read(u64, tokio::sync::oneshot::Receiver<Result<(), String>>),
}

struct Client {
    /// The op in flight: (index in history, replica asked, what it waits on, give-up round).
    current: Option<(usize, u64, Waiting, u64)>,
    /// An op whose outcome is unknown, to try again with the same request id.
    retry: Option<usize>,
}

fn spec(name: &str) -> String {
    format!(
        "name = \"{name}\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 80]\n[training]\nepochs = 1\nbatch_size = 8\n\
         [training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 1\n"
    )
}

fn command_for(op: &Op) -> Option<command::Kind> {
    Some(match op.kind {
        Kind::Worker => command::Kind::RegisterWorker(RegisterWorkerRequest { address: op.request_id.clone(), pid: 0, device: "cpu".into(), request_id: String::new(), ..Default::default() }),
        Kind::Dataset(append) => command::Kind::RegisterDataset(DatasetInfo {
            name: "d".into(),
            version: 0,
            records: 100,
            feature_shape: vec![4],
            classes: 2,
            shards: vec![ShardInfo { path: format!("datasets/d/import-{}/shard-0.safetensors", op.request_id), records: 100, blake3: "h".into(), bytes: 1 }],
            append,
            ..Default::default()
        }),
        Kind::Submit => command::Kind::SubmitJob(spec(&op.request_id)),
        Kind::Cancel(id) => command::Kind::CancelJob(id),
        Kind::Read => return None,
    })
}

fn output_id(out: &ApplyOutput) -> u64 {
    match out {
        ApplyOutput::WorkerId(w) => w[1..].parse().unwrap(),
        ApplyOutput::Dataset(d) => d.version,
        ApplyOutput::Job(j) => j.id,
        ApplyOutput::Member(m) => *m,
        ApplyOutput::Model(m) => m.versions.len() as u64,
        ApplyOutput::Template(t) => t.id,
        ApplyOutput::None | ApplyOutput::Settings(_) | ApplyOutput::Pruned { .. } => 0,
    }
}

// ------------------------------------------------------------------------------------------
// The simulation.
// ------------------------------------------------------------------------------------------

struct Net {
    /// (delivery round, message, lost on the way)
    in_flight: Vec<(u64, Message, bool)>,
    partition: Option<BTreeSet<u64>>,
}

impl Net {
    fn cut(&self, a: u64, b: u64) -> bool {
        self.partition.as_ref().is_some_and(|p| p.contains(&a) != p.contains(&b))
    }
}

/// Runs one seed; returns a fingerprint of how it went (the leader's final state and the
/// whole client history), equal for equal seeds.
fn simulate(seed: u64, n: u64) -> String {
    let voters: Vec<u64> = (1..=n).collect();
    // Two spare ids join and leave the group while the faults run (groups of 3 or more).
    let spares: Vec<u64> = if n >= 3 { vec![n + 1, n + 2] } else { vec![] };
    let mut rng = SplitMix64::new(seed);
    let mut replicas: BTreeMap<u64, Replica> = BTreeMap::new();
    for &id in voters.iter().chain(&spares) {
        let mut r = Replica {
            core: None,
            state: Arc::default(),
            disk: SimDisk::default(),
            joiner: id > n,
            removed: false,
            was_member: id <= n,
            boots: 0,
        };
        if id <= n {
            boot(id, &voters, &mut r, seed);
        }
        replicas.insert(id, r);
    }
    let mut net = Net { in_flight: Vec::new(), partition: None };
    let mut leaders_by_term: HashMap<u64, u64> = HashMap::new();
    let mut digests: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut history: Vec<Op> = Vec::new();
    let mut clients: Vec<Client> = (0..3).map(|_| Client { current: None, retry: None }).collect();
    let mut next_op = 0u64;
    // Replicas the churn tried to remove: never added again (raft ids are not reused).
    let mut removal_targets: BTreeSet<u64> = BTreeSet::new();
    let fault_rounds = 2000u64;
    let total_rounds = fault_rounds + 1200;

    for round in 0..total_rounds {
        let faults = round < fault_rounds;
        let leader = replicas.iter().find(|(_, r)| r.core.as_ref().is_some_and(|(c, _)| c.is_leader())).map(|(id, _)| *id);

        // Partitions: one node, a minority or majority, or the leader, cut off for a while.
        if faults && rng.below(150) == 0 {
            net.partition = if net.partition.is_some() || rng.below(3) == 0 {
                None
            } else {
                let ids: Vec<u64> = replicas.keys().copied().collect();
                Some(match rng.below(3) {
                    0 => [ids[rng.below(ids.len() as u64) as usize]].into(),
                    1 => leader.map(|l| [l].into()).unwrap_or_default(),
                    _ => ids.iter().copied().filter(|_| rng.below(2) == 0).collect(),
                })
            };
        }
        if !faults {
            net.partition = None;
        }

        // Crashes and restarts (removed replicas stay down; spares boot when added).
        for (&id, r) in replicas.iter_mut() {
            if r.removed {
                continue;
            }
            if r.core.is_some() && faults && rng.below(500) == 0 {
                crash(r, &mut rng);
            } else if r.core.is_none() && r.boots > 0 && (!faults || rng.below(40) == 0) {
                boot(id, &voters, r, seed);
            }
        }

        let leader = replicas.iter().find(|(_, r)| r.core.as_ref().is_some_and(|(c, _)| c.is_leader())).map(|(id, _)| *id);
        // Membership churn, led by the leader, one change at a time. Ids are never reused.
        let retired: BTreeSet<u64> = replicas.iter().filter(|(_, r)| r.removed || r.was_member && r.joiner).map(|(id, _)| *id).chain(removal_targets.iter().copied()).collect();
        if let Some(l) = leader.filter(|_| faults && !spares.is_empty() && rng.below(60) == 0) {
            let (core, _) = replicas.get_mut(&l).unwrap().core.as_mut().unwrap();
            let (vs, ls) = core.conf();
            if !core.has_pending_conf() {
                let absent: Vec<u64> = spares.iter().copied().filter(|s| !vs.contains(s) && !ls.contains(s) && !retired.contains(s)).collect();
                let extra_voters: Vec<u64> = vs.iter().copied().filter(|&v| v != l).collect();
                if let Some(&s) = absent.first().filter(|_| rng.below(2) == 0) {
                    core.propose_member(MemberOp::AddLearner, s, format!("sim-{s}"), String::new(), false, None);
                } else if vs.len() > n as usize && !extra_voters.is_empty() {
                    let victim = extra_voters[rng.below(extra_voters.len() as u64) as usize];
                    removal_targets.insert(victim);
                    core.propose_member(MemberOp::Remove, victim, String::new(), String::new(), false, None);
                }
            }
        }
        // Learners that caught up are promoted; spares that were added boot as joiners.
        if let Some(l) = leader {
            let (core, _) = replicas.get_mut(&l).unwrap().core.as_mut().unwrap();
            let commit = core.commit_index();
            for id in core.conf().1 {
                if core.matched(id).is_some_and(|m| m > 0 && m + PROMOTE_LAG >= commit) && !core.has_pending_conf() {
                    core.propose_member(MemberOp::Promote, id, String::new(), String::new(), false, None);
                }
            }
            let (vs, ls) = core.conf();
            for id in vs.iter().chain(&ls) {
                let r = replicas.get_mut(id).unwrap();
                if r.boots == 0 && !r.removed {
                    r.was_member = true;
                    boot(*id, &voters, r, seed);
                }
            }
        }

        // Deliver what is due.
        let mut due = Vec::new();
        net.in_flight.retain(|(at, m, lost)| {
            if *at <= round {
                due.push((m.clone(), *lost));
                false
            } else {
                true
            }
        });
        for (m, lost) in due {
            let cut = lost || net.cut(m.from, m.to);
            let up = replicas.get(&m.to).is_some_and(|r| r.core.is_some());
            // The transport tells a sender whether a snapshot arrived (a call's outcome).
            if m.get_msg_type() == MessageType::MsgSnapshot {
                if let Some((core, _)) = replicas.get_mut(&m.from).and_then(|r| r.core.as_mut()) {
                    core.report_snapshot(m.to, !cut && up);
                }
            }
            if cut {
                continue;
            }
            if let Some((core, _)) = replicas.get_mut(&m.to).and_then(|r| r.core.as_mut()) {
                core.step(m);
            }
        }

        // Clients: collect answers, give up on stale ones, start new operations.
        for c in clients.iter_mut() {
            if let Some((i, asked, waiting, give_up)) = c.current.take() {
                let answered = match waiting {
                    Waiting::Write(mut rx) => match rx.try_recv() {
                        Ok(Ok(out)) => Some(Outcome::Ok(output_id(&out))),
                        Ok(Err(_)) => Some(Outcome::Refused),
                        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Outcome::Unknown),
                        Err(_) if round >= give_up => Some(Outcome::Unknown),
                        Err(_) => {
                            c.current = Some((i, asked, Waiting::Write(rx), give_up));
                            None
                        }
                    },
                    Waiting::Read(boots, mut rx) => match rx.try_recv() {
                        Ok(Ok(())) if replicas[&asked].boots != boots || replicas[&asked].core.is_none() => Some(Outcome::Unknown),
                        Ok(Ok(())) => {
                            let seen = replicas[&asked].state.read().unwrap().jobs().map(|j| j.id).max().unwrap_or(0);
                            Some(Outcome::Ok(seen))
                        }
                        Ok(Err(_)) => Some(Outcome::Refused),
                        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Outcome::Unknown),
                        Err(_) if round >= give_up => Some(Outcome::Unknown),
                        Err(_) => {
                            c.current = Some((i, asked, Waiting::Read(boots, rx), give_up));
                            None
                        }
                    },
                };
                if let Some(o) = answered {
                    // A write with an unknown outcome is tried again, with its request id.
                    if matches!(o, Outcome::Unknown) && !matches!(history[i].kind, Kind::Read) {
                        c.retry = Some(i);
                    }
                    history[i].outcome = o;
                    history[i].done = round;
                }
            }
            let stop_proposing = round >= fault_rounds + 600;
            if c.current.is_some() || stop_proposing || rng.below(3) != 0 {
                continue;
            }
            let target = leader.filter(|_| rng.below(5) != 0).unwrap_or_else(|| {
                let ids: Vec<u64> = replicas.keys().copied().collect();
                ids[rng.below(ids.len() as u64) as usize]
            });
            let boots = replicas[&target].boots;
            let Some((core, _)) = replicas.get_mut(&target).and_then(|r| r.core.as_mut()) else { continue };
            let op = match c.retry.take() {
                // The same operation, still: it may have taken effect any time since it began.
                Some(i) => Op { done: 0, outcome: Outcome::Pending, ..history[i].clone() },
                None => {
                    next_op += 1;
                    let jobs: Vec<u64> = history
                        .iter()
                        .filter_map(|o| match (&o.kind, &o.outcome) {
                            (Kind::Submit, Outcome::Ok(id)) => Some(*id),
                            _ => None,
                        })
                        .collect();
                    let kind = match rng.below(10) {
                        0..=1 => Kind::Worker,
                        // An append once an earlier registration is known to have taken
                        // effect, else the import (refused once one has).
                        2 => Kind::Dataset(history.iter().any(|o| matches!(o.kind, Kind::Dataset(_)) && matches!(o.outcome, Outcome::Ok(_)))),
                        3..=5 => Kind::Submit,
                        6 if !jobs.is_empty() => Kind::Cancel(jobs[rng.below(jobs.len() as u64) as usize]),
                        _ => Kind::Read,
                    };
                    Op { kind, request_id: format!("s{seed}-op{next_op}"), invoked: round, done: 0, outcome: Outcome::Pending }
                }
            };
            let i = history.len();
            history.push(op);
            let op = &history[i];
            let waiting = match command_for(op) {
                Some(kind) => {
                    let (tx, rx) = tokio::sync::oneshot::channel::<Result<ApplyOutput, shoal_coordinator::state::ApplyError>>();
                    let _ = core.propose(Command { request_id: op.request_id.clone(), kind: Some(kind), ..Default::default() }, Some(tx as Reply));
                    Waiting::Write(rx)
                }
                None => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    core.read_index(tx);
                    Waiting::Read(boots, rx)
                }
            };
            c.current = Some((i, target, waiting, round + 60));
        }

        // Tick (some replicas skip a tick now and then, so timeouts do not line up), process
        // Ready, and crash some inside it.
        for (&id, r) in replicas.iter_mut() {
            let Some((core, log)) = r.core.as_mut() else { continue };
            if !faults || rng.below(10) != 0 {
                core.tick();
            }
            core.sweep_pending();
            if core.is_leader() {
                let prev = leaders_by_term.insert(core.term(), id);
                assert!(prev.is_none() || prev == Some(id), "seed {seed}: two leaders in term {}: {prev:?} and {id}", core.term());
            }
            if faults && rng.below(800) == 0 {
                r.disk.0.lock().unwrap().fail_next_sync = true;
            }
            let mut msgs = Vec::new();
            let ready = core.on_ready(log, &mut |m| msgs.extend(m)).and_then(|_| core.maybe_snapshot(log, SNAPSHOT_EVERY));
            match ready {
                Ok(_) => {}
                Err(_) => {
                    // A replica that cannot persist stops (the real one exits).
                    crash(r, &mut rng);
                    continue;
                }
            };
            if faults && rng.below(600) == 0 {
                // Persisted, but crashed before sending anything.
                crash(r, &mut rng);
                continue;
            }
            // raft-rs orders messages to different peers by a hash map: make it deterministic.
            msgs.sort_by_key(|m| m.to);
            for m in msgs {
                let lost = faults && rng.below(12) == 0;
                let delay = if faults { rng.below(5) } else { rng.below(2) };
                if faults && rng.below(30) == 0 {
                    net.in_flight.push((round + 1 + rng.below(5), m.clone(), false)); // duplicated
                }
                net.in_flight.push((round + 1 + delay, m, lost));
            }
            // Safety: one apply digest per index, across replicas and their restarts.
            let st = r.state.read().unwrap();
            let d = digests.entry(st.applied_index).or_insert_with(|| st.apply_digest().to_vec());
            assert_eq!(d.as_slice(), st.apply_digest(), "seed {seed}: replica {id} applied something else at index {}", st.applied_index);
        }
        // Replicas that applied their own removal stop for good.
        for (&id, r) in replicas.iter_mut() {
            let Some((core, _)) = r.core.as_ref() else { continue };
            let (vs, ls) = core.conf();
            let member = vs.contains(&id) || ls.contains(&id);
            if member {
                r.was_member = true;
            } else if r.was_member && !vs.is_empty() {
                r.core = None;
                r.removed = true;
            }
        }
    }

    // Liveness and agreement once the faults healed.
    let members: Vec<u64> = replicas.iter().filter(|(_, r)| r.core.is_some()).map(|(id, _)| *id).collect();
    let leader = members.iter().copied().find(|id| replicas[id].core.as_ref().unwrap().0.is_leader());
    let leader = leader.unwrap_or_else(|| panic!("seed {seed}: no leader after the faults healed"));
    let (vs, ls) = replicas[&leader].core.as_ref().unwrap().0.conf();
    for id in vs.iter().chain(&ls) {
        let r = &replicas[id];
        assert!(r.core.is_some(), "seed {seed}: member {id} is down after the faults healed");
        let (a, b) = (r.state.read().unwrap(), replicas[&leader].state.read().unwrap());
        assert_eq!((a.applied_index, a.apply_digest()), (b.applied_index, b.apply_digest()), "seed {seed}: member {id} did not converge");
        assert_eq!(a.state_hash(), b.state_hash(), "seed {seed}: member {id} holds another state");
    }
    let state = replicas[&leader].state.read().unwrap();
    let acked = |k: fn(&Kind) -> bool| history.iter().filter(move |o| k(&o.kind) && matches!(o.outcome, Outcome::Ok(_)));
    assert!(acked(|k| matches!(k, Kind::Submit)).count() > 10, "seed {seed}: too little progress");

    if std::env::var("SHOAL_SIM_VERBOSE").is_ok() {
        let count = |f: fn(&Outcome) -> bool| history.iter().filter(|o| f(&o.outcome)).count();
        eprintln!(
            "seed {seed}: n={n} ops {} ok {} refused {} unknown {}; applied {} snapshot {} terms {} boots {:?} removed {:?} conf {:?}",
            history.len(),
            count(|o| matches!(o, Outcome::Ok(_))),
            count(|o| matches!(o, Outcome::Refused)),
            count(|o| matches!(o, Outcome::Unknown)),
            state.applied_index,
            replicas[&leader].core.as_ref().unwrap().0.snapshot_index(),
            leaders_by_term.len(),
            replicas.values().map(|r| r.boots).collect::<Vec<_>>(),
            replicas.iter().filter(|(_, r)| r.removed).map(|(id, _)| *id).collect::<Vec<_>>(),
            (vs.clone(), ls.clone()),
        );
    }
    // Every acknowledged write is in the state, once.
    let workers: BTreeMap<String, u64> = state.workers().map(|w| (w.address.clone(), w.id[1..].parse().unwrap())).collect();
    assert_eq!(workers.len(), state.workers().count(), "seed {seed}: a worker was registered twice");
    let jobs: BTreeMap<String, u64> = state.jobs().map(|j| (j.name.clone(), j.id)).collect();
    assert_eq!(jobs.len(), state.jobs().count(), "seed {seed}: a job was submitted twice");
    let versions: BTreeMap<String, u64> =
        // Every registration adds one slice and one version: slice i is version i + 1.
        state.dataset_folders().enumerate().map(|(i, (_, folder))| (folder.split('/').nth(2).unwrap().trim_start_matches("import-").to_string(), i as u64 + 1)).collect();
    for o in &history {
        let Outcome::Ok(got) = o.outcome else { continue };
        let found = match o.kind {
            Kind::Worker => workers.get(&o.request_id).copied(),
            Kind::Submit => jobs.get(&o.request_id).copied(),
            Kind::Dataset(_) => versions.get(&o.request_id).copied(),
            Kind::Cancel(id) => Some(id).filter(|id| state.job(*id).is_some_and(|j| j.state() == shoal_proto::JobState::Cancelled)),
            Kind::Read => continue,
        };
        assert_eq!(found, Some(got), "seed {seed}: acknowledged {:?} {} is not in the state as acknowledged", o.kind, o.request_id);
    }

    // Linearizability: ids follow log order, so an op acknowledged before another began has
    // the smaller id; a read sees every job acknowledged before it began.
    for kind in [0u8, 1, 2] {
        let of = |o: &&Op| matches!((kind, &o.kind), (0, Kind::Worker) | (1, Kind::Dataset(_)) | (2, Kind::Submit));
        let done: Vec<(u64, u64, u64)> = history.iter().filter(of).filter_map(|o| match o.outcome {
            Outcome::Ok(id) => Some((o.invoked, o.done, id)),
            _ => None,
        }).collect();
        for a in &done {
            for b in &done {
                if a.1 < b.0 {
                    assert!(a.2 < b.2, "seed {seed}: id {} acknowledged at round {} but id {} began later, at {}", a.2, a.1, b.2, b.0);
                }
            }
        }
    }
    for r in history.iter().filter(|o| matches!(o.kind, Kind::Read)) {
        let Outcome::Ok(seen) = r.outcome else { continue };
        for w in history.iter().filter(|o| matches!(o.kind, Kind::Submit)) {
            if let Outcome::Ok(id) = w.outcome {
                assert!(!(w.done < r.invoked && id > seen), "seed {seed}: a read at round {} missed job {id}, acknowledged at {}", r.invoked, w.done);
            }
        }
        let possible = history.iter().filter(|o| matches!(o.kind, Kind::Submit) && o.invoked <= r.done).count() as u64;
        assert!(seen <= possible, "seed {seed}: a read saw job {seen} before it could exist");
    }
    format!("{}/{:?}", state.state_hash(), history.iter().map(|o| (o.invoked, o.done, format!("{:?}", o.outcome))).collect::<Vec<_>>())
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    if let Ok(s) = std::env::var("SHOAL_SIM_SEED") {
        return vec![s.parse().expect("SHOAL_SIM_SEED is a number")];
    }
    match std::env::var("SHOAL_SIM_SEEDS").ok().and_then(|n| n.parse::<u64>().ok()) {
        Some(n) => (default.start..default.start + n).collect(),
        None => default.collect(),
    }
}

fn run(n: u64, default: std::ops::Range<u64>) {
    for seed in seeds(default) {
        let outcome = std::panic::catch_unwind(|| simulate(seed, n));
        if outcome.is_err() {
            panic!("simulation of {n} replicas failed with seed {seed}; replay it with SHOAL_SIM_SEED={seed}");
        }
    }
}

#[test]
fn three_replicas_stay_safe_and_converge_under_faults() {
    run(3, 0..120);
}

#[test]
fn five_replicas_stay_safe_and_converge_under_faults() {
    run(5, 1000..1070);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 1007] {
        let n = if seed > 1000 { 5 } else { 3 };
        assert_eq!(simulate(seed, n), simulate(seed, n), "seed {seed} ran differently twice");
    }
}

#[test]
fn a_single_replica_recovers_its_state_across_crashes() {
    run(1, 2000..2010);
}
