//! The checkpoint side of a rank's step loop: when one is due (steps or the clock, rank 0's
//! vote), the snapshot handed to the background writer, agreement on every part's completion
//! through the step's control values, and rank 0's manifest commit, whose outcome every rank
//! learns by broadcast.

use super::*;

/// A checkpoint being written: this rank's part, and what the manifest needs from the moment
/// it was taken.
pub(super) struct InFlight {
    step: u64,
    optimizer_step: u64,
    test: Metrics,
    epoch_records: Vec<u64>,
    epoch_digests: Vec<u32>,
    /// This rank's part, once its write ended.
    mine: Option<Result<CheckpointFile, String>>,
}

/// The checkpoint side of the step loop: when to take one, the snapshot, the background
/// writer, agreement on completion, and the manifest.
pub(super) struct Checkpointer {
    writer: Writer,
    link: Arc<dyn JobLink>,
    every_steps: Option<u64>,
    every: Option<Duration>,
    last_start: Instant,
    in_flight: Option<InFlight>,
    /// The snapshot buffer, back from the writer for reuse.
    spare: Vec<f32>,
    /// Checkpoints that came due while one was in flight.
    pub(super) skipped: u64,
    /// The step of the last checkpoint whose parts were all written (the same on every rank).
    completed: Option<u64>,
    /// Rank 0: the outcome of the last manifest commit, by step.
    finalized: Option<(u64, Result<(), String>)>,
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
    /// `write_seconds`: the job's histogram of part-write times (`/metrics`).
    pub(super) fn new(task: &TrainTask, spec: &JobSpec, model: &Layout, opt: &Opt, (rank, world): (usize, usize), write_seconds: shoal_core::telemetry::Histogram) -> Result<Checkpointer, WorkerError> {
        let a = &task.assignment;
        let tensors = checkpoint::state_tensors(model, opt);
        let mine = checkpoint::assign_parts(&tensors, world).swap_remove(rank);
        Ok(Checkpointer {
            writer: Writer::spawn(task.store.clone(), task.link.clone(), write_seconds)?,
            link: task.link.clone(),
            every_steps: spec.checkpoint.every_steps,
            every: spec.checkpoint.every_seconds.map(Duration::from_secs_f64),
            last_start: Instant::now(),
            in_flight: None,
            spare: Vec::new(),
            skipped: 0,
            completed: None,
            finalized: None,
            tensors,
            mine,
            rank,
            world,
            total: spec.total_steps_from(a.new_from),
            steps_per_epoch: spec.steps_per_epoch_from(a.new_from),
            base: CheckpointManifest {
                job_id: a.job_id,
                seed: spec.training.seed,
                world_size: world as u32,
                model_kind: model.kind.clone(),
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
    pub(super) fn absorb(&mut self, done: WriteDone) {
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
                self.finalized = Some((step, Err(e)));
            }
            WriteDone::Finalized { step, result: Ok(kept) } => {
                tracing::info!(step, ?kept, "checkpoint committed");
                self.finalized = Some((step, Ok(())));
            }
        }
    }

    /// Fills this rank's checkpoint votes for the step's control values.
    pub(super) fn vote(&mut self, ctl: &mut Control) {
        while let Some(d) = self.writer.try_done() {
            self.absorb(d);
        }
        let due_by_clock = self.rank == 0 && self.every.is_some_and(|d| self.last_start.elapsed() >= d);
        let mine = self.in_flight.as_ref().and_then(|f| f.mine.as_ref());
        ctl.due = due_by_clock;
        ctl.done = matches!(mine, Some(Ok(_)));
        ctl.failed = matches!(mine, Some(Err(_)));
    }

    /// After a step's update, with the summed control values: settles the checkpoint in
    /// flight and starts the next one if it is due.
    pub(super) fn after_step(&mut self, sums: &Sums, state: &TrainState, ring: &mut dyn Collective) -> Result<(), WorkerError> {
        self.settle(sums, ring)?;
        let due = self.every_steps.is_some_and(|n| state.step.is_multiple_of(n)) || sums.due;
        // The last step's checkpoint is the final one, which `finish` writes.
        if due && state.step < self.total {
            self.last_start = Instant::now();
            if self.in_flight.is_some() {
                self.skipped += 1;
                tracing::info!(step = state.step, "checkpoint due while the previous one is being written; skipped");
            } else {
                self.start(state);
            }
        }
        Ok(())
    }

    /// What every rank concludes from the same sums: any failure abandons the checkpoint in
    /// flight; all parts written completes it.
    pub(super) fn settle(&mut self, sums: &Sums, ring: &mut dyn Collective) -> Result<(), WorkerError> {
        let Some(f) = &self.in_flight else { return Ok(()) };
        if sums.failed > 0 {
            let f = self.in_flight.take().expect("checked above");
            // Each rank whose own write failed says why; the job keeps its previous
            // checkpoint and keeps training.
            if let Some(Err(e)) = f.mine {
                tracing::error!(step = f.step, error = %e, "checkpoint write failed");
                self.link.checkpoint_failed(f.step, format!("write failed: {e}"), false);
            }
        } else if sums.done == self.world && f.mine.is_some() {
            self.complete(ring)?;
        }
        Ok(())
    }

    pub(super) fn start(&mut self, state: &TrainState) {
        let dir = checkpoint_dir(self.base.job_id, state.step);
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
        self.in_flight = Some(InFlight {
            step: state.step,
            optimizer_step: state.opt.step,
            test: state.test,
            epoch_records: state.epoch_records.clone(),
            epoch_digests: state.epoch_digests.iter().map(|d| d.packed()).collect(),
            mine: None,
        });
    }

    /// Every part is written: gather the parts' records; rank 0 writes the manifest and
    /// commits it in the background.
    pub(super) fn complete(&mut self, ring: &mut dyn Collective) -> Result<(), WorkerError> {
        let f = self.in_flight.take().expect("a checkpoint in flight");
        let Some(Ok(file)) = f.mine else { unreachable!("complete only after this rank's part was written") };
        self.completed = Some(f.step);
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
                test_accuracy: f.test.accuracy.unwrap_or(-1.0),
                test_loss: f.test.loss,
                test_rmse: f.test.rmse,
                test_r2: f.test.r2,
                test_bpb: f.test.bpb,
                dir: checkpoint_dir(self.base.job_id, f.step),
                epoch_records: f.epoch_records,
                epoch_digests: f.epoch_digests,
                files,
                ..self.base.clone()
            };
            self.writer.finalize(manifest);
        }
        Ok(())
    }

    /// Blocks until this rank's part of the checkpoint in flight is written (or failed).
    pub(super) fn wait_mine(&mut self) -> Result<(), WorkerError> {
        while self.in_flight.as_ref().is_some_and(|f| f.mine.is_none()) {
            let done = self.writer.wait_done().ok_or_else(|| WorkerError::Checkpoint("the checkpoint writer stopped".into()))?;
            self.absorb(done);
        }
        Ok(())
    }

    /// One gather of the control values alone, when there is no step to carry them.
    pub(super) fn sync(&mut self, ring: &mut dyn Collective) -> Result<Sums, WorkerError> {
        self.wait_mine()?;
        let mut ctl = Control::default();
        self.vote(&mut ctl);
        ctl.due = false;
        reduce_controls(ring, &ctl)
    }

    /// Rank 0: waits until the manifest of checkpoint `step` is committed, or failed to be.
    pub(super) fn wait_finalized(&mut self, step: u64) -> Result<(), String> {
        loop {
            if let Some((s, result)) = &self.finalized {
                if *s == step {
                    return result.clone();
                }
            }
            match self.writer.wait_done() {
                // Its outcome is the caller's to report.
                Some(WriteDone::Finalized { step: s, result }) if s == step => return result.map(|_| ()),
                Some(other) => self.absorb(other),
                None => return Err("the checkpoint writer stopped".into()),
            }
        }
    }

    /// After the last step: lets the checkpoint in flight land, then writes and commits the
    /// final one (the job's model) and waits for its commit. Returns its folder.
    pub(super) fn finish(&mut self, state: &TrainState, ring: &mut dyn Collective) -> Result<String, WorkerError> {
        if self.in_flight.is_some() {
            let sums = self.sync(ring)?;
            self.settle(&sums, ring)?;
        }
        self.write_now(state, ring)?.map_err(|why| WorkerError::Checkpoint(format!("the final checkpoint (step {}) could not be written: {why}", state.step)))?;
        if self.rank == 0 {
            // Rank 0 reports success only once the model is committed.
            self.wait_finalized(state.step)
                .map_err(|e| WorkerError::Checkpoint(format!("the final checkpoint (step {}) was not committed: {e}", state.step)))?;
        }
        Ok(checkpoint_dir(self.base.job_id, state.step))
    }

    /// Writes a checkpoint of `state` at once and, once every part is written, has rank 0
    /// commit it in the background. Err inside: a write failed (on this rank or another; the
    /// same on every rank).
    pub(super) fn write_now(&mut self, state: &TrainState, ring: &mut dyn Collective) -> Result<Result<(), String>, WorkerError> {
        self.start(state);
        let sums = self.sync(ring)?;
        if sums.failed > 0 {
            return Ok(Err(match self.in_flight.take().and_then(|f| f.mine) {
                Some(Err(e)) => e,
                _ => "a write failed on another rank".into(),
            }));
        }
        self.complete(ring)?;
        Ok(Ok(()))
    }

    /// After a step that diverged (and changed nothing): makes the state, that of the last
    /// good step, a committed checkpoint through the normal path, unless it already is one
    /// (`committed`: the steps the generation started with; or the one just completed), and
    /// waits for rank 0's commit: a rank that reported the failure first would end the job
    /// and the commit would be refused. Returns the checkpoint's step (None: no step was
    /// done, there is nothing to keep) or why it could not be committed; the same on every
    /// rank.
    pub(super) fn keep_last_good(&mut self, state: &TrainState, committed: &[u64], ring: &mut dyn Collective) -> Result<Result<Option<u64>, String>, WorkerError> {
        if self.in_flight.is_some() {
            let sums = self.sync(ring)?;
            self.settle(&sums, ring)?;
        }
        let step = state.step;
        // The coordinator must not restart the job from here (it fails right after).
        self.base.diverged_at = step + 1;
        let mut outcome = Ok(Some(step));
        if step == 0 {
            outcome = Ok(None);
        } else if self.completed != Some(step) && !committed.contains(&step) {
            if let Err(why) = self.write_now(state, ring)? {
                outcome = Err(format!("the checkpoint of step {step} could not be written: {why}"));
            }
        }
        if self.rank == 0 && outcome.is_ok() && self.completed == Some(step) {
            if let Err(e) = self.wait_finalized(step) {
                outcome = Err(format!("the checkpoint of step {step} was not committed: {e}"));
            }
        }
        // Rank 0 alone knows how its commit went: every rank waits for it and says the same.
        let mut said = match &outcome {
            Ok(s) => [&[0u8][..], &s.unwrap_or(u64::MAX).to_le_bytes()].concat(),
            Err(e) => [&[1u8][..], e.as_bytes()].concat(),
        };
        ring.broadcast(&mut said, 0)?;
        Ok(match said.split_first() {
            Some((0, s)) if s.len() == 8 => Ok(Some(u64::from_le_bytes(s.try_into().expect("8 bytes"))).filter(|&s| s != u64::MAX)),
            Some((1, e)) => Err(String::from_utf8_lossy(e).into_owned()),
            _ => return Err(WorkerError::Collective(format!("rank 0 sent a checkpoint outcome of {} bytes that does not parse", said.len()))),
        })
    }
}
