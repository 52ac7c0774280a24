//! One shard owned by this broker: offset assignment, the in-memory tail
//! of recent batches, the durable high watermark and the local copy of the
//! shard's segment index.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use shoal_placement::SegmentRef;
use shoal_wal_cache::{AppendTicket, Wal};
use tokio::sync::watch;

use crate::batch::{self, BatchInfo, WalRecord};
use crate::error::{Error, Result};
use crate::producer::{self, Producers, SeqCheck};

/// What became of an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Waiting for the WAL's fsync.
    Pending,
    /// In the WAL, fsynced: visible up to the high watermark.
    Durable,
    /// Its WAL write failed and it was taken out of the tail.
    Failed,
}

/// A batch in the tail, with its real base offset written in.
#[derive(Debug, Clone)]
pub struct TailBatch {
    pub base_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
    pub info: BatchInfo,
    pub bytes: Bytes,
    pub wal_seq: u64,
    /// When it was appended (or replayed), for producer expiration.
    pub appended_ms: i64,
    /// The lease it was written under.
    lease_epoch: u64,
    fate: Arc<watch::Sender<Fate>>,
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
    /// Bytes of batches appended and not yet committed; what this shard
    /// adds to the broker's total.
    unflushed_bytes: u64,
    segments: Vec<SegmentRef>,
    /// Placement's `index_version` of the shard as last loaded.
    index_version: u64,
    /// Producer state including every batch appended.
    producers: Producers,
    /// Producer state as of committed_offset, what placement holds.
    committed_producers: Producers,
    /// Why the shard takes no writes, if it does not.
    stopped: Option<String>,
    /// Per idempotent producer, the first (epoch, sequence) of its batches
    /// a failed WAL write took out of the tail. Until that batch comes
    /// again, later ones are refused: with its state rolled back the
    /// producer may have none, and would be accepted at any sequence,
    /// leaving a gap its retry could not fill.
    gaps: std::collections::HashMap<i64, (i16, i32)>,
    /// See [`ShardLog::refuse_flushes`].
    flushes_refused: bool,
    /// The un-committed entries of a flush-refused shard are kept outside
    /// the WAL (see [`ShardLog::quarantined`]): the WAL need not keep them.
    quarantined: bool,
}

impl State {
    fn visible_end(&self, committed_only: bool) -> i64 {
        if committed_only {
            self.committed_offset
        } else {
            self.high_watermark
        }
    }

    /// Producer state after `batches` (uncommitted ones) on top of the
    /// committed state.
    fn producers_with(&self, batches: impl Iterator<Item = TailBatch>) -> Producers {
        let mut p = self.committed_producers.clone();
        for b in batches {
            producer::record(&mut p, &b.info, b.base_offset, b.appended_ms);
        }
        p
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

/// The result of [`ShardLog::append`].
pub enum Appended {
    /// A retry of a batch already appended. `fate` is `None` when it is
    /// long committed; otherwise the retry is answered exactly as the
    /// original: after its durability point, or with its error.
    Duplicate {
        base_offset: i64,
        last_offset: i64,
        fate: Option<watch::Receiver<Fate>>,
    },
    Pending {
        base_offset: i64,
        last_offset: i64,
        ticket: AppendTicket,
        fate: watch::Receiver<Fate>,
    },
}

/// What [`ShardLog::replay`] made of a WAL entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Replayed {
    /// Added to the tail.
    Applied,
    /// Added to the tail in place of `superseded` batches of an older lease
    /// that were replayed before it at the same offsets: that lease was
    /// overtaken, and this broker's later lease wrote these offsets anew
    /// (only in a cluster).
    Replaced { superseded: usize },
    /// Already in a committed segment.
    Committed,
    /// Written under an older lease and overtaken by another owner since
    /// (only in a cluster).
    Superseded,
    /// Does not continue the shard: records before it are missing.
    Gap { expected: i64, got: i64, epoch: u64 },
}

/// Everything of one shard that a flush takes.
#[derive(Debug)]
pub struct FlushSlice {
    pub epoch: u64,
    pub batches: Vec<TailBatch>,
}

/// Producer state a commit carries: the producers that wrote in its range,
/// and those expired since the last commit.
#[derive(Debug, Clone, Default)]
pub struct ProducerDelta {
    pub changed: Producers,
    pub expired: Vec<i64>,
}

/// Settings and shared counters every shard log of a broker uses.
#[derive(Debug, Clone)]
pub struct ShardEnv {
    /// Flushed bytes kept in the tail for reads.
    pub tail_keep_bytes: usize,
    /// Idle producers' state is forgotten after this (Kafka's
    /// `producer.id.expiration.ms`).
    pub producer_expiration_ms: i64,
    /// The broker's total of uncommitted bytes; each shard adds its own.
    pub unflushed_bytes: Arc<AtomicU64>,
    /// In a cluster, WAL entries of an older lease may be overtaken by
    /// another owner's writes.
    pub cluster: bool,
}

#[derive(Debug)]
pub struct ShardLog {
    pub stream: String,
    pub shard: i32,
    state: Mutex<State>,
    high_watermark: watch::Sender<i64>,
    committed: watch::Sender<i64>,
    env: ShardEnv,
    /// The lease epoch under which un-flushed WAL entries of this broker
    /// were last written: entries of that lease must continue the offsets
    /// exactly at replay.
    replay_epoch: u64,
    /// The lease moved away: nothing more is accepted or committed, and
    /// waiting producers are answered NOT_LEADER_OR_FOLLOWER.
    fenced: watch::Sender<bool>,
    /// A handoff is under way: new writes go elsewhere, what is held is
    /// still committed.
    draining: AtomicBool,
}

pub struct ShardInit {
    pub epoch: u64,
    /// See [`ShardLog::replay`]: the epoch before this broker took the
    /// lease again (its own previous lease, if it held the shard).
    pub replay_epoch: u64,
    pub log_start_offset: i64,
    pub committed_offset: i64,
    pub segments: Vec<SegmentRef>,
    pub index_version: u64,
    pub producers: Producers,
    pub stopped: Option<String>,
}

impl ShardInit {
    /// Start from what placement has committed, under lease `epoch`.
    pub fn committed(shard: &shoal_placement::Shard, epoch: u64) -> Self {
        ShardInit {
            epoch,
            replay_epoch: shard.epoch,
            log_start_offset: shard.log_start_offset,
            committed_offset: shard.committed_offset,
            segments: shard.segments.clone(),
            index_version: shard.index_version,
            producers: shard.producers.clone(),
            stopped: shard.stopped.as_ref().map(|s| s.reason.clone()),
        }
    }
}

fn fate(initial: Fate) -> Arc<watch::Sender<Fate>> {
    Arc::new(watch::channel(initial).0)
}

impl ShardLog {
    pub fn new(stream: &str, shard: i32, mut init: ShardInit, env: ShardEnv) -> Self {
        // State stored before writes were timed has no time: count its
        // idleness from now rather than expire all of it at once.
        let now = crate::broker::now_ms();
        for p in init.producers.values_mut() {
            if p.last_write_ms == 0 {
                p.last_write_ms = now;
            }
        }
        let state = State {
            epoch: init.epoch,
            next_offset: init.committed_offset,
            high_watermark: init.committed_offset,
            log_start_offset: init.log_start_offset,
            committed_offset: init.committed_offset,
            tail: VecDeque::new(),
            flushed_tail_bytes: 0,
            unflushed_bytes: 0,
            segments: init.segments,
            index_version: init.index_version,
            producers: init.producers.clone(),
            committed_producers: init.producers,
            stopped: init.stopped,
            gaps: std::collections::HashMap::new(),
            flushes_refused: false,
            quarantined: false,
        };
        ShardLog {
            stream: stream.to_string(),
            shard,
            high_watermark: watch::channel(init.committed_offset).0,
            committed: watch::channel(init.committed_offset).0,
            state: Mutex::new(state),
            env,
            replay_epoch: init.replay_epoch,
            fenced: watch::channel(false).0,
            draining: AtomicBool::new(false),
        }
    }

    /// Count `delta` bytes more (or fewer) as uncommitted.
    fn account(&self, st: &mut State, add: u64, sub: u64) {
        let sub = sub.min(st.unflushed_bytes + add);
        st.unflushed_bytes = st.unflushed_bytes + add - sub;
        if add > 0 {
            self.env.unflushed_bytes.fetch_add(add, Ordering::Relaxed);
        }
        if sub > 0 {
            self.env.unflushed_bytes.fetch_sub(sub, Ordering::Relaxed);
        }
    }

    /// This broker no longer owns the shard. What it held uncommitted no
    /// longer counts against the broker's limit: it will never be flushed
    /// from here.
    /// Returns whether it was serving until now.
    pub fn fence(&self) -> bool {
        let mut st = self.state.lock();
        let was = self.fenced.send_replace(true);
        let held = st.unflushed_bytes;
        self.account(&mut st, 0, held);
        !was
    }

    pub fn is_fenced(&self) -> bool {
        *self.fenced.borrow()
    }

    pub fn watch_fenced(&self) -> watch::Receiver<bool> {
        self.fenced.subscribe()
    }

    /// Stop taking writes ahead of a handoff.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Take writes again: the handoff did not happen.
    pub fn undrain(&self) {
        self.draining.store(false, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Take no more writes: records this shard acknowledged are lost.
    pub fn stop(&self, reason: &str) {
        self.state
            .lock()
            .stopped
            .get_or_insert_with(|| reason.to_string());
    }

    /// Placement refused to commit this shard's segment where nothing else
    /// can own it (standalone): stop it, and flush nothing more of it, as
    /// every attempt would leave one more object nothing references.
    pub fn refuse_flushes(&self, reason: &str) {
        let mut st = self.state.lock();
        st.stopped.get_or_insert_with(|| reason.to_string());
        st.flushes_refused = true;
    }

    /// An operator accepted the loss: take writes (and flushes) again.
    pub fn resume(&self) {
        let mut st = self.state.lock();
        st.stopped = None;
        st.flushes_refused = false;
        st.quarantined = false;
    }

    /// The WAL entries (sequence, payload as the WAL holds it) of the
    /// batches not committed yet, oldest first.
    pub fn uncommitted_wal_entries(&self) -> Vec<(u64, Bytes)> {
        let st = self.state.lock();
        st.tail
            .iter()
            .filter(|b| b.base_offset >= st.committed_offset)
            .map(|b| {
                let rec = WalRecord {
                    stream: self.stream.clone(),
                    shard: self.shard,
                    epoch: b.lease_epoch,
                    batch: b.bytes.clone(),
                };
                (b.wal_seq, rec.encode())
            })
            .collect()
    }

    /// The un-committed entries of this flush-refused shard are durable
    /// elsewhere (quarantine): stop holding the WAL back for them, which
    /// would otherwise keep every other shard's traffic until the disk
    /// fills.
    pub fn quarantined(&self) {
        let mut st = self.state.lock();
        if st.flushes_refused {
            st.quarantined = true;
        }
    }

    pub fn stopped(&self) -> Option<String> {
        self.state.lock().stopped.clone()
    }

    /// Is everything ever appended here committed to placement?
    pub fn all_committed(&self) -> bool {
        let st = self.state.lock();
        st.committed_offset == st.next_offset
    }

    /// Re-add a batch found in the WAL at start-up, written under lease
    /// `epoch`. Batches already in a committed segment are skipped; the
    /// rest must continue the offsets. In a cluster an entry of an older
    /// lease than the last one this broker held may have been overtaken by
    /// another owner; an entry of that last lease cannot, so a gap there
    /// (like any gap in standalone) means records are missing.
    pub fn replay(&self, batch: Bytes, wal_seq: u64, epoch: u64) -> Replayed {
        let mut st = self.state.lock();
        let base = batch::base_offset(&batch);
        let info = batch::info(&batch);
        let last = base + i64::from(info.record_count) - 1;
        if last < st.committed_offset {
            return Replayed::Committed;
        }
        let superseded = if self.env.cluster && base < st.next_offset {
            self.drop_overtaken(&mut st, base, epoch)
        } else {
            0
        };
        if base != st.next_offset || epoch > self.replay_epoch {
            if self.env.cluster && epoch < self.replay_epoch {
                return Replayed::Superseded;
            }
            return Replayed::Gap {
                expected: st.next_offset,
                got: base,
                epoch,
            };
        }
        let now = crate::broker::now_ms();
        producer::record(&mut st.producers, &info, base, now);
        let len = batch.len() as u64;
        st.tail.push_back(TailBatch {
            base_offset: base,
            last_offset: last,
            max_timestamp: info.max_timestamp,
            info,
            bytes: batch,
            wal_seq,
            appended_ms: now,
            lease_epoch: epoch,
            fate: fate(Fate::Durable),
        });
        st.next_offset = last + 1;
        st.high_watermark = last + 1;
        self.account(&mut st, len, 0);
        self.high_watermark.send_replace(last + 1);
        if superseded > 0 {
            Replayed::Replaced { superseded }
        } else {
            Replayed::Applied
        }
    }

    /// A replayed entry of lease `epoch` starts at `base`, below what the
    /// tail already holds. If everything replayed from `base` on was
    /// written under older leases, a later lease of this broker started
    /// again from the committed offset after another owner took over, so
    /// those batches were overtaken: drop them and say how many. Otherwise
    /// leave the tail alone (the caller then reports a gap).
    fn drop_overtaken(&self, st: &mut State, base: i64, epoch: u64) -> usize {
        let Some(cut) = st.tail.iter().position(|b| b.base_offset == base) else {
            return 0;
        };
        if base < st.committed_offset || st.tail.iter().skip(cut).any(|b| b.lease_epoch >= epoch) {
            return 0;
        }
        let removed: Vec<TailBatch> = st.tail.drain(cut..).collect();
        let bytes: u64 = removed.iter().map(|b| b.bytes.len() as u64).sum();
        st.next_offset = base;
        st.high_watermark = base;
        let committed = st.committed_offset;
        let uncommitted: Vec<TailBatch> = st
            .tail
            .iter()
            .filter(|b| b.base_offset >= committed)
            .cloned()
            .collect();
        st.producers = st.producers_with(uncommitted.into_iter());
        self.account(st, 0, bytes);
        self.high_watermark.send_replace(base);
        removed.len()
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
        if let Some(reason) = &st.stopped {
            return Err(Error::ShardStopped {
                stream: self.stream.clone(),
                shard: self.shard,
                reason: reason.clone(),
            });
        }
        if info.is_idempotent()
            && let Some(&(epoch, seq)) = st.gaps.get(&info.producer_id)
        {
            if info.producer_epoch == epoch && info.base_sequence > seq {
                return Err(Error::Wal(shoal_wal_cache::Error::Unavailable {
                    reason: format!(
                        "producer {} must first resend sequence {seq}, whose write failed",
                        info.producer_id
                    ),
                }));
            }
            if info.producer_epoch != epoch || info.base_sequence == seq {
                st.gaps.remove(&info.producer_id);
            }
        }
        let now = crate::broker::now_ms();
        match producer::check(&st.producers, &info, self.producers_live_at(now)) {
            SeqCheck::Accept => {}
            SeqCheck::Duplicate {
                base_offset,
                last_offset,
            } => return Ok(duplicate(&st, base_offset, last_offset)),
            SeqCheck::Reject(e) => return Err(e),
        }
        let base = st.next_offset;
        let last = base + i64::from(info.record_count) - 1;
        let bytes = batch::with_base_offset(batch, base);
        let entry = WalRecord {
            stream: self.stream.clone(),
            shard: self.shard,
            epoch: st.epoch,
            batch: bytes.clone(),
        };
        let ticket = wal.append(entry.encode())?;
        producer::record(&mut st.producers, &info, base, now);
        let len = bytes.len() as u64;
        let lease_epoch = st.epoch;
        let fate = fate(Fate::Pending);
        let rx = fate.subscribe();
        st.tail.push_back(TailBatch {
            base_offset: base,
            last_offset: last,
            max_timestamp: info.max_timestamp,
            info,
            bytes,
            wal_seq: ticket.seq(),
            appended_ms: now,
            lease_epoch,
            fate,
        });
        st.next_offset = last + 1;
        self.account(&mut st, len, 0);
        Ok(Appended::Pending {
            base_offset: base,
            last_offset: last,
            ticket,
            fate: rx,
        })
    }

    /// The retry of a batch this shard already holds, answered as its
    /// original; `None` for any other batch. Lets a caller that would refuse
    /// new writes (backpressure) still answer retries of written ones: an
    /// error would tell the client they were not written.
    pub fn duplicate_of(&self, info: &BatchInfo) -> Option<Appended> {
        let st = self.state.lock();
        if !info.is_idempotent() || self.is_fenced() || st.stopped.is_some() {
            return None;
        }
        let live = self.producers_live_at(crate::broker::now_ms());
        match producer::check(&st.producers, info, live) {
            SeqCheck::Duplicate {
                base_offset,
                last_offset,
            } => Some(duplicate(&st, base_offset, last_offset)),
            _ => None,
        }
    }

    /// Which producer states count as live at `now_ms`.
    fn producers_live_at(&self, now_ms: i64) -> producer::Live {
        producer::Live {
            now_ms,
            expiration_ms: self.env.producer_expiration_ms,
        }
    }

    /// The sequence this shard expects next from `producer_id` at `epoch`,
    /// if it holds live state for it (else any sequence is accepted).
    pub fn next_sequence(&self, producer_id: i64, epoch: i16) -> Option<i32> {
        let st = self.state.lock();
        let now = crate::broker::now_ms();
        st.producers
            .get(&producer_id)
            .filter(|s| {
                s.producer_epoch == epoch
                    && !producer::expired(s, now, self.env.producer_expiration_ms)
            })
            .map(producer::next_expected)
    }

    /// The WAL made everything up to `last_offset` durable: make it visible.
    pub fn durable_through(&self, last_offset: i64) {
        let mut st = self.state.lock();
        if last_offset + 1 > st.high_watermark {
            let old = st.high_watermark;
            st.high_watermark = last_offset + 1;
            for b in st.tail.iter().rev() {
                if b.last_offset < old {
                    break;
                }
                if b.last_offset <= last_offset {
                    b.fate.send_replace(Fate::Durable);
                }
            }
            self.high_watermark.send_replace(last_offset + 1);
        }
    }

    /// The WAL failed every entry from `first_failed_seq` on: take the
    /// batches written there out of the tail (they were never visible nor
    /// acknowledged), so offsets and producer sequences continue as if
    /// they had never been sent. Their waiters learn [`Fate::Failed`].
    pub fn roll_back_from(&self, first_failed_seq: u64) {
        let mut st = self.state.lock();
        let hw = st.high_watermark;
        let Some(cut) = st
            .tail
            .iter()
            .position(|b| b.wal_seq >= first_failed_seq && b.base_offset >= hw)
        else {
            return;
        };
        let removed: Vec<TailBatch> = st.tail.drain(cut..).collect();
        let bytes: u64 = removed.iter().map(|b| b.bytes.len() as u64).sum();
        if let Some(first) = removed.first() {
            st.next_offset = first.base_offset;
        }
        let committed = st.committed_offset;
        let uncommitted: Vec<TailBatch> = st
            .tail
            .iter()
            .filter(|b| b.base_offset >= committed)
            .cloned()
            .collect();
        st.producers = st.producers_with(uncommitted.into_iter());
        self.account(&mut st, 0, bytes);
        for b in &removed {
            if b.info.is_idempotent() {
                st.gaps
                    .entry(b.info.producer_id)
                    .or_insert((b.info.producer_epoch, b.info.base_sequence));
            }
            b.fate.send_replace(Fate::Failed);
        }
        tracing::warn!(
            stream = %self.stream,
            shard = self.shard,
            batches = removed.len(),
            next_offset = st.next_offset,
            "rolled back batches whose WAL write failed"
        );
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

    /// Bytes appended here and not yet committed.
    pub fn unflushed_bytes(&self) -> u64 {
        self.state.lock().unflushed_bytes
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

    /// Visible batches of the tail that are not in a committed segment
    /// (with `committed_only`, none: everything visible is committed).
    pub fn visible_uncommitted(&self, committed_only: bool) -> Vec<TailBatch> {
        let st = self.state.lock();
        let end = st.visible_end(committed_only);
        st.tail
            .iter()
            .filter(|b| b.base_offset >= st.committed_offset && b.last_offset < end)
            .cloned()
            .collect()
    }

    /// Durable batches not yet in a committed segment.
    pub fn flush_slice(&self) -> Option<FlushSlice> {
        if self.is_fenced() {
            return None;
        }
        let st = self.state.lock();
        if st.flushes_refused {
            return None;
        }
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

    /// The producer state a commit of `batches` (the next uncommitted ones)
    /// carries: who wrote in them, and who expired since the last commit.
    pub fn producer_delta(&self, batches: &[TailBatch], now_ms: i64) -> ProducerDelta {
        let st = self.state.lock();
        let after = st.producers_with(batches.iter().cloned());
        let mut changed = Producers::new();
        for b in batches {
            if let Some(p) = after.get(&b.info.producer_id) {
                changed.insert(b.info.producer_id, p.clone());
            }
        }
        let expired = st
            .committed_producers
            .iter()
            .filter(|(pid, p)| {
                !changed.contains_key(pid)
                    && producer::expired(p, now_ms, self.env.producer_expiration_ms)
            })
            .map(|(pid, _)| *pid)
            .collect();
        ProducerDelta { changed, expired }
    }

    /// A flush of this shard was committed in placement.
    pub fn committed(&self, segment: SegmentRef, delta: ProducerDelta) {
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
        for pid in &delta.expired {
            st.committed_producers.remove(pid);
            // Gone from the live state too unless it wrote since.
            let now = crate::broker::now_ms();
            if st
                .producers
                .get(pid)
                .is_some_and(|p| producer::expired(p, now, self.env.producer_expiration_ms))
            {
                st.producers.remove(pid);
            }
        }
        st.committed_producers.extend(delta.changed);
        st.segments.push(segment);
        st.flushed_tail_bytes += newly;
        self.account(&mut st, 0, newly as u64);
        while st.flushed_tail_bytes > self.env.tail_keep_bytes {
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

    /// Placement moved the log start to `offset` (DeleteRecords): reads
    /// below it are out of range, and ranges wholly below it are gone.
    pub fn advance_log_start(&self, offset: i64) {
        let mut st = self.state.lock();
        if offset > st.log_start_offset {
            st.log_start_offset = offset;
            let keep = st.segments.partition_point(|s| s.last_offset < offset);
            st.segments.drain(..keep);
        }
    }

    /// Placement's index version of this shard as last loaded.
    pub fn index_version(&self) -> u64 {
        self.state.lock().index_version
    }

    /// Take placement's index of the shard after compaction, retention or
    /// DeleteRecords changed it: its entries up to what this log has seen
    /// committed replace the local ones; local entries past those stay (a
    /// commit whose answer arrived after placement was read). The log
    /// start only moves forward.
    pub fn follow_index(&self, placed: &shoal_placement::Shard) {
        let mut st = self.state.lock();
        if placed.index_version <= st.index_version {
            return;
        }
        let committed = st.committed_offset;
        let mut segments: Vec<SegmentRef> = placed
            .segments
            .iter()
            .filter(|s| s.last_offset < committed)
            .cloned()
            .collect();
        let covered = segments.last().map(|s| s.last_offset + 1);
        segments.extend(
            st.segments
                .iter()
                .filter(|s| covered.is_none_or(|c| s.first_offset >= c))
                .filter(|s| s.last_offset >= placed.log_start_offset)
                .cloned(),
        );
        st.segments = segments;
        st.log_start_offset = st.log_start_offset.max(placed.log_start_offset);
        // Committed batches kept as a read cache hold what the index now
        // serves from rewritten objects (log compaction removed records
        // from them): reads of those offsets go to the new objects.
        if let Some(end) = covered {
            while let Some(b) = st.tail.front() {
                if b.last_offset >= end || b.last_offset >= committed {
                    break;
                }
                let len = b.bytes.len();
                st.tail.pop_front();
                st.flushed_tail_bytes = st.flushed_tail_bytes.saturating_sub(len);
            }
        }
        // An entry reaching past what this log has seen committed (its
        // commit's answer is still on the way) is taken on the next look.
        let straddles = placed
            .segments
            .iter()
            .any(|s| s.first_offset < committed && s.last_offset >= committed);
        // Placement is ahead (a commit's answer is on its way): the entries
        // of that commit may already be rewritten there, and the local
        // copy about to be appended would be stale. Look again later.
        if !straddles && placed.committed_offset <= committed {
            st.index_version = placed.index_version;
        }
    }

    /// Lowest WAL sequence still needed by this shard (not yet committed).
    pub fn min_unflushed_seq(&self) -> Option<u64> {
        let st = self.state.lock();
        if st.quarantined {
            return None;
        }
        st.tail
            .iter()
            .find(|b| b.base_offset >= st.committed_offset)
            .map(|b| b.wal_seq)
    }
}

/// The answer to a retry of the batch at `base_offset..=last_offset`: its
/// original's fate while it is still in the tail.
fn duplicate(st: &State, base_offset: i64, last_offset: i64) -> Appended {
    let fate = st
        .tail
        .iter()
        .rev()
        .find(|b| b.base_offset == base_offset)
        .map(|b| b.fate.subscribe());
    Appended::Duplicate {
        base_offset,
        last_offset,
        fate,
    }
}

impl Drop for ShardLog {
    fn drop(&mut self) {
        // A replaced or deleted shard's uncommitted bytes leave the total.
        let st = self.state.get_mut();
        let held = std::mem::take(&mut st.unflushed_bytes);
        if held > 0 {
            self.env.unflushed_bytes.fetch_sub(held, Ordering::Relaxed);
        }
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

    fn env() -> ShardEnv {
        ShardEnv {
            tail_keep_bytes: 0,
            producer_expiration_ms: 86_400_000,
            unflushed_bytes: Arc::new(AtomicU64::new(0)),
            cluster: false,
        }
    }

    fn shard(env: ShardEnv) -> ShardLog {
        ShardLog::new(
            "s",
            0,
            ShardInit {
                epoch: 1,
                replay_epoch: 0,
                log_start_offset: 0,
                committed_offset: 0,
                segments: vec![],
                index_version: 0,
                producers: Producers::new(),
                stopped: None,
            },
            env,
        )
    }

    fn seg(first: i64, last: i64) -> SegmentRef {
        SegmentRef {
            object: "o".into(),
            row_group: 0,
            first_offset: first,
            last_offset: last,
            epoch: 1,
            record_count: (last - first + 1) as u64,
            min_timestamp_ms: 1000,
            max_timestamp_ms: 1002,
            object_size: 1,
            committed_ms: 0,
            bytes: 0,
        }
    }

    #[tokio::test]
    async fn offsets_are_dense_and_visible_after_durability() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(shoal_wal_cache::WalOptions::new(dir.path())).unwrap();
        let s = shard(env());
        let b = batch(3);
        let Appended::Pending {
            base_offset,
            last_offset,
            ticket,
            fate,
        } = s.append(&b, batch::info(&b), &wal).unwrap()
        else {
            panic!("duplicate")
        };
        assert_eq!((base_offset, last_offset), (0, 2));
        assert!(matches!(s.read(0, 1 << 20), Read::AtEnd));
        ticket.durable().await.unwrap();
        s.durable_through(last_offset);
        assert_eq!(*fate.borrow(), Fate::Durable);
        let Read::Tail(got) = s.read(1, 1 << 20) else {
            panic!("not in tail")
        };
        assert_eq!(got.len(), 1);
        assert!(matches!(s.read(3, 1 << 20), Read::AtEnd));
        let slice = s.flush_slice().unwrap();
        assert_eq!(slice.batches.len(), 1);
        s.committed(seg(0, 2), ProducerDelta::default());
        assert!(s.flush_slice().is_none());
        // The tail keeps nothing flushed (keep = 0): reads go to the segment.
        assert!(matches!(s.read(1, 1 << 20), Read::Segment(_)));
        assert_eq!(s.min_unflushed_seq(), None);
    }

    fn at(offset: i64, n: i64) -> Bytes {
        batch::with_base_offset(&batch(n), offset)
    }

    fn replay_env(cluster: bool) -> ShardLog {
        let mut e = env();
        e.cluster = cluster;
        ShardLog::new(
            "s",
            0,
            ShardInit {
                epoch: 8,
                replay_epoch: 7,
                log_start_offset: 0,
                committed_offset: 3,
                segments: vec![seg(0, 2)],
                index_version: 0,
                producers: Producers::new(),
                stopped: None,
            },
            e,
        )
    }

    #[test]
    fn replay_continues_offsets_or_names_the_gap() {
        let s = replay_env(false);
        assert_eq!(s.replay(at(0, 3), 1, 7), Replayed::Committed);
        assert_eq!(s.replay(at(3, 2), 2, 6), Replayed::Applied);
        assert_eq!(s.replay(at(5, 2), 3, 7), Replayed::Applied);
        // Offsets 7 and 8 are missing: in standalone that is a loss, whatever
        // the epoch.
        assert_eq!(
            s.replay(at(9, 1), 5, 6),
            Replayed::Gap {
                expected: 7,
                got: 9,
                epoch: 6
            }
        );
        assert_eq!(s.high_watermark(), 7);
        // An entry from a lease later than the last one known is impossible.
        assert!(matches!(s.replay(at(7, 1), 6, 9), Replayed::Gap { .. }));
    }

    #[test]
    fn in_a_cluster_only_older_leases_can_be_superseded() {
        let s = replay_env(true);
        assert_eq!(s.replay(at(3, 2), 1, 7), Replayed::Applied);
        // Lease 6 is older than this broker's last one (7): another owner
        // may have written these offsets since.
        assert_eq!(s.replay(at(9, 1), 2, 6), Replayed::Superseded);
        // A gap among entries of this broker's last lease is a loss.
        assert!(matches!(s.replay(at(9, 1), 3, 7), Replayed::Gap { .. }));
    }

    #[test]
    fn a_later_lease_replaces_what_an_overtaken_one_replayed_at_its_offsets() {
        // Lease 5 wrote offsets 3-4; another owner took over and committed
        // nothing; this broker's lease 7 wrote offsets 3-5 anew.
        let s = replay_env(true);
        assert_eq!(s.replay(at(3, 2), 1, 5), Replayed::Applied);
        assert_eq!(
            s.replay(at(3, 1), 2, 7),
            Replayed::Replaced { superseded: 1 }
        );
        assert_eq!(s.replay(at(4, 2), 3, 7), Replayed::Applied);
        assert_eq!(s.high_watermark(), 6);
        assert_eq!(
            s.unflushed_bytes(),
            (at(3, 1).len() + at(4, 2).len()) as u64
        );
        // Entries of the same lease never replace each other: that is a gap.
        assert!(matches!(s.replay(at(4, 1), 4, 7), Replayed::Gap { .. }));
    }

    #[test]
    fn a_commit_carries_only_the_producers_that_wrote_or_expired() {
        let now = crate::broker::now_ms();
        let state = |last_write_ms| shoal_placement::ProducerState {
            producer_epoch: 0,
            batches: vec![],
            last_write_ms,
        };
        // 5 is idle past the expiration, 6 wrote recently; neither writes now.
        let producers = Producers::from([(5, state(1)), (6, state(now - 1000))]);
        let s = ShardLog::new(
            "s",
            0,
            ShardInit {
                epoch: 1,
                replay_epoch: 1,
                log_start_offset: 0,
                committed_offset: 0,
                segments: vec![],
                index_version: 0,
                producers,
                stopped: None,
            },
            env(),
        );
        use kafka_protocol::records::{
            Compression, Record as KafkaRecord, RecordBatchEncoder, RecordEncodeOptions,
            TimestampType,
        };
        // Producer 7's first two records.
        let records: Vec<KafkaRecord> = (0..2)
            .map(|o| KafkaRecord {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: 7,
                producer_epoch: 0,
                timestamp_type: TimestampType::Creation,
                offset: o,
                sequence: o as i32,
                timestamp: 1000,
                key: None,
                value: Some(Bytes::from_static(b"v")),
                headers: Default::default(),
            })
            .collect();
        let mut buf = bytes::BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut buf, records.iter(), &options).unwrap();
        assert_eq!(s.replay(buf.freeze(), 1, 1), Replayed::Applied);
        let slice = s.flush_slice().unwrap();
        let delta = s.producer_delta(&slice.batches, now);
        assert_eq!(delta.changed.keys().copied().collect::<Vec<_>>(), [7]);
        assert_eq!(delta.expired, [5]);
    }

    #[test]
    fn a_quarantined_refused_shard_no_longer_holds_the_wal_back() {
        let s = replay_env(false);
        assert_eq!(s.replay(at(3, 2), 11, 7), Replayed::Applied);
        assert_eq!(s.replay(at(5, 1), 12, 7), Replayed::Applied);
        assert_eq!(s.min_unflushed_seq(), Some(11));
        // Only a flush-refused shard can be released.
        s.quarantined();
        assert_eq!(s.min_unflushed_seq(), Some(11));
        s.refuse_flushes("segment commit refused");
        let entries = s.uncommitted_wal_entries();
        assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), [11, 12]);
        let rec = WalRecord::decode(entries[1].1.clone()).unwrap();
        assert_eq!((rec.stream.as_str(), rec.shard, rec.epoch), ("s", 0, 7));
        assert_eq!(rec.batch, at(5, 1));
        s.quarantined();
        assert_eq!(s.min_unflushed_seq(), None);
        // Resumed, it flushes again, so it counts again.
        s.resume();
        assert_eq!(s.min_unflushed_seq(), Some(11));
    }

    #[tokio::test]
    async fn a_failed_wal_write_rolls_its_batches_back() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(shoal_wal_cache::WalFaults::default());
        let wal = Wal::open(shoal_wal_cache::WalOptions {
            faults: Some(faults.clone()),
            ..shoal_wal_cache::WalOptions::new(dir.path())
        })
        .unwrap();
        let env = env();
        let total = env.unflushed_bytes.clone();
        let s = shard(env);
        let idem = |seq: i32| {
            let mut b = batch(2).to_vec();
            // producer id 9, epoch 0, base sequence `seq` (v2 header fields)
            b[43..51].copy_from_slice(&9i64.to_be_bytes());
            b[51..53].copy_from_slice(&0i16.to_be_bytes());
            b[53..57].copy_from_slice(&seq.to_be_bytes());
            Bytes::from(b)
        };
        let first = idem(0);
        let Appended::Pending { ticket, .. } = s.append(&first, batch::info(&first), &wal).unwrap()
        else {
            panic!("duplicate")
        };
        ticket.durable().await.unwrap();
        s.durable_through(1);
        faults
            .fail_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let second = idem(2);
        let Appended::Pending {
            ticket, mut fate, ..
        } = s.append(&second, batch::info(&second), &wal).unwrap()
        else {
            panic!("duplicate")
        };
        assert!(ticket.durable().await.is_err());
        let shoal_wal_cache::WalHealth::Failed(f) = wal.health() else {
            panic!("the WAL did not fail")
        };
        s.roll_back_from(f.first_failed_seq);
        assert_eq!(
            *fate.wait_for(|f| *f != Fate::Pending).await.unwrap(),
            Fate::Failed
        );
        assert_eq!(total.load(Ordering::Relaxed), first.len() as u64);
        faults
            .fail_writes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        wal.resume(f.generation);
        let mut health = wal.health();
        for _ in 0..500 {
            if health == shoal_wal_cache::WalHealth::Ok {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            health = wal.health();
        }
        assert_eq!(health, shoal_wal_cache::WalHealth::Ok);
        // A later batch of the producer may not overtake the failed one.
        let third = idem(4);
        let refused = s.append(&third, batch::info(&third), &wal);
        assert!(
            matches!(&refused, Err(Error::Wal(e)) if e.to_string().contains("must first resend")),
            "{:?}",
            refused.err()
        );
        // The retry is new again: same offsets, no duplicate.
        let Appended::Pending {
            base_offset,
            ticket,
            ..
        } = s.append(&second, batch::info(&second), &wal).unwrap()
        else {
            panic!("a rolled-back batch must not count as a duplicate")
        };
        assert_eq!(base_offset, 2);
        ticket.durable().await.unwrap();
    }

    /// The broker's total is the sum of what its shards hold uncommitted,
    /// whatever happens to them: commits, fencing, rollbacks, replacement.
    #[tokio::test]
    async fn uncommitted_bytes_are_accounted_per_shard() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(shoal_wal_cache::WalOptions::new(dir.path())).unwrap();
        let env = env();
        let total = env.unflushed_bytes.clone();
        let a = shard(env.clone());
        let b = shard(env.clone());
        let one = batch(3);
        let mut tickets = Vec::new();
        for s in [&a, &a, &b] {
            let Appended::Pending { ticket, .. } = s.append(&one, batch::info(&one), &wal).unwrap()
            else {
                panic!("duplicate")
            };
            tickets.push(ticket);
        }
        for t in tickets {
            t.durable().await.unwrap();
        }
        let len = one.len() as u64;
        assert_eq!(total.load(Ordering::Relaxed), 3 * len);
        a.durable_through(5);
        a.committed(seg(0, 2), ProducerDelta::default());
        assert_eq!(total.load(Ordering::Relaxed), 2 * len);
        // A commit seen twice counts once.
        a.committed(seg(0, 2), ProducerDelta::default());
        assert_eq!(total.load(Ordering::Relaxed), 2 * len);
        b.fence();
        assert_eq!(total.load(Ordering::Relaxed), len);
        drop(a);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }
}
