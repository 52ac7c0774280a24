#!/usr/bin/env python3
"""Data-lifecycle benchmark: compaction, request cost and bounded state of
Shoal on the moto S3 emulator.

Each measurement gets its own `shoal standalone` on fresh loopback ports, a
fresh data directory and a fresh prefix in one moto bucket. Records are
random (incompressible) 1 KiB values produced with confluent-kafka
(librdkafka), acks=all, linger.ms=5.

1. compaction: a standalone with `--compaction false --placement-in-bucket
   false` (only data-path requests reach the bucket) and --flush-interval
   (250ms) gets --mib MiB (512) over --topics (8) topics x 4 partitions.
   Once every shard is flushed (committed_offset == high_watermark) it
   counts the bucket's objects under the prefix (boto3) and the live files
   of each stream, then times `shoal compactor --once --compaction-delay 0s
   --gc-grace 1h`: compaction MB/s (the run's bytes_in / wall time, and the
   MiB of records / wall time), live files and bucket objects after, and
   the request counts the compactor reports. A second `shoal compactor
   --once --gc-grace 0s` then deletes the replaced objects: objects deleted
   and bucket objects after. Last, a new consumer reads one topic from
   offset 0 and must get as many records as were produced to it.
2. cost: a standalone with the in-process compactor on (--compaction-delay
   20s, --compaction-interval 10s, --gc-grace 20s, --orphan-grace 1h) and
   `--placement-in-bucket false` (--cost-placement-in-bucket to change it),
   4 topics x 4 partitions with retention.ms=60000, produced to at full
   speed (or --rate-mib) for --seconds (180). Then it waits (at most
   --settle-timeout, 120 s) until compaction and GC have settled: no stream
   has bytes in the flush tier (`bytes_by_tier`), and a compaction run that
   started at least --gc-grace after that moment has deleted objects. The
   delta of shoal_object_store_requests_total{kind} over the whole window
   (first record to settled) gives requests per GiB and $ per GiB at S3
   Standard us-east-1 list prices (PUT/COPY/POST/LIST $0.005 per 1,000,
   GET/HEAD $0.0004 per 1,000, DELETE free). An idle window (--idle-seconds,
   30) gives the background request rate per second; subtracting it from the
   window leaves the data-path requests per GiB, and
       $/GiB at 100 MiB/s = price(data-path requests per GiB
                                  + background requests per s / 0.09765625)
   which is compared with the goal of <= $0.003 per GiB.
3. bounded_state: every --sample-interval (10 s) during the run of 2 (or a
   separate run of --state-seconds, same settings, when given): the byte
   size of placement's `list_streams` and `lifecycle` query answers, the
   index entries (segments summed over shards), the retired objects, the
   broker's RSS and the bucket's object count. The verdict compares the
   last third of the load-phase samples with the middle third (reported,
   not asserted).

Output: one JSON line per measurement on stdout, then a markdown table.
Progress goes to stderr. Every process and temp dir it starts is cleaned up,
also on failure or Ctrl-C (--keep keeps the temp dir with the logs).

    python3 bench/lifecycle.py                                   # full run
    python3 bench/lifecycle.py --only cost,bounded_state --rate-mib 50
    python3 bench/lifecycle.py --mib 32 --topics 2 --seconds 30 \\
        --idle-seconds 10 --settle-timeout 90                    # quick smoke run
    SHOAL_BIN=target/debug/shoal python3 bench/lifecycle.py --only compaction

Needs: a build with `shoal compactor` (target/release/shoal if present,
else target/debug/shoal; or SHOAL_BIN / --bin), moto (moto_server on PATH
or `python3 -m moto.server`), and the Python packages confluent-kafka and
boto3. It imports its helpers from bench/s3.py.

moto keeps objects in memory (or in its temp files): at full speed a long
cost run holds about (retention + gc grace + compaction delay) x ingest rate
there; --rate-mib caps it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3 import (  # noqa: E402  (bench/ is put on sys.path above)
    REQ_KINDS,
    Broker,
    Payloads,
    consume_all,
    emit,
    free_port,
    http_get,
    log,
    producer,
    stop_process,
    tail,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = "shoal-lifecycle"
MEASUREMENTS = ("compaction", "cost", "bounded_state")
PARTITIONS = 4
COST_TOPICS = 4
GIB = float(1 << 30)
MIB = float(1 << 20)
# 100 MiB/s in GiB/s.
GIB_PER_S_AT_100_MIB = 100 * MIB / GIB  # 0.09765625
# S3 Standard, us-east-1 list prices, $ per request.
PRICE = {
    "put": 0.005 / 1000,    # PUT, COPY, POST (multipart create/part/complete)
    "list": 0.005 / 1000,
    "get": 0.0004 / 1000,
    "head": 0.0004 / 1000,
    "delete": 0.0,
}
PRICE_NOTE = ("$ = (PUT + LIST) x $0.005/1000 + (GET + HEAD) x $0.0004/1000 + DELETE x $0 "
              "(S3 Standard us-east-1 list prices; multipart create/part/complete/copy count as PUT)")
GOAL_DOLLARS_PER_GIB = 0.003



def dollars(reqs: dict[str, float]) -> float:
    return sum(max(0.0, reqs.get(k, 0.0)) * PRICE[k] for k in REQ_KINDS)


def http_post_json(url: str, body, timeout: float = 30.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read() or b""


def child_env(endpoint: str) -> dict[str, str]:
    """The environment of every shoal process: ours without SHOAL_* (broker
    configuration) or AWS credentials of the caller, plus moto's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN"):
        env.pop(k, None)
    env.update({
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "NO_COLOR": "1",
    })
    return env


# --------------------------------------------------------------------------
# moto


class Moto:
    def __init__(self, workdir: Path, command: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        self.command = command
        self.proc: subprocess.Popen | None = None
        self._s3 = None

    def start(self) -> "Moto":
        with open(self.log_path, "ab") as logf:
            # Its own process group: moto_server may be a wrapper script.
            self.proc = subprocess.Popen(
                [*self.command, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                http_get(self.url + "/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto not answering on {self.url}:\n{tail(self.log_path)}")
                time.sleep(0.1)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def client(self):
        """A new boto3 S3 client (one per thread)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(proxies={}, retries={"max_attempts": 3}))

    def stop(self) -> None:
        stop_process(self.proc, timeout=10, group=True)


def count_objects(s3, prefix: str) -> dict:
    """Objects under `prefix/` by first path component (segments, streams,
    staging, placement), their total and bytes."""
    out: dict = {"total": 0, "bytes": 0, "by_dir": {}}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix.rstrip("/") + "/")
    for page in pages:
        for o in page.get("Contents") or []:
            rest = o["Key"][len(prefix.rstrip("/")) + 1:]
            top = rest.split("/", 1)[0] if "/" in rest else "(top)"
            out["by_dir"][top] = out["by_dir"].get(top, 0) + 1
            out["total"] += 1
            out["bytes"] += int(o.get("Size") or 0)
    return out


# --------------------------------------------------------------------------
# the broker


class LBroker(Broker):
    """bench/s3.py's Broker, started with extra flags."""

    def __init__(self, *args, extra: list[str] | None = None, **kw):
        super().__init__(*args, **kw)
        self.extra = list(extra or [])

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> "LBroker":
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"shoal binary not found or not executable: {self.binary}")
        cmd = [self.binary, "standalone",
               "--data-dir", str(self.data_dir),
               "--kafka-addr", self.bootstrap,
               "--http-addr", self.http_addr,
               "--mqtt-addr", "off",
               "--object-store", self.object_store,
               "--flush-interval", self.flush_interval,
               *self.extra]
        env = child_env(self.s3_endpoint)
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

    def query(self, q) -> bytes:
        status, body = http_post_json(self.http_base + "/placement/v1/query", q)
        if status != 200:
            raise RuntimeError(f"placement query {q!r} answered {status}: {body[:300]!r}")
        return body

    def compaction_doc(self) -> dict:
        status, body = http_get(self.http_base + "/api/v1/compaction")
        if status != 200:
            raise RuntimeError(f"/api/v1/compaction answered {status}: {body[:300]!r}")
        return json.loads(body)

    def rss_kib(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except (OSError, ValueError, AttributeError):
            pass
        return None


def unwrap(doc, key: str):
    """QueryReply is externally tagged: {"streams": {"streams": [...]}}."""
    if isinstance(doc, dict) and key in doc:
        inner = doc[key]
        if isinstance(inner, dict) and key in inner:
            return inner[key]
        return inner
    return doc


# --------------------------------------------------------------------------
# Kafka


def create_topics(bootstrap: str, topics: list[str], partitions: int, config: dict[str, str]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futs = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1, config=dict(config))
         for t in topics], request_timeout=60)
    for t in topics:
        futs[t].result(timeout=90)


class Produced:
    """Acknowledged / failed records per topic (delivery callbacks)."""

    def __init__(self):
        self.ok: dict[str, int] = {}
        self.err = 0
        self.first_err: str | None = None

    def __call__(self, err, msg):
        if err is None:
            t = msg.topic()
            self.ok[t] = self.ok.get(t, 0) + 1
        else:
            self.err += 1
            if self.first_err is None:
                self.first_err = str(err)

    @property
    def total(self) -> int:
        return sum(self.ok.values())


def produce(bootstrap: str, topics: list[str], partitions: int, record_size: int,
            linger_ms: float, drain_timeout: float, *, records: int | None = None,
            seconds: float | None = None, rate_mib: float | None = None,
            stop: threading.Event | None = None) -> dict:
    """Round-robin over every (topic, partition): `records` records, or for
    `seconds` (at `rate_mib` MiB/s, or as fast as the client goes). Returns
    when every record is acknowledged (or failed)."""
    p = producer(bootstrap, linger_ms)
    acks = Produced()
    targets = [(t, q) for t in topics for q in range(partitions)]
    payloads = Payloads(record_size)
    rate = rate_mib * MIB / record_size if rate_mib else None
    perf = time.perf_counter
    t0 = perf()
    end = t0 + seconds if seconds is not None else None
    i = 0
    value = payloads.next()
    try:
        while True:
            if records is not None and i >= records:
                break
            if i % 1000 == 0:
                p.poll(0)
                now = perf()
                if end is not None and now >= end:
                    break
                if stop is not None and stop.is_set():
                    break
            if rate is not None:
                due = int((perf() - t0) * rate) + 1
                if i >= due:
                    p.poll(0.001)
                    if end is not None and perf() >= end:
                        break
                    continue
            t, q = targets[i % len(targets)]
            try:
                p.produce(t, value, partition=q, on_delivery=acks)
            except BufferError:
                p.poll(0.005)
                continue
            i += 1
            value = payloads.next()
        send_s = perf() - t0
        left = p.flush(drain_timeout)
        seconds_all = perf() - t0
        if left:
            p.purge()
            p.flush(0)
    finally:
        del p
    if left or acks.err:
        raise RuntimeError(f"produce: {left} unacknowledged, {acks.err} failed "
                           f"(first error: {acks.first_err})")
    return {"sent": i, "records": acks.total, "per_topic": dict(acks.ok),
            "send_s": send_s, "seconds": seconds_all}


# --------------------------------------------------------------------------
# compaction runs and state samples


class RunLog:
    """Every compaction run seen in /api/v1/compaction (it keeps the last 20
    only, so it is polled often), by (holder, epoch, started_ms)."""

    def __init__(self, broker: LBroker):
        self.broker = broker
        self.runs: dict[tuple, dict] = {}
        self.lock = threading.Lock()
        self.last_doc: dict = {}

    def poll(self) -> dict:
        doc = self.broker.compaction_doc()
        with self.lock:
            self.last_doc = doc
            for r in doc.get("runs") or []:
                self.runs[(r.get("holder"), r.get("epoch"), r.get("started_ms"))] = r
        return doc

    def since(self, t_ms: int) -> list[dict]:
        with self.lock:
            return sorted((r for r in self.runs.values() if (r.get("started_ms") or 0) >= t_ms),
                          key=lambda r: r.get("started_ms") or 0)


def summarize_runs(runs: list[dict]) -> dict:
    keys = ("objects_in", "objects_out", "bytes_in", "bytes_out", "shards_trimmed", "objects_deleted")
    out = {k: sum(int(r.get(k) or 0) for r in runs) for k in keys}
    errs = [e for r in runs for e in (r.get("errors") or [])]
    out.update({
        "runs": len(runs),
        "unfinished_runs": sum(1 for r in runs if r.get("unfinished")),
        "max_duration_ms": max((int(r.get("duration_ms") or 0) for r in runs), default=0),
        "errors": len(errs),
        "first_errors": errs[:3],
    })
    return out


class Sampler(threading.Thread):
    """Samples placement's state size, the broker's RSS and the bucket every
    `interval` seconds; also polls the compaction runs."""

    def __init__(self, broker: LBroker, moto: Moto, prefix: str, interval: float, runlog: RunLog):
        super().__init__(daemon=True, name="sampler")
        self.broker = broker
        self.moto = moto
        self.prefix = prefix
        self.interval = interval
        self.runlog = runlog
        self.samples: list[dict] = []
        self.phase = "load"
        self.t0 = time.monotonic()
        self.stop_ev = threading.Event()
        self.errors: list[str] = []

    def sample(self, s3) -> dict:
        b = self.broker
        ls = b.query("list_streams")
        lc = b.query("lifecycle")
        streams = unwrap(json.loads(ls), "streams") or []
        lifecycle = unwrap(json.loads(lc), "lifecycle") or {}
        entries = sum(len(sh.get("segments") or []) for s in streams for sh in s.get("shards") or [])
        objects = count_objects(s3, self.prefix)
        try:
            self.runlog.poll()
        except Exception as e:  # noqa: BLE001 - a sample without runs is still a sample
            self.errors.append(f"compaction poll: {e}")
        rss = b.rss_kib()
        return {
            "t_s": round(time.monotonic() - self.t0, 1),
            "phase": self.phase,
            "list_streams_bytes": len(ls),
            "lifecycle_bytes": len(lc),
            "index_entries": entries,
            "retired_objects": len(lifecycle.get("retired") or {}),
            "rss_mib": round(rss / 1024, 1) if rss is not None else None,
            "bucket_objects": objects["total"],
            "bucket_mib": round(objects["bytes"] / MIB, 1),
        }

    def run(self) -> None:
        s3 = self.moto.client()
        while True:
            try:
                if self.broker.alive():
                    s = self.sample(s3)
                    self.samples.append(s)
                    log(f"  sample t={s['t_s']:.0f}s [{s['phase']}] index={s['index_entries']} "
                        f"retired={s['retired_objects']} list_streams={s['list_streams_bytes']}B "
                        f"lifecycle={s['lifecycle_bytes']}B rss={s['rss_mib']}MiB "
                        f"bucket={s['bucket_objects']} objects/{s['bucket_mib']}MiB")
            except Exception as e:  # noqa: BLE001 - keep sampling
                self.errors.append(str(e)[:200])
                log(f"  sample failed: {e}")
            if self.stop_ev.wait(self.interval):
                return

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(timeout=60)


STATE_KEYS = ("index_entries", "bucket_objects", "list_streams_bytes", "lifecycle_bytes",
              "retired_objects", "rss_mib", "bucket_mib")


def state_verdict(samples: list[dict], tolerance: float) -> dict:
    """Compare the last third of the load-phase samples with the middle
    third: mean of each, growth in %, and 'growing' when the last third's
    mean exceeds the middle third's by more than `tolerance`."""
    load = [s for s in samples if s["phase"] == "load"]
    n = len(load)
    if n < 3:
        return {"load_samples": n, "verdict": "too few load samples (need >= 3)"}
    third = n // 3
    middle = load[third:2 * third]
    last = load[n - third:]
    out: dict = {"load_samples": n, "middle_t_s": [middle[0]["t_s"], middle[-1]["t_s"]],
                 "last_t_s": [last[0]["t_s"], last[-1]["t_s"]], "metrics": {}}
    growing = []
    for k in STATE_KEYS:
        mv = [s[k] for s in middle if s.get(k) is not None]
        lv = [s[k] for s in last if s.get(k) is not None]
        if not mv or not lv:
            continue
        m_mean, l_mean = sum(mv) / len(mv), sum(lv) / len(lv)
        growth = (l_mean / m_mean - 1) * 100 if m_mean else (0.0 if not l_mean else float("inf"))
        out["metrics"][k] = {"middle_mean": round(m_mean, 1), "last_mean": round(l_mean, 1),
                             "last_max": max(lv), "growth_pct": round(growth, 1)}
        if k in ("index_entries", "bucket_objects") and growth > tolerance * 100:
            growing.append(k)
    out["growing"] = growing
    out["verdict"] = ("index and object count not growing (last third within "
                      f"{tolerance * 100:g} % of the middle third)" if not growing
                      else f"growing: {', '.join(growing)}")
    return out


# --------------------------------------------------------------------------
# measurements


class Bench:
    def __init__(self, args, workdir: Path, moto: Moto):
        self.args = args
        self.workdir = workdir
        self.moto = moto
        self.run_id = uuid.uuid4().hex[:8]
        self.brokers: list[LBroker] = []
        self.procs: list[subprocess.Popen] = []
        self.samplers: list[Sampler] = []
        self.results: list[dict] = []
        self.s3 = moto.client()

    def prefix(self, name: str) -> str:
        return f"{self.run_id}/{name}"

    def broker(self, name: str, extra: list[str]) -> LBroker:
        b = LBroker(self.args.bin, self.workdir, name, f"s3://{BUCKET}/{self.prefix(name)}",
                    self.moto.url, self.args.flush_interval, extra=extra)
        self.brokers.append(b)
        b.start()
        log(f"{name}: broker up on kafka {b.bootstrap}, http {b.http_base}, "
            f"bucket prefix {self.prefix(name)}; flags {' '.join(extra)}")
        return b

    def record(self, doc: dict) -> None:
        emit(doc)
        self.results.append(doc)

    def cleanup(self) -> None:
        for s in self.samplers:
            s.stop_ev.set()
        for p in self.procs:
            try:
                stop_process(p, timeout=10, group=True)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"stopping compactor: {e!r}")
        for b in self.brokers:
            try:
                b.stop(timeout=20)
            except Exception as e:  # noqa: BLE001
                log(f"stopping {b.name}: {e!r}")

    def compactor_once(self, b: LBroker, label: str, flags: list[str]) -> tuple[dict, float]:
        """`shoal compactor --once` against `b`; its JSON answer and wall time."""
        a = self.args
        cmd = [a.bin, "compactor", "--placement", b.http_addr, "--object-store", b.object_store,
               "--once", *flags]
        log_path = b.log_path.parent / f"compactor-{label}.log"
        with open(log_path, "ab") as logf:
            logf.write(f"===== bench: {' '.join(cmd)}\n".encode())
            logf.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=logf, env=child_env(self.moto.url), start_new_session=True)
            self.procs.append(proc)
            try:
                out, _ = proc.communicate(timeout=a.compactor_timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc, timeout=10, group=True)
                raise RuntimeError(f"shoal compactor ({label}) still running after "
                                   f"{a.compactor_timeout:.0f}s\n{tail(log_path)}")
            wall = time.perf_counter() - t0
        text = out.decode(errors="replace")
        with open(log_path, "a") as logf:
            logf.write(f"===== stdout:\n{text}\n")
        if proc.returncode != 0:
            raise RuntimeError(f"shoal compactor ({label}) exited with {proc.returncode}\n{tail(log_path)}")
        for line in reversed(text.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                doc = json.loads(line)
                if "run" in doc:
                    return doc, wall
        raise RuntimeError(f"shoal compactor ({label}) printed no JSON run: {text[:500]!r}")

    def live_files(self, b: LBroker, topics: list[str]) -> dict:
        per = {}
        tiers = {"flush": 0, "compacted": 0}
        for t in topics:
            doc = b.stream(t) or {}
            per[t] = len(doc.get("files") or [])
            for k, v in (doc.get("bytes_by_tier") or {}).items():
                tiers[k] = tiers.get(k, 0) + int(v)
        return {"total": sum(per.values()), "per_stream": per, "bytes_by_tier": tiers}

    # ---- 1 ---------------------------------------------------------------

    def compaction(self) -> None:
        a = self.args
        name = "compaction"
        b = self.broker(name, ["--compaction", "false", "--placement-in-bucket", "false"])
        topics = [f"lc-{i}" for i in range(a.topics)]
        create_topics(b.bootstrap, topics, PARTITIONS, {})
        for t in topics:
            b.wait_stream(t)
        records = a.mib * (1 << 20) // a.record_size
        log(f"compaction: producing {a.mib} MiB to {len(topics)} topics x {PARTITIONS} partitions")
        prod = produce(b.bootstrap, topics, PARTITIONS, a.record_size, a.linger_ms, a.flush_timeout,
                       records=records)
        t0 = time.perf_counter()
        hws = {}
        for t in topics:
            doc = b.wait_flushed(t, prod["per_topic"].get(t, 0), a.flush_timeout)
            hws[t] = {sh["shard"]: sh["high_watermark"] for sh in doc["shards"]}
        log(f"compaction: {prod['records']} records acknowledged in {prod['seconds']:.1f} s, "
            f"flushed {time.perf_counter() - t0:.1f} s later")
        files_before = self.live_files(b, topics)
        bucket_before = count_objects(self.s3, self.prefix(name))
        log(f"compaction: {bucket_before['total']} objects in the bucket, "
            f"{files_before['total']} live files; running shoal compactor --once")

        comp, wall = self.compactor_once(b, "compact", ["--compaction-delay", "0s", "--gc-grace", "1h"])
        run = comp["run"]
        files_after = self.live_files(b, topics)
        bucket_after = count_objects(self.s3, self.prefix(name))
        log(f"compaction: {run.get('bytes_in', 0) / 1e6:.1f} MB in {wall:.1f} s; "
            f"{files_after['total']} live files, {bucket_after['total']} bucket objects")

        # GC: --gc-grace 0s, repeated while a run says it left work (1000 deletes per run).
        gc_runs = []
        gc_wall = 0.0
        for _ in range(10):
            gc, w = self.compactor_once(b, f"gc{len(gc_runs)}",
                                        ["--compaction-delay", "0s", "--gc-grace", "0s"])
            gc_runs.append(gc)
            gc_wall += w
            if not gc["run"].get("unfinished"):
                break
        bucket_gc = count_objects(self.s3, self.prefix(name))
        files_gc = self.live_files(b, topics)
        deleted = sum(int(g["run"].get("objects_deleted") or 0) for g in gc_runs)
        log(f"compaction: GC deleted {deleted} objects; {bucket_gc['total']} bucket objects left")

        # Sanity: one topic from offset 0.
        check = topics[0]
        r = consume_all(b.bootstrap, check, hws[check], a.fetch_max_bytes, a.flush_timeout)
        want = prod["per_topic"].get(check, 0)
        nbytes = prod["records"] * a.record_size
        secs = max(wall, 1e-9)
        gc_req = {k: sum(int(g["requests"].get(k) or 0) for g in gc_runs)
                  for k in (*REQ_KINDS, "bytes_read", "bytes_written")}
        self.record({
            "measurement": "compaction",
            "placement_in_bucket": False,
            "topics": len(topics),
            "partitions": PARTITIONS,
            "mib": round(nbytes / MIB, 1),
            "records": prod["records"],
            "produce_mb_per_s": round(nbytes / prod["seconds"] / 1e6, 1),
            "bucket_objects_before": bucket_before["total"],
            "bucket_mib_before": round(bucket_before["bytes"] / MIB, 1),
            "live_files_before": files_before["total"],
            "live_files_per_stream_before": files_before["per_stream"],
            "bytes_by_tier_before": files_before["bytes_by_tier"],
            "compactor_wall_s": round(wall, 2),
            "compactor_run_ms": run.get("duration_ms"),
            "compaction_mb_per_s": round(int(run.get("bytes_in") or 0) / secs / 1e6, 1),
            "compaction_mb_per_s_in_run": round(int(run.get("bytes_in") or 0)
                                                / max(int(run.get("duration_ms") or 0), 1) / 1e3, 1),
            "compaction_record_mib_per_s": round(nbytes / MIB / secs, 1),
            "run": run,
            "compactor_requests": comp.get("requests"),
            "live_files_after": files_after["total"],
            "live_files_per_stream_after": files_after["per_stream"],
            "bytes_by_tier_after": files_after["bytes_by_tier"],
            "bucket_objects_after": bucket_after["total"],
            "bucket_mib_after": round(bucket_after["bytes"] / MIB, 1),
            "bucket_by_dir_after": bucket_after["by_dir"],
            "gc_passes": len(gc_runs),
            "gc_wall_s": round(gc_wall, 2),
            "gc_objects_deleted": deleted,
            "gc_errors": [e for g in gc_runs for e in (g["run"].get("errors") or [])][:3],
            "gc_requests": gc_req,
            "live_files_after_gc": files_gc["total"],
            "bucket_objects_after_gc": bucket_gc["total"],
            "bucket_mib_after_gc": round(bucket_gc["bytes"] / MIB, 1),
            "bucket_by_dir_after_gc": bucket_gc["by_dir"],
            "sanity_topic": check,
            "sanity_produced": want,
            "sanity_consumed": r["records"],
            "sanity_ok": r["records"] == want,
        })
        b.stop()

    # ---- 2 + 3 -----------------------------------------------------------

    def lifecycle_run(self, name: str, seconds: float, want_cost: bool, want_state: bool) -> None:
        a = self.args
        pib = "true" if a.cost_placement_in_bucket else "false"
        extra = ["--placement-in-bucket", pib, "--compaction", "true",
                 "--compaction-delay", a.compaction_delay, "--compaction-interval", a.compaction_interval,
                 "--gc-grace", a.gc_grace, "--orphan-grace", "1h"]
        b = self.broker(name, extra)
        topics = [f"{name}-{i}" for i in range(COST_TOPICS)]
        create_topics(b.bootstrap, topics, PARTITIONS, {"retention.ms": str(a.retention_ms)})
        for t in topics:
            doc = b.wait_stream(t)
            got = (doc.get("config") or {}).get("retention.ms")
            if got is not None and str(got) != str(a.retention_ms):
                log(f"{name}: warning: {t} has retention.ms={got}, asked {a.retention_ms}")
        runlog = RunLog(b)
        sampler = Sampler(b, self.moto, self.prefix(name), a.sample_interval, runlog)
        self.samplers.append(sampler)

        before = b.requests()
        t_start = time.monotonic()
        sampler.start()
        log(f"{name}: producing to {COST_TOPICS} topics x {PARTITIONS} partitions for {seconds:g} s "
            f"({'%g MiB/s' % a.rate_mib if a.rate_mib else 'as fast as possible'}), "
            f"retention.ms={a.retention_ms}")
        prod = produce(b.bootstrap, topics, PARTITIONS, a.record_size, a.linger_ms, a.flush_timeout,
                       seconds=seconds, rate_mib=a.rate_mib)
        end_ms = int(time.time() * 1000)
        t_end = time.monotonic()
        nbytes = prod["records"] * a.record_size
        log(f"{name}: {prod['records']} records ({nbytes / MIB:.0f} MiB) acknowledged, "
            f"{nbytes / MIB / prod['seconds']:.1f} MiB/s; waiting for compaction and GC to settle")

        # Settle: no flush-tier bytes anywhere, then a run that deleted
        # objects and started at least gc-grace after that.
        sampler.phase = "settle"
        gc_grace_s = duration_s(a.gc_grace)
        deadline = time.monotonic() + a.settle_timeout
        flush_zero_ms = None
        settled = False
        last_flush = {}
        while True:
            if not b.alive():
                raise RuntimeError(f"{name}: broker died\n{tail(b.log_path)}")
            last_flush = {t: int(((b.stream(t) or {}).get("bytes_by_tier") or {}).get("flush", 0))
                          for t in topics}
            runlog.poll()
            now_ms = int(time.time() * 1000)
            if all(v == 0 for v in last_flush.values()):
                if flush_zero_ms is None:
                    flush_zero_ms = now_ms
                    log(f"{name}: flush tier empty {(now_ms - end_ms) / 1000:.0f} s after the load")
            else:
                flush_zero_ms = None
            if flush_zero_ms is not None and any(
                    int(r.get("objects_deleted") or 0) > 0
                    for r in runlog.since(flush_zero_ms + int(gc_grace_s * 1000))):
                settled = True
                break
            if time.monotonic() > deadline:
                break
            time.sleep(2)
        t_settled = time.monotonic()
        after = b.requests()
        window_s = t_settled - t_start
        settle_s = t_settled - t_end
        log(f"{name}: {'settled' if settled else 'NOT settled'} {settle_s:.0f} s after the load "
            f"(flush-tier bytes {sum(last_flush.values())})")
        bucket_settled = count_objects(self.s3, self.prefix(name))
        retired_settled = runlog.last_doc.get("retired_objects")

        # Idle: the background request rate.
        sampler.phase = "idle"
        idle_before = b.requests()
        t_idle = time.monotonic()
        log(f"{name}: {a.idle_seconds:g} s idle for the background request rate")
        time.sleep(a.idle_seconds)
        if not b.alive():
            raise RuntimeError(f"{name}: broker died while idle\n{tail(b.log_path)}")
        idle_after = b.requests()
        idle_s = time.monotonic() - t_idle
        runlog.poll()
        sampler.stop()
        bucket_end = count_objects(self.s3, self.prefix(name))

        window = {k: int(after[k] - before[k]) for k in REQ_KINDS}
        idle = {k: int(idle_after[k] - idle_before[k]) for k in REQ_KINDS}
        bg_per_s = {k: idle[k] / idle_s for k in REQ_KINDS}
        gib = nbytes / GIB
        per_gib = {k: window[k] / gib for k in REQ_KINDS} if gib else {}
        data_per_gib = {k: max(0.0, window[k] - bg_per_s[k] * window_s) / gib for k in REQ_KINDS} \
            if gib else {}
        bg_per_gib_100 = {k: bg_per_s[k] / GIB_PER_S_AT_100_MIB for k in REQ_KINDS}
        at_100 = {k: data_per_gib.get(k, 0.0) + bg_per_gib_100[k] for k in REQ_KINDS}
        runs = runlog.since(0)

        if want_cost:
            usd_per_gib = dollars(window) / gib if gib else None
            usd_100 = dollars(at_100)
            self.record({
                "measurement": "cost",
                "placement_in_bucket": a.cost_placement_in_bucket,
                "topics": COST_TOPICS,
                "partitions": PARTITIONS,
                "seconds": seconds,
                "rate_mib_target": a.rate_mib,
                "flush_interval": a.flush_interval,
                "compaction": {"delay": a.compaction_delay, "interval": a.compaction_interval,
                               "gc_grace": a.gc_grace, "orphan_grace": "1h"},
                "retention_ms": a.retention_ms,
                "records": prod["records"],
                "gib_written": round(gib, 4),
                "ingest_mib_per_s": round(nbytes / MIB / prod["seconds"], 1),
                "window_s": round(window_s, 1),
                "settled": settled,
                "settle_s": round(settle_s, 1),
                "flush_tier_bytes_at_end": sum(last_flush.values()),
                "retired_objects_at_settle": retired_settled,
                "bucket_objects_at_settle": bucket_settled["total"],
                "bucket_objects_after_idle": bucket_end["total"],
                "bucket_by_dir_after_idle": bucket_end["by_dir"],
                "requests": window,
                "requests_per_gib": {k: round(v, 1) for k, v in per_gib.items()},
                "usd": round(dollars(window), 6),
                "usd_per_gib": round(usd_per_gib, 6) if usd_per_gib is not None else None,
                "idle_s": round(idle_s, 1),
                "idle_requests": idle,
                "background_per_s": {k: round(v, 4) for k, v in bg_per_s.items()},
                "data_path_requests_per_gib": {k: round(v, 1) for k, v in data_per_gib.items()},
                "at_100_mib_s_requests_per_gib": {k: round(v, 1) for k, v in at_100.items()},
                "usd_per_gib_at_100_mib_s": round(usd_100, 6),
                "goal_usd_per_gib": GOAL_DOLLARS_PER_GIB,
                "goal_met_at_100_mib_s": usd_100 <= GOAL_DOLLARS_PER_GIB,
                "formula": PRICE_NOTE + "; $/GiB = $(window requests) / GiB written; at 100 MiB/s: "
                           "$(data-path requests per GiB + background requests per s / 0.09765625), "
                           "data-path = window requests - background rate x window seconds",
                "note_100_mib_s": ("data-path requests per GiB are the ones measured at ingest_mib_per_s; "
                                   "flush objects (and the compaction reads of their shards) get fewer per "
                                   "GiB as the rate rises until --flush-bytes cuts them, so below 100 MiB/s "
                                   "the 100 MiB/s figure is an upper bound"),
                "compaction_runs": summarize_runs(runs),
                "sampler_errors": sampler.errors[:3],
            })
        if want_state:
            verdict = state_verdict(sampler.samples, a.growth_tolerance)
            self.record({
                "measurement": "bounded_state",
                "run": name,
                "placement_in_bucket": a.cost_placement_in_bucket,
                "seconds": seconds,
                "sample_interval_s": a.sample_interval,
                "retention_ms": a.retention_ms,
                "samples": sampler.samples,
                **verdict,
                "sampler_errors": sampler.errors[:3],
            })
        b.stop()


def duration_s(s: str) -> float:
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read duration {s!r} (use e.g. 250ms, 20s, 5m)")
    return float(m.group(1)) * {"ms": 0.001, None: 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --------------------------------------------------------------------------
# output


def markdown(results: list[dict]) -> str:
    rows = []
    for r in results:
        m = r["measurement"]
        if "error" in r:
            rows.append((m, "", f"FAILED: {r['error'][:160]}", ""))
        elif m == "compaction":
            params = (f"{r['topics']} topics x {r['partitions']} partitions, {r['mib']:g} MiB, "
                      f"placement not in bucket")
            req = r.get("compactor_requests") or {}
            rows.append(("compaction", params,
                         f"**{r['compaction_mb_per_s']} MB/s** of flush bytes in "
                         f"({r['compaction_record_mib_per_s']} MiB records/s; {r['compactor_wall_s']} s "
                         f"wall, {r['compactor_run_ms']} ms in run); live files {r['live_files_before']} -> "
                         f"{r['live_files_after']}; bucket objects {r['bucket_objects_before']} -> "
                         f"{r['bucket_objects_after']}; requests PUT {req.get('put')} GET {req.get('get')} "
                         f"HEAD {req.get('head')} LIST {req.get('list')} DELETE {req.get('delete')}", ""))
            rows.append(("compaction GC (--gc-grace 0s)", f"{r['gc_passes']} pass(es)",
                         f"**{r['gc_objects_deleted']} objects deleted**, bucket objects "
                         f"{r['bucket_objects_after']} -> {r['bucket_objects_after_gc']} "
                         f"({r['bucket_mib_after_gc']} MiB)", ""))
            rows.append(("compaction sanity read", f"topic {r['sanity_topic']} from offset 0",
                         f"{r['sanity_consumed']} of {r['sanity_produced']} records",
                         "equal: " + ("yes" if r["sanity_ok"] else "**NO**")))
        elif m == "cost":
            req = r["requests"]
            params = (f"{r['topics']} topics x {r['partitions']} partitions, {r['seconds']:g} s at "
                      f"{r['ingest_mib_per_s']} MiB/s, {r['gib_written']} GiB, retention "
                      f"{r['retention_ms'] / 1000:g} s, placement {'in' if r['placement_in_bucket'] else 'not in'} bucket")
            rows.append(("cost (measured)", params,
                         f"**${r['usd_per_gib']:.5f}/GiB**; PUT {req['put']} GET {req['get']} HEAD "
                         f"{req['head']} LIST {req['list']} DELETE {req['delete']} over {r['window_s']} s "
                         f"({'settled' if r['settled'] else '**not settled**'} {r['settle_s']} s after load)",
                         ""))
            d, bg = r["data_path_requests_per_gib"], r["background_per_s"]
            rows.append(("cost at 100 MiB/s", f"from the run at {r['ingest_mib_per_s']} MiB/s; "
                                               f"idle {r['idle_s']} s",
                         f"**${r['usd_per_gib_at_100_mib_s']:.5f}/GiB**; data path per GiB: PUT {d['put']} "
                         f"GET {d['get']} HEAD {d['head']} LIST {d['list']}; background per s: PUT "
                         f"{bg['put']} GET {bg['get']} LIST {bg['list']}",
                         f"<= ${r['goal_usd_per_gib']}/GiB: "
                         + ("met" if r["goal_met_at_100_mib_s"] else "**not met**")))
        elif m == "bounded_state":
            mets = r.get("metrics") or {}

            def fmt(k):
                x = mets.get(k)
                return f"{k} {x['middle_mean']:g} -> {x['last_mean']:g} ({x['growth_pct']:+g} %)" if x else ""

            detail = "; ".join(f for f in (fmt(k) for k in STATE_KEYS) if f)
            last = r["samples"][-1] if r.get("samples") else {}
            rows.append(("bounded_state", f"{r['run']}: {len(r.get('samples') or [])} samples every "
                                          f"{r['sample_interval_s']:g} s",
                         f"{r['verdict']}. Middle -> last third: {detail or 'n/a'}. End: index "
                         f"{last.get('index_entries')}, bucket {last.get('bucket_objects')} objects, "
                         f"retired {last.get('retired_objects')}, RSS {last.get('rss_mib')} MiB", ""))
    out = ["| measurement | parameters | result | goal |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------


def default_bin() -> str:
    if os.environ.get("SHOAL_BIN"):
        return os.environ["SHOAL_BIN"]
    release = REPO_ROOT / "target" / "release" / "shoal"
    return str(release if release.exists() else REPO_ROOT / "target" / "debug" / "shoal")


def default_moto() -> str:
    return "moto_server" if shutil.which("moto_server") else f"{sys.executable} -m moto.server"


def check_binary(binary: str) -> None:
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"shoal binary not found or not executable: {binary} (SHOAL_BIN / --bin)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    for sub, flag in (("compactor", "--once"), ("standalone", "--compaction-delay")):
        r = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, env=env, timeout=30)
        if r.returncode != 0 or flag not in r.stdout:
            raise SystemExit(f"{binary}: `{sub}` has no {flag} (a build from before the compactor?); "
                             "use a newer build (SHOAL_BIN / --bin)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=default_bin(),
                    help="shoal binary (default: $SHOAL_BIN, else target/release/shoal if present, "
                         "else target/debug/shoal)")
    ap.add_argument("--moto", default=default_moto(),
                    help="moto server command (default: moto_server if on PATH, else python3 -m moto.server)")
    ap.add_argument("--only", default=",".join(MEASUREMENTS),
                    help=f"comma list out of {','.join(MEASUREMENTS)}")
    ap.add_argument("--flush-interval", default="250ms", help="the broker's --flush-interval")
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--linger-ms", type=float, default=5)
    ap.add_argument("--fetch-max-bytes", type=int, default=64 << 20)
    ap.add_argument("--flush-timeout", type=float, default=600,
                    help="seconds to wait for acks / the flush / a full read")
    g = ap.add_argument_group("compaction")
    g.add_argument("--mib", type=int, default=512, help="MiB produced before the compactor runs")
    g.add_argument("--topics", type=int, default=8, help="topics (4 partitions each)")
    g.add_argument("--compactor-timeout", type=float, default=1800,
                   help="seconds one `shoal compactor --once` may take")
    g = ap.add_argument_group("cost and bounded_state")
    g.add_argument("--seconds", type=float, default=180, help="length of the load")
    g.add_argument("--rate-mib", type=float, default=None,
                   help="MiB/s to produce (default: as fast as possible)")
    g.add_argument("--retention-ms", type=int, default=60_000, help="retention.ms of the topics")
    g.add_argument("--compaction-delay", default="20s")
    g.add_argument("--compaction-interval", default="10s")
    g.add_argument("--gc-grace", default="20s")
    g.add_argument("--cost-placement-in-bucket", action="store_true",
                   help="keep placement's state in the bucket in the cost run (default: not, so that "
                        "only data-path requests are counted)")
    g.add_argument("--settle-timeout", type=float, default=120,
                   help="seconds to wait after the load for compaction and GC to settle")
    g.add_argument("--idle-seconds", type=float, default=30,
                   help="idle window for the background request rate")
    g.add_argument("--sample-interval", type=float, default=10)
    g.add_argument("--state-seconds", type=float, default=None,
                   help="bounded_state in a run of its own of this length (default: sampled during cost)")
    g.add_argument("--growth-tolerance", type=float, default=0.10,
                   help="bounded_state: growth of the last third over the middle third still "
                        "counted as not growing (fraction)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data dirs)")
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not only or only - set(MEASUREMENTS):
        ap.error(f"--only takes {','.join(MEASUREMENTS)}")
    for d in (args.compaction_delay, args.compaction_interval, args.gc_grace, args.flush_interval):
        duration_s(d)
    if args.topics < 1 or args.mib < 1:
        ap.error("--topics and --mib must be positive")
    args.bin = os.path.abspath(args.bin)
    check_binary(args.bin)

    # SIGTERM / SIGHUP run the same cleanup as Ctrl-C.
    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    # Ctrl-C even when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    workdir = Path(tempfile.mkdtemp(prefix="shoal-lifecycle-bench."))
    moto = None
    bench = None
    failures = 0
    try:
        log(f"binary {args.bin}; temp dir {workdir}")
        moto = Moto(workdir, shlex.split(args.moto)).start()
        log(f"moto on {moto.url}, bucket {BUCKET}")
        bench = Bench(args, workdir, moto)

        def guarded(names: list[str], fn, *fargs):
            nonlocal failures
            try:
                fn(*fargs)
            except Exception as e:  # noqa: BLE001 - report and go on with the next one
                failures += 1
                log(f"{'/'.join(names)} FAILED: {e}")
                bench.cleanup()
                for n in names:
                    bench.record({"measurement": n, "error": str(e).splitlines()[0][:500]})

        if "compaction" in only:
            guarded(["compaction"], bench.compaction)
        separate_state = "bounded_state" in only and (args.state_seconds is not None or "cost" not in only)
        if "cost" in only:
            names = ["cost"] + (["bounded_state"] if "bounded_state" in only and not separate_state else [])
            guarded(names, bench.lifecycle_run, "cost", args.seconds, True,
                    "bounded_state" in names)
        if separate_state:
            guarded(["bounded_state"], bench.lifecycle_run, "state",
                    args.state_seconds if args.state_seconds is not None else args.seconds, False, True)
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
    print(markdown(bench.results if bench else []))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
