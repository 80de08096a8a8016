//! The layers of shoal's models over flat, row-major f32 buffers, forward and backward: GEMM
//! (the `gemm` crate, called directly on the caller's buffers), bias and ReLU fused in one
//! pass, softmax cross-entropy, and 3x3 convolutions as im2col + GEMM with 2x2 max-pooling
//! that remembers where each maximum was. Every function writes into buffers it is given:
//! nothing here allocates, so a training step allocates nothing.
//!
//! Convolution buffers are channel-major, `[C][N][H][W]`: then a whole batch of one layer is
//! one GEMM, `[O, C*9] x [C*9, N*H*W]`.

use crate::KernelError;

fn check(what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len < want {
        return Err(KernelError::Shape(format!("{what}: {len} elements, need {want}")));
    }
    Ok(())
}

/// Time spent in `matmul` while `time_gemm(true)` (benchmarks: the GEMMs' share of a step).
static GEMM_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static GEMM_TIMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts (or stops) adding the time of every `matmul` call to `gemm_time`.
pub fn time_gemm(on: bool) {
    GEMM_TIMED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The time `matmul` took while timed.
pub fn gemm_time() -> std::time::Duration {
    std::time::Duration::from_nanos(GEMM_NANOS.load(std::sync::atomic::Ordering::Relaxed))
}

pub(crate) fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `c[m×n] = op(a)[m×k] · op(b)[k×n]` (`+=` when `accumulate`), row-major. `a` is stored
/// `[m, k]`, or `[k, m]` when `ta`; `b` is `[k, n]`, or `[n, k]` when `tb`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool) -> Result<(), KernelError> {
    check("matmul output", c.len(), m * n)?;
    check("matmul lhs", a.len(), m * k)?;
    check("matmul rhs", b.len(), k * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return Ok(());
    }
    let started = GEMM_TIMED.load(std::sync::atomic::Ordering::Relaxed).then(std::time::Instant::now);
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the lengths were checked above against the strides given: every element gemm
    // reads or writes lies inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
    if let Some(t) = started {
        GEMM_NANOS.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// `z[r][j] += bias[j]` for every row, then ReLU if `relu`.
pub fn bias_act(z: &mut [f32], bias: &[f32], relu: bool) {
    bias_act_best(z, bias, relu)
}

versions!(bias_act_best => bias_act_body(z: &mut [f32], bias: &[f32], relu: bool));

#[inline(always)]
fn bias_act_body(z: &mut [f32], bias: &[f32], relu: bool) {
    let width = bias.len();
    for row in z.chunks_exact_mut(width) {
        for (v, b) in row.iter_mut().zip(bias) {
            let x = *v + *b;
            *v = if relu && x < 0.0 { 0.0 } else { x };
        }
    }
}

/// Channel-major variant: `z[o][i] += bias[o]` for `plane` elements per channel, then ReLU.
pub fn bias_act_planes(z: &mut [f32], bias: &[f32], plane: usize, relu: bool) {
    bias_act_planes_best(z, bias, plane, relu)
}

versions!(bias_act_planes_best => bias_act_planes_body(z: &mut [f32], bias: &[f32], plane: usize, relu: bool));

#[inline(always)]
fn bias_act_planes_body(z: &mut [f32], bias: &[f32], plane: usize, relu: bool) {
    for (row, b) in z.chunks_exact_mut(plane).zip(bias) {
        for v in row.iter_mut() {
            let x = *v + *b;
            *v = if relu && x < 0.0 { 0.0 } else { x };
        }
    }
}

/// `g[i] = 0` where the layer's ReLU output `a[i]` was 0 (its input was not positive).
pub fn relu_backward(g: &mut [f32], a: &[f32]) {
    relu_backward_best(g, a)
}

versions!(relu_backward_best => relu_backward_body(g: &mut [f32], a: &[f32]));

#[inline(always)]
fn relu_backward_body(g: &mut [f32], a: &[f32]) {
    // A select, not a branch: the signs are random, and the loop vectorizes.
    for (g, a) in g.iter_mut().zip(a) {
        *g = if *a > 0.0 { *g } else { 0.0 };
    }
}

/// Column sums of `g[rows][width]` into `out` (`+=` when `accumulate`): a bias gradient.
pub fn column_sums(out: &mut [f32], g: &[f32], accumulate: bool) {
    column_sums_best(out, g, accumulate)
}

versions!(column_sums_best => column_sums_body(out: &mut [f32], g: &[f32], accumulate: bool));

#[inline(always)]
fn column_sums_body(out: &mut [f32], g: &[f32], accumulate: bool) {
    if !accumulate {
        out.fill(0.0);
    }
    for row in g.chunks_exact(out.len()) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += *v;
        }
    }
}

/// Per-channel sums of `g[C][plane]` into `out[C]`: a convolution's bias gradient.
pub fn plane_sums(out: &mut [f32], g: &[f32], plane: usize) {
    plane_sums_best(out, g, plane)
}

versions!(plane_sums_best => plane_sums_body(out: &mut [f32], g: &[f32], plane: usize));

#[inline(always)]
fn plane_sums_body(out: &mut [f32], g: &[f32], plane: usize) {
    // Sixteen running sums, combined in a fixed order: the loop vectorizes and the result is
    // the same on every run (a strictly sequential sum does not vectorize).
    const LANES: usize = 16;
    for (o, row) in out.iter_mut().zip(g.chunks_exact(plane)) {
        let mut acc = [0.0f32; LANES];
        let mut blocks = row.chunks_exact(LANES);
        for b in &mut blocks {
            for (a, v) in acc.iter_mut().zip(b) {
                *a += *v;
            }
        }
        let mut total = acc.iter().sum::<f32>();
        for v in blocks.remainder() {
            total += *v;
        }
        *o = total;
    }
}

/// Mean softmax cross-entropy of `logits[n][classes]` against `labels`, times `scale`; writes
/// its gradient (times `scale`) into `grad` and returns the loss and the number of correct
/// predictions (argmax, first on ties).
pub fn softmax_xent(logits: &[f32], labels: &[u32], classes: usize, scale: f32, grad: &mut [f32]) -> Result<(f32, u64), KernelError> {
    let n = labels.len();
    check("logits", logits.len(), n * classes)?;
    check("logit gradient", grad.len(), n * classes)?;
    let mut loss = 0.0f64;
    let mut correct = 0;
    let per = scale / n.max(1) as f32;
    for (i, &y) in labels.iter().enumerate() {
        let y = y as usize;
        if y >= classes {
            return Err(KernelError::Shape(format!("label {y} is outside {classes} classes")));
        }
        let row = &logits[i * classes..(i + 1) * classes];
        let g = &mut grad[i * classes..(i + 1) * classes];
        let (mut best, mut max) = (0, row[0]);
        for (j, &v) in row.iter().enumerate() {
            if v > max {
                (best, max) = (j, v);
            }
        }
        correct += (best == y) as u64;
        let mut sum = 0.0f32;
        for (g, &v) in g.iter_mut().zip(row) {
            *g = (v - max).exp();
            sum += *g;
        }
        loss += (sum.ln() + max - row[y]) as f64;
        for g in g.iter_mut() {
            *g = *g / sum * per;
        }
        g[y] -= per;
    }
    Ok(((loss / n.max(1) as f64) as f32 * scale, correct))
}

/// im2col for a 3x3 kernel, padding 1, stride 1: `x[C][N][H][W]` to `cols[C*9][N*H*W]`.
pub fn im2col3(x: &[f32], c: usize, n: usize, h: usize, w: usize, cols: &mut [f32]) -> Result<(), KernelError> {
    im2col3_best(x, c, n, h, w, cols)
}

versions!(im2col3_best => im2col3_body(x: &[f32], c: usize, n: usize, h: usize, w: usize, cols: &mut [f32]) -> Result<(), KernelError>);

#[inline(always)]
fn im2col3_body(x: &[f32], c: usize, n: usize, h: usize, w: usize, cols: &mut [f32]) -> Result<(), KernelError> {
    let plane = h * w;
    check("im2col input", x.len(), c * n * plane)?;
    check("im2col output", cols.len(), c * 9 * n * plane)?;
    let row_len = n * plane;
    for ci in 0..c {
        for k in 0..9 {
            let (dy, dx) = (k / 3, k % 3);
            let row = &mut cols[(ci * 9 + k) * row_len..(ci * 9 + k + 1) * row_len];
            for ni in 0..n {
                let src = &x[(ci * n + ni) * plane..(ci * n + ni + 1) * plane];
                let dst = &mut row[ni * plane..(ni + 1) * plane];
                for yy in 0..h {
                    let sy = yy as isize + dy as isize - 1;
                    let out = &mut dst[yy * w..(yy + 1) * w];
                    if sy < 0 || sy >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let srow = &src[sy as usize * w..(sy as usize + 1) * w];
                    // Column shift by dx - 1, zero at the borders.
                    match dx {
                        0 => {
                            out[0] = 0.0;
                            out[1..].copy_from_slice(&srow[..w - 1]);
                        }
                        1 => out.copy_from_slice(srow),
                        _ => {
                            out[..w - 1].copy_from_slice(&srow[1..]);
                            out[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether `conv3x3` computes a 3x3 same-size convolution of `c` input channels over
/// `columns` output positions (N*H*W) directly on this CPU: AVX-512, at most 3 input channels
/// (a sum too short for im2col + GEMM), and at least 2 columns (`gemm` takes a matrix-vector
/// path, with other sums, for 1).
pub fn conv3x3_direct(c: usize, columns: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if c <= 3 && columns >= 2 && std::is_x86_feature_detected!("avx512f") {
        return true;
    }
    let _ = (c, columns);
    false
}

/// A 3x3 convolution, padding 1, stride 1, of `x[C][N][H][W]` by `w[O][C][3][3]` into
/// `z[O][N][H][W]` (no bias), directly, where `conv3x3_direct(c)`: the bits of
/// `matmul(z, w, im2col3(x))`. `pad` is scratch of `c * n * (h+2) * (w+2)` elements.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(x: &[f32], wt: &[f32], c: usize, o: usize, n: usize, h: usize, w: usize, pad: &mut [f32], z: &mut [f32]) -> Result<(), KernelError> {
    if !conv3x3_direct(c, n * h * w) {
        return Err(KernelError::Shape(format!("conv3x3: {c} input channels take im2col on this CPU")));
    }
    let (ph, pw) = (h + 2, w + 2);
    check("conv input", x.len(), c * n * h * w)?;
    check("conv weights", wt.len(), o * c * 9)?;
    check("conv output", z.len(), o * n * h * w)?;
    check("conv scratch", pad.len(), c * n * ph * pw)?;
    let pad = &mut pad[..c * n * ph * pw];
    pad.fill(0.0);
    for (plane, src) in pad.chunks_exact_mut(ph * pw).zip(x.chunks_exact(h * w)) {
        for (y, row) in src.chunks_exact(w).enumerate() {
            plane[(y + 1) * pw + 1..][..w].copy_from_slice(row);
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: conv3x3_direct checked the CPU; the lengths were checked above.
    unsafe {
        crate::conv512::conv3x3(pad, wt, c, o, n, h, w, z)
    };
    Ok(())
}

/// The adjoint of `im2col3`: adds `cols[C*9][N*H*W]` back onto `dx[C][N][H][W]`.
pub fn col2im3_add(cols: &[f32], c: usize, n: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
    col2im3_add_best(cols, c, n, h, w, dx)
}

versions!(col2im3_add_best => col2im3_add_body(cols: &[f32], c: usize, n: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError>);

#[inline(always)]
fn col2im3_add_body(cols: &[f32], c: usize, n: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
    let plane = h * w;
    check("col2im output", dx.len(), c * n * plane)?;
    check("col2im input", cols.len(), c * 9 * n * plane)?;
    let row_len = n * plane;
    for ci in 0..c {
        for k in 0..9 {
            let (dy, dxo) = (k / 3, k % 3);
            let row = &cols[(ci * 9 + k) * row_len..(ci * 9 + k + 1) * row_len];
            for ni in 0..n {
                let src = &row[ni * plane..(ni + 1) * plane];
                let dst = &mut dx[(ci * n + ni) * plane..(ci * n + ni + 1) * plane];
                for yy in 0..h {
                    let sy = yy as isize + dy as isize - 1;
                    if sy < 0 || sy >= h as isize {
                        continue;
                    }
                    let inp = &src[yy * w..(yy + 1) * w];
                    let drow = &mut dst[sy as usize * w..(sy as usize + 1) * w];
                    match dxo {
                        0 => drow[..w - 1].iter_mut().zip(&inp[1..]).for_each(|(d, v)| *d += *v),
                        1 => drow.iter_mut().zip(inp).for_each(|(d, v)| *d += *v),
                        _ => drow[1..].iter_mut().zip(&inp[..w - 1]).for_each(|(d, v)| *d += *v),
                    }
                }
            }
        }
    }
    Ok(())
}

/// 2x2 max-pooling, stride 2 (odd edges dropped, as floor), of `planes` planes of `h x w`.
/// `arg` records, per output, where in its input plane the maximum was (the first of equal
/// ones), for the backward pass.
pub fn maxpool2(x: &[f32], planes: usize, h: usize, w: usize, y: &mut [f32], arg: &mut [u32]) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        let outs = planes * (h / 2) * (w / 2);
        check("maxpool input", x.len(), planes * h * w)?;
        check("maxpool output", y.len(), outs)?;
        check("maxpool argmax", arg.len(), outs)?;
        // SAFETY: the CPU has AVX-512F and the lengths were checked.
        unsafe { crate::pool512::maxpool2(x, None, 1, false, planes, h, w, y, arg) };
        return Ok(());
    }
    maxpool2_portable(x, planes, h, w, y, arg)
}

/// The scalar `maxpool2` (CPUs without AVX-512): the fused loop with neither bias nor ReLU.
fn maxpool2_portable(x: &[f32], planes: usize, h: usize, w: usize, y: &mut [f32], arg: &mut [u32]) -> Result<(), KernelError> {
    let outs = planes * (h / 2) * (w / 2);
    check("maxpool input", x.len(), planes * h * w)?;
    check("maxpool output", y.len(), outs)?;
    check("maxpool argmax", arg.len(), outs)?;
    bias_act_maxpool2_best(x, None, false, planes, 1, h, w, y, arg);
    Ok(())
}

/// The gradient of `maxpool2`: each output's gradient goes to where its maximum was.
pub fn maxpool2_backward(dy: &[f32], arg: &[u32], planes: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
    maxpool2_backward_best(dy, arg, planes, h, w, dx)
}

versions!(maxpool2_backward_best => maxpool2_backward_body(dy: &[f32], arg: &[u32], planes: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError>);

#[inline(always)]
fn maxpool2_backward_body(dy: &[f32], arg: &[u32], planes: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
    let per = (h / 2) * (w / 2);
    check("maxpool gradient", dy.len(), planes * per)?;
    check("maxpool input gradient", dx.len(), planes * h * w)?;
    dx[..planes * h * w].fill(0.0);
    for p in 0..planes {
        let d = &mut dx[p * h * w..(p + 1) * h * w];
        for i in 0..per {
            d[arg[p * per + i] as usize] += dy[p * per + i];
        }
    }
    Ok(())
}

/// `bias_act_planes` (a ReLU alone without `bias`) then `maxpool2`, in one pass that leaves
/// `z` as it was (`[C][N][H][W]`; `y` and `arg` as `maxpool2`'s): the bits and `arg` of the
/// two passes, without writing the activations nobody reads after a fused pool.
#[allow(clippy::too_many_arguments)]
pub fn bias_act_maxpool2(z: &[f32], bias: Option<&[f32]>, relu: bool, channels: usize, n: usize, h: usize, w: usize, y: &mut [f32], arg: &mut [u32]) -> Result<(), KernelError> {
    let outs = channels * n * (h / 2) * (w / 2);
    check("pool input", z.len(), channels * n * h * w)?;
    check("pool output", y.len(), outs)?;
    check("pool argmax", arg.len(), outs)?;
    if let Some(b) = bias {
        check("bias", b.len(), channels)?;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F and the lengths were checked.
        unsafe { crate::pool512::maxpool2(z, bias, n.max(1), relu, channels * n, h, w, y, arg) };
        return Ok(());
    }
    bias_act_maxpool2_best(z, bias, relu, channels, n, h, w, y, arg);
    Ok(())
}

versions!(bias_act_maxpool2_best => bias_act_maxpool2_body(z: &[f32], bias: Option<&[f32]>, relu: bool, channels: usize, n: usize, h: usize, w: usize, y: &mut [f32], arg: &mut [u32]));

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bias_act_maxpool2_body(z: &[f32], bias: Option<&[f32]>, relu: bool, channels: usize, n: usize, h: usize, w: usize, y: &mut [f32], arg: &mut [u32]) {
    let (oh, ow) = (h / 2, w / 2);
    for c in 0..channels {
        let b = bias.map(|b| b[c]);
        let f = |v: f32| {
            let x = match b {
                Some(b) => v + b,
                None => v,
            };
            if relu && x < 0.0 { 0.0 } else { x }
        };
        for p in c * n..(c + 1) * n {
            let src = &z[p * h * w..(p + 1) * h * w];
            for oy in 0..oh {
                let (top, bottom) = (&src[2 * oy * w..2 * oy * w + w], &src[(2 * oy + 1) * w..(2 * oy + 2) * w]);
                let o = p * oh * ow + oy * ow;
                let (y_row, arg_row) = (&mut y[o..o + ow], &mut arg[o..o + ow]);
                for ox in 0..ow {
                    let base = (2 * oy * w + 2 * ox) as u32;
                    let (a, b, c, d) = (f(top[2 * ox]), f(top[2 * ox + 1]), f(bottom[2 * ox]), f(bottom[2 * ox + 1]));
                    let (m1, i1) = if b > a { (b, base + 1) } else { (a, base) };
                    let (m2, i2) = if d > c { (d, base + w as u32 + 1) } else { (c, base + w as u32) };
                    let (m, i) = if m2 > m1 { (m2, i2) } else { (m1, i1) };
                    y_row[ox] = m;
                    arg_row[ox] = i;
                }
            }
        }
    }
}

/// The gradient of `maxpool2`, written densely (each element of `dx` once, no clearing pass
/// and no scatter), with the bits of `maxpool2_backward`. With `pooled` (the pool's output,
/// when its input was a ReLU's output) it is also that ReLU's backward pass, with the bits of
/// `relu_backward` after it: a window whose maximum was not positive passes nothing.
pub fn maxpool2_backward_dense(dy: &[f32], arg: &[u32], pooled: Option<&[f32]>, planes: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
    let per = (h / 2) * (w / 2);
    check("maxpool gradient", dy.len(), planes * per)?;
    check("maxpool argmax", arg.len(), planes * per)?;
    check("maxpool input gradient", dx.len(), planes * h * w)?;
    if let Some(p) = pooled {
        check("maxpool output", p.len(), planes * per)?;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F and the lengths were checked (`arg` only picks lanes).
        unsafe { crate::pool512::maxpool2_backward(dy, arg, pooled, planes, h, w, dx) };
        return Ok(());
    }
    maxpool2_backward_dense_best(dy, arg, pooled, planes, h, w, dx);
    Ok(())
}

versions!(maxpool2_backward_dense_best => maxpool2_backward_dense_body(dy: &[f32], arg: &[u32], pooled: Option<&[f32]>, planes: usize, h: usize, w: usize, dx: &mut [f32]));

#[inline(always)]
fn maxpool2_backward_dense_body(dy: &[f32], arg: &[u32], pooled: Option<&[f32]>, planes: usize, h: usize, w: usize, dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    let per = oh * ow;
    for (p, d) in dx[..planes * h * w].chunks_exact_mut(h * w).enumerate() {
        for oy in 0..oh {
            let (top, bottom) = d[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
            let o = p * per + oy * ow;
            let (g_row, a_row) = (&dy[o..o + ow], &arg[o..o + ow]);
            for ox in 0..ow {
                // `0.0 + g`, as the scatter adds onto a cleared buffer (-0.0 becomes 0.0).
                let mut g = 0.0 + g_row[ox];
                if let Some(m) = pooled {
                    g = if m[o + ox] > 0.0 { g } else { 0.0 };
                }
                let base = (2 * oy * w + 2 * ox) as u32;
                let a = a_row[ox];
                top[2 * ox] = if a == base { g } else { 0.0 };
                top[2 * ox + 1] = if a == base + 1 { g } else { 0.0 };
                bottom[2 * ox] = if a == base + w as u32 { g } else { 0.0 };
                bottom[2 * ox + 1] = if a == base + w as u32 + 1 { g } else { 0.0 };
            }
            if w % 2 == 1 {
                top[w - 1] = 0.0;
                bottom[w - 1] = 0.0;
            }
        }
        if h % 2 == 1 {
            d[(h - 1) * w..].fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let at = |i: usize, j: usize| if ta { a[j * m + i] } else { a[i * k + j] };
        let bt = |i: usize, j: usize| if tb { b[j * k + i] } else { b[i * n + j] };
        (0..m * n).map(|ij| (0..k).map(|l| at(ij / n, l) * bt(l, ij % n)).sum()).collect()
    }

    #[test]
    fn matmul_matches_a_naive_loop_in_every_layout() {
        let (m, k, n) = (7, 13, 5);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = naive(&a, &b, m, k, n, ta, tb);
            let mut c = vec![1.0f32; m * n];
            matmul(&mut c, &a, &b, m, k, n, ta, tb, false).unwrap();
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{ta} {tb}: {x} vs {y}");
            }
            matmul(&mut c, &a, &b, m, k, n, ta, tb, true).unwrap();
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 1e-4);
            }
        }
        assert!(matmul(&mut [0.0; 3], &a, &b, m, k, n, false, false, false).is_err());
    }

    #[test]
    fn softmax_xent_of_equal_logits_is_ln_classes() {
        let mut g = vec![0.0; 6];
        let (loss, correct) = softmax_xent(&[0.0; 6], &[1, 2], 3, 1.0, &mut g).unwrap();
        assert!((loss - 3f32.ln()).abs() < 1e-6);
        assert_eq!(correct, 0, "ties go to class 0");
        assert!((g[0] - 1.0 / 6.0).abs() < 1e-6 && (g[1] + 1.0 / 3.0).abs() < 1e-6);
        assert!(softmax_xent(&[0.0; 3], &[5], 3, 1.0, &mut g).is_err());
    }

    #[test]
    fn im2col_and_col2im_are_adjoint() {
        // <im2col(x), y> == <x, col2im(y)> for any x, y.
        let (c, n, h, w) = (2, 3, 5, 4);
        let x: Vec<f32> = (0..c * n * h * w).map(|i| ((i * 31 % 17) as f32 - 8.0) / 5.0).collect();
        let y: Vec<f32> = (0..c * 9 * n * h * w).map(|i| ((i * 13 % 19) as f32 - 9.0) / 7.0).collect();
        let mut cols = vec![0.0; y.len()];
        im2col3(&x, c, n, h, w, &mut cols).unwrap();
        let mut back = vec![0.0; x.len()];
        col2im3_add(&y, c, n, h, w, &mut back).unwrap();
        let lhs: f64 = cols.iter().zip(&y).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
        // The centre tap is the input itself.
        assert_eq!(&cols[4 * n * h * w..5 * n * h * w], &x[..n * h * w]);
    }

    /// The AVX-512 pools against the scalar loops every other CPU runs, on odd and even
    /// sizes, ties, zeros of both signs and NaN.
    #[test]
    fn the_direct_convolution_has_the_bits_of_im2col_and_gemm() {
        for (c, o, n, h, w) in [(1, 32, 3, 28, 28), (3, 5, 2, 7, 33), (2, 6, 2, 4, 2), (1, 2, 2, 5, 16), (1, 16, 1, 4, 4), (3, 8, 1, 1, 16), (1, 1, 2, 5, 16), (2, 4, 1, 1, 2), (2, 4, 1, 2, 2)] {
            if !conv3x3_direct(c, n * h * w) {
                eprintln!("this CPU takes im2col for {c} channels: nothing to compare");
                return;
            }
            let x: Vec<f32> = (0..c * n * h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.0137).collect();
            let wt: Vec<f32> = (0..o * c * 9).map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.0211).collect();
            let mut cols = vec![0f32; c * 9 * n * h * w];
            im2col3(&x, c, n, h, w, &mut cols).unwrap();
            let mut want = vec![0f32; o * n * h * w];
            matmul(&mut want, &wt, &cols, o, c * 9, n * h * w, false, false, false).unwrap();
            let mut got = vec![7f32; o * n * h * w];
            let mut pad = vec![0f32; c * n * (h + 2) * (w + 2)];
            conv3x3(&x, &wt, c, o, n, h, w, &mut pad, &mut got).unwrap();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{c} {o} {n} {h} {w}");
        }
    }

    #[test]
    fn avx512_pools_have_the_bits_of_the_scalar_loops() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("this CPU has no AVX-512F: the scalar loops are the only ones it runs");
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (c, n, h, w) in [(3, 2, 7, 6), (2, 3, 28, 28), (1, 2, 5, 35), (2, 1, 3, 3), (1, 1, 2, 66)] {
            let len = c * n * h * w;
            let z: Vec<f32> = (0..len).map(|i| [(i as f32 * 0.37).sin(), -0.0, 0.0, -1.5, f32::NAN, 0.25][i * 7 % 11 % 6]).collect();
            let bias: Vec<f32> = (0..c).map(|i| i as f32 * 0.3 - 0.2).collect();
            let outs = c * n * (h / 2) * (w / 2);
            for (b, relu) in [(Some(&bias[..]), true), (None, true), (None, false), (Some(&bias[..]), false)] {
                let (mut want, mut want_arg) = (vec![0f32; outs], vec![0u32; outs]);
                bias_act_maxpool2_body(&z, b, relu, c, n, h, w, &mut want, &mut want_arg);
                let (mut got, mut got_arg) = (vec![9f32; outs], vec![9u32; outs]);
                bias_act_maxpool2(&z, b, relu, c, n, h, w, &mut got, &mut got_arg).unwrap();
                assert_eq!(bits(&got), bits(&want), "{c} {n} {h} {w} {relu}");
                assert_eq!(got_arg, want_arg);
                if b.is_none() && !relu {
                    maxpool2(&z, c * n, h, w, &mut got, &mut got_arg).unwrap();
                    assert_eq!(bits(&got), bits(&want));
                    assert_eq!(got_arg, want_arg);
                }
            }
            let (mut y, mut arg) = (vec![0f32; outs], vec![0u32; outs]);
            maxpool2(&z, c * n, h, w, &mut y, &mut arg).unwrap();
            let dy: Vec<f32> = (0..outs).map(|i| [1.5f32, -0.0, 0.0, -2.0, 0.5][i % 5]).collect();
            for pooled in [None, Some(&y[..])] {
                let mut want = vec![7f32; len];
                maxpool2_backward_dense_body(&dy, &arg, pooled, c * n, h, w, &mut want);
                let mut got = vec![7f32; len];
                maxpool2_backward_dense(&dy, &arg, pooled, c * n, h, w, &mut got).unwrap();
                assert_eq!(bits(&got), bits(&want), "{c} {n} {h} {w}");
            }
        }
    }

    #[test]
    fn fused_bias_act_maxpool_has_the_bits_of_the_two_passes() {
        let (c, n, h, w) = (3, 2, 7, 6);
        let z: Vec<f32> = (0..c * n * h * w).map(|i| [(i as f32 * 0.37).sin(), -0.0, 0.0, -1.5][i % 7 % 4]).collect();
        let bias = [0.1f32, -0.2, 0.0];
        for (b, relu) in [(Some(&bias[..]), true), (None, true), (Some(&bias[..]), false), (None, false)] {
            let mut act = z.clone();
            match b {
                Some(b) => bias_act_planes(&mut act, b, n * h * w, relu),
                None if relu => act.iter_mut().for_each(|x| *x = if *x < 0.0 { 0.0 } else { *x }),
                None => {}
            }
            let outs = c * n * (h / 2) * (w / 2);
            let (mut want, mut want_arg) = (vec![0f32; outs], vec![0u32; outs]);
            maxpool2(&act, c * n, h, w, &mut want, &mut want_arg).unwrap();
            let (mut got, mut got_arg) = (vec![9f32; outs], vec![9u32; outs]);
            bias_act_maxpool2(&z, b, relu, c, n, h, w, &mut got, &mut got_arg).unwrap();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            assert_eq!(got_arg, want_arg);
        }
    }

    #[test]
    fn dense_maxpool_backward_has_the_bits_of_scatter_then_relu() {
        for (planes, h, w) in [(3, 6, 8), (2, 5, 7), (1, 2, 2), (4, 3, 3)] {
            let mut z = 17u64;
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| {
                        z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        // Ties, zeros, negative zeros and negatives among the values.
                        match (z >> 60) % 5 {
                            0 => 0.0,
                            1 => -0.0,
                            2 => 0.25,
                            _ => ((z >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * (i % 3) as f32,
                        }
                    })
                    .collect()
            };
            let x: Vec<f32> = draw(planes * h * w).into_iter().map(|v| v.max(0.0)).collect();
            let per = (h / 2) * (w / 2);
            let (mut y, mut arg) = (vec![0f32; planes * per], vec![0u32; planes * per]);
            maxpool2(&x, planes, h, w, &mut y, &mut arg).unwrap();
            let dy = draw(planes * per);
            let mut want = vec![1f32; planes * h * w];
            maxpool2_backward(&dy, &arg, planes, h, w, &mut want).unwrap();
            let mut got = vec![1f32; planes * h * w];
            maxpool2_backward_dense(&dy, &arg, None, planes, h, w, &mut got).unwrap();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            relu_backward(&mut want, &x);
            maxpool2_backward_dense(&dy, &arg, Some(&y), planes, h, w, &mut got).unwrap();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn maxpool_routes_the_whole_gradient_to_each_maximum() {
        // A 4x4 plane with a unique maximum in each 2x2 window.
        let x = [1., 9., 2., 3., 4., 5., 8., 6., 7., 0., 1., 2., 3., 4., 5., 10.];
        let (mut y, mut arg) = ([0.0; 4], [0u32; 4]);
        maxpool2(&x, 1, 4, 4, &mut y, &mut arg).unwrap();
        assert_eq!(y, [9., 8., 7., 10.]);
        let mut dx = [5.0; 16];
        maxpool2_backward(&[1.0; 4], &arg, 1, 4, 4, &mut dx).unwrap();
        let ones: Vec<usize> = (0..16).filter(|&i| dx[i] == 1.0).collect();
        assert_eq!(ones, vec![1, 6, 8, 15]);
        assert_eq!(dx.iter().sum::<f32>(), 4.0, "1 at each maximum (candle 0.11 gives 0.25)");
    }

    #[test]
    fn maxpool_picks_the_first_maximum_like_the_scalar_reference() {
        // Few distinct values, so ties are everywhere; odd sizes drop the last row and column.
        let (planes, h, w) = (3, 7, 9);
        let x: Vec<f32> = (0..planes * h * w).map(|i| ((i * 7 + i / 5) % 4) as f32).collect();
        let (oh, ow) = (h / 2, w / 2);
        let (mut y, mut arg) = (vec![0.0; planes * oh * ow], vec![0u32; planes * oh * ow]);
        maxpool2(&x, planes, h, w, &mut y, &mut arg).unwrap();
        for p in 0..planes {
            let src = &x[p * h * w..];
            for oy in 0..oh {
                for ox in 0..ow {
                    let base = 2 * oy * w + 2 * ox;
                    let mut best = base;
                    for off in [base + 1, base + w, base + w + 1] {
                        if src[off] > src[best] {
                            best = off;
                        }
                    }
                    let o = p * oh * ow + oy * ow + ox;
                    assert_eq!((y[o], arg[o]), (src[best], best as u32), "plane {p}, window ({oy}, {ox})");
                }
            }
        }
    }

    #[test]
    fn plane_sums_and_relu_backward_match_the_reference() {
        let plane = 197; // not a multiple of the lanes
        let g: Vec<f32> = (0..3 * plane).map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0).collect();
        let mut out = [0.0f32; 3];
        plane_sums(&mut out, &g, plane);
        for (o, row) in out.iter().zip(g.chunks_exact(plane)) {
            let want: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((*o as f64 - want).abs() < 1e-3, "{o} vs {want}");
        }
        let a: Vec<f32> = g.iter().map(|v| v - 1.0).collect();
        let mut d = g.clone();
        relu_backward(&mut d, &a);
        assert!(d.iter().zip(&g).zip(&a).all(|((d, g), a)| *d == if *a > 0.0 { *g } else { 0.0 }));
    }
}
