//! MQTT and the log: publishes whose topics a persistence rule maps to a
//! stream become records of that stream (through the same append path as
//! Kafka Produce), and records Kafka clients write to such a stream reach
//! MQTT subscribers.
//!
//! Record layout: key = MQTT topic, value = payload, headers `mqtt.qos`,
//! `mqtt.retain`, every v5 user property under its own name, and the other
//! v5 properties as `mqtt.content_type`, `mqtt.response_topic`,
//! `mqtt.correlation_data`, `mqtt.payload_format`, `mqtt.message_expiry`.
//! The shard is Kafka's default partitioner's choice for the key (murmur2),
//! so an MQTT topic and a Kafka key with the same bytes share a shard.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_storage::{Header, Record as Row};

use super::hub::Hub;
use super::message::{Message, MessageProps};
use super::remote_append::{Delivery, RemoteAppender, RemoteRecord};
use crate::Broker;
use crate::error::{Error, Result};
use crate::shard::{Read, ShardLog};

/// The header every MQTT-written record carries; records without it came
/// from Kafka clients and are the ones delivered to MQTT subscribers.
pub(crate) const QOS_HEADER: &str = "mqtt.qos";

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
pub(crate) fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for a keyed record.
pub(crate) fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// The record an MQTT message becomes.
pub(crate) fn to_row(msg: &Message) -> Row {
    let mut headers = vec![
        Header {
            key: QOS_HEADER.into(),
            value: Some(Bytes::from(msg.qos.to_string())),
        },
        Header {
            key: "mqtt.retain".into(),
            value: Some(Bytes::from_static(if msg.retain {
                b"true"
            } else {
                b"false"
            })),
        },
    ];
    let p = &msg.props;
    let mut add = |k: &str, v: Bytes| {
        headers.push(Header {
            key: k.into(),
            value: Some(v),
        })
    };
    if let Some(c) = &p.content_type {
        add("mqtt.content_type", Bytes::from(c.clone()));
    }
    if let Some(t) = &p.response_topic {
        add("mqtt.response_topic", Bytes::from(t.clone()));
    }
    if let Some(d) = &p.correlation_data {
        add("mqtt.correlation_data", d.clone());
    }
    if let Some(f) = p.payload_format {
        add("mqtt.payload_format", Bytes::from(f.to_string()));
    }
    if let Some(e) = p.message_expiry {
        add("mqtt.message_expiry", Bytes::from(e.to_string()));
    }
    for (k, v) in &p.user {
        add(k, Bytes::from(v.clone()));
    }
    Row {
        offset: 0,
        timestamp_ms: msg.received_ms,
        key: Some(Bytes::from(msg.topic.as_bytes().to_vec())),
        value: Some(msg.payload.clone()),
        headers,
        producer_id: None,
        producer_epoch: None,
        sequence: None,
    }
}

/// An appended MQTT message, waiting for its durability point.
/// A publish on its way into its stream.
pub(crate) enum Appended {
    /// In this broker's shard.
    Here {
        shard: Arc<ShardLog>,
        accepted: crate::log::Accepted,
        durability: crate::Durability,
    },
    /// Sent to the broker that owns the shard; it says when it is durable.
    Owner {
        stream: Arc<str>,
        shard: i32,
        done: tokio::sync::oneshot::Receiver<Delivery>,
    },
}

impl Appended {
    pub(crate) async fn durable(self, timeout: Duration) -> Result<()> {
        match self {
            Appended::Here {
                shard,
                accepted,
                durability,
            } => crate::log::wait(&shard, accepted, durability, timeout)
                .await
                .map(|_| ()),
            Appended::Owner {
                stream,
                shard,
                done,
                // The sending task answers once its request (which has
                // `timeout` itself) ends; the record may first wait for the
                // requests before it.
            } => match tokio::time::timeout(timeout.saturating_mul(2), done).await {
                Ok(Ok(Delivery::Stored)) => Ok(()),
                Ok(_) => Err(Error::NotLeader {
                    stream: stream.to_string(),
                    shard,
                }),
                Err(_) => Err(Error::Timeout),
            },
        }
    }
}

/// Append `msg` to its shard of `stream`: here if this broker owns the
/// shard, else through `remote` to the broker that does.
pub(crate) fn append(
    broker: &Broker,
    remote: &RemoteAppender,
    stream: &str,
    msg: &Message,
) -> Result<Appended> {
    let s = broker
        .stream(stream)
        .ok_or_else(|| Error::UnknownStream(stream.to_string()))?;
    let index = partition_for(msg.topic.as_bytes(), s.partition_count());
    let Some(shard) = s.shard(index) else {
        let owner = s
            .partition(index)
            .and_then(|p| p.leader)
            .filter(|&b| b != broker.config.broker_id)
            .and_then(|b| broker.live_brokers().into_iter().find(|i| i.id == b));
        let Some(owner) = owner else {
            return Err(s.not_here(index));
        };
        let (tx, done) = tokio::sync::oneshot::channel();
        let sent = remote.send(RemoteRecord {
            broker: owner.id,
            addr: owner.http_addr,
            stream: Arc::from(stream),
            shard: index,
            row: to_row(msg),
            done: tx,
        });
        if !sent {
            return Err(Error::Backpressure {
                pending: 0,
                limit: 0,
            });
        }
        return Ok(Appended::Owner {
            stream: Arc::from(stream),
            shard: index,
            done,
        });
    };
    if !broker.lease_valid() {
        return Err(Error::NotLeader {
            stream: s.name.clone(),
            shard: index,
        });
    }
    let batch = crate::batch::from_rows(&[to_row(msg)])?;
    let accepted = crate::log::append(
        broker,
        shard,
        batch,
        crate::topic_config::is_compacted(&s.config),
    )?;
    Ok(Appended::Here {
        shard: shard.clone(),
        accepted,
        durability: broker.durability(&s),
    })
}

/// Records another broker sent for a shard this broker owns (see
/// [`super::remote_append`]): appended, and `Ok` once durable.
pub(crate) async fn append_for_peer(
    broker: &Broker,
    stream: &str,
    index: i32,
    records: Bytes,
    timeout: Duration,
) -> Result<()> {
    let s = broker
        .stream(stream)
        .ok_or_else(|| Error::UnknownStream(stream.to_string()))?;
    let shard = s.shard(index).ok_or_else(|| s.not_here(index))?;
    if !broker.lease_valid() {
        return Err(s.not_here(index));
    }
    let accepted = crate::log::append(
        broker,
        shard,
        records,
        crate::topic_config::is_compacted(&s.config),
    )?;
    crate::log::wait(shard, accepted, broker.durability(&s), timeout)
        .await
        .map(|_| ())
}

/// The MQTT message a Kafka-written record becomes: topic = key, payload =
/// value, QoS 1 (the record is durable), headers as user properties.
fn from_row(row: &Row) -> Option<Message> {
    if row.headers.iter().any(|h| h.key == QOS_HEADER) {
        // Written by MQTT and delivered live when it was published.
        return None;
    }
    let topic = std::str::from_utf8(row.key.as_deref()?).ok()?;
    if !super::topic::valid_name(topic) {
        return None;
    }
    let user = row
        .headers
        .iter()
        .filter_map(|h| {
            let v = std::str::from_utf8(h.value.as_deref().unwrap_or_default()).ok()?;
            Some((h.key.clone(), v.to_string()))
        })
        .collect();
    Some(Message {
        topic: Arc::from(topic),
        payload: row.value.clone().unwrap_or_default(),
        qos: 1,
        retain: false,
        props: MessageProps {
            user,
            ..MessageProps::default()
        },
        received_ms: row.timestamp_ms,
        origin: None,
    })
}

/// Deliver records that Kafka clients write to mapped streams to MQTT
/// subscribers, from the shards this broker owns. Each shard is followed
/// from its end when first seen, so a record is delivered once, live.
pub(crate) async fn bridge(
    broker: Arc<Broker>,
    hub: Arc<Hub>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // (stream, shard) -> (the log followed, next offset)
    let mut followed: HashMap<(String, i32), (Arc<ShardLog>, i64)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let streams: Vec<Arc<str>> = hub.rule_streams();
        let mut seen = Vec::new();
        for name in streams {
            let Some(s) = broker.stream(&name) else {
                continue;
            };
            for log in s.owned() {
                let key = (s.name.clone(), log.shard);
                seen.push(key.clone());
                let entry = followed
                    .entry(key)
                    .or_insert_with(|| (log.clone(), log.high_watermark()));
                if !Arc::ptr_eq(&entry.0, log) {
                    // A new lease of the shard: start again at its end.
                    *entry = (log.clone(), log.high_watermark());
                }
                entry.1 = deliver(&hub, log, entry.1);
            }
        }
        followed.retain(|k, _| seen.contains(k));
    }
}

/// Deliver what `log` has from `from` on; returns the next offset.
fn deliver(hub: &Hub, log: &ShardLog, mut from: i64) -> i64 {
    loop {
        match log.read(from, 1 << 20) {
            Read::Tail(batches) => {
                for b in &batches {
                    let Ok(rows) = crate::batch::to_rows(b) else {
                        continue;
                    };
                    for row in &rows {
                        if row.offset < from {
                            continue;
                        }
                        if let Some(m) = from_row(row) {
                            let now = crate::broker::now_ms();
                            hub.publish(m, now);
                        }
                        from = row.offset + 1;
                    }
                }
                if batches.is_empty() {
                    return from;
                }
            }
            // Fell behind into flushed segments (or the log moved on):
            // live delivery resumes at the end.
            Read::Segment(_) | Read::OutOfRange => return log.high_watermark(),
            Read::AtEnd => return from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58_897_971
        );
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }

    #[test]
    fn kafka_records_become_messages_and_mqtt_ones_do_not() {
        let msg = Message {
            topic: Arc::from("a/b"),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            props: MessageProps::default(),
            received_ms: 5,
            origin: None,
        };
        assert!(from_row(&to_row(&msg)).is_none());
        let mut row = to_row(&msg);
        row.headers.clear();
        let back = from_row(&row).unwrap();
        assert_eq!(&*back.topic, "a/b");
        assert_eq!(back.payload, msg.payload);
    }
}
