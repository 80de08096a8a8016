//! The cost of `[training] lanes`: the same job with and without lanes, 2 workers, runs
//! alternating, in one invocation (issue: at most 10% slower with `lanes = 8`).
//!
//!     cargo run --release -p shoal-benches --example lanes -- [--model mlp|cnn|both] [--lanes K] [--runs N] [--no-build]
//!
//! Workloads are the e2e ones (examples/mnist-mlp.toml; examples/mnist-cnn.toml at 64 per
//! worker). Prints per-run `shoal bench train` numbers, then the medians and the ratio
//! with / without lanes (samples/s; < 1: lanes are slower).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use shoal_benches::{measure, median, Run};

const USAGE: &str = "usage: lanes [--model mlp|cnn|both] [--lanes K] [--runs N] [--no-build]
  --model M   the workload (default both)
  --lanes K   lanes of the lanes runs (default 8)
  --runs N    runs of each variant (default 5)
  --no-build  use target/release/shoal as it is";

fn main() -> Result<()> {
    let (mut models, mut lanes, mut runs, mut build) = (vec!["mlp", "cnn"], 8u32, 5usize, true);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--model" => {
                models = match value("--model")?.as_str() {
                    "both" => vec!["mlp", "cnn"],
                    "mlp" => vec!["mlp"],
                    "cnn" => vec!["cnn"],
                    m => bail!("--model must be mlp, cnn or both, not {m:?}"),
                }
            }
            "--lanes" => lanes = value("--lanes")?.parse().context("--lanes takes a positive number")?,
            "--runs" => runs = value("--runs")?.parse().context("--runs takes a positive number")?,
            "--no-build" => build = false,
            other => return Err(shoal_benches::other_argument(other, USAGE)),
        }
    }
    if runs == 0 || lanes == 0 {
        bail!("--runs and --lanes must be at least 1");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().context("finding the workspace root")?;
    if build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo).args(["build", "--release", "-p", "shoal"]).current_dir(&root).status().context("running cargo")?;
        if !st.success() {
            bail!("cargo build --release -p shoal failed ({st})");
        }
    }
    let shoal = shoal_benches::shoal_exe(&root)?;
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    for model in models {
        let base = match model {
            "mlp" => std::fs::read_to_string(root.join("examples/mnist-mlp.toml"))?,
            _ => std::fs::read_to_string(root.join("examples/mnist-cnn.toml"))?.replace("batch_size = 64", "batch_size = 128"),
        };
        if !base.contains("batch_size = 128") {
            bail!("examples/ changed: the {model} example's global batch is not 128");
        }
        let with = base.replace("batch_size = 128", &format!("batch_size = 128\nlanes = {lanes}"));
        let (plain_spec, lanes_spec) = (tmp.path().join(format!("{model}.toml")), tmp.path().join(format!("{model}-lanes.toml")));
        std::fs::write(&plain_spec, &base)?;
        std::fs::write(&lanes_spec, &with)?;
        let (mut plain, mut laned): (Vec<Run>, Vec<Run>) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let order: [bool; 2] = if i % 2 == 0 { [false, true] } else { [true, false] };
            for with_lanes in order {
                let spec = if with_lanes { &lanes_spec } else { &plain_spec };
                let mut cmd = Command::new(&shoal);
                cmd.args(["bench", "train"]).arg(spec).args(["--workers", "2"]).current_dir(&root);
                let r = measure(cmd, "bench train:", "shoal bench train")?;
                eprintln!(
                    "lanes: {model} run {}/{runs} {:<8} samples/s {:>8.0}  test accuracy {:.4}  phase_ms {}",
                    i + 1,
                    if with_lanes { "lanes" } else { "no lanes" },
                    r.samples_per_s,
                    r.test_accuracy,
                    r.phases
                );
                if with_lanes { &mut laned } else { &mut plain }.push(r);
            }
        }
        let sps = |rs: &[Run]| median(&rs.iter().map(|r| r.samples_per_s).collect::<Vec<_>>());
        let acc = |rs: &[Run]| median(&rs.iter().map(|r| r.test_accuracy).collect::<Vec<_>>());
        println!("{model}, 2 workers, medians of {runs} runs:");
        println!("  without lanes   {:>8.0} samples/s  test accuracy {:.4}", sps(&plain), acc(&plain));
        println!("  lanes = {lanes:<6}  {:>8.0} samples/s  test accuracy {:.4}", sps(&laned), acc(&laned));
        println!("  ratio lanes / without: {:.3}", sps(&laned) / sps(&plain));
    }
    Ok(())
}
