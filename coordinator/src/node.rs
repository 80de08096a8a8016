//! The sans-IO core of a coordinator replica: a raft-rs `RawNode` plus the state machine.
//! It does no IO itself: the shell feeds it ticks, proposals and peer messages, hands it a
//! `Persist` sink for the log, and sends the messages that `on_ready` returns. So a simulation
//! can drive several cores in one thread.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, HardState, Message};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};
use shoal_proto::{Command, Message as _};
use tokio::sync::oneshot;

use crate::state::{ApplyResult, StateMachine};
use crate::CoordError;

/// Where the core's log goes. The real one is `storage::LogFile`; tests may keep it in memory.
pub trait Persist {
    fn append_entries(&mut self, entries: &[Entry]) -> Result<(), CoordError>;
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), CoordError>;
    /// Makes everything above durable.
    fn sync(&mut self) -> Result<(), CoordError>;
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
}

pub type Reply = oneshot::Sender<ApplyResult>;

pub struct Core {
    raw: RawNode<MemStorage>,
    state: Arc<RwLock<StateMachine>>,
    /// Proposals made here that wait for their entry to apply, by proposal id.
    pending: HashMap<u64, Reply>,
    next_proposal: u64,
}

/// The largest command one Raft entry may carry, checked before it is proposed: the log's
/// frame limit is 64 MiB, and an entry that was acknowledged must never be too large to
/// replay.
pub const MAX_COMMAND: usize = 16 << 20;

/// Raft timing in ticks; the shell ticks every `TICK`.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;

impl Core {
    pub fn new(id: u64, storage: MemStorage, state: Arc<RwLock<StateMachine>>) -> Result<Core, CoordError> {
        let cfg = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            // Applied index 0: every committed entry is re-applied on start, which rebuilds
            // the state machine from the log.
            applied: 0,
            ..Default::default()
        };
        cfg.validate().map_err(|e| CoordError::Raft(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&cfg, storage, &logger).map_err(|e| CoordError::Raft(e.to_string()))?;
        // A proposal id must not repeat across restarts of this replica: start from the
        // current time's nanos, tagged with the replica id.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Ok(Core { raw, state, pending: HashMap::new(), next_proposal: seed ^ (id << 56) })
    }

    /// A sole voter elects itself at once instead of waiting out an election timeout.
    pub fn campaign_if_alone(&mut self) {
        let voters = self.raw.raft.prs().conf().voters().ids().len();
        if voters == 1 && self.raw.raft.prs().conf().voters().contains(self.raw.raft.id) {
            let _ = self.raw.campaign();
        }
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    pub fn step(&mut self, msg: Message) {
        // Messages from unknown peers or stale terms are dropped by raft itself.
        let _ = self.raw.step(msg);
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
                    let _ = r.send(Err(e.to_string()));
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
                let _ = r.send(Err("leadership changed before the request committed; retry".into()));
            }
        } else {
            self.pending.retain(|_, r| !r.is_closed());
        }
    }

    /// Processes one Ready: persists, applies, and returns the messages to send.
    pub fn on_ready(&mut self, log: &mut dyn Persist) -> Result<Vec<Message>, CoordError> {
        let mut out = Vec::new();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        out.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            // Snapshots are not produced yet (the log is never compacted).
            return Err(CoordError::Raft("received a snapshot; snapshots are not supported yet".into()));
        }
        self.apply(rd.take_committed_entries())?;
        if !rd.entries().is_empty() {
            log.append_entries(rd.entries())?;
            self.raw.store().wl().append(rd.entries()).map_err(|e| CoordError::Raft(e.to_string()))?;
        }
        if let Some(hs) = rd.hs() {
            log.set_hard_state(hs)?;
            self.raw.store().wl().set_hardstate(hs.clone());
        }
        log.sync()?;
        out.extend(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().rl().hard_state().clone();
            hs.commit = commit;
            log.set_hard_state(&hs)?;
            log.sync()?;
            self.raw.store().wl().set_hardstate(hs);
        }
        out.extend(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), CoordError> {
        for e in entries {
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
                    self.raw.store().wl().set_conf_state(cs);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|e| CoordError::Raft(e.to_string()))?;
                    let cs = self.raw.apply_conf_change(&cc).map_err(|e| CoordError::Raft(e.to_string()))?;
                    self.raw.store().wl().set_conf_state(cs);
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
    }

    #[test]
    fn a_command_too_large_to_replay_is_refused_before_it_is_proposed() {
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1], vec![])));
        let mut core = Core::new(1, storage, Arc::default()).unwrap();
        core.campaign_if_alone();
        while !core.is_leader() {
            core.on_ready(&mut NoDisk).unwrap();
        }
        let huge = DatasetInfo { name: "x".repeat(MAX_COMMAND + 1), ..Default::default() };
        let cmd = Command { proposal_id: 0, request_id: String::new(), kind: Some(command::Kind::RegisterDataset(huge)) };
        let e = core.propose(cmd, None).unwrap_err();
        assert!(matches!(e, CoordError::TooLarge(n) if n > MAX_COMMAND), "{e}");
        assert!(e.to_string().contains("16777216"), "{e}");
    }
}
