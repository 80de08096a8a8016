//! `shoal bench`: the collective on its own, as nccl-tests measures a fabric (`allreduce`), and
//! a training job on a local cluster (`train`).
//!
//! `allreduce` starts `world` processes of this binary (`bench allreduce-rank`, hidden) that
//! meet through files in a temporary folder (each writes its addresses; the shared segment's
//! name comes from the folder), join one collective over the transport asked for, check the
//! sums once (every rank the same bits; for f32, sampled elements equal to the documented
//! order), then time `iters` all-reduces after a warm-up, each after a barrier. Rank 0 reports
//! its times; the median is `time_ms`, and `algbw_GBps` is the buffer's bytes over it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use shoal_worker::collective::secure::DataPlaneTls;
use shoal_worker::collective::{chunk, Collective, Incoming, Mailbox, Rendezvous, Wire};

/// What one all-reduce benchmark runs.
#[derive(Clone, Debug)]
pub struct AllReduceArgs {
    pub bytes: u64,
    pub world: usize,
    pub transport: String,
    pub wire: String,
    pub iters: usize,
    pub warmup: usize,
    pub timeout: Duration,
    /// Mutual TLS and membership proofs on the data plane (credentials made in the run's folder).
    pub tls: bool,
}

/// Parses a byte count: digits with an optional K, M or G suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a byte count (digits, optionally followed by K, M or G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

impl AllReduceArgs {
    pub fn check(&self) -> Result<()> {
        if self.bytes < 4 || !self.bytes.is_multiple_of(4) {
            bail!("--bytes must be a positive multiple of 4 (whole f32 values), got {}", self.bytes);
        }
        if self.bytes > 4 << 30 {
            bail!("--bytes {} is more than the 4 GiB this benchmark allows", self.bytes);
        }
        if !(2..=64).contains(&self.world) {
            bail!("--world must be 2 to 64, got {}", self.world);
        }
        if !matches!(self.transport.as_str(), "tcp" | "shm" | "grpc" | "hierarchical") {
            bail!("--transport must be tcp, shm, hierarchical or grpc, got {:?}", self.transport);
        }
        match (self.wire.as_str(), self.transport.as_str()) {
            ("f32", _) | ("bf16", "tcp" | "hierarchical") => {}
            ("bf16", t) => bail!("--wire bf16 applies to the tcp transport (and between hosts in hierarchical) only, not {t}"),
            (w, _) => bail!("--wire must be f32 or bf16, got {w:?}"),
        }
        if self.iters == 0 {
            bail!("--iters must be at least 1");
        }
        Ok(())
    }

    fn wire(&self) -> Wire {
        if self.wire == "bf16" {
            Wire::Bf16
        } else {
            Wire::F32
        }
    }

    fn rank_args(&self, rank: usize, dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = vec!["bench".into(), "allreduce-rank".into(), "--rank".into(), rank.to_string(), "--dir".into(), dir.display().to_string()];
        v.extend(["--bytes".into(), self.bytes.to_string(), "--world".into(), self.world.to_string(), "--transport".into(), self.transport.clone()]);
        v.extend(["--wire".into(), self.wire.clone(), "--iters".into(), self.iters.to_string(), "--warmup".into(), self.warmup.to_string()]);
        v.extend(["--timeout-s".into(), self.timeout.as_secs().to_string()]);
        if self.tls {
            v.push("--tls".into());
        }
        v
    }
}

/// The benchmark's result, from rank 0's clock.
#[derive(Debug)]
pub struct AllReduceResult {
    pub times_ms: Vec<f64>,
}

impl AllReduceResult {
    pub fn median_ms(&self) -> f64 {
        let mut t = self.times_ms.clone();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        if n % 2 == 1 {
            t[n / 2]
        } else {
            (t[n / 2 - 1] + t[n / 2]) / 2.0
        }
    }
}

/// Runs the benchmark: `world` processes of `exe`, reaped whatever happens.
pub async fn allreduce(exe: &Path, a: &AllReduceArgs) -> Result<AllReduceResult> {
    a.check()?;
    let dir = tempfile::Builder::new().prefix("shoal-bench-").tempdir().context("creating a temporary folder")?;
    if a.tls {
        // A CA for the run, and one worker certificate the ranks share.
        let ca = shoal_cluster::credentials::Authority::new(dir.path().join("ca"));
        ca.init()?;
        ca.issue_worker(&dir.path().join("worker"), &[])?;
    }
    let mut children = Vec::new();
    for rank in 0..a.world {
        let child = tokio::process::Command::new(exe)
            .args(a.rank_args(rank, dir.path()))
            .stdout(if rank == 0 { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    let mut outputs = Vec::new();
    for c in children {
        outputs.push(c.wait_with_output());
    }
    let outputs = futures_join_all(outputs).await;
    let mut report = None;
    for (rank, out) in outputs.into_iter().enumerate() {
        let out = out.with_context(|| format!("waiting for rank {rank}"))?;
        if !out.status.success() {
            bail!("rank {rank} failed ({})", out.status);
        }
        if rank == 0 {
            report = Some(String::from_utf8_lossy(&out.stdout).to_string());
        }
    }
    let report = report.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(report.trim()).with_context(|| format!("rank 0's report {report:?}"))?;
    let times_ms = v["times_ms"].as_array().context("rank 0's report has no times")?.iter().filter_map(|t| t.as_f64()).collect();
    Ok(AllReduceResult { times_ms })
}

/// Waits for every future, in order (the ranks run concurrently anyway: they are processes).
async fn futures_join_all<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(fs.len());
    for f in fs {
        out.push(f.await);
    }
    out
}

/// The value rank `rank` contributes at element `i`: cheap to compute, varied in magnitude so
/// the order of summation shows in the bits.
fn value(rank: usize, i: usize) -> f32 {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let h = h ^ (h >> 29);
    ((h % 2001) as f32 - 1000.0) * [1e-3, 1.0, 1e3][(h >> 40) as usize % 3]
}

fn fill(buf: &mut [f32], rank: usize) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = value(rank, i);
    }
}

/// Element `i` of the documented sum: its chunk's owner's value first, then the next ranks'.
fn reference_at(i: usize, len: usize, world: usize) -> f32 {
    let c = (0..world).find(|&c| chunk(len, world, c).contains(&i)).expect("every element is in a chunk");
    let mut acc = value(c, i);
    for k in 1..world {
        acc += value((c + k) % world, i);
    }
    acc
}

/// One rank of `allreduce`: meets the others through `dir` (each writes its addresses and
/// host id), joins the collective as a worker would (`Rendezvous`), then prints its times
/// (rank 0) as one JSON line. `bind`: the address its listeners take.
pub async fn allreduce_rank(a: AllReduceArgs, rank: usize, dir: PathBuf, bind: &str) -> Result<()> {
    a.check()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let mailbox = Arc::new(Mailbox::default());
    let files = if a.tls {
        Some(shoal_coordinator::tls::TlsFiles::load(&dir.join("worker"), "worker").map_err(anyhow::Error::msg)?.context("the run's worker certificate")?)
    } else {
        None
    };
    let tls = files.as_ref().map(DataPlaneTls::new).transpose()?.map(Arc::new);
    // Every rank derives the generation's key from the run's folder (a coordinator would hand
    // it out).
    let ring_key = a.tls.then(|| blake3::derive_key("shoal bench ring key", dir.display().to_string().as_bytes()));
    // Every rank listens on both (cheap), so the address file has one format.
    let grpc_listener = tokio::net::TcpListener::bind((bind, 0)).await.with_context(|| format!("binding the data-plane listener on {bind}"))?;
    let grpc_addr = grpc_listener.local_addr()?.to_string();
    // As a worker serves it, until the process exits.
    tokio::spawn(shoal_worker::collective::grpc::serve(grpc_listener, mailbox.clone(), files.as_ref(), std::future::pending())?);
    let incoming = Incoming::start_with(std::net::TcpListener::bind((bind, 0)).context("binding the ring listener")?, tls.clone())?;
    let mine = dir.join(format!("{rank}.addr"));
    let host = shoal_worker::collective::host_id();
    shoal_core::fsutil::write_atomic(&mine, format!("{grpc_addr} {} {host}", incoming.address()).as_bytes()).context("writing this rank's addresses")?;
    // Everyone's addresses.
    let deadline = Instant::now() + a.timeout;
    let mut grpc_peers = vec![String::new(); a.world];
    let mut ring_peers = vec![String::new(); a.world];
    let mut hosts = vec![String::new(); a.world];
    for r in 0..a.world {
        loop {
            if let Ok(text) = std::fs::read_to_string(dir.join(format!("{r}.addr"))) {
                let mut parts = text.splitn(3, ' ');
                grpc_peers[r] = parts.next().unwrap_or_default().to_string();
                ring_peers[r] = parts.next().unwrap_or_default().to_string();
                hosts[r] = parts.next().unwrap_or_default().to_string();
                break;
            }
            if Instant::now() > deadline {
                bail!("rank {r} did not show up in {:?}", a.timeout);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let rt = tokio::runtime::Handle::current();
    let floats = (a.bytes / 4) as usize;
    let times = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        // As a worker joins a generation: the transport asked for, checked against the
        // placement (shm needs one host, hierarchical several).
        let mut coll: Box<dyn Collective> = Rendezvous {
            rank,
            job: 1,
            generation: 1,
            transport: &a.transport,
            wire: a.wire(),
            peers: &grpc_peers,
            ring_peers: &ring_peers,
            hosts: &hosts,
            timeout: a.timeout,
            cancel,
            incoming: Some(&incoming),
            mailbox,
            ring_key,
            tls,
            rt,
        }
        .join()?;
        if coll.name() != a.transport {
            bail!("asked for {} but joined {}", a.transport, coll.name());
        }
        let mut buf = vec![0.0f32; floats];
        // Check once: every rank the same bits, and for f32 the documented order.
        fill(&mut buf, rank);
        coll.all_reduce(&mut buf)?;
        let hash = blake3::hash(bytemuck_bytes(&buf));
        let hashes = coll.all_gather_bytes(hash.as_bytes().to_vec())?;
        if let Some(r) = hashes.iter().position(|h| h[..] != hash.as_bytes()[..]) {
            bail!("rank {r} ended the all-reduce with other bits than rank {rank}");
        }
        // The documented flat order (hierarchical has its own, checked in its unit tests).
        if a.wire() == Wire::F32 && a.transport != "hierarchical" {
            let step = (floats / 4096).max(1);
            for i in (0..floats).step_by(step).chain([floats - 1]) {
                let want = reference_at(i, floats, a.world);
                if buf[i].to_bits() != want.to_bits() {
                    bail!("element {i}: {} is not the documented sum {want}", buf[i]);
                }
            }
        }
        let mut times = Vec::with_capacity(a.iters);
        for it in 0..a.warmup + a.iters {
            fill(&mut buf, rank);
            coll.barrier()?;
            let t = Instant::now();
            coll.all_reduce(&mut buf)?;
            if it >= a.warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            if it == 0 {
                // A marker for whoever watches the run (the kill test): this rank is in the loop.
                let _ = std::fs::write(dir.join(format!("{rank}.running")), b"");
            }
        }
        coll.barrier()?;
        // The barrier's last message reached this rank, but its acknowledgement may still be
        // on its way back to the sender: exiting at once could cut it off and make the sender
        // see this rank gone. Stay up a moment (ranks of a worker stay up anyway).
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(times)
    })
    .await
    .context("the benchmark thread")??;
    if rank == 0 {
        println!("{}", json!({ "times_ms": times }));
    }
    Ok(())
}

fn bytemuck_bytes(xs: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(xs.as_ptr() as *const u8, std::mem::size_of_val(xs)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_suffixes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("1k"), Ok(1024));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("12MB").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999999999G").is_err());
    }

    #[test]
    fn the_reference_is_the_documented_order() {
        let (len, world) = (1001, 3);
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|r| {
                let mut b = vec![0.0; len];
                fill(&mut b, r);
                b
            })
            .collect();
        let want = shoal_worker::collective::reference_sum(&inputs);
        assert!((0..len).all(|i| reference_at(i, len, world).to_bits() == want[i].to_bits()));
    }
}
