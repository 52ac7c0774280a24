//! The broker's HTTP routes: health, Prometheus metrics and the stream
//! admin API. The binary merges them with the placement routes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use shoal_placement::{SegmentRef, Stream};

use crate::broker::Broker;

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    ready: Arc<AtomicBool>,
    mqtt: Option<Arc<crate::mqtt::Mqtt>>,
}

/// `ready` flips to true once the Kafka listener accepts clients; `mqtt`
/// is the MQTT service, when this broker runs one.
pub fn router(
    broker: Arc<Broker>,
    ready: Arc<AtomicBool>,
    mqtt: Option<Arc<crate::mqtt::Mqtt>>,
) -> Router {
    let mqtt_routes = crate::mqtt::http::router(broker.clone(), mqtt.clone());
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/streams", get(list_streams))
        .route("/api/v1/streams/{name}", get(get_stream))
        .route("/api/v1/streams/{name}/files", get(stream_files))
        .route("/api/v1/compaction", get(compaction))
        .route(
            "/api/v1/streams/{name}/shards/{shard}/resume",
            post(resume_shard),
        )
        .with_state(AppState {
            broker,
            ready,
            mqtt,
        })
        .merge(mqtt_routes)
}

/// `GET /health`: `{"status": "ok" | "degraded" | "starting", "checks": {...}}`.
/// 200 while the node serves (ok or degraded: some writes are refused but
/// reads go on), 503 while it starts or stops, or (degraded) while a
/// cluster broker has no valid lease.
async fn health(State(st): State<AppState>) -> Response {
    let b = &st.broker;
    let mut checks = std::collections::BTreeMap::new();
    if !st.ready.load(Ordering::Acquire) {
        checks.insert("kafka", "starting".to_string());
        let body = serde_json::json!({ "status": "starting", "checks": checks });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let mut degraded = false;
    let mut check = |name: &'static str, problem: Option<String>| {
        degraded |= problem.is_some();
        checks.insert(name, problem.unwrap_or_else(|| "ok".to_string()));
    };
    check("kafka", None);
    check(
        "wal",
        match b.wal.health() {
            shoal_wal_cache::WalHealth::Ok => None,
            shoal_wal_cache::WalHealth::Failed(f) => Some(format!(
                "writes refused: {} (taken again once the disk accepts writes)",
                f.error
            )),
        },
    );
    let stopped = b.stopped_shards();
    check(
        "shards",
        (!stopped.is_empty()).then(|| {
            let list: Vec<String> = stopped
                .iter()
                .map(|(s, n, why)| format!("{s}/{n} stopped: {why}"))
                .collect();
            list.join("; ")
        }),
    );
    check(
        "object_store",
        b.flush_failing
            .lock()
            .as_ref()
            .map(|(since, e)| format!("flushes failing for {}s: {e}", since.elapsed().as_secs())),
    );
    // A cluster broker out of touch with placement refuses every write and
    // may have lost its shards to others already: it cannot serve.
    let cut_off = b.cluster.is_some() && !b.lease_valid();
    if b.cluster.is_some() {
        check(
            "placement",
            cut_off.then(|| {
                "no heartbeat answered within the session timeout: writes refused".to_string()
            }),
        );
    }
    if st.mqtt.is_some() {
        check("mqtt", None);
    }
    let status = if degraded { "degraded" } else { "ok" };
    let code = if cut_off {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::json!({ "status": status, "checks": checks });
    if let Some(m) = &st.mqtt {
        body["mqtt"] = serde_json::json!(m.listeners());
    }
    (code, Json(body)).into_response()
}

/// `POST /api/v1/streams/{name}/shards/{shard}/resume`: an operator
/// accepts that a stopped shard lost records; it takes writes again.
async fn resume_shard(
    State(st): State<AppState>,
    Path((name, shard)): Path<(String, i32)>,
) -> Response {
    match st.broker.resume_shard(&name, shard).await {
        Ok(()) => Json(serde_json::json!({ "resumed": format!("{name}/{shard}") })).into_response(),
        Err(crate::Error::Rejected(r)) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": r.to_string() })),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let b = &st.broker;
    let wal = b.wal.stats();
    let store = b.store.stats();
    let cache = b.cache.stats();
    let avg_fsync = if wal.fsyncs > 0 {
        wal.fsync_nanos_total as f64 / wal.fsyncs as f64 / 1e9
    } else {
        0.0
    };
    let compaction = b.compaction_totals.lock().clone().unwrap_or_default();
    let extra: Vec<(&str, &str, &str, f64)> = vec![
        (
            "shoal_compaction_runs_total",
            "counter",
            "Compaction runs recorded in placement (any compactor)",
            compaction.runs as f64,
        ),
        (
            "shoal_compaction_failed_runs_total",
            "counter",
            "Compaction runs that reported errors",
            compaction.failed_runs as f64,
        ),
        (
            "shoal_compaction_objects_in_total",
            "counter",
            "Object ranges read by compaction",
            compaction.objects_in as f64,
        ),
        (
            "shoal_compaction_objects_out_total",
            "counter",
            "Compacted files written",
            compaction.objects_out as f64,
        ),
        (
            "shoal_compaction_bytes_in_total",
            "counter",
            "Bytes of the ranges compaction rewrote",
            compaction.bytes_in as f64,
        ),
        (
            "shoal_compaction_bytes_out_total",
            "counter",
            "Bytes of the compacted files written",
            compaction.bytes_out as f64,
        ),
        (
            "shoal_compaction_last_run_seconds",
            "gauge",
            "Duration of the last compaction run",
            compaction.last_run_ms as f64 / 1000.0,
        ),
        (
            "shoal_gc_objects_deleted_total",
            "counter",
            "Data objects deleted by garbage collection",
            compaction.objects_deleted as f64,
        ),
        (
            "shoal_gc_retired_objects",
            "gauge",
            "Objects placement stopped referencing, awaiting deletion",
            compaction.retired as f64,
        ),
        (
            "shoal_retention_shards_trimmed_total",
            "counter",
            "Times retention moved a shard's log start",
            compaction.shards_trimmed as f64,
        ),
        (
            "shoal_wal_appends_total",
            "counter",
            "WAL appends",
            wal.appends as f64,
        ),
        (
            "shoal_wal_fsyncs_total",
            "counter",
            "WAL fsyncs (one per commit group)",
            wal.fsyncs as f64,
        ),
        (
            "shoal_wal_bytes_total",
            "counter",
            "WAL payload bytes",
            wal.bytes as f64,
        ),
        (
            "shoal_wal_fsync_seconds_total",
            "counter",
            "Time spent in WAL fsyncs",
            wal.fsync_nanos_total as f64 / 1e9,
        ),
        (
            "shoal_wal_fsync_seconds_avg",
            "gauge",
            "Mean WAL fsync latency",
            avg_fsync,
        ),
        (
            "shoal_wal_fsync_seconds_last",
            "gauge",
            "Last WAL fsync latency",
            wal.last_fsync_nanos as f64 / 1e9,
        ),
        (
            "shoal_wal_group_size_last",
            "gauge",
            "Appends in the last commit group",
            wal.last_group_size as f64,
        ),
        (
            "shoal_wal_group_size_max",
            "gauge",
            "Largest commit group",
            wal.max_group_size as f64,
        ),
        (
            "shoal_wal_pending_bytes",
            "gauge",
            "WAL bytes not yet truncated",
            b.wal.pending_bytes() as f64,
        ),
        (
            "shoal_unflushed_bytes",
            "gauge",
            "Bytes accepted and not yet in a committed object",
            b.unflushed_bytes() as f64,
        ),
        (
            "shoal_wal_write_errors_total",
            "counter",
            "WAL writes or fsyncs that failed",
            wal.write_errors as f64,
        ),
        (
            "shoal_wal_available",
            "gauge",
            "1 while the WAL takes appends",
            f64::from(u8::from(b.wal.health() == shoal_wal_cache::WalHealth::Ok)),
        ),
        (
            "shoal_wal_segments",
            "gauge",
            "WAL segment files holding entries",
            wal.segments as f64,
        ),
        (
            "shoal_wal_spare_segments",
            "gauge",
            "Pre-written WAL segment files ready",
            wal.spare_segments as f64,
        ),
        (
            "shoal_shards_stopped",
            "gauge",
            "Shards refusing writes because acknowledged records were found lost",
            b.stopped_shards().len() as f64,
        ),
        (
            "shoal_object_store_retries_total",
            "counter",
            "Object store attempts repeated after transient failures",
            store.retries as f64,
        ),
        (
            "shoal_object_store_requests_total{kind=\"put\"}",
            "counter",
            "Object store requests by kind",
            store.puts as f64,
        ),
        (
            "shoal_object_store_requests_total{kind=\"get\"}",
            "counter",
            "Object store requests by kind",
            store.gets as f64,
        ),
        (
            "shoal_object_store_requests_total{kind=\"head\"}",
            "counter",
            "Object store requests by kind",
            store.heads as f64,
        ),
        (
            "shoal_object_store_requests_total{kind=\"delete\"}",
            "counter",
            "Object store requests by kind",
            store.deletes as f64,
        ),
        (
            "shoal_object_store_requests_total{kind=\"list\"}",
            "counter",
            "Object store requests by kind",
            store.lists as f64,
        ),
        (
            "shoal_object_store_errors_total",
            "counter",
            "Object store request errors",
            store.errors as f64,
        ),
        (
            "shoal_cache_hits_total",
            "counter",
            "Cache hits",
            cache.hits as f64,
        ),
        (
            "shoal_cache_misses_total",
            "counter",
            "Cache misses",
            cache.misses as f64,
        ),
        (
            "shoal_fetch_sessions",
            "gauge",
            "Kafka incremental fetch sessions held",
            b.fetch_sessions.active() as f64,
        ),
        (
            "shoal_fetch_session_evictions_total",
            "counter",
            "Fetch sessions evicted to make room for another",
            b.fetch_sessions.evictions() as f64,
        ),
    ];
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        b.metrics.render(&extra, &{
            let mut families = crate::metrics::object_store_latencies(&b.store);
            if let Some(m) = &st.mqtt {
                families.push_str(&m.metrics_text());
            }
            families
        }),
    )
        .into_response()
}

#[derive(Serialize)]
struct StreamView {
    name: String,
    partitions: i32,
    config: std::collections::BTreeMap<String, String>,
    shards: Vec<ShardView>,
    /// Every object holding live rows of the stream.
    files: Vec<FileView>,
    /// Bytes of the stream's live ranges by tier: `flush` (mixed flush
    /// objects) and `compacted` (per-stream files).
    bytes_by_tier: std::collections::BTreeMap<&'static str, u64>,
}

/// One Parquet file with live rows of a stream.
#[derive(Serialize)]
struct FileView {
    url: String,
    key: String,
    size: u64,
    shards: Vec<FileShardView>,
}

#[derive(Serialize)]
struct FileShardView {
    shard: i32,
    first_offset: i64,
    last_offset: i64,
    rows: u64,
}

/// The live files of `s`, in the order their rows first appear.
fn files(b: &Broker, s: &Stream) -> Vec<FileView> {
    let base = b.store.url().trim_end_matches('/').to_string();
    let mut out: Vec<FileView> = Vec::new();
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for sh in &s.shards {
        for r in &sh.segments {
            let i = *at.entry(r.object.as_str()).or_insert_with(|| {
                out.push(FileView {
                    url: format!("{base}/{}", r.object),
                    key: r.object.clone(),
                    size: r.object_size,
                    shards: Vec::new(),
                });
                out.len() - 1
            });
            let f = &mut out[i];
            match f.shards.iter_mut().find(|x| x.shard == sh.shard) {
                Some(x) => {
                    x.first_offset = x.first_offset.min(r.first_offset);
                    x.last_offset = x.last_offset.max(r.last_offset);
                    x.rows += r.record_count;
                }
                None => f.shards.push(FileShardView {
                    shard: sh.shard,
                    first_offset: r.first_offset,
                    last_offset: r.last_offset,
                    rows: r.record_count,
                }),
            }
        }
    }
    out
}

fn bytes_by_tier(s: &Stream) -> std::collections::BTreeMap<&'static str, u64> {
    let mut tiers = std::collections::BTreeMap::from([("flush", 0u64), ("compacted", 0u64)]);
    for r in s.shards.iter().flat_map(|sh| sh.segments.iter()) {
        let tier = if r.object.starts_with("segments/") {
            "flush"
        } else {
            "compacted"
        };
        *tiers.entry(tier).or_default() += if r.bytes > 0 { r.bytes } else { r.object_size };
    }
    tiers
}

#[derive(Serialize)]
struct ShardView {
    shard: i32,
    owner: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped: Option<String>,
    epoch: u64,
    log_start_offset: i64,
    high_watermark: i64,
    committed_offset: i64,
    segments: Vec<SegmentView>,
}

#[derive(Serialize)]
struct SegmentView {
    object: String,
    row_group: u32,
    first_offset: i64,
    last_offset: i64,
    epoch: u64,
    record_count: u64,
}

impl From<&SegmentRef> for SegmentView {
    fn from(s: &SegmentRef) -> Self {
        SegmentView {
            object: s.object.clone(),
            row_group: s.row_group,
            first_offset: s.first_offset,
            last_offset: s.last_offset,
            epoch: s.epoch,
            record_count: s.record_count,
        }
    }
}

/// Placement's view, with the live high watermark from the owning broker.
fn view(b: &Broker, s: Stream) -> StreamView {
    let local = b.stream(&s.name);
    let files = files(b, &s);
    let bytes_by_tier = bytes_by_tier(&s);
    StreamView {
        files,
        bytes_by_tier,
        partitions: s.partitions(),
        shards: s
            .shards
            .iter()
            .map(|sh| {
                let hw = local
                    .as_ref()
                    .and_then(|l| l.shard(sh.shard))
                    .map(|l| l.high_watermark())
                    .unwrap_or(sh.committed_offset);
                ShardView {
                    shard: sh.shard,
                    owner: sh.owner,
                    stopped: sh.stopped.as_ref().map(|s| s.reason.clone()),
                    epoch: sh.epoch,
                    log_start_offset: sh.log_start_offset,
                    high_watermark: hw,
                    committed_offset: sh.committed_offset,
                    segments: sh.segments.iter().map(SegmentView::from).collect(),
                }
            })
            .collect(),
        name: s.name,
        config: s.config,
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

async fn list_streams(State(st): State<AppState>) -> Response {
    match st.broker.placement.list_streams().await {
        Ok(streams) => {
            let views: Vec<StreamView> = streams.into_iter().map(|s| view(&st.broker, s)).collect();
            Json(serde_json::json!({ "streams": views })).into_response()
        }
        Err(e) => internal(e),
    }
}

/// `GET /api/v1/streams/{name}/files`: every Parquet file holding live
/// rows of the stream (readers filter on `stream` and the start offsets).
async fn stream_files(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    match st.broker.placement.get_stream(&name).await {
        Ok(Some(s)) => Json(serde_json::json!({ "files": files(&st.broker, &s) })).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("stream {name} not found") })),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

/// `GET /api/v1/compaction`: the recent compaction runs, the lease, how
/// many replaced objects await deletion, and the default retention.
async fn compaction(State(st): State<AppState>) -> Response {
    match st.broker.placement.lifecycle().await {
        Ok(l) => Json(serde_json::json!({
            "runs": l.runs.iter().rev().collect::<Vec<_>>(),
            "lease": l.lease,
            "retired_objects": l.retired.len(),
            "default_retention_ms": l.default_retention_ms(),
        }))
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn get_stream(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    match st.broker.placement.get_stream(&name).await {
        Ok(Some(s)) => Json(view(&st.broker, s)).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("stream {name} not found") })),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}
