#!/usr/bin/env python3
"""Produce load generator on librdkafka (confluent-kafka).

Runs P producer processes against a broker, 1 KiB records, acks=all, and
reports MB/s, produce latency percentiles (time from produce() to the
delivery report, sampled) and, if --metrics-url is given, the broker's WAL
fsyncs per second over the run.

    python3 bench/produce.py --bootstrap 127.0.0.1:9092 --partitions 16 --seconds 20
"""
import argparse
import json
import multiprocessing as mp
import os
import re
import time
import urllib.request


def producer_proc(args, rate, q):
    from confluent_kafka import Producer

    p = Producer({
        **args.client_config,
        "bootstrap.servers": args.bootstrap,
        "acks": "all",
        "linger.ms": args.linger_ms,
        "batch.size": 1 << 20,
        "queue.buffering.max.kbytes": 256 * 1024,
        "compression.type": "none",
        "enable.idempotence": False,
    })
    payload = os.urandom(args.record_size)
    lat = []
    acked = [0, 0]  # records, errors

    def cb(err, _msg):
        if err:
            acked[1] += 1
        else:
            acked[0] += 1

    def sampled(t0):
        def inner(err, _msg):
            cb(err, _msg)
            if not err:
                lat.append(time.perf_counter() - t0)
        return inner

    start = time.perf_counter()
    end = start + args.seconds
    sent = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if rate > 0:
            # Open-loop pacing: send what the schedule says is due.
            due = int((now - start) * rate)
            if sent >= due:
                p.poll(0.0005)
                continue
        try:
            if sent % 64 == 0:
                p.produce(args.topic, payload, partition=sent % args.partitions, on_delivery=sampled(time.perf_counter()))
            else:
                p.produce(args.topic, payload, partition=sent % args.partitions, on_delivery=cb)
            sent += 1
        except BufferError:
            p.poll(0.001)
        if sent % 256 == 0:
            p.poll(0)
    p.flush(60)
    elapsed = time.perf_counter() - start
    q.put({"records": acked[0], "errors": acked[1], "elapsed": elapsed, "lat": lat})


def wal_fsyncs(url):
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    m = re.search(r"^shoal_wal_fsyncs_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", default=None)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0, help="total records/s, 0 = as fast as possible")
    ap.add_argument("--linger-ms", type=float, default=1)
    ap.add_argument("--metrics-url", default=None)
    ap.add_argument("-X", dest="client_config", action="append", default=[],
                    help="librdkafka property KEY=VALUE for every client (security.protocol, ...)")
    args = ap.parse_args()
    args.client_config = dict(kv.split("=", 1) for kv in args.client_config)
    args.topic = args.topic or f"bench-{args.partitions}p-{int(time.time())}"

    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({**args.client_config, "bootstrap.servers": args.bootstrap})
    for f in admin.create_topics([NewTopic(args.topic, num_partitions=args.partitions, replication_factor=1)]).values():
        f.result()

    f0 = wal_fsyncs(args.metrics_url) if args.metrics_url else None
    q = mp.Queue()
    per_proc = args.rate / args.procs if args.rate else 0
    procs = [mp.Process(target=producer_proc, args=(args, per_proc, q)) for _ in range(args.procs)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    f1 = wal_fsyncs(args.metrics_url) if args.metrics_url else None
    records = sum(r["records"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    elapsed = max(r["elapsed"] for r in results)
    out = {
        "partitions": args.partitions,
        "procs": args.procs,
        "target_rate": args.rate,
        "records": records,
        "errors": sum(r["errors"] for r in results),
        "seconds": round(elapsed, 2),
        "records_per_s": round(records / elapsed),
        "mb_per_s": round(records * args.record_size / elapsed / 1e6, 1),
        "p50_ms": round(pct(lat, 50) * 1e3, 2),
        "p99_ms": round(pct(lat, 99) * 1e3, 2),
        "fsyncs_per_s": round((f1 - f0) / wall, 1) if f0 is not None and f1 is not None else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
