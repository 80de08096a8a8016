//! The collective between real processes: `shoal bench allreduce` end to end, and a rank killed
//! in the middle of an all-reduce, which must fail the others within 5 s on every transport.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn bench_allreduce_reports_time_and_bandwidth_for_each_transport() {
    for (transport, wire) in [("shm", "f32"), ("tcp", "f32"), ("tcp", "bf16"), ("grpc", "f32")] {
        let out = json(shoal().args(["bench", "allreduce", "--bytes", "1M", "--world", "3", "--transport", transport, "--wire", wire]).args(["--iters", "3", "--warmup", "1", "--json"]));
        let (t, bw) = (out["time_ms"].as_f64().unwrap(), out["algbw_GBps"].as_f64().unwrap());
        assert!(t > 0.0 && bw > 0.0, "{transport}/{wire}: {out}");
        assert_eq!(out["bytes"], 1 << 20, "{out}");
    }
    // Over TLS with membership proofs, as workers with credentials run (the rank checks its
    // sums as without).
    for transport in ["tcp", "grpc"] {
        let out = json(shoal().args(["bench", "allreduce", "--bytes", "1M", "--world", "3", "--transport", transport, "--tls"]).args(["--iters", "3", "--warmup", "1", "--json"]));
        assert!(out["time_ms"].as_f64().unwrap() > 0.0 && out["aes_gcm_GBps"].as_f64().unwrap() > 0.0, "{transport} over TLS: {out}");
        assert_eq!(out["tls"], true, "{out}");
    }
    let e = fails(shoal().args(["bench", "allreduce", "--bytes", "1M", "--world", "2", "--transport", "shm", "--wire", "bf16"]));
    assert!(e.contains("bf16") && e.contains("shm"), "{e}");
    let e = fails(shoal().args(["bench", "allreduce", "--bytes", "1001", "--world", "2", "--transport", "tcp"]));
    assert!(e.contains("multiple of 4"), "{e}");
}

/// Starts `world` ranks of `shoal bench allreduce-rank` that loop on all-reduces of 16 MB for
/// a long time, waits until every one is in the loop, kills rank 1 and returns how long the
/// others took to exit, with their exit codes and logs.
fn kill_one_rank_mid_all_reduce(transport: &str, world: usize) -> (Duration, Vec<(bool, String)>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rendezvous");
    std::fs::create_dir(&dir).unwrap();
    let mut ranks: Vec<Proc> = (0..world)
        .map(|r| {
            let mut cmd = shoal();
            cmd.args(["bench", "allreduce-rank", "--rank", &r.to_string(), "--dir"]).arg(&dir);
            cmd.args(["--bytes", "16M", "--world", &world.to_string(), "--transport", transport, "--iters", "1000000", "--warmup", "0", "--timeout-s", "60"]);
            Proc::spawn(&mut cmd, &tmp.path().join(format!("rank-{r}.log")))
        })
        .collect();
    wait_for("every rank in its all-reduce loop", Duration::from_secs(60), || (0..world).all(|r| dir.join(format!("{r}.running")).exists()).then_some(()));
    std::thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    ranks[1].kill();
    let mut outcomes = Vec::new();
    for (r, p) in ranks.iter_mut().enumerate() {
        if r == 1 {
            continue;
        }
        let status = p.wait_exit(Duration::from_secs(20));
        let log = std::fs::read_to_string(tmp.path().join(format!("rank-{r}.log"))).unwrap_or_default();
        outcomes.push((status.is_some_and(|s| !s.success()), log));
    }
    (killed.elapsed(), outcomes)
}

#[test]
fn a_rank_killed_mid_all_reduce_fails_the_others_within_5s() {
    for transport in ["tcp", "shm", "grpc"] {
        let (took, outcomes) = kill_one_rank_mid_all_reduce(transport, 3);
        for (failed, log) in &outcomes {
            assert!(failed, "{transport}: a survivor did not fail: {log}");
            // A survivor may first see another survivor leave (failures cascade round the ring).
            assert!(log.contains("rank 1") || log.contains("gone"), "{transport}: the error names no lost peer: {log}");
        }
        assert!(outcomes.iter().any(|(_, log)| log.contains("rank 1")), "{transport}: no survivor named the killed rank 1: {outcomes:?}");
        assert!(took < Duration::from_secs(5), "{transport}: the survivors took {took:?} to fail: {outcomes:?}");
    }
}
