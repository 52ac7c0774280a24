"""Hand-encoded Kafka wire protocol, just enough to send malformed input on
purpose: request framing, ApiVersions v0, Produce v3-v12 and v2 record
batches (with a CRC32C computed here, so a test can corrupt it).

Nothing here depends on a client library's internals.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

API_PRODUCE = 0
API_METADATA = 3
API_API_VERSIONS = 18

# --------------------------------------------------------------------------
# CRC32C (Castagnoli), as used by record batch v2


def _make_crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------
# primitive encoders


def i8(v: int) -> bytes:
    return struct.pack(">b", v)


def i16(v: int) -> bytes:
    return struct.pack(">h", v)


def i32(v: int) -> bytes:
    return struct.pack(">i", v)


def i64(v: int) -> bytes:
    return struct.pack(">q", v)


def uvarint(v: int) -> bytes:
    assert v >= 0
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varint(v: int) -> bytes:
    """Zig-zag signed varint (record fields)."""
    return uvarint((v << 1) ^ (v >> 63))


def string(s: Optional[str]) -> bytes:
    if s is None:
        return i16(-1)
    b = s.encode()
    return i16(len(b)) + b


def compact_string(s: Optional[str]) -> bytes:
    if s is None:
        return uvarint(0)
    b = s.encode()
    return uvarint(len(b) + 1) + b


def nbytes(b: Optional[bytes]) -> bytes:
    if b is None:
        return i32(-1)
    return i32(len(b)) + b


def compact_bytes(b: Optional[bytes]) -> bytes:
    if b is None:
        return uvarint(0)
    return uvarint(len(b) + 1) + b


TAGGED_FIELDS_NONE = uvarint(0)

# --------------------------------------------------------------------------
# record batch v2


@dataclass
class Record:
    value: Optional[bytes]
    key: Optional[bytes] = None
    headers: Sequence[tuple[str, Optional[bytes]]] = field(default_factory=list)
    timestamp_delta: int = 0


def encode_record(offset_delta: int, rec: Record) -> bytes:
    body = bytearray()
    body += i8(0)  # attributes
    body += varint(rec.timestamp_delta)
    body += varint(offset_delta)
    if rec.key is None:
        body += varint(-1)
    else:
        body += varint(len(rec.key)) + rec.key
    if rec.value is None:
        body += varint(-1)
    else:
        body += varint(len(rec.value)) + rec.value
    body += varint(len(rec.headers))
    for hk, hv in rec.headers:
        kb = hk.encode()
        body += varint(len(kb)) + kb
        if hv is None:
            body += varint(-1)
        else:
            body += varint(len(hv)) + hv
    return varint(len(body)) + bytes(body)


def encode_record_batch(records: Sequence[Record], base_timestamp: Optional[int] = None,
                        producer_id: int = -1, producer_epoch: int = -1,
                        base_sequence: int = -1) -> bytes:
    """An uncompressed magic-2 record batch with a correct CRC32C."""
    assert records
    if base_timestamp is None:
        base_timestamp = int(time.time() * 1000)
    max_ts = base_timestamp + max(r.timestamp_delta for r in records)
    after_crc = bytearray()
    after_crc += i16(0)  # attributes: no compression, CreateTime, not transactional
    after_crc += i32(len(records) - 1)  # last offset delta
    after_crc += i64(base_timestamp)
    after_crc += i64(max_ts)
    after_crc += i64(producer_id)
    after_crc += i16(producer_epoch)
    after_crc += i32(base_sequence)
    after_crc += i32(len(records))
    for i, r in enumerate(records):
        after_crc += encode_record(i, r)
    crc = crc32c(bytes(after_crc))
    # everything after the batch length field:
    rest = i32(-1) + i8(2) + struct.pack(">I", crc) + bytes(after_crc)  # leader epoch, magic, crc
    return i64(0) + i32(len(rest)) + rest


#: byte offset of the CRC field inside a batch: base offset (8) + batch length
#: (4) + partition leader epoch (4) + magic (1)
BATCH_CRC_OFFSET = 17


def corrupt_crc(batch: bytes) -> bytes:
    """The same batch with its stored CRC flipped (payload untouched)."""
    b = bytearray(batch)
    b[BATCH_CRC_OFFSET] ^= 0xFF
    return bytes(b)


def corrupt_payload(batch: bytes) -> bytes:
    """The same batch with its last byte (inside the records) flipped, so the
    stored CRC no longer matches the data."""
    b = bytearray(batch)
    b[-1] ^= 0x5A
    return bytes(b)


# --------------------------------------------------------------------------
# requests


def request_header(api_key: int, api_version: int, correlation_id: int,
                   client_id: Optional[str] = "shoal-e2e", flexible: bool = False) -> bytes:
    h = i16(api_key) + i16(api_version) + i32(correlation_id) + string(client_id)
    if flexible:
        h += TAGGED_FIELDS_NONE
    return h


def frame(payload: bytes) -> bytes:
    return i32(len(payload)) + payload


def api_versions_request_v0(correlation_id: int) -> bytes:
    return frame(request_header(API_API_VERSIONS, 0, correlation_id))


def produce_request(version: int, correlation_id: int, topic: str, partition: int,
                    records: bytes, acks: int = -1, timeout_ms: int = 10000) -> bytes:
    if not 3 <= version <= 12:
        raise ValueError(f"produce version {version} not supported by this encoder")
    flexible = version >= 9
    body = bytearray()
    if flexible:
        body += compact_string(None)  # transactional_id
        body += i16(acks) + i32(timeout_ms)
        body += uvarint(1 + 1)  # one topic
        body += compact_string(topic)
        body += uvarint(1 + 1)  # one partition
        body += i32(partition) + compact_bytes(records) + TAGGED_FIELDS_NONE
        body += TAGGED_FIELDS_NONE  # topic
        body += TAGGED_FIELDS_NONE  # request
    else:
        body += string(None)  # transactional_id
        body += i16(acks) + i32(timeout_ms)
        body += i32(1) + string(topic)
        body += i32(1) + i32(partition) + nbytes(records)
    return frame(request_header(API_PRODUCE, version, correlation_id, flexible=flexible) + bytes(body))


# --------------------------------------------------------------------------
# responses


class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"response truncated: want {n} bytes at {self.pos}, have {len(self.data)}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def i16(self) -> int:
        return struct.unpack(">h", self.take(2))[0]

    def i32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def i64(self) -> int:
        return struct.unpack(">q", self.take(8))[0]

    def uvarint(self) -> int:
        shift = 0
        out = 0
        while True:
            b = self.take(1)[0]
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7

    def string(self) -> Optional[str]:
        n = self.i16()
        return None if n < 0 else self.take(n).decode()

    def compact_string(self) -> Optional[str]:
        n = self.uvarint()
        return None if n == 0 else self.take(n - 1).decode()

    def skip_tagged_fields(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self.take(self.uvarint())


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    if not 0 <= size <= 64 * 1024 * 1024:
        raise ValueError(f"implausible response size {size}")
    return recv_exact(sock, size)


def parse_api_versions_v0(payload: bytes, correlation_id: int) -> dict[int, tuple[int, int]]:
    r = Reader(payload)
    cid = r.i32()
    assert cid == correlation_id, f"correlation id {cid} != {correlation_id}"
    err = r.i16()
    assert err == 0, f"ApiVersions v0 answered error {err}"
    out = {}
    for _ in range(r.i32()):
        key, lo, hi = r.i16(), r.i16(), r.i16()
        out[key] = (lo, hi)
    return out


@dataclass
class PartitionProduceResult:
    topic: str
    partition: int
    error_code: int
    base_offset: int


def parse_produce_response(payload: bytes, version: int, correlation_id: int) -> list[PartitionProduceResult]:
    flexible = version >= 9
    r = Reader(payload)
    cid = r.i32()
    assert cid == correlation_id, f"correlation id {cid} != {correlation_id}"
    if flexible:
        r.skip_tagged_fields()  # response header v1
    out = []
    ntopics = r.uvarint() - 1 if flexible else r.i32()
    for _ in range(ntopics):
        name = r.compact_string() if flexible else r.string()
        nparts = r.uvarint() - 1 if flexible else r.i32()
        for _ in range(nparts):
            index = r.i32()
            error_code = r.i16()
            base_offset = r.i64()
            out.append(PartitionProduceResult(name, index, error_code, base_offset))
            r.i64()  # log_append_time_ms (v2+)
            if version >= 5:
                r.i64()  # log_start_offset
            if version >= 8:
                nerr = r.uvarint() - 1 if flexible else r.i32()
                for _ in range(max(nerr, 0)):
                    r.i32()
                    if flexible:
                        r.compact_string()
                        r.skip_tagged_fields()
                    else:
                        r.string()
                if flexible:
                    r.compact_string()
                else:
                    r.string()
            if flexible:
                r.skip_tagged_fields()
        if flexible:
            r.skip_tagged_fields()
    return out


# --------------------------------------------------------------------------
# a tiny client


class RawConnection:
    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._cid = 100

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def next_cid(self) -> int:
        self._cid += 1
        return self._cid

    def api_versions(self) -> dict[int, tuple[int, int]]:
        cid = self.next_cid()
        self.sock.sendall(api_versions_request_v0(cid))
        return parse_api_versions_v0(recv_frame(self.sock), cid)

    def produce(self, version: int, topic: str, partition: int, records: bytes,
                acks: int = -1, timeout_ms: int = 10000) -> list[PartitionProduceResult]:
        cid = self.next_cid()
        self.sock.sendall(produce_request(version, cid, topic, partition, records, acks=acks,
                                          timeout_ms=timeout_ms))
        return parse_produce_response(recv_frame(self.sock), version, cid)


def pick_produce_version(versions: dict[int, tuple[int, int]]) -> int:
    """Highest Produce version in 3..12 the broker supports (those still name
    topics; v13 uses topic ids)."""
    assert API_PRODUCE in versions, f"broker does not list Produce in ApiVersions: {versions}"
    lo, hi = versions[API_PRODUCE]
    candidates = [v for v in range(3, 13) if lo <= v <= hi]
    assert candidates, f"broker supports Produce v{lo}..v{hi}, none of v3..v12"
    return max(candidates)


API_FIND_COORDINATOR = 10


def find_coordinator(bootstrap: str, group: str) -> int:
    """Node id of the coordinator of `group` (FindCoordinator v0)."""
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    with RawConnection(host, int(port)) as conn:
        cid = conn.next_cid()
        conn.sock.sendall(frame(request_header(API_FIND_COORDINATOR, 0, cid) + string(group)))
        r = Reader(recv_frame(conn.sock))
        if r.i32() != cid:
            raise ValueError("correlation id mismatch")
        error = r.i16()
        node = r.i32()
        if error != 0:
            raise ValueError(f"FindCoordinator error {error}")
        return node
