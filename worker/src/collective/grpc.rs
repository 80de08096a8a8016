//! Worker-to-worker collectives over the data plane. Each worker runs a `DataPlane` gRPC
//! service whose handler drops incoming chunks into a bounded mailbox; a ring all-reduce
//! sends to the next rank and takes from the mailbox what the previous rank sent.
//!
//! The summation order of every element is fixed by the ring (for a given world size), and
//! the all-gather phase hands every rank the very same reduced bytes, so all ranks end with
//! bitwise-identical buffers, run after run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_proto::data_plane_client::DataPlaneClient;
use shoal_proto::data_plane_server::DataPlane;
use shoal_proto::{Ack, Chunk};
use tokio::sync::Notify;
use tonic::transport::Channel;
use shoal_coordinator::client::refuses_connections;
use tonic::{Request, Response, Status};

use super::secure::{chunk_tag, same_mac, RingKey};
use super::MAX_GATHER_BYTES;
use crate::WorkerError;

/// Chunk bytes held at once (the ring needs one or two chunks per peer).
const MAILBOX_BYTES: usize = shoal_core::limits::MAILBOX_BYTES;
pub const MAX_CHUNK_MESSAGE: usize = shoal_core::limits::MAX_MESSAGE_BYTES;
/// HTTP/2 flow-control windows for the data plane. The default (64 KiB) makes a 1 MiB chunk
/// wait on a dozen window updates; collectives move megabytes per step.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// The largest HTTP/2 frame the data-plane server accepts (the protocol's maximum): fewer,
/// larger frames per chunk.
pub const MAX_FRAME: u32 = (1 << 24) - 1;

type Key = (u64, u64, u64, u32);

/// With tags (credentials), chunks that may wait under one place in the ring until the task
/// checks them: one sent by someone outside the generation cannot shut the real one out.
const MAX_CANDIDATES: usize = 4;

/// A chunk that arrived: the rank that says it sent it, its bytes and its tag.
struct Held {
    from: u32,
    data: Bytes,
    tag: Vec<u8>,
}

pub struct Mailbox {
    /// Bytes held at most.
    capacity: usize,
    /// The chunks that arrived (with tags, a few candidates per place).
    chunks: Mutex<HashMap<Key, Vec<Held>>>,
    /// The (job, generation) of the task this worker runs now, and its ring key.
    active: Mutex<Option<(u64, u64, Option<RingKey>)>>,
    arrived: Notify,
    /// Chunks refused for want of a valid tag.
    refused: AtomicUsize,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox::with_capacity(MAILBOX_BYTES)
    }
}

impl Mailbox {
    pub fn with_capacity(bytes: usize) -> Mailbox {
        Mailbox { capacity: bytes, chunks: Mutex::default(), active: Mutex::default(), arrived: Notify::new(), refused: AtomicUsize::new(0) }
    }

    /// Marks (job, generation) as the one this worker runs, with its ring key; chunks of others
    /// are leftovers.
    pub fn activate(&self, job: u64, generation: u64, ring_key: Option<RingKey>) {
        *self.active.lock().expect("mailbox lock") = Some((job, generation, ring_key));
    }

    /// Chunks refused because their tag did not hold.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    fn refuse(&self, c: &Chunk) -> Status {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(job = c.job_id, generation = c.generation, from = c.from_rank, "data plane: a chunk without a valid proof of membership in the generation; refused");
        Status::permission_denied(format!("not a rank of job {} generation {}", c.job_id, c.generation))
    }

    fn put(&self, c: Chunk) -> Result<(), Status> {
        // The server's decoding limit bounds it already; a service set up without one must not
        // hold more either.
        if c.data.len() > MAX_CHUNK_MESSAGE {
            return Err(Status::invalid_argument(format!("a chunk of {} bytes is more than the {MAX_CHUNK_MESSAGE} a message carries", c.data.len())));
        }
        let key = (c.job_id, c.generation, c.seq, c.hop);
        let active = *self.active.lock().expect("mailbox lock");
        // The running generation's chunks are checked on arrival; others' when it is claimed.
        if let Some((_, _, Some(ring_key))) = active.filter(|a| (a.0, a.1) == (c.job_id, c.generation)) {
            if !same_mac(&c.tag, &chunk_tag(&ring_key, c.job_id, c.generation, c.from_rank)) {
                return Err(self.refuse(&c));
            }
        }
        let mut map = self.chunks.lock().expect("mailbox lock");
        if let Some(waiting) = map.get(&key) {
            // A retried push (its reply was lost) is welcome; another sender's chunk does not
            // replace the one waiting (with tags, a few wait until the task checks them).
            if waiting.iter().any(|h| h.from == c.from_rank && h.data == c.data && h.tag == c.tag) {
                return Ok(());
            }
            let room = if c.tag.is_empty() { 1 } else { MAX_CANDIDATES };
            if waiting.len() >= room {
                return Err(Status::already_exists(format!("a different chunk for collective {} hop {} is already waiting", c.seq, c.hop)));
            }
        }
        let held = |m: &HashMap<Key, Vec<Held>>| m.values().flatten().map(|h| h.data.len()).sum::<usize>();
        if held(&map) + c.data.len() > self.capacity {
            // A worker runs one task at a time: drop chunks of any other job generation (an
            // aborted one's leftovers) before refusing.
            map.retain(|k, _| active.is_some_and(|a| (a.0, a.1) == (k.0, k.1)));
        }
        if held(&map) + c.data.len() > self.capacity {
            return Err(Status::resource_exhausted(format!("data-plane mailbox is full ({} bytes)", self.capacity)));
        }
        map.entry(key).or_default().push(Held { from: c.from_rank, data: c.data, tag: c.tag });
        drop(map);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// The first chunk waiting under `key` whose tag holds under `ring_key` (any, without one);
    /// those that do not are dropped.
    fn claim(&self, key: Key, ring_key: Option<&RingKey>) -> Option<(u32, Bytes)> {
        let mut map = self.chunks.lock().expect("mailbox lock");
        let waiting = map.get_mut(&key)?;
        let mut found = None;
        while !waiting.is_empty() {
            let h = waiting.remove(0);
            match ring_key {
                Some(k) if !same_mac(&h.tag, &chunk_tag(k, key.0, key.1, h.from)) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job = key.0, generation = key.1, from = h.from, "data plane: a chunk without a valid proof of membership in the generation; dropped");
                }
                _ => {
                    found = Some((h.from, h.data));
                    break;
                }
            }
        }
        if waiting.is_empty() {
            map.remove(&key);
        }
        found
    }

    /// Waits for one chunk (with the rank that sent it), up to `timeout`, giving up early when
    /// `cancel` is set.
    async fn take(&self, key: Key, ring_key: Option<&RingKey>, timeout: Duration, cancel: &AtomicBool) -> Result<(u32, Bytes), WorkerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(b) = self.claim(key, ring_key) {
                return Ok(b);
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(WorkerError::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WorkerError::Collective(format!(
                    "timed out after {timeout:?} waiting for the previous rank (collective {}, hop {})",
                    key.2, key.3
                )));
            }
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Forgets everything of a job generation (it ended).
    pub fn purge(&self, job: u64, generation: u64) {
        self.chunks.lock().expect("mailbox lock").retain(|k, _| !(k.0 == job && k.1 == generation));
    }
}

/// The gRPC face of the mailbox.
#[derive(Clone)]
pub struct DataPlaneService(pub Arc<Mailbox>);

/// A data-plane server's run, to spawn or await.
pub type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The data plane on `listener` until `shutdown`: the mailbox's gRPC face, over mutual TLS
/// (our own accept, so the certificate rotates with its files) when `tls` is given.
pub fn serve(
    listener: tokio::net::TcpListener,
    mailbox: Arc<Mailbox>,
    tls: Option<&shoal_coordinator::tls::TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Serving, WorkerError> {
    use shoal_proto::data_plane_server::DataPlaneServer;
    let svc = DataPlaneServer::new(DataPlaneService(mailbox)).max_decoding_message_size(MAX_CHUNK_MESSAGE);
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(svc);
    Ok(match tls {
        Some(files) => {
            let config = files.data_plane_server_config().map_err(|e| WorkerError::Io(format!("data-plane TLS: {e}")))?;
            Box::pin(router.serve_with_incoming_shutdown(shoal_coordinator::tls::tls_incoming(listener, config), shutdown))
        }
        // The builder's tcp_nodelay does not reach a listener of our own: set it here.
        None => Box::pin(router.serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)),
    })
}

#[tonic::async_trait]
impl DataPlane for DataPlaneService {
    async fn push_chunk(&self, r: Request<Chunk>) -> Result<Response<Ack>, Status> {
        self.0.put(r.into_inner())?;
        Ok(Response::new(Ack {}))
    }
}

/// One rank's view of a ring of `world` workers.
pub struct Ring {
    pub rank: usize,
    pub world: usize,
    job: u64,
    generation: u64,
    seq: u64,
    next: Option<DataPlaneClient<Channel>>,
    /// Data-plane addresses of the next and previous ranks, probed when an exchange stalls.
    next_addr: String,
    prev_addr: String,
    mailbox: Arc<Mailbox>,
    timeout: Duration,
    cancel: Arc<AtomicBool>,
    ring_key: Option<RingKey>,
    /// This rank's tag on every chunk it sends (empty without a ring key).
    tag: Vec<u8>,
}

const PROBE_EVERY: Duration = Duration::from_secs(1);

fn to_bytes(xs: &[f32]) -> Bytes {
    Bytes::from(f32_le_bytes(xs))
}

/// Little-endian f32 bytes (the data plane's and safetensors' format); on little-endian hosts
/// that is one memcpy.
pub fn f32_le_bytes(xs: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(xs).to_vec()
    } else {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

fn check_len(b: &Bytes, want: usize, from: usize) -> Result<(), WorkerError> {
    if b.len() != want * 4 {
        return Err(WorkerError::Collective(format!("rank {from} sent a chunk of {} bytes, expected {}", b.len(), want * 4)));
    }
    Ok(())
}

impl Ring {
    #[allow(clippy::too_many_arguments)]
    /// With `secure` (the generation's ring key and this worker's TLS files), peers are dialed
    /// over TLS and every chunk carries this rank's tag.
    pub fn new(
        rank: usize,
        peers: &[String],
        job: u64,
        generation: u64,
        mailbox: Arc<Mailbox>,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
        secure: Option<(RingKey, &shoal_coordinator::tls::TlsFiles)>,
    ) -> Result<Ring, WorkerError> {
        let world = peers.len();
        if rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} outside a world of {world}")));
        }
        let next = if world > 1 {
            let addr = &peers[(rank + 1) % world];
            let ep = shoal_coordinator::tls::endpoint(addr, secure.map(|s| s.1)).map_err(|e| WorkerError::Collective(format!("peer {addr}: {e}")))?;
            let ch = ep
                .with(|ep| {
                    ep.connect_timeout(Duration::from_secs(2))
                        .timeout(timeout)
                        .tcp_nodelay(true)
                        .initial_stream_window_size(STREAM_WINDOW)
                        .initial_connection_window_size(CONNECTION_WINDOW)
                })
                .connect_lazy();
            Some(DataPlaneClient::new(ch).max_encoding_message_size(MAX_CHUNK_MESSAGE))
        } else {
            None
        };
        let ring_key = secure.map(|s| s.0);
        mailbox.activate(job, generation, ring_key);
        let next_addr = peers[(rank + 1) % world].clone();
        let prev_addr = peers[(rank + world - 1) % world].clone();
        let tag = ring_key.map_or_else(Vec::new, |k| chunk_tag(&k, job, generation, rank as u32).to_vec());
        Ok(Ring { rank, world, job, generation, seq: 0, next, next_addr, prev_addr, mailbox, timeout, cancel, ring_key, tag })
    }

    async fn send(&self, hop: u32, data: Bytes) -> Result<(), WorkerError> {
        let Some(client) = &self.next else { return Ok(()) };
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let chunk = Chunk { job_id: self.job, generation: self.generation, seq: self.seq, hop, from_rank: self.rank as u32, data: data.clone(), tag: self.tag.clone() };
            match client.clone().push_chunk(chunk).await {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    let next = (self.rank + 1) % self.world;
                    return Err(WorkerError::Collective(format!("next rank {next} holds another chunk for this hop: {}", s.message())));
                }
                Err(s) if s.code() != tonic::Code::ResourceExhausted && refuses_connections(&self.next_addr).await => {
                    let next = (self.rank + 1) % self.world;
                    return Err(WorkerError::PeerGone(format!("next rank {next} at {} is gone ({})", self.next_addr, s.message())));
                }
                Err(s) if Instant::now() < deadline && !self.cancel.load(Ordering::Relaxed) => {
                    tracing::debug!(error = %s.message(), "push to next rank failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(_) if self.cancel.load(Ordering::Relaxed) => return Err(WorkerError::Cancelled),
                Err(s) => return Err(WorkerError::Collective(format!("next rank unreachable: {}", s.message()))),
            }
        }
    }

    /// Takes what the previous rank sent for `key`. While waiting, the previous rank is probed
    /// every second: a refused connection means its process is gone, which fails the exchange
    /// at once instead of after the whole timeout.
    async fn recv(&self, key: Key) -> Result<Bytes, WorkerError> {
        let take = self.mailbox.take(key, self.ring_key.as_ref(), self.timeout, &self.cancel);
        tokio::pin!(take);
        let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
        let prev = (self.rank + self.world - 1) % self.world;
        loop {
            tokio::select! {
                got = &mut take => {
                    let (from, data) = got?;
                    if from as usize != prev {
                        return Err(WorkerError::Collective(format!("a chunk from rank {from} arrived where rank {prev}'s was expected (collective {}, hop {})", key.2, key.3)));
                    }
                    return Ok(data);
                }
                _ = probe.tick() => {
                    if refuses_connections(&self.prev_addr).await {
                        return Err(WorkerError::PeerGone(format!("previous rank {prev} at {} is gone (connection refused)", self.prev_addr)));
                    }
                }
            }
        }
    }

    /// Every rank's `mine`, indexed by rank, on every rank (small payloads: checkpoint file
    /// records, agreement checks). Each hop passes on the block received in the hop before.
    pub async fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let n = self.world;
        let r = self.rank;
        if mine.len() > MAX_GATHER_BYTES {
            return Err(WorkerError::Collective(format!("{} bytes is more than one all-gather carries ({MAX_GATHER_BYTES})", mine.len())));
        }
        let mut out = vec![Vec::new(); n];
        out[r] = mine;
        if n == 1 {
            return Ok(out);
        }
        self.seq += 1;
        for s in 0..n - 1 {
            let send_b = (r + n - s) % n;
            let recv_b = (r + 2 * n - s - 1) % n;
            let key = (self.job, self.generation, self.seq, s as u32);
            let ((), got) = tokio::try_join!(self.send(s as u32, Bytes::from(out[send_b].clone())), self.recv(key))?;
            if got.len() > MAX_GATHER_BYTES {
                let prev = (r + n - 1) % n;
                return Err(WorkerError::Collective(format!("rank {prev} sent an all-gather block of {} bytes, more than the {MAX_GATHER_BYTES} one carries", got.len())));
            }
            out[recv_b] = got.to_vec();
        }
        Ok(out)
    }

    /// In-place sum over all ranks.
    pub async fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        self.seq += 1;
        let len = buf.len();
        let bounds = |c: usize| (c * len / n)..((c + 1) * len / n);
        let r = self.rank;
        // Reduce-scatter: after n-1 hops rank r holds the full sum of chunk (r+1) % n.
        for s in 0..n - 1 {
            let send_c = (r + n - s) % n;
            let recv_c = (r + 2 * n - s - 1) % n;
            let key = (self.job, self.generation, self.seq, s as u32);
            let ((), got) = tokio::try_join!(self.send(s as u32, to_bytes(&buf[bounds(send_c)])), self.recv(key))?;
            let dst = &mut buf[bounds(recv_c)];
            check_len(&got, dst.len(), (r + n - 1) % n)?;
            for (d, c) in dst.iter_mut().zip(got.chunks_exact(4)) {
                *d += f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        // All-gather: pass the reduced chunks around unchanged.
        for s in 0..n - 1 {
            let hop = (n - 1 + s) as u32;
            let send_c = (r + 1 + n - s) % n;
            let recv_c = (r + n - s) % n;
            let key = (self.job, self.generation, self.seq, hop);
            let ((), got) = tokio::try_join!(self.send(hop, to_bytes(&buf[bounds(send_c)])), self.recv(key))?;
            let dst = &mut buf[bounds(recv_c)];
            check_len(&got, dst.len(), (r + n - 1) % n)?;
            for (d, c) in dst.iter_mut().zip(got.chunks_exact(4)) {
                *d = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }
}

/// The gRPC ring behind the blocking `Collective` interface: each call runs on the worker's
/// runtime.
pub struct GrpcCollective {
    ring: Ring,
    rt: tokio::runtime::Handle,
}

impl GrpcCollective {
    pub fn new(ring: Ring, rt: tokio::runtime::Handle) -> GrpcCollective {
        GrpcCollective { ring, rt }
    }
}

impl super::Collective for GrpcCollective {
    fn rank(&self) -> usize {
        self.ring.rank
    }

    fn world(&self) -> usize {
        self.ring.world
    }

    fn name(&self) -> &'static str {
        "grpc"
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        self.rt.block_on(self.ring.all_reduce_sum(buf))
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        self.rt.block_on(self.ring.all_gather_bytes(mine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::data_plane_server::DataPlaneServer;

    async fn start_server() -> (String, Arc<Mailbox>) {
        let mailbox = Arc::new(Mailbox::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let svc = DataPlaneServer::new(DataPlaneService(mailbox.clone())).max_decoding_message_size(MAX_CHUNK_MESSAGE);
        tokio::spawn(
            tonic::transport::Server::builder()
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
        );
        (addr, mailbox)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ring_all_reduce_sums_identically_on_every_rank() {
        for world in [2usize, 3, 4] {
            let mut addrs = Vec::new();
            let mut boxes = Vec::new();
            for _ in 0..world {
                let (a, m) = start_server().await;
                addrs.push(a);
                boxes.push(m);
            }
            let len = 1001;
            let mut tasks = Vec::new();
            for (r, mb) in boxes.iter().cloned().enumerate() {
                let peers = addrs.clone();
                tasks.push(tokio::spawn(async move {
                    let cancel = Arc::new(AtomicBool::new(false));
                    let mut ring = Ring::new(r, &peers, 1, 1, mb, Duration::from_secs(10), cancel, None).unwrap();
                    let mut out = Vec::new();
                    for round in 0..3 {
                        let mut buf: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37 + r as f32 * 1.1 + round as f32).sin()).collect();
                        ring.all_reduce_sum(&mut buf).await.unwrap();
                        out.push(buf);
                    }
                    let gathered = ring.all_gather_bytes(vec![r as u8; r + 1]).await.unwrap();
                    (out, gathered)
                }));
            }
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            let gathered: Vec<_> = results.iter().map(|(_, g)| g.clone()).collect();
            let results: Vec<_> = results.into_iter().map(|(r, _)| r).collect();
            for g in &gathered {
                let want: Vec<Vec<u8>> = (0..world).map(|r| vec![r as u8; r + 1]).collect();
                assert_eq!(g, &want, "all-gather (world {world})");
            }
            for round in 0..3 {
                let expect: Vec<f32> = (0..len)
                    .map(|i| (0..world).map(|r| (i as f32 * 0.37 + r as f32 * 1.1 + round as f32).sin()).sum::<f32>())
                    .collect();
                for (r, rounds) in results.iter().enumerate() {
                    let got = &rounds[round];
                    assert_eq!(got, &results[0][round], "rank {r} differs bitwise (world {world})");
                    for (g, e) in got.iter().zip(&expect) {
                        assert!((g - e).abs() < 1e-4, "world {world}: {g} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_full_mailbox_evicts_stale_generations_first() {
        let mb = Mailbox::with_capacity(1000);
        let chunk = |generation: u64, hop: u32| Chunk { job_id: 1, generation, seq: 1, hop, from_rank: 0, data: Bytes::from(vec![0u8; 100]), tag: Vec::new() };
        mb.activate(1, 1, None);
        for hop in 0..10 {
            mb.put(chunk(1, hop)).unwrap();
        }
        // The active generation's chunks are never evicted: full means full.
        assert!(mb.put(chunk(1, 9999)).is_err());
        assert!(mb.put(chunk(0, 0)).is_err(), "a stale chunk must not push out live ones");
        // Once a newer generation is active, the stale chunks make room.
        mb.activate(1, 2, None);
        mb.put(chunk(2, 0)).unwrap();
        assert_eq!(mb.chunks.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_waiting_chunk_is_not_replaced_and_a_retry_is_welcome() {
        let mb = Mailbox::default();
        let chunk = |from_rank: u32, byte: u8| Chunk { job_id: 1, generation: 1, seq: 1, hop: 0, from_rank, data: Bytes::from(vec![byte; 8]), tag: Vec::new() };
        mb.put(chunk(1, 7)).unwrap();
        mb.put(chunk(1, 7)).unwrap();
        assert_eq!(mb.put(chunk(1, 8)).unwrap_err().code(), tonic::Code::AlreadyExists);
        assert_eq!(mb.put(chunk(0, 7)).unwrap_err().code(), tonic::Code::AlreadyExists);
        let (from, data) = mb.take((1, 1, 1, 0), None, Duration::from_secs(1), &AtomicBool::new(false)).await.unwrap();
        assert_eq!((from, &data[..]), (1, &[7u8; 8][..]), "the first chunk stays");
    }

    #[tokio::test]
    async fn a_chunk_without_the_generations_tag_is_refused_or_dropped() {
        use crate::collective::secure::chunk_tag;
        let key = [4u8; 32];
        let chunk = |generation: u64, from_rank: u32, tag: Vec<u8>, byte: u8| Chunk { job_id: 1, generation, seq: 1, hop: 0, from_rank, data: Bytes::from(vec![byte; 8]), tag };
        let mb = Mailbox::default();
        // Before the task runs the generation, chunks wait unchecked: an impostor's (another
        // generation's key) and then the real one's both wait.
        mb.put(chunk(1, 1, chunk_tag(&[5u8; 32], 1, 1, 1).to_vec(), 66)).unwrap();
        mb.put(chunk(1, 1, chunk_tag(&key, 1, 1, 1).to_vec(), 7)).unwrap();
        mb.activate(1, 1, Some(key));
        // The task takes the real one; the impostor's is dropped and counted.
        let (from, data) = mb.take((1, 1, 1, 0), Some(&key), Duration::from_secs(1), &AtomicBool::new(false)).await.unwrap();
        assert_eq!((from, &data[..]), (1, &[7u8; 8][..]));
        assert_eq!(mb.refused(), 1);
        assert!(mb.chunks.lock().unwrap().is_empty());
        // While it runs, a chunk without a valid tag is refused on arrival.
        for tag in [Vec::new(), vec![0u8; 32], chunk_tag(&key, 1, 1, 0).to_vec(), chunk_tag(&key, 1, 2, 1).to_vec()] {
            assert_eq!(mb.put(chunk(1, 1, tag, 1)).unwrap_err().code(), tonic::Code::PermissionDenied);
        }
        assert_eq!(mb.refused(), 5);
        mb.put(chunk(1, 1, chunk_tag(&key, 1, 1, 1).to_vec(), 1)).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_block_over_the_limit_or_from_the_wrong_rank_is_an_error() {
        let (own, mb) = start_server().await;
        let (other, _) = start_server().await;
        let peers = vec![own, other];
        let block = |from_rank: u32, len: usize| Chunk { job_id: 1, generation: 1, seq: 1, hop: 0, from_rank, data: Bytes::from(vec![0u8; len]), tag: Vec::new() };
        let cancel = Arc::new(AtomicBool::new(false));
        let mut ring = Ring::new(0, &peers, 1, 1, mb.clone(), Duration::from_secs(10), cancel.clone(), None).unwrap();
        mb.put(block(1, MAX_GATHER_BYTES + 1)).unwrap();
        let e = ring.all_gather_bytes(vec![1, 2, 3]).await.unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains(&(MAX_GATHER_BYTES + 1).to_string()), "{e}");
        assert!(ring.all_gather_bytes(vec![0; MAX_GATHER_BYTES + 1]).await.is_err(), "nor may this rank send one");

        let mut ring = Ring::new(0, &peers, 1, 1, mb.clone(), Duration::from_secs(10), cancel, None).unwrap();
        mb.purge(1, 1);
        mb.put(block(5, 3)).unwrap();
        let e = ring.all_gather_bytes(vec![1, 2, 3]).await.unwrap_err().to_string();
        assert!(e.contains("rank 5") && e.contains("rank 1"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_with_a_clear_error() {
        let (own, mb) = start_server().await;
        let (silent, _) = start_server().await;
        let peers = vec![own, silent];
        let mut ring = Ring::new(0, &peers, 1, 1, mb, Duration::from_millis(300), Arc::new(AtomicBool::new(false)), None).unwrap();
        let mut buf = vec![1.0f32; 10];
        let e = ring.all_reduce_sum(&mut buf).await.unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_is_gone_fails_the_exchange_long_before_the_timeout() {
        let (own, mb) = start_server().await;
        // An address where nothing listens: a port that was bound, then released.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let peers = vec![own, gone];
        let mut ring = Ring::new(0, &peers, 1, 1, mb, Duration::from_secs(30), Arc::new(AtomicBool::new(false)), None).unwrap();
        let started = Instant::now();
        let e = ring.all_reduce_sum(&mut [1.0f32; 10]).await.unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains("gone"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }
}
