//! Datasets in the store: `datasets/<name>/import-<id>/shard-NNNNN.safetensors`, each shard a
//! safetensors file with `x` (features, u8 or f32, shape [n, ...]) and `y` (class labels, i64,
//! [n]; or a regression's float targets, f32, [n, width]), plus `manifest.pb` (a protobuf `DatasetManifest`). Shards are hashed with blake3.
//!
//! Every import writes into a folder of its own, named by its request id, and the coordinator
//! gives it the next version number when it registers it: so no import ever writes, or cleans
//! up, a folder that a registered version uses, however many run at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use shoal_proto::{DatasetInfo, DatasetManifest, Message, ShardInfo};

pub use crate::csv::{records_from_csv, records_from_csv_target};
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
    /// One class label per record (all 0 when the records have `targets` instead).
    pub labels: Vec<i64>,
    /// A regression's float targets, `width` per record; None for class labels.
    pub targets: Option<Targets>,
}

/// Float targets: `values` holds `width` per record, record after record.
#[derive(Clone, Debug, PartialEq)]
pub struct Targets {
    pub values: Vec<f32>,
    pub width: usize,
}

impl Targets {
    /// Targets read from a file (`name`, for messages) as f64 values, `width` per record:
    /// every one must be a finite number.
    fn checked(name: &str, values: Vec<f64>, width: usize) -> Result<Targets> {
        if let Some(i) = values.iter().position(|v| !v.is_finite() || v.abs() > f32::MAX as f64) {
            return Err(CoreError::Dataset(format!("{name}: target {} of record {} is {}, not a finite number", i % width.max(1), i / width.max(1), values[i])));
        }
        Ok(Targets { values: values.into_iter().map(|v| v as f32).collect(), width })
    }
}

impl Records {
    /// Records with class labels.
    pub fn classified(features: IdxData, feature_shape: Vec<usize>, labels: Vec<i64>) -> Records {
        Records { features, feature_shape, labels, targets: None }
    }

    /// Records with float targets (`targets.values.len() / targets.width` records).
    pub fn regression(features: IdxData, feature_shape: Vec<usize>, targets: Targets) -> Records {
        let n = targets.values.len() / targets.width.max(1);
        Records { features, feature_shape, labels: vec![0; n], targets: Some(targets) }
    }

    /// The width of the records' targets: 0 for class labels.
    pub fn target_width(&self) -> usize {
        self.targets.as_ref().map_or(0, |t| t.width)
    }

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
        Ok(Records::classified(f.data, f.dims[1..].to_vec(), labels))
    }

    /// The number of classes (the largest label + 1); 0 for records with targets.
    pub fn classes(&self) -> u32 {
        if self.targets.is_some() {
            return 0;
        }
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
        let targets = self.targets.map(|t| Targets { values: t.values[start * t.width..end * t.width].to_vec(), width: t.width });
        Ok(Records { features, feature_shape: self.feature_shape, labels: self.labels[start..end].to_vec(), targets })
    }
}

/// An array read from a `.npy` or safetensors file: its shape, element type (`u1`, `f4`, `f8`,
/// `i4` or `i8`) and little-endian data, borrowed.
struct RawArray<'a> {
    shape: Vec<usize>,
    descr: &'static str,
    data: &'a [u8],
}

fn parse_npy<'a>(name: &str, bytes: &'a [u8]) -> Result<RawArray<'a>> {
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
    let (descr, width) = match descr {
        "|u1" | "<u1" => ("u1", 1),
        "<f4" => ("f4", 4),
        "<f8" => ("f8", 8),
        "<i4" => ("i4", 4),
        "<i8" => ("i8", 8),
        other => return Err(bad(format!("dtype {other:?} is not supported (u1, f4, f8, i4 or i8, little-endian)"))),
    };
    let needed = count.checked_mul(width).ok_or_else(|| bad("shape too large".into()))?;
    if data.len() < needed {
        return Err(bad(format!("holds {} bytes of data, its shape needs {needed}", data.len())));
    }
    Ok(RawArray { shape, descr, data: &data[..needed] })
}

impl RawArray<'_> {
    /// The values as f64 (for checks; features convert straight to their own type).
    fn values_f64(&self) -> Vec<f64> {
        let d = self.data;
        match self.descr {
            "u1" => d.iter().map(|&b| b as f64).collect(),
            "f4" => d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect(),
            "f8" => d.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            "i4" => d.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect(),
            _ => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64).collect(),
        }
    }

    /// Features: u8 stays u8, every other type becomes f32.
    fn features(&self) -> IdxData {
        let d = self.data;
        match self.descr {
            "u1" => IdxData::U8(d.to_vec()),
            "f4" => IdxData::F32(d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()),
            _ => IdxData::F32(self.values_f64().into_iter().map(|v| v as f32).collect()),
        }
    }

    /// Labels as class ids (non-negative integers below a million).
    fn class_ids(&self, name: &str) -> Result<Vec<i64>> {
        let bad = |i: usize, v: &dyn std::fmt::Display| CoreError::Dataset(format!("{name}: label {i} is {v}, not a class index"));
        if self.descr == "i8" {
            return self.data.chunks_exact(8).enumerate().map(|(i, b)| {
                let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                if (0..1_000_000).contains(&v) { Ok(v) } else { Err(bad(i, &v)) }
            }).collect();
        }
        self.values_f64()
            .into_iter()
            .enumerate()
            .map(|(i, v)| if v >= 0.0 && v.fract() == 0.0 && v < 1e6 { Ok(v as i64) } else { Err(bad(i, &v)) })
            .collect()
    }

    /// `y` as what it holds: class ids when its type is an integer, else float targets (one
    /// per record for a 1-d array, `width` per record for [n, width]).
    fn labels_or_targets(&self, name: &str) -> Result<(Vec<i64>, Option<Targets>)> {
        if matches!(self.descr, "f4" | "f8") {
            let width = if self.shape.len() == 2 { self.shape[1] } else { 1 };
            if width == 0 {
                return Err(CoreError::Dataset(format!("{name}: targets of width 0")));
            }
            let targets = Targets::checked(name, self.values_f64(), width)?;
            return Ok((vec![0; self.shape[0]], Some(targets)));
        }
        if self.shape.len() != 1 {
            return Err(CoreError::Dataset(format!("{name}: integer labels need one per record (shape [{}]), got {:?}; float targets may be [n, width]", self.shape[0], self.shape)));
        }
        Ok((self.class_ids(name)?, None))
    }
}

/// Whether a file's name says it holds the labels or targets: `y.npy`, `*target*`, `*label*`.
fn names_targets(name: &str) -> bool {
    let file = std::path::Path::new(name).file_stem().map(|s| s.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    file == "y" || file.starts_with("y_") || file.ends_with("_y") || file.contains("target") || file.contains("label")
}

/// Reads two NumPy `.npy` files (given as (name, bytes)): the features (2+ dimensions, u8 or
/// float) and `y`: class labels (1 dimension, integers) or a regression's targets (floats,
/// [n] or [n, width]).
pub fn records_from_npy(files: &[(String, &[u8])]) -> Result<Records> {
    let mut arrays = files.iter().map(|(n, b)| parse_npy(n, b).map(|a| (n.clone(), a))).collect::<Result<Vec<_>>>()?;
    // The features are the array of more dimensions. Two 2-d arrays (tabular features and
    // several float targets) are told apart by their file names, never guessed.
    let at = match &arrays[..] {
        [(an, a), (bn, b)] if a.shape.len() == 2 && b.shape.len() == 2 => match (names_targets(an), names_targets(bn)) {
            (false, true) => Some(0),
            (true, false) => Some(1),
            _ => {
                return Err(CoreError::Dataset(format!(
                    "{an} and {bn} are both 2-d: name the targets' file y.npy (or *target*, *label*) and the features' x.npy (or anything else) to say which is which"
                )))
            }
        },
        [(_, a), (_, b)] if a.shape.len() >= 2 || b.shape.len() >= 2 => Some(if b.shape.len() > a.shape.len() { 1 } else { 0 }),
        _ => None,
    };
    let (Some(at), 2) = (at, arrays.len()) else {
        return Err(CoreError::Dataset("need two .npy files: the features (2+ dimensions) and y (class labels: integers, 1 dimension; or a regression's float targets)".into()));
    };
    let (fname, f) = arrays.remove(at);
    let (lname, l) = arrays.remove(0);
    if l.shape.is_empty() || l.shape.len() > 2 || l.shape[0] != f.shape[0] {
        return Err(CoreError::Dataset(format!("{lname} (shape {:?}) is not one label (or one row of targets) per record of {fname} (shape {:?})", l.shape, f.shape)));
    }
    let (labels, targets) = l.labels_or_targets(&lname)?;
    Ok(Records { features: f.features(), feature_shape: f.shape[1..].to_vec(), labels, targets })
}

/// Reads a safetensors file with tensors `x` (features: records first, u8 or float) and `y`
/// (integer labels, one per record; or float targets, [n] or [n, width]).
pub fn records_from_safetensors(name: &str, bytes: &[u8]) -> Result<Records> {
    let bad = |msg: String| CoreError::Dataset(format!("{name}: {msg}"));
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let get = |t: &str| st.tensor(t).map_err(|_| bad(format!("no tensor {t:?} (it needs x: features, y: labels)")));
    let (x, y) = (get("x")?, get("y")?);
    fn raw<'a>(v: &TensorView<'a>, bad: impl Fn(String) -> CoreError) -> Result<RawArray<'a>> {
        let descr = match v.dtype() {
            Dtype::U8 => "u1",
            Dtype::F32 => "f4",
            Dtype::F64 => "f8",
            Dtype::I32 => "i4",
            Dtype::I64 => "i8",
            other => return Err(bad(format!("dtype {other:?} is not supported (u8, f32, f64, i32 or i64)"))),
        };
        Ok(RawArray { shape: v.shape().to_vec(), descr, data: v.data() })
    }
    if x.shape().len() < 2 || y.shape().is_empty() || y.shape().len() > 2 || y.shape()[0] != x.shape()[0] {
        return Err(bad(format!("x has shape {:?} and y {:?}: x needs records first and 1+ feature dimensions, y one label (or one row of targets) per record", x.shape(), y.shape())));
    }
    let (labels, targets) = raw(&y, bad)?.labels_or_targets(&format!("{name}: y"))?;
    Ok(Records { features: raw(&x, bad)?.features(), feature_shape: x.shape()[1..].to_vec(), labels, targets })
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
    let dir = store.join(rel_dir);
    crate::fsutil::create_dirs_durably(&dir).map_err(|e| CoreError::io(&dir, e))?;
    encode_shards(name, rel_dir, records, per_shard, |key, bytes| write_atomic(&store.join(key), &bytes))
}

/// Cuts `records` into safetensors shards of dataset `name` in folder `rel_dir` and hands
/// each to `put` (its store key and bytes; called from several threads at once). Returns the
/// manifest to register, with version 0.
pub fn encode_shards(name: &str, rel_dir: &Path, records: &Records, per_shard: usize, put: impl Fn(&str, Vec<u8>) -> Result<()> + Sync) -> Result<DatasetInfo> {
    validate_name(name)?;
    let per_shard = per_shard.max(1);
    let feat_len: usize = records.feature_shape.iter().product();
    let n = records.len();
    // Shards are serialized, hashed and written (each fsynced) in parallel: the fsyncs overlap.
    use rayon::prelude::*;
    let starts: Vec<usize> = (0..n).step_by(per_shard).collect();
    let shards = starts
        .par_iter()
        .enumerate()
        .map(|(i, &start)| {
            let end = (start + per_shard).min(n);
            let count = end - start;
            let (x_bytes, x_dtype): (std::borrow::Cow<[u8]>, Dtype) = match &records.features {
                IdxData::U8(v) => (v[start * feat_len..end * feat_len].into(), Dtype::U8),
                IdxData::F32(v) => {
                    let part = &v[start * feat_len..end * feat_len];
                    let bytes = if cfg!(target_endian = "little") { bytemuck::cast_slice(part).into() } else { part.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>().into() };
                    (bytes, Dtype::F32)
                }
            };
            let (y_bytes, y_dtype, y_shape): (Vec<u8>, Dtype, Vec<usize>) = match &records.targets {
                Some(t) => (t.values[start * t.width..end * t.width].iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32, vec![count, t.width]),
                None => (records.labels[start..end].iter().flat_map(|l| l.to_le_bytes()).collect(), Dtype::I64, vec![count]),
            };
            let mut x_shape = vec![count];
            x_shape.extend_from_slice(&records.feature_shape);
            let tensors = [
                ("x", TensorView::new(x_dtype, x_shape, &x_bytes).map_err(|e| CoreError::Dataset(e.to_string()))?),
                ("y", TensorView::new(y_dtype, y_shape, &y_bytes).map_err(|e| CoreError::Dataset(e.to_string()))?),
            ];
            let bytes = safetensors::serialize(tensors, None).map_err(|e| CoreError::Dataset(e.to_string()))?;
            let rel = rel_dir.join(format!("shard-{i:05}.safetensors")).to_string_lossy().into_owned();
            let (hash, len) = (blake3::hash(&bytes).to_hex().to_string(), bytes.len() as u64);
            put(&rel, bytes)?;
            Ok(ShardInfo { path: rel, records: count as u64, blake3: hash, bytes: len })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DatasetInfo {
        name: name.to_string(),
        version: 0,
        records: n as u64,
        feature_shape: records.feature_shape.iter().map(|&d| d as u64).collect(),
        classes: records.classes(),
        shards,
        feature_dtype: records.dtype().into(),
        target_width: records.target_width() as u32,
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
    let (key, bytes) = manifest_object(info)?;
    write_atomic(&store.join(key), &bytes)
}

/// The registered manifest's key (beside its newest slice's shards) and bytes.
pub fn manifest_object(info: &DatasetInfo) -> Result<(String, Vec<u8>)> {
    let last = info.shards.last().and_then(|s| Path::new(&s.path).parent());
    let dir = last.ok_or_else(|| CoreError::Dataset(format!("dataset {} v{} has no shards", info.name, info.version)))?;
    let manifest = DatasetManifest { dataset: Some(info.clone()) };
    Ok((dir.join("manifest.pb").to_string_lossy().into_owned(), manifest.encode_to_vec()))
}

/// A parsed shard over borrowed bytes (for example a memory map).
#[derive(Debug)]
pub struct ShardView<'a> {
    pub records: usize,
    pub x: &'a [u8],
    pub x_dtype: Dtype,
    pub y: &'a [u8],
    pub feature_len: usize,
    /// Float targets per record (y is f32 [n, width]); 0: y holds class labels (i64 [n]).
    pub target_width: usize,
}

/// Parses and checks a shard file's bytes against what the manifest says of it (its dataset's
/// `feature_shape` and `target_width`, 0 for class labels).
pub fn parse_shard<'a>(path: &str, bytes: &'a [u8], info: &ShardInfo, feature_shape: &[u64], target_width: u32) -> Result<ShardView<'a>> {
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
    let width = target_width as usize;
    if width == 0 && (y.shape() != [n] || y.dtype() != Dtype::I64) {
        return Err(bad(format!("y has shape {:?} and dtype {:?}; [{n}] i64 expected", y.shape(), y.dtype())));
    }
    if width > 0 && (y.shape() != [n, width] || y.dtype() != Dtype::F32) {
        return Err(bad(format!("y has shape {:?} and dtype {:?}; [{n}, {width}] f32 targets expected", y.shape(), y.dtype())));
    }
    Ok(ShardView { records: n, x: x.data(), x_dtype: x.dtype(), y: y.data(), feature_len, target_width: width })
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

    /// Record `i`'s class label (0 in a shard of targets).
    pub fn label(&self, i: usize) -> i64 {
        if self.target_width > 0 {
            return 0;
        }
        i64::from_le_bytes(self.y[i * 8..i * 8 + 8].try_into().unwrap())
    }

    /// Record `i`'s targets appended to `out` (nothing in a shard of class labels).
    pub fn push_targets(&self, i: usize, out: &mut Vec<f32>) {
        let w = self.target_width;
        out.extend(self.y[i * w * 4..(i + 1) * w * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Records {
        Records::classified(IdxData::U8((0..50u8).collect()), vec![5], (0..10).map(|i| i % 3).collect())
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
        let view = parse_shard(&s.path, &bytes, s, &info.feature_shape, 0).unwrap();
        assert!(parse_shard(&s.path, &bytes, s, &info.feature_shape, 1).unwrap_err().to_string().contains("f32 targets expected"));
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
        let r = records_from_npy(&[("y.npy".into(), &npy("<i8", "3,", &y)), ("x.npy".into(), &npy("|u1", "3, 2, 2", &x))]).unwrap();
        assert_eq!((r.feature_shape.clone(), r.labels.clone(), r.dtype()), (vec![2, 2], vec![1, 0, 2], "u8"));
        let xf: Vec<u8> = [0.5f32, 1.5, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let r = records_from_npy(&[("x.npy".into(), &npy("<f4", "3, 1", &xf)), ("y.npy".into(), &npy("<i8", "3,", &y))]).unwrap();
        let IdxData::F32(f) = &r.features else { panic!() };
        assert_eq!(f, &[0.5, 1.5, 2.5]);
        let e = records_from_npy(&[("x.npy".into(), &npy("<c8", "3, 1", &xf)), ("y.npy".into(), &npy("<i8", "3,", &y))]).err().unwrap().to_string();
        assert!(e.contains("x.npy") && e.contains("<c8"), "{e}");
        let e = records_from_npy(&[("x.npy".into(), b"not numpy")]).err().unwrap().to_string();
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

    #[test]
    fn float_y_is_a_regression_target_and_round_trips_through_shards() {
        let x: Vec<u8> = (0..12).collect();
        let t: Vec<u8> = [0.5f32, -1.25, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let r = records_from_npy(&[("x.npy".into(), &npy("|u1", "3, 4", &x)), ("t.npy".into(), &npy("<f4", "3,", &t))]).unwrap();
        assert_eq!((r.target_width(), r.classes(), r.len()), (1, 0, 3));
        assert_eq!(r.targets.as_ref().unwrap().values, vec![0.5, -1.25, 3.0]);
        // Two targets per record, as [n, 2] (f64 in the file): features are still the 3-d array.
        let t2: Vec<u8> = (0..6).flat_map(|i| (i as f64 * 0.5).to_le_bytes()).collect();
        let r2 = records_from_npy(&[("t.npy".into(), &npy("<f8", "3, 2", &t2)), ("x.npy".into(), &npy("|u1", "3, 2, 2", &x))]).unwrap();
        assert_eq!((r2.target_width(), r2.feature_shape.clone()), (2, vec![2, 2]));
        // Two 2-d arrays: the names say which holds the targets, whatever their widths.
        let xf: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let r3 = records_from_npy(&[("data/train_x.npy".into(), &npy("<f4", "3, 2", &xf)), ("data/targets.npy".into(), &npy("<f8", "3, 2", &t2))]).unwrap();
        assert_eq!((r3.target_width(), r3.feature_shape.clone()), (2, vec![2]));
        let e = records_from_npy(&[("a.npy".into(), &npy("<f4", "3, 2", &xf)), ("b.npy".into(), &npy("<f8", "3, 2", &t2))]).unwrap_err().to_string();
        assert!(e.contains("both 2-d") && e.contains("y.npy"), "{e}");
        let nan: Vec<u8> = [0.5f32, f32::NAN, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = records_from_npy(&[("x.npy".into(), &npy("|u1", "3, 4", &x)), ("t.npy".into(), &npy("<f4", "3,", &nan))]).unwrap_err().to_string();
        assert!(e.contains("t.npy") && e.contains("record 1") && e.contains("not a finite number"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let folder = import_dir("reg", "r-1").unwrap();
        let info = write_shards(dir.path(), "reg", &folder, &r2, 2).unwrap();
        assert_eq!((info.target_width, info.classes), (2, 0));
        let s = &info.shards[1];
        let bytes = std::fs::read(dir.path().join(&s.path)).unwrap();
        let view = parse_shard(&s.path, &bytes, s, &info.feature_shape, 2).unwrap();
        let mut got = Vec::new();
        view.push_targets(0, &mut got);
        assert_eq!((got, view.label(0)), (vec![2.0, 2.5], 0));
        assert!(parse_shard(&s.path, &bytes, s, &info.feature_shape, 0).unwrap_err().to_string().contains("i64 expected"));
        let sel = r2.select(1, 3).unwrap();
        assert_eq!(sel.targets.unwrap().values, vec![1.0, 1.5, 2.0, 2.5]);
    }
}
