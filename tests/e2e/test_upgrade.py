"""A data dir written before the data lifecycle existed (the fixture
`fixtures/datadir-before-lifecycle.tar.gz`, made with the release build of
that time: two topics with month-old records, an idempotent producer, a
committed group offset) loads in this version, keeps every record (its
topics keep unlimited retention) and is compacted like any other."""

from __future__ import annotations

import tarfile
from pathlib import Path

from clients import ck_admin, ck_config, ck_consume_all, ck_create_topic
from harness import unique_name, wait_for

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "datadir-before-lifecycle.tar.gz"


def test_a_data_dir_from_before_the_lifecycle_loads_and_keeps_everything(shoal_factory, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(data, filter="data")
    shoal = shoal_factory(data_dir=data, flush_interval="50ms", extra_args=[
        "--compaction-delay", "0s", "--compaction-interval", "1s", "--gc-grace", "1s"])
    shoal.start()

    # Several compaction runs (retention included) pass over the old state.
    wait_for(lambda: len(shoal.http("/api/v1/compaction").json()["runs"]) >= 3, 60,
             "three compaction runs")
    wait_for(lambda: all(f["key"].startswith("streams/")
                         for t in ("legacy-orders", "legacy-events")
                         for f in shoal.http(f"/api/v1/streams/{t}/files").json()["files"]),
             60, "the old flush objects compacted")

    orders = ck_consume_all(shoal.bootstrap, "legacy-orders", range(2))
    values = sorted(m.value() for msgs in orders.values() for m in msgs)
    assert values == sorted(f"order-{i}".encode() for i in range(200))
    events = ck_consume_all(shoal.bootstrap, "legacy-events", [0])
    assert [m.value() for m in events[0]] == [f"event-{i}".encode() for i in range(50)]

    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import ConfigResource

    admin = ck_admin(shoal.bootstrap)
    described = admin.describe_configs([ConfigResource("TOPIC", "legacy-orders")])
    assert list(described.values())[0].result(timeout=30)["retention.ms"].value == "-1"
    # A topic created now follows the cluster default (Kafka's 7 days).
    fresh = unique_name("fresh")
    ck_create_topic(shoal.bootstrap, fresh, 1)
    described = admin.describe_configs([ConfigResource("TOPIC", fresh)])
    assert list(described.values())[0].result(timeout=30)["retention.ms"].value == "604800000"

    c = Consumer(ck_config(shoal.bootstrap, **{"group.id": "legacy-group"}))
    try:
        committed = c.committed([TopicPartition("legacy-orders", 0)], timeout=30)
        assert committed[0].offset == 42
    finally:
        c.close()
