//! What the benchmark runners in `examples/` share.

use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&[]).is_nan());
    }
}
