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

/// Starts logging to stderr in the format `SHOAL_LOG_FORMAT` names (`RUST_LOG` filters).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::env::var(FORMAT_VAR).is_ok_and(|f| f == "json") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).fmt_fields(JsonFields::new()).event_format(JsonLines).with_writer(std::io::stderr).try_init();
        return;
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
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
