//! The numeric loops of the layer kinds a model spec lists (`[[model.layers]]`, issue 18), on
//! flat f32 buffers, forward and backward: im2col/col2im for any convolution window, max and
//! average pooling, GELU, tanh, sigmoid and ReLU, layer normalization, dropout's mask, the
//! mean squared error, and the flatten between channel-major images and dense rows. The GEMMs
//! are `nn::matmul`, the biases `nn::bias_act*`, `nn::column_sums` and `nn::plane_sums`.
//!
//! Layouts:
//! - Images are channel-major, `[C][N][H][W]`: plane (c, n) is `h*w` contiguous floats at
//!   `(c*N + n)*h*w`. Then a whole batch of one convolution is one GEMM,
//!   `W[O, C*KH*KW] x cols[C*KH*KW, N*OH*OW]`, whose output is `[O][N][OH][OW]` again.
//!   Pools and element-wise functions work plane by plane (`planes = C*N`).
//! - Dense activations are row-major, `[N][F]`.
//!
//! Rules every function here keeps:
//! - Nothing allocates: callers pass every buffer. A buffer may be longer than needed (only
//!   its prefix is used, as in `nn`); a shorter one is a `KernelError::Shape` (the
//!   element-wise functions, which return nothing, panic instead: a caller's bug).
//! - Every output element is computed in an order fixed by its own indices alone, never by
//!   the thread count, the batch composition or the instruction set: loops are plain (GELU,
//!   tanh and sigmoid run in rayon tasks over fixed chunks of `CHUNK` elements, each element
//!   alone), and where a loop is compiled for AVX-512, AVX2 and the baseline (picked at run
//!   time) it uses IEEE operations only (Rust never fuses a multiply and an add), so every
//!   version gives the same bits. Reductions name their order where they are.
//! - Transcendental functions (`exp`, `erf`, `tanh`) are this file's own, in f64 and branch
//!   free, so they vectorize and give the same bits on every machine and libm; results are
//!   rounded to f32 once at the end (GELU, tanh and sigmoid are correctly rounded but for
//!   rare ties: relative error under 1e-11 before the final rounding).
//! - A record's results depend only on that record (and the parameters): a lane computes the
//!   same bits whichever other records share the call. The only cross-record reductions are
//!   the parameter gradients of `layernorm_backward`, which add rows in index order onto the
//!   caller's buffers (a lane sums its own rows into its own buffer).

use crate::{KernelError, CHUNK};
use rayon::prelude::*;

fn check(what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len < want {
        return Err(KernelError::Shape(format!("{what}: {len} elements, need {want}")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Windows: im2col, col2im, pooling.

/// Geometry of a 2-d convolution or pooling window over `h x w` inputs: a `kh x kw` kernel
/// moved by `stride` in both directions over the input padded by `pad` zeros on every side.
/// Output sizes are PyTorch's: `floor((h + 2*pad - kh) / stride) + 1` (the last rows and
/// columns that do not fill a window are dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub h: usize,
    pub w: usize,
}

fn out_len(n: usize, k: usize, stride: usize, pad: usize) -> usize {
    if k == 0 || stride == 0 || n + 2 * pad < k {
        return 0;
    }
    (n + 2 * pad - k) / stride + 1
}

impl Window {
    /// Output rows, `floor((h + 2*pad - kh) / stride) + 1`; 0 when the window does not fit
    /// (or `kh` or `stride` is 0): callers validate shapes before they run anything.
    pub fn out_h(&self) -> usize {
        out_len(self.h, self.kh, self.stride, self.pad)
    }

    /// Output columns, as `out_h`.
    pub fn out_w(&self) -> usize {
        out_len(self.w, self.kw, self.stride, self.pad)
    }

    /// Every function here refuses a window with an empty kernel, stride 0, or no output.
    fn validate(&self, what: &str) -> Result<(), KernelError> {
        if self.kh == 0 || self.kw == 0 || self.stride == 0 {
            return Err(KernelError::Shape(format!(
                "{what}: kernel {}x{} with stride {} (all must be at least 1)",
                self.kh, self.kw, self.stride
            )));
        }
        if self.out_h() == 0 || self.out_w() == 0 {
            return Err(KernelError::Shape(format!(
                "{what}: a {}x{} window (padding {}) does not fit a {}x{} input",
                self.kh, self.kw, self.pad, self.h, self.w
            )));
        }
        Ok(())
    }

    /// Pools take no padding (PyTorch's defaults) and index planes with u32.
    fn validate_pool(&self, what: &str) -> Result<(), KernelError> {
        self.validate(what)?;
        if self.pad != 0 {
            return Err(KernelError::Shape(format!("{what}: padding {} (pools take none)", self.pad)));
        }
        if self.h * self.w > u32::MAX as usize {
            return Err(KernelError::Shape(format!("{what}: a {}x{} plane has more than 2^32 elements", self.h, self.w)));
        }
        Ok(())
    }

    /// Along one axis (`len` inputs, `outs` outputs), for kernel offset `k`: the outputs
    /// `[lo, hi)` whose input lies inside the image (the others are in the padding), and the
    /// input index of `lo`.
    fn span(&self, k: usize, len: usize, outs: usize) -> (usize, usize, usize) {
        let (s, p) = (self.stride, self.pad);
        let hi = if p + len <= k { 0 } else { (p + len - k).div_ceil(s).min(outs) };
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) }.min(hi);
        (lo, hi, (lo * s + k).saturating_sub(p))
    }
}

/// im2col: `x[C][N][H][W]` to `cols[C*KH*KW][N*OH*OW]`. Row `(c*KH + ky)*KW + kx` holds, for
/// every record n and output position (oy, ox) (column `(n*OH + oy)*OW + ox`), the input at
/// `(oy*stride + ky - pad, ox*stride + kx - pad)` of plane (c, n), or 0 where that is in the
/// padding. So `W[O][C*KH*KW] x cols` is the convolution (PyTorch's weight layout
/// `[O][C][KH][KW]`). A pure copy; with stride 1 each output row is one slice copy.
pub fn im2col(x: &[f32], c: usize, n: usize, g: &Window, cols: &mut [f32]) -> Result<(), KernelError> {
    g.validate("im2col")?;
    let (oh, ow) = (g.out_h(), g.out_w());
    let (plane, oplane, taps) = (g.h * g.w, oh * ow, g.kh * g.kw);
    check("im2col input", x.len(), c * n * plane)?;
    check("im2col output", cols.len(), c * taps * n * oplane)?;
    if n == 0 || c == 0 {
        return Ok(());
    }
    // Copies and memsets: the baseline build is as fast as the vector ones.
    im2col_body(x, c, n, g, cols);
    Ok(())
}

/// Zeroes `out[..lo]` and `out[hi..]`: a column or two at most rows, written as stores rather
/// than a `memset` call each.
#[inline(always)]
fn zero_edges(out: &mut [f32], lo: usize, hi: usize) {
    match lo {
        0 => {}
        1 => out[0] = 0.0,
        _ => out[..lo].fill(0.0),
    }
    match out.len() - hi {
        0 => {}
        1 => out[hi] = 0.0,
        _ => out[hi..].fill(0.0),
    }
}

#[inline(always)]
fn im2col_body(x: &[f32], c: usize, n: usize, g: &Window, cols: &mut [f32]) {
    let (oh, ow, taps) = (g.out_h(), g.out_w(), g.kh * g.kw);
    let (plane, oplane, s, w) = (g.h * g.w, oh * ow, g.stride, g.w);
    for (r, row) in cols[..c * taps * n * oplane].chunks_exact_mut(n * oplane).enumerate() {
        let (ci, ky, kx) = (r / taps, r % taps / g.kw, r % g.kw);
        let (lo, hi, first) = g.span(kx, g.w, ow);
        let (ylo, yhi, iy0) = g.span(ky, g.h, oh);
        for (ni, dst) in row.chunks_exact_mut(oplane).enumerate() {
            // Output rows [ylo, yhi) read input rows iy0, iy0 + s, ...; the others are padding.
            let (head, rest) = dst.split_at_mut(ylo * ow);
            let (mid, tail) = rest.split_at_mut((yhi - ylo) * ow);
            head.fill(0.0);
            tail.fill(0.0);
            if lo == hi || ylo == yhi {
                // Every column, or every row, of this kernel position is in the padding.
                mid.fill(0.0);
                continue;
            }
            let src = &x[(ci * n + ni) * plane + iy0 * w..(ci * n + ni + 1) * plane];
            if s == 1 {
                // Row segments: one copy each.
                for (out, srow) in mid.chunks_exact_mut(ow).zip(src.chunks_exact(w)) {
                    zero_edges(out, lo, hi);
                    out[lo..hi].copy_from_slice(&srow[first..first + hi - lo]);
                }
            } else {
                for (out, srow) in mid.chunks_exact_mut(ow).zip(src.chunks_exact(w).step_by(s)) {
                    zero_edges(out, lo, hi);
                    for (o, v) in out[lo..hi].iter_mut().zip(srow[first..].iter().step_by(s)) {
                        *o = *v;
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col`: adds `cols[C*KH*KW][N*OH*OW]` back onto `dx[C][N][H][W]` (which
/// is not zeroed first; entries in the padding are dropped). Order: an input element receives
/// its contributions in increasing row of `cols` (kernel position (ky, kx) row-major), one
/// per kernel position, so the bits are fixed (and those of `nn::col2im3_add` for its window).
pub fn col2im_add(cols: &[f32], c: usize, n: usize, g: &Window, dx: &mut [f32]) -> Result<(), KernelError> {
    g.validate("col2im")?;
    let (oh, ow) = (g.out_h(), g.out_w());
    let (plane, oplane, taps) = (g.h * g.w, oh * ow, g.kh * g.kw);
    check("col2im input", cols.len(), c * taps * n * oplane)?;
    check("col2im output", dx.len(), c * n * plane)?;
    if n == 0 || c == 0 {
        return Ok(());
    }
    // The contiguous adds of stride 1 gain from wide vectors; strided ones lose.
    if g.stride == 1 {
        col2im_best(cols, c, n, g, dx);
    } else {
        col2im_body(cols, c, n, g, dx);
    }
    Ok(())
}

#[inline(always)]
fn col2im_body(cols: &[f32], c: usize, n: usize, g: &Window, dx: &mut [f32]) {
    let (oh, ow, taps) = (g.out_h(), g.out_w(), g.kh * g.kw);
    let (plane, oplane, s, w) = (g.h * g.w, oh * ow, g.stride, g.w);
    for (r, row) in cols[..c * taps * n * oplane].chunks_exact(n * oplane).enumerate() {
        let (ci, ky, kx) = (r / taps, r % taps / g.kw, r % g.kw);
        let (lo, hi, first) = g.span(kx, g.w, ow);
        let (ylo, yhi, iy0) = g.span(ky, g.h, oh);
        if lo == hi || ylo == yhi {
            continue;
        }
        for (ni, src) in row.chunks_exact(oplane).enumerate() {
            let dst = &mut dx[(ci * n + ni) * plane + iy0 * w..(ci * n + ni + 1) * plane];
            let src = &src[ylo * ow..yhi * ow];
            if s == 1 {
                for (inp, drow) in src.chunks_exact(ow).zip(dst.chunks_exact_mut(w)) {
                    for (d, v) in drow[first..first + hi - lo].iter_mut().zip(&inp[lo..hi]) {
                        *d += *v;
                    }
                }
            } else {
                for (inp, drow) in src.chunks_exact(ow).zip(dst.chunks_exact_mut(w).step_by(s)) {
                    for (d, v) in drow[first..].iter_mut().step_by(s).zip(&inp[lo..hi]) {
                        *d += *v;
                    }
                }
            }
        }
    }
}

versions!(col2im_best => col2im_body(cols: &[f32], c: usize, n: usize, g: &Window, dx: &mut [f32]));

/// `v` replaces the running maximum `m`: strictly greater, or the first NaN. NaN is treated
/// as larger than every number, so a window holding a NaN gives NaN (as PyTorch's max pool).
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn beats(v: f32, m: f32) -> bool {
    // `!(v <= m)`: v > m, or either is NaN (two compares and an and-not, where the plain
    // `v > m || (v.is_nan() && !m.is_nan())` takes three and two logic operations).
    !(v <= m) && !m.is_nan()
}

/// Max pooling (no padding) of `planes` planes of `h x w` (`x[planes][h][w]`) into
/// `y[planes][OH][OW]`. `arg` gets, per output, the index in its input plane of the first
/// maximum in the window's row-major scan order, for the backward pass. NaN counts as larger
/// than any number: a window with a NaN outputs its first NaN (PyTorch propagates NaN too).
/// For finite inputs (and infinities) the 2x2, stride 2 window gives the bits of
/// `nn::maxpool2`, which differs only with NaNs (it ignores a NaN that is not first).
pub fn maxpool(x: &[f32], planes: usize, g: &Window, y: &mut [f32], arg: &mut [u32]) -> Result<(), KernelError> {
    g.validate_pool("maxpool")?;
    let (plane, oplane) = (g.h * g.w, g.out_h() * g.out_w());
    check("maxpool input", x.len(), planes * plane)?;
    check("maxpool output", y.len(), planes * oplane)?;
    check("maxpool argmax", arg.len(), planes * oplane)?;
    if g.kh == 2 && g.kw == 2 && g.stride == 2 {
        maxpool_2x2_best(x, planes, g, y, arg);
    } else {
        maxpool_any_best(x, planes, g, y, arg);
    }
    Ok(())
}

/// The general window: the first tap initializes each output, then every other tap, in
/// row-major window order, replaces it where `beats`: the first maximum of the scan.
#[inline(always)]
fn maxpool_any(x: &[f32], planes: usize, g: &Window, y: &mut [f32], arg: &mut [u32]) {
    let (s, w, ow) = (g.stride, g.w, g.out_w());
    let (plane, oplane) = (g.h * w, g.out_h() * ow);
    for p in 0..planes {
        let src = &x[p * plane..(p + 1) * plane];
        let (yp, ap) = (&mut y[p * oplane..(p + 1) * oplane], &mut arg[p * oplane..(p + 1) * oplane]);
        for (oy, (yrow, arow)) in yp.chunks_exact_mut(ow).zip(ap.chunks_exact_mut(ow)).enumerate() {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let start = (oy * s + ky) * w + kx;
                    let taps = src[start..].iter().step_by(s);
                    if ky == 0 && kx == 0 {
                        for (ox, ((yv, av), v)) in yrow.iter_mut().zip(arow.iter_mut()).zip(taps).enumerate() {
                            *yv = *v;
                            *av = (start + ox * s) as u32;
                        }
                    } else {
                        for (ox, ((yv, av), v)) in yrow.iter_mut().zip(arow.iter_mut()).zip(taps).enumerate() {
                            let take = beats(*v, *yv);
                            *yv = if take { *v } else { *yv };
                            *av = if take { (start + ox * s) as u32 } else { *av };
                        }
                    }
                }
            }
        }
    }
}

/// 2x2, stride 2: a tournament (top pair, bottom pair, then the two winners), each step
/// keeping the earlier element unless the later `beats` it: the same first maximum as the scan,
/// and for numbers the same selects as `nn::maxpool2`.
#[inline(always)]
fn maxpool_2x2(x: &[f32], planes: usize, g: &Window, y: &mut [f32], arg: &mut [u32]) {
    let (w, oh, ow) = (g.w, g.out_h(), g.out_w());
    let (plane, oplane, wu) = (g.h * w, oh * ow, w as u32);
    for p in 0..planes {
        let src = &x[p * plane..(p + 1) * plane];
        for oy in 0..oh {
            let top = src[2 * oy * w..2 * oy * w + 2 * ow].as_chunks::<2>().0;
            let bottom = src[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow].as_chunks::<2>().0;
            let o = p * oplane + oy * ow;
            let (y_row, arg_row) = (&mut y[o..o + ow], &mut arg[o..o + ow]);
            let mut base = (2 * oy * w) as u32;
            for ((yv, av), (t, b)) in y_row.iter_mut().zip(arg_row.iter_mut()).zip(top.iter().zip(bottom)) {
                let (m1, i1) = if beats(t[1], t[0]) { (t[1], base + 1) } else { (t[0], base) };
                let (m2, i2) = if beats(b[1], b[0]) { (b[1], base + wu + 1) } else { (b[0], base + wu) };
                (*yv, *av) = if beats(m2, m1) { (m2, i2) } else { (m1, i1) };
                base += 2;
            }
        }
    }
}

versions!(maxpool_any_best => maxpool_any(x: &[f32], planes: usize, g: &Window, y: &mut [f32], arg: &mut [u32]));
versions!(maxpool_2x2_best => maxpool_2x2(x: &[f32], planes: usize, g: &Window, y: &mut [f32], arg: &mut [u32]));

/// The gradient of `maxpool`: zeroes `dx[planes][h][w]`, then adds each output's gradient at
/// its `arg`, plane by plane in output order (overlapping windows add up; the bits of
/// `nn::maxpool2_backward` for its window). An `arg` outside the plane is an error.
pub fn maxpool_backward(dy: &[f32], arg: &[u32], planes: usize, g: &Window, dx: &mut [f32]) -> Result<(), KernelError> {
    g.validate_pool("maxpool backward")?;
    let (plane, oplane) = (g.h * g.w, g.out_h() * g.out_w());
    check("maxpool gradient", dy.len(), planes * oplane)?;
    check("maxpool argmax", arg.len(), planes * oplane)?;
    check("maxpool input gradient", dx.len(), planes * plane)?;
    dx[..planes * plane].fill(0.0);
    for p in 0..planes {
        let d = &mut dx[p * plane..(p + 1) * plane];
        for (&a, &v) in arg[p * oplane..(p + 1) * oplane].iter().zip(&dy[p * oplane..(p + 1) * oplane]) {
            match d.get_mut(a as usize) {
                Some(d) => *d += v,
                None => return Err(KernelError::Shape(format!("maxpool backward: argmax {a} is outside a plane of {plane}"))),
            }
        }
    }
    Ok(())
}

/// Average pooling (PyTorch's `AvgPool2d` defaults: no padding, divide by `kh*kw`) of
/// `planes` planes of `h x w` into `y[planes][OH][OW]`. Each output is the sum of its window
/// in row-major order (starting from the first element), then divided by `kh*kw`.
pub fn avgpool(x: &[f32], planes: usize, g: &Window, y: &mut [f32]) -> Result<(), KernelError> {
    g.validate_pool("avgpool")?;
    let (plane, oplane) = (g.h * g.w, g.out_h() * g.out_w());
    check("avgpool input", x.len(), planes * plane)?;
    check("avgpool output", y.len(), planes * oplane)?;
    avgpool_body(x, planes, g, y);
    Ok(())
}

#[inline(always)]
fn avgpool_body(x: &[f32], planes: usize, g: &Window, y: &mut [f32]) {
    let (s, w, ow) = (g.stride, g.w, g.out_w());
    let (plane, oplane) = (g.h * w, g.out_h() * ow);
    let div = (g.kh * g.kw) as f32;
    for p in 0..planes {
        let src = &x[p * plane..(p + 1) * plane];
        for (oy, yrow) in y[p * oplane..(p + 1) * oplane].chunks_exact_mut(ow).enumerate() {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let taps = src[(oy * s + ky) * w + kx..].iter().step_by(s);
                    if ky == 0 && kx == 0 {
                        yrow.iter_mut().zip(taps).for_each(|(y, v)| *y = *v);
                    } else {
                        yrow.iter_mut().zip(taps).for_each(|(y, v)| *y += *v);
                    }
                }
            }
            yrow.iter_mut().for_each(|y| *y /= div);
        }
    }
}

/// The gradient of `avgpool`: zeroes `dx`, then adds `dy / (kh*kw)` over each window. Order:
/// an input element receives its contributions by increasing output row, then kernel column.
pub fn avgpool_backward(dy: &[f32], planes: usize, g: &Window, dx: &mut [f32]) -> Result<(), KernelError> {
    g.validate_pool("avgpool backward")?;
    let (plane, oplane) = (g.h * g.w, g.out_h() * g.out_w());
    check("avgpool gradient", dy.len(), planes * oplane)?;
    check("avgpool input gradient", dx.len(), planes * plane)?;
    dx[..planes * plane].fill(0.0);
    avgpool_backward_body(dy, planes, g, dx);
    Ok(())
}

#[inline(always)]
fn avgpool_backward_body(dy: &[f32], planes: usize, g: &Window, dx: &mut [f32]) {
    let (s, w, ow) = (g.stride, g.w, g.out_w());
    let (plane, oplane) = (g.h * w, g.out_h() * ow);
    let div = (g.kh * g.kw) as f32;
    for p in 0..planes {
        let d = &mut dx[p * plane..(p + 1) * plane];
        for (oy, grow) in dy[p * oplane..(p + 1) * oplane].chunks_exact(ow).enumerate() {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    for (d, v) in d[(oy * s + ky) * w + kx..].iter_mut().step_by(s).zip(grow) {
                        *d += *v / div;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Flatten: channel-major images to dense rows and back.

/// `x[C][N][P]` to `y[N][C*P]`: PyTorch's `Flatten` of `[N, C, H, W]` (feature `c*P + p`).
pub fn planes_to_rows(x: &[f32], c: usize, n: usize, plane: usize, y: &mut [f32]) -> Result<(), KernelError> {
    check("flatten input", x.len(), c * n * plane)?;
    check("flatten output", y.len(), c * n * plane)?;
    for ci in 0..c {
        for ni in 0..n {
            y[(ni * c + ci) * plane..(ni * c + ci + 1) * plane].copy_from_slice(&x[(ci * n + ni) * plane..(ci * n + ni + 1) * plane]);
        }
    }
    Ok(())
}

/// `x[N][C*P]` to `y[C][N][P]`: the inverse of `planes_to_rows` (so also its gradient).
pub fn rows_to_planes(x: &[f32], c: usize, n: usize, plane: usize, y: &mut [f32]) -> Result<(), KernelError> {
    check("unflatten input", x.len(), c * n * plane)?;
    check("unflatten output", y.len(), c * n * plane)?;
    for ci in 0..c {
        for ni in 0..n {
            y[(ci * n + ni) * plane..(ci * n + ni + 1) * plane].copy_from_slice(&x[(ni * c + ci) * plane..(ni * c + ci + 1) * plane]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Element-wise activations.
//
// Each takes its element count from its first argument; a shorter output or second input is a
// panic (a caller's bug). Rayon tasks cover fixed chunks of `CHUNK` elements: every element is
// computed alone, so the bits do not depend on the thread count.

fn map1(x: &[f32], y: &mut [f32], f: fn(&[f32], &mut [f32])) {
    let y = &mut y[..x.len()];
    if x.len() <= CHUNK {
        return f(x, y);
    }
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| f(x, y));
}

fn map2(a: &[f32], b: &[f32], y: &mut [f32], f: fn(&[f32], &[f32], &mut [f32])) {
    let (b, y) = (&b[..a.len()], &mut y[..a.len()]);
    if a.len() <= CHUNK {
        return f(a, b, y);
    }
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((y, a), b)| f(a, b, y));
}

/// `e^x` in f64, branch free (so it vectorizes) and the same bits everywhere: `x = k ln2 + r`
/// with `|r| <= ln2/2` (Cody-Waite, ln2 split so `k*LN2_HI` is exact), `e^r` by its Taylor
/// polynomial of degree 12 (truncation below 2e-16), scaled by `2^k` built in the exponent
/// bits. Relative error about 3e-16. NaN gives NaN; below -708 the result is 0, above 708 it
/// is `e^708` (only used where that saturates to the right f32).
#[inline(always)]
fn exp64(x: f64) -> f64 {
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 0.693_147_180_369_123_8; // fdlibm's ln2_hi (0x3fe62e42fee00000): k * LN2_HI is exact
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10; // ln2 - LN2_HI (0x3dea39ef35793c76)
    const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52: adding it rounds to an integer
    const C: [f64; 13] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362880.0,
        1.0 / 3628800.0,
        1.0 / 39916800.0,
        1.0 / 479001600.0,
    ];
    let under = x < -708.0;
    // Selects rather than min/max, which would turn NaN into a bound.
    let c = if under { -708.0 } else { x };
    let c = if c > 708.0 { 708.0 } else { c };
    let kf = c * LOG2_E + SHIFT;
    let k = kf - SHIFT;
    let r = (c - k * LN2_HI) - k * LN2_LO;
    let mut p = C[12];
    for &a in C[..12].iter().rev() {
        p = p * r + a;
    }
    // kf's low mantissa bits hold k (two's complement), |k| <= 1022: 2^k has exponent k + 1023.
    let scale = f64::from_bits(kf.to_bits().wrapping_add(1023) << 52);
    if under {
        0.0
    } else {
        p * scale
    }
}

const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `e^x` in f32, branch free and the same bits everywhere (Cephes' `expf`, with fused
/// multiply-adds): `x = k ln2 + r`, `e^r = 1 + r + r^2 P(r)` (degree 5), times `2^k` built in
/// the exponent bits; about 1 ulp. Call it only inside a `versions!` body (elsewhere a fused
/// multiply-add is a library call).
/// Below -87 the result is 0 (near f32's smallest normal), above 88 it saturates at e^88.
/// Shared by GELU and attention's softmax.
#[inline(always)]
pub(crate) fn exp32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: k * LN2_HI is exact for |k| <= 128
    const LN2_LO: f32 = -2.121_944_4e-4;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let under = x < -87.0;
    let c = if under { -87.0 } else { x };
    let c = if c > 88.0 { 88.0 } else { c };
    let kf = c * LOG2_E + SHIFT;
    let k = kf - SHIFT;
    // k * LN2_HI is exact, so the first fused step is the same as a separate product.
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, c));
    // Estrin's scheme: short dependency chains, since the loops over it are latency-bound.
    let r2 = r * r;
    let p = r2.mul_add(r2.mul_add(r.mul_add(1.987_569_2e-4, 1.398_199_9e-3), r.mul_add(8.333_452e-3, 4.166_579_6e-2)), r.mul_add(0.166_666_65, 0.5));
    let e = p.mul_add(r2, r + 1.0);
    // kf's low mantissa bits hold k (two's complement), |k| <= 127: 2^k has exponent k + 127.
    let scale = f32::from_bits(kf.to_bits().wrapping_add(127) << 23);
    if under {
        0.0
    } else {
        e * scale
    }
}

/// `e^(hi + lo)` for `|lo|` within a few ulps of `hi`: `e^hi (1 + lo)` (lo's square is far
/// below f32's precision), 0 where `e^hi` is.
#[inline(always)]
fn exp32_split(hi: f32, lo: f32) -> f32 {
    let e = exp32(hi);
    // Below -87 exp32 is 0 and lo may be NaN (from an infinite x): the select keeps the 0.
    if hi < -87.0 {
        0.0
    } else {
        e.mul_add(lo, e)
    }
}

/// `-x^2/2` as an unevaluated sum `hi + lo`, exactly (`-x/2` is exact, and the fused
/// multiply-add gives the product's rounding error exactly).
#[inline(always)]
fn neg_half_square(x: f32) -> (f32, f32) {
    let h = -0.5 * x;
    let hi = h * x;
    (hi, h.mul_add(x, -hi))
}

/// `a + b` as `hi + lo` exactly (Knuth's TwoSum: no assumption on which is larger).
#[inline(always)]
fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// The standard normal CDF `Phi(x)` and its density's `e^(-x^2/2)`, in f32: `erfc(z)` for
/// `z = |x|/sqrt2` is `t e^(-z^2 + P(t))`, `t = 1 / (1 + z/2)`, P of degree 9 (Numerical
/// Recipes' `erfcc`: relative error below 1.2e-7 for every z), so the tails keep their
/// relative precision; at most 4.1e-7 relative in all (about 7 ulps, near x = -1.19:
/// erfcc's error and the polynomial's roundings). IEEE operations and fused multiply-adds
/// only. The exponent `-x^2/2 + P` is carried as an exact f32 pair (`neg_half_square`,
/// `two_sum`), so the tails keep f32's relative precision without f64.
#[inline(always)]
fn normal_cdf32(x: f32) -> (f32, f32) {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    // The polynomial by Estrin's scheme (pairs, then powers of t^2): short dependency chains.
    let (t2, t4) = (t * t, (t * t) * (t * t));
    let p01 = t.mul_add(1.000_023_7, -1.265_512_2);
    let p23 = t.mul_add(0.096_784_18, 0.374_091_96);
    let p45 = t.mul_add(0.278_868_07, -0.186_288_06);
    let p67 = t.mul_add(1.488_515_9, -1.135_204);
    let p89 = t.mul_add(0.170_872_77, -0.822_152_2);
    let p = t4.mul_add(t4.mul_add(p89, t2.mul_add(p67, p45)), t2.mul_add(p23, p01));
    let (s, s_lo) = neg_half_square(x);
    let (hi, lo) = two_sum(s, p);
    let half_erfc = 0.5 * t * exp32_split(hi, lo + s_lo);
    (if x < 0.0 { half_erfc } else { 1.0 - half_erfc }, exp32_split(s, s_lo))
}

/// GELU in f32 on `normal_cdf32`: the f64 path (`normal_cdf`, 1e-12) cost a tenth of a
/// transformer's step; this is a few ulps and runs 16 wide with no f64 at all.
#[inline(always)]
fn gelu_body(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * normal_cdf32(x).0;
    }
}

#[inline(always)]
fn gelu_backward_body(dy: &[f32], x: &[f32], dx: &mut [f32]) {
    for ((d, &g), &x) in dx.iter_mut().zip(dy).zip(x) {
        let (cdf, e) = normal_cdf32(x);
        *d = g * (cdf + x * e * INV_SQRT_2PI as f32);
    }
}

/// `tanh` in f64: `(1 - e) / (1 + e)` with `e = e^(-2|x|)`, sign restored; below |x| = 1/16,
/// where `1 - e` would cancel, its Taylor series to x^11 (error below 1e-16 relative).
#[inline(always)]
fn tanh64(x: f64) -> f64 {
    let a = x.abs();
    let e = exp64(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    let a2 = a * a;
    let poly = ((((-1382.0 / 155925.0 * a2 + 62.0 / 2835.0) * a2 - 17.0 / 315.0) * a2 + 2.0 / 15.0) * a2 - 1.0 / 3.0) * a2;
    let small = a + a * poly;
    (if a < 0.0625 { small } else { big }).copysign(x)
}

#[inline(always)]
fn tanh_body(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = tanh64(x as f64) as f32;
    }
}

#[inline(always)]
fn sigmoid_body(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (1.0 / (1.0 + exp64(-(x as f64)))) as f32;
    }
}

versions!(gelu_best => gelu_body(x: &[f32], y: &mut [f32]));
versions!(gelu_backward_best => gelu_backward_body(dy: &[f32], x: &[f32], dx: &mut [f32]));
versions!(tanh_best => tanh_body(x: &[f32], y: &mut [f32]));
versions!(sigmoid_best => sigmoid_body(x: &[f32], y: &mut [f32]));

/// Exact GELU, PyTorch's `nn.GELU()` default: `y = x * Phi(x) = 0.5 x (1 + erf(x/sqrt2))`,
/// computed in f32 (see `normal_cdf32`: a relative error of a few ulps, tails included).
/// `gelu(-inf)` is NaN (`-inf * 0`), as in PyTorch.
pub fn gelu(x: &[f32], y: &mut [f32]) {
    map1(x, y, gelu_best);
}

/// `dx = dy * (Phi(x) + x * phi(x))` (phi: the normal density), from the layer's input x,
/// in f32.
pub fn gelu_backward(dy: &[f32], x: &[f32], dx: &mut [f32]) {
    map2(dy, x, dx, gelu_backward_best);
}

/// `y = tanh(x)`, computed in f64 and rounded once.
pub fn tanh(x: &[f32], y: &mut [f32]) {
    map1(x, y, tanh_best);
}

/// `dx = dy * (1 - y*y)` from the layer's output y (as PyTorch), in f32.
pub fn tanh_backward(dy: &[f32], y: &[f32], dx: &mut [f32]) {
    let (y, dx) = (&y[..dy.len()], &mut dx[..dy.len()]);
    for ((d, &g), &y) in dx.iter_mut().zip(dy).zip(y) {
        *d = g * (1.0 - y * y);
    }
}

/// `y = 1 / (1 + e^-x)`, computed in f64 and rounded once.
pub fn sigmoid(x: &[f32], y: &mut [f32]) {
    map1(x, y, sigmoid_best);
}

/// `dx = dy * (y * (1 - y))` from the layer's output y (as PyTorch), in f32.
pub fn sigmoid_backward(dy: &[f32], y: &[f32], dx: &mut [f32]) {
    let (y, dx) = (&y[..dy.len()], &mut dx[..dy.len()]);
    for ((d, &g), &y) in dx.iter_mut().zip(dy).zip(y) {
        *d = g * (y * (1.0 - y));
    }
}

/// `y = x` where `x >= 0` or NaN, else 0: the select of `nn::bias_act` (so a ReLU of its own
/// gives the bits of the fused one; -0.0 stays -0.0, NaN stays NaN).
pub fn relu(x: &[f32], y: &mut [f32]) {
    let y = &mut y[..x.len()];
    for (y, &x) in y.iter_mut().zip(x) {
        *y = if x < 0.0 { 0.0 } else { x };
    }
}

/// `dx = dy` where the layer's output y is positive, else 0 (`nn::relu_backward`, not in place).
pub fn relu_backward(dy: &[f32], y: &[f32], dx: &mut [f32]) {
    let (y, dx) = (&y[..dy.len()], &mut dx[..dy.len()]);
    for ((d, &g), &y) in dx.iter_mut().zip(dy).zip(y) {
        *d = if y > 0.0 { g } else { 0.0 };
    }
}

// ---------------------------------------------------------------------------------------------
// Layer normalization.

/// `rows` groups of `d` elements each, laid out so both activation layouts are covered:
/// element j of group r is at `r*row_stride + (j / inner)*outer_stride + j % inner`, i.e. a
/// group is `d / inner` contiguous segments of `inner` elements, `outer_stride` apart.
/// - Row-major `[N][D]`, normalized over D: `Groups::dense(n, d)` (row_stride = inner = D).
/// - Channel-major `[C][N][P]`, normalized over (C, P) per record (PyTorch's
///   `LayerNorm([C, H, W])`): `Groups::planes(c, n, p)` (row_stride = inner = P,
///   outer_stride = N*P, d = C*P); j = c*P + p is PyTorch's flattened index, so gamma and
///   beta are `[C][H][W]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Groups {
    pub rows: usize,
    pub d: usize,
    pub row_stride: usize,
    pub inner: usize,
    pub outer_stride: usize,
}

impl Groups {
    /// `n` rows of `d` contiguous elements.
    pub fn dense(n: usize, d: usize) -> Groups {
        Groups {
            rows: n,
            d,
            row_stride: d,
            inner: d,
            outer_stride: d,
        }
    }

    /// The `n` records of channel-major `[c][n][plane]`, each over its `c*plane` elements.
    pub fn planes(c: usize, n: usize, plane: usize) -> Groups {
        Groups {
            rows: n,
            d: c * plane,
            row_stride: plane,
            inner: plane,
            outer_stride: n * plane,
        }
    }

    /// Elements a buffer needs: one past the last element of the last group.
    fn span(&self) -> usize {
        if self.rows == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.d / self.inner - 1) * self.outer_stride + self.inner
    }

    fn validate(&self, what: &str) -> Result<(), KernelError> {
        if self.d == 0 || self.inner == 0 || !self.d.is_multiple_of(self.inner) {
            return Err(KernelError::Shape(format!(
                "{what}: groups of {} in segments of {} (need a positive multiple)",
                self.d, self.inner
            )));
        }
        Ok(())
    }

    /// The offset of segment `s` of row `r`.
    #[inline(always)]
    fn seg(&self, r: usize, s: usize) -> usize {
        r * self.row_stride + s * self.outer_stride
    }
}

/// Sixteen f32 running sums (one AVX-512 register): element k of each contiguous segment goes
/// to sum `k % 16`; at the end of a group the sums are added pairwise in index order,
/// `(((s0 + s1) + (s2 + s3)) + ...)`. Fixed by the layout alone, so the bits do not depend on
/// the instruction set; each sum holds a sixteenth of a group, which keeps f32 accurate for
/// the widths layers have (1e-6 relative at d = 4096).
struct Sum16([f32; 16]);

impl Sum16 {
    fn new() -> Sum16 {
        Sum16([0.0; 16])
    }

    /// Adds `f(a[k])` to sum `k % 16`, over a segment.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // Indexing fixed-size arrays is what vectorizes.
    fn add(&mut self, a: &[f32], f: impl Fn(f32) -> f32) {
        let (chunks, rest) = a.as_chunks::<16>();
        for c in chunks {
            for k in 0..16 {
                self.0[k] += f(c[k]);
            }
        }
        for (k, &v) in rest.iter().enumerate() {
            self.0[k] += f(v);
        }
    }

    #[inline(always)]
    fn total(&self) -> f32 {
        let mut s = self.0;
        let mut n = 16;
        while n > 1 {
            n /= 2;
            for k in 0..n {
                s[k] = s[2 * k] + s[2 * k + 1];
            }
        }
        s[0]
    }
}

/// Layer normalization, PyTorch's `nn.LayerNorm` semantics: per group, mean and biased
/// variance, `y = (x - mean) / sqrt(var + eps) * gamma + beta` (gamma, beta: length d, indexed
/// by j). The mean and variance are computed in f32 (two passes, sums in the `Sum16` order);
/// `mean[r]` and `rstd[r] = 1/sqrt(var + eps)` are stored for the backward, and y is
/// computed from them: `xhat = (x - mean) * rstd`, `y = xhat * gamma + beta`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm(x: &[f32], g: &Groups, gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) -> Result<(), KernelError> {
    g.validate("layernorm")?;
    check("layernorm input", x.len(), g.span())?;
    check("layernorm output", y.len(), g.span())?;
    check("layernorm gamma", gamma.len(), g.d)?;
    check("layernorm beta", beta.len(), g.d)?;
    check("layernorm mean", mean.len(), g.rows)?;
    check("layernorm rstd", rstd.len(), g.rows)?;
    layernorm_best(x, g, gamma, beta, eps, y, mean, rstd);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn layernorm_body(x: &[f32], g: &Groups, gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
    let (segs, inner) = (g.d / g.inner, g.inner);
    for r in 0..g.rows {
        let mut sum = Sum16::new();
        for s in 0..segs {
            sum.add(&x[g.seg(r, s)..][..inner], |v| v);
        }
        let m = sum.total() / g.d as f32;
        let mut sq = Sum16::new();
        for s in 0..segs {
            sq.add(&x[g.seg(r, s)..][..inner], |v| (v - m) * (v - m));
        }
        let var = sq.total() / g.d as f32;
        let rs = 1.0 / (var + eps).sqrt();
        (mean[r], rstd[r]) = (m, rs);
        for s in 0..segs {
            let o = g.seg(r, s);
            let (xs, ys) = (&x[o..o + inner], &mut y[o..o + inner]);
            let (gs, bs) = (&gamma[s * inner..(s + 1) * inner], &beta[s * inner..(s + 1) * inner]);
            for (((y, &x), &ga), &be) in ys.iter_mut().zip(xs).zip(gs).zip(bs) {
                *y = (x - m) * rs * ga + be;
            }
        }
    }
}

/// The gradient of `layernorm`, from the forward's x, mean and rstd: with
/// `xhat = (x - mean) * rstd` (the forward's f32 values) and `gh = dy * gamma`,
/// `dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))` (dx overwritten; the two means in
/// the `Sum16` order), and `dgamma[j] += dy * xhat`, `dbeta[j] += dy`, ADDED to (zero
/// them first, or accumulate), rows in index order.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dy: &[f32],
    x: &[f32],
    g: &Groups,
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<(), KernelError> {
    g.validate("layernorm backward")?;
    check("layernorm output gradient", dy.len(), g.span())?;
    check("layernorm input", x.len(), g.span())?;
    check("layernorm input gradient", dx.len(), g.span())?;
    check("layernorm gamma", gamma.len(), g.d)?;
    check("layernorm gamma gradient", dgamma.len(), g.d)?;
    check("layernorm beta gradient", dbeta.len(), g.d)?;
    check("layernorm mean", mean.len(), g.rows)?;
    check("layernorm rstd", rstd.len(), g.rows)?;
    layernorm_backward_best(dy, x, g, gamma, mean, rstd, dx, dgamma, dbeta);
    Ok(())
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
fn layernorm_backward_body(
    dy: &[f32],
    x: &[f32],
    g: &Groups,
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let (segs, inner) = (g.d / g.inner, g.inner);
    for r in 0..g.rows {
        let (m, rs) = (mean[r], rstd[r]);
        // One pass for the parameter gradients and both sums (element k of a segment into
        // sum k % 16, as `Sum16::add`).
        let (mut sg, mut sgx) = (Sum16::new(), Sum16::new());
        for s in 0..segs {
            let (o, j) = (g.seg(r, s), s * inner);
            let (xs, gys, gs) = (&x[o..o + inner], &dy[o..o + inner], &gamma[j..j + inner]);
            let (dgs, dbs) = (&mut dgamma[j..j + inner], &mut dbeta[j..j + inner]);
            let mut one = |k: usize, x: f32, gy: f32, ga: f32, dg: &mut f32, db: &mut f32| {
                let xhat = (x - m) * rs;
                *dg += gy * xhat;
                *db += gy;
                let gh = gy * ga;
                sg.0[k] += gh;
                sgx.0[k] += gh * xhat;
            };
            let ((xc, xr), (yc, yr), (gc, gr)) = (xs.as_chunks::<16>(), gys.as_chunks::<16>(), gs.as_chunks::<16>());
            let ((dgc, dgr), (dbc, dbr)) = (dgs.as_chunks_mut::<16>(), dbs.as_chunks_mut::<16>());
            for ((((xc, yc), gc), dgc), dbc) in xc.iter().zip(yc).zip(gc).zip(dgc.iter_mut()).zip(dbc.iter_mut()) {
                for k in 0..16 {
                    one(k, xc[k], yc[k], gc[k], &mut dgc[k], &mut dbc[k]);
                }
            }
            for (k, ((((&x, &gy), &ga), dg), db)) in xr.iter().zip(yr).zip(gr).zip(dgr.iter_mut()).zip(dbr.iter_mut()).enumerate() {
                one(k, x, gy, ga, dg, db);
            }
        }
        let (a, b) = (sg.total() / g.d as f32, sgx.total() / g.d as f32);
        for s in 0..segs {
            let o = g.seg(r, s);
            let (xs, gys, dxs) = (&x[o..o + inner], &dy[o..o + inner], &mut dx[o..o + inner]);
            let gs = &gamma[s * inner..(s + 1) * inner];
            for (((d, &x), &gy), &ga) in dxs.iter_mut().zip(xs).zip(gys).zip(gs) {
                let xhat = (x - m) * rs;
                *d = rs * (gy * ga - a - xhat * b);
            }
        }
    }
}

versions!(layernorm_best => layernorm_body(x: &[f32], g: &Groups, gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]));
versions!(layernorm_backward_best => layernorm_backward_body(dy: &[f32], x: &[f32], g: &Groups, gamma: &[f32], mean: &[f32], rstd: &[f32], dx: &mut [f32], dgamma: &mut [f32], dbeta: &mut [f32]));

// ---------------------------------------------------------------------------------------------
// Dropout.

/// SplitMix64's finalizer (Stafford's variant 13): a bijection of u64 that mixes every input
/// bit into every output bit.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A record's key: the inputs folded in one at a time through the bijection `mix64`
/// (`k = mix64(k ^ input)`, starting from `mix64(seed ^ b"shoaldro")`), so any change to
/// (seed, step, layer, record) gives an unrelated key.
fn record_key(seed: u64, step: u64, layer: u64, record: u64) -> u64 {
    let mut k = mix64(seed ^ 0x7368_6f61_6c64_726f);
    for v in [step, layer, record] {
        k = mix64(k ^ v);
    }
    k
}

/// Element j's draw: SplitMix64's j-th output from the record's key,
/// `mix64(key + (j + 1) * GOLDEN_GAMMA)`, its high 32 bits.
#[inline(always)]
fn draw(key: u64, j: u64) -> u64 {
    mix64(key.wrapping_add(j.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA))) >> 32
}

/// An element is dropped when its 32-bit draw is below `round(p * 2^32)` (so p = 1 drops
/// everything, p = 0 nothing); the kept value is `1 / (1 - p)` (f32).
fn keep_rule(p: f32) -> Result<(u64, f32), KernelError> {
    if !(0.0..=1.0).contains(&p) {
        return Err(KernelError::Shape(format!("dropout probability {p} is outside [0, 1]")));
    }
    let threshold = (p as f64 * 4_294_967_296.0).round() as u64;
    Ok((threshold, if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 }))
}

#[inline(always)]
fn mask_body(key: u64, first: u64, threshold: u64, keep: f32, out: &mut [f32]) {
    for (j, m) in out.iter_mut().enumerate() {
        *m = if draw(key, first + j as u64) < threshold { 0.0 } else { keep };
    }
}

versions!(mask_best => mask_body(key: u64, first: u64, threshold: u64, keep: f32, out: &mut [f32]));

/// Dropout's mask, a pure function of (seed, step, layer, record index, element index): a
/// record gets the same mask on whichever rank or lane holds it, whatever else is in its batch,
/// and on a rerun. For each record of the batch (`records`: their global indices, in batch
/// order) and each of its `per_record` elements (j: PyTorch's flattened index within the
/// record), writes `mask[i*per_record + j]`: 0.0 (dropped, probability p) or `1/(1-p)`.
/// The draw is counter-based: SplitMix64 (the `mix64` finalizer) over a key folded from
/// (seed, step, layer, record), then element j's output of that generator (`draw`).
pub fn dropout_mask(seed: u64, step: u64, layer: u64, records: &[u64], per_record: usize, p: f32, mask: &mut [f32]) -> Result<(), KernelError> {
    let (threshold, keep) = keep_rule(p)?;
    check("dropout mask", mask.len(), records.len() * per_record)?;
    if per_record == 0 {
        return Ok(());
    }
    for (row, &rec) in mask.chunks_exact_mut(per_record).zip(records) {
        mask_best(record_key(seed, step, layer, rec), 0, threshold, keep, row);
    }
    Ok(())
}

/// The same mask as `dropout_mask` (element j = c*plane + p of each record), laid out
/// channel-major like the images it multiplies: `mask[(c*N + i)*plane + p]` for record i of
/// the N in `records`.
#[allow(clippy::too_many_arguments)]
pub fn dropout_mask_planes(
    seed: u64,
    step: u64,
    layer: u64,
    records: &[u64],
    channels: usize,
    plane: usize,
    p: f32,
    mask: &mut [f32],
) -> Result<(), KernelError> {
    let (threshold, keep) = keep_rule(p)?;
    let n = records.len();
    check("dropout mask", mask.len(), channels * n * plane)?;
    if plane == 0 {
        return Ok(());
    }
    for (i, &rec) in records.iter().enumerate() {
        let key = record_key(seed, step, layer, rec);
        for c in 0..channels {
            mask_best(
                key,
                (c * plane) as u64,
                threshold,
                keep,
                &mut mask[(c * n + i) * plane..(c * n + i + 1) * plane],
            );
        }
    }
    Ok(())
}

/// `y = x * mask`: dropout's forward (x: the input) and backward (x: the output's gradient).
/// The element count is x's; a shorter mask or y is a panic.
pub fn apply_mask(x: &[f32], mask: &[f32], y: &mut [f32]) {
    let (mask, y) = (&mask[..x.len()], &mut y[..x.len()]);
    for ((y, &x), &m) in y.iter_mut().zip(x).zip(mask) {
        *y = x * m;
    }
}

// ---------------------------------------------------------------------------------------------
// Losses.

/// Mean squared error of `pred[rows][outputs]` against `target` (PyTorch's `MSELoss`, mean
/// over rows and outputs), times `scale`, and its gradient times `scale`,
/// `grad = (pred - target) * (2 * scale / (rows * outputs))` (f32), as `nn::softmax_xent`
/// does: the returned loss is the mean (summed in f64, in index order) times `scale`.
pub fn mse(pred: &[f32], target: &[f32], rows: usize, outputs: usize, scale: f32, grad: &mut [f32]) -> Result<f32, KernelError> {
    let count = rows * outputs;
    check("predictions", pred.len(), count)?;
    check("targets", target.len(), count)?;
    check("prediction gradient", grad.len(), count)?;
    let per = 2.0 * scale / count.max(1) as f32;
    let mut loss = 0.0f64;
    for ((g, &p), &t) in grad[..count].iter_mut().zip(pred).zip(target) {
        let d = p as f64 - t as f64;
        loss += d * d;
        *g = (p - t) * per;
    }
    Ok((loss / count.max(1) as f64) as f32 * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn;

    /// Deterministic test data: xorshift64*, uniform in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            v as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// `got` against an f64 reference, element by element: `|got - want| <= rel * mag` where
    /// mag is the element's own magnitude `|want|`, but at least `floor` times the largest
    /// (so entries that cancel to near zero are judged at the scale of their terms).
    fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, floor: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let big = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = rel * w.abs().max(floor * big).max(f64::MIN_POSITIVE);
            assert!((g as f64 - w).abs() <= tol, "{what}[{i}]: {g} vs {w} (tolerance {tol:e})");
        }
    }

    /// `got` against an f64 reference whose element i is a sum of terms of total magnitude
    /// `terms[i]` (the same sums over absolute values): `|got - want| <= rel * terms`, the
    /// bound on rounding in a sum, which cancellation does not shrink.
    fn assert_close_terms(what: &str, got: &[f32], want: &[f64], terms: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(terms).enumerate() {
            let tol = rel * t + 1e-30;
            assert!((g as f64 - w).abs() <= tol, "{what}[{i}]: {g} vs {w} (tolerance {tol:e})");
        }
    }

    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|v| v.abs()).collect()
    }

    /// Central differences in f64 of `f` at `x` (from the same f32 inputs as the kernel),
    /// step `1e-6 * max(|x|, 1)`.
    fn numeric_grad(x: &[f32], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        numeric_grad_step(x, 1e-6, f)
    }

    /// The same with a step of `step * max(|x|, 1)`: a function linear in x is differenced
    /// exactly with any step, and a large one keeps f64's rounding of f out of the result.
    fn numeric_grad_step(x: &[f32], step: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut p: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        (0..p.len())
            .map(|i| {
                let v = p[i];
                let h = step * v.abs().max(1.0);
                p[i] = v + h;
                let up = f(&p);
                p[i] = v - h;
                let down = f(&p);
                p[i] = v;
                (up - down) / (2.0 * h)
            })
            .collect()
    }

    fn dot(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(&a, &b)| a as f64 * b).sum()
    }

    fn win(kh: usize, kw: usize, stride: usize, pad: usize, h: usize, w: usize) -> Window {
        Window { kh, kw, stride, pad, h, w }
    }

    /// Convolution and pooling geometries: 1 and 3 channels, batch 1 and 2, non-square images,
    /// stride 1, 2 and 3, padding 0, 1 and 2, kernels 1 to 5 and non-square, kernels larger
    /// than the stride, gaps (stride larger than the kernel), dropped edges (floor).
    fn geometries() -> Vec<(usize, usize, Window)> {
        vec![
            (1, 1, win(3, 3, 1, 1, 5, 7)),
            (3, 2, win(3, 3, 1, 1, 6, 4)),
            (3, 1, win(3, 3, 2, 1, 7, 6)),
            (1, 2, win(5, 5, 1, 0, 9, 7)),
            (3, 2, win(5, 5, 2, 1, 8, 11)),
            (3, 1, win(5, 5, 1, 2, 5, 6)),
            (1, 2, win(1, 1, 1, 0, 4, 3)),
            (3, 2, win(2, 2, 2, 0, 5, 7)),
            (1, 1, win(3, 3, 2, 0, 7, 8)),
            (3, 2, win(3, 2, 1, 1, 4, 5)),
            (1, 2, win(5, 3, 3, 1, 11, 7)),
            (3, 1, win(2, 2, 3, 0, 8, 7)),
            (1, 1, win(3, 3, 1, 2, 3, 3)),
            (3, 1, win(4, 4, 2, 1, 9, 6)),
            (1, 2, win(3, 3, 3, 0, 9, 10)),
            (1, 1, win(5, 5, 1, 1, 3, 4)),
            // Kernel rows and columns that only ever see padding.
            (1, 2, win(5, 5, 1, 2, 1, 2)),
            (3, 1, win(5, 5, 2, 2, 2, 1)),
        ]
    }

    /// The padded input at (row, col) of plane `pl`, from the naive definition.
    fn tap(x: &[f64], pl: usize, g: &Window, iy: isize, ix: isize) -> f64 {
        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
            return 0.0;
        }
        x[pl * g.h * g.w + iy as usize * g.w + ix as usize]
    }

    fn naive_im2col(x: &[f64], c: usize, n: usize, g: &Window) -> Vec<f64> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut cols = vec![0.0; c * g.kh * g.kw * n * oh * ow];
        for ci in 0..c {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    for ni in 0..n {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                let r = (ci * g.kh + ky) * g.kw + kx;
                                cols[r * n * oh * ow + (ni * oh + oy) * ow + ox] = tap(x, ci * n + ni, g, iy, ix);
                            }
                        }
                    }
                }
            }
        }
        cols
    }

    /// A convolution straight from its definition, in f64: `w[O][C][KH][KW]`, x and the
    /// output channel-major.
    fn naive_conv(x: &[f64], w: &[f64], c: usize, n: usize, o: usize, g: &Window) -> Vec<f64> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut y = vec![0.0; o * n * oh * ow];
        for oc in 0..o {
            for ni in 0..n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = 0.0;
                        for ci in 0..c {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    s += w[((oc * c + ci) * g.kh + ky) * g.kw + kx] * tap(x, ci * n + ni, g, iy, ix);
                                }
                            }
                        }
                        y[((oc * n + ni) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn exp_constants_are_fdlibms() {
        // Written in decimal; these are the bit patterns the comments claim.
        let (hi, lo) = (0.693_147_180_369_123_8f64, 1.908_214_929_270_587_7e-10f64);
        assert_eq!((hi.to_bits(), lo.to_bits()), (0x3fe6_2e42_fee0_0000, 0x3dea_39ef_3579_3c76));
        assert_eq!(INV_SQRT_2PI, 1.0 / (2.0 * std::f64::consts::PI).sqrt());
        for x in [-708.0, -300.5, -1.0, -1e-10, 0.0, 0.3, 1.0, 2.5, 100.25, 707.9] {
            assert!((exp64(x) / x.exp() - 1.0).abs() < 1e-15, "exp({x})");
        }
        assert_eq!(exp64(-709.0), 0.0);
        assert!(exp64(f64::NAN).is_nan());
    }

    #[test]
    fn window_output_sizes_are_floored() {
        assert_eq!((win(3, 3, 1, 1, 28, 28).out_h(), win(3, 3, 1, 1, 28, 28).out_w()), (28, 28));
        assert_eq!((win(2, 2, 2, 0, 7, 9).out_h(), win(2, 2, 2, 0, 7, 9).out_w()), (3, 4));
        assert_eq!(win(5, 5, 2, 1, 8, 11).out_h(), 3); // (8 + 2 - 5) / 2 + 1
        assert_eq!(win(5, 5, 2, 1, 8, 11).out_w(), 5); // (11 + 2 - 5) / 2 + 1
        assert_eq!(win(5, 5, 1, 0, 4, 4).out_h(), 0, "does not fit");
        assert_eq!(win(3, 3, 0, 0, 4, 4).out_h(), 0, "stride 0");
        let mut out = [0.0; 16];
        assert!(im2col(&[0.0; 16], 1, 1, &win(5, 5, 1, 0, 4, 4), &mut out).is_err());
        assert!(im2col(&[0.0; 16], 1, 1, &win(3, 3, 0, 0, 4, 4), &mut out).is_err());
        assert!(
            maxpool(&[0.0; 16], 1, &win(2, 2, 2, 1, 4, 4), &mut out, &mut [0; 16]).is_err(),
            "pools take no padding"
        );
        assert!(avgpool(&[0.0; 16], 1, &win(2, 2, 2, 1, 4, 4), &mut out).is_err());
    }

    #[test]
    fn im2col_copies_the_naive_gather_exactly() {
        let mut rng = Rng(1);
        for (c, n, g) in geometries() {
            let x = rng.vec(c * n * g.h * g.w);
            let want = naive_im2col(&f64s(&x), c, n, &g);
            // Longer than needed, and dirty: every element must be written.
            let mut cols = vec![f32::NAN; want.len() + 5];
            im2col(&x, c, n, &g, &mut cols).unwrap();
            assert!(cols[..want.len()].iter().zip(&want).all(|(&a, &b)| a as f64 == b), "{g:?} c={c} n={n}");
            assert!(cols[want.len()..].iter().all(|v| v.is_nan()), "past the end untouched");
            assert!(im2col(&x, c, n, &g, &mut cols[..want.len() - 1]).is_err());
            assert!(im2col(&x[1..], c, n, &g, &mut cols).is_err());
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // col2im(dcols) is the gradient of <im2col(x), dcols> with respect to x: by finite
        // differences of the naive gather, and added onto what dx held.
        let mut rng = Rng(2);
        for (c, n, g) in geometries() {
            let x = rng.vec(c * n * g.h * g.w);
            let dcols = rng.vec(c * g.kh * g.kw * n * g.out_h() * g.out_w());
            let fd = numeric_grad_step(&x, 0.5, |x| dot(&dcols, &naive_im2col(x, c, n, &g)));
            let terms = numeric_grad_step(&x, 0.5, |x| dot(&abs(&dcols), &naive_im2col(x, c, n, &g)));
            let mut dx = vec![0.0; x.len()];
            col2im_add(&dcols, c, n, &g, &mut dx).unwrap();
            let what = format!("col2im {g:?} c={c} n={n}");
            assert_close_terms(&what, &dx, &fd, &terms, 1e-6);
            // Added onto what dx held, in the documented order (row of cols by row): the bits
            // of a plain scatter in that order.
            let start = rng.vec(x.len());
            let mut onto = start.clone();
            col2im_add(&dcols, c, n, &g, &mut onto).unwrap();
            let mut want = start;
            let (oh, ow) = (g.out_h(), g.out_w());
            for (r, row) in dcols.chunks_exact(n * oh * ow).enumerate() {
                let (ci, ky, kx) = (r / (g.kh * g.kw), r % (g.kh * g.kw) / g.kw, r % g.kw);
                for (col, &v) in row.iter().enumerate() {
                    let (ni, oy, ox) = (col / (oh * ow), col % (oh * ow) / ow, col % ow);
                    let (iy, ix) = ((oy * g.stride + ky) as isize - g.pad as isize, (ox * g.stride + kx) as isize - g.pad as isize);
                    if iy >= 0 && ix >= 0 && iy < g.h as isize && ix < g.w as isize {
                        want[(ci * n + ni) * g.h * g.w + iy as usize * g.w + ix as usize] += v;
                    }
                }
            }
            assert!(onto.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: order");
            assert!(col2im_add(&dcols[1..], c, n, &g, &mut dx).is_err());
        }
    }

    #[test]
    fn convolution_by_im2col_and_matmul_matches_the_definition_and_its_gradients() {
        // The way the worker runs a convolution: im2col, then one GEMM for the batch; the
        // backward's weight gradient dY x cols^T and input gradient col2im(W^T x dY).
        let mut rng = Rng(3);
        for (c, n, g) in geometries() {
            let o = 2;
            let (k, cols_n) = (c * g.kh * g.kw, n * g.out_h() * g.out_w());
            let (x, w, dy) = (rng.vec(c * n * g.h * g.w), rng.vec(o * k), rng.vec(o * cols_n));
            let mut cols = vec![0.0; k * cols_n];
            im2col(&x, c, n, &g, &mut cols).unwrap();
            let mut y = vec![0.0; o * cols_n];
            nn::matmul(&mut y, &w, &cols, o, k, cols_n, false, false, false).unwrap();
            let what = format!("{g:?} c={c} n={n}");
            let want = naive_conv(&f64s(&x), &f64s(&w), c, n, o, &g);
            let terms = naive_conv(&f64s(&abs(&x)), &f64s(&abs(&w)), c, n, o, &g);
            assert_close_terms(&format!("conv {what}"), &y, &want, &terms, 1e-6);
            let mut dw = vec![0.0; w.len()];
            nn::matmul(&mut dw, &dy, &cols, o, cols_n, k, false, true, false).unwrap();
            let fd_w = numeric_grad_step(&w, 0.5, |wv| dot(&dy, &naive_conv(&f64s(&x), wv, c, n, o, &g)));
            let terms = numeric_grad_step(&w, 0.5, |wv| dot(&abs(&dy), &naive_conv(&f64s(&abs(&x)), wv, c, n, o, &g)));
            assert_close_terms(&format!("conv dw {what}"), &dw, &fd_w, &terms, 1e-6);
            let mut dcols = vec![0.0; k * cols_n];
            nn::matmul(&mut dcols, &w, &dy, k, o, cols_n, true, false, false).unwrap();
            let mut dx = vec![0.0; x.len()];
            col2im_add(&dcols, c, n, &g, &mut dx).unwrap();
            let fd_x = numeric_grad_step(&x, 0.5, |xv| dot(&dy, &naive_conv(xv, &f64s(&w), c, n, o, &g)));
            let terms = numeric_grad_step(&x, 0.5, |xv| dot(&abs(&dy), &naive_conv(xv, &f64s(&abs(&w)), c, n, o, &g)));
            assert_close_terms(&format!("conv dx {what}"), &dx, &fd_x, &terms, 1e-6);
        }
    }

    #[test]
    fn the_3x3_window_gives_the_bits_of_nn_im2col3_and_col2im3() {
        let mut rng = Rng(4);
        for (c, n, h, w) in [(1, 3, 28, 28), (3, 2, 5, 7), (2, 1, 1, 1), (1, 2, 2, 1), (3, 1, 1, 4)] {
            let g = win(3, 3, 1, 1, h, w);
            let x = rng.vec(c * n * h * w);
            let (mut a, mut b) = (vec![0.0; c * 9 * n * h * w], vec![1.0; c * 9 * n * h * w]);
            nn::im2col3(&x, c, n, h, w, &mut a).unwrap();
            im2col(&x, c, n, &g, &mut b).unwrap();
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "im2col {c} {n} {h}x{w}");
            let dcols = rng.vec(a.len());
            let start = rng.vec(x.len());
            let (mut da, mut db) = (start.clone(), start);
            nn::col2im3_add(&dcols, c, n, h, w, &mut da).unwrap();
            col2im_add(&dcols, c, n, &g, &mut db).unwrap();
            assert!(da.iter().zip(&db).all(|(a, b)| a.to_bits() == b.to_bits()), "col2im {c} {n} {h}x{w}");
        }
    }

    /// Max pooling from its definition: the first maximum of the row-major scan, NaN largest.
    fn naive_maxpool(x: &[f32], planes: usize, g: &Window) -> (Vec<f32>, Vec<u32>) {
        let (oh, ow) = (g.out_h(), g.out_w());
        let (mut y, mut arg) = (vec![], vec![]);
        for p in 0..planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best: Option<(f32, usize)> = None;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let i = (oy * g.stride + ky) * g.w + ox * g.stride + kx;
                            let v = x[p * g.h * g.w + i];
                            let better = match best {
                                None => true,
                                Some((b, _)) => !b.is_nan() && (v.is_nan() || v > b),
                            };
                            if better {
                                best = Some((v, i));
                            }
                        }
                    }
                    let (v, i) = best.unwrap();
                    y.push(v);
                    arg.push(i as u32);
                }
            }
        }
        (y, arg)
    }

    fn pool_geometries() -> Vec<(usize, Window)> {
        let mut v: Vec<(usize, Window)> = geometries()
            .into_iter()
            .filter(|(_, _, g)| g.out_h() > 0)
            .map(|(c, n, g)| (c * n, Window { pad: 0, ..g }))
            .filter(|(_, g)| g.out_h() > 0 && g.out_w() > 0)
            .collect();
        v.extend([
            (3, win(2, 2, 2, 0, 7, 9)),
            (1, win(2, 2, 2, 0, 2, 2)),
            (2, win(3, 3, 2, 0, 7, 7)),
            (1, win(2, 2, 1, 0, 3, 5)),
        ]);
        v
    }

    #[test]
    fn maxpool_takes_the_first_maximum_of_the_window() {
        let mut rng = Rng(5);
        for (planes, g) in pool_geometries() {
            // Few distinct values: ties everywhere. Then a NaN here and there.
            let mut x: Vec<f32> = rng.vec(planes * g.h * g.w).iter().map(|v| (v * 3.0).round()).collect();
            for nan in [false, true] {
                if nan {
                    for i in (3..x.len()).step_by(7) {
                        x[i] = f32::NAN;
                    }
                }
                let (want_y, want_arg) = naive_maxpool(&x, planes, &g);
                let (mut y, mut arg) = (vec![0.0; want_y.len()], vec![0; want_y.len()]);
                maxpool(&x, planes, &g, &mut y, &mut arg).unwrap();
                assert_eq!(arg, want_arg, "{g:?} planes={planes} nan={nan}");
                assert!(y.iter().zip(&want_y).all(|(a, b)| a.to_bits() == b.to_bits()), "{g:?}");
                // The general loop agrees with the 2x2 tournament.
                let (mut y2, mut arg2) = (vec![0.0; want_y.len()], vec![0; want_y.len()]);
                maxpool_any(&x, planes, &g, &mut y2, &mut arg2);
                assert_eq!(arg2, want_arg);
            }
        }
    }

    #[test]
    fn maxpool_backward_matches_finite_differences() {
        let mut rng = Rng(6);
        for (planes, g) in pool_geometries() {
            // Distinct values 1/len apart (a ramp shuffled by a prime larger than len), so no
            // tie is within the step.
            let len = planes * g.h * g.w;
            let (a, b) = (
                [7919, 104_729, 1_299_709][(rng.next().abs() * 3.0) as usize % 3],
                (rng.next().abs() * len as f32) as usize,
            );
            let x: Vec<f32> = (0..len).map(|i| ((i * a + b) % len) as f32 / len as f32 - 0.5).collect();
            let oplane = g.out_h() * g.out_w();
            let (mut y, mut arg) = (vec![0.0; planes * oplane], vec![0; planes * oplane]);
            maxpool(&x, planes, &g, &mut y, &mut arg).unwrap();
            let dy = rng.vec(y.len());
            let mut dx = vec![f32::NAN; len];
            maxpool_backward(&dy, &arg, planes, &g, &mut dx).unwrap();
            let fd = numeric_grad(&x, |xv| {
                let x32: Vec<f32> = xv.iter().map(|&v| v as f32).collect();
                let (_, a) = naive_maxpool(&x32, planes, &g);
                // The pooled values in f64 at the argmax the f32 values pick (exact in f64).
                dot(
                    &dy,
                    &a.iter().enumerate().map(|(o, &i)| xv[o / oplane * g.h * g.w + i as usize]).collect::<Vec<_>>(),
                )
            });
            assert_close(&format!("maxpool dx {g:?}"), &dx, &fd, 1e-5, 1e-3);
            let mut bad = arg.clone();
            bad[0] = (g.h * g.w) as u32;
            assert!(maxpool_backward(&dy, &bad, planes, &g, &mut dx).is_err());
        }
    }

    #[test]
    fn the_2x2_window_gives_the_bits_of_nn_maxpool2() {
        let mut rng = Rng(7);
        for (planes, h, w) in [(1, 4, 4), (3, 7, 9), (2, 28, 28), (5, 3, 2)] {
            let mut x: Vec<f32> = rng.vec(planes * h * w).iter().map(|v| (v * 2.0).round()).collect();
            x[0] = f32::INFINITY;
            x[5] = f32::NEG_INFINITY;
            x[2] = -0.0;
            let g = win(2, 2, 2, 0, h, w);
            let out = planes * (h / 2) * (w / 2);
            let (mut ya, mut aa, mut yb, mut ab) = (vec![0.0; out], vec![0; out], vec![0.0; out], vec![0; out]);
            nn::maxpool2(&x, planes, h, w, &mut ya, &mut aa).unwrap();
            maxpool(&x, planes, &g, &mut yb, &mut ab).unwrap();
            assert_eq!(aa, ab);
            assert!(ya.iter().zip(&yb).all(|(a, b)| a.to_bits() == b.to_bits()));
            let dy = rng.vec(out);
            let (mut da, mut db) = (vec![1.0; planes * h * w], vec![2.0; planes * h * w]);
            nn::maxpool2_backward(&dy, &aa, planes, h, w, &mut da).unwrap();
            maxpool_backward(&dy, &ab, planes, &g, &mut db).unwrap();
            assert!(da.iter().zip(&db).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    fn naive_avgpool(x: &[f64], planes: usize, g: &Window) -> Vec<f64> {
        let mut y = vec![];
        for p in 0..planes {
            for oy in 0..g.out_h() {
                for ox in 0..g.out_w() {
                    let mut s = 0.0;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            s += tap(x, p, g, (oy * g.stride + ky) as isize, (ox * g.stride + kx) as isize);
                        }
                    }
                    y.push(s / (g.kh * g.kw) as f64);
                }
            }
        }
        y
    }

    #[test]
    fn avgpool_and_its_gradient_match_the_definition() {
        let mut rng = Rng(8);
        for (planes, g) in pool_geometries() {
            let x = rng.vec(planes * g.h * g.w);
            let want = naive_avgpool(&f64s(&x), planes, &g);
            let mut y = vec![f32::NAN; want.len()];
            avgpool(&x, planes, &g, &mut y).unwrap();
            let terms = naive_avgpool(&f64s(&abs(&x)), planes, &g);
            assert_close_terms(&format!("avgpool {g:?}"), &y, &want, &terms, 1e-6);
            let dy = rng.vec(y.len());
            let mut dx = vec![f32::NAN; x.len()];
            avgpool_backward(&dy, planes, &g, &mut dx).unwrap();
            let fd = numeric_grad_step(&x, 0.5, |xv| dot(&dy, &naive_avgpool(xv, planes, &g)));
            let terms = numeric_grad_step(&x, 0.5, |xv| dot(&abs(&dy), &naive_avgpool(xv, planes, &g)));
            assert_close_terms(&format!("avgpool dx {g:?}"), &dx, &fd, &terms, 1e-6);
        }
    }

    #[test]
    fn flatten_is_pytorchs_order_and_its_inverse() {
        let (c, n, p) = (3, 2, 5);
        let x: Vec<f32> = (0..c * n * p).map(|i| i as f32).collect();
        let mut rows = vec![0.0; x.len()];
        planes_to_rows(&x, c, n, p, &mut rows).unwrap();
        for ni in 0..n {
            for ci in 0..c {
                for pi in 0..p {
                    assert_eq!(rows[ni * c * p + ci * p + pi], x[(ci * n + ni) * p + pi]);
                }
            }
        }
        let mut back = vec![0.0; x.len()];
        rows_to_planes(&rows, c, n, p, &mut back).unwrap();
        assert_eq!(back, x);
        assert!(planes_to_rows(&x, c, n + 1, p, &mut rows).is_err());
    }

    /// erfc in f64 for the references, independent of the kernel's: the positive (Kummer)
    /// series of erf below 1, the continued fraction of erfc (300 terms, from its tail) above;
    /// both within 1e-15 relative of libm's erfc (checked against CPython's).
    fn erfc_ref(z: f64) -> f64 {
        if z < 0.0 {
            return 2.0 - erfc_ref(-z);
        }
        if z < 1.0 {
            // erf(z) = 2z/sqrt(pi) e^-z^2 sum_n (2z^2)^n / (1*3*...*(2n+1))
            let (mut term, mut sum, mut n) = (1.0f64, 1.0f64, 0.0);
            while term > 1e-18 * sum {
                n += 1.0;
                term *= 2.0 * z * z / (2.0 * n + 1.0);
                sum += term;
            }
            1.0 - 2.0 * z / std::f64::consts::PI.sqrt() * (-z * z).exp() * sum
        } else {
            // erfc(z) = e^-z^2/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + ...)))))
            let mut f = z;
            for k in (1..300).rev() {
                f = z + (k as f64 / 2.0) / f;
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / f
        }
    }

    fn gelu_ref(x: f64) -> f64 {
        x * 0.5 * erfc_ref(-x / std::f64::consts::SQRT_2)
    }

    /// Inputs for the element-wise functions: a dense sweep of [-12, 12], tiny and huge
    /// values, and every power of two in f32's range (both signs).
    fn activation_inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (-24000..=24000).map(|i| i as f32 / 2000.0).collect();
        x.extend([
            0.0, -0.0, 1e-30, -1e-30, 1e-7, -3e-5, 5e-4, 0.0625, -0.0625, 0.06249, 30.0, -30.0, 88.0, -88.0, 1e30, -1e30,
        ]);
        for e in -126..128 {
            x.push(2f32.powi(e));
            x.push(-(2f32.powi(e)));
        }
        x
    }

    #[test]
    fn gelu_matches_erf_in_f64() {
        let x = activation_inputs();
        let mut y = vec![0.0; x.len()];
        gelu(&x, &mut y);
        let want: Vec<f64> = x.iter().map(|&v| gelu_ref(v as f64)).collect();
        // erfcc's 1.2e-7 and a few roundings in f32: 5e-7 relative, tails included (the
        // result underflows only where it is below f32's smallest normal).
        // (4.1e-7 measured at worst, near x = -1.19: about 7 ulps.)
        for ((&x, &g), &w) in x.iter().zip(&y).zip(&want) {
            let tol = 5e-7 * w.abs() + 1.2e-38;
            assert!((g as f64 - w).abs() <= tol, "gelu({x}) = {g}, want {w}");
        }
        // Special values, as PyTorch.
        let mut s = [0.0f32; 4];
        gelu(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0], &mut s);
        assert_eq!(s[0], f32::INFINITY);
        assert!(s[1].is_nan() && s[2].is_nan());
        assert_eq!(s[3].to_bits(), (-0.0f32).to_bits());
        // Bigger than a chunk: the parallel path gives the same bits.
        let big: Vec<f32> = (0..3 * CHUNK + 7).map(|i| (i as f32 - 50000.0) / 9000.0).collect();
        let mut yb = vec![0.0; big.len()];
        gelu(&big, &mut yb);
        for (i, &v) in big.iter().enumerate().step_by(997) {
            let mut one = [0.0];
            gelu(&[v], &mut one);
            assert_eq!(one[0].to_bits(), yb[i].to_bits());
        }
    }

    /// `dx` of an element-wise function against central differences of its f64 reference:
    /// within `rel` of the derivative plus `slack(x)` (the size of terms that cancel), plus the
    /// differences' own noise (f64 rounding of f over the step).
    fn check_elementwise_backward(what: &str, x: &[f32], dx: &[f32], dy: &[f32], f: impl Fn(f64) -> f64, rel: f64, slack: impl Fn(f64) -> f64) {
        for i in 0..x.len() {
            let xv = x[i] as f64;
            let h = 1e-6 * xv.abs().max(1.0);
            let want = dy[i] as f64 * (f(xv + h) - f(xv - h)) / (2.0 * h);
            let noise = 4.0 * f64::EPSILON * f(xv).abs() / h;
            let tol = rel * (want.abs() + dy[i].abs() as f64 * slack(xv)) + dy[i].abs() as f64 * noise + 1e-30;
            assert!((dx[i] as f64 - want).abs() <= tol, "{what}: x = {xv}: {} vs {want} (tolerance {tol:e})", dx[i]);
        }
    }

    fn smooth_inputs(rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
        let x: Vec<f32> = (-800..=800).map(|i| i as f32 / 100.0 + 0.001 * rng.next()).collect();
        let dy = rng.vec(x.len());
        (x, dy)
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        let (x, dy) = smooth_inputs(&mut Rng(9));
        let mut dx = vec![0.0; x.len()];
        gelu_backward(&dy, &x, &mut dx);
        // The derivative Phi(x) + x phi(x) crosses 0 near x = -0.75: judged at the terms' size.
        check_elementwise_backward("gelu'", &x, &dx, &dy, gelu_ref, 1e-6, |x| (-0.5 * x * x).exp() * x.abs() * 0.4);
    }

    #[test]
    fn tanh_and_sigmoid_match_f64_and_their_gradients() {
        let x = activation_inputs();
        let (mut t, mut s) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        tanh(&x, &mut t);
        sigmoid(&x, &mut s);
        for ((&x, &t), &s) in x.iter().zip(&t).zip(&s) {
            let (wt, ws) = ((x as f64).tanh(), 1.0 / (1.0 + (-(x as f64)).exp()));
            assert!((t as f64 - wt).abs() <= 6.1e-8 * wt.abs(), "tanh({x}) = {t}, want {wt}");
            assert!((s as f64 - ws).abs() <= 6.1e-8 * ws.abs() + 1e-45, "sigmoid({x}) = {s}, want {ws}");
        }
        let mut special = [0.0f32; 3];
        tanh(&[f32::INFINITY, f32::NEG_INFINITY, -0.0], &mut special);
        assert_eq!(special.map(f32::to_bits), [1.0f32, -1.0, -0.0].map(f32::to_bits));
        sigmoid(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN], &mut special);
        assert_eq!(special[..2], [1.0, 0.0]);
        assert!(special[2].is_nan());

        // The backward passes take the f32 outputs: 1 - y^2 and y(1 - y) carry y's rounding,
        // relative to the terms (1 and y^2; y and y^2).
        let (x, dy) = smooth_inputs(&mut Rng(10));
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        tanh(&x, &mut y);
        tanh_backward(&dy, &y, &mut dx);
        check_elementwise_backward("tanh'", &x, &dx, &dy, f64::tanh, 1e-6, |_| 1.0);
        sigmoid(&x, &mut y);
        sigmoid_backward(&dy, &y, &mut dx);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        check_elementwise_backward("sigmoid'", &x, &dx, &dy, sig, 1e-6, sig);
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // The `_best` versions (AVX-512 or AVX2 where the CPU has them) against the bodies
        // compiled for the baseline.
        let same = |what: &str, a: &[f32], b: &[f32]| assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
        let x = activation_inputs();
        let dy: Vec<f32> = Rng(15).vec(x.len());
        let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        for (what, best, body) in [
            ("gelu", gelu_best as fn(&[f32], &mut [f32]), gelu_body as fn(&[f32], &mut [f32])),
            ("tanh", tanh_best, tanh_body),
            ("sigmoid", sigmoid_best, sigmoid_body),
        ] {
            best(&x, &mut a);
            body(&x, &mut b);
            same(what, &a, &b);
        }
        gelu_backward_best(&dy, &x, &mut a);
        gelu_backward_body(&dy, &x, &mut b);
        same("gelu_backward", &a, &b);
        mask_best(12345, 7, 1 << 31, 2.0, &mut a);
        mask_body(12345, 7, 1 << 31, 2.0, &mut b);
        same("dropout", &a, &b);

        let mut rng = Rng(16);
        let g = Groups::planes(3, 5, 37);
        let (xs, dys, gamma, beta) = (rng.vec(g.span()), rng.vec(g.span()), rng.vec(g.d), rng.vec(g.d));
        let (mut ya, mut yb, mut ma, mut mb, mut ra, mut rb) = (vec![0.0; g.span()], vec![0.0; g.span()], [0.0; 5], [0.0; 5], [0.0; 5], [0.0; 5]);
        layernorm_best(&xs, &g, &gamma, &beta, 1e-5, &mut ya, &mut ma, &mut ra);
        layernorm_body(&xs, &g, &gamma, &beta, 1e-5, &mut yb, &mut mb, &mut rb);
        same("layernorm", &ya, &yb);
        same("layernorm stats", &[ma, ra].concat(), &[mb, rb].concat());
        let (mut ga, mut gb, mut ba, mut bb) = (vec![0.0; g.d], vec![0.0; g.d], vec![0.0; g.d], vec![0.0; g.d]);
        layernorm_backward_best(&dys, &xs, &g, &gamma, &ma, &ra, &mut ya, &mut ga, &mut ba);
        layernorm_backward_body(&dys, &xs, &g, &gamma, &ma, &ra, &mut yb, &mut gb, &mut bb);
        same("layernorm backward", &[ya, ga, ba].concat(), &[yb, gb, bb].concat());

        for (c, n, g) in geometries() {
            let cols = rng.vec(c * g.kh * g.kw * n * g.out_h() * g.out_w());
            let (mut da, mut db) = (vec![0.5; c * n * g.h * g.w], vec![0.5; c * n * g.h * g.w]);
            col2im_best(&cols, c, n, &g, &mut da);
            col2im_body(&cols, c, n, &g, &mut db);
            same("col2im", &da, &db);
        }
        for (planes, g) in pool_geometries() {
            let x: Vec<f32> = rng.vec(planes * g.h * g.w).iter().map(|v| (v * 3.0).round()).collect();
            let len = planes * g.out_h() * g.out_w();
            let (mut ya, mut yb, mut aa, mut ab) = (vec![0.0; len], vec![0.0; len], vec![0; len], vec![0; len]);
            maxpool_any_best(&x, planes, &g, &mut ya, &mut aa);
            maxpool_any(&x, planes, &g, &mut yb, &mut ab);
            same("maxpool", &ya, &yb);
            assert_eq!(aa, ab);
        }
    }

    #[test]
    fn relu_is_the_select_of_bias_act() {
        let x = [-1.0f32, 0.0, -0.0, 2.5, f32::NAN, -1e-30];
        let (mut y, mut fused) = ([0.0f32; 6], x);
        relu(&x, &mut y);
        nn::bias_act(&mut fused, &[0.0; 6], true);
        // The same select; bias_act adds its +0.0 bias first, which turns -0.0 into +0.0.
        for i in [0, 1, 3, 4, 5] {
            assert_eq!(y[i].to_bits(), fused[i].to_bits(), "relu({})", x[i]);
        }
        assert_eq!(y[2].to_bits(), (-0.0f32).to_bits());
        assert!(y[4].is_nan());
        let dy = [1.0f32; 6];
        let mut dx = [9.0f32; 6];
        relu_backward(&dy, &y, &mut dx);
        let mut inplace = dy;
        nn::relu_backward(&mut inplace, &y);
        assert_eq!(dx, inplace);
        // And by finite differences (inputs away from the kink), as dropout's masked product.
        let (x, dy) = smooth_inputs(&mut Rng(17));
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        relu(&x, &mut y);
        relu_backward(&dy, &y, &mut dx);
        check_elementwise_backward("relu'", &x, &dx, &dy, |x| x.max(0.0), 1e-9, |_| 0.0);
        let mask: Vec<f32> = (0..x.len()).map(|i| [0.0, 2.5][i % 3 / 2]).collect();
        apply_mask(&dy, &mask, &mut dx);
        let fd = numeric_grad_step(&x, 0.5, |xv| xv.iter().zip(&mask).zip(&dy).map(|((x, &m), &g)| x * m as f64 * g as f64).sum());
        assert_close("dropout backward", &dx, &fd, 1e-6, 0.0);
    }

    /// Layer norm from its definition in f64: returns y for `x` laid out as `g` says.
    fn naive_layernorm(x: &[f64], g: &Groups, gamma: &[f64], beta: &[f64], eps: f64, len: usize) -> Vec<f64> {
        let mut y = vec![0.0; len];
        let at = |r: usize, j: usize| r * g.row_stride + (j / g.inner) * g.outer_stride + j % g.inner;
        for r in 0..g.rows {
            let m = (0..g.d).map(|j| x[at(r, j)]).sum::<f64>() / g.d as f64;
            let var = (0..g.d).map(|j| (x[at(r, j)] - m).powi(2)).sum::<f64>() / g.d as f64;
            for j in 0..g.d {
                y[at(r, j)] = (x[at(r, j)] - m) / (var + eps).sqrt() * gamma[j] + beta[j];
            }
        }
        y
    }

    #[test]
    fn layernorm_matches_the_definition_and_its_gradients_in_both_layouts() {
        let mut rng = Rng(11);
        let cases = [
            ("dense 3x10", Groups::dense(3, 10)),
            ("dense 1x1", Groups::dense(1, 1)),
            ("dense 2x37", Groups::dense(2, 37)),
            ("planes c=3 n=2 p=6", Groups::planes(3, 2, 6)),
            ("planes c=1 n=3 p=5", Groups::planes(1, 3, 5)),
            ("planes c=4 n=1 p=9", Groups::planes(4, 1, 9)),
        ];
        for (what, g) in cases {
            let len = g.span();
            // An offset and a scale, so the mean matters.
            let x: Vec<f32> = rng.vec(len).iter().map(|v| 3.0 + 2.0 * v).collect();
            let (gamma, beta) = (rng.vec(g.d).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>(), rng.vec(g.d));
            let eps = 1e-5f32;
            let (mut y, mut mean, mut rstd) = (vec![0.0; len], vec![0.0; g.rows], vec![0.0; g.rows]);
            layernorm(&x, &g, &gamma, &beta, eps, &mut y, &mut mean, &mut rstd).unwrap();
            let (gamma64, beta64) = (f64s(&gamma), f64s(&beta));
            let want = naive_layernorm(&f64s(&x), &g, &gamma64, &beta64, eps as f64, len);
            assert_close(&format!("layernorm {what}"), &y, &want, 1e-5, 0.05);

            let dy = rng.vec(len);
            let mut dx = vec![f32::NAN; len];
            let (mut dgamma, mut dbeta) = (vec![0.5; g.d], vec![-0.5; g.d]);
            layernorm_backward(&dy, &x, &g, &gamma, &mean, &rstd, &mut dx, &mut dgamma, &mut dbeta).unwrap();
            let loss = |x: &[f64], ga: &[f64], be: &[f64]| dot(&dy, &naive_layernorm(x, &g, ga, be, eps as f64, len));
            let fd_x = numeric_grad(&x, |xv| loss(xv, &gamma64, &beta64));
            // dx cancels (it sums to 0 over a group): judged at the size of its terms.
            assert_close(&format!("layernorm dx {what}"), &dx, &fd_x, 2e-5, 0.05);
            // dgamma and dbeta are linear in gamma and beta: differenced with a large step. Their
            // terms are dy * xhat (xhat carrying the rounding of x - mean) and dy, over the rows;
            // the 0.5 they started from is added in too.
            let at = |r: usize, j: usize| r * g.row_stride + (j / g.inner) * g.outer_stride + j % g.inner;
            let rows_sum = |f: &dyn Fn(usize, usize) -> f64| (0..g.d).map(|j| (0..g.rows).map(|r| f(r, j)).sum::<f64>() + 0.5).collect::<Vec<f64>>();
            let terms = rows_sum(&|r, j| (dy[at(r, j)].abs() * (x[at(r, j)].abs() + mean[r].abs()) * rstd[r]) as f64);
            let fd_gamma: Vec<f64> = numeric_grad_step(&gamma, 0.5, |ga| loss(&f64s(&x), ga, &beta64))
                .iter()
                .map(|v| v + 0.5)
                .collect();
            assert_close_terms(&format!("layernorm dgamma {what}"), &dgamma, &fd_gamma, &terms, 2e-6);
            let terms = rows_sum(&|r, j| dy[at(r, j)].abs() as f64);
            let fd_beta: Vec<f64> = numeric_grad_step(&beta, 0.5, |be| loss(&f64s(&x), &gamma64, be))
                .iter()
                .map(|v| v - 0.5)
                .collect();
            assert_close_terms(&format!("layernorm dbeta {what}"), &dbeta, &fd_beta, &terms, 1e-6);
        }
        let g = Groups::dense(2, 4);
        let mut out = [0.0; 8];
        assert!(layernorm(&[0.0; 7], &g, &[1.0; 4], &[0.0; 4], 1e-5, &mut out, &mut [0.0; 2], &mut [0.0; 2]).is_err());
        let bad = Groups { inner: 3, ..g };
        assert!(layernorm(&[0.0; 8], &bad, &[1.0; 4], &[0.0; 4], 1e-5, &mut out, &mut [0.0; 2], &mut [0.0; 2]).is_err());
    }

    #[test]
    fn layernorm_of_a_record_does_not_depend_on_the_others() {
        // The planes layout of 3 records, against each record alone in the same layout: the
        // same bits (the sums' order is fixed per segment, so the batch does not enter it).
        let mut rng = Rng(12);
        let (c, n, p) = (3, 3, 7);
        let x = rng.vec(c * n * p);
        let (gamma, beta) = (rng.vec(c * p), rng.vec(c * p));
        let (mut y, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; n], vec![0.0; n]);
        layernorm(&x, &Groups::planes(c, n, p), &gamma, &beta, 1e-5, &mut y, &mut mean, &mut rstd).unwrap();
        for i in 0..n {
            let mut one = vec![0.0; c * p];
            for ci in 0..c {
                one[ci * p..(ci + 1) * p].copy_from_slice(&x[(ci * n + i) * p..(ci * n + i + 1) * p]);
            }
            let (mut y1, mut m1, mut r1) = (vec![0.0; c * p], [0.0], [0.0]);
            layernorm(&one, &Groups::planes(c, 1, p), &gamma, &beta, 1e-5, &mut y1, &mut m1, &mut r1).unwrap();
            assert_eq!((m1[0].to_bits(), r1[0].to_bits()), (mean[i].to_bits(), rstd[i].to_bits()));
            for ci in 0..c {
                assert!(y1[ci * p..(ci + 1) * p]
                    .iter()
                    .zip(&y[(ci * n + i) * p..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn dropout_masks_follow_the_record_not_the_batch() {
        let (seed, step, layer, per) = (42, 7, 3, 50);
        let p = 0.3f32;
        let keep = 1.0 / (1.0 - p);
        let records: Vec<u64> = vec![5, 1000, 17, 3, 999_999];
        let mut mask = vec![0.0; records.len() * per];
        dropout_mask(seed, step, layer, &records, per, p, &mut mask).unwrap();
        assert!(mask.iter().all(|&m| m == 0.0 || m == keep));
        // Each record alone, and the batch reversed: the same rows.
        for (i, &r) in records.iter().enumerate() {
            let mut one = vec![0.0; per];
            dropout_mask(seed, step, layer, &[r], per, p, &mut one).unwrap();
            assert_eq!(one[..], mask[i * per..(i + 1) * per]);
        }
        let reversed: Vec<u64> = records.iter().rev().copied().collect();
        let mut rev = vec![0.0; mask.len()];
        dropout_mask(seed, step, layer, &reversed, per, p, &mut rev).unwrap();
        for i in 0..records.len() {
            assert_eq!(rev[i * per..(i + 1) * per], mask[(records.len() - 1 - i) * per..(records.len() - i) * per]);
        }
        // Any other seed, step, layer or record gives another mask.
        for (s, t, l, r) in [(43, 7, 3, 5), (42, 8, 3, 5), (42, 7, 4, 5), (42, 7, 3, 6)] {
            let mut other = vec![0.0; per];
            dropout_mask(s, t, l, &[r], per, p, &mut other).unwrap();
            assert_ne!(other[..], mask[..per], "{s} {t} {l} {r}");
        }
        // The channel-major layout holds the same values.
        let (c, plane) = (5, 10);
        let mut planes = vec![0.0; c * records.len() * plane];
        dropout_mask_planes(seed, step, layer, &records, c, plane, p, &mut planes).unwrap();
        let mut rows = vec![0.0; planes.len()];
        rows_to_planes(&mask, c, records.len(), plane, &mut rows).unwrap();
        assert_eq!(planes, rows);
    }

    #[test]
    fn dropout_keeps_about_one_minus_p() {
        let records: Vec<u64> = (0..200).collect();
        let per = 1000;
        let mut mask = vec![0.0; records.len() * per];
        for p in [0.0f32, 0.1, 0.5, 0.9, 1.0] {
            dropout_mask(1, 2, 3, &records, per, p, &mut mask).unwrap();
            let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / mask.len() as f64;
            // 200,000 draws: the standard deviation is at most 0.0011.
            assert!((kept - (1.0 - p as f64)).abs() < 0.006, "p = {p}: kept {kept}");
            if p < 1.0 {
                assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0 / (1.0 - p)));
            }
            // The expectation of a masked value is the value.
            let mean = mask.iter().map(|&m| m as f64).sum::<f64>() / mask.len() as f64;
            if p < 1.0 {
                assert!((mean - 1.0).abs() < 0.02 * (1.0 / (1.0 - p as f64)), "p = {p}: mean {mean}");
            }
        }
        assert!(dropout_mask(1, 2, 3, &records, per, 1.5, &mut mask).is_err());
        assert!(dropout_mask(1, 2, 3, &records, per, f32::NAN, &mut mask).is_err());
        assert!(dropout_mask(1, 2, 3, &records, per, 0.5, &mut mask[..10]).is_err());
        let (x, m) = ([1.0f32, 2.0, 3.0], [0.0f32, 2.0, 2.0]);
        let mut y = [0.0f32; 3];
        apply_mask(&x, &m, &mut y);
        assert_eq!(y, [0.0, 4.0, 6.0]);
    }

    #[test]
    fn mse_matches_the_mean_and_its_gradient() {
        let mut rng = Rng(13);
        for (rows, outputs) in [(1, 1), (5, 1), (3, 4)] {
            let (pred, target) = (rng.vec(rows * outputs), rng.vec(rows * outputs));
            let scale = 0.75f32;
            let mut grad = vec![f32::NAN; rows * outputs];
            let loss = mse(&pred, &target, rows, outputs, scale, &mut grad).unwrap();
            let f = |p: &[f64]| p.iter().zip(&target).map(|(p, &t)| (p - t as f64).powi(2)).sum::<f64>() / (rows * outputs) as f64 * scale as f64;
            let want = f(&f64s(&pred));
            assert!((loss as f64 - want).abs() <= 1e-6 * want, "{loss} vs {want}");
            assert_close("mse gradient", &grad, &numeric_grad(&pred, f), 1e-5, 1e-3);
        }
        assert!(mse(&[0.0; 3], &[0.0; 4], 2, 2, 1.0, &mut [0.0; 4]).is_err());
        assert_eq!(mse(&[], &[], 0, 3, 1.0, &mut []).unwrap(), 0.0);
    }

    /// Throughput of the hot loops on a CNN-sized batch: `cargo test -p shoal-kernels --lib
    /// layers::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        use std::time::Instant;
        // The fastest of 20 runs: the machine's noise only ever adds.
        let time = |what: &str, elems: usize, f: &mut dyn FnMut()| {
            f();
            let s = (0..20)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            println!("{what:32} {:8.3} ms  {:6.2} ns/element", s * 1e3, s * 1e9 / elems as f64);
        };
        let mut rng = Rng(14);
        let (c, n, h, w) = (32, 64, 28, 28);
        let x = rng.vec(c * n * h * w);
        let mut y = vec![0.0; x.len()];
        let mut y2 = vec![0.0; x.len()];
        time("gelu", x.len(), &mut || gelu(&x, &mut y));
        time("gelu_backward", x.len(), &mut || gelu_backward(&x, &x, &mut y));
        time("tanh", x.len(), &mut || tanh(&x, &mut y));
        time("sigmoid", x.len(), &mut || sigmoid(&x, &mut y));
        time("tanh_backward", x.len(), &mut || tanh_backward(&x, &x, &mut y));
        let g = win(3, 3, 1, 1, h, w);
        let mut cols = vec![0.0; c * 9 * n * h * w];
        time("im2col 3x3 s1 p1", cols.len(), &mut || im2col(&x, c, n, &g, &mut cols).unwrap());
        time("nn::im2col3", cols.len(), &mut || nn::im2col3(&x, c, n, h, w, &mut cols).unwrap());
        time("col2im 3x3 s1 p1", cols.len(), &mut || col2im_add(&cols, c, n, &g, &mut y).unwrap());
        time("nn::col2im3_add", cols.len(), &mut || nn::col2im3_add(&cols, c, n, h, w, &mut y).unwrap());
        let g2 = win(3, 3, 2, 1, h, w);
        time("im2col 3x3 s2 p1", c * 9 * n * g2.out_h() * g2.out_w(), &mut || {
            im2col(&x, c, n, &g2, &mut cols).unwrap()
        });
        time("col2im 3x3 s2 p1", c * 9 * n * g2.out_h() * g2.out_w(), &mut || {
            col2im_add(&cols, c, n, &g2, &mut y).unwrap()
        });
        let pool = win(2, 2, 2, 0, h, w);
        let mut arg = vec![0u32; x.len() / 4];
        time("maxpool 2x2", x.len(), &mut || maxpool(&x, c * n, &pool, &mut y2, &mut arg).unwrap());
        time("nn::maxpool2", x.len(), &mut || nn::maxpool2(&x, c * n, h, w, &mut y2, &mut arg).unwrap());
        time("maxpool 3x3 s2 (general)", x.len(), &mut || {
            maxpool(&x, c * n, &win(3, 3, 2, 0, h, w), &mut y2, &mut arg).unwrap()
        });
        time("maxpool_backward 2x2", x.len(), &mut || {
            maxpool_backward(&y2, &arg, c * n, &pool, &mut y).unwrap()
        });
        time("avgpool 2x2", x.len(), &mut || avgpool(&x, c * n, &pool, &mut y2).unwrap());
        time("avgpool_backward 2x2", x.len(), &mut || avgpool_backward(&y2, c * n, &pool, &mut y).unwrap());
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        let gr = Groups::planes(c, n, h * w);
        let (gamma, beta) = (vec![1.0; c * h * w], vec![0.0; c * h * w]);
        time("layernorm planes", x.len(), &mut || {
            layernorm(&x, &gr, &gamma, &beta, 1e-5, &mut y, &mut mean, &mut rstd).unwrap()
        });
        let (mut dg, mut db) = (vec![0.0; c * h * w], vec![0.0; c * h * w]);
        time("layernorm_backward planes", x.len(), &mut || {
            layernorm_backward(&x, &x, &gr, &gamma, &mean, &rstd, &mut y2, &mut dg, &mut db).unwrap()
        });
        let records: Vec<u64> = (0..n as u64).collect();
        time("dropout_mask", x.len(), &mut || {
            dropout_mask(1, 2, 3, &records, c * h * w, 0.5, &mut y).unwrap()
        });
    }
}
