//! 3x3 convolutions with stride 1 and padding 1 by Winograd's F(2x2, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015): each 2x2 output tile is
//! `A^T [(G g G^T) ⊙ (B^T d B)] A` of its 4x4 input patch `d`, so the channel sums become 16
//! GEMMs of `[O, C] x [C, tiles]`, 2.25x fewer multiplications than im2col + GEMM.
//!
//! Buffers are channel-major like the rest of `nn` (`[C][N][H][W]`); weights are PyTorch's
//! `[O][C][3][3]`. The transformed weights are `u[16][O][C]`, the transformed inputs
//! `v[C][16][TS]` (TS a little over T, see `tile_stride`) with tile `t = (n*TH + ty)*TW + tx` (TH, TW = ceil(H/2), ceil(W/2)); odd sizes
//! get tiles that reach past the image, their extra outputs dropped.
//!
//! The backward pass is the exact adjoint of this forward pass (not the im2col gradient): the
//! output's gradient goes back through `A`, the weights' gradient is `sum_t dM_t V_t^T`
//! brought back through `G`, the input's is `U^T dM` brought back through `B` and added into
//! the overlapping patches. Tiles go in blocks of `BLOCK` so that a block's `M` and `dM` stay
//! in cache; every sum runs in a fixed order for a given shape, so a step's bits depend only
//! on the shape (and the CPU), not on the thread count.

use crate::KernelError;

/// Tiles per block: a block's 16 `[O][BLOCK]` products stay in L2 for O up to 256.
const BLOCK: usize = 128;

/// The shape of one F(2x2, 3x3) convolution: `c` input and `o` output channels, `n` records of
/// `h x w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Winograd {
    pub c: usize,
    pub o: usize,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Only the outputs a 2x2 max pool (floor mode) reads: with an odd height or width the
    /// last row or column of tiles, whose outputs the pool drops, is never computed (a third
    /// of the work on 7x7 images). For `forward_pooled` and its `backward` only.
    pub pooled: bool,
}

/// Whether a convolution takes the Winograd path: 3x3, stride 1, padding 1, and at least 32
/// input channels (with fewer, the 16 GEMMs have too short a sum to beat one im2col GEMM;
/// the presets' convolutions, with 1 and 16 input channels, keep im2col and their bits).
pub fn applies(c_in: usize, kernel: usize, stride: usize, pad: usize) -> bool {
    (kernel, stride, pad) == (3, 1, 1) && c_in >= 32
}

fn check(what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len < want {
        return Err(KernelError::Shape(format!("winograd {what}: {len} elements, need {want}")));
    }
    Ok(())
}

impl Winograd {
    pub fn tiles_h(&self) -> usize {
        if self.pooled { self.h / 2 } else { self.h.div_ceil(2) }
    }

    pub fn tiles_w(&self) -> usize {
        if self.pooled { self.w / 2 } else { self.w.div_ceil(2) }
    }

    /// Tiles of the whole batch.
    pub fn tiles(&self) -> usize {
        self.n * self.tiles_h() * self.tiles_w()
    }

    /// Length of the transformed weights `u[16][O][C]`.
    pub fn u_len(&self) -> usize {
        16 * self.o * self.c
    }

    /// Length of the transformed inputs `v[C][16][TS]`.
    pub fn v_len(&self) -> usize {
        16 * self.c * self.tile_stride()
    }

    /// The distance between two of `v`'s rows: the tiles plus 16, so that the 16 rows one
    /// tile writes do not fall on the same cache sets (T = 1024 would put them 4 KiB apart).
    fn tile_stride(&self) -> usize {
        self.tiles() + 16
    }

    /// Length of the scratch that `forward` and `backward` need.
    pub fn scratch_len(&self) -> usize {
        16 * (self.o + self.c) * BLOCK + (self.c * self.n).max(1) * self.padded_plane()
    }

    fn padded_plane(&self) -> usize {
        (2 * self.tiles_h() + 2) * (2 * self.tiles_w() + 2)
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    fn validate(&self) -> Result<(), KernelError> {
        if self.c == 0 || self.o == 0 || self.h == 0 || self.w == 0 {
            return Err(KernelError::Shape(format!("winograd: empty shape {self:?}")));
        }
        Ok(())
    }
}

/// `u[ξ][o][c] = (G g G^T)[ξ]` of each 3x3 kernel `g = w[o][c]`, with
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
pub fn filter_transform(s: &Winograd, w: &[f32], u: &mut [f32]) -> Result<(), KernelError> {
    s.validate()?;
    check("weights", w.len(), s.o * s.c * 9)?;
    check("transformed weights", u.len(), s.u_len())?;
    let oc = s.o * s.c;
    for (k, g) in w.chunks_exact(9).take(oc).enumerate() {
        // G g: 4 rows of 3.
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        for (i, r) in t.iter().enumerate() {
            let (g0, g1, g2) = (r[0], r[1], r[2]);
            let row = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
            for (j, v) in row.into_iter().enumerate() {
                u[(i * 4 + j) * oc + k] = v;
            }
        }
    }
    Ok(())
}

/// The adjoint of `filter_transform`: `dw[o][c] = G^T du[.][o][c] G` (written, not added).
pub fn filter_transform_adjoint(s: &Winograd, du: &[f32], dw: &mut [f32]) -> Result<(), KernelError> {
    s.validate()?;
    check("weights' gradient", dw.len(), s.o * s.c * 9)?;
    check("transformed weights' gradient", du.len(), s.u_len())?;
    let oc = s.o * s.c;
    for (k, g) in dw.chunks_exact_mut(9).take(oc).enumerate() {
        // Columns first: each row i of du goes from 4 to 3.
        let mut t = [[0f32; 3]; 4];
        for (i, r) in t.iter_mut().enumerate() {
            let d = |j: usize| du[(i * 4 + j) * oc + k];
            let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
            *r = [d0 + 0.5 * (d1 + d2), 0.5 * (d1 - d2), 0.5 * (d1 + d2) + d3];
        }
        for j in 0..3 {
            let (d0, d1, d2, d3) = (t[0][j], t[1][j], t[2][j], t[3][j]);
            g[j] = d0 + 0.5 * (d1 + d2);
            g[3 + j] = 0.5 * (d1 - d2);
            g[6 + j] = 0.5 * (d1 + d2) + d3;
        }
    }
    Ok(())
}

/// `v[c][ξ][t] = (B^T d B)[ξ]` of every tile's 4x4 input patch `d` (zeros outside the image),
/// with `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`. `scratch` holds
/// at least `scratch_len` elements.
pub fn input_transform(s: &Winograd, x: &[f32], v: &mut [f32], scratch: &mut [f32]) -> Result<(), KernelError> {
    input_transform_best(s, x, v, scratch)
}

versions!(input_transform_best => input_transform_body(s: &Winograd, x: &[f32], v: &mut [f32], scratch: &mut [f32]) -> Result<(), KernelError>);

#[inline(always)]
fn input_transform_body(s: &Winograd, x: &[f32], v: &mut [f32], scratch: &mut [f32]) -> Result<(), KernelError> {
    s.validate()?;
    check("input", x.len(), s.c * s.n * s.plane())?;
    check("transformed input", v.len(), s.v_len())?;
    check("scratch", scratch.len(), s.scratch_len())?;
    let (th, tw, ts) = (s.tiles_h(), s.tiles_w(), s.tile_stride());
    let pw = 2 * tw + 2;
    let (pad, rest) = scratch.split_at_mut(s.padded_plane());
    let rows = &mut rest[..4 * pw];
    pad.fill(0.0);
    for c in 0..s.c {
        for n in 0..s.n {
            let plane = &x[(c * s.n + n) * s.plane()..][..s.plane()];
            for (y, src) in plane.chunks_exact(s.w).enumerate() {
                pad[(y + 1) * pw + 1..][..s.w].copy_from_slice(src);
            }
            for ty in 0..th {
                let p = &pad[2 * ty * pw..][..4 * pw];
                let (r0, r1, r2, r3) = (&p[..pw], &p[pw..2 * pw], &p[2 * pw..3 * pw], &p[3 * pw..]);
                // B^T d across the rows, for every column at once.
                let (t0, t) = rows.split_at_mut(pw);
                let (t1, t) = t.split_at_mut(pw);
                let (t2, t3) = t.split_at_mut(pw);
                for j in 0..pw {
                    t0[j] = r0[j] - r2[j];
                    t1[j] = r1[j] + r2[j];
                    t2[j] = r2[j] - r1[j];
                    t3[j] = r1[j] - r3[j];
                }
                // Then (.) B across the columns of each tile: 4 runs of `tw` per row.
                let base = (n * th + ty) * tw;
                let vc = &mut v[c * 16 * ts..][..16 * ts];
                for (i, r) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                    let (o0, rest) = vc[i * 4 * ts..][..4 * ts].split_at_mut(ts);
                    let (o1, rest) = rest.split_at_mut(ts);
                    let (o2, o3) = rest.split_at_mut(ts);
                    let (o0, o1, o2, o3) = (&mut o0[base..base + tw], &mut o1[base..base + tw], &mut o2[base..base + tw], &mut o3[base..base + tw]);
                    for tx in 0..tw {
                        let (a, b, cc, d) = (r[2 * tx], r[2 * tx + 1], r[2 * tx + 2], r[2 * tx + 3]);
                        o0[tx] = a - cc;
                        o1[tx] = b + cc;
                        o2[tx] = cc - b;
                        o3[tx] = b - d;
                    }
                }
            }
            // Only the interior was written: the zero border stays for the next plane.
        }
    }
    Ok(())
}

/// `dst[m×n] (+)= a[m×k] · b[k×n]` with explicit strides (row stride, column stride), checked
/// against the slices so that every element gemm touches lies inside them.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    dst: &mut [f32],
    dst_rs: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) -> Result<(), KernelError> {
    if m == 0 || n == 0 || k == 0 {
        return Err(KernelError::Shape(format!("winograd gemm: empty {m}x{k}x{n}")));
    }
    check("gemm output", dst.len(), (m - 1) * dst_rs + n)?;
    check("gemm lhs", a.len(), (m - 1) * a_rs + (k - 1) * a_cs + 1)?;
    check("gemm rhs", b.len(), (k - 1) * b_rs + (n - 1) * b_cs + 1)?;
    // SAFETY: the checks above bound the largest offset of each operand by its length.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            crate::nn::parallelism(),
        );
    }
    Ok(())
}

/// The convolution: `y[O][N][H][W]` from the transformed weights `u` and inputs `v`, plus
/// `bias` per output channel, then ReLU when `relu`.
pub fn forward(s: &Winograd, u: &[f32], v: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32], scratch: &mut [f32]) -> Result<(), KernelError> {
    if s.pooled {
        return Err(KernelError::Shape("winograd forward: a shape for a pool computes only what the pool reads (forward_pooled)".into()));
    }
    check("output", y.len(), s.o * s.n * s.plane())?;
    forward_into(s, u, v, bias, relu, Output::Planes(y), scratch)
}

/// `forward` followed by a 2x2 max pool with stride 2 (`nn::maxpool2`, the same bits and the
/// same `arg`), without writing the convolution's output: each pooling window is one of
/// Winograd's 2x2 output tiles. `pooled` is `[O][N][H/2][W/2]`.
#[allow(clippy::too_many_arguments)]
pub fn forward_pooled(s: &Winograd, u: &[f32], v: &[f32], bias: Option<&[f32]>, relu: bool, pooled: &mut [f32], arg: &mut [u32], scratch: &mut [f32]) -> Result<(), KernelError> {
    if !s.pooled {
        return Err(KernelError::Shape("winograd forward_pooled: the shape must say `pooled`".into()));
    }
    let outs = s.o * s.n * (s.h / 2) * (s.w / 2);
    check("pooled output", pooled.len(), outs)?;
    check("pool argmax", arg.len(), outs)?;
    forward_into(s, u, v, bias, relu, Output::Pooled(pooled, arg), scratch)
}

/// Where the output transform writes.
enum Output<'a> {
    Planes(&'a mut [f32]),
    Pooled(&'a mut [f32], &'a mut [u32]),
}

fn forward_into(s: &Winograd, u: &[f32], v: &[f32], bias: Option<&[f32]>, relu: bool, mut out: Output, scratch: &mut [f32]) -> Result<(), KernelError> {
    s.validate()?;
    check("transformed weights", u.len(), s.u_len())?;
    check("transformed input", v.len(), s.v_len())?;
    check("scratch", scratch.len(), s.scratch_len())?;
    if let Some(b) = bias {
        check("bias", b.len(), s.o)?;
    }
    let (tt, ts, oc) = (s.tiles(), s.tile_stride(), s.o * s.c);
    let m = &mut scratch[..16 * s.o * BLOCK];
    for t0 in (0..tt).step_by(BLOCK) {
        let tb = BLOCK.min(tt - t0);
        for xi in 0..16 {
            gemm_strided(&mut m[xi * tb..], 16 * tb, &u[xi * oc..], (s.c, 1), &v[xi * ts + t0..], (16 * ts, 1), (s.o, s.c, tb), false)?;
        }
        match &mut out {
            Output::Planes(y) => output_transform(s, &m[..16 * s.o * tb], t0, tb, bias, relu, y),
            Output::Pooled(y, arg) => output_transform_pooled(s, &m[..16 * s.o * tb], t0, tb, bias, relu, y, arg),
        }
    }
    Ok(())
}

/// The block's tiles as runs along one tile row: (first tile's index in the block, record,
/// tile row, first tile column, tiles).
fn row_runs(s: &Winograd, t0: usize, tb: usize) -> impl Iterator<Item = (usize, usize, usize, usize, usize)> {
    let (th, tw) = (s.tiles_h(), s.tiles_w());
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= tb {
            return None;
        }
        let t = t0 + i;
        let (row, tx0) = (t / tw, t % tw);
        let len = (tw - tx0).min(tb - i);
        let run = (i, row / th, row % th, tx0, len);
        i += len;
        Some(run)
    })
}

/// `y = A^T M A` of each tile of the block, `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`, into the
/// output planes (bias and ReLU applied), dropping outputs past the image's edge. The
/// arithmetic runs across the block's tiles (vectorized); the stores follow.
fn output_transform(s: &Winograd, m: &[f32], t0: usize, tb: usize, bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
    output_transform_best(s, m, t0, tb, bias, relu, y)
}

versions!(output_transform_best => output_transform_body(s: &Winograd, m: &[f32], t0: usize, tb: usize, bias: Option<&[f32]>, relu: bool, y: &mut [f32]));

#[inline(always)]
fn output_transform_body(s: &Winograd, m: &[f32], t0: usize, tb: usize, bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
    let (h, w, hw) = (s.h, s.w, s.plane());
    let mut q = [[0f32; BLOCK]; 4];
    for o in 0..s.o {
        tile_outputs(&m[o * 16 * tb..][..16 * tb], tb, bias.map_or(0.0, |b| b[o]), relu, &mut q);
        let [q0, q1, q2, q3] = &q;
        // Each run of tiles writes two output rows, interleaving its tiles' two columns.
        for (i, n, ty, tx0, len) in row_runs(s, t0, tb) {
            let plane = &mut y[(o * s.n + n) * hw..][..hw];
            let x0 = 2 * tx0;
            let inside = len.min((w - x0) / 2);
            for (r, (qa, qb)) in [(q0, q1), (q2, q3)].into_iter().enumerate() {
                let yy = 2 * ty + r;
                if yy >= h {
                    continue;
                }
                let row = &mut plane[yy * w..][..w];
                for ((pair, a), b) in row[x0..x0 + 2 * inside].chunks_exact_mut(2).zip(&qa[i..i + inside]).zip(&qb[i..i + inside]) {
                    pair[0] = *a;
                    pair[1] = *b;
                }
                // An odd width: the last tile's first column only.
                if inside < len && x0 + 2 * inside < w {
                    row[x0 + 2 * inside] = qa[i + inside];
                }
            }
        }
    }
}

/// The four outputs `A^T M A` (plus `b`, then ReLU) of each of the block's tiles from one
/// output channel's `m[16][tb]`: `q[0..4][i]` top-left, top-right, bottom-left, bottom-right.
#[inline(always)]
fn tile_outputs(mo: &[f32], tb: usize, b: f32, relu: bool, q: &mut [[f32; BLOCK]; 4]) {
    // The ReLU of the rest of shoal (`x < 0` becomes 0; -0.0 and NaN pass).
    let act = |z: f32| if relu && z < 0.0 { 0.0 } else { z };
    let r: [&[f32]; 16] = std::array::from_fn(|xi| &mo[xi * tb..][..tb]);
    let [q0, q1, q2, q3] = q;
    for i in 0..tb {
        let s0 = |j: usize| r[j][i] + r[4 + j][i] + r[8 + j][i];
        let s1 = |j: usize| r[4 + j][i] - r[8 + j][i] - r[12 + j][i];
        let (a0, a1, a2, a3) = (s0(0), s0(1), s0(2), s0(3));
        let (b0, b1, b2, b3) = (s1(0), s1(1), s1(2), s1(3));
        q0[i] = act(a0 + a1 + a2 + b);
        q1[i] = act(a1 - a2 - a3 + b);
        q2[i] = act(b0 + b1 + b2 + b);
        q3[i] = act(b1 - b2 - b3 + b);
    }
}

#[allow(clippy::too_many_arguments)]
fn output_transform_pooled(s: &Winograd, m: &[f32], t0: usize, tb: usize, bias: Option<&[f32]>, relu: bool, pooled: &mut [f32], arg: &mut [u32]) {
    output_transform_pooled_best(s, m, t0, tb, bias, relu, pooled, arg)
}

versions!(output_transform_pooled_best => output_transform_pooled_body(s: &Winograd, m: &[f32], t0: usize, tb: usize, bias: Option<&[f32]>, relu: bool, pooled: &mut [f32], arg: &mut [u32]));

/// `output_transform` then `nn::maxpool2`'s choice in each tile (the first maximum in the
/// order top-left, top-right, bottom-left, bottom-right), for the tiles that are whole
/// pooling windows (an odd last row or column of the image is dropped, as floor mode does).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform_pooled_body(s: &Winograd, m: &[f32], t0: usize, tb: usize, bias: Option<&[f32]>, relu: bool, pooled: &mut [f32], arg: &mut [u32]) {
    let (w, oh, ow) = (s.w, s.h / 2, s.w / 2);
    let mut q = [[0f32; BLOCK]; 4];
    let mut best = [0f32; BLOCK];
    let mut at = [0u32; BLOCK];
    let wu = w as u32;
    for o in 0..s.o {
        tile_outputs(&m[o * 16 * tb..][..16 * tb], tb, bias.map_or(0.0, |b| b[o]), relu, &mut q);
        let [a, b, c, d] = &q;
        for i in 0..tb {
            let (m1, i1) = if b[i] > a[i] { (b[i], 1) } else { (a[i], 0) };
            let (m2, i2) = if d[i] > c[i] { (d[i], wu + 1) } else { (c[i], wu) };
            (best[i], at[i]) = if m2 > m1 { (m2, i2) } else { (m1, i1) };
        }
        for (i, n, ty, tx0, len) in row_runs(s, t0, tb) {
            if ty >= oh || tx0 >= ow {
                continue;
            }
            let len = len.min(ow - tx0);
            let o0 = ((o * s.n + n) * oh + ty) * ow + tx0;
            let base = (2 * ty * w + 2 * tx0) as u32;
            pooled[o0..o0 + len].copy_from_slice(&best[i..i + len]);
            for (k, (dst, off)) in arg[o0..o0 + len].iter_mut().zip(&at[i..i + len]).enumerate() {
                *dst = base + 2 * k as u32 + off;
            }
        }
    }
}

/// `dm = A dy A^T` of each tile of the block (zeros for outputs past the image's edge): the
/// adjoint of `output_transform` without bias and ReLU.
fn output_transform_adjoint(s: &Winograd, dy: &[f32], t0: usize, tb: usize, dm: &mut [f32]) {
    output_transform_adjoint_best(s, dy, t0, tb, dm)
}

versions!(output_transform_adjoint_best => output_transform_adjoint_body(s: &Winograd, dy: &[f32], t0: usize, tb: usize, dm: &mut [f32]));

#[inline(always)]
fn output_transform_adjoint_body(s: &Winograd, dy: &[f32], t0: usize, tb: usize, dm: &mut [f32]) {
    let (h, w, hw) = (s.h, s.w, s.plane());
    let mut d = [[0f32; BLOCK]; 4];
    let mut ds = [[0f32; BLOCK]; 8];
    for o in 0..s.o {
        // Each run of tiles reads two rows of the gradient, taking its tiles' two columns
        // apart (zeros past the image's edge).
        for (i, n, ty, tx0, len) in row_runs(s, t0, tb) {
            let plane = &dy[(o * s.n + n) * hw..][..hw];
            let x0 = 2 * tx0;
            let inside = len.min((w - x0) / 2);
            let [d0, d1, d2, d3] = &mut d;
            for (r, (da, db)) in [(d0, d1), (d2, d3)].into_iter().enumerate() {
                let (da, db) = (&mut da[i..i + len], &mut db[i..i + len]);
                let yy = 2 * ty + r;
                if yy >= h {
                    da.fill(0.0);
                    db.fill(0.0);
                    continue;
                }
                let row = &plane[yy * w..][..w];
                for ((pair, a), b) in row[x0..x0 + 2 * inside].chunks_exact(2).zip(da.iter_mut()).zip(db.iter_mut()) {
                    *a = pair[0];
                    *b = pair[1];
                }
                if inside < len {
                    let xx = x0 + 2 * inside;
                    da[inside] = if xx < w { row[xx] } else { 0.0 };
                    db[inside] = 0.0;
                }
            }
        }
        // Along the columns: output row r (d[2r], d[2r + 1]) gives ds[4r + j], j < 4.
        for r in 0..2 {
            let (d0, d1) = (&d[2 * r][..tb], &d[2 * r + 1][..tb]);
            let [e0, e1, e2, e3] = &mut ds[4 * r..4 * r + 4] else { unreachable!() };
            for i in 0..tb {
                e0[i] = d0[i];
                e1[i] = d0[i] + d1[i];
                e2[i] = d0[i] - d1[i];
                e3[i] = -d1[i];
            }
        }
        // Along the rows: dm[ii][j] from ds[j] (row 0) and ds[4 + j] (row 1).
        let dmo = &mut dm[o * 16 * tb..][..16 * tb];
        for (xi, row) in dmo.chunks_exact_mut(tb).enumerate() {
            let (ii, j) = (xi / 4, xi % 4);
            let (a, b) = (&ds[j][..tb], &ds[4 + j][..tb]);
            match ii {
                0 => row.copy_from_slice(a),
                1 => row.iter_mut().zip(a.iter().zip(b)).for_each(|(r, (a, b))| *r = a + b),
                2 => row.iter_mut().zip(a.iter().zip(b)).for_each(|(r, (a, b))| *r = a - b),
                _ => row.iter_mut().zip(b).for_each(|(r, b)| *r = -b),
            }
        }
    }
}

/// The backward pass of `forward` given the output's gradient `dy` (already through the
/// ReLU): the transformed weights' gradient `du` (written; bring it to `[O][C][3][3]` with
/// `filter_transform_adjoint`) and, when asked, the input's gradient `dx` (written).
#[allow(clippy::too_many_arguments)]
pub fn backward(s: &Winograd, u: &[f32], v: &[f32], dy: &[f32], du: &mut [f32], dx: Option<&mut [f32]>, scratch: &mut [f32]) -> Result<(), KernelError> {
    s.validate()?;
    check("transformed weights", u.len(), s.u_len())?;
    check("transformed input", v.len(), s.v_len())?;
    check("output's gradient", dy.len(), s.o * s.n * s.plane())?;
    check("transformed weights' gradient", du.len(), s.u_len())?;
    check("scratch", scratch.len(), s.scratch_len())?;
    let (tt, ts, oc) = (s.tiles(), s.tile_stride(), s.o * s.c);
    let (dm, rest) = scratch.split_at_mut(16 * s.o * BLOCK);
    let (dv, padded) = rest.split_at_mut(16 * s.c * BLOCK);
    let padded = &mut padded[..s.c * s.n * s.padded_plane()];
    if let Some(dx) = dx.as_deref() {
        check("input's gradient", dx.len(), s.c * s.n * s.plane())?;
        padded.fill(0.0);
    }
    if tt == 0 {
        // No output the pool reads: no gradient.
        du[..s.u_len()].fill(0.0);
    }
    for t0 in (0..tt).step_by(BLOCK) {
        let tb = BLOCK.min(tt - t0);
        output_transform_adjoint(s, dy, t0, tb, dm);
        for xi in 0..16 {
            // du[ξ] (+)= dm[ξ] [O x tb] · v[ξ][:, block]^T [tb x C]
            gemm_strided(&mut du[xi * oc..], s.c, &dm[xi * tb..], (16 * tb, 1), &v[xi * ts + t0..], (1, 16 * ts), (s.o, tb, s.c), t0 > 0)?;
        }
        if dx.is_some() {
            for xi in 0..16 {
                // dv[ξ] = u[ξ]^T [C x O] · dm[ξ] [O x tb]
                gemm_strided(&mut dv[xi * tb..], 16 * tb, &u[xi * oc..], (1, s.c), &dm[xi * tb..], (16 * tb, 1), (s.c, s.o, tb), false)?;
            }
            input_transform_adjoint(s, &dv[..16 * s.c * tb], t0, tb, padded);
        }
    }
    if let Some(dx) = dx {
        let (pp, pw) = (s.padded_plane(), 2 * s.tiles_w() + 2);
        for (plane, src) in dx.chunks_exact_mut(s.plane()).zip(padded.chunks_exact(pp)) {
            for (y, row) in plane.chunks_exact_mut(s.w).enumerate() {
                row.copy_from_slice(&src[(y + 1) * pw + 1..][..s.w]);
            }
        }
    }
    Ok(())
}

/// `dd = B dv B^T` of each tile of the block, added into the padded planes of the input's
/// gradient (`[C][N][2*TH + 2][2*TW + 2]`, the image at offset (1, 1)) over the tile's 4x4
/// patch. Tiles overlap by 2 rows and columns; they add in tile order.
fn input_transform_adjoint(s: &Winograd, dv: &[f32], t0: usize, tb: usize, padded: &mut [f32]) {
    input_transform_adjoint_best(s, dv, t0, tb, padded)
}

versions!(input_transform_adjoint_best => input_transform_adjoint_body(s: &Winograd, dv: &[f32], t0: usize, tb: usize, padded: &mut [f32]));

#[inline(always)]
fn input_transform_adjoint_body(s: &Winograd, dv: &[f32], t0: usize, tb: usize, padded: &mut [f32]) {
    let (pp, pw) = (s.padded_plane(), 2 * s.tiles_w() + 2);
    let mut t = [[0f32; BLOCK]; 16];
    let mut dd = [[0f32; BLOCK]; 16];
    for c in 0..s.c {
        let dvc = &dv[c * 16 * tb..][..16 * tb];
        // Within each row ii: the adjoint of (a - c, b + c, c - b, b - d) over its 4 columns.
        for ii in 0..4 {
            let v: [&[f32]; 4] = std::array::from_fn(|j| &dvc[(ii * 4 + j) * tb..][..tb]);
            let [o0, o1, o2, o3] = &mut t[ii * 4..ii * 4 + 4] else { unreachable!() };
            for i in 0..tb {
                o0[i] = v[0][i];
                o1[i] = v[1][i] - v[2][i] + v[3][i];
                o2[i] = -v[0][i] + v[1][i] + v[2][i];
                o3[i] = -v[3][i];
            }
        }
        // Then across the rows, for each column j.
        for j in 0..4 {
            let (a, b, cc, d) = (&t[j], &t[4 + j], &t[8 + j], &t[12 + j]);
            let mut rows = [[0f32; BLOCK]; 4];
            for i in 0..tb {
                rows[0][i] = a[i];
                rows[1][i] = b[i] - cc[i] + d[i];
                rows[2][i] = -a[i] + b[i] + cc[i];
                rows[3][i] = -d[i];
            }
            for (ii, r) in rows.iter().enumerate() {
                dd[ii * 4 + j][..tb].copy_from_slice(&r[..tb]);
            }
        }
        for (i, n, ty, tx0, len) in row_runs(s, t0, tb) {
            let plane = &mut padded[(c * s.n + n) * pp..][..pp];
            for ii in 0..4 {
                let row = &mut plane[(2 * ty + ii) * pw + 2 * tx0..][..2 * len + 2];
                let [e0, e1, e2, e3] = [&dd[ii * 4][i..i + len], &dd[ii * 4 + 1][i..i + len], &dd[ii * 4 + 2][i..i + len], &dd[ii * 4 + 3][i..i + len]];
                // Column 2k takes tile k's first and tile k - 1's third column (2k + 1: second
                // and fourth), both at once: no store waits for the one before it.
                row[0] += e0[0];
                row[1] += e1[0];
                for k in 1..len {
                    row[2 * k] += e2[k - 1] + e0[k];
                    row[2 * k + 1] += e3[k - 1] + e1[k];
                }
                row[2 * len] += e2[len - 1];
                row[2 * len + 1] += e3[len - 1];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut z = seed;
        (0..len)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The convolution in f64 by its definition over `[C][N][H][W]`.
    fn naive(s: &Winograd, x: &[f32], w: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; s.o * s.n * s.h * s.w];
        for o in 0..s.o {
            for n in 0..s.n {
                for yy in 0..s.h {
                    for xx in 0..s.w {
                        let mut acc = 0f64;
                        for c in 0..s.c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = ((yy + ky).wrapping_sub(1), (xx + kx).wrapping_sub(1));
                                    if iy < s.h && ix < s.w {
                                        acc += x[((c * s.n + n) * s.h + iy) * s.w + ix] as f64 * w[((o * s.c + c) * 3 + ky) * 3 + kx] as f64;
                                    }
                                }
                            }
                        }
                        y[((o * s.n + n) * s.h + yy) * s.w + xx] = acc;
                    }
                }
            }
        }
        y
    }

    fn transforms(s: &Winograd, x: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut u = vec![0f32; s.u_len()];
        let mut v = vec![0f32; s.v_len()];
        let mut scratch = vec![0f32; s.scratch_len()];
        filter_transform(s, w, &mut u).unwrap();
        input_transform(s, x, &mut v, &mut scratch).unwrap();
        (u, v)
    }

    fn run_forward(s: &Winograd, x: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut u = vec![0f32; s.u_len()];
        let mut v = vec![0f32; s.v_len()];
        let mut scratch = vec![0f32; s.scratch_len()];
        let mut y = vec![0f32; s.o * s.n * s.h * s.w];
        filter_transform(s, w, &mut u).unwrap();
        input_transform(s, x, &mut v, &mut scratch).unwrap();
        forward(s, &u, &v, None, false, &mut y, &mut scratch).unwrap();
        (y, u, v)
    }

    #[test]
    fn forward_matches_the_definition_on_odd_and_even_shapes() {
        for s in [
            Winograd { c: 3, o: 5, n: 2, h: 7, w: 5, pooled: false },
            Winograd { c: 1, o: 1, n: 1, h: 1, w: 1, pooled: false },
            Winograd { c: 4, o: 2, n: 3, h: 6, w: 8, pooled: false },
            Winograd { c: 2, o: 3, n: 70, h: 3, w: 4, pooled: false },
        ] {
            let x = lcg(1, s.c * s.n * s.h * s.w);
            let w = lcg(2, s.o * s.c * 9);
            let (y, _, _) = run_forward(&s, &x, &w);
            for (a, b) in y.iter().zip(naive(&s, &x, &w)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{s:?}: {a} vs {b}");
            }
        }
    }

    /// The backward pass against the adjoint identity `<dy, conv(x, w)> = <dx, x>` and
    /// `= <dw, w>`, in f64 from the definition.
    #[test]
    fn backward_matches_the_definition() {
        for s in [
            Winograd { c: 3, o: 4, n: 2, h: 5, w: 7, pooled: false },
            Winograd { c: 2, o: 2, n: 66, h: 4, w: 4, pooled: false },
            // For a pool: the rows and columns it drops get no gradient, as after a pool.
            Winograd { c: 3, o: 2, n: 3, h: 7, w: 5, pooled: true },
            Winograd { c: 2, o: 3, n: 2, h: 1, w: 3, pooled: true },
        ] {
            let x = lcg(3, s.c * s.n * s.h * s.w);
            let w = lcg(4, s.o * s.c * 9);
            let mut dy = lcg(5, s.o * s.n * s.h * s.w);
            if s.pooled {
                for (i, v) in dy.iter_mut().enumerate() {
                    let (yy, xx) = (i / s.w % s.h, i % s.w);
                    if yy >= s.h / 2 * 2 || xx >= s.w / 2 * 2 {
                        *v = 0.0;
                    }
                }
            }
            let (u, v) = transforms(&s, &x, &w);
            let mut du = vec![0f32; s.u_len()];
            let mut dx = vec![0f32; x.len()];
            let mut scratch = vec![0f32; s.scratch_len()];
            backward(&s, &u, &v, &dy, &mut du, Some(&mut dx), &mut scratch).unwrap();
            let mut dw = vec![0f32; w.len()];
            filter_transform_adjoint(&s, &du, &mut dw).unwrap();
            // dw[o][c][ky][kx] = sum dy[o] * x[c] shifted; dx[c] = sum_o dy[o] (*) flipped w.
            for o in 0..s.o {
                for c in 0..s.c {
                    for k in 0..9 {
                        let (ky, kx) = (k / 3, k % 3);
                        let mut acc = 0f64;
                        for n in 0..s.n {
                            for yy in 0..s.h {
                                for xx in 0..s.w {
                                    let (iy, ix) = ((yy + ky).wrapping_sub(1), (xx + kx).wrapping_sub(1));
                                    if iy < s.h && ix < s.w {
                                        acc += dy[((o * s.n + n) * s.h + yy) * s.w + xx] as f64 * x[((c * s.n + n) * s.h + iy) * s.w + ix] as f64;
                                    }
                                }
                            }
                        }
                        let got = dw[(o * s.c + c) * 9 + k] as f64;
                        assert!((got - acc).abs() < 1e-4 * (1.0 + acc.abs()), "{s:?} dw[{o}][{c}][{k}]: {got} vs {acc}");
                    }
                }
            }
            for c in 0..s.c {
                for n in 0..s.n {
                    for iy in 0..s.h {
                        for ix in 0..s.w {
                            let mut acc = 0f64;
                            for o in 0..s.o {
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let (yy, xx) = ((iy + 1).wrapping_sub(ky), (ix + 1).wrapping_sub(kx));
                                        if yy < s.h && xx < s.w {
                                            acc += dy[((o * s.n + n) * s.h + yy) * s.w + xx] as f64 * w[((o * s.c + c) * 3 + ky) * 3 + kx] as f64;
                                        }
                                    }
                                }
                            }
                            let got = dx[((c * s.n + n) * s.h + iy) * s.w + ix] as f64;
                            assert!((got - acc).abs() < 1e-5, "{s:?} dx: {got} vs {acc}");
                        }
                    }
                }
            }
        }
    }

    /// The pooled forward pass gives the bits of the full one followed by `nn::maxpool2`.
    #[test]
    fn pooled_forward_has_the_bits_of_forward_then_maxpool() {
        for s in [Winograd { c: 3, o: 4, n: 3, h: 7, w: 5, pooled: false }, Winograd { c: 2, o: 3, n: 40, h: 6, w: 6, pooled: false }, Winograd { c: 2, o: 2, n: 2, h: 1, w: 4, pooled: false }] {
            let x = lcg(7, s.c * s.n * s.h * s.w);
            let w = lcg(8, s.o * s.c * 9);
            let bias = lcg(9, s.o);
            let (_, u, v) = run_forward(&s, &x, &w);
            let mut scratch = vec![0f32; s.scratch_len()];
            let mut y = vec![0f32; s.o * s.n * s.h * s.w];
            forward(&s, &u, &v, Some(&bias), true, &mut y, &mut scratch).unwrap();
            let outs = s.o * s.n * (s.h / 2) * (s.w / 2);
            let (mut want, mut want_arg) = (vec![0f32; outs], vec![0u32; outs]);
            crate::nn::maxpool2(&y, s.o * s.n, s.h, s.w, &mut want, &mut want_arg).unwrap();
            // Only the tiles the pool reads.
            let sp = Winograd { pooled: true, ..s };
            let (_, vp) = transforms(&sp, &x, &w);
            let mut scratch = vec![0f32; sp.scratch_len()];
            let (mut got, mut got_arg) = (vec![1f32; outs], vec![7u32; outs]);
            forward_pooled(&sp, &u, &vp, Some(&bias), true, &mut got, &mut got_arg, &mut scratch).unwrap();
            assert!(forward(&sp, &u, &vp, None, false, &mut y, &mut scratch).is_err(), "a pool's shape computes no full output");
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{s:?}");
            assert_eq!(got_arg, want_arg, "{s:?}");
        }
    }

    #[test]
    fn short_buffers_are_errors() {
        let s = Winograd { c: 2, o: 2, n: 1, h: 4, w: 4, pooled: false };
        let mut u = vec![0f32; s.u_len() - 1];
        assert!(filter_transform(&s, &[0.0; 36], &mut u).is_err());
        let mut v = vec![0f32; s.v_len()];
        let mut scratch = vec![0f32; s.scratch_len()];
        assert!(input_transform(&s, &[0.0; 31], &mut v, &mut scratch).is_err());
    }
}
