//! The optimizer and its state: flat buffers laid out like the parameters, updated by the
//! fused kernels of `shoal-kernels`. The state is part of every checkpoint, so a resumed run
//! continues the very same trajectory.

use shoal_core::spec::Optimizer;

use crate::WorkerError;

pub struct Opt {
    pub cfg: Optimizer,
    /// One buffer per kind of state (SGD: the momentum; AdamW: the two moments), each as long
    /// as the parameters.
    pub buffers: Vec<Vec<f32>>,
    /// Updates applied so far (AdamW's bias correction depends on it).
    pub step: u64,
}

impl Opt {
    pub fn new(cfg: Optimizer, n: usize) -> Opt {
        let kinds = Self::buffer_names_of(&cfg).len();
        Opt { cfg, buffers: vec![vec![0.0; n]; kinds], step: 0 }
    }

    /// `sgd` or `adamw`, as in the spec.
    pub fn kind(&self) -> &'static str {
        match self.cfg {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::AdamW { .. } => "adamw",
        }
    }

    /// The names of the state buffers, PyTorch's where it has one (`momentum_buffer`,
    /// `exp_avg`, `exp_avg_sq`).
    pub fn buffer_names(&self) -> &'static [&'static str] {
        Self::buffer_names_of(&self.cfg)
    }

    fn buffer_names_of(cfg: &Optimizer) -> &'static [&'static str] {
        match cfg {
            Optimizer::Sgd { .. } => &["momentum_buffer"],
            Optimizer::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    pub fn apply(&mut self, params: &mut [f32], grads: &[f32]) -> Result<(), WorkerError> {
        self.begin_step();
        self.apply_part(0, params, grads)
    }

    /// Counts one update; `apply_part` then updates the parameters piece by piece.
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Updates `params` (the parameters from `offset` on) with their gradients `grads`, as
    /// part of the step counted by the last `begin_step`. Element-wise, so doing a step in
    /// parts gives the same bits as doing it at once.
    pub fn apply_part(&mut self, offset: usize, params: &mut [f32], grads: &[f32]) -> Result<(), WorkerError> {
        let range = offset..offset + params.len();
        if grads.len() != params.len() || range.end > self.buffers.first().map_or(0, Vec::len) {
            return Err(WorkerError::Model(format!("optimizer update of {range:?} with {} gradients does not fit its state", grads.len())));
        }
        match (self.cfg, self.buffers.as_mut_slice()) {
            (Optimizer::Sgd { lr, momentum, weight_decay }, [velocity]) => {
                shoal_kernels::sgd_momentum(params, grads, &mut velocity[range], lr, momentum, weight_decay)?
            }
            (Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay }, [m, v]) => {
                shoal_kernels::adamw(params, grads, &mut m[range.clone()], &mut v[range], self.step, lr, beta1, beta2, eps, weight_decay)?
            }
            _ => unreachable!("optimizer buffers match its config by construction"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_buffers_follow_the_kind() {
        let sgd = Opt::new(Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }, 5);
        assert_eq!((sgd.kind(), sgd.buffer_names().len(), sgd.buffers.len()), ("sgd", 1, 1));
        let mut adam = Opt::new(Optimizer::AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, 5);
        assert_eq!((adam.kind(), adam.buffers.len()), ("adamw", 2));
        let mut p = vec![1.0f32; 5];
        adam.apply(&mut p, &[1.0; 5]).unwrap();
        assert_eq!(adam.step, 1);
        assert!(adam.buffers[0].iter().all(|&m| m > 0.0) && p.iter().all(|&x| x < 1.0));
    }

    #[test]
    fn a_step_in_parts_is_the_step_at_once() {
        for cfg in [
            Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01 },
            Optimizer::AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        ] {
            let grads: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
            let (mut whole, mut parts) = (Opt::new(cfg, 37), Opt::new(cfg, 37));
            let (mut p1, mut p2) = (vec![0.5f32; 37], vec![0.5f32; 37]);
            for _ in 0..3 {
                whole.apply(&mut p1, &grads).unwrap();
                parts.begin_step();
                for (lo, hi) in [(20, 37), (3, 20), (0, 3)] {
                    parts.apply_part(lo, &mut p2[lo..hi], &grads[lo..hi]).unwrap();
                }
            }
            assert_eq!(p1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), p2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(whole.buffers, parts.buffers);
            assert!(parts.apply_part(30, &mut p2[..10], &grads[..10]).is_err(), "past the state's end");
        }
    }
}
