#!/usr/bin/env bash
# Instructions per order: `ordermesh dev` under valgrind's callgrind, driven by an open loop of
# `ordermesh bench`, prints the server's user-space instructions per confirmed order.
#
#   examples/instructions_per_order.sh [RATE] [SECONDS]      # default 150 orders/s for 15 s
#
# On a shared machine orders/s and CPU per order move by 20% between runs of one binary; this
# figure moved by 0.1-0.6% between runs of one binary (by 1%, 382.4 k against 386.4 k, while
# the machine was busy with other work in session 15), so it tells apart changes of a few
# percent, and a 1% one only over several runs each. It
# counts no kernel time and no cache misses, and at this low rate every commit group is small
# and every drain into sled short: use it to compare two builds, not as a throughput figure.
# The server logs at `warn` (so the per-request span is off, as in the other benchmarks); the
# bench (the generator) runs outside valgrind.
#
# Uses $ORDERMESH_BIN, else builds <target dir>/release/ordermesh; needs valgrind
# (`apt-get install valgrind`), curl and python3. KEEP=FILE keeps the callgrind profile for
# callgrind_annotate.
set -euo pipefail

for tool in valgrind callgrind_control curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (valgrind: apt-get install valgrind)" >&2; exit 1; }
done
rate=${1:-150}
seconds=${2:-15}
keep=${KEEP:+$(realpath -m "$KEEP")}
source "$(dirname "$0")/lib.sh"
resolve_bin
cd "$(dirname "$0")/.."

dir=$(mktemp -d)
port=$(free_port)
export ORDERMESH_JWT_SECRET=instructions-per-order-secret-long-enough-0123456789
export ORDERMESH_LOG=warn
valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    "$bin" dev --http "127.0.0.1:$port" --data-dir "$dir/data" >"$dir/dev.log" 2>&1 &
pid=$!
bench=""
trap '{ [ -n "$bench" ] && kill $bench 2>/dev/null; } || true; kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
wait_ready "$port" "$pid" "$dir/dev.log"

# One bench run with a warm-up at the same rate (seeds the skus, warms the caches, and places
# more orders than the bench has customers, 1,000 in turn, so every token it minted has been
# verified once, as in a long run: a token's first check costs about 17 k instructions, its
# later ones a cache lookup). The counters start from zero when the bench says its measured
# window starts; the orders are counted by the server's own counter over the same span
# (`orders_completed_total{outcome="confirmed"}`), so the lag of that zeroing does not matter.
# (The two reads of the counter fall inside the counted span: a small constant bias, the same
# for every build, of a few tenths of a percent at the default rate.)
confirmed() {
    local n
    n=$(curl -sf --max-time 5 "127.0.0.1:$port/metrics" | awk '/^orders_completed_total\{outcome="confirmed"\}/ {print $2}') || true
    [ -n "$n" ] || { echo "cannot read orders_completed_total from the server's /metrics" >&2; return 1; }
    echo "$n"
}
warmup=$(python3 -c "import math, sys; print(math.ceil(1000 / float(sys.argv[1])) + 1)" "$rate")
"$bin" bench --target "http://127.0.0.1:$port" --rate "$rate" --warmup "${warmup}s" --duration "${seconds}s" --json \
    >"$dir/bench.out" 2>"$dir/bench.err" &
bench=$!
for _ in $(seq 1200); do
    grep -q "measured window starts" "$dir/bench.err" 2>/dev/null && break
    kill -0 "$bench" 2>/dev/null || break
    sleep 0.05
done
grep -q "measured window starts" "$dir/bench.err" || { echo "the bench did not start measuring:" >&2; cat "$dir/bench.err" >&2; exit 1; }
callgrind_control -z "$pid" >/dev/null
before=$(confirmed)
wait "$bench" || { echo "the bench failed:" >&2; cat "$dir/bench.err" >&2; exit 1; }
after=$(confirmed)
callgrind_control -d "$pid" >/dev/null
out=$(tail -1 "$dir/bench.out")
profile=""
for _ in $(seq 100); do
    profile=$(ls -t "$dir"/callgrind.out.* 2>/dev/null | head -1)
    [ -n "$profile" ] && grep -q '^summary:' "$profile" && break
    sleep 0.1
done
grep -q '^summary:' "$profile" || { echo "callgrind wrote no profile" >&2; exit 1; }
[ -n "$keep" ] && cp "$profile" "$keep"
instructions=$(awk '/^summary:/ {print $2}' "$profile")
python3 - "$out" "$instructions" "$before" "$after" <<'PY'
import json, sys
o = json.loads(sys.argv[1])
orders = int(float(sys.argv[4])) - int(float(sys.argv[3]))
if orders <= 0:
    sys.exit("no order was confirmed: no figure")
print(f"confirmed {orders}  instructions per order {int(sys.argv[2]) / orders / 1e3:.1f} k  "
      f"place p99 {o['place_p99_ms']} ms (under valgrind)")
PY
