"""kcat (librdkafka's command-line client) against Shoal."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess

import pytest

from harness import unique_name

# In CI (CI=true) a missing kcat is a failure, never a skip.
pytestmark = pytest.mark.skipif(shutil.which("kcat") is None and not os.environ.get("CI"),
                                reason="kcat not installed (tests/run.sh installs it)")


def kcat(shoal, *args: str, input: str | None = None, timeout: float = 60.0) -> str:
    cmd = ["kcat", "-b", shoal.bootstrap, "-X", "broker.address.family=v4", *args]
    try:
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s; "
                             f"stderr: {e.stderr!r}") from None
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}\nstderr:\n{res.stderr}"
    return res.stdout


def produce_lines(shoal, topic: str, lines: list[str], keyed: bool) -> None:
    args = ["-P", "-t", topic, "-p", "0"]
    if keyed:
        args += ["-K", ":"]
    kcat(shoal, *args, input="".join(line + "\n" for line in lines))


def consume(shoal, topic: str, *extra: str) -> list[tuple[int, int, str, str, int]]:
    """(partition, offset, key, value, timestamp) of each message; -e exits at the end."""
    out = kcat(shoal, "-C", "-t", topic, "-e", "-q", "-f", r"%p|%o|%k|%s|%T\n", *extra)
    rows = []
    for line in out.splitlines():
        if not line:
            continue
        p, o, k, v, ts = line.split("|")
        rows.append((int(p), int(o), k, v, int(ts)))
    return rows


def test_metadata_lists_broker_and_auto_created_topic(shoal):
    topic = unique_name("kcat-meta")
    produce_lines(shoal, topic, ["hello"], keyed=False)  # auto-creates the topic
    md = json.loads(kcat(shoal, "-L", "-J"))
    names = [b["name"] for b in md["brokers"]]
    assert f"127.0.0.1:{shoal.kafka_port}" in names, md["brokers"]
    topics = {t["topic"]: t for t in md["topics"]}
    assert topic in topics, sorted(topics)
    t = topics[topic]
    assert not t.get("error"), t
    assert [p["partition"] for p in t["partitions"]] == [0]  # --default-partitions 1
    assert t["partitions"][0]["leader"] in [b["id"] for b in md["brokers"]]

    # Asking for that one topic works too.
    md1 = json.loads(kcat(shoal, "-L", "-J", "-t", topic))
    assert [t["topic"] for t in md1["topics"]] == [topic]


def test_produce_and_consume_in_order(shoal):
    topic = unique_name("kcat-demo")
    n = 200
    lines = [f"key-{i}:value-{i}" for i in range(n)]
    produce_lines(shoal, topic, lines, keyed=True)
    rows = consume(shoal, topic, "-o", "beginning")
    assert [(p, o, k, v) for p, o, k, v, _ in rows] == [
        (0, i, f"key-{i}", f"value-{i}") for i in range(n)]

    # Unkeyed messages appended after them keep the order too.
    produce_lines(shoal, topic, [f"plain-{i}" for i in range(10)], keyed=False)
    rows = consume(shoal, topic, "-o", "beginning")
    assert len(rows) == n + 10
    assert [v for _, _, _, v, _ in rows[n:]] == [f"plain-{i}" for i in range(10)]
    assert [o for _, o, _, _, _ in rows] == list(range(n + 10))


def test_consume_from_offset_and_query_offsets(shoal):
    topic = unique_name("kcat-offsets")
    produce_lines(shoal, topic, [f"a{i}" for i in range(20)], keyed=False)
    produce_lines(shoal, topic, [f"b{i}" for i in range(20)], keyed=False)
    rows = consume(shoal, topic, "-o", "beginning")
    assert [o for _, o, _, _, _ in rows] == list(range(40))

    # absolute offset
    from_15 = consume(shoal, topic, "-p", "0", "-o", "15")
    assert [(o, v) for _, o, _, v, _ in from_15] == [(o, v) for _, o, _, v, _ in rows[15:]]
    # relative to the end
    last_5 = consume(shoal, topic, "-p", "0", "-o", "-5")
    assert [o for _, o, _, _, _ in last_5] == list(range(35, 40))

    def query(ts: int) -> int:
        out = kcat(shoal, "-Q", "-t", f"{topic}:0:{ts}")
        m = re.search(r"\[0\]\s+offset\s+(-?\d+)", out)
        assert m, f"unexpected kcat -Q output: {out!r}"
        return int(m.group(1))

    # -1 = latest, -2 = earliest
    assert query(-1) == 40
    assert query(-2) == 0
    # by timestamp: the first offset whose timestamp is >= the one asked for
    stamps = {o: ts for _, o, _, _, ts in rows}
    for probe in (0, 20, 39):
        target = stamps[probe]
        expected = min(o for o, ts in stamps.items() if ts >= target)
        assert query(target) == expected, (probe, target)
    # a timestamp after the last record: no offset (-1)
    assert query(max(stamps.values()) + 3_600_000) == -1
