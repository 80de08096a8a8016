//! `dropout` (`nn.Dropout`): in training, each element is zeroed with probability `p` and the
//! rest scaled by 1/(1-p); in evaluation, nothing. The mask is a function of (seed, step,
//! layer, record index, element), never of the batch's make-up, so a record gets the same
//! mask on whichever rank or lane holds it, and a resumed run draws the same.

use shoal_kernels::layers;

use crate::WorkerError;

pub(super) struct Dropout {
    pub(super) layer: u64,
    pub(super) p: f32,
    /// Elements per record, and for an image batch ([C][N][P]) its channels and positions.
    per_record: usize,
    image: Option<(usize, usize)>,
    /// The batch's mask, laid out like the batch.
    mask: Vec<f32>,
}

impl Dropout {
    pub(super) fn new(layer: u64, p: f32, input: &[usize]) -> Dropout {
        let image = (input.len() == 3).then(|| (input[0], input[1] * input[2]));
        Dropout { layer, p, per_record: input.iter().product(), image, mask: Vec::new() }
    }

    /// Training: draws the batch's mask (`seed`: the job's) and applies it.
    pub(super) fn forward(&mut self, x: &[f32], y: &mut [f32], records: &[u64], seed: u64, step: u64) -> Result<(), WorkerError> {
        let m = records.len() * self.per_record;
        super::grow(&mut self.mask, m);
        match self.image {
            Some((c, p)) => layers::dropout_mask_planes(seed, step, self.layer, records, c, p, self.p, &mut self.mask[..m])?,
            None => layers::dropout_mask(seed, step, self.layer, records, self.per_record, self.p, &mut self.mask[..m])?,
        }
        layers::apply_mask(&x[..m], &self.mask, y);
        Ok(())
    }

    pub(super) fn backward(&self, dy: &[f32], dx: &mut [f32], n: usize) {
        let m = n * self.per_record;
        layers::apply_mask(&dy[..m], &self.mask, dx);
    }
}
