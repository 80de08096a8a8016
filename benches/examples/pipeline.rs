//! Pipelines (issue 23): how late a scheduled slot starts, and how fast a pipeline of cache
//! hits completes. 3 coordinators on loopback.
//!
//!     cargo run --release -p shoal-benches --example pipeline -- schedule [--slots 1000] [--kill-every-s 0]
//!     cargo run --release -p shoal-benches --example pipeline -- cache [--steps 50]
//!
//! `schedule`: a pipeline on a per-second cron (`catchup = "all"`, so a slot missed while
//! there is no leader still runs) whose first step is a validate step (done in the apply that
//! creates the run). For each slot the latency is the run's first step start (the proposing
//! leader's clock) minus the slot time; runs are read every few seconds (a pipeline keeps its
//! newest 100). With `--kill-every-s S` the leader is SIGKILLed every S seconds and restarted
//! from its folder. It prints median, p99 and max, and checks every slot ran exactly once.
//!
//! `cache`: a pipeline of `--steps` steps: a fifth of them train a small MLP on 1,000 MNIST
//! records, the rest evaluate those models. It runs twice: the first run computes everything,
//! the second hits the cache for every step (a train step's hit waits for the leader to read
//! and hash its checkpoint). Prints both runs' times from the request to the run's end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_proto::{ListPipelineRunsRequest, PipelineRunRequest, RunPipelineRequest};

const USAGE: &str = "pipeline schedule [--slots 1000] [--kill-every-s 0] | cache [--steps 50]";

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
    let ch = shoal_benches::endpoint(addr).with(|ep| ep.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(5))).connect_lazy();
    shoal_benches::rpc(ch).max_decoding_message_size(64 << 20)
}

struct Cluster {
    exe: PathBuf,
    dir: String,
}

impl Cluster {
    fn up(exe: &Path, dir: &Path, workers: u32) -> Result<Cluster> {
        let dir = dir.display().to_string();
        run(exe, &["up", "--coordinators", "3", "--workers", &workers.to_string(), "--dir", &dir])?;
        shoal_benches::use_cluster_token(Path::new(&dir));
        Ok(Cluster { exe: exe.to_path_buf(), dir })
    }

    fn shoal(&self, args: &[&str]) -> Result<String> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--dir", &self.dir]);
        run(&self.exe, &all)
    }

    fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.shoal(&["status", "--json"])?)?)
    }

    /// The leader's (pid, address), once there is one.
    fn leader(&self, wait: Duration) -> Result<(u32, String)> {
        let until = Instant::now() + wait;
        loop {
            if let Ok(s) = self.status() {
                let l = s["coordinators"].as_array().into_iter().flatten().find(|r| r["role"] == "leader");
                if let Some(l) = l {
                    return Ok((l["pid"].as_u64().context("pid")? as u32, l["address"].as_str().context("address")?.to_string()));
                }
            }
            if Instant::now() > until {
                bail!("no leader");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the leader and starts its process again from its folder (same arguments,
    /// `--initial-state existing`).
    fn kill_leader(&self) -> Result<()> {
        let (pid, _) = self.leader(Duration::from_secs(30))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let mut args: Vec<String> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let exe = args.remove(0);
        if let Some(i) = args.iter().position(|a| a == "--initial-state") {
            args[i + 1] = "existing".into();
        }
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        while shoal_cluster::pid_alive(pid) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let data = args.iter().position(|a| a == "--data").map(|i| PathBuf::from(&args[i + 1])).context("--data")?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("restarted.log"))?;
        Command::new(exe).args(&args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Restarted replicas are not in cluster.pb: stop every process of this folder.
        let _ = Command::new(&self.exe).args(["down", "--dir", &self.dir]).output();
        let _ = Command::new("pkill").args(["-9", "-f", &self.dir]).output();
    }
}

fn tiny_dataset(root: &Path, dir: &Path, records: usize) -> Result<[String; 2]> {
    let read = |f: &str| -> Result<shoal_core::idx::IdxArray> { Ok(shoal_core::idx::read_idx_file(&root.join("data/mnist").join(f))?) };
    let (images, labels) = (read("mnist10k-images-idx3-ubyte.gz")?, read("mnist10k-labels-idx1-ubyte.gz")?);
    let (shoal_core::idx::IdxData::U8(px), shoal_core::idx::IdxData::U8(ys)) = (&images.data, &labels.data) else { bail!("MNIST is u8") };
    let (x, y) = (dir.join("images.idx"), dir.join("labels.idx"));
    std::fs::write(&x, shoal_core::idx::encode_idx_u8(&[records, 28, 28], &px[..records * 784]))?;
    std::fs::write(&y, shoal_core::idx::encode_idx_u8(&[records], &ys[..records]))?;
    Ok([x.display().to_string(), y.display().to_string()])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn schedule(root: &Path, exe: &Path, args: &[String]) -> Result<()> {
    let slots: usize = flag(args, "--slots").map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let kill_every = flag(args, "--kill-every-s").map(|s| s.parse::<u64>()).transpose()?.unwrap_or(0);
    let tmp = tempfile::tempdir()?;
    let [x, y] = tiny_dataset(root, tmp.path(), 100)?;
    let c = Cluster::up(exe, &tmp.path().join("cluster"), 0)?;
    c.shoal(&["data", "import", "tiny", &x, &y])?;
    let spec = tmp.path().join("tick.toml");
    std::fs::write(
        &spec,
        "name = \"tick\"\n[schedule]\ncron = \"* * * * * *\"\ncatchup = \"all\"\nconcurrency = \"allow\"\n\
         [[step]]\nname = \"check\"\nkind = \"validate\"\ndataset = \"tiny\"\nmin_records = 10\n",
    )?;
    c.shoal(&["pipeline", "submit", &spec.display().to_string()])?;
    let started = Instant::now();
    // slot ms -> latency ms
    let mut seen: std::collections::BTreeMap<u64, f64> = std::collections::BTreeMap::new();
    let mut kills = 0;
    let mut last_kill = Instant::now();
    let mut first_slot = None;
    while seen.len() < slots {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if kill_every > 0 && last_kill.elapsed() >= Duration::from_secs(kill_every) {
            c.kill_leader()?;
            kills += 1;
            last_kill = Instant::now();
        }
        let Ok((_, addr)) = c.leader(Duration::from_secs(30)) else { continue };
        let mut page = String::new();
        loop {
            let Ok(r) = client(&addr).list_pipeline_runs(ListPipelineRunsRequest { pipeline: "tick".into(), page: page.clone() }).await else { break };
            let r = r.into_inner();
            for run in &r.runs {
                let Some(slot) = run.id.strip_prefix("tick@").and_then(shoal_core::cron::parse_slot_label) else { continue };
                let Some(step) = run.steps.first().filter(|s| s.started_unix_ms > 0) else { continue };
                let first = *first_slot.get_or_insert(slot);
                if slot < first {
                    continue;
                }
                seen.entry(slot).or_insert(step.started_unix_ms as f64 - slot as f64);
            }
            if r.next_page.is_empty() {
                break;
            }
            page = r.next_page;
        }
        if started.elapsed() > Duration::from_secs(slots as u64 * 2 + 120) {
            bail!("only {} of {slots} slots ran in time", seen.len());
        }
    }
    // Every second from the first slot to the last ran once (ids are unique by construction:
    // a second run of a slot would have been refused, so a gap is what exactly-once can lose).
    let (first, last) = (*seen.keys().next().unwrap(), *seen.keys().next_back().unwrap());
    let expected = ((last - first) / 1000 + 1) as usize;
    let mut lat: Vec<f64> = seen.values().copied().collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("slots: {} seen, {expected} from the first to the last (missing: {}), leader kills: {kills}", seen.len(), expected - seen.len());
    println!(
        "latency from the slot to the first step's start, ms: median {:.0}, p99 {:.0}, max {:.0}, min {:.0}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
        lat[0]
    );
    Ok(())
}

async fn cache(root: &Path, exe: &Path, args: &[String]) -> Result<()> {
    let steps: usize = flag(args, "--steps").map(|s| s.parse()).transpose()?.unwrap_or(50);
    let trains = (steps / 5).max(1);
    let tmp = tempfile::tempdir()?;
    let [x, y] = tiny_dataset(root, tmp.path(), 1000)?;
    let c = Cluster::up(exe, &tmp.path().join("cluster"), 2)?;
    c.shoal(&["data", "import", "tiny", &x, &y])?;
    let mut spec = String::from("name = \"fifty\"\n");
    for t in 0..trains {
        spec += &format!(
            "[[step]]\nname = \"train{t}\"\nkind = \"train\"\n[step.spec]\nname = \"t{t}\"\n[step.spec.model]\nkind = \"mlp\"\nhidden = [16]\n\
             [step.spec.dataset]\nname = \"tiny\"\ntrain = [0, 800]\ntest = [800, 1000]\n[step.spec.training]\nepochs = 1\nbatch_size = 100\nseed = {t}\n\
             [step.spec.training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[step.spec.cluster]\nworkers = 1\n"
        );
    }
    for e in 0..steps - trains {
        let t = e % trains;
        spec += &format!("[[step]]\nname = \"eval{e}\"\nkind = \"evaluate\"\nneeds = [\"train{t}\"]\nmodel = \"{{steps.train{t}.model}}\"\ndataset = \"tiny\"\nrecords = [{}, 1000]\n", 10 * e);
    }
    let file = tmp.path().join("fifty.toml");
    std::fs::write(&file, spec)?;
    c.shoal(&["pipeline", "submit", &file.display().to_string()])?;
    let (_, addr) = c.leader(Duration::from_secs(30))?;
    println!("{steps} steps: {trains} train, {} evaluate", steps - trains);
    for label in ["first run (every step computes)", "second run (every step hits)"] {
        let t = Instant::now();
        let run = client(&addr).run_pipeline(RunPipelineRequest { name: "fifty".into(), request_id: String::new() }).await?.into_inner();
        let done = loop {
            let r = client(&addr).get_pipeline_run(PipelineRunRequest { id: run.id.clone(), request_id: String::new() }).await?.into_inner();
            if r.state != "running" {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let elapsed = t.elapsed();
        if done.state != "succeeded" {
            bail!("run {} {}: {}", done.id, done.state, done.error);
        }
        let hits = done.steps.iter().filter(|s| s.cache == "hit").count();
        println!("{label}: {:.3} s, {hits} of {} steps from the cache", elapsed.as_secs_f64(), done.steps.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for a in args.iter().filter(|a| a.starts_with('-')) {
        if !["--slots", "--kill-every-s", "--steps", "--shoal"].contains(&a.as_str()) {
            return Err(shoal_benches::other_argument(a, USAGE));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = match flag(&args, "--shoal") {
        Some(p) => PathBuf::from(p),
        None => shoal_benches::shoal_exe(&root)?,
    };
    match args.first().map(String::as_str) {
        Some("schedule") => schedule(&root, &exe, &args).await,
        Some("cache") => cache(&root, &exe, &args).await,
        _ => bail!("usage: {USAGE}"),
    }
}
