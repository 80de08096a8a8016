//! Fuzz harnesses: each takes arbitrary bytes and drives one decoder or state transition that
//! input from outside reaches (a listener, a file being imported, a spec, a token, a path).
//! Each must return, whatever the bytes; an error is an answer, a panic a bug.
//!
//! The same functions run under libFuzzer (`fuzz_targets/`, `cargo +nightly fuzz run NAME
//! --features libfuzzer`) and as property tests on every `cargo test` (`tests/properties.rs`,
//! a small budget). A crash found either way becomes a case in `tests/regressions.rs`.

use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message as RaftMessage, MessageType, Snapshot};
use raft::storage::MemStorage;
use shoal_coordinator::node::{Core, Persist, RaftStore};
use shoal_coordinator::state::StateMachine;
use shoal_core::store::Store;
use shoal_proto::*;

/// A harness: bytes in, a panic only for a bug.
pub type Harness = fn(&[u8]);

/// Every target, by name (what `fuzz_targets/` and the property tests run).
pub const TARGETS: &[(&str, Harness)] = &[
    ("listener_messages", listener_messages),
    ("command_apply", command_apply),
    ("raft_step", raft_step),
    ("idx", idx),
    ("csv", csv),
    ("npy", npy),
    ("safetensors", safetensors),
    ("shard", shard),
    ("text", text),
    ("specs", specs),
    ("ring_hello", ring_hello),
    ("token", token),
    ("store_key", store_key),
    ("sealed_records", sealed_records),
];

/// Every message a listener decodes (the coordinator's API, the Raft transport, the workers'
/// data plane), then what the Raft transport does with an envelope's inner message.
pub fn listener_messages(data: &[u8]) {
    use prost::Message as _;
    macro_rules! decode_all {
        ($($t:ty),* $(,)?) => { $( let _ = <$t>::decode(data); )* };
    }
    decode_all!(
        AddCoordinatorRequest, CancelJobRequest, CheckpointCommit, CheckpointError, Chunk, CreateTokenRequest, DatasetSettingsRequest,
        DeregisterRequest, DropImportRequest, GetDatasetRequest, GetJobRequest, GetModelRequest, GetObjectRequest, HeartbeatRequest,
        JobMetricsRequest, JoinCheckRequest, ListAuditRequest, ListDatasetsRequest, ListJobsRequest, ListModelsRequest,
        ListPipelineRunsRequest, ListPipelinesRequest, ListTemplatesRequest, ListTokensRequest, MetricChunkReport, ModelAliasRequest,
        ObjectChunk, OutcomeReport, PausePipelineRequest, PeerHello, PipelineRunRequest, PlanPipelineRequest, ProgressReport,
        PruneRequest, RaftBatch, RaftChunk, RegisterDatasetRequest, RegisterModelRequest, RegisterWorkerRequest,
        RemoveCoordinatorRequest, ResumeJobRequest, ResumePipelineRequest, RevokeTokenRequest, RunPipelineRequest, SettingsRequest,
        StatusRequest, SubmitJobRequest, SubmitPipelineRequest, TaskReport, TransferLeaderRequest, VerifyAuditRequest,
        StateSnapshot, AuditSegmentFile,
    );
    if let Ok(env) = RaftEnvelope::decode(data) {
        let _ = RaftMessage::parse_from_bytes(&env.message);
    }
    let _ = RaftMessage::parse_from_bytes(data);
    // A snapshot's bytes become a state machine (a follower installs what a leader sends).
    if let Ok(s) = StateSnapshot::decode(data) {
        if let Ok(sm) = StateMachine::from_snapshot(s) {
            let _ = sm.state_hash();
        }
    }
}

/// A state machine with a dataset and a job, as commands find one.
fn a_state() -> StateMachine {
    let mut sm = StateMachine::default();
    let ds = DatasetInfo {
        name: "d".into(),
        version: 1,
        records: 100,
        feature_shape: vec![4],
        classes: 2,
        feature_dtype: "f32".into(),
        shards: vec![ShardInfo { path: "datasets/d/import-1/shard-00000.safetensors".into(), records: 100, blake3: "0".repeat(64), bytes: 1600 }],
        ..Default::default()
    };
    let _ = sm.apply(1, Command { kind: Some(command::Kind::RegisterDataset(ds)), ..Default::default() });
    let spec = "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 80]\ntest = [80, 100]\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 2\n";
    let _ = sm.apply(2, Command { kind: Some(command::Kind::SubmitJob(spec.into())), ..Default::default() });
    sm
}

/// Commands as a log delivers them (length-prefixed), applied in order: apply validates each
/// against the state; the state then survives a snapshot's round trip unchanged.
pub fn command_apply(data: &[u8]) {
    use prost::Message as _;
    let mut sm = a_state();
    for (i, piece) in pieces(data).enumerate() {
        if let Ok(cmd) = Command::decode(piece) {
            let _ = sm.apply(10 + i as u64, cmd);
        }
    }
    let _ = sm.take_effects();
    let back = StateMachine::from_snapshot(sm.to_snapshot()).expect("a state's own snapshot restores");
    assert_eq!(back.state_hash(), sm.state_hash(), "a snapshot's round trip changed the state");
}

/// `data` as length-prefixed pieces (a u16 each), the last one what is left.
fn pieces(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < 2 {
            let p = rest;
            rest = &[];
            return Some(p);
        }
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let p = &rest[2..2 + n];
        rest = &rest[2 + n..];
        Some(p)
    })
}

struct NoDisk;

impl Persist for NoDisk {
    fn append_entries(&mut self, _: &[Entry]) -> Result<(), shoal_coordinator::CoordError> {
        Ok(())
    }
    fn set_hard_state(&mut self, _: &HardState) -> Result<(), shoal_coordinator::CoordError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), shoal_coordinator::CoordError> {
        Ok(())
    }
    fn save_snapshot(&mut self, _: &Snapshot, _: &[Entry], _: &HardState) -> Result<(), shoal_coordinator::CoordError> {
        Ok(())
    }
}

/// A little-endian reader that runs dry into zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map(|(b, r)| (*b, r)).unwrap_or((0, &[]));
        self.0 = rest;
        b
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Replica 1 of a group of 3, with a dataset and a job in its state (as `raft_step` uses).
pub fn replica() -> (Core, Arc<RwLock<StateMachine>>) {
    let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    let state = Arc::new(RwLock::new(a_state()));
    let core = Core::new_simulated(1, RaftStore::new(storage, None), state.clone(), 7).expect("a core over an empty log");
    (core, state)
}

/// Steps `msg` into `core` and handles the Ready: whether raft took the message.
pub fn deliver(core: &mut Core, msg: RaftMessage) -> bool {
    let taken = core.step(msg);
    core.on_ready(&mut NoDisk, &mut |_| {}).expect("no disk to fail");
    taken
}

/// Raft messages from peers, stepped into replica 1 of a group of 3, with its Ready handled
/// after each (entries a message commits are applied: their bytes decoded as commands). The
/// first byte picks the messages' form: protobuf bytes as the transport receives them, or
/// messages built field by field from the bytes (which reach further into raft).
pub fn raft_step(data: &[u8]) {
    let (mut core, state) = replica();
    let mut b = Bytes(data);
    let raw = b.u8().is_multiple_of(2);
    let mut n = 0;
    while !b.0.is_empty() && n < 64 {
        n += 1;
        let msg = if raw {
            let len = b.u8() as usize * 4;
            match RaftMessage::parse_from_bytes(b.take(len)) {
                Ok(m) => m,
                Err(_) => continue,
            }
        } else {
            built_message(&mut b)
        };
        // The transport only delivers messages addressed to this replica from a peer.
        let mut msg = msg;
        msg.to = 1;
        if !(2..=3).contains(&msg.from) {
            msg.from = 2;
        }
        core.step(msg);
        if b.u8().is_multiple_of(4) {
            core.tick();
        }
        let _ = core.on_ready(&mut NoDisk, &mut |_| {});
    }
    let sm = state.read().expect("state lock");
    let _ = sm.state_hash();
}

fn built_message(b: &mut Bytes) -> RaftMessage {
    const TYPES: [MessageType; 12] = [
        MessageType::MsgAppend,
        MessageType::MsgAppendResponse,
        MessageType::MsgRequestVote,
        MessageType::MsgRequestVoteResponse,
        MessageType::MsgHeartbeat,
        MessageType::MsgHeartbeatResponse,
        MessageType::MsgTransferLeader,
        MessageType::MsgTimeoutNow,
        MessageType::MsgReadIndex,
        MessageType::MsgReadIndexResp,
        MessageType::MsgRequestPreVote,
        MessageType::MsgRequestPreVoteResponse,
    ];
    let mut m = RaftMessage::default();
    m.set_msg_type(TYPES[b.u8() as usize % TYPES.len()]);
    m.from = 1 + b.u8() as u64 % 3;
    m.term = b.u8() as u64 % 6;
    m.log_term = b.u8() as u64 % 6;
    m.index = b.u8() as u64 % 12;
    m.commit = b.u8() as u64 % 12;
    m.reject = b.u8().is_multiple_of(5);
    let entries = b.u8() % 4;
    let mut list = Vec::new();
    for i in 0..entries {
        let mut e = Entry::default();
        e.set_entry_type(if b.u8().is_multiple_of(8) { EntryType::EntryConfChangeV2 } else { EntryType::EntryNormal });
        e.term = m.log_term.max(1);
        e.index = m.index + 1 + i as u64;
        let len = b.u8() as usize;
        e.data = b.take(len).to_vec().into();
        list.push(e);
    }
    m.set_entries(list.into());
    m
}

/// An IDX file (MNIST's format).
pub fn idx(data: &[u8]) {
    let _ = shoal_core::idx::parse_idx(data);
}

/// A CSV file, read for class labels and for float targets.
pub fn csv(data: &[u8]) {
    let _ = shoal_core::csv::records_from_csv("f.csv", data, "label", &[]);
    let _ = shoal_core::csv::records_from_csv_target("f.csv", data, "y");
}

/// Two `.npy` files (features, then labels or targets): the first two bytes say the first's
/// length.
pub fn npy(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let rest = &data[2..];
    let at = u16::from_le_bytes([data[0], data[1]]) as usize % (rest.len() + 1);
    let (x, y) = rest.split_at(at);
    let _ = shoal_core::dataset::records_from_npy(&[("x.npy".into(), x), ("y.npy".into(), y)]);
    let _ = shoal_core::dataset::records_from_npy(&[("x.npy".into(), rest)]);
}

/// A safetensors file with `x` and `y` (an import).
pub fn safetensors(data: &[u8]) {
    let _ = shoal_core::dataset::records_from_safetensors("f.safetensors", data);
}

/// A dataset shard as a worker maps it, against the manifest's claims.
pub fn shard(data: &[u8]) {
    let mut b = Bytes(data);
    let (records, width, f) = (b.u8() as u64, b.u8() as u32 % 3, 1 + b.u8() as u64 % 8);
    let info = ShardInfo { path: "datasets/d/i/s.safetensors".into(), records, blake3: String::new(), bytes: b.0.len() as u64 };
    let _ = shoal_core::dataset::parse_shard("s", b.0, &info, &[f], width);
}

/// Text as a language model's dataset: byte windows of a context the first bytes pick.
pub fn text(data: &[u8]) {
    let mut b = Bytes(data);
    let (context, stride) = (b.u8() as usize, b.u8() as usize);
    let _ = shoal_core::text::windows(b.0, context, stride);
    let _ = shoal_core::text::slice_stats(b.0);
}

/// The TOML specs: a job, a batch job, a pipeline.
pub fn specs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = shoal_core::JobSpec::parse(&text);
    let _ = shoal_core::batch::BatchSpec::parse(&text);
    let _ = shoal_core::batch::is_batch(&text);
    let _ = shoal_core::pipeline::PipelineSpec::parse(&text);
}

/// The first bytes a connection to a worker's raw-TCP ring sends.
pub fn ring_hello(data: &[u8]) {
    if let Ok((job, generation, rank, world)) = shoal_worker::collective::tcp::decode_hello(data) {
        assert!(rank < world, "a hello of rank {rank} in a ring of {world} was accepted");
        assert_eq!(shoal_worker::collective::tcp::encode_hello(job, generation, rank, world)[..], data[..32]);
    }
}

/// A bearer token, a peer token, a method path.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = shoal_core::auth::Token::parse(&text) {
        assert_eq!(shoal_core::auth::Token::parse(&t.to_string()).map(|u| u.to_string()).ok(), Some(t.to_string()));
    }
    let _ = shoal_core::auth::is_peer_token(&text);
    let _ = shoal_core::auth::access(&text);
    let _ = shoal_core::auth::Role::parse(&text);
}

/// A store key: one the store takes never names a file outside its root.
pub fn store_key(data: &[u8]) {
    let key = String::from_utf8_lossy(data);
    let root = std::path::Path::new("/nonexistent-shoal-store-root");
    let store = Store::local(root);
    if let Ok(Some(path)) = store.local_path(&key) {
        assert!(path.starts_with(root) && path != root, "{key:?} names {}", path.display());
        assert!(path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_))), "{key:?}: {}", path.display());
    }
}

/// The data plane's sealed TLS records (`worker::collective::secure`). The first byte picks
/// the read size and the mode: even, the rest is a peer's bytes (whatever they are, an error
/// or data, never a panic); odd, the rest (after a 2-byte position) is plaintext, split at
/// 0xff into writes, sealed here: it must open to exactly that plaintext, and with any one
/// byte altered it must not open at all.
pub fn sealed_records(data: &[u8]) {
    use shoal_worker::collective::secure::fuzzing::{open, seal};
    let Some((&mode, rest)) = data.split_first() else { return };
    let read_size = 1 + (mode as usize >> 1) * 131;
    if mode & 1 == 0 {
        let _ = open(rest, read_size);
        return;
    }
    let Some((at, body)) = rest.split_first_chunk::<2>() else { return };
    let pieces: Vec<&[u8]> = body.split(|&b| b == 0xff).collect();
    let wire = seal(&pieces);
    let plain = pieces.concat();
    assert_eq!(open(&wire, read_size).expect("sealed records open"), plain);
    if !wire.is_empty() {
        let mut altered = wire.clone();
        let i = u16::from_le_bytes(*at) as usize % altered.len();
        altered[i] ^= mode;
        assert!(open(&altered, read_size).is_err(), "records altered at byte {i} of {} opened", wire.len());
    }
}
