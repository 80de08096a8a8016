//! The ring over raw TCP: one connection to the next rank, one from the previous, each
//! operation a reduce-scatter then an all-gather of `world` chunks. Within a step a second
//! thread sends one chunk while this one receives another in pieces and adds each piece as it
//! lands. Buffers are reused, every frame has a small header (operation number and length, so
//! ranks that fell out of step fail instead of mixing data), and a reset or closed connection
//! fails the operation at once.
//!
//! Connections are made through the worker's collective listener (`Incoming`): a rank dials
//! the next rank's listener and says who it is (job, generation, rank); the listener hands the
//! connection to the task of that generation, which waits for it.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{add_bf16, add_f32, chunk, encode_bf16, encode_bf16_keep, store_bf16, Collective, Wire};
use crate::WorkerError;

const HELLO_MAGIC: &[u8; 8] = b"SHOALRNG";
const FRAME_MAGIC: u32 = 0x5348_4652; // "SHFR"
/// Connections parked for tasks that have not claimed them yet.
const MAX_PARKED: usize = 64;
/// Bytes received (and added) at a time.
/// Measured on loopback (64 MB, 2 ranks): 64 KiB beat 16 KiB, 256 KiB and 1 MiB by 3 to 8%:
/// the received piece is still in L1/L2 when it is added.
const PIECE: usize = 64 << 10;
/// How often blocking socket calls come back to look at the deadline and cancel flag.
const POLL: Duration = Duration::from_millis(200);

type Key = (u64, u64, u32);

/// The worker's listener for ring connections, and the connections waiting for their task.
pub struct Incoming {
    address: String,
    parked: Mutex<HashMap<Key, (TcpStream, Instant)>>,
    arrived: Condvar,
}

impl Incoming {
    /// Serves `listener` on a thread of its own for as long as the process lives.
    pub fn start(listener: TcpListener) -> std::io::Result<Arc<Incoming>> {
        let address = listener.local_addr()?.to_string();
        let me = Arc::new(Incoming { address, parked: Mutex::new(HashMap::new()), arrived: Condvar::new() });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new().name("ring-listener".into()).spawn(move || {
            for stream in listener.incoming() {
                let Some(me) = weak.upgrade() else { return };
                let Ok(stream) = stream else { continue };
                // A hello that does not come in time, or is not ours, closes the connection.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut hello = [0u8; 32];
                if (&stream).read_exact(&mut hello).is_err() || &hello[..8] != HELLO_MAGIC {
                    continue;
                }
                let job = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
                let generation = u64::from_le_bytes(hello[16..24].try_into().expect("8 bytes"));
                let from = u32::from_le_bytes(hello[24..28].try_into().expect("4 bytes"));
                let mut parked = me.parked.lock().expect("parked lock");
                if parked.len() >= MAX_PARKED {
                    // Unclaimed for a minute: a task that never came. Make room.
                    parked.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
                }
                if parked.len() < MAX_PARKED {
                    parked.insert((job, generation, from), (stream, Instant::now()));
                    me.arrived.notify_all();
                }
            }
        })?;
        Ok(me)
    }

    /// The address peers dial.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn take(&self, key: Key, deadline: Instant, cancel: &AtomicBool) -> Result<TcpStream, WorkerError> {
        let mut parked = self.parked.lock().expect("parked lock");
        loop {
            if let Some((s, _)) = parked.remove(&key) {
                return Ok(s);
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(WorkerError::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WorkerError::Collective(format!("rank {} did not connect (job {}, generation {})", key.2, key.0, key.1)));
            }
            parked = self.arrived.wait_timeout(parked, (deadline - now).min(POLL)).expect("parked lock").0;
        }
    }
}

/// One rank's view of a TCP ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To the next rank, from the previous one (None alone).
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    timeout: Duration,
    wire: Wire,
    cancel: Arc<AtomicBool>,
    seq: u64,
    /// bf16 values on their way out; received words (u32 keeps f32 alignment).
    send_scratch: Vec<u16>,
    recv_scratch: Vec<u32>,
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
fn write_all(s: &mut TcpStream, mut bytes: &[u8], peer: usize, deadline: Instant, cancel: &AtomicBool) -> Result<(), WorkerError> {
    while !bytes.is_empty() {
        match s.write(bytes) {
            Ok(0) => return Err(io_err("sending to", peer, ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(io_err("sending to", peer, e)),
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(WorkerError::Collective(format!("timed out sending to rank {peer}")));
        }
    }
    Ok(())
}

/// Fills all of `buf` likewise.
fn read_all(s: &mut TcpStream, buf: &mut [u8], peer: usize, deadline: Instant, cancel: &AtomicBool) -> Result<(), WorkerError> {
    let mut filled = 0;
    while filled < buf.len() {
        match s.read(&mut buf[filled..]) {
            Ok(0) => return Err(io_err("receiving from", peer, ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(io_err("receiving from", peer, e)),
        }
        if filled < buf.len() {
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
    /// previous rank's connection on this worker's `incoming`.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        rank: usize,
        peers: &[String],
        job: u64,
        generation: u64,
        incoming: &Incoming,
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
        let mut ring = TcpRing { rank, world, next: None, prev: None, timeout, wire, cancel, seq: 0, send_scratch: Vec::new(), recv_scratch: Vec::new() };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let addr = &peers[next_rank];
        let mut next = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline && !ring.cancel.load(Ordering::Relaxed) => {
                    tracing::debug!(%addr, error = %e, "ring peer not listening yet");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) if ring.cancel.load(Ordering::Relaxed) => return Err(WorkerError::Cancelled),
                Err(e) => return Err(WorkerError::Collective(format!("cannot reach rank {next_rank} at {addr}: {e}"))),
            }
        };
        let mut hello = [0u8; 32];
        hello[..8].copy_from_slice(HELLO_MAGIC);
        hello[8..16].copy_from_slice(&job.to_le_bytes());
        hello[16..24].copy_from_slice(&generation.to_le_bytes());
        hello[24..28].copy_from_slice(&(rank as u32).to_le_bytes());
        hello[28..32].copy_from_slice(&(world as u32).to_le_bytes());
        next.write_all(&hello).map_err(|e| io_err("greeting", next_rank, e))?;
        let prev_rank = (rank + world - 1) % world;
        let prev = incoming.take((job, generation, prev_rank as u32), deadline, &ring.cancel)?;
        for s in [&next, &prev] {
            s.set_nodelay(true).map_err(|e| WorkerError::Collective(e.to_string()))?;
            s.set_read_timeout(Some(POLL)).map_err(|e| WorkerError::Collective(e.to_string()))?;
            s.set_write_timeout(Some(POLL)).map_err(|e| WorkerError::Collective(e.to_string()))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
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
        let (send_scratch, recv_scratch) = (&mut self.send_scratch, &mut self.recv_scratch);
        std::thread::scope(|sc| {
            let sender = sc.spawn(move || -> Result<(), WorkerError> {
                write_all(next, &header(seq, (send.len() * elem) as u64), next_rank, deadline, cancel)?;
                match wire {
                    Wire::F32 => write_all(next, f32_bytes(send), next_rank, deadline, cancel),
                    Wire::Bf16 => {
                        for piece in send.chunks_mut(PIECE / 2) {
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
            });
            let received = (|| -> Result<(), WorkerError> {
                let mut h = [0u8; 20];
                read_all(prev, &mut h, prev_rank, deadline, cancel)?;
                let (magic, got_seq, len) = (
                    u32::from_le_bytes(h[..4].try_into().expect("4 bytes")),
                    u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
                    u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")),
                );
                if magic != FRAME_MAGIC || got_seq != seq || len != (recv.len() * elem) as u64 {
                    return Err(WorkerError::Collective(format!(
                        "rank {prev_rank} is out of step: operation {got_seq} with {len} bytes, expected operation {seq} with {}",
                        recv.len() * elem
                    )));
                }
                if wire == Wire::F32 && !add {
                    return read_all(prev, bytemuck::cast_slice_mut(recv), prev_rank, deadline, cancel);
                }
                for piece in recv.chunks_mut(PIECE / elem) {
                    let bytes = piece.len() * elem;
                    recv_scratch.resize(bytes.div_ceil(4), 0);
                    let raw: &mut [u8] = bytemuck::cast_slice_mut(&mut recv_scratch[..]);
                    read_all(prev, &mut raw[..bytes], prev_rank, deadline, cancel)?;
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
            })();
            let sent = sender.join().unwrap_or_else(|_| Err(WorkerError::Collective("the ring's sender thread panicked".into())));
            received.and(sent)
        })
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
        for s in 0..n - 1 {
            let (send_c, recv_c) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
            let (send, recv) = two(buf, chunk(len, n, send_c), chunk(len, n, recv_c));
            self.step(send, recv, true, false)?;
        }
        for s in 0..n - 1 {
            let (send_c, recv_c) = ((r + 1 + n - s) % n, (r + n - s) % n);
            let (send, recv) = two(buf, chunk(len, n, send_c), chunk(len, n, recv_c));
            // The first all-gather step sends this rank's reduced chunk: with bf16 it keeps the
            // rounded values it sends, so every rank ends with the same bits.
            self.step(send, recv, false, s == 0)?;
        }
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let (n, r) = (self.world, self.rank);
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
            let send = &out[send_b];
            let got = std::thread::scope(|sc| {
                let sender = sc.spawn(move || -> Result<(), WorkerError> {
                    write_all(next, &header(seq, send.len() as u64), next_rank, deadline, cancel)?;
                    write_all(next, send, next_rank, deadline, cancel)
                });
                let received = (|| -> Result<Vec<u8>, WorkerError> {
                    let mut h = [0u8; 20];
                    read_all(prev, &mut h, prev_rank, deadline, cancel)?;
                    let got_seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
                    let len = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
                    if u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) != FRAME_MAGIC || got_seq != seq || len > 64 << 20 {
                        return Err(WorkerError::Collective(format!("rank {prev_rank} is out of step: operation {got_seq}, expected {seq}")));
                    }
                    let mut data = vec![0u8; len as usize];
                    read_all(prev, &mut data, prev_rank, deadline, cancel)?;
                    Ok(data)
                })();
                let sent = sender.join().unwrap_or_else(|_| Err(WorkerError::Collective("the ring's sender thread panicked".into())));
                received.and_then(|d| sent.map(|_| d))
            })?;
            out[recv_b] = got;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{reference_sum, testing::inputs};
    use super::*;

    use super::super::testing::tcp_rings as rings;

    fn reduce_all(rings: Vec<TcpRing>, data: &[Vec<f32>]) -> Vec<Vec<f32>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = rings
                .into_iter()
                .zip(data)
                .map(|(mut ring, d)| {
                    s.spawn(move || {
                        let mut buf = d.clone();
                        ring.all_reduce(&mut buf).unwrap();
                        let gathered = ring.all_gather_bytes(vec![ring.rank() as u8; ring.rank() + 3]).unwrap();
                        assert_eq!(gathered.iter().map(Vec::len).collect::<Vec<_>>(), (0..ring.world()).map(|r| r + 3).collect::<Vec<_>>());
                        buf
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
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
