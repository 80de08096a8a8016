//! `[training] lanes`: the global batch cut into `k` fixed lanes, this rank computing the
//! gradients of its run of lanes, combined by one fixed binary tree over lane ids (a node
//! over lanes [lo, hi) is node [lo, mid) + node [mid, hi), mid = (lo + hi) / 2). A rank sums
//! the largest subtrees that lie within its lanes; the ranks then exchange those nodes
//! exactly and every rank finishes the tree alike. Each lane is always computed alone, at
//! the same batch size, so its gradients are the same bits on any rank: the sum is the
//! same bits for any number of workers. Every layer kind takes part: a lane's pass is the
//! model's ordinary pass over that lane's records (or, for dense models, one pass whose
//! kernels keep the lanes' rows apart, `Model::lanes_pass`).

use std::ops::Range;
use std::time::Instant;

use super::{count_into, first_of, BatchBuf, Control};
use crate::collective::Collective;
use crate::data::ShardedDataset;
use crate::model::{LaneSpan, Model};
use crate::WorkerError;

pub(super) struct Lanes {
    k: usize,
    /// This rank's lanes.
    mine: Range<usize>,
    /// Every rank's subtree nodes, rank after rank; this rank's are `my_nodes`.
    nodes: Vec<Range<usize>>,
    my_nodes: Range<usize>,
    /// The exchange buffer (one slot per node) and spare node buffers.
    exchange: Vec<f32>,
    spare: Vec<Vec<f32>>,
    buf: BatchBuf,
}

/// What computing lanes reads: the model and its parameters, the dataset, the global batch
/// (record indices) and its step.
pub(super) struct LanePass<'p> {
    pub net: &'p mut dyn Model,
    pub params: &'p mut [f32],
    pub ds: &'p ShardedDataset,
    pub batch: &'p [u64],
    pub step: u64,
}

/// Lanes of rank `r` of `world`: rank r holds [ceil(r k / world), ceil((r + 1) k / world)),
/// so 8 lanes over 3 ranks split 3, 3, 2.
pub(super) fn lanes_of(k: usize, r: usize, world: usize) -> Range<usize> {
    (r * k).div_ceil(world)..((r + 1) * k).div_ceil(world)
}

/// The largest subtrees of the lane tree over `lo..hi` that lie within `within`, left to right.
pub(super) fn subtrees(lo: usize, hi: usize, within: &Range<usize>, out: &mut Vec<Range<usize>>) {
    if hi <= within.start || lo >= within.end {
        return;
    }
    if within.start <= lo && hi <= within.end {
        out.push(lo..hi);
        return;
    }
    let mid = (lo + hi) / 2;
    subtrees(lo, mid, within, out);
    subtrees(mid, hi, within, out);
}

fn add_into(acc: &mut [f32], other: &[f32]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a += *b;
    }
}

impl Lanes {
    pub(super) fn new(k: usize, rank: usize, world: usize, np: usize) -> Lanes {
        let mut nodes = Vec::new();
        let mut my_nodes = 0..0;
        for r in 0..world {
            let first = nodes.len();
            subtrees(0, k, &lanes_of(k, r, world), &mut nodes);
            if r == rank {
                my_nodes = first..nodes.len();
            }
        }
        // Two ranks holding one half each: the root is their sum, which a plain all-reduce
        // computes exactly (a + b == b + a). Otherwise every node travels.
        let exchange = if world > 1 && !(world == 2 && nodes.len() == 2) { vec![0.0; nodes.len() * np] } else { Vec::new() };
        Lanes { k, mine: lanes_of(k, rank, world), nodes, my_nodes, exchange, spare: Vec::new(), buf: BatchBuf::default() }
    }

    /// Computes the tree node over lanes [lo, hi) into `out`; returns the lanes' loss.
    fn node(&mut self, lo: usize, hi: usize, pass: &mut LanePass, out: &mut [f32], ctl: &mut Control) -> Result<f32, WorkerError> {
        if hi - lo == 1 {
            let per = pass.batch.len() / self.k;
            let records = &pass.batch[lo * per..(lo + 1) * per];
            self.buf.read(pass.ds, records.iter().copied())?;
            count_into(ctl, records);
            let b = self.buf.batch(records, pass.step);
            return pass.net.forward_backward(pass.params, &b, per as f32 / pass.batch.len() as f32, out, &[0], &mut |_, _| {});
        }
        let mid = (lo + hi) / 2;
        let left = self.node(lo, mid, pass, out, ctl)?;
        let mut right_buf = self.spare.pop().unwrap_or_else(|| vec![0.0; out.len()]);
        let right = self.node(mid, hi, pass, &mut right_buf, ctl);
        add_into(out, &right_buf);
        self.spare.push(right_buf);
        Ok(left + right?)
    }

    /// Finishes the tree over [lo, hi) from the exchanged nodes into `out`.
    fn combine(&mut self, lo: usize, hi: usize, out: &mut [f32]) {
        let np = out.len();
        if let Some(i) = self.nodes.iter().position(|n| *n == (lo..hi)) {
            out.copy_from_slice(&self.exchange[i * np..(i + 1) * np]);
            return;
        }
        let mid = (lo + hi) / 2;
        self.combine(lo, mid, out);
        let mut right = self.spare.pop().unwrap_or_else(|| vec![0.0; np]);
        self.combine(mid, hi, &mut right);
        add_into(out, &right);
        self.spare.push(right);
    }

    /// The global batch's gradient (the tree's root) into `grads`, the same bits on every
    /// rank: this rank's nodes, then the exchange. Returns this rank's lanes' loss and when
    /// the exchange began. `poison`: the test fault point `nan-gradient`.
    pub(super) fn gradients(&mut self, pass: &mut LanePass, grads: &mut [f32], ctl: &mut Control, poison: Option<usize>, ring: &mut dyn Collective) -> Result<(f32, Instant), WorkerError> {
        let np = grads.len();
        let my_nodes = self.nodes[self.my_nodes.clone()].to_vec();
        // One rank (the whole tree) or two halves (one node each): the node goes straight into
        // `grads` and a plain all-reduce sums it. Otherwise every node has a place in the
        // exchange, filled with -0.0, the identity of IEEE addition (x + -0.0 == x, even for
        // x = +0.0): the all-reduce sums each node with zeros only, so every node arrives exact.
        let mut exchange = std::mem::take(&mut self.exchange);
        exchange.fill(-0.0);
        let computed = {
            let mut outs: Vec<&mut [f32]> = if exchange.is_empty() {
                vec![&mut *grads]
            } else {
                exchange[self.my_nodes.start * np..self.my_nodes.end * np].chunks_mut(np).collect()
            };
            let loss = self.my_node_gradients(pass, &my_nodes, &mut outs, ctl);
            if let (Some(at), Some(out)) = (poison, outs.first_mut()) {
                out[at] = f32::NAN;
            }
            loss
        };
        let exchange_started = Instant::now();
        let reduced = computed.and_then(|loss| if exchange.is_empty() { ring.all_reduce(grads) } else { ring.all_reduce(&mut exchange) }.map(|()| loss));
        self.exchange = exchange;
        let loss = reduced?;
        if !self.exchange.is_empty() {
            self.combine(0, self.k, grads);
        }
        Ok((loss, exchange_started))
    }

    /// This rank's tree nodes `nodes` into `outs`; returns its lanes' loss.
    fn my_node_gradients(&mut self, pass: &mut LanePass, nodes: &[Range<usize>], outs: &mut [&mut [f32]], ctl: &mut Control) -> Result<f32, WorkerError> {
        let per = pass.batch.len() / self.k;
        let records = &pass.batch[self.mine.start * per..self.mine.end * per];
        self.buf.read(pass.ds, records.iter().copied())?;
        let b = self.buf.batch(records, pass.step);
        let scale = per as f32 / pass.batch.len() as f32;
        // One pass over all of this rank's lanes, where the model's kernels keep lanes apart.
        let span = LaneSpan { per, first: self.mine.start, scale };
        if let Some(loss) = pass.net.lanes_pass(pass.params, &b, span, nodes, outs) {
            count_into(ctl, records);
            return loss;
        }
        // gemm's order depends on the shapes: each lane in a call of its own.
        let mut loss = 0.0;
        for (n, out) in nodes.iter().zip(outs.iter_mut()) {
            loss += self.node(n.start, n.end, pass, out, ctl)?;
        }
        Ok(loss)
    }

    /// After a step that diverged: this rank's own part of it computed again (the step
    /// changed nothing, so the same bits come out), and the first NaN or infinity in its
    /// tree nodes, which are laid out like the parameters.
    pub(super) fn own_first_bad(&mut self, pass: &mut LanePass, poison: Option<usize>) -> Result<Option<u64>, WorkerError> {
        let np = pass.params.len();
        let my_nodes = self.nodes[self.my_nodes.clone()].to_vec();
        let mut bufs = vec![vec![0.0f32; np]; my_nodes.len()];
        let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        self.my_node_gradients(pass, &my_nodes, &mut outs, &mut Control::default())?;
        if let (Some(at), Some(out)) = (poison, outs.first_mut()) {
            out[at] = f32::NAN;
        }
        Ok(bufs.iter().map(|b| shoal_kernels::first_non_finite(b).map(|i| i as u64)).fold(None, first_of))
    }
}
