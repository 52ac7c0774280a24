"""`shoal-compactor-lambda` driven the way AWS Lambda drives it.

A small Lambda Runtime API emulator (the HTTP API a custom runtime polls:
`/2018-06-01/runtime/invocation/next`, `.../{id}/response`, `.../{id}/error`,
`/runtime/init/error`) runs in this process; the Lambda binary is started
against it with the environment Lambda gives a function, and each test hands
it EventBridge scheduled events with a chosen deadline. The broker is a
standalone node on the S3 emulator with its own compactor turned off, so the
Lambda is the only thing that compacts (skipped when SHOAL_TEST_S3_URL is not
set, never in CI).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import pytest

from clients import DeliveryLog, ck_consume_all, ck_create_topic, ck_producer
from harness import shoal_bin, unique_name, wait_for

S3_URL = os.environ.get("SHOAL_TEST_S3_URL")

# In CI (CI=true) the harness always provides the emulator: never skip there.
pytestmark = pytest.mark.skipif(not S3_URL and not os.environ.get("CI"), reason="SHOAL_TEST_S3_URL not set (tests/run.sh sets it)")

FUNCTION_NAME = "shoal-compactor"
REGION = "us-east-1"
ACCOUNT = "123456789012"
FUNCTION_ARN = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{FUNCTION_NAME}"
RULE_ARN = f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{FUNCTION_NAME}"

#: Deadline margin the Lambda runs with: no new work once less time is left.
DEADLINE_MARGIN_S = 30

TOPICS = 3
PARTITIONS = 2
RECORDS_PER_ROUND = 20  # per partition


def lambda_bin() -> str:
    """The Lambda binary: next to the shoal binary (same cargo target dir)."""
    return os.environ.get("SHOAL_LAMBDA_BIN") or str(
        Path(shoal_bin()).with_name("shoal-compactor-lambda"))


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------
# Lambda Runtime API emulator


class RuntimeApi:
    """The Lambda Runtime API on a free loopback port, serving one function
    instance. `invoke()` queues an event; the runtime's long-polling
    `GET .../invocation/next` picks it up; its `POST .../response` (or
    `.../error`) is recorded under the request id."""

    API = "/2018-06-01/runtime"

    def __init__(self):
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.cond = threading.Condition()
        self.results: dict[str, dict] = {}  # request id -> what the runtime posted
        self.delivered: dict[str, dict] = {}  # request id -> the invocation as handed out
        self.init_errors: list[dict] = []
        self.requests: list[str] = []  # "METHOD path -> status", the emulator's view
        self.stopping = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1: the runtime's hyper client keeps its connection alive.
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet; see api.requests
                pass

            def do_GET(self):
                if self.path == f"{api.API}/invocation/next":
                    api._next(self)
                else:
                    self._reply(404, {"errorMessage": f"unknown path {self.path}"})

            def do_POST(self):
                body = self._read_body()
                parts = self.path.split("/")
                # /2018-06-01/runtime/invocation/{id}/{response|error}
                if self.path.startswith(f"{api.API}/invocation/") and len(parts) == 6 \
                        and parts[5] in ("response", "error"):
                    ok = api._complete(parts[4], parts[5], body, dict(self.headers))
                    if ok:
                        self._reply(202, {"status": "OK"})
                    else:
                        self._reply(400, {"errorMessage": f"unknown request id {parts[4]}",
                                          "errorType": "InvalidRequestID"})
                elif self.path == f"{api.API}/init/error":
                    api._init_error(body, dict(self.headers))
                    self._reply(202, {"status": "OK"})
                else:
                    self._reply(404, {"errorMessage": f"unknown path {self.path}"})

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, doc: Any, headers: Optional[dict] = None) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the function was killed meanwhile
                    self.close_connection = True
                api._log(f"{self.command} {self.path} -> {status}")

        self.Handler = Handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="lambda-runtime-api",
                                       daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _log(self, line: str) -> None:
        with self.cond:
            self.requests.append(line)

    # ---- the runtime's side ------------------------------------------------

    def _next(self, handler) -> None:
        # Long poll, as Lambda does: answer only once an event is queued.
        while True:
            if self.stopping.is_set():
                handler.close_connection = True  # teardown: no more invocations
                return
            try:
                inv = self.events.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        # The deadline runs from when the function receives the event.
        inv["deadline_ms"] = now_ms() + inv.pop("timeout_ms")
        inv["delivered_ms"] = now_ms()
        with self.cond:
            self.delivered[inv["request_id"]] = inv
        handler._reply(200, inv["event"], {
            "Lambda-Runtime-Aws-Request-Id": inv["request_id"],
            "Lambda-Runtime-Deadline-Ms": str(inv["deadline_ms"]),
            "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
            "Lambda-Runtime-Trace-Id": inv["trace_id"],
        })

    def _complete(self, request_id: str, kind: str, body: bytes, headers: dict) -> bool:
        with self.cond:
            if request_id not in self.delivered or request_id in self.results:
                return False
            try:
                doc = json.loads(body) if body else None
            except ValueError:
                doc = {"unparseable": body.decode(errors="replace")}
            self.results[request_id] = {"kind": kind, "body": doc, "headers": headers,
                                        "received_ms": now_ms()}
            self.cond.notify_all()
            return True

    def _init_error(self, body: bytes, headers: dict) -> None:
        with self.cond:
            self.init_errors.append({"body": body.decode(errors="replace"), "headers": headers})
            self.cond.notify_all()

    # ---- the test's side ---------------------------------------------------

    def queue_invocation(self, event: dict, timeout_s: float) -> str:
        request_id = str(uuid.uuid4())
        trace = f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};" \
                f"Parent={uuid.uuid4().hex[:16]};Sampled=0"
        self.events.put({"request_id": request_id, "event": event, "trace_id": trace,
                         "timeout_ms": int(timeout_s * 1000)})
        return request_id

    def view(self) -> str:
        with self.cond:
            return (f"runtime API requests: {self.requests[-20:]}\n"
                    f"init errors: {self.init_errors}\nresults: {self.results}")


def scheduled_event() -> dict:
    """What an EventBridge schedule rule delivers to its target."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [RULE_ARN],
        "detail": {},
    }


# --------------------------------------------------------------------------
# the Lambda function process


class CompactorLambda:
    """`shoal-compactor-lambda` as one warm Lambda instance: started once,
    invoked any number of times through the runtime API emulator.

    Shaped like harness.Shoal where the conftest failure hook looks
    (name, proc, is_running, log_path, log_tail, cleanup), so its log is
    attached to a failing test's report next to the broker's."""

    def __init__(self, workdir: Path, placement: str, object_store: str,
                 extra_env: Optional[dict[str, str]] = None):
        self.name = "compactor-lambda"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "compactor-lambda.log"
        self.placement = placement
        self.object_store = object_store
        self.extra_env = dict(extra_env or {})
        self.api = RuntimeApi()
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None

    def child_env(self) -> dict[str, str]:
        # Like Shoal.child_env: the harness' own SHOAL_* variables are not
        # configuration for the binary. The AWS_* ones (S3 emulator) pass.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update({
            "RUST_BACKTRACE": "1",
            "AWS_LAMBDA_RUNTIME_API": self.api.address,
            "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAME,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{FUNCTION_NAME}",
            "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]")
                                          + uuid.uuid4().hex,
            "SHOAL_PLACEMENT": self.placement,
            "SHOAL_OBJECT_STORE": self.object_store,
        })
        env.update(self.extra_env)
        return env

    def start(self) -> "CompactorLambda":
        binary = lambda_bin()
        assert os.access(binary, os.X_OK), f"lambda binary not found or not executable: {binary}"
        self._log_file = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen([binary], stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=self._log_file, env=self.child_env(),
                                     cwd=str(self.workdir))
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) + "\n--- emulator ---\n" + \
            self.api.view()

    def invoke(self, timeout_s: float, wait: float = 180.0) -> tuple[dict, dict]:
        """One scheduled invocation with a deadline `timeout_s` ahead.
        Returns (the invocation as delivered, the function's JSON answer)."""
        request_id = self.api.queue_invocation(scheduled_event(), timeout_s)

        def answered():
            with self.api.cond:
                if self.api.init_errors:
                    raise AssertionError(f"the function reported an init error\n{self.log_tail()}")
                result = self.api.results.get(request_id)
            if result is None and not self.is_running():
                raise AssertionError(f"the function exited with code {self.proc.returncode} "
                                     f"before answering\n{self.log_tail()}")
            return result

        # ignore=(): a dead process or an init error fails right away.
        result = wait_for(answered, wait, f"the answer to invocation {request_id}",
                          interval=0.05, ignore=())
        assert result["kind"] == "response", \
            f"invocation {request_id} failed: {result}\n{self.log_tail()}"
        return self.api.delivered[request_id], result["body"]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if not self.api.stopping.is_set():
            self.api.stop()


# --------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def broker(shoal_factory):
    """A standalone node on its own prefix of the S3 emulator's bucket, with
    its in-process compactor off: only the Lambda compacts."""
    url = urllib.parse.urlparse(S3_URL)
    prefix = f"{url.path.strip('/')}/e2e-{unique_name('lambda')}".strip("/")
    shoal = shoal_factory(object_store=f"s3://{url.netloc}/{prefix}",
                          extra_args=["--compaction", "false"], flush_interval="100ms")
    shoal.start()
    yield shoal


@pytest.fixture
def compactor_lambda(broker, tmp_path, request):
    fn = CompactorLambda(
        tmp_path / "lambda", placement=broker.http_addr, object_store=broker.object_store,
        extra_env={
            # Flush objects are eligible as soon as they exist.
            "SHOAL_COMPACTION_DELAY": "0s",
            "SHOAL_DEADLINE_MARGIN": f"{DEADLINE_MARGIN_S}s",
        })
    # The conftest failure hook attaches the logs of everything listed here.
    request.node._shoal_instances.append(fn)
    fn.start()
    yield fn
    fn.cleanup()


class Workload:
    """TOPICS topics x PARTITIONS partitions; remembers every value sent."""

    def __init__(self, shoal):
        self.shoal = shoal
        self.topics = [unique_name(f"lam{i}") for i in range(TOPICS)]
        self.sent: dict[str, dict[int, list[bytes]]] = {
            t: {p: [] for p in range(PARTITIONS)} for t in self.topics}
        self.rounds = 0
        for t in self.topics:
            ck_create_topic(shoal.bootstrap, t, PARTITIONS)

    def produce_rounds(self, rounds: int) -> None:
        """Each round is flushed to object storage before the next starts, so
        every round adds at least one small flush object to every stream."""
        producer = ck_producer(self.shoal.bootstrap, **{"acks": "all"})
        log = DeliveryLog()
        for _ in range(rounds):
            r = self.rounds
            for t in self.topics:
                for p in range(PARTITIONS):
                    for i in range(RECORDS_PER_ROUND):
                        value = f"{t}|p{p}|r{r:02d}|{i:03d}|".encode() + b"x" * (i * 7)
                        producer.produce(t, value=value, partition=p, on_delivery=log)
                        self.sent[t][p].append(value)
            assert producer.flush(60) == 0, "records left undelivered"
            assert not log.errors, log.errors[:5]
            for t in self.topics:
                self.shoal.wait_flushed(t, {p: len(v) for p, v in self.sent[t].items()})
            self.rounds += 1
        assert len(log.ok) == rounds * TOPICS * PARTITIONS * RECORDS_PER_ROUND

    def files(self, topic: str) -> list[dict]:
        resp = self.shoal.http(f"/api/v1/streams/{topic}/files")
        assert resp.status == 200, f"/files of {topic}: {resp.status} {resp.text[:300]}"
        return sorted(resp.json()["files"], key=lambda f: f["key"])

    def all_files(self) -> dict[str, list[dict]]:
        return {t: self.files(t) for t in self.topics}

    def assert_all_readable(self) -> None:
        """Every record sent, exactly once, in order, at offsets 0..n-1."""
        for t in self.topics:
            got = ck_consume_all(self.shoal.bootstrap, t, range(PARTITIONS))
            for p in range(PARTITIONS):
                values = [m.value() for m in got[p]]
                want = self.sent[t][p]
                assert len(values) == len(want), f"{t}/{p}: read {len(values)} of {len(want)}"
                assert values == want, f"{t}/{p}: values differ from those sent"
                assert [m.offset() for m in got[p]] == list(range(len(want))), f"{t}/{p}"


def flush_keys(files: list[dict]) -> list[str]:
    return [f["key"] for f in files if f["key"].startswith("segments/")]


def assert_compacted(topic: str, files: list[dict]) -> None:
    """Only per-shard compacted files, and only a handful per partition."""
    per_shard: dict[int, int] = {}
    for f in files:
        assert f["key"].startswith(f"streams/{topic}/shard="), \
            f"{topic}: not a compacted file: {f['key']} (all: {[x['key'] for x in files]})"
        shard = int(f["key"].split("shard=")[1].split("/")[0])
        assert [s["shard"] for s in f["shards"]] == [shard], f
        per_shard[shard] = per_shard.get(shard, 0) + 1
    assert sorted(per_shard) == list(range(PARTITIONS)), (topic, per_shard)
    assert all(n <= 2 for n in per_shard.values()), (topic, per_shard)


def assert_clean_run(answer: dict, *, unfinished: bool) -> dict:
    assert answer.get("status") == "done", answer
    run = answer["run"]
    assert run["errors"] == [], run
    assert run["unfinished"] is unfinished, run
    assert run["holder"].startswith("lambda-"), run
    return run


def recorded_runs(shoal) -> list[dict]:
    resp = shoal.http("/api/v1/compaction")
    assert resp.status == 200, resp.text[:300]
    return resp.json()["runs"]


# --------------------------------------------------------------------------
# tests


def test_scheduled_lambda_compacts_on_s3(broker, compactor_lambda):
    work = Workload(broker)
    rounds = 15
    work.produce_rounds(rounds)
    before = work.all_files()
    for t, files in before.items():
        # One flush object per round at least, each holding a piece of t.
        assert len(flush_keys(files)) >= rounds, (t, [f["key"] for f in files])
        assert len(flush_keys(files)) == len(files), (t, [f["key"] for f in files])

    _inv, answer = compactor_lambda.invoke(timeout_s=300)
    run = assert_clean_run(answer, unfinished=False)
    assert run["objects_out"] > 0 and run["objects_in"] > 0, run
    assert run["bytes_out"] > 0, run
    # Placement keeps the record of the run the Lambda reported.
    assert any(r["holder"] == run["holder"] and r["epoch"] == run["epoch"]
               for r in recorded_runs(broker)), recorded_runs(broker)

    for t, files in work.all_files().items():
        assert_compacted(t, files)
    work.assert_all_readable()

    # After a restart the broker's memory tail is gone: reads now come from
    # the compacted files in the bucket.
    broker.restart()
    work.assert_all_readable()


def test_a_short_deadline_stops_early_and_leaves_consistent_state(broker, compactor_lambda):
    work = Workload(broker)
    rounds = 6
    work.produce_rounds(rounds)
    before = work.all_files()
    for t, files in before.items():
        assert len(flush_keys(files)) >= rounds, (t, [f["key"] for f in files])

    # 2 s left is below the margin: the run must start no rewrite at all,
    # and answer (well) before the deadline.
    inv, answer = compactor_lambda.invoke(timeout_s=2)
    run = assert_clean_run(answer, unfinished=True)
    assert run["objects_out"] == 0 and run["objects_in"] == 0, run
    assert run["objects_deleted"] == 0, run
    result = compactor_lambda.api.results[inv["request_id"]]
    assert result["received_ms"] <= inv["deadline_ms"], (result["received_ms"], inv)

    assert work.all_files() == before
    work.assert_all_readable()

    # The next scheduled invocation, with time to spare, does the work (the
    # same warm instance: the process serves invocation after invocation).
    _inv, answer = compactor_lambda.invoke(timeout_s=300)
    run = assert_clean_run(answer, unfinished=False)
    assert run["objects_out"] > 0 and run["objects_in"] > 0, run
    for t, files in work.all_files().items():
        assert_compacted(t, files)
    work.assert_all_readable()
    broker.restart()
    work.assert_all_readable()


# --------------------------------------------------------------------------
# the cluster secret from Secrets Manager


def test_the_cluster_secret_comes_from_secrets_manager(shoal_factory, tmp_path, request):
    """SHOAL_CLUSTER_SECRET_ARN: the function reads the cluster secret from
    Secrets Manager (the S3 emulator serves that API too) and presents it
    to a placement that requires it; with an ARN that names no secret it
    exits at start (Lambda reports that as an init failure), saying why."""
    import boto3

    secret = "lambda-" + uuid.uuid4().hex
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(secret + "\n")
    url = urllib.parse.urlparse(S3_URL)
    prefix = f"{url.path.strip('/')}/e2e-{unique_name('lambda-sm')}".strip("/")
    broker = shoal_factory(object_store=f"s3://{url.netloc}/{prefix}",
                           extra_args=["--compaction", "false",
                                       "--cluster-secret-file", str(secret_file)],
                           flush_interval="100ms")
    broker.token = secret
    broker.start()
    Workload(broker).produce_rounds(2)

    sm = boto3.client("secretsmanager", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                      region_name=REGION)
    arn = sm.create_secret(Name=unique_name("shoal-cluster-secret"), SecretString=secret)["ARN"]

    def function(name: str, secret_arn: str) -> CompactorLambda:
        fn = CompactorLambda(tmp_path / name, placement=broker.http_addr,
                             object_store=broker.object_store,
                             extra_env={"SHOAL_CLUSTER_SECRET_ARN": secret_arn,
                                        "SHOAL_COMPACTION_DELAY": "0s"})
        request.node._shoal_instances.append(fn)
        return fn.start()

    fn = function("lambda", arn)
    try:
        _inv, answer = fn.invoke(timeout_s=300)
        run = assert_clean_run(answer, unfinished=False)
        assert run["objects_in"] > 0, run
        assert secret not in fn.log_text()
    finally:
        fn.cleanup()

    missing = function("lambda-missing", arn.rsplit(":", 1)[0] + ":no-such-secret-AbCdEf")
    try:
        wait_for(lambda: not missing.is_running(), 60, "the function to exit")
        assert missing.proc.returncode != 0
        assert "ResourceNotFoundException" in missing.log_text(), missing.log_tail()
    finally:
        missing.cleanup()
