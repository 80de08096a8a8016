//! Learning-rate schedules (`[training.schedule]`): the rate of optimizer step t (counted from
//! 0, as the optimizer counts its updates) is a pure function of t and the job's step count,
//! so a resumed run, which restores the optimizer's step count from its checkpoint, continues
//! the very same schedule.

use crate::spec::{ScheduleSpec, TrainingSpec};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    Constant,
    /// Times `gamma` every `every` steps after the warmup (PyTorch's `StepLR`).
    Step { every: u64, gamma: f64 },
    /// Half a cosine from the base rate down to `min_lr` over the steps after the warmup
    /// (`CosineAnnealingLR` with `T_max` the steps left).
    Cosine { min_lr: f64 },
    /// A straight line from the base rate down to `min_lr`.
    Linear { min_lr: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// The optimizer's `lr`.
    pub base: f64,
    /// Steps of linear warmup: step t < warmup runs at base * (t + 1) / warmup.
    pub warmup: u64,
    pub decay: Decay,
    /// The job's optimizer steps: where cosine and linear reach `min_lr`.
    pub total: u64,
}

impl Schedule {
    /// The schedule of `training` for a job of `total` optimizer steps.
    pub fn of(training: &TrainingSpec, total: u64) -> Schedule {
        let base = training.optimizer.lr;
        let Some(s) = &training.schedule else { return Schedule { base, warmup: 0, decay: Decay::Constant, total } };
        Schedule { base, warmup: s.warmup_steps.unwrap_or(0), decay: decay_of(s), total }
    }

    /// Whether every step runs at the base rate.
    pub fn is_constant(&self) -> bool {
        self.warmup == 0 && self.decay == Decay::Constant
    }

    /// The learning rate of optimizer step `t` (counted from 0).
    pub fn lr(&self, t: u64) -> f64 {
        if t < self.warmup {
            return self.base * (t + 1) as f64 / self.warmup as f64;
        }
        let after = t - self.warmup;
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = (after as f64 / span as f64).min(1.0);
        match self.decay {
            Decay::Constant => self.base,
            Decay::Step { every, gamma } => self.base * gamma.powi((after / every.max(1)).min(i32::MAX as u64) as i32),
            Decay::Cosine { min_lr } => min_lr + (self.base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear { min_lr } => self.base + (min_lr - self.base) * progress,
        }
    }
}

fn decay_of(s: &ScheduleSpec) -> Decay {
    match s.kind.as_str() {
        "step" => Decay::Step { every: s.every.unwrap_or(1), gamma: s.gamma.unwrap_or(0.1) },
        "cosine" => Decay::Cosine { min_lr: s.min_lr.unwrap_or(0.0) },
        "linear" => Decay::Linear { min_lr: s.min_lr.unwrap_or(0.0) },
        _ => Decay::Constant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(kind: Decay, warmup: u64) -> impl Fn(u64) -> f64 {
        let s = Schedule { base: 0.1, warmup, decay: kind, total: 110 };
        move |t| s.lr(t)
    }

    #[test]
    fn schedules_follow_their_formulas() {
        let c = at(Decay::Constant, 0);
        assert_eq!((c(0), c(109)), (0.1, 0.1));
        let w = at(Decay::Constant, 10);
        assert!((w(0) - 0.01).abs() < 1e-12 && (w(9) - 0.1).abs() < 1e-12 && w(50) == 0.1);
        let s = at(Decay::Step { every: 30, gamma: 0.5 }, 10);
        assert!((s(10) - 0.1).abs() < 1e-12 && (s(39) - 0.1).abs() < 1e-12 && (s(40) - 0.05).abs() < 1e-12 && (s(70) - 0.025).abs() < 1e-12);
        let cos = at(Decay::Cosine { min_lr: 0.0 }, 10);
        assert!((cos(10) - 0.1).abs() < 1e-12 && (cos(60) - 0.05).abs() < 1e-12 && cos(110).abs() < 1e-12);
        let lin = at(Decay::Linear { min_lr: 0.02 }, 0);
        assert!((lin(0) - 0.1).abs() < 1e-12 && (lin(55) - 0.06).abs() < 1e-12 && (lin(110) - 0.02).abs() < 1e-12 && (lin(500) - 0.02).abs() < 1e-12);
    }
}
