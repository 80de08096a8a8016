//! The coordinator's durable Raft log: one append-only file of framed records
//! (`len u32 LE | crc32 u32 LE | LogRecord protobuf`), fsynced once per Ready. On start the
//! file is replayed into raft-rs's in-memory storage; a torn or corrupt tail (a crash mid-write)
//! is detected by its checksum, reported, and cut off, never loaded.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::storage::MemStorage;
use shoal_proto::{log_record, ConfStateRecord, LogRecord, Message};

use crate::CoordError;

const MAX_RECORD: usize = 64 << 20;

pub struct LogFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

/// What replaying a log file found.
pub struct Recovered {
    pub storage: MemStorage,
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
    /// Opens (or creates) the log in `dir` and replays it. `voters` seeds a fresh log's
    /// membership; an existing log keeps its own.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<(LogFile, Recovered), CoordError> {
        let path = dir.join("raft.log");
        let io = |e| CoordError::Io(format!("{}: {e}", path.display()));
        let bytes = if path.exists() { std::fs::read(&path).map_err(io)? } else { Vec::new() };
        let storage = MemStorage::new();
        let mut off = 0usize;
        let (mut entries, mut have_conf) = (0u64, false);
        let mut hard_state: Option<HardState> = None;
        while off < bytes.len() {
            let Some(rec) = parse_record(&bytes[off..]) else { break };
            let (len, rec) = rec;
            match rec.kind {
                Some(log_record::Kind::Entry(b)) => {
                    let Ok(e) = Entry::parse_from_bytes(&b) else { break };
                    storage.wl().append(&[e]).map_err(|e| CoordError::Io(format!("{}: replay: {e}", path.display())))?;
                    entries += 1;
                }
                Some(log_record::Kind::HardState(b)) => {
                    let Ok(hs) = HardState::parse_from_bytes(&b) else { break };
                    hard_state = Some(hs);
                }
                Some(log_record::Kind::ConfState(cs)) => {
                    storage.wl().set_conf_state(ConfState::from((cs.voters, vec![])));
                    have_conf = true;
                }
                None => break,
            }
            off += len;
        }
        if let Some(hs) = hard_state {
            storage.wl().set_hardstate(hs);
        }
        let truncated = (bytes.len() - off) as u64;
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&path).map_err(io)?;
        if truncated > 0 {
            tracing::warn!(path = %path.display(), truncated, "cutting a torn or corrupt tail off the Raft log");
            file.set_len(off as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let mut log = LogFile { path, file, buf: Vec::new() };
        let fresh = !have_conf;
        if fresh {
            storage.wl().set_conf_state(ConfState::from((voters.to_vec(), vec![])));
            log.push(LogRecord { kind: Some(log_record::Kind::ConfState(ConfStateRecord { voters: voters.to_vec() })) });
            log.sync()?;
        }
        Ok((log, Recovered { storage, entries, truncated_bytes: truncated, fresh }))
    }

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
        let io = |e| CoordError::Io(format!("{}: {e}", self.path.display()));
        self.file.write_all(&self.buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.buf.clear();
        Ok(())
    }
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
