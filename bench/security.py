#!/usr/bin/env python3
"""The cost of TLS and SASL/SCRAM on produce: one `shoal standalone` with
PLAINTEXT, SSL and SASL_SSL (SCRAM-SHA-512) listeners, the same
bench/produce.py load against each in turn, throughput and p99 side by side.

    cargo build --release -p shoal
    python3 bench/security.py --seconds 15 --partitions 8

Prints one JSON line per listener and load (`max`: as fast as the client
goes; `paced`: --paced-rate records/s for latency), with the broker's own
CPU time per MB produced (`broker_cpu_ms_per_mb`, from /proc): on a machine
where client and broker share the cores, that is the broker's cost of TLS
apart from the client's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from certs import make_certs  # noqa: E402
from harness import free_port  # noqa: E402

PASSWORD = "bench-password-123"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shoal", default=str(ROOT / "target" / "release" / "shoal"))
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--paced-rate", type=float, default=20000)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shoal-bench-security-"))
    certs = make_certs(work / "certs")
    data = work / "data"
    subprocess.run([args.shoal, "users", "add", "bench", "--password-stdin", "--data-dir", str(data)],
                   input=PASSWORD + "\n", text=True, check=True, capture_output=True)
    ports = {"PLAINTEXT": free_port(), "SSL": free_port(), "SASL_SSL": free_port()}
    http = free_port()
    listeners = ",".join(f"{k}://127.0.0.1:{v}" for k, v in ports.items())
    log = open(work / "shoal.log", "wb")
    proc = subprocess.Popen([args.shoal, "standalone", "--data-dir", str(data),
                             "--kafka-listeners", listeners, "--http-addr", f"127.0.0.1:{http}",
                             "--mqtt-addr", "off", "--tls-cert", str(certs.server_cert),
                             "--tls-key", str(certs.server_key)],
                            stdout=log, stderr=log, env={**os.environ, "SHOAL_LOG": "warn"})
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        configs = {
            "PLAINTEXT": [],
            "SSL": ["security.protocol=SSL", f"ssl.ca.location={certs.ca}"],
            "SASL_SSL": ["security.protocol=SASL_SSL", f"ssl.ca.location={certs.ca}",
                         "sasl.mechanisms=SCRAM-SHA-512", "sasl.username=bench",
                         f"sasl.password={PASSWORD}"],
        }
        for load, rate in [("max", 0), ("paced", args.paced_rate)]:
            for name, port in ports.items():
                cmd = [sys.executable, str(ROOT / "bench" / "produce.py"),
                       "--bootstrap", f"127.0.0.1:{port}", "--partitions", str(args.partitions),
                       "--seconds", str(args.seconds), "--procs", str(args.procs),
                       "--rate", str(rate)]
                for kv in configs[name]:
                    cmd += ["-X", kv]
                cpu_before = cpu_seconds(proc.pid)
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                cpu = cpu_seconds(proc.pid) - cpu_before
                result = json.loads(out.stdout.strip().splitlines()[-1])
                # records x 1 KiB (bench/produce.py's default record size)
                mb = result["records"] * 1024 / 1e6
                if mb:
                    result["broker_cpu_ms_per_mb"] = round(cpu * 1000 / mb, 3)
                print(json.dumps({"listener": name, "load": load, **result}), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
