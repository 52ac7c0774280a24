"""The nemesis runs as pytest tests: one test per topology, one nemesis run
(run.py in a child process) per seed.

    python3 -m pytest -q -s tests/nemesis/test_nemesis.py::test_cluster
    SHOAL_NEMESIS_SEEDS="14 21" SHOAL_NEMESIS_SECONDS=120 python3 -m pytest -q tests/nemesis

Environment: SHOAL_NEMESIS_SEEDS (seeds, space or comma separated, for every
topology; by default each topology has its own list, chosen with
`faults.plan_text` so that its 60 s schedules cover every fault kind:
see DEFAULT_SEEDS),
SHOAL_NEMESIS_SECONDS (seconds of faults per run, default 60), SHOAL_BIN.
Each run takes its own free ports, addresses and namespaces, so the tests
need no fixture from tests/e2e; they need root (namespaces, tmpfs).

A run's output is streamed to stdout (see it with -s, or in the failure
report); a failed run keeps its directory with every log and the history.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RUN = HERE / "run.py"

#: Per topology. Standalone: seed 14 injects every kind within 60 s. The
#: cluster has more kinds than fit in a minute: seed 14 brings the Raft
#: leader and then two placement nodes down, a broker cut off from
#: placement, S3 errors and latency; seed 2407 a full S3 outage, a broker
#: paused past the session timeout, the leader and two placement nodes
#: down, a broker killed, a full disk.
DEFAULT_SEEDS = {"standalone-file": [14], "standalone-s3": [14], "cluster": [14, 2407]}


def seeds(topology: str) -> list[int]:
    given = os.environ.get("SHOAL_NEMESIS_SEEDS")
    if given:
        return [int(s) for s in given.replace(",", " ").split()]
    return DEFAULT_SEEDS[topology]


SECONDS = float(os.environ.get("SHOAL_NEMESIS_SECONDS", "60"))
#: Beyond the faults: setup, the last fault's overrun (an S3 outage lasts up
#: to 35 s), healing, producers' flush, read-back and Parquet comparison.
BUDGET = SECONDS + 600

def _require_root() -> None:
    if os.geteuid() == 0:
        return
    reason = "the nemesis needs root (network namespaces, tmpfs)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the nemesis: {reason}", pytrace=False)
    pytest.skip(reason)


def run_nemesis(topology: str, seed: int, tmp_path: Path) -> None:
    _require_root()
    run_dir = tmp_path / f"{topology}-seed{seed}"
    cmd = [sys.executable, str(RUN), "--topology", topology, "--seconds", str(SECONDS),
           "--seed", str(seed), "--keep", str(run_dir)]
    print(f"$ {' '.join(cmd)}", flush=True)
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=BUDGET)
    except subprocess.TimeoutExpired:
        # SIGTERM lets run.py clean up (processes, namespaces, mounts)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = None
    finally:
        reader.join(10)
        # Whatever happened to run.py (even an abort inside a client
        # library), release what it may have left behind.
        subprocess.run([sys.executable, str(RUN), "--cleanup", str(run_dir)], timeout=120)
    if rc == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    failed = [ln for ln in lines if ln.startswith("FAIL ")]
    summary = [ln for ln in lines if " acknowledged, " in ln and " faults, seed " in ln]
    why = "timed out" if rc is None else f"exit code {rc}"
    pytest.fail(f"nemesis {topology} seed {seed}: {why}\n" + "\n".join(failed + summary)
                + f"\nrun dir (logs, history.json): {run_dir}", pytrace=False)


@pytest.mark.timeout(BUDGET + 120)
@pytest.mark.parametrize("seed", seeds("standalone-file"))
def test_standalone_file(seed, tmp_path):
    run_nemesis("standalone-file", seed, tmp_path)


@pytest.mark.timeout(BUDGET + 120)
@pytest.mark.parametrize("seed", seeds("standalone-s3"))
def test_standalone_s3(seed, tmp_path):
    run_nemesis("standalone-s3", seed, tmp_path)


@pytest.mark.timeout(BUDGET + 120)
@pytest.mark.parametrize("seed", seeds("cluster"))
def test_cluster(seed, tmp_path):
    run_nemesis("cluster", seed, tmp_path)
