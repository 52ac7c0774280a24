#!/usr/bin/env bash
# Long nemesis runs against a release build: random faults for M minutes per
# topology, then every acknowledged write checked (tests/nemesis/run.py).
#
#   bench/nemesis.sh --minutes 30                       # every topology, random seeds
#   bench/nemesis.sh --minutes 10 --topology cluster --seed 14
#
# Prints each run's PASS/FAIL lines and its summary line; the full output of
# every run is kept in a log file (path printed). Exit status 1 if any run
# failed; failed runs keep their directory (logs, history.json).
# Needs root (network namespaces, tmpfs). SHOAL_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=""
TOPOLOGIES=(standalone-file standalone-s3 cluster)
SEED=""
usage() { echo "usage: $0 --minutes M [--topology standalone-file|standalone-s3|cluster] [--seed S]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES="${2:-}"; shift 2 ;;
        --topology) TOPOLOGIES=("${2:-}"); shift 2 ;;
        --seed) SEED="${2:-}"; shift 2 ;;
        -h|--help) usage ;;
        *) usage ;;
    esac
done
[ -n "$MINUTES" ] || usage
SECONDS_OF_FAULTS=$(python3 -c "import sys; print(int(float(sys.argv[1]) * 60))" "$MINUTES")

if [ -z "${SHOAL_BIN:-}" ]; then
    cargo build --release --bin shoal
    export SHOAL_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/shoal"
fi

OUT="$(mktemp -d /tmp/shoal-nemesis-bench.XXXXXX)"
echo "binary: $SHOAL_BIN; $MINUTES min of faults per topology; output in $OUT"
status=0
for topo in "${TOPOLOGIES[@]}"; do
    seed="${SEED:-$(python3 -c 'import random; print(random.randrange(1, 1 << 31))')}"
    log="$OUT/$topo-seed$seed.log"
    run_dir="$OUT/$topo-seed$seed"
    echo "== $topo, seed $seed"
    rc=0
    python3 tests/nemesis/run.py --topology "$topo" --seconds "$SECONDS_OF_FAULTS" \
        --seed "$seed" --keep "$run_dir" >"$log" 2>&1 || rc=$?
    # release whatever a run that died abnormally may have left behind
    python3 tests/nemesis/run.py --cleanup "$run_dir" >>"$log" 2>&1 || true
    grep -E '^(PASS|FAIL) |acknowledged, .* faults, seed|^wall time' "$log" || true
    if [ "$rc" -eq 0 ]; then
        rm -rf "$run_dir"
    else
        echo "   FAILED (exit $rc): log $log, run dir $run_dir"
        status=1
    fi
done
exit "$status"
