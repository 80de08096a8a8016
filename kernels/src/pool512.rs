//! 2x2 max pooling (stride 2) with AVX-512: 16 windows at a time, the even and odd columns
//! taken apart with one permute. The same comparisons as `nn`'s scalar loops (`>`, the first
//! maximum in the order top-left, top-right, bottom-left, bottom-right; NaN never wins), so
//! the same bits and the same `arg`. Callers check the lengths and the CPU.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// Lanes `0..n` (n <= 16).
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 }
}

#[inline(always)]
unsafe fn idx(f: impl Fn(i32) -> i32) -> __m512i {
    let v: [i32; 16] = std::array::from_fn(|k| f(k as i32));
    // SAFETY: an unaligned load of 16 i32 from a local array.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

/// `y`, `arg` of the planes `z[planes][h][w]` (plane p's bias `bias[p / per_bias]` added, then
/// ReLU when `relu`, before pooling), as `nn::bias_act_maxpool2`.
///
/// # Safety
/// The CPU has AVX-512F; `z` holds `planes * h * w`, `y` and `arg` `planes * (h/2) * (w/2)`
/// elements, `bias` (when given) `planes / per_bias` rounded up.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn maxpool2(z: &[f32], bias: Option<&[f32]>, per_bias: usize, relu: bool, planes: usize, h: usize, w: usize, y: &mut [f32], arg: &mut [u32]) {
    let (oh, ow) = (h / 2, w / 2);
    let even = unsafe { idx(|k| 2 * k) };
    let odd = unsafe { idx(|k| 2 * k + 1) };
    let steps = unsafe { idx(|k| 2 * k) };
    let zero = _mm512_setzero_ps();
    let (one, wv, w1) = (_mm512_set1_epi32(1), _mm512_set1_epi32(w as i32), _mm512_set1_epi32(w as i32 + 1));
    for p in 0..planes {
        let b = bias.map(|b| _mm512_set1_ps(b[p / per_bias]));
        let act = |v: __m512| {
            let v = match b {
                Some(b) => _mm512_add_ps(v, b),
                None => v,
            };
            if relu { _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero), zero) } else { v }
        };
        for oy in 0..oh {
            let top = z.as_ptr().add((p * h + 2 * oy) * w);
            let bottom = top.add(w);
            let o = (p * oh + oy) * ow;
            for c0 in (0..ow).step_by(16) {
                let cnt = (ow - c0).min(16);
                let (lo, hi) = (lanes(2 * cnt), lanes((2 * cnt).saturating_sub(16)));
                // SAFETY: masked loads touch only the 2*cnt inputs of these windows.
                let (t0, t1) = (act(_mm512_maskz_loadu_ps(lo, top.add(2 * c0))), act(_mm512_maskz_loadu_ps(hi, top.add(2 * c0 + 16))));
                let (b0, b1) = (act(_mm512_maskz_loadu_ps(lo, bottom.add(2 * c0))), act(_mm512_maskz_loadu_ps(hi, bottom.add(2 * c0 + 16))));
                let (a, bb) = (_mm512_permutex2var_ps(t0, even, t1), _mm512_permutex2var_ps(t0, odd, t1));
                let (c, d) = (_mm512_permutex2var_ps(b0, even, b1), _mm512_permutex2var_ps(b0, odd, b1));
                let base = _mm512_add_epi32(_mm512_set1_epi32((2 * oy * w + 2 * c0) as i32), steps);
                let k1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(bb, a);
                let (m1, i1) = (_mm512_mask_blend_ps(k1, a, bb), _mm512_mask_blend_epi32(k1, base, _mm512_add_epi32(base, one)));
                let k2 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, c);
                let (m2, i2) = (_mm512_mask_blend_ps(k2, c, d), _mm512_mask_blend_epi32(k2, _mm512_add_epi32(base, wv), _mm512_add_epi32(base, w1)));
                let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m2, m1);
                let out = lanes(cnt);
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(o + c0), out, _mm512_mask_blend_ps(k, m1, m2));
                _mm512_mask_storeu_epi32(arg.as_mut_ptr().add(o + c0).cast(), out, _mm512_mask_blend_epi32(k, i1, i2));
            }
        }
    }
}

/// `nn::maxpool2_backward_dense`: every element of `dx[planes][h][w]` written once.
///
/// # Safety
/// The CPU has AVX-512F; `dy`, `arg` (and `pooled`) hold `planes * (h/2) * (w/2)` elements,
/// `dx` `planes * h * w`. (An `arg` outside its window only leaves the window's gradient 0.)
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn maxpool2_backward(dy: &[f32], arg: &[u32], pooled: Option<&[f32]>, planes: usize, h: usize, w: usize, dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    let steps = unsafe { idx(|k| 2 * k) };
    let lo_idx = unsafe { idx(|k| if k % 2 == 0 { k / 2 } else { 16 + k / 2 }) };
    let hi_idx = unsafe { idx(|k| if k % 2 == 0 { 8 + k / 2 } else { 24 + k / 2 }) };
    let zero = _mm512_setzero_ps();
    let (one, wv, w1) = (_mm512_set1_epi32(1), _mm512_set1_epi32(w as i32), _mm512_set1_epi32(w as i32 + 1));
    for p in 0..planes {
        let plane = dx.as_mut_ptr().add(p * h * w);
        for oy in 0..oh {
            let top = plane.add(2 * oy * w);
            let bottom = top.add(w);
            let o = (p * oh + oy) * ow;
            for c0 in (0..ow).step_by(16) {
                let cnt = (ow - c0).min(16);
                let out = lanes(cnt);
                // `0.0 + g`, as the scatter adds onto a cleared buffer (-0.0 becomes 0.0).
                let mut g = _mm512_add_ps(zero, _mm512_maskz_loadu_ps(out, dy.as_ptr().add(o + c0)));
                if let Some(m) = pooled {
                    let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_maskz_loadu_ps(out, m.as_ptr().add(o + c0)), zero);
                    g = _mm512_maskz_mov_ps(keep, g);
                }
                let base = _mm512_add_epi32(_mm512_set1_epi32((2 * oy * w + 2 * c0) as i32), steps);
                let off = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(out, arg.as_ptr().add(o + c0).cast()), base);
                let pick = |at: __m512i| _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(off, at), g);
                let (te, to) = (pick(_mm512_setzero_si512()), pick(one));
                let (be, bo) = (pick(wv), pick(w1));
                let (lo, hi) = (lanes(2 * cnt), lanes((2 * cnt).saturating_sub(16)));
                _mm512_mask_storeu_ps(top.add(2 * c0), lo, _mm512_permutex2var_ps(te, lo_idx, to));
                _mm512_mask_storeu_ps(top.add(2 * c0 + 16), hi, _mm512_permutex2var_ps(te, hi_idx, to));
                _mm512_mask_storeu_ps(bottom.add(2 * c0), lo, _mm512_permutex2var_ps(be, lo_idx, bo));
                _mm512_mask_storeu_ps(bottom.add(2 * c0 + 16), hi, _mm512_permutex2var_ps(be, hi_idx, bo));
            }
            if w % 2 == 1 {
                *top.add(w - 1) = 0.0;
                *bottom.add(w - 1) = 0.0;
            }
        }
        if h % 2 == 1 {
            std::ptr::write_bytes(plane.add((h - 1) * w), 0, w);
        }
    }
}
