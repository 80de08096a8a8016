//! The data-parallel training loop of one rank. Every rank starts from the same seeded
//! parameters, reads its slice of each global batch (the order comes from (seed, epoch)),
//! computes gradients with candle, all-reduces them over the ring, and applies the same fused
//! optimizer update: so all ranks hold bitwise-identical parameters after every step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use shoal_core::rng::epoch_permutation;
use shoal_core::spec::{ModelKind, Optimizer};
use shoal_core::JobSpec;
use shoal_proto::{Assignment, JobProgress};

use crate::collective::{Mailbox, Ring};
use crate::data::ShardedDataset;
use crate::model::Model;
use crate::WorkerError;

pub struct TrainTask {
    pub store: PathBuf,
    pub assignment: Assignment,
    pub mailbox: Arc<Mailbox>,
    pub cancel: Arc<AtomicBool>,
    pub collective_timeout: Duration,
    /// Called (on rank 0) with fresh progress, at most every `report_every`.
    pub on_progress: Box<dyn FnMut(&JobProgress) + Send>,
    pub report_every: Duration,
}

pub struct TrainOutcome {
    pub params: Vec<f32>,
    pub progress: JobProgress,
    /// Where this rank saved its final parameters, relative to the store.
    pub model_path: String,
    pub param_blake3: String,
}

enum OptState {
    Sgd { velocity: Vec<f32> },
    AdamW { m: Vec<f32>, v: Vec<f32> },
}

struct Opt {
    cfg: Optimizer,
    state: OptState,
    step: u64,
}

impl Opt {
    fn new(cfg: Optimizer, n: usize) -> Opt {
        let state = match cfg {
            Optimizer::Sgd { .. } => OptState::Sgd { velocity: vec![0.0; n] },
            Optimizer::AdamW { .. } => OptState::AdamW { m: vec![0.0; n], v: vec![0.0; n] },
        };
        Opt { cfg, state, step: 0 }
    }

    fn apply(&mut self, params: &mut [f32], grads: &[f32]) -> Result<(), WorkerError> {
        self.step += 1;
        match (&mut self.state, self.cfg) {
            (OptState::Sgd { velocity }, Optimizer::Sgd { lr, momentum, weight_decay }) => {
                shoal_kernels::sgd_momentum(params, grads, velocity, lr, momentum, weight_decay)?
            }
            (OptState::AdamW { m, v }, Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay }) => {
                shoal_kernels::adamw(params, grads, m, v, self.step, lr, beta1, beta2, eps, weight_decay)?
            }
            _ => unreachable!("optimizer state matches its config by construction"),
        }
        Ok(())
    }
}

fn batch_tensors(ds: &ShardedDataset, indices: impl Iterator<Item = u64>, dev: &Device) -> Result<(Tensor, Tensor), WorkerError> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in indices {
        ds.push_record(i, &mut x, &mut y)?;
    }
    let n = y.len();
    let mut shape = vec![n];
    shape.extend_from_slice(&ds.feature_shape);
    Ok((Tensor::from_vec(x, shape.as_slice(), dev)?, Tensor::from_vec(y, n, dev)?))
}

/// Runs the whole job on this rank. Blocking: call it from a blocking thread; `rt` runs the
/// collectives.
pub fn train(mut task: TrainTask, rt: &tokio::runtime::Handle) -> Result<TrainOutcome, WorkerError> {
    let a = &task.assignment;
    let spec = JobSpec::parse(&a.spec_toml).map_err(|e| WorkerError::Spec(e.to_string()))?;
    let info = a.dataset.as_ref().ok_or_else(|| WorkerError::Data("the assignment carries no dataset".into()))?;
    let ds = ShardedDataset::open(&task.store, info)?;
    let model = Model::new(&spec.model, &ds.feature_shape, ds.classes)?;
    let dev = Device::Cpu;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    if world as u32 != spec.cluster.workers || a.peers.len() != world {
        return Err(WorkerError::Spec(format!("assignment for {world} ranks, spec asks for {}", spec.cluster.workers)));
    }
    let mut ring = Ring::new(rank, &a.peers, a.job_id, a.generation, task.mailbox.clone(), task.collective_timeout, task.cancel.clone())?;

    let mut params = model.init(spec.training.seed);
    let np = params.len();
    let mut opt = Opt::new(spec.training.optimizer.resolve(), np);
    let global_batch = spec.training.batch_size as usize;
    let local_batch = global_batch / world;
    let [train_start, train_end] = spec.dataset.train;
    let train_len = (train_end - train_start) as usize;
    let steps_per_epoch = spec.steps_per_epoch();
    let mut progress = JobProgress { total_steps: spec.total_steps(), test_accuracy: -1.0, ..Default::default() };
    // Gradients plus one slot for the loss, so the mean loss rides along for free.
    let mut buf = vec![0.0f32; np + 1];
    let mut train_time = Duration::ZERO;
    let mut last_report = Instant::now();
    let inv_world = 1.0 / world as f32;

    for epoch in 0..spec.training.epochs as u64 {
        let order = epoch_permutation(train_len, spec.training.seed, epoch);
        let t0 = Instant::now();
        for step in 0..steps_per_epoch as usize {
            if task.cancel.load(Ordering::Relaxed) {
                return Err(WorkerError::Cancelled);
            }
            let first = step * global_batch + rank * local_batch;
            let idx = order[first..first + local_batch].iter().map(|&i| train_start + i as u64);
            let (x, y) = batch_tensors(&ds, idx, &dev)?;
            buf[np] = match model.kind {
                ModelKind::Mlp => model.mlp_loss_and_grads(&params, &x, &y, &mut buf[..np])?,
                ModelKind::Cnn => {
                    let vars = model.vars(&params, &dev)?;
                    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                    let loss = Model::loss(&model.forward(&ts, &x)?, &y)?;
                    let grads = loss.backward()?;
                    for (v, p) in vars.iter().zip(&model.params) {
                        let dst = &mut buf[p.offset..p.offset + p.len()];
                        match grads.get(v) {
                            Some(g) => dst.copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?),
                            None => dst.fill(0.0),
                        }
                    }
                    loss.to_scalar::<f32>()?
                }
            };
            rt.block_on(ring.all_reduce_sum(&mut buf))?;
            shoal_kernels::scale(&mut buf, inv_world);
            opt.apply(&mut params, &buf[..np])?;
            progress.step += 1;
            progress.loss = buf[np] as f64;
            if !progress.loss.is_finite() {
                return Err(WorkerError::Diverged(progress.step));
            }
            if rank == 0 && last_report.elapsed() >= task.report_every {
                let elapsed = train_time + t0.elapsed();
                progress.samples_per_s = (progress.step * global_batch as u64) as f64 / elapsed.as_secs_f64().max(1e-9);
                progress.train_seconds = elapsed.as_secs_f64();
                (task.on_progress)(&progress);
                last_report = Instant::now();
            }
        }
        train_time += t0.elapsed();
        progress.epoch = epoch as u32 + 1;
        progress.samples_per_s = (progress.step * global_batch as u64) as f64 / train_time.as_secs_f64().max(1e-9);
        progress.train_seconds = train_time.as_secs_f64();
        if let Some(test) = spec.dataset.test {
            progress.test_accuracy = evaluate(&model, &params, &ds, test, rank, world, &mut ring, rt, &dev)?;
            tracing::info!(epoch = progress.epoch, accuracy = progress.test_accuracy, loss = progress.loss, "epoch done");
        }
        if rank == 0 {
            (task.on_progress)(&progress);
            last_report = Instant::now();
        }
    }

    let rel = format!("jobs/{}/gen-{}/rank-{}.safetensors", a.job_id, a.generation, rank);
    let param_blake3 = save_params(&task.store, &rel, &model, &params)?;
    Ok(TrainOutcome { params, progress, model_path: rel, param_blake3 })
}

/// Accuracy on the test range; each rank scores its share, then the counts are summed.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &Model,
    params: &[f32],
    ds: &ShardedDataset,
    [start, end]: [u64; 2],
    rank: usize,
    world: usize,
    ring: &mut Ring,
    rt: &tokio::runtime::Handle,
    dev: &Device,
) -> Result<f64, WorkerError> {
    let len = end - start;
    let lo = start + len * rank as u64 / world as u64;
    let hi = start + len * (rank as u64 + 1) / world as u64;
    let tensors = model.tensors(params, dev)?;
    let ts: Vec<&Tensor> = tensors.iter().collect();
    let mut correct = 0u64;
    let mut i = lo;
    while i < hi {
        let j = (i + 512).min(hi);
        let (x, y) = batch_tensors(ds, i..j, dev)?;
        correct += Model::correct(&model.forward(&ts, &x)?, &y)?;
        i = j;
    }
    // Counts stay exact in f32 below 2^24 records per rank.
    let mut counts = [correct as f32, (hi - lo) as f32];
    rt.block_on(ring.all_reduce_sum(&mut counts))?;
    Ok(counts[0] as f64 / counts[1].max(1.0) as f64)
}

/// Saves the parameters as safetensors (one tensor per parameter, by name) and returns the
/// blake3 of the raw parameter bytes.
pub fn save_params(store: &Path, rel: &str, model: &Model, params: &[f32]) -> Result<String, WorkerError> {
    let bytes = crate::collective::f32_le_bytes(params);
    let views = model
        .params
        .iter()
        .map(|p| Ok((p.name.clone(), TensorView::new(Dtype::F32, p.shape.clone(), &bytes[p.offset * 4..(p.offset + p.len()) * 4])?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| WorkerError::Io(e.to_string()))?;
    let out = safetensors::serialize(views, None).map_err(|e| WorkerError::Io(e.to_string()))?;
    shoal_core::fsutil::write_atomic(&store.join(rel), &out).map_err(|e| WorkerError::Io(e.to_string()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}
