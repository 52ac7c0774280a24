//! One shard owned by this broker: offset assignment, the in-memory tail
//! of recent batches, the durable high watermark and the local copy of the
//! shard's segment index.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use shoal_placement::SegmentRef;
use shoal_wal_cache::{AppendTicket, Wal};
use tokio::sync::watch;

use crate::batch::{self, BatchInfo, WalRecord};
use crate::error::{Error, Result};
use crate::producer::{self, Producers, SeqCheck};

/// A batch in the tail, with its real base offset written in.
#[derive(Debug, Clone)]
pub struct TailBatch {
    pub base_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
    pub info: BatchInfo,
    pub bytes: Bytes,
    pub wal_seq: u64,
}

#[derive(Debug)]
struct State {
    epoch: u64,
    next_offset: i64,
    high_watermark: i64,
    log_start_offset: i64,
    committed_offset: i64,
    /// Contiguous by offset. Batches below committed_offset are flushed and
    /// kept only as a read cache, up to `tail_keep_bytes`.
    tail: VecDeque<TailBatch>,
    flushed_tail_bytes: usize,
    segments: Vec<SegmentRef>,
    /// Producer state including every batch appended.
    producers: Producers,
    /// Producer state as of committed_offset, what a flush commit carries.
    committed_producers: Producers,
}

impl State {
    fn visible_end(&self, committed_only: bool) -> i64 {
        if committed_only {
            self.committed_offset
        } else {
            self.high_watermark
        }
    }
}

/// What a fetch at an offset finds.
#[derive(Debug)]
pub enum Read {
    /// Batches from the tail (the first may start before the offset).
    Tail(Vec<Bytes>),
    /// The offset lives in a committed segment.
    Segment(SegmentRef),
    /// Nothing yet at this offset: wait for the high watermark.
    AtEnd,
    OutOfRange,
}

pub enum Appended {
    Duplicate {
        base_offset: i64,
    },
    Pending {
        base_offset: i64,
        last_offset: i64,
        ticket: AppendTicket,
    },
}

/// Everything of one shard that a flush takes.
#[derive(Debug)]
pub struct FlushSlice {
    pub epoch: u64,
    pub batches: Vec<TailBatch>,
}

#[derive(Debug)]
pub struct ShardLog {
    pub stream: String,
    pub shard: i32,
    state: Mutex<State>,
    high_watermark: watch::Sender<i64>,
    committed: watch::Sender<i64>,
    tail_keep_bytes: usize,
    /// The lease moved away: nothing more is accepted or committed, and
    /// waiting producers are answered NOT_LEADER_OR_FOLLOWER.
    fenced: watch::Sender<bool>,
    /// A handoff is under way: new writes go elsewhere, what is held is
    /// still committed.
    draining: std::sync::atomic::AtomicBool,
}

pub struct ShardInit {
    pub epoch: u64,
    pub log_start_offset: i64,
    pub committed_offset: i64,
    pub segments: Vec<SegmentRef>,
    pub producers: Producers,
}

impl ShardInit {
    /// Start from what placement has committed, under lease `epoch`.
    pub fn committed(shard: &shoal_placement::Shard, epoch: u64) -> Self {
        ShardInit {
            epoch,
            log_start_offset: shard.log_start_offset,
            committed_offset: shard.committed_offset,
            segments: shard.segments.clone(),
            producers: shard.producers.clone(),
        }
    }
}

impl ShardLog {
    pub fn new(stream: &str, shard: i32, init: ShardInit, tail_keep_bytes: usize) -> Self {
        let state = State {
            epoch: init.epoch,
            next_offset: init.committed_offset,
            high_watermark: init.committed_offset,
            log_start_offset: init.log_start_offset,
            committed_offset: init.committed_offset,
            tail: VecDeque::new(),
            flushed_tail_bytes: 0,
            segments: init.segments,
            producers: init.producers.clone(),
            committed_producers: init.producers,
        };
        ShardLog {
            stream: stream.to_string(),
            shard,
            high_watermark: watch::channel(init.committed_offset).0,
            committed: watch::channel(init.committed_offset).0,
            state: Mutex::new(state),
            tail_keep_bytes,
            fenced: watch::channel(false).0,
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// This broker no longer owns the shard.
    pub fn fence(&self) {
        self.fenced.send_replace(true);
    }

    pub fn is_fenced(&self) -> bool {
        *self.fenced.borrow()
    }

    pub fn watch_fenced(&self) -> watch::Receiver<bool> {
        self.fenced.subscribe()
    }

    /// Stop taking writes ahead of a handoff.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Is everything ever appended here committed to placement?
    pub fn all_committed(&self) -> bool {
        let st = self.state.lock();
        st.committed_offset == st.next_offset
    }

    /// Re-add a batch found in the WAL at start-up. Batches already in a
    /// committed segment are skipped; the rest must continue the offsets.
    pub fn replay(&self, batch: Bytes, wal_seq: u64) -> Result<bool> {
        let mut st = self.state.lock();
        let base = batch::base_offset(&batch);
        let info = batch::info(&batch);
        let last = base + i64::from(info.record_count) - 1;
        if last < st.committed_offset {
            return Ok(false);
        }
        if base != st.next_offset {
            return Err(Error::Corrupt(format!(
                "WAL replay of {}/{}: batch at {base} does not continue offset {}",
                self.stream, self.shard, st.next_offset
            )));
        }
        producer::record(&mut st.producers, &info, base);
        st.tail.push_back(TailBatch {
            base_offset: base,
            last_offset: last,
            max_timestamp: info.max_timestamp,
            info,
            bytes: batch,
            wal_seq,
        });
        st.next_offset = last + 1;
        st.high_watermark = last + 1;
        self.high_watermark.send_replace(last + 1);
        Ok(true)
    }

    /// Assign offsets and enqueue the batch in the WAL, in one critical
    /// section so that WAL order is offset order.
    pub fn append(&self, batch: &Bytes, info: BatchInfo, wal: &Wal) -> Result<Appended> {
        let mut st = self.state.lock();
        if self.is_fenced() || self.is_draining() {
            return Err(Error::NotLeader {
                stream: self.stream.clone(),
                shard: self.shard,
            });
        }
        match producer::check(&st.producers, &info) {
            SeqCheck::Accept => {}
            SeqCheck::Duplicate { base_offset } => return Ok(Appended::Duplicate { base_offset }),
            SeqCheck::Reject(e) => return Err(e),
        }
        let base = st.next_offset;
        let last = base + i64::from(info.record_count) - 1;
        let bytes = batch::with_base_offset(batch, base);
        let entry = WalRecord {
            stream: self.stream.clone(),
            shard: self.shard,
            batch: bytes.clone(),
        };
        let ticket = wal.append(entry.encode())?;
        producer::record(&mut st.producers, &info, base);
        st.tail.push_back(TailBatch {
            base_offset: base,
            last_offset: last,
            max_timestamp: info.max_timestamp,
            info,
            bytes,
            wal_seq: ticket.seq(),
        });
        st.next_offset = last + 1;
        Ok(Appended::Pending {
            base_offset: base,
            last_offset: last,
            ticket,
        })
    }

    /// The WAL made everything up to `last_offset` durable: make it visible.
    pub fn durable_through(&self, last_offset: i64) {
        let mut st = self.state.lock();
        if last_offset + 1 > st.high_watermark {
            st.high_watermark = last_offset + 1;
            self.high_watermark.send_replace(last_offset + 1);
        }
    }

    pub fn high_watermark(&self) -> i64 {
        self.state.lock().high_watermark
    }

    pub fn log_start_offset(&self) -> i64 {
        self.state.lock().log_start_offset
    }

    pub fn committed_offset(&self) -> i64 {
        self.state.lock().committed_offset
    }

    pub fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.high_watermark.subscribe()
    }

    pub fn watch_committed(&self) -> watch::Receiver<i64> {
        self.committed.subscribe()
    }

    pub fn segments(&self) -> Vec<SegmentRef> {
        self.state.lock().segments.clone()
    }

    /// Find what serves `offset`, up to about `max_bytes` from the tail.
    pub fn read(&self, offset: i64, max_bytes: usize) -> Read {
        self.read_visible(offset, max_bytes, false)
    }

    /// The end of what readers may see: the high watermark, or with
    /// `committed_only` (streams with `object` durability) the end of what
    /// is committed, so no reader sees a record a failover could lose.
    pub fn visible_end(&self, committed_only: bool) -> i64 {
        self.state.lock().visible_end(committed_only)
    }

    /// [`read`](Self::read) up to [`visible_end`](Self::visible_end).
    pub fn read_visible(&self, offset: i64, max_bytes: usize, committed_only: bool) -> Read {
        let st = self.state.lock();
        let end = st.visible_end(committed_only);
        if offset < st.log_start_offset || offset > end {
            return Read::OutOfRange;
        }
        if offset == end {
            return Read::AtEnd;
        }
        if let Some(front) = st.tail.front()
            && front.base_offset <= offset
        {
            let start = st.tail.partition_point(|b| b.last_offset < offset);
            let mut out = Vec::new();
            let mut size = 0;
            for b in st.tail.iter().skip(start) {
                if b.base_offset >= end || (!out.is_empty() && size + b.bytes.len() > max_bytes) {
                    break;
                }
                size += b.bytes.len();
                out.push(b.bytes.clone());
            }
            return Read::Tail(out);
        }
        let i = st.segments.partition_point(|s| s.last_offset < offset);
        match st.segments.get(i) {
            Some(s) if s.first_offset <= offset => Read::Segment(s.clone()),
            _ => Read::OutOfRange,
        }
    }

    /// First offset whose batch has a timestamp at or after `ts`, if any
    /// is in memory or the index (segment granularity).
    pub fn offset_for_timestamp(&self, ts: i64) -> Option<i64> {
        let st = self.state.lock();
        if let Some(s) = st.segments.iter().find(|s| s.max_timestamp_ms >= ts) {
            return Some(s.first_offset.max(st.log_start_offset));
        }
        st.tail
            .iter()
            .filter(|b| b.base_offset >= st.committed_offset && b.base_offset < st.high_watermark)
            .find(|b| b.max_timestamp >= ts)
            .map(|b| b.base_offset)
    }

    /// Durable batches not yet in a committed segment.
    pub fn flush_slice(&self) -> Option<FlushSlice> {
        if self.is_fenced() {
            return None;
        }
        let st = self.state.lock();
        let batches: Vec<TailBatch> = st
            .tail
            .iter()
            .filter(|b| b.base_offset >= st.committed_offset && b.last_offset < st.high_watermark)
            .cloned()
            .collect();
        (!batches.is_empty()).then_some(FlushSlice {
            epoch: st.epoch,
            batches,
        })
    }

    /// Producer state after applying `batches` to the committed state.
    pub fn producers_after(&self, batches: &[TailBatch]) -> Producers {
        let mut p = self.state.lock().committed_producers.clone();
        for b in batches {
            producer::record(&mut p, &b.info, b.base_offset);
        }
        p
    }

    /// A flush of this shard was committed in placement.
    pub fn committed(&self, segment: SegmentRef, producers: Producers) {
        let mut st = self.state.lock();
        let next = segment.last_offset + 1;
        if next <= st.committed_offset {
            return;
        }
        let newly: usize = st
            .tail
            .iter()
            .filter(|b| b.base_offset >= st.committed_offset && b.last_offset < next)
            .map(|b| b.bytes.len())
            .sum();
        st.committed_offset = next;
        st.committed_producers = producers;
        st.segments.push(segment);
        st.flushed_tail_bytes += newly;
        while st.flushed_tail_bytes > self.tail_keep_bytes {
            match st.tail.front() {
                Some(b) if b.last_offset < st.committed_offset => {
                    let len = b.bytes.len();
                    st.tail.pop_front();
                    st.flushed_tail_bytes -= len;
                }
                _ => break,
            }
        }
        self.committed.send_replace(next);
    }

    /// Lowest WAL sequence still needed by this shard (not yet committed).
    pub fn min_unflushed_seq(&self) -> Option<u64> {
        let st = self.state.lock();
        st.tail
            .iter()
            .find(|b| b.base_offset >= st.committed_offset)
            .map(|b| b.wal_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_storage::{Header, Record};

    fn batch(n: i64) -> Bytes {
        let rows: Vec<Record> = (0..n)
            .map(|o| Record {
                offset: o,
                timestamp_ms: 1000 + o,
                key: None,
                value: Some(Bytes::from_static(b"v")),
                headers: vec![Header {
                    key: "a".into(),
                    value: None,
                }],
                producer_id: None,
                producer_epoch: None,
                sequence: None,
            })
            .collect();
        batch::from_rows(&rows).unwrap()
    }

    fn shard() -> ShardLog {
        ShardLog::new(
            "s",
            0,
            ShardInit {
                epoch: 1,
                log_start_offset: 0,
                committed_offset: 0,
                segments: vec![],
                producers: Producers::new(),
            },
            0,
        )
    }

    #[tokio::test]
    async fn offsets_are_dense_and_visible_after_durability() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(shoal_wal_cache::WalOptions::new(dir.path())).unwrap();
        let s = shard();
        let b = batch(3);
        let Appended::Pending {
            base_offset,
            last_offset,
            ticket,
        } = s.append(&b, batch::info(&b), &wal).unwrap()
        else {
            panic!("duplicate")
        };
        assert_eq!((base_offset, last_offset), (0, 2));
        assert!(matches!(s.read(0, 1 << 20), Read::AtEnd));
        ticket.durable().await.unwrap();
        s.durable_through(last_offset);
        let Read::Tail(got) = s.read(1, 1 << 20) else {
            panic!("not in tail")
        };
        assert_eq!(got.len(), 1);
        assert!(matches!(s.read(3, 1 << 20), Read::AtEnd));
        let slice = s.flush_slice().unwrap();
        assert_eq!(slice.batches.len(), 1);
        s.committed(
            SegmentRef {
                object: "o".into(),
                row_group: 0,
                first_offset: 0,
                last_offset: 2,
                epoch: 1,
                record_count: 3,
                min_timestamp_ms: 1000,
                max_timestamp_ms: 1002,
                object_size: 1,
            },
            Producers::new(),
        );
        assert!(s.flush_slice().is_none());
        // The tail keeps nothing flushed (keep = 0): reads go to the segment.
        assert!(matches!(s.read(1, 1 << 20), Read::Segment(_)));
        assert_eq!(s.min_unflushed_seq(), None);
    }
}
