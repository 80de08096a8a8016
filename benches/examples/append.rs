//! Append and validate throughput: `shoal data append` of a CSV and of a npy slice (parse,
//! schema check, statistics, drift, shards written and registered) against pandas
//! `read_csv` and `numpy.load` of the same files (reading alone), in the same run.
//!
//!     cargo run --release -p shoal-benches --example append -- [--mb 1024] [--python PATH] [--no-build]
//!
//! The data: 16 float columns and an integer label per row (written once into a temporary
//! folder: about `--mb` MB of CSV, and the same records as two .npy files).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const COLUMNS: usize = 16;

fn run(shoal: &Path, args: &[&str], dir: &Path) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(shoal).args(args).arg("--dir").arg(dir).output().with_context(|| format!("running shoal {args:?}"))?;
    if !out.status.success() {
        bail!("shoal {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn npy(path: &Path, descr: &str, shape: &str, data: &[u8]) -> Result<()> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(data)?;
    Ok(())
}

fn main() -> Result<()> {
    let (mut mb, mut python, mut build) = (1024usize, None, true);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mb" => mb = it.next().context("--mb needs a number")?.parse()?,
            "--python" => python = Some(it.next().context("--python needs a path")?),
            "--no-build" => build = false,
            other => return Err(shoal_benches::other_argument(other, "usage: append [--mb N] [--python PATH] [--no-build]")),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    if build {
        shoal_benches::build_shoal(&root)?;
    }
    let shoal = shoal_benches::shoal_exe(&root)?;
    let python = python.map(std::path::PathBuf::from).unwrap_or_else(|| root.join("benches/.venv/bin/python"));
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cluster");

    // The data: rows of 16 values with 4 decimals and a label; the same records as .npy.
    let mut rng = shoal_core::rng::SplitMix64::new(7);
    let csv_path = tmp.path().join("slice.csv");
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv_path)?);
        let header: Vec<String> = (0..COLUMNS).map(|i| format!("f{i}")).chain(["label".to_string()]).collect();
        writeln!(f, "{}", header.join(","))?;
        let mut written = 0usize;
        let mut line = String::new();
        while written < mb << 20 {
            line.clear();
            for _ in 0..COLUMNS {
                let v = ((rng.next_f32() * 200.0 - 100.0) * 10000.0).round() / 10000.0;
                feats.push(v);
                line.push_str(&format!("{v:.4},"));
            }
            let l = rng.below(10) as i64;
            labels.push(l);
            line.push_str(&format!("{l}\n"));
            f.write_all(line.as_bytes())?;
            written += line.len();
        }
    }
    let rows = labels.len();
    let csv_bytes = std::fs::metadata(&csv_path)?.len() as f64;
    let (xp, yp) = (tmp.path().join("x.npy"), tmp.path().join("y.npy"));
    npy(&xp, "<f4", &format!("{rows}, {COLUMNS}"), &feats.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    npy(&yp, "<i8", &format!("{rows},"), &labels.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let npy_bytes = (std::fs::metadata(&xp)?.len() + std::fs::metadata(&yp)?.len()) as f64;
    drop((feats, labels));
    eprintln!("append: {rows} rows; CSV {:.0} MB, npy {:.0} MB", csv_bytes / 1e6, npy_bytes / 1e6);

    // shoal: a small first slice, then the big slices appended (schema, stats, drift, shards).
    run(&shoal, &["up", "--workers", "0"], &dir)?;
    let small = tmp.path().join("first.csv");
    std::fs::write(&small, std::fs::read_to_string(&csv_path)?.lines().take(1001).collect::<Vec<_>>().join("\n") + "\n")?;
    let result = (|| -> Result<(f64, f64)> {
        run(&shoal, &["data", "import", "t", "--label", "label", small.to_str().unwrap()], &dir)?;
        let csv = run(&shoal, &["data", "append", "t", "--label", "label", csv_path.to_str().unwrap()], &dir)?;
        let npy = run(&shoal, &["data", "append", "t", xp.to_str().unwrap(), yp.to_str().unwrap()], &dir)?;
        Ok((csv, npy))
    })();
    let _ = run(&shoal, &["down"], &dir);
    let (csv_s, npy_s) = result?;

    // The peers, reading the same files.
    let script = format!(
        "import time, pandas, numpy\nt = time.time(); d = pandas.read_csv({:?}); c = time.time() - t\nt = time.time(); x = numpy.load({:?}); y = numpy.load({:?}); n = time.time() - t\nprint(c, n, len(d))",
        csv_path.display().to_string(),
        xp.display().to_string(),
        yp.display().to_string()
    );
    let peer = Command::new(&python).args(["-c", &script]).output();
    let (pd_s, np_s) = match peer {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            let v: Vec<f64> = out.split_whitespace().filter_map(|t| t.parse().ok()).collect();
            (v.first().copied(), v.get(1).copied())
        }
        Ok(o) => {
            eprintln!("append: the peer failed: {}", String::from_utf8_lossy(&o.stderr));
            (None, None)
        }
        Err(e) => {
            eprintln!("append: no peer ({}): {e}", python.display());
            (None, None)
        }
    };
    let show = |what: &str, s: f64, bytes: f64| println!("{what:<34} {:>8.2} s {:>10.0} records/s {:>8.1} MB/s", s, rows as f64 / s, bytes / s / 1e6);
    show("shoal data append (CSV)", csv_s, csv_bytes);
    if let Some(p) = pd_s {
        show("pandas.read_csv", p, csv_bytes);
        println!("ratio shoal/pandas (records/s): {:.2}", p / csv_s);
    }
    show("shoal data append (npy)", npy_s, npy_bytes);
    if let Some(n) = np_s {
        show("numpy.load", n, npy_bytes);
        println!("ratio shoal/numpy (records/s): {:.2}", n / npy_s);
    }
    Ok(())
}
