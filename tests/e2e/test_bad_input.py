"""Bad input from one client gets a protocol error or a closed connection for
that client alone: never a crash, never unbounded memory, never lost data
(docs/reliability.md).

After every scenario the broker process must still be alive, /health must be
200 and a well-behaved client (kafka-python) must still produce and consume.
"""

from __future__ import annotations

import random
import socket
import pytest

from clients import kafka_python_roundtrip, kp_consume, kp_end_offsets, kp_producer
from harness import unique_name, wait_for
from kafka_wire import (
    API_METADATA,
    RawConnection,
    Record,
    corrupt_crc,
    corrupt_payload,
    encode_record_batch,
    frame,
    i32,
    pick_produce_version,
    request_header,
)

CORRUPT_MESSAGE = 2


def assert_broker_ok(shoal) -> None:
    shoal.assert_alive()
    assert shoal.health_status() == 200
    kafka_python_roundtrip(shoal.bootstrap)
    shoal.assert_alive()


def connect(shoal, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", shoal.kafka_port), timeout=timeout)
    s.settimeout(timeout)
    return s


def send_ignoring_disconnect(sock: socket.socket, data: bytes) -> None:
    """The broker may close the connection while we are still sending."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def closed_or_answered(sock: socket.socket, timeout: float = 10.0) -> tuple[str, bytes]:
    """Wait until the broker either closes the connection ('closed') or sends
    something back ('answered'). Fails if it does neither within `timeout`."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return "closed", b""
    except socket.timeout:
        raise AssertionError(
            f"the broker neither answered nor closed the connection within {timeout:.0f}s")
    return ("closed", b"") if not data else ("answered", data)


# --------------------------------------------------------------------------


def test_wire_encoder_selfcheck():
    """The hand-made record batches used below are valid Kafka batches (checked
    with kafka-python's decoder), so a CORRUPT_MESSAGE answer can only be about
    the CRC we broke on purpose."""
    from kafka.record.default_records import DefaultRecordBatch

    recs = [Record(b"v0"), Record(b"v1", key=b"k1", headers=[("h", b"x")], timestamp_delta=3),
            Record(None, key=b"tombstone")]
    batch = encode_record_batch(recs, base_timestamp=1_700_000_000_000)
    decoded = DefaultRecordBatch(batch)
    assert decoded.validate_crc()
    got = [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in decoded]
    assert got == [
        (0, 1_700_000_000_000, None, b"v0", []),
        (1, 1_700_000_000_003, b"k1", b"v1", [("h", b"x")]),
        (2, 1_700_000_000_000, b"tombstone", None, []),
    ]
    assert not DefaultRecordBatch(corrupt_crc(batch)).validate_crc()
    assert not DefaultRecordBatch(corrupt_payload(batch)).validate_crc()


def test_truncated_frame(shoal):
    # A frame that announces 100 bytes but carries 10. While it is pending,
    # other clients must be served.
    s = connect(shoal)
    s.sendall(i32(100) + request_header(API_METADATA, 1, 7)[:10])
    assert_broker_ok(shoal)
    # Then the client goes away in the middle of the frame.
    s.close()
    assert_broker_ok(shoal)

    # Same again, but half-close first so the broker sees EOF mid-frame.
    s = connect(shoal)
    s.sendall(i32(100) + b"\x00" * 10)
    s.shutdown(socket.SHUT_WR)
    closed_or_answered(s)  # must not wait forever for the missing 90 bytes
    s.close()
    assert_broker_ok(shoal)


@pytest.mark.parametrize("length", [0x7FFFFFFF, 0xFFFFFFFF], ids=["2GiB", "negative"])
def test_huge_length_prefix(shoal, length):
    rss_before = shoal.rss_bytes()
    s = connect(shoal)
    send_ignoring_disconnect(s, length.to_bytes(4, "big") + b"\x00" * 16384)
    how, _ = closed_or_answered(s)
    s.close()
    shoal.assert_alive()
    growth = shoal.rss_bytes() - rss_before
    assert growth < 256 * 1024 * 1024, (
        f"RSS grew by {growth / 2**20:.0f} MiB after a frame announcing {length:#x} bytes ({how})")
    assert_broker_ok(shoal)


@pytest.mark.parametrize("api_key,api_version", [(9999, 0), (API_METADATA, 999), (-1, 0)],
                         ids=["unknown-key", "unsupported-version", "negative-key"])
def test_unknown_api(shoal, api_key, api_version):
    s = connect(shoal)
    cid = 4242
    s.sendall(frame(request_header(api_key, api_version, cid) + b"\x00" * 16))
    how, data = closed_or_answered(s)
    if how == "answered":
        # Whatever the broker says, it must be a well-framed answer to *this* request.
        s.settimeout(10)
        buf = data
        while len(buf) < 8:
            more = s.recv(65536)
            if not more:
                break
            buf += more
        assert len(buf) >= 8, f"short answer {buf!r}"
        size = int.from_bytes(buf[:4], "big", signed=True)
        assert 4 <= size <= 1 << 20, f"implausible answer size {size}"
        assert int.from_bytes(buf[4:8], "big", signed=True) == cid
    s.close()
    assert_broker_ok(shoal)


def test_produce_with_bad_crc_is_rejected(shoal):
    topic = unique_name("crc")
    p = kp_producer(shoal.bootstrap)
    try:
        assert p.send(topic, value=b"before", partition=0).get(timeout=60).offset == 0
    finally:
        p.close(timeout=10)

    with RawConnection("127.0.0.1", shoal.kafka_port) as conn:
        version = pick_produce_version(conn.api_versions())
        good = encode_record_batch([Record(b"good-0"), Record(b"good-1", key=b"k")])
        res = conn.produce(version, topic, 0, good)
        assert [(r.topic, r.partition, r.error_code) for r in res] == [(topic, 0, 0)], \
            f"a valid hand-made batch was not accepted (Produce v{version}): {res}"
        assert res[0].base_offset == 1

    for name, bad in [
        ("flipped crc", corrupt_crc(encode_record_batch([Record(b"BAD-crc-0"), Record(b"BAD-crc-1")]))),
        ("flipped payload", corrupt_payload(encode_record_batch([Record(b"BAD-payload-0")]))),
    ]:
        with RawConnection("127.0.0.1", shoal.kafka_port) as conn:
            res = conn.produce(version, topic, 0, bad)
            assert [(r.topic, r.partition) for r in res] == [(topic, 0)], res
            assert res[0].error_code == CORRUPT_MESSAGE, \
                f"{name}: expected CORRUPT_MESSAGE (2), got error {res[0].error_code}"
        shoal.assert_alive()

    # Nothing of the corrupt batches made it into the log.
    recs = kp_consume(shoal.bootstrap, topic, 3, partitions=[0])
    assert [r.value for r in recs] == [b"before", b"good-0", b"good-1"]
    assert kp_end_offsets(shoal.bootstrap, topic, [0]) == {0: 3}
    assert_broker_ok(shoal)


@pytest.mark.parametrize("framed", [False, True], ids=["raw", "framed"])
def test_random_garbage(shoal, framed):
    rng = random.Random(0x5E0A1 + int(framed))
    for _ in range(3):
        if framed:
            body = rng.randbytes(64 * 1024 - 4)
            data = i32(len(body)) + body
        else:
            data = rng.randbytes(64 * 1024)
        s = connect(shoal)
        send_ignoring_disconnect(s, data)
        try:
            # Give the broker the chance to react; any reaction is fine.
            closed_or_answered(s, timeout=3)
        except AssertionError:
            pass
        s.close()
        shoal.assert_alive()
    assert_broker_ok(shoal)


def test_many_bad_connections_then_good_client(shoal):
    """A burst of short-lived bad connections does not wedge the listener."""
    for i in range(50):
        s = connect(shoal)
        send_ignoring_disconnect(s, i32(100 + i) + b"\xff" * (i % 7))
        s.close()
    wait_for(lambda: shoal.health_status() == 200, 30, "/health to answer 200")
    assert_broker_ok(shoal)
