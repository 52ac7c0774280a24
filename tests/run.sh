#!/usr/bin/env bash
# The project's one test command (CI runs it through .ci/run).
#
#   1. installs what the tests need on a fresh Debian 12 machine (kcat,
#      mosquitto-clients, openssl, the Python packages of
#      tests/requirements.txt);
#   2. builds every binary of the workspace;
#   3. starts a moto S3 server on a free loopback port, so that the storage
#      scenario suite in `cargo test` runs against s3:// as well as file://
#      (SHOAL_TEST_S3_URL + the usual AWS_* variables);
#   4. runs `cargo test --workspace` (S3 scenarios included);
#   5. runs the end-to-end suite (tests/e2e) against target/debug/shoal;
#   6. runs the nemesis (tests/nemesis): each topology for about a minute
#      of random faults, then every acknowledged write checked.
#
# Knobs: SHOAL_BIN (binary under test), SHOAL_E2E_WORKERS (pytest-xdist
# workers, default 2, 0 = no xdist), SHOAL_E2E_TIMEOUT (per-test seconds,
# default 180), SHOAL_CRASH_ROUNDS (kill -9 rounds, default 5),
# SHOAL_NEMESIS_SEEDS (default: 14 per standalone topology, 14 and 2407
# for the cluster), SHOAL_NEMESIS_SECONDS (default 60).
# Extra arguments are passed to the e2e pytest (e.g. `tests/run.sh -k kcat`).
# Needs root (apt, and the nemesis mounts tmpfs and makes network namespaces).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

log() { printf '\n==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: root is needed to run: $*" >&2
        return 1
    fi
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# --------------------------------------------------------------------------
# 1. dependencies

if ! command -v kcat >/dev/null 2>&1; then
    log "installing kcat"
    apt_install kcat
fi

if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    log "installing mosquitto-clients (mosquitto_pub, mosquitto_sub)"
    apt_install mosquitto-clients
fi

if ! command -v openssl >/dev/null 2>&1; then
    log "installing openssl (test certificates)"
    apt_install openssl
fi

if ! command -v ip >/dev/null 2>&1; then
    log "installing iproute2 (network namespaces for the nemesis)"
    apt_install iproute2
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    log "installing pip"
    apt_install python3-pip
fi

log "installing Python test dependencies"
PIP_ARGS=(install -q --disable-pip-version-check -r tests/requirements.txt)
if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    # Debian's own python3 refuses global pip installs (PEP 668).
    PIP_ARGS+=(--break-system-packages)
fi
PIP_ROOT_USER_ACTION=ignore python3 -m pip "${PIP_ARGS[@]}"

# --------------------------------------------------------------------------
# 2. build

log "cargo build --workspace --bins"
cargo build --workspace --bins

TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
export SHOAL_BIN="${SHOAL_BIN:-$TARGET_DIR/debug/shoal}"

# --------------------------------------------------------------------------
# 3. S3 emulator

MOTO_PID=""
MOTO_LOG="$(mktemp -t shoal-moto.XXXXXX)"
cleanup() {
    if [ -n "$MOTO_PID" ] && kill -0 "$MOTO_PID" 2>/dev/null; then
        kill "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
    fi
    rm -f "$MOTO_LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MOTO_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
if command -v moto_server >/dev/null 2>&1; then
    MOTO_CMD=(moto_server)
else
    MOTO_CMD=(python3 -m moto.server)
fi
log "starting S3 emulator: ${MOTO_CMD[*]} -H 127.0.0.1 -p $MOTO_PORT"
"${MOTO_CMD[@]}" -H 127.0.0.1 -p "$MOTO_PORT" >"$MOTO_LOG" 2>&1 &
MOTO_PID=$!

export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT"
export AWS_ENDPOINT="$AWS_ENDPOINT_URL"
export AWS_ALLOW_HTTP=true

# Wait until it answers (polling, with a deadline), then create the bucket.
if ! python3 - "$MOTO_PID" "$AWS_ENDPOINT_URL" <<'PY'
import os, sys, time, urllib.request

pid, url = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 60
last = None
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("moto server exited before it was ready")
    try:
        with urllib.request.urlopen(url + "/", timeout=2) as resp:
            if resp.status == 200:
                break
    except Exception as e:  # not listening yet
        last = e
    if time.monotonic() > deadline:
        sys.exit(f"moto server not ready after 60s: {last!r}")
    time.sleep(0.1)

import boto3

s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.create_bucket(Bucket="shoal-test")
print(f"S3 emulator ready at {url}, bucket shoal-test created", file=sys.stderr)
PY
then
    echo "--- moto log ---" >&2
    cat "$MOTO_LOG" >&2 || true
    exit 1
fi
export SHOAL_TEST_S3_URL="s3://shoal-test/scenarios"

# --------------------------------------------------------------------------
# 4. unit, integration and storage scenario tests

log "cargo test --workspace (S3 scenarios on $AWS_ENDPOINT_URL)"
# The S3 scenarios are #[ignore]d unless asked for: here they must run.
cargo test --workspace -- --include-ignored

# --------------------------------------------------------------------------
# 5. end-to-end tests against the binary

PYTEST_ARGS=(-q -p no:cacheprovider -rfEs --durations=15 --timeout "${SHOAL_E2E_TIMEOUT:-180}")
WORKERS="${SHOAL_E2E_WORKERS:-2}"
if [ "$WORKERS" != "0" ]; then
    PYTEST_ARGS+=(-n "$WORKERS")
fi
log "pytest tests/e2e (binary: $SHOAL_BIN)"
python3 -m pytest "${PYTEST_ARGS[@]}" tests/e2e "$@"

# --------------------------------------------------------------------------
# 6. the nemesis: random faults against each topology in turn (one at a
#    time: each runs a whole cluster), then every acknowledged write checked

log "pytest tests/nemesis (seeds ${SHOAL_NEMESIS_SEEDS:-14 (cluster: 14 2407)}, ${SHOAL_NEMESIS_SECONDS:-60} s of faults per topology)"
python3 -m pytest -q -p no:cacheprovider -rfEs -s tests/nemesis/test_checks.py tests/nemesis/test_nemesis.py
