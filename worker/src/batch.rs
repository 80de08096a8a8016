//! One attempt of a batch task: read the task's input records from their shard, run the
//! operator (score, transform, stats, exec), write the output shard under the attempt's own
//! name, and say what to commit. The coordinator decides whether it is committed (the first
//! attempt of a task to report wins); a refused output is removed by the runner.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetensors::tensor::{Dtype, TensorView};
use shoal_core::batch::{apply_transform, BatchSpec};
use shoal_core::dataset::{Records, Targets};
use shoal_core::model::Head;
use shoal_core::idx::IdxData;
use shoal_core::store::Store;
use shoal_core::JobSpec;
use shoal_proto::{Assignment, DatasetInfo, ShardInfo, TaskReport, TaskResult};

use crate::data::ShardedDataset;
use crate::metrics::EvalSums;
use crate::model::Model;
use crate::WorkerError;

/// The last model a worker scored with, kept for the job's next tasks.
#[derive(Clone, Default)]
pub struct ModelCache(Arc<Mutex<Option<(String, Loaded)>>>);

/// A model as its training spec describes it, on the input's records, and its parameters.
type Loaded = Arc<Scorer>;

struct Scorer {
    spec: shoal_core::spec::ModelSpec,
    feature_shape: Vec<usize>,
    head: Head,
    seed: u64,
    params: Vec<f32>,
}

impl Scorer {
    fn model(&self) -> Result<Box<dyn Model>, WorkerError> {
        crate::model::build(&self.spec, &self.feature_shape, self.head, self.seed)
    }
}

impl ModelCache {
    fn get(&self, store: &Store, a: &Assignment, input: &DatasetInfo) -> Result<Loaded, WorkerError> {
        let m = a.init.as_ref().ok_or_else(|| WorkerError::Spec("score: the assignment names no model checkpoint".into()))?;
        let key = format!("{}/{}", m.dir, m.step);
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, loaded)) = slot.as_ref() {
            if *k == key {
                return Ok(loaded.clone());
            }
        }
        let spec = JobSpec::parse(&m.spec_toml).map_err(|e| WorkerError::Spec(format!("the model's training spec: {e}")))?;
        let shape: Vec<usize> = input.feature_shape.iter().map(|&d| d as usize).collect();
        let head = match (a.model_context, a.model_target_width) {
            (c, _) if c > 0 => Head::Tokens { vocab: a.model_classes as u64, context: c as u64 },
            (_, 0) => Head::Classes(a.model_classes as u64),
            (_, w) => Head::Targets(w as u64),
        };
        let model = crate::model::build(&spec.model, &shape, head, spec.training.seed)?;
        let mut params = vec![0f32; model.layout().num_params()];
        crate::checkpoint::warm_start(store, m, model.layout(), &mut params).map_err(|e| WorkerError::Checkpoint(e.to_string()))?;
        let loaded = Arc::new(Scorer { spec: spec.model, feature_shape: shape, head, seed: spec.training.seed, params });
        *slot = Some((key, loaded.clone()));
        Ok(loaded)
    }
}

/// What an attempt produced.
pub struct TaskOutput {
    pub report: TaskReport,
    /// The output object (a store key), to remove if the commit is refused.
    pub file: Option<String>,
}

/// Runs the attempt `a` (its generation is the attempt number).
pub fn run_task(store: &Store, a: &Assignment, cache: &ModelCache, cancel: &AtomicBool) -> Result<TaskOutput, WorkerError> {
    let started = Instant::now();
    let _job = tracing::info_span!("job", job_id = a.job_id, attempt = a.generation).entered();
    let spec = BatchSpec::parse(&a.spec_toml).map_err(|e| WorkerError::Spec(e.to_string()))?;
    let task = a.task.as_ref().ok_or_else(|| WorkerError::Spec("a batch assignment without its task".into()))?;
    let input = a.dataset.as_ref().ok_or_else(|| WorkerError::Spec("a batch assignment without its input dataset".into()))?;
    if spec.operator.kind == "import" {
        return import(store, a, &spec, input, task, started);
    }
    let (sub, first) = shards_holding(input, task.start, task.end)?;
    let ds = ShardedDataset::open(store, &sub)?;
    let (lo, hi) = (task.start - first, task.end - first);
    // Test fault points: every task slow, or one attempt (by number) a straggler.
    if let Some(ms) = shoal_core::failpoint::value("batch_task_delay").or_else(|| shoal_core::failpoint::value_at("batch_slow_attempt", a.generation)) {
        sleep_unless_cancelled(Duration::from_millis(ms), cancel)?;
    }
    let op = spec.operator.kind.as_str();
    let mut result = TaskResult::default();
    let records = match (op, task.phase) {
        ("stats", _) => {
            let raw = ds.raw_records(lo, hi)?;
            // The version's statistics keep the first slice's bins, which every slice uses.
            let ranges = input.stats.as_ref().map(shoal_core::stats::ranges);
            let fits = ranges.as_ref().is_some_and(|r| r.len() == ds.feature_len);
            result.stats = Some(shoal_core::stats::slice_stats(&raw, ranges.as_deref().filter(|_| fits), ds.classes));
            None
        }
        ("transform", 0) => {
            // Fitting: the statistics of the features as a model reads them.
            let (x, y, t) = read_all(&ds, lo, hi, cancel)?;
            let r = Records { features: IdxData::F32(x), feature_shape: ds.feature_shape.clone(), labels: y, targets: t };
            result.stats = Some(shoal_core::stats::slice_stats(&r, None, ds.classes));
            None
        }
        ("transform", _) => {
            let t = a.transform.as_ref().ok_or_else(|| WorkerError::Spec("transform: the assignment holds no fitted transform".into()))?;
            let (mut x, y, targets) = read_all(&ds, lo, hi, cancel)?;
            apply_transform(t, &mut x);
            Some((Records { features: IdxData::F32(x), feature_shape: ds.feature_shape.clone(), labels: y, targets }, None))
        }
        ("score", _) => {
            let loaded = cache.get(store, a, input)?;
            let (records, pred, sums) = score(&loaded, &ds, lo, hi, a, spec.operator.batch_size.unwrap_or(1024) as usize, cancel)?;
            result.correct = sums.correct;
            // Fixed-point sums as f64: the coordinator adds the tasks' in task order.
            (result.loss_sum, result.sse, result.target_sums, result.target_sq_sums) = sums.report();
            if a.output_folder.is_empty() {
                // Metrics only: the records were scored, nothing is written.
                result.records_out = records.len() as u64;
                None
            } else {
                Some((records, pred))
            }
        }
        ("exec", _) => {
            let written = exec(a, &spec, &ds, lo, hi, cancel)?;
            Some((written, None))
        }
        (other, _) => return Err(WorkerError::Spec(format!("unknown operator {other:?}"))),
    };
    let mut file = None;
    if let Some((records, pred)) = records {
        let (shard, path) = write_output(store, a, task.index, &records, pred.as_deref())?;
        result.records_out = records.len() as u64;
        result.feature_shape = records.feature_shape.iter().map(|&d| d as u64).collect();
        result.feature_dtype = records.dtype().into();
        result.classes = records.classes();
        result.target_width = records.target_width() as u32;
        result.stats = Some(shoal_core::stats::slice_stats(&records, None, records.classes() as usize));
        result.output = Some(shard);
        file = Some(path);
    }
    result.elapsed_ms = started.elapsed().as_millis() as u64;
    let report = TaskReport { job_id: a.job_id, attempt: a.generation, task: task.index, ok: true, result: Some(result), ..Default::default() };
    Ok(TaskOutput { report, file })
}

/// An import task: file `task.start` of `operator.files`, read from the store, decoded and
/// written as the task's output shard, with its statistics binned like the dataset's.
fn import(store: &Store, a: &Assignment, spec: &BatchSpec, input: &DatasetInfo, task: &shoal_proto::BatchTask, started: Instant) -> Result<TaskOutput, WorkerError> {
    let files = spec.operator.files.as_deref().unwrap_or_default();
    let file = files.get(task.start as usize).ok_or_else(|| WorkerError::Spec(format!("import: task {} has no file", task.index)))?;
    let bytes = store.get(file).map_err(|e| WorkerError::Io(format!("reading {file}: {e}")))?;
    let (records, stats) = shoal_core::batch::import_file(&spec.operator, file, &bytes, input).map_err(|e| WorkerError::Data(e.to_string()))?;
    let (shard, path) = write_output(store, a, task.index, &records, None)?;
    let result = TaskResult {
        records_out: records.len() as u64,
        feature_shape: records.feature_shape.iter().map(|&d| d as u64).collect(),
        feature_dtype: records.dtype().into(),
        classes: records.classes(),
        target_width: records.target_width() as u32,
        stats: Some(stats),
        output: Some(shard),
        elapsed_ms: started.elapsed().as_millis() as u64,
        ..Default::default()
    };
    let report = TaskReport { job_id: a.job_id, attempt: a.generation, task: task.index, ok: true, result: Some(result), ..Default::default() };
    Ok(TaskOutput { report, file: Some(path) })
}

fn sleep_unless_cancelled(d: Duration, cancel: &AtomicBool) -> Result<(), WorkerError> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// The input's shards that hold records [start, end), as a dataset of their own, and the
/// index of its first record in the input.
fn shards_holding(input: &DatasetInfo, start: u64, end: u64) -> Result<(DatasetInfo, u64), WorkerError> {
    let (mut shards, mut at, mut first) = (Vec::new(), 0u64, None);
    for s in &input.shards {
        if at < end && at + s.records > start {
            first.get_or_insert(at);
            shards.push(s.clone());
        }
        at += s.records;
    }
    let first = first.ok_or_else(|| WorkerError::Data(format!("records [{start}, {end}) are outside {} v{}", input.name, input.version)))?;
    let records = shards.iter().map(|s| s.records).sum();
    Ok((DatasetInfo { shards, records, slices: Vec::new(), ..input.clone() }, first))
}

/// Features (as a model reads them), labels and targets (a regression's) of some records.
type ReadRecords = (Vec<f32>, Vec<i64>, Option<Targets>);

/// `ReadRecords` of records [lo, hi).
fn read_all(ds: &ShardedDataset, lo: u64, hi: u64, cancel: &AtomicBool) -> Result<ReadRecords, WorkerError> {
    let (mut x, mut labels, mut t) = (Vec::with_capacity((hi - lo) as usize * ds.feature_len), Vec::with_capacity((hi - lo) as usize), Vec::new());
    for (n, i) in (lo..hi).enumerate() {
        if n % 4096 == 0 && cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        ds.push_record(i, &mut x, &mut labels)?;
        ds.push_targets(i, &mut t)?;
    }
    let targets = (ds.target_width > 0).then_some(Targets { values: t, width: ds.target_width });
    Ok((x, labels.into_iter().map(i64::from).collect(), targets))
}

/// A classifier's class probabilities (softmax of the logits) and predicted classes (argmax,
/// first on ties, as training's evaluation counts them), or a regression's predictions, of
/// records [lo, hi), in batches of `batch`; and the records' evaluation sums (against their
/// labels, or their targets where the input has them).
fn score(model: &Scorer, ds: &ShardedDataset, lo: u64, hi: u64, a: &Assignment, batch: usize, cancel: &AtomicBool) -> Result<(Records, Option<Vec<i64>>, EvalSums), WorkerError> {
    if let Head::Tokens { .. } = model.head {
        return score_text(model, ds, lo, hi, batch, cancel);
    }
    let (width, params) = (model.head.outputs() as usize, &model.params[..]);
    let regression = matches!(model.head, Head::Targets(_));
    if regression && ds.target_width != 0 && ds.target_width != width {
        return Err(WorkerError::Data(format!("the model predicts {width} targets per record; the input has {}", ds.target_width)));
    }
    let n = (hi - lo) as usize;
    let mut net = model.model()?;
    let (mut probs, mut pred, mut labels) = (Vec::with_capacity(n * width), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut x, mut y, mut t, mut all_t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sums = EvalSums::new(model.head);
    let mut i = lo;
    while i < hi {
        if cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        let j = (i + batch.max(1) as u64).min(hi);
        x.clear();
        y.clear();
        t.clear();
        for r in i..j {
            ds.push_record(r, &mut x, &mut y)?;
            ds.push_targets(r, &mut t)?;
        }
        if let Some(t) = &a.transform {
            apply_transform(t, &mut x);
        }
        let micro = net.eval_chunk().unwrap_or(y.len()).max(1);
        for (c, (xs, ys)) in x.chunks(micro * ds.feature_len.max(1)).zip(y.chunks(micro)).enumerate() {
            let out = net.outputs(params, xs, ys.len())?;
            if regression {
                probs.extend_from_slice(out);
                labels.extend(ys.iter().map(|&l| i64::from(l)));
                if ds.target_width == width {
                    let ts = &t[c * micro * width..(c * micro + ys.len()) * width];
                    sums.add(model.head, out, ys, ts)?;
                }
                continue;
            }
            sums.add(model.head, out, ys, &[])?;
            for (row, &label) in out.chunks_exact(width).zip(ys) {
                let best = (0..width).fold(0, |b, k| if row[k] > row[b] { k } else { b });
                let top = row[best];
                let start = probs.len();
                probs.extend(row.iter().map(|&l| (l - top).exp()));
                let sum: f32 = probs[start..].iter().sum();
                probs[start..].iter_mut().for_each(|p| *p /= sum);
                pred.push(best as i64);
                labels.push(i64::from(label));
            }
        }
        all_t.extend_from_slice(&t);
        i = j;
    }
    if regression {
        // The predictions are the output's features; the input's targets stay its targets.
        let targets = (ds.target_width > 0).then_some(Targets { values: all_t, width: ds.target_width });
        return Ok((Records { features: IdxData::F32(probs), feature_shape: vec![width], labels, targets }, None, sums));
    }
    Ok((Records::classified(IdxData::F32(probs), vec![width], labels), Some(pred), sums))
}

/// A language model's scores of text windows [lo, hi): each record's mean loss per token (in
/// nats) as its one output feature, and the records' evaluation sums.
fn score_text(model: &Scorer, ds: &ShardedDataset, lo: u64, hi: u64, batch: usize, cancel: &AtomicBool) -> Result<(Records, Option<Vec<i64>>, EvalSums), WorkerError> {
    let (vocab, t) = (model.head.outputs() as usize, model.head.positions() as usize);
    let mut net = model.model()?;
    let mut losses = Vec::with_capacity((hi - lo) as usize);
    let mut sums = EvalSums::new(model.head);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let micro = net.eval_chunk().unwrap_or(batch).clamp(1, batch.max(1)) as u64;
    let mut i = lo;
    while i < hi {
        if cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        let j = (i + micro).min(hi);
        x.clear();
        y.clear();
        for r in i..j {
            ds.push_record(r, &mut x, &mut y)?;
        }
        let out = net.outputs(&model.params, &x, (j - i) as usize)?;
        for (row, labels) in out.chunks_exact(t * vocab).zip(y.chunks_exact(t)) {
            let mut one = EvalSums::new(model.head);
            one.add(model.head, row, labels, &[])?;
            losses.push(one.metrics(model.head).loss.unwrap_or(f64::NAN) as f32);
            sums.merge(&one);
        }
        i = j;
    }
    let n = losses.len();
    Ok((Records::classified(IdxData::F32(losses), vec![1], vec![0; n]), None, sums))
}

/// The output shard's key for this attempt: `task-NNNNN-aA.safetensors` in the job's folder.
fn output_key(a: &Assignment, task: u32) -> String {
    format!("{}/task-{task:05}-a{}.safetensors", a.output_folder, a.generation)
}

/// Writes the output shard (tensors `x`, `y` (labels, or f32 targets) and, for a classifier's
/// scores, `pred`), atomically.
fn write_output(store: &Store, a: &Assignment, task: u32, r: &Records, pred: Option<&[i64]>) -> Result<(ShardInfo, String), WorkerError> {
    if a.output_folder.is_empty() {
        return Err(WorkerError::Spec("the job has no output folder".into()));
    }
    let rel = output_key(a, task);
    let n = r.len();
    let x_bytes: Vec<u8> = match &r.features {
        IdxData::U8(v) => v.clone(),
        IdxData::F32(v) => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
    };
    let dtype = if r.dtype() == "u8" { Dtype::U8 } else { Dtype::F32 };
    let (y_bytes, y_dtype, y_shape): (Vec<u8>, Dtype, Vec<usize>) = match &r.targets {
        Some(t) => (t.values.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32, vec![n, t.width]),
        None => (r.labels.iter().flat_map(|l| l.to_le_bytes()).collect(), Dtype::I64, vec![n]),
    };
    let p_bytes: Vec<u8> = pred.unwrap_or_default().iter().flat_map(|l| l.to_le_bytes()).collect();
    let mut shape = vec![n];
    shape.extend_from_slice(&r.feature_shape);
    let bad = |e: safetensors::SafeTensorError| WorkerError::Data(e.to_string());
    let mut tensors = vec![("x", TensorView::new(dtype, shape, &x_bytes).map_err(bad)?), ("y", TensorView::new(y_dtype, y_shape, &y_bytes).map_err(bad)?)];
    if pred.is_some() {
        tensors.push(("pred", TensorView::new(Dtype::I64, vec![n], &p_bytes).map_err(bad)?));
    }
    let bytes = safetensors::serialize(tensors, None).map_err(bad)?;
    store.put(&rel, &[&bytes]).map_err(|e| WorkerError::Io(e.to_string()))?;
    let shard = ShardInfo { path: rel.clone(), records: n as u64, blake3: blake3::hash(&bytes).to_hex().to_string(), bytes: bytes.len() as u64 };
    Ok((shard, rel))
}

/// Removes every file in a finished batch job's output folder (relative to the store) but the
/// committed shards `keep`, and the folder itself when nothing is kept. Best effort.
pub fn tidy_output(store: &Store, folder: &str, keep: &[String]) {
    if shoal_core::store::check_key(folder).is_err() || !folder.starts_with("datasets/") {
        return;
    }
    let Ok(entries) = store.list(folder) else { return };
    for e in entries {
        if !keep.contains(&e.key) {
            let _ = store.delete(&e.key);
        }
    }
    if let (true, Ok(Some(path))) = (keep.is_empty(), store.local_path(folder)) {
        let _ = std::fs::remove_dir(path);
    }
}

/// Removes an attempt's output that was not committed, and its folder if that leaves it empty
/// (a failed job's tidying may have run before this attempt wrote: nothing of it stays).
pub fn drop_output(store: &Store, file: &str) {
    let _ = store.delete(file);
    if let Some((folder, _)) = file.rsplit_once('/') {
        if let Ok(Some(path)) = store.local_path(folder) {
            // Fails, harmlessly, while another attempt's output is there.
            let _ = std::fs::remove_dir(path);
        }
    }
}

/// Most stderr kept from a user command (its tail is what a failure reports).
const STDERR_TAIL: usize = 2048;

/// Runs the user's command on records [lo, hi): `{input}` is a safetensors shard of them (a
/// copy in a scratch folder, so a command cannot touch the store's shards), `{output}` the
/// shard it must write. Returns the records it wrote.
fn exec(a: &Assignment, spec: &BatchSpec, ds: &ShardedDataset, lo: u64, hi: u64, cancel: &AtomicBool) -> Result<Records, WorkerError> {
    let scratch = std::env::temp_dir().join(format!("shoal-exec-{}-{}-{}", std::process::id(), a.job_id, a.generation));
    std::fs::create_dir_all(&scratch).map_err(|e| WorkerError::Io(format!("{}: {e}", scratch.display())))?;
    let result = (|| {
        let raw = ds.raw_records(lo, hi)?;
        let input = scratch.join("input.safetensors");
        let info = shoal_core::dataset::write_shards(&scratch, "input", Path::new("part"), &raw, raw.len().max(1)).map_err(|e| WorkerError::Io(e.to_string()))?;
        std::fs::rename(scratch.join(&info.shards[0].path), &input).map_err(|e| WorkerError::Io(e.to_string()))?;
        let output = scratch.join("output.safetensors");
        let fill = |arg: &String| arg.replace("{input}", &input.display().to_string()).replace("{output}", &output.display().to_string());
        let args: Vec<String> = spec.operator.command.as_deref().unwrap_or_default().iter().map(fill).collect();
        run_command(&args, a, spec.timeout(), cancel)?;
        let bytes = std::fs::read(&output).map_err(|e| WorkerError::Data(format!("the command exited 0 but wrote no output shard ({}): {e}", output.display())))?;
        shoal_core::dataset::records_from_safetensors("the command's output shard", &bytes).map_err(|e| WorkerError::Data(e.to_string()))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_command(args: &[String], a: &Assignment, timeout: Duration, cancel: &AtomicBool) -> Result<(), WorkerError> {
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(&args[0])
        .args(&args[1..])
        .env("SHOAL_JOB", a.job_id.to_string())
        .env("SHOAL_TASK", a.task.as_ref().map(|t| t.index).unwrap_or_default().to_string())
        .env("SHOAL_ATTEMPT", a.generation.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so a timeout kills whatever it started too.
        .process_group(0)
        .spawn()
        .map_err(|e| WorkerError::Io(format!("starting {:?}: {e}", args[0])))?;
    let mut stderr = child.stderr.take().expect("piped");
    let (tail_tx, tail_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * STDERR_TAIL {
                kept.drain(..kept.len() - STDERR_TAIL);
            }
        }
        let from = kept.len().saturating_sub(STDERR_TAIL);
        let _ = tail_tx.send(String::from_utf8_lossy(&kept[from..]).trim().to_string());
    });
    // The stderr tail, once the pipe closes; not waited for long (a process that left the
    // group could hold it open).
    let tail = move || tail_rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    let started = Instant::now();
    let group = child.id() as i32;
    // SAFETY: kill(2) on the child's own process group (its pid, > 0, negated): whatever the
    // command started goes too, so nothing outlives the attempt or holds its stderr open.
    let kill_group = || unsafe { libc::kill(-group, libc::SIGKILL) };
    let kill = |child: &mut std::process::Child| {
        kill_group();
        let _ = child.wait();
    };
    let status = loop {
        match child.try_wait().map_err(|e| WorkerError::Io(e.to_string()))? {
            Some(status) => break status,
            None if cancel.load(Ordering::Relaxed) => {
                kill(&mut child);
                return Err(WorkerError::Cancelled);
            }
            None if started.elapsed() >= timeout => {
                kill(&mut child);
                let tail = tail();
                return Err(WorkerError::Task(format!("command {:?} timed out after {:.1} s and was killed; stderr: {tail}", args[0], timeout.as_secs_f64())));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    kill_group();
    let tail = tail();
    if !status.success() {
        let code = status.code().map(|c| format!("exit code {c}")).unwrap_or_else(|| format!("{status}"));
        return Err(WorkerError::Task(format!("command {:?} failed with {code}; stderr: {tail}", args[0])));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_output_goes_with_its_folder_once_that_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path());
        let (a, b) = ("datasets/out/batch-7/part-00000", "datasets/out/batch-7/part-00001");
        store.put(a, &[b"one"]).unwrap();
        store.put(b, &[b"two"]).unwrap();
        drop_output(&store, a);
        assert!(!dir.path().join(a).exists());
        assert!(dir.path().join(b).exists(), "another attempt's output stays, and so its folder");
        drop_output(&store, b);
        assert!(!dir.path().join("datasets/out/batch-7").exists(), "the emptied folder goes");
        // Already gone: nothing to do, no panic.
        drop_output(&store, b);
    }
}
