#!/usr/bin/env python3
"""MQTT benchmark: Shoal against Mosquitto on this machine, same load.

For each broker (a fresh `shoal standalone` and Debian's `mosquitto`, each on
a free port with its data in a temporary directory), pinned to CPU 0 while the
load runs on CPU 1:

* messages per second delivered, QoS 0 and 1, 16 B and 1 KiB payloads, one
  publisher and one subscriber (bench/mqtt-loadgen, as fast as the broker
  takes them);
* fan-in (10 publishers, 1 subscriber) and fan-out (1 publisher, 100
  subscribers);
* publish-to-delivery latency p50/p99 at a paced 5,000 messages/s, QoS 1;
* the same delivered rate with Debian's mosquitto_pub/mosquitto_sub as the
  clients (`mosquitto_pub -l` from a file, `mosquitto_sub -C N`);
* resident memory per idle connection with 10,000 connections open.

Both brokers get the same limits: 1000 queued messages per client, 64
in flight. Shoal runs with compaction off and no persistence rule (the MQTT
path only). Prints one JSON line per figure and a Markdown table at the end.

    cargo build --release -p shoal -p shoal-mqtt-loadgen
    python3 bench/mqtt.py [--seconds 10] [--connections 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOAL = ROOT / "target" / "release" / "shoal"
LOADGEN = ROOT / "target" / "release" / "shoal-mqtt-loadgen"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Broker:
    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        log = open(self.workdir / f"{self.kind}.log", "w")
        if self.kind == "shoal":
            cmd = [str(SHOAL), "standalone", "--data-dir", str(self.workdir / "data"),
                   "--kafka-addr", f"127.0.0.1:{free_port()}",
                   "--http-addr", f"127.0.0.1:{free_port()}",
                   "--mqtt-addr", f"127.0.0.1:{self.port}",
                   "--compaction", "false",
                   "--mqtt-max-queued-messages", "1000", "--mqtt-max-inflight", "64"]
        else:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nmax_queued_messages 1000\nmax_inflight_messages 64\n"
                "log_dest none\n")
            cmd = ["mosquitto", "-c", str(conf)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        self.proc = subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=log,
                                     stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=raise_nofile)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def loadgen(port: int, *args: str, timeout: float = 600) -> dict:
    out = subprocess.run(["taskset", "-c", "1", str(LOADGEN), "--addr", f"127.0.0.1:{port}",
                          *args], capture_output=True, text=True, timeout=timeout,
                         preexec_fn=raise_nofile)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {args}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mosquitto_clients(port: int, qos: int, payload: int, count: int, workdir: Path) -> dict:
    """Messages per second delivered with mosquitto_pub -l / mosquitto_sub:
    lines received over the time until they stopped arriving."""
    lines = workdir / f"lines-{payload}.txt"
    line = "x" * max(1, payload - 1)
    lines.write_text((line + "\n") * count)
    topic = f"mosq/{qos}/{payload}"
    out = workdir / f"sub-{qos}-{payload}.out"
    with open(out, "wb") as sink:
        sub = subprocess.Popen(["taskset", "-c", "1", "mosquitto_sub", "-p", str(port),
                                "-q", str(qos), "-t", topic, "-C", str(count)],
                               stdout=sink, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # mosquitto_sub has no "subscribed" signal to wait on
        t0 = time.monotonic()
        with open(lines) as f:
            subprocess.run(["taskset", "-c", "1", "mosquitto_pub", "-p", str(port),
                            "-q", str(qos), "-t", topic, "-l"], stdin=f, check=True, timeout=600)
        # Until the subscriber has all, or nothing arrived for a second.
        last_size, last_change = -1, time.monotonic()
        while sub.poll() is None and time.monotonic() - last_change < 1.0:
            size = out.stat().st_size
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            time.sleep(0.05)
        end = last_change if sub.poll() is None else time.monotonic()
        sub.kill()
        sub.wait()
    received = out.read_bytes().count(b"\n")
    return {"delivered": received, "sent": count,
            "delivered_per_sec": received / max(end - t0, 1e-9)}


def idle_memory(broker: Broker, connections: int) -> dict:
    assert broker.proc is not None
    before = rss_kib(broker.proc.pid)
    ready = broker.workdir / "idle-ready"
    gen = subprocess.Popen(["taskset", "-c", "1", str(LOADGEN), "--addr",
                            f"127.0.0.1:{broker.port}", "--mode", "idle", "--connections",
                            str(connections), "--hold-seconds", "30", "--ready-file", str(ready)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=raise_nofile)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if gen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"idle connections failed: {gen.stderr.read()[-2000:] if gen.stderr else ''}")
        time.sleep(0.2)
    time.sleep(2)
    after = rss_kib(broker.proc.pid)
    gen.kill()
    gen.wait()
    return {"rss_before_kib": before, "rss_after_kib": after,
            "per_connection_bytes": (after - before) * 1024 / connections}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--client-messages", type=int, default=200000,
                    help="messages per mosquitto_pub/mosquitto_sub run")
    ap.add_argument("--idle-only", action="store_true",
                    help="only the memory per idle connection")
    a = ap.parse_args()
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub", "taskset"):
        if not shutil.which(tool):
            print(f"error: {tool} is not installed (apt-get install mosquitto mosquitto-clients util-linux)",
                  file=sys.stderr)
            return 1
    for b in (SHOAL, LOADGEN):
        if not b.exists():
            print(f"error: {b} missing; cargo build --release -p shoal -p shoal-mqtt-loadgen",
                  file=sys.stderr)
            return 1
    secs = str(a.seconds)
    scenarios = [
        ("qos0 16B 1->1", ["--qos", "0", "--payload", "16"]),
        ("qos0 1KiB 1->1", ["--qos", "0", "--payload", "1024"]),
        ("qos1 16B 1->1", ["--qos", "1", "--payload", "16"]),
        ("qos1 1KiB 1->1", ["--qos", "1", "--payload", "1024"]),
        ("fan-in qos1 16B 10->1", ["--qos", "1", "--payload", "16", "--publishers", "10"]),
        ("fan-out qos0 16B 1->100", ["--qos", "0", "--payload", "16", "--subscribers", "100"]),
        ("latency qos1 16B 5k/s", ["--qos", "1", "--payload", "16", "--rate", "5000"]),
    ]
    results: dict[str, dict[str, dict]] = {}
    for kind in ("shoal", "mosquitto"):
        with tempfile.TemporaryDirectory(prefix=f"mqtt-bench-{kind}-") as d:
            broker = Broker(kind, Path(d)).start()
            try:
                for name, args in ([] if a.idle_only else scenarios):
                    r = loadgen(broker.port, "--seconds", secs, "--topic", f"b{len(results)}", *args)
                    r.update(broker=kind, scenario=name)
                    print(json.dumps(r), flush=True)
                    results.setdefault(name, {})[kind] = r
                for qos in ([] if a.idle_only else [0, 1]):
                    for payload in (16, 1024):
                        r = mosquitto_clients(broker.port, qos, payload, a.client_messages, Path(d))
                        name = f"mosquitto_pub/sub qos{qos} {payload}B"
                        r.update(broker=kind, scenario=name)
                        print(json.dumps(r), flush=True)
                        results.setdefault(name, {})[kind] = r
                m = idle_memory(broker, a.connections)
                m.update(broker=kind, scenario=f"idle {a.connections} connections")
                print(json.dumps(m), flush=True)
                results.setdefault("idle", {})[kind] = m
            finally:
                broker.stop()
    print()
    print("| scenario | Shoal | Mosquitto | Shoal / Mosquitto |")
    print("|---|---|---|---|")
    for name, by in results.items():
        s, m = by.get("shoal", {}), by.get("mosquitto", {})
        if name == "idle":
            sv, mv = s.get("per_connection_bytes", 0), m.get("per_connection_bytes", 0)
            print(f"| memory per idle connection ({a.connections}) | {sv/1024:.1f} KiB | "
                  f"{mv/1024:.1f} KiB | {sv / mv if mv else float('nan'):.2f} |")
        elif name.startswith("latency"):
            print(f"| {name} p50 / p99 | {s.get('latency_us_p50')} / {s.get('latency_us_p99')} µs | "
                  f"{m.get('latency_us_p50')} / {m.get('latency_us_p99')} µs | |")
        else:
            sv, mv = s.get("delivered_per_sec", 0), m.get("delivered_per_sec", 0)
            print(f"| {name} delivered/s | {sv:,.0f} | {mv:,.0f} | {sv / mv if mv else float('nan'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
