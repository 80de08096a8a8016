//! The numeric kernels of a GPT-style transformer that `nn` and `layers` do not have, on flat
//! f32 buffers, forward and backward: causal multi-head self-attention, the token embedding
//! and the learned position embedding. The projections around them are `nn::matmul`, the
//! norms `layers::layernorm`, the MLP's activation `layers::gelu`.
//!
//! Layouts are PyTorch's (nanoGPT's `CausalSelfAttention`):
//! - Activations are row-major `[N*T][D]` (record n's position t is row `n*T + t`).
//! - The fused projection `qkv` is `[N*T][3*D]`: q in columns `0..D`, k in `D..2D`, v in
//!   `2D..3D`; head h reads columns `h*HD..(h+1)*HD` of each (`HD = D / heads`), and writes
//!   the same columns of the output.
//! - The attention probabilities are `[N][heads][T][T]`, zero above the diagonal.
//!
//! Rules every function here keeps:
//! - Callers pass every buffer, and each must have exactly the length its shape gives; any
//!   other length is a `KernelError::Shape` naming the buffer. (Attention keeps a per-thread
//!   scratch of a few `T*T` floats, allocated once, and `gemm` allocates its packing
//!   buffers per call.)
//! - A record's results depend only on that record's data and the shapes, never on the
//!   thread count or on the other records of the batch: rayon tasks are whole (record, head)
//!   pairs or whole rows, and every sum runs inside one task, in an order fixed by the
//!   indices and the shapes. Attention's matrix products are `gemm` calls on one thread
//!   (`Parallelism::None`) whose shapes and strides depend only on `(T, HD)`, so their
//!   order is fixed too. Loops compiled for AVX-512, AVX2 and the baseline (`versions!`,
//!   picked at run time) use IEEE operations only, in fixed lane patterns, so every version
//!   gives the same bits; `gemm` picks its own kernels by the CPU at run time (as for
//!   `nn::matmul`), so attention's bits are the same on every machine with the same
//!   instruction set, not across instruction sets.
//! - `exp` is this file's own (in f32, branch free, no fused multiply-add), so the bits do
//!   not depend on the platform's libm either.

use crate::layers::exp32;
use crate::{KernelError, CHUNK};
use rayon::prelude::*;
use std::marker::PhantomData;

/// Every buffer has exactly the length its shape gives.
fn need(what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len != want {
        return Err(KernelError::Shape(format!("{what}: {len} elements, need {want}")));
    }
    Ok(())
}

/// The product of a shape's dimensions, or an error (not a panic) when it overflows.
fn size(what: &str, dims: &[usize]) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| KernelError::Shape(format!("{what}: the shape {dims:?} overflows")))
}

/// The shape of one attention call, validated: `d` splits into `heads` heads of `hd`.
struct Dims {
    hd: usize,
    qkv: usize,
    probs: usize,
    out: usize,
}

impl Dims {
    fn new(what: &str, n: usize, t: usize, heads: usize, d: usize) -> Result<Dims, KernelError> {
        if heads == 0 || d == 0 || !d.is_multiple_of(heads) {
            return Err(KernelError::Shape(format!("{what}: {d} channels do not split into {heads} heads")));
        }
        Ok(Dims {
            hd: d / heads,
            qkv: size(what, &[n, t, 3, d])?,
            probs: size(what, &[n, heads, t, t])?,
            out: size(what, &[n, t, d])?,
        })
    }
}

/// A buffer that several rayon tasks write at once, each through slices no other task
/// touches: the head blocks of interleaved rows (head h of every row of record n belongs to
/// task (n, h)), which `chunks_mut` cannot hand out.
#[derive(Clone, Copy)]
struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `Disjoint` is a `&mut [f32]` shared by tasks that each write their own elements
// (`slice`'s contract); f32 is Send and Sync.
unsafe impl Send for Disjoint<'_> {}
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    fn new(buf: &'a mut [f32]) -> Disjoint<'a> {
        Disjoint {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// A pointer to element `start`, from which a gemm writes `rows` rows of `cols` elements
    /// at row stride `rs`, after checking that they lie inside the buffer. Writing through it
    /// is `product`'s contract: no other task reaches those elements meanwhile.
    fn matrix(self, start: usize, rows: usize, cols: usize, rs: usize) -> *mut f32 {
        let end = (rows.max(1) - 1).checked_mul(rs).and_then(|o| o.checked_add(start)).and_then(|o| o.checked_add(cols));
        assert!(matches!(end, Some(e) if e <= self.len), "Disjoint::matrix out of bounds");
        // SAFETY: `start <= self.len` (checked), so in or one past the buffer.
        unsafe { self.ptr.add(start) }
    }
}

/// `a . b` over `a.len()` elements: element c goes to running sum `c % 16` (chunks of 16,
/// which vectorizes; the last one padded with zeros), and the sums are folded in halves
/// (`fold16`). Fixed by the length alone.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // Indexing fixed-size arrays is what vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let b = &b[..a.len()];
    let ((ac, ar), (bc, br)) = (a.as_chunks::<L>(), b.as_chunks::<L>());
    let mut acc = [0.0f32; L];
    for (x, y) in ac.iter().zip(bc) {
        for k in 0..L {
            acc[k] += x[k] * y[k];
        }
    }
    let (x, y) = (padded(ar, 0.0), padded(br, 0.0));
    for k in 0..L {
        acc[k] += x[k] * y[k];
    }
    fold16(acc)
}


/// The sum of 16 running sums, folded in halves (`s[k] += s[k + 8]`, then 4, 2, 1).
#[inline(always)]
fn fold16(mut acc: [f32; 16]) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            acc[k] += acc[k + w];
        }
    }
    acc[0]
}

/// The last, partial chunk of a row as a full one: `rest` then `pad`.
#[inline(always)]
fn padded(rest: &[f32], pad: f32) -> [f32; 16] {
    let mut c = [pad; 16];
    c[..rest.len()].copy_from_slice(rest);
    c
}

/// Softmax's numerators in place: `p[j] = e^(p[j] - m)` (`exp32`), and their sum: element j
/// into running sum `j % 16` (the last chunk padded with `-inf`, whose exponentials are 0),
/// then `fold16`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn exp_row(p: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let (chunks, rest) = p.as_chunks_mut::<16>();
    let mut step = |c: &mut [f32; 16]| {
        for k in 0..16 {
            let e = exp32(c[k] - m);
            c[k] = e;
            acc[k] += e;
        }
    };
    chunks.iter_mut().for_each(&mut step);
    if !rest.is_empty() {
        let mut c = padded(rest, f32::NEG_INFINITY);
        step(&mut c);
        let r = rest.len();
        rest.copy_from_slice(&c[..r]);
    }
    fold16(acc)
}

/// `p *= scale` in place, and the maximum of the results: `x > m ? x : m` per element, into
/// running maximum `j % 16` (the last chunk padded with `-inf`), folded in halves. NaNs are
/// skipped (then `exp_row` makes the row NaN).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn scale_max(p: &mut [f32], scale: f32) -> f32 {
    let max = |a: f32, b: f32| if a > b { a } else { b };
    let mut acc = [f32::NEG_INFINITY; 16];
    let (chunks, rest) = p.as_chunks_mut::<16>();
    for c in chunks {
        for k in 0..16 {
            c[k] *= scale;
            acc[k] = max(c[k], acc[k]);
        }
    }
    for v in rest.iter_mut() {
        *v *= scale;
    }
    let c = padded(rest, f32::NEG_INFINITY);
    for k in 0..16 {
        acc[k] = max(c[k], acc[k]);
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            acc[k] = max(acc[k + w], acc[k]);
        }
    }
    acc[0]
}

/// `dst[c][j] = src[j * stride + c]` for `j < rows`, `c < cols` (`dst` is `[cols][rows]`):
/// a strided block of rows transposed, 16 x 16 tiles at a time. Copies only.
#[inline(always)]
fn transpose(src: &[f32], rows: usize, cols: usize, stride: usize, dst: &mut [f32]) {
    const B: usize = 16;
    for j0 in (0..rows).step_by(B) {
        let jn = B.min(rows - j0);
        for c0 in (0..cols).step_by(B) {
            let cn = B.min(cols - c0);
            if jn == B && cn == B {
                let mut tile = [[0.0f32; B]; B];
                for (j, row) in tile.iter_mut().enumerate() {
                    row.copy_from_slice(&src[(j0 + j) * stride + c0..][..B]);
                }
                for c in 0..B {
                    let out = &mut dst[(c0 + c) * rows + j0..][..B];
                    for j in 0..B {
                        out[j] = tile[j][c];
                    }
                }
            } else {
                for j in j0..j0 + jn {
                    for c in c0..c0 + cn {
                        dst[c * rows + j] = src[j * stride + c];
                    }
                }
            }
        }
    }
}

/// Rows of a (record, head) per block of the products: row block `r0..r0 + BLOCK` multiplies
/// against keys `0..r0 + BLOCK` only (what the causal mask leaves), and key block
/// `c0..c0 + BLOCK` against rows `c0..t`. Each product's shape, so its gemm order, is fixed by
/// `(t, hd)` and the block.
const BLOCK: usize = 32;

/// A pointer to the `rows x cols` matrix at the start of `s` with strides `(rs, cs)`, after
/// checking that every element of it lies inside `s`.
fn operand(s: &[f32], rows: usize, cols: usize, (rs, cs): (usize, usize)) -> *const f32 {
    assert!(
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < s.len(),
        "attention: a {rows}x{cols} operand with strides ({rs}, {cs}) overruns its {} elements",
        s.len()
    );
    s.as_ptr()
}

/// A pointer to the `rows x cols` block at the start of `s` with row stride `rs` (columns
/// contiguous), after checking that it lies inside `s`: a gemm destination.
fn target(s: &mut [f32], rows: usize, cols: usize, rs: usize) -> *mut f32 {
    operand(s, rows, cols, (rs, 1));
    s.as_mut_ptr()
}

/// `c = a b`, overwritten: `a` is `m x k`, `b` is `k x n`, `c` is `m x n` with row stride
/// `c_rs` (columns contiguous); `a` and `b` are pointers from `operand` with their `(row,
/// column)` strides. gemm runs on this thread (`Parallelism::None`), so its summation order
/// depends only on the shapes and strides, never on the thread count or the other tasks.
/// (gemm computes a row-major `c` as `c^T = b^T a^T`, and gathers `b^T` element by element
/// into packed panels unless `b`'s rows are contiguous: hence the transposed copies of k
/// and v below, for the products with `k^T` and `v^T`.)
///
/// # Safety
/// `a` and `b` point to matrices of those shapes and strides that lie inside their buffers
/// (checked by `operand`), and so does `c`, whose elements nothing else reads or writes
/// during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn product(m: usize, k: usize, n: usize, c: *mut f32, c_rs: usize, a: *const f32, (a_rs, a_cs): (usize, usize), b: *const f32, (b_rs, b_cs): (usize, usize)) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            false,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Rows `r0..r0 + rows` of one (record, head)'s probabilities from its scores: `p` holds
/// those rows (`[rows][t]`), with row i's scores `q_i . k_j` in columns `0..=i` (what lies
/// past them is ignored). Each becomes `softmax_{j<=i}(score * scale)` (`scale_max`, then
/// `exp_row` less the maximum, then times the reciprocal of the sum), zeros after column i.
/// The passes run over whole chunks of 16 where the row has room (columns `i+1..` padded
/// with `-inf` in place), which is what `scale_max` and `exp_row` do with a partial last
/// chunk anyway: the same bits either way.
///
/// Eight rows at a time go through each pass before the next pass starts, so that the
/// rows' dependency chains (maximum, exponentials, sum, reciprocal) overlap.
#[inline(always)]
fn softmax_rows(p: &mut [f32], t: usize, r0: usize, scale: f32) {
    const G: usize = 8;
    for (gi, group) in p.chunks_mut(G * t).enumerate() {
        let n = |r: usize| r0 + gi * G + r + 1;
        let w = |r: usize| n(r).next_multiple_of(16).min(t);
        let mut m = [0.0f32; G];
        for (r, row) in group.chunks_exact_mut(t).enumerate() {
            row[n(r)..w(r)].fill(f32::NEG_INFINITY);
            m[r] = scale_max(&mut row[..w(r)], scale);
        }
        for (r, row) in group.chunks_exact_mut(t).enumerate() {
            m[r] = 1.0 / exp_row(&mut row[..w(r)], m[r]);
        }
        for (r, row) in group.chunks_exact_mut(t).enumerate() {
            for v in row[..n(r)].iter_mut() {
                *v *= m[r];
            }
            row[n(r)..].fill(0.0);
        }
    }
}

/// Rows `r0..r0 + rows` of one (record, head)'s score gradient: `p` the probabilities and
/// `dp` (in, `dP = dout v^T` in columns `0..=i` of row i) the same rows, `[rows][t]`. With
/// `D_i = sum_{j<=i} P_ij dP_ij` (`dot`'s order), `dp` becomes `dS = P (dP - D) * scale`, and
/// `pm` gets P; both are zero after column i (whatever `probs` holds there).
#[inline(always)]
fn grad_rows(p: &[f32], dp: &mut [f32], pm: &mut [f32], t: usize, r0: usize, scale: f32) {
    const G: usize = 8;
    for (gi, ((p, dp), pm)) in p.chunks(G * t).zip(dp.chunks_mut(G * t)).zip(pm.chunks_mut(G * t)).enumerate() {
        let n = |r: usize| r0 + gi * G + r + 1;
        let mut rowdot = [0.0f32; G];
        for (r, ((p, dp), pm)) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)).zip(pm.chunks_exact_mut(t)).enumerate() {
            let n = n(r);
            pm[..n].copy_from_slice(&p[..n]);
            pm[n..].fill(0.0);
            dp[n..].fill(0.0);
            // Whole chunks of 16 where the row has room: the zeros past column i are `dot`'s
            // own padding, so the bits are those of `dot(&p[..n], &dp[..n])`.
            let w = n.next_multiple_of(16).min(t);
            rowdot[r] = dot(&pm[..w], &dp[..w]);
        }
        for (r, (dp, pm)) in dp.chunks_exact_mut(t).zip(pm.chunks_exact(t)).enumerate() {
            let n = n(r);
            for (g, &pj) in dp[..n].iter_mut().zip(&pm[..n]) {
                *g = pj * (*g - rowdot[r]) * scale;
            }
        }
    }
}

versions!(softmax_rows_best => softmax_rows(p: &mut [f32], t: usize, r0: usize, scale: f32));
versions!(grad_rows_best => grad_rows(p: &[f32], dp: &mut [f32], pm: &mut [f32], t: usize, r0: usize, scale: f32));
versions!(transpose_best => transpose(src: &[f32], rows: usize, cols: usize, stride: usize, dst: &mut [f32]));

/// One (record, head) of the forward pass. `x`: the record's `[t][3d]` rows of qkv; `probs`:
/// its head's `[t][t]`; `out`: the whole output, of which this task writes columns
/// `h*hd..(h+1)*hd` of rows `row0..row0 + t` only; `kt`: `[hd][t]` scratch, for k
/// transposed. Per row block: the scores `S = Q K^T` (gemm, into `probs`), `softmax_rows`,
/// then `O = P V` (gemm, into `out`).
#[allow(clippy::too_many_arguments)]
fn forward_head(x: &[f32], t: usize, d: usize, hd: usize, h: usize, scale: f32, probs: &mut [f32], out: Disjoint<'_>, row0: usize, kt: &mut [f32]) {
    let stride = 3 * d;
    let (qc, kc, vc) = (h * hd, d + h * hd, 2 * d + h * hd);
    transpose_best(&x[kc..], t, hd, stride, kt);
    for r0 in (0..t).step_by(BLOCK) {
        let (r1, rows) = ((r0 + BLOCK).min(t), BLOCK.min(t - r0));
        let p = &mut probs[r0 * t..r1 * t];
        let (q, k) = (operand(&x[r0 * stride + qc..], rows, hd, (stride, 1)), operand(kt, hd, r1, (t, 1)));
        // SAFETY: operands checked by `operand` and `target`; `p` is this task's.
        unsafe { product(rows, hd, r1, target(p, rows, r1, t), t, q, (stride, 1), k, (t, 1)) };
        softmax_rows_best(p, t, r0, scale);
        let (pp, v) = (operand(p, rows, r1, (t, 1)), operand(&x[vc..], r1, hd, (stride, 1)));
        // SAFETY: as above; the destination is head h's columns of this record's rows r0..r1,
        // which no other task touches.
        unsafe { product(rows, r1, hd, out.matrix((row0 + r0) * d + qc, rows, hd, d), d, pp, (t, 1), v, (stride, 1)) };
    }
}

/// One (record, head) of the backward pass, from the forward's probabilities P (`probs`,
/// `[t][t]`) and the output's gradient (`dout`, the record's `[t][d]`); `ds` and `pm` are
/// `[t][t]` scratch, `vt` `[hd][t]`. Per row block: `dP = dout V^T` (gemm), `grad_rows` (dS,
/// and P masked), `dq = dS K`; then per key block: `dv = P^T dout`, `dk = dS^T Q`. `dS`
/// carries the `1/sqrt(hd)` scale.
#[allow(clippy::too_many_arguments)]
fn backward_head(
    x: &[f32],
    probs: &[f32],
    dout: &[f32],
    t: usize,
    d: usize,
    hd: usize,
    h: usize,
    scale: f32,
    dx: Disjoint<'_>,
    row0: usize,
    (ds, pm, vt): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let stride = 3 * d;
    let (qc, kc, vc) = (h * hd, d + h * hd, 2 * d + h * hd);
    let base = row0 * stride;
    transpose_best(&x[vc..], t, hd, stride, vt);
    for r0 in (0..t).step_by(BLOCK) {
        let (r1, rows) = ((r0 + BLOCK).min(t), BLOCK.min(t - r0));
        let g = &mut ds[r0 * t..r1 * t];
        let (dy, v) = (operand(&dout[r0 * d + qc..], rows, hd, (d, 1)), operand(vt, hd, r1, (t, 1)));
        // SAFETY: operands checked; `g` is this task's scratch.
        unsafe { product(rows, hd, r1, target(g, rows, r1, t), t, dy, (d, 1), v, (t, 1)) };
        grad_rows_best(&probs[r0 * t..r1 * t], g, &mut pm[r0 * t..r1 * t], t, r0, scale);
        let (gs, k) = (operand(g, rows, r1, (t, 1)), operand(&x[kc..], r1, hd, (stride, 1)));
        // SAFETY: as above; the destination is head h's q columns of this record's rows
        // r0..r1, this task's alone.
        unsafe { product(rows, r1, hd, dx.matrix(base + r0 * stride + qc, rows, hd, stride), stride, gs, (t, 1), k, (stride, 1)) };
    }
    for c0 in (0..t).step_by(BLOCK) {
        let (cols, below) = (BLOCK.min(t - c0), t - c0);
        let (pt, dy) = (operand(&pm[c0 * t + c0..], cols, below, (1, t)), operand(&dout[c0 * d + qc..], below, hd, (d, 1)));
        // SAFETY: as above (v's columns of rows c0..c0 + cols).
        unsafe { product(cols, below, hd, dx.matrix(base + c0 * stride + vc, cols, hd, stride), stride, pt, (1, t), dy, (d, 1)) };
        let (gt, q) = (operand(&ds[c0 * t + c0..], cols, below, (1, t)), operand(&x[c0 * stride + qc..], below, hd, (stride, 1)));
        // SAFETY: as above (k's columns).
        unsafe { product(cols, below, hd, dx.matrix(base + c0 * stride + kc, cols, hd, stride), stride, gt, (1, t), q, (stride, 1)) };
    }
}

thread_local! {
    /// Per-task scratch (k or v transposed, and backward's dS and masked P), kept per thread
    /// so that a step allocates none once it has run. Every element a task reads it has
    /// written first, so what one task leaves behind never shows in another's results; and
    /// a task never yields to rayon while it holds the scratch (its gemm calls run on this
    /// thread), so one borrow at a time.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch, at least `len` floats long.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with_borrow_mut(|s| {
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Causal multi-head self-attention, forward: the token-mixing step of a GPT block, with
/// PyTorch's layouts and the bits of each record fixed by that record alone. `qkv`: rows
/// `[n*t][3*d]`, each row q (cols 0..d), k (d..2d), v (2d..3d); head h uses cols
/// `h*hd..(h+1)*hd` of each (`hd = d/heads`), exactly as PyTorch's
/// `q, k, v = qkv.split(d, -1); q.view(n, t, heads, hd).transpose(1, 2)`.
/// `probs`: `[n][heads][t][t]`, written: row i holds `softmax_{j<=i}(q_i.k_j / sqrt(hd))`
/// and zeros for j > i (the backward pass reads it). `out`: `[n*t][d]`, head h's output at
/// cols `h*hd..` (PyTorch's `y.transpose(1, 2).reshape(n, t, d)`).
///
/// Per (record, head), in row blocks of `BLOCK` (32) queries, each against the keys up to
/// the block's last: scores `Q K^T` by `gemm`, times `1/sqrt(hd)`; the softmax subtracts
/// the row's maximum and exponentiates in f32 (`exp32`); `out = P V` by `gemm`. The masked
/// probabilities are exactly 0, but as in PyTorch's `P @ V` they still multiply the later
/// positions of the block's keys, so a non-finite v can reach earlier rows of its block.
pub fn causal_attention(qkv: &[f32], n: usize, t: usize, heads: usize, d: usize, probs: &mut [f32], out: &mut [f32]) -> Result<(), KernelError> {
    let g = Dims::new("causal attention", n, t, heads, d)?;
    need("attention qkv", qkv.len(), g.qkv)?;
    need("attention probs", probs.len(), g.probs)?;
    need("attention output", out.len(), g.out)?;
    if g.out == 0 {
        return Ok(());
    }
    let scale = 1.0 / (g.hd as f32).sqrt();
    let out = Disjoint::new(out);
    probs.par_chunks_mut(t * t).enumerate().for_each(|(task, p)| {
        let (b, h) = (task / heads, task % heads);
        with_scratch(g.hd * t, |kt| forward_head(&qkv[b * t * 3 * d..][..t * 3 * d], t, d, g.hd, h, scale, p, out, b * t, kt));
    });
    Ok(())
}

/// Causal attention's backward pass, so a transformer trains without autograd: `dqkv`
/// (`[n*t][3*d]`, overwritten) from `dout` (`[n*t][d]`) and the forward's `qkv` and `probs`.
/// Only the entries j <= i of `probs` are read. Per (record, head) (see `backward_head`):
/// `dP = dout V^T`, `D_i = sum_j P_ij dP_ij`, `dS = P (dP - D) / sqrt(hd)`, then
/// `dq = dS K`, `dk = dS^T Q`, `dv = P^T dout`, each product a `gemm` over the causal
/// blocks only.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    n: usize,
    t: usize,
    heads: usize,
    d: usize,
    dqkv: &mut [f32],
) -> Result<(), KernelError> {
    let g = Dims::new("causal attention backward", n, t, heads, d)?;
    need("attention qkv", qkv.len(), g.qkv)?;
    need("attention probs", probs.len(), g.probs)?;
    need("attention output gradient", dout.len(), g.out)?;
    need("attention qkv gradient", dqkv.len(), g.qkv)?;
    if g.out == 0 {
        return Ok(());
    }
    let scale = 1.0 / (g.hd as f32).sqrt();
    let dx = Disjoint::new(dqkv);
    probs.par_chunks(t * t).enumerate().for_each(|(task, p)| {
        let (b, h) = (task / heads, task % heads);
        let (x, dy) = (&qkv[b * t * 3 * d..][..t * 3 * d], &dout[b * t * d..][..t * d]);
        with_scratch(2 * t * t + g.hd * t, |s| {
            let (ds, rest) = s.split_at_mut(t * t);
            let (pm, vt) = rest.split_at_mut(t * t);
            backward_head(x, p, dy, t, d, g.hd, h, scale, dx, b * t, (ds, pm, vt));
        });
    });
    Ok(())
}

/// Row r's token id as an index: an exact integer in `0..vocab` (NaN fails every test).
fn token(r: usize, id: f32, vocab: usize) -> Result<usize, KernelError> {
    if id >= 0.0 && id.fract() == 0.0 && (id as f64) < vocab as f64 {
        Ok(id as usize)
    } else {
        Err(KernelError::Shape(format!(
            "embedding: row {r} has id {id}, which is not a token id in 0..{vocab}"
        )))
    }
}

/// Rows of `d` floats per rayon task of the embedding copies: about `CHUNK` floats.
fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// Token embedding, the transformer's input layer (token ids travel as f32 in the batch):
/// `out[r] = table[ids[r]]`, table `[vocab][d]`, out `[ids.len()][d]`. An id that is not an
/// integer in `0..vocab` is an error naming the row and the id (nothing is written then).
pub fn embedding(ids: &[f32], table: &[f32], vocab: usize, d: usize, out: &mut [f32]) -> Result<(), KernelError> {
    need("embedding table", table.len(), size("embedding table", &[vocab, d])?)?;
    need("embedding output", out.len(), size("embedding output", &[ids.len(), d])?)?;
    for (r, &id) in ids.iter().enumerate() {
        token(r, id, vocab)?;
    }
    if d == 0 {
        return Ok(());
    }
    let per = rows_per_task(d);
    out.par_chunks_mut(per * d).zip(ids.par_chunks(per)).for_each(|(o, ids)| {
        for (o, &id) in o.chunks_exact_mut(d).zip(ids) {
            o.copy_from_slice(&table[id as usize * d..][..d]);
        }
    });
    Ok(())
}

/// The embedding's gradient, which a tied output head adds to as well (so it accumulates):
/// `dtable[v] += dout[r]` for every row r with `ids[r] == v`, in increasing r. Rayon tasks own
/// blocks of table rows and each scans all the ids, so every element's order is r's.
pub fn embedding_backward(ids: &[f32], dout: &[f32], vocab: usize, d: usize, dtable: &mut [f32]) -> Result<(), KernelError> {
    need("embedding output gradient", dout.len(), size("embedding output gradient", &[ids.len(), d])?)?;
    need("embedding table gradient", dtable.len(), size("embedding table gradient", &[vocab, d])?)?;
    for (r, &id) in ids.iter().enumerate() {
        token(r, id, vocab)?;
    }
    if d == 0 || vocab == 0 {
        return Ok(());
    }
    // At most 64 blocks: each task reads all the ids once.
    let block = vocab.div_ceil(64);
    dtable.par_chunks_mut(block * d).enumerate().for_each(|(bi, rows)| {
        let (lo, hi) = (bi * block, bi * block + rows.len() / d);
        for (&id, g) in ids.iter().zip(dout.chunks_exact(d)) {
            let v = id as usize;
            if (lo..hi).contains(&v) {
                for (t, g) in rows[(v - lo) * d..][..d].iter_mut().zip(g) {
                    *t += *g;
                }
            }
        }
    });
    Ok(())
}

/// The learned position embedding (GPT-2's `wpe`), added in place: `x[n][t][d] += pos[t][d]`.
pub fn add_positions(x: &mut [f32], pos: &[f32], n: usize, t: usize, d: usize) -> Result<(), KernelError> {
    need("positions input", x.len(), size("positions input", &[n, t, d])?)?;
    need("position table", pos.len(), size("position table", &[t, d])?)?;
    if t * d == 0 {
        return Ok(());
    }
    x.par_chunks_mut(t * d).for_each(|rec| {
        for (x, p) in rec.iter_mut().zip(pos) {
            *x += *p;
        }
    });
    Ok(())
}

/// The position table's gradient: `dpos[t][d] = sum over records of dx[n][t][d]` (overwritten),
/// from 0 in record order, whatever the thread count (tasks own rows of `dpos`).
pub fn positions_backward(dx: &[f32], n: usize, t: usize, d: usize, dpos: &mut [f32]) -> Result<(), KernelError> {
    need("positions gradient", dx.len(), size("positions gradient", &[n, t, d])?)?;
    need("position table gradient", dpos.len(), size("position table gradient", &[t, d])?)?;
    if t * d == 0 {
        return Ok(());
    }
    dpos.par_chunks_mut(d).enumerate().for_each(|(ti, row)| {
        row.fill(0.0);
        for b in 0..n {
            for (p, g) in row.iter_mut().zip(&dx[(b * t + ti) * d..][..d]) {
                *p += *g;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test data: xorshift64*, uniform in [-1, 1) (as in `layers`' tests).
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

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&v| v as f64).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// `got` against an f64 reference: `|got - want| <= rel * max(|want|, floor * max|want|)`
    /// (entries that cancel to near zero are judged at the scale of the largest).
    fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, floor: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let big = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = rel * w.abs().max(floor * big).max(f64::MIN_POSITIVE);
            assert!((g as f64 - w).abs() <= tol, "{what}[{i}]: {g} vs {w} (tolerance {tol:e})");
        }
    }

    /// Central differences in f64 of `f` at `x`, step `step * max(|x|, 1)`.
    fn numeric_grad_step(x: &[f32], step: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut p = f64s(x);
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

    fn dot64(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(&a, &b)| a as f64 * b).sum()
    }

    /// Causal attention from its definition, in f64: (out `[n*t][d]`, probs `[n][heads][t][t]`).
    fn naive_attention(qkv: &[f64], n: usize, t: usize, heads: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let hd = d / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let at = |b: usize, i: usize, part: usize, h: usize, c: usize| qkv[(b * t + i) * 3 * d + part * d + h * hd + c];
        let (mut out, mut probs) = (vec![0.0; n * t * d], vec![0.0; n * heads * t * t]);
        for b in 0..n {
            for h in 0..heads {
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| (0..hd).map(|c| at(b, i, 0, h, c) * at(b, j, 1, h, c)).sum::<f64>() * scale)
                        .collect();
                    let m = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for j in 0..=i {
                        probs[((b * heads + h) * t + i) * t + j] = e[j] / sum;
                    }
                    for c in 0..hd {
                        out[(b * t + i) * d + h * hd + c] = (0..=i).map(|j| e[j] / sum * at(b, j, 2, h, c)).sum();
                    }
                }
            }
        }
        (out, probs)
    }

    /// Causal attention's gradient from its definition, in f64: dqkv `[n*t][3*d]` for the
    /// output gradient `dout`.
    fn naive_attention_backward(qkv: &[f64], dout: &[f64], n: usize, t: usize, heads: usize, d: usize) -> Vec<f64> {
        let hd = d / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let (_, probs) = naive_attention(qkv, n, t, heads, d);
        let at = |b: usize, i: usize, part: usize, h: usize| (b * t + i) * 3 * d + part * d + h * hd;
        let mut g = vec![0.0; qkv.len()];
        for b in 0..n {
            for h in 0..heads {
                for i in 0..t {
                    let p = &probs[((b * heads + h) * t + i) * t..][..=i];
                    let dy = &dout[(b * t + i) * d + h * hd..][..hd];
                    let dp: Vec<f64> = (0..=i).map(|j| (0..hd).map(|c| dy[c] * qkv[at(b, j, 2, h) + c]).sum()).collect();
                    let rowdot: f64 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - rowdot) * scale;
                        for c in 0..hd {
                            g[at(b, i, 0, h) + c] += ds * qkv[at(b, j, 1, h) + c];
                            g[at(b, j, 1, h) + c] += ds * qkv[at(b, i, 0, h) + c];
                            g[at(b, j, 2, h) + c] += p[j] * dy[c];
                        }
                    }
                }
            }
        }
        g
    }

    /// Shapes (n, t, heads, d): the brief's case, one position, one head, heads of 20 (one
    /// full 16-lane chunk and a tail) and of 32, and more positions than a row block (two
    /// blocks, the second partial, and rows longer than a 16-lane chunk).
    const SHAPES: [(usize, usize, usize, usize); 6] =
        [(2, 5, 2, 8), (2, 1, 2, 8), (1, 6, 1, 4), (1, 7, 2, 40), (2, 4, 2, 64), (1, BLOCK + 8, 2, 16)];

    /// Random qkv; `sharp` scales q and k so the softmax is far from uniform.
    fn random_qkv(rng: &mut Rng, n: usize, t: usize, d: usize, sharp: f32) -> Vec<f32> {
        let mut x = rng.vec(n * t * 3 * d);
        for row in x.chunks_exact_mut(3 * d) {
            row[..2 * d].iter_mut().for_each(|v| *v *= sharp);
        }
        x
    }

    fn run_forward(qkv: &[f32], n: usize, t: usize, heads: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        // Dirty buffers: everything must be written.
        let (mut probs, mut out) = (vec![f32::NAN; n * heads * t * t], vec![f32::NAN; n * t * d]);
        causal_attention(qkv, n, t, heads, d, &mut probs, &mut out).unwrap();
        (out, probs)
    }

    fn run_backward(qkv: &[f32], probs: &[f32], dout: &[f32], n: usize, t: usize, heads: usize, d: usize) -> Vec<f32> {
        let mut dqkv = vec![f32::NAN; n * t * 3 * d];
        causal_attention_backward(qkv, probs, dout, n, t, heads, d, &mut dqkv).unwrap();
        dqkv
    }

    #[test]
    fn attention_exp_matches_libm() {
        let mut x = -87.0f32;
        while x <= 1.0 {
            let (got, want) = (exp32(x) as f64, (x as f64).exp());
            assert!((got / want - 1.0).abs() < 4e-7, "exp({x}): {got} vs {want}");
            x += 0.0137;
        }
        for x in [-1e-10f32, 0.0, -0.0, -0.3465, 0.3466, -86.99] {
            assert!((exp32(x) as f64 / (x as f64).exp() - 1.0).abs() < 4e-7, "exp({x})");
        }
        assert_eq!(exp32(0.0), 1.0);
        assert_eq!(exp32(-88.0), 0.0);
        assert_eq!(exp32(f32::NEG_INFINITY), 0.0);
        assert!(exp32(f32::NAN).is_nan());
    }

    #[test]
    fn attention_forward_matches_the_definition() {
        let mut rng = Rng(1);
        for (n, t, heads, d) in SHAPES {
            for sharp in [1.0, 4.0] {
                let qkv = random_qkv(&mut rng, n, t, d, sharp);
                let (out, probs) = run_forward(&qkv, n, t, heads, d);
                let (want_out, want_probs) = naive_attention(&f64s(&qkv), n, t, heads, d);
                let what = format!("n={n} t={t} heads={heads} d={d} sharp={sharp}");
                // Probabilities: relative to themselves (tiny ones too, down to 1e-4 of 1).
                assert_close(&format!("probs {what}"), &probs, &want_probs, 2e-5, 1e-4);
                assert!(probs.iter().zip(&want_probs).all(|(&p, &w)| (w == 0.0) == (p == 0.0)), "{what}: the mask");
                // Outputs mix v in [-1, 1]: judged at the scale of the largest.
                assert_close(&format!("out {what}"), &out, &want_out, 2e-5, 0.05);
                if t == 1 {
                    // One position: it attends to itself only, so out is v, bit for bit.
                    for (o, x) in out.chunks_exact(d).zip(qkv.chunks_exact(3 * d)) {
                        assert_eq!(bits(o), bits(&x[2 * d..]));
                    }
                }
            }
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = Rng(2);
        for (n, t, heads, d) in SHAPES {
            for sharp in [1.0, 3.0] {
                let qkv = random_qkv(&mut rng, n, t, d, sharp);
                let (_, probs) = run_forward(&qkv, n, t, heads, d);
                let dout = rng.vec(n * t * d);
                let dqkv = run_backward(&qkv, &probs, &dout, n, t, heads, d);
                let fd = numeric_grad_step(&qkv, 1e-5, |x| dot64(&dout, &naive_attention(x, n, t, heads, d).0));
                let what = format!("dqkv n={n} t={t} heads={heads} d={d} sharp={sharp}");
                assert_close(&what, &dqkv, &fd, 1e-4, 0.01);
                if t == 1 {
                    // A softmax over one score is constant: q and k get nothing, v gets dout.
                    for (g, dy) in dqkv.chunks_exact(3 * d).zip(dout.chunks_exact(d)) {
                        assert!(g[..2 * d].iter().all(|&v| v == 0.0), "{what}");
                        assert_eq!(bits(&g[2 * d..]), bits(dy));
                    }
                }
            }
        }
    }

    #[test]
    fn attention_is_causal() {
        let mut rng = Rng(3);
        for (n, t, heads, d) in SHAPES {
            let qkv = random_qkv(&mut rng, n, t, d, 2.0);
            let (out, probs) = run_forward(&qkv, n, t, heads, d);
            let b = n - 1;
            for j in 0..t {
                // Position j's k and v changed, in every head: no row before j moves.
                let mut moved = qkv.clone();
                moved[(b * t + j) * 3 * d + d..(b * t + j + 1) * 3 * d]
                    .iter_mut()
                    .for_each(|v| *v = -3.0 * *v + 0.5);
                let (out2, probs2) = run_forward(&moved, n, t, heads, d);
                let after = (b * t + j) * d;
                assert_eq!(bits(&out2[..after]), bits(&out[..after]), "t={t} j={j}: rows before j");
                assert_ne!(bits(&out2[after..after + d]), bits(&out[after..after + d]), "row j itself moves");
                for h in 0..heads {
                    let p = ((b * heads + h) * t) * t;
                    assert_eq!(bits(&probs2[p..p + j * t]), bits(&probs[p..p + j * t]), "probs rows before {j}");
                }
            }
            for i in 0..t {
                // A gradient in row i alone reaches no k or v after i, and no q but row i's.
                let mut dout = vec![0.0; n * t * d];
                dout[(b * t + i) * d..(b * t + i + 1) * d].copy_from_slice(&rng.vec(d));
                let dqkv = run_backward(&qkv, &probs, &dout, n, t, heads, d);
                for (r, g) in dqkv.chunks_exact(3 * d).enumerate() {
                    let (rb, ri) = (r / t, r % t);
                    if rb != b || ri > i {
                        assert!(g.iter().all(|&v| v == 0.0), "t={t} i={i}: row {r} of dqkv");
                    } else if ri != i {
                        assert!(g[..d].iter().all(|&v| v == 0.0), "t={t} i={i}: dq of row {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn attention_bits_do_not_depend_on_the_batch_or_the_threads() {
        let mut rng = Rng(4);
        for (_, t, heads, d) in SHAPES {
            let (a, b) = (random_qkv(&mut rng, 1, t, d, 2.0), random_qkv(&mut rng, 1, t, d, 2.0));
            let (da, db) = (rng.vec(t * d), rng.vec(t * d));
            let both = [a.clone(), b.clone()].concat();
            let dboth = [da.clone(), db.clone()].concat();
            let (out, probs) = run_forward(&both, 2, t, heads, d);
            let dqkv = run_backward(&both, &probs, &dboth, 2, t, heads, d);
            for (k, (x, dy)) in [(&a, &da), (&b, &db)].into_iter().enumerate() {
                let (o1, p1) = run_forward(x, 1, t, heads, d);
                let g1 = run_backward(x, &p1, dy, 1, t, heads, d);
                assert_eq!(bits(&o1), bits(&out[k * t * d..(k + 1) * t * d]), "out of record {k}");
                assert_eq!(bits(&p1), bits(&probs[k * heads * t * t..(k + 1) * heads * t * t]), "probs of record {k}");
                assert_eq!(bits(&g1), bits(&dqkv[k * t * 3 * d..(k + 1) * t * 3 * d]), "dqkv of record {k}");
            }
            // One thread: the same bits as the default pool.
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let (o1, p1, g1) = pool.install(|| {
                let (o, p) = run_forward(&both, 2, t, heads, d);
                let g = run_backward(&both, &p, &dboth, 2, t, heads, d);
                (o, p, g)
            });
            assert_eq!((bits(&o1), bits(&p1), bits(&g1)), (bits(&out), bits(&probs), bits(&dqkv)));
        }
    }

    #[test]
    fn attention_every_instruction_set_gives_the_same_bits() {
        // The element-wise passes between the products go through `versions!`: their `_best`
        // versions (AVX-512 or AVX2 where the CPU has them) against the bodies compiled for
        // the baseline. The products themselves are gemm's, which picks its kernels by the
        // CPU at run time whatever the caller was compiled for: one machine always runs the
        // same gemm code, so they are not compared here.
        let mut rng = Rng(5);
        for (t, r0, rows) in [(9, 0, 9), (70, 64, 6), (130, 0, 64), (130, 64, 64), (17, 3, 5), (1, 0, 1), (33, 32, 1), (130, 128, 2)] {
            let scale = 0.3;
            let s: Vec<f32> = rng.vec(rows * t).iter().map(|v| v * 8.0).collect();
            let (mut pa, mut pb) = (s.clone(), s.clone());
            softmax_rows_best(&mut pa, t, r0, scale);
            softmax_rows(&mut pb, t, r0, scale);
            assert_eq!(bits(&pa), bits(&pb), "softmax t={t} r0={r0}");
            let dp = rng.vec(rows * t);
            let (mut ga, mut gb) = (dp.clone(), dp.clone());
            let (mut ma, mut mb) = (vec![f32::NAN; rows * t], vec![f32::NAN; rows * t]);
            grad_rows_best(&pa, &mut ga, &mut ma, t, r0, scale);
            grad_rows(&pa, &mut gb, &mut mb, t, r0, scale);
            assert_eq!((bits(&ga), bits(&ma)), (bits(&gb), bits(&mb)), "grad t={t} r0={r0}");
        }
    }

    #[test]
    fn attention_long_rows_match_the_f64_reference() {
        // Several row blocks (the last partial), rows of many 16-lane chunks, heads that are
        // not a multiple of 16: forward against the definition, backward against the
        // gradient's definition (finite differences would take too long here).
        let mut rng = Rng(10);
        for (n, t, heads, d) in [(2, 2 * BLOCK + 6, 2, 24), (1, 4 * BLOCK + 2, 1, 16), (1, 3 * BLOCK, 4, 64)] {
            for sharp in [1.0, 3.0] {
                let qkv = random_qkv(&mut rng, n, t, d, sharp);
                let (out, probs) = run_forward(&qkv, n, t, heads, d);
                let (want_out, want_probs) = naive_attention(&f64s(&qkv), n, t, heads, d);
                let what = format!("n={n} t={t} heads={heads} d={d} sharp={sharp}");
                assert_close(&format!("probs {what}"), &probs, &want_probs, 2e-5, 1e-4);
                assert!(probs.iter().zip(&want_probs).all(|(&p, &w)| (w == 0.0) == (p == 0.0)), "{what}: the mask");
                assert_close(&format!("out {what}"), &out, &want_out, 2e-5, 0.05);
                let dout = rng.vec(n * t * d);
                let dqkv = run_backward(&qkv, &probs, &dout, n, t, heads, d);
                let want = naive_attention_backward(&f64s(&qkv), &f64s(&dout), n, t, heads, d);
                assert_close(&format!("dqkv {what}"), &dqkv, &want, 5e-5, 0.01);
            }
        }
    }

    #[test]
    fn attention_padded_chunks_have_the_bits_of_the_partial_ones() {
        // `softmax_rows` and `grad_rows` run whole 16-lane chunks padded in place where the
        // row has room; `scale_max`, `exp_row` and `dot` pad a partial last chunk themselves.
        // Both must give the bits of the row's own length.
        let mut rng = Rng(9);
        for (t, r0, rows) in [(40, 0, 32), (40, 32, 8), (70, 64, 6), (37, 32, 5), (80, 32, 16), (130, 96, 32)] {
            let scale = 0.4;
            let s: Vec<f32> = rng.vec(rows * t).iter().map(|v| v * 6.0).collect();
            let mut p = s.clone();
            softmax_rows(&mut p, t, r0, scale);
            let dp = rng.vec(rows * t);
            let (mut g, mut pm) = (dp.clone(), vec![f32::NAN; rows * t]);
            grad_rows(&p, &mut g, &mut pm, t, r0, scale);
            for r in 0..rows {
                let n = r0 + r + 1;
                let mut row = s[r * t..][..n].to_vec();
                let m = scale_max(&mut row, scale);
                let inv = 1.0 / exp_row(&mut row, m);
                row.iter_mut().for_each(|v| *v *= inv);
                assert_eq!(bits(&p[r * t..][..n]), bits(&row), "softmax t={t} row {}", r0 + r);
                assert!(p[r * t + n..(r + 1) * t].iter().all(|&v| v.to_bits() == 0), "softmax zeros");
                let (pr, dpr) = (&p[r * t..][..n], &dp[r * t..][..n]);
                let rowdot = dot(pr, dpr);
                let want: Vec<f32> = pr.iter().zip(dpr).map(|(&pj, &g)| pj * (g - rowdot) * scale).collect();
                assert_eq!(bits(&g[r * t..][..n]), bits(&want), "grad t={t} row {}", r0 + r);
                assert_eq!(bits(&pm[r * t..][..n]), bits(pr));
                assert!(g[r * t + n..(r + 1) * t].iter().chain(&pm[r * t + n..(r + 1) * t]).all(|&v| v.to_bits() == 0));
            }
        }
        // `transpose`, tiles and edges.
        for (rows, cols, stride) in [(40, 24, 30), (16, 16, 16), (5, 3, 7), (33, 17, 17)] {
            let src = rng.vec(rows * stride);
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_best(&src, rows, cols, stride, &mut dst);
            for j in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + j].to_bits(), src[j * stride + c].to_bits());
                }
            }
        }
    }

    #[test]
    fn attention_refuses_wrong_lengths_and_shapes() {
        let (n, t, heads, d) = (2, 3, 2, 4);
        let qkv = vec![0.0; n * t * 3 * d];
        let (mut probs, mut out) = (vec![0.0; n * heads * t * t], vec![0.0; n * t * d]);
        let msg = |r: Result<(), KernelError>| r.unwrap_err().to_string();
        assert!(msg(causal_attention(&qkv[1..], n, t, heads, d, &mut probs, &mut out)).contains("qkv"));
        assert!(msg(causal_attention(&qkv, n, t, heads, d, &mut probs[1..], &mut out)).contains("probs"));
        assert!(msg(causal_attention(&qkv, n, t, heads, d, &mut probs, &mut [0.0; 25])).contains("output"));
        assert!(msg(causal_attention(&qkv, n, t, 3, d, &mut probs, &mut out)).contains("heads"));
        assert!(msg(causal_attention(&qkv, n, t, 0, d, &mut probs, &mut out)).contains("heads"));
        assert!(msg(causal_attention(&qkv, usize::MAX, t, heads, d, &mut probs, &mut out)).contains("overflows"));
        causal_attention(&qkv, n, t, heads, d, &mut probs, &mut out).unwrap();
        let mut dqkv = vec![0.0; qkv.len()];
        assert!(msg(causal_attention_backward(&qkv, &probs, &out[1..], n, t, heads, d, &mut dqkv)).contains("output gradient"));
        assert!(msg(causal_attention_backward(&qkv, &probs, &out, n, t, heads, d, &mut dqkv[1..])).contains("qkv gradient"));
        assert!(msg(causal_attention_backward(&qkv, &probs[1..], &out, n, t, heads, d, &mut dqkv)).contains("probs"));
        causal_attention_backward(&qkv, &probs, &out, n, t, heads, d, &mut dqkv).unwrap();
        // Empty batches are fine.
        causal_attention(&[], 0, t, heads, d, &mut [], &mut []).unwrap();
        causal_attention_backward(&[], &[], &[], n, 0, heads, d, &mut []).unwrap();
    }

    #[test]
    fn attention_embedding_forward_backward_and_bad_ids() {
        let (vocab, d) = (5, 3);
        let table: Vec<f32> = (0..vocab * d).map(|i| i as f32 * 0.5 - 1.0).collect();
        let ids = [2.0f32, 0.0, 2.0, 4.0, -0.0];
        let mut out = vec![f32::NAN; ids.len() * d];
        embedding(&ids, &table, vocab, d, &mut out).unwrap();
        assert_eq!(out, [2.0, 2.5, 3.0, -1.0, -0.5, 0.0, 2.0, 2.5, 3.0, 5.0, 5.5, 6.0, -1.0, -0.5, 0.0]);
        // Bad ids: named by row and value, and nothing written.
        let big = vec![0.0; 256 * d];
        let mut o = vec![7.0; 3 * d];
        for (bad, text) in [
            (300.0f32, "300"),
            (2.5, "2.5"),
            (-1.0, "-1"),
            (f32::NAN, "NaN"),
            (256.0, "256"),
            (f32::INFINITY, "inf"),
        ] {
            let e = embedding(&[1.0, bad, 3.0], &big, 256, d, &mut o).unwrap_err().to_string();
            assert!(e.contains("row 1") && e.contains(text), "{e}");
            assert!(o.iter().all(|&v| v == 7.0));
            let e = embedding_backward(&[1.0, 2.0, bad], &o, 256, d, &mut vec![0.0; 256 * d])
                .unwrap_err()
                .to_string();
            assert!(e.contains("row 2") && e.contains(text), "{e}");
        }
        assert!(embedding(&ids, &table[1..], vocab, d, &mut out).unwrap_err().to_string().contains("table"));
        assert!(embedding(&ids, &table, vocab, d, &mut out[1..]).unwrap_err().to_string().contains("output"));

        // Backward: accumulates onto what dtable held, rows in increasing r (a direct loop's
        // bits), over more rows than one task copies.
        let mut rng = Rng(6);
        let (vocab, d, rows) = (70, 9, 4000);
        let ids: Vec<f32> = (0..rows).map(|_| ((rng.next() + 1.0) * 35.0).floor().min(69.0)).collect();
        let dout = rng.vec(rows * d);
        let start = rng.vec(vocab * d);
        let mut dtable = start.clone();
        embedding_backward(&ids, &dout, vocab, d, &mut dtable).unwrap();
        let mut want = start.clone();
        for (r, &id) in ids.iter().enumerate() {
            for c in 0..d {
                want[id as usize * d + c] += dout[r * d + c];
            }
        }
        assert_eq!(bits(&dtable), bits(&want));
        // And the gradient of sum(dout * embedding(table)), differenced (it is linear).
        let table = rng.vec(vocab * d);
        let fd = numeric_grad_step(&table, 0.5, |tb| {
            ids.iter()
                .enumerate()
                .map(|(r, &id)| (0..d).map(|c| dout[r * d + c] as f64 * tb[id as usize * d + c]).sum::<f64>())
                .sum()
        });
        let mut grad = vec![0.0; vocab * d];
        embedding_backward(&ids, &dout, vocab, d, &mut grad).unwrap();
        assert_close("embedding dtable", &grad, &fd, 1e-4, 0.01);
        let mut y = vec![0.0; rows * d];
        embedding(&ids, &table, vocab, d, &mut y).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            assert_eq!(y[r * d..(r + 1) * d], table[id as usize * d..(id as usize + 1) * d]);
        }
        assert!(embedding_backward(&ids, &dout[1..], vocab, d, &mut grad)
            .unwrap_err()
            .to_string()
            .contains("output gradient"));
        assert!(embedding_backward(&ids, &dout, vocab, d, &mut grad[1..])
            .unwrap_err()
            .to_string()
            .contains("table gradient"));
    }

    #[test]
    fn attention_positions_match_a_direct_loop() {
        let mut rng = Rng(7);
        for (n, t, d) in [(3, 5, 4), (1, 1, 7), (4, 9, 33)] {
            let (x, pos) = (rng.vec(n * t * d), rng.vec(t * d));
            let mut y = x.clone();
            add_positions(&mut y, &pos, n, t, d).unwrap();
            let mut want = x.clone();
            for b in 0..n {
                for i in 0..t * d {
                    want[b * t * d + i] += pos[i];
                }
            }
            assert_eq!(bits(&y), bits(&want));
            let dx = rng.vec(n * t * d);
            let mut dpos = vec![f32::NAN; t * d];
            positions_backward(&dx, n, t, d, &mut dpos).unwrap();
            let mut want = vec![0.0f32; t * d];
            for b in 0..n {
                for i in 0..t * d {
                    want[i] += dx[b * t * d + i];
                }
            }
            assert_eq!(bits(&dpos), bits(&want));
            assert!(add_positions(&mut y, &pos[1..], n, t, d).unwrap_err().to_string().contains("position table"));
            assert!(add_positions(&mut y[1..], &pos, n, t, d).unwrap_err().to_string().contains("positions input"));
            assert!(positions_backward(&dx, n, t, d, &mut dpos[1..])
                .unwrap_err()
                .to_string()
                .contains("table gradient"));
            assert!(positions_backward(&dx[1..], n, t, d, &mut dpos)
                .unwrap_err()
                .to_string()
                .contains("positions gradient"));
        }
    }

    /// Forward + backward at a GPT-small-ish block size: `cargo test -p shoal-kernels --release
    /// --lib attention::tests::attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_timing() {
        use std::time::Instant;
        let (n, t, heads, d) = (16, 128, 4, 256);
        let mut rng = Rng(8);
        let qkv = random_qkv(&mut rng, n, t, d, 1.0);
        let dout = rng.vec(n * t * d);
        let (mut probs, mut out, mut dqkv) = (vec![0.0; n * heads * t * t], vec![0.0; n * t * d], vec![0.0; n * t * 3 * d]);
        let best = |f: &mut dyn FnMut()| {
            f();
            (0..20)
                .map(|_| {
                    let s = Instant::now();
                    f();
                    s.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        let fwd = best(&mut || causal_attention(&qkv, n, t, heads, d, &mut probs, &mut out).unwrap());
        let bwd = best(&mut || causal_attention_backward(&qkv, &probs, &dout, n, t, heads, d, &mut dqkv).unwrap());
        // Multiply-adds of the causal half: q.k and p.v forward, four products backward.
        let pairs = (n * heads * t * (t + 1) / 2) as f64;
        let hd = (d / heads) as f64;
        println!(
            "n={n} t={t} heads={heads} d={d}, {} threads: forward {:.3} ms ({:.1} GFLOP/s), backward {:.3} ms ({:.1} GFLOP/s)",
            rayon::current_num_threads(),
            fwd * 1e3,
            pairs * hd * 4.0 / fwd * 1e-9,
            bwd * 1e3,
            pairs * hd * 8.0 / bwd * 1e-9
        );
    }
}

