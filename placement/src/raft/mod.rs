//! The openraft wiring: type configuration, storage in fjall and the HTTP
//! transport between placement nodes.

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::io::Cursor;

use crate::command::{Command, Reply};

openraft::declare_raft_types!(
    /// Placement's Raft types: commands in, replies out, peers addressed by host:port.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Runs blocking fjall work (fsync above all) off the async worker threads,
/// so a slow disk does not stall the Raft core or HTTP handlers sharing them.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, fjall::Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, fjall::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fjall::Error::Io(std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use openraft::testing::{StoreBuilder, Suite};
    use tempfile::TempDir;

    use super::StorageError;
    use super::TypeConfig;
    use super::log_store::LogStore;
    use super::state_machine::StateMachineStore;

    struct FjallStores;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for FjallStores {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let db = fjall::Database::builder(dir.path()).open().unwrap();
            let logs = LogStore::open(&db).unwrap();
            let sm = StateMachineStore::open(&db).unwrap();
            Ok((dir, logs, sm))
        }
    }

    /// openraft's conformance suite for log and state-machine storage.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(FjallStores).unwrap();
    }
}
