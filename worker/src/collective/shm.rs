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
//! rank finished the operation before). A rank waits by spinning briefly (about 50 us: a peer on
//! another core publishes its next piece sooner than a sleep would end), then sleeps on the
//! counter's futex, which the publishing rank wakes (more ranks than cores: a waiting rank
//! gives its core to the ranks that work; yielding in a loop took about a third of the CPU
//! with 4 ranks on 2 cores), and checks that
//! the ranks it waits for are still alive (their pids are in the segment), so a dead peer is
//! an error at once rather than at the timeout.
//!
//! The name in /dev/shm is only needed to meet: the last rank to map the segment removes it,
//! so a generation whose processes are all SIGKILLed afterwards leaves nothing behind (the
//! kernel frees the memory with the last mapping). What a kill during the meeting leaves
//! (every rank records its pid, PID namespace and start time in the segment) is removed by
//! `remove_stale_segments`, at worker start and whenever a rank joins a generation.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use memmap2::MmapMut;

use super::{chunk, Collective, MAX_GATHER_BYTES};
use crate::WorkerError;

const SHM_DIR: &str = "/dev/shm";
/// Per rank: pid, the pieces it has written, reduced and copied out, the operations it has
/// finished, and who its process is (PID namespace, start time), so that a cleaner can tell a
/// dead process from a pid of another namespace or a reused one.
const RANK_HEADER: usize = 128;
const PID: usize = 0;
const WRITTEN: usize = 8;
const REDUCED: usize = 16;
const DONE: usize = 24;
const COPIED: usize = 32;
const PID_NS: usize = 40;
const START: usize = 48;
/// Set in a rank header that records PID_NS and START (older versions left them zero).
const MAGIC: usize = 56;
/// A wait spins this many times (about 50 us), then yields the core this many times, then
/// sleeps on the futex.
const SPINS: u32 = 1000;
const YIELDS: u32 = 64;
/// Ranks asleep (futex) on one of this rank's counters: a rank that publishes a counter
/// wakes them only when there are any, so the common case costs no system call.
const SLEEPERS: usize = 64;
const HEADER_MAGIC: u64 = u64::from_le_bytes(*b"SHOALSEG");
/// The most ranks a segment is made for.
const MAX_WORLD: usize = 4096;
/// A segment no rank recorded itself in (its creator died between creating it and writing its
/// pid, a matter of microseconds), or one of a version that records no PID namespace, is
/// judged only once it is this old.
const GRACE: Duration = Duration::from_secs(300);
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

/// Sleeps while the low 32 bits of `flag` (the futex word: x86-64 is little-endian) still
/// read as `seen`'s, for at most `timeout`. A shared mapping, so no FUTEX_PRIVATE_FLAG: the
/// kernel keys the word by the segment, across processes.
fn futex_wait(flag: &AtomicU64, seen: u64, timeout: Duration) {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: the word is 4-aligned memory of the mapping, alive for the call; the kernel
    // only reads it. A spurious or early return is fine: the caller loops.
    unsafe {
        libc::syscall(libc::SYS_futex, flag.as_ptr() as *const u32, libc::FUTEX_WAIT, seen as u32, &ts as *const libc::timespec, std::ptr::null::<u32>(), 0);
    }
}

/// Wakes every rank asleep on `flag`.
fn futex_wake(flag: &AtomicU64) {
    // SAFETY: as above; FUTEX_WAKE does not touch the memory.
    unsafe {
        libc::syscall(libc::SYS_futex, flag.as_ptr() as *const u32, libc::FUTEX_WAKE, i32::MAX, std::ptr::null::<libc::timespec>(), std::ptr::null::<u32>(), 0);
    }
}

pub struct ShmRing {
    rank: usize,
    world: usize,
    map: MmapMut,
    path: PathBuf,
    /// Whether dropping this ring removes the name (not once it is removed, nor when the
    /// segment is another process's).
    owns_name: bool,
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
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(WorkerError::Collective(format!("{name:?} is not a shared-memory segment name")));
        }
        ShmRing::open_at(Path::new(SHM_DIR).join(name), rank, world, timeout, cancel)
    }

    fn open_at(path: PathBuf, rank: usize, world: usize, timeout: Duration, cancel: Arc<AtomicBool>) -> Result<ShmRing, WorkerError> {
        if rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} outside a world of {world}")));
        }
        if world > MAX_WORLD {
            return Err(WorkerError::Collective(format!("{world} ranks is more than a shared-memory segment is made for ({MAX_WORLD})")));
        }
        let fail = |e: &dyn std::fmt::Display| WorkerError::Collective(format!("{}: {e}", path.display()));
        let (slot_floats, size) = (slot_floats(world), segment_size(world));
        // /dev/shm is writable by everyone: a link planted under the name is refused, not followed.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(|e| fail(&e))?;
        let meta = file.metadata().map_err(|e| fail(&e))?;
        if !meta.is_file() {
            return Err(fail(&"not a regular file"));
        }
        let len = meta.len();
        let created = len == 0;
        let made = (|| {
            if len != size as u64 {
                if len != 0 {
                    return Err(fail(&format!("{len} bytes, expected {size}: another job's segment?")));
                }
                file.set_len(size as u64).map_err(|e| fail(&e))?;
            }
            // SAFETY: the segment is shared only with the other ranks of this generation, which
            // follow the same protocol: every cross-rank access goes through the atomic flags.
            unsafe { MmapMut::map_mut(&file) }.map_err(|e| fail(&e))
        })();
        let map = match made {
            Ok(map) => map,
            Err(e) => {
                if created {
                    let _ = fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        let mut ring = ShmRing { rank, world, map, path, owns_name: false, slot_floats, seq: 0, ticks: 0, timeout, cancel };
        let taken = ring.flag(rank, PID).load(Ordering::SeqCst);
        if taken != 0 {
            // Not ours: the name stays for the process that holds the rank.
            return Err(WorkerError::Collective(format!("{}: rank {rank} is already held by process {taken} (a leftover of an earlier run?)", ring.path.display())));
        }
        ring.owns_name = true;
        let me = this_process();
        ring.flag(rank, PID_NS).store(me.pid_ns, Ordering::Relaxed);
        ring.flag(rank, START).store(me.start, Ordering::Relaxed);
        ring.flag(rank, MAGIC).store(HEADER_MAGIC, Ordering::Relaxed);
        // SeqCst store then loads: of ranks mapping at the same time, at least one sees every
        // pid, so the name never outlives the meeting.
        ring.flag(rank, PID).store(me.pid, Ordering::SeqCst);
        if (0..world).all(|q| ring.flag(q, PID).load(Ordering::SeqCst) != 0) {
            // Every rank holds its mapping: the name is no longer needed.
            let _ = fs::remove_file(&ring.path);
            ring.owns_name = false;
        }
        Ok(ring)
    }

    /// Sets this rank's counter `which` to `value` and wakes the ranks asleep on it.
    fn publish(&self, which: usize, value: u64) {
        let f = self.flag(self.rank, which);
        f.store(value, Ordering::SeqCst);
        // SeqCst on both sides: a sleeper registers (SLEEPERS) before it reads the counter a
        // last time, so either it sees the new value or this load sees it registered.
        if self.flag(self.rank, SLEEPERS).load(Ordering::SeqCst) > 0 {
            futex_wake(f);
        }
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
            let flag = self.flag(q, which);
            while flag.load(Ordering::Acquire) < seq {
                spins += 1;
                if spins < SPINS {
                    std::hint::spin_loop();
                    continue;
                }
                if spins < SPINS + YIELDS {
                    // More ranks than cores: the rank waited for may only need the core.
                    std::thread::yield_now();
                    continue;
                }
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(WorkerError::Cancelled);
                }
                let pid = self.flag(q, PID).load(Ordering::Acquire);
                if pid != 0 && spins.is_multiple_of(16) {
                    // Written by the peer: never a pid_t of 0 or below (kill would signal a group).
                    let Ok(p) = i32::try_from(pid) else {
                        return Err(WorkerError::Collective(format!("rank {q} wrote {pid} as its pid into the segment")));
                    };
                    if process_gone(p) {
                        return Err(WorkerError::PeerGone(format!("rank {q} is gone (process {pid} exited)")));
                    }
                }
                if Instant::now() >= deadline {
                    return Err(WorkerError::Collective(format!("timed out after {:?} waiting for rank {q}", self.timeout)));
                }
                // Sleep until rank q publishes (or 2 ms pass: the checks above run again).
                let sleepers = self.flag(q, SLEEPERS);
                sleepers.fetch_add(1, Ordering::SeqCst);
                let seen = flag.load(Ordering::SeqCst);
                if seen < seq {
                    futex_wait(flag, seen, Duration::from_millis(2));
                }
                sleepers.fetch_sub(1, Ordering::SeqCst);
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
        self.publish(WRITTEN, self.ticks);
        self.wait_all(WRITTEN, self.ticks)?;
        read(self);
        Ok(())
    }
}

/// Whether process `pid` (> 0) has exited: no such process, or a zombie (killed, not yet
/// reaped by its parent, which for a worker started by `shoal up` is init and may take a
/// second).
fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // /proc/<pid>/stat: "pid (comm) S ...": the state follows the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
}

/// A process as a segment records it: a pid alone may be reused, or be another PID
/// namespace's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Process {
    pid: u64,
    /// Inode of its PID namespace (0: unknown).
    pid_ns: u64,
    /// When it started, in clock ticks after boot (`/proc/<pid>/stat` field 22; 0: unknown).
    start: u64,
}

fn this_process() -> Process {
    static ME: OnceLock<Process> = OnceLock::new();
    *ME.get_or_init(|| {
        let pid = std::process::id();
        Process { pid: pid as u64, pid_ns: super::pid_namespace().unwrap_or(0), start: start_time(pid as i32).unwrap_or(0) }
    })
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)" start with the third (state); the start time is the 22nd.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `p`, a process of this PID namespace, is gone: exited, or its pid now another
/// process's.
fn gone(p: &Process) -> bool {
    let Ok(pid) = i32::try_from(p.pid) else { return false };
    pid > 0 && (process_gone(pid) || (p.start != 0 && start_time(pid).is_some_and(|s| s != p.start)))
}

fn slot_floats(world: usize) -> usize {
    (DEPTH * world * PIECE).max(GATHER_SLOT / 4)
}

fn segment_size(world: usize) -> usize {
    world * (RANK_HEADER + slot_floats(world) * 4)
}

/// The world a segment of `len` bytes is made for (sizes grow with the world).
fn world_of_size(len: u64) -> Option<usize> {
    (1..=MAX_WORLD).map(|w| (w, segment_size(w) as u64)).take_while(|&(_, s)| s <= len).find(|&(_, s)| s == len).map(|(w, _)| w)
}

/// The generation of `name` if it is a segment of job `job` (`shoal-<job>-<generation>-<hash>`,
/// as `Rendezvous::join` names them).
fn generation_of(name: &str, job: u64) -> Option<u64> {
    let mut parts = name.strip_prefix("shoal-")?.split('-');
    let (j, g, hash) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && j.parse::<u64>().ok()? == job && hash.len() == 16).then_some(())?;
    g.parse().ok()
}

/// Why the segment at `path` is one no generation can use any more, or None to keep it.
/// Never a live meeting's: a rank whose process is alive in this PID namespace, or whose
/// namespace is another, keeps it; a segment that every rank has mapped loses only its name,
/// which nobody needs once all have met.
fn stale_reason(path: &Path, me: &Process, older_than: Option<(u64, u64)>, now: SystemTime) -> Option<&'static str> {
    let meta = fs::symlink_metadata(path).ok()?;
    // SAFETY: geteuid has no preconditions.
    if !meta.is_file() || meta.uid() != unsafe { libc::geteuid() } {
        return None;
    }
    let world = world_of_size(meta.len())?;
    let mut header = vec![0u8; world * RANK_HEADER];
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).ok()?;
    let word = |r: usize, which: usize| u64::from_le_bytes(header[r * RANK_HEADER + which..][..8].try_into().expect("8 bytes"));
    let ranks: Vec<(Process, bool)> = (0..world)
        .filter(|&r| word(r, PID) != 0)
        .map(|r| (Process { pid: word(r, PID), pid_ns: word(r, PID_NS), start: word(r, START) }, word(r, MAGIC) == HEADER_MAGIC))
        .collect();
    let old = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|age| age >= GRACE);
    if ranks.len() == world {
        return Some("every rank has mapped it, so its name is not needed");
    }
    if ranks.is_empty() {
        return old.then_some("no rank recorded itself in it");
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if let Some((job, generation)) = older_than {
        // This very process took part in it, so it is this cluster's job, which has moved on.
        if generation_of(name, job).is_some_and(|g| g < generation) && ranks.iter().any(|(p, _)| p == me) {
            return Some("an older generation of this job, which this worker left");
        }
    }
    let judged = |(p, recorded): &(Process, bool)| {
        // A pid means something only in this PID namespace; an older version recorded none.
        let ours = if *recorded { me.pid_ns != 0 && p.pid_ns == me.pid_ns } else { old };
        ours && gone(p)
    };
    ranks.iter().all(judged).then_some("every process that mapped it is gone")
}

/// Removes the segments in /dev/shm that no generation can use any more: those whose every
/// mapping process is gone (a job SIGKILLed on all its ranks while they met), and the names of
/// segments every rank has mapped. Never a live job's. Returns how many it removed; call it
/// once when a worker starts.
pub fn remove_stale_segments() -> usize {
    remove_stale_in(Path::new(SHM_DIR), None)
}

/// `remove_stale_segments`, and also job `job`'s segments of generations before `generation`
/// that this process took part in (it is joining `generation`, so it left those).
pub(crate) fn remove_stale_segments_of(job: u64, generation: u64) -> usize {
    remove_stale_in(Path::new(SHM_DIR), Some((job, generation)))
}

fn remove_stale_in(dir: &Path, older_than: Option<(u64, u64)>) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let (me, now) = (this_process(), SystemTime::now());
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(|n| n.starts_with("shoal-")) {
            continue;
        }
        if let Some(why) = stale_reason(&path, &me, older_than, now) {
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(segment = %path.display(), why, "removed a stale shared-memory segment");
                    removed += 1;
                }
                Err(e) => tracing::debug!(segment = %path.display(), error = %e, "could not remove a stale shared-memory segment"),
            }
        }
    }
    removed
}

impl Drop for ShmRing {
    fn drop(&mut self) {
        // Mappings outlive the name: a rank leaving before every rank mapped it removes it.
        if self.owns_name {
            let _ = fs::remove_file(&self.path);
        }
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
            self.publish(WRITTEN, tick);
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
            self.publish(REDUCED, tick);
            // The owners' sums of piece k of the other chunks.
            for j in 1..n {
                let q = (r + j) % n;
                self.wait(q, REDUCED, tick)?;
                let p = piece(q, k);
                // SAFETY: rank q's sum of piece k is final (REDUCED) and stays until this
                // rank says COPIED.
                buf[p.clone()].copy_from_slice(unsafe { std::slice::from_raw_parts(self.slot_ptr(q).add(stage(k, q)), p.len()) });
            }
            self.publish(COPIED, tick);
        }
        self.ticks = base + pieces as u64;
        self.publish(DONE, self.seq);
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let n = self.world;
        if n == 1 {
            return Ok(vec![mine]);
        }
        if mine.len() > MAX_GATHER_BYTES {
            return Err(WorkerError::Collective(format!("{} bytes is more than one all-gather carries ({MAX_GATHER_BYTES})", mine.len())));
        }
        const _: () = assert!(MAX_GATHER_BYTES + 8 <= GATHER_SLOT);
        let floats = GATHER_SLOT / 4;
        let mut out = Vec::new();
        let mut bad = None;
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
                    // Written by the peer: checked, never trusted.
                    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
                    if len > MAX_GATHER_BYTES as u64 {
                        bad = Some(WorkerError::Collective(format!("rank {q} put an all-gather block of {len} bytes, more than the {MAX_GATHER_BYTES} one carries")));
                        return;
                    }
                    out.push(bytes[8..8 + len as usize].to_vec());
                }
            },
        )?;
        // Done with the slots even on a bad block, so the peers are not left waiting on this rank.
        self.publish(REDUCED, self.ticks);
        self.publish(COPIED, self.ticks);
        self.publish(DONE, self.seq);
        match bad {
            Some(e) => Err(e),
            None => Ok(out),
        }
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

    fn no_cancel() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    /// A segment file of `world` ranks whose headers record `ranks` (rank, process, whether
    /// the header is of this version), as a rank that died after recording itself leaves it.
    fn fake_segment(path: &Path, world: usize, ranks: &[(usize, Process, bool)]) {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(path).unwrap();
        f.set_len(segment_size(world) as u64).unwrap();
        for &(r, p, recorded) in ranks {
            let mut h = [0u8; RANK_HEADER];
            h[PID..PID + 8].copy_from_slice(&p.pid.to_le_bytes());
            if recorded {
                h[PID_NS..PID_NS + 8].copy_from_slice(&p.pid_ns.to_le_bytes());
                h[START..START + 8].copy_from_slice(&p.start.to_le_bytes());
                h[MAGIC..MAGIC + 8].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
            }
            f.write_all_at(&h, (r * RANK_HEADER) as u64).unwrap();
        }
    }

    fn temp_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-shm-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_segment_every_rank_mapped_leaves_no_name_behind() {
        let dir = temp_dir("met");
        let path = dir.join("shoal-1-1-0123456789abcdef");
        let r0 = ShmRing::open_at(path.clone(), 0, 2, Duration::from_secs(10), no_cancel()).unwrap();
        assert!(path.exists(), "the name stays while a rank has yet to come");
        let r1 = ShmRing::open_at(path.clone(), 1, 2, Duration::from_secs(10), no_cancel()).unwrap();
        assert!(!path.exists(), "once every rank mapped it, nothing a SIGKILL could leave behind");
        let data = inputs(2, 70_001, 3);
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = [r0, r1].into_iter().zip(&data).map(|(mut ring, d)| s.spawn(move || {
                let mut buf = d.clone();
                ring.all_reduce(&mut buf).unwrap();
                buf
            })).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = reference_sum(&data);
        assert!(out.iter().all(|got| got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits())));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_segments_go_and_live_ones_stay() {
        let dir = temp_dir("stale");
        let me = this_process();
        assert!(me.pid_ns != 0 && me.start != 0, "{me:?}");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let dead = Process { pid: child.id() as u64, ..me };
        let hex = "0123456789abcdef";

        // A live generation still meeting: rank 0 (this process) mapped it, rank 1 has yet to come.
        let live_path = dir.join(format!("shoal-9-1-{hex}"));
        let live = ShmRing::open_at(live_path.clone(), 0, 2, Duration::from_secs(10), no_cancel()).unwrap();
        let keep = |name: &str, world: usize, ranks: &[(usize, Process, bool)]| {
            fake_segment(&dir.join(name), world, ranks);
            name.to_string()
        };
        let kept = [
            keep("shoal-foreign", 2, &[(0, Process { pid_ns: me.pid_ns + 1, ..dead }, true)]),
            keep("shoal-alive-and-dead", 3, &[(0, dead, true), (2, me, true)]),
            keep("shoal-older-version", 2, &[(0, dead, false)]),
            keep("shoal-unclaimed", 2, &[]),
            keep(&format!("shoal-5-3-{hex}"), 2, &[(0, me, true)]),
            keep(&format!("shoal-6-1-{hex}"), 2, &[(0, me, true)]),
            keep(&format!("shoal-5-1-{hex}"), 2, &[(0, me, true)]),
        ];
        fs::write(dir.join("shoal-notes"), b"not a segment").unwrap();
        let gone = [
            keep("shoal-dead", 2, &[(0, dead, true)]),
            keep("shoal-dead-4", 4, &[(1, dead, true), (3, dead, true)]),
            keep("shoal-pid-reused", 2, &[(1, Process { start: me.start + 1, ..me }, true)]),
            keep("shoal-all-met", 2, &[(0, me, true), (1, me, true)]),
        ];
        assert_eq!(remove_stale_in(&dir, None), gone.len());
        for name in &gone {
            assert!(!dir.join(name).exists(), "{name} should be gone");
        }
        for name in kept.iter().map(String::as_str).chain(["shoal-notes"]) {
            assert!(dir.join(name).exists(), "{name} should stay");
        }
        assert!(live_path.exists(), "the live generation's segment must stay");

        // Joining generation 2 of job 5: generation 1, which this process took part in, is over.
        assert_eq!(remove_stale_in(&dir, Some((5, 2))), 1);
        assert!(!dir.join(format!("shoal-5-1-{hex}")).exists());
        assert!(dir.join(format!("shoal-5-3-{hex}")).exists() && dir.join(format!("shoal-6-1-{hex}")).exists());
        assert!(live_path.exists());

        // The live generation still meets and sums.
        let late = ShmRing::open_at(live_path.clone(), 1, 2, Duration::from_secs(10), no_cancel()).unwrap();
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = [live, late].into_iter().map(|mut ring| s.spawn(move || {
                let mut buf = vec![ring.rank() as f32 + 1.0; 1000];
                ring.all_reduce(&mut buf).unwrap();
                buf
            })).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(out.iter().all(|b| b.iter().all(|&x| x == 3.0)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_oversized_gather_length_from_a_peer_is_an_error() {
        let dir = temp_dir("gather");
        let path = dir.join("shoal-gather");
        let mut r0 = ShmRing::open_at(path.clone(), 0, 2, Duration::from_secs(10), no_cancel()).unwrap();
        let r1 = ShmRing::open_at(path, 1, 2, Duration::from_secs(10), no_cancel()).unwrap();
        // Rank 1 stages a block whose length says 2^64 - 1 bytes.
        // SAFETY: rank 1's slot, written by this thread alone before WRITTEN says so.
        unsafe { (r1.slot_ptr(1) as *mut u64).write(u64::MAX.to_le()) };
        r1.flag(1, WRITTEN).store(1, Ordering::Release);
        let e = r0.all_gather_bytes(vec![1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains(&u64::MAX.to_string()), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rank_that_never_comes_is_a_timeout() {
        let name = format!("shoal-test-timeout-{}", std::process::id());
        let mut ring = ShmRing::open(0, 2, &name, Duration::from_millis(300), Arc::new(AtomicBool::new(false))).unwrap();
        let e = ring.all_reduce(&mut [1.0; 16]).unwrap_err().to_string();
        assert!(e.contains("timed out") && e.contains("rank 1"), "{e}");
    }
}
