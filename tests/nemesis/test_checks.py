"""The checker on synthetic histories: a clean run passes, and each kind of
broker misbehaviour fails the check meant to catch it. Fast (no broker)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "e2e"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from checks import Judge, RunFacts  # noqa: E402
from history import History  # noqa: E402
from workload import Topic  # noqa: E402

TOPICS = [Topic("t-obj", "object", 1), Topic("t-loc", "local", 1)]


class Scenario:
    """Five idempotent records in t-obj/0, three plain ones in t-loc/0, all
    acknowledged, read back and in Parquet; offsets committed twice."""

    def __init__(self, cluster: bool = False, topics: list[Topic] = TOPICS):
        self.topics = topics
        self.h = History()
        self.final: dict = {}
        for topic, stream, n in (("t-obj", "idem0.0", 5), ("t-loc", "plain0.0", 3)):
            recs = []
            for i in range(n):
                v = f"{stream}:{i}"
                self.h.sends.append([1.0 + i, stream, topic, 0, v])
                self.h.acks.append([2.0 + i, stream, topic, 0, i, v, None, False, False, None])
                recs.append((i, v))
            self.final[(topic, 0)] = recs
        self.h.group_offsets = [[5.0, {"t-obj/0": 2}], [6.0, {"t-obj/0": 5}]]
        self.facts = RunFacts(seed=1, faults=0, cluster=cluster)

    def judge(self):
        marks = {k: (0, len(v)) for k, v in self.final.items()}
        parquet = {k: dict(v) for k, v in self.final.items()}
        return self.judge_with(marks, parquet)

    def judge_with(self, marks, parquet):
        checks, counts = Judge(self.h, self.topics, self.facts, self.final, marks, {}, parquet, []).run()
        return {c.name: c for c in checks}, counts


def failed(checks) -> set[str]:
    return {name for name, c in checks.items() if not c.ok}


def test_clean_history_passes():
    checks, counts = Scenario().judge()
    assert not failed(checks), [c.line() for c in checks.values()]
    assert (counts.acknowledged, counts.lost, counts.duplicated, counts.reordered) == (8, 0, 0, 0)


def test_lost_record():
    s = Scenario()
    s.final[("t-obj", 0)].pop()
    checks, counts = s.judge()
    assert "acknowledged-read-back" in failed(checks)
    assert counts.lost == 1


def test_plain_duplicate():
    s = Scenario()
    s.final[("t-loc", 0)].append((3, "plain0.0:1"))
    checks, counts = s.judge()
    assert "plain-no-duplicates" in failed(checks)
    assert counts.duplicated == 1


def test_idempotent_reorder():
    s = Scenario()
    recs = s.final[("t-obj", 0)]
    recs[1], recs[2] = (1, recs[2][1]), (2, recs[1][1])
    checks, counts = s.judge()
    assert {"idempotent-exactly-once-in-order", "acknowledged-read-back"} <= failed(checks)
    assert counts.reordered == 1 and counts.misplaced == 2


def test_offset_gap():
    s = Scenario()
    s.final[("t-obj", 0)].pop(2)
    checks, _ = s.judge_with({("t-obj", 0): (0, 5), ("t-loc", 0): (0, 3)},
                             {k: dict(v) for k, v in s.final.items()})
    assert "offsets-dense" in failed(checks)


def test_offset_read_with_two_values():
    s = Scenario()
    s.h.read("reader#0", "t-obj", 0, 1, b"something-else")
    s.h.read("final", "t-obj", 0, 1, b"idem0.0:1")
    checks, _ = s.judge()
    assert "single-value-per-offset" in failed(checks)


def test_committed_offset_went_backwards():
    s = Scenario()
    s.h.group_offsets.append([7.0, {"t-obj/0": 3}])
    checks, _ = s.judge()
    assert "group-offsets-monotonic" in failed(checks)


def test_parquet_differs():
    s = Scenario()
    marks = {k: (0, len(v)) for k, v in s.final.items()}
    parquet = {k: dict(v) for k, v in s.final.items()}
    parquet[("t-loc", 0)][1] = "plain0.0:99"
    del parquet[("t-obj", 0)][4]
    checks, _ = s.judge_with(marks, parquet)
    assert "parquet-matches-consumers" in failed(checks)


def test_cluster_local_window_loss_is_allowed_only_for_local_topics():
    s = Scenario(cluster=True)
    # broker 1 owned both shards; killed at t=10 after committing offset 1 of
    # each; the shards moved to broker 2.
    s.h.faults.append({"id": 1, "kind": "kill-broker", "start": 10.0, "end": 16.0, "victim": 1,
                       "owned": ["t-obj/0", "t-loc/0"],
                       "committed_at_fault": {"t-obj/0": 1, "t-loc/0": 1}})
    s.h.ownership = [[0.0, {"t-obj/0": [1, 1], "t-loc/0": [1, 1]}],
                     [16.0, {"t-obj/0": [2, 2], "t-loc/0": [2, 2]}]]
    s.final[("t-loc", 0)].pop()   # offset 2 of the local topic: allowed
    checks, counts = s.judge()
    assert "acknowledged-read-back" not in failed(checks)
    assert counts.allowed_local_losses == 1 and counts.lost == 0
    s.final[("t-obj", 0)].pop()   # offset 4 of the object topic: never allowed
    checks, counts = s.judge()
    assert "acknowledged-read-back" in failed(checks) and counts.lost == 1
    s.final[("t-obj", 0)].append((4, "idem0.0:4"))
    s.final[("t-loc", 0)].pop(0)  # offset 0 was committed before the fault: not allowed
    checks, counts = s.judge()
    assert counts.lost == 1


def test_a_short_broker_fault_explains_no_loss():
    """A broker back within the session timeout keeps its shards; if one
    moves anyway (a handoff, which commits everything first), a lost record
    is still a loss."""
    s = Scenario(cluster=True)
    s.h.faults.append({"id": 1, "kind": "kill-broker", "start": 10.0, "end": 11.0, "victim": 1,
                       "owned": ["t-loc/0"], "committed_at_fault": {"t-loc/0": 1}})
    s.h.ownership = [[0.0, {"t-loc/0": [1, 1]}], [16.0, {"t-loc/0": [2, 2]}]]
    s.final[("t-loc", 0)].pop()
    checks, counts = s.judge()
    assert "acknowledged-read-back" in failed(checks)
    assert counts.lost == 1 and counts.allowed_local_losses == 0
    s.h.faults[0]["end"] = 16.0  # down long enough for a failover: allowed
    checks, counts = s.judge()
    assert counts.lost == 0 and counts.allowed_local_losses == 1


def test_ack_without_offset_must_be_somewhere():
    s = Scenario()
    s.h.acks.append([9.0, "idem0.0", "t-obj", 0, None, "idem0.0:9", None, False, False, None])
    s.h.sends.append([8.0, "idem0.0", "t-obj", 0, "idem0.0:9"])
    checks, counts = s.judge()
    assert counts.lost == 1
    s.final[("t-obj", 0)].append((5, "idem0.0:9"))
    checks, counts = s.judge()
    assert counts.lost == 0 and not failed(checks)


def test_offset_of_an_allowed_loss_acknowledged_again():
    """The new owner reuses the offsets of a lost local window: a second
    acknowledgement at such an offset is not a conflict; any other is."""
    s = Scenario(cluster=True)
    s.h.faults.append({"id": 1, "kind": "kill-broker", "start": 10.0, "end": 16.0, "victim": 1,
                       "owned": ["t-loc/0"], "committed_at_fault": {"t-loc/0": 1}})
    s.h.ownership = [[0.0, {"t-loc/0": [1, 1]}], [16.0, {"t-loc/0": [2, 2]}]]
    s.h.sends.append([20.0, "plain0.0", "t-loc", 0, "plain0.0:7"])
    s.h.acks.append([20.5, "plain0.0", "t-loc", 0, 2, "plain0.0:7", None, False, False, None])
    s.final[("t-loc", 0)][2] = (2, "plain0.0:7")
    checks, counts = s.judge()
    assert not failed(checks), [c.line() for c in checks.values() if not c.ok]
    assert counts.allowed_local_losses == 1
    s.facts.cluster = False  # the same in standalone: a loss and a conflict
    checks, counts = s.judge()
    assert {"acknowledged-read-back", "single-value-per-offset"} <= failed(checks)


def test_committed_offset_falls_back_after_a_lost_local_window():
    s = Scenario(cluster=True)
    s.h.faults.append({"id": 1, "kind": "pause-broker", "start": 10.0, "end": 20.0, "victim": 1,
                       "owned": ["t-loc/0"], "committed_at_fault": {"t-loc/0": 1}})
    s.h.ownership = [[0.0, {"t-loc/0": [1, 1]}], [17.0, {"t-loc/0": [2, 2]}]]
    s.h.group_offsets = [[9.0, {"t-loc/0": 3}], [21.0, {"t-loc/0": 1}]]  # 3 was in the lost window
    checks, _ = s.judge()
    assert "group-offsets-monotonic" not in failed(checks)
    s.h.faults[0]["committed_at_fault"] = {"t-loc/0": 3}  # 3 was committed: must not fall back
    checks, _ = s.judge()
    assert "group-offsets-monotonic" in failed(checks)


def test_cut_broker_window_ends_when_the_shard_moves():
    """A cut-off broker acknowledges until it fences itself (before its shard
    moves); what is acknowledged after the move came from the new owner and
    must survive."""
    s = Scenario(cluster=True)
    s.h.faults.append({"id": 1, "kind": "cut-broker", "start": 1.0, "end": 9.0, "victim": 1,
                       "owned": ["t-loc/0"], "committed_at_fault": {"t-loc/0": 0}})
    s.h.ownership = [[0.0, {"t-loc/0": [1, 1]}], [5.0, {"t-loc/0": [2, 2]}]]
    # plain0.0:1 and :2 were acknowledged at 3.0 and 4.0 (Scenario: 2.0 + i)
    s.final[("t-loc", 0)].pop()              # acked at 4.0, before the move at ~4.5-5.0
    checks, counts = s.judge()
    assert counts.allowed_local_losses == 1 and counts.lost == 0
    s.h.ownership[1][0] = 4.2                # the move was seen at 4.2: 4.0 is too late
    checks, counts = s.judge()
    assert counts.lost == 1


def test_idempotent_fatal_only_after_its_own_allowed_loss():
    def scenario(durability: str) -> Scenario:
        s = Scenario(cluster=True, topics=[Topic("t-obj", durability, 1), TOPICS[1]])
        s.h.faults.append({"id": 1, "kind": "kill-broker", "start": 10.0, "end": 16.0, "victim": 1,
                           "owned": ["t-obj/0"], "committed_at_fault": {"t-obj/0": 4}})
        s.h.ownership = [[0.0, {"t-obj/0": [1, 1]}], [16.0, {"t-obj/0": [2, 2]}]]
        s.h.sends.append([19.0, "idem0.0", "t-obj", 0, "idem0.0:9"])
        s.h.acks.append([20.0, "idem0.0", "t-obj", 0, -1, "idem0.0:9",
                         "KafkaError{code=OUT_OF_ORDER_SEQUENCE_NUMBER,val=45}", False, False, 45])
        s.h.event("producer-fatal", "idem0.0: sequence desynchronization")
        return s

    s = scenario("local")
    checks, _ = s.judge()
    assert "producers" in failed(checks)  # it lost nothing: the fatal error is unexplained
    s.final[("t-obj", 0)].pop()  # idem0.0:4, offset 4, acknowledged at 6.0: lost with broker 1
    checks, counts = s.judge()
    assert counts.allowed_local_losses == 1
    assert "producers" not in failed(checks), checks["producers"].line()
    s = scenario("object")  # never allowed for object topics
    s.final[("t-obj", 0)].pop()
    checks, counts = s.judge()
    assert counts.lost == 1 and "producers" in failed(checks)
