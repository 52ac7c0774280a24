"""The data lifecycle: compaction (the standalone's own compactor and
`shoal compactor`), retention, DeleteRecords, log compaction and garbage
collection, on file:// and on the S3 emulator (docs/architecture.md,
"Compaction, retention, garbage collection")."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import duckdb
import pytest

from clients import ck_config, ck_consume_all, ck_create_topic, ck_producer, kp_consume
from harness import http_request, shoal_bin, unique_name, wait_for

S3_URL = os.environ.get("SHOAL_TEST_S3_URL")

# Fast settings for tests: everything is old enough at once; rounds are short.
FAST = ["--compaction-delay", "0s", "--compaction-interval", "1s", "--gc-grace", "1s"]


class Bucket:
    """The test's view of an object store URL: list, read and write keys."""

    def __init__(self, url: str):
        self.url = url
        u = urllib.parse.urlparse(url)
        self.scheme = u.scheme
        if self.scheme == "file":
            self.root = Path(u.path)
        else:
            import boto3

            self.bucket, self.prefix = u.netloc, u.path.strip("/")
            self.s3 = boto3.client(
                "s3",
                endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT"),
                region_name=os.environ.get("AWS_REGION", "us-east-1"))

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def keys(self, prefix: str = "") -> list[str]:
        if self.scheme == "file":
            base = self.root / prefix
            if not base.exists():
                return []
            return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())
        out = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix))
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                out.append(key[len(self.prefix) + 1:] if self.prefix else key)
        return sorted(out)

    def put(self, key: str, data: bytes) -> None:
        if self.scheme == "file":
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def local_copy(self, key: str, tmp: Path) -> str:
        """A local path DuckDB can read for `key`."""
        if self.scheme == "file":
            return str(self.root / key)
        dest = tmp / key.replace("/", "_")
        self.s3.download_file(self.bucket, self._full(key), str(dest))
        return str(dest)


def store_params():
    params = [pytest.param("file", id="file")]
    if S3_URL or os.environ.get("CI"):
        params.append(pytest.param("s3", id="s3"))
    return params


def make_store(kind: str, tmp_path: Path) -> str:
    if kind == "file":
        return f"file://{tmp_path / 'objects'}"
    if not S3_URL:
        pytest.fail("SHOAL_TEST_S3_URL is not set (tests/run.sh starts the S3 emulator)")
    u = urllib.parse.urlparse(S3_URL)
    prefix = f"{u.path.strip('/')}/lifecycle-{unique_name('run')}".strip("/")
    return f"s3://{u.netloc}/{prefix}"


def files(shoal, topic: str) -> list[dict]:
    resp = shoal.http(f"/api/v1/streams/{topic}/files")
    assert resp.status == 200, resp.text
    return resp.json()["files"]


def run_compactor(shoal, store: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`shoal compactor --once` against the standalone node's placement API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    proc = subprocess.run(
        [shoal_bin(), "compactor", "--placement", shoal.http_addr, "--object-store", store,
         "--once", *args],
        capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert proc.returncode == 0, f"compactor failed: {proc.stderr[-3000:]}"
    return proc


def report(proc: subprocess.CompletedProcess) -> dict:
    """The run report `shoal compactor --once` prints."""
    return json.loads(proc.stdout.strip().splitlines()[-1])["run"]


def produce_rounds(shoal, topics: list[str], partitions: int, rounds: int, per_round: int,
                   **producer_config) -> dict[tuple[str, int], list[bytes]]:
    """Produce `rounds` rounds, each flushed to object storage before the next,
    so every round leaves its own flush object. Returns the values per
    (topic, partition) in offset order."""
    p = ck_producer(shoal.bootstrap, **{"linger.ms": 5, **producer_config})
    sent: dict[tuple[str, int], list[bytes]] = {(t, q): [] for t in topics for q in range(partitions)}
    for r in range(rounds):
        for t in topics:
            for q in range(partitions):
                for i in range(per_round):
                    value = f"{t}|{q}|{r}|{i}".encode()
                    p.produce(t, value=value, key=f"k{i}".encode(), partition=q)
                    sent[(t, q)].append(value)
        assert p.flush(30) == 0
        for t in topics:
            shoal.wait_flushed(t, {q: len(sent[(t, q)]) for q in range(partitions)})
    return sent


def one_flushed_topic(shoal_factory, prefix: str, rounds: int):
    """A standalone without its own compactor and one 1-partition topic
    flushed in `rounds` small objects: (shoal, store URL, topic, sent)."""
    shoal = shoal_factory(flush_interval="50ms", extra_args=["--compaction", "false"])
    shoal.start()
    topic = unique_name(prefix)
    ck_create_topic(shoal.bootstrap, topic, 1)
    sent = produce_rounds(shoal, [topic], 1, rounds=rounds, per_round=5)
    return shoal, f"file://{shoal.objects_dir}", topic, sent


def read_from(shoal, topic: str, partition: int, offset: int, n: int) -> list[bytes]:
    """`n` values from `offset` of one partition (a consumer that starts in the middle)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(ck_config(shoal.bootstrap, **{"group.id": unique_name("mid"),
                                               "enable.auto.commit": False}))
    out: list[bytes] = []
    try:
        c.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 30
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                out.append(m.value())
    finally:
        c.close()
    return out


def read_back(shoal, topic: str, partitions: int) -> dict[int, list[bytes]]:
    got = ck_consume_all(shoal.bootstrap, topic, range(partitions))
    return {q: [m.value() for m in msgs] for q, msgs in got.items()}


# --------------------------------------------------------------------------
# compaction


@pytest.mark.parametrize("kind", store_params())
def test_compaction_leaves_a_handful_of_files_and_every_record(shoal_factory, tmp_path, kind):
    store = make_store(kind, tmp_path)
    bucket = Bucket(store)
    shoal = shoal_factory(object_store=store, flush_interval="50ms",
                          extra_args=["--compaction", "false"])
    shoal.start()
    topics = [unique_name(f"cmp{i}") for i in range(4)]
    for t in topics:
        ck_create_topic(shoal.bootstrap, t, 2)
    sent = produce_rounds(shoal, topics, 2, rounds=12, per_round=5)
    before = {t: len(files(shoal, t)) for t in topics}
    assert all(n >= 12 for n in before.values()), before
    flush_objects = bucket.keys("segments")
    assert len(flush_objects) >= 12

    # Replaced objects stay for their grace period.
    done = report(run_compactor(shoal, store, "--compaction-delay", "0s", "--gc-grace", "1h"))
    assert done["objects_out"] >= len(topics) * 2 and not done["errors"], done
    for t in topics:
        live = files(shoal, t)
        assert 1 <= len(live) <= 2, live
        assert all(f["key"].startswith(f"streams/{t}/shard=") for f in live), live
    assert set(flush_objects) <= set(bucket.keys("segments")), "deleted inside the grace period"

    # Kafka reads from the beginning and from the middle.
    for t in topics:
        assert read_back(shoal, t, 2) == {q: sent[(t, q)] for q in range(2)}
    middle = read_from(shoal, topics[0], 1, 23, 20)
    assert middle == sent[(topics[0], 1)][23:43]

    # DuckDB over exactly the live files.
    for t in topics:
        paths = [bucket.local_copy(f["key"], tmp_path) for f in files(shoal, t)]
        rows = duckdb.sql(
            f"select shard, \"offset\", value from read_parquet({paths!r}) "
            f"where stream = '{t}' order by shard, \"offset\"").fetchall()
        for q in range(2):
            values = [bytes(v) for s, _o, v in rows if s == q]
            offsets = [o for s, o, _v in rows if s == q]
            assert values == sent[(t, q)], f"{t}/{q} in Parquet"
            assert offsets == list(range(len(values)))

    # After the grace period the replaced flush objects go; data stays readable.
    gc = report(run_compactor(shoal, store, "--compaction-delay", "0s", "--gc-grace", "0s"))
    assert bucket.keys("segments") == []
    # Every broker exports the runs placement recorded, whoever ran them.
    wait_for(lambda: shoal.metrics().get("shoal_gc_objects_deleted_total", 0)
             >= gc["objects_deleted"] > 0, 30, "the GC counter")
    m = shoal.metrics()
    assert m["shoal_compaction_runs_total"] >= 2
    assert m["shoal_compaction_objects_out_total"] >= done["objects_out"]
    for t in topics:
        assert read_back(shoal, t, 2) == {q: sent[(t, q)] for q in range(2)}


def test_compaction_runs_under_load_and_a_kill9(shoal_factory):
    """The standalone's own compactor rewrites while a producer and a
    consumer group run and the process is killed; the consumer sees no
    fatal error and every acknowledged record is read back once."""
    shoal = shoal_factory(flush_interval="50ms", extra_args=FAST)
    shoal.start()
    topic = unique_name("busy")
    ck_create_topic(shoal.bootstrap, topic, 2)
    acked: list[tuple[int, int, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def produce():
        p = ck_producer(shoal.bootstrap, **{"linger.ms": 2, "acks": "all",
                                            "message.timeout.ms": 60000})
        n = 0

        def cb(err, msg):
            if err is None:
                with lock:
                    acked.append((msg.partition(), msg.offset(), msg.value()))

        while not stop.is_set():
            for _ in range(50):
                p.produce(topic, value=f"v{n}".encode(), key=f"k{n % 7}".encode(),
                          partition=n % 2, on_delivery=cb)
                n += 1
            p.poll(0)
            time.sleep(0.01)
        p.flush(60)

    consumed: list[int] = []
    consumer_errors: list[str] = []

    def consume():
        from confluent_kafka import Consumer

        c = Consumer(ck_config(shoal.bootstrap, **{"group.id": unique_name("busy"),
                                                   "auto.offset.reset": "earliest"}))
        c.subscribe([topic])
        try:
            while not stop.is_set():
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error() is None:
                    consumed.append(m.offset())
                elif m.error().fatal():
                    consumer_errors.append(str(m.error()))
        finally:
            c.close()

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    # Compaction has happened at least once while producing and consuming.
    wait_for(lambda: any(f["key"].startswith("streams/") for f in files(shoal, topic)),
             60, "a compacted file under load", interval=0.2)
    shoal.kill9()
    shoal.start()
    wait_for(lambda: len(acked) > 3000, 60, "more acknowledged records after the restart",
             interval=0.2)
    stop.set()
    t.join(90)
    reader.join(30)
    assert consumed and not consumer_errors, consumer_errors
    with lock:
        expected = sorted(acked)
    counts = {q: sum(1 for p, _o, _v in expected if p == q) for q in range(2)}
    doc = shoal.wait_flushed(topic)
    hw = {sh["shard"]: sh["high_watermark"] for sh in doc["shards"]}
    got = ck_consume_all(shoal.bootstrap, topic, range(2))
    for q in range(2):
        by_offset = {m.offset(): m.value() for m in got[q]}
        assert len(got[q]) == hw[q] and len(by_offset) == hw[q], f"partition {q}: duplicates"
        for p, o, v in expected:
            if p == q:
                assert by_offset.get(o) == v, f"acknowledged record {q}/{o} lost or changed"
        assert counts[q] <= hw[q]
    # The flush objects of the run are compacted away in the end.
    try:
        wait_for(lambda: all(f["key"].startswith("streams/") for f in files(shoal, topic)), 60,
                 "only compacted files", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}\nfiles: {files(shoal, topic)}\n"
                             f"compaction: {shoal.http('/api/v1/compaction').text[:3000]}") from None


def test_two_compactors_cannot_both_commit(shoal_factory, tmp_path):
    shoal, store, topic, sent = one_flushed_topic(shoal_factory, "two", 6)
    # Someone else holds the compaction lease: this compactor must not commit.
    held = shoal.http("/placement/v1/write", "POST", json.dumps({"acquire_compaction_lease": {
        "holder": "other", "now_ms": int(time.time() * 1000), "ttl_ms": 600000}}).encode())
    assert held.status == 200, held.text
    lost = run_compactor(shoal, store, "--compaction-delay", "0s", check=False)
    assert lost.returncode != 0 and "held by other" in lost.stderr, lost.stderr[-2000:]
    assert all(f["key"].startswith("segments/") for f in files(shoal, topic))
    # A commit under a lease epoch that is not the current one is refused.
    stale = shoal.http("/placement/v1/write", "POST", json.dumps({"forget_retired": {
        "compaction_epoch": 0, "objects": []}}).encode())
    assert "stale" in stale.text.lower(), stale.text
    # Released, two compactors started together: the data is rewritten once.
    shoal.http("/placement/v1/write", "POST", json.dumps({"acquire_compaction_lease": {
        "holder": "other", "now_ms": int(time.time() * 1000), "ttl_ms": 1}}).encode())
    time.sleep(0.01)  # let the 1 ms lease run out
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    procs = [subprocess.Popen(
        [shoal_bin(), "compactor", "--placement", shoal.http_addr, "--object-store", store,
         "--once", "--compaction-delay", "0s", "--gc-grace", "1h"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    rewrote = [json.loads(o.strip().splitlines()[-1])["run"]["objects_out"]
               for (o, _e), p in zip(outs, procs) if p.returncode == 0]
    assert sum(rewrote) == 1, (rewrote, [e[-1000:] for _o, e in outs])
    live = files(shoal, topic)
    assert len(live) == 1 and live[0]["shards"][0]["rows"] == len(sent[(topic, 0)])
    assert read_back(shoal, topic, 1) == {0: sent[(topic, 0)]}


def test_garbage_collection_waits_for_each_grace_period(shoal_factory, tmp_path):
    shoal, store, topic, sent = one_flushed_topic(shoal_factory, "gc", 4)
    bucket = Bucket(store)
    flush_objects = bucket.keys("segments")
    # What a compactor killed between its PUT and its commit leaves behind,
    # and an object outside the data prefixes.
    orphan = f"streams/{topic}/shard=0/00000000000000000000-00000000000000000019-g99-1.parquet"
    bucket.put(orphan, b"PAR1 never committed")
    bucket.put("staging/leftover-upload", b"x")
    bucket.put("placement/not-data.json", b"{}")
    # Written half an hour ago (GC never takes an orphan younger than 2 min,
    # whatever the grace).
    half_an_hour_ago = time.time() - 1800
    for key in (orphan, "staging/leftover-upload"):
        os.utime(shoal.objects_dir / key, (half_an_hour_ago, half_an_hour_ago))

    report(run_compactor(shoal, store, "--compaction-delay", "0s", "--gc-grace", "1h",
                         "--orphan-grace", "1h"))
    keys = set(bucket.keys())
    assert orphan in keys and "staging/leftover-upload" in keys, "orphans deleted too early"
    assert set(flush_objects) <= keys, "replaced objects deleted inside their grace period"

    done = report(run_compactor(shoal, store, "--gc-grace", "1h", "--orphan-grace", "0s"))
    keys = set(bucket.keys())
    assert orphan not in keys and "staging/leftover-upload" not in keys, done
    assert set(flush_objects) <= keys

    report(run_compactor(shoal, store, "--gc-grace", "0s"))
    keys = set(bucket.keys())
    assert not set(flush_objects) & keys
    assert "placement/not-data.json" in keys
    live = {f["key"] for f in files(shoal, topic)}
    assert live and live <= keys, "a referenced object was deleted"
    assert read_back(shoal, topic, 1) == {0: sent[(topic, 0)]}


class HoldingProxy:
    """An HTTP proxy in front of placement that forwards every request but
    holds (never answers) the ones whose body contains `hold`: a compactor
    whose index swap is held has written its file and not committed it."""

    def __init__(self, upstream: str, hold: bytes):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.held = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if hold in body:
                    proxy.held.set()
                    time.sleep(600)
                    return
                conn = http.client.HTTPConnection(upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_compactor_killed_between_its_put_and_its_commit(shoal_factory):
    shoal, store, topic, sent = one_flushed_topic(shoal_factory, "killed", 5)
    bucket = Bucket(store)
    before = set(bucket.keys())
    proxy = HoldingProxy(shoal.http_addr, b"replace_segments")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    compactor = subprocess.Popen(
        [shoal_bin(), "compactor", "--placement", proxy.addr, "--object-store", store, "--once",
         "--compaction-delay", "0s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proxy.held.wait(60), "the compactor never tried to commit"
        # Its file is written; its commit is in flight: kill it there.
        compactor.kill()
        compactor.wait(10)
    finally:
        proxy.close()
    orphans = sorted(set(bucket.keys()) - before)
    assert len(orphans) == 1 and orphans[0].startswith(f"streams/{topic}/"), orphans
    # Nothing changed for readers: the index still lists the flush objects.
    assert all(f["key"].startswith("segments/") for f in files(shoal, topic))
    assert read_back(shoal, topic, 1) == {0: sent[(topic, 0)]}
    # The next compactor (its lease lapsed) compacts; the orphan stays until its grace...
    wait_for(lambda: run_compactor(shoal, store, "--compaction-delay", "0s", "--gc-grace", "0s",
                                   check=False).returncode == 0, 60,
             "the dead compactor's lease to lapse", interval=1.0)
    assert orphans[0] in bucket.keys()
    # ...and goes after it (made older than the 2-minute floor); nothing
    # live is lost.
    long_ago = time.time() - 1800
    os.utime(shoal.objects_dir / orphans[0], (long_ago, long_ago))
    report(run_compactor(shoal, store, "--orphan-grace", "0s"))
    assert orphans[0] not in bucket.keys()
    assert read_back(shoal, topic, 1) == {0: sent[(topic, 0)]}


# --------------------------------------------------------------------------
# retention and DeleteRecords


def test_retention_moves_the_log_start_and_resets_consumers(shoal_factory, tmp_path):
    shoal = shoal_factory(flush_interval="50ms", extra_args=FAST)
    shoal.start()
    bucket = Bucket(f"file://{shoal.objects_dir}")
    topic = unique_name("ret")
    ck_create_topic(shoal.bootstrap, topic, 1, config={"retention.ms": "60000"})
    p = ck_producer(shoal.bootstrap)
    old = int(time.time() * 1000) - 3_600_000
    for i in range(20):
        p.produce(topic, value=f"old{i}".encode(), timestamp=old + i)
    assert p.flush(30) == 0
    shoal.wait_flushed(topic, {0: 20})

    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    admin = ck_admin_client(shoal)

    def earliest() -> int:
        spec = {TopicPartition(topic, 0): OffsetSpec.earliest()}
        return list(admin.list_offsets(spec).values())[0].result(timeout=10).offset

    wait_for(lambda: earliest() == 20, 60, "the log start to pass the expired records",
             interval=0.2)
    wait_for(lambda: files(shoal, topic) == [], 30, "no live file left")
    wait_for(lambda: not [k for k in bucket.keys() if topic in k or k.startswith("segments/")],
             60, "the expired objects to leave the bucket", interval=0.2)

    p.produce(topic, value=b"fresh")
    assert p.flush(30) == 0
    c = Consumer(ck_config(shoal.bootstrap, **{"group.id": unique_name("g"),
                                               "auto.offset.reset": "earliest"}))
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        msg = wait_for(lambda: _poll_value(c), 30, "a record after the reset")
        assert (msg.offset(), msg.value()) == (20, b"fresh")
    finally:
        c.close()


def _poll_value(c):
    m = c.poll(0.5)
    return m if m is not None and m.error() is None else None


def ck_admin_client(shoal):
    from confluent_kafka.admin import AdminClient

    return AdminClient(ck_config(shoal.bootstrap))


def test_delete_records_with_the_admin_client(shoal_factory):
    shoal = shoal_factory(flush_interval="50ms", extra_args=["--compaction", "false"])
    shoal.start()
    topic = unique_name("delrec")
    ck_create_topic(shoal.bootstrap, topic, 1)
    p = ck_producer(shoal.bootstrap)
    for i in range(50):
        p.produce(topic, value=f"v{i}".encode())
    assert p.flush(30) == 0

    from confluent_kafka import TopicPartition

    admin = ck_admin_client(shoal)
    result = admin.delete_records([TopicPartition(topic, 0, 20)])
    deleted = list(result.values())[0].result(timeout=30)
    assert deleted.low_watermark == 20
    # Beyond the high watermark: OFFSET_OUT_OF_RANGE.
    beyond = list(admin.delete_records([TopicPartition(topic, 0, 500)]).values())[0]
    with pytest.raises(Exception) as e:
        beyond.result(timeout=30)
    assert "OFFSET_OUT_OF_RANGE" in str(e.value) or "out of range" in str(e.value).lower()

    got = read_back(shoal, topic, 1)
    assert got[0] == [f"v{i}".encode() for i in range(20, 50)]
    # kafka-python from the beginning starts at the new log start too.
    recs = kp_consume(shoal.bootstrap, topic, 30, partitions=[0])
    assert recs[0].offset == 20
    # The log start survives a restart (it is placement's).
    shoal.restart()
    assert read_back(shoal, topic, 1)[0][0] == b"v20"


# --------------------------------------------------------------------------
# log compaction


def test_log_compaction_keeps_the_latest_value_of_every_key(shoal_factory):
    shoal = shoal_factory(flush_interval="50ms", extra_args=FAST)
    shoal.start()
    topic = unique_name("compact")
    ck_create_topic(shoal.bootstrap, topic, 1,
                    config={"cleanup.policy": "compact", "delete.retention.ms": "0"})
    p = ck_producer(shoal.bootstrap, **{"linger.ms": 5})
    errors = []
    p.produce(topic, value=b"no key", on_delivery=lambda err, _m: errors.append(err))
    p.flush(30)
    assert errors and errors[0] is not None and errors[0].name() == "INVALID_RECORD", errors

    latest: dict[bytes, bytes | None] = {}
    produced = 0
    for r in range(15):
        for k in range(10):
            key = f"key{k}".encode()
            value = None if (r == 13 and k in (3, 7)) else f"{k}@{r}".encode()
            if r == 14 and k in (3, 7):
                continue  # stay deleted
            p.produce(topic, key=key, value=value)
            latest[key] = value
            produced += 1
        assert p.flush(30) == 0
        shoal.wait_flushed(topic, {0: produced})
    expected = {k: v for k, v in latest.items() if v is not None}

    def compacted():
        live = files(shoal, topic)
        rows = sum(f["shards"][0]["rows"] for f in live)
        return live and all(f["key"].startswith("streams/") for f in live) and rows < produced
    wait_for(compacted, 60, "the topic to be log-compacted", interval=0.2)

    from confluent_kafka import Consumer, KafkaError, TopicPartition

    def read_from_zero() -> list[tuple[int, bytes, bytes | None]]:
        c = Consumer(ck_config(shoal.bootstrap, **{"group.id": unique_name("g"),
                                                   "auto.offset.reset": "earliest",
                                                   "enable.partition.eof": True}))
        seen = []
        try:
            c.assign([TopicPartition(topic, 0, 0)])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                if m.error() is not None:
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                    break
                seen.append((m.offset(), m.key(), m.value()))
        finally:
            c.close()
        return seen

    # The broker follows the index swap within about a second.
    def one_per_key():
        seen = read_from_zero()
        keys = [k for _o, k, _v in seen]
        return seen if len(keys) == len(set(keys)) else None
    seen = wait_for(one_per_key, 30, "a reader from offset 0 to see one record per key")
    keys = [k for _o, k, _v in seen]
    assert len(keys) == len(set(keys)), f"a key seen twice: {seen}"
    assert {k: v for _o, k, v in seen} == expected
    offsets = [o for o, _k, _v in seen]
    assert offsets == sorted(offsets) and offsets[-1] == produced - 1
    # kafka-python handles the offset gaps the same way.
    recs = kp_consume(shoal.bootstrap, topic, len(expected), partitions=[0])
    assert {r.key: r.value for r in recs} == expected


def test_the_cluster_default_retention_applies_to_new_topics(shoal_factory):
    shoal = shoal_factory(extra_args=["--default-retention", "2d"])
    shoal.start()
    topic = unique_name("defret")
    ck_create_topic(shoal.bootstrap, topic, 1)
    from confluent_kafka.admin import ConfigResource

    admin = ck_admin_client(shoal)

    def retention():
        described = admin.describe_configs([ConfigResource("TOPIC", topic)])
        return list(described.values())[0].result(timeout=30)["retention.ms"].value
    wait_for(lambda: retention() == str(2 * 86_400_000), 30, "retention.ms of the cluster default")
    doc = shoal.http("/api/v1/compaction").json()
    assert doc["default_retention_ms"] == 2 * 86_400_000
