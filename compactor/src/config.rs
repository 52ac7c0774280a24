//! What a compactor is told: delays, grace periods, sizes.

use std::time::Duration;

/// Settings of one compactor, the same for every front end.
#[derive(Debug, Clone)]
pub struct CompactorConfig {
    /// Names this compactor in the compaction lease.
    pub holder: String,
    /// Flush objects younger than this are left alone.
    pub delay: Duration,
    /// Replaced objects are deleted this long after placement stopped
    /// referencing them, so a reader that resolved one still finds it.
    pub gc_grace: Duration,
    /// An object placement never referenced (a crash between PUT and
    /// commit) is deleted only this long after it was written.
    pub orphan_grace: Duration,
    /// Size compacted files grow to.
    pub target_size: u64,
    /// How long the compaction lease lasts without renewal (a run renews
    /// it every third of this).
    pub lease_ttl: Duration,
    /// Deletions per run at most (bounded batches).
    pub max_deletes: usize,
    /// Compacted files' row groups hold about this many bytes at most.
    pub row_group_bytes: usize,
}

impl CompactorConfig {
    pub fn new(holder: impl Into<String>) -> Self {
        Self {
            holder: holder.into(),
            delay: Duration::from_secs(300),
            gc_grace: Duration::from_secs(600),
            orphan_grace: Duration::from_secs(3600),
            target_size: 256 << 20,
            lease_ttl: Duration::from_secs(30),
            max_deletes: 1000,
            row_group_bytes: 32 << 20,
        }
    }
}

/// A holder name unique to this process and moment.
pub fn holder_name(role: &str) -> String {
    format!(
        "{role}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}
