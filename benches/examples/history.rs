//! The metric history at scale (issue 20): `--jobs` jobs (default 1,000) each with `--metrics`
//! series (10) of `--steps` points (10,000) recorded the way workers record them: chunk files
//! of 4,096 points at most written under `jobs/ID/metrics/` in the store, each indexed through
//! Raft with `RecordMetrics`. Then the dashboard of the coordinator is timed as a user meets
//! it, over HTTP: the job list (`/jobs`), one job's page with its curves (`/jobs/ID`: every
//! series read, merged and decimated) and the comparison of 10 runs (`/compare?jobs=...`);
//! and the coordinator's resident memory and Raft log before and after the points.
//!
//!     cargo run --release -p shoal-benches --example history -- [--jobs N] [--metrics M] [--steps S] [--samples K]
//!
//! The jobs are queued training jobs on a tiny dataset (no worker runs them: the history is
//! what is measured). Needs target/release/shoal (`cargo build --release -p shoal`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_proto::{Message, MetricChunk, MetricChunkRef, MetricChunkReport, MetricPoint, SubmitJobRequest};

const USAGE: &str = "usage: history [--jobs N] [--metrics M] [--steps S] [--samples K]";
const CHUNK_POINTS: u64 = 4096;

fn flag(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).with_context(|| format!("{name} needs a value\n{USAGE}"))?.parse().with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn shoal(exe: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe).args(args).arg("--dir").arg(dir).output()?;
    if !out.status.success() {
        bail!("shoal {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The dashboard of a cluster `shoal up` made: its address, CA and the admin token.
struct Dashboard {
    addr: String,
    tls: std::sync::Arc<rustls::ClientConfig>,
    token: String,
}

impl Dashboard {
    fn new(dir: &Path) -> Result<Dashboard> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca/ca.crt"))? {
            roots.add(c?)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Dashboard {
            addr: std::fs::read_to_string(dir.join("coordinators/1/http.addr"))?.trim().to_string(),
            tls: std::sync::Arc::new(tls),
            token: std::fs::read_to_string(dir.join("ca/admin.token"))?.trim().to_string(),
        })
    }
}

/// `GET path` from the dashboard over HTTPS: the time to the whole body (the handshake
/// included, as a browser's first visit), and the body (a non-200 is an error).
fn get(d: &Dashboard, path: &str) -> Result<(Duration, String)> {
    let started = Instant::now();
    let sock = std::net::TcpStream::connect(&d.addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let conn = rustls::ClientConnection::new(d.tls.clone(), rustls::pki_types::ServerName::try_from("shoal")?)?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", d.addr, d.token)?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof || raw.is_empty() => return Err(e.into()),
        _ => {}
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&raw).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", text.lines().next().unwrap_or(""));
    }
    Ok((took, text))
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

/// VmRSS of `pid`, in MiB.
fn rss_mib(pid: u64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

/// Bytes of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(a) = args.iter().find(|a| a.starts_with("--") && !["--jobs", "--metrics", "--steps", "--samples"].contains(&a.as_str())) {
        return Err(shoal_benches::other_argument(a, USAGE));
    }
    let (jobs, metrics, steps, samples) = (flag(&args, "--jobs", 1000)?, flag(&args, "--metrics", 10)?, flag(&args, "--steps", 10_000)?, flag(&args, "--samples", 50)?);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = shoal_benches::shoal_exe(&root)?;
    let tmp = tempfile::tempdir()?;
    let dir: PathBuf = tmp.path().join("cluster");
    shoal(&exe, &dir, &["up", "--workers", "0"])?;
    shoal_benches::use_cluster_token(&dir);
    let result = run(&exe, &dir, tmp.path(), jobs, metrics, steps, samples);
    let _ = shoal(&exe, &dir, &["down"]);
    result
}

fn run(exe: &Path, dir: &Path, tmp: &Path, jobs: u64, metrics: u64, steps: u64, samples: u64) -> Result<()> {
    let status: serde_json::Value = serde_json::from_str(&shoal(exe, dir, &["status", "--json"])?)?;
    let c = &status["coordinators"][0];
    let (pid, grpc) = (c["pid"].as_u64().context("coordinator pid")?, c["address"].as_str().context("coordinator address")?.to_string());
    let http = Dashboard::new(dir)?;
    let store = dir.join("store");
    let raft_dir = dir.join("coordinators/1");
    // A tiny dataset for the jobs to name.
    let (x, y) = (tmp.join("x.idx"), tmp.join("y.idx"));
    std::fs::write(&x, shoal_core::idx::encode_idx_u8(&[64, 2, 2], &[7u8; 256]))?;
    std::fs::write(&y, shoal_core::idx::encode_idx_u8(&[64], &(0..64).map(|i| (i % 2) as u8).collect::<Vec<_>>()))?;
    shoal(exe, dir, &["data", "import", "tiny", x.to_str().unwrap(), y.to_str().unwrap()])?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let channel = rt.block_on(shoal_benches::endpoint(&grpc).connect())?;
    let mut client = shoal_benches::rpc(channel);
    println!("history: {jobs} jobs x {metrics} metrics x {steps} steps ({} points), chunks of {CHUNK_POINTS} points", jobs * metrics * steps);
    let t = Instant::now();
    let mut ids = Vec::new();
    for j in 0..jobs {
        let spec = format!(
            "name = \"run-{j}\"\ngroup = \"scale\"\n[model]\nkind = \"mlp\"\nhidden = [4]\n[dataset]\nname = \"tiny\"\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = {}\n",
            0.01 + j as f64 * 1e-4
        );
        let req = SubmitJobRequest { spec_toml: spec, request_id: format!("history-bench-{j}") };
        ids.push(rt.block_on(client.submit_job(req))?.into_inner().id);
    }
    println!("  submitted {jobs} jobs in {:.1} s", t.elapsed().as_secs_f64());
    // Before and after the points alone: the jobs are there already.
    let before = (rss_mib(pid), bytes_under(&raft_dir));
    let keys: Vec<String> = ["loss", "lr", "samples_per_s", "grad_norm", "test_accuracy", "test_loss", "phase_data_ms", "phase_forward_backward_ms", "phase_collective_ms", "phase_optimizer_ms"]
        .iter()
        .map(|s| s.to_string())
        .chain((10..metrics).map(|i| format!("extra_{i}")))
        .take(metrics as usize)
        .collect();
    let steps_per_chunk = (CHUNK_POINTS / metrics).max(1);
    let t = Instant::now();
    let mut chunks = 0u64;
    let mut file_bytes = 0u64;
    for &id in &ids {
        let folder = store.join(format!("jobs/{id}/metrics"));
        std::fs::create_dir_all(&folder)?;
        let mut reports = Vec::new();
        for (seq, first) in (1..=steps).step_by(steps_per_chunk as usize).enumerate() {
            let last = (first + steps_per_chunk - 1).min(steps);
            let mut points = Vec::with_capacity(((last - first + 1) * metrics) as usize);
            for step in first..=last {
                for k in 0..metrics as u32 {
                    let value = 3.0 / (1.0 + step as f64 / 500.0) + 0.01 * ((step * 7919 + k as u64 * 104729 + id) % 97) as f64 / 97.0;
                    points.push(MetricPoint { key: k, step, unix_ms: 1_780_000_000_000 + step * 50, value });
                }
            }
            let n = points.len() as u32;
            let chunk = MetricChunk { job_id: id, generation: 1, rank: 0, keys: keys.clone(), points };
            let bytes = chunk.encode_to_vec();
            let rel = format!("jobs/{id}/metrics/g1-r0-{seq:05}.pb");
            std::fs::write(store.join(&rel), &bytes)?;
            file_bytes += bytes.len() as u64;
            let blake3 = blake3::hash(&bytes).to_hex().to_string();
            reports.push(MetricChunkReport { worker_id: "bench".into(), job_id: id, dropped: 0, chunk: Some(MetricChunkRef { generation: 1, rank: 0, seq: seq as u64, path: rel, first_step: first, last_step: last, points: n, blake3 }) });
        }
        chunks += reports.len() as u64;
        // The job's chunks indexed as its ranks would: reports in flight at once.
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for r in reports {
                let mut c = client.clone();
                set.spawn(async move { c.record_metrics(shoal_benches::as_worker("bench", r)).await });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
    }
    println!("  recorded {chunks} chunks ({:.2} GB of files) in {:.1} s", file_bytes as f64 / 1e9, t.elapsed().as_secs_f64());
    let after = (rss_mib(pid), bytes_under(&raft_dir));
    println!("  coordinator RSS: {:.1} MiB before the points, {:.1} MiB after", before.0, after.0);
    println!("  coordinator folder (Raft log, snapshots): {:.3} MB before, {:.3} MB after ({:.0} bytes per chunk, {:.3} bytes per point)", before.1 as f64 / 1e6, after.1 as f64 / 1e6, (after.1 - before.1) as f64 / chunks as f64, (after.1 - before.1) as f64 / (jobs * metrics * steps) as f64);

    let time = |what: &str, goal_ms: f64, paths: &[String]| -> Result<()> {
        get(&http, &paths[0])?;
        let ms: Vec<f64> = paths.iter().map(|p| get(&http, p).map(|(d, _)| d.as_secs_f64() * 1e3)).collect::<Result<_>>()?;
        let p95 = percentile(ms.clone(), 0.95);
        println!("  {what:<44} p50 {:>8.1} ms  p95 {:>8.1} ms  ({} requests; goal: p95 under {goal_ms} ms{})", percentile(ms.clone(), 0.5), p95, ms.len(), if p95 < goal_ms { ", met" } else { ", NOT met" });
        Ok(())
    };
    let pick = |i: u64| ids[((i * 7919) % ids.len() as u64) as usize];
    time("job list (/jobs, the first page of 100)", 300.0, &(0..samples).map(|_| "/jobs".to_string()).collect::<Vec<_>>())?;
    let (_, page) = get(&http, &format!("/jobs/{}", pick(1)))?;
    let drawn: Vec<&str> = page.split("data-points=\"").skip(1).map(|s| s.split('"').next().unwrap_or("")).collect();
    println!("  one job's page draws {} curves of {:?} points", drawn.len(), drawn);
    time("one job's curves (/jobs/ID)", 100.0, &(0..samples).map(|i| format!("/jobs/{}", pick(i))).collect::<Vec<_>>())?;
    let compare = |i: u64| format!("/compare?jobs={}", (0..10).map(|k| pick(i * 10 + k).to_string()).collect::<Vec<_>>().join(","));
    time("compare of 10 runs (/compare?jobs=...)", 500.0, &(0..samples.min(20)).map(compare).collect::<Vec<_>>())?;
    println!("  coordinator RSS after the reads: {:.1} MiB", rss_mib(pid));
    Ok(())
}
