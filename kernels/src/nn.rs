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

fn parallelism() -> gemm::Parallelism {
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
    Ok(())
}

/// `z[r][j] += bias[j]` for every row, then ReLU if `relu`.
pub fn bias_act(z: &mut [f32], bias: &[f32], relu: bool) {
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
    for (row, b) in z.chunks_exact_mut(plane).zip(bias) {
        for v in row.iter_mut() {
            let x = *v + *b;
            *v = if relu && x < 0.0 { 0.0 } else { x };
        }
    }
}

/// `g[i] = 0` where the layer's ReLU output `a[i]` was 0 (its input was not positive).
pub fn relu_backward(g: &mut [f32], a: &[f32]) {
    // A select, not a branch: the signs are random, and the loop vectorizes.
    for (g, a) in g.iter_mut().zip(a) {
        *g = if *a > 0.0 { *g } else { 0.0 };
    }
}

/// Column sums of `g[rows][width]` into `out` (`+=` when `accumulate`): a bias gradient.
pub fn column_sums(out: &mut [f32], g: &[f32], accumulate: bool) {
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

/// The adjoint of `im2col3`: adds `cols[C*9][N*H*W]` back onto `dx[C][N][H][W]`.
pub fn col2im3_add(cols: &[f32], c: usize, n: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
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
    let (oh, ow) = (h / 2, w / 2);
    check("maxpool input", x.len(), planes * h * w)?;
    check("maxpool output", y.len(), planes * oh * ow)?;
    check("maxpool argmax", arg.len(), planes * oh * ow)?;
    for p in 0..planes {
        let src = &x[p * h * w..(p + 1) * h * w];
        for oy in 0..oh {
            let (top, bottom) = (&src[2 * oy * w..2 * oy * w + w], &src[(2 * oy + 1) * w..(2 * oy + 2) * w]);
            let o = p * oh * ow + oy * ow;
            let (y_row, arg_row) = (&mut y[o..o + ow], &mut arg[o..o + ow]);
            for ox in 0..ow {
                // The first maximum in the order top-left, top-right, bottom-left, bottom-right,
                // found by selects rather than branches (the comparisons are unpredictable).
                let base = (2 * oy * w + 2 * ox) as u32;
                let (a, b, c, d) = (top[2 * ox], top[2 * ox + 1], bottom[2 * ox], bottom[2 * ox + 1]);
                let (m1, i1) = if b > a { (b, base + 1) } else { (a, base) };
                let (m2, i2) = if d > c { (d, base + w as u32 + 1) } else { (c, base + w as u32) };
                let (m, i) = if m2 > m1 { (m2, i2) } else { (m1, i1) };
                y_row[ox] = m;
                arg_row[ox] = i;
            }
        }
    }
    Ok(())
}

/// The gradient of `maxpool2`: each output's gradient goes to where its maximum was.
pub fn maxpool2_backward(dy: &[f32], arg: &[u32], planes: usize, h: usize, w: usize, dx: &mut [f32]) -> Result<(), KernelError> {
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
