//! Deciding what to do, without I/O: which runs of a shard's index to
//! rewrite (size tiers), and where retention moves a log start.

use shoal_placement::{SegmentRef, Shard};

/// Flush objects (many shards, written by brokers) live under this prefix.
pub const FLUSH_PREFIX: &str = "segments/";

pub(crate) fn is_flush(object: &str) -> bool {
    object.starts_with(FLUSH_PREFIX)
}

/// Bytes a range counts for: its row group's size, or for ranges recorded
/// before sizes were, the whole object (an overestimate).
pub(crate) fn range_bytes(r: &SegmentRef) -> u64 {
    if r.bytes > 0 { r.bytes } else { r.object_size }
}

/// Consecutive index entries of one object.
#[derive(Debug)]
struct Unit<'a> {
    refs: &'a [SegmentRef],
    flush: bool,
    size: u64,
}

/// Split a run of index entries into units of one object each.
fn units(segments: &[SegmentRef]) -> Vec<Unit<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=segments.len() {
        if i == segments.len() || segments[i].object != segments[start].object {
            let refs = &segments[start..i];
            let flush = is_flush(&refs[0].object);
            let size = if flush {
                refs.iter().map(range_bytes).sum()
            } else {
                refs[0].object_size
            };
            out.push(Unit { refs, flush, size });
            start = i;
        }
    }
    out
}

/// Bytes a run of entries occupies (whole compacted files, flush ranges).
pub(crate) fn run_bytes(run: &[SegmentRef]) -> u64 {
    units(run).iter().map(|u| u.size).sum()
}

/// How many leading entries were committed before `cutoff_ms` (commit
/// times only grow along the index).
pub(crate) fn eligible_prefix(segments: &[SegmentRef], cutoff_ms: i64) -> usize {
    segments
        .iter()
        .position(|s| s.committed_ms > cutoff_ms)
        .unwrap_or(segments.len())
}

#[derive(Debug)]
struct Group {
    start: usize,
    end: usize,
    size: u64,
    units: usize,
    flush: bool,
}

/// The runs of `segments` (the eligible prefix of one shard's index) to
/// rewrite, each into one file of at most about `target` bytes.
///
/// Size-tiered: consecutive flush ranges are gathered up to `target`, and a
/// file is merged into its successor while it is at most twice as large,
/// so each byte is rewritten about log2(target / flush size) times and a
/// shard settles into files of `target` size plus a short tail of
/// geometrically smaller ones.
pub(crate) fn compaction_runs(segments: &[SegmentRef], target: u64) -> Vec<Vec<SegmentRef>> {
    let mut stack: Vec<Group> = Vec::new();
    let mut at = 0;
    for u in units(segments) {
        let n = u.refs.len();
        match stack.last_mut() {
            Some(top) if u.flush && top.flush && top.size + u.size <= target => {
                top.end += n;
                top.size += u.size;
                top.units += 1;
            }
            _ => stack.push(Group {
                start: at,
                end: at + n,
                size: u.size,
                units: 1,
                flush: u.flush,
            }),
        }
        at += n;
        while stack.len() >= 2 {
            let (a, b) = (&stack[stack.len() - 2], &stack[stack.len() - 1]);
            if a.size > b.size.saturating_mul(2) || a.size + b.size > target {
                break;
            }
            let b = stack.pop().unwrap_or_else(|| unreachable!());
            let a = stack.last_mut().unwrap_or_else(|| unreachable!());
            a.end = b.end;
            a.size += b.size;
            a.units += b.units;
            a.flush |= b.flush;
        }
    }
    stack
        .into_iter()
        .filter(|g| g.flush || g.units > 1)
        .map(|g| segments[g.start..g.end].to_vec())
        .collect()
}

/// Where retention moves the log start of `shard`, if anywhere: past every
/// leading range whose newest record is older than `retention_ms`, and
/// past leading ranges while the shard holds more than `retention_bytes`
/// (each -1 for no limit). Whole ranges only, as Kafka deletes whole
/// segments.
pub(crate) fn retention_start(
    shard: &Shard,
    retention_ms: i64,
    retention_bytes: i64,
    now_ms: i64,
) -> Option<i64> {
    let segs = &shard.segments;
    let mut drop = 0;
    if retention_ms >= 0 {
        let cutoff = now_ms.saturating_sub(retention_ms);
        drop = segs
            .iter()
            .position(|s| s.max_timestamp_ms >= cutoff)
            .unwrap_or(segs.len());
    }
    if retention_bytes >= 0 {
        let limit = u64::try_from(retention_bytes).unwrap_or(0);
        let mut total: u64 = segs[drop..].iter().map(range_bytes).sum();
        while drop < segs.len() && total > limit {
            total -= range_bytes(&segs[drop]);
            drop += 1;
        }
    }
    if drop == 0 {
        return None;
    }
    let start = segs
        .get(drop)
        .map_or(shard.committed_offset, |s| s.first_offset);
    (start > shard.log_start_offset).then_some(start)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn flush(i: u64, first: i64, last: i64, bytes: u64) -> SegmentRef {
        SegmentRef {
            object: format!("segments/x/{i}.parquet"),
            row_group: 0,
            first_offset: first,
            last_offset: last,
            epoch: 1,
            record_count: (last - first + 1) as u64,
            min_timestamp_ms: first,
            max_timestamp_ms: last,
            object_size: bytes * 3,
            committed_ms: last,
            bytes,
        }
    }

    fn compacted(name: &str, first: i64, last: i64, size: u64) -> SegmentRef {
        SegmentRef {
            object: format!("streams/s/shard=0/{name}.parquet"),
            object_size: size,
            bytes: size,
            ..flush(0, first, last, size)
        }
    }

    fn spans(runs: &[Vec<SegmentRef>]) -> Vec<(i64, i64)> {
        runs.iter()
            .map(|r| (r[0].first_offset, r[r.len() - 1].last_offset))
            .collect()
    }

    #[test]
    fn flush_ranges_gather_up_to_the_target() {
        let segs: Vec<_> = (0..10)
            .map(|i| flush(i, i as i64 * 10, i as i64 * 10 + 9, 100))
            .collect();
        assert_eq!(spans(&compaction_runs(&segs, 1000)), [(0, 99)]);
        assert_eq!(
            spans(&compaction_runs(&segs, 400)),
            [(0, 39), (40, 79), (80, 99)]
        );
    }

    #[test]
    fn a_small_file_merges_with_new_data_of_similar_size_only() {
        let small = compacted("a", 0, 99, 150);
        let mut segs = vec![small.clone(), flush(1, 100, 109, 100)];
        // 150 <= 2 * 100: merged.
        assert_eq!(spans(&compaction_runs(&segs, 10_000)), [(0, 109)]);
        // A much larger file stays; only the new data is rewritten.
        segs[0] = compacted("a", 0, 99, 5_000);
        assert_eq!(spans(&compaction_runs(&segs, 10_000)), [(100, 109)]);
        // A settled index is left alone.
        let settled = vec![
            compacted("a", 0, 99, 5_000),
            compacted("b", 100, 199, 1_000),
        ];
        assert!(compaction_runs(&settled, 10_000).is_empty());
    }

    #[test]
    fn repeated_runs_keep_few_files() {
        // Simulate many runs, each adding ten flush ranges.
        let mut index: Vec<SegmentRef> = Vec::new();
        let mut next = 0i64;
        let mut written = 0u64;
        for run in 0..200u64 {
            for i in 0..10 {
                index.push(flush(run * 10 + i, next, next + 9, 100));
                next += 10;
            }
            for r in compaction_runs(&index, 1 << 20) {
                let size: u64 = units(&r).iter().map(|u| u.size).sum();
                written += size;
                let at = index.iter().position(|s| s == &r[0]).unwrap();
                let name = format!("{run}-{at}");
                index.splice(
                    at..at + r.len(),
                    [compacted(
                        &name,
                        r[0].first_offset,
                        r[r.len() - 1].last_offset,
                        size,
                    )],
                );
            }
        }
        let total = 200 * 10 * 100;
        assert!(index.len() <= 12, "{} files", index.len());
        assert!(
            written <= total * 12,
            "write amplification {}",
            written / total
        );
    }

    #[test]
    fn retention_drops_whole_expired_ranges() {
        let shard = Shard {
            committed_offset: 30,
            segments: vec![
                flush(0, 0, 9, 10),
                flush(1, 10, 19, 10),
                flush(2, 20, 29, 10),
            ],
            ..Shard::default()
        };
        // Newest timestamps are 9, 19, 29.
        assert_eq!(retention_start(&shard, 100, -1, 115), Some(10));
        assert_eq!(retention_start(&shard, 100, -1, 125), Some(20));
        assert_eq!(retention_start(&shard, 100, -1, 105), None);
        assert_eq!(retention_start(&shard, 0, -1, 1000), Some(30));
        assert_eq!(retention_start(&shard, -1, 15, 0), Some(20));
        assert_eq!(retention_start(&shard, -1, -1, 1000), None);
    }
}
