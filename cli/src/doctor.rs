//! `shoal doctor security`: what a cluster exposes, read from its coordinators (listeners,
//! TLS, token checks, tokens without expiry) and from its folder on this machine (secret files
//! others may read).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Result;
use serde_json::json;
use shoal_proto::ListTokensRequest;

use crate::{print_json, Conn};

struct Finding {
    /// `high` (exit 1), `warn` or `ok`.
    level: &'static str,
    what: String,
}

fn loopback(address: &str) -> bool {
    let host = address.trim_start_matches("http://").trim_start_matches("https://");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h).trim_matches(['[', ']']);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Files under `dir` (not following links, at most `depth` folders down) that others may
/// read or folders others may enter, where secrets live.
fn loose_files(dir: &Path, depth: usize, out: &mut Vec<Finding>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let (Ok(t), Ok(meta)) = (e.file_type(), e.metadata()) else { continue };
        let path = e.path();
        let mode = meta.permissions().mode() & 0o777;
        let name = e.file_name().to_string_lossy().into_owned();
        if t.is_dir() {
            if mode & 0o077 != 0 {
                out.push(Finding { level: "warn", what: format!("{} (a folder of secrets) is open to others (mode {mode:o}): chmod 700", path.display()) });
            }
            if depth > 0 {
                loose_files(&path, depth - 1, out);
            }
        } else if t.is_file() {
            let secret = name.ends_with(".key") || name.ends_with(".token") || name == "bootstrap.pb";
            if secret && mode & 0o077 != 0 {
                out.push(Finding { level: "high", what: format!("{} (a secret) may be read by others (mode {mode:o}): chmod 600", path.display()) });
            } else if mode & 0o004 != 0 && !name.ends_with(".crt") {
                out.push(Finding { level: "warn", what: format!("{} is world-readable (mode {mode:o})", path.display()) });
            }
        }
    }
}

/// Certificates within this many days of their end are named.
const EXPIRY_WARN_DAYS: i64 = 30;

/// What a certificate ending at `not_after` (seconds since the epoch) is worth saying at `now`.
fn expiry(path: &Path, not_after: i64, now: i64) -> Option<Finding> {
    let days = (not_after - now) / 86_400;
    let renew = "`shoal ca issue` a new one over its folder (servers take it without a restart)";
    if not_after <= now {
        Some(Finding { level: "high", what: format!("{} expired {} days ago: {renew}", path.display(), (now - not_after) / 86_400) })
    } else if days < EXPIRY_WARN_DAYS {
        Some(Finding { level: "warn", what: format!("{} expires in {days} days: {renew}", path.display()) })
    } else {
        None
    }
}

/// The certificates (`*.crt`) under `dir`, at most `depth` folders down: expired or ending
/// soon; returns how many it checked.
fn certificates(dir: &Path, depth: usize, now: i64, out: &mut Vec<Finding>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut checked = 0;
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let path = e.path();
        if t.is_dir() && depth > 0 {
            checked += certificates(&path, depth - 1, now, out);
        } else if t.is_file() && path.extension().is_some_and(|x| x == "crt") {
            checked += 1;
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|pem| shoal_coordinator::tls::not_after(&pem)) {
                Ok(end) => out.extend(expiry(&path, end, now)),
                Err(e) => out.push(Finding { level: "warn", what: format!("{}: not a certificate ({e})", path.display()) }),
            }
        }
    }
    checked
}

/// Whether the data plane at `addr` completes a TLS handshake with `tls` (Some(true)), takes a
/// plaintext connection (Some(false)), or neither (None).
async fn data_plane_speaks_tls(addr: &str, tls: Option<&shoal_coordinator::tls::TlsFiles>) -> Option<bool> {
    let connects = |tls: Option<&shoal_coordinator::tls::TlsFiles>| {
        let ep = shoal_coordinator::tls::endpoint(addr, tls).ok().map(|e| e.with(|ep| ep.connect_timeout(std::time::Duration::from_secs(2))));
        async move {
            match ep {
                Some(ep) => tokio::time::timeout(std::time::Duration::from_secs(3), ep.connect()).await.is_ok_and(|c| c.is_ok()),
                None => false,
            }
        }
    };
    if tls.is_some() && connects(tls).await {
        return Some(true);
    }
    if connects(None).await {
        return Some(false);
    }
    None
}

/// What `GET /metrics` without a token gets at `addr`: over TLS checked against the CA in
/// `tls` (true), else over plaintext (false), with the status; None when neither answers.
async fn http_answer(addr: &str, tls: Option<&shoal_coordinator::tls::TlsFiles>) -> Option<(bool, u16)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, addr: &str) -> Option<u16> {
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.ok()?;
        let text = String::from_utf8_lossy(&head[..n]).into_owned();
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
    let timeout = std::time::Duration::from_secs(3);
    if let Some(t) = tls {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&t.ca).flatten() {
            let _ = roots.add(c);
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from(shoal_coordinator::tls::SERVER_NAME).ok()?;
        let answered = tokio::time::timeout(timeout, async {
            let sock = tokio::net::TcpStream::connect(addr).await.ok()?;
            let s = connector.connect(name, sock).await.ok()?;
            ask(s, addr).await
        })
        .await;
        if let Ok(Some(status)) = answered {
            return Some((true, status));
        }
    }
    let answered = tokio::time::timeout(timeout, async { ask(tokio::net::TcpStream::connect(addr).await.ok()?, addr).await }).await;
    answered.ok().flatten().map(|status| (false, status))
}

pub async fn security(conn: Conn, json: bool) -> Result<()> {
    let mut found = Vec::new();
    let (coords, workers) = crate::cluster_status(&conn).await?;
    for c in &coords {
        let addr = c["address"].as_str().unwrap_or("").to_string();
        if c["reachable"] != true {
            found.push(Finding { level: "warn", what: format!("coordinator at {addr} did not answer: {}", c["error"].as_str().unwrap_or("")) });
            continue;
        }
        let id = &c["id"];
        let exposed = if loopback(&addr) { "on loopback" } else { "reachable from the network" };
        if c["tls"] != true {
            found.push(Finding { level: "high", what: format!("coordinator {id} at {addr} ({exposed}) serves plaintext: calls and their tokens can be read on the way (start it with --credentials)") });
        }
        if c["auth"] != "tokens" {
            found.push(Finding { level: "high", what: format!("coordinator {id} at {addr} ({exposed}) checks no tokens (--insecure): anyone who reaches it may call everything, exec batch jobs included") });
        }
        if c["tls"] == true && c["auth"] == "tokens" {
            found.push(Finding { level: "ok", what: format!("coordinator {id} at {addr} ({exposed}): mutual TLS, tokens on every call") });
        }
    }
    // Each worker's data plane, as a peer sees it: a TLS handshake with this command's
    // certificate, else a plaintext HTTP/2 connection.
    let tls = conn.tls()?;
    for w in &workers {
        let addr = w["address"].as_str().unwrap_or("");
        let (id, exposed) = (w["id"].as_str().unwrap_or(""), if loopback(addr) { "on loopback" } else { "reachable from the network" });
        match data_plane_speaks_tls(addr, tls.as_ref()).await {
            Some(true) => found.push(Finding { level: "ok", what: format!("worker {id} data plane at {addr} ({exposed}): mutual TLS, ranks prove their generation") }),
            Some(false) => found.push(Finding {
                level: if loopback(addr) { "warn" } else { "high" },
                what: format!("worker {id} data plane at {addr} ({exposed}): plaintext and unauthenticated (start the worker with --credentials)"),
            }),
            None => found.push(Finding { level: "warn", what: format!("worker {id} data plane at {addr} did not answer") }),
        }
    }
    // HTTP listeners (/metrics, the dashboard) of a local cluster's processes.
    let dir = conn.dir.clone().unwrap_or_else(crate::conn::default_dir);
    for kind in ["coordinators", "workers"] {
        for e in std::fs::read_dir(dir.join(kind)).into_iter().flatten().flatten() {
            if let Ok(addr) = std::fs::read_to_string(e.path().join("http.addr")) {
                let addr = addr.trim();
                let what = format!("{kind}/{} serves /metrics{}", e.file_name().to_string_lossy(), if kind == "coordinators" { " and the dashboard" } else { "" });
                match http_answer(addr, tls.as_ref()).await {
                    Some((true, 401)) => found.push(Finding { level: "ok", what: format!("{what} over HTTPS at {addr}, a token required") }),
                    Some((true, status)) => found.push(Finding { level: "high", what: format!("{what} over HTTPS at {addr}, and answered {status} without a token") }),
                    Some((false, _)) => {
                        let level = if loopback(addr) { "warn" } else { "high" };
                        found.push(Finding { level, what: format!("{what} over plaintext HTTP without a token at {addr} (start it with --credentials)") });
                    }
                    None => {}
                }
            }
        }
    }
    // Tokens that never expire (reading them takes an admin token).
    let client = conn.client()?;
    match client.call(|mut c| async move { c.list_tokens(ListTokensRequest {}).await }).await {
        Ok(r) => {
            for t in r.tokens.iter().filter(|t| t.revoked_ms == 0 && t.expires_ms == 0) {
                found.push(Finding { level: "warn", what: format!("token {} ({}, {:?}) never expires: `shoal token create --ttl` a replacement and revoke it", t.id, t.role, t.name) });
            }
        }
        Err(e) => found.push(Finding { level: "warn", what: format!("tokens not checked: {e}") }),
    }
    // Secret files and certificates of this machine's cluster folder and client credentials.
    loose_files(&dir.join("ca"), 0, &mut found);
    loose_files(&dir.join("credentials"), 1, &mut found);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let before = found.len();
    let mut checked = certificates(&dir.join("ca"), 0, now, &mut found) + certificates(&dir.join("credentials"), 1, now, &mut found);
    if let Some(creds) = std::env::var_os("SHOAL_CLIENT_CREDENTIALS").filter(|v| !v.is_empty()) {
        loose_files(Path::new(&creds), 0, &mut found);
        checked += certificates(Path::new(&creds), 0, now, &mut found);
    }
    if checked > 0 && found.len() == before {
        found.push(Finding { level: "ok", what: format!("{checked} certificates, none within {EXPIRY_WARN_DAYS} days of its end") });
    }
    let high = found.iter().filter(|f| f.level == "high").count();
    if json {
        print_json(&json!({"ok": high == 0, "findings": found.iter().map(|f| json!({"level": f.level, "what": f.what})).collect::<Vec<_>>()}));
    } else {
        for f in &found {
            println!("{:<5} {}", f.level, f.what);
        }
    }
    if high > 0 {
        anyhow::bail!("{high} finding(s) that expose the cluster");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn certificates_are_named_when_expired_or_ending_soon() {
        let p = std::path::Path::new("x.crt");
        let day = 86_400;
        let now = 1_800_000_000;
        assert!(super::expiry(p, now + 31 * day, now).is_none());
        let soon = super::expiry(p, now + 29 * day + 5, now).unwrap();
        assert_eq!((soon.level, soon.what.contains("expires in 29 days")), ("warn", true), "{}", soon.what);
        let gone = super::expiry(p, now - 2 * day - 5, now).unwrap();
        assert_eq!((gone.level, gone.what.contains("expired 2 days ago")), ("high", true), "{}", gone.what);
        assert_eq!(super::expiry(p, now, now).unwrap().level, "high");
    }

    #[test]
    fn loopback_addresses_are_told_apart() {
        for a in ["127.0.0.1:7400", "localhost:1", "[::1]:9", "http://127.0.0.1:5"] {
            assert!(super::loopback(a), "{a}");
        }
        for a in ["10.0.0.1:7400", "0.0.0.0:1", "shoal-coordinator-0.shoal-coordinator:7400", "[2001:db8::1]:9"] {
            assert!(!super::loopback(a), "{a}");
        }
    }
}
