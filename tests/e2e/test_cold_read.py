"""Reads served from object storage: after a flush and a restart the broker's
memory tail is gone, so fetches are answered from the Parquet segments
(re-encoded as Kafka batches, which must carry valid CRCs)."""

from __future__ import annotations

import time

from clients import ck_config, kp_consume, kp_create_topic, kp_producer
from harness import unique_name


def test_flushed_records_read_back_after_restart(shoal):
    topic = unique_name("cold")
    kp_create_topic(shoal.bootstrap, topic, 2)
    sent = []
    for i in range(200):
        key = None if i % 9 == 4 else f"key-{i}".encode()
        value = None if i % 13 == 6 and key is not None else (f"value-{i}-" + "z" * (i % 30)).encode()
        headers = [("n", str(i).encode()), ("empty", b"")] if i % 4 == 0 else []
        sent.append((i % 2, key, value, headers))
    p = kp_producer(shoal.bootstrap, compression_type="gzip", linger_ms=10, acks="all")
    try:
        futs = [p.send(topic, key=k, value=v, headers=h, partition=part)
                for part, k, v, h in sent]
        p.flush(timeout=60)
        placed = [f.get(timeout=60) for f in futs]
    finally:
        p.close(timeout=10)
    per_part = {0: [s for s in sent if s[0] == 0], 1: [s for s in sent if s[0] == 1]}
    for part in (0, 1):
        assert [m.offset for m in placed if m.partition == part] == list(range(len(per_part[part])))

    shoal.wait_flushed(topic, {0: len(per_part[0]), 1: len(per_part[1])})
    shoal.stop()
    shoal.start()

    # kafka-python verifies batch CRCs (check_crcs=True is its default).
    recs = kp_consume(shoal.bootstrap, topic, len(sent), partitions=[0, 1], check_crcs=True)
    for part in (0, 1):
        got = [(r.key, r.value, list(r.headers)) for r in recs if r.partition == part]
        assert got == [(k, v, h) for _p, k, v, h in per_part[part]], f"partition {part}"
        assert [r.offset for r in recs if r.partition == part] == list(range(len(per_part[part])))

    # librdkafka too, with CRC checking on.
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(ck_config(shoal.bootstrap, **{
        "group.id": unique_name("cold-reader"), "enable.auto.commit": False,
        "check.crcs": True, "auto.offset.reset": "earliest"}))
    try:
        c.assign([TopicPartition(topic, q, OFFSET_BEGINNING) for q in (0, 1)])
        got = {0: [], 1: []}
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < len(sent):
            assert time.monotonic() < deadline, {q: len(v) for q, v in got.items()}
            for msg in c.consume(num_messages=500, timeout=0.5):
                assert msg.error() is None, msg.error()
                headers = [(hk, hv if hv is not None else b"") for hk, hv in (msg.headers() or [])]
                got[msg.partition()].append((msg.key(), msg.value(), headers))
        for part in (0, 1):
            assert got[part] == [(k, v, h) for _p, k, v, h in per_part[part]], f"partition {part}"
    finally:
        c.close()

    # Offsets go on from where they were: nothing is reused after the restart.
    p = kp_producer(shoal.bootstrap)
    try:
        md = p.send(topic, value=b"after restart", partition=0).get(timeout=60)
    finally:
        p.close(timeout=10)
    assert md.offset == len(per_part[0])
