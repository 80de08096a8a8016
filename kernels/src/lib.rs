//! Numeric hot paths that candle does not give: element-wise reductions for collectives and
//! fused optimizer updates over flat f32 buffers. CPU code uses rayon over fixed-size chunks,
//! and every operation is element-wise, so results do not depend on the thread count: that is
//! what keeps workers bitwise identical. CUDA is behind the `cuda` feature.

/// `$name(args)` runs `$body(args)` compiled for the best instruction set this CPU has. The
/// bodies use IEEE operations and integer operations only (no library calls; `mul_add` is a
/// fused multiply-add, correctly rounded, so it is one instruction in both vector versions and
/// the same bits in the baseline's software `fmaf`), so every version gives the same bits;
/// `$body` must be `#[inline(always)]`, so each version inlines it under its own target
/// features.
macro_rules! versions {
    ($name:ident => $body:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                let fma = std::is_x86_feature_detected!("fma");
                if fma && $crate::simd_allows($crate::Simd::Avx512) && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the CPU has the features the version is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if fma && $crate::simd_allows($crate::Simd::Avx2) && std::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// An instruction-set level of the element-wise kernels' versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Baseline = 1,
    Avx2 = 2,
    Avx512 = 3,
}

/// 0: not read yet; else a `Simd` as u8.
static SIMD_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The widest version the element-wise kernels (and the collectives' loops) may pick: what
/// the CPU has, capped by `SHOAL_SIMD` (`avx512`, `avx2` or `baseline`; read once). Every
/// version gives the same bits, so a cap changes the speed only: it lets one machine measure
/// the narrower paths and test that they agree. (The GEMMs pick their own.)
pub fn simd_cap() -> Simd {
    use std::sync::atomic::Ordering;
    let level = |v: u8| match v {
        1 => Simd::Baseline,
        2 => Simd::Avx2,
        _ => Simd::Avx512,
    };
    match SIMD_CAP.load(Ordering::Relaxed) {
        0 => {
            let cap = match std::env::var("SHOAL_SIMD").as_deref() {
                Ok("baseline") => Simd::Baseline,
                Ok("avx2") => Simd::Avx2,
                _ => Simd::Avx512,
            };
            // A cap set meanwhile (set_simd_cap) wins.
            let _ = SIMD_CAP.compare_exchange(0, cap as u8, Ordering::Relaxed, Ordering::Relaxed);
            level(SIMD_CAP.load(Ordering::Relaxed))
        }
        v => level(v),
    }
}

/// Sets the cap for this process (tests and benchmarks that compare the versions).
pub fn set_simd_cap(cap: Simd) {
    SIMD_CAP.store(cap as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Whether versions up to `level` may run.
#[inline]
pub fn simd_allows(level: Simd) -> bool {
    simd_cap() >= level
}

pub mod attention;
pub mod lanes;
pub mod layers;
pub mod nn;
mod conv512;
mod pool512;
pub mod winograd;

use rayon::prelude::*;

/// Elements per rayon task: large enough to amortise scheduling, small enough to spread.
const CHUNK: usize = 1 << 15;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("buffer lengths differ: {0} vs {1}")]
    LengthMismatch(usize, usize),
    #[error("device {0:?} is not available: this build has no CUDA support (rebuild with `--features cuda`)")]
    NoCuda(String),
    #[error("unknown device {0:?} (expected \"cpu\" or \"cuda[:N]\")")]
    UnknownDevice(String),
    #[error("{0}")]
    Shape(String),
}

/// Where tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` or `cuda:N`; CUDA on a build without it is a typed error.
    pub fn parse(s: &str) -> Result<Device, KernelError> {
        let dev = match s {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => Device::Cuda(0),
            _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::Cuda(n),
                None => return Err(KernelError::UnknownDevice(s.to_string())),
            },
        };
        if cfg!(feature = "cuda") {
            Ok(dev)
        } else {
            Err(KernelError::NoCuda(s.to_string()))
        }
    }
}

fn same_len(a: usize, b: usize) -> Result<(), KernelError> {
    if a == b {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch(a, b))
    }
}

/// `dst[i] += src[i]`.
pub fn add_assign(dst: &mut [f32], src: &[f32]) -> Result<(), KernelError> {
    same_len(dst.len(), src.len())?;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += *s;
        }
    });
    Ok(())
}

/// `dst[i] *= s`.
pub fn scale(dst: &mut [f32], s: f32) {
    dst.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|x| *x *= s));
}

/// SGD with momentum and (coupled) weight decay, PyTorch semantics:
/// `g += wd * p; v = mu * v + g; p -= lr * v` (plain SGD when `momentum == 0`).
pub fn sgd_momentum(
    params: &mut [f32],
    grads: &[f32],
    velocity: &mut [f32],
    lr: f32,
    momentum: f32,
    weight_decay: f32,
) -> Result<(), KernelError> {
    same_len(params.len(), grads.len())?;
    same_len(params.len(), velocity.len())?;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(velocity.par_chunks_mut(CHUNK))
        .for_each(|((p, g), v)| sgd_momentum_best(p, g, v, lr, momentum, weight_decay));
    Ok(())
}

/// One chunk of `sgd_momentum`: separate products and sums, so every version gives the same
/// bits (it was compiled for the SSE2 baseline only: a sixth of a 4-rank step on 2 cores).
#[inline(always)]
fn sgd_momentum_body(p: &mut [f32], g: &[f32], v: &mut [f32], lr: f32, momentum: f32, weight_decay: f32) {
    for ((p, g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
        let g = *g + weight_decay * *p;
        *v = momentum * *v + g;
        *p -= lr * *v;
    }
}

versions!(sgd_momentum_best => sgd_momentum_body(p: &mut [f32], g: &[f32], v: &mut [f32], lr: f32, momentum: f32, weight_decay: f32));

/// AdamW (decoupled weight decay), PyTorch semantics; `step` counts from 1.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
) -> Result<(), KernelError> {
    same_len(params.len(), grads.len())?;
    same_len(params.len(), m.len())?;
    same_len(params.len(), v.len())?;
    let t = step.max(1) as i32;
    let bias1 = 1.0 - beta1.powi(t);
    let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
    let step_size = lr / bias1;
    let decay = 1.0 - lr * weight_decay;
    let k = AdamConstants { beta1, beta2, eps, bias2_sqrt, step_size, decay };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| adamw_best(p, g, m, v, &k));
    Ok(())
}

struct AdamConstants {
    beta1: f32,
    beta2: f32,
    eps: f32,
    bias2_sqrt: f32,
    step_size: f32,
    decay: f32,
}

/// One chunk of `adamw`: separate products and correctly rounded `sqrt` and divisions, as
/// PyTorch's for-each path writes them, so every instruction set gives the same bits.
#[inline(always)]
fn adamw_body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConstants) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p *= k.decay;
        *m = k.beta1 * *m + (1.0 - k.beta1) * *g;
        *v = k.beta2 * *v + (1.0 - k.beta2) * *g * *g;
        let denom = v.sqrt() / k.bias2_sqrt + k.eps;
        *p -= k.step_size * *m / denom;
    }
}

versions!(adamw_best => adamw_body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConstants));

/// Floats checked per block by `first_non_finite`: 16 KiB, so a bad block is searched while
/// it is still in L1.
const FINITE_BLOCK: usize = 4096;

/// The sum of the squares of `x`, in f64 (a gradient's squared L2 norm).
pub fn sum_squares(x: &[f32]) -> f64 {
    // Eight running sums in a fixed order (element i goes to sum i % 8), added pairwise at the
    // end: the same bits on every machine and any target features (no reassociation).
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (*v as f64) * (*v as f64);
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += (*v as f64) * (*v as f64);
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// The index of the first NaN or infinity in `x`, if any. Each block is checked by a
/// branch-free reduction (the largest magnitude bit pattern: NaN and infinity have every
/// exponent bit set, so they are the patterns at or above +infinity's), which vectorizes;
/// only a block that holds a bad value is searched element by element. Compiled for AVX-512,
/// AVX2 and the baseline, picked at run time: one read of the buffer at memory speed.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    #[inline(always)]
    fn body(x: &[f32]) -> Option<usize> {
        for (b, block) in x.chunks(FINITE_BLOCK).enumerate() {
            let worst = block.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
            if worst >= f32::INFINITY.to_bits() {
                return block.iter().position(|v| !v.is_finite()).map(|i| b * FINITE_BLOCK + i);
            }
        }
        None
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx2")]
        unsafe fn avx512(x: &[f32]) -> Option<usize> {
            body(x)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(x: &[f32]) -> Option<usize> {
            body(x)
        }
        if simd_allows(Simd::Avx512) && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has the features the version is compiled for.
            return unsafe { avx512(x) };
        }
        if simd_allows(Simd::Avx2) && std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { avx2(x) };
        }
    }
    body(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every version the CPU has (and the baseline, with its software fused multiply-add)
    /// gives the same bits: GELU and its gradient, layer norm both ways, causal attention
    /// (its softmax's exp), AdamW, SGD and the finite check. Other tests running meanwhile see
    /// the cap move, which by the same property changes nothing for them.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut s = 9u64;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut x: Vec<f32> = (0..70_001).map(|_| (next() - 0.5) * 16.0).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 3.0e38, f32::MIN_POSITIVE]);
        let n = x.len();
        let run = || -> Vec<u8> {
            let mut out: Vec<f32> = Vec::new();
            let mut y = vec![0.0; n];
            layers::gelu(&x, &mut y);
            out.extend(&y);
            layers::gelu_backward(&x, &x, &mut y);
            out.extend(&y);
            let g = layers::Groups::dense(n / 41, 41);
            let span = (n / 41) * 41;
            let (gamma, beta) = (vec![1.25f32; 41], vec![-0.5f32; 41]);
            let (mut ln, mut mean, mut rstd) = (vec![0.0; span], vec![0.0; g.rows], vec![0.0; g.rows]);
            layers::layernorm(&x[..span], &g, &gamma, &beta, 1e-5, &mut ln, &mut mean, &mut rstd).unwrap();
            let (mut dx, mut dg, mut db) = (vec![0.0; span], vec![0.0; 41], vec![0.0; 41]);
            layers::layernorm_backward(&x[1..span + 1], &x[..span], &g, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db).unwrap();
            out.extend(ln.iter().chain(&dx).chain(&dg).chain(&db).chain(&mean).chain(&rstd));
            let (recs, t, heads, d) = (2, 40, 2, 8);
            let qkv: Vec<f32> = x[..recs * t * 3 * d].iter().map(|v| v * 0.25).collect();
            let (mut probs, mut att) = (vec![0.0; recs * heads * t * t], vec![0.0; recs * t * d]);
            attention::causal_attention(&qkv, recs, t, heads, d, &mut probs, &mut att).unwrap();
            out.extend(probs.iter().chain(&att));
            let (mut p, mut m, mut v) = (x.clone(), vec![0.1f32; n], vec![0.2f32; n]);
            adamw(&mut p, &x, &mut m, &mut v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01).unwrap();
            out.extend(p.iter().chain(&m).chain(&v));
            let (mut p, mut vel) = (x.clone(), vec![0.3f32; n]);
            sgd_momentum(&mut p, &x, &mut vel, 0.05, 0.9, 1e-4).unwrap();
            out.extend(p.iter().chain(&vel));
            let bad = first_non_finite(&[1.0, f32::NAN, 2.0]).map(|i| i as f32).unwrap_or(-1.0);
            out.push(bad);
            out.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect()
        };
        let mut seen: Vec<(Simd, Vec<u8>)> = Vec::new();
        for cap in [Simd::Baseline, Simd::Avx2, Simd::Avx512] {
            set_simd_cap(cap);
            seen.push((cap, run()));
        }
        set_simd_cap(Simd::Avx512);
        for (cap, bytes) in &seen[1..] {
            let first = bytes.iter().zip(&seen[0].1).position(|(a, b)| a != b);
            assert_eq!(first, None, "{cap:?} differs from the baseline at byte {first:?}");
        }
    }

    #[test]
    fn add_and_scale() {
        let mut a: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let b = vec![1.0f32; 100_000];
        add_assign(&mut a, &b).unwrap();
        scale(&mut a, 0.5);
        assert_eq!(a[0], 0.5);
        assert_eq!(a[99_999], 50_000.0);
        assert!(add_assign(&mut a, &b[..10]).is_err());
    }

    #[test]
    fn sgd_momentum_matches_reference() {
        let mut p = vec![1.0f32, -2.0];
        let mut v = vec![0.0f32; 2];
        let g = [0.5f32, 0.25];
        sgd_momentum(&mut p, &g, &mut v, 0.1, 0.9, 0.0).unwrap();
        assert_eq!(p, vec![1.0 - 0.05, -2.0 - 0.025]);
        sgd_momentum(&mut p, &g, &mut v, 0.1, 0.9, 0.0).unwrap();
        // v = 0.9 * 0.5 + 0.5 = 0.95
        assert!((p[0] - (0.95 - 0.095)).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // On step 1, m_hat = g and v_hat = g^2, so the update is lr * sign(g) (eps aside).
        let mut p = vec![1.0f32, 1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        adamw(&mut p, &[3.0, -0.2], &mut m, &mut v, 1, 0.01, 0.9, 0.999, 1e-8, 0.0).unwrap();
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] - 1.01).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn cuda_without_feature_is_a_typed_error() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert!(matches!(Device::parse("tpu"), Err(KernelError::UnknownDevice(_))));
        if !cfg!(feature = "cuda") {
            assert!(matches!(Device::parse("cuda:0"), Err(KernelError::NoCuda(_))));
        }
    }

    #[test]
    fn first_non_finite_finds_nan_and_infinities_anywhere() {
        let mut x: Vec<f32> = (0..3 * FINITE_BLOCK + 17).map(|i| (i as f32 - 5000.0) * 1e30).collect();
        x[0] = f32::MAX;
        x[1] = -f32::MAX;
        x[2] = f32::MIN_POSITIVE / 8.0;
        assert_eq!(first_non_finite(&x), None, "the largest finite values and denormals are finite");
        assert_eq!(first_non_finite(&[]), None);
        for (at, bad) in [(0, f32::NAN), (FINITE_BLOCK - 1, f32::INFINITY), (FINITE_BLOCK, f32::NEG_INFINITY), (x.len() - 1, -f32::NAN)] {
            let mut y = x.clone();
            y[at] = bad;
            // A later bad value does not hide the first.
            y[x.len() - 1] = f32::NAN;
            assert_eq!(first_non_finite(&y), Some(at), "{bad} at {at}");
        }
    }
}
