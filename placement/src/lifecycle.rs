//! The data lifecycle's part of the state machine: the compaction lease,
//! index swaps by compaction, log-start moves by retention and
//! DeleteRecords, and the objects they retired until garbage collection
//! deletes them. Pure, like the rest of the state machine.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{CompactionRun, Rejection, Reply, SegmentReplacement};
use crate::model::{Shard, Stream};

/// Kafka's default `retention.ms` (7 days), for streams that follow the
/// cluster default while none was set.
pub const DEFAULT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// How many compaction runs placement remembers.
pub const RUNS_KEPT: usize = 20;
/// Errors kept per recorded run, and bytes per error.
const MAX_RUN_ERRORS: usize = 20;
const MAX_ERROR_LEN: usize = 1024;

/// Who may commit compaction results, and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionLease {
    pub epoch: u64,
    pub holder: String,
    pub expires_ms: i64,
}

/// Sums over every recorded compaction run, for metrics (counters that
/// survive compactor restarts and are the same on every broker).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionTotals {
    pub runs: u64,
    /// Runs that reported at least one error.
    pub failed_runs: u64,
    pub objects_in: u64,
    pub objects_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub objects_deleted: u64,
    pub shards_trimmed: u64,
    /// Duration of the last run, ms.
    pub last_run_ms: u64,
    /// Objects retired and not yet deleted (a gauge).
    pub retired: u64,
}

/// What placement keeps for the data lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    #[serde(default)]
    pub lease: CompactionLease,
    /// Objects that lost index entries, with when the last one went:
    /// garbage collection deletes those no shard references any more once
    /// the grace period from that moment has passed.
    #[serde(default)]
    pub retired: BTreeMap<String, i64>,
    #[serde(default)]
    pub runs: VecDeque<CompactionRun>,
    /// The cluster-wide default `retention.ms`; `None` until set, which
    /// means Kafka's 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_retention_ms: Option<i64>,
    #[serde(default)]
    pub totals: CompactionTotals,
}

impl Lifecycle {
    pub fn default_retention_ms(&self) -> i64 {
        self.default_retention_ms.unwrap_or(DEFAULT_RETENTION_MS)
    }

    /// The `retention.ms` that applies to `stream`: its own setting, else
    /// the cluster default for streams created under it, else unlimited.
    pub fn retention_ms(&self, stream: &Stream) -> i64 {
        match stream
            .config
            .get("retention.ms")
            .and_then(|v| v.parse().ok())
        {
            Some(ms) => ms,
            None if stream.retention_default => self.default_retention_ms(),
            None => -1,
        }
    }

    pub(crate) fn acquire(&mut self, holder: String, now_ms: i64, ttl_ms: i64) -> Reply {
        if ttl_ms <= 0 {
            return rejected(Rejection::Invalid {
                reason: format!("compaction lease ttl {ttl_ms} ms"),
            });
        }
        if self.lease.holder != holder && now_ms < self.lease.expires_ms {
            return rejected(Rejection::CompactionLeaseHeld {
                holder: self.lease.holder.clone(),
                until_ms: self.lease.expires_ms,
            });
        }
        // A holder renewing a lease it still has keeps its epoch; any
        // other grant (a new holder, or one whose lease ran out and may
        // have been taken meanwhile) fences what came before.
        if self.lease.holder != holder || now_ms >= self.lease.expires_ms || self.lease.epoch == 0 {
            self.lease.epoch += 1;
            self.lease.holder = holder;
        }
        self.lease.expires_ms = now_ms.saturating_add(ttl_ms);
        Reply::CompactionLease {
            epoch: self.lease.epoch,
            expires_ms: self.lease.expires_ms,
        }
    }

    pub(crate) fn check_epoch(&self, epoch: u64) -> Result<(), Rejection> {
        if epoch == self.lease.epoch {
            Ok(())
        } else {
            Err(Rejection::StaleCompaction {
                epoch,
                current: self.lease.epoch,
            })
        }
    }

    /// Swap a run of index entries for the compacted ones.
    pub(crate) fn replace(&mut self, shard: &mut Shard, r: SegmentReplacement) -> Reply {
        if let Err(e) = self.check_epoch(r.compaction_epoch) {
            return rejected(e);
        }
        let changed = || {
            rejected(Rejection::IndexChanged {
                stream: r.stream.clone(),
                shard: r.shard,
            })
        };
        let (Some(first), Some(last)) = (r.replaced.first(), r.replaced.last()) else {
            return changed();
        };
        // The same swap again (a retry whose first answer was lost, maybe
        // across a leader change): already applied.
        if let Some(at) = r
            .with
            .first()
            .and_then(|w| shard.segments.iter().position(|s| s == w))
            && shard.segments.get(at..at + r.with.len()) == Some(&r.with[..])
        {
            return Reply::Done;
        }
        let Some(at) = shard.segments.iter().position(|s| first.names(s)) else {
            return changed();
        };
        let run = shard.segments.get(at..at + r.replaced.len());
        if !run.is_some_and(|run| run.iter().zip(&r.replaced).all(|(s, id)| id.names(s))) {
            return changed();
        }
        let dense = r.with.first().map(|w| w.first_offset) == Some(first.first_offset)
            && r.with.last().map(|w| w.last_offset) == Some(last.last_offset)
            && r.with
                .windows(2)
                .all(|w| w[0].last_offset.checked_add(1) == Some(w[1].first_offset))
            && r.with.iter().all(|w| w.last_offset >= w.first_offset);
        if !dense {
            return rejected(Rejection::Invalid {
                reason: format!(
                    "replacement of {}/{} [{}, {}] is not dense over the same offsets",
                    r.stream, r.shard, first.first_offset, last.last_offset
                ),
            });
        }
        for id in &r.replaced {
            self.retire(&id.object, r.now_ms);
        }
        shard.segments.splice(at..at + r.replaced.len(), r.with);
        shard.index_version += 1;
        Reply::Done
    }

    /// Move the log start of `shard` to `offset` (never back, never past
    /// what is committed).
    pub(crate) fn advance_start(&mut self, shard: &mut Shard, offset: i64, now_ms: i64) -> Reply {
        if offset > shard.committed_offset {
            return rejected(Rejection::Invalid {
                reason: format!(
                    "log start {offset} is past the committed offset {}",
                    shard.committed_offset
                ),
            });
        }
        if offset > shard.log_start_offset {
            shard.log_start_offset = offset;
            let keep = shard.segments.partition_point(|s| s.last_offset < offset);
            for gone in shard.segments.drain(..keep) {
                self.retire(&gone.object, now_ms);
            }
            shard.index_version += 1;
        }
        Reply::LogStart {
            offset: shard.log_start_offset,
        }
    }

    /// Every object of a deleted stream is retired (flush objects other
    /// streams still use stay: collection checks references).
    pub(crate) fn retire_stream(&mut self, stream: &Stream, now_ms: i64) {
        for shard in &stream.shards {
            for s in &shard.segments {
                self.retire(&s.object, now_ms);
            }
        }
    }

    /// `object` lost an index entry at `at_ms`: its grace counts from the
    /// latest such moment, never from an earlier one.
    fn retire(&mut self, object: &str, at_ms: i64) {
        let since = self.retired.entry(object.to_string()).or_insert(at_ms);
        *since = (*since).max(at_ms);
    }

    pub(crate) fn forget(&mut self, epoch: u64, objects: Vec<String>) -> Reply {
        if let Err(e) = self.check_epoch(epoch) {
            return rejected(e);
        }
        for o in objects {
            self.retired.remove(&o);
        }
        Reply::Done
    }

    /// The totals, with the retired-object gauge filled in.
    pub fn totals(&self) -> CompactionTotals {
        CompactionTotals {
            retired: self.retired.len() as u64,
            ..self.totals.clone()
        }
    }

    pub(crate) fn record(&mut self, run: CompactionRun) -> Reply {
        let mut run = run;
        // A report is kept whole in the state: bound what it can add.
        run.errors.truncate(MAX_RUN_ERRORS);
        for e in &mut run.errors {
            if e.len() > MAX_ERROR_LEN {
                let mut cut = MAX_ERROR_LEN;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
        }
        let t = &mut self.totals;
        t.runs = t.runs.saturating_add(1);
        t.failed_runs = t
            .failed_runs
            .saturating_add(u64::from(!run.errors.is_empty()));
        t.objects_in = t.objects_in.saturating_add(run.objects_in);
        t.objects_out = t.objects_out.saturating_add(run.objects_out);
        t.bytes_in = t.bytes_in.saturating_add(run.bytes_in);
        t.bytes_out = t.bytes_out.saturating_add(run.bytes_out);
        t.objects_deleted = t.objects_deleted.saturating_add(run.objects_deleted);
        t.shards_trimmed = t.shards_trimmed.saturating_add(run.shards_trimmed);
        t.last_run_ms = run.duration_ms;
        self.runs.push_back(run);
        while self.runs.len() > RUNS_KEPT {
            self.runs.pop_front();
        }
        Reply::Done
    }
}

fn rejected(rejection: Rejection) -> Reply {
    Reply::Rejected { rejection }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::RangeId;
    use crate::model::SegmentRef;

    fn seg(object: &str, first: i64, last: i64) -> SegmentRef {
        SegmentRef {
            object: object.into(),
            row_group: 0,
            first_offset: first,
            last_offset: last,
            epoch: 1,
            record_count: (last - first + 1) as u64,
            min_timestamp_ms: 0,
            max_timestamp_ms: 0,
            object_size: 10,
            committed_ms: 0,
            bytes: 5,
        }
    }

    fn shard() -> Shard {
        Shard {
            committed_offset: 30,
            segments: vec![seg("a", 0, 9), seg("b", 10, 19), seg("c", 20, 29)],
            ..Shard::default()
        }
    }

    fn replacement(epoch: u64, ids: &[SegmentRef], with: Vec<SegmentRef>) -> SegmentReplacement {
        SegmentReplacement {
            compaction_epoch: epoch,
            stream: "s".into(),
            shard: 0,
            replaced: ids.iter().map(RangeId::of).collect(),
            with,
            now_ms: 100,
        }
    }

    #[test]
    fn only_the_current_lease_holder_commits() {
        let mut l = Lifecycle::default();
        let Reply::CompactionLease { epoch: first, .. } = l.acquire("x".into(), 0, 1000) else {
            panic!("no lease")
        };
        assert!(matches!(
            l.acquire("y".into(), 500, 1000),
            Reply::Rejected {
                rejection: Rejection::CompactionLeaseHeld { .. }
            }
        ));
        // Renewed in time: same epoch.
        assert_eq!(
            l.acquire("x".into(), 900, 1000),
            Reply::CompactionLease {
                epoch: first,
                expires_ms: 1900
            }
        );
        // Expired: another holder gets a new epoch and fences the first.
        let Reply::CompactionLease { epoch: second, .. } = l.acquire("y".into(), 2000, 1000) else {
            panic!("no lease")
        };
        assert!(second > first);
        let mut sh = shard();
        let stale = replacement(first, &sh.segments[..2], vec![seg("n", 0, 19)]);
        assert!(matches!(
            l.replace(&mut sh, stale),
            Reply::Rejected {
                rejection: Rejection::StaleCompaction { .. }
            }
        ));
        // The first holder coming back after expiry is a new grant too.
        let Reply::CompactionLease { epoch: third, .. } = l.acquire("x".into(), 3100, 1000) else {
            panic!("no lease")
        };
        assert!(third > second);
    }

    #[test]
    fn a_replacement_swaps_exactly_the_named_run() {
        let mut l = Lifecycle::default();
        l.acquire("x".into(), 0, 1000);
        let mut sh = shard();
        let run = sh.segments[..2].to_vec();
        assert_eq!(
            l.replace(&mut sh, replacement(1, &run, vec![seg("n", 0, 19)])),
            Reply::Done
        );
        let objects: Vec<&str> = sh.segments.iter().map(|s| s.object.as_str()).collect();
        assert_eq!(objects, ["n", "c"]);
        // The same swap retried (its answer lost) is recognised as done.
        assert_eq!(
            l.replace(&mut sh, replacement(1, &run, vec![seg("n", 0, 19)])),
            Reply::Done
        );
        assert_eq!(sh.segments.len(), 2);
        assert_eq!(sh.index_version, 1);
        assert_eq!(l.retired.keys().collect::<Vec<_>>(), ["a", "b"]);
        // The same run again is gone.
        assert!(matches!(
            l.replace(&mut sh, replacement(1, &run, vec![seg("m", 0, 19)])),
            Reply::Rejected {
                rejection: Rejection::IndexChanged { .. }
            }
        ));
        // New entries must cover the same offsets densely.
        let c = sh.segments[1..].to_vec();
        assert!(matches!(
            l.replace(&mut sh, replacement(1, &c, vec![seg("m", 20, 28)])),
            Reply::Rejected {
                rejection: Rejection::Invalid { .. }
            }
        ));
    }

    #[test]
    fn the_log_start_only_moves_forward_and_drops_whole_ranges() {
        let mut l = Lifecycle::default();
        let mut sh = shard();
        assert_eq!(
            l.advance_start(&mut sh, 15, 7),
            Reply::LogStart { offset: 15 }
        );
        assert_eq!(
            sh.segments.len(),
            2,
            "a range still holding live offsets stays"
        );
        assert_eq!(l.retired.get("a"), Some(&7));
        assert_eq!(
            l.advance_start(&mut sh, 3, 8),
            Reply::LogStart { offset: 15 }
        );
        assert!(matches!(
            l.advance_start(&mut sh, 31, 9),
            Reply::Rejected { .. }
        ));
        assert_eq!(
            l.advance_start(&mut sh, 30, 9),
            Reply::LogStart { offset: 30 }
        );
        assert!(sh.segments.is_empty());
    }
}
