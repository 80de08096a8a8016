//! One optimizer step of a rank: its gradients, computed and summed over the ranks by one of
//! two strategies, then one tail for both (`settle`): the control values gathered from every
//! rank and, only if every value is finite, the optimizer over the reduced gradients.
//!
//! - Buckets (the fast path): the backward pass hands each finished tail of the gradient
//!   buffer to a communication thread, which all-reduces it (and checks this rank's share of
//!   it) while the backward pass goes on with the earlier layers.
//! - Lanes (`[training] lanes`, see `lanes`): the same bits on any number of ranks.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::lanes::{LanePass, Lanes};
use super::{check_share, count_into, first_of, BatchBuf, reduce_controls, Control, Sums, TrainState};
use crate::collective::Collective;
use crate::data::ShardedDataset;
use crate::model::Model;
use crate::optim::Opt;
use crate::WorkerError;

/// Where a step's time went.
#[derive(Default)]
pub(super) struct StepTimes {
    /// Reading this rank's records (lanes read theirs as they go: counted as compute).
    pub data: Duration,
    /// Forward and backward passes.
    pub compute: Duration,
    /// After the backward pass: waiting for the last gradients' and the control values'
    /// collectives.
    pub collective: Duration,
    pub optimizer: Duration,
    /// The checkpoint vote.
    pub vote: Duration,
}

impl StepTimes {
    /// The times of a step whose collectives ran on its own thread after the backward pass:
    /// it started at `started`, read for `data` and ended its backward pass at `done`; the
    /// collective phase is the rest but for the votes and the optimizer.
    fn inline((started, data, done): (Instant, Duration, Instant), vote: Duration, optimizer: Duration) -> StepTimes {
        StepTimes {
            data,
            compute: done.saturating_duration_since(started + data),
            collective: done.elapsed().saturating_sub(vote + optimizer),
            optimizer,
            vote,
        }
    }
}

/// This rank's loss and checkpoint votes into its control values; the votes' time.
fn cast(ctl: &mut Control, loss: f32, vote: &mut dyn FnMut(&mut Control)) -> Duration {
    let started = Instant::now();
    vote(ctl);
    ctl.loss = loss;
    started.elapsed()
}

/// How a step's gradients are computed and summed over the ranks.
pub(super) enum Strategy {
    /// The gradient buffer cut at these offsets (`bucket_cuts`), one all-reduce per bucket.
    Buckets(Vec<usize>),
    Lanes(Lanes),
}

/// What a rank's steps reuse: the model, the dataset, the strategy and the buffers.
pub(super) struct StepLoop<'a> {
    pub net: &'a mut dyn Model,
    pub ds: &'a ShardedDataset,
    pub strategy: Strategy,
    pub grads: Vec<f32>,
    /// This rank's records of each global batch (positions in it) and their weight, its share
    /// of the global batch.
    pub mine: Range<usize>,
    pub share: f32,
    /// This rank's share of the reduced gradients to check (`chunk(np, world, rank)`).
    pub check: Range<usize>,
    buf: BatchBuf,
}

/// What one step is given: the global batch (record indices) of step `step` (counted from
/// 0); `vote`, which fills in the checkpoint votes once the gradients are done; `poison`, the
/// test fault point `nan-gradient` (a NaN written into this rank's own gradient there); and
/// the collective.
pub(super) struct StepInput<'s> {
    pub batch: &'s [u64],
    pub step: u64,
    pub poison: Option<usize>,
    pub vote: &'s mut dyn FnMut(&mut Control),
    pub ring: &'s mut dyn Collective,
}

/// A bucket for the communication thread: a finished tail of the parameters and gradients, or
/// this rank's control values (last).
enum Bucket<'a> {
    Grads(&'a mut [f32], &'a mut [f32]),
    Control(Control),
}

/// A piece of the reduced gradients with the parameters it updates, from `offset` on.
type Part<'p> = (usize, &'p mut [f32], &'p mut [f32]);

/// The tail of every step: this rank's control values (with its loss and checkpoint votes in)
/// gathered from every rank; then, only if every rank found its loss and its share of the
/// reduced gradients finite, the optimizer over `parts` (`sum_sq`: the reduced gradients'
/// squared norm, when the optimizer clips). A step that fails anywhere before the update
/// leaves the state of the step before, which the next generation can continue from.
/// Returns the sums and the optimizer's time.
fn settle(ring: &mut dyn Collective, ctl: &Control, opt: &mut Opt, parts: Vec<Part>, sum_sq: Option<f64>) -> Result<(Sums, Duration), WorkerError> {
    let sums = reduce_controls(ring, ctl)?;
    let started = Instant::now();
    if !sums.diverged() {
        opt.begin_step(sum_sq.map(f64::sqrt));
        for (offset, p, g) in parts {
            opt.apply_part(offset, p, g)?;
        }
    }
    Ok((sums, started.elapsed()))
}

impl<'a> StepLoop<'a> {
    pub fn new(net: &'a mut dyn Model, ds: &'a ShardedDataset, strategy: Strategy, mine: Range<usize>, share: f32, check: Range<usize>) -> StepLoop<'a> {
        let np = net.layout().num_params();
        StepLoop { net, ds, strategy, grads: vec![0.0; np], mine, share, check, buf: BatchBuf::default() }
    }

    /// One optimizer step (see `StepInput`).
    pub fn step(&mut self, state: &mut TrainState, input: StepInput) -> Result<(StepTimes, Sums), WorkerError> {
        let started = Instant::now();
        let StepInput { batch, step, poison, vote, ring } = input;
        let TrainState { params, opt, .. } = state;
        let mut ctl = Control::default();
        let (loss, backward_done, data) = match &mut self.strategy {
            Strategy::Lanes(lanes) => {
                let mut pass = LanePass { net: &mut *self.net, params, ds: self.ds, batch, step };
                let (loss, done) = lanes.gradients(&mut pass, &mut self.grads, &mut ctl, poison, ring)?;
                (loss, done, Duration::ZERO)
            }
            Strategy::Buckets(cuts) => {
                let records = &batch[self.mine.clone()];
                self.buf.read(self.ds, records.iter().copied())?;
                count_into(&mut ctl, records);
                let data = started.elapsed();
                if cuts.len() > 1 {
                    let cuts = cuts.clone();
                    let input = StepInput { batch, step, poison, vote, ring };
                    return self.overlapped((params, opt), &cuts, ctl, input, (started, data));
                }
                // One bucket: it is ready only when the backward pass ends, so a communication
                // thread would overlap nothing (and costs a thread per step).
                let b = self.buf.batch(records, step);
                let loss = self.net.forward_backward(params, &b, self.share, &mut self.grads, cuts, &mut |_, _| {})?;
                if let Some(at) = poison {
                    self.grads[at] = f32::NAN;
                }
                let done = Instant::now();
                if !opt.needs_norm() {
                    return self.split_step((params, opt), (ctl, loss), vote, ring, (started, data, done));
                }
                ring.all_reduce(&mut self.grads)?;
                (loss, done, data)
            }
        };
        ctl.first_bad = check_share(&self.grads, 0, &self.check);
        let vote_time = cast(&mut ctl, loss, vote);
        let sum_sq = opt.needs_norm().then(|| shoal_kernels::sum_squares(&self.grads));
        let (sums, optimizer) = settle(ring, &ctl, opt, vec![(0, &mut params[..], &mut self.grads[..])], sum_sq)?;
        Ok((StepTimes::inline((started, data, backward_done), vote_time, optimizer), sums))
    }

    /// After a step that diverged (and changed nothing): this rank's own gradients of it,
    /// computed again (the same bits come out; the reduced buffer no longer tells whose they
    /// were), and their first NaN or infinity.
    pub fn own_first_bad(&mut self, params: &mut [f32], (batch, step): (&[u64], u64), poison: Option<usize>) -> Result<Option<u64>, WorkerError> {
        match &mut self.strategy {
            Strategy::Lanes(lanes) => lanes.own_first_bad(&mut LanePass { net: &mut *self.net, params, ds: self.ds, batch, step }, poison),
            Strategy::Buckets(_) => {
                let records = &batch[self.mine.clone()];
                self.buf.read(self.ds, records.iter().copied())?;
                let mut g = vec![0.0f32; params.len()];
                let b = self.buf.batch(records, step);
                self.net.forward_backward(params, &b, self.share, &mut g, &[0], &mut |_, _| {})?;
                if let Some(at) = poison {
                    g[at] = f32::NAN;
                }
                Ok(shoal_kernels::first_non_finite(&g).map(|i| i as u64))
            }
        }
    }
}

impl StepLoop<'_> {
    /// The tail of a one-bucket step that does not clip, in the all-reduce's two halves: the
    /// reduce-scatter, this rank's final range checked, the control values gathered, and then
    /// the all-gather with the optimizer applied to each piece as it lands (still in cache,
    /// while the rest is on the wire), where `settle` would wait for the whole buffer and read
    /// it again. The update is element-wise: the same bits either way. A transport without
    /// halves reduces the whole buffer in the first and updates it at once in the second.
    fn split_step(&mut self, (params, opt): (&mut [f32], &mut Opt), (mut ctl, loss): (Control, f32), vote: &mut dyn FnMut(&mut Control), ring: &mut dyn Collective, (started, data, done): (Instant, Duration, Instant)) -> Result<(StepTimes, Sums), WorkerError> {
        let mine = ring.reduce_scatter(&mut self.grads)?;
        // With the whole buffer reduced everywhere, each rank still checks only its share.
        let check = if mine.len() == self.grads.len() { self.check.clone() } else { mine.clone() };
        ctl.first_bad = check_share(&self.grads, 0, &check);
        let vote_time = cast(&mut ctl, loss, vote);
        let sums = reduce_controls(ring, &ctl)?;
        let mut optimizer = Duration::ZERO;
        if sums.diverged() {
            // The step changes nothing, but the reduced gradients are made whole all the same:
            // the divergence report reads them.
            ring.all_gather_from(&mut self.grads, mine, &mut |_, _| Ok(()))?;
        } else {
            opt.begin_step(None);
            ring.all_gather_from(&mut self.grads, mine, &mut |range, g| {
                let at = Instant::now();
                let applied = opt.apply_part_unclipped(range.start, &mut params[range], g);
                optimizer += at.elapsed();
                applied
            })?;
        }
        Ok((StepTimes::inline((started, data, done), vote_time, optimizer), sums))
    }

    /// A bucketed step of several buckets (cut at `cuts`): a communication thread all-reduces
    /// each bucket as soon as the backward pass hands it over (and checks this rank's share of
    /// it, and measures it when the optimizer clips) while the backward pass goes on with the
    /// earlier layers; the control values come last, and `settle` ends the step on that
    /// thread. `(started, data)`: when the step started and its reading time.
    fn overlapped(&mut self, (params, opt): (&mut [f32], &mut Opt), cuts: &[usize], mut ctl: Control, input: StepInput, (started, data): (Instant, Duration)) -> Result<(StepTimes, Sums), WorkerError> {
    let StepInput { batch, step, poison, vote, ring } = input;
    let records = &batch[self.mine.clone()];
    let b = self.buf.batch(records, step);
    let (net, grads, share, check) = (&mut *self.net, &mut self.grads[..], self.share, &self.check);
    let np = grads.len();
    let measure = opt.needs_norm();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<Bucket>();
        let comm = scope.spawn(move || -> Result<Option<(Sums, Duration)>, WorkerError> {
            let mut reduced: Vec<Part> = Vec::new();
            let mut end = np;
            let (mut first_bad, mut sum_sq, mut control) = (None, 0.0f64, None);
            for bucket in rx {
                match bucket {
                    Bucket::Grads(p, g) => {
                        ring.all_reduce(g)?;
                        end -= g.len();
                        // Checked while the backward pass still runs: off the step's path.
                        first_bad = first_of(first_bad, check_share(g, end, check));
                        if measure {
                            // Buckets come in a fixed order: the same sum on every rank.
                            sum_sq += shoal_kernels::sum_squares(g);
                        }
                        reduced.push((end, p, g));
                    }
                    Bucket::Control(c) => control = Some(c),
                }
            }
            let Some(mut c) = control else { return Ok(None) };
            c.first_bad = first_bad;
            settle(ring, &c, opt, reduced, measure.then_some(sum_sq)).map(Some)
        });
        let mut end = np;
        let pass = net.forward_backward(params, &b, share, grads, cuts, &mut |p, g| {
            end -= g.len();
            if let Some(at) = poison.filter(|at| (end..end + g.len()).contains(at)) {
                g[at - end] = f32::NAN;
            }
            // A send fails only when the thread has stopped on an error, which join reports.
            let _ = tx.send(Bucket::Grads(p, g));
        });
        let backward_done = Instant::now();
        if let Ok(loss) = pass {
            vote(&mut ctl);
            ctl.loss = loss;
            let _ = tx.send(Bucket::Control(ctl));
        }
        let vote_time = backward_done.elapsed();
        drop(tx);
        let update = comm.join().unwrap_or_else(|_| Err(WorkerError::Panicked("the communication thread panicked".into())));
        let waited = backward_done.elapsed().saturating_sub(vote_time);
        pass?;
        let (sums, optimizer) = update?.ok_or_else(|| WorkerError::Collective("the step's control values were not gathered".into()))?;
        let times = StepTimes {
            data,
            compute: backward_done.saturating_duration_since(started + data),
            collective: waited.saturating_sub(optimizer),
            optimizer,
            vote: vote_time,
        };
        Ok((times, sums))
    })
    }
}
