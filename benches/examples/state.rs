//! How the coordinator's state and replies grow with history (issue 17, defect 2): a dataset
//! appended to again and again, 3 coordinators and 2 workers on loopback.
//!
//!     cargo run --release -p shoal-benches --example state -- [--shoal PATH] [--versions 10,100,1000] [--records 10] [--timeout-s 900]
//!
//! The dataset starts as 1000 MNIST records and grows by `--records` per `data append`
//! (the CLI of the binary under test). At each count of versions it prints: the leader's
//! snapshot file (snapshots every 10 entries, so it is the state of at most 10 entries ago),
//! the state's bytes as a snapshot holds them (`status`, where the binary reports it), and the
//! median of 5 calls each of `ListDatasets`, `GetDataset` (the latest version) and `GetStatus`
//! (with the state hash, as `shoal status` asks). Then a job runs on the grown dataset and one
//! worker's heartbeat reply is weighed: bytes per worker per second at one heartbeat every
//! 300 ms. `--shoal` runs another build (an earlier commit's, for "before" numbers); a step
//! that fails is printed as the error, and a run that passes `--timeout-s` stops there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_proto::{GetDatasetRequest, GetJobRequest, HeartbeatRequest, ListDatasetsRequest, Message as _, StatusRequest};

const USAGE: &str = "state [--shoal PATH] [--versions 10,100,1000] [--records 10] [--timeout-s 900]";

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn run(exe: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe).args(args).output().with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("shoal {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn client(addr: &str) -> shoal_coordinator::client::Rpc {
    let ch = shoal_benches::endpoint(addr).connect_lazy();
    shoal_benches::rpc(ch).max_decoding_message_size(64 << 20)
}

/// The median wall time in ms of 5 runs of `f`, or its error.
async fn time5<F, Fut, T>(mut f: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        if let Err(e) = f().await {
            let msg: String = e.message().chars().take(60).collect();
            return format!("error: {msg}");
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    format!("{:.2}", shoal_benches::median(&ms))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for a in args.iter().filter(|a| a.starts_with('-')) {
        if !["--shoal", "--versions", "--records", "--timeout-s"].contains(&a.as_str()) {
            return Err(shoal_benches::other_argument(a, USAGE));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = match flag(&args, "--shoal") {
        Some(p) => PathBuf::from(p),
        None => shoal_benches::shoal_exe(&root)?,
    };
    let marks: Vec<u64> = flag(&args, "--versions").unwrap_or_else(|| "10,100,1000".into()).split(',').map(|v| v.parse()).collect::<Result<_, _>>()?;
    let records: usize = flag(&args, "--records").map(|r| r.parse()).transpose()?.unwrap_or(10);
    let budget = Duration::from_secs(flag(&args, "--timeout-s").map(|r| r.parse()).transpose()?.unwrap_or(900));
    let tmp = tempfile::tempdir()?;
    // Uncompressed copies: each append reads its records straight from them.
    let read = |f: &str| -> Result<shoal_core::idx::IdxArray> { Ok(shoal_core::idx::read_idx_file(&root.join("data/mnist").join(f))?) };
    let (images, labels) = (read("mnist10k-images-idx3-ubyte.gz")?, read("mnist10k-labels-idx1-ubyte.gz")?);
    let (shoal_core::idx::IdxData::U8(px), shoal_core::idx::IdxData::U8(ys)) = (&images.data, &labels.data) else { bail!("MNIST is u8") };
    let (x, y) = (tmp.path().join("images.idx"), tmp.path().join("labels.idx"));
    std::fs::write(&x, shoal_core::idx::encode_idx_u8(&[10_000, 28, 28], px))?;
    std::fs::write(&y, shoal_core::idx::encode_idx_u8(&[10_000], ys))?;
    let (xs, ys) = (x.display().to_string(), y.display().to_string());

    let dir = tmp.path().join("cluster");
    let dir_s = dir.display().to_string();
    run(&exe, &["up", "--coordinators", "3", "--workers", "2", "--snapshot-every", "10", "--dir", &dir_s])?;
    shoal_benches::use_cluster_token(Path::new(&dir_s));
    // The cluster stops however the run ends (a build that falls over must not keep burning
    // the cores the next run measures on).
    struct Down<'a>(&'a Path, &'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0).args(["down", "--dir", self.1]).output();
        }
    }
    let _down = Down(&exe, &dir_s);
    let status = run(&exe, &["status", "--json", "--dir", &dir_s])?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    let leader = || -> Result<(u64, String)> {
        let s: serde_json::Value = serde_json::from_str(&run(&exe, &["status", "--json", "--dir", &dir_s])?)?;
        let l = s["coordinators"].as_array().context("coordinators")?.iter().find(|r| r["role"] == "leader").context("no leader")?.clone();
        Ok((l["id"].as_u64().context("id")?, l["address"].as_str().context("address")?.to_string()))
    };
    let _ = status;
    println!("binary: {}", exe.display());
    println!("| versions | snapshot file bytes | state bytes | ListDatasets ms | GetDataset ms | GetStatus ms | appends s |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let started = Instant::now();
    let mut version = 0u64;
    let mut appending = Duration::ZERO;
    let mut stopped = None;
    for &mark in &marks {
        let t = Instant::now();
        while version < mark {
            // The first slice holds every class (1000 records); the rest are `records` each.
            let range = if version == 0 { "0:1000".to_string() } else { let a = (1000 + (version as usize - 1) * records) % (10_000 - records); format!("{a}:{}", a + records) };
            let verb = if version == 0 { "import" } else { "append" };
            if let Err(e) = run(&exe, &["data", verb, "m", &xs, &ys, "--records", &range, "--dir", &dir_s]) {
                stopped = Some(format!("version {}: {e}", version + 1));
                break;
            }
            version += 1;
            if started.elapsed() > budget {
                stopped = Some(format!("past --timeout-s at version {version}"));
                break;
            }
        }
        appending += t.elapsed();
        // A few more entries so the snapshot covers the appends.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (id, addr) = leader()?;
        let snap = std::fs::metadata(dir.join(format!("coordinators/{id}/snapshot.pb"))).map(|m| m.len()).unwrap_or(0);
        let state_bytes = client(&addr).get_status(StatusRequest { state_hash: true, members_only: false }).await.ok().and_then(|s| s.into_inner().node).map(|n| n.state_bytes).unwrap_or(0);
        let list = time5(|| async { client(&addr).list_datasets(ListDatasetsRequest::default()).await }).await;
        let show = time5(|| async { client(&addr).get_dataset(GetDatasetRequest { name: "m".into(), ..Default::default() }).await }).await;
        let stat = time5(|| async { client(&addr).get_status(StatusRequest { state_hash: true, members_only: false }).await }).await;
        let state_bytes = if state_bytes > 0 { state_bytes.to_string() } else { "-".into() };
        println!("| {version} | {snap} | {state_bytes} | {list} | {show} | {stat} | {:.1} |", appending.as_secs_f64());
        if stopped.is_some() {
            break;
        }
    }
    if let Some(why) = &stopped {
        println!("stopped: {why}");
    }

    // A job on the grown dataset; one worker's heartbeat reply, weighed while it runs.
    let spec = tmp.path().join("job.toml");
    let n = 1000 + (version as usize).saturating_sub(1) * records;
    std::fs::write(
        &spec,
        format!(
            "name = \"hb\"\n[model]\nkind = \"mlp\"\nhidden = [16]\n[dataset]\nname = \"m\"\ntrain = [0, {}]\n[training]\nepochs = 100000\nbatch_size = 10\n\
             [training.optimizer]\nkind = \"sgd\"\nlr = 0.01\n[cluster]\nworkers = 2\n",
            n.min(10_000) / 10 * 10
        ),
    )?;
    let submitted: serde_json::Value = serde_json::from_str(&run(&exe, &["job", "submit", &spec.display().to_string(), "--json", "--dir", &dir_s])?)?;
    let job = submitted["id"].as_u64().context("job id")?;
    let (_, addr) = leader()?;
    let mut c = client(&addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (generation, worker) = loop {
        let j = c.get_job(GetJobRequest { id: job }).await?.into_inner();
        if j.state() == shoal_proto::JobState::Running && !j.workers.is_empty() {
            break (j.generation, j.workers[0].clone());
        }
        if Instant::now() > deadline {
            bail!("the job did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reply = c.heartbeat(shoal_benches::as_worker(&worker, HeartbeatRequest { worker_id: worker.clone(), job_id: job, generation })).await?.into_inner();
    let bytes = reply.encoded_len();
    // What a worker that does not run it yet gets (once, when its assignment changes).
    let whole = c.heartbeat(shoal_benches::as_worker(&worker, HeartbeatRequest { worker_id: worker.clone(), job_id: 0, generation: 0 })).await?.into_inner().encoded_len();
    println!("the whole assignment: {whole} bytes");
    println!(
        "heartbeat reply while running job {job} (generation {generation}) on {version} versions: {bytes} bytes ({}), {:.0} bytes per worker per second at one every 300 ms",
        if reply.unchanged { "unchanged" } else { "the whole assignment" },
        bytes as f64 * 1000.0 / 300.0
    );
    let _ = run(&exe, &["job", "cancel", &job.to_string(), "--dir", &dir_s]);
    Ok(())
}
