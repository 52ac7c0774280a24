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
    /// Kafka connections turned away by a listener's connection limits.
    pub connections_refused: Counter,
    pub produce_bytes: Counter,
    pub produce_records: Counter,
    pub produce_latency: Histogram,
    pub fetch_requests: Counter,
    /// Fetches refused for an unknown fetch session or a wrong epoch.
    pub fetch_session_errors: Counter,
    pub fetch_bytes: Counter,
    pub fetch_latency: Histogram,
    pub flushes: Counter,
    pub flush_bytes: Counter,
    pub flush_duration: Histogram,
    pub flush_errors: Counter,
    pub cold_reads: Counter,
    pub wal_failures: Counter,
    pub wal_superseded: Counter,
    pub commits_refused: Counter,
    pub shards_fenced: Counter,
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

/// Latency buckets from 50 µs to ~26 s.
fn histogram(r: &mut Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::new(exponential_buckets(0.00005, 2.0, 20));
    r.register(name, help, h.clone());
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("shoal");
        let requests = Family::<ApiLabel, Counter>::default();
        r.register("kafka_requests", "Kafka requests by API", requests.clone());
        Metrics {
            requests,
            produce_requests: counter(&mut r, "produce_requests", "Produced partition batches"),
            connections_refused: counter(
                &mut r,
                "kafka_connections_refused",
                "Kafka connections refused by the listener's connection limits",
            ),
            produce_bytes: counter(&mut r, "produce_bytes", "Bytes of record batches produced"),
            produce_records: counter(&mut r, "produce_records", "Records produced"),
            produce_latency: histogram(
                &mut r,
                "produce_latency_seconds",
                "Produce latency until acknowledged",
            ),
            fetch_requests: counter(&mut r, "fetch_requests", "Fetch requests"),
            fetch_session_errors: counter(
                &mut r,
                "fetch_session_errors",
                "Fetches refused for an unknown fetch session or a wrong session epoch",
            ),
            fetch_bytes: counter(&mut r, "fetch_bytes", "Bytes returned by fetches"),
            fetch_latency: histogram(
                &mut r,
                "fetch_latency_seconds",
                "Fetch latency including long-poll",
            ),
            flushes: counter(&mut r, "flush", "Segment flushes committed"),
            flush_bytes: counter(&mut r, "flush_bytes", "Bytes of Parquet segments flushed"),
            flush_duration: histogram(
                &mut r,
                "flush_duration_seconds",
                "Flush duration (encode, PUT, commit)",
            ),
            flush_errors: counter(&mut r, "flush_errors", "Failed flush attempts"),
            cold_reads: counter(
                &mut r,
                "cold_reads",
                "Fetches served from object storage segments",
            ),
            wal_failures: counter(
                &mut r,
                "wal_failures",
                "Failed WAL writes whose batches were rolled back",
            ),
            wal_superseded: counter(
                &mut r,
                "wal_superseded_entries",
                "WAL entries of an older lease dropped at replay because another owner wrote those offsets",
            ),
            commits_refused: counter(
                &mut r,
                "segment_commits_refused",
                "Shard ranges of a flush that placement refused (stale epoch or offset gap)",
            ),
            shards_fenced: counter(
                &mut r,
                "shards_fenced",
                "Shards this broker stopped serving because their lease moved",
            ),
            registry: r,
        }
    }

    /// Render the registry plus externally kept gauges.
    /// The registry, then `extra` samples (name, type, help, value) and
    /// `families`: whole metric families already in the text format.
    pub fn render(&self, extra: &[(&str, &str, &str, f64)], families: &str) -> String {
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
        out.push_str(families);
        out.push_str("# EOF\n");
        out
    }
}

/// Object-store request latencies by kind as one Prometheus histogram
/// family, `shoal_object_store_request_duration_seconds{kind}`.
pub fn object_store_latencies(store: &shoal_storage::ObjectStorage) -> String {
    let name = "shoal_object_store_request_duration_seconds";
    let mut out = format!(
        "# HELP {name} Object store request latency by kind (every attempt)\n\
         # TYPE {name} histogram\n"
    );
    for (kind, snap) in store.latencies() {
        let kind = kind.as_str();
        for (i, count) in snap.cumulative.iter().enumerate() {
            let le = shoal_storage::LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            out.push_str(&format!(
                "{name}_bucket{{kind=\"{kind}\",le=\"{le}\"}} {count}\n"
            ));
        }
        out.push_str(&format!(
            "{name}_sum{{kind=\"{kind}\"}} {}\n",
            snap.sum_seconds
        ));
        out.push_str(&format!("{name}_count{{kind=\"{kind}\"}} {}\n", snap.count));
    }
    out
}
