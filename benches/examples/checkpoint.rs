//! Checkpoint benchmarks (issue: asynchronous checkpoints), two of them:
//!
//!     cargo run --release -p shoal-benches --example checkpoint -- overhead [--runs N] [--hidden 4096,2560] [--every 50] [--epochs 3]
//!     cargo run --release -p shoal-benches --example checkpoint -- io [--mb 256] [--dir PATH] [--runs N]
//!
//! `overhead` trains the same MLP (default 784-4096-2560-10: 13.7 M parameters, 55 MB; a
//! checkpoint with SGD momentum is 110 MB) on one local cluster of 2 workers, with a checkpoint
//! every `--every` steps and without, jobs alternating, and prints each run's training
//! samples/s and `phase_ms`, then the medians and the overhead. Both write the final
//! checkpoint, after training (it is not in samples/s).
//!
//! `io` writes a checkpoint of `--mb` MB of f32 tensors with shoal's writer (one rank writing
//! all of it, and two ranks writing half each at once), then reads it back as a restore does
//! (blake3 of every file checked, tensors copied out), cold (the files' pages dropped from the
//! page cache with posix_fadvise) and warm, next to the disk's own figures measured in the same
//! run: `dd if=/dev/zero bs=1M conv=fsync` for writes and `dd of=/dev/null bs=1M` for a cold read.
//! Medians of `--runs` (default 3).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use shoal_proto::{CheckpointFile, CheckpointManifest};
use shoal_worker::checkpoint::{read_tensors, write_part, PartSnapshot};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn shoal_exe() -> Result<PathBuf> {
    shoal_benches::shoal_exe(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn spec(hidden: &str, epochs: u32, every: Option<u64>) -> String {
    let mut s = format!(
        "name = \"ckpt-bench\"\n[model]\nkind = \"mlp\"\nhidden = [{hidden}]\n[dataset]\nname = \"mnist\"\ntrain = [0, 8000]\ntest = [8000, 10000]\n\
         [training]\nepochs = {epochs}\nbatch_size = 128\nseed = 42\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.01\nmomentum = 0.9\n[cluster]\nworkers = 2\n"
    );
    if let Some(n) = every {
        s.push_str(&format!("[checkpoint]\nevery_steps = {n}\nkeep = 2\n"));
    }
    s
}

/// Runs `shoal ARGS... --dir DIR` and returns its stdout.
fn shoal(exe: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe).args(args).arg("--dir").arg(dir).output().context("running shoal")?;
    if !out.status.success() {
        bail!("shoal {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// One training run's training samples/s and its phase times (ms per step, last epoch).
fn train_once(exe: &Path, dir: &Path, spec: &Path) -> Result<(f64, serde_json::Value)> {
    let job: serde_json::Value = serde_json::from_str(&shoal(exe, dir, &["job", "submit", "--follow", "--json", &spec.display().to_string()])?)?;
    if job["state"] != "succeeded" {
        bail!("job did not succeed: {job}");
    }
    Ok((job["samples_per_s"].as_f64().context("samples_per_s")?, job["phase_ms"].clone()))
}

fn overhead(args: &[String]) -> Result<()> {
    let runs: usize = flag(args, "--runs").map(|v| v.parse()).transpose()?.unwrap_or(3);
    let hidden = flag(args, "--hidden").unwrap_or_else(|| "4096, 2560".into());
    let every: u64 = flag(args, "--every").map(|v| v.parse()).transpose()?.unwrap_or(50);
    let epochs: u32 = flag(args, "--epochs").map(|v| v.parse()).transpose()?.unwrap_or(3);
    let exe = shoal_exe()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cluster");
    let with = tmp.path().join("with.toml");
    let without = tmp.path().join("without.toml");
    std::fs::write(&with, spec(&hidden, epochs, Some(every)))?;
    std::fs::write(&without, spec(&hidden, epochs, None))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    shoal(&exe, &dir, &["up", "--workers", "2"])?;
    let result = (|| -> Result<()> {
        let (x, y) = (root.join("mnist10k-images-idx3-ubyte.gz"), root.join("mnist10k-labels-idx1-ubyte.gz"));
        shoal(&exe, &dir, &["data", "import", "mnist", &x.display().to_string(), &y.display().to_string()])?;
        println!("overhead: MLP hidden [{hidden}], 2 workers, {epochs} epochs of 62 steps, a checkpoint every {every} steps vs none, {runs} runs each, one cluster");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let order: [bool; 2] = if i % 2 == 0 { [true, false] } else { [false, true] };
            for checkpointing in order {
                let (sps, phases) = train_once(&exe, &dir, if checkpointing { &with } else { &without })?;
                println!("run {}: {:<15} {sps:>8.1} samples/s  phase_ms {phases}", i + 1, if checkpointing { "checkpoints" } else { "no checkpoints" });
                if checkpointing { a.push(sps) } else { b.push(sps) }
            }
        }
        let (ma, mb) = (median(a), median(b));
        println!("median: checkpoints {ma:.1} samples/s, none {mb:.1} samples/s, overhead {:.2}%", (mb / ma - 1.0) * 100.0);
        Ok(())
    })();
    let _ = shoal(&exe, &dir, &["down"]);
    result
}

/// Drops a file's pages from the page cache (they are clean after fsync).
fn evict(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: a plain advisory call on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!("posix_fadvise({}) failed: {rc}", path.display());
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

fn dd(args: &[&str]) -> Result<()> {
    let out = Command::new("dd").args(args).output().context("running dd")?;
    if !out.status.success() {
        bail!("dd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn io(args: &[String]) -> Result<()> {
    let mb: usize = flag(args, "--mb").map(|v| v.parse()).transpose()?.unwrap_or(256);
    let runs: usize = flag(args, "--runs").map(|v| v.parse()).transpose()?.unwrap_or(3);
    let base = flag(args, "--dir").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&base)?;
    let store = tmp.path();
    let objects = shoal_core::store::Store::local(store);
    // 16 tensors of mb/16 MB each, not zeros.
    let per = mb * (1 << 20) / 4 / 16;
    let tensors: Vec<(String, Vec<usize>)> = (0..16).map(|i| (format!("t{i}"), vec![per])).collect();
    let data: Vec<f32> = (0..per * 16).map(|i| (i as f32 * 1e-3).sin()).collect();
    let bytes = (data.len() * 4) as f64;
    let rel = shoal_core::checkpoint::checkpoint_dir(1, 1);
    let dir = store.join(&rel);
    let dd_file = store.join("dd.bin");
    let dd_of = format!("of={}", dd_file.display());
    let dd_if = format!("if={}", dd_file.display());
    let count = format!("count={mb}");
    let snapshot = |rank: u32, range: std::ops::Range<usize>| PartSnapshot {
        step: 1,
        rank,
        generation: 1,
        dir: rel.clone(),
        tensors: tensors[range.clone()].to_vec(),
        data: data[range.start * per..range.end * per].to_vec(),
    };
    let manifest = |files: Vec<CheckpointFile>| CheckpointManifest { job_id: 1, step: 1, world_size: files.len() as u32, dir: rel.clone(), files, ..Default::default() };
    // As `restore` does: each tensor copied to its place, found by name.
    let restore = |m: &CheckpointManifest, out: &mut Vec<f32>| -> Result<()> {
        read_tensors(&objects, m, |name, _, offset, d| {
            let at = name[1..].parse::<usize>().expect("t<i>") * per + offset / 4;
            for (o, c) in out[at..at + d.len() / 4].iter_mut().zip(d.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
            Ok(())
        })?;
        Ok(())
    };
    println!("io: {mb} MB checkpoint in {}, {runs} runs (medians)", store.display());
    let (mut dd_w, mut dd_r, mut w1, mut w2, mut cold, mut warm) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut out = vec![0f32; data.len()];
    for _ in 0..runs {
        dd_w.push(timed(|| dd(&["if=/dev/zero", &dd_of, "bs=1M", &count, "conv=fsync"]))?);
        evict(&dd_file)?;
        dd_r.push(timed(|| dd(&[&dd_if, "of=/dev/null", "bs=1M"]))?);
        std::fs::remove_file(&dd_file)?;

        let one = snapshot(0, 0..16);
        let mut files = Vec::new();
        w1.push(timed(|| {
            files.push(write_part(&objects, &one)?);
            Ok(())
        })?);
        let m1 = manifest(files);
        evict(&dir.join(&m1.files[0].name))?;
        cold.push(timed(|| restore(&m1, &mut out))?);
        assert!(out == data, "restored data differs");
        warm.push(timed(|| restore(&m1, &mut out))?);
        std::fs::remove_dir_all(&dir)?;

        let halves = [snapshot(0, 0..8), snapshot(1, 8..16)];
        w2.push(timed(|| {
            std::thread::scope(|s| {
                let hs: Vec<_> = halves.iter().map(|h| s.spawn(|| write_part(&objects, h))).collect();
                for h in hs {
                    h.join().expect("writer thread")?;
                }
                anyhow::Ok(())
            })
        })?);
        std::fs::remove_dir_all(&dir)?;
    }
    let gbps = |t: Vec<f64>| bytes / median(t) / 1e9;
    let (dw, dr) = (gbps(dd_w), gbps(dd_r));
    let rows = [
        ("dd write, conv=fsync (disk)", dw, dw),
        ("shoal write, 1 rank (blake3 + fsync + rename)", gbps(w1), dw),
        ("shoal write, 2 ranks at once", gbps(w2), dw),
        ("dd read, cold (disk)", dr, dr),
        ("shoal restore, cold (blake3 + copy)", gbps(cold), dr),
        ("shoal restore, warm (page cache)", gbps(warm), dr),
    ];
    for (what, g, disk) in rows {
        println!("{what:<48} {g:>6.2} GB/s  {:>5.0}% of the disk", g / disk * 100.0);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("overhead") => overhead(&args[1..]),
        Some("io") => io(&args[1..]),
        _ => bail!("usage: checkpoint overhead [--runs N] [--hidden A,B] [--every N] [--epochs E] | io [--mb N] [--dir PATH] [--runs N]"),
    }
}
