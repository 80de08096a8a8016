//! Dense-layer kernels for `[training] lanes`, where a lane's gradient must be the same bits
//! whichever rank computes it and whichever other lanes share the call. gemm's summation order
//! depends on the matrix shape (its blocking and small-size paths), so lanes computed by gemm
//! must each be a call of their own, which streams the weights once per lane. Here every
//! output element is summed in one order fixed by its own indices alone, so all of a rank's
//! lanes go through one call, and the weight gradient's lane tree is summed tile by tile in
//! registers and written once.
//!
//! Each multiply-add is `f32::mul_add` (one rounding): the AVX-512 and AVX2 builds use the
//! instruction, the baseline the library routine; the bits are the same.

// Index loops over fixed-size tiles are what keeps the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use crate::KernelError;

fn check(what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len < want {
        return Err(KernelError::Shape(format!("{what}: {len} elements, need {want}")));
    }
    Ok(())
}

/// `$name(args)` runs `$body(args)` compiled for the best instruction set this CPU has (the
/// same bits in every version: each step is one IEEE operation). The body must be
/// `#[inline(always)]`, so that each version inlines it under its own target features.
macro_rules! versions {
    ($name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if crate::simd_allows(crate::Simd::Avx512) && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features the version is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if crate::simd_allows(crate::Simd::Avx2) && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

versions!(input_grad_best => input_grad_body(da: &mut [f32], dz: &[f32], w: &[f32], n: usize, dout: usize, din: usize));
versions!(tree_best => tree_body(g: &Grads, plan: &[Op], dw: &mut [f32]));

/// `z[r][j] = sum_k a[r][k] * w[j][k]` for `n` rows: `a` is `n x din`, `w` is `dout x din`
/// (a dense layer's weight), `z` is `n x dout`; `scratch` holds transposes of the (small)
/// activations. Each element: one multiply-add chain over increasing k, from +0.
pub fn dense_forward(z: &mut [f32], a: &[f32], w: &[f32], scratch: &mut Vec<f32>, n: usize, din: usize, dout: usize) -> Result<(), KernelError> {
    check("lanes forward output", z.len(), n * dout)?;
    check("lanes forward input", a.len(), n * din)?;
    check("lanes forward weight", w.len(), dout * din)?;
    if scratch.len() < n * (din + dout) {
        scratch.resize(n * (din + dout), 0.0);
    }
    let (at, zt) = scratch.split_at_mut(n * din);
    // z^T = w a^T: the weight streams once, whatever the number of rows.
    transpose(at, a, n, din);
    input_grad_best(&mut zt[..dout * n], w, at, dout, din, n);
    transpose(z, &zt[..dout * n], dout, n);
    Ok(())
}

/// `out` (`cols x rows`) = the transpose of `x` (`rows x cols`).
fn transpose(out: &mut [f32], x: &[f32], rows: usize, cols: usize) {
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..cols).step_by(16) {
            for r in r0..(r0 + 16).min(rows) {
                for c in c0..(c0 + 16).min(cols) {
                    out[c * rows + r] = x[r * cols + c];
                }
            }
        }
    }
}

/// `da[r][j] = sum_i dz[r][i] * w[i][j]` for `n` rows (the gradient of a dense layer's input):
/// `dz` is `n x dout`, `w` is `dout x din`. Each element: one multiply-add chain over
/// increasing i, from +0.
pub fn dense_input_grad(da: &mut [f32], dz: &[f32], w: &[f32], n: usize, dout: usize, din: usize) -> Result<(), KernelError> {
    check("lanes input gradient", da.len(), n * din)?;
    check("lanes output gradient", dz.len(), n * dout)?;
    check("lanes weight", w.len(), dout * din)?;
    input_grad_best(da, dz, w, n, dout, din);
    Ok(())
}

#[inline(always)]
fn input_grad_tile<const R: usize, const J: usize>(da: &mut [f32], dz: &[f32], w: &[f32], r0: usize, j0: usize, dout: usize, din: usize) {
    // The callers keep every index below in bounds (checked lengths, tiles inside them);
    // checked here once instead of per element.
    assert!((r0 + R) * dout <= dz.len() && dout * din <= w.len() && j0 + J <= din && (r0 + R) * din <= da.len());
    let mut acc = [[0.0f32; J]; R];
    for i in 0..dout {
        // SAFETY: i < dout and j0 + J <= din, so the row's J floats lie inside w (asserted).
        let wr: &[f32; J] = unsafe { &*(w.as_ptr().add(i * din + j0) as *const [f32; J]) };
        for rr in 0..R {
            // SAFETY: (r0 + rr) * dout + i < (r0 + R) * dout <= dz.len() (asserted).
            let d = unsafe { *dz.get_unchecked((r0 + rr) * dout + i) };
            for jj in 0..J {
                acc[rr][jj] = d.mul_add(wr[jj], acc[rr][jj]);
            }
        }
    }
    for (rr, acc_r) in acc.iter().enumerate() {
        da[(r0 + rr) * din + j0..][..J].copy_from_slice(acc_r);
    }
}

#[inline(always)]
fn input_grad_rows<const R: usize>(da: &mut [f32], dz: &[f32], w: &[f32], r0: usize, dout: usize, din: usize) {
    let (j64, j16) = (din / 64 * 64, din / 16 * 16);
    for j0 in (0..j64).step_by(64) {
        input_grad_tile::<R, 64>(da, dz, w, r0, j0, dout, din);
    }
    for j0 in (j64..j16).step_by(16) {
        input_grad_tile::<R, 16>(da, dz, w, r0, j0, dout, din);
    }
    for j0 in j16..din {
        input_grad_tile::<R, 1>(da, dz, w, r0, j0, dout, din);
    }
}

#[inline(always)]
fn input_grad_body(da: &mut [f32], dz: &[f32], w: &[f32], n: usize, dout: usize, din: usize) {
    // Six rows at a time: 24 accumulators, the weights' 4 vectors and a broadcast fit the 32
    // AVX-512 registers. Which tile an element falls in does not change its arithmetic.
    let mut r0 = 0;
    while r0 + 6 <= n {
        input_grad_rows::<6>(da, dz, w, r0, dout, din);
        r0 += 6;
    }
    if r0 + 4 <= n {
        input_grad_rows::<4>(da, dz, w, r0, dout, din);
        r0 += 4;
    }
    if r0 + 2 <= n {
        input_grad_rows::<2>(da, dz, w, r0, dout, din);
        r0 += 2;
    }
    if r0 < n {
        input_grad_rows::<1>(da, dz, w, r0, dout, din);
    }
}

/// A dense layer's weight and bias gradients for the lane-tree node over lanes [lo, hi):
/// `dw[i][j]` is the node's value of `sum_r dz[r][i] * a[r][j]` and `db[i]` of `sum_r dz[r][i]`,
/// where a lane's value sums its `per` rows in increasing order from +0 (multiply-add chains
/// for `dw`, additions for `db`) and a node over [lo, hi) with more than one lane is the node
/// over [lo, mid) plus the node over [mid, hi), mid = (lo + hi) / 2. Lane ids are global:
/// rows `(l - first) * per ..` of `dz` (`rows x dout`) and `a` (`rows x din`) are lane l's.
#[allow(clippy::too_many_arguments)]
pub fn lane_tree_grads(
    dw: &mut [f32],
    db: &mut [f32],
    dz: &[f32],
    a: &[f32],
    per: usize,
    first: usize,
    lo: usize,
    hi: usize,
    dout: usize,
    din: usize,
) -> Result<(), KernelError> {
    if lo >= hi || lo < first || per == 0 {
        return Err(KernelError::Shape(format!("lane node [{lo}, {hi}) is not within the lanes from {first}")));
    }
    let rows = (hi - first) * per;
    check("lanes weight gradient", dw.len(), dout * din)?;
    check("lanes bias gradient", db.len(), dout)?;
    check("lanes output gradient", dz.len(), rows * dout)?;
    check("lanes layer input", a.len(), rows * din)?;
    let g = Grads { dz, a, per, first, dout, din };
    if hi - lo > 1 << 16 {
        return Err(KernelError::Shape(format!("lane node [{lo}, {hi}) has more than 2^16 lanes")));
    }
    let mut ops = Vec::with_capacity(2 * (hi - lo));
    plan(lo, hi, &mut ops);
    tree_best(&g, &ops, dw);
    let mut spare = Vec::new();
    bias_node(&g, db, lo, hi, &mut spare);
    Ok(())
}

struct Grads<'a> {
    dz: &'a [f32],
    a: &'a [f32],
    per: usize,
    first: usize,
    dout: usize,
    din: usize,
}

/// One step of a node's evaluation, in post-order: a lane's sum, or the sum of the last two.
#[derive(Clone, Copy)]
enum Op {
    Lane(usize),
    Add,
}

/// The post-order of the node over lanes [lo, hi): evaluating it with a stack gives exactly
/// node(lo, mid) + node(mid, hi), recursively, without recursion in the hot loop.
fn plan(lo: usize, hi: usize, out: &mut Vec<Op>) {
    if hi - lo == 1 {
        out.push(Op::Lane(lo));
        return;
    }
    let mid = (lo + hi) / 2;
    plan(lo, mid, out);
    plan(mid, hi, out);
    out.push(Op::Add);
}

/// Deepest stack a plan of up to 2^16 lanes needs.
const DEPTH: usize = 18;

#[inline(always)]
fn tree_tile<const R: usize, const J: usize>(g: &Grads, plan: &[Op], i0: usize, j0: usize, stack: &mut [[[f32; J]; R]; DEPTH]) {
    let mut sp = 0;
    for &op in plan {
        match op {
            Op::Lane(l) => {
                // In registers while the lane's rows go by; one store at the end.
                let mut acc = [[0.0f32; J]; R];
                let start = (l - g.first) * g.per;
                // Checked once for the lane instead of per row.
                assert!((start + g.per) * g.din <= g.a.len() && (start + g.per) * g.dout <= g.dz.len() && j0 + J <= g.din && i0 + R <= g.dout);
                for r in start..start + g.per {
                    // SAFETY: r < start + per, j0 + J <= din and i0 + R <= dout (asserted).
                    let (ar, dr) = unsafe {
                        (&*(g.a.as_ptr().add(r * g.din + j0) as *const [f32; J]), &*(g.dz.as_ptr().add(r * g.dout + i0) as *const [f32; R]))
                    };
                    for ii in 0..R {
                        for jj in 0..J {
                            acc[ii][jj] = dr[ii].mul_add(ar[jj], acc[ii][jj]);
                        }
                    }
                }
                stack[sp] = acc;
                sp += 1;
            }
            Op::Add => {
                let (below, top) = stack.split_at_mut(sp - 1);
                for (o, r) in below[sp - 2].iter_mut().zip(&top[0]) {
                    for jj in 0..J {
                        o[jj] += r[jj];
                    }
                }
                sp -= 1;
            }
        }
    }
}

#[inline(always)]
fn tree_rows<const R: usize>(g: &Grads, plan: &[Op], dw: &mut [f32], i0: usize) {
    let din = g.din;
    let (j64, j16) = (din / 64 * 64, din / 16 * 16);
    let mut s64 = [[[0.0f32; 64]; R]; DEPTH];
    for j0 in (0..j64).step_by(64) {
        tree_tile::<R, 64>(g, plan, i0, j0, &mut s64);
        for (ii, t) in s64[0].iter().enumerate() {
            dw[(i0 + ii) * din + j0..][..64].copy_from_slice(t);
        }
    }
    let mut s16 = [[[0.0f32; 16]; R]; DEPTH];
    for j0 in (j64..j16).step_by(16) {
        tree_tile::<R, 16>(g, plan, i0, j0, &mut s16);
        for (ii, t) in s16[0].iter().enumerate() {
            dw[(i0 + ii) * din + j0..][..16].copy_from_slice(t);
        }
    }
    let mut s1 = [[[0.0f32; 1]; R]; DEPTH];
    for j0 in j16..din {
        tree_tile::<R, 1>(g, plan, i0, j0, &mut s1);
        for (ii, t) in s1[0].iter().enumerate() {
            dw[(i0 + ii) * din + j0] = t[0];
        }
    }
}

#[inline(always)]
fn tree_body(g: &Grads, plan: &[Op], dw: &mut [f32]) {
    let mut i0 = 0;
    while i0 + 6 <= g.dout {
        tree_rows::<6>(g, plan, dw, i0);
        i0 += 6;
    }
    if i0 + 4 <= g.dout {
        tree_rows::<4>(g, plan, dw, i0);
        i0 += 4;
    }
    if i0 + 2 <= g.dout {
        tree_rows::<2>(g, plan, dw, i0);
        i0 += 2;
    }
    if i0 < g.dout {
        tree_rows::<1>(g, plan, dw, i0);
    }
}

fn bias_node(g: &Grads, out: &mut [f32], lo: usize, hi: usize, spare: &mut Vec<Vec<f32>>) {
    let out = &mut out[..g.dout];
    if hi - lo == 1 {
        out.fill(0.0);
        let start = (lo - g.first) * g.per;
        for r in start..start + g.per {
            for (o, &d) in out.iter_mut().zip(&g.dz[r * g.dout..(r + 1) * g.dout]) {
                *o += d;
            }
        }
        return;
    }
    let mid = (lo + hi) / 2;
    bias_node(g, out, lo, mid, spare);
    let mut right = spare.pop().unwrap_or_else(|| vec![0.0; g.dout]);
    bias_node(g, &mut right, mid, hi, spare);
    for (o, r) in out.iter_mut().zip(&right) {
        *o += *r;
    }
    spare.push(right);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect()
    }

    #[test]
    fn rows_do_not_depend_on_the_row_count_and_match_plain_sums() {
        let (din, dout) = (37, 9);
        let (a, w) = (values(11 * din, 1), values(dout * din, 2));
        let mut all = vec![0.0; 11 * dout];
        dense_forward(&mut all, &a, &w, &mut Vec::new(), 11, din, dout).unwrap();
        for r in 0..11 {
            let mut one = vec![0.0; dout];
            dense_forward(&mut one, &a[r * din..(r + 1) * din], &w, &mut Vec::new(), 1, din, dout).unwrap();
            assert_eq!(one, all[r * dout..(r + 1) * dout], "row {r}");
            for j in 0..dout {
                let plain: f32 = (0..din).map(|k| a[r * din + k] * w[j * din + k]).sum();
                assert!((plain - all[r * dout + j]).abs() < 1e-4);
            }
        }
        let dz = values(11 * dout, 3);
        let mut da = vec![0.0; 11 * din];
        dense_input_grad(&mut da, &dz, &w, 11, dout, din).unwrap();
        for r in [0, 5, 10] {
            let mut one = vec![0.0; din];
            dense_input_grad(&mut one, &dz[r * dout..(r + 1) * dout], &w, 1, dout, din).unwrap();
            assert_eq!(one, da[r * din..(r + 1) * din], "row {r}");
            let plain: f32 = (0..dout).map(|i| dz[r * dout + i] * w[i * din + 3]).sum();
            assert!((plain - da[r * din + 3]).abs() < 1e-4);
        }
    }

    #[test]
    fn a_node_is_the_sum_of_its_halves_wherever_its_lanes_sit() {
        let (per, lanes, dout, din) = (3, 6, 5, 70);
        let (dz, a) = (values(lanes * per * dout, 4), values(lanes * per * din, 5));
        let node = |lo: usize, hi: usize| {
            let (mut dw, mut db) = (vec![0.0; dout * din], vec![0.0; dout]);
            lane_tree_grads(&mut dw, &mut db, &dz, &a, per, 0, lo, hi, dout, din).unwrap();
            (dw, db)
        };
        let (root_w, root_b) = node(0, 6);
        let ((lw, lb), (rw, rb)) = (node(0, 3), node(3, 6));
        assert_eq!(root_w, lw.iter().zip(&rw).map(|(x, y)| x + y).collect::<Vec<_>>());
        assert_eq!(root_b, lb.iter().zip(&rb).map(|(x, y)| x + y).collect::<Vec<_>>());
        // The same node from rows that start at lane 3.
        let (mut dw, mut db) = (vec![0.0; dout * din], vec![0.0; dout]);
        lane_tree_grads(&mut dw, &mut db, &dz[3 * per * dout..], &a[3 * per * din..], per, 3, 3, 6, dout, din).unwrap();
        assert_eq!((dw, db), (rw, rb));
        let plain: f32 = (0..lanes * per).map(|r| dz[r * dout + 2] * a[r * din + 7]).sum();
        assert!((plain - root_w[2 * din + 7]).abs() < 1e-4);
        assert!(lane_tree_grads(&mut vec![0.0; dout * din], &mut vec![0.0; dout], &dz, &a, per, 2, 0, 3, dout, din).is_err());
    }

    #[test]
    fn every_cpu_version_gives_the_same_bits() {
        let (n, din, dout) = (6, 83, 70);
        let (a, w, dz) = (values(n * din, 6), values(dout * din, 7), values(n * dout, 8));
        let (mut best, mut base) = (vec![0.0; n * din], vec![0.0; n * din]);
        dense_input_grad(&mut best, &dz, &w, n, dout, din).unwrap();
        input_grad_body(&mut base, &dz, &w, n, dout, din);
        assert_eq!(best, base);
        let (mut best, mut base) = (vec![0.0; dout * din], vec![0.0; dout * din]);
        lane_tree_grads(&mut best, &mut vec![0.0; dout], &dz, &a, 2, 0, 0, 3, dout, din).unwrap();
        let mut ops = Vec::new();
        plan(0, 3, &mut ops);
        tree_body(&Grads { dz: &dz, a: &a, per: 2, first: 0, dout, din }, &ops, &mut base);
        assert_eq!(best, base);
    }
}
