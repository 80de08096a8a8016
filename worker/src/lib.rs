//! The shoal worker: it registers with the coordinator, heartbeats, and runs its assignment:
//! memory-mapped shards (`data`), candle models (`model`), the optimizer (`optim`), the
//! training loop (`train`), checkpoints (`checkpoint`) and ring all-reduce with its peers over
//! the data plane (`collective`).

pub mod batch;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod history;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod runner;
pub mod tensorboard;
pub mod train;

pub use runner::{run_worker, WorkerConfig};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid job spec: {0}")]
    Spec(String),
    #[error("data: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(String),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("collective: {0}")]
    Collective(String),
    /// A peer's process or connection is gone (end of stream, reset, refused, exited): the
    /// coordinator decides what happens to the job, not this rank.
    #[error("collective: {0}")]
    PeerGone(String),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("io: {0}")]
    Io(String),
    #[error(transparent)]
    Device(#[from] shoal_kernels::KernelError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A non-finite loss or gradient, found before the step was applied.
    #[error("{0}")]
    Diverged(Box<crate::train::Divergence>),
    #[error("internal error (a bug; please report it): {0}")]
    Panicked(String),
    /// A batch task's own failure (a user command's exit code and stderr, its timeout).
    #[error("{0}")]
    Task(String),
    #[error("cancelled")]
    Cancelled,
}
