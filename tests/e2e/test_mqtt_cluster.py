"""MQTT across the brokers of a cluster: subscription routes travel through
placement with the heartbeats, and a publish reaches the brokers whose
clients subscribe to it."""

from __future__ import annotations

import time

import pytest

from cluster import Cluster
from harness import unique_name
from test_mqtt import Mq, until


@pytest.fixture
def mqtt_cluster(tmp_path, request):
    c = Cluster(tmp_path)
    for b in c.brokers:
        b.extra_args += ["--mqtt-addr", f"127.0.0.1:{b.mqtt_port}"]
    request.node._shoal_instances = c.processes
    made: list[Mq] = []

    def client(broker: int, client_id: str | None = None, **kw) -> Mq:
        m = Mq(c.broker(broker).mqtt_port, client_id or unique_name("c"), **kw)
        made.append(m)
        return m

    try:
        c.start()
        yield c, client
    finally:
        for m in made:
            try:
                m.close()
            except Exception:  # noqa: BLE001 - teardown
                pass
        c.cleanup()


def probe_until_received(pub: Mq, sub: Mq, topic: str, what: str, timeout: float = 20.0) -> None:
    """Publish QoS 0 probes until `sub` gets one: the routes have arrived."""
    n = 0

    def got() -> bool:
        nonlocal n
        n += 1
        pub.publish(topic, f"probe-{n}".encode(), qos=0)
        return bool(sub.received(topic))

    until(got, what, timeout=timeout)


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
    n = 0

    def both_reached() -> bool:
        nonlocal n
        n += 1
        pub.publish("sh/probe", f"p{n}".encode(), qos=0)
        return bool(m1.received("sh/probe")) and bool(m2.received("sh/probe"))

    until(both_reached, "both group members to get probes", timeout=20)
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
