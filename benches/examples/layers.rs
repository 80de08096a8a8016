//! Per layer kind: forward and backward time of each layer of a `Sequential`, as GFLOP/s for
//! the layers that multiply matrices (linear, conv2d) against the machine's gemm peak
//! measured in the same run, and as GB/s of activations for the others, so the slow layer is
//! visible.
//!
//!     cargo run --release -p shoal-benches --example layers -- [--batch N] [--steps N] [--threads T]
//!
//! Three models: the 3-conv-block CNN of the benchmark (examples/mnist-cnn3.toml, on MNIST's
//! [1, 28, 28]), a list holding every other layer kind on [3, 32, 32] records, and the GPT of
//! benches/gpt.sh (batch = sequences of 128 tokens; the attention kernels' share printed). Each runs
//! `steps` training passes (forward, loss, backward) of `batch` records on `threads` threads
//! (default 1: a worker's share of the cores when 2 workers share 2), after 3 warm-up passes.
//! A ReLU right after a linear or conv2d layer runs inside it (fused) and counts there.
//! The peak: `kernels::nn::matmul` of 512 x 512 by 512 x 512 on the same threads.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_core::model::{Head, Layout, LayerShape};
use shoal_core::rng::SplitMix64;
use shoal_core::spec::LayerSpec;
use shoal_core::JobSpec;
use shoal_worker::model::{Batch, Model, Sequential};

const USAGE: &str = "usage: layers [--batch N] [--steps N] [--threads T]
  --batch N    records per pass (default 64)
  --steps N    timed passes (default 20)
  --threads T  compute threads (default 1)";

/// Every layer kind but conv2d's ReLU fusion partner, on [3, 32, 32] records.
const OTHERS: &str = r#"
name = "layer-kinds"
[[model.layers]]
kind = "conv2d"
out = 16
kernel = 5
stride = 1
padding = 2
[[model.layers]]
kind = "gelu"
[[model.layers]]
kind = "avgpool2d"
kernel = 2
[[model.layers]]
kind = "relu"
[[model.layers]]
kind = "layernorm"
over = "chw"
[[model.layers]]
kind = "maxpool2d"
kernel = 2
[[model.layers]]
kind = "tanh"
[[model.layers]]
kind = "dropout"
p = 0.1
[[model.layers]]
kind = "flatten"
[[model.layers]]
kind = "linear"
out = 256
[[model.layers]]
kind = "sigmoid"
[[model.layers]]
kind = "layernorm"
[[model.layers]]
kind = "linear"
out = 10
"#;

/// The GPT of the benchmark (benches/gpt.sh) on text windows of 128 + 1 tokens.
const GPT: &str = "name = \"gpt\"\n[model]\nkind = \"gpt\"\nblocks = 4\nheads = 4\nd_model = 256\ncontext = 128\n";

const TAIL: &str = "[dataset]\nname = \"bench\"\ntrain = [0, 1000]\n[training]\nepochs = 1\nbatch_size = 64\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.01\n";

fn main() -> Result<()> {
    let (mut batch, mut steps, mut threads) = (64usize, 20usize, 1usize);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"))?.parse::<usize>().with_context(|| format!("{name} takes a positive number"));
        match arg.as_str() {
            "--batch" => batch = value("--batch")?,
            "--steps" => steps = value("--steps")?,
            "--threads" => threads = value("--threads")?,
            other => return Err(shoal_benches::other_argument(other, USAGE)),
        }
    }
    if batch == 0 || steps == 0 || threads == 0 {
        bail!("--batch, --steps and --threads must be at least 1");
    }
    let pool = rayon_pool(threads)?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cnn3 = std::fs::read_to_string(root.join("examples/mnist-cnn3.toml")).context("reading examples/mnist-cnn3.toml")?;
    let cnn3 = cnn3[..cnn3.find("[dataset]").context("examples/mnist-cnn3.toml has no [dataset]")?].to_string() + TAIL;

    let peak = pool.install(gemm_peak)?;
    println!("layers: batch {batch}, {steps} timed passes, {threads} thread(s); gemm peak {peak:.1} GFLOP/s (512^3, kernels::nn::matmul)");
    let tokens = Head::Tokens { vocab: 256, context: 128 };
    for (title, text, shape, head) in [
        ("3-conv-block CNN (examples/mnist-cnn3.toml)", cnn3.as_str(), vec![28u64, 28], Head::Classes(10)),
        ("every other layer kind", &(OTHERS.to_string() + TAIL), vec![3, 32, 32], Head::Classes(10)),
        ("GPT: 4 blocks, d_model 256, 4 heads, context 128 (benches/gpt.sh)", &(GPT.to_string() + TAIL), vec![129], tokens),
    ] {
        let spec = JobSpec::parse(text).with_context(|| format!("the {title} spec"))?;
        let layout = Layout::new(&spec.model, &shape, head).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (times, attention) = pool.install(|| time_passes(&spec, &shape, head, batch, steps))?;
        println!();
        println!("{title}");
        println!("{:>3} {:<10} {:<16} {:>9} {:>9} {:>9} {:>10} {:>8}", "#", "kind", "output", "fwd ms", "bwd ms", "GFLOP/s", "% of gemm", "GB/s");
        let mut total = Duration::ZERO;
        let mut notes = false;
        for ((i, f, b), l) in times.iter().zip(&layout.shapes) {
            let (f, b) = (*f / steps as u32, *b / steps as u32);
            total += f + b;
            let secs = (f + b).as_secs_f64();
            let fused = i.checked_sub(1).and_then(|p| layout.shapes.get(p)).is_some_and(|p| matches!(l.layer, LayerSpec::Relu) && matches!(p.layer, LayerSpec::Linear { .. } | LayerSpec::Conv2d { .. }));
            // conv2d + ReLU + 2x2 max pool run as one: the pool's forward pass is inside the
            // convolution's time, so its GB/s counts its backward pass alone.
            let pool_in_conv = matches!(l.layer, LayerSpec::MaxPool2d { kernel: 2, stride: None | Some(2) })
                && i.checked_sub(2).and_then(|p| layout.shapes.get(p)).is_some_and(|p| matches!(p.layer, LayerSpec::Conv2d { .. }))
                && matches!(layout.shapes.get(i - 1).map(|p| &p.layer), Some(LayerSpec::Relu));
            let bytes = if pool_in_conv { activation_bytes(l, batch) / 2.0 / b.as_secs_f64().max(1e-12) } else { activation_bytes(l, batch) / secs.max(1e-12) } / 1e9;
            let gflops = flops(l, batch) / secs.max(1e-12) / 1e9;
            notes |= pool_in_conv;
            let (g, pct, gb) = match flops(l, batch) > 0.0 {
                true => (format!("{gflops:.1}"), format!("{:.0}%", 100.0 * gflops / peak), "-".to_string()),
                false if fused => ("-".into(), "-".into(), "(fused)".into()),
                false => ("-".into(), "-".into(), format!("{bytes:.1}")),
            };
            let kind = if pool_in_conv { format!("{}*", l.kind()) } else { l.kind().to_string() };
            println!("{:>3} {:<10} {:<16} {:>9.3} {:>9.3} {:>9} {:>10} {:>8}", i, kind, format!("{:?}", l.output), f.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3, g, pct, gb);
        }
        if notes {
            println!("    * its forward pass runs inside the convolution before it (conv2d + ReLU + 2x2 max pool fused)");
        }
        println!("    total {:.3} ms a pass of {batch} records ({:.0} records/s)", total.as_secs_f64() * 1e3, batch as f64 / total.as_secs_f64());
        if let Head::Tokens { context, .. } = head {
            let (f, b, g) = (attention[0] / steps as u32, attention[1] / steps as u32, attention[2] / steps as u32);
            let gemm: f64 = layout.shapes.iter().map(|l| flops(l, batch)).sum();
            println!(
                "    attention kernels: {:.3} ms forward, {:.3} ms backward ({:.0}% of the pass); {:.0} tokens/s",
                f.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                100.0 * (f + b).as_secs_f64() / total.as_secs_f64(),
                (batch as u64 * context) as f64 / total.as_secs_f64(),
            );
            println!(
                "    GEMMs (nn::matmul): {:.3} ms ({:.0}% of the pass), {:.1} GFLOP at {:.1} GFLOP/s = {:.0}% of the gemm peak",
                g.as_secs_f64() * 1e3,
                100.0 * g.as_secs_f64() / total.as_secs_f64(),
                gemm / 1e9,
                gemm / g.as_secs_f64().max(1e-12) / 1e9,
                100.0 * gemm / g.as_secs_f64().max(1e-12) / 1e9 / peak
            );
        }
    }
    Ok(())
}

fn rayon_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building the thread pool")
}

/// Matrix-multiply FLOPs of a layer's forward and backward passes over `n` records (0 for a
/// layer that does not multiply matrices). Backward: the weight gradient and the input's.
/// A convolution counts the multiplications of its definition (what im2col + GEMM does):
/// Winograd's path does fewer, so it can show more than the gemm peak.
fn flops(l: &LayerShape, n: usize) -> f64 {
    let n = n as f64;
    let prod = |s: &[u64]| s.iter().product::<u64>() as f64;
    match &l.layer {
        LayerSpec::Linear { out, .. } => 3.0 * 2.0 * n * prod(&l.input) * *out as f64,
        // Its four linear maps (qkv, proj, the MLP's two) at every position; not attention.
        LayerSpec::TransformerBlock { mlp_ratio, .. } => {
            let (t, d) = (l.input[0] as f64, l.input[1] as f64);
            3.0 * 2.0 * n * t * (3.0 * d * d + d * d + 2.0 * d * d * *mlp_ratio as f64)
        }
        LayerSpec::Conv2d { out, kernel, .. } => {
            let (c, pixels) = (l.input[0] as f64, prod(&l.output[1..]));
            3.0 * 2.0 * n * *out as f64 * c * (*kernel * *kernel) as f64 * pixels
        }
        _ => 0.0,
    }
}

/// Bytes a layer reads and writes in its two passes: input and output, forward and back.
fn activation_bytes(l: &LayerShape, n: usize) -> f64 {
    let values = l.input.iter().product::<u64>() + l.output.iter().product::<u64>();
    2.0 * 4.0 * n as f64 * values as f64
}

/// Per layer: (index, forward, backward).
type LayerTimes = Vec<(usize, Duration, Duration)>;

/// Per layer: forward and backward time summed over `steps` passes; and the time in the
/// attention kernels (forward, backward) and in `nn::matmul` over those passes.
fn time_passes(spec: &JobSpec, shape: &[u64], head: Head, n: usize, steps: usize) -> Result<(LayerTimes, [Duration; 3])> {
    let mut seq = Sequential::new(&spec.model, shape, head, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut params = seq.layout().init(1);
    let mut grads = vec![0f32; params.len()];
    let mut rng = SplitMix64::new(5);
    let (x, labels): (Vec<f32>, Vec<u32>) = match head {
        // Token ids in, the next token at each position out.
        Head::Tokens { context, .. } => ((0..n * context as usize).map(|_| rng.below(256) as f32).collect(), (0..n * context as usize).map(|_| rng.below(256) as u32).collect()),
        _ => {
            let features: usize = shape.iter().product::<u64>() as usize;
            ((0..n * features).map(|_| rng.next_f32()).collect(), (0..n).map(|i| (i % 10) as u32).collect())
        }
    };
    let records: Vec<u64> = (0..n as u64).collect();
    let mut attention_before = [Duration::ZERO; 2];
    let mut gemm_before = Duration::ZERO;
    shoal_kernels::nn::time_gemm(true);
    for step in 0..3 + steps {
        if step == 3 {
            seq.start_profile();
            attention_before = seq.attention_time();
            gemm_before = shoal_kernels::nn::gemm_time();
        }
        let batch = Batch { x: &x, labels: &labels, targets: &[], records: &records, step: step as u64 };
        seq.forward_backward(&mut params, &batch, 1.0, &mut grads, &[0], &mut |_, _| {}).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let after = seq.attention_time();
    let gemm = shoal_kernels::nn::gemm_time() - gemm_before;
    shoal_kernels::nn::time_gemm(false);
    Ok((seq.profile(), [after[0] - attention_before[0], after[1] - attention_before[1], gemm]))
}

/// GFLOP/s of a 512^3 matrix product, best of 5 rounds of 4.
fn gemm_peak() -> Result<f64> {
    let d = 512;
    let mut rng = SplitMix64::new(9);
    let a: Vec<f32> = (0..d * d).map(|_| rng.next_f32()).collect();
    let b: Vec<f32> = (0..d * d).map(|_| rng.next_f32()).collect();
    let mut c = vec![0f32; d * d];
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..4 {
            shoal_kernels::nn::matmul(&mut c, &a, &b, d, d, d, false, false, false)?;
        }
        best = best.min(t.elapsed() / 4);
    }
    Ok(2.0 * (d * d * d) as f64 / best.as_secs_f64() / 1e9)
}
