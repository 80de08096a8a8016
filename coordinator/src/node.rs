//! The sans-IO core of a coordinator replica: a raft-rs `RawNode` plus the state machine.
//! It does no IO itself: the shell feeds it ticks, proposals and peer messages, hands it a
//! `Persist` sink for the log, and sends the messages that `on_ready` returns. So a simulation
//! can drive several cores in one thread.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{Config, GetEntriesContext, RaftState, RawNode, StateRole, Storage};
use shoal_proto::{Command, MemberChange, Message as _, StateSnapshot};
use tokio::sync::oneshot;

use crate::membership::{check_live_quorum, transfer_target, Change};
use crate::state::{ApplyError, ApplyOutput, ApplyResult, MemberOp, StateMachine};
use crate::CoordError;

/// Where the core's log goes. The real one is `storage::LogFile`; tests may keep it in memory.
pub trait Persist {
    fn append_entries(&mut self, entries: &[Entry]) -> Result<(), CoordError>;
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), CoordError>;
    /// Makes everything above durable.
    fn sync(&mut self) -> Result<(), CoordError>;
    /// Makes `snap` the base of the log, keeping only `keep` (the entries after it) and `hs`;
    /// durable on return.
    fn save_snapshot(&mut self, snap: &Snapshot, keep: &[Entry], hs: &HardState) -> Result<(), CoordError>;
}

impl Persist for crate::storage::LogFile {
    fn append_entries(&mut self, entries: &[Entry]) -> Result<(), CoordError> {
        crate::storage::LogFile::append_entries(self, entries)
    }
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), CoordError> {
        crate::storage::LogFile::set_hard_state(self, hs)
    }
    fn sync(&mut self) -> Result<(), CoordError> {
        crate::storage::LogFile::sync(self)
    }
    fn save_snapshot(&mut self, snap: &Snapshot, keep: &[Entry], hs: &HardState) -> Result<(), CoordError> {
        crate::storage::LogFile::save_snapshot(self, snap, keep, hs)
    }
}

/// raft-rs's in-memory log plus the latest snapshot of the state machine. raft asks it for a
/// snapshot to send a follower that is too far behind for the log alone.
#[derive(Clone)]
pub struct RaftStore {
    pub mem: MemStorage,
    snapshot: Arc<RwLock<Snapshot>>,
}

impl RaftStore {
    pub fn new(mem: MemStorage, snapshot: Option<Snapshot>) -> RaftStore {
        RaftStore { mem, snapshot: Arc::new(RwLock::new(snapshot.unwrap_or_default())) }
    }

    /// The index of the latest snapshot (0: none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.read().expect("snapshot lock").get_metadata().index
    }

    fn set_snapshot(&self, s: Snapshot) {
        *self.snapshot.write().expect("snapshot lock") = s;
    }
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, context: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot.read().expect("snapshot lock");
        if idx != 0 && idx == snap.get_metadata().index {
            return Ok(snap.get_metadata().term);
        }
        drop(snap);
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snap = self.snapshot.read().expect("snapshot lock");
        let index = snap.get_metadata().index;
        if index == 0 || index < request_index {
            // raft asks again later; a new snapshot comes with enough applied entries.
            return Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snap.clone())
    }
}

pub type Reply = oneshot::Sender<ApplyResult>;

/// The state machine a snapshot holds.
fn restore_state(snap: &Snapshot) -> Result<StateMachine, CoordError> {
    let data = StateSnapshot::decode(snap.get_data()).map_err(|e| CoordError::Raft(format!("snapshot {}: bad state: {e}", snap.get_metadata().index)))?;
    StateMachine::from_snapshot(data).map_err(|e| CoordError::Raft(format!("snapshot {}: {e}", snap.get_metadata().index)))
}

pub struct Core {
    raw: RawNode<RaftStore>,
    store: RaftStore,
    state: Arc<RwLock<StateMachine>>,
    /// Proposals made here that wait for their entry to apply, by proposal id.
    pending: HashMap<u64, Reply>,
    next_proposal: u64,
    /// Linearizable reads waiting for their read index (from the leader, through raft's
    /// ReadIndex), then for this replica to apply up to it.
    reads: HashMap<u64, (Option<u64>, ReadReply)>,
    /// The next read's context: unique across restarts too, so a late answer to a read of an
    /// earlier run of this replica never releases a read of this one.
    next_read: u64,
    /// A membership change was applied since the last snapshot.
    conf_changed: bool,
    /// A snapshot is being built (at most one at a time).
    snapshot_building: bool,
    /// Ticks since start, and the tick each peer was last heard at (any raft message).
    ticks: u64,
    heard: HashMap<u64, u64>,
    /// The wall clock (ms since the epoch) that proposals are stamped with; the shell (or
    /// the simulation) sets it.
    now_unix_ms: u64,
    build: String,
    /// The leader this replica last knew (0: none), for `shoal_raft_leader_changes_total`.
    known_leader: u64,
    /// `ticks / 10` when jobs and workers were last counted for `/metrics`.
    counted_at: u64,
}

/// A peer heard within this many ticks (1 s: ten heartbeat rounds) is live.
pub const LIVE_TICKS: u64 = 10;

/// A snapshot of one applied index: the state, encoded, and raft's metadata for it.
struct SnapshotJob {
    data: Vec<u8>,
    index: u64,
    term: u64,
    conf_state: raft::eraftpb::ConfState,
}

impl SnapshotJob {
    /// The raft snapshot.
    fn build(self) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.set_data(self.data.into());
        let meta = snap.mut_metadata();
        meta.index = self.index;
        meta.term = self.term;
        meta.set_conf_state(self.conf_state);
        snap
    }
}

/// Answers a read once this replica's state is at least as new as every write committed before
/// the read began; or says why not (no leader, leadership lost).
pub type ReadReply = oneshot::Sender<Result<(), String>>;

/// The largest command one Raft entry may carry, checked before it is proposed: the log's
/// frame limit is 64 MiB, and an entry that was acknowledged must never be too large to
/// replay.
pub const MAX_COMMAND: usize = 16 << 20;

/// Raft timing in ticks; the shell ticks every `TICK`: heartbeats every 100 ms, and a
/// follower that hears nothing for 500 to 1000 ms (drawn anew each time) stands for election,
/// so a lost leader costs well under a second. Pre-vote and check-quorum keep a slow or
/// partitioned replica from disturbing a healthy leader.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);
const ELECTION_TICKS: usize = 5;
const HEARTBEAT_TICKS: usize = 1;

impl Core {
    /// A core over `store`. If it holds a snapshot, `state` is replaced by the snapshot's state
    /// machine and only the entries after it are applied again.
    pub fn new(id: u64, store: RaftStore, state: Arc<RwLock<StateMachine>>) -> Result<Core, CoordError> {
        // A proposal id must not repeat across restarts of this replica: start from the
        // current time's nanos, tagged with the replica id.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Self::build(id, store, state, seed ^ (id << 56), true)
    }

    /// A core for a deterministic simulation: election timeouts are fixed (raft-rs draws them
    /// from an unseeded RNG otherwise; the simulation desynchronizes replicas itself), and
    /// proposal ids start from `seed`.
    pub fn new_simulated(id: u64, store: RaftStore, state: Arc<RwLock<StateMachine>>, seed: u64) -> Result<Core, CoordError> {
        Self::build(id, store, state, seed, false)
    }

    fn build(id: u64, store: RaftStore, state: Arc<RwLock<StateMachine>>, proposal_seed: u64, randomized: bool) -> Result<Core, CoordError> {
        let snapshot = store.snapshot.read().expect("snapshot lock").clone();
        let applied = snapshot.get_metadata().index;
        if applied != 0 {
            *state.write().expect("state lock") = restore_state(&snapshot)?;
        }
        let cfg = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            // Every committed entry after the snapshot (all of them, without one) is applied
            // again on start, which rebuilds the state machine.
            applied,
            // raft draws a timeout in [min, max); one value makes it deterministic.
            max_election_tick: if randomized { 2 * ELECTION_TICKS } else { ELECTION_TICKS + 1 },
            ..Default::default()
        };
        cfg.validate().map_err(|e| CoordError::Raft(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&cfg, store.clone(), &logger).map_err(|e| CoordError::Raft(e.to_string()))?;
        Ok(Core { raw, store, state, pending: HashMap::new(), next_proposal: proposal_seed, reads: HashMap::new(), next_read: proposal_seed.rotate_left(32), conf_changed: false, snapshot_building: false, ticks: 0, heard: HashMap::new(), now_unix_ms: 0, build: String::new(), known_leader: 0, counted_at: u64::MAX })
    }

    /// The index of the latest snapshot this replica holds.
    pub fn snapshot_index(&self) -> u64 {
        self.store.snapshot_index()
    }

    /// The index of the last entry applied to the state machine.
    pub fn applied_index(&self) -> u64 {
        self.raw.raft.raft_log.applied
    }

    /// Once `every` entries were applied since the last snapshot, or a membership change
    /// was: the state encoded as of now, straight from its maps (the pause of the Ready loop
    /// is the encoding, proportional to the state, not a copy of it).
    ///
    /// After a membership change every replica's log starts at that change, so whoever leads
    /// sends a joining replica a snapshot (with the group in it) rather than the log from its
    /// first entry, which would replay conf changes from an empty group.
    fn snapshot_due(&mut self, every: u64) -> Result<Option<SnapshotJob>, CoordError> {
        let applied = self.applied_index();
        let due = applied >= self.snapshot_index() + every.max(1) || (self.conf_changed && applied > self.snapshot_index());
        if !due || self.snapshot_building {
            return Ok(None);
        }
        self.conf_changed = false;
        self.snapshot_building = true;
        let started = std::time::Instant::now();
        let data = self.state.read().expect("state lock").encode_snapshot(applied);
        tracing::info!(index = applied, bytes = data.len(), took_ms = started.elapsed().as_millis() as u64, "state encoded for a snapshot");
        Ok(Some(SnapshotJob {
            data,
            index: applied,
            term: self.store.term(applied).map_err(|e| CoordError::Raft(e.to_string()))?,
            conf_state: self.raw.raft.prs().conf().to_conf_state(),
        }))
    }

    /// A built snapshot becomes the base of the persisted log (only what follows it stays)
    /// and of the in-memory one. A snapshot older than the one this replica holds by now (a
    /// leader's arrived meanwhile) is dropped.
    fn snapshot_built(&mut self, snap: Snapshot, log: &mut dyn Persist) -> Result<(), CoordError> {
        self.snapshot_building = false;
        let index = snap.get_metadata().index;
        if index <= self.snapshot_index() {
            return Ok(());
        }
        let last = self.store.mem.last_index().map_err(|e| CoordError::Raft(e.to_string()))?;
        let keep = self.store.mem.entries(index + 1, last + 1, None, GetEntriesContext::empty(false)).map_err(|e| CoordError::Raft(e.to_string()))?;
        let hs = self.store.mem.rl().hard_state().clone();
        log.save_snapshot(&snap, &keep, &hs)?;
        self.store.set_snapshot(snap);
        // Keeps entry `index` itself, so its term stays known to the log.
        self.store.mem.wl().compact(index).map_err(|e| CoordError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Takes a snapshot if one is due (`snapshot_due`) and makes it the base of the log
    /// (`snapshot_built`). Returns whether it did.
    pub fn maybe_snapshot(&mut self, log: &mut dyn Persist, every: u64) -> Result<bool, CoordError> {
        match self.snapshot_due(every)? {
            Some(job) => {
                self.snapshot_built(job.build(), log)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A snapshot from the leader replaces this replica's log and state machine.
    fn install_snapshot(&mut self, snap: Snapshot, log: &mut dyn Persist) -> Result<(), CoordError> {
        let sm = restore_state(&snap)?;
        let meta = snap.get_metadata();
        // The commit index recorded with the snapshot is the snapshot's own: raft's may already
        // cover entries that arrived in the same Ready, which are not durable yet, and a
        // commit index beyond the log makes raft-rs refuse to start.
        let mut hs = self.raw.raft.hard_state();
        hs.commit = meta.index;
        hs.term = hs.term.max(meta.term);
        log.save_snapshot(&snap, &[], &hs)?;
        self.store.mem.wl().apply_snapshot(snap.clone()).map_err(|e| CoordError::Raft(e.to_string()))?;
        self.store.set_snapshot(snap);
        *self.state.write().expect("state lock") = sm;
        Ok(())
    }

    /// A sole voter elects itself at once instead of waiting out an election timeout.
    pub fn campaign_if_alone(&mut self) {
        let voters = self.raw.raft.prs().conf().voters().ids().len();
        if voters == 1 && self.raw.raft.prs().conf().voters().contains(self.raw.raft.id) {
            let _ = self.raw.campaign();
        }
    }

    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raw.tick();
    }

    /// The build proposals are stamped with (`Command.proposer_build`).
    pub fn set_build(&mut self, build: &str) {
        self.build = build.to_string();
    }

    /// Sets the wall clock that proposals are stamped with (`Command.proposed_unix_ms`).
    pub fn set_clock(&mut self, now_unix_ms: u64) {
        self.now_unix_ms = now_unix_ms;
    }

    /// Members heard from within `LIVE_TICKS`, this replica included.
    pub fn live(&self) -> std::collections::BTreeSet<u64> {
        let me = self.raw.raft.id;
        self.heard.iter().filter(|(_, t)| self.ticks.saturating_sub(**t) <= LIVE_TICKS).map(|(id, _)| *id).chain([me]).collect()
    }

    /// The group as the leader's raft node sees it, for the leader's duties.
    pub fn group_view(&self) -> crate::leader::GroupView {
        let (voters, learners) = self.conf();
        let matched = voters.iter().chain(&learners).filter_map(|id| Some((*id, self.matched(*id)?))).collect();
        crate::leader::GroupView { commit: self.commit_index(), voters, learners, matched, live: self.live(), pending_conf: self.has_pending_conf() }
    }

    /// The index of the last entry in this replica's log.
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Proposes a change of the coordinator group (a raft conf change whose context records
    /// the member's address and the request). One change at a time: raft would silently
    /// drop a second one proposed while the first is pending.
    ///
    /// Unless `force`d, the group after the change must keep a quorum of live voters
    /// (`membership::check_live_quorum`); a leader asked to remove itself first hands its
    /// role to a live voter that caught up, and the caller retries at the new leader.
    pub fn propose_member(&mut self, op: MemberOp, id: u64, address: String, request_id: String, force: bool, reply: Option<Reply>) {
        self.propose_member_as(op, id, address, request_id, None, force, reply)
    }

    /// `propose_member` for a caller the audit trail names.
    #[allow(clippy::too_many_arguments)]
    pub fn propose_member_as(&mut self, op: MemberOp, id: u64, address: String, request_id: String, who: Option<shoal_proto::AuditContext>, force: bool, reply: Option<Reply>) {
        let change = match op {
            MemberOp::AddLearner => Change::AddLearner(id),
            MemberOp::Promote => Change::Promote(id),
            MemberOp::Remove => Change::Remove(id),
        };
        let (voters, _) = self.conf();
        let me = self.raw.raft.id;
        let refused = if !self.is_leader() {
            Some(ApplyError::NotLeader(self.leader_id()))
        } else if self.raw.raft.has_pending_conf() {
            Some(ApplyError::Retry("a membership change is still in progress; retry".into()))
        } else if let Err(why) = if force { Ok(()) } else { check_live_quorum(&voters, change, &self.live()) } {
            Some(ApplyError::Conflict(why))
        } else if op == MemberOp::Remove && id == me {
            // A leader cannot apply its own removal and keep leading: it hands the role on.
            let last = self.last_index();
            Some(match transfer_target(me, &voters, &self.live(), last, |v| self.matched(v).unwrap_or(0)) {
                Ok(to) => {
                    self.raw.transfer_leader(to);
                    ApplyError::Retry(format!("replica {me} leads the group; handing the lead to replica {to} first; retry"))
                }
                Err(why) => ApplyError::Conflict(format!("replica {me} leads the group and cannot hand the lead on: {why}")),
            })
        } else {
            None
        };
        if let Some(why) = refused {
            if let Some(r) = reply {
                let _ = r.send(Err(why));
            }
            return;
        }
        self.next_proposal = self.next_proposal.wrapping_add(1);
        let context = MemberChange { proposal_id: self.next_proposal, id, address, request_id, audit: who, proposed_unix_ms: self.now_unix_ms }.encode_to_vec();
        let mut single = ConfChangeSingle::default();
        single.set_change_type(match op {
            MemberOp::AddLearner => ConfChangeType::AddLearnerNode,
            MemberOp::Promote => ConfChangeType::AddNode,
            MemberOp::Remove => ConfChangeType::RemoveNode,
        });
        single.node_id = id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        match (self.raw.propose_conf_change(context, cc), reply) {
            (Ok(()), Some(r)) => {
                self.pending.insert(self.next_proposal, r);
            }
            (Err(e), Some(r)) => {
                let _ = r.send(Err(ApplyError::Retry(format!("raft: {e}"))));
            }
            (_, None) => {}
        }
    }

    /// Asks the leader to hand its role to `id` (raft's leadership transfer), only if `id` is a
    /// live voter whose log has caught up: raft-rs drops proposals while a transfer is
    /// pending, so a transfer to a dead or lagging voter would stall writes.
    pub fn transfer_leader(&mut self, id: u64) -> Result<(), String> {
        let (voters, _) = self.conf();
        if !voters.contains(&id) {
            return Err(format!("replica {id} is not a voter of the group"));
        }
        let me = self.raw.raft.id;
        let last = self.last_index();
        let target = transfer_target(me, &[me, id], &self.live(), last, |v| self.matched(v).unwrap_or(0))?;
        self.raw.transfer_leader(target);
        Ok(())
    }

    /// Voters and learners as raft sees them now.
    pub fn conf(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        (cs.voters.clone(), cs.learners.clone())
    }

    /// How far `id`'s log matches the leader's (on the leader).
    pub fn matched(&self, id: u64) -> Option<u64> {
        self.raw.raft.prs().get(id).map(|p| p.matched)
    }

    pub fn has_pending_conf(&self) -> bool {
        self.raw.raft.has_pending_conf()
    }

    /// What the transport learned of a snapshot it carried to `to`: raft holds back a
    /// follower's log until it hears, and sends a new snapshot after a failure.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(to, status);
    }

    /// Steps a peer's message into raft; false when it was dropped as impossible.
    pub fn step(&mut self, msg: Message) -> bool {
        if let Err(why) = self.possible(&msg) {
            tracing::warn!(from = msg.from, kind = ?msg.get_msg_type(), why, "dropping an impossible raft message");
            return false;
        }
        self.heard.insert(msg.from, self.ticks);
        // Messages from unknown peers or stale terms are dropped by raft itself.
        let _ = self.raw.step(msg);
        true
    }

    /// What no correct peer sends, and raft-rs would answer with a panic (it trusts its
    /// peers): a heartbeat committing past this log, appended entries out of sequence or
    /// conflicting with committed ones, an acknowledgement of entries this leader never had.
    /// A fuzzed peer found these (`fuzz/`); a replica must not fall to one bad message.
    fn possible(&self, m: &Message) -> Result<(), &'static str> {
        let log = &self.raw.raft.raft_log;
        // Term 0 marks a local message to raft-rs (stepped without the term checks); from a
        // peer only forwarded proposals and read requests carry it.
        if m.term == 0 && !matches!(m.get_msg_type(), MessageType::MsgPropose | MessageType::MsgReadIndex) {
            return Err("a message without a term");
        }
        match m.get_msg_type() {
            // Replicas never forward proposals (only a leader proposes); a forwarded read
            // request carries no term (raft-rs would forward one that does and panic).
            MessageType::MsgPropose => Err("a proposal from a peer"),
            // A leader hands on its role itself (`transfer_leader`); no peer asks it to.
            MessageType::MsgTransferLeader => Err("a leader transfer from a peer"),
            MessageType::MsgReadIndex if m.term != 0 => Err("a read request with a term"),
            MessageType::MsgHeartbeat if m.term >= self.raw.raft.term && m.commit > log.last_index() => Err("a heartbeat commits past this replica's log"),
            MessageType::MsgAppend => {
                // Only the empty log's start has term 0 (raft-rs reads any index past its log
                // as term 0, so such an append would "match" anywhere).
                if m.index > 0 && m.log_term == 0 {
                    return Err("appended entries after an entry without a term");
                }
                let mut prev = (m.index, m.log_term);
                for e in m.get_entries() {
                    if e.index != prev.0 + 1 || e.term == 0 || e.term < prev.1 || e.term > m.term {
                        return Err("appended entries out of sequence");
                    }
                    if e.index <= log.committed && log.term(e.index).is_ok_and(|t| t != e.term) {
                        return Err("an appended entry conflicts with a committed one");
                    }
                    prev = (e.index, e.term);
                }
                Ok(())
            }
            MessageType::MsgAppendResponse if !m.reject && m.index > log.last_index() => Err("an acknowledgement past this leader's log"),
            _ => Ok(()),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn role(&self) -> &'static str {
        match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Proposes `cmd`; `reply` (if any) gets the apply result. Fails at once when this
    /// replica is not the leader.
    pub fn propose(&mut self, mut cmd: Command, reply: Option<Reply>) -> Result<(), CoordError> {
        self.next_proposal = self.next_proposal.wrapping_add(1);
        cmd.proposal_id = self.next_proposal;
        cmd.proposed_unix_ms = self.now_unix_ms;
        cmd.proposer_build = self.build.clone();
        let bytes = cmd.encode_to_vec();
        let proposed = if !self.is_leader() {
            Err(CoordError::NotLeader(self.leader_id()))
        } else if bytes.len() > MAX_COMMAND {
            Err(CoordError::TooLarge(bytes.len()))
        } else {
            self.raw.propose(vec![], bytes).map_err(|e| CoordError::Raft(e.to_string()))
        };
        match (proposed, reply) {
            (Ok(()), Some(r)) => {
                self.pending.insert(cmd.proposal_id, r);
                Ok(())
            }
            (Ok(()), None) => Ok(()),
            (Err(e), r) => {
                // The caller hears why at once instead of waiting for a reply that never comes.
                if let Some(r) = r {
                    let _ = r.send(Err(ApplyError::from_core(&e)));
                }
                Err(e)
            }
        }
    }

    /// Drops waiting proposals whose caller gave up, and fails all of them after losing the
    /// lead (their entries may still commit, but this replica cannot tell).
    pub fn sweep_pending(&mut self) {
        if !self.is_leader() {
            for (_, r) in self.pending.drain() {
                let _ = r.send(Err(ApplyError::Retry("leadership changed before the request committed; retry".into())));
            }
        } else {
            self.pending.retain(|_, r| !r.is_closed());
        }
        self.reads.retain(|_, (_, r)| !r.is_closed());
    }

    /// Starts a linearizable read (raft's ReadIndex: the leader confirms with a quorum that it
    /// still leads, and its commit index becomes the read index; a follower asks the leader).
    /// `reply` hears once this replica has applied up to that index.
    pub fn read_index(&mut self, reply: ReadReply) {
        if self.leader_id() == 0 {
            let _ = reply.send(Err("no leader known yet; retry".into()));
            return;
        }
        self.next_read += 1;
        self.raw.read_index(self.next_read.to_le_bytes().to_vec());
        self.reads.insert(self.next_read, (None, reply));
    }

    /// Answers the reads whose index this replica has applied.
    fn release_reads(&mut self) {
        let applied = self.applied_index();
        let done: Vec<u64> = self.reads.iter().filter(|(_, (at, _))| at.is_some_and(|i| i <= applied)).map(|(k, _)| *k).collect();
        for k in done {
            if let Some((_, r)) = self.reads.remove(&k) {
                let _ = r.send(Ok(()));
            }
        }
    }

    /// Processes one Ready: persists, sends, applies.
    ///
    /// Messages go to `send` as soon as they may: a leader's appends before it persists the
    /// same entries (its followers' fsyncs then run alongside its own), everything that
    /// depends on what this Ready persists after it is durable.
    pub fn on_ready(&mut self, log: &mut dyn Persist, send: &mut dyn FnMut(Vec<Message>)) -> Result<(), CoordError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        send(rd.take_messages());
        for rs in rd.read_states() {
            let key = rs.request_ctx.as_slice().try_into().map(u64::from_le_bytes).ok();
            if let Some((at, _)) = key.and_then(|k| self.reads.get_mut(&k)) {
                *at = Some(rs.index);
            }
        }
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), log)?;
        }
        // Applied after raft has taken the Ready back (below): applying a change that removes
        // this replica while it leads makes it step down, which must not happen inside one.
        let committed = rd.take_committed_entries();
        if !rd.entries().is_empty() {
            log.append_entries(rd.entries())?;
            self.store.mem.wl().append(rd.entries()).map_err(|e| CoordError::Raft(e.to_string()))?;
        }
        // Entries, a term and a vote must be durable before the messages that rely on them go
        // out; a commit index alone need not (it comes back from the quorum), so a Ready
        // that only moves it costs no fsync: its record goes with the next one.
        let mut must_sync = !rd.entries().is_empty();
        if let Some(hs) = rd.hs() {
            log.set_hard_state(hs)?;
            let before = self.store.mem.rl().hard_state().clone();
            must_sync |= hs.term != before.term || hs.vote != before.vote;
            self.store.mem.wl().set_hardstate(hs.clone());
        }
        if must_sync {
            log.sync()?;
        }
        send(rd.take_persisted_messages());
        let mut light = self.raw.advance_append(rd);
        if let Some(commit) = light.commit_index() {
            // Recorded with the next sync, not synced now: a commit index that is lost comes
            // back from the quorum, and applying needs only that the entries are durable.
            let mut hs = self.store.mem.rl().hard_state().clone();
            hs.commit = commit;
            log.set_hard_state(&hs)?;
            self.store.mem.wl().set_hardstate(hs);
        }
        send(light.take_messages());
        self.apply(committed)?;
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.release_reads();
        self.export_metrics();
        Ok(())
    }

    /// This replica's Raft figures into its Prometheus series (`node`: `coordinator-ID`).
    fn export_metrics(&mut self) {
        let m = shoal_core::telemetry::metrics();
        let labels = shoal_core::telemetry::NodeLabels { node: format!("coordinator-{}", self.raw.raft.id) };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.raft_commit_index.get_or_create(&labels).set(gauge(self.commit_index()));
        m.raft_applied_index.get_or_create(&labels).set(gauge(self.state.read().map(|s| s.applied_index).unwrap_or(0)));
        m.raft_term.get_or_create(&labels).set(gauge(self.term()));
        m.raft_is_leader.get_or_create(&labels).set(i64::from(self.is_leader()));
        let leader = self.leader_id();
        if leader != 0 && leader != self.known_leader {
            m.raft_leader_changes.get_or_create(&labels).inc();
        }
        if leader != 0 {
            self.known_leader = leader;
        }
        // Counting walks the jobs: about once a second (ten ticks), not on every Ready.
        if self.ticks / 10 != self.counted_at {
            self.counted_at = self.ticks / 10;
            let (jobs, workers) = self.state.read().map(|s| s.counts()).unwrap_or_default();
            for (family, counts, states) in [(&m.jobs, jobs, &["queued", "running", "succeeded", "failed", "cancelled"][..]), (&m.workers, workers, &["idle", "busy", "lost"][..])] {
                for s in states.iter().copied().chain(counts.keys().copied().filter(|k| !states.contains(k))) {
                    family.get_or_create(&shoal_core::telemetry::CountLabels { node: labels.node.clone(), state: s.into() }).set(counts.get(s).copied().unwrap_or(0));
                }
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), CoordError> {
        for e in entries {
            self.state.write().expect("state lock").note_entry(e.index, &e.data);
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        // The empty entry a new leader appends.
                        self.state.write().expect("state lock").applied_index = e.index;
                        continue;
                    }
                    let result = match Command::decode(&e.data[..]) {
                        Ok(cmd) => {
                            let id = cmd.proposal_id;
                            let r = self.state.write().expect("state lock").apply(e.index, cmd);
                            Some((id, r))
                        }
                        Err(err) => {
                            tracing::error!(index = e.index, %err, "undecodable log entry skipped");
                            None
                        }
                    };
                    if let Some((id, r)) = result {
                        if let Some(reply) = self.pending.remove(&id) {
                            let _ = reply.send(r);
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|e| CoordError::Raft(e.to_string()))?;
                    let cs = self.raw.apply_conf_change(&cc).map_err(|e| CoordError::Raft(e.to_string()))?;
                    self.store.mem.wl().set_conf_state(cs);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|e| CoordError::Raft(e.to_string()))?;
                    let cs = self.raw.apply_conf_change(&cc).map_err(|e| CoordError::Raft(e.to_string()))?;
                    let removed_leader = self.is_leader() && !cs.voters.contains(&self.raw.raft.id);
                    self.store.mem.wl().set_conf_state(cs.clone());
                    self.conf_changed = true;
                    if removed_leader {
                        // A leader that applies its own removal (leadership moved back to it
                        // while the change was in flight) steps down into the next term:
                        // raft-rs would otherwise go on leading without itself in the group.
                        let term = self.raw.raft.term;
                        self.raw.raft.become_follower(term + 1, raft::INVALID_ID);
                    }
                    // The state machine keeps who the members are and where (the entry's context).
                    let change = MemberChange::decode(&e.context[..]).unwrap_or_default();
                    let mut result = Ok(ApplyOutput::None);
                    for single in cc.get_changes() {
                        let op = match single.get_change_type() {
                            ConfChangeType::AddLearnerNode => MemberOp::AddLearner,
                            ConfChangeType::AddNode => MemberOp::Promote,
                            ConfChangeType::RemoveNode => MemberOp::Remove,
                        };
                        result = self.state.write().expect("state lock").apply_member_change(e.index, op, single.node_id, &change, change.audit.clone());
                    }
                    // The members are exactly raft's configuration after the change (the group
                    // a cluster started with is recorded at its first change).
                    self.state.write().expect("state lock").sync_members(&cs.voters, &cs.learners);
                    if let Some(reply) = self.pending.remove(&change.proposal_id) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::ConfState;
    use shoal_proto::{command, DatasetInfo};

    struct NoDisk;

    impl Persist for NoDisk {
        fn append_entries(&mut self, _: &[Entry]) -> Result<(), CoordError> {
            Ok(())
        }
        fn set_hard_state(&mut self, _: &HardState) -> Result<(), CoordError> {
            Ok(())
        }
        fn sync(&mut self) -> Result<(), CoordError> {
            Ok(())
        }
        fn save_snapshot(&mut self, _: &Snapshot, _: &[Entry], _: &HardState) -> Result<(), CoordError> {
            Ok(())
        }
    }

    #[test]
    fn a_command_too_large_to_replay_is_refused_before_it_is_proposed() {
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1], vec![])));
        let mut core = Core::new(1, RaftStore::new(storage, None), Arc::default()).unwrap();
        core.campaign_if_alone();
        while !core.is_leader() {
            core.on_ready(&mut NoDisk, &mut |_| {}).unwrap();
        }
        let huge = DatasetInfo { name: "x".repeat(MAX_COMMAND + 1), ..Default::default() };
        let cmd = Command { kind: Some(command::Kind::RegisterDataset(huge)), ..Default::default() };
        let e = core.propose(cmd, None).unwrap_err();
        assert!(matches!(e, CoordError::TooLarge(n) if n > MAX_COMMAND), "{e}");
        assert!(e.to_string().contains("16777216"), "{e}");
    }
}
