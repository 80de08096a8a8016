//! The data-parallel training loop of one rank. Every rank starts from the same state (seeded
//! parameters, or the newest committed checkpoint that passes its hashes), reads its share of
//! each global batch (the order comes from (seed, epoch)), computes its gradients,
//! all-reduces them over the ring, and applies the same fused optimizer update: so all ranks
//! hold bitwise-identical parameters after every step.
//!
//! Global step s is the batch at position s % steps_per_epoch of epoch s / steps_per_epoch's
//! permutation, whatever the world size and wherever the run was resumed: a resumed run is the
//! run that was interrupted. The global batch is split over the ranks as evenly as it goes,
//! and each rank weighs its gradients by its share, so the sum is the global mean. Forward and
//! backward run through the `Model` trait (`model::build`), into the all-reduce buffer
//! directly.
//!
//! After the gradients, every step gathers each rank's control values (`Control`: its loss,
//! record count and digest, rank 0's "a checkpoint is due by the clock" vote, whether its part
//! of the checkpoint in flight is written or failed, and the first non-finite value in its
//! share of the reduced gradients) as bytes, so they stay exact whatever the gradients' wire
//! format. Every rank adds up the same bytes, so all agree, without another round trip, on
//! when a checkpoint starts and completes, and on whether the step is applied at all: a step
//! whose loss or reduced gradients are not finite is never applied; the job ends with an
//! error naming the step, the first bad tensor and the rank that produced it, and the last
//! good step is committed as a checkpoint first.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_core::checkpoint::checkpoint_dir;
use shoal_core::rng::{epoch_permutation, RecordDigest};
use shoal_core::JobSpec;
use shoal_proto::{Assignment, CheckpointFile, CheckpointManifest, JobProgress, Message};

use crate::checkpoint::{self, JobLink, PartSnapshot, StateTensor, WriteDone, Writer};
use crate::history::{Key, Recorder};
use shoal_core::schedule::Schedule;
use crate::collective::{Collective, Incoming, Mailbox, Rendezvous, Wire};
use crate::data::{Missing, ShardedDataset};
use crate::metrics::{EvalSums, Metrics};
use crate::model::{Batch, Layout, Model};
use shoal_core::model::Head;
use crate::optim::Opt;
use crate::WorkerError;

mod checkpointer;
mod lanes;
mod step;

use checkpointer::Checkpointer;
use lanes::Lanes;
use step::{StepInput, StepLoop, Strategy};

pub struct TrainTask {
    pub store: shoal_core::store::Store,
    pub assignment: Assignment,
    pub mailbox: Arc<Mailbox>,
    /// This worker's raw-TCP ring listener (None: the tcp transport is not offered).
    pub incoming: Option<Arc<Incoming>>,
    /// With credentials: the data plane's TLS (the gRPC ring dials with it; `incoming` has it).
    pub tls: Option<Arc<crate::collective::secure::DataPlaneTls>>,
    pub cancel: Arc<AtomicBool>,
    pub collective_timeout: Duration,
    /// Progress and checkpoint commits go to the coordinator through this.
    pub link: Arc<dyn JobLink>,
    /// Rank 0 reports progress at most this often.
    pub report_every: Duration,
    /// The state a task of this worker left behind when its generation ended early: the next
    /// generation of the same job continues from it (or from a peer's) instead of a
    /// checkpoint. Outlives the task; every task takes what is there.
    pub retained: StateSlot,
}

/// Where a worker keeps the state of a task that ended before its job did.
pub type StateSlot = Arc<Mutex<Option<Retained>>>;

/// A job's state, kept in memory across generations.
pub struct Retained {
    job: u64,
    state: TrainState,
}

pub struct TrainOutcome {
    pub progress: JobProgress,
    /// The job's model: its final checkpoint folder, relative to the store.
    pub model_path: String,
    /// blake3 of the final parameters (f32 little-endian), the same on every rank.
    pub param_blake3: String,
}

/// What a rank contributes to a step besides its gradients. Gathered as bytes and added up
/// on every rank (`reduce_controls`), never sent on the gradients' wire: bf16 would round
/// counts and digests to 8 bits of mantissa, and summing losses would hide which rank's was
/// not finite.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Control {
    /// This rank's share of the step's loss.
    loss: f32,
    /// Rank 0: a checkpoint is due by the clock.
    due: bool,
    /// This rank's part of the checkpoint in flight is written, or its write failed.
    done: bool,
    failed: bool,
    /// Records this rank trained in the step, and their digest.
    records: u64,
    digest: RecordDigest,
    /// The first NaN or infinity in this rank's share of the reduced gradients: every rank
    /// holds the same bits, so each checks 1/W of them (`check_share`) and the gather tells
    /// all.
    first_bad: Option<u64>,
}

const CONTROL_BYTES: usize = 25;

impl Control {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CONTROL_BYTES);
        b.extend(self.loss.to_bits().to_le_bytes());
        b.push(self.due as u8 | (self.done as u8) << 1 | (self.failed as u8) << 2);
        b.extend(self.records.to_le_bytes());
        b.extend(self.digest.packed().to_le_bytes());
        b.extend(self.first_bad.unwrap_or(u64::MAX).to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Control> {
        if b.len() != CONTROL_BYTES {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let first_bad = word(17);
        Some(Control {
            loss: f32::from_bits(u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))),
            due: b[4] & 1 != 0,
            done: b[4] & 2 != 0,
            failed: b[4] & 4 != 0,
            records: word(5),
            digest: RecordDigest::from_packed(u32::from_le_bytes(b[13..17].try_into().expect("4 bytes"))),
            first_bad: (first_bad != u64::MAX).then_some(first_bad),
        })
    }
}

/// A step's control values over all ranks: the same on every rank.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sums {
    /// The loss, added in rank order.
    loss: f32,
    due: bool,
    /// Ranks whose part of the checkpoint in flight is written, or failed.
    done: usize,
    failed: usize,
    records: u64,
    digest: RecordDigest,
    /// Ranks whose own loss is not finite.
    bad_loss: Vec<usize>,
    /// The first NaN or infinity in the reduced gradients.
    first_bad: Option<u64>,
}

impl Sums {
    /// Whether the step must not be applied: a loss or a gradient that is not finite.
    fn diverged(&self) -> bool {
        self.first_bad.is_some() || !self.bad_loss.is_empty() || !self.loss.is_finite()
    }
}

/// Adds up every rank's control values, exactly: an all-gather of their bytes, summed in rank
/// order on every rank (so every rank gets the same sums, bit for bit).
fn reduce_controls(ring: &mut dyn Collective, mine: &Control) -> Result<Sums, WorkerError> {
    let all = ring.all_gather_bytes(mine.encode())?;
    let mut sums = Sums::default();
    for (r, bytes) in all.iter().enumerate() {
        let c = Control::decode(bytes).ok_or_else(|| WorkerError::Collective(format!("rank {r} sent control values of {} bytes, not {CONTROL_BYTES}", bytes.len())))?;
        sums.loss += c.loss;
        if !c.loss.is_finite() {
            sums.bad_loss.push(r);
        }
        sums.due |= c.due;
        sums.done += c.done as usize;
        sums.failed += c.failed as usize;
        sums.records += c.records;
        sums.digest.add_sums(c.digest.lo as u64, c.digest.hi as u64);
        sums.first_bad = first_of(sums.first_bad, c.first_bad);
    }
    Ok(sums)
}

/// Every rank's `mine` (the same length on each), exactly: gathered as bytes, so never
/// rounded by the gradients' wire format.
fn gather_u64s(ring: &mut dyn Collective, mine: &[u64]) -> Result<Vec<Vec<u64>>, WorkerError> {
    let all = ring.all_gather_bytes(mine.iter().flat_map(|v| v.to_le_bytes()).collect())?;
    all.iter()
        .enumerate()
        .map(|(r, b)| {
            if b.len() != mine.len() * 8 {
                return Err(WorkerError::Collective(format!("rank {r} sent {} bytes where {} were expected", b.len(), mine.len() * 8)));
            }
            Ok(b.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect())
        })
        .collect()
}

/// The first NaN or infinity among this rank's share `mine` (of the whole buffer's indices)
/// of the reduced gradients, of which `g` holds those from `offset` on.
fn check_share(g: &[f32], offset: usize, mine: &Range<usize>) -> Option<u64> {
    let (lo, hi) = (mine.start.max(offset), mine.end.min(offset + g.len()));
    if lo >= hi {
        return None;
    }
    shoal_kernels::first_non_finite(&g[lo - offset..hi - offset]).map(|i| (lo + i) as u64)
}

/// The earlier of two gradient positions.
fn first_of(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Time spent per phase of a step, summed over a window of steps.
#[derive(Default)]
struct Phases {
    steps: u32,
    data: Duration,
    compute: Duration,
    collective: Duration,
    optimizer: Duration,
    checkpoint: Duration,
}

impl Phases {
    /// Writes the mean milliseconds per step into `p`.
    fn report(&self, p: &mut JobProgress) {
        let per = |d: Duration| d.as_secs_f64() * 1e3 / self.steps.max(1) as f64;
        p.phase_data_ms = per(self.data);
        p.phase_compute_ms = per(self.compute);
        p.phase_collective_ms = per(self.collective);
        p.phase_optimizer_ms = per(self.optimizer);
        p.phase_checkpoint_ms = per(self.checkpoint);
    }
}

/// Adds the time since `*mark` to `total` and moves the mark to now.
fn lap(mark: &mut Instant, total: &mut Duration) {
    let now = Instant::now();
    *total += now - *mark;
    *mark = now;
}

/// Everything that a checkpoint holds and a step changes. Consistent between steps: a step
/// changes it only after all of its collectives succeeded, so a failed step leaves it as the
/// step before left it.
pub struct TrainState {
    params: Vec<f32>,
    opt: Opt,
    /// Optimizer steps done.
    step: u64,
    /// Per epoch: the records that went into applied steps (summed over the ranks), and
    /// their digest.
    epoch_records: Vec<u64>,
    epoch_digests: Vec<RecordDigest>,
    /// The latest test metrics, and the step they were measured after.
    test: Metrics,
    evaluated_at: u64,
}

impl TrainState {
    fn fresh(layout: &Layout, spec: &JobSpec) -> TrainState {
        let params = layout.init(spec.training.seed);
        let opt = Opt::new(spec.training.optimizer.resolve(), params.len());
        TrainState { params, opt, step: 0, epoch_records: Vec::new(), epoch_digests: Vec::new(), test: Metrics::default(), evaluated_at: 0 }
    }

    /// A state to receive a peer's into.
    fn blank(layout: &Layout, spec: &JobSpec) -> TrainState {
        let n = layout.num_params();
        let opt = Opt::new(spec.training.optimizer.resolve(), n);
        TrainState { params: vec![0.0; n], opt, step: 0, epoch_records: Vec::new(), epoch_digests: Vec::new(), test: Metrics::default(), evaluated_at: 0 }
    }

    /// Adds a step's records (summed over the ranks) to the epoch `step` belongs to.
    fn count_records(&mut self, epoch: usize, sums: &Sums) {
        if self.epoch_records.len() <= epoch {
            self.epoch_records.resize(epoch + 1, 0);
            self.epoch_digests.resize(epoch + 1, RecordDigest::default());
        }
        self.epoch_records[epoch] += sums.records;
        self.epoch_digests[epoch].add_sums(sums.digest.lo as u64, sums.digest.hi as u64);
    }

    /// Everything but the big buffers, for a transfer to a peer.
    fn header(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [self.step, self.opt.step, self.evaluated_at, self.epoch_records.len() as u64].into_iter().chain(self.test.to_words()) {
            b.extend(v.to_le_bytes());
        }
        for (r, d) in self.epoch_records.iter().zip(&self.epoch_digests) {
            b.extend(r.to_le_bytes());
            b.extend(d.packed().to_le_bytes());
        }
        b
    }

    fn set_header(&mut self, b: &[u8]) -> Result<(), WorkerError> {
        let bad = || WorkerError::Collective(format!("a peer sent a state header of {} bytes that does not parse", b.len()));
        let word = |i: usize| b.get(i * 8..i * 8 + 8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).ok_or_else(bad);
        let epochs = word(3)? as usize;
        if b.len() != 64 + epochs * 12 {
            return Err(bad());
        }
        self.step = word(0)?;
        self.opt.step = word(1)?;
        self.evaluated_at = word(2)?;
        self.test = Metrics::from_words([word(4)?, word(5)?, word(6)?, word(7)?]);
        self.epoch_records.clear();
        self.epoch_digests.clear();
        for e in b[64..].chunks_exact(12) {
            self.epoch_records.push(u64::from_le_bytes(e[..8].try_into().expect("8 bytes")));
            self.epoch_digests.push(RecordDigest::from_packed(u32::from_le_bytes(e[8..].try_into().expect("4 bytes"))));
        }
        Ok(())
    }

    /// blake3 of everything: two ranks with the same fingerprint hold the same state.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&self.header());
        h.update(bytemuck::cast_slice(&self.params));
        for b in &self.opt.buffers {
            h.update(bytemuck::cast_slice(b));
        }
        *h.finalize().as_bytes()
    }
}

/// A batch's records as the model reads them, in buffers reused from batch to batch.
#[derive(Default)]
pub(crate) struct BatchBuf {
    /// Features, f32, record after record.
    pub xs: Vec<f32>,
    /// Labels (0 for a regression's records).
    pub ys: Vec<u32>,
    /// A regression's targets, record after record (empty for class labels).
    pub ts: Vec<f32>,
}

impl BatchBuf {
    /// Reads records `indices`.
    pub fn read(&mut self, ds: &ShardedDataset, indices: impl Iterator<Item = u64>) -> Result<(), WorkerError> {
        self.xs.clear();
        self.ys.clear();
        self.ts.clear();
        for i in indices {
            ds.push_record(i, &mut self.xs, &mut self.ys)?;
            ds.push_targets(i, &mut self.ts)?;
        }
        Ok(())
    }

    /// The records read, as a training batch of global `records` at `step`.
    pub fn batch<'a>(&'a self, records: &'a [u64], step: u64) -> Batch<'a> {
        Batch { x: &self.xs, labels: &self.ys, targets: &self.ts, records, step }
    }
}

/// Runs the job on this rank until its last step and final checkpoint. Blocking: call it from
/// a blocking thread; `rt` runs the collectives. A task that ends early (a peer gone, its
/// generation over) leaves its state in `task.retained` for the job's next generation.
pub fn train(task: TrainTask, rt: &tokio::runtime::Handle) -> Result<TrainOutcome, WorkerError> {
    let job = task.assignment.job_id;
    // Every line this thread logs for the job carries it (`--log-format json`: job_id, rank).
    let _job = tracing::info_span!("job", job_id = job, rank = task.assignment.rank, generation = task.assignment.generation).entered();
    let held = task.retained.lock().unwrap_or_else(|e| e.into_inner()).take();
    // Only a change of workers carries state over; a resume by request starts from the
    // checkpoint it names.
    let mut slot = held.filter(|r| r.job == job && task.assignment.carry_state).map(|r| r.state);
    let outcome = run(&task, rt, &mut slot);
    // The job's series on this process go with its task (a next generation makes new ones).
    shoal_core::telemetry::metrics().end_job(&job.to_string());
    if outcome.is_err() {
        if let Some(state) = slot {
            tracing::info!(job, step = state.step, "keeping the job's state for its next generation");
            *task.retained.lock().unwrap_or_else(|e| e.into_inner()) = Some(Retained { job, state });
        }
    }
    outcome
}

/// Where a generation's state came from.
enum Origin {
    /// Carried over in memory from the previous generation (this rank's or a peer's).
    Continued(u64),
    Resumed(Box<CheckpointManifest>),
    Fresh,
}

fn run(task: &TrainTask, rt: &tokio::runtime::Handle, slot: &mut Option<TrainState>) -> Result<TrainOutcome, WorkerError> {
    let a = &task.assignment;
    let mut spec = JobSpec::parse(&a.spec_toml).map_err(|e| WorkerError::Spec(e.to_string()))?;
    let info = a.dataset.as_ref().ok_or_else(|| WorkerError::Data("the assignment carries no dataset".into()))?;
    // The pinned version: a default `train` is every record of it outside `test`.
    spec.pin_records(info.records);
    let mut ds = ShardedDataset::open(&task.store, info)?;
    let missing = missing_policy(&spec, info)?;
    ds.set_missing(missing.clone())?;
    let mut net = crate::model::build(&spec.model, &ds.feature_shape, head_of(&spec, &ds)?, spec.training.seed)?;
    let net = &mut *net;
    let model = net.layout().clone();
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    if a.peers.len() != world || rank >= world {
        return Err(WorkerError::Spec(format!("assignment for rank {rank} of {world} lists {} peers", a.peers.len())));
    }
    spec.check_world_size(world as u32).map_err(|e| WorkerError::Spec(e.to_string()))?;
    let np = model.num_params();
    if slot.as_ref().is_some_and(|s| s.params.len() != np || s.opt.cfg != spec.training.optimizer.resolve()) {
        *slot = None;
    }
    let mut ring = Rendezvous {
        rank,
        job: a.job_id,
        generation: a.generation,
        transport: &spec.aggregation.transport,
        wire: if spec.aggregation.wire == "bf16" { Wire::Bf16 } else { Wire::F32 },
        peers: &a.peers,
        ring_peers: &a.ring_peers,
        hosts: &a.hosts,
        timeout: task.collective_timeout,
        cancel: task.cancel.clone(),
        incoming: task.incoming.as_deref(),
        mailbox: task.mailbox.clone(),
        ring_key: crate::collective::secure::ring_key_from(&a.ring_key)?,
        tls: task.tls.clone(),
        rt: rt.clone(),
    }
    .join()?;
    let ring = &mut *ring;
    tracing::info!(job = a.job_id, generation = a.generation, rank, world, transport = ring.name(), "joined the collective");

    let origin = start_state(task, &spec, &model, ring, slot)?;
    let state = slot.as_mut().expect("start_state leaves a state");
    let start = state.step;

    let total = spec.total_steps_from(a.new_from);
    let steps_per_epoch = spec.steps_per_epoch_from(a.new_from);
    let global_batch = spec.training.batch_size as usize;
    let (lo, hi) = (rank * global_batch / world, (rank + 1) * global_batch / world);
    let share = (hi - lo) as f32 / global_batch as f32;
    // The training records in a fixed order; each epoch permutes positions in this list.
    let train_indices = spec.train_indices(a.new_from);
    let train_len = train_indices.len();
    let mut progress = JobProgress {
        step: start,
        total_steps: total,
        epoch: (start / steps_per_epoch) as u32,
        transport: ring.name().to_string(),
        transports: ring.parts().map(|(intra, inter)| [("intra".to_string(), intra.to_string()), ("inter".to_string(), inter.to_string())].into()).unwrap_or_default(),
        holdout_accuracy: -1.0,
        holder_accuracy: -1.0,
        ..Default::default()
    };
    match &origin {
        Origin::Continued(step) => {
            tracing::info!(job = a.job_id, step, "continuing in memory from the previous generation");
            progress.continued_from = Some(*step);
        }
        Origin::Resumed(m) => {
            tracing::info!(job = a.job_id, step = m.step, "resumed from checkpoint");
            progress.resumed_from = Some(m.step);
        }
        Origin::Fresh => {}
    }
    let head = net.head();
    if let (Some(test), true) = (spec.dataset.test, start > 0 && start.is_multiple_of(steps_per_epoch) && state.evaluated_at != start) {
        // The previous generation ended between an epoch's last step and its evaluation.
        state.test = evaluate(net, &state.params, &ds, test, rank, world, ring)?;
        state.evaluated_at = start;
    }
    fill_metrics(&mut progress, &state.test, head);
    if rank == 0 {
        // Says at once where this generation starts (its membership record shows it).
        fill_counters(&mut progress, state);
        task.link.progress(&progress);
    }
    // Prometheus (`/metrics`): this rank's series of the job.
    let series = shoal_core::telemetry::metrics().job(&a.job_id.to_string(), a.rank);
    let mut ckpt = Checkpointer::new(task, &spec, &model, &state.opt, (rank, world), series.checkpoint_seconds.clone())?;
    // The schedule is a function of the optimizer's step count, which the state carries.
    state.opt.set_training(Schedule::of(&spec.training, total), spec.training.clip_norm);
    let strategy = match spec.training.lanes {
        Some(k) => Strategy::Lanes(Lanes::new(k as usize, rank, world, np)),
        None => Strategy::Buckets(bucket_cuts(&net.layer_starts(), np, (spec.aggregation.bucket_mb * (1 << 20) as f64 / 4.0) as usize)),
    };
    // Every rank holds the same reduced gradients: each checks its own chunk of them.
    let mut steps = StepLoop::new(net, &ds, strategy, lo..hi, share, crate::collective::chunk(np, world, rank));
    let mut order: Option<(u64, Vec<u32>)> = None;
    let started = Instant::now();
    // Evaluation is not training: samples/s counts the steps' time alone.
    let mut eval_time = Duration::ZERO;
    let mut last_report = Instant::now();
    // Tests slow steps down to interrupt a job mid-epoch.
    let step_delay = shoal_core::failpoint::value("step-delay-ms").map(Duration::from_millis);
    let mut phases = Phases::default();
    let mut finished_an_epoch = false;
    let grad_bytes = if world > 1 { np as u64 * 4 } else { 0 };
    // The job's metric history: this rank's points, in chunks in the store.
    let mut history = Recorder::start(task.store.clone(), task.link.clone(), a.job_id, a.generation, a.rank);

    for step in start..total {
        if task.cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
        let epoch = step / steps_per_epoch;
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order = Some((epoch, epoch_permutation(train_len, spec.training.seed, epoch)));
        }
        let perm = &order.as_ref().expect("set above").1;
        let first = (step % steps_per_epoch) as usize * global_batch;
        let batch: Vec<u64> = perm[first..first + global_batch].iter().map(|&i| train_indices[i as usize]).collect();
        let poison = injected_nan(step + 1, rank, &model);
        let vote = &mut |c: &mut Control| ckpt.vote(c);
        let (pass, sums) = steps.step(state, StepInput { batch: &batch, step, poison, vote, ring })?;
        if sums.diverged() {
            // The step changed nothing: the state is the last good step's.
            let own = steps.own_first_bad(&mut state.params, (&batch, step), poison)?;
            let mut d = Divergence::found(step + 1, &sums, &steps.grads, own, &model, ring)?;
            let committed: Vec<u64> = a.checkpoints.iter().map(|m| m.step).collect();
            d.checkpoint = ckpt.keep_last_good(state, &committed, ring)?;
            tracing::error!(job = a.job_id, step = d.step, rank, "{d}");
            return Err(WorkerError::Diverged(Box::new(d)));
        }
        series.samples.inc_by((hi - lo) as u64);
        series.steps.inc();
        series.step_seconds.observe((pass.data + pass.compute + pass.collective + pass.optimizer + pass.vote).as_secs_f64());
        series.collective_bytes.inc_by(grad_bytes);
        phases.data += pass.data;
        phases.compute += pass.compute;
        phases.collective += pass.collective;
        phases.optimizer += pass.optimizer;
        let mut mark = Instant::now();
        phases.checkpoint += pass.vote;
        state.step = step + 1;
        state.count_records(epoch as usize, &sums);
        progress.step = state.step;
        progress.loss = sums.loss as f64;
        progress.lr = state.opt.last_lr() as f64;
        progress.grad_norm = state.opt.grad_norm;
        ckpt.after_step(&sums, state, ring)?;
        lap(&mut mark, &mut phases.checkpoint);
        phases.steps += 1;
        progress.checkpoints_skipped = ckpt.skipped;
        let elapsed = (started.elapsed() - eval_time).as_secs_f64().max(1e-9);
        progress.samples_per_s = ((state.step - start) * global_batch as u64) as f64 / elapsed;
        progress.train_seconds = elapsed;
        // The job's figures on every rank (they are the same): the history keeps a step's
        // point whichever rank's last chunk a lost worker took with it.
        history.record(state.step, Key::Loss, progress.loss);
        history.record(state.step, Key::Lr, progress.lr);
        history.record(state.step, Key::SamplesPerS, progress.samples_per_s);
        if let Some(n) = progress.grad_norm {
            history.record(state.step, Key::GradNorm, n);
        }
        for (key, d) in [(Key::DataMs, pass.data), (Key::ComputeMs, pass.compute), (Key::CollectiveMs, pass.collective), (Key::OptimizerMs, pass.optimizer)] {
            history.record(state.step, key, d.as_secs_f64() * 1e3);
        }
        history.tick();
        if !finished_an_epoch {
            // Until an epoch ends, the running window is all there is.
            phases.report(&mut progress);
        }
        if state.step.is_multiple_of(steps_per_epoch) {
            progress.epoch = (state.step / steps_per_epoch) as u32;
            phases.report(&mut progress);
            phases = Phases::default();
            finished_an_epoch = true;
            if let Some(test) = spec.dataset.test {
                let t = Instant::now();
                state.test = evaluate(steps.net, &state.params, &ds, test, rank, world, ring)?;
                state.evaluated_at = state.step;
                fill_metrics(&mut progress, &state.test, head);
                eval_time += t.elapsed();
                if progress.test_accuracy >= 0.0 {
                    history.record(state.step, Key::TestAccuracy, progress.test_accuracy);
                }
                for (key, v) in [(Key::TestLoss, progress.test_loss), (Key::TestRmse, progress.test_rmse), (Key::TestR2, progress.test_r2), (Key::TestBpb, progress.test_bpb)] {
                    if let Some(v) = v {
                        history.record(state.step, key, v);
                    }
                }
                tracing::info!(epoch = progress.epoch, accuracy = progress.test_accuracy, test_loss = progress.test_loss, loss = progress.loss, "epoch done");
            }
        }
        if rank == 0 && (state.step.is_multiple_of(steps_per_epoch) || last_report.elapsed() >= task.report_every) {
            fill_counters(&mut progress, state);
            task.link.progress(&progress);
            last_report = Instant::now();
        }
    }

    let net = steps.net;
    history.finish();
    let model_path = ckpt.finish(state, ring)?;
    fill_counters(&mut progress, state);
    if let (0, Some(holdout)) = (rank, &a.holdout) {
        // `[promote]`: the final model and the alias's holder on the same holdout records.
        let mut hd = ShardedDataset::open(&task.store, holdout)?;
        // Scored as the model was trained: the training set's fill values.
        hd.set_missing(missing)?;
        // The gate's metric (`[promote] metric`), and the accuracy for a classifier.
        let metric = spec.promote.as_ref().map_or("test_accuracy", |p| p.metric.as_str());
        let mine = score(net, &state.params, &hd)?;
        progress.holdout_accuracy = mine.accuracy.unwrap_or(-1.0);
        progress.holdout_score = mine.named(metric);
        if let Some(h) = &a.holder {
            let mut theirs = vec![0.0; np];
            checkpoint::warm_start(&task.store, h, &model, &mut theirs)
                .map_err(|e| WorkerError::Checkpoint(format!("the alias holder (version {}): {e}", a.holder_version)))?;
            let held = score(net, &theirs, &hd)?;
            progress.holder_accuracy = held.accuracy.unwrap_or(-1.0);
            progress.holder_score = held.named(metric);
            progress.holder_version = a.holder_version;
        }
        tracing::info!(metric, candidate = progress.holdout_score, holder = progress.holder_score, "scored on the holdout");
    }
    let param_blake3 = blake3::hash(&crate::collective::f32_le_bytes(&state.params)).to_hex().to_string();
    Ok(TrainOutcome { progress, model_path, param_blake3 })
}

/// What reading a record does with a missing value: without `[dataset] fill_missing` a NaN
/// is an error naming the record and feature (the coordinator refuses such datasets at
/// submission; this is the second line of defence), with it the NaN is filled.
fn missing_policy(spec: &JobSpec, info: &shoal_proto::DatasetInfo) -> Result<Missing, WorkerError> {
    Ok(match spec.dataset.fill_missing {
        None => Missing::Refuse,
        Some(fill) => Missing::Fill(shoal_core::stats::fill_values(info, fill).map_err(|e| WorkerError::Data(format!("dataset.fill_missing: {e}")))?),
    })
}

/// Test fault point `nan-gradient@STEP=RANK`: rank RANK writes a NaN into its own gradient of
/// step STEP (counted from 1) before the all-reduce, at the classifier's bias.
fn injected_nan(step: u64, rank: usize, model: &Layout) -> Option<usize> {
    (shoal_core::failpoint::value_at("nan-gradient", step) == Some(rank as u64)).then(|| model.params.last().map_or(0, |p| p.offset))
}

/// A step whose loss or gradients were not finite, as the job's error tells it.
#[derive(Debug)]
pub struct Divergence {
    /// The step that went bad, counted from 1 (the step after the last good one).
    pub step: u64,
    /// The first tensor whose reduced gradient holds a NaN or an infinity, by its name (the
    /// Sequential's, as `checkpoint export` writes it). None: only the loss was not finite.
    pub tensor: Option<String>,
    /// That gradient value, or the summed loss.
    pub value: f32,
    /// The ranks whose own gradient (or, when none was, own loss) was not finite, lowest
    /// first. Empty: every rank's own values were finite, and only their sum overflowed.
    pub ranks: Vec<usize>,
    /// The committed checkpoint that holds the last good step (None: no step was done), or
    /// why it could not be committed.
    pub checkpoint: Result<Option<u64>, String>,
}

impl Divergence {
    /// What every rank concludes from the same sums, reduced gradients and gathered `own`
    /// first bad values (each rank's own gradient, computed again).
    fn found(step: u64, sums: &Sums, grads: &[f32], own: Option<u64>, model: &Layout, ring: &mut dyn Collective) -> Result<Divergence, WorkerError> {
        let owns = gather_u64s(ring, &[own.unwrap_or(u64::MAX)])?;
        let mut ranks: Vec<usize> = owns.iter().enumerate().filter(|(_, o)| o[0] != u64::MAX).map(|(r, _)| r).collect();
        if ranks.is_empty() {
            ranks = sums.bad_loss.clone();
        }
        let named = sums.first_bad.and_then(|i| Some((model.param_at(i as usize)?.name.clone(), grads[i as usize])));
        let (tensor, value) = match named {
            Some((t, v)) => (Some(t), v),
            None => (None, sums.loss),
        };
        Ok(Divergence { step, tensor, value, ranks, checkpoint: Ok(None) })
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "diverged at step {}: ", self.step)?;
        match &self.tensor {
            Some(name) => write!(f, "the gradient of tensor {name} is {}", self.value)?,
            None => write!(f, "the loss is {}", self.value)?,
        }
        match self.ranks.as_slice() {
            [] => write!(f, " after the sum over the ranks, though every rank's own values were finite (the sum overflowed)")?,
            [r] => write!(f, ", first produced by rank {r}")?,
            [r, ..] => write!(f, ", first produced by rank {r} (ranks {:?} all produced one)", self.ranks)?,
        }
        match &self.checkpoint {
            Ok(Some(s)) => write!(f, "; the parameters of step {s}, the last good one, are committed as checkpoint step {s}"),
            Ok(None) => write!(f, "; no step was done, so there is no checkpoint to keep"),
            Err(e) => write!(f, "; the last good step was not kept: {e}"),
        }
    }
}

fn fill_counters(p: &mut JobProgress, state: &TrainState) {
    p.epoch_records = state.epoch_records.clone();
    p.epoch_digests = state.epoch_digests.iter().map(|d| d.packed()).collect();
}

/// Adds the count and digest of `records` (this rank's part of a step) to its control values.
fn count_into(ctl: &mut Control, records: &[u64]) {
    let d = RecordDigest::of(records.iter().copied());
    ctl.records += records.len() as u64;
    ctl.digest.add_sums(d.lo as u64, d.hi as u64);
}

/// Settles the generation's starting state. Ranks that kept the job's state from the previous
/// generation say which step they hold; the newest wins (every survivor completed the step
/// before it, and some completed this one: nothing done is dropped), and the lowest rank
/// holding it sends it to every rank that holds something else or nothing (a joining
/// worker) over the data plane. Without a state held in memory (or only one older than the
/// newest checkpoint), every rank loads the newest checkpoint that passes its hashes.
fn start_state(task: &TrainTask, spec: &JobSpec, model: &Layout, ring: &mut dyn Collective, slot: &mut Option<TrainState>) -> Result<Origin, WorkerError> {
    let rank = ring.rank();
    let claim = slot.as_ref().map(|s| [&s.step.to_le_bytes()[..], &s.fingerprint()[..]].concat()).unwrap_or_default();
    let claims = ring.all_gather_bytes(claim)?;
    let mut held = Vec::new();
    for (r, c) in claims.iter().enumerate() {
        match c.len() {
            0 => {}
            40 => held.push((u64::from_le_bytes(c[..8].try_into().expect("8 bytes")), r, &c[8..])),
            n => return Err(WorkerError::Collective(format!("rank {r} sent a state claim of {n} bytes"))),
        }
    }
    let newest_checkpoint = task.assignment.checkpoints.iter().map(|m| m.step).max();
    // The newest step, then the lowest rank.
    let best = held.iter().max_by_key(|(step, r, _)| (*step, std::cmp::Reverse(*r))).copied();
    if let Some((step, source, fingerprint)) = best.filter(|(step, _, _)| newest_checkpoint.is_none_or(|c| *step >= c)) {
        let everyone_has_it = held.len() == claims.len() && held.iter().all(|(s, _, f)| *s == step && *f == fingerprint);
        if !everyone_has_it {
            transfer_state(ring, slot, source, model, spec)?;
        }
        return Ok(Origin::Continued(step));
    }
    *slot = None;
    let (state, resumed) = resume_point(task, spec, model, rank)?;
    // Every rank must continue from the same step (they read the same files, but a file can
    // change between two reads).
    let start = state.step;
    *slot = Some(state);
    let starts = ring.all_gather_bytes(start.to_le_bytes().to_vec())?;
    if let Some(r) = starts.iter().position(|b| b[..] != start.to_le_bytes()) {
        return Err(WorkerError::Checkpoint(format!("rank {rank} resumes from step {start}, rank {r} from another step")));
    }
    Ok(resumed.map(|m| Origin::Resumed(Box::new(m))).unwrap_or(Origin::Fresh))
}

/// Rank `source`'s state on every rank, bit for bit.
fn transfer_state(ring: &mut dyn Collective, slot: &mut Option<TrainState>, source: usize, model: &Layout, spec: &JobSpec) -> Result<(), WorkerError> {
    if ring.rank() == source {
        let s = slot.as_mut().expect("the source holds the state");
        let mut header = s.header();
        ring.broadcast(&mut header, source)?;
        ring.broadcast_floats(&mut s.params, source)?;
        for b in &mut s.opt.buffers {
            ring.broadcast_floats(b, source)?;
        }
        return Ok(());
    }
    // What this rank held is replaced piece by piece: a transfer that fails midway leaves
    // nothing worth keeping.
    *slot = None;
    let mut s = TrainState::blank(model, spec);
    let mut header = Vec::new();
    ring.broadcast(&mut header, source)?;
    s.set_header(&header)?;
    ring.broadcast_floats(&mut s.params, source)?;
    for b in &mut s.opt.buffers {
        ring.broadcast_floats(b, source)?;
    }
    tracing::info!(step = s.step, source, "received the job's state from a peer");
    *slot = Some(s);
    Ok(())
}

/// Where a step's gradient buffer is cut into buckets: walking the layers from the last, a
/// bucket closes at the first layer start that makes it at least `bucket_floats` long; the
/// first layer's start (0) closes the last. Fixed by the model and the spec, so every rank
/// reduces the same buckets in the same order, run after run.
fn bucket_cuts(layer_starts: &[usize], np: usize, bucket_floats: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut end = np;
    for &s in layer_starts {
        if s != 0 && bucket_floats > 0 && end - s >= bucket_floats {
            cuts.push(s);
            end = s;
        }
    }
    cuts.push(0);
    cuts
}

/// The state to start from: the newest committed checkpoint that loads, else a fresh one.
/// Rank 0 reports each checkpoint that fails its hashes, so it stops being a resume point. A
/// checkpoint that does not fit the model is an error: resuming past it would silently drop
/// training the user asked to keep.
fn resume_point(task: &TrainTask, spec: &JobSpec, model: &Layout, rank: usize) -> Result<(TrainState, Option<CheckpointManifest>), WorkerError> {
    for m in &task.assignment.checkpoints {
        let mut s = TrainState::fresh(model, spec);
        match checkpoint::restore(&task.store, m, model, &mut s.params, &mut s.opt) {
            Ok(()) => {
                s.step = m.step;
                s.test = Metrics { accuracy: (m.test_accuracy >= 0.0).then_some(m.test_accuracy), loss: m.test_loss, rmse: m.test_rmse, r2: m.test_r2, bpb: None };
                // The checkpoint was taken before that step's evaluation, if it had one.
                s.evaluated_at = m.step;
                s.epoch_records = m.epoch_records.clone();
                s.epoch_digests = m.epoch_digests.iter().map(|&d| RecordDigest::from_packed(d)).collect();
                return Ok((s, Some(m.clone())));
            }
            Err(e) if e.is_damage() => {
                tracing::error!(step = m.step, error = %e, "checkpoint is damaged; trying the one before");
                if rank == 0 {
                    task.link.checkpoint_failed(m.step, format!("not loaded: {e}"), true);
                }
            }
            Err(e) => return Err(WorkerError::Checkpoint(e.to_string())),
        }
    }
    let mut state = TrainState::fresh(model, spec);
    if let Some(init) = &task.assignment.init {
        // A warm start: the parameters of another job's checkpoint, a fresh optimizer.
        checkpoint::warm_start(&task.store, init, model, &mut state.params)
            .map_err(|e| WorkerError::Checkpoint(format!("[init] checkpoint step {} of job {}: {e}", init.step, init.job_id)))?;
        tracing::info!(job = init.job_id, step = init.step, "warm start");
    }
    Ok((state, None))
}

/// The model's head for the job's loss and dataset.
fn head_of(spec: &JobSpec, ds: &ShardedDataset) -> Result<Head, WorkerError> {
    Head::of(spec.loss(), ds.classes as u64, ds.target_width as u64, ds.context as u64).map_err(WorkerError::Spec)
}

/// Sets the progress's test metrics (accuracy -1: none).
fn fill_metrics(progress: &mut JobProgress, m: &Metrics, head: Head) {
    let m = &m.with_head(head);
    progress.test_bpb = m.bpb;
    progress.test_accuracy = m.accuracy.unwrap_or(-1.0);
    progress.test_loss = m.loss;
    progress.test_rmse = m.rmse;
    progress.test_r2 = m.r2;
}

/// The sums of records [lo, hi) of `ds`, in passes of 512.
fn eval_sums(net: &mut dyn Model, params: &[f32], ds: &ShardedDataset, lo: u64, hi: u64) -> Result<EvalSums, WorkerError> {
    let mut buf = BatchBuf::default();
    let mut sums = EvalSums::new(net.head());
    let mut i = lo;
    while i < hi {
        let j = (i + 512).min(hi);
        buf.read(ds, i..j)?;
        net.evaluate(params, &buf.xs, &buf.ys, &buf.ts, &mut sums)?;
        i = j;
    }
    Ok(sums)
}

/// The metrics of every record of `ds`, on this rank alone.
fn score(net: &mut dyn Model, params: &[f32], ds: &ShardedDataset) -> Result<Metrics, WorkerError> {
    let head = net.head();
    Ok(eval_sums(net, params, ds, 0, ds.records)?.metrics(head))
}

/// The metrics of the test range; each rank scores its share, then the sums are added (in
/// fixed point: the same bits however the range is split).
fn evaluate(
    net: &mut dyn Model,
    params: &[f32],
    ds: &ShardedDataset,
    [start, end]: [u64; 2],
    rank: usize,
    world: usize,
    ring: &mut dyn Collective,
) -> Result<Metrics, WorkerError> {
    let len = end - start;
    let lo = start + len * rank as u64 / world as u64;
    let hi = start + len * (rank as u64 + 1) / world as u64;
    let head = net.head();
    let mine = eval_sums(net, params, ds, lo, hi)?;
    // Sums gathered exactly: never rounded by the gradients' wire format.
    let mut all = EvalSums::new(head);
    for words in gather_u64s(ring, &mine.to_words())? {
        all.merge(&EvalSums::from_words(&words)?);
    }
    Ok(all.metrics(head))
}

#[cfg(test)]
mod tests;
