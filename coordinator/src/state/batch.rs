//! Batch jobs in the state machine. A batch job is a list of tasks (one per input shard);
//! each task runs as attempts, one worker each, numbered job-wide (an attempt number is its
//! assignment's generation). An attempt's output is committed by `TaskReported`: the first
//! commit of a task wins and any other attempt of it is refused, so a retried, duplicated or
//! speculative attempt never adds records twice. When every task is done, the same apply
//! registers the output dataset version from the committed shards, in task order.

use shoal_core::batch::{fit_transform, plan_tasks, BatchSpec};
use shoal_proto::{BatchState, BatchTask, SliceStats, TaskAttempt, TaskReport, TaskResult, TaskStarted, TaskStopped};

use super::*;

pub const PENDING: &str = "pending";
pub const RUNNING: &str = "running";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";

/// Shortest running time before a speculative copy, whatever the median.
const MIN_SPECULATION_MS: f64 = 100.0;

pub fn is_batch(job: &JobInfo) -> bool {
    job.kind == "batch"
}

/// A task's committed result (empty until it has one).
fn result(t: &BatchTask) -> &TaskResult {
    static NONE: TaskResult = TaskResult { output: None, records_out: 0, correct: 0, elapsed_ms: 0, stats: None, feature_shape: Vec::new(), feature_dtype: String::new(), classes: 0, loss_sum: None, sse: None, target_sums: Vec::new(), target_sq_sums: Vec::new(), target_width: 0 };
    t.result.as_ref().unwrap_or(&NONE)
}

impl StateMachine {
    /// Checks a batch spec against the state: the job it would be (id 0, not queued yet).
    pub fn check_batch(&self, toml: &str) -> Result<JobInfo, ApplyError> {
        let spec = BatchSpec::parse(toml).map_err(ApplyError::invalid)?;
        let input = self.dataset_view(&spec.input.dataset, spec.input.version.unwrap_or(0), DatasetView::Shards).ok_or_else(|| match spec.input.version {
            Some(v) if self.datasets.contains_key(&spec.input.dataset) => ApplyError::invalid(format!("input.version: dataset {:?} has no version {v}", spec.input.dataset)),
            _ => ApplyError::invalid(format!("input.dataset: dataset {:?} does not exist", spec.input.dataset)),
        })?;
        let range = spec.input.records.unwrap_or([0, input.records]);
        if range[1] > input.records {
            return Err(format!("input.records: range [{}, {}) exceeds the {} records of {} v{}", range[0], range[1], input.records, input.name, input.version).into());
        }
        let feature_len: u64 = input.feature_shape.iter().product();
        let op = spec.operator.kind.as_str();
        let (mut init, mut model, mut transform, mut out_shape, mut model_classes, mut model_target_width) = (None, String::new(), None, input.feature_shape.clone(), 0, 0);
        let mut model_context = 0;
        if op == "score" {
            let reference = spec.operator.model.clone().unwrap_or_default();
            let (job_id, step, label) = match reference.strip_prefix("job:") {
                Some(id) => (id.parse::<u64>().map_err(|_| format!("operator.model: {reference:?} is not job:N, NAME@VERSION or NAME@ALIAS"))?, None, reference.clone()),
                None => {
                    let (m, v) = self.model_version(&reference).map_err(|e| format!("operator.model: {e}"))?;
                    (v.job_id, v.checkpoint.as_ref().map(|c| c.step), format!("{}@{}", m.name, v.version))
                }
            };
            let from = self.jobs.get(&job_id).ok_or_else(|| ApplyError::invalid(format!("operator.model: there is no job {job_id}")))?;
            if from.state() != JobState::Succeeded || is_batch(from) {
                return Err(format!("operator.model: job {job_id} is a {} job that {}: scoring needs a training job that succeeded", if is_batch(from) { "batch" } else { "training" }, from.state().label()).into());
            }
            let m = match step {
                None => from.checkpoints.last(),
                Some(s) => from.checkpoints.iter().find(|c| c.step == s),
            };
            let m = m.ok_or_else(|| format!("operator.model: job {job_id} keeps no checkpoint at step {}", step.unwrap_or_default()))?;
            let trained = self.dataset(&from.dataset_name, from.dataset_version).ok_or_else(|| format!("operator.model: the dataset job {job_id} trained on is gone"))?;
            if trained.context != input.context {
                let what = |c: u32| if c > 0 { format!("text windows of context {c}") } else { "records of features".to_string() };
                return Err(format!("operator.model: {label} reads {}; {} v{} holds {}", what(trained.context), input.name, input.version, what(input.context)).into());
            }
            if trained.feature_shape != input.feature_shape || input.classes > trained.classes || input.target_width != trained.target_width {
                let what = |classes: u32, width: u32| if width > 0 { format!("{width} target(s) per record") } else { format!("{classes} classes") };
                return Err(format!(
                    "operator.model: {label} reads features {:?} with {}; {} v{} has {:?} with {}",
                    trained.feature_shape,
                    what(trained.classes, trained.target_width),
                    input.name,
                    input.version,
                    input.feature_shape,
                    what(input.classes, input.target_width)
                )
                .into());
            }
            // A language model's output per record is its mean loss per token.
            let outputs = if trained.context > 0 { 1 } else if trained.target_width > 0 { trained.target_width } else { trained.classes };
            (init, model, out_shape, model_classes, model_target_width) = (Some(m.clone()), label, vec![outputs as u64], trained.classes, trained.target_width);
            model_context = trained.context;
            if let Some(r) = &spec.operator.transform {
                let (name, version) = match r.split_once('@') {
                    Some((n, v)) => (n, v.parse::<u64>().map_err(|_| format!("operator.transform: {r:?} is not DATASET or DATASET@VERSION"))?),
                    None => (r.as_str(), 0),
                };
                let d = self.dataset(name, version).ok_or_else(|| ApplyError::invalid(format!("operator.transform: there is no dataset {r}")))?;
                let t = d.transform.clone().ok_or_else(|| format!("operator.transform: {} v{} was not made by a transform job: it holds no fitted transform", d.name, d.version))?;
                if t.shift.len() as u64 != feature_len {
                    return Err(format!("operator.transform: {} v{} was fitted on {} features; the input has {feature_len}", d.name, d.version, t.shift.len()).into());
                }
                transform = Some(t);
            }
        }
        // An output that exists must take the new records (checked again when they are added).
        if let (Some(out), "score" | "transform") = (self.dataset(spec.output.as_ref().map(|o| o.dataset.as_str()).unwrap_or_default(), 0), op) {
            if out.feature_shape != out_shape || (!out.feature_dtype.is_empty() && out.feature_dtype != "f32") || input.classes > out.classes || out.target_width != input.target_width {
                return Err(format!(
                    "output.dataset: {} holds {} features {:?} with {} classes and {} targets per record; this job writes f32 features {out_shape:?} with {} classes and {} targets",
                    out.name,
                    out.feature_dtype,
                    out.feature_shape,
                    out.classes,
                    out.target_width,
                    input.classes,
                    input.target_width
                ).into());
            }
        }
        // An import: a task per file (its index in `operator.files` as the task's range).
        let planned = match op {
            "import" => (0..spec.operator.files.as_ref().map_or(0, Vec::len) as u64).map(|i| (i, i + 1)).collect(),
            _ => plan_tasks(&input.shards, range),
        };
        let tasks = planned
            .into_iter()
            .enumerate()
            .map(|(i, (start, end))| BatchTask { index: i as u32, start, end, state: PENDING.into(), ..Default::default() })
            .collect();
        Ok(JobInfo {
            name: spec.name.clone(),
            spec_toml: toml.to_string(),
            state: JobState::Queued as i32,
            kind: "batch".into(),
            dataset_name: input.name.clone(),
            dataset_version: input.version,
            init,
            batch: Some(BatchState {
                operator: op.into(),
                tasks,
                max_attempts: spec.cluster.max_attempts,
                output_dataset: spec.output.as_ref().map(|o| o.dataset.clone()).unwrap_or_default(),
                accuracy: -1.0,
                transform,
                model,
                workers: spec.cluster.workers,
                speculation: spec.cluster.speculation,
                model_classes,
                model_target_width,
                model_context,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Queues a batch job.
    pub(super) fn submit_batch(&mut self, toml: &str) -> Result<JobInfo, ApplyError> {
        let mut job = self.check_batch(toml)?;
        self.next_job += 1;
        job.id = self.next_job;
        let b = job.batch.as_mut().expect("built above");
        if !b.output_dataset.is_empty() {
            b.output_folder = format!("datasets/{}/batch-{}", b.output_dataset, job.id);
        }
        self.jobs.insert(job.id, job.clone());
        Ok(job)
    }

    /// Whether a queued training job could start if the batch tasks gave their workers back:
    /// then no new batch attempt starts, so batch work never keeps a training job waiting.
    fn training_waits(&self) -> bool {
        self.training_waits_on(|_| true)
    }

    /// `training_waits`, counting only the workers `eligible` says yes to (the leader's: those
    /// heard from lately, as the training placement counts them).
    fn training_waits_on(&self, eligible: impl Fn(&str) -> bool) -> bool {
        let usable = self
            .workers
            .values()
            .filter(|w| eligible(&w.id) && (w.state() == WorkerState::Idle || (w.state() == WorkerState::Busy && self.jobs.get(&w.job_id).is_some_and(is_batch))))
            .count();
        self.jobs.values().any(|j| j.state() == JobState::Queued && !is_batch(j) && pool_range(j).0 as usize <= usable)
    }

    /// Whether a batch job has a task waiting and room for it: then a running training job
    /// does not take free workers to grow (it would keep the batch job from starting).
    pub(super) fn batch_wants_workers(&self) -> bool {
        self.jobs.values().filter(|j| is_batch(j) && matches!(j.state(), JobState::Queued | JobState::Running)).any(|j| {
            let b = j.batch.as_ref().expect("a batch job");
            b.tasks.iter().any(|t| t.state == PENDING) && running_attempts(b) < b.workers as usize
        })
    }

    /// Starts an attempt of task `task` of batch job `id` on `worker` (checked by the caller
    /// to be idle); returns its number.
    fn start_attempt(&mut self, id: u64, task: usize, worker: &str, now_ms: u64, speculative: bool) -> u64 {
        let job = self.jobs.get_mut(&id).expect("checked by the caller");
        let b = job.batch.as_mut().expect("a batch job");
        b.next_attempt += 1;
        let attempt = b.next_attempt;
        if b.started_unix_ms == 0 {
            b.started_unix_ms = now_ms;
        }
        let t = &mut b.tasks[task];
        if !speculative {
            t.attempts += 1;
        }
        t.state = RUNNING.into();
        t.running.push(TaskAttempt { attempt, worker_id: worker.to_string(), started_unix_ms: now_ms, speculative });
        job.state = JobState::Running as i32;
        sync_workers(job);
        if let Some(w) = self.workers.get_mut(worker) {
            w.state = WorkerState::Busy as i32;
            w.job_id = id;
        }
        attempt
    }

    pub(super) fn task_stopped(&mut self, t: TaskStopped) -> ApplyResult {
        let job = self.jobs.get_mut(&t.job_id).filter(|j| is_batch(j) && j.state() == JobState::Running).ok_or_else(|| format!("job {} is not a running batch job", t.job_id))?;
        let b = job.batch.as_mut().expect("a batch job");
        let task = b.tasks.get_mut(t.task as usize).ok_or_else(|| format!("job {} has no task {}", t.job_id, t.task))?;
        let at = task.running.iter().position(|a| a.attempt == t.attempt && a.worker_id == t.worker_id).ok_or_else(|| format!("attempt {} of task {} is not running", t.attempt, t.task))?;
        let stopped = task.running.remove(at);
        if !stopped.speculative {
            // Not the task's failure: the attempt does not count.
            task.attempts = task.attempts.saturating_sub(1);
        }
        if task.running.is_empty() && task.state == RUNNING {
            task.state = PENDING.into();
        }
        sync_workers(job);
        self.release_workers(t.job_id, &[stopped.worker_id]);
        Ok(ApplyOutput::None)
    }

    /// Batch attempts to stop so that the oldest queued training job that the idle workers
    /// cannot hold, but the idle workers plus those batch attempts hold can, starts: the most
    /// recently started attempts first (they lose the least work). The leader proposes them
    /// once the training job has waited a while.
    pub fn batch_preemptions(&self, eligible: impl Fn(&str) -> bool) -> Option<(u64, Vec<TaskStopped>)> {
        let idle = self.workers.values().filter(|w| w.state() == WorkerState::Idle && eligible(&w.id)).count();
        let mut held: Vec<(u64, TaskStopped)> = Vec::new();
        for j in self.jobs.values().filter(|j| is_batch(j) && j.state() == JobState::Running) {
            for t in j.batch.iter().flat_map(|b| &b.tasks) {
                for a in t.running.iter().filter(|a| eligible(&a.worker_id)) {
                    held.push((a.attempt, TaskStopped { job_id: j.id, task: t.index, attempt: a.attempt, worker_id: a.worker_id.clone() }));
                }
            }
        }
        let job = self.jobs.values().find(|j| j.state() == JobState::Queued && !is_batch(j) && (pool_range(j).0 as usize) <= idle + held.len())?;
        let need = (pool_range(job).0 as usize).checked_sub(idle).filter(|&n| n > 0)?;
        held.sort_by_key(|(attempt, _)| std::cmp::Reverse(*attempt));
        Some((job.id, held.into_iter().take(need).map(|(_, t)| t).collect()))
    }

    pub(super) fn task_started(&mut self, t: TaskStarted) -> ApplyResult {
        if !matches!(self.workers.get(&t.worker_id), Some(w) if w.state() == WorkerState::Idle) {
            return Err(format!("worker {} is not idle", t.worker_id).into());
        }
        let job = self.jobs.get(&t.job_id).ok_or_else(|| ApplyError::not_found(format!("unknown job {}", t.job_id)))?;
        if !is_batch(job) || !matches!(job.state(), JobState::Queued | JobState::Running) {
            return Err(format!("job {} is not a batch job in progress", t.job_id).into());
        }
        let b = job.batch.as_ref().expect("a batch job");
        let task = b.tasks.get(t.task as usize).ok_or_else(|| format!("job {} has no task {}", t.job_id, t.task))?;
        if t.speculative {
            if task.state != RUNNING || task.running.len() != 1 || task.running[0].speculative {
                return Err(format!("task {} of job {} needs no speculative copy", t.task, t.job_id).into());
            }
        } else if task.state != PENDING {
            return Err(format!("task {} of job {} is {}, not pending", t.task, t.job_id, task.state).into());
        }
        if running_attempts(b) >= b.workers as usize {
            return Err(format!("job {} runs {} attempts at once already", t.job_id, b.workers).into());
        }
        self.start_attempt(t.job_id, t.task as usize, &t.worker_id, t.started_unix_ms, t.speculative);
        Ok(ApplyOutput::None)
    }

    pub(super) fn task_reported(&mut self, index: u64, r: TaskReport) -> ApplyResult {
        let id = r.job_id;
        let job = self.jobs.get_mut(&id).ok_or_else(|| ApplyError::not_found(format!("unknown job {id}")))?;
        if !is_batch(job) {
            return Err(format!("job {id} is not a batch job").into());
        }
        // A retry of the report that committed (its reply was lost): the same outcome. It
        // must not read as a refusal, which would make the worker remove a committed shard.
        let committed = job.batch.as_ref().and_then(|b| b.tasks.get(r.task as usize)).is_some_and(|t| t.state == DONE && t.committed_attempt == r.attempt && t.committed_attempt > 0);
        if committed && r.ok {
            return Ok(ApplyOutput::None);
        }
        if job.state() != JobState::Running {
            return Err(format!("job {id} is {}: its tasks commit nothing more", job.state().label()).into());
        }
        let b = job.batch.as_mut().expect("a batch job");
        let writes = match b.operator.as_str() {
            "stats" => false,
            "transform" => b.phase == 1,
            "score" => !b.output_folder.is_empty(),
            _ => true,
        };
        let folder = b.output_folder.clone();
        let (max_attempts, op, context) = (b.max_attempts, b.operator.clone(), b.model_context);
        let task = b.tasks.get_mut(r.task as usize).ok_or_else(|| format!("job {id} has no task {}", r.task))?;
        let Some(at) = task.running.iter().position(|a| a.attempt == r.attempt && a.worker_id == r.worker_id) else {
            return Err(if task.state == DONE {
                format!("task {} of job {id} is committed already; attempt {} is not needed", r.task, r.attempt)
            } else {
                format!("attempt {} of task {} of job {id} is not running", r.attempt, r.task)
            }.into());
        };
        // Every check before any change: a refused report changes nothing (its worker then
        // reports the attempt failed, naming the refusal).
        if r.ok {
            check_report(&r, task, &folder, &op, writes, context).map_err(|e| format!("task {} of job {id}: {e}", r.task))?;
        }
        let mut freed = vec![task.running.remove(at).worker_id];
        let mut failure = None;
        if r.ok {
            task.state = DONE.into();
            task.committed_attempt = r.attempt;
            task.result = r.result.map(|res| TaskResult { output: res.output.filter(|_| writes), ..res });
            task.error.clear();
            // Any other attempt of the task (a speculative copy) is not needed any more.
            freed.extend(task.running.drain(..).map(|a| a.worker_id));
        } else {
            b.attempts_failed += 1;
            task.error = r.error.clone();
            if !task.failed_on.contains(&r.worker_id) {
                task.failed_on.push(r.worker_id.clone());
            }
            if task.running.is_empty() {
                if task.attempts >= max_attempts {
                    task.state = FAILED.into();
                    failure = Some(format!("task {} ({}) failed {} times; the last: {}", task.index, task_span(&op, task), task.attempts, r.error));
                } else {
                    task.state = PENDING.into();
                }
            }
        }
        sync_workers(job);
        self.release_workers(id, &freed);
        if let Some(msg) = failure {
            self.finish_job(id, JobState::Failed, format!("{op}: {msg}"));
            return Ok(ApplyOutput::None);
        }
        let b = self.jobs[&id].batch.as_ref().expect("a batch job");
        if b.tasks.iter().all(|t| t.state == DONE) {
            self.finish_phase(index, id, r.reported_unix_ms);
        } else if r.ok && !self.training_waits() && running_attempts(b) < b.workers as usize {
            // The worker that just finished takes the next task in this same apply: no wait
            // for the scheduler's tick.
            if let Some(next) = b.tasks.iter().position(|t| t.state == PENDING) {
                if self.workers.get(&r.worker_id).is_some_and(|w| w.state() == WorkerState::Idle) {
                    self.start_attempt(id, next, &r.worker_id, r.reported_unix_ms, false);
                }
            }
        }
        Ok(ApplyOutput::None)
    }

    /// Every task of the current phase is done: fit and start applying (transform), or
    /// finish the job, registering its output dataset.
    fn finish_phase(&mut self, index: u64, id: u64, now_ms: u64) {
        let input = {
            let j = &self.jobs[&id];
            self.dataset(&j.dataset_name, j.dataset_version).unwrap_or_default()
        };
        let job = self.jobs.get_mut(&id).expect("a job");
        let b = job.batch.as_mut().expect("a batch job");
        b.finished_unix_ms = now_ms;
        let stats = merge_stats(b.tasks.iter().filter_map(|t| result(t).stats.as_ref()));
        let range = (b.tasks.first().map(|t| t.start).unwrap_or(0), b.tasks.last().map(|t| t.end).unwrap_or(0));
        let described = format!("{}@{} [{}, {})", input.name, input.version, range.0, range.1);
        match (b.operator.as_str(), b.phase) {
            ("transform", 0) => {
                let method = job.plan.as_ref().map(|p| p.batch_method.clone()).filter(|m| !m.is_empty()).unwrap_or_else(|| "standardize".into());
                b.transform = Some(fit_transform(&method, &stats, described));
                b.stats = Some(stats);
                b.phase = 1;
                for t in &mut b.tasks {
                    *t = BatchTask { index: t.index, start: t.start, end: t.end, state: PENDING.into(), phase: 1, ..Default::default() };
                }
                return;
            }
            ("stats", _) => {
                b.stats = Some(stats);
                self.finish_job(id, JobState::Succeeded, String::new());
                return;
            }
            _ => {}
        }
        let Some(records) = b.tasks.iter().try_fold(0u64, |a, t| a.checked_add(result(t).records_out)) else {
            self.finish_job(id, JobState::Failed, "the tasks report more records than a dataset holds".into());
            return;
        };
        if b.operator == "score" && records > 0 {
            // Task results added in task order: every replica gets the same bits. A metric is
            // reported only when every task measured it (a diverged model's is not finite).
            let sum = |f: fn(&TaskResult) -> Option<f64>| b.tasks.iter().map(|t| f(result(t))).try_fold(0.0f64, |a, v| v.map(|v| a + v));
            let n = records as f64;
            if b.model_context > 0 {
                // Per token: every record holds `context` predictions.
                let tokens = n * b.model_context as f64;
                b.accuracy = b.tasks.iter().map(|t| result(t).correct).sum::<u64>() as f64 / tokens;
                b.test_loss = sum(|r| r.loss_sum).map(|l| l / tokens);
                b.test_bpb = b.test_loss.map(|l| l / std::f64::consts::LN_2);
            } else if b.model_target_width == 0 {
                b.accuracy = b.tasks.iter().map(|t| result(t).correct).sum::<u64>() as f64 / n;
                b.test_loss = sum(|r| r.loss_sum).map(|l| l / n);
            } else {
                let w = b.model_target_width as usize;
                let values = n * w as f64;
                // Per target column: the sums of the targets and of their squares.
                let column = |j: usize, squares: bool| b.tasks.iter().map(|t| if squares { result(t).target_sq_sums.get(j).copied() } else { result(t).target_sums.get(j).copied() }).try_fold(0.0f64, |a, v| v.map(|v| a + v));
                let total = (0..w).map(|j| Some(column(j, true)? - column(j, false)?.powi(2) / n)).sum::<Option<f64>>();
                if let Some(sse) = sum(|r| r.sse) {
                    b.test_loss = Some(sse / values);
                    b.test_rmse = Some((sse / values).sqrt());
                    b.test_r2 = total.and_then(|t| (t > 0.0).then(|| 1.0 - sse / t)).filter(|r| r.is_finite());
                }
            }
        }
        if b.operator == "score" && b.output_dataset.is_empty() {
            // Metrics only (no [output]): nothing to register.
            self.finish_job(id, JobState::Succeeded, String::new());
            return;
        }
        let wrote: Vec<(u32, &TaskResult)> = b.tasks.iter().map(|t| (t.index, result(t))).filter(|(_, r)| r.records_out > 0).collect();
        let (shape, dtype, width) = wrote.first().map(|(_, r)| (r.feature_shape.clone(), r.feature_dtype.clone(), r.target_width)).unwrap_or_default();
        if let Some((index, odd)) = wrote.iter().find(|(_, r)| r.feature_shape != shape || r.feature_dtype != dtype || r.target_width != width) {
            let msg = format!(
                "task {index} wrote {} features {:?} with {} targets per record; the first wrote {dtype} {shape:?} with {width}: one dataset needs one schema",
                odd.feature_dtype, odd.feature_shape, odd.target_width
            );
            self.finish_job(id, JobState::Failed, msg);
            return;
        }
        // Records with float targets keep them (score and transform pass the input's on).
        let target_width = width;
        if b.operator != "exec" && target_width != input.target_width {
            let msg = format!("the tasks wrote {target_width} targets per record; the input has {}", input.target_width);
            self.finish_job(id, JobState::Failed, msg);
            return;
        }
        let classes = if target_width > 0 { 0 } else { b.tasks.iter().map(|t| result(t).classes).max().unwrap_or(0).max(if b.operator == "exec" { 0 } else { input.classes }) };
        let out = b.output_dataset.clone();
        let files = (b.operator == "import").then(|| BatchSpec::parse(&job.spec_toml).ok()).flatten().and_then(|s| s.operator.files);
        let slice = DatasetSlice {
            // An import's slice names its files: the next import leaves them out.
            sources: files.unwrap_or_else(|| vec![format!("batch job {id}")]),
            imported_unix_ms: now_ms,
            stats: Some(stats),
            batch_job: id,
            operator: b.operator.clone(),
            input: described,
            model: b.model.clone(),
            ..Default::default()
        };
        let info = DatasetInfo {
            name: out.clone(),
            records,
            feature_shape: shape,
            classes,
            shards: b.tasks.iter().filter_map(|t| result(t).output.clone()).filter(|s| s.records > 0).collect(),
            slices: vec![slice],
            feature_dtype: dtype,
            target_width,
            append: self.datasets.contains_key(&out),
            class_names: if target_width == 0 && classes <= input.classes { input.class_names.clone() } else { Vec::new() },
            transform: if b.operator == "transform" { b.transform.clone() } else { None },
            ..Default::default()
        };
        match self.register_dataset(index, info) {
            Ok(d) => {
                self.jobs.get_mut(&id).and_then(|j| j.batch.as_mut()).expect("a batch job").output_version = d.version;
                self.finish_job(id, JobState::Succeeded, String::new());
            }
            Err(e) => self.finish_job(id, JobState::Failed, format!("the output could not be added to dataset {out}: {e}")),
        }
    }

    /// A worker running attempts of batch job `id` is gone: its attempts are dropped, and
    /// their tasks go back to pending (or fail the job when out of attempts).
    pub(super) fn batch_worker_gone(&mut self, id: u64, worker: &str, why: &str) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let Some(b) = job.batch.as_mut() else { return };
        let mut failure = None;
        for t in &mut b.tasks {
            let before = t.running.len();
            t.running.retain(|a| a.worker_id != worker);
            if t.running.len() == before || t.state != RUNNING {
                continue;
            }
            t.error = format!("worker {worker} {why}");
            if t.running.is_empty() {
                if t.attempts >= b.max_attempts {
                    t.state = FAILED.into();
                    failure = Some(format!("task {} ({}) failed {} times; the last: {}", t.index, task_span(&b.operator, t), t.attempts, t.error));
                } else {
                    t.state = PENDING.into();
                }
            }
        }
        sync_workers(job);
        if let Some(msg) = failure {
            self.finish_job(id, JobState::Failed, msg);
        }
    }

    /// The batch attempts the leader should start now: pending tasks (lowest first) of the
    /// oldest batch jobs on idle `eligible` workers (lowest ids first), up to each job's
    /// `workers`, then speculative copies of stragglers. None while a queued training job
    /// could start on the workers batch tasks hold (it gets them as their tasks end).
    pub fn next_batch_starts(&self, eligible: impl Fn(&str) -> bool, now_ms: u64) -> Vec<TaskStarted> {
        if self.training_waits_on(&eligible) {
            return Vec::new();
        }
        let mut idle: Vec<String> = self.workers.values().filter(|w| w.state() == WorkerState::Idle && eligible(&w.id)).map(|w| w.id.clone()).collect();
        idle.sort_by_key(|w| (w.len(), w.clone()));
        let mut starts = Vec::new();
        for job in self.jobs.values().filter(|j| is_batch(j) && matches!(j.state(), JobState::Queued | JobState::Running)) {
            let b = job.batch.as_ref().expect("a batch job");
            let mut room = (b.workers as usize).saturating_sub(running_attempts(b));
            // The lowest idle worker this task has not failed on (a retry goes elsewhere when
            // it can), else the lowest idle one.
            let mut start = |task: &BatchTask, speculative: bool| -> bool {
                if room == 0 || idle.is_empty() {
                    return false;
                }
                let at = idle.iter().position(|w| !task.failed_on.contains(w)).unwrap_or(0);
                let worker_id = idle.remove(at);
                room -= 1;
                starts.push(TaskStarted { job_id: job.id, task: task.index, worker_id, attempt: 0, started_unix_ms: now_ms, speculative });
                true
            };
            for t in b.tasks.iter().filter(|t| t.state == PENDING) {
                if !start(t, false) {
                    break;
                }
            }
            // Stragglers: once half the tasks are done and none waits, a task running longer
            // than `speculation` times the median gets a copy; the first commit wins.
            let mut done: Vec<u64> = b.tasks.iter().filter(|t| t.state == DONE).map(|t| result(t).elapsed_ms).collect();
            if b.speculation > 0.0 && !done.is_empty() && done.len() * 2 >= b.tasks.len() && b.tasks.iter().all(|t| t.state != PENDING) {
                done.sort_unstable();
                let limit = (done[done.len() / 2] as f64 * b.speculation).max(MIN_SPECULATION_MS);
                for t in b.tasks.iter().filter(|t| t.state == RUNNING && t.running.len() == 1 && !t.running[0].speculative) {
                    if now_ms.saturating_sub(t.running[0].started_unix_ms) as f64 > limit && !start(t, true) {
                        break;
                    }
                }
            }
        }
        starts
    }

    /// What `worker` runs for batch job `job`: its attempt, if it has one.
    pub(super) fn batch_assignment(&self, job: &JobInfo, worker: &str) -> Option<Assignment> {
        let b = job.batch.as_ref()?;
        let (task, attempt) = b.tasks.iter().find_map(|t| t.running.iter().find(|a| a.worker_id == worker).map(|a| (t, a.attempt)))?;
        Some(Assignment {
            job_id: job.id,
            generation: attempt,
            rank: 0,
            world_size: 1,
            spec_toml: job.spec_toml.clone(),
            dataset: self.dataset_view(&job.dataset_name, job.dataset_version, DatasetView::Shards),
            init: job.init.clone(),
            task: Some(BatchTask { running: Vec::new(), ..task.clone() }),
            transform: b.transform.clone(),
            output_folder: b.output_folder.clone(),
            model_classes: b.model_classes,
            model_target_width: b.model_target_width,
            model_context: b.model_context,
            ..Default::default()
        })
    }
}

/// What a task covers, for messages: its records, or an import's file.
fn task_span(op: &str, t: &BatchTask) -> String {
    if op == "import" {
        format!("file {} of operator.files", t.start)
    } else {
        format!("records [{}, {})", t.start, t.end)
    }
}

/// What a successful report must hold: an output shard under the attempt's own name in the
/// job's folder (when the phase writes one), with the records the task was given (score and
/// transform write one record per input record; exec may write any number), predictions no
/// more than records, and statistics of a sane size.
fn check_report(report: &TaskReport, task: &BatchTask, folder: &str, op: &str, writes: bool, context: u32) -> Result<(), String> {
    let span = task.end - task.start;
    let r = report.result.as_ref().ok_or("no result reported")?;
    if writes {
        let out = r.output.as_ref().ok_or("no output shard reported")?;
        let want = format!("{folder}/task-{:05}-a{}.safetensors", task.index, report.attempt);
        if out.path != want || out.records != r.records_out {
            return Err(format!("output {:?} with {} records is not {want} with the {} records reported", out.path, out.records, r.records_out));
        }
        if !matches!(op, "exec" | "import") && r.records_out != span {
            return Err(format!("{} records written for the task's {span}", r.records_out));
        }
        if r.feature_shape.is_empty() || r.feature_shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).is_none_or(|n| n == 0 || n > MAX_FEATURES) {
            return Err(format!("output feature shape {:?} is not usable", r.feature_shape));
        }
    }
    if !writes && op == "score" && r.records_out != span {
        return Err(format!("{} records scored for the task's {span}", r.records_out));
    }
    // A language model's records hold `context` predictions each.
    if r.correct > r.records_out.saturating_mul(u64::from(context.max(1))) {
        return Err(format!("{} correct of {} records", r.correct, r.records_out));
    }
    if let Some(s) = &r.stats {
        if s.features.len() as u64 > MAX_FEATURES || s.label_counts.len() > 1_000_000 || s.features.iter().any(|f| f.bins.len() > 1024) {
            return Err("statistics of an unusable size".into());
        }
    }
    Ok(())
}

fn running_attempts(b: &BatchState) -> usize {
    b.tasks.iter().map(|t| t.running.len()).sum()
}

/// The job's workers: those running one of its attempts, lowest ids first.
fn sync_workers(job: &mut JobInfo) {
    let mut ws: Vec<String> = job.batch.iter().flat_map(|b| &b.tasks).flat_map(|t| t.running.iter().map(|a| a.worker_id.clone())).collect();
    ws.sort_by_key(|w| (w.len(), w.clone()));
    ws.dedup();
    job.world_size = ws.len() as u32;
    job.workers = ws;
}

/// The tasks' statistics added up. Histograms add only when every task binned a feature over
/// the same range (the input's first slice's); otherwise they are dropped, and the range is
/// the values' own.
fn merge_stats<'a>(parts: impl Iterator<Item = &'a SliceStats>) -> SliceStats {
    let parts: Vec<&SliceStats> = parts.collect();
    let mut all = SliceStats::default();
    for p in &parts {
        shoal_core::stats::add(&mut all, p);
    }
    for (j, f) in all.features.iter_mut().enumerate() {
        let same = parts.iter().all(|p| p.features.get(j).is_some_and(|g| g.lo == f.lo && g.hi == f.hi && g.bins.len() == f.bins.len()));
        if !same {
            f.bins.clear();
            (f.lo, f.hi) = (f.min, f.max);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{RegisterWorkerRequest, ShardInfo, WorkerLost};

    fn cmd(kind: command::Kind) -> Command {
        Command { kind: Some(kind), ..Default::default() }
    }

    /// A dataset of three shards and three workers.
    fn cluster() -> StateMachine {
        let mut sm = StateMachine::default();
        let shards = (0..3).map(|i| ShardInfo { path: format!("datasets/d/import-1/shard-{i:05}.safetensors"), records: 10, blake3: "h".into(), bytes: 1 }).collect();
        let ds = DatasetInfo { name: "d".into(), records: 30, feature_shape: vec![4], classes: 2, shards, feature_dtype: "f32".into(), ..Default::default() };
        sm.apply(1, cmd(command::Kind::RegisterDataset(ds))).unwrap();
        for i in 0..3 {
            let r = RegisterWorkerRequest { address: format!("127.0.0.1:{}", 9000 + i), ..Default::default() };
            sm.apply(2 + i, cmd(command::Kind::RegisterWorker(r))).unwrap();
        }
        sm
    }

    const COPY: &str = "name = \"c\"\nkind = \"batch\"\n[input]\ndataset = \"d\"\n[operator]\nkind = \"exec\"\ncommand = [\"cp\", \"{input}\", \"{output}\"]\n[output]\ndataset = \"out\"\n[cluster]\nworkers = 2\nmax_attempts = 2\n";

    fn start(sm: &mut StateMachine, index: u64, task: u32, worker: &str, speculative: bool) -> ApplyResult {
        let job_id = sm.jobs().find(|j| is_batch(j)).unwrap().id;
        let t = TaskStarted { job_id, task, worker_id: worker.into(), attempt: 0, started_unix_ms: 1000, speculative };
        sm.apply(index, cmd(command::Kind::TaskStarted(t)))
    }

    fn report(sm: &mut StateMachine, index: u64, task: u32, attempt: u64, worker: &str, ok: bool) -> ApplyResult {
        let output = ShardInfo { path: format!("datasets/out/batch-1/task-{task:05}-a{attempt}.safetensors"), records: 10, blake3: "o".into(), bytes: 1 };
        let r = TaskReport {
            worker_id: worker.into(),
            job_id: sm.jobs().find(|j| is_batch(j)).unwrap().id,
            attempt,
            task,
            ok,
            error: if ok { String::new() } else { "boom".into() },
            result: Some(TaskResult { output: Some(output), records_out: 10, feature_shape: vec![4], feature_dtype: "f32".into(), classes: 2, ..Default::default() }).filter(|_| ok),
            reported_unix_ms: 2000,
        };
        sm.apply(index, cmd(command::Kind::TaskReported(r)))
    }

    fn batch(sm: &StateMachine) -> &BatchState {
        let id = sm.jobs().find(|j| is_batch(j)).unwrap().id;
        sm.job(id).unwrap().batch.as_ref().unwrap()
    }

    #[test]
    fn the_first_commit_of_a_task_wins_and_the_output_is_every_task_once() {
        let mut sm = cluster();
        sm.apply(5, cmd(command::Kind::SubmitJob(COPY.into()))).unwrap();
        assert_eq!(batch(&sm).tasks.len(), 3);
        let starts = sm.next_batch_starts(|_| true, 1000);
        assert_eq!(starts.iter().map(|t| (t.task, t.worker_id.as_str())).collect::<Vec<_>>(), [(0, "w1"), (1, "w2")], "two at once: the job's `workers`");
        start(&mut sm, 6, 0, "w1", false).unwrap();
        start(&mut sm, 7, 1, "w2", false).unwrap();
        assert!(start(&mut sm, 8, 2, "w3", false).unwrap_err().to_string().contains("at once"));
        assert_eq!(sm.assignment("w1").unwrap().generation, 1, "an attempt's number is its assignment's generation");
        // Task 0 commits; w1 takes task 2 in the same apply.
        report(&mut sm, 9, 0, 1, "w1", true).unwrap();
        assert_eq!(sm.assignment("w1").unwrap().task.unwrap().index, 2);
        // A retry of that very report (its reply lost) gets the same answer and changes nothing.
        let before = sm.job(1).cloned();
        report(&mut sm, 10, 0, 1, "w1", true).unwrap();
        assert_eq!(sm.job(1).cloned(), before);
        // A speculative copy of task 1 on w3; the copy commits first, the original is refused.
        start(&mut sm, 11, 1, "w3", true).unwrap_err().to_string();
        report(&mut sm, 12, 2, 3, "w1", true).unwrap();
        start(&mut sm, 13, 1, "w3", true).unwrap();
        let copy = sm.assignment("w3").unwrap().generation;
        report(&mut sm, 14, 1, copy, "w3", true).unwrap();
        assert!(sm.assignment("w2").is_none(), "the original attempt's worker is freed");
        assert!(report(&mut sm, 15, 1, 2, "w2", true).is_err(), "the other attempt is refused");
        let job = sm.job(1).unwrap();
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
        // Even after the job ended, the committed attempt's retried report is not refused.
        report(&mut sm, 16, 1, copy, "w3", true).unwrap();
        let out = sm.dataset_view("out", 0, DatasetView::Page(0)).unwrap();
        assert_eq!((out.records, out.shards.len()), (30, 3));
        assert!(out.shards[1].path.ends_with(&format!("-a{copy}.safetensors")));
        assert_eq!(out.slices[0].batch_job, 1);
        assert!(sm.workers().all(|w| w.state() == WorkerState::Idle));
    }

    #[test]
    fn lost_workers_and_failures_retry_until_the_attempts_run_out() {
        let mut sm = cluster();
        sm.apply(5, cmd(command::Kind::SubmitJob(COPY.into()))).unwrap();
        start(&mut sm, 6, 0, "w1", false).unwrap();
        sm.apply(7, cmd(command::Kind::WorkerLost(WorkerLost { worker_id: "w1".into(), ..Default::default() }))).unwrap();
        assert_eq!((batch(&sm).tasks[0].state.as_str(), batch(&sm).tasks[0].attempts), (PENDING, 1));
        start(&mut sm, 8, 0, "w2", false).unwrap();
        report(&mut sm, 9, 0, 2, "w2", false).unwrap();
        let job = sm.job(1).unwrap();
        assert_eq!(job.state(), JobState::Failed, "two attempts: a lost worker's and a failure");
        assert!(job.error.contains("task 0") && job.error.contains("failed 2 times") && job.error.contains("boom"), "{}", job.error);
        assert!(sm.dataset("out", 0).is_none());
    }

    #[test]
    fn batch_tasks_make_way_for_a_queued_training_job() {
        let mut sm = cluster();
        sm.apply(5, cmd(command::Kind::SubmitJob(COPY.replace("workers = 2", "workers = 3")))).unwrap();
        for (i, w) in ["w1", "w2", "w3"].iter().enumerate() {
            start(&mut sm, 6 + i as u64, i as u32, w, false).unwrap();
        }
        let train = "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 20]\n[training]\nepochs = 1\nbatch_size = 4\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 2\n";
        sm.apply(9, cmd(command::Kind::SubmitJob(train.into()))).unwrap();
        // w1 finishes: with a training job waiting, it takes no new batch task...
        report(&mut sm, 10, 0, 1, "w1", true).unwrap();
        assert!(sm.assignment("w1").is_none());
        sm.apply(11, cmd(command::Kind::TaskReported(TaskReport { worker_id: "w2".into(), job_id: 1, attempt: 2, task: 1, ok: false, error: "x".into(), ..Default::default() }))).unwrap();
        assert!(sm.next_batch_starts(|_| true, 3000).is_empty(), "no batch task while the training job can start");
        // ...and the training job is placed on the freed workers.
        let (job, _, workers) = sm.next_placement(|_| true).unwrap();
        assert_eq!((job, workers.len()), (2, 2));
    }

    #[test]
    fn a_training_job_too_big_for_the_pool_does_not_hold_batch_tasks_back() {
        let mut sm = cluster();
        let train = "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 20]\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 4\n";
        sm.apply(5, cmd(command::Kind::SubmitJob(train.into()))).unwrap();
        sm.apply(6, cmd(command::Kind::SubmitJob(COPY.into()))).unwrap();
        assert!(sm.next_placement(|_| true).is_none(), "4 workers wanted, 3 exist");
        assert_eq!(sm.next_batch_starts(|_| true, 1000).len(), 2, "the batch job runs meanwhile");
        // Cancelled mid-run: its workers are free again and nothing is left running.
        start(&mut sm, 7, 0, "w1", false).unwrap();
        sm.apply(8, cmd(command::Kind::CancelJob(2))).unwrap();
        assert!(sm.workers().all(|w| w.state() == WorkerState::Idle));
        assert!(batch(&sm).tasks.iter().all(|t| t.running.is_empty() && t.state == PENDING));
    }

    #[test]
    fn a_bad_report_is_refused_without_a_change_and_retries_go_to_another_worker() {
        let mut sm = cluster();
        sm.apply(5, cmd(command::Kind::SubmitJob(COPY.into()))).unwrap();
        start(&mut sm, 6, 0, "w1", false).unwrap();
        let before = sm.job(1).cloned();
        let mut r = TaskReport { worker_id: "w1".into(), job_id: 1, attempt: 1, task: 0, ok: true, ..Default::default() };
        for (path, records) in [("datasets/out/batch-1/task-00001-a1.safetensors", 10), ("datasets/out/batch-1/task-00000-a1.safetensors", 9), ("datasets/other/x.safetensors", 10)] {
            let output = Some(ShardInfo { path: path.into(), records, blake3: "o".into(), bytes: 1 });
            r.result = Some(TaskResult { output, records_out: 10, feature_shape: vec![4], feature_dtype: "f32".into(), ..Default::default() });
            assert!(sm.apply(7, cmd(command::Kind::TaskReported(r.clone()))).is_err(), "{path} {records}");
            assert_eq!(sm.job(1).cloned(), before, "a refused report changes nothing");
        }
        // A failure on w1: the retry goes to another idle worker.
        report(&mut sm, 8, 0, 1, "w1", false).unwrap();
        let starts = sm.next_batch_starts(|_| true, 1000);
        assert_eq!((starts[0].task, starts[0].worker_id.as_str()), (0, "w2"), "{starts:?}");
    }

    #[test]
    fn a_training_job_that_waited_stops_batch_attempts_which_do_not_count() {
        let mut sm = cluster();
        sm.apply(5, cmd(command::Kind::SubmitJob(COPY.replace("workers = 2", "workers = 3")))).unwrap();
        for (i, w) in ["w1", "w2", "w3"].iter().enumerate() {
            start(&mut sm, 6 + i as u64, i as u32, w, false).unwrap();
        }
        assert!(sm.batch_preemptions(|_| true).is_none(), "no training job waits");
        let train = "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\nname = \"d\"\ntrain = [0, 20]\n[training]\nepochs = 1\nbatch_size = 4\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 2\n";
        sm.apply(9, cmd(command::Kind::SubmitJob(train.into()))).unwrap();
        let (job, stops) = sm.batch_preemptions(|_| true).unwrap();
        assert_eq!((job, stops.iter().map(|t| t.attempt).collect::<Vec<_>>()), (2, vec![3, 2]), "the newest attempts first");
        for (i, t) in stops.into_iter().enumerate() {
            sm.apply(10 + i as u64, cmd(command::Kind::TaskStopped(t))).unwrap();
        }
        let b = batch(&sm);
        assert_eq!(b.tasks.iter().map(|t| (t.state.as_str(), t.attempts)).collect::<Vec<_>>(), [(RUNNING, 1), (PENDING, 0), (PENDING, 0)]);
        let (placed, _, workers) = sm.next_placement(|_| true).unwrap();
        assert_eq!((placed, workers), (2, vec!["w2".to_string(), "w3".to_string()]));
    }
}
