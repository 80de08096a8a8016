//! Reading a dataset's shards from the store as a worker does (`Store::local_copy`, then the
//! whole shard mapped and hashed, as `ShardedDataset::open` checks it): a local folder, an
//! S3-compatible server with a cold cache (ranged GETs, verified, written to the cache) and
//! the same with the cache warm. The server is moto's standalone server (PyPI `moto[server]`,
//! looked up in target/tools/moto, where `.ci/run` installs it, then on PATH).
//!
//!   cargo run --release -p shoal-benches --example store_read -- [--size 1G] [--shard 8M]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_benches::parse_size;
use shoal_core::store::Store;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto_server(root: &Path) -> Result<PathBuf> {
    let installed = root.join("target/tools/moto/bin/moto_server");
    if installed.exists() {
        return Ok(installed);
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("moto_server")).find(|f| f.exists()))
        .context("moto_server is not installed: python3 -m venv target/tools/moto && target/tools/moto/bin/pip install 'moto[server]'")
}

/// Reads every shard as a worker opening the dataset does; returns MB/s.
fn read_all(store: &Store, shards: &[(String, u64, String)]) -> Result<f64> {
    let started = Instant::now();
    let mut bytes = 0u64;
    for (key, len, hash) in shards {
        let path = store.local_copy(key, *len, hash)?;
        let file = std::fs::File::open(&path)?;
        // SAFETY: read only; the benchmark owns the files.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        if blake3::hash(&map).to_hex().as_str() != hash {
            bail!("{key}: hash mismatch");
        }
        bytes += map.len() as u64;
    }
    Ok(bytes as f64 / 1e6 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str);
    let size = parse_size(flag("--size").unwrap_or("1G"))?;
    let shard = parse_size(flag("--shard").unwrap_or("8M"))?.max(1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir()?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::fs::File::create(tmp.path().join("moto.log"))?;
    let _server = Server(Command::new(moto_server(&root)?).args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log)).spawn()?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the S3 server did not listen");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        write!(s, "PUT /bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.1 200") {
            bail!("creating the bucket: {out}");
        }
    }
    for (k, v) in [("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_REGION", "us-east-1")] {
        // SAFETY: set before any other thread reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let local = Store::local(tmp.path().join("store"));
    let s3 = Store::open("s3://bench/data", Some(&format!("http://127.0.0.1:{port}")))?.with_cache(tmp.path().join("cache"), size * 2)?;

    // Shards of pseudo-random bytes (not compressible, not zeros).
    let mut shards = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let started = Instant::now();
    for i in 0..size.div_ceil(shard) {
        let len = shard.min(size - i * shard);
        let data: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let key = format!("datasets/bench/import-1/shard-{i:05}.safetensors");
        local.put(&key, &[&data])?;
        s3.put(&key, &[&data])?;
        shards.push((key, len, blake3::hash(&data).to_hex().to_string()));
    }
    let written = started.elapsed().as_secs_f64();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())).unwrap_or_default();
    println!("store_read: {} MB in {} shards of {} MB ({cpu}); written to both in {written:.1} s", size >> 20, shards.len(), shard >> 20);
    // The local folder's pages are in the page cache (just written), as a warm local read.
    let local_mb = read_all(&local, &shards)?;
    let cold = read_all(&s3, &shards)?;
    let warm = read_all(&s3, &shards)?;
    println!("local folder        {local_mb:>9.0} MB/s");
    println!("s3, cold cache      {cold:>9.0} MB/s  ({:.2}x local)", cold / local_mb);
    println!("s3, warm cache      {warm:>9.0} MB/s  ({:.2}x local)", warm / local_mb);
    Ok(())
}
