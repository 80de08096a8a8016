//! `conv2d` (`nn.Conv2d`, square kernel, any channels, stride and padding) as im2col + one
//! GEMM over the batch: `[O, C*K*K] x [C*K*K, N*H'*W']`, channel-major, with a following
//! ReLU fused in. 3x3 convolutions with stride 1, padding 1 and at least 32 input channels
//! take Winograd's F(2x2, 3x3) instead (`shoal_kernels::winograd`: 2.25x fewer
//! multiplications); which path a layer takes depends only on its shape, so its bits do too.

use shoal_kernels::layers::{self, Window};
use shoal_kernels::nn;
use shoal_kernels::winograd::{self, Winograd};

use super::ParamSpec;
use crate::WorkerError;

pub(super) struct Conv2d {
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    pub(super) g: Window,
    pub(super) w: usize,
    pub(super) b: Option<usize>,
    pub(super) relu: bool,
    /// A ReLU and a 2x2 max pool follow, fused in: `forward_pooled` writes the pool's output
    /// (not this layer's), and the output's gradient arrives through the pool and the ReLU
    /// already (the pool applies the mask), so the backward pass skips the ReLU.
    pub(super) pooled: bool,
    /// The convolution's output before the fused pool (im2col path).
    z: Vec<f32>,
    /// The weights' gradient transposed, `[C*K*K][O]` (im2col path).
    dwt: Vec<f32>,
    /// The forward pass ran directly (`nn::conv3x3`): `cols` waits for the backward pass.
    cols_pending: bool,
    /// The padded input of the direct path.
    pad: Vec<f32>,
    /// The batch's im2col (kept for the backward pass) and its gradient.
    cols: Vec<f32>,
    dcols: Vec<f32>,
    /// Winograd's transformed weights, inputs (kept for the backward pass), weights' gradient
    /// and scratch.
    wino: [Vec<f32>; 4],
}

impl Conv2d {
    pub(super) fn new(input: &[usize], output: &[usize], params: &[ParamSpec], kernel: usize, stride: usize, pad: usize, relu: bool) -> Conv2d {
        let g = Window { kh: kernel, kw: kernel, stride, pad, h: input[1], w: input[2] };
        Conv2d { c_in: input[0], c_out: output[0], g, w: params[0].offset, b: params.get(1).map(|p| p.offset), relu, pooled: false, z: Vec::new(), dwt: Vec::new(), cols_pending: false, pad: Vec::new(), cols: Vec::new(), dcols: Vec::new(), wino: Default::default() }
    }

    /// The convolution without bias into `out[O][N*H'*W']`: directly where `nn::conv3x3`
    /// applies (the im2col then waits for the backward pass), else im2col + GEMM.
    fn convolve(&mut self, p: &[f32], x: &[f32], out: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let (k, plane, co) = (self.k(), self.plane_out(n), self.c_out);
        let wt = &p[self.w..self.w + co * k];
        if self.is_3x3_same() && nn::conv3x3_direct(self.c_in, plane) {
            super::grow(&mut self.pad, self.c_in * n * (self.g.h + 2) * (self.g.w + 2));
            nn::conv3x3(x, wt, self.c_in, co, n, self.g.h, self.g.w, &mut self.pad, out)?;
            self.cols_pending = true;
            return Ok(());
        }
        self.im2col(x, n)?;
        nn::matmul(out, wt, &self.cols, co, k, plane, false, false, false)?;
        Ok(())
    }

    fn im2col(&mut self, x: &[f32], n: usize) -> Result<(), WorkerError> {
        let len = self.k() * self.plane_out(n);
        super::grow(&mut self.cols, len);
        if self.is_3x3_same() {
            // The presets' convolution: the same bits by either path, this one faster.
            nn::im2col3(x, self.c_in, n, self.g.h, self.g.w, &mut self.cols)?;
        } else {
            layers::im2col(x, self.c_in, n, &self.g, &mut self.cols)?;
        }
        self.cols_pending = false;
        Ok(())
    }

    /// The Winograd shape of a batch of `n`, where this layer takes that path (with a fused
    /// pool: only the outputs the pool reads).
    fn winograd(&self, n: usize) -> Option<Winograd> {
        winograd::applies(self.c_in, self.g.kh, self.g.stride, self.g.pad).then_some(Winograd { c: self.c_in, o: self.c_out, n, h: self.g.h, w: self.g.w, pooled: self.pooled })
    }

    /// The batch's transformed weights and inputs into `wino` (the inputs stay for the
    /// backward pass).
    fn winograd_transforms(&mut self, s: &Winograd, p: &[f32], x: &[f32]) -> Result<(), WorkerError> {
        let weights = &p[self.w..self.w + self.c_out * self.k()];
        let [u, v, _, scratch] = &mut self.wino;
        super::grow(u, s.u_len());
        super::grow(v, s.v_len());
        super::grow(scratch, s.scratch_len());
        winograd::filter_transform(s, weights, u)?;
        winograd::input_transform(s, x, v, scratch)?;
        Ok(())
    }

    /// 3x3, stride 1, padding 1: `nn`'s dedicated im2col.
    fn is_3x3_same(&self) -> bool {
        (self.g.kh, self.g.kw, self.g.stride, self.g.pad) == (3, 3, 1, 1)
    }

    fn k(&self) -> usize {
        self.c_in * self.g.kh * self.g.kw
    }

    fn plane_out(&self, n: usize) -> usize {
        n * self.g.out_h() * self.g.out_w()
    }

    pub(super) fn forward(&mut self, p: &[f32], x: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let plane = self.plane_out(n);
        if let Some(s) = self.winograd(n) {
            self.winograd_transforms(&s, p, x)?;
            let [u, v, _, scratch] = &mut self.wino;
            let bias = self.b.map(|b| &p[b..b + self.c_out]);
            winograd::forward(&s, u, v, bias, self.relu, y, scratch)?;
            return Ok(());
        }
        self.convolve(p, x, y, n)?;
        match self.b {
            Some(b) => nn::bias_act_planes(&mut y[..self.c_out * plane], &p[b..b + self.c_out], plane, self.relu),
            None if self.relu => super::activation::relu(&mut y[..self.c_out * plane]),
            None => {}
        }
        Ok(())
    }

    /// This layer, its ReLU and the 2x2 max pool after them in one pass: the pool's output
    /// into `pooled` and its argmax into `arg` (the bits of the three layers one by one).
    pub(super) fn forward_pooled(&mut self, p: &[f32], x: &[f32], pooled: &mut [f32], arg: &mut [u32], n: usize) -> Result<(), WorkerError> {
        let (plane, co) = (self.plane_out(n), self.c_out);
        let bias = self.b.map(|b| &p[b..b + co]);
        if let Some(s) = self.winograd(n) {
            self.winograd_transforms(&s, p, x)?;
            let [u, v, _, scratch] = &mut self.wino;
            winograd::forward_pooled(&s, u, v, bias, self.relu, pooled, arg, scratch)?;
            return Ok(());
        }
        let mut z = std::mem::take(&mut self.z);
        super::grow(&mut z, co * plane);
        let done = self.convolve(p, x, &mut z, n);
        self.z = z;
        done?;
        nn::bias_act_maxpool2(&self.z, bias, self.relu, co, n, self.g.out_h(), self.g.out_w(), pooled, arg)?;
        Ok(())
    }

    /// `x` and `y`: this layer's input and output in the forward pass.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(&mut self, p: &[f32], g: &mut [f32], x: &[f32], y: &[f32], dy: &mut [f32], dx: Option<&mut [f32]>, n: usize) -> Result<(), WorkerError> {
        let (k, plane, co) = (self.k(), self.plane_out(n), self.c_out);
        if self.relu && !self.pooled {
            nn::relu_backward(&mut dy[..co * plane], &y[..co * plane]);
        }
        if let Some(b) = self.b {
            nn::plane_sums(&mut g[b..b + co], &dy[..co * plane], plane);
        }
        if let Some(s) = self.winograd(n) {
            let [u, v, du, scratch] = &mut self.wino;
            super::grow(du, s.u_len());
            let dx = dx.map(|dx| &mut dx[..self.c_in * n * self.g.h * self.g.w]);
            winograd::backward(&s, u, v, &dy[..co * plane], du, dx, scratch)?;
            winograd::filter_transform_adjoint(&s, du, &mut g[self.w..self.w + co * k])?;
            return Ok(());
        }
        if self.cols_pending {
            self.im2col(x, n)?;
        }
        if k >= 64 {
            // The weights' gradient as its transpose, cols · dy^T: with a longer row `gemm`
            // packs less this way round (1.5x faster at 144 and 288), and each sum is the
            // same FMA chain, so the bits are those of dy · cols^T.
            super::grow(&mut self.dwt, k * co);
            nn::matmul(&mut self.dwt, &self.cols, dy, k, plane, co, false, true, false)?;
            for (o, row) in g[self.w..self.w + co * k].chunks_exact_mut(k).enumerate() {
                for (kk, v) in row.iter_mut().enumerate() {
                    *v = self.dwt[kk * co + o];
                }
            }
        } else {
            nn::matmul(&mut g[self.w..self.w + co * k], dy, &self.cols, co, plane, k, false, true, false)?;
        }
        if let Some(dx) = dx {
            super::grow(&mut self.dcols, k * plane);
            nn::matmul(&mut self.dcols, &p[self.w..self.w + co * k], dy, k, co, plane, true, false, false)?;
            dx[..self.c_in * n * self.g.h * self.g.w].fill(0.0);
            if self.is_3x3_same() {
                nn::col2im3_add(&self.dcols, self.c_in, n, self.g.h, self.g.w, dx)?;
            } else {
                layers::col2im_add(&self.dcols, self.c_in, n, &self.g, dx)?;
            }
        }
        Ok(())
    }
}
