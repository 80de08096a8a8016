//! CSV tables into records: a header row, one label column, every other column a numeric
//! feature. The file is parsed as bytes in ~1 MiB blocks on all cores, straight into one
//! features buffer; plain decimals take a fast path that gives the same f32 as `str::parse`
//! (anything else, such as exponents, quotes or spaces, falls back to it).

use std::collections::HashMap;

use rayon::prelude::*;

use crate::dataset::{Records, Targets};
use crate::idx::IdxData;
use crate::{CoreError, Result};

/// Bytes per parallel block (cut at a line end).
const BLOCK_BYTES: usize = 1 << 20;

/// Largest integer mantissa an f32 holds exactly.
const EXACT_MANTISSA: u64 = 1 << 24;

/// Powers of ten that f32 holds exactly (5^10 < 2^24).
const POW10: [f32; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

/// Reads a CSV table (`name` for messages): a header row, the label column `label` (integer
/// class ids, or strings mapped to class ids), every other column a numeric feature (an empty
/// cell is missing: NaN). String labels take their ids from `known` (the dataset's classes)
/// and, for names not in it, after them in sorted order. Returns the records (f32 features of
/// shape [columns - 1]) and the class names (empty for integer labels).
pub fn records_from_csv(name: &str, bytes: &[u8], label: &str, known: &[String]) -> Result<(Records, Vec<String>)> {
    let bad = |msg: String| CoreError::Dataset(format!("{name}: {msg}"));
    let (bytes, columns, header_end) = header(name, bytes)?;
    let at = columns.iter().position(|c| *c == label).ok_or_else(|| bad(format!("no column {label:?} for the label (columns: {})", columns.join(", "))))?;
    if columns.len() < 2 {
        return Err(bad("needs a label column and at least one feature column".into()));
    }
    let table = Table { name, whole: bytes, columns: &columns, label_at: at };
    let body = &bytes[header_end..];
    let blocks = split_blocks(body);
    // Integer labels unless the dataset has class names or the first record's label is not one.
    let first_label = body.split(|&b| b == b'\n').find(|l| !l.trim_ascii().is_empty()).and_then(|l| l.split(|&b| b == b',').nth(at));
    let integers = known.is_empty() && first_label.is_some_and(|l| int_label(l.trim_ascii()).is_some());
    let parsed = if integers { table.parse(&blocks, true) } else { Err(Restart) };
    let (features, labels) = match parsed {
        Ok(done) => done,
        Err(Restart) => match table.parse(&blocks, false) {
            Ok(done) => done,
            Err(Restart) => unreachable!("string labels never restart"),
        },
    }?;
    let (labels, names) = match labels {
        Labels::Ids(ids) => (ids, Vec::new()),
        Labels::Names(raw) => {
            let mut names: Vec<String> = known.to_vec();
            let mut new: Vec<&str> = raw.iter().copied().filter(|l| !known.iter().any(|k| k == l)).collect();
            new.sort_unstable();
            new.dedup();
            names.extend(new.into_iter().map(String::from));
            let index: HashMap<&str, i64> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as i64)).collect();
            (raw.iter().map(|l| index[l]).collect(), names)
        }
    };
    if labels.is_empty() {
        return Err(bad("no records".into()));
    }
    Ok((Records::classified(IdxData::F32(features), vec![columns.len() - 1], labels), names))
}

/// Reads a CSV table (`name` for messages) for a regression: a header row, the column
/// `target` a float target (every record must have one), every other column a numeric
/// feature (an empty cell is missing: NaN). Returns records of f32 features of shape
/// [columns - 1] with one target each.
pub fn records_from_csv_target(name: &str, bytes: &[u8], target: &str) -> Result<Records> {
    let bad = |msg: String| CoreError::Dataset(format!("{name}: {msg}"));
    let (bytes, columns, header_end) = header(name, bytes)?;
    let at = columns.iter().position(|c| *c == target).ok_or_else(|| bad(format!("no column {target:?} for the target (columns: {})", columns.join(", "))))?;
    if columns.len() < 2 {
        return Err(bad("needs a target column and at least one feature column".into()));
    }
    // Every column is parsed as a number, then the target column is taken out.
    let table = Table { name, whole: bytes, columns: &columns, label_at: usize::MAX };
    let blocks = split_blocks(&bytes[header_end..]);
    let (all, _) = match table.parse(&blocks, false) {
        Ok(done) => done?,
        Err(Restart) => unreachable!("a table without a label column never restarts"),
    };
    let cols = columns.len();
    let n = all.len() / cols;
    if n == 0 {
        return Err(bad("no records".into()));
    }
    let mut features = Vec::with_capacity(n * (cols - 1));
    let mut targets = Vec::with_capacity(n);
    for (i, row) in all.chunks_exact(cols).enumerate() {
        let t = row[at];
        if !t.is_finite() {
            let what = if t.is_nan() { "missing".to_string() } else { format!("{t}") };
            return Err(bad(format!("record {i} (from 0, after the header; blank lines not counted): the target {target:?} is {what}; every record needs a finite target")));
        }
        targets.push(t);
        features.extend(row[..at].iter().chain(&row[at + 1..]));
    }
    Ok(Records::regression(IdxData::F32(features), vec![cols - 1], Targets { values: targets, width: 1 }))
}

/// The file without a byte-order mark, the header's column names (the first line that is not
/// blank), and where the records start.
fn header<'a>(name: &str, bytes: &'a [u8]) -> Result<(&'a [u8], Vec<&'a str>, usize)> {
    let bad = |msg: &str| CoreError::Dataset(format!("{name}: {msg}"));
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut header_end = 0;
    let header = loop {
        if header_end >= bytes.len() {
            return Err(bad("no header row"));
        }
        let end = bytes[header_end..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |p| header_end + p);
        let line = &bytes[header_end..end];
        header_end = (end + 1).min(bytes.len());
        if !line.trim_ascii().is_empty() {
            break std::str::from_utf8(line).map_err(|_| bad("the header row is not UTF-8"))?;
        }
    };
    Ok((bytes, header.split(',').map(|c| c.trim().trim_matches('"')).collect(), header_end))
}

/// The body cut into blocks of about `BLOCK_BYTES`, each ending just after a newline (the last
/// one at the end of the file).
fn split_blocks(body: &[u8]) -> Vec<&[u8]> {
    let mut blocks = Vec::with_capacity(body.len() / BLOCK_BYTES + 1);
    let mut start = 0;
    while start < body.len() {
        let cut = (start + BLOCK_BYTES).min(body.len());
        let end = body[cut..].iter().position(|&b| b == b'\n').map_or(body.len(), |p| cut + p + 1);
        blocks.push(&body[start..end]);
        start = end;
    }
    blocks
}

/// The labels read: integer ids, or the raw names to map to ids.
enum Labels<'a> {
    Ids(Vec<i64>),
    Names(Vec<&'a str>),
}

/// Parsing with integer labels met one that is not: parse again with names.
struct Restart;

type Parsed<'a> = Result<(Vec<f32>, Labels<'a>)>;

struct Table<'a> {
    name: &'a str,
    /// The whole file, for line numbers in messages.
    whole: &'a [u8],
    columns: &'a [&'a str],
    label_at: usize,
}

impl<'a> Table<'a> {
    fn bad_at(&self, at: &[u8], msg: String) -> CoreError {
        let offset = (at.as_ptr() as usize).saturating_sub(self.whole.as_ptr() as usize).min(self.whole.len());
        let line = self.whole[..offset].iter().filter(|&&b| b == b'\n').count() + 1;
        CoreError::Dataset(format!("{}: line {line}: {msg}", self.name))
    }

    /// Values per record: every column but the label's (`label_at` past the columns: none).
    fn width(&self) -> usize {
        self.columns.len() - usize::from(self.label_at < self.columns.len())
    }

    /// Parses every block into one features buffer (rows of `width()`) and the labels.
    fn parse(&self, blocks: &[&'a [u8]], integers: bool) -> Result<Parsed<'a>, Restart> {
        let width = self.width();
        // Each block's lines bound its records (blank lines make fewer), so each block writes
        // into its own part of the one buffer; the rare gaps are closed afterwards.
        let bounds: Vec<usize> = blocks.par_iter().map(|b| b.iter().filter(|&&c| c == b'\n').count() + usize::from(!b.ends_with(b"\n"))).collect();
        let rows_bound: usize = bounds.iter().sum();
        let mut features = vec![0f32; rows_bound * width];
        let mut ids = if integers { vec![0i64; rows_bound] } else { Vec::new() };
        let mut feature_parts = Vec::with_capacity(blocks.len());
        let mut id_parts = Vec::with_capacity(blocks.len());
        let (mut f_rest, mut id_rest) = (&mut features[..], &mut ids[..]);
        for &n in &bounds {
            let (f, rest) = f_rest.split_at_mut(n * width);
            feature_parts.push(f);
            f_rest = rest;
            let (l, rest) = id_rest.split_at_mut(if integers { n } else { 0 });
            id_parts.push(l);
            id_rest = rest;
        }
        let results: Vec<Result<(usize, Vec<&'a str>), BlockError>> = blocks
            .par_iter()
            .zip(feature_parts.into_par_iter())
            .zip(id_parts.into_par_iter())
            .map(|((block, feats), ids)| self.parse_block(block, feats, integers.then_some(ids)))
            .collect();
        let mut rows = Vec::with_capacity(blocks.len());
        let mut names = Vec::new();
        for r in results {
            match r {
                Ok((n, block_names)) => {
                    rows.push(n);
                    names.extend(block_names);
                }
                Err(BlockError::NotInteger) => return Err(Restart),
                Err(BlockError::Bad(e)) => return Ok(Err(e)),
            }
        }
        // Close the gaps left by blank lines, in order.
        let total: usize = rows.iter().sum();
        if total != rows_bound {
            let (mut to, mut from) = (0, 0);
            for (&n, &bound) in rows.iter().zip(&bounds) {
                features.copy_within(from * width..(from + n) * width, to * width);
                if integers {
                    ids.copy_within(from..from + n, to);
                }
                to += n;
                from += bound;
            }
            features.truncate(total * width);
            ids.truncate(total);
        }
        Ok(Ok((features, if integers { Labels::Ids(ids) } else { Labels::Names(names) })))
    }

    /// Parses one block's records into `feats` (and `ids` with integer labels; else returns
    /// the label names). Returns the records read.
    fn parse_block(&self, block: &'a [u8], feats: &mut [f32], mut ids: Option<&mut [i64]>) -> Result<(usize, Vec<&'a str>), BlockError> {
        let (cols, width) = (self.columns.len(), self.width());
        let mut names = Vec::new();
        let (mut pos, mut row) = (0, 0);
        while pos < block.len() {
            let line_start = pos;
            // Blank lines are skipped.
            if matches!(block[pos], b'\n' | b'\r' | b' ' | b'\t') {
                let end = block[pos..].iter().position(|&b| b == b'\n').map_or(block.len(), |p| pos + p);
                if block[pos..end].trim_ascii().is_empty() {
                    pos = end + 1;
                    continue;
                }
            }
            // The records were counted by '\n'; a lone '\r' also ends a line here. Found by
            // fuzzing: a record past the count is an error, never an out-of-bounds write.
            if (row + 1) * width > feats.len() || ids.as_deref().is_some_and(|i| row >= i.len()) {
                return Err(BlockError::Bad(self.bad_at(&block[line_start..], "more records than lines: a carriage return alone inside a line?".into())));
            }
            let out = &mut feats[row * width..(row + 1) * width];
            let mut f = 0;
            for j in 0..cols {
                if j == self.label_at {
                    let end = cell_end(block, pos);
                    let cell = block[pos..end].trim_ascii();
                    match ids.as_deref_mut() {
                        Some(ids) => ids[row] = int_label(cell).ok_or(BlockError::NotInteger)?,
                        None => {
                            let cell = std::str::from_utf8(cell).map_err(|_| BlockError::Bad(self.bad_at(&block[pos..], "the label is not UTF-8".into())))?;
                            names.push(cell.trim_matches('"'));
                        }
                    }
                    pos = end;
                } else {
                    out[f] = match fast_f32(block, &mut pos) {
                        Some(v) => v,
                        None => {
                            let end = cell_end(block, pos);
                            let v = self.slow_cell(&block[pos..end], j)?;
                            pos = end;
                            v
                        }
                    };
                    f += 1;
                }
                // A comma between cells; a line end (or the file's end) after the last.
                let next = block.get(pos).copied();
                let fits = if j + 1 < cols { next == Some(b',') } else { matches!(next, None | Some(b'\n' | b'\r')) };
                if !fits {
                    return Err(BlockError::Bad(self.cells_error(&block[line_start..])));
                }
                pos += 1;
            }
            // "\r\n": the '\r' was taken as the line end; step over the '\n'.
            if block.get(pos - 1) == Some(&b'\r') && block.get(pos) == Some(&b'\n') {
                pos += 1;
            }
            row += 1;
        }
        Ok((row, names))
    }

    /// A cell off the fast path: trimmed of spaces and quotes, empty (missing: NaN) or a number.
    fn slow_cell(&self, raw: &[u8], column: usize) -> Result<f32, BlockError> {
        let cell = String::from_utf8_lossy(raw);
        let cell = cell.trim().trim_matches('"');
        if cell.is_empty() {
            return Ok(f32::NAN);
        }
        cell.parse().map_err(|_| BlockError::Bad(self.bad_at(raw, format!("column {:?} holds {cell:?}, not a number", self.columns[column]))))
    }

    fn cells_error(&self, line: &[u8]) -> CoreError {
        let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
        let cells = line[..end].split(|&b| b == b',').count();
        self.bad_at(line, format!("{cells} cells, the header has {}", self.columns.len()))
    }
}

enum BlockError {
    NotInteger,
    Bad(CoreError),
}

/// Where the cell starting at `pos` ends: its comma or line end, or the block's end.
fn cell_end(block: &[u8], pos: usize) -> usize {
    block[pos..].iter().position(|&b| matches!(b, b',' | b'\n' | b'\r')).map_or(block.len(), |p| pos + p)
}

/// An integer class id in [0, 1e6), with optional quotes.
fn int_label(cell: &[u8]) -> Option<i64> {
    let cell = cell.strip_prefix(b"\"").and_then(|c| c.strip_suffix(b"\"")).unwrap_or(cell);
    if cell.is_empty() || cell.len() > 7 || !cell.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = cell.iter().fold(0i64, |v, &d| v * 10 + i64::from(d - b'0'));
    (v < 1_000_000).then_some(v)
}

/// A plain decimal (`-12.5`, `3`, `.25`) that ends at a comma or line end, when its digits fit
/// f32 exactly: then one correctly rounded division gives what `str::parse` gives. Advances
/// `pos` past it; `None` (and `pos` unchanged) for anything else.
#[inline]
fn fast_f32(b: &[u8], pos: &mut usize) -> Option<f32> {
    let mut i = *pos;
    let neg = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let (mut mantissa, mut digits, mut fraction) = (0u64, 0u32, 0usize);
    while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
        mantissa = mantissa * 10 + u64::from(d - b'0');
        digits += 1;
        i += 1;
        if digits > 18 {
            return None;
        }
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            mantissa = mantissa * 10 + u64::from(d - b'0');
            digits += 1;
            fraction += 1;
            i += 1;
            if digits > 18 {
                return None;
            }
        }
    }
    if digits == 0 || mantissa > EXACT_MANTISSA || fraction >= POW10.len() || !matches!(b.get(i), None | Some(b',' | b'\n' | b'\r')) {
        return None;
    }
    *pos = i;
    let v = mantissa as f32 / POW10[fraction];
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str, known: &[String]) -> Result<(Records, Vec<String>)> {
        records_from_csv("t.csv", text.as_bytes(), "species", known)
    }

    fn floats(r: &Records) -> &[f32] {
        match &r.features {
            IdxData::F32(f) => f,
            IdxData::U8(_) => panic!("CSV features are f32"),
        }
    }

    #[test]
    fn reads_numbers_and_maps_string_labels() {
        let (r, names) = csv("a,species,b\n1.5,virginica,2\n0.5,setosa,\n3,virginica,4\n", &[]).unwrap();
        assert_eq!(names, ["setosa", "virginica"]);
        assert_eq!((r.labels.clone(), r.feature_shape.clone(), r.dtype()), (vec![1, 0, 1], vec![2], "f32"));
        let f = floats(&r);
        assert_eq!((f[0], f[1], f[2], f[3].is_nan()), (1.5, 2.0, 0.5, true));
        // Appended with the dataset's names: a new one comes after them.
        let (r, names) = csv("a,species,b\n1,iris-x,2\n1,setosa,2\n", &["setosa".into(), "virginica".into()]).unwrap();
        assert_eq!((names.len(), r.labels.clone()), (3, vec![2, 0]));
        let (r, names) = records_from_csv("i.csv", b"x,y\n1,0\n2,3\n", "y", &[]).unwrap();
        assert_eq!((names.len(), r.labels.clone()), (0, vec![0, 3]));
        // Integers first, then a name: read again with names.
        let (r, names) = records_from_csv("m.csv", b"x,y\n1,0\n2,cat\n", "y", &[]).unwrap();
        assert_eq!((names, r.labels.clone()), (vec!["0".to_string(), "cat".to_string()], vec![0, 1]));
    }

    #[test]
    fn a_target_column_gives_float_targets() {
        let r = records_from_csv_target("d.csv", b"age,y,bmi\n0.5,151,1\n-0.25,75.5,\n", "y").unwrap();
        assert_eq!((r.target_width(), r.classes(), r.len(), r.feature_shape.clone()), (1, 0, 2, vec![2]));
        assert_eq!(r.targets.as_ref().unwrap().values, vec![151.0, 75.5]);
        let f = floats(&r);
        assert_eq!((f[0], f[1], f[2], f[3].is_nan()), (0.5, 1.0, -0.25, true));
        for (text, want) in [
            ("a,b\n1,2\n", "no column \"y\" for the target"),
            ("a,y\n1,\n", "record 0 (from 0, after the header; blank lines not counted): the target \"y\" is missing"),
            ("a,y\n1,2\n1,cat\n", "line 3: column \"y\" holds \"cat\", not a number"),
            ("a,y\n", "no records"),
        ] {
            let e = records_from_csv_target("d.csv", text.as_bytes(), "y").unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("d.csv"), "{e} (wanted {want})");
        }
        // The bundled diabetes table: 442 records, 10 features, targets 25..346.
        let text = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/diabetes/diabetes.csv")).unwrap();
        let r = records_from_csv_target("diabetes.csv", &text, "progression").unwrap();
        let t = &r.targets.as_ref().unwrap().values;
        assert_eq!((r.len(), r.feature_shape.clone()), (442, vec![10]));
        assert_eq!((t.iter().cloned().fold(f32::MAX, f32::min), t.iter().cloned().fold(f32::MIN, f32::max)), (25.0, 346.0));
    }

    #[test]
    fn bad_tables_name_the_line_and_the_problem() {
        for (text, want) in [
            ("a,b\n1,2\n", "no column \"species\""),
            ("a,species\n1,x,3\n", "line 2: 3 cells"),
            ("a,species\n1,x\n2\n", "line 3: 1 cells"),
            ("a,species\n\n1,x\nfoo,x\n", "line 4: column \"a\" holds \"foo\", not a number"),
            ("", "no header row"),
            ("a,species\n", "no records"),
        ] {
            let e = csv(text, &[]).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("t.csv"), "{e} (wanted {want})");
        }
    }

    #[test]
    fn fast_path_gives_what_str_parse_gives() {
        let mut rng = crate::rng::SplitMix64::new(3);
        let mut cells: Vec<String> = ["0", "-0", "-0.0000", "+1.5", ".25", "7.", "16777216", "16777217", "0.1", "3.4028235e38", "1e-3", "123456789.123456789", " 2.5 ", "\"4\"", "nan", "-inf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for _ in 0..20_000 {
            let digits = rng.below(9) as usize + 1;
            let v = rng.next_f32() as f64 * 10f64.powi(rng.below(8) as i32);
            cells.push(format!("{}{v:.digits$}", if rng.below(2) == 0 { "-" } else { "" }));
        }
        let text = format!("species,v\n{}\n", cells.iter().map(|c| format!("0,{c}")).collect::<Vec<_>>().join("\r\n"));
        let (r, _) = csv(&text, &[]).unwrap();
        for (cell, got) in cells.iter().zip(floats(&r)) {
            let want: f32 = cell.trim().trim_matches('"').parse().unwrap();
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{cell:?}: {got} != {want}");
        }
    }

    #[test]
    fn blocks_and_blank_lines_keep_record_order() {
        // Enough rows for many blocks, with blank lines scattered and no final newline.
        let mut text = String::from("species,v\n");
        let mut want = Vec::new();
        for i in 0..200_000u32 {
            if i % 9_999 == 0 {
                text.push_str("\n  \n");
            }
            text.push_str(&format!("{},{}.5\n", i % 7, i));
            want.push((i % 7) as i64);
        }
        text.pop();
        let (r, _) = csv(&text, &[]).unwrap();
        assert_eq!(r.labels, want);
        assert!(floats(&r).iter().enumerate().all(|(i, &v)| v == i as f32 + 0.5));
    }
}
