#!/usr/bin/env bash
# Three all-in-one `ordermesh node`s in release on loopback, then `ordermesh bench` against
# their three gateways in turn (as a load balancer would; each gateway places an order on its
# own node, and the order's payment lives there too, so the calls that cross nodes are the
# stock ones), then stops the nodes. Prints the load average before and after.
# BENCH_GATEWAYS=1 sends everything to n1's gateway instead.
#
#   examples/bench_cluster.sh --concurrency 64 --duration 20s --json
#   examples/bench_cluster.sh --rate 1000 --duration 15s --json
#
# Uses $ORDERMESH_BIN, else <target dir>/release/ordermesh (built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${ORDERMESH_BIN:-${CARGO_TARGET_DIR:-target}/release/ordermesh}
[ -x "$bin" ] || cargo build --release --bin ordermesh
# The nodes refuse ORDERMESH_* variables that are not settings.
unset ORDERMESH_BIN

dir=$(mktemp -d)
export ORDERMESH_JWT_SECRET=bench-cluster-secret-that-is-long-enough-0123456789
export ORDERMESH_CLUSTER_COOKIE=bench-cluster-cookie
export ORDERMESH_LOG=${ORDERMESH_LOG:-warn}
base=${BENCH_PORT_BASE:-17100}

pids=()
stop() {
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT

for i in 1 2 3; do
    peers=()
    for j in 1 2 3; do
        [ "$i" = "$j" ] || peers+=("n$j@127.0.0.1:$((base + j))")
    done
    "$bin" node --name "n$i" --cluster "127.0.0.1:$((base + i))" --http "127.0.0.1:$((base + 10 + i))" \
        --peers "$(IFS=,; echo "${peers[*]}")" --data-dir "$dir/n$i" >/dev/null &
    pids+=($!)
done

for i in 1 2 3; do
    for _ in $(seq 100); do
        "$bin" healthcheck --http "127.0.0.1:$((base + 10 + i))" 2>/dev/null && break
        sleep 0.2
    done
done
echo "3 nodes ready; load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
gateways=${BENCH_GATEWAYS:-3}
case "$gateways" in
    1 | 2 | 3) ;;
    *) echo "BENCH_GATEWAYS must be 1, 2 or 3 (got $gateways)" >&2; exit 2 ;;
esac
targets=()
for i in $(seq "$gateways"); do
    targets+=("http://127.0.0.1:$((base + 10 + i))")
done
"$bin" bench --target "$(IFS=,; echo "${targets[*]}")" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
