//! The coordinator against etcd 3.4 (Debian's `etcd-server`), side by side in one invocation,
//! both driven by the same Rust gRPC loop:
//!
//!     cargo run --release -p shoal-benches --example coordinator -- failover [--trials 10] [--tls]
//!     cargo run --release -p shoal-benches --example coordinator -- writes [--seconds 5] [--clients 1,100,1000] [--conns 10] [--replicas 3] [--only etcd,etcd-tls,shoal]
//!     cargo run --release -p shoal-benches --example coordinator -- restart [--entries 1000000]
//!
//! `failover`: 3 etcd members (default settings) and 3 shoal coordinators on loopback. Each
//! trial SIGKILLs the leader and times how long until a write commits again (the loop tries
//! the survivors in turn, 300 ms per attempt); the killed member is then restarted and the
//! group allowed to settle. Median and max of the trials.
//!
//! `writes`: committed writes/s and latency percentiles at each concurrency, `--conns` gRPC
//! connections to the leader shared by the clients; etcd in plaintext and with mutual TLS
//! (clients and peers), shoal as it always runs (mutual TLS and a token on every call). etcd: `Put` of a 256-byte value under a
//! fresh key; shoal: `RegisterDataset` of a one-shard manifest under a fresh name (a real
//! metadata write: validated, replicated, fsynced, applied).
//!
//! `restart`: one shoal coordinator takes `--entries` committed writes, then is restarted on
//! its folder twice: with its whole log to replay, and after a snapshot has compacted it. The
//! time is from spawning the process to its answering with every entry applied.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_proto::etcd::kv_client::KvClient;
use shoal_proto::etcd::maintenance_client::MaintenanceClient;
use shoal_proto::{CancelJobRequest, DatasetInfo, RegisterDatasetRequest, ShardInfo, StatusRequest};
use tonic::transport::{Channel, Endpoint};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

/// A shoal coordinator's (TLS with the cluster's admin certificate).
fn shoal_channel(addr: &str) -> Channel {
    shoal_benches::endpoint(addr).with(|ep| ep.connect_timeout(Duration::from_millis(300))).connect_lazy()
}

fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).expect("url").connect_timeout(Duration::from_millis(300)).connect_lazy()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn shoal_exe() -> Result<PathBuf> {
    shoal_benches::shoal_exe(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

// ------------------------------------------------------------------------------------------
// The two systems, each behind the same few operations.
// ------------------------------------------------------------------------------------------

trait Group: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Client addresses of the live members.
    fn endpoints(&self) -> Vec<String>;
    fn leader(&self) -> impl std::future::Future<Output = Result<usize>> + Send;
    fn kill(&mut self, i: usize) -> Result<()>;
    fn restart(&mut self, i: usize) -> Result<()>;
    /// A connection to a member's client address.
    fn channel(&self, addr: &str) -> Channel;
    /// One write through `ch`; Err if it did not commit.
    fn write(&self, ch: Channel, client: u64, seq: u64) -> impl std::future::Future<Output = Result<()>> + Send;
}

struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<(String, String, String, Option<Child>)>, // name, client addr, peer addr, process
    /// With TLS: the client's certificate (the members' is `dir/server/node.*`).
    tls: Option<shoal_coordinator::tls::TlsFiles>,
}

impl Etcd {
    /// `n` members; with `tls`, mutual TLS between clients and members and between members
    /// (`--client-cert-auth`, `--peer-client-cert-auth`), certificates from a CA made by
    /// `shoal ca` for the run (ECDSA P-256, as shoal's own).
    async fn start(n: usize, tls: bool) -> Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let members: Vec<(String, String, String, Option<Child>)> =
            (1..=n).map(|i| (format!("m{i}"), format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()), None)).collect();
        let tls = if tls {
            let exe = shoal_exe()?;
            let ca = dir.path().join("ca");
            for args in [vec!["ca", "init"], vec!["ca", "issue", "--node", "1", "--out", "server"], vec!["ca", "issue", "--client", "bench", "--out", "client"]] {
                let out = Command::new(&exe).args(&args).arg("--dir").arg(&ca).current_dir(dir.path()).output()?;
                if !out.status.success() {
                    bail!("shoal {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
                }
            }
            Some(shoal_coordinator::tls::TlsFiles::load(&dir.path().join("client"), "client").map_err(anyhow::Error::msg)?.context("client credentials")?)
        } else {
            None
        };
        let mut e = Etcd { dir, members, tls };
        for i in 0..n {
            e.restart(i)?;
        }
        e.settle().await?;
        Ok(e)
    }

    async fn settle(&self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.leader().await.is_ok() && self.all_up().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("etcd did not settle")
    }

    async fn all_up(&self) -> bool {
        for ep in self.endpoints() {
            if MaintenanceClient::new(self.channel(&ep)).status(shoal_proto::etcd::StatusRequest {}).await.is_err() {
                return false;
            }
        }
        true
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(c) = m.3.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Group for Etcd {
    fn name(&self) -> &'static str {
        if self.tls.is_some() {
            "etcd-tls"
        } else {
            "etcd"
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().filter(|m| m.3.is_some()).map(|m| m.1.clone()).collect()
    }

    async fn leader(&self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.3.is_some()) {
            if let Ok(s) = MaintenanceClient::new(self.channel(&m.1)).status(shoal_proto::etcd::StatusRequest {}).await {
                let s = s.into_inner();
                if s.leader != 0 && s.header.map(|h| h.member_id) == Some(s.leader) {
                    return Ok(i);
                }
            }
        }
        bail!("no etcd leader")
    }

    fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.members[i].3.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let cluster: Vec<String> = self.members.iter().map(|m| format!("{}={scheme}://{}", m.0, m.2)).collect();
        let (name, client, peer, _) = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", name, "--data-dir"])
            .arg(self.dir.path().join(name))
            .args(["--listen-client-urls", &format!("{scheme}://{client}"), "--advertise-client-urls", &format!("{scheme}://{client}")])
            .args(["--listen-peer-urls", &format!("{scheme}://{peer}"), "--initial-advertise-peer-urls", &format!("{scheme}://{peer}")])
            .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-token", "bench", "--initial-cluster-state", "new"]);
        if self.tls.is_some() {
            let server = self.dir.path().join("server");
            let (ca, cert, key) = (server.join("ca.crt"), server.join("node.crt"), server.join("node.key"));
            for (side, auth) in [("", "--client-cert-auth"), ("peer-", "--peer-client-cert-auth")] {
                cmd.arg(format!("--{side}cert-file")).arg(&cert).arg(format!("--{side}key-file")).arg(&key);
                cmd.arg(format!("--{side}trusted-ca-file")).arg(&ca).arg(auth);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        self.members[i].3 = Some(child);
        Ok(())
    }

    fn channel(&self, addr: &str) -> Channel {
        match &self.tls {
            Some(t) => shoal_coordinator::tls::endpoint(addr, Some(t)).expect("a host:port").with(|ep| ep.connect_timeout(Duration::from_millis(300))).connect_lazy(),
            None => channel(addr),
        }
    }

    async fn write(&self, ch: Channel, client: u64, seq: u64) -> Result<()> {
        let req = shoal_proto::etcd::PutRequest { key: format!("bench/{client}/{seq}").into_bytes(), value: vec![b'v'; 256] };
        KvClient::new(ch).put(req).await?;
        Ok(())
    }
}

struct Shoal {
    exe: PathBuf,
    dir: tempfile::TempDir,
    /// Per replica: its client address, pid, and the arguments it was started with.
    members: Vec<(String, Option<u32>, Vec<String>)>,
}

impl Shoal {
    async fn start(n: usize, extra: &[&str]) -> Result<Shoal> {
        let exe = shoal_exe()?;
        let dir = tempfile::tempdir()?;
        let cluster = dir.path().join("cluster");
        let out = Command::new(&exe)
            .args(["up", "--coordinators", &n.to_string(), "--workers", "0", "--json", "--dir"])
            .arg(&cluster)
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!("shoal up: {}", String::from_utf8_lossy(&out.stderr));
        }
        let up: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        shoal_benches::use_cluster_token(&cluster);
        let mut members = Vec::new();
        for (ep, pid) in up["endpoints"].as_array().context("endpoints")?.iter().zip(up["coordinator_pids"].as_array().context("pids")?) {
            let pid = pid.as_u64().context("pid")? as u32;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
            let args: Vec<String> = cmdline.split(|&b| b == 0).skip(1).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            members.push((ep.as_str().context("endpoint")?.to_string(), Some(pid), args));
        }
        let s = Shoal { exe, dir, members };
        s.settle().await?;
        Ok(s)
    }

    async fn settle(&self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let mut up = 0;
            for ep in self.endpoints() {
                if let Ok(s) = shoal_benches::rpc(shoal_channel(&ep)).get_status(StatusRequest::default()).await {
                    if s.into_inner().node.is_some_and(|n| n.leader_id != 0) {
                        up += 1;
                    }
                }
            }
            if up == self.endpoints().len() && self.leader().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("shoal did not settle")
    }
}

impl Drop for Shoal {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(pid) = m.1 {
                // SAFETY: a process this benchmark started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if std::env::var_os("SHOAL_BENCH_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("shoal's folder kept at {}", kept.display());
        }
    }
}

impl Group for Shoal {
    fn name(&self) -> &'static str {
        "shoal"
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().filter(|m| m.1.is_some()).map(|m| m.0.clone()).collect()
    }

    async fn leader(&self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.1.is_some()) {
            if let Ok(s) = shoal_benches::rpc(shoal_channel(&m.0)).get_status(StatusRequest::default()).await {
                if s.into_inner().node.is_some_and(|n| n.role == "leader") {
                    return Ok(i);
                }
            }
        }
        bail!("no shoal leader")
    }

    fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(pid) = self.members[i].1.take() {
            // SAFETY: a process this benchmark started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            while Path::new(&format!("/proc/{pid}")).exists() && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        let mut args = self.members[i].2.clone();
        if let Some(at) = args.iter().position(|a| a == "--initial-state") {
            args[at + 1] = "existing".into();
        }
        let log = std::fs::File::create(self.dir.path().join(format!("replica-{i}.log")))?;
        let child = Command::new(&self.exe).args(&args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        self.members[i].1 = Some(child.id());
        Ok(())
    }

    fn channel(&self, addr: &str) -> Channel {
        shoal_channel(addr)
    }

    async fn write(&self, ch: Channel, client: u64, seq: u64) -> Result<()> {
        let name = format!("b{client}x{seq}");
        let dataset = DatasetInfo {
            name: name.clone(),
            version: 0,
            records: 1000,
            feature_shape: vec![28, 28],
            classes: 10,
            shards: vec![ShardInfo { path: format!("datasets/{name}/import-{client}-{seq}/shard-00000.safetensors"), records: 1000, blake3: "0".repeat(64), bytes: 800_000 }],
            ..Default::default()
        };
        let req = RegisterDatasetRequest { dataset: Some(dataset), request_id: format!("bench-{client}-{seq}") };
        shoal_benches::rpc(ch).register_dataset(req).await?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// The benchmarks.
// ------------------------------------------------------------------------------------------

/// SIGKILL the leader, then time until a write commits through a survivor.
async fn failover_trial(g: &mut impl Group, trial: u64) -> Result<f64> {
    let leader = g.leader().await?;
    g.kill(leader)?;
    let killed = Instant::now();
    let eps = g.endpoints();
    let mut seq = 0;
    let took = loop {
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("{}: no write committed within 30 s of the kill", g.name());
        }
        let ep = &eps[seq as usize % eps.len()];
        seq += 1;
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(300), g.write(g.channel(ep), 1_000_000 + trial, seq)).await {
            break killed.elapsed().as_secs_f64();
        }
        if (seq as usize).is_multiple_of(eps.len()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    g.restart(leader)?;
    Ok(took)
}

async fn failover(args: &[String]) -> Result<()> {
    let trials: u64 = flag(args, "--trials").map(|v| v.parse()).transpose()?.unwrap_or(10);
    let mut etcd = Etcd::start(3, args.iter().any(|a| a == "--tls")).await?;
    let mut shoal = Shoal::start(3, &[]).await?;
    let (mut e, mut s) = (Vec::new(), Vec::new());
    for t in 0..trials {
        // Alternate which goes first; each settles (all members up, a leader) before a trial.
        for first_etcd in if t % 2 == 0 { [true, false] } else { [false, true] } {
            if first_etcd {
                etcd.settle().await?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                e.push(failover_trial(&mut etcd, t).await?);
                println!("trial {:>2}: etcd  {:.3} s", t + 1, e.last().unwrap());
            } else {
                shoal.settle().await?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                s.push(failover_trial(&mut shoal, t).await?);
                println!("trial {:>2}: shoal {:.3} s", t + 1, s.last().unwrap());
            }
        }
    }
    for (name, mut v) in [("etcd", e), ("shoal", s)] {
        v.sort_by(|a, b| a.total_cmp(b));
        println!("{name:<6} leader SIGKILL to next committed write: median {:.3} s, max {:.3} s, min {:.3} s ({} trials)", percentile(&v, 0.5), v[v.len() - 1], v[0], v.len());
    }
    Ok(())
}

/// `clients` writers for `seconds`, sharing `conns` connections to the leader.
async fn load<G: Group>(g: &Arc<G>, clients: u64, conns: usize, seconds: f64) -> Result<(f64, Vec<f64>)> {
    let leader = g.endpoints()[g.leader().await?].clone();
    let chans: Vec<Channel> = (0..conns.max(1)).map(|_| g.channel(&leader)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Client ids unique across calls: every write names a fresh key or dataset.
    static NEXT_CLIENT: AtomicU64 = AtomicU64::new(0);
    let base = NEXT_CLIENT.fetch_add(clients, Ordering::Relaxed);
    let start = Instant::now();
    for c in base..base + clients {
        let (g, ch, stop, done, lat, failed) = (g.clone(), chans[c as usize % chans.len()].clone(), stop.clone(), done.clone(), lat.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let t = Instant::now();
                match g.write(ch.clone(), c, seq).await {
                    Ok(()) => {
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            println!("  first failure: {e:#}");
                        }
                    }
                }
            }
            lat.lock().unwrap().extend(mine);
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    l.sort_by(|a, b| a.total_cmp(b));
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        println!("  ({} writes failed and were not counted)", f);
    }
    Ok((n as f64 / elapsed, l))
}

async fn writes(args: &[String]) -> Result<()> {
    let seconds: f64 = flag(args, "--seconds").map(|v| v.parse()).transpose()?.unwrap_or(5.0);
    let conns: usize = flag(args, "--conns").map(|v| v.parse()).transpose()?.unwrap_or(10);
    let levels: Vec<u64> = flag(args, "--clients").unwrap_or_else(|| "1,100,1000".into()).split(',').map(|v| v.parse()).collect::<Result<_, _>>()?;
    let replicas: usize = flag(args, "--replicas").map(|v| v.parse()).transpose()?.unwrap_or(3);
    let only = flag(args, "--only");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|o| o == name));
    // Every group runs all along (each costs the others a little idle CPU, the same for all).
    let etcd = Arc::new(Etcd::start(replicas, false).await?);
    let etcd_tls = Arc::new(Etcd::start(replicas, true).await?);
    let shoal = Arc::new(Shoal::start(replicas, &[]).await?);
    println!("writes: {replicas} members each, {conns} connections to the leader, {seconds} s per level (after 1 s of warm-up)");
    println!("etcd: plaintext; etcd-tls: mutual TLS for clients and peers; shoal: mutual TLS for clients and peers and an admin token checked on every call");
    println!("{:<8} {:>8} {:>12} {:>9} {:>9} {:>9}", "system", "clients", "writes/s", "p50 ms", "p99 ms", "max ms");
    for &c in &levels {
        for name in ["etcd", "etcd-tls", "shoal"] {
            if !wanted(name) {
                continue;
            }
            let (rate, l) = match name {
                "etcd" => {
                    load(&etcd, c, conns, 1.0).await?;
                    load(&etcd, c, conns, seconds).await?
                }
                "etcd-tls" => {
                    load(&etcd_tls, c, conns, 1.0).await?;
                    load(&etcd_tls, c, conns, seconds).await?
                }
                _ => {
                    load(&shoal, c, conns, 1.0).await?;
                    load(&shoal, c, conns, seconds).await?
                }
            };
            println!("{name:<8} {c:>8} {rate:>12.0} {:>9.2} {:>9.2} {:>9.2}", percentile(&l, 0.5), percentile(&l, 0.99), l.last().copied().unwrap_or(f64::NAN));
        }
    }
    Ok(())
}

/// Spawns one replica from `args` and times it until it has applied `entries` (or more).
async fn time_restart(exe: &Path, args: &[String], addr: &str, entries: u64) -> Result<(f64, Child)> {
    let start = Instant::now();
    let child = Command::new(exe).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    loop {
        if start.elapsed() > Duration::from_secs(600) {
            bail!("the replica did not come back within 10 minutes");
        }
        if let Ok(s) = shoal_benches::rpc(shoal_channel(addr)).get_status(StatusRequest::default()).await {
            if s.into_inner().node.is_some_and(|n| n.role == "leader" && n.applied_index >= entries) {
                return Ok((start.elapsed().as_secs_f64(), child));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn restart(args: &[String]) -> Result<()> {
    let entries: u64 = flag(args, "--entries").map(|v| v.parse()).transpose()?.unwrap_or(1_000_000);
    // No compaction while the log fills: the first restart replays all of it.
    let mut shoal = Shoal::start(1, &["--snapshot-every", "100000000"]).await?;
    let addr = shoal.endpoints()[0].clone();
    let chans: Vec<Channel> = (0..10).map(|_| shoal_channel(&addr)).collect();
    let t = Instant::now();
    // Writes that change nothing but are committed like any other: cancelling a job that
    // does not exist (refused when applied), so the state stays small and the log is all.
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..500 {
        let (ch, next) = (chans[c % chans.len()].clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < entries {
                let _ = shoal_benches::rpc(ch.clone()).cancel_job(CancelJobRequest { id: u64::MAX, request_id: String::new() }).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let status = shoal_benches::rpc(shoal_channel(&addr)).get_status(StatusRequest::default()).await?.into_inner();
    let applied = status.node.context("status")?.applied_index;
    println!("restart: {applied} entries committed in {:.1} s", t.elapsed().as_secs_f64());
    let log = shoal.dir.path().join("cluster/coordinators/1/raft.log");
    println!("raft.log: {:.1} MB", std::fs::metadata(&log)?.len() as f64 / 1e6);
    shoal.kill(0)?;
    let mut args = shoal.members[0].2.clone();
    let at = args.iter().position(|a| a == "--initial-state").context("--initial-state")?;
    args[at + 1] = "existing".into();
    let (replay, mut child) = time_restart(&shoal.exe, &args, &addr, applied).await?;
    println!("restart with the whole log to replay: {replay:.2} s");
    child.kill()?;
    child.wait()?;
    // Once more with snapshots on: it compacts right after replaying, then restarts from the snapshot.
    let at = args.iter().position(|a| a == "--snapshot-every").context("--snapshot-every")?;
    args[at + 1] = "10000".into();
    let (_, mut child) = time_restart(&shoal.exe, &args, &addr, applied).await?;
    let start = Instant::now();
    while !shoal.dir.path().join("cluster/coordinators/1/snapshot.pb").exists() && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill()?;
    child.wait()?;
    println!("raft.log after compaction: {:.3} MB", std::fs::metadata(&log)?.len() as f64 / 1e6);
    let (compacted, mut child) = time_restart(&shoal.exe, &args, &addr, applied).await?;
    println!("restart after compaction: {compacted:.2} s");
    child.kill()?;
    child.wait()?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("failover") => failover(&args[1..]).await,
        Some("writes") => writes(&args[1..]).await,
        Some("restart") => restart(&args[1..]).await,
        _ => bail!("usage: coordinator failover [--trials N] [--tls] | writes [--only etcd,etcd-tls,shoal] [--seconds S] [--clients 1,100,1000] [--conns N] | restart [--entries N]"),
    }
}
