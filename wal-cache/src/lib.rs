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
//!   tier, for encoded batches, Parquet footers and row groups.
//!
//! Does not: decide offsets or durability policy (the broker does), or look
//! inside entries: WAL payloads and cache values are opaque bytes.

mod cache;
mod error;
mod wal;

pub use cache::{Cache, CacheOptions, CacheStats};
pub use error::{Error, Result};
#[cfg(feature = "testing")]
pub use wal::WalFaults;
pub use wal::{AppendTicket, Damage, Wal, WalEntry, WalFailure, WalHealth, WalOptions, WalStats};
