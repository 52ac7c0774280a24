"""Crash safety: kill -9 the broker while a producer with acks=all is writing;
every acknowledged record must survive, exactly once, at the offset it was
acknowledged at (docs/reliability.md, "The contract").

Rounds: SHOAL_CRASH_ROUNDS (default 5).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time

import pytest

from clients import ck_consume_all, ck_create_topic, ck_producer
from harness import unique_name, wait_for

ROUNDS = int(os.environ.get("SHOAL_CRASH_ROUNDS", "5"))
#: Upper bound on the produce rate (messages/s), to keep the final read-back short.
RATE = int(os.environ.get("SHOAL_CRASH_RATE", "20000"))
PARTITIONS = 2


class ProducerThread(threading.Thread):
    """Produces unique values to both partitions until told to stop; records
    every successful delivery report."""

    def __init__(self, bootstrap: str, topic: str, round_no: int):
        super().__init__(name=f"producer-round-{round_no}", daemon=True)
        self.bootstrap, self.topic, self.round_no = bootstrap, topic, round_no
        self.lock = threading.Lock()
        self.acked: list[tuple[int, int, bytes]] = []
        self.failed = 0
        self.sent = 0
        self.error: BaseException | None = None
        self.stop_evt = threading.Event()

    def _on_delivery(self, err, msg):
        with self.lock:
            if err is None:
                self.acked.append((msg.partition(), msg.offset(), msg.value()))
            else:
                self.failed += 1

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def run(self):
        try:
            p = ck_producer(self.bootstrap, **{
                "acks": "all",
                "enable.idempotence": False,
                # Every value is sent at most once: an acknowledged value that
                # shows up twice can only be the broker's doing.
                "retries": 0,
                "linger.ms": 2,
                "message.timeout.ms": 10000,
                "queue.buffering.max.messages": 20000,
            })
            seq = 0
            started = time.monotonic()
            while not self.stop_evt.is_set():
                # Bound what is in flight and the rate; poll() serves delivery
                # reports while it waits.
                if len(p) > 2000 or seq > RATE * (time.monotonic() - started):
                    p.poll(0.002)
                    continue
                value = f"r{self.round_no}-{seq:08d}".encode()
                try:
                    p.produce(self.topic, value=value, partition=seq % PARTITIONS,
                              on_delivery=self._on_delivery)
                except BufferError:
                    p.poll(0.01)
                    continue
                seq += 1
                with self.lock:
                    self.sent = seq
                p.poll(0)
            # The broker is gone: drop what was never sent and collect every
            # outstanding delivery report before the broker comes back.
            p.purge(in_queue=True, in_flight=False, blocking=True)
            remaining = p.flush(15)
            if remaining:
                p.purge(in_queue=True, in_flight=True, blocking=True)
                p.flush(5)
        except BaseException as e:  # noqa: BLE001
            self.error = e


@pytest.mark.timeout(max(180, 90 * ROUNDS))
def test_acknowledged_records_survive_kill9(shoal):
    topic = unique_name("crash")
    ck_create_topic(shoal.bootstrap, topic, PARTITIONS)
    rng = random.Random()
    acked: list[tuple[int, int, bytes, int]] = []  # partition, offset, value, round

    for round_no in range(ROUNDS):
        t = ProducerThread(shoal.bootstrap, topic, round_no)
        t.start()
        wait_for(lambda: t.acked_count() > 0 or t.error is not None, 60,
                 f"round {round_no}: first acknowledgement")
        assert t.error is None, t.error
        # The only sleep in the suite: it picks the moment of the crash.
        delay = rng.uniform(0.2, 1.5)
        time.sleep(delay)
        shoal.kill9()
        t.stop_evt.set()
        t.join(60)
        assert not t.is_alive(), f"round {round_no}: producer did not stop"
        assert t.error is None, f"round {round_no}: producer failed: {t.error!r}"
        acked.extend((p, o, v, round_no) for p, o, v in t.acked)
        print(f"round {round_no}: crash after {delay:.2f}s, sent {t.sent}, "
              f"acked {len(t.acked)}, failed {t.failed}")
        shoal.start()

    assert acked, "nothing was acknowledged"

    # No two acknowledgements share a position, and no value was acked twice.
    positions = collections.Counter((p, o) for p, o, _v, _r in acked)
    reused = [pos for pos, c in positions.items() if c > 1]
    assert not reused, f"offsets acknowledged twice (reused after a crash?): {sorted(reused)[:10]}"

    log = ck_consume_all(shoal.bootstrap, topic, range(PARTITIONS), timeout=120)
    ends = {part: len(log[part]) for part in range(PARTITIONS)}

    # 1. Every acknowledged record is there, at its acknowledged offset, with its value.
    at = {(part, m.offset()): m.value() for part in range(PARTITIONS) for m in log[part]}
    lost = [(p, o, v, r) for p, o, v, r in acked if (p, o) not in at]
    assert not lost, (
        f"{len(lost)} acknowledged records lost, e.g. {lost[:5]} "
        f"(records read per partition: {ends}; acked per partition: "
        f"{dict(collections.Counter(p for p, *_ in acked))})")
    moved = [(p, o, v, at[(p, o)], r) for p, o, v, r in acked if at[(p, o)] != v]
    assert not moved, f"{len(moved)} acknowledged positions hold another value, e.g. {moved[:5]}"

    # 2. Offsets are dense from 0.
    for part in range(PARTITIONS):
        offsets = [m.offset() for m in log[part]]
        gap = next((i for i, o in enumerate(offsets) if o != i), None)
        assert gap is None, \
            f"partition {part}: offsets not dense: expected offset {gap}, found {offsets[gap]}"

    # 3. Every value was produced at most once (retries=0), so it is stored at most once.
    counts = collections.Counter(m.value() for part in range(PARTITIONS) for m in log[part])
    dups = [v for v, c in counts.items() if c > 1]
    assert not dups, f"{len(dups)} values stored more than once, e.g. {dups[:5]}"

    # 4. And each landed in the partition it was sent to.
    for part in range(PARTITIONS):
        for m in log[part]:
            seq = int(m.value().split(b"-")[1])
            assert seq % PARTITIONS == part, (part, m.offset(), m.value())
