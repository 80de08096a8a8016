//! A coordinator client that knows every replica. A call goes to the replica that last
//! answered; when that one is unreachable or not the leader, the call moves on to the next,
//! until a deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_proto::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};
pub use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}", .0.message())]
    Rpc(Status),
    #[error("no coordinator answered at {endpoints} ({last})")]
    Unreachable { endpoints: String, last: String },
    #[error("bad endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
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

pub struct Client {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    preferred: AtomicUsize,
    deadline: Duration,
}

impl Client {
    /// `endpoints` are `host:port` (or `http://host:port`) of coordinator replicas.
    pub fn new(endpoints: &[String]) -> Result<Client, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::BadEndpoint(String::new(), "no coordinator endpoints given".into()));
        }
        let mut channels = Vec::new();
        let mut norm = Vec::new();
        for e in endpoints {
            let url = endpoint_url(e);
            let ep = Endpoint::from_shared(url.clone()).map_err(|err| ClientError::BadEndpoint(e.clone(), err.to_string()))?;
            channels.push(ep.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(30)).connect_lazy());
            norm.push(url);
        }
        Ok(Client { endpoints: norm, channels, preferred: AtomicUsize::new(0), deadline: Duration::from_secs(15) })
    }

    /// How long a call keeps trying other replicas before giving up.
    pub fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client for one specific replica (for per-replica status).
    pub fn single(&self, i: usize) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channels[i].clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Runs `f` against a replica, failing over on `Unavailable` (unreachable or not leader).
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let n = self.channels.len();
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut backoff = Duration::from_millis(50);
        loop {
            match f(self.single(i)).await {
                Ok(r) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown) && s.metadata().get("shoal-final").is_none() => {
                    if start.elapsed() >= self.deadline {
                        return Err(ClientError::Unreachable { endpoints: self.endpoints.join(","), last: s.message().to_string() });
                    }
                    i = (i + 1) % n;
                    if i == self.preferred.load(Ordering::Relaxed) % n {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
                Err(s) => return Err(ClientError::Rpc(s)),
            }
        }
    }
}
