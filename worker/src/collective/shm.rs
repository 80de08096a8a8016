//! The ring's sums through shared memory, for ranks on one host. Each rank copies its buffer
//! into its slot of a segment in /dev/shm; rank c sums chunk c of every slot (rank c's
//! values, then c+1's, ..., the documented order) into its own slot; then every rank copies
//! every chunk from its owner's slot. Three flags per rank, each the operation number it has
//! reached, order the phases; a rank waits by spinning briefly, then sleeping, and checks
//! that the ranks it waits for are still alive (their pids are in the segment), so a dead
//! peer is an error at once rather than at the timeout.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use super::{chunk, Collective};
use crate::WorkerError;

/// Per rank: pid, and the operation it has written, reduced and finished copying.
const RANK_HEADER: usize = 64;
const PID: usize = 0;
const WRITTEN: usize = 8;
const REDUCED: usize = 16;
const DONE: usize = 24;
/// Bytes each rank can put in one all-gather.
const GATHER_SLOT: usize = 1 << 20;

pub struct ShmRing {
    rank: usize,
    world: usize,
    map: MmapMut,
    path: PathBuf,
    /// f32 elements per rank slot.
    capacity: usize,
    seq: u64,
    timeout: Duration,
    cancel: Arc<AtomicBool>,
}

impl ShmRing {
    /// Maps (creating if need be) the segment `name` in /dev/shm for `world` ranks and buffers
    /// of up to `capacity` floats. Every rank of the generation passes the same name.
    pub fn open(rank: usize, world: usize, name: &str, capacity: usize, timeout: Duration, cancel: Arc<AtomicBool>) -> Result<ShmRing, WorkerError> {
        if rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} outside a world of {world}")));
        }
        let path = PathBuf::from("/dev/shm").join(name);
        let size = world * (RANK_HEADER + capacity.max(GATHER_SLOT / 4) * 4);
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
        let ring = ShmRing { rank, world, map, path, capacity: capacity.max(GATHER_SLOT / 4), seq: 0, timeout, cancel };
        ring.flag(rank, PID).store(std::process::id() as u64, Ordering::Release);
        Ok(ring)
    }

    fn flag(&self, rank: usize, which: usize) -> &AtomicU64 {
        let off = rank * RANK_HEADER + which;
        // SAFETY: in bounds, 8-aligned (the map is page-aligned), and only ever used atomically.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn slot_ptr(&self, rank: usize) -> *mut f32 {
        let off = self.world * RANK_HEADER + rank * self.capacity * 4;
        // SAFETY: in bounds by construction; f32-aligned.
        unsafe { self.map.as_ptr().add(off) as *mut f32 }
    }

    /// Waits until every rank's `which` flag has reached `seq`.
    fn wait_all(&self, which: usize, seq: u64) -> Result<(), WorkerError> {
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        for q in 0..self.world {
            while self.flag(q, which).load(Ordering::Acquire) < seq {
                spins += 1;
                if spins < 2000 {
                    std::hint::spin_loop();
                    continue;
                }
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(WorkerError::Cancelled);
                }
                let pid = self.flag(q, PID).load(Ordering::Acquire);
                // SAFETY: signal 0 only checks that the process exists.
                if pid != 0 && unsafe { libc::kill(pid as i32, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                    return Err(WorkerError::Collective(format!("rank {q} is gone (process {pid} exited)")));
                }
                if Instant::now() >= deadline {
                    return Err(WorkerError::Collective(format!("timed out after {:?} waiting for rank {q}", self.timeout)));
                }
                std::thread::sleep(Duration::from_micros(if spins < 4000 { 20 } else { 200 }));
            }
        }
        Ok(())
    }

    /// The shared phases of one operation over the first `len` floats of every slot.
    fn exchange(&mut self, len: usize, write: impl FnOnce(&mut [f32]), read: impl FnOnce(&ShmRing)) -> Result<(), WorkerError> {
        if len > self.capacity {
            return Err(WorkerError::Collective(format!("{len} floats is more than the {} this segment holds", self.capacity)));
        }
        self.seq += 1;
        let seq = self.seq;
        // Nobody may still be copying out of the last operation's slots.
        self.wait_all(DONE, seq - 1)?;
        // SAFETY: this rank's slot is written by this rank alone, now that every rank is done
        // reading the previous operation.
        write(unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(self.rank), len) });
        self.flag(self.rank, WRITTEN).store(seq, Ordering::Release);
        self.wait_all(WRITTEN, seq)?;
        read(self);
        Ok(())
    }
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
        self.exchange(len, |slot| slot.copy_from_slice(buf), |_| {})?;
        let seq = self.seq;
        // Sum chunk r into this rank's slot: rank r's values, then r+1's, ...
        let mine = chunk(len, n, r);
        // SAFETY: chunk r of slot r is written by rank r alone in this phase, and read by no
        // one until REDUCED says so; chunk r of the other slots is only read.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.slot_ptr(r).add(mine.start), mine.len());
            for k in 1..n {
                let src = std::slice::from_raw_parts(self.slot_ptr((r + k) % n).add(mine.start), mine.len());
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s);
            }
        }
        self.flag(r, REDUCED).store(seq, Ordering::Release);
        self.wait_all(REDUCED, seq)?;
        for c in 0..n {
            let range = chunk(len, n, c);
            // SAFETY: chunk c of slot c is final (REDUCED) and nobody writes it until DONE.
            let src = unsafe { std::slice::from_raw_parts(self.slot_ptr(c).add(range.start), range.len()) };
            buf[range].copy_from_slice(src);
        }
        self.flag(r, DONE).store(seq, Ordering::Release);
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
        self.flag(r, REDUCED).store(self.seq, Ordering::Release);
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
                        let mut ring = ShmRing::open(r, world, &name, len, Duration::from_secs(10), Arc::new(AtomicBool::new(false))).unwrap();
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
            for len in [1usize, 5, 4099, 250_001] {
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
        let mut ring = ShmRing::open(0, 2, &name, 16, Duration::from_millis(300), Arc::new(AtomicBool::new(false))).unwrap();
        let e = ring.all_reduce(&mut [1.0; 16]).unwrap_err().to_string();
        assert!(e.contains("timed out") && e.contains("rank 1"), "{e}");
    }
}
