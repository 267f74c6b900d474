#!/usr/bin/env bash
# Instructions per order: `ordermesh dev` under valgrind's callgrind, driven by an open loop of
# `ordermesh bench`, prints the server's user-space instructions per confirmed order.
#
#   examples/instructions_per_order.sh [RATE] [SECONDS]      # default 150 orders/s for 15 s
#
# On a shared machine orders/s and CPU per order move by 20% between runs of one binary; this
# figure moved by 0.3% (two runs: 519.2 k and 520.6 k), so it can tell a 1% change apart. It
# counts no kernel time and no cache misses, and at this low rate every commit group is small
# and every drain into sled short: use it to compare two builds, not as a throughput figure.
# The bench (the generator) runs outside valgrind.
#
# Uses $ORDERMESH_BIN, else <target dir>/release/ordermesh (built if missing); needs valgrind
# (`apt-get install valgrind`). KEEP=FILE keeps the callgrind profile for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

rate=${1:-150}
seconds=${2:-15}
bin=${ORDERMESH_BIN:-${CARGO_TARGET_DIR:-target}/release/ordermesh}
[ -x "$bin" ] || cargo build --release --bin ordermesh
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
unset ORDERMESH_BIN

dir=$(mktemp -d)
port=${BENCH_PORT:-18097}
export ORDERMESH_JWT_SECRET=instructions-per-order-secret-long-enough-0123456789
export ORDERMESH_LOG=warn
valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    "$bin" dev --http "127.0.0.1:$port" --data-dir "$dir/data" >"$dir/dev.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 600); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
curl -sf "127.0.0.1:$port/readyz" >/dev/null || { cat "$dir/dev.log" >&2; exit 1; }

# A short run first (seeds the skus, warms the caches), then the counters start from zero.
"$bin" bench --target "http://127.0.0.1:$port" --rate 20 --duration 3s >/dev/null 2>&1
callgrind_control -z "$pid" >/dev/null 2>&1
out=$("$bin" bench --target "http://127.0.0.1:$port" --rate "$rate" --duration "${seconds}s" --json 2>/dev/null | tail -1)
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 1
profile=$(ls -t "$dir"/callgrind.out.* | head -1)
[ -n "${KEEP:-}" ] && cp "$profile" "$KEEP"
instructions=$(awk '/^summary:/ {print $2}' "$profile")
python3 - "$out" "$instructions" <<'PY'
import json, sys
o = json.loads(sys.argv[1])
confirmed = max(o["confirmed"], 1)
print(f"confirmed {confirmed}  instructions per order {int(sys.argv[2]) / confirmed / 1e3:.1f} k  "
      f"place p99 {o['place_p99_ms']} ms (under valgrind)")
PY
