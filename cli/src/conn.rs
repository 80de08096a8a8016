//! Where the cluster is and how to reach it: `--endpoints` or the folder `shoal up` used,
//! and the token and certificate a command's calls carry.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use shoal_cluster::Layout;
use shoal_coordinator::Client;

/// Where the cluster is: `--endpoints` (coordinator addresses) or the folder `shoal up` used.
#[derive(Args, Clone)]
pub struct Conn {
    /// Cluster folder (as given to `shoal up`).
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<PathBuf>,
    /// Coordinator addresses, comma-separated (host:port); overrides --dir.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
}

pub fn default_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".shoal")
}

impl Conn {
    pub fn client(&self) -> Result<Client> {
        let layout = Layout::new(self.dir.clone().unwrap_or_else(default_dir));
        let endpoints = if self.endpoints.is_empty() { layout.endpoints()? } else { self.endpoints.clone() };
        Ok(Client::new(&endpoints)?.with_token(token(&layout)?.as_deref())?.with_tls(client_tls(&layout)?)?)
    }

    /// The certificate this command's calls show (None: plaintext).
    pub fn tls(&self) -> Result<Option<shoal_coordinator::tls::TlsFiles>> {
        client_tls(&Layout::new(self.dir.clone().unwrap_or_else(default_dir)))
    }
}

/// The certificate calls show: `SHOAL_CLIENT_CREDENTIALS` (a folder from `shoal ca issue
/// --client`), else the cluster folder's admin certificate; none: plaintext.
fn client_tls(layout: &Layout) -> Result<Option<shoal_coordinator::tls::TlsFiles>> {
    match std::env::var_os("SHOAL_CLIENT_CREDENTIALS") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            shoal_coordinator::tls::TlsFiles::load(&dir, "client")
                .map_err(anyhow::Error::msg)?
                .map(Some)
                .with_context(|| format!("SHOAL_CLIENT_CREDENTIALS: {} holds no client certificate (`shoal ca issue --client NAME`)", dir.display()))
        }
        _ => Ok(layout.authority().admin_tls()?),
    }
}

/// The token calls carry: `SHOAL_TOKEN`, else the admin token of the cluster folder.
fn token(layout: &Layout) -> Result<Option<String>> {
    match std::env::var("SHOAL_TOKEN") {
        Ok(t) if !t.trim().is_empty() => {
            shoal_core::auth::Token::parse(&t).context("SHOAL_TOKEN")?;
            Ok(Some(t.trim().to_string()))
        }
        _ => Ok(layout.authority().admin_token()),
    }
}
