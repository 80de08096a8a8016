//! `/metrics` on every process, read by the real thing: Debian's `promtool check metrics`
//! passes on each endpoint's output, and a Prometheus started here on loopback scrapes a
//! running cluster and answers `rate(shoal_train_samples_total[10s]) > 0` while a job trains.
//! A job's series leave a worker's endpoint when its task ends. `.ci/run` installs the
//! `prometheus` package; without it this test fails and says so.
//!
//! `shoal up` starts every process with credentials: `/metrics` is HTTPS and wants a token.
//! Prometheus reads a viewer token from a `credentials_file` and checks the servers against
//! the cluster CA; a request without a token, with a malformed one or with a revoked one is
//! refused.

mod common;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// `GET path` from `addr` (HOST:PORT) over plaintext HTTP (Prometheus's own API): the body of
/// a 200 answer.
fn plain_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no header end: {text}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}{path}: {head}"));
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(unchunk(body));
    }
    Ok(body.to_string())
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// A binary of Debian's `prometheus` package: on the PATH, or unpacked under target/tools
/// (as .ci/run does, and as this does when neither has it: `apt-get download prometheus`,
/// `dpkg-deb -x`; nothing is installed, no service starts), or a failure that says how.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()) {
        return p;
    }
    let tools = repo().join("target/tools");
    let unpacked = tools.join("usr/bin").join(name);
    if !unpacked.is_file() {
        let debs = tools.join("debs");
        std::fs::create_dir_all(&debs).unwrap();
        let download = || Command::new("apt-get").args(["download", "prometheus"]).current_dir(&debs).output().is_ok_and(|o| o.status.success());
        if !download() {
            let _ = Command::new("apt-get").args(["update", "-q"]).output();
            download();
        }
        let deb = std::fs::read_dir(&debs).ok().into_iter().flatten().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb"));
        if let Some(deb) = deb {
            let _ = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tools).output();
        }
    }
    assert!(unpacked.is_file(), "`{name}` is neither on the PATH nor in {}, and fetching Debian's prometheus package failed: install it (apt-get install prometheus) or run .ci/run", tools.display());
    unpacked
}

fn promtool_check(promtool: &Path, text: &str, what: &str) {
    let mut child = Command::new(promtool).args(["check", "metrics"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool check metrics on {what}: {}{}\n{text}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn prometheus_scrapes_every_process_and_sees_the_training_rate() {
    let (prometheus, promtool) = (tool("prometheus"), tool("promtool"));
    // Slow steps (30 ms) so the job trains for the whole test.
    let c = UpCluster::start_env(&["--workers", "2"], &[("SHOAL_FAILPOINTS", "step-delay-ms=30")]);
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string();
    let endpoints = [
        ("coordinator-1", read(c.dir().join("coordinators/1/http.addr"))),
        ("worker-1", read(c.dir().join("workers/1/http.addr"))),
        ("worker-2", read(c.dir().join("workers/2/http.addr"))),
    ];

    // A viewer token for scraping.
    let viewer = json(&mut c.cmd(&["token", "create", "--role", "viewer", "--name", "prometheus", "--json"]));
    let (viewer_id, viewer) = (viewer["id"].as_str().unwrap().to_string(), viewer["token"].as_str().unwrap().to_string());
    let ca = c.dir().join("ca/ca.crt");
    let get = |addr: &str, path: &str| -> Result<String, String> {
        match https_get(addr, path, &ca, Some(&viewer))? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("{addr}{path}: {status} {body}")),
        }
    };
    // Without a token, or with one that is not a token, nothing; plaintext gets no answer.
    for (name, addr) in &endpoints {
        assert_eq!(https_get(addr, "/metrics", &ca, None).unwrap().0, 401, "{name} without a token");
        assert_eq!(https_get(addr, "/metrics", &ca, Some("shoal_0123_nope")).unwrap().0, 401, "{name} with a malformed token");
        assert!(plain_get(addr, "/metrics").is_err(), "{name} answered plaintext HTTP");
    }

    c.import_mnist("mnist");
    let spec = c.write_spec("long.toml", &mnist_spec("mnist", 40, 8000, 1, "[64]"));
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(&spec))["id"].to_string();
    c.wait_job(&id, "the job to run", Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 0);

    // Every endpoint while the job trains: valid exposition, the series each should have.
    // Jobs and workers are counted about once a second.
    let wants = ["shoal_raft_is_leader{node=\"coordinator-1\"} 1", "shoal_raft_commit_index{", "shoal_jobs{node=\"coordinator-1\",state=\"running\"} 1", "shoal_workers{node=\"coordinator-1\",state=\"busy\"} 2"];
    let coordinator = wait_for("the coordinator's series", Duration::from_secs(15), || get(&endpoints[0].1, "/metrics").ok().filter(|t| wants.iter().all(|w| t.contains(w))));
    promtool_check(&promtool, &coordinator, "the coordinator");
    for (name, addr) in &endpoints[1..] {
        let text = wait_for(&format!("{name}'s step series"), Duration::from_secs(30), || get(addr, "/metrics").ok().filter(|t| t.contains("shoal_step_seconds_bucket{")));
        promtool_check(&promtool, &text, name);
        assert!(text.contains(&format!("shoal_train_samples_total{{job_id=\"{id}\",rank=")), "{name}:\n{text}");
        assert!(text.contains("state=\"training\"} 1"), "{name}:\n{text}");
    }

    // A real Prometheus on loopback, scraping all three every second.
    let prom_dir = c.tmp.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let targets = endpoints.iter().map(|(_, a)| format!("'{a}'")).collect::<Vec<_>>().join(", ");
    let token_file = prom_dir.join("viewer.token");
    std::fs::write(&token_file, &viewer).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: shoal\n    scheme: https\n    tls_config:\n      ca_file: {}\n      server_name: shoal\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: [{targets}]\n",
        ca.display(),
        token_file.display()
    );
    std::fs::write(prom_dir.join("prometheus.yml"), config).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(&prometheus);
    cmd.arg(format!("--config.file={}", prom_dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"));
    let _prom = Proc::spawn(&mut cmd, &prom_dir.join("log"));
    let query = format!("/api/v1/query?query={}", url_encode("rate(shoal_train_samples_total[10s]) > 0"));
    let answer = wait_for("Prometheus to see the training rate", Duration::from_secs(90), || {
        let body = plain_get(&web, &query).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let series = v["data"]["result"].as_array()?.clone();
        (series.len() == 2).then_some(series)
    });
    for s in &answer {
        assert_eq!(s["metric"]["job_id"], id.as_str(), "{answer:?}");
        let rate: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert!(rate > 0.0, "{answer:?}");
    }
    let leaders = plain_get(&web, &format!("/api/v1/query?query={}", url_encode("shoal_raft_is_leader == 1"))).unwrap();
    assert!(leaders.contains("coordinator-1"), "{leaders}");

    // The job ends: its series leave the workers' endpoints.
    ok(&mut c.cmd(&["job", "cancel", &id]));
    c.wait_end(&id);
    for (name, addr) in &endpoints[1..] {
        let text = wait_for(&format!("{name} to drop the job's series"), Duration::from_secs(30), || get(addr, "/metrics").ok().filter(|t| !t.contains(&format!("job_id=\"{id}\""))));
        promtool_check(&promtool, &text, name);
    }

    // The viewer token revoked: refused everywhere within the few seconds a good answer is
    // remembered.
    ok(&mut c.cmd(&["token", "revoke", &viewer_id]));
    for (name, addr) in &endpoints {
        wait_for(&format!("{name} to refuse the revoked token"), Duration::from_secs(15), || (https_get(addr, "/metrics", &ca, Some(&viewer)).ok()?.0 == 401).then_some(()));
    }
}
