"""`object` durability and a standalone node that keeps nothing on its disk
that matters: the binary on the moto S3 emulator that tests/run.sh starts."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse

import pytest

from clients import DeliveryLog, ck_admin, ck_config, ck_consume_all, ck_producer
from harness import ShoalStartError, unique_name, wait_for
from test_s3 import S3_URL, s3_keys

# In CI (CI=true) the harness always provides the emulator: never skip there.
pytestmark = pytest.mark.skipif(
    not S3_URL and not os.environ.get("CI"),
    reason="SHOAL_TEST_S3_URL not set (tests/run.sh sets it)")


def fresh_store() -> tuple[str, str, str]:
    url = urllib.parse.urlparse(S3_URL)
    prefix = f"{url.path.strip('/')}/{unique_name('bucket')}".strip("/")
    return f"s3://{url.netloc}/{prefix}", url.netloc, prefix


def start_ok(shoal) -> bool:
    try:
        shoal.start()
        return True
    except ShoalStartError as e:
        assert "in use" in str(e), str(e)
        return False


def test_restart_after_kill_takes_its_own_lease_back(shoal_factory):
    store, _bucket, _prefix = fresh_store()
    shoal = shoal_factory(object_store=store)  # default 10 s lease
    shoal.start()
    topic = unique_name("ownlease")
    create_object_topic(shoal.bootstrap, topic, 1)
    produce(shoal.bootstrap, topic, [b"x"], 1)
    shoal.kill9()
    shoal.start()  # same disk, same node: no wait for the lease
    got = ck_consume_all(shoal.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"x"]


def create_object_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import NewTopic

    admin = ck_admin(bootstrap)
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                                        config={"shoal.durability": "object"})],
                              request_timeout=30)
    fut[topic].result(timeout=60)


def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int) -> DeliveryLog:
    log = DeliveryLog()
    p = ck_producer(bootstrap, acks="all", **{"linger.ms": 5})
    for i, v in enumerate(values):
        p.produce(topic, value=v, partition=i % partitions, on_delivery=log)
    assert p.flush(60) == 0
    assert not log.errors, log.errors[:5]
    return log


def test_object_durability_acks_only_after_the_object_is_committed(shoal_factory):
    store, bucket, prefix = fresh_store()
    shoal = shoal_factory(object_store=store, flush_interval="200ms")
    shoal.start()
    topic = unique_name("objdur")
    create_object_topic(shoal.bootstrap, topic, 1)
    doc = shoal.stream(topic)
    assert doc["config"]["shoal.durability"] == "object"

    for round_ in range(3):
        log = produce(shoal.bootstrap, topic, [f"r{round_}-{i}".encode() for i in range(20)], 1)
        last = max(off for _, off, _ in log.ok)
        # Checked at once, with no waiting: the acknowledgement implies it.
        doc = shoal.stream(topic)
        shard = doc["shards"][0]
        assert shard["committed_offset"] > last, shard
        objects = {s["object"] for s in shard["segments"] if s["last_offset"] >= last}
        keys = s3_keys(bucket, prefix + "/")
        assert objects and all(any(k.endswith(o) for k in keys) for o in objects), (objects, keys)


def test_lost_local_disk_recovers_from_the_bucket(shoal_factory):
    from confluent_kafka import Consumer, TopicPartition

    store, _bucket, _prefix = fresh_store()
    shoal = shoal_factory(object_store=store, extra_args=["--bucket-lease-ttl", "2s"])
    shoal.start()
    topic = unique_name("lostdisk")
    create_object_topic(shoal.bootstrap, topic, 2)
    values = [f"v{i}".encode() for i in range(200)]
    log = produce(shoal.bootstrap, topic, values, 2)
    group = unique_name("grp")
    c = Consumer(ck_config(shoal.bootstrap, **{"group.id": group, "enable.auto.commit": False}))
    c.commit(offsets=[TopicPartition(topic, 0, 42), TopicPartition(topic, 1, 17)], asynchronous=False)
    c.close()

    shoal.kill9()
    shutil.rmtree(shoal.data_dir)
    # A new disk is a new node: it waits for the dead node's lease to expire.
    wait_for(lambda: start_ok(shoal), 30, "the new node to take the bucket lease", interval=0.5)

    got = ck_consume_all(shoal.bootstrap, topic, [0, 1])
    stored = {(p, m.offset()): m.value() for p, msgs in got.items() for m in msgs}
    for p, off, v in log.ok:
        assert stored.get((p, off)) == v, f"acknowledged {v!r} at {p}/{off} lost"
    assert len(stored) == len(values)

    c = Consumer(ck_config(shoal.bootstrap, **{"group.id": group, "enable.auto.commit": False}))
    committed = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)
    c.close()
    assert {tp.partition: tp.offset for tp in committed} == {0: 42, 1: 17}

    # New records continue the offsets.
    log2 = produce(shoal.bootstrap, topic, [b"after"], 2)
    assert log2.ok[0][1] == 100


def test_second_node_on_the_same_bucket_is_fenced(shoal_factory):
    store, bucket, prefix = fresh_store()
    ttl = ["--bucket-lease-ttl", "2s"]
    first = shoal_factory(name="first", object_store=store, extra_args=ttl)
    first.start()
    topic = unique_name("fence")
    create_object_topic(first.bootstrap, topic, 1)
    produce(first.bootstrap, topic, [b"one", b"two"], 1)

    second = shoal_factory(name="second", object_store=store, extra_args=ttl)
    with pytest.raises(ShoalStartError) as refused:
        second.start()
    assert "in use" in str(refused.value), str(refused.value)
    assert first.is_running() and first.health_status() == 200

    # Idle, the first makes no PUTs and lets its lease lapse; it still
    # answers at the contact URL the lease names, so it keeps the bucket.
    wait_for(lambda: lease_expired(bucket, prefix), 30, "the idle node's lease to lapse", interval=0.5)
    puts = put_count(first)
    with pytest.raises(ShoalStartError) as refused:
        second.start()
    assert "still answers" in str(refused.value), str(refused.value)
    assert put_count(first) == puts
    # Writing again renews it.
    produce(first.bootstrap, topic, [b"three"], 1)

    # Once the first stops renewing, its lease runs out and the second may take over.
    first.kill9()

    wait_for(lambda: start_ok(second), 30, "the second node to take the expired bucket lease", interval=0.5)
    got = ck_consume_all(second.bootstrap, topic, [0])
    assert [m.value() for m in got[0]] == [b"one", b"two", b"three"]


def put_count(shoal) -> float:
    sample = 'shoal_object_store_requests_total{kind="put"}'
    for line in shoal.metrics_text().splitlines():
        if line.startswith(sample):
            return float(line.split()[-1])
    raise AssertionError(f"no {sample} in the metrics")


def lease_expired(bucket: str, prefix: str) -> bool:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/placement/lease.json")["Body"].read()
    return json.loads(body)["expires_ms"] < time.time() * 1000


def test_faults_in_the_object_store_lose_nothing(shoal_factory):
    from faulty_s3 import FaultyS3

    store, _bucket, _prefix = fresh_store()
    upstream = os.environ.get("AWS_ENDPOINT_URL") or os.environ["AWS_ENDPOINT"]
    with FaultyS3(upstream, seed=7) as proxy:
        shoal = shoal_factory(object_store=store,
                              env={"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT": proxy.url})
        shoal.start(timeout=120)
        topic = unique_name("faults")
        create_object_topic(shoal.bootstrap, topic, 3)
        log = DeliveryLog()
        p = ck_producer(shoal.bootstrap, acks="all", **{
            "enable.idempotence": True, "linger.ms": 20, "message.timeout.ms": 120000})
        values = [f"f{i}".encode() for i in range(3000)]
        for v in values:
            while True:
                try:
                    p.produce(topic, value=v, on_delivery=log)
                    break
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
        assert p.flush(180) == 0
        assert not log.errors, log.errors[:5]
        assert shoal.is_running()
        assert proxy.counts["errors"] > 0 and proxy.counts["drops"] > 0, proxy.counts

        # A restart reads everything back through the faulty store (cold reads).
        shoal.restart(timeout=120)
        got = ck_consume_all(shoal.bootstrap, topic, [0, 1, 2], timeout=120)
        stored = {(p_, m.offset()): m.value() for p_, msgs in got.items() for m in msgs}
        for part, off, v in log.ok:
            assert stored.get((part, off)) == v, f"acknowledged {v!r} at {part}/{off} lost"
        assert sorted(stored.values()) == sorted(values)
        assert shoal.is_running()
        assert shoal.rss_bytes() < 1 << 30


def test_store_outage_is_bounded_and_caught_up(shoal_factory):
    """While the store is unreachable, local-durability writes go on up to
    --max-unflushed-bytes, then get a retriable error; the node neither
    crashes nor fences itself, and catches up when the store is back."""
    from faulty_s3 import FaultyS3

    store, _bucket, _prefix = fresh_store()
    upstream = os.environ.get("AWS_ENDPOINT_URL") or os.environ["AWS_ENDPOINT"]
    with FaultyS3(upstream, faults=False) as proxy:
        shoal = shoal_factory(
            object_store=store,
            env={"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT": proxy.url},
            flush_bytes=1 << 20,
            extra_args=["--max-unflushed-bytes", "2MiB", "--bucket-lease-ttl", "2s"])
        shoal.start(timeout=120)
        topic = unique_name("outage")
        from confluent_kafka.admin import NewTopic
        admin = ck_admin(shoal.bootstrap)  # keep it alive until the result
        admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(60)

        proxy.down = True
        log = DeliveryLog()
        p = ck_producer(shoal.bootstrap, acks="all", **{
            "linger.ms": 5, "message.timeout.ms": 300000, "retry.backoff.ms": 200})
        total = 4000
        payload = b"x" * 1024
        for i in range(total):
            p.produce(topic, value=payload + str(i).encode(), on_delivery=log)
            p.poll(0)

        def delivered():
            p.poll(0.1)
            return len(log.ok)

        # Local durability: acknowledged from the WAL while the store is down...
        wait_for(lambda: delivered() >= 1000, 60, "local writes during the outage")
        # ... up to the bound, and the lease lapses without fencing the node.
        wait_for(lambda: "lease lapsed" in shoal.log_text(), 60, "the bucket lease to lapse")
        def bound_reached():
            delivered()
            m = shoal.metrics()
            pending = m.get("shoal_unflushed_bytes", 0)
            assert pending >= 2 << 20, f"{len(log.ok)} delivered, {pending} bytes un-flushed"
            return True
        wait_for(bound_reached, 60, "the un-flushed bound to be reached")
        delivered()
        assert len(log.ok) < total, "nothing bounded the buffer while the store was down"
        assert shoal.is_running() and shoal.health_status() == 200

        proxy.down = False
        assert p.flush(180) == 0
        assert not log.errors, log.errors[:5]
        assert len(log.ok) == total
        shoal.wait_flushed(topic, {0: total}, timeout=120)
        assert shoal.is_running()
        got = ck_consume_all(shoal.bootstrap, topic, [0], timeout=120)
        assert len(got[0]) == total
