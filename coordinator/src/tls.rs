//! Mutual TLS between every client and a coordinator, and between coordinators: certificates
//! from the cluster's CA (`shoal ca`), files in a process's credentials folder.
//!
//! Every server certificate names `shoal` (`SERVER_NAME`), and clients check against that name
//! rather than the address they dial: what proves a server is its CA's signature, and the CA
//! is the cluster's own.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The DNS name in every server certificate of a cluster.
pub const SERVER_NAME: &str = "shoal";
pub const CA_CERT_FILE: &str = "ca.crt";

/// A process's TLS material: the cluster CA's certificate, and its own certificate and key
/// (PEM).
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles(..)")
    }
}

impl TlsFiles {
    /// `DIR/ca.crt`, `DIR/NAME.crt` and `DIR/NAME.key` (owner-only); None when the folder
    /// holds none of them, an error when it holds some.
    pub fn load(dir: &Path, name: &str) -> Result<Option<TlsFiles>, String> {
        let (ca, cert, key) = (dir.join(CA_CERT_FILE), dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        let present = [&ca, &cert, &key].iter().filter(|p| p.exists()).count();
        if present == 0 {
            return Ok(None);
        }
        if present < 3 {
            return Err(format!("{}: needs {CA_CERT_FILE}, {name}.crt and {name}.key together (`shoal ca issue`)", dir.display()));
        }
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        Ok(Some(TlsFiles { ca: read(&ca)?, cert: read(&cert)?, key: shoal_core::auth::read_secret_file(&key).map_err(|e| e.to_string())? }))
    }

    /// A server that presents its certificate and checks a client's against the CA. A client
    /// without one still reaches the handshake's end (Kubernetes' gRPC probes have none): the
    /// guard then refuses every method but the health service.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }

    /// A worker's data-plane server: only a process of the cluster (a certificate from its
    /// CA) gets a connection through.
    pub fn data_plane_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key)).client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// A client that checks the server against the CA and shows its own certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(SERVER_NAME)
    }
}

/// An endpoint for `addr` (`host:port` or a URL): `https` with `tls`, else `http`.
pub fn endpoint(addr: &str, tls: Option<&TlsFiles>) -> Result<Endpoint, String> {
    let hostport = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let url = format!("{}://{hostport}", if tls.is_some() { "https" } else { "http" });
    let ep = Endpoint::from_shared(url.clone()).map_err(|e| format!("bad endpoint {url:?}: {e}"))?;
    match tls {
        Some(t) => ep.tls_config(t.client()).map_err(|e| format!("TLS for {url}: {e}")),
        None => Ok(ep),
    }
}

/// A server certificate read from its files and read again when they change (checked at most
/// once a second, at a handshake): `shoal ca issue` over a running process's folder rotates
/// it without a restart. A pair that does not load (a half-written rotation, say) leaves the
/// one in use, with a warning.
pub struct ReloadingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::RwLock<Loaded>,
}

struct Loaded {
    stamp: (Option<std::time::SystemTime>, Option<std::time::SystemTime>),
    checked: std::time::Instant,
    key: std::sync::Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReloadingCert({})", self.cert.display())
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn certified_key(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(&shoal_core::auth::read_secret_file(key).map_err(|e| e.to_string())?).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| format!("{} and {} do not match: {e}", cert.display(), key.display()))?;
    Ok(ck)
}

impl ReloadingCert {
    /// `DIR/NAME.crt` and `DIR/NAME.key`, loaded now (an error if they do not load).
    pub fn new(dir: &Path, name: &str) -> Result<ReloadingCert, String> {
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        let loaded = certified_key(&cert, &key)?;
        let stamp = (modified(&cert), modified(&key));
        Ok(ReloadingCert { current: std::sync::RwLock::new(Loaded { stamp, checked: std::time::Instant::now(), key: std::sync::Arc::new(loaded) }), cert, key })
    }

    /// The certificate in use, read again first if its files changed.
    pub fn current(&self) -> std::sync::Arc<rustls::sign::CertifiedKey> {
        {
            let now = self.current.read().expect("certificate lock");
            if now.checked.elapsed() < std::time::Duration::from_secs(1) {
                return now.key.clone();
            }
        }
        let mut now = self.current.write().expect("certificate lock");
        now.checked = std::time::Instant::now();
        let stamp = (modified(&self.cert), modified(&self.key));
        if stamp != now.stamp {
            match certified_key(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "certificate changed on disk; serving the new one");
                    now.key = std::sync::Arc::new(k);
                    now.stamp = stamp;
                }
                Err(e) => tracing::warn!(error = %e, "a changed certificate does not load; keeping the one in use"),
            }
        }
        now.key.clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}
