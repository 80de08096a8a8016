//! Mutual TLS between every client and a coordinator, and between coordinators: certificates
//! from the cluster's CA (`shoal ca`), files in a process's credentials folder.
//!
//! Every server certificate names `shoal` (`SERVER_NAME`), and clients check against that name
//! rather than the address they dial: what proves a server is its CA's signature, and the CA
//! is the cluster's own.

use std::path::Path;

use tonic::transport::{Channel, Endpoint};

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
    /// The folder and name they were read from (`load`): a server reads its certificate
    /// again from there when the files change.
    pub source: Option<(std::path::PathBuf, String)>,
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
        Ok(Some(TlsFiles {
            ca: read(&ca)?,
            cert: read(&cert)?,
            key: shoal_core::auth::read_secret_file(&key).map_err(|e| e.to_string())?,
            source: Some((dir.to_path_buf(), name.to_string())),
        }))
    }

    /// A gRPC client's TLS: the server checked against the CA (and `SERVER_NAME`), this
    /// process's certificate shown, read again from its files when they change.
    pub fn client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots()?)
            .with_client_cert_resolver(self.cert_source()?);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    /// The cluster CA as a trust root.
    pub fn roots(&self) -> Result<std::sync::Arc<rustls::RootCertStore>, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&self.ca) {
            roots.add(c.map_err(|e| format!("the CA certificate: {e}"))?).map_err(|e| format!("the CA certificate: {e}"))?;
        }
        Ok(std::sync::Arc::new(roots))
    }
}

/// When the first certificate of `pem` stops being valid, in seconds since the epoch.
pub fn not_after(pem: &[u8]) -> Result<i64, String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem).next().ok_or("no certificate")?.map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    Ok(cert.validity().not_after.timestamp())
}

/// How a client reaches `addr` (`host:port` or a URL): with `tls`, over our own TLS dialer.
pub fn endpoint(addr: &str, tls: Option<&TlsFiles>) -> Result<Dial, String> {
    let hostport = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    // The scheme stays `http` with TLS too: tonic's own TLS layer is not used (it would refuse
    // an `https` URL without its configuration), the dialer below does the handshake.
    let url = format!("http://{hostport}");
    let ep = Endpoint::from_shared(url.clone()).map_err(|e| format!("bad endpoint {url:?}: {e}"))?;
    let tls = match tls {
        Some(t) => Some(Dialer { config: t.client_config().map_err(|e| format!("TLS for {hostport}: {e}"))? }),
        None => None,
    };
    Ok(Dial { ep, tls })
}

/// A server to call: tonic's endpoint (timeouts, windows) and, with credentials, the dialer
/// that makes its connections. tonic's TLS takes a fixed identity; this one shows the
/// certificate on file at each handshake, so a client certificate rotates as a server's does.
#[derive(Clone, Debug)]
pub struct Dial {
    ep: Endpoint,
    tls: Option<Dialer>,
}

impl Dial {
    /// The endpoint's settings, changed by `f`.
    pub fn with(self, f: impl FnOnce(Endpoint) -> Endpoint) -> Dial {
        Dial { ep: f(self.ep), tls: self.tls }
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            Some(d) => self.ep.connect_with_connector(d.clone()).await,
            None => self.ep.connect().await,
        }
    }

    /// A channel that connects at its first call (and again after a lost connection).
    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            Some(d) => self.ep.connect_with_connector_lazy(d.clone()),
            None => self.ep.connect_lazy(),
        }
    }
}

/// TCP (no delay: calls are small and latency-bound), then a TLS handshake that checks the
/// server against the cluster CA and `SERVER_NAME`.
#[derive(Clone)]
pub struct Dialer {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer(..)")
    }
}

impl tower::Service<tonic::codegen::http::Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri} names no host and port"));
            // An IPv6 host comes bracketed in a URI.
            let host = uri.host().ok_or_else(bad)?.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().ok_or_else(bad)?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a DNS name");
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
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
    let cert_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_pem = shoal_core::auth::read_secret_file(key).map_err(|e| e.to_string())?;
    certified_key_from(&cert_pem, &key_pem).map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))
}

fn certified_key_from(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::sign::CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("the certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("the key: {e}"))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).map_err(|e| format!("the key: {e}"))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| format!("the certificate and key do not match: {e}"))?;
    Ok(ck)
}

/// The certificate a process shows, as a server and as a client: read again from its folder
/// when its files change (files from `load`), else fixed.
#[derive(Debug)]
pub enum CertSource {
    Reloading(ReloadingCert),
    Fixed(std::sync::Arc<rustls::sign::CertifiedKey>),
}

impl CertSource {
    pub fn current(&self) -> std::sync::Arc<rustls::sign::CertifiedKey> {
        match self {
            CertSource::Reloading(r) => r.current(),
            CertSource::Fixed(k) => k.clone(),
        }
    }
}

impl rustls::server::ResolvesServerCert for CertSource {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertSource {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[rustls::SignatureScheme]) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl TlsFiles {
    /// This process's certificate (see `CertSource`), for a server's or a client's config.
    pub fn cert_source(&self) -> Result<std::sync::Arc<CertSource>, String> {
        Ok(std::sync::Arc::new(match &self.source {
            Some((dir, name)) => CertSource::Reloading(ReloadingCert::new(dir, name)?),
            None => CertSource::Fixed(std::sync::Arc::new(certified_key_from(&self.cert, &self.key)?)),
        }))
    }

    /// A coordinator's listener: its certificate (rotating with its files), a client's checked
    /// against the CA when shown; a client without one still reaches the handshake's end
    /// (Kubernetes' gRPC probes have none), and the guard refuses it every method but health.
    pub fn grpc_server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        self.server_config(true)
    }

    /// A worker's gRPC data plane: only a process of the cluster (a certificate from its CA)
    /// gets a connection through.
    pub fn data_plane_server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        self.server_config(false)
    }

    fn server_config(&self, client_certificate_optional: bool) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone());
        if client_certificate_optional {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier.build().map_err(|e| format!("the client verifier: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.cert_source()?);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    }
}

/// What the guard learns of a TLS connection: the client's certificates (the handshake checked
/// them against the CA), if it showed any.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<std::net::SocketAddr>,
    pub certs: Option<std::sync::Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
}

/// A server-side TLS connection as tonic serves it.
pub struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let (sock, conn) = self.0.get_ref();
        PeerInfo { remote: sock.peer_addr().ok(), certs: conn.peer_certificates().map(|c| std::sync::Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())) }
    }
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn poll_write_vectored(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Handshakes in progress at once on a listener, and how long one may take.
const MAX_HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS connections accepted on `listener`, each handshake on a task of its own (bounded), so a
/// silent client delays no one: the stream tonic's `serve_with_incoming` takes.
pub fn tls_incoming(listener: tokio::net::TcpListener, config: std::sync::Arc<rustls::ServerConfig>) -> tokio_stream::wrappers::ReceiverStream<Result<TlsIo, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (sock, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
                // The server stopped taking connections.
                _ = tx.closed() => return,
            };
            let _ = sock.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(TlsIo(s))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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



#[cfg(test)]
mod tests {
    use super::*;

    fn ca_params() -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        p
    }

    /// A certificate from the CA for `SERVER_NAME`, usable on both sides: (PEM, key PEM).
    fn issue(ca_key: &rcgen::KeyPair, name: &str) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &rcgen::Issuer::new(ca_params(), ca_key)).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }

    #[tokio::test]
    async fn a_client_shows_the_certificate_on_file_at_each_handshake() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params().self_signed(&ca_key).unwrap().pem();
        let (server_cert, server_key) = issue(&ca_key, "server");
        let server = TlsFiles { ca: ca.clone().into_bytes(), cert: server_cert.into_bytes(), key: server_key.into_bytes(), source: None };
        let acceptor = tokio_rustls::TlsAcceptor::from(server.data_plane_server_config().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The server answers each connection with nothing; it reports the certificate it saw.
        let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let tls = acceptor.accept(sock).await.unwrap();
                let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                seen_tx.send(cert).await.unwrap();
            }
        });

        let dir = tempfile::tempdir().unwrap();
        let write = |(cert, key): &(String, String)| {
            std::fs::write(dir.path().join(CA_CERT_FILE), &ca).unwrap();
            std::fs::write(dir.path().join("worker.crt"), cert).unwrap();
            std::fs::write(dir.path().join("worker.key"), key).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path().join("worker.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        };
        let (first, second) = (issue(&ca_key, "worker one"), issue(&ca_key, "worker two"));
        write(&first);
        let files = TlsFiles::load(dir.path(), "worker").unwrap().unwrap();
        let mut dialer = Dialer { config: files.client_config().unwrap() };
        let uri: tonic::codegen::http::Uri = format!("http://{addr}").parse().unwrap();
        let _kept = tower::Service::call(&mut dialer, uri.clone()).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), der(&first.0));

        // Rotated on disk (a second later: file times and the reload check are that coarse):
        // the same dialer shows the new certificate at its next handshake.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        write(&second);
        let _again = tower::Service::call(&mut dialer, uri.clone()).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), der(&second.0));

        // A pair that does not load (the key of another certificate) leaves the one in use.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        write(&(second.0.clone(), first.1.clone()));
        let _third = tower::Service::call(&mut dialer, uri).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), der(&second.0));
    }
}
