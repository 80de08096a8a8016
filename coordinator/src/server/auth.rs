//! The guard in front of every gRPC method: a tower layer (it sees the method's path, which an
//! interceptor does not) that checks the caller's token and the method table
//! (`shoal_core::auth::METHODS`), and hands the handlers a `Caller`.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use shoal_core::auth::{access, is_peer_token, Access, Caller, Role, Token, TokenKey};
use shoal_proto::{AuditContext, Message as _, TokenBootstrap, TokenRecord};

use super::*;

/// A coordinator's credentials: the cluster's token key and the tokens it starts with.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub key: TokenKey,
    /// The cluster's first tokens (admin and workers'): checked against until the state holds
    /// them, and proposed once by the first leader.
    pub bootstrap: Vec<TokenRecord>,
}

/// The files of a coordinator's credentials folder.
pub const TOKEN_KEY_FILE: &str = "token.key";
pub const BOOTSTRAP_FILE: &str = "bootstrap.pb";

impl AuthConfig {
    /// Reads `DIR/token.key` (owner-only) and `DIR/bootstrap.pb` (if there).
    pub fn load(dir: &Path) -> Result<AuthConfig, CoordError> {
        let key = TokenKey::load(&dir.join(TOKEN_KEY_FILE)).map_err(|e| CoordError::Config(format!("credentials: {e}")))?;
        let path = dir.join(BOOTSTRAP_FILE);
        let bootstrap = match std::fs::read(&path) {
            Ok(bytes) => TokenBootstrap::decode(&bytes[..]).map_err(|e| CoordError::Config(format!("{}: not a token bootstrap file: {e}", path.display())))?.tokens,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(CoordError::Io(format!("{}: {e}", path.display()))),
        };
        Ok(AuthConfig { key, bootstrap })
    }
}

fn unauthenticated(msg: impl Into<String>) -> Status {
    final_status(tonic::Code::Unauthenticated, msg)
}

/// Who is calling `path` with `header` (the `authorization` value), or why not.
fn check<B>(shared: &Shared, req: &http::Request<B>) -> Result<Option<Caller>, Status> {
    let path = req.uri().path();
    let header = req.headers().get(http::header::AUTHORIZATION);
    let Some(auth) = &shared.cfg.auth else { return Ok(Some(Caller::insecure())) };
    let roles = match access(path) {
        None => return Err(final_status(tonic::Code::PermissionDenied, format!("{path} is not a method anyone may call"))),
        Some(Access::Open) => return Ok(None),
        Some(Access::Roles(roles)) => roles,
    };
    // With TLS, a client must show a certificate of the cluster's CA (the handshake checked
    // any it showed; it lets one without through for the health probes only).
    if shared.cfg.tls.is_some() {
        let certified = req.extensions().get::<crate::tls::PeerInfo>().and_then(|i| i.certs.as_ref()).is_some_and(|c| !c.is_empty());
        if !certified {
            return Err(unauthenticated("this cluster takes calls only from clients with a certificate of its CA (`shoal ca issue`)"));
        }
    }
    let method = path.rsplit('/').next().unwrap_or(path);
    let Some(token) = header.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(unauthenticated(format!("{method} needs a token (set SHOAL_TOKEN, or use the cluster folder that `shoal up` wrote)")));
    };
    let caller = if is_peer_token(token) {
        let node = auth.key.check_peer(token).ok_or_else(|| unauthenticated("not a peer token of this cluster"))?;
        // With TLS, the certificate names the node too (`shoal ca issue --node ID`): a peer
        // token on another process's certificate is refused.
        if shared.cfg.tls.is_some() {
            let named = peer_common_name(req);
            if named.as_deref() != Some(format!("node-{node}").as_str()) {
                return Err(final_status(tonic::Code::PermissionDenied, format!("node {node}'s peer token on a certificate of {}", named.as_deref().unwrap_or("no name"))));
            }
        }
        Caller { id: format!("node-{node}"), role: Role::Peer, exec: false, node: Some(node) }
    } else {
        let token = Token::parse(token).map_err(|e| unauthenticated(e.to_string()))?;
        let state = shared.state.read().expect("state lock");
        let checked = if state.tokens_bootstrapped() {
            StateMachine::authenticate(state.tokens(), &auth.key, &token, unix_ms())
        } else {
            StateMachine::authenticate(&auth.bootstrap, &auth.key, &token, unix_ms())
        };
        checked.map_err(unauthenticated)?
    };
    if !roles.contains(&caller.role) {
        return Err(final_status(tonic::Code::PermissionDenied, format!("a {} token may not call {method}", caller.role)));
    }
    Ok(Some(caller))
}

/// The common name of the client's certificate (the handshake checked it against the CA).
fn peer_common_name<B>(req: &http::Request<B>) -> Option<String> {
    let certs = req.extensions().get::<crate::tls::PeerInfo>()?.certs.clone()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}

/// The caller the guard let through (every handler runs behind it).
pub(super) fn caller<T>(shared: &Shared, r: &Request<T>) -> Result<Caller, Status> {
    match (r.extensions().get::<Caller>(), &shared.cfg.auth) {
        (Some(c), _) => Ok(c.clone()),
        (None, None) => Ok(Caller::insecure()),
        (None, Some(_)) => Err(Status::internal("a call reached its handler without its caller")),
    }
}

#[derive(Clone)]
pub(super) struct Guard(pub(super) Arc<Shared>);

impl<S> tower::Layer<S> for Guard {
    type Service = Guarded<S>;
    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded { inner, shared: self.0.clone() }
    }
}

#[derive(Clone)]
pub(super) struct Guarded<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> tower::Service<http::Request<B>> for Guarded<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The service that was polled ready takes the call; its clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        match check(&self.shared, &req) {
            Ok(caller) => {
                let who = caller.as_ref().map(|c| AuditContext {
                    actor: c.id.clone(),
                    role: c.role.to_string(),
                    method: req.uri().path().rsplit('/').next().unwrap_or_default().to_string(),
                });
                if let Some(c) = caller {
                    req.extensions_mut().insert(c);
                }
                // The handler's proposals name the caller in the audit trail.
                match who {
                    Some(who) => Box::pin(CALL.scope(who, inner.call(req))),
                    None => Box::pin(inner.call(req)),
                }
            }
            Err(mut status) => {
                self.shared.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Says the guard refused it, not the method (which has refusals of its own).
                status.metadata_mut().insert("shoal-guard", "refused".parse().expect("ascii"));
                tracing::debug!(path = req.uri().path(), code = ?status.code(), reason = status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

tokio::task_local! {
    /// The call a handler runs for: who asked, for the audit trail.
    static CALL: AuditContext;
}

/// The caller of the call this task serves (None outside a call: a leader's own duty).
pub(super) fn call_context() -> Option<AuditContext> {
    CALL.try_with(Clone::clone).ok()
}

/// Whether a job spec is an exec batch job (it runs a command on every worker).
pub(super) fn spec_runs_commands(text: &str) -> bool {
    matches!(shoal_core::batch::is_batch(text), Ok(true)) && shoal_core::batch::BatchSpec::parse(text).is_ok_and(|s| s.operator.kind == "exec")
}

/// Whether a pipeline has an exec batch step.
pub(super) fn pipeline_runs_commands(text: &str) -> bool {
    shoal_core::pipeline::PipelineSpec::parse(text).is_ok_and(|p| p.steps.iter().any(|s| s.runs_commands()))
}

/// Commands on every worker are remote code execution for whoever may submit them: an admin,
/// or a token with the exec grant.
pub(super) fn check_exec(caller: &Caller, runs_commands: bool) -> Result<(), Status> {
    if runs_commands && !caller.exec {
        return Err(final_status(
            tonic::Code::PermissionDenied,
            format!("exec batch jobs run commands on every worker: they need an admin token or one with the exec grant (this is {}'s {} token)", caller.id, caller.role),
        ));
    }
    Ok(())
}

fn info(t: &TokenRecord) -> shoal_proto::TokenInfo {
    shoal_proto::TokenInfo {
        id: t.id.clone(),
        role: t.role.clone(),
        name: t.name.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        revoked_ms: t.revoked_ms,
        grants: t.grants.clone(),
    }
}

impl Api {
    fn token_key(&self) -> Result<&TokenKey, Status> {
        match &self.0.cfg.auth {
            Some(a) => Ok(&a.key),
            None => Err(final_status(tonic::Code::FailedPrecondition, "this coordinator runs without credentials (--insecure): it checks no tokens")),
        }
    }

    pub(super) async fn create_token_rpc(&self, r: shoal_proto::CreateTokenRequest) -> Result<Response<shoal_proto::TokenInfo>, Status> {
        let key = self.token_key()?;
        // The id, role and grants are checked where the record is applied.
        if r.secret.len() != 32 {
            return Err(final_status(tonic::Code::InvalidArgument, format!("a token's secret is 32 bytes, not {}", r.secret.len())));
        }
        let record = TokenRecord {
            id: r.id,
            role: r.role,
            name: r.name,
            hash: key.hash(&r.secret).to_vec(),
            ttl_ms: r.ttl_s.saturating_mul(1000),
            grants: r.grants,
            ..Default::default()
        };
        match self.propose(command::Kind::CreateToken(record), r.request_id).await? {
            ApplyOutput::Token(t) => Ok(Response::new(info(&t))),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }

    pub(super) async fn list_tokens_rpc(&self) -> Result<Response<shoal_proto::ListTokensResponse>, Status> {
        self.token_key()?;
        self.linearize().await?;
        let tokens = self.0.state.read().expect("state lock").tokens().map(info).collect();
        Ok(Response::new(shoal_proto::ListTokensResponse { tokens }))
    }

    pub(super) async fn revoke_token_rpc(&self, r: shoal_proto::RevokeTokenRequest) -> Result<Response<shoal_proto::TokenInfo>, Status> {
        self.token_key()?;
        match self.propose(command::Kind::RevokeToken(r.id), r.request_id).await? {
            ApplyOutput::Token(t) => Ok(Response::new(info(&t))),
            other => Err(Status::internal(format!("unexpected apply output {other:?}"))),
        }
    }
}
