//! The one error type of the placement crate.
//!
//! A refused command (stale epoch, unknown stream, ...) is not an error: it
//! is replicated like any other outcome and comes back as
//! [`Reply::Rejected`](crate::Reply::Rejected).

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This node is not the Raft leader; `leader` is (id, host:port) when known.
    #[error("not the placement leader (leader: {leader:?})")]
    NotLeader { leader: Option<(u64, String)> },
    /// Raft failed: no quorum, the node is shutting down, initialisation failed.
    #[error("raft: {0}")]
    Raft(String),
    /// The fjall database or the encoding of what it holds failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A request to another placement node failed.
    #[error("http: {0}")]
    Http(String),
    /// The bucket copy of placement is held by another node, or was taken
    /// over: this node must not write.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Reading or writing placement's copy in the bucket failed.
    #[error("bucket: {0}")]
    Bucket(String),
    /// A placement node refused this process's credentials (no cluster
    /// secret, or a different one).
    #[error(
        "placement at {addr} refused this node's credentials (401): check --cluster-secret-file"
    )]
    Unauthorized { addr: String },
    /// The node configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl From<fjall::Error> for Error {
    fn from(e: fjall::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
