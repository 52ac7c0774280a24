use shoal_placement::Rejection;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("placement: {0}")]
    Placement(#[from] shoal_placement::Error),
    #[error("object store: {0}")]
    Storage(#[from] shoal_storage::Error),
    #[error("placement refused {what}: {rejection}")]
    Rejected { what: String, rejection: Rejection },
    #[error("the compaction lease is held by {holder} until {until_ms}")]
    LeaseHeld { holder: String, until_ms: i64 },
    #[error("unexpected placement reply to {what}: {reply}")]
    Unexpected { what: String, reply: String },
    #[error("rewriting {stream}/{shard}: {reason}")]
    Rewrite {
        stream: String,
        shard: i32,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
