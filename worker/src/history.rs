//! A rank's metric history while it trains: points go into a buffer on the step loop (a push,
//! never a wait), and a writer thread turns each full buffer (or every 5 s) into a chunk file
//! in the store (`core::history::chunk_path`) and has the coordinator index it
//! (`JobLink::record_metrics`). A full queue drops the buffer's points and counts them, so a
//! slow store never slows a step; the count reaches the job as `metrics_dropped`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_core::store::Store;
use shoal_proto::{Message, MetricChunk, MetricChunkRef, MetricPoint};

use crate::checkpoint::JobLink;

/// The keys a rank records: the job's figures (`core::history::JOB_KEYS`, the same on every
/// rank) and its own phase times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Loss,
    Lr,
    SamplesPerS,
    GradNorm,
    TestAccuracy,
    TestLoss,
    TestRmse,
    TestR2,
    TestBpb,
    DataMs,
    ComputeMs,
    CollectiveMs,
    OptimizerMs,
}

const KEYS: [&str; 13] = [
    "loss", "lr", "samples_per_s", "grad_norm", "test_accuracy", "test_loss", "test_rmse", "test_r2", "test_bpb",
    "phase_data_ms", "phase_forward_backward_ms", "phase_collective_ms", "phase_optimizer_ms",
];

/// Points per chunk at most, and the longest a point waits for its chunk.
const CHUNK_POINTS: usize = 4096;
const CHUNK_AGE: Duration = Duration::from_secs(5);
/// Chunks waiting for the writer thread at most.
const QUEUE: usize = 8;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub struct Recorder {
    buf: Vec<MetricPoint>,
    since: Instant,
    tx: Option<SyncSender<Vec<MetricPoint>>>,
    dropped: Arc<AtomicU64>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    /// Starts the writer thread of rank `rank` of `generation` of job `job`.
    pub fn start(store: Store, link: Arc<dyn JobLink>, job: u64, generation: u64, rank: u32) -> Recorder {
        let (tx, rx) = sync_channel::<Vec<MetricPoint>>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        let writer = std::thread::Builder::new()
            .name("metrics-writer".into())
            .spawn(move || {
                // TensorBoard's view of the same points (best effort: the history is the record).
                let tb_dir = format!("jobs/{job}/tensorboard");
                let mut events = match crate::tensorboard::EventFile::create(&store, &tb_dir, &format!("g{generation}-r{rank}")) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!(error = %e, "no TensorBoard event file for this task");
                        None
                    }
                };
                for (seq, points) in rx.into_iter().enumerate() {
                    if let Some(f) = events.as_mut() {
                        // The job's figures from rank 0's file alone (every rank has them).
                        let job_key = |k: &str| shoal_core::history::JOB_KEYS.contains(&k);
                        let tags: Vec<Option<String>> = KEYS.iter().map(|k| match (job_key(k), rank) { (true, 0) => Some(k.to_string()), (true, _) => None, _ => Some(format!("rank{rank}/{k}")) }).collect();
                        let scalars = points.iter().filter_map(|p| Some((tags[p.key as usize].as_deref()?, p.step, p.unix_ms, p.value)));
                        if let Err(e) = f.scalars(scalars) {
                            tracing::warn!(error = %e, "could not append to the TensorBoard event file");
                            events = None;
                        }
                    }
                    let (first, last) = (points.iter().map(|p| p.step).min().unwrap_or(0), points.iter().map(|p| p.step).max().unwrap_or(0));
                    let count = points.len() as u32;
                    let chunk = MetricChunk { job_id: job, generation, rank, keys: KEYS.iter().map(|k| k.to_string()).collect(), points };
                    let bytes = chunk.encode_to_vec();
                    let path = shoal_core::history::chunk_path(job, generation, rank, seq as u64);
                    let written = store.put(&path, &[&bytes]).map_err(|e| e.to_string()).and_then(|()| {
                        let r = MetricChunkRef { generation, rank, seq: seq as u64, path: path.clone(), first_step: first, last_step: last, points: count, blake3: blake3::hash(&bytes).to_hex().to_string() };
                        link.record_metrics(r, lost.swap(0, Ordering::Relaxed))
                    });
                    if let Err(e) = written {
                        lost.fetch_add(u64::from(count), Ordering::Relaxed);
                        tracing::warn!(error = %e, path, "could not record a chunk of the metric history");
                    }
                }
            })
            .ok();
        if writer.is_none() {
            tracing::warn!("could not start the metrics writer: this task records no history");
        }
        Recorder { buf: Vec::with_capacity(256), since: Instant::now(), tx: writer.is_some().then_some(tx), dropped, writer }
    }

    /// A point of `key` at `step` (after the step: the step count applied).
    pub fn record(&mut self, step: u64, key: Key, value: f64) {
        if self.tx.is_some() {
            self.buf.push(MetricPoint { key: key as u32, step, unix_ms: unix_ms(), value });
        }
    }

    /// Hands the buffer to the writer when it is full or old; call after each step.
    pub fn tick(&mut self) {
        if self.buf.len() >= CHUNK_POINTS || (!self.buf.is_empty() && self.since.elapsed() >= CHUNK_AGE) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.since = Instant::now();
        if self.buf.is_empty() {
            return;
        }
        let points = std::mem::replace(&mut self.buf, Vec::with_capacity(256));
        let count = points.len() as u64;
        match self.tx.as_ref().map(|tx| tx.try_send(points)) {
            Some(Ok(())) => {}
            Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => {
                self.dropped.fetch_add(count, Ordering::Relaxed);
            }
        }
    }

    /// Writes what is buffered and waits for the writer to index every chunk: a job's last
    /// points are in its history before its rank reports the end.
    pub fn finish(mut self) {
        self.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }

    fn close(&mut self) {
        if let Some(tx) = self.tx.take() {
            let points = std::mem::take(&mut self.buf);
            if !points.is_empty() && tx.send(points).is_err() {
                tracing::warn!("the metrics writer is gone; the last points are lost");
            }
        }
    }
}

impl Drop for Recorder {
    /// An error or a cancellation ends the task too: what it recorded still goes out, from
    /// the writer thread, which finishes on its own (the task does not wait for a coordinator
    /// that may be out of reach).
    fn drop(&mut self) {
        self.close();
    }
}
