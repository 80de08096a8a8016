//! Evaluation metrics of a model's outputs: accuracy and cross-entropy for a classifier, mean
//! squared error, RMSE and R² for a regression.
//!
//! Sums are kept in fixed point (2^-32 units, in i128): each record's term is rounded once,
//! and integer sums do not depend on their order, so the metrics of a test range have the
//! same bits however the records are split over ranks or passes.

use shoal_core::model::Head;

use crate::WorkerError;

/// Units per 1.0 of the fixed-point sums.
const FIXED_ONE: f64 = (1u64 << 32) as f64;

fn fixed(v: f64) -> i128 {
    (v * FIXED_ONE).round() as i128
}

fn float(v: i128) -> f64 {
    v as f64 / FIXED_ONE
}

/// What a set of records adds to the metrics. Words in `to_words` order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalSums {
    pub records: u64,
    /// Records whose largest logit is their label (classifiers).
    pub correct: u64,
    /// Per record: cross-entropy (classifier) or squared error summed over the outputs.
    pub loss: i128,
    /// Regression: squared errors, targets and squared targets, over every output.
    pub sse: i128,
    pub target_sum: i128,
    pub target_sq_sum: i128,
}

/// The latest evaluation of a model: each value None where it does not apply or was not
/// measured yet.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    pub accuracy: Option<f64>,
    /// The loss the job trains with, as a mean over the records (mse: over records and
    /// outputs, like `torch.nn.MSELoss`).
    pub loss: Option<f64>,
    pub rmse: Option<f64>,
    pub r2: Option<f64>,
}

impl EvalSums {
    /// Adds the outputs of `labels.len()` records: `out` holds `head.outputs()` values per
    /// record; `labels` their classes (classifier) and `targets` their targets (regression).
    pub fn add(&mut self, head: Head, out: &[f32], labels: &[u32], targets: &[f32]) -> Result<(), WorkerError> {
        let n = labels.len();
        let k = head.outputs() as usize;
        if out.len() != n * k.max(1) {
            return Err(WorkerError::Model(format!("{} outputs for {n} records of {k}", out.len())));
        }
        self.records += n as u64;
        match head {
            Head::Classes(_) => {
                for (row, &y) in out.chunks_exact(k.max(1)).zip(labels) {
                    let y = y as usize;
                    if y >= k {
                        return Err(WorkerError::Data(format!("label {y} is outside {k} classes")));
                    }
                    self.correct += u64::from(crate::model::argmax(row) == y);
                    // log-sum-exp in f64, the max taken out first.
                    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                    self.loss += fixed(sum.ln() + max - row[y] as f64);
                }
            }
            Head::Targets(_) => {
                if targets.len() != out.len() {
                    return Err(WorkerError::Data(format!("{} targets for {n} records of {k} outputs", targets.len())));
                }
                for (row, t) in out.chunks_exact(k.max(1)).zip(targets.chunks_exact(k.max(1))) {
                    let mut record = 0.0f64;
                    for (&p, &t) in row.iter().zip(t) {
                        let d = p as f64 - t as f64;
                        record += d * d;
                        self.target_sum += fixed(t as f64);
                        self.target_sq_sum += fixed(t as f64 * t as f64);
                    }
                    let e = fixed(record);
                    self.sse += e;
                    self.loss += e;
                }
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, o: &EvalSums) {
        self.records += o.records;
        self.correct += o.correct;
        self.loss += o.loss;
        self.sse += o.sse;
        self.target_sum += o.target_sum;
        self.target_sq_sum += o.target_sq_sum;
    }

    /// As ten u64 words (each i128 as low, high), for a gather between ranks.
    pub fn to_words(&self) -> [u64; 10] {
        let split = |v: i128| [v as u64, (v >> 64) as u64];
        let [a, b] = split(self.loss);
        let [c, d] = split(self.sse);
        let [e, f] = split(self.target_sum);
        let [g, h] = split(self.target_sq_sum);
        [self.records, self.correct, a, b, c, d, e, f, g, h]
    }

    pub fn from_words(w: &[u64]) -> Result<EvalSums, WorkerError> {
        if w.len() != 10 {
            return Err(WorkerError::Collective(format!("evaluation sums of {} words, 10 expected", w.len())));
        }
        let join = |lo: u64, hi: u64| (i128::from(hi as i64) << 64) | i128::from(lo);
        Ok(EvalSums { records: w[0], correct: w[1], loss: join(w[2], w[3]), sse: join(w[4], w[5]), target_sum: join(w[6], w[7]), target_sq_sum: join(w[8], w[9]) })
    }

    /// The metrics these sums give, for a model with `head`.
    pub fn metrics(&self, head: Head) -> Metrics {
        if self.records == 0 {
            return Metrics::default();
        }
        let n = self.records as f64;
        match head {
            Head::Classes(_) => Metrics { accuracy: Some(self.correct as f64 / n), loss: Some(float(self.loss) / n), rmse: None, r2: None },
            Head::Targets(w) => {
                let values = n * w as f64;
                let mse = float(self.sse) / values;
                let mean = float(self.target_sum) / values;
                let total = float(self.target_sq_sum) - values * mean * mean;
                let r2 = if total > 0.0 { 1.0 - float(self.sse) / total } else { f64::NAN };
                Metrics { accuracy: None, loss: Some(mse), rmse: Some(mse.sqrt()), r2: r2.is_finite().then_some(r2) }
            }
        }
    }
}

impl Metrics {
    /// The value `[promote] metric` names (`test_accuracy`, `test_loss`, `test_rmse`,
    /// `test_r2`).
    pub fn named(&self, metric: &str) -> Option<f64> {
        match metric {
            "test_accuracy" => self.accuracy,
            "test_loss" => self.loss,
            "test_rmse" => self.rmse,
            "test_r2" => self.r2,
            _ => None,
        }
    }

    /// As words (f64 bits; NaN for None), for a state header.
    pub fn to_words(&self) -> [u64; 4] {
        let w = |v: Option<f64>| v.unwrap_or(f64::NAN).to_bits();
        [w(self.accuracy), w(self.loss), w(self.rmse), w(self.r2)]
    }

    pub fn from_words(w: [u64; 4]) -> Metrics {
        let v = |b: u64| Some(f64::from_bits(b)).filter(|v| !v.is_nan());
        Metrics { accuracy: v(w[0]), loss: v(w[1]), rmse: v(w[2]), r2: v(w[3]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_metrics_match_their_definitions_and_any_split() {
        let head = Head::Targets(1);
        let pred = [1.0f32, 2.0, 3.5, 4.0];
        let t = [1.5f32, 2.0, 3.0, 6.0];
        let mut whole = EvalSums::default();
        whole.add(head, &pred, &[0; 4], &t).unwrap();
        let m = whole.metrics(head);
        let sse = 0.25 + 0.0 + 0.25 + 4.0;
        let mean = 12.5 / 4.0;
        let sst: f64 = t.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        assert!((m.loss.unwrap() - sse / 4.0).abs() < 1e-9);
        assert!((m.rmse.unwrap() - (sse / 4.0f64).sqrt()).abs() < 1e-9);
        assert!((m.r2.unwrap() - (1.0 - sse / sst)).abs() < 1e-9);
        assert_eq!(m.accuracy, None);
        // Split over two "ranks", merged in either order: the same bits.
        let (mut a, mut b) = (EvalSums::default(), EvalSums::default());
        a.add(head, &pred[..1], &[0], &t[..1]).unwrap();
        b.add(head, &pred[1..], &[0; 3], &t[1..]).unwrap();
        let mut ab = a;
        ab.merge(&b);
        let mut ba = b;
        ba.merge(&a);
        assert_eq!((ab, ba), (whole, whole));
        assert_eq!(EvalSums::from_words(&whole.to_words()).unwrap(), whole);
        let neg = EvalSums { loss: -5, sse: -(1 << 70), ..whole };
        assert_eq!(EvalSums::from_words(&neg.to_words()).unwrap(), neg);
    }

    #[test]
    fn classifier_metrics_are_accuracy_and_mean_cross_entropy() {
        let head = Head::Classes(2);
        let mut s = EvalSums::default();
        s.add(head, &[0.0, 1.0, 2.0, 0.0], &[1, 1], &[]).unwrap();
        let m = s.metrics(head);
        assert_eq!(m.accuracy, Some(0.5));
        let want = ((1.0f64 + (-1.0f64).exp()).ln() + (1.0f64 + 2.0f64.exp()).ln()) / 2.0;
        assert!((m.loss.unwrap() - want).abs() < 1e-9, "{m:?}");
        assert_eq!((m.rmse, m.r2), (None, None));
        assert!(s.add(head, &[0.0, 1.0], &[2], &[]).is_err());
        assert_eq!(Metrics::from_words(m.to_words()), m);
        assert_eq!(m.named("test_loss"), m.loss);
    }
}
