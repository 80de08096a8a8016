//! The parameters of the steps the coordinator does or plans itself, as rendered (references
//! replaced): validate, register, gate, append, and the score spec of evaluate and gate.

/// A batch spec that scores `model` on `dataset` (`NAME` or `NAME@VERSION`) and only measures.
pub(super) fn score_spec(
    name: &str,
    model: &str,
    dataset: &str,
    records: Option<&toml::Value>,
    transform: Option<String>,
    batch_size: Option<&toml::Value>,
    workers: Option<&toml::Value>,
) -> std::result::Result<String, String> {
    let (set, version) = match dataset.split_once('@') {
        Some((n, v)) => (n.to_string(), Some(v.parse::<u64>().map_err(|_| format!("dataset: {dataset:?} is not NAME or NAME@VERSION"))?)),
        None => (dataset.to_string(), None),
    };
    let mut input = toml::Table::new();
    input.insert("dataset".into(), toml::Value::String(set));
    if let Some(v) = version {
        input.insert("version".into(), toml::Value::Integer(v as i64));
    }
    if let Some(r) = records {
        input.insert("records".into(), r.clone());
    }
    let mut operator = toml::Table::new();
    operator.insert("kind".into(), toml::Value::String("score".into()));
    operator.insert("model".into(), toml::Value::String(model.to_string()));
    if let Some(t) = transform {
        operator.insert("transform".into(), toml::Value::String(t));
    }
    if let Some(b) = batch_size {
        operator.insert("batch_size".into(), b.clone());
    }
    let mut spec = toml::Table::new();
    spec.insert("name".into(), toml::Value::String(name.to_string()));
    spec.insert("kind".into(), toml::Value::String("batch".into()));
    spec.insert("input".into(), toml::Value::Table(input));
    spec.insert("operator".into(), toml::Value::Table(operator));
    if let Some(w) = workers {
        let mut cluster = toml::Table::new();
        cluster.insert("workers".into(), w.clone());
        spec.insert("cluster".into(), toml::Value::Table(cluster));
    }
    toml::to_string(&spec).map_err(|e| e.to_string())
}

/// A gate step as rendered: `[promote]`'s rule over a registered model.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// The candidate: `NAME@VERSION` (a register step's `model` output).
    pub model: String,
    pub alias: String,
    #[serde(default = "default_gate_metric")]
    pub metric: String,
    #[serde(default)]
    pub min_delta: f64,
    /// `DATASET` or `DATASET@VERSION`: both models are scored on its records.
    pub holdout: String,
    pub records: Option<[u64; 2]>,
    pub workers: Option<u32>,
    pub batch_size: Option<u32>,
}

fn default_gate_metric() -> String {
    "test_accuracy".into()
}

impl Gate {
    pub fn parse(rendered: &str) -> std::result::Result<Gate, String> {
        let g: Gate = toml::from_str(rendered).map_err(|e| e.to_string().trim().to_string())?;
        if crate::spec::metric_higher_is_better(&g.metric).is_none() {
            return Err(format!("metric: {:?} is not one of test_accuracy, test_r2 (higher is better), test_loss, test_rmse, test_bpb (lower is better)", g.metric));
        }
        if !g.min_delta.is_finite() || g.min_delta.abs() > 1e6 {
            return Err(format!("min_delta: {} is not a finite number of sensible size", g.min_delta));
        }
        crate::dataset::validate_name(&g.alias).map_err(|e| format!("alias: {e}"))?;
        g.candidate()?;
        Ok(g)
    }

    /// The candidate's (name, version).
    pub fn candidate(&self) -> std::result::Result<(String, u64), String> {
        match self.model.split_once('@') {
            Some((n, v)) if !n.is_empty() => Ok((n.to_string(), v.parse().map_err(|_| format!("model: {:?} is not NAME@VERSION (a register step's model output)", self.model))?)),
            _ => Err(format!("model: {:?} is not NAME@VERSION (a register step's model output)", self.model)),
        }
    }

    /// The batch spec that scores `model` (`NAME@VERSION`) on the holdout, metrics only.
    pub fn score_spec(&self, step: &str, model: &str) -> std::result::Result<String, String> {
        let records = self.records.map(|[a, b]| toml::Value::Array(vec![toml::Value::Integer(a as i64), toml::Value::Integer(b as i64)]));
        let int = |v: Option<u32>| v.map(|x| toml::Value::Integer(x as i64));
        score_spec(step, model, &self.holdout, records.as_ref(), None, int(self.batch_size).as_ref(), int(self.workers).as_ref())
    }

    /// Whether `candidate` passes against `holder` by the metric's direction and `min_delta`.
    pub fn passes(&self, candidate: f64, holder: f64) -> bool {
        if crate::spec::metric_higher_is_better(&self.metric).unwrap_or(true) {
            candidate >= holder + self.min_delta
        } else {
            candidate <= holder - self.min_delta
        }
    }
}

/// An append step as rendered.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Append {
    pub dataset: String,
    /// Under `incoming/`, ending in `/` (default `incoming/DATASET/`).
    pub prefix: Option<String>,
    pub format: String,
    pub label: Option<String>,
    pub target: Option<String>,
    pub workers: Option<u32>,
}

impl Append {
    pub fn parse(rendered: &str) -> std::result::Result<Append, String> {
        let a: Append = toml::from_str(rendered).map_err(|e| e.to_string().trim().to_string())?;
        crate::dataset::validate_name(&a.dataset).map_err(|e| format!("dataset: {e}"))?;
        let p = a.prefix();
        if !p.starts_with("incoming/") || !p.ends_with('/') || crate::store::check_key(p.trim_end_matches('/')).is_err() {
            return Err(format!("prefix: {p:?} is not a folder under incoming/ (such as \"incoming/{}/\")", a.dataset));
        }
        Ok(a)
    }

    /// Where its files are: `prefix`, or `incoming/DATASET/`.
    pub fn prefix(&self) -> String {
        self.prefix.clone().unwrap_or_else(|| format!("incoming/{}/", self.dataset))
    }

    /// Whether a file under the prefix is one this step reads (by its extension).
    pub fn reads(&self, key: &str) -> bool {
        key.rsplit('/').next().is_some_and(|n| n.to_ascii_lowercase().ends_with(&format!(".{}", self.format)))
    }

    /// The batch import of `files` into the dataset.
    pub fn batch_spec(&self, step: &str, files: &[String]) -> std::result::Result<String, String> {
        let mut operator = toml::Table::new();
        operator.insert("kind".into(), toml::Value::String("import".into()));
        operator.insert("files".into(), toml::Value::Array(files.iter().map(|f| toml::Value::String(f.clone())).collect()));
        operator.insert("format".into(), toml::Value::String(self.format.clone()));
        for (k, v) in [("label", &self.label), ("target", &self.target)] {
            if let Some(v) = v {
                operator.insert(k.into(), toml::Value::String(v.clone()));
            }
        }
        let one = |k: &str, v: &str| toml::Table::from_iter([(k.to_string(), toml::Value::String(v.to_string()))]);
        let mut spec = toml::Table::new();
        spec.insert("name".into(), toml::Value::String(step.to_string()));
        spec.insert("kind".into(), toml::Value::String("batch".into()));
        spec.insert("input".into(), toml::Value::Table(one("dataset", &self.dataset)));
        spec.insert("operator".into(), toml::Value::Table(operator));
        spec.insert("output".into(), toml::Value::Table(one("dataset", &self.dataset)));
        if let Some(w) = self.workers {
            spec.insert("cluster".into(), toml::Value::Table(toml::Table::from_iter([("workers".to_string(), toml::Value::Integer(w as i64))])));
        }
        toml::to_string(&spec).map_err(|e| e.to_string())
    }
}

/// A validate step as rendered.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    /// `NAME` (the newest version) or `NAME@VERSION`.
    pub dataset: String,
    pub min_records: Option<u64>,
    pub max_label_js: Option<f64>,
    pub max_feature_js: Option<f64>,
    pub feature_shape: Option<Vec<u64>>,
    pub classes: Option<u32>,
}

impl Validation {
    pub fn parse(rendered: &str) -> std::result::Result<Validation, String> {
        let v: Validation = toml::from_str(rendered).map_err(|e| e.to_string().trim().to_string())?;
        v.reference()?;
        for (key, js) in [("max_label_js", v.max_label_js), ("max_feature_js", v.max_feature_js)] {
            if js.is_some_and(|x| !(0.0..=1.0).contains(&x)) {
                return Err(format!("{key}: a Jensen-Shannon divergence is 0 to 1"));
            }
        }
        Ok(v)
    }

    /// (name, version; 0: the newest).
    pub fn reference(&self) -> std::result::Result<(String, u64), String> {
        match self.dataset.split_once('@') {
            None => Ok((self.dataset.clone(), 0)),
            Some((n, v)) => Ok((n.to_string(), v.parse().map_err(|_| format!("dataset: {:?} is not NAME or NAME@VERSION", self.dataset))?)),
        }
    }
}

/// A register step as rendered: the model (`job:N`), the registry name and an alias.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    pub job: u64,
    pub name: String,
    pub alias: String,
}

impl Registration {
    pub fn parse(rendered: &str) -> std::result::Result<Registration, String> {
        let t: toml::Table = toml::from_str(rendered).map_err(|e| e.to_string())?;
        let get = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let model = get("model");
        let job = model.strip_prefix("job:").and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| format!("model: {model:?} is not job:N (a train step's model output)"))?;
        Ok(Registration { job, name: get("as"), alias: get("alias") })
    }
}
