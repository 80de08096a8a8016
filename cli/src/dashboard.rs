//! The dashboard: HTML pages served by every coordinator beside `/metrics` (`http::start`),
//! rendered on the server from the same replies the CLI reads (no JavaScript, no build step:
//! the style sheet is a string in this file). Every page reads through a client whose first
//! endpoint is this coordinator and whose others are its peers, so a page loads while any
//! replica, the leader included, is down (reads are linearized wherever they are served).
//!
//! Pages: `/` (the cluster: coordinators with role, term and commit index; workers with state
//! and job), `/jobs` (paged on the server, `?page=`), `/jobs/ID` (curves of the loss, the test
//! metrics and the throughput, the step-time breakdown per rank, membership generations,
//! checkpoints, events, the tail of its tasks' log lines), `/compare?jobs=1,2` (curves overlaid, the spec keys that differ),
//! `/datasets`, `/datasets/NAME` (versions, slices, drift), `/models`, `/models/NAME`
//! (versions, aliases, lineage). Curves come decimated (`core::history::decimate`: at most
//! 1,000 points per series, each bucket's lowest and highest) and drawn as inline SVG; each
//! point is an element of the polyline's `points` attribute, counted in `data-points`.

use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use serde_json::Value;
use shoal_coordinator::Client;
use shoal_proto::*;

use crate::{ops, runs};

/// What the pages read through.
#[derive(Clone)]
pub struct Dashboard {
    /// This coordinator first, then its peers.
    pub endpoints: Vec<String>,
    /// The store, where a job's log files are (`logs::JobLogs`).
    /// None: an object store (its jobs' lines stay in the workers' own logs).
    pub store: Option<std::path::PathBuf>,
    /// What its reads carry: this coordinator's peer token (None without credentials).
    pub token: Option<String>,
    /// And its certificate (None: plaintext).
    pub tls: Option<shoal_coordinator::tls::TlsFiles>,
}

impl Dashboard {
    fn client(&self) -> Result<Client, String> {
        self.client_of(&self.endpoints, 5)
    }

    fn client_of(&self, endpoints: &[String], deadline_s: u64) -> Result<Client, String> {
        Client::new(endpoints).and_then(|c| c.with_token(self.token.as_deref())).and_then(|c| c.with_tls(self.tls.clone())).map(|c| c.with_deadline(std::time::Duration::from_secs(deadline_s))).map_err(|e| e.to_string())
    }
}

/// The routes, to merge into the HTTP server's router.
pub fn routes(d: Dashboard) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(cluster))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/compare", get(compare))
        .route("/datasets", get(datasets))
        .route("/datasets/{name}", get(dataset))
        .route("/models", get(models))
        .route("/models/{name}", get(model))
        .route("/style.css", get(|| async { ([(axum::http::header::CONTENT_TYPE, "text/css")], STYLE) }))
        .with_state(d)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
nav a{margin-right:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:left;font-size:.9em}\
th{background:#f4f4f4}svg{background:#fcfcfc;border:1px solid #ddd;margin:.3em}\
.legend span{margin-right:1em}.err{color:#a00}h2{margin-top:1.2em}";

/// Log lines a job's page shows.
const LOG_TAIL: usize = 50;

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Text safe inside HTML elements and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, body: &str) -> Response {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} - shoal</title><link rel=\"stylesheet\" href=\"/style.css\"></head>\
         <body><nav><a href=\"/\">cluster</a><a href=\"/jobs\">jobs</a><a href=\"/datasets\">datasets</a><a href=\"/models\">models</a></nav>\
         <h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    ))
    .into_response()
}

fn error_page(what: &str, e: impl std::fmt::Display) -> Response {
    let mut r = page(what, &format!("<p class=\"err\" id=\"error\">{}</p>", esc(&e.to_string())));
    *r.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
    r
}

/// A table: a header row and rows of cells (already HTML); `id` names it for tests.
fn table(id: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("<table id=\"{id}\"><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

/// A JSON value as a cell: as `job status` prints it for people.
fn cell(key: &str, v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    esc(&ops::human(key, v))
}

fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", esc(href), esc(text))
}

/// One chart of curves (label, steps, values), each decimated, drawn in SVG with its axes'
/// ranges printed. Empty curves are skipped; no curve at all gives a note.
fn chart(id: &str, title: &str, curves: &[(String, Vec<u64>, Vec<f64>)]) -> String {
    let drawn: Vec<(String, Vec<u64>, Vec<f64>)> = curves
        .iter()
        .filter(|(_, s, _)| !s.is_empty())
        .map(|(l, s, v)| {
            let (s, v) = shoal_core::history::decimate(s, v, shoal_core::history::MAX_DRAWN);
            (l.clone(), s, v)
        })
        .collect();
    if drawn.is_empty() {
        return format!("<p id=\"{id}\">{}: no points recorded</p>", esc(title));
    }
    let (w, h, pad) = (640.0, 240.0, 8.0);
    let finite = |v: &f64| v.is_finite();
    let (x0, x1) = drawn.iter().flat_map(|c| c.1.iter()).fold((u64::MAX, 0), |(a, b), &s| (a.min(s), b.max(s)));
    let (y0, y1) = drawn.iter().flat_map(|c| c.2.iter().filter(|v| finite(v))).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (y0, y1) = if y0.is_finite() { (y0, y1) } else { (0.0, 1.0) };
    let xspan = (x1.saturating_sub(x0)).max(1) as f64;
    let mut s = format!("<div class=\"chart\" id=\"{id}\"><h3>{}</h3><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">", esc(title));
    for (i, (label, steps, values)) in drawn.iter().enumerate() {
        let mut pts = String::new();
        let mut count = 0;
        for (&st, &v) in steps.iter().zip(values).filter(|(_, v)| finite(v)) {
            let x = pad + (st - x0) as f64 / xspan * (w - 2.0 * pad);
            let y = h - pad - shoal_core::history::position(v, y0, y1) * (h - 2.0 * pad);
            let _ = write!(pts, "{x:.1},{y:.1} ");
            count += 1;
        }
        let color = COLORS[i % COLORS.len()];
        let _ = write!(
            s,
            "<polyline class=\"curve\" data-label=\"{}\" data-points=\"{count}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            esc(label),
            pts.trim_end()
        );
        // Few points (evaluations): each marked, so a single one shows.
        if count <= 60 {
            for xy in pts.split_whitespace() {
                if let Some((x, y)) = xy.split_once(',') {
                    let _ = write!(s, "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>");
                }
            }
        }
    }
    s.push_str("</svg><div class=\"legend\">");
    for (i, (label, steps, _)) in drawn.iter().enumerate() {
        let _ = write!(s, "<span style=\"color:{}\">&#9632; {} ({} points drawn)</span>", COLORS[i % COLORS.len()], esc(label), steps.len());
    }
    let _ = write!(s, "</div><p>steps {x0} to {x1}; values {} to {}</p></div>", ops::human("", &serde_json::json!(y0)), ops::human("", &serde_json::json!(y1)));
    s
}

/// GET / : the coordinators (each asked for its own view) and the workers.
async fn cluster(State(d): State<Dashboard>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("cluster", e),
    };
    let status = match client.call(|mut c| async move { c.get_status(StatusRequest::default()).await }).await {
        Ok(s) => s,
        Err(e) => return error_page("cluster", e),
    };
    let mut rows = Vec::new();
    let addresses: Vec<(u64, String)> = status.peers.iter().map(|p| (p.id, p.address.clone())).collect();
    for (id, addr) in addresses {
        let one = d.client_of(std::slice::from_ref(&addr), 2);
        let node = match one {
            Ok(c) => c.call(|mut c| async move { c.get_status(StatusRequest::default()).await }).await.ok().and_then(|s| s.node),
            Err(_) => None,
        };
        rows.push(match node {
            Some(n) => vec![n.id.to_string(), esc(&n.address), esc(&n.role), n.term.to_string(), n.commit_index.to_string(), n.applied_index.to_string()],
            None => vec![id.to_string(), esc(&addr), "unreachable".into(), "-".into(), "-".into(), "-".into()],
        });
    }
    let workers: Vec<Vec<String>> = status
        .workers
        .iter()
        .map(|w| {
            let state = WorkerState::try_from(w.state).map(|s| s.as_str_name().to_lowercase().trim_start_matches("worker_state_").to_string()).unwrap_or_default();
            let job = if w.job_id > 0 { link(&format!("/jobs/{}", w.job_id), &w.job_id.to_string()) } else { "-".into() };
            vec![esc(&w.id), esc(&state), job, esc(&w.address), esc(&w.device)]
        })
        .collect();
    let body = format!(
        "<h2>Coordinators</h2>{}<h2>Workers</h2>{}",
        table("coordinators", &["id", "address", "role", "term", "commit index", "applied index"], &rows),
        table("workers", &["id", "state", "job", "address", "device"], &workers)
    );
    page("cluster", &body)
}

#[derive(serde::Deserialize)]
struct PageQuery {
    #[serde(default)]
    page: String,
    #[serde(default)]
    group: String,
}

/// GET /jobs : one page of at most 100 jobs, newest first.
async fn jobs(State(d): State<Dashboard>, Query(q): Query<PageQuery>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("jobs", e),
    };
    let req = ListJobsRequest { page: q.page.clone(), group: q.group.clone() };
    let r = match client.call(|mut c| { let req = req.clone(); async move { c.list_jobs(req).await } }).await {
        Ok(r) => r,
        Err(e) => return error_page("jobs", e),
    };
    let rows: Vec<Vec<String>> = r
        .jobs
        .iter()
        .map(|j| {
            let v = ops::job_json(j);
            let metric = ["test_accuracy", "test_bpb", "test_r2", "test_loss"].iter().find(|k| !v[**k].is_null()).map(|k| format!("{k} {}", cell(k, &v[*k]))).unwrap_or_else(|| "-".into());
            vec![
                link(&format!("/jobs/{}", j.id), &j.id.to_string()),
                esc(&j.name),
                esc(j.state().label()),
                format!("{}/{}", cell("step", &v["step"]), cell("total_steps", &v["total_steps"])),
                cell("loss", &v["loss"]),
                metric,
                cell("group", &v["group"]),
            ]
        })
        .collect();
    let mut body = table("jobs", &["id", "name", "state", "step", "loss", "test metric", "group"], &rows);
    if !r.next_page.is_empty() {
        let group: String = q.group.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        let _ = write!(body, "<p><a id=\"next\" href=\"/jobs?page={}&group={group}\">next page</a></p>", esc(&r.next_page));
    }
    page("jobs", &body)
}

/// The series a job's page draws.
const JOB_PAGE_KEYS: [&str; 10] =
    ["loss", "samples_per_s", "test_accuracy", "test_loss", "test_bpb", "test_r2", "phase_data_ms", "phase_forward_backward_ms", "phase_collective_ms", "phase_optimizer_ms"];

/// Job `id`'s series of `keys` (only those: a long run's whole history is far larger).
async fn history(client: &Client, id: u64, keys: &[&str]) -> Result<JobMetrics, String> {
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    client
        .call(|mut c| { let keys = keys.clone(); async move { c.get_job_metrics(JobMetricsRequest { id, keys }).await } })
        .await
        .map_err(|e| format!("job {id}'s metric history could not be read: {e}"))
}

fn series<'a>(h: &'a JobMetrics, key: &str) -> impl Iterator<Item = &'a MetricSeries> + 'a {
    let key = key.to_string();
    h.series.iter().filter(move |s| s.key == key)
}

/// GET /jobs/ID
async fn job(State(d): State<Dashboard>, Path(id): Path<u64>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("job", e),
    };
    let j = match ops::get_job(&client, id).await {
        Ok(j) => j,
        Err(e) => return error_page(&format!("job {id}"), e),
    };
    let v = ops::job_json(&j);
    let mut body = String::new();
    let h = match history(&client, id, &JOB_PAGE_KEYS).await {
        Ok(h) => h,
        Err(e) => {
            let _ = write!(body, "<p class=\"err\" id=\"history-error\">{}</p>", esc(&e));
            JobMetrics::default()
        }
    };
    let summary: Vec<Vec<String>> = ["state", "step", "total_steps", "loss", "test_accuracy", "test_loss", "test_bpb", "test_r2", "samples_per_s", "train_seconds", "transport", "world_size", "dataset", "registered_model", "error"]
        .iter()
        .filter(|k| !v[**k].is_null())
        .map(|k| vec![esc(k), cell(k, &v[*k])])
        .collect();
    body.push_str(&table("summary", &["key", "value"], &summary));
    let curve = |key: &str| series(&h, key).filter(|s| s.rank == 0).map(|s| (key.to_string(), s.steps.clone(), s.values.clone())).collect::<Vec<_>>();
    body.push_str(&chart("loss", "loss", &curve("loss")));
    for key in ["test_accuracy", "test_loss", "test_bpb", "test_r2"] {
        let c = curve(key);
        if !c.is_empty() {
            body.push_str(&chart(key, &format!("{key} (each evaluation)"), &c));
        }
    }
    body.push_str(&chart("throughput", "samples_per_s", &curve("samples_per_s")));
    // The step-time breakdown: each rank's mean of each phase over the run.
    let mut phases: std::collections::BTreeMap<u32, Vec<(String, f64)>> = Default::default();
    for s in h.series.iter().filter(|s| s.key.starts_with("phase_")) {
        let mean = s.values.iter().sum::<f64>() / s.values.len().max(1) as f64;
        phases.entry(s.rank).or_default().push((s.key.trim_start_matches("phase_").to_string(), mean));
    }
    let phase_names: Vec<String> = phases.values().next().map(|p| p.iter().map(|(k, _)| k.clone()).collect()).unwrap_or_default();
    let phase_rows: Vec<Vec<String>> = phases.iter().map(|(rank, p)| std::iter::once(rank.to_string()).chain(p.iter().map(|(k, m)| cell(k, &serde_json::json!(m)))).collect()).collect();
    let head: Vec<&str> = std::iter::once("rank").chain(phase_names.iter().map(String::as_str)).collect();
    body.push_str("<h2>Step time per rank (mean)</h2>");
    body.push_str(&table("phases", &head, &phase_rows));
    let members: Vec<Vec<String>> = j.membership.iter().map(|m| vec![m.generation.to_string(), esc(&m.cause), m.step.to_string(), esc(&m.workers.join(", ")), esc(&m.detail)]).collect();
    body.push_str("<h2>Membership generations</h2>");
    body.push_str(&table("membership", &["generation", "cause", "from step", "workers", "detail"], &members));
    let checkpoints: Vec<Vec<String>> = j
        .checkpoints
        .iter()
        .map(|c| vec![c.step.to_string(), c.epoch.to_string(), c.world_size.to_string(), cell("bytes", &serde_json::json!(c.files.iter().map(|f| f.bytes).sum::<u64>())), esc(&ops::utc(c.committed_unix_ms))])
        .collect();
    body.push_str("<h2>Checkpoints</h2>");
    body.push_str(&table("checkpoints", &["step", "epoch", "world size", "bytes", "committed"], &checkpoints));
    // The job's trail, newest last: its events and its end.
    let mut log: Vec<Vec<String>> = j.events.iter().map(|e| vec![esc(&ops::utc(e.unix_ms)), esc(&e.event), e.generation.to_string(), e.step.to_string(), esc(&e.error)]).collect();
    if !j.error.is_empty() {
        log.push(vec!["-".into(), "error".into(), j.generation.to_string(), "-".into(), esc(&j.error)]);
    }
    body.push_str("<h2>Events</h2>");
    body.push_str(&table("events", &["when", "event", "generation", "step", "detail"], &log));
    // The tail of its tasks' log lines, from the store (file IO: off the async threads).
    let store = d.store.clone();
    let tail = match store {
        Some(store) => tokio::task::spawn_blocking(move || crate::logs::job_log_tail(&store, id, LOG_TAIL)).await.unwrap_or_default(),
        None => Vec::new(),
    };
    let tail: Vec<Vec<String>> = tail.iter().map(|(task, line)| vec![esc(task), format!("<code>{}</code>", esc(line))]).collect();
    let _ = write!(body, "<h2>Log (the last {LOG_TAIL} lines of its tasks)</h2>");
    body.push_str(&table("log", &["task", "line"], &tail));
    let _ = write!(body, "<p>{}</p>", link(&format!("/compare?jobs={id}"), "compare with others"));
    page(&format!("job {id} ({})", j.name), &body)
}

#[derive(serde::Deserialize)]
struct CompareQuery {
    #[serde(default)]
    jobs: String,
}

/// GET /compare?jobs=1,2,3 : the loss curves overlaid, the spec keys that differ, final and
/// best metrics.
async fn compare(State(d): State<Dashboard>, Query(q): Query<CompareQuery>) -> Response {
    let ids: Result<Vec<u64>, _> = q.jobs.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse::<u64>()).collect();
    let ids = match ids {
        Ok(mut ids) if !ids.is_empty() && ids.len() <= 20 => {
            // Each job once.
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(*id));
            ids
        }
        _ => return error_page("compare", format!("?jobs= must name 1 to 20 job ids, comma-separated; got {:?}", q.jobs)),
    };
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("compare", e),
    };
    let (mut jobs, mut histories) = (Vec::new(), Vec::new());
    for &id in &ids {
        match ops::get_job(&client, id).await {
            Ok(j) => jobs.push(j),
            Err(e) => return error_page("compare", e),
        }
        match history(&client, id, &runs::BEST.map(|(k, _)| k)).await {
            Ok(h) => histories.push(h),
            Err(e) => return error_page("compare", e),
        }
    }
    let v = match runs::compare_json(&jobs, &histories) {
        Ok(v) => v,
        Err(e) => return error_page("compare", e),
    };
    let mut body = String::new();
    for key in ["loss", "test_accuracy", "test_loss", "test_bpb"] {
        let curves: Vec<_> = jobs.iter().zip(&histories).flat_map(|(j, h)| series(h, key).filter(|s| s.rank == 0).map(move |s| (format!("job {} {key}", j.id), s.steps.clone(), s.values.clone()))).collect();
        if !curves.is_empty() {
            body.push_str(&chart(&format!("compare-{key}"), key, &curves));
        }
    }
    let head: Vec<String> = std::iter::once("".to_string()).chain(ids.iter().map(|i| format!("job {i}"))).collect();
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    for (section, title) in [("differing", "Spec keys that differ"), ("metrics", "Final"), ("best", "Best")] {
        let rows: Vec<Vec<String>> = v[section]
            .as_object()
            .map(|m| m.iter().map(|(k, vals)| std::iter::once(esc(k)).chain(vals.as_array().into_iter().flatten().map(|x| cell(k.rsplit('.').next().unwrap_or(k), x))).collect()).collect())
            .unwrap_or_default();
        let _ = write!(body, "<h2>{title}</h2>{}", table(section, &head, &rows));
    }
    page("compare", &body)
}

/// GET /datasets
async fn datasets(State(d): State<Dashboard>, Query(q): Query<PageQuery>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("datasets", e),
    };
    let page_token = q.page.clone();
    let r = match client.call(|mut c| { let page = page_token.clone(); async move { c.list_datasets(ListDatasetsRequest { page }).await } }).await {
        Ok(r) => r,
        Err(e) => return error_page("datasets", e),
    };
    let rows: Vec<Vec<String>> = r
        .datasets
        .iter()
        .map(|d| {
            let kind = if d.context > 0 { format!("text, context {}", d.context) } else if d.target_width > 0 { format!("{} target(s)", d.target_width) } else { format!("{} classes", d.classes) };
            vec![link(&format!("/datasets/{}", d.name), &d.name), d.version.to_string(), d.records.to_string(), esc(&format!("{:?} {}", d.feature_shape, d.feature_dtype)), esc(&kind)]
        })
        .collect();
    let mut body = table("datasets", &["name", "latest version", "records", "features", "labels"], &rows);
    if !r.next_page.is_empty() {
        let _ = write!(body, "<p><a id=\"next\" href=\"/datasets?page={}\">next page</a></p>", esc(&r.next_page));
    }
    page("datasets", &body)
}

/// GET /datasets/NAME : versions, slices (with their drift).
async fn dataset(State(d): State<Dashboard>, Path(name): Path<String>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("dataset", e),
    };
    let req = GetDatasetRequest { name: name.clone(), ..Default::default() };
    let info = match client.call(|mut c| { let req = req.clone(); async move { c.get_dataset(req).await } }).await {
        Ok(i) => i,
        Err(e) => return error_page(&format!("dataset {name}"), e),
    };
    let v = ops::dataset_json(&info);
    let versions: Vec<Vec<String>> = v["versions"].as_array().into_iter().flatten().map(|x| vec![cell("version", &x["version"]), cell("records", &x["records"]), cell("slices", &x["slices"])]).collect();
    let slices: Vec<Vec<String>> = info
        .slices
        .iter()
        .map(|s| {
            let drift = if s.drift.is_empty() { "-".to_string() } else { esc(&s.drift) };
            vec![format!("{}..{}", s.first, s.first + s.records), esc(&s.sources.join(", ")), esc(&ops::utc(s.imported_unix_ms)), format!("{:.4}", s.label_js), format!("{:.4}", s.feature_js), drift]
        })
        .collect();
    let body = format!(
        "<p>version {} of {} records, features {:?} {}</p><h2>Versions</h2>{}<h2>Slices (newest first)</h2>{}",
        info.version,
        info.records,
        info.feature_shape,
        esc(&info.feature_dtype),
        table("versions", &["version", "records", "slices"], &versions),
        table("slices", &["records", "sources", "imported", "label drift (JS)", "feature drift (JS)", "over threshold"], &slices)
    );
    page(&format!("dataset {name}"), &body)
}

/// GET /models
async fn models(State(d): State<Dashboard>, Query(q): Query<PageQuery>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("models", e),
    };
    let page_token = q.page.clone();
    let r = match client.call(|mut c| { let page = page_token.clone(); async move { c.list_models(ListModelsRequest { page }).await } }).await {
        Ok(r) => r,
        Err(e) => return error_page("models", e),
    };
    let rows: Vec<Vec<String>> = r
        .models
        .iter()
        .map(|m| {
            let aliases = m.aliases.iter().map(|a| format!("{}={}", a.alias, a.version)).collect::<Vec<_>>().join(", ");
            let newest = m.versions.first().map(|v| v.version.to_string()).unwrap_or_else(|| "-".into());
            vec![link(&format!("/models/{}", m.name), &m.name), newest, esc(&aliases)]
        })
        .collect();
    let mut body = table("models", &["name", "newest version", "aliases"], &rows);
    if !r.next_page.is_empty() {
        let _ = write!(body, "<p><a id=\"next\" href=\"/models?page={}\">next page</a></p>", esc(&r.next_page));
    }
    page("models", &body)
}

/// GET /models/NAME : versions with their job, data, metrics and parent; aliases.
async fn model(State(d): State<Dashboard>, Path(name): Path<String>) -> Response {
    let client = match d.client() {
        Ok(c) => c,
        Err(e) => return error_page("model", e),
    };
    let m = match ops::resolve_model(&client, &name).await {
        Ok((m, _)) => m,
        Err(e) => return error_page(&format!("model {name}"), e),
    };
    let rows: Vec<Vec<String>> = m
        .versions
        .iter()
        .map(|v| {
            let j = ops::model_version_json(&m, v);
            vec![
                v.version.to_string(),
                link(&format!("/jobs/{}", v.job_id), &v.job_id.to_string()),
                esc(&format!("{} v{}", v.dataset_name, v.dataset_version)),
                cell("test_accuracy", &j["test_accuracy"]),
                cell("test_loss", &j["test_loss"]),
                if v.parent.is_empty() { "-".into() } else { esc(&v.parent) },
                esc(&v.promotion),
            ]
        })
        .collect();
    let aliases: Vec<Vec<String>> = m.aliases.iter().map(|a| vec![esc(&a.alias), a.version.to_string()]).collect();
    let body = format!(
        "<h2>Versions (newest first; parent: the lineage)</h2>{}<h2>Aliases</h2>{}",
        table("versions", &["version", "job", "dataset", "test_accuracy", "test_loss", "parent", "promotion"], &rows),
        table("aliases", &["alias", "version"], &aliases)
    );
    page(&format!("model {name}"), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_charts_draw_decimated_curves() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let steps: Vec<u64> = (1..=5000).collect();
        let values: Vec<f64> = steps.iter().map(|&s| 1.0 / s as f64).collect();
        let svg = chart("c", "loss <1>", &[("loss".into(), steps, values)]);
        assert!(svg.contains("loss &lt;1&gt;"), "{svg}");
        let count: usize = svg.split("data-points=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
        assert!((998..=1000).contains(&count), "{count}");
        assert_eq!(svg.split("points=\"").nth(2).unwrap().split('"').next().unwrap().split(' ').count(), count);
        assert!(chart("e", "empty", &[("x".into(), vec![], vec![])]).contains("no points recorded"));
    }
}
