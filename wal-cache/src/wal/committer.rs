//! The commit loop: one thread that turns everything queued into one fjall
//! batch and one fsync.
//!
//! Appends that arrive while a batch is being written or fsynced wait in the
//! queue and form the next group, so the fsync rate is bounded by the disk,
//! not by the request rate.

use std::{
    sync::{Arc, PoisonError, atomic::Ordering},
    time::Instant,
};

use fjall::{Database, Keyspace, PersistMode};

use super::{LAST_SEQ_KEY, Pending, Shared};
use crate::error::Error;

pub(super) struct Committer {
    pub(super) shared: Arc<Shared>,
    pub(super) db: Database,
    pub(super) entries: Keyspace,
    pub(super) meta: Keyspace,
    /// Highest seq handed to fjall (written or skipped as truncated).
    pub(super) written_through: u64,
    /// Every seq up to here is deleted or was never written.
    pub(super) tombstoned_through: u64,
}

/// One round of work taken from the shared state.
struct Round {
    group: Vec<Pending>,
    truncate_through: u64,
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
    pub(super) fn run(mut self) {
        let _guard = StopGuard(self.shared.clone());
        while let Some(round) = self.next_round() {
            if let Err(err) = self.commit(&round) {
                self.fail(round, err);
                return;
            }
            for pending in round.group {
                // The caller may have dropped its ticket; nothing to tell.
                let _ = pending.done.send(Ok(()));
            }
        }
    }

    /// Wait for appends or a due truncation; `None` once closing and drained.
    fn next_round(&self) -> Option<Round> {
        let mut st = self.shared.lock();
        loop {
            let truncation_due =
                st.truncated_through.min(self.written_through) > self.tombstoned_through;
            if !st.queue.is_empty() || truncation_due {
                break;
            }
            if st.closing {
                return None;
            }
            st = self
                .shared
                .wake
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }

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
        })
    }

    /// Write one round as a single atomic batch, then fsync once.
    fn commit(&mut self, round: &Round) -> Result<(), fjall::Error> {
        let truncate_through = round.truncate_through;
        let mut batch = self.db.batch();

        // Tombstones only for entries earlier rounds wrote. Entries of this
        // round that are already truncated are left out instead: a put and a
        // delete of one key in one batch would share a seqno.
        let tomb_end = truncate_through.min(self.written_through);
        for seq in self.tombstoned_through.saturating_add(1)..=tomb_end {
            batch.remove(&self.entries, &seq.to_be_bytes()[..]);
        }
        for pending in &round.group {
            if pending.seq > truncate_through {
                batch.insert(
                    &self.entries,
                    &pending.seq.to_be_bytes()[..],
                    &pending.payload[..],
                );
            }
        }
        // In the same batch, so the mark can never lag behind the entries.
        if let Some(last) = round.group.last() {
            batch.insert(&self.meta, LAST_SEQ_KEY, &last.seq.to_be_bytes()[..]);
        }
        batch.commit()?;

        let started = Instant::now();
        self.db.persist(PersistMode::SyncAll)?;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);

        if let Some(last) = round.group.last() {
            self.written_through = last.seq;
        }
        self.tombstoned_through = self
            .tombstoned_through
            .max(truncate_through.min(self.written_through));

        // Counters before tickets resolve, so a caller that awaited its
        // ticket sees its group counted.
        let c = &self.shared.counters;
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        c.fsync_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        c.last_fsync_nanos.store(nanos, Ordering::Relaxed);
        if !round.group.is_empty() {
            let size = round.group.len() as u64;
            c.last_group_size.store(size, Ordering::Relaxed);
            c.max_group_size.fetch_max(size, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A failed write or fsync: fjall is poisoned and nothing queued can be
    /// made durable, so every waiting ticket and every later call gets the
    /// error.
    fn fail(&self, round: Round, err: fjall::Error) {
        tracing::error!(error = %err, group = round.group.len(), "wal commit failed");
        let err = Arc::new(err);
        let queued = {
            let mut st = self.shared.lock();
            st.failed = Some(err.clone());
            std::mem::take(&mut st.queue)
        };
        for pending in round.group.into_iter().chain(queued) {
            let _ = pending.done.send(Err(Error::Commit(err.clone())));
        }
    }
}
