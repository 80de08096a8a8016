//! A coordinator client that knows every replica. A call goes to the replica that last
//! answered; when that one is unreachable or not the leader, the call moves on to the next,
//! until a deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_proto::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
pub use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}", .0.message())]
    Rpc(Status),
    #[error("no coordinator answered at {endpoints} ({last})")]
    Unreachable { endpoints: String, last: String },
    #[error("bad endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    #[error("the token is not printable ASCII (is SHOAL_TOKEN or the token file right?)")]
    BadToken,
}

/// Whether nothing listens at `addr` (`host:port`, or a URL) any more: the connection is
/// refused, so a process that served there is gone. A connect that times out proves nothing
/// (a busy or distant host) and says no.
pub async fn refuses_connections(addr: &str) -> bool {
    let addr = addr.strip_prefix("http://").unwrap_or(addr);
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// `host:port` as a gRPC URL (a full URL is kept as it is).
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A fresh idempotency key for one logical write (reused by all its retries).
pub fn new_request_id() -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{}-{nanos:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Largest gRPC message either side accepts (job specs and dataset manifests are small; this
/// guards against garbage).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Puts `authorization: Bearer TOKEN` on every call (none: the call goes without, which only
/// a server started without credentials takes).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, ClientError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}").parse().map(|v| Bearer(Some(v))).map_err(|_| ClientError::BadToken),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A registered worker: its id, and on a cluster with credentials the key its calls prove
/// that id with (`RegisterWorkerResponse.worker_key`; the worker token alone says only "some
/// worker of this cluster").
#[derive(Clone)]
pub struct WorkerId {
    pub id: String,
    key: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerId({:?})", self.id)
    }
}

impl WorkerId {
    /// `key` as the registration gave it (empty: a cluster without credentials).
    pub fn new(id: String, key: &[u8]) -> WorkerId {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        WorkerId { id, key: (!key.is_empty()).then(|| hex.parse().expect("hex is ASCII")) }
    }

    /// `message` as a call made for this worker (its key in `WORKER_KEY_HEADER`).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(k) = &self.key {
            r.metadata_mut().insert(shoal_core::auth::WORKER_KEY_HEADER, k.clone());
        }
        r
    }
}

/// A channel that carries a token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;
/// The generated coordinator client over such a channel.
pub type Rpc = CoordinatorClient<AuthChannel>;

pub struct Client {
    /// The replicas it knows (given, then learned), as URLs and channels, index for index.
    targets: std::sync::RwLock<(Vec<String>, Vec<Channel>)>,
    preferred: AtomicUsize,
    deadline: Duration,
    /// Channels to leaders learned from hints that are not among `endpoints`.
    hinted: Mutex<HashMap<String, Channel>>,
    bearer: Bearer,
    tls: Option<crate::tls::TlsFiles>,
}

/// How long one attempt may take before the call moves to another replica: well under a
/// worker's lease (5 s by default), so a hung replica cannot cost a worker its lease.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

fn channel(url: &str, tls: Option<&crate::tls::TlsFiles>) -> Result<Channel, ClientError> {
    let ep = crate::tls::endpoint(url, tls).map_err(|err| ClientError::BadEndpoint(url.to_string(), err))?;
    Ok(ep.with(|ep| ep.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(10))).connect_lazy())
}

/// Errors another replica, or the same one a moment later, may answer differently.
fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded) && s.metadata().get("shoal-final").is_none()
}

impl Client {
    /// `endpoints` are `host:port` (or `http://host:port`) of coordinator replicas.
    pub fn new(endpoints: &[String]) -> Result<Client, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::BadEndpoint(String::new(), "no coordinator endpoints given".into()));
        }
        let norm: Vec<String> = endpoints.iter().map(|e| endpoint_url(e)).collect();
        let channels = norm.iter().map(|u| channel(u, None)).collect::<Result<_, _>>()?;
        Ok(Client {
            targets: std::sync::RwLock::new((norm, channels)),
            preferred: AtomicUsize::new(0),
            deadline: Duration::from_secs(15),
            hinted: Mutex::default(),
            bearer: Bearer::default(),
            tls: None,
        })
    }

    /// Calls go over mutual TLS with `tls` (the CA, this client's certificate and key).
    pub fn with_tls(mut self, tls: Option<crate::tls::TlsFiles>) -> Result<Self, ClientError> {
        {
            let mut t = self.targets.write().expect("targets lock");
            t.1 = t.0.iter().map(|u| channel(u, tls.as_ref())).collect::<Result<_, _>>()?;
        }
        self.hinted.lock().expect("hint lock").clear();
        self.tls = tls;
        Ok(self)
    }

    /// Calls carry `token` (`shoal_...`, or a coordinator's peer token).
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, ClientError> {
        self.bearer = Bearer::new(token)?;
        Ok(self)
    }

    /// How long a call keeps trying other replicas before giving up.
    pub fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.targets.read().expect("targets lock").0.clone()
    }

    /// Adds replicas it did not know (`host:port`), so calls reach a group whose members
    /// changed since this client was made.
    pub fn learn(&self, addrs: impl IntoIterator<Item = String>) {
        let mut t = self.targets.write().expect("targets lock");
        for a in addrs {
            let url = endpoint_url(&a);
            if !t.0.contains(&url) {
                if let Ok(ch) = channel(&url, self.tls.as_ref()) {
                    t.0.push(url);
                    t.1.push(ch);
                }
            }
        }
    }

    /// A client for one specific replica (for per-replica status).
    pub fn single(&self, i: usize) -> Rpc {
        let ch = {
            let t = self.targets.read().expect("targets lock");
            t.1[i % t.1.len()].clone()
        };
        self.client(ch)
    }

    fn client(&self, ch: Channel) -> Rpc {
        CoordinatorClient::with_interceptor(ch, self.bearer.clone()).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE)
    }

    /// Runs `f` against a replica. Every error that another replica (or a later try) may
    /// answer differently moves it on: unreachable, not the leader (straight to the leader a
    /// follower names), timed out. Writes carry request ids, so a retry is applied once.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Rpc) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let n = self.targets.read().expect("targets lock").1.len();
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut hint: Option<Channel> = None;
        let mut hops = 0;
        let mut backoff = Duration::from_millis(50);
        let mut last = String::from("no attempt finished");
        loop {
            let remaining = self.deadline.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(ClientError::Unreachable { endpoints: self.endpoints().join(","), last });
            }
            let (target, hinted) = match hint.take() {
                Some(ch) => (self.client(ch), true),
                None => (self.single(i), false),
            };
            let error = match tokio::time::timeout(ATTEMPT_TIMEOUT.min(remaining), f(target)).await {
                Ok(Ok(r)) => {
                    if !hinted {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) if retryable(&s) => s,
                Ok(Err(s)) => return Err(ClientError::Rpc(s)),
                Err(_) => Status::deadline_exceeded(format!("no answer within {:?}", ATTEMPT_TIMEOUT.min(remaining))),
            };
            last = error.message().to_string();
            let leader = error.metadata().get("shoal-leader").and_then(|v| v.to_str().ok()).map(endpoint_url);
            // Follow a hint at once, a few times; after that, pause between rounds.
            if let Some(url) = leader.filter(|_| hops < 3) {
                hops += 1;
                match self.endpoints().iter().position(|e| *e == url) {
                    Some(j) => i = j,
                    None => hint = Some(self.hinted_channel(&url)?),
                }
                continue;
            }
            hops = 0;
            i = (i + 1) % n;
            if i == self.preferred.load(Ordering::Relaxed) % n || n == 1 {
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }

    fn hinted_channel(&self, url: &str) -> Result<Channel, ClientError> {
        let mut map = self.hinted.lock().expect("hint lock");
        if let Some(ch) = map.get(url) {
            return Ok(ch.clone());
        }
        let ch = channel(url, self.tls.as_ref())?;
        if map.len() < 16 {
            map.insert(url.to_string(), ch.clone());
        }
        Ok(ch)
    }
}
