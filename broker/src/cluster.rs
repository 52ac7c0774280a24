//! A broker in a cluster: heartbeats to the placement leader and follows the
//! controller's assignment of shards.
//!
//! The broker's right to write its shards lasts one session timeout from
//! the *sending* of its last answered heartbeat, so it always ends before the
//! controller (which counts from the receipt) moves them. Past it produces
//! are refused; commits made late are refused by placement anyway, because
//! they carry the old epoch. When the assignment shows a shard elsewhere its
//! log is fenced: waiting producers get NOT_LEADER_OR_FOLLOWER and nothing
//! more is flushed from it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shoal_placement::{
    BrokerId, BrokerInfo, Command, Heartbeat, HeartbeatReply, Rejection, Reply, Stream,
};
use tokio::time::Instant;

use crate::broker::{Broker, Partition, StreamHandle, now_ms};
use crate::error::{Error, Result};
use crate::shard::{ShardInit, ShardLog};

/// How often a broker heartbeats; a handful fit in the session timeout.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Margin taken off the session timeout for the broker's own lease.
const LEASE_MARGIN: Duration = Duration::from_millis(1000);

/// What a cluster broker knows of the cluster.
#[derive(Default)]
pub struct ClusterState {
    /// Live brokers, sorted by id (the leader's view at the last heartbeat).
    live: Mutex<Vec<BrokerInfo>>,
    /// Until when the shards of the last assignment are surely still ours.
    lease_until: Mutex<Option<Instant>>,
    /// Shards with a handoff task running.
    handing_off: Mutex<HashSet<(String, i32)>>,
    /// One heartbeat-and-apply at a time, so a shard is adopted once; it
    /// holds when the last one was sent.
    applying: tokio::sync::Mutex<Option<Instant>>,
}

impl ClusterState {
    pub fn live(&self) -> Vec<BrokerInfo> {
        self.live.lock().clone()
    }

    pub fn lease_valid(&self) -> bool {
        self.lease_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }
}

fn info(broker: &Broker) -> BrokerInfo {
    broker.config.broker_info(now_ms())
}

/// How recent a view [`refresh`] accepts without asking placement again.
const FRESH: Duration = Duration::from_millis(100);

/// One heartbeat and the assignment it brings back.
pub async fn heartbeat(broker: &Arc<Broker>, first: bool) -> Result<()> {
    sync(broker, first, None).await
}

/// Bring the view up to date on demand (a topic this broker does not know
/// yet, a group it may have just become coordinator of). Callers arriving
/// together share one heartbeat: a client polling for a missing topic
/// costs placement at most one call per [`FRESH`].
pub async fn refresh(broker: &Arc<Broker>) -> Result<()> {
    sync(broker, false, Some(FRESH)).await
}

async fn sync(broker: &Arc<Broker>, first: bool, fresh: Option<Duration>) -> Result<()> {
    let Some(cluster) = broker.cluster.as_ref() else {
        return Ok(());
    };
    let mut last = cluster.applying.lock().await;
    if let (Some(fresh), Some(at)) = (fresh, *last)
        && at.elapsed() < fresh
    {
        return Ok(());
    }
    let sent = Instant::now();
    let reply = broker
        .placement
        .heartbeat(&Heartbeat {
            info: info(broker),
            mqtt_filters: broker.mqtt_routes.local_filters(),
        })
        .await?;
    broker
        .mqtt_routes
        .set_remote(&reply.mqtt_routes, broker.config.broker_id);
    let lapsed = !cluster.lease_valid();
    let lease = Duration::from_millis(reply.session_timeout_ms).saturating_sub(LEASE_MARGIN);
    *cluster.lease_until.lock() = Some(sent + lease);
    *cluster.live.lock() = reply.live.clone();
    *last = Some(sent);
    // Groups are coordinated here only while this broker is their
    // coordinator without a break: after a lapse another broker may have
    // taken them (under a newer coordinator epoch), so their state here is
    // stale and members rejoin.
    broker
        .groups
        .retain(|g| !lapsed && broker.is_coordinator(g));
    let failed = apply(broker, &reply, first).await;
    if first && failed > 0 {
        // Before the WAL is replayed every shard still ours must be taken
        // back, or its un-flushed records would be dropped: try again.
        return Err(Error::Internal(format!(
            "{failed} shard(s) could not be taken back yet"
        )));
    }
    Ok(())
}

/// The heartbeat loop of a cluster broker.
pub async fn run(broker: Arc<Broker>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = heartbeat(&broker, false).await {
            tracing::warn!("heartbeat to placement failed: {e}");
        }
    }
}

/// Bring the broker's streams in line with the assignment. On the first
/// heartbeat after a start, shards still assigned to this broker are taken
/// with a new epoch, fencing whatever a previous run of it left behind.
/// Returns how many shards assigned here could not be taken.
async fn apply(broker: &Arc<Broker>, reply: &HeartbeatReply, first: bool) -> usize {
    let me = broker.config.broker_id;
    let mut failed = 0;
    let mut seen = HashSet::new();
    for sa in &reply.streams {
        seen.insert(sa.name.clone());
        let existing = broker.stream(&sa.name);
        let current = |shard: i32| {
            existing
                .as_ref()
                .and_then(|e| e.partition(shard))
                .and_then(|p| p.log.clone())
        };
        // Which shards assigned here need a new log, under which epoch, and
        // the epoch its WAL entries of this broker's last lease carry.
        let mut wanted: Vec<(i32, u64, u64)> = Vec::new();
        for sh in sa.shards.iter().filter(|sh| sh.owner == Some(me)) {
            let old = current(sh.shard);
            if let Some(log) = &old
                && log.epoch() == sh.epoch
                && !log.is_fenced()
                && !first
            {
                continue;
            }
            if let Some(log) = old
                && log.fence()
            {
                broker.metrics.shards_fenced.inc();
            }
            let epoch = if first {
                match reclaim(broker, &sa.name, sh.shard, sh.epoch).await {
                    Ok(epoch) => epoch,
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(stream = %sa.name, shard = sh.shard, "taking the shard back: {e}");
                        continue;
                    }
                }
            } else {
                sh.epoch
            };
            wanted.push((sh.shard, epoch, sh.epoch));
        }
        // One read of the committed index serves every shard taken here.
        let index = if wanted.is_empty() {
            None
        } else {
            match broker.placement.get_stream(&sa.name).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(stream = %sa.name, "reading the segment index: {e}");
                    None
                }
            }
        };
        let mut changed = existing.is_none()
            || existing.as_ref().is_some_and(|e| {
                e.config != sa.config
                    || e.partitions.len() != sa.shards.len()
                    || e.retention_default != sa.retention_default
            });
        let mut partitions = Vec::with_capacity(sa.shards.len());
        for sh in &sa.shards {
            let log = if sh.owner != Some(me) {
                if let Some(old) = current(sh.shard) {
                    tracing::info!(stream = %sa.name, shard = sh.shard, owner = ?sh.owner, "shard moved away");
                    if old.fence() {
                        broker.metrics.shards_fenced.inc();
                    }
                    changed = true;
                }
                None
            } else if let Some(&(_, epoch, replay_epoch)) =
                wanted.iter().find(|(i, _, _)| *i == sh.shard)
            {
                changed = true;
                match index
                    .as_ref()
                    .map(|s| log_from_index(broker, s, sh.shard, epoch, replay_epoch))
                {
                    Some(Ok(log)) => Some(log),
                    Some(Err(e)) => {
                        failed += 1;
                        tracing::warn!(stream = %sa.name, shard = sh.shard, "taking the shard: {e}");
                        None
                    }
                    None => {
                        failed += 1;
                        None
                    }
                }
            } else {
                current(sh.shard)
            };
            if let Some(log) = &log {
                // Stopped or resumed by an operator through any broker.
                match (&sh.stopped, log.stopped().is_some()) {
                    (Some(reason), false) => log.stop(reason),
                    (None, true) => log.resume(),
                    _ => {}
                }
            }
            if let Some(log) = &log {
                match sh.handoff_to {
                    Some(to) => hand_off(broker, log.clone(), to, sh.handoff_id),
                    // Still ours under the same epoch with no handoff
                    // pending: one whose completion's answer was lost was
                    // withdrawn, and placement refuses a withdrawn one.
                    None if log.is_draining() => {
                        let handing_off = broker.cluster.as_ref().is_some_and(|c| {
                            c.handing_off
                                .lock()
                                .contains(&(log.stream.clone(), log.shard))
                        });
                        if !handing_off {
                            tracing::info!(stream = %sa.name, shard = sh.shard, "no handoff pending; taking writes again");
                            log.undrain();
                        }
                    }
                    None => {}
                }
            }
            let leader = if log.is_some() {
                Some(me)
            } else {
                sh.owner.filter(|o| *o != me)
            };
            let epoch = log.as_ref().map_or(sh.epoch, |l| l.epoch());
            if existing
                .as_ref()
                .and_then(|e| e.partition(sh.shard))
                .is_none_or(|p| p.leader != leader || p.epoch != epoch)
            {
                changed = true;
            }
            partitions.push(Partition { leader, epoch, log });
        }
        if changed {
            broker.install(StreamHandle {
                name: sa.name.clone(),
                id: sa.id,
                config: sa.config.clone(),
                retention_default: sa.retention_default,
                partitions,
            });
        }
    }
    for gone in broker
        .streams()
        .into_iter()
        .filter(|s| !seen.contains(&s.name))
    {
        for log in gone.owned() {
            let _ = log.fence();
        }
        broker.uninstall(&gone.name);
    }
    failed
}

/// Take back, with a new epoch, a shard still assigned here after a start,
/// fencing whatever an earlier run of this broker left behind.
async fn reclaim(broker: &Broker, stream: &str, shard: i32, epoch: u64) -> Result<u64> {
    let cmd = Command::AssignShard {
        stream: stream.to_string(),
        shard,
        broker: broker.config.broker_id,
        expected_epoch: epoch,
    };
    match broker.placement.write(cmd).await? {
        Reply::Lease { epoch } => Ok(epoch),
        Reply::Rejected { rejection } => Err(Error::Rejected(rejection)),
        other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
    }
}

/// A log for a shard assigned here at `epoch`, from the committed index;
/// WAL entries of lease `replay_epoch` are this broker's latest.
fn log_from_index(
    broker: &Broker,
    stream: &Stream,
    shard: i32,
    epoch: u64,
    replay_epoch: u64,
) -> Result<Arc<ShardLog>> {
    let s = usize::try_from(shard)
        .ok()
        .and_then(|i| stream.shards.get(i))
        .ok_or_else(|| Error::UnknownShard {
            stream: stream.name.clone(),
            shard,
        })?;
    // The index was read after the assignment: a newer owner means the
    // shard moved again meanwhile.
    if s.owner != Some(broker.config.broker_id) || s.epoch != epoch {
        return Err(Error::NotLeader {
            stream: stream.name.clone(),
            shard,
        });
    }
    tracing::info!(stream = %stream.name, shard, epoch, committed = s.committed_offset, "serving shard");
    Ok(broker.new_log(
        &stream.name,
        shard,
        ShardInit {
            replay_epoch,
            ..ShardInit::committed(s, epoch)
        },
    ))
}

/// How long a handoff waits for what the shard held to commit while it
/// still takes writes.
const HANDOFF_COMMIT_WAIT: Duration = Duration::from_secs(6);
/// How long it then refuses writes, waiting for the rest to commit.
const HANDOFF_DRAIN_WAIT: Duration = Duration::from_secs(3);
// An attempt ends before the controller withdraws the handoff, so a slow
// store costs one attempt per request, not a completion that is refused.
const _: () = assert!(
    HANDOFF_COMMIT_WAIT.as_secs() + HANDOFF_DRAIN_WAIT.as_secs()
        < shoal_placement::controller::HANDOFF_TIMEOUT.as_secs()
);

/// Complete handoff `handoff_id` of a shard to `to` without losing or
/// stalling what producers send: first commit what is held while still
/// taking writes, then refuse new writes, commit the short rest and
/// complete the handoff (a new epoch for `to`). Runs once per shard at a
/// time.
///
/// When the records do not commit in time (an object-store outage), the
/// shard takes writes again and placement is not asked: the controller
/// withdraws the handoff, and moving the shard would drop what it
/// acknowledged. Placement refuses the completion of a withdrawn handoff,
/// so when the answer is lost the shard stays drained only until a
/// heartbeat shows the handoff pending (try again), withdrawn (take writes
/// again) or done (fenced).
fn hand_off(broker: &Arc<Broker>, log: Arc<ShardLog>, to: BrokerId, handoff_id: u64) {
    let Some(cluster) = broker.cluster.as_ref() else {
        return;
    };
    let key = (log.stream.clone(), log.shard);
    if !cluster.handing_off.lock().insert(key.clone()) {
        return;
    }
    let broker = broker.clone();
    tokio::spawn(async move {
        let held = log.high_watermark();
        let commit_by = Instant::now() + HANDOFF_COMMIT_WAIT;
        let ready = committed_by(&broker, &log, commit_by, |l| l.committed_offset() >= held).await
            && {
                log.drain();
                let drain_by = Instant::now() + HANDOFF_DRAIN_WAIT;
                committed_by(&broker, &log, drain_by, ShardLog::all_committed).await
            };
        // Whether the shard surely stays here under its epoch.
        let stays = if ready {
            let cmd = Command::CompleteHandoff {
                stream: log.stream.clone(),
                shard: log.shard,
                to,
                expected_epoch: log.epoch(),
                handoff_id,
            };
            match broker.placement.write(cmd).await {
                Ok(Reply::Lease { epoch }) => {
                    tracing::info!(stream = %log.stream, shard = log.shard, to, epoch, "handed the shard over");
                    let _ = log.fence();
                    false
                }
                Ok(Reply::Rejected {
                    rejection: Rejection::NoSuchHandoff { .. },
                }) => {
                    tracing::info!(stream = %log.stream, shard = log.shard, to, "handoff withdrawn before it was done");
                    true
                }
                Ok(other) => {
                    tracing::warn!(stream = %log.stream, shard = log.shard, "handoff refused: {other:?}");
                    false
                }
                Err(e) => {
                    tracing::warn!(stream = %log.stream, shard = log.shard, "handoff answer lost: {e}");
                    false
                }
            }
        } else {
            tracing::info!(stream = %log.stream, shard = log.shard, to, "handoff not ready in time; taking writes again");
            true
        };
        if stays && !log.is_fenced() {
            log.undrain();
        }
        if let Some(c) = broker.cluster.as_ref() {
            c.handing_off.lock().remove(&key);
        }
    });
}

/// Wait, flushing, until `done` holds for `log` (true) or the deadline
/// passes or the shard is fenced (false).
async fn committed_by(
    broker: &Broker,
    log: &ShardLog,
    deadline: Instant,
    done: impl Fn(&ShardLog) -> bool,
) -> bool {
    while !done(log) && !log.is_fenced() && Instant::now() < deadline {
        broker.flush_now.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done(log) && !log.is_fenced()
}

/// The broker that coordinates `group`: the same answer on every broker
/// that has the same live list.
pub fn coordinator_for(group: &str, live: &[BrokerInfo]) -> Option<BrokerInfo> {
    if live.is_empty() {
        return None;
    }
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let i = usize::try_from(h % live.len() as u64).unwrap_or(0);
    live.get(i).cloned()
}

/// Wait until every shard of `name` has a leader in this broker's view
/// (after a create, so that the answer's Metadata is usable at once).
pub async fn wait_for_leaders(broker: &Arc<Broker>, name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Err(e) = heartbeat(broker, false).await {
            tracing::debug!("heartbeat while waiting for leaders: {e}");
        }
        if broker
            .stream(name)
            .is_some_and(|s| s.partitions.iter().all(|p| p.leader.is_some()))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: u64) -> BrokerInfo {
        BrokerInfo {
            id,
            kafka_addr: String::new(),
            http_addr: String::new(),
            registered_ms: 0,
            kafka_listeners: Default::default(),
        }
    }

    #[test]
    fn every_broker_picks_the_same_coordinator() {
        let live = [b(1), b(2), b(3)];
        let picks: HashSet<u64> = (0..50)
            .map(|i| coordinator_for(&format!("g{i}"), &live).unwrap().id)
            .collect();
        assert_eq!(picks.len(), 3, "groups spread over all brokers");
        assert_eq!(
            coordinator_for("g", &live).unwrap().id,
            coordinator_for("g", &live).unwrap().id
        );
        assert!(coordinator_for("g", &[]).is_none());
    }
}
