//! The coordinator's shell: it owns the sockets, the log file and the clock, and drives the
//! sans-IO `Core` in one Ready loop. The gRPC handlers only read the state machine or send
//! proposals to the loop through a bounded channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use crate::state::{ApplyError, ApplyOutput, ApplyResult, DatasetView, MemberOp, StateMachine};
use crate::storage::LogFile;
use crate::CoordError;

mod api;
mod auth;
mod identity;
mod notify;
mod proposals;
mod raft_transport;
mod ready_loop;

use crate::leader::Duties;
use raft_transport::Senders;
use ready_loop::drive;
pub use auth::{AuthConfig, BOOTSTRAP_FILE, TOKEN_KEY_FILE};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub id: u64,
    /// Every voter's id and address, this replica's included.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    /// Where datasets, checkpoints and outputs live (a folder or an object store).
    pub store: shoal_core::store::Store,
    /// A worker that sends no heartbeat for this long is declared lost.
    pub lease: Duration,
    /// The cluster this replica belongs to. None: the one its data folder records, or (a new
    /// folder) one derived from the peer list, so replicas started alike agree.
    pub cluster_id: Option<String>,
    /// How this replica comes to its group.
    pub initial: InitialState,
    /// Snapshot the state machine and compact the log every this many applied entries.
    pub snapshot_every: u64,
    /// The build this replica runs (a git commit), stamped on its proposals.
    pub build: String,
    /// Tokens and roles; None (`--insecure`): every caller may call everything.
    pub auth: Option<AuthConfig>,
    /// Mutual TLS on the listener, and as this replica's client identity towards its peers;
    /// None: plaintext.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl CoordinatorConfig {
    /// The token this replica shows its peers (None without credentials).
    pub fn peer_token(&self) -> Option<String> {
        self.auth.as_ref().map(|a| a.key.peer_token(self.id))
    }
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


// A command lives here only on its way into the log: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Input {
    Propose(Command, Reply),
    Raft(RaftMessage),
    /// Whether a snapshot reached a follower.
    SnapshotSent { to: u64, delivered: bool },
    /// A linearizable read waiting for its read index.
    Read(ReadReply),
    /// A change of the coordinator group (`force`: skip the live-quorum check).
    Member { op: MemberOp, id: u64, address: String, request_id: String, who: Option<shoal_proto::AuditContext>, force: bool, reply: Reply },
    /// Hand the lead to a replica; the reply says why not, if not.
    TransferLeader(u64, oneshot::Sender<Result<(), String>>),
}

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
    last_index: u64,
    leader_id: u64,
    snapshot_index: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
}

impl RaftView {
    /// The role `shoal status` reports for replica `me`: a voter only once the configuration
    /// this replica applied names it one.
    fn role_of(&self, me: u64, phase: Phase) -> &'static str {
        match phase {
            Phase::Fresh | Phase::Joining => "starting",
            Phase::Running if self.voters.contains(&me) => self.role,
            Phase::Running if self.learners.contains(&me) => "learner",
            // A replica that joined has not yet received the configuration that names it (its
            // first snapshot or entries are on their way): it votes on nothing yet.
            Phase::Running => "joining",
        }
    }
}

/// Where a replica is in its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// An empty folder started as a new group's voter: waiting for its peers to confirm the
    /// group is new too (it answers peers that it is fresh).
    Fresh,
    /// An empty folder joining as a learner: checking with the group that it may.
    Joining,
    /// The Ready loop runs.
    Running,
}

struct Shared {
    cfg: CoordinatorConfig,
    cluster_id: String,
    /// Raft messages refused (see `RaftTransport::send`).
    dropped: std::sync::atomic::AtomicU64,
    /// Calls the guard refused (no token, a bad one, or a role the method table refuses).
    refused: std::sync::atomic::AtomicU64,
    /// When this leader last proposed the bootstrap tokens (ms of `now`).
    bootstrap_proposed: std::sync::atomic::AtomicU64,
    /// Every member's address: the group the log records (the addresses given on the
    /// command line win, so a cluster restarted on new ports finds itself), or, until the
    /// log records one, the command line's.
    addresses: RwLock<BTreeMap<u64, String>>,
    address: String,
    state: Arc<RwLock<StateMachine>>,
    view: RwLock<RaftView>,
    /// The leader's duties and what they remember (reset at each new term).
    duties: Mutex<Duties>,
    inbox: mpsc::Sender<Input>,
    phase: RwLock<Phase>,
    /// Peers that said they are fresh too (while this replica is `Phase::Fresh`).
    fresh_peers: Mutex<BTreeSet<u64>>,
    /// The monotonic clock the leader's duties run on.
    started: Instant,
    /// The state hash at an applied index (hashing is a pass over the whole state).
    hash_cache: Mutex<Option<(u64, String, u64)>>,
    /// `[notify]` deliveries under way on this leader, by event id.
    outbox: Mutex<HashMap<String, notify::Try>>,
}

impl Shared {
    /// Milliseconds of the monotonic clock.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The wall clock, in ms since the epoch: what commands carry.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
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
    for dir in [Some(cfg.data_dir.as_path()), cfg.store.local_root()].into_iter().flatten() {
        shoal_core::fsutil::create_dirs_durably(dir).map_err(|e| CoordError::Io(format!("{}: {e}", dir.display())))?;
    }
    let lock_path = cfg.data_dir.join("LOCK");
    let lock = std::fs::File::create(&lock_path).map_err(|e| CoordError::Io(format!("{}: {e}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(CoordError::Locked(cfg.data_dir.display().to_string()));
    }
    let folder = identity::inspect(&cfg)?;
    let address = listener.local_addr().map_err(|e| CoordError::Io(e.to_string()))?.to_string();
    let (tx, rx) = mpsc::channel(INBOX);
    let phase = match (&folder, cfg.initial) {
        (identity::Folder::Empty { .. }, InitialState::Join) => Phase::Joining,
        (identity::Folder::Empty { .. }, _) => Phase::Fresh,
        _ => Phase::Running,
    };
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        cluster_id: folder.cluster_id().to_string(),
        dropped: Default::default(),
        refused: Default::default(),
        bootstrap_proposed: Default::default(),
        addresses: RwLock::new(cfg.peers.clone()),
        address,
        state: Arc::new(RwLock::new(StateMachine::default())),
        view: RwLock::new(RaftView::default()),
        duties: Mutex::new(Duties::default()),
        inbox: tx,
        phase: RwLock::new(phase),
        fresh_peers: Mutex::default(),
        started: Instant::now(),
        hash_cache: Mutex::default(),
        outbox: Mutex::default(),
    });
    // A folder with a log opens it now, so a peer's hello is answered from it at once.
    let opened = match &folder {
        identity::Folder::Ready { .. } => Some(open_log(&shared, false)?),
        identity::Folder::Empty { .. } => None,
    };
    let boot_shared = shared.clone();
    let mut driver = tokio::spawn(async move {
        let (core, log) = match opened {
            Some(c) => c,
            None => {
                identity::await_empty_start(&boot_shared).await?;
                open_log(&boot_shared, true)?
            }
        };
        *boot_shared.phase.write().expect("phase lock") = Phase::Running;
        drive(core, log, rx, boot_shared).await
    });

    let svc = CoordinatorServer::new(Api(shared.clone())).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    let raft_svc = RaftTransportServer::new(Api(shared.clone())).max_decoding_message_size(MAX_MESSAGE);
    // No Nagle: small replies (acks, proposals' answers) otherwise wait on delayed ACKs, 40 ms
    // at a time.
    // grpc.health.v1 (and the HTTP listener's /ready, for probes that cannot speak TLS): SERVING while this replica runs its
    // Raft loop and knows a leader, so it can answer reads and forward writes.
    let (health, health_svc) = tonic_health::server::health_reporter();
    let health_shared = shared.clone();
    let health_task = tokio::spawn(async move {
        let mut serving = None;
        loop {
            let now = matches!(*health_shared.phase.read().expect("phase lock"), Phase::Running) && health_shared.view.read().expect("view lock").leader_id != 0;
            if serving != Some(now) {
                let status = if now { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
                health.set_service_status("", status).await;
                health.set_service_status("shoal.v1.Coordinator", status).await;
                shoal_core::telemetry::set_ready(now);
                serving = Some(now);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    if cfg.auth.is_none() {
        tracing::warn!("no credentials (--insecure): every caller that reaches this port may call everything");
    }
    let router = tonic::transport::Server::builder().layer(auth::Guard(shared.clone())).add_service(health_svc).add_service(svc).add_service(raft_svc);
    // TLS is ours rather than tonic's: the certificate rotates with its files (`ReloadingCert`).
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>> = match &cfg.tls {
        Some(tls) => {
            let config = tls.grpc_server_config().map_err(|e| CoordError::Config(format!("TLS: {e}")))?;
            Box::pin(router.serve_with_incoming_shutdown(crate::tls::tls_incoming(listener, config), shutdown))
        }
        None => {
            tracing::warn!("no TLS (no certificates in the credentials folder): calls, tokens included, travel in plaintext");
            Box::pin(router.serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown))
        }
    };
    let result = tokio::select! {
        r = server => {
            driver.abort();
            r.map_err(|e| CoordError::Transport(e.to_string()))
        }
        // The Ready loop ended: this replica was removed from the group, or the loop
        // panicked or could not persist, or the replica may not start. Stop serving at once:
        // a replica without its Raft loop would answer from a frozen view that may still say
        // "leader".
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
    health_task.abort();
    if let Err(e) = &result {
        tracing::error!(error = %e, "coordinator replica stopping");
    }
    drop(lock);
    result
}

/// Opens (a new folder: creates) the log and builds the core over it. A new folder's
/// identity is written only after its log exists: a folder with an identity and no log is
/// then always one that lost its log, and is refused.
fn open_log(shared: &Shared, new_folder: bool) -> Result<(Core, LogFile), CoordError> {
    let cfg = &shared.cfg;
    // A joining replica knows no voters: the group's snapshot tells it.
    let voters: Vec<u64> = if cfg.initial == InitialState::Join { vec![] } else { cfg.peers.keys().copied().collect() };
    let (log, recovered) = LogFile::open(&cfg.data_dir, &voters)?;
    tracing::info!(entries = recovered.entries, fresh = recovered.fresh, truncated = recovered.truncated_bytes, "raft log opened");
    if new_folder {
        identity::write(cfg, &shared.cluster_id)?;
    }
    let mut core = Core::new(cfg.id, RaftStore::new(recovered.storage, recovered.snapshot), shared.state.clone())?;
    core.set_build(&cfg.build);
    core.campaign_if_alone();
    let mut v = shared.view.write().expect("view lock");
    (v.term, v.commit, v.last_index) = (core.term(), core.commit_index(), core.last_index());
    Ok((core, log))
}

/// The group after the state machine's latest view of it (the addresses given on the command
/// line win), or the command line's until the log records a group.
fn effective_members(shared: &Shared) -> Vec<PeerInfo> {
    let state = shared.state.read().expect("state lock");
    let mut out: Vec<PeerInfo> = state.members().cloned().collect();
    if out.is_empty() {
        // The group as it started (no member change recorded yet), less any replica removed
        // since: a removal alone records no members.
        return shared.cfg.peers.iter().filter(|(id, _)| !state.was_removed(**id)).map(|(id, a)| PeerInfo { id: *id, address: a.clone(), learner: false }).collect();
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

#[derive(Clone)]
struct Api(Arc<Shared>);

fn final_status(code: tonic::Code, msg: impl Into<String>) -> Status {
    let mut s = Status::new(code, msg);
    // Tells clients not to retry this one on another replica.
    s.metadata_mut().insert("shoal-final", "1".parse().expect("ascii"));
    s
}


/// Reads each artifact and checks its size and blake3: the test of a cached step's outputs.
fn verify_artifacts(store: &shoal_core::store::Store, files: &[shoal_proto::ShardInfo]) -> Result<(), String> {
    for f in files {
        let bytes = store.get(&f.path).map_err(|e| format!("{}: {e}", f.path))?;
        if bytes.len() as u64 != f.bytes && f.bytes != 0 {
            return Err(format!("{} has {} bytes, not {}", f.path, bytes.len(), f.bytes));
        }
        let got = blake3::hash(&bytes).to_hex().to_string();
        if got != f.blake3 {
            return Err(format!("{} has blake3 {}, not {}", f.path, &got[..16], f.blake3.get(..16).unwrap_or(&f.blake3)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_a_voter_only_once_its_configuration_says_so() {
        let mut v = RaftView { role: "follower", ..Default::default() };
        // Joined, but nothing applied yet: the raft role says follower, the replica does not vote.
        assert_eq!(v.role_of(4, Phase::Running), "joining");
        v.learners = vec![4];
        v.voters = vec![1, 2, 3];
        assert_eq!(v.role_of(4, Phase::Running), "learner");
        v.voters = vec![1, 2, 3, 4];
        v.learners.clear();
        assert_eq!(v.role_of(4, Phase::Running), "follower");
        assert_eq!(v.role_of(4, Phase::Joining), "starting");
    }
}
