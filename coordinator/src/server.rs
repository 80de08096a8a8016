//! The coordinator's shell: it owns the sockets, the log file and the clock, and drives the
//! sans-IO `Core` in one Ready loop. The gRPC handlers only read the state machine or send
//! proposals to the loop through a bounded channel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::Message as RaftMessage;
use shoal_proto::coordinator_server::{Coordinator, CoordinatorServer};
use shoal_proto::raft_transport_client::RaftTransportClient;
use shoal_proto::raft_transport_server::{RaftTransport, RaftTransportServer};
use shoal_proto::*;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::client::MAX_MESSAGE;
use crate::node::{Core, RaftStore, ReadReply, Reply, TICK};
use crate::state::{ApplyOutput, ApplyResult, MemberOp, StateMachine};
use crate::storage::LogFile;
use crate::CoordError;

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub id: u64,
    /// Every voter's id and address, this replica's included.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    pub store_dir: PathBuf,
    /// A worker that sends no heartbeat for this long is declared lost.
    pub lease: Duration,
    /// The cluster this replica belongs to. None: the one its data folder records, or (a new
    /// folder) one derived from the peer list, so replicas started alike agree.
    pub cluster_id: Option<String>,
    /// How this replica comes to its group.
    pub initial: InitialState,
    /// Snapshot the state machine and compact the log every this many applied entries.
    pub snapshot_every: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitialState {
    /// A new group (or a restart): a new folder starts with the given peers as voters.
    New,
    /// The group exists already: this replica's data folder must hold its state.
    Existing,
    /// Joining a running group (after `AddCoordinator`): starts with no voters and waits for
    /// the leader's snapshot.
    Join,
}

/// The default of `CoordinatorConfig::snapshot_every` (etcd's default snapshot count too).
pub const SNAPSHOT_EVERY: u64 = 100_000;

/// Reads, checks or (new folder) writes the data folder's identity; returns the cluster id.
fn check_identity(cfg: &CoordinatorConfig) -> Result<String, CoordError> {
    let path = cfg.data_dir.join("identity.pb");
    let shown = cfg.data_dir.display();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id = ReplicaIdentity::decode(&bytes[..]).map_err(|e| CoordError::Identity(format!("{}: corrupt: {e}", path.display())))?;
            if id.node_id != cfg.id {
                return Err(CoordError::Identity(format!(
                    "{shown} holds the state of replica {} of cluster {}; refusing to run it as replica {}",
                    id.node_id, id.cluster_id, cfg.id
                )));
            }
            if let Some(c) = cfg.cluster_id.as_ref().filter(|c| **c != id.cluster_id) {
                return Err(CoordError::Identity(format!("{shown} belongs to cluster {}, not {c}", id.cluster_id)));
            }
            Ok(id.cluster_id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cfg.initial == InitialState::Existing && !cfg.data_dir.join("raft.log").exists() {
                return Err(CoordError::Identity(format!(
                    "{shown} holds no state, but replica {} belongs to an existing cluster: its log and votes are gone (a wiped or wrong folder). \
                     Rejoining as if it never voted could elect two leaders; remove the replica from the group and add a new one instead",
                    cfg.id
                )));
            }
            let cluster_id = cfg.cluster_id.clone().unwrap_or_else(|| {
                let peers: Vec<String> = cfg.peers.iter().map(|(id, a)| format!("{id}={a}")).collect();
                blake3::hash(peers.join(",").as_bytes()).to_hex()[..16].to_string()
            });
            let id = ReplicaIdentity { cluster_id: cluster_id.clone(), node_id: cfg.id };
            shoal_core::fsutil::write_atomic(&path, &id.encode_to_vec()).map_err(|e| CoordError::Io(e.to_string()))?;
            Ok(cluster_id)
        }
        Err(e) => Err(CoordError::Io(format!("{}: {e}", path.display()))),
    }
}

// A command lives here only on its way into the log: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Input {
    Propose(Command, Reply),
    Raft(RaftMessage),
    /// Whether a snapshot reached a follower.
    SnapshotSent { to: u64, delivered: bool },
    /// A linearizable read waiting for its read index.
    Read(ReadReply),
    /// A change of the coordinator group.
    Member { op: MemberOp, id: u64, address: String, request_id: String, reply: Reply },
    TransferLeader(u64),
}

/// A learner whose log is within this many entries of the leader's commit is promoted.
const PROMOTE_LAG: u64 = 16;

/// How long a read waits for its read index: under a client's attempt timeout, so the client
/// hears "retry" rather than its own timeout.
const READ_TIMEOUT: Duration = Duration::from_millis(1500);

/// Raft messages sent to a peer in one batch at most.
const RAFT_BATCH: usize = 256;

/// Snapshots go to followers in pieces of this size; one may total at most `MAX_SNAPSHOT`.
const SNAPSHOT_PIECE: usize = 1 << 20;
const MAX_SNAPSHOT: usize = 1 << 30;

#[derive(Default)]
struct RaftView {
    role: &'static str,
    term: u64,
    commit: u64,
    leader_id: u64,
    snapshot_index: u64,
    learners: Vec<u64>,
}

/// Leader-only bookkeeping that is not replicated: rebuilt (with a grace period) by each new
/// leader.
#[derive(Default)]
struct Volatile {
    last_seen: HashMap<String, Instant>,
    /// Workers that registered or heartbeated since this replica became leader: the only
    /// ones placed (a worker known from the log may be long dead).
    heard: HashSet<String>,
    /// Latest progress report per job: (generation, progress, when it was last replicated).
    progress: HashMap<u64, (u64, JobProgress, Option<Instant>)>,
    /// Queued training jobs that batch attempts keep from starting, and since when (this
    /// leader's clock): past `PREEMPT_AFTER`, the attempts are stopped.
    waiting_since: HashMap<u64, Instant>,
}

/// How long a training job waits for batch attempts to end on their own before they are
/// stopped to free its workers (a shard's task usually ends well within it).
const PREEMPT_AFTER: Duration = Duration::from_secs(2);

struct Shared {
    cfg: CoordinatorConfig,
    cluster_id: String,
    /// Raft messages refused (see `RaftTransport::send`).
    dropped: std::sync::atomic::AtomicU64,
    /// Every member's address: the group the log records (the addresses given on the
    /// command line win, so a cluster restarted on new ports finds itself), or, until the
    /// log records one, the command line's.
    addresses: RwLock<BTreeMap<u64, String>>,
    address: String,
    state: Arc<RwLock<StateMachine>>,
    view: RwLock<RaftView>,
    volatile: Mutex<Volatile>,
    inbox: mpsc::Sender<Input>,
}

const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
const PROGRESS_FLUSH: Duration = Duration::from_secs(2);
const INBOX: usize = 4096;

/// Runs one coordinator replica on `listener` until `shutdown` resolves.
pub async fn serve(
    cfg: CoordinatorConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    if !cfg.peers.contains_key(&cfg.id) {
        return Err(CoordError::Config(format!("peer list {:?} does not include this replica's id {}", cfg.peers.keys(), cfg.id)));
    }
    for dir in [&cfg.data_dir, &cfg.store_dir] {
        shoal_core::fsutil::create_dirs_durably(dir).map_err(|e| CoordError::Io(format!("{}: {e}", dir.display())))?;
    }
    let lock_path = cfg.data_dir.join("LOCK");
    let lock = std::fs::File::create(&lock_path).map_err(|e| CoordError::Io(format!("{}: {e}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(CoordError::Locked(cfg.data_dir.display().to_string()));
    }
    let cluster_id = check_identity(&cfg)?;
    // A joining replica knows no voters: the group's snapshot tells it.
    let voters: Vec<u64> = if cfg.initial == InitialState::Join { vec![] } else { cfg.peers.keys().copied().collect() };
    let (log, recovered) = LogFile::open(&cfg.data_dir, &voters)?;
    tracing::info!(entries = recovered.entries, fresh = recovered.fresh, truncated = recovered.truncated_bytes, "raft log opened");
    let state = Arc::new(RwLock::new(StateMachine::default()));
    let mut core = Core::new(cfg.id, RaftStore::new(recovered.storage, recovered.snapshot), state.clone())?;
    core.campaign_if_alone();

    let address = listener.local_addr().map_err(|e| CoordError::Io(e.to_string()))?.to_string();
    let (tx, rx) = mpsc::channel(INBOX);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        cluster_id: cluster_id.clone(),
        dropped: Default::default(),
        addresses: RwLock::new(cfg.peers.clone()),
        address,
        state,
        view: RwLock::new(RaftView::default()),
        volatile: Mutex::new(Volatile::default()),
        inbox: tx,
    });
    let mut driver = tokio::spawn(drive(core, log, rx, shared.clone()));

    let svc = CoordinatorServer::new(Api(shared.clone())).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    let raft_svc = RaftTransportServer::new(Api(shared.clone())).max_decoding_message_size(MAX_MESSAGE);
    // No Nagle: small replies (acks, proposals' answers) otherwise wait on delayed ACKs, 40 ms
    // at a time.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(svc)
        .add_service(raft_svc)
        .serve_with_incoming_shutdown(incoming, shutdown);
    let result = tokio::select! {
        r = server => {
            driver.abort();
            r.map_err(|e| CoordError::Transport(e.to_string()))
        }
        // The Ready loop ended: this replica was removed from the group, or the loop
        // panicked or could not persist. Stop serving at once: a replica without its Raft
        // loop would answer from a frozen view that may still say "leader".
        ended = &mut driver => match ended {
            Ok(Ok(())) => {
                tracing::info!("removed from the coordinator group; stopping");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => {
                let what = e.try_into_panic().ok().and_then(|p| p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())));
                Err(CoordError::Raft(format!("the raft loop panicked: {}", what.unwrap_or_else(|| "unknown panic".into()))))
            }
        },
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, "coordinator replica stopping");
    }
    drop(lock);
    result
}

/// A sender task for one remote peer, with a bounded queue: a slow peer drops messages (Raft
/// retransmits) instead of blocking the loop. It ends when its queue's sender is dropped.
fn spawn_sender(id: u64, addr: &str, cluster_id: &str, inbox: mpsc::Sender<Input>) -> Option<mpsc::Sender<RaftMessage>> {
    let (tx, mut rx) = mpsc::channel::<RaftMessage>(1024);
    let Ok(ep) = tonic::transport::Endpoint::from_shared(crate::client::endpoint_url(addr)) else {
        tracing::error!(peer = id, %addr, "bad peer address");
        return None;
    };
    let channel = ep.connect_timeout(Duration::from_secs(1)).connect_lazy();
    let cluster_id = cluster_id.to_string();
    tokio::spawn(async move {
        let mut client = RaftTransportClient::new(channel).max_encoding_message_size(MAX_MESSAGE);
        // The open stream to the peer: batches go in here; None until (re)opened.
        let mut stream: Option<mpsc::Sender<RaftBatch>> = None;
        let mut last_open = Instant::now() - Duration::from_secs(1);
        while let Some(first) = rx.recv().await {
            // Everything queued for this peer goes as one batch.
            let mut batch = vec![first];
            while batch.len() < RAFT_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut messages = Vec::with_capacity(batch.len());
            for m in batch {
                let Ok(bytes) = m.write_to_bytes() else { continue };
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    // Streamed in pieces on a call of its own (no message size limit); raft
                    // hears how it went, and sends another after a failure.
                    let chunks: Vec<RaftChunk> = bytes.chunks(SNAPSHOT_PIECE).map(|c| RaftChunk { cluster_id: cluster_id.clone(), data: c.to_vec() }).collect();
                    let sent = tokio::time::timeout(Duration::from_secs(120), client.send_stream(tokio_stream::iter(chunks))).await;
                    let delivered = matches!(sent, Ok(Ok(_)));
                    if !delivered {
                        tracing::warn!(peer = id, bytes = bytes.len(), "snapshot transfer failed");
                    }
                    let _ = inbox.send(Input::SnapshotSent { to: id, delivered }).await;
                } else {
                    messages.push(bytes);
                }
            }
            if messages.is_empty() {
                continue;
            }
            if stream.as_ref().is_none_or(|s| s.is_closed()) {
                // (Re)open at most every 100 ms; meanwhile messages are dropped: raft resends.
                if last_open.elapsed() < Duration::from_millis(100) {
                    continue;
                }
                last_open = Instant::now();
                let (tx, rx) = mpsc::channel::<RaftBatch>(256);
                let mut c = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                        tracing::debug!(peer = id, error = %e.message(), "raft stream ended");
                    }
                });
                stream = Some(tx);
            }
            let batch = RaftBatch { cluster_id: cluster_id.clone(), messages };
            // A peer that falls behind slows this task (the Ready loop never waits: its queue
            // to here drops when full); a broken stream is reopened, and raft resends.
            let sent = match stream.as_ref() {
                Some(s) => tokio::time::timeout(Duration::from_secs(1), s.send(batch)).await,
                None => continue,
            };
            if !matches!(sent, Ok(Ok(()))) {
                stream = None;
            }
        }
    });
    Some(tx)
}

/// One sender per other member, following the group as it changes.
struct Senders(HashMap<u64, (String, mpsc::Sender<RaftMessage>)>);

impl Senders {
    fn sync(&mut self, shared: &Shared) {
        let addresses = shared.addresses.read().expect("addresses lock").clone();
        self.0.retain(|id, (addr, _)| addresses.get(id) == Some(addr));
        for (id, addr) in addresses {
            if id != shared.cfg.id && !self.0.contains_key(&id) {
                if let Some(tx) = spawn_sender(id, &addr, &shared.cluster_id, shared.inbox.clone()) {
                    self.0.insert(id, (addr, tx));
                }
            }
        }
    }

    fn send(&self, m: RaftMessage) {
        if let Some((_, tx)) = self.0.get(&m.to) {
            let _ = tx.try_send(m);
        }
    }
}

/// The group after the state machine's latest view of it (the addresses given on the command
/// line win), or the command line's until the log records a group.
fn effective_members(shared: &Shared) -> Vec<PeerInfo> {
    let state = shared.state.read().expect("state lock");
    let mut out: Vec<PeerInfo> = state.members().cloned().collect();
    if out.is_empty() {
        return shared.cfg.peers.iter().map(|(id, a)| PeerInfo { id: *id, address: a.clone(), learner: false }).collect();
    }
    for m in out.iter_mut() {
        if let Some(given) = shared.cfg.peers.get(&m.id) {
            m.address.clone_from(given);
        }
    }
    out
}

fn effective_addresses(shared: &Shared) -> BTreeMap<u64, String> {
    effective_members(shared).into_iter().map(|m| (m.id, m.address)).collect()
}

/// The Ready loop: the only place the core is touched.
/// Inputs taken into one Ready at most.
const BATCH: usize = 1024;

fn handle(core: &mut Core, shared: &Shared, input: Input) {
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
async fn drive(mut core: Core, mut log: LogFile, mut rx: mpsc::Receiver<Input>, shared: Arc<Shared>) -> Result<(), CoordError> {
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

fn not_leader_text(shared: &Shared, e: &CoordError) -> String {
    match e {
        CoordError::NotLeader(id) => match shared.addresses.read().expect("addresses lock").get(id) {
            Some(addr) => format!("not the leader; leader is {id} at {addr}"),
            None => "not the leader; no leader known yet".into(),
        },
        other => other.to_string(),
    }
}

/// Leases, scheduling and progress flushing: decisions the leader makes and replicates.
fn leader_duties(core: &mut Core, shared: &Shared, new_leader: bool, recent: &mut HashMap<String, Instant>) {
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

#[derive(Clone)]
struct Api(Arc<Shared>);

fn final_status(code: tonic::Code, msg: impl Into<String>) -> Status {
    let mut s = Status::new(code, msg);
    // Tells clients not to retry this one on another replica.
    s.metadata_mut().insert("shoal-final", "1".parse().expect("ascii"));
    s
}

impl Api {
    /// Proposes a command and waits for its outcome. `request_id` (may be empty) makes a
    /// client's retries idempotent.
    async fn propose(&self, kind: command::Kind, request_id: String) -> Result<ApplyOutput, Status> {
        let cmd = Command { proposal_id: 0, request_id, kind: Some(kind) };
        // Checked here too (the core checks again), so the caller gets a final answer.
        if cmd.encoded_len() > crate::node::MAX_COMMAND {
            return Err(final_status(tonic::Code::InvalidArgument, CoordError::TooLarge(cmd.encoded_len()).to_string()));
        }
        let (tx, rx) = oneshot::channel::<ApplyResult>();
        self.0
            .inbox
            .try_send(Input::Propose(cmd, tx))
            .map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Err(_) => Err(Status::deadline_exceeded("the proposal did not commit in time")),
            Ok(Err(_)) => Err(Status::unavailable("the proposal was dropped; retry")),
            Ok(Ok(Err(msg))) if msg.starts_with("not the leader") => Err(self.not_leader()),
            // Raft dropped it (a leader transfer under way, say): another try may take.
            Ok(Ok(Err(msg))) if msg.starts_with("leadership changed") || msg.starts_with("raft:") => Err(Status::unavailable(msg)),
            Ok(Ok(Err(msg))) if msg.starts_with("the request is") => Err(final_status(tonic::Code::InvalidArgument, msg)),
            Ok(Ok(Err(msg))) => Err(final_status(tonic::Code::FailedPrecondition, msg)),
            Ok(Ok(Ok(out))) => Ok(out),
        }
    }

    /// Waits until this replica's state holds every write committed before the call (raft's
    /// ReadIndex), so what a read returns next is never stale, on a follower or on a leader
    /// that was deposed without knowing it yet.
    async fn linearize(&self) -> Result<(), Status> {
        let (tx, rx) = oneshot::channel();
        self.0.inbox.try_send(Input::Read(tx)).map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(READ_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(msg))) => Err(Status::unavailable(msg)),
            _ => Err(Status::unavailable("the read could not be confirmed by a quorum in time; retry")),
        }
    }

    /// The group as this replica's state machine records it: every member's id, address and
    /// role.
    fn peers(&self) -> Vec<PeerInfo> {
        effective_members(&self.0)
    }

    fn member_reply(&self, id: u64) -> MemberReply {
        MemberReply { id, cluster_id: self.0.cluster_id.clone(), peers: self.peers() }
    }

    /// Sends a member change to the Ready loop and waits until it is applied.
    async fn change_member(&self, op: MemberOp, id: u64, address: String, request_id: String) -> Result<u64, Status> {
        let (tx, rx) = oneshot::channel::<ApplyResult>();
        self.0
            .inbox
            .try_send(Input::Member { op, id, address, request_id, reply: tx })
            .map_err(|_| Status::unavailable("coordinator is overloaded; retry"))?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Err(_) => Err(Status::deadline_exceeded("the membership change did not commit in time")),
            Ok(Err(_)) => Err(Status::unavailable("the membership change was dropped; retry")),
            Ok(Ok(Err(msg))) if msg.starts_with("not the leader") => Err(self.not_leader()),
            Ok(Ok(Err(msg))) => Err(Status::unavailable(msg)),
            Ok(Ok(Ok(ApplyOutput::Member(id)))) => Ok(id),
            Ok(Ok(Ok(other))) => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.0.view.read().expect("view lock").role == "leader" {
            return Ok(());
        }
        Err(self.not_leader())
    }

    /// `Unavailable`, with the leader's address (when known) in the `shoal-leader` metadata,
    /// so a client goes there next in one round trip.
    fn not_leader(&self) -> Status {
        let leader = self.0.view.read().expect("view lock").leader_id;
        match self.0.addresses.read().expect("addresses lock").get(&leader).cloned().filter(|_| leader != 0) {
            Some(addr) => {
                let mut s = Status::unavailable(format!("not the leader; leader is {leader} at {addr}"));
                if let Ok(v) = addr.parse() {
                    s.metadata_mut().insert("shoal-leader", v);
                }
                s
            }
            None => Status::unavailable("not the leader; no leader known yet"),
        }
    }

    fn job_view(&self, job: &JobInfo) -> JobInfo {
        let mut job = job.clone();
        let vol = self.0.volatile.lock().expect("volatile lock");
        if let Some((generation, p, _)) = vol.progress.get(&job.id) {
            let newer = job.progress.as_ref().map(|q| p.step >= q.step).unwrap_or(true);
            if *generation == job.generation && job.state() == JobState::Running && newer {
                job.progress = Some(p.clone());
            }
        }
        job
    }
}

fn expect_model(out: ApplyOutput) -> Result<Response<shoal_proto::ModelInfo>, Status> {
    match out {
        ApplyOutput::Model(m) => Ok(Response::new(*m)),
        other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
    }
}

fn expect_job(out: ApplyOutput) -> Result<JobInfo, Status> {
    match out {
        ApplyOutput::Job(j) => Ok(*j),
        other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
    }
}

#[tonic::async_trait]
impl Coordinator for Api {
    async fn add_coordinator(&self, r: Request<AddCoordinatorRequest>) -> Result<Response<MemberReply>, Status> {
        let AddCoordinatorRequest { address, request_id } = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        if let Some(id) = self.0.state.read().expect("state lock").member_for_request(&request_id).filter(|_| !request_id.is_empty()) {
            return Ok(Response::new(self.member_reply(id)));
        }
        if address.parse::<std::net::SocketAddr>().is_err() {
            return Err(final_status(tonic::Code::InvalidArgument, format!("{address:?} is not an address (HOST:PORT with a numeric host)")));
        }
        let addresses = self.0.addresses.read().expect("addresses lock").clone();
        if let Some((id, _)) = addresses.iter().find(|(_, a)| **a == address) {
            return Err(final_status(tonic::Code::AlreadyExists, format!("replica {id} is at {address} already")));
        }
        let id = addresses.keys().max().copied().unwrap_or(0) + 1;
        let id = self.change_member(MemberOp::AddLearner, id, address, request_id).await?;
        Ok(Response::new(self.member_reply(id)))
    }

    async fn remove_coordinator(&self, r: Request<RemoveCoordinatorRequest>) -> Result<Response<MemberReply>, Status> {
        let RemoveCoordinatorRequest { id, request_id } = r.into_inner();
        self.require_leader()?;
        self.linearize().await?;
        let peers = self.peers();
        if !peers.iter().any(|p| p.id == id) {
            // Gone already (a retry after the change applied) or never there.
            return match self.0.state.read().expect("state lock").member_for_request(&request_id).filter(|_| !request_id.is_empty()) {
                Some(_) => Ok(Response::new(self.member_reply(id))),
                None => Err(final_status(tonic::Code::NotFound, format!("replica {id} is not a member of the group"))),
            };
        }
        if peers.iter().filter(|p| !p.learner && p.id != id).count() == 0 {
            return Err(final_status(tonic::Code::FailedPrecondition, format!("replica {id} is the last voter; a group needs one")));
        }
        if id == self.0.cfg.id {
            // The leader hands its role to another voter first; the client retries there.
            let to = peers.iter().find(|p| !p.learner && p.id != id).map(|p| p.id).expect("checked above");
            let _ = self.0.inbox.try_send(Input::TransferLeader(to));
            return Err(Status::unavailable(format!("replica {id} leads the group; handing the lead to replica {to} first; retry")));
        }
        self.change_member(MemberOp::Remove, id, String::new(), request_id).await?;
        Ok(Response::new(self.member_reply(id)))
    }

    async fn transfer_leader(&self, r: Request<TransferLeaderRequest>) -> Result<Response<MemberReply>, Status> {
        let id = r.into_inner().id;
        if self.0.view.read().expect("view lock").leader_id == id {
            return Ok(Response::new(self.member_reply(id)));
        }
        self.require_leader()?;
        if !self.peers().iter().any(|p| p.id == id && !p.learner) {
            return Err(final_status(tonic::Code::FailedPrecondition, format!("replica {id} is not a voter of the group")));
        }
        let _ = self.0.inbox.try_send(Input::TransferLeader(id));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.0.view.read().expect("view lock").leader_id == id {
                return Ok(Response::new(self.member_reply(id)));
            }
        }
        Err(Status::deadline_exceeded(format!("replica {id} did not take the lead in time")))
    }

    async fn get_status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        // Before the view lock below: `peers` takes it too (no lock is taken twice).
        let peers = self.peers();
        let v = self.0.view.read().expect("view lock");
        let state = self.0.state.read().expect("state lock");
        let node = CoordinatorStatus {
            id: self.0.cfg.id,
            address: self.0.address.clone(),
            role: if v.learners.contains(&self.0.cfg.id) { "learner".into() } else { v.role.to_string() },
            term: v.term,
            commit_index: v.commit,
            applied_index: state.applied_index,
            pid: std::process::id(),
            leader_id: v.leader_id,
            store_dir: self.0.cfg.store_dir.display().to_string(),
            cluster_id: self.0.cluster_id.clone(),
            dropped_raft_messages: self.0.dropped.load(std::sync::atomic::Ordering::Relaxed),
            snapshot_index: v.snapshot_index,
            state_hash: state.state_hash(),
        };
        let workers = state.workers().cloned().collect();
        Ok(Response::new(StatusResponse { node: Some(node), peers, workers }))
    }

    async fn register_dataset(&self, r: Request<RegisterDatasetRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        let ds = r.dataset.ok_or_else(|| final_status(tonic::Code::InvalidArgument, "no dataset in request"))?;
        match self.propose(command::Kind::RegisterDataset(ds), r.request_id).await? {
            ApplyOutput::Dataset(d) => Ok(Response::new(*d)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn set_dataset_settings(&self, r: Request<shoal_proto::DatasetSettingsRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        match self.propose(command::Kind::SetDatasetSettings(r), request_id).await? {
            ApplyOutput::Dataset(d) => Ok(Response::new(*d)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn list_datasets(&self, _: Request<ListDatasetsRequest>) -> Result<Response<ListDatasetsResponse>, Status> {
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        Ok(Response::new(ListDatasetsResponse { datasets: state.datasets().cloned().collect() }))
    }

    async fn get_dataset(&self, r: Request<GetDatasetRequest>) -> Result<Response<DatasetInfo>, Status> {
        let r = r.into_inner();
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        match state.dataset(&r.name, r.version) {
            Some(d) => Ok(Response::new(d.clone())),
            None if r.version == 0 => Err(final_status(tonic::Code::NotFound, format!("dataset {:?} does not exist", r.name))),
            None => Err(final_status(tonic::Code::NotFound, format!("dataset {:?} has no version {}", r.name, r.version))),
        }
    }

    async fn register_model(&self, r: Request<shoal_proto::RegisterModelRequest>) -> Result<Response<shoal_proto::ModelInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        expect_model(self.propose(command::Kind::RegisterModel(r), request_id).await?)
    }

    async fn set_model_alias(&self, r: Request<shoal_proto::ModelAliasRequest>) -> Result<Response<shoal_proto::ModelInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        expect_model(self.propose(command::Kind::SetModelAlias(r), request_id).await?)
    }

    async fn get_model(&self, r: Request<shoal_proto::GetModelRequest>) -> Result<Response<shoal_proto::ModelInfo>, Status> {
        let r = r.into_inner();
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        let found = state.models().find(|m| m.name == r.name).cloned();
        found.map(Response::new).ok_or_else(|| final_status(tonic::Code::NotFound, format!("there is no model {}", r.name)))
    }

    async fn list_models(&self, _: Request<shoal_proto::ListModelsRequest>) -> Result<Response<shoal_proto::ListModelsResponse>, Status> {
        self.linearize().await?;
        let state = self.0.state.read().expect("state lock");
        Ok(Response::new(shoal_proto::ListModelsResponse { models: state.models().cloned().collect() }))
    }

    async fn submit_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<JobInfo>, Status> {
        let SubmitJobRequest { spec_toml, request_id } = r.into_inner();
        // Only the leader pre-checks, on a state that holds every committed write: a lagging
        // replica could call a fresh dataset missing.
        self.require_leader()?;
        self.linearize().await?;
        // Check here first for a fast, clear error; apply checks again against the state
        // at its index.
        let checked = {
            let state = self.0.state.read().expect("state lock");
            match shoal_core::batch::is_batch(&spec_toml) {
                Ok(true) => state.check_batch(&spec_toml).map(|_| ()),
                Ok(false) => state.check_submission(&spec_toml).map(|_| ()),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Err(e) = checked {
            return Err(final_status(tonic::Code::InvalidArgument, e));
        }
        Ok(Response::new(expect_job(self.propose(command::Kind::SubmitJob(spec_toml), request_id).await?)?))
    }

    async fn schedule_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<shoal_proto::JobTemplate>, Status> {
        let SubmitJobRequest { spec_toml, request_id } = r.into_inner();
        match self.propose(command::Kind::ScheduleJob(spec_toml), request_id).await? {
            ApplyOutput::Template(t) => Ok(Response::new(*t)),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn list_templates(&self, _: Request<shoal_proto::ListTemplatesRequest>) -> Result<Response<shoal_proto::ListTemplatesResponse>, Status> {
        self.linearize().await?;
        let templates = self.0.state.read().expect("state lock").templates().cloned().collect();
        Ok(Response::new(shoal_proto::ListTemplatesResponse { templates }))
    }

    async fn get_job(&self, r: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        let id = r.into_inner().id;
        self.linearize().await?;
        let job = self.0.state.read().expect("state lock").job(id).cloned();
        match job {
            Some(j) => Ok(Response::new(self.job_view(&j))),
            None => Err(final_status(tonic::Code::NotFound, format!("job {id} does not exist"))),
        }
    }

    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        self.linearize().await?;
        let jobs: Vec<JobInfo> = self.0.state.read().expect("state lock").jobs().cloned().collect();
        Ok(Response::new(ListJobsResponse { jobs: jobs.iter().map(|j| self.job_view(j)).collect() }))
    }

    async fn cancel_job(&self, r: Request<CancelJobRequest>) -> Result<Response<JobInfo>, Status> {
        let CancelJobRequest { id, request_id } = r.into_inner();
        Ok(Response::new(expect_job(self.propose(command::Kind::CancelJob(id), request_id).await?)?))
    }

    async fn register_worker(&self, r: Request<RegisterWorkerRequest>) -> Result<Response<RegisterWorkerResponse>, Status> {
        let req = r.into_inner();
        let request_id = req.request_id.clone();
        match self.propose(command::Kind::RegisterWorker(req), request_id).await? {
            ApplyOutput::WorkerId(id) => {
                let mut vol = self.0.volatile.lock().expect("volatile lock");
                vol.last_seen.insert(id.clone(), Instant::now());
                vol.heard.insert(id.clone());
                drop(vol);
                Ok(Response::new(RegisterWorkerResponse { worker_id: id, lease_ms: self.0.cfg.lease.as_millis() as u64 }))
            }
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    async fn heartbeat(&self, r: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.require_leader()?;
        // A deposed leader that has not noticed yet must not hand out a stale assignment.
        self.linearize().await?;
        let id = r.into_inner().worker_id;
        let state = self.0.state.read().expect("state lock");
        match state.worker(&id) {
            Some(w) if w.state() != WorkerState::Lost => {
                let mut vol = self.0.volatile.lock().expect("volatile lock");
                vol.last_seen.insert(id.clone(), Instant::now());
                vol.heard.insert(id.clone());
                drop(vol);
                Ok(Response::new(HeartbeatResponse { assignment: state.assignment(&id), unknown_worker: false }))
            }
            _ => Ok(Response::new(HeartbeatResponse { assignment: None, unknown_worker: true })),
        }
    }

    async fn report_progress(&self, r: Request<ProgressReport>) -> Result<Response<Ack>, Status> {
        self.require_leader()?;
        let r = r.into_inner();
        if let Some(p) = r.progress {
            let mut vol = self.0.volatile.lock().expect("volatile lock");
            let flushed = vol.progress.get(&r.job_id).and_then(|(g, _, f)| if *g == r.generation { *f } else { None });
            vol.progress.insert(r.job_id, (r.generation, p, flushed));
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_outcome(&self, r: Request<OutcomeReport>) -> Result<Response<Ack>, Status> {
        // Outcomes are idempotent by (job, generation, rank) already.
        let r = r.into_inner();
        let (job, generation, reporter, peer_failure) = (r.job_id, r.generation, r.worker_id.clone(), r.peer_failure);
        self.propose(command::Kind::RankOutcome(r), String::new()).await?;
        if peer_failure {
            // A rank lost a peer: find out, without waiting for a lease, which of the job's
            // workers is gone.
            let api = self.clone();
            tokio::spawn(async move { api.probe_job_workers(job, generation, &reporter).await });
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_task(&self, r: Request<shoal_proto::TaskReport>) -> Result<Response<shoal_proto::TaskReply>, Status> {
        let mut r = r.into_inner();
        let (worker, job_id) = (r.worker_id.clone(), r.job_id);
        // The leader stamps the time into the entry, so every replica applies the same value.
        r.reported_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.propose(command::Kind::TaskReported(r), String::new()).await?;
        // Applied here, so the state holds the commit: the worker's next task, if any. A report
        // is a sign of life, like a heartbeat.
        let state = self.0.state.read().expect("state lock");
        let mut vol = self.0.volatile.lock().expect("volatile lock");
        vol.last_seen.insert(worker.clone(), Instant::now());
        vol.heard.insert(worker.clone());
        let mut reply = shoal_proto::TaskReply { next: state.assignment(&worker), ..Default::default() };
        if let Some(j) = state.job(job_id).filter(|j| j.state().is_terminal()) {
            let b = j.batch.clone().unwrap_or_default();
            reply.job_ended = true;
            reply.output_folder = b.output_folder;
            if j.state() == JobState::Succeeded {
                reply.keep = b.tasks.iter().filter_map(|t| t.result.as_ref()?.output.as_ref().map(|o| o.path.clone())).collect();
            }
        }
        Ok(Response::new(reply))
    }

    async fn resume_job(&self, r: Request<ResumeJobRequest>) -> Result<Response<JobInfo>, Status> {
        let r = r.into_inner();
        let request_id = r.request_id.clone();
        Ok(Response::new(expect_job(self.propose(command::Kind::ResumeJob(r), request_id).await?)?))
    }

    async fn deregister(&self, r: Request<DeregisterRequest>) -> Result<Response<Ack>, Status> {
        let worker_id = r.into_inner().worker_id;
        let lost = WorkerLost { worker_id, cause: "stopped (shut down on purpose)".into() };
        match self.propose(command::Kind::WorkerLost(lost), String::new()).await {
            Ok(_) => Ok(Response::new(Ack {})),
            // Already lost (a retry, or its lease ran out first): the same end state.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(Response::new(Ack {})),
            Err(s) => Err(s),
        }
    }

    async fn commit_checkpoint(&self, r: Request<CheckpointCommit>) -> Result<Response<CheckpointCommitReply>, Status> {
        let mut c = r.into_inner();
        // The leader stamps the time into the entry, so every replica applies the same value.
        if let Some(m) = c.manifest.as_mut() {
            m.committed_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        }
        let job = expect_job(self.propose(command::Kind::CheckpointCommitted(c), String::new()).await?)?;
        Ok(Response::new(CheckpointCommitReply { kept_steps: job.checkpoints.iter().map(|m| m.step).collect() }))
    }

    async fn report_checkpoint_error(&self, r: Request<CheckpointError>) -> Result<Response<Ack>, Status> {
        self.propose(command::Kind::CheckpointFailed(r.into_inner()), String::new()).await?;
        Ok(Response::new(Ack {}))
    }
}

/// Connection attempts, 100 ms apart, to a worker a peer reported gone.
const PROBES: u32 = 10;

impl Api {
    /// Probes the data-plane address of every worker of (job, generation) but `reporter`, up
    /// to `PROBES` times 100 ms apart. A live worker always listens there, so a refused
    /// connection means its process is gone: it is declared lost, which requeues the job
    /// without it. (A killed process closes its sockets only when its last thread has exited,
    /// which can be after its main thread shows as a zombie: hence more than one try.) A
    /// worker that accepts, or times out, proves nothing here: its lease decides.
    async fn probe_job_workers(&self, job: u64, generation: u64, reporter: &str) {
        let targets: Vec<(String, String)> = {
            let state = self.0.state.read().expect("state lock");
            let Some(j) = state.job(job).filter(|j| j.generation == generation && j.state() == JobState::Running) else { return };
            j.workers.iter().filter(|w| *w != reporter).filter_map(|w| state.worker(w).map(|i| (w.clone(), i.address.clone()))).collect()
        };
        for (worker, address) in targets {
            for attempt in 0..PROBES {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if crate::client::refuses_connections(&address).await {
                    tracing::warn!(job, generation, %worker, %address, "a peer reported this worker gone and it refuses connections: declaring it lost");
                    let lost = WorkerLost { worker_id: worker.clone(), cause: format!("was lost (its peers lost it; nothing answers at {address})") };
                    if let Err(e) = self.propose(command::Kind::WorkerLost(lost), String::new()).await {
                        tracing::debug!(%worker, error = %e.message(), "declaring the worker lost");
                    }
                    break;
                }
            }
        }
    }

    /// Checks a Raft message from a peer and hands it to the Ready loop; anything that is not
    /// a message of this cluster, from a member, for this node, is refused and counted.
    fn accept(&self, env: RaftEnvelope) -> Result<Response<Ack>, Status> {
        let me = self.0.cfg.id;
        let refuse = |why: String| {
            self.0.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%why, "raft message dropped");
            Err(Status::invalid_argument(why))
        };
        if env.cluster_id != self.0.cluster_id {
            return refuse(format!("raft message of cluster {:?}; this is cluster {}", env.cluster_id, self.0.cluster_id));
        }
        let m = match RaftMessage::parse_from_bytes(&env.message) {
            Ok(m) => m,
            Err(e) => return refuse(format!("not a raft message: {e}")),
        };
        if m.to != me {
            return refuse(format!("raft message for node {}; this is node {me}", m.to));
        }
        if m.from == me || !self.0.addresses.read().expect("addresses lock").contains_key(&m.from) {
            return refuse(format!("raft message from node {}, which is no member of this group", m.from));
        }
        // A full inbox drops the message; Raft retransmits.
        let _ = self.0.inbox.try_send(Input::Raft(m));
        Ok(Response::new(Ack {}))
    }
}

#[tonic::async_trait]
impl RaftTransport for Api {
    async fn send(&self, r: Request<RaftEnvelope>) -> Result<Response<Ack>, Status> {
        self.accept(r.into_inner())
    }

    async fn stream(&self, r: Request<tonic::Streaming<RaftBatch>>) -> Result<Response<Ack>, Status> {
        let mut stream = r.into_inner();
        while let Some(batch) = stream.message().await? {
            for message in batch.messages {
                // A bad message is refused and counted; the stream goes on.
                let _ = self.accept(RaftEnvelope { message, cluster_id: batch.cluster_id.clone() });
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn send_stream(&self, r: Request<tonic::Streaming<RaftChunk>>) -> Result<Response<Ack>, Status> {
        let mut stream = r.into_inner();
        let mut env = RaftEnvelope::default();
        while let Some(chunk) = stream.message().await? {
            if env.message.len() + chunk.data.len() > MAX_SNAPSHOT {
                self.0.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Status::invalid_argument(format!("a streamed raft message over {MAX_SNAPSHOT} bytes")));
            }
            env.cluster_id = chunk.cluster_id;
            env.message.extend_from_slice(&chunk.data);
        }
        self.accept(env)
    }
}
