//! The Raft log, vote and committed index in fjall.
//!
//! Keyspace `raft_log`: key = log index as big-endian u64 (so key order is
//! index order), value = JSON of the entry. Keyspace `raft_meta`: the vote,
//! the committed log id and the last purged log id, each as JSON.

// openraft's traits fix the error type; helpers return it too, unboxed.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageIOError,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LogId, NodeId, StorageError, TypeConfig, Vote, blocking};
use crate::error::Result;

type Entry = openraft::Entry<TypeConfig>;

/// The layout of stored log entries: `{"format": N, "entry": ...}`.
/// Entries written before the field existed are a bare entry (format 0)
/// and still load; an entry of a newer format than this code knows is
/// refused rather than misread.
const LOG_FORMAT: u32 = 1;
const FORMAT_PREFIX: &[u8] = b"{\"format\":";

#[derive(Serialize)]
struct StoredEntryRef<'a> {
    format: u32,
    entry: &'a Entry,
}

#[derive(serde::Deserialize)]
struct StoredEntry {
    format: u32,
    entry: Entry,
}

fn encode_entry(entry: &Entry) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&StoredEntryRef {
        format: LOG_FORMAT,
        entry,
    })
}

fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    if !bytes.starts_with(FORMAT_PREFIX) {
        return serde_json::from_slice(bytes).map_err(io::Error::other);
    }
    let stored: StoredEntry = serde_json::from_slice(bytes).map_err(io::Error::other)?;
    if stored.format > LOG_FORMAT {
        return Err(io::Error::other(format!(
            "log entry of format {} was written by a newer version (this one reads up to {LOG_FORMAT})",
            stored.format
        )));
    }
    Ok(stored.entry)
}

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Cheap to clone: fjall handles are reference counted, so the log reader
/// handed to replication tasks is just another clone.
#[derive(Clone)]
pub struct LogStore {
    db: Database,
    logs: Keyspace,
    meta: Keyspace,
}

impl LogStore {
    pub fn open(db: &Database) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            logs: db.keyspace("raft_log", KeyspaceCreateOptions::default)?,
            meta: db.keyspace("raft_meta", KeyspaceCreateOptions::default)?,
        })
    }

    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let io_err = |e: AnyError| StorageIOError::new(subject.clone(), ErrorVerb::Read, e);
        let Some(bytes) = self.meta.get(key).map_err(|e| io_err(AnyError::new(&e)))? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&bytes).map_err(|e| io_err(AnyError::new(&e)))?;
        Ok(Some(value))
    }

    /// Writes one meta value; `durable` waits for the fsync.
    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durable: bool,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let io_err = |e: AnyError| StorageIOError::new(subject.clone(), ErrorVerb::Write, e);
        let bytes = serde_json::to_vec(value).map_err(|e| io_err(AnyError::new(&e)))?;
        let mut batch = self.db.batch();
        if durable {
            batch = batch.durability(Some(PersistMode::SyncAll));
        }
        batch.insert(&self.meta, key, bytes);
        blocking(move || batch.commit())
            .await
            .map_err(|e| io_err(AnyError::new(&e)))?;
        Ok(())
    }

    fn last_entry(&self) -> Result<Option<Entry>, StorageError> {
        let Some(guard) = self.logs.last_key_value() else {
            return Ok(None);
        };
        let (_, value) = guard
            .into_inner()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let entry = decode_entry(&value).map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(Some(entry))
    }

    /// Keys of the log entries in `range`, for deletion.
    fn keys_in(
        &self,
        range: (Bound<[u8; 8]>, Bound<[u8; 8]>),
    ) -> Result<Vec<fjall::UserKey>, StorageError> {
        self.logs
            .range(range)
            .map(|guard| {
                guard
                    .key()
                    .map_err(|e| StorageIOError::write_logs(&e).into())
            })
            .collect()
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
    let map = |b: Bound<&u64>| match b {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(range.start_bound()), map(range.end_bound()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.logs
            .range(key_bounds(&range))
            .map(|guard| {
                let value = guard.value().map_err(|e| StorageIOError::read_logs(&e))?;
                let entry = decode_entry(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(entry)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED, ErrorSubject::Logs)?;
        let last_log_id = match self.last_entry()? {
            Some(entry) => Some(entry.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // A vote must never be forgotten (it would allow voting twice in a term).
        self.write_meta(VOTE, vote, true, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced: a stale committed id only means fewer entries are
        // re-applied at startup; the leader commits the rest again.
        self.write_meta(COMMITTED, &committed, false, ErrorSubject::Store)
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(COMMITTED, ErrorSubject::Store)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Fsynced before the callback: an entry the leader counts towards a
        // quorum (and so acknowledges to a broker) must survive kill -9.
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for entry in entries {
            let value = encode_entry(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            batch.insert(&self.logs, index_key(entry.log_id.index), value);
        }
        match blocking(move || batch.commit()).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let keys = self.keys_in(key_bounds(&(log_id.index..)))?;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for key in keys {
            batch.remove(&self.logs, key);
        }
        blocking(move || batch.commit())
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let previous: Option<LogId> = self.read_meta(LAST_PURGED, ErrorSubject::Logs)?;
        // Start after the previous purge so deleted keys are not scanned again.
        let from = previous.map_or(0, |p| p.index + 1);
        let keys = self.keys_in(key_bounds(&(from..=log_id.index)))?;
        let marker = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        // One atomic batch: the purge marker and the deletions land together.
        // Not fsynced: a lost purge leaves entries the next purge removes.
        let mut batch = self.db.batch();
        batch.insert(&self.meta, LAST_PURGED, marker);
        for key in keys {
            batch.remove(&self.logs, key);
        }
        blocking(move || batch.commit())
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::command::Command;

    fn entry() -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 42),
            payload: EntryPayload::Normal(Command::AllocateProducerId),
        }
    }

    /// Entries carry their format; bare entries from before still load;
    /// a newer format is refused, not misread.
    #[test]
    fn log_entries_carry_a_format() {
        let stored = encode_entry(&entry()).unwrap();
        assert!(stored.starts_with(FORMAT_PREFIX));
        assert_eq!(decode_entry(&stored).unwrap().log_id, entry().log_id);
        let bare = serde_json::to_vec(&entry()).unwrap();
        assert_eq!(decode_entry(&bare).unwrap().log_id, entry().log_id);
        let newer = String::from_utf8(stored).unwrap().replacen(
            &format!("\"format\":{LOG_FORMAT}"),
            "\"format\":99",
            1,
        );
        assert!(decode_entry(newer.as_bytes()).is_err());
    }
}
