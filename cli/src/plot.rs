//! `job compare --plot OUT.png`: curves overlaid in a PNG, drawn here with no graphics
//! library: lines on an RGB canvas, text in a built-in 5x7 font, the PNG encoded with the
//! zlib (flate2) and CRC-32 (crc32fast) crates the binary already has. Curves are decimated
//! like the dashboard's (`core::history::decimate`), so any run length draws alike.

use std::io::Write as _;

/// The curve colors, as the dashboard's.
pub const COLORS: [[u8; 3]; 8] = [[0x1f, 0x77, 0xb4], [0xd6, 0x27, 0x28], [0x2c, 0xa0, 0x2c], [0xff, 0x7f, 0x0e], [0x94, 0x67, 0xbd], [0x8c, 0x56, 0x4b], [0xe3, 0x77, 0xc2], [0x17, 0xbe, 0xcf]];

const W: usize = 960;
const H: usize = 540;
const LEFT: usize = 100;
const RIGHT: usize = 20;
const TOP: usize = 70;
const BOTTOM: usize = 50;

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas { px: vec![255; W * H * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line two pixels wide (Bresenham, each point and the one below).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// Text at (x, y), glyphs of 5x7 scaled by 2; characters the font lacks as a box.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.rect(x + i as i64 * 12 + col * 2, y + r as i64 * 2, 2, 2, c);
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(H * (W * 3 + 1));
        for row in self.px.chunks_exact(W * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw).expect("writing into memory");
        let idat = z.finish().expect("writing into memory");
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend((W as u32).to_be_bytes());
        ihdr.extend((H as u32).to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter choice, no interlace
        for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &idat[..]), (b"IEND", &[][..])] {
            out.extend((data.len() as u32).to_be_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(kind);
            crc.update(data);
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend(crc.finalize().to_be_bytes());
        }
        out
    }
}

/// A short number for an axis: 4 significant digits.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The PNG of `curves` (label, steps, values) overlaid under `title`: a frame, the value range
/// on the left, the step range below, a legend of colored squares and labels at the top.
pub fn curves_png(title: &str, curves: &[(String, Vec<u64>, Vec<f64>)]) -> Vec<u8> {
    let mut c = Canvas::new();
    let grey = [0x99, 0x99, 0x99];
    let black = [0x22, 0x22, 0x22];
    c.text(LEFT as i64, 10, title, black);
    let drawn: Vec<(String, Vec<u64>, Vec<f64>)> = curves
        .iter()
        .map(|(l, s, v)| {
            let (s, v) = shoal_core::history::decimate(s, v, shoal_core::history::MAX_DRAWN);
            (l.clone(), s, v)
        })
        .collect();
    for (i, (label, ..)) in drawn.iter().enumerate() {
        let (x, y) = (LEFT as i64 + (i as i64 % 3) * 280, 34 + (i as i64 / 3) * 18);
        c.rect(x, y + 2, 10, 10, COLORS[i % COLORS.len()]);
        c.text(x + 16, y, label, black);
    }
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let (x0, x1) = drawn.iter().flat_map(|d| d.1.iter()).fold((u64::MAX, 0), |(a, b), &s| (a.min(s), b.max(s)));
    let (y0, y1) = drawn.iter().flat_map(|d| d.2.iter().filter(|v| v.is_finite())).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (y0, y1) = if y0.is_finite() { (y0, y1) } else { (0.0, 1.0) };
    let xspan = x1.saturating_sub(x0).max(1) as f64;
    // The frame and the ranges.
    let (l, t, r, b) = (LEFT as i64, TOP as i64, (W - RIGHT) as i64, (H - BOTTOM) as i64);
    for (p, q) in [((l, t), (r, t)), ((r, t), (r, b)), ((r, b), (l, b)), ((l, b), (l, t))] {
        c.line(p, q, grey);
    }
    c.text(4, t, &short(y1), black);
    c.text(4, b - 14, &short(y0), black);
    if x0 <= x1 {
        c.text(l, b + 10, &format!("step {x0}"), black);
        let last = format!("step {x1}");
        c.text(r - last.len() as i64 * 12, b + 10, &last, black);
    }
    for (i, (_, steps, values)) in drawn.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut prev: Option<(i64, i64)> = None;
        for (&s, &v) in steps.iter().zip(values) {
            if !v.is_finite() {
                prev = None;
                continue;
            }
            let x = l + ((s - x0) as f64 / xspan * pw) as i64;
            let y = b - (shoal_core::history::position(v, y0, y1) * ph) as i64;
            match prev {
                Some(p) => c.line(p, (x, y), color),
                None => c.rect(x - 1, y - 1, 3, 3, color),
            }
            prev = Some((x, y));
        }
    }
    c.png()
}

/// 5x7 glyphs, a row a byte, the leftmost column the 0b10000 bit; upper case as lower case.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_lowercase() {
        ' ' => [0; 7],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'j' => [2, 0, 6, 2, 2, 18, 12],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'q' => [0, 0, 13, 19, 15, 1, 1],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'z' => [0, 0, 31, 2, 4, 8, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        _ => [31, 17, 17, 17, 17, 17, 31],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_is_a_png_with_each_curve_in_its_color() {
        let steps: Vec<u64> = (1..=3000).collect();
        let a: Vec<f64> = steps.iter().map(|&s| 3.0 / (1.0 + s as f64 / 100.0)).collect();
        let b: Vec<f64> = steps.iter().map(|&s| 2.0 / (1.0 + s as f64 / 300.0)).collect();
        let png = curves_png("loss", &[("job 1 loss".into(), steps.clone(), a), ("job 2 loss".into(), steps, b)]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!((u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap())), (W as u32, H as u32));
        // Decoded back: both colors are on the canvas, many times (the curves, not just the legend).
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&png[41..41 + idat_len]), &mut raw).unwrap();
        assert_eq!(raw.len(), H * (W * 3 + 1));
        let count = |c: [u8; 3]| raw.chunks_exact(W * 3 + 1).flat_map(|row| row[1..].chunks_exact(3)).filter(|p| *p == c).count();
        assert!(count(COLORS[0]) > 500 && count(COLORS[1]) > 500, "{} {}", count(COLORS[0]), count(COLORS[1]));
        // The CRC of each chunk is right (IHDR's).
        let mut crc = crc32fast::Hasher::new();
        crc.update(&png[12..29]);
        assert_eq!(crc.finalize().to_be_bytes(), png[29..33]);
    }
}
