//! TensorBoard event files: each rank appends its metric history's points as scalar summaries
//! to `jobs/ID/tensorboard/events.out.tfevents.SECONDS.gGEN-rRANK` in the store, so
//! `tensorboard --logdir STORE/jobs/ID/tensorboard` shows the run (rank 0's figures under
//! their keys, each rank's phase times under `rankR/KEY`). The format is TFRecord (length,
//! masked CRC-32C of it, data, masked CRC-32C of it) of `Event` protobufs, written with prost
//! and the CRC below: the TensorBoard writer crates are unmaintained.

use std::io::Write;

use shoal_core::store::Store;

use shoal_proto::{Message, TfEvent, TfSummary, TfSummaryValue};

/// CRC-32C (Castagnoli), reflected, as TFRecord uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            c
        })
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masking of a CRC.
pub fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked(crc32c(&len)).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked(crc32c(data)).to_le_bytes());
    out
}

/// An event file being appended to: a local file, or (an object store cannot append) a new
/// object per write, `NAME.000001`..., each a whole event file (TensorBoard reads every file
/// of the folder).
pub struct EventFile {
    sink: Sink,
}

enum Sink {
    File(std::fs::File),
    Objects { store: Store, key: String, first: Vec<u8>, next: u64 },
}

impl EventFile {
    /// Creates `dir/events.out.tfevents.SECONDS.SUFFIX` (`dir` a store key) with its
    /// file-version record.
    pub fn create(store: &Store, dir: &str, suffix: &str) -> std::io::Result<EventFile> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let name = format!("events.out.tfevents.{}.{suffix}", now.as_secs());
        let first = record(&TfEvent { wall_time: now.as_secs_f64(), file_version: "brain.Event:2".into(), ..Default::default() }.encode_to_vec());
        let key = format!("{dir}/{name}");
        let sink = match store.local_path(&key).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))? {
            Some(path) => {
                std::fs::create_dir_all(path.parent().expect("a key has a folder"))?;
                let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
                file.write_all(&first)?;
                Sink::File(file)
            }
            None => Sink::Objects { store: store.clone(), key, first, next: 0 },
        };
        Ok(EventFile { sink })
    }

    /// Appends scalars: (tag, step, unix_ms, value) each.
    pub fn scalars<'a>(&mut self, points: impl IntoIterator<Item = (&'a str, u64, u64, f64)>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for (tag, step, unix_ms, value) in points {
            let event = TfEvent {
                wall_time: unix_ms as f64 / 1000.0,
                step: i64::try_from(step).unwrap_or(i64::MAX),
                summary: Some(TfSummary { value: vec![TfSummaryValue { tag: tag.to_string(), simple_value: value as f32 }] }),
                ..Default::default()
            };
            buf.extend_from_slice(&record(&event.encode_to_vec()));
        }
        match &mut self.sink {
            Sink::File(file) => file.write_all(&buf),
            Sink::Objects { store, key, first, next } => {
                *next += 1;
                store.put(&format!("{key}.{next:06}"), &[first, &buf]).map_err(|e| std::io::Error::other(e.to_string()))
            }
        }
    }
}

/// The events of a file, checking every CRC (a torn last record ends the list).
pub fn read_events(bytes: &[u8]) -> Result<Vec<TfEvent>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| "short length")?) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().map_err(|_| "short crc")?);
        if crc != masked(crc32c(len_bytes)) {
            return Err(format!("record at {at}: the length's CRC does not match"));
        }
        let Some(end) = (at + 12).checked_add(len).filter(|&e| e + 4 <= bytes.len()) else { break };
        let data = &bytes[at + 12..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().map_err(|_| "short crc")?);
        if crc != masked(crc32c(data)) {
            return Err(format!("record at {at}: the data's CRC does not match"));
        }
        out.push(TfEvent::decode(data).map_err(|e| format!("record at {at}: {e}"))?);
        at = end + 4;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn an_event_file_reads_back_with_its_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = EventFile::create(&Store::local(dir.path()), "tb", "g1-r0").unwrap();
        f.scalars([("loss", 1, 1_000, 2.5), ("loss", 2, 2_000, 1.25), ("rank1/phase_data_ms", 2, 2_000, 0.5)]).unwrap();
        drop(f);
        let file = std::fs::read_dir(dir.path().join("tb")).unwrap().next().unwrap().unwrap().path();
        assert!(file.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
        let mut bytes = std::fs::read(&file).unwrap();
        let events = read_events(&bytes).unwrap();
        assert_eq!(events[0].file_version, "brain.Event:2");
        let scalars: Vec<(String, i64, f32)> = events[1..].iter().map(|e| {
            let v = &e.summary.as_ref().unwrap().value[0];
            (v.tag.clone(), e.step, v.simple_value)
        }).collect();
        assert_eq!(scalars, [("loss".to_string(), 1, 2.5), ("loss".to_string(), 2, 1.25), ("rank1/phase_data_ms".to_string(), 2, 0.5)]);
        // A torn tail is where the list ends; a flipped byte is an error.
        bytes.truncate(bytes.len() - 3);
        assert_eq!(read_events(&bytes).unwrap().len(), 3);
        bytes[14] ^= 1;
        assert!(read_events(&bytes).unwrap_err().contains("CRC"));
    }
}
