//! Checkpoints on disk: writing this rank's share of the training state, reading a committed
//! checkpoint back (every file checked against the manifest's blake3 first), and exporting the
//! parameters in PyTorch's layout.
//!
//! A checkpoint of step S is the folder `store/jobs/<job>/checkpoints/step-<S>/`: one
//! safetensors part per rank that wrote it (`part-<r>.safetensors`) and `manifest.pb`. The
//! training state (parameters, then each optimizer buffer) is cut into named tensors and the
//! tensors are dealt to the ranks, largest first, to the rank with the fewest bytes so far, so
//! every rank writes about 1/W of the bytes at once. A reader places tensors by name, so a
//! checkpoint written by N ranks loads on M.
//!
//! Each part is written under a temporary name, fsynced, renamed, and the folder fsynced; its
//! blake3 is computed while it is written. Rank 0 gathers every part's record, writes the
//! manifest (atomically) and asks the coordinator to commit it: only then is it a resume point.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use shoal_core::checkpoint::{job_checkpoints_dir, parse_step_dir, validate_manifest, MANIFEST_FILE};
use shoal_core::failpoint;
use shoal_core::fsutil::sync_dir;
use shoal_core::store::Store;
use shoal_proto::{CheckpointFile, CheckpointManifest, JobProgress, Message};

use crate::model::Layout;
use crate::optim::Opt;
use crate::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A file that does not match its manifest: torn, truncated or corrupted.
    #[error("{path}: {reason}")]
    Corrupt { path: String, reason: String },
    /// A sound checkpoint that does not fit this model or optimizer.
    #[error("{0}")]
    Mismatch(String),
}

impl CheckpointError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io { path: path.display().to_string(), source }
    }

    fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        CheckpointError::Corrupt { path: path.display().to_string(), reason: reason.into() }
    }

    /// Whether the checkpoint itself is damaged (as opposed to unfit for this job).
    pub fn is_damage(&self) -> bool {
        !matches!(self, CheckpointError::Mismatch(_))
    }
}

/// One named tensor of the training state: a slice of the parameters (`buffer` 0) or of an
/// optimizer buffer (`buffer` i is the optimizer's buffer i - 1).
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub buffer: usize,
    pub offset: usize,
}

impl StateTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tensors of the training state: the parameters by their names, then the optimizer's
/// buffers as `optimizer.<buffer>.<parameter>`.
pub fn state_tensors(model: &Layout, opt: &Opt) -> Vec<StateTensor> {
    let mut out: Vec<StateTensor> =
        model.params.iter().map(|p| StateTensor { name: p.name.clone(), shape: p.shape.clone(), buffer: 0, offset: p.offset }).collect();
    for (b, buffer) in opt.buffer_names().iter().enumerate() {
        for p in &model.params {
            out.push(StateTensor { name: format!("optimizer.{buffer}.{}", p.name), shape: p.shape.clone(), buffer: b + 1, offset: p.offset });
        }
    }
    out
}

/// Which tensors (indices into `tensors`) each of `world` ranks writes: largest first, each to
/// the rank with the fewest elements so far (ties: the lowest rank). The same on every rank.
pub fn assign_parts(tensors: &[StateTensor], world: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(tensors[i].len()), i));
    let mut load = vec![0usize; world];
    let mut parts = vec![Vec::new(); world];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).expect("world >= 1");
        load[r] += tensors[i].len();
        parts[r].push(i);
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    parts
}

/// A copy of this rank's share of the state at one step, owned by the writer.
pub struct PartSnapshot {
    pub step: u64,
    pub rank: u32,
    pub generation: u64,
    /// The checkpoint folder (a store key).
    pub dir: String,
    /// Tensor names and shapes, in the order of their data in `data`.
    pub tensors: Vec<(String, Vec<usize>)>,
    pub data: Vec<f32>,
}

impl PartSnapshot {
    /// Copies the tensors `mine` out of the live state into `buffer` (reused between
    /// checkpoints): the only checkpoint work on the step loop's thread.
    #[allow(clippy::too_many_arguments)]
    pub fn take(
        step: u64,
        rank: u32,
        generation: u64,
        dir: String,
        tensors: &[StateTensor],
        mine: &[usize],
        params: &[f32],
        opt: &Opt,
        mut buffer: Vec<f32>,
    ) -> PartSnapshot {
        buffer.clear();
        let mut names = Vec::with_capacity(mine.len());
        for &i in mine {
            let t = &tensors[i];
            let src = if t.buffer == 0 { params } else { &opt.buffers[t.buffer - 1] };
            buffer.extend_from_slice(&src[t.offset..t.offset + t.len()]);
            names.push((t.name.clone(), t.shape.clone()));
        }
        PartSnapshot { step, rank, generation, dir, tensors: names, data: buffer }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The safetensors header (length prefix included) for f32 tensors stored back to back,
/// padded so the data starts 8-byte aligned.
fn safetensors_header(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut h = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(",{}:{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}", json_string(name), dims.join(","), off + bytes));
        off += bytes;
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out
}

fn f32_bytes(xs: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(xs))
    } else {
        std::borrow::Cow::Owned(xs.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// The blake3 of `pieces` back to back, in hex.
fn blake3_hex(pieces: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new();
    for p in pieces {
        h.update(p);
    }
    h.finalize().to_hex().to_string()
}

/// Writes `pieces` as object `dir/name` of the store, hashing on a second thread while the
/// first writes. Returns (bytes, blake3 hex). `step` arms the fault points of checkpoint
/// writes (None: no fault points).
fn write_object(store: &Store, dir: &str, name: &str, tag: &str, pieces: &[&[u8]], step: Option<u64>) -> Result<(u64, String), CheckpointError> {
    let key = format!("{dir}/{name}");
    let path = store.local_path(&key).map_err(|e| CheckpointError::io(Path::new(&key), std::io::Error::other(e.to_string())))?;
    let Some(path) = path else {
        if step.is_some_and(|s| failpoint::hit("checkpoint-enospc", s)) {
            return Err(CheckpointError::io(Path::new(&key), std::io::Error::from_raw_os_error(28)));
        }
        // A PUT is whole or absent: the fault points after the files and after the rename
        // are the same moment.
        let (put, hash) = std::thread::scope(|s| {
            let hasher = s.spawn(|| blake3_hex(pieces));
            (store.put(&key, pieces), hasher.join().expect("the hashing thread does not panic"))
        });
        put.map_err(|e| CheckpointError::io(Path::new(&key), std::io::Error::other(e.to_string())))?;
        if let Some(s) = step {
            failpoint::crash_if_hit("checkpoint-after-files", s);
            failpoint::crash_if_hit("checkpoint-after-rename", s);
        }
        return Ok((pieces.iter().map(|p| p.len() as u64).sum(), hash));
    };
    write_file(path.parent().expect("a key has a folder"), name, tag, pieces, step)
}

/// Writes `pieces` as the file `dir/name`: under a temporary name, fsynced, renamed, folder
/// fsynced, hashing on a second thread while the first writes. Returns (bytes, blake3 hex).
fn write_file(dir: &Path, name: &str, tag: &str, pieces: &[&[u8]], step: Option<u64>) -> Result<(u64, String), CheckpointError> {
    shoal_core::fsutil::create_dirs_durably(dir).map_err(|e| CheckpointError::io(dir, e))?;
    let tmp = dir.join(format!(".{name}.tmp.{tag}"));
    let (written, hash) = std::thread::scope(|s| {
        let hasher = s.spawn(|| blake3_hex(pieces));
        let written = (|| -> std::io::Result<()> {
            if step.is_some_and(|s| failpoint::hit("checkpoint-enospc", s)) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            let mut f = File::create(&tmp)?;
            for p in pieces {
                f.write_all(p)?;
            }
            f.sync_all()
        })();
        (written, hasher.join().expect("the hashing thread does not panic"))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CheckpointError::io(&dir.join(name), e));
    }
    if let Some(s) = step {
        failpoint::crash_if_hit("checkpoint-after-files", s);
    }
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(|e| CheckpointError::io(&path, e))?;
    sync_dir(dir).map_err(|e| CheckpointError::io(dir, e))?;
    if let Some(s) = step {
        failpoint::crash_if_hit("checkpoint-after-rename", s);
    }
    Ok((pieces.iter().map(|p| p.len() as u64).sum(), hash))
}

/// Writes one rank's part of a checkpoint and returns its record for the manifest.
pub fn write_part(store: &Store, s: &PartSnapshot) -> Result<CheckpointFile, CheckpointError> {
    let name = shoal_core::checkpoint::part_file(s.rank);
    let header = safetensors_header(&s.tensors);
    let data = f32_bytes(&s.data);
    let tag = format!("{}.{}", std::process::id(), s.generation);
    let (bytes, blake3) = write_object(store, &s.dir, &name, &tag, &[&header, &data], Some(s.step))?;
    Ok(CheckpointFile { name, bytes, blake3, rank: s.rank })
}

/// Bytes read, hashed and handed out at a time, and how many such buffers a read keeps in
/// flight: a reader thread keeps the disk busy while the caller's thread hashes and copies.
const PIECE: usize = 4 << 20;
const PIECES_IN_FLIGHT: usize = 4;
/// Largest safetensors header accepted (a checkpoint's is a few KB).
const MAX_HEADER: u64 = 64 << 20;

/// Reads `file` (`len` bytes) front to back in pieces on a second thread and hands each piece,
/// with its offset, to `consume` on this one. An error of either side ends both.
fn read_pieces(
    path: &Path,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + Send,
    len: u64,
    mut consume: impl FnMut(u64, &[u8]) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    std::thread::scope(|s| {
        let (full_tx, full_rx) = mpsc::sync_channel::<std::io::Result<Vec<u8>>>(PIECES_IN_FLIGHT);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..PIECES_IN_FLIGHT {
            let _ = empty_tx.send(Vec::new());
        }
        s.spawn(move || {
            let mut left = len;
            while left > 0 {
                // Ends when the consumer is gone (it stopped on an error).
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = left.min(PIECE as u64) as usize;
                buf.resize(n, 0);
                let read = read_at(len - left, &mut buf).map(|_| buf);
                let failed = read.is_err();
                if full_tx.send(read).is_err() || failed {
                    return;
                }
                left -= n as u64;
            }
        });
        let mut pos = 0u64;
        while pos < len {
            let piece = full_rx
                .recv()
                .map_err(|_| CheckpointError::io(path, std::io::Error::other("the reader thread stopped")))?
                .map_err(|e| CheckpointError::io(path, e))?;
            consume(pos, &piece)?;
            pos += piece.len() as u64;
            let _ = empty_tx.send(piece);
        }
        Ok(())
    })
}

/// One tensor of a safetensors file: its byte range in the file, name and shape.
#[derive(Debug)]
struct Span {
    start: u64,
    end: u64,
    name: String,
    shape: Vec<usize>,
}

/// Parses a safetensors header of f32 tensors (the JSON after the length prefix) and checks
/// that the tensors tile the `data_len` bytes after it exactly. Spans come in file order.
fn parse_header(json: &[u8], data_start: u64, data_len: u64) -> Result<Vec<Span>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("header is not a JSON object")?;
    let mut spans = Vec::new();
    for (name, t) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = |what: &str| format!("tensor {name}: {what}");
        if t["dtype"] != "F32" {
            return Err(bad(&format!("dtype {} is not F32", t["dtype"])));
        }
        let shape: Vec<usize> = t["shape"].as_array().ok_or_else(|| bad("no shape"))?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>().ok_or_else(|| bad("bad shape"))?;
        let offsets = t["data_offsets"].as_array().filter(|o| o.len() == 2).ok_or_else(|| bad("no data_offsets"))?;
        let (Some(a), Some(b)) = (offsets[0].as_u64(), offsets[1].as_u64()) else { return Err(bad("bad data_offsets")) };
        let elems = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or_else(|| bad("shape overflows"))?;
        if b < a || b - a != elems.saturating_mul(4) {
            return Err(bad(&format!("data_offsets [{a}, {b}) do not hold {elems} f32 values")));
        }
        spans.push(Span { start: data_start + a, end: data_start + b, name: name.clone(), shape });
    }
    spans.sort_by_key(|s| s.start);
    let mut at = data_start;
    for s in &spans {
        if s.start != at {
            return Err(format!("tensor {} starts at byte {}, expected {at} (a gap or an overlap)", s.name, s.start));
        }
        at = s.end;
    }
    if at != data_start + data_len {
        return Err(format!("tensors end at byte {at}, the file at {}", data_start + data_len));
    }
    Ok(spans)
}

/// Reads every file of a checkpoint and checks it against the manifest: its size, its
/// safetensors structure and its blake3. Each tensor is handed to `each` in pieces, as
/// `(name, shape, offset of the piece in the tensor's bytes, piece)` (little-endian f32), in
/// the same pass that hashes the file, while a second thread keeps reading ahead: a restore
/// reads every byte once, at about the disk's speed. The first bad file is the error, by name;
/// it can come after some of that file's pieces were handed out, so callers drop what they
/// built on error.
pub fn read_tensors(
    store: &Store,
    m: &CheckpointManifest,
    mut each: impl FnMut(&str, &[usize], usize, &[u8]) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    validate_manifest(m, m.job_id).map_err(CheckpointError::Mismatch)?;
    for f in &m.files {
        let key = format!("{}/{}", m.dir, f.name);
        let local = store.local_path(&key).map_err(|e| CheckpointError::io(Path::new(&key), std::io::Error::other(e.to_string())))?;
        let path = local.unwrap_or_else(|| PathBuf::from(format!("{}/{key}", store.location())));
        let store_error = |e: shoal_core::store::StoreError| match e {
            shoal_core::store::StoreError::NotFound { .. } => std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()),
            e => std::io::Error::other(e.to_string()),
        };
        // A local file is read with one handle; an object by ranged GETs.
        let (file, len) = match store.local_root() {
            Some(_) => {
                let file = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
                let len = file.metadata().map_err(|e| CheckpointError::io(&path, e))?.len();
                (Some(file), len)
            }
            None => (None, store.size(&key).map_err(|e| CheckpointError::io(&path, store_error(e)))?),
        };
        if len != f.bytes {
            return Err(CheckpointError::corrupt(&path, format!("{len} bytes, the manifest says {} (truncated or torn)", f.bytes)));
        }
        let mut hasher = blake3::Hasher::new();
        let mut head = Vec::new();
        let mut spans: Option<Vec<Span>> = None;
        // A structural problem is reported after hashing, as a hash mismatch when it is one.
        let mut broken: Option<String> = None;
        let mut next = 0usize;
        let read_at = |pos: u64, buf: &mut [u8]| -> std::io::Result<()> {
            match &file {
                Some(file) => std::os::unix::fs::FileExt::read_exact_at(file, buf, pos),
                None => {
                    let got = store.get_range(&key, pos..pos + buf.len() as u64).map_err(store_error)?;
                    if got.len() != buf.len() {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "object shorter than its size"));
                    }
                    buf.copy_from_slice(&got);
                    Ok(())
                }
            }
        };
        read_pieces(&path, read_at, len, |pos, piece| {
            hasher.update(piece);
            if broken.is_some() {
                return Ok(());
            }
            if spans.is_none() {
                head.extend_from_slice(piece);
                if head.len() < 8 {
                    return Ok(());
                }
                let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
                if n > MAX_HEADER || n > len - 8 {
                    broken = Some(format!("header length {n} does not fit a {len}-byte file"));
                    return Ok(());
                }
                if (head.len() as u64) < 8 + n {
                    return Ok(());
                }
                match parse_header(&head[8..8 + n as usize], 8 + n, len - 8 - n) {
                    Ok(s) => spans = Some(s),
                    Err(e) => {
                        broken = Some(e);
                        return Ok(());
                    }
                }
                head = Vec::new();
            }
            let spans = spans.as_ref().expect("parsed above");
            let end = pos + piece.len() as u64;
            while let Some(s) = spans.get(next) {
                if s.start >= end {
                    break;
                }
                let (lo, hi) = (s.start.max(pos), s.end.min(end));
                if lo < hi {
                    each(&s.name, &s.shape, (lo - s.start) as usize, &piece[(lo - pos) as usize..(hi - pos) as usize])?;
                }
                if s.end > end {
                    break;
                }
                next += 1;
            }
            Ok(())
        })?;
        let hash = hasher.finalize().to_hex().to_string();
        if hash != f.blake3 {
            return Err(CheckpointError::corrupt(&path, format!("blake3 {hash} does not match the manifest's {}", f.blake3)));
        }
        if let Some(why) = broken.or_else(|| spans.is_none().then(|| "no complete safetensors header".to_string())) {
            return Err(CheckpointError::corrupt(&path, why));
        }
    }
    Ok(())
}

fn copy_le(dst: &mut [f32], src: &[u8]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes(c.try_into().expect("4 bytes"));
    }
}

/// The name a tensor of a checkpoint written before layer lists has now: the presets' tensors
/// were `fc0.weight`, `conv1.bias`; they are the Sequential's (`0.weight`, `3.bias`) since.
/// The MLP is `Sequential(Linear, ReLU, ..., Linear)`, so dense layer i is module 2i; the CNN
/// is `Sequential(Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, MaxPool2d, Flatten, Linear, ...)`,
/// so its convolutions are modules 0 and 3 and dense layer i is module 7 + 2i. Optimizer
/// tensors (`optimizer.BUFFER.PARAM`) keep their prefix. None: not an old preset name.
pub fn legacy_name(kind: &str, name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("optimizer.") {
        let (buffer, param) = rest.split_once('.')?;
        return Some(format!("optimizer.{buffer}.{}", legacy_name(kind, param)?));
    }
    let (module, field) = name.split_once('.')?;
    let dense_base = match kind {
        "mlp" => 0,
        "cnn" => 7,
        _ => return None,
    };
    let index = match (kind, module) {
        ("cnn", "conv1") => 0,
        ("cnn", "conv2") => 3,
        (_, fc) => dense_base + 2 * fc.strip_prefix("fc")?.parse::<usize>().ok()?,
    };
    Some(format!("{index}.{field}"))
}

/// Loads a committed checkpoint into `params` and `opt` (as laid out for `model`). The
/// checkpoint must hold the same tensors (names and shapes) and the same optimizer kind; a
/// mismatch is an error that says which, and a damaged file an error that names it. On error
/// the buffers hold a partial state: start again from fresh ones. A preset written as a layer
/// list loads the preset's checkpoints and the other way round: they are the same tensors.
pub fn restore(store: &Store, m: &CheckpointManifest, model: &Layout, params: &mut [f32], opt: &mut Opt) -> Result<(), CheckpointError> {
    let what = format!("checkpoint step {} of job {}", m.step, m.job_id);
    if m.optimizer_kind != opt.kind() {
        return Err(CheckpointError::Mismatch(format!("{what} holds {} optimizer state; this job uses {}", m.optimizer_kind, opt.kind())));
    }
    if m.num_params as usize != model.num_params() {
        return Err(CheckpointError::Mismatch(format!(
            "{what} holds a {} model of {} parameters; this job trains a {} model of {}",
            m.model_kind,
            m.num_params,
            model.kind,
            model.num_params()
        )));
    }
    let tensors = state_tensors(model, opt);
    let index: HashMap<&str, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut seen = vec![false; tensors.len()];
    read_tensors(store, m, |name, shape, at, piece| {
        let i = match index.get(name) {
            Some(i) => *i,
            None => legacy_name(&m.model_kind, name)
                .and_then(|n| index.get(n.as_str()).copied())
                .ok_or_else(|| CheckpointError::Mismatch(format!("{what}: tensor {name} belongs to no parameter of this model")))?,
        };
        let t = &tensors[i];
        if shape != t.shape.as_slice() {
            return Err(CheckpointError::Mismatch(format!("{what}: tensor {name} has shape {shape:?}, this model's is {:?}", t.shape)));
        }
        if at == 0 && std::mem::replace(&mut seen[i], true) {
            return Err(CheckpointError::Mismatch(format!("{what}: tensor {name} appears twice")));
        }
        let dst = if t.buffer == 0 { &mut params[..] } else { &mut opt.buffers[t.buffer - 1][..] };
        let from = t.offset + at / 4;
        copy_le(&mut dst[from..from + piece.len() / 4], piece);
        Ok(())
    })?;
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(CheckpointError::Mismatch(format!("{what}: tensor {} is missing", tensors[i].name)));
    }
    opt.step = m.optimizer_step;
    Ok(())
}

/// Reads only the parameters of checkpoint `m` into `params` (a warm start: the optimizer
/// state it holds, of whatever kind, is read and dropped).
pub fn warm_start(store: &Store, m: &CheckpointManifest, model: &Layout, params: &mut [f32]) -> Result<(), CheckpointError> {
    let cfg = match m.optimizer_kind.as_str() {
        "sgd" => shoal_core::spec::Optimizer::Sgd { lr: 0.0, momentum: 0.0, weight_decay: 0.0 },
        "adamw" => shoal_core::spec::Optimizer::AdamW { lr: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        other => return Err(CheckpointError::Mismatch(format!("checkpoint step {} of job {} holds an unknown optimizer {other:?}", m.step, m.job_id))),
    };
    let mut theirs = Opt::new(cfg, model.num_params());
    restore(store, m, model, params, &mut theirs)
}

/// Writes the parameters of a checkpoint as one safetensors file with the names and layout of
/// the `torch.nn.Sequential` built from the same layer list (a checkpoint from before layer
/// lists is renamed, see `legacy_name`), for `safetensors.torch.load_file` and
/// `load_state_dict`. Returns the tensors written (name, shape), in module order.
pub fn export_pytorch(store: &Store, m: &CheckpointManifest, out: &Path) -> Result<Vec<(String, Vec<usize>)>, CheckpointError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    read_tensors(store, m, |name, shape, at, piece| {
        if name.starts_with("optimizer.") {
            return Ok(());
        }
        if at == 0 {
            let sequential = |n: &str| n.split_once('.').is_some_and(|(module, _)| module.parse::<usize>().is_ok());
            let renamed = if sequential(name) { Some(name.to_string()) } else { legacy_name(&m.model_kind, name) }
                .ok_or_else(|| CheckpointError::Mismatch(format!("tensor {name} of a {} checkpoint has no PyTorch name", m.model_kind)))?;
            tensors.push((renamed, shape.to_vec(), Vec::new()));
        }
        tensors.last_mut().expect("a tensor's first piece comes first").2.extend_from_slice(piece);
        Ok(())
    })?;
    // Module order: by module index, weight before bias.
    tensors.sort_by_key(|(n, _, _)| {
        let (module, field) = n.split_once('.').unwrap_or((n, ""));
        (module.parse::<usize>().unwrap_or(usize::MAX), field != "weight")
    });
    let names: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let header = safetensors_header(&names);
    let mut pieces: Vec<&[u8]> = vec![&header];
    pieces.extend(tensors.iter().map(|(_, _, d)| d.as_slice()));
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file = out.file_name().ok_or_else(|| CheckpointError::io(out, std::io::Error::other("not a file path")))?;
    write_file(dir, &file.to_string_lossy(), &std::process::id().to_string(), &pieces, None)?;
    Ok(names)
}

/// What the training task needs from the coordinator while it runs (the runner implements it
/// over gRPC; tests over memory). Calls block; the writer thread makes them off the step loop.
pub trait JobLink: Send + Sync {
    /// Latest progress (best effort).
    fn progress(&self, p: &JobProgress);
    /// Commits a written checkpoint; returns the steps of the checkpoints kept after it.
    fn commit_checkpoint(&self, manifest: CheckpointManifest) -> Result<Vec<u64>, String>;
    /// A checkpoint that could not be written, or (`corrupt`) failed its hashes on reading.
    fn checkpoint_failed(&self, step: u64, message: String, corrupt: bool);
    /// Indexes a written chunk of the job's metric history (`dropped`: points lost since the
    /// previous chunk).
    fn record_metrics(&self, chunk: shoal_proto::MetricChunkRef, dropped: u64) -> Result<(), String>;
}

/// Writes the manifest, commits it, then deletes the folders of older checkpoints that are
/// no longer kept (and leftovers of writes that never committed).
fn finalize(store: &Store, link: &dyn JobLink, m: CheckpointManifest) -> Result<Vec<u64>, String> {
    store.put(&format!("{}/{MANIFEST_FILE}", m.dir), &[&m.encode_to_vec()]).map_err(|e| e.to_string())?;
    failpoint::crash_if_hit("checkpoint-before-commit", m.step);
    let (job, step) = (m.job_id, m.step);
    let kept = link.commit_checkpoint(m)?;
    let root = job_checkpoints_dir(job);
    let folders: std::collections::BTreeSet<String> = store
        .list(&root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some(e.key.strip_prefix(&root)?.strip_prefix('/')?.split('/').next()?.to_string()))
        .collect();
    for name in folders {
        let old = parse_step_dir(&name);
        if old.is_some_and(|s| s < step && !kept.contains(&s)) {
            if let Err(err) = store.delete_prefix(&format!("{root}/{name}")) {
                tracing::warn!(path = %format!("{root}/{name}"), error = %err, "could not delete an old checkpoint");
            }
        }
    }
    Ok(kept)
}

enum WriteJob {
    Part(PartSnapshot),
    Finalize(Box<CheckpointManifest>),
}

/// What the writer thread finished.
pub enum WriteDone {
    /// A part was written (or not); its snapshot buffer comes back for reuse.
    Part { step: u64, result: Result<CheckpointFile, String>, buffer: Vec<f32> },
    /// A manifest was written and committed (the kept steps), or not.
    Finalized { step: u64, result: Result<Vec<u64>, String> },
}

/// The background writer: one thread per training task, jobs in order, so at most one write
/// per job is in flight on this rank. Dropping it lets the current job finish and ends the
/// thread without waiting for it.
pub struct Writer {
    jobs: mpsc::Sender<WriteJob>,
    done: mpsc::Receiver<WriteDone>,
}

impl Writer {
    /// `seconds`: where each part's write time is observed (the job's Prometheus histogram).
    pub fn spawn(store: Store, link: Arc<dyn JobLink>, seconds: shoal_core::telemetry::Histogram) -> Result<Writer, WorkerError> {
        let (jobs, rx) = mpsc::channel::<WriteJob>();
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for job in rx {
                    let d = match job {
                        WriteJob::Part(s) => {
                            let started = std::time::Instant::now();
                            let result = write_part(&store, &s).map_err(|e| e.to_string());
                            seconds.observe(started.elapsed().as_secs_f64());
                            WriteDone::Part { step: s.step, result, buffer: s.data }
                        }
                        WriteJob::Finalize(m) => WriteDone::Finalized { step: m.step, result: finalize(&store, link.as_ref(), *m) },
                    };
                    if tx.send(d).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| WorkerError::Io(format!("cannot start the checkpoint writer: {e}")))?;
        Ok(Writer { jobs, done })
    }

    pub fn write_part(&self, s: PartSnapshot) {
        // A send fails only when the thread is gone; `wait_done` then returns None, which
        // callers treat as a failed write.
        let _ = self.jobs.send(WriteJob::Part(s));
    }

    pub fn finalize(&self, m: CheckpointManifest) {
        let _ = self.jobs.send(WriteJob::Finalize(Box::new(m)));
    }

    pub fn try_done(&self) -> Option<WriteDone> {
        self.done.try_recv().ok()
    }

    /// Blocks for the next finished job; None if the thread is gone.
    pub fn wait_done(&self) -> Option<WriteDone> {
        self.done.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::spec::{ModelSpec, Optimizer};

    fn layout(spec: ModelSpec, shape: &[u64], classes: u64) -> Layout {
        crate::model::Model::layout(&crate::model::Sequential::new(&spec, shape, classes, 0).unwrap()).clone()
    }

    fn model() -> Layout {
        layout(ModelSpec { kind: "mlp".into(), hidden: Some(vec![6]), ..Default::default() }, &[2, 2], 3)
    }

    fn sgd() -> Opt {
        Opt::new(Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }, model().num_params())
    }

    /// Writes a whole checkpoint of (params, opt) at `step` over `world` ranks, as the ranks
    /// would, and returns its manifest.
    fn write_checkpoint(store: &Store, step: u64, world: usize, params: &[f32], opt: &Opt) -> CheckpointManifest {
        let m = model();
        let tensors = state_tensors(&m, opt);
        let dir_rel = shoal_core::checkpoint::checkpoint_dir(7, step);
        let mut files = Vec::new();
        for (r, mine) in assign_parts(&tensors, world).iter().enumerate() {
            let s = PartSnapshot::take(step, r as u32, 1, dir_rel.clone(), &tensors, mine, params, opt, Vec::new());
            files.push(write_part(store, &s).unwrap());
        }
        CheckpointManifest {
            job_id: 7,
            step,
            world_size: world as u32,
            model_kind: "mlp".into(),
            optimizer_kind: opt.kind().into(),
            optimizer_step: opt.step,
            num_params: m.num_params() as u64,
            files,
            dir: dir_rel,
            ..Default::default()
        }
    }

    fn state(seed: u64) -> (Vec<f32>, Opt) {
        let m = model();
        let mut opt = sgd();
        let mut p = m.init(seed);
        let g: Vec<f32> = (0..p.len()).map(|i| (i as f32 * 0.1).sin()).collect();
        opt.apply(&mut p, &mut g.clone()).unwrap();
        opt.apply(&mut p, &mut g.clone()).unwrap();
        (p, opt)
    }

    #[test]
    fn parts_are_balanced_and_cover_every_tensor_once() {
        let m = model();
        let tensors = state_tensors(&m, &sgd());
        assert_eq!(tensors.len(), 8);
        assert_eq!(tensors[4].name, "optimizer.momentum_buffer.0.weight");
        for world in 1..=5 {
            let parts = assign_parts(&tensors, world);
            let mut all: Vec<usize> = parts.concat();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>(), "world {world}");
        }
        let parts = assign_parts(&tensors, 2);
        let size = |p: &Vec<usize>| p.iter().map(|&i| tensors[i].len()).sum::<usize>();
        assert_eq!(size(&parts[0]), size(&parts[1]), "two equal halves: params and momentum");
    }

    #[test]
    fn written_parts_restore_bitwise_on_any_world_size_and_are_real_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let (p, opt) = state(1);
        let man = write_checkpoint(&Store::local(dir.path()), 10, 3, &p, &opt);
        assert_eq!(man.files.len(), 3);
        for f in &man.files {
            let bytes = std::fs::read(dir.path().join(&man.dir).join(&f.name)).unwrap();
            assert_eq!(bytes.len() as u64, f.bytes);
            assert_eq!(blake3::hash(&bytes).to_hex().to_string(), f.blake3);
            safetensors::SafeTensors::deserialize(&bytes).unwrap();
        }
        let m = model();
        let (mut q, mut o) = (m.init(99), sgd());
        restore(&Store::local(dir.path()), &man, &m, &mut q, &mut o).unwrap();
        assert_eq!(q, p);
        assert_eq!(o.buffers, opt.buffers);
        assert_eq!(o.step, 2);
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join(&man.dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn a_truncated_or_flipped_file_is_named_and_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (p, opt) = state(2);
        let man = write_checkpoint(&Store::local(dir.path()), 20, 2, &p, &opt);
        let victim = dir.path().join(&man.dir).join(&man.files[1].name);
        let good = std::fs::read(&victim).unwrap();
        let m = model();

        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x01;
        std::fs::write(&victim, &flipped).unwrap();
        let e = restore(&Store::local(dir.path()), &man, &m, &mut m.init(0), &mut sgd()).unwrap_err();
        assert!(e.is_damage() && e.to_string().contains("part-1.safetensors") && e.to_string().contains("blake3"), "{e}");

        std::fs::write(&victim, &good[..good.len() - 5]).unwrap();
        let e = restore(&Store::local(dir.path()), &man, &m, &mut m.init(0), &mut sgd()).unwrap_err();
        assert!(e.to_string().contains("part-1.safetensors") && e.to_string().contains("truncated"), "{e}");

        std::fs::remove_file(&victim).unwrap();
        let e = restore(&Store::local(dir.path()), &man, &m, &mut m.init(0), &mut sgd()).unwrap_err();
        assert!(e.is_damage() && e.to_string().contains("part-1.safetensors"), "{e}");
    }

    #[test]
    fn a_checkpoint_of_another_model_or_optimizer_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (p, opt) = state(3);
        let mut man = write_checkpoint(&Store::local(dir.path()), 5, 1, &p, &opt);
        let m = model();
        let adam = || Opt::new(Optimizer::AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, m.num_params());
        let e = restore(&Store::local(dir.path()), &man, &m, &mut m.init(0), &mut adam()).unwrap_err();
        assert!(!e.is_damage() && e.to_string().contains("sgd") && e.to_string().contains("adamw"), "{e}");
        let cnn = layout(ModelSpec { kind: "cnn".into(), hidden: Some(vec![6]), channels: Some(vec![2, 2]), ..Default::default() }, &[4, 4], 3);
        let e = restore(&Store::local(dir.path()), &man, &cnn, &mut cnn.init(0), &mut Opt::new(opt.cfg, cnn.num_params())).unwrap_err();
        assert!(e.to_string().contains(&format!("holds a mlp model of {} parameters; this job trains a cnn model of", m.num_params())), "{e}");
        // The same number of parameters in other shapes: refused by the tensor's name.
        let other = layout(ModelSpec { kind: "mlp".into(), hidden: Some(vec![6]), ..Default::default() }, &[4], 3);
        let mut renamed = man.clone();
        renamed.num_params = other.num_params() as u64;
        assert_eq!(other.num_params(), m.num_params());
        let mut shifted = other.clone();
        shifted.params[0].shape = vec![4, 6];
        let e = restore(&Store::local(dir.path()), &renamed, &shifted, &mut other.init(0), &mut Opt::new(opt.cfg, other.num_params())).unwrap_err();
        assert!(e.to_string().contains("tensor 0.weight has shape [6, 4], this model's is [4, 6]"), "{e}");
        man.num_params = m.num_params() as u64;
    }

    #[test]
    fn checkpoints_with_the_old_preset_names_still_load_and_export() {
        // A checkpoint written before layer lists: tensors named fc0.weight, fc1.bias, ...
        let dir = tempfile::tempdir().unwrap();
        let (p, opt) = state(6);
        let m = model();
        let mut old = m.clone();
        for t in &mut old.params {
            let (module, field) = t.name.split_once('.').unwrap();
            t.name = format!("fc{}.{field}", module.parse::<usize>().unwrap() / 2);
        }
        let tensors = state_tensors(&old, &opt);
        assert_eq!(tensors[5].name, "optimizer.momentum_buffer.fc0.bias");
        let rel = shoal_core::checkpoint::checkpoint_dir(7, 3);
        let all: Vec<usize> = (0..tensors.len()).collect();
        let s = PartSnapshot::take(3, 0, 1, rel.clone(), &tensors, &all, &p, &opt, Vec::new());
        let man = CheckpointManifest {
            job_id: 7,
            step: 3,
            world_size: 1,
            model_kind: "mlp".into(),
            optimizer_kind: "sgd".into(),
            optimizer_step: opt.step,
            num_params: m.num_params() as u64,
            files: vec![write_part(&Store::local(dir.path()), &s).unwrap()],
            dir: rel,
            ..Default::default()
        };
        let (mut q, mut o) = (m.init(0), sgd());
        restore(&Store::local(dir.path()), &man, &m, &mut q, &mut o).unwrap();
        assert!(q == p && o.buffers == opt.buffers);
        let names = export_pytorch(&Store::local(dir.path()), &man, &dir.path().join("old.safetensors")).unwrap();
        assert_eq!(names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["0.weight", "0.bias", "2.weight", "2.bias"]);
        assert_eq!(legacy_name("cnn", "conv2.weight").as_deref(), Some("3.weight"));
        assert_eq!(legacy_name("cnn", "fc1.bias").as_deref(), Some("9.bias"));
        assert_eq!(legacy_name("sequential", "fc1.bias"), None);
    }

    #[test]
    fn export_uses_pytorch_names_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (p, opt) = state(4);
        let man = write_checkpoint(&Store::local(dir.path()), 8, 2, &p, &opt);
        let out = dir.path().join("out/model.safetensors");
        let names = export_pytorch(&Store::local(dir.path()), &man, &out).unwrap();
        let want = ["0.weight", "0.bias", "2.weight", "2.bias"];
        assert_eq!(names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), want);
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let m = model();
        let w = st.tensor("2.weight").unwrap();
        assert_eq!(w.shape(), &[3, 6]);
        assert_eq!(w.dtype(), safetensors::Dtype::F32);
        let fc1 = &m.params[2];
        let mut got = vec![0f32; fc1.len()];
        copy_le(&mut got, w.data());
        assert_eq!(got, p[fc1.offset..fc1.offset + fc1.len()]);
    }

    #[test]
    fn tensors_larger_than_a_read_piece_restore_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let big = layout(ModelSpec { kind: "mlp".into(), hidden: Some(vec![1500]), ..Default::default() }, &[28, 28], 10);
        assert!(big.params[0].len() * 4 > PIECE, "0.weight must span read pieces");
        let mut opt = Opt::new(Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }, big.num_params());
        let mut p = big.init(5);
        let g = vec![0.5; p.len()];
        opt.apply(&mut p, &mut g.clone()).unwrap();
        let tensors = state_tensors(&big, &opt);
        let rel = shoal_core::checkpoint::checkpoint_dir(7, 1);
        let mine: Vec<usize> = (0..tensors.len()).collect();
        let s = PartSnapshot::take(1, 0, 1, rel.clone(), &tensors, &mine, &p, &opt, Vec::new());
        let file = write_part(&Store::local(dir.path()), &s).unwrap();
        let m = CheckpointManifest {
            job_id: 7,
            step: 1,
            world_size: 1,
            model_kind: "mlp".into(),
            optimizer_kind: "sgd".into(),
            optimizer_step: 1,
            num_params: big.num_params() as u64,
            files: vec![file],
            dir: rel,
            ..Default::default()
        };
        let (mut q, mut o) = (big.init(0), Opt::new(opt.cfg, big.num_params()));
        restore(&Store::local(dir.path()), &m, &big, &mut q, &mut o).unwrap();
        assert!(q == p && o.buffers == opt.buffers);
    }

    #[test]
    fn headers_must_tile_the_data_exactly() {
        let t = |name: &str, a: u64, b: u64| format!("\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{a},{b}]}}", (b - a) / 4);
        let ok = format!("{{{},{}}}", t("a", 0, 8), t("b", 8, 16));
        assert_eq!(parse_header(ok.as_bytes(), 100, 16).unwrap().iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(), vec![(100, 108), (108, 116)]);
        let gap = format!("{{{},{}}}", t("a", 0, 8), t("b", 12, 20));
        assert!(parse_header(gap.as_bytes(), 100, 20).unwrap_err().contains("gap"));
        assert!(parse_header(ok.as_bytes(), 100, 24).unwrap_err().contains("end"));
        assert!(parse_header(b"{\"a\":{\"dtype\":\"I64\"}}", 0, 0).unwrap_err().contains("F32"));
        assert!(parse_header(b"not json", 0, 0).is_err());
    }

    #[test]
    fn an_injected_disk_full_error_leaves_no_file() {
        // The fault point reads the environment once per process; exercise the error path
        // directly through an unwritable folder instead.
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let e = write_file(&blocker, "f", "t", &[b"abc"], Some(1)).unwrap_err();
        assert!(e.to_string().contains("not-a-dir"), "{e}");
    }
}
