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
    BrokerId, BrokerInfo, Command, Heartbeat, HeartbeatReply, Reply, StreamAssignment,
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
    /// One heartbeat-and-apply at a time, so a shard is adopted once.
    applying: tokio::sync::Mutex<()>,
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
    let c = &broker.config;
    BrokerInfo {
        id: c.broker_id,
        kafka_addr: format!("{}:{}", c.advertised_host, c.advertised_port),
        http_addr: c.http_addr.clone(),
        registered_ms: now_ms(),
    }
}

/// One heartbeat and the assignment it brings back.
pub async fn heartbeat(broker: &Arc<Broker>, first: bool) -> Result<()> {
    let Some(cluster) = broker.cluster.as_ref() else {
        return Ok(());
    };
    let _one = cluster.applying.lock().await;
    let sent = Instant::now();
    let reply = broker
        .placement
        .heartbeat(&Heartbeat { info: info(broker) })
        .await?;
    let lease = Duration::from_millis(reply.session_timeout_ms).saturating_sub(LEASE_MARGIN);
    *cluster.lease_until.lock() = Some(sent + lease);
    *cluster.live.lock() = reply.live.clone();
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
        let mut partitions = Vec::with_capacity(sa.shards.len());
        let mut changed = existing.is_none()
            || existing
                .as_ref()
                .is_some_and(|e| e.config != sa.config || e.partitions.len() != sa.shards.len());
        for sh in &sa.shards {
            let current = existing
                .as_ref()
                .and_then(|e| e.partition(sh.shard))
                .and_then(|p| p.log.clone());
            let log = if sh.owner == Some(me) {
                match current {
                    Some(log) if log.epoch() == sh.epoch && !log.is_fenced() && !first => Some(log),
                    other => {
                        if let Some(old) = other {
                            old.fence();
                        }
                        changed = true;
                        match adopt(broker, sa, sh.shard, sh.epoch, first).await {
                            Ok(log) => Some(log),
                            Err(e) => {
                                failed += 1;
                                tracing::warn!(stream = %sa.name, shard = sh.shard, "taking the shard: {e}");
                                None
                            }
                        }
                    }
                }
            } else {
                if let Some(old) = current {
                    tracing::info!(stream = %sa.name, shard = sh.shard, owner = ?sh.owner, "shard moved away");
                    old.fence();
                    changed = true;
                }
                None
            };
            if let (Some(log), Some(to)) = (&log, sh.handoff_to) {
                hand_off(broker, log.clone(), to);
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
            log.fence();
        }
        broker.uninstall(&gone.name);
    }
    failed
}

/// Start serving a shard assigned to this broker, from the committed index.
async fn adopt(
    broker: &Arc<Broker>,
    sa: &StreamAssignment,
    shard: i32,
    epoch: u64,
    reclaim: bool,
) -> Result<Arc<ShardLog>> {
    let me = broker.config.broker_id;
    let epoch = if reclaim {
        match broker
            .placement
            .write(Command::AssignShard {
                stream: sa.name.clone(),
                shard,
                broker: me,
                expected_epoch: epoch,
            })
            .await?
        {
            Reply::Lease { epoch } => epoch,
            Reply::Rejected { rejection } => return Err(Error::Rejected(rejection)),
            other => return Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    } else {
        epoch
    };
    let stream = broker
        .placement
        .get_stream(&sa.name)
        .await?
        .ok_or_else(|| Error::UnknownStream(sa.name.clone()))?;
    let s = usize::try_from(shard)
        .ok()
        .and_then(|i| stream.shards.get(i))
        .ok_or_else(|| Error::UnknownShard {
            stream: sa.name.clone(),
            shard,
        })?;
    if s.owner != Some(me) || s.epoch != epoch {
        return Err(Error::NotLeader {
            stream: sa.name.clone(),
            shard,
        });
    }
    tracing::info!(stream = %sa.name, shard, epoch, committed = s.committed_offset, "serving shard");
    Ok(Arc::new(ShardLog::new(
        &sa.name,
        shard,
        ShardInit::committed(s, epoch),
        broker.config.tail_keep_bytes,
    )))
}

/// Hand a shard to `to`: refuse new writes, flush what is held, then give
/// the lease over (a new epoch for `to`). Runs once per shard.
fn hand_off(broker: &Arc<Broker>, log: Arc<ShardLog>, to: BrokerId) {
    let Some(cluster) = broker.cluster.as_ref() else {
        return;
    };
    let key = (log.stream.clone(), log.shard);
    if !cluster.handing_off.lock().insert(key.clone()) {
        return;
    }
    log.drain();
    let broker = broker.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(8);
        while !log.all_committed() && !log.is_fenced() && Instant::now() < deadline {
            broker.flush_now.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if log.all_committed() && !log.is_fenced() {
            let cmd = Command::AssignShard {
                stream: log.stream.clone(),
                shard: log.shard,
                broker: to,
                expected_epoch: log.epoch(),
            };
            match broker.placement.write(cmd).await {
                Ok(Reply::Lease { epoch }) => {
                    tracing::info!(stream = %log.stream, shard = log.shard, to, epoch, "handed the shard over");
                    log.fence();
                }
                Ok(other) => tracing::warn!("handoff refused: {other:?}"),
                Err(e) => tracing::warn!("handoff failed: {e}"),
            }
        }
        if let Some(c) = broker.cluster.as_ref() {
            c.handing_off.lock().remove(&key);
        }
    });
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
