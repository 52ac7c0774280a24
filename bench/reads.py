#!/usr/bin/env python3
"""Read benchmark: how fast consumers read a backlog and the live tail.

Each measurement gets its own `shoal standalone` (release build) on fresh
loopback ports and a fresh data directory. Records are random 1 KiB values
produced with confluent-kafka (librdkafka), acks=all; consumers are
confluent-kafka too, every partition assigned from offset 0.

1. catch_up: --mib MiB into a --partitions (16) partition `local` topic on
   `file://`, produced by shoal-loadgen as fast as the broker takes it
   (produce MB/s), wait until flushed, then read it all from offset 0 with
   shoal-loadgen --consume (Fetch on the wire, one request in flight, no
   record decoding: the broker's speed, not a client's) twice (first and
   second read), then once with a confluent-kafka consumer. Goal: both
   reads at least twice the produce rate. Reports the broker's RSS (now and
   peak) after each phase, and cache hits/misses.
2. cold_s3: --cold-mib MiB into a 16-partition topic on the moto S3
   emulator behind a proxy that delays every request by --delay-ms (30),
   wait until flushed, stop the broker, delete its cache, start it again
   and read everything once with shoal-loadgen --consume (the wire), then
   the same again with a confluent-kafka consumer. Goal: 200 MB/s.
3. tail: shoal-loadgen produces at --tail-rate records/s (about half the
   peak) for --seconds while a consumer keeps up: a second shoal-loadgen
   (--follow, Fetch on the wire) in one run, a confluent-kafka consumer in
   Python in another; produce-to-consume latency of every record (arrival
   minus its CreateTime, set when loadgen sends it; the first --warmup (5)
   seconds are produced and read but not counted), for a `local` topic
   and an `object` topic. Goals: p99 <= 20 ms (local), <= flush interval +
   150 ms (object).

Output: one JSON line per measurement on stdout, then a markdown table.

    python3 bench/reads.py                              # all, spec sizes
    python3 bench/reads.py --only catch_up --mib 256    # quicker
    SHOAL_BIN=target/release/shoal python3 bench/reads.py --only tail

Needs: a release build (`cargo build --release --bin shoal`), moto_server
on PATH (cold_s3), and the Python packages confluent-kafka and boto3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3 import (BUCKET, Broker, DelayProxy, Moto, consume_all, create_topic, log,  # noqa: E402
                pct, produce_bulk, producer)

REPO_ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = ("catch_up", "cold_s3", "tail")


def rss(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return {"rss_mib": round(out.get("VmRSS", 0) / 2**20, 1),
            "peak_rss_mib": round(out.get("VmHWM", 0) / 2**20, 1)}


def cache_counts(b: Broker) -> dict:
    m = b.metrics()
    return {"cache_hits": m.get("shoal_cache_hits_total", 0.0),
            "cache_misses": m.get("shoal_cache_misses_total", 0.0),
            "cold_reads": m.get("shoal_cold_reads_total", 0.0),
            "gets": m.get('shoal_object_store_requests_total{kind="get"}', 0.0),
            "get_seconds": round(m.get('shoal_object_store_request_duration_seconds_sum{kind="get"}',
                                       0.0), 2)}


def read_once(b: Broker, topic: str, hws: dict[int, int], fetch_max_bytes: int, timeout: float,
              payload_mib: float) -> dict:
    before = cache_counts(b)
    r = consume_all(b.bootstrap, topic, hws, fetch_max_bytes, timeout)
    after = cache_counts(b)
    return {"mb_s": round(r["bytes"] / r["seconds"] / 1e6, 1), "seconds": round(r["seconds"], 2),
            "records": r["records"], **rss(b.proc.pid),
            **{k: after[k] - before[k] for k in after}}


def high_watermarks(doc: dict) -> dict[int, int]:
    return {s["shard"]: s["high_watermark"] for s in doc["shards"]}


class Bench:
    def __init__(self, a, workdir: Path):
        self.a = a
        self.workdir = workdir

    def broker(self, name: str, store: str, endpoint: str = "http://127.0.0.1:9",
               extra: tuple[str, ...] = ()) -> Broker:
        return Broker(self.a.bin, self.workdir, name, store, endpoint, self.a.flush_interval,
                      extra_args=extra)

    def loadgen(self, *args: str) -> dict:
        out = subprocess.run([self.a.loadgen, *args], capture_output=True, text=True, timeout=1200)
        if out.returncode != 0:
            raise RuntimeError(f"shoal-loadgen {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wire_read(self, b: Broker, topic: str) -> dict:
        """Everything from offset 0 with shoal-loadgen --consume; MB/s, RSS
        and what the cache and the store did meanwhile."""
        a = self.a
        before = cache_counts(b)
        r = self.loadgen("--bootstrap", b.bootstrap, "--topic", topic, "--partitions",
                         str(a.partitions), "--consume", "--fetch-max-bytes",
                         str(a.fetch_max_bytes), "--partition-max-bytes",
                         str(a.fetch_max_bytes // 4))
        after = cache_counts(b)
        return {"mb_s": round(r["mb_s"], 1), "seconds": round(r["seconds"], 2),
                "records": r["records"], **rss(b.proc.pid),
                **{k: after[k] - before[k] for k in after}}

    def catch_up(self) -> dict:
        a = self.a
        name = "catchup"
        store = f"file://{self.workdir / name / 'objects'}"
        b = self.broker(name, store).start()
        try:
            topic = "catchup"
            records = a.mib * 1024 * 1024 // a.record_size
            # As fast as the broker takes it: all --mib due within one second,
            # a rate no broker here reaches (the tool keeps sending until done).
            rate = records
            log(f"catch_up: producing {a.mib} MiB over {a.partitions} partitions (shoal-loadgen)")
            p = self.loadgen("--bootstrap", b.bootstrap, "--topic", topic, "--partitions",
                             str(a.partitions), "--rate", str(rate), "--seconds", "1",
                             "--warmup-seconds", "0",
                             "--record-size", str(a.record_size), "--max-in-flight", "8")
            after_produce = rss(b.proc.pid)
            doc = b.wait_flushed(topic, p["records"], 300)
            hws = high_watermarks(doc)
            log(f"catch_up: produced {p['records']} records at {p['mb_per_s']} MB/s; reading back")
            reads = {}
            for which in ("first_read", "second_read"):
                reads[which] = self.wire_read(b, topic)
                log(f"catch_up: {which} {reads[which]['mb_s']} MB/s")
            log("catch_up: once more with confluent-kafka (librdkafka, Python)")
            ck = read_once(b, topic, hws, a.fetch_max_bytes, 600, a.mib)
            produce_mb_s = p["mb_per_s"]
            return {"measurement": "catch_up", "mib": a.mib, "partitions": a.partitions,
                    "produce_mb_s": produce_mb_s, "after_produce": after_produce, **reads,
                    "confluent_read": ck,
                    "ratio_first": round(reads["first_read"]["mb_s"] / produce_mb_s, 2),
                    "ratio_second": round(reads["second_read"]["mb_s"] / produce_mb_s, 2)}
        finally:
            b.stop()

    def cold_s3(self) -> dict:
        a = self.a
        moto = Moto(self.workdir, a.moto).start()
        proxy = DelayProxy(moto.port, a.delay_ms / 1000, a.delay_ms / 1000).start()
        name = "cold"
        b = self.broker(name, f"s3://{BUCKET}/cold", proxy.url)
        try:
            b.start()
            topic = "cold"
            create_topic(b.bootstrap, topic, a.partitions, "local")
            records = a.cold_mib * 1024 * 1024 // a.record_size
            log(f"cold_s3: producing {a.cold_mib} MiB")
            produce_bulk(b.bootstrap, topic, a.partitions, records, a.record_size, 5, 900)
            hws = high_watermarks(b.wait_flushed(topic, records, 600))
            reads = {}
            for which in ("wire", "confluent"):
                b.stop()
                shutil.rmtree(b.data_dir / "cache", ignore_errors=True)
                b.start()
                log(f"cold_s3: reading back with an empty cache ({which})")
                if which == "wire":
                    reads[which] = self.wire_read(b, topic)
                else:
                    reads[which] = read_once(b, topic, hws, a.fetch_max_bytes, 900, a.cold_mib)
                log(f"cold_s3: {which} {reads[which]['mb_s']} MB/s")
            return {"measurement": "cold_s3", "mib": a.cold_mib, "delay_ms": a.delay_ms,
                    "partitions": a.partitions, **reads, "requests": proxy.counts}
        finally:
            b.stop()
            proxy.stop()
            moto.stop()

    def tail(self) -> dict:
        a = self.a
        out = {"measurement": "tail", "rate": a.tail_rate, "seconds": a.seconds,
               "flush_interval": a.flush_interval}
        for durability in ("local", "object"):
            for consumer in ("loadgen", "confluent"):
                name = f"tail-{durability}-{consumer}"
                b = self.broker(name, f"file://{self.workdir / name / 'objects'}").start()
                try:
                    topic = f"tail{durability}"
                    create_topic(b.bootstrap, topic, a.partitions, durability)
                    run = self.tail_loadgen if consumer == "loadgen" else self.tail_confluent
                    out[f"{durability}_{consumer}"] = {**run(b, topic), **rss(b.proc.pid)}
                    log(f"tail {durability} {consumer}: {out[f'{durability}_{consumer}']}")
                finally:
                    b.stop()
        return out

    def produce_paced(self, b: Broker, topic: str) -> dict:
        """shoal-loadgen produces at --tail-rate for --warmup + --seconds
        (its own process, paced, record timestamps = send time; the warm-up
        is not measured, as in the produce latency benchmark)."""
        a = self.a
        return self.loadgen("--bootstrap", b.bootstrap, "--topic", topic, "--partitions",
                            str(a.partitions), "--rate", str(a.tail_rate), "--seconds",
                            str(int(a.seconds)), "--warmup-seconds", str(a.warmup),
                            "--record-size", str(a.record_size))

    def tail_loadgen(self, b: Broker, topic: str) -> dict:
        """A second shoal-loadgen follows the topic (Fetch v12, one request in
        flight, min_bytes 1, max_wait 100 ms) and notes arrival minus send
        time per record."""
        a = self.a
        follower = subprocess.Popen(
            [a.loadgen, "--follow", "--bootstrap", b.bootstrap, "--topic", topic,
             "--partitions", str(a.partitions), "--seconds", str(int(a.seconds) + a.warmup + 3),
             "--warmup-seconds", str(a.warmup)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = follower.stdout.readline()
            if '"ready"' not in line:
                raise RuntimeError(f"loadgen --follow: {line} {follower.stderr.read()}")
            produced = self.produce_paced(b, topic)
            out, err = follower.communicate(timeout=60)
            if follower.returncode != 0:
                raise RuntimeError(f"loadgen --follow: {err.strip()}")
        finally:
            if follower.poll() is None:
                follower.kill()
        r = json.loads(out.strip().splitlines()[-1])
        return {"records": r["records"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                "p999_ms": r["p999_ms"], "max_ms": r["max_ms"],
                "produce_p99_ms": produced.get("p99_ms"), "produce_mb_s": produced.get("mb_per_s")}

    def tail_confluent(self, b: Broker, topic: str) -> dict:
        """A confluent-kafka consumer here notes now - timestamp for every
        record."""
        from confluent_kafka import Consumer, TopicPartition, OFFSET_END

        a = self.a
        lat: list[float] = []
        stop = threading.Event()
        ready = threading.Event()

        counted_from_ms = [float("inf")]

        def consume():
            c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": f"tail-{topic}",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 100,
                          "fetch.min.bytes": 1})
            c.assign([TopicPartition(topic, q, OFFSET_END) for q in range(a.partitions)])
            try:
                while not stop.is_set():
                    # consume() returns when it has num_messages or at the
                    # timeout: a small count, so records are not held back
                    # waiting for a large one.
                    msgs = c.consume(num_messages=64, timeout=0.1)
                    ready.set()
                    now_ms = time.time() * 1000
                    for m in msgs:
                        if m.error() is None and m.timestamp()[1] >= counted_from_ms[0]:
                            lat.append(now_ms - m.timestamp()[1])
            finally:
                c.close()

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        ready.wait(30)
        time.sleep(1)
        n = int(a.tail_rate * a.seconds)
        counted_from_ms[0] = time.time() * 1000 + a.warmup * 1000
        produced = self.produce_paced(b, topic)
        deadline = time.monotonic() + 30
        while len(lat) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        t.join(10)
        xs = sorted(lat)
        return {"records": len(xs), "p50_ms": round(pct(xs, 50), 1), "p99_ms": round(pct(xs, 99), 1),
                "p999_ms": round(pct(xs, 99.9), 1), "max_ms": round(xs[-1], 1) if xs else None,
                "produce_p99_ms": produced.get("p99_ms"), "produce_mb_s": produced.get("mb_per_s")}


def markdown(results: list[dict]) -> str:
    rows = ["| measurement | setting | result |", "|---|---|---|"]
    for r in results:
        if r["measurement"] == "catch_up":
            rows.append(f"| catch-up, first read | {r['mib']} MiB, {r['partitions']} partitions, file:// | "
                        f"**{r['first_read']['mb_s']} MB/s** ({r['ratio_first']}x produce "
                        f"{r['produce_mb_s']} MB/s), RSS {r['first_read']['rss_mib']} MiB |")
            rows.append(f"| catch-up, second read | the same | **{r['second_read']['mb_s']} MB/s** "
                        f"({r['ratio_second']}x), peak RSS {r['second_read']['peak_rss_mib']} MiB |")
            rows.append(f"| catch-up, confluent-kafka consumer | the same, third read | "
                        f"{r['confluent_read']['mb_s']} MB/s (Python client) |")
        elif r["measurement"] == "cold_s3":
            for which in ("wire", "confluent"):
                x = r[which]
                rows.append(f"| cold catch-up from S3, {which} | {r['mib']} MiB, +{r['delay_ms']} ms "
                            f"per request, empty cache | **{x['mb_s']} MB/s**, RSS {x['rss_mib']} MiB, "
                            f"{x.get('gets')} GETs |")
        elif r["measurement"] == "tail":
            for d in ("local", "object"):
                for c in ("loadgen", "confluent"):
                    x = r.get(f"{d}_{c}", {})
                    rows.append(f"| tail latency, {d}, {c} consumer | {r['rate']}/s for {r['seconds']} s | "
                                f"p50 {x.get('p50_ms')} ms, **p99 {x.get('p99_ms')} ms**, "
                                f"p99.9 {x.get('p999_ms')} ms, max {x.get('max_ms')} ms, "
                                f"produce p99 {x.get('produce_p99_ms')} ms |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("SHOAL_BIN", str(REPO_ROOT / "target/release/shoal")))
    ap.add_argument("--moto", default=shutil.which("moto_server") or "moto_server")
    ap.add_argument("--loadgen", default=str(REPO_ROOT / "target/release/shoal-loadgen"),
                    help="cargo build --release -p shoal-loadgen")
    ap.add_argument("--only", choices=MEASUREMENTS, action="append")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--cold-mib", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--fetch-max-bytes", type=int, default=64 << 20)
    ap.add_argument("--flush-interval", default="250ms")
    ap.add_argument("--delay-ms", type=float, default=30)
    ap.add_argument("--tail-rate", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="tail: seconds produced before measuring")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="shoal-reads-"))
    results = []
    try:
        bench = Bench(a, workdir)
        for m in a.only or MEASUREMENTS:
            r = getattr(bench, m)()
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if a.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
