//! `flatten`: an image batch `[C][N][P]` to rows `[N][C*P]`, PyTorch's order (`nn.Flatten`).

pub(super) struct Flatten {
    /// Channels and positions per channel of the input, or None: already rows (a copy).
    pub(super) image: Option<(usize, usize)>,
    pub(super) len: usize,
}

impl Flatten {
    pub(super) fn new(input: &[usize]) -> Flatten {
        let image = (input.len() == 3).then(|| (input[0], input[1] * input[2]));
        Flatten { image, len: input.iter().product() }
    }

    pub(super) fn forward(&self, x: &[f32], y: &mut [f32], n: usize) {
        match self.image {
            Some((c, p)) => {
                for ni in 0..n {
                    for ci in 0..c {
                        y[ni * c * p + ci * p..ni * c * p + (ci + 1) * p].copy_from_slice(&x[(ci * n + ni) * p..(ci * n + ni + 1) * p]);
                    }
                }
            }
            None => y[..n * self.len].copy_from_slice(&x[..n * self.len]),
        }
    }

    pub(super) fn backward(&self, dy: &[f32], dx: &mut [f32], n: usize) {
        match self.image {
            Some((c, p)) => {
                for ni in 0..n {
                    for ci in 0..c {
                        dx[(ci * n + ni) * p..(ci * n + ni + 1) * p].copy_from_slice(&dy[ni * c * p + ci * p..ni * c * p + (ci + 1) * p]);
                    }
                }
            }
            None => dx[..n * self.len].copy_from_slice(&dy[..n * self.len]),
        }
    }
}
