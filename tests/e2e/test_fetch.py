"""Fetch: incremental fetch sessions (KIP-227) with kafka-python and on the
wire, waiting for min_bytes up to max_wait_ms, the size limits of a
response, and reads that cross from the in-memory tail to the cache and to
Parquet segments.

librdkafka (confluent-kafka) does not use fetch sessions: it fetches
sessionless, which the boundary test covers. Filling one answer across
several segments and the tail is covered in broker/tests/kafka_api.rs,
where the in-memory tail can be turned off."""

from __future__ import annotations

import time

import pytest

from clients import ck_config, kp_consume, kp_create_topic, kp_producer
from harness import unique_name, wait_for
from kafka_wire import RawConnection, Reader, i8, i16, i32, i64, frame, recv_frame, request_header, string

API_FETCH = 1
FETCH_SESSION_ID_NOT_FOUND = 70
INVALID_FETCH_SESSION_EPOCH = 71


# --------------------------------------------------------------------------
# Fetch v7 on the wire (the first version with sessions, not yet flexible)


def fetch_v7(cid: int, parts: list[tuple[str, int, int, int]], *, session_id: int = 0,
             epoch: int = -1, max_bytes: int = 50 << 20, max_wait_ms: int = 0,
             min_bytes: int = 0, forget: list[tuple[str, int]] = ()) -> bytes:
    """parts: (topic, partition, fetch offset, partition max bytes)."""
    by_topic: dict[str, list[tuple[int, int, int]]] = {}
    for t, p, off, pmax in parts:
        by_topic.setdefault(t, []).append((p, off, pmax))
    body = i32(-1) + i32(max_wait_ms) + i32(min_bytes) + i32(max_bytes) + i8(0)
    body += i32(session_id) + i32(epoch)
    body += i32(len(by_topic))
    for t, ps in by_topic.items():
        body += string(t) + i32(len(ps))
        for p, off, pmax in ps:
            body += i32(p) + i64(off) + i64(-1) + i32(pmax)
    forgotten: dict[str, list[int]] = {}
    for t, p in forget:
        forgotten.setdefault(t, []).append(p)
    body += i32(len(forgotten))
    for t, ps in forgotten.items():
        body += string(t) + i32(len(ps)) + b"".join(i32(p) for p in ps)
    return frame(request_header(API_FETCH, 7, cid) + body)


def batches_in(records: bytes) -> list[tuple[int, int, int]]:
    """(base offset, last offset, size) of each record batch."""
    out = []
    pos = 0
    while pos + 12 <= len(records):
        base = int.from_bytes(records[pos:pos + 8], "big", signed=True)
        length = int.from_bytes(records[pos + 8:pos + 12], "big", signed=True)
        size = 12 + length
        if pos + size > len(records):
            break
        last_delta = int.from_bytes(records[pos + 23:pos + 27], "big", signed=True)
        out.append((base, base + last_delta, size))
        pos += size
    return out


def parse_fetch_v7(payload: bytes, cid: int) -> dict:
    r = Reader(payload)
    assert r.i32() == cid
    out = {"throttle": r.i32(), "error": r.i16(), "session_id": r.i32(), "partitions": {}}
    for _ in range(r.i32()):
        topic = r.string()
        for _ in range(r.i32()):
            p = r.i32()
            err = r.i16()
            hw = r.i64()
            r.i64()  # last stable offset
            r.i64()  # log start offset
            n = r.i32()
            for _ in range(max(n, 0)):
                r.i64()
                r.i64()
            size = r.i32()
            records = b"" if size < 0 else r.take(size)
            out["partitions"][(topic, p)] = {"error": err, "hw": hw, "records": records}
    return out


class FetchClient(RawConnection):
    def fetch(self, parts, **kw) -> dict:
        cid = self.next_cid()
        self.sock.sendall(fetch_v7(cid, parts, **kw))
        return parse_fetch_v7(recv_frame(self.sock), cid)


def produce(bootstrap: str, topic: str, per_partition: dict[int, int], size: int = 100,
            **config) -> None:
    config.setdefault("linger_ms", 5)
    p = kp_producer(bootstrap, acks="all", **config)
    try:
        futs = [p.send(topic, value=f"{part}-{i}-".encode().ljust(size, b"x"), partition=part)
                for part, n in per_partition.items() for i in range(n)]
        p.flush(timeout=60)
        for f in futs:
            f.get(timeout=60)
    finally:
        p.close(timeout=10)


def connect(shoal) -> FetchClient:
    host, port = shoal.bootstrap.rsplit(":", 1)
    return FetchClient(host, int(port))


# --------------------------------------------------------------------------
# sessions on the wire


def test_a_session_answers_only_what_changed_and_follows_added_and_forgotten_partitions(shoal):
    topic = unique_name("sess")
    kp_create_topic(shoal.bootstrap, topic, 3)
    produce(shoal.bootstrap, topic, {0: 10, 1: 10, 2: 10})
    with connect(shoal) as c:
        # Epoch 0 opens a session: a full answer for both partitions.
        first = c.fetch([(topic, 0, 0, 1 << 20), (topic, 1, 0, 1 << 20)], epoch=0)
        assert first["error"] == 0 and first["session_id"] > 0, first
        sid = first["session_id"]
        assert set(first["partitions"]) == {(topic, 0), (topic, 1)}
        assert batches_in(first["partitions"][(topic, 0)]["records"])[-1][1] == 9

        # Both read to the end: nothing has changed, the answer is empty.
        quiet = c.fetch([(topic, 0, 10, 1 << 20), (topic, 1, 10, 1 << 20)], session_id=sid, epoch=1)
        assert quiet["error"] == 0 and quiet["session_id"] == sid
        assert quiet["partitions"] == {}
        quiet = c.fetch([], session_id=sid, epoch=2)
        assert quiet["partitions"] == {}, "an empty incremental request still covers the session"

        # New records in partition 1 only: only partition 1 is answered.
        produce(shoal.bootstrap, topic, {1: 3})
        moved = c.fetch([], session_id=sid, epoch=3)
        assert set(moved["partitions"]) == {(topic, 1)}, moved
        got = batches_in(moved["partitions"][(topic, 1)]["records"])
        assert got[0][0] <= 10 and got[-1][1] == 12

        # Add partition 2, forget partition 0.
        added = c.fetch([(topic, 1, 13, 1 << 20), (topic, 2, 0, 1 << 20)], session_id=sid, epoch=4,
                        forget=[(topic, 0)])
        assert set(added["partitions"]) == {(topic, 2)}, added
        produce(shoal.bootstrap, topic, {0: 5, 1: 1})
        after = c.fetch([(topic, 2, 10, 1 << 20)], session_id=sid, epoch=5)
        assert set(after["partitions"]) == {(topic, 1)}, "a forgotten partition is no longer read"


def test_unknown_sessions_and_wrong_epochs_get_the_session_errors(shoal):
    topic = unique_name("sesserr")
    kp_create_topic(shoal.bootstrap, topic, 1)
    produce(shoal.bootstrap, topic, {0: 2})
    with connect(shoal) as c:
        unknown = c.fetch([(topic, 0, 0, 1 << 20)], session_id=123456, epoch=1)
        assert unknown["error"] == FETCH_SESSION_ID_NOT_FOUND and unknown["partitions"] == {}
        sid = c.fetch([(topic, 0, 0, 1 << 20)], epoch=0)["session_id"]
        assert sid > 0
        wrong = c.fetch([], session_id=sid, epoch=7)
        assert wrong["error"] == INVALID_FETCH_SESSION_EPOCH
        # A sessionless fetch (epoch -1) closes the session.
        closed = c.fetch([(topic, 0, 0, 1 << 20)], session_id=sid, epoch=-1)
        assert closed["error"] == 0 and closed["session_id"] == 0
        assert c.fetch([], session_id=sid, epoch=1)["error"] == FETCH_SESSION_ID_NOT_FOUND
    assert shoal.metrics().get("shoal_fetch_session_errors_total", 0) >= 3


def test_a_full_session_cache_evicts_a_smaller_session_and_its_consumer_recovers(shoal_factory):
    shoal = shoal_factory(extra_args=["--fetch-session-cache-slots", "1"])
    shoal.start()
    topic = unique_name("evict")
    kp_create_topic(shoal.bootstrap, topic, 3)
    produce(shoal.bootstrap, topic, {0: 50, 1: 50, 2: 50})
    with connect(shoal) as small, connect(shoal) as big:
        sid = small.fetch([(topic, 0, 0, 1 << 20)], epoch=0)["session_id"]
        assert sid > 0
        # As many partitions and recently used: the new one goes sessionless.
        assert big.fetch([(topic, 1, 0, 1 << 20)], epoch=0)["session_id"] == 0
        # More partitions: the small session makes way.
        bigger = big.fetch([(topic, 1, 0, 1 << 20), (topic, 2, 0, 1 << 20)], epoch=0)
        assert bigger["session_id"] > 0
        assert small.fetch([], session_id=sid, epoch=1)["error"] == FETCH_SESSION_ID_NOT_FOUND
    assert shoal.metrics()["shoal_fetch_session_evictions_total"] >= 1

    # kafka-python consumers (which ask for sessions) read everything
    # whether or not the one slot is theirs.
    for parts in ([0], [0, 1, 2], [1]):
        recs = kp_consume(shoal.bootstrap, topic, 50 * len(parts), partitions=parts)
        assert [(r.partition, r.offset) for r in recs] == [(p, o) for p in parts for o in range(50)]


def test_kafka_python_consumes_through_a_session_while_partitions_come_and_go(shoal):
    from kafka import KafkaConsumer, TopicPartition

    topic = unique_name("kpsess")
    kp_create_topic(shoal.bootstrap, topic, 3)
    produce(shoal.bootstrap, topic, {0: 20, 1: 20, 2: 20})
    c = KafkaConsumer(bootstrap_servers=shoal.bootstrap, enable_auto_commit=False,
                      auto_offset_reset="earliest", fetch_max_wait_ms=100)
    try:
        def read(expect: dict[int, int]) -> dict[int, list[int]]:
            got: dict[int, list[int]] = {}
            deadline = time.monotonic() + 30
            while any(len(got.get(p, [])) < n for p, n in expect.items()):
                assert time.monotonic() < deadline, f"read {got} of {expect}"
                for tp, recs in c.poll(timeout_ms=200).items():
                    got.setdefault(tp.partition, []).extend(r.offset for r in recs)
            return got

        c.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        c.seek_to_beginning()
        got = read({0: 20, 1: 20})
        assert got == {0: list(range(20)), 1: list(range(20))}
        wait_for(lambda: shoal.metrics().get("shoal_fetch_sessions", 0) >= 1, 10,
                 "kafka-python to hold a fetch session")

        # Partition 0 leaves the session, 2 joins; new records in 1 and 2.
        c.assign([TopicPartition(topic, 1), TopicPartition(topic, 2)])
        c.seek(TopicPartition(topic, 1), 20)
        c.seek(TopicPartition(topic, 2), 0)
        produce(shoal.bootstrap, topic, {0: 5, 1: 5, 2: 5})
        got = read({1: 5, 2: 25})
        assert got.get(1) == list(range(20, 25)) and got.get(2) == list(range(25)), got
        assert 0 not in got
        assert shoal.metrics().get("shoal_fetch_session_errors_total", 0) == 0
    finally:
        c.close()


# --------------------------------------------------------------------------
# waiting: min_bytes and max_wait_ms


def test_a_waiting_fetch_answers_when_min_bytes_arrive_and_at_max_wait_otherwise(shoal):
    import threading

    topic = unique_name("wait")
    kp_create_topic(shoal.bootstrap, topic, 1)
    produce(shoal.bootstrap, topic, {0: 1})
    with connect(shoal) as c:
        # Nothing new: the answer comes at max_wait_ms, empty.
        started = time.monotonic()
        r = c.fetch([(topic, 0, 1, 1 << 20)], max_wait_ms=400, min_bytes=1)
        waited = time.monotonic() - started
        assert r["partitions"][(topic, 0)]["records"] == b""
        assert waited >= 0.4, waited
        # Less than min_bytes there: still held until max_wait_ms, then
        # answered with what there is.
        started = time.monotonic()
        r = c.fetch([(topic, 0, 0, 1 << 20)], max_wait_ms=400, min_bytes=1 << 20)
        assert time.monotonic() - started >= 0.4
        assert [b[0] for b in batches_in(r["partitions"][(topic, 0)]["records"])] == [0]
        # A fetch waiting for up to 20 s is answered by the record produced
        # while it waits, not by the clock.
        answer: dict = {}

        def wait():
            t0 = time.monotonic()
            answer["r"] = c.fetch([(topic, 0, 1, 1 << 20)], max_wait_ms=20_000, min_bytes=1)
            answer["waited"] = time.monotonic() - t0

        before = shoal.metrics().get("shoal_fetch_requests_total", 0)
        t = threading.Thread(target=wait)
        t.start()
        wait_for(lambda: shoal.metrics().get("shoal_fetch_requests_total", 0) > before,
                 timeout=10, what="the fetch to reach the broker")
        assert "r" not in answer, "answered before there was anything to answer with"
        produce(shoal.bootstrap, topic, {0: 1})
        t.join(30)
        assert [b[0] for b in batches_in(answer["r"]["partitions"][(topic, 0)]["records"])] == [1]
        assert answer["waited"] < 10, answer["waited"]


# --------------------------------------------------------------------------
# limits and the flush boundary


def test_responses_respect_the_partition_and_response_limits(shoal_factory):
    # Small flushes, so the backlog spans many segments and the tail.
    shoal = shoal_factory(flush_bytes=65536)
    shoal.start()
    topic = unique_name("limits")
    kp_create_topic(shoal.bootstrap, topic, 2)
    produce(shoal.bootstrap, topic, {0: 2000, 1: 2000}, size=200, batch_size=4096)
    shoal.wait_flushed(topic, {0: 2000, 1: 2000})
    with connect(shoal) as c:
        for pmax, total in ((10_000, 50 << 20), (300_000, 50 << 20), (300_000, 200_000)):
            r = c.fetch([(topic, 0, 0, pmax), (topic, 1, 0, pmax)], max_bytes=total)
            assert r["error"] == 0
            sizes = {p: len(d["records"]) for (_, p), d in r["partitions"].items()}
            first_batch = batches_in(r["partitions"][(topic, 0)]["records"])[0][2]
            # Whole batches within the limits; only the first batch of the
            # response (partition 0's, which has data) may exceed them (KIP-74).
            assert sizes[0] <= max(pmax, first_batch), (pmax, total, sizes)
            assert sizes[1] <= pmax, (pmax, total, sizes)
            assert sum(sizes.values()) <= max(total, first_batch), (pmax, total, sizes)
            assert sizes[0] > 0
        # A partition limit larger than a segment is filled from several.
        r = c.fetch([(topic, 0, 0, 300_000)])
        got = batches_in(r["partitions"][(topic, 0)]["records"])
        assert sum(b[2] for b in got) > 200_000, "the response stopped at one small segment"
        assert [b[0] for b in got] == sorted(b[0] for b in got)
        assert all(got[i][1] + 1 == got[i + 1][0] for i in range(len(got) - 1)), "a gap or a repeat"
        # The first batch comes back even past every limit.
        tiny = c.fetch([(topic, 0, 0, 1)], max_bytes=1)
        assert len(batches_in(tiny["partitions"][(topic, 0)]["records"])) == 1


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_reads_cross_the_flush_boundary_under_a_small_cache_without_gaps(shoal_factory, client):
    # A 1 MiB memory cache and no disk tier. The first part of the log is
    # flushed before a restart (which empties the in-memory tail), so it is
    # read back from Parquet through a cache too small to keep it; the next
    # part is flushed after the restart (cached at flush and still in the
    # tail); the last part may not be flushed yet.
    shoal = shoal_factory(flush_bytes=131072, flush_interval="50ms",
                          extra_args=["--cache-memory", "1MiB", "--cache-disk", "0"])
    shoal.start()
    topic = unique_name("boundary")
    kp_create_topic(shoal.bootstrap, topic, 2)
    produce(shoal.bootstrap, topic, {0: 4000, 1: 4000}, size=500, batch_size=16384)
    shoal.wait_flushed(topic, {0: 4000, 1: 4000})
    shoal.restart()
    produce(shoal.bootstrap, topic, {0: 2000, 1: 2000}, size=500, batch_size=16384)
    shoal.wait_flushed(topic, {0: 6000, 1: 6000})
    produce(shoal.bootstrap, topic, {0: 300, 1: 300}, size=500)
    n = 6300
    if client == "confluent":
        from confluent_kafka import Consumer, TopicPartition as CTP

        c = Consumer(ck_config(shoal.bootstrap, **{"group.id": unique_name("g"),
                                                   "enable.auto.commit": False,
                                                   "fetch.max.bytes": 1 << 20,
                                                   "max.partition.fetch.bytes": 256 << 10}))
        try:
            c.assign([CTP(topic, 0, 0), CTP(topic, 1, 0)])
            got: dict[int, list[int]] = {0: [], 1: []}
            deadline = time.monotonic() + 60
            while len(got[0]) < n or len(got[1]) < n:
                assert time.monotonic() < deadline, {p: len(v) for p, v in got.items()}
                for m in c.consume(num_messages=1000, timeout=0.5):
                    assert m.error() is None, m.error()
                    got[m.partition()].append(m.offset())
                    assert m.value().startswith(f"{m.partition()}-".encode())
        finally:
            c.close()
    else:
        recs = kp_consume(shoal.bootstrap, topic, 2 * n, partitions=[0, 1], timeout=60,
                          max_partition_fetch_bytes=256 << 10)
        got = {0: [r.offset for r in recs if r.partition == 0],
               1: [r.offset for r in recs if r.partition == 1]}
    for p in (0, 1):
        assert got[p] == list(range(n)), f"partition {p}: gap or duplicate"
    m = shoal.metrics()
    assert m.get("shoal_cold_reads_total", 0) > 0, "nothing was read back from Parquet"
