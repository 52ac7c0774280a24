"""MQTT security: TLS and WebSocket-over-TLS listeners, user names and
passwords checked against the SCRAM users Kafka authenticates with, client
certificates as identities, and connection limits."""

from __future__ import annotations

import socket
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest

from certs import CLIENT_PRINCIPAL, make_certs, make_untrusted_client
from harness import free_port, shoal_bin, unique_name, wait_for

PASSWORD = "mqtt-user-password"


@pytest.fixture
def secure(shoal_factory, tmp_path):
    """A node with mqtt://, mqtts:// and wss:// listeners and one SCRAM
    user, `dave`."""
    certs = make_certs(tmp_path / "certs")
    ports = {k: free_port() for k in ("tcp", "tls", "wss")}
    s = shoal_factory(extra_args=[
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--mqtt-listeners",
        f"mqtt://127.0.0.1:{ports['tcp']},mqtts://127.0.0.1:{ports['tls']},"
        f"wss://127.0.0.1:{ports['wss']}",
    ])
    add = subprocess.run([shoal_bin(), "users", "add", "dave", "--password-stdin",
                          "--data-dir", str(s.data_dir)],
                         input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    s.start()
    return s, certs, ports


def connect(port: int, certs, *, user: str | None, password: str | None = None,
            websocket: bool = False, tls: bool = True,
            client_cert=None) -> tuple[mqtt.Client, object]:
    """A connected (or refused) MQTT 5 client and its CONNACK reason code.
    `client_cert`: a (cert, key) pair presented in the TLS handshake."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                    transport="websockets" if websocket else "tcp")
    if websocket:
        c.ws_set_options(path="/mqtt")
    if tls:
        if client_cert:
            c.tls_set(ca_certs=str(certs.ca), certfile=str(client_cert[0]),
                      keyfile=str(client_cert[1]))
        else:
            c.tls_set(ca_certs=str(certs.ca))
    if user is not None:
        c.username_pw_set(user, password)
    done = threading.Event()
    result = {}

    def on_connect(_c, _u, _f, reason, _p):
        result["reason"] = reason
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(15), "no CONNACK"
    return c, result["reason"]


def test_tls_listener_with_scram_user(secure):
    s, certs, ports = secure
    topic = f"{unique_name('sec')}/t"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(ports["tls"]), "--cafile", str(certs.ca),
         "-u", "dave", "-P", PASSWORD, "-t", topic, "-C", "1", "-W", "20", "-q", "1"],
        stdout=subprocess.PIPE, text=True)
    try:
        # Publish until the subscriber (connecting in parallel) gets one.
        for _ in range(100):
            pub = subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports["tls"]), "--cafile",
                 str(certs.ca), "-u", "dave", "-P", PASSWORD, "-t", topic, "-m", "over-tls",
                 "-q", "1"], capture_output=True, text=True, timeout=20)
            assert pub.returncode == 0, pub.stderr
            try:
                out, _ = sub.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            raise AssertionError("mosquitto_sub over TLS received nothing")
    finally:
        sub.kill()
    assert out.strip() == "over-tls"


def test_wrong_and_unknown_users_are_refused(secure):
    s, certs, ports = secure
    for user, password in [("dave", "not-the-password"), ("nobody", PASSWORD)]:
        c, reason = connect(ports["tls"], certs, user=user, password=password)
        c.loop_stop()
        # 0x86 Bad User Name or Password.
        assert reason.value == 0x86, (user, reason)
        pub = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports["tcp"]), "-u", user,
             "-P", password, "-t", "x", "-m", "x"], capture_output=True, text=True, timeout=20)
        assert pub.returncode != 0 and "refused" in (pub.stderr + pub.stdout).lower(), pub
    c, reason = connect(ports["tls"], certs, user="dave", password=PASSWORD)
    c.disconnect()
    c.loop_stop()
    assert reason.value == 0


def test_websocket_over_tls(secure):
    s, certs, ports = secure
    c, reason = connect(ports["wss"], certs, user="dave", password=PASSWORD, websocket=True)
    try:
        assert reason.value == 0, reason
        got = threading.Event()
        c.on_message = lambda _c, _u, m: got.set() if m.payload == b"via-wss" else None
        topic = f"{unique_name('wss')}/t"
        c.subscribe(topic, qos=1)
        for _ in range(50):
            c.publish(topic, b"via-wss", qos=1).wait_for_publish(10)
            if got.wait(0.2):
                break
        assert got.is_set(), "no message back over wss"
    finally:
        c.disconnect()
        c.loop_stop()


def test_plaintext_client_on_the_tls_port_fails_cleanly(secure):
    s, certs, ports = secure
    pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports["tls"]),
                          "-u", "dave", "-P", PASSWORD, "-t", "x", "-m", "x"],
                         capture_output=True, text=True, timeout=30)
    assert pub.returncode != 0
    assert s.http("/health").status == 200


# --------------------------------------------------------------------------
# client certificates as identities

#: The MQTT user name of the test client certificate: its subject, as the
#: Kafka principal names it without `User:`.
CERT_USER = CLIENT_PRINCIPAL.removeprefix("User:")


@pytest.fixture
def mtls(shoal_factory, tmp_path):
    """A node whose mqtts:// listener verifies client certificates against
    the test CA, refuses anonymous clients, and lets the certificate's
    subject publish and subscribe under `alice/`."""
    certs = make_certs(tmp_path / "certs")
    acl = tmp_path / "mqtt.acl"
    acl.write_text(f"user {CERT_USER}\ntopic readwrite alice/#\n")
    port = free_port()
    s = shoal_factory(extra_args=[
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-client-ca", str(certs.ca),
        "--mqtt-listeners", f"mqtts://127.0.0.1:{port}",
        "--mqtt-allow-anonymous", "false", "--mqtt-acl-file", str(acl),
    ]).start()
    return s, certs, port


def test_a_client_certificate_is_the_identity(mtls, tmp_path):
    s, certs, port = mtls
    topic = f"alice/{unique_name('cert')}"
    client = (certs.client_cert, certs.client_key)
    sub, reason = connect(port, certs, user=None, client_cert=client)
    try:
        assert reason.value == 0, reason
        got = threading.Event()
        sub.on_message = lambda _c, _u, m: got.set() if m.payload == b"by-cert" else None
        sub.subscribe(topic, qos=1)
        # mosquitto_pub with the certificate and no user name or password;
        # until the subscription (made in parallel) is in place.
        for _ in range(50):
            pub = subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(certs.ca),
                 "--cert", str(certs.client_cert), "--key", str(certs.client_key),
                 "-t", topic, "-m", "by-cert", "-q", "1"],
                capture_output=True, text=True, timeout=20)
            assert pub.returncode == 0, pub.stderr
            if got.wait(0.2):
                break
        assert got.is_set(), "the subscriber with a certificate received nothing"

        # The ACL of the certificate's subject applies: outside alice/ a
        # QoS 1 PUBLISH gets PUBACK 0x87 Not Authorized.
        acks = {}
        done = threading.Event()

        def on_publish(_c, _u, mid, reason, _p):
            acks[mid] = reason
            done.set()

        sub.on_publish = on_publish
        info = sub.publish(f"bob/{unique_name('x')}", b"no", qos=1)
        assert done.wait(15), "no PUBACK"
        assert acks[info.mid].value == 0x87, acks
    finally:
        sub.disconnect()
        sub.loop_stop()

    # A user name given beside a certificate changes nothing: the subject is
    # the identity (and no password is asked for).
    c, reason = connect(port, certs, user="someone-else", password="x", client_cert=client)
    c.disconnect()
    c.loop_stop()
    assert reason.value == 0, reason


def test_without_a_trusted_certificate_the_client_is_refused(mtls, tmp_path):
    s, certs, port = mtls
    # No certificate and no user name: anonymous, refused with 0x87.
    c, reason = connect(port, certs, user=None)
    c.loop_stop()
    assert reason.value == 0x87, reason
    # A certificate from a CA the broker does not trust: no TLS session.
    untrusted = make_untrusted_client(tmp_path / "untrusted")
    pub = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(certs.ca),
         "--cert", str(untrusted.cert), "--key", str(untrusted.key),
         "-t", "alice/x", "-m", "x", "-q", "1"],
        capture_output=True, text=True, timeout=30)
    assert pub.returncode != 0, pub
    assert s.http("/health").status == 200


# --------------------------------------------------------------------------
# connection limits


def mqtt_connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with Clean Session and a 60 s Keep Alive."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def open_session(port: int, client_id: str) -> socket.socket:
    """A TCP connection that sent CONNECT and got CONNACK 0 back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(mqtt_connect_packet(client_id))
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("closed before CONNACK")
            connack += chunk
        assert connack == b"\x20\x02\x00\x00", connack
    except BaseException:
        sock.close()
        raise
    return sock


def closed_unanswered(port: int) -> bool:
    """A new connection's CONNECT is met by the broker closing it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock.sendall(mqtt_connect_packet(unique_name("over")))
            return sock.recv(16) == b""
        except ConnectionResetError:
            return True
    finally:
        sock.close()


def test_connections_per_address_are_limited(shoal_factory):
    port = free_port()
    s = shoal_factory(extra_args=[
        "--mqtt-listeners", f"mqtt://127.0.0.1:{port}", "--max-connections-per-ip", "2",
    ]).start()
    socks = [open_session(port, unique_name("lim")) for _ in range(2)]
    try:
        assert closed_unanswered(port)
        # mosquitto_pub, as the third client, fails too.
        pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port),
                              "-t", "x", "-m", "x"], capture_output=True, text=True, timeout=30)
        assert pub.returncode != 0, pub
        # Closing one gives its place back (once the broker saw it close).
        socks.pop().close()
        socks.append(wait_for(lambda: open_session(port, unique_name("lim")), 30,
                              "a new MQTT connection to be accepted", interval=0.1))
        assert closed_unanswered(port)
    finally:
        for sock in socks:
            sock.close()
    assert s.http("/health").status == 200
