"""Kafka security end to end: listeners per security protocol (PLAINTEXT,
SSL, SASL_PLAINTEXT, SASL_SSL), TLS and mTLS, SASL PLAIN and SCRAM-SHA-256/512
with real clients (kcat, confluent-kafka, kafka-python), SCRAM users managed
through `shoal users` and through Kafka's Describe/AlterUserScramCredentials,
the address Metadata advertises per listener, KIP-368 re-authentication
(`--connections-max-reauth`), per-address connection limits and the request
size cap before authentication.

Certificates come from certs.py (the `openssl` command line): a CA, a
server certificate for localhost / 127.0.0.1 signed by it, a client
certificate for mTLS, and a client certificate from another CA that must be
refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from certs import Certs, KeyPair, make_certs, make_untrusted_client
from clients import RDKAFKA_LOGGER, kp_admin, kp_consume, kp_producer
from harness import Shoal, distinct_ports, free_port, shoal_bin, unique_name, wait_for
from kafka_wire import (API_METADATA, RawConnection, Reader, Record, api_versions_request_v0,
                        encode_record_batch, frame, i32, nbytes, pick_produce_version,
                        recv_frame, request_header, string)

# In CI (CI=true) a missing kcat is a failure, never a skip.
pytestmark = pytest.mark.skipif(shutil.which("kcat") is None and not os.environ.get("CI"),
                                reason="kcat not installed (tests/run.sh installs it)")

ALICE, ALICE_PW = "alice", "alice-Pa55word-for-scram"   # SCRAM-SHA-512 (and so PLAIN)
BOB, BOB_PW = "bob", "bob-other-Pa55word-256"            # SCRAM-SHA-256 only
WRONG_PW = "not-the-password-at-all"

#: kcat's metadata timeout (seconds) where a client is expected to fail.
FAIL_METADATA_TIMEOUT = "5"


# --------------------------------------------------------------------------
# certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> KeyPair:
    """A client certificate signed by another CA the broker does not trust."""
    return make_untrusted_client(tmp_path_factory.mktemp("rogue"))


# --------------------------------------------------------------------------
# the broker


def shoal_cli(*args: str, input: Optional[str] = None,
              env: Optional[dict] = None) -> subprocess.CompletedProcess:
    # The harness' own SHOAL_* variables are not configuration for the CLI.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    child_env.update(env or {})
    return subprocess.run([shoal_bin(), *args], input=input, capture_output=True, text=True,
                          timeout=60, env=child_env)


def add_user(name: str, password: str, mechanism: str, *target: str) -> None:
    """`shoal users add` against `--data-dir D` or `--server URL`."""
    out = shoal_cli("users", "add", name, "--mechanism", mechanism, "--password-stdin", *target,
                    input=password + "\n")
    assert out.returncode == 0, f"users add {name} {mechanism} failed:\n{out.stderr[-3000:]}"


@dataclass
class Listeners:
    plaintext: int
    sasl_ssl: int
    sasl_plaintext: int
    ssl: int


def secure_shoal(shoal_factory, certs: Certs, users=(), client_ca: bool = False,
                 extra_args=()) -> tuple[Shoal, Listeners]:
    """A started broker with one listener per security protocol, the TLS
    files of `certs`, and `users` ((name, password, mechanism), added to its
    data dir before the first start)."""
    kafka, http, mqtt, p1, p2, p3, p4 = distinct_ports(7)
    ls = Listeners(plaintext=p1, sasl_ssl=p2, sasl_plaintext=p3, ssl=p4)
    args = [
        "--kafka-listeners",
        f"PLAINTEXT://127.0.0.1:{p1},SASL_SSL://127.0.0.1:{p2},"
        f"SASL_PLAINTEXT://127.0.0.1:{p3},SSL://127.0.0.1:{p4}",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--sasl-mechanisms", "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
    ]
    if client_ca:
        args += ["--tls-client-ca", str(certs.ca)]
    s = shoal_factory(kafka_port=kafka, http_port=http, mqtt_port=mqtt,
                      extra_args=[*args, *extra_args])
    for name, password, mechanism in users:
        add_user(name, password, mechanism, "--data-dir", str(s.data_dir))
    s.start()
    return s, ls


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


# --------------------------------------------------------------------------
# client configurations


def rd_sasl(certs: Certs, user: str, password: str, mechanism: str, tls: bool = True) -> dict:
    """librdkafka properties (kcat -X and confluent-kafka) for a SASL listener."""
    conf = {
        "security.protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
        "sasl.mechanisms": mechanism,
        "sasl.username": user,
        "sasl.password": password,
    }
    if tls:
        conf["ssl.ca.location"] = str(certs.ca)
    return conf


def rd_ssl(certs: Certs, cert: Optional[Path] = None, key: Optional[Path] = None) -> dict:
    conf = {"security.protocol": "SSL", "ssl.ca.location": str(certs.ca)}
    if cert is not None:
        conf["ssl.certificate.location"] = str(cert)
        conf["ssl.key.location"] = str(key)
    return conf


def kp_sasl(certs: Certs, user: str, password: str, mechanism: str) -> dict:
    """kafka-python settings for the SASL_SSL listener."""
    return {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(certs.ca),
        "sasl_mechanism": mechanism,
        "sasl_plain_username": user,
        "sasl_plain_password": password,
    }


# --------------------------------------------------------------------------
# kcat


def kcat_run(port: int, conf: dict, *args: str, input: Optional[str] = None,
             timeout: float = 60.0) -> subprocess.CompletedProcess:
    cmd = ["kcat", "-b", addr(port), "-X", "broker.address.family=v4"]
    for k, v in conf.items():
        cmd += ["-X", f"{k}={v}"]
    cmd += list(args)
    try:
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s; "
                             f"stderr: {e.stderr!r}") from None


def kcat(port: int, conf: dict, *args: str, input: Optional[str] = None) -> str:
    res = kcat_run(port, conf, *args, input=input)
    assert res.returncode == 0, (f"kcat {' '.join(args)} on port {port} exited {res.returncode}"
                                 f"\nstderr:\n{res.stderr}")
    return res.stdout


def kcat_refused(port: int, conf: dict) -> subprocess.CompletedProcess:
    """`kcat -L` that must fail (and not hang)."""
    res = kcat_run(port, conf, "-L", "-m", FAIL_METADATA_TIMEOUT, timeout=60)
    assert res.returncode != 0, f"kcat -L on port {port} succeeded:\n{res.stdout}"
    return res


def read_to_eof(sock, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes; fails if it does not close."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the broker kept the connection open; got {data[:64]!r}") from None
        if not chunk:
            return data
        data += chunk


def kcat_roundtrip(port: int, conf: dict, n: int = 5) -> None:
    """Produce `n` lines to a fresh topic through the listener at `port` and
    consume them back: the values come back equal and in order."""
    topic = unique_name("kcat-sec")
    values = [f"{topic}-value-{i}" for i in range(n)]
    kcat(port, conf, "-P", "-t", topic, "-p", "0", input="".join(v + "\n" for v in values))
    out = kcat(port, conf, "-C", "-t", topic, "-p", "0", "-o", "beginning", "-e", "-q",
               "-f", r"%o|%s\n")
    rows = [line.split("|", 1) for line in out.splitlines() if line]
    assert [int(o) for o, _ in rows] == list(range(n)), rows
    assert [v for _, v in rows] == values


def kcat_metadata(port: int, conf: dict) -> dict:
    return json.loads(kcat(port, conf, "-L", "-J"))


# --------------------------------------------------------------------------
# confluent-kafka


def ck_conf(port: int, **conf) -> dict:
    out = {"bootstrap.servers": addr(port), "broker.address.family": "v4",
           "logger": RDKAFKA_LOGGER}
    out.update(conf)
    return out


def ck_roundtrip(port: int, conf: dict, n: int = 20) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    topic = unique_name("ck-sec")
    values = [f"{topic} message {i}".encode() for i in range(n)]
    delivered: list = []
    p = Producer(ck_conf(port, **conf, **{"acks": "all"}))
    for v in values:
        p.produce(topic, value=v, partition=0,
                  on_delivery=lambda err, msg: delivered.append((err, msg.offset())))
        p.poll(0)
    assert p.flush(60) == 0, "messages still in flight after 60 s"
    assert [e for e, _ in delivered if e is not None] == []
    assert sorted(o for _, o in delivered) == list(range(n))

    c = Consumer(ck_conf(port, **conf, **{"group.id": unique_name("ck-sec-reader"),
                                          "enable.auto.commit": False,
                                          "auto.offset.reset": "earliest"}))
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        got: list = []
        deadline = time.monotonic() + 60
        while len(got) < n:
            assert time.monotonic() < deadline, f"consumed {len(got)} of {n} from {topic}"
            for msg in c.consume(num_messages=100, timeout=0.5):
                assert msg.error() is None, f"consumer error: {msg.error()}"
                got.append(msg)
    finally:
        c.close()
    assert [m.offset() for m in got] == list(range(n))
    assert [m.value() for m in got] == values


def ck_auth_error(port: int, conf: dict):
    """A producer with bad credentials: its first message makes librdkafka
    connect; return the _AUTHENTICATION error it reports, and check that the
    message is not delivered."""
    from confluent_kafka import KafkaError, Producer

    errors: list = []
    delivered: list = []
    p = Producer(ck_conf(port, **conf, **{"error_cb": errors.append,
                                          "message.timeout.ms": 60000}))
    p.produce(unique_name("ck-refused"), value=b"must not arrive",
              on_delivery=lambda err, msg: delivered.append(err))

    def auth_error():
        p.poll(0.2)
        return next((e for e in errors if e.code() == KafkaError._AUTHENTICATION), None)

    err = wait_for(auth_error, 30, f"an _AUTHENTICATION error (errors so far: {errors})")
    # Not delivered: still queued (flush times out) and no success report.
    assert p.flush(1) == 1
    assert delivered == []
    p.purge()
    p.flush(5)
    return err


# --------------------------------------------------------------------------
# 1. kcat over SASL_SSL


def test_kcat_sasl_ssl_scram_and_plain(shoal_factory, certs):
    s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"))
    # PLAIN is checked against the same SCRAM credential.
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "PLAIN"))
    # And SASL without TLS on the SASL_PLAINTEXT listener.
    kcat_roundtrip(ls.sasl_plaintext, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512", tls=False))
    # A topic written over SASL_SSL reads back over PLAINTEXT: one broker.
    topic = unique_name("kcat-cross")
    kcat(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "PLAIN"), "-P", "-t", topic, "-p", "0",
         input="across\nlisteners\n")
    out = kcat(ls.plaintext, {}, "-C", "-t", topic, "-o", "beginning", "-e", "-q")
    assert out.split() == ["across", "listeners"]
    assert ALICE_PW not in s.log_text()


# --------------------------------------------------------------------------
# 2. confluent-kafka and kafka-python over SASL_SSL


def test_confluent_sasl_ssl_scram_sha_256(shoal_factory, certs):
    _s, ls = secure_shoal(shoal_factory, certs, users=[(BOB, BOB_PW, "SCRAM-SHA-256")])
    ck_roundtrip(ls.sasl_ssl, rd_sasl(certs, BOB, BOB_PW, "SCRAM-SHA-256"))
    # bob has no SCRAM-SHA-512 credential: that mechanism refuses him.
    err = ck_auth_error(ls.sasl_ssl, rd_sasl(certs, BOB, BOB_PW, "SCRAM-SHA-512"))
    assert "SASL authentication error" in err.str(), err.str()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_confluent_sasl_ssl(shoal_factory, certs, mechanism):
    _s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    ck_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, mechanism))


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_kafka_python_sasl_ssl(shoal_factory, certs, mechanism):
    _s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    sec = kp_sasl(certs, ALICE, ALICE_PW, mechanism)
    topic = unique_name("kp-sec")
    values = [f"{mechanism} record {i}".encode() for i in range(10)]
    p = kp_producer(addr(ls.sasl_ssl), **sec)
    try:
        offsets = [p.send(topic, value=v, partition=0).get(timeout=60).offset for v in values]
    finally:
        p.close(timeout=10)
    assert offsets == list(range(len(values)))
    recs = kp_consume(addr(ls.sasl_ssl), topic, len(values), partitions=[0], **sec)
    assert [r.value for r in recs] == values
    assert [r.offset for r in recs] == list(range(len(values)))


# --------------------------------------------------------------------------
# 3. wrong password, unknown user


def test_bad_credentials_are_refused_and_the_broker_keeps_serving(shoal_factory, certs):
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaTimeoutError

    s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    cases = [(ALICE, WRONG_PW, "SCRAM-SHA-512"), (ALICE, WRONG_PW, "PLAIN"),
             ("nobody", WRONG_PW, "SCRAM-SHA-512"), ("nobody", WRONG_PW, "PLAIN"),
             # alice has no SCRAM-SHA-256 credential.
             (ALICE, ALICE_PW, "SCRAM-SHA-256")]
    # confluent-kafka: an _AUTHENTICATION error, and nothing delivered.
    for user, password, mechanism in cases:
        err = ck_auth_error(ls.sasl_ssl, rd_sasl(certs, user, password, mechanism))
        assert "SASL authentication error" in err.str(), (user, mechanism, err.str())
        assert not err.retriable(), err
    # The SASL_PLAINTEXT listener refuses them too.
    ck_auth_error(ls.sasl_plaintext, rd_sasl(certs, ALICE, WRONG_PW, "PLAIN", tls=False))

    # kafka-python: the server answers SASL_AUTHENTICATION_FAILED and closes;
    # kafka-python 3.0.12 keeps retrying the bootstrap and finally raises
    # KafkaTimeoutError ("Unable to bootstrap").
    # Each attempt shows up in the broker's log as a refused authentication.
    for user, password, mechanism in cases[:4]:
        refusals = s.log_text().count("SASL authentication failed")
        with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
            admin = KafkaAdminClient(bootstrap_servers=addr(ls.sasl_ssl),
                                     request_timeout_ms=10000, bootstrap_timeout_ms=3000,
                                     **kp_sasl(certs, user, password, mechanism))
            admin.close()  # not reached unless the broker let it in
        wait_for(lambda: s.log_text().count("SASL authentication failed") > refusals, 10,
                 f"the broker to log the refusal of {user} / {mechanism}")

    log = s.log_text()
    assert "SASL authentication failed" in log
    assert WRONG_PW not in log and ALICE_PW not in log
    assert "panicked" not in log
    # The broker still serves a correct client on both listeners.
    assert s.http("/health").status == 200
    ck_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"), n=3)
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "PLAIN"), n=3)


def test_requests_before_authentication_close_the_connection(shoal_factory, certs):
    _s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    # Metadata v0 (every topic), on the PLAINTEXT listener: answered.
    with RawConnection("127.0.0.1", ls.plaintext) as conn:
        cid = conn.next_cid()
        conn.sock.sendall(frame(request_header(API_METADATA, 0, cid) + i32(0)))
        assert i32(cid) == recv_frame(conn.sock)[:4]
    # On the SASL_PLAINTEXT listener ApiVersions is allowed, but Metadata
    # before SaslHandshake/SaslAuthenticate closes the connection unanswered.
    with RawConnection("127.0.0.1", ls.sasl_plaintext) as conn:
        assert API_METADATA in conn.api_versions()
        cid = conn.next_cid()
        conn.sock.sendall(frame(request_header(API_METADATA, 0, cid) + i32(0)))
        with pytest.raises(ConnectionError):
            recv_frame(conn.sock)


# --------------------------------------------------------------------------
# 4. a plaintext client on a TLS port


def test_plaintext_client_on_tls_ports_fails_cleanly(shoal_factory, certs):
    s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    for port in (ls.ssl, ls.sasl_ssl):
        started = time.monotonic()
        kcat_refused(port, {"security.protocol": "PLAINTEXT"})
        assert time.monotonic() - started < 30
    # Raw Kafka bytes straight into the TLS ports: at most a TLS alert
    # record (content type 21), never a Kafka answer, then the broker closes.
    for port in (ls.ssl, ls.sasl_ssl):
        with RawConnection("127.0.0.1", port) as conn:
            conn.sock.sendall(api_versions_request_v0(conn.next_cid()))
            answer = read_to_eof(conn.sock)
        assert answer == b"" or answer[0] == 21, (port, answer[:64])
    s.assert_alive()
    assert s.http("/health").status == 200
    assert "panicked" not in s.log_text()
    kcat_roundtrip(ls.ssl, rd_ssl(certs), n=3)
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"), n=3)
    kcat_roundtrip(ls.plaintext, {}, n=3)


# --------------------------------------------------------------------------
# 5. mTLS


def test_mtls_client_certificate(shoal_factory, certs, rogue):
    s, ls = secure_shoal(shoal_factory, certs, client_ca=True)
    conf = rd_ssl(certs, certs.client_cert, certs.client_key)
    kcat_roundtrip(ls.ssl, conf)
    md = kcat_metadata(ls.ssl, conf)
    assert [b["name"] for b in md["brokers"]] == [addr(ls.ssl)], md["brokers"]
    # A certificate from a CA the broker does not trust is refused.
    refused = kcat_refused(ls.ssl, rd_ssl(certs, rogue.cert, rogue.key))
    assert "unknown ca" in refused.stderr, refused.stderr
    # ... and the broker keeps serving the trusted one.
    kcat_roundtrip(ls.ssl, conf, n=2)
    assert s.http("/health").status == 200


def test_kafka_python_mtls(shoal_factory, certs):
    _s, ls = secure_shoal(shoal_factory, certs, client_ca=True)
    sec = {"security_protocol": "SSL", "ssl_cafile": str(certs.ca),
           "ssl_certfile": str(certs.client_cert), "ssl_keyfile": str(certs.client_key)}
    topic = unique_name("kp-mtls")
    values = [f"mtls record {i}".encode() for i in range(10)]
    p = kp_producer(addr(ls.ssl), **sec)
    try:
        offsets = [p.send(topic, value=v, partition=0).get(timeout=60).offset for v in values]
    finally:
        p.close(timeout=10)
    assert offsets == list(range(len(values)))
    recs = kp_consume(addr(ls.ssl), topic, len(values), partitions=[0], **sec)
    assert [r.value for r in recs] == values


# --------------------------------------------------------------------------
# 6. users through Kafka's API


def test_scram_users_through_kafka_admin_api(shoal_factory, certs):
    from kafka.admin import (ScramMechanism, UserScramCredentialDeletion,
                             UserScramCredentialUpsertion)

    # alice is a super user (ALTER and DESCRIBE on the cluster); topics
    # without ACLs stay open, so carol can produce and consume.
    s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")],
                         extra_args=["--authorizer", "true", "--super-users", f"User:{ALICE}",
                                     "--allow-everyone-if-no-acl-found", "true"])
    carol_pw = "carol-Pa55word-from-kafka"
    carol = rd_sasl(certs, "carol", carol_pw, "SCRAM-SHA-512")
    # carol does not exist yet.
    kcat_refused(ls.sasl_ssl, carol)

    admin = kp_admin(addr(ls.sasl_ssl), **kp_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"))
    try:
        res = admin.alter_user_scram_credentials([
            UserScramCredentialUpsertion("carol", ScramMechanism.SCRAM_SHA_512, carol_pw,
                                         iterations=8192)])
        assert res == {"carol": None}, res
        desc = admin.describe_user_scram_credentials(["carol", ALICE])
        assert desc["carol"]["error"] is None, desc
        assert desc["carol"]["credential_infos"] == [
            {"mechanism": ScramMechanism.SCRAM_SHA_512, "iterations": 8192}], desc
        assert desc[ALICE]["credential_infos"] == [
            {"mechanism": ScramMechanism.SCRAM_SHA_512, "iterations": 4096}], desc
        every = admin.describe_user_scram_credentials()
        assert set(every) == {ALICE, "carol"}, every

        # carol authenticates, with SCRAM and with PLAIN.
        kcat_roundtrip(ls.sasl_ssl, carol, n=3)
        kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, "carol", carol_pw, "PLAIN"), n=2)
        listed = shoal_cli("users", "list", "--server", s.http_base)
        assert listed.returncode == 0, listed.stderr
        assert "carol\tSCRAM-SHA-512" in listed.stdout.splitlines(), listed.stdout

        # Delete the credential: carol is refused from then on.
        res = admin.alter_user_scram_credentials([
            UserScramCredentialDeletion("carol", ScramMechanism.SCRAM_SHA_512)])
        assert res == {"carol": None}, res
        desc = admin.describe_user_scram_credentials(["carol"])
        assert desc["carol"]["error"] and desc["carol"]["credential_infos"] == [], desc
        # Deleting it again: the user has no such credential.
        res = admin.alter_user_scram_credentials([
            UserScramCredentialDeletion("carol", ScramMechanism.SCRAM_SHA_512)])
        assert res["carol"] is not None, res
    finally:
        admin.close()

    def carol_refused():
        res = kcat_run(ls.sasl_ssl, carol, "-L", "-m", FAIL_METADATA_TIMEOUT)
        return res.returncode != 0 and "SASL authentication error" in res.stderr
    wait_for(carol_refused, 30, "carol to be refused after her credential was deleted",
             interval=0.5)
    assert carol_pw not in s.log_text()
    # alice still works.
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"), n=2)


def test_without_an_authorizer_users_change_only_their_own_credentials(shoal_factory, certs):
    from kafka.admin import ScramMechanism, UserScramCredentialUpsertion
    from kafka.errors import ClusterAuthorizationFailedError

    s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512"),
                                                      (BOB, BOB_PW, "SCRAM-SHA-512")])
    new_pw = "bob-N3w-password-of-his-own"
    bob = kp_admin(addr(ls.sasl_ssl), **kp_sasl(certs, BOB, BOB_PW, "SCRAM-SHA-512"))
    try:
        res = bob.alter_user_scram_credentials([
            UserScramCredentialUpsertion(ALICE, ScramMechanism.SCRAM_SHA_512, "taken-over-1234"),
            UserScramCredentialUpsertion(BOB, ScramMechanism.SCRAM_SHA_512, new_pw)])
        assert res[ALICE] is not None and res[BOB] is None, res
    finally:
        bob.close()
    # alice's password is unchanged; bob's new one works.
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"), n=2)
    wait_for(lambda: kcat_run(ls.sasl_ssl, rd_sasl(certs, BOB, new_pw, "SCRAM-SHA-512"),
                              "-L", "-m", "10").returncode == 0,
             30, "bob's new password to work", interval=0.5)
    # An anonymous client (PLAINTEXT listener) may neither list users nor
    # change a password.
    anon = kp_admin(addr(ls.plaintext))
    try:
        with pytest.raises(ClusterAuthorizationFailedError):
            anon.describe_user_scram_credentials()
        res = anon.alter_user_scram_credentials([
            UserScramCredentialUpsertion(ALICE, ScramMechanism.SCRAM_SHA_512, "taken-over-1234")])
        assert res[ALICE] is not None, res
    finally:
        anon.close()
    kcat_roundtrip(ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512"), n=2)


def test_certificates_are_reloaded_without_dropping_connections(shoal_factory, tmp_path):
    """The certificate files replaced and SIGHUP sent: new connections get
    the new certificate, and a connection made before goes on working."""
    import signal
    import ssl

    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    kafka, http, mqtt, plain, tls_port = distinct_ports(5)
    s = shoal_factory(kafka_port=kafka, http_port=http, mqtt_port=mqtt, extra_args=[
        "--kafka-listeners", f"PLAINTEXT://127.0.0.1:{plain},SSL://127.0.0.1:{tls_port}",
        "--tls-cert", str(cert), "--tls-key", str(key)]).start()

    def trusting(certs: Certs) -> dict:
        return {"security.protocol": "SSL", "ssl.ca.location": str(certs.ca)}

    kcat(tls_port, trusting(old), "-L")
    kept = RawConnection("127.0.0.1", tls_port)
    ctx = ssl.create_default_context(cafile=str(old.ca))
    kept.sock = ctx.wrap_socket(kept.sock, server_hostname="localhost")
    try:
        assert API_METADATA in kept.api_versions()
        # Replace both files (each in one rename), then signal.
        for src, dst in [(new.server_key, key), (new.server_cert, cert)]:
            tmp = dst.with_suffix(".tmp")
            shutil.copy(src, tmp)
            os.replace(tmp, dst)
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: kcat_run(tls_port, trusting(new), "-L", "-m", "5").returncode == 0,
                 30, "a client trusting only the new CA to connect", interval=0.5)
        kcat_refused(tls_port, trusting(old))
        # The connection made under the old certificate still works.
        assert API_METADATA in kept.api_versions()
    finally:
        kept.close()
    assert s.http("/health").status == 200


# --------------------------------------------------------------------------
# 7. Metadata advertises the listener the client used


def test_metadata_advertises_the_listener_used(shoal_factory, certs):
    _s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    topic = unique_name("md-sec")
    kcat(ls.plaintext, {}, "-P", "-t", topic, "-p", "0", input="x\n")
    for port, conf in [
        (ls.plaintext, {}),
        (ls.sasl_ssl, rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512")),
        (ls.sasl_plaintext, rd_sasl(certs, ALICE, ALICE_PW, "PLAIN", tls=False)),
        (ls.ssl, rd_ssl(certs)),
    ]:
        md = kcat_metadata(port, conf)
        brokers = {b["id"]: b["name"] for b in md["brokers"]}
        assert list(brokers.values()) == [addr(port)], (port, md["brokers"])
        topics = {t["topic"]: t for t in md["topics"]}
        assert topic in topics, (port, sorted(topics))
        leader = topics[topic]["partitions"][0]["leader"]
        assert brokers.get(leader) == addr(port), (port, md)


# --------------------------------------------------------------------------
# 8. shoal users list / add / delete


def test_users_cli_lists_names_and_mechanisms_only(shoal_factory, certs):
    kafka, http, mqtt, p1, p2, p3, p4 = distinct_ports(7)
    ls = Listeners(plaintext=p1, sasl_ssl=p2, sasl_plaintext=p3, ssl=p4)
    s = shoal_factory(kafka_port=kafka, http_port=http, mqtt_port=mqtt, extra_args=[
        "--kafka-listeners", f"PLAINTEXT://127.0.0.1:{p1},SASL_SSL://127.0.0.1:{p2}",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)])
    data = ["--data-dir", str(s.data_dir)]
    add_user(ALICE, ALICE_PW, "SCRAM-SHA-512", *data)
    add_user(ALICE, ALICE_PW, "SCRAM-SHA-256", *data)
    add_user(BOB, BOB_PW, "SCRAM-SHA-256", *data)

    def listing(*target: str) -> dict[str, set[str]]:
        out = shoal_cli("users", "list", *target)
        assert out.returncode == 0, out.stderr[-3000:]
        for secret in (ALICE_PW, BOB_PW):
            assert secret not in out.stdout and secret not in out.stderr
        users: dict[str, set[str]] = {}
        for line in out.stdout.splitlines():
            fields = line.split("\t")
            assert len(fields) == 2, f"unexpected line {line!r} in:\n{out.stdout}"
            mechs = fields[1].split(",")
            assert set(mechs) <= {"SCRAM-SHA-256", "SCRAM-SHA-512"}, line
            users[fields[0]] = set(mechs)
        # Nothing that looks like a salt, a key or a hash.
        assert not re.search(r"[A-Za-z0-9+/=]{24,}|[0-9a-fA-F]{32,}", out.stdout), out.stdout
        return users

    assert listing(*data) == {ALICE: {"SCRAM-SHA-256", "SCRAM-SHA-512"},
                              BOB: {"SCRAM-SHA-256"}}
    out = shoal_cli("users", "delete", ALICE, "--mechanism", "SCRAM-SHA-256", *data)
    assert out.returncode == 0, out.stderr[-3000:]
    assert listing(*data) == {ALICE: {"SCRAM-SHA-512"}, BOB: {"SCRAM-SHA-256"}}
    # The passwords are not stored as such.
    for f in s.data_dir.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert ALICE_PW.encode() not in blob and BOB_PW.encode() not in blob, f

    # Against the running node: the same listing, and a user added there can
    # authenticate at once.
    s.start()
    server = ["--server", s.http_base]
    assert listing(*server) == {ALICE: {"SCRAM-SHA-512"}, BOB: {"SCRAM-SHA-256"}}
    dave_pw = "dave-Pa55word-added-live"
    add_user("dave", dave_pw, "SCRAM-SHA-512", *server)
    assert listing(*server)["dave"] == {"SCRAM-SHA-512"}
    dave = rd_sasl(certs, "dave", dave_pw, "SCRAM-SHA-512")
    # Brokers follow placement's users by polling: wait for dave to arrive.
    wait_for(lambda: kcat_run(ls.sasl_ssl, dave, "-L", "-m", "2").returncode == 0, 30,
             "dave, added through --server, to authenticate", interval=0.2)
    kcat_roundtrip(ls.sasl_ssl, dave, n=2)
    out = shoal_cli("users", "delete", "dave", *server)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dave" not in listing(*server)

    def dave_refused():
        res = kcat_run(ls.sasl_ssl, dave, "-L", "-m", FAIL_METADATA_TIMEOUT)
        return res.returncode != 0 and "SASL authentication error" in res.stderr
    wait_for(dave_refused, 30, "dave to be refused after `users delete`", interval=0.2)
    assert dave_pw not in s.log_text() and ALICE_PW not in s.log_text()


# --------------------------------------------------------------------------
# raw SASL on the wire


API_SASL_HANDSHAKE = 17
API_SASL_AUTHENTICATE = 36


def raw_sasl_handshake(conn: RawConnection, mechanism: str) -> None:
    """SaslHandshake v1 for `mechanism`; it must be accepted."""
    cid = conn.next_cid()
    conn.sock.sendall(frame(request_header(API_SASL_HANDSHAKE, 1, cid) + string(mechanism)))
    r = Reader(recv_frame(conn.sock))
    assert r.i32() == cid
    error = r.i16()
    offered = [r.string() for _ in range(r.i32())]
    assert error == 0, f"SaslHandshake {mechanism}: error {error}, offered {offered}"


def raw_sasl_plain(conn: RawConnection, user: str, password: str) -> int:
    """SaslHandshake v1 then SaslAuthenticate v1 with PLAIN; it must succeed.
    Returns the session lifetime (ms) the broker answered."""
    raw_sasl_handshake(conn, "PLAIN")
    cid = conn.next_cid()
    token = b"\0" + user.encode() + b"\0" + password.encode()
    conn.sock.sendall(frame(request_header(API_SASL_AUTHENTICATE, 1, cid) + nbytes(token)))
    r = Reader(recv_frame(conn.sock))
    assert r.i32() == cid
    error, message = r.i16(), r.string()
    assert error == 0, f"SaslAuthenticate PLAIN as {user}: error {error} ({message})"
    n = r.i32()
    r.take(max(n, 0))  # auth_bytes
    return r.i64()  # session_lifetime_ms (v1+)


def raw_metadata(conn: RawConnection) -> bytes:
    """Metadata v0 for every topic: sent now; returns the answer (raises
    ConnectionError if the broker closes instead)."""
    cid = conn.next_cid()
    conn.sock.sendall(frame(request_header(API_METADATA, 0, cid) + i32(0)))
    answer = recv_frame(conn.sock)
    assert answer[:4] == i32(cid), answer[:16]
    return answer


def wait_until(deadline: float) -> None:
    """Until time.monotonic() passes `deadline` (a protocol deadline being
    measured, not a wait for something to happen)."""
    while time.monotonic() <= deadline:
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0) + 0.001))


def kafka_requests(s: Shoal, api: str) -> float:
    """shoal_kafka_requests_total for one API (0 when never counted)."""
    m = re.search(rf'^shoal_kafka_requests_total\{{api="{api}"\}} (\S+)$', s.metrics_text(),
                  re.M)
    return float(m.group(1)) if m else 0.0


REAUTH_MS = 2000


def reauth_shoal(shoal_factory, certs: Certs) -> tuple[Shoal, Listeners]:
    return secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")],
                        extra_args=["--connections-max-reauth", str(REAUTH_MS)])


# --------------------------------------------------------------------------
# 9. KIP-368 re-authentication


def test_reauthentication_keeps_a_producer_on_one_connection(shoal_factory, certs):
    from confluent_kafka import Producer

    s, ls = reauth_shoal(shoal_factory, certs)
    topic = unique_name("reauth")
    kcat(ls.plaintext, {}, "-P", "-t", topic, "-p", "0", input="created\n")
    handshakes_before = kafka_requests(s, "SaslHandshake")

    stats: list[dict] = []
    delivered: list = []
    p = Producer(ck_conf(ls.sasl_plaintext,
                         **rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512", tls=False),
                         **{"acks": "all", "statistics.interval.ms": 500,
                            "stats_cb": lambda j: stats.append(json.loads(j))}))
    # One record every ~0.2 s for 7 s: more than three session lifetimes.
    # (poll() returns early for each delivery report: pace by the clock.)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 7.0:
        p.produce(topic, value=f"reauth {sent}".encode(), partition=0,
                  on_delivery=lambda err, msg: delivered.append((err, msg.offset())))
        sent += 1
        while (left := started + 0.2 * sent - time.monotonic()) > 0:
            p.poll(left)
    assert p.flush(60) == 0, "messages still in flight after 60 s"
    assert 25 <= sent <= 36, sent
    assert [e for e, _ in delivered if e is not None] == [], delivered
    assert sorted(o for _, o in delivered) == list(range(1, sent + 1)), delivered

    # librdkafka's own count: one connection to the broker (node 1), never
    # dropped, on which it shook hands again every session.
    seen = len(stats)
    wait_for(lambda: p.poll(0.1) is not None and len(stats) > seen, 30,
             "a statistics report after the last delivery")
    [node] = [b for b in stats[-1]["brokers"].values() if b["nodeid"] == 1]
    assert node["connects"] == 1 and node["disconnects"] == 0, node
    assert node["req"]["SaslHandshake"] >= 3, node["req"]
    assert node["req"]["SaslAuthenticate"] >= 6, node["req"]  # SCRAM: two steps each
    # And the broker's: every one of those handshakes reached it.
    assert kafka_requests(s, "SaslHandshake") - handshakes_before >= node["req"]["SaslHandshake"]
    assert "SASL authentication failed" not in s.log_text()
    assert "the SASL session expired" not in s.log_text()


def test_expired_sasl_session_closes_the_connection(shoal_factory, certs):
    s, ls = reauth_shoal(shoal_factory, certs)
    lifetime = REAUTH_MS / 1000

    # A session lives REAUTH_MS: answered within it, closed unanswered after.
    with RawConnection("127.0.0.1", ls.sasl_plaintext) as conn:
        assert raw_sasl_plain(conn, ALICE, ALICE_PW) == REAUTH_MS
        # The broker started the session before this answer arrived.
        authenticated = time.monotonic()
        raw_metadata(conn)
        wait_until(authenticated + lifetime + 0.2)
        with pytest.raises(ConnectionError):
            raw_metadata(conn)

    # Re-authenticating on the connection starts a new session: a request
    # after the first session's end is answered, and one after the second's
    # is not.
    with RawConnection("127.0.0.1", ls.sasl_plaintext) as conn:
        assert raw_sasl_plain(conn, ALICE, ALICE_PW) == REAUTH_MS
        first = time.monotonic()
        wait_until(first + lifetime * 0.4)
        again = time.monotonic()  # the second session starts after this
        assert raw_sasl_plain(conn, ALICE, ALICE_PW) == REAUTH_MS
        second = time.monotonic()
        wait_until(first + lifetime + 0.2)
        assert time.monotonic() < again + lifetime - 0.2, \
            "the test client ran too late to check the second session"
        raw_metadata(conn)
        wait_until(second + lifetime + 0.2)
        with pytest.raises(ConnectionError):
            raw_metadata(conn)
    log = s.log_text()
    assert "the SASL session expired" in log
    assert ALICE_PW not in log
    s.assert_alive()


# --------------------------------------------------------------------------
# 10. connection limits


def refused_at_once(port: int) -> None:
    """A new connection to `port` is closed by the broker, unanswered."""
    with RawConnection("127.0.0.1", port) as conn:
        try:
            conn.sock.sendall(api_versions_request_v0(conn.next_cid()))
        except OSError:
            pass  # already closed (reset) by the broker
        answer = read_to_eof(conn.sock)
    assert answer == b"", answer[:64]


def test_max_connections_per_ip(shoal_factory):
    kafka, http, mqtt, port = distinct_ports(4)
    s = shoal_factory(kafka_port=kafka, http_port=http, mqtt_port=mqtt, extra_args=[
        "--kafka-listeners", f"PLAINTEXT://127.0.0.1:{port}", "--max-connections-per-ip", "3"])
    s.start()
    assert s.metrics().get("shoal_kafka_connections_refused_total", 0) == 0
    conns = [RawConnection("127.0.0.1", port) for _ in range(3)]
    try:
        for conn in conns:
            assert API_METADATA in conn.api_versions()
        refused_at_once(port)
        # The three still work.
        for conn in conns:
            assert API_METADATA in conn.api_versions()

        # Closing one gives its place back (once the broker saw it close).
        conns.pop(0).close()

        def answered():
            conn = RawConnection("127.0.0.1", port)
            try:
                conn.api_versions()
            except Exception:
                conn.close()
                raise
            return conn
        conns.append(wait_for(answered, 30, "a new connection to be answered", interval=0.1))
        # Three open again: the next is refused.
        refused_at_once(port)
        for conn in conns:
            assert API_METADATA in conn.api_versions()
    finally:
        for conn in conns:
            conn.close()
    assert s.metrics().get("shoal_kafka_connections_refused_total", 0) >= 2
    s.assert_alive()


# --------------------------------------------------------------------------
# 11. the request size cap before authentication


def test_large_request_before_authentication_closes_the_connection(shoal_factory, certs):
    s, ls = secure_shoal(shoal_factory, certs, users=[(ALICE, ALICE_PW, "SCRAM-SHA-512")])
    big = 600_000  # above the 512 KiB cap, far below --max-request-bytes
    with RawConnection("127.0.0.1", ls.sasl_plaintext) as conn:
        assert API_METADATA in conn.api_versions()
        # Only the length and the start of a header: without the cap the
        # broker would wait for the rest (30 s) rather than close.
        conn.sock.sendall(i32(big) + request_header(API_METADATA, 0, conn.next_cid()))
        started = time.monotonic()
        answer = read_to_eof(conn.sock, timeout=15)
        assert answer == b"", answer[:64]
        assert time.monotonic() - started < 15

    # Once authenticated the same size is read and answered: a 600 kB produce.
    conf = rd_sasl(certs, ALICE, ALICE_PW, "SCRAM-SHA-512", tls=False)
    topic = unique_name("big")
    kcat(ls.sasl_plaintext, conf, "-P", "-t", topic, "-p", "0", input="small\n")
    with RawConnection("127.0.0.1", ls.sasl_plaintext, timeout=60) as conn:
        version = pick_produce_version(conn.api_versions())
        raw_sasl_plain(conn, ALICE, ALICE_PW)
        batch = encode_record_batch([Record(value=b"x" * big)])
        [res] = conn.produce(version, topic, 0, batch)
        assert (res.error_code, res.base_offset) == (0, 1), res
    kcat_roundtrip(ls.sasl_plaintext, conf, n=3)
    s.assert_alive()
    assert "panicked" not in s.log_text()
