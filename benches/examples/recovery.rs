//! Recovery benchmark: the time from SIGKILL of a busy worker to the job's next completed step,
//! default settings (5 s lease), on a local cluster of 3 workers running a 2-worker job (so a
//! free worker can take the dead one's place), checkpoints every 20 steps.
//!
//!     cargo run --release -p shoal-benches --example recovery -- [--trials 5] [--no-build]
//!
//! Each trial waits until the job has made progress in its current generation, kills one of
//! its workers, then polls `shoal job status` until a later generation runs and has completed a
//! step past the one it started from (`continued_from`: the survivor's state in memory, which
//! the spare gets from it; or `resumed_from`, a checkpoint); then `shoal worker add` restores
//! the spare. Rank 0 reports progress at most every 250 ms, so a time can read up to 0.25 s
//! long.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn run(shoal: &Path, args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new(shoal).args(args).arg("--dir").arg(dir).output().with_context(|| format!("running shoal {args:?}"))?;
    if !out.status.success() {
        bail!("shoal {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn job(shoal: &Path, dir: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&run(shoal, &["job", "status", "1", "--json"], dir)?)?)
}

/// The step the job's current generation started from, once its rank 0 has said.
fn started_from(j: &serde_json::Value) -> Option<u64> {
    j["continued_from"].as_u64().or(j["resumed_from"].as_u64())
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !f()? {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut trials = 5;
    let mut build = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => trials = it.next().context("--trials needs a number")?.parse()?,
            "--no-build" => build = false,
            other => return Err(shoal_benches::other_argument(other, "usage: recovery [--trials N] [--no-build]")),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    if build {
        shoal_benches::build_shoal(&root)?;
    }
    let shoal = shoal_benches::shoal_exe(&root)?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cluster");
    run(&shoal, &["up", "--workers", "3"], &dir)?;
    let result = (|| -> Result<Vec<f64>> {
        let data = root.join("data/mnist");
        let images = data.join("mnist10k-images-idx3-ubyte.gz");
        let labels = data.join("mnist10k-labels-idx1-ubyte.gz");
        run(&shoal, &["data", "import", "mnist", images.to_str().unwrap(), labels.to_str().unwrap()], &dir)?;
        let spec = std::fs::read_to_string(root.join("examples/mnist-mlp.toml"))?.replace("epochs = 5", "epochs = 1000") + "\n[checkpoint]\nevery_steps = 20\n";
        let spec_path = tmp.path().join("long.toml");
        std::fs::write(&spec_path, spec)?;
        run(&shoal, &["job", "submit", spec_path.to_str().unwrap()], &dir)?;
        let mut times = Vec::new();
        for trial in 0..trials {
            // Progress in the current generation, past its resume point.
            let mut gen = 0;
            wait("the job to be training", Duration::from_secs(60), || {
                let j = job(&shoal, &dir)?;
                gen = j["generation"].as_u64().unwrap_or(0);
                let from = started_from(&j).unwrap_or(0);
                Ok(j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > from + 30)
            })?;
            let j = job(&shoal, &dir)?;
            let workers: serde_json::Value = serde_json::from_str(&run(&shoal, &["worker", "list", "--json"], &dir)?)?;
            let victim = workers.as_array().unwrap().iter().find(|w| w["id"] == j["workers"][1]).context("the job's rank 1 in the worker list")?;
            let pid = victim["pid"].as_i64().context("pid")? as i32;
            let killed = Instant::now();
            // SAFETY: a pid of a worker of this benchmark's own cluster.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait("the job's next step after the kill", Duration::from_secs(60), || {
                let j = job(&shoal, &dir)?;
                let from = started_from(&j);
                Ok(j["state"] == "running" && j["generation"].as_u64().unwrap_or(0) > gen && from.is_some_and(|f| j["step"].as_u64().unwrap_or(0) > f))
            })?;
            let t = killed.elapsed().as_secs_f64();
            eprintln!("recovery: trial {}/{trials}: {t:.3} s ({})", trial + 1, job(&shoal, &dir)?["restart_cause"]);
            times.push(t);
            run(&shoal, &["worker", "add"], &dir)?;
        }
        Ok(times)
    })();
    let _ = run(&shoal, &["down"], &dir);
    let mut times = result?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("recovery (SIGKILL of a busy worker to the job's next completed step), {trials} trials: median {median:.3} s, max {:.3} s, all {times:.3?}", times[times.len() - 1]);
    Ok(())
}
