//! IDX reader (the MNIST format): a big-endian header `00 00 TYPE NDIMS`, NDIMS u32 sizes, then
//! the raw elements. Gzip-compressed files are detected by their magic bytes.

use std::io::Read;
use std::path::Path;

use crate::{CoreError, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum IdxData {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: IdxData,
}

impl IdxArray {
    pub fn len(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const MAX_BYTES: usize = 8 << 30;

/// Reads an IDX file (optionally gzip-compressed).
pub fn read_idx_file(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    let name = path.display().to_string();
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_BYTES as u64)
            .read_to_end(&mut out)
            .map_err(|e| CoreError::NotIdx { path: name.clone(), reason: format!("bad gzip stream: {e}") })?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|reason| CoreError::NotIdx { path: name, reason })
}

/// Parses IDX bytes; the error says what is wrong with them.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!("{} bytes is too short for an IDX header", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!("magic starts with {:02x} {:02x}, expected 00 00", bytes[0], bytes[1]));
    }
    let (elem, ndims) = (bytes[2], bytes[3] as usize);
    if ndims == 0 || ndims > 8 {
        return Err(format!("{ndims} dimensions is not supported (1 to 8)"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("dimensions overflow")?;
    let elem_size = match elem {
        0x08 => 1,
        0x0D => 4,
        0x09 | 0x0B | 0x0C | 0x0E => return Err(format!("element type 0x{elem:02x} is not supported (u8 and f32 are)")),
        _ => return Err(format!("unknown element type 0x{elem:02x}")),
    };
    let body = &bytes[header..];
    let want = count.checked_mul(elem_size).ok_or("dimensions overflow")?;
    if body.len() != want {
        return Err(format!("header says {dims:?} ({want} bytes of data) but the file has {} bytes after the header", body.len()));
    }
    let data = if elem == 0x08 {
        IdxData::U8(body.to_vec())
    } else {
        IdxData::F32(body.chunks_exact(4).map(|c| f32::from_be_bytes(c.try_into().unwrap())).collect())
    };
    Ok(IdxArray { dims, data })
}

/// Encodes a u8 array as IDX (used by tests and tools).
pub fn encode_idx_u8(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_u8() {
        let bytes = encode_idx_u8(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let a = parse_idx(&bytes).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, IdxData::U8(vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(parse_idx(b"hello world").unwrap_err().contains("magic"));
        let mut bytes = encode_idx_u8(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        bytes.pop();
        assert!(parse_idx(&bytes).unwrap_err().contains("header says"));
    }

    #[test]
    fn reads_bundled_mnist_labels() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist/mnist10k-labels-idx1-ubyte.gz");
        let a = read_idx_file(&p).unwrap();
        assert_eq!(a.dims, vec![10_000]);
    }

    #[test]
    fn not_idx_error_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.txt");
        std::fs::write(&p, "just text, not a dataset").unwrap();
        let e = read_idx_file(&p).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("not an IDX file"), "{e}");
    }
}
