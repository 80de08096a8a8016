//! `embedding` (`nn.Embedding`): a record's token ids (stored as f32, exact integers) to
//! rows of its table; and `position_embedding`: a learned vector added at each position.

use shoal_kernels::attention;

use super::ParamSpec;
use crate::WorkerError;

pub(super) struct Embedding {
    pub(super) w: usize,
    vocab: usize,
    dim: usize,
    /// Positions per record.
    t: usize,
}

impl Embedding {
    pub(super) fn new(input: &[usize], params: &[ParamSpec]) -> Embedding {
        let (vocab, dim) = (params[0].shape[0], params[0].shape[1]);
        Embedding { w: params[0].offset, vocab, dim, t: input.iter().product() }
    }

    pub(super) fn forward(&self, p: &[f32], ids: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let rows = n * self.t;
        attention::embedding(&ids[..rows], &p[self.w..self.w + self.vocab * self.dim], self.vocab, self.dim, &mut y[..rows * self.dim])?;
        Ok(())
    }

    /// The table's gradient (the ids get none).
    pub(super) fn backward(&self, g: &mut [f32], ids: &[f32], dy: &[f32], n: usize) -> Result<(), WorkerError> {
        let rows = n * self.t;
        let table = &mut g[self.w..self.w + self.vocab * self.dim];
        table.fill(0.0);
        attention::embedding_backward(&ids[..rows], &dy[..rows * self.dim], self.vocab, self.dim, table)?;
        Ok(())
    }
}

pub(super) struct PositionEmbedding {
    pub(super) w: usize,
    t: usize,
    dim: usize,
}

impl PositionEmbedding {
    pub(super) fn new(input: &[usize], params: &[ParamSpec]) -> PositionEmbedding {
        PositionEmbedding { w: params[0].offset, t: input[0], dim: input[1] }
    }

    pub(super) fn forward(&self, p: &[f32], x: &[f32], y: &mut [f32], n: usize) -> Result<(), WorkerError> {
        let m = n * self.t * self.dim;
        y[..m].copy_from_slice(&x[..m]);
        attention::add_positions(&mut y[..m], &p[self.w..self.w + self.t * self.dim], n, self.t, self.dim)?;
        Ok(())
    }

    /// The positions' gradient; the input's is the output's (`dx`, if asked for).
    pub(super) fn backward(&self, g: &mut [f32], dy: &[f32], dx: Option<&mut [f32]>, n: usize) -> Result<(), WorkerError> {
        let m = n * self.t * self.dim;
        attention::positions_backward(&dy[..m], n, self.t, self.dim, &mut g[self.w..self.w + self.t * self.dim])?;
        if let Some(dx) = dx {
            dx[..m].copy_from_slice(&dy[..m]);
        }
        Ok(())
    }
}
