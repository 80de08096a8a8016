//! A job's metric history: each rank's points go to chunk files under the job's folder in the
//! store (`jobs/ID/metrics/gGEN-rRANK-SEQ.pb`, a `MetricChunk`), which the Raft log indexes
//! (one `MetricChunkRef` per chunk, never a point). Reading merges the chunks into one series
//! per key and rank, a point per step: where a step was run again (a generation that resumed
//! from a checkpoint), the latest generation's point stands.

use std::collections::BTreeMap;

use shoal_proto::{MetricChunk, MetricSeries};

/// The store path of chunk `seq` of `rank` in `generation` of job `job`.
pub fn chunk_path(job: u64, generation: u64, rank: u32, seq: u64) -> String {
    format!("jobs/{job}/metrics/g{generation}-r{rank}-{seq}.pb")
}

/// The keys whose values are the job's, the same on every rank (the reduced loss, the
/// schedule's rate, the reduced gradient's norm, evaluations over every rank's share): every
/// rank records them, and they merge into one series (rank 0's), so the history keeps every
/// step's point even when the worker that was rank 0 is lost before writing its last chunk.
pub const JOB_KEYS: [&str; 9] = ["loss", "lr", "samples_per_s", "grad_norm", "test_accuracy", "test_loss", "test_rmse", "test_r2", "test_bpb"];

/// One series while merging: step -> (generation, unix_ms, value).
type Points = BTreeMap<u64, (u64, u64, f64)>;

/// Merges `chunks` (in any order) into series, keeping the keys in `keys` (all if empty),
/// sorted by key then rank, each by step.
pub fn merge(chunks: &[MetricChunk], keys: &[String]) -> Vec<MetricSeries> {
    // (key, rank) -> step -> (generation, unix_ms, value)
    let mut by: BTreeMap<(String, u32), Points> = BTreeMap::new();
    for c in chunks {
        for p in &c.points {
            let Some(key) = c.keys.get(p.key as usize) else { continue };
            if !keys.is_empty() && !keys.contains(key) {
                continue;
            }
            let rank = if JOB_KEYS.contains(&key.as_str()) { 0 } else { c.rank };
            let series = by.entry((key.clone(), rank)).or_default();
            match series.get(&p.step) {
                // A later generation's run of the step stands; within one, the first rank's.
                Some(&(g, ..)) if g >= c.generation => {}
                _ => {
                    series.insert(p.step, (c.generation, p.unix_ms, p.value));
                }
            }
        }
    }
    by.into_iter()
        .map(|((key, rank), points)| MetricSeries {
            key,
            rank,
            steps: points.keys().copied().collect(),
            unix_ms: points.values().map(|p| p.1).collect(),
            values: points.values().map(|p| p.2).collect(),
        })
        .collect()
}

/// Where `v` falls in the range of finite values `[lo, hi]`, from 0 to 1, for drawing: a
/// range of one value (or one so large that `hi - lo` overflows) still places every value
/// finitely (halves are subtracted, which cannot overflow; a single value sits in the middle).
pub fn position(v: f64, lo: f64, hi: f64) -> f64 {
    let span = hi * 0.5 - lo * 0.5;
    if span.is_nan() || span <= 0.0 {
        return 0.5;
    }
    ((v * 0.5 - lo * 0.5) / span).clamp(0.0, 1.0)
}

/// Points a drawn curve keeps at most (`decimate`).
pub const MAX_DRAWN: usize = 1000;

/// A series cut to at most `max` points for drawing: the steps split into `max / 2` buckets
/// of equal counts, each keeping its lowest and its highest value (in step order), so spikes
/// and dips survive and a million-step run draws as fast as a short one. Series of at most
/// `max` points come back whole. Returns (steps, values).
pub fn decimate(steps: &[u64], values: &[f64], max: usize) -> (Vec<u64>, Vec<f64>) {
    let n = steps.len().min(values.len());
    if n <= max || max < 2 {
        return (steps[..n].to_vec(), values[..n].to_vec());
    }
    let buckets = max / 2;
    let (mut s, mut v) = (Vec::with_capacity(max), Vec::with_capacity(max));
    for b in 0..buckets {
        let (lo, hi) = (n * b / buckets, n * (b + 1) / buckets);
        // The extremes among the bucket's finite values; a bucket with none keeps its first.
        let first = (lo..hi).find(|&i| values[i].is_finite()).unwrap_or(lo);
        let (mut min, mut max_at) = (first, first);
        for i in first..hi {
            if values[i] < values[min] {
                min = i;
            }
            if values[i] > values[max_at] {
                max_at = i;
            }
        }
        let (a, z) = if min <= max_at { (min, max_at) } else { (max_at, min) };
        s.push(steps[a]);
        v.push(values[a]);
        if z != a {
            s.push(steps[z]);
            v.push(values[z]);
        }
    }
    (s, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::MetricPoint;

    #[test]
    fn decimation_keeps_at_most_max_points_with_each_buckets_extremes() {
        let steps: Vec<u64> = (1..=1_000_000).collect();
        let mut values: Vec<f64> = steps.iter().map(|&s| 1.0 / s as f64).collect();
        values[777_777] = 50.0; // a spike
        values[333_333] = -3.0; // a dip
        let (s, v) = decimate(&steps, &values, MAX_DRAWN);
        assert!(s.len() <= MAX_DRAWN && s.len() >= MAX_DRAWN - 2, "{}", s.len());
        assert!(s.windows(2).all(|w| w[0] < w[1]), "in step order");
        assert!(s.contains(&777_778) && v.contains(&50.0), "the spike survives");
        assert!(s.contains(&333_334) && v.contains(&-3.0), "the dip survives");
        assert_eq!((s[0], v[0]), (1, 1.0), "the first point (its bucket's highest)");
        let short = decimate(&steps[..10], &values[..10], MAX_DRAWN);
        assert_eq!(short.0, &steps[..10]);
        // A bucket that starts with a NaN still keeps its finite extremes.
        let mut holes = values.clone();
        holes[0] = f64::NAN;
        let (s, v) = decimate(&steps, &holes, MAX_DRAWN);
        assert!(v[..2].iter().all(|v| v.is_finite()) && s[0] > 1, "{:?}", &v[..2]);
        // Drawing positions are finite for any finite range.
        assert_eq!(position(5.0, 5.0, 5.0), 0.5);
        assert_eq!(position(f64::MAX, -f64::MAX, f64::MAX), 1.0);
        assert_eq!(position(0.0, -f64::MAX, f64::MAX), 0.5);
    }

    fn chunk(generation: u64, rank: u32, points: &[(u64, f64)]) -> MetricChunk {
        MetricChunk {
            job_id: 1,
            generation,
            rank,
            keys: vec!["loss".into(), "lr".into()],
            points: points.iter().map(|&(step, value)| MetricPoint { key: 0, step, unix_ms: step * 10, value }).collect(),
        }
    }

    #[test]
    fn a_redone_step_keeps_its_latest_generation_whatever_the_order() {
        let first = chunk(1, 0, &[(1, 1.0), (2, 0.9), (3, 0.8)]);
        let again = chunk(2, 0, &[(3, 0.7), (4, 0.6)]);
        for chunks in [vec![first.clone(), again.clone()], vec![again, first]] {
            let s = merge(&chunks, &[]);
            assert_eq!(s.len(), 1);
            assert_eq!((s[0].key.as_str(), s[0].rank), ("loss", 0));
            assert_eq!(s[0].steps, [1, 2, 3, 4]);
            assert_eq!(s[0].values, [1.0, 0.9, 0.7, 0.6]);
        }
    }

    #[test]
    fn keys_filter_job_keys_merge_across_ranks_and_rank_keys_stay_apart() {
        let mut a = chunk(1, 0, &[(1, 1.0)]);
        a.keys.push("phase_data_ms".into());
        a.points.push(MetricPoint { key: 1, step: 1, unix_ms: 0, value: 0.1 });
        a.points.push(MetricPoint { key: 2, step: 1, unix_ms: 0, value: 3.0 });
        // Rank 1 has the job's loss of step 1 too, and alone step 2's (rank 0 was lost).
        let mut b = chunk(1, 1, &[(1, 1.0), (2, 0.5)]);
        b.keys.push("phase_data_ms".into());
        b.points.push(MetricPoint { key: 2, step: 1, unix_ms: 0, value: 4.0 });
        let s = merge(&[a.clone(), b.clone()], &[]);
        assert_eq!(s.iter().map(|s| (s.key.as_str(), s.rank)).collect::<Vec<_>>(), [("loss", 0), ("lr", 0), ("phase_data_ms", 0), ("phase_data_ms", 1)]);
        assert_eq!((s[0].steps.clone(), s[0].values.clone()), (vec![1, 2], vec![1.0, 0.5]));
        let s = merge(&[a, b], &["lr".to_string()]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].values, [0.1]);
    }
}
