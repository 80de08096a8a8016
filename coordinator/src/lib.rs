//! The shoal coordinator: a Raft-replicated state machine that holds every piece of metadata
//! that must survive a crash (workers, datasets, jobs, assignments), and the client library
//! that talks to it. This is the only crate that links `raft`.
//!
//! - `node`: the sans-IO core (raft-rs `RawNode` + state machine), driven by the shell.
//! - `state`: the replicated state machine and the scheduler's placement rule.
//! - `storage`: the durable, checksummed Raft log file.
//! - `server`: the tonic shell: gRPC services, the Ready loop, leases, scheduling.
//! - `client`: a client that knows every replica and fails over between them.

pub mod client;
pub mod leader;
pub mod membership;
pub mod node;
pub mod server;
pub mod state;
pub mod storage;
pub mod tls;

pub use client::{Client, ClientError};
pub use server::{serve, CoordinatorConfig, InitialState};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("io: {0}")]
    Io(String),
    #[error("{path}: corrupt record at offset {offset}: {reason}; refusing to start (a replica with a damaged log must be restored or replaced, not trusted)")]
    CorruptLog { path: String, offset: u64, reason: String },
    #[error("raft: {0}")]
    Raft(String),
    #[error("the request is {0} bytes; one coordinator write takes at most {max} bytes", max = crate::node::MAX_COMMAND)]
    TooLarge(usize),
    #[error("not the leader (leader id {0}, 0 if unknown)")]
    NotLeader(u64),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Identity(String),
    #[error("{0} is in use by another coordinator process")]
    Locked(String),
    #[error("grpc server: {0}")]
    Transport(String),
}
