"""The three systems the nemesis attacks, built from the e2e harness:

* standalone-file - one `shoal standalone` on its default file:// store;
* standalone-s3   - one `shoal standalone` on s3:// through the FaultyS3
                    proxy in front of a moto server of its own;
* cluster         - three `shoal placement` and three `shoal broker`, on S3
                    through the proxy, each broker in its own network
                    namespace so that one can be cut off from placement
                    (a blackhole route) while clients and S3 still reach it.

Every resource (processes, moto, proxy, tmpfs mounts, namespaces, veths,
loopback addresses) is registered on an ExitStack as it is made, so it is
released however the run ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E_DIR) not in sys.path:
    sys.path.insert(0, str(E2E_DIR))

from cluster import BrokerNode, Cluster, PlacementNode  # noqa: E402
from faulty_s3 import FaultyS3  # noqa: E402
from harness import Shoal, free_port, http_request, shoal_bin, wait_for  # noqa: E402

#: Placement's default broker session timeout (`shoal placement --session-timeout`).
SESSION_TIMEOUT = 6.0
BUCKET = "nemesis"
WAL_TMPFS_SIZE = "256m"
#: file:// flushes are cheap; on S3 the broker default (250 ms) keeps the
#: number of objects, and so the checker's read-back time, down.
FLUSH_INTERVAL = {"file": "100ms", "s3": "250ms"}
#: Compaction during the run, fast enough to rewrite and collect within it:
#: flush objects are compacted 5 s after their commit, every 3 s; replaced
#: objects go 10 s after (the checker reads what it saw referenced meanwhile),
#: orphans 120 s after they were written (GC's floor).
COMPACTION = {"delay": 5.0, "interval": 3.0, "gc_grace": 10.0, "orphan_grace": 120.0}
COMPACTION_ARGS = ["--compaction-delay", f"{COMPACTION['delay']:.0f}s",
                   "--compaction-interval", f"{COMPACTION['interval']:.0f}s",
                   "--gc-grace", f"{COMPACTION['gc_grace']:.0f}s",
                   "--orphan-grace", f"{COMPACTION['orphan_grace']:.0f}s"]
#: The prefixes garbage collection owns.
DATA_PREFIXES = ("segments/", "streams/", "staging/")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


class Manifest:
    """resources.json in the run dir: the namespaces, links, addresses, mounts
    and helper pids a run made, so that `run.py --cleanup DIR` can release
    them if the run itself died without cleaning up (e.g. a client library
    abort). The shoal processes are found by the run dir in their command
    line."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "resources.json"
        self.doc: dict[str, list] = {"netns": [], "links": [], "addrs": [], "mounts": [], "pids": []}

    def add(self, kind: str, value) -> None:
        self.doc[kind].append(value)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc))
        tmp.replace(self.path)


def cleanup_leftovers(run_dir: Path) -> list[str]:
    """Release what a dead run left behind in `run_dir`; returns what was done."""
    run_dir = run_dir.resolve()
    done: list[str] = []
    try:
        doc = json.loads((run_dir / "resources.json").read_text())
    except (OSError, ValueError):
        doc = {}
    # processes: shoal (its --data-dir is under the run dir) and the helpers
    victims = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(entry.name)
        if str(run_dir) in cmdline or (pid in doc.get("pids", []) and "moto.server" in cmdline):
            victims.append((pid, cmdline.strip()))
    for pid, cmdline in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 18)  # SIGCONT, in case it was stopped
            os.kill(pid, 9)
            done.append(f"killed {pid} ({cmdline[:80]})")
    deadline = time.monotonic() + 10
    while victims and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p, _ in victims):
        time.sleep(0.1)
    for line in Path("/proc/mounts").read_text().splitlines():
        mountpoint = line.split()[1]
        if mountpoint.startswith(str(run_dir) + "/"):
            sh("umount", "-l", mountpoint, check=False)
            done.append(f"unmounted {mountpoint}")
    for ns in doc.get("netns", []):
        if sh("ip", "netns", "del", ns, check=False).returncode == 0:
            done.append(f"deleted netns {ns}")
    for link in doc.get("links", []):
        if sh("ip", "link", "del", link, check=False).returncode == 0:
            done.append(f"deleted link {link}")
    for ip in doc.get("addrs", []):
        if sh("ip", "addr", "del", f"{ip}/32", "dev", "lo", check=False).returncode == 0:
            done.append(f"deleted address {ip}")
    return done


# --------------------------------------------------------------------------
# the binary


def wait_for_binary(say: Callable[[str], None], timeout: float = 1800.0) -> str:
    """The binary can be missing for a while when it is rebuilt: wait for it
    to exist and answer --help."""
    binary = shoal_bin()
    deadline = time.monotonic() + timeout
    told = False
    while True:
        if os.access(binary, os.X_OK):
            try:
                if subprocess.run([binary, "--help"], capture_output=True, timeout=60).returncode == 0:
                    return binary
            except (OSError, subprocess.TimeoutExpired):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"shoal binary {binary} still missing after {timeout:.0f}s")
        if not told:
            say(f"waiting for the shoal binary {binary} (being rebuilt?)")
            told = True
        time.sleep(5)


def supports_wal_dir(role: str) -> bool:
    res = subprocess.run([shoal_bin(), role, "--help"], capture_output=True, text=True, timeout=60)
    return "--wal-dir" in res.stdout


def health(proc: Shoal) -> tuple[bool, str]:
    """(healthy, detail) from GET /health, JSON
    {"status": "ok"|"degraded"|"starting", "checks": {...}}."""
    try:
        resp = proc.http("/health", timeout=3)
    except Exception as e:  # noqa: BLE001 - down, stopped, not listening yet
        return False, f"no answer ({type(e).__name__})"
    body = resp.text.strip()
    if resp.status != 200:
        return False, f"HTTP {resp.status} {body[:200]}"
    try:
        doc = json.loads(body)
    except ValueError:
        return False, f"HTTP 200 with unexpected body {body[:200]!r}"
    status = doc.get("status") if isinstance(doc, dict) else None
    return status == "ok", f"status {status!r}, checks {doc.get('checks') if isinstance(doc, dict) else doc}"


# --------------------------------------------------------------------------
# S3: moto + the fault proxy


class MotoServer:
    def __init__(self, host: str, log_path: Path, manifest: Manifest):
        self.manifest = manifest
        self.host = host
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{host}:{self.port}"

    def start(self) -> "MotoServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.manifest.add("pids", self.proc.pid)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}; see {self.log_path}")
            return http_request(self.url + "/", timeout=2).status == 200
        wait_for(up, 60, "moto to answer", interval=0.2, ignore=(OSError,))
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class S3Backend:
    """moto, a bucket, and FaultyS3 in front of it (faults off until the
    nemesis switches them on). Shoal talks to the proxy; the checker reads
    objects from moto directly."""

    def __init__(self, host: str, run_dir: Path, seed: int, stack: contextlib.ExitStack,
                 manifest: Manifest):
        self.moto = MotoServer(host, run_dir / "moto.log", manifest).start()
        stack.callback(self.moto.stop)
        self.proxy = FaultyS3(self.moto.url, faults=False, seed=seed, host=host)
        # A killed broker leaves the proxy with broken connections: not news.
        self.proxy.server.handle_error = lambda request, client_address: None
        self.proxy.__enter__()
        stack.callback(self.proxy.__exit__, None, None, None)
        self.prefix = "run"
        self.url = f"s3://{BUCKET}/{self.prefix}"
        self._client = self.moto.client()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.proxy.url, "AWS_ENDPOINT": self.proxy.url,
                "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def fetch(self, key: str) -> bytes:
        return self._client.get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")["Body"].read()

    def data_objects(self) -> list[tuple[str, float]]:
        out = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{self.prefix}/")
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) + 1:]
                if key.startswith(DATA_PREFIXES):
                    out.append((key, obj["LastModified"].timestamp()))
        return out

    def all_clear(self) -> None:
        self.proxy.enabled = False
        self.proxy.latency = 0.0
        self.proxy.down = False


# --------------------------------------------------------------------------
# a small tmpfs for a WAL, to fill up


class TmpfsDisk:
    FILLER = ".nemesis-filler"

    def __init__(self, path: Path, size: str = WAL_TMPFS_SIZE):
        self.path = path
        self.size = size
        self.mounted = False

    def mount(self) -> "TmpfsDisk":
        self.path.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path))
        self.mounted = True
        return self

    @property
    def wal_dir(self) -> Path:
        return self.path / "wal"

    def fill(self) -> int:
        """Write a filler file until the file system says ENOSPC; returns its size."""
        written = 0
        with open(self.path / self.FILLER, "wb", buffering=0) as f:
            for chunk in (1 << 20, 4096, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        n = f.write(block)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
                    written += n or 0
        return written

    def drain(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / self.FILLER).unlink()

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def unmount(self) -> None:
        if not self.mounted:
            return
        self.drain()
        if sh("umount", str(self.path), check=False).returncode != 0:
            sh("umount", "-l", str(self.path), check=False)
        self.mounted = False


# --------------------------------------------------------------------------
# topologies


class Topology:
    """What the nemesis and the checker need from a system under test."""

    name = ""
    #: fault kinds this topology supports (see faults.py)
    fault_kinds: tuple[str, ...] = ()

    def __init__(self, run_dir: Path, stack: contextlib.ExitStack, seed: int,
                 say: Callable[[str], None], wal_dir: bool):
        self.run_dir = run_dir
        self.stack = stack
        self.seed = seed
        self.say = say
        self.use_wal_dir = wal_dir
        self.manifest = Manifest(run_dir)
        self.s3: Optional[S3Backend] = None
        self.disks: dict[str, TmpfsDisk] = {}  # process name -> its WAL tmpfs
        self.brokers: list[Shoal] = []
        self.placements: list[Shoal] = []

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    @property
    def processes(self) -> list[Shoal]:
        return [*self.placements, *self.brokers]

    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.brokers)

    def log_paths(self) -> list[Path]:
        paths = [p.log_path for p in self.processes]
        if self.s3 is not None:
            paths.append(self.s3.moto.log_path)
        return paths

    def _tmpfs(self, name: str) -> Optional[TmpfsDisk]:
        if not self.use_wal_dir:
            return None
        disk = TmpfsDisk(self.run_dir / f"{name}-wal-tmpfs").mount()
        self.manifest.add("mounts", str(disk.path))
        self.stack.callback(disk.unmount)
        self.disks[name] = disk
        return disk

    def _kill_all(self) -> None:
        for p in self.processes:
            if p.proc is not None and p.proc.poll() is None:
                with contextlib.suppress(OSError):
                    p.proc.send_signal(18)  # SIGCONT: a stopped process cannot die cleanly
            p.cleanup()

    # ---- state -------------------------------------------------------------

    def shard_views(self) -> dict[tuple[str, int], dict]:
        """Every shard of every stream as its owner reports it (high watermark,
        committed offset, live segments)."""
        raise NotImplementedError

    def ownership(self) -> Optional[dict[str, list]]:
        """{"topic/shard": [owner, epoch]} (cluster only)."""
        return None

    def fetch_object(self, key: str) -> bytes:
        raise NotImplementedError

    def data_objects(self) -> list[tuple[str, float]]:
        """(key, last-modified unix seconds) of every object under the data
        prefixes of the store."""
        if self.s3 is None:
            raise NotImplementedError
        return self.s3.data_objects()


class StandaloneTopology(Topology):
    fault_kinds = ("kill", "pause", "disk-full")

    def __init__(self, *args, s3: bool, **kw):
        super().__init__(*args, **kw)
        self.on_s3 = s3
        self.name = "standalone-s3" if s3 else "standalone-file"
        if s3:
            self.fault_kinds = self.fault_kinds + ("s3-errors", "s3-latency", "s3-outage")

    def start(self) -> None:
        env, store = {}, None
        if self.on_s3:
            self.s3 = S3Backend("127.0.0.1", self.run_dir, self.seed, self.stack, self.manifest)
            env, store = self.s3.env(), self.s3.url
        disk = self._tmpfs("shoal")
        extra = ["--wal-dir", str(disk.wal_dir)] if disk else []
        extra += COMPACTION_ARGS
        node = Shoal(self.run_dir / "shoal", name="shoal", default_partitions=3,
                     flush_interval=FLUSH_INTERVAL["s3" if self.on_s3 else "file"],
                     object_store=store, env=env,
                     extra_args=extra)
        node.node_id = 1
        self.brokers = [node]
        self.stack.callback(self._kill_all)
        node.start()

    @property
    def node(self) -> Shoal:
        return self.brokers[0]

    def shard_views(self) -> dict[tuple[str, int], dict]:
        return {(s["name"], sh["shard"]): sh for s in self.node.streams() for sh in s["shards"]}

    def fetch_object(self, key: str) -> bytes:
        if self.s3 is not None:
            return self.s3.fetch(key)
        return (self.node.objects_dir / key).read_bytes()

    def data_objects(self) -> list[tuple[str, float]]:
        if self.s3 is not None:
            return self.s3.data_objects()
        root = self.node.objects_dir
        out = []
        for prefix in DATA_PREFIXES:
            base = root / prefix
            if base.exists():
                for f in base.rglob("*"):
                    with contextlib.suppress(FileNotFoundError):
                        if f.is_file():
                            out.append((str(f.relative_to(root)), f.stat().st_mtime))
        return out


# ---- cluster -------------------------------------------------------------


class NetSlot:
    """Addresses and namespaces of one cluster run, numbered by a slot `s`
    picked from the pid and checked to be unused, so a leftover of a crashed
    run never collides with the next:

      10.200.s.1/32 on lo          placement nodes (distinct ports)
      10.200.s.2/32 on lo          moto and the S3 fault proxy
      netns shnem<s>b<B>           broker B, veth shn<s>b<B> (root side,
                                   10.<200+B>.s.1/24) <-> shn<s>b<B>n
                                   (namespace side, 10.<200+B>.s.2/24),
                                   default route via the root side.
    """

    def __init__(self, brokers: int, manifest: Manifest):
        self.brokers = brokers
        self.manifest = manifest
        self.s: Optional[int] = None
        self.made_links: list[str] = []
        self.made_ns: list[str] = []
        self.made_addrs: list[str] = []
        self.cuts: dict[int, str] = {}  # broker -> route type cutting it off

    def ns(self, b: int) -> str:
        return f"shnem{self.s}b{b}"

    def veth(self, b: int) -> str:
        return f"shn{self.s}b{b}"

    def broker_ip(self, b: int) -> str:
        return f"10.{200 + b}.{self.s}.2"

    @property
    def placement_ip(self) -> str:
        return f"10.200.{self.s}.1"

    @property
    def s3_ip(self) -> str:
        return f"10.200.{self.s}.2"

    def _in_use(self, s: int) -> bool:
        addrs = sh("ip", "-4", "-o", "addr", "show").stdout
        links = sh("ip", "-o", "link", "show").stdout
        spaces = sh("ip", "netns", "list").stdout
        nets = [f"10.{200 + b}.{s}." for b in range(0, self.brokers + 1)]
        return (any(n in addrs for n in nets) or f"shn{s}b" in links
                or f"shnem{s}b" in spaces)

    def claim(self) -> None:
        first = os.getpid() % 200 + 20
        for i in range(200):
            s = 20 + (first - 20 + i) % 200
            if self._in_use(s):
                continue
            # `ip netns add` fails if the name exists: the claim is atomic.
            if sh("ip", "netns", "add", f"shnem{s}b1", check=False).returncode != 0:
                continue
            self.s = s
            self._made("netns", self.made_ns, self.ns(1))
            return
        raise RuntimeError("no free address slot for the cluster's namespaces")

    def _made(self, kind: str, into: list, value: str) -> None:
        into.append(value)
        self.manifest.add(kind, value)

    def setup(self) -> None:
        for ip in (self.placement_ip, self.s3_ip):
            sh("ip", "addr", "add", f"{ip}/32", "dev", "lo")
            self._made("addrs", self.made_addrs, ip)
        for b in range(1, self.brokers + 1):
            ns, veth = self.ns(b), self.veth(b)
            if ns not in self.made_ns:
                sh("ip", "netns", "add", ns)
                self._made("netns", self.made_ns, ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "n")
            self._made("links", self.made_links, veth)
            sh("ip", "link", "set", veth + "n", "netns", ns)
            sh("ip", "addr", "add", f"10.{200 + b}.{self.s}.1/24", "dev", veth)
            sh("ip", "link", "set", veth, "up")
            inside = ("ip", "netns", "exec", ns)
            sh(*inside, "ip", "addr", "add", f"{self.broker_ip(b)}/24", "dev", veth + "n")
            sh(*inside, "ip", "link", "set", veth + "n", "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            sh(*inside, "ip", "route", "add", "default", "via", f"10.{200 + b}.{self.s}.1")

    #: Route types for cutting a broker off from placement: `blackhole`
    #: drops packets silently (connections hang until they time out),
    #: `prohibit` answers them with an ICMP error (connections fail at once).
    CUT_ROUTES = {"blackhole": "blackhole", "refuse": "prohibit"}

    def cut(self, b: int, mode: str = "blackhole") -> None:
        self.cuts[b] = self.CUT_ROUTES[mode]
        sh("ip", "netns", "exec", self.ns(b), "ip", "route", "add", self.cuts[b],
           f"{self.placement_ip}/32")

    def uncut(self, b: int) -> None:
        route = self.cuts.pop(b, "blackhole")
        sh("ip", "netns", "exec", self.ns(b), "ip", "route", "del", route,
           f"{self.placement_ip}/32", check=False)

    def teardown(self) -> None:
        for ns in self.made_ns:
            sh("ip", "netns", "del", ns, check=False)
        for link in self.made_links:
            # deleting the namespace removes the pair; this is for a half-made one
            sh("ip", "link", "del", link, check=False)
        for ip in self.made_addrs:
            sh("ip", "addr", "del", f"{ip}/32", "dev", "lo", check=False)


class NetPlacement(PlacementNode):
    """A placement node listening on a root-namespace address other than
    127.0.0.1 (so that a broker's namespace can blackhole it)."""

    def __init__(self, workdir: Path, *, node_id: int, peers: dict[int, int], host: str):
        self.host = host
        super().__init__(workdir, node_id=node_id, peers=peers)

    @property
    def http_addr(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--peers")
        cmd[i + 1] = ",".join(f"{n}={self.host}:{p}" for n, p in sorted(self.peers.items()))
        return cmd


class NetBroker(BrokerNode):
    """A broker run inside its own network namespace (`ip netns exec` execs,
    so the Popen pid is the broker's and signals reach it)."""

    def __init__(self, workdir: Path, *, node_id: int, placement: str, object_store: str,
                 ns: str, ip: str, env: dict[str, str], wal_dir: Optional[Path]):
        self.ns = ns
        self.ip = ip
        self.wal_dir = wal_dir
        super().__init__(workdir, node_id=node_id, placement=placement,
                         object_store=object_store, env=env, flush_interval=FLUSH_INTERVAL["s3"])

    @property
    def bootstrap(self) -> str:
        return f"{self.ip}:{self.kafka_port}"

    @property
    def http_addr(self) -> str:
        return f"{self.ip}:{self.http_port}"

    def command(self) -> list[str]:
        cmd = ["ip", "netns", "exec", self.ns, *super().command()]
        if self.wal_dir is not None:
            cmd += ["--wal-dir", str(self.wal_dir)]
        return cmd


class NetCluster(Cluster):
    """cluster.Cluster's start / leader / view helpers over given nodes."""

    def __init__(self, root: Path, placements: list[NetPlacement], brokers: list[NetBroker],
                 object_store: str):  # noqa: D107 - Cluster.__init__ builds loopback nodes
        self.root = root
        self.placements = placements
        self.brokers = brokers
        self.object_store = object_store


class ClusterTopology(Topology):
    name = "cluster"
    fault_kinds = ("kill-broker", "kill-placement", "kill-two-placements", "pause-broker",
                   "cut-broker", "disk-full", "s3-errors", "s3-latency", "s3-outage")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.net = NetSlot(3, self.manifest)
        self.cluster: Optional[NetCluster] = None

    def start(self) -> None:
        self.net.claim()
        self.stack.callback(self.net.teardown)
        self.net.setup()
        self.s3 = S3Backend(self.net.s3_ip, self.run_dir, self.seed, self.stack, self.manifest)
        ports = {i: free_port() for i in (1, 2, 3)}
        placements = [NetPlacement(self.run_dir / f"p{i}", node_id=i, peers=ports,
                                   host=self.net.placement_ip) for i in ports]
        placement_addrs = ",".join(p.http_addr for p in placements)
        brokers = []
        for b in (1, 2, 3):
            disk = self._tmpfs(f"broker{b}")
            brokers.append(NetBroker(self.run_dir / f"b{b}", node_id=b, placement=placement_addrs,
                                     object_store=self.s3.url, ns=self.net.ns(b),
                                     ip=self.net.broker_ip(b), env=self.s3.env(),
                                     wal_dir=disk.wal_dir if disk else None))
        self.placements, self.brokers = placements, brokers
        self.cluster = NetCluster(self.run_dir, placements, brokers, self.s3.url)
        # Registered after the namespaces: processes die before their netns goes.
        self.stack.callback(self._kill_all)
        self.cluster.start()
        # The cluster's compactor, a service beside it (root namespace).
        self.compactor_log = self.run_dir / "compactor.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(self.s3.env())
        log = open(self.compactor_log, "ab")  # noqa: SIM115 - closed with the process
        self.compactor = subprocess.Popen(
            [shoal_bin(), "compactor", "--placement", placement_addrs,
             "--object-store", self.s3.url, *COMPACTION_ARGS],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        self.stack.callback(self._stop_compactor, log)

    def _stop_compactor(self, log) -> None:
        if self.compactor.poll() is None:
            self.compactor.kill()
            self.compactor.wait(10)
        log.close()

    def log_paths(self) -> list[Path]:
        return [*super().log_paths(), self.compactor_log]

    def broker(self, node_id: int) -> Shoal:
        return next(b for b in self.brokers if b.node_id == node_id)

    def leader(self) -> Optional[Shoal]:
        for p in self.placements:
            if p.is_running():
                try:
                    if p.status()["is_leader"]:
                        return p
                except Exception:  # noqa: BLE001 - down or mid-election
                    continue
        return None

    def cluster_view(self) -> Optional[dict]:
        leader = self.leader()
        return leader.cluster() if leader is not None else None

    def ownership(self) -> Optional[dict[str, list]]:
        view = self.cluster_view()
        if view is None:
            return None
        return {f"{s['name']}/{sh['shard']}": [sh["owner"], sh["epoch"]]
                for s in view["streams"] for sh in s["shards"]}

    def live_brokers(self) -> list[int]:
        view = self.cluster_view()
        return [b["info"]["id"] for b in view["brokers"] if b["live"]] if view else []

    def shard_views(self) -> dict[tuple[str, int], dict]:
        """A broker knows the live high watermark only of the shards it owns:
        take each shard from its owner, else from any broker."""
        out: dict[tuple[str, int], dict] = {}
        owned: set[tuple[str, int]] = set()
        for b in self.brokers:
            if not b.is_running():
                continue
            try:
                streams = b.streams()
            except Exception:  # noqa: BLE001 - stopped or restarting
                continue
            for s in streams:
                for sh_ in s["shards"]:
                    key = (s["name"], sh_["shard"])
                    if sh_["owner"] == b.node_id:
                        out[key] = sh_
                        owned.add(key)
                    elif key not in owned:
                        out.setdefault(key, sh_)
        return out

    def committed_offsets(self) -> dict[str, int]:
        return {f"{t}/{s}": v["committed_offset"] for (t, s), v in self.shard_views().items()}

    def fetch_object(self, key: str) -> bytes:
        return self.s3.fetch(key)


def make_topology(name: str, run_dir: Path, stack: contextlib.ExitStack, seed: int,
                  say: Callable[[str], None], wal_dir: bool) -> Topology:
    if name == "standalone-file":
        return StandaloneTopology(run_dir, stack, seed, say, wal_dir, s3=False)
    if name == "standalone-s3":
        return StandaloneTopology(run_dir, stack, seed, say, wal_dir, s3=True)
    if name == "cluster":
        return ClusterTopology(run_dir, stack, seed, say, wal_dir)
    raise ValueError(f"unknown topology {name}")


def start_process(p: Shoal, timeout: float = 90.0) -> None:
    """(Re)start a process and wait for /health; waits for the binary if it
    is being rebuilt."""
    if not os.access(shoal_bin(), os.X_OK):
        wait_for_binary(lambda m: None)
    p.start(timeout=timeout)
