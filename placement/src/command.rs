//! What callers ask of placement: commands (replicated through Raft and
//! applied to the state machine) and queries (answered from it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{BrokerId, BrokerInfo, GroupOffset, ProducerState, SegmentRef, Stream};

/// A state change. Deterministic: everything time-dependent is in the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: internally tagged enums buffer their content and then
// cannot read maps with integer keys (producer ids, partitions) from JSON.
#[serde(rename_all = "snake_case")]
pub enum Command {
    CreateStream {
        name: String,
        partitions: i32,
        config: BTreeMap<String, String>,
        #[serde(with = "crate::model::id_u128")]
        id: u128,
        now_ms: i64,
        /// The stream follows the cluster-wide default retention (see
        /// [`crate::model::Stream::retention_default`]). Absent, hence
        /// false, in commands logged before retention existed: replaying
        /// them must not give old streams a retention they never had.
        #[serde(default)]
        retention_default: bool,
    },
    DeleteStream {
        name: String,
    },
    CreatePartitions {
        name: String,
        count: i32,
    },
    AlterStreamConfig {
        name: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    },
    RegisterBroker {
        info: BrokerInfo,
    },
    /// Grant `broker` the lease of a shard with a new epoch.
    AcquireLease {
        stream: String,
        shard: i32,
        broker: BrokerId,
    },
    /// The controller's (or a handing-off owner's) move of a shard to
    /// `broker` with a new epoch; applied only while the shard still has
    /// `expected_epoch`, so a decision made on an old view is refused.
    AssignShard {
        stream: String,
        shard: i32,
        broker: BrokerId,
        expected_epoch: u64,
    },
    /// Ask the owner to hand the shard to `to` once everything it accepted
    /// is committed (a rebalance that loses nothing).
    RequestHandoff {
        stream: String,
        shard: i32,
        to: BrokerId,
        expected_epoch: u64,
    },
    /// The owner finishes handoff `handoff_id` after committing everything
    /// it accepted: the lease goes to `to` with a new epoch. Refused once
    /// that handoff is withdrawn, so a late or repeated completion never
    /// moves a shard whose owner took writes again.
    CompleteHandoff {
        stream: String,
        shard: i32,
        to: BrokerId,
        expected_epoch: u64,
        handoff_id: u64,
    },
    /// Withdraw a handoff the owner did not finish in time (it could not
    /// commit what it holds): the owner keeps the shard and its epoch.
    CancelHandoff {
        stream: String,
        shard: i32,
        expected_epoch: u64,
    },
    /// Register one flushed object holding ranges of many shards.
    CommitSegment(SegmentCommit),
    /// Stop a shard's writes: records it acknowledged are lost (a damaged
    /// write-ahead log). Stays until [`Command::ResumeShard`].
    StopShard {
        stream: String,
        shard: i32,
        reason: String,
        now_ms: i64,
    },
    /// An operator accepts the loss of a stopped shard: it takes writes again.
    ResumeShard {
        stream: String,
        shard: i32,
    },
    CommitOffsets {
        group: String,
        offsets: Vec<OffsetCommit>,
        now_ms: i64,
        /// The epoch of the coordinator whose group member committed (see
        /// [`Command::ClaimGroup`]); `None` for a commit outside group
        /// membership, which any broker may make.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        coordinator_epoch: Option<u64>,
    },
    /// A broker starts coordinating `group`: the group's coordinator epoch
    /// goes up, and commits made under an older one are refused from now
    /// on, so a coordinator that lost its place (paused, cut off) cannot
    /// overwrite what its successor's members committed.
    ClaimGroup {
        group: String,
    },
    DeleteGroup {
        group: String,
    },
    AllocateProducerId,
    /// Take the compaction lease for `holder` (a new epoch) once the
    /// current one expired, or renew it (same epoch) for its holder.
    AcquireCompactionLease {
        holder: String,
        now_ms: i64,
        ttl_ms: i64,
    },
    /// Replace a run of one shard's index entries by the ranges of a
    /// compacted object, atomically, under the compaction lease.
    ReplaceSegments(SegmentReplacement),
    /// Move a shard's log start forward (retention, DeleteRecords): ranges
    /// wholly below it leave the index. With `compaction_epoch`, only under
    /// that compaction lease.
    AdvanceLogStart {
        stream: String,
        shard: i32,
        offset: i64,
        now_ms: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compaction_epoch: Option<u64>,
    },
    /// Garbage collection deleted these retired objects.
    ForgetRetired {
        compaction_epoch: u64,
        objects: Vec<String>,
    },
    /// The `retention.ms` of streams that do not set their own (created
    /// since this setting existed); -1 keeps everything.
    SetDefaultRetention {
        retention_ms: i64,
    },
    /// Persist MQTT publishes whose topics match `rule.filter` into
    /// `rule.stream` (replaces the rule with the same filter).
    PutMqttPersist {
        rule: crate::model::MqttPersistRule,
    },
    DeleteMqttPersist {
        filter: String,
    },
    /// What a compaction run did, for operators (the last few are kept).
    RecordCompactionRun {
        run: CompactionRun,
    },
    /// Add or replace `user`'s SCRAM credential for `mechanism`.
    PutScramCredential {
        user: String,
        mechanism: shoal_security::scram::ScramMechanism,
        credential: shoal_security::scram::ScramCredential,
    },
    DeleteScramCredential {
        user: String,
        mechanism: shoal_security::scram::ScramMechanism,
    },
    CreateAcls {
        bindings: Vec<shoal_security::acl::AclBinding>,
    },
    DeleteAcls {
        filters: Vec<shoal_security::acl::AclFilter>,
    },
    /// Replace the whole state with one recovered from the bucket.
    Restore {
        state: Box<crate::state::State>,
    },
}

#[cfg(test)]
impl Command {
    /// A one-shard stream, for tests.
    pub(crate) fn create_for_test(name: &str, partitions: i32) -> Command {
        Command::CreateStream {
            name: name.into(),
            partitions,
            config: BTreeMap::new(),
            id: 1,
            now_ms: 0,
            retention_default: true,
        }
    }
}

/// One flush: one object, a range per shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentCommit {
    pub broker: BrokerId,
    pub object: String,
    pub object_size: u64,
    pub shards: Vec<ShardCommit>,
    /// The committing broker's clock: when the ranges were registered.
    #[serde(default)]
    pub now_ms: i64,
}

/// The index entries of one shard a compacted object replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReplacement {
    pub compaction_epoch: u64,
    pub stream: String,
    pub shard: i32,
    /// The run being replaced, in index order, exactly as it is listed.
    pub replaced: Vec<RangeId>,
    /// The new entries: dense, covering exactly the replaced offsets.
    pub with: Vec<SegmentRef>,
    pub now_ms: i64,
}

/// Names one index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeId {
    pub object: String,
    pub row_group: u32,
    pub first_offset: i64,
    pub last_offset: i64,
}

impl RangeId {
    pub fn of(r: &SegmentRef) -> Self {
        Self {
            object: r.object.clone(),
            row_group: r.row_group,
            first_offset: r.first_offset,
            last_offset: r.last_offset,
        }
    }

    pub fn names(&self, r: &SegmentRef) -> bool {
        self.object == r.object
            && self.row_group == r.row_group
            && self.first_offset == r.first_offset
            && self.last_offset == r.last_offset
    }
}

/// One compaction run's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionRun {
    pub holder: String,
    pub epoch: u64,
    pub started_ms: i64,
    pub duration_ms: u64,
    /// Distinct objects whose ranges this run rewrote.
    pub objects_in: u64,
    pub objects_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Shards whose log start moved (retention).
    pub shards_trimmed: u64,
    pub objects_deleted: u64,
    /// Work left for the next run (a deadline or a budget ended this one).
    pub unfinished: bool,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCommit {
    pub stream: String,
    pub shard: i32,
    /// The lease epoch the broker wrote under; stale epochs are rejected.
    pub epoch: u64,
    pub row_group: u32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub record_count: u64,
    pub min_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    /// The state of every producer that wrote in this range, after its
    /// last record (the others are unchanged).
    pub producers: BTreeMap<i64, ProducerState>,
    /// Producers whose state the owner expired since its last commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired_producers: Vec<i64>,
    /// Compressed size of the range's row group.
    #[serde(default)]
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetCommit {
    pub stream: String,
    pub shard: i32,
    pub offset: i64,
    pub metadata: String,
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: internally tagged enums buffer their content and then
// cannot read maps with integer keys (producer ids, partitions) from JSON.
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done,
    Stream {
        stream: Stream,
    },
    Lease {
        epoch: u64,
    },
    /// Shards of a segment commit that were refused (stale epoch or a gap);
    /// the others were registered.
    SegmentCommitted {
        rejected: Vec<ShardRejection>,
    },
    ProducerId {
        id: i64,
    },
    GroupEpoch {
        epoch: u64,
    },
    CompactionLease {
        epoch: u64,
        expires_ms: i64,
    },
    LogStart {
        offset: i64,
    },
    Rejected {
        rejection: Rejection,
    },
    /// Per DeleteAcls filter, the bindings it removed.
    AclsDeleted {
        deleted: Vec<Vec<shoal_security::acl::AclBinding>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRejection {
    pub stream: String,
    pub shard: i32,
    pub rejection: Rejection,
}

/// Why a command was refused. Data, not an error: it is replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    #[error("stream {name} already exists")]
    StreamExists { name: String },
    #[error("stream {name} does not exist")]
    UnknownStream { name: String },
    #[error("shard {stream}/{shard} does not exist")]
    UnknownShard { stream: String, shard: i32 },
    #[error("invalid partition count {count}: {reason}")]
    InvalidPartitions { count: i32, reason: String },
    #[error("stale epoch {epoch} for {stream}/{shard}, current is {current}")]
    StaleEpoch {
        stream: String,
        shard: i32,
        epoch: u64,
        current: u64,
    },
    #[error("offset gap on {stream}/{shard}: expected {expected}, got {got}")]
    OffsetGap {
        stream: String,
        shard: i32,
        expected: i64,
        got: i64,
    },
    #[error("group {group}: coordinator epoch {epoch} is stale, current is {current}")]
    StaleCoordinator {
        group: String,
        epoch: u64,
        current: u64,
    },
    #[error("no handoff {handoff_id} of {stream}/{shard} to broker {to} is pending")]
    NoSuchHandoff {
        stream: String,
        shard: i32,
        to: BrokerId,
        handoff_id: u64,
    },
    #[error("the compaction lease is held by {holder} until {until_ms}")]
    CompactionLeaseHeld { holder: String, until_ms: i64 },
    #[error("compaction epoch {epoch} is stale, current is {current}")]
    StaleCompaction { epoch: u64, current: u64 },
    #[error("the index of {stream}/{shard} no longer lists the replaced ranges")]
    IndexChanged { stream: String, shard: i32 },
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
    #[error("user {user} has no such credential")]
    UnknownCredential { user: String },
}

/// A read of the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: internally tagged enums buffer their content and then
// cannot read maps with integer keys (producer ids, partitions) from JSON.
#[serde(rename_all = "snake_case")]
pub enum Query {
    ListStreams,
    GetStream {
        name: String,
    },
    GroupOffsets {
        group: String,
    },
    ListGroups,
    ListBrokers,
    /// Every stream's per-shard `index_version` (cheap to poll).
    IndexVersions,
    /// Retired objects, the compaction lease, recent runs and the default
    /// retention.
    Lifecycle,
    /// The MQTT persistence rules, in the order they are tried.
    MqttPersist,
    /// Users and their credentials, unless `known` is the current version.
    /// Key material: only cluster nodes may ask (not operators' tokens).
    Security {
        known: Option<u64>,
    },
    /// Users with their mechanisms and iteration counts, and nothing
    /// secret (`shoal users list`).
    Users,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: internally tagged enums buffer their content and then
// cannot read maps with integer keys (producer ids, partitions) from JSON.
#[serde(rename_all = "snake_case")]
pub enum QueryReply {
    Streams {
        streams: Vec<Stream>,
    },
    Stream {
        stream: Option<Stream>,
    },
    /// stream -> shard -> offset
    GroupOffsets {
        offsets: BTreeMap<String, BTreeMap<i32, GroupOffset>>,
    },
    Groups {
        groups: Vec<String>,
    },
    Brokers {
        brokers: Vec<BrokerInfo>,
    },
    /// stream -> index_version of each shard, in shard order.
    IndexVersions {
        versions: BTreeMap<String, Vec<u64>>,
        /// The cluster-wide default `retention.ms` (it changes rarely and
        /// every broker needs it for DescribeConfigs).
        default_retention_ms: i64,
        /// Compaction totals, which every broker exports as metrics.
        #[serde(default)]
        compaction: crate::lifecycle::CompactionTotals,
    },
    Lifecycle {
        lifecycle: crate::lifecycle::Lifecycle,
    },
    MqttPersist {
        rules: Vec<crate::model::MqttPersistRule>,
    },
    Security {
        security: Option<crate::security::Security>,
    },
    /// user -> mechanism -> iterations
    Users {
        users: BTreeMap<String, BTreeMap<shoal_security::scram::ScramMechanism, u32>>,
    },
}
