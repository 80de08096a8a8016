//! `layernorm` (`nn.LayerNorm`): each record normalized over its last dimension (rows), or
//! over C, H and W of an image (channel-major, strided), with an elementwise affine.

use shoal_kernels::layers::{self, Groups};

use super::ParamSpec;
use crate::WorkerError;

pub(super) struct LayerNorm {
    pub(super) w: usize,
    pub(super) b: usize,
    pub(super) eps: f32,
    /// The normalized size, and the groups' geometry without the batch size.
    d: usize,
    over_chw: Option<(usize, usize)>,
    rows_per_record: usize,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl LayerNorm {
    pub(super) fn new(input: &[usize], params: &[ParamSpec], over_chw: bool, eps: f32) -> LayerNorm {
        let (d, chw, rows) = if over_chw {
            (input.iter().product(), Some((input[0], input[1] * input[2])), 1)
        } else {
            let last = *input.last().unwrap_or(&1);
            (last, None, input.iter().product::<usize>() / last.max(1))
        };
        LayerNorm { w: params[0].offset, b: params[1].offset, eps, d, over_chw: chw, rows_per_record: rows, mean: Vec::new(), rstd: Vec::new() }
    }

    fn groups(&self, n: usize) -> Groups {
        match self.over_chw {
            // Record r's elements: channel c at r * P + c * N * P, P positions each.
            Some((c, p)) => Groups::planes(c, n, p),
            None => Groups::dense(n * self.rows_per_record, self.d),
        }
    }

    pub(super) fn forward(&mut self, p: &[f32], x: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let g = self.groups(n);
        super::grow(&mut self.mean, g.rows);
        super::grow(&mut self.rstd, g.rows);
        layers::layernorm(x, &g, &p[self.w..self.w + self.d], &p[self.b..self.b + self.d], self.eps, y, &mut self.mean, &mut self.rstd)?;
        Ok(())
    }

    pub(super) fn backward(&self, p: &[f32], grads: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let g = self.groups(n);
        let (head, tail) = grads.split_at_mut(self.b);
        let dgamma = &mut head[self.w..self.w + self.d];
        let dbeta = &mut tail[..self.d];
        dgamma.fill(0.0);
        dbeta.fill(0.0);
        layers::layernorm_backward(dy, x, &g, &p[self.w..self.w + self.d], &self.mean, &self.rstd, dx, dgamma, dbeta)?;
        Ok(())
    }
}
