//! shoal across test hosts (`shoal_cluster::testhosts`: network namespaces, each with its own
//! /dev/shm; root only), in one invocation:
//!
//! 1. all-reduce of `--bytes` (default 64M) over 2 hosts x 2 ranks: shoal `hierarchical`
//!    (shm within a host, tcp between), shoal `tcp` (one flat ring), and gloo with the same
//!    placement (benches/peer/gloo_allreduce.py, one process per rank in its host); and 2
//!    hosts x 1 rank over tcp for reference. Median of `--iters` after 3 warm-up calls.
//! 2. training samples/s of the specs given (default: the demo's MLP and the CNN example) on a
//!    coordinator in host 0 and workers (1 compute thread each) on 2 hosts, 1 and 2 per host,
//!    at each added one-way delay of `--delays` (ms; forwarded links, a user-space forwarder
//!    in this process) and over a kernel bridge (no forwarder).
//!
//!     cargo run --release -p shoal-benches --example hosts -- [--bytes 64M] [--iters 10] [--delays 0,1,5] [--specs a.toml,b.toml] [--epochs 1] [--python PATH] [--skip-allreduce] [--skip-train]
//!
//! Build the binary first (`cargo build --release -p shoal`).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_benches::{median, parse_size};
use shoal_cluster::testhosts::{Links, TestHosts};

const USAGE: &str = "usage: hosts [--bytes 64M] [--iters 10] [--delays 0,1,5] [--specs a.toml,b.toml] [--epochs 1] [--python PATH] [--skip-allreduce] [--skip-train]";

struct Args {
    bytes: u64,
    iters: usize,
    delays: Vec<u64>,
    specs: Vec<PathBuf>,
    epochs: u32,
    python: PathBuf,
    allreduce: bool,
    train: bool,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        bytes: 64 << 20,
        iters: 10,
        delays: vec![0, 1, 5],
        specs: vec![repo().join("examples/mnist-mlp.toml"), repo().join("examples/mnist-cnn.toml")],
        epochs: 1,
        python: repo().join("benches/.venv/bin/python"),
        allreduce: true,
        train: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--bytes" => a.bytes = parse_size(&value("--bytes")?)?,
            "--iters" => a.iters = value("--iters")?.parse()?,
            "--delays" => a.delays = value("--delays")?.split(',').map(|d| d.parse().context("--delays: milliseconds")).collect::<Result<_>>()?,
            "--specs" => a.specs = value("--specs")?.split(',').map(PathBuf::from).collect(),
            "--epochs" => a.epochs = value("--epochs")?.parse()?,
            "--python" => a.python = value("--python")?.into(),
            "--skip-allreduce" => a.allreduce = false,
            "--skip-train" => a.train = false,
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn shoal_bin() -> PathBuf {
    repo().join("target/release/shoal")
}

/// Children killed and reaped on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// shoal's all-reduce with `placement[r]` = rank r's host; rank 0's median ms.
fn shoal_allreduce(hosts: &TestHosts, placement: &[usize], transport: &str, a: &Args, dir: &Path) -> Result<f64> {
    let meet = tempfile::tempdir_in(dir)?;
    let mut procs = Procs(Vec::new());
    for (rank, &h) in placement.iter().enumerate() {
        let mut cmd = hosts.command(h, shoal_bin());
        cmd.args(["bench", "allreduce-rank", "--rank", &rank.to_string(), "--dir"]).arg(meet.path());
        cmd.args(["--bind", &hosts.address(h).to_string(), "--bytes", &a.bytes.to_string(), "--world", &placement.len().to_string()]);
        cmd.args(["--transport", transport, "--iters", &a.iters.to_string(), "--warmup", "3"]);
        cmd.stdout(if rank == 0 { Stdio::piped() } else { Stdio::null() }).stderr(Stdio::inherit());
        procs.0.push(cmd.spawn().context("starting a rank")?);
    }
    rank0_median_ms(procs, transport)
}

/// Waits for every rank (rank 0 first, its stdout piped) and returns the median of the
/// `times_ms` of rank 0's last JSON line.
fn rank0_median_ms(mut procs: Procs, what: &str) -> Result<f64> {
    let out = procs.0.remove(0).wait_with_output()?;
    if !out.status.success() {
        bail!("{what}: rank 0 failed ({})", out.status);
    }
    for c in &mut procs.0 {
        let s = c.wait()?;
        if !s.success() {
            bail!("{what}: a rank failed ({s})");
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("")).with_context(|| format!("{what}: rank 0's report"))?;
    Ok(median(&v["times_ms"].as_array().context("no times")?.iter().filter_map(|t| t.as_f64()).collect::<Vec<_>>()))
}

/// gloo's all-reduce with the same placement: one python process per rank in its host.
fn gloo_allreduce(hosts: &TestHosts, placement: &[usize], a: &Args) -> Result<f64> {
    let script = repo().join("benches/peer/gloo_allreduce.py");
    let master = format!("{}:29511", hosts.address(placement[0]));
    let mut procs = Procs(Vec::new());
    for (rank, &h) in placement.iter().enumerate() {
        let mut cmd = hosts.command(h, &a.python);
        cmd.arg(&script).args(["--world", &placement.len().to_string(), "--sizes", &a.bytes.to_string(), "--iters", &a.iters.to_string(), "--warmup", "3"]);
        cmd.args(["--rank", &rank.to_string(), "--master", &master]).env("GLOO_SOCKET_IFNAME", "eth0");
        cmd.stdout(if rank == 0 { Stdio::piped() } else { Stdio::null() }).stderr(Stdio::inherit());
        procs.0.push(cmd.spawn().context("starting a gloo rank")?);
    }
    rank0_median_ms(procs, "gloo")
}

fn allreduce(a: &Args, dir: &Path) -> Result<()> {
    let hosts = TestHosts::new(2, &dir.join("hosts-ar"))?;
    let gb = |ms: f64| a.bytes as f64 / (ms / 1e3) / 1e9;
    println!("all-reduce of {} bytes, f32, across 2 test hosts (kernel bridge), median of {} calls:", a.bytes, a.iters);
    println!("  {:<34} {:>10} {:>12}", "run", "time_ms", "algbw_GBps");
    let two_by_two = [0, 0, 1, 1];
    for (name, placement, transport) in [
        ("shoal hierarchical, 2 hosts x 2", &two_by_two[..], "hierarchical"),
        ("shoal tcp (flat ring), 2 hosts x 2", &two_by_two[..], "tcp"),
        ("shoal tcp, 2 hosts x 1", &[0, 1][..], "tcp"),
    ] {
        let ms = shoal_allreduce(&hosts, placement, transport, a, dir)?;
        println!("  {name:<34} {ms:>10.3} {:>12.3}", gb(ms));
    }
    if a.python.is_file() {
        for (name, placement) in [("gloo, 2 hosts x 2", &two_by_two[..]), ("gloo, 2 hosts x 1", &[0, 1][..])] {
            match gloo_allreduce(&hosts, placement, a) {
                Ok(ms) => println!("  {name:<34} {ms:>10.3} {:>12.3}", gb(ms)),
                Err(e) => println!("  {name:<34} failed: {e:#}"),
            }
        }
    } else {
        println!("  gloo: no python at {} (benches/peer/setup.sh makes the venv)", a.python.display());
    }
    Ok(())
}

/// A coordinator in host 0, workers placed by `placement` (their hosts), the spec trained for
/// `epochs`: (samples/s, transport, test accuracy).
fn train(hosts: &TestHosts, spec: &Path, placement: &[usize], epochs: u32, dir: &Path) -> Result<(f64, String, f64)> {
    let run = tempfile::tempdir_in(dir)?;
    let store = run.path().join("store");
    let coord = format!("{}:7000", hosts.address(0));
    let log = |name: &str| std::fs::File::create(run.path().join(format!("{name}.log")));
    let mut procs = Procs(Vec::new());
    let layout = shoal_cluster::Layout::new(run.path());
    layout.issue_credentials(&[1])?;
    let mut cmd = hosts.command(0, shoal_bin());
    cmd.args(["serve", "coordinator", "--id", "1", "--listen", &coord, "--data"]).arg(run.path().join("raft")).arg("--store").arg(&store).arg("--credentials").arg(layout.node_credentials(1));
    procs.0.push(cmd.stdout(log("coordinator")?).stderr(log("coordinator-err")?).spawn()?);
    for (i, &h) in placement.iter().enumerate() {
        let mut cmd = hosts.command(h, shoal_bin());
        cmd.args(["serve", "worker", "--threads", "1", "--endpoints", &coord, "--listen", &format!("{}:0", hosts.address(h)), "--store"]).arg(&store).arg("--credentials").arg(layout.worker_credentials());
        procs.0.push(cmd.stdout(log(&format!("worker-{i}"))?).stderr(log(&format!("worker-{i}-err"))?).spawn()?);
    }
    let cli = |args: &[&str]| -> Result<serde_json::Value> {
        let out = hosts.command(0, shoal_bin()).args(args).args(["--endpoints", &coord]).arg("--dir").arg(run.path()).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("shoal {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let until = Instant::now() + Duration::from_secs(60);
    while cli(&["status", "--json"]).ok().and_then(|s| s["workers"].as_array().map(|w| w.len())).unwrap_or(0) < placement.len() {
        if Instant::now() > until {
            bail!("the workers did not register");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let d = repo().join("data/mnist");
    let (x, y) = (d.join("mnist10k-images-idx3-ubyte.gz"), d.join("mnist10k-labels-idx1-ubyte.gz"));
    cli(&["data", "import", "mnist", "--json", x.to_str().unwrap(), y.to_str().unwrap()])?;
    let text = std::fs::read_to_string(spec)?;
    let text = regex_set(&text, "epochs", &epochs.to_string());
    let text = regex_set(&text, "workers", &placement.len().to_string());
    let file = run.path().join("spec.toml");
    std::fs::write(&file, text)?;
    let id = cli(&["job", "submit", "--json", file.to_str().unwrap()])?["id"].to_string();
    let until = Instant::now() + Duration::from_secs(1800);
    loop {
        let j = cli(&["job", "status", &id, "--json"])?;
        match j["state"].as_str() {
            Some("succeeded") => {
                let p = &j["phase_ms"];
                let phases = format!("fb {:.1} coll {:.1} opt {:.1}", p["forward_backward"].as_f64().unwrap_or(0.0), p["collective"].as_f64().unwrap_or(0.0), p["optimizer"].as_f64().unwrap_or(0.0));
                return Ok((j["samples_per_s"].as_f64().unwrap_or(f64::NAN), format!("{} [{phases}]", j["transport"].as_str().unwrap_or("")), j["test_accuracy"].as_f64().unwrap_or(f64::NAN)));
            }
            Some("failed" | "cancelled") => bail!("the job ended {}: {}", j["state"], j["error"]),
            _ if Instant::now() > until => bail!("the job did not end"),
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// `key = value` at the start of a line, replaced (the spec's first such key).
fn regex_set(text: &str, key: &str, value: &str) -> String {
    let mut done = false;
    text.lines()
        .map(|l| {
            if !done && l.trim_start().starts_with(&format!("{key} =")) {
                done = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn training(a: &Args, dir: &Path) -> Result<()> {
    println!("training across 2 test hosts, a coordinator in host 0, workers of 1 compute thread, {} epoch(s):", a.epochs);
    println!("  {:<18} {:<10} {:<16} {:>12} {:>14} {:>9}", "spec", "links", "placement", "samples_per_s", "transport", "accuracy");
    let mut links: Vec<(String, Links, Option<u64>)> = vec![("bridge".into(), Links::Bridge, None)];
    links.extend(a.delays.iter().map(|&d| (format!("fwd {d} ms"), Links::Forwarded, Some(d))));
    for spec in &a.specs {
        let name = spec.file_stem().unwrap_or_default().to_string_lossy().to_string();
        for (label, kind, delay) in &links {
            let hosts = TestHosts::with_links(2, &dir.join(format!("hosts-{name}-{label}").replace(' ', "")), *kind)?;
            if let Some(d) = delay {
                hosts.set_delay(Duration::from_millis(*d))?;
            }
            if let Ok(v) = std::env::var("SHOAL_SLOW_START_AFTER_IDLE") {
                for h in 0..hosts.len() {
                    hosts.sysctl(h, "net.ipv4.tcp_slow_start_after_idle", &v)?;
                }
            }
            for (pl, placement) in placements() {
                match train(&hosts, spec, placement, a.epochs, dir) {
                    Ok((sps, transport, acc)) => println!("  {name:<18} {label:<10} {pl:<16} {sps:>12.0} {transport:>14} {acc:>9.4}"),
                    Err(e) => println!("  {name:<18} {label:<10} {pl:<16} failed: {e:#}"),
                }
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    if let Some(why) = TestHosts::unavailable() {
        bail!("{why}");
    }
    if !shoal_bin().is_file() {
        bail!("{} is missing: cargo build --release -p shoal", shoal_bin().display());
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    println!("cpu: {model}, {} logical, avx512f: {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), cpu.contains("avx512f"));
    let dir = tempfile::tempdir()?;
    if a.allreduce {
        allreduce(&a, dir.path())?;
    }
    if a.train {
        training(&a, dir.path())?;
    }
    Ok(())
}

/// The placements trained: `SHOAL_PLACEMENTS=2x2` keeps one (for profiling).
fn placements() -> Vec<(&'static str, &'static [usize])> {
    let all: Vec<(&'static str, &'static [usize])> = vec![("2 hosts x 1", &[0, 1]), ("2 hosts x 2", &[0, 0, 1, 1])];
    match std::env::var("SHOAL_PLACEMENTS").as_deref() {
        Ok("2x1") => all[..1].to_vec(),
        Ok("2x2") => all[1..].to_vec(),
        _ => all,
    }
}
