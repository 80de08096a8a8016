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
//! backward run on shoal's kernels (`net`), into the all-reduce buffer directly.
//!
//! Checkpoints ride on the step's all-reduce: three control slots after the gradients carry
//! rank 0's "a checkpoint is due by the clock" vote and how many ranks have finished (or
//! failed) writing their part of the checkpoint in flight. Every rank sees the same sums after
//! the same step, so all agree, without another round trip, on when a checkpoint starts and
//! when it is complete.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_core::checkpoint::checkpoint_dir;
use shoal_core::rng::epoch_permutation;
use shoal_core::JobSpec;
use shoal_proto::{Assignment, CheckpointFile, CheckpointManifest, JobProgress, Message};

use crate::checkpoint::{self, JobLink, PartSnapshot, StateTensor, WriteDone, Writer};
use crate::collective::{Collective, Incoming, Mailbox, Rendezvous, Wire};
use crate::data::ShardedDataset;
use crate::model::Model;
use crate::net::Net;
use crate::optim::Opt;
use crate::WorkerError;

pub struct TrainTask {
    pub store: PathBuf,
    pub assignment: Assignment,
    pub mailbox: Arc<Mailbox>,
    /// This worker's raw-TCP ring listener (None: the tcp transport is not offered).
    pub incoming: Option<Arc<Incoming>>,
    pub cancel: Arc<AtomicBool>,
    pub collective_timeout: Duration,
    /// Progress and checkpoint commits go to the coordinator through this.
    pub link: Arc<dyn JobLink>,
    /// Rank 0 reports progress at most this often.
    pub report_every: Duration,
}

pub struct TrainOutcome {
    pub progress: JobProgress,
    /// The job's model: its final checkpoint folder, relative to the store.
    pub model_path: String,
    /// blake3 of the final parameters (f32 little-endian), the same on every rank.
    pub param_blake3: String,
}

/// Slots after the gradients in the all-reduce buffer.
const SLOT_LOSS: usize = 0;
const SLOT_DUE: usize = 1;
const SLOT_DONE: usize = 2;
const SLOT_FAILED: usize = 3;
const SLOTS: usize = 4;

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

/// Everything that a checkpoint holds and a step changes.
struct TrainState {
    params: Vec<f32>,
    opt: Opt,
    /// Optimizer steps done.
    step: u64,
}

impl TrainState {
    fn fresh(model: &Model, spec: &JobSpec) -> TrainState {
        let params = model.init(spec.training.seed);
        let opt = Opt::new(spec.training.optimizer.resolve(), params.len());
        TrainState { params, opt, step: 0 }
    }
}

/// Reads records `indices` into `x` (features, f32, record after record) and `y` (labels),
/// reusing their memory.
fn read_batch(ds: &ShardedDataset, indices: impl Iterator<Item = u64>, x: &mut Vec<f32>, y: &mut Vec<u32>) -> Result<(), WorkerError> {
    x.clear();
    y.clear();
    for i in indices {
        ds.push_record(i, x, y)?;
    }
    Ok(())
}

/// Runs the job on this rank until its last step and final checkpoint. Blocking: call it from
/// a blocking thread; `rt` runs the collectives.
pub fn train(task: TrainTask, rt: &tokio::runtime::Handle) -> Result<TrainOutcome, WorkerError> {
    let a = &task.assignment;
    let spec = JobSpec::parse(&a.spec_toml).map_err(|e| WorkerError::Spec(e.to_string()))?;
    let info = a.dataset.as_ref().ok_or_else(|| WorkerError::Data("the assignment carries no dataset".into()))?;
    let ds = ShardedDataset::open(&task.store, info)?;
    let model = Model::new(&spec.model, &ds.feature_shape, ds.classes)?;
    let mut net = Net::new(&model);
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    if a.peers.len() != world || rank >= world {
        return Err(WorkerError::Spec(format!("assignment for rank {rank} of {world} lists {} peers", a.peers.len())));
    }
    spec.check_world_size(world as u32).map_err(|e| WorkerError::Spec(e.to_string()))?;
    let np = model.num_params();
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
        rt: rt.clone(),
    }
    .join()?;
    let ring = &mut *ring;
    tracing::info!(job = a.job_id, generation = a.generation, rank, world, transport = ring.name(), "joined the collective");

    let (mut state, resumed) = resume_point(&task, &spec, &model, rank)?;
    // Every rank must continue from the same step (they read the same files, but a file can
    // change between two reads).
    let start = state.step;
    let starts = ring.all_gather_bytes(start.to_le_bytes().to_vec())?;
    if let Some(r) = starts.iter().position(|b| b[..] != start.to_le_bytes()) {
        return Err(WorkerError::Checkpoint(format!("rank {rank} resumes from step {start}, rank {r} from another step")));
    }

    let total = spec.total_steps();
    let steps_per_epoch = spec.steps_per_epoch();
    let global_batch = spec.training.batch_size as usize;
    let (lo, hi) = (rank * global_batch / world, (rank + 1) * global_batch / world);
    let share = (hi - lo) as f32 / global_batch as f32;
    let [train_start, train_end] = spec.dataset.train;
    let train_len = (train_end - train_start) as usize;
    let mut progress = JobProgress {
        step: start,
        total_steps: total,
        epoch: (start / steps_per_epoch) as u32,
        test_accuracy: resumed.as_ref().map(|m| m.test_accuracy).unwrap_or(-1.0),
        resumed_from: resumed.as_ref().map(|m| m.step),
        transport: ring.name().to_string(),
        ..Default::default()
    };
    if let Some(m) = &resumed {
        tracing::info!(job = a.job_id, step = m.step, "resumed from checkpoint");
    }
    let mut ckpt = Checkpointer::new(&task, &spec, &model, &state.opt, rank, world)?;
    let mut buf = vec![0.0f32; np + SLOTS];
    let cuts = bucket_cuts(&net.layer_starts(), np, (spec.aggregation.bucket_mb * (1 << 20) as f64 / 4.0) as usize);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut order: Option<(u64, Vec<u32>)> = None;
    let started = Instant::now();
    // Evaluation is not training: samples/s counts the steps' time alone.
    let mut eval_time = Duration::ZERO;
    let mut last_report = Instant::now();
    // Tests slow steps down to interrupt a job mid-epoch.
    let step_delay = shoal_core::failpoint::value("step-delay-ms").map(Duration::from_millis);
    let mut phases = Phases::default();
    let mut finished_an_epoch = false;

    for step in start..total {
        if task.cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::Cancelled);
        }
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
        let mut mark = Instant::now();
        let epoch = step / steps_per_epoch;
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order = Some((epoch, epoch_permutation(train_len, spec.training.seed, epoch)));
        }
        let perm = &order.as_ref().expect("set above").1;
        let first = (step % steps_per_epoch) as usize * global_batch;
        let idx = perm[first + lo..first + hi].iter().map(|&i| train_start + i as u64);
        read_batch(&ds, idx, &mut xs, &mut ys)?;
        lap(&mut mark, &mut phases.data);
        let (grads, slots) = buf.split_at_mut(np);
        let pass = step_in_buckets(&mut net, &mut state, &xs, &ys, share, grads, slots, &cuts, &mut ckpt, ring)?;
        phases.compute += pass.backward_done - mark;
        phases.collective += pass.collective;
        phases.optimizer += pass.optimizer;
        mark = Instant::now();
        phases.checkpoint += pass.vote;
        state.step = step + 1;
        progress.step = state.step;
        progress.loss = buf[np + SLOT_LOSS] as f64;
        if !progress.loss.is_finite() {
            return Err(WorkerError::Diverged(progress.step));
        }
        ckpt.after_step(&buf[np..], &state, progress.test_accuracy, ring)?;
        lap(&mut mark, &mut phases.checkpoint);
        phases.steps += 1;
        progress.checkpoints_skipped = ckpt.skipped;
        let elapsed = (started.elapsed() - eval_time).as_secs_f64().max(1e-9);
        progress.samples_per_s = ((state.step - start) * global_batch as u64) as f64 / elapsed;
        progress.train_seconds = elapsed;
        if !finished_an_epoch {
            // Until an epoch ends, the running window is all there is.
            phases.report(&mut progress);
        }
        if state.step % steps_per_epoch == 0 {
            progress.epoch = (state.step / steps_per_epoch) as u32;
            phases.report(&mut progress);
            phases = Phases::default();
            finished_an_epoch = true;
            if let Some(test) = spec.dataset.test {
                let t = Instant::now();
                progress.test_accuracy = evaluate(&mut net, &state.params, &ds, test, rank, world, ring)?;
                eval_time += t.elapsed();
                tracing::info!(epoch = progress.epoch, accuracy = progress.test_accuracy, loss = progress.loss, "epoch done");
            }
        }
        if rank == 0 && (state.step % steps_per_epoch == 0 || last_report.elapsed() >= task.report_every) {
            task.link.progress(&progress);
            last_report = Instant::now();
        }
    }

    let model_path = ckpt.finish(&state, progress.test_accuracy, ring)?;
    let param_blake3 = blake3::hash(&crate::collective::f32_le_bytes(&state.params)).to_hex().to_string();
    Ok(TrainOutcome { progress, model_path, param_blake3 })
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

/// Where a bucketed step's time went.
struct StepTimes {
    /// When the backward pass ended (the step's start is the caller's).
    backward_done: Instant,
    /// After the backward pass: waiting for the last buckets' all-reduce, and their updates.
    collective: Duration,
    optimizer: Duration,
    /// The checkpoint vote.
    vote: Duration,
}

/// A bucket for the communication thread: a finished tail of the parameters and gradients, or
/// the control slots (last).
enum Bucket<'a> {
    Grads(&'a mut [f32], &'a mut [f32]),
    Slots(&'a mut [f32]),
}

/// One optimizer step, bucketed: a communication thread all-reduces each bucket of gradients
/// as soon as the backward pass hands it over and applies the optimizer to its parameters,
/// while the backward pass goes on with the earlier layers; then the control slots (the loss
/// and the checkpoint votes, filled in once the backward pass is done) are reduced last.
#[allow(clippy::too_many_arguments)]
fn step_in_buckets(
    net: &mut Net,
    state: &mut TrainState,
    xs: &[f32],
    ys: &[u32],
    share: f32,
    grads: &mut [f32],
    slots: &mut [f32],
    cuts: &[usize],
    ckpt: &mut Checkpointer,
    ring: &mut dyn Collective,
) -> Result<StepTimes, WorkerError> {
    let np = grads.len();
    let TrainState { params, opt, .. } = state;
    opt.begin_step();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<Bucket>();
        let comm = scope.spawn(move || -> Result<Vec<(Instant, Instant)>, WorkerError> {
            // The optimizer's busy intervals, to tell the caller which part of its wait was
            // the optimizer.
            let mut updates = Vec::new();
            let mut end = np;
            for bucket in rx {
                match bucket {
                    Bucket::Grads(p, g) => {
                        ring.all_reduce(g)?;
                        let t = Instant::now();
                        end -= g.len();
                        opt.apply_part(end, p, g)?;
                        updates.push((t, Instant::now()));
                    }
                    Bucket::Slots(s) => ring.all_reduce(s)?,
                }
            }
            Ok(updates)
        });
        let pass = net.loss_and_grads_in_buckets(params, xs, ys, share, grads, cuts, &mut |p, g| {
            // A send fails only when the thread has stopped on an error, which join reports.
            let _ = tx.send(Bucket::Grads(p, g));
        });
        let backward_done = Instant::now();
        let vote_started = Instant::now();
        if let Ok(loss) = pass {
            ckpt.vote(slots);
            slots[SLOT_LOSS] = loss;
            let _ = tx.send(Bucket::Slots(slots));
        }
        let vote = vote_started.elapsed();
        drop(tx);
        let updates = comm.join().unwrap_or_else(|_| Err(WorkerError::Panicked("the communication thread panicked".into())));
        let waited = backward_done.elapsed().saturating_sub(vote);
        pass?;
        let optimizer: Duration = updates?.iter().map(|&(a, b)| b.saturating_duration_since(a.max(backward_done))).sum();
        Ok(StepTimes { backward_done, collective: waited.saturating_sub(optimizer), optimizer, vote })
    })
}

/// The state to start from: the newest committed checkpoint that loads, else a fresh one.
/// Rank 0 reports each checkpoint that fails its hashes, so it stops being a resume point. A
/// checkpoint that does not fit the model is an error: resuming past it would silently drop
/// training the user asked to keep.
fn resume_point(task: &TrainTask, spec: &JobSpec, model: &Model, rank: usize) -> Result<(TrainState, Option<CheckpointManifest>), WorkerError> {
    for m in &task.assignment.checkpoints {
        let mut s = TrainState::fresh(model, spec);
        match checkpoint::restore(&task.store, m, model, &mut s.params, &mut s.opt) {
            Ok(()) => {
                s.step = m.step;
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
    Ok((TrainState::fresh(model, spec), None))
}

/// A checkpoint being written: this rank's part, and what the manifest needs from the moment
/// it was taken.
struct InFlight {
    step: u64,
    optimizer_step: u64,
    test_accuracy: f64,
    /// This rank's part, once its write ended.
    mine: Option<Result<CheckpointFile, String>>,
}

/// The checkpoint side of the step loop: when to take one, the snapshot, the background
/// writer, agreement on completion, and the manifest.
struct Checkpointer {
    writer: Writer,
    link: Arc<dyn JobLink>,
    store: PathBuf,
    every_steps: Option<u64>,
    every: Option<Duration>,
    last_start: Instant,
    in_flight: Option<InFlight>,
    /// The snapshot buffer, back from the writer for reuse.
    spare: Vec<f32>,
    /// Checkpoints that came due while one was in flight.
    skipped: u64,
    tensors: Vec<StateTensor>,
    mine: Vec<usize>,
    rank: usize,
    world: usize,
    total: u64,
    steps_per_epoch: u64,
    /// Every manifest field that does not change from one checkpoint to the next.
    base: CheckpointManifest,
}

impl Checkpointer {
    fn new(task: &TrainTask, spec: &JobSpec, model: &Model, opt: &Opt, rank: usize, world: usize) -> Result<Checkpointer, WorkerError> {
        let a = &task.assignment;
        let tensors = checkpoint::state_tensors(model, opt);
        let mine = checkpoint::assign_parts(&tensors, world).swap_remove(rank);
        Ok(Checkpointer {
            writer: Writer::spawn(task.store.clone(), task.link.clone())?,
            link: task.link.clone(),
            store: task.store.clone(),
            every_steps: spec.checkpoint.every_steps,
            every: spec.checkpoint.every_seconds.map(Duration::from_secs_f64),
            last_start: Instant::now(),
            in_flight: None,
            spare: Vec::new(),
            skipped: 0,
            tensors,
            mine,
            rank,
            world,
            total: spec.total_steps(),
            steps_per_epoch: spec.steps_per_epoch(),
            base: CheckpointManifest {
                job_id: a.job_id,
                seed: spec.training.seed,
                world_size: world as u32,
                model_kind: model.kind_name().into(),
                optimizer_kind: opt.kind().into(),
                num_params: model.num_params() as u64,
                spec_toml: a.spec_toml.clone(),
                generation: a.generation,
                ..Default::default()
            },
        })
    }

    /// Takes in what the writer finished: this rank's part of the checkpoint in flight, and
    /// (rank 0) the outcome of commits.
    fn absorb(&mut self, done: WriteDone) {
        match done {
            WriteDone::Part { step, result, buffer } => {
                self.spare = buffer;
                match &mut self.in_flight {
                    Some(f) if f.step == step => f.mine = Some(result),
                    // The part of an abandoned checkpoint: nobody waits for it.
                    _ => {}
                }
            }
            WriteDone::Finalized { step, result: Err(e) } => {
                tracing::warn!(step, error = %e, "checkpoint was not committed");
                self.link.checkpoint_failed(step, format!("not committed: {e}"), false);
            }
            WriteDone::Finalized { step, result: Ok(kept) } => tracing::info!(step, ?kept, "checkpoint committed"),
        }
    }

    /// Fills this rank's control slots for the coming all-reduce.
    fn vote(&mut self, slots: &mut [f32]) {
        while let Some(d) = self.writer.try_done() {
            self.absorb(d);
        }
        let due_by_clock = self.rank == 0 && self.every.is_some_and(|d| self.last_start.elapsed() >= d);
        let mine = self.in_flight.as_ref().and_then(|f| f.mine.as_ref());
        slots[SLOT_DUE] = due_by_clock as u8 as f32;
        slots[SLOT_DONE] = matches!(mine, Some(Ok(_))) as u8 as f32;
        slots[SLOT_FAILED] = matches!(mine, Some(Err(_))) as u8 as f32;
    }

    /// After a step's update, with the summed control slots: settles the checkpoint in flight
    /// and starts the next one if it is due.
    fn after_step(&mut self, sums: &[f32], state: &TrainState, test_accuracy: f64, ring: &mut dyn Collective) -> Result<(), WorkerError> {
        self.settle(sums, ring)?;
        let due = self.every_steps.is_some_and(|n| state.step.is_multiple_of(n)) || sums[SLOT_DUE] > 0.0;
        // The last step's checkpoint is the final one, which `finish` writes.
        if due && state.step < self.total {
            self.last_start = Instant::now();
            if self.in_flight.is_some() {
                self.skipped += 1;
                tracing::info!(step = state.step, "checkpoint due while the previous one is being written; skipped");
            } else {
                self.start(state, test_accuracy);
            }
        }
        Ok(())
    }

    /// What every rank concludes from the same sums: any failure abandons the checkpoint in
    /// flight; all parts written completes it.
    fn settle(&mut self, sums: &[f32], ring: &mut dyn Collective) -> Result<(), WorkerError> {
        let Some(f) = &self.in_flight else { return Ok(()) };
        if sums[SLOT_FAILED] > 0.0 {
            let f = self.in_flight.take().expect("checked above");
            // Each rank whose own write failed says why; the job keeps its previous
            // checkpoint and keeps training.
            if let Some(Err(e)) = f.mine {
                tracing::error!(step = f.step, error = %e, "checkpoint write failed");
                self.link.checkpoint_failed(f.step, format!("write failed: {e}"), false);
            }
        } else if sums[SLOT_DONE] as usize == self.world && f.mine.is_some() {
            self.complete(ring)?;
        }
        Ok(())
    }

    fn start(&mut self, state: &TrainState, test_accuracy: f64) {
        let dir = self.store.join(checkpoint_dir(self.base.job_id, state.step));
        let snapshot = PartSnapshot::take(
            state.step,
            self.rank as u32,
            self.base.generation,
            dir,
            &self.tensors,
            &self.mine,
            &state.params,
            &state.opt,
            std::mem::take(&mut self.spare),
        );
        self.writer.write_part(snapshot);
        self.in_flight = Some(InFlight { step: state.step, optimizer_step: state.opt.step, test_accuracy, mine: None });
    }

    /// Every part is written: gather the parts' records; rank 0 writes the manifest and
    /// commits it in the background.
    fn complete(&mut self, ring: &mut dyn Collective) -> Result<(), WorkerError> {
        let f = self.in_flight.take().expect("a checkpoint in flight");
        let Some(Ok(file)) = f.mine else { unreachable!("complete only after this rank's part was written") };
        let records = ring.all_gather_bytes(file.encode_to_vec())?;
        if self.rank == 0 {
            let files = records
                .iter()
                .map(|b| CheckpointFile::decode(&b[..]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| WorkerError::Collective(format!("a peer sent a bad checkpoint record: {e}")))?;
            let manifest = CheckpointManifest {
                step: f.step,
                epoch: (f.step / self.steps_per_epoch) as u32,
                position: f.step % self.steps_per_epoch,
                optimizer_step: f.optimizer_step,
                test_accuracy: f.test_accuracy,
                dir: checkpoint_dir(self.base.job_id, f.step),
                files,
                ..self.base.clone()
            };
            self.writer.finalize(manifest);
        }
        Ok(())
    }

    /// Blocks until this rank's part of the checkpoint in flight is written (or failed).
    fn wait_mine(&mut self) -> Result<(), WorkerError> {
        while self.in_flight.as_ref().is_some_and(|f| f.mine.is_none()) {
            let done = self.writer.wait_done().ok_or_else(|| WorkerError::Checkpoint("the checkpoint writer stopped".into()))?;
            self.absorb(done);
        }
        Ok(())
    }

    /// One all-reduce of the control slots alone, when there is no step to carry them.
    fn sync(&mut self, ring: &mut dyn Collective) -> Result<[f32; SLOTS], WorkerError> {
        self.wait_mine()?;
        let mut slots = [0.0f32; SLOTS];
        self.vote(&mut slots);
        slots[SLOT_DUE] = 0.0;
        ring.all_reduce(&mut slots)?;
        Ok(slots)
    }

    /// After the last step: lets the checkpoint in flight land, then writes and commits the
    /// final one (the job's model) and waits for its commit. Returns its folder.
    fn finish(&mut self, state: &TrainState, test_accuracy: f64, ring: &mut dyn Collective) -> Result<String, WorkerError> {
        if self.in_flight.is_some() {
            let sums = self.sync(ring)?;
            self.settle(&sums, ring)?;
        }
        self.start(state, test_accuracy);
        let sums = self.sync(ring)?;
        if sums[SLOT_FAILED] > 0.0 {
            let why = match self.in_flight.take().and_then(|f| f.mine) {
                Some(Err(e)) => e,
                _ => "a write failed on another rank".into(),
            };
            return Err(WorkerError::Checkpoint(format!("the final checkpoint (step {}) could not be written: {why}", state.step)));
        }
        self.complete(ring)?;
        if self.rank == 0 {
            // Rank 0 reports success only once the model is committed.
            loop {
                match self.writer.wait_done() {
                    Some(WriteDone::Finalized { step, result }) if step == state.step => {
                        result.map_err(|e| WorkerError::Checkpoint(format!("the final checkpoint (step {step}) was not committed: {e}")))?;
                        break;
                    }
                    Some(other) => self.absorb(other),
                    None => return Err(WorkerError::Checkpoint("the checkpoint writer stopped".into())),
                }
            }
        }
        Ok(checkpoint_dir(self.base.job_id, state.step))
    }
}

/// Accuracy on the test range; each rank scores its share, then the counts are summed.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    net: &mut Net,
    params: &[f32],
    ds: &ShardedDataset,
    [start, end]: [u64; 2],
    rank: usize,
    world: usize,
    ring: &mut dyn Collective,
) -> Result<f64, WorkerError> {
    let len = end - start;
    let lo = start + len * rank as u64 / world as u64;
    let hi = start + len * (rank as u64 + 1) / world as u64;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut correct = 0u64;
    let mut i = lo;
    while i < hi {
        let j = (i + 512).min(hi);
        read_batch(ds, i..j, &mut x, &mut y)?;
        correct += net.correct(params, &x, &y)?;
        i = j;
    }
    // Counts stay exact in f32 below 2^24 records per rank.
    let mut counts = [correct as f32, (hi - lo) as f32];
    ring.all_reduce(&mut counts)?;
    Ok(counts[0] as f64 / counts[1].max(1.0) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_close_at_layer_starts_once_big_enough() {
        // Layers start at 0, 100, 130, 135; 140 parameters.
        let starts = [135, 130, 100, 0];
        assert_eq!(bucket_cuts(&starts, 140, 0), vec![0], "0: one bucket");
        assert_eq!(bucket_cuts(&starts, 140, 1), vec![135, 130, 100, 0]);
        assert_eq!(bucket_cuts(&starts, 140, 10), vec![130, 100, 0]);
        assert_eq!(bucket_cuts(&starts, 140, 41), vec![0], "the rest is too small to close a bucket before 0");
        assert_eq!(bucket_cuts(&starts, 140, 40), vec![100, 0]);
        assert_eq!(bucket_cuts(&starts, 140, 1000), vec![0]);
    }
}
