//! Shoal's local write-ahead log and hybrid cache.
//!
//! Owns:
//! - the write-ahead log ([`Wal`]): fixed-size segment files written by one
//!   committer thread that groups every waiting append into a single write
//!   and a single `fdatasync` (group commit); replay at start-up, telling a
//!   torn last write (dropped) from damage to durable records (reported);
//!   truncation once records are committed to object storage; recovery
//!   from a failed write (a full disk) without a restart;
//! - the hybrid cache ([`Cache`]): a foyer memory tier backed by a local disk
//!   tier, for encoded batches, Parquet footers and row groups, sized by
//!   [`CacheSize`] (bytes, a percentage, or a share of the machine).
//!
//! Does not: decide offsets or durability policy (the broker does), or look
//! inside entries: WAL payloads and cache values are opaque bytes.

mod cache;
mod error;
mod sizing;
mod wal;

pub use cache::{Cache, CacheOptions, CacheStats};
pub use error::{Error, Result};
pub use sizing::{AUTO_DISK_PERCENT, AUTO_MEMORY_PERCENT, CacheSize, CacheSizeError};
#[cfg(feature = "testing")]
pub use wal::WalFaults;
pub use wal::{AppendTicket, Damage, Wal, WalEntry, WalFailure, WalHealth, WalOptions, WalStats};
