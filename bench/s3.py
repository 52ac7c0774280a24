#!/usr/bin/env python3
"""Object-store benchmark: Shoal on the moto S3 emulator.

Each measurement gets its own `shoal standalone` on fresh loopback ports, a
fresh data directory and a fresh prefix in one moto bucket. Records are
random (incompressible) 1 KiB values, produced with confluent-kafka
(librdkafka), acks=all.

1. puts_per_gib: for each partition count in --partitions-list (default
   1,16,256), a `local` topic gets --mib MiB spread round-robin over its
   partitions (linger.ms=5). When every shard is flushed (committed_offset ==
   high_watermark in GET /api/v1/streams/{topic}) it reports the PUT requests
   the broker made (delta of shoal_object_store_requests_total{kind="put"})
   per GiB ingested, and the produce MB/s.
2. idle_puts_per_hour: on the broker of the last run above, no traffic for
   --idle-seconds; the PUT delta (and the other request kinds) scaled to an
   hour.
3. object_latency: a delay-only HTTP proxy between the broker and moto adds
   --put-delay-ms (30) to every PUT. A 16-partition topic with
   shoal.durability=object gets --rate (2000) records/s for --seconds (20);
   reports p50/p99 of produce() -> delivery report, every record sampled.
   Goal: p99 <= flush interval (--flush-interval, 250ms) + 100 ms.
4. catch_up: --catchup-mib MiB (default 256; the spec's figure is 1024) into
   a 4-partition `local` topic, wait until flushed, SIGTERM the broker,
   delete <data-dir>/cache, start it again on the same data and bucket, then
   read everything from offset 0 with a new consumer (cold cache, MB/s) and
   once more with another new consumer (warm cache, MB/s).

Output: one JSON line per measurement on stdout, then a markdown table.
Progress goes to stderr. Every process and temp dir it starts is cleaned up,
also on failure or Ctrl-C (--keep keeps the temp dir with the logs).

    python3 bench/s3.py --mib 256
    python3 bench/s3.py --mib 1024 --catchup-mib 1024          # the spec's sizes
    python3 bench/s3.py --mib 16 --partitions-list 1,16 --idle-seconds 10 \\
        --seconds 5 --catchup-mib 16                           # quick smoke run
    SHOAL_BIN=/path/to/shoal python3 bench/s3.py --only object_latency

Needs: a release build (`cargo build --release --bin shoal`, or SHOAL_BIN /
--bin), moto_server on PATH, and the Python packages confluent-kafka and
boto3.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = "shoal-bench"
MEASUREMENTS = ("puts_per_gib", "idle_puts_per_hour", "object_latency", "catch_up")
PUT_METRIC = 'shoal_object_store_requests_total{kind="put"}'
REQ_KINDS = ("put", "get", "head", "delete", "list")

# Loopback only, never through a proxy from the environment.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(x for x in (os.environ.get(_var), "127.0.0.1", "localhost") if x)

# One opener without any proxy handler for every HTTP call to the broker.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


# --------------------------------------------------------------------------
# ports, processes


_used_ports: set[int] = set()


def free_port() -> int:
    """A free 127.0.0.1 TCP port below the ephemeral range (so client
    connections cannot take it while a broker restarts), not handed out
    before in this run."""
    try:
        lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20000, lo) if lo - 20000 > 1000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port found")


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0, group: bool = False) -> int | None:
    """SIGTERM one process we started (or its own process group), wait,
    SIGKILL after `timeout`. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with _HTTP.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read() or b""


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------
# moto and the delay proxy


class Moto:
    def __init__(self, workdir: Path, binary: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        self.binary = binary
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Moto":
        with open(self.log_path, "ab") as logf:
            # Its own process group: moto_server may be a wrapper script.
            self.proc = subprocess.Popen(
                [self.binary, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                http_get(self.url + "/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server not answering on {self.url}:\n{tail(self.log_path)}")
                time.sleep(0.1)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket=BUCKET)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10, group=True)


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "content-length"}


class DelayProxy:
    """HTTP proxy to moto that sleeps a fixed time before forwarding every PUT
    (other methods pass straight through). One upstream connection per client
    connection, kept alive where moto allows it."""

    def __init__(self, upstream_port: int, put_delay_s: float, other_delay_s: float = 0.0):
        proxy = self
        self.put_delay_s = put_delay_s
        self.other_delay_s = other_delay_s
        self.lock = threading.Lock()
        self.counts = {"PUT": 0, "other": 0, "upstream_errors": 0}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                self.upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)

            def finish(self):
                try:
                    super().finish()
                finally:
                    self.upstream.close()

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _forward(self, body: bytes, headers: dict):
                for attempt in (0, 1):
                    try:
                        self.upstream.request(self.command, self.path, body=body, headers=headers)
                        resp = self.upstream.getresponse()
                        return resp, resp.read()
                    except (http.client.HTTPException, OSError):
                        # A kept-alive connection moto had closed: reconnect once.
                        self.upstream.close()
                        with proxy.lock:
                            proxy.counts["upstream_errors"] += 1
                        if attempt:
                            raise
                raise AssertionError("unreachable")

            def _handle(self):
                body = self._read_body()
                if self.command == "PUT":
                    time.sleep(proxy.put_delay_s)
                elif proxy.other_delay_s:
                    time.sleep(proxy.other_delay_s)
                with proxy.lock:
                    proxy.counts["PUT" if self.command == "PUT" else "other"] += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    resp, data = self._forward(body, headers)
                except (http.client.HTTPException, OSError):
                    self.close_connection = True
                    self.send_error(502)
                    return
                self.send_response(resp.status)
                upstream_len = None
                for k, v in resp.getheaders():
                    if k.lower() == "content-length":
                        upstream_len = v
                    elif k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                # HEAD answers carry the object's length, not the body's.
                length = upstream_len if self.command == "HEAD" and upstream_len else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "DelayProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# the broker


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{[^}]*\})?)\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


class Broker:
    def __init__(self, binary: str, workdir: Path, name: str, object_store: str,
                 s3_endpoint: str, flush_interval: str, extra_args: tuple[str, ...] = ()):
        self.binary = binary
        self.name = name
        self.data_dir = workdir / name / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / name / "shoal.log"
        self.kafka_port = free_port()
        self.http_port = free_port()
        self.object_store = object_store
        self.s3_endpoint = s3_endpoint
        self.flush_interval = flush_interval
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> "Broker":
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"shoal binary not found or not executable: {self.binary} "
                               "(cargo build --release --bin shoal, or set SHOAL_BIN / --bin)")
        cmd = [self.binary, "standalone",
               "--data-dir", str(self.data_dir),
               "--kafka-addr", self.bootstrap,
               "--http-addr", f"127.0.0.1:{self.http_port}",
               "--mqtt-addr", "off",
               "--object-store", self.object_store,
               "--flush-interval", self.flush_interval, *self.extra_args]
        # SHOAL_* variables are broker configuration: pass none of ours on.
        # The broker's own settings come from its flags; SHOAL_LOG passes.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") or k == "SHOAL_LOG"}
        env.update({
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT": self.s3_endpoint,
            "AWS_ALLOW_HTTP": "true",
            "NO_COLOR": "1",
        })
        env.pop("AWS_SESSION_TOKEN", None)
        env.pop("AWS_PROFILE", None)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== bench: {' '.join(cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: shoal exited with {self.proc.returncode} before "
                                   f"/health=200\n{tail(self.log_path)}")
            try:
                if http_get(self.http_base + "/health", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no /health=200 within {timeout:.0f}s\n{tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int | None:
        return stop_process(self.proc, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        status, body = http_get(self.http_base + "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body.decode(errors="replace"))

    def requests(self) -> dict[str, float]:
        m = self.metrics()
        return {k: m.get(f'shoal_object_store_requests_total{{kind="{k}"}}', 0.0) for k in REQ_KINDS}

    def stream(self, topic: str) -> dict | None:
        status, body = http_get(f"{self.http_base}/api/v1/streams/{topic}")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"/api/v1/streams/{topic} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def wait_stream(self, topic: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.stream(topic)
            if doc is not None:
                return doc
            if time.monotonic() > deadline:
                raise RuntimeError(f"stream {topic} not visible in the HTTP API after {timeout:.0f}s")
            time.sleep(0.05)

    def wait_flushed(self, topic: str, records: int, timeout: float) -> dict:
        """Until every shard has committed_offset == high_watermark and the
        high watermarks add up to `records`."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name}: broker died\n{tail(self.log_path)}")
            doc = self.stream(topic)
            shards = (doc or {}).get("shards") or []
            last = [(s.get("committed_offset"), s.get("high_watermark")) for s in shards]
            if shards and all(s["committed_offset"] == s["high_watermark"] for s in shards) \
                    and sum(s["high_watermark"] for s in shards) >= records:
                return doc
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic} not flushed after {timeout:.0f}s: "
                                   f"(committed, hw) per shard = {last}")
            time.sleep(0.1)


# --------------------------------------------------------------------------
# Kafka clients


def create_topic(bootstrap: str, topic: str, partitions: int, durability: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futs = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1,
                  config={"shoal.durability": durability})],
        request_timeout=60)
    futs[topic].result(timeout=90)


def producer(bootstrap: str, linger_ms: float):
    from confluent_kafka import Producer

    return Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": linger_ms,
        "batch.size": 1_000_000,
        "compression.type": "none",
        "enable.idempotence": False,
        "queue.buffering.max.kbytes": 256 * 1024,
        "queue.buffering.max.messages": 1_000_000,
        "message.timeout.ms": 300_000,
    })


class Payloads:
    """Random 1 KiB values, cut from 1 MiB blocks of os.urandom."""

    def __init__(self, size: int):
        self.size = size
        self.per_block = max(1, (1 << 20) // size)
        self.block = b""
        self.i = self.per_block

    def next(self) -> bytes:
        if self.i >= self.per_block:
            self.block = os.urandom(self.size * self.per_block)
            self.i = 0
        off = self.i * self.size
        self.i += 1
        return self.block[off:off + self.size]


def produce_bulk(bootstrap: str, topic: str, partitions: int, records: int, record_size: int,
                 linger_ms: float, timeout: float) -> dict:
    """As fast as the client goes, round-robin over the partitions; returns
    when every record is acknowledged."""
    p = producer(bootstrap, linger_ms)
    state = {"ok": 0, "err": 0, "first_err": None}

    def on_delivery(err, _msg):
        if err is None:
            state["ok"] += 1
        else:
            state["err"] += 1
            if state["first_err"] is None:
                state["first_err"] = str(err)

    payloads = Payloads(record_size)
    t0 = time.perf_counter()
    i = 0
    value = payloads.next()
    while i < records:
        try:
            p.produce(topic, value, partition=i % partitions, on_delivery=on_delivery)
        except BufferError:
            p.poll(0.005)
            continue
        i += 1
        value = payloads.next()
        if i % 1000 == 0:
            p.poll(0)
    left = p.flush(timeout)
    seconds = time.perf_counter() - t0
    if left or state["err"]:
        raise RuntimeError(f"produce to {topic}: {left} unacknowledged, {state['err']} failed "
                           f"(first error: {state['first_err']})")
    return {"records": state["ok"], "seconds": seconds}


def pct(sorted_xs: list[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(p / 100 * len(sorted_xs)))]


def consumer_config(bootstrap: str, fetch_max_bytes: int) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-{uuid.uuid4().hex[:10]}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "fetch.max.bytes": fetch_max_bytes,
        "max.partition.fetch.bytes": max(1 << 20, fetch_max_bytes // 4),
        "receive.message.max.bytes": fetch_max_bytes + (1 << 20),
        "queued.max.messages.kbytes": 256 * 1024,
        "fetch.wait.max.ms": 100,
    }


def consume_all(bootstrap: str, topic: str, high_watermarks: dict[int, int],
                fetch_max_bytes: int, timeout: float) -> dict:
    """A new consumer, every partition assigned at OFFSET_BEGINNING, read
    until each partition's next offset reaches its high watermark."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(consumer_config(bootstrap, fetch_max_bytes))
    try:
        nxt = {q: 0 for q in high_watermarks}
        pending = {q for q, hw in high_watermarks.items() if hw > 0}
        nbytes = 0
        records = 0
        first = None
        t0 = time.perf_counter()
        c.assign([TopicPartition(topic, q, OFFSET_BEGINNING) for q in high_watermarks])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"consume {topic}: timed out at {nxt} of {high_watermarks}")
            msgs = c.consume(num_messages=10_000, timeout=0.5)
            if msgs and first is None:
                first = time.perf_counter() - t0
            for m in msgs:
                if m.error() is not None:
                    raise RuntimeError(f"consume {topic}: {m.error()}")
                v = m.value()
                nbytes += len(v) if v is not None else 0
                nxt[m.partition()] = m.offset() + 1
            records += len(msgs)
            pending = {q for q in pending if nxt[q] < high_watermarks[q]}
        seconds = time.perf_counter() - t0
    finally:
        c.close()
    return {"records": records, "bytes": nbytes, "seconds": seconds,
            "first_record_s": first if first is not None else float("nan")}


# --------------------------------------------------------------------------
# measurements


def interval_ms(s: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read duration {s!r} (use e.g. 250ms or 1s)")
    return float(m.group(1)) * {"ms": 1, None: 1000, "s": 1000, "m": 60_000}[m.group(2)]


class Bench:
    def __init__(self, args, workdir: Path, moto: Moto):
        self.args = args
        self.workdir = workdir
        self.moto = moto
        self.run_id = uuid.uuid4().hex[:8]
        self.brokers: list[Broker] = []
        self.proxies: list[DelayProxy] = []
        self.results: list[dict] = []

    def broker(self, name: str, endpoint: str | None = None) -> Broker:
        prefix = f"{self.run_id}/{name}"
        b = Broker(self.args.bin, self.workdir, name, f"s3://{BUCKET}/{prefix}",
                   endpoint or self.moto.url, self.args.flush_interval)
        self.brokers.append(b)
        b.start()
        log(f"{name}: broker up on kafka {b.bootstrap}, http {b.http_base}, bucket prefix {prefix}")
        return b

    def record(self, doc: dict) -> None:
        emit(doc)
        self.results.append(doc)

    def cleanup(self) -> None:
        for b in self.brokers:
            try:
                b.stop(timeout=20)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"stopping {b.name}: {e!r}")
        for p in self.proxies:
            try:
                p.stop()
            except Exception as e:  # noqa: BLE001
                log(f"stopping proxy: {e!r}")

    # ---- 1 + 2 -----------------------------------------------------------

    def puts_per_gib(self, partitions: int) -> Broker:
        a = self.args
        b = self.broker(f"puts-{partitions}p")
        topic = f"puts-{partitions}p"
        create_topic(b.bootstrap, topic, partitions, "local")
        b.wait_stream(topic)
        records = a.mib * (1 << 20) // a.record_size
        before = b.requests()
        log(f"puts_per_gib: producing {a.mib} MiB to {partitions} partition(s)")
        t0 = time.perf_counter()
        prod = produce_bulk(b.bootstrap, topic, partitions, records, a.record_size, a.linger_ms,
                            a.flush_timeout)
        doc = b.wait_flushed(topic, records, a.flush_timeout)
        flushed_s = time.perf_counter() - t0
        after = b.requests()
        puts = after["put"] - before["put"]
        nbytes = prod["records"] * a.record_size
        objects = {seg.get("object") for sh in doc.get("shards", [])
                   for seg in sh.get("segments") or [] if isinstance(seg, dict)}
        objects.discard(None)
        self.record({
            "measurement": "puts_per_gib",
            "partitions": partitions,
            "mib": round(nbytes / (1 << 20), 1),
            "records": prod["records"],
            "puts": int(puts),
            "puts_per_gib": round(puts / (nbytes / (1 << 30)), 1),
            "segment_objects": len(objects),
            "other_requests": {k: int(after[k] - before[k]) for k in REQ_KINDS if k != "put"},
            "produce_s": round(prod["seconds"], 2),
            "mb_per_s": round(nbytes / prod["seconds"] / 1e6, 1),
            "flushed_s": round(flushed_s, 2),
        })
        return b

    def idle(self, b: Broker, partitions: int) -> None:
        a = self.args
        time.sleep(a.idle_settle)
        before = b.requests()
        log(f"idle_puts_per_hour: {a.idle_seconds:.0f} s without traffic "
            f"({partitions}-partition broker)")
        t0 = time.monotonic()
        time.sleep(a.idle_seconds)
        if not b.alive():
            raise RuntimeError(f"{b.name}: broker died while idle\n{tail(b.log_path)}")
        after = b.requests()
        elapsed = time.monotonic() - t0
        per_hour = {k: round((after[k] - before[k]) * 3600 / elapsed) for k in REQ_KINDS}
        self.record({
            "measurement": "idle_puts_per_hour",
            "partitions": partitions,
            "idle_s": round(elapsed, 1),
            "puts": int(after["put"] - before["put"]),
            "idle_puts_per_hour": per_hour["put"],
            "requests_per_hour": per_hour,
        })

    # ---- 3 ---------------------------------------------------------------

    def object_latency(self) -> None:
        a = self.args
        proxy = DelayProxy(self.moto.port, a.put_delay_ms / 1000.0).start()
        self.proxies.append(proxy)
        b = self.broker("object-latency", endpoint=proxy.url)
        topic = "object-latency"
        partitions = 16
        create_topic(b.bootstrap, topic, partitions, "object")
        doc = b.wait_stream(topic)
        durability = (doc.get("config") or {}).get("shoal.durability")
        if durability != "object":
            raise RuntimeError(f"topic durability is {durability!r}, not 'object': {doc}")
        p = producer(b.bootstrap, a.linger_ms)
        payloads = Payloads(a.record_size)
        # Warm-up: metadata and connections to every partition's leader.
        for q in range(partitions):
            p.produce(topic, payloads.next(), partition=q)
        if p.flush(60):
            raise RuntimeError("warm-up records not acknowledged")
        puts_before = proxy.counts["PUT"]
        lat: list[float] = []
        errors: list[str] = []
        perf = time.perf_counter

        def cb_for(t_sent):
            def cb(err, _msg):
                if err is None:
                    lat.append(perf() - t_sent)
                else:
                    errors.append(str(err))
            return cb

        log(f"object_latency: {a.rate:.0f} records/s for {a.seconds:.0f} s, "
            f"PUT delay {a.put_delay_ms:.0f} ms, flush interval {a.flush_interval}")
        start = perf()
        end = start + a.seconds
        sent = 0
        while True:
            now = perf()
            if now >= end:
                break
            due = int((now - start) * a.rate) + 1
            while sent < due:
                try:
                    p.produce(topic, payloads.next(), partition=sent % partitions,
                              on_delivery=cb_for(perf()))
                except BufferError:
                    break
                sent += 1
            p.poll(0.0005)
        produce_s = perf() - start
        left = p.flush(a.drain_timeout)
        failed = len(errors)
        if left:
            # Not acknowledged within the drain time: count them as failures
            # (their latency is at least that long) and drop them.
            p.purge()
            p.flush(0)
        lat.sort()
        goal = interval_ms(a.flush_interval) + 100
        p99 = pct(lat, 99) * 1e3
        self.record({
            "measurement": "object_latency",
            "partitions": partitions,
            "put_delay_ms": a.put_delay_ms,
            "flush_interval": a.flush_interval,
            "target_rate": a.rate,
            "sent": sent,
            "acked": len(lat),
            "errors": failed,
            "unacked": left,
            "rate": round(sent / produce_s),
            "p50_ms": round(pct(lat, 50) * 1e3, 1),
            "p90_ms": round(pct(lat, 90) * 1e3, 1),
            "p99_ms": round(p99, 1),
            "max_ms": round(lat[-1] * 1e3, 1) if lat else None,
            "goal_p99_ms": goal,
            # Unacknowledged or failed records mean the tail is worse than p99 of the acked.
            "goal_met": bool(lat) and p99 <= goal and not failed and not left,
            "delayed_puts": proxy.counts["PUT"] - puts_before,
        })
        del p  # before the broker goes: no reconnect noise from librdkafka
        b.stop()

    # ---- 4 ---------------------------------------------------------------

    def catch_up(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        a = self.args
        b = self.broker("catch-up")
        topic = "catch-up"
        partitions = a.catchup_partitions
        create_topic(b.bootstrap, topic, partitions, "local")
        b.wait_stream(topic)
        records = a.catchup_mib * (1 << 20) // a.record_size
        log(f"catch_up: producing {a.catchup_mib} MiB to {partitions} partitions")
        prod = produce_bulk(b.bootstrap, topic, partitions, records, a.record_size, a.linger_ms,
                            a.flush_timeout)
        doc = b.wait_flushed(topic, records, a.flush_timeout)
        hws = {sh.get("shard", i): sh["high_watermark"] for i, sh in enumerate(doc["shards"])}

        t0 = time.perf_counter()
        rc = b.stop()
        stop_s = time.perf_counter() - t0
        cache = b.data_dir / "cache"
        # Allocated blocks, not apparent size: the cache file may be preallocated.
        cache_bytes = sum(f.stat().st_blocks * 512 for f in cache.rglob("*") if f.is_file()) \
            if cache.exists() else 0
        shutil.rmtree(cache, ignore_errors=True)
        log(f"catch_up: broker stopped (exit {rc}, {stop_s:.1f} s), removed {cache} "
            f"({cache_bytes / (1 << 20):.1f} MiB); restarting")
        t0 = time.perf_counter()
        b.start()
        restart_s = time.perf_counter() - t0

        # The restarted broker must report the same high watermarks.
        c = Consumer(consumer_config(b.bootstrap, a.fetch_max_bytes))
        try:
            got = {q: c.get_watermark_offsets(TopicPartition(topic, q), timeout=30)[1] for q in hws}
        finally:
            c.close()
        if got != hws:
            raise RuntimeError(f"high watermarks after restart {got} != before {hws}")

        out = {
            "measurement": "catch_up",
            "partitions": partitions,
            "mib": round(prod["records"] * a.record_size / (1 << 20), 1),
            "records": prod["records"],
            "produce_mb_per_s": round(prod["records"] * a.record_size / prod["seconds"] / 1e6, 1),
            "stop_s": round(stop_s, 2),
            "stop_exit_code": rc,
            "cache_mib_deleted": round(cache_bytes / (1 << 20), 1),
            "restart_s": round(restart_s, 2),
        }
        for label in ("cold", "warm"):
            before = b.metrics()
            log(f"catch_up: reading everything from offset 0 ({label} cache)")
            r = consume_all(b.bootstrap, topic, hws, a.fetch_max_bytes, a.flush_timeout)
            after = b.metrics()
            if r["records"] < prod["records"]:
                raise RuntimeError(f"{label} read got {r['records']} of {prod['records']} records")
            out[f"{label}_mb_per_s"] = round(r["bytes"] / r["seconds"] / 1e6, 1)
            out[f"{label}_s"] = round(r["seconds"], 2)
            out[f"{label}_first_record_s"] = round(r["first_record_s"], 3)
            out[f"{label}_gets"] = int(after.get('shoal_object_store_requests_total{kind="get"}', 0)
                                       - before.get('shoal_object_store_requests_total{kind="get"}', 0))
            for k in ("shoal_cache_hits_total", "shoal_cache_misses_total"):
                if k in after:
                    out[f"{label}_{k[len('shoal_'):-len('_total')]}"] = int(after[k] - before.get(k, 0))
        self.record(out)
        b.stop()

    # ---- driver ----------------------------------------------------------

    def run(self, only: set[str]) -> int:
        a = self.args
        failures = 0

        def guarded(name: str, fn, *fargs):
            nonlocal failures
            try:
                return fn(*fargs)
            except Exception as e:  # noqa: BLE001 - report and go on with the next one
                failures += 1
                log(f"{name} FAILED: {e}")
                for b in self.brokers:  # nothing left running into the next measurement
                    if b.alive():
                        b.stop(timeout=20)
                self.record({"measurement": name, "error": str(e).splitlines()[0][:500]})
                return None

        if "puts_per_gib" in only or "idle_puts_per_hour" in only:
            for i, parts in enumerate(a.partitions_list):
                last = i == len(a.partitions_list) - 1
                if "puts_per_gib" not in only and not last:
                    continue
                b = guarded("puts_per_gib", self.puts_per_gib, parts)
                if b is None:
                    continue
                if last and "idle_puts_per_hour" in only:
                    guarded("idle_puts_per_hour", self.idle, b, parts)
                b.stop()
        if "object_latency" in only:
            guarded("object_latency", self.object_latency)
        if "catch_up" in only:
            guarded("catch_up", self.catch_up)
        return failures


def parts(n: int) -> str:
    return f"{n} partition{'' if n == 1 else 's'}"


def markdown(results: list[dict]) -> str:
    rows = []
    for r in results:
        m = r["measurement"]
        if "error" in r:
            rows.append((m, "", f"FAILED: {r['error'][:120]}", ""))
        elif m == "puts_per_gib":
            rows.append((m, f"{parts(r['partitions'])}, {r['mib']:g} MiB",
                         f"**{r['puts_per_gib']:,.0f} PUT/GiB** ({r['puts']} PUTs), "
                         f"{r['mb_per_s']} MB/s, flushed after {r['flushed_s']} s", ""))
        elif m == "idle_puts_per_hour":
            rows.append((m, f"{r['idle_s']:g} s idle, {parts(r['partitions'])}",
                         f"**{r['idle_puts_per_hour']:,} PUT/h** ({r['puts']} PUTs)", ""))
        elif m == "object_latency":
            goal = (f"p99 <= {r['goal_p99_ms']:g} ms: "
                    + ("met" if r["goal_met"] else "**not met**"))
            rows.append((m, f"{parts(r['partitions'])}, {r['target_rate']:g}/s, "
                            f"PUT +{r['put_delay_ms']:g} ms, flush {r['flush_interval']}",
                         f"p50 **{r['p50_ms']} ms**, p99 **{r['p99_ms']} ms** "
                         f"(max {r['max_ms']} ms, {r['acked']} acked, {r['errors']} failed, "
                         f"{r['unacked']} unacked)", goal))
        elif m == "catch_up":
            params = f"{parts(r['partitions'])}, {r['mib']:g} MiB"
            rows.append(("catch_up (cold cache)", params,
                         f"**{r['cold_mb_per_s']} MB/s** ({r['cold_s']} s, {r['cold_gets']} GETs)", ""))
            rows.append(("catch_up (warm cache)", params,
                         f"**{r['warm_mb_per_s']} MB/s** ({r['warm_s']} s, {r['warm_gets']} GETs)", ""))
    out = ["| measurement | parameters | result | goal |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def main() -> int:
    default_bin = os.environ.get("SHOAL_BIN") or str(REPO_ROOT / "target" / "release" / "shoal")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=default_bin, help="shoal binary (default: $SHOAL_BIN or target/release/shoal)")
    ap.add_argument("--moto", default="moto_server", help="moto_server executable")
    ap.add_argument("--mib", type=int, default=256, help="MiB produced per puts_per_gib run")
    ap.add_argument("--partitions-list", default="1,16,256",
                    type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                    help="partition counts for puts_per_gib (idle uses the last)")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--idle-settle", type=float, default=1.0,
                    help="seconds between the last flush and the start of the idle window")
    ap.add_argument("--put-delay-ms", type=float, default=30)
    ap.add_argument("--rate", type=float, default=2000, help="records/s for object_latency")
    ap.add_argument("--seconds", type=float, default=20, help="length of the object_latency run")
    ap.add_argument("--drain-timeout", type=float, default=60,
                    help="object_latency: seconds to wait for the last acks after the run")
    ap.add_argument("--catchup-mib", type=int, default=256)
    ap.add_argument("--catchup-partitions", type=int, default=4)
    ap.add_argument("--flush-interval", default="250ms", help="the broker's --flush-interval")
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--linger-ms", type=float, default=5)
    ap.add_argument("--fetch-max-bytes", type=int, default=64 << 20)
    ap.add_argument("--flush-timeout", type=float, default=300,
                    help="seconds to wait for acks / the flush / a full read")
    ap.add_argument("--only", default=",".join(MEASUREMENTS),
                    help=f"comma list out of {','.join(MEASUREMENTS)}")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data dirs)")
    args = ap.parse_args()
    interval_ms(args.flush_interval)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if only - set(MEASUREMENTS) or not args.partitions_list:
        ap.error(f"--only takes {','.join(MEASUREMENTS)}; --partitions-list must not be empty")
    args.bin = os.path.abspath(args.bin)

    # SIGTERM runs the same cleanup as Ctrl-C.
    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    workdir = Path(tempfile.mkdtemp(prefix="shoal-s3-bench."))
    moto = None
    bench = None
    failures = 0
    try:
        log(f"binary {args.bin}; temp dir {workdir}")
        moto = Moto(workdir, args.moto).start()
        log(f"moto on {moto.url}, bucket {BUCKET}")
        bench = Bench(args, workdir, moto)
        failures = bench.run(only)
    finally:
        if bench is not None:
            bench.cleanup()
        if moto is not None:
            moto.stop()
        if bench is not None and failures:
            for b in bench.brokers:
                log(f"--- last lines of {b.log_path} ---\n{tail(b.log_path, 15)}")
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(markdown(bench.results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
