//! The HTTP side of `shoal serve`: `/metrics` (Prometheus) on `--http-listen`, beside the
//! gRPC port. Loopback by default, on a port the system picks; the bound address goes to the
//! log and, with `--http-addr-file`, to a file (`shoal up` reads it to print the addresses).

use std::path::Path;

use anyhow::{Context, Result};
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;

async fn metrics() -> impl axum::response::IntoResponse {
    ([(CONTENT_TYPE, shoal_core::telemetry::CONTENT_TYPE)], shoal_core::telemetry::metrics().encode())
}

/// Starts serving on `listen`; returns the bound address and the server's task (abort it
/// to stop).
pub async fn start(listen: &str, addr_file: Option<&Path>) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = super::bind_retrying(listen).await.with_context(|| format!("--http-listen {listen}"))?;
    let addr = listener.local_addr()?.to_string();
    if let Some(f) = addr_file {
        shoal_core::fsutil::write_atomic(f, addr.as_bytes()).with_context(|| format!("writing {}", f.display()))?;
    }
    let app = axum::Router::new().route("/metrics", get(metrics));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the HTTP listener stopped");
        }
    });
    tracing::info!(%addr, "serving /metrics over HTTP");
    Ok((addr, task))
}
