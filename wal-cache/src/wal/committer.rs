//! The commit loop: one thread that turns everything queued into one write
//! and one `fdatasync`, rotates segments and handles a failed write.
//!
//! Appends that arrive while a group is being written or synced wait in the
//! queue and form the next group, so the fsync rate is bounded by the disk,
//! not by the request rate.

use std::{
    collections::VecDeque,
    os::unix::fs::FileExt,
    sync::{Arc, PoisonError, atomic::Ordering},
    time::{Duration, Instant},
};

use super::faults::{Fault, Faults};
use super::format::{RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader};
use super::mark::Mark;
use super::segments::{Pool, SegmentFile};
use super::{Pending, Shared, WalFailure};
use crate::error::Error;

/// How long a resumed committer waits between attempts to start a segment
/// (a disk that is still full).
const RETRY_START: Duration = Duration::from_millis(250);
/// The longest the truncation mark lags behind when nothing else needs it.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// The segment being written.
struct Active {
    seg: SegmentFile,
    /// Where the next record goes.
    pos: u64,
    /// Size of the file; a group that does not fit goes to a new segment.
    len: u64,
    /// Last seq durable in this segment.
    last_seq: u64,
}

/// An older segment with entries not yet truncated.
struct Sealed {
    seg: SegmentFile,
    last_seq: u64,
}

pub(super) struct Committer {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    sealed: VecDeque<Sealed>,
    active: Option<Active>,
    /// Highest entry seq written and synced.
    durable: u64,
    /// The truncation mark, durable.
    mark: Mark,
    marked_at: Instant,
    /// The number of the last segment started.
    number: u64,
    buf: Vec<u8>,
    faults: Faults,
}

/// One round of work taken from the shared state.
struct Round {
    group: Vec<Pending>,
    truncate_through: u64,
    /// Record the truncation mark in this round.
    mark: bool,
    /// After a failure the caller resumed: start a new segment.
    restart: bool,
}

/// Marks the committer stopped however the thread ends, so appends fail
/// fast instead of queueing forever, and unanswered tickets resolve with
/// `Error::Closed` when their senders drop.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let queued = {
            let mut st = self.0.lock();
            st.stopped = true;
            std::mem::take(&mut st.queue)
        };
        drop(queued);
    }
}

impl Committer {
    pub(super) fn new(
        shared: Arc<Shared>,
        pool: Arc<Pool>,
        sealed: Vec<(SegmentFile, u64, u64)>,
        durable: u64,
        mark: Mark,
        number: u64,
        faults: Faults,
    ) -> Committer {
        Committer {
            shared,
            pool,
            sealed: sealed
                .into_iter()
                .map(|(seg, _first, last_seq)| Sealed { seg, last_seq })
                .collect(),
            active: None,
            durable,
            mark,
            marked_at: Instant::now(),
            number,
            buf: Vec::new(),
            faults,
        }
    }

    pub(super) fn run(mut self) {
        let _guard = StopGuard(self.shared.clone());
        self.recycle();
        while let Some(round) = self.next_round() {
            if round.mark
                && let Err(e) = self.record_mark(round.truncate_through)
            {
                tracing::warn!("wal: cannot record the truncation mark: {e}");
                self.shared
                    .counters
                    .write_errors
                    .fetch_add(1, Ordering::Relaxed);
                // Truncation is not urgent; do not spin on a broken disk.
                std::thread::sleep(RETRY_START);
            }
            self.recycle();
            if round.restart {
                if let Err(e) = self.restart() {
                    tracing::warn!("wal: still cannot write after a failure: {e}");
                    self.note_error(&e);
                    std::thread::sleep(RETRY_START);
                }
                continue;
            }
            if round.group.is_empty() {
                continue;
            }
            match self.commit(&round) {
                Ok(()) => {
                    for pending in round.group {
                        // The caller may have dropped its ticket; nothing to tell.
                        let _ = pending.done.send(Ok(()));
                    }
                }
                Err(err) => self.fail(round, err),
            }
        }
    }

    /// Wait for appends, a truncation to record, or (after a failure the
    /// caller resumed) a restart; `None` once closing and drained.
    fn next_round(&self) -> Option<Round> {
        let mut st = self.shared.lock();
        loop {
            // The mark costs an fsync: it is written when it frees a
            // segment, on a failure (to free room), at close, and at most
            // every MARK_EVERY otherwise. A crash before it only replays
            // entries the caller has committed already.
            let wanted = st.truncated_through > self.mark.through();
            let mark_due = wanted
                && (self
                    .sealed
                    .front()
                    .is_some_and(|s| s.last_seq <= st.truncated_through)
                    || st.failure.is_some()
                    || st.closing
                    || self.marked_at.elapsed() >= MARK_EVERY);
            match &st.failure {
                Some(f) if f.resumed || mark_due => {
                    return Some(Round {
                        group: Vec::new(),
                        truncate_through: st.truncated_through,
                        mark: mark_due,
                        restart: f.resumed,
                    });
                }
                Some(_) => {}
                None if !st.queue.is_empty() || mark_due => break,
                None => {}
            }
            if st.closing {
                return None;
            }
            st = if wanted {
                let left = MARK_EVERY.saturating_sub(self.marked_at.elapsed());
                self.shared
                    .wake
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            } else {
                self.shared
                    .wake
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner)
            };
        }

        let mark = st.truncated_through > self.mark.through()
            && (self
                .sealed
                .front()
                .is_some_and(|s| s.last_seq <= st.truncated_through)
                || st.closing
                || self.marked_at.elapsed() >= MARK_EVERY);
        let mut group = Vec::new();
        let mut bytes = 0usize;
        while let Some(pending) = st.queue.pop_front() {
            let len = pending.payload.len();
            if !group.is_empty() && bytes.saturating_add(len) > self.shared.max_group_bytes {
                st.queue.push_front(pending);
                break;
            }
            bytes = bytes.saturating_add(len);
            group.push(pending);
        }
        Some(Round {
            group,
            truncate_through: st.truncated_through,
            mark,
            restart: false,
        })
    }

    /// Record a truncation mark that moved, in its own file: this needs no
    /// room in the log, so it works on a full disk too.
    fn record_mark(&mut self, through: u64) -> std::io::Result<()> {
        if through > self.mark.through() {
            self.mark.set(through)?;
            self.marked_at = Instant::now();
            self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Encode the round's entries into `self.buf`; returns the seq of the
    /// first and last one written.
    fn encode(&mut self, round: &Round) -> Option<(u64, u64)> {
        self.buf.clear();
        let mut first = None;
        let mut last = self.durable;
        for pending in &round.group {
            // Truncated while queued: resolved, never written.
            if pending.seq <= round.truncate_through {
                continue;
            }
            RecordHeader::write(pending.seq, self.durable, &pending.payload, &mut self.buf);
            first.get_or_insert(pending.seq);
            last = pending.seq;
        }
        first.map(|f| (f, last))
    }

    /// Write one round as a single write, then fsync once.
    fn commit(&mut self, round: &Round) -> std::io::Result<()> {
        let Some((first, last)) = self.encode(round) else {
            // Nothing to write: every entry was truncated while queued.
            return Ok(());
        };
        if let Some(a) = &self.active {
            let fits = a.pos + self.buf.len() as u64 <= a.len || a.pos == SEGMENT_HEADER_LEN as u64;
            if !fits {
                self.seal();
            }
        }
        if self.active.is_none() {
            self.start_segment(first)?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(std::io::Error::other("no active segment"));
        };
        self.faults.check(Fault::Write)?;
        active.seg.file.write_all_at(&self.buf, active.pos)?;
        let started = Instant::now();
        self.faults.check(Fault::Sync)?;
        active.seg.file.sync_data()?;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        active.pos += self.buf.len() as u64;
        active.len = active.len.max(active.pos);
        active.last_seq = last;
        self.durable = last;

        // Counters before tickets resolve, so a caller that awaited its
        // ticket sees its group counted.
        let c = &self.shared.counters;
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        c.fsync_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        c.last_fsync_nanos.store(nanos, Ordering::Relaxed);
        let size = round.group.len() as u64;
        c.last_group_size.store(size, Ordering::Relaxed);
        c.max_group_size.fetch_max(size, Ordering::Relaxed);
        Ok(())
    }

    /// Begin a segment whose first record has seq `first_seq`. Its header
    /// is synced with that first record.
    fn start_segment(&mut self, first_seq: u64) -> std::io::Result<()> {
        self.faults.check(Fault::Write)?;
        let seg = self.pool.take()?;
        self.number += 1;
        let header = SegmentHeader {
            number: self.number,
            first_seq,
            prev_last_seq: self.durable,
        };
        let written = seg.file.write_all_at(&header.encode(), 0);
        let len = seg.file.metadata().map(|m| m.len());
        match (written, len) {
            (Ok(()), Ok(len)) => {
                self.active = Some(Active {
                    seg,
                    pos: SEGMENT_HEADER_LEN as u64,
                    len,
                    last_seq: self.durable,
                });
                self.update_segment_count();
                Ok(())
            }
            (Err(e), _) | (_, Err(e)) => {
                self.pool.retire(seg);
                Err(e)
            }
        }
    }

    /// The active segment is done: keep it until its entries are truncated.
    fn seal(&mut self) {
        if let Some(a) = self.active.take() {
            self.sealed.push_back(Sealed {
                seg: a.seg,
                last_seq: a.last_seq,
            });
        }
    }

    /// Give back every sealed segment whose entries are all truncated (the
    /// durable mark covers them).
    fn recycle(&mut self) {
        while let Some(s) = self.sealed.front() {
            if s.last_seq > self.mark.through() {
                break;
            }
            if let Some(s) = self.sealed.pop_front() {
                self.pool.retire(s.seg);
            }
        }
        self.update_segment_count();
    }

    fn update_segment_count(&self) {
        let n = self.sealed.len() + usize::from(self.active.is_some());
        self.shared
            .counters
            .segments
            .store(n as u64, Ordering::Relaxed);
    }

    /// After a resumed failure: start a new segment (its header marks where
    /// the durable log ended), proving the disk takes writes again, then
    /// take appends again.
    fn restart(&mut self) -> std::io::Result<()> {
        // The failed seqs stay used: the segment begins after them.
        let next = self.shared.lock().next_seq;
        self.start_segment(next)?;
        let synced = self
            .faults
            .check(Fault::Sync)
            .and_then(|()| match &self.active {
                Some(a) => a.seg.file.sync_data(),
                None => Err(std::io::Error::other("no active segment")),
            });
        if let Err(e) = synced {
            if let Some(a) = self.active.take() {
                self.pool.retire(a.seg);
            }
            return Err(e);
        }
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let mut st = self.shared.lock();
        st.failure = None;
        self.shared.publish_health(&st);
        drop(st);
        tracing::info!(durable = self.durable, "wal: writing again after a failure");
        Ok(())
    }

    fn note_error(&self, e: &std::io::Error) {
        self.shared
            .counters
            .write_errors
            .fetch_add(1, Ordering::Relaxed);
        let mut st = self.shared.lock();
        if let Some(f) = &mut st.failure {
            f.error = e.to_string();
        }
        self.shared.publish_health(&st);
    }

    /// A failed write or fsync: nothing of this group or queued behind it
    /// can be promised durable. Every waiting ticket gets the error and the
    /// log refuses appends until the caller resumes it. The failed seqs
    /// are never handed out again, so nothing the failed write left in a
    /// file can pass for a later record; once the log writes again, the
    /// next segment's header marks the durable end and what the failed
    /// write left is never read.
    fn fail(&mut self, round: Round, err: std::io::Error) {
        let first_failed_seq = self.durable + 1;
        tracing::error!(error = %err, group = round.group.len(), first_failed_seq, "wal write failed");
        self.shared
            .counters
            .write_errors
            .fetch_add(1, Ordering::Relaxed);
        self.seal();
        let err = Arc::new(err);
        let queued = {
            let mut st = self.shared.lock();
            st.failures += 1;
            st.failure = Some(WalFailure {
                generation: st.failures,
                first_failed_seq,
                error: err.to_string(),
                resumed: false,
            });
            let queued = std::mem::take(&mut st.queue);
            while st
                .live
                .back()
                .is_some_and(|&(seq, _)| seq >= first_failed_seq)
            {
                if let Some((_, len)) = st.live.pop_back() {
                    st.pending_bytes -= len;
                }
            }
            self.shared
                .pending_bytes
                .store(st.pending_bytes, Ordering::Relaxed);
            self.shared.publish_health(&st);
            queued
        };
        for pending in round.group.into_iter().chain(queued) {
            let _ = pending.done.send(Err(Error::Commit(err.clone())));
        }
    }
}
