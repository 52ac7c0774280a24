"""A distributed Shoal for the end-to-end tests: three `shoal placement`
processes and three `shoal broker` processes on loopback ports, sharing a
bucket prefix on the S3 emulator that tests/run.sh starts (or a file://
directory when SHOAL_TEST_S3_URL is unset outside CI).

The processes reuse the `Shoal` process control (spawn, /health wait,
kill -9, logs); only their command lines differ.
"""

from __future__ import annotations

import os
import signal
import urllib.parse
from pathlib import Path
from typing import Optional

from harness import Shoal, free_port, shoal_bin, unique_name, wait_for

S3_URL = os.environ.get("SHOAL_TEST_S3_URL")


class PlacementNode(Shoal):
    def __init__(self, workdir: Path, *, node_id: int, peers: dict[int, int], **kw):
        super().__init__(workdir, name=f"placement{node_id}", http_port=peers[node_id], **kw)
        self.node_id = node_id
        self.peers = peers

    def command(self) -> list[str]:
        peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in sorted(self.peers.items()))
        return [shoal_bin(), "placement", "--node-id", str(self.node_id),
                "--addr", self.http_addr, "--peers", peers,
                "--data-dir", str(self.data_dir)] + self.extra_args

    def status(self) -> dict:
        return self.http("/placement/v1/status", timeout=3).json()

    def cluster(self) -> dict:
        return self.http("/placement/v1/cluster", timeout=3).json()


class BrokerNode(Shoal):
    def __init__(self, workdir: Path, *, node_id: int, placement: str, object_store: str, **kw):
        super().__init__(workdir, name=f"broker{node_id}", object_store=object_store, **kw)
        self.node_id = node_id
        self.placement = placement

    def command(self) -> list[str]:
        return [shoal_bin(), "broker", "--node-id", str(self.node_id),
                "--placement", self.placement,
                "--kafka-addr", self.kafka_addr, "--http-addr", self.http_addr,
                "--object-store", self.object_store,
                "--data-dir", str(self.data_dir),
                "--flush-interval", self.flush_interval or "100ms"] + self.extra_args

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class Cluster:
    def __init__(self, root: Path, placements: int = 3, brokers: int = 3,
                 secret: Optional[str] = None):
        self.root = root
        ports = {i: free_port() for i in range(1, placements + 1)}
        self.placements = [PlacementNode(root / f"p{i}", node_id=i, peers=ports)
                           for i in ports]
        placement = ",".join(f"127.0.0.1:{p}" for p in ports.values())
        if S3_URL:
            url = urllib.parse.urlparse(S3_URL)
            store = f"s3://{url.netloc}/{url.path.strip('/')}/{unique_name('cluster')}"
        elif os.environ.get("CI"):
            raise AssertionError("CI is set but SHOAL_TEST_S3_URL is not")
        else:
            store = f"file://{root / 'objects'}"
        self.object_store = store
        self.brokers = [BrokerNode(root / f"b{i}", node_id=i, placement=placement,
                                   object_store=store)
                        for i in range(1, brokers + 1)]
        if secret is not None:
            # Every node presents it; the harness' own calls too.
            for p in self.processes:
                p.env["SHOAL_CLUSTER_SECRET"] = secret
                p.token = secret

    @property
    def processes(self) -> list[Shoal]:
        return [*self.placements, *self.brokers]

    def start(self, brokers: Optional[int] = None) -> "Cluster":
        """Start the placement nodes and the first `brokers` brokers (all by
        default); `add_broker` starts the others later."""
        for p in self.placements:
            p.spawn()
        for p in self.placements:
            wait_for(lambda p=p: p.is_running() and p.health_status() == 200, 60,
                     f"{p.name} to see a leader", interval=0.1)
        for b in self.brokers[:brokers]:
            b.start()
        self._wait_every_broker_listed()
        return self

    def add_broker(self, node_id: int) -> BrokerNode:
        b = self.broker(node_id)
        b.start()
        self._wait_every_broker_listed()
        return b

    def _wait_every_broker_listed(self) -> None:
        running = [b for b in self.brokers if b.is_running()]
        wait_for(lambda: len(self.live_brokers()) == len(running), 30,
                 "every running broker to be live in the leader's view", interval=0.1)
        # ... and in every broker's own view (its next heartbeat).
        from confluent_kafka.admin import AdminClient
        for b in running:
            admin = AdminClient({"bootstrap.servers": b.bootstrap})
            wait_for(lambda: len(admin.list_topics(timeout=5).brokers) == len(running), 30,
                     f"{b.name} to list every running broker", interval=0.1)

    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.brokers if b.is_running())

    def leader(self) -> PlacementNode:
        def find():
            for p in self.placements:
                if p.is_running():
                    try:
                        if p.status()["is_leader"]:
                            return p
                    except Exception:  # noqa: BLE001 - a node may be down
                        continue
            return None
        return wait_for(find, 30, "a placement leader", interval=0.1)

    def view(self) -> dict:
        return self.leader().cluster()

    def live_brokers(self) -> list[int]:
        return [b["info"]["id"] for b in self.view()["brokers"] if b["live"]]

    def owners(self, topic: str) -> dict[int, Optional[int]]:
        for s in self.view()["streams"]:
            if s["name"] == topic:
                return {sh["shard"]: sh["owner"] for sh in s["shards"]}
        return {}

    def broker(self, node_id: int) -> BrokerNode:
        return next(b for b in self.brokers if b.node_id == node_id)

    def stream_index(self, topic: str) -> dict:
        """The placement record of a stream, segments included (via a broker)."""
        for b in self.brokers:
            if b.is_running():
                try:
                    resp = b.http(f"/api/v1/streams/{topic}")
                    if resp.status == 200:
                        return resp.json()
                except Exception:  # noqa: BLE001
                    continue
        raise AssertionError("no broker answered the streams API")

    def cleanup(self) -> None:
        for p in self.processes:
            if p.is_running() and p.proc is not None:
                p.proc.send_signal(signal.SIGCONT)
            p.cleanup()

