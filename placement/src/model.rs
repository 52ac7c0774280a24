//! The metadata the Placement Center holds: streams, shards, leases, the
//! segment index, consumer-group offsets and registered brokers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Identifies a broker (and, in standalone, the one node).
pub type BrokerId = u64;

/// How many recent batches per producer a shard remembers, as Kafka does, so
/// a retried batch that is not the newest is still recognised.
pub const PRODUCER_BATCH_MEMORY: usize = 5;

/// A stream (Kafka topic) with its shards (partitions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub name: String,
    /// Stable identity for protocols that name topics by id (Kafka topic ids).
    #[serde(with = "id_u128")]
    pub id: u128,
    pub config: BTreeMap<String, String>,
    pub created_ms: i64,
    pub shards: Vec<Shard>,
}

impl Stream {
    pub fn partitions(&self) -> i32 {
        i32::try_from(self.shards.len()).unwrap_or(i32::MAX)
    }
}

/// One shard: who owns it, under which epoch, and what is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub shard: i32,
    pub owner: Option<BrokerId>,
    /// Increases on every lease grant; index commits must carry the current one.
    pub epoch: u64,
    pub log_start_offset: i64,
    /// Next offset after the last record held in committed segments.
    pub committed_offset: i64,
    /// Live segment ranges, ordered by first_offset, dense.
    pub segments: Vec<SegmentRef>,
    /// Idempotent-producer state as of the last commit.
    pub producers: BTreeMap<i64, ProducerState>,
}

/// Where a contiguous offset range of a shard lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub object: String,
    pub row_group: u32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub epoch: u64,
    pub record_count: u64,
    pub min_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    /// Size of the whole object, so readers can skip a HEAD.
    pub object_size: u64,
}

/// The sequences an idempotent producer last wrote to one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub producer_epoch: i16,
    /// Most recent last, at most [`PRODUCER_BATCH_MEMORY`].
    pub batches: Vec<ProducerBatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerBatch {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: i64,
    pub last_offset: i64,
}

/// A committed consumer-group offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffset {
    pub offset: i64,
    pub metadata: String,
    pub commit_ms: i64,
}

/// A broker known to placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub id: BrokerId,
    pub kafka_addr: String,
    pub http_addr: String,
    pub registered_ms: i64,
}

/// Serde for 128-bit ids as decimal strings. serde buffers internally tagged
/// enums (`Command`, `Reply`) in a form that cannot hold a u128, so a numeric
/// id would not survive a JSON round trip (the Raft log, the HTTP API).
pub mod id_u128 {
    use std::fmt;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = u128;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 128-bit id as a decimal string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<u128, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u128, E> {
                Ok(u128::from(v))
            }
        }

        d.deserialize_any(IdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use crate::command::{Command, Reply};

    #[test]
    fn ids_survive_json_in_tagged_enums() {
        let cmd = Command::CreateStream {
            name: "a".into(),
            partitions: 1,
            config: Default::default(),
            id: u128::MAX,
            now_ms: 0,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), cmd);

        let mut state = crate::State::default();
        let reply = state.apply(cmd);
        assert!(matches!(reply, Reply::Stream { .. }));
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&json).unwrap(), reply);
    }
}
