//! The background tasks of a node that keeps its state in the bucket:
//! writing applied commands there in order, and renewing the lease.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::bucket::{Bucket, LoggedCommand};
use crate::error::Error;
use crate::raft::state_machine::{self, SharedState};

/// Writes applied commands to the bucket in order, one object per group;
/// those at or below `last_snapshot` (the version the bucket's snapshot
/// already holds) are skipped.
pub(crate) async fn mirror_loop(
    bucket: Arc<Bucket>,
    mut rx: mpsc::UnboundedReceiver<LoggedCommand>,
    mirrored: watch::Sender<u64>,
    fenced: Arc<watch::Sender<Option<String>>>,
    state: SharedState,
    mut last_snapshot: u64,
    snapshot_every: u64,
) {
    let covered = last_snapshot;
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        group.retain(|c| c.version > covered);
        if group.is_empty() {
            continue;
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            // Never write on an expired lease: another node may hold it. An
            // idle node let it lapse on purpose; renewing it (If-Match)
            // either keeps the bucket ours or shows who took it.
            while !bucket.lease_valid() {
                if fenced.borrow().is_some() {
                    return;
                }
                match bucket.renew().await {
                    Ok(()) => {}
                    Err(Error::Fenced(why)) => return fence(&fenced, why),
                    Err(e) => {
                        tracing::warn!("renewing the bucket lease before a write: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            match bucket.write_log(&group).await {
                Ok(()) => break,
                Err(Error::Fenced(why)) => return fence(&fenced, why),
                Err(e) => {
                    // Writes wait meanwhile; the lease loop fences us if
                    // this lasts past the lease.
                    tracing::warn!("writing placement log to the bucket: {e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let last = group.last().map_or(0, |c| c.version);
        mirrored.send_replace(last);
        if last.saturating_sub(last_snapshot) >= snapshot_every {
            let snapshot = state_machine::read(&state).state.clone();
            match bucket.write_snapshot(&snapshot).await {
                Ok(()) => last_snapshot = snapshot.version,
                Err(e) => tracing::warn!("writing placement snapshot to the bucket: {e}"),
            }
        }
    }
}

/// Keeps the bucket lease while the node writes, and watches it while idle.
///
/// Active (a bucket write within the TTL): renew every third of the TTL.
/// While the store is unreachable the lease may lapse: bucket writes then
/// wait (see `mirror_loop`) and renewal keeps trying; if the lease is still
/// ours when the store returns, work goes on.
///
/// Idle: no PUTs at all. The lease lapses and only a GET every third of the
/// TTL checks nobody took it; another node will not while this one answers
/// at its contact URL. Only another node holding the lease fences this one.
pub(crate) async fn renew_loop(bucket: Arc<Bucket>, fenced: Arc<watch::Sender<Option<String>>>) {
    let ttl = bucket.ttl();
    loop {
        let active = bucket.active();
        let wait = if bucket.lease_valid() || !active {
            ttl / 3
        } else {
            Duration::from_millis(500)
        };
        tokio::time::sleep(wait).await;
        let result = if bucket.active() {
            bucket.renew().await
        } else {
            bucket.check().await
        };
        match result {
            Ok(()) => {}
            Err(Error::Fenced(why)) => return fence(&fenced, why),
            Err(e) => {
                if bucket.lease_valid() {
                    tracing::warn!("renewing the bucket lease: {e}");
                } else {
                    tracing::warn!("the bucket lease lapsed, placement writes wait: {e}");
                }
            }
        }
    }
}

/// Another node holds the bucket: say so and stop every bucket write.
fn fence(fenced: &watch::Sender<Option<String>>, why: String) {
    tracing::error!("placement fenced in the bucket: {why}");
    fenced.send_replace(Some(why));
}
