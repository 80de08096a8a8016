//! `shoal pipeline`: submit a pipeline spec (steps' job specs given by path are put inline
//! here, so the coordinator holds the whole spec), start runs, follow, show, list, cancel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use shoal_coordinator::Client;
use shoal_proto::{ListPipelineRunsRequest, ListPipelineRunsResponse, ListPipelinesRequest, ListPipelinesResponse, PipelineInfo, PipelineRun, PipelineRunRequest, ResumePipelineRequest, RunPipelineRequest, SubmitPipelineRequest};

use crate::{note_next_page, print_json, Conn, Listing, PageArgs};

#[derive(Subcommand)]
pub enum PipelineCmd {
    /// Submit a pipeline spec (TOML with [[step]]s). The same spec again keeps its version;
    /// a changed one becomes the next version (runs already started keep theirs).
    Submit {
        spec: PathBuf,
        /// Start a run of it at once.
        #[arg(long)]
        run: bool,
        /// With --run: follow the run until it ends (exit status 1 unless it succeeded).
        #[arg(long, requires = "run")]
        wait: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Each step's cache key and whether a run now would hit the cache (its artifacts read
    /// and verified), without running anything. SPEC: a file, or a submitted pipeline's name.
    Plan {
        spec: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Start a run of a submitted pipeline's newest version.
    Run {
        name: String,
        /// Follow the run until it ends (exit status 1 unless it succeeded).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// One run: each step's state, attempts, job and outputs.
    Show {
        run: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Pipelines; with a NAME, that pipeline's runs, newest first.
    List {
        name: Option<String>,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Run a failed or cancelled run's unfinished steps again; with --from STEP, that step and
    /// every step downstream of it too. Steps that succeeded keep their outputs.
    Resume {
        run: String,
        #[arg(long)]
        from: Option<String>,
        /// Follow the run until it ends (exit status 1 unless it succeeded).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Pause a pipeline's schedule: no slot runs until it is unpaused.
    Pause {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Unpause a schedule: the slots that passed while it was paused never run.
    Unpause {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a run: its running steps' jobs stop, its pending steps never start.
    Cancel {
        run: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

impl Listing for ListPipelinesResponse {
    type Item = PipelineInfo;
    fn split(self) -> (Vec<PipelineInfo>, String) {
        (self.pipelines, self.next_page)
    }
}

impl Listing for ListPipelineRunsResponse {
    type Item = PipelineRun;
    fn split(self) -> (Vec<PipelineRun>, String) {
        (self.runs, self.next_page)
    }
}

pub async fn pipeline(cmd: PipelineCmd) -> Result<()> {
    match cmd {
        PipelineCmd::Submit { spec, run, wait, conn, json } => {
            let text = inline_specs(&spec)?;
            let client = conn.client()?;
            let req = SubmitPipelineRequest { spec_toml: text, request_id: shoal_coordinator::client::new_request_id() };
            let p = client.call(|mut c| { let req = req.clone(); async move { c.submit_pipeline(req).await } }).await?;
            if !run {
                if json {
                    print_json(&pipeline_json(&p));
                } else {
                    println!("pipeline {} version {} ({} steps)", p.name, p.version, step_count(&p));
                }
                return Ok(());
            }
            start(&client, &p.name, wait, json).await
        }
        PipelineCmd::Run { name, wait, conn, json } => start(&conn.client()?, &name, wait, json).await,
        PipelineCmd::Plan { spec, conn, json } => {
            let path = Path::new(&spec);
            let req = if path.is_file() {
                shoal_proto::PlanPipelineRequest { spec_toml: inline_specs(path)?, name: String::new() }
            } else {
                shoal_proto::PlanPipelineRequest { spec_toml: String::new(), name: spec.clone() }
            };
            let client = conn.client()?;
            let plan = client.call(|mut c| { let req = req.clone(); async move { c.plan_pipeline(req).await } }).await?;
            if json {
                let steps: Vec<serde_json::Value> = plan
                    .steps
                    .iter()
                    .map(|s| json!({"name": s.name, "kind": s.kind, "key": s.key, "prediction": s.prediction, "detail": s.detail, "cached_from": s.cached_from, "inputs": s.inputs}))
                    .collect();
                print_json(&json!({"pipeline": plan.pipeline, "build": plan.build, "steps": steps}));
            } else {
                println!("pipeline {} (build {})", plan.pipeline, plan.build);
                for s in &plan.steps {
                    let key = if s.key.is_empty() { "-".to_string() } else { s.key[..16.min(s.key.len())].to_string() };
                    let mut line = format!("  {:<16} {:<9} {key:<16}  {}", s.name, s.kind, s.prediction);
                    if !s.cached_from.is_empty() {
                        line += &format!(" (from {})", s.cached_from);
                    }
                    if !s.detail.is_empty() {
                        line += &format!(": {}", s.detail);
                    }
                    println!("{line}");
                }
            }
            Ok(())
        }
        PipelineCmd::Show { run, conn, json } => {
            let r = get_run(&conn.client()?, &run).await?;
            if json {
                print_json(&run_json(&r));
            } else {
                print_run(&r);
            }
            Ok(())
        }
        PipelineCmd::List { name, page, conn, json } => {
            let client = conn.client()?;
            match name {
                None => {
                    let (pipelines, next) = page.list(&client, |mut c, page| async move { c.list_pipelines(ListPipelinesRequest { page }).await }).await?;
                    if json {
                        print_json(&serde_json::Value::Array(pipelines.iter().map(pipeline_json).collect()));
                    } else {
                        for p in &pipelines {
                            let mut line = format!("{}  version {}  {} steps  {} runs by request", p.name, p.version, step_count(p), p.runs_started);
                            if !p.schedule_key.is_empty() {
                                line += &format!("  schedule {:?}{}", p.schedule_key, if p.paused { " (paused)" } else { "" });
                            }
                            if !p.trigger_dataset.is_empty() {
                                line += &format!("  on append to {} (run up to v{})", p.trigger_dataset, p.trigger_watermark);
                            }
                            println!("{line}");
                        }
                    }
                    note_next_page(&next, json);
                }
                Some(name) => {
                    let (runs, next) = page.list(&client, |mut c, page| { let pipeline = name.clone(); async move { c.list_pipeline_runs(ListPipelineRunsRequest { pipeline, page }).await } }).await?;
                    if json {
                        print_json(&serde_json::Value::Array(runs.iter().map(run_json).collect()));
                    } else {
                        for r in &runs {
                            let steps: Vec<String> = r.steps.iter().map(|s| format!("{}:{}", s.name, s.state)).collect();
                            println!("{}  {}  version {}  {}", r.id, r.state, r.version, steps.join(" "));
                        }
                    }
                    note_next_page(&next, json);
                }
            }
            Ok(())
        }
        PipelineCmd::Resume { run, from, wait, conn, json } => {
            let client = conn.client()?;
            let req = ResumePipelineRequest { id: run, from: from.unwrap_or_default(), request_id: shoal_coordinator::client::new_request_id() };
            let r = client.call(|mut c| { let req = req.clone(); async move { c.resume_pipeline_run(req).await } }).await?;
            follow(&client, r, wait, json, "resumed").await
        }
        PipelineCmd::Pause { name, conn } => pause(&conn.client()?, name, true).await,
        PipelineCmd::Unpause { name, conn } => pause(&conn.client()?, name, false).await,
        PipelineCmd::Cancel { run, conn, json } => {
            let client = conn.client()?;
            let req = PipelineRunRequest { id: run, request_id: shoal_coordinator::client::new_request_id() };
            let r = client.call(|mut c| { let req = req.clone(); async move { c.cancel_pipeline_run(req).await } }).await?;
            if json {
                print_json(&run_json(&r));
            } else {
                println!("pipeline run {} cancelled", r.id);
            }
            Ok(())
        }
    }
}

/// Reads a pipeline spec, putting each step's `spec = "PATH"` (relative to the pipeline's
/// file) inline as a table, and checks the whole.
pub fn inline_specs(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(toml::Value::Array(steps)) = table.get_mut("step") {
        for (i, step) in steps.iter_mut().enumerate() {
            let Some(t) = step.as_table_mut() else { continue };
            if let Some(toml::Value::String(rel)) = t.get("spec") {
                let file = base.join(rel);
                let name = t.get("name").and_then(|n| n.as_str()).map(|n| format!("step {n:?}")).unwrap_or_else(|| format!("step[{i}]"));
                let spec_text = std::fs::read_to_string(&file).with_context(|| format!("{}: {name}: spec: reading {}", path.display(), file.display()))?;
                let spec: toml::Table = toml::from_str(&spec_text).with_context(|| format!("{}: {name}: spec: {}", path.display(), file.display()))?;
                t.insert("spec".into(), toml::Value::Table(spec));
            }
        }
    }
    let text = toml::to_string(&table).context("writing the pipeline spec")?;
    shoal_core::pipeline::PipelineSpec::parse(&text).with_context(|| format!("{}", path.display()))?;
    Ok(text)
}

fn step_count(p: &PipelineInfo) -> usize {
    shoal_core::pipeline::PipelineSpec::parse(&p.spec_toml).map(|s| s.steps.len()).unwrap_or(0)
}

async fn pause(client: &Client, name: String, paused: bool) -> Result<()> {
    let req = shoal_proto::PausePipelineRequest { name, paused, request_id: shoal_coordinator::client::new_request_id() };
    let p = client.call(|mut c| { let req = req.clone(); async move { c.pause_pipeline(req).await } }).await?;
    println!("pipeline {} {}", p.name, if p.paused { "paused" } else { "unpaused" });
    Ok(())
}

async fn get_run(client: &Client, id: &str) -> Result<PipelineRun> {
    let req = PipelineRunRequest { id: id.to_string(), request_id: String::new() };
    Ok(client.call(|mut c| { let req = req.clone(); async move { c.get_pipeline_run(req).await } }).await?)
}

async fn start(client: &Client, name: &str, wait: bool, json: bool) -> Result<()> {
    let req = RunPipelineRequest { name: name.to_string(), request_id: shoal_coordinator::client::new_request_id() };
    let run = client.call(|mut c| { let req = req.clone(); async move { c.run_pipeline(req).await } }).await?;
    follow(client, run, wait, json, "started").await
}

/// Prints the run (`what` happened to it), or with `wait` follows it to its end.
async fn follow(client: &Client, mut run: PipelineRun, wait: bool, json: bool, what: &str) -> Result<()> {
    if !wait {
        if json {
            print_json(&run_json(&run));
        } else {
            println!("pipeline run {} {what}", run.id);
        }
        return Ok(());
    }
    // Follow: a line per step transition (on stderr with --json, which prints the end state).
    let mut seen: Vec<String> = Vec::new();
    loop {
        for s in &run.steps {
            let line = step_line(s);
            if !seen.contains(&line) && s.state != "pending" {
                if json {
                    eprintln!("{}: {line}", run.id);
                } else {
                    println!("{}: {line}", run.id);
                }
                seen.push(line);
            }
        }
        if run.state != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        run = get_run(client, &run.id).await?;
    }
    if json {
        print_json(&run_json(&run));
    } else {
        println!("pipeline run {} {}{}", run.id, run.state, if run.error.is_empty() { String::new() } else { format!(": {}", run.error) });
    }
    if run.state != "succeeded" {
        bail!("pipeline run {} {}", run.id, run.state);
    }
    Ok(())
}

fn step_line(s: &shoal_proto::StepRun) -> String {
    let mut line = format!("step {} {}", s.name, s.state);
    if s.attempts > 1 && !s.error.starts_with(&format!("attempt {}:", s.attempts)) {
        line += &format!(" (attempt {})", s.attempts);
    }
    if s.job_id != 0 {
        line += &format!(" job {}", s.job_id);
    }
    if !s.outputs.is_empty() && s.state == "succeeded" {
        let o: Vec<String> = s.outputs.iter().map(|o| format!("{}={}", o.key, o.value)).collect();
        line += &format!(": {}", o.join(" "));
    }
    if s.cache == "hit" {
        line += &format!(" (cache hit: {})", s.cached_from);
    }
    if !s.reason.is_empty() {
        line += &format!(": {}", s.reason);
    }
    if !s.error.is_empty() && s.state != "succeeded" {
        line += &format!(": {}", s.error);
    }
    line
}

fn print_run(r: &PipelineRun) {
    println!("pipeline run {} of {} version {}: {}{}", r.id, r.pipeline, r.version, r.state, if r.error.is_empty() { String::new() } else { format!(" ({})", r.error) });
    for s in &r.steps {
        println!("  {}", step_line(s));
    }
}

pub fn pipeline_json(p: &PipelineInfo) -> serde_json::Value {
    let nonempty = |s: &str| if s.is_empty() { serde_json::Value::Null } else { json!(s) };
    json!({"name": p.name, "version": p.version, "spec_blake3": p.spec_blake3, "description": p.description,
           "submitted_unix_ms": p.submitted_unix_ms, "runs_started": p.runs_started, "steps": step_count(p),
           "schedule": nonempty(&p.schedule_key), "paused": p.paused, "schedule_watermark_ms": p.schedule_watermark_ms, "slots_skipped": p.slots_skipped,
           "trigger": nonempty(&p.trigger_dataset), "trigger_watermark": p.trigger_watermark})
}

pub fn run_json(r: &PipelineRun) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = r
        .steps
        .iter()
        .map(|s| {
            let outputs: serde_json::Map<String, serde_json::Value> = s.outputs.iter().map(|o| (o.key.clone(), json!(o.value))).collect();
            json!({"name": s.name, "kind": s.kind, "state": s.state, "attempts": s.attempts, "job": s.job_id, "jobs": s.jobs,
                   "outputs": outputs, "error": s.error, "reason": s.reason,
                   "cache": s.cache, "cache_key": s.cache_key, "cached_from": s.cached_from, "inputs": s.inputs, "started_unix_ms": s.started_unix_ms, "finished_unix_ms": s.finished_unix_ms})
        })
        .collect();
    json!({"id": r.id, "pipeline": r.pipeline, "version": r.version, "spec_blake3": r.spec_blake3, "build": r.build, "state": r.state, "cause": r.cause,
           "error": r.error, "resumes": r.resumes, "created_unix_ms": r.created_unix_ms, "finished_unix_ms": r.finished_unix_ms, "steps": steps})
}
