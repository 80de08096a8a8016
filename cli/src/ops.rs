//! The operations behind the CLI commands, over the coordinator client: importing datasets,
//! submitting and following jobs, and their JSON views.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use shoal_coordinator::client::Code;
use shoal_coordinator::{Client, ClientError};
use shoal_core::dataset::{encode_shards, import_dir, manifest_object, Records, DEFAULT_RECORDS_PER_SHARD};
use shoal_core::idx::read_idx_file;
use shoal_proto::*;

/// Bytes per chunk a client streams to `PutObjects`.
const PUT_CHUNK: usize = 1 << 20;

/// Writes `objects` (key, bytes) of a new import into the store through a coordinator:
/// clients never hold the store's credentials.
pub async fn put_objects(client: &Client, objects: Vec<(String, Vec<u8>)>) -> Result<()> {
    let objects = std::sync::Arc::new(objects);
    client
        .call(|mut c| {
            let objects = objects.clone();
            // Chunks made as the stream is read (each object's in order), so a retry replays them.
            let chunks = (0..objects.len()).flat_map(move |i| {
                let objects = objects.clone();
                let len = objects[i].1.len();
                let pieces = len.div_ceil(PUT_CHUNK).max(1);
                (0..pieces).map(move |p| {
                    let (key, bytes) = &objects[i];
                    let end = ((p + 1) * PUT_CHUNK).min(len);
                    ObjectChunk { key: key.clone(), data: bytes[p * PUT_CHUNK..end].to_vec(), last: p + 1 == pieces }
                })
            });
            async move { c.put_objects(tokio_stream::iter(chunks)).await }
        })
        .await?;
    Ok(())
}

/// Reads object `key` of the store through a coordinator.
pub async fn get_object(client: &Client, key: &str) -> Result<Vec<u8>> {
    let chunks = client
        .call(|mut c| {
            let key = key.to_string();
            async move {
                let mut stream = c.get_object(GetObjectRequest { key }).await?.into_inner();
                let mut out = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    out.extend_from_slice(&chunk.data);
                }
                Ok(tonic::Response::new(out))
            }
        })
        .await
        .with_context(|| format!("reading {key} from the store"))?;
    Ok(chunks)
}

/// A copy of checkpoint `m`'s files in a temporary folder (kept while the first value
/// lives), as a local store to read it from.
pub async fn fetch_checkpoint(client: &Client, m: &CheckpointManifest) -> Result<(tempfile::TempDir, shoal_core::store::Store)> {
    let dir = tempfile::tempdir().context("a temporary folder for the checkpoint")?;
    let store = shoal_core::store::Store::local(dir.path());
    for f in &m.files {
        let key = format!("{}/{}", m.dir, f.name);
        let bytes = get_object(client, &key).await?;
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.put(&key, &[&bytes])).await??;
    }
    Ok((dir, store))
}

/// Reads IDX files, writes them into a folder of the cluster's store that is this import's
/// alone, and registers them as the next version of dataset `name` (the coordinator picks the
/// number). A registration that was refused leaves nothing behind; one whose outcome is
/// unknown (no coordinator answered) keeps its files and says so, since they may be
/// registered.
/// How `data import` and `data append` read their files.
pub struct Source<'a> {
    pub files: &'a [PathBuf],
    /// `idx` or `csv`; None: by extension (`.csv` is CSV, anything else IDX).
    pub format: Option<&'a str>,
    /// CSV: the label column.
    pub label: Option<&'a str>,
    /// CSV: the regression target column.
    pub target: Option<&'a str>,
    /// Only records [start, end) of the files.
    pub range: Option<(usize, usize)>,
    /// Text: the window (tokens a model reads) and the stride between windows.
    pub context: Option<usize>,
    pub stride: Option<usize>,
}

/// A source file mapped, not read: copying a large table costs about as much as parsing it.
/// The file must not be truncated while it is imported.
fn map_file(path: &PathBuf) -> Result<memmap2::Mmap> {
    let opened = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    // SAFETY: the map is only read, and dropped before the import returns.
    unsafe { memmap2::Mmap::map(&opened) }.with_context(|| format!("reading {}", path.display()))
}

/// Imports files as dataset `name` (version 1; `append`: a new slice on its latest version).
pub async fn import_idx(client: &Client, name: &str, src: &Source<'_>, per_shard: Option<usize>, append: bool) -> Result<DatasetInfo> {
    shoal_core::dataset::validate_name(name)?;
    let files = src.files;
    if files.is_empty() {
        bail!("no files given: pass a features file and a labels file (IDX, gzip or not), or one CSV file");
    }
    // The version an append adds to: its classes, and its first slice's bins (the stats must
    // use them for the drift check; the coordinator checks again when it applies the append).
    let base = if append {
        let base = client
            .call(|mut c| { let name = name.to_string(); async move { c.get_dataset(GetDatasetRequest { name, shards_only: true, ..Default::default() }).await } })
            .await
            .map_err(|e| match e {
                ClientError::Rpc(s) if s.code() == Code::NotFound => anyhow::anyhow!("dataset {name} does not exist: create it with `shoal data import {name} FILES...`"),
                e => anyhow::anyhow!("reading dataset {name} to append to it: {e}"),
            })?;
        Some(base)
    } else {
        None
    };
    let all_are = |ext: &str| files.iter().all(|f| f.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)));
    let format = match src.format {
        Some(f @ ("idx" | "csv" | "npy" | "safetensors" | "text")) => f,
        Some(other) => bail!("--format must be idx, csv, npy, safetensors or text, not {other:?}"),
        None if base.as_ref().is_some_and(|b| b.context > 0) => "text",
        None if all_are("csv") => "csv",
        None if all_are("npy") => "npy",
        None if all_are("safetensors") => "safetensors",
        None => "idx",
    };
    if src.label.is_some() && format != "csv" {
        bail!("--label applies to CSV files; {format} labels come from their own file or tensor");
    }
    if src.target.is_some() && format != "csv" {
        bail!("--target applies to CSV files; {format} files give float targets as a float y (its own file or tensor)");
    }
    if format != "text" && (src.context.is_some() || src.stride.is_some()) {
        bail!("--context and --stride apply to text (--format text)");
    }
    if format == "text" && (src.label.is_some() || src.target.is_some()) {
        bail!("--label and --target do not apply to text: a text record's targets are its own next tokens");
    }
    let read = |f: &PathBuf| std::fs::read(f).with_context(|| format!("reading {}", f.display()));
    if format == "text" {
        let (context, stride) = match &base {
            Some(b) if b.context == 0 => bail!("dataset {name} holds records of features, not text: append text to a text dataset"),
            Some(b) => {
                let (c, s) = (b.context as usize, b.stride as usize);
                if src.context.is_some_and(|x| x != c) || src.stride.is_some_and(|x| x != s) {
                    bail!("dataset {name} is text with --context {c} --stride {s}; an append keeps them (leave them out or pass the same)");
                }
                (c, s)
            }
            None => {
                let c = src.context.context("text: give the window with --context N (tokens a model reads per record)")?;
                (c, src.stride.unwrap_or(c))
            }
        };
        let texts = files.iter().map(|f| read(f).map(|b| (f.display().to_string(), b))).collect::<Result<Vec<_>>>()?;
        let tokens = shoal_core::text::join(&texts);
        let mut records = shoal_core::text::windows(&tokens, context, stride)?;
        if let Some((start, end)) = src.range {
            records = records.select(start, end)?;
        }
        let (start, end) = src.range.unwrap_or((0, records.len()));
        let stride32 = u32::try_from(stride).map_err(|_| anyhow::anyhow!("--stride {stride} is too large (at most {})", u32::MAX))?;
        // The statistics of the tokens the windows kept cover.
        let stats = || shoal_core::text::slice_stats(shoal_core::text::covered(&tokens, context, stride, start, end));
        return register_records(client, name, files, &records, per_shard, append, stats, (start, end), Vec::new(), Some((context as u32, stride32))).await;
    }
    let (mut records, class_names) = if format == "npy" {
        let maps = files.iter().map(map_file).collect::<Result<Vec<_>>>()?;
        let arrays: Vec<(String, &[u8])> = files.iter().zip(&maps).map(|(f, m)| (f.display().to_string(), &m[..])).collect();
        (shoal_core::dataset::records_from_npy(&arrays)?, Vec::new())
    } else if format == "safetensors" {
        let [file] = files else { bail!("safetensors: pass one file (tensors x: features, y: labels)") };
        (shoal_core::dataset::records_from_safetensors(&file.display().to_string(), &read(file)?)?, Vec::new())
    } else if format == "csv" {
        let [file] = files else { bail!("CSV: pass one file (it holds the features and the label column)") };
        let text = map_file(file)?;
        if let Some(target) = src.target {
            (shoal_core::dataset::records_from_csv_target(&file.display().to_string(), &text, target)?, Vec::new())
        } else {
        let label = src.label.context("CSV: name the label column with --label COL (or a regression target with --target COL)")?;
        let known = base.as_ref().map(|b| b.class_names.clone()).unwrap_or_default();
        shoal_core::dataset::records_from_csv(&file.display().to_string(), &text, label, &known)?
        }
    } else {
        let mut arrays = Vec::new();
        for f in files {
            arrays.push((f.display().to_string(), read_idx_file(f)?));
        }
        (Records::from_idx(arrays)?, Vec::new())
    };
    let read = records.len();
    let (start, end) = src.range.unwrap_or((0, read));
    if src.range.is_some() {
        records = records.select(start, end)?;
    }
    let classes = (records.classes() as usize).max(class_names.len());
    // The version's statistics keep the first slice's bins, which every slice uses.
    let stats = |records: &Records| match &base {
        Some(base) => {
            let ranges = base.stats.as_ref().map(shoal_core::stats::ranges);
            let fits = ranges.as_ref().is_none_or(|r| r.len() == records.feature_shape.iter().product::<usize>());
            shoal_core::stats::slice_stats(records, ranges.as_deref().filter(|_| fits), (base.classes as usize).max(classes))
        }
        None => shoal_core::stats::slice_stats(records, None, classes),
    };
    let records = &records;
    register_records(client, name, files, records, per_shard, append, || stats(records), (start, end), class_names, None).await
}

/// Writes `records` as a new import's shards, then registers them as dataset `name` (or a
/// slice of it: `append`) with the slice's `stats`; `text`: (context, stride) of text windows.
#[allow(clippy::too_many_arguments)]
async fn register_records(
    client: &Client,
    name: &str,
    files: &[PathBuf],
    records: &Records,
    per_shard: Option<usize>,
    append: bool,
    stats: impl FnOnce() -> shoal_proto::SliceStats + Send,
    (start, end): (usize, usize),
    class_names: Vec<String>,
    text: Option<(u32, u32)>,
) -> Result<DatasetInfo> {
    let request_id = shoal_coordinator::client::new_request_id();
    let folder = import_dir(name, &request_id)?;
    // Shards of at least ~1.6 MB (2048 MNIST images): small records would otherwise make
    // thousands of files, each written and fsynced on its own.
    let record_bytes = records.feature_shape.iter().product::<usize>() * if records.dtype() == "u8" { 1 } else { 4 } + 8.max(4 * records.target_width());
    let per_shard = per_shard.unwrap_or_else(|| DEFAULT_RECORDS_PER_SHARD.max(DEFAULT_RECORDS_PER_SHARD * 784 / record_bytes.max(1)));
    // The statistics are computed while the shards are encoded.
    let encoded = std::sync::Mutex::new(Vec::new());
    let (stats, written) = rayon::join(stats, || {
        encode_shards(name, &folder, records, per_shard.max(1), |key, bytes| {
            encoded.lock().expect("encoded shards lock").push((key.to_string(), bytes));
            Ok(())
        })
    });
    let folder = folder.to_string_lossy().into_owned();
    let written = match written {
        Ok(info) => put_objects(client, encoded.into_inner().expect("encoded shards lock")).await.map(|()| info),
        Err(e) => Err(e.into()),
    };
    let info = match written {
        Ok(mut info) => {
            info.append = append;
            if let Some((context, stride)) = text {
                (info.context, info.stride, info.classes) = (context, stride, shoal_core::text::VOCAB);
            }
            if !class_names.is_empty() {
                info.classes = info.classes.max(class_names.len() as u32);
                info.class_names = class_names;
            }
            let imported_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            let sources = files.iter().map(|f| f.display().to_string()).collect();
            info.slices = vec![DatasetSlice { sources, imported_unix_ms, source_start: start as u64, source_end: end as u64, stats: Some(stats), ..Default::default() }];
            info
        }
        Err(e) => {
            drop_import(client, &folder).await;
            return Err(e);
        }
    };
    let registered = client
        .call(|mut c| {
            let req = RegisterDatasetRequest { dataset: Some(info.clone()), request_id: request_id.clone() };
            async move { c.register_dataset(req).await }
        })
        .await;
    match registered {
        Ok(d) => {
            let manifest = manifest_object(&d).map_err(anyhow::Error::from);
            if let Err(e) = async { put_objects(client, vec![manifest?]).await }.await {
                tracing::warn!(error = %e, "could not write the dataset manifest beside its shards");
            }
            Ok(d)
        }
        Err(ClientError::Rpc(s)) if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument | Code::NotFound) => {
            // Refused by the state machine: nothing refers to this import's folder.
            drop_import(client, &folder).await;
            Err(ClientError::Rpc(s).into())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "registering dataset {name}: the outcome is unknown, so its shards in {folder} of the store were kept (they may be registered)"
        ))),
    }
}

/// Removes an import's folder that nothing refers to (best effort: `data gc` removes what
/// is left).
async fn drop_import(client: &Client, folder: &str) {
    let dropped = client.call(|mut c| { let folder = folder.to_string(); async move { c.drop_import(DropImportRequest { folder }).await } }).await;
    if let Err(e) = dropped {
        tracing::warn!(folder, error = %e, "could not remove the import's shards (`shoal data gc` does)");
    }
}

/// Per-feature statistics (mean, std, min, max, missing) and the label histogram.
fn stats_json(s: &SliceStats) -> Value {
    if s.tokens > 0 {
        // Text: its tokens and their byte histogram (index = byte value).
        return json!({"tokens": s.tokens, "bytes": s.label_counts});
    }
    json!({
        "features": s.features.iter().map(|f| {
            let (mean, std) = shoal_core::stats::mean_std(f);
            json!({"mean": mean, "std": std, "min": f.min, "max": f.max, "missing": f.missing})
        }).collect::<Vec<_>>(),
        "labels": s.label_counts,
    })
}


pub fn dataset_json(d: &DatasetInfo) -> Value {
    let settings = d.settings.clone().unwrap_or(DatasetSettings { max_label_js: 0.1, max_feature_js: 0.1, on_drift: "warn".into() });
    json!({
        // The sum of the version's slices' (the coordinator adds them up).
        "stats": d.stats.as_ref().map(stats_json).unwrap_or(Value::Null),
        "settings": {"max_label_js": settings.max_label_js, "max_feature_js": settings.max_feature_js, "on_drift": settings.on_drift},
        "name": d.name,
        "version": d.version,
        "records": d.records,
        "feature_shape": d.feature_shape,
        "classes": d.classes,
        // Float targets per record (a regression's); 0: class labels.
        "target_width": d.target_width,
        // Text: tokens a model reads per record (each holds context + 1), and the stride.
        "context": if d.context > 0 { json!(d.context) } else { Value::Null },
        "stride": if d.context > 0 { json!(d.stride) } else { Value::Null },
        "class_names": d.class_names,
        "feature_dtype": d.feature_dtype,
        "slices": d.slices.iter().map(|s| json!({
            "index_range": [s.first, s.first + s.records], "records": s.records, "sources": s.sources,
            "source_records": [s.source_start, s.source_end], "blake3": s.blake3, "folder": s.folder,
            "imported": if s.imported_unix_ms > 0 { json!(utc(s.imported_unix_ms)) } else { Value::Null },
            "stats": s.stats.as_ref().map(stats_json).unwrap_or(Value::Null),
            "label_js": s.label_js, "feature_js": s.feature_js, "feature_js_at": s.feature_js_at,
            "drift": if s.drift.is_empty() { Value::Null } else { json!(s.drift) },
            // Written by a batch job: its lineage.
            "lineage": if s.batch_job > 0 { json!({"job": s.batch_job, "operator": s.operator, "input": s.input, "model": if s.model.is_empty() { Value::Null } else { json!(s.model) }}) } else { Value::Null },
        })).collect::<Vec<_>>(),
        "transform": d.transform.as_ref().map(transform_json).unwrap_or(Value::Null),
        "shards": d.shards.iter().map(|s| json!({"path": s.path, "records": s.records, "blake3": s.blake3, "bytes": s.bytes})).collect::<Vec<_>>(),
        // A page: its slices (newest first) and their shards; every version up to this one.
        "slice_count": d.slice_count,
        "version_count": d.version_count,
        "versions": d.versions.iter().map(|v| json!({"version": v.version, "records": v.records, "slices": v.slices})).collect::<Vec<_>>(),
        "next_page": if d.next_page.is_empty() { Value::Null } else { json!(d.next_page) },
    })
}

pub fn model_version_json(m: &ModelInfo, v: &ModelVersion) -> Value {
    let c = v.checkpoint.clone().unwrap_or_default();
    json!({
        "name": m.name,
        "version": v.version,
        "aliases": m.aliases.iter().filter(|a| a.version == v.version).map(|a| a.alias.clone()).collect::<Vec<_>>(),
        "job": v.job_id,
        "dataset": v.dataset_name,
        "dataset_version": v.dataset_version,
        "parent": if v.parent.is_empty() { Value::Null } else { json!(v.parent) },
        "checkpoint": {"job": c.job_id, "step": c.step, "dir": c.dir},
        "test_accuracy": if v.test_accuracy >= 0.0 { json!(v.test_accuracy) } else { Value::Null },
        "holdout_accuracy": if v.holdout_accuracy >= 0.0 { json!(v.holdout_accuracy) } else { Value::Null },
        "holder_accuracy": if v.holder_version > 0 && v.holder_accuracy >= 0.0 { json!(v.holder_accuracy) } else { Value::Null },
        "holder_version": if v.holder_version > 0 { json!(v.holder_version) } else { Value::Null },
        "test_loss": v.test_loss,
        "test_rmse": v.test_rmse,
        "test_r2": v.test_r2,
        "test_bpb": v.test_bpb,
        // The gate's metric, and both scores of it on the holdout.
        "metric": if v.metric.is_empty() { Value::Null } else { json!(v.metric) },
        "holdout_score": v.holdout_score,
        "holder_score": v.holder_score,
        "promotion": if v.promotion.is_empty() { Value::Null } else { json!(v.promotion) },
        "spec": v.spec_toml,
    })
}

pub fn model_json(m: &ModelInfo) -> Value {
    json!({
        "name": m.name,
        // `versions` is a page (newest first); this many in all.
        "version_count": m.version_count,
        "versions": m.versions.iter().map(|v| model_version_json(m, v)).collect::<Vec<_>>(),
        "aliases": m.aliases.iter().map(|a| (a.alias.clone(), json!(a.version))).collect::<serde_json::Map<_, _>>(),
    })
}

/// `NAME` (the model), or `NAME@VERSION` / `NAME@ALIAS` (the model and that version).
pub async fn resolve_model(client: &Client, reference: &str) -> Result<(ModelInfo, Option<ModelVersion>)> {
    let (name, x) = match reference.split_once('@') {
        Some((n, x)) => (n.to_string(), Some(x.to_string())),
        None => (reference.to_string(), None),
    };
    let get = |page: String| {
        let name = name.clone();
        async move { client.call(|mut c| { let req = GetModelRequest { name: name.clone(), page: page.clone() }; async move { c.get_model(req).await } }).await }
    };
    let mut m = get(String::new()).await?;
    let Some(x) = x else { return Ok((m, None)) };
    let version = match x.parse::<u64>() {
        Ok(v) => v,
        Err(_) => m.aliases.iter().find(|a| a.alias == x).map(|a| a.version).with_context(|| format!("model {name} has no alias {x}"))?,
    };
    // Versions come newest first, a page at a time: an old one may be a few pages on.
    loop {
        if let Some(v) = m.versions.iter().find(|v| v.version == version).cloned() {
            return Ok((m, Some(v)));
        }
        if m.next_page.is_empty() {
            bail!("model {name} has no version {version}");
        }
        m = get(m.next_page.clone()).await?;
    }
}

pub fn template_json(t: &JobTemplate) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "on_append": t.on_append,
        "firings": t.firings.iter().map(|f| json!({
            "dataset_version": f.dataset_version,
            "job": if f.job_id > 0 { json!(f.job_id) } else { Value::Null },
            "error": if f.error.is_empty() { Value::Null } else { json!(f.error) },
        })).collect::<Vec<_>>(),
    })
}

/// A batch job's counters: (tasks in all phases, done, failed, records out, records read).
pub fn batch_counts(b: &shoal_proto::BatchState) -> (u64, u64, u64, u64, u64) {
    let n = b.tasks.len() as u64;
    let phases = if b.operator == "transform" { 2 } else { 1 };
    let done: Vec<&shoal_proto::BatchTask> = b.tasks.iter().filter(|t| t.state == "done").collect();
    let failed = b.tasks.iter().filter(|t| t.state == "failed").count() as u64;
    let read = done.iter().map(|t| t.end - t.start).sum::<u64>() + b.phase as u64 * b.tasks.iter().map(|t| t.end - t.start).sum::<u64>();
    (n * phases, b.phase as u64 * n + done.len() as u64, failed, done.iter().filter_map(|t| t.result.as_ref()).map(|r| r.records_out).sum(), read)
}

pub fn batch_json(j: &JobInfo) -> Value {
    let nonempty = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    let b = j.batch.clone().unwrap_or_default();
    let (total, done, failed, out, _) = batch_counts(&b);
    let stats = |s: &Option<shoal_proto::SliceStats>| s.as_ref().map(stats_json).unwrap_or(Value::Null);
    json!({
        "id": j.id,
        "name": j.name,
        "kind": "batch",
        "state": j.state().label(),
        "operator": b.operator,
        "dataset": j.dataset_name,
        "dataset_version": j.dataset_version,
        "tasks_total": total,
        "tasks_done": done,
        "tasks_failed": failed,
        "records_out": out,
        "attempts_failed": b.attempts_failed,
        // The leader's clock: first attempt started, last commit; and the records read per
        // second between them.
        "started": if b.started_unix_ms > 0 { json!(utc(b.started_unix_ms)) } else { Value::Null },
        "finished": if b.finished_unix_ms > 0 && j.state() == JobState::Succeeded { json!(utc(b.finished_unix_ms)) } else { Value::Null },
        "seconds": if b.finished_unix_ms > b.started_unix_ms && j.state() == JobState::Succeeded { json!((b.finished_unix_ms - b.started_unix_ms) as f64 / 1000.0) } else { Value::Null },
        "workers": j.workers,
        "output_dataset": nonempty(&b.output_dataset),
        "output_version": if b.output_version > 0 { json!(b.output_version) } else { Value::Null },
        "accuracy": if b.accuracy >= 0.0 { json!(b.accuracy) } else { Value::Null },
        "test_loss": b.test_loss,
        "test_rmse": b.test_rmse,
        "test_r2": b.test_r2,
        "test_bpb": b.test_bpb,
        "model": nonempty(&b.model),
        "transform": b.transform.as_ref().map(transform_json).unwrap_or(Value::Null),
        "stats": stats(&b.stats),
        "error": nonempty(&j.error),
        "tasks": b.tasks.iter().map(|t| (t, t.result.clone().unwrap_or_default())).map(|(t, res)| json!({
            "index": t.index, "records": [t.start, t.end], "state": t.state, "attempts": t.attempts,
            "running": t.running.iter().map(|a| json!({"attempt": a.attempt, "worker": a.worker_id, "speculative": a.speculative})).collect::<Vec<_>>(),
                        "records_out": res.records_out, "elapsed_ms": res.elapsed_ms, "output": res.output.as_ref().map(|o| json!(o.path)).unwrap_or(Value::Null),
            "error": nonempty(&t.error),
        })).collect::<Vec<_>>(),
    })
}

pub fn transform_json(t: &shoal_proto::TransformInfo) -> Value {
    json!({"method": t.method, "shift": t.shift, "scale": t.scale, "fitted_on": t.fitted_on})
}

pub fn job_json(j: &JobInfo) -> Value {
    if shoal_coordinator::state::is_batch(j) {
        let mut v = batch_json(j);
        pipeline_fields(&mut v, j);
        return v;
    }
    let p = j.progress.clone().unwrap_or_default();
    let last = j.checkpoints.last();
    let nonempty = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    // For "hierarchical": {"intra": "shm", "inter": "tcp"}; null for a flat transport.
    let transports = if p.transports.is_empty() { Value::Null } else { json!(p.transports) };
    let mut v = json!({
        "id": j.id,
        "name": j.name,
        "state": j.state().label(),
        "generation": j.generation,
        "step": p.step,
        "total_steps": p.total_steps,
        "epoch": p.epoch,
        "loss": p.loss,
        "test_accuracy": if p.test_accuracy >= 0.0 { json!(p.test_accuracy) } else { Value::Null },
        "samples_per_s": p.samples_per_s,
        "train_seconds": p.train_seconds,
        "workers": j.workers,
        "world_size": j.world_size,
        "dataset": j.dataset_name,
        "dataset_version": j.dataset_version,
        "error": nonempty(&j.error),
        "checkpoint": last.map(|m| json!(m.step)).unwrap_or(Value::Null),
        "resumed_from": p.resumed_from.map(|s| json!(s)).unwrap_or(Value::Null),
        "continued_from": p.continued_from.map(|s| json!(s)).unwrap_or(Value::Null),
        // Per epoch: the training records that went into applied steps, and their digest
        // (shoal_core::rng::RecordDigest, packed).
        "epoch_records": p.epoch_records.iter().zip(&p.epoch_digests).enumerate()
            .map(|(e, (n, d))| json!({"epoch": e, "records": n, "digest": d})).collect::<Vec<_>>(),
        "checkpoints_skipped": p.checkpoints_skipped,
        "transport": nonempty(&p.transport),
        "phase_ms": {
            "data": p.phase_data_ms,
            "forward_backward": p.phase_compute_ms,
            "collective": p.phase_collective_ms,
            "optimizer": p.phase_optimizer_ms,
            "checkpoint": p.phase_checkpoint_ms,
        },
        "checkpoint_error": nonempty(&j.checkpoint_error),
        "restarts": j.restarts,
        "membership": j.membership.iter().map(|m| json!({"generation": m.generation, "step": m.step, "workers": m.workers, "cause": m.cause, "detail": nonempty(&m.detail)})).collect::<Vec<_>>(),
        "restart_cause": nonempty(&j.restart_cause),
        // `[init]`: the checkpoint the parameters started from; with slices = "new", the
        // first record index it had not seen.
        "init": j.init.as_ref().map(|m| json!({"job": m.job_id, "step": m.step, "dir": m.dir})).unwrap_or(Value::Null),
        "new_from": j.new_from.map(|n| json!(n)).unwrap_or(Value::Null),
        "registered_model": nonempty(&j.registered_model),
        "promotion": nonempty(&j.promotion),
        "template": if j.template_id > 0 { json!(j.template_id) } else { Value::Null },
        "trigger_version": if j.template_id > 0 { json!(j.trigger_version) } else { Value::Null },
        "register_error": nonempty(&j.register_error),
        // The job's model: its final checkpoint, once it succeeded.
        "model": match last {
            Some(m) if j.state() == JobState::Succeeded => json!(m.dir),
            _ => Value::Null,
        },
        "results": j.results.iter().map(|r| json!({"rank": r.rank, "worker_id": r.worker_id, "param_blake3": r.param_blake3, "model_path": r.model_path})).collect::<Vec<_>>(),
    });
    v["metrics_dropped"] = json!(j.metrics_dropped);
    v["events"] = j.events.iter().map(|e| json!({"event_id": e.event_id, "event": e.event, "step": e.step, "delivered": e.delivered})).collect();
    v["kind"] = json!("train");
    v["group"] = if j.group.is_empty() { Value::Null } else { json!(j.group) };
    v["tags"] = json!(j.tags);
    // The schedule's rate of the latest step, and its gradient's norm (with clip_norm).
    v["lr"] = if p.lr > 0.0 { json!(p.lr) } else { Value::Null };
    v["grad_norm"] = json!(p.grad_norm);
    // The latest evaluation on the test records: the mean loss, and a regression's RMSE and R².
    v["test_loss"] = json!(p.test_loss);
    v["test_rmse"] = json!(p.test_rmse);
    v["test_r2"] = json!(p.test_r2);
    // A language model's test_loss in bits per byte.
    v["test_bpb"] = json!(p.test_bpb);
    v["transports"] = transports;
    pipeline_fields(&mut v, j);
    v
}

/// The pipeline run and step that submitted the job (null: none).
fn pipeline_fields(v: &mut Value, j: &JobInfo) {
    let nonempty = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    v["pipeline_run"] = nonempty(&j.pipeline_run);
    v["pipeline_step"] = nonempty(&j.pipeline_step);
}

pub fn checkpoint_json(m: &CheckpointManifest) -> Value {
    json!({
        "job": m.job_id,
        "step": m.step,
        "epoch": m.epoch,
        "position": m.position,
        "world_size": m.world_size,
        "generation": m.generation,
        "seed": m.seed,
        "model_kind": m.model_kind,
        "optimizer_kind": m.optimizer_kind,
        "optimizer_step": m.optimizer_step,
        "num_params": m.num_params,
        "test_accuracy": if m.test_accuracy >= 0.0 { json!(m.test_accuracy) } else { Value::Null },
        "test_loss": m.test_loss,
        "test_rmse": m.test_rmse,
        "test_r2": m.test_r2,
        "test_bpb": m.test_bpb,
        "bytes": m.files.iter().map(|f| f.bytes).sum::<u64>(),
        "committed_unix_ms": m.committed_unix_ms,
        "committed": utc(m.committed_unix_ms),
        "dir": m.dir,
        "files": m.files.iter().map(|f| json!({"name": f.name, "bytes": f.bytes, "blake3": f.blake3, "rank": f.rank})).collect::<Vec<_>>(),
    })
}

/// The committed checkpoint at `step`, or the latest; an error that says what exists.
pub fn pick_checkpoint(j: &JobInfo, step: Option<u64>) -> Result<&CheckpointManifest> {
    let Some(last) = j.checkpoints.last() else {
        bail!("job {} has no committed checkpoint (its state: {})", j.id, j.state().label());
    };
    match step {
        None => Ok(last),
        Some(s) => j.checkpoints.iter().find(|m| m.step == s).with_context(|| {
            let have: Vec<String> = j.checkpoints.iter().map(|m| m.step.to_string()).collect();
            format!("job {} has no committed checkpoint at step {s} (committed: {})", j.id, have.join(", "))
        }),
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
/// A JSON value as a person reads it, for the plain (non-JSON) views: strings without quotes,
/// lists comma-separated, whole numbers with thousands separators (48,011), other numbers to
/// a sensible precision (0.9405, 54.48, 2,969), and durations (keys ending in `_s`,
/// `_seconds` or `_ms`, but not rates such as `samples_per_s`) with units (250 ms, 12.3 s, 4 min 05 s, 2 h 03 min).
pub fn human(key: &str, v: &Value) -> String {
    // A rate (`samples_per_s`) is not a duration.
    let rate = key.contains("_per_");
    let seconds = if key.ends_with("_ms") && !rate {
        v.as_f64().map(|ms| ms / 1000.0)
    } else if (key.ends_with("_s") || key.ends_with("_seconds")) && !rate {
        v.as_f64()
    } else {
        None
    };
    if let Some(s) = seconds {
        return duration(s);
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(|i| human("", i)).collect::<Vec<_>>().join(", "),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            // Seeds and ids are copied back into specs: as written.
            _ if key == "seed" || key.ends_with("id") => n.to_string(),
            (Some(u), _, _) => group_digits(&u.to_string()),
            (_, Some(i), _) => format!("-{}", group_digits(&i.unsigned_abs().to_string())),
            (_, _, Some(f)) if !f.is_finite() => f.to_string(),
            (_, _, Some(f)) if f.abs() >= 1000.0 => grouped(f, 0),
            (_, _, Some(f)) if f.abs() >= 10.0 => format!("{f:.2}"),
            (_, _, Some(0.0)) => "0".into(),
            (_, _, Some(f)) if f.abs() < 1e-3 => format!("{f:.3e}"),
            (_, _, Some(f)) => format!("{f:.4}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// `v` rounded to `decimals`, its whole part in groups of three (`1,234,567.8`).
fn grouped(v: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, v.abs());
    let (whole, frac) = text.split_once('.').map_or((text.as_str(), None), |(w, f)| (w, Some(f)));
    let sign = if v < 0.0 && text.chars().any(|c| c.is_ascii_digit() && c != '0') { "-" } else { "" };
    format!("{sign}{}{}", group_digits(whole), frac.map(|f| format!(".{f}")).unwrap_or_default())
}

/// Decimal digits in groups of three: `1234567` -> `1,234,567`.
fn group_digits(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds with units: `250 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return format!("{s} s");
    }
    if s < 1.0 {
        let ms = s * 1000.0;
        return if ms < 10.0 { format!("{ms:.2} ms") } else { format!("{ms:.0} ms") };
    }
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let whole = s.round() as u64;
    if whole < 3600 {
        return format!("{} min {:02} s", whole / 60, whole % 60);
    }
    format!("{} h {:02} min", whole / 3600, whole % 3600 / 60)
}

pub fn utc(ms: u64) -> String {
    let (secs, ms) = (ms / 1000, ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

pub async fn get_job(client: &Client, id: u64) -> Result<JobInfo> {
    Ok(client.call(|mut c| async move { c.get_job(GetJobRequest { id }).await }).await?)
}

pub async fn submit(client: &Client, spec_path: &Path) -> Result<JobInfo> {
    let text = std::fs::read_to_string(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    submit_text(client, &text).await.with_context(|| format!("{}", spec_path.display()))
}

pub async fn submit_text(client: &Client, text: &str) -> Result<JobInfo> {
    // Validate locally first: the same check the coordinator makes, without a round trip.
    if shoal_core::batch::is_batch(text)? {
        shoal_core::batch::BatchSpec::parse(text)?;
    } else {
        shoal_core::JobSpec::parse(text)?;
    }
    let t = text.to_string();
    let request_id = shoal_coordinator::client::new_request_id();
    Ok(client
        .call(|mut c| {
            let req = SubmitJobRequest { spec_toml: t.clone(), request_id: request_id.clone() };
            async move { c.submit_job(req).await }
        })
        .await?)
}

/// One membership change in words: generation, cause, workers, step.
pub fn membership_line(m: &shoal_proto::MembershipChange) -> String {
    let why = if m.detail.is_empty() { String::new() } else { format!(" ({})", m.detail) };
    format!("generation {} [{}] on {} worker(s) {} from step {}{why}", m.generation, m.cause, m.workers.len(), m.workers.join(","), m.step)
}

/// Polls a job until it ends, drawing a progress bar (epoch, step, loss, samples/s).
pub async fn follow(client: &Client, id: u64, show: bool) -> Result<JobInfo> {
    let bar = indicatif::ProgressBar::new(0);
    if !show {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut changes_shown = 0;
    // Batch jobs: records read per second since the first task finished (this client's clock).
    let mut rate_from: Option<(std::time::Instant, u64)> = None;
    loop {
        let j = get_job(client, id).await?;
        if let Some(b) = j.batch.as_ref() {
            let (total, done, failed, out, read) = batch_counts(b);
            let rate = match rate_from {
                Some((t, r0)) if read > r0 => (read - r0) as f64 / t.elapsed().as_secs_f64().max(1e-3),
                _ => 0.0,
            };
            if rate_from.is_none() && read > 0 {
                rate_from = Some((std::time::Instant::now(), read));
            }
            bar.set_prefix(format!("job {} {}", j.id, j.state().label()));
            let failed = if failed + b.attempts_failed > 0 { format!(" ({} attempts failed)", b.attempts_failed) } else { String::new() };
            bar.set_message(format!("tasks {done}/{total} {} {out} records out {rate:.0} records/s{failed}", b.operator));
            bar.set_length(total);
            bar.set_position(done);
            if j.state().is_terminal() {
                bar.finish();
                return Ok(j);
            }
            // Batch jobs can be short: a coarse poll would be most of what a user waits.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for m in j.membership.iter().skip(changes_shown) {
            // The first generation is the start, not a change.
            if m.generation > 1 || m.cause != "start" {
                bar.println(format!("job {}: {}", j.id, membership_line(m)));
            }
        }
        changes_shown = j.membership.len();
        let p = j.progress.clone().unwrap_or_default();
        let epochs = shoal_core::JobSpec::parse(&j.spec_toml).map(|s| s.training.epochs).unwrap_or(0);
        // Text first: moving the position may redraw at once.
        bar.set_prefix(format!("job {} {}", j.id, j.state().label()));
        let acc = match (p.test_accuracy >= 0.0, p.test_r2) {
            (true, _) => format!(" test_acc {:.4}", p.test_accuracy),
            (false, Some(r2)) => format!(" test_r2 {r2:.4} test_rmse {:.3}", p.test_rmse.unwrap_or(f64::NAN)),
            _ => String::new(),
        };
        let resumed = match (p.resumed_from, j.restarts) {
            _ if p.continued_from.is_some() => format!(" (continued from step {})", p.continued_from.unwrap_or_default()),
            (Some(s), _) => format!(" (resumed from step {s})"),
            (None, 0) => String::new(),
            (None, n) => format!(" ({n} restarts)"),
        };
        bar.set_message(format!("epoch {}/{epochs} loss {:.4}{acc} {:.0} samples/s{resumed}", (p.epoch + 1).min(epochs.max(1)), p.loss, p.samples_per_s));
        bar.set_length(p.total_steps);
        bar.set_position(p.step);
        if j.state().is_terminal() {
            bar.finish();
            return Ok(j);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_output_groups_rounds_and_gives_units() {
        use super::human;
        use serde_json::{json, Value};
        let h = |k: &str, v: Value| human(k, &v);
        assert_eq!(h("samples_per_s", json!(48011.134982480806)), "48,011");
        assert_eq!(h("step", json!(1234567u64)), "1,234,567");
        assert_eq!(h("epoch", json!(3)), "3");
        assert_eq!(h("test_accuracy", json!(0.94051)), "0.9405");
        assert_eq!(h("test_rmse", json!(54.48431828)), "54.48");
        assert_eq!(h("test_loss", json!(2968.54)), "2,969");
        assert_eq!(h("loss", json!(-1234.6)), "-1,235");
        assert_eq!(h("lr", json!(0.0000512)), "5.120e-5");
        assert_eq!(h("state", json!("succeeded")), "succeeded");
        assert_eq!(h("workers", json!(["w1", "w2"])), "w1, w2");
        assert_eq!(h("train_seconds", json!(0.25)), "250 ms");
        assert_eq!(h("train_seconds", json!(12.34)), "12.3 s");
        assert_eq!(h("train_seconds", json!(245.0)), "4 min 05 s");
        assert_eq!(h("wall_s", json!(7380.0)), "2 h 03 min");
        assert_eq!(h("elapsed_ms", json!(3.5)), "3.50 ms");
        assert_eq!(h("resumed_from", Value::Null), "null");
        assert_eq!(h("num_params", json!(9007199254740993u64)), "9,007,199,254,740,993");
        assert_eq!(h("seed", json!(9007199254740993u64)), "9007199254740993");
        assert_eq!(h("delta", json!(-1234567i64)), "-1,234,567");
    }

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(super::utc(1_795_984_496_789), "2026-11-29T20:34:56.789Z");
    }
}
