//! What brokers ask of each other beyond forwarding publishes: a session
//! whose client reconnected to another broker moves there, and a broker
//! that starts beside others takes their retained messages.
//!
//! A client that connects without Clean Start to a broker that does not
//! hold its session makes that broker ask every other MQTT broker
//! (`POST /api/v1/mqtt/takeover`); the one holding it detaches it (closing
//! a connection still attached, with 0x8E) and answers with the session —
//! its record, in-flight and queued messages — as one Kafka record batch.
//! Retained messages come the same way (`GET /api/v1/mqtt/retained`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_storage::{Header, Record as Row};

use super::Mqtt;
use super::hub::{Handover, OtherUser, OutState, Outgoing, Queued};
use super::message::Message;
use super::store::{SessionRecord, keyed_row, message_from, message_headers};

/// How long a connecting client waits for the other brokers' answers.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a broker handing a session over waits for the record naming
/// the new holder (well within [`ASK_TIMEOUT`]).
pub(crate) const HANDOVER_DURABLE: Duration = Duration::from_secs(2);

/// The body of a takeover request.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TakeoverRequest {
    pub client: String,
    pub username: Option<String>,
    /// End the session rather than hand it over.
    #[serde(default)]
    pub discard: bool,
    /// The broker asking, which takes the session.
    #[serde(default)]
    pub asker: Option<u64>,
}

/// The first record of a handed-over session.
#[derive(Debug, Serialize, Deserialize)]
struct Head {
    record: SessionRecord,
    next_packet_id: u16,
    incoming_qos2: Vec<u16>,
    #[serde(default)]
    next_seq: u64,
}

fn row(offset: i64, key: String, value: Option<Bytes>, headers: Vec<Header>) -> Row {
    Row {
        offset,
        ..keyed_row(key, value, headers, 0)
    }
}

fn item_row(offset: i64, key: String, item: &Queued) -> Row {
    row(
        offset,
        key,
        Some(item.msg.payload.clone()),
        message_headers(&item.msg, item.qos, item.retain, &item.sub_ids),
    )
}

/// A session as one record batch: the head, then `i/{packet id}/{p|r}/{seq}`
/// for each message in flight (published, or released), then `q/{seq}`
/// for each queued one, oldest first (`seq`: its record in the state
/// stream, 0 for none).
pub(crate) fn encode(h: &Handover) -> crate::Result<Bytes> {
    let head = Head {
        record: h.record.clone(),
        next_packet_id: h.next_packet_id,
        incoming_qos2: h.incoming_qos2.clone(),
        next_seq: h.next_seq,
    };
    let head = serde_json::to_vec(&head).map_err(|e| crate::Error::Internal(e.to_string()))?;
    let mut rows = vec![row(0, "s".into(), Some(Bytes::from(head)), Vec::new())];
    for (pid, o) in &h.inflight {
        let state = match o.state {
            OutState::Published => 'p',
            OutState::Released => 'r',
        };
        let key = format!("i/{pid}/{state}/{}", o.item.seq);
        rows.push(item_row(rows.len() as i64, key, &o.item));
    }
    for item in &h.queue {
        rows.push(item_row(rows.len() as i64, format!("q/{}", item.seq), item));
    }
    crate::batch::from_rows(&rows)
}

fn queued(row: &Row) -> Option<Queued> {
    let (msg, qos, retain, sub_ids) = message_from(row)?;
    Some(Queued {
        msg: Arc::new(msg),
        qos,
        retain,
        sub_ids,
        seq: 0,
    })
}

/// [`encode`] undone; `None` if the body is not a session.
pub(crate) fn decode(body: Bytes) -> Option<Handover> {
    let mut rows = Vec::new();
    for b in crate::batch::split(body).ok()? {
        rows.extend(crate::batch::to_rows(&b).ok()?);
    }
    let mut rows = rows.into_iter();
    let first = rows.next()?;
    if first.key.as_deref() != Some(b"s") {
        return None;
    }
    let head: Head = serde_json::from_slice(first.value.as_deref()?).ok()?;
    let mut h = Handover {
        record: head.record,
        next_seq: head.next_seq,
        next_packet_id: head.next_packet_id,
        incoming_qos2: head.incoming_qos2,
        inflight: Vec::new(),
        queue: Vec::new(),
    };
    for r in rows {
        let key = std::str::from_utf8(r.key.as_deref()?).ok()?;
        let mut item = queued(&r)?;
        let (key, seq) = key.rsplit_once('/')?;
        item.seq = seq.parse().ok()?;
        if key == "q" {
            h.queue.push(item);
            continue;
        }
        let (pid, state) = key.strip_prefix("i/")?.split_once('/')?;
        let state = match state {
            "p" => OutState::Published,
            "r" => OutState::Released,
            _ => return None,
        };
        h.inflight
            .push((pid.parse().ok()?, Outgoing { item, state }));
    }
    Some(h)
}

/// What the other brokers said about a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asked {
    /// None of them has it, nor has the state stream.
    Absent,
    /// One had it (or the state stream); it is in this broker's hub now.
    Moved,
    /// It belongs to another user.
    OtherUser,
    /// A broker that may hold it did not answer: better no session now
    /// (the client tries again) than a new one beside the real one.
    Unavailable,
}

/// Ask every other MQTT broker for `client`'s session, then, if none has
/// it, the state stream (through the owner of the client's shard: the
/// broker that held the session may be gone). A session found is adopted
/// by this broker's hub.
pub(crate) async fn fetch(mqtt: &Mqtt, client: &Arc<str>, username: Option<&str>) -> Asked {
    let routes = &mqtt.broker.mqtt_routes;
    let body = TakeoverRequest {
        client: client.to_string(),
        username: username.map(str::to_string),
        discard: false,
        asker: Some(mqtt.broker.config.broker_id),
    };
    let asks = routes.peers().into_iter().filter_map(|b| {
        let addr = routes.addr(b)?;
        Some(ask(
            mqtt,
            format!(
                "{}/api/v1/mqtt/takeover",
                mqtt.broker.config.peer_auth.url(&addr)
            ),
            &body,
        ))
    });
    let mut outcome = Asked::Absent;
    for answer in futures::future::join_all(asks).await {
        outcome = merge(mqtt, client, outcome, answer);
    }
    if outcome != Asked::Absent {
        return outcome;
    }
    // No broker holds it: the state stream may (its broker died).
    let Some(owner) = state_owner(mqtt, client) else {
        return if mqtt.broker.stream(super::store::STREAM).is_some() {
            Asked::Unavailable
        } else {
            Asked::Absent
        };
    };
    let me = mqtt.broker.config.broker_id;
    if owner.id == me {
        let live: Vec<u64> = mqtt.broker.live_brokers().iter().map(|b| b.id).collect();
        if !mqtt
            .hub
            .reserve_stored(client, me, &live, crate::broker::now_ms())
        {
            return Asked::Unavailable;
        }
        let found = stored_session(&mqtt.broker, Some(&mqtt.state_index), client, username).await;
        if !matches!(found, Ok(Some(_))) {
            mqtt.hub.unreserve_stored(client, me);
        }
        return match found {
            Ok(Some(h)) => {
                mqtt.hub.adopt(client.clone(), h, crate::broker::now_ms());
                Asked::Moved
            }
            Ok(None) => Asked::Absent,
            Err(Some(OtherUser)) => Asked::OtherUser,
            Err(None) => Asked::Unavailable,
        };
    }
    let url = format!(
        "{}/api/v1/mqtt/stored",
        mqtt.broker.config.peer_auth.url(&owner.http_addr)
    );
    merge(mqtt, client, Asked::Absent, ask(mqtt, url, &body).await)
}

/// One broker's answer about a session.
enum Answer {
    Session(Bytes),
    NotThere,
    OtherUser,
    Silent,
}

async fn ask(mqtt: &Mqtt, url: String, body: &TakeoverRequest) -> Answer {
    let sent = mqtt
        .peers
        .post(url)
        .json(body)
        .timeout(ASK_TIMEOUT)
        .send()
        .await;
    let Ok(resp) = sent else {
        return Answer::Silent;
    };
    match resp.status() {
        reqwest::StatusCode::OK => match resp.bytes().await {
            Ok(b) => Answer::Session(b),
            Err(_) => Answer::Silent,
        },
        reqwest::StatusCode::NOT_FOUND => Answer::NotThere,
        reqwest::StatusCode::CONFLICT => Answer::OtherUser,
        _ => Answer::Silent,
    }
}

/// The outcome so far with one more answer.
fn merge(mqtt: &Mqtt, client: &Arc<str>, outcome: Asked, answer: Answer) -> Asked {
    match (answer, outcome) {
        (Answer::Session(_), Asked::Moved) => {
            // Kept by two brokers: the first one wins.
            tracing::warn!(client = %client, "two brokers held one MQTT session");
            Asked::Moved
        }
        (Answer::Session(body), _) => match decode(body) {
            Some(h) => {
                mqtt.hub.adopt(client.clone(), h, crate::broker::now_ms());
                Asked::Moved
            }
            None => {
                tracing::warn!(client = %client, "an MQTT session handover was unreadable");
                Asked::Unavailable
            }
        },
        (_, Asked::Moved) => Asked::Moved,
        (Answer::OtherUser, _) | (_, Asked::OtherUser) => Asked::OtherUser,
        (Answer::Silent, _) => Asked::Unavailable,
        (Answer::NotThere, o) => o,
    }
}

/// The live broker owning the state stream's shard of `client`.
fn state_owner(mqtt: &Mqtt, client: &str) -> Option<shoal_placement::BrokerInfo> {
    let s = mqtt.broker.stream(super::store::STREAM)?;
    let index = super::persist::partition_for(client.as_bytes(), s.partition_count());
    let owner = s.partition(index)?.leader?;
    mqtt.broker
        .live_brokers()
        .into_iter()
        .find(|b| b.id == owner)
}

/// `client`'s session from the state stream (this broker owns its shard).
/// `Err(Some(OtherUser))`: another user's; `Err(None)`: not readable now.
pub(crate) async fn stored_session(
    broker: &Arc<crate::Broker>,
    index: Option<&super::store::StateIndex>,
    client: &str,
    username: Option<&str>,
) -> Result<Option<Handover>, Option<OtherUser>> {
    let loaded = super::store::load_session(broker, index, client)
        .await
        .map_err(|e| {
            tracing::warn!(client, "reading a stored MQTT session: {e}");
            None
        })?;
    let Some((_, record, queue)) = loaded else {
        return Ok(None);
    };
    if record.username.as_deref() != username {
        return Err(Some(OtherUser));
    }
    let next_seq = queue.iter().map(|(s, _)| s + 1).max().unwrap_or(1);
    Ok(Some(Handover {
        record,
        next_seq,
        next_packet_id: 0,
        incoming_qos2: Vec::new(),
        inflight: Vec::new(),
        queue: queue
            .into_iter()
            .map(|(seq, mut q)| {
                q.seq = seq;
                q
            })
            .collect(),
    }))
}

/// Tell every other MQTT broker to end `client`'s session, if it has one
/// (its client connected here with Clean Start).
pub(crate) async fn discard(mqtt: Arc<Mqtt>, client: Arc<str>, username: Option<String>) {
    let routes = &mqtt.broker.mqtt_routes;
    let body = TakeoverRequest {
        client: client.to_string(),
        username,
        discard: true,
        asker: Some(mqtt.broker.config.broker_id),
    };
    let asks = routes.peers().into_iter().filter_map(|b| {
        let addr = routes.addr(b)?;
        Some(
            mqtt.peers
                .post(format!(
                    "{}/api/v1/mqtt/takeover",
                    mqtt.broker.config.peer_auth.url(&addr)
                ))
                .json(&body)
                .timeout(ASK_TIMEOUT)
                .send(),
        )
    });
    futures::future::join_all(asks).await;
}

/// Retained messages as one record batch (the payload is the value).
pub(crate) fn encode_retained(msgs: &[Arc<Message>]) -> crate::Result<Bytes> {
    let rows: Vec<Row> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            row(
                i as i64,
                String::new(),
                Some(m.payload.clone()),
                message_headers(m, m.qos, true, &[]),
            )
        })
        .collect();
    crate::batch::from_rows(&rows)
}

fn decode_retained(body: Bytes) -> Option<Vec<Message>> {
    let mut out = Vec::new();
    for b in crate::batch::split(body).ok()? {
        for r in crate::batch::to_rows(&b).ok()? {
            let (msg, ..) = message_from(&r)?;
            if !super::topic::valid_name(&msg.topic) {
                return None;
            }
            out.push(msg);
        }
    }
    Some(out)
}

/// Once the other brokers are known (their routes come with the first
/// heartbeats), take their retained messages. Retained messages published
/// after this reach every broker as they are published.
pub(crate) async fn sync_retained(
    mqtt: Arc<Mqtt>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let routes = mqtt.broker.mqtt_routes.clone();
    // A few heartbeats: long enough for a cluster's routes to arrive;
    // alone, there is no one to ask.
    for _ in 0..40 {
        if routes.has_peers() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return,
        }
    }
    for b in routes.peers() {
        let Some(addr) = routes.addr(b) else {
            continue;
        };
        let got = async {
            let resp = mqtt
                .peers
                .get(format!(
                    "{}/api/v1/mqtt/retained",
                    mqtt.broker.config.peer_auth.url(&addr)
                ))
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            decode_retained(resp.bytes().await.ok()?)
        };
        match got.await {
            Some(msgs) => {
                let n = mqtt.hub.merge_retained(msgs);
                tracing::info!(
                    broker = b,
                    taken = n,
                    "MQTT retained messages taken from a peer"
                );
            }
            None => tracing::warn!(broker = b, "could not read a peer's MQTT retained messages"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::store::SubRecord;

    fn item(topic: &str, qos: u8) -> Queued {
        Queued {
            msg: Arc::new(Message {
                topic: Arc::from(topic),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                props: Default::default(),
                received_ms: 5,
                origin: None,
            }),
            qos,
            retain: false,
            sub_ids: vec![7],
            seq: 0,
        }
    }

    #[test]
    fn a_session_survives_its_trip_between_brokers() {
        let h = Handover {
            record: SessionRecord {
                subs: vec![SubRecord {
                    filter: "a/#".into(),
                    qos: 2,
                    no_local: true,
                    retain_as_published: false,
                    retain_handling: 1,
                    id: Some(7),
                }],
                expiry_secs: 300,
                disconnected_ms: Some(9),
                username: Some("u".into()),
                holder: None,
                first_seq: 0,
            },
            next_seq: 12,
            next_packet_id: 41,
            incoming_qos2: vec![3],
            inflight: vec![
                (
                    40,
                    Outgoing {
                        item: item("a/1", 1),
                        state: OutState::Published,
                    },
                ),
                (
                    41,
                    Outgoing {
                        item: item("a/2", 2),
                        state: OutState::Released,
                    },
                ),
            ],
            queue: vec![item("a/3", 1), item("a/4", 0)],
        };
        let mut h = h;
        h.queue[0].seq = 11;
        let back = decode(encode(&h).unwrap()).unwrap();
        assert_eq!(back.record, h.record);
        assert_eq!((back.next_packet_id, back.incoming_qos2), (41, vec![3]));
        assert_eq!(back.next_seq, 12);
        let seqs: Vec<u64> = back.queue.iter().map(|q| q.seq).collect();
        assert_eq!(seqs, vec![11, 0]);
        let inflight: Vec<(u16, OutState, &str)> = back
            .inflight
            .iter()
            .map(|(p, o)| (*p, o.state, &*o.item.msg.topic))
            .collect();
        assert_eq!(
            inflight,
            vec![
                (40, OutState::Published, "a/1"),
                (41, OutState::Released, "a/2")
            ]
        );
        let queue: Vec<(&str, u8, Vec<u32>)> = back
            .queue
            .iter()
            .map(|q| (&*q.msg.topic, q.qos, q.sub_ids.clone()))
            .collect();
        assert_eq!(queue, vec![("a/3", 1, vec![7]), ("a/4", 0, vec![7])]);
        assert!(decode(Bytes::from_static(b"junk")).is_none());
    }
}
