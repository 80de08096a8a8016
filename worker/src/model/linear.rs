//! `linear`: `y = x Wᵀ + b` over rows `[N][in]` (`nn.Linear`), or over every position of a
//! sequence (`[N][T][in]`, N*T rows), with a following ReLU fused in (its output is kept,
//! and is all the ReLU's backward needs).

use shoal_kernels::nn;

use super::ParamSpec;
use crate::WorkerError;

pub(super) struct Linear {
    pub(super) din: usize,
    pub(super) dout: usize,
    pub(super) w: usize,
    pub(super) b: Option<usize>,
    pub(super) relu: bool,
    /// Rows per record: a sequence's positions, else 1.
    pub(super) rows: usize,
}

impl Linear {
    pub(super) fn new(input: &[usize], output: &[usize], params: &[ParamSpec], relu: bool) -> Linear {
        let din = *input.last().unwrap_or(&1);
        Linear { din, dout: *output.last().unwrap_or(&1), w: params[0].offset, b: params.get(1).map(|p| p.offset), relu, rows: input.iter().product::<usize>() / din.max(1) }
    }

    pub(super) fn forward(&self, p: &[f32], x: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let (din, dout, n) = (self.din, self.dout, n * self.rows);
        nn::matmul(y, x, &p[self.w..self.w + dout * din], n, din, dout, false, true, false)?;
        match self.b {
            Some(b) => nn::bias_act(&mut y[..n * dout], &p[b..b + dout], self.relu),
            None if self.relu => super::activation::relu(&mut y[..n * dout]),
            None => {}
        }
        Ok(())
    }

    /// `dy` is this layer's output gradient (masked here by the fused ReLU); `dx`, if asked
    /// for, gets its input's.
    pub(super) fn backward(&self, (p, g): (&[f32], &mut [f32]), x: &[f32], y: &[f32], dy: &mut [f32], dx: Option<&mut [f32]>, n: usize) -> Result<(), WorkerError> {
        let (din, dout, n) = (self.din, self.dout, n * self.rows);
        if self.relu {
            nn::relu_backward(&mut dy[..n * dout], &y[..n * dout]);
        }
        nn::matmul(&mut g[self.w..self.w + dout * din], dy, x, dout, n, din, true, false, false)?;
        if let Some(b) = self.b {
            nn::column_sums(&mut g[b..b + dout], &dy[..n * dout], false);
        }
        if let Some(dx) = dx {
            nn::matmul(dx, dy, &p[self.w..self.w + dout * din], n, dout, din, false, false, false)?;
        }
        Ok(())
    }
}
