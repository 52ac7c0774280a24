//! Persisted publishes whose shard another broker owns. An MQTT client
//! cannot pick the partition leader as a Kafka client does, so the broker
//! it is connected to sends the record to the owner
//! (`POST /api/v1/mqtt/append?stream=..&shard=..`, a Kafka record batch),
//! which appends it through the same path as its own and answers once the
//! stream's durability point is reached.
//!
//! One task sends everything: each round takes what is waiting, sends one
//! batch per (broker, stream, shard) at once, and starts the next round
//! when they are all answered, so records of one shard keep the order they
//! were published in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_placement::BrokerId;
use shoal_storage::Record as Row;
use tokio::sync::{mpsc, oneshot};

/// A record for another broker's shard.
#[derive(Debug)]
pub(crate) struct RemoteRecord {
    pub broker: BrokerId,
    pub addr: String,
    pub stream: Arc<str>,
    pub shard: i32,
    pub row: Row,
    /// Told what became of it.
    pub done: oneshot::Sender<Delivery>,
}

/// What became of records sent to their shard's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Durable there.
    Stored,
    /// Refused for good (the request itself is wrong there): sending it
    /// again would not help.
    Refused,
    /// Not answered, or refused for now (the shard is moving): worth
    /// another try.
    Failed,
}

const QUEUE: usize = 16_384;
/// Records per request, at most, and about how many bytes.
const BATCH: usize = 1024;
const BATCH_BYTES: usize = 8 << 20;

pub(crate) struct RemoteAppender {
    tx: mpsc::Sender<RemoteRecord>,
}

impl RemoteAppender {
    pub(crate) fn new() -> (Self, mpsc::Receiver<RemoteRecord>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (RemoteAppender { tx }, rx)
    }

    /// Queue `r`; false if the queue is full (the publish is refused).
    pub(crate) fn send(&self, r: RemoteRecord) -> bool {
        self.tx.try_send(r).is_ok()
    }

    /// Queue `r`, waiting for room; false if the sending task has stopped.
    pub(crate) async fn send_waiting(&self, r: RemoteRecord) -> bool {
        self.tx.send(r).await.is_ok()
    }
}

/// Drain the queue into requests to the owners.
pub(crate) async fn run(
    mut rx: mpsc::Receiver<RemoteRecord>,
    client: reqwest::Client,
    scheme: &'static str,
    timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut pending, 4 * BATCH) => if n == 0 { return },
            _ = shutdown.changed() => return,
        }
        let mut groups: BTreeMap<(BrokerId, Arc<str>, i32), Vec<RemoteRecord>> = BTreeMap::new();
        for r in pending.drain(..) {
            groups
                .entry((r.broker, r.stream.clone(), r.shard))
                .or_default()
                .push(r);
        }
        let sends = groups.into_values().map(|records| {
            let client = client.clone();
            async move {
                let mut records = records;
                while !records.is_empty() {
                    let mut size = 0;
                    let take = records
                        .iter()
                        .take(BATCH)
                        .take_while(|r| {
                            size += r.row.value.as_ref().map_or(0, |v| v.len())
                                + r.row.key.as_ref().map_or(0, |k| k.len())
                                + 256;
                            size <= BATCH_BYTES
                        })
                        .count()
                        .max(1);
                    let rest = records.split_off(take);
                    let outcome = send(&client, scheme, &records, timeout).await;
                    for r in records {
                        let _ = r.done.send(outcome);
                    }
                    records = rest;
                }
            }
        });
        futures::future::join_all(sends).await;
    }
}

async fn send(
    client: &reqwest::Client,
    scheme: &'static str,
    records: &[RemoteRecord],
    timeout: Duration,
) -> Delivery {
    let Some(first) = records.first() else {
        return Delivery::Stored;
    };
    let rows: Vec<Row> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Row {
            offset: i as i64,
            ..r.row.clone()
        })
        .collect();
    let Ok(body) = crate::batch::from_rows(&rows) else {
        return Delivery::Refused;
    };
    let sent = client
        .post(format!("{scheme}://{}/api/v1/mqtt/append", first.addr))
        .query(&[
            ("stream", first.stream.to_string()),
            ("shard", first.shard.to_string()),
        ])
        .header("content-type", "application/octet-stream")
        .timeout(timeout)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Delivery::Stored,
        Ok(r) => {
            let status = r.status();
            tracing::warn!(
                broker = first.broker,
                stream = %first.stream,
                shard = first.shard,
                %status,
                "the owner refused MQTT records"
            );
            // Not the owner (any more), busy, or not ready: the shard moves
            // or the owner recovers. Anything else is this request's fault.
            let for_now = status.is_server_error()
                || status == reqwest::StatusCode::MISDIRECTED_REQUEST
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            if for_now {
                Delivery::Failed
            } else {
                Delivery::Refused
            }
        }
        Err(e) => {
            tracing::warn!(
                broker = first.broker,
                stream = %first.stream,
                shard = first.shard,
                "MQTT records not sent to their shard's owner: {e}"
            );
            Delivery::Failed
        }
    }
}
