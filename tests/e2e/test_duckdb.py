"""The data-lake contract: what Kafka clients wrote can be read in place from
the Parquet segments with DuckDB (docs/segment-format.md)."""

from __future__ import annotations

import collections
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from clients import ck_create_topic, ck_producer
from harness import unique_name

SHARDS = 3
N = 300


def make_records(base_ts: int):
    """(key, value, headers, timestamp) for record i; some keys and values null."""
    out = []
    for i in range(N):
        key = None if i % 10 == 3 else f"key-{i:04d}".encode()
        value = None if i % 10 == 7 else f"value-{i:04d}".encode() + bytes([i % 256])
        headers = [("i", str(i).encode()), ("mod", bytes([i % 7]))] if i % 5 == 0 else []
        out.append((key, value, headers, base_ts + i))
    return out


def check_rows(rows, expected, what: str):
    """rows: (key, value, offset, shard, ts_ms, headers) from DuckDB;
    expected: {(shard, offset): (key, value, headers, ts)}."""
    where = collections.Counter((shard, off) for _k, _v, off, shard, _ts, _h in rows)
    dups = {k: c for k, c in where.items() if c > 1}
    assert not dups, f"{what}: rows found more than once: {sorted(dups)[:10]}"
    missing = sorted(set(expected) - set(where))
    assert not missing, f"{what}: {len(missing)} records missing, e.g. {missing[:10]}"
    extra = sorted(set(where) - set(expected))
    assert not extra, f"{what}: unexpected rows at {extra[:10]}"
    for key, value, off, shard, ts, headers in rows:
        ekey, evalue, eheaders, ets = expected[(shard, off)]
        assert (key, value) == (ekey, evalue), f"{what}: shard {shard} offset {off}"
        assert ts == ets, f"{what}: timestamp of shard {shard} offset {off}"
        assert headers is not None, f"{what}: headers of shard {shard} offset {off} are null, not []"
        got_headers = [(h["key"], h["value"]) for h in headers]
        assert got_headers == eheaders, f"{what}: headers of shard {shard} offset {off}"
    for shard in range(SHARDS):
        offs = sorted(off for (s, off) in where if s == shard)
        assert offs == list(range(len(offs))), f"{what}: offsets of shard {shard} not dense from 0"


def test_parquet_segments_hold_every_record_once(shoal):
    topic = unique_name("lake")
    ck_create_topic(shoal.bootstrap, topic, SHARDS)
    base_ts = (int(time.time()) - 600) * 1000
    records = make_records(base_ts)

    placed: dict[int, tuple[int, int]] = {}  # record index -> (partition, offset)
    errors = []

    def on_delivery(i):
        def cb(err, msg):
            if err is None:
                placed[i] = (msg.partition(), msg.offset())
            else:
                errors.append((i, str(err)))
        return cb

    p = ck_producer(shoal.bootstrap, acks="all", **{"linger.ms": 5})
    for i, (key, value, headers, ts) in enumerate(records):
        p.produce(topic, key=key, value=value, headers=headers or None, timestamp=ts,
                  partition=i % SHARDS, on_delivery=on_delivery(i))
        p.poll(0)
    assert p.flush(60) == 0
    assert errors == [], errors[:5]
    assert len(placed) == N
    expected = {placed[i]: rec for i, rec in enumerate(records)}
    assert len(expected) == N, "two records were acknowledged at the same offset"
    counts = collections.Counter(part for part, _ in expected)

    doc = shoal.wait_flushed(topic, {s: counts[s] for s in range(SHARDS)})
    assert doc["name"] == topic and doc["partitions"] == SHARDS

    con = duckdb.connect()
    select = ('select key, value, "offset", shard, epoch_ms("timestamp") as ts, headers '
              "from read_parquet({src}) where stream = ?")

    # 1. Everything under the object store root, as an engine with only a glob sees it.
    glob = str(shoal.objects_dir / "**" / "*.parquet")
    rows = con.execute(select.format(src=f"'{glob}'"), [topic]).fetchall()
    check_rows(rows, expected, f"read_parquet('{glob}')")

    # 2. Only the live objects that the segment index names.
    objects = sorted({seg["object"] for sh in doc["shards"] for seg in sh["segments"]})
    assert objects, doc
    files = [shoal.objects_dir / obj for obj in objects]
    for f in files:
        assert f.is_file(), f"segment object {f} listed by the API does not exist"
    src = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    rows = con.execute(select.format(src=src), [topic]).fetchall()
    check_rows(rows, expected, "read_parquet(live objects)")

    # The schema is the documented one.
    types = {name: typ for name, typ, *_ in con.execute(
        f"describe select * from read_parquet('{files[0]}')").fetchall()}
    for col in ("stream", "shard", "offset", "timestamp", "key", "value", "headers",
                "producer_id", "producer_epoch", "sequence"):
        assert col in types, f"column {col} missing from {files[0].name}: {types}"
    assert types["stream"] == "VARCHAR"
    assert types["shard"] == "INTEGER"
    assert types["offset"] == "BIGINT"
    assert types["timestamp"].startswith("TIMESTAMP"), types["timestamp"]
    assert types["key"] == "BLOB" and types["value"] == "BLOB"
    assert types["headers"].endswith("[]") and "BLOB" in types["headers"], types["headers"]
    schema = pq.read_schema(files[0])
    ts_type = schema.field("timestamp").type
    assert pa.types.is_timestamp(ts_type) and ts_type.unit == "ms" and ts_type.tz is not None, ts_type

    # Rows are sorted by (stream, shard, offset) inside every object.
    for f in files:
        t = pq.read_table(f, columns=["stream", "shard", "offset"])
        keys = list(zip(t.column("stream").to_pylist(), t.column("shard").to_pylist(),
                        t.column("offset").to_pylist()))
        assert keys == sorted(keys), f"rows of {f.name} are not sorted by (stream, shard, offset)"

    # Every object is a versioned Shoal segment whose row groups each hold one shard.
    for f in files:
        pf = pq.ParquetFile(f)
        kv = pf.metadata.metadata or {}
        assert kv.get(b"shoal.format_version") == b"1", f"{f.name}: key-value metadata {sorted(kv)}"
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=["stream", "shard"])
            pairs = set(zip(t.column("stream").to_pylist(), t.column("shard").to_pylist()))
            assert len(pairs) == 1, f"{f.name} row group {rg} mixes {pairs}"

    # The segment index describes what the objects hold, down to the row group.
    for sh in doc["shards"]:
        segs = sorted(sh["segments"], key=lambda s: s["first_offset"])
        assert sh["log_start_offset"] == 0
        assert sh["high_watermark"] == sh["committed_offset"] == counts[sh["shard"]]
        nxt = 0
        for seg in segs:
            assert seg["first_offset"] == nxt, (sh["shard"], segs)
            assert seg["record_count"] == seg["last_offset"] - seg["first_offset"] + 1
            t = pq.ParquetFile(shoal.objects_dir / seg["object"]).read_row_group(
                seg["row_group"], columns=["stream", "shard", "offset"])
            assert set(t.column("stream").to_pylist()) == {topic}, seg
            assert set(t.column("shard").to_pylist()) == {sh["shard"]}, seg
            assert t.column("offset").to_pylist() == list(
                range(seg["first_offset"], seg["last_offset"] + 1)), seg
            nxt = seg["last_offset"] + 1
        assert nxt == sh["committed_offset"]
