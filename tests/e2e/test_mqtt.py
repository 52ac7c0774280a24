"""The MQTT listener (MQTT 3.1.1 and 5.0): connection handshake, sessions,
QoS, retained messages, wills, subscriptions, v5 properties, limits, access
control, persistence of MQTT topics into streams (and back from Kafka), and
the MQTT admin API and metrics.

Clients: paho-mqtt 2.x, mosquitto_pub / mosquitto_sub, and a raw socket
client (`Raw`) for what a well-behaved library will not send (unknown
protocol levels, malformed packets, an abrupt close without DISCONNECT, a
client that goes silent).

Negative checks ("X was not delivered") never sleep: a fence message is
published after X to the same session and waited for. A session delivers in
the order messages were routed to it, so once the fence is there, X would
be there too had it been delivered. Sleeps appear only where the test is
about time passing (keep alive, will delay, message expiry).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import duckdb
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from clients import ck_consume_all, ck_producer
from harness import free_port, shoal_bin, unique_name, wait_for

pytestmark = pytest.mark.timeout(120)

V3 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
HOST = "127.0.0.1"


def until(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return wait_for(cond, timeout, what, interval=0.01)


# --------------------------------------------------------------------------
# paho client driven by its own network thread


@dataclass
class Received:
    topic: str  # with a topic alias from the server resolved
    payload: bytes
    qos: int
    retain: bool
    props: Any  # paho Properties (MQTT 5) or None
    raw_topic: str  # as it came on the wire ("" when only an alias was sent)
    alias: Optional[int]

    def prop(self, name: str, default=None):
        if self.props is None:
            return default
        return getattr(self.props, name, default)


@dataclass
class ConnAck:
    rc: int
    session_present: bool
    props: Any


class Mq:
    """A paho client on its own loop thread. It never reconnects by itself
    (a session takeover or a disconnect stays visible to the test)."""

    def __init__(self, port: int, client_id: str, *, version: int = V5,
                 clean_session: bool = True, transport: str = "tcp"):
        self.port = port
        self.client_id = client_id
        self.version = version
        kw: dict[str, Any] = dict(client_id=client_id, protocol=version, transport=transport,
                                  reconnect_on_failure=False)
        if version != V5:
            kw["clean_session"] = clean_session
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        self.lock = threading.Lock()
        self.msgs: list[Received] = []
        self.connack: Optional[ConnAck] = None
        self.disconnect_rc: Optional[int] = None
        self.subacks: dict[int, list[int]] = {}
        self.unsubacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self._aliases: dict[int, str] = {}
        self._started = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish

    # ---- callbacks (loop thread) ----------------------------------------

    def _on_connect(self, _c, _u, flags, rc, props):
        with self.lock:
            self.connack = ConnAck(rc.value, bool(flags.session_present), props)

    def _on_disconnect(self, _c, _u, _flags, rc, _props):
        with self.lock:
            self.disconnect_rc = rc.value if rc is not None else -1

    def _on_message(self, _c, _u, m):
        props = getattr(m, "properties", None)
        alias = getattr(props, "TopicAlias", None) if props is not None else None
        raw_topic = m.topic
        topic = raw_topic
        if alias is not None:
            if raw_topic:
                self._aliases[alias] = raw_topic
            else:
                topic = self._aliases.get(alias, "")
        with self.lock:
            self.msgs.append(Received(topic, bytes(m.payload), m.qos, bool(m.retain), props,
                                      raw_topic, alias))

    def _on_subscribe(self, _c, _u, mid, codes, _props):
        with self.lock:
            self.subacks[mid] = [rc.value for rc in codes]

    def _on_unsubscribe(self, _c, _u, mid, codes, _props):
        with self.lock:
            self.unsubacks[mid] = [rc.value for rc in codes]

    def _on_publish(self, _c, _u, mid, rc, _props):
        with self.lock:
            self.pubacks[mid] = rc.value if rc is not None else 0

    # ---- operations -----------------------------------------------------

    def connect(self, *, clean_start: bool = True, properties: Optional[Properties] = None,
                keepalive: int = 60, username: Optional[str] = None,
                password: Optional[str] = None) -> ConnAck:
        if username is not None:
            self.c.username_pw_set(username, password)
        kw: dict[str, Any] = {}
        if self.version == V5:
            kw["clean_start"] = clean_start
            if properties is not None:
                kw["properties"] = properties
        self.c.connect(HOST, self.port, keepalive=keepalive, **kw)
        self.c.loop_start()
        self._started = True
        until(lambda: self.connack is not None or self.disconnect_rc is not None,
              f"CONNACK for {self.client_id}")
        assert self.connack is not None, \
            f"{self.client_id}: connection closed before CONNACK ({self.disconnect_rc})"
        return self.connack

    def connected(self, **kw) -> ConnAck:
        ack = self.connect(**kw)
        assert ack.rc == 0, f"{self.client_id}: CONNACK {ack.rc:#x}"
        return ack

    def subscribe(self, subs, *, sub_id: Optional[int] = None) -> list[int]:
        """subs: [(filter, qos or SubscribeOptions)]. Waits for the SUBACK and
        returns its reason codes."""
        props = None
        if sub_id is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
        rc, mid = self.c.subscribe(subs, properties=props)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        until(lambda: mid in self.subacks, f"SUBACK for {self.client_id}")
        return self.subacks[mid]

    def unsubscribe(self, filters: list[str]) -> list[int]:
        rc, mid = self.c.unsubscribe(filters)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        until(lambda: mid in self.unsubacks, f"UNSUBACK for {self.client_id}")
        return self.unsubacks[mid]

    def publish(self, topic: str, payload, qos: int = 0, retain: bool = False,
                properties: Optional[Properties] = None) -> int:
        """Publish and wait until the exchange completes (sent for QoS 0,
        PUBACK for 1, PUBCOMP for 2); returns the acknowledgement's reason code."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish to {topic!r}: {info.rc}"
        until(lambda: info.mid in self.pubacks, f"{self.client_id}: acknowledgement of {topic!r}")
        return self.pubacks[info.mid]

    def received(self, topic: Optional[str] = None) -> list[Received]:
        with self.lock:
            return [m for m in self.msgs if topic is None or m.topic == topic]

    def payloads(self, topic: Optional[str] = None) -> list[bytes]:
        return [m.payload for m in self.received(topic)]

    def wait_payload(self, payload: bytes, timeout: float = 10.0) -> Received:
        def find():
            for m in self.received():
                if m.payload == payload:
                    return m
            return None
        return until(find, f"{self.client_id} to receive {payload!r} "
                           f"(got {self.payloads()[-10:]!r})", timeout)

    def clear(self) -> None:
        with self.lock:
            self.msgs.clear()

    def wait_disconnected(self, timeout: float = 10.0) -> int:
        until(lambda: self.disconnect_rc is not None, f"{self.client_id} to be disconnected",
              timeout)
        return self.disconnect_rc

    def disconnect(self) -> None:
        """A normal DISCONNECT; waits until paho has closed the connection."""
        self.c.disconnect()
        until(lambda: self.disconnect_rc is not None, f"{self.client_id} to disconnect")
        self.close()

    def close(self) -> None:
        if self._started:
            try:
                if self.c.is_connected():
                    self.c.disconnect()
            finally:
                self.c.loop_stop()
                self._started = False


def v5_props(packet_type, **values) -> Properties:
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def opts(qos: int, **kw) -> SubscribeOptions:
    return SubscribeOptions(qos=qos, **kw)


# --------------------------------------------------------------------------
# raw MQTT over a socket


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(b: bytes) -> tuple[int, int]:
    """(value, bytes used) of the variable byte integer at the start of b."""
    n, shift = 0, 0
    for i, byte in enumerate(b[:4]):
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i + 1
    raise ValueError(f"bad variable byte integer {b[:4].hex()}")


def mstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def prop_u32(pid: int, v: int) -> bytes:
    return bytes([pid]) + struct.pack("!I", v)


def prop_str(pid: int, s: str) -> bytes:
    return bytes([pid]) + mstr(s)


SESSION_EXPIRY = 0x11
AUTH_METHOD = 0x15
WILL_DELAY = 0x18


def connect_packet(client_id: str, *, level: int = 4, clean: bool = True, keepalive: int = 60,
                   will: Optional[tuple[str, bytes, int, bool]] = None, props: bytes = b"",
                   will_props: bytes = b"", username: Optional[str] = None,
                   password: Optional[str] = None) -> bytes:
    flags = 0x02 if clean else 0
    payload = mstr(client_id)
    if will is not None:
        topic, body, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if level == 5:
            payload += varint(len(will_props)) + will_props
        payload += mstr(topic) + mstr(body)
    if username is not None:
        flags |= 0x80
        payload += mstr(username)
    if password is not None:
        flags |= 0x40
        payload += mstr(password)
    vh = mstr("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive)
    if level == 5:
        vh += varint(len(props)) + props
    return packet(0x10, vh + payload)


class Raw:
    """A bare TCP connection speaking hand-made MQTT packets."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _parse(self) -> Optional[tuple[int, bytes]]:
        if len(self.buf) < 2:
            return None
        n, shift, i = 0, 0, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            n |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                break
        if len(self.buf) < i + n:
            return None
        first, body = self.buf[0], bytes(self.buf[i:i + n])
        del self.buf[:i + n]
        return first, body

    def read_packet(self, timeout: float = 10.0) -> Optional[tuple[int, bytes]]:
        """The next whole packet (first byte, body), or None once the broker
        closed the connection. Raises AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._parse()
            if pkt is not None:
                return pkt
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no packet and no close within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    def wait_closed(self, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Read until the broker closes the connection; returns the packets
        that came before the close."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            pkt = self.read_packet(max(0.01, deadline - time.monotonic()))
            if pkt is None:
                return got
            got.append(pkt)

    def subscribe(self, packet_id: int, filters: list[tuple[str, int]], v5: bool) -> list[int]:
        """Send SUBSCRIBE, return the SUBACK's reason codes."""
        body = struct.pack("!H", packet_id) + (b"\x00" if v5 else b"")
        body += b"".join(mstr(f) + bytes([q]) for f, q in filters)
        self.send(packet(0x82, body))
        pkt = self.read_packet()
        assert pkt is not None and pkt[0] == 0x90, f"expected SUBACK, got {pkt!r}"
        rest = pkt[1]
        assert struct.unpack("!H", rest[:2])[0] == packet_id, pkt
        rest = rest[2:]
        if v5:
            plen, n = read_varint(rest)
            rest = rest[n + plen:]
        return list(rest)

    def connect(self, client_id: str, **kw) -> bytes:
        """Send CONNECT, return the CONNACK's body."""
        self.send(connect_packet(client_id, **kw))
        pkt = self.read_packet()
        assert pkt is not None, f"{client_id}: connection closed without CONNACK"
        assert pkt[0] == 0x20, f"{client_id}: expected CONNACK, got {pkt!r}"
        return pkt[1]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# fixtures and broker-side helpers


@pytest.fixture
def mq():
    """make(port, client_id=None, **Mq options) -> Mq; all closed at teardown."""
    made: list[Mq] = []

    def make(port: int, client_id: Optional[str] = None, **kw) -> Mq:
        m = Mq(port, client_id if client_id is not None else unique_name("c"), **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            m.close()
        except Exception:  # noqa: BLE001 - teardown
            pass


@pytest.fixture
def raw():
    made: list[Raw] = []

    def make(port: int) -> Raw:
        r = Raw(port)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def mqtt_clients(shoal) -> dict[str, dict]:
    resp = shoal.http("/api/v1/mqtt/clients")
    assert resp.status == 200, resp.text
    return {c["client_id"]: c for c in resp.json()["clients"]}


def mqtt_subscriptions(shoal) -> list[dict]:
    resp = shoal.http("/api/v1/mqtt/subscriptions")
    assert resp.status == 200, resp.text
    return resp.json()["subscriptions"]


def wait_offline(shoal, client_id: str) -> None:
    """Until the broker has no connection for `client_id` (its session kept
    or not)."""
    until(lambda: not mqtt_clients(shoal).get(client_id, {}).get("connected", False),
          f"the broker to see {client_id} disconnected")


def metric(shoal, sample: str) -> Optional[float]:
    """The value of one exact sample, e.g. 'x_total{reason="queue_full"}'."""
    for line in shoal.metrics_text().splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == sample:
            return float(value)
    return None


def fence(pub: Mq, sub: Mq, topic: str) -> None:
    """Publish a unique message that `sub` receives, and wait for it. At QoS 2:
    paho hands a QoS 2 message over only once its exchange completes, so a
    QoS 1 fence could overtake a QoS 2 message sent before it."""
    payload = unique_name("fence").encode()
    assert pub.publish(topic, payload, qos=2) == 0
    sub.wait_payload(payload)


# --------------------------------------------------------------------------
# listeners


def test_health_and_websocket_listener(shoal_factory, mq):
    s = shoal_factory(name="ws")
    ws_port = free_port()
    while ws_port in (s.kafka_port, s.http_port, s.mqtt_port):
        ws_port = free_port()
    s.extra_args = ["--mqtt-ws-addr", f"{HOST}:{ws_port}"]
    s.start()

    doc = s.http("/health").json()
    assert doc["checks"]["mqtt"] == "ok", doc
    assert doc["mqtt"]["tcp"] == f"{HOST}:{s.mqtt_port}", doc
    assert doc["mqtt"]["websocket"].startswith(f"{HOST}:{ws_port}"), doc

    ws = mq(ws_port, transport="websockets")
    ws.connected()
    tcp = mq(s.mqtt_port)
    tcp.connected()
    assert ws.subscribe([("ws/#", 1)]) == [1]
    assert tcp.subscribe([("tcp/#", 1)]) == [1]

    # TCP -> WebSocket and WebSocket -> TCP.
    assert tcp.publish("ws/in", b"to-ws", qos=1) == 0
    assert ws.wait_payload(b"to-ws").topic == "ws/in"
    assert ws.publish("tcp/in", b"to-tcp", qos=1) == 0
    assert tcp.wait_payload(b"to-tcp").topic == "tcp/in"
    assert ws.client_id in mqtt_clients(s)


# --------------------------------------------------------------------------
# CONNECT / CONNACK


def test_connect_versions_and_refusals(shoal, mq, raw):
    port = shoal.mqtt_port
    # MQTT 3.1.1 and 5 are accepted.
    c3 = mq(port, version=V3)
    ack = c3.connect()
    assert (ack.rc, ack.session_present) == (0, False)
    c5 = mq(port)
    ack = c5.connect()
    assert (ack.rc, ack.session_present) == (0, False)
    # The server's Receive Maximum is in the v5 CONNACK.
    assert getattr(ack.props, "ReceiveMaximum", 0) > 0, ack.props

    # An unknown protocol level: CONNACK return code 1 (3.1.1 format), then close.
    r = raw(port)
    assert r.connect("lvl6", level=6) == b"\x00\x01"
    assert r.wait_closed() == []

    # v5 with an Authentication Method: 0x8C (bad authentication method), then close.
    r = raw(port)
    body = r.connect("auth", level=5, props=prop_str(AUTH_METHOD, "SCRAM-SHA-256"))
    assert body[1] == 0x8C, body.hex()
    assert r.wait_closed() == []

    # v5 with a password and no user name (which MQTT 5 allows): there is no
    # user to check it against, so 0x86 (bad user name or password), then close.
    r = raw(port)
    body = r.connect("pw-only", level=5, password="secret")
    assert body[1] == 0x86, body.hex()
    assert r.wait_closed() == []

    # v3.1.1, empty client id, clean session 0: return code 2, then close.
    r = raw(port)
    assert r.connect("", level=4, clean=False) == b"\x00\x02"
    assert r.wait_closed() == []
    # ... with clean session 1 it is accepted.
    r = raw(port)
    assert r.connect("", level=4, clean=True) == b"\x00\x00"

    # v5, empty client id: an Assigned Client Identifier, which the broker lists.
    anon = mq(port, client_id="")
    ack = anon.connect()
    assert ack.rc == 0
    assigned = getattr(ack.props, "AssignedClientIdentifier", "")
    assert assigned, ack.props
    assert mqtt_clients(shoal)[assigned]["connected"] is True


def test_session_takeover(shoal, mq, raw):
    port = shoal.mqtt_port
    cid = unique_name("dup")
    first = raw(port)
    assert first.connect(cid, level=5)[1] == 0
    assert first.subscribe(1, [("take/#", 1)], v5=True) == [1]

    second = mq(port, cid)
    second.connected()
    # The first (v5) connection gets DISCONNECT 0x8E (session taken over) and is closed.
    before_close = first.wait_closed()
    assert [(f, b[:1]) for f, b in before_close] == [(0xE0, b"\x8e")], before_close

    # The client id now belongs to the second connection.
    assert second.subscribe([("take/#", 1)]) == [1]
    pub = mq(port)
    pub.connected()
    assert pub.publish("take/x", b"after-takeover", qos=1) == 0
    second.wait_payload(b"after-takeover")
    assert mqtt_clients(shoal)[cid]["connected"] is True

    # A 3.1.1 connection that is taken over is closed (3.1.1 has no DISCONNECT
    # from the server).
    r = raw(port)
    cid3 = unique_name("dup3")
    assert r.connect(cid3, level=4) == b"\x00\x00"
    r2 = raw(port)
    assert r2.connect(cid3, level=4) == b"\x00\x00"
    assert r.wait_closed() == []


def test_keep_alive_timeout_publishes_will(shoal, mq, raw):
    port = shoal.mqtt_port
    watcher = mq(port)
    watcher.connected()
    assert watcher.subscribe([("ka/#", 1)]) == [1]

    # Keep alive 1 s: cut off after 1.5 s of silence (asserted: 1.2 s to 5 s
    # after its CONNACK), and its will is published.
    silent = raw(port)
    assert silent.connect(unique_name("silent"), keepalive=1,
                          will=("ka/will", b"silent-gone", 1, False)) == b"\x00\x00"
    t0 = time.monotonic()
    # The same keep alive, but pinging every 0.3 s: stays connected.
    pinger = raw(port)
    assert pinger.connect(unique_name("pinger"), keepalive=1) == b"\x00\x00"

    # Time passing is the point here: the pinger pings while we wait.
    while watcher.payloads("ka/will") == [] and time.monotonic() - t0 < 6:
        pinger.send(b"\xc0\x00")
        assert pinger.read_packet(2) == (0xD0, b""), "PINGRESP"
        time.sleep(0.3)
    elapsed = time.monotonic() - t0
    assert watcher.payloads("ka/will") == [b"silent-gone"], "the will of the silent client"
    assert 1.2 <= elapsed <= 5.0, f"cut off after {elapsed:.2f}s (keep alive 1 s)"
    assert silent.wait_closed(2) == []
    # The pinging client is still served.
    pinger.send(b"\xc0\x00")
    assert pinger.read_packet(2) == (0xD0, b"")


# --------------------------------------------------------------------------
# QoS and sessions


def test_qos_levels_and_downgrade(shoal, mq):
    port = shoal.mqtt_port
    for version in (V3, V5):
        tag = unique_name("q")
        sub = mq(port, version=version)
        sub.connected()
        assert sub.subscribe([(f"{tag}/0", 0), (f"{tag}/1", 1), (f"{tag}/2", 2)]) == [0, 1, 2]
        pub = mq(port, version=version)
        pub.connected()
        for sq in range(3):
            for pq in range(3):
                # returns once PUBACK (QoS 1) / PUBCOMP (QoS 2) came back
                assert pub.publish(f"{tag}/{sq}", f"{sq}-{pq}".encode(), qos=pq) == 0
        until(lambda: len(sub.received()) >= 9, f"9 deliveries (v{version})")
        got = {m.payload.decode(): m.qos for m in sub.received()}
        assert len(sub.received()) == 9, [m.payload for m in sub.received()]
        # delivered at min(publish QoS, subscription QoS)
        assert got == {f"{sq}-{pq}": min(sq, pq) for sq in range(3) for pq in range(3)}, version


def test_persistent_sessions(shoal, mq):
    port = shoal.mqtt_port
    pub = mq(port)
    pub.connected()
    expiry60 = v5_props(PacketTypes.CONNECT, SessionExpiryInterval=60)

    for version in (V3, V5):
        cid = unique_name(f"persist{version}")
        topic = f"ps/{cid}"
        if version == V3:
            s = mq(port, cid, version=V3, clean_session=False)
            ack = s.connect()
        else:
            s = mq(port, cid)
            ack = s.connect(clean_start=True, properties=expiry60)
        assert (ack.rc, ack.session_present) == (0, False)
        assert s.subscribe([(topic, 2)]) == [2]
        s.disconnect()
        wait_offline(shoal, cid)
        assert cid in mqtt_clients(shoal), "the session is kept"

        for q in range(3):
            assert pub.publish(topic, f"offline-q{q}".encode(), qos=q) == 0

        if version == V3:
            s2 = mq(port, cid, version=V3, clean_session=False)
            ack = s2.connect()
        else:
            s2 = mq(port, cid)
            ack = s2.connect(clean_start=False, properties=expiry60)
        assert (ack.rc, ack.session_present) == (0, True)
        fence(pub, s2, topic)
        got = [(m.payload, m.qos) for m in s2.received() if m.payload.startswith(b"offline")]
        # QoS 1 and 2 were queued; QoS 0 was not.
        assert got == [(b"offline-q1", 1), (b"offline-q2", 2)], (version, got)
        s2.disconnect()
        wait_offline(shoal, cid)

        # A clean start discards the session: no session present, nothing queued.
        assert pub.publish(topic, b"discarded", qos=1) == 0
        if version == V3:
            s3 = mq(port, cid, version=V3, clean_session=True)
            ack = s3.connect()
        else:
            s3 = mq(port, cid)
            ack = s3.connect(clean_start=True)
        assert (ack.rc, ack.session_present) == (0, False)
        assert s3.subscribe([(topic, 1)]) == [1]
        fence(pub, s3, topic)
        assert b"discarded" not in s3.payloads()
        s3.disconnect()

    # v5 with Session Expiry Interval 0: no session is kept.
    cid = unique_name("noexpiry")
    s = mq(port, cid)
    assert s.connect(clean_start=True).rc == 0
    assert s.subscribe([(f"ps/{cid}", 1)]) == [1]
    s.disconnect()
    until(lambda: cid not in mqtt_clients(shoal), f"session {cid} to be dropped")
    s2 = mq(port, cid)
    ack = s2.connect(clean_start=False)
    assert (ack.rc, ack.session_present) == (0, False)
    assert [x for x in mqtt_subscriptions(shoal) if x["client_id"] == cid] == []


# --------------------------------------------------------------------------
# retained messages


def test_retained_messages(shoal, mq):
    port = shoal.mqtt_port
    pub = mq(port)
    pub.connected()

    # set
    assert pub.publish("ret/a", b"r1", qos=1, retain=True) == 0
    s1 = mq(port, version=V3)
    s1.connected()
    assert s1.subscribe([("ret/#", 1)]) == [1]
    m = s1.wait_payload(b"r1")
    assert (m.topic, m.retain) == ("ret/a", True)
    # A live message to an existing 3.1.1 subscription has retain 0.
    assert pub.publish("ret/a", b"r2", qos=1, retain=True) == 0
    assert s1.wait_payload(b"r2").retain is False

    # replace: a new subscriber gets only r2, flagged retained
    s2 = mq(port)
    s2.connected()
    assert s2.subscribe([("ret/+", 1)]) == [1]
    fence(pub, s2, "ret/a")
    got = [(m.payload, m.retain) for m in s2.received() if not m.payload.startswith(b"fence")]
    assert got == [(b"r2", True)]

    # clear with an empty payload
    assert pub.publish("ret/a", b"", qos=1, retain=True) == 0
    s3 = mq(port)
    s3.connected()
    assert s3.subscribe([("ret/#", 1)]) == [1]
    fence(pub, s3, "ret/a")
    assert [m.payload for m in s3.received() if not m.payload.startswith(b"fence")] == []

    # Retain Handling (v5)
    assert pub.publish("ret/h", b"keep", qos=1, retain=True) == 0
    v = mq(port)
    v.connected()

    def step(filter_: str, o: SubscribeOptions) -> list[tuple[bytes, bool]]:
        v.clear()
        assert v.subscribe([(filter_, o)]) == [o.QoS]
        fence(pub, v, "ret/h")
        return [(m.payload, m.retain) for m in v.received() if m.payload == b"keep"]

    assert step("ret/h", opts(1, retainHandling=0)) == [(b"keep", True)]
    assert step("ret/h", opts(1, retainHandling=0)) == [(b"keep", True)], "RH 0: on every subscribe"
    assert step("ret/h", opts(1, retainHandling=1)) == [], "RH 1, existing subscription"
    assert v.unsubscribe(["ret/h"]) == [0]
    assert step("ret/h", opts(1, retainHandling=1)) == [(b"keep", True)], "RH 1, new subscription"
    assert v.unsubscribe(["ret/h"]) == [0]
    assert step("ret/h", opts(1, retainHandling=2)) == [], "RH 2: never"

    # Retain As Published: live messages keep retain=1 only with RAP.
    rap = mq(port)
    rap.connected()
    norap = mq(port)
    norap.connected()
    assert rap.subscribe([("ret/live", opts(1, retainAsPublished=True))]) == [1]
    assert norap.subscribe([("ret/live", opts(1, retainAsPublished=False))]) == [1]
    assert pub.publish("ret/live", b"live-retained", qos=1, retain=True) == 0
    assert pub.publish("ret/live", b"live-plain", qos=1, retain=False) == 0
    assert rap.wait_payload(b"live-retained").retain is True
    assert rap.wait_payload(b"live-plain").retain is False
    assert norap.wait_payload(b"live-retained").retain is False
    assert norap.wait_payload(b"live-plain").retain is False

    # Wildcards select retained messages as they select live ones: '#' matches
    # the parent level, and '$'-topics are not matched by a leading wildcard.
    for t in ("par", "par/a", "par/b/c", "$par/x"):
        assert pub.publish(t, f"kept-{t}".encode(), qos=1, retain=True) == 0
    for filter_, expected in (("par/#", ["par", "par/a", "par/b/c"]),
                              ("#", ["par", "par/a", "par/b/c"]),
                              ("par/+", ["par/a"]),
                              ("+/+", ["par/a"]),
                              ("$par/#", ["$par/x"])):
        w = mq(port)
        w.connected()
        assert w.subscribe([(filter_, 1)]) == [1]
        fence(pub, w, "$par/fence" if filter_.startswith("$") else "par/fence")
        got = sorted(m.topic for m in w.received() if m.payload.startswith(b"kept-"))
        assert got == expected, f"retained messages for a new {filter_!r} subscription: {got}"
        assert all(m.retain for m in w.received() if m.payload.startswith(b"kept-"))


# --------------------------------------------------------------------------
# wills


def test_wills(shoal, mq, raw):
    port = shoal.mqtt_port
    watcher = mq(port)
    watcher.connected()
    assert watcher.subscribe([("will/#", 1)]) == [1]
    pub = mq(port)
    pub.connected()

    # Socket closed without DISCONNECT: the will (here retained) is published.
    r = raw(port)
    will = ("will/abrupt", b"abrupt-gone", 1, True)
    assert r.connect(unique_name("w1"), will=will) == b"\x00\x00"
    r.close()
    watcher.wait_payload(b"abrupt-gone")
    # ... and being retained, a new subscriber gets it with the retain flag.
    late = mq(port)
    late.connected()
    assert late.subscribe([("will/abrupt", 1)]) == [1]
    m = late.wait_payload(b"abrupt-gone")
    assert m.retain is True

    # A normal DISCONNECT: no will.
    cid = unique_name("w2")
    r = raw(port)
    assert r.connect(cid, will=("will/normal", b"normal-gone", 1, False)) == b"\x00\x00"
    r.send(b"\xe0\x00")
    assert r.wait_closed() == []
    until(lambda: cid not in mqtt_clients(shoal), f"{cid} gone")
    fence(pub, watcher, "will/fence")
    assert watcher.payloads("will/normal") == []

    # v5 DISCONNECT with reason 0x04 (disconnect with will message): the will.
    r = raw(port)
    body = r.connect(unique_name("w3"), level=5, will=("will/v5", b"v5-gone", 1, False))
    assert body[1] == 0
    r.send(b"\xe0\x01\x04")
    watcher.wait_payload(b"v5-gone")

    # Will Delay Interval 2 s (session expiry 30 s): published, but not before
    # 1.8 s after the close.
    r = raw(port)
    body = r.connect(unique_name("w4"), level=5, will=("will/delayed", b"delayed-gone", 1, False),
                     props=prop_u32(SESSION_EXPIRY, 30), will_props=prop_u32(WILL_DELAY, 2))
    assert body[1] == 0
    r.close()
    t0 = time.monotonic()
    watcher.wait_payload(b"delayed-gone", timeout=8)
    elapsed = time.monotonic() - t0
    assert elapsed >= 1.8, f"the delayed will came after {elapsed:.2f}s (delay 2 s)"


# --------------------------------------------------------------------------
# subscriptions


def test_wildcards_and_dollar_topics(shoal, mq):
    port = shoal.mqtt_port
    subs = {
        "plus": ["wc/+/leaf"],
        "hash": ["wc/top/#"],
        "all": ["#"],
        "first_plus": ["+/bar", "+/x"],
        "dollar": ["$foo/#", "$SYS/#"],
    }
    clients = {}
    for name, filters in subs.items():
        c = mq(port)
        c.connected()
        assert c.subscribe([(f, 1) for f in filters]) == [1] * len(filters)
        clients[name] = c
    pub = mq(port)
    pub.connected()
    topics = ["wc/a/leaf", "wc/a/b/leaf", "wc/top", "wc/top/a/b", "$SYS/x", "$foo/bar",
              "plain/bar"]
    for t in topics:
        assert pub.publish(t, t.encode(), qos=1) == 0
    # One last message each client matches, published after the others.
    fences = {"plus": "wc/f/leaf", "hash": "wc/top/f", "all": "f/all",
              "first_plus": "f/bar", "dollar": "$foo/f"}
    for name, t in fences.items():
        assert pub.publish(t, b"fence-" + name.encode(), qos=1) == 0
    for name, c in clients.items():
        c.wait_payload(b"fence-" + name.encode())
    got = {name: [m.topic for m in c.received() if not m.payload.startswith(b"fence")]
           for name, c in clients.items()}
    assert got == {
        "plus": ["wc/a/leaf"],
        # '#' matches the parent level too
        "hash": ["wc/top", "wc/top/a/b"],
        # '$'-topics are not matched by a leading '#' or '+'
        "all": ["wc/a/leaf", "wc/a/b/leaf", "wc/top", "wc/top/a/b", "plain/bar"],
        "first_plus": ["plain/bar"],
        "dollar": ["$SYS/x", "$foo/bar"],
    }, got


def test_overlapping_subscriptions_ids_and_no_local(shoal, mq):
    port = shoal.mqtt_port
    pub = mq(port)
    pub.connected()

    # v5: overlapping filters, two with identifiers -> one delivery, max QoS, both ids.
    c = mq(port)
    c.connected()
    assert c.subscribe([("ov/+", 0)], sub_id=1) == [0]
    assert c.subscribe([("ov/#", 2)], sub_id=2) == [2]
    assert c.subscribe([("ov/x", 1)]) == [1]
    assert pub.publish("ov/x", b"overlap", qos=2) == 0
    fence(pub, c, "ov/x")
    got = c.received("ov/x")
    hits = [m for m in got if m.payload == b"overlap"]
    assert len(hits) == 1, [m.payload for m in got]
    assert hits[0].qos == 2
    assert sorted(hits[0].prop("SubscriptionIdentifier", [])) == [1, 2]

    # v3.1.1: overlapping filters -> one delivery at the max QoS.
    c3 = mq(port, version=V3)
    c3.connected()
    assert c3.subscribe([("ov3/+", 0), ("ov3/#", 1)]) == [0, 1]
    assert pub.publish("ov3/x", b"overlap3", qos=1) == 0
    fence(pub, c3, "ov3/x")
    hits = [m for m in c3.received() if m.payload == b"overlap3"]
    assert [(m.payload, m.qos) for m in hits] == [(b"overlap3", 1)]

    # No Local: own publishes are not delivered back; others' are.
    nl = mq(port)
    nl.connected()
    assert nl.subscribe([("nl/#", opts(1, noLocal=True))]) == [1]
    assert nl.publish("nl/own", b"own", qos=1) == 0
    fence(pub, nl, "nl/other")
    assert nl.payloads("nl/own") == []
    # Without No Local the same client gets its own publish.
    echo = mq(port)
    echo.connected()
    assert echo.subscribe([("echo/#", opts(1, noLocal=False))]) == [1]
    assert echo.publish("echo/own", b"own-echo", qos=1) == 0
    echo.wait_payload(b"own-echo")


def test_shared_subscriptions(shoal, mq):
    port = shoal.mqtt_port
    members = []
    for _ in range(2):
        m = mq(port)
        m.connected()
        assert m.subscribe([("$share/grp/sh/#", 1)]) == [1]
        members.append(m)
    plain = mq(port)
    plain.connected()
    assert plain.subscribe([("sh/#", 1)]) == [1]
    pub = mq(port)
    pub.connected()
    sent = [f"s{i}".encode() for i in range(20)]
    for p in sent:
        assert pub.publish("sh/t", p, qos=1) == 0

    until(lambda: len(plain.received()) >= 20, "the plain subscriber to get all 20")
    until(lambda: sum(len(m.received()) for m in members) >= 20, "the group to get all 20")
    a, b = (m.payloads() for m in members)
    # Each message went to exactly one member, and both members got some.
    assert sorted(a + b) == sorted(sent), (a, b)
    assert a and b, (a, b)
    assert sorted(plain.payloads()) == sorted(sent)


def test_suback_and_unsuback_reason_codes(shoal, mq, raw):
    port = shoal.mqtt_port
    # paho refuses to send an invalid filter, so these SUBSCRIBEs are hand-made.
    c3 = raw(port)
    cid3 = unique_name("sa3")
    assert c3.connect(cid3) == b"\x00\x00"
    assert c3.subscribe(1, [("ok/#", 1), ("a/#/b", 0), ("ok2/+", 2)], v5=False) == [1, 0x80, 2]
    c5 = raw(port)
    cid5 = unique_name("sa5")
    assert c5.connect(cid5, level=5)[1] == 0
    assert c5.subscribe(1, [("ok/#", 1), ("a/#/b", 0)], v5=True) == [1, 0x8F]
    subs = {(s["client_id"], s["filter"]) for s in mqtt_subscriptions(shoal)}
    assert {(cid3, "ok/#"), (cid3, "ok2/+"), (cid5, "ok/#")} <= subs, subs
    assert (cid3, "a/#/b") not in subs and (cid5, "a/#/b") not in subs

    # UNSUBACK (v5): 0x00 for a subscription that existed, 0x11 for one that did not.
    u = mq(port)
    u.connected()
    assert u.subscribe([("ok/#", 1)]) == [1]
    assert u.unsubscribe(["ok/#", "never/subscribed"]) == [0x00, 0x11]
    assert (u.client_id, "ok/#") not in {(s["client_id"], s["filter"])
                                         for s in mqtt_subscriptions(shoal)}


# --------------------------------------------------------------------------
# MQTT 5 properties


def test_v5_properties_expiry_and_topic_aliases(shoal, mq):
    port = shoal.mqtt_port
    pub = mq(port)
    pack = pub.connected()
    assert getattr(pack.props, "TopicAliasMaximum", 0) > 0, pack.props

    sub = mq(port)
    sub.connected(properties=v5_props(PacketTypes.CONNECT, TopicAliasMaximum=10))
    assert sub.subscribe([("props/#", 1)]) == [1]
    plain = mq(port)  # Topic Alias Maximum 0
    plain.connected()
    assert plain.subscribe([("props/#", 1)]) == [1]

    # Message properties pass through.
    p = v5_props(PacketTypes.PUBLISH, ContentType="application/json",
                 ResponseTopic="props/reply", CorrelationData=b"\x00corr\xff",
                 PayloadFormatIndicator=1)
    p.UserProperty = ("a", "1")
    p.UserProperty = ("b", "2")
    p.UserProperty = ("a", "3")
    assert pub.publish("props/full", b'{"x": 1}', qos=1, properties=p) == 0
    m = sub.wait_payload(b'{"x": 1}')
    assert m.topic == "props/full"
    assert m.prop("UserProperty") == [("a", "1"), ("b", "2"), ("a", "3")]
    assert m.prop("ContentType") == "application/json"
    assert m.prop("ResponseTopic") == "props/reply"
    assert m.prop("CorrelationData") == b"\x00corr\xff"
    assert m.prop("PayloadFormatIndicator") == 1

    # Topic aliases client -> server: the second publish has only the alias.
    assert pub.publish("props/aliased", b"al-1", qos=1,
                       properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1)) == 0
    assert pub.publish("", b"al-2", qos=1,
                       properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1)) == 0
    # Server -> client: `sub` allows 10 aliases; resolved, both carry the topic.
    for who in (sub, plain):
        a1, a2 = who.wait_payload(b"al-1"), who.wait_payload(b"al-2")
        assert (a1.topic, a2.topic) == ("props/aliased", "props/aliased"), who.client_id
    for m in sub.received():
        assert m.alias is None or 1 <= m.alias <= 10, m
        assert m.raw_topic or m.alias is not None, m
    # A client that allows no aliases never gets one.
    assert all(m.alias is None and m.raw_topic for m in plain.received())

    # Message expiry for an offline persistent session.
    cid = unique_name("exp")
    off = mq(port, cid)
    off.connected(properties=v5_props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    assert off.subscribe([("props/exp/#", 1)]) == [1]
    off.disconnect()
    wait_offline(shoal, cid)
    assert pub.publish("props/exp/short", b"short-lived", qos=1,
                       properties=v5_props(PacketTypes.PUBLISH, MessageExpiryInterval=1)) == 0
    assert pub.publish("props/exp/long", b"long-lived", qos=1,
                       properties=v5_props(PacketTypes.PUBLISH, MessageExpiryInterval=60)) == 0
    time.sleep(2.2)  # the point of the test: the 1 s message expires while queued
    back = mq(port, cid)
    ack = back.connected(clean_start=False,
                         properties=v5_props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    assert ack.session_present
    long_ = back.wait_payload(b"long-lived")
    fence(pub, back, "props/exp/fence")
    assert back.payloads("props/exp/short") == []
    # Forwarded expiry is reduced by the time spent queued (>= 2.2 s of 60).
    assert 0 < long_.prop("MessageExpiryInterval", 0) <= 58, long_.props
    assert (metric(shoal, 'shoal_mqtt_messages_dropped_total{reason="expired"}') or 0) >= 1


# --------------------------------------------------------------------------
# limits and bad input


def test_maximum_packet_size(shoal_factory, mq, raw):
    s = shoal_factory(name="maxpkt", extra_args=["--mqtt-max-packet-size", "1KiB"])
    s.start()
    port = s.mqtt_port
    pub = mq(port)
    ack = pub.connected()
    assert getattr(ack.props, "MaximumPacketSize", None) == 1024, ack.props

    # Client Maximum Packet Size 100: a larger message is dropped, a small one
    # published after it arrives.
    small = mq(port)
    small.connected(properties=v5_props(PacketTypes.CONNECT, MaximumPacketSize=100))
    assert small.subscribe([("mp/#", 1)]) == [1]
    assert pub.publish("mp/x", b"B" * 500, qos=1) == 0
    assert pub.publish("mp/x", b"tiny", qos=1) == 0
    small.wait_payload(b"tiny")
    assert small.payloads() == [b"tiny"]
    assert (metric(s, 'shoal_mqtt_messages_dropped_total{reason="packet_too_large"}') or 0) >= 1

    # A client sending more than the server's 1 KiB is disconnected.
    watcher = mq(port)
    watcher.connected()
    assert watcher.subscribe([("big/#", 1)]) == [1]
    offender = mq(port)
    offender.connected()
    assert offender.publish("big/ok", b"o" * 600, qos=1) == 0  # under the limit
    watcher.wait_payload(b"o" * 600)
    assert offender.disconnect_rc is None
    # (No check of this publish's return code: paho may already report the
    # connection gone by the time it returns.)
    offender.c.publish("big/huge", b"H" * 2000, qos=0)
    offender.wait_disconnected()
    # A v5 client announcing a 2000-byte PUBLISH gets DISCONNECT 0x95 (packet
    # too large) and the connection is closed.
    r = raw(port)
    assert r.connect(unique_name("big"), level=5)[1] == 0
    r.send(b"\x30" + varint(2000))
    before_close = r.wait_closed()
    assert [(f, b[:1]) for f, b in before_close] == [(0xE0, b"\x95")], before_close
    # Everyone else keeps working.
    fence(pub, watcher, "big/after")
    assert b"H" * 2000 not in watcher.payloads()
    assert pub.c.is_connected() and watcher.c.is_connected()
    s.assert_alive()


def test_malformed_packets_close_only_that_connection(shoal, mq, raw):
    port = shoal.mqtt_port
    sub = mq(port)
    sub.connected()
    assert sub.subscribe([("mal/#", 1)]) == [1]
    pub = mq(port)
    pub.connected()

    cases = {
        "garbage CONNECT": (None, b"\x10\x02\x00\x00"),
        "first packet not CONNECT": (None, b"\xc0\x00"),
        "PUBLISH with a 5-byte remaining length": ("v3", b"\x30\xff\xff\xff\xff\x01"),
        "reserved packet type 0": ("v3", b"\x00\x00"),
        "PUBLISH with a truncated topic": ("v5", b"\x30\x03\x00\x09a"),
    }
    for i, (what, (connect, data)) in enumerate(cases.items()):
        r = raw(port)
        if connect == "v3":
            assert r.connect(unique_name("mal")) == b"\x00\x00"
        elif connect == "v5":
            assert r.connect(unique_name("mal"), level=5)[1] == 0
        r.send(data)
        r.wait_closed()  # AssertionError if the broker keeps it open
        # The clients connected before keep publishing and receiving.
        payload = f"still-{i}".encode()
        assert pub.publish("mal/t", payload, qos=1) == 0, what
        sub.wait_payload(payload)
    assert pub.c.is_connected() and sub.c.is_connected()
    shoal.assert_alive()


def test_queue_bound_for_offline_sessions(shoal_factory, mq):
    s = shoal_factory(name="qbound", extra_args=["--mqtt-max-queued-messages", "5"])
    s.start()
    port = s.mqtt_port
    cid = unique_name("qb")
    sub = mq(port, cid, version=V3, clean_session=False)
    sub.connected()
    assert sub.subscribe([("qb/t", 1)]) == [1]
    sub.disconnect()
    wait_offline(s, cid)

    pub = mq(port)
    pub.connected()
    for i in range(20):
        assert pub.publish("qb/t", f"m{i}".encode(), qos=1) == 0

    back = mq(port, cid, version=V3, clean_session=False)
    assert back.connected().session_present
    fence(pub, back, "qb/t")
    got = [p for p in back.payloads() if p.startswith(b"m")]
    assert 1 <= len(got) <= 5, got
    assert (metric(s, 'shoal_mqtt_messages_dropped_total{reason="queue_full"}') or 0) > 0


# --------------------------------------------------------------------------
# access control


ACL = """\
# per user
user alice
topic readwrite alice/#
topic read public/#
user bob
topic write public/#
topic read devices/#
# every client
pattern write devices/%c/out
pattern read users/%u/#
"""


def test_access_control(shoal_factory, mq, raw, tmp_path):
    pwfile = tmp_path / "passwd.txt"
    # `shoal mqtt passwd`: the password from stdin's first line, or --password.
    subprocess.run([shoal_bin(), "mqtt", "passwd", str(pwfile), "alice"],
                   input="alice-pw\nsecond line is ignored\n", text=True, check=True, timeout=60)
    subprocess.run([shoal_bin(), "mqtt", "passwd", str(pwfile), "bob", "--password", "bob-pw"],
                   stdin=subprocess.DEVNULL, check=True, timeout=60)
    lines = pwfile.read_text().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == ["alice", "bob"], lines
    assert all(ln.split(":", 1)[1].startswith("$argon2id$") for ln in lines), lines
    acl = tmp_path / "acl.conf"
    acl.write_text(ACL)

    s = shoal_factory(name="acl", extra_args=[
        "--mqtt-password-file", str(pwfile), "--mqtt-allow-anonymous", "false",
        "--mqtt-acl-file", str(acl)])
    s.start()
    port = s.mqtt_port

    # Credentials.
    assert mq(port).connect(username="alice", password="wrong").rc == 0x86
    assert mq(port).connect().rc == 0x87  # no user name
    r = raw(port)
    assert r.connect("v3-wrong", username="alice", password="wrong") == b"\x00\x04"
    r = raw(port)
    assert r.connect("v3-anon") == b"\x00\x05"
    r = raw(port)
    assert r.connect("v3-alice", username="alice", password="alice-pw") == b"\x00\x00"

    alice = mq(port, "dev1")  # its client id selects the %c pattern
    alice.connected(username="alice", password="alice-pw")
    bob = mq(port, "bob-client")
    bob.connected(username="bob", password="bob-pw")

    # Subscribe rights (v5: 0x87 when refused).
    assert alice.subscribe([("alice/#", 1), ("public/#", 1), ("secret/#", 1)]) == [1, 1, 0x87]
    assert alice.subscribe([("users/alice/#", 1), ("users/bob/#", 1)]) == [1, 0x87]
    assert bob.subscribe([("devices/#", 1)]) == [1]
    alice3 = mq(port, "alice-v3", version=V3)
    alice3.connected(username="alice", password="alice-pw")
    assert alice3.subscribe([("secret/#", 1), ("alice/#", 1)]) == [0x80, 1]

    # Publish rights: refused publishes get PUBACK 0x87 and are not delivered.
    assert alice.publish("alice/self", b"mine", qos=1) == 0
    alice.wait_payload(b"mine")  # readwrite
    assert alice.publish("public/x", b"alice-public", qos=1) == 0x87
    fence(bob, alice, "public/y")  # bob may write public/#
    assert b"alice-public" not in alice.payloads()

    # pattern write devices/%c/out
    assert alice.publish("devices/dev1/out", b"own-device", qos=1) == 0
    assert alice.publish("devices/dev2/out", b"other-device", qos=1) == 0x87
    fence(alice, bob, "devices/dev1/out")
    assert bob.payloads("devices/dev1/out")[0] == b"own-device"
    assert b"other-device" not in bob.payloads()


# --------------------------------------------------------------------------
# persistence into streams


def rules(shoal) -> list[dict]:
    resp = shoal.http("/api/v1/mqtt/persist")
    assert resp.status == 200, resp.text
    return resp.json()["rules"]


def records_of(shoal, stream: str, shards: int) -> list:
    by_shard = ck_consume_all(shoal.bootstrap, stream, range(shards))
    return [m for part in by_shard.values() for m in part]


def high_watermarks(shoal, stream: str) -> int:
    doc = shoal.stream(stream)
    return sum(sh["high_watermark"] for sh in doc["shards"]) if doc else 0


def test_a_will_to_a_mapped_topic_is_in_the_stream(shoal, mq, raw):
    stream = unique_name("wills")
    rule = {"filter": "gone/#", "stream": stream, "shards": 2}
    resp = shoal.http("/api/v1/mqtt/persist", "PUT", json.dumps(rule).encode())
    assert resp.status == 200, resp.text
    port = shoal.mqtt_port
    pub = mq(port)
    pub.connected()
    probes = [0]

    def probe_persisted():
        probes[0] += 1
        assert pub.publish("gone/probe", f"probe-{probes[0]}".encode(), qos=1) == 0
        return high_watermarks(shoal, stream) > 0
    wait_for(probe_persisted, 15, "the persistence rule to apply", interval=0.2)

    watcher = mq(port)
    watcher.connected()
    assert watcher.subscribe([("gone/#", 1)]) == [1]
    # The socket closes without DISCONNECT: the will goes to subscribers and,
    # its topic being mapped, into the stream as a publish would.
    r = raw(port)
    assert r.connect(unique_name("dev"), will=("gone/dev-1", b"offline", 1, False)) == b"\x00\x00"
    r.close()
    watcher.wait_payload(b"offline")

    def will_records():
        return [m for m in records_of(shoal, stream, 2) if m.key() == b"gone/dev-1"]
    until(will_records, "the will in the stream")
    recs = will_records()
    assert [m.value() for m in recs] == [b"offline"]
    assert dict(recs[0].headers())["mqtt.qos"] == b"1"


def test_persist_rule_mqtt_to_kafka_to_parquet_and_back(shoal, mq):
    stream = unique_name("sensors")
    rule = {"filter": "sensors/#", "stream": stream, "shards": 4}
    resp = shoal.http("/api/v1/mqtt/persist", "PUT", json.dumps(rule).encode())
    assert resp.status == 200, resp.text
    assert rule in resp.json()["rules"]
    assert rule in rules(shoal)
    assert shoal.stream(stream)["partitions"] == 4

    port = shoal.mqtt_port
    sub = mq(port)
    sub.connected()
    assert sub.subscribe([("sensors/#", 1)]) == [1]
    pub = mq(port)
    pub.connected()

    # The listener picks the rule up within about a second: probe until a
    # QoS 1 publish lands in the stream.
    probes = [0]

    def probe_persisted():
        probes[0] += 1
        assert pub.publish("sensors/probe", f"probe-{probes[0]}".encode(), qos=1) == 0
        return high_watermarks(shoal, stream) > 0
    wait_for(probe_persisted, 15, "the persistence rule to apply", interval=0.2)

    # MQTT -> Kafka: key = topic, value = payload, headers.
    p = v5_props(PacketTypes.PUBLISH, ContentType="text/plain", ResponseTopic="replies/r1",
                 CorrelationData=b"c-1", PayloadFormatIndicator=1)
    p.UserProperty = ("unit", "C")
    p.UserProperty = ("site", "lab-1")
    assert pub.publish("sensors/room1/temp", b"21.5", qos=1, properties=p) == 0
    recs = [m for m in records_of(shoal, stream, 4) if m.key() == b"sensors/room1/temp"]
    assert len(recs) == 1, recs
    rec = recs[0]
    assert rec.value() == b"21.5"
    headers = dict(rec.headers())
    assert headers["mqtt.qos"] == b"1"
    assert headers["mqtt.retain"] == b"false"
    assert headers["unit"] == b"C" and headers["site"] == b"lab-1"
    assert headers["mqtt.content_type"] == b"text/plain"
    assert headers["mqtt.response_topic"] == b"replies/r1"
    assert headers["mqtt.correlation_data"] == b"c-1"
    assert headers["mqtt.payload_format"] == b"1"

    # A retained QoS 2 publish with an expiry: its headers say so.
    p = v5_props(PacketTypes.PUBLISH, MessageExpiryInterval=3600)
    assert pub.publish("sensors/room2/state", b"on", qos=2, retain=True, properties=p) == 0
    recs = [m for m in records_of(shoal, stream, 4) if m.key() == b"sensors/room2/state"]
    assert [m.value() for m in recs] == [b"on"]
    headers = dict(recs[0].headers())
    assert headers["mqtt.qos"] == b"2" and headers["mqtt.retain"] == b"true", headers
    assert headers["mqtt.message_expiry"] == b"3600", headers

    # Flushed, the record is in the Parquet files DuckDB reads.
    shoal.wait_flushed(stream)
    glob = str(shoal.objects_dir / "**" / "*.parquet")
    rows = duckdb.connect().execute(
        f"select value, headers from read_parquet('{glob}') where stream = ? and key = ?",
        [stream, b"sensors/room1/temp"]).fetchall()
    assert len(rows) == 1, rows
    assert rows[0][0] == b"21.5"
    row_headers = {h["key"]: h["value"] for h in rows[0][1]}
    assert row_headers["mqtt.qos"] == b"1" and row_headers["unit"] == b"C", row_headers

    # Kafka -> MQTT: a record with key sensors/k1 reaches the subscriber, once.
    producer = ck_producer(shoal.bootstrap, acks="all", partitioner="murmur2_random")
    producer.produce(stream, key=b"sensors/k1", value=b"from-kafka",
                     headers=[("origin", b"kafka")])
    assert producer.flush(30) == 0
    m = sub.wait_payload(b"from-kafka")
    assert m.topic == "sensors/k1"
    assert ("origin", "kafka") in (m.prop("UserProperty") or [])

    # Fences written after, with the same keys (so the same shards): had a
    # record been delivered twice, the copy would come before its fence.
    for key in (b"sensors/k1", b"sensors/room1/temp"):
        producer.produce(stream, key=key, value=b"fence-" + key)
    assert producer.flush(30) == 0
    sub.wait_payload(b"fence-sensors/k1")
    sub.wait_payload(b"fence-sensors/room1/temp")
    assert sub.payloads().count(b"from-kafka") == 1
    # An MQTT publish to a mapped topic reaches MQTT subscribers once, not
    # again from the stream.
    assert sub.payloads("sensors/room1/temp").count(b"21.5") == 1


def test_persist_rules_from_config_file_and_delete(shoal_factory, mq, tmp_path):
    stream = unique_name("cfgstream")
    cfg = tmp_path / "shoal.toml"
    cfg.write_text(f'[[mqtt.persist]]\nfilter = "cfg/#"\nstream = "{stream}"\nshards = 2\n')
    s = shoal_factory(name="cfg", config_file=cfg)
    s.start()
    assert {"filter": "cfg/#", "stream": stream, "shards": 2} in rules(s)
    assert s.stream(stream)["partitions"] == 2

    # Seeded at start: the first publish is persisted.
    pub = mq(s.mqtt_port)
    pub.connected()
    assert pub.publish("cfg/a", b"from-config-rule", qos=1) == 0
    recs = records_of(s, stream, 2)
    assert [(m.key(), m.value()) for m in recs] == [(b"cfg/a", b"from-config-rule")]

    # An invalid filter is refused; DELETE removes a rule.
    bad = s.http("/api/v1/mqtt/persist", "PUT",
                 json.dumps({"filter": "a/#/b", "stream": "x", "shards": 1}).encode())
    assert bad.status == 400, bad.text
    resp = s.http("/api/v1/mqtt/persist?filter=cfg/%23", "DELETE")
    assert resp.status == 200, resp.text
    assert all(r["filter"] != "cfg/#" for r in resp.json()["rules"])
    assert all(r["filter"] != "cfg/#" for r in rules(s))


def test_acknowledged_persisted_publishes_survive_kill9(shoal_factory, mq, tmp_path):
    stream = unique_name("durable")
    cfg = tmp_path / "shoal.toml"
    cfg.write_text(f'[[mqtt.persist]]\nfilter = "dur/#"\nstream = "{stream}"\nshards = 1\n')
    # A long flush interval: what was acknowledged is in the WAL, not yet in objects.
    s = shoal_factory(name="dur", config_file=cfg, flush_interval="1h")
    s.start()
    pub = mq(s.mqtt_port, version=V3)
    pub.connected()
    sent = [f"dur-{i}".encode() for i in range(10)]
    for v in sent:
        assert pub.publish("dur/t", v, qos=1) == 0  # PUBACK received
    s.kill9()
    pub.close()
    s.start()
    recs = records_of(s, stream, 1)
    assert [m.value() for m in recs] == sent
    assert {m.key() for m in recs} == {b"dur/t"}


def test_persistent_sessions_and_retained_messages_survive_kill9(shoal_factory, mq):
    s = shoal_factory(name="sess-dur")
    s.start()
    port = s.mqtt_port
    # A v3.1.1 persistent session and a v5 one with an expiry, both offline.
    v3 = mq(port, unique_name("dur-v3"), version=V3, clean_session=False)
    v3.connected()
    assert v3.subscribe([("sd/#", 1)]) == [1]
    v5_props = Properties(PacketTypes.CONNECT)
    v5_props.SessionExpiryInterval = 3600
    v5 = mq(port, unique_name("dur-v5"))
    v5.connected(clean_start=False, properties=v5_props)
    assert v5.subscribe([("sd/+", 2)]) == [2]
    v3.disconnect()
    v5.disconnect()
    until(lambda: not any(c["connected"] for c in mqtt_clients(s).values()
                          if c["client_id"] in (v3.client_id, v5.client_id)),
          "both sessions offline")
    pub = mq(port, version=V3)
    pub.connected()
    sent = [f"q-{i}".encode() for i in range(5)]
    for v in sent:
        assert pub.publish("sd/x", v, qos=1) == 0  # PUBACK: queued durably
    assert pub.publish("sd/ret", b"kept", qos=1, retain=True) == 0
    s.kill9()
    pub.close()
    s.start()

    clients = mqtt_clients(s)
    assert clients[v3.client_id]["connected"] is False
    assert clients[v3.client_id]["queued"] == 6

    back3 = mq(port, v3.client_id, version=V3, clean_session=False)
    assert back3.connected().session_present is True
    until(lambda: len(back3.received()) == 6, "the queued messages after the restart")
    assert [m.payload for m in back3.received("sd/x")] == sent
    back5 = mq(port, v5.client_id)
    assert back5.connected(clean_start=False, properties=v5_props).session_present is True
    until(lambda: len(back5.received()) == 6, "the v5 session's queued messages")
    assert [m.payload for m in back5.received("sd/x")] == sent

    # The retained message is there for a new subscriber too.
    fresh = mq(port)
    fresh.connected()
    fresh.subscribe([("sd/ret", 0)])
    until(lambda: fresh.received("sd/ret"), "the retained message after the restart")
    assert fresh.received("sd/ret")[0].payload == b"kept"
    assert fresh.received("sd/ret")[0].retain


# --------------------------------------------------------------------------
# admin API, metrics, command-line clients


def test_admin_api_and_metrics(shoal, mq):
    port = shoal.mqtt_port
    a = mq(port, unique_name("adm-a"))
    a.connected()
    b = mq(port, unique_name("adm-b"), version=V3)
    b.connected()
    assert a.subscribe([("adm/+", 1)]) == [1]
    assert b.subscribe([("adm/#", 2)]) == [2]
    for i in range(3):
        assert a.publish("adm/x", f"a{i}".encode(), qos=1) == 0
    until(lambda: len(b.received()) == 3, "b to get 3")

    clients = mqtt_clients(shoal)
    assert clients[a.client_id]["connected"] is True
    assert clients[b.client_id]["connected"] is True
    subs = {(x["client_id"], x["filter"], x["qos"]) for x in mqtt_subscriptions(shoal)}
    assert {(a.client_id, "adm/+", 1), (b.client_id, "adm/#", 2)} <= subs, subs

    assert metric(shoal, "shoal_mqtt_connections") == 2
    assert metric(shoal, 'shoal_mqtt_messages_received_total{qos="1"}') == 3

    a.disconnect()
    until(lambda: a.client_id not in mqtt_clients(shoal), "a's session to go")
    until(lambda: metric(shoal, "shoal_mqtt_connections") == 1, "1 connection left")
    assert a.client_id not in {x["client_id"] for x in mqtt_subscriptions(shoal)}


def test_mosquitto_pub_and_sub(shoal):
    port = str(shoal.mqtt_port)
    base = ["-h", HOST, "-p", port]
    for version in ("mqttv311", "mqttv5"):
        v5 = version == "mqttv5"
        cid = unique_name("mosq-sub")
        topic = f"mosq/{version}/t"
        fmt = "%t|%q|%r|%p" + ("|%P|%C" if v5 else "")
        sub = subprocess.Popen(
            ["mosquitto_sub", *base, "-V", version, "-i", cid, "-t", f"mosq/{version}/#",
             "-q", "1", "-C", "2", "-W", "30", "-F", fmt],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            until(lambda: any(x["client_id"] == cid for x in mqtt_subscriptions(shoal)),
                  f"mosquitto_sub ({version}) subscribed")
            props = (["-D", "publish", "user-property", "origin", "mosquitto",
                      "-D", "publish", "content-type", "text/plain"] if v5 else [])
            for i in range(2):
                subprocess.run(["mosquitto_pub", *base, "-V", version, "-q", "1", "-t", topic,
                                "-m", f"hello-{i}", *props], check=True, timeout=30)
            out, err = sub.communicate(timeout=30)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait()
        assert sub.returncode == 0, err
        extra = "|origin:mosquitto|text/plain" if v5 else ""
        assert out.splitlines() == [f"{topic}|1|0|hello-{i}{extra}" for i in range(2)], out

        # retained, through the command-line clients too
        subprocess.run(["mosquitto_pub", *base, "-V", version, "-q", "1", "-r",
                        "-t", f"mosq/{version}/ret", "-m", "kept"], check=True, timeout=30)
        got = subprocess.run(["mosquitto_sub", *base, "-V", version, "-t", f"mosq/{version}/ret",
                              "-C", "1", "-W", "10", "-F", "%t|%r|%p"],
                             capture_output=True, text=True, timeout=30)
        assert got.returncode == 0, got.stderr
        assert got.stdout.splitlines() == [f"mosq/{version}/ret|1|kept"], got.stdout
