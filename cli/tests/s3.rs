//! The store on S3-compatible object storage (issue 21), against a real S3 server: moto's
//! standalone server (PyPI `moto[server]`; `.ci/run` installs it into target/tools/moto).
//! A cluster started with `--store s3://...` imports through the API, trains with
//! checkpoints, resumes bitwise after its workers are killed, exports, scores, and leaves in
//! the bucket only objects the state refers to.

mod common;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const BUCKET: &str = "shoal-test";
const PREFIX: &str = "cluster-a";
const CREDENTIALS: [(&str, &str); 3] = [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")];
const SLOW: (&str, &str) = ("SHOAL_FAILPOINTS", "step-delay-ms=30");

/// `moto_server` on PATH, or in the folder `.ci/run` installs it to.
fn moto_server() -> PathBuf {
    let installed = repo().join("target/tools/moto/bin/moto_server");
    if installed.exists() {
        return installed;
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("moto_server")).find(|f| f.exists()))
        .unwrap_or_else(|| panic!("moto_server is not installed: `python3 -m venv target/tools/moto && target/tools/moto/bin/pip install 'moto[server]'` (.ci/run does this)"))
}

/// An S3 server on a loopback port, stopped on drop.
struct S3 {
    _server: Proc,
    port: u16,
}

impl S3 {
    fn start(log: &Path) -> S3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = Proc::spawn(std::process::Command::new(moto_server()).args(["-H", "127.0.0.1", "-p", &port.to_string()]), log);
        wait_for("the S3 server to listen", Duration::from_secs(60), || TcpStream::connect(("127.0.0.1", port)).ok());
        S3 { _server: server, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request (moto does not check signatures); returns (status, body).
    fn request(&self, method: &str, path: &str) -> (u32, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    /// Every key under `prefix/` (relative to it).
    fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token = String::new();
        loop {
            let (status, body) = self.request("GET", &format!("/{BUCKET}?list-type=2&prefix={prefix}/{token}"));
            assert_eq!(status, 200, "{body}");
            keys.extend(body.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(|k| k.strip_prefix(&format!("{prefix}/")).unwrap_or(k).to_string()));
            match body.split("<NextContinuationToken>").nth(1).and_then(|t| t.split("</NextContinuationToken>").next()) {
                Some(t) => token = format!("&continuation-token={t}"),
                None => return keys,
            }
        }
    }
}

fn spec() -> String {
    mnist_spec("mnist", 3, 4096, 5, "[64]") + "[checkpoint]\nevery_steps = 10\nkeep = 2\n"
}

fn spawn_workers(c: &UpCluster, s3: &S3, n: usize) -> Vec<Proc> {
    let registered = |c: &UpCluster| json(&mut c.cmd(&["status", "--json"]))["workers"].as_array().unwrap().len();
    let before = registered(c);
    let eps = c.endpoints();
    let procs = (0..n)
        .map(|i| {
            let cache = c.tmp.path().join(format!("cache-{before}-{i}"));
            let mut cmd = shoal();
            cmd.args(["serve", "worker", "--threads", "1", "--endpoints", &eps, "--store", &format!("s3://{BUCKET}/{PREFIX}"), "--store-endpoint", &s3.endpoint(), "--cache-gb", "0.05", "--cache-dir"])
                .arg(&cache)
                .arg("--credentials")
                .arg(c.worker_credentials())
                .envs(CREDENTIALS)
                .env(SLOW.0, SLOW.1);
            Proc::spawn(&mut cmd, &c.tmp.path().join(format!("worker-{before}-{i}.log")))
        })
        .collect();
    wait_for("the workers to register", Duration::from_secs(30), || (registered(c) >= before + n).then_some(()));
    procs
}

fn hash(job: &serde_json::Value) -> &str {
    job["results"][0]["param_blake3"].as_str().unwrap_or_else(|| panic!("no results: {job}"))
}

#[test]
fn a_cluster_on_s3_imports_trains_resumes_exports_and_scores_and_keeps_only_what_the_state_refers_to() {
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3::start(&tmp.path().join("moto.log"));
    assert_eq!(s3.request("PUT", &format!("/{BUCKET}")).0, 200, "creating the bucket");

    let mut env: Vec<(&str, &str)> = CREDENTIALS.to_vec();
    env.push(SLOW);
    let endpoint = s3.endpoint();
    let store = format!("s3://{BUCKET}/{PREFIX}");
    let c = UpCluster::start_env(&["--workers", "0", "--lease-ms", "1000", "--store", &store, "--store-endpoint", &endpoint], &env);
    let status = json(&mut c.cmd(&["status", "--json"]));
    assert_eq!(status["coordinators"][0]["store"], store.as_str(), "{status}");

    // The import goes through the API into the bucket: nothing in a local store folder.
    let d = c.import_mnist("mnist");
    assert_eq!(d["records"], 10000, "{d}");
    assert!(!c.store().exists(), "the client wrote a local store");
    let shards: Vec<String> = d["shards"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap().to_string()).collect();
    let keys = s3.keys(PREFIX);
    assert!(shards.iter().all(|s| keys.contains(s)), "shards {shards:?} not all in the bucket: {keys:?}");

    // Training reads the shards through each worker's cache; a reference run, then one whose
    // workers are all killed after a checkpoint: it resumes from the checkpoint in the bucket.
    let mut workers = spawn_workers(&c, &s3, 2);
    let spec = c.write_spec("ckpt.toml", &spec());
    let reference = c.submit_follow(&spec);
    assert_eq!(reference["state"], "succeeded", "{reference}");
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(&spec))["id"].to_string();
    c.wait_job(&id, "a committed checkpoint", Duration::from_secs(90), |j| j["checkpoint"].as_u64().is_some_and(|s| s >= 20));
    for w in &mut workers {
        w.kill();
    }
    let _fresh = spawn_workers(&c, &s3, 2);
    let done = c.wait_end(&id);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(done["resumed_from"].as_u64().is_some_and(|s| s >= 20), "not resumed from a checkpoint: {done}");
    assert_eq!(hash(&done), hash(&reference), "the resumed run differs from the uninterrupted one");
    assert!(done["test_accuracy"].as_f64().unwrap() > 0.85, "{done}");

    // Export streams the checkpoint back through the API.
    let out = c.tmp.path().join("model.safetensors");
    ok(c.cmd(&["checkpoint", "export", &id]).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("0.weight").unwrap().shape(), &[64, 784]);

    // Batch scoring writes its outputs to the bucket, registered as a dataset.
    let score = format!("name = \"score\"\nkind = \"batch\"\n[input]\ndataset = \"mnist\"\nrecords = [8000, 10000]\n[operator]\nkind = \"score\"\nmodel = \"job:{id}\"\n[output]\ndataset = \"scores\"\n[cluster]\nworkers = 2\n");
    let scored = c.submit_follow(&c.write_spec("score.toml", &score));
    assert_eq!(scored["state"], "succeeded", "{scored}");
    assert!(scored["accuracy"].as_f64().unwrap() > 0.85, "{scored}");

    // An append the state refuses (4x4 records onto 28x28 ones) leaves nothing behind: its
    // shards reached the bucket before the refusal, and the coordinator drops them.
    let [x, y] = write_tiny_idx(c.tmp.path());
    let e = fails(c.cmd(&["data", "append", "mnist"]).arg(&x).arg(&y));
    assert!(e.contains("shape") || e.contains("feature"), "{e}");

    // Every object is one the state refers to: a committed slice's folder (its shards and
    // manifest) or a job's folder; no temporary or orphaned object is left.
    let mut folders = BTreeSet::new();
    for name in ["mnist", "scores"] {
        let d = json(&mut c.cmd(&["data", "show", name, "--json"]));
        for s in d["shards"].as_array().unwrap() {
            let p = s["path"].as_str().unwrap();
            folders.insert(p.rsplit_once('/').unwrap().0.to_string());
        }
    }
    let jobs: BTreeSet<String> = json(&mut c.cmd(&["job", "list", "--json"])).as_array().unwrap().iter().map(|j| format!("jobs/{}", j["id"])).collect();
    // The audit trail's segments: each one the state records (verify reads them all), counted
    // between two listings that agree (the leader may seal one meanwhile).
    let audit_objects = |keys: &[String]| keys.iter().filter(|k| k.starts_with("audit/")).count();
    let keys = wait_for("the audit segments to hold still", Duration::from_secs(20), || {
        let before = s3.keys(PREFIX);
        let audit = json(&mut c.cmd(&["audit", "verify", "--json"]));
        let after = s3.keys(PREFIX);
        assert_eq!(audit["ok"], true, "{audit}");
        (audit_objects(&before) == audit_objects(&after) && audit["segments"].as_u64() == Some(audit_objects(&after) as u64)).then_some(after)
    });
    let stray: Vec<&String> = keys
        .iter()
        .filter(|k| !k.starts_with("audit/"))
        .filter(|k| {
            let folder = k.rsplit_once('/').map(|(f, _)| f).unwrap_or("");
            !(folders.contains(folder) || jobs.iter().any(|j| k.starts_with(&format!("{j}/"))))
        })
        .collect();
    assert!(stray.is_empty(), "objects the state does not refer to: {stray:?}");
    // Checkpoints beyond `keep` went: each job holds at most 2 step folders.
    for j in &jobs {
        let steps: BTreeSet<&str> = keys.iter().filter_map(|k| k.strip_prefix(&format!("{j}/checkpoints/"))?.split('/').next()).collect();
        assert!(steps.len() <= 2, "{j}: {steps:?}");
    }
    // The workers' caches stayed under their limit (50 MB; the dataset is about 8 MB).
    let cached: u64 = std::fs::read_dir(c.tmp.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("cache-")).flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten()).map(|f| f.metadata().unwrap().len()).sum();
    assert!(cached > 0, "no shard went through a cache");
}
