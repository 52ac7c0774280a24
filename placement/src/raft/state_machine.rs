//! The state machine: [`State`] in memory, snapshots of it in fjall.
//!
//! `apply` does no I/O. Durability comes from the log plus snapshots: at
//! start the state is loaded from the last snapshot and openraft re-applies
//! the committed entries after it (see `LogStore::read_committed`).
//! Keyspace `raft_snapshot` holds `meta` (the snapshot meta) and `data`
//! (JSON of [`StoredSnapshot`]), written together in one batch.

use std::io::Cursor;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{LogId, Membership, SnapshotMeta, StorageError, TypeConfig, blocking};
use crate::bucket::LoggedCommand;
use crate::command::Reply;
use crate::error::{Error, Result};
use crate::state::State;

type Entry = openraft::Entry<TypeConfig>;

const META: &str = "meta";
const DATA: &str = "data";

/// What a snapshot holds (and what is kept in memory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub last_applied: Option<LogId>,
    pub last_membership: Membership,
    pub state: State,
}

/// The in-memory state machine, shared with the node for reads.
pub type SharedState = Arc<RwLock<StoredSnapshot>>;

pub fn read(shared: &SharedState) -> RwLockReadGuard<'_, StoredSnapshot> {
    // A panic while holding the lock cannot leave State half-updated in a
    // way a reader could observe as torn: `State::apply` does not panic.
    shared.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shared: &SharedState) -> RwLockWriteGuard<'_, StoredSnapshot> {
    shared.write().unwrap_or_else(PoisonError::into_inner)
}

/// Where every applied command is also sent, once set: the writer of the
/// bucket copy. Fed here rather than by the callers of a write, so a
/// command is mirrored whether or not its caller waits for the answer.
pub type AppliedTap = Arc<parking_lot::Mutex<Option<mpsc::UnboundedSender<LoggedCommand>>>>;

#[derive(Clone)]
pub struct StateMachineStore {
    db: Database,
    snapshots: Keyspace,
    shared: SharedState,
    version: Arc<watch::Sender<u64>>,
    tap: AppliedTap,
}

impl StateMachineStore {
    /// Opens the snapshot keyspace and loads the last snapshot into memory.
    pub fn open(db: &Database) -> Result<Self> {
        let snapshots = db.keyspace("raft_snapshot", KeyspaceCreateOptions::default)?;
        let loaded = match snapshots.get(DATA)? {
            Some(bytes) => serde_json::from_slice::<StoredSnapshot>(&bytes)
                .map_err(|e| Error::Storage(format!("decoding the placement snapshot: {e}")))?,
            None => StoredSnapshot::default(),
        };
        if loaded.state.format > crate::state::STATE_FORMAT {
            return Err(Error::Storage(format!(
                "the placement snapshot has format {}, written by a newer version (this one reads up to {})",
                loaded.state.format,
                crate::state::STATE_FORMAT
            )));
        }
        let (version, _) = watch::channel(loaded.state.version);
        Ok(Self {
            db: db.clone(),
            snapshots,
            shared: Arc::new(RwLock::new(loaded)),
            version: Arc::new(version),
            tap: AppliedTap::default(),
        })
    }

    pub fn tap(&self) -> AppliedTap {
        self.tap.clone()
    }

    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    pub fn subscribe_version(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Saves a snapshot, fsynced, replacing the previous one.
    async fn persist(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), StorageError> {
        let err = |e: &dyn std::error::Error| {
            StorageIOError::write_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
        };
        let meta_bytes = serde_json::to_vec(meta).map_err(|e| err(&e))?;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&self.snapshots, META, meta_bytes);
        batch.insert(&self.snapshots, DATA, data);
        blocking(move || batch.commit())
            .await
            .map_err(|e| err(&e))?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Serialised under the read lock instead of cloning the whole State.
        let (data, last_applied, last_membership) = {
            let sm = read(&self.shared);
            let data =
                serde_json::to_vec(&*sm).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (data, sm.last_applied, sm.last_membership.clone())
        };
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{millis}", id.leader_id.term, id.index),
            None => format!("0-0-{millis}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        self.persist(&meta, data.clone()).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let sm = read(&self.shared);
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let version = {
            let tap = self.tap.lock();
            let mut sm = write(&self.shared);
            for entry in entries {
                sm.last_applied = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Blank => Reply::Done,
                    EntryPayload::Normal(cmd) => match tap.as_ref() {
                        Some(tx) => {
                            let command = cmd.clone();
                            let reply = sm.state.apply(cmd);
                            // Closed only once the bucket writer stopped
                            // (fenced): nothing is mirrored any more.
                            let _ = tx.send(LoggedCommand {
                                version: sm.state.version,
                                command,
                            });
                            reply
                        }
                        None => sm.state.apply(cmd),
                    },
                    EntryPayload::Membership(membership) => {
                        sm.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        Reply::Done
                    }
                };
                replies.push(reply);
            }
            sm.state.version
        };
        self.version.send_if_modified(|v| {
            let changed = *v != version;
            *v = version;
            changed
        });
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut received: StoredSnapshot = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), openraft::AnyError::new(&e))
        })?;
        // The meta is authoritative for what the snapshot covers.
        received.last_applied = meta.last_log_id;
        received.last_membership = meta.last_membership.clone();
        self.persist(meta, data).await?;
        let version = received.state.version;
        *write(&self.shared) = received;
        self.version.send_replace(version);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let read_err = |e: &dyn std::error::Error| {
            StorageIOError::read_snapshot(None, openraft::AnyError::error(e))
        };
        // One database snapshot, so meta and data come from the same save.
        let view = self.db.snapshot();
        let (Some(meta), Some(data)) = (
            view.get(&self.snapshots, META).map_err(|e| read_err(&e))?,
            view.get(&self.snapshots, DATA).map_err(|e| read_err(&e))?,
        ) else {
            return Ok(None);
        };
        let meta: SnapshotMeta = serde_json::from_slice(&meta).map_err(|e| read_err(&e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}
