#!/usr/bin/env python3
"""Cluster benchmarks: three `shoal placement` nodes and 1..3 `shoal broker`
processes on loopback, sharing a file:// object store in a temp dir.

1. raft_commit: --writes sequential placement writes (AllocateProducerId,
   the smallest command) POSTed to the leader; p50/p99/mean of the round
   trip, i.e. replication to a majority, fsync and apply.
2. failover: a 6-partition `object` topic gets a steady idempotent
   producer (acks=all, --rate records/s); --kills times the broker leading
   partition 0 is killed with SIGKILL. Failover time = from the kill to the
   first acknowledgement on partition 0 of a record produced after the
   kill. The killed broker is restarted and the cluster rebalanced before
   the next round. Reports p50/p99/max.
3. throughput: for 1, 2 and 3 brokers (fresh cluster each), --procs
   producer processes push 1 KiB records (acks=all, linger 5 ms) to a
   6-partition `local` topic for --seconds; acknowledged MB/s.

Output: one JSON line per measurement on stdout, progress on stderr.

    python3 bench/cluster.py                       # the figures in docs/benchmarks.md
    python3 bench/cluster.py --kills 3 --writes 100 --seconds 5   # a quick run

Needs a release build (cargo build --release --bin shoal, or SHOAL_BIN) and
confluent-kafka.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | str | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with _HTTP.open(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def healthy(url: str) -> bool:
    with _HTTP.open(url, timeout=2) as r:
        return r.status == 200


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # noqa: BLE001 - polling
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Cluster:
    def __init__(self, binary: str, root: Path, brokers: int):
        self.bin = binary
        self.root = root
        self.pports = {i: free_port() for i in (1, 2, 3)}
        self.bports = {i: (free_port(), free_port()) for i in range(1, brokers + 1)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.store = f"file://{root / 'objects'}"

    def placement_list(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.pports.values())

    def _spawn(self, name: str, args: list[str]) -> None:
        logf = open(self.root / f"{name}.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        self.procs[name] = subprocess.Popen([self.bin, *args], stdout=logf, stderr=logf,
                                            stdin=subprocess.DEVNULL, env=env)

    def start_broker(self, i: int) -> None:
        k, h = self.bports[i]
        self._spawn(f"b{i}", ["broker", "--node-id", str(i), "--placement", self.placement_list(),
                              "--kafka-addr", f"127.0.0.1:{k}", "--http-addr", f"127.0.0.1:{h}",
                              "--object-store", self.store, "--data-dir", str(self.root / f"b{i}")])
        wait_for(lambda: healthy(f"http://127.0.0.1:{h}/health"), 60, f"broker {i}")

    def start(self) -> "Cluster":
        peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in self.pports.items())
        for i, p in self.pports.items():
            self._spawn(f"p{i}", ["placement", "--node-id", str(i), "--addr", f"127.0.0.1:{p}",
                                  "--peers", peers, "--data-dir", str(self.root / f"p{i}")])
        self.leader()
        for i in self.bports:
            self.start_broker(i)
        wait_for(lambda: len(self.live()) == len(self.bports), 30, "brokers live")
        return self

    def leader_url(self) -> str:
        for p in self.pports.values():
            try:
                if http("GET", f"http://127.0.0.1:{p}/placement/v1/status", timeout=2)["is_leader"]:
                    return f"http://127.0.0.1:{p}"
            except Exception:  # noqa: BLE001
                continue
        return ""

    def leader(self) -> str:
        return wait_for(self.leader_url, 60, "a placement leader")

    def view(self) -> dict:
        return http("GET", self.leader() + "/placement/v1/cluster")

    def live(self) -> list[int]:
        return [b["info"]["id"] for b in self.view()["brokers"] if b["live"]]

    def owners(self, topic: str) -> dict[int, int | None]:
        for s in self.view()["streams"]:
            if s["name"] == topic:
                return {sh["shard"]: sh["owner"] for sh in s["shards"]}
        return {}

    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{k}" for k, _ in self.bports.values())

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def create_topic(bootstrap: str, topic: str, partitions: int, durability: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    a = AdminClient({"bootstrap.servers": bootstrap})
    a.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                              config={"shoal.durability": durability})])[topic].result(60)


def raft_commit(c: Cluster, writes: int) -> None:
    url = c.leader() + "/placement/v1/write"
    lat = []
    for _ in range(writes):
        t = time.perf_counter()
        http("POST", url, "allocate_producer_id")
        lat.append((time.perf_counter() - t) * 1000)
    emit({"measurement": "raft_commit", "writes": writes,
          "p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2),
          "mean_ms": round(statistics.mean(lat), 2)})


def failover(c: Cluster, kills: int, rate: float) -> None:
    from confluent_kafka import Producer
    topic = f"failover-{random.randrange(1 << 30)}"
    create_topic(c.bootstrap(), topic, 6, "object")
    p = Producer({"bootstrap.servers": c.bootstrap(), "enable.idempotence": True, "acks": "all",
                  "linger.ms": 5, "message.timeout.ms": 120000})
    acks0: list[tuple[float, float]] = []  # (produced_at, acked_at) on partition 0
    errors: list[str] = []
    lock = threading.Lock()

    def cb(err, msg):
        if err is not None:
            errors.append(str(err))
        elif msg.partition() == 0:
            with lock:
                acks0.append((float(msg.value()), time.monotonic()))

    stop = threading.Event()

    def run():
        i = 0
        while not stop.is_set():
            p.produce(topic, value=repr(time.monotonic()).encode(), partition=i % 6,
                      on_delivery=cb)
            i += 1
            p.poll(0)
            time.sleep(1 / rate)

    t = threading.Thread(target=run)
    t.start()
    times = []
    try:
        for k in range(kills):
            wait_for(lambda: len(acks0) > 10, 60, "acks on partition 0")
            victim = c.owners(topic)[0]
            killed_at = time.monotonic()
            c.procs[f"b{victim}"].kill()
            c.procs[f"b{victim}"].wait()

            def recovered():
                with lock:
                    return next((a for (pr, a) in acks0 if pr > killed_at), None)
            acked = wait_for(recovered, 60, "partition 0 to take writes again")
            times.append(acked - killed_at)
            log(f"failover {k + 1}/{kills}: broker {victim}, {times[-1]:.2f} s")
            c.start_broker(victim)
            wait_for(lambda: victim in c.live(), 30, "the broker to rejoin")
            # Rebalanced: every broker owns a shard again.
            wait_for(lambda: set(c.owners(topic).values()) == set(c.bports), 60, "rebalance")
    finally:
        stop.set()
        t.join()
        p.flush(60)
    emit({"measurement": "failover", "kills": kills, "p50_s": round(percentile(times, 50), 2),
          "p99_s": round(percentile(times, 99), 2), "max_s": round(max(times), 2),
          "producer_errors": len(errors)})


def _produce_proc(bootstrap: str, topic: str, seconds: float, out) -> None:
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                  "batch.size": 1 << 20, "queue.buffering.max.kbytes": 256 << 10})
    value = os.urandom(1024)
    acked = [0]

    def cb(err, _msg):
        if err is None:
            acked[0] += 1
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        try:
            p.produce(topic, value=value, partition=i % 6, on_delivery=cb)
            i += 1
        except BufferError:
            p.poll(0.01)
        p.poll(0)
    p.flush(60)
    out.put(acked[0])


def throughput(binary: str, brokers: int, seconds: float, procs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-cluster-bench.") as d:
        c = Cluster(binary, Path(d), brokers).start()
        try:
            topic = f"tput-{random.randrange(1 << 30)}"
            create_topic(c.bootstrap(), topic, 6, "local")
            q = multiprocessing.Queue()
            ps = [multiprocessing.Process(target=_produce_proc,
                                          args=(c.bootstrap(), topic, seconds, q))
                  for _ in range(procs)]
            start = time.monotonic()
            for p in ps:
                p.start()
            total = sum(q.get(timeout=seconds + 120) for _ in ps)
            for p in ps:
                p.join()
            elapsed = time.monotonic() - start
            emit({"measurement": "throughput", "brokers": brokers, "records": total,
                  "mb_per_s": round(total * 1024 / elapsed / 1e6, 1), "seconds": round(elapsed, 1)})
        finally:
            c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("SHOAL_BIN")
                    or str(REPO_ROOT / "target" / "release" / "shoal"))
    ap.add_argument("--writes", type=int, default=500)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--rate", type=float, default=500, help="records/s during the failovers")
    ap.add_argument("--seconds", type=float, default=15, help="length of each throughput run")
    ap.add_argument("--procs", type=int, default=2, help="producer processes for throughput")
    ap.add_argument("--only", default="raft_commit,failover,throughput")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if {"raft_commit", "failover"} & only:
        with tempfile.TemporaryDirectory(prefix="shoal-cluster-bench.") as d:
            c = Cluster(a.bin, Path(d), 3).start()
            try:
                if "raft_commit" in only:
                    raft_commit(c, a.writes)
                if "failover" in only:
                    failover(c, a.kills, a.rate)
            finally:
                c.stop()
    if "throughput" in only:
        for n in (1, 2, 3):
            throughput(a.bin, n, a.seconds, a.procs)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
