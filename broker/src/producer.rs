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
    /// A retry of a batch already written: answer with its original offset.
    Duplicate {
        base_offset: i64,
    },
    Reject(Error),
}

pub fn check(producers: &Producers, info: &BatchInfo) -> SeqCheck {
    if !info.is_idempotent() {
        return SeqCheck::Accept;
    }
    let Some(state) = producers.get(&info.producer_id) else {
        // No history (new producer, or its records are gone): accept, as
        // Kafka does after KIP-360, rather than wedge the producer.
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
        };
    }
    let expected = state
        .batches
        .last()
        .map(|b| next_sequence(b.last_sequence))
        .unwrap_or(0);
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

fn next_sequence(s: i32) -> i32 {
    if s == i32::MAX { 0 } else { s + 1 }
}

/// Remember an accepted batch.
pub fn record(producers: &mut Producers, info: &BatchInfo, base_offset: i64) {
    if !info.is_idempotent() {
        return;
    }
    let state = producers
        .entry(info.producer_id)
        .or_insert_with(|| ProducerState {
            producer_epoch: info.producer_epoch,
            batches: Vec::new(),
        });
    if state.producer_epoch != info.producer_epoch {
        state.producer_epoch = info.producer_epoch;
        state.batches.clear();
    }
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

    #[test]
    fn in_order_duplicate_and_gap() {
        let mut p = Producers::new();
        assert!(matches!(check(&p, &info(1, 0, 0, 3)), SeqCheck::Accept));
        record(&mut p, &info(1, 0, 0, 3), 100);
        assert!(matches!(
            check(&p, &info(1, 0, 0, 3)),
            SeqCheck::Duplicate { base_offset: 100 }
        ));
        assert!(matches!(check(&p, &info(1, 0, 3, 2)), SeqCheck::Accept));
        assert!(matches!(
            check(&p, &info(1, 0, 7, 1)),
            SeqCheck::Reject(Error::OutOfOrderSequence { expected: 3, .. })
        ));
    }

    #[test]
    fn epochs_fence_and_reset() {
        let mut p = Producers::new();
        record(&mut p, &info(1, 2, 0, 1), 0);
        assert!(matches!(
            check(&p, &info(1, 1, 1, 1)),
            SeqCheck::Reject(Error::ProducerFenced(1))
        ));
        assert!(matches!(check(&p, &info(1, 3, 0, 1)), SeqCheck::Accept));
        assert!(matches!(check(&p, &info(1, 3, 5, 1)), SeqCheck::Reject(_)));
    }

    #[test]
    fn remembers_only_recent_batches() {
        let mut p = Producers::new();
        for i in 0..10 {
            record(&mut p, &info(1, 0, i, 1), i64::from(i));
        }
        assert_eq!(p[&1].batches.len(), PRODUCER_BATCH_MEMORY);
        assert!(matches!(
            check(&p, &info(1, 0, 9, 1)),
            SeqCheck::Duplicate { base_offset: 9 }
        ));
    }

    #[test]
    fn non_idempotent_always_accepted() {
        let p = Producers::new();
        assert!(matches!(check(&p, &info(-1, -1, -1, 5)), SeqCheck::Accept));
    }
}
