//! Element-wise activations (`relu`, `gelu`, `tanh`, `sigmoid`), in either layout.

use shoal_kernels::{layers, nn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
}

pub(super) struct Activation {
    pub(super) kind: Kind,
    pub(super) len: usize,
}

/// ReLU in place, exactly as the fused bias + ReLU computes it (`x < 0 ? 0 : x`), so a ReLU
/// on its own gives the same bits.
pub(super) fn relu(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = if *x < 0.0 { 0.0 } else { *x };
    }
}

impl Activation {
    pub(super) fn new(kind: Kind, input: &[usize]) -> Activation {
        Activation { kind, len: input.iter().product() }
    }

    pub(super) fn forward(&self, x: &[f32], y: &mut [f32], n: usize) {
        let m = n * self.len;
        let (x, y) = (&x[..m], &mut y[..m]);
        match self.kind {
            Kind::Relu => {
                y.copy_from_slice(x);
                relu(y);
            }
            Kind::Gelu => layers::gelu(x, y),
            Kind::Tanh => layers::tanh(x, y),
            Kind::Sigmoid => layers::sigmoid(x, y),
        }
    }

    pub(super) fn backward(&self, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
        let m = n * self.len;
        let (x, y, dy, dx) = (&x[..m], &y[..m], &dy[..m], &mut dx[..m]);
        match self.kind {
            Kind::Relu => {
                dx.copy_from_slice(dy);
                nn::relu_backward(dx, y);
            }
            Kind::Gelu => layers::gelu_backward(dy, x, dx),
            Kind::Tanh => layers::tanh_backward(dy, y, dx),
            Kind::Sigmoid => layers::sigmoid_backward(dy, y, dx),
        }
    }
}
