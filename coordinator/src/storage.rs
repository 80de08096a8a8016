//! The coordinator's durable Raft log: one append-only file of framed records
//! (`len u32 LE | crc32 u32 LE | LogRecord protobuf`), fsynced once per Ready. On start the
//! file is replayed into raft-rs's in-memory storage. A torn tail (a crash mid-write: a bad
//! record with nothing valid after it) is reported and cut off, never loaded. A bad record
//! with valid records after it is corruption, not a torn write: opening fails with the file
//! and offset, and nothing is cut, because cutting would drop committed entries and votes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::Storage as _;
use shoal_proto::{log_record, ConfStateRecord, LogRecord, Message, SnapshotFile};

use crate::CoordError;

const MAX_RECORD: usize = 64 << 20;
/// The most a torn write can leave behind: one Ready's worth of records. A bad stretch longer
/// than this at the end of the file is corruption, whatever follows it.
const MAX_TORN: usize = 2 * MAX_RECORD;

pub const LOG_FILE: &str = "raft.log";
pub const SNAPSHOT_FILE: &str = "snapshot.pb";

/// Where the log's files live: `FsDisk` is a folder; the simulation's disk loses what was not
/// synced, tears the last write, or fails an fsync, under the same log code.
pub trait Disk: Send {
    /// The current content of `name` (None: no such file).
    fn read(&mut self, name: &str) -> std::io::Result<Option<Vec<u8>>>;
    /// Appends to `name`, creating it if missing; durable only after `sync`.
    fn append(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()>;
    /// Makes `name`'s content, and its existence, durable.
    fn sync(&mut self, name: &str) -> std::io::Result<()>;
    /// Cuts `name` to `len` bytes, durably.
    fn truncate(&mut self, name: &str, len: u64) -> std::io::Result<()>;
    /// Replaces `name` with `bytes` atomically and durably: a crash leaves the old or the new.
    fn replace(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()>;
    /// How `name` is shown in messages.
    fn describe(&self, name: &str) -> String;
}

/// A folder of the real file system.
pub struct FsDisk {
    dir: PathBuf,
    appending: HashMap<String, File>,
}

impl FsDisk {
    pub fn new(dir: &Path) -> FsDisk {
        FsDisk { dir: dir.to_path_buf(), appending: HashMap::new() }
    }
}

impl Disk for FsDisk {
    fn read(&mut self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        if !self.appending.contains_key(name) {
            let path = self.dir.join(name);
            let existed = path.exists();
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            if !existed {
                // The new file's name must survive a crash as well as its records.
                shoal_core::fsutil::sync_dir(&self.dir)?;
            }
            self.appending.insert(name.to_string(), f);
        }
        self.appending.get_mut(name).expect("opened above").write_all(bytes)
    }

    fn sync(&mut self, name: &str) -> std::io::Result<()> {
        match self.appending.get(name) {
            Some(f) => f.sync_data(),
            None => File::open(self.dir.join(name))?.sync_all(),
        }
    }

    fn truncate(&mut self, name: &str, len: u64) -> std::io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.dir.join(name))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn replace(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.appending.remove(name);
        shoal_core::fsutil::write_atomic(&self.dir.join(name), bytes).map_err(|e| match e {
            shoal_core::CoreError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    }

    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

pub struct LogFile {
    disk: Box<dyn Disk>,
    buf: Vec<u8>,
}

/// What replaying a log file found.
pub struct Recovered {
    pub storage: MemStorage,
    /// The snapshot the log starts from (its data is the state machine at its index).
    pub snapshot: Option<Snapshot>,
    /// Raft log entries recovered (0 on a fresh start).
    pub entries: u64,
    /// Bytes cut off the end because they were torn or corrupt.
    pub truncated_bytes: u64,
    pub fresh: bool,
}

fn frame(buf: &mut Vec<u8>, rec: &LogRecord) {
    let payload = rec.encode_to_vec();
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
}

impl LogFile {
    /// Opens (or creates) the log in folder `dir` and replays it (see `open_on`).
    pub fn open(dir: &Path, voters: &[u64]) -> Result<(LogFile, Recovered), CoordError> {
        Self::open_on(Box::new(FsDisk::new(dir)), voters)
    }

    /// Opens (or creates) the log on `disk` and replays it. `voters` seeds a fresh log's
    /// membership; an existing log keeps its own.
    pub fn open_on(mut disk: Box<dyn Disk>, voters: &[u64]) -> Result<(LogFile, Recovered), CoordError> {
        let path = disk.describe(LOG_FILE);
        let io = |e: std::io::Error| CoordError::Io(format!("{path}: {e}"));
        let bytes = disk.read(LOG_FILE).map_err(io)?.unwrap_or_default();
        let storage = MemStorage::new();
        let snapshot = read_snapshot(disk.as_mut())?;
        let base = snapshot.as_ref().map(|s| s.get_metadata().index).unwrap_or(0);
        if let Some(s) = &snapshot {
            storage.wl().apply_snapshot(s.clone()).map_err(|e| CoordError::Raft(e.to_string()))?;
        }
        let mut off = 0usize;
        let (mut entries, mut have_conf) = (0u64, false);
        let mut hard_state: Option<HardState> = None;
        while off < bytes.len() {
            // An empty record is what a zero-filled tail parses as.
            let Some((len, rec)) = parse_record(&bytes[off..]).filter(|(_, r)| r.kind.is_some()) else {
                check_torn(&path, &bytes, off)?;
                break;
            };
            let applied = match rec.kind {
                Some(log_record::Kind::Entry(b)) => match Entry::parse_from_bytes(&b) {
                    // Entries the snapshot covers (a crash came between writing the snapshot
                    // and compacting the log) are skipped.
                    Ok(e) if e.index <= base => true,
                    Ok(e) => {
                        storage.wl().append(&[e]).map_err(|e| CoordError::Io(format!("{path}: replay: {e}")))?;
                        entries += 1;
                        true
                    }
                    Err(_) => false,
                },
                Some(log_record::Kind::HardState(b)) => match HardState::parse_from_bytes(&b) {
                    Ok(hs) => {
                        hard_state = Some(hs);
                        true
                    }
                    Err(_) => false,
                },
                Some(log_record::Kind::ConfState(cs)) => {
                    storage.wl().set_conf_state(ConfState::from((cs.voters, vec![])));
                    have_conf = true;
                    true
                }
                None => unreachable!("filtered above"),
            };
            if !applied {
                // A checksummed record that does not decode was written so: not a torn write.
                return Err(CoordError::CorruptLog { path: path.clone(), offset: off as u64, reason: "a record with a valid checksum does not decode".into() });
            }
            off += len;
        }
        if let Some(mut hs) = hard_state {
            // The snapshot's entries are committed, whatever an older record says; and no
            // commit index points past the log (a record written before the entries it
            // covers, lost in a crash): raft-rs refuses to start on one, and the quorum
            // tells this replica the true commit index again.
            let last = storage.last_index().map_err(|e| CoordError::Raft(e.to_string()))?.max(base);
            if hs.commit > last {
                tracing::warn!(%path, commit = hs.commit, last, "the recorded commit index is past the log's end; lowering it to the last entry");
            }
            hs.commit = hs.commit.max(base).min(last);
            storage.wl().set_hardstate(hs);
        }
        let truncated = (bytes.len() - off) as u64;
        if truncated > 0 {
            tracing::warn!(%path, truncated, "cutting a torn tail off the Raft log");
            disk.truncate(LOG_FILE, off as u64).map_err(io)?;
        }
        let mut log = LogFile { disk, buf: Vec::new() };
        let fresh = !have_conf && snapshot.is_none();
        if fresh {
            storage.wl().set_conf_state(ConfState::from((voters.to_vec(), vec![])));
            log.push(LogRecord { kind: Some(log_record::Kind::ConfState(ConfStateRecord { voters: voters.to_vec() })) });
            log.sync()?;
        }
        Ok((log, Recovered { storage, snapshot, entries, truncated_bytes: truncated, fresh }))
    }

    /// Makes `snap` the base of the log: writes `snapshot.pb`, then replaces `raft.log` with
    /// the hard state and `keep` (the entries after the snapshot). Each file is replaced
    /// atomically and durably, in that order, so a crash between them leaves the new snapshot
    /// and the old log, whose covered entries replay skips.
    pub fn save_snapshot(&mut self, snap: &Snapshot, keep: &[Entry], hs: &HardState) -> Result<(), CoordError> {
        let bytes = snap.write_to_bytes().map_err(|e| CoordError::Io(e.to_string()))?;
        let file = SnapshotFile { blake3: blake3::hash(&bytes).to_hex().to_string(), snapshot: bytes };
        let snap_path = self.disk.describe(SNAPSHOT_FILE);
        self.disk.replace(SNAPSHOT_FILE, &file.encode_to_vec()).map_err(|e| CoordError::Io(format!("{snap_path}: {e}")))?;
        // What was pushed but not synced is in `keep` and `hs` already.
        self.buf.clear();
        self.set_hard_state(hs)?;
        self.append_entries(keep)?;
        let log_path = self.disk.describe(LOG_FILE);
        self.disk.replace(LOG_FILE, &self.buf).map_err(|e| CoordError::Io(format!("{log_path}: {e}")))?;
        self.buf.clear();
        Ok(())
    }
}

/// The snapshot on `disk`, checked against its blake3; None if there is none.
fn read_snapshot(disk: &mut dyn Disk) -> Result<Option<Snapshot>, CoordError> {
    let path = disk.describe(SNAPSHOT_FILE);
    let Some(bytes) = disk.read(SNAPSHOT_FILE).map_err(|e| CoordError::Io(format!("{path}: {e}")))? else { return Ok(None) };
    let corrupt = |reason: String| CoordError::CorruptLog { path: path.clone(), offset: 0, reason };
    let file = SnapshotFile::decode(&bytes[..]).map_err(|e| corrupt(format!("not a snapshot file: {e}")))?;
    if blake3::hash(&file.snapshot).to_hex().to_string() != file.blake3 {
        return Err(corrupt("blake3 does not match".into()));
    }
    let snap = Snapshot::parse_from_bytes(&file.snapshot).map_err(|e| corrupt(format!("not a raft snapshot: {e}")))?;
    Ok(Some(snap))
}

impl LogFile {
    fn push(&mut self, rec: LogRecord) {
        frame(&mut self.buf, &rec);
    }

    pub fn append_entries(&mut self, entries: &[Entry]) -> Result<(), CoordError> {
        for e in entries {
            let b = e.write_to_bytes().map_err(|e| CoordError::Io(e.to_string()))?;
            self.push(LogRecord { kind: Some(log_record::Kind::Entry(b)) });
        }
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), CoordError> {
        let b = hs.write_to_bytes().map_err(|e| CoordError::Io(e.to_string()))?;
        self.push(LogRecord { kind: Some(log_record::Kind::HardState(b)) });
        Ok(())
    }

    /// Writes everything pushed since the last sync and makes it durable.
    pub fn sync(&mut self) -> Result<(), CoordError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = self.disk.describe(LOG_FILE);
        let io = |e: std::io::Error| CoordError::Io(format!("{path}: {e}"));
        self.disk.append(LOG_FILE, &self.buf).map_err(io)?;
        self.disk.sync(LOG_FILE).map_err(io)?;
        self.buf.clear();
        Ok(())
    }
}

/// Whether the bad record at `off` is a torn tail (nothing valid after it, within what one
/// write can leave) or corruption, which is an error naming the file and offset.
fn check_torn(path: &str, bytes: &[u8], off: usize) -> Result<(), CoordError> {
    let rest = &bytes[off..];
    let corrupt = |reason: String| CoordError::CorruptLog { path: path.to_string(), offset: off as u64, reason };
    if rest.len() > MAX_TORN {
        return Err(corrupt(format!("a bad record with {} bytes after it, more than one write leaves", rest.len())));
    }
    // Every offset may start a record, and checking one costs its length: a budget keeps the
    // scan linear in the tail. A tail that exhausts it cannot be told from corruption, and is
    // refused like corruption (cutting it could drop committed entries).
    let mut budget = 8 * rest.len() + (1 << 16);
    for i in 1..rest.len() {
        let tail = &rest[i..];
        let Some(len) = tail.get(0..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize) else { break };
        if len > MAX_RECORD || tail.len() < 8 + len {
            continue;
        }
        if len > budget {
            return Err(corrupt(format!("a bad record with {} bytes after it that cannot be told from corruption", rest.len())));
        }
        budget -= len;
        if parse_record(tail).is_some_and(|(_, r)| r.kind.is_some()) {
            return Err(corrupt(format!("a bad record followed by a valid one at offset {}", off + i)));
        }
    }
    Ok(())
}

/// One framed record at the start of `bytes`, with its total length; None if torn or corrupt.
fn parse_record(bytes: &[u8]) -> Option<(usize, LogRecord)> {
    if bytes.len() < 8 {
        return None;
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
    if len > MAX_RECORD || bytes.len() < 8 + len {
        return None;
    }
    let payload = &bytes[8..8 + len];
    if crc32fast::hash(payload) != crc {
        return None;
    }
    LogRecord::decode(payload).ok().map(|r| (8 + len, r))
}

#[cfg(test)]
// raft-rs's protobuf types are built by assigning fields.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    #[test]
    fn replays_entries_and_hard_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, rec) = LogFile::open(dir.path(), &[1]).unwrap();
            assert!(rec.fresh);
            log.append_entries(&[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            let mut hs = HardState::default();
            hs.term = 1;
            hs.commit = 2;
            log.set_hard_state(&hs).unwrap();
            log.sync().unwrap();
        }
        let (_log, rec) = LogFile::open(dir.path(), &[9]).unwrap();
        assert!(!rec.fresh);
        assert_eq!(rec.entries, 2);
        let st = rec.storage.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 2);
        assert_eq!(st.conf_state.voters, vec![1], "membership comes from the log, not the flag");
        assert_eq!(rec.storage.last_index().unwrap(), 2);
    }

    fn three_records(dir: &Path) -> (PathBuf, Vec<u64>) {
        let (mut log, _) = LogFile::open(dir, &[1]).unwrap();
        let path = dir.join("raft.log");
        let mut ends = vec![std::fs::metadata(&path).unwrap().len()];
        for i in 1..=3 {
            log.append_entries(&[entry(i, 1, &[i as u8; 40])]).unwrap();
            log.sync().unwrap();
            ends.push(std::fs::metadata(&path).unwrap().len());
        }
        (path, ends)
    }

    #[test]
    fn corruption_before_the_last_record_stops_the_replica_and_cuts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        // One flipped byte inside entry 1's payload; entries 2 and 3 follow intact.
        bytes[ends[0] as usize + 20] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let e = LogFile::open(dir.path(), &[1]).err().expect("a corrupt log must not open").to_string();
        assert!(e.contains("raft.log") && e.contains(&format!("offset {}", ends[0])), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), ends[3], "nothing was cut");

        // A garbage length in the middle record is corruption too, not a torn tail.
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[ends[1] as usize..ends[1] as usize + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = LogFile::open(dir.path(), &[1]).err().expect("a corrupt log must not open").to_string();
        assert!(e.contains(&format!("offset {}", ends[1])), "{e}");
    }

    #[test]
    fn a_crash_between_the_snapshot_and_the_compaction_replays_only_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = LogFile::open(dir.path(), &[1]).unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1, &[i as u8])).collect();
        log.append_entries(&entries).unwrap();
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = 10;
        log.set_hard_state(&hs).unwrap();
        log.sync().unwrap();
        let full_log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 6;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        log.save_snapshot(&snap, &entries[6..], &hs).unwrap();
        drop(log);
        // The crash came after the snapshot file, before the log was rewritten.
        std::fs::write(dir.path().join(LOG_FILE), &full_log).unwrap();
        let (_log, rec) = LogFile::open(dir.path(), &[1]).unwrap();
        assert_eq!(rec.snapshot.unwrap().get_metadata().index, 6);
        assert_eq!(rec.entries, 4, "entries 7..=10 after the snapshot, nothing it covers");
        assert_eq!(rec.storage.first_index().unwrap(), 7);
        assert_eq!(rec.storage.last_index().unwrap(), 10);
        assert_eq!(rec.storage.initial_state().unwrap().hard_state.commit, 10);
    }

    /// A crash between a hard state record and the entries it covers (a snapshot installed
    /// with a commit index past it, then the crash before the entries after it were synced)
    /// leaves a commit index past the log; the replica must still start (raft-rs refuses a
    /// commit index beyond the last entry), with the commit lowered to what the log holds.
    #[test]
    fn a_commit_index_past_the_log_is_lowered_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = LogFile::open(dir.path(), &[1, 2, 3]).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let mut hs = HardState::default();
        hs.term = 2;
        hs.commit = 15;
        log.save_snapshot(&snap, &[], &hs).unwrap();
        drop(log);
        let (_log, rec) = LogFile::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(rec.storage.initial_state().unwrap().hard_state.commit, 10);
        let state = std::sync::Arc::new(std::sync::RwLock::new(crate::state::StateMachine::default()));
        let snap_data = crate::state::StateMachine::default().encode_snapshot(10);
        let mut with_data = rec.snapshot.clone().unwrap();
        with_data.set_data(snap_data.into());
        // Starts (raft-rs would panic on "commit 15 is out of range [last index 10]").
        let core = crate::node::Core::new(2, crate::node::RaftStore::new(rec.storage, Some(with_data)), state).unwrap();
        assert_eq!(core.commit_index(), 10);
    }

    /// A garbage tail whose every offset reads as a long record used to cost a checksum of
    /// megabytes per byte of it (quadratic): the scan is bounded, and answers at once.
    #[test]
    fn a_garbage_tail_is_judged_in_linear_time() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        // Every 4 bytes read as a length of 16 MiB + change, which fits in the tail.
        f.write_all(&vec![0x01u8; 40 << 20]).unwrap();
        drop(f);
        let started = std::time::Instant::now();
        let e = LogFile::open(dir.path(), &[1]).err().expect("an unclear tail is refused, not cut").to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
        assert!(e.contains("cannot be told from corruption") && e.contains(&format!("offset {}", ends[3])), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), ends[3] + (40 << 20), "nothing was cut");
    }

    #[test]
    fn a_zero_filled_tail_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        drop(f);
        let (_log, rec) = LogFile::open(dir.path(), &[1]).unwrap();
        assert_eq!((rec.entries, rec.truncated_bytes), (3, 4096));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), ends[3]);
    }

    #[test]
    fn torn_tail_is_cut_and_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = LogFile::open(dir.path(), &[1]).unwrap();
            log.append_entries(&[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            log.sync().unwrap();
        }
        let path = dir.path().join("raft.log");
        let len = std::fs::metadata(&path).unwrap().len();
        // Tear the last record, then also flip a byte in a copy to check the checksum.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let (_log, rec) = LogFile::open(dir.path(), &[1]).unwrap();
        assert_eq!(rec.entries, 1);
        assert!(rec.truncated_bytes > 0);

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_log, rec) = LogFile::open(dir.path(), &[1]).unwrap();
        assert_eq!(rec.entries, 0, "a record with a bad checksum is not loaded");
    }
}
