//! Prometheus metrics of the broker. Counters and histograms live here;
//! gauges that other crates keep as atomics (WAL, object store, cache) are
//! read at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    pub api: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<ApiLabel, Counter>,
    pub produce_requests: Counter,
    pub produce_bytes: Counter,
    pub produce_records: Counter,
    pub produce_latency: Histogram,
    pub fetch_requests: Counter,
    pub fetch_bytes: Counter,
    pub fetch_latency: Histogram,
    pub flushes: Counter,
    pub flush_bytes: Counter,
    pub flush_duration: Histogram,
    pub flush_errors: Counter,
    pub cold_reads: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let m = Metrics {
            requests: Family::default(),
            produce_requests: Counter::default(),
            produce_bytes: Counter::default(),
            produce_records: Counter::default(),
            produce_latency: latency_histogram(),
            fetch_requests: Counter::default(),
            fetch_bytes: Counter::default(),
            fetch_latency: latency_histogram(),
            flushes: Counter::default(),
            flush_bytes: Counter::default(),
            flush_duration: latency_histogram(),
            flush_errors: Counter::default(),
            cold_reads: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kafka_requests",
            "Kafka requests by API",
            m.requests.clone(),
        );
        registry.register(
            "produce_requests",
            "Produced partition batches",
            m.produce_requests.clone(),
        );
        registry.register(
            "produce_bytes",
            "Bytes of record batches produced",
            m.produce_bytes.clone(),
        );
        registry.register(
            "produce_records",
            "Records produced",
            m.produce_records.clone(),
        );
        registry.register(
            "produce_latency_seconds",
            "Produce latency until acknowledged",
            m.produce_latency.clone(),
        );
        registry.register("fetch_requests", "Fetch requests", m.fetch_requests.clone());
        registry.register(
            "fetch_bytes",
            "Bytes returned by fetches",
            m.fetch_bytes.clone(),
        );
        registry.register(
            "fetch_latency_seconds",
            "Fetch latency including long-poll",
            m.fetch_latency.clone(),
        );
        registry.register("flush", "Segment flushes committed", m.flushes.clone());
        registry.register(
            "flush_bytes",
            "Bytes of Parquet segments flushed",
            m.flush_bytes.clone(),
        );
        registry.register(
            "flush_duration_seconds",
            "Flush duration (encode, PUT, commit)",
            m.flush_duration.clone(),
        );
        registry.register(
            "flush_errors",
            "Failed flush attempts",
            m.flush_errors.clone(),
        );
        registry.register(
            "cold_reads",
            "Fetches served from object storage segments",
            m.cold_reads.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Render the registry plus externally kept gauges.
    pub fn render(&self, extra: &[(&str, &str, &str, f64)]) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        // Drop the trailing "# EOF" so extra families can follow it.
        if let Some(i) = out.rfind("# EOF") {
            out.truncate(i);
        }
        let mut last = "";
        for (name, kind, help, value) in extra {
            let family = name.split('{').next().unwrap_or(name);
            if family != last {
                out.push_str(&format!("# HELP {family} {help}\n# TYPE {family} {kind}\n"));
                last = family;
            }
            out.push_str(&format!("{name} {value}\n"));
        }
        out.push_str("# EOF\n");
        out
    }
}
