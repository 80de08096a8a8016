//! Evaluation metrics of a model's outputs: accuracy and cross-entropy for a classifier, mean
//! squared error, RMSE and R² for a regression, and for a language model the per-token
//! accuracy and cross-entropy (a mean over every position of every record) and bits per
//! byte (the cross-entropy in bits: byte-level tokens are bytes).
//!
//! Sums are kept in fixed point (2^-32 units, in i128): each record's term is rounded once,
//! and integer sums do not depend on their order, so the metrics of a test range have the
//! same bits however the records are split over ranks or passes. The resolution is 2^-32
//! (2.3e-10) per term, so targets below about 1e-4 lose digits in their squares (scale them);
//! a term past 2^100 units, a NaN or an overflowing sum makes the loss metrics unmeasured.

use shoal_core::model::Head;

use crate::WorkerError;

/// Units per 1.0 of the fixed-point sums.
const FIXED_ONE: f64 = (1u64 << 32) as f64;

fn float(v: i128) -> f64 {
    v as f64 / FIXED_ONE
}

/// What a set of records adds to the metrics. Words in `to_words` order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvalSums {
    pub records: u64,
    /// Records whose largest logit is their label (classifiers).
    pub correct: u64,
    /// Per record: cross-entropy (classifier) or squared error summed over the outputs.
    pub loss: i128,
    /// Regression: squared errors over every output; per target column, the sums of the
    /// targets and of their squares.
    pub sse: i128,
    pub target_sum: Vec<i128>,
    pub target_sq_sum: Vec<i128>,
    /// A term was not a finite number, or a sum left the fixed point's range: the loss, RMSE
    /// and R² are not measured (a diverged model scores as unmeasured, never as good).
    pub invalid: bool,
}

/// The most a fixed-point term may be: sums of 2^24 such terms still fit an i128.
const MAX_TERM: f64 = (1u128 << 100) as f64;

/// The metrics of a set of records (see `EvalSums::metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    pub accuracy: Option<f64>,
    /// The loss the job trains with, as a mean over the records (mse: over records and
    /// outputs, like `torch.nn.MSELoss`).
    pub loss: Option<f64>,
    pub rmse: Option<f64>,
    /// 1 - SSE / SST, SST summed per target column around each column's mean (scikit-learn's
    /// `r2_score` with `multioutput="variance_weighted"`; the usual R² for one target).
    pub r2: Option<f64>,
    /// A language model's bits per byte: `loss / ln 2` (see `with_head`).
    pub bpb: Option<f64>,
}

impl EvalSums {
    /// Empty sums for a model with `head` (a regression's with a column per target, so every
    /// rank's words have the same length even with no records).
    pub fn new(head: Head) -> EvalSums {
        let width = match head {
            Head::Targets(w) => w as usize,
            Head::Classes(_) | Head::Tokens { .. } => 0,
        };
        EvalSums { target_sum: vec![0; width], target_sq_sum: vec![0; width], ..Default::default() }
    }

    /// As f64 for a report: the loss and the squared errors (None when not measured), and the
    /// target columns' sums and squared sums (empty when not measured).
    pub fn report(&self) -> (Option<f64>, Option<f64>, Vec<f64>, Vec<f64>) {
        if self.invalid {
            return (None, None, Vec::new(), Vec::new());
        }
        (Some(float(self.loss)), Some(float(self.sse)), self.target_sum.iter().map(|&v| float(v)).collect(), self.target_sq_sum.iter().map(|&v| float(v)).collect())
    }

    /// `v` in fixed point, or None (and the sums marked invalid) when it is not finite or too
    /// large.
    fn term(&mut self, v: f64) -> i128 {
        let scaled = v * FIXED_ONE;
        if !scaled.is_finite() || scaled.abs() > MAX_TERM {
            self.invalid = true;
            return 0;
        }
        scaled.round() as i128
    }

    fn add_to(invalid: &mut bool, sum: &mut i128, v: i128) {
        match sum.checked_add(v) {
            Some(s) => *sum = s,
            None => *invalid = true,
        }
    }

    /// Adds the outputs of `labels.len() / head.positions()` records: `out` holds
    /// `head.outputs()` values per position; `labels` their classes (classifier: one per
    /// record; language model: the next token at each position) and `targets` their targets
    /// (regression).
    pub fn add(&mut self, head: Head, out: &[f32], labels: &[u32], targets: &[f32]) -> Result<(), WorkerError> {
        let positions = head.positions() as usize;
        let n = labels.len() / positions.max(1);
        let k = head.outputs() as usize;
        if out.len() != labels.len() * k.max(1) || labels.len() != n * positions {
            return Err(WorkerError::Model(format!("{} outputs for {n} records of {positions} x {k}", out.len())));
        }
        self.records += n as u64;
        match head {
            Head::Classes(_) | Head::Tokens { .. } => {
                for (row, &y) in out.chunks_exact(k.max(1)).zip(labels) {
                    let y = y as usize;
                    if y >= k {
                        return Err(WorkerError::Data(format!("label {y} is outside {k} classes")));
                    }
                    self.correct += u64::from(crate::model::argmax(row) == y);
                    // log-sum-exp in f64, the max taken out first.
                    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                    let t = self.term(sum.ln() + max - row[y] as f64);
                    Self::add_to(&mut self.invalid, &mut self.loss, t);
                }
            }
            Head::Targets(_) => {
                if targets.len() != out.len() {
                    return Err(WorkerError::Data(format!("{} targets for {n} records of {k} outputs", targets.len())));
                }
                self.target_sum.resize(k, 0);
                self.target_sq_sum.resize(k, 0);
                for (row, t) in out.chunks_exact(k.max(1)).zip(targets.chunks_exact(k.max(1))) {
                    let mut record = 0.0f64;
                    for (j, (&p, &t)) in row.iter().zip(t).enumerate() {
                        let d = p as f64 - t as f64;
                        record += d * d;
                        let (s, sq) = (self.term(t as f64), self.term(t as f64 * t as f64));
                        Self::add_to(&mut self.invalid, &mut self.target_sum[j], s);
                        Self::add_to(&mut self.invalid, &mut self.target_sq_sum[j], sq);
                    }
                    let e = self.term(record);
                    Self::add_to(&mut self.invalid, &mut self.sse, e);
                    Self::add_to(&mut self.invalid, &mut self.loss, e);
                }
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, o: &EvalSums) {
        self.records += o.records;
        self.correct += o.correct;
        self.invalid |= o.invalid;
        Self::add_to(&mut self.invalid, &mut self.loss, o.loss);
        Self::add_to(&mut self.invalid, &mut self.sse, o.sse);
        let width = self.target_sum.len().max(o.target_sum.len());
        self.target_sum.resize(width, 0);
        self.target_sq_sum.resize(width, 0);
        for (j, (&s, &sq)) in o.target_sum.iter().zip(&o.target_sq_sum).enumerate() {
            Self::add_to(&mut self.invalid, &mut self.target_sum[j], s);
            Self::add_to(&mut self.invalid, &mut self.target_sq_sum[j], sq);
        }
    }

    /// As u64 words (each i128 as low, high), for a gather between ranks: records, correct,
    /// invalid, loss, sse, the width, then per column its target sum and squared sum.
    pub fn to_words(&self) -> Vec<u64> {
        let split = |v: i128| [v as u64, (v >> 64) as u64];
        let mut w = vec![self.records, self.correct, u64::from(self.invalid)];
        w.extend(split(self.loss));
        w.extend(split(self.sse));
        w.push(self.target_sum.len() as u64);
        for (&s, &sq) in self.target_sum.iter().zip(&self.target_sq_sum) {
            w.extend(split(s));
            w.extend(split(sq));
        }
        w
    }

    pub fn from_words(w: &[u64]) -> Result<EvalSums, WorkerError> {
        let bad = || WorkerError::Collective(format!("evaluation sums of {} words do not parse", w.len()));
        let join = |lo: u64, hi: u64| (i128::from(hi as i64) << 64) | i128::from(lo);
        if w.len() < 8 {
            return Err(bad());
        }
        let width = usize::try_from(w[7]).map_err(|_| bad())?;
        if w.len() != 8 + 4 * width {
            return Err(bad());
        }
        let cols = &w[8..];
        Ok(EvalSums {
            records: w[0],
            correct: w[1],
            invalid: w[2] != 0,
            loss: join(w[3], w[4]),
            sse: join(w[5], w[6]),
            target_sum: cols.chunks_exact(4).map(|c| join(c[0], c[1])).collect(),
            target_sq_sum: cols.chunks_exact(4).map(|c| join(c[2], c[3])).collect(),
        })
    }

    /// Per target column, its sum of squares around its mean (SST), from the sums.
    fn total_squares(sum: &[f64], sq: &[f64], n: f64) -> f64 {
        sum.iter().zip(sq).map(|(&s, &q)| q - s * s / n).sum()
    }

    /// The metrics these sums give, for a model with `head`.
    pub fn metrics(&self, head: Head) -> Metrics {
        if self.records == 0 {
            return Metrics::default();
        }
        let n = self.records as f64;
        let valid = !self.invalid;
        match head {
            Head::Classes(_) => Metrics { accuracy: Some(self.correct as f64 / n), loss: valid.then(|| float(self.loss) / n), ..Default::default() },
            Head::Tokens { context, .. } => {
                let tokens = n * context as f64;
                Metrics { accuracy: Some(self.correct as f64 / tokens), loss: valid.then(|| float(self.loss) / tokens), ..Default::default() }.with_head(head)
            }
            Head::Targets(w) => {
                if !valid {
                    return Metrics::default();
                }
                let mse = float(self.sse) / (n * w as f64);
                let sums: Vec<f64> = self.target_sum.iter().map(|&v| float(v)).collect();
                let squares: Vec<f64> = self.target_sq_sum.iter().map(|&v| float(v)).collect();
                Metrics { accuracy: None, loss: Some(mse), rmse: Some(mse.sqrt()), r2: r2(float(self.sse), Self::total_squares(&sums, &squares, n)), bpb: None }
            }
        }
    }
}

/// R² from the squared errors and the targets' squares around their means (None when the
/// targets do not vary).
pub fn r2(sse: f64, total: f64) -> Option<f64> {
    let r2 = 1.0 - sse / total;
    (total > 0.0 && r2.is_finite()).then_some(r2)
}

/// SST of target columns from their sums and squared sums over `n` records.
pub fn total_squares(sum: &[f64], sq: &[f64], n: f64) -> f64 {
    EvalSums::total_squares(sum, sq, n)
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
            "test_bpb" => self.bpb,
            _ => None,
        }
    }

    /// The metrics derived from the others for a model with `head`: a language model's bits
    /// per byte.
    pub fn with_head(mut self, head: Head) -> Metrics {
        if matches!(head, Head::Tokens { .. }) {
            self.bpb = self.loss.map(|l| l / std::f64::consts::LN_2);
        }
        self
    }

    /// As words (f64 bits; NaN for None), for a state header.
    pub fn to_words(&self) -> [u64; 4] {
        let w = |v: Option<f64>| v.unwrap_or(f64::NAN).to_bits();
        [w(self.accuracy), w(self.loss), w(self.rmse), w(self.r2)]
    }

    pub fn from_words(w: [u64; 4]) -> Metrics {
        let v = |b: u64| Some(f64::from_bits(b)).filter(|v| !v.is_nan());
        Metrics { accuracy: v(w[0]), loss: v(w[1]), rmse: v(w[2]), r2: v(w[3]), bpb: None }
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
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!((&ab, &ba), (&whole, &whole));
        assert_eq!(EvalSums::from_words(&whole.to_words()).unwrap(), whole);
        let neg = EvalSums { loss: -5, sse: -(1 << 70), ..whole.clone() };
        assert_eq!(EvalSums::from_words(&neg.to_words()).unwrap(), neg);
        assert!(EvalSums::from_words(&whole.to_words()[..9]).is_err());
    }

    #[test]
    fn r2_of_several_targets_weighs_each_columns_variance_and_a_blow_up_is_unmeasured() {
        // Column A around 100, column B around 0; predicting each column's mean explains
        // nothing: R² 0 (a pooled mean would say 0.9998).
        let head = Head::Targets(2);
        let t = [99.0f32, -1.0, 101.0, 1.0];
        let pred = [100.0f32, 0.0, 100.0, 0.0];
        let mut s = EvalSums::default();
        s.add(head, &pred, &[0, 0], &t).unwrap();
        assert!(s.metrics(head).r2.unwrap().abs() < 1e-12, "{:?}", s.metrics(head));
        // A prediction of 1e30 overflows the fixed point: not measured, rather than wrapped.
        let mut big = EvalSums::default();
        big.add(head, &[1e30, 0.0, 1e30, 0.0], &[0, 0], &t).unwrap();
        assert!(big.invalid);
        assert_eq!(big.metrics(head), Metrics::default());
        let mut nan = EvalSums::default();
        nan.add(Head::Classes(2), &[f32::NAN, 0.0], &[0], &[]).unwrap();
        let m = nan.metrics(Head::Classes(2));
        assert_eq!((m.loss, m.accuracy.is_some()), (None, true));
        let mut merged = s.clone();
        merged.merge(&big);
        assert!(merged.invalid);
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

    #[test]
    fn language_model_metrics_are_per_token_and_bits_per_byte() {
        let head = Head::Tokens { vocab: 2, context: 2 };
        let mut s = EvalSums::default();
        // Two records of two positions: logits per position, the next token per position.
        s.add(head, &[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[1, 1, 0, 1], &[]).unwrap();
        let m = s.metrics(head);
        assert_eq!((s.records, m.accuracy), (2, Some(0.5)), "positions 0 and 2 are right, 3 is a tie (first max: 0)");
        let ln2 = std::f64::consts::LN_2;
        let want = ((1.0f64 + (-1.0f64).exp()).ln() + (1.0f64 + 2.0f64.exp()).ln() + 2.0 * ln2) / 4.0;
        assert!((m.loss.unwrap() - want).abs() < 1e-9, "{m:?}");
        assert!((m.bpb.unwrap() - want / ln2).abs() < 1e-9);
        assert_eq!(m.named("test_bpb"), m.bpb);
        assert!(s.add(head, &[0.0; 6], &[0, 1, 0], &[]).is_err(), "labels of a partial record");
    }
}
