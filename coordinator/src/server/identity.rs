//! The data folder's identity (which cluster and replica it belongs to), and the rules for a
//! replica whose folder holds no log: it never votes again from an empty log.
//!
//! - A folder with `identity.pb` but no `raft.log` lost its log: refused in every mode.
//! - An empty folder with `--initial-state existing` is refused (its votes are gone).
//! - An empty folder with `new` (the default, what restarts and the deploy files run) votes
//!   only once enough peers confirm the group is new too (`membership::fresh_start`);
//!   otherwise it is refused with the procedure that replaces it.
//! - An empty folder with `join` starts only if the group holds its id as a learner that
//!   never voted (`CheckJoin`, a linearizable read on the leader).

use super::*;
use crate::membership::{fresh_start, FreshStart};

const IDENTITY_FILE: &str = "identity.pb";

/// What a data folder holds.
pub(super) enum Folder {
    /// A log (and the identity, written after it): a restart.
    Ready { cluster_id: String },
    /// Nothing: a new replica, or one whose folder was lost.
    Empty { cluster_id: String },
}

impl Folder {
    pub(super) fn cluster_id(&self) -> &str {
        match self {
            Folder::Ready { cluster_id } | Folder::Empty { cluster_id } => cluster_id,
        }
    }
}

/// After this long waiting on a fresh start, the fewest confirmations that are safe do;
/// before it, every peer's (so replicas started together all come up together).
const FRESH_PATIENCE: Duration = Duration::from_secs(10);

/// Reads and checks the data folder: its identity must be this replica's, a folder that lost
/// its log is refused, and an empty one is allowed only as the mode says.
pub(super) fn inspect(cfg: &CoordinatorConfig) -> Result<Folder, CoordError> {
    let path = cfg.data_dir.join(IDENTITY_FILE);
    let shown = cfg.data_dir.display();
    let log = cfg.data_dir.join(crate::storage::LOG_FILE);
    let has_log = std::fs::metadata(&log).map(|m| m.len() > 0).unwrap_or(false);
    let replace = |what: String| {
        CoordError::Identity(format!(
            "{what}: this replica's votes and log are gone, and voting again could elect a leader that lacks acknowledged writes. \
             Replace it: `shoal coordinator remove {id}`, then `shoal coordinator add HOST:PORT` (a new id), and start the new \
             replica with `--initial-state join`; it joins as a learner and catches up from a snapshot",
            id = cfg.id
        ))
    };
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
            if !has_log {
                return Err(replace(format!("{shown} holds the identity of replica {} of cluster {} but no Raft log ({} is missing or empty)", cfg.id, id.cluster_id, log.display())));
            }
            Ok(Folder::Ready { cluster_id: id.cluster_id })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let cluster_id = cfg.cluster_id.clone().unwrap_or_else(|| {
                let peers: Vec<String> = cfg.peers.iter().map(|(id, a)| format!("{id}={a}")).collect();
                blake3::hash(peers.join(",").as_bytes()).to_hex()[..16].to_string()
            });
            if has_log {
                // A log without an identity: a folder from before identities were written.
                write(cfg, &cluster_id)?;
                return Ok(Folder::Ready { cluster_id });
            }
            if cfg.initial == InitialState::Existing {
                return Err(replace(format!("{shown} holds no state, but replica {} belongs to an existing cluster (--initial-state existing)", cfg.id)));
            }
            Ok(Folder::Empty { cluster_id })
        }
        Err(e) => Err(CoordError::Io(format!("{}: {e}", path.display()))),
    }
}

/// Records the folder's cluster and replica (after its log exists).
pub(super) fn write(cfg: &CoordinatorConfig, cluster_id: &str) -> Result<(), CoordError> {
    let id = ReplicaIdentity { cluster_id: cluster_id.to_string(), node_id: cfg.id };
    shoal_core::fsutil::write_atomic(&cfg.data_dir.join(IDENTITY_FILE), &id.encode_to_vec()).map_err(|e| CoordError::Io(e.to_string()))
}

/// Returns once an empty folder may start (see the module's rules), or why it may not.
pub(super) async fn await_empty_start(shared: &Shared) -> Result<(), CoordError> {
    match shared.cfg.initial {
        InitialState::Join => await_join(shared).await,
        _ => await_fresh_group(shared).await,
    }
}

/// `new` on an empty folder: asks every peer until enough are fresh too, or one has a log.
async fn await_fresh_group(shared: &Shared) -> Result<(), CoordError> {
    let me = shared.cfg.id;
    let voters: BTreeSet<u64> = shared.cfg.peers.keys().copied().collect();
    let others: Vec<(u64, String)> = shared.cfg.peers.iter().filter(|(id, _)| **id != me).map(|(id, a)| (*id, a.clone())).collect();
    let began = Instant::now();
    let mut last_note = Instant::now();
    loop {
        let asks = others.iter().map(|(id, addr)| {
            let hello = PeerHello { cluster_id: shared.cluster_id.clone(), node_id: me, fresh: true, ..Default::default() };
            let addr = addr.clone();
            let id = *id;
            let token = shared.cfg.peer_token();
            let tls = shared.cfg.tls.clone();
            async move {
                let ep = crate::tls::endpoint(&addr, tls.as_ref()).ok()?.with(|ep| ep.connect_timeout(Duration::from_secs(1)));
                let bearer = crate::client::Bearer::new(token.as_deref()).ok()?;
                let call = async { RaftTransportClient::with_interceptor(ep.connect().await.ok()?, bearer).hello(hello).await.ok().map(|r| r.into_inner()) };
                tokio::time::timeout(Duration::from_secs(2), call).await.ok().flatten().filter(|h| h.node_id == id)
            }
        });
        let mut set = tokio::task::JoinSet::new();
        for ask in asks {
            set.spawn(ask);
        }
        let answers: Vec<PeerHello> = set.join_all().await.into_iter().flatten().collect();
        let mut fresh = shared.fresh_peers.lock().expect("fresh lock").clone();
        fresh.extend(answers.iter().filter(|h| h.fresh && h.cluster_id == shared.cluster_id).map(|h| h.node_id));
        *shared.fresh_peers.lock().expect("fresh lock") = fresh.clone();
        let others_fresh = fresh.iter().filter(|id| **id != me && voters.contains(id)).count();
        match fresh_start(me, &voters, &fresh, &answers) {
            FreshStart::Refuse(why) => return Err(CoordError::Identity(format!("replica {me} ({}): {why}", shared.cfg.data_dir.display()))),
            // Everyone, or the safe minimum once the others had their chance.
            FreshStart::Start if others_fresh == others.len() || began.elapsed() >= FRESH_PATIENCE => {
                tracing::info!(confirmed = ?fresh, "the group is new: starting as one of its voters");
                return Ok(());
            }
            FreshStart::Start | FreshStart::Wait { .. } => {
                if last_note.elapsed() >= Duration::from_secs(5) {
                    last_note = Instant::now();
                    let waiting: Vec<u64> = others.iter().map(|(id, _)| *id).filter(|id| !fresh.contains(id)).collect();
                    tracing::warn!(?waiting, "empty folder: waiting for the other replicas to confirm the group is new before voting");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `join` on an empty folder: the group must hold this id as a learner that never voted.
async fn await_join(shared: &Shared) -> Result<(), CoordError> {
    let me = shared.cfg.id;
    let endpoints: Vec<String> = shared.cfg.peers.iter().filter(|(id, _)| **id != me).map(|(_, a)| a.clone()).collect();
    if endpoints.is_empty() {
        return Err(CoordError::Config(format!("replica {me} joins a group, but --peers names no other replica to ask")));
    }
    let client = crate::Client::new(&endpoints)
        .and_then(|c| c.with_token(shared.cfg.peer_token().as_deref()))
        .and_then(|c| c.with_tls(shared.cfg.tls.clone()))
        .map_err(|e| CoordError::Config(e.to_string()))?
        .with_deadline(Duration::from_secs(5));
    let mut last_note = Instant::now();
    loop {
        let req = JoinCheckRequest { id: me, cluster_id: shared.cluster_id.clone() };
        match client.call(|mut c| { let req = req.clone(); async move { c.check_join(req).await } }).await {
            Ok(r) if r.ok => return Ok(()),
            Ok(r) => return Err(CoordError::Identity(format!("replica {me} may not join: {}", r.reason))),
            Err(e) if last_note.elapsed() >= Duration::from_secs(5) => {
                last_note = Instant::now();
                tracing::warn!(error = %e, "waiting for the group to answer whether this replica may join");
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
