//! The ring's sums through shared memory, for ranks on one host. Rank c owns chunk c of the
//! buffer (the documented order: it sums rank c's values, then c+1's, ...). The chunks are
//! cut into pieces, and the ranks walk the pieces in step: for piece k each rank copies its
//! values of piece k of the chunks it does not own into its staging area in a segment in
//! /dev/shm, adds the others' staged piece k of its own chunk into its buffer while
//! publishing the sum in its staging area, and copies the owners' sums of piece k of the other
//! chunks. The staging area is a ring of `DEPTH` piece positions, not a copy of the buffer: it
//! stays in the CPU's caches, so the buffer itself is read and written about once and staged
//! data never goes to memory (with a slot as large as the buffer, every staged byte was a
//! write-back to DRAM: 8.6 ms for 64 MB over 2 ranks, against 4.5 ms now).
//!
//! Counters per rank order the phases: pieces written, reduced and copied out (counted over
//! the segment's life; a staging position is rewritten only when every rank has copied out
//! the piece it held), and operations finished (the all-gather area is reused only when every
//! rank finished the operation before). A rank waits by spinning briefly, then sleeping, and checks that
//! the ranks it waits for are still alive (their pids are in the segment), so a dead peer is
//! an error at once rather than at the timeout.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use super::{chunk, Collective};
use crate::WorkerError;

/// Per rank: pid, the pieces it has written, reduced and copied out, and the operations it
/// has finished.
const RANK_HEADER: usize = 64;
const PID: usize = 0;
const WRITTEN: usize = 8;
const REDUCED: usize = 16;
const DONE: usize = 24;
const COPIED: usize = 32;
/// Piece positions in each rank's staging ring: a rank may run this many pieces ahead of the
/// slowest reader of its staging area.
const DEPTH: usize = 8;
/// Bytes each rank can put in one all-gather.
const GATHER_SLOT: usize = 1 << 20;
/// Floats of each chunk handled per step (128 KiB). Measured with `shoal bench allreduce`,
/// 64 MB, on 2 cores, (piece, depth): (32K, 8) 4.5 ms at 2 ranks and 23 ms at 4; (16K, 8)
/// 4.3 and 26.5 (more ranks than cores switch per piece); (128K, 4) 8.2 and 19; (32K, 4) and
/// (64K, 2) 8.5 at 2 ranks: the staging ring must not be too shallow.
const PIECE: usize = 32 << 10;

pub struct ShmRing {
    rank: usize,
    world: usize,
    map: MmapMut,
    path: PathBuf,
    /// f32 elements per rank slot: the staging ring, or the all-gather area if larger.
    slot_floats: usize,
    seq: u64,
    /// Pieces this rank has written (and reduced) over the segment's life: what its WRITTEN
    /// and REDUCED counters reach at the end of the current operation.
    ticks: u64,
    timeout: Duration,
    cancel: Arc<AtomicBool>,
}

impl ShmRing {
    /// Maps (creating if need be) the segment `name` in /dev/shm for `world` ranks. Every rank
    /// of the generation passes the same name. Buffers of any length go through it.
    pub fn open(rank: usize, world: usize, name: &str, timeout: Duration, cancel: Arc<AtomicBool>) -> Result<ShmRing, WorkerError> {
        if rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} outside a world of {world}")));
        }
        let path = PathBuf::from("/dev/shm").join(name);
        let slot_floats = (DEPTH * world * PIECE).max(GATHER_SLOT / 4);
        let size = world * (RANK_HEADER + slot_floats * 4);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| WorkerError::Collective(format!("{}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| WorkerError::Collective(e.to_string()))?.len();
        if len != size as u64 {
            if len != 0 {
                return Err(WorkerError::Collective(format!("{}: {len} bytes, expected {size}: another job's segment?", path.display())));
            }
            file.set_len(size as u64).map_err(|e| WorkerError::Collective(format!("{}: {e}", path.display())))?;
        }
        // SAFETY: the segment is shared only with the other ranks of this generation, which
        // follow the same protocol: every cross-rank access goes through the atomic flags.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| WorkerError::Collective(format!("{}: {e}", path.display())))?;
        let ring = ShmRing { rank, world, map, path, slot_floats, seq: 0, ticks: 0, timeout, cancel };
        ring.flag(rank, PID).store(std::process::id() as u64, Ordering::Release);
        Ok(ring)
    }

    fn flag(&self, rank: usize, which: usize) -> &AtomicU64 {
        let off = rank * RANK_HEADER + which;
        // SAFETY: in bounds, 8-aligned (the map is page-aligned), and only ever used atomically.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn slot_ptr(&self, rank: usize) -> *mut f32 {
        let off = self.world * RANK_HEADER + rank * self.slot_floats * 4;
        // SAFETY: in bounds by construction; f32-aligned.
        unsafe { self.map.as_ptr().add(off) as *mut f32 }
    }

    /// Waits until every rank's `which` counter has reached `seq`.
    fn wait_all(&self, which: usize, seq: u64) -> Result<(), WorkerError> {
        (0..self.world).try_for_each(|q| self.wait(q, which, seq))
    }

    /// Waits until rank `q`'s `which` counter has reached `seq`.
    fn wait(&self, q: usize, which: usize, seq: u64) -> Result<(), WorkerError> {
        if self.flag(q, which).load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        {
            while self.flag(q, which).load(Ordering::Acquire) < seq {
                spins += 1;
                if spins < 1000 {
                    std::hint::spin_loop();
                    continue;
                }
                if !spins.is_multiple_of(64) {
                    // More ranks than cores: let the one we wait for run.
                    std::thread::yield_now();
                    continue;
                }
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(WorkerError::Cancelled);
                }
                let pid = self.flag(q, PID).load(Ordering::Acquire);
                if pid != 0 && spins.is_multiple_of(1024) && process_gone(pid as i32) {
                    return Err(WorkerError::PeerGone(format!("rank {q} is gone (process {pid} exited)")));
                }
                if Instant::now() >= deadline {
                    return Err(WorkerError::Collective(format!("timed out after {:?} waiting for rank {q}", self.timeout)));
                }
                if spins > 100_000 {
                    // A long wait (a peer still computing): stop burning a core.
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        Ok(())
    }

    /// The shared phases of one operation over the first `len` floats of every slot.
    fn exchange(&mut self, len: usize, write: impl FnOnce(&mut [f32]), read: impl FnOnce(&ShmRing)) -> Result<(), WorkerError> {
        if len > self.slot_floats {
            return Err(WorkerError::Collective(format!("{len} floats is more than the {} this segment holds", self.slot_floats)));
        }
        self.seq += 1;
        self.ticks += 1;
        // Nobody may still be copying out of the last operation's slots.
        self.wait_all(DONE, self.seq - 1)?;
        // SAFETY: this rank's slot is written by this rank alone, now that every rank is done
        // reading the previous operation.
        write(unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(self.rank), len) });
        self.flag(self.rank, WRITTEN).store(self.ticks, Ordering::Release);
        self.wait_all(WRITTEN, self.ticks)?;
        read(self);
        Ok(())
    }
}

/// Whether process `pid` has exited: no such process, or a zombie (killed, not yet reaped by
/// its parent, which for a worker started by `shoal up` is init and may take a second).
fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // /proc/<pid>/stat: "pid (comm) S ...": the state follows the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
}

impl Drop for ShmRing {
    fn drop(&mut self) {
        // Mappings outlive the name: the first rank to leave removes it.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Collective for ShmRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn name(&self) -> &'static str {
        "shm"
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        let (n, r, len) = (self.world, self.rank, buf.len());
        if n == 1 {
            return Ok(());
        }
        self.seq += 1;
        // Nobody may still be reading the all-gather area, which overlaps the staging ring.
        self.wait_all(DONE, self.seq - 1)?;
        let chunks: Vec<std::ops::Range<usize>> = (0..n).map(|c| chunk(len, n, c)).collect();
        let pieces = chunks.iter().map(|c| c.len().div_ceil(PIECE)).max().unwrap_or(0);
        let piece = |c: usize, k: usize| {
            let ch = &chunks[c];
            (ch.start + k * PIECE).min(ch.end)..(ch.start + (k + 1) * PIECE).min(ch.end)
        };
        // Where piece k of chunk c is staged, in any rank's slot.
        let stage = |k: usize, c: usize| ((k % DEPTH) * n + c) * PIECE;
        let base = self.ticks;
        for k in 0..pieces {
            let tick = base + k as u64 + 1;
            if k >= DEPTH {
                // The position of piece k - DEPTH is free once every rank has copied it out.
                self.wait_all(COPIED, tick - DEPTH as u64)?;
            }
            // This rank's values of piece k of the chunks others own.
            for c in (0..n).filter(|&c| c != r) {
                let p = piece(c, k);
                // SAFETY: this rank's staging area is written by it alone; the owner reads
                // this position only after WRITTEN says so, and every rank is done with the
                // piece it held before (COPIED, just above).
                unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(r).add(stage(k, c)), p.len()) }.copy_from_slice(&buf[p]);
            }
            self.flag(r, WRITTEN).store(tick, Ordering::Release);
            // Sum piece k of this rank's chunk in the documented order, and publish it.
            let mine = piece(r, k);
            for j in 1..n {
                let q = (r + j) % n;
                self.wait(q, WRITTEN, tick)?;
                // SAFETY: rank q staged piece k (WRITTEN) and rewrites the position only
                // after this rank says COPIED for it.
                let src = unsafe { std::slice::from_raw_parts(self.slot_ptr(q).add(stage(k, r)), mine.len()) };
                if j + 1 < n {
                    super::add_f32(&mut buf[mine.clone()], src);
                } else {
                    // The last term: the sum goes into the buffer and, in the same pass, into
                    // this rank's staging area for the others. SAFETY: written by this rank
                    // alone, read by the others only after REDUCED.
                    let publish = unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(r).add(stage(k, r)), mine.len()) };
                    super::add_f32_and_copy(&mut buf[mine.clone()], (publish, src));
                }
            }
            self.flag(r, REDUCED).store(tick, Ordering::Release);
            // The owners' sums of piece k of the other chunks.
            for j in 1..n {
                let q = (r + j) % n;
                self.wait(q, REDUCED, tick)?;
                let p = piece(q, k);
                // SAFETY: rank q's sum of piece k is final (REDUCED) and stays until this
                // rank says COPIED.
                buf[p.clone()].copy_from_slice(unsafe { std::slice::from_raw_parts(self.slot_ptr(q).add(stage(k, q)), p.len()) });
            }
            self.flag(r, COPIED).store(tick, Ordering::Release);
        }
        self.ticks = base + pieces as u64;
        self.flag(r, DONE).store(self.seq, Ordering::Release);
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let (n, r) = (self.world, self.rank);
        if n == 1 {
            return Ok(vec![mine]);
        }
        if mine.len() + 8 > GATHER_SLOT {
            return Err(WorkerError::Collective(format!("{} bytes is more than one all-gather carries", mine.len())));
        }
        let floats = GATHER_SLOT / 4;
        let mut out = Vec::new();
        self.exchange(
            floats,
            |slot| {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(slot);
                bytes[..8].copy_from_slice(&(mine.len() as u64).to_le_bytes());
                bytes[8..8 + mine.len()].copy_from_slice(&mine);
            },
            |ring| {
                for q in 0..n {
                    // SAFETY: slot q is final (WRITTEN) and nobody writes it until DONE.
                    let bytes = unsafe { std::slice::from_raw_parts(ring.slot_ptr(q) as *const u8, GATHER_SLOT) };
                    let len = (u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize).min(GATHER_SLOT - 8);
                    out.push(bytes[8..8 + len].to_vec());
                }
            },
        )?;
        self.flag(r, REDUCED).store(self.ticks, Ordering::Release);
        self.flag(r, COPIED).store(self.ticks, Ordering::Release);
        self.flag(r, DONE).store(self.seq, Ordering::Release);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{reference_sum, testing::inputs};
    use super::*;

    fn run(world: usize, len: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
        let data = inputs(world, len, seed);
        let name = format!("shoal-test-{}-{world}-{len}-{seed}", std::process::id());
        let out = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let (d, name) = (data[r].clone(), name.clone());
                    s.spawn(move || {
                        let mut ring = ShmRing::open(r, world, &name, Duration::from_secs(10), Arc::new(AtomicBool::new(false))).unwrap();
                        let mut buf = d;
                        for _ in 0..3 {
                            let mut again = buf.clone();
                            ring.all_reduce(&mut again).unwrap();
                            if ring.seq == 1 {
                                buf = again;
                            }
                        }
                        let g = ring.all_gather_bytes(vec![r as u8; r + 1]).unwrap();
                        assert_eq!(g, (0..world).map(|q| vec![q as u8; q + 1]).collect::<Vec<_>>());
                        buf
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (out, reference_sum(&data))
    }

    #[test]
    fn every_rank_gets_the_reference_sum_bit_for_bit() {
        for world in [2usize, 3, 5] {
            for len in [1usize, 5, 4099, 250_001, 1_400_003] {
                let (out, want) = run(world, len, (world + len) as u64);
                for (r, got) in out.iter().enumerate() {
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world}, len {len}: rank {r}");
                }
            }
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_a_timeout() {
        let name = format!("shoal-test-timeout-{}", std::process::id());
        let mut ring = ShmRing::open(0, 2, &name, Duration::from_millis(300), Arc::new(AtomicBool::new(false))).unwrap();
        let e = ring.all_reduce(&mut [1.0; 16]).unwrap_err().to_string();
        assert!(e.contains("timed out") && e.contains("rank 1"), "{e}");
    }
}
