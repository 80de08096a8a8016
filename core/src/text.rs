//! Text datasets: byte-level tokens (the vocabulary is the 256 byte values, so no tokenizer
//! file can drift between an import, an append and scoring). A record is a window of
//! `context + 1` tokens (the model reads the first `context` and predicts each next one),
//! windows `stride` tokens apart (default `context`, so an epoch visits each token once and
//! neighbouring windows share one token). Windows are stored as records of u8 features
//! `[context + 1]`, so shards, shuffling, epochs and checkpoints treat them like any record.

use shoal_proto::SliceStats;

use crate::dataset::Records;
use crate::idx::IdxData;
use crate::CoreError;

/// The byte-level vocabulary.
pub const VOCAB: u32 = 256;

/// The most bytes of windows one import or append makes.
pub const MAX_WINDOW_BYTES: u64 = 1 << 30;

/// The tokens windows `[start, end)` of `windows` cover.
pub fn covered(tokens: &[u8], context: usize, stride: usize, start: usize, end: usize) -> &[u8] {
    if start >= end {
        return &[];
    }
    let from = (start * stride).min(tokens.len());
    let to = ((end - 1) * stride + context + 1).min(tokens.len());
    &tokens[from..to.max(from)]
}

/// Files read as one token stream: their bytes, in order, a newline between two files that
/// does not already end with one.
pub fn join(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tokens = Vec::with_capacity(files.iter().map(|(_, b)| b.len() + 1).sum());
    for (_, bytes) in files {
        if !tokens.is_empty() && tokens.last() != Some(&b'\n') {
            tokens.push(b'\n');
        }
        tokens.extend_from_slice(bytes);
    }
    tokens
}

/// The windows of `tokens`: `context + 1` tokens each, starting every `stride` tokens, as
/// records of u8 features `[context + 1]` (their labels are unused: 0). A stream shorter than
/// one window is an error that says how long it is.
pub fn windows(tokens: &[u8], context: usize, stride: usize) -> Result<Records, CoreError> {
    if context == 0 || context as u64 > crate::spec::MAX_CONTEXT {
        return Err(CoreError::Dataset(format!("--context must be 1 to {}, got {context}", crate::spec::MAX_CONTEXT)));
    }
    if stride == 0 {
        return Err(CoreError::Dataset("--stride must be at least 1".into()));
    }
    let w = context + 1;
    if tokens.len() < w {
        return Err(CoreError::Dataset(format!("the text holds {} bytes, fewer than one window of --context {context} + 1", tokens.len())));
    }
    let n = (tokens.len() - w) / stride + 1;
    // Overlapping windows multiply the text: one import holds at most MAX_WINDOW_BYTES.
    let bytes = n.checked_mul(w).filter(|&b| b as u64 <= MAX_WINDOW_BYTES).ok_or_else(|| {
        CoreError::Dataset(format!(
            "--context {context} --stride {stride} cut {} bytes of text into {n} windows of {w} bytes, more than the {} GB one import holds: use a larger --stride or import the text in parts",
            tokens.len(),
            MAX_WINDOW_BYTES >> 30
        ))
    })?;
    let mut x = Vec::with_capacity(bytes);
    for i in 0..n {
        x.extend_from_slice(&tokens[i * stride..i * stride + w]);
    }
    Ok(Records::classified(IdxData::U8(x), vec![w], vec![0; n]))
}

/// A text slice's statistics: its token count and byte histogram (in `label_counts`, so
/// drift is the Jensen-Shannon divergence of the byte histograms, as labels' is for other
/// datasets). No per-position feature statistics: a window position means nothing.
pub fn slice_stats(tokens: &[u8]) -> SliceStats {
    use rayon::prelude::*;
    let counts = tokens
        .par_chunks(1 << 20)
        .map(|c| {
            let mut h = vec![0u64; VOCAB as usize];
            for &b in c {
                h[b as usize] += 1;
            }
            h
        })
        .reduce(|| vec![0u64; VOCAB as usize], |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
            a
        });
    SliceStats { features: Vec::new(), label_counts: counts, tokens: tokens.len() as u64 }
}

/// The text of a window's tokens, for people (bytes that are not UTF-8 shown as U+FFFD).
pub fn show(tokens: &[u8]) -> String {
    String::from_utf8_lossy(tokens).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_by_one_token_at_the_default_stride() {
        let text = b"abcdefghij";
        let r = windows(text, 3, 3).unwrap();
        assert_eq!((r.len(), r.feature_shape.clone()), (3, vec![4]));
        let IdxData::U8(x) = &r.features else { panic!() };
        assert_eq!(&x[..], b"abcddefgghij");
        let r = windows(text, 4, 2).unwrap();
        assert_eq!(r.len(), 3, "starts 0, 2, 4 (4 + 5 = 9 <= 10; 6 + 5 > 10)");
        let e = windows(b"ab", 4, 4).unwrap_err().to_string();
        assert!(e.contains("2 bytes") && e.contains("--context 4"), "{e}");
        assert!(windows(text, 0, 1).is_err() && windows(text, 2, 0).is_err());
        assert_eq!(covered(text, 3, 3, 1, 3), b"defghij", "windows 1 and 2 cover tokens 3 to 9");
        let e = windows(&vec![b'a'; 1 << 20], 4096, 1).unwrap_err().to_string();
        assert!(e.contains("--stride") && e.contains("GB"), "{e}");
    }

    #[test]
    fn files_join_with_a_newline_and_stats_count_bytes() {
        let t = join(&[("a".into(), b"hi".to_vec()), ("b".into(), b"yo\n".to_vec()), ("c".into(), b"!".to_vec())]);
        assert_eq!(t, b"hi\nyo\n!");
        let s = slice_stats(&t);
        assert_eq!((s.tokens, s.label_counts.len(), s.label_counts[b'\n' as usize], s.label_counts[b'h' as usize]), (7, 256, 2, 1));
        let same = slice_stats(b"hi\nyo\n!hi\nyo\n!");
        assert_eq!(crate::stats::js_divergence(&s.label_counts, &same.label_counts), 0.0);
        let other = slice_stats(b"zzzz");
        assert!(crate::stats::js_divergence(&s.label_counts, &other.label_counts) > 0.99);
    }
}
