//! Pipelines: a DAG of shoal's own steps (`[[step]]`s of kinds `train`, `batch`, `evaluate`,
//! `register`), with `needs`, a `when` condition on upstream outputs, `retries`, `timeout_s`,
//! and references to upstream outputs (`"{steps.train.model}"`) in any string of a step.
//!
//! `PipelineSpec::parse` validates everything that can be known without the cluster: unknown
//! keys, unknown steps, cycles, references to a step that is not upstream or to an output its
//! kind never produces, and each step's job spec (with every reference replaced by a sample of
//! its type). The coordinator renders a step (`Step::render`) once its upstream steps are done,
//! inside the apply of the entry that finished them, so a step starts exactly once.

use std::collections::{BTreeMap, BTreeSet};

use crate::{CoreError, Result};

mod condition;
mod steps;
pub use condition::{CmpOp, Condition, Operand};
pub use steps::{Append, Gate, Registration, Validation};
use steps::score_spec;

/// Most steps one pipeline may have.
pub const MAX_STEPS: usize = 256;
/// Most retries one step may ask for.
pub const MAX_RETRIES: u32 = 10;

fn bad(key: impl std::fmt::Display, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Pipeline(format!("{key}: {msg}"))
}

fn bad_step(step: &str, key: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Pipeline(format!("step {step:?}: {key}: {msg}"))
}

/// What a step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A training job: `spec` is a job spec (a table; the CLI inlines `spec = "PATH"`).
    Train,
    /// A batch job: `spec` is a batch spec.
    Batch,
    /// A model scored on a dataset's records, metrics only: `model`, `dataset`, `records`.
    Evaluate,
    /// Checks of a dataset version, in place: `dataset`, `min_records`, `max_label_js`,
    /// `max_feature_js` (its newest slice's drift), `feature_shape`, `classes`. Outputs the
    /// version and its newest slice's records (`slice_start`, `slice_records`).
    Validate,
    /// A training step's model put in the registry: `model` (`job:N`), `as` (the model's
    /// name), `alias`.
    Register,
    /// `[promote]`'s rule as a step: the registered `model` (`NAME@VERSION`) and the holder of
    /// `alias` are scored on `holdout`; the alias moves to the model if it is not worse by
    /// `metric` than the holder (by `min_delta`). Outputs `promoted` (true or false).
    Gate,
    /// New files under the store's `incoming/` prefix (`prefix`, default
    /// `incoming/DATASET/`) added to `dataset` as one slice by a batch import on the workers:
    /// `format` (csv with `label` or `target`, or safetensors). A file is added once: files
    /// already in one of the dataset's slices are left out; none new, no job and no version.
    Append,
}

impl StepKind {
    fn parse(s: &str) -> Option<StepKind> {
        Some(match s {
            "train" => StepKind::Train,
            "batch" => StepKind::Batch,
            "evaluate" => StepKind::Evaluate,
            "register" => StepKind::Register,
            "validate" => StepKind::Validate,
            "gate" => StepKind::Gate,
            "append" => StepKind::Append,
            _ => return None,
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            StepKind::Train => "train",
            StepKind::Batch => "batch",
            StepKind::Evaluate => "evaluate",
            StepKind::Register => "register",
            StepKind::Validate => "validate",
            StepKind::Gate => "gate",
            StepKind::Append => "append",
        }
    }

    /// Whether a step of this kind may be served from the cache: the kinds that only compute
    /// (a register, gate or validate step reads or changes the registry or data as they are now).
    pub fn cacheable(self) -> bool {
        matches!(self, StepKind::Train | StepKind::Batch | StepKind::Evaluate)
    }

    /// The outputs a step of this kind may have (a metric only when the model has it).
    pub fn outputs(self) -> &'static [&'static str] {
        const METRICS: [&str; 5] = ["test_accuracy", "test_loss", "test_bpb", "test_rmse", "test_r2"];
        match self {
            StepKind::Train => &["job", "model", "registered_model", "step", METRICS[0], METRICS[1], METRICS[2], METRICS[3], METRICS[4]],
            StepKind::Batch => &["job", "output", METRICS[0], METRICS[1], METRICS[2], METRICS[3], METRICS[4]],
            StepKind::Evaluate => &["job", METRICS[0], METRICS[1], METRICS[2], METRICS[3], METRICS[4]],
            StepKind::Register => &["model", "name", "version"],
            StepKind::Validate => &["dataset", "version", "records", "slice_start", "slice_records", "label_js", "feature_js"],
            StepKind::Gate => &["model", "promoted", "candidate_score", "holder_score", "holder_version", "decision"],
            StepKind::Append => &["job", "dataset", "version", "records", "new_records", "files"],
        }
    }

    /// The keys of a step of this kind besides the common ones.
    fn keys(self) -> &'static [&'static str] {
        match self {
            StepKind::Train | StepKind::Batch => &["spec"],
            StepKind::Evaluate => &["model", "dataset", "records", "transform", "workers", "batch_size"],
            StepKind::Register => &["model", "as", "alias"],
            StepKind::Validate => &["dataset", "min_records", "max_label_js", "max_feature_js", "feature_shape", "classes"],
            StepKind::Gate => &["model", "alias", "metric", "min_delta", "holdout", "records", "workers", "batch_size"],
            StepKind::Append => &["dataset", "prefix", "format", "label", "target", "workers"],
        }
    }

    /// A value of the output's type, for checking a spec before the real value exists.
    fn sample(self, output: &str) -> &'static str {
        match (self, output) {
            (_, "job" | "step" | "version" | "records" | "holder_version" | "slice_records" | "new_records" | "files") => "1",
            (StepKind::Append, "dataset") => "dataset@1",
            (_, "slice_start") => "0",
            (StepKind::Gate, "promoted") => "true",
            (StepKind::Gate, "decision") => "promoted",
            (StepKind::Gate, "model") => "model@1",
            (StepKind::Validate, "dataset") => "dataset@1",
            (StepKind::Register, "model") => "model@1",
            (_, "model") => "job:1",
            (_, "registered_model") => "model@1",
            (_, "name") => "model",
            (_, "output") => "dataset@1",
            _ => "0.5",
        }
    }
}

const COMMON_KEYS: [&str; 8] = ["name", "kind", "needs", "when", "retries", "timeout_s", "cache", "cache_ignore"];

/// A reference to an upstream step's output.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRef {
    pub step: String,
    pub output: String,
}

impl std::fmt::Display for OutputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "steps.{}.{}", self.step, self.output)
    }
}

/// One `[[step]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub kind: StepKind,
    pub needs: Vec<String>,
    pub when: Option<Condition>,
    /// Attempts after the first failed one.
    pub retries: u32,
    pub timeout_s: Option<u64>,
    /// Whether a succeeded attempt with the same key is reused (`cache`; default: on for the
    /// kinds that only compute, except an `exec` batch, whose files and environment the key
    /// cannot see).
    pub cache: bool,
    /// Dotted keys of the step (`spec.cluster.workers`) left out of its cache key.
    pub cache_ignore: Vec<String>,
    /// The step's own keys (everything but the common ones), references still in place.
    pub params: toml::Table,
}

impl Step {
    /// Whether the step runs commands of its own on the workers (an `exec` batch).
    pub fn runs_commands(&self) -> bool {
        self.kind == StepKind::Batch && self.params.get("spec").and_then(|s| s.get("operator")).and_then(|o| o.get("kind")).and_then(|k| k.as_str()) == Some("exec")
    }
}

/// `[trigger]`: a run for each range of new versions of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerSpec {
    pub on_append: String,
    /// A run needs at least this many records added since the last run's range (default 1).
    pub min_new_records: u64,
    /// 0: a run in the apply of the append itself; else once no append came for this long.
    pub debounce_s: u64,
}

/// What a schedule does with slots that passed while no run could start for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Catchup {
    /// Only a slot that is on time runs; missed ones are skipped.
    None,
    /// The newest missed slot runs, the older ones are skipped.
    Latest,
    /// Every missed slot runs, oldest first, at most `max_catchup` of the newest.
    All,
}

/// What a schedule does when a slot comes while its previous run still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    Allow,
    /// The slot is skipped.
    Forbid,
    /// The running runs are cancelled, then the slot runs.
    Replace,
    /// The slot waits until they end.
    Queue,
}

/// `[schedule]`: a run per cron slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleSpec {
    pub cron: String,
    pub timezone: String,
    pub catchup: Catchup,
    pub max_catchup: u32,
    pub concurrency: Concurrency,
}

impl ScheduleSpec {
    pub fn schedule(&self) -> crate::cron::CronSchedule {
        crate::cron::CronSchedule::parse(&self.cron, &self.timezone).expect("checked by parse")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PipelineSpec {
    pub name: String,
    pub description: Option<String>,
    pub trigger: Option<TriggerSpec>,
    pub schedule: Option<ScheduleSpec>,
    /// In the file's order, which is a topological order (`parse` checks that every `needs`
    /// names an earlier step, so no cycle can exist).
    pub steps: Vec<Step>,
}

/// Names: 1-64 of [A-Za-z0-9_-], starting with a letter.
fn check_name(key: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(bad(key, format!("{name:?} must be 1-64 of [A-Za-z0-9_-], starting with a letter")))
    }
}

impl PipelineSpec {
    /// Parses and validates a pipeline. The error names the step and the key.
    pub fn parse(text: &str) -> Result<PipelineSpec> {
        let table: toml::Table = toml::from_str(text).map_err(|e| CoreError::Pipeline(e.to_string().trim().to_string()))?;
        if let Some(k) = table.keys().find(|k| !["name", "description", "trigger", "schedule", "step"].contains(&k.as_str())) {
            return Err(bad(k, "unknown key (a pipeline has name, description, [trigger], [schedule] and [[step]]s)"));
        }
        let schedule = match table.get("schedule") {
            None => None,
            Some(toml::Value::Table(t)) => Some(parse_schedule(t)?),
            Some(_) => return Err(bad("schedule", "must be a table: [schedule] cron = \"0 0 3 * * *\"")),
        };
        let trigger = match table.get("trigger") {
            None => None,
            Some(toml::Value::Table(t)) => Some(parse_trigger(t)?),
            Some(_) => return Err(bad("trigger", "must be a table: [trigger] on_append = \"DATASET\"")),
        };
        let name = match table.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("name", "must be a string")),
            None => return Err(bad("name", "missing")),
        };
        check_name("name", &name)?;
        let description = match table.get("description") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("description", "must be a string")),
        };
        let raw = match table.get("step") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a,
            Some(toml::Value::Array(_)) | None => return Err(bad("step", "a pipeline needs at least one [[step]]")),
            Some(_) => return Err(bad("step", "must be an array of tables ([[step]])")),
        };
        if raw.len() > MAX_STEPS {
            return Err(bad("step", format!("{} steps; at most {MAX_STEPS}", raw.len())));
        }
        let mut steps: Vec<Step> = Vec::with_capacity(raw.len());
        let names: BTreeSet<String> = raw.iter().filter_map(|s| s.get("name").and_then(|n| n.as_str()).map(str::to_string)).collect();
        for (i, s) in raw.iter().enumerate() {
            let toml::Value::Table(t) = s else { return Err(bad(format!("step[{i}]"), "must be a table")) };
            let step = parse_step(i, t, &steps, &names)?;
            steps.push(step);
        }
        let spec = PipelineSpec { name, description, trigger, schedule, steps };
        for step in &spec.steps {
            spec.check_step(step)?;
        }
        Ok(spec)
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The steps upstream of `step` (its needs, their needs, ...).
    pub fn upstream(&self, step: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![step.to_string()];
        while let Some(s) = todo.pop() {
            for n in self.step(&s).map(|s| s.needs.as_slice()).unwrap_or_default() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    }

    /// References must name an upstream step and an output of its kind; the step's spec must
    /// validate with samples in their place.
    fn check_step(&self, step: &Step) -> Result<()> {
        let upstream = self.upstream(&step.name);
        let check_ref = |key: &str, r: &OutputRef| -> Result<()> {
            let Some(target) = self.step(&r.step) else {
                return Err(bad_step(&step.name, key, format!("{{{r}}} names no step {:?}", r.step)));
            };
            if !upstream.contains(&r.step) {
                return Err(bad_step(&step.name, key, format!("{{{r}}}: step {:?} is not upstream of {:?} (add it to needs)", r.step, step.name)));
            }
            if !target.kind.outputs().contains(&r.output.as_str()) {
                return Err(bad_step(
                    &step.name,
                    key,
                    format!("{{{r}}}: a {} step has no output {:?} (it has {})", target.kind.label(), r.output, target.kind.outputs().join(", ")),
                ));
            }
            Ok(())
        };
        for (key, r) in references(&step.params)? {
            check_ref(&key, &r)?;
        }
        if let Some(c) = &step.when {
            for r in c.references() {
                check_ref("when", &r)?;
            }
        }
        let samples: BTreeMap<String, BTreeMap<String, String>> = self
            .steps
            .iter()
            .map(|s| (s.name.clone(), s.kind.outputs().iter().map(|o| (o.to_string(), s.kind.sample(o).to_string())).collect()))
            .collect();
        let rendered = step.render(&|r: &OutputRef| samples.get(&r.step).and_then(|o| o.get(&r.output)).cloned())?;
        match step.kind {
            StepKind::Train => {
                crate::JobSpec::parse(&rendered).map_err(|e| bad_step(&step.name, "spec", e))?;
            }
            StepKind::Batch | StepKind::Evaluate => {
                crate::batch::BatchSpec::parse(&rendered).map_err(|e| bad_step(&step.name, if step.kind == StepKind::Batch { "spec" } else { "evaluate" }, e))?;
            }
            StepKind::Validate => {
                Validation::parse(&rendered).map_err(|e| bad_step(&step.name, "validate", e))?;
            }
            StepKind::Gate => {
                let g = Gate::parse(&rendered).map_err(|e| bad_step(&step.name, "gate", e))?;
                let scored = g.score_spec(&step.name, "model@1").map_err(|e| bad_step(&step.name, "gate", e))?;
                crate::batch::BatchSpec::parse(&scored).map_err(|e| bad_step(&step.name, "gate", e))?;
            }
            StepKind::Append => {
                let a = Append::parse(&rendered).map_err(|e| bad_step(&step.name, "append", e))?;
                let job = a.batch_spec(&step.name, &[format!("{}file", a.prefix())]).map_err(|e| bad_step(&step.name, "append", e))?;
                crate::batch::BatchSpec::parse(&job).map_err(|e| bad_step(&step.name, "append", e))?;
            }
            StepKind::Register => {}
        }
        Ok(())
    }
}

fn parse_schedule(t: &toml::Table) -> Result<ScheduleSpec> {
    const KEYS: [&str; 5] = ["cron", "timezone", "catchup", "max_catchup", "concurrency"];
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(bad(format!("schedule.{k}"), format!("unknown key (a schedule has {})", KEYS.join(", "))));
    }
    let text = |key: &str, default: &str| match t.get(key) {
        None => Ok(default.to_string()),
        Some(toml::Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(bad(format!("schedule.{key}"), format!("must be a string, got {v}"))),
    };
    let cron = match t.get("cron") {
        Some(toml::Value::String(s)) => s.clone(),
        _ => return Err(bad("schedule.cron", "missing: six fields, seconds first, e.g. \"0 0 3 * * *\" (03:00:00 every day)")),
    };
    let timezone = text("timezone", "UTC")?;
    crate::cron::CronSchedule::parse(&cron, &timezone).map_err(|e| bad(if e.contains("time zone") { "schedule.timezone" } else { "schedule.cron" }, e))?;
    let catchup = match text("catchup", "latest")?.as_str() {
        "none" => Catchup::None,
        "latest" => Catchup::Latest,
        "all" => Catchup::All,
        other => return Err(bad("schedule.catchup", format!("{other:?} is not none, latest or all"))),
    };
    let concurrency = match text("concurrency", "forbid")?.as_str() {
        "allow" => Concurrency::Allow,
        "forbid" => Concurrency::Forbid,
        "replace" => Concurrency::Replace,
        "queue" => Concurrency::Queue,
        other => return Err(bad("schedule.concurrency", format!("{other:?} is not allow, forbid, replace or queue"))),
    };
    let max_catchup = match t.get("max_catchup") {
        None => 10,
        Some(toml::Value::Integer(n)) if (1..=1000).contains(n) => *n as u32,
        Some(v) => return Err(bad("schedule.max_catchup", format!("must be 1 to 1000, got {v}"))),
    };
    Ok(ScheduleSpec { cron, timezone, catchup, max_catchup, concurrency })
}

fn parse_trigger(t: &toml::Table) -> Result<TriggerSpec> {
    if let Some(k) = t.keys().find(|k| !["on_append", "min_new_records", "debounce_s"].contains(&k.as_str())) {
        return Err(bad(format!("trigger.{k}"), "unknown key (a trigger has on_append, min_new_records and debounce_s)"));
    }
    let on_append = match t.get("on_append") {
        Some(toml::Value::String(s)) => s.clone(),
        _ => return Err(bad("trigger.on_append", "missing: the dataset whose appends start a run")),
    };
    crate::dataset::validate_name(&on_append).map_err(|e| bad("trigger.on_append", e))?;
    let count = |key: &str, default: u64, min: i64| match t.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(n)) if *n >= min => Ok(*n as u64),
        Some(v) => Err(bad(format!("trigger.{key}"), format!("must be a whole number, at least {min}, got {v}"))),
    };
    Ok(TriggerSpec { on_append, min_new_records: count("min_new_records", 1, 1)?, debounce_s: count("debounce_s", 0, 0)? })
}

fn parse_step(i: usize, t: &toml::Table, earlier: &[Step], names: &BTreeSet<String>) -> Result<Step> {
    let name = match t.get("name") {
        Some(toml::Value::String(s)) => s.clone(),
        _ => return Err(bad(format!("step[{i}].name"), "missing (every step has a name = \"...\")")),
    };
    check_name(&format!("step[{i}].name"), &name)?;
    if earlier.iter().any(|s| s.name == name) {
        return Err(bad_step(&name, "name", "two steps have this name"));
    }
    let kind = match t.get("kind") {
        Some(toml::Value::String(k)) => StepKind::parse(k).ok_or_else(|| bad_step(&name, "kind", format!("{k:?} is not train, batch, evaluate, validate, register or gate")))?,
        _ => return Err(bad_step(&name, "kind", "missing (train, batch, evaluate, validate, register or gate)")),
    };
    if let Some(k) = t.keys().find(|k| !COMMON_KEYS.contains(&k.as_str()) && !kind.keys().contains(&k.as_str())) {
        return Err(bad_step(&name, k, format!("unknown key for a {} step (it takes {})", kind.label(), kind.keys().join(", "))));
    }
    let needs = match t.get("needs") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad_step(&name, "needs", "must be a list of step names"))).collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(bad_step(&name, "needs", "must be a list of step names")),
    };
    for n in &needs {
        if n == &name {
            return Err(bad_step(&name, "needs", "a step cannot need itself (a cycle)"));
        }
        if !earlier.iter().any(|s| &s.name == n) {
            return Err(if names.contains(n) {
                bad_step(&name, "needs", format!("{n:?} comes later in the file: steps are listed in an order where each needs only earlier ones (this also rules out cycles)"))
            } else {
                bad_step(&name, "needs", format!("there is no step {n:?}"))
            });
        }
    }
    let when = match t.get("when") {
        None => None,
        Some(toml::Value::String(s)) => Some(Condition::parse(s).map_err(|e| bad_step(&name, "when", e))?),
        Some(_) => return Err(bad_step(&name, "when", "must be a string such as \"steps.eval.test_accuracy >= 0.9\"")),
    };
    let retries = match t.get("retries") {
        None => 0,
        Some(toml::Value::Integer(n)) if (0..=MAX_RETRIES as i64).contains(n) => *n as u32,
        Some(v) => return Err(bad_step(&name, "retries", format!("must be 0 to {MAX_RETRIES}, got {v}"))),
    };
    let timeout_s = match t.get("timeout_s") {
        None => None,
        Some(toml::Value::Integer(n)) if *n >= 1 => Some(*n as u64),
        Some(v) => return Err(bad_step(&name, "timeout_s", format!("must be a whole number of seconds, at least 1, got {v}"))),
    };
    let params: toml::Table = t.iter().filter(|(k, _)| !COMMON_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    let exec = params.get("spec").and_then(|s| s.get("operator")).and_then(|o| o.get("kind")).and_then(|k| k.as_str()) == Some("exec");
    let cache = match t.get("cache") {
        None => kind.cacheable() && !exec,
        Some(toml::Value::Boolean(true)) if !kind.cacheable() => {
            return Err(bad_step(&name, "cache", format!("{} steps are never cached (they read or change what is there now)", kind.label())));
        }
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => return Err(bad_step(&name, "cache", "must be true or false")),
    };
    let cache_ignore = match t.get("cache_ignore") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) if a.iter().all(|v| v.is_str()) => {
            let keys: Vec<String> = a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
            for k in &keys {
                let top = k.split('.').next().unwrap_or_default();
                if !kind.keys().contains(&top) {
                    return Err(bad_step(&name, "cache_ignore", format!("{k:?} is not a key of a {} step (it has {})", kind.label(), kind.keys().join(", "))));
                }
            }
            keys
        }
        Some(_) => return Err(bad_step(&name, "cache_ignore", "must be a list of keys such as \"spec.cluster.workers\"")),
    };
    let require_str = |key: &str| match params.get(key) {
        Some(toml::Value::String(_)) => Ok(()),
        Some(_) => Err(bad_step(&name, key, "must be a string")),
        None => Err(bad_step(&name, key, format!("missing (a {} step needs it)", kind.label()))),
    };
    match kind {
        StepKind::Train | StepKind::Batch => match params.get("spec") {
            Some(toml::Value::Table(_)) => {}
            Some(toml::Value::String(p)) => return Err(bad_step(&name, "spec", format!("{p:?}: a spec by path is read by `shoal pipeline submit`, which puts it inline"))),
            Some(_) => return Err(bad_step(&name, "spec", "must be a table (the job spec) or a path")),
            None => return Err(bad_step(&name, "spec", format!("missing (a {} step needs its job spec)", kind.label()))),
        },
        StepKind::Evaluate => {
            require_str("model")?;
            require_str("dataset")?;
        }
        StepKind::Validate => require_str("dataset")?,
        StepKind::Gate => {
            require_str("model")?;
            require_str("alias")?;
            require_str("holdout")?;
        }
        StepKind::Append => {
            require_str("dataset")?;
            require_str("format")?;
        }
        StepKind::Register => {
            require_str("model")?;
            require_str("as")?;
            if let Some(v) = params.get("alias").filter(|v| !v.is_str()) {
                return Err(bad_step(&name, "alias", format!("must be a string, got {v}")));
            }
        }
    }
    Ok(Step { name, kind, needs, when, retries, timeout_s, cache, cache_ignore, params })
}

/// Every `{steps.S.O}` in the strings of `t`, with the dotted key it is in.
fn references(t: &toml::Table) -> Result<Vec<(String, OutputRef)>> {
    fn walk(key: &str, v: &toml::Value, out: &mut Vec<(String, OutputRef)>) -> Result<()> {
        match v {
            toml::Value::String(s) => {
                for r in refs_in(s).map_err(|e| bad(key, e))? {
                    out.push((key.to_string(), r));
                }
            }
            toml::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(&format!("{key}[{i}]"), v, out)?;
                }
            }
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&format!("{key}.{k}"), v, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut out = Vec::new();
    for (k, v) in t {
        walk(k, v, &mut out)?;
    }
    Ok(out)
}

/// The references in one string: `{steps.S.O}`. A `{` not starting a reference stays as it is.
fn refs_in(s: &str) -> std::result::Result<Vec<OutputRef>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("{steps.") {
        let tail = &rest[at + 1..];
        let end = tail.find('}').ok_or_else(|| format!("{s:?}: a reference {{steps...}} is not closed"))?;
        out.push(parse_ref(&tail[..end])?);
        rest = &tail[end + 1..];
    }
    Ok(out)
}

fn parse_ref(text: &str) -> std::result::Result<OutputRef, String> {
    let parts: Vec<&str> = text.split('.').collect();
    match parts.as_slice() {
        ["steps", step, output] if !step.is_empty() && !output.is_empty() => Ok(OutputRef { step: step.to_string(), output: output.to_string() }),
        _ => Err(format!("{text:?} is not a reference steps.STEP.OUTPUT")),
    }
}

fn substitute(s: &str, value: &dyn Fn(&OutputRef) -> Option<String>) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("{steps.") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let end = tail.find('}').ok_or_else(|| format!("{s:?}: a reference is not closed"))?;
        let r = parse_ref(&tail[..end])?;
        out.push_str(&value(&r).ok_or_else(|| format!("{{{r}}}: step {:?} has no output {:?}", r.step, r.output))?);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A string that is one reference and nothing else takes its value's type: a whole number
/// becomes an integer, another number a float (so `records = ["{steps.v.slice_start}", ...]`
/// is a range of integers); any other string stays a string.
fn render_value(key: &str, v: &toml::Value, value: &dyn Fn(&OutputRef) -> Option<String>) -> Result<toml::Value> {
    Ok(match v {
        toml::Value::String(s) => {
            let text = substitute(s, value).map_err(|e| bad(key, e))?;
            let whole = s.starts_with("{steps.") && s.ends_with('}') && s.matches('{').count() == 1;
            match (whole, text.parse::<i64>(), text.parse::<f64>()) {
                (true, Ok(n), _) => toml::Value::Integer(n),
                (true, Err(_), Ok(x)) if x.is_finite() => toml::Value::Float(x),
                _ => toml::Value::String(text),
            }
        }
        toml::Value::Array(a) => toml::Value::Array(a.iter().enumerate().map(|(i, v)| render_value(&format!("{key}[{i}]"), v, value)).collect::<Result<_>>()?),
        toml::Value::Table(t) => toml::Value::Table(t.iter().map(|(k, v)| Ok((k.clone(), render_value(&format!("{key}.{k}"), v, value)?))).collect::<Result<_>>()?),
        other => other.clone(),
    })
}

/// A value of `params` as a string, references replaced.
fn param(step: &Step, key: &str, value: &dyn Fn(&OutputRef) -> Option<String>) -> Result<Option<String>> {
    match step.params.get(key) {
        None => Ok(None),
        Some(v) => match render_value(key, v, value)? {
            toml::Value::String(s) => Ok(Some(s)),
            other => Ok(Some(other.to_string())),
        },
    }
}

impl Step {
    /// What the cache key takes from the step itself: its kind and its keys with references
    /// replaced, less `cache_ignore`, in a canonical form (keys sorted at every level).
    pub fn cache_material(&self, value: &dyn Fn(&OutputRef) -> Option<String>) -> Result<String> {
        let toml::Value::Table(mut t) = render_value("step", &toml::Value::Table(self.params.clone()), value)? else { unreachable!("a table renders as a table") };
        for key in &self.cache_ignore {
            let path: Vec<&str> = key.split('.').collect();
            let (last, parents) = path.split_last().expect("split gives one part at least");
            let mut table = Some(&mut t);
            for p in parents {
                table = table.and_then(|t| t.get_mut(*p)).and_then(|v| v.as_table_mut());
            }
            if let Some(t) = table {
                t.remove(*last);
            }
        }
        let text = toml::to_string(&t).map_err(|e| bad_step(&self.name, "cache", e))?;
        Ok(format!("kind = {:?}\n{text}", self.kind.label()))
    }

    /// The job spec TOML this step submits (train, batch, evaluate), with every reference
    /// replaced by `value`; for a register step, its `model`, `as` and `alias` as a table.
    pub fn render(&self, value: &dyn Fn(&OutputRef) -> Option<String>) -> Result<String> {
        let named = |e: CoreError| match e {
            CoreError::Pipeline(m) => CoreError::Pipeline(format!("step {:?}: {m}", self.name)),
            other => other,
        };
        match self.kind {
            StepKind::Train | StepKind::Batch => {
                let Some(toml::Value::Table(spec)) = self.params.get("spec") else { return Err(bad_step(&self.name, "spec", "missing")) };
                let toml::Value::Table(mut spec) = render_value("spec", &toml::Value::Table(spec.clone()), value).map_err(named)? else { unreachable!("a table renders as a table") };
                if self.kind == StepKind::Batch {
                    spec.entry("kind").or_insert_with(|| toml::Value::String("batch".into()));
                }
                toml::to_string(&spec).map_err(|e| bad_step(&self.name, "spec", e))
            }
            StepKind::Evaluate => {
                let get = |k: &str| param(self, k, value).map_err(named);
                let (model, dataset) = (get("model")?.unwrap_or_default(), get("dataset")?.unwrap_or_default());
                let p = &self.params;
                score_spec(&self.name, &model, &dataset, p.get("records"), get("transform")?, p.get("batch_size"), p.get("workers")).map_err(|e| bad_step(&self.name, "evaluate", e))
            }
            StepKind::Gate | StepKind::Append => {
                let toml::Value::Table(t) = render_value(self.kind.label(), &toml::Value::Table(self.params.clone()), value).map_err(named)? else { unreachable!("a table renders as a table") };
                toml::to_string(&t).map_err(|e| bad_step(&self.name, self.kind.label(), e))
            }
            StepKind::Validate => {
                let toml::Value::Table(t) = render_value("validate", &toml::Value::Table(self.params.clone()), value).map_err(named)? else { unreachable!("a table renders as a table") };
                toml::to_string(&t).map_err(|e| bad_step(&self.name, "validate", e))
            }
            StepKind::Register => {
                let mut t = toml::Table::new();
                for k in ["model", "as", "alias"] {
                    if let Some(v) = param(self, k, value).map_err(named)? {
                        t.insert(k.into(), toml::Value::String(v));
                    }
                }
                toml::to_string(&t).map_err(|e| bad_step(&self.name, "register", e))
            }
        }
    }
}

#[cfg(test)]
mod tests;
