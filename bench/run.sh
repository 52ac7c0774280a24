#!/usr/bin/env bash
# Produce benchmark: release build, a fresh standalone broker, the disk's
# fsync'd sequential write speed, then 1 and 16 partitions at full rate and
# at half the peak rate (for latency). Prints JSON lines; copy the figures
# into docs/benchmarks.md with the date and machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-15}
PROCS=${PROCS:-2}
cargo build --release --bin shoal
dir=$(mktemp -d /tmp/shoal-bench.XXXXXX)
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
kport=$(port); hport=$(port)
./target/release/shoal standalone --data-dir "$dir/data" --kafka-addr "127.0.0.1:$kport" \
  --http-addr "127.0.0.1:$hport" >"$dir/shoal.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$hport/health" >/dev/null && break; sleep 0.1; done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo -n "disk (dd 4 MiB blocks, oflag=dsync, 1 GiB): "
dd if=/dev/zero of="$dir/data/ddtest" bs=4M count=256 oflag=dsync 2>&1 | tail -1
rm -f "$dir/data/ddtest"

metrics="http://127.0.0.1:$hport/metrics"
for parts in 1 16; do
  peak=$(python3 bench/produce.py --bootstrap "127.0.0.1:$kport" --partitions "$parts" \
    --seconds "$SECONDS_PER_RUN" --procs "$PROCS" --metrics-url "$metrics")
  echo "peak:      $peak"
  rate=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['records_per_s']//2)" "$peak")
  half=$(python3 bench/produce.py --bootstrap "127.0.0.1:$kport" --partitions "$parts" \
    --seconds "$SECONDS_PER_RUN" --procs "$PROCS" --rate "$rate" --metrics-url "$metrics")
  echo "half-peak: $half"
done
