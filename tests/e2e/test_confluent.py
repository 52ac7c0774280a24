"""confluent-kafka (librdkafka) against Shoal."""

from __future__ import annotations

import threading

import pytest

from clients import DeliveryLog, ck_admin, ck_config, ck_consume_all, ck_create_topic, ck_producer
from harness import unique_name, wait_for

COMPRESSIONS = ["none", "gzip", "snappy", "lz4", "zstd"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_produce_every_compression_acks_all(shoal, compression):
    topic = unique_name(f"ck-{compression}")
    n = 500
    values = [(f"{compression} message {i:05d} " + "xyz" * (i % 50)).encode() for i in range(n)]
    log = DeliveryLog()
    p = ck_producer(shoal.bootstrap, **{
        "compression.type": compression,
        "acks": "all",
        "linger.ms": 10,
        "batch.num.messages": 100,
    })
    for i, v in enumerate(values):
        p.produce(topic, key=f"k{i}".encode(), value=v, partition=0, on_delivery=log)
        p.poll(0)
    assert p.flush(60) == 0, "messages still in flight after 60 s"
    assert log.errors == [], log.errors[:5]
    assert sorted(log.ok) == [(0, i, v) for i, v in enumerate(values)]

    msgs = ck_consume_all(shoal.bootstrap, topic, [0])[0]
    assert [m.offset() for m in msgs] == list(range(n))
    assert [m.value() for m in msgs] == values
    assert [m.key() for m in msgs] == [f"k{i}".encode() for i in range(n)]


def test_idempotent_producer_exactly_once_in_order(shoal):
    topic = unique_name("ck-idempotent")
    partitions = 3
    ck_create_topic(shoal.bootstrap, topic, partitions)
    n = 3000
    log = DeliveryLog()
    p = ck_producer(shoal.bootstrap, **{
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "max.in.flight.requests.per.connection": 5,
        "batch.num.messages": 50,
    })
    sent: dict[int, list[bytes]] = {q: [] for q in range(partitions)}
    for i in range(n):
        v = f"idem-{i:06d}".encode()
        part = i % partitions
        sent[part].append(v)
        while True:
            try:
                p.produce(topic, value=v, partition=part, on_delivery=log)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(60) == 0
    assert log.errors == [], log.errors[:5]
    assert len(log.ok) == n
    # Delivery reports: each partition got its messages at dense offsets, in send order.
    for q in range(partitions):
        acked = sorted((o, v) for part, o, v in log.ok if part == q)
        assert acked == list(enumerate(sent[q])), f"partition {q}"

    got = ck_consume_all(shoal.bootstrap, topic, range(partitions))
    for q in range(partitions):
        assert [m.offset() for m in got[q]] == list(range(len(sent[q])))
        assert [m.value() for m in got[q]] == sent[q], f"partition {q}: duplicates or reordering"


class RdGroupMember(threading.Thread):
    """A librdkafka consumer in a group, polling in its own thread; tracks its
    assignment through on_assign / on_revoke."""

    def __init__(self, name: str, bootstrap: str, group: str, topic: str):
        super().__init__(name=name, daemon=True)
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.lock = threading.Lock()
        self.assigned: set[int] = set()
        self.assign_events = 0
        self.values: set[bytes] = set()
        self.records: list[tuple[int, int, bytes]] = []
        self.error: BaseException | None = None
        self.consume_errors: list[str] = []
        self._stop_evt = threading.Event()
        self.closed = threading.Event()

    def _on_assign(self, consumer, partitions):
        with self.lock:
            self.assigned = {tp.partition for tp in partitions}
            self.assign_events += 1

    def _on_revoke(self, consumer, partitions):
        with self.lock:
            self.assigned -= {tp.partition for tp in partitions}

    def run(self):
        from confluent_kafka import Consumer

        try:
            c = Consumer(ck_config(self.bootstrap, **{
                "group.id": self.group,
                "client.id": self.name,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 500,
                "partition.assignment.strategy": "range",
                "enable.auto.commit": True,
                "auto.commit.interval.ms": 500,
            }))
            c.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
            try:
                while not self._stop_evt.is_set():
                    msg = c.poll(0.2)
                    if msg is None:
                        continue
                    if msg.error():
                        # Nothing in these tests should surface an error to
                        # the consumer: keep it, and stop() fails on it.
                        with self.lock:
                            self.consume_errors.append(str(msg.error()))
                        continue
                    with self.lock:
                        self.values.add(msg.value())
                        self.records.append((msg.partition(), msg.offset(), msg.value()))
            finally:
                c.close()  # commits and leaves the group
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.closed.set()

    def assignment(self) -> set[int]:
        with self.lock:
            return set(self.assigned)

    def seen(self) -> set[bytes]:
        with self.lock:
            return set(self.values)

    def shutdown(self, timeout: float = 30):
        self._stop_evt.set()
        assert self.closed.wait(timeout), f"{self.name} did not close"
        assert self.error is None, f"{self.name} failed: {self.error!r}"
        assert not self.consume_errors, f"{self.name} got errors: {self.consume_errors[:5]}"


def produce_to_all(bootstrap: str, topic: str, prefix: str, n: int, partitions: int) -> list[bytes]:
    values = [f"{prefix}-{i}".encode() for i in range(n)]
    log = DeliveryLog()
    p = ck_producer(bootstrap, acks="all")
    for i, v in enumerate(values):
        p.produce(topic, value=v, partition=i % partitions, on_delivery=log)
    assert p.flush(60) == 0
    assert log.errors == [], log.errors[:5]
    return values


def test_consumer_group_rebalance_when_member_leaves(shoal):
    topic = unique_name("ck-group")
    group = unique_name("ck-group")
    ck_create_topic(shoal.bootstrap, topic, 4)
    first = produce_to_all(shoal.bootstrap, topic, "first", 40, 4)

    m1 = RdGroupMember("rd-m1", shoal.bootstrap, group, topic)
    m2 = RdGroupMember("rd-m2", shoal.bootstrap, group, topic)
    try:
        m1.start()
        wait_for(lambda: m1.assignment() == {0, 1, 2, 3}, 60, "m1 alone to be assigned 4 partitions")
        wait_for(lambda: set(first) <= m1.seen(), 60, "m1 to read the first records")

        m2.start()

        def split():
            a1, a2 = m1.assignment(), m2.assignment()
            return a1 and a2 and not (a1 & a2) and (a1 | a2) == {0, 1, 2, 3}
        wait_for(split, 60, "the group to split 4 partitions between two members")
        assert len(m1.assignment()) == 2 and len(m2.assignment()) == 2

        second = produce_to_all(shoal.bootstrap, topic, "second", 40, 4)
        wait_for(lambda: set(second) <= (m1.seen() | m2.seen()), 60,
                 "the two members to read the second records")

        m2.shutdown()
        wait_for(lambda: m1.assignment() == {0, 1, 2, 3}, 60,
                 "m1 to be assigned all 4 partitions after m2 left")
        third = produce_to_all(shoal.bootstrap, topic, "third", 40, 4)
        wait_for(lambda: set(third) <= m1.seen(), 60, "m1 to read the third records")
        assert m1.error is None
    finally:
        for m in (m1, m2):
            if m.is_alive():
                m.shutdown()


def test_admin_client(shoal):
    from confluent_kafka.admin import NewPartitions, NewTopic

    admin = ck_admin(shoal.bootstrap)

    md = admin.list_topics(timeout=30)
    hosts = {(b.host, b.port) for b in md.brokers.values()}
    assert ("127.0.0.1", shoal.kafka_port) in hosts, md.brokers

    topic = unique_name("ck-admin")
    fs = admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)],
                             request_timeout=30)
    fs[topic].result(timeout=60)

    def partitions():
        t = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
        return None if t is None or t.error is not None else sorted(t.partitions)
    wait_for(lambda: partitions() == [0, 1, 2], 30, f"{topic} to have 3 partitions")
    assert topic in admin.list_topics(timeout=30).topics

    fs = admin.create_partitions([NewPartitions(topic, 4)], request_timeout=30)
    fs[topic].result(timeout=60)
    wait_for(lambda: partitions() == [0, 1, 2, 3], 30, f"{topic} to have 4 partitions")

    if hasattr(admin, "describe_cluster"):
        desc = admin.describe_cluster(request_timeout=30).result(timeout=60)
        assert desc.cluster_id, desc
        assert ("127.0.0.1", shoal.kafka_port) in {(n.host, n.port) for n in desc.nodes}, desc.nodes
        assert desc.controller is not None

    fs = admin.delete_topics([topic], request_timeout=30)
    fs[topic].result(timeout=60)
    wait_for(lambda: topic not in admin.list_topics(timeout=10).topics, 30, f"{topic} to be deleted")
