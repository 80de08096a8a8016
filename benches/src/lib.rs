//! What the benchmark runners in `examples/` share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The `shoal` binary to benchmark: the one in the profile folder this example runs from
/// (examples sit in its `examples/`, whatever the target dir is), else
/// `root/target/release/shoal`.
pub fn shoal_exe(root: &Path) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe().ok().and_then(|p| p.parent()?.parent().map(|d| d.join("shoal")));
    let shoal = beside.filter(|p| p.is_file()).unwrap_or_else(|| root.join("target/release/shoal"));
    if !shoal.is_file() {
        anyhow::bail!("{} not found: build it with `cargo build --release -p shoal`", shoal.display());
    }
    Ok(shoal)
}

/// `cargo build --release -p shoal` in the workspace at `root`.
pub fn build_shoal(root: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if !Command::new(cargo).args(["build", "--release", "-p", "shoal"]).current_dir(root).status()?.success() {
        anyhow::bail!("cargo build --release -p shoal failed");
    }
    Ok(())
}

/// A size: digits with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    use anyhow::Context;
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(digits.parse::<u64>().with_context(|| format!("{s:?} is not a size"))? * mult)
}

/// The median of `xs` (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// An argument no option took: `-h`/`--help` prints `usage` and exits; anything else is an
/// error that shows it.
pub fn other_argument(arg: &str, usage: &str) -> anyhow::Error {
    if arg == "-h" || arg == "--help" {
        println!("{usage}");
        std::process::exit(0);
    }
    anyhow::anyhow!("unknown argument {arg:?}\n{usage}")
}

/// One measured run of a training benchmark (shoal's `bench train` or a peer).
#[derive(Clone, Debug)]
pub struct Run {
    pub samples_per_s: f64,
    pub test_accuracy: f64,
    /// Whole-process wall time, start-up and evaluation included.
    pub wall_s: f64,
    /// shoal's `phase_ms` fields as printed (`data=... forward_backward=...`); empty for the peer.
    pub phases: String,
}

/// `key=value` fields of the last line of `out` that starts with `prefix`.
pub fn parse_line(out: &str, prefix: &str) -> Option<(f64, f64)> {
    let line = out.lines().rev().find(|l| l.starts_with(prefix))?;
    let field = |key: &str| {
        line.split_whitespace().find_map(|t| t.strip_prefix(key).and_then(|v| v.strip_prefix('='))).and_then(|v| v.parse::<f64>().ok())
    };
    Some((field("samples_per_s")?, field("test_accuracy")?))
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion and parses its final result line.
pub fn measure(mut cmd: Command, prefix: &str, what: &str) -> Result<Run> {
    let t0 = Instant::now();
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    let wall_s = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{what} failed ({}):\n{}\n{}", out.status, tail(&stdout, 10), tail(&stderr, 30));
    }
    let (samples_per_s, test_accuracy) = parse_line(&stdout, prefix)
        .with_context(|| format!("{what} printed no `{prefix} ... test_accuracy=... samples_per_s=...` line:\n{}", tail(&stdout, 10)))?;
    let phases = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once("phase_ms "))
        .map(|(_, p)| p.trim().to_string())
        .unwrap_or_default();
    Ok(Run { samples_per_s, test_accuracy, wall_s, phases })
}


static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
static TLS: std::sync::OnceLock<Option<shoal_coordinator::tls::TlsFiles>> = std::sync::OnceLock::new();
static TOKEN_KEY: std::sync::OnceLock<Option<shoal_core::auth::TokenKey>> = std::sync::OnceLock::new();

/// Raw gRPC clients of benchmarks carry the admin token and certificate of the `shoal up`
/// cluster in `dir` (call once, after `up`).
pub fn use_cluster_token(dir: &Path) {
    let ca = shoal_cluster::Layout::new(dir).authority();
    let _ = TOKEN.set(ca.admin_token());
    let _ = TLS.set(ca.admin_tls().ok().flatten());
    let _ = TOKEN_KEY.set(shoal_core::auth::TokenKey::load(&ca.dir.join(shoal_coordinator::server::TOKEN_KEY_FILE)).ok());
}

/// `message` as a call made for worker `id`, with the key its registration would have given
/// it (the admin's folder holds the cluster's token key, from which every worker key comes).
pub fn as_worker<T>(id: &str, message: T) -> tonic::Request<T> {
    let key = TOKEN_KEY.get().and_then(|k| k.as_ref()).map(|k| k.worker_key(id).to_vec()).unwrap_or_default();
    shoal_coordinator::client::WorkerId::new(id.to_string(), &key).request(message)
}

/// An endpoint of a shoal coordinator: TLS with the certificate `use_cluster_token` read.
pub fn endpoint(addr: &str) -> shoal_coordinator::tls::Dial {
    shoal_coordinator::tls::endpoint(addr, TLS.get().and_then(|t| t.as_ref())).expect("a host:port")
}

/// A coordinator client over `ch` with the token `use_cluster_token` read.
pub fn rpc(ch: tonic::transport::Channel) -> shoal_coordinator::client::Rpc {
    let bearer = shoal_coordinator::client::Bearer::new(TOKEN.get().and_then(|t| t.as_deref())).expect("a token file holds ASCII");
    shoal_proto::coordinator_client::CoordinatorClient::with_interceptor(ch, bearer)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&[]).is_nan());
    }
}
