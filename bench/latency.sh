#!/usr/bin/env bash
# Produce latency at 20, 50 and 80 % of the sustained peak, 1 and 16
# partitions, with bench/loadgen (paced, open loop, client-side
# percentiles). Each point gets a fresh release `shoal standalone` with
# default flags (file:// objects on the same disk as the WAL).
#
#   bench/latency.sh [PEAK_1_PARTITION PEAK_16_PARTITIONS]   # records/s
#
# Find the peaks first: the highest --rate at which loadgen reports no
# errors and shoal_unflushed_bytes is back near 0 at the end of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK1=${1:-210000}
PEAK16=${2:-190000}
SECONDS_PER_POINT=${SECONDS_PER_POINT:-20}
cargo build --release -p shoal --bin shoal && cargo build --release -p shoal-loadgen
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo -n "disk (dd 4 MiB blocks, oflag=dsync, 1 GiB): "
dd if=/dev/zero of=bench-dd.tmp bs=4M count=256 oflag=dsync 2>&1 | tail -1
rm -f bench-dd.tmp
echo "partitions rate MB/s errors p50 p90 p99 p99.9 max (ms)"
for parts in 1 16; do
  peak=$PEAK1; [ "$parts" = 16 ] && peak=$PEAK16
  for pct in 20 50 80; do
    rate=$((peak * pct / 100))
    dir=$(mktemp -d /var/tmp/shoal-latency.XXXXXX)
    kport=$(port); hport=$(port)
    ./target/release/shoal standalone --data-dir "$dir/data" --kafka-addr "127.0.0.1:$kport" \
      --http-addr "127.0.0.1:$hport" >"$dir/shoal.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$hport/health" >/dev/null && break; sleep 0.1; done
    ./target/release/shoal-loadgen --bootstrap "127.0.0.1:$kport" --partitions "$parts" \
      --rate "$rate" --seconds "$SECONDS_PER_POINT" --warmup-seconds 5 \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['partitions'], d['target_rate'], d['mb_per_s'], d['errors'], d['p50_ms'], d['p90_ms'], d['p99_ms'], d['p999_ms'], d['max_ms'])"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
  done
done
