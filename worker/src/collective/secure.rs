//! The data plane with credentials: the TCP ring over mutual TLS (rustls on the ring's
//! blocking sockets), the gRPC ring over tonic's, and a generation's membership proven with
//! its ring key.
//!
//! A certificate proves "a process of this cluster"; it does not say which job a worker runs
//! (workers' ids are given at registration, after their certificates are made). What binds a
//! connection to one job generation is the ring key: the coordinator derives it from its token
//! key for (job, generation) and hands it only to that generation's workers with their
//! assignments. A dialing rank proves it knows the key with a MAC over the connection's TLS
//! exporter and its hello, so the proof cannot be replayed on another connection; gRPC chunks
//! carry a MAC of the key over their sender and place in the ring.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use shoal_coordinator::tls::{TlsFiles, SERVER_NAME};

use crate::WorkerError;

/// What a rank proves membership with: `None` without credentials.
pub type RingKey = [u8; 32];

/// The exporter label both ends of a ring connection derive the hello's binding from.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-ring-hello";

/// A worker's TLS configurations for its data plane: the ring listener's (a client certificate
/// from the cluster's CA required) and the dialer's.
pub struct DataPlaneTls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    pub files: TlsFiles,
}

impl std::fmt::Debug for DataPlaneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataPlaneTls(..)")
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Io(format!("data-plane TLS: {what}: {e}"))
}

impl DataPlaneTls {
    pub fn new(files: &TlsFiles) -> Result<DataPlaneTls, WorkerError> {
        // One suite, whose records `Sealed` protects after the handshake: AES-128-GCM, a
        // third faster than AES-256 where the ring's cores are also training.
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let roots = files.roots().map_err(|e| tls_err("the CA certificate", e))?;
        // This worker's certificate, on both sides of its connections, read again from its
        // files when they change: a rotated certificate serves (and dials) the next ring.
        let certificate = files.cert_source().map_err(|e| tls_err("the certificate", e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| tls_err("the client verifier", e))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS 1.3", e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(certificate.clone());
        // A ring connection carries data one way: tickets the dialer never reads would only
        // sit in its socket.
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS 1.3", e))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(certificate);
        let mut client = client;
        client.enable_secret_extraction = true;
        Ok(DataPlaneTls { server: Arc::new(server), client: Arc::new(client), files: files.clone() })
    }

    /// Completes the server side of a handshake on `sock` by `deadline`.
    pub(crate) fn accept(&self, mut sock: TcpStream, deadline: Instant) -> Result<Link, String> {
        let mut conn = ServerConnection::new(self.server.clone()).map_err(|e| e.to_string())?;
        handshake(&mut conn, &mut sock, deadline)?;
        Ok(Link::Server(Box::new(StreamOwned::new(conn, sock))))
    }

    /// Completes the client side of a handshake on `sock` by `deadline`.
    pub(crate) fn connect(&self, mut sock: TcpStream, deadline: Instant) -> Result<Link, String> {
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
        let mut conn = ClientConnection::new(self.client.clone(), name).map_err(|e| e.to_string())?;
        handshake(&mut conn, &mut sock, deadline)?;
        Ok(Link::Client(Box::new(StreamOwned::new(conn, sock))))
    }
}

/// Drives a handshake to its end; `sock` has a read timeout, so this comes back to the
/// deadline however silent the peer.
fn handshake<S: rustls::SideData>(conn: &mut rustls::ConnectionCommon<S>, sock: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the TLS handshake did not finish in time".into());
        }
        sock.set_read_timeout(Some(left.min(std::time::Duration::from_millis(200)))).map_err(|e| e.to_string())?;
        sock.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
        match conn.complete_io(sock) {
            Ok((0, 0)) if conn.is_handshaking() => return Err("closed during the TLS handshake".into()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(format!("TLS handshake: {e}")),
        }
    }
    Ok(())
}

/// One ring connection: plain TCP, TLS through rustls (the handshake and the greeting), or
/// TLS records this side seals and opens (`Sealed`, for the data).
pub(crate) enum Link {
    Plain(TcpStream),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    Sealed(Box<Sealed>),
}

impl Link {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Client(s) => &s.sock,
            Link::Server(s) => &s.sock,
            Link::Sealed(s) => &s.sock,
        }
    }

    /// The TLS exporter both ends derive for the hello's proof (None: plain TCP, or sealed).
    pub(crate) fn binding(&self) -> Option<[u8; 32]> {
        let out = [0u8; 32];
        match self {
            Link::Plain(_) | Link::Sealed(_) => None,
            Link::Client(s) => s.conn.export_keying_material(out, EXPORTER_LABEL, None).ok(),
            Link::Server(s) => s.conn.export_keying_material(out, EXPORTER_LABEL, None).ok(),
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        !matches!(self, Link::Plain(_))
    }

    /// Takes the traffic keys out of rustls once the greeting is through (nothing may be
    /// buffered on either side: the greeting and its acknowledgement are each the last thing
    /// sent before the switch), and protects the records from here on itself.
    pub(crate) fn seal(self) -> Result<Link, String> {
        let (secrets, sock) = match self {
            Link::Client(s) => {
                let StreamOwned { conn, sock } = *s;
                (conn.dangerous_extract_secrets(), sock)
            }
            Link::Server(s) => {
                let StreamOwned { conn, sock } = *s;
                (conn.dangerous_extract_secrets(), sock)
            }
            other => return Ok(other),
        };
        let secrets = secrets.map_err(|e| format!("taking the traffic keys: {e}"))?;
        Ok(Link::Sealed(Box::new(Sealed::new(sock, secrets)?)))
    }
}

impl Link {
    /// `Read::read` of at most `want` bytes into `buf`, whose bytes past `want` the link may
    /// use as scratch (see `Sealed::read_spare`).
    pub(crate) fn read_spare(&mut self, buf: &mut [u8], want: usize) -> std::io::Result<usize> {
        let want = want.min(buf.len());
        match self {
            Link::Sealed(s) => s.read_spare(buf, want),
            other => other.read(&mut buf[..want]),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Client(s) => s.read(buf),
            Link::Server(s) => s.read(buf),
            Link::Sealed(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Client(s) => s.write(buf),
            Link::Server(s) => s.write(buf),
            Link::Sealed(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Client(s) => s.flush(),
            Link::Server(s) => s.flush(),
            Link::Sealed(s) => s.flush(),
        }
    }
}

/// TLS 1.3 application-data records (AES-128-GCM) sealed and opened here, with the traffic
/// keys rustls's handshake agreed (as kTLS takes them): a received record is opened in place
/// in one large buffer and handed out from there, where going through rustls's buffers copies
/// it three times (measured: 64 MB all-reduce, 2 ranks). Both ends move to a key derived from
/// the last every `REKEY_EVERY` records, well inside AES-GCM's limit per key; the peer is
/// always shoal, so no KeyUpdate message is needed.
pub(crate) struct Sealed<S = TcpStream> {
    sock: S,
    tx: Direction,
    rx: Direction,
    /// Sealed records: `sent..filled` not yet written (room for one write's records).
    out: Box<[u8]>,
    filled: usize,
    sent: usize,
    /// Received bytes: `start..end` not yet opened; `plain` an opened record's plaintext not
    /// yet handed out.
    inb: Box<[u8]>,
    start: usize,
    end: usize,
    plain: (usize, usize),
}

const RECORD: usize = 16 << 10;
const HEADER: usize = 5;
const TAG: usize = 16;
const APPLICATION_DATA: u8 = 23;
const REKEY_EVERY: u64 = 1 << 22;
const IN_BUFFER: usize = 256 << 10;
/// Plaintext sealed per write call: the records' bytes are still in L2 when written, and a
/// 1 MB chunk takes 4 system calls, not 16. Measured with the ring's long-lived sender
/// (2 MB all-reduce over TLS, 2 ranks on 2 cores, 3 rounds): 64 KiB 1.27 to 1.58 ms, 256 KiB
/// 0.91 to 1.0, 1 MiB 0.98 to 1.32.
const OUT_BATCH: usize = 16 * RECORD;

struct Direction {
    key: aws_lc_rs::aead::LessSafeKey,
    raw: [u8; 16],
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, rustls::ConnectionTrafficSecrets)) -> Result<Direction, String> {
        let rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets else {
            return Err("the handshake agreed on a suite other than AES-128-GCM".into());
        };
        let raw: [u8; 16] = key.as_ref().try_into().map_err(|_| "an AES-128 key of another length")?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| "an IV of another length")?;
        Ok(Direction::from_key(raw, iv, seq))
    }

    fn from_key(raw: [u8; 16], iv: [u8; 12], seq: u64) -> Direction {
        Direction { key: Direction::key(&raw), raw, iv, seq }
    }

    fn key(raw: &[u8; 16]) -> aws_lc_rs::aead::LessSafeKey {
        aws_lc_rs::aead::LessSafeKey::new(aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_128_GCM, raw).expect("a 16-byte key"))
    }

    /// TLS 1.3's per-record nonce: the IV with the sequence number xored into its end.
    fn nonce(&self) -> aws_lc_rs::aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        aws_lc_rs::aead::Nonce::assume_unique_for_key(n)
    }

    fn advance(&mut self) {
        self.seq += 1;
        if self.seq.is_multiple_of(REKEY_EVERY) {
            self.raw = blake3::derive_key("shoal ring record key update v1", &self.raw)[..16].try_into().expect("16 bytes");
            self.key = Direction::key(&self.raw);
        }
    }
}

fn bad_record(what: &str) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, format!("TLS record: {what}"))
}

impl Sealed {
    fn new(sock: TcpStream, secrets: rustls::ExtractedSecrets) -> Result<Sealed, String> {
        Ok(Sealed::with(sock, Direction::new(secrets.tx)?, Direction::new(secrets.rx)?))
    }
}

impl<S: Read + Write> Sealed<S> {
    fn with(sock: S, tx: Direction, rx: Direction) -> Sealed<S> {
        Sealed {
            sock,
            tx,
            rx,
            out: vec![0u8; OUT_BATCH.div_ceil(RECORD) * (HEADER + RECORD + 1 + TAG)].into_boxed_slice(),
            filled: 0,
            sent: 0,
            inb: vec![0u8; IN_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            plain: (0, 0),
        }
    }

    /// Appends `plain` (at most a record) to `out` as one sealed record, encrypted straight
    /// from the caller's bytes: no copy of the plaintext first.
    fn seal(&mut self, plain: &[u8]) -> std::io::Result<()> {
        let len = plain.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let record = &mut self.out[self.filled..self.filled + HEADER + len];
        record[..HEADER].copy_from_slice(&header);
        let (cipher, type_and_tag) = record[HEADER..].split_at_mut(plain.len());
        let nonce = self.tx.nonce();
        self.tx
            .key
            .seal_out_of_place_scatter(nonce, aws_lc_rs::aead::Aad::from(header), plain, cipher, &[APPLICATION_DATA], type_and_tag)
            .map_err(|_| std::io::Error::other("sealing a TLS record"))?;
        self.filled += HEADER + len;
        self.tx.advance();
        Ok(())
    }

    /// Writes what is sealed; an error (a timeout included) leaves the rest for the next call.
    fn push_out(&mut self) -> std::io::Result<()> {
        while self.sent < self.filled {
            match self.sock.write(&self.out[self.sent..self.filled]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) => return Err(e),
            }
        }
        self.filled = 0;
        self.sent = 0;
        Ok(())
    }

    /// Makes sure a whole record is in the buffer (reading as much as it takes when it is
    /// not), and returns its header and length. None at the end of the stream.
    fn next_record(&mut self) -> std::io::Result<Option<([u8; HEADER], usize)>> {
        loop {
            let avail = self.end - self.start;
            if avail >= HEADER {
                let header: [u8; HEADER] = self.inb[self.start..self.start + HEADER].try_into().expect("5 bytes");
                let len = u16::from_be_bytes([header[3], header[4]]) as usize;
                if header[0] == 21 {
                    return Err(std::io::Error::new(ErrorKind::ConnectionAborted, "the peer sent a TLS alert"));
                }
                if header[0] != APPLICATION_DATA || header[1..3] != [3, 3] || !(1 + TAG..=RECORD + 256).contains(&len) {
                    return Err(bad_record(&format!("header {header:?}")));
                }
                if avail >= HEADER + len {
                    return Ok(Some((header, len)));
                }
            }
            // Room for a whole record behind what is here.
            if self.inb.len() - self.end < HEADER + RECORD + 256 {
                self.inb.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.sock.read(&mut self.inb[self.end..])?;
            if n == 0 {
                return if avail == 0 { Ok(None) } else { Err(ErrorKind::UnexpectedEof.into()) };
            }
            self.end += n;
        }
    }
}

/// Where an opened record's content type is (after any zero padding), checked to be data.
fn content_end(opened: &[u8]) -> std::io::Result<usize> {
    let Some(typ) = opened.iter().rposition(|&b| b != 0) else { return Err(bad_record("no content type")) };
    if opened[typ] != APPLICATION_DATA {
        return Err(bad_record(&format!("content type {} after the handshake", opened[typ])));
    }
    Ok(typ)
}

fn unopened() -> std::io::Error {
    bad_record("does not open with the connection's key (altered, or out of order)")
}

impl<S: Read + Write> Read for Sealed<S> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = out.len();
        self.read_spare(out, want)
    }
}

impl<S: Read + Write> Sealed<S> {
    /// Reads at most `want` bytes into `out`, which may be longer: the bytes past `want` are
    /// scratch. A record whose content fits `want` opens straight into `out` when `out` also
    /// has room for its content type byte; a caller reading pieces of a multiple of the
    /// record size gives one spare byte so that no record is opened aside and copied.
    fn read_spare(&mut self, out: &mut [u8], want: usize) -> std::io::Result<usize> {
        let want = want.min(out.len());
        if want == 0 {
            return Ok(0);
        }
        while self.plain.0 == self.plain.1 {
            let Some((header, len)) = self.next_record()? else { return Ok(0) };
            let body = self.start + HEADER;
            let nonce = self.rx.nonce();
            let aad = aws_lc_rs::aead::Aad::from(header);
            if out.len() >= len - TAG && len - TAG - 1 <= want {
                // Straight into the caller's buffer: no copy (a read may write past what it
                // returns; here, the content type byte).
                let (cipher, tag) = self.inb[body..body + len].split_at(len - TAG);
                self.rx.key.open_separate_gather(nonce, aad, cipher, tag, &mut out[..len - TAG]).map_err(|_| unopened())?;
                self.start = body + len;
                self.rx.advance();
                let n = content_end(&out[..len - TAG])?;
                if n > 0 {
                    return Ok(n);
                }
            } else {
                let opened = self.rx.key.open_in_place(nonce, aad, &mut self.inb[body..body + len]).map_err(|_| unopened())?;
                let n = content_end(opened)?;
                self.plain = (body, body + n);
                self.start = body + len;
                self.rx.advance();
            }
        }
        let n = want.min(self.plain.1 - self.plain.0);
        out[..n].copy_from_slice(&self.inb[self.plain.0..self.plain.0 + n]);
        self.plain.0 += n;
        Ok(n)
    }
}

impl<S: Read + Write> Write for Sealed<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // What an earlier call sealed goes first.
        self.push_out()?;
        let take = buf.len().min(OUT_BATCH);
        for piece in buf[..take].chunks(RECORD) {
            self.seal(piece)?;
        }
        match self.push_out() {
            Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => Err(e),
            _ => Ok(take),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push_out()
    }
}

/// Sealed records in memory, with fixed keys: what the fuzz harness (`shoal-fuzz`'s
/// `sealed_records`) drives the record layer through.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Bytes read from `input`, bytes written to `output`.
    struct Wire {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sealed(input: Vec<u8>) -> Sealed<Wire> {
        let key = Direction::from_key([7; 16], [9; 12], 0);
        let same = Direction::from_key([7; 16], [9; 12], 0);
        Sealed::with(Wire { input: std::io::Cursor::new(input), output: Vec::new() }, key, same)
    }

    /// The records a writer makes of `pieces` (one `write_all` each).
    pub fn seal(pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = sealed(Vec::new());
        for p in pieces {
            s.write_all(p).expect("writes to memory");
        }
        s.flush().expect("writes to memory");
        s.sock.output
    }

    /// What a reader makes of `wire`, reading `read_size` bytes at a time (at least 1): the
    /// bytes up to the end of the stream, or the first error.
    pub fn open(wire: &[u8], read_size: usize) -> std::io::Result<Vec<u8>> {
        let mut s = sealed(wire.to_vec());
        let mut buf = vec![0u8; read_size.max(1)];
        let mut out = Vec::new();
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// What a dialing rank sends after its hello: a MAC of the ring key over the connection's
/// exporter and the hello.
pub(crate) fn hello_proof(key: &RingKey, binding: &[u8; 32], hello: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"shoal ring hello v1 ");
    h.update(binding);
    h.update(hello);
    *h.finalize().as_bytes()
}

/// A gRPC chunk's tag: a MAC of the ring key over its sender and place in the ring.
pub fn chunk_tag(key: &RingKey, job: u64, generation: u64, from_rank: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"shoal ring chunk v1 ");
    h.update(&job.to_le_bytes());
    h.update(&generation.to_le_bytes());
    h.update(&from_rank.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Constant-time comparison of two MACs.
pub(crate) fn same_mac(a: &[u8], b: &[u8; 32]) -> bool {
    a.len() == 32 && blake3::Hash::from_bytes(a.try_into().expect("32 bytes")) == blake3::Hash::from_bytes(*b)
}

/// A ring key from an assignment's bytes: none (a cluster without credentials) or 32 bytes.
pub fn ring_key_from(bytes: &[u8]) -> Result<Option<RingKey>, WorkerError> {
    match bytes.len() {
        0 => Ok(None),
        32 => Ok(Some(bytes.try_into().expect("32 bytes"))),
        n => Err(WorkerError::Collective(format!("a ring key of {n} bytes (32 expected)"))),
    }
}

/// The one-core AES-128-GCM rate in bytes per second (the ring's suite), sealing `bytes` in
/// 16 KiB records as TLS does: the benchmark's yardstick for what encryption costs.
pub fn aes_gcm_rate(bytes: usize) -> f64 {
    let mut d = Direction::from_key([7u8; 16], [1u8; 12], 0);
    let mut record = vec![3u8; RECORD];
    let started = Instant::now();
    let mut done = 0usize;
    while done < bytes {
        let tag = d.key.seal_in_place_separate_tag(d.nonce(), aws_lc_rs::aead::Aad::from([APPLICATION_DATA, 3, 3, 0, 0]), &mut record).expect("sealing a record");
        std::hint::black_box(&tag);
        d.advance();
        done += record.len();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    fn ca_params() -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        p
    }

    /// A cluster's CA, and a worker certificate from it (as `shoal ca issue --worker` makes).
    pub(crate) fn cluster() -> TlsFiles {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params().self_signed(&ca_key).unwrap();
        let mut p = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "worker");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &rcgen::Issuer::new(ca_params(), &ca_key)).unwrap();
        TlsFiles { ca: ca.pem().into_bytes(), cert: cert.pem().into_bytes(), key: key.serialize_pem().into_bytes(), source: None }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::super::tcp::{Incoming, TcpRing};
    use super::super::testing::{all_reduce_each, inputs};
    use super::super::{reference_sum, Wire};
    use super::*;

    fn listeners(n: usize, tls: &Arc<DataPlaneTls>) -> Vec<Arc<Incoming>> {
        (0..n).map(|_| Incoming::start_with(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), Some(tls.clone())).unwrap()).collect()
    }

    fn join(incs: &[Arc<Incoming>], job: u64, key: RingKey) -> Vec<TcpRing> {
        let peers: Vec<String> = incs.iter().map(|i| i.address().to_string()).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..incs.len())
                .map(|r| {
                    let (peers, inc) = (&peers, &incs[r]);
                    s.spawn(move || TcpRing::connect(r, peers, job, 1, inc, Some(&key), Duration::from_secs(10), Wire::F32, Arc::new(AtomicBool::new(false))).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_ring_over_tls_gives_every_rank_the_reference_sum() {
        let tls = Arc::new(DataPlaneTls::new(&testing::cluster()).unwrap());
        let world = 3;
        let incs = listeners(world, &tls);
        let data = inputs(world, 200_003, 5);
        let out = all_reduce_each(join(&incs, 1, [9; 32]), &data);
        let want = reference_sum(&data);
        for got in &out {
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "a rank differs from the reference");
        }
    }

    /// Dials `addr` over TLS with `tls` and says it is rank 1 of (job, generation 1), proving
    /// it with `key`. Returns the connection (to see whether it is closed).
    fn claim_rank_one(tls: &DataPlaneTls, addr: &str, job: u64, key: &RingKey) -> Link {
        let sock = TcpStream::connect(addr).unwrap();
        let mut link = tls.connect(sock, Instant::now() + Duration::from_secs(5)).unwrap();
        let hello = super::super::tcp::encode_hello(job, 1, 1, 2);
        let proof = hello_proof(key, &link.binding().unwrap(), &hello);
        link.write_all(&hello).unwrap();
        link.write_all(&proof).unwrap();
        link.flush().unwrap();
        // The listener's acknowledgement (it has read the greeting; its proof is checked
        // when the rank's task takes the connection).
        let mut ack = [0u8; 1];
        link.tcp().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        link.read_exact(&mut ack).unwrap();
        link
    }

    fn closed(link: &mut Link) -> bool {
        link.tcp().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        !matches!(link.read(&mut [0u8; 1]), Ok(n) if n > 0)
    }

    #[test]
    fn another_generations_worker_or_another_cluster_cannot_join_a_ring() {
        let files = testing::cluster();
        let tls = Arc::new(DataPlaneTls::new(&files).unwrap());
        let incs = listeners(2, &tls);
        let (job, key) = (7, [1u8; 32]);
        // A worker of this cluster running job 8 (its certificate is as good as any, its ring
        // key is job 8's) claims rank 1 of job 7 before the real rank 1 dials.
        let mut impostor = claim_rank_one(&tls, incs[0].address(), job, &[2u8; 32]);
        // A process with another cluster's certificate does not get through the handshake.
        let stranger = DataPlaneTls::new(&testing::cluster()).unwrap();
        let refused = match stranger.connect(TcpStream::connect(incs[0].address()).unwrap(), Instant::now() + Duration::from_secs(5)) {
            Err(_) => true,
            Ok(mut link) => {
                let _ = link.write_all(&super::super::tcp::encode_hello(job, 1, 1, 2));
                closed(&mut link)
            }
        };
        assert!(refused, "a certificate of another cluster got a connection");
        // Nor does a plaintext hello.
        let mut plain = TcpStream::connect(incs[0].address()).unwrap();
        plain.write_all(&super::super::tcp::encode_hello(job, 1, 1, 2)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The real ranks still meet, and sum.
        let data = inputs(2, 10_001, 3);
        let out = all_reduce_each(join(&incs, job, key), &data);
        let want = reference_sum(&data);
        assert!(out.iter().all(|g| g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits())));
        assert_eq!(incs[0].refused(), 1, "the impostor's connection is refused, counted once");
        assert!(closed(&mut impostor), "the impostor's connection must be closed");
        // A plaintext peer gets a TLS alert (content type 21) at most, then the end.
        plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = plain.read_to_end(&mut got);
        assert!(got.is_empty() || got[0] == 21, "a plaintext peer got {got:?}");
    }

    fn sealed(sock: TcpStream, tx: u8, rx: u8, seq: u64) -> Sealed {
        let d = |k: u8| Direction::from_key([k; 16], [k ^ 0x55; 12], seq);
        Sealed::with(sock, d(tx), d(rx))
    }

    /// Two sealed ends of one loopback connection, keys `a` one way and `b` the other.
    fn sealed_pair(a: u8, b: u8, seq: u64) -> (Sealed, Sealed) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let x = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (y, _) = l.accept().unwrap();
        (sealed(x, a, b, seq), sealed(y, b, a, seq))
    }

    #[test]
    fn the_handshake_hands_over_aes_128_gcm_keys_both_ends_agree_on() {
        // A real handshake: what one end seals, the other opens.
        let tls = DataPlaneTls::new(&testing::cluster()).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                let mut link = tls.accept(l.accept().unwrap().0, deadline).unwrap();
                let mut b = [0u8; 4];
                link.read_exact(&mut b).unwrap();
                link.write_all(&[1]).unwrap();
                link.flush().unwrap();
                let mut link = link.seal().unwrap();
                let mut got = vec![0u8; 100_000];
                link.read_exact(&mut got).unwrap();
                got
            });
            let mut link = tls.connect(TcpStream::connect(addr).unwrap(), deadline).unwrap();
            link.write_all(b"ping").unwrap();
            link.flush().unwrap();
            link.read_exact(&mut [0u8; 1]).unwrap();
            let mut link = link.seal().unwrap();
            assert!(matches!(link, Link::Sealed(_)));
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
            link.write_all(&data).unwrap();
            link.flush().unwrap();
            assert_eq!(server.join().unwrap(), data);
        });
    }

    #[test]
    fn sealed_records_carry_bytes_exactly_across_key_updates() {
        // Both directions start three records before a key update.
        let (mut x, mut y) = sealed_pair(1, 2, REKEY_EVERY - 3);
        let data: Vec<u8> = (0..(RECORD * 9 + 77)).map(|i| (i * 7 + i / 251) as u8).collect();
        let sender = {
            let data = data.clone();
            std::thread::spawn(move || {
                for piece in data.chunks(RECORD / 3 + 5) {
                    x.write_all(piece).unwrap();
                }
                x.flush().unwrap();
                x
            })
        };
        let mut got = vec![0u8; data.len()];
        // Reads of every size: smaller than a record (copied out) and larger (opened in place).
        let mut at = 0;
        for size in [1usize, 100, RECORD + 17, 3, RECORD * 3].iter().cycle() {
            if at == got.len() {
                break;
            }
            let end = (at + size).min(got.len());
            let n = y.read(&mut got[at..end]).unwrap();
            assert!(n > 0);
            at += n;
        }
        assert_eq!(got, data);
        let x = sender.join().unwrap();
        assert!(x.tx.seq > REKEY_EVERY && y.rx.seq == x.tx.seq, "the sequence passed the key update");
        assert_ne!(x.tx.raw, [1u8; 16], "the key moved on");
    }

    #[test]
    fn reads_with_a_spare_byte_take_no_more_than_asked() {
        let (mut x, mut y) = sealed_pair(3, 4, 0);
        let data: Vec<u8> = (0..(RECORD * 8 + 5)).map(|i| (i * 13 + i / 97) as u8).collect();
        let sender = {
            let data = data.clone();
            std::thread::spawn(move || {
                x.write_all(&data).unwrap();
                x.flush().unwrap();
            })
        };
        // Pieces of four records with the rest of the buffer behind each as scratch (what the
        // ring's all-gather does), then odd sizes with one spare byte.
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        for want in [4 * RECORD, 4 * RECORD, 3, 2].iter().cycle() {
            if at == got.len() {
                break;
            }
            let want = (*want).min(got.len() - at);
            let end = got.len().min(at + want + 1);
            let mut filled = 0;
            while filled < want {
                let n = y.read_spare(&mut got[at + filled..end], want - filled).unwrap();
                assert!(n > 0 && n <= want - filled, "read {n} of {} asked", want - filled);
                filled += n;
            }
            at += want;
        }
        assert_eq!(got, data);
        sender.join().unwrap();
    }

    #[test]
    fn an_altered_or_foreign_record_is_an_error() {
        // A record sealed under another key.
        let (mut x, _) = sealed_pair(1, 2, 0);
        let (_, mut y) = sealed_pair(3, 4, 0);
        x.seal(b"hello").unwrap();
        y.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut raw = x.out.clone();
        // Written raw into y's peer: a connection whose key differs.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut feed = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (sock, _) = l.accept().unwrap();
        y.sock = sock;
        feed.write_all(&raw).unwrap();
        let e = y.read(&mut [0u8; 64]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        // The right key, one bit flipped.
        let (_, mut z) = sealed_pair(2, 1, 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut feed = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        z.sock = l.accept().unwrap().0;
        raw[HEADER + 2] ^= 1;
        feed.write_all(&raw).unwrap();
        assert_eq!(z.read(&mut [0u8; 64]).unwrap_err().kind(), ErrorKind::InvalidData);
        // An alert, and a header that is not a record's.
        for bad in [[21u8, 3, 3, 0, 2, 2, 40], [22u8, 3, 3, 0, 2, 0, 0]] {
            let (_, mut w) = sealed_pair(2, 1, 0);
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut feed = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            w.sock = l.accept().unwrap().0;
            feed.write_all(&bad).unwrap();
            assert!(w.read(&mut [0u8; 64]).is_err());
        }
    }

    #[test]
    fn a_proof_is_bound_to_its_connection_and_its_key() {
        let (k1, k2, b1, b2, hello) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32], [5u8; 32]);
        let p = hello_proof(&k1, &b1, &hello);
        assert!(same_mac(&p, &hello_proof(&k1, &b1, &hello)));
        assert!(!same_mac(&p, &hello_proof(&k2, &b1, &hello)), "another key");
        assert!(!same_mac(&p, &hello_proof(&k1, &b2, &hello)), "replayed on another connection");
        assert!(!same_mac(&p[..31], &hello_proof(&k1, &b1, &hello)), "a short proof");
        assert_ne!(chunk_tag(&k1, 1, 1, 0), chunk_tag(&k1, 1, 1, 1));
        assert_ne!(chunk_tag(&k1, 1, 1, 0), chunk_tag(&k1, 1, 2, 0));
        assert!(ring_key_from(&[0u8; 31]).is_err());
        assert_eq!(ring_key_from(&[]).unwrap(), None);
    }
}
