//! What the benchmark runners in `examples/` share.

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
