"""Fixtures for the Shoal end-to-end tests.

* `shoal`          - a started broker on free ports with its own data dir.
* `shoal_factory`  - build more brokers (not started) with custom options.

Every broker a test makes is killed when the test ends, and when a test fails
the tail of each broker's log is attached to the failure report.

The harness itself (the `Shoal` class, `wait_for`, ...) lives in harness.py so
that test modules can import it; it is re-exported here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402,F401  (re-exported for tests)
    Shoal,
    ShoalStartError,
    free_port,
    shoal_bin,
    unique_name,
    wait_for,
)


def pytest_report_header(config):
    binary = shoal_bin()
    state = "found" if os.access(binary, os.X_OK) else "MISSING"
    return [f"shoal binary: {binary} ({state})"]


@pytest.fixture
def shoal_factory(tmp_path, request):
    """Returns make(**options) -> Shoal (not started). Options are those of
    `Shoal.__init__`. All instances are killed at teardown."""
    instances: list[Shoal] = []
    request.node._shoal_instances = instances

    def make(**options) -> Shoal:
        name = options.pop("name", f"shoal{len(instances)}")
        inst = Shoal(tmp_path / name, name=name, **options)
        instances.append(inst)
        return inst

    yield make
    for inst in instances:
        inst.cleanup()


@pytest.fixture
def shoal(shoal_factory) -> Shoal:
    """A running broker: 1 default partition, 100 ms flush interval, file://
    object store under its data dir."""
    inst = shoal_factory(name="shoal")
    inst.start()
    yield inst  # shoal_factory kills it at teardown


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for inst in getattr(item, "_shoal_instances", []):
            alive = "running" if inst.is_running() else (
                f"exited with {inst.proc.returncode}" if inst.proc is not None else "never started")
            report.sections.append((
                f"shoal log tail [{inst.name}, {alive}] {inst.log_path}",
                inst.log_tail(120),
            ))
    return report
