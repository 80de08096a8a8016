//! Scoring throughput: a `kind = "batch"` score job over 100,000 records (the bundled MNIST,
//! repeated) on 2 workers, against PyTorch inference on the same exported model in one
//! process with 2 threads, batch 1024 (benches/peer/score_torch.py), in the same invocation.
//!
//!     cargo run --release -p shoal-benches --example score -- [--model mlp|cnn|both] [--records N] [--runs N] [--python PATH] [--no-build]
//!
//! shoal's time is the job's, seen from the client: submitted until it succeeded (tasks
//! placed, shards read and checked, the model loaded, forward passes, probabilities and
//! predictions written and fsynced, every commit through Raft, the output version
//! registered). The peer's is its scoring loop over data already in memory.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: score [--model mlp|cnn|both] [--records N] [--runs N] [--python PATH] [--no-build]";

fn shoal(exe: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe).args(args).arg("--dir").arg(dir).output().with_context(|| format!("running shoal {args:?}"))?;
    if !out.status.success() {
        bail!("shoal {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes an uncompressed IDX file of unsigned bytes.
fn idx(path: &Path, dims: &[u32], data: &[u8]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&[0, 0, 8, dims.len() as u8])?;
    for d in dims {
        f.write_all(&d.to_be_bytes())?;
    }
    f.write_all(data)?;
    Ok(())
}

fn main() -> Result<()> {
    let (mut models, mut records, mut runs, mut python, mut build) = (vec!["mlp", "cnn"], 100_000usize, 3usize, None, true);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => {
                models = match it.next().context("--model needs a value")?.as_str() {
                    "mlp" => vec!["mlp"],
                    "cnn" => vec!["cnn"],
                    "both" => vec!["mlp", "cnn"],
                    m => bail!("--model must be mlp, cnn or both, not {m:?}"),
                }
            }
            "--records" => records = it.next().context("--records needs a number")?.parse()?,
            "--runs" => runs = it.next().context("--runs needs a number")?.parse()?,
            "--python" => python = Some(it.next().context("--python needs a path")?),
            "--no-build" => build = false,
            other => return Err(shoal_benches::other_argument(other, USAGE)),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    if build {
        shoal_benches::build_shoal(&root)?;
    }
    let exe = shoal_benches::shoal_exe(&root)?;
    let python = python.map(std::path::PathBuf::from).unwrap_or_else(|| root.join("benches/.venv/bin/python"));
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cluster");

    // The data: MNIST's 10,000 digits repeated to `records`.
    let read = |f: &str| -> Result<Vec<u8>> {
        let a = shoal_core::idx::read_idx_file(&root.join("data/mnist").join(f))?;
        match a.data {
            shoal_core::idx::IdxData::U8(v) => Ok(v),
            _ => bail!("{f}: not u8"),
        }
    };
    let (images, labels) = (read("mnist10k-images-idx3-ubyte.gz")?, read("mnist10k-labels-idx1-ubyte.gz")?);
    let (xs, ys): (Vec<u8>, Vec<u8>) = ((0..records).flat_map(|r| images[(r % 10_000) * 784..(r % 10_000 + 1) * 784].to_vec()).collect(), (0..records).map(|r| labels[r % 10_000]).collect());
    let (xp, yp) = (tmp.path().join("images.idx"), tmp.path().join("labels.idx"));
    idx(&xp, &[records as u32, 28, 28], &xs)?;
    idx(&yp, &[records as u32], &ys)?;

    shoal(&exe, &dir, &["up", "--workers", "2"])?;
    let result = (|| -> Result<Vec<(String, f64, f64, f64)>> {
        shoal(&exe, &dir, &["data", "import", "mnist", &root.join("data/mnist/mnist10k-images-idx3-ubyte.gz").display().to_string(), &root.join("data/mnist/mnist10k-labels-idx1-ubyte.gz").display().to_string()])?;
        shoal(&exe, &dir, &["data", "import", "big", &xp.display().to_string(), &yp.display().to_string()])?;
        let mut rows = Vec::new();
        for kind in &models {
            // A model to score with: one epoch of the examples' model.
            let (file, hidden, channels) = match *kind {
                "mlp" => ("mnist-mlp.toml", vec!["512", "256"], vec![]),
                _ => ("mnist-cnn.toml", vec!["128"], vec!["16", "32"]),
            };
            let text = std::fs::read_to_string(root.join("examples").join(file))?;
            let text = text.lines().map(|l| if l.starts_with("epochs") { "epochs = 1" } else { l }).collect::<Vec<_>>().join("\n");
            let spec = tmp.path().join(format!("{kind}.toml"));
            std::fs::write(&spec, text)?;
            let job: serde_json::Value = serde_json::from_str(&shoal(&exe, &dir, &["job", "submit", "--follow", "--json", &spec.display().to_string()])?)?;
            let id = job["id"].to_string();
            let model = tmp.path().join(format!("{kind}.safetensors"));
            shoal(&exe, &dir, &["checkpoint", "export", &id, &model.display().to_string()])?;

            let mut shoal_rates = Vec::new();
            let mut torch_rates = Vec::new();
            for run in 0..runs {
                let score = tmp.path().join(format!("score-{kind}-{run}.toml"));
                std::fs::write(
                    &score,
                    format!("name = \"score\"\nkind = \"batch\"\n[input]\ndataset = \"big\"\n[operator]\nkind = \"score\"\nmodel = \"job:{id}\"\nbatch_size = 1024\n[output]\ndataset = \"scores-{kind}-{run}\"\n[cluster]\nworkers = 2\n"),
                )?;
                let t = Instant::now();
                let done: serde_json::Value = serde_json::from_str(&shoal(&exe, &dir, &["job", "submit", "--follow", "--json", &score.display().to_string()])?)?;
                let s = t.elapsed().as_secs_f64();
                if done["state"] != "succeeded" || done["records_out"].as_u64() != Some(records as u64) {
                    bail!("the score job did not score every record: {done}");
                }
                let busy: f64 = done["tasks"].as_array().map(|t| t.iter().filter_map(|t| t["elapsed_ms"].as_f64()).sum::<f64>()).unwrap_or(0.0) / 1000.0;
                eprintln!(
                    "score: {kind} run {run}: shoal {s:.3} s submitted to succeeded; the job's own {} s from first start to last commit; tasks busy {busy:.3} s in all ({} tasks, accuracy {})",
                    done["seconds"], done["tasks_total"], done["accuracy"]
                );
                shoal_rates.push(records as f64 / s);

                let mut cmd = Command::new(&python);
                cmd.arg(root.join("benches/peer/score_torch.py")).arg(&model).arg(&xp).arg(&yp).args(["--kind", kind, "--runs", "1", "--hidden"]).args(&hidden);
                if !channels.is_empty() {
                    cmd.arg("--channels").args(&channels);
                }
                let out = cmd.current_dir(root.join("benches/peer")).output().context("running the PyTorch peer")?;
                if !out.status.success() {
                    bail!("the PyTorch peer failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let rate = text.split_whitespace().find_map(|w| w.strip_prefix("records_per_s=")).context("no records_per_s from the peer")?.parse::<f64>()?;
                eprintln!("score: {kind} run {run}: {}", text.trim());
                torch_rates.push(rate);
            }
            let (a, b) = (shoal_benches::median(&shoal_rates), shoal_benches::median(&torch_rates));
            rows.push((kind.to_string(), a, b, a / b));
        }
        Ok(rows)
    })();
    let _ = shoal(&exe, &dir, &["down"]);
    println!("{:<6} {:>16} {:>16} {:>8}", "model", "shoal rec/s", "pytorch rec/s", "ratio");
    for (kind, a, b, r) in result? {
        println!("{kind:<6} {a:>16.0} {b:>16.0} {r:>8.2}");
    }
    Ok(())
}
