//! Forwarding publishes to the brokers whose clients subscribe to them.
//!
//! The hub hands each message for another broker to [`Forwarder`]; a task
//! per process batches them per broker (at most about 1 MiB, or one larger
//! message) as one Kafka record batch and POSTs it to that broker's
//! `/api/v1/mqtt/forward`. The receiver delivers to its own clients only,
//! so a message crosses at most one hop. Delivery between brokers is at
//! most once: a failed POST drops its batch (counted).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_placement::BrokerId;
use shoal_storage::{Header, Record as Row};
use tokio::sync::mpsc;

use super::hub::{Dropped, GroupKey, Hub};
use super::message::Message;
use super::routes::Routes;

/// One message for one broker: to its ordinary subscribers (`plain`)
/// and/or to one member of each of `groups` there.
#[derive(Debug)]
pub(crate) struct Forward {
    pub broker: BrokerId,
    pub msg: Arc<Message>,
    pub plain: bool,
    pub groups: Vec<GroupKey>,
}

/// Messages waiting to be forwarded, at most.
const QUEUE: usize = 65_536;
const BATCH_BYTES: usize = 1 << 20;

pub(crate) struct Forwarder {
    tx: mpsc::Sender<Forward>,
}

impl Forwarder {
    /// The forwarder and the receiving end its task drains.
    pub(crate) fn new() -> (Self, mpsc::Receiver<Forward>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Forwarder { tx }, rx)
    }

    /// Queue `f`; false if the queue is full (the message is dropped).
    pub(crate) fn send(&self, f: Forward) -> bool {
        self.tx.try_send(f).is_ok()
    }
}

fn to_row(f: &Forward, offset: i64) -> Row {
    let mut headers = super::store::message_headers(&f.msg, f.msg.qos, f.msg.retain, &[]);
    headers.push(Header {
        key: "mqtt.plain".into(),
        value: Some(Bytes::from_static(if f.plain { b"1" } else { b"0" })),
    });
    if !f.groups.is_empty()
        && let Ok(json) = serde_json::to_vec(&f.groups)
    {
        headers.push(Header {
            key: "mqtt.groups".into(),
            value: Some(Bytes::from(json)),
        });
    }
    Row {
        offset,
        timestamp_ms: f.msg.received_ms,
        key: None,
        value: Some(f.msg.payload.clone()),
        headers,
        producer_id: None,
        producer_epoch: None,
        sequence: None,
    }
}

/// A forwarded batch back into messages: (message, plain, groups).
/// A forwarded message: for ordinary subscribers too, and for which groups.
pub(crate) type Forwarded = (Message, bool, Vec<GroupKey>);

pub(crate) fn decode(body: &Bytes) -> Option<Vec<Forwarded>> {
    let mut out = Vec::new();
    for b in crate::batch::split(body.clone()).ok()? {
        for row in crate::batch::to_rows(&b).ok()? {
            let (msg, ..) = super::store::message_from(&row)?;
            // The endpoint is reachable by anyone who reaches the HTTP API:
            // nothing that is not a topic name goes to clients.
            if !super::topic::valid_name(&msg.topic) {
                return None;
            }
            let header = |k: &str| {
                row.headers
                    .iter()
                    .find(|h| h.key == k)
                    .and_then(|h| h.value.clone())
            };
            let plain = header("mqtt.plain").as_deref() == Some(b"1");
            let groups: Vec<(String, String)> = header("mqtt.groups")
                .and_then(|v| serde_json::from_slice(&v).ok())
                .unwrap_or_default();
            let groups = groups
                .into_iter()
                .map(|(g, f)| (Arc::from(g.as_str()), f))
                .collect();
            out.push((msg, plain, groups));
        }
    }
    Some(out)
}

/// Drain the forwarder's queue into POSTs to the other brokers.
pub(crate) async fn run(
    mut rx: mpsc::Receiver<Forward>,
    routes: Arc<Routes>,
    hub: Arc<Hub>,
    auth: shoal_security::ClientAuth,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let client = match auth.http_client().timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("MQTT forwarding is off: {e}");
            return;
        }
    };
    let mut pending: Vec<Forward> = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut pending, 4096) => if n == 0 { return },
            _ = shutdown.changed() => return,
        }
        let mut by_broker: BTreeMap<BrokerId, Vec<Forward>> = BTreeMap::new();
        for f in pending.drain(..) {
            by_broker.entry(f.broker).or_default().push(f);
        }
        for (broker, fs) in by_broker {
            let Some(addr) = routes.addr(broker) else {
                hub.note_dropped_n(Dropped::ForwardFailed, fs.len() as u64);
                continue;
            };
            let url = format!("{}/api/v1/mqtt/forward", auth.url(&addr));
            for chunk in chunks(&fs) {
                let rows: Vec<Row> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, f)| to_row(f, i as i64))
                    .collect();
                let sent = match crate::batch::from_rows(&rows) {
                    Ok(body) => client
                        .post(&url)
                        .header("content-type", "application/octet-stream")
                        .body(body)
                        .send()
                        .await
                        .ok()
                        .is_some_and(|r| r.status().is_success()),
                    Err(_) => false,
                };
                if !sent {
                    tracing::debug!(broker, "forwarding {} MQTT messages failed", chunk.len());
                    hub.note_dropped_n(Dropped::ForwardFailed, chunk.len() as u64);
                }
            }
        }
    }
}

/// Runs of at most about [`BATCH_BYTES`] (a larger message goes alone).
fn chunks(fs: &[Forward]) -> Vec<&[Forward]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, f) in fs.iter().enumerate() {
        let p = &f.msg.props;
        let n = f.msg.payload.len()
            + f.msg.topic.len()
            + p.user
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, |d| d.len())
            + 256;
        if i > start && size + n > BATCH_BYTES {
            out.push(&fs[start..i]);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < fs.len() {
        out.push(&fs[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_batches_round_trip() {
        let msg = Arc::new(Message {
            topic: Arc::from("a/b"),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            props: Default::default(),
            received_ms: 9,
            origin: Some(Arc::from("c")),
        });
        let fs = [
            Forward {
                broker: 2,
                msg: msg.clone(),
                plain: true,
                groups: vec![],
            },
            Forward {
                broker: 2,
                msg: msg.clone(),
                plain: false,
                groups: vec![(Arc::from("g"), "a/#".to_string())],
            },
        ];
        let rows: Vec<Row> = fs
            .iter()
            .enumerate()
            .map(|(i, f)| to_row(f, i as i64))
            .collect();
        let body = crate::batch::from_rows(&rows).unwrap();
        let back = decode(&body).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, *msg);
        assert!(back[0].1 && back[0].2.is_empty());
        assert!(!back[1].1);
        assert_eq!(back[1].2, vec![(Arc::from("g"), "a/#".to_string())]);
    }
}
