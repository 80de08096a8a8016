//! Helpers for the integration tests: real `shoal` processes on loopback, each test in its
//! own temporary folder, every process stopped and reaped when the test ends (pass or fail).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn shoal() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.env_remove("SHOAL_DIR").env_remove("SHOAL_STORE").env_remove("SHOAL_STORE_ENDPOINT").env("RUST_LOG", "info");
    c
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn mnist_files() -> [PathBuf; 2] {
    let d = repo().join("data/mnist");
    [d.join("mnist10k-images-idx3-ubyte.gz"), d.join("mnist10k-labels-idx1-ubyte.gz")]
}

/// Runs a command to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("running shoal")
}

pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "command failed: {:?}\nstdout: {}\nstderr: {}", cmd, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "command unexpectedly succeeded: {:?}\nstdout: {}", cmd, String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

pub fn json(cmd: &mut Command) -> serde_json::Value {
    let s = ok(cmd);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad json ({e}): {s}"))
}

/// A cluster started with `shoal up` in a temporary folder; `shoal down` on drop.
pub struct UpCluster {
    pub tmp: tempfile::TempDir,
}

impl UpCluster {
    pub fn start(workers: u32) -> UpCluster {
        Self::start_with(&["--workers", &workers.to_string()])
    }

    /// `shoal up ARGS... --dir DIR`.
    pub fn start_with(args: &[&str]) -> UpCluster {
        Self::start_env(args, &[])
    }

    /// `shoal up ARGS... --dir DIR` with `envs` set for it and every process it starts.
    pub fn start_env(args: &[&str], envs: &[(&str, &str)]) -> UpCluster {
        let tmp = tempfile::tempdir().unwrap();
        let c = UpCluster { tmp };
        ok(shoal().arg("up").args(args).arg("--dir").arg(c.dir()).envs(envs.iter().copied()));
        c
    }

    /// The coordinators' addresses, comma-separated.
    pub fn endpoints(&self) -> String {
        let s = json(&mut self.cmd(&["status", "--json"]));
        let eps: Vec<&str> = s["coordinators"].as_array().unwrap().iter().filter_map(|c| c["address"].as_str()).collect();
        eps.join(",")
    }

    /// Starts `n` more workers (one compute thread each, so runs compare bitwise whatever the
    /// machine) with `envs`, and waits until the cluster has registered them.
    pub fn spawn_workers(&self, n: usize, envs: &[(&str, &str)]) -> Vec<Proc> {
        // By pid: lost workers are forgotten after a lease, so a count of ids can go down.
        let registered = |c: &UpCluster| -> Vec<u64> { json(&mut c.cmd(&["status", "--json"]))["workers"].as_array().unwrap().iter().filter_map(|w| w["pid"].as_u64()).collect() };
        let eps = self.endpoints();
        let procs: Vec<Proc> = (0..n)
            .map(|_| {
                let i = NEXT_WORKER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut cmd = shoal();
                cmd.args(["serve", "worker", "--threads", "1", "--endpoints", &eps, "--store"]).arg(self.store()).arg("--credentials").arg(self.worker_credentials()).envs(envs.iter().copied());
                Proc::spawn(&mut cmd, &self.tmp.path().join(format!("worker-{i}.log")))
            })
            .collect();
        let pids: Vec<u64> = procs.iter().map(|p| p.0.as_ref().expect("just spawned").id() as u64).collect();
        wait_for("the new workers to register", Duration::from_secs(30), || {
            let seen = registered(self);
            pids.iter().all(|p| seen.contains(p)).then_some(())
        });
        procs
    }

    pub fn job(&self, id: &str) -> serde_json::Value {
        json(&mut self.cmd(&["job", "status", id, "--json"]))
    }

    /// Waits until job `id`'s status satisfies `pred` and returns it.
    pub fn wait_job(&self, id: &str, what: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_for(what, timeout, || Some(self.job(id)).filter(|j| pred(j)))
    }

    /// Waits until job `id` ends (any terminal state) and returns its status.
    pub fn wait_end(&self, id: &str) -> serde_json::Value {
        self.wait_job(id, "the job to end", Duration::from_secs(180), |j| ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or("")))
    }

    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("cluster")
    }

    /// The workers' credentials folder that `shoal up` issued (their token).
    pub fn worker_credentials(&self) -> PathBuf {
        self.dir().join("credentials").join("worker")
    }

    pub fn store(&self) -> PathBuf {
        self.dir().join("store")
    }

    /// `shoal ARGS... --dir DIR`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = shoal();
        c.args(args).arg("--dir").arg(self.dir());
        c
    }

    pub fn import_mnist(&self, name: &str) -> serde_json::Value {
        let [x, y] = mnist_files();
        json(self.cmd(&["data", "import", name, "--json"]).arg(x).arg(y))
    }

    pub fn write_spec(&self, file: &str, text: &str) -> PathBuf {
        let p = self.tmp.path().join(file);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn submit_follow(&self, spec: &Path) -> serde_json::Value {
        json(self.cmd(&["job", "submit", "--follow", "--json"]).arg(spec))
    }
}

impl Drop for UpCluster {
    fn drop(&mut self) {
        let _ = run(shoal().arg("down").arg("--dir").arg(self.dir()));
        if std::thread::panicking() {
            // Keep the logs of a failed test for a look.
            if let Ok(fresh) = tempfile::tempdir() {
                let kept = std::mem::replace(&mut self.tmp, fresh).keep();
                eprintln!("test folder kept at {}", kept.display());
            }
        }
    }
}

static NEXT_WORKER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A child process killed and reaped on drop.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().expect("spawn");
        Proc(Some(child))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for it to exit; its status, or None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))) | None)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `f` returns Some, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tiny learnable dataset: 4x4 images, the label is whether the top half is brighter.
pub fn write_tiny_idx(dir: &std::path::Path) -> [std::path::PathBuf; 2] {
    let n = 512;
    let mut rng = shoal_core::rng::SplitMix64::new(3);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..n {
        let img: Vec<u8> = (0..16).map(|_| (rng.next_u64() % 256) as u8).collect();
        let top: u32 = img[..8].iter().map(|&b| b as u32).sum();
        let bottom: u32 = img[8..].iter().map(|&b| b as u32).sum();
        y.push((top > bottom) as u8);
        x.extend(img);
    }
    let xp = dir.join("tiny-images.idx");
    let yp = dir.join("tiny-labels.idx");
    std::fs::write(&xp, shoal_core::idx::encode_idx_u8(&[n, 4, 4], &x)).unwrap();
    std::fs::write(&yp, shoal_core::idx::encode_idx_u8(&[n], &y)).unwrap();
    [xp, yp]
}

/// A spec over the bundled MNIST.
pub fn mnist_spec(dataset: &str, epochs: u32, train_end: u64, seed: u64, hidden: &str) -> String {
    format!(
        r#"name = "test-mlp"
[model]
kind = "mlp"
hidden = {hidden}
[dataset]
name = "{dataset}"
train = [0, {train_end}]
test = [8000, 10000]
[training]
epochs = {epochs}
batch_size = 128
seed = {seed}
[training.optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
[cluster]
workers = 2
"#
    )
}

/// `GET path` over HTTPS from `addr` (HOST:PORT), checking the server against the cluster CA in
/// `ca` (PEM) and sending `token` as a bearer token: the status and the body (de-chunked).
#[allow(dead_code)]
pub fn https_get(addr: &str, path: &str, ca: &Path, token: Option<&str>) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("shoal").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(|e| e.to_string())?;
    let sock = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without close_notify: what came is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("{addr}{path}: {e}")),
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no header end: {text}"))?;
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {head}"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk_body(body) } else { body.to_string() };
    Ok((status, body))
}

fn unchunk_body(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The admin token of a cluster folder `shoal up` made.
#[allow(dead_code)]
pub fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("ca/admin.token")).unwrap().trim().to_string()
}
