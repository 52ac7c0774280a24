"""The HTTP listener: health, Prometheus metrics and the streams admin API."""

from __future__ import annotations

from clients import kp_consume, kp_producer
from harness import parse_prometheus, unique_name, wait_for

REQUIRED_METRICS = [
    "shoal_wal_fsyncs_total",
    "shoal_flush_total",
    "shoal_object_store_requests_total",
    # a histogram per request kind: puts of the flush, gets of the reads
    "shoal_object_store_request_duration_seconds_count",
]
#: At least one of these counts produce requests.
PRODUCE_METRICS = ["shoal_produce_requests_total", "shoal_produce_latency_seconds_count"]


def produce(shoal, topic: str, n: int) -> list[bytes]:
    values = [f"http-{i}".encode() for i in range(n)]
    p = kp_producer(shoal.bootstrap, acks="all")
    try:
        offsets = [p.send(topic, key=b"k%d" % i, value=v, partition=0).get(timeout=60).offset
                   for i, v in enumerate(values)]
    finally:
        p.close(timeout=10)
    assert offsets == list(range(n))
    return values


def test_health(shoal):
    resp = shoal.http("/health")
    assert resp.status == 200
    assert resp.header("content-type").startswith("application/json"), resp.headers
    doc = resp.json()
    assert doc["status"] == "ok", doc
    assert {"kafka", "wal", "shards", "object_store"} <= set(doc["checks"]), doc
    assert all(v == "ok" for v in doc["checks"].values()), doc


def test_metrics_exposes_shoal_counters(shoal):
    topic = unique_name("http-metrics")
    produce(shoal, topic, 20)
    kp_consume(shoal.bootstrap, topic, 20, partitions=[0])
    shoal.wait_flushed(topic, {0: 20})

    resp = shoal.http("/metrics")
    assert resp.status == 200
    assert resp.header("content-type").startswith(("text/plain", "application/openmetrics-text")), \
        resp.headers
    samples = parse_prometheus(resp.text)
    shoal_names = sorted(n for n in samples if n.startswith("shoal_"))
    assert shoal_names, f"no shoal_ metrics in:\n{resp.text[:2000]}"
    missing = [m for m in REQUIRED_METRICS if m not in samples]
    assert not missing, f"missing {missing}; shoal metrics present: {shoal_names}"
    assert any(m in samples for m in PRODUCE_METRICS), \
        f"none of {PRODUCE_METRICS}; shoal metrics present: {shoal_names}"

    # After produce + flush, every one of them has counted something.
    def counted():
        s = shoal.metrics()
        return (all(s.get(m, 0) > 0 for m in REQUIRED_METRICS)
                and sum(s.get(m, 0) for m in PRODUCE_METRICS) > 0 and s)
    wait_for(counted, 30, f"{REQUIRED_METRICS} and produce requests all > 0")
    put_count = [line for line in shoal.metrics_text().splitlines()
                 if line.startswith('shoal_object_store_request_duration_seconds_count{kind="put"}')]
    assert put_count and float(put_count[0].split()[-1]) > 0, put_count


def test_streams_api_lists_topic_and_segments(shoal):
    topic = unique_name("http-streams")
    produce(shoal, topic, 10)
    doc = shoal.wait_flushed(topic, {0: 10})

    assert doc["name"] == topic
    assert doc["partitions"] == 1
    assert isinstance(doc.get("config"), dict)
    assert doc["config"].get("shoal.durability") == "local", doc["config"]  # the standalone default
    assert [sh["shard"] for sh in doc["shards"]] == [0]
    sh = doc["shards"][0]
    assert isinstance(sh["owner"], int) and isinstance(sh["epoch"], int)
    assert sh["log_start_offset"] == 0
    assert sh["high_watermark"] == sh["committed_offset"] == 10
    segs = sorted(sh["segments"], key=lambda s: s["first_offset"])
    assert segs, sh
    assert segs[0]["first_offset"] == 0 and segs[-1]["last_offset"] == 9
    assert sum(s["record_count"] for s in segs) == 10
    for s in segs:
        assert s["object"].endswith(".parquet"), s
        assert (shoal.objects_dir / s["object"]).is_file(), f"{s['object']} not under {shoal.objects_dir}"
        assert isinstance(s["row_group"], int) and s["row_group"] >= 0
        assert isinstance(s["epoch"], int)

    # The list endpoint has it too, with the same content.
    listed = {s["name"]: s for s in shoal.streams()}
    assert topic in listed, sorted(listed)
    assert listed[topic]["partitions"] == 1
    assert listed[topic]["shards"][0]["committed_offset"] == 10


def test_streams_api_unknown_stream_is_404(shoal):
    resp = shoal.http(f"/api/v1/streams/{unique_name('no-such-stream')}")
    assert resp.status == 404
    assert shoal.stream(unique_name("nope")) is None
