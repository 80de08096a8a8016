//! A cluster's credentials: what `shoal ca init` makes once in the admin's folder, and what
//! `shoal ca issue` hands each process. `shoal up` does both for a local cluster.
//!
//! The admin's folder (`ca/` under a local cluster's folder) holds:
//! - `token.key`: the cluster's token key (coordinators hash and check tokens with it);
//! - `bootstrap.pb`: the tokens the cluster starts with (ids, roles, keyed hashes);
//! - `admin.token`, `worker.token`: those tokens themselves;
//! - `ca.crt`, `ca.key`: the cluster's CA, which signs every process's certificate;
//! - `admin.crt`, `admin.key`: the admin's client certificate (what the CLI shows).
//!
//! A coordinator's folder holds `ca.crt`, `node.crt`, `node.key` (its server and client
//! certificate), `token.key` and `bootstrap.pb`; a worker's `ca.crt`, `worker.crt`,
//! `worker.key` and `worker.token`; a client's `ca.crt`, `client.crt`, `client.key`.
//!
//! Every file is written owner-only (0600) and refused when others may read it.

use std::path::{Path, PathBuf};

use shoal_core::auth::{read_secret_file, read_secret_text, write_secret_file, Role, Token, TokenKey};
use shoal_coordinator::server::{BOOTSTRAP_FILE, TOKEN_KEY_FILE};
use shoal_proto::{Message, TokenBootstrap, TokenRecord};

use crate::ClusterError;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const WORKER_TOKEN_FILE: &str = "worker.token";
const CA_KEY_FILE: &str = "ca.key";

/// The CA's parameters: the same every time, so a certificate issued later (from `ca.key`)
/// names the issuer exactly as the CA certificate names itself.
fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("no names to check");
    p.distinguished_name.push(rcgen::DnType::CommonName, "shoal cluster CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
    p
}

/// How long the certificates made here are valid: a process's or person's a year by default
/// (`ca issue --days`; servers take a new one without a restart), the CA's ten years.
pub const LEAF_DAYS: u32 = 365;
pub const CA_DAYS: u32 = 3650;

/// From an hour ago (the machines of a cluster disagree a little on the time) for `days`.
fn valid_for(p: &mut rcgen::CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days.into());
}

fn tls_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Io(format!("certificate: {e}"))
}

/// A certificate for `common_name`, signed by the CA key: a server's and client's both (every
/// process dials as well as listens), naming `shoal` (what clients check), localhost and
/// `hosts` (names or IP addresses), for tools that check the address they dial.
fn leaf(ca_key: &rcgen::KeyPair, common_name: &str, hosts: &[String], days: u32) -> Result<(String, String), ClusterError> {
    let mut names = vec![shoal_coordinator::tls::SERVER_NAME.to_string(), "localhost".to_string()];
    names.extend(hosts.iter().filter(|h| h.parse::<std::net::IpAddr>().is_err()).cloned());
    let mut p = rcgen::CertificateParams::new(names).map_err(tls_err)?;
    p.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)));
    for ip in hosts.iter().filter_map(|h| h.parse::<std::net::IpAddr>().ok()) {
        p.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    p.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    valid_for(&mut p, days);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().map_err(tls_err)?;
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn io(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Io(e.to_string())
}

/// Creates a folder of secrets that only its owner may enter (0700).
fn private_dir(dir: &Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| io(format!("{}: {e}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(format!("{}: {e}", dir.display())))
}

/// The admin's folder of a cluster's credentials.
#[derive(Clone, Debug)]
pub struct Authority {
    pub dir: PathBuf,
    /// How long the certificates it issues are valid.
    pub days: u32,
}

impl Authority {
    pub fn new(dir: impl Into<PathBuf>) -> Authority {
        Authority { dir: dir.into(), days: LEAF_DAYS }
    }

    pub fn exists(&self) -> bool {
        self.dir.join(TOKEN_KEY_FILE).exists()
    }

    /// Makes the token key and the first admin and worker tokens. Refuses a folder that has
    /// them already (a second key would lock every existing token out). Returns the admin
    /// token, which the caller shows once.
    pub fn init(&self) -> Result<Token, ClusterError> {
        if self.exists() {
            return Err(ClusterError::Startup(format!("{} holds a cluster's credentials already", self.dir.display())));
        }
        private_dir(&self.dir)?;
        let key = TokenKey::generate();
        let (admin, worker) = (Token::generate(), Token::generate());
        let record = |t: &Token, role: Role, name: &str| TokenRecord { id: t.id.clone(), role: role.as_str().into(), name: name.into(), hash: key.hash(&t.secret).to_vec(), ..Default::default() };
        let bootstrap = TokenBootstrap { tokens: vec![record(&admin, Role::Admin, "admin"), record(&worker, Role::Worker, "workers")] };
        // The key last: its presence says the folder is whole.
        write_secret_file(&self.dir.join(BOOTSTRAP_FILE), &bootstrap.encode_to_vec()).map_err(io)?;
        write_secret_file(&self.dir.join(ADMIN_TOKEN_FILE), format!("{admin}\n").as_bytes()).map_err(io)?;
        write_secret_file(&self.dir.join(WORKER_TOKEN_FILE), format!("{worker}\n").as_bytes()).map_err(io)?;
        let ca_key = rcgen::KeyPair::generate().map_err(tls_err)?;
        let mut params = ca_params();
        valid_for(&mut params, CA_DAYS);
        let ca_cert = params.self_signed(&ca_key).map_err(tls_err)?;
        write_secret_file(&self.dir.join(CA_KEY_FILE), ca_key.serialize_pem().as_bytes()).map_err(io)?;
        std::fs::write(self.dir.join(shoal_coordinator::tls::CA_CERT_FILE), ca_cert.pem()).map_err(io)?;
        self.write_leaf(&self.dir, "admin", "client-admin", &[])?;
        write_secret_file(&self.dir.join(TOKEN_KEY_FILE), key.to_file_text().as_bytes()).map_err(io)?;
        Ok(admin)
    }

    fn copy(&self, name: &str, out: &Path) -> Result<(), ClusterError> {
        let bytes = read_secret_file(&self.dir.join(name)).map_err(io)?;
        write_secret_file(&out.join(name), &bytes).map_err(io)
    }

    /// Writes `OUT/FILE.crt` and `OUT/FILE.key` for `common_name`, and the CA's certificate.
    fn write_leaf(&self, out: &Path, file: &str, common_name: &str, hosts: &[String]) -> Result<(), ClusterError> {
        let ca_key = rcgen::KeyPair::from_pem(&read_secret_text(&self.dir.join(CA_KEY_FILE)).map_err(io)?).map_err(tls_err)?;
        let (cert, key) = leaf(&ca_key, common_name, hosts, self.days)?;
        write_secret_file(&out.join(format!("{file}.key")), key.as_bytes()).map_err(io)?;
        std::fs::write(out.join(format!("{file}.crt")), cert).map_err(io)?;
        if out != self.dir {
            std::fs::copy(self.dir.join(shoal_coordinator::tls::CA_CERT_FILE), out.join(shoal_coordinator::tls::CA_CERT_FILE)).map_err(io)?;
        }
        Ok(())
    }

    /// A coordinator's credentials folder (`serve coordinator --credentials OUT`): its
    /// certificate (for `hosts` besides localhost), the token key and the first tokens.
    pub fn issue_node(&self, out: &Path, id: u64, hosts: &[String]) -> Result<(), ClusterError> {
        private_dir(out)?;
        self.write_leaf(out, "node", &format!("node-{id}"), hosts)?;
        self.copy(TOKEN_KEY_FILE, out)?;
        self.copy(BOOTSTRAP_FILE, out)
    }

    /// A worker's credentials folder (`serve worker --credentials OUT`).
    pub fn issue_worker(&self, out: &Path, hosts: &[String]) -> Result<(), ClusterError> {
        private_dir(out)?;
        self.write_leaf(out, "worker", "worker", hosts)?;
        self.copy(WORKER_TOKEN_FILE, out)
    }

    /// A person's or a program's client certificate (`SHOAL_CLIENT_CREDENTIALS=OUT`; its
    /// token comes from `shoal token create`).
    pub fn issue_client(&self, out: &Path, name: &str) -> Result<(), ClusterError> {
        private_dir(out)?;
        self.write_leaf(out, "client", &format!("client-{name}"), &[])
    }

    /// The admin's TLS files (the CLI's, on a folder `shoal up` made).
    pub fn admin_tls(&self) -> Result<Option<shoal_coordinator::tls::TlsFiles>, ClusterError> {
        shoal_coordinator::tls::TlsFiles::load(&self.dir, "admin").map_err(ClusterError::Io)
    }

    /// The admin token, if this folder has one.
    pub fn admin_token(&self) -> Option<String> {
        read_token(&self.dir.join(ADMIN_TOKEN_FILE))
    }
}

/// A token file's token: owner-only, and a token.
pub fn load_token(path: &Path) -> Result<String, ClusterError> {
    let text = read_secret_text(path).map_err(io)?;
    Token::parse(&text).map(|t| t.to_string()).map_err(|e| io(format!("{}: {e}", path.display())))
}

/// `load_token`, None for a missing or bad file.
pub fn read_token(path: &Path) -> Option<String> {
    load_token(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_once_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new(dir.path().join("ca"));
        let admin = ca.init().unwrap();
        assert_eq!(ca.admin_token().unwrap(), admin.to_string());
        assert!(ca.init().unwrap_err().to_string().contains("already"), "a second init would change the key");
        let node = dir.path().join("node");
        ca.issue_node(&node, 3, &["10.0.0.5".into(), "coordinator-3.shoal".into()]).unwrap();
        assert!(shoal_coordinator::tls::TlsFiles::load(&node, "node").unwrap().is_some());
        assert!(ca.admin_tls().unwrap().is_some());
        use std::os::unix::fs::PermissionsExt;
        for d in [&ca.dir, &node] {
            assert_eq!(std::fs::metadata(d).unwrap().permissions().mode() & 0o777, 0o700, "{}", d.display());
        }
        let auth = shoal_coordinator::server::AuthConfig::load(&node).unwrap();
        assert_eq!(auth.bootstrap.len(), 2);
        let who = shoal_coordinator::state::StateMachine::authenticate(&auth.bootstrap, &auth.key, &admin, 0).unwrap();
        assert_eq!(who.role, Role::Admin);
        let worker = dir.path().join("worker");
        ca.issue_worker(&worker, &[]).unwrap();
        let w = Token::parse(&read_token(&worker.join(WORKER_TOKEN_FILE)).unwrap()).unwrap();
        assert_eq!(shoal_coordinator::state::StateMachine::authenticate(&auth.bootstrap, &auth.key, &w, 0).unwrap().role, Role::Worker);
        assert!(!worker.join(TOKEN_KEY_FILE).exists(), "a worker never holds the token key");
        // Validity: a year for what it issues (or --days), ten years for the CA.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let days = |p: &Path| (shoal_coordinator::tls::not_after(&std::fs::read(p).unwrap()).unwrap() - now) as f64 / 86_400.0;
        assert!((364.9..=365.0).contains(&days(&node.join("node.crt"))), "{}", days(&node.join("node.crt")));
        assert!((3649.9..=3650.0).contains(&days(&ca.dir.join("ca.crt"))));
        let brief = dir.path().join("brief");
        Authority { days: 2, ..ca.clone() }.issue_client(&brief, "b").unwrap();
        assert!((1.9..=2.0).contains(&days(&brief.join("client.crt"))));
    }
}
