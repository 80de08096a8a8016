//! The HTTP side of `shoal serve`: `/metrics` (Prometheus) on `--http-listen`, beside the
//! gRPC port, and on a coordinator the dashboard (`dashboard`). Loopback by default, on a port the system picks; the bound address goes to the
//! log and, with `--http-addr-file`, to a file (`shoal up` reads it to print the addresses).
//!
//! With credentials (`Security`) it serves HTTPS with the process's certificate (read again
//! when its files change) and asks a token of every request but `/ready`: `Authorization:
//! Bearer` (Prometheus's `credentials_file`), a `shoal_token` cookie, or `?token=` once, which
//! sets the cookie (a browser). A token is good when a coordinator takes it for a read; a good
//! answer is remembered for `TOKEN_MEMORY`, so a revoked token is refused within that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// How long a token a coordinator took is taken here without asking again.
const TOKEN_MEMORY: Duration = Duration::from_secs(5);

/// What the HTTP side of a process with credentials needs: its certificate's folder and name
/// (`node` or `worker`), and the coordinators (with its TLS files) to check tokens with.
pub struct Security {
    pub dir: PathBuf,
    pub name: &'static str,
    pub endpoints: Vec<String>,
    pub tls: shoal_coordinator::tls::TlsFiles,
}

/// Tokens checked with the coordinators, good ones remembered for a moment.
struct Tokens {
    endpoints: Vec<String>,
    tls: shoal_coordinator::tls::TlsFiles,
    good: Mutex<HashMap<blake3::Hash, Instant>>,
}

impl Tokens {
    /// Whether a coordinator takes `token` for a read (Some(false): refused; None: no
    /// coordinator answered).
    async fn check(&self, token: &str) -> Option<bool> {
        let key = blake3::hash(token.as_bytes());
        if self.good.lock().expect("token memory").get(&key).is_some_and(|at| at.elapsed() < TOKEN_MEMORY) {
            return Some(true);
        }
        if shoal_core::auth::Token::parse(token).is_err() {
            return Some(false);
        }
        let client = shoal_coordinator::Client::new(&self.endpoints)
            .and_then(|c| c.with_token(Some(token)))
            .and_then(|c| c.with_tls(Some(self.tls.clone())))
            .ok()?
            .with_deadline(Duration::from_secs(5));
        let answer = client.call(|mut c| async move { c.list_templates(shoal_proto::ListTemplatesRequest::default()).await }).await;
        // The guard answers before the method does: a refusal is the token's; any other
        // answer from the method means the guard let the token through. A transport's failure
        // says nothing either way.
        let good = match answer {
            Ok(_) => true,
            Err(shoal_coordinator::ClientError::Rpc(s)) => match s.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => false,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => return None,
                _ => true,
            },
            Err(_) => return None,
        };
        let mut memory = self.good.lock().expect("token memory");
        memory.retain(|_, at| at.elapsed() < TOKEN_MEMORY);
        if good {
            memory.insert(key, Instant::now());
        }
        Some(good)
    }
}

/// The token a request carries: `Authorization: Bearer`, else the `shoal_token` cookie.
fn presented(req: &Request) -> Option<String> {
    let h = req.headers();
    if let Some(t) = h.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) {
        return Some(t.trim().to_string());
    }
    h.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| c.trim().strip_prefix("shoal_token=").map(str::to_string))
}

/// `?token=T` (a browser's first visit): T and the query without it.
fn query_token(req: &Request) -> Option<(String, String)> {
    let q = req.uri().query()?;
    let mut token = None;
    let rest: Vec<&str> = q
        .split('&')
        .filter(|kv| match kv.strip_prefix("token=") {
            Some(t) => {
                token = Some(t.to_string());
                false
            }
            None => true,
        })
        .collect();
    Some((token?, rest.join("&")))
}

fn refused(status: StatusCode, why: &'static str) -> Response {
    (status, [(WWW_AUTHENTICATE, "Bearer realm=\"shoal\"")], format!("{why}\n")).into_response()
}

async fn require_token(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    if let Some((token, rest)) = query_token(&req) {
        return match tokens.check(&token).await {
            Some(true) => {
                let path = req.uri().path();
                let location = if rest.is_empty() { path.to_string() } else { format!("{path}?{rest}") };
                let cookie = format!("shoal_token={token}; Path=/; HttpOnly; Secure; SameSite=Lax");
                (StatusCode::SEE_OTHER, [(LOCATION, location), (SET_COOKIE, cookie)]).into_response()
            }
            Some(false) => refused(StatusCode::UNAUTHORIZED, "this token is not (or no longer) good for reading"),
            None => refused(StatusCode::SERVICE_UNAVAILABLE, "no coordinator answered to check the token"),
        };
    }
    match presented(&req) {
        None => refused(StatusCode::UNAUTHORIZED, "a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN once"),
        Some(token) => match tokens.check(&token).await {
            Some(true) => next.run(req).await,
            Some(false) => refused(StatusCode::UNAUTHORIZED, "this token is not (or no longer) good for reading"),
            None => refused(StatusCode::SERVICE_UNAVAILABLE, "no coordinator answered to check the token"),
        },
    }
}

/// TLS connections for axum: the coordinator's accept loop (`tls::tls_incoming`: each
/// handshake on a task of its own, bounded, so a silent client delays no one).
struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<Result<shoal_coordinator::tls::TlsIo, std::io::Error>>,
}

impl TlsListener {
    fn new(listener: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener { local, ready: shoal_coordinator::tls::tls_incoming(listener, config).into_inner() })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = shoal_coordinator::tls::TlsIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.ready.recv().await {
                Some(Ok(io)) => {
                    use tonic::transport::server::Connected;
                    let peer = io.connect_info().remote.unwrap_or(self.local);
                    return (io, peer);
                }
                Some(Err(_)) => continue,
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn server_config(s: &Security) -> Result<Arc<rustls::ServerConfig>> {
    let resolver = shoal_coordinator::tls::ReloadingCert::new(&s.dir, s.name).map_err(anyhow::Error::msg)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(shoal_coordinator::tls::CertSource::Reloading(resolver)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn metrics() -> impl axum::response::IntoResponse {
    ([(CONTENT_TYPE, shoal_core::telemetry::CONTENT_TYPE)], shoal_core::telemetry::metrics().encode())
}

/// 200 while this coordinator serves (its Raft loop runs and it knows a leader), else 503.
async fn ready() -> (axum::http::StatusCode, &'static str) {
    if shoal_core::telemetry::ready() {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Starts serving on `listen` (with the dashboard's pages on a coordinator); returns the
/// bound address and the server's task (abort it to stop).
/// Serves /metrics (and the dashboard) on `listen`; `advertise` is the address others are
/// told (written to `addr_file`), required when `listen` is a wildcard address.
pub async fn start(
    listen: &str,
    advertise: Option<&str>,
    addr_file: Option<&Path>,
    dashboard: Option<super::dashboard::Dashboard>,
    security: Option<Security>,
) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = super::serve::bind_retrying(listen).await.with_context(|| format!("--http-listen {listen}"))?;
    let addr = super::serve::advertised(listener.local_addr()?, advertise, "--http-listen", "--http-advertise")?;
    if let Some(f) = addr_file {
        shoal_core::fsutil::write_atomic(f, addr.as_bytes()).with_context(|| format!("writing {}", f.display()))?;
    }
    let coordinator = dashboard.is_some();
    let mut app = axum::Router::new().route("/metrics", get(metrics));
    if let Some(d) = dashboard {
        app = app.merge(super::dashboard::routes(d));
    }
    let tls = match &security {
        Some(s) => {
            let tokens = Arc::new(Tokens { endpoints: s.endpoints.clone(), tls: s.tls.clone(), good: Mutex::default() });
            app = app.layer(axum::middleware::from_fn_with_state(tokens, require_token));
            Some(server_config(s)?)
        }
        None => None,
    };
    if coordinator {
        // Open, as the gRPC health service is: Kubernetes' readiness probe (its gRPC probes
        // cannot speak TLS; its HTTPS probes do not check certificates or send tokens).
        app = app.route("/ready", get(ready));
    }
    let task = match tls {
        Some(config) => {
            let listener = TlsListener::new(listener, config)?;
            tracing::info!(%addr, "serving /metrics over HTTPS, with tokens");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(error = %e, "the HTTPS listener stopped");
                }
            })
        }
        None => {
            tracing::info!(%addr, "serving /metrics over plaintext HTTP, without tokens");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(error = %e, "the HTTP listener stopped");
                }
            })
        }
    };
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn a_token_comes_from_the_header_the_cookie_or_once_the_query() {
        assert_eq!(presented(&req("/", &[("authorization", "Bearer abc")])).as_deref(), Some("abc"));
        assert_eq!(presented(&req("/", &[("cookie", "x=1; shoal_token=def")])).as_deref(), Some("def"));
        assert_eq!(presented(&req("/", &[])), None);
        assert_eq!(presented(&req("/", &[("authorization", "Basic abc")])), None);
        assert_eq!(query_token(&req("/compare?jobs=1,2&token=t", &[])), Some(("t".to_string(), "jobs=1,2".to_string())));
        assert_eq!(query_token(&req("/jobs?token=t", &[])), Some(("t".to_string(), String::new())));
        assert_eq!(query_token(&req("/jobs?x=1", &[])), None);
    }
}
