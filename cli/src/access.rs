//! `shoal token` (create, list, revoke access tokens) and `shoal ca` (a cluster's credentials:
//! `init` once in the admin's folder, `issue` a folder for each coordinator and worker).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use shoal_cluster::credentials::Authority;
use shoal_core::auth::{Role, Token, GRANTS};
use shoal_proto::{AuditEntry, CreateTokenRequest, ListAuditRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo, VerifyAuditRequest};

use crate::{print_json, Conn};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it (once: the cluster keeps only its hash).
    Create {
        /// admin, operator (jobs, data, pipelines), viewer (read only) or worker.
        #[arg(long)]
        role: String,
        /// Who or what it is for (shown by `token list`).
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime: a number with s, m, h or d (30d); default: no expiry.
        #[arg(long)]
        ttl: Option<String>,
        /// An extra right: `exec` (exec batch jobs, which run commands on every worker, without
        /// being admin).
        #[arg(long)]
        grant: Vec<String>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Every token: id, role, name, created, expiry, revoked (never a secret).
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: refused from the next commit on, on every coordinator.
    Revoke {
        id: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Make a cluster's credentials once, in the admin's folder: the token key and the first
    /// admin and worker tokens (files mode 0600). Prints the admin token.
    Init {
        /// The admin's folder (kept private; `shoal up` uses DIR/ca).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write a process's credentials folder from the admin's: `--node ID` for a coordinator
    /// (`serve coordinator --credentials OUT`), `--worker` for a worker, `--client NAME` for a
    /// person or program (`SHOAL_CLIENT_CREDENTIALS=OUT`, with a token from `token create`).
    Issue {
        /// The admin's folder (as given to `ca init`).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, conflicts_with_all = ["worker", "client"], required_unless_present_any = ["worker", "client"])]
        node: Option<u64>,
        #[arg(long, conflicts_with = "client")]
        worker: bool,
        #[arg(long)]
        client: Option<String>,
        /// Host names or IP addresses the certificate also names (clients of shoal check the
        /// name `shoal`; other tools check the address they dial).
        #[arg(long, value_delimiter = ',')]
        host: Vec<String>,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid, in days (issue a new one over the folder before
        /// then: servers take it without a restart).
        #[arg(long, default_value_t = shoal_cluster::credentials::LEAF_DAYS)]
        days: u32,
    },
}

/// `30d`, `12h`, `90m`, `3600s` (or plain seconds) in seconds.
pub fn parse_ttl(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().with_context(|| format!("--ttl {s:?}: expected a number with s, m, h or d (such as 30d)"))?;
    let mul = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        other => bail!("--ttl {s:?}: unknown unit {other:?} (expected s, m, h or d)"),
    };
    match n.checked_mul(mul) {
        Some(0) => bail!("--ttl must be more than 0"),
        Some(v) => Ok(v),
        None => bail!("--ttl {s:?} is too long"),
    }
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Audited mutations, oldest first: time, who (token id and role, or the cluster), the
    /// method, what and the outcome.
    List {
        /// Only entries from this time on: RFC 3339 (2026-12-06T10:00:00Z) or an age (30m, 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Re-hashes the whole retained trail (the segments in the store and the entries not yet
    /// sealed) against the heads the replicated state keeps: exits 1 and names each entry
    /// modified or removed.
    Verify {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

/// `--since`: an RFC 3339 time, or an age back from now.
fn parse_since(s: &str) -> Result<u64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis().max(0) as u64);
    }
    let age = parse_ttl(s).with_context(|| format!("--since {s:?}: expected an RFC 3339 time (2026-12-06T10:00:00Z) or an age (30m, 2h, 7d)"))?;
    Ok((chrono::Utc::now().timestamp_millis().max(0) as u64).saturating_sub(age * 1000))
}

fn audit_json(e: &AuditEntry) -> serde_json::Value {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    json!({"seq": e.seq, "unix_ms": e.unix_ms, "index": e.index, "actor": e.actor, "role": e.role, "method": e.method,
        "request_id": e.request_id, "what": e.what, "outcome": e.outcome, "prev": hex(&e.prev), "hash": hex(&e.hash)})
}

pub async fn audit(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::List { since, limit, conn, json } => {
            let since_unix_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
            let client = conn.client()?;
            let req = ListAuditRequest { since_unix_ms, limit: limit.max(1) };
            let r = client.call(|mut c| async move { c.list_audit(req).await }).await?;
            if json {
                print_json(&json!({"entries": r.entries.iter().map(audit_json).collect::<Vec<_>>(), "truncated": r.truncated, "retained_from": r.retained_from}));
            } else {
                println!("{:>6}  {:<20}  {:<16}  {:<8}  {:<18}  {:<40}  outcome", "seq", "time", "who", "role", "method", "what");
                for e in &r.entries {
                    println!("{:>6}  {:<20}  {:<16}  {:<8}  {:<18}  {:<40}  {}", e.seq, when(e.unix_ms), e.actor, e.role, e.method, e.what, e.outcome);
                }
                if r.truncated {
                    eprintln!("(more entries: raise --limit or narrow --since)");
                }
            }
        }
        AuditCmd::Verify { conn, json } => {
            let client = conn.client()?;
            let r = client.call(|mut c| async move { c.verify_audit(VerifyAuditRequest {}).await }).await?;
            if json {
                print_json(&json!({"ok": r.ok, "entries": r.entries, "segments": r.segments, "problems": r.problems, "retained_from": r.retained_from}));
            } else if r.ok {
                println!("the audit trail is whole: {} entries (from {}) in {} segments and the state, chained to the state's head", r.entries, r.retained_from, r.segments);
            } else {
                for p in &r.problems {
                    println!("{p}");
                }
            }
            if !r.ok {
                bail!("the audit trail is broken: {} problem(s)", r.problems.len());
            }
        }
    }
    Ok(())
}

fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms as i64).map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string()).unwrap_or_else(|| ms.to_string())
}

fn token_json(t: &TokenInfo) -> serde_json::Value {
    json!({"id": t.id, "role": t.role, "name": t.name, "created_ms": t.created_ms, "expires_ms": t.expires_ms, "revoked_ms": t.revoked_ms, "grants": t.grants})
}

pub async fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { role, name, ttl, grant, conn, json } => {
            Role::parse(&role)?;
            if let Some(g) = grant.iter().find(|g| !GRANTS.contains(&g.as_str())) {
                bail!("unknown grant {g:?} (expected {})", GRANTS.join(", "));
            }
            let ttl_s = ttl.as_deref().map(parse_ttl).transpose()?.unwrap_or(0);
            let client = conn.client()?;
            // Chosen here, so a retry of the same request is the same token.
            let token = Token::generate();
            let req = CreateTokenRequest { request_id: shoal_coordinator::client::new_request_id(), id: token.id.clone(), secret: token.secret.to_vec(), role, name, ttl_s, grants: grant };
            let info = client.call(|mut c| { let req = req.clone(); async move { c.create_token(req).await } }).await?;
            if json {
                let mut v = token_json(&info);
                v["token"] = json!(token.to_string());
                print_json(&v);
            } else {
                eprintln!("token {} ({}{}), shown once:", info.id, info.role, if info.expires_ms != 0 { format!(", expires {}", when(info.expires_ms)) } else { String::new() });
                println!("{token}");
            }
        }
        TokenCmd::List { conn, json } => {
            let client = conn.client()?;
            let r = client.call(|mut c| async move { c.list_tokens(ListTokensRequest {}).await }).await?;
            if json {
                print_json(&json!({"tokens": r.tokens.iter().map(token_json).collect::<Vec<_>>()}));
            } else {
                println!("{:<16}  {:<8}  {:<20}  {:<20}  {:<20}  {:<20}  grants", "id", "role", "name", "created", "expires", "revoked");
                for t in &r.tokens {
                    println!("{:<16}  {:<8}  {:<20}  {:<20}  {:<20}  {:<20}  {}", t.id, t.role, t.name, when(t.created_ms), when(t.expires_ms), when(t.revoked_ms), t.grants.join(","));
                }
            }
        }
        TokenCmd::Revoke { id, conn, json } => {
            if !Token::valid_id(&id) {
                bail!("{id:?} is not a token id (16 hex digits, as `shoal token list` shows)");
            }
            let client = conn.client()?;
            let req = RevokeTokenRequest { request_id: shoal_coordinator::client::new_request_id(), id };
            let info = client.call(|mut c| { let req = req.clone(); async move { c.revoke_token(req).await } }).await?;
            if json {
                print_json(&token_json(&info));
            } else {
                println!("token {} ({}) revoked", info.id, info.role);
            }
        }
    }
    Ok(())
}

pub fn ca(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            let admin = Authority::new(&dir).init()?;
            eprintln!("credentials made in {} (keep it private); the admin token, shown once:", dir.display());
            println!("{admin}");
        }
        CaCmd::Issue { dir, node, worker, client, host, out, days } => {
            if !(1..=36_500).contains(&days) {
                bail!("--days {days}: between 1 and 36500");
            }
            let ca = Authority { days, ..Authority::new(&dir) };
            if !ca.exists() {
                bail!("{} holds no credentials; make them with `shoal ca init --dir {}`", dir.display(), dir.display());
            }
            match (node, worker, client) {
                (Some(0), _, _) => bail!("--node: coordinator ids start at 1"),
                (Some(id), _, _) => ca.issue_node(&out, id, &host)?,
                (None, true, _) => ca.issue_worker(&out, &host)?,
                (None, false, Some(name)) if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => ca.issue_client(&out, &name)?,
                (None, false, Some(name)) => bail!("--client {name:?}: a name of letters, digits, '-', '_' and '.'"),
                (None, false, None) => bail!("give --node ID, --worker or --client NAME"),
            }
            println!("credentials written to {}", out.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttls_parse_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_ttl("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_ttl("12h").unwrap(), 43_200);
        assert_eq!(parse_ttl("90m").unwrap(), 5_400);
        assert_eq!(parse_ttl("45").unwrap(), 45);
        for bad in ["", "0d", "d", "5w", "-1h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
