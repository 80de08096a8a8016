//! shoal across test hosts (network namespaces on one bridge, each with its own /dev/shm; see
//! `shoal_cluster::testhosts`): coordinators and workers on different hosts, addresses of
//! those hosts only. Root only; elsewhere each test says why it did not run.

mod common;
use common::*;
use shoal_cluster::testhosts::{Links, TestHosts};
use std::path::PathBuf;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_shoal");
const PORT: u16 = 7000;

/// Coordinators on hosts `0..coordinators`, workers where the test puts them, the store a
/// folder every host sees (it stands for shared storage).
struct HostCluster {
    hosts: TestHosts,
    coordinators: Vec<Proc>,
    workers: Vec<(usize, Proc)>,
    dir: tempfile::TempDir,
}

impl HostCluster {
    fn start(hosts: usize, coordinators: usize) -> Option<HostCluster> {
        Self::start_with(hosts, coordinators, &[])
    }

    /// As `start`, with `args` added to every coordinator's command.
    fn start_with(hosts: usize, coordinators: usize, args: &[&str]) -> Option<HostCluster> {
        Self::start_linked(hosts, coordinators, args, Links::Bridge)
    }

    fn start_linked(hosts: usize, coordinators: usize, args: &[&str], links: Links) -> Option<HostCluster> {
        if let Some(why) = TestHosts::unavailable() {
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let hosts = TestHosts::with_links(hosts, &dir.path().join("hosts"), links).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut c = HostCluster { hosts, coordinators: Vec::new(), workers: Vec::new(), dir };
        c.layout().issue_credentials(&(1..=coordinators as u64).collect::<Vec<_>>()).unwrap();
        let peers: Vec<String> = (0..coordinators).map(|i| format!("{}={}:{PORT}", i + 1, c.hosts.address(i))).collect();
        for i in 0..coordinators {
            let addr = c.hosts.address(i);
            let mut cmd = c.command(i, BIN);
            cmd.env("RUST_LOG", "info").args(["serve", "coordinator", "--id", &(i + 1).to_string(), "--listen", &format!("{addr}:{PORT}"), "--peers", &peers.join(",")]);
            cmd.args(["--http-listen", &format!("{addr}:0"), "--data"]).arg(c.hosts.host_dir(i).join("raft")).arg("--store").arg(c.store()).arg("--credentials").arg(c.layout().node_credentials(i as u64 + 1)).args(args);
            c.coordinators.push(Proc::spawn(&mut cmd, &c.log(&format!("coordinator-{}", i + 1))));
        }
        wait_for("a leader", Duration::from_secs(30), || {
            let out = run(&mut c.cli(0, &["status", "--json"]));
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            s["coordinators"].as_array()?.iter().any(|x| x["role"] == "leader").then_some(())
        });
        Some(c)
    }

    /// A process in host `h`; shoal's CLI finds the cluster's credentials through SHOAL_DIR.
    fn command(&self, h: usize, program: &str) -> std::process::Command {
        let mut cmd = self.hosts.command(h, program);
        cmd.env("SHOAL_DIR", self.dir.path());
        cmd
    }

    /// The test's folder holds the cluster's CA and credentials as `shoal up`'s does.
    fn layout(&self) -> shoal_cluster::Layout {
        shoal_cluster::Layout::new(self.dir.path())
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    fn endpoints(&self) -> String {
        (0..self.coordinators.len()).map(|i| format!("{}:{PORT}", self.hosts.address(i))).collect::<Vec<_>>().join(",")
    }

    /// `shoal ARGS --endpoints ...` run in host `h`.
    fn cli(&self, h: usize, args: &[&str]) -> std::process::Command {
        let mut cmd = self.command(h, BIN);
        cmd.args(args).args(["--endpoints", &self.endpoints()]);
        cmd
    }

    /// Starts a worker (1 compute thread) in host `h`, listening on the host's address.
    fn add_worker(&mut self, h: usize) {
        self.add_worker_env(h, &[]);
    }

    fn add_worker_env(&mut self, h: usize, envs: &[(&str, &str)]) {
        let addr = self.hosts.address(h);
        let mut cmd = self.command(h, BIN);
        cmd.envs(envs.iter().copied());
        cmd.env("RUST_LOG", "info").args(["serve", "worker", "--threads", "1", "--endpoints", &self.endpoints(), "--listen", &format!("{addr}:0")]);
        cmd.args(["--http-listen", &format!("{addr}:0"), "--store"]).arg(self.store()).arg("--credentials").arg(self.layout().worker_credentials());
        let n = self.workers.len();
        self.workers.push((h, Proc::spawn(&mut cmd, &self.log(&format!("worker-{n}-host{h}")))));
    }

    fn wait_workers(&self, n: usize) {
        wait_for("the workers to register", Duration::from_secs(60), || {
            let s = json(&mut self.cli(0, &["status", "--json"]));
            (s["workers"].as_array()?.len() >= n).then_some(())
        });
    }

    fn job(&self, id: &str) -> serde_json::Value {
        json(&mut self.cli(0, &["job", "status", id, "--json"]))
    }

    fn wait_end(&self, id: &str, timeout: Duration) -> serde_json::Value {
        wait_for("the job to end", timeout, || Some(self.job(id)).filter(|j| ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or(""))))
    }
}

impl Drop for HostCluster {
    fn drop(&mut self) {
        for (_, w) in &mut self.workers {
            w.kill();
        }
        for c in &mut self.coordinators {
            c.kill();
        }
        if std::thread::panicking() {
            if let Ok(fresh) = tempfile::tempdir() {
                let kept = std::mem::replace(&mut self.dir, fresh).keep();
                eprintln!("test folder kept at {}", kept.display());
            }
        }
    }
}

/// The demo's MLP with 4 lanes, on 4 workers.
fn demo_spec() -> String {
    let s = std::fs::read_to_string(repo().join("examples/mnist-mlp.toml")).unwrap();
    s.replace("batch_size = 128", "batch_size = 128\nlanes = 4").replace("workers = 2", "workers = 4")
}

fn final_params(job: &serde_json::Value) -> String {
    assert_eq!(job["state"], "succeeded", "{job}");
    let r = job["results"].as_array().unwrap();
    assert_eq!(r.len(), 4, "{job}");
    assert!(r.iter().all(|x| x["param_blake3"] == r[0]["param_blake3"]), "the ranks disagree: {job}");
    r[0]["param_blake3"].as_str().unwrap().to_string()
}

#[test]
fn three_coordinators_and_four_workers_on_two_hosts_train_hierarchically_with_one_hosts_bits() {
    // 3 hosts: a coordinator on each; 2 workers on host 1 and 2 on host 2.
    let Some(mut c) = HostCluster::start(3, 3) else { return };
    for h in [1, 1, 2, 2] {
        c.add_worker(h);
    }
    c.wait_workers(4);
    let [x, y] = mnist_files();
    json(c.cli(0, &["data", "import", "mnist", "--json"]).arg(&x).arg(&y));
    let spec = c.dir.path().join("demo.toml");
    std::fs::write(&spec, demo_spec()).unwrap();
    let id = json(c.cli(0, &["job", "submit", "--json"]).arg(&spec))["id"].to_string();
    let job = c.wait_end(&id, Duration::from_secs(300));
    let across = final_params(&job);
    assert_eq!(job["transport"], "hierarchical", "{job}");
    assert_eq!(job["transports"], serde_json::json!({"intra": "shm", "inter": "tcp"}), "{job}");
    let acc = job["test_accuracy"].as_f64().unwrap();

    // The same job on one host (4 workers on loopback: shared memory): the same bits.
    let one = UpCluster::start_with(&["--workers", "0"]);
    let _workers = one.spawn_workers(4, &[]);
    one.import_mnist("mnist");
    let id = json(one.cmd(&["job", "submit", "--json"]).arg(one.write_spec("demo.toml", &demo_spec())))["id"].to_string();
    let local = one.wait_end(&id);
    assert_eq!(local["transport"], "shm", "{local}");
    assert!(local["transports"].is_null(), "{local}");
    assert_eq!(final_params(&local), across, "lanes make the placement invisible in the bits");
    let local_acc = local["test_accuracy"].as_f64().unwrap();
    assert!((acc - local_acc).abs() <= 0.005 && acc > 0.9, "accuracy across hosts {acc}, on one host {local_acc}");
}

/// The leader's id, as the replicas reachable through `endpoints` from host `h` report it.
fn leader_seen(c: &HostCluster, h: usize, endpoints: &str) -> Option<u64> {
    let out = run(c.command(h, BIN).args(["status", "--json", "--endpoints", endpoints]));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    s["coordinators"].as_array()?.iter().find(|x| x["role"] == "leader")?["id"].as_u64()
}

#[test]
fn a_partitioned_leader_serves_nothing_the_majority_goes_on_and_healing_converges() {
    let Some(c) = HostCluster::start(3, 3) else { return };
    let all = c.endpoints();
    let old = wait_for("a leader", Duration::from_secs(30), || leader_seen(&c, 0, &all));
    let cut = (old - 1) as usize;
    let others: Vec<usize> = (0..3).filter(|&i| i != cut).collect();
    let majority = others.iter().map(|&i| format!("{}:{PORT}", c.hosts.address(i))).collect::<Vec<_>>().join(",");
    let tiny = write_tiny_idx(c.dir.path());
    json(c.command(others[0], BIN).args(["data", "import", "before", "--json", "--endpoints", &all]).args(&tiny));

    c.hosts.cut(cut).unwrap();
    let new = wait_for("a new leader in the majority", Duration::from_secs(30), || leader_seen(&c, others[0], &majority).filter(|&l| l != old));
    assert_ne!(new, old);
    // Writes go on in the majority.
    json(c.command(others[1], BIN).args(["data", "import", "during", "--json", "--endpoints", &majority]).args(&tiny));
    // The old leader's host: no read, no write (it cannot confirm it still leads).
    let own = format!("{}:{PORT}", c.hosts.address(cut));
    let t = std::time::Instant::now();
    let read = run(c.command(cut, "timeout").args(["30", BIN, "data", "list", "--json", "--endpoints", &own]));
    eprintln!("the cut-off read: {} after {:?}: {}", read.status, t.elapsed(), String::from_utf8_lossy(&read.stderr).lines().last().unwrap_or(""));
    assert!(!read.status.success(), "the cut-off replica served a read: {}", String::from_utf8_lossy(&read.stdout));
    let write = run(c.command(cut, "timeout").args(["30", BIN, "data", "import", "cut-off", "--json", "--endpoints", &own]).args(&tiny));
    assert!(!write.status.success(), "the cut-off replica accepted a write: {}", String::from_utf8_lossy(&write.stdout));

    c.hosts.heal(cut).unwrap();
    // Every replica converges on one state: the same applied index and state hash, holding
    // both majority writes and not the cut-off one.
    wait_for("the replicas to agree", Duration::from_secs(60), || {
        let out = run(c.command(0, BIN).args(["status", "--json", "--endpoints", &all]));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let cs = s["coordinators"].as_array()?;
        let hashes: Vec<(&serde_json::Value, &serde_json::Value)> = cs.iter().map(|x| (&x["applied_index"], &x["state_hash"])).collect();
        (cs.len() == 3 && hashes.iter().all(|h| h == &hashes[0] && h.1.is_string())).then_some(())
    });
    let names: Vec<String> = json(c.command(cut, BIN).args(["data", "list", "--json", "--endpoints", &own])).as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&"before".to_string()) && names.contains(&"during".to_string()) && !names.contains(&"cut-off".to_string()), "{names:?}");
}

#[test]
fn a_cut_off_worker_host_is_lost_by_its_lease_and_its_stale_workers_change_nothing() {
    const LEASE_MS: u64 = 2000;
    let Some(mut c) = HostCluster::start_with(3, 1, &["--lease-ms", &LEASE_MS.to_string()]) else { return };
    // Slow steps, so the cut lands mid-run.
    let slow = [("SHOAL_FAILPOINTS", "step-delay-ms=40")];
    for h in [1, 1, 2, 2] {
        c.add_worker_env(h, &slow);
    }
    c.wait_workers(4);
    let [x, y] = mnist_files();
    json(c.cli(0, &["data", "import", "mnist", "--json"]).arg(&x).arg(&y));
    // 3 epochs of 32 steps, 8 lanes; a checkpoint every 8 steps, so stale ranks would have parts to write.
    let spec_text = mnist_spec("mnist", 3, 4096, 11, "[64]")
        .replace("batch_size = 128", "batch_size = 128\nlanes = 8")
        .replace("workers = 2", "workers = 4\nmin_workers = 2")
        + "[checkpoint]\nevery_steps = 8\n";
    let spec = c.dir.path().join("cut.toml");
    std::fs::write(&spec, &spec_text).unwrap();
    let id = json(c.cli(0, &["job", "submit", "--json"]).arg(&spec))["id"].to_string();
    c.wait_workers(4);
    wait_for("the job to be a few steps in", Duration::from_secs(120), || (c.job(&id)["step"].as_u64()? >= 12).then_some(()));
    let first = c.job(&id);
    assert_eq!(first["transport"], "hierarchical", "{first}");

    c.hosts.cut(2).unwrap();
    let cut_at = std::time::Instant::now();
    let second = wait_for("a generation without the cut-off host", Duration::from_secs(60), || {
        let j = c.job(&id);
        let m = j["membership"].as_array()?;
        (m.len() >= 2).then_some(j)
    });
    let took = cut_at.elapsed();
    let m = second["membership"].as_array().unwrap();
    assert_eq!(m[1]["workers"].as_array().map(|w| w.len()), Some(2), "{second}");
    eprintln!("the job went on without the cut-off host {took:?} after the cut (lease {LEASE_MS} ms)");
    // Lease plus a second, and room for this test's polling on a shared machine.
    assert!(took < Duration::from_millis(LEASE_MS + 1000 + 2000), "took {took:?}");

    // Heal while the job still runs: the stale workers must stop their task without a trace
    // and register anew.
    std::thread::sleep(Duration::from_secs(1));
    c.hosts.heal(2).unwrap();
    let done = c.wait_end(&id, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded", "{done}");
    let r = done["results"].as_array().unwrap();
    assert!(r.iter().all(|x| x["param_blake3"] == r[0]["param_blake3"]), "{done}");
    let across = r[0]["param_blake3"].as_str().unwrap().to_string();
    wait_for("the healed host's workers to register anew", Duration::from_secs(60), || {
        let s = json(&mut c.cli(0, &["worker", "list", "--json"]));
        let alive = s.as_array()?.iter().filter(|w| w["state"] != "lost").count();
        (alive >= 4).then_some(())
    });

    // Each stale worker stopped its task on its own (a lease without an answer) and
    // registered again under a new id.
    for n in [2, 3] {
        let log = std::fs::read_to_string(c.log(&format!("worker-{n}-host2"))).unwrap();
        assert!(log.contains("no coordinator answered for a whole lease; stopping the task"), "worker {n}: {log}");
        assert_eq!(log.matches("registered worker=").count(), 2, "worker {n}: {log}");
    }

    // A run that never had them: 2 workers on one host, the same bits (lanes).
    let one = UpCluster::start_with(&["--workers", "0"]);
    let _w = one.spawn_workers(2, &[]);
    one.import_mnist("mnist");
    let id = json(one.cmd(&["job", "submit", "--json"]).arg(one.write_spec("cut.toml", &spec_text.replace("workers = 4\nmin_workers = 2", "workers = 2"))))["id"].to_string();
    let local = one.wait_end(&id);
    assert_eq!(local["results"][0]["param_blake3"].as_str(), Some(across.as_str()), "{local}");
}

/// A training job (lanes) and a batch scoring job of its model (output dataset `scores`):
/// the final parameters' hash and the batch job's status.
fn train_and_score(submit: &dyn Fn(&str, &str) -> serde_json::Value, workers: u32) -> (String, serde_json::Value) {
    let train = mnist_spec("mnist", 2, 4096, 11, "[64]").replace("batch_size = 128", "batch_size = 128\nlanes = 8").replace("workers = 2", &format!("workers = {workers}"));
    let job = submit("train.toml", &train);
    assert_eq!(job["state"], "succeeded", "{job}");
    let params = job["results"][0]["param_blake3"].as_str().unwrap().to_string();
    let score = format!(
        "name = \"score\"\nkind = \"batch\"\n[input]\ndataset = \"mnist\"\nrecords = [6000, 10000]\n[operator]\nkind = \"score\"\nmodel = \"job:{}\"\n[output]\ndataset = \"scores\"\n[cluster]\nworkers = 2\nmax_attempts = 5\n",
        job["id"]
    );
    let batch = submit("score.toml", &score);
    assert_eq!(batch["state"], "succeeded", "{batch}");
    (params, batch)
}

#[test]
fn with_20_ms_of_delay_and_1_percent_loss_on_every_link_jobs_give_the_results_of_a_clean_run() {
    let Some(mut c) = HostCluster::start_linked(3, 3, &[], Links::Forwarded) else { return };
    for h in [1, 1, 2, 2] {
        c.add_worker(h);
    }
    c.wait_workers(4);
    let [x, y] = mnist_files();
    json(c.cli(0, &["data", "import", "mnist", "--json"]).arg(&x).arg(&y));
    c.hosts.set_delay(Duration::from_millis(20)).unwrap();
    for h in 0..3 {
        c.hosts.drop_share(h, 10).unwrap();
    }
    let t = std::time::Instant::now();
    let submit = |file: &str, text: &str| {
        let spec = c.dir.path().join(file);
        std::fs::write(&spec, text).unwrap();
        let id = json(c.cli(0, &["job", "submit", "--json"]).arg(&spec))["id"].to_string();
        c.wait_end(&id, Duration::from_secs(600))
    };
    let (params, batch) = train_and_score(&submit, 4);
    eprintln!("trained and scored with delay and loss in {:?}", t.elapsed());
    let scores = json(&mut c.cli(0, &["data", "show", "scores", "--json"]));

    let one = UpCluster::start_with(&["--workers", "0"]);
    let _w = one.spawn_workers(4, &[]);
    one.import_mnist("mnist");
    let submit = |file: &str, text: &str| {
        let id = json(one.cmd(&["job", "submit", "--json"]).arg(one.write_spec(file, text)))["id"].to_string();
        one.wait_end(&id)
    };
    let (clean_params, clean_batch) = train_and_score(&submit, 4);
    assert_eq!(params, clean_params, "lanes: the same bits through delay and loss");
    assert_eq!(batch["accuracy"], clean_batch["accuracy"]);
    let clean_scores = json(&mut one.cmd(&["data", "show", "scores", "--json"]));
    let hashes = |d: &serde_json::Value| d["shards"].as_array().unwrap().iter().map(|s| s["blake3"].clone()).collect::<Vec<_>>();
    assert_eq!(hashes(&scores), hashes(&clean_scores), "the scores' shards, byte for byte");
    assert!(!hashes(&scores).is_empty());
}
