//! Idempotent-producer sequence checks, as Kafka does them: per producer
//! id, the epoch and the last few batches written to one shard.

use std::collections::BTreeMap;

use shoal_placement::model::PRODUCER_BATCH_MEMORY;
use shoal_placement::{ProducerBatch, ProducerState};

use crate::batch::BatchInfo;
use crate::error::Error;

pub type Producers = BTreeMap<i64, ProducerState>;

#[derive(Debug)]
pub enum SeqCheck {
    Accept,
    /// A retry of a batch already written: answer as its original.
    Duplicate {
        base_offset: i64,
        last_offset: i64,
    },
    Reject(Error),
}

/// The clock and Kafka's `producer.id.expiration.ms`: a producer idle
/// longer than that has no state any more.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub now_ms: i64,
    pub expiration_ms: i64,
}

/// Has this producer been idle past the expiration?
pub fn expired(state: &ProducerState, now_ms: i64, expiration_ms: i64) -> bool {
    now_ms.saturating_sub(state.last_write_ms) >= expiration_ms
}

pub fn check(producers: &Producers, info: &BatchInfo, live: Live) -> SeqCheck {
    if !info.is_idempotent() {
        return SeqCheck::Accept;
    }
    let Some(state) = producers
        .get(&info.producer_id)
        .filter(|s| !expired(s, live.now_ms, live.expiration_ms))
    else {
        // No history (new producer, expired, or its records are gone):
        // accept, as Kafka does after KIP-360, rather than wedge the producer.
        return SeqCheck::Accept;
    };
    if info.producer_epoch < state.producer_epoch {
        return SeqCheck::Reject(Error::ProducerFenced(info.producer_id));
    }
    if info.producer_epoch > state.producer_epoch {
        return if info.base_sequence == 0 {
            SeqCheck::Accept
        } else {
            SeqCheck::Reject(Error::OutOfOrderSequence {
                producer_id: info.producer_id,
                expected: 0,
                got: info.base_sequence,
            })
        };
    }
    let last_sequence = info.last_sequence();
    if let Some(b) = state
        .batches
        .iter()
        .find(|b| b.first_sequence == info.base_sequence && b.last_sequence == last_sequence)
    {
        return SeqCheck::Duplicate {
            base_offset: b.base_offset,
            last_offset: b.last_offset,
        };
    }
    let expected = next_expected(state);
    if info.base_sequence == expected {
        SeqCheck::Accept
    } else {
        SeqCheck::Reject(Error::OutOfOrderSequence {
            producer_id: info.producer_id,
            expected,
            got: info.base_sequence,
        })
    }
}

/// The first sequence of the batch `state`'s producer must send next.
pub fn next_expected(state: &ProducerState) -> i32 {
    state
        .batches
        .last()
        .map(|b| next_sequence(b.last_sequence))
        .unwrap_or(0)
}

fn next_sequence(s: i32) -> i32 {
    if s == i32::MAX { 0 } else { s + 1 }
}

/// Remember an accepted batch, appended at `now_ms`.
pub fn record(producers: &mut Producers, info: &BatchInfo, base_offset: i64, now_ms: i64) {
    if !info.is_idempotent() {
        return;
    }
    let state = producers
        .entry(info.producer_id)
        .or_insert_with(|| ProducerState {
            producer_epoch: info.producer_epoch,
            batches: Vec::new(),
            last_write_ms: now_ms,
        });
    if state.producer_epoch != info.producer_epoch {
        state.producer_epoch = info.producer_epoch;
        state.batches.clear();
    }
    state.last_write_ms = state.last_write_ms.max(now_ms);
    state.batches.push(ProducerBatch {
        first_sequence: info.base_sequence,
        last_sequence: info.last_sequence(),
        base_offset,
        last_offset: base_offset + i64::from(info.record_count) - 1,
    });
    if state.batches.len() > PRODUCER_BATCH_MEMORY {
        let excess = state.batches.len() - PRODUCER_BATCH_MEMORY;
        state.batches.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: Live = Live {
        now_ms: 1_000,
        expiration_ms: 10_000,
    };

    fn info(pid: i64, epoch: i16, seq: i32, count: i32) -> BatchInfo {
        BatchInfo {
            record_count: count,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            transactional: false,
            control: false,
        }
    }

    fn check_live(p: &Producers, i: &BatchInfo) -> SeqCheck {
        check(p, i, LIVE)
    }

    fn record_now(p: &mut Producers, i: &BatchInfo, base: i64) {
        record(p, i, base, LIVE.now_ms)
    }

    #[test]
    fn in_order_duplicate_and_gap() {
        let mut p = Producers::new();
        assert!(matches!(
            check_live(&p, &info(1, 0, 0, 3)),
            SeqCheck::Accept
        ));
        record_now(&mut p, &info(1, 0, 0, 3), 100);
        assert!(matches!(
            check_live(&p, &info(1, 0, 0, 3)),
            SeqCheck::Duplicate {
                base_offset: 100,
                last_offset: 102
            }
        ));
        assert!(matches!(
            check_live(&p, &info(1, 0, 3, 2)),
            SeqCheck::Accept
        ));
        assert!(matches!(
            check_live(&p, &info(1, 0, 7, 1)),
            SeqCheck::Reject(Error::OutOfOrderSequence { expected: 3, .. })
        ));
    }

    #[test]
    fn epochs_fence_and_reset() {
        let mut p = Producers::new();
        record_now(&mut p, &info(1, 2, 0, 1), 0);
        assert!(matches!(
            check_live(&p, &info(1, 1, 1, 1)),
            SeqCheck::Reject(Error::ProducerFenced(1))
        ));
        assert!(matches!(
            check_live(&p, &info(1, 3, 0, 1)),
            SeqCheck::Accept
        ));
        assert!(matches!(
            check_live(&p, &info(1, 3, 5, 1)),
            SeqCheck::Reject(_)
        ));
    }

    #[test]
    fn remembers_only_recent_batches() {
        let mut p = Producers::new();
        for i in 0..10 {
            record_now(&mut p, &info(1, 0, i, 1), i64::from(i));
        }
        assert_eq!(p[&1].batches.len(), PRODUCER_BATCH_MEMORY);
        assert!(matches!(
            check_live(&p, &info(1, 0, 9, 1)),
            SeqCheck::Duplicate {
                base_offset: 9,
                last_offset: 9
            }
        ));
    }

    #[test]
    fn an_expired_producer_is_accepted_at_any_sequence() {
        let mut p = Producers::new();
        record_now(&mut p, &info(1, 0, 0, 3), 100);
        assert!(matches!(
            check_live(&p, &info(1, 0, 57, 1)),
            SeqCheck::Reject(_)
        ));
        let later = Live {
            now_ms: LIVE.now_ms + LIVE.expiration_ms,
            ..LIVE
        };
        assert!(expired(&p[&1], later.now_ms, later.expiration_ms));
        assert!(matches!(
            check(&p, &info(1, 0, 57, 1), later),
            SeqCheck::Accept
        ));
    }

    #[test]
    fn non_idempotent_always_accepted() {
        let p = Producers::new();
        assert!(matches!(
            check_live(&p, &info(-1, -1, -1, 5)),
            SeqCheck::Accept
        ));
    }
}
