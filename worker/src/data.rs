//! The data loader: dataset shards memory-mapped from the store, checked against the
//! manifest's blake3 hashes once when opened, then read record by record with no copies
//! beyond the batch being assembled.

use std::ops::Range;
use std::path::Path;

use memmap2::Mmap;
use safetensors::Dtype;
use shoal_core::dataset::{parse_shard, ShardView};
use shoal_core::store::Store;
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
    /// Float targets per record (a regression); 0: records have class labels.
    pub target_width: usize,
    /// Text: tokens a model reads per window (each record holds context + 1); 0: not text.
    pub context: usize,
    missing: Missing,
}

/// What reading a record does with a feature value that is not a finite number (only f32
/// shards can hold one: u8 features are always finite).
#[derive(Clone, Debug, PartialEq)]
pub enum Missing {
    /// Hands values on as stored (batch jobs: their operators see the data as it is).
    Keep,
    /// Training without `[dataset] fill_missing`: a NaN or infinite value is an error that
    /// names the record and the feature, instead of a loss that diverges.
    Refuse,
    /// Training with `fill_missing`: feature j's NaN becomes the j-th value; an infinite value
    /// is still an error (it is not missing, it is wrong).
    Fill(Vec<f32>),
}

fn range_in(map: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - map.as_ptr() as usize;
    start..start + part.len()
}

impl ShardedDataset {
    pub fn open(store: &Store, info: &DatasetInfo) -> Result<ShardedDataset, WorkerError> {
        if info.shards.is_empty() {
            return Err(WorkerError::Data(format!("dataset {} v{} has no shards", info.name, info.version)));
        }
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut next = 0u64;
        for s in &info.shards {
            // A local store's file, or a verified copy of the object in the shard cache.
            let path = store.local_copy(&s.path, s.bytes, &s.blake3).map_err(|e| WorkerError::Data(e.to_string()))?;
            let shard = open_shard(&path, s, &info.feature_shape, info.target_width)?;
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
            target_width: info.target_width as usize,
            context: info.context as usize,
            missing: Missing::Keep,
        })
    }

    /// Sets what `push_record` does with values that are not finite (`Missing::Keep` until
    /// then). A fill must give one value per feature.
    pub fn set_missing(&mut self, missing: Missing) -> Result<(), WorkerError> {
        if let Missing::Fill(v) = &missing {
            if v.len() != self.feature_len {
                return Err(WorkerError::Data(format!("{} fill values for records of {} features", v.len(), self.feature_len)));
            }
        }
        self.missing = missing;
        Ok(())
    }

    fn view(&self, shard: usize) -> ShardView<'_> {
        let s = &self.shards[shard];
        ShardView { records: s.records, x: &s.map[s.x.clone()], x_dtype: s.x_dtype, y: &s.map[s.y.clone()], feature_len: self.feature_len, target_width: self.target_width }
    }

    /// Appends record `index`'s features (f32) and label to the batch buffers.
    pub fn push_record(&self, index: u64, x: &mut Vec<f32>, y: &mut Vec<u32>) -> Result<(), WorkerError> {
        if index >= self.records {
            return Err(WorkerError::Data(format!("record {index} is out of range (dataset has {})", self.records)));
        }
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        let local = (index - self.starts[shard]) as usize;
        let v = self.view(shard);
        if self.context > 0 {
            // A text window: the model reads its first `context` tokens (as ids) and
            // predicts each next one.
            let (c, w) = (self.context, self.feature_len);
            let tokens = &v.x[local * w..(local + 1) * w];
            x.extend(tokens[..c].iter().map(|&b| b as f32));
            y.extend(tokens[1..].iter().map(|&b| b as u32));
            return Ok(());
        }
        let at = x.len();
        v.push_features(local, x);
        if v.x_dtype != Dtype::U8 && !matches!(self.missing, Missing::Keep) {
            self.check_values(index, &mut x[at..])?;
        }
        let label = v.label(local);
        if self.target_width == 0 && (label < 0 || label as usize >= self.classes) {
            return Err(WorkerError::Data(format!("record {index} has label {label}, outside 0..{}", self.classes)));
        }
        y.push(label as u32);
        Ok(())
    }

    /// Appends record `index`'s float targets (`target_width` of them; none for a dataset of
    /// class labels) to `t`.
    pub fn push_targets(&self, index: u64, t: &mut Vec<f32>) -> Result<(), WorkerError> {
        if self.target_width == 0 {
            return Ok(());
        }
        if index >= self.records {
            return Err(WorkerError::Data(format!("record {index} is out of range (dataset has {})", self.records)));
        }
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        self.view(shard).push_targets((index - self.starts[shard]) as usize, t);
        Ok(())
    }
}

impl ShardedDataset {
    /// Applies the missing-value policy to record `index`'s features `x`.
    fn check_values(&self, index: u64, x: &mut [f32]) -> Result<(), WorkerError> {
        // One vectorized look at the record; only a record with a bad value is walked.
        let Some(first) = shoal_kernels::first_non_finite(x) else { return Ok(()) };
        let bad = |j: usize, what: &str| WorkerError::Data(format!("record {index}, feature {j}: {what}"));
        for (j, v) in x.iter_mut().enumerate().skip(first) {
            match (&self.missing, v.is_nan()) {
                (_, false) if v.is_infinite() => return Err(bad(j, &format!("the value is {v}, not a finite number"))),
                (Missing::Fill(fill), true) => *v = fill[j],
                (Missing::Refuse, true) => {
                    return Err(bad(j, "the value is missing (NaN); set [dataset] fill_missing = \"mean\" or a number to fill it"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Records [start, end) as stored (u8 features stay u8), for statistics and for handing
    /// a shard's records to a user command.
    pub fn raw_records(&self, start: u64, end: u64) -> Result<shoal_core::dataset::Records, WorkerError> {
        use shoal_core::idx::IdxData;
        if start > end || end > self.records {
            return Err(WorkerError::Data(format!("records [{start}, {end}) are outside the {} records", self.records)));
        }
        let f = self.feature_len;
        let (mut u8s, mut f32s, mut labels, mut targets) = (Vec::new(), Vec::new(), Vec::with_capacity((end - start) as usize), Vec::new());
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
            for r in local..local + n {
                v.push_targets(r, &mut targets);
            }
            i += n as u64;
        }
        let features = if f32s.is_empty() && !u8s.is_empty() { IdxData::U8(u8s) } else { IdxData::F32(f32s) };
        let targets = (self.target_width > 0).then_some(shoal_core::dataset::Targets { values: targets, width: self.target_width });
        Ok(shoal_core::dataset::Records { features, feature_shape: self.feature_shape.clone(), labels, targets })
    }
}

fn open_shard(path: &Path, info: &ShardInfo, feature_shape: &[u64], target_width: u32) -> Result<MappedShard, WorkerError> {
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
        let v = parse_shard(&name, &map, info, feature_shape, target_width).map_err(|e| WorkerError::Data(e.to_string()))?;
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
        let recs = Records { features: IdxData::U8((0..40u8).collect()), feature_shape: vec![4], labels: (0..10).map(|i| i % 2).collect(), targets: None };
        let folder = shoal_core::dataset::import_dir("d", "t").unwrap();
        let info = write_shards(dir.path(), "d", &folder, &recs, 3).unwrap();
        let ds = ShardedDataset::open(&Store::local(dir.path()), &info).unwrap();
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
        let e = ShardedDataset::open(&Store::local(dir.path()), &info).err().unwrap().to_string();
        assert!(e.contains("blake3"), "{e}");
    }

    #[test]
    fn missing_values_are_kept_refused_or_filled() {
        let dir = tempfile::tempdir().unwrap();
        let nan = f32::NAN;
        let x = vec![1.0, 2.0, 3.0, nan, 5.0, nan, 7.0, 8.0, 9.0, 1.0, f32::INFINITY, 2.0];
        let recs = Records { features: IdxData::F32(x), feature_shape: vec![3], labels: vec![0, 1, 0, 1], targets: None };
        let folder = shoal_core::dataset::import_dir("d", "t").unwrap();
        let info = write_shards(dir.path(), "d", &folder, &recs, 2).unwrap();
        let mut ds = ShardedDataset::open(&Store::local(dir.path()), &info).unwrap();
        let read = |ds: &ShardedDataset, i: u64| {
            let (mut x, mut y) = (vec![-9.0], Vec::new());
            ds.push_record(i, &mut x, &mut y).map(|()| x[1..].to_vec())
        };
        // Batch jobs see the data as stored.
        assert!(read(&ds, 1).unwrap()[0].is_nan());
        assert!(read(&ds, 3).unwrap()[1].is_infinite());

        ds.set_missing(Missing::Refuse).unwrap();
        assert_eq!(read(&ds, 0).unwrap(), [1.0, 2.0, 3.0]);
        let e = read(&ds, 1).unwrap_err().to_string();
        assert!(e.contains("record 1, feature 0") && e.contains("missing") && e.contains("fill_missing"), "{e}");
        let e = read(&ds, 3).unwrap_err().to_string();
        assert!(e.contains("record 3, feature 1") && e.contains("inf"), "{e}");

        ds.set_missing(Missing::Fill(vec![10.0, 20.0, 30.0])).unwrap();
        assert_eq!(read(&ds, 1).unwrap(), [10.0, 5.0, 30.0], "each NaN gets its own feature's value");
        assert_eq!(read(&ds, 2).unwrap(), [7.0, 8.0, 9.0]);
        assert!(read(&ds, 3).unwrap_err().to_string().contains("record 3, feature 1"), "an infinity is not missing");
        assert!(ds.set_missing(Missing::Fill(vec![0.0; 2])).is_err());
    }
}
