//! The HTTP side of `shoal serve`: `/metrics` (Prometheus) on `--http-listen`, beside the
//! gRPC port, and on a coordinator the dashboard (`dashboard`). Loopback by default, on a port the system picks; the bound address goes to the
//! log and, with `--http-addr-file`, to a file (`shoal up` reads it to print the addresses).

use std::path::Path;

use anyhow::{Context, Result};
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;

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
pub async fn start(listen: &str, advertise: Option<&str>, addr_file: Option<&Path>, dashboard: Option<super::dashboard::Dashboard>) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = super::serve::bind_retrying(listen).await.with_context(|| format!("--http-listen {listen}"))?;
    let addr = super::serve::advertised(listener.local_addr()?, advertise, "--http-listen", "--http-advertise")?;
    if let Some(f) = addr_file {
        shoal_core::fsutil::write_atomic(f, addr.as_bytes()).with_context(|| format!("writing {}", f.display()))?;
    }
    let mut app = axum::Router::new().route("/metrics", get(metrics));
    if let Some(d) = dashboard {
        // Open, as the gRPC health service is: Kubernetes' readiness probe (its gRPC probes
        // cannot speak TLS).
        app = app.route("/ready", get(ready)).merge(super::dashboard::routes(d));
    }
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the HTTP listener stopped");
        }
    });
    tracing::info!(%addr, "serving /metrics over HTTP");
    Ok((addr, task))
}
