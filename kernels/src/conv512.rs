//! 3x3 convolutions (stride 1, padding 1) with few input channels, directly with AVX-512:
//! where im2col + GEMM has a sum of only `C*9` terms and spends its time packing. Each output
//! is the FMA chain over `(c, ky, kx)` in order from 0 that `gemm`'s microkernels compute for
//! `W · im2col(x)`, so the bits are the same (`nn::conv3x3` checks that in its tests).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 }
}

/// `z[o][n][y][x] = sum_{c, ky, kx} w[o][c][ky][kx] * xpad[c][n][y + ky][x + kx]`, `xpad` the
/// input padded by one zero on every side (`[C][N][H+2][W+2]`).
///
/// # Safety
/// The CPU has AVX-512F; `xpad` holds `c*n*(h+2)*(w+2)`, `wt` `o*c*9`, `z` `o*n*h*w` elements.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn conv3x3(xpad: &[f32], wt: &[f32], c: usize, o: usize, n: usize, h: usize, w: usize, z: &mut [f32]) {
    const OB: usize = 4;
    let (ph, pw) = (h + 2, w + 2);
    let k = c * 9;
    for o0 in (0..o).step_by(OB) {
        let ob = (o - o0).min(OB);
        for ni in 0..n {
            for y in 0..h {
                for x0 in (0..w).step_by(16) {
                    let m = lanes(w - x0);
                    let mut acc = [_mm512_setzero_ps(); OB];
                    for kk in 0..k {
                        let (ci, ky, kx) = (kk / 9, kk % 9 / 3, kk % 3);
                        let src = xpad.as_ptr().add(((ci * n + ni) * ph + y + ky) * pw + x0 + kx);
                        let xv = _mm512_maskz_loadu_ps(m, src);
                        for (j, a) in acc.iter_mut().enumerate().take(ob) {
                            let wv = _mm512_set1_ps(*wt.get_unchecked((o0 + j) * k + kk));
                            *a = _mm512_fmadd_ps(wv, xv, *a);
                        }
                    }
                    for (j, a) in acc.iter().enumerate().take(ob) {
                        let dst = z.as_mut_ptr().add((((o0 + j) * n + ni) * h + y) * w + x0);
                        _mm512_mask_storeu_ps(dst, m, *a);
                    }
                }
            }
        }
    }
}
