//! End-to-end benchmark: shoal against its PyTorch DDP peer (benches/peer/ddp_mnist.py) on the
//! same workloads, 2 workers with 1 compute thread each, in one invocation, runs alternating:
//!
//! - `mlp`: the demo's job (examples/mnist-mlp.toml: MLP 784-512-256-10, global batch 128,
//!   SGD momentum, 5 epochs);
//! - `cnn`: the CNN example's model and optimizer (examples/mnist-cnn.toml: two conv + pool
//!   blocks, AdamW, 2 epochs) at 64 per worker (global batch 128);
//! - `cnn3`: a layer list of three conv blocks of 32, 64 and 128 channels
//!   (examples/mnist-cnn3.toml, AdamW, 1 epoch, global batch 128).
//!
//! With `--one-process`, the same training in one PyTorch process with 2 threads is a third
//! side (the peer a user with one machine would pick).
//!
//!     cargo run --release -p shoal-benches --example e2e -- [--model mlp|cnn|cnn3|both|all] [--runs N] [--one-process] [--python PATH] [--json PATH] [--no-build]
//!
//! It builds `shoal` (`cargo build --release -p shoal` in the workspace), runs `shoal bench
//! train` and the peer N times each (default 5), and prints per-run numbers (shoal's with
//! `phase_ms`), then the medians of the training throughput (samples/s, evaluation excluded on
//! both sides), the test accuracies and the ratio shoal / PyTorch (> 1: shoal is faster). The
//! peer's Python defaults to benches/.venv/bin/python (made by benches/peer/setup.sh); without
//! it only shoal runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use shoal_benches::{measure, median, Run};

struct Args {
    models: Vec<String>,
    runs: usize,
    one_process: bool,
    python: Option<PathBuf>,
    json: Option<PathBuf>,
    build: bool,
}

const USAGE: &str = "usage: e2e [--model mlp|cnn|cnn3|both|all] [--runs N] [--one-process] [--python PATH] [--json PATH] [--no-build]
  --model M      the workload (default both: mlp and cnn; all: and cnn3)
  --runs N       runs of each side (default 5)
  --one-process  also run PyTorch in one process with 2 threads
  --python PATH  Python with torch for the peer (default benches/.venv/bin/python)
  --json PATH    also write the results as JSON
  --no-build     use target/release/shoal as it is";

fn parse_args() -> Result<Args> {
    let mut a = Args { models: vec!["mlp".into(), "cnn".into()], runs: 5, one_process: false, python: None, json: None, build: true };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--model" => {
                a.models = match value("--model")?.as_str() {
                    "both" => vec!["mlp".into(), "cnn".into()],
                    "all" => vec!["mlp".into(), "cnn".into(), "cnn3".into()],
                    m @ ("mlp" | "cnn" | "cnn3") => vec![m.to_string()],
                    m => bail!("--model must be mlp, cnn, cnn3, both or all, not {m:?}"),
                }
            }
            "--runs" => a.runs = value("--runs")?.parse().context("--runs takes a positive number")?,
            "--python" => a.python = Some(value("--python")?.into()),
            "--json" => a.json = Some(value("--json")?.into()),
            "--no-build" => a.build = false,
            "--one-process" => a.one_process = true,
            other => return Err(shoal_benches::other_argument(other, USAGE)),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(a)
}

/// (busy, total) jiffies of all cores, from /proc/stat (Linux only).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Share of all cores that were busy over the next second: the load that other work puts on
/// the machine just before measuring (the load average would still count our own build).
fn cpu_busy_now() -> Option<f64> {
    let (b0, t0) = cpu_jiffies()?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (b1, t1) = cpu_jiffies()?;
    (t1 > t0).then(|| (b1 - b0) as f64 / (t1 - t0) as f64)
}

fn torch_version(python: &Path) -> Option<String> {
    let out = Command::new(python).args(["-c", "import torch; print(torch.__version__)"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn summary(name: &str, runs: &[Run]) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "runs": runs.iter().map(|r| serde_json::json!({
            "samples_per_s": r.samples_per_s, "test_accuracy": r.test_accuracy, "wall_s": r.wall_s, "phase_ms": r.phases,
        })).collect::<Vec<_>>(),
        "median_samples_per_s": median(&runs.iter().map(|r| r.samples_per_s).collect::<Vec<_>>()),
        "median_test_accuracy": median(&runs.iter().map(|r| r.test_accuracy).collect::<Vec<_>>()),
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().context("finding the workspace root")?;

    if args.build {
        eprintln!("e2e: cargo build --release -p shoal");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo).args(["build", "--release", "-p", "shoal"]).current_dir(&root).status().context("running cargo")?;
        if !st.success() {
            bail!("cargo build --release -p shoal failed ({st})");
        }
    }
    let shoal = shoal_benches::shoal_exe(&root)?;

    let python = args.python.clone().unwrap_or_else(|| root.join("benches/.venv/bin/python"));
    let script = root.join("benches/peer/ddp_mnist.py");
    let torch = if python.is_file() || args.python.is_some() { torch_version(&python) } else { None };
    if torch.is_none() {
        eprintln!(
            "e2e: no usable PyTorch at {}: run benches/peer/setup.sh (or pass --python PATH to a Python with torch); \
             measuring shoal only",
            python.display()
        );
    }

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!("e2e: {} runs each; shoal {}; {cores} cores", args.runs, shoal.display());
    if let Some(t) = &torch {
        eprintln!("e2e: peer {} {} (torch {t})", python.display(), script.display());
    }
    if let Some(busy) = cpu_busy_now() {
        if busy > 0.25 {
            eprintln!("e2e: warning: the CPUs were {:.0}% busy just before starting; other work may skew the numbers", busy * 100.0);
        }
    }

    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let mut docs = Vec::new();
    for model in &args.models {
        let w = workload(model, &root, tmp.path())?;
        let (shoal_runs, torch_runs, single_runs, torch_error) = compare(&args, &w, &shoal, &python, &script, torch.is_some(), &root)?;
        let sps = |rs: &[Run]| median(&rs.iter().map(|r| r.samples_per_s).collect::<Vec<_>>());
        let acc = |rs: &[Run]| median(&rs.iter().map(|r| r.test_accuracy).collect::<Vec<_>>());
        let wall = |rs: &[Run]| median(&rs.iter().map(|r| r.wall_s).collect::<Vec<_>>());
        println!();
        println!("{}; medians of {} runs", w.title, args.runs);
        println!("{:<14} {:>14} {:>15} {:>12}", "", "samples/s", "test accuracy", "wall s");
        println!("{:<14} {:>14.0} {:>15.4} {:>12.1}", "shoal", sps(&shoal_runs), acc(&shoal_runs), wall(&shoal_runs));
        let ratio = if torch_runs.is_empty() {
            println!("{:<14} {:>14} {:>15} {:>12}", "pytorch DDP", "-", "-", "-");
            println!("ratio shoal/pytorch: - (no PyTorch runs{})", if torch.is_none() { "; run benches/peer/setup.sh" } else { "" });
            None
        } else {
            println!("{:<14} {:>14.0} {:>15.4} {:>12.1}", "pytorch DDP", sps(&torch_runs), acc(&torch_runs), wall(&torch_runs));
            let r = sps(&shoal_runs) / sps(&torch_runs);
            println!("ratio shoal/pytorch (samples/s): {r:.2} ({})", if r >= 1.0 { "shoal faster" } else { "shoal slower" });
            Some(r)
        };
        let single_ratio = (!single_runs.is_empty()).then(|| {
            println!("{:<14} {:>14.0} {:>15.4} {:>12.1}", "pytorch 1x2t", sps(&single_runs), acc(&single_runs), wall(&single_runs));
            let r = sps(&shoal_runs) / sps(&single_runs);
            println!("ratio shoal/pytorch one process, 2 threads (samples/s): {r:.2}");
            r
        });
        println!("(samples/s: training time only, per-epoch evaluation excluded; wall s: whole process, start-up included)");
        docs.push(serde_json::json!({
            "model": model,
            "shoal": summary("shoal", &shoal_runs),
            "pytorch_ddp": summary("pytorch_ddp", &torch_runs),
            "ratio_shoal_over_pytorch": ratio,
            "pytorch_one_process": summary("pytorch_one_process", &single_runs),
            "ratio_shoal_over_pytorch_one_process": single_ratio,
            "pytorch_error": torch_error,
        }));
    }

    if let Some(path) = &args.json {
        let doc = serde_json::json!({ "runs": args.runs, "cores": cores, "torch": torch, "workloads": docs });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One workload, as both sides run it.
struct Workload {
    title: &'static str,
    /// The job spec `shoal bench train` runs.
    spec: PathBuf,
    peer_args: Vec<&'static str>,
}

fn workload(model: &str, root: &Path, tmp: &Path) -> Result<Workload> {
    let example = |name: &str| std::fs::read_to_string(root.join("examples").join(name)).with_context(|| format!("reading examples/{name}"));
    let (title, text, peer_args) = match model {
        "mlp" => (
            "MNIST MLP 784-512-256-10 (the demo), 2 workers x 1 thread, global batch 128, SGD momentum, 5 epochs",
            example("mnist-mlp.toml")?,
            vec!["--model", "mlp", "--epochs", "5", "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--seed", "42"],
        ),
        "cnn3" => (
            "MNIST 3-conv-block CNN 32-64-128 then 1152-128-10 (examples/mnist-cnn3.toml), 2 workers x 1 thread, global batch 128, AdamW, 1 epoch",
            example("mnist-cnn3.toml")?,
            vec!["--model", "cnn3", "--epochs", "1", "--batch-size", "128", "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.01", "--seed", "7"],
        ),
        _ => {
            let text = example("mnist-cnn.toml")?;
            // The example trains at 32 per worker; the comparison is at 64 per worker.
            let text = text.replace("batch_size = 64", "batch_size = 128");
            if !text.contains("batch_size = 128") {
                bail!("examples/mnist-cnn.toml changed: its batch_size line is not `batch_size = 64`");
            }
            (
                "MNIST CNN conv16-pool-conv32-pool-128-10 (the CNN example), 2 workers x 1 thread, 64 per worker, AdamW, 2 epochs",
                text,
                vec!["--model", "cnn", "--epochs", "2", "--batch-size", "128", "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.01", "--seed", "7"],
            )
        }
    };
    let spec = tmp.join(format!("{model}.toml"));
    std::fs::write(&spec, text)?;
    Ok(Workload { title, spec, peer_args })
}

/// Runs of shoal, of the PyTorch DDP peer and of the one-process peer, and the peer's error.
type Sides = (Vec<Run>, Vec<Run>, Vec<Run>, Option<String>);

/// Runs both sides `args.runs` times, alternating which goes first (and the one-process peer
/// after them, with `--one-process`).
fn compare(args: &Args, w: &Workload, shoal: &Path, python: &Path, script: &Path, have_torch: bool, root: &Path) -> Result<Sides> {
    let (mut shoal_runs, mut torch_runs, mut single_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut torch_error = None;
    for i in 0..args.runs {
        // Alternate which side goes first, so that neither always runs on a cooler machine.
        let order: &[bool] = if i % 2 == 0 { &[true, false] } else { &[false, true] };
        if args.one_process && have_torch && torch_error.is_none() {
            let mut cmd = Command::new(python);
            cmd.arg(script).args(&w.peer_args).args(["--workers", "1", "--threads", "2"]).current_dir(root);
            match measure(cmd, "pytorch_ddp:", "the one-process PyTorch peer") {
                Ok(r) => {
                    eprintln!("e2e: run {}/{}  pytorch 1x2t  samples/s {:>8.0}  test accuracy {:.4}  wall {:>5.1} s", i + 1, args.runs, r.samples_per_s, r.test_accuracy, r.wall_s);
                    single_runs.push(r);
                }
                Err(e) => eprintln!("e2e: {e:#}"),
            }
        }
        for &is_shoal in order {
            if is_shoal {
                let mut cmd = Command::new(shoal);
                cmd.args(["bench", "train"]).arg(&w.spec).args(["--workers", "2"]).current_dir(root);
                let r = measure(cmd, "bench train:", "shoal bench train")?;
                eprintln!(
                    "e2e: run {}/{}  shoal        samples/s {:>8.0}  test accuracy {:.4}  wall {:>5.1} s  phase_ms {}",
                    i + 1,
                    args.runs,
                    r.samples_per_s,
                    r.test_accuracy,
                    r.wall_s,
                    r.phases
                );
                shoal_runs.push(r);
            } else if have_torch && torch_error.is_none() {
                let mut cmd = Command::new(python);
                cmd.arg(script).args(&w.peer_args).args(["--workers", "2"]).current_dir(root);
                match measure(cmd, "pytorch_ddp:", "the PyTorch DDP peer") {
                    Ok(r) => {
                        eprintln!(
                            "e2e: run {}/{}  pytorch DDP  samples/s {:>8.0}  test accuracy {:.4}  wall {:>5.1} s",
                            i + 1,
                            args.runs,
                            r.samples_per_s,
                            r.test_accuracy,
                            r.wall_s
                        );
                        torch_runs.push(r);
                    }
                    Err(e) => {
                        eprintln!("e2e: {e:#}\ne2e: skipping the remaining PyTorch runs");
                        torch_error = Some(format!("{e:#}"));
                    }
                }
            }
        }
    }
    Ok((shoal_runs, torch_runs, single_runs, torch_error))
}

#[cfg(test)]
mod tests {
    use shoal_benches::parse_line;

    #[test]
    fn parses_both_result_lines() {
        let shoal = "noise\nbench train: model=mlp workers=2 transport=shm epochs=5 samples_per_s=5123 test_accuracy=0.9615 phase_ms data=0.1\n";
        assert_eq!(parse_line(shoal, "bench train:"), Some((5123.0, 0.9615)));
        let torch = "pytorch_ddp: workers=2 epochs=5 test_accuracy=0.9600 samples_per_s=7000 train_s=5.7\n";
        assert_eq!(parse_line(torch, "pytorch_ddp:"), Some((7000.0, 0.96)));
        assert_eq!(parse_line("bench train: starting", "bench train:"), None);
    }
}
