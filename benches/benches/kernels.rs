//! Kernel micro-benchmarks: shoal_kernels' fused optimizer updates and the gradient reduction on
//! a buffer the size of the demo MLP's parameters (784-512-256-10: 535,818 f32), each against a
//! naive scalar single-thread loop of the same math.
//!
//!     cargo bench -p shoal-benches --bench kernels
//!
//! The kernels use rayon (all cores unless RAYON_NUM_THREADS says otherwise); in a `shoal up`
//! cluster each worker runs with cores / workers threads.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// 784*512 + 512 + 512*256 + 256 + 256*10 + 10.
const N: usize = 535_818;

fn buf(seed: u32) -> Vec<f32> {
    // Small, varied, deterministic values (no denormals, no zeros to skip).
    (0..N).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5).collect()
}

fn naive_sgd(params: &mut [f32], grads: &[f32], velocity: &mut [f32], lr: f32, momentum: f32, wd: f32) {
    for i in 0..params.len() {
        let g = grads[i] + wd * params[i];
        velocity[i] = momentum * velocity[i] + g;
        params[i] -= lr * velocity[i];
    }
}

#[allow(clippy::too_many_arguments)]
fn naive_adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: u64, lr: f32, b1: f32, b2: f32, eps: f32, wd: f32) {
    let t = step.max(1) as i32;
    let bias1 = 1.0 - b1.powi(t);
    let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let denom = v[i].sqrt() / bias2_sqrt + eps;
        p[i] -= (lr / bias1) * m[i] / denom;
    }
}

fn naive_add(dst: &mut [f32], src: &[f32]) {
    for i in 0..dst.len() {
        dst[i] += src[i];
    }
}

fn kernels(c: &mut Criterion) {
    let grads = buf(1);

    let mut g = c.benchmark_group("sgd_momentum");
    g.throughput(Throughput::Elements(N as u64));
    let (mut p, mut v) = (buf(2), vec![0.0f32; N]);
    g.bench_function(BenchmarkId::new("shoal_kernels", N), |b| {
        b.iter(|| shoal_kernels::sgd_momentum(black_box(&mut p), black_box(&grads), black_box(&mut v), 0.05, 0.9, 0.0).unwrap())
    });
    let (mut p, mut v) = (buf(2), vec![0.0f32; N]);
    g.bench_function(BenchmarkId::new("naive_scalar", N), |b| {
        b.iter(|| naive_sgd(black_box(&mut p), black_box(&grads), black_box(&mut v), 0.05, 0.9, 0.0))
    });
    g.finish();

    let mut g = c.benchmark_group("adamw");
    g.throughput(Throughput::Elements(N as u64));
    let (mut p, mut m, mut v) = (buf(3), vec![0.0f32; N], vec![0.0f32; N]);
    g.bench_function(BenchmarkId::new("shoal_kernels", N), |b| {
        b.iter(|| {
            shoal_kernels::adamw(black_box(&mut p), black_box(&grads), black_box(&mut m), black_box(&mut v), 10, 1e-3, 0.9, 0.999, 1e-8, 0.01)
                .unwrap()
        })
    });
    let (mut p, mut m, mut v) = (buf(3), vec![0.0f32; N], vec![0.0f32; N]);
    g.bench_function(BenchmarkId::new("naive_scalar", N), |b| {
        b.iter(|| naive_adamw(black_box(&mut p), black_box(&grads), black_box(&mut m), black_box(&mut v), 10, 1e-3, 0.9, 0.999, 1e-8, 0.01))
    });
    g.finish();

    // Sums stay bounded: adding the same +-0.5 values a few thousand times cannot overflow.
    let mut g = c.benchmark_group("add_assign");
    g.throughput(Throughput::Elements(N as u64));
    let mut d = buf(4);
    g.bench_function(BenchmarkId::new("shoal_kernels", N), |b| {
        b.iter(|| shoal_kernels::add_assign(black_box(&mut d), black_box(&grads)).unwrap())
    });
    let mut d = buf(4);
    g.bench_function(BenchmarkId::new("naive_scalar", N), |b| b.iter(|| naive_add(black_box(&mut d), black_box(&grads))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = kernels
}
criterion_main!(benches);
