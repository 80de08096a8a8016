//! Collectives between the ranks of one job generation, behind one trait, over three
//! transports:
//!
//! - `shm`: ranks on one host share a memory segment (chosen when every rank reports the
//!   same host);
//! - `tcp`: a ring of raw TCP connections, one per neighbour, pipelined in pieces;
//! - `grpc`: the ring over the `DataPlane` gRPC service (the first transport; kept as a
//!   fallback and for comparison);
//! - `hierarchical` (`hier`): ranks on several hosts, some hosts with several ranks: `shm`
//!   within each host, `tcp` between the hosts' leaders (its own documented order).
//!
//! The flat three sum in the same order, so a job's bits do not depend on which: the buffer
//! is cut into `world` chunks (`chunk`), and chunk c is summed starting from rank c's values,
//! then rank c+1's, ..., rank c-1's (`reference_sum`). Every rank ends with the very same
//! bytes. Every wait is bounded by the job's collective timeout, a dead peer is an error at
//! once where the transport can tell (a reset or closed connection, a gone process), and
//! every operation belongs to one (job, generation).

pub mod grpc;
pub mod hier;
pub mod shm;
pub mod secure;
mod sender;
pub mod tcp;

use std::ops::Range;

pub use grpc::{f32_le_bytes, DataPlaneService, GrpcCollective, Mailbox, Ring, CONNECTION_WINDOW, MAX_CHUNK_MESSAGE, MAX_FRAME, STREAM_WINDOW};
pub use shm::{remove_stale_segments, ShmRing};
pub use tcp::{Incoming, TcpRing};

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::WorkerError;

/// What `Collective::all_gather_from` hands each final range of the buffer to.
pub type OnPiece<'a> = dyn FnMut(Range<usize>, &[f32]) -> Result<(), WorkerError> + 'a;

/// What a rank does with its peers. Calls are collective: every rank of the generation makes
/// the same calls, in the same order, with buffers of the same length.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The transport's name (`shm`, `tcp`, `grpc`, `hierarchical`).
    fn name(&self) -> &'static str;
    /// For a transport made of others: (within a host, between hosts).
    fn parts(&self) -> Option<(&'static str, &'static str)> {
        None
    }
    /// In-place sum over all ranks, in the documented order; the same bits on every rank.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), WorkerError>;
    /// The first half of `all_reduce`, for a step that decides between the halves whether to
    /// go on (`train::step`): afterwards this rank holds the final sum for the range of `buf`
    /// it returns, and partial sums elsewhere. A transport without halves reduces all of
    /// `buf` and returns all of it.
    fn reduce_scatter(&mut self, buf: &mut [f32]) -> Result<Range<usize>, WorkerError> {
        self.all_reduce(buf)?;
        Ok(0..buf.len())
    }
    /// The second half, after `reduce_scatter` of the same `buf` returned `mine`: every
    /// rank's final range on every rank, so that `buf` ends as `all_reduce` leaves it. `each`
    /// sees each range of `buf` once, as soon as it is final (while the rest is still on the
    /// wire), the ranges covering `buf` exactly; in an order that depends on the transport and
    /// the rank. An error from `each` ends the operation (the ring is then unusable).
    fn all_gather_from(&mut self, buf: &mut [f32], mine: Range<usize>, each: &mut OnPiece) -> Result<(), WorkerError> {
        if mine != (0..buf.len()) {
            return Err(WorkerError::Collective(format!("{} reduces whole buffers: an all-gather from {mine:?} of {}", self.name(), buf.len())));
        }
        each(mine, buf)
    }
    /// Every rank's `mine`, indexed by rank, on every rank (small payloads).
    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), WorkerError> {
        self.all_gather_bytes(Vec::new()).map(|_| ())
    }
    /// Rank `root`'s `buf` on every rank.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), WorkerError> {
        let mut all = self.all_gather_bytes(if self.rank() == root { buf.clone() } else { Vec::new() })?;
        *buf = std::mem::take(&mut all[root]);
        Ok(())
    }
    /// Rank `root`'s `buf` on every rank, bit for bit (buffers of any size: sent in pieces
    /// that every transport's all-gather carries).
    fn broadcast_floats(&mut self, buf: &mut [f32], root: usize) -> Result<(), WorkerError> {
        const PIECE: usize = 128 << 10;
        for piece in buf.chunks_mut(PIECE) {
            let mut bytes = if self.rank() == root { f32_le_bytes(piece) } else { Vec::new() };
            self.broadcast(&mut bytes, root)?;
            if bytes.len() != piece.len() * 4 {
                return Err(WorkerError::Collective(format!("rank {root} broadcast {} bytes where {} were expected", bytes.len(), piece.len() * 4)));
            }
            for (x, b) in piece.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }
}

/// Chunk `c` of a buffer of `len` elements cut into `world` chunks.
pub fn chunk(len: usize, world: usize, c: usize) -> Range<usize> {
    (c * len / world)..((c + 1) * len / world)
}

/// The documented sum of `inputs` (one buffer per rank): for chunk c, rank c's values, plus
/// rank c+1's, ..., plus rank c-1's, left to right. What every transport computes.
pub fn reference_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let world = inputs.len();
    let len = inputs.first().map(Vec::len).unwrap_or(0);
    let mut out = vec![0.0f32; len];
    for c in 0..world {
        for i in chunk(len, world, c) {
            let mut acc = inputs[c][i];
            for k in 1..world {
                acc += inputs[(c + k) % world][i];
            }
            out[i] = acc;
        }
    }
    out
}

/// What travels on the wire between ranks (`[aggregation] wire`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    F32,
    /// Cast to bfloat16 when sending, added in f32; each chunk's owner keeps the rounded
    /// value it sent, so every rank still ends with the same bits.
    Bf16,
}

/// f32 to bfloat16, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    // Branch-free, so that loops over it vectorize: NaN stays a (quiet) NaN, everything else
    // rounds to nearest, ties to even.
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    (if x.is_nan() { nan } else { rounded }) as u16
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The element-wise loops of the transports, compiled for the baseline target and, on x86-64,
/// for AVX2 and AVX-512, picked at run time. Each element's result is one IEEE operation, the same
/// in every version, so the choice never changes a bit.
macro_rules! elementwise {
    ($(#[$doc:meta])* $name:ident($dst:ident: $dt:ty, $src:ident: $st:ty) $body:block) => {
        $(#[$doc])*
        pub fn $name($dst: $dt, $src: $st) {
            #[inline(always)]
            fn body($dst: $dt, $src: $st) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($dst: $dt, $src: $st) {
                body($dst, $src)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw")]
            fn avx512($dst: $dt, $src: $st) {
                body($dst, $src)
            }
            #[cfg(target_arch = "x86_64")]
            if shoal_kernels::simd_allows(shoal_kernels::Simd::Avx512) && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: the CPU has AVX-512 F and BW (checked just above).
                return unsafe { avx512($dst, $src) };
            }
            #[cfg(target_arch = "x86_64")]
            if shoal_kernels::simd_allows(shoal_kernels::Simd::Avx2) && std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { avx2($dst, $src) };
            }
            body($dst, $src)
        }
    };
}

elementwise! {
    /// `dst[i] += src[i]`.
    add_f32(dst: &mut [f32], src: &[f32]) { dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s) }
}
elementwise! {
    /// `dst[i] += src[i]`, and the sum also into `copy[i]` (`io` is `(copy, src)`): one pass
    /// where an add and then a copy would read `dst` twice.
    add_f32_and_copy(dst: &mut [f32], io: (&mut [f32], &[f32])) {
        let (copy, src) = io;
        dst.iter_mut().zip(copy.iter_mut()).zip(src).for_each(|((d, c), s)| {
            *d += *s;
            *c = *d;
        })
    }
}
elementwise! {
    /// `dst[i] += src[i]` for bfloat16 `src`.
    add_bf16(dst: &mut [f32], src: &[u16]) { dst.iter_mut().zip(src).for_each(|(d, &h)| *d += from_bf16(h)) }
}
elementwise! {
    /// `dst[i] = src[i]` for bfloat16 `src`.
    store_bf16(dst: &mut [f32], src: &[u16]) { dst.iter_mut().zip(src).for_each(|(d, &h)| *d = from_bf16(h)) }
}
elementwise! {
    /// `dst[i] = bf16(src[i])`.
    encode_bf16(dst: &mut [u16], src: &[f32]) { dst.iter_mut().zip(src).for_each(|(h, &x)| *h = to_bf16(x)) }
}
elementwise! {
    /// `dst[i] = bf16(src[i])`, and `src[i]` becomes the value `dst[i]` stands for.
    encode_bf16_keep(dst: &mut [u16], src: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(h, x)| {
            *h = to_bf16(*x);
            *x = from_bf16(*h);
        })
    }
}

/// The most bytes one rank may contribute to an all-gather, on every transport (what the shm
/// transport's gather slot holds beside its 8-byte length). A peer's length above it is an
/// error, never an allocation. All-gathers carry small records (state claims and headers,
/// checkpoint part records, pieces of `broadcast_floats`).
pub const MAX_GATHER_BYTES: usize = (1 << 20) - 8;

/// An id equal on processes that can share memory and see each other's pids: the kernel's
/// boot id, the device and inode of /dev/shm (containers with their own /dev/shm differ) and
/// the PID namespace (the shm transport checks its peers' pids for liveness, which means
/// nothing across namespaces, even when they share /dev/shm). `SHOAL_HOST_ID` overrides it
/// (tests use it to stand for several hosts on one machine). Empty when /dev/shm or the PID
/// namespace is unknown: such a worker never takes the shared-memory transport.
pub fn host_id() -> String {
    if let Ok(id) = std::env::var("SHOAL_HOST_ID") {
        return id;
    }
    use std::os::unix::fs::MetadataExt;
    let shm = std::fs::metadata("/dev/shm").ok().map(|m| (m.dev(), m.ino()));
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    host_id_of(&boot, shm, pid_namespace())
}

/// `host_id` from its inputs: the boot id, /dev/shm's (device, inode), the PID namespace's
/// inode.
fn host_id_of(boot: &str, shm: Option<(u64, u64)>, pid_ns: Option<u64>) -> String {
    let (Some((dev, ino)), Some(ns)) = (shm, pid_ns) else { return String::new() };
    format!("{}/{dev}/{ino}/pidns:{ns}", boot.trim())
}

/// The inode of this process's PID namespace (None without /proc).
pub(crate) fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Everything a rank needs to join its generation's collective.
pub struct Rendezvous<'a> {
    pub rank: usize,
    pub job: u64,
    pub generation: u64,
    /// `auto`, `shm`, `tcp` or `grpc` (the spec's `[aggregation] transport`).
    pub transport: &'a str,
    pub wire: Wire,
    /// Data-plane (gRPC) addresses, raw-TCP ring addresses and host ids, index = rank.
    pub peers: &'a [String],
    pub ring_peers: &'a [String],
    pub hosts: &'a [String],
    pub timeout: Duration,
    pub cancel: Arc<AtomicBool>,
    pub incoming: Option<&'a Incoming>,
    pub mailbox: Arc<Mailbox>,
    /// With credentials: the generation's ring key (the assignment's), and the TLS the gRPC
    /// ring dials with.
    pub ring_key: Option<secure::RingKey>,
    pub tls: Option<Arc<secure::DataPlaneTls>>,
    pub rt: tokio::runtime::Handle,
}

impl Rendezvous<'_> {
    /// Which transport `auto` (or the spec) picks for these ranks: shared memory when every
    /// rank reported the same host; hierarchical when the ranks span hosts and some host has
    /// several (the pair of ranks decides: shm within a host, tcp between hosts); raw TCP when
    /// every rank has a ring listener; else gRPC.
    pub fn choose(&self) -> Result<&'static str, WorkerError> {
        let world = self.peers.len();
        let known = self.hosts.len() == world && self.hosts.iter().all(|h| !h.is_empty());
        let one_host = known && self.hosts.iter().all(|h| *h == self.hosts[0]);
        let all_tcp = self.ring_peers.len() == world && self.ring_peers.iter().all(|a| !a.is_empty()) && self.incoming.is_some();
        let groups = if known { hier::host_groups(self.hosts) } else { Vec::new() };
        let shared_hosts = groups.len() > 1 && groups.iter().any(|g| g.len() > 1);
        match self.transport {
            "shm" if one_host => Ok("shm"),
            "shm" => Err(WorkerError::Collective("transport \"shm\" needs every rank on one host; these ranks are not".into())),
            "tcp" if all_tcp => Ok("tcp"),
            "tcp" => Err(WorkerError::Collective("transport \"tcp\": not every rank has a ring listener (an older worker?)".into())),
            "hierarchical" if shared_hosts && all_tcp => Ok("hierarchical"),
            "hierarchical" => Err(WorkerError::Collective(format!(
                "transport \"hierarchical\" needs ranks on several hosts with several ranks on one of them, each with a ring listener; these ranks are on {} host(s) ({} of {} known)",
                groups.len(),
                self.hosts.iter().filter(|h| !h.is_empty()).count(),
                world
            ))),
            "grpc" => Ok("grpc"),
            _ if one_host && self.wire == Wire::F32 => Ok("shm"),
            _ if shared_hosts && all_tcp => Ok("hierarchical"),
            _ if all_tcp => Ok("tcp"),
            _ => Ok("grpc"),
        }
    }

    /// Joins the generation's collective over the chosen transport.
    pub fn join(self) -> Result<Box<dyn Collective>, WorkerError> {
        let world = self.peers.len();
        match (&self.ring_key, &self.tls) {
            (Some(_), None) => return Err(WorkerError::Collective("the assignment brought a ring key, and this worker has no credentials to prove it with".into())),
            (None, Some(_)) => return Err(WorkerError::Collective("this worker's data plane speaks TLS, and its assignment brought no ring key".into())),
            _ => {}
        }
        // Segments that no generation can use any more (every process that mapped one is
        // gone, or this worker left that older generation of the job) go before a new one
        // is made: a job SIGKILLed on every rank leaves them behind.
        let removed = shm::remove_stale_segments_of(self.job, self.generation);
        if removed > 0 {
            tracing::info!(removed, job = self.job, generation = self.generation, "removed stale shared-memory segments");
        }
        Ok(match self.choose()? {
            "shm" => {
                // Every rank derives the same name; the peers' addresses keep two clusters on
                // one host (job ids restart at 1 in each) apart.
                let h = blake3::hash(format!("{:?}{:?}", self.peers, self.hosts).as_bytes()).to_hex();
                let name = format!("shoal-{}-{}-{}", self.job, self.generation, &h[..16]);
                Box::new(ShmRing::open(self.rank, world, &name, self.timeout, self.cancel)?)
            }
            "tcp" => Box::new(TcpRing::connect(
                self.rank,
                self.ring_peers,
                self.job,
                self.generation,
                self.incoming.expect("checked by choose"),
                self.ring_key.as_ref(),
                self.timeout,
                self.wire,
                self.cancel,
            )?),
            "hierarchical" => {
                let groups = hier::host_groups(self.hosts);
                let host = groups.iter().position(|g| g.contains(&self.rank)).expect("every rank is in a group");
                let local_rank = groups[host].iter().position(|&r| r == self.rank).expect("in its group");
                let local: Box<dyn Collective> = if groups[host].len() == 1 {
                    Box::new(hier::Solo)
                } else {
                    // The host's ranks derive the same name (the stale-segment cleaner's
                    // `shoal-<job>-<generation>-<hash>` form); other hosts' segments are in
                    // their own /dev/shm, but the host index in the hash keeps them apart anyway.
                    let h = blake3::hash(format!("{:?}{:?}{host}", self.peers, self.hosts).as_bytes()).to_hex();
                    let name = format!("shoal-{}-{}-{}", self.job, self.generation, &h[..16]);
                    Box::new(ShmRing::open(local_rank, groups[host].len(), &name, self.timeout, self.cancel.clone())?)
                };
                let leaders: Option<Box<dyn Collective>> = if local_rank == 0 {
                    let peers: Vec<String> = groups.iter().map(|g| self.ring_peers[g[0]].clone()).collect();
                    let incoming = self.incoming.expect("checked by choose");
                    Some(Box::new(TcpRing::connect(host, &peers, self.job, self.generation, incoming, self.ring_key.as_ref(), self.timeout, self.wire, self.cancel)?))
                } else {
                    None
                };
                Box::new(hier::Hierarchical::new(self.rank, world, groups, local, leaders)?)
            }
            _ => Box::new(GrpcCollective::new(Ring::new(self.rank, self.peers, self.job, self.generation, self.mailbox, self.timeout, self.cancel, self.ring_key.zip(self.tls.as_deref().map(|t| &t.files)))?, self.rt)),
        })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    #[cfg(test)]
    use super::{Incoming, TcpRing, Wire};
    #[cfg(test)]
    use std::sync::{atomic::AtomicBool, Arc};

    /// `world` ranks of a raw-TCP ring on loopback, in this process (for tests).
    #[cfg(test)]
    pub fn tcp_rings(world: usize, wire: Wire, timeout: std::time::Duration) -> Vec<TcpRing> {
        let incomings: Vec<Arc<Incoming>> = (0..world).map(|_| Incoming::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()).collect();
        let peers: Vec<String> = incomings.iter().map(|i| i.address().to_string()).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let (peers, inc) = (peers.clone(), incomings[r].clone());
                    s.spawn(move || TcpRing::connect(r, &peers, 1, 1, &inc, None, timeout, wire, Arc::new(AtomicBool::new(false))).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Each ring (in rank order) all-reduces its rank's buffer of `data`, on a thread of its
    /// own, then runs `after` on it (collectives every rank takes part in); the results in
    /// rank order.
    #[cfg(test)]
    pub fn all_reduce_each_then(rings: Vec<TcpRing>, data: &[Vec<f32>], after: impl Fn(&mut TcpRing) + Sync) -> Vec<Vec<f32>> {
        use super::Collective;
        let after = &after;
        std::thread::scope(|s| {
            let hs: Vec<_> = rings
                .into_iter()
                .zip(data)
                .map(|(mut ring, d)| {
                    s.spawn(move || {
                        let mut buf = d.clone();
                        ring.all_reduce(&mut buf).unwrap();
                        after(&mut ring);
                        buf
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// `all_reduce_each_then` with nothing after.
    #[cfg(test)]
    pub fn all_reduce_each(rings: Vec<TcpRing>, data: &[Vec<f32>]) -> Vec<Vec<f32>> {
        all_reduce_each_then(rings, data, |_| {})
    }

    /// Buffers of `len` pseudo-random values, one per rank, with a mix of magnitudes so the
    /// order of summation shows in the bits.
    pub fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = shoal_core::rng::SplitMix64::new(seed);
        (0..world).map(|_| (0..len).map(|_| (rng.next_f32() - 0.5) * 10f32.powi((rng.below(7) as i32) - 3)).collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_order_shows_in_the_bits() {
        // One element per chunk; element c is summed starting from rank c.
        let x = vec![vec![1e8f32, 1.0, -1e8], vec![1.0, 1e8, 1.0], vec![-1e8, -1e8, 1e8]];
        // Element 0: (1e8 + 1) - 1e8 = 0 in f32. Element 1, from rank 1: (1e8 - 1e8) + 1 = 1.
        // Element 2, from rank 2: (1e8 - 1e8) + 1 = 1 (rank 0 first would give 0).
        assert_eq!(reference_sum(&x), vec![0.0, 1.0, 1.0]);
        assert_eq!(chunk(2, 3, 0), 0..0, "a chunk may be empty");
        assert_eq!(chunk(10, 3, 2), 6..10);
    }

    #[test]
    fn host_ids_differ_across_pid_namespaces() {
        let shm = Some((64, 2));
        let a = host_id_of("boot\n", shm, Some(4026531836));
        assert_eq!(a, host_id_of("boot", shm, Some(4026531836)), "the same inputs, the same host");
        assert_ne!(a, host_id_of("boot", shm, Some(4026532290)), "one /dev/shm, another PID namespace: pids mean nothing across them");
        assert_ne!(a, host_id_of("boot", Some((64, 3)), Some(4026531836)));
        assert_ne!(a, host_id_of("other", shm, Some(4026531836)));
        assert_eq!(host_id_of("boot", shm, None), "", "an unknown PID namespace never takes shm");
        assert_eq!(host_id_of("boot", None, Some(1)), "");
        // This process's own id names its namespace.
        if let Some(ns) = pid_namespace() {
            if std::env::var("SHOAL_HOST_ID").is_err() && std::path::Path::new("/dev/shm").exists() {
                assert!(host_id().ends_with(&format!("/pidns:{ns}")), "{}", host_id());
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0, "a tie goes to even");
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        let x = 1.234_567_f32;
        assert!((from_bf16(to_bf16(x)) - x).abs() < x / 128.0);
    }

    #[test]
    fn the_elementwise_loops_match_the_scalar_operations_bit_for_bit() {
        // Every version this CPU has, the baseline included (the cap moves for the others
        // running meanwhile too: by this very property it changes nothing for them).
        for cap in [shoal_kernels::Simd::Baseline, shoal_kernels::Simd::Avx2, shoal_kernels::Simd::Avx512] {
            shoal_kernels::set_simd_cap(cap);
            elementwise_loops_match_the_scalar_operations();
        }
    }

    fn elementwise_loops_match_the_scalar_operations() {
        // Odd lengths (vector tails), NaN, infinities, ties and denormals.
        let mut rng = shoal_core::rng::SplitMix64::new(5);
        let mut xs: Vec<f32> = (0..1037).map(|_| f32::from_bits(rng.next_u64() as u32)).collect();
        xs.extend([f32::NAN, f32::INFINITY, -0.0, 1.0 + 1.0 / 256.0, f32::MIN_POSITIVE / 3.0]);
        let ys: Vec<f32> = (0..xs.len()).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));

        let mut h = vec![0u16; xs.len()];
        encode_bf16(&mut h, &xs);
        assert!(h.iter().zip(&xs).all(|(&h, &x)| h == to_bf16(x)));
        let mut d = ys.clone();
        add_f32(&mut d, &xs);
        assert!(same(&d, &ys.iter().zip(&xs).map(|(y, x)| y + x).collect::<Vec<_>>()));
        let (mut d2, mut copy) = (ys.clone(), vec![0.0; ys.len()]);
        add_f32_and_copy(&mut d2, (&mut copy, &xs));
        assert!(same(&d2, &d) && same(&copy, &d));
        let mut d = ys.clone();
        add_bf16(&mut d, &h);
        assert!(same(&d, &ys.iter().zip(&h).map(|(y, &h)| y + from_bf16(h)).collect::<Vec<_>>()));
        let mut d = ys.clone();
        store_bf16(&mut d, &h);
        assert!(same(&d, &h.iter().map(|&h| from_bf16(h)).collect::<Vec<_>>()));
        let (mut d, mut h2) = (xs.clone(), vec![0u16; xs.len()]);
        encode_bf16_keep(&mut h2, &mut d);
        assert_eq!(h2, h);
        assert!(same(&d, &xs.iter().map(|&x| from_bf16(to_bf16(x))).collect::<Vec<_>>()));
    }
}
