"""After the faults are healed: read every partition back, read the live
Parquet row groups, and judge the history.

Each check yields `PASS name: detail` or `FAIL name: detail`; the counters
make the summary line.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import duckdb

from clients import ck_config, ck_consume_all  # tests/e2e
from confluent_kafka import Consumer, TopicPartition
from history import History, text
from topology import COMPACTION, Topology
from workload import Topic, parse_value

TP = tuple[str, int]

#: A kill -9 or SIGSTOP cannot be followed by new acknowledgements from the
#: victim, but a response already on the wire can reach the client shortly
#: after the signal: acks this soon after a fault count as before it.
SIGNAL_GRACE = 1.0
#: How long after a broker fault ends its shards' moving away is still
#: attributed to it.
MOVE_WINDOW = 15.0
#: The cluster's session timeout (`shoal placement --session-timeout`'s
#: default): placement gives a broker's shards away only after this long
#: without a heartbeat.
SESSION_TIMEOUT = 6.0
#: The shortest broker fault that can have lasted a session timeout for
#: placement: the broker's silence is at most the fault (a kill's restart
#: included, until the first heartbeat) plus one heartbeat interval (0.5 s),
#: and 0.5 s of slack. A shorter fault cannot explain a lost record, even if
#: the shard moved for another reason (a handoff commits everything first).
FAILOVER_FAULT = SESSION_TIMEOUT - 1.0

#: Kafka protocol error codes that are retriable (a RetriableException in
#: Kafka's Errors). librdkafka's KafkaError.retriable() cannot be used for
#: delivery reports: with retries=0 it reports e.g. REQUEST_TIMED_OUT as not
#: retriable.
RETRIABLE_CODES = {
    2,   # CORRUPT_MESSAGE
    3,   # UNKNOWN_TOPIC_OR_PARTITION
    5,   # LEADER_NOT_AVAILABLE
    6,   # NOT_LEADER_OR_FOLLOWER
    7,   # REQUEST_TIMED_OUT
    13,  # NETWORK_EXCEPTION
    14,  # COORDINATOR_LOAD_IN_PROGRESS
    15,  # COORDINATOR_NOT_AVAILABLE
    16,  # NOT_COORDINATOR
    19,  # NOT_ENOUGH_REPLICAS
    20,  # NOT_ENOUGH_REPLICAS_AFTER_APPEND
    41,  # NOT_CONTROLLER
    51,  # CONCURRENT_TRANSACTIONS
    56,  # KAFKA_STORAGE_ERROR
    70,  # FETCH_SESSION_ID_NOT_FOUND
    71,  # INVALID_FETCH_SESSION_EPOCH
    74,  # FENCED_LEADER_EPOCH
    75,  # UNKNOWN_LEADER_EPOCH
    78,  # OFFSET_NOT_AVAILABLE
    80,  # PREFERRED_LEADER_NOT_AVAILABLE
    83,  # ELIGIBLE_LEADERS_NOT_AVAILABLE
    88,  # UNSTABLE_OFFSET_COMMIT
    89,  # THROTTLING_QUOTA_EXCEEDED
    100,  # UNKNOWN_TOPIC_ID
}


#: librdkafka's sign of a broker that lost acknowledged records (or took a
#: sequence out of order): the idempotent producer turns fatal.
OUT_OF_ORDER_SEQUENCE = 45


def hard_broker_error(code: Optional[int]) -> bool:
    """An error the broker returned (code > 0) that a client must not retry.
    Negative codes are librdkafka's own (transport failure, timeout, ...)."""
    return code is not None and code > 0 and code not in RETRIABLE_CODES


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class Counts:
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    faults: int = 0
    allowed_local_losses: int = 0
    misplaced: int = 0
    unacked_written: int = 0
    failed_sends: int = 0
    allowed_rewrites: int = 0

    def summary(self, seed: int) -> str:
        return (f"{self.acknowledged} acknowledged, {self.lost} lost, {self.duplicated} duplicated, "
                f"{self.reordered} reordered, {self.faults} faults, seed {seed}"
                f" ({self.allowed_local_losses} allowed local-window losses, "
                f"{self.allowed_rewrites} allowed local-window offset rewrites, "
                f"{self.misplaced} at another offset, {self.failed_sends} failed sends, "
                f"{self.unacked_written} of them written anyway)")


def examples(items, n: int = 5) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


# --------------------------------------------------------------------------
# reading back


def final_read(bootstrap: str, topics: list[Topic], history: History, attempts: int = 3
               ) -> tuple[dict[TP, list[tuple[int, str]]], dict[TP, tuple[int, int]], list[str]]:
    """Every partition from offset 0 to its high watermark. Returns
    ({(topic, partition): [(offset, value)]}, {(topic, partition): (low, high)}, errors)."""
    records: dict[TP, list[tuple[int, str]]] = {}
    marks: dict[TP, tuple[int, int]] = {}
    errors: list[str] = []
    c = Consumer(ck_config(bootstrap, **{"group.id": "nemesis-final", "enable.auto.commit": False}))
    try:
        for t in topics:
            for p in range(t.partitions):
                marks[(t.name, p)] = c.get_watermark_offsets(TopicPartition(t.name, p), timeout=30)
    finally:
        c.close()
    def read_topic(t: Topic):
        for attempt in range(attempts):
            try:
                return ck_consume_all(bootstrap, t.name, range(t.partitions), timeout=180)
            except Exception as e:  # noqa: BLE001 - retried, then reported
                errors.append(f"{t.name} attempt {attempt + 1}: {e}")
                time.sleep(2)
        return None

    # cold reads of many small row groups are slow: one reader per topic
    with ThreadPoolExecutor(max_workers=len(topics)) as pool:
        results = list(pool.map(read_topic, topics))
    for t, got in zip(topics, results):
        for p in range(t.partitions):
            msgs = (got or {}).get(p, [])
            records[(t.name, p)] = [(m.offset(), text(m.value())) for m in msgs]
            for m in msgs:
                history.read("final", t.name, p, m.offset(), m.value())
    return records, marks, errors


def gc_leftovers(topo: Topology, watch: float = 25.0, limit: float = 120.0) -> Check:
    """Garbage collection keeps the bucket to what placement references.
    An object is overdue once it has stayed unreferenced past both its
    grace periods (counted from when this check first saw it unreferenced,
    which is no earlier than its retirement, and from its write) plus two
    compaction intervals. After watching for `watch` seconds, the check
    passes at the first look with nothing overdue; a compaction run that is
    still busy (a slow store) delays its collection, so it fails only when
    objects are still overdue after `limit` seconds. Compaction must have
    run."""
    g = COMPACTION
    slack = 2 * g["interval"] + 5
    unreferenced_since: dict[str, float] = {}
    started = time.monotonic()
    overdue: list[str] = []
    objects: list[tuple[str, float]] = []
    while True:
        now = time.time()
        views = topo.shard_views()
        referenced = {seg["object"] for sh in views.values() for seg in sh["segments"]}
        objects = topo.data_objects()
        present = {k for k, _ in objects}
        for k in list(unreferenced_since):
            if k not in present or k in referenced:
                del unreferenced_since[k]
        for k, _ in objects:
            if k not in referenced:
                unreferenced_since.setdefault(k, now)
        overdue = [k for k, modified in objects if k in unreferenced_since
                   and now - unreferenced_since[k] > g["gc_grace"] + slack
                   and now - modified > g["orphan_grace"] + slack]
        waited = time.monotonic() - started
        if (waited >= watch and not overdue) or waited >= limit:
            break
        time.sleep(2)
    compacted = sum(1 for k, _ in objects if k.startswith("streams/"))
    flush = sum(1 for k, _ in objects if k.startswith("segments/"))
    ok = not overdue and compacted > 0
    if overdue:
        detail = (f"{len(overdue)} unreferenced data objects outlived their grace periods: "
                  f"{examples(sorted(overdue), 3)}")
    elif compacted == 0:
        detail = "no compacted file in the bucket: compaction never ran"
    else:
        detail = (f"{compacted} compacted and {flush} flush objects, "
                  f"{len(unreferenced_since)} unreferenced ones all within their grace")
    return Check("gc-leaves-only-referenced-objects", ok, detail)


def parquet_records(topo: Topology, views: dict[TP, dict], topics: list[Topic]
                    ) -> tuple[dict[TP, dict[int, str]], list[str], int]:
    """The records of the live row groups the segment index references, per
    (topic, shard), read with DuckDB; problems found on the way; objects
    read."""
    names = {t.name for t in topics}
    keys = sorted({seg["object"] for (topic, _), sh in views.items() if topic in names
                   for seg in sh["segments"]})
    out: dict[TP, dict[int, str]] = defaultdict(dict)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nemesis-parquet-") as tmp:
        paths: dict[str, str] = {}
        fetch_errors: dict[str, str] = {}

        def fetch(item: tuple[int, str]) -> None:
            i, key = item
            try:
                path = os.path.join(tmp, f"{i}.parquet")
                with open(path, "wb") as f:
                    f.write(topo.fetch_object(key))
                paths[key] = path
            except Exception as e:  # noqa: BLE001 - reported per row group below
                fetch_errors[key] = repr(e)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(fetch, enumerate(keys)))
        con = duckdb.connect()
        groups: dict[str, list[list[tuple]]] = {}

        def row_group(key: str, index: int) -> list[tuple]:
            """(stream, shard, offset, value) of row group `index` of `key`."""
            if key not in groups:
                path = paths.get(key)
                if path is None:
                    raise RuntimeError(fetch_errors.get(key, "not fetched"))
                # Row groups are consecutive runs of rows: their sizes from
                # the footer cut the file's rows (in file order) into them.
                sizes = [n for (n,) in con.execute(
                    f"SELECT row_group_num_rows FROM parquet_metadata('{path}') "
                    "WHERE path_in_schema = 'offset' ORDER BY row_group_id").fetchall()]
                rows = con.execute(
                    f"SELECT stream, shard, \"offset\", value FROM "
                    f"read_parquet('{path}', file_row_number = true) "
                    "ORDER BY file_row_number").fetchall()
                cut, at = [], 0
                for n in sizes:
                    cut.append(rows[at:at + n])
                    at += n
                groups[key] = cut
            return groups[key][index]

        for (topic, shard), sh in sorted(views.items()):
            if topic not in names:
                continue
            expect = sh["log_start_offset"]
            for seg in sorted(sh["segments"], key=lambda s: s["first_offset"]):
                where = f"{topic}/{shard} {seg['object']}#rg{seg['row_group']}"
                if seg["first_offset"] != expect:
                    problems.append(f"{where}: starts at {seg['first_offset']}, expected {expect} "
                                    f"(gap or overlap in the segment index)")
                expect = seg["last_offset"] + 1
                try:
                    rows = row_group(seg["object"], seg["row_group"])
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{where}: unreadable: {e!r}")
                    continue
                offsets = [r[2] for r in rows]
                want = list(range(seg["first_offset"], seg["last_offset"] + 1))
                if offsets != want:
                    problems.append(f"{where}: offsets {offsets[:3]}..{offsets[-3:]} ({len(offsets)} rows), "
                                    f"index says {seg['first_offset']}..{seg['last_offset']}")
                if {r[0] for r in rows} != {topic} or {r[1] for r in rows} != {shard}:
                    problems.append(f"{where}: rows of {({r[0] for r in rows})} / shards "
                                    f"{({r[1] for r in rows})}")
                if seg.get("record_count") is not None and seg["record_count"] != len(offsets):
                    problems.append(f"{where}: {len(offsets)} rows, index says {seg['record_count']}")
                for _, _, o, v in rows:
                    if o in out[(topic, shard)]:
                        problems.append(f"{where}: offset {o} also in another referenced row group")
                    out[(topic, shard)][o] = text(v)
            if expect != sh["committed_offset"]:
                problems.append(f"{topic}/{shard}: segments end at {expect}, committed offset is "
                                f"{sh['committed_offset']}")
        con.close()
    return out, problems, len(paths)


# --------------------------------------------------------------------------
# judging


@dataclass
class RunFacts:
    """What the run itself observed, besides the History."""
    seed: int
    faults: int
    crashes: list[dict] = field(default_factory=list)
    healthy: Optional[Check] = None
    recovered: Optional[Check] = None
    flushed: Optional[Check] = None
    undelivered: dict[str, int] = field(default_factory=dict)
    fatal_errors: list[dict] = field(default_factory=list)  # {"t", "stream", "reason"}
    read_errors: list[str] = field(default_factory=list)
    parquet_error: Optional[str] = None
    cluster: bool = False
    gc: Optional[Check] = None


class Judge:
    def __init__(self, history: History, topics: list[Topic], facts: RunFacts,
                 final: dict[TP, list[tuple[int, str]]], marks: dict[TP, tuple[int, int]],
                 views: dict[TP, dict], parquet: Optional[dict[TP, dict[int, str]]],
                 parquet_problems: list[str]):
        self.h = history
        self.topics = topics
        self.durability = {t.name: t.durability for t in topics}
        self.facts = facts
        self.final = final
        self.marks = marks
        self.views = views
        self.parquet = parquet
        self.parquet_problems = parquet_problems
        self.counts = Counts(faults=facts.faults)
        self.checks: list[Check] = []
        self.allowed_lost: set[str] = set()  # acknowledged values lost with their owner
        # value -> every place it was finally read
        self.where: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for (topic, p), recs in final.items():
            for o, v in recs:
                self.where[v].append((topic, p, o))

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def run(self) -> tuple[list[Check], Counts]:
        for c in (self.facts.healthy, self.facts.recovered, self.facts.flushed, self.facts.gc):
            if c is not None:
                self.checks.append(c)
        self.check_processes()
        self.check_acknowledged()
        self.check_producers()
        self.check_idempotent()
        self.check_plain()
        self.check_dense()
        self.check_single_value()
        self.check_group_offsets()
        self.check_parquet()
        self.check_disk_full()
        return self.checks, self.counts

    # ---- the process side ----------------------------------------------------

    def check_processes(self) -> None:
        crashes = self.facts.crashes
        self.add("processes", not crashes,
                 "no process exited or hung without being killed" if not crashes else
                 f"{len(crashes)} unexpected: " + examples(
                     f"{c['process']} at {c['t']:.1f}s: {c['what']} (log {c['log']})" for c in crashes))

    def check_producers(self) -> None:
        """Delivery errors: none fatal, none a broker error a client must not
        retry, nothing left undelivered. An idempotent producer turns fatal
        when the broker loses records it acknowledged (the sequence has a
        gap): allowed only for a producer that lost records to an allowed
        local-window loss."""
        acks = self.h.snapshot_acks()
        errors = [a for a in acks if a[6] is not None]
        self.counts.failed_sends = len(errors)
        by_error: dict[str, int] = defaultdict(int)
        for a in errors:
            by_error[f"{'idempotent' if a[1].startswith('idem') else 'plain'}: {a[6]}"] += 1
        fatal: dict[str, str] = {}
        for f in self.facts.fatal_errors:
            fatal.setdefault(f["stream"], f["reason"])
        for _t, kind, message in self.h.events:  # the same, as recorded in the history
            if kind == "producer-fatal":
                stream, _, reason = message.partition(": ")
                fatal.setdefault(stream, reason)
        for a in errors:
            if a[8]:
                fatal.setdefault(a[1], a[6])
        lost_streams = {parse_value(v)[0] for v in self.allowed_lost}
        unexplained = {k: v for k, v in fatal.items() if k not in lost_streams}
        explained = {k: v for k, v in fatal.items() if k in lost_streams}
        # the failed batch behind an explained fatal error is explained too
        hard = [a for a in errors if hard_broker_error(a[9])
                and not (a[1] in explained and a[9] == OUT_OF_ORDER_SEQUENCE)]
        undelivered = {k: v for k, v in self.facts.undelivered.items() if v}
        ok = not unexplained and not hard and not undelivered
        detail = (f"{len(acks) - len(errors)} delivered, {len(errors)} failed "
                  f"({examples(f'{k} x{v}' for k, v in sorted(by_error.items(), key=lambda kv: -kv[1]))})")
        if unexplained:
            detail += f"; FATAL: {examples(f'{k}: {v}' for k, v in sorted(unexplained.items()))}"
        if explained:
            detail += (f"; fatal after an allowed local-window loss of their records (allowed): "
                       f"{examples(f'{k}: {v}' for k, v in sorted(explained.items()))}")
        if hard:
            detail += f"; non-retriable broker errors: {examples(sorted({a[6] for a in hard}))}"
        if undelivered:
            detail += f"; still queued after the final flush (-1: producer thread hung): {undelivered}"
        self.add("producers", ok, detail)

    # ---- acknowledged writes ---------------------------------------------------

    def _broker_faults(self) -> list[dict]:
        """The broker faults that may have cost the victim its shards: it
        was away from placement for a session timeout."""
        return [f for f in self.h.faults if f.get("victim") is not None and "owned" in f
                and f["end"] - f["start"] >= FAILOVER_FAULT]

    def _moved_at(self, key: str, victim: int, start: float, end: float) -> Optional[float]:
        """When (first seen) the shard `key` had an owner other than the
        victim during or shortly after a fault, or None if it never moved."""
        for t, owners in self.h.ownership:
            if start <= t <= end + MOVE_WINDOW:
                owner = owners.get(key)
                if owner is not None and owner[0] != victim:
                    return t
        return None

    def _moved_away(self, key: str, victim: int, start: float, end: float) -> bool:
        return self._moved_at(key, victim, start, end) is not None

    def _allowed_loss(self, topic: str, partition: int, offset: int, t_ack: float) -> Optional[int]:
        """The id of a broker fault that explains the loss of this `local`
        record (its owner went away long enough for the shard to move), or
        None."""
        if not self.facts.cluster or self.durability.get(topic) != "local":
            return None
        key = f"{topic}/{partition}"
        for f in self._broker_faults():
            if key not in f["owned"]:
                continue
            moved = self._moved_at(key, f["victim"], f["start"], f["end"])
            if moved is None:
                continue  # it kept its shards: it had to keep its records
            if f["kind"] == "cut-broker":
                # A cut-off broker keeps acknowledging until it fences itself,
                # 1 s before its session expires, so before the shard moves;
                # the monitor sees the move up to 0.5 s late.
                deadline = min(f["end"], moved - 0.5)
            else:
                deadline = f["start"] + SIGNAL_GRACE
            if t_ack >= deadline:
                continue
            committed = (f.get("committed_at_fault") or {}).get(key)
            if committed is not None and offset < committed:
                continue  # was in a committed object already: must survive
            return f["id"]
        return None

    def check_acknowledged(self) -> None:
        """Every successful delivery report's record is in the log at the
        offset the report gave. A success without an offset (librdkafka
        reports one when it infers that a batch was persisted earlier) must
        at least be somewhere in the log."""
        acks = [a for a in self.h.snapshot_acks() if a[6] is None]
        self.counts.acknowledged = len(acks)
        lost, allowed, misplaced, no_offset = [], defaultdict(int), [], 0
        at_offset: dict[tuple[str, int, int], set[str]] = defaultdict(set)
        for t, _stream, topic, p, o, v, *_ in acks:
            places = self.where.get(v, [])
            if o is None or o < 0:
                no_offset += 1
                if places:
                    continue
                lost.append(f"{v} acked WITHOUT an offset in {topic}/{p} t={t:.2f}s")
                continue
            at_offset[(topic, p, o)].add(v)
            if (topic, p, o) in places:
                continue
            if places:
                misplaced.append(f"{v} acked at {topic}/{p}@{o}, read at {places}")
                continue
            fault = self._allowed_loss(topic, p, o, t)
            if fault is not None:
                allowed[fault] += 1
                self.allowed_lost.add(v)
            else:
                lost.append(f"{v} acked at {topic}/{p}@{o} t={t:.2f}s")
        self.counts.lost = len(lost)
        self.counts.misplaced = len(misplaced)
        self.counts.allowed_local_losses = sum(allowed.values())
        # Two records acknowledged at one offset: wrong, unless all but the
        # one the log holds were lost with their owner (the new owner reuses
        # the offsets of a lost local window).
        self.ack_conflicts = {
            k: vs for k, vs in at_offset.items()
            if len(vs) > 1 and not all(v in self.allowed_lost for v in vs if k not in self.where.get(v, []))}
        detail = f"{len(acks)} acknowledged records"
        if not lost and not misplaced:
            detail += " all read back at their acknowledged offsets"
        if no_offset:
            detail += f"; {no_offset} acknowledged without an offset"
        if lost:
            detail += f"; {len(lost)} LOST: {examples(lost)}"
        if misplaced:
            detail += f"; {len(misplaced)} at another offset: {examples(misplaced)}"
        if allowed:
            detail += (f"; {sum(allowed.values())} local records lost with their owner "
                       f"(allowed, by fault: {dict(allowed)})")
        self.add("acknowledged-read-back", not lost and not misplaced, detail)

        # records whose send failed but which were written anyway (legal)
        failed = {a[5] for a in self.h.snapshot_acks() if a[6] is not None}
        self.counts.unacked_written = sum(1 for v in failed if v in self.where)

    def _streams_in_log(self):
        """{(producer stream, topic, partition): [seq in log order]}"""
        out: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        for (topic, p), recs in self.final.items():
            for _o, v in recs:
                try:
                    stream, seq = parse_value(v)
                except (ValueError, AttributeError):
                    continue
                out[(stream, topic, p)].append(seq)
        return out

    def check_idempotent(self) -> None:
        """Per idempotent producer and partition: every record at most once
        anywhere, and the log holds them in send (sequence) order."""
        dups = [f"{v} at {places}" for v, places in self.where.items()
                if v is not None and v.startswith("idem") and len(places) > 1]
        self.counts.duplicated += sum(len(self.where[v]) - 1 for v in self.where
                                      if v is not None and v.startswith("idem") and len(self.where[v]) > 1)
        reordered, samples = 0, []
        for (stream, topic, p), seqs in self._streams_in_log().items():
            if not stream.startswith("idem"):
                continue
            high = -1
            for s_ in seqs:
                if s_ < high:
                    reordered += 1
                    samples.append(f"{stream}:{s_} after {stream}:{high} in {topic}/{p}")
                high = max(high, s_)
        self.counts.reordered += reordered
        ok = not dups and not reordered
        self.add("idempotent-exactly-once-in-order", ok,
                 "every idempotent record at most once, in send order per partition" if ok else
                 f"{len(dups)} duplicated ({examples(dups)}); {reordered} out of order "
                 f"({examples(samples)})")

    def check_plain(self) -> None:
        """Plain producers never retry: a record of theirs twice is the
        broker's doing. And nothing is read that the workload did not send."""
        sent = {s[4] for s in self.h.sends}
        dups, copies, never_sent = [], 0, []
        for v, places in self.where.items():
            if v not in sent:
                never_sent.append(f"{v!r} at {places}")
            elif v.startswith("plain") and len(places) > 1:
                dups.append(f"{v} at {places}")
                copies += len(places) - 1
        self.counts.duplicated += copies
        ok = not dups and not never_sent
        self.add("plain-no-duplicates", ok,
                 "no plain (non-retrying) record written twice, nothing read that was not sent"
                 if ok else f"{len(dups)} plain records duplicated ({examples(dups)}); "
                            f"{len(never_sent)} records never sent ({examples(never_sent)})")

    # ---- the log ---------------------------------------------------------------

    def check_dense(self) -> None:
        bad = []
        for (topic, p), recs in sorted(self.final.items()):
            low, high = self.marks.get((topic, p), (None, None))
            offsets = [o for o, _ in recs]
            if low != 0:
                bad.append(f"{topic}/{p}: log start {low}")
            if offsets != list(range(0, high or 0)):
                holes = sorted(set(range(0, high or 0)) - set(offsets))
                bad.append(f"{topic}/{p}: read {len(offsets)} records for high watermark {high}, "
                           f"missing {examples(holes, 5)}")
        total = sum(len(r) for r in self.final.values())
        errs = self.facts.read_errors
        self.add("offsets-dense", not bad and not errs,
                 f"{total} records in {len(self.final)} partitions, offsets 0..high watermark without gaps"
                 if not bad and not errs else examples(bad + errs))

    def _allowed_rewrite(self, c: dict) -> Optional[int]:
        """The id of a broker fault that explains an offset read with two
        values: a `local` record of the victim's un-flushed window, read
        before its shard moved away; the new owner reuses the offset (the
        other face of an allowed local-window loss)."""
        topic, p, o = c["topic"], c["partition"], c["offset"]
        if not self.facts.cluster or self.durability.get(topic) != "local":
            return None
        key = f"{topic}/{p}"
        for f in self._broker_faults():
            if key not in f["owned"]:
                continue
            committed = (f.get("committed_at_fault") or {}).get(key)
            if committed is not None and o < committed:
                continue
            if c["first"]["t"] > f["end"] + MOVE_WINDOW:
                continue
            if self._moved_away(key, f["victim"], f["start"], f["end"]):
                return f["id"]
        return None

    def check_single_value(self) -> None:
        conflicts, allowed, seen = [], defaultdict(set), set()
        for c in self.h.conflicts:
            where = (c["topic"], c["partition"], c["offset"])
            fault = self._allowed_rewrite(c)
            if fault is not None:
                allowed[fault].add(where)
                continue
            if where in seen:
                continue
            seen.add(where)
            conflicts.append(f"{c['topic']}/{c['partition']}@{c['offset']}: {c['first']['value']} "
                             f"({c['first']['source']} t={c['first']['t']:.1f}) then {c['then']['value']} "
                             f"({c['then']['source']} t={c['then']['t']:.1f})")
        conflicts += [f"{t}/{p}@{o} acknowledged for {sorted(vs)}"
                      for (t, p, o), vs in self.ack_conflicts.items()]
        self.counts.allowed_rewrites = sum(len(v) for v in allowed.values())
        reads = len(self.h.reads) + self.h.agreeing_reads
        detail = (f"{reads} reads ({len(self.h.read_passes)} re-read passes), no offset seen with two values"
                  if not conflicts else f"{len(conflicts)} offsets with two values: {examples(conflicts)}")
        if allowed:
            detail += (f"; {self.counts.allowed_rewrites} offsets of a local window lost with its "
                       f"owner read before it was reused (allowed, by fault: "
                       f"{ {k: len(v) for k, v in allowed.items()} })")
        self.add("single-value-per-offset", not conflicts, detail)

    def _allowed_offset_drop(self, key: str, high: int, t: float) -> Optional[int]:
        """A committed offset falls back when it pointed into a local window
        lost with its owner: past the new owner's log end the consumer resets
        (auto.offset.reset=earliest). The fault that explains it, or None."""
        topic = key.rsplit("/", 1)[0]
        if not self.facts.cluster or self.durability.get(topic) != "local":
            return None
        for f in reversed(self._broker_faults()):  # the latest fault before the drop
            committed = (f.get("committed_at_fault") or {}).get(key)
            if (key in f["owned"] and committed is not None and high > committed
                    and t >= f["start"] and self._moved_away(key, f["victim"], f["start"], f["end"])):
                return f["id"]
        return None

    def check_group_offsets(self) -> None:
        """Committed offsets never go backwards: in the broker's answers to
        OffsetFetch over time, and among the commits it acknowledged."""
        bad, allowed = [], defaultdict(int)

        def backwards(key: str, high: int, low: int, t: float, what: str) -> None:
            fault = self._allowed_offset_drop(key, high, t)
            if fault is not None:
                allowed[fault] += 1
            else:
                bad.append(what)

        last: dict[str, tuple[float, int]] = {}
        for t, offsets in self.h.group_offsets:
            for k, o in offsets.items():
                prev = last.get(k)
                if prev is not None and o < prev[1]:
                    backwards(k, prev[1], o, t, f"{k}: {prev[1]} at {prev[0]:.1f}s then {o} at {t:.1f}s")
                last[k] = (t, o)
        # successful commits acknowledged to the members: a later one lower
        # than an earlier one (more than a second apart, so not two commits
        # in flight together) went backwards
        best: dict[str, tuple[float, int, str]] = {}
        for t, member, topic, p, o, err in sorted(self.h.commits, key=lambda c: c[0]):
            if err is not None or o < 0:
                continue
            k = f"{topic}/{p}"
            prev = best.get(k)
            if prev is not None and o < prev[1] and t - prev[0] > 1.0:
                backwards(k, prev[1], o, t, f"{k}: commit {prev[1]} by {prev[2]} at {prev[0]:.1f}s "
                                            f"acknowledged, then {o} by {member} at {t:.1f}s")
                best[k] = (t, o, member)  # judged once; follow the new line
            elif prev is None or o >= prev[1]:
                best[k] = (t, o, member)
        over = []
        for k, (t, o) in last.items():
            topic, p = k.rsplit("/", 1)
            high = self.marks.get((topic, int(p)), (0, None))[1]
            if high is not None and o > high:
                over.append(f"{k}: committed {o} > high watermark {high}")
        ok = not bad and not over
        n_commits = sum(1 for c in self.h.commits if c[5] is None)
        if not self.h.group_offsets:
            ok, detail = False, "no committed offsets observed"
        elif ok:
            detail = f"{len(self.h.group_offsets)} snapshots, {n_commits} commits acknowledged, never backwards"
        else:
            detail = examples(bad + over)
        if allowed:
            detail += (f"; {sum(allowed.values())} fell back after a local window was lost with its "
                       f"owner (allowed, by fault: {dict(allowed)})")
        self.add("group-offsets-monotonic", ok, detail)

    def check_parquet(self) -> None:
        if self.parquet is None:
            self.add("parquet-matches-consumers", False, f"not read: {self.facts.parquet_error}")
            return
        problems = list(self.parquet_problems)
        rows = 0
        for (topic, p), recs in sorted(self.final.items()):
            consumed = dict(recs)
            stored = self.parquet.get((topic, p), {})
            rows += len(stored)
            missing = sorted(set(consumed) - set(stored))
            extra = sorted(set(stored) - set(consumed))
            differ = sorted(o for o in set(consumed) & set(stored) if consumed[o] != stored[o])
            if missing:
                problems.append(f"{topic}/{p}: {len(missing)} consumed offsets not in Parquet "
                                f"({examples(missing, 3)})")
            if extra:
                problems.append(f"{topic}/{p}: {len(extra)} Parquet offsets never consumed "
                                f"({examples(extra, 3)})")
            if differ:
                problems.append(f"{topic}/{p}: {len(differ)} values differ, e.g. offset {differ[0]}: "
                                f"consumed {consumed[differ[0]]!r}, Parquet {stored[differ[0]]!r}")
        self.add("parquet-matches-consumers", not problems,
                 f"{rows} rows in the referenced row groups equal the consumed records"
                 if not problems else examples(problems))

    # ---- disk full ---------------------------------------------------------------

    def check_disk_full(self) -> None:
        """While the WAL's disk is full: the ballast (a burst of large writes
        to push the WAL past its preallocated segments) is either refused
        with a retriable error or absorbed (flushed segments reused), never
        given a fatal or non-retriable error; reads keep working; writes are
        taken again once there is room. The workload's own errors in the
        window must be retriable too."""
        windows = [f for f in self.h.faults if f["kind"] == "disk-full" and "filled_bytes" in f]
        if not windows:
            return
        bad, notes, seen = [], [], defaultdict(int)
        for f in windows:
            fid = f"#{f['id']} ({f.get('victim_process')})"
            if not f.get("read_probe", {}).get("ok"):
                bad.append(f"{fid}: reads failed while the disk was full: {f.get('read_probe')}")
            b = f.get("ballast")
            if b is None:
                notes.append(f"{fid}: no ballast partition on the victim")
            else:
                hard = [c for c in b["codes"] if hard_broker_error(c)]
                if b["fatal"] or hard:
                    bad.append(f"{fid}: ballast got {'a fatal' if b['fatal'] else 'a non-retriable'} "
                               f"error: {b['errors']}")
                elif not b["errors"]:
                    # the WAL kept reusing flushed segments: nothing to refuse
                    notes.append(f"{fid}: {b['acked_mib']} MiB absorbed (WAL segments reused), "
                                 f"no error")
                else:
                    notes.append(f"{fid}: refused after {b['acked_mib']} MiB with {sorted(b['errors'])[0]}")
                if f.get("writes_back_after") is None:
                    bad.append(f"{fid}: no write accepted within 30 s after the disk emptied")
                else:
                    notes.append(f"writes back {f['writes_back_after']}s after")
            for a in self.h.snapshot_acks():
                if a[6] is None or not (f["start"] <= a[0] <= f["end"] + 2.0):
                    continue
                seen[a[6]] += 1
                if a[8] or hard_broker_error(a[9]):
                    bad.append(f"{fid}: {a[1]} got {'a fatal' if a[8] else 'a non-retriable'} "
                               f"error {a[6]}")
        detail = (f"{len(windows)} disk-full windows: {'; '.join(notes)}; reads kept working; "
                  f"workload errors in the windows: {dict(seen) or 'none'}")
        self.add("disk-full", not bad, detail if not bad else examples(bad))
