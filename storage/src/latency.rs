//! Per-kind request latency histograms of an [`crate::ObjectStorage`], kept
//! as atomics so that recording costs no lock and no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The kinds of object-store request the latencies are kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Put,
    Get,
    Head,
    Delete,
    List,
}

impl RequestKind {
    pub const ALL: [RequestKind; 5] = [
        RequestKind::Put,
        RequestKind::Get,
        RequestKind::Head,
        RequestKind::Delete,
        RequestKind::List,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Put => "put",
            RequestKind::Get => "get",
            RequestKind::Head => "head",
            RequestKind::Delete => "delete",
            RequestKind::List => "list",
        }
    }
}

/// Upper bounds of the histogram buckets, in seconds (plus +Inf): from a
/// local disk's sub-millisecond answers to a throttled S3's seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Cumulative counts per bucket (the last is +Inf), sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySnapshot {
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

#[derive(Default)]
pub(crate) struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub(crate) fn record(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        // Independent statistics: no ordering with other memory is needed.
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        LatencySnapshot {
            cumulative,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: total,
        }
    }
}

/// One histogram per [`RequestKind`].
#[derive(Default)]
pub(crate) struct Latencies([LatencyHistogram; 5]);

impl Latencies {
    pub(crate) fn of(&self, kind: RequestKind) -> &LatencyHistogram {
        &self.0[kind as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(30));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[5], 2); // <= 50 ms
        assert_eq!(s.cumulative[LATENCY_BUCKETS.len() - 1], 2);
        assert_eq!(*s.cumulative.last().unwrap(), 3);
        assert!((s.sum_seconds - 60.0305).abs() < 1e-6);
    }
}
