"""The nemesis workload: real Kafka clients (confluent-kafka / librdkafka) in
threads, each recording what it did in the History.

* ProducerWorker - an idempotent (acks=all, enable.idempotence) or a plain
  producer (acks=all, no idempotence, retries=0: a plain record written
  twice is the broker's doing). Values are unique: "<producer>.<generation>:<seq>".
* GroupMember    - one member of a consumer group that consumes every topic
  and commits offsets (automatically, or by hand every few hundred records).
* Reader         - re-reads one topic at a time from offset 0 up to the high
  watermark, so that an offset that changes value shows up.
* OffsetMonitor  - the group's committed offsets, once a second, through
  kafka-python's KafkaAdminClient (list_group_offsets, i.e. OffsetFetch).
* OwnershipMonitor - who owns which shard (cluster only), for the local-window
  loss allowance.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

from clients import RDKAFKA_LOGGER, ck_config  # tests/e2e
from harness import wait_for  # tests/e2e
from history import History


@dataclass(frozen=True)
class Topic:
    name: str
    durability: str  # "object" | "local"
    partitions: int


def default_topics(partitions: int = 3) -> list[Topic]:
    """Two topics of each durability."""
    return [Topic("nem-object-a", "object", partitions), Topic("nem-object-b", "object", partitions),
            Topic("nem-local-a", "local", partitions), Topic("nem-local-b", "local", partitions)]


def log_clients_to(path: Path) -> None:
    """Client logs (connection refused, timeouts, ... plenty of them under
    faults) go to a file in the run dir instead of the terminal."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for logger in (RDKAFKA_LOGGER, logging.getLogger("kafka")):  # librdkafka, kafka-python
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def create_topics(bootstrap: str, topics: list[Topic], timeout: float = 60.0) -> None:
    """CreateTopics with shoal.durability per topic, then wait until the
    metadata shows every partition with a leader."""
    admin = AdminClient(ck_config(bootstrap))
    futures = admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, replication_factor=1,
                  config={"shoal.durability": t.durability}) for t in topics],
        request_timeout=30)
    for f in futures.values():
        f.result(timeout=timeout)

    def ready():
        md = admin.list_topics(timeout=10)
        for t in topics:
            tm = md.topics.get(t.name)
            if tm is None or tm.error is not None or len(tm.partitions) != t.partitions:
                return False
            if any(p.leader < 0 for p in tm.partitions.values()):
                return False
        return True

    wait_for(ready, timeout, "every partition of the nemesis topics to have a leader",
             interval=0.2)


def parse_value(value: str) -> tuple[str, int]:
    """("<producer>.<generation>", seq) of a workload value."""
    stream, seq = value.rsplit(":", 1)
    return stream, int(seq)


class ProducerWorker(threading.Thread):
    """Produces round-robin over every (topic, partition) at `rate` records/s
    until `stop` is set, then flushes."""

    def __init__(self, name: str, idempotent: bool, bootstrap: Callable[[], str],
                 topics: list[Topic], rate: float, history: History, stop: threading.Event):
        super().__init__(name=f"producer-{name}", daemon=True)
        self.label = name
        self.idempotent = idempotent
        self.bootstrap = bootstrap
        self.targets = [(t.name, p) for t in topics for p in range(t.partitions)]
        self.rate = rate
        self.history = history
        self.stop = stop
        self.gen = 0
        self.seq = 0
        self.fatal: Optional[str] = None
        # {"t", "stream", "reason"} for every producer that turned fatal
        self.fatal_errors: list[dict] = []
        self.flush_timeout = 180.0
        self.undelivered = 0
        self.producer: Optional[Producer] = None
        self.lock = threading.Lock()
        # time of the last successful delivery, per topic
        self.last_ack: dict[str, float] = {}
        self.finished = threading.Event()

    def config(self) -> dict:
        common = {"acks": "all", "linger.ms": 5, "error_cb": self._error,
                  "retry.backoff.ms": 100, "retry.backoff.max.ms": 1000}
        if self.idempotent:
            # Long enough to ride out a 30 s object store outage plus a failover.
            extra = {"enable.idempotence": True, "message.timeout.ms": 300000}
        else:
            extra = {"enable.idempotence": False, "retries": 0, "message.timeout.ms": 60000,
                     "max.in.flight.requests.per.connection": 5}
        if os.environ.get("SHOAL_NEMESIS_RDKAFKA_DEBUG"):
            extra["debug"] = os.environ["SHOAL_NEMESIS_RDKAFKA_DEBUG"]
            RDKAFKA_LOGGER.setLevel(logging.DEBUG)
        return ck_config(self.bootstrap(), **common, **extra)

    @property
    def stream(self) -> str:
        return f"{self.label}.{self.gen}"

    def _error(self, err: KafkaError) -> None:
        self.history.event("producer-error", f"{self.label}: {err}")
        if err.fatal():
            self.fatal = str(err)

    def _delivered(self, value: str, err: Optional[KafkaError], msg) -> None:
        if err is None:
            self.history.ack(self.stream_of(value), msg.topic(), msg.partition(), msg.offset(), value)
            with self.lock:
                self.last_ack[msg.topic()] = time.monotonic()
        else:
            if err.fatal():
                self.fatal = str(err)
            self.history.ack(self.stream_of(value), msg.topic(), msg.partition(), -1, value,
                             error=str(err), retriable=err.retriable(), fatal=err.fatal(),
                             code=err.code())

    @staticmethod
    def stream_of(value: str) -> str:
        return parse_value(value)[0]

    def _fatal_from(self, e: KafkaException) -> None:
        """Remember a fatal error raised by produce / poll / flush; anything
        else is a bug of this test and propagates."""
        err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
        if err is None or not (err.fatal() or err.code() == KafkaError._FATAL):
            raise e
        # produce() says only "Fatal error"; poll() tells the cause
        if self.fatal is None or "Unable to produce" in self.fatal:
            self.fatal = str(err)

    def _poll(self, timeout: float) -> None:
        try:
            self.producer.poll(timeout)
        except KafkaException as e:
            self._fatal_from(e)

    def _flush(self, producer: Producer, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return producer.flush(max(0.0, deadline - time.monotonic()))
            except KafkaException as e:
                self._fatal_from(e)
                if time.monotonic() >= deadline:
                    return len(producer)

    def _replace_fatal_producer(self) -> None:
        """A fatal error (e.g. an idempotence sequence the broker refused)
        ends a librdkafka producer: report it, let it fail what it holds, and
        carry on with a new producer (a new generation of values)."""
        self._poll(0)  # the cause, if only produce() has spoken so far
        self.fatal_errors.append({"t": self.history.now(), "stream": self.stream,
                                  "reason": self.fatal})
        self.history.event("producer-fatal", f"{self.stream}: {self.fatal}")
        old = self.producer
        self.fatal = None
        self._flush(old, 10)
        try:
            old.purge()
        except KafkaException:
            pass
        self._flush(old, 5)
        self.fatal = None
        self.gen += 1
        self.producer = Producer(self.config())

    def run(self) -> None:
        self.producer = Producer(self.config())
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stop.is_set():
            if self.fatal is not None:
                self._replace_fatal_producer()
            topic, partition = self.targets[self.seq % len(self.targets)]
            value = f"{self.stream}:{self.seq}"
            try:
                self.producer.produce(topic, value=value.encode(), key=self.label.encode(),
                                      partition=partition,
                                      on_delivery=lambda err, msg, v=value: self._delivered(v, err, msg))
            except BufferError:
                self._poll(0.1)
                continue
            except KafkaException as e:
                self._fatal_from(e)
                continue
            self.history.send(self.stream, topic, partition, value)
            self.seq += 1
            self._poll(0)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # do not burst to catch up after a stall
        self.undelivered = self._flush(self.producer, self.flush_timeout)
        if self.fatal is not None:  # turned fatal during the final flush
            self.fatal_errors.append({"t": self.history.now(), "stream": self.stream,
                                      "reason": self.fatal})
            self.history.event("producer-fatal", f"{self.stream}: {self.fatal}")
        if self.undelivered:
            self.history.event("producer-undelivered",
                               f"{self.label}: {self.undelivered} records still queued after "
                               f"{self.flush_timeout:.0f}s flush")
        self.finished.set()

    def acked_since(self, t_monotonic: float) -> set[str]:
        """Topics with a successful delivery after `t_monotonic`."""
        with self.lock:
            return {t for t, at in self.last_ack.items() if at > t_monotonic}


class GroupMember(threading.Thread):
    def __init__(self, index: int, group: str, bootstrap: Callable[[], str], topics: list[Topic],
                 manual_commit: bool, history: History, stop: threading.Event):
        super().__init__(name=f"group-member-{index}", daemon=True)
        self.label = f"member{index}"
        self.group = group
        self.bootstrap = bootstrap
        self.topics = topics
        self.manual = manual_commit
        self.history = history
        self.stop = stop
        self.consumed = 0

    def _on_commit(self, err, partitions) -> None:
        for tp in partitions or []:
            error = str(err) if err is not None else (str(tp.error) if tp.error else None)
            self.history.commit(self.label, tp.topic, tp.partition, tp.offset, error)

    def run(self) -> None:
        conf = ck_config(self.bootstrap(), **{
            "group.id": self.group, "auto.offset.reset": "earliest",
            "enable.auto.commit": not self.manual, "auto.commit.interval.ms": 500,
            "on_commit": self._on_commit, "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            "error_cb": lambda e: self.history.event("consumer-error", f"{self.label}: {e}")})
        c = Consumer(conf)
        c.subscribe([t.name for t in self.topics])
        since_commit = 0
        try:
            while not self.stop.is_set():
                for m in c.consume(num_messages=500, timeout=0.5):
                    if m.error() is not None:
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            self.history.event("consumer-error", f"{self.label}: {m.error()}")
                        continue
                    self.history.read(self.label, m.topic(), m.partition(), m.offset(), m.value())
                    self.consumed += 1
                    since_commit += 1
                if self.manual and since_commit >= 200:
                    try:
                        c.commit(asynchronous=True)
                    except Exception as e:  # noqa: BLE001 - e.g. no offset to commit yet
                        self.history.event("consumer-error", f"{self.label}: commit: {e!r}")
                    since_commit = 0
        finally:
            try:
                c.close()
            except Exception as e:  # noqa: BLE001
                self.history.event("consumer-error", f"{self.label}: close: {e!r}")


class Reader(threading.Thread):
    """Every `interval` seconds, reads one topic (in turn) from offset 0 to the
    high watermark seen when the pass starts."""

    def __init__(self, bootstrap: Callable[[], str], topics: list[Topic], history: History,
                 stop: threading.Event, interval: float = 2.0, pass_timeout: float = 20.0):
        super().__init__(name="reader", daemon=True)
        self.bootstrap = bootstrap
        self.topics = topics
        self.history = history
        self.stop = stop
        self.interval = interval
        self.pass_timeout = pass_timeout
        self.passes = 0

    def run(self) -> None:
        c = Consumer(ck_config(self.bootstrap(), **{
            "group.id": "nemesis-reader", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": True}))
        try:
            i = 0
            while not self.stop.wait(self.interval):
                self.read_pass(c, self.topics[i % len(self.topics)])
                i += 1
        finally:
            c.close()

    def read_pass(self, c: Consumer, topic: Topic) -> None:
        doc = {"topic": topic.name, "start": self.history.now(), "high": {}, "read": 0,
               "complete": False, "error": None}
        source = f"reader#{self.passes}"
        self.passes += 1
        try:
            for p in range(topic.partitions):
                _lo, hi = c.get_watermark_offsets(TopicPartition(topic.name, p), timeout=5)
                doc["high"][p] = hi
            todo = {p for p, hi in doc["high"].items() if hi > 0}
            c.assign([TopicPartition(topic.name, p, OFFSET_BEGINNING) for p in sorted(todo)])
            deadline = time.monotonic() + self.pass_timeout
            while todo and time.monotonic() < deadline and not self.stop.is_set():
                for m in c.consume(num_messages=1000, timeout=0.5):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if m.offset() >= doc["high"][m.partition()]:
                                todo.discard(m.partition())
                        else:
                            doc["error"] = str(err)
                        continue
                    if m.partition() not in todo:
                        continue
                    self.history.read(source, m.topic(), m.partition(), m.offset(), m.value())
                    doc["read"] += 1
                    if m.offset() + 1 >= doc["high"][m.partition()]:
                        todo.discard(m.partition())
            doc["complete"] = not todo
        except Exception as e:  # noqa: BLE001 - a pass may fail under faults
            doc["error"] = repr(e)
        finally:
            try:
                c.unassign()
            except Exception:  # noqa: BLE001
                pass
        doc["end"] = self.history.now()
        self.history.read_pass(doc)


class OffsetMonitor(threading.Thread):
    """The group's committed offsets as the broker reports them, every second.

    Uses kafka-python's KafkaAdminClient: librdkafka's AdminClient
    ListConsumerGroupOffsets can abort the whole process when a connection
    drops mid-request (confluentinc/librdkafka#4605, use-after-free in the
    coordinator request error path), which this test provokes all the time.
    """

    def __init__(self, bootstrap: Callable[[], str], group: str, history: History,
                 stop: threading.Event, interval: float = 1.0):
        super().__init__(name="offset-monitor", daemon=True)
        self.bootstrap = bootstrap
        self.group = group
        self.history = history
        self.stop = stop
        self.interval = interval

    def snapshot(self, admin) -> dict[str, int]:
        offsets = admin.list_group_offsets({self.group: None}).get(self.group, {})
        return {f"{tp.topic}/{tp.partition}": om.offset
                for tp, om in offsets.items() if om.offset is not None and om.offset >= 0}

    def run(self) -> None:
        from kafka import KafkaAdminClient

        admin = None
        try:
            while not self.stop.wait(self.interval):
                try:
                    if admin is None:
                        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap().split(","),
                                                 request_timeout_ms=10000,
                                                 client_id="nemesis-offset-monitor")
                    offsets = self.snapshot(admin)
                except Exception as e:  # noqa: BLE001 - unavailable under some faults
                    self.history.event("offset-monitor", repr(e))
                    continue
                if offsets:
                    self.history.group_offset_snapshot(offsets)
        finally:
            if admin is not None:
                try:
                    admin.close()
                except Exception:  # noqa: BLE001
                    pass


class OwnershipMonitor(threading.Thread):
    """Polls `owners()` ({"topic/shard": [owner, epoch]}) and records changes."""

    def __init__(self, owners: Callable[[], Optional[dict[str, list]]], history: History,
                 stop: threading.Event, interval: float = 0.5):
        super().__init__(name="ownership-monitor", daemon=True)
        self.owners = owners
        self.history = history
        self.stop = stop
        self.interval = interval

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                owners = self.owners()
            except Exception:  # noqa: BLE001 - placement may be mid-election
                continue
            if owners:
                self.history.ownership_snapshot(owners)
