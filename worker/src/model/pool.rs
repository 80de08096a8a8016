//! `maxpool2d` and `avgpool2d` (`nn.MaxPool2d`, `nn.AvgPool2d`: no padding, floor mode) over
//! channel-major image batches.

use shoal_kernels::layers::{self, Window};

use crate::WorkerError;

pub(super) struct MaxPool {
    pub(super) c: usize,
    pub(super) g: Window,
    /// Where each output's maximum was, for the backward pass.
    arg: Vec<u32>,
    /// Fused into the conv2d + ReLU before it (2x2 only): the convolution computes this
    /// layer's forward pass (`Conv2d::forward_pooled`), and this layer's backward pass applies
    /// the ReLU's mask too.
    pub(super) relu_before: bool,
}

impl MaxPool {
    pub(super) fn new(input: &[usize], kernel: usize, stride: usize) -> MaxPool {
        MaxPool { c: input[0], g: Window { kh: kernel, kw: kernel, stride, pad: 0, h: input[1], w: input[2] }, arg: Vec::new(), relu_before: false }
    }

    /// The argmax buffer for a batch of `n`.
    pub(super) fn arg_for(&mut self, n: usize) -> &mut [u32] {
        let outs = self.c * n * self.g.out_h() * self.g.out_w();
        if self.arg.len() < outs {
            self.arg.resize(outs, 0);
        }
        &mut self.arg[..outs]
    }

    pub(super) fn forward(&mut self, x: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        self.arg_for(n);
        if self.is_2x2() {
            // The presets' pooling, on `nn`'s dedicated loop.
            return Ok(shoal_kernels::nn::maxpool2(x, self.c * n, self.g.h, self.g.w, y, &mut self.arg)?);
        }
        Ok(layers::maxpool(x, self.c * n, &self.g, y, &mut self.arg)?)
    }

    /// 2x2, stride 2.
    pub(super) fn is_2x2(&self) -> bool {
        (self.g.kh, self.g.kw, self.g.stride) == (2, 2, 2)
    }

    /// `y` is this layer's output (the maxima).
    pub(super) fn backward(&self, y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) -> Result<(), WorkerError> {
        if self.is_2x2() {
            let pooled = self.relu_before.then_some(y);
            return Ok(shoal_kernels::nn::maxpool2_backward_dense(dy, &self.arg, pooled, self.c * n, self.g.h, self.g.w, dx)?);
        }
        Ok(layers::maxpool_backward(dy, &self.arg, self.c * n, &self.g, dx)?)
    }
}

pub(super) struct AvgPool {
    pub(super) c: usize,
    pub(super) g: Window,
}

impl AvgPool {
    pub(super) fn new(input: &[usize], kernel: usize, stride: usize) -> AvgPool {
        AvgPool { c: input[0], g: Window { kh: kernel, kw: kernel, stride, pad: 0, h: input[1], w: input[2] } }
    }

    pub(super) fn forward(&self, x: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        Ok(layers::avgpool(x, self.c * n, &self.g, y)?)
    }

    pub(super) fn backward(&self, dy: &[f32], dx: &mut [f32], n: usize) -> Result<(), WorkerError> {
        Ok(layers::avgpool_backward(dy, self.c * n, &self.g, dx)?)
    }
}
