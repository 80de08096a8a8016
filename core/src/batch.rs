//! Batch jobs (`kind = "batch"`): the spec, the task plan (one task per input shard), and the
//! fitted transforms that `transform` stores and `score` applies.

use serde::Deserialize;
use shoal_proto::{ShardInfo, SliceStats, TransformInfo};

use crate::{CoreError, Result};

/// Whether a spec's text is a training job (`kind` absent or `"train"`) or a batch job.
pub fn is_batch(text: &str) -> Result<bool> {
    let table: toml::Table = toml::from_str(text).map_err(|e| CoreError::Spec(e.to_string().trim().to_string()))?;
    match table.get("kind") {
        None => Ok(false),
        Some(toml::Value::String(k)) if k == "train" => Ok(false),
        Some(toml::Value::String(k)) if k == "batch" => Ok(true),
        Some(other) => Err(bad("kind", format!("must be \"train\" or \"batch\", got {other}"))),
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    pub name: String,
    pub kind: String,
    pub input: BatchInput,
    pub operator: OperatorSpec,
    pub output: Option<BatchOutput>,
    #[serde(default)]
    pub cluster: BatchCluster,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchInput {
    pub dataset: String,
    /// Absent: the latest at submission.
    pub version: Option<u64>,
    /// `[start, end)`; absent: every record.
    pub records: Option<[u64; 2]>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    /// `score`, `transform`, `stats` or `exec`.
    pub kind: String,
    /// score: `"job:N"` (that job's final checkpoint), `"NAME@VERSION"` or `"NAME@ALIAS"`.
    pub model: Option<String>,
    /// score: `"DATASET[@VERSION]"`, a dataset made by a `transform` job: its fitted transform
    /// is applied to the input first.
    pub transform: Option<String>,
    /// transform: `standardize` (x - mean) / std, or `minmax` (x - min) / (max - min).
    pub method: Option<String>,
    /// exec: the command and its arguments; `{input}` and `{output}` become the task's input
    /// shard and the shard it must write (safetensors, tensors `x` and `y`).
    pub command: Option<Vec<String>>,
    /// exec: seconds before the command is killed (default 600).
    pub timeout_s: Option<f64>,
    /// score: records per forward pass (default 1024).
    pub batch_size: Option<u32>,
    /// import: the files to add (store keys under `incoming/`), one task each.
    pub files: Option<Vec<String>>,
    /// import: `csv` or `safetensors` (tensors `x` and `y`).
    pub format: Option<String>,
    /// import, csv: the label column (a classifier's dataset) ...
    pub label: Option<String>,
    /// ... or the float target column (a regression's).
    pub target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchOutput {
    /// Created, or appended to as a new version.
    pub dataset: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchCluster {
    /// At most this many tasks at once (default 2).
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Attempts per task before the job fails (default 3; speculative copies not counted).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// A task running longer than this times the median task time gets a speculative copy on
    /// a free worker (default 2; 0: never).
    #[serde(default = "default_speculation")]
    pub speculation: f64,
}

fn default_workers() -> u32 {
    2
}
fn default_attempts() -> u32 {
    3
}
fn default_speculation() -> f64 {
    2.0
}

impl Default for BatchCluster {
    fn default() -> Self {
        BatchCluster { workers: default_workers(), max_attempts: default_attempts(), speculation: default_speculation() }
    }
}

fn bad(key: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Spec(format!("{key}: {msg}"))
}

pub const OPERATORS: [&str; 5] = ["score", "transform", "stats", "exec", "import"];

/// Most files one import takes.
pub const MAX_IMPORT_FILES: usize = 10_000;

impl BatchSpec {
    /// Parses and validates a batch spec. The error names the offending key.
    pub fn parse(text: &str) -> Result<BatchSpec> {
        let spec: BatchSpec = toml::from_str(text).map_err(|e| CoreError::Spec(e.to_string().trim().to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        if self.kind != "batch" {
            return Err(bad("kind", format!("must be \"batch\" for a batch job, got {:?}", self.kind)));
        }
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty"));
        }
        crate::dataset::validate_name(&self.input.dataset).map_err(|e| bad("input.dataset", e))?;
        if self.input.version == Some(0) {
            return Err(bad("input.version", "versions start at 1"));
        }
        if let Some([a, b]) = self.input.records {
            if a >= b {
                return Err(bad("input.records", format!("range [{a}, {b}) is empty")));
            }
        }
        let op = &self.operator;
        if !OPERATORS.contains(&op.kind.as_str()) {
            return Err(bad("operator.kind", format!("unknown operator {:?} (expected score, transform, stats, exec or import)", op.kind)));
        }
        let only = |key: &str, set: bool, kinds: &[&str]| -> Result<()> {
            if set && !kinds.contains(&op.kind.as_str()) {
                return Err(bad(&format!("operator.{key}"), format!("applies to kind = {} only", kinds.join(" or "))));
            }
            Ok(())
        };
        only("model", op.model.is_some(), &["score"])?;
        only("transform", op.transform.is_some(), &["score"])?;
        only("batch_size", op.batch_size.is_some(), &["score"])?;
        only("method", op.method.is_some(), &["transform"])?;
        only("command", op.command.is_some(), &["exec"])?;
        only("timeout_s", op.timeout_s.is_some(), &["exec"])?;
        only("files", op.files.is_some(), &["import"])?;
        only("format", op.format.is_some(), &["import"])?;
        only("label", op.label.is_some(), &["import"])?;
        only("target", op.target.is_some(), &["import"])?;
        match op.kind.as_str() {
            "score" if op.model.is_none() => return Err(bad("operator.model", "score needs a model: \"job:N\", \"NAME@VERSION\" or \"NAME@ALIAS\"")),
            "transform" => match op.method.as_deref() {
                Some("standardize" | "minmax") => {}
                Some(other) => return Err(bad("operator.method", format!("must be standardize or minmax, got {other:?}"))),
                None => return Err(bad("operator.method", "transform needs method = \"standardize\" or \"minmax\"")),
            },
            "exec" => {
                let cmd = op.command.as_deref().unwrap_or_default();
                if cmd.is_empty() || cmd[0].trim().is_empty() {
                    return Err(bad("operator.command", "exec needs a command: [\"program\", \"arg\", ...] with {input} and {output}"));
                }
                if !cmd.iter().any(|a| a.contains("{output}")) {
                    return Err(bad("operator.command", "must name {output}: the shard the command writes"));
                }
                if let Some(t) = op.timeout_s {
                    if !(t.is_finite() && t > 0.0 && t <= 86_400.0) {
                        return Err(bad("operator.timeout_s", format!("must be 0 to 86400 seconds, got {t}")));
                    }
                }
            }
            "import" => {
                let files = op.files.as_deref().unwrap_or_default();
                if files.is_empty() || files.len() > MAX_IMPORT_FILES {
                    return Err(bad("operator.files", format!("an import takes 1 to {MAX_IMPORT_FILES} files, got {}", files.len())));
                }
                if let Some(f) = files.iter().find(|f| !f.starts_with("incoming/") || crate::store::check_key(f).is_err()) {
                    return Err(bad("operator.files", format!("{f:?} is not a file under incoming/ in the store")));
                }
                match (op.format.as_deref(), &op.label, &op.target) {
                    (Some("csv"), Some(_), None) | (Some("csv"), None, Some(_)) | (Some("safetensors"), None, None) => {}
                    (Some("csv"), _, _) => return Err(bad("operator.label", "csv: name the label column (label = \"COL\") or a regression's target (target = \"COL\"), one of them")),
                    (Some("safetensors"), _, _) => return Err(bad("operator.label", "safetensors files hold their labels or targets in tensor y")),
                    (other, _, _) => return Err(bad("operator.format", format!("{other:?}: an import reads csv or safetensors files"))),
                }
                if self.output.as_ref().map(|o| o.dataset.as_str()) != Some(self.input.dataset.as_str()) || self.input.records.is_some() {
                    return Err(bad("output.dataset", "an import appends to its input dataset: [output] dataset is the same, and no records range"));
                }
            }
            _ => {}
        }
        if op.batch_size == Some(0) || op.batch_size.is_some_and(|b| b > 65_536) {
            return Err(bad("operator.batch_size", "must be 1 to 65536"));
        }
        match (&self.output, op.kind.as_str()) {
            // Without an output, score measures only (a pipeline's `evaluate` step).
            (None, "stats" | "score") => {}
            (None, _) => return Err(bad("output.dataset", format!("{} writes a dataset: name it in [output] dataset = \"NAME\"", op.kind))),
            (Some(o), _) => {
                crate::dataset::validate_name(&o.dataset).map_err(|e| bad("output.dataset", e))?;
                if o.dataset == self.input.dataset && op.kind != "import" {
                    return Err(bad("output.dataset", "must not be the input dataset (its records would be read while they grow)"));
                }
            }
        }
        let c = &self.cluster;
        if c.workers == 0 || c.workers > 1024 {
            return Err(bad("cluster.workers", format!("must be 1 to 1024, got {}", c.workers)));
        }
        if c.max_attempts == 0 || c.max_attempts > 100 {
            return Err(bad("cluster.max_attempts", format!("must be 1 to 100, got {}", c.max_attempts)));
        }
        if !(c.speculation == 0.0 || (c.speculation.is_finite() && c.speculation >= 1.0)) {
            return Err(bad("cluster.speculation", format!("must be 0 (off) or at least 1, got {}", c.speculation)));
        }
        Ok(())
    }

    /// The files an `exec` command names: every argument (or the value of a `--flag=VALUE`)
    /// that is an absolute path, in order, once each. What a cache key must hash besides the
    /// arguments themselves.
    pub fn named_files(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in self.operator.command.iter().flatten() {
            let v = a.split_once('=').map_or(a.as_str(), |(_, v)| v);
            if v.starts_with('/') && !v.contains('{') && !out.iter().any(|o| o == v) {
                out.push(v.to_string());
            }
        }
        out
    }

    /// The exec timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.operator.timeout_s.unwrap_or(600.0))
    }
}

/// The records of one file of an import (`name` for messages), with the statistics of its
/// slice binned like the dataset's first slice (`base`: the version it is added to, whose
/// class names string labels must be among).
pub fn import_file(spec: &OperatorSpec, name: &str, bytes: &[u8], base: &shoal_proto::DatasetInfo) -> Result<(crate::dataset::Records, SliceStats)> {
    let records = match (spec.format.as_deref(), &spec.label, &spec.target) {
        (Some("csv"), _, Some(target)) => crate::dataset::records_from_csv_target(name, bytes, target)?,
        (Some("csv"), Some(label), _) => {
            let (records, names) = crate::dataset::records_from_csv(name, bytes, label, &base.class_names)?;
            if names.len() > base.class_names.len() {
                return Err(CoreError::Dataset(format!("{name}: labels {:?} are not classes of {}", &names[base.class_names.len()..], base.name)));
            }
            records
        }
        _ => crate::dataset::records_from_safetensors(name, bytes)?,
    };
    let ranges = base.stats.as_ref().map(crate::stats::ranges);
    let fits = ranges.as_ref().is_none_or(|r| r.len() == records.feature_shape.iter().product::<usize>());
    let classes = (base.classes as usize).max(records.classes() as usize);
    let stats = crate::stats::slice_stats(&records, ranges.as_deref().filter(|_| fits), classes);
    Ok((records, stats))
}

/// One task per input shard that holds records of `[start, end)`: its part of the range.
pub fn plan_tasks(shards: &[ShardInfo], [start, end]: [u64; 2]) -> Vec<(u64, u64)> {
    let mut tasks = Vec::new();
    let mut first = 0u64;
    for s in shards {
        let (a, b) = (first.max(start), (first + s.records).min(end));
        if a < b {
            tasks.push((a, b));
        }
        first += s.records;
    }
    tasks
}

/// The transform `method` fitted to `stats` (of features as a model reads them). A feature
/// that does not vary maps to 0.
pub fn fit_transform(method: &str, stats: &SliceStats, fitted_on: String) -> TransformInfo {
    let (mut shift, mut scale) = (Vec::new(), Vec::new());
    for f in &stats.features {
        let (s, k) = if method == "minmax" {
            let range = f.max - f.min;
            (if f.count == 0 { 0.0 } else { f.min }, if f.count > 0 && range > 0.0 { 1.0 / range } else { 0.0 })
        } else {
            let (mean, std) = crate::stats::mean_std(f);
            (mean, if std > 0.0 { 1.0 / std } else { 0.0 })
        };
        shift.push(s);
        scale.push(k);
    }
    TransformInfo { method: method.into(), shift, scale, fitted_on }
}

/// Applies `t` to rows of features (`x.len()` a multiple of the transform's width).
pub fn apply_transform(t: &TransformInfo, x: &mut [f32]) {
    let f = t.shift.len().max(1);
    for row in x.chunks_mut(f) {
        for ((v, &s), &k) in row.iter_mut().zip(&t.shift).zip(&t.scale) {
            *v = ((*v as f64 - s) * k) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCORE: &str = "name = \"s\"\nkind = \"batch\"\n[input]\ndataset = \"mnist\"\nrecords = [8000, 10000]\n[operator]\nkind = \"score\"\nmodel = \"job:7\"\n[output]\ndataset = \"mnist-scores\"\n[cluster]\nworkers = 2\nmax_attempts = 3\n";

    #[test]
    fn the_issue_spec_parses_and_kinds_are_told_apart() {
        let exec = BatchSpec::parse(&SCORE.replace("kind = \"score\"\nmodel = \"job:7\"", "kind = \"exec\"\ncommand = [\"python3\", \"/srv/f.py\", \"--w=/srv/w.bin\", \"rel.txt\", \"/srv/f.py\", \"{input}\", \"{output}\"]")).unwrap();
        assert_eq!(exec.named_files(), ["/srv/f.py", "/srv/w.bin"]);
        let s = BatchSpec::parse(SCORE).unwrap();
        assert_eq!((s.input.records, s.operator.model.as_deref(), s.cluster.max_attempts), (Some([8000, 10000]), Some("job:7"), 3));
        assert!(is_batch(SCORE).unwrap());
        let example = include_str!("../../examples/score-mnist.toml");
        assert_eq!(BatchSpec::parse(example).unwrap().operator.model.as_deref(), Some("job:1"));
        assert!(!is_batch("name = \"t\"").unwrap());
        assert!(is_batch("kind = \"other\"").unwrap_err().to_string().contains("kind"));
    }

    #[test]
    fn bad_specs_name_the_key() {
        for (edit, want) in [
            (SCORE.replace("model = \"job:7\"\n", ""), "operator.model"),
            (SCORE.replace("kind = \"score\"", "kind = \"paint\""), "operator.kind"),
            (SCORE.replace("max_attempts = 3", "max_attempts = 0"), "cluster.max_attempts"),
            (SCORE.replace("records = [8000, 10000]", "records = [5, 5]"), "input.records"),
            (SCORE.replace("model = \"job:7\"", "model = \"job:7\"\ncommand = [\"x\"]"), "operator.command"),
            (SCORE.replace("workers = 2", "workers = 2\ncolour = 1"), "colour"),
            (SCORE.replace("mnist-scores", "mnist"), "output.dataset"),
        ] {
            let e = BatchSpec::parse(&edit).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn an_import_reads_incoming_files_into_its_own_dataset() {
        let import = "name = \"i\"\nkind = \"batch\"\n[input]\ndataset = \"d\"\n[operator]\nkind = \"import\"\nfiles = [\"incoming/d/a.csv\"]\nformat = \"csv\"\nlabel = \"y\"\n[output]\ndataset = \"d\"\n";
        let spec = BatchSpec::parse(import).unwrap();
        for (edit, want) in [
            (import.replace("incoming/d/a.csv", "datasets/d/x"), "operator.files"),
            (import.replace("incoming/d/a.csv", "incoming/../x"), "operator.files"),
            (import.replace("label = \"y\"\n", ""), "operator.label"),
            (import.replace("format = \"csv\"", "format = \"idx\""), "operator.format"),
            (import.replace("[output]\ndataset = \"d\"", "[output]\ndataset = \"e\""), "output.dataset"),
            (import.replace("kind = \"import\"", "kind = \"stats\""), "operator.files: applies to kind = import"),
        ] {
            let e = BatchSpec::parse(&edit).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
        // A file's records, its statistics binned like the dataset's, labels among its classes.
        let base = shoal_proto::DatasetInfo { name: "d".into(), classes: 3, ..Default::default() };
        let (records, stats) = import_file(&spec.operator, "incoming/d/a.csv", b"a,b,y\n1,2,0\n3,4,2\n", &base).unwrap();
        assert_eq!((records.len(), records.feature_shape.clone(), stats.label_counts.clone()), (2, vec![2], vec![1, 0, 1]));
        let e = import_file(&spec.operator, "incoming/d/a.csv", b"a,b\n1,2\n", &base).unwrap_err().to_string();
        assert!(e.contains("incoming/d/a.csv") && e.contains("\"y\""), "{e}");
        let named = shoal_proto::DatasetInfo { class_names: vec!["cat".into(), "dog".into()], classes: 2, ..base };
        let e = import_file(&spec.operator, "f.csv", b"a,y\n1,cat\n2,emu\n", &named).unwrap_err().to_string();
        assert!(e.contains("\"emu\"") && e.contains("not classes of d"), "{e}");
    }

    #[test]
    fn tasks_follow_shards_within_the_range() {
        let shards: Vec<ShardInfo> = [100u64, 100, 50].iter().map(|&records| ShardInfo { records, ..Default::default() }).collect();
        assert_eq!(plan_tasks(&shards, [0, 250]), [(0, 100), (100, 200), (200, 250)]);
        assert_eq!(plan_tasks(&shards, [150, 210]), [(150, 200), (200, 210)]);
    }

    #[test]
    fn transforms_standardize_and_scale() {
        let stats = crate::stats::slice_stats(
            &crate::dataset::Records::classified(crate::idx::IdxData::F32(vec![1.0, 5.0, 3.0, 5.0]), vec![2], vec![0, 1]),
            None,
            2,
        );
        let t = fit_transform("standardize", &stats, String::new());
        let mut x = vec![1.0, 5.0, 3.0, 5.0];
        apply_transform(&t, &mut x);
        assert_eq!(x, [-1.0, 0.0, 1.0, 0.0]);
        let t = fit_transform("minmax", &stats, String::new());
        let mut x = vec![2.0, 5.0];
        apply_transform(&t, &mut x);
        assert_eq!(x, [0.5, 0.0]);
    }
}
