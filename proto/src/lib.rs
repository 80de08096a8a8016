//! Generated gRPC services and message types of shoal (see `proto/shoal.proto`).
//! This is the only crate that generates code.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// The slice of etcd's v3 API that `benches` drives to compare the coordinator with etcd.
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

pub use prost::Message;
pub use v1::*;

impl JobState {
    /// The lower-case name used by the CLI and JSON output.
    pub fn label(self) -> &'static str {
        match self {
            JobState::Unspecified => "unknown",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

impl WorkerState {
    pub fn label(self) -> &'static str {
        match self {
            WorkerState::Unspecified => "unknown",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Lost => "lost",
        }
    }
}
