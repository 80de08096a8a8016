//! Bringing a local cluster up and down: the supervisor behind `shoal up`, `shoal down` and
//! `shoal demo`. It spawns `shoal serve coordinator|worker` processes (logs in their folders),
//! waits until a leader is elected and every worker has registered, and records what it
//! started in `DIR/cluster.pb` so `down` and the other commands can find it.

pub mod credentials;
pub mod testhosts;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_coordinator::Client;
use shoal_proto::{ClusterFile, ClusterProcess, Message, StatusRequest};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("a cluster is already running in {dir} (pids {pids:?}); run `shoal down --dir {dir}` first")]
    AlreadyRunning { dir: String, pids: Vec<u32> },
    #[error("no cluster is recorded in {0} (no cluster.pb); start one with `shoal up`")]
    NotFound(String),
    #[error("{0}")]
    Io(String),
    #[error("the cluster did not come up: {0}")]
    Startup(String),
    #[error("{path}: corrupt cluster file: {reason}")]
    Corrupt { path: String, reason: String },
}

/// How a local cluster is laid out in its folder.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }
    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.pb")
    }
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    pub fn coordinator_dir(&self, id: u64) -> PathBuf {
        self.dir.join("coordinators").join(id.to_string())
    }
    pub fn worker_dir(&self, n: u64) -> PathBuf {
        self.dir.join("workers").join(n.to_string())
    }
    /// The ids of the replica folders under `coordinators/` (removed replicas' are set aside).
    pub fn replica_ids(&self) -> Result<Vec<u64>, ClusterError> {
        let root = self.dir.join("coordinators");
        let mut ids: Vec<u64> = match std::fs::read_dir(&root) {
            Ok(entries) => entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ClusterError::Io(format!("{}: {e}", root.display()))),
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// The cluster's id, kept across `down` and `up`: its presence says the cluster exists.
    pub fn cluster_id_file(&self) -> PathBuf {
        self.dir.join("cluster-id")
    }

    /// Whether the folder was made by `up --insecure` (its processes start without
    /// credentials), which its marker file says.
    pub fn insecure(&self) -> bool {
        self.dir.join(INSECURE_MARKER).exists()
    }

    /// The admin's credentials folder (`ca/`): the token key, the first tokens.
    pub fn authority(&self) -> credentials::Authority {
        credentials::Authority::new(self.dir.join("ca"))
    }

    /// The credentials folder of coordinator `id` or of the workers.
    pub fn node_credentials(&self, id: u64) -> PathBuf {
        self.dir.join("credentials").join(format!("coordinator-{id}"))
    }
    pub fn worker_credentials(&self) -> PathBuf {
        self.dir.join("credentials").join("worker")
    }

    /// The folder's credentials for processes started by hand: the CA (made once), the
    /// workers' folder and coordinator `ids`' folders (each valid for any address: clients
    /// check the CA's signature and the name `shoal`).
    pub fn issue_credentials(&self, ids: &[u64]) -> Result<(), ClusterError> {
        let ca = self.authority();
        if !ca.exists() {
            ca.init()?;
        }
        if !self.worker_credentials().exists() {
            ca.issue_worker(&self.worker_credentials(), &[])?;
        }
        for &id in ids {
            if !self.node_credentials(id).exists() {
                ca.issue_node(&self.node_credentials(id), id, &[])?;
            }
        }
        Ok(())
    }

    /// A client of the recorded cluster with its admin token (if the folder has one).
    pub fn client(&self, endpoints: &[String]) -> Result<Client, ClusterError> {
        let tls = self.authority().admin_tls()?;
        Client::new(endpoints).and_then(|c| c.with_token(self.authority().admin_token().as_deref())).and_then(|c| c.with_tls(tls)).map_err(|e| ClusterError::Startup(e.to_string()))
    }

    pub fn read(&self) -> Result<ClusterFile, ClusterError> {
        let path = self.cluster_file();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ClusterError::NotFound(self.dir.display().to_string())),
            Err(e) => return Err(ClusterError::Io(format!("{}: {e}", path.display()))),
        };
        ClusterFile::decode(&bytes[..]).map_err(|e| ClusterError::Corrupt { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Coordinator endpoints of the recorded cluster.
    pub fn endpoints(&self) -> Result<Vec<String>, ClusterError> {
        Ok(self.read()?.coordinators.into_iter().map(|c| c.address).collect())
    }
}

/// The file that marks a cluster folder made by `up --insecure`.
pub const INSECURE_MARKER: &str = "insecure";

#[derive(Clone, Debug)]
pub struct UpOptions {
    pub coordinators: u64,
    pub workers: u64,
    /// Worker lease: a worker silent this long is declared lost.
    pub lease: Duration,
    /// Coordinators snapshot and compact every this many applied entries.
    pub snapshot_every: u64,
    /// The `shoal` executable to spawn.
    pub exe: PathBuf,
    /// The store (location, S3 endpoint or empty); None: what an earlier `up` of the folder
    /// used, or the folder's own `store`.
    pub store: Option<(String, String)>,
    /// No credentials: every process `--insecure` (plaintext, no tokens), for experiments and
    /// benchmarks on one machine. A folder keeps the mode of its first `up`.
    pub insecure: bool,
}

/// Whether `pid` is a live `shoal serve` process. A pid that now belongs to some other
/// program (reused after a crash or reboot) does not count, and is never signalled.
pub fn pid_alive(pid: u32) -> bool {
    // 0 and values that turn negative as pid_t would address process groups or everyone.
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // Reap it first if it is our own exited child, so a zombie does not count as alive.
    // SAFETY: plain libc calls on a pid; WNOHANG never blocks.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid as i32, &mut status, libc::WNOHANG);
        if libc::kill(pid as i32, 0) != 0 {
            return false;
        }
    }
    is_shoal_server(pid)
}

fn is_shoal_server(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            args.len() > 1 && args[1] == b"serve"
        }
        // Without /proc (not Linux) the pid check above is all there is.
        Err(_) => !std::path::Path::new("/proc/self").exists(),
    }
}

fn free_port() -> Result<u16, ClusterError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError::Io(format!("bind 127.0.0.1:0: {e}")))?;
    Ok(l.local_addr().map_err(|e| ClusterError::Io(e.to_string()))?.port())
}

fn spawn(exe: &Path, args: &[String], log_dir: &Path, envs: &[(&str, String)]) -> Result<u32, ClusterError> {
    std::fs::create_dir_all(log_dir).map_err(|e| ClusterError::Io(format!("{}: {e}", log_dir.display())))?;
    let log_path = log_dir.join("log");
    let log = File::create(&log_path).map_err(|e| ClusterError::Io(format!("{}: {e}", log_path.display())))?;
    let err = log.try_clone().map_err(|e| ClusterError::Io(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // New session: the processes outlive the terminal of `shoal up`.
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches nothing of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| ClusterError::Io(format!("spawn {}: {e}", exe.display())))?;
    Ok(child.id())
}

fn check_not_running(layout: &Layout) -> Result<(), ClusterError> {
    match layout.read() {
        Ok(f) => {
            let pids: Vec<u32> = f.coordinators.iter().chain(&f.workers).map(|p| p.pid).filter(|&p| pid_alive(p)).collect();
            if !pids.is_empty() {
                return Err(ClusterError::AlreadyRunning { dir: layout.dir.display().to_string(), pids });
            }
            Ok(())
        }
        Err(ClusterError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Starts a cluster in `layout.dir` and returns once it is ready, with the admin token when
/// this start made the cluster's credentials (to be shown once; `ca/admin.token` keeps it).
pub async fn up(layout: &Layout, opts: &UpOptions) -> Result<(ClusterFile, Option<String>), ClusterError> {
    if opts.coordinators == 0 || opts.workers > 256 || opts.coordinators > 7 {
        return Err(ClusterError::Startup(format!("--coordinators must be 1 to 7 and --workers at most 256 (got {} and {})", opts.coordinators, opts.workers)));
    }
    std::fs::create_dir_all(&layout.dir).map_err(|e| ClusterError::Io(format!("{}: {e}", layout.dir.display())))?;
    // One `up` at a time per folder, and never over a live cluster.
    let lock_path = layout.dir.join("up.lock");
    let lock = File::create(&lock_path).map_err(|e| ClusterError::Io(format!("{}: {e}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(ClusterError::AlreadyRunning { dir: layout.dir.display().to_string(), pids: vec![] });
    }
    check_not_running(layout)?;
    let ca = layout.authority();
    // A folder keeps the mode it was made in (`insecure` marks one made without credentials).
    let marker = layout.dir.join(INSECURE_MARKER);
    match (opts.insecure, layout.insecure()) {
        (true, false) if ca.exists() || layout.cluster_id_file().exists() => {
            return Err(ClusterError::Startup(format!("{} holds a cluster with credentials: --insecure would start it without them (use another folder)", layout.dir.display())))
        }
        (true, false) => std::fs::write(&marker, b"made by `shoal up --insecure`: no CA, no tokens, plaintext\n").map_err(|e| ClusterError::Io(format!("{}: {e}", marker.display())))?,
        (false, true) => return Err(ClusterError::Startup(format!("{} holds a cluster started with --insecure: start it with --insecure again (or use another folder)", layout.dir.display()))),
        _ => {}
    }
    // Credentials once per folder (a folder from before credentials gets them now); the
    // admin token is shown once, when it is made.
    let admin_token = if opts.insecure || ca.exists() { None } else { Some(ca.init()?) };
    // The workers' folder from the start, so a worker started by hand (`serve worker
    // --credentials DIR/credentials/worker`) finds it whatever --workers said.
    if !opts.insecure && !layout.worker_credentials().exists() {
        ca.issue_worker(&layout.worker_credentials(), &[])?;
    }

    // A folder that ran a cluster before brings its replicas back with their state: each must
    // find it (an emptied replica folder is refused rather than rejoining as if it never voted).
    let (cluster_id, existing) = match std::fs::read_to_string(layout.cluster_id_file()) {
        Ok(id) => (id.trim().to_string(), true),
        Err(_) => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let id = blake3::hash(format!("{nanos}-{}", std::process::id()).as_bytes()).to_hex()[..16].to_string();
            shoal_core::fsutil::write_atomic(&layout.cluster_id_file(), id.as_bytes()).map_err(|e| ClusterError::Io(e.to_string()))?;
            (id, false)
        }
    };
    let (store_dir, store_endpoint) = match (&opts.store, layout.read()) {
        (Some(s), _) => s.clone(),
        (None, Ok(before)) if !before.store_dir.is_empty() => (before.store_dir, before.store_endpoint),
        (None, _) => (layout.store().display().to_string(), String::new()),
    };
    let mut file = ClusterFile {
        store_dir,
        store_endpoint,
        cluster_id: cluster_id.clone(),
        lease_ms: opts.lease.as_millis() as u64,
        snapshot_every: opts.snapshot_every,
        ..Default::default()
    };
    // An existing cluster comes back as the group it is now (replicas may have been added or
    // removed since it started), whatever --coordinators says.
    let ids: Vec<u64> = if existing { layout.replica_ids()? } else { (1..=opts.coordinators).collect() };
    if ids.is_empty() {
        return Err(ClusterError::Startup(format!("{} ran a cluster but holds no coordinator folders", layout.dir.display())));
    }
    let mut peers = Vec::new();
    for &id in &ids {
        peers.push((id, format!("127.0.0.1:{}", free_port()?)));
    }
    let peer_arg = peers.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
    for (id, addr) in &peers {
        let initial = if existing { "existing" } else { "new" };
        file.coordinators.push(spawn_coordinator(layout, &opts.exe, &file, *id, addr, &peer_arg, initial)?);
    }
    // Record it now, so `down` can clean up even if the rest of start-up fails.
    write_file(layout, &file)?;
    let endpoints: Vec<String> = peers.iter().map(|(_, a)| a.clone()).collect();
    let threads = threads_per_worker(opts.workers);
    for n in 1..=opts.workers {
        let process = spawn_worker(layout, &opts.exe, &file, &endpoints, n, threads)?;
        file.workers.push(process);
        // Recorded as soon as it runs, so `down` finds it whatever fails next.
        write_file(layout, &file)?;
    }
    wait_ready(layout, &file, &endpoints, opts.workers as usize).await?;
    read_http_addresses(&mut file);
    write_file(layout, &file)?;
    drop(lock);
    Ok((file, admin_token.map(|t| t.to_string())))
}

/// Where a process of the cluster writes the address of its HTTP listener (`/metrics`).
fn http_addr_file(dir: &Path) -> PathBuf {
    dir.join("http.addr")
}

/// Fills in each process's HTTP address from the file it wrote (before its gRPC listener
/// bound, so it is there once the process answered); empty where it is not.
fn read_http_addresses(file: &mut ClusterFile) {
    for p in file.coordinators.iter_mut().chain(file.workers.iter_mut()) {
        if p.http_address.is_empty() {
            p.http_address = std::fs::read_to_string(http_addr_file(Path::new(&p.dir))).map(|s| s.trim().to_string()).unwrap_or_default();
        }
    }
}

/// Compute threads for each of `workers` workers sharing this machine's cores.
fn threads_per_worker(workers: u64) -> u64 {
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64 / workers.max(1)).max(1)
}

/// Starts worker process number `n` of the local cluster.
fn spawn_worker(layout: &Layout, exe: &Path, file: &ClusterFile, endpoints: &[String], n: u64, threads: u64) -> Result<ClusterProcess, ClusterError> {
    let dir = layout.worker_dir(n);
    let mut args = vec![
        "serve".into(), "worker".into(),
        "--endpoints".into(), endpoints.join(","),
        "--listen".into(), "127.0.0.1:0".into(),
        "--threads".into(), threads.to_string(),
        "--http-addr-file".into(), http_addr_file(&dir).display().to_string(),
        "--cache-dir".into(), dir.join("shard-cache").display().to_string(),
    ];
    args.extend(store_args(layout, file));
    if layout.insecure() {
        args.push("--insecure".into());
    } else {
        // Issued by `up`.
        args.extend(["--credentials".into(), layout.worker_credentials().display().to_string()]);
    }
    let _ = std::fs::remove_file(http_addr_file(&dir));
    let pid = spawn(exe, &args, &dir, &[])?;
    Ok(ClusterProcess { id: n, address: String::new(), pid, dir: dir.display().to_string(), http_address: String::new() })
}

/// Starts `count` more workers for the running local cluster and returns once the coordinator
/// has them all (every recorded worker that is alive, registered). Returns the new processes.
pub async fn add_workers(layout: &Layout, exe: &Path, count: u64) -> Result<Vec<ClusterProcess>, ClusterError> {
    if !(1..=256).contains(&count) {
        return Err(ClusterError::Startup(format!("--count must be 1 to 256, got {count}")));
    }
    // Not while `up` runs on this folder.
    let lock_path = layout.dir.join("up.lock");
    let lock = File::create(&lock_path).map_err(|e| ClusterError::Io(format!("{}: {e}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(ClusterError::Startup(format!("`shoal up` is running on {}; try again when it is done", layout.dir.display())));
    }
    let mut file = layout.read()?;
    file.workers.retain(|w| pid_alive(w.pid));
    if file.workers.len() as u64 + count > 256 {
        return Err(ClusterError::Startup(format!("a local cluster has at most 256 workers ({} running, {count} asked for)", file.workers.len())));
    }
    let endpoints = layout.endpoints()?;
    let first = file.workers.iter().map(|w| w.id).max().unwrap_or(0) + 1;
    let threads = threads_per_worker(file.workers.len() as u64 + count);
    let mut added = Vec::new();
    for n in first..first + count {
        // A folder left by a worker of an earlier run is reused: it only holds its log.
        let process = spawn_worker(layout, exe, &file, &endpoints, n, threads)?;
        file.workers.push(process.clone());
        write_file(layout, &file)?;
        added.push(process);
    }
    wait_ready(layout, &file, &endpoints, file.workers.len()).await?;
    read_http_addresses(&mut file);
    write_file(layout, &file)?;
    let added = added.into_iter().filter_map(|a| file.workers.iter().find(|w| w.id == a.id).cloned()).collect();
    drop(lock);
    Ok(added)
}

/// `--store` (and `--store-endpoint`) as the cluster file records them.
fn store_args(layout: &Layout, file: &ClusterFile) -> Vec<String> {
    let location = if file.store_dir.is_empty() { layout.store().display().to_string() } else { file.store_dir.clone() };
    let mut args = vec!["--store".to_string(), location];
    if !file.store_endpoint.is_empty() {
        args.extend(["--store-endpoint".to_string(), file.store_endpoint.clone()]);
    }
    args
}

/// Starts one coordinator replica of the recorded cluster (`initial`: new, existing or join).
fn spawn_coordinator(layout: &Layout, exe: &Path, file: &ClusterFile, id: u64, addr: &str, peers: &str, initial: &str) -> Result<ClusterProcess, ClusterError> {
    let dir = layout.coordinator_dir(id);
    let mut args = vec![
        "serve".into(), "coordinator".into(),
        "--id".into(), id.to_string(),
        "--listen".into(), addr.to_string(),
        "--peers".into(), peers.to_string(),
        "--data".into(), dir.display().to_string(),
        "--lease-ms".into(), file.lease_ms.to_string(),
        "--cluster-id".into(), file.cluster_id.clone(),
        "--snapshot-every".into(), file.snapshot_every.to_string(),
        "--initial-state".into(), initial.to_string(),
        "--http-addr-file".into(), http_addr_file(&dir).display().to_string(),
    ];
    args.extend(store_args(layout, file));
    // Issued here if not yet (a replica `coordinator add` brings, or a folder from before
    // credentials).
    if layout.insecure() {
        args.push("--insecure".into());
    } else {
        let credentials = layout.node_credentials(id);
        if !credentials.exists() {
            layout.authority().issue_node(&credentials, id, &[])?;
        }
        args.extend(["--credentials".into(), credentials.display().to_string()]);
    }
    let _ = std::fs::remove_file(http_addr_file(&dir));
    let pid = spawn(exe, &args, &dir, &[])?;
    Ok(ClusterProcess { id, address: addr.to_string(), pid, dir: dir.display().to_string(), http_address: String::new() })
}

/// Adds a coordinator replica at `addr` to the running local cluster: the group takes it as a
/// learner (and promotes it to voter once it has caught up), then its process is started,
/// with an empty folder, to join. Returns its id.
pub async fn add_coordinator(layout: &Layout, exe: &Path, addr: &str) -> Result<u64, ClusterError> {
    let mut file = layout.read()?;
    let client = layout.client(&layout.endpoints()?)?;
    let request_id = shoal_coordinator::client::new_request_id();
    let reply = client
        .call(|mut c| {
            let req = shoal_proto::AddCoordinatorRequest { address: addr.to_string(), request_id: request_id.clone() };
            async move { c.add_coordinator(req).await }
        })
        .await
        .map_err(|e| ClusterError::Startup(format!("adding a coordinator at {addr}: {e}")))?;
    let peers = reply.peers.iter().map(|p| format!("{}={}", p.id, p.address)).collect::<Vec<_>>().join(",");
    let process = spawn_coordinator(layout, exe, &file, reply.id, addr, &peers, "join")?;
    file.coordinators.push(process);
    write_file(layout, &file)?;
    Ok(reply.id)
}

/// Removes coordinator replica `id` from the running local cluster; the replica stops once it
/// applies its removal (it is stopped here if it has not after 10 s), and its folder is set
/// aside as `coordinators/removed-<id>`.
pub async fn remove_coordinator(layout: &Layout, id: u64, force: bool) -> Result<(), ClusterError> {
    let mut file = layout.read()?;
    let client = layout.client(&layout.endpoints()?)?.with_deadline(Duration::from_secs(30));
    let request_id = shoal_coordinator::client::new_request_id();
    client
        .call(|mut c| {
            let req = shoal_proto::RemoveCoordinatorRequest { id, request_id: request_id.clone(), force };
            async move { c.remove_coordinator(req).await }
        })
        .await
        .map_err(|e| ClusterError::Startup(format!("removing coordinator {id}: {e}")))?;
    if let Some(p) = file.coordinators.iter().find(|p| p.id == id) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(p.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop(&[p.pid]);
    }
    file.coordinators.retain(|p| p.id != id);
    write_file(layout, &file)?;
    let dir = layout.coordinator_dir(id);
    if dir.exists() {
        std::fs::rename(&dir, dir.with_file_name(format!("removed-{id}"))).map_err(|e| ClusterError::Io(format!("{}: {e}", dir.display())))?;
    }
    Ok(())
}

fn write_file(layout: &Layout, file: &ClusterFile) -> Result<(), ClusterError> {
    shoal_core::fsutil::write_atomic(&layout.cluster_file(), &file.encode_to_vec()).map_err(|e| ClusterError::Io(e.to_string()))
}

async fn wait_ready(layout: &Layout, file: &ClusterFile, endpoints: &[String], workers: usize) -> Result<(), ClusterError> {
    let client = layout.client(endpoints)?.with_deadline(Duration::from_secs(1));
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    while start.elapsed() < Duration::from_secs(60) {
        for p in file.coordinators.iter().chain(&file.workers) {
            if !pid_alive(p.pid) {
                let log = std::fs::read_to_string(Path::new(&p.dir).join("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(ClusterError::Startup(format!(
                    "process {} exited during start-up; its log ({}/log) ends with:\n{}",
                    p.pid,
                    p.dir,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
        }
        match client.call(|mut c| async move { c.get_status(StatusRequest::default()).await }).await {
            Ok(s) => {
                let node = s.node.unwrap_or_default();
                let live = s.workers.iter().filter(|w| w.state() != shoal_proto::WorkerState::Lost).count();
                if node.leader_id != 0 && live >= workers {
                    return Ok(());
                }
                last = format!("leader {}, {live} of {workers} workers registered", node.leader_id);
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ClusterError::Startup(format!("not ready after 60 s: {last}")))
}

/// Stops the live `shoal serve` processes among `pids`: SIGTERM, then SIGKILL after 5 s.
/// Returns the ones it stopped.
fn stop(pids: &[u32]) -> Vec<u32> {
    let pids: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    for &pid in &pids {
        // SAFETY: signalling a pid we started (checked to be a live `shoal serve`).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in &pids {
        if pid_alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    pids
}

/// Stops worker `worker_id` (the coordinator's id) of the local cluster: SIGTERM, on which it
/// leaves its job (which goes on without it, from the state the others hold) and deregisters, then
/// exits. Returns its pid.
pub async fn remove_worker(layout: &Layout, worker_id: &str) -> Result<u32, ClusterError> {
    let mut file = layout.read()?;
    let client = layout.client(&layout.endpoints()?)?;
    let status = client
        .call(|mut c| async move { c.get_status(shoal_proto::StatusRequest::default()).await })
        .await
        .map_err(|e| ClusterError::Startup(format!("asking the coordinator for its workers: {e}")))?;
    let w = status.workers.iter().find(|w| w.id == worker_id).ok_or_else(|| ClusterError::Startup(format!("there is no worker {worker_id} (see `shoal worker list`)")))?;
    if w.state() == shoal_proto::WorkerState::Lost {
        return Err(ClusterError::Startup(format!("worker {worker_id} is already lost")));
    }
    if !file.workers.iter().any(|p| p.pid == w.pid) || !pid_alive(w.pid) {
        return Err(ClusterError::Startup(format!(
            "worker {worker_id} (pid {}) is not a running process of the cluster in {}: stop it where it runs",
            w.pid,
            layout.dir.display()
        )));
    }
    let pid = w.pid;
    tokio::task::spawn_blocking(move || stop(&[pid])).await.map_err(|e| ClusterError::Startup(e.to_string()))?;
    file.workers.retain(|p| p.pid != pid);
    write_file(layout, &file)?;
    Ok(pid)
}

/// Stops every process of the recorded cluster (workers first), then forgets it.
pub fn down(layout: &Layout) -> Result<Vec<u32>, ClusterError> {
    let file = layout.read()?;
    let mut stopped = Vec::new();
    for group in [&file.workers, &file.coordinators] {
        let pids: Vec<u32> = group.iter().map(|p| p.pid).collect();
        stopped.extend(stop(&pids));
    }
    std::fs::remove_file(layout.cluster_file()).map_err(|e| ClusterError::Io(format!("{}: {e}", layout.cluster_file().display())))?;
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_shoal_servers_count_as_alive() {
        // This test process is alive but is not `shoal serve`: never ours to signal.
        assert!(!pid_alive(std::process::id()));
        // Values that would address process groups, or every process, as a pid_t.
        for pid in [0, u32::MAX, 1 << 31] {
            assert!(!pid_alive(pid));
        }
    }

    #[test]
    fn a_missing_or_corrupt_cluster_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert!(matches!(layout.read(), Err(ClusterError::NotFound(_))));
        std::fs::write(layout.cluster_file(), b"\xff\xff\xff garbage").unwrap();
        assert!(matches!(layout.read(), Err(ClusterError::Corrupt { .. })));
        assert!(down(&layout).is_err());
    }
}
