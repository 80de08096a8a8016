//! `conv2d` (`nn.Conv2d`, square kernel, any channels, stride and padding) as im2col + one
//! GEMM over the batch: `[O, C*K*K] x [C*K*K, N*H'*W']`, channel-major, with a following
//! ReLU fused in.

use shoal_kernels::layers::{self, Window};
use shoal_kernels::nn;

use super::ParamSpec;
use crate::WorkerError;

pub(super) struct Conv2d {
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    pub(super) g: Window,
    pub(super) w: usize,
    pub(super) b: Option<usize>,
    pub(super) relu: bool,
    /// The batch's im2col (kept for the backward pass) and its gradient.
    cols: Vec<f32>,
    dcols: Vec<f32>,
}

impl Conv2d {
    pub(super) fn new(input: &[usize], output: &[usize], params: &[ParamSpec], kernel: usize, stride: usize, pad: usize, relu: bool) -> Conv2d {
        let g = Window { kh: kernel, kw: kernel, stride, pad, h: input[1], w: input[2] };
        Conv2d { c_in: input[0], c_out: output[0], g, w: params[0].offset, b: params.get(1).map(|p| p.offset), relu, cols: Vec::new(), dcols: Vec::new() }
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
        let (k, plane) = (self.k(), self.plane_out(n));
        super::grow(&mut self.cols, k * plane);
        if self.is_3x3_same() {
            // The presets' convolution: the same bits by either path, this one faster.
            nn::im2col3(x, self.c_in, n, self.g.h, self.g.w, &mut self.cols)?;
        } else {
            layers::im2col(x, self.c_in, n, &self.g, &mut self.cols)?;
        }
        nn::matmul(y, &p[self.w..self.w + self.c_out * k], &self.cols, self.c_out, k, plane, false, false, false)?;
        match self.b {
            Some(b) => nn::bias_act_planes(&mut y[..self.c_out * plane], &p[b..b + self.c_out], plane, self.relu),
            None if self.relu => super::activation::relu(&mut y[..self.c_out * plane]),
            None => {}
        }
        Ok(())
    }

    pub(super) fn backward(&mut self, p: &[f32], g: &mut [f32], y: &[f32], dy: &mut [f32], dx: Option<&mut [f32]>, n: usize) -> Result<(), WorkerError> {
        let (k, plane, co) = (self.k(), self.plane_out(n), self.c_out);
        if self.relu {
            nn::relu_backward(&mut dy[..co * plane], &y[..co * plane]);
        }
        nn::matmul(&mut g[self.w..self.w + co * k], dy, &self.cols, co, plane, k, false, true, false)?;
        if let Some(b) = self.b {
            nn::plane_sums(&mut g[b..b + co], &dy[..co * plane], plane);
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
