"""The `shoal` command line: errors are reported clearly and configuration
layers (TOML file < SHOAL_* environment < flags) take precedence in order."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from clients import kp_admin, kp_consume, kp_producer, kp_topic_partitions
from harness import free_port, shoal_bin, unique_name

EXIT_TIMEOUT = 60


def child_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.setdefault("RUST_BACKTRACE", "1")
    env.update(extra or {})
    return env


def run_shoal(args: list[str], env=None, timeout: float = EXIT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run the binary expecting it to exit on its own."""
    if not os.access(shoal_bin(), os.X_OK):
        pytest.fail(f"shoal binary not found: {shoal_bin()}")
    proc = subprocess.Popen([shoal_bin(), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(env))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"`shoal {' '.join(args)}` did not exit within {timeout:.0f}s\n"
                    f"stderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def standalone_args(data_dir, kafka_port=None, http_port=None) -> list[str]:
    return [
        "standalone",
        "--data-dir", str(data_dir),
        "--kafka-addr", f"127.0.0.1:{kafka_port or free_port()}",
        "--http-addr", f"127.0.0.1:{http_port or free_port()}",
        "--mqtt-addr", f"127.0.0.1:{free_port()}",
        "--flush-interval", "100ms",
    ]


def assert_clean_failure(res: subprocess.CompletedProcess) -> str:
    """Non-zero exit, an error message on stderr, no panic. Returns stderr."""
    assert res.returncode != 0, f"exit code 0\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode > 0, f"killed by signal {-res.returncode}\nstderr:\n{res.stderr[-3000:]}"
    assert res.stderr.strip(), "no error message on stderr"
    assert "panicked" not in res.stderr, f"the binary panicked:\n{res.stderr[-3000:]}"
    return res.stderr


def test_help_lists_the_flags():
    res = run_shoal(["standalone", "--help"])
    assert res.returncode == 0, res.stderr
    for flag in ("--data-dir", "--kafka-addr", "--http-addr", "--object-store", "--flush-interval",
                 "--flush-bytes", "--default-partitions", "--config"):
        assert flag in res.stdout, f"{flag} missing from --help:\n{res.stdout}"


def test_bad_flag_is_a_one_line_error(tmp_path):
    res = run_shoal([*standalone_args(tmp_path / "data"), "--no-such-flag"])
    err = assert_clean_failure(res)
    first = next(line for line in err.splitlines() if line.strip())
    assert "no-such-flag" in first, f"the first line does not name the bad flag: {first!r}"
    assert "error" in first.lower(), first
    assert not (tmp_path / "data" / "objects").exists()


def test_bad_flag_value_is_an_error(tmp_path):
    res = run_shoal([*standalone_args(tmp_path / "data"), "--default-partitions", "many"])
    err = assert_clean_failure(res)
    assert "many" in err or "default-partitions" in err, err


@pytest.mark.parametrize("busy", ["kafka", "http"])
def test_port_in_use(tmp_path, busy):
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(8)
    port = blocker.getsockname()[1]
    try:
        if busy == "kafka":
            args = standalone_args(tmp_path / "data", kafka_port=port)
        else:
            args = standalone_args(tmp_path / "data", http_port=port)
        res = run_shoal(args)
    finally:
        blocker.close()
    err = assert_clean_failure(res)
    lowered = err.lower()
    assert str(port) in err or "in use" in lowered, \
        f"the error does not say which address is taken:\n{err[-3000:]}"


def test_unusable_data_dir(tmp_path):
    not_a_dir = tmp_path / "regular-file"
    not_a_dir.write_text("I am a file, not a directory\n")
    res = run_shoal(standalone_args(not_a_dir / "data"))
    assert_clean_failure(res)
    assert not_a_dir.read_text() == "I am a file, not a directory\n"


def auto_created_partitions(shoal) -> int:
    """Auto-create a topic by producing to it; its partition count as the
    Kafka metadata reports it (checked against the streams API)."""
    bootstrap = shoal.bootstrap
    topic = unique_name("auto")
    p = kp_producer(bootstrap)
    try:
        p.send(topic, value=b"x").get(timeout=60)
        from_producer = len(p.partitions_for(topic))
    finally:
        p.close(timeout=10)
    admin = kp_admin(bootstrap)
    try:
        parts = kp_topic_partitions(admin, topic)
    finally:
        admin.close()
    assert parts is not None and len(parts) == from_producer, (parts, from_producer)
    doc = shoal.stream(topic)
    assert doc is not None and doc["partitions"] == from_producer, doc
    return from_producer


def test_config_precedence_file_env_flag(shoal_factory, tmp_path):
    config = tmp_path / "shoal.toml"
    config.write_text("default-partitions = 2\n")  # keys as in docs/configuration.md

    # 1. the TOML file alone
    s = shoal_factory(name="file", default_partitions=None, config_file=config)
    s.start()
    assert auto_created_partitions(s) == 2
    s.stop()

    # 2. the environment overrides the file
    s = shoal_factory(name="env", default_partitions=None, config_file=config,
                      env={"SHOAL_DEFAULT_PARTITIONS": "3"})
    s.start()
    assert auto_created_partitions(s) == 3
    s.stop()

    # 3. a flag overrides both
    s = shoal_factory(name="flag", default_partitions=4, config_file=config,
                      env={"SHOAL_DEFAULT_PARTITIONS": "3"})
    s.start()
    assert auto_created_partitions(s) == 4
    s.stop()


def test_env_alone_configures(shoal_factory):
    s = shoal_factory(name="envonly", default_partitions=None,
                      env={"SHOAL_DEFAULT_PARTITIONS": "5"})
    s.start()
    assert auto_created_partitions(s) == 5


def test_sigterm_stops_cleanly(shoal):
    """SIGTERM: the broker exits 0 on its own (docs/operations.md), and what it
    acknowledged is there after the restart."""
    topic = unique_name("sigterm")
    p = kp_producer(shoal.bootstrap, acks="all")
    try:
        for i in range(10):
            p.send(topic, value=f"v{i}".encode(), partition=0)
        p.flush(timeout=60)
    finally:
        p.close(timeout=10)
    rc = shoal.stop(timeout=30)
    assert rc == 0, f"exit code {rc} after SIGTERM (-9: had to be killed)\n{shoal.log_tail()}"
    shoal.start()
    recs = kp_consume(shoal.bootstrap, topic, 10, partitions=[0])
    assert [r.value for r in recs] == [f"v{i}".encode() for i in range(10)]
