"""Small helpers around the real Kafka clients used by the tests
(kafka-python and confluent-kafka / librdkafka)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional

from harness import unique_name, wait_for

# --------------------------------------------------------------------------
# kafka-python


def kp_producer(bootstrap: str, **config):
    from kafka import KafkaProducer

    config.setdefault("request_timeout_ms", 30000)
    config.setdefault("max_block_ms", 60000)
    return KafkaProducer(bootstrap_servers=bootstrap, **config)


def kp_admin(bootstrap: str, **config):
    from kafka import KafkaAdminClient

    config.setdefault("request_timeout_ms", 30000)
    return KafkaAdminClient(bootstrap_servers=bootstrap, **config)


def kp_create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create `topic` with `partitions` partitions through CreateTopics and wait
    until the metadata shows all of them with a leader."""
    admin = kp_admin(bootstrap)
    try:
        admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": 1}})
        wait_for_partitions(admin, topic, partitions)
    finally:
        admin.close()


def kp_topic_partitions(admin, topic: str) -> Optional[dict[int, dict]]:
    """{partition: partition-metadata} of `topic` from a fresh Metadata request,
    or None if the topic is unknown / has an error."""
    for t in admin.describe_topics([topic]):
        if t.get("name") == topic and not t.get("error_code"):
            return {p["partition_index"]: p for p in t.get("partitions", [])}
    return None


def wait_for_partitions(admin, topic: str, partitions: int, timeout: float = 30.0) -> None:
    def ready():
        parts = kp_topic_partitions(admin, topic)
        return (parts is not None and sorted(parts) == list(range(partitions))
                and all(p.get("leader_id", -1) >= 0 for p in parts.values()))
    wait_for(ready, timeout, f"metadata of {topic} to show {partitions} partitions with leaders",
             interval=0.2)


def kp_consume(bootstrap: str, topic: str, count: int, partitions: Optional[Iterable[int]] = None,
               timeout: float = 30.0, **config) -> list:
    """Read `count` records from the beginning of `partitions` (all of them if
    None) with a group-less consumer. Returns ConsumerRecords sorted by
    (partition, offset). Fails if fewer than `count` arrive within `timeout`."""
    from kafka import KafkaConsumer, TopicPartition

    config.setdefault("enable_auto_commit", False)
    config.setdefault("auto_offset_reset", "earliest")
    c = KafkaConsumer(bootstrap_servers=bootstrap, **config)
    try:
        if partitions is None:
            partitions = wait_for(lambda: c.partitions_for_topic(topic), timeout,
                                  f"partitions of {topic}", interval=0.2)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"consumed only {len(out)} of {count} records from {topic} in {timeout:.0f}s: "
                    f"{[(r.partition, r.offset, r.value) for r in out][:20]}")
            for _tp, recs in c.poll(timeout_ms=500).items():
                out.extend(recs)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


def kp_end_offsets(bootstrap: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        return {tp.partition: off for tp, off in c.end_offsets(tps, timeout_ms=30000).items()}
    finally:
        c.close()


def kafka_python_roundtrip(bootstrap: str, n: int = 5) -> None:
    """Another client still works: produce `n` records to a fresh topic with
    kafka-python and consume them back in order."""
    topic = unique_name("roundtrip")
    values = [f"roundtrip-{i}".encode() for i in range(n)]
    p = kp_producer(bootstrap)
    try:
        offsets = [p.send(topic, value=v, partition=0).get(timeout=60).offset for v in values]
    finally:
        p.close(timeout=10)
    assert offsets == list(range(n)), offsets
    recs = kp_consume(bootstrap, topic, n, partitions=[0])
    assert [r.value for r in recs] == values
    assert [r.offset for r in recs] == list(range(n))


# --------------------------------------------------------------------------
# confluent-kafka

#: librdkafka logs go through Python logging (captured per test by pytest)
#: rather than straight to the terminal's stderr.
RDKAFKA_LOGGER = logging.getLogger("rdkafka")


def ck_config(bootstrap: str, **config) -> dict:
    conf = {"bootstrap.servers": bootstrap, "broker.address.family": "v4",
            "logger": RDKAFKA_LOGGER}
    conf.update(config)
    return conf


class DeliveryLog:
    """on_delivery callback that records every delivery report."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ok: list[tuple[int, int, bytes]] = []  # (partition, offset, value)
        self.errors: list[tuple[str, bytes]] = []

    def __call__(self, err, msg):
        with self.lock:
            if err is None:
                self.ok.append((msg.partition(), msg.offset(), msg.value()))
            else:
                self.errors.append((str(err), msg.value()))


def ck_producer(bootstrap: str, **config):
    from confluent_kafka import Producer

    return Producer(ck_config(bootstrap, **config))


def ck_admin(bootstrap: str, **config):
    from confluent_kafka.admin import AdminClient

    return AdminClient(ck_config(bootstrap, **config))


def ck_create_topic(bootstrap: str, topic: str, partitions: int,
                    config: Optional[dict[str, str]] = None) -> None:
    from confluent_kafka.admin import NewTopic

    admin = ck_admin(bootstrap)
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                                            config=config or {})],
                                  request_timeout=30)
    futures[topic].result(timeout=60)

    def ready():
        md = admin.list_topics(topic=topic, timeout=10)
        t = md.topics.get(topic)
        return t is not None and t.error is None and len(t.partitions) == partitions
    wait_for(ready, 30, f"metadata of {topic} to show {partitions} partitions", interval=0.2)


def ck_consume_all(bootstrap: str, topic: str, partitions: Iterable[int],
                   timeout: float = 60.0) -> dict[int, list]:
    """Read every partition from its beginning up to the high watermark seen
    when the read starts. Returns {partition: [Message, ...]} in offset order."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    partitions = list(partitions)
    c = Consumer(ck_config(
        bootstrap,
        **{
            "group.id": unique_name("reader"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }))
    try:
        high = {}
        for p in partitions:
            _low, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            high[p] = hi
        out: dict[int, list] = {p: [] for p in partitions}
        done = {p for p in partitions if high[p] <= 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        while done != set(partitions):
            if time.monotonic() > deadline:
                got = {p: len(v) for p, v in out.items()}
                raise AssertionError(f"reading {topic}: got {got}, high watermarks {high}, "
                                     f"not done: {set(partitions) - done}")
            for msg in c.consume(num_messages=1000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if msg.offset() >= high[msg.partition()]:
                            done.add(msg.partition())
                        continue
                    raise AssertionError(f"consumer error on {topic}: {err}")
                if msg.partition() in done:
                    continue  # past the high watermark seen at the start
                out[msg.partition()].append(msg)
                if msg.offset() + 1 >= high[msg.partition()]:
                    done.add(msg.partition())
        return out
    finally:
        c.close()
