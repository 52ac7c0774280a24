"""The record of a nemesis run: every send, delivery report, fault, consumer
read, offset commit and ownership change, with times relative to the start
of the run. The checker works from it, and it is written out as JSON when a
check fails so that the run can be studied afterwards.

Everything is appended from many threads (producers' delivery callbacks,
consumers, monitors, the nemesis), so every method takes the lock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Optional


def text(value: Optional[bytes]) -> Optional[str]:
    """Record values as text: the workload writes ASCII; anything else (a
    corrupted record) stays visible through backslash escapes."""
    if value is None:
        return None
    return value.decode("utf-8", errors="backslashreplace")


class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.meta: dict[str, Any] = {}
        # [t, producer, topic, partition, value]
        self.sends: list[list] = []
        # [t, producer, topic, partition, offset, value, error, retriable, fatal, code]
        self.acks: list[list] = []
        # dicts with id, kind, start, end and the details of the fault
        self.faults: list[dict] = []
        # [t, source, topic, partition, offset, value]: the first read of
        # every offset and every read that disagreed with it; reads that
        # agree are only counted (the re-reader reads everything from 0 on
        # every pass, which would grow without bound in a long run)
        self.reads: list[list] = []
        self.agreeing_reads = 0
        # dicts: reader passes (topic, start, end, high watermarks, complete)
        self.read_passes: list[dict] = []
        # [t, member, topic, partition, offset, error] from on_commit callbacks
        self.commits: list[list] = []
        # [t, {"topic/partition": offset}] from list_consumer_group_offsets
        self.group_offsets: list[list] = []
        # [t, {"topic/partition": [owner, epoch]}], recorded when it changes
        self.ownership: list[list] = []
        # [t, kind, text]: phases, process exits, client errors
        self.events: list[list] = []
        # (topic, partition, offset) -> (value, t, source): the first value
        # ever read at each offset, and every disagreement with it.
        self.seen: dict[tuple[str, int, int], tuple[Optional[str], float, str]] = {}
        self.conflicts: list[dict] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    # ---- recording ---------------------------------------------------------

    def send(self, producer: str, topic: str, partition: int, value: str) -> None:
        t = self.now()
        with self.lock:
            self.sends.append([t, producer, topic, partition, value])

    def ack(self, producer: str, topic: str, partition: int, offset: int, value: str,
            error: Optional[str] = None, retriable: bool = False, fatal: bool = False,
            code: Optional[int] = None) -> None:
        t = self.now()
        with self.lock:
            self.acks.append([t, producer, topic, partition, offset, value, error,
                              retriable, fatal, code])

    def read(self, source: str, topic: str, partition: int, offset: int,
             value: Optional[bytes]) -> None:
        """A record a consumer saw; remembers the first value per offset and
        records any later read that disagrees with it."""
        t = self.now()
        v = text(value)
        key = (topic, partition, offset)
        with self.lock:
            first = self.seen.get(key)
            if first is not None and first[0] == v:
                self.agreeing_reads += 1
                return
            self.reads.append([t, source, topic, partition, offset, v])
            if first is None:
                self.seen[key] = (v, t, source)
            else:
                self.conflicts.append({
                    "topic": topic, "partition": partition, "offset": offset,
                    "first": {"value": first[0], "t": first[1], "source": first[2]},
                    "then": {"value": v, "t": t, "source": source},
                })

    def read_pass(self, doc: dict) -> None:
        with self.lock:
            self.read_passes.append(doc)

    def commit(self, member: str, topic: str, partition: int, offset: int,
               error: Optional[str]) -> None:
        t = self.now()
        with self.lock:
            self.commits.append([t, member, topic, partition, offset, error])

    def group_offset_snapshot(self, offsets: dict[str, int]) -> None:
        t = self.now()
        with self.lock:
            self.group_offsets.append([t, offsets])

    def ownership_snapshot(self, owners: dict[str, list]) -> bool:
        """Record the shard owners if they differ from the last snapshot;
        returns whether they did."""
        t = self.now()
        with self.lock:
            if self.ownership and self.ownership[-1][1] == owners:
                return False
            self.ownership.append([t, owners])
            return True

    def fault(self, doc: dict) -> dict:
        with self.lock:
            doc.setdefault("id", len(self.faults) + 1)
            self.faults.append(doc)
        return doc

    def event(self, kind: str, message: str) -> None:
        t = self.now()
        with self.lock:
            self.events.append([t, kind, message])

    # ---- queries -----------------------------------------------------------

    def snapshot_acks(self) -> list[list]:
        with self.lock:
            return list(self.acks)

    def owners_at(self, t: float) -> Optional[dict[str, list]]:
        """The last ownership snapshot taken at or before `t`."""
        with self.lock:
            last = None
            for ts, owners in self.ownership:
                if ts > t:
                    break
                last = owners
            return last

    # ---- output ------------------------------------------------------------

    def dump(self, path: Path) -> None:
        with self.lock:
            doc = {
                "meta": self.meta,
                "started_unix": self.wall0,
                "time_unit": "seconds since started_unix (monotonic)",
                "faults": self.faults,
                "sends": self.sends,
                "sends_columns": ["t", "producer", "topic", "partition", "value"],
                "acks": self.acks,
                "acks_columns": ["t", "producer", "topic", "partition", "offset", "value",
                                 "error", "retriable", "fatal", "code"],
                "reads": self.reads,
                "reads_columns": ["t", "source", "topic", "partition", "offset", "value"],
                "reads_note": "the first read of every offset and every read that disagreed with "
                              "it; agreeing repeats are counted in agreeing_reads",
                "agreeing_reads": self.agreeing_reads,
                "read_passes": self.read_passes,
                "commits": self.commits,
                "commits_columns": ["t", "member", "topic", "partition", "offset", "error"],
                "group_offsets": self.group_offsets,
                "ownership": self.ownership,
                "events": self.events,
                "conflicts": self.conflicts,
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f)
