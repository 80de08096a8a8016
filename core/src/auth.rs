//! Access tokens and roles: who may call what.
//!
//! A token is `shoal_<id>_<secret>`: a public 16-hex-digit id and a 256-bit secret (64 hex
//! digits). The replicated state keeps the id, the role and the secret's blake3 keyed with the
//! cluster's token key (`token.key`, a file every coordinator holds and nothing else), so
//! neither the log nor a snapshot holds a usable token. Coordinators prove themselves to each
//! other with a peer token derived from the same key and their node id, which needs no state
//! (a group that has not started yet must already talk).
//!
//! `access` is the one table of which roles may call which gRPC method.

use std::fmt;
use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("not a shoal token (expected shoal_<16 hex digits>_<64 hex digits>)")]
    Malformed,
    #[error("unknown role {0:?} (expected admin, operator, viewer or worker)")]
    UnknownRole(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// What a caller may do. `Peer` is a coordinator replica (derived from the token key, never
/// stored); the others are stored tokens' roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Operator,
    Viewer,
    Worker,
    Peer,
}

impl Role {
    /// The roles a stored token may have.
    pub const STORED: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::Worker];
    pub const ALL: [Role; 5] = [Role::Admin, Role::Operator, Role::Viewer, Role::Worker, Role::Peer];

    pub fn parse(s: &str) -> Result<Role, AuthError> {
        Role::STORED.into_iter().find(|r| r.as_str() == s).ok_or_else(|| AuthError::UnknownRole(s.to_string()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
            Role::Peer => "peer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one extra right a token can be granted: exec batch jobs (which run commands on every
/// worker) without being admin.
pub const GRANT_EXEC: &str = "exec";
/// The gRPC header a registered worker's calls carry its key in (hex; `TokenKey::worker_key`).
pub const WORKER_KEY_HEADER: &str = "shoal-worker-key";
pub const GRANTS: [&str; 1] = [GRANT_EXEC];

/// A bearer token: its public id and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: [u8; 32],
}

impl fmt::Debug for Token {
    // Never the secret, not even in a debug log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.id)
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS's generator failing means the machine cannot make secrets at all.
    getrandom::fill(&mut b).expect("the operating system's random number generator");
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Token {
    pub fn generate() -> Token {
        Token { id: hex(&random::<8>()), secret: random() }
    }

    pub fn parse(s: &str) -> Result<Token, AuthError> {
        let rest = s.trim().strip_prefix("shoal_").ok_or(AuthError::Malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
        unhex::<8>(id).ok_or(AuthError::Malformed)?;
        Ok(Token { id: id.to_string(), secret: unhex::<32>(secret).ok_or(AuthError::Malformed)? })
    }

    /// Whether `id` is a token id (16 lowercase hex digits).
    pub fn valid_id(id: &str) -> bool {
        unhex::<8>(id).is_some()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shoal_{}_{}", self.id, hex(&self.secret))
    }
}

/// The cluster's token key: what stored hashes and peer tokens are keyed with.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

const PEER_PREFIX: &str = "shoal-peer_";

impl TokenKey {
    pub fn generate() -> TokenKey {
        TokenKey(random())
    }

    pub fn from_bytes(b: [u8; 32]) -> TokenKey {
        TokenKey(b)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// What the state keeps of a token's secret.
    pub fn hash(&self, secret: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, secret).as_bytes()
    }

    /// Whether `secret` hashes to `stored`, in constant time.
    pub fn matches(&self, secret: &[u8], stored: &[u8]) -> bool {
        let Ok(stored) = <[u8; 32]>::try_from(stored) else { return false };
        blake3::keyed_hash(&self.0, secret) == blake3::Hash::from_bytes(stored)
    }

    fn peer_mac(&self, node: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"shoal peer token v1 ");
        h.update(&node.to_le_bytes());
        h.finalize()
    }

    /// Coordinator `node`'s peer token: `shoal-peer_<node>_<keyed blake3>`.
    pub fn peer_token(&self, node: u64) -> String {
        format!("{PEER_PREFIX}{node}_{}", self.peer_mac(node).to_hex())
    }

    /// The node a peer token was made for, if this key made it.
    pub fn check_peer(&self, token: &str) -> Option<u64> {
        let (node, mac) = token.strip_prefix(PEER_PREFIX)?.split_once('_')?;
        let node: u64 = node.parse().ok().filter(|n| *n != 0)?;
        let mac = blake3::Hash::from_bytes(unhex::<32>(mac)?);
        (self.peer_mac(node) == mac).then_some(node)
    }

    /// The secret the ranks of (`job`, `generation`) prove their membership with on the data
    /// plane: each worker of the generation gets it with its assignment, and every replica
    /// derives the same one.
    pub fn ring_key(&self, job: u64, generation: u64) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"shoal ring key v1 ");
        h.update(&job.to_le_bytes());
        h.update(&generation.to_le_bytes());
        *h.finalize().as_bytes()
    }

    /// The secret a registered worker's calls prove its id with (the header
    /// `WORKER_KEY_HEADER`): a worker token says "a worker of this cluster", this says which
    /// one, so no worker can heartbeat, report or commit as another and get its assignment or
    /// its ring key. Given at registration; every replica derives the same.
    pub fn worker_key(&self, worker_id: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"shoal worker key v1 ");
        h.update(worker_id.as_bytes());
        *h.finalize().as_bytes()
    }

    /// Whether `header` (hex) is `worker_id`'s key.
    pub fn check_worker(&self, worker_id: &str, header: &str) -> bool {
        unhex::<32>(header).is_some_and(|k| blake3::Hash::from_bytes(k) == blake3::Hash::from_bytes(self.worker_key(worker_id)))
    }

    /// Reads a key file: 32 bytes as 64 hex digits, readable by its owner only.
    pub fn load(path: &Path) -> Result<TokenKey, AuthError> {
        let text = read_secret_text(path)?;
        unhex::<32>(text.trim()).map(TokenKey).ok_or_else(|| AuthError::File { path: path.display().to_string(), reason: "not a token key (64 hex digits)".into() })
    }

    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex(&self.0))
    }
}

/// Whether `token` looks like a peer token (checked by `TokenKey::check_peer`).
pub fn is_peer_token(token: &str) -> bool {
    token.starts_with(PEER_PREFIX)
}

/// Reads a file that holds a secret, refusing one that others than its owner may read (as ssh
/// does for keys): a secret left readable by everyone is a leak, better refused than used.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, AuthError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let err = |reason: String| AuthError::File { path: path.display().to_string(), reason };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    // PostgreSQL's rule for key files: owner-only, or also group-readable when root owns the
    // file (a Kubernetes Secret volume with an fsGroup: root, the pod's group, 0440).
    let allowed = if meta.uid() == 0 { 0o040 } else { 0 };
    if meta.permissions().mode() & 0o077 & !allowed != 0 {
        return Err(err(format!("may be read by others (mode {:o}); `chmod 600 {}`", meta.permissions().mode() & 0o777, path.display())));
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

/// A secret file's text (a token or a key).
pub fn read_secret_text(path: &Path) -> Result<String, AuthError> {
    String::from_utf8(read_secret_file(path)?).map_err(|_| AuthError::File { path: path.display().to_string(), reason: "not text".into() })
}

/// Writes a secret file readable by its owner only (mode 0600 from its creation), durably.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| AuthError::File { path: path.display().to_string(), reason: e.to_string() };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// Who is calling, once its token checked out: what handlers see of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's id, or `node-N` for a peer, or `insecure` on a server without credentials.
    pub id: String,
    pub role: Role,
    /// May submit exec batch jobs (admin, or the exec grant).
    pub exec: bool,
    /// A peer's coordinator id (from its peer token).
    pub node: Option<u64>,
}

impl Caller {
    /// Everyone on a server started without credentials (`--insecure`).
    pub fn insecure() -> Caller {
        Caller { id: "insecure".into(), role: Role::Admin, exec: true, node: None }
    }
}

/// Who may call a method: nobody needs a token for `Open` ones (the health service that
/// Kubernetes probes); `Roles` lists the roles that may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Open,
    Roles(&'static [Role]),
}

const READ: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer, Role::Peer];
const STATUS: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer, Role::Peer, Role::Worker];
const OPERATE: &[Role] = &[Role::Admin, Role::Operator];
const ADMIN: &[Role] = &[Role::Admin];
const WORKER: &[Role] = &[Role::Worker];
const PEER: &[Role] = &[Role::Peer];

/// The method table: every gRPC method a coordinator serves, by its path
/// (`/shoal.v1.Coordinator/SubmitJob`), and who may call it. A method not in the table is
/// refused to everyone. Tested as a matrix (every method x every role) against real calls.
pub const METHODS: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Access::Open),
    ("/grpc.health.v1.Health/Watch", Access::Open),
    // Reads: anyone with a token but a worker (which sees only its status).
    ("/shoal.v1.Coordinator/GetStatus", Access::Roles(STATUS)),
    ("/shoal.v1.Coordinator/ListDatasets", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/GetDataset", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/GetModel", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/ListModels", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/ListTemplates", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/GetJob", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/ListJobs", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/GetJobMetrics", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/GetPipelineRun", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/ListPipelines", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/ListPipelineRuns", Access::Roles(READ)),
    ("/shoal.v1.Coordinator/PlanPipeline", Access::Roles(READ)),
    // Jobs and data: operators (an exec batch job also needs admin or the exec grant).
    ("/shoal.v1.Coordinator/RegisterDataset", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/SetDatasetSettings", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/CollectDatasets", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/RegisterModel", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/SetModelAlias", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/SubmitJob", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/ScheduleJob", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/CancelJob", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/ResumeJob", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/PruneJobs", Access::Roles(OPERATE)),
    // Objects stream data in and out (imports, checkpoint and model exports): data, so
    // operators, not viewers.
    ("/shoal.v1.Coordinator/PutObjects", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/GetObject", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/DropImport", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/SubmitPipeline", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/RunPipeline", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/CancelPipelineRun", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/ResumePipelineRun", Access::Roles(OPERATE)),
    ("/shoal.v1.Coordinator/PausePipeline", Access::Roles(OPERATE)),
    // The cluster itself: admins.
    ("/shoal.v1.Coordinator/AddCoordinator", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/RemoveCoordinator", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/TransferLeader", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/SetSettings", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/CreateToken", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/ListTokens", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/RevokeToken", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/ListAudit", Access::Roles(ADMIN)),
    ("/shoal.v1.Coordinator/VerifyAudit", Access::Roles(ADMIN)),
    // Workers' own calls.
    ("/shoal.v1.Coordinator/RegisterWorker", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/Heartbeat", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/ReportProgress", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/ReportOutcome", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/ReportTask", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/Deregister", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/CommitCheckpoint", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/ReportCheckpointError", Access::Roles(WORKER)),
    ("/shoal.v1.Coordinator/RecordMetrics", Access::Roles(WORKER)),
    // Between coordinator replicas.
    ("/shoal.v1.Coordinator/CheckJoin", Access::Roles(PEER)),
    ("/shoal.v1.RaftTransport/Send", Access::Roles(PEER)),
    ("/shoal.v1.RaftTransport/SendStream", Access::Roles(PEER)),
    ("/shoal.v1.RaftTransport/Stream", Access::Roles(PEER)),
    ("/shoal.v1.RaftTransport/Hello", Access::Roles(PEER)),
];

/// Who may call the method at `path`; None: no such method (refused to everyone).
pub fn access(path: &str) -> Option<Access> {
    METHODS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        let t = Token::generate();
        let s = t.to_string();
        assert!(s.starts_with("shoal_") && s.len() == 6 + 16 + 1 + 64, "{s}");
        assert_eq!(Token::parse(&s).unwrap(), t);
        assert_eq!(Token::parse(&format!("  {s}\n")).unwrap(), t, "a token read from a file keeps its newline");
        assert_ne!(Token::generate(), t);
        assert!(!format!("{t:?}").contains(&s[23..]), "Debug shows no secret");
        for bad in ["", "shoal_", "shoal_abc_def", &s.replace("shoal_", "shoal-"), &s[..s.len() - 1], &format!("{s}0"), &s.to_uppercase().replace("SHOAL_", "shoal_")] {
            assert_eq!(Token::parse(bad), Err(AuthError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn hashes_are_keyed_and_peer_tokens_name_their_node() {
        let (k1, k2) = (TokenKey::generate(), TokenKey::generate());
        let t = Token::generate();
        let h = k1.hash(&t.secret);
        assert!(k1.matches(&t.secret, &h));
        assert!(!k2.matches(&t.secret, &h), "another cluster's key");
        assert!(!k1.matches(&Token::generate().secret, &h));
        assert!(!k1.matches(&t.secret, &h[..31]));
        let p = k1.peer_token(3);
        assert_eq!(k1.check_peer(&p), Some(3));
        assert_eq!(k2.check_peer(&p), None, "another cluster's peer");
        assert_eq!(k1.check_peer(&p.replace("shoal-peer_3_", "shoal-peer_4_")), None, "a peer cannot claim another node id");
        assert_eq!(k1.check_peer(&t.to_string()), None);
        assert!(is_peer_token(&p) && !is_peer_token(&t.to_string()));
    }

    #[test]
    fn secret_files_are_written_private_and_readable_ones_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token.key");
        let key = TokenKey::generate();
        write_secret_file(&path, key.to_file_text().as_bytes()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(TokenKey::load(&path).unwrap().as_bytes(), key.as_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TokenKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("may be read by others") && e.contains("chmod 600"), "{e}");
        // Group-readable passes only when root owns the file (a Kubernetes Secret volume).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let root_owned = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&path).unwrap()) == 0;
        assert_eq!(TokenKey::load(&path).is_ok(), root_owned);
        if root_owned {
            std::os::unix::fs::chown(&path, Some(1), None).unwrap();
            assert!(TokenKey::load(&path).is_err(), "a group-readable file of another owner");
        }
    }

    #[test]
    fn a_worker_key_proves_one_worker_id_under_one_cluster_key() {
        let (k, other) = (TokenKey::generate(), TokenKey::generate());
        let w1 = hex(&k.worker_key("w-1"));
        assert!(k.check_worker("w-1", &w1));
        assert!(!k.check_worker("w-2", &w1), "another worker's key");
        assert!(!other.check_worker("w-1", &w1), "another cluster's key");
        assert!(!k.check_worker("w-1", &w1[..63]) && !k.check_worker("w-1", "") && !k.check_worker("w-1", &w1.to_uppercase()));
        assert_ne!(k.worker_key("w-1"), k.worker_key("w-10"));
    }

    #[test]
    fn the_method_table_is_whole_and_roles_parse() {
        let mut seen = std::collections::BTreeSet::new();
        for (path, _) in METHODS {
            assert!(seen.insert(*path), "{path} twice");
        }
        assert_eq!(access("/shoal.v1.Coordinator/SubmitJob"), Some(Access::Roles(OPERATE)));
        assert_eq!(access("/shoal.v1.Coordinator/Nope"), None);
        // Every method the coordinator serves is in the table (the data plane is the
        // workers' listener, not the coordinator's).
        let mut service = "";
        let mut methods = 0;
        for line in include_str!("../../proto/proto/shoal.proto").lines().map(str::trim) {
            if let Some(s) = line.strip_prefix("service ") {
                service = s.split_whitespace().next().unwrap();
            } else if let Some(rpc) = line.strip_prefix("rpc ") {
                let name = rpc.split('(').next().unwrap().trim();
                if service != "DataPlane" {
                    assert!(access(&format!("/shoal.v1.{service}/{name}")).is_some(), "{service}/{name} is not in the method table");
                    methods += 1;
                }
            }
        }
        assert_eq!(methods + 2, METHODS.len(), "the table names a method the proto does not have");
        for r in Role::STORED {
            assert_eq!(Role::parse(r.as_str()).unwrap(), r);
        }
        assert!(Role::parse("peer").is_err(), "peer tokens are derived, never stored");
        assert!(Role::parse("root").unwrap_err().to_string().contains("\"root\""));
    }
}
