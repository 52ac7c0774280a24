//! Shoal's local write-ahead log and hybrid cache.
//!
//! Owns:
//! - the write-ahead log ([`Wal`]): an fjall keyspace keyed by a big-endian
//!   sequence number, written by one committer thread that groups every
//!   waiting append into a single batch and a single fsync (group commit);
//!   replay at start-up, including recovery from a torn tail; and truncation
//!   once records are committed to object storage;
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
pub use wal::{AppendTicket, Wal, WalEntry, WalOptions, WalStats};
