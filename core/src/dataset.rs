//! Datasets in the store: `datasets/<name>/import-<id>/shard-NNNNN.safetensors`, each shard a
//! safetensors file with `x` (features, u8 or f32, shape [n, ...]) and `y` (labels, i64, [n]),
//! plus `manifest.pb` (a protobuf `DatasetManifest`). Shards are hashed with blake3.
//!
//! Every import writes into a folder of its own, named by its request id, and the coordinator
//! gives it the next version number when it registers it: so no import ever writes, or cleans
//! up, a folder that a registered version uses, however many run at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use shoal_proto::{DatasetInfo, DatasetManifest, Message, ShardInfo};

use crate::fsutil::write_atomic;
use crate::idx::{IdxArray, IdxData};
use crate::{CoreError, Result};

pub const DEFAULT_RECORDS_PER_SHARD: usize = 2048;

/// Checks a dataset name: it becomes a folder name in the store.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CoreError::Dataset(format!("name {name:?} must be 1-128 of [A-Za-z0-9._-] and not start with '.'")))
    }
}

/// Features and labels in memory, ready to be sharded.
#[derive(Clone, Debug)]
pub struct Records {
    pub features: IdxData,
    /// Shape of one record's features, e.g. [28, 28].
    pub feature_shape: Vec<usize>,
    pub labels: Vec<i64>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pairs IDX arrays: the one with 2+ dimensions is the features, the 1-dimensional one the
    /// labels. `names` are the files they came from, for error messages.
    pub fn from_idx(arrays: Vec<(String, IdxArray)>) -> Result<Records> {
        let (mut feats, mut labels) = (Vec::new(), Vec::new());
        for (name, a) in arrays {
            if a.dims.len() >= 2 {
                feats.push((name, a));
            } else {
                labels.push((name, a));
            }
        }
        if feats.len() != 1 || labels.len() != 1 {
            return Err(CoreError::Dataset(format!(
                "need exactly one features file (2+ dimensions) and one labels file (1 dimension); got {} and {}",
                feats.len(),
                labels.len()
            )));
        }
        let (fname, f) = feats.pop().unwrap();
        let (lname, l) = labels.pop().unwrap();
        if f.len() != l.len() {
            return Err(CoreError::Dataset(format!("{fname} has {} records but {lname} has {}", f.len(), l.len())));
        }
        if f.is_empty() {
            return Err(CoreError::Dataset(format!("{fname} has no records")));
        }
        let labels: Vec<i64> = match l.data {
            IdxData::U8(v) => v.into_iter().map(i64::from).collect(),
            IdxData::F32(v) => {
                let mut out = Vec::with_capacity(v.len());
                for (i, x) in v.into_iter().enumerate() {
                    if x < 0.0 || x.fract() != 0.0 || x > 1e6 {
                        return Err(CoreError::Dataset(format!("{lname}: label {i} is {x}, not a class index")));
                    }
                    out.push(x as i64);
                }
                out
            }
        };
        Ok(Records { features: f.data, feature_shape: f.dims[1..].to_vec(), labels })
    }

    pub fn classes(&self) -> u32 {
        self.labels.iter().copied().max().map(|m| m as u32 + 1).unwrap_or(0)
    }

    /// The features' dtype as the schema names it: `u8` or `f32`.
    pub fn dtype(&self) -> &'static str {
        match self.features {
            IdxData::U8(_) => "u8",
            IdxData::F32(_) => "f32",
        }
    }

    /// Records [start, end) only.
    pub fn select(self, start: usize, end: usize) -> Result<Records> {
        if start >= end || end > self.len() {
            return Err(CoreError::Dataset(format!("records [{start}, {end}) are not within the {} records read", self.len())));
        }
        let f: usize = self.feature_shape.iter().product();
        let features = match self.features {
            IdxData::U8(v) => IdxData::U8(v[start * f..end * f].to_vec()),
            IdxData::F32(v) => IdxData::F32(v[start * f..end * f].to_vec()),
        };
        Ok(Records { features, feature_shape: self.feature_shape, labels: self.labels[start..end].to_vec() })
    }
}

/// Reads a CSV table (`name` for messages): a header row, the label column `label` (integer
/// class ids, or strings mapped to class ids), every other column a numeric feature (an empty
/// cell is missing: NaN). String labels take their ids from `known` (the dataset's classes)
/// and, for names not in it, after them in sorted order. Returns the records (f32 features of
/// shape [columns - 1]) and the class names (empty for integer labels).
pub fn records_from_csv(name: &str, text: &str, label: &str, known: &[String]) -> Result<(Records, Vec<String>)> {
    let bad = |msg: String| CoreError::Dataset(format!("{name}: {msg}"));
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| bad("no header row".into()))?;
    let columns: Vec<&str> = header.split(',').map(|c| c.trim().trim_matches('"')).collect();
    let at = columns.iter().position(|c| *c == label).ok_or_else(|| bad(format!("no column {label:?} for the label (columns: {})", columns.join(", "))))?;
    if columns.len() < 2 {
        return Err(bad("needs a label column and at least one feature column".into()));
    }
    // Lines in blocks parsed in parallel, then joined in order.
    use rayon::prelude::*;
    let lines: Vec<(usize, &str)> = lines.collect();
    let blocks: Vec<(Vec<f32>, Vec<&str>)> = lines
        .par_chunks(16 * 1024)
        .map(|block| {
            let (mut features, mut labels) = (Vec::with_capacity(block.len() * (columns.len() - 1)), Vec::with_capacity(block.len()));
            for &(i, line) in block {
                let mut cells = 0;
                for (j, cell) in line.split(',').enumerate() {
                    cells += 1;
                    if j >= columns.len() {
                        continue;
                    }
                    let cell = cell.trim().trim_matches('"');
                    if j == at {
                        labels.push(cell);
                    } else if cell.is_empty() {
                        features.push(f32::NAN);
                    } else {
                        let v: f32 = cell.parse().map_err(|_| bad(format!("line {}: column {:?} holds {cell:?}, not a number", i + 1, columns[j])))?;
                        features.push(v);
                    }
                }
                if cells != columns.len() {
                    return Err(bad(format!("line {}: {cells} cells, the header has {}", i + 1, columns.len())));
                }
            }
            Ok((features, labels))
        })
        .collect::<Result<_>>()?;
    let (mut features, mut raw_labels) = (Vec::with_capacity(lines.len() * (columns.len() - 1)), Vec::with_capacity(lines.len()));
    for (f, l) in blocks {
        features.extend(f);
        raw_labels.extend(l);
    }
    if raw_labels.is_empty() {
        return Err(bad("no records".into()));
    }
    let integers: Option<Vec<i64>> = raw_labels.iter().map(|l| l.parse::<i64>().ok().filter(|&v| (0..1_000_000).contains(&v))).collect();
    let (labels, names) = match integers {
        Some(ids) if known.is_empty() => (ids, Vec::new()),
        _ => {
            let mut names: Vec<String> = known.to_vec();
            let mut new: Vec<&str> = raw_labels.iter().copied().filter(|l| !known.iter().any(|k| k == l)).collect();
            new.sort_unstable();
            new.dedup();
            names.extend(new.into_iter().map(String::from));
            let index: HashMap<&str, i64> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as i64)).collect();
            let ids = raw_labels.iter().map(|l| index[l]).collect();
            (ids, names)
        }
    };
    let records = Records { features: IdxData::F32(features), feature_shape: vec![columns.len() - 1], labels };
    Ok((records, names))
}

/// One NumPy `.npy` array: its shape and values (as f64, whatever the stored type), and
/// whether the stored type was `u8`.
struct NpyArray {
    shape: Vec<usize>,
    values: Vec<f64>,
    u8: bool,
}

fn parse_npy(name: &str, bytes: &[u8]) -> Result<NpyArray> {
    let bad = |msg: String| CoreError::Dataset(format!("{name}: {msg}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a NumPy .npy file".into()));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize, 12),
        v => return Err(bad(format!(".npy version {v} is not supported"))),
    };
    let header = std::str::from_utf8(bytes.get(start..start + len).ok_or_else(|| bad("truncated header".into()))?).map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").and_then(|r| r.strip_prefix('\'')).and_then(|r| r.split('\'').next()).ok_or_else(|| bad("no 'descr' in the header".into()))?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad("Fortran-ordered arrays are not supported (save with np.ascontiguousarray)".into()));
    }
    let shape_text = field("shape").and_then(|r| r.strip_prefix('(')).and_then(|r| r.split(')').next()).ok_or_else(|| bad("no 'shape' in the header".into()))?;
    let shape = shape_text.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| t.parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>().map_err(|_| bad(format!("shape ({shape_text}) does not parse")))?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("shape too large".into()))?;
    let data = &bytes[start + len..];
    let (width, read): (usize, fn(&[u8]) -> f64) = match descr {
        "|u1" | "<u1" => (1, |b| b[0] as f64),
        "<f4" => (4, |b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64),
        "<f8" => (8, |b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
        "<i4" => (4, |b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64),
        "<i8" => (8, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64),
        other => return Err(bad(format!("dtype {other:?} is not supported (u1, f4, f8, i4 or i8, little-endian)"))),
    };
    if data.len() < count * width {
        return Err(bad(format!("holds {} bytes of data, its shape needs {}", data.len(), count * width)));
    }
    let values = data[..count * width].chunks_exact(width).map(read).collect();
    Ok(NpyArray { shape, values, u8: width == 1 })
}

/// Labels as class ids (non-negative integers).
fn class_ids(name: &str, values: &[f64]) -> Result<Vec<i64>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v >= 0.0 && v.fract() == 0.0 && v < 1e6 {
                Ok(v as i64)
            } else {
                Err(CoreError::Dataset(format!("{name}: label {i} is {v}, not a class index")))
            }
        })
        .collect()
}

fn features(values: Vec<f64>, u8: bool) -> IdxData {
    if u8 {
        IdxData::U8(values.into_iter().map(|v| v as u8).collect())
    } else {
        IdxData::F32(values.into_iter().map(|v| v as f32).collect())
    }
}

/// Reads two NumPy `.npy` files (given as (name, bytes)): the features (2+ dimensions, u8 or
/// float) and the labels (1 dimension, integers).
pub fn records_from_npy(files: Vec<(String, Vec<u8>)>) -> Result<Records> {
    let mut arrays = files.iter().map(|(n, b)| parse_npy(n, b).map(|a| (n.clone(), a))).collect::<Result<Vec<_>>>()?;
    let at = arrays.iter().position(|(_, a)| a.shape.len() >= 2);
    let (Some(at), 2) = (at, arrays.len()) else {
        return Err(CoreError::Dataset("need two .npy files: the features (2+ dimensions) and the labels (1 dimension)".into()));
    };
    let (fname, f) = arrays.remove(at);
    let (lname, l) = arrays.remove(0);
    if l.shape.len() != 1 || l.shape[0] != f.shape[0] {
        return Err(CoreError::Dataset(format!("{lname} (shape {:?}) is not one label per record of {fname} (shape {:?})", l.shape, f.shape)));
    }
    Ok(Records { features: features(f.values, f.u8), feature_shape: f.shape[1..].to_vec(), labels: class_ids(&lname, &l.values)? })
}

/// Reads a safetensors file with tensors `x` (features: records first, u8 or float) and `y`
/// (integer labels, one per record).
pub fn records_from_safetensors(name: &str, bytes: &[u8]) -> Result<Records> {
    let bad = |msg: String| CoreError::Dataset(format!("{name}: {msg}"));
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let get = |t: &str| st.tensor(t).map_err(|_| bad(format!("no tensor {t:?} (it needs x: features, y: labels)")));
    let (x, y) = (get("x")?, get("y")?);
    let values = |v: &safetensors::tensor::TensorView| -> Result<(Vec<f64>, bool)> {
        let d = v.data();
        Ok(match v.dtype() {
            Dtype::U8 => (d.iter().map(|&b| b as f64).collect(), true),
            Dtype::F32 => (d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect(), false),
            Dtype::F64 => (d.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(), false),
            Dtype::I32 => (d.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect(), false),
            Dtype::I64 => (d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64).collect(), false),
            other => return Err(bad(format!("dtype {other:?} is not supported (u8, f32, f64, i32 or i64)"))),
        })
    };
    if x.shape().len() < 2 || y.shape() != [x.shape()[0]] {
        return Err(bad(format!("x has shape {:?} and y {:?}: x needs records first and 1+ feature dimensions, y one label per record", x.shape(), y.shape())));
    }
    let (xv, u8) = values(&x)?;
    let (yv, _) = values(&y)?;
    Ok(Records { features: features(xv, u8), feature_shape: x.shape()[1..].to_vec(), labels: class_ids(&format!("{name}: y"), &yv)? })
}

/// A slice's digest: blake3 over its shards' blake3 hashes, in order.
pub fn slice_digest(shards: &[ShardInfo]) -> String {
    let mut h = blake3::Hasher::new();
    for s in shards {
        h.update(s.blake3.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The folder of one import of dataset `name`, relative to the store root: `import_id` (the
/// import's request id) makes it that import's alone.
pub fn import_dir(name: &str, import_id: &str) -> Result<PathBuf> {
    validate_name(name)?;
    if import_id.is_empty() || import_id.len() > 64 || !import_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(CoreError::Dataset(format!("import id {import_id:?} must be 1-64 of [A-Za-z0-9-]")));
    }
    Ok(PathBuf::from("datasets").join(name).join(format!("import-{import_id}")))
}

/// Writes `records` as shards of dataset `name` into `rel_dir` (from `import_dir`) under
/// `store` and returns the manifest to register, with version 0: the coordinator assigns the
/// next version on registration. Each file is written atomically.
pub fn write_shards(store: &Path, name: &str, rel_dir: &Path, records: &Records, per_shard: usize) -> Result<DatasetInfo> {
    validate_name(name)?;
    let per_shard = per_shard.max(1);
    let dir = store.join(rel_dir);
    crate::fsutil::create_dirs_durably(&dir).map_err(|e| CoreError::io(&dir, e))?;
    let feat_len: usize = records.feature_shape.iter().product();
    let mut shards = Vec::new();
    let n = records.len();
    for (i, start) in (0..n).step_by(per_shard).enumerate() {
        let end = (start + per_shard).min(n);
        let count = end - start;
        let (x_bytes, x_dtype): (Vec<u8>, Dtype) = match &records.features {
            IdxData::U8(v) => (v[start * feat_len..end * feat_len].to_vec(), Dtype::U8),
            IdxData::F32(v) => {
                let part = &v[start * feat_len..end * feat_len];
                let bytes = if cfg!(target_endian = "little") { bytemuck::cast_slice(part).to_vec() } else { part.iter().flat_map(|f| f.to_le_bytes()).collect() };
                (bytes, Dtype::F32)
            }
        };
        let y_bytes: Vec<u8> = records.labels[start..end].iter().flat_map(|l| l.to_le_bytes()).collect();
        let mut x_shape = vec![count];
        x_shape.extend_from_slice(&records.feature_shape);
        let tensors = [
            ("x", TensorView::new(x_dtype, x_shape, &x_bytes).map_err(|e| CoreError::Dataset(e.to_string()))?),
            ("y", TensorView::new(Dtype::I64, vec![count], &y_bytes).map_err(|e| CoreError::Dataset(e.to_string()))?),
        ];
        let bytes = safetensors::serialize(tensors, None).map_err(|e| CoreError::Dataset(e.to_string()))?;
        let rel = rel_dir.join(format!("shard-{i:05}.safetensors"));
        write_atomic(&store.join(&rel), &bytes)?;
        shards.push(ShardInfo {
            path: rel.to_string_lossy().into_owned(),
            records: count as u64,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            bytes: bytes.len() as u64,
        });
    }
    Ok(DatasetInfo {
        name: name.to_string(),
        version: 0,
        records: n as u64,
        feature_shape: records.feature_shape.iter().map(|&d| d as u64).collect(),
        classes: records.classes(),
        shards,
        feature_dtype: records.dtype().into(),
        ..Default::default()
    })
}

/// The one folder that holds all of a dataset version's shards, relative to the store.
pub fn shard_folder(info: &DatasetInfo) -> Option<&Path> {
    let first = Path::new(&info.shards.first()?.path).parent()?;
    info.shards.iter().all(|s| Path::new(&s.path).parent() == Some(first)).then_some(first)
}

/// Writes the registered manifest (with its version) beside its newest slice's shards.
pub fn write_manifest(store: &Path, info: &DatasetInfo) -> Result<()> {
    let last = info.shards.last().and_then(|s| Path::new(&s.path).parent());
    let dir = last.ok_or_else(|| CoreError::Dataset(format!("dataset {} v{} has no shards", info.name, info.version)))?;
    let manifest = DatasetManifest { dataset: Some(info.clone()) };
    write_atomic(&store.join(dir).join("manifest.pb"), &manifest.encode_to_vec())
}

/// A parsed shard over borrowed bytes (for example a memory map).
pub struct ShardView<'a> {
    pub records: usize,
    pub x: &'a [u8],
    pub x_dtype: Dtype,
    pub y: &'a [u8],
    pub feature_len: usize,
}

/// Parses and checks a shard file's bytes against what the manifest says of it.
pub fn parse_shard<'a>(path: &str, bytes: &'a [u8], info: &ShardInfo, feature_shape: &[u64]) -> Result<ShardView<'a>> {
    let bad = |reason: String| CoreError::CorruptShard { path: path.to_string(), reason };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let tensors: HashMap<String, TensorView<'a>> = st.tensors().into_iter().collect();
    let x = tensors.get("x").ok_or_else(|| bad("no tensor `x`".into()))?;
    let y = tensors.get("y").ok_or_else(|| bad("no tensor `y`".into()))?;
    let n = info.records as usize;
    let feature_len = feature_shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(format!("feature shape {feature_shape:?} is too large")))?;
    let mut want_x = vec![n];
    want_x.extend(feature_shape.iter().map(|&d| d as usize));
    if x.shape() != want_x.as_slice() {
        return Err(bad(format!("x has shape {:?}, manifest says {want_x:?}", x.shape())));
    }
    if !matches!(x.dtype(), Dtype::U8 | Dtype::F32) {
        return Err(bad(format!("x has dtype {:?}; u8 or f32 expected", x.dtype())));
    }
    if y.shape() != [n] || y.dtype() != Dtype::I64 {
        return Err(bad(format!("y has shape {:?} and dtype {:?}; [{n}] i64 expected", y.shape(), y.dtype())));
    }
    Ok(ShardView { records: n, x: x.data(), x_dtype: x.dtype(), y: y.data(), feature_len })
}

impl ShardView<'_> {
    /// Record `i`'s features as f32 (u8 features are scaled to [0, 1]) appended to `out`.
    pub fn push_features(&self, i: usize, out: &mut Vec<f32>) {
        let f = self.feature_len;
        match self.x_dtype {
            Dtype::U8 => out.extend(self.x[i * f..(i + 1) * f].iter().map(|&b| b as f32 / 255.0)),
            _ => out.extend(self.x[i * f * 4..(i + 1) * f * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()))),
        }
    }

    pub fn label(&self, i: usize) -> i64 {
        i64::from_le_bytes(self.y[i * 8..i * 8 + 8].try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Records {
        Records { features: IdxData::U8((0..50u8).collect()), feature_shape: vec![5], labels: (0..10).map(|i| i % 3).collect() }
    }

    #[test]
    fn shards_roundtrip_with_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let folder = import_dir("tiny", "abc-1").unwrap();
        let info = write_shards(dir.path(), "tiny", &folder, &tiny(), 4).unwrap();
        assert_eq!(shard_folder(&info), Some(folder.as_path()));
        assert!(import_dir("tiny", "../x").is_err());
        assert_eq!(info.shards.len(), 3);
        assert_eq!(info.records, 10);
        assert_eq!(info.classes, 3);
        let s = &info.shards[2];
        let bytes = std::fs::read(dir.path().join(&s.path)).unwrap();
        assert_eq!(blake3::hash(&bytes).to_hex().to_string(), s.blake3);
        let view = parse_shard(&s.path, &bytes, s, &info.feature_shape).unwrap();
        assert_eq!(view.records, 2);
        assert_eq!(view.label(1), 9 % 3);
        let mut f = Vec::new();
        view.push_features(0, &mut f);
        assert_eq!(f, (40..45).map(|b| b as f32 / 255.0).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_bad_names() {
        for n in ["", "../x", "a/b", ".hidden"] {
            assert!(validate_name(n).is_err(), "{n}");
        }
        validate_name("mnist-v2_ok.1").unwrap();
    }

    #[test]
    fn mismatched_counts_are_an_error() {
        let f = IdxArray { dims: vec![3, 2], data: IdxData::U8(vec![0; 6]) };
        let l = IdxArray { dims: vec![4], data: IdxData::U8(vec![0; 4]) };
        let e = Records::from_idx(vec![("f".into(), f), ("l".into(), l)]).unwrap_err().to_string();
        assert!(e.contains("3 records") && e.contains("has 4"), "{e}");
    }

    #[test]
    fn csv_reads_numbers_and_maps_string_labels() {
        let text = "a,species,b\n1.5,virginica,2\n0.5,setosa,\n3,virginica,4\n";
        let (r, names) = records_from_csv("t.csv", text, "species", &[]).unwrap();
        assert_eq!(names, ["setosa", "virginica"]);
        assert_eq!((r.labels.clone(), r.feature_shape.clone(), r.dtype()), (vec![1, 0, 1], vec![2], "f32"));
        let IdxData::F32(f) = &r.features else { panic!() };
        assert_eq!((f[0], f[1], f[2], f[3].is_nan()), (1.5, 2.0, 0.5, true));
        // Appended with the dataset's names: a new one comes after them.
        let (r, names) = records_from_csv("u.csv", "a,species,b\n1,iris-x,2\n1,setosa,2\n", "species", &["setosa".into(), "virginica".into()]).unwrap();
        assert_eq!((names.len(), r.labels.clone()), (3, vec![2, 0]));
        let (r, names) = records_from_csv("i.csv", "x,y\n1,0\n2,3\n", "y", &[]).unwrap();
        assert_eq!((names.len(), r.labels.clone()), (0, vec![0, 3]));
        for (text, want) in [("a,b\n1,2\n", "no column \"species\""), ("a,species\n1,x,3\n", "3 cells"), ("a,species\nfoo,x\n", "\"foo\", not a number")] {
            let e = records_from_csv("bad.csv", text, "species", &[]).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("bad.csv"), "{e}");
        }
    }

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn npy_and_safetensors_read_like_idx() {
        let x: Vec<u8> = (0..12).collect();
        let y: Vec<u8> = [1i64, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let r = records_from_npy(vec![("y.npy".into(), npy("<i8", "3,", &y)), ("x.npy".into(), npy("|u1", "3, 2, 2", &x))]).unwrap();
        assert_eq!((r.feature_shape.clone(), r.labels.clone(), r.dtype()), (vec![2, 2], vec![1, 0, 2], "u8"));
        let xf: Vec<u8> = [0.5f32, 1.5, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let r = records_from_npy(vec![("x.npy".into(), npy("<f4", "3, 1", &xf)), ("y.npy".into(), npy("<i8", "3,", &y))]).unwrap();
        let IdxData::F32(f) = &r.features else { panic!() };
        assert_eq!(f, &[0.5, 1.5, 2.5]);
        let e = records_from_npy(vec![("x.npy".into(), npy("<c8", "3, 1", &xf)), ("y.npy".into(), npy("<i8", "3,", &y))]).err().unwrap().to_string();
        assert!(e.contains("x.npy") && e.contains("<c8"), "{e}");
        let e = records_from_npy(vec![("x.npy".into(), b"not numpy".to_vec())]).err().unwrap().to_string();
        assert!(e.contains("not a NumPy"), "{e}");

        let tensors = [
            ("x", TensorView::new(Dtype::U8, vec![3, 2, 2], &x).unwrap()),
            ("y", TensorView::new(Dtype::I64, vec![3], &y).unwrap()),
        ];
        let bytes = safetensors::serialize(tensors, None).unwrap();
        let r = records_from_safetensors("d.safetensors", &bytes).unwrap();
        assert_eq!((r.feature_shape.clone(), r.labels.clone()), (vec![2, 2], vec![1, 0, 2]));
        let only_x = safetensors::serialize([("x", TensorView::new(Dtype::U8, vec![3, 2, 2], &x).unwrap())], None).unwrap();
        let e = records_from_safetensors("d.safetensors", &only_x).err().unwrap().to_string();
        assert!(e.contains("no tensor \"y\""), "{e}");
    }
}
