//! `shoal serve coordinator|worker`: one server process, its listeners and what it
//! advertises to its peers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use shoal_coordinator::CoordinatorConfig;

use crate::{dashboard, http, logs, shutdown_signal};

/// The /metrics (and dashboard) listener every server process has.
#[derive(clap::Args)]
pub struct HttpArgs {
    /// HTTP address for /metrics (Prometheus); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    http_listen: String,
    /// The HTTP address others are told (required when --http-listen is a wildcard).
    #[arg(long)]
    http_advertise: Option<String>,
    /// Write the advertised HTTP address to this file once listening.
    #[arg(long)]
    http_addr_file: Option<PathBuf>,
}

impl HttpArgs {
    async fn start(&self, dashboard: Option<dashboard::Dashboard>, security: Option<http::Security>) -> Result<(String, tokio::task::JoinHandle<()>)> {
        http::start(&self.http_listen, self.http_advertise.as_deref(), self.http_addr_file.as_deref(), dashboard, security).await
    }
}

#[derive(Subcommand)]
pub enum ServeCmd {
    /// One coordinator replica.
    Coordinator {
        /// This replica's id (must appear in --peers).
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// Address to listen on (loopback by default; port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The address peers and clients dial (default: the bound address; required when
        /// listening on a wildcard address such as 0.0.0.0). Must match this replica's
        /// --peers entry when both are given.
        #[arg(long)]
        advertise: Option<String>,
        /// Every replica as ID=HOST:PORT, comma-separated (default: this one alone).
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// Folder for this replica's Raft log.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Worker lease in milliseconds.
        #[arg(long, default_value_t = 5000)]
        lease_ms: u64,
        /// Write the bound address to this file once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// The cluster's id (recorded in the data folder; a mismatch is refused). Default: the
        /// one the folder records, or one derived from --peers for a new folder.
        #[arg(long)]
        cluster_id: Option<String>,
        /// `new`: a new folder starts a new replica. `existing`: the cluster exists, so the
        /// folder must hold this replica's state (an empty one is refused). `join`: a replica
        /// that `shoal coordinator add` made a learner of a running group.
        #[arg(long, default_value = "new", value_parser = ["new", "existing", "join"])]
        initial_state: String,
        /// Snapshot the state and compact the log every this many applied entries.
        #[arg(long, default_value_t = shoal_coordinator::server::SNAPSHOT_EVERY)]
        snapshot_every: u64,
        /// This replica's credentials folder (`shoal ca issue --node ID`): the cluster's token
        /// key and first tokens. Every call then needs a token whose role the method table
        /// allows, over mutual TLS. Required unless --insecure.
        #[arg(long, env = "SHOAL_CREDENTIALS")]
        credentials: Option<PathBuf>,
        /// Serve without credentials: plaintext, no tokens, anyone who reaches the port may
        /// call everything (a warning at every start). For a throwaway test on loopback.
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// One worker.
    Worker {
        /// Coordinator addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// Shards read from an object store are cached in this folder (default: a folder
        /// in the system's temp folder).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// The shard cache's size limit, in GB (least recently used shards go first).
        #[arg(long, default_value_t = 10.0)]
        cache_gb: f64,
        /// Data-plane address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The address peers dial (default: the bound address; required when listening on a
        /// wildcard address such as 0.0.0.0). The raw-TCP ring listens on the same interface
        /// and is advertised on this host.
        #[arg(long)]
        advertise: Option<String>,
        /// The raw-TCP ring's port, on the --listen address (0: one the system picks; fix it
        /// where a firewall stands between hosts).
        #[arg(long, default_value_t = 0)]
        ring_port: u16,
        /// cpu, or cuda[:N] on a build with `--features cuda`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Compute threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 300)]
        heartbeat_ms: u64,
        /// Seconds to wait for a peer inside a collective before failing the task.
        #[arg(long, default_value_t = 60)]
        collective_timeout_s: u64,
        /// This worker's credentials folder (`shoal ca issue --worker`): its token, in
        /// `worker.token`, and its certificate. Required unless --insecure.
        #[arg(long, env = "SHOAL_CREDENTIALS")]
        credentials: Option<PathBuf>,
        /// Run without credentials: plaintext calls to the coordinators, carrying the token in
        /// SHOAL_TOKEN if any (a warning at every start).
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        http: HttpArgs,
    },
}

fn parse_peers(id: u64, listen: &str, peers: &[String]) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for p in peers {
        let (i, a) = p.split_once('=').with_context(|| format!("--peers entry {p:?} is not ID=HOST:PORT"))?;
        let i: u64 = i.trim().parse().with_context(|| format!("--peers entry {p:?}: bad id"))?;
        if i == 0 {
            bail!("--peers entry {p:?}: ids start at 1");
        }
        out.insert(i, a.trim().to_string());
    }
    if out.is_empty() {
        out.insert(id, listen.to_string());
    }
    Ok(out)
}

/// The address a listener bound at `bound` tells others: `advertise` when given (HOST:PORT,
/// not a wildcard), else the bound address, which must then not be a wildcard (0.0.0.0 or
/// [::] reaches no one from another host).
pub fn advertised(bound: std::net::SocketAddr, advertise: Option<&str>, listen_flag: &str, advertise_flag: &str) -> Result<String> {
    match advertise {
        Some(a) => {
            let (host, port) = a.rsplit_once(':').with_context(|| format!("{advertise_flag} {a:?} is not HOST:PORT"))?;
            if host.is_empty() || port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
                bail!("{advertise_flag} {a:?} is not HOST:PORT with a port other than 0");
            }
            if host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
                bail!("{advertise_flag} {a:?} is a wildcard address; give the address peers dial");
            }
            Ok(a.to_string())
        }
        None if bound.ip().is_unspecified() => bail!("{listen_flag} {bound} is a wildcard address: give {advertise_flag} HOST:PORT, the address peers dial"),
        None => Ok(bound.to_string()),
    }
}

/// Binds `addr`; a fixed port that another socket holds for a moment (a restart on the same
/// port can meet a short-lived outgoing connection that the kernel gave it) is tried again for
/// up to 5 s.
pub async fn bind_retrying(addr: &str) -> Result<tokio::net::TcpListener> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < until => {
                tracing::warn!(addr, "address in use; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("binding {addr}"))),
        }
    }
}

pub async fn serve(cmd: ServeCmd) -> Result<()> {
    // A worker's job lines also go to the job's log files in the store (the dashboard's tail).
    // (A local store's: an object store cannot append; the lines still go to stderr.)
    logs::init(match &cmd {
        ServeCmd::Worker { store, .. } => store.local_folder(),
        _ => None,
    });
    match cmd {
        ServeCmd::Coordinator { id, listen, advertise, peers, data, store, lease_ms, addr_file, cluster_id, initial_state, snapshot_every, credentials, insecure, http } => {
            shoal_core::node::set_node(&format!("coordinator-{id}"));
            let (auth, tls) = match credentials.as_deref() {
                Some(dir) => (
                    Some(shoal_coordinator::server::AuthConfig::load(dir)?),
                    shoal_coordinator::tls::TlsFiles::load(dir, "node").map_err(anyhow::Error::msg)?,
                ),
                None if insecure => (None, None),
                None => bail!(
                    "serve coordinator needs --credentials DIR (`shoal ca issue --node {id} --out DIR`; `shoal up` makes them) \
                     or --insecure (plaintext and no tokens: anyone who reaches the port may call everything)"
                ),
            };
            if tls.is_none() && !insecure {
                bail!("{}: no certificate (node.crt, node.key, ca.crt; `shoal ca issue --node {id}`): a listener serves plaintext only with --insecure", credentials.unwrap_or_default().display());
            }
            let listener = bind_retrying(&listen).await?;
            let bound = listener.local_addr()?;
            let mut peers = parse_peers(id, &listen, &peers)?;
            let addr = match (advertise.as_deref(), peers.get(&id)) {
                (Some(a), Some(p)) if !p.ends_with(":0") && p != a => bail!("--advertise {a} differs from this replica's --peers entry {id}={p}"),
                // This replica's --peers entry is what the others dial: it stands for --advertise.
                (None, Some(p)) if !p.ends_with(":0") && !p.starts_with("0.0.0.0:") && !p.starts_with("[::]:") => p.clone(),
                (a, _) => advertised(bound, a, "--listen", "--advertise")?,
            };
            peers.insert(id, addr.clone());
            // The dashboard reads through this coordinator first, then its peers.
            let endpoints: Vec<String> = std::iter::once(addr.clone()).chain(peers.iter().filter(|(p, _)| **p != id).map(|(_, a)| a.clone())).collect();
            let store = store.open()?;
            let token = auth.as_ref().map(|a| a.key.peer_token(id));
            let security = match (&credentials, &tls) {
                (Some(dir), Some(files)) => Some(http::Security { dir: dir.clone(), name: "node", endpoints: endpoints.clone(), tls: files.clone() }),
                _ => None,
            };
            let (_, http) = http.start(Some(dashboard::Dashboard { endpoints, store: store.local_root().map(Into::into), token, tls: tls.clone() }), security).await?;
            if let Some(f) = addr_file {
                shoal_core::fsutil::write_atomic(&f, addr.as_bytes())?;
            }
            tracing::info!(id, %addr, "coordinator listening");
            let cfg = CoordinatorConfig {
                id,
                peers,
                data_dir: data,
                store,
                lease: Duration::from_millis(lease_ms),
                cluster_id,
                initial: match initial_state.as_str() {
                    "existing" => shoal_coordinator::InitialState::Existing,
                    "join" => shoal_coordinator::InitialState::Join,
                    _ => shoal_coordinator::InitialState::New,
                },
                snapshot_every,
                build: env!("SHOAL_BUILD").into(),
                auth,
                tls,
            };
            let served = shoal_coordinator::serve(cfg, listener, shutdown_signal()).await;
            http.abort();
            served?;
        }
        ServeCmd::Worker { endpoints, store, cache_dir, cache_gb, listen, advertise, ring_port, device, threads: _, heartbeat_ms, collective_timeout_s, credentials, insecure, http } => {
            let (token, tls) = match &credentials {
                Some(dir) => (
                    Some(shoal_cluster::credentials::load_token(&dir.join(shoal_cluster::credentials::WORKER_TOKEN_FILE))?),
                    shoal_coordinator::tls::TlsFiles::load(dir, "worker").map_err(anyhow::Error::msg)?,
                ),
                None if insecure => (std::env::var("SHOAL_TOKEN").ok().filter(|t| !t.trim().is_empty()), None),
                None => bail!(
                    "serve worker needs --credentials DIR (`shoal ca issue --worker --out DIR`; `shoal up` makes DIR/credentials/worker) \
                     or --insecure (plaintext calls to coordinators that run with --insecure)"
                ),
            };
            if tls.is_none() && !insecure {
                bail!("{}: no certificate (worker.crt, worker.key, ca.crt; `shoal ca issue --worker`): plaintext only with --insecure", credentials.unwrap_or_default().display());
            }
            if insecure {
                tracing::warn!("--insecure: this worker calls its coordinators in plaintext");
            }
            if !(cache_gb.is_finite() && cache_gb >= 0.0) {
                bail!("--cache-gb must be a size in GB (0 or more), not {cache_gb}");
            }
            // The default folder is this process's own, removed when it stops.
            let own_cache = cache_dir.is_none().then(|| std::env::temp_dir().join(format!("shoal-shard-cache-{}", std::process::id())));
            let store = store.open()?;
            let store = match cache_dir.clone().or_else(|| own_cache.clone()) {
                Some(dir) if store.local_root().is_none() => store.with_cache(dir, (cache_gb * 1e9) as u64)?,
                _ => store,
            };
            let security = match (&credentials, &tls) {
                (Some(dir), Some(files)) => Some(http::Security { dir: dir.clone(), name: "worker", endpoints: endpoints.clone(), tls: files.clone() }),
                _ => None,
            };
            let (_, http) = http.start(None, security).await?;
            let listener = bind_retrying(&listen).await?;
            let advertise = advertised(listener.local_addr()?, advertise.as_deref(), "--listen", "--advertise")?;
            tracing::info!(addr = %listener.local_addr()?, %advertise, "worker listening");
            let cfg = shoal_worker::WorkerConfig {
                endpoints,
                advertise: Some(advertise),
                ring_port,
                store,
                device,
                heartbeat: Duration::from_millis(heartbeat_ms.max(10)),
                collective_timeout: Duration::from_secs(collective_timeout_s.max(1)),
                token,
                tls,
            };
            let served = shoal_worker::run_worker(cfg, listener, shutdown_signal()).await;
            http.abort();
            if let Some(dir) = own_cache {
                let _ = std::fs::remove_dir_all(dir);
            }
            served?;
        }
    }
    Ok(())
}

/// Where the cluster's store is, and how to reach it.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// The cluster's store (datasets, checkpoints, models): a folder, or s3://BUCKET/PREFIX
    /// (credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, region from AWS_REGION).
    #[arg(long = "store", env = "SHOAL_STORE")]
    pub location: String,
    /// An S3-compatible server's URL (MinIO, Ceph, ...); default (or empty): AWS.
    #[arg(long, env = "SHOAL_STORE_ENDPOINT")]
    pub store_endpoint: Option<String>,
}

impl StoreArgs {
    pub fn open(&self) -> Result<shoal_core::store::Store> {
        Ok(shoal_core::store::Store::open(&self.location, self.store_endpoint.as_deref().filter(|e| !e.is_empty()))?)
    }

    /// The store's folder when it is one.
    fn local_folder(&self) -> Option<PathBuf> {
        self.open().ok().and_then(|s| s.local_root().map(Into::into))
    }
}

#[cfg(test)]
mod tests {
    use super::advertised;

    #[test]
    fn a_wildcard_listener_needs_an_advertised_address() {
        let any: std::net::SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let e = advertised(any, None, "--listen", "--advertise").unwrap_err().to_string();
        assert!(e.contains("--listen 0.0.0.0:7000 is a wildcard") && e.contains("--advertise"), "{e}");
        assert_eq!(advertised(any, Some("10.0.0.5:7000"), "--listen", "--advertise").unwrap(), "10.0.0.5:7000");
        for bad in ["0.0.0.0:7000", "[::]:7000", "10.0.0.5", "10.0.0.5:0", ":7000"] {
            assert!(advertised(any, Some(bad), "--listen", "--advertise").is_err(), "{bad}");
        }
        let v6: std::net::SocketAddr = "[::]:1".parse().unwrap();
        assert!(advertised(v6, None, "--http-listen", "--http-advertise").unwrap_err().to_string().contains("--http-advertise"));
        let lo: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(advertised(lo, None, "--listen", "--advertise").unwrap(), "127.0.0.1:9");
    }
}
