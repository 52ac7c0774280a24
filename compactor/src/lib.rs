//! Shoal's compactor: the data lifecycle after a flush.
//!
//! Owns compaction plans (size-tiered runs of a shard's index, see
//! [`plan`]), the rewrite of those runs into per-shard files under
//! `streams/<stream>/shard=<n>/` and the atomic index swap in placement
//! under a compaction lease with an epoch, log compaction
//! (`cleanup.policy=compact`), retention (`retention.ms`,
//! `retention.bytes`: the log start moves and whole ranges leave the
//! index), and garbage collection of data objects placement no longer (or
//! never) referenced, after their grace periods.
//!
//! It does not own metadata (placement does: the index, the lease, the
//! retired objects), the Parquet format (storage does), or scheduling: a
//! front end calls [`Compactor::run_once`] — `shoal standalone` and
//! `shoal compactor` on an interval ([`run_every`]), the Lambda binary
//! `shoal-compactor-lambda` once per scheduled event, with a deadline.
//!
//! Main types: [`Compactor`], [`CompactorConfig`], [`RunReport`].

pub mod config;
pub mod error;
pub mod gc;
pub mod plan;
mod rewrite;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_placement::{Command, CompactionRun, PlacementClient, Reply, Stream};
use shoal_storage::ObjectStorage;

pub use config::{CompactorConfig, holder_name};
pub use error::{Error, Result};

/// What a run did: the record placement keeps (see `/api/v1/compaction`).
pub type RunReport = CompactionRun;

/// One compactor: a placement client, the object store, its settings.
pub struct Compactor {
    placement: PlacementClient,
    store: ObjectStorage,
    config: CompactorConfig,
}

/// When to stop starting new work.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// No new plan is started once the time left falls under `margin`.
    pub deadline: Option<Instant>,
    pub margin: Duration,
}

impl Budget {
    pub const UNLIMITED: Budget = Budget {
        deadline: None,
        margin: Duration::ZERO,
    };

    fn exhausted(&self) -> bool {
        self.deadline
            .is_some_and(|d| d.saturating_duration_since(Instant::now()) < self.margin)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A stream's cleanup policy (Kafka's `cleanup.policy`).
struct Policy {
    delete: bool,
    compact: bool,
}

fn policy(stream: &Stream) -> Policy {
    let v = stream
        .config
        .get("cleanup.policy")
        .map_or("delete", String::as_str);
    let has = |p: &str| v.split(',').any(|x| x.trim() == p);
    Policy {
        delete: has("delete"),
        compact: has("compact"),
    }
}

fn config_i64(stream: &Stream, key: &str, default: i64) -> i64 {
    stream
        .config
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Compactor {
    pub fn new(placement: PlacementClient, store: ObjectStorage, config: CompactorConfig) -> Self {
        Self {
            placement,
            store,
            config,
        }
    }

    pub fn config(&self) -> &CompactorConfig {
        &self.config
    }

    /// Take (or renew) the compaction lease; its epoch.
    async fn lease(&self, ttl: Duration) -> Result<u64> {
        let cmd = Command::AcquireCompactionLease {
            holder: self.config.holder.clone(),
            now_ms: now_ms(),
            ttl_ms: ms(ttl).max(1),
        };
        match self.placement.write(cmd).await? {
            Reply::CompactionLease { epoch, .. } => Ok(epoch),
            Reply::Rejected {
                rejection: shoal_placement::Rejection::CompactionLeaseHeld { holder, until_ms },
            } => Err(Error::LeaseHeld { holder, until_ms }),
            Reply::Rejected { rejection } => Err(Error::Rejected {
                what: "the compaction lease".into(),
                rejection,
            }),
            other => Err(Error::Unexpected {
                what: "AcquireCompactionLease".into(),
                reply: format!("{other:?}"),
            }),
        }
    }

    /// One pass: retention, compaction, garbage collection, within
    /// `budget`. Returns what it did (also recorded in placement). Fails
    /// without doing anything when another compactor holds the lease.
    pub async fn run_once(&self, budget: Budget) -> Result<RunReport> {
        let started = Instant::now();
        let epoch = self.lease(self.config.lease_ttl).await?;
        let mut report = RunReport {
            holder: self.config.holder.clone(),
            epoch,
            started_ms: now_ms(),
            ..RunReport::default()
        };
        // Renewed while the run lasts, so the lease can be short: a
        // compactor that dies is replaced within one lease time.
        // Both futures are polled side by side: a renewal never stops the
        // work from being polled (say, halfway through a placement write),
        // and the work never delays a renewal.
        let renewals = async {
            let mut renew = tokio::time::interval(self.config.lease_ttl / 3);
            renew.tick().await;
            loop {
                renew.tick().await;
                if let Err(e) = self.lease(self.config.lease_ttl).await {
                    tracing::warn!("renewing the compaction lease: {e}");
                }
            }
        };
        let outcome = tokio::select! {
            done = self.work(epoch, budget, &mut report) => done,
            never = renewals => never,
        };
        if let Err(e) = &outcome {
            report.errors.push(e.to_string());
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Give the lease up: the next run (or another compactor) takes a
        // new epoch right away.
        if let Err(e) = self.lease(Duration::from_millis(1)).await {
            tracing::debug!("releasing the compaction lease: {e}");
        }
        let recorded = self
            .placement
            .write(Command::RecordCompactionRun {
                run: report.clone(),
            })
            .await;
        if let Err(e) = recorded {
            tracing::warn!("recording the compaction run: {e}");
        }
        tracing::info!(
            epoch,
            objects_in = report.objects_in,
            objects_out = report.objects_out,
            bytes_in = report.bytes_in,
            bytes_out = report.bytes_out,
            trimmed = report.shards_trimmed,
            deleted = report.objects_deleted,
            unfinished = report.unfinished,
            errors = report.errors.len(),
            ms = report.duration_ms,
            "compaction run"
        );
        Ok(report)
    }

    async fn work(&self, mut epoch: u64, budget: Budget, report: &mut RunReport) -> Result<()> {
        let streams = self.placement.list_streams().await?;
        let lifecycle = self.placement.lifecycle().await?;
        let now = now_ms();

        // Retention first: what it drops need not be rewritten.
        for stream in &streams {
            let p = policy(stream);
            if !p.delete {
                continue;
            }
            let retention_ms = lifecycle.retention_ms(stream);
            let retention_bytes = config_i64(stream, "retention.bytes", -1);
            for shard in &stream.shards {
                let Some(start) = plan::retention_start(shard, retention_ms, retention_bytes, now)
                else {
                    continue;
                };
                let cmd = Command::AdvanceLogStart {
                    stream: stream.name.clone(),
                    shard: shard.shard,
                    offset: start,
                    now_ms: now,
                    compaction_epoch: Some(epoch),
                };
                match self.placement.write(cmd).await? {
                    Reply::LogStart { .. } => report.shards_trimmed += 1,
                    Reply::Rejected { rejection } => report.errors.push(format!(
                        "retention of {}/{}: {rejection}",
                        stream.name, shard.shard
                    )),
                    other => report
                        .errors
                        .push(format!("retention: unexpected {other:?}")),
                }
            }
        }

        // Compaction, on the index as retention left it.
        let streams = self.placement.list_streams().await?;
        let mut jobs = Vec::new();
        for stream in &streams {
            let p = policy(stream);
            let lag = if p.compact {
                config_i64(stream, "min.compaction.lag.ms", 0).max(ms(self.config.delay))
            } else {
                ms(self.config.delay)
            };
            let cutoff = now.saturating_sub(lag);
            for shard in &stream.shards {
                let eligible = &shard.segments[..plan::eligible_prefix(&shard.segments, cutoff)];
                if p.compact {
                    // The whole settled log keeps one record per key;
                    // rewritten when new flush ranges arrived in it.
                    if eligible.iter().any(|r| plan::is_flush(&r.object)) {
                        let horizon = config_i64(stream, "delete.retention.ms", 86_400_000);
                        jobs.push(rewrite::Job {
                            stream: stream.name.clone(),
                            shard: shard.shard,
                            run: eligible.to_vec(),
                            keep_latest: Some(rewrite::KeepLatest {
                                tombstones_before_ms: now.saturating_sub(horizon),
                            }),
                        });
                    }
                    continue;
                }
                for run in plan::compaction_runs(eligible, self.config.target_size) {
                    jobs.push(rewrite::Job {
                        stream: stream.name.clone(),
                        shard: shard.shard,
                        run,
                        keep_latest: None,
                    });
                }
            }
        }
        let mut written = 0u64;
        let mut footers = std::collections::HashMap::new();
        let mut replaced: std::collections::HashSet<String> = std::collections::HashSet::new();
        for job in jobs {
            if budget.exhausted() {
                report.unfinished = true;
                break;
            }
            // Renewed before each rewrite, so a long run keeps its lease;
            // a lapse meanwhile means a new epoch, which the index swap
            // then carries.
            epoch = self.lease(self.config.lease_ttl).await?;
            let name = format!("{}/{}", job.stream, job.shard);
            let objects: Vec<String> = job.run.iter().map(|r| r.object.clone()).collect();
            let target = rewrite::Target {
                store: &self.store,
                placement: &self.placement,
                epoch,
                written: &mut written,
                target_size: self.config.target_size,
                row_group_bytes: self.config.row_group_bytes,
                now_ms: now_ms(),
                footers: &mut footers,
            };
            match rewrite::rewrite(target, job).await {
                Ok(done) => {
                    replaced.extend(objects);
                    report.objects_in = replaced.len() as u64;
                    report.objects_out += done.objects_out;
                    report.bytes_in += done.bytes_in;
                    report.bytes_out += done.bytes_out;
                }
                Err(e @ Error::Rejected { .. }) => {
                    report.errors.push(format!("{name}: {e}"));
                }
                Err(e) => return Err(e),
            }
        }

        if budget.exhausted() {
            report.unfinished = true;
            return Ok(());
        }
        epoch = self.lease(self.config.lease_ttl).await?;
        let collected = gc::collect(gc::Collect {
            store: &self.store,
            placement: &self.placement,
            epoch,
            now_ms: now_ms(),
            gc_grace_ms: ms(self.config.gc_grace),
            orphan_grace_ms: ms(self.config.orphan_grace),
            max_deletes: self.config.max_deletes,
        })
        .await?;
        report.objects_deleted += collected.deleted.len() as u64;
        report.unfinished |= collected.unfinished;
        Ok(())
    }
}

/// Run `compactor` every `interval` until `shutdown` fires (the service
/// form: `shoal standalone`, `shoal compactor`).
pub async fn run_every(
    compactor: Compactor,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        match compactor.run_once(Budget::UNLIMITED).await {
            Ok(_) => {}
            Err(Error::LeaseHeld { holder, .. }) => {
                tracing::debug!(%holder, "another compactor holds the lease");
            }
            Err(e) => tracing::warn!("compaction run failed: {e}"),
        }
    }
}
