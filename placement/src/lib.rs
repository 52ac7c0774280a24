//! Shoal's Placement Center: the one source of truth for metadata.
//!
//! Owns streams and shards, shard leases with fencing epochs, the segment
//! index (which objects hold which offset ranges), committed consumer-group
//! offsets, producer-id allocation and the broker registry. It never touches
//! message payloads.
//!
//! The deterministic state machine ([`State`], fed [`Command`]s, answering
//! [`Query`]s) is replicated with openraft; the Raft log, vote and snapshots
//! live in one fjall database per node. One node is standalone, three or
//! five form a cluster: the same code path.
//!
//! - [`PlacementNode`]: starts a node from a [`NodeConfig`]; writes go
//!   through the Raft leader, reads are linearizable on the leader.
//! - [`router`]: the node's HTTP API (brokers' API and Raft RPCs, axum).
//! - [`PlacementClient`]: in process to a standalone node, or over HTTP to a
//!   cluster, following the leader and retrying across leader changes.
//! - [`controller`]: broker heartbeats and liveness on the leader, and the
//!   controller that gives every shard a live owner and spreads them.

pub mod bucket;
pub mod client;
pub mod command;
pub mod controller;
pub mod error;
pub mod lifecycle;
mod mirror;
pub mod model;
pub mod node;
mod raft;
pub mod security;
pub mod server;
pub mod state;

pub use client::PlacementClient;
pub use command::{
    Command, CompactionRun, OffsetCommit, Query, QueryReply, RangeId, Rejection, Reply,
    SegmentCommit, SegmentReplacement, ShardCommit, ShardRejection,
};
pub use controller::{Heartbeat, HeartbeatReply, MqttRoute, ShardAssignment, StreamAssignment};
pub use error::{Error, Result};
pub use lifecycle::{CompactionLease, CompactionTotals, Lifecycle};
pub use model::{
    BrokerId, BrokerInfo, GroupOffset, MqttPersistRule, ProducerBatch, ProducerState, SegmentRef,
    Shard, ShardStop, Stream,
};
pub use node::{BrokerView, BucketConfig, ClusterView, NodeConfig, NodeStatus, PlacementNode};
pub use security::Security;
pub use server::router;
pub use state::State;
