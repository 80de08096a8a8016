//! Pipelines and their runs. Every transition of a run happens inside an apply: a run's
//! ready steps start in the apply that created the run or finished their last upstream step,
//! and a step's job ending (in whatever apply ends it) settles the step, then starts what it
//! unblocks. So each step attempt starts exactly once on every replica, whoever leads.

use shoal_core::pipeline::{OutputRef, PipelineSpec, Step, StepKind};
use shoal_proto::{PipelineInfo, PipelineRun, PipelineStepTimeout, RunPipelineRequest, StepOutput, StepRun};

use super::*;
use crate::state::DatasetView;

/// With `catchup = "none"`, a slot still runs this long after its time.
pub const SCHEDULE_GRACE_MS: u64 = 5_000;

/// Finished runs kept per pipeline (the oldest go first).
pub const RUNS_KEPT: usize = 100;

pub const PENDING: &str = "pending";
pub const RUNNING: &str = "running";
pub const SUCCEEDED: &str = "succeeded";
pub const FAILED: &str = "failed";
pub const SKIPPED: &str = "skipped";
pub const CANCELLED: &str = "cancelled";

/// Parsed pipeline specs by the blake3 of their text: a spec is parsed (and every step's job
/// spec checked) once, not at every step transition and leader tick. Derived, never encoded.
#[derive(Default)]
pub(super) struct SpecCache(std::sync::Mutex<BTreeMap<[u8; 32], std::sync::Arc<PipelineSpec>>>);

/// Distinct specs kept parsed (more: the cache starts over).
const SPECS_PARSED: usize = 256;

impl Clone for SpecCache {
    fn clone(&self) -> SpecCache {
        SpecCache::default()
    }
}

impl std::fmt::Debug for SpecCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpecCache")
    }
}

impl SpecCache {
    pub(super) fn parse(&self, text: &str) -> Result<std::sync::Arc<PipelineSpec>, shoal_core::CoreError> {
        let key = *blake3::hash(text.as_bytes()).as_bytes();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&key) {
            return Ok(s.clone());
        }
        let spec = std::sync::Arc::new(PipelineSpec::parse(text)?);
        if map.len() >= SPECS_PARSED {
            map.clear();
        }
        map.insert(key, spec.clone());
        Ok(spec)
    }
}

enum Verdict {
    Start,
    Skip(String),
    Fail(String),
}

fn output(step: &StepRun, key: &str) -> Option<String> {
    step.outputs.iter().find(|o| o.key == key).map(|o| o.value.clone())
}

/// A float as outputs hold it: Rust's shortest exact form (the same on every replica).
fn number(v: f64) -> String {
    format!("{v}")
}

impl StateMachine {
    pub(super) fn submit_pipeline(&mut self, toml: String) -> ApplyResult {
        let spec = self.specs.parse(&toml).map_err(ApplyError::invalid)?;
        let hash = blake3::hash(toml.as_bytes()).to_hex().to_string();
        let now = self.now_ms;
        let trigger = spec.trigger.clone().unwrap_or(shoal_core::pipeline::TriggerSpec { on_append: String::new(), min_new_records: 1, debounce_s: 0 });
        let latest = self.version_records(&trigger.on_append, 0).map(|(v, _)| v).unwrap_or(0);
        let p = self.pipelines.entry(spec.name.clone()).or_insert_with(|| PipelineInfo { name: spec.name.clone(), ..Default::default() });
        if p.spec_blake3 != hash {
            p.version += 1;
            p.spec_blake3 = hash;
            p.spec_toml = toml;
            p.submitted_unix_ms = now;
            p.description = spec.description.clone().unwrap_or_default();
            if p.trigger_dataset != trigger.on_append {
                // A new trigger covers only the versions that come after it.
                p.trigger_dataset = trigger.on_append;
                (p.trigger_watermark, p.trigger_latest, p.trigger_latest_unix_ms) = (latest, latest, now);
            }
            (p.trigger_debounce_s, p.trigger_min_records) = (trigger.debounce_s, trigger.min_new_records);
            let key = spec.schedule.as_ref().map(|s| format!("{} {}", s.cron, s.timezone)).unwrap_or_default();
            if p.schedule_key != key {
                // A new or changed schedule starts from now: nothing before the edit runs.
                (p.schedule_key, p.schedule_watermark_ms) = (key, now);
            }
        }
        Ok(ApplyOutput::Pipeline(Box::new(p.clone())))
    }

    pub(super) fn run_pipeline(&mut self, index: u64, r: RunPipelineRequest) -> ApplyResult {
        let p = self.pipelines.get_mut(&r.name).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline {:?} (submit it first)", r.name)))?;
        p.runs_started += 1;
        let id = format!("{}-{}", p.name, p.runs_started);
        let p = p.clone();
        let seq = self.create_run(index, &p, id, "request".into())?;
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone())))
    }

    /// Version `version` of `dataset` was just added: pipelines triggered by it note it, and
    /// those without a debounce start their run here, in the append's own apply (once per
    /// range, whoever leads).
    pub(super) fn fire_pipelines(&mut self, index: u64, dataset: &str, version: u64) {
        let now = self.now_ms;
        let fired: Vec<String> = self.pipelines.values().filter(|p| p.trigger_dataset == dataset).map(|p| p.name.clone()).collect();
        for name in fired {
            let p = self.pipelines.get_mut(&name).expect("listed above");
            (p.trigger_latest, p.trigger_latest_unix_ms) = (version, now);
            if p.trigger_debounce_s == 0 {
                let from = p.trigger_watermark + 1;
                // Too few new records: the range grows with the next append.
                let _ = self.trigger_run(index, &name, from, version);
            }
        }
    }

    /// The leader's proposal for a debounced trigger: accepted only if it starts right above
    /// the watermark (a stale or repeated proposal changes nothing).
    pub(super) fn pipeline_triggered(&mut self, index: u64, t: shoal_proto::PipelineTriggered) -> ApplyResult {
        let seq = self.trigger_run(index, &t.pipeline, t.from_version, t.to_version)?;
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone())))
    }

    /// A run of pipeline `name` for versions [from, to] of its trigger's dataset.
    fn trigger_run(&mut self, index: u64, name: &str, from: u64, to: u64) -> Result<u64, ApplyError> {
        let p = self.pipelines.get(name).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline {name:?}")))?;
        let dataset = p.trigger_dataset.clone();
        if dataset.is_empty() {
            return Err(ApplyError::conflict(format!("pipeline {name} has no trigger")));
        }
        if from != p.trigger_watermark + 1 || to < from {
            return Err(ApplyError::conflict(format!("pipeline {name}: versions up to {} of {dataset} have had their run; [{from}, {to}] is not next", p.trigger_watermark)));
        }
        let (_, added) = self.version_records(&dataset, to).ok_or_else(|| ApplyError::not_found(format!("dataset {dataset} has no version {to}")))?;
        let before = self.version_records(&dataset, p.trigger_watermark).map(|(_, r)| r).filter(|_| p.trigger_watermark > 0).unwrap_or(0);
        let new = added.saturating_sub(before);
        if new < p.trigger_min_records {
            return Err(ApplyError::conflict(format!("pipeline {name}: {new} new records in {dataset} v{from}..v{to}, fewer than min_new_records = {}", p.trigger_min_records)));
        }
        let id = if from == to { format!("{name}@{dataset}-v{to}") } else { format!("{name}@{dataset}-v{from}-v{to}") };
        let p = self.pipelines.get_mut(name).expect("looked up above");
        p.trigger_watermark = to;
        let p = p.clone();
        self.create_run(index, &p, id, format!("append {dataset} v{from}..v{to}"))
    }

    /// `pipeline pause|unpause`. Unpausing moves the watermark to now: the slots that passed
    /// while paused never run.
    pub(super) fn pause_pipeline(&mut self, r: shoal_proto::PausePipelineRequest) -> ApplyResult {
        let now = self.now_ms;
        let p = self.pipelines.get_mut(&r.name).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline {:?}", r.name)))?;
        if p.paused && !r.paused {
            p.schedule_watermark_ms = p.schedule_watermark_ms.max(now);
        }
        p.paused = r.paused;
        Ok(ApplyOutput::Pipeline(Box::new(p.clone())))
    }

    /// Schedule slots, as the leader proposed them: each taken only above the watermark (so
    /// each slot has its turn once, whoever proposed it how often), and only once it is due
    /// by the command's clock. A slot runs as `NAME@SLOT`, unless skipped (`skip`, or
    /// `forbid` while a scheduled run of the pipeline runs); `queue` stops at a slot while
    /// one runs (the leader proposes it again later); `replace` cancels the running ones.
    pub(super) fn schedule_fire(&mut self, index: u64, f: shoal_proto::ScheduleFire) -> ApplyResult {
        use shoal_core::pipeline::Concurrency;
        let now = self.now_ms;
        let p = self.pipelines.get(&f.pipeline).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline {:?}", f.pipeline)))?;
        let spec = self.specs.parse(&p.spec_toml).map_err(ApplyError::invalid)?;
        let schedule = spec.schedule.as_ref().ok_or_else(|| ApplyError::conflict(format!("pipeline {} has no schedule", f.pipeline)))?;
        let cron = schedule.schedule();
        if p.paused {
            return Err(ApplyError::conflict(format!("pipeline {} is paused", f.pipeline)));
        }
        if let Some(bad) = f.slots_ms.iter().find(|&&s| s > now || !cron.is_slot(s)) {
            return Err(ApplyError::invalid(format!("pipeline {}: {} is not a due slot of its schedule", f.pipeline, shoal_core::cron::slot_label(*bad))));
        }
        if !f.slots_ms.windows(2).all(|w| w[0] < w[1]) {
            return Err(ApplyError::invalid("schedule slots must ascend"));
        }
        let fresh: Vec<u64> = f.slots_ms.iter().copied().filter(|&s| s > p.schedule_watermark_ms).collect();
        if fresh.is_empty() {
            return Err(ApplyError::conflict(format!("pipeline {}: these slots had their turn already", f.pipeline)));
        }
        let mut last = ApplyOutput::None;
        for slot in fresh {
            let running: Vec<String> = self.pipeline_runs.values().filter(|r| r.pipeline == f.pipeline && r.state == RUNNING && r.cause.starts_with("schedule ")).map(|r| r.id.clone()).collect();
            let skip = f.skip || (schedule.concurrency == Concurrency::Forbid && !running.is_empty());
            if !skip && schedule.concurrency == Concurrency::Queue && !running.is_empty() {
                // The rest wait for the running run to end.
                break;
            }
            let p = self.pipelines.get_mut(&f.pipeline).expect("looked up above");
            p.schedule_watermark_ms = slot;
            if skip {
                p.slots_skipped += 1;
                continue;
            }
            let p = p.clone();
            if schedule.concurrency == Concurrency::Replace {
                for id in running {
                    self.cancel_pipeline_run(id)?;
                }
            }
            let label = shoal_core::cron::slot_label(slot);
            let seq = self.create_run(index, &p, format!("{}@{label}", p.name), format!("schedule {label}"))?;
            last = ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone()));
        }
        Ok(last)
    }

    /// What the leader proposes for the schedules at `now_ms`: per unpaused schedule with a
    /// slot past its watermark, the slots the catch-up rule picks (`all`: the newest
    /// `max_catchup`, oldest first, in one entry; `latest`: the newest; `none`: the newest if
    /// it is within `SCHEDULE_GRACE_MS`, else skipped).
    pub fn due_schedules(&self, now_ms: u64) -> Vec<shoal_proto::ScheduleFire> {
        use shoal_core::pipeline::Catchup;
        let mut out = Vec::new();
        for p in self.pipelines.values().filter(|p| !p.schedule_key.is_empty() && !p.paused) {
            let Some(s) = self.specs.parse(&p.spec_toml).ok().and_then(|s| s.schedule.clone()) else { continue };
            let limit = if s.catchup == Catchup::All { s.max_catchup as usize } else { 1 };
            let slots = s.schedule().newest_slots(p.schedule_watermark_ms, now_ms, limit);
            let Some(&last) = slots.last() else { continue };
            let fire = |slots_ms: Vec<u64>, skip| shoal_proto::ScheduleFire { pipeline: p.name.clone(), slots_ms, skip };
            out.push(match s.catchup {
                Catchup::All => fire(slots, false),
                Catchup::Latest => fire(vec![last], false),
                Catchup::None => fire(vec![last], now_ms.saturating_sub(last) > SCHEDULE_GRACE_MS),
            });
        }
        out
    }

    /// Debounced triggers whose quiet period is over at `now_ms` (the leader proposes them).
    pub fn due_triggers(&self, now_ms: u64) -> Vec<shoal_proto::PipelineTriggered> {
        self.pipelines
            .values()
            .filter(|p| p.trigger_debounce_s > 0 && p.trigger_latest > p.trigger_watermark)
            .filter(|p| now_ms >= p.trigger_latest_unix_ms.saturating_add(p.trigger_debounce_s.saturating_mul(1000)))
            .filter(|p| {
                let at = |v: u64| self.version_records(&p.trigger_dataset, v).map(|(_, r)| r).filter(|_| v > 0).unwrap_or(0);
                at(p.trigger_latest).saturating_sub(at(p.trigger_watermark)) >= p.trigger_min_records
            })
            .map(|p| shoal_proto::PipelineTriggered { pipeline: p.name.clone(), from_version: p.trigger_watermark + 1, to_version: p.trigger_latest })
            .collect()
    }

    /// A new run of `p` (its steps pending), then whatever can start at once.
    fn create_run(&mut self, index: u64, p: &PipelineInfo, id: String, cause: String) -> Result<u64, ApplyError> {
        if self.run_ids.contains_key(&id) {
            return Err(ApplyError::conflict(format!("pipeline run {id} exists already")));
        }
        let spec = self.specs.parse(&p.spec_toml).map_err(ApplyError::invalid)?;
        self.next_run_seq += 1;
        let seq = self.next_run_seq;
        let steps = spec
            .steps
            .iter()
            .map(|s| StepRun { name: s.name.clone(), kind: s.kind.label().into(), state: PENDING.into(), retries: s.retries, timeout_s: s.timeout_s.unwrap_or(0), ..Default::default() })
            .collect();
        let run = PipelineRun {
            id: id.clone(),
            seq,
            pipeline: p.name.clone(),
            version: p.version,
            spec_blake3: p.spec_blake3.clone(),
            spec_toml: p.spec_toml.clone(),
            state: RUNNING.into(),
            steps,
            created_unix_ms: self.now_ms,
            build: self.now_build.clone(),
            cause,
            ..Default::default()
        };
        self.pipeline_runs.insert(seq, run);
        self.run_ids.insert(id, seq);
        self.advance_run(index, seq);
        Ok(seq)
    }

    pub(super) fn cancel_pipeline_run(&mut self, id: String) -> ApplyResult {
        let seq = *self.run_ids.get(&id).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline run {id}")))?;
        let run = self.pipeline_runs.get_mut(&seq).expect("indexed");
        if run.state != RUNNING {
            return Err(ApplyError::conflict(format!("pipeline run {id} already {}", run.state)));
        }
        // Marked first: the jobs ended below then settle nothing.
        run.state = CANCELLED.into();
        run.finished_unix_ms = self.now_ms;
        let mut jobs = Vec::new();
        for s in &mut run.steps {
            if s.state == RUNNING || s.state == PENDING {
                if s.state == RUNNING && s.job_id != 0 {
                    jobs.push(s.job_id);
                }
                s.state = CANCELLED.into();
                s.finished_unix_ms = self.now_ms;
            }
        }
        for j in jobs {
            if self.jobs.get(&j).is_some_and(|job| !job.state().is_terminal()) {
                self.finish_job(j, JobState::Cancelled, format!("pipeline run {id} was cancelled"));
            }
        }
        let pipeline = self.pipeline_runs[&seq].pipeline.clone();
        self.trim_runs(&pipeline);
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs.get(&seq).cloned().unwrap_or_default())))
    }

    /// `pipeline resume`: the steps that did not succeed (and with `from`, that step and its
    /// downstream) go back to pending with their retries renewed; the others keep their
    /// outputs untouched. Attempt numbers go on counting, so an old attempt stays fenced off.
    pub(super) fn resume_pipeline_run(&mut self, index: u64, r: shoal_proto::ResumePipelineRequest) -> ApplyResult {
        let seq = *self.run_ids.get(&r.id).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline run {}", r.id)))?;
        let run = self.pipeline_runs.get_mut(&seq).expect("indexed");
        let spec = self.specs.parse(&run.spec_toml).map_err(ApplyError::invalid)?;
        match run.state.as_str() {
            RUNNING => return Err(ApplyError::conflict(format!("pipeline run {} is running", r.id))),
            SUCCEEDED if r.from.is_empty() => return Err(ApplyError::conflict(format!("pipeline run {} succeeded: name a step to run again from (--from)", r.id))),
            _ => {}
        }
        let mut again: BTreeSet<String> = run.steps.iter().filter(|s| matches!(s.state.as_str(), FAILED | CANCELLED | PENDING)).map(|s| s.name.clone()).collect();
        if !r.from.is_empty() {
            if spec.step(&r.from).is_none() {
                return Err(ApplyError::not_found(format!("pipeline run {} has no step {:?}", r.id, r.from)));
            }
            again.insert(r.from.clone());
            again.extend(spec.steps.iter().filter(|s| spec.upstream(&s.name).contains(&r.from)).map(|s| s.name.clone()));
        }
        for (s, step) in run.steps.iter_mut().zip(&spec.steps) {
            if again.contains(&s.name) {
                s.state = PENDING.into();
                s.job_id = 0;
                s.outputs.clear();
                s.reason.clear();
                s.finished_unix_ms = 0;
                s.retries = s.attempts + step.retries;
            }
        }
        (run.state, run.finished_unix_ms) = (RUNNING.into(), 0);
        run.error.clear();
        run.resumes += 1;
        self.advance_run(index, seq);
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone())))
    }

    /// The leader saw a step attempt run past its `timeout_s`: its job stops, the attempt fails.
    pub(super) fn pipeline_step_timeout(&mut self, t: PipelineStepTimeout) -> ApplyResult {
        let (seq, i) = self.current_attempt(&t.run, &t.step, t.attempt, |_| true, "running")?;
        let step = &self.pipeline_runs[&seq].steps[i];
        let (job, timeout) = (step.job_id, step.timeout_s);
        if self.jobs.get(&job).is_some_and(|j| !j.state().is_terminal()) {
            // Ending the job settles the step (as failed) when the apply ends.
            self.finish_job(job, JobState::Failed, format!("pipeline step {} ran past its timeout_s = {timeout}", t.step));
        }
        Ok(ApplyOutput::None)
    }

    /// Settles the steps whose jobs ended in this apply, then starts what they unblock.
    pub(super) fn settle_pipeline_jobs(&mut self, index: u64) {
        while !self.ended_pipeline_jobs.is_empty() {
            for job_id in std::mem::take(&mut self.ended_pipeline_jobs) {
                let Some(job) = self.jobs.get(&job_id) else { continue };
                let Some(&seq) = self.run_ids.get(&job.pipeline_run) else { continue };
                let append = job.batch.as_ref().is_some_and(|b| b.operator == "import");
                let (ok, error, outputs) = (job.state() == JobState::Succeeded, job.error.clone(), if append { self.append_job_outputs(job) } else { job_outputs(job) });
                let why = if error.is_empty() { format!("job {job_id} was {}", job.state().label()) } else { format!("job {job_id}: {error}") };
                let run = &self.pipeline_runs[&seq];
                let Some(i) = run.steps.iter().position(|s| s.name == job.pipeline_step) else { continue };
                // Fencing: only the current attempt's job settles the step.
                if run.state != RUNNING || run.steps[i].state != RUNNING || run.steps[i].job_id != job_id {
                    continue;
                }
                let gate = run.steps[i].kind == StepKind::Gate.label();
                // A gate goes on to its next score job, or decides.
                let settled: Result<Option<u64>, String> = match ok {
                    false => Err(why),
                    true if gate => self.gate_scored(seq, i, &outputs),
                    true => Ok(None),
                };
                let now = self.now_ms;
                let step = &mut self.pipeline_runs.get_mut(&seq).expect("indexed").steps[i];
                match settled {
                    Ok(Some(next)) => {
                        step.job_id = next;
                        step.jobs.push(next);
                        continue;
                    }
                    Ok(None) => {
                        step.state = SUCCEEDED.into();
                        step.error.clear();
                        if !gate {
                            step.outputs = outputs;
                        }
                        step.finished_unix_ms = now;
                        self.remember_step(index, seq, i, job_id);
                    }
                    Err(why) => {
                    step.error = format!("attempt {}: {why}", step.attempts);
                    if step.attempts > step.retries {
                        step.state = FAILED.into();
                        step.finished_unix_ms = now;
                    } else {
                        // Started again by `advance_run`, as the next attempt.
                        step.state = PENDING.into();
                    }
                    }
                }
                self.advance_run(index, seq);
            }
        }
    }

    /// Starts every step whose upstream steps are done (or skips it), until nothing changes;
    /// then settles the run's state. The run keeps the spec it began with.
    fn advance_run(&mut self, index: u64, seq: u64) {
        let Some(run) = self.pipeline_runs.get(&seq).filter(|r| r.state == RUNNING) else { return };
        let spec = match self.specs.parse(&run.spec_toml) {
            Ok(s) if s.steps.len() == run.steps.len() => s,
            Ok(_) => return self.fail_run(seq, "the run's spec and its steps disagree".into()),
            Err(e) => return self.fail_run(seq, format!("the run's spec no longer parses: {e}")),
        };
        while let Some((i, verdict)) = self.next_step(seq, &spec) {
            let now = self.now_ms;
            let set = |sm: &mut StateMachine, state: &str, error: String, reason: String| {
                let step = &mut sm.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
                (step.state, step.error, step.reason, step.finished_unix_ms) = (state.into(), error, reason, now);
            };
            match verdict {
                Verdict::Start => self.start_step(index, seq, &spec.steps[i]),
                Verdict::Skip(reason) => set(self, SKIPPED, String::new(), reason),
                Verdict::Fail(error) => set(self, FAILED, error, String::new()),
            }
        }
        self.settle_run(seq);
    }

    /// The first pending step whose upstream steps all ended, and what becomes of it.
    fn next_step(&self, seq: u64, spec: &PipelineSpec) -> Option<(usize, Verdict)> {
        let run = &self.pipeline_runs[&seq];
        let state_of = |name: &str| run.steps.iter().find(|s| s.name == name).map(|s| s.state.as_str()).unwrap_or_default();
        for (i, s) in spec.steps.iter().enumerate() {
            if run.steps[i].state != PENDING || s.needs.iter().any(|n| matches!(state_of(n), PENDING | RUNNING | FAILED | CANCELLED)) {
                continue;
            }
            if let Some(skipped) = s.needs.iter().find(|n| state_of(n) == SKIPPED) {
                return Some((i, Verdict::Skip(format!("it needs {skipped:?}, which was skipped"))));
            }
            let values = |r: &OutputRef| run.steps.iter().find(|x| x.name == r.step).and_then(|x| output(x, &r.output));
            return Some((
                i,
                match s.when.as_ref().map(|c| c.eval(&values)) {
                    None | Some(Ok(true)) => Verdict::Start,
                    Some(Ok(false)) => Verdict::Skip("its when condition is false".into()),
                    Some(Err(e)) => Verdict::Fail(format!("when: {e}")),
                },
            ));
        }
        None
    }

    /// Starts attempt n+1 of `step`: keys it for the cache (a hit with nothing to verify
    /// succeeds here; one with artifacts waits for the leader's verdict), else launches it.
    fn start_step(&mut self, index: u64, seq: u64, step: &Step) {
        let now = self.now_ms;
        let build = self.now_build.clone();
        let run = self.pipeline_runs.get_mut(&seq).expect("a run");
        let i = run.steps.iter().position(|s| s.name == step.name).expect("the spec's step");
        let s = &mut run.steps[i];
        s.attempts += 1;
        s.started_unix_ms = now;
        // The previous attempt's error stays until this one ends.
        s.state = RUNNING.into();
        (s.cache_key, s.cache, s.cached_from, s.inputs, s.hashing) = (String::new(), String::new(), String::new(), Vec::new(), Vec::new());
        s.reason.clear();
        if step.kind.cacheable() {
            let outputs: BTreeMap<String, Vec<StepOutput>> = run.steps.iter().map(|s| (s.name.clone(), s.outputs.clone())).collect();
            let value = |r: &OutputRef| outputs.get(&r.step).and_then(|o| o.iter().find(|x| x.key == r.output)).map(|o| o.value.clone());
            // A step that cannot be keyed cannot be submitted either: its launch says why.
            if let Ok((key, inputs)) = self.cache_key(step, &value, &build) {
                let files = if step.cache { self.exec_files(step, &value) } else { Vec::new() };
                let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
                (s.cache_key, s.inputs) = (key, inputs);
                if !files.is_empty() {
                    // The key waits for the digests of the files the command names.
                    (s.cache, s.hashing) = (cache::CACHE_HASHING.into(), files);
                    return;
                }
                if self.cache_lookup(seq, i, step.cache) {
                    return;
                }
            }
        }
        self.launch_step(index, seq, i, step);
    }

    /// Runs step `i` of the current attempt: renders it with the upstream outputs and submits
    /// its job (or, for a register or validate step, does it here). A failure to start is a
    /// failed attempt.
    fn launch_step(&mut self, index: u64, seq: u64, i: usize, step: &Step) {
        let started: Result<Option<u64>, String> = match self.rendered_step(seq, i) {
            Err(e) => Err(e),
            Ok(text) if matches!(step.kind, StepKind::Register | StepKind::Validate) => {
                let done = if step.kind == StepKind::Register { self.register_step(index, &text) } else { self.validate_step(&text) };
                done.map(|outputs| {
                    let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
                    s.outputs = outputs;
                    None
                })
            }
            Ok(text) if step.kind == StepKind::Gate => self.start_gate(seq, i, &text).map(Some),
            // Running, with no job yet: the leader lists the incoming files first.
            Ok(text) if step.kind == StepKind::Append => match self.start_append(seq, i, &text) {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Ok(text) => self.submit_step_job(seq, i, text).map(Some),
        };
        self.settle_start(seq, i, started);
    }

    /// What starting step `i`'s attempt gave: its job (the step runs on), done already
    /// (succeeded), or an error (a failed attempt: final when out of attempts, else the loop in
    /// `advance_run` starts the next one).
    fn settle_start(&mut self, seq: u64, i: usize, started: Result<Option<u64>, String>) {
        let now = self.now_ms;
        let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
        match started {
            Ok(Some(job)) => {
                s.job_id = job;
                s.jobs.push(job);
            }
            Ok(None) => {
                (s.state, s.finished_unix_ms) = (SUCCEEDED.into(), now);
                s.error.clear();
            }
            Err(e) => {
                s.error = format!("attempt {}: {e}", s.attempts);
                s.job_id = 0;
                s.state = if s.attempts > s.retries { FAILED.into() } else { PENDING.into() };
                if s.state == FAILED {
                    s.finished_unix_ms = now;
                }
            }
        }
    }

    /// Run `run`'s step `step` as a leader's proposal about its attempt `attempt` finds it:
    /// (seq, index), if the run and step are running that attempt and `waiting` holds for the
    /// step; else the proposal is stale (`what` says what it expected).
    fn current_attempt(&self, run: &str, step: &str, attempt: u32, waiting: impl Fn(&StepRun) -> bool, what: &str) -> Result<(u64, usize), ApplyError> {
        let seq = *self.run_ids.get(run).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline run {run}")))?;
        let r = &self.pipeline_runs[&seq];
        let i = r.steps.iter().position(|s| s.name == step).ok_or_else(|| ApplyError::not_found(format!("run {run} has no step {step}")))?;
        let s = &r.steps[i];
        if r.state != RUNNING || s.state != RUNNING || s.attempts != attempt || !waiting(s) {
            return Err(ApplyError::conflict(format!("step {step} of run {run} is not {what} attempt {attempt}")));
        }
        Ok((seq, i))
    }

    /// The running steps of running runs for which `waiting` holds (a leader duty's work).
    fn waiting_steps(&self, waiting: impl Fn(&StepRun) -> bool) -> Vec<(&PipelineRun, &StepRun)> {
        let running = self.pipeline_runs.values().filter(|r| r.state == RUNNING);
        running.flat_map(|r| r.steps.iter().map(move |s| (r, s))).filter(|(_, s)| s.state == RUNNING && waiting(s)).collect()
    }

    /// Step `i` of run `seq` rendered with its upstream outputs (the spec it started with).
    fn rendered_step(&self, seq: u64, i: usize) -> Result<String, String> {
        let run = &self.pipeline_runs[&seq];
        let spec = self.specs.parse(&run.spec_toml).map_err(|e| e.to_string())?;
        let step = spec.steps.get(i).ok_or("the run's spec and its steps disagree")?;
        let value = |r: &OutputRef| run.steps.iter().find(|s| s.name == r.step).and_then(|s| output(s, &r.output));
        step.render(&value).map_err(|e| e.to_string())
    }

    /// Submits a job for step `i` of run `seq`, marked as the step's.
    fn submit_step_job(&mut self, seq: u64, i: usize, text: String) -> Result<u64, String> {
        let (run_id, step) = {
            let run = &self.pipeline_runs[&seq];
            (run.id.clone(), run.steps[i].name.clone())
        };
        let job = self.submit(text).map_err(|e| e.to_string())?;
        let j = self.jobs.get_mut(&job.id).expect("just submitted");
        (j.pipeline_run, j.pipeline_step) = (run_id, step);
        Ok(job.id)
    }

    /// A register step: `model = "job:N"` becomes a version of model `as`, with `alias`.
    fn register_step(&mut self, index: u64, text: &str) -> Result<Vec<StepOutput>, String> {
        let shoal_core::pipeline::Registration { job: job_id, name, alias } = shoal_core::pipeline::Registration::parse(text)?;
        let job = self.jobs.get(&job_id).cloned().ok_or_else(|| format!("model: there is no job {job_id}"))?;
        let m = self.register_model(index, &name, &job).map_err(|e| e.to_string())?;
        let version = m.versions.first().map(|v| v.version).unwrap_or(0);
        if !alias.is_empty() {
            self.set_model_alias(shoal_proto::ModelAliasRequest { name: name.clone(), alias, version, ..Default::default() }).map_err(|e| e.to_string())?;
        }
        Ok(vec![
            StepOutput { key: "model".into(), value: format!("{name}@{version}") },
            StepOutput { key: "name".into(), value: name },
            StepOutput { key: "version".into(), value: version.to_string() },
        ])
    }

    /// A validate step: the dataset version's size, schema and its newest slice's drift
    /// against the step's thresholds.
    fn validate_step(&self, text: &str) -> Result<Vec<StepOutput>, String> {
        let v = shoal_core::pipeline::Validation::parse(text)?;
        let (name, version) = v.reference()?;
        let d = self.dataset_view(&name, version, DatasetView::Newest).ok_or_else(|| format!("dataset: there is no {}", v.dataset))?;
        let at = format!("{}@{}", d.name, d.version);
        let slice = d.slices.last().cloned().unwrap_or_default();
        if let Some(min) = v.min_records.filter(|&m| d.records < m) {
            return Err(format!("{at} has {} records, fewer than min_records = {min}", d.records));
        }
        if let Some(shape) = v.feature_shape.as_ref().filter(|s| **s != d.feature_shape) {
            return Err(format!("{at} has features {:?}, not feature_shape = {shape:?}", d.feature_shape));
        }
        if let Some(c) = v.classes.filter(|&c| c != d.classes) {
            return Err(format!("{at} has {} classes, not classes = {c}", d.classes));
        }
        for (key, max, got) in [("max_label_js", v.max_label_js, slice.label_js), ("max_feature_js", v.max_feature_js, slice.feature_js)] {
            if let Some(max) = max.filter(|&m| got > m) {
                return Err(format!("{at}: its newest slice drifted: {} = {got:.4} exceeds {key} = {max}", key.trim_start_matches("max_")));
            }
        }
        Ok(vec![
            StepOutput { key: "dataset".into(), value: at },
            StepOutput { key: "feature_js".into(), value: number(slice.feature_js) },
            StepOutput { key: "label_js".into(), value: number(slice.label_js) },
            StepOutput { key: "records".into(), value: d.records.to_string() },
            StepOutput { key: "slice_records".into(), value: slice.records.to_string() },
            StepOutput { key: "slice_start".into(), value: slice.first.to_string() },
            StepOutput { key: "version".into(), value: d.version.to_string() },
        ])
    }

    fn fail_run(&mut self, seq: u64, error: String) {
        if let Some(run) = self.pipeline_runs.get_mut(&seq) {
            run.state = FAILED.into();
            run.error = error;
            run.finished_unix_ms = self.now_ms;
        }
    }

    /// A run with no step running is over: failed if a step failed, else succeeded.
    fn settle_run(&mut self, seq: u64) {
        let now = self.now_ms;
        let run = self.pipeline_runs.get_mut(&seq).expect("a run");
        if run.state != RUNNING || run.steps.iter().any(|s| s.state == RUNNING) {
            return;
        }
        // Pending steps left have a failed step upstream (else they would have started).
        match run.steps.iter().find(|s| s.state == FAILED) {
            Some(f) => {
                run.state = FAILED.into();
                run.error = format!("step {} failed: {}", f.name, f.error);
            }
            None => run.state = SUCCEEDED.into(),
        }
        run.finished_unix_ms = now;
        let pipeline = run.pipeline.clone();
        self.trim_runs(&pipeline);
    }

    /// At most `RUNS_KEPT` finished runs per pipeline.
    fn trim_runs(&mut self, pipeline: &str) {
        let finished: Vec<u64> = self.pipeline_runs.values().filter(|r| r.pipeline == pipeline && r.state != RUNNING).map(|r| r.seq).collect();
        for seq in finished.iter().take(finished.len().saturating_sub(RUNS_KEPT)) {
            if let Some(r) = self.pipeline_runs.remove(seq) {
                self.run_ids.remove(&r.id);
            }
        }
    }

    pub fn pipeline(&self, name: &str) -> Option<&PipelineInfo> {
        self.pipelines.get(name)
    }

    pub fn pipeline_run(&self, id: &str) -> Option<&PipelineRun> {
        self.run_ids.get(id).and_then(|s| self.pipeline_runs.get(s))
    }

    pub fn pipeline_runs(&self) -> impl Iterator<Item = &PipelineRun> {
        self.pipeline_runs.values()
    }

    pub fn pipelines_page(&self, page: usize) -> (Vec<PipelineInfo>, String) {
        let (range, next) = page_range(self.pipelines.len(), page);
        (self.pipelines.values().skip(range.start).take(range.len()).rev().cloned().collect(), next)
    }

    /// One page of runs (of one pipeline, or all), newest first.
    pub fn pipeline_runs_page(&self, pipeline: &str, page: usize) -> (Vec<PipelineRun>, String) {
        let runs: Vec<&PipelineRun> = self.pipeline_runs.values().filter(|r| pipeline.is_empty() || r.pipeline == pipeline).collect();
        let (range, next) = page_range(runs.len(), page);
        (runs[range].iter().rev().map(|r| (*r).clone()).collect(), next)
    }
}

/// What a step's job hands on: its id, its model (a training job's final checkpoint), its
/// metrics, a batch job's output version.
fn job_outputs(job: &JobInfo) -> Vec<StepOutput> {
    let mut out = vec![StepOutput { key: "job".into(), value: job.id.to_string() }];
    let mut put = |k: &str, v: String| out.push(StepOutput { key: k.into(), value: v });
    if let Some(b) = job.batch.as_ref() {
        if b.output_version > 0 {
            put("output", format!("{}@{}", b.output_dataset, b.output_version));
        }
        if b.operator == "score" {
            if b.accuracy >= 0.0 && b.model_target_width == 0 {
                put("test_accuracy", number(b.accuracy));
            }
            for (k, v) in [("test_loss", b.test_loss), ("test_bpb", b.test_bpb), ("test_rmse", b.test_rmse), ("test_r2", b.test_r2)] {
                if let Some(v) = v {
                    put(k, number(v));
                }
            }
        }
    } else {
        put("model", format!("job:{}", job.id));
        let p = job.progress.clone().unwrap_or_default();
        put("step", job.checkpoints.last().map(|c| c.step).unwrap_or(p.step).to_string());
        if !job.registered_model.is_empty() {
            put("registered_model", job.registered_model.clone());
        }
        if p.test_accuracy >= 0.0 {
            put("test_accuracy", number(p.test_accuracy));
        }
        for (k, v) in [("test_loss", p.test_loss), ("test_bpb", p.test_bpb), ("test_rmse", p.test_rmse), ("test_r2", p.test_r2)] {
            if let Some(v) = v {
                put(k, number(v));
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

mod append;
mod cache;
mod gate;
#[cfg(test)]
mod tests;
