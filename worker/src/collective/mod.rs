//! Collectives between the ranks of one job generation, behind one trait, over three
//! transports:
//!
//! - `shm`: ranks on one host share a memory segment (chosen when every rank reports the
//!   same host);
//! - `tcp`: a ring of raw TCP connections, one per neighbour, pipelined in pieces;
//! - `grpc`: the ring over the `DataPlane` gRPC service (the first transport; kept as a
//!   fallback and for comparison).
//!
//! All three sum in the same order, so a job's bits do not depend on the transport: the buffer
//! is cut into `world` chunks (`chunk`), and chunk c is summed starting from rank c's values,
//! then rank c+1's, ..., rank c-1's (`reference_sum`). Every rank ends with the very same
//! bytes. Every wait is bounded by the job's collective timeout, a dead peer is an error at
//! once where the transport can tell (a reset or closed connection, a gone process), and
//! every operation belongs to one (job, generation).

pub mod grpc;
pub mod shm;
pub mod tcp;

use std::ops::Range;

pub use grpc::{f32_le_bytes, DataPlaneService, Mailbox, Ring, CONNECTION_WINDOW, MAX_CHUNK_MESSAGE, MAX_FRAME, STREAM_WINDOW};

use crate::WorkerError;

/// What a rank does with its peers. Calls are collective: every rank of the generation makes
/// the same calls, in the same order, with buffers of the same length.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The transport's name (`shm`, `tcp`, `grpc`).
    fn name(&self) -> &'static str;
    /// In-place sum over all ranks, in the documented order; the same bits on every rank.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), WorkerError>;
    /// Every rank's `mine`, indexed by rank, on every rank (small payloads).
    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), WorkerError> {
        self.all_gather_bytes(Vec::new()).map(|_| ())
    }
    /// Rank `root`'s `buf` on every rank.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), WorkerError> {
        let mut all = self.all_gather_bytes(if self.rank() == root { buf.clone() } else { Vec::new() })?;
        *buf = std::mem::take(&mut all[root]);
        Ok(())
    }
}

/// Chunk `c` of a buffer of `len` elements cut into `world` chunks.
pub fn chunk(len: usize, world: usize, c: usize) -> Range<usize> {
    (c * len / world)..((c + 1) * len / world)
}

/// The documented sum of `inputs` (one buffer per rank): for chunk c, rank c's values, plus
/// rank c+1's, ..., plus rank c-1's, left to right. What every transport computes.
pub fn reference_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let world = inputs.len();
    let len = inputs.first().map(Vec::len).unwrap_or(0);
    let mut out = vec![0.0f32; len];
    for c in 0..world {
        for i in chunk(len, world, c) {
            let mut acc = inputs[c][i];
            for k in 1..world {
                acc += inputs[(c + k) % world][i];
            }
            out[i] = acc;
        }
    }
    out
}

/// What travels on the wire between ranks (`[aggregation] wire`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    F32,
    /// Cast to bfloat16 when sending, added in f32; each chunk's owner keeps the rounded
    /// value it sent, so every rank still ends with the same bits.
    Bf16,
}

/// f32 to bfloat16, rounding to nearest even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
pub(crate) mod testing {
    /// Buffers of `len` pseudo-random values, one per rank, with a mix of magnitudes so the
    /// order of summation shows in the bits.
    pub fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = shoal_core::rng::SplitMix64::new(seed);
        (0..world).map(|_| (0..len).map(|_| (rng.next_f32() - 0.5) * 10f32.powi((rng.below(7) as i32) - 3)).collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_order_shows_in_the_bits() {
        // One element per chunk; element c is summed starting from rank c.
        let x = vec![vec![1e8f32, 1.0, -1e8], vec![1.0, 1e8, 1.0], vec![-1e8, -1e8, 1e8]];
        // Element 0: (1e8 + 1) - 1e8 = 0 in f32. Element 1, from rank 1: (1e8 - 1e8) + 1 = 1.
        // Element 2, from rank 2: (1e8 - 1e8) + 1 = 1 (rank 0 first would give 0).
        assert_eq!(reference_sum(&x), vec![0.0, 1.0, 1.0]);
        assert_eq!(chunk(2, 3, 0), 0..0, "a chunk may be empty");
        assert_eq!(chunk(10, 3, 2), 6..10);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0, "a tie goes to even");
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        let x = 1.234_567_f32;
        assert!((from_bf16(to_bf16(x)) - x).abs() < x / 128.0);
    }
}
