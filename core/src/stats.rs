//! Dataset statistics and drift: per-feature moments, ranges, missing values and binned
//! histograms, label histograms, and the Jensen-Shannon divergence between a new slice and the
//! version it is appended to. The coordinator checks drift when it applies an append, so
//! every number here is computed from basic IEEE operations only (no platform `ln`): every
//! replica gets the same bits.

use shoal_proto::{DatasetInfo, FeatureStats, SliceStats};

use crate::dataset::Records;
use crate::idx::IdxData;
use crate::spec::FillMissing;
use crate::CoreError;

/// Bins of a feature's histogram.
pub const BINS: usize = 10;

/// The bin of `v` among `BINS` equal bins over [lo, hi] (outside: the end bins).
fn bin(v: f64, lo: f64, hi: f64) -> usize {
    if hi <= lo || v <= lo {
        return 0;
    }
    (((v - lo) / (hi - lo) * BINS as f64) as usize).min(BINS - 1)
}

/// Rows per parallel block of the statistics: fixed, so the sums (added block by block, in
/// order) have the same bits on any number of threads.
const STATS_BLOCK_ROWS: usize = 64 * 1024;

/// Statistics of `records`. Feature histograms use `ranges` (per feature: the dataset's first
/// slice's [lo, hi]) or, for a first slice, its own.
pub fn slice_stats(records: &Records, ranges: Option<&[(f64, f64)]>, classes: usize) -> SliceStats {
    let f: usize = records.feature_shape.iter().product();
    let mut features = match &records.features {
        IdxData::U8(v) => moments(&v[..records.len() * f], f),
        IdxData::F32(v) => moments(&v[..records.len() * f], f),
    };
    for (j, s) in features.iter_mut().enumerate() {
        if s.count == 0 {
            (s.min, s.max) = (0.0, 0.0);
        }
        (s.lo, s.hi) = match ranges {
            Some(r) => r[j],
            None => (s.min, s.max),
        };
    }
    let bins = match &records.features {
        IdxData::U8(v) => histograms(&v[..records.len() * f], &features),
        IdxData::F32(v) => histograms(&v[..records.len() * f], &features),
    };
    for (s, b) in features.iter_mut().zip(bins) {
        s.bins = b;
    }
    // Records with float targets have no label histogram.
    let mut label_counts = vec![0u64; if records.targets.is_some() { 0 } else { classes.max(records.classes() as usize) }];
    if records.targets.is_none() {
        for &y in &records.labels {
            label_counts[y as usize] += 1;
        }
    }
    SliceStats { features, label_counts, tokens: 0 }
}

/// Per feature of rows of `f` values: count, missing, sum, sum of squares, min and max.
fn moments<T: Copy + Into<f64> + Sync>(values: &[T], f: usize) -> Vec<FeatureStats> {
    use rayon::prelude::*;
    let empty = || (0..f).map(|_| FeatureStats { min: f64::INFINITY, max: f64::NEG_INFINITY, ..Default::default() }).collect::<Vec<_>>();
    let blocks: Vec<Vec<FeatureStats>> = values
        .par_chunks(STATS_BLOCK_ROWS * f.max(1))
        .map(|block| {
            let mut acc = empty();
            for row in block.chunks_exact(f.max(1)) {
                for (s, &x) in acc.iter_mut().zip(row) {
                    let v: f64 = x.into();
                    if v.is_nan() {
                        s.missing += 1;
                        continue;
                    }
                    s.count += 1;
                    s.sum += v;
                    s.sum_sq += v * v;
                    s.min = s.min.min(v);
                    s.max = s.max.max(v);
                }
            }
            acc
        })
        .collect();
    let mut total = empty();
    for block in blocks {
        for (a, b) in total.iter_mut().zip(block) {
            a.count += b.count;
            a.missing += b.missing;
            a.sum += b.sum;
            a.sum_sq += b.sum_sq;
            a.min = a.min.min(b.min);
            a.max = a.max.max(b.max);
        }
    }
    total
}

/// Per feature: its `BINS` counts over the feature's [lo, hi].
fn histograms<T: Copy + Into<f64> + Sync>(values: &[T], features: &[FeatureStats]) -> Vec<Vec<u64>> {
    use rayon::prelude::*;
    let f = features.len().max(1);
    values
        .par_chunks(STATS_BLOCK_ROWS * f)
        .map(|block| {
            let mut bins = vec![[0u64; BINS]; features.len()];
            for row in block.chunks_exact(f) {
                for ((b, s), &x) in bins.iter_mut().zip(features).zip(row) {
                    let v: f64 = x.into();
                    if !v.is_nan() {
                        b[bin(v, s.lo, s.hi)] += 1;
                    }
                }
            }
            bins
        })
        .reduce(|| vec![[0u64; BINS]; features.len()], |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                for (p, q) in x.iter_mut().zip(y) {
                    *p += q;
                }
            }
            a
        })
        .into_iter()
        .map(|b| b.to_vec())
        .collect()
}

/// Per-feature bin ranges of a first slice.
pub fn ranges(first: &SliceStats) -> Vec<(f64, f64)> {
    first.features.iter().map(|s| (s.lo, s.hi)).collect()
}

/// Adds `s` to `acc` (stats are additive when their bins share ranges).
pub fn add(acc: &mut SliceStats, s: &SliceStats) {
    if acc.features.is_empty() && acc.label_counts.is_empty() {
        *acc = s.clone();
        return;
    }
    for (a, b) in acc.features.iter_mut().zip(&s.features) {
        // Saturating: the counts may come from a report over the network, and an overflow
        // must not panic a replica's apply.
        a.count = a.count.saturating_add(b.count);
        a.sum += b.sum;
        a.sum_sq += b.sum_sq;
        a.min = a.min.min(b.min);
        a.max = a.max.max(b.max);
        a.missing = a.missing.saturating_add(b.missing);
        for (x, y) in a.bins.iter_mut().zip(&b.bins) {
            *x = x.saturating_add(*y);
        }
    }
    if acc.label_counts.len() < s.label_counts.len() {
        acc.label_counts.resize(s.label_counts.len(), 0);
    }
    for (x, y) in acc.label_counts.iter_mut().zip(&s.label_counts) {
        *x = x.saturating_add(*y);
    }
    acc.tokens = acc.tokens.saturating_add(s.tokens);
}

/// Mean and standard deviation (population) of a feature's values.
pub fn mean_std(s: &FeatureStats) -> (f64, f64) {
    if s.count == 0 {
        return (0.0, 0.0);
    }
    let n = s.count as f64;
    let mean = s.sum / n;
    (mean, (s.sum_sq / n - mean * mean).max(0.0).sqrt())
}

/// Missing (NaN) feature values in `s`, over every feature: a training job on a dataset with
/// any needs `[dataset] fill_missing`.
pub fn missing_values(s: &SliceStats) -> u64 {
    s.features.iter().fold(0u64, |n, f| n.saturating_add(f.missing))
}

/// The first feature (flattened index) with missing values in `s`, and how many it has: what
/// an error about missing values names.
pub fn first_missing(s: &SliceStats) -> Option<(usize, u64)> {
    s.features.iter().enumerate().find(|(_, f)| f.missing > 0).map(|(j, f)| (j, f.missing))
}

/// The statistics of a whole dataset version: `info.stats` where the coordinator filled it in
/// (assignments carry it, without the slices), else the sum of its slices'. None when a slice
/// has none (a version registered before slices carried statistics).
pub fn version_stats(info: &DatasetInfo) -> Option<SliceStats> {
    if let Some(s) = info.stats.as_ref().filter(|s| !s.features.is_empty()) {
        return Some(s.clone());
    }
    let mut acc = SliceStats::default();
    for slice in &info.slices {
        let s = slice.stats.as_ref().filter(|s| !s.features.is_empty())?;
        add(&mut acc, s);
    }
    (!acc.features.is_empty()).then_some(acc)
}

/// Per feature, the value a missing one becomes under `fill` (`[dataset] fill_missing`): the
/// constant, or the feature's mean over every slice of the version (0 for a feature with no
/// value at all). Every rank computes it from the same statistics, so all fill alike.
pub fn fill_values(info: &DatasetInfo, fill: FillMissing) -> Result<Vec<f32>, CoreError> {
    let features: usize = info.feature_shape.iter().map(|&d| d as usize).product();
    match fill {
        FillMissing::Value(v) => Ok(vec![v as f32; features]),
        FillMissing::Mean => {
            let what = format!("dataset {} v{}", info.name, info.version);
            let s = version_stats(info)
                .ok_or_else(|| CoreError::Dataset(format!("{what} has no statistics (a slice was registered without them), so fill_missing = \"mean\" has no means; give a number instead")))?;
            if s.features.len() != features {
                return Err(CoreError::Dataset(format!("{what}: statistics of {} features for records of {features}", s.features.len())));
            }
            Ok(s.features.iter().map(|f| mean_std(f).0 as f32).collect())
        }
    }
}

/// ln(x) for x > 0 from basic IEEE operations alone: x = m 2^e with m in [1, 2), and
/// ln m = 2 atanh((m - 1) / (m + 1)) by its series (|z| <= 1/3; 24 terms is far below f64's
/// rounding).
pub fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    let (mut term, mut sum) = (z, 0.0);
    for k in 0..24 {
        sum += term / (2 * k + 1) as f64;
        term *= z2;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * sum
}

/// Jensen-Shannon divergence (base 2: 0 for equal distributions, 1 for disjoint ones) of two
/// histograms given as counts (a shorter one is padded with zeros; an empty one gives 0).
pub fn js_divergence(p: &[u64], q: &[u64]) -> f64 {
    let (sp, sq) = (p.iter().sum::<u64>() as f64, q.iter().sum::<u64>() as f64);
    if sp == 0.0 || sq == 0.0 {
        return 0.0;
    }
    let mut js = 0.0;
    for i in 0..p.len().max(q.len()) {
        let a = p.get(i).copied().unwrap_or(0) as f64 / sp;
        let b = q.get(i).copied().unwrap_or(0) as f64 / sq;
        let m = (a + b) / 2.0;
        if a > 0.0 {
            js += 0.5 * a * ln(a / m);
        }
        if b > 0.0 {
            js += 0.5 * b * ln(b / m);
        }
    }
    (js / std::f64::consts::LN_2).clamp(0.0, 1.0)
}

/// Drift of `slice` against `base`: the label histograms' JS divergence, and the largest JS
/// divergence of a feature's binned histogram with that feature's index.
pub fn drift(base: &SliceStats, slice: &SliceStats) -> (f64, f64, usize) {
    let label = js_divergence(&base.label_counts, &slice.label_counts);
    let mut worst = (0.0, 0);
    for (j, (a, b)) in base.features.iter().zip(&slice.features).enumerate() {
        let d = js_divergence(&a.bins, &b.bins);
        if d > worst.0 {
            worst = (d, j);
        }
    }
    (label, worst.0, worst.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_the_platform_closely() {
        for x in [1e-12, 0.001, 0.3, 0.5, 1.0, 1.5, 2.0, 7.0, 1e6] {
            assert!((ln(x) - x.ln()).abs() < 1e-12 * x.ln().abs().max(1.0), "{x}: {} vs {}", ln(x), x.ln());
        }
    }

    #[test]
    fn divergence_is_zero_for_equal_shapes_and_one_for_disjoint_ones() {
        assert_eq!(js_divergence(&[10, 20, 30], &[1, 2, 3]), 0.0);
        assert!((js_divergence(&[5, 0], &[0, 7]) - 1.0).abs() < 1e-12);
        let d = js_divergence(&[50, 50, 0], &[50, 40, 10]);
        assert!(d > 0.0 && d < 0.2, "{d}");
    }

    #[test]
    fn missing_values_are_counted_and_filled_with_the_version_mean() {
        let nan = f32::NAN;
        let recs = |px: Vec<f32>| Records::classified(IdxData::F32(px), vec![3], vec![0, 1]);
        let a = slice_stats(&recs(vec![1.0, nan, 5.0, 3.0, nan, 7.0]), None, 2);
        let b = slice_stats(&recs(vec![5.0, 4.0, nan, 7.0, 8.0, 9.0]), Some(&ranges(&a)), 2);
        assert_eq!((missing_values(&a), first_missing(&a)), (2, Some((1, 2))));
        assert_eq!((missing_values(&b), first_missing(&b)), (1, Some((2, 1))));
        let clean = slice_stats(&recs(vec![1.0; 6]), None, 2);
        assert_eq!((missing_values(&clean), first_missing(&clean)), (0, None));

        let slice = |s: &SliceStats| shoal_proto::DatasetSlice { stats: Some(s.clone()), ..Default::default() };
        let mut info = DatasetInfo { name: "d".into(), version: 2, feature_shape: vec![3], slices: vec![slice(&a), slice(&b)], ..Default::default() };
        // Feature 0: (1 + 3 + 5 + 7) / 4; feature 1: (4 + 8) / 2; feature 2: (5 + 7 + 9) / 3.
        assert_eq!(fill_values(&info, FillMissing::Mean).unwrap(), vec![4.0, 6.0, 7.0]);
        assert_eq!(fill_values(&info, FillMissing::Value(-1.5)).unwrap(), vec![-1.5; 3]);
        info.slices.push(shoal_proto::DatasetSlice::default());
        let e = fill_values(&info, FillMissing::Mean).unwrap_err().to_string();
        assert!(e.contains("d v2") && e.contains("statistics"), "{e}");
        assert_eq!(fill_values(&info, FillMissing::Value(0.0)).unwrap(), vec![0.0; 3], "a constant needs no statistics");
        // An assignment's version: its summed statistics, no slices.
        let mut sum = a.clone();
        add(&mut sum, &b);
        let assigned = DatasetInfo { stats: Some(sum), slices: vec![], ..info };
        assert_eq!(fill_values(&assigned, FillMissing::Mean).unwrap(), vec![4.0, 6.0, 7.0]);
    }

    #[test]
    fn stats_add_up_over_slices_and_show_drift() {
        let recs = |labels: Vec<i64>, px: Vec<u8>| Records::classified(IdxData::U8(px), vec![2], labels);
        let a = recs(vec![0, 1, 2, 3], vec![0, 10, 50, 20, 100, 30, 200, 40]);
        let first = slice_stats(&a, None, 4);
        assert_eq!((first.features[0].min, first.features[0].max, first.features[0].count), (0.0, 200.0, 4));
        assert_eq!(mean_std(&first.features[1]), (25.0, 125f64.sqrt()));
        let b = recs(vec![0, 0, 0, 0], vec![0, 10, 0, 10, 0, 10, 250, 99]);
        let second = slice_stats(&b, Some(&ranges(&first)), 4);
        assert_eq!(second.features[0].bins.iter().sum::<u64>(), 4);
        assert_eq!(second.features[0].bins[BINS - 1], 1, "250 is past the first slice's range: the last bin");
        let (label, feature, at) = drift(&first, &second);
        assert!(label > 0.3 && feature > 0.0 && at < 2, "{label} {feature} {at}");
        let mut all = first.clone();
        add(&mut all, &second);
        assert_eq!((all.label_counts.clone(), all.features[0].count, all.features[0].max), (vec![5, 1, 1, 1], 8, 250.0));
    }
}
