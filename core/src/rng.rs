//! A small deterministic RNG (SplitMix64). Data order and parameter init come from it, so a
//! job's seed alone fixes them on every machine and across resumes.

#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A stream derived from `seed` and a purpose tag (e.g. an epoch number), independent of
    /// other tags.
    pub fn derive(seed: u64, tag: u64) -> Self {
        let mut m = SplitMix64::new(seed ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03));
        m.next_u64();
        m
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits (exact in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [0, 1) with 53 random bits (exact in f64).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) without modulo bias worth caring about (n is far below 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// A 24-bit digest of a multiset of record indices, kept as two 12-bit sums modulo 4096 so
/// that the ranks' parts add up exactly in an f32 all-reduce (up to 4096 ranks). Training
/// counts, per epoch, the records that went into applied steps with it: a record trained
/// twice and another skipped keep the count but change the digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordDigest {
    pub lo: u32,
    pub hi: u32,
}

impl RecordDigest {
    pub fn add(&mut self, index: u64) {
        let h = SplitMix64::new(index).next_u64();
        self.lo = (self.lo + (h & 0xFFF) as u32) & 0xFFF;
        self.hi = (self.hi + ((h >> 12) & 0xFFF) as u32) & 0xFFF;
    }

    /// Adds other digests' halves, summed (e.g. over the ranks).
    pub fn add_sums(&mut self, lo: u64, hi: u64) {
        self.lo = ((self.lo as u64 + lo) & 0xFFF) as u32;
        self.hi = ((self.hi as u64 + hi) & 0xFFF) as u32;
    }

    pub fn packed(self) -> u32 {
        self.hi << 12 | self.lo
    }

    pub fn from_packed(p: u32) -> RecordDigest {
        RecordDigest { lo: p & 0xFFF, hi: (p >> 12) & 0xFFF }
    }

    /// The digest of `indices`.
    pub fn of(indices: impl IntoIterator<Item = u64>) -> RecordDigest {
        let mut d = RecordDigest::default();
        for i in indices {
            d.add(i);
        }
        d
    }
}

/// The training order of `n` records for one epoch: a permutation fixed by (seed, epoch).
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::derive(seed, 0x5EED_0000 + epoch);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_deterministic_and_complete() {
        let a = epoch_permutation(1000, 7, 3);
        assert_eq!(a, epoch_permutation(1000, 7, 3));
        assert_ne!(a, epoch_permutation(1000, 7, 4));
        assert_ne!(a, epoch_permutation(1000, 8, 3));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn floats_are_in_unit_interval() {
        let mut r = SplitMix64::new(1);
        let xs: Vec<f32> = (0..10_000).map(|_| r.next_f32()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn record_digests_add_up_in_any_split_and_tell_a_duplicate_from_a_skip() {
        let whole = RecordDigest::of(0..1000);
        let (a, b) = (RecordDigest::of(0..400), RecordDigest::of(400..1000));
        let mut sum = RecordDigest::default();
        sum.add_sums(a.lo as u64 + b.lo as u64, a.hi as u64 + b.hi as u64);
        assert_eq!(sum, whole);
        assert_eq!(RecordDigest::from_packed(whole.packed()), whole);
        // 5 twice and 6 never: same count, another digest.
        let twisted = RecordDigest::of((0..1000).map(|i| if i == 6 { 5 } else { i }));
        assert_ne!(twisted, whole);
    }
}
