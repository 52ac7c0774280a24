//! Durable MQTT state: persistent sessions, the messages queued for them
//! and retained messages, kept as records of one compacted internal stream
//! (`__mqtt_state`), so they scale with the log rather than with placement's
//! memory, and the compactor keeps only the newest record per key.
//!
//! Keys: `s/{client}` (the session: subscriptions, expiry, when it was
//! left), `q/{client}/{seq}` (a queued QoS 1/2 message), `r/{topic}` (a
//! retained message). A null value deletes. A client's records all go to
//! the shard of its id, so their order holds; a topic's to the shard of
//! the topic.
//!
//! The hub records what changed as [`Op`]s; [`run`] appends them in
//! batches and publishes how far they are durable, which acknowledgements
//! to publishers wait for. At start, [`load`] reads the stream back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_storage::{Header, Record as Row};

use super::hub::{ClientId, Hub, Queued, SubOpts};
use super::message::{Message, MessageProps};
use super::remote_append::{Delivery, RemoteAppender, RemoteRecord};
use crate::Broker;
use crate::error::{Error, Result};
use crate::shard::Read;

/// The internal stream.
pub(crate) const STREAM: &str = "__mqtt_state";
const SHARDS: i32 = 4;

/// A change to durable state.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Session {
        client: ClientId,
        record: Option<SessionRecord>,
    },
    Queue {
        client: ClientId,
        seq: u64,
        item: Option<Queued>,
    },
    Retained {
        topic: Arc<str>,
        msg: Option<Arc<Message>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubRecord {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub id: Option<u32>,
}

impl SubRecord {
    pub(crate) fn new(filter: &str, o: &SubOpts) -> Self {
        SubRecord {
            filter: filter.to_string(),
            qos: o.qos,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling,
            id: o.id,
        }
    }

    pub(crate) fn opts(&self) -> SubOpts {
        SubOpts {
            qos: self.qos.min(2),
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling.min(2),
            id: self.id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    pub subs: Vec<SubRecord>,
    pub expiry_secs: u32,
    /// When its connection ended; `None` while connected.
    pub disconnected_ms: Option<i64>,
    pub username: Option<String>,
    /// The broker holding the session when this record was written (set
    /// by the writer); in a cluster another broker's live session is not
    /// restored at start.
    #[serde(default)]
    pub holder: Option<u64>,
    /// The sequence number of the session's first queued message: records
    /// of a session this one replaced (Clean Start) have lower ones.
    #[serde(default)]
    pub first_seq: u64,
}

/// A session read back: its id, record and queued messages by sequence.
pub(crate) type LoadedSession = (ClientId, SessionRecord, Vec<(u64, Queued)>);

/// What [`load`] found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub sessions: Vec<LoadedSession>,
    pub retained: Vec<Arc<Message>>,
    /// Queued messages whose session is gone: (client, seq).
    pub orphans: Vec<(ClientId, u64)>,
}

/// Which clients have a session record in the state shards this broker
/// owns, so that looking up a client without one does not read a whole
/// shard. Each entry belongs to one lease of its shard (its epoch): it
/// answers only for that lease, once a full read made under it is merged,
/// and notes the records appended meanwhile. It may name a client whose
/// record is gone (then the shard is read), never miss one.
#[derive(Default)]
pub(crate) struct StateIndex {
    shards: parking_lot::Mutex<HashMap<i32, IndexEntry>>,
}

#[derive(Default)]
struct IndexEntry {
    epoch: u64,
    /// A full read under this epoch was merged.
    read: bool,
    clients: std::collections::HashSet<ClientId>,
}

/// The shards (and their epochs) one full read covers.
pub(crate) type ReadToken = Vec<(i32, u64)>;

impl StateIndex {
    /// These shard leases are about to be read in full: entries of other
    /// shards or older leases go.
    pub(crate) fn begin(&self, owned: &[(i32, u64)]) -> ReadToken {
        let mut shards = self.shards.lock();
        shards.retain(|s, e| owned.contains(&(*s, e.epoch)));
        for &(s, epoch) in owned {
            shards.entry(s).or_insert_with(|| IndexEntry {
                epoch,
                ..IndexEntry::default()
            });
        }
        owned.to_vec()
    }

    /// Records appended to `shard` under lease `epoch`.
    pub(crate) fn note(&self, shard: i32, epoch: u64, rows: &[Row]) {
        let mut shards = self.shards.lock();
        let e = shards.entry(shard).or_default();
        if e.epoch != epoch {
            // A new lease: what was known goes with the old one.
            *e = IndexEntry {
                epoch,
                ..IndexEntry::default()
            };
        }
        for r in rows {
            let Some(client) = r
                .key
                .as_deref()
                .and_then(|k| k.strip_prefix(b"s/"))
                .and_then(|c| std::str::from_utf8(c).ok())
            else {
                continue;
            };
            if r.value.is_some() {
                e.clients.insert(Arc::from(client));
            } else {
                e.clients.remove(client);
            }
        }
    }

    /// The read begun with `token` found these clients' records.
    pub(crate) fn merge(&self, token: &ReadToken, partitions: i32, found: &[ClientId]) {
        let mut shards = self.shards.lock();
        for c in found {
            let shard = super::persist::partition_for(c.as_bytes(), partitions);
            if let Some(e) = shards.get_mut(&shard)
                && token.contains(&(shard, e.epoch))
            {
                e.clients.insert(c.clone());
            }
        }
        for (s, epoch) in token {
            if let Some(e) = shards.get_mut(s)
                && e.epoch == *epoch
            {
                e.read = true;
            }
        }
    }

    /// Might `shard`, under lease `epoch`, hold a record of `client`'s
    /// session?
    pub(crate) fn may_have(&self, shard: i32, epoch: u64, client: &str) -> bool {
        match self.shards.lock().get(&shard) {
            Some(e) if e.read && e.epoch == epoch => e.clients.contains(client),
            _ => true,
        }
    }
}

/// The clients with a session record among the newest records.
fn stored_clients(latest: &HashMap<Bytes, Row>) -> Vec<ClientId> {
    latest
        .iter()
        .filter(|(_, r)| r.value.is_some())
        .filter_map(|(k, _)| k.strip_prefix(b"s/"))
        .filter_map(|c| std::str::from_utf8(c).ok())
        .map(Arc::from)
        .collect()
}

/// The state shards this broker owns, with their lease epochs.
pub(crate) fn owned_shards(broker: &Broker) -> Vec<(i32, u64)> {
    broker
        .stream(STREAM)
        .map(|s| s.owned().map(|l| (l.shard, l.epoch())).collect())
        .unwrap_or_default()
}

/// The newest record per key of the state shards this broker owns, read
/// in full (and merged into the index).
async fn read_owned(broker: &Arc<Broker>, index: &StateIndex) -> Result<HashMap<Bytes, Row>> {
    let mut latest: HashMap<Bytes, Row> = HashMap::new();
    let Some(s) = broker.stream(STREAM) else {
        return Ok(latest);
    };
    let logs: Vec<_> = s.owned().cloned().collect();
    let token = index.begin(
        &logs
            .iter()
            .map(|l| (l.shard, l.epoch()))
            .collect::<Vec<_>>(),
    );
    for log in &logs {
        for r in read_all(broker, log).await? {
            if let Some(k) = r.key.clone() {
                latest.insert(k, r);
            }
        }
    }
    index.merge(&token, s.partition_count(), &stored_clients(&latest));
    Ok(latest)
}

fn route_key(op: &Op) -> &[u8] {
    match op {
        Op::Session { client, .. } | Op::Queue { client, .. } => client.as_bytes(),
        Op::Retained { topic, .. } => topic.as_bytes(),
    }
}

fn header(k: &str, v: impl Into<Bytes>) -> Header {
    Header {
        key: k.into(),
        value: Some(v.into()),
    }
}

/// A message's fields as record headers (the payload is the value).
/// `qos`, `retain`: how it is delivered, when that differs from the
/// message's own (a queued copy).
pub(crate) fn message_headers(
    msg: &Message,
    qos: u8,
    retain: bool,
    sub_ids: &[u32],
) -> Vec<Header> {
    let flag = |b: bool| if b { "true" } else { "false" };
    let mut h = vec![
        header("mqtt.topic", msg.topic.as_bytes().to_vec()),
        header("mqtt.qos", msg.qos.to_string()),
        header("mqtt.retain", flag(msg.retain)),
        header("mqtt.received_ms", msg.received_ms.to_string()),
        header("mqtt.delivery_qos", qos.to_string()),
        header("mqtt.delivery_retain", flag(retain)),
    ];
    if let Some(o) = &msg.origin {
        h.push(header("mqtt.origin", o.as_bytes().to_vec()));
    }
    if !sub_ids.is_empty() {
        let ids: Vec<String> = sub_ids.iter().map(u32::to_string).collect();
        h.push(header("mqtt.sub_ids", ids.join(",")));
    }
    let p = &msg.props;
    if let Some(v) = p.payload_format {
        h.push(header("mqtt.payload_format", v.to_string()));
    }
    if let Some(v) = p.message_expiry {
        h.push(header("mqtt.message_expiry", v.to_string()));
    }
    if let Some(v) = &p.content_type {
        h.push(header("mqtt.content_type", v.clone()));
    }
    if let Some(v) = &p.response_topic {
        h.push(header("mqtt.response_topic", v.clone()));
    }
    if let Some(v) = &p.correlation_data {
        h.push(header("mqtt.correlation_data", v.clone()));
    }
    if !p.user.is_empty() {
        // One header: record headers cannot repeat a name, user properties can.
        if let Ok(json) = serde_json::to_vec(&p.user) {
            h.push(header("mqtt.user", json));
        }
    }
    h
}

/// The message, delivery QoS, retain flag and subscription ids in a record.
pub(crate) fn message_from(row: &Row) -> Option<(Message, u8, bool, Vec<u32>)> {
    let get = |k: &str| {
        row.headers
            .iter()
            .find(|h| h.key == k)
            .and_then(|h| h.value.as_ref())
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let topic = get("mqtt.topic")?;
    let own_qos: u8 = get("mqtt.qos")?.parse().ok()?;
    let own_retain = get("mqtt.retain") == Some("true");
    let qos: u8 = get("mqtt.delivery_qos")?.parse().ok()?;
    let retain = get("mqtt.delivery_retain") == Some("true");
    let received_ms: i64 = get("mqtt.received_ms")?.parse().ok()?;
    let sub_ids = get("mqtt.sub_ids")
        .map(|s| s.split(',').filter_map(|i| i.parse().ok()).collect())
        .unwrap_or_default();
    let props = MessageProps {
        payload_format: get("mqtt.payload_format").and_then(|v| v.parse().ok()),
        message_expiry: get("mqtt.message_expiry").and_then(|v| v.parse().ok()),
        content_type: get("mqtt.content_type").map(str::to_string),
        response_topic: get("mqtt.response_topic").map(str::to_string),
        correlation_data: row
            .headers
            .iter()
            .find(|h| h.key == "mqtt.correlation_data")
            .and_then(|h| h.value.clone()),
        user: row
            .headers
            .iter()
            .find(|h| h.key == "mqtt.user")
            .and_then(|h| h.value.as_deref())
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default(),
    };
    let msg = Message {
        topic: Arc::from(topic),
        payload: row.value.clone().unwrap_or_default(),
        qos: own_qos.min(2),
        retain: own_retain,
        props,
        received_ms,
        origin: get("mqtt.origin").map(Arc::from),
    };
    Some((msg, qos.min(2), retain, sub_ids))
}

fn to_row(op: &Op, now_ms: i64, me: u64) -> Row {
    let (key, value, headers) = match op {
        Op::Session { client, record } => (
            format!("s/{client}"),
            record
                .as_ref()
                .and_then(|r| {
                    serde_json::to_vec(&SessionRecord {
                        holder: r.holder.or(Some(me)),
                        ..r.clone()
                    })
                    .ok()
                })
                .map(Bytes::from),
            Vec::new(),
        ),
        Op::Queue { client, seq, item } => (
            format!("q/{client}/{seq}"),
            item.as_ref().map(|i| i.msg.payload.clone()),
            item.as_ref()
                .map(|i| message_headers(&i.msg, i.qos, i.retain, &i.sub_ids))
                .unwrap_or_default(),
        ),
        Op::Retained { topic, msg } => (
            format!("r/{topic}"),
            msg.as_ref().map(|m| m.payload.clone()),
            msg.as_ref()
                .map(|m| message_headers(m, m.qos, true, &[]))
                .unwrap_or_default(),
        ),
    };
    keyed_row(key, value, headers, now_ms)
}

/// A record of MQTT state: a key, a value (none deletes), headers.
pub(crate) fn keyed_row(
    key: String,
    value: Option<Bytes>,
    headers: Vec<Header>,
    timestamp_ms: i64,
) -> Row {
    Row {
        offset: 0,
        timestamp_ms,
        key: Some(Bytes::from(key)),
        value,
        headers,
        producer_id: None,
        producer_epoch: None,
        sequence: None,
    }
}

/// Create the stream if it is missing.
pub(crate) async fn ensure_stream(broker: &Arc<Broker>) -> Result<()> {
    if broker.stream(STREAM).is_some() {
        return Ok(());
    }
    let config = BTreeMap::from([("cleanup.policy".to_string(), "compact".to_string())]);
    match broker.create_stream(STREAM, SHARDS, config, false).await {
        Ok(_) | Err(Error::StreamExists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every record of `shard` from its log start to its end, oldest first.
async fn read_all(broker: &Broker, log: &crate::shard::ShardLog) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut offset = log.log_start_offset();
    loop {
        match log.read(offset, 4 << 20) {
            Read::Tail(batches) => {
                if batches.is_empty() {
                    return Ok(rows);
                }
                for b in &batches {
                    match crate::batch::to_rows(b) {
                        Ok(decoded) => {
                            for r in decoded {
                                if r.offset >= offset {
                                    offset = r.offset + 1;
                                    rows.push(r);
                                }
                            }
                        }
                        Err(e) => {
                            // One bad batch must not keep MQTT (and the
                            // broker) from starting: it is skipped, loudly.
                            tracing::error!(
                                shard = log.shard,
                                "an unreadable MQTT state batch is skipped: {e}"
                            );
                            let last_delta = b
                                .get(23..27)
                                .and_then(|d| <[u8; 4]>::try_from(d).ok())
                                .map_or(0, i32::from_be_bytes);
                            offset = offset.max(
                                crate::batch::base_offset(b) + i64::from(last_delta.max(0)) + 1,
                            );
                        }
                    }
                }
            }
            Read::Segment(seg) => {
                let bytes = broker.read_segment(&seg).await?;
                for b in crate::batch::split(bytes)? {
                    for r in crate::batch::to_rows(&b)? {
                        if r.offset >= offset {
                            rows.push(r);
                        }
                    }
                }
                offset = seg.last_offset + 1;
            }
            Read::AtEnd => return Ok(rows),
            Read::OutOfRange => {
                let start = log.log_start_offset();
                if offset < start {
                    offset = start;
                } else {
                    return Ok(rows);
                }
            }
        }
    }
}

/// Read the durable state back (the shards this broker owns).
pub(crate) async fn load(broker: &Arc<Broker>, index: &StateIndex) -> Result<Loaded> {
    // Newest value per key; a null value deletes.
    let latest = read_owned(broker, index).await?;
    let me = broker.config.broker_id;
    let live: Vec<u64> = broker.live_brokers().iter().map(|b| b.id).collect();
    Ok(fold(latest, |rec| {
        // Held by another broker that is alive: its session, not ours.
        rec.holder.is_none_or(|h| h == me || !live.contains(&h))
    }))
}

/// The sessions (those `keep` accepts, with their queued messages) and
/// retained messages of the newest record per key.
fn fold(latest: HashMap<Bytes, Row>, keep: impl Fn(&SessionRecord) -> bool) -> Loaded {
    let mut held_elsewhere: std::collections::HashSet<ClientId> = Default::default();
    let mut sessions: HashMap<ClientId, (SessionRecord, Vec<(u64, Queued)>)> = HashMap::new();
    let mut queued: Vec<(ClientId, u64, Queued)> = Vec::new();
    let mut retained = Vec::new();
    for (k, row) in latest {
        let Ok(key) = std::str::from_utf8(&k) else {
            continue;
        };
        if row.value.is_none() {
            continue;
        }
        if let Some(client) = key.strip_prefix("s/") {
            if let Some(rec) = row
                .value
                .as_deref()
                .and_then(|v| serde_json::from_slice::<SessionRecord>(v).ok())
            {
                if keep(&rec) {
                    sessions.insert(Arc::from(client), (rec, Vec::new()));
                } else {
                    held_elsewhere.insert(Arc::from(client));
                }
            }
        } else if let Some(rest) = key.strip_prefix("q/") {
            let Some((client, seq)) = rest.rsplit_once('/') else {
                continue;
            };
            let (Ok(seq), Some((msg, qos, retain, sub_ids))) = (seq.parse(), message_from(&row))
            else {
                continue;
            };
            queued.push((
                Arc::from(client),
                seq,
                Queued {
                    msg: Arc::new(msg),
                    qos,
                    retain,
                    sub_ids,
                    seq,
                },
            ));
        } else if key.starts_with("r/")
            && let Some((msg, ..)) = message_from(&row)
        {
            retained.push(Arc::new(Message {
                retain: true,
                ..msg
            }));
        }
    }
    let mut orphans = Vec::new();
    for (client, seq, item) in queued {
        match sessions.get_mut(&client) {
            // Left by a session this one replaced: an orphan.
            Some(s) if seq < s.0.first_seq => orphans.push((client, seq)),
            Some(s) => s.1.push((seq, item)),
            None if held_elsewhere.contains(&client) => {}
            // Its session's end was recorded but not the message's: it is
            // deleted now, or a new session of that id would inherit it.
            None => orphans.push((client, seq)),
        }
    }
    Loaded {
        sessions: sessions
            .into_iter()
            .map(|(c, (rec, mut q))| {
                q.sort_by_key(|(seq, _)| *seq);
                (c, rec, q)
            })
            .collect(),
        retained,
        orphans,
    }
}

/// The sessions whose broker is gone, as the shards this broker owns have
/// them (it takes them over, so that their messages are queued).
pub(crate) async fn load_left_behind(
    broker: &Arc<Broker>,
    index: &StateIndex,
) -> Result<Vec<LoadedSession>> {
    let latest = read_owned(broker, index).await?;
    let me = broker.config.broker_id;
    let live: Vec<u64> = broker.live_brokers().iter().map(|b| b.id).collect();
    Ok(fold(latest, |rec| {
        rec.holder.is_some_and(|h| h != me && !live.contains(&h))
    })
    .sessions)
}

/// `client`'s session as the state stream has it, read from the shard of
/// its id, which this broker must own (a client resuming a session whose
/// broker is gone). Reads the whole shard: a rare path, after a crash.
pub(crate) async fn load_session(
    broker: &Arc<Broker>,
    state_index: Option<&StateIndex>,
    client: &str,
) -> Result<Option<LoadedSession>> {
    let Some(s) = broker.stream(STREAM) else {
        return Ok(None);
    };
    let index = super::persist::partition_for(client.as_bytes(), s.partition_count());
    let log = s.shard(index).ok_or_else(|| s.not_here(index))?;
    if state_index.is_some_and(|i| !i.may_have(index, log.epoch(), client)) {
        return Ok(None);
    }
    let session_key = format!("s/{client}");
    let queue_prefix = format!("q/{client}/");
    let mut latest: HashMap<Bytes, Row> = HashMap::new();
    for r in read_all(broker, log).await? {
        if let Some(k) = r.key.clone()
            && (k == session_key.as_bytes() || k.starts_with(queue_prefix.as_bytes()))
        {
            latest.insert(k, r);
        }
    }
    Ok(fold(latest, |_| true).sessions.into_iter().next())
}

/// Append the hub's changes as they come and report how far they are
/// durable. Changes for a shard another broker owns go to that broker.
pub(crate) async fn run(
    broker: Arc<Broker>,
    hub: Arc<Hub>,
    remote: Arc<RemoteAppender>,
    index: Arc<StateIndex>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = hub.ops_ready() => {}
            _ = shutdown.changed() => return,
        }
        let (ops, mark) = hub.take_ops();
        if ops.is_empty() {
            hub.set_durable(mark);
            continue;
        }
        loop {
            match write(&broker, &remote, &index, &ops).await {
                Ok(()) => break,
                Err(
                    e @ (Error::Backpressure { .. }
                    | Error::Wal(_)
                    | Error::Timeout
                    | Error::ShardStopped { .. }
                    | Error::Placement(_)
                    | Error::Storage(_)),
                ) => {
                    tracing::warn!("storing MQTT session state (retrying): {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                // Not a passing condition (a shard this broker does not
                // own, say): the changes stay in memory only, and the
                // acknowledgements waiting for them go out.
                Err(e) => {
                    tracing::warn!("MQTT session state not stored: {e}");
                    break;
                }
            }
        }
        hub.set_durable(mark);
    }
}

async fn write(
    broker: &Arc<Broker>,
    remote: &RemoteAppender,
    state_index: &StateIndex,
    ops: &[Op],
) -> Result<()> {
    if !broker.lease_valid() {
        // Cut off from placement: its shards may be another's already. The
        // writer tries again; acknowledgements wait (up to their timeout).
        return Err(Error::Timeout);
    }
    // Created with the first state to keep, so a broker whose MQTT clients
    // keep none shows no extra stream.
    ensure_stream(broker).await?;
    let s = broker
        .stream(STREAM)
        .ok_or_else(|| Error::UnknownStream(STREAM.to_string()))?;
    let now = crate::broker::now_ms();
    let me = broker.config.broker_id;
    let mut by_shard: BTreeMap<i32, Vec<Row>> = BTreeMap::new();
    for op in ops {
        let shard = super::persist::partition_for(route_key(op), s.partition_count());
        let rows = by_shard.entry(shard).or_default();
        // Offsets relative to the batch (the shard assigns the real ones).
        let mut row = to_row(op, now, me);
        row.offset = rows.len() as i64;
        rows.push(row);
    }
    let mut waits = Vec::new();
    let mut sent = Vec::new();
    for (index, rows) in by_shard {
        let Some(shard) = s.shard(index) else {
            // Another broker owns the shard: it appends them.
            let owner = s
                .partition(index)
                .and_then(|p| p.leader)
                .filter(|&b| b != me)
                .and_then(|b| broker.live_brokers().into_iter().find(|i| i.id == b));
            let Some(owner) = owner else {
                // No owner right now (its lease is moving): try again.
                return Err(Error::Timeout);
            };
            let stream: Arc<str> = Arc::from(STREAM);
            for row in rows {
                let (done, answer) = tokio::sync::oneshot::channel();
                let queued = remote
                    .send_waiting(RemoteRecord {
                        broker: owner.id,
                        addr: owner.http_addr.clone(),
                        stream: stream.clone(),
                        shard: index,
                        row,
                        done,
                    })
                    .await;
                if !queued {
                    return Err(Error::Timeout);
                }
                sent.push(answer);
            }
            continue;
        };
        // Noted first: the index may name a client too many, never miss one.
        state_index.note(shard.shard, shard.epoch(), &rows);
        let batch = crate::batch::from_rows(&rows)?;
        let accepted = crate::log::append(broker, shard, batch, true)?;
        waits.push(crate::log::wait(
            shard,
            accepted,
            broker.durability(&s),
            Duration::from_secs(30),
        ));
    }
    for w in waits {
        w.await?;
    }
    let mut refused = 0;
    for answer in sent {
        // The sending task answers once its request has ended.
        match answer.await {
            Ok(Delivery::Stored) => {}
            // Sending them again would not help: like a change for a shard
            // no one can take, it stays in memory only.
            Ok(Delivery::Refused) => refused += 1,
            Ok(Delivery::Failed) | Err(_) => return Err(Error::Timeout),
        }
    }
    if refused > 0 {
        tracing::warn!(
            changes = refused,
            "MQTT session state refused by its shard's owner: kept in memory only"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_messages_round_trip_through_records() {
        let msg = Message {
            topic: Arc::from("a/b"),
            payload: Bytes::from_static(b"p"),
            qos: 2,
            retain: true,
            props: MessageProps {
                payload_format: Some(1),
                message_expiry: Some(30),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            },
            received_ms: 77,
            origin: Some(Arc::from("me")),
        };
        let op = Op::Queue {
            client: Arc::from("c"),
            seq: 5,
            item: Some(Queued {
                msg: Arc::new(msg.clone()),
                qos: 1,
                retain: false,
                sub_ids: vec![3, 4],
                seq: 5,
            }),
        };
        let row = to_row(&op, 0, 1);
        assert_eq!(row.key.as_deref(), Some(&b"q/c/5"[..]));
        let (back, qos, retain, ids) = message_from(&row).unwrap();
        assert_eq!(back, msg);
        assert_eq!((qos, retain, ids), (1, false, vec![3, 4]));
    }

    #[test]
    fn sessions_held_by_another_live_broker_are_left_with_their_messages() {
        let session = |client: &str| Op::Session {
            client: Arc::from(client),
            record: Some(SessionRecord {
                subs: Vec::new(),
                expiry_secs: 60,
                disconnected_ms: None,
                username: None,
                holder: None,
                first_seq: 0,
            }),
        };
        let queued = |client: &str, seq: u64| Op::Queue {
            client: Arc::from(client),
            seq,
            item: Some(Queued {
                msg: Arc::new(Message {
                    topic: Arc::from("t"),
                    payload: Bytes::from_static(b"p"),
                    qos: 1,
                    retain: false,
                    props: MessageProps::default(),
                    received_ms: 0,
                    origin: None,
                }),
                qos: 1,
                retain: false,
                sub_ids: Vec::new(),
                seq,
            }),
        };
        let mut latest = HashMap::new();
        // "mine" written by broker 1, "theirs" by broker 2, and a message
        // left by a session that ended.
        for (op, writer) in [
            (session("mine"), 1),
            (queued("mine", 1), 1),
            (session("theirs"), 2),
            (queued("theirs", 4), 2),
            (queued("ended", 2), 1),
        ] {
            let row = to_row(&op, 0, writer);
            latest.insert(row.key.clone().unwrap(), row);
        }
        // A session that replaced another of its id (Clean Start) starts
        // above the records the other left.
        let mut fresh = session("fresh");
        if let Op::Session {
            record: Some(r), ..
        } = &mut fresh
        {
            r.first_seq = 100;
        }
        for op in [fresh, queued("fresh", 5), queued("fresh", 100)] {
            let row = to_row(&op, 0, 1);
            latest.insert(row.key.clone().unwrap(), row);
        }
        let loaded = fold(latest, |rec| rec.holder != Some(2));
        let sessions: Vec<(&str, Option<u64>, usize)> = loaded
            .sessions
            .iter()
            .map(|(c, r, q)| (&**c, r.holder, q.len()))
            .collect();
        let mut sessions = sessions;
        sessions.sort();
        assert_eq!(sessions, vec![("fresh", Some(1), 1), ("mine", Some(1), 1)]);
        // The other broker's queued message is not an orphan to delete.
        let mut orphans: Vec<(&str, u64)> =
            loaded.orphans.iter().map(|(c, s)| (&**c, *s)).collect();
        orphans.sort();
        assert_eq!(orphans, vec![("ended", 2), ("fresh", 5)]);
    }

    #[test]
    fn the_state_index_never_misses_a_stored_session() {
        let idx = StateIndex::default();
        let shard = |c: &str| super::super::persist::partition_for(c.as_bytes(), 4);
        let row = |c: &str, live: bool| Row {
            offset: 0,
            timestamp_ms: 0,
            key: Some(Bytes::from(format!("s/{c}"))),
            value: live.then(|| Bytes::from_static(b"{}")),
            headers: Vec::new(),
            producer_id: None,
            producer_epoch: None,
            sequence: None,
        };
        let (a, b) = (shard("a"), shard("b"));
        let all: Vec<(i32, u64)> = (0..4).map(|s| (s, 1)).collect();
        // Not read yet: every lookup has to read the shard.
        assert!(idx.may_have(a, 1, "a"));
        let token = idx.begin(&all);
        assert!(idx.may_have(a, 1, "a"));
        // Appended while the read runs, then the read merged.
        idx.note(b, 1, &[row("b", true)]);
        idx.merge(&token, 4, &[Arc::from("a")]);
        assert!(idx.may_have(a, 1, "a") && idx.may_have(b, 1, "b"));
        assert!(idx.may_have(a, 1, "b") == (a == b));
        idx.note(a, 1, &[row("a", false)]);
        assert!(!idx.may_have(a, 1, "a"));
        // Another lease of the shard: unknown until read under it, and a
        // read begun under the old lease does not make it known.
        let old = idx.begin(&all);
        idx.note(a, 2, &[row("x", true)]);
        assert!(idx.may_have(a, 2, "zzz"));
        idx.merge(&old, 4, &[]);
        assert!(idx.may_have(a, 2, "zzz"));
        let mut now = all.clone();
        now[usize::try_from(a).unwrap()].1 = 2;
        let token = idx.begin(&now);
        idx.merge(&token, 4, &[]);
        assert!(idx.may_have(a, 2, "x") && !idx.may_have(a, 2, "zzz"));
    }
}
