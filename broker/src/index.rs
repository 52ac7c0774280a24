//! Following placement's segment index: compaction swaps entries,
//! retention and DeleteRecords move log starts, and the owner of a shard
//! must serve from the index as it is now (the objects it replaced are
//! deleted after a grace period). Every broker polls the per-shard index
//! versions, a small answer, and reloads only the shards that changed.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;

/// How often the index versions are compared. Well inside the grace
/// period before replaced objects are deleted (minutes).
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

pub async fn follow(broker: Arc<Broker>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = follow_once(&broker).await {
            tracing::debug!("following the segment index: {e}");
        }
    }
}

/// Reload the index of every owned shard whose version moved.
pub async fn follow_once(broker: &Broker) -> crate::Result<()> {
    let seen = broker.placement.index_versions().await?;
    broker.set_default_retention_ms(seen.default_retention_ms);
    *broker.compaction_totals.lock() = Some(seen.compaction);
    let versions = seen.versions;
    for stream in broker.streams() {
        let Some(placed) = versions.get(&stream.name) else {
            continue;
        };
        let stale = stream.owned().any(|log| {
            usize::try_from(log.shard)
                .ok()
                .and_then(|i| placed.get(i))
                .is_some_and(|v| *v > log.index_version())
        });
        if !stale {
            continue;
        }
        let Some(index) = broker.placement.get_stream(&stream.name).await? else {
            continue;
        };
        for log in stream.owned() {
            if let Some(shard) = usize::try_from(log.shard)
                .ok()
                .and_then(|i| index.shards.get(i))
            {
                log.follow_index(shard);
            }
        }
    }
    Ok(())
}
