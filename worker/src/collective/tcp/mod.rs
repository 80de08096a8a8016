//! The ring over raw TCP: one connection to the next rank, one from the previous, each
//! operation a reduce-scatter then an all-gather of `world` chunks. Within a step the ring's
//! sender thread (`sender`) sends one chunk while this one receives another in pieces and adds
//! each piece as it lands. Buffers are reused, every frame has a small header (operation number and length, so
//! ranks that fell out of step fail instead of mixing data), and a reset or closed connection
//! fails the operation at once.
//!
//! Connections come through the worker's listener for them (`incoming`).

mod incoming;

use std::io::{ErrorKind, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use incoming::{decode_hello, encode_hello, Incoming};
use incoming::{read_exact_by, Hello, MAX_WORLD};
use super::sender::SendThread;
use super::secure::{hello_proof, Link, RingKey};
use super::{add_bf16, add_f32, chunk, encode_bf16, encode_bf16_keep, store_bf16, Collective, OnPiece, Wire, MAX_GATHER_BYTES};
use crate::WorkerError;

const FRAME_MAGIC: u32 = 0x5348_4652; // "SHFR"
/// One attempt to connect to the next rank (retried until the collective timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes received (and added) at a time.
/// Measured on loopback (64 MB, 2 ranks): 64 KiB beat 16 KiB, 256 KiB and 1 MiB by 3 to 8%:
/// the received piece is still in L1/L2 when it is added.
const PIECE: usize = 64 << 10;
/// bf16 bytes encoded per write: four receive pieces, a quarter of the system calls.
const SEND_BATCH: usize = 4 * PIECE;
/// How often blocking socket calls come back to look at the deadline and cancel flag.
const POLL: Duration = Duration::from_millis(200);


/// One rank's view of a TCP ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To the next rank, from the previous one (None alone).
    next: Option<Link>,
    prev: Option<Link>,
    timeout: Duration,
    wire: Wire,
    cancel: Arc<AtomicBool>,
    seq: u64,
    /// bf16 values on their way out; received words (u32 keeps f32 alignment).
    send_scratch: Vec<u16>,
    recv_scratch: Vec<u32>,
    /// Sends each step's chunk while this thread receives (None alone).
    sender: Option<SendThread>,
}

fn io_err(what: &str, peer: usize, e: std::io::Error) -> WorkerError {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            WorkerError::PeerGone(format!("rank {peer} is gone ({what}: {e})"))
        }
        _ => WorkerError::Collective(format!("{what} rank {peer}: {e}")),
    }
}

/// Writes all of `bytes`, coming back every `POLL` to check the deadline and cancel flag.
/// (Then flushes: a TLS link may hold sealed records back.)
fn write_all(s: &mut Link, mut bytes: &[u8], peer: usize, deadline: Instant, cancel: &AtomicBool) -> Result<(), WorkerError> {
    loop {
        let progressed = if bytes.is_empty() {
            match s.flush() {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => false,
                Err(e) => return Err(io_err("sending to", peer, e)),
            }
        } else {
            match s.write(bytes) {
                Ok(0) => return Err(io_err("sending to", peer, ErrorKind::WriteZero.into())),
                Ok(n) => {
                    bytes = &bytes[n..];
                    true
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => false,
                Err(e) => return Err(io_err("sending to", peer, e)),
            }
        };
        if !progressed || !bytes.is_empty() {
            if cancel.load(Ordering::Relaxed) {
                return Err(WorkerError::Cancelled);
            }
            if Instant::now() >= deadline {
                return Err(WorkerError::Collective(format!("timed out sending to rank {peer}")));
            }
        }
    }
}

/// Fills all of `buf` likewise.
fn read_all(s: &mut Link, buf: &mut [u8], peer: usize, deadline: Instant, cancel: &AtomicBool) -> Result<(), WorkerError> {
    let want = buf.len();
    read_all_spare(s, buf, want, peer, deadline, cancel)
}

/// Fills `buf[..want]`; the bytes after it are the link's scratch (`Link::read_spare`).
fn read_all_spare(s: &mut Link, buf: &mut [u8], want: usize, peer: usize, deadline: Instant, cancel: &AtomicBool) -> Result<(), WorkerError> {
    let mut filled = 0;
    while filled < want {
        match s.read_spare(&mut buf[filled..], want - filled) {
            Ok(0) => return Err(io_err("receiving from", peer, ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(io_err("receiving from", peer, e)),
        }
        if filled < want {
            if cancel.load(Ordering::Relaxed) {
                return Err(WorkerError::Cancelled);
            }
            if Instant::now() >= deadline {
                return Err(WorkerError::Collective(format!("timed out waiting for rank {peer}")));
            }
        }
    }
    Ok(())
}


/// Connects to `addr`, each try bounded (an address that drops packets would otherwise block
/// for minutes, past the collective's deadline).
fn dial(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(ErrorKind::NotFound, "the address resolves to nothing");
    for a in addr.to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        match TcpStream::connect_timeout(&a, left.min(CONNECT_TIMEOUT)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn header(seq: u64, len: u64) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12..20].copy_from_slice(&len.to_le_bytes());
    h
}

fn f32_bytes(xs: &[f32]) -> &[u8] {
    bytemuck::cast_slice(xs)
}

/// Splits `buf` into the two disjoint ranges `a` (shared) and `b` (mutable).
fn two(buf: &mut [f32], a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> (&mut [f32], &mut [f32]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        debug_assert!(b.end <= a.start, "overlapping chunks");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

impl TcpRing {
    /// Joins the ring of (job, generation): dials the next rank's listener (`peers[rank+1]`,
    /// retrying until `timeout` runs out, since it may not be listening yet) and waits for the
    /// previous rank's connection on this worker's `incoming`. With `ring_key`, over TLS
    /// (the listener's configuration) with a proof of membership.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        rank: usize,
        peers: &[String],
        job: u64,
        generation: u64,
        incoming: &Incoming,
        ring_key: Option<&RingKey>,
        timeout: Duration,
        wire: Wire,
        cancel: Arc<AtomicBool>,
    ) -> Result<TcpRing, WorkerError> {
        if cfg!(target_endian = "big") {
            return Err(WorkerError::Collective("the tcp transport sends little-endian floats as they are in memory".into()));
        }
        let world = peers.len();
        if rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} outside a world of {world}")));
        }
        if world > MAX_WORLD as usize {
            return Err(WorkerError::Collective(format!("a ring of {world} ranks is more than the {MAX_WORLD} a hello can announce")));
        }
        let mut ring = TcpRing { rank, world, next: None, prev: None, timeout, wire, cancel, seq: 0, send_scratch: Vec::new(), recv_scratch: Vec::new(), sender: None };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let addr = &peers[next_rank];
        let next = loop {
            match dial(addr, deadline) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline && !ring.cancel.load(Ordering::Relaxed) => {
                    tracing::debug!(%addr, error = %e, "ring peer not listening yet");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) if ring.cancel.load(Ordering::Relaxed) => return Err(WorkerError::Cancelled),
                Err(e) => return Err(WorkerError::Collective(format!("cannot reach rank {next_rank} at {addr}: {e}"))),
            }
        };
        let mut next = match (&incoming.tls, ring_key) {
            (Some(tls), Some(_)) => tls.connect(next, deadline).map_err(|e| WorkerError::Collective(format!("TLS with rank {next_rank} at {addr}: {e}")))?,
            (None, None) => Link::Plain(next),
            (Some(_), None) => return Err(WorkerError::Collective("this worker's ring speaks TLS, and its assignment brought no ring key".into())),
            (None, Some(_)) => return Err(WorkerError::Collective("a ring key, and no TLS to prove it on (a worker without credentials in a cluster with them)".into())),
        };
        let hello = Hello { job, generation, rank: rank as u32, world: world as u32 }.encode();
        let mut greeting = hello.to_vec();
        if let (Some(key), Some(binding)) = (ring_key, next.binding()) {
            greeting.extend_from_slice(&hello_proof(key, &binding, &hello));
        }
        write_all(&mut next, &greeting, next_rank, deadline, &ring.cancel)?;
        if next.is_tls() {
            // The listener's acknowledgement: it has read the greeting, and rustls on either
            // side holds nothing more, so the keys can come out of it.
            read_exact_by(&mut next, &mut [0u8; 1], deadline).map_err(|e| WorkerError::Collective(format!("rank {next_rank} at {addr}: {e}")))?;
            next = next.seal().map_err(|e| WorkerError::Collective(format!("rank {next_rank} at {addr}: {e}")))?;
        }
        let prev_rank = (rank + world - 1) % world;
        let prev = incoming.take((job, generation, prev_rank as u32), world, ring_key, deadline, &ring.cancel)?;
        for s in [next.tcp(), prev.tcp()] {
            large_buffers(s);
            s.set_nodelay(true).map_err(|e| WorkerError::Collective(e.to_string()))?;
            s.set_read_timeout(Some(POLL)).map_err(|e| WorkerError::Collective(e.to_string()))?;
            s.set_write_timeout(Some(POLL)).map_err(|e| WorkerError::Collective(e.to_string()))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        ring.sender = Some(SendThread::start()?);
        Ok(ring)
    }

    fn peers(&self) -> (usize, usize) {
        ((self.rank + 1) % self.world, (self.rank + self.world - 1) % self.world)
    }

    /// One reduce-scatter or all-gather step: sends `send` to the next rank on a second
    /// thread while receiving the previous rank's chunk into `recv`, added (`add`) or stored.
    /// With bf16 and `keep_sent`, `send` is also overwritten with the rounded values it sends
    /// (the owner of a reduced chunk keeps what the others receive).
    fn step(&mut self, send: &mut [f32], recv: &mut [f32], add: bool, keep_sent: bool) -> Result<(), WorkerError> {
        let deadline = Instant::now() + self.timeout;
        let (next_rank, prev_rank) = self.peers();
        let (seq, wire, cancel) = (self.seq, self.wire, &*self.cancel);
        let elem = if wire == Wire::Bf16 { 2 } else { 4 };
        let (next, prev) = (self.next.as_mut().expect("a ring of 2+"), self.prev.as_mut().expect("a ring of 2+"));
        let sender = self.sender.as_mut().expect("a ring of 2+");
        let (send_scratch, recv_scratch) = (&mut self.send_scratch, &mut self.recv_scratch);
        let (received, sent) = sender.both(
            move || -> Result<(), WorkerError> {
                write_all(next, &header(seq, (send.len() * elem) as u64), next_rank, deadline, cancel)?;
                match wire {
                    Wire::F32 => write_all(next, f32_bytes(send), next_rank, deadline, cancel),
                    Wire::Bf16 => {
                        for piece in send.chunks_mut(SEND_BATCH / 2) {
                            send_scratch.resize(piece.len(), 0);
                            if keep_sent {
                                encode_bf16_keep(send_scratch, piece);
                            } else {
                                encode_bf16(send_scratch, piece);
                            }
                            write_all(next, bytemuck::cast_slice(send_scratch), next_rank, deadline, cancel)?;
                        }
                        Ok(())
                    }
                }
            },
            || -> Result<(), WorkerError> {
                read_header(prev, seq, recv.len() * elem, prev_rank, deadline, cancel)?;
                if wire == Wire::F32 && !add {
                    return read_all(prev, bytemuck::cast_slice_mut(recv), prev_rank, deadline, cancel);
                }
                for piece in recv.chunks_mut(PIECE / elem) {
                    let bytes = piece.len() * elem;
                    // One spare byte: over TLS, a piece's last record opens in place too.
                    recv_scratch.resize((bytes + 1).div_ceil(4), 0);
                    let raw: &mut [u8] = bytemuck::cast_slice_mut(&mut recv_scratch[..]);
                    read_all_spare(prev, raw, bytes, prev_rank, deadline, cancel)?;
                    // One plain loop per case, so that each vectorizes.
                    match (wire, add) {
                        (Wire::F32, _) => {
                            let values: &[f32] = bytemuck::cast_slice(&recv_scratch[..piece.len()]);
                            add_f32(piece, values);
                        }
                        (Wire::Bf16, true) => {
                            let values: &[u16] = &bytemuck::cast_slice(&recv_scratch[..])[..piece.len()];
                            add_bf16(piece, values);
                        }
                        (Wire::Bf16, false) => {
                            let values: &[u16] = &bytemuck::cast_slice(&recv_scratch[..])[..piece.len()];
                            store_bf16(piece, values);
                        }
                    }
                }
                Ok(())
            },
        );
        received.and(sent)
    }

    /// The reduce-scatter's `world - 1` steps: afterwards this rank holds chunk `rank + 1`
    /// summed over every rank.
    fn reduce_steps(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        let (n, r, len) = (self.world, self.rank, buf.len());
        for s in 0..n - 1 {
            let (send_c, recv_c) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
            let (send, recv) = two(buf, chunk(len, n, send_c), chunk(len, n, recv_c));
            self.step(send, recv, true, false)?;
        }
        Ok(())
    }

    /// One all-gather step of `all_gather_from` (f32 on the wire): sends the final chunk
    /// `send` on a second thread while receiving the next one into `recv` (from `recv_at`
    /// on), handing each piece to `each` as it lands. `own`: where `send` starts when it is
    /// this rank's own chunk, handed to `each` first (the sender only reads it).
    fn gather_step(&mut self, send: &[f32], own: Option<usize>, recv: &mut [f32], recv_at: usize, each: &mut OnPiece) -> Result<(), WorkerError> {
        let deadline = Instant::now() + self.timeout;
        let (next_rank, prev_rank) = self.peers();
        let (seq, cancel) = (self.seq, &*self.cancel);
        let (next, prev) = (self.next.as_mut().expect("a ring of 2+"), self.prev.as_mut().expect("a ring of 2+"));
        let sender = self.sender.as_mut().expect("a ring of 2+");
        let (received, sent) = sender.both(
            move || -> Result<(), WorkerError> {
                write_all(next, &header(seq, (send.len() * 4) as u64), next_rank, deadline, cancel)?;
                write_all(next, f32_bytes(send), next_rank, deadline, cancel)
            },
            || -> Result<(), WorkerError> {
                if let Some(at) = own {
                    each(at..at + send.len(), send)?;
                }
                read_header(prev, seq, recv.len() * 4, prev_rank, deadline, cancel)?;
                // Each piece is read with the rest of `recv` behind it as the link's scratch
                // (not yet received, so nothing is lost): over TLS, every record opens in place.
                let mut i = 0;
                while i < recv.len() {
                    let n = (PIECE / 4).min(recv.len() - i);
                    read_all_spare(prev, bytemuck::cast_slice_mut(&mut recv[i..]), n * 4, prev_rank, deadline, cancel)?;
                    each(recv_at + i..recv_at + i + n, &recv[i..i + n])?;
                    i += n;
                }
                Ok(())
            },
        );
        received.and(sent)
    }
}

/// Reads a frame's header and checks it: operation `seq`, `bytes` long.
fn read_header(prev: &mut Link, seq: u64, bytes: usize, prev_rank: usize, deadline: Instant, cancel: &AtomicBool) -> Result<(), WorkerError> {
    let mut h = [0u8; 20];
    read_all(prev, &mut h, prev_rank, deadline, cancel)?;
    let (magic, got_seq, len) = (
        u32::from_le_bytes(h[..4].try_into().expect("4 bytes")),
        u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
        u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")),
    );
    if magic != FRAME_MAGIC || got_seq != seq || len != bytes as u64 {
        return Err(WorkerError::Collective(format!("rank {prev_rank} is out of step: operation {got_seq} with {len} bytes, expected operation {seq} with {bytes}")));
    }
    Ok(())
}

/// Socket buffers of 4 MB each way (the kernel's default ceiling, `net.core.[rw]mem_max`):
/// between hosts a step's chunk must fit the window of one round trip, and autotuning grows
/// the window only while data flows, which a ring idle between steps keeps small. Measured
/// across test hosts with 5 ms one way: the demo's MLP 4.5k to 5.6k samples/s; loopback
/// unchanged. Best effort: a refusal leaves the kernel's defaults.
fn large_buffers(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket and a c_int option value of the right length.
        let rc = unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, opt, &size as *const libc::c_int as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
        if rc != 0 {
            tracing::debug!(opt, error = %std::io::Error::last_os_error(), "could not enlarge a ring socket's buffer");
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn name(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        let (n, r) = (self.world, self.rank);
        if n == 1 {
            return Ok(());
        }
        self.seq += 1;
        let len = buf.len();
        self.reduce_steps(buf)?;
        for s in 0..n - 1 {
            let (send_c, recv_c) = ((r + 1 + n - s) % n, (r + n - s) % n);
            let (send, recv) = two(buf, chunk(len, n, send_c), chunk(len, n, recv_c));
            // The first all-gather step sends this rank's reduced chunk: with bf16 it keeps the
            // rounded values it sends, so every rank ends with the same bits.
            self.step(send, recv, false, s == 0)?;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, buf: &mut [f32]) -> Result<Range<usize>, WorkerError> {
        let (n, r, len) = (self.world, self.rank, buf.len());
        // With bf16 the owner of a chunk keeps the rounded values it sends: a whole operation.
        if n == 1 || self.wire != Wire::F32 {
            self.all_reduce(buf)?;
            return Ok(0..len);
        }
        self.seq += 1;
        self.reduce_steps(buf)?;
        // The last chunk this rank added to is the one it now holds in full.
        Ok(chunk(len, n, (r + 1) % n))
    }

    fn all_gather_from(&mut self, buf: &mut [f32], mine: Range<usize>, each: &mut OnPiece) -> Result<(), WorkerError> {
        let (n, r, len) = (self.world, self.rank, buf.len());
        if mine == (0..len) {
            return each(mine, buf);
        }
        if self.wire != Wire::F32 || mine != chunk(len, n, (r + 1) % n) {
            return Err(WorkerError::Collective(format!("an all-gather from {mine:?} of {len} after no reduce-scatter of this ring")));
        }
        self.seq += 1;
        for s in 0..n - 1 {
            let (send_c, recv_c) = ((r + 1 + n - s) % n, (r + n - s) % n);
            let (send_r, recv_r) = (chunk(len, n, send_c), chunk(len, n, recv_c));
            let recv_at = recv_r.start;
            let own = (s == 0).then_some(send_r.start);
            let (send, recv) = two(buf, send_r, recv_r);
            self.gather_step(send, own, recv, recv_at, each)?;
        }
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let (n, r) = (self.world, self.rank);
        if mine.len() > MAX_GATHER_BYTES {
            return Err(WorkerError::Collective(format!("{} bytes is more than one all-gather carries ({MAX_GATHER_BYTES})", mine.len())));
        }
        let mut out = vec![Vec::new(); n];
        out[r] = mine;
        if n == 1 {
            return Ok(out);
        }
        self.seq += 1;
        let deadline = Instant::now() + self.timeout;
        let (next_rank, prev_rank) = self.peers();
        let seq = self.seq;
        for s in 0..n - 1 {
            let (send_b, recv_b) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
            let (next, prev, cancel) = (self.next.as_mut().expect("ring"), self.prev.as_mut().expect("ring"), &*self.cancel);
            let sender = self.sender.as_mut().expect("ring");
            let send = &out[send_b];
            let (received, sent) = sender.both(
                move || -> Result<(), WorkerError> {
                    write_all(next, &header(seq, send.len() as u64), next_rank, deadline, cancel)?;
                    write_all(next, send, next_rank, deadline, cancel)
                },
                || -> Result<Vec<u8>, WorkerError> {
                    let mut h = [0u8; 20];
                    read_all(prev, &mut h, prev_rank, deadline, cancel)?;
                    let got_seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
                    let len = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
                    if u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) != FRAME_MAGIC || got_seq != seq {
                        return Err(WorkerError::Collective(format!("rank {prev_rank} is out of step: operation {got_seq}, expected {seq}")));
                    }
                    // The peer's length decides an allocation: bounded first.
                    if len > MAX_GATHER_BYTES as u64 {
                        return Err(WorkerError::Collective(format!(
                            "rank {prev_rank} sent an all-gather block of {len} bytes, more than the {MAX_GATHER_BYTES} one carries"
                        )));
                    }
                    let mut data = vec![0u8; len as usize];
                    read_all(prev, &mut data, prev_rank, deadline, cancel)?;
                    Ok(data)
                },
            );
            let got = received.and_then(|d| sent.map(|_| d))?;
            out[recv_b] = got;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::super::{reference_sum, testing::inputs};
    use super::incoming::{Key, HELLO_LEN, HELLO_TIMEOUT, MAX_HANDSHAKES};
    use super::*;
    use std::io::Read;

    use super::super::testing::tcp_rings as rings;

    /// Every rank all-reduces its buffer, then all-gathers bytes of a length of its own.
    fn reduce_all(rings: Vec<TcpRing>, data: &[Vec<f32>]) -> Vec<Vec<f32>> {
        super::super::testing::all_reduce_each_then(rings, data, |ring| {
            let gathered = ring.all_gather_bytes(vec![ring.rank() as u8; ring.rank() + 3]).unwrap();
            assert_eq!(gathered.iter().map(Vec::len).collect::<Vec<_>>(), (0..ring.world()).map(|r| r + 3).collect::<Vec<_>>());
        })
    }

    #[test]
    fn every_rank_gets_the_reference_sum_bit_for_bit() {
        for world in [2usize, 3, 5] {
            for len in [1usize, 2, 7, 1001, 300_017] {
                let data = inputs(world, len, (world * 1_000_003 + len) as u64);
                let out = reduce_all(rings(world, Wire::F32, Duration::from_secs(10)), &data);
                let want = reference_sum(&data);
                for (r, got) in out.iter().enumerate() {
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world}, len {len}: rank {r} differs from the reference");
                }
            }
        }
    }

    /// The two halves with a control all-gather between them, as a training step does them:
    /// the reference sum on every rank, and `each` sees every element once, already final.
    #[test]
    fn the_halves_give_the_reference_sum_and_hand_each_final_piece_once() {
        for (world, wire) in [(2usize, Wire::F32), (3, Wire::F32), (2, Wire::Bf16)] {
            for len in [2usize, 1001, 100_003] {
                let data = inputs(world, len, (world * 7 + len) as u64);
                let rs = rings(world, wire, Duration::from_secs(10));
                type Seen = Vec<(Range<usize>, Vec<f32>)>;
                let out: Vec<(Vec<f32>, Seen)> = std::thread::scope(|s| {
                    let hs: Vec<_> = rs
                        .into_iter()
                        .zip(&data)
                        .map(|(mut ring, d)| {
                            s.spawn(move || {
                                let mut buf = d.clone();
                                let mine = ring.reduce_scatter(&mut buf).unwrap();
                                ring.all_gather_bytes(vec![ring.rank() as u8]).unwrap();
                                let mut seen = Vec::new();
                                ring.all_gather_from(&mut buf, mine, &mut |r, g| {
                                    seen.push((r, g.to_vec()));
                                    Ok(())
                                })
                                .unwrap();
                                (buf, seen)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let want = if wire == Wire::F32 { reference_sum(&data) } else { out[0].0.clone() };
                for (r, (got, mut seen)) in out.into_iter().enumerate() {
                    let what = format!("world {world}, {wire:?}, len {len}, rank {r}");
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: differs from the reference");
                    seen.sort_by_key(|(range, _)| range.start);
                    let mut next = 0;
                    for (range, values) in &seen {
                        assert_eq!(range.start, next, "{what}: pieces {seen:?} leave a gap or overlap", seen = seen.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
                        assert!(values.iter().zip(&want[range.clone()]).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {range:?} handed over before it was final");
                        next = range.end;
                    }
                    assert_eq!(next, len, "{what}");
                    if wire == Wire::F32 && len == 100_003 {
                        assert!(seen.len() > world, "{what}: the pieces are handed over as they land, not chunk by chunk");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_on_the_wire_gives_every_rank_the_same_bits() {
        for world in [2usize, 4] {
            let data = inputs(world, 10_007, 9);
            let out = reduce_all(rings(world, Wire::Bf16, Duration::from_secs(10)), &data);
            let exact = reference_sum(&data);
            for got in &out {
                assert!(got.iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "ranks differ");
                for (g, e) in got.iter().zip(&exact) {
                    let scale = data.iter().map(|d| d.iter().fold(0f32, |m, v| m.max(v.abs()))).fold(0f32, f32::max);
                    assert!((g - e).abs() <= scale * world as f32 / 64.0, "{g} vs {e}");
                }
            }
        }
    }

    fn listen() -> Arc<Incoming> {
        Incoming::start(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
    }

    fn no_cancel() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    /// Waits until `inc` has a connection parked under `key`.
    fn parked(inc: &Incoming, key: Key) {
        let until = Instant::now() + Duration::from_secs(5);
        while !inc.parked.lock().unwrap().contains_key(&key) {
            assert!(Instant::now() < until, "nothing parked under {key:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the listener closed `s` (end of stream or reset) within a few seconds.
    fn closed(s: &mut TcpStream) -> bool {
        s.set_read_timeout(Some(HELLO_TIMEOUT + Duration::from_secs(2))).unwrap();
        match s.read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
            Ok(_) => false,
        }
    }

    /// Rank r of `rings` (in rank order) contributes r + 1 everywhere.
    fn sums(rings: Vec<TcpRing>) -> Vec<Vec<f32>> {
        let data: Vec<Vec<f32>> = (0..rings.len()).map(|r| vec![r as f32 + 1.0; 10_001]).collect();
        super::super::testing::all_reduce_each(rings, &data)
    }

    #[test]
    fn hellos_are_checked_before_use() {
        let ok = Hello { job: 3, generation: 9, rank: 1, world: 2 };
        assert_eq!(Hello::decode(&ok.encode()), Ok(ok));
        for bad in [Hello { rank: 2, ..ok }, Hello { world: 1, rank: 0, ..ok }, Hello { world: MAX_WORLD + 1, ..ok }] {
            assert!(Hello::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        let mut b = ok.encode();
        b[0] = b'X';
        assert!(Hello::decode(&b).is_err());
        // On the wire: a hello naming a rank outside its ring is closed, nothing parked.
        let inc = listen();
        let mut s = TcpStream::connect(inc.address()).unwrap();
        s.write_all(&Hello { rank: 5, ..ok }.encode()).unwrap();
        assert!(closed(&mut s));
        assert!(inc.parked.lock().unwrap().is_empty());
    }

    #[test]
    fn silent_connections_do_not_delay_a_ring_join() {
        let incs = [listen(), listen()];
        let peers: Vec<String> = incs.iter().map(|i| i.address().to_string()).collect();
        // More silent connections than hellos are read at once, all before the ring's own.
        let mut silent: Vec<TcpStream> = (0..MAX_HANDSHAKES + 8).map(|_| TcpStream::connect(incs[0].address()).unwrap()).collect();
        silent.push(TcpStream::connect(incs[1].address()).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert!(incs[0].hello_threads.load(Ordering::Acquire) <= 2 * MAX_HANDSHAKES);
        let started = Instant::now();
        let rings: Vec<TcpRing> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let (peers, inc) = (&peers, &incs[r]);
                    s.spawn(move || TcpRing::connect(r, peers, 1, 1, inc, None, Duration::from_secs(10), Wire::F32, no_cancel()).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "the join took {took:?} behind silent connections (their deadline: {HELLO_TIMEOUT:?})");
        assert!(sums(rings).iter().all(|b| b.iter().all(|&x| x == 3.0)));
        // The silent ones are closed: the oldest made room for newer ones, the rest at their deadline.
        let last = silent.len() - 1;
        for i in [0, last - 1, last] {
            assert!(closed(&mut silent[i]), "silent connection {i} is still open");
        }
    }

    #[test]
    fn a_second_hello_for_a_waiting_rank_does_not_take_its_place() {
        let incs = [listen(), listen()];
        let peers: Vec<String> = incs.iter().map(|i| i.address().to_string()).collect();
        let (job, generation) = (4, 2);
        std::thread::scope(|s| {
            // Rank 1 dials rank 0 (its connection waits there) and waits for rank 0's.
            let one = s.spawn(|| TcpRing::connect(1, &peers, job, generation, &incs[1], None, Duration::from_secs(10), Wire::F32, no_cancel()).unwrap());
            parked(&incs[0], (job, generation, 1));
            // Someone else claims to be rank 1 of the same ring.
            let mut impostor = TcpStream::connect(incs[0].address()).unwrap();
            impostor.write_all(&Hello { job, generation, rank: 1, world: 2 }.encode()).unwrap();
            assert!(closed(&mut impostor), "the second connection must be refused");
            let zero = s.spawn(|| TcpRing::connect(0, &peers, job, generation, &incs[0], None, Duration::from_secs(10), Wire::F32, no_cancel()).unwrap());
            let rings = vec![zero.join().unwrap(), one.join().unwrap()];
            // The original pair works.
            assert!(sums(rings).iter().all(|b| b.iter().all(|&x| x == 3.0)));
        });
    }

    /// Rank 0 of a real ring whose rank 1 is this test on raw sockets: (ring, to rank 0, from rank 0).
    fn ring_with_a_raw_peer() -> (TcpRing, TcpStream, TcpStream) {
        let inc = listen();
        let raw = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![inc.address().to_string(), raw.local_addr().unwrap().to_string()];
        let mut to0 = TcpStream::connect(inc.address()).unwrap();
        to0.write_all(&Hello { job: 1, generation: 1, rank: 1, world: 2 }.encode()).unwrap();
        std::thread::scope(|s| {
            let ring = s.spawn(|| TcpRing::connect(0, &peers, 1, 1, &inc, None, Duration::from_secs(10), Wire::F32, no_cancel()).unwrap());
            let (mut from0, _) = raw.accept().unwrap();
            let mut hello = [0u8; HELLO_LEN];
            from0.read_exact(&mut hello).unwrap();
            assert_eq!(Hello::decode(&hello), Ok(Hello { job: 1, generation: 1, rank: 0, world: 2 }));
            (ring.join().unwrap(), to0, from0)
        })
    }

    #[test]
    fn an_oversized_length_from_a_peer_is_an_error_not_an_allocation() {
        for len in [1u64 << 40, u64::MAX, MAX_GATHER_BYTES as u64 + 1] {
            let (mut ring, mut to0, _from0) = ring_with_a_raw_peer();
            to0.write_all(&header(1, len)).unwrap();
            let started = Instant::now();
            let e = ring.all_gather_bytes(vec![1, 2, 3]).unwrap_err().to_string();
            assert!(e.contains("rank 1") && e.contains(&len.to_string()), "{e}");
            assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        }
        // An all-reduce frame must be exactly the chunk's size.
        let (mut ring, mut to0, _from0) = ring_with_a_raw_peer();
        to0.write_all(&header(1, u64::MAX)).unwrap();
        let e = ring.all_reduce(&mut vec![1.0; 1000]).unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains(&u64::MAX.to_string()), "{e}");
        // Nor may this rank send a block no transport carries.
        let (mut ring, _to0, _from0) = ring_with_a_raw_peer();
        assert!(ring.all_gather_bytes(vec![0; MAX_GATHER_BYTES + 1]).is_err());
    }

    #[test]
    fn a_dead_peer_fails_the_operation_at_once() {
        let mut rs = rings(3, Wire::F32, Duration::from_secs(30));
        let victim = rs.pop().unwrap();
        let started = Instant::now();
        drop(victim); // its sockets close: a reset or end of stream for its neighbours
        let errors: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = rs.into_iter().map(|mut r| s.spawn(move || r.all_reduce(&mut vec![1.0; 100_000]).unwrap_err().to_string())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(errors.iter().any(|e| e.contains("rank 2")), "{errors:?}");
    }
}
