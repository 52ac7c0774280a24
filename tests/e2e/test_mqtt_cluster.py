"""MQTT across the brokers of a cluster: subscription routes travel through
placement with the heartbeats, and a publish reaches the brokers whose
clients subscribe to it."""

from __future__ import annotations

import json
import time

import pytest

from clients import ck_consume_all
from cluster import Cluster
from harness import unique_name, wait_for
from paho.mqtt.packettypes import PacketTypes

import paho.mqtt.client as mqtt

from test_mqtt import Mq, mqtt_clients, until, v5_props, wait_offline


@pytest.fixture
def mqtt_cluster(tmp_path, request):
    # A fourth broker waits, for tests that add one later.
    c = Cluster(tmp_path, brokers=4)
    for b in c.brokers:
        b.extra_args += ["--mqtt-addr", f"127.0.0.1:{b.mqtt_port}"]
    request.node._shoal_instances = c.processes
    made: list[Mq] = []

    def client(broker: int, client_id: str | None = None, **kw) -> Mq:
        m = Mq(c.broker(broker).mqtt_port, client_id or unique_name("c"), **kw)
        made.append(m)
        return m

    try:
        c.start(brokers=3)
        yield c, client
    finally:
        for m in made:
            try:
                m.close()
            except Exception:  # noqa: BLE001 - teardown
                pass
        c.cleanup()


def probe_until(pub: Mq, topic: str, done, what: str, qos: int = 0,
                timeout: float = 20.0) -> int:
    """Publish numbered probes to `topic` until `done()`: the routes have
    arrived. Returns how many were sent."""
    n = 0

    def sent_and_done() -> bool:
        nonlocal n
        n += 1
        assert pub.publish(topic, f"probe-{n}".encode(), qos=qos) == 0
        return bool(done())

    wait_for(sent_and_done, timeout, what, interval=0.05 if qos == 0 else 0.2)
    return n


def probe_until_received(pub: Mq, sub: Mq, topic: str, what: str, timeout: float = 20.0) -> None:
    """Publish QoS 0 probes until `sub` gets one."""
    probe_until(pub, topic, lambda: sub.received(topic), what, timeout=timeout)


def test_a_subscriber_on_one_broker_gets_a_publish_on_another(mqtt_cluster):
    _c, client = mqtt_cluster
    sub = client(1)
    sub.connected()
    assert sub.subscribe([("cross/#", 1)]) == [1]
    pub = client(3)
    pub.connected()
    probe_until_received(pub, sub, "cross/probe", "the route from broker 1 to reach broker 3")

    sent = [f"m-{i}".encode() for i in range(20)]
    for v in sent:
        assert pub.publish("cross/data", v, qos=1) == 0
    until(lambda: len(sub.received("cross/data")) >= 20, "20 forwarded messages")
    # Each once, in order (one publisher, one forwarding path).
    assert [m.payload for m in sub.received("cross/data")] == sent
    # A subscriber on the publisher's own broker gets them too, once.
    local = client(3)
    local.connected()
    assert local.subscribe([("cross/data", 0)]) == [0]
    assert pub.publish("cross/data", b"both", qos=1) == 0
    until(lambda: local.received("cross/data"), "the local delivery")
    until(lambda: [m.payload for m in sub.received("cross/data")][-1:] == [b"both"],
          "the forwarded delivery")
    assert [m.payload for m in local.received("cross/data")] == [b"both"]


def test_shared_subscription_balances_across_brokers_and_survives_a_kill(mqtt_cluster):
    c, client = mqtt_cluster
    m1 = client(1)
    m1.connected()
    m2 = client(2)
    m2.connected()
    assert m1.subscribe([("$share/grp/sh/#", 1)]) == [1]
    assert m2.subscribe([("$share/grp/sh/#", 1)]) == [1]
    pub = client(3)
    pub.connected()

    # Both members' routes known on broker 3: each has received a probe.
    n = probe_until(pub, "sh/probe",
                    lambda: m1.received("sh/probe") and m2.received("sh/probe"),
                    "both group members to get probes")
    probes = len(m1.received("sh/probe")) + len(m2.received("sh/probe"))
    assert probes <= n  # never one probe to both members

    sent = [f"s-{i}".encode() for i in range(40)]
    for v in sent:
        assert pub.publish("sh/data", v, qos=1) == 0
    got = lambda: [m.payload for m in m1.received("sh/data")] + [m.payload for m in m2.received("sh/data")]  # noqa: E731
    until(lambda: len(got()) >= 40, "the 40 shared messages")
    # Each message to exactly one member, and both members take a share.
    assert sorted(got()) == sorted(sent)
    assert m1.received("sh/data") and m2.received("sh/data")

    # Broker 2 dies: once its routes are gone, the group is served by m1.
    c.broker(2).kill9()
    before = len(m1.received("sh/data"))
    k = 0

    def m1_takes_all() -> bool:
        """Five more messages, all at m1 within two seconds."""
        nonlocal k
        batch = []
        for _ in range(5):
            k += 1
            batch.append(f"a{k}".encode())
            assert pub.publish("sh/after", batch[-1], qos=1) == 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if set(batch) <= {m.payload for m in m1.received("sh/after")}:
                return True
            time.sleep(0.05)
        return False

    until(m1_takes_all, "the group's messages to go to the member left", timeout=30)
    assert len(m1.received("sh/data")) == before


def test_a_persistent_session_resumes_on_another_broker(mqtt_cluster):
    c, client = mqtt_cluster
    cid = unique_name("roam")
    expiry = v5_props(PacketTypes.CONNECT, SessionExpiryInterval=600)
    first = client(1, cid)
    assert first.connected(clean_start=False, properties=expiry).session_present is False
    assert first.subscribe([("roam/#", 1)]) == [1]
    pub = client(3)
    pub.connected()
    probe_until_received(pub, first, "roam/probe", "the route from broker 1 to reach broker 3")
    first.disconnect()
    wait_offline(c.broker(1), cid)

    # Queued on broker 1 for the session while its client is away.
    sent = [f"q-{i}".encode() for i in range(10)]
    for v in sent:
        assert pub.publish("roam/data", v, qos=1) == 0
    until(lambda: mqtt_clients(c.broker(1)).get(cid, {}).get("queued") == 10,
          "broker 1 to queue the 10 messages")

    # The client comes back on broker 2: the session, with its queue, moves.
    back = client(2, cid)
    ack = back.connected(clean_start=False, properties=expiry)
    assert ack.session_present is True
    until(lambda: back.payloads("roam/data") == sent, "the queued messages on broker 2")
    assert all(m.qos == 1 for m in back.received("roam/data"))
    assert cid not in mqtt_clients(c.broker(1))
    assert mqtt_clients(c.broker(2))[cid]["connected"] is True

    # Its subscription moved too: publishes reach it on broker 2.
    probe_until_received(pub, back, "roam/probe2", "the route from broker 2 to reach broker 3")
    assert pub.publish("roam/data", b"after", qos=1) == 0
    back.wait_payload(b"after")

    # Taken over from another broker while connected: 0x8E, as on one broker.
    again = client(1, cid)
    assert again.connected(clean_start=False, properties=expiry).session_present is True
    assert back.wait_disconnected() == 0x8E
    assert cid not in mqtt_clients(c.broker(2))

    # Clean Start on another broker ends the session where it was, and its
    # connection there (0x8E).
    fresh = client(2, cid)
    assert fresh.connected(clean_start=True, properties=expiry).session_present is False
    assert again.wait_disconnected() == 0x8E
    until(lambda: cid not in mqtt_clients(c.broker(1)), "the session to end on broker 1")
    fresh.disconnect()
    again = client(1, cid)
    assert again.connected(clean_start=False, properties=expiry).session_present is True
    assert mqtt_clients(c.broker(1))[cid]["subscriptions"] == 0

    # Another user's client id is refused, not handed over.
    thief = client(3, cid)
    ack = thief.connect(clean_start=False, properties=expiry, username="someone-else",
                        password="x")
    assert ack.rc == 0x87
    assert mqtt_clients(c.broker(1))[cid]["connected"] is True

    # MQTT 3.1.1 sessions (Clean Session 0) move the same way.
    v3 = unique_name("roam3")
    a = client(1, v3, version=mqtt.MQTTv311, clean_session=False)
    a.connected()
    assert a.subscribe([("roam3/#", 1)]) == [1]
    a.disconnect()
    wait_offline(c.broker(1), v3)
    b = client(3, v3, version=mqtt.MQTTv311, clean_session=False)
    assert b.connected().session_present is True
    assert mqtt_clients(c.broker(3))[v3]["subscriptions"] == 1
    assert v3 not in mqtt_clients(c.broker(1))


def test_retained_messages_are_the_same_on_every_broker(mqtt_cluster):
    c, client = mqtt_cluster
    topic = unique_name("ret") + "/state"
    pub = client(1)
    pub.connected()
    assert pub.publish(topic, b"on", qos=1, retain=True) == 0

    # Brokers 2 and 3 have it for subscribers that come later.
    def retained_at(broker: int) -> list[tuple[bytes, bool]]:
        """What a new subscriber on `broker` gets before a fence message that
        it publishes itself after subscribing (retained messages come first)."""
        s = client(broker)
        s.connected()
        assert s.subscribe([(topic, 1)]) == [1]
        fence = f"fence-{unique_name('f')}".encode()
        assert s.publish(topic, fence, qos=1) == 0
        s.wait_payload(fence)
        got = []
        for m in s.received(topic):
            if m.payload == fence:
                break
            got.append((m.payload, m.retain))
        s.close()
        return got

    until(lambda: retained_at(2) == [(b"on", True)], "broker 2 to have the retained message",
          timeout=20)
    assert retained_at(3) == [(b"on", True)]

    # Replaced and then cleared on broker 3: every broker follows.
    assert pub.publish(topic, b"off", qos=1, retain=True) == 0
    until(lambda: retained_at(3) == [(b"off", True)], "the replacement on broker 3")
    clear = client(3)
    clear.connected()
    assert clear.publish(topic, b"", qos=1, retain=True) == 0
    until(lambda: retained_at(1) == [] and retained_at(2) == [], "the clear on brokers 1 and 2",
          timeout=20)

    # A broker that starts later takes the retained messages of the others.
    assert pub.publish(topic, b"late", qos=1, retain=True) == 0
    until(lambda: retained_at(2) == [(b"late", True)], "the message on broker 2")
    c.add_broker(4)
    until(lambda: retained_at(4) == [(b"late", True)],
          "the new broker 4 to have the retained message", timeout=30)


def test_persisted_publishes_reach_their_shard_from_any_broker(mqtt_cluster):
    """An MQTT client cannot choose the partition leader: the broker it is
    connected to sends a mapped publish to the shard's owner."""
    c, client = mqtt_cluster
    stream = unique_name("fleet")
    rule = {"filter": "fleet/#", "stream": stream, "shards": 6}
    resp = c.broker(1).http("/api/v1/mqtt/persist", "PUT", json.dumps(rule).encode())
    assert resp.status == 200, resp.text
    # Placement spreads the shards over the brokers it sees live (at least
    # two); a broker owning none sends all of its publishes to the owners.
    until(lambda: None not in c.owners(stream).values() and len(c.owners(stream)) == 6
          and len(set(c.owners(stream).values())) >= 2,
          "the 6 shards to be owned by at least 2 brokers", timeout=30)
    owners = c.owners(stream)

    def keys_in_stream() -> dict[bytes, list]:
        by_key: dict[bytes, list] = {}
        for part, msgs in ck_consume_all(c.bootstrap(), stream, range(6)).items():
            for m in msgs:
                by_key.setdefault(m.key(), []).append((part, m.value()))
        return by_key

    pubs = {b: client(b) for b in (1, 2, 3)}
    for p in pubs.values():
        p.connected()
    # Each broker picks the rule up within about a second: probe until each
    # one's QoS 1 publish is in the stream.
    n = 0

    def rule_applied_everywhere() -> bool:
        nonlocal n
        n += 1
        for b, p in pubs.items():
            assert p.publish(f"fleet/probe/{b}", str(n).encode(), qos=1) == 0
        keys = keys_in_stream()
        return all(f"fleet/probe/{b}".encode() in keys for b in pubs)

    until(rule_applied_everywhere, "every broker to persist to the stream", timeout=30)

    # Three records per topic, one after another: each topic's records are
    # in its shard once each, in the order they were published.
    for j in range(3):
        for b, p in pubs.items():
            for i in range(20):
                assert p.publish(f"fleet/b{b}/t{i}", f"v{b}-{i}-{j}".encode(), qos=1) == 0
    keys = keys_in_stream()
    for b in pubs:
        for i in range(20):
            assert [v for _, v in keys[f"fleet/b{b}/t{i}".encode()]] == \
                [f"v{b}-{i}-{j}".encode() for j in range(3)]
        # Some of each broker's topics belong to shards another broker owns.
        shards = {keys[f"fleet/b{b}/t{i}".encode()][0][0] for i in range(20)}
        assert any(owners[s] != b for s in shards), (b, shards, owners)


def murmur2(data: bytes) -> int:
    """Kafka's default partitioner hash (the state stream's shard of a client)."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = data[4 * n4:]
    if len(rest) >= 3:
        h ^= rest[2] << 16
    if len(rest) >= 2:
        h ^= rest[1] << 8
    if rest:
        h ^= rest[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def state_shard(client_id: str, shards: int) -> int:
    return (murmur2(client_id.encode()) & 0x7FFFFFFF) % shards


def test_a_persistent_session_survives_the_crash_of_its_broker(mqtt_cluster):
    c, client = mqtt_cluster
    expiry = v5_props(PacketTypes.CONNECT, SessionExpiryInterval=600)

    def connect_persistent(broker: int, cid: str):
        """Connect without Clean Start until accepted. A CONNECT that cannot
        look its session up (a broker that may hold it does not answer, or a
        state shard is not open yet) is refused with 0x88 (server
        unavailable), never given a new session; the client tries again."""
        resumed: list = []

        def attempt() -> bool:
            m = client(broker, cid)
            ack = m.connect(clean_start=False, properties=expiry)
            if ack.rc == 0:
                resumed.append((m, ack))
                return True
            assert ack.rc == 0x88, hex(ack.rc)
            m.close()
            return False

        wait_for(attempt, 60, f"broker {broker} to accept {cid}", interval=0.5)
        return resumed[0]

    # The first persistent session creates the state stream.
    connect_persistent(1, unique_name("boot"))
    until(lambda: len(c.owners("__mqtt_state")) == 4
          and None not in c.owners("__mqtt_state").values(), "the state stream's 4 shards")
    owners = c.owners("__mqtt_state")
    # One client whose state shard broker 1 owns (it moves when broker 1
    # dies), one whose shard broker 3 owns (it stays).
    picked = {}
    for i in range(10_000):
        cid = f"{unique_name('crash')}-{i}"
        owner = owners[state_shard(cid, 4)]
        if owner in (1, 3) and owner not in picked:
            picked[owner] = cid
        if len(picked) == 2:
            break
    assert set(picked) == {1, 3}, owners
    cids = [picked[1], picked[3]]
    for cid in cids:
        first, ack = connect_persistent(1, cid)
        assert ack.session_present is False
        assert first.subscribe([("crash/#", 1)]) == [1]
        first.disconnect()
        wait_offline(c.broker(1), cid)
    # Published on the sessions' broker: each PUBACK waits until the copies
    # queued for the sessions are durable in the state stream.
    pub = client(1)
    pub.connected()
    sent = [f"k-{i}".encode() for i in range(5)]
    for v in sent:
        assert pub.publish("crash/data", v, qos=1) == 0
    c.broker(1).kill9()

    # Once broker 1 is gone, the owner of each session's state shard holds
    # it (one broker only), so messages published meanwhile are queued.
    def holders(cid: str) -> list[int]:
        return [b for b in (2, 3) if cid in mqtt_clients(c.broker(b))]
    for cid in cids:
        until(lambda: holders(cid), f"a live broker to take {cid} over", timeout=60)
    assert holders(picked[3]) == [3]
    held = {cid: holders(cid) for cid in cids}
    assert all(len(h) == 1 for h in held.values()), held
    for cid in cids:
        assert mqtt_clients(c.broker(held[cid][0]))[cid]["queued"] == 5
    pub3 = client(3)
    pub3.connected()
    probe_until(pub3, "crash/probe",
                lambda: all(mqtt_clients(c.broker(held[cid][0]))[cid]["queued"] > 5
                            for cid in cids),
                "publishes on broker 3 to reach the sessions", qos=1)
    assert pub3.publish("crash/data", b"late", qos=1) == 0

    # The clients come back on broker 2.
    for cid in cids:
        back, ack = connect_persistent(2, cid)
        assert ack.session_present is True
        until(lambda: back.payloads("crash/data") == sent + [b"late"],
              f"{cid}'s queued messages, from before the crash and after it")
        assert holders(cid) == [2]
        assert mqtt_clients(c.broker(2))[cid]["subscriptions"] == 1
