//! The data loader: dataset shards memory-mapped from the store, checked against the
//! manifest's blake3 hashes once when opened, then read record by record with no copies
//! beyond the batch being assembled.

use std::ops::Range;
use std::path::Path;

use memmap2::Mmap;
use safetensors::Dtype;
use shoal_core::dataset::{parse_shard, ShardView};
use shoal_proto::{DatasetInfo, ShardInfo};

use crate::WorkerError;

struct MappedShard {
    map: Mmap,
    x: Range<usize>,
    y: Range<usize>,
    x_dtype: Dtype,
    records: usize,
}

pub struct ShardedDataset {
    shards: Vec<MappedShard>,
    /// First global record index of each shard.
    starts: Vec<u64>,
    pub records: u64,
    pub feature_len: usize,
    pub feature_shape: Vec<usize>,
    pub classes: usize,
}

fn range_in(map: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - map.as_ptr() as usize;
    start..start + part.len()
}

impl ShardedDataset {
    pub fn open(store: &Path, info: &DatasetInfo) -> Result<ShardedDataset, WorkerError> {
        if info.shards.is_empty() {
            return Err(WorkerError::Data(format!("dataset {} v{} has no shards", info.name, info.version)));
        }
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut next = 0u64;
        for s in &info.shards {
            let path = store.join(&s.path);
            let shard = open_shard(&path, s, &info.feature_shape)?;
            starts.push(next);
            next += s.records;
            shards.push(shard);
        }
        if next != info.records {
            return Err(WorkerError::Data(format!("dataset {} v{}: shards hold {next} records, manifest says {}", info.name, info.version, info.records)));
        }
        Ok(ShardedDataset {
            shards,
            starts,
            records: next,
            // Checked by parse_shard for every shard opened above.
            feature_len: info.feature_shape.iter().map(|&d| d as usize).product(),
            feature_shape: info.feature_shape.iter().map(|&d| d as usize).collect(),
            classes: info.classes as usize,
        })
    }

    fn view(&self, shard: usize) -> ShardView<'_> {
        let s = &self.shards[shard];
        ShardView { records: s.records, x: &s.map[s.x.clone()], x_dtype: s.x_dtype, y: &s.map[s.y.clone()], feature_len: self.feature_len }
    }

    /// Appends record `index`'s features (f32) and label to the batch buffers.
    pub fn push_record(&self, index: u64, x: &mut Vec<f32>, y: &mut Vec<u32>) -> Result<(), WorkerError> {
        if index >= self.records {
            return Err(WorkerError::Data(format!("record {index} is out of range (dataset has {})", self.records)));
        }
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        let local = (index - self.starts[shard]) as usize;
        let v = self.view(shard);
        v.push_features(local, x);
        let label = v.label(local);
        if label < 0 || label as usize >= self.classes {
            return Err(WorkerError::Data(format!("record {index} has label {label}, outside 0..{}", self.classes)));
        }
        y.push(label as u32);
        Ok(())
    }
}

impl ShardedDataset {
    /// Records [start, end) as stored (u8 features stay u8), for statistics and for handing
    /// a shard's records to a user command.
    pub fn raw_records(&self, start: u64, end: u64) -> Result<shoal_core::dataset::Records, WorkerError> {
        use shoal_core::idx::IdxData;
        if start > end || end > self.records {
            return Err(WorkerError::Data(format!("records [{start}, {end}) are outside the {} records", self.records)));
        }
        let f = self.feature_len;
        let (mut u8s, mut f32s, mut labels) = (Vec::new(), Vec::new(), Vec::with_capacity((end - start) as usize));
        let mut i = start;
        while i < end {
            let shard = self.starts.partition_point(|&s| s <= i) - 1;
            let v = self.view(shard);
            let local = (i - self.starts[shard]) as usize;
            let n = (v.records - local).min((end - i) as usize);
            match v.x_dtype {
                Dtype::U8 => u8s.extend_from_slice(&v.x[local * f..(local + n) * f]),
                _ => f32s.extend(v.x[local * f * 4..(local + n) * f * 4].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))),
            }
            labels.extend((local..local + n).map(|r| v.label(r)));
            i += n as u64;
        }
        let features = if f32s.is_empty() && !u8s.is_empty() { IdxData::U8(u8s) } else { IdxData::F32(f32s) };
        Ok(shoal_core::dataset::Records { features, feature_shape: self.feature_shape.clone(), labels })
    }
}

fn open_shard(path: &Path, info: &ShardInfo, feature_shape: &[u64]) -> Result<MappedShard, WorkerError> {
    let file = std::fs::File::open(path).map_err(|e| WorkerError::Data(format!("{}: {e}", path.display())))?;
    // SAFETY: shards are written once (atomically) and never modified in place; the store
    // treats them as immutable, so the mapping cannot change under us.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WorkerError::Data(format!("{}: mmap: {e}", path.display())))?;
    let hash = blake3::hash(&map).to_hex().to_string();
    if hash != info.blake3 {
        return Err(WorkerError::Data(format!("{}: blake3 {hash} does not match the manifest's {}", path.display(), info.blake3)));
    }
    let name = path.display().to_string();
    let (x, y, x_dtype, records) = {
        let v = parse_shard(&name, &map, info, feature_shape).map_err(|e| WorkerError::Data(e.to_string()))?;
        (range_in(&map, v.x), range_in(&map, v.y), v.x_dtype, v.records)
    };
    Ok(MappedShard { map, x, y, x_dtype, records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::dataset::{write_shards, Records};
    use shoal_core::idx::IdxData;

    #[test]
    fn reads_records_across_shards_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let recs = Records { features: IdxData::U8((0..40u8).collect()), feature_shape: vec![4], labels: (0..10).map(|i| i % 2).collect() };
        let folder = shoal_core::dataset::import_dir("d", "t").unwrap();
        let info = write_shards(dir.path(), "d", &folder, &recs, 3).unwrap();
        let ds = ShardedDataset::open(dir.path(), &info).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        ds.push_record(7, &mut x, &mut y).unwrap();
        assert_eq!(x, (28..32).map(|b| b as f32 / 255.0).collect::<Vec<_>>());
        assert_eq!(y, vec![1]);
        assert!(ds.push_record(10, &mut x, &mut y).is_err());

        let p = dir.path().join(&info.shards[1].path);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        let e = ShardedDataset::open(dir.path(), &info).err().unwrap().to_string();
        assert!(e.contains("blake3"), "{e}");
    }
}
