//! `shoal`: the command line. A thin clap layer: every command calls the client library
//! (`ops`, `shoal_coordinator::Client`), the supervisor (`shoal_cluster`), or runs one server
//! process (`serve`).

mod access;
mod args;
mod bench;
mod conn;
mod dashboard;
mod doctor;
mod generate;
mod http;
mod logs;
mod models;
mod plot;
mod ops;
mod pipeline;
mod runs;
mod serve;
mod torch;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use shoal_cluster::{Layout, UpOptions};
use shoal_coordinator::Client;
use shoal_proto::*;
use serve::ServeCmd;
pub(crate) use conn::{default_dir, Conn};
use args::*;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(format) = &cli.log_format {
        // Before any thread exists; inherited by every process this one starts.
        std::env::set_var(logs::FORMAT_VAR, format);
    }
    if let Cmd::Serve(ServeCmd::Worker { threads: Some(t), .. }) = &cli.cmd {
        // Read by rayon and candle when their pools start; set before any thread exists.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo(a) => demo(a).await,
        Cmd::Up(a) => {
            let layout = Layout::new(a.dir.unwrap_or_else(default_dir));
            let exe = std::env::current_exe().context("finding the shoal executable")?;
            if let Some(s) = &a.store {
                shoal_core::store::Store::open(s, a.store_endpoint.as_deref())?;
            } else if a.store_endpoint.is_some() {
                bail!("--store-endpoint goes with --store s3://BUCKET/PREFIX");
            }
            let store = a.store.map(|location| (location, a.store_endpoint.unwrap_or_default()));
            let opts = UpOptions { coordinators: a.coordinators, workers: a.workers, lease: Duration::from_millis(a.lease_ms), snapshot_every: a.snapshot_every, exe, store, insecure: a.insecure };
            let (file, admin_token) = shoal_cluster::up(&layout, &opts).await?;
            let endpoints: Vec<String> = file.coordinators.iter().map(|c| c.address.clone()).collect();
            if let Some(t) = &admin_token {
                // Once, on stderr (not in --json's output); the CLI reads it from the file.
                let file = layout.authority().dir.join(shoal_cluster::credentials::ADMIN_TOKEN_FILE);
                eprintln!("admin token (shown once; kept in {}, mode 0600): {t}", file.display());
            }
            if a.json {
                print_json(&json!({"dir": layout.dir, "endpoints": endpoints, "store": file.store_dir,
                    "coordinator_pids": file.coordinators.iter().map(|c| c.pid).collect::<Vec<_>>(),
                    "worker_pids": file.workers.iter().map(|w| w.pid).collect::<Vec<_>>(),
                    "metrics": metrics_urls(&file)}));
            } else {
                println!("cluster up in {}: {} coordinator(s) at {}, {} worker(s)", layout.dir.display(), file.coordinators.len(), endpoints.join(","), file.workers.len());
                for (name, url) in metrics_urls(&file) {
                    println!("  {name}: {url}");
                }
            }
            Ok(())
        }
        Cmd::Down(a) => {
            let layout = Layout::new(a.dir.unwrap_or_else(default_dir));
            let stopped = shoal_cluster::down(&layout)?;
            println!("cluster in {} stopped ({} processes)", layout.dir.display(), stopped.len());
            Ok(())
        }
        Cmd::Status { conn, json } => status(conn, json).await,
        Cmd::Data(d) => data(d).await,
        Cmd::Job(j) => job(j).await,
        Cmd::Pipeline(p) => pipeline::pipeline(p).await,
        Cmd::Token(t) => access::token(t).await,
        Cmd::Ca(c) => access::ca(c),
        Cmd::Audit(c) => access::audit(c).await,
        Cmd::Doctor(DoctorCmd::Security { conn, json }) => doctor::security(conn, json).await,
        Cmd::Checkpoint(c) => models::checkpoint(c).await,
        Cmd::Model(c) => models::model(c).await,
        Cmd::Generate { reference, prompt, tokens, temperature, seed, conn, json } => {
            let client = conn.client()?;
            let req = generate::Request { reference: &reference, prompt: &prompt, tokens, temperature, seed };
            let text = generate::generate(&client, &req).await?;
            let text = String::from_utf8_lossy(&text);
            if json {
                print_json(&json!({"model": reference, "prompt": prompt, "seed": seed, "temperature": temperature, "text": text}));
            } else {
                println!("{prompt}{text}");
            }
            Ok(())
        }
        Cmd::Coordinator(c) => coordinator(c).await,
        Cmd::Worker(c) => worker(c).await,
        Cmd::Serve(s) => serve::serve(s).await,
        Cmd::Bench(b) => bench_cmd(b).await,
    }
}

async fn bench_cmd(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Allreduce { a, json } => {
            let args = a.args();
            let exe = std::env::current_exe().context("finding the shoal executable")?;
            let r = bench::allreduce(&exe, &args).await?;
            let ms = r.median_ms();
            let gbps = args.bytes as f64 / (ms / 1e3) / 1e9;
            // What sealing and opening a rank's share costs on one core: the yardstick for TLS.
            let aes = args.tls.then(|| shoal_worker::collective::secure::aes_gcm_rate(128 << 20) / 1e9);
            if json {
                print_json(&json!({"transport": args.transport, "wire": args.wire, "world": args.world, "bytes": args.bytes,
                    "iters": args.iters, "tls": args.tls, "time_ms": ms, "algbw_GBps": gbps, "times_ms": r.times_ms, "aes_gcm_GBps": aes}));
            } else {
                println!(
                    "allreduce: transport={} wire={} world={} bytes={} iters={} tls={} time_ms={ms:.3} algbw_GBps={gbps:.3}{}",
                    args.transport, args.wire, args.world, args.bytes, args.iters, args.tls,
                    aes.map(|a| format!(" aes_gcm_GBps={a:.3}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        BenchCmd::AllreduceRank { a, rank, dir, bind } => bench::allreduce_rank(a.args(), rank, dir, &bind).await,
        BenchCmd::Train { spec, workers, insecure, json } => {
            let text = std::fs::read_to_string(&spec).with_context(|| format!("reading {}", spec.display()))?;
            let run = run_local(text, workers, LocalMode { keep: false, show: false, insecure }).await?;
            let p = run.job.progress.unwrap_or_default();
            let phases = json!({"data": p.phase_data_ms, "forward_backward": p.phase_compute_ms, "collective": p.phase_collective_ms,
                "optimizer": p.phase_optimizer_ms, "checkpoint": p.phase_checkpoint_ms});
            if json {
                print_json(&json!({"model": run.spec.model.kind, "workers": run.job.world_size, "epochs": p.epoch,
                    "transport": p.transport, "wire": run.spec.aggregation.wire,
                    "samples_per_s": p.samples_per_s, "test_accuracy": p.test_accuracy, "phase_ms": phases, "wall_s": run.wall_s}));
            } else {
                println!(
                    "bench train: model={} workers={} transport={} epochs={} samples_per_s={:.0} test_accuracy={:.4} phase_ms data={:.3} forward_backward={:.3} collective={:.3} optimizer={:.3} checkpoint={:.3}",
                    run.spec.model.kind, run.job.world_size, p.transport, p.epoch, p.samples_per_s, p.test_accuracy,
                    p.phase_data_ms, p.phase_compute_ms, p.phase_collective_ms, p.phase_optimizer_ms, p.phase_checkpoint_ms
                );
            }
            Ok(())
        }
    }
}

async fn worker(cmd: WorkerCmd) -> Result<()> {
    match cmd {
        WorkerCmd::List { conn, json } => {
            let (_, workers) = cluster_status(&conn).await?;
            if json {
                print_json(&json!(workers));
            } else {
                print_workers(&workers);
            }
        }
        WorkerCmd::Remove { id, dir, json } => {
            let layout = Layout::new(dir.dir.unwrap_or_else(default_dir));
            let pid = shoal_cluster::remove_worker(&layout, &id).await?;
            if json {
                print_json(&json!({"removed": id, "pid": pid}));
            } else {
                println!("worker {id} stopped (pid {pid})");
            }
        }
        WorkerCmd::Add { count, dir, json } => {
            let layout = Layout::new(dir.dir.unwrap_or_else(default_dir));
            let exe = std::env::current_exe().context("finding the shoal executable")?;
            let added = shoal_cluster::add_workers(&layout, &exe, count).await?;
            if json {
                print_json(&json!({"added": added.iter().map(|p| json!({"process": p.id, "pid": p.pid, "dir": p.dir})).collect::<Vec<_>>()}));
            } else {
                for p in &added {
                    println!("worker process {} started (pid {}, log in {}/log)", p.id, p.pid, p.dir);
                }
            }
        }
    }
    Ok(())
}

fn print_workers(workers: &[serde_json::Value]) {
    println!("WORKER  ADDRESS               STATE  JOB   PID");
    for w in workers {
        let job = if w["job"].is_null() { "-".to_string() } else { w["job"].to_string() };
        println!("{:<7} {:<21} {:<6} {:<5} {}", w["id"].as_str().unwrap_or(""), w["address"].as_str().unwrap_or(""), w["state"].as_str().unwrap_or(""), job, w["pid"]);
    }
}

/// Every replica's view of itself, and the workers as the leader (or else any replica) sees
/// them, as JSON values.
pub(crate) async fn cluster_status(conn: &Conn) -> Result<(Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    let client = conn.client()?;
    let mut coords = Vec::new();
    let mut workers = Vec::new();
    for (i, ep) in client.endpoints().iter().enumerate() {
        match client.single(i).get_status(StatusRequest { state_hash: true, members_only: false }).await {
            Ok(s) => {
                let s = s.into_inner();
                let n = s.node.unwrap_or_default();
                coords.push(json!({"id": n.id, "address": n.address, "role": n.role, "term": n.term, "commit_index": n.commit_index,
                    "applied_index": n.applied_index, "snapshot_index": n.snapshot_index, "state_hash": n.state_hash, "state_bytes": n.state_bytes, "leader_id": n.leader_id,
                    "cluster_id": n.cluster_id, "store": n.store_dir, "dropped_raft_messages": n.dropped_raft_messages, "refused_calls": n.refused_calls, "auth": n.auth, "tls": n.tls, "pid": n.pid, "reachable": true}));
                if n.role == "leader" || workers.is_empty() {
                    workers = s.workers;
                }
            }
            Err(e) => coords.push(json!({"address": ep.trim_start_matches("http://"), "reachable": false, "error": e.message()})),
        }
    }
    let workers: Vec<_> = workers
        .iter()
        .map(|w| json!({"id": w.id, "address": w.address, "state": w.state().label(), "job": if w.job_id == 0 { serde_json::Value::Null } else { json!(w.job_id) }, "pid": w.pid, "device": w.device}))
        .collect();
    Ok((coords, workers))
}

async fn status(conn: Conn, as_json: bool) -> Result<()> {
    let (coords, workers) = cluster_status(&conn).await?;
    let leader = coords.iter().find(|c| c["role"] == "leader").map(|c| c["id"].clone()).unwrap_or(serde_json::Value::Null);
    if as_json {
        print_json(&json!({"leader": leader, "coordinators": coords, "workers": workers}));
        return Ok(());
    }
    println!("leader: {leader}");
    println!("COORDINATOR  ADDRESS               ROLE         TERM  COMMIT  APPLIED  SNAPSHOT  PID");
    for c in &coords {
        if c["reachable"] == true {
            println!(
                "{:<12} {:<21} {:<12} {:>4}  {:>6}  {:>7}  {:>8}  {}",
                c["id"].to_string(),
                c["address"].as_str().unwrap_or(""),
                c["role"].as_str().unwrap_or(""),
                c["term"].to_string(),
                c["commit_index"].to_string(),
                c["applied_index"].to_string(),
                c["snapshot_index"].to_string(),
                c["pid"]
            );
        } else {
            println!("{:<12} {:<21} unreachable ({})", "?", c["address"].as_str().unwrap_or(""), c["error"].as_str().unwrap_or(""));
        }
    }
    println!();
    print_workers(&workers);
    Ok(())
}

async fn data(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Import { name, slice, conn, json } => {
            let client = conn.client()?;
            let d = ops::import_idx(&client, &name, &slice.source(), slice.records_per_shard, false).await?;
            if json {
                print_json(&ops::dataset_json(&d));
            } else {
                println!("imported {} v{}: {} records, features {:?}, {} classes, {} shards", d.name, d.version, d.records, d.feature_shape, d.classes, d.shards.len());
            }
        }
        DataCmd::Append { name, slice, conn, json } => {
            let client = conn.client()?;
            let d = ops::import_idx(&client, &name, &slice.source(), slice.records_per_shard, true).await?;
            if json {
                print_json(&ops::dataset_json(&d));
            } else {
                // The registration answers with the new slice.
                let s = d.slices.first().cloned().unwrap_or_default();
                println!("appended to {} v{}: records {}..{} added ({} in all, {} slices)", d.name, d.version, s.first, s.first + s.records, d.records, d.slice_count);
                if d.context > 0 {
                    println!("  divergence from v{}: byte histogram {:.4}", d.version - 1, s.label_js);
                } else {
                    println!("  divergence from v{}: labels {:.4}, features {:.4} (feature {})", d.version - 1, s.label_js, s.feature_js, s.feature_js_at);
                }
                if !s.drift.is_empty() {
                    println!("  warning: {}", s.drift);
                }
            }
        }
        DataCmd::Set { name, max_label_js, max_feature_js, on_drift, conn, json } => {
            let client = conn.client()?;
            let req = shoal_proto::DatasetSettingsRequest { name, max_label_js, max_feature_js, on_drift, request_id: shoal_coordinator::client::new_request_id() };
            let d = client.call(|mut c| { let req = req.clone(); async move { c.set_dataset_settings(req).await } }).await?;
            let v = ops::dataset_json(&d);
            if json {
                print_json(&v["settings"]);
            } else {
                println!("{}: max_label_js {} max_feature_js {} on_drift {}", d.name, v["settings"]["max_label_js"], v["settings"]["max_feature_js"], v["settings"]["on_drift"]);
            }
        }
        DataCmd::List { page, conn, json } => {
            let client = conn.client()?;
            let (datasets, next) = page.list(&client, |mut c, page| async move { c.list_datasets(ListDatasetsRequest { page }).await }).await?;
            if json {
                print_json(&serde_json::Value::Array(datasets.iter().map(ops::dataset_json).collect()));
            } else {
                println!("NAME                 VERSION  RECORDS  FEATURES      CLASSES  SLICES");
                for d in &datasets {
                    println!("{:<20} {:>7}  {:>7}  {:<12}  {:>7}  {:>6}", d.name, d.version, d.records, format!("{:?}", d.feature_shape), d.classes, d.slice_count);
                }
            }
            note_next_page(&next, json);
        }
        DataCmd::Gc { min_age_s, conn, json } => {
            let client = conn.client()?;
            let request_id = shoal_coordinator::client::new_request_id();
            let r = client.call(|mut c| { let req = PruneRequest { request_id: request_id.clone(), min_age_s }; async move { c.collect_datasets(req).await } }).await?;
            if json {
                print_json(&json!({"removed": r.removed_paths}));
            } else {
                println!("removed {} unreferenced dataset folders", r.removed_paths.len());
                for p in &r.removed_paths {
                    println!("  {p}");
                }
            }
        }
        DataCmd::Show { name, version, page, conn, json } => {
            let client = conn.client()?;
            let (pages, next) = page
                .fetch(|page| {
                    let (client, name) = (&client, name.clone());
                    async move {
                        let d = client.call(|mut c| { let req = GetDatasetRequest { name: name.clone(), version, page: page.clone(), shards_only: false }; async move { c.get_dataset(req).await } }).await?;
                        let next = d.next_page.clone();
                        Ok((vec![d], next))
                    }
                })
                .await?;
            // Pages joined: slices and versions run on, newest first; shards in record order.
            let mut d = pages[0].clone();
            for p in &pages[1..] {
                d.slices.extend(p.slices.iter().cloned());
                d.versions.extend(p.versions.iter().cloned());
                let mut shards = p.shards.clone();
                shards.extend(d.shards);
                d.shards = shards;
            }
            d.next_page = next.clone();
            if json {
                print_json(&ops::dataset_json(&d));
            } else {
                if d.context > 0 {
                    println!("{} v{}: text, {} windows of {} byte tokens (context {}, stride {})", d.name, d.version, d.records, d.context + 1, d.context, d.stride);
                } else {
                    println!("{} v{}: {} records, features {:?} {}, {} classes", d.name, d.version, d.records, d.feature_shape, d.feature_dtype, d.classes);
                }
                for s in &d.slices {
                    let when = if s.imported_unix_ms > 0 { ops::utc(s.imported_unix_ms) } else { "-".into() };
                    println!("  slice records {}..{}  from {} [{}..{}]  imported {when}  blake3 {}", s.first, s.first + s.records, s.sources.join(", "), s.source_start, s.source_end, s.blake3);
                    if let Some(st) = s.stats.as_ref().filter(|st| st.tokens > 0) {
                        let distinct = st.label_counts.iter().filter(|&&n| n > 0).count();
                        println!("    {} tokens, {distinct} distinct bytes  divergence of the byte histogram {:.4}{}", st.tokens, s.label_js, if s.drift.is_empty() { String::new() } else { format!("  {}", s.drift) });
                    } else if let Some(st) = &s.stats {
                        println!("    labels {:?}  divergence labels {:.4} features {:.4}{}", st.label_counts, s.label_js, s.feature_js, if s.drift.is_empty() { String::new() } else { format!("  {}", s.drift) });
                    }
                }
                if let Some(st) = d.stats.as_ref().filter(|st| st.tokens > 0) {
                    println!("  version: {} tokens", st.tokens);
                } else if let Some(st) = &d.stats {
                    let means: Vec<f64> = st.features.iter().map(|f| shoal_core::stats::mean_std(f).0).collect();
                    let missing: u64 = st.features.iter().map(|f| f.missing).sum();
                    let lo = st.features.iter().map(|f| f.min).fold(f64::INFINITY, f64::min);
                    let hi = st.features.iter().map(|f| f.max).fold(f64::NEG_INFINITY, f64::max);
                    println!("  version: labels {:?}; {} features, values {lo}..{hi}, mean of means {:.3}, {missing} missing (per feature: --json)", st.label_counts, means.len(), means.iter().sum::<f64>() / means.len().max(1) as f64);
                }
                for s in &d.shards {
                    println!("  {}  {} records  {} bytes  blake3 {}", s.path, s.records, s.bytes, s.blake3);
                }
                println!("  {} slices, {} versions", d.slice_count, d.version_count);
                note_next_page(&next, false);
            }
        }
    }
    Ok(())
}

/// `START:END` for `--records`.
fn parse_record_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(':').ok_or_else(|| format!("{s:?} is not START:END"))?;
    let (a, b) = (a.trim().parse::<usize>().map_err(|e| format!("start {a:?}: {e}"))?, b.trim().parse::<usize>().map_err(|e| format!("end {b:?}: {e}"))?);
    if a >= b {
        return Err(format!("records {a}:{b} is empty (START must be below END)"));
    }
    Ok((a, b))
}

fn print_job(j: &JobInfo) {
    let v = ops::job_json(j);
    println!("job {} ({})", j.id, j.name);
    if j.batch.is_some() {
        for k in ["state", "operator", "tasks_total", "tasks_done", "tasks_failed", "records_out", "attempts_failed", "accuracy", "test_loss", "test_rmse", "test_r2", "test_bpb", "model", "output_dataset", "output_version", "error"] {
            if !v[k].is_null() {
                println!("  {k}: {}", ops::human(k, &v[k]));
            }
        }
        return;
    }
    for k in [
        "state",
        "generation",
        "step",
        "total_steps",
        "epoch",
        "loss",
        "test_accuracy",
        "test_loss",
        "test_rmse",
        "test_r2",
        "test_bpb",
        "samples_per_s",
        "train_seconds",
        "lr",
        "workers",
        "checkpoint",
        "resumed_from",
        "restarts",
        "restart_cause",
        "checkpoint_error",
        "model",
        "error",
    ] {
        if !v[k].is_null() {
            println!("  {k}: {}", ops::human(k, &v[k]));
        }
    }
    for r in &j.results {
        println!("  rank {} on {}: parameters blake3 {}", r.rank, r.worker_id, r.param_blake3);
    }
}

async fn job(cmd: JobCmd) -> Result<()> {
    match cmd {
        JobCmd::Schedule { spec, conn, json } => {
            let text = std::fs::read_to_string(&spec).with_context(|| format!("reading {}", spec.display()))?;
            let parsed = shoal_core::JobSpec::parse(&text).with_context(|| format!("{}", spec.display()))?;
            if parsed.trigger.is_none() {
                bail!("{}: a template needs [trigger] on_append = \"DATASET\"", spec.display());
            }
            let client = conn.client()?;
            let req = SubmitJobRequest { spec_toml: text, request_id: shoal_coordinator::client::new_request_id() };
            let t = client.call(|mut c| { let req = req.clone(); async move { c.schedule_job(req).await } }).await?;
            if json {
                print_json(&ops::template_json(&t));
            } else {
                println!("template {} ({}): a job for every new version of {}", t.id, t.name, t.on_append);
            }
        }
        JobCmd::Templates { page, conn, json } => {
            let client = conn.client()?;
            let (templates, next) = page.list(&client, |mut c, page| async move { c.list_templates(ListTemplatesRequest { page }).await }).await?;
            if json {
                print_json(&serde_json::Value::Array(templates.iter().map(ops::template_json).collect()));
            } else {
                for t in &templates {
                    println!("template {} ({}) on {}:", t.id, t.name, t.on_append);
                    for f in &t.firings {
                        if f.job_id > 0 {
                            println!("  v{}: job {}", f.dataset_version, f.job_id);
                        } else {
                            println!("  v{}: no job: {}", f.dataset_version, f.error);
                        }
                    }
                }
            }
            note_next_page(&next, json);
        }
        JobCmd::Submit { spec, follow, conn, json } => {
            let client = conn.client()?;
            let j = ops::submit(&client, &spec).await?;
            if !follow {
                if json {
                    print_json(&ops::job_json(&j));
                } else {
                    println!("job {} submitted ({})", j.id, j.state().label());
                }
                return Ok(());
            }
            let j = ops::follow(&client, j.id, !json).await?;
            if json {
                print_json(&ops::job_json(&j));
            } else {
                print_job(&j);
            }
            if j.state() != JobState::Succeeded {
                bail!("job {} ended {}{}", j.id, j.state().label(), if j.error.is_empty() { String::new() } else { format!(": {}", j.error) });
            }
        }
        JobCmd::Status { id, conn, json } => {
            let j = ops::get_job(&conn.client()?, id).await?;
            if json {
                print_json(&ops::job_json(&j));
            } else {
                print_job(&j);
            }
        }
        JobCmd::Metrics { id, keys, parquet, conn, json } => {
            let client = conn.client()?;
            let m = client.call(|mut c| { let keys = keys.clone(); async move { c.get_job_metrics(shoal_proto::JobMetricsRequest { id, keys }).await } }).await?;
            if let Some(out) = parquet {
                let rows = runs::metrics_parquet(&m, &out).with_context(|| format!("writing {}", out.display()))?;
                println!("wrote {rows} points of job {id} to {}", out.display());
            } else if json {
                print_json(&runs::metrics_json(&m));
            } else {
                print!("{}", runs::metrics_text(&m));
            }
        }
        JobCmd::Compare { ids, plot, conn, json } => {
            if ids.len() > runs::MAX_COMPARE {
                anyhow::bail!("job compare takes at most {} jobs, got {}", runs::MAX_COMPARE, ids.len());
            }
            let client = conn.client()?;
            let (mut jobs, mut histories) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
            for id in ids {
                jobs.push(ops::get_job(&client, id).await.with_context(|| format!("job {id}"))?);
                let keys: Vec<String> = runs::BEST.iter().map(|(k, _)| k.to_string()).collect();
                let h = client.call(|mut c| { let keys = keys.clone(); async move { c.get_job_metrics(shoal_proto::JobMetricsRequest { id, keys }).await } }).await;
                histories.push(h.with_context(|| format!("job {id}'s metric history"))?);
            }
            let v = runs::compare_json(&jobs, &histories)?;
            if let Some(out) = plot {
                let curves: Vec<(String, Vec<u64>, Vec<f64>)> = jobs
                    .iter()
                    .zip(&histories)
                    .filter_map(|(j, h)| h.series.iter().find(|s| s.key == "loss" && s.rank == 0).map(|s| (format!("job {} {}", j.id, j.name), s.steps.clone(), s.values.clone())))
                    .collect();
                if curves.is_empty() {
                    anyhow::bail!("--plot: none of the jobs recorded a loss yet");
                }
                std::fs::write(&out, plot::curves_png("loss", &curves)).with_context(|| format!("writing {}", out.display()))?;
                eprintln!("wrote the loss curves of {} jobs to {}", curves.len(), out.display());
            }
            if json {
                print_json(&v);
            } else {
                print!("{}", runs::compare_text(&v));
            }
        }
        JobCmd::Prune { conn, json } => {
            let client = conn.client()?;
            let request_id = shoal_coordinator::client::new_request_id();
            let r = client.call(|mut c| { let req = PruneRequest { request_id: request_id.clone(), min_age_s: 0 }; async move { c.prune_jobs(req).await } }).await?;
            if json {
                print_json(&json!({"removed_jobs": r.removed_jobs, "removed_paths": r.removed_paths, "kept_pinned": r.kept_pinned}));
            } else {
                println!("removed {} jobs and {} job folders; {} finished jobs past retention kept because something refers to them", r.removed_jobs.len(), r.removed_paths.len(), r.kept_pinned);
            }
        }
        JobCmd::List { group, page, conn, json } => {
            let client = conn.client()?;
            let group = group.unwrap_or_default();
            let (jobs, next) = page.list(&client, |mut c, page| { let group = group.clone(); async move { c.list_jobs(ListJobsRequest { page, group }).await } }).await?;
            if json {
                print_json(&serde_json::Value::Array(jobs.iter().map(ops::job_json).collect()));
            } else {
                println!("ID    NAME                 STATE      STEP/TOTAL      TEST_ACC");
                for j in &jobs {
                    // Batch jobs: tasks instead of steps, and the scored accuracy.
                    let (done, total, acc) = match &j.batch {
                        Some(b) => {
                            let (total, done, ..) = ops::batch_counts(b);
                            (done, total, b.accuracy)
                        }
                        None => {
                            let p = j.progress.clone().unwrap_or_default();
                            (p.step, p.total_steps, p.test_accuracy)
                        }
                    };
                    let acc = if acc >= 0.0 { format!("{acc:.4}") } else { "-".into() };
                    println!("{:<5} {:<20} {:<10} {:>6}/{:<7}  {acc}", j.id, j.name, j.state().label(), done, total);
                }
            }
            note_next_page(&next, json);
        }
        JobCmd::Resume { id, workers, conn, json } => {
            if workers == Some(0) {
                bail!("--workers must be at least 1");
            }
            let client = conn.client()?;
            let request_id = shoal_coordinator::client::new_request_id();
            let j = client
                .call(|mut c| {
                    let req = ResumeJobRequest { id, workers: workers.unwrap_or(0), request_id: request_id.clone() };
                    async move { c.resume_job(req).await }
                })
                .await?;
            if json {
                print_json(&ops::job_json(&j));
            } else {
                println!("job {} {} ({})", j.id, j.state().label(), j.restart_cause);
            }
        }
        JobCmd::Cancel { id, conn, json } => {
            let client = conn.client()?;
            let request_id = shoal_coordinator::client::new_request_id();
            let j = client
                .call(|mut c| {
                    let req = CancelJobRequest { id, request_id: request_id.clone() };
                    async move { c.cancel_job(req).await }
                })
                .await?;
            // (The coordinator removes a cancelled batch job's outputs.)
            if json {
                print_json(&ops::job_json(&j));
            } else {
                println!("job {} {}", j.id, j.state().label());
            }
        }
    }
    Ok(())
}

async fn coordinator(cmd: CoordinatorCmd) -> Result<()> {
    let members = |c: Client| {
        async move {
            let s = c.call(|mut c| async move { c.get_status(StatusRequest { state_hash: false, members_only: true }).await }).await?;
            anyhow::Ok(s.peers)
        }
    };
    let show = |peers: &[PeerInfo], json_out: bool, what: String| {
        if json_out {
            print_json(&json!({"result": what, "members": peers.iter().map(|p| json!({"id": p.id, "address": p.address, "role": if p.learner { "learner" } else { "voter" }})).collect::<Vec<_>>()}));
        } else {
            println!("{what}");
            for p in peers {
                println!("  {} {} {}", p.id, p.address, if p.learner { "learner" } else { "voter" });
            }
        }
    };
    match cmd {
        CoordinatorCmd::Add { addr, conn, json } => {
            if conn.endpoints.is_empty() {
                let layout = Layout::new(conn.dir.clone().unwrap_or_else(default_dir));
                let exe = std::env::current_exe().context("finding the shoal executable")?;
                let id = shoal_cluster::add_coordinator(&layout, &exe, &addr).await?;
                let peers = members(conn.client()?).await?;
                show(&peers, json, format!("replica {id} added at {addr} (a learner until it has caught up); its process runs from {}", layout.coordinator_dir(id).display()));
            } else {
                let client = conn.client()?;
                let request_id = shoal_coordinator::client::new_request_id();
                let r = client
                    .call(|mut c| {
                        let req = AddCoordinatorRequest { address: addr.clone(), request_id: request_id.clone() };
                        async move { c.add_coordinator(req).await }
                    })
                    .await?;
                let peers = r.peers.iter().map(|p| format!("{}={}", p.id, p.address)).collect::<Vec<_>>().join(",");
                show(&r.peers, json, format!(
                    "replica {} added at {addr}; start it with:\n  shoal serve coordinator --id {} --listen {addr} --peers {peers} --cluster-id {} --initial-state join --data DIR --store STORE --credentials CREDS\n(CREDS: `shoal ca issue --dir ADMIN --node {} --out CREDS`)",
                    r.id, r.id, r.cluster_id, r.id
                ));
            }
        }
        CoordinatorCmd::Settings { keep_jobs, keep_days, conn, json } => {
            let client = conn.client()?;
            let s = if keep_jobs.is_none() && keep_days.is_none() {
                client.call(|mut c| async move { c.get_status(StatusRequest::default()).await }).await?.settings.unwrap_or_default()
            } else {
                let request_id = shoal_coordinator::client::new_request_id();
                client.call(|mut c| { let req = SettingsRequest { keep_jobs, keep_days, request_id: request_id.clone() }; async move { c.set_settings(req).await } }).await?
            };
            if json {
                print_json(&json!({"keep_jobs": s.keep_jobs, "keep_days": s.keep_days}));
            } else {
                println!("keep_jobs {} keep_days {}: a finished job goes once it is neither among the {} newest nor younger than {} days", s.keep_jobs, s.keep_days, s.keep_jobs, s.keep_days);
            }
        }
        CoordinatorCmd::Remove { id, force, conn, json } => {
            if conn.endpoints.is_empty() {
                let layout = Layout::new(conn.dir.clone().unwrap_or_else(default_dir));
                shoal_cluster::remove_coordinator(&layout, id, force).await?;
            } else {
                let client = conn.client()?.with_deadline(Duration::from_secs(30));
                let request_id = shoal_coordinator::client::new_request_id();
                client
                    .call(|mut c| {
                        let req = RemoveCoordinatorRequest { id, request_id: request_id.clone(), force };
                        async move { c.remove_coordinator(req).await }
                    })
                    .await?;
            }
            // The replica that answers may apply the removal a moment after it was committed.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut peers = members(conn.client()?).await?;
            while peers.iter().any(|p| p.id == id) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                peers = members(conn.client()?).await?;
            }
            show(&peers, json, format!("replica {id} removed"));
        }
        CoordinatorCmd::TransferLeader { id, conn, json } => {
            let client = conn.client()?;
            let r = client.call(|mut c| async move { c.transfer_leader(TransferLeaderRequest { id }).await }).await?;
            show(&r.peers, json, format!("replica {id} leads the group"));
        }
    }
    Ok(())
}

/// Each process's Prometheus endpoint, as (`coordinator-ID` or `worker-N`, URL).
fn metrics_urls(file: &shoal_proto::ClusterFile) -> Vec<(String, String)> {
    let named = file.coordinators.iter().map(|c| (format!("coordinator-{}", c.id), c)).chain(file.workers.iter().map(|w| (format!("worker-{}", w.id), w)));
    named.filter(|(_, p)| !p.http_address.is_empty()).map(|(n, p)| (n, format!("https://{}/metrics", p.http_address))).collect()
}

const MNIST_IMAGES: &[u8] = include_bytes!("../../data/mnist/mnist10k-images-idx3-ubyte.gz");
const MNIST_LABELS: &[u8] = include_bytes!("../../data/mnist/mnist10k-labels-idx1-ubyte.gz");
const MNIST_MLP: &str = include_str!("../../examples/mnist-mlp.toml");

async fn demo(a: DemoArgs) -> Result<()> {
    let spec_text = match &a.spec {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => MNIST_MLP.to_string(),
    };
    let run = run_local(spec_text, a.workers, LocalMode { keep: a.keep, show: true, insecure: false }).await?;
    let p = run.job.progress.unwrap_or_default();
    println!(
        "demo: model={} workers={} epochs={} test_accuracy={:.4} samples_per_s={:.0} wall_s={:.1}",
        run.spec.model.kind, run.job.world_size, p.epoch, p.test_accuracy, p.samples_per_s, run.wall_s
    );
    Ok(())
}

/// A job run on a throwaway local cluster.
struct LocalRun {
    spec: shoal_core::JobSpec,
    job: JobInfo,
    wall_s: f64,
}

/// Starts a local cluster (1 coordinator, the spec's workers or `workers`, whichever is more)
/// in a temporary folder, imports the bundled MNIST under the spec's dataset name, trains the
/// spec to its end and stops the cluster.
/// How `run_local` runs: `keep` the cluster folder, `show` progress on stderr, `insecure`
/// (`up --insecure`).
struct LocalMode {
    keep: bool,
    show: bool,
    insecure: bool,
}

async fn run_local(spec_text: String, workers: Option<u64>, LocalMode { keep, show, insecure }: LocalMode) -> Result<LocalRun> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("shoal-demo-").tempdir().context("creating a temporary folder")?;
    let root = tmp.path().to_path_buf();
    let mut spec = shoal_core::JobSpec::parse(&spec_text)?;
    let mut spec_text = spec_text;
    if let Some(w) = workers.filter(|&w| w != spec.cluster.workers as u64) {
        spec.check_world_size(w.min(u32::MAX as u64) as u32)?;
        spec_text = set_workers(&spec_text, w)?;
        spec = shoal_core::JobSpec::parse(&spec_text)?;
    }
    let files = [root.join("mnist10k-images-idx3-ubyte.gz"), root.join("mnist10k-labels-idx1-ubyte.gz")];
    std::fs::write(&files[0], MNIST_IMAGES)?;
    std::fs::write(&files[1], MNIST_LABELS)?;
    let layout = Layout::new(root.join("cluster"));
    let exe = std::env::current_exe().context("finding the shoal executable")?;
    let opts = UpOptions {
        coordinators: 1,
        workers: spec.cluster.workers as u64,
        lease: Duration::from_secs(5),
        snapshot_every: shoal_coordinator::server::SNAPSHOT_EVERY,
        exe,
        store: None,
        insecure,
    };
    if show {
        eprintln!("demo: starting 1 coordinator and {} workers in {}", opts.workers, layout.dir.display());
    }
    let up = shoal_cluster::up(&layout, &opts).await;
    let result = async {
        up?;
        let client = layout.client(&layout.endpoints()?)?;
        let src = ops::Source { files: &files, format: None, label: None, target: None, range: None, context: None, stride: None };
        let d = ops::import_idx(&client, &spec.dataset.name, &src, None, false).await?;
        if show {
            eprintln!("demo: imported {} v{} ({} records, {} shards)", d.name, d.version, d.records, d.shards.len());
        }
        let j = ops::submit_text(&client, &spec_text).await?;
        if show {
            eprintln!("demo: job {} submitted ({}, {} workers)", j.id, spec.name, spec.cluster.workers);
        }
        let j = ops::follow(&client, j.id, show).await?;
        if j.state() != JobState::Succeeded {
            bail!("job {} ended {}: {}", j.id, j.state().label(), j.error);
        }
        anyhow::Ok(j)
    }
    .await;
    let _ = shoal_cluster::down(&layout);
    if keep {
        eprintln!("demo: cluster folder kept at {}", tmp.keep().display());
    }
    Ok(LocalRun { spec, job: result?, wall_s: started.elapsed().as_secs_f64() })
}

/// The spec text with `[cluster] workers` set to `w` (added if absent).
fn set_workers(text: &str, w: u64) -> Result<String> {
    let mut doc: toml::Table = text.parse().context("parsing the spec")?;
    let cluster = doc.entry("cluster").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(cluster) = cluster else { bail!("cluster: must be a table") };
    cluster.insert("workers".into(), toml::Value::Integer(w as i64));
    Ok(doc.to_string())
}
