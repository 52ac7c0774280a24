"""The durability contract's corner cases, each driven as a user would hit
it: a retry during an object-store outage, two batches in one partition
request, byte accounting across failed commits and deleted topics, a
damaged write-ahead log, a full WAL disk, idle producers, ListOffsets'
special timestamps, configs Shoal does not apply, and offset commits for
partitions that do not exist."""

from __future__ import annotations

import os
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    OffsetSpec,
)

from clients import (
    DeliveryLog,
    ck_admin,
    ck_config,
    ck_consume_all,
    ck_create_topic,
    ck_producer,
)
from harness import http_request, unique_name, wait_for
from kafka_wire import RawConnection, Record, encode_record_batch, pick_produce_version

NO_ERROR = 0
UNKNOWN_TOPIC_OR_PARTITION = 3
REQUEST_TIMED_OUT = 7
OUT_OF_ORDER_SEQUENCE = 45
KAFKA_STORAGE_ERROR = 56
INVALID_RECORD = 87


# --------------------------------------------------------------------------
# helpers


def block_flushes(shoal) -> None:
    """Make the file:// object store unreachable (its directory moves aside
    and a file takes its place): flushes fail as in an object-store outage."""
    objects = shoal.objects_dir
    objects.rename(objects.with_name("objects.away"))
    objects.write_bytes(b"an object store outage\n")


def unblock_flushes(shoal) -> None:
    objects = shoal.objects_dir
    objects.unlink()
    objects.with_name("objects.away").rename(objects)


def raw(shoal) -> tuple[RawConnection, int]:
    conn = RawConnection("127.0.0.1", shoal.kafka_port, timeout=60)
    return conn, pick_produce_version(conn.api_versions())


def idempotent_batch(pid: int, seq: int, values: list[bytes], ts: int | None = None) -> bytes:
    return encode_record_batch([Record(value=v) for v in values], base_timestamp=ts,
                               producer_id=pid, producer_epoch=0, base_sequence=seq)


def metric(shoal, name: str) -> float:
    return shoal.metrics().get(name, 0.0)


def placement_stream(shoal, topic: str) -> dict:
    """The stream as placement holds it (producer state included)."""
    body = ('{"get_stream": {"name": "%s"}}' % topic).encode()
    resp = http_request(shoal.http_base + "/placement/v1/query", method="POST", body=body)
    assert resp.status == 200, resp.text
    return resp.json()["stream"]["stream"]


def produce_local(shoal, topic: str, values: list[bytes], partition: int = 0) -> DeliveryLog:
    log = DeliveryLog()
    # A long linger and one flush: the values go as one batch (one WAL
    # entry), however slow the machine is.
    p = ck_producer(shoal.bootstrap, **{"acks": "all", "linger.ms": 10_000})
    for v in values:
        p.produce(topic, value=v, partition=partition, on_delivery=log)
    assert p.flush(60) == 0
    assert not log.errors, log.errors[:3]
    return log


def fill_past_the_bound(shoal, topic: str, bound: int) -> None:
    """Write 1 MB batches to `topic` until the unflushed bytes reach `bound`
    (--max-unflushed-bytes). A batch is taken while the total is under the
    bound, so each of these is taken and the last one crosses it."""
    conn, version = raw(shoal)
    with conn:
        while metric(shoal, "shoal_unflushed_bytes") < bound:
            [r] = conn.produce(version, topic, 0,
                               encode_record_batch([Record(value=b"f" * 1_000_000)]))
            assert r.error_code == NO_ERROR, r


def quarantined(shoal, stream: str) -> list[tuple[int, bytes]]:
    """The (WAL sequence, entry) frames kept for `stream`'s shard 0."""
    [kept] = (shoal.data_dir / "quarantine").glob(f"{stream}.0.*.entries")
    frames, data = [], kept.read_bytes()
    while data:
        seq, n = struct.unpack(">QI", data[:12])
        frames.append((seq, data[12:12 + n]))
        data = data[12 + n:]
    return frames


# --------------------------------------------------------------------------
# 1. a retry is answered as its original


def test_a_retried_batch_waits_for_its_originals_durability(shoal):
    topic = unique_name("retry")
    ck_create_topic(shoal.bootstrap, topic, 1, {"shoal.durability": "object"})
    block_flushes(shoal)
    conn, version = raw(shoal)
    batch = idempotent_batch(4242, 0, [b"only-once"])
    with conn:
        [first] = conn.produce(version, topic, 0, batch, timeout_ms=500)
        assert first.error_code == REQUEST_TIMED_OUT, first
        # The client retries while the object store is still down: the
        # records are in one disk's WAL only, so this is no success either.
        [retry] = conn.produce(version, topic, 0, batch, timeout_ms=500)
        assert retry.error_code == REQUEST_TIMED_OUT, retry
        unblock_flushes(shoal)
        [after] = conn.produce(version, topic, 0, batch, timeout_ms=30000)
    assert (after.error_code, after.base_offset) == (NO_ERROR, 0), after
    doc = shoal.stream(topic)
    assert doc["shards"][0]["committed_offset"] == 1, doc
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"only-once"]


# --------------------------------------------------------------------------
# 2. one batch per partition per request


def test_two_batches_for_one_partition_are_refused_whole(shoal):
    topic = unique_name("twobatches")
    ck_create_topic(shoal.bootstrap, topic, 1)
    both = (encode_record_batch([Record(value=b"a")])
            + encode_record_batch([Record(value=b"b")]))
    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, topic, 0, both)
        assert r.error_code == INVALID_RECORD, r
        [ok] = conn.produce(version, topic, 0, encode_record_batch([Record(value=b"c")]))
        assert (ok.error_code, ok.base_offset) == (NO_ERROR, 0), ok
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"c"]


def bounded_with_flushes_blocked(shoal_factory, prefix: str):
    """A broker bounded at 8 MiB of unflushed bytes with its flushes blocked,
    a `local` topic and a `local` filler topic for `fill_past_the_bound`."""
    shoal = shoal_factory(extra_args=["--max-unflushed-bytes", "8MiB"]).start()
    topic, filler = unique_name(prefix), unique_name("filler")
    ck_create_topic(shoal.bootstrap, topic, 1, {"shoal.durability": "local"})
    ck_create_topic(shoal.bootstrap, filler, 1, {"shoal.durability": "local"})
    block_flushes(shoal)
    return shoal, topic, filler


def test_a_refused_batch_is_not_overtaken_by_the_next_one(shoal_factory):
    """An idempotent producer's batch refused with a retriable error must
    not be overtaken by its next batch: with no state on the shard that one
    would be accepted, and the retry of the first could never be written."""
    shoal, topic, filler = bounded_with_flushes_blocked(shoal_factory, "gap")
    fill_past_the_bound(shoal, filler, 8 << 20)
    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, topic, 0, idempotent_batch(99, 0, [b"first"]))
        assert r.error_code == KAFKA_STORAGE_ERROR, r
        unblock_flushes(shoal)
        wait_for(lambda: metric(shoal, "shoal_unflushed_bytes") == 0, 30, "the backlog to flush")
        # Room again, but sequence 0 has not come back yet.
        [r] = conn.produce(version, topic, 0, idempotent_batch(99, 1, [b"second"]))
        assert r.error_code == KAFKA_STORAGE_ERROR, r
        [r] = conn.produce(version, topic, 0, idempotent_batch(99, 0, [b"first"]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 0), r
        [r] = conn.produce(version, topic, 0, idempotent_batch(99, 1, [b"second"]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 1), r
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"first", b"second"]


def test_a_retry_of_a_written_batch_is_answered_under_backpressure(shoal_factory):
    """Backpressure holds back new bytes only: the retry of a batch already
    written gets its original's answer, not an error that says (to the
    client) it was not written, which would let the client give the
    records new sequence numbers later."""
    shoal, topic, filler = bounded_with_flushes_blocked(shoal_factory, "retrybp")
    written = idempotent_batch(77, 0, [b"written"])
    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, topic, 0, written)
        assert (r.error_code, r.base_offset) == (NO_ERROR, 0), r
        fill_past_the_bound(shoal, filler, 8 << 20)
        [r] = conn.produce(version, topic, 0, idempotent_batch(77, 1, [b"new"]))
        assert r.error_code == KAFKA_STORAGE_ERROR, r
        [r] = conn.produce(version, topic, 0, written)
        assert (r.error_code, r.base_offset) == (NO_ERROR, 0), r
    unblock_flushes(shoal)
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"written"]


def test_a_batch_after_a_refused_one_gets_its_error_not_out_of_order(shoal_factory):
    """The shard knows the producer and still expects batch 1, which was
    refused: batch 2 gets batch 1's retriable error. OUT_OF_ORDER_SEQUENCE
    would make librdkafka bump its epoch and renumber every unacknowledged
    record, including records of other partitions that may be written."""
    shoal, topic, filler = bounded_with_flushes_blocked(shoal_factory, "order")
    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, topic, 0, idempotent_batch(78, 0, [b"zero"]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 0), r
        fill_past_the_bound(shoal, filler, 8 << 20)
        [r] = conn.produce(version, topic, 0, idempotent_batch(78, 1, [b"one"]))
        assert r.error_code == KAFKA_STORAGE_ERROR, r
        unblock_flushes(shoal)
        wait_for(lambda: metric(shoal, "shoal_unflushed_bytes") == 0, 30, "the backlog to flush")
        # Room again; batch 2 (in flight behind batch 1) arrives first.
        [r] = conn.produce(version, topic, 0, idempotent_batch(78, 2, [b"two"]))
        assert r.error_code == KAFKA_STORAGE_ERROR, r
        [r] = conn.produce(version, topic, 0, idempotent_batch(78, 1, [b"one"]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 1), r
        [r] = conn.produce(version, topic, 0, idempotent_batch(78, 2, [b"two"]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 2), r
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"zero", b"one", b"two"]


# --------------------------------------------------------------------------
# 3. backpressure accounting


def test_a_deleted_topic_gives_back_its_unflushed_bytes(shoal):
    topic = unique_name("deleted")
    ck_create_topic(shoal.bootstrap, topic, 1, {"shoal.durability": "local"})
    block_flushes(shoal)
    produce_local(shoal, topic, [b"x" * 1000] * 50)
    assert metric(shoal, "shoal_unflushed_bytes") >= 50_000
    admin = ck_admin(shoal.bootstrap)
    admin.delete_topics([topic], request_timeout=30)[topic].result(timeout=60)
    wait_for(lambda: metric(shoal, "shoal_unflushed_bytes") == 0, 10,
             "the deleted topic's bytes to leave the unflushed total")
    unblock_flushes(shoal)


def test_a_refused_commit_keeps_its_bytes_counted(shoal):
    topic = unique_name("refused")
    ck_create_topic(shoal.bootstrap, topic, 1, {"shoal.durability": "local"})
    block_flushes(shoal)
    produce_local(shoal, topic, [b"y" * 1000] * 50)
    held = metric(shoal, "shoal_unflushed_bytes")
    assert held >= 50_000
    # Another owner takes the shard's lease in placement: this broker's
    # commits of it are refused from now on.
    body = ('{"acquire_lease": {"stream": "%s", "shard": 0, "broker": 99}}' % topic).encode()
    resp = http_request(shoal.http_base + "/placement/v1/write", method="POST", body=body)
    assert resp.status == 200, resp.text
    unblock_flushes(shoal)
    wait_for(lambda: metric(shoal, "shoal_segment_commits_refused_total") >= 1, 30,
             "the refused commit")
    # Standalone, nothing else can own the shard: the broker stops it and
    # says so rather than flush it again and again.
    wait_for(lambda: f"{topic}/0" in shoal.http("/health").json()["checks"]["shards"], 30,
             "the shard to be reported stopped")
    assert "segment commit refused" in shoal.http("/health").json()["checks"]["shards"]
    # Other topics go on flushing; the stopped shard is not flushed again
    # (each attempt would leave one more object nothing references).
    other = unique_name("other")
    ck_create_topic(shoal.bootstrap, other, 1, {"shoal.durability": "local"})
    flushes = metric(shoal, "shoal_flush_total")
    produce_local(shoal, other, [b"z" * 1000] * 10)
    wait_for(lambda: metric(shoal, "shoal_flush_total") >= flushes + 1
             and metric(shoal, "shoal_unflushed_bytes") == held, 30,
             "the other topic to be flushed")
    assert metric(shoal, "shoal_segment_commits_refused_total") == 1
    # The refused records are still held (uncommitted): they still count, once.
    assert metric(shoal, "shoal_unflushed_bytes") == held
    # Their WAL entries are copied out of the WAL's way: all 50 records.
    frames = quarantined(shoal, topic)
    assert sum(p.count(b"y" * 1000) for _, p in frames) == 50


# --------------------------------------------------------------------------
# 4. a damaged write-ahead log stops the shard it damaged, loudly


def test_a_damaged_wal_entry_stops_its_shard_and_says_so(shoal):
    damaged, intact = unique_name("damaged"), unique_name("intact")
    for t in (damaged, intact):
        ck_create_topic(shoal.bootstrap, t, 1, {"shoal.durability": "local"})
    block_flushes(shoal)
    marker = uuid.uuid4().hex.encode()
    produce_local(shoal, damaged, [b"before"] * 10)
    produce_local(shoal, intact, [b"kept-%d" % i for i in range(20)])
    produce_local(shoal, damaged, [marker])
    produce_local(shoal, damaged, [b"after"] * 10)
    shoal.kill9()
    # Flip a byte of the record holding `marker` on disk.
    wal = shoal.data_dir / "wal"
    hits = 0
    for seg in wal.glob("*.wal"):
        data = bytearray(seg.read_bytes())
        at = data.find(marker)
        if at >= 0:
            data[at] ^= 0x20
            seg.write_bytes(bytes(data))
            hits += 1
    assert hits == 1, "the marker record is in one WAL segment"
    unblock_flushes(shoal)
    shoal.start()

    health = shoal.http("/health")
    assert health.status == 200
    doc = health.json()
    assert doc["status"] == "degraded", doc
    assert f"{damaged}/0" in doc["checks"]["shards"], doc
    assert intact not in doc["checks"]["shards"], doc
    assert metric(shoal, "shoal_shards_stopped") == 1
    assert "acknowledged records are lost" in shoal.log_text()
    assert shoal.stream(damaged)["shards"][0]["stopped"], shoal.stream(damaged)
    # The entries the stopped shard did not apply (the damaged one and the
    # readable one after it) are kept out of the WAL's truncation.
    frames = quarantined(shoal, damaged)
    assert len(frames) == 2, frames
    assert frames[0][0] < frames[1][0]
    assert b"after" in frames[1][1] and b"after" not in frames[0][1]

    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, damaged, 0, encode_record_batch([Record(value=b"new")]))
        assert r.error_code == KAFKA_STORAGE_ERROR, r
        [ok] = conn.produce(version, intact, 0, encode_record_batch([Record(value=b"new")]))
        assert (ok.error_code, ok.base_offset) == (NO_ERROR, 20), ok
    # What came before the damage is still served.
    got = ck_consume_all(shoal.bootstrap, damaged, [0])
    assert [m.value() for m in got[0]] == [b"before"] * 10
    got = ck_consume_all(shoal.bootstrap, intact, [0])
    assert [m.value() for m in got[0]] == [b"kept-%d" % i for i in range(20)] + [b"new"]

    # The stop survives a restart (it is in placement), until an operator
    # accepts the loss.
    shoal.restart()
    assert shoal.http("/health").json()["status"] == "degraded"
    resp = shoal.http(f"/api/v1/streams/{damaged}/shards/0/resume", method="POST", body=b"")
    assert resp.status == 200, resp.text
    assert shoal.http("/health").json()["status"] == "ok"
    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, damaged, 0, encode_record_batch([Record(value=b"new")]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 10), r


# --------------------------------------------------------------------------
# 5. a full WAL disk: a retriable error, reads go on, and recovery by itself


def require_root_for_mounts() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the disk-full test as root (it mounts a tmpfs)")
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def small_wal_disk(tmp_path):
    require_root_for_mounts()
    mnt = tmp_path / "walfs"
    mnt.mkdir()
    # Room for one 64 MiB WAL segment and not for another.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_wal_disk_refuses_writes_and_recovers_by_itself(shoal_factory, small_wal_disk):
    shoal = shoal_factory(extra_args=["--wal-dir", str(small_wal_disk / "wal")]).start()
    topic = unique_name("diskfull")
    ck_create_topic(shoal.bootstrap, topic, 1, {"shoal.durability": "local"})
    produce_local(shoal, topic, [b"early-%d" % i for i in range(10)])
    shoal.wait_flushed(topic, {0: 10})
    # Flushes blocked, so the WAL keeps everything and fills its disk.
    block_flushes(shoal)
    log = DeliveryLog()
    p = ck_producer(shoal.bootstrap, **{
        "enable.idempotence": True, "acks": "all", "linger.ms": 5,
        "message.timeout.ms": 120000, "queue.buffering.max.messages": 200000,
    })
    payload = b"z" * 1024
    sent = 0
    # Until the WAL needs a second segment and the disk has no room for it.
    while sent < 200_000:
        for _ in range(2000):
            while True:
                try:
                    p.produce(topic, value=b"%08d" % sent + payload, partition=0,
                              on_delivery=log)
                    break
                except BufferError:
                    p.poll(0.05)
            sent += 1
        p.poll(0)
        if metric_or_none(shoal, "shoal_wal_write_errors_total"):
            break
    wait_for(lambda: metric(shoal, "shoal_wal_write_errors_total") > 0, 60,
             "the WAL to hit the full disk")
    health = shoal.http("/health")
    assert health.status == 200 and health.json()["status"] == "degraded", health.text
    assert "writes refused" in health.json()["checks"]["wal"]
    # Reads go on meanwhile.
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0][:10]] == [b"early-%d" % i for i in range(10)]
    # Object storage comes back: committed data frees the WAL's disk, and
    # the broker takes writes again by itself; the producer's retries land.
    unblock_flushes(shoal)
    assert p.flush(120) == 0
    assert not log.errors, log.errors[:3]
    assert len(log.ok) == sent
    wait_for(lambda: shoal.http("/health").json()["status"] == "ok", 30, "health back to ok")
    got = ck_consume_all(shoal.bootstrap, topic, [0])[0]
    values = [m.value() for m in got]
    assert values[:10] == [b"early-%d" % i for i in range(10)]
    assert values[10:] == [b"%08d" % i + payload for i in range(sent)], "exactly once, in order"
    assert [m.offset() for m in got] == list(range(10 + sent))


def metric_or_none(shoal, name: str):
    try:
        return shoal.metrics().get(name)
    except Exception:  # noqa: BLE001 - a scrape while the broker is busy
        return None


# --------------------------------------------------------------------------
# 6. idle producers expire


def test_idle_producers_expire_and_commits_carry_only_changes(shoal_factory):
    shoal = shoal_factory(extra_args=["--producer-id-expiration", "2s"]).start()
    topic = unique_name("expiry")
    ck_create_topic(shoal.bootstrap, topic, 1)
    conn, version = raw(shoal)
    with conn:
        for seq in range(3):
            [r] = conn.produce(version, topic, 0, idempotent_batch(777, seq, [b"old"]))
            assert r.error_code == NO_ERROR, r
        shoal.wait_flushed(topic, {0: 3})
        assert "777" in placement_stream(shoal, topic)["shards"][0]["producers"]
        # A gap in sequence is refused while the producer has state...
        [r] = conn.produce(version, topic, 0, idempotent_batch(777, 57, [b"gap"]))
        assert r.error_code == OUT_OF_ORDER_SEQUENCE, r
        time.sleep(2.5)  # let producer 777's state expire
        [r] = conn.produce(version, topic, 0, idempotent_batch(778, 0, [b"new"]))
        assert r.error_code == NO_ERROR, r
        shoal.wait_flushed(topic, {0: 4})
        producers = placement_stream(shoal, topic)["shards"][0]["producers"]
        assert set(producers) == {"778"}, producers
        # ... and after expiry it is accepted at any sequence (Kafka's rule).
        [r] = conn.produce(version, topic, 0, idempotent_batch(777, 57, [b"back"]))
        assert (r.error_code, r.base_offset) == (NO_ERROR, 4), r


# --------------------------------------------------------------------------
# 7. ListOffsets


def list_offsets(shoal, topic: str, spec) -> tuple[int, int]:
    admin = ck_admin(shoal.bootstrap)
    tp = TopicPartition(topic, 0)
    res = admin.list_offsets({tp: spec}, request_timeout=30)[tp].result(timeout=60)
    return res.offset, res.timestamp


def test_offsets_by_timestamp_on_object_topics_are_committed_only(shoal):
    topic = unique_name("ts-object")
    ck_create_topic(shoal.bootstrap, topic, 1, {"shoal.durability": "object"})
    block_flushes(shoal)
    now = int(time.time() * 1000)
    conn, version = raw(shoal)
    with conn:
        [r] = conn.produce(version, topic, 0,
                           encode_record_batch([Record(value=b"v")], base_timestamp=now),
                           timeout_ms=300)
        assert r.error_code == REQUEST_TIMED_OUT, r
    # In the WAL, not committed: no consumer can read it, so no offset.
    assert list_offsets(shoal, topic, OffsetSpec.for_timestamp(now - 1000))[0] == -1
    assert list_offsets(shoal, topic, OffsetSpec.latest())[0] == 0
    unblock_flushes(shoal)
    wait_for(lambda: list_offsets(shoal, topic, OffsetSpec.latest())[0] == 1, 30, "the commit")
    assert list_offsets(shoal, topic, OffsetSpec.for_timestamp(now - 1000)) == (0, now)


def test_max_timestamp_finds_the_record_with_the_largest_timestamp(shoal):
    topic = unique_name("maxts")
    ck_create_topic(shoal.bootstrap, topic, 1)
    base = int(time.time() * 1000)
    stamps = [base + 1000, base + 5000, base + 3000]
    conn, version = raw(shoal)
    with conn:
        for ts in stamps:
            [r] = conn.produce(version, topic, 0,
                               encode_record_batch([Record(value=b"v")], base_timestamp=ts))
            assert r.error_code == NO_ERROR, r
    assert list_offsets(shoal, topic, OffsetSpec.max_timestamp()) == (1, base + 5000)
    shoal.wait_flushed(topic, {0: 3})
    # Same answer from the committed segment.
    assert list_offsets(shoal, topic, OffsetSpec.max_timestamp()) == (1, base + 5000)
    assert list_offsets(shoal, topic, OffsetSpec.latest())[0] == 3
    assert list_offsets(shoal, topic, OffsetSpec.earliest())[0] == 0


# --------------------------------------------------------------------------
# 8. configs that would do nothing are refused; the lifecycle ones are applied


def test_configs_shoal_does_not_apply_are_refused(shoal):
    admin = ck_admin(shoal.bootstrap)

    def create(config: dict) -> KafkaException | None:
        t = unique_name("cfg")
        fut = admin.create_topics([NewTopic(t, 1, 1, config=config)], request_timeout=30)[t]
        try:
            fut.result(timeout=60)
            return None
        except KafkaException as e:
            return e

    for key, value in [("compression.type", "gzip"), ("cleanup.policy", "shred"),
                       ("retention.ms", "-5"), ("segment.ms", "600000")]:
        e = create({key: value})
        assert e is not None and e.args[0].name() == "INVALID_CONFIG", (key, e)
        assert key in e.args[0].str(), e
    e = create({"no.such.config": "1"})
    assert e is not None and e.args[0].name() == "INVALID_CONFIG"
    assert "Unknown topic config name: no.such.config" in e.args[0].str()
    # What Shoal does is accepted.
    assert create({"cleanup.policy": "delete", "retention.ms": "-1",
                   "shoal.durability": "object"}) is None
    # The lifecycle configs the compactor applies are accepted.
    assert create({"cleanup.policy": "compact,delete", "retention.ms": "60000",
                   "retention.bytes": "1048576", "delete.retention.ms": "0",
                   "min.compaction.lag.ms": "1000"}) is None

    topic = unique_name("alter")
    ck_create_topic(shoal.bootstrap, topic, 1)
    res = ConfigResource("TOPIC", topic, incremental_configs=[
        ConfigEntry("segment.bytes", "1048576", incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(KafkaException) as e:
        admin.incremental_alter_configs([res])[res].result(timeout=60)
    assert e.value.args[0].name() == "INVALID_CONFIG" and "segment.bytes" in e.value.args[0].str()
    res = ConfigResource("TOPIC", topic, incremental_configs=[
        ConfigEntry("retention.ms", "60000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res])[res].result(timeout=60)
    described = admin.describe_configs([ConfigResource("TOPIC", topic)])
    configs = list(described.values())[0].result(timeout=60)
    assert configs["retention.ms"].value == "60000"


# --------------------------------------------------------------------------
# 9. offset commits for partitions that do not exist


def test_offset_commit_for_an_unknown_partition_is_refused(shoal):
    topic = unique_name("commit")
    ck_create_topic(shoal.bootstrap, topic, 2)
    group = unique_name("g")
    c = Consumer(ck_config(shoal.bootstrap, **{"group.id": group, "enable.auto.commit": False}))
    try:
        # librdkafka raises the first partition error of a commit.
        with pytest.raises(KafkaException) as e:
            c.commit(offsets=[TopicPartition(topic, 0, 5), TopicPartition(topic, 7, 5)],
                     asynchronous=False)
        assert e.value.args[0].code() == UNKNOWN_TOPIC_OR_PARTITION, e.value
        with pytest.raises(KafkaException) as e:
            c.commit(offsets=[TopicPartition(unique_name("nope"), 0, 5)], asynchronous=False)
        assert e.value.args[0].code() == UNKNOWN_TOPIC_OR_PARTITION, e.value
        # The partition that exists was committed; the others were not.
        committed = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)
        assert [tp.offset for tp in committed] == [5, -1001]
    finally:
        c.close()
    admin = ck_admin(shoal.bootstrap)
    from confluent_kafka import ConsumerGroupTopicPartitions
    res = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    listed = res[group].result(timeout=60).topic_partitions
    assert {(tp.topic, tp.partition) for tp in listed} == {(topic, 0)}, listed
