//! Domain types shared by every shoal crate: the job spec (TOML), dataset formats (IDX import,
//! safetensors shards and their manifest), checkpoint paths and manifest checks, the deterministic
//! RNG, atomic file writes and test fault points.
//! No network IO lives here.

pub mod auth;
pub mod batch;
pub mod checkpoint;
pub mod cron;
pub mod csv;
pub mod dataset;
pub mod failpoint;
pub mod fsutil;
pub mod history;
pub mod idx;
pub mod limits;
pub mod model;
pub mod node;
pub mod pipeline;
pub mod rng;
pub mod schedule;
pub mod spec;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod text;

pub use spec::JobSpec;

/// Errors of the core formats. Each names the file, key or value that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not an IDX file: {reason}")]
    NotIdx { path: String, reason: String },
    #[error("invalid job spec: {0}")]
    Spec(String),
    #[error("invalid pipeline: {0}")]
    Pipeline(String),
    #[error("invalid dataset: {0}")]
    Dataset(String),
    #[error("{path}: corrupt shard: {reason}")]
    CorruptShard { path: String, reason: String },
}

impl CoreError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.as_ref().display().to_string(), source }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
