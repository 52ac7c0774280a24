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
    /// Created after the cluster-wide default retention existed: without
    /// its own `retention.ms` the stream follows that default. Streams
    /// from before keep unlimited retention, so an upgrade deletes nothing.
    #[serde(default)]
    pub retention_default: bool,
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
    /// A rebalance asked the owner to hand the shard to this broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_to: Option<BrokerId>,
    /// How many handoffs were ever asked for: names the pending one, so a
    /// completion meant for a withdrawn request never applies to a later one.
    #[serde(default)]
    pub handoff_id: u64,
    /// The shard takes no writes: records it acknowledged were found
    /// unreadable (a damaged write-ahead log). Cleared only by an operator
    /// who accepts the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<ShardStop>,
    /// Bumped whenever the segment index or the log start changes other
    /// than by the owner's own commits (compaction, retention, deleted
    /// records), so the owner knows to reload them.
    #[serde(default)]
    pub index_version: u64,
}

/// Why and since when a shard is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStop {
    pub reason: String,
    pub since_ms: i64,
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
    /// When placement registered the range (committing clock, ms); 0 for
    /// ranges committed before this was recorded.
    #[serde(default)]
    pub committed_ms: i64,
    /// Compressed bytes of the range's row group (0 when unknown, before
    /// this was recorded): what `retention.bytes` and compaction count.
    #[serde(default)]
    pub bytes: u64,
}

/// The sequences an idempotent producer last wrote to one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub producer_epoch: i16,
    /// Most recent last, at most [`PRODUCER_BATCH_MEMORY`].
    pub batches: Vec<ProducerBatch>,
    /// When the owner last accepted a batch of this producer (its clock,
    /// ms): the state expires `producer.id.expiration.ms` after it.
    #[serde(default)]
    pub last_write_ms: i64,
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
    /// host:port of the broker's first Kafka listener.
    pub kafka_addr: String,
    pub http_addr: String,
    pub registered_ms: i64,
    /// Listener name (its security protocol) -> advertised host:port, when
    /// the broker has several; clients are told the one they connected to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kafka_listeners: BTreeMap<String, String>,
}

impl BrokerInfo {
    /// Where clients of `listener` reach this broker; `None` when it has
    /// listeners but not that one (a client must not be sent to another
    /// listener, e.g. a plaintext one).
    pub fn kafka_addr_for(&self, listener: &str) -> Option<&str> {
        if self.kafka_listeners.is_empty() {
            return Some(&self.kafka_addr);
        }
        self.kafka_listeners.get(listener).map(String::as_str)
    }
}

/// Serde for 128-bit ids as decimal strings: most JSON tools read numbers as
/// f64 and would corrupt them, and serde cannot read a u128 back inside an
/// internally tagged or untagged enum.
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
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::fmt::Debug;

    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{GroupOffset, ProducerBatch, ProducerState};
    use crate::command::{Command, Query, QueryReply, Reply, SegmentCommit, ShardCommit};

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let json = serde_json::to_string(value).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), value, "{json}");
    }

    /// Everything that crosses the Raft log or the HTTP API as JSON comes
    /// back equal: 128-bit ids and maps with integer keys included.
    #[test]
    fn commands_and_replies_survive_json() {
        let create = Command::CreateStream {
            name: "a".into(),
            partitions: 1,
            config: BTreeMap::new(),
            id: u128::MAX,
            now_ms: 0,
            retention_default: true,
        };
        round_trip(&create);
        let producers = BTreeMap::from([(
            7_i64,
            ProducerState {
                producer_epoch: 2,
                last_write_ms: 5,
                batches: vec![ProducerBatch {
                    first_sequence: 0,
                    last_sequence: 4,
                    base_offset: 0,
                    last_offset: 4,
                }],
            },
        )]);
        let commit = Command::CommitSegment(SegmentCommit {
            broker: 1,
            object: "o".into(),
            object_size: 10,
            shards: vec![ShardCommit {
                stream: "a".into(),
                shard: 0,
                epoch: 1,
                row_group: 0,
                first_offset: 0,
                last_offset: 4,
                record_count: 5,
                min_timestamp_ms: 0,
                max_timestamp_ms: 0,
                producers,
                expired_producers: vec![3],
                bytes: 9,
            }],
            now_ms: 4,
        });
        round_trip(&commit);
        round_trip(&Command::AllocateProducerId);
        round_trip(&Query::ListStreams);

        let mut state = crate::State::default();
        state.apply(create);
        state.apply(Command::AcquireLease {
            stream: "a".into(),
            shard: 0,
            broker: 1,
        });
        round_trip(&state.apply(commit));
        let Reply::Stream { stream } = state.apply(Command::AlterStreamConfig {
            name: "a".into(),
            set: BTreeMap::new(),
            remove: Vec::new(),
        }) else {
            panic!("no stream")
        };
        assert!(!stream.shards[0].producers.is_empty());
        round_trip(&Reply::Stream { stream });
        round_trip(&state.query(&Query::ListStreams));
        round_trip(&QueryReply::GroupOffsets {
            offsets: BTreeMap::from([(
                "a".to_string(),
                BTreeMap::from([(
                    3,
                    GroupOffset {
                        offset: 9,
                        metadata: String::new(),
                        commit_ms: 1,
                    },
                )]),
            )]),
        });
        round_trip(&state);
    }
}

/// Where MQTT publishes go in the log: messages whose topic matches
/// `filter` become records of `stream` (created with `shards` shards).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttPersistRule {
    pub filter: String,
    pub stream: String,
    pub shards: i32,
}
