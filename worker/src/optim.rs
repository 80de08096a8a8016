//! The optimizer and its state: flat buffers laid out like the parameters, updated by the
//! fused kernels of `shoal-kernels`. The state is part of every checkpoint, so a resumed run
//! continues the very same trajectory.

use shoal_core::schedule::Schedule;
use shoal_core::spec::Optimizer;

use crate::WorkerError;

pub struct Opt {
    pub cfg: Optimizer,
    /// One buffer per kind of state (SGD: the momentum; AdamW: the two moments), each as long
    /// as the parameters.
    pub buffers: Vec<Vec<f32>>,
    /// Updates applied so far (AdamW's bias correction and the schedule depend on it).
    pub step: u64,
    /// The learning rate of each step (None: the config's at every step).
    schedule: Option<Schedule>,
    /// `[training] clip_norm`.
    clip_norm: Option<f64>,
    /// The step in progress (set by `begin_step`): its rate, and the factor its gradients are
    /// scaled by (clipping), with their norm (None: not measured).
    lr: f32,
    scale: f32,
    pub grad_norm: Option<f64>,
}

impl Opt {
    pub fn new(cfg: Optimizer, n: usize) -> Opt {
        let kinds = Self::buffer_names_of(&cfg).len();
        Opt { cfg, buffers: vec![vec![0.0; n]; kinds], step: 0, schedule: None, clip_norm: None, lr: cfg.lr(), scale: 1.0, grad_norm: None }
    }

    /// Sets the job's schedule and clipping (`[training.schedule]`, `[training] clip_norm`).
    pub fn set_training(&mut self, schedule: Schedule, clip_norm: Option<f64>) {
        self.schedule = Some(schedule).filter(|s| !s.is_constant());
        self.clip_norm = clip_norm;
    }

    /// Whether a step needs its gradients' global norm (`begin_step`).
    pub fn needs_norm(&self) -> bool {
        self.clip_norm.is_some()
    }

    /// The rate the last step ran at.
    pub fn last_lr(&self) -> f32 {
        self.lr
    }

    /// The rate the next step will run at.
    pub fn next_lr(&self) -> f32 {
        match &self.schedule {
            Some(s) => s.lr(self.step) as f32,
            None => self.cfg.lr(),
        }
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

    pub fn apply(&mut self, params: &mut [f32], grads: &mut [f32]) -> Result<(), WorkerError> {
        let norm = self.needs_norm().then(|| shoal_kernels::sum_squares(grads).sqrt());
        self.begin_step(norm);
        self.apply_part(0, params, grads)
    }

    /// Starts one update: its rate (the schedule's for this step) and, with clipping, the
    /// factor that brings the gradients' global L2 norm `norm` (the whole reduced gradient's,
    /// the same bits on every rank) down to `clip_norm` (PyTorch's `clip_grad_norm_`:
    /// clip / (norm + 1e-6) when below 1). `apply_part` then updates the parameters piece by
    /// piece.
    pub fn begin_step(&mut self, norm: Option<f64>) {
        self.lr = self.next_lr();
        self.scale = match (self.clip_norm, norm) {
            (Some(clip), Some(norm)) => (clip / (norm + 1e-6)).min(1.0) as f32,
            _ => 1.0,
        };
        self.grad_norm = norm;
        self.step += 1;
    }

    /// Updates `params` (the parameters from `offset` on) with their gradients `grads`, as
    /// part of the step counted by the last `begin_step`. Element-wise, so doing a step in
    /// parts gives the same bits as doing it at once.
    /// The gradients are scaled in place when the step clips them.
    pub fn apply_part(&mut self, offset: usize, params: &mut [f32], grads: &mut [f32]) -> Result<(), WorkerError> {
        if self.scale != 1.0 {
            grads.iter_mut().for_each(|g| *g *= self.scale);
        }
        self.update(offset, params, grads)
    }

    /// `apply_part` for a step that does not clip (`needs_norm` false), whose gradients it
    /// only reads: `all_gather_from` hands over pieces that are still being sent.
    pub fn apply_part_unclipped(&mut self, offset: usize, params: &mut [f32], grads: &[f32]) -> Result<(), WorkerError> {
        if self.scale != 1.0 {
            return Err(WorkerError::Model("a clipped step's gradients are scaled in place: apply_part, not apply_part_unclipped".into()));
        }
        self.update(offset, params, grads)
    }

    fn update(&mut self, offset: usize, params: &mut [f32], grads: &[f32]) -> Result<(), WorkerError> {
        let range = offset..offset + params.len();
        if grads.len() != params.len() || range.end > self.buffers.first().map_or(0, Vec::len) {
            return Err(WorkerError::Model(format!("optimizer update of {range:?} with {} gradients does not fit its state", grads.len())));
        }
        let lr = self.lr;
        match (self.cfg, self.buffers.as_mut_slice()) {
            (Optimizer::Sgd { momentum, weight_decay, .. }, [velocity]) => {
                shoal_kernels::sgd_momentum(params, grads, &mut velocity[range], lr, momentum, weight_decay)?
            }
            (Optimizer::AdamW { beta1, beta2, eps, weight_decay, .. }, [m, v]) => {
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
        adam.apply(&mut p, &mut [1.0; 5]).unwrap();
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
            // A schedule and clipping too: the norm of the whole, the parts scaled alike.
            let schedule = Schedule { base: cfg.lr() as f64, warmup: 2, decay: shoal_core::schedule::Decay::Cosine { min_lr: 0.0 }, total: 5 };
            whole.set_training(schedule, Some(0.5));
            parts.set_training(schedule, Some(0.5));
            let (mut p1, mut p2) = (vec![0.5f32; 37], vec![0.5f32; 37]);
            for _ in 0..3 {
                whole.apply(&mut p1, &mut grads.clone()).unwrap();
                let mut g = grads.clone();
                parts.begin_step(Some(shoal_kernels::sum_squares(&g).sqrt()));
                for (lo, hi) in [(20, 37), (3, 20), (0, 3)] {
                    parts.apply_part(lo, &mut p2[lo..hi], &mut g[lo..hi]).unwrap();
                }
            }
            assert_eq!(p1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), p2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(whole.buffers, parts.buffers);
            assert!(parts.apply_part(30, &mut p2[..10], &mut grads.clone()[..10]).is_err(), "past the state's end");
        }
    }

    #[test]
    fn steps_follow_the_schedule_and_clipping_scales_long_gradients() {
        // Plain SGD: a step moves each parameter by exactly -lr_t * scale * g.
        let cfg = Optimizer::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0 };
        let mut opt = Opt::new(cfg, 2);
        let schedule = Schedule { base: 0.1, warmup: 0, decay: shoal_core::schedule::Decay::Step { every: 2, gamma: 0.5 }, total: 10 };
        opt.set_training(schedule, Some(1.0));
        let mut p = vec![0.0f32; 2];
        let mut moved = Vec::new();
        for _ in 0..4 {
            let before = p[0];
            // Norm 5: clipped to 1.
            opt.apply(&mut p, &mut [3.0, 4.0]).unwrap();
            moved.push(before - p[0]);
        }
        let want = [0.1 * 0.6, 0.1 * 0.6, 0.05 * 0.6, 0.05 * 0.6];
        for (m, w) in moved.iter().zip(want) {
            assert!((*m as f64 - w).abs() < 1e-6, "{moved:?}");
        }
        assert_eq!(opt.grad_norm, Some(5.0));
        // A short gradient is left as it is.
        let mut q = vec![0.0f32; 2];
        let mut plain = Opt::new(cfg, 2);
        plain.set_training(Schedule { decay: shoal_core::schedule::Decay::Constant, ..schedule }, Some(1.0));
        plain.apply(&mut q, &mut [0.3, 0.4]).unwrap();
        assert_eq!(q, [-0.1f32 * 0.3, -0.1f32 * 0.4]);
    }
}
