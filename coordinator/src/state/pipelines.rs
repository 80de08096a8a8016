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
        let spec = PipelineSpec::parse(&toml).map_err(ApplyError::invalid)?;
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
            p.description = spec.description.unwrap_or_default();
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
        let spec = PipelineSpec::parse(&p.spec_toml).map_err(ApplyError::invalid)?;
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
            let Some(s) = PipelineSpec::parse(&p.spec_toml).ok().and_then(|s| s.schedule) else { continue };
            let limit = if s.catchup == Catchup::All { s.max_catchup as usize } else { 1 };
            let slots = s.schedule().newest_slots(p.schedule_watermark_ms, now_ms, limit);
            let (Some(&first), Some(&last)) = (slots.first(), slots.last()) else { continue };
            let fire = |slots_ms: Vec<u64>, skip| shoal_proto::ScheduleFire { pipeline: p.name.clone(), slots_ms, skip };
            let _ = first;
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
        let spec = PipelineSpec::parse(&p.spec_toml).map_err(ApplyError::invalid)?;
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
        let spec = PipelineSpec::parse(&run.spec_toml).map_err(ApplyError::invalid)?;
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
        let seq = *self.run_ids.get(&t.run).ok_or_else(|| ApplyError::not_found(format!("there is no pipeline run {}", t.run)))?;
        let run = &self.pipeline_runs[&seq];
        let step = run.steps.iter().find(|s| s.name == t.step).ok_or_else(|| ApplyError::not_found(format!("run {} has no step {}", t.run, t.step)))?;
        if run.state != RUNNING || step.state != RUNNING || step.attempts != t.attempt {
            return Err(ApplyError::conflict(format!("step {} of run {} is not running attempt {}", t.step, t.run, t.attempt)));
        }
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
                let (ok, error, outputs) = (job.state() == JobState::Succeeded, job.error.clone(), job_outputs(job));
                let now = self.now_ms;
                let run = self.pipeline_runs.get_mut(&seq).expect("indexed");
                let Some(step) = run.steps.iter_mut().find(|s| s.name == job.pipeline_step) else { continue };
                // Fencing: only the current attempt's job settles the step.
                if run.state != RUNNING || step.state != RUNNING || step.job_id != job_id {
                    continue;
                }
                if ok {
                    step.state = SUCCEEDED.into();
                    step.error.clear();
                    step.outputs = outputs;
                    step.finished_unix_ms = now;
                } else {
                    let why = if error.is_empty() { format!("job {job_id} was {}", job.state().label()) } else { format!("job {job_id}: {error}") };
                    step.error = format!("attempt {}: {why}", step.attempts);
                    if step.attempts > step.retries {
                        step.state = FAILED.into();
                        step.finished_unix_ms = now;
                    } else {
                        // Started again by `advance_run`, as the next attempt.
                        step.state = PENDING.into();
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
        let spec = match PipelineSpec::parse(&run.spec_toml) {
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

    /// Starts attempt n+1 of `step`: renders it with the upstream outputs and submits its job
    /// (or, for a register step, does it here). A failure to start is a failed attempt.
    fn start_step(&mut self, index: u64, seq: u64, step: &Step) {
        let now = self.now_ms;
        let run = self.pipeline_runs.get_mut(&seq).expect("a run");
        let run_id = run.id.clone();
        let i = run.steps.iter().position(|s| s.name == step.name).expect("the spec's step");
        run.steps[i].attempts += 1;
        run.steps[i].started_unix_ms = now;
        // The previous attempt's error stays until this one ends.
        run.steps[i].state = RUNNING.into();
        let outputs: BTreeMap<String, Vec<StepOutput>> = run.steps.iter().map(|s| (s.name.clone(), s.outputs.clone())).collect();
        let value = |r: &OutputRef| outputs.get(&r.step).and_then(|o| o.iter().find(|x| x.key == r.output)).map(|o| o.value.clone());
        let started: Result<Option<u64>, String> = match step.render(&value) {
            Err(e) => Err(e.to_string()),
            Ok(text) if matches!(step.kind, StepKind::Register | StepKind::Validate) => {
                let done = if step.kind == StepKind::Register { self.register_step(index, &text) } else { self.validate_step(&text) };
                done.map(|outputs| {
                    let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
                    s.outputs = outputs;
                    None
                })
            }
            Ok(text) => match self.submit(text) {
                Ok(job) => {
                    let j = self.jobs.get_mut(&job.id).expect("just submitted");
                    (j.pipeline_run, j.pipeline_step) = (run_id, step.name.clone());
                    Ok(Some(job.id))
                }
                Err(e) => Err(e.to_string()),
            },
        };
        let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
        match started {
            Ok(Some(job)) => {
                s.job_id = job;
                s.jobs.push(job);
            }
            Ok(None) => {
                s.state = SUCCEEDED.into();
                s.finished_unix_ms = now;
            }
            Err(e) => {
                s.error = format!("attempt {}: {e}", s.attempts);
                s.job_id = 0;
                // A failure to start is final when out of attempts; else the loop in
                // `advance_with` starts the next attempt.
                s.state = if s.attempts > s.retries { FAILED.into() } else { PENDING.into() };
                if s.state == FAILED {
                    s.finished_unix_ms = now;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::super::tests::{cmd, commit, outcome, spec, with_dataset};
    use super::*;
    use shoal_proto::{JobAssigned, UpdateProgress};

    /// train -> register (when accuracy >= 0.5) -> evaluate the registered model; `extra` is
    /// appended to the train step.
    fn pipeline(extra: &str) -> String {
        let train = spec(2).lines().map(|l| if l.starts_with('[') { format!("[step.spec.{}", &l[1..]) } else { l.to_string() }).collect::<Vec<_>>().join("\n");
        format!(
            "name = \"p\"\n[[step]]\nname = \"train\"\nkind = \"train\"\n{extra}\n[step.spec]\n{train}\n\
             [[step]]\nname = \"reg\"\nkind = \"register\"\nneeds = [\"train\"]\nwhen = \"steps.train.test_accuracy >= 0.5\"\nmodel = \"{{steps.train.model}}\"\nas = \"m\"\nalias = \"candidate\"\n\
             [[step]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"reg\"]\nmodel = \"{{steps.reg.model}}\"\ndataset = \"d@1\"\nrecords = [80, 100]\n"
        )
    }

    fn submit_and_run(sm: &mut StateMachine, text: &str) -> PipelineRun {
        let ApplyOutput::Pipeline(p) = sm.apply(10, cmd(command::Kind::SubmitPipeline(text.into()))).unwrap() else { panic!() };
        let ApplyOutput::PipelineRun(run) = sm.apply(11, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: p.name.clone(), request_id: String::new() }))).unwrap() else { panic!() };
        *run
    }

    fn step<'a>(sm: &'a StateMachine, run: &str, name: &str) -> &'a StepRun {
        sm.pipeline_run(run).unwrap().steps.iter().find(|s| s.name == name).unwrap()
    }

    /// Runs job `id` to success on the idle workers with `accuracy`.
    fn succeed(sm: &mut StateMachine, index: u64, id: u64, accuracy: f64) {
        let (job, generation, workers) = sm.next_placement(|_| true).unwrap();
        assert_eq!(job, id);
        sm.apply(index, cmd(command::Kind::JobAssigned(JobAssigned { job_id: id, generation, workers: workers.clone(), last_step: 0 }))).unwrap();
        let progress = JobProgress { step: 10, total_steps: 10, test_accuracy: accuracy, ..Default::default() };
        sm.apply(index + 1, cmd(command::Kind::UpdateProgress(UpdateProgress { job_id: id, generation, progress: Some(progress) }))).unwrap();
        commit(sm, index + 2, id, generation, 10).unwrap();
        for w in &workers {
            outcome(sm, index + 3, id, generation, w, "same");
        }
        assert_eq!(sm.job(id).unwrap().state(), JobState::Succeeded);
    }

    #[test]
    fn steps_start_when_their_upstream_succeeds_with_its_outputs_exactly_once() {
        let mut sm = with_dataset();
        let run = submit_and_run(&mut sm, &pipeline(""));
        assert_eq!(run.id, "p-1");
        let train = step(&sm, "p-1", "train").clone();
        assert_eq!((train.state.as_str(), train.attempts), (RUNNING, 1));
        assert_eq!(step(&sm, "p-1", "reg").state, PENDING);
        let job = sm.job(train.job_id).unwrap();
        assert_eq!((job.pipeline_run.as_str(), job.pipeline_step.as_str()), ("p-1", "train"));
        succeed(&mut sm, 20, train.job_id, 0.75);
        // In the same apply: train settled, reg registered the model, eval's job submitted.
        let train = step(&sm, "p-1", "train");
        assert_eq!(train.state, SUCCEEDED);
        assert_eq!(output(train, "model").unwrap(), format!("job:{}", train.job_id));
        assert_eq!(output(train, "test_accuracy").unwrap(), "0.75");
        let reg = step(&sm, "p-1", "reg");
        assert_eq!((reg.state.as_str(), output(reg, "model").as_deref()), (SUCCEEDED, Some("m@1")));
        let m = sm.model_page("m", 0).unwrap();
        assert_eq!(m.aliases[0].alias, "candidate");
        let eval = step(&sm, "p-1", "eval").clone();
        assert_eq!(eval.state, RUNNING);
        let batch = sm.job(eval.job_id).unwrap();
        assert_eq!(batch.batch.as_ref().unwrap().model, "m@1");
        assert!(batch.batch.as_ref().unwrap().output_dataset.is_empty(), "evaluate writes nothing");
        // Another entry that ends nothing changes nothing; the run goes on.
        assert_eq!(sm.pipeline_run("p-1").unwrap().state, RUNNING);
        // Cancelling the run stops the evaluation's job and cancels the run.
        let ApplyOutput::PipelineRun(r) = sm.apply(40, cmd(command::Kind::CancelPipelineRun("p-1".into()))).unwrap() else { panic!() };
        assert_eq!(r.state, CANCELLED);
        assert_eq!(sm.job(eval.job_id).unwrap().state(), JobState::Cancelled);
        assert_eq!(step(&sm, "p-1", "eval").state, CANCELLED);
        assert!(sm.apply(41, cmd(command::Kind::CancelPipelineRun("p-1".into()))).is_err());
    }

    #[test]
    fn a_false_condition_skips_the_step_and_what_needs_it() {
        let mut sm = with_dataset();
        submit_and_run(&mut sm, &pipeline(""));
        let job = step(&sm, "p-1", "train").job_id;
        succeed(&mut sm, 20, job, 0.25);
        let run = sm.pipeline_run("p-1").unwrap();
        assert_eq!(step(&sm, "p-1", "reg").state, SKIPPED);
        assert_eq!(step(&sm, "p-1", "eval").state, SKIPPED);
        assert!(step(&sm, "p-1", "eval").reason.contains("\"reg\""));
        assert_eq!(run.state, SUCCEEDED);
        assert!(sm.models().next().is_none());
    }

    #[test]
    fn a_failed_attempt_retries_and_an_old_attempts_job_settles_nothing() {
        let mut sm = with_dataset();
        submit_and_run(&mut sm, &pipeline("retries = 1\ntimeout_s = 60"));
        let first = step(&sm, "p-1", "train").job_id;
        // A timeout for another attempt is refused; the right one fails the job.
        let timeout = |attempt| cmd(command::Kind::PipelineStepTimeout(PipelineStepTimeout { run: "p-1".into(), step: "train".into(), attempt }));
        assert!(sm.apply(20, timeout(2)).is_err());
        sm.apply(21, timeout(1)).unwrap();
        assert_eq!(sm.job(first).unwrap().state(), JobState::Failed);
        let train = step(&sm, "p-1", "train").clone();
        assert_eq!((train.state.as_str(), train.attempts, train.jobs.len()), (RUNNING, 2, 2));
        assert!(train.error.contains("timeout_s = 60"), "{}", train.error);
        assert_ne!(train.job_id, first);
        // The second attempt fails too: out of retries, the run fails naming the step.
        sm.apply(22, cmd(command::Kind::CancelJob(train.job_id))).unwrap();
        let run = sm.pipeline_run("p-1").unwrap();
        assert_eq!((run.state.as_str(), step(&sm, "p-1", "train").state.as_str()), (FAILED, FAILED));
        assert!(run.error.starts_with("step train failed"), "{}", run.error);
        assert_eq!(step(&sm, "p-1", "reg").state, PENDING);

        // Resumed: the failed step runs again as attempt 3 with its retries renewed.
        let resume = |from: &str| cmd(command::Kind::ResumePipelineRun(shoal_proto::ResumePipelineRequest { id: "p-1".into(), from: from.into(), request_id: String::new() }));
        assert!(sm.apply(23, resume("nope")).is_err());
        sm.apply(24, resume("")).unwrap();
        let train = step(&sm, "p-1", "train").clone();
        assert_eq!((train.state.as_str(), train.attempts, train.retries), (RUNNING, 3, 3));
        assert!(sm.apply(25, resume("")).is_err(), "a running run is not resumed");
        succeed(&mut sm, 30, train.job_id, 0.75);
        let eval = step(&sm, "p-1", "eval").clone();
        sm.apply(40, cmd(command::Kind::CancelJob(eval.job_id))).unwrap();
        assert_eq!(sm.pipeline_run("p-1").unwrap().state, FAILED);
        // Only the failed step runs again; the others keep their outputs as they were.
        let (train, reg) = (step(&sm, "p-1", "train").clone(), step(&sm, "p-1", "reg").clone());
        sm.apply(41, resume("")).unwrap();
        assert_eq!((step(&sm, "p-1", "train"), step(&sm, "p-1", "reg")), (&train, &reg));
        let again = step(&sm, "p-1", "eval").clone();
        assert_eq!((again.state.as_str(), again.attempts), (RUNNING, 2));
        assert_ne!(again.job_id, eval.job_id);
        // The old attempt's job ending now (a duplicate cancel is refused; none can settle it).
        assert!(sm.apply(42, cmd(command::Kind::CancelJob(eval.job_id))).is_err());
        // --from a step that succeeded: it and everything downstream run again.
        sm.apply(43, cmd(command::Kind::CancelPipelineRun("p-1".into()))).unwrap();
        sm.apply(44, resume("train")).unwrap();
        let run = sm.pipeline_run("p-1").unwrap();
        assert_eq!(run.resumes, 3);
        let states: Vec<&str> = run.steps.iter().map(|s| s.state.as_str()).collect();
        assert_eq!(states, [RUNNING, PENDING, PENDING]);
        assert_eq!(step(&sm, "p-1", "train").attempts, 4);
    }

    #[test]
    fn a_step_that_cannot_start_fails_and_the_spec_is_versioned() {
        let mut sm = with_dataset();
        // The dataset does not exist: the train step cannot submit its job.
        let text = pipeline("").replace("name = \"d\"", "name = \"nope\"");
        let run = submit_and_run(&mut sm, &text);
        assert_eq!(run.state, FAILED);
        assert!(run.steps[0].error.contains("does not exist"), "{}", run.steps[0].error);
        assert_eq!(sm.jobs().count(), 0);
        // The same spec again keeps its version; another is the next one.
        let ApplyOutput::Pipeline(p) = sm.apply(30, cmd(command::Kind::SubmitPipeline(text.clone()))).unwrap() else { panic!() };
        assert_eq!((p.version, p.runs_started), (1, 1));
        let ApplyOutput::Pipeline(p) = sm.apply(31, cmd(command::Kind::SubmitPipeline(pipeline("")))).unwrap() else { panic!() };
        assert_eq!(p.version, 2);
        let ApplyOutput::PipelineRun(r) = sm.apply(32, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "p".into(), request_id: String::new() }))).unwrap() else { panic!() };
        assert_eq!((r.id.as_str(), r.version, r.state.as_str()), ("p-2", 2, RUNNING));
        // Runs survive a snapshot.
        let back = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
        assert_eq!(back.state_hash(), sm.state_hash());
        assert_eq!(back.pipeline_run("p-2").unwrap(), sm.pipeline_run("p-2").unwrap());
        assert!(sm.apply(33, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "q".into(), request_id: String::new() }))).is_err());
    }

    /// Appends `records` records to dataset d (the next version) at `index`.
    fn append(sm: &mut StateMachine, index: u64, records: u64) -> u64 {
        append_at(sm, index, records, 0)
    }

    fn append_at(sm: &mut StateMachine, index: u64, records: u64, ms: u64) -> u64 {
        let mut ds = sm.dataset_view("d", 0, crate::state::DatasetView::Shards).unwrap();
        (ds.stats, ds.append, ds.version, ds.records) = (None, true, 0, records);
        ds.slices.clear();
        ds.shards = vec![shoal_proto::ShardInfo { path: format!("datasets/d/import-{index}/shard-00000.safetensors"), records, blake3: "h".into(), bytes: 1 }];
        let c = Command { kind: Some(command::Kind::RegisterDataset(ds)), proposed_unix_ms: ms, ..Default::default() };
        let ApplyOutput::Dataset(d) = sm.apply(index, c).unwrap() else { panic!() };
        d.version
    }

    fn with_trigger(trigger: &str) -> String {
        pipeline("").replacen("name = \"p\"\n", &format!("name = \"p\"\n[trigger]\non_append = \"d\"\n{trigger}\n"), 1)
    }

    #[test]
    fn an_append_starts_one_run_for_its_versions_in_its_own_apply() {
        let mut sm = with_dataset();
        sm.apply(10, cmd(command::Kind::SubmitPipeline(with_trigger("min_new_records = 30")))).unwrap();
        // Version 1 was there before the trigger: it never runs for it.
        assert_eq!(sm.pipeline_runs().count(), 0);
        assert_eq!(append(&mut sm, 11, 20), 2);
        assert_eq!(sm.pipeline_runs().count(), 0, "20 new records are fewer than 30");
        assert_eq!(append(&mut sm, 12, 20), 3);
        let runs: Vec<(String, String)> = sm.pipeline_runs().map(|r| (r.id.clone(), r.cause.clone())).collect();
        assert_eq!(runs, [("p@d-v2-v3".to_string(), "append d v2..v3".to_string())]);
        // The train step's job pinned the newest version.
        let job = sm.job(sm.pipeline_run("p@d-v2-v3").unwrap().steps[0].job_id).unwrap();
        assert_eq!(job.dataset_version, 3);
        // A leader's proposal for a range already run is refused and starts nothing.
        let t = |from, to| cmd(command::Kind::PipelineTriggered(shoal_proto::PipelineTriggered { pipeline: "p".into(), from_version: from, to_version: to }));
        assert!(sm.apply(13, t(2, 3)).is_err());
        assert_eq!(sm.pipeline_runs().count(), 1);
        assert_eq!(append(&mut sm, 14, 40), 4);
        assert_eq!(sm.pipeline_run("p@d-v4").unwrap().cause, "append d v4..v4");
        // Submitting the same spec again keeps the watermark; nothing runs twice.
        sm.apply(15, cmd(command::Kind::SubmitPipeline(with_trigger("min_new_records = 30")))).unwrap();
        assert_eq!(sm.pipelines["p"].trigger_watermark, 4);
    }

    #[test]
    fn a_debounced_trigger_runs_once_the_dataset_is_quiet_for_the_range_it_proposes() {
        let mut sm = with_dataset();
        let at = |_index: u64, ms, kind| Command { kind: Some(kind), proposed_unix_ms: ms, ..Default::default() };
        sm.apply(10, at(10, 1_000, command::Kind::SubmitPipeline(with_trigger("debounce_s = 5")))).unwrap();
        assert!(sm.due_triggers(100_000).is_empty());
        for (i, ms) in [(11, 2_000), (12, 4_000), (13, 6_000)] {
            append_at(&mut sm, i, 10, ms);
        }
        assert_eq!(sm.pipeline_runs().count(), 0, "a debounced trigger waits");
        assert!(sm.due_triggers(10_999).is_empty(), "quiet for less than 5 s since the last append");
        let due = sm.due_triggers(11_000);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].from_version, due[0].to_version), (2, 4));
        // The proposal applied twice (a retried or repeated one) starts one run.
        sm.apply(14, at(14, 11_000, command::Kind::PipelineTriggered(due[0].clone()))).unwrap();
        assert!(sm.apply(15, at(15, 11_100, command::Kind::PipelineTriggered(due[0].clone()))).is_err());
        let ids: Vec<&str> = sm.pipeline_runs().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["p@d-v2-v4"]);
        assert!(sm.due_triggers(60_000).is_empty());
    }

    /// A per-second schedule whose step fails at once (so runs never overlap), run by the
    /// leader duties on a simulated clock through 100 leader changes, each after a random
    /// outage of 0-8 s; proposals are lost, delayed and duplicated on the way to the log.
    /// Returns (the runs' slots, the slots that passed, the slots inside outages).
    fn schedule_sim(catchup: &str, seed: u64) -> (Vec<u64>, Vec<u64>, Vec<Vec<u64>>, u64) {
        use crate::leader::{Action, Duties, GroupView};
        let mut rng = shoal_core::rng::SplitMix64::new(seed);
        let mut sm = with_dataset();
        let t0 = 1_800_000_000_000u64;
        let text = format!(
            "name = \"s\"\n[schedule]\ncron = \"* * * * * *\"\ncatchup = \"{catchup}\"\nmax_catchup = 100\nconcurrency = \"allow\"\n\
             [[step]]\nname = \"r\"\nkind = \"register\"\nmodel = \"job:999\"\nas = \"m\"\n"
        );
        let mut index = 100;
        sm.apply(index, Command { kind: Some(command::Kind::SubmitPipeline(text)), proposed_unix_ms: t0, ..Default::default() }).unwrap();
        let peers = BTreeMap::new();
        let group = GroupView::default();
        let mut duties = Duties::default();
        // (apply at this tick, command)
        let mut delayed: Vec<(u64, Command)> = Vec::new();
        let (mut outages, mut down_until, mut kills) = (Vec::new(), 0u64, 0);
        // Runs as they are created (the state keeps only a pipeline's newest 100 finished).
        let mut runs: Vec<u64> = Vec::new();
        let end = t0 + 900_000;
        let mut now = t0;
        while now < end {
            now += 100;
            // The last minute is calm, so a catch-up can finish before the checks.
            if now >= down_until && kills < 100 && now < end - 60_000 && rng.below(15) == 0 {
                // The leader dies: its queued proposals may still commit; a new leader
                // takes over after an outage with fresh duties.
                kills += 1;
                let outage = rng.below(9) * 1000;
                down_until = now + outage;
                // The slots that come due while no leader proposes (whole seconds in
                // (now, down_until]).
                outages.push((now / 1000 + 1..=down_until / 1000).map(|s| s * 1000).collect::<Vec<u64>>());
                duties = Duties::default();
            }
            if now >= down_until {
                for a in duties.tick(now, now, 2_000, &peers, &sm, &group) {
                    let Action::Propose(kind) = a else { continue };
                    let c = Command { kind: Some(kind), proposed_unix_ms: now, ..Default::default() };
                    match rng.below(10) {
                        0 => {}
                        1 => delayed.push((now + rng.below(30) * 100, c)),
                        2 => {
                            delayed.push((now + rng.below(30) * 100, c.clone()));
                            delayed.push((now, c));
                        }
                        _ => delayed.push((now, c)),
                    }
                }
            }
            delayed.sort_by_key(|(t, _)| *t);
            while delayed.first().is_some_and(|(t, _)| *t <= now) {
                let (_, c) = delayed.remove(0);
                index += 1;
                let before = sm.next_run_seq;
                let _ = sm.apply(index, c);
                runs.extend(sm.pipeline_runs().filter(|r| r.seq > before).map(|r| chrono_ms(r.cause.trim_start_matches("schedule "))));
            }
        }
        let passed: Vec<u64> = (t0 / 1000 + 1..=(end - 5_000) / 1000).map(|s| s * 1000).collect();
        let runs: Vec<u64> = runs.into_iter().filter(|s| *s <= end - 5_000).collect();
        assert_eq!(kills, 100, "seed {seed}: {kills} leader changes");
        (runs, passed, outages, sm.pipeline("s").unwrap().slots_skipped)
    }

    fn chrono_ms(label: &str) -> u64 {
        let (date, time) = label.trim_end_matches('Z').split_once('T').unwrap();
        let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
        let t: Vec<i64> = time.split(':').map(|x| x.parse().unwrap()).collect();
        // Days from civil (Howard Hinnant's algorithm).
        let (y, m, dd) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + dd - 1;
        let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
        ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000) as u64
    }

    #[test]
    fn a_per_second_schedule_runs_each_slot_once_through_a_hundred_leader_changes() {
        for seed in 0..3 {
            // all: every slot runs once, none missing, also those inside an outage.
            let (runs, passed, outages, _) = schedule_sim("all", seed);
            let set: BTreeSet<u64> = runs.iter().copied().collect();
            assert_eq!(set.len(), runs.len(), "seed {seed}: a slot ran twice");
            assert!(runs.windows(2).all(|w| w[0] < w[1]), "seed {seed}: runs out of slot order");
            let missing: Vec<&u64> = passed.iter().filter(|s| !set.contains(s)).collect();
            assert!(missing.is_empty(), "seed {seed}: catchup all missed {} slots: {missing:?}", missing.len());
            assert!(outages.iter().any(|o| o.len() >= 5), "seed {seed}: no long outage");

            // latest: once each; slots outside the outages run (but for those whose proposal
            // was lost and a newer slot came before it was proposed again); of an outage's
            // slots at most the newest.
            let (runs, passed, outages, skipped) = schedule_sim("latest", seed);
            let set: BTreeSet<u64> = runs.iter().copied().collect();
            assert_eq!(set.len(), runs.len(), "seed {seed}: a slot ran twice");
            assert!(runs.windows(2).all(|w| w[0] < w[1]), "seed {seed}: runs out of slot order");
            let inside: BTreeSet<u64> = outages.iter().flatten().copied().collect();
            let outside: Vec<&u64> = passed.iter().filter(|s| !inside.contains(s) && !inside.contains(&(*s - 1000))).collect();
            let ran = outside.iter().filter(|s| set.contains(s)).count();
            assert!(ran * 10 >= outside.len() * 8, "seed {seed}: latest ran {ran} of the {} slots outside outages", outside.len());
            let older: Vec<u64> = outages.iter().flat_map(|o| o.iter().rev().skip(1)).copied().filter(|s| set.contains(s)).collect();
            assert!(older.is_empty(), "seed {seed}: latest ran older missed slots {older:?}: outages {outages:?}, runs {runs:?}");
            assert!(skipped == 0, "latest skips by jumping the watermark, not by skip entries");

            // none: a missed slot never runs late (more than the grace after its time).
            let (runs, _, outages, _) = schedule_sim("none", seed);
            let set: BTreeSet<u64> = runs.iter().copied().collect();
            assert_eq!(set.len(), runs.len(), "seed {seed}: a slot ran twice");
            // Slots 6 s or more before an outage's end: past the grace when a leader came.
            let late: Vec<u64> = outages.iter().flat_map(|o| o.iter().rev().skip(6)).copied().filter(|s| set.contains(s)).collect();
            assert!(late.is_empty(), "seed {seed}: catchup none ran slots late: {late:?}");
        }
    }

    #[test]
    fn pause_unpause_and_an_edit_fire_nothing_extra_and_concurrency_decides_overlaps() {
        let mut sm = with_dataset();
        let at = |ms: u64, kind| Command { kind: Some(kind), proposed_unix_ms: ms, ..Default::default() };
        let t0 = 1_800_000_000_000u64;
        let spec = |cron: &str, concurrency: &str| {
            format!("name = \"s\"\n[schedule]\ncron = \"{cron}\"\nconcurrency = \"{concurrency}\"\n{}", pipeline("").trim_start_matches("name = \"p\"\n"))
        };
        sm.apply(1, at(t0, command::Kind::SubmitPipeline(spec("*/10 * * * * *", "forbid")))).unwrap();
        let fire = |slot: u64| command::Kind::ScheduleFire(shoal_proto::ScheduleFire { pipeline: "s".into(), slots_ms: vec![slot], skip: false });
        assert!(sm.apply(2, at(t0 + 5_000, fire(t0 + 10_000))).is_err(), "not due yet");
        assert!(sm.apply(3, at(t0 + 15_000, fire(t0 + 5_000))).is_err(), "not a slot");
        sm.apply(4, at(t0 + 10_100, fire(t0 + 10_000))).unwrap();
        assert!(sm.apply(5, at(t0 + 10_200, fire(t0 + 10_000))).is_err(), "a slot runs once");
        let first = sm.pipeline_run(&format!("s@{}", shoal_core::cron::slot_label(t0 + 10_000))).unwrap().clone();
        assert_eq!(first.state, RUNNING);
        // forbid: the next slot, while that run runs, is skipped.
        sm.apply(6, at(t0 + 20_000, fire(t0 + 20_000))).unwrap();
        assert_eq!((sm.pipeline_runs().count(), sm.pipeline("s").unwrap().slots_skipped), (1, 1));
        // Paused: nothing is due; unpaused: the slots that passed meanwhile never run.
        sm.apply(7, at(t0 + 21_000, command::Kind::PausePipeline(shoal_proto::PausePipelineRequest { name: "s".into(), paused: true, request_id: String::new() }))).unwrap();
        assert!(sm.due_schedules(t0 + 95_000).is_empty());
        assert!(sm.apply(8, at(t0 + 31_000, fire(t0 + 30_000))).is_err());
        sm.apply(9, at(t0 + 95_000, command::Kind::PausePipeline(shoal_proto::PausePipelineRequest { name: "s".into(), paused: false, request_id: String::new() }))).unwrap();
        assert!(sm.due_schedules(t0 + 99_000).is_empty(), "slots 30 s to 90 s passed while paused");
        assert_eq!(sm.due_schedules(t0 + 100_500).iter().map(|f| f.slots_ms.clone()).collect::<Vec<_>>(), [vec![t0 + 100_000]]);
        // replace: an edit (another concurrency, same cron) keeps the watermark; the next slot
        // cancels the running run and starts its own.
        sm.apply(10, at(t0 + 100_600, command::Kind::SubmitPipeline(spec("*/10 * * * * *", "replace")))).unwrap();
        sm.apply(11, at(t0 + 100_700, fire(t0 + 100_000))).unwrap();
        assert_eq!(sm.pipeline_run(&first.id).unwrap().state, CANCELLED);
        // An edit of the cron moves the watermark to the edit: nothing before it runs.
        sm.apply(12, at(t0 + 125_000, command::Kind::SubmitPipeline(spec("*/5 * * * * *", "queue")))).unwrap();
        assert!(sm.due_schedules(t0 + 125_000).is_empty());
        assert_eq!(sm.due_schedules(t0 + 130_000).iter().map(|f| f.slots_ms.clone()).collect::<Vec<_>>(), [vec![t0 + 130_000]]);
        // queue: the slot waits while a scheduled run runs (it stays due).
        assert_eq!(sm.apply(13, at(t0 + 130_100, fire(t0 + 130_000))).unwrap(), ApplyOutput::None);
        assert_eq!(sm.pipeline("s").unwrap().schedule_watermark_ms, t0 + 125_000);
        assert_eq!(sm.due_schedules(t0 + 130_200).len(), 1);
    }

    #[test]
    fn a_validate_step_checks_the_version_in_place_and_fails_naming_what() {
        let mut sm = with_dataset();
        let text = |min: u64| format!(
            "name = \"v\"\n[[step]]\nname = \"check\"\nkind = \"validate\"\ndataset = \"d\"\nmin_records = {min}\nclasses = 2\nfeature_shape = [4]\nmax_label_js = 0.1\n\
             [[step]]\nname = \"after\"\nkind = \"validate\"\nneeds = [\"check\"]\ndataset = \"{{steps.check.dataset}}\"\n"
        );
        let run = submit_and_run(&mut sm, &text(50));
        assert_eq!(run.state, SUCCEEDED, "{run:?}");
        assert_eq!(output(&run.steps[0], "dataset").as_deref(), Some("d@1"));
        assert_eq!(output(&run.steps[1], "records").as_deref(), Some("100"));
        let ApplyOutput::Pipeline(_) = sm.apply(20, cmd(command::Kind::SubmitPipeline(text(1000)))).unwrap() else { panic!() };
        let ApplyOutput::PipelineRun(run) = sm.apply(21, cmd(command::Kind::RunPipeline(RunPipelineRequest { name: "v".into(), request_id: String::new() }))).unwrap() else { panic!() };
        assert_eq!(run.state, FAILED);
        assert!(run.error.contains("d@1 has 100 records, fewer than min_records = 1000"), "{}", run.error);
        assert!(PipelineSpec::parse(&text(5).replace("max_label_js = 0.1", "max_label_js = 2.0")).unwrap_err().to_string().contains("max_label_js"));
    }
}
