"""Process harness for the Shoal end-to-end tests.

`Shoal` runs one `shoal standalone` process on free loopback ports with its own
data directory, captures its stderr/stdout into a log file inside the test's
tmp dir, and waits on `GET /health` (never on a fixed sleep) before handing the
instance to a test.

Everything here talks to the binary only through its public interface: the
command line, the Kafka listener, the HTTP listener and the files it writes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "shoal"

#: Seconds a broker gets to answer /health=200 after being spawned.
START_TIMEOUT = float(os.environ.get("SHOAL_TEST_START_TIMEOUT", "60"))


def shoal_bin() -> str:
    return os.environ.get("SHOAL_BIN") or str(DEFAULT_BIN)


def unique_name(prefix: str = "t") -> str:
    """A topic / group name that no other test (or xdist worker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------
# ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: Ports this process has handed out: a test that asks for several ports
#: before starting anything must not get the same one twice.
_HANDED_OUT: set[int] = set()


def _worker_slice(lo: int, hi: int) -> tuple[int, int]:
    """This pytest-xdist worker's own part of [lo, hi): workers draw from
    disjoint slices, so two of them never pick the same free port in the
    window before its server binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or "1")
    if not worker.startswith("gw") or count <= 1:
        return lo, hi
    try:
        index = int(worker[2:])
    except ValueError:
        return lo, hi
    width = (hi - lo) // count
    return lo + index * width, lo + (index + 1) * width


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now.

    Ports are drawn below the kernel's ephemeral range, so that the outgoing
    connections of the test clients (which take ephemeral ports) cannot grab a
    broker's port while it restarts, and from this xdist worker's own slice
    of that range. Falls back to binding port 0.
    """
    lo, _ = _ephemeral_range()
    low_bound = 20000
    if lo - low_bound > 1000:
        start, end = _worker_slice(low_bound, lo)
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(start, end)
            if port not in _HANDED_OUT and _can_bind(port):
                _HANDED_OUT.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


# --------------------------------------------------------------------------
# polling


def distinct_ports(n: int) -> list[int]:
    """`n` free ports, all different."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def wait_for(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.05,
    ignore: tuple = (Exception,),
) -> Any:
    """Poll `cond()` until it returns a truthy value, and return that value.

    Exceptions of the types in `ignore` raised by `cond` count as "not yet"
    (the last one is reported on timeout). Raises AssertionError after
    `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    last_val: Any = None
    while True:
        try:
            last_val = cond()
            if last_val:
                return last_val
        except ignore as e:  # noqa: PERF203 - polling
            last_exc = e
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:.1f}s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            elif last_val not in (None, False):
                msg += f" (last value: {last_val!r})"
            raise AssertionError(msg)
        time.sleep(interval)


# --------------------------------------------------------------------------
# HTTP


@dataclass
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(url: str, method: str = "GET", body: Optional[bytes] = None,
                 timeout: float = 10.0, token: Optional[str] = None) -> HttpResponse:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResponse(resp.status, _lower(resp.headers), resp.read())
    except urllib.error.HTTPError as e:
        return HttpResponse(e.code, _lower(e.headers or {}), e.read() or b"")


def _lower(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# --------------------------------------------------------------------------
# Prometheus text


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample value per sample name (labels folded together)."""
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name = line[: line.index("{")]
            rest = line[line.rindex("}") + 1:].split()
        else:
            parts = line.split()
            name, rest = parts[0], parts[1:]
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + value
    return out


# --------------------------------------------------------------------------
# the broker process


class ShoalStartError(RuntimeError):
    pass


class Shoal:
    """One `shoal standalone` process.

    Ports and data dir are fixed at construction, so `restart()` brings the
    broker back on the same addresses over the same data.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "shoal",
        default_partitions: Optional[int] = 1,
        flush_interval: Optional[str] = "100ms",
        flush_bytes: Optional[int] = 8388608,
        object_store: Optional[str] = None,
        config_file: Optional[Path] = None,
        env: Optional[Mapping[str, str]] = None,
        extra_args: Iterable[str] = (),
        data_dir: Optional[Path] = None,
        kafka_port: Optional[int] = None,
        http_port: Optional[int] = None,
        mqtt_port: Optional[int] = None,
    ):
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir) if data_dir is not None else self.workdir / "data"
        self.log_path = self.workdir / f"{name}.log"
        self.kafka_port = kafka_port or free_port()
        self.http_port = http_port or free_port()
        while self.http_port == self.kafka_port:
            self.http_port = free_port()
        # Always a free port: the standalone default (1883) may be taken.
        self.mqtt_port = mqtt_port or free_port()
        while self.mqtt_port in (self.kafka_port, self.http_port):
            self.mqtt_port = free_port()
        self.default_partitions = default_partitions
        self.flush_interval = flush_interval
        self.flush_bytes = flush_bytes
        self.object_store = object_store
        self.config_file = config_file
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        #: Bearer token the harness' own HTTP calls present (auth tests).
        self.token: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        self.starts = 0

    # ---- addresses -------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def kafka_addr(self) -> str:
        return self.bootstrap

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_base(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def objects_dir(self) -> Path:
        """Root of the default file:// object store."""
        return self.data_dir / "objects"

    # ---- process control -------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            shoal_bin(), "standalone",
            "--data-dir", str(self.data_dir),
            "--kafka-addr", self.kafka_addr,
            "--http-addr", self.http_addr,
            "--mqtt-addr", f"127.0.0.1:{self.mqtt_port}",
        ]
        if self.object_store is not None:
            cmd += ["--object-store", self.object_store]
        if self.flush_interval is not None:
            cmd += ["--flush-interval", self.flush_interval]
        if self.flush_bytes is not None:
            cmd += ["--flush-bytes", str(self.flush_bytes)]
        if self.default_partitions is not None:
            cmd += ["--default-partitions", str(self.default_partitions)]
        if self.config_file is not None:
            cmd += ["--config", str(self.config_file)]
        cmd += self.extra_args
        return cmd

    def child_env(self) -> dict[str, str]:
        # The harness' own SHOAL_* variables (SHOAL_BIN, SHOAL_TEST_S3_URL,
        # SHOAL_CRASH_ROUNDS, ...) are not configuration for the broker: the
        # binary reads SHOAL_<KEY> as config, so never leak them into it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.setdefault("RUST_BACKTRACE", "1")
        env.update(self.env)
        return env

    def spawn(self) -> subprocess.Popen:
        """Start the process without waiting for it to become healthy."""
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        binary = shoal_bin()
        if not os.access(binary, os.X_OK):
            raise ShoalStartError(
                f"shoal binary not found or not executable: {binary} "
                "(build it with `cargo build --workspace --bins` or set SHOAL_BIN)")
        self._close_log()
        self._log_file = open(self.log_path, "ab", buffering=0)
        cmd = self.command()
        self._log_file.write(
            f"\n===== harness: start #{self.starts + 1}: {' '.join(cmd)}\n".encode())
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=self.child_env(),
            cwd=str(self.workdir),
        )
        self.starts += 1
        return self.proc

    def start(self, timeout: float = START_TIMEOUT) -> "Shoal":
        """Spawn the broker and wait until GET /health answers 200."""
        self.spawn()
        deadline = time.monotonic() + timeout
        last_err: Any = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ShoalStartError(
                    f"{self.name} exited with code {rc} before becoming healthy\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}")
            try:
                resp = http_request(self.http_base + "/health", timeout=1.0)
                if resp.status == 200:
                    return self
                last_err = f"HTTP {resp.status}"
            except (OSError, urllib.error.URLError) as e:
                last_err = e
            if time.monotonic() >= deadline:
                self.kill9()
                raise ShoalStartError(
                    f"{self.name} did not report /health=200 within {timeout:.0f}s "
                    f"(last: {last_err!r})\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}")
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def kill9(self) -> None:
        """SIGKILL the broker and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._mark("killed with SIGKILL")

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, wait for exit (SIGKILL after `timeout`). Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._mark(f"did not exit {timeout:.0f}s after SIGTERM; sending SIGKILL")
                self.proc.kill()
                self.proc.wait()
        self._mark(f"stopped, exit code {self.proc.returncode}")
        return self.proc.returncode

    def restart(self, timeout: float = START_TIMEOUT) -> "Shoal":
        """Stop (gracefully) if running, then start again on the same ports and data."""
        if self.is_running():
            self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self._close_log()

    def _mark(self, msg: str) -> None:
        if self._log_file is not None and not self._log_file.closed:
            try:
                self._log_file.write(f"===== harness: {msg}\n".encode())
            except OSError:
                pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            try:
                self._log_file.close()
            except OSError:
                pass
            self._log_file = None

    # ---- introspection ---------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident set size of the broker process."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    # ---- HTTP ------------------------------------------------------------

    def http(self, path: str, method: str = "GET", body: Optional[bytes] = None,
             timeout: float = 10.0) -> HttpResponse:
        if not path.startswith("/"):
            path = "/" + path
        return http_request(self.http_base + path, method=method, body=body, timeout=timeout,
                            token=self.token)

    def health_status(self) -> int:
        return self.http("/health", timeout=5.0).status

    def metrics_text(self) -> str:
        resp = self.http("/metrics")
        assert resp.status == 200, f"/metrics answered {resp.status}: {resp.text[:500]}"
        return resp.text

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(self.metrics_text())

    def streams(self) -> list[dict]:
        resp = self.http("/api/v1/streams")
        assert resp.status == 200, f"/api/v1/streams answered {resp.status}: {resp.text[:500]}"
        doc = resp.json()
        assert isinstance(doc, dict) and isinstance(doc.get("streams"), list), doc
        return doc["streams"]

    def stream(self, name: str) -> Optional[dict]:
        """The STREAM document for `name`, or None when the API answers 404."""
        resp = self.http(f"/api/v1/streams/{name}")
        if resp.status == 404:
            return None
        assert resp.status == 200, f"/api/v1/streams/{name} answered {resp.status}: {resp.text[:500]}"
        return resp.json()

    def wait_flushed(self, name: str, expected_counts: Optional[Mapping[int, int]] = None,
                     timeout: float = 30.0) -> dict:
        """Wait until every shard of `name` has committed_offset == high_watermark
        (and, if given, high_watermark == expected_counts[shard]). Returns the
        STREAM document."""

        def ready():
            doc = self.stream(name)
            if doc is None or not doc.get("shards"):
                return None
            for sh in doc["shards"]:
                if sh["committed_offset"] != sh["high_watermark"]:
                    return None
                if expected_counts is not None and \
                        sh["high_watermark"] != expected_counts.get(sh["shard"], 0):
                    return None
            if expected_counts is not None:
                shards = {sh["shard"] for sh in doc["shards"]}
                if not set(expected_counts) <= shards:
                    return None
            return doc

        return wait_for(ready, timeout, f"stream {name} flushed to object storage "
                                        f"(committed_offset == high_watermark)")

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"{self.name} is not running (exit code {self.proc.returncode if self.proc else None})\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}")

    def __repr__(self) -> str:
        return f"Shoal(name={self.name!r}, kafka={self.bootstrap}, http={self.http_addr}, data={self.data_dir})"
