//! The content-addressed step cache. A cacheable step's key is the blake3 of its kind, its keys
//! with references replaced (less `cache_ignore`), the digests of what it reads (the dataset
//! version's shards, the checkpoint it starts from or scores, a fitted transform, a holdout)
//! and the shoal build. All of it comes from the replicated state, so every replica computes
//! the same key in the apply that starts the step. A succeeded attempt leaves an entry: its
//! outputs and the artifacts (store path and blake3) that must still verify for a hit. Reading
//! the store is not for apply: a possible hit with artifacts waits ("verifying") for the
//! leader, which reads them and proposes a verdict; a failed check makes it a miss.

use shoal_core::pipeline::{OutputRef, Step, StepKind};
use shoal_proto::{CheckpointManifest, PipelineCacheEntry, PipelineCacheVerdict, PipelineFileDigests, ShardInfo, StepOutput, StepPlan};

use super::*;

#[cfg(test)]
mod tests;

/// Cache entries kept (the oldest go first).
pub const CACHE_KEPT: usize = 4096;

/// `cache` of a step attempt.
pub const CACHE_OFF: &str = "off";
pub const CACHE_MISS: &str = "miss";
pub const CACHE_VERIFYING: &str = "verifying";
pub const CACHE_HIT: &str = "hit";
pub const CACHE_STALE: &str = "stale";
pub const CACHE_HASHING: &str = "hashing";

fn hex(h: blake3::Hash) -> String {
    h.to_hex().to_string()
}

/// A checkpoint's digest: over its files' names and hashes.
fn checkpoint_digest(m: &CheckpointManifest) -> String {
    let mut h = blake3::Hasher::new();
    for f in &m.files {
        h.update(f.name.as_bytes());
        h.update(b" ");
        h.update(f.blake3.as_bytes());
        h.update(b"\n");
    }
    format!("checkpoint job:{} step {} {}", m.job_id, m.step, hex(h.finalize()))
}

impl StateMachine {
    /// A dataset version's digest: over its shards' hashes, in record order.
    fn dataset_digest(&self, name: &str, version: u64) -> Result<String, String> {
        let d = self.dataset_view(name, version, DatasetView::Shards).ok_or_else(|| format!("there is no dataset {name} v{version}"))?;
        let mut h = blake3::Hasher::new();
        for s in &d.shards {
            h.update(s.blake3.as_bytes());
            h.update(b"\n");
        }
        Ok(format!("dataset {}@{} {}", d.name, d.version, hex(h.finalize())))
    }

    /// The digests of what a step reads, once rendered: an error where its job could not be
    /// submitted either (the submission then names the problem).
    fn step_inputs(&self, step: &Step, value: &dyn Fn(&OutputRef) -> Option<String>) -> Result<Vec<String>, String> {
        let text = step.render(value).map_err(|e| e.to_string())?;
        let mut inputs = Vec::new();
        match step.kind {
            StepKind::Train => {
                let (spec, ds) = self.check_submission(&text).map_err(|e| e.to_string())?;
                inputs.push(self.dataset_digest(&ds.name, ds.version)?);
                if let (Some(m), _) = self.warm_start(&spec).map_err(|e| e.to_string())? {
                    inputs.push(checkpoint_digest(&m));
                }
                if let Some(p) = &spec.promote {
                    let (name, version) = p.holdout_ref().map_err(|e| e.to_string())?;
                    inputs.push(self.dataset_digest(&name, version.unwrap_or(0))?);
                }
            }
            StepKind::Batch | StepKind::Evaluate => {
                let job = self.check_batch(&text).map_err(|e| e.to_string())?;
                inputs.push(self.dataset_digest(&job.dataset_name, job.dataset_version)?);
                if let Some(m) = &job.init {
                    inputs.push(checkpoint_digest(m));
                }
                if let Some(t) = job.batch.as_ref().and_then(|b| b.transform.as_ref()) {
                    let mut h = blake3::Hasher::new();
                    for x in t.shift.iter().chain(&t.scale) {
                        h.update(&x.to_le_bytes());
                    }
                    inputs.push(format!("transform {} {} {}", t.method, t.fitted_on, hex(h.finalize())));
                }
            }
            _ => return Err(format!("{} steps are never cached", step.kind.label())),
        }
        Ok(inputs)
    }

    /// The step's cache key and input digests, for the shoal `build`.
    pub(super) fn cache_key(&self, step: &Step, value: &dyn Fn(&OutputRef) -> Option<String>, build: &str) -> Result<(String, Vec<String>), String> {
        let material = step.cache_material(value).map_err(|e| e.to_string())?;
        let inputs = self.step_inputs(step, value)?;
        let mut h = blake3::Hasher::new();
        h.update(b"shoal pipeline step cache v1\n");
        h.update(material.as_bytes());
        for i in &inputs {
            h.update(b"\ninput ");
            h.update(i.as_bytes());
        }
        h.update(b"\nbuild ");
        h.update(build.as_bytes());
        Ok((hex(h.finalize()), inputs))
    }

    /// The files an `exec` batch step's command names (hashed into its key once it starts).
    pub(super) fn exec_files(&self, step: &Step, value: &dyn Fn(&OutputRef) -> Option<String>) -> Vec<String> {
        if step.kind != StepKind::Batch {
            return Vec::new();
        }
        let spec = step.render(value).ok().and_then(|t| shoal_core::batch::BatchSpec::parse(&t).ok());
        spec.filter(|s| s.operator.kind == "exec").map(|s| s.named_files()).unwrap_or_default()
    }

    /// Looks step `i`'s key up: a hit with nothing to verify succeeds now, one with artifacts
    /// waits for the leader's verdict (true for both); a miss (or `enabled` false) is for the
    /// caller to launch (false).
    pub(super) fn cache_lookup(&mut self, seq: u64, i: usize, enabled: bool) -> bool {
        let now = self.now_ms;
        let key = self.pipeline_runs[&seq].steps[i].cache_key.clone();
        let hit = if enabled { self.cache_entry(&key).cloned() } else { None };
        let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
        s.cache = if enabled { CACHE_MISS.into() } else { CACHE_OFF.into() };
        let Some(e) = hit else { return false };
        s.cached_from = format!("{}/{} (job {})", e.run, e.step, e.job_id);
        if e.artifacts.is_empty() {
            (s.state, s.cache, s.outputs, s.finished_unix_ms) = (SUCCEEDED.into(), CACHE_HIT.into(), e.outputs, now);
            s.error.clear();
        } else {
            s.cache = CACHE_VERIFYING.into();
        }
        true
    }

    /// Exec steps waiting for the leader to hash the files their commands name.
    pub fn hash_checks(&self) -> Vec<(PipelineFileDigests, Vec<String>)> {
        self.waiting_steps(|s| s.cache == CACHE_HASHING)
            .into_iter()
            .map(|(run, s)| (PipelineFileDigests { run: run.id.clone(), step: s.name.clone(), attempt: s.attempts, digests: Vec::new() }, s.hashing.clone()))
            .collect()
    }

    /// The leader's digests of an exec step's files: they complete its key, then the lookup
    /// and the launch go as for any step.
    pub(crate) fn pipeline_file_digests(&mut self, index: u64, d: PipelineFileDigests) -> ApplyResult {
        let (seq, i) = self.current_attempt(&d.run, &d.step, d.attempt, |s| s.cache == CACHE_HASHING, "waiting for file digests in")?;
        let run = &self.pipeline_runs[&seq];
        let s = &run.steps[i];
        if d.digests.len() != s.hashing.len() || !d.digests.iter().zip(&s.hashing).all(|(dg, f)| dg.strip_prefix(f.as_str()).is_some_and(|r| r.starts_with(' '))) {
            return Err(ApplyError::invalid(format!("digests {:?} are not of the files {:?}", d.digests, s.hashing)));
        }
        let spec = self.specs.parse(&run.spec_toml).map_err(ApplyError::invalid)?;
        let step = spec.steps.get(i).cloned().ok_or_else(|| ApplyError::invalid("the run's spec and its steps disagree"))?;
        let s = &mut self.pipeline_runs.get_mut(&seq).expect("looked up").steps[i];
        let mut h = blake3::Hasher::new();
        h.update(s.cache_key.as_bytes());
        for dg in &d.digests {
            h.update(b"\nfile ");
            h.update(dg.as_bytes());
        }
        s.cache_key = hex(h.finalize());
        s.inputs.extend(d.digests.iter().map(|dg| format!("file {dg}")));
        s.hashing.clear();
        if !self.cache_lookup(seq, i, true) {
            self.launch_step(index, seq, i, &step);
        }
        self.advance_run(index, seq);
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone())))
    }

    /// The entry for `key` if what it points at is still in the state (its job succeeded and
    /// is kept, its checkpoint or output version too); whether its files are intact is the
    /// leader's check.
    pub(super) fn cache_entry(&self, key: &str) -> Option<&PipelineCacheEntry> {
        let e = self.pipeline_cache.get(key)?;
        let job = self.jobs.get(&e.job_id).filter(|j| j.state() == JobState::Succeeded)?;
        let intact = match job.batch.as_ref() {
            None => job.checkpoints.last().is_some(),
            Some(b) if b.output_version > 0 => self.version_records(&b.output_dataset, b.output_version).is_some(),
            Some(_) => true,
        };
        intact.then_some(e)
    }

    /// What must still verify for a hit on `job`'s outputs: a training job's final
    /// checkpoint files, a batch job's output shards.
    fn artifacts_of(&self, job: &JobInfo) -> Vec<ShardInfo> {
        match job.batch.as_ref() {
            None => job
                .checkpoints
                .last()
                .map(|m| m.files.iter().map(|f| ShardInfo { path: format!("{}/{}", m.dir, f.name), blake3: f.blake3.clone(), bytes: f.bytes, records: 0 }).collect())
                .unwrap_or_default(),
            Some(b) if b.output_version > 0 => {
                let prefix = format!("{}/", b.output_folder);
                self.dataset_view(&b.output_dataset, b.output_version, DatasetView::Shards)
                    .map(|d| d.shards.into_iter().filter(|s| s.path.starts_with(&prefix)).collect())
                    .unwrap_or_default()
            }
            Some(_) => Vec::new(),
        }
    }

    /// A step that ran a job and succeeded leaves its outputs for the next attempt with its key.
    pub(super) fn remember_step(&mut self, index: u64, seq: u64, i: usize, job_id: u64) {
        let run = &self.pipeline_runs[&seq];
        let s = &run.steps[i];
        if s.cache_key.is_empty() || !matches!(s.cache.as_str(), CACHE_MISS | CACHE_STALE) {
            return;
        }
        let Some(job) = self.jobs.get(&job_id) else { return };
        let entry = PipelineCacheEntry {
            key: s.cache_key.clone(),
            pipeline: run.pipeline.clone(),
            run: run.id.clone(),
            step: s.name.clone(),
            job_id,
            outputs: s.outputs.clone(),
            artifacts: self.artifacts_of(job),
            created_index: index,
        };
        self.pipeline_cache.insert(entry.key.clone(), entry);
        while self.pipeline_cache.len() > CACHE_KEPT {
            let oldest = self.pipeline_cache.values().min_by_key(|e| e.created_index).map(|e| e.key.clone()).expect("not empty");
            self.pipeline_cache.remove(&oldest);
        }
    }

    /// Steps waiting for the leader to read their cached artifacts: (run, step, attempt, key,
    /// artifacts).
    pub fn cache_checks(&self) -> Vec<(PipelineCacheVerdict, Vec<ShardInfo>)> {
        self.waiting_steps(|s| s.cache == CACHE_VERIFYING)
            .into_iter()
            .map(|(run, s)| {
                let artifacts = self.pipeline_cache.get(&s.cache_key).map(|e| e.artifacts.clone()).unwrap_or_default();
                (PipelineCacheVerdict { run: run.id.clone(), step: s.name.clone(), attempt: s.attempts, key: s.cache_key.clone(), ok: false, detail: String::new() }, artifacts)
            })
            .collect()
    }

    /// The leader's verdict on a possible hit: the cached outputs, or (artifacts gone or
    /// changed, or the entry gone meanwhile) a miss: the entry goes and the step's job starts.
    pub(crate) fn pipeline_cache_verdict(&mut self, index: u64, v: PipelineCacheVerdict) -> ApplyResult {
        let (seq, i) = self.current_attempt(&v.run, &v.step, v.attempt, |s| s.cache == CACHE_VERIFYING && s.cache_key == v.key, "verifying")?;
        let run = &self.pipeline_runs[&seq];
        let spec = self.specs.parse(&run.spec_toml).map_err(ApplyError::invalid)?;
        let step = spec.step(&v.step).cloned().ok_or_else(|| ApplyError::invalid(format!("the run's spec has no step {}", v.step)))?;
        let entry = self.cache_entry(&v.key).cloned();
        let now = self.now_ms;
        let s = &mut self.pipeline_runs.get_mut(&seq).expect("looked up").steps[i];
        match (v.ok, entry) {
            (true, Some(e)) => {
                (s.state, s.cache, s.outputs, s.finished_unix_ms) = (SUCCEEDED.into(), CACHE_HIT.into(), e.outputs, now);
                s.error.clear();
            }
            (ok, _) => {
                s.cache = CACHE_STALE.into();
                s.reason = if ok { "cache: the entry went while its artifacts were read".into() } else { format!("cache: {}", v.detail) };
                self.pipeline_cache.remove(&v.key);
                self.launch_step(index, seq, i, &step);
            }
        }
        self.advance_run(index, seq);
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone())))
    }

    /// What a run of `spec` would do now, step by step, without running anything: each
    /// step's key and whether it would hit (the API then reads a predicted hit's artifacts).
    pub fn plan_pipeline(&self, spec: &PipelineSpec, build: &str) -> (Vec<StepPlan>, Vec<Vec<ShardInfo>>) {
        let mut predicted: BTreeMap<String, Vec<StepOutput>> = BTreeMap::new();
        // Steps whose outputs are not known before the run (they will run, or be skipped).
        let mut unknown: BTreeMap<String, String> = BTreeMap::new();
        let mut plans = Vec::new();
        let mut artifacts = Vec::new();
        for step in &spec.steps {
            let mut p = StepPlan { name: step.name.clone(), kind: step.kind.label().into(), ..Default::default() };
            let mut files = Vec::new();
            let value = |r: &OutputRef| predicted.get(&r.step).and_then(|o| o.iter().find(|x| x.key == r.output)).map(|o| o.value.clone());
            let blocked = step.needs.iter().find_map(|n| unknown.get(n).map(|why| (n.clone(), why.clone())));
            let when = step.when.as_ref().map(|c| c.eval(&value));
            match (blocked, when) {
                (Some((n, why)), _) => {
                    p.prediction = "unknown".into();
                    p.detail = format!("needs {n:?}, which {why}");
                }
                (None, Some(Ok(false))) => {
                    p.prediction = "skipped".into();
                    p.detail = "its when condition is false".into();
                }
                (None, Some(Err(e))) => {
                    p.prediction = "unknown".into();
                    p.detail = format!("when: {e}");
                }
                (None, _) if !step.kind.cacheable() => {
                    p.prediction = "runs".into();
                    p.detail = format!("{} steps are never cached", step.kind.label());
                    if step.kind == StepKind::Validate {
                        if let Ok(out) = step.render(&value).map_err(|e| e.to_string()).and_then(|t| self.validate_step(&t)) {
                            predicted.insert(step.name.clone(), out);
                        }
                    }
                }
                (None, _) => match self.cache_key(step, &value, build) {
                    Err(e) => {
                        p.prediction = "miss".into();
                        p.detail = format!("cannot be keyed now: {e}");
                    }
                    Ok((key, inputs)) => {
                        (p.key, p.inputs) = (key.clone(), inputs);
                        let named = if step.cache { self.exec_files(step, &value) } else { Vec::new() };
                        match (step.cache, self.cache_entry(&key)) {
                            _ if !named.is_empty() => {
                                p.key.clear();
                                (p.prediction, p.detail) = ("unknown".into(), format!("its key takes the digests of {} when it starts", named.join(", ")));
                            }
                            (false, _) => (p.prediction, p.detail) = ("off".into(), "cache = false".into()),
                            (true, None) => p.prediction = "miss".into(),
                            (true, Some(e)) => {
                                p.prediction = "hit".into();
                                p.cached_from = format!("{}/{} (job {})", e.run, e.step, e.job_id);
                                files = e.artifacts.clone();
                                predicted.insert(step.name.clone(), e.outputs.clone());
                            }
                        }
                    }
                },
            }
            if !predicted.contains_key(&step.name) {
                let why = match p.prediction.as_str() {
                    "skipped" => "will be skipped",
                    "unknown" => "cannot be known yet",
                    _ => "will run",
                };
                unknown.insert(step.name.clone(), why.into());
            }
            plans.push(p);
            artifacts.push(files);
        }
        (plans, artifacts)
    }
}
