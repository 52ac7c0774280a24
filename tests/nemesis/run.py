#!/usr/bin/env python3
"""Jepsen-style nemesis test for Shoal: attack a running Shoal with random
faults for a while, then check every acknowledged write against what
consumers and the Parquet objects show.

    python3 tests/nemesis/run.py --topology standalone-file --seconds 60 --seed 7
    python3 tests/nemesis/run.py --topology cluster --seconds 60 --seed 7 --keep /tmp/nem
    python3 tests/nemesis/run.py --topology cluster --seed 7 --plan   # the faults only

Output: the seed, one line per fault and heal as they happen, one PASS/FAIL
line per check, then the summary line
`N acknowledged, L lost, D duplicated, R reordered, F faults, seed S (...)`.
Exit status 0 only if every check passes. On failure the history (every
send, ack, fault, read and offset commit) is written as JSON and the run
directory with every process log is kept.

Needs root for the cluster (network namespaces) and for the disk-full fault
(a tmpfs per WAL). Binary: target/debug/shoal, or $SHOAL_BIN.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "e2e"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from checks import Check, Judge, RunFacts, final_read, gc_leftovers, parquet_records  # noqa: E402
from faults import Nemesis, ProcessWatch, plan_text, schedule  # noqa: E402
from harness import wait_for  # noqa: E402
from history import History  # noqa: E402
from topology import (ClusterTopology, Topology, cleanup_leftovers, health,  # noqa: E402
                      make_topology, supports_wal_dir, wait_for_binary)
from workload import (GroupMember, OffsetMonitor, OwnershipMonitor, ProducerWorker,  # noqa: E402
                      Reader, Topic, create_topics, default_topics, log_clients_to)

TOPOLOGIES = ("standalone-file", "standalone-s3", "cluster")


def say(msg: str) -> None:
    print(msg, flush=True)


class Run:
    def __init__(self, args: argparse.Namespace, run_dir: Path, stack: contextlib.ExitStack):
        self.args = args
        self.run_dir = run_dir
        self.stack = stack
        self.history = History()
        self.topo: Topology | None = None
        self.ballast: Topic | None = None
        self.stops = {k: threading.Event() for k in ("producers", "consumers", "monitors")}
        self.threads: dict[str, list[threading.Thread]] = {k: [] for k in self.stops}

    def t(self) -> str:
        return f"[{self.history.now():7.2f}s]"

    # ---- phases ------------------------------------------------------------

    def setup(self) -> list[Topic]:
        a = self.args
        source = wait_for_binary(say)
        # The binary may be rebuilt while the run goes on (and a new build
        # may not read the old one's WAL): every start uses this copy.
        binary = self.run_dir / "shoal-bin"
        shutil.copy2(source, binary)
        os.environ["SHOAL_BIN"] = str(binary)
        role = "broker" if a.topology == "cluster" else "standalone"
        # The disk-full fault is part of the contract, not an extra: a run
        # that cannot inject it fails instead of passing without it.
        if not supports_wal_dir(role):
            raise SystemExit(f"`shoal {role} --help` has no --wal-dir: no disk-full fault")
        if os.geteuid() != 0:
            raise SystemExit("the nemesis needs root (a tmpfs WAL disk to fill, network namespaces)")
        wal = True
        log_clients_to(self.run_dir / "clients.log")
        self.history.meta = {"topology": a.topology, "seed": a.seed, "seconds": a.seconds,
                             "rate": a.rate, "binary": source, "wal_dir": wal,
                             "run_dir": str(self.run_dir)}
        self.topo = make_topology(a.topology, self.run_dir, self.stack, a.seed, say, wal)
        started = time.monotonic()
        self.topo.start()
        say(f"{self.t()} {a.topology} up in {time.monotonic() - started:.1f}s: "
            + ", ".join(f"{p.name} (http {p.http_addr})" for p in self.topo.placements)
            + (", " if self.topo.placements else "")
            + ", ".join(f"{b.name} (kafka {b.bootstrap}, http {b.http_addr})" for b in self.topo.brokers))
        topics = default_topics()
        create_topics(self.topo.bootstrap(), topics)
        if wal:
            # large records that push a full WAL disk past its preallocated
            # segments (see faults.py); not part of the checked workload
            self.ballast = Topic("nem-ballast", "local", len(self.topo.brokers))
            create_topics(self.topo.bootstrap(), [self.ballast])
        return topics

    def start_workload(self, topics: list[Topic]) -> list[ProducerWorker]:
        h, a, topo = self.history, self.args, self.topo
        boot = topo.bootstrap
        per = a.rate / 4
        producers = [ProducerWorker(name, name.startswith("idem"), boot, topics, per, h,
                                    self.stops["producers"])
                     for name in ("idem0", "idem1", "plain0", "plain1")]
        group = "nemesis-group"
        members = [GroupMember(i, group, boot, topics, manual_commit=(i == 2), history=h,
                               stop=self.stops["consumers"]) for i in range(3)]
        reader = Reader(boot, topics, h, self.stops["consumers"])
        monitors: list[threading.Thread] = [OffsetMonitor(boot, group, h, self.stops["monitors"])]
        if isinstance(topo, ClusterTopology):
            monitors.append(OwnershipMonitor(topo.ownership, h, self.stops["monitors"]))
        self.threads["producers"] += producers
        self.threads["consumers"] += [*members, reader]
        self.threads["monitors"] += monitors
        for th in [*producers, *members, reader, *monitors]:
            th.start()
        return producers

    def stop_threads(self, kind: str, timeout: float) -> None:
        self.stops[kind].set()
        deadline = time.monotonic() + timeout
        for th in self.threads[kind]:
            th.join(max(0.1, deadline - time.monotonic()))
            if th.is_alive():
                self.history.event("hang", f"{th.name} did not stop within {timeout:.0f}s")

    def wait_healthy(self, timeout: float) -> Check:
        topo = self.topo
        started = time.monotonic()
        last: dict[str, str] = {}
        while True:
            states = {p.name: health(p) for p in topo.processes}
            last = {k: v[1] for k, v in states.items() if not v[0]}
            live = None
            if isinstance(topo, ClusterTopology) and not last:
                try:
                    live = sorted(topo.live_brokers())
                except Exception as e:  # noqa: BLE001
                    live = [repr(e)]
                if live != [1, 2, 3]:
                    last = {"live brokers": str(live)}
            if not last:
                return Check("healthy", True, f"every process healthy {time.monotonic() - started:.1f}s "
                                              f"after the heal")
            if time.monotonic() - started > timeout:
                return Check("healthy", False, f"not healthy {timeout:.0f}s after the heal: {last}")
            time.sleep(0.5)

    def wait_recovered(self, producers: list[ProducerWorker], since: float, topics: list[Topic],
                       timeout: float) -> Check:
        names = {t.name for t in topics}
        started = time.monotonic()
        while True:
            missing = {p.label: sorted(names - p.acked_since(since)) for p in producers}
            missing = {k: v for k, v in missing.items() if v}
            if not missing:
                return Check("recovered", True, f"every producer acknowledged on every topic "
                                                f"{time.monotonic() - started:.1f}s after the heal")
            if time.monotonic() - started > timeout:
                return Check("recovered", False, f"no acknowledgement {timeout:.0f}s after the heal "
                                                 f"for {missing}")
            time.sleep(0.2)

    def wait_flushed(self, topics: list[Topic], timeout: float) -> tuple[Check, dict]:
        want = {(t.name, p) for t in topics for p in range(t.partitions)}
        started = time.monotonic()
        lag: object = None
        views: dict = {}
        while True:
            try:
                views = self.topo.shard_views()
                lag = {f"{k[0]}/{k[1]}": (views[k]["committed_offset"], views[k]["high_watermark"])
                       if k in views else "unknown" for k in sorted(want)
                       if k not in views or views[k]["committed_offset"] != views[k]["high_watermark"]}
            except Exception as e:  # noqa: BLE001
                lag = repr(e)
            if lag == {}:
                total = sum(views[k]["high_watermark"] for k in want)
                return Check("flushed", True, f"{total} records in {len(want)} shards committed to "
                                              f"objects {time.monotonic() - started:.1f}s after the "
                                              f"producers stopped"), views
            if time.monotonic() - started > timeout:
                return Check("flushed", False, f"shards not flushed after {timeout:.0f}s "
                                               f"(committed, high watermark): {lag}"), views
            time.sleep(0.5)

    # ---- the whole run -------------------------------------------------------

    def execute(self) -> bool:
        a, h = self.args, self.history
        topics = self.setup()
        producers = self.start_workload(topics)
        watch = ProcessWatch(self.topo, h, say, self.stops["monitors"])
        self.threads["monitors"].append(watch)
        watch.start()
        nemesis = Nemesis(self.topo, h, say, watch, topics, self.ballast)
        facts = RunFacts(seed=a.seed, faults=0, cluster=isinstance(self.topo, ClusterTopology))
        try:
            wait_for(lambda: all(any(t.name in p.acked_since(0) for p in producers) for t in topics),
                     60, "first acknowledgements on every topic", interval=0.2)
            say(f"{self.t()} workload running ({a.rate:.0f} records/s over {len(topics)} topics, "
                f"{len(producers)} producers, 3 group members, 1 re-reader); faults for {a.seconds:.0f}s")
            h.event("phase", "faults")
            nemesis.run(schedule(a.topology, a.seed), a.seconds)

            say(f"{self.t()} faults over ({nemesis.injected} injected); healing")
            h.event("phase", "heal")
            heal_at = time.monotonic()
            nemesis.heal_all()
            facts.healthy = self.wait_healthy(120)
            facts.recovered = self.wait_recovered(producers, heal_at, topics, 90)
            say(f"{self.t()} stopping producers (flush)")
            h.event("phase", "stop producers")
            self.stop_threads("producers", 240)
            facts.undelivered = {p.label: p.undelivered if p.finished.is_set() else -1
                                 for p in producers}
            facts.fatal_errors = [e for p in producers for e in p.fatal_errors]
            facts.flushed, _ = self.wait_flushed(topics, 90)
            h.event("phase", "stop consumers")
            self.stop_threads("consumers", 60)
            self.stop_threads("monitors", 30)
            watch.check()
            facts.crashes = list(watch.crashes)
            facts.faults = sum(1 for f in h.faults if "skipped" not in f)

            say(f"{self.t()} reading everything back")
            h.event("phase", "final read")
            final, marks, facts.read_errors = final_read(self.topo.bootstrap(), topics, h)
            say(f"{self.t()} consumed {sum(len(r) for r in final.values())} records")
            views = self.topo.shard_views()
            parquet, problems = None, []
            try:
                parquet, problems, n_objects = parquet_records(self.topo, views, topics)
                say(f"{self.t()} read {n_objects} Parquet objects")
            except Exception as e:  # noqa: BLE001
                facts.parquet_error = repr(e)
            say(f"{self.t()} watching garbage collection")
            try:
                facts.gc = gc_leftovers(self.topo)
            except Exception as e:  # noqa: BLE001
                facts.gc = Check("gc-leaves-only-referenced-objects", False, f"not checked: {e!r}")
            checks, counts = Judge(h, topics, facts, final, marks, views, parquet, problems).run()
        finally:
            for kind in ("producers", "consumers", "monitors"):
                self.stops[kind].set()

        for c in checks:
            say(c.line())
        ok = all(c.ok for c in checks)
        say(counts.summary(a.seed))
        if not ok or a.history:
            path = Path(a.history) if a.history else self.run_dir / "history.json"
            h.dump(path)
            say(f"history: {path}")
        if not ok:
            say("process logs:")
            for p in [*self.topo.log_paths(), self.run_dir / "clients.log"]:
                say(f"  {p}")
        return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", choices=TOPOLOGIES)
    ap.add_argument("--seconds", type=float, default=60, help="how long to inject faults")
    ap.add_argument("--seed", type=int, default=None, help="fault schedule seed (random if unset)")
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (logs, data)")
    ap.add_argument("--history", metavar="PATH", help="write the history JSON here (always)")
    ap.add_argument("--rate", type=float, default=400, help="records/s over all producers")
    ap.add_argument("--plan", action="store_true", help="print the fault schedule and exit")
    ap.add_argument("--cleanup", metavar="DIR",
                    help="release what a run that died left behind in its run dir DIR "
                         "(processes, mounts, namespaces, addresses) and exit")
    args = ap.parse_args(argv)
    if args.topology is None and args.cleanup is None:
        ap.error("--topology is required")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1 << 31)
    return args


def main(argv: list[str] | None = None) -> int:
    # librdkafka asserts abort the process: show every thread's Python stack
    faulthandler.enable(all_threads=True)
    args = parse_args(argv)
    if args.cleanup:
        for line in cleanup_leftovers(Path(args.cleanup)):
            say(f"cleanup: {line}")
        return 0
    say(f"seed {args.seed}")
    if args.plan:
        say(plan_text(args.topology, args.seed, args.seconds))
        return 0
    if os.geteuid() != 0 and args.topology == "cluster":
        say("the cluster topology needs root (network namespaces, addresses on lo)")
        return 2
    if args.keep:
        run_dir = Path(args.keep).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = Path(tempfile.mkdtemp(prefix=f"shoal-nemesis-{args.topology}-"))

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    # even when started with SIGINT ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    started = time.monotonic()
    ok, rc, run = False, 1, None
    try:
        with contextlib.ExitStack() as stack:
            run = Run(args, run_dir, stack)
            ok = run.execute()
            rc = 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted; cleaned up")
        rc = 130
    except Exception:
        import traceback
        traceback.print_exc()
        rc = 2
        if run is not None:
            path = Path(args.history) if args.history else run_dir / "history.json"
            run.history.dump(path)
            say(f"the nemesis run itself failed; history: {path}")
    finally:
        if ok and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(f"run dir: {run_dir}")
        say(f"wall time {time.monotonic() - started:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
