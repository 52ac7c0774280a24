"""The fault schedule and the nemesis that carries it out.

The schedule is a pure function of (topology, seed): the same seed gives the
same faults with the same parameters in the same order (how many of them fit
in the run depends on how fast restarts are). Its first faults are every
kind once, in a seeded order, so that a long run covers everything; after
that kinds are drawn by weight.

Faults run one at a time, each healed before the next, except
kill-two-placements, which deliberately takes two of the three placement
nodes (the Raft majority) down together.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from clients import ck_config  # tests/e2e
from harness import Shoal  # tests/e2e
from history import History
from topology import ClusterTopology, Topology, wait_for_binary
from workload import Topic

#: relative weights of the fault kinds after the first round
WEIGHTS = {
    "standalone-file": {"kill": 3, "pause": 2, "disk-full": 2},
    "standalone-s3": {"kill": 3, "pause": 2, "disk-full": 1.5, "s3-errors": 2, "s3-latency": 2,
                      "s3-outage": 0.7},
    "cluster": {"kill-broker": 3, "kill-placement": 2, "kill-two-placements": 1,
                "pause-broker": 2, "cut-broker": 2, "disk-full": 1.5, "s3-errors": 1.5,
                "s3-latency": 1.5, "s3-outage": 0.5},
}


@dataclass
class FaultSpec:
    kind: str
    params: dict = field(default_factory=dict)
    gap: float = 2.0  # quiet seconds before the fault

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind} {args}".strip()


def _u(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 2)


def _params(kind: str, rng: random.Random) -> dict:
    if kind == "kill":
        return {"restart_after": _u(rng, 0, 3)}
    if kind == "pause":
        return {"seconds": _u(rng, 1, 5)}
    if kind == "disk-full":
        return {"broker": rng.randrange(3), "hold": _u(rng, 2, 6)}
    if kind == "s3-errors":
        return {"seconds": _u(rng, 5, 15)}
    if kind == "s3-latency":
        return {"seconds": _u(rng, 5, 12), "delay": _u(rng, 0.5, 2.0)}
    if kind == "s3-outage":
        return {"seconds": _u(rng, 25, 35)}
    if kind == "kill-broker":
        return {"broker": rng.randrange(3), "restart_after": _u(rng, 0, 3)}
    if kind == "kill-placement":
        return {"target": "leader" if rng.random() < 0.5 else rng.randrange(3),
                "restart_after": _u(rng, 0, 3)}
    if kind == "kill-two-placements":
        return {"first": "leader" if rng.random() < 0.5 else rng.randrange(3),
                "second_offset": rng.randrange(1, 3), "between": _u(rng, 0, 2),
                "restart_after": _u(rng, 0, 3)}
    if kind == "pause-broker":
        # past the session timeout half of the time
        long = rng.random() < 0.5
        return {"broker": rng.randrange(3), "seconds": _u(rng, 7, 12) if long else _u(rng, 1, 4)}
    if kind == "cut-broker":
        broker, seconds = rng.randrange(3), _u(rng, 3, 12)
        # Black-holed (packets vanish, connections hang) or refused
        # (connections fail at once). Derived from the other parameters, not
        # drawn, so that every seed keeps the schedule it had (CI's seeds 14
        # and 2407 get one of each).
        mode = "refuse" if (broker + round(seconds * 100)) % 2 else "blackhole"
        return {"broker": broker, "seconds": seconds, "mode": mode}
    raise ValueError(kind)


def schedule(topology: str, seed: int, count: int = 300) -> list[FaultSpec]:
    rng = random.Random(f"shoal-nemesis/{topology}/{seed}")
    weights = WEIGHTS[topology]
    kinds = sorted(weights)
    rng.shuffle(kinds)
    specs = []
    for i in range(count):
        if i < len(kinds):
            kind = kinds[i]
        else:
            kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        specs.append(FaultSpec(kind, _params(kind, rng), gap=_u(rng, 1, 4)))
    return specs


class ProcessWatch(threading.Thread):
    """Notices processes that exit without the nemesis having killed them."""

    def __init__(self, topo: Topology, history: History, say: Callable[[str], None],
                 stop: threading.Event):
        super().__init__(name="process-watch", daemon=True)
        self.topo = topo
        self.history = history
        self.say = say
        self.stop = stop
        self.lock = threading.Lock()
        self.expected_down: set[str] = set()
        self.crashes: list[dict] = []
        self._reported: set[tuple[str, int]] = set()

    def expect_down(self, p: Shoal) -> None:
        with self.lock:
            self.expected_down.add(p.name)

    def expect_up(self, p: Shoal) -> None:
        with self.lock:
            self.expected_down.discard(p.name)

    def crash(self, p: Shoal, what: str) -> None:
        doc = {"t": self.history.now(), "process": p.name, "what": what,
               "log": str(p.log_path), "log_tail": p.log_tail(40)}
        with self.lock:
            self.crashes.append(doc)
        self.history.event("crash", f"{p.name}: {what}")
        self.say(f"[{doc['t']:7.2f}s] CRASH {p.name}: {what} (log {p.log_path})")

    def check(self) -> None:
        for p in self.topo.processes:
            if p.proc is None or p.proc.poll() is None:
                continue
            with self.lock:
                if p.name in self.expected_down or (p.name, p.starts) in self._reported:
                    continue
                self._reported.add((p.name, p.starts))
            self.crash(p, f"exited by itself with code {p.proc.returncode}")

    def run(self) -> None:
        while not self.stop.wait(0.3):
            self.check()


#: Ballast record size and cap: the WAL preallocates 64 MiB segments (and
#: spares) and reuses flushed ones, so a full disk refuses writes only once a
#: burst has outrun the flusher through the preallocated segments; the cap
#: is beyond the WAL tmpfs (256 MiB).
BALLAST_RECORD = 256 * 1024
BALLAST_CAP = 320 * 1024 * 1024


class Nemesis:
    def __init__(self, topo: Topology, history: History, say: Callable[[str], None],
                 watch: ProcessWatch, topics: list[Topic], ballast: Topic | None = None):
        self.topo = topo
        self.history = history
        self.say = say
        self.watch = watch
        self.topics = topics
        self.ballast = ballast
        self.injected = 0
        self.findings: list[str] = []

    # ---- helpers -----------------------------------------------------------

    def _line(self, verb: str, doc: dict, text: str) -> None:
        self.say(f"[{self.history.now():7.2f}s] {verb} #{doc['id']} {doc['kind']}: {text}")

    def _restart(self, procs: list[Shoal], timeout: float = 90.0) -> str:
        """Start processes that are down (all spawned first: two placement
        nodes need each other) and wait for /health 200."""
        wait_for_binary(self.say)
        started = time.monotonic()
        for p in procs:
            if not p.is_running():
                p.spawn()
        notes = []
        for p in procs:
            deadline = time.monotonic() + timeout
            while True:
                if p.proc.poll() is not None:
                    what = f"restart failed: exited with code {p.proc.returncode}"
                    self.findings.append(f"{p.name}: {what}")
                    self.watch.crash(p, what)
                    notes.append(f"{p.name} FAILED to restart")
                    break
                try:
                    if p.http("/health", timeout=2).status == 200:
                        self.watch.expect_up(p)
                        notes.append(f"{p.name} up after {time.monotonic() - started:.1f}s")
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                if time.monotonic() > deadline:
                    self.findings.append(f"{p.name}: not healthy {timeout:.0f}s after restart")
                    self.watch.crash(p, f"not healthy {timeout:.0f}s after restart")
                    notes.append(f"{p.name} NOT healthy after {timeout:.0f}s")
                    break
                time.sleep(0.1)
        return ", ".join(notes)

    def _kill(self, p: Shoal) -> None:
        self.watch.expect_down(p)
        p.kill9()

    def revive(self) -> list[str]:
        """Restart whatever is down (crashed, or failed to restart earlier)."""
        down = [p for p in self.topo.processes if not p.is_running()]
        if not down:
            return []
        for p in down:
            self.watch.expect_down(p)
        note = self._restart(down)
        self.history.event("revive", note)
        self.say(f"[{self.history.now():7.2f}s] revived: {note}")
        return [p.name for p in down]

    def _loss_snapshot(self, doc: dict, broker: Shoal) -> None:
        """Which shards the victim owns and what was committed, just before a
        broker fault: bounds the `local` records it may legitimately lose."""
        doc["victim"] = broker.node_id
        owners = None
        try:
            owners = self.topo.ownership()
        except Exception:  # noqa: BLE001
            pass
        if owners is None:
            owners = self.history.owners_at(self.history.now()) or {}
        doc["owned"] = sorted(k for k, (owner, _epoch) in owners.items() if owner == broker.node_id)
        try:
            doc["committed_at_fault"] = self.topo.committed_offsets()
        except Exception as e:  # noqa: BLE001
            doc["committed_at_fault"] = None
            doc["committed_error"] = repr(e)

    def _read_probe(self, seconds: float) -> dict:
        """During a disk-full fault reads must keep working: read the first
        record of every partition that has one."""
        started = time.monotonic()
        c = Consumer(ck_config(self.topo.bootstrap(), **{
            "group.id": "nemesis-probe", "enable.auto.commit": False,
            "enable.partition.eof": True}))
        try:
            want = set()
            for t in self.topics:
                for p in range(t.partitions):
                    _lo, hi = c.get_watermark_offsets(TopicPartition(t.name, p), timeout=5)
                    if hi > 0:
                        want.add((t.name, p))
            c.assign([TopicPartition(t, p, 0) for t, p in sorted(want)])
            got = set()
            deadline = started + seconds
            while got != want and time.monotonic() < deadline:
                for m in c.consume(num_messages=100, timeout=0.5):
                    if m.error() is None:
                        got.add((m.topic(), m.partition()))
                    elif m.error().code() != KafkaError._PARTITION_EOF:
                        pass
            return {"ok": got == want, "partitions": len(want), "read": len(got),
                    "seconds": round(time.monotonic() - started, 2)}
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": repr(e), "seconds": round(time.monotonic() - started, 2)}
        finally:
            c.close()

    # ---- the run -----------------------------------------------------------

    def run(self, specs: list[FaultSpec], seconds: float) -> None:
        started = time.monotonic()
        for spec in specs:
            time.sleep(spec.gap)
            if time.monotonic() - started >= seconds:
                break
            self.revive()
            doc = self.history.fault({"kind": spec.kind, "params": spec.params,
                                      "start": self.history.now()})
            if spec.kind not in self.topo.fault_kinds:
                raise ValueError(f"{spec.kind} is not a fault of {self.topo.name}")
            self.injected += 1
            try:
                getattr(self, "_fault_" + spec.kind.replace("-", "_"))(doc, **spec.params)
            except Exception as e:  # noqa: BLE001 - report and go on
                doc["error"] = repr(e)
                self._line("ERROR", doc, repr(e))
            finally:
                doc.setdefault("end", self.history.now())

    def heal_all(self) -> None:
        """Undo every fault that may still be in place."""
        for p in self.topo.processes:
            if p.is_running():
                os.kill(p.pid, signal.SIGCONT)
        if isinstance(self.topo, ClusterTopology):
            for b in (1, 2, 3):
                self.topo.net.uncut(b)
        if self.topo.s3 is not None:
            self.topo.s3.all_clear()
        for disk in self.topo.disks.values():
            disk.drain()
        self.revive()

    # ---- faults: every topology ---------------------------------------------

    def _ballast_partition(self, victim: Shoal) -> int | None:
        if self.ballast is None:
            return None
        if not isinstance(self.topo, ClusterTopology):
            return 0
        owners = self.topo.ownership() or {}
        for p in range(self.ballast.partitions):
            owner = owners.get(f"{self.ballast.name}/{p}")
            if owner is not None and owner[0] == victim.node_id:
                return p
        return None

    def _ballast_burst(self, partition: int, cap: int, seconds: float) -> dict:
        """Large records into the victim's WAL until the broker refuses one
        (or `cap` bytes were acknowledged, or `seconds` passed)."""
        state = {"acked": 0, "errors": {}, "codes": set(), "fatal": False}

        def delivered(err, _msg):
            if err is None:
                state["acked"] += 1
            else:
                state["errors"][str(err)] = state["errors"].get(str(err), 0) + 1
                state["codes"].add(err.code())
                state["fatal"] |= err.fatal()

        p = Producer(ck_config(self.topo.bootstrap(), **{
            "acks": "all", "enable.idempotence": False, "retries": 0, "linger.ms": 5,
            "message.timeout.ms": 20000}))
        # As fast as the client goes: a burst the flusher cannot keep up with
        # fills the WAL's segments before they can be reused.
        started, sent, value = time.monotonic(), 0, bytes(BALLAST_RECORD)
        while (not state["errors"] and sent * BALLAST_RECORD < cap
               and time.monotonic() - started < seconds):
            try:
                p.produce(self.ballast.name, value=value, partition=partition, on_delivery=delivered)
                sent += 1
                p.poll(0)
            except BufferError:
                p.poll(0.05)
        left = p.flush(30)
        return {"sent": sent, "acked": state["acked"], "acked_mib": state["acked"] * BALLAST_RECORD >> 20,
                "errors": state["errors"], "codes": sorted(state["codes"]), "fatal": state["fatal"],
                "undelivered": left, "seconds": round(time.monotonic() - started, 2)}

    def _disk_full_victim(self, broker: int) -> Shoal:
        """In a cluster, the owner of ballast partition `broker` (so the
        burst lands in the full WAL), else broker number `broker`."""
        brokers = self.topo.brokers
        if isinstance(self.topo, ClusterTopology) and self.ballast is not None:
            owner = (self.topo.ownership() or {}).get(
                f"{self.ballast.name}/{broker % self.ballast.partitions}")
            for b in brokers:
                if owner is not None and b.node_id == owner[0]:
                    return b
        return brokers[broker % len(brokers)]

    def _fault_disk_full(self, doc: dict, hold: float, broker: int = 0) -> None:
        victim = self._disk_full_victim(broker)
        disk = self.topo.disks.get(victim.name)
        doc["victim_process"] = victim.name
        if disk is None:
            doc["skipped"] = "the binary has no --wal-dir"
            self._line("skip ", doc, "disk-full fault unavailable (shoal has no --wal-dir)")
            return
        partition = self._ballast_partition(victim)
        written = disk.fill()
        doc["filled_bytes"] = written
        self._line("fault", doc, f"{victim.name}'s WAL tmpfs filled ({written >> 20} MiB filler, "
                                 f"{disk.free_bytes()} bytes free) for {hold}s")
        t0 = time.monotonic()
        if partition is not None:
            # The WAL writes into preallocated segments: push it past them.
            doc["ballast"] = self._ballast_burst(partition, BALLAST_CAP, max(hold, 10.0))
        doc["read_probe"] = self._read_probe(min(10.0, max(hold, 3.0)))
        rest = hold - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        disk.drain()
        doc["end"] = self.history.now()
        if partition is not None:
            doc["writes_back_after"] = self._writes_back(partition, 30.0)
        self._line("heal ", doc, f"filler removed; ballast {doc.get('ballast')}; reads during the hold "
                                 f"{doc['read_probe']}; writes accepted again after "
                                 f"{doc.get('writes_back_after')}s")

    def _writes_back(self, partition: int, timeout: float) -> float | None:
        """Seconds until the victim takes a write again after the disk
        emptied, or None."""
        started = time.monotonic()
        p = Producer(ck_config(self.topo.bootstrap(), **{
            "acks": "all", "enable.idempotence": False, "retries": 0, "message.timeout.ms": 5000}))
        while time.monotonic() - started < timeout:
            result = []
            p.produce(self.ballast.name, value=b"probe", partition=partition,
                      on_delivery=lambda err, _m: result.append(err))
            p.flush(6)
            if result and result[0] is None:
                return round(time.monotonic() - started, 2)
            time.sleep(0.25)
        return None

    def _fault_s3_errors(self, doc: dict, seconds: float) -> None:
        proxy = self.topo.s3.proxy
        before = dict(proxy.counts)
        proxy.enabled = True
        self._line("fault", doc, f"object store errors/drops/delays on for {seconds}s")
        time.sleep(seconds)
        proxy.enabled = False
        doc["end"] = self.history.now()
        done = {k: proxy.counts[k] - before.get(k, 0) for k in proxy.counts}
        doc["proxy_counts"] = done
        self._line("heal ", doc, f"object store errors off ({done})")

    def _fault_s3_latency(self, doc: dict, seconds: float, delay: float) -> None:
        proxy = self.topo.s3.proxy
        proxy.latency = delay
        self._line("fault", doc, f"every object store request delayed {delay}s for {seconds}s")
        time.sleep(seconds)
        proxy.latency = 0.0
        doc["end"] = self.history.now()
        self._line("heal ", doc, "object store latency back to normal")

    def _fault_s3_outage(self, doc: dict, seconds: float) -> None:
        proxy = self.topo.s3.proxy
        proxy.down = True
        self._line("fault", doc, f"object store down (connections dropped) for {seconds}s")
        time.sleep(seconds)
        proxy.down = False
        doc["end"] = self.history.now()
        self._line("heal ", doc, "object store back")

    # ---- faults: standalone -------------------------------------------------

    def _fault_kill(self, doc: dict, restart_after: float) -> None:
        p = self.topo.brokers[0]
        pid = p.pid
        self._kill(p)
        self._line("fault", doc, f"{p.name} (pid {pid}) killed with SIGKILL; restart in {restart_after}s")
        time.sleep(restart_after)
        note = self._restart([p])
        doc["end"] = self.history.now()
        self._line("heal ", doc, note)

    def _fault_pause(self, doc: dict, seconds: float) -> None:
        p = self.topo.brokers[0]
        os.kill(p.pid, signal.SIGSTOP)
        self._line("fault", doc, f"{p.name} (pid {p.pid}) stopped (SIGSTOP) for {seconds}s")
        time.sleep(seconds)
        os.kill(p.pid, signal.SIGCONT)
        doc["end"] = self.history.now()
        self._line("heal ", doc, f"{p.name} continued (SIGCONT)")

    # ---- faults: cluster ------------------------------------------------------

    def _placement(self, target) -> Shoal:
        topo: ClusterTopology = self.topo  # type: ignore[assignment]
        if target == "leader":
            leader = topo.leader()
            if leader is not None:
                return leader
            target = 0
        return topo.placements[int(target) % len(topo.placements)]

    def _fault_kill_broker(self, doc: dict, broker: int, restart_after: float) -> None:
        b = self.topo.brokers[broker]
        self._loss_snapshot(doc, b)
        pid = b.pid
        self._kill(b)
        self._line("fault", doc, f"{b.name} (pid {pid}, owner of {len(doc['owned'])} shards) killed "
                                 f"with SIGKILL; restart in {restart_after}s")
        time.sleep(restart_after)
        note = self._restart([b])
        doc["end"] = self.history.now()
        self._line("heal ", doc, note)

    def _fault_kill_placement(self, doc: dict, target, restart_after: float) -> None:
        p = self._placement(target)
        was_leader = p is self.topo.leader()
        doc["victim_process"] = p.name
        doc["was_leader"] = was_leader
        pid = p.pid
        self._kill(p)
        self._line("fault", doc, f"{p.name}{' (Raft leader)' if was_leader else ''} (pid {pid}) "
                                 f"killed with SIGKILL; restart in {restart_after}s")
        time.sleep(restart_after)
        note = self._restart([p])
        doc["end"] = self.history.now()
        self._line("heal ", doc, note)

    def _fault_kill_two_placements(self, doc: dict, first, second_offset: int, between: float,
                                   restart_after: float) -> None:
        placements = self.topo.placements
        p1 = self._placement(first)
        p2 = placements[(placements.index(p1) + second_offset) % len(placements)]
        doc["victim_processes"] = [p1.name, p2.name]
        was_leader = p1 is self.topo.leader()
        self._kill(p1)
        self._line("fault", doc, f"{p1.name}{' (Raft leader)' if was_leader else ''} killed; "
                                 f"{p2.name} follows in {between}s (majority lost), both restart "
                                 f"{restart_after}s later")
        time.sleep(between)
        self._kill(p2)
        time.sleep(restart_after)
        note = self._restart([p1, p2])
        doc["end"] = self.history.now()
        self._line("heal ", doc, note)

    def _fault_pause_broker(self, doc: dict, broker: int, seconds: float) -> None:
        b = self.topo.brokers[broker]
        self._loss_snapshot(doc, b)
        b.pause()
        self._line("fault", doc, f"{b.name} (pid {b.pid}, owner of {len(doc['owned'])} shards) "
                                 f"stopped (SIGSTOP) for {seconds}s")
        time.sleep(seconds)
        b.resume()
        doc["end"] = self.history.now()
        self._line("heal ", doc, f"{b.name} continued (SIGCONT)")

    def _fault_cut_broker(self, doc: dict, broker: int, seconds: float,
                          mode: str = "blackhole") -> None:
        topo: ClusterTopology = self.topo  # type: ignore[assignment]
        b = topo.brokers[broker]
        self._loss_snapshot(doc, b)
        topo.net.cut(b.node_id, mode)
        self._line("fault", doc, f"{b.name} (owner of {len(doc['owned'])} shards) cut off from "
                                 f"placement ({mode} {topo.net.placement_ip}) for {seconds}s")
        time.sleep(seconds)
        topo.net.uncut(b.node_id)
        doc["end"] = self.history.now()
        self._line("heal ", doc, f"{b.name} reconnected to placement")


def plan_text(topology: str, seed: int, seconds: float) -> str:
    """The faults a run of `seconds` would inject (estimating each restart at
    ~3 s), for choosing seeds."""
    lines, t = [], 0.0
    for spec in schedule(topology, seed):
        t += spec.gap
        if t >= seconds:
            break
        lines.append(f"~{t:6.1f}s {spec.describe()}")
        p = spec.params
        t += p.get("seconds", 0) + p.get("hold", 0) + p.get("restart_after", 0) + p.get("between", 0)
        if "restart_after" in p:
            t += 3
    return "\n".join(lines)
