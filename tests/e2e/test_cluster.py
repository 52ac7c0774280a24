"""The distributed Shoal: three placement nodes and three brokers as separate
processes (cluster.py), real Kafka clients, kill -9 and SIGSTOP."""

from __future__ import annotations

import os
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from cluster import S3_URL, Cluster
from harness import unique_name, wait_for
from kafka_wire import (
    RawConnection,
    Record,
    encode_record_batch,
    find_coordinator,
    pick_produce_version,
)

NOT_LEADER_OR_FOLLOWER = 6


@pytest.fixture
def cluster(tmp_path, request):
    c = Cluster(tmp_path)
    request.node._shoal_instances = c.processes
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


def create_topic(bootstrap: str, topic: str, partitions: int, durability: str = "object") -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                                        config={"shoal.durability": durability})],
                              request_timeout=30)
    fut[topic].result(timeout=60)


class Acked:
    """Delivery reports of an idempotent producer, per partition in order."""

    def __init__(self):
        self.by_partition: dict[int, list[tuple[int, bytes]]] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, err, msg):
        with self.lock:
            if err is not None:
                self.errors.append(str(err))
            else:
                self.by_partition.setdefault(msg.partition(), []).append((msg.offset(), msg.value()))

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.by_partition.values())


def producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                     "linger.ms": 5, "message.timeout.ms": 120000})


def produce_for(p: Producer, topic: str, partitions: int, acked: Acked, stop: threading.Event,
                sent: list[int]) -> None:
    i = 0
    while not stop.is_set():
        p.produce(topic, value=f"r{i}".encode(), partition=i % partitions, on_delivery=acked)
        i += 1
        p.poll(0)
        time.sleep(0.002)
    sent.append(i)


def start_producing(bootstrap: str, topic: str):
    """An idempotent producer writing to 6 partitions in a thread until
    `stop` is set; `sent` gets the number of records produced."""
    acked, stop, sent = Acked(), threading.Event(), []
    p = producer(bootstrap)
    t = threading.Thread(target=produce_for, args=(p, topic, 6, acked, stop, sent))
    t.start()
    return p, acked, stop, sent, t


def all_acknowledged(p: Producer, acked: Acked, sent: list[int]) -> None:
    """After `start_producing`'s thread stopped: every record it sent was
    acknowledged, none failed."""
    assert p.flush(120) == 0
    assert not acked.errors, acked.errors[:5]
    assert acked.count() == sent[0]


def read_all(bootstrap: str, topic: str, partitions: int, expected: int,
             timeout: float = 90) -> dict[int, list[tuple[int, bytes]]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("check"),
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: dict[int, list[tuple[int, bytes]]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and sum(len(v) for v in got.values()) < expected:
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, f"reading {topic}: {m.error()}"
            got.setdefault(m.partition(), []).append((m.offset(), m.value()))
    finally:
        c.close()
    return got


def assert_exactly_once_in_order(acked: Acked, got: dict[int, list[tuple[int, bytes]]]) -> None:
    for part, records in got.items():
        offsets = [o for o, _ in records]
        assert offsets == list(range(len(offsets))), f"partition {part}: offsets not dense from 0"
        values = [v for _, v in records]
        assert len(values) == len(set(values)), f"partition {part}: a record appears twice"
        seq = [int(v[1:]) for v in values]
        assert seq == sorted(seq), f"partition {part}: records out of order"
    for part, records in acked.by_partition.items():
        have = dict(got.get(part, []))
        for off, val in records:
            assert have.get(off) == val, f"acknowledged {val!r} at {part}/{off} is missing"


def index_is_clean(c: Cluster, topic: str) -> None:
    """No duplicate or conflicting offset in placement's segment index."""
    for sh in c.stream_index(topic)["shards"]:
        expected = 0
        last_epoch = 0
        for seg in sh["segments"]:
            assert seg["first_offset"] == expected, f"shard {sh['shard']}: gap or overlap at {seg}"
            assert seg["epoch"] >= last_epoch, f"shard {sh['shard']}: epoch went back at {seg}"
            expected = seg["last_offset"] + 1
            last_epoch = seg["epoch"]
        assert expected == sh["committed_offset"]


def test_metadata_lists_every_broker_and_leader(cluster):
    topic = unique_name("meta")
    create_topic(cluster.brokers[0].bootstrap, topic, 6)
    for b in cluster.brokers:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})

        def leaders():
            md = admin.list_topics(topic, timeout=10)
            assert sorted(md.brokers) == [1, 2, 3]
            got = {p.id: p.leader for p in md.topics[topic].partitions.values()}
            assert sorted(got) == list(range(6))
            return got if -1 not in got.values() else None
        # Each broker learns the assignment at its next heartbeat.
        got = wait_for(leaders, 10, f"{b.name} to know every partition's leader")
        assert set(got.values()) == {1, 2, 3}, got
    # A produce sent straight to a broker that does not lead the partition
    # is refused with NOT_LEADER_OR_FOLLOWER.
    first = cluster.brokers[0]
    owners = cluster.owners(topic)
    elsewhere = next(part for part, owner in owners.items() if owner != first.node_id)
    with RawConnection("127.0.0.1", first.kafka_port) as conn:
        version = pick_produce_version(conn.api_versions())
        [r] = conn.produce(version, topic, elsewhere, encode_record_batch([Record(value=b"x")]))
    assert r.error_code == NOT_LEADER_OR_FOLLOWER, r
    # A client bootstrapped on that one broker still reaches every leader.
    p = producer(first.bootstrap)
    acked = Acked()
    for i in range(60):
        p.produce(topic, value=f"r{i}".encode(), partition=i % 6, on_delivery=acked)
    assert p.flush(60) == 0
    assert acked.count() == 60 and not acked.errors


def test_broker_kill_fails_over_without_loss(cluster):
    topic = unique_name("failover")
    create_topic(cluster.bootstrap(), topic, 6)
    leader0 = cluster.owners(topic)[0]
    victim = cluster.broker(leader0)
    others = [b.bootstrap for b in cluster.brokers if b is not victim]

    p, acked, stop, sent, t = start_producing(",".join(others), topic)
    try:
        wait_for(lambda: acked.count() > 500, 60, "records acknowledged before the kill")
        before = acked.count()
        victim.kill9()
        # Partition 0 moves to a live broker and producing goes on.
        wait_for(lambda: cluster.owners(topic)[0] not in (None, leader0), 30,
                 "partition 0 to get a new leader")
        wait_for(lambda: len(acked.by_partition.get(0, [])) > before // 6 + 100, 60,
                 "partition 0 to take writes again after the failover")
    finally:
        stop.set()
        t.join()
    all_acknowledged(p, acked, sent)
    got = read_all(",".join(others), topic, 6, acked.count())
    assert_exactly_once_in_order(acked, got)
    index_is_clean(cluster, topic)


def test_placement_leader_kill_elects_a_new_one(cluster):
    topic = unique_name("before")
    bootstrap = cluster.bootstrap()
    create_topic(bootstrap, topic, 3)
    group = unique_name("g")
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, 0, 7)], asynchronous=False)

    old = cluster.leader()
    old_term = old.status()["term"]
    old.kill9()
    new = wait_for(lambda: (lambda l: l if l is not old else None)(cluster.leader()), 30,
                   "a new placement leader")
    assert new.status()["term"] > old_term

    # Writes work again within seconds: a topic creation and an offset commit.
    started = time.monotonic()
    after = unique_name("after")
    wait_for(lambda: create_topic(bootstrap, after, 2) is None, 30, "a topic creation",
             ignore=(KafkaException, Exception))
    c.commit(offsets=[TopicPartition(topic, 1, 9)], asynchronous=False)
    assert time.monotonic() - started < 20
    committed = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)
    assert [tp.offset for tp in committed] == [7, 9]
    c.close()
    # Nothing committed before the election was lost.
    names = {s["name"] for s in new.cluster()["streams"]}
    assert {topic, after} <= names

    # The old leader rejoins as a follower and catches up.
    old.spawn()
    wait_for(lambda: old.status()["leader_id"] == new.node_id, 60, "the old leader to rejoin")
    wait_for(lambda: {topic, after} <= {s["name"] for s in old.cluster()["streams"]}, 30,
             "the old leader to catch up")


def test_paused_broker_writes_nothing_after_its_lease_moved(cluster):
    topic = unique_name("paused")
    create_topic(cluster.bootstrap(), topic, 6)
    owner0 = cluster.owners(topic)[0]
    paused = cluster.broker(owner0)
    others = [b.bootstrap for b in cluster.brokers if b is not paused]

    # The producer knows every broker, the paused one included.
    p, acked, stop, sent, t = start_producing(cluster.bootstrap(), topic)
    try:
        wait_for(lambda: acked.count() > 300, 60, "records acknowledged before the pause")
        # Shards may have moved while the topic was created: count from here.
        fenced = paused.metrics().get("shoal_shards_fenced_total", 0)
        logged = paused.log_text().count("shard moved away")
        paused.pause()
        wait_for(lambda: owner0 not in cluster.live_brokers(), 30,
                 "the paused broker to miss its session timeout")
        wait_for(lambda: owner0 not in cluster.owners(topic).values(), 30,
                 "its shards to move")
        moved = acked.count()
        wait_for(lambda: acked.count() > moved + 300, 60, "writes to the new owners")
        paused.resume()
        # The woken broker learns its shards moved and stops serving them:
        # its own metrics and log say so.
        wait_for(lambda: paused.health_status() == 200, 30, "the paused broker to answer")
        wait_for(lambda: paused.metrics().get("shoal_shards_fenced_total", 0) > fenced, 30,
                 "the paused broker to fence the shards it lost")
        assert paused.log_text().count("shard moved away") > logged
        resumed = acked.count()
        wait_for(lambda: acked.count() > resumed + 300, 60, "writes after the resume")
    finally:
        stop.set()
        t.join()
    assert p.flush(120) == 0
    assert not acked.errors, acked.errors[:5]
    index_is_clean(cluster, topic)
    got = read_all(",".join(others), topic, 6, acked.count())
    assert_exactly_once_in_order(acked, got)


def test_consumer_group_survives_a_broker_failure(cluster):
    topic = unique_name("group")
    create_topic(cluster.bootstrap(), topic, 6)
    group = unique_name("g")
    total = 3000
    p = producer(cluster.bootstrap())
    for i in range(total // 2):
        p.produce(topic, value=f"r{i}".encode(), partition=i % 6)
    assert p.flush(60) == 0

    seen: set[bytes] = set()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def member(bootstrap: str):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                      "auto.offset.reset": "earliest", "enable.auto.commit": True,
                      "auto.commit.interval.ms": 200, "session.timeout.ms": 10000,
                      "heartbeat.interval.ms": 500})
        c.subscribe([topic])
        try:
            while not stop.is_set():
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error():
                    # The only errors a killed broker may cause are losing
                    # the connection to it; anything else fails the test.
                    if m.error().code() not in TRANSPORT_ERRORS:
                        errors.append(str(m.error()))
                    continue
                with lock:
                    seen.add(m.value())
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    # Each member bootstraps from a different broker.
    threads = [threading.Thread(target=member, args=(b.bootstrap,)) for b in cluster.brokers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) >= total // 2, 90, "the group to consume the first half")
        # Kill the broker coordinating the group.
        victim = cluster.broker(group_coordinator(cluster, group))
        victim.kill9()
        live = [b for b in cluster.brokers if b is not victim]
        p2 = producer(",".join(b.bootstrap for b in live))
        for i in range(total // 2, total):
            p2.produce(topic, value=f"r{i}".encode(), partition=i % 6)
        assert p2.flush(120) == 0
        wait_for(lambda: len(seen) >= total, 120, "the group to consume everything")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert seen == {f"r{i}".encode() for i in range(total)}


TRANSPORT_ERRORS = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}


def group_coordinator(cluster: Cluster, group: str) -> int:
    """The node id coordinating `group`, as FindCoordinator answers it."""
    return wait_for(lambda: find_coordinator(cluster.brokers[0].bootstrap, group), 30,
                    f"the coordinator of {group}", ignore=(ValueError, OSError))


def test_placement_nodes_are_added_and_removed(cluster, tmp_path):
    from cluster import PlacementNode
    from harness import free_port, http_request
    import json

    peers = {p.node_id: p.http_port for p in cluster.placements}
    peers[4] = free_port()
    fourth = PlacementNode(tmp_path / "p4", node_id=4, peers=peers)
    cluster.placements.append(fourth)
    fourth.spawn()
    topic = unique_name("members")
    create_topic(cluster.bootstrap(), topic, 1)

    def change(body: dict) -> dict:
        leader = cluster.leader()
        resp = http_request(f"{leader.http_base}/placement/v1/members", method="POST",
                            body=json.dumps(body).encode(), timeout=30)
        assert resp.status == 200, resp.text
        return resp.json()

    status = change({"add": {"id": 4, "addr": fourth.http_addr}})
    assert sorted(int(k) for k in status["membership"]) == [1, 2, 3, 4]
    # The new voter has the whole state.
    wait_for(lambda: topic in {s["name"] for s in fourth.cluster()["streams"]}, 30,
             "the new node to catch up")
    status = change({"remove": 4})
    assert sorted(int(k) for k in status["membership"]) == [1, 2, 3]
    # Writes go on without it.
    create_topic(cluster.bootstrap(), unique_name("after"), 1)


def test_broker_restarted_at_once_keeps_its_local_records(cluster):
    """kill -9 and an immediate restart (inside the session timeout): the
    broker takes its shards back with new epochs and replays its WAL, so a
    `local` topic loses nothing it acknowledged."""
    topic = unique_name("restart")
    create_topic(cluster.bootstrap(), topic, 3, durability="local")
    owner = cluster.owners(topic)[0]
    victim = cluster.broker(owner)
    # A long flush interval keeps the records in the WAL only.
    victim.stop()
    victim.flush_interval = "60s"
    victim.start()
    wait_for(lambda: cluster.owners(topic)[0] == owner, 30, "the broker to own partition 0")
    epochs = {sh["shard"]: sh["epoch"] for sh in cluster.stream_index(topic)["shards"]}
    p = Producer({"bootstrap.servers": victim.bootstrap, "acks": "all", "linger.ms": 0})
    acked = Acked()
    for i in range(300):
        p.produce(topic, value=f"r{i}".encode(), partition=0, on_delivery=acked)
    assert p.flush(60) == 0 and acked.count() == 300 and not acked.errors
    assert next(sh for sh in cluster.stream_index(topic)["shards"]
                if sh["shard"] == 0)["committed_offset"] == 0, "flushed already"
    victim.kill9()
    victim.start()
    # Still the owner, under a new epoch.
    shard0 = wait_for(lambda: next((sh for sh in cluster.stream_index(topic)["shards"]
                                    if sh["shard"] == 0 and sh["owner"] == owner
                                    and sh["epoch"] > epochs[0]), None), 30,
                      "the restarted broker to take partition 0 back")
    assert shard0["owner"] == owner
    got = read_all(cluster.bootstrap(), topic, 1, 300)
    assert_exactly_once_in_order(acked, got)
    assert len(got[0]) == 300


def shard_views(c: Cluster, topic: str) -> dict[int, dict]:
    for s in c.view()["streams"]:
        if s["name"] == topic:
            return {sh["shard"]: sh for sh in s["shards"]}
    return {}


def test_a_handoff_the_owner_cannot_finish_is_withdrawn_not_forced(tmp_path, request):
    """A broker joins while the object store is down: the controller asks an
    owner to hand it a shard, but the owner cannot commit its `local`
    records. The shard keeps taking writes while the handoff is pending,
    the handoff is withdrawn with owner and epoch unchanged, the shard takes
    writes after that, nothing acknowledged is lost, and once the store is
    back a handoff moves a shard to the new broker."""
    from faulty_s3 import FaultyS3

    if not S3_URL:
        assert not os.environ.get("CI"), "CI is set but SHOAL_TEST_S3_URL is not"
        pytest.skip("needs the S3 emulator (SHOAL_TEST_S3_URL); tests/run.sh starts one")
    upstream = os.environ.get("AWS_ENDPOINT_URL") or os.environ["AWS_ENDPOINT"]
    with FaultyS3(upstream, faults=False) as proxy:
        c = Cluster(tmp_path)
        request.node._shoal_instances = c.processes
        # The two first brokers reach the store through the proxy; the one
        # that joins goes direct, so only the owners see the outage.
        for b in c.brokers[:2]:
            b.env.update({"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT": proxy.url})
        try:
            c.start(brokers=2)
            topic = unique_name("handoff")
            create_topic(c.bootstrap(), topic, 6, durability="local")
            owners = c.owners(topic)
            assert set(owners.values()) == {1, 2}, owners
            p, acked, stop, sent, t = start_producing(c.bootstrap(), topic)
            try:
                wait_for(lambda: acked.count() > 300, 60, "records acknowledged")
                proxy.down = True
                c.add_broker(3)
                asked = wait_for(lambda: next((sh for sh in shard_views(c, topic).values()
                                               if sh.get("handoff_to") == 3), None), 30,
                                 "the controller to ask for a handoff to broker 3")
                shard = asked["shard"]
                # While the handoff is pending the shard still takes writes.
                n = len(acked.by_partition.get(shard, []))
                wait_for(lambda: len(acked.by_partition.get(shard, [])) > n + 50, 30,
                         f"partition {shard} to take writes with the handoff pending")
                assert shard_views(c, topic)[shard].get("handoff_to") == 3
                wait_for(lambda: shard_views(c, topic)[shard].get("handoff_to") is None, 40,
                         "the handoff to be withdrawn")
                after = shard_views(c, topic)[shard]
                assert (after["owner"], after["epoch"]) == (asked["owner"], asked["epoch"]), after
                assert c.owners(topic) == owners
                # Still taking writes, with the store still down.
                n = len(acked.by_partition.get(shard, []))
                wait_for(lambda: len(acked.by_partition.get(shard, [])) > n + 50, 30,
                         f"partition {shard} to take writes after the withdrawal")
                proxy.down = False
                wait_for(lambda: 3 in c.owners(topic).values(), 90,
                         "a shard to reach broker 3 once the store is back")
            finally:
                stop.set()
                t.join()
            all_acknowledged(p, acked, sent)
            got = read_all(c.bootstrap(), topic, 6, acked.count())
            assert_exactly_once_in_order(acked, got)
            index_is_clean(c, topic)
        finally:
            c.cleanup()
