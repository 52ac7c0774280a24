//! Reading the log back at open (sans-io: segment bytes in, entries and
//! damage reports out).
//!
//! Each segment is scanned record by record. What ends a segment's data:
//! the end of the file, a record left over from the file's earlier life
//! (its seq does not increase), or a record header that fails its checksum.
//! After a damaged header the scan looks further on for a readable header
//! with a higher seq, so damage in the middle of a segment does not hide
//! the records after it.
//!
//! Damage is then judged by durability. A record's `durable` field says
//! which seqs were fsynced before its group was written, and a segment's
//! header says which were durable when it was started. Damage to a record
//! that a later record (or segment) proves durable is reported: records a
//! caller may have been promised are unreadable. Damage nothing proves
//! durable is a torn last group, never acknowledged: it and everything
//! after it in that segment are dropped.

use bytes::Bytes;

use super::format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader};

/// Something found at one position of a segment.
#[derive(Debug)]
enum Item {
    Record {
        seq: u64,
        durable: u64,
        /// Byte range of the payload in the segment.
        payload: std::ops::Range<usize>,
        payload_ok: bool,
    },
    /// Unreadable bytes after the record with seq `after` (or the start of
    /// the segment): how many records they held is unknown.
    Gap { after: u64 },
    /// Where the segment's data ends; entries after `after` that a later
    /// segment says were durable are missing.
    End { after: u64 },
}

/// Damage that lost records a caller may have been promised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// An entry whose payload fails its checksum; its seq is known and its
    /// bytes are returned as found (the caller may recognise a part of them).
    Entry { seq: u64, payload: Bytes },
    /// Unreadable bytes: whatever entries had seqs in `after+1..before`
    /// are lost (`before` is `None` when nothing readable follows).
    Unreadable { after: u64, before: Option<u64> },
}

/// One readable segment as found on disk.
pub(super) struct ScannedSegment {
    pub id: u64,
    pub header: SegmentHeader,
    pub bytes: Bytes,
    items: Vec<Item>,
}

/// Scan one segment file's bytes; `None` if it has no valid header (a
/// spare, or a segment whose first write never completed).
pub(super) fn scan(id: u64, bytes: Bytes) -> Option<ScannedSegment> {
    let header = SegmentHeader::decode(&bytes)?;
    let mut items = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut last = start_after(&header);
    loop {
        match record_at(&bytes, pos, last) {
            Found::Record(h) => {
                let start = pos + RECORD_HEADER_LEN;
                let end = start + h.payload_len as usize;
                items.push(Item::Record {
                    seq: h.seq,
                    durable: h.durable,
                    payload: start..end,
                    payload_ok: h.payload_ok(&bytes[start..end]),
                });
                last = h.seq;
                pos = end;
            }
            Found::End => {
                items.push(Item::End { after: last });
                break;
            }
            Found::Damaged => {
                items.push(Item::Gap { after: last });
                match resync(&bytes, pos + 1, last) {
                    Some(next) => pos = next,
                    None => {
                        items.push(Item::End { after: last });
                        break;
                    }
                }
            }
        }
    }
    Some(ScannedSegment {
        id,
        header,
        bytes,
        items,
    })
}

/// The seq a segment's records follow: entries are above it, and above
/// what was durable before the segment began.
fn start_after(h: &SegmentHeader) -> u64 {
    h.first_seq.saturating_sub(1).max(h.prev_last_seq)
}

enum Found {
    Record(RecordHeader),
    /// Clean end: no room for a header, zeros, or a stale record.
    End,
    Damaged,
}

fn record_at(bytes: &[u8], pos: usize, last: u64) -> Found {
    let Some(h) = bytes.get(pos..pos + RECORD_HEADER_LEN) else {
        return Found::End;
    };
    if h.iter().all(|b| *b == 0) {
        return Found::End;
    }
    let Some(rec) = RecordHeader::decode(h) else {
        return Found::Damaged;
    };
    if rec.seq <= last {
        // Left from the file's earlier life.
        return Found::End;
    }
    if bytes.len() - pos - RECORD_HEADER_LEN < rec.payload_len as usize {
        // Cut short: the write of its group never completed.
        return Found::Damaged;
    }
    Found::Record(rec)
}

/// The next position at or after `from` holding a readable record with a
/// seq above `last`.
fn resync(bytes: &[u8], from: usize, last: u64) -> Option<usize> {
    let mut pos = from;
    while pos + RECORD_HEADER_LEN <= bytes.len() {
        if bytes[pos] == 0 && bytes[pos..pos + RECORD_HEADER_LEN].iter().all(|b| *b == 0) {
            // Skip a run of zeros (a pre-allocated, never written stretch).
            match bytes[pos..].iter().position(|b| *b != 0) {
                Some(skip) => {
                    pos += skip.saturating_sub(RECORD_HEADER_LEN - 1).max(1);
                    continue;
                }
                None => return None,
            }
        }
        if let Found::Record(_) = record_at(bytes, pos, last) {
            return Some(pos);
        }
        pos += 1;
    }
    None
}

/// The log as read back.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// Entries above the truncation mark, in seq order.
    pub entries: Vec<(u64, Bytes)>,
    pub damage: Vec<Damage>,
    /// The last seq of the readable log (what a new segment's header
    /// records as durable before it).
    pub last_seq: u64,
    /// Numbering continues above this: the highest seq any record or
    /// header shows, dead ones (a torn or failed group) included.
    pub max_seq: u64,
    /// Ids of the segments still holding live data, oldest first, with
    /// their first and last seq.
    pub live: Vec<(u64, u64, u64)>,
    /// The highest segment number seen.
    pub max_number: u64,
}

/// Put the scanned segments together in seq order; entries at or below
/// `truncated_through` (the truncation mark) are gone.
pub(super) fn recover(mut segments: Vec<ScannedSegment>, truncated_through: u64) -> Recovered {
    segments.sort_by_key(|s| s.header.number);
    let mut out = Recovered::default();
    let mut entries: Vec<(u64, Bytes)> = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        let next = segments.get(i + 1).map(|n| n.header);
        // Records above this are a failed group, never acknowledged.
        let ceiling = next.map_or(u64::MAX, |n| n.prev_last_seq);
        if i == 0 && s.header.prev_last_seq > 0 {
            // The segments before the oldest one were recycled once all
            // their entries were truncated; whether that covers this header's
            // mark is checked against the truncation mark at the end.
            out.damage.push(Damage::Unreadable {
                after: 0,
                before: Some(s.header.prev_last_seq + 1),
            });
        }
        // Highest seq proven durable by a later item of this segment
        // (suffix maximum), or by the next segment's header.
        let mut proven = vec![0u64; s.items.len() + 1];
        proven[s.items.len()] = next.map_or(0, |n| n.prev_last_seq);
        for (j, item) in s.items.iter().enumerate().rev() {
            let d = match item {
                Item::Record { durable, .. } => *durable,
                Item::Gap { .. } | Item::End { .. } => 0,
            };
            proven[j] = proven[j + 1].max(d);
        }
        let mut last = start_after(&s.header);
        let mut reported_after = None;
        for (j, item) in s.items.iter().enumerate() {
            match item {
                Item::Record {
                    seq,
                    payload,
                    payload_ok,
                    ..
                } => {
                    if *seq > ceiling {
                        break;
                    }
                    if !payload_ok {
                        if proven[j + 1] >= *seq {
                            out.damage.push(Damage::Entry {
                                seq: *seq,
                                payload: s.bytes.slice(payload.clone()),
                            });
                            last = *seq;
                            continue;
                        }
                        // A torn last group, or one damaged on disk after
                        // it was acknowledged: nothing later tells which.
                        // Say so, since in the second case records are lost.
                        tracing::warn!(
                            segment = s.id,
                            seq = *seq,
                            "wal: the last group written before the crash is unreadable \
                             from here on; dropped as a write the crash cut short"
                        );
                        break;
                    }
                    entries.push((*seq, s.bytes.slice(payload.clone())));
                    last = *seq;
                }
                Item::Gap { after } | Item::End { after } => {
                    let lost_from = after + 1;
                    if reported_after != Some(*after)
                        && proven[j + 1] >= lost_from
                        && lost_from <= ceiling
                    {
                        reported_after = Some(*after);
                        // Entries a later record or segment says were
                        // durable are not here.
                        let before = s.items[j + 1..]
                            .iter()
                            .find_map(|it| match it {
                                Item::Record { seq, .. } => Some(*seq),
                                _ => None,
                            })
                            .or(next.map(|n| n.prev_last_seq + 1));
                        out.damage.push(Damage::Unreadable {
                            after: *after,
                            before,
                        });
                        if matches!(item, Item::Gap { .. }) {
                            continue;
                        }
                    }
                    break; // the end, or a torn last group
                }
            }
        }
        out.last_seq = out.last_seq.max(last.min(ceiling));
        out.live.push((s.id, s.header.first_seq, last));
        // Every seq ever written here stays used, readable or not, so that
        // no record left in a file (after a failed or torn group) can look
        // newer than a record written after it.
        let seen = s.items.iter().filter_map(|it| match it {
            Item::Record { seq, .. } => Some(*seq),
            _ => None,
        });
        out.max_seq = seen
            .chain([s.header.prev_last_seq, s.header.first_seq.saturating_sub(1)])
            .fold(out.max_seq, u64::max);
        out.max_number = out.max_number.max(s.header.number);
    }
    out.max_seq = out.max_seq.max(out.last_seq).max(truncated_through);
    let t = truncated_through;
    out.entries = entries.into_iter().filter(|(seq, _)| *seq > t).collect();
    // Damage to truncated entries does not matter any more.
    out.damage.retain(|d| match d {
        Damage::Entry { seq, .. } => *seq > t,
        Damage::Unreadable { before, .. } => before.is_none_or(|b| b > t + 1),
    });
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Builder {
        bytes: Vec<u8>,
        offsets: Vec<usize>,
    }

    impl Builder {
        /// Segments are numbered by their first seq in these tests.
        fn new(first_seq: u64, prev_last_seq: u64) -> Self {
            let h = SegmentHeader {
                number: first_seq,
                first_seq,
                prev_last_seq,
            };
            Builder {
                bytes: h.encode().to_vec(),
                offsets: Vec::new(),
            }
        }
        fn entry(mut self, seq: u64, durable: u64) -> Self {
            self.offsets.push(self.bytes.len());
            RecordHeader::write(
                seq,
                durable,
                format!("entry {seq}").as_bytes(),
                &mut self.bytes,
            );
            self
        }
        /// Flip a byte of record `i`'s header (`payload = false`) or payload.
        fn damage(mut self, i: usize, payload: bool) -> Self {
            let at = self.offsets[i] + if payload { RECORD_HEADER_LEN + 1 } else { 9 };
            self.bytes[at] ^= 0xff;
            self
        }
        fn zeros(mut self, n: usize) -> Self {
            self.bytes.extend(std::iter::repeat_n(0, n));
            self
        }
        fn scan(self, id: u64) -> ScannedSegment {
            scan(id, Bytes::from(self.bytes)).unwrap()
        }
    }

    fn seqs(r: &Recovered) -> Vec<u64> {
        r.entries.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn clean_log_reads_back_with_truncation() {
        let a = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 0)
            .entry(3, 2)
            .zeros(100)
            .scan(1);
        let b = Builder::new(4, 3).entry(5, 3).scan(2);
        let r = recover(vec![b, a], 2);
        assert_eq!(seqs(&r), vec![3, 5]);
        assert_eq!(r.entries[0].1, Bytes::from("entry 3"));
        assert!(r.damage.is_empty());
        assert_eq!((r.last_seq, r.max_seq), (5, 5));
    }

    #[test]
    fn a_torn_last_group_is_dropped_not_reported_as_damage() {
        // 3 and 4 form the last group (durable 2): damage there was never
        // acknowledged.
        let torn_payload = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 1)
            .entry(3, 2)
            .entry(4, 2)
            .damage(2, true)
            .scan(1);
        let r = recover(vec![torn_payload], 0);
        assert_eq!(seqs(&r), vec![1, 2]);
        assert!(r.damage.is_empty());
        let torn_header = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 1)
            .entry(3, 2)
            .entry(4, 2)
            .damage(2, false)
            .scan(1);
        let r = recover(vec![torn_header], 0);
        assert_eq!(seqs(&r), vec![1, 2]);
        assert!(r.damage.is_empty());
        assert_eq!(r.last_seq, 2);
    }

    #[test]
    fn damage_to_durable_records_is_reported() {
        // Entry 3's group was fsynced: entry 5 says so.
        let payload = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 1)
            .entry(3, 2)
            .entry(4, 3)
            .entry(5, 4)
            .damage(2, true)
            .scan(1);
        let r = recover(vec![payload], 0);
        assert_eq!(seqs(&r), vec![1, 2, 4, 5]);
        assert!(matches!(&r.damage[..], [Damage::Entry { seq: 3, .. }]));
        let header = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 1)
            .entry(3, 2)
            .entry(4, 3)
            .entry(5, 4)
            .damage(2, false)
            .scan(1);
        let r = recover(vec![header], 0);
        assert_eq!(seqs(&r), vec![1, 2, 4, 5]);
        assert_eq!(
            r.damage,
            vec![Damage::Unreadable {
                after: 2,
                before: Some(4)
            }]
        );
    }

    #[test]
    fn damage_proven_durable_by_the_next_segment_is_reported() {
        let a = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 1)
            .entry(3, 1)
            .damage(2, false)
            .scan(1);
        let b = Builder::new(4, 3).entry(4, 3).scan(2);
        let r = recover(vec![a, b], 0);
        assert_eq!(seqs(&r), vec![1, 2, 4]);
        assert_eq!(
            r.damage,
            vec![Damage::Unreadable {
                after: 2,
                before: Some(4)
            }]
        );
    }

    #[test]
    fn records_above_the_next_segments_mark_are_a_failed_group() {
        // The group 3-4 failed; the next segment starts from 2.
        let a = Builder::new(1, 0)
            .entry(1, 0)
            .entry(2, 1)
            .entry(3, 2)
            .entry(4, 2)
            .scan(1);
        let b = Builder::new(5, 2).entry(5, 2).scan(2);
        let r = recover(vec![a, b], 0);
        assert_eq!(seqs(&r), vec![1, 2, 5]);
        assert!(r.damage.is_empty());
        assert_eq!(r.max_seq, 5);
    }

    #[test]
    fn stale_records_of_a_recycled_file_end_the_segment() {
        // An old life with seqs 1..3, then a new header from 10 over it.
        let old = Builder::new(1, 0).entry(1, 0).entry(2, 1).entry(3, 2);
        let mut bytes = old.bytes;
        let mut fresh = Vec::new();
        fresh.extend_from_slice(
            &SegmentHeader {
                number: 2,
                first_seq: 10,
                prev_last_seq: 0,
            }
            .encode(),
        );
        RecordHeader::write(10, 9, b"new", &mut fresh);
        bytes[..fresh.len()].copy_from_slice(&fresh);
        let r = recover(vec![scan(1, Bytes::from(bytes)).unwrap()], 0);
        assert_eq!(seqs(&r), vec![10]);
        assert!(r.damage.is_empty(), "{:?}", r.damage);
    }

    #[test]
    fn a_missing_first_segment_is_damage_unless_truncated() {
        let lost = Builder::new(6, 5).entry(6, 5).scan(2);
        let r = recover(vec![lost], 0);
        assert_eq!(
            r.damage,
            vec![Damage::Unreadable {
                after: 0,
                before: Some(6)
            }]
        );
        let recycled = Builder::new(6, 5).entry(7, 6).scan(2);
        let r = recover(vec![recycled], 5);
        assert!(r.damage.is_empty(), "{:?}", r.damage);
        assert_eq!(seqs(&r), vec![7]);
    }

    #[test]
    fn a_segment_ending_early_is_damage_when_the_next_says_more() {
        // Entries 3 and 4 were durable (the next header says 4) but the
        // first segment ends cleanly after 2.
        let a = Builder::new(1, 0).entry(1, 0).entry(2, 1).zeros(64).scan(1);
        let b = Builder::new(5, 4).entry(5, 4).scan(2);
        let r = recover(vec![a, b], 0);
        assert_eq!(seqs(&r), vec![1, 2, 5]);
        assert_eq!(
            r.damage,
            vec![Damage::Unreadable {
                after: 2,
                before: Some(5)
            }]
        );
    }

    #[test]
    fn a_spare_has_no_header() {
        assert!(scan(1, Bytes::from(vec![0u8; 4096])).is_none());
    }
}
