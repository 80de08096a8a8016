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
        self.step += 1;
        match (self.cfg, self.buffers.as_mut_slice()) {
            (Optimizer::Sgd { lr, momentum, weight_decay }, [velocity]) => {
                shoal_kernels::sgd_momentum(params, grads, velocity, lr, momentum, weight_decay)?
            }
            (Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay }, [m, v]) => {
                shoal_kernels::adamw(params, grads, m, v, self.step, lr, beta1, beta2, eps, weight_decay)?
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
}
