//! The processes' logs: tracing's plain text (the default) or, with `--log-format json` (or
//! `SHOAL_LOG_FORMAT=json`, which `shoal up` passes on to what it starts), one JSON object a
//! line: `timestamp`, `level`, `target`, `node` (this process: `coordinator-1`, or a worker's
//! id once registered), the fields of the spans it is in (a job's lines carry `job_id` and
//! `rank`, or `attempt` for a batch task), then the event's own fields (`message`, ...).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable that selects the format (`text` or `json`).
pub const FORMAT_VAR: &str = "SHOAL_LOG_FORMAT";

/// Starts logging to stderr in the format `SHOAL_LOG_FORMAT` names (`RUST_LOG` filters);
/// with `job_logs` (a worker's store), a job's lines also go to the job's log files there
/// (`JobLogs`).
pub fn init(job_logs: Option<std::path::PathBuf>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let jobs = job_logs.map(JobLogs::start);
    let registry = tracing_subscriber::registry().with(filter).with(jobs);
    if std::env::var(FORMAT_VAR).is_ok_and(|f| f == "json") {
        let _ = registry.with(tracing_subscriber::fmt::layer().fmt_fields(JsonFields::new()).event_format(JsonLines).with_writer(std::io::stderr)).try_init();
        return;
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let _ = registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).try_init();
}

/// Most bytes one job log file takes; past it, its lines are dropped (the file says so once).
const JOB_LOG_MAX: u64 = 4 << 20;

/// A job's log lines in the store, where any coordinator's dashboard reads their tail: each
/// event inside a `job` span (a training task: `job_id`, `rank`, `generation`; a batch
/// attempt: `job_id`, `attempt`) becomes one line `TIMESTAMP LEVEL message key=value...` in
/// `jobs/ID/logs/NODE-LABEL.log`. Lines pass through a bounded queue to a writer thread: a
/// full queue drops a line, never blocks the task.
pub struct JobLogs {
    tx: std::sync::mpsc::SyncSender<(u64, String, String)>,
}

/// A `job` span's identity, kept in its extensions.
struct JobTag {
    job_id: u64,
    label: String,
}

impl JobLogs {
    fn start(store: std::path::PathBuf) -> JobLogs {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, String, String)>(1024);
        let spawned = std::thread::Builder::new().name("job-logs".into()).spawn(move || {
            let mut sizes: std::collections::HashMap<std::path::PathBuf, u64> = Default::default();
            for (job, label, line) in rx {
                let node = shoal_core::node::node();
                let dir = store.join(format!("jobs/{job}/logs"));
                let path = dir.join(format!("{}-{label}.log", if node.is_empty() { "worker".into() } else { node }));
                // Sizes of the files written lately (re-read from the file system when forgotten).
                if sizes.len() > 1024 {
                    sizes.clear();
                }
                let size = sizes.entry(path.clone()).or_insert_with(|| std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
                if *size >= JOB_LOG_MAX {
                    continue;
                }
                let full = *size + line.len() as u64 > JOB_LOG_MAX;
                let line = if full { "(the rest of this task's lines are not kept: the file reached its limit)\n".to_string() } else { line };
                let _ = std::fs::create_dir_all(&dir);
                let written = std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
                if full {
                    *size = JOB_LOG_MAX;
                } else if written.is_ok() {
                    *size += line.len() as u64;
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("no job log files: {e}");
        }
        JobLogs { tx }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for JobLogs {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if attrs.metadata().name() != "job" {
            return;
        }
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        let Some(job_id) = fields.get("job_id").and_then(Value::as_u64) else { return };
        let part = |k: &str, p: &str| fields.get(k).and_then(Value::as_u64).map(|v| format!("{p}{v}"));
        let label = [part("generation", "g"), part("rank", "r"), part("attempt", "a")].into_iter().flatten().collect::<Vec<_>>().join("-");
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(JobTag { job_id, label });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else { return };
        let Some((job_id, label)) = scope.into_iter().find_map(|s| s.extensions().get::<JobTag>().map(|t| (t.job_id, t.label.clone()))) else { return };
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let message = fields.remove("message").map(|m| m.as_str().map(str::to_string).unwrap_or_else(|| m.to_string())).unwrap_or_default();
        let mut line = format!("{} {:<5} {message}", crate::ops::utc(now), event.metadata().level().as_str());
        for (k, v) in fields {
            let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            line.push_str(&format!(" {k}={v}"));
        }
        line = line.replace('\n', " ");
        line.push('\n');
        let _ = self.tx.try_send((job_id, label, line));
    }
}

/// The last `n` lines of job `job`'s log files in `store`, across its tasks, oldest first
/// (each line starts with its UTC time, so they sort as text), each with its file's name.
pub fn job_log_tail(store: &std::path::Path, job: u64, n: usize) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    let Ok(dir) = std::fs::read_dir(store.join(format!("jobs/{job}/logs"))) else { return lines };
    // Files only: a symbolic link could lead out of the store.
    for e in dir.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_file())) {
        let name = e.file_name().to_string_lossy().trim_end_matches(".log").to_string();
        let Ok(mut f) = std::fs::File::open(e.path()) else { continue };
        // The last 64 KiB of each file hold far more than `n` lines.
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = len.saturating_sub(64 << 10);
        let mut bytes = Vec::new();
        if std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from)).is_err() || std::io::Read::read_to_end(&mut f, &mut bytes).is_err() {
            continue;
        }
        // The cut may fall inside a character: its bytes show as U+FFFD in the dropped line.
        let text = String::from_utf8_lossy(&bytes);
        let mut it = text.lines();
        if from > 0 {
            it.next(); // a partial line
        }
        lines.extend(it.map(|l| (l.to_string(), name.clone())));
    }
    lines.sort();
    let skip = lines.len().saturating_sub(n);
    lines.into_iter().skip(skip).map(|(l, f)| (f, l)).collect()
}

/// One JSON object a line (see the module).
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(crate::ops::utc(now)));
        line.insert("level".into(), Value::String(meta.level().as_str().to_ascii_lowercase()));
        line.insert("target".into(), Value::String(meta.target().into()));
        let node = shoal_core::node::node();
        if !node.is_empty() {
            line.insert("node".into(), Value::String(node));
        }
        // The spans' fields, outermost first (formatted as JSON objects by `JsonFields`).
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(fields) = ext.get::<FormattedFields<N>>() else { continue };
                if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(fields) {
                    line.extend(m);
                }
            }
        }
        event.record(&mut Fields(&mut line));
        writeln!(w, "{}", Value::Object(line))
    }
}

/// An event's fields into the line's object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.into()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_jobs_lines_are_json_objects_with_its_fields() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt().fmt_fields(JsonFields::new()).event_format(JsonLines).with_writer(move || out.clone()).finish();
        shoal_core::node::set_node("w7");
        tracing::subscriber::with_default(subscriber, || {
            let _job = tracing::info_span!("job", job_id = 12u64, rank = 1u32).entered();
            tracing::info!(step = 40u64, loss = 0.5f64, why = %"a \"quoted\" reason", "epoch done");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!((v["node"].as_str(), v["job_id"].as_u64(), v["rank"].as_u64()), (Some("w7"), Some(12), Some(1)), "{v}");
        assert_eq!((v["message"].as_str(), v["step"].as_u64(), v["loss"].as_f64(), v["level"].as_str()), (Some("epoch done"), Some(40), Some(0.5), Some("info")), "{v}");
        assert_eq!(v["why"], "a \"quoted\" reason");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    }
}
