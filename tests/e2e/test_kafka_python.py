"""kafka-python (pure-Python client) against Shoal."""

from __future__ import annotations

import threading
import time

import pytest

from clients import (
    kp_admin,
    kp_consume,
    kp_create_topic,
    kp_end_offsets,
    kp_producer,
    kp_topic_partitions,
    wait_for_partitions,
)
from harness import unique_name, wait_for

COMPRESSIONS = [None, "gzip", "snappy", "lz4", "zstd"]


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=[c or "none" for c in COMPRESSIONS])
def test_produce_consume_with_compression(shoal, compression):
    topic = unique_name(f"kp-{compression or 'none'}")
    n = 300
    # Compressible, distinct payloads; linger so that records share batches.
    values = [(f"record {i:05d} " + "abcdefgh" * (i % 40)).encode() for i in range(n)]
    p = kp_producer(shoal.bootstrap, compression_type=compression, linger_ms=20, batch_size=32768)
    try:
        futures = [p.send(topic, key=f"k{i}".encode(), value=v, partition=0)
                   for i, v in enumerate(values)]
        p.flush(timeout=60)
        offsets = [f.get(timeout=60).offset for f in futures]
    finally:
        p.close(timeout=10)
    assert offsets == list(range(n))
    recs = kp_consume(shoal.bootstrap, topic, n, partitions=[0])
    assert [r.offset for r in recs] == list(range(n))
    assert [r.value for r in recs] == values
    assert [r.key for r in recs] == [f"k{i}".encode() for i in range(n)]
    assert kp_end_offsets(shoal.bootstrap, topic, [0]) == {0: n}


def test_keyed_messages_land_in_key_partition(shoal):
    from kafka.partitioner.default import murmur2

    topic = unique_name("kp-keyed")
    kp_create_topic(shoal.bootstrap, topic, 4)
    n = 200
    keys = [f"user-{i}".encode() for i in range(n)]
    expected = {k: (murmur2(k) & 0x7FFFFFFF) % 4 for k in keys}
    assert len(set(expected.values())) == 4  # the keys do cover every partition

    p = kp_producer(shoal.bootstrap, linger_ms=5)
    try:
        assert p.partitions_for(topic) == {0, 1, 2, 3}
        futures = [(k, p.send(topic, key=k, value=b"v-" + k)) for k in keys]
        p.flush(timeout=60)
        metas = [(k, f.get(timeout=60)) for k, f in futures]
    finally:
        p.close(timeout=10)
    for k, md in metas:
        assert md.partition == expected[k], (k, md)

    recs = kp_consume(shoal.bootstrap, topic, n, partitions=[0, 1, 2, 3])
    assert len(recs) == n
    for r in recs:
        assert r.partition == expected[r.key], (r.key, r.partition)
        assert r.value == b"v-" + r.key
    # Within a partition, records keep the order they were sent in.
    for part in range(4):
        sent = [k for k in keys if expected[k] == part]
        got = [r.key for r in recs if r.partition == part]
        assert got == sent
        assert [r.offset for r in recs if r.partition == part] == list(range(len(sent)))
    assert kp_end_offsets(shoal.bootstrap, topic, range(4)) == {
        part: sum(1 for k in keys if expected[k] == part) for part in range(4)}


def test_headers_null_keys_and_null_values(shoal):
    topic = unique_name("kp-headers")
    sent = [
        (None, b"no key", []),
        (b"tombstone", None, []),
        (b"k-headers", b"with headers",
         [("trace-id", b"abc123"), ("bin", bytes(range(256))), ("empty", b""), ("dup", b"1"), ("dup", b"2")]),
        (None, b"", [("only-header", b"x")]),
        (b"", b"empty key", []),
        (None, b"\x00\xff\x00binary", [("unicode-\u00e9", "valu\u00e9".encode())]),
    ]
    p = kp_producer(shoal.bootstrap)
    try:
        for k, v, h in sent:
            p.send(topic, key=k, value=v, headers=h, partition=0)
        p.flush(timeout=60)
    finally:
        p.close(timeout=10)
    recs = kp_consume(shoal.bootstrap, topic, len(sent), partitions=[0])
    got = [(r.key, r.value, list(r.headers)) for r in recs]
    assert got == [(k, v, list(h)) for k, v, h in sent]


def test_list_offsets_earliest_latest_and_by_timestamp(shoal):
    from kafka import KafkaConsumer, TopicPartition

    topic = unique_name("kp-offsets")
    base = (int(time.time()) - 3600) * 1000  # an hour ago, on a whole second
    n = 10
    p = kp_producer(shoal.bootstrap)
    try:
        for i in range(n):
            p.send(topic, value=f"v{i}".encode(), partition=0, timestamp_ms=base + i * 1000)
        p.flush(timeout=60)
    finally:
        p.close(timeout=10)

    tp = TopicPartition(topic, 0)
    c = KafkaConsumer(bootstrap_servers=shoal.bootstrap, enable_auto_commit=False)
    try:
        assert c.beginning_offsets([tp], timeout_ms=30000) == {tp: 0}
        assert c.end_offsets([tp], timeout_ms=30000) == {tp: n}

        def at(ts):
            return c.offsets_for_times({tp: ts}, timeout_ms=30000)[tp]

        hit = at(base + 3000)
        assert (hit.offset, hit.timestamp) == (3, base + 3000)
        hit = at(base + 3001)  # between two records: the next one
        assert (hit.offset, hit.timestamp) == (4, base + 4000)
        hit = at(0)
        assert (hit.offset, hit.timestamp) == (0, base)
        assert at(base + n * 1000 + 60_000) is None  # after the last record

        # The timestamps given by the producer come back on fetch (CreateTime).
        c.assign([tp])
        c.seek(tp, 0)
        recs = []
        deadline = time.monotonic() + 30
        while len(recs) < n and time.monotonic() < deadline:
            for _tp, rs in c.poll(timeout_ms=500).items():
                recs.extend(rs)
        assert [(r.offset, r.timestamp) for r in recs] == [(i, base + i * 1000) for i in range(n)]
    finally:
        c.close()


# --------------------------------------------------------------------------
# consumer groups


class GroupMember(threading.Thread):
    """A KafkaConsumer in a group, polling in its own thread (kafka-python
    consumers are not thread-safe, so only this thread touches it)."""

    def __init__(self, name: str, bootstrap: str, group: str, topic: str, **config):
        super().__init__(name=name, daemon=True)
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.config = config
        self.lock = threading.Lock()
        self.assigned: frozenset[int] = frozenset()
        self.records: list[tuple[int, int, bytes]] = []
        self.error: BaseException | None = None
        self.closed = threading.Event()
        self._stop_evt = threading.Event()

    def run(self):
        from kafka import KafkaConsumer

        try:
            c = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group,
                client_id=self.name,
                auto_offset_reset="earliest",
                session_timeout_ms=10000,
                heartbeat_interval_ms=500,
                **self.config,
            )
            c.subscribe([self.topic])
            try:
                while not self._stop_evt.is_set():
                    batch = c.poll(timeout_ms=200)
                    with self.lock:
                        for _tp, recs in batch.items():
                            self.records.extend((r.partition, r.offset, r.value) for r in recs)
                        self.assigned = frozenset(tp.partition for tp in c.assignment())
            finally:
                c.close()  # leaves the group
                with self.lock:
                    self.assigned = frozenset()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.closed.set()

    def snapshot(self):
        with self.lock:
            return self.assigned, list(self.records)

    def values(self) -> set[bytes]:
        with self.lock:
            return {v for _, _, v in self.records}

    def shutdown(self, timeout: float = 30):
        self._stop_evt.set()
        assert self.closed.wait(timeout), f"{self.name} did not close"
        assert self.error is None, f"{self.name} failed: {self.error!r}"


def produce_round_robin(bootstrap: str, topic: str, prefix: str, n: int, partitions: int) -> list[bytes]:
    values = [f"{prefix}-{i}".encode() for i in range(n)]
    p = kp_producer(bootstrap)
    try:
        for i, v in enumerate(values):
            p.send(topic, value=v, partition=i % partitions)
        p.flush(timeout=60)
    finally:
        p.close(timeout=10)
    return values


def test_consumer_group_splits_partitions_and_rebalances_on_leave(shoal):
    topic = unique_name("kp-group")
    group = unique_name("kp-group")
    kp_create_topic(shoal.bootstrap, topic, 4)
    first = produce_round_robin(shoal.bootstrap, topic, "first", 40, 4)

    m1 = GroupMember("m1", shoal.bootstrap, group, topic, enable_auto_commit=True,
                     auto_commit_interval_ms=500)
    m2 = GroupMember("m2", shoal.bootstrap, group, topic, enable_auto_commit=True,
                     auto_commit_interval_ms=500)
    try:
        m1.start()
        wait_for(lambda: m1.snapshot()[0] == {0, 1, 2, 3}, 60, "m1 alone to own all 4 partitions")
        wait_for(lambda: set(first) <= m1.values(), 60, "m1 to read the first 40 records")

        m2.start()

        def split():
            a1, a2 = m1.snapshot()[0], m2.snapshot()[0]
            return a1 and a2 and not (a1 & a2) and (a1 | a2) == {0, 1, 2, 3}
        wait_for(split, 60, "the group to split 4 partitions between m1 and m2")
        a1, a2 = m1.snapshot()[0], m2.snapshot()[0]
        assert len(a1) == 2 and len(a2) == 2, (a1, a2)

        # Both members consume new records of their own partitions.
        second = produce_round_robin(shoal.bootstrap, topic, "second", 40, 4)
        wait_for(lambda: set(second) <= (m1.values() | m2.values()), 60,
                 "the two members to read the second 40 records")
        for m, assigned in ((m1, a1), (m2, a2)):
            parts = {p for p, _, v in m.snapshot()[1] if v.startswith(b"second-")}
            assert parts == set(assigned), (m.name, parts, assigned)

        # m2 leaves: m1 takes over every partition and keeps consuming.
        m2.shutdown()
        wait_for(lambda: m1.snapshot()[0] == {0, 1, 2, 3}, 60,
                 "m1 to own all 4 partitions after m2 left")
        third = produce_round_robin(shoal.bootstrap, topic, "third", 40, 4)
        wait_for(lambda: set(third) <= m1.values(), 60, "m1 to read the third 40 records")
        assert m1.is_alive() and m1.error is None
    finally:
        for m in (m1, m2):
            if m.is_alive():
                m.shutdown()


def test_committed_offsets_survive_broker_restart(shoal):
    from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

    topic = unique_name("kp-commit")
    group = unique_name("kp-commit")
    kp_create_topic(shoal.bootstrap, topic, 2)
    values = produce_round_robin(shoal.bootstrap, topic, "r", 40, 2)  # 20 per partition
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]

    c = KafkaConsumer(bootstrap_servers=shoal.bootstrap, group_id=group, enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=10000,
                      heartbeat_interval_ms=500)
    try:
        c.subscribe([topic])
        seen = []
        deadline = time.monotonic() + 60
        while len(seen) < 40 and time.monotonic() < deadline:
            for _tp, recs in c.poll(timeout_ms=500).items():
                seen.extend(recs)
        assert len(seen) == 40
        c.commit({tps[0]: OffsetAndMetadata(12, "", -1), tps[1]: OffsetAndMetadata(7, "", -1)})
        assert c.committed(tps[0]) == 12
        assert c.committed(tps[1]) == 7
    finally:
        c.close(autocommit=False)

    shoal.stop()
    shoal.start()

    # The committed offsets are there after the restart (OffsetFetch via admin).
    admin = kp_admin(shoal.bootstrap)
    try:
        offsets = admin.list_group_offsets(group)[group]
        assert {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic} == \
            {0: 12, 1: 7}, offsets
    finally:
        admin.close()

    # A new member of the group resumes right after them.
    c = KafkaConsumer(bootstrap_servers=shoal.bootstrap, group_id=group, enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=10000,
                      heartbeat_interval_ms=500)
    try:
        c.subscribe([topic])
        got = []
        deadline = time.monotonic() + 60
        while len(got) < (20 - 12) + (20 - 7) and time.monotonic() < deadline:
            for _tp, recs in c.poll(timeout_ms=500).items():
                got.extend(recs)
        by_part = {p: [(r.offset, r.value) for r in sorted(got, key=lambda r: r.offset)
                       if r.partition == p] for p in (0, 1)}
        assert by_part[0] == [(o, values[o * 2]) for o in range(12, 20)]
        assert by_part[1] == [(o, values[o * 2 + 1]) for o in range(7, 20)]
        assert c.committed(tps[0]) == 12 and c.committed(tps[1]) == 7
    finally:
        c.close(autocommit=False)


# --------------------------------------------------------------------------
# admin


def test_admin_describe_list_delete_groups(shoal):
    topic = unique_name("kp-admin-group")
    group = unique_name("kp-admin-group")
    kp_create_topic(shoal.bootstrap, topic, 2)
    values = produce_round_robin(shoal.bootstrap, topic, "g", 10, 2)

    member = GroupMember("admin-member", shoal.bootstrap, group, topic, enable_auto_commit=True,
                         auto_commit_interval_ms=200)
    admin = kp_admin(shoal.bootstrap)
    try:
        member.start()
        wait_for(lambda: set(values) <= member.values(), 60, "the member to read the records")

        def listed():
            return {g["group_id"]: g for g in admin.list_groups()}.get(group)
        g = wait_for(listed, 30, f"{group} in ListGroups")
        assert g.get("protocol_type") == "consumer", g

        def stable():
            d = admin.describe_groups([group])[group]
            return d if d.get("group_state") == "Stable" and len(d.get("members", [])) == 1 else None
        desc = wait_for(stable, 30, f"{group} to be Stable with one member")
        assert desc.get("error") is None, desc
        assert desc.get("protocol_type") == "consumer"
        assert desc.get("protocol_data"), desc  # the assignor the group agreed on
        assert desc["members"][0].get("client_id") == "admin-member", desc["members"][0]

        # A group with an active member cannot be deleted.
        res = admin.delete_groups([group])
        assert res.get(group) == "NonEmptyGroupError", res

        member.shutdown()

        def empty():
            d = admin.describe_groups([group])[group]
            return d.get("group_state") == "Empty" and not d.get("members")
        wait_for(empty, 30, f"{group} to be Empty after its member left")

        res = admin.delete_groups([group])
        assert res.get(group) == "OK", res
        wait_for(lambda: group not in {g["group_id"] for g in admin.list_groups()}, 30,
                 f"{group} to disappear from ListGroups")
        res = admin.delete_groups([group])
        assert res.get(group) == "GroupIdNotFoundError", res
    finally:
        if member.is_alive():
            member.shutdown()
        admin.close()


def test_admin_create_delete_topics_and_partitions(shoal):
    from kafka.errors import TopicAlreadyExistsError

    topic = unique_name("kp-admin-topic")
    admin = kp_admin(shoal.bootstrap)
    try:
        admin.create_topics({topic: {"num_partitions": 3, "replication_factor": 1}})
        wait_for_partitions(admin, topic, 3)
        assert topic in admin.list_topics()

        with pytest.raises(TopicAlreadyExistsError):
            admin.create_topics({topic: {"num_partitions": 3, "replication_factor": 1}})

        admin.create_partitions({topic: 5})
        wait_for_partitions(admin, topic, 5)

        # The new partitions take writes.
        p = kp_producer(shoal.bootstrap)
        try:
            wait_for(lambda: len(p.partitions_for(topic)) == 5, 30,
                     "the producer to see 5 partitions", interval=0.3)
            md = p.send(topic, value=b"into the new partition", partition=4).get(timeout=60)
            assert (md.partition, md.offset) == (4, 0)
        finally:
            p.close(timeout=10)
        recs = kp_consume(shoal.bootstrap, topic, 1, partitions=[4])
        assert [r.value for r in recs] == [b"into the new partition"]

        admin.delete_topics([topic])
        wait_for(lambda: topic not in admin.list_topics(), 30, f"{topic} to be deleted")
        assert kp_topic_partitions(admin, topic) is None
    finally:
        admin.close()


def test_admin_describe_configs_and_cluster(shoal):
    from kafka.admin import ConfigResource, ConfigResourceType

    topic = unique_name("kp-configs")
    kp_create_topic(shoal.bootstrap, topic, 1)
    admin = kp_admin(shoal.bootstrap)
    try:
        res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)],
                                     config_filter="all")
        configs = res["topic"][topic]
        assert configs, f"no config entries returned for topic {topic}: {res}"
        for name, entry in configs.items():
            assert isinstance(name, str) and name
            assert "value" in entry, entry
        # The stream's durability is a topic config (docs/configuration.md).
        assert configs.get("shoal.durability", {}).get("value") == "local", configs.get("shoal.durability")

        cluster = admin.describe_cluster()
        ports = {b.get("port") for b in cluster.get("brokers", [])}
        assert shoal.kafka_port in ports, cluster
    finally:
        admin.close()
