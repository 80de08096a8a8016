//! Runs as data: a job's metric history (`job metrics`: JSON, a table, Parquet) and runs side
//! by side (`job compare`: the spec keys that differ, final and best metrics).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use shoal_proto::JobInfo;

use crate::ops::{human, job_json};

/// The most jobs `job compare` takes at once.
pub const MAX_COMPARE: usize = 100;

/// The final figures `job compare` puts side by side (keys of `job_json`).
const COMPARED: [&str; 11] = ["state", "step", "epoch", "loss", "test_accuracy", "test_loss", "test_rmse", "test_r2", "test_bpb", "samples_per_s", "train_seconds"];

/// A spec's leaves as `path = value`: tables by dotted keys, arrays of tables by index
/// (`model.layers[3].out`), other arrays whole.
fn flatten_spec(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, Value>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_spec(&key, v, out);
            }
        }
        toml::Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_table()) => {
            for (i, v) in a.iter().enumerate() {
                flatten_spec(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), serde_json::to_value(other).unwrap_or(Value::Null));
        }
    }
}

/// The history's keys `job compare` finds the best of, and whether higher is better.
pub const BEST: [(&str, bool); 6] = [("loss", false), ("test_accuracy", true), ("test_loss", false), ("test_rmse", false), ("test_r2", true), ("test_bpb", false)];

/// `job compare`: the jobs' ids, the spec keys whose values differ (a key one spec lacks is
/// null there), the final metrics, and from each job's history (`histories`, in the same
/// order, rank 0) the best value of each `BEST` key and its step; each as one value per job
/// in the order given.
pub fn compare_json(jobs: &[JobInfo], histories: &[shoal_proto::JobMetrics]) -> Result<Value> {
    let mut specs = Vec::with_capacity(jobs.len());
    for j in jobs {
        let parsed: toml::Value = toml::from_str(&j.spec_toml).with_context(|| format!("job {}'s spec", j.id))?;
        let mut flat = std::collections::BTreeMap::new();
        flatten_spec("", &parsed, &mut flat);
        specs.push(flat);
    }
    let keys: std::collections::BTreeSet<&String> = specs.iter().flat_map(|s| s.keys()).collect();
    let mut differing = serde_json::Map::new();
    for k in keys {
        let values: Vec<Value> = specs.iter().map(|s| s.get(k).cloned().unwrap_or(Value::Null)).collect();
        if values.windows(2).any(|w| w[0] != w[1]) {
            differing.insert(k.clone(), Value::Array(values));
        }
    }
    let views: Vec<Value> = jobs.iter().map(job_json).collect();
    let mut metrics = serde_json::Map::new();
    for m in COMPARED {
        let values: Vec<Value> = views.iter().map(|v| v.get(m).cloned().unwrap_or(Value::Null)).collect();
        if values.iter().any(|v| !v.is_null()) {
            metrics.insert(m.to_string(), Value::Array(values));
        }
    }
    let (mut best, mut best_step) = (serde_json::Map::new(), serde_json::Map::new());
    for (key, higher) in BEST {
        let found: Vec<Option<(f64, u64)>> = histories
            .iter()
            .map(|h| {
                let s = h.series.iter().find(|s| s.key == key && s.rank == 0)?;
                let better = |a: f64, b: f64| if higher { a > b } else { a < b };
                s.values.iter().zip(&s.steps).filter(|(v, _)| v.is_finite()).fold(None, |acc: Option<(f64, u64)>, (&v, &step)| match acc {
                    Some((b, _)) if !better(v, b) => acc,
                    _ => Some((v, step)),
                })
            })
            .collect();
        if found.iter().any(Option::is_some) {
            best.insert(key.to_string(), Value::Array(found.iter().map(|f| f.map_or(Value::Null, |(v, _)| json!(v))).collect()));
            best_step.insert(key.to_string(), Value::Array(found.iter().map(|f| f.map_or(Value::Null, |(_, s)| json!(s))).collect()));
        }
    }
    Ok(json!({
        "jobs": jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        "names": jobs.iter().map(|j| j.name.clone()).collect::<Vec<_>>(),
        "differing": differing,
        "metrics": metrics,
        "best": best,
        "best_step": best_step,
    }))
}

/// `compare_json` as a table: one column per job.
pub fn compare_text(v: &Value) -> String {
    let ids: Vec<String> = v["jobs"].as_array().map(|a| a.iter().map(|i| format!("job {i}")).collect()).unwrap_or_default();
    let cell = |k: &str, x: &Value| if x.is_null() { "-".to_string() } else { human(k.rsplit('.').next().unwrap_or(k), x) };
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    for (section, key) in [("differing", "spec"), ("metrics", "final"), ("best", "best"), ("best_step", "best at step")] {
        if let Some(m) = v[section].as_object() {
            for (k, vals) in m {
                let vals = vals.as_array().map(|a| a.iter().map(|x| cell(k, x)).collect()).unwrap_or_default();
                rows.push((format!("{key} {k}"), vals));
            }
        }
    }
    let first = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(4);
    let widths: Vec<usize> = (0..ids.len()).map(|i| rows.iter().map(|(_, v)| v.get(i).map_or(0, |s| s.len())).max().unwrap_or(0).max(ids[i].len())).collect();
    let mut out = format!("{:first$}", "");
    for (id, w) in ids.iter().zip(&widths) {
        out.push_str(&format!("  {id:>w$}"));
    }
    out.push('\n');
    if v["differing"].as_object().is_some_and(|m| m.is_empty()) {
        out.push_str("(the specs are the same)\n");
    }
    for (k, vals) in rows {
        out.push_str(&format!("{k:first$}"));
        for (val, w) in vals.iter().zip(&widths) {
            out.push_str(&format!("  {val:>w$}"));
        }
        out.push('\n');
    }
    out
}

/// Writes the history as one Parquet table, a row per point: `key` (string), `rank`
/// (uint32), `step`, `unix_ms` (uint64), `value` (double); returns the rows. pandas, polars
/// and DuckDB read it as it is.
pub fn metrics_parquet(m: &shoal_proto::JobMetrics, out: &Path) -> Result<usize> {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
    use arrow_schema::{DataType, Field, Schema};

    let rows: usize = m.series.iter().map(|s| s.steps.len()).sum();
    let mut key = Vec::with_capacity(rows);
    let mut rank = Vec::with_capacity(rows);
    let (mut step, mut unix_ms, mut value) = (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows));
    for s in &m.series {
        let n = s.steps.len().min(s.values.len()).min(s.unix_ms.len());
        key.extend(std::iter::repeat_n(s.key.as_str(), n));
        rank.extend(std::iter::repeat_n(s.rank, n));
        step.extend_from_slice(&s.steps[..n]);
        unix_ms.extend_from_slice(&s.unix_ms[..n]);
        value.extend_from_slice(&s.values[..n]);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("unix_ms", DataType::UInt64, false),
        Field::new("value", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(key)),
        Arc::new(UInt32Array::from(rank)),
        Arc::new(UInt64Array::from(step)),
        Arc::new(UInt64Array::from(unix_ms)),
        Arc::new(Float64Array::from(value)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let tmp = out.with_extension("parquet.partial");
    let file = std::fs::File::create(&tmp)?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
    writer.write(&batch)?;
    writer.close()?;
    std::fs::rename(&tmp, out)?;
    Ok(batch.num_rows())
}

/// `job metrics --json`: every series with its points as parallel lists.
pub fn metrics_json(m: &shoal_proto::JobMetrics) -> Value {
    json!({
        "job_id": m.job_id,
        "dropped": m.dropped,
        "chunks": m.chunks,
        "chunks_unreadable": m.chunks_unreadable,
        "series": m.series.iter().map(|s| json!({"key": s.key, "rank": s.rank, "steps": s.steps, "unix_ms": s.unix_ms, "values": s.values})).collect::<Vec<_>>(),
    })
}

/// `job metrics` for a person: one line per series (its points, steps, last value, range).
pub fn metrics_text(m: &shoal_proto::JobMetrics) -> String {
    let mut out = format!("job {}: {} series from {} chunks", m.job_id, m.series.len(), m.chunks);
    if m.dropped > 0 || m.chunks_unreadable > 0 {
        out.push_str(&format!(" ({} points dropped, {} chunks unreadable)", m.dropped, m.chunks_unreadable));
    }
    out.push('\n');
    out.push_str(&format!("{:<28} {:>4} {:>8} {:>15} {:>12} {:>12} {:>12}\n", "KEY", "RANK", "POINTS", "STEPS", "LAST", "MIN", "MAX"));
    for s in &m.series {
        let steps = match (s.steps.first(), s.steps.last()) {
            (Some(a), Some(b)) => format!("{a}..{b}"),
            _ => "-".into(),
        };
        let fmt = |v: Option<f64>| v.map(|v| human(&s.key, &json!(v))).unwrap_or_else(|| "-".into());
        let min = s.values.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        let max = s.values.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        out.push_str(&format!("{:<28} {:>4} {:>8} {:>15} {:>12} {:>12} {:>12}\n", s.key, s.rank, s.values.len(), steps, fmt(s.values.last().copied()), fmt(min), fmt(max)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_names_the_keys_that_differ_and_lines_up_the_metrics() {
        let job = |id: u64, spec: &str, acc: f64| JobInfo {
            id,
            name: format!("j{id}"),
            spec_toml: spec.to_string(),
            progress: Some(shoal_proto::JobProgress { test_accuracy: acc, step: 10, ..Default::default() }),
            ..Default::default()
        };
        let a = "name = \"a\"\n[model]\n[[model.layers]]\nkind = \"linear\"\nout = 10\n[training]\nepochs = 2\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n";
        let b = a.replace("lr = 0.1", "lr = 0.05").replace("out = 10", "out = 12") + "[cluster]\nworkers = 3\n";
        let loss = |values: &[f64]| shoal_proto::JobMetrics {
            series: vec![shoal_proto::MetricSeries { key: "loss".into(), rank: 0, steps: (1..=values.len() as u64).collect(), unix_ms: vec![0; values.len()], values: values.to_vec() }],
            ..Default::default()
        };
        let v = compare_json(&[job(1, a, 0.9), job(2, &b, 0.95)], &[loss(&[2.0, 0.5, 0.7]), loss(&[1.0, f64::NAN, 0.9])]).unwrap();
        assert_eq!(v["best"]["loss"], json!([0.5, 0.9]), "the lowest loss, NaN skipped: {v}");
        assert_eq!(v["best_step"]["loss"], json!([2, 3]));
        assert!(v["best"].get("test_accuracy").is_none(), "no history of it: no row");
        let d = v["differing"].as_object().unwrap();
        let keys: Vec<&str> = d.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["cluster.workers", "model.layers[0].out", "training.optimizer.lr"], "{v}");
        assert_eq!(d["training.optimizer.lr"], json!([0.1, 0.05]));
        assert_eq!(d["cluster.workers"], json!([null, 3]), "a key one spec lacks is null there");
        assert_eq!(v["metrics"]["step"], json!([10, 10]));
        let acc: Vec<f64> = v["metrics"]["test_accuracy"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!((acc[0] - 0.9).abs() < 1e-6 && (acc[1] - 0.95).abs() < 1e-6, "{v}");
        let text = compare_text(&v);
        assert!(text.contains("spec training.optimizer.lr") && text.contains("0.0500") && text.contains("job 2"), "{text}");
        assert!(compare_json(&[job(1, "name = [", 0.0), job(2, a, 0.0)], &[]).is_err(), "a spec that does not parse is an error");
    }
}
