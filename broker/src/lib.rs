//! Shoal's broker: protocol compute over shards it holds leases for.
//!
//! Owns the Kafka listener and its handlers, the produce pipeline (validate,
//! assign offsets, WAL group commit, acknowledge by durability), fetch from
//! the in-memory tail / cache / Parquet segments, the flusher that turns all
//! un-flushed batches into one segment object and one placement commit, and
//! the consumer-group coordinator. It keeps no state that cannot be rebuilt
//! from placement, object storage and its own WAL.
//!
//! It does not own metadata (placement does), the Parquet format or object
//! stores (storage does), or the WAL and cache mechanics (wal-cache does).
//!
//! Main types: [`Broker`], [`BrokerConfig`], [`ShardLog`](shard::ShardLog),
//! [`Coordinator`](group::Coordinator); entry points [`kafka::serve`],
//! [`flusher::run`], [`http::router`].

pub mod batch;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod decompress;
mod encoder;
pub mod error;
pub mod flusher;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod group;
pub mod http;
pub mod index;
pub mod kafka;
mod log;
pub mod metrics;
pub mod mqtt;
pub mod producer;
mod quarantine;
pub mod security;
mod segment_load;
pub mod shard;
pub mod topic_config;

pub use broker::Broker;
pub use config::{BrokerConfig, Durability};
pub use error::{Error, Result};

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Drive the group coordinator's timers (session expiry, rebalance deadlines).
pub async fn run_group_ticker(
    broker: Arc<Broker>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => broker.groups.tick(Instant::now()),
            _ = shutdown.changed() => return,
        }
    }
}
