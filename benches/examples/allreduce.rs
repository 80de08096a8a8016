//! All-reduce benchmark: shoal's collectives (`shoal bench allreduce`: shm, TCP with f32 and
//! bf16 on the wire) against `torch.distributed.all_reduce` over gloo (benches/peer/
//! gloo_allreduce.py), f32 buffers of 1 KB to 256 MB, 2 and 4 local processes, in one
//! invocation, with the machine's limits measured in the same run:
//!
//! - memory copy bandwidth (one thread, 256 MB `copy_from_slice`);
//! - loopback TCP with both directions busy: two endpoints each send N bytes to the other
//!   while receiving N (what a 2-process ring all-reduce of N bytes moves per process), so the
//!   limit on algbw for 2 processes is N over that time.
//!
//!     cargo run --release -p shoal-benches --example allreduce -- [--sizes 1K,64M] [--worlds 2,4] [--python PATH] [--no-build]
//!
//! Every number is a median (the collectives: of `iters` timed calls after warm-up, a barrier
//! before each; the limits: of 5 trials). algbw is the buffer's bytes over the time of one call.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use shoal_benches::{median, parse_size};

const USAGE: &str = "usage: allreduce [--sizes 1K,64K,1M,16M,64M,256M] [--worlds 2,4] [--python PATH] [--no-build]";

struct Args {
    sizes: Vec<u64>,
    worlds: Vec<usize>,
    python: Option<PathBuf>,
    build: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { sizes: ["1K", "64K", "1M", "16M", "64M", "256M"].iter().map(|s| parse_size(s).unwrap()).collect(), worlds: vec![2, 4], python: None, build: true };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--sizes" => a.sizes = value("--sizes")?.split(',').map(parse_size).collect::<Result<_>>()?,
            "--worlds" => a.worlds = value("--worlds")?.split(',').map(|w| w.parse().context("--worlds takes numbers")).collect::<Result<_>>()?,
            "--python" => a.python = Some(value("--python")?.into()),
            "--no-build" => a.build = false,
            other => return Err(shoal_benches::other_argument(other, USAGE)),
        }
    }
    Ok(a)
}


fn iters_for(bytes: u64) -> usize {
    match bytes {
        b if b <= 1 << 20 => 50,
        b if b >= 256 << 20 => 5,
        _ => 20,
    }
}

/// GB/s of one thread copying 256 MB (median of 5).
fn memcpy_gbps() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let t: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    n as f64 / median(&t) / 1e9
}

/// Seconds for two endpoints to each send `bytes` to the other over loopback TCP while
/// receiving as much (4 threads: a sender and a receiver per endpoint).
fn loopback_both_ways(bytes: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let pair = || -> Result<(TcpStream, TcpStream)> {
        let a = TcpStream::connect(addr)?;
        let (b, _) = listener.accept()?;
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        Ok((a, b))
    };
    let (a_to_b, b_from_a) = pair()?;
    let (b_to_a, a_from_b) = pair()?;
    let payload = vec![7u8; bytes];
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let send = |mut sock: TcpStream| {
            let p = &payload;
            s.spawn(move || sock.write_all(p))
        };
        let recv = |mut sock: TcpStream| {
            s.spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; 256 << 10];
                let mut left = bytes;
                while left > 0 {
                    let n = sock.read(&mut buf[..left.min(256 << 10)])?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    left -= n;
                }
                Ok(())
            })
        };
        let hs = [send(a_to_b), send(b_to_a), recv(b_from_a), recv(a_from_b)];
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("a loopback thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed().as_secs_f64())
}

/// Median ms of `shoal bench allreduce`.
fn shoal_allreduce(shoal: &Path, bytes: u64, world: usize, transport: &str, wire: &str) -> Result<f64> {
    let out = Command::new(shoal)
        .args(["bench", "allreduce", "--bytes", &bytes.to_string(), "--world", &world.to_string(), "--transport", transport, "--wire", wire])
        .args(["--iters", &iters_for(bytes).to_string(), "--json"])
        .output()
        .context("running shoal bench allreduce")?;
    if !out.status.success() {
        bail!("shoal bench allreduce {transport}/{wire} {bytes} B x{world} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["time_ms"].as_f64().context("no time_ms")
}

/// Median ms per size of the gloo peer.
fn gloo_allreduce(python: &Path, script: &Path, sizes: &[u64], world: usize) -> Result<Vec<f64>> {
    let list: Vec<String> = sizes.iter().map(u64::to_string).collect();
    let out = Command::new(python)
        .arg(script)
        .args(["--world", &world.to_string(), "--sizes", &list.join(","), "--iters", "20", "--warmup", "3"])
        .output()
        .context("running the gloo peer")?;
    if !out.status.success() {
        bail!("the gloo peer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ms = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let times: Vec<f64> = v["times_ms"].as_array().context("no times")?.iter().filter_map(|t| t.as_f64()).collect();
        ms.push(median(&times));
    }
    if ms.len() != sizes.len() {
        bail!("the gloo peer reported {} sizes of {}", ms.len(), sizes.len());
    }
    Ok(ms)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KB", b >> 10),
        b => format!("{b} B"),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    if args.build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo).args(["build", "--release", "-p", "shoal"]).current_dir(&root).status()?;
        if !st.success() {
            bail!("cargo build --release -p shoal failed");
        }
    }
    let shoal = shoal_benches::shoal_exe(&root)?;
    let python = args.python.clone().unwrap_or_else(|| root.join("benches/.venv/bin/python"));
    let script = root.join("benches/peer/gloo_allreduce.py");
    let have_torch = python.is_file();
    if !have_torch {
        eprintln!("allreduce: no PyTorch at {} (run benches/peer/setup.sh): shoal only", python.display());
    }

    let memcpy = memcpy_gbps();
    let loop_bytes = 64 << 20;
    let loopback = median(&(0..5).map(|_| loopback_both_ways(loop_bytes)).collect::<Result<Vec<_>>>()?);
    println!("machine: {} cores; memcpy {memcpy:.2} GB/s (1 thread); loopback TCP, 64 MB each way at once: {:.1} ms, limit on 2-process ring algbw {:.2} GB/s",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), loopback * 1e3, loop_bytes as f64 / loopback / 1e9);

    let shoal_sides = [("shm", "f32"), ("tcp", "f32"), ("tcp", "bf16")];
    for &world in &args.worlds {
        let gloo = if have_torch { Some(gloo_allreduce(&python, &script, &args.sizes, world)?) } else { None };
        println!("\n{world} processes: algbw GB/s (time ms); ratio to gloo in brackets");
        println!("| size | gloo | shoal shm | shoal tcp f32 | shoal tcp bf16 |");
        println!("| ---: | ---: | ---: | ---: | ---: |");
        for (i, &bytes) in args.sizes.iter().enumerate() {
            let bw = |ms: f64| bytes as f64 / (ms / 1e3) / 1e9;
            let g = gloo.as_ref().map(|g| g[i]);
            let mut row = format!("| {} | {} |", human(bytes), g.map(|ms| format!("{:.3} ({ms:.3})", bw(ms))).unwrap_or("-".into()));
            for (t, w) in shoal_sides {
                let ms = shoal_allreduce(&shoal, bytes, world, t, w)?;
                let ratio = g.map(|gm| format!(" [{:.2}x]", gm / ms)).unwrap_or_default();
                row += &format!(" {:.3} ({ms:.3}){ratio} |", bw(ms));
            }
            println!("{row}");
        }
    }
    Ok(())
}
