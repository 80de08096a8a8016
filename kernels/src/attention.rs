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
//! - Nothing allocates: callers pass every buffer, and each must have exactly the length its
//!   shape gives; any other length is a `KernelError::Shape` naming the buffer.
//! - A record's results depend only on that record's data and the shapes, never on the
//!   thread count or on the other records of the batch: rayon tasks are whole (record, head)
//!   pairs or whole rows, and every sum runs inside one task, in an order fixed by the
//!   indices. Loops compiled for AVX-512, AVX2 and the baseline (`versions!`, picked at run
//!   time) use IEEE operations only, in fixed lane patterns, so every version gives the
//!   same bits.
//! - `exp` is this file's own (in f64, branch free), so the bits do not depend on the
//!   platform's libm either.

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

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// While the slice lives, no other slice of the same buffer overlaps it (on any thread).
    #[inline(always)]
    unsafe fn slice(self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start <= self.len && len <= self.len - start, "Disjoint::slice out of bounds");
        // SAFETY: in bounds (asserted); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// `a . b` over `a.len()` elements: element c goes to running sum `c % 16` (chunks of 16,
/// which vectorizes), the sums are folded in halves (`s[k] += s[k + 8]`, then 4, 2, 1), and
/// the tail past the last full chunk is added to that, in order. Fixed by the length alone.
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
    let mut w = L;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            acc[k] += acc[k + w];
        }
    }
    let mut s = acc[0];
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Four `dot`s of `a` at once, each in `dot`'s order (so with its bits): the four chains
/// interleave, and `a` is read once.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    const L: usize = 16;
    let n = a.len();
    let (ac, ar) = a.as_chunks::<L>();
    let [b0, b1, b2, b3] = b.map(|b| b[..n].as_chunks::<L>());
    let mut acc = [[0.0f32; L]; 4];
    for ((((x, y0), y1), y2), y3) in ac.iter().zip(b0.0).zip(b1.0).zip(b2.0).zip(b3.0) {
        for k in 0..L {
            acc[0][k] += x[k] * y0[k];
            acc[1][k] += x[k] * y1[k];
            acc[2][k] += x[k] * y2[k];
            acc[3][k] += x[k] * y3[k];
        }
    }
    let tails = [b0.1, b1.1, b2.1, b3.1];
    let mut out = [0.0f32; 4];
    for u in 0..4 {
        let acc = &mut acc[u];
        let mut w = L;
        while w > 1 {
            w /= 2;
            for k in 0..w {
                acc[k] += acc[k + w];
            }
        }
        let mut s = acc[0];
        for (x, y) in ar.iter().zip(tails[u]) {
            s += x * y;
        }
        out[u] = s;
    }
    out
}

/// `y += a * x`, element by element.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let x = &x[..y.len()];
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Four `axpy`s in one pass over `y`: `y += a[0] x[0]`, then `a[1] x[1]`, ..., each element
/// in that order (their bits), `y` loaded and stored once.
#[inline(always)]
fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    let n = y.len();
    let [x0, x1, x2, x3] = x.map(|x| &x[..n]);
    for c in 0..n {
        y[c] = (((y[c] + a[0] * x0[c]) + a[1] * x1[c]) + a[2] * x2[c]) + a[3] * x3[c];
    }
}

/// `o = sum_j w[j] * x[j*stride..][..o.len()]` from 0, in increasing j for every element (the
/// bits of `o.fill(0.0)` then an `axpy` per j), 64 columns at a time held in registers
/// across the rows.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn weighted_rows(o: &mut [f32], w: &[f32], x: &[f32], stride: usize) {
    const B: usize = 64;
    let (blocks, rest) = o.as_chunks_mut::<B>();
    for (bi, ob) in blocks.iter_mut().enumerate() {
        let mut acc = [0.0f32; B];
        for (j, &wj) in w.iter().enumerate() {
            let xr = x[j * stride + bi * B..][..B].as_chunks::<B>().0;
            for k in 0..B {
                acc[k] += wj * xr[0][k];
            }
        }
        *ob = acc;
    }
    let c0 = blocks.len() * B;
    rest.fill(0.0);
    for (j, &wj) in w.iter().enumerate() {
        axpy(rest, wj, &x[j * stride + c0..]);
    }
}

/// `e^x` in f64, branch free (so it vectorizes) and the same bits everywhere: a copy of
/// `layers::exp64` (private there). `x = k ln2 + r` with `|r| <= ln2/2` (Cody-Waite, ln2
/// split so `k*LN2_HI` is exact), `e^r` by its Taylor polynomial of degree 12, scaled by
/// `2^k` built in the exponent bits. Relative error about 3e-16. NaN gives NaN; below -708
/// the result is 0, above 708 it is `e^708` (softmax only takes x <= 0).
#[inline(always)]
fn exp64(x: f64) -> f64 {
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 0.693_147_180_369_123_8; // fdlibm's ln2_hi (0x3fe62e42fee00000)
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
    let c = if under { -708.0 } else { x };
    let c = if c > 708.0 { 708.0 } else { c };
    let kf = c * LOG2_E + SHIFT;
    let k = kf - SHIFT;
    let r = (c - k * LN2_HI) - k * LN2_LO;
    let mut p = C[12];
    for &a in C[..12].iter().rev() {
        p = p * r + a;
    }
    let scale = f64::from_bits(kf.to_bits().wrapping_add(1023) << 52);
    if under {
        0.0
    } else {
        p * scale
    }
}

/// Softmax's numerators in place: `p[j] = f32(e^(p[j] - m))` (the difference and the
/// exponential in f64), and their sum in f64 (element j into running sum `j % 8`, the sums
/// added pairwise at the end), so the stored values are normalized exactly by it.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn exp_row(p: &mut [f32], m: f32) -> f64 {
    let m = m as f64;
    let mut acc = [0.0f64; 8];
    let (chunks, rest) = p.as_chunks_mut::<8>();
    for c in chunks {
        for k in 0..8 {
            let e = exp64(c[k] as f64 - m) as f32;
            c[k] = e;
            acc[k] += e as f64;
        }
    }
    for (k, v) in rest.iter_mut().enumerate() {
        let e = exp64(*v as f64 - m) as f32;
        *v = e;
        acc[k] += e as f64;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// One (record, head) of the forward pass. `x`: the record's `[t][3d]` rows of qkv; `probs`:
/// its head's `[t][t]`; `out`: the whole output, of which this task writes columns
/// `h*hd..(h+1)*hd` of rows `row0..row0 + t` only.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_head(x: &[f32], t: usize, d: usize, hd: usize, h: usize, scale: f32, probs: &mut [f32], out: Disjoint<'_>, row0: usize) {
    let stride = 3 * d;
    let (qc, kc, vc) = (h * hd, d + h * hd, 2 * d + h * hd);
    for (i, p) in probs.chunks_exact_mut(t).enumerate() {
        let q = &x[i * stride + qc..][..hd];
        // Scores, and their maximum (a NaN score is skipped here and makes the row NaN below).
        let mut m = f32::NEG_INFINITY;
        let key = |j: usize| &x[j * stride + kc..][..hd];
        let (quads, rest) = p[..=i].as_chunks_mut::<4>();
        for (j4, s4) in quads.iter_mut().enumerate() {
            let j = 4 * j4;
            let dots = dot4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (s, dot) in s4.iter_mut().zip(dots) {
                *s = dot * scale;
                m = if *s > m { *s } else { m };
            }
        }
        let j0 = 4 * quads.len();
        for (j, s) in rest.iter_mut().enumerate() {
            *s = dot(q, key(j0 + j)) * scale;
            m = if *s > m { *s } else { m };
        }
        let sum = exp_row(&mut p[..=i], m);
        for v in p[..=i].iter_mut() {
            *v = (*v as f64 / sum) as f32;
        }
        p[i + 1..].fill(0.0);
        // SAFETY: row i of this record, head h's columns: this task's alone.
        let o = unsafe { out.slice((row0 + i) * d + qc, hd) };
        weighted_rows(o, &p[..=i], &x[vc..], stride);
    }
}

/// One (record, head) of the backward pass, from the forward's probabilities P (`probs`,
/// `[t][t]`) and the output's gradient (`dout`, the record's `[t][d]`). With `dP = dout v^T`
/// and `D_i = sum_j P_ij dP_ij = dout_i . o_i` (o_i recomputed as in the forward, in dq_i's
/// place), `dS = P (dP - D) * scale`, `dq = dS k`, `dk = dS^T q`, `dv = P^T dout`; dk_j and
/// dv_j add their terms in increasing i, dq_i in increasing j.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head(x: &[f32], probs: &[f32], dout: &[f32], t: usize, d: usize, hd: usize, h: usize, scale: f32, dx: Disjoint<'_>, row0: usize) {
    let stride = 3 * d;
    let (qc, kc, vc) = (h * hd, d + h * hd, 2 * d + h * hd);
    let base = row0 * stride;
    for j in 0..t {
        // SAFETY: every slice taken from `dx` here is head h's columns of this record's rows
        // (this task's alone), and the ones alive at once are different columns or rows.
        unsafe {
            dx.slice(base + j * stride + kc, hd).fill(0.0);
            dx.slice(base + j * stride + vc, hd).fill(0.0);
        }
    }
    for (i, p) in probs.chunks_exact(t).enumerate() {
        let p = &p[..=i];
        let g = &dout[i * d + qc..][..hd];
        let q = &x[i * stride + qc..][..hd];
        // SAFETY: as above (q's columns of row i).
        let dq = unsafe { dx.slice(base + i * stride + qc, hd) };
        weighted_rows(dq, p, &x[vc..], stride);
        let rowdot = dot(g, dq);
        dq.fill(0.0);
        let (key, value) = (|j: usize| &x[j * stride + kc..][..hd], |j: usize| &x[j * stride + vc..][..hd]);
        let (quads, rest) = p.as_chunks::<4>();
        for (j4, p4) in quads.iter().enumerate() {
            let j = 4 * j4;
            let dots = dot4(g, [value(j), value(j + 1), value(j + 2), value(j + 3)]);
            let ds: [f32; 4] = std::array::from_fn(|u| p4[u] * (dots[u] - rowdot) * scale);
            axpy4(dq, ds, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for u in 0..4 {
                // SAFETY: as above (k's and v's columns of row j + u, apart from dq's).
                let (dk, dv) = unsafe { (dx.slice(base + (j + u) * stride + kc, hd), dx.slice(base + (j + u) * stride + vc, hd)) };
                axpy(dk, ds[u], q);
                axpy(dv, p4[u], g);
            }
        }
        let j0 = 4 * quads.len();
        for (j, &pj) in rest.iter().enumerate() {
            let ds = pj * (dot(g, value(j0 + j)) - rowdot) * scale;
            axpy(dq, ds, key(j0 + j));
            // SAFETY: as above.
            let (dk, dv) = unsafe { (dx.slice(base + (j0 + j) * stride + kc, hd), dx.slice(base + (j0 + j) * stride + vc, hd)) };
            axpy(dk, ds, q);
            axpy(dv, pj, g);
        }
    }
}

versions!(forward_head_best => forward_head(x: &[f32], t: usize, d: usize, hd: usize, h: usize, scale: f32, probs: &mut [f32], out: Disjoint<'_>, row0: usize));
versions!(backward_head_best => backward_head(x: &[f32], probs: &[f32], dout: &[f32], t: usize, d: usize, hd: usize, h: usize, scale: f32, dx: Disjoint<'_>, row0: usize));

/// Causal multi-head self-attention, forward: the token-mixing step of a GPT block, with
/// PyTorch's layouts and the bits of each record fixed by that record alone. `qkv`: rows
/// `[n*t][3*d]`, each row q (cols 0..d), k (d..2d), v (2d..3d); head h uses cols
/// `h*hd..(h+1)*hd` of each (`hd = d/heads`), exactly as PyTorch's
/// `q, k, v = qkv.split(d, -1); q.view(n, t, heads, hd).transpose(1, 2)`.
/// `probs`: `[n][heads][t][t]`, written: row i holds `softmax_{j<=i}(q_i.k_j / sqrt(hd))`
/// and zeros for j > i (the backward pass reads it). `out`: `[n*t][d]`, head h's output at
/// cols `h*hd..` (PyTorch's `y.transpose(1, 2).reshape(n, t, d)`).
///
/// Scores are f32 dots (the `dot` order) times `1/sqrt(hd)`; the softmax subtracts the row's
/// maximum and exponentiates in f64; each output element sums `p_ij v_j` in increasing j.
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
        forward_head_best(&qkv[b * t * 3 * d..][..t * 3 * d], t, d, g.hd, h, scale, p, out, b * t);
    });
    Ok(())
}

/// Causal attention's backward pass, so a transformer trains without autograd: `dqkv`
/// (`[n*t][3*d]`, overwritten) from `dout` (`[n*t][d]`) and the forward's `qkv` and `probs`.
/// Only the entries j <= i of `probs` are read.
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
        backward_head_best(x, p, dy, t, d, g.hd, h, scale, dx, b * t);
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

    /// Shapes (n, t, heads, d): the brief's case, one position, one head, heads of 20 (one
    /// full 16-lane chunk and a tail) and of 32.
    const SHAPES: [(usize, usize, usize, usize); 5] = [(2, 5, 2, 8), (2, 1, 2, 8), (1, 6, 1, 4), (1, 7, 2, 40), (2, 4, 2, 64)];

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
        for x in [-708.0, -300.5, -20.0, -1.0, -1e-10, 0.0, 0.3, 1.0] {
            assert!((exp64(x) / x.exp() - 1.0).abs() < 1e-15, "exp({x})");
        }
        assert_eq!(exp64(-709.0), 0.0);
        assert!(exp64(f64::NAN).is_nan());
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
        // The `_best` versions (AVX-512 or AVX2 where the CPU has them) against the bodies
        // compiled for the baseline.
        let mut rng = Rng(5);
        for (t, heads, d) in [(9, 2, 40), (5, 1, 64), (3, 3, 24)] {
            let x = random_qkv(&mut rng, 1, t, d, 3.0);
            let dy = rng.vec(t * d);
            let scale = 1.0 / ((d / heads) as f32).sqrt();
            for h in 0..heads {
                let (mut pa, mut pb, mut oa, mut ob) = (vec![0.0; t * t], vec![0.0; t * t], vec![0.0; t * d], vec![0.0; t * d]);
                forward_head_best(&x, t, d, d / heads, h, scale, &mut pa, Disjoint::new(&mut oa), 0);
                forward_head(&x, t, d, d / heads, h, scale, &mut pb, Disjoint::new(&mut ob), 0);
                assert_eq!((bits(&pa), bits(&oa)), (bits(&pb), bits(&ob)), "forward t={t} d={d} h={h}");
                let (mut ga, mut gb) = (vec![0.0; t * 3 * d], vec![0.0; t * 3 * d]);
                backward_head_best(&x, &pa, &dy, t, d, d / heads, h, scale, Disjoint::new(&mut ga), 0);
                backward_head(&x, &pa, &dy, t, d, d / heads, h, scale, Disjoint::new(&mut gb), 0);
                assert_eq!(bits(&ga), bits(&gb), "backward t={t} d={d} h={h}");
            }
        }
    }

    #[test]
    fn attention_blocked_helpers_have_the_bits_of_the_plain_loops() {
        // `dot4`, `axpy4` and `weighted_rows` claim the bits of `dot` and of `axpy` in order.
        let mut rng = Rng(9);
        for len in [1, 4, 15, 16, 20, 64, 80, 131] {
            let a = rng.vec(len);
            let bs: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(len)).collect();
            let four = dot4(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
            for u in 0..4 {
                assert_eq!(four[u].to_bits(), dot(&a, &bs[u]).to_bits(), "dot4 len={len}");
            }
            let w = [0.5f32, -1.25, 3.0, 1e-3];
            let (mut y4, mut y1) = (a.clone(), a.clone());
            axpy4(&mut y4, w, [&bs[0], &bs[1], &bs[2], &bs[3]]);
            for u in 0..4 {
                axpy(&mut y1, w[u], &bs[u]);
            }
            assert_eq!(bits(&y4), bits(&y1), "axpy4 len={len}");
            let (rows, stride) = (7, len + 3);
            let x = rng.vec(rows * stride);
            let w = rng.vec(rows);
            let (mut o, mut want) = (vec![f32::NAN; len], vec![0.0; len]);
            weighted_rows(&mut o, &w, &x, stride);
            for (j, &wj) in w.iter().enumerate() {
                axpy(&mut want, wj, &x[j * stride..]);
            }
            assert_eq!(bits(&o), bits(&want), "weighted_rows len={len}");
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
