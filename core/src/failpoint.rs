//! Fault injection for tests: `SHOAL_FAILPOINTS=name[@step][=value],...` in a process's
//! environment arms named points in the code (a crash between two writes, an injected
//! disk-full error, a slow step, `nan-gradient@STEP=RANK`: rank RANK's own gradient of step
//! STEP gets a NaN). Unset, every check is one look at an empty list.

use std::sync::OnceLock;

#[derive(Debug, PartialEq)]
struct Point {
    name: String,
    step: Option<u64>,
    value: Option<u64>,
}

fn armed() -> &'static [Point] {
    static ARMED: OnceLock<Vec<Point>> = OnceLock::new();
    ARMED.get_or_init(|| std::env::var("SHOAL_FAILPOINTS").map(|v| parse(&v)).unwrap_or_default())
}

fn parse(spec: &str) -> Vec<Point> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (s, value) = match s.split_once('=') {
                Some((s, v)) => (s, v.trim().parse().ok()),
                None => (s, None),
            };
            let (name, step) = match s.split_once('@') {
                Some((name, step)) => (name, step.trim().parse().ok()),
                None => (s, None),
            };
            Point { name: name.trim().to_string(), step, value }
        })
        .collect()
}

fn find<'a>(list: &'a [Point], name: &str, step: Option<u64>) -> Option<&'a Point> {
    list.iter().find(|p| p.name == name && (p.step.is_none() || p.step == step))
}

/// Whether the point `name` is armed for `step` (`name` alone arms it for every step).
pub fn hit(name: &str, step: u64) -> bool {
    find(armed(), name, Some(step)).is_some()
}

/// The value armed for `name` (`name=value`), if any.
pub fn value(name: &str) -> Option<u64> {
    find(armed(), name, None).and_then(|p| p.value)
}

/// The value armed for `name@step` (or for `name` at every step), if any.
pub fn value_at(name: &str, step: u64) -> Option<u64> {
    find(armed(), name, Some(step)).and_then(|p| p.value)
}

/// Ends this process at once, as a power cut or SIGKILL would: no destructors, no goodbyes.
pub fn crash_if_hit(name: &str, step: u64) {
    if hit(name, step) {
        eprintln!("failpoint {name}@{step}: crashing");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_steps_and_values() {
        let l = parse(" a@3, b ,c@x,d=25,");
        assert!(find(&l, "a", Some(3)).is_some() && find(&l, "a", Some(4)).is_none());
        assert!(find(&l, "b", Some(0)).is_some() && find(&l, "b", Some(99)).is_some());
        assert!(find(&l, "c", Some(7)).is_some(), "an unparsable step arms every step");
        assert!(find(&l, "e", Some(3)).is_none());
        assert_eq!(find(&l, "d", None).and_then(|p| p.value), Some(25));
        // A value for one step only (`nan-gradient@5=1`: step 5, rank 1).
        let l = parse("nan-gradient@5=1");
        assert_eq!(find(&l, "nan-gradient", Some(5)).and_then(|p| p.value), Some(1));
        assert!(find(&l, "nan-gradient", Some(4)).is_none());
    }
}
