#!/usr/bin/env bash
# `ordermesh dev` on a fresh data dir, the machine's limits measured beside it, then
# `ordermesh bench` against it; prints the bench's report and the server's CPU per order.
#
#   examples/bench_dev.sh                                        # closed loop 64, 30 s after 5 s warm-up
#   examples/bench_dev.sh --concurrency 64 --duration 15s
#   examples/bench_dev.sh --rate 4000 --duration 20s --warmup 5s # open loop
#
# Arguments go to `ordermesh bench` (default `--concurrency 64 --duration 30s --warmup 5s`);
# `--target`, `--data-dir` and `--json` are added here.
#
# Before the run it measures, on the same machine and disk (LIMITS=0 skips them):
# - the HTTP limit: the same server's `GET /livez` requests/s (`wrk -t2 -c64 -d5s`, if wrk is
#   installed: `apt-get install wrk`);
# - the durability limit: `fdatasync` of 8 KiB blocks/s in the data dir's file system, over a
#   preallocated file (how the write-ahead log writes) and appending.
# After it: the server's CPU time (user + system, from /proc) divided by the confirmed orders,
# over the measured window plus its grace (the warm-up excluded), the same split by thread
# (tokio workers, checkpoint threads, log syncers, other), and the load average. The split moves
# far less between runs than orders/s does, so it shows where a change took or saved CPU.
#
# The data dir goes under $BENCH_DIR, else the target dir (not /tmp: a tmpfs there would make
# both the store and the disk limit memory's); its file system's type is printed.
# Uses $ORDERMESH_BIN, else builds <target dir>/release/ordermesh; needs curl and python3.
# On a shared machine orders/s moves by 20% between runs: compare builds by alternating them
# (or with examples/instructions_per_order.sh), not by one run each.
set -euo pipefail

for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
source "$(dirname "$0")/lib.sh"
resolve_bin
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--concurrency 64 --duration 30s --warmup 5s)

parent=${BENCH_DIR:-${CARGO_TARGET_DIR:-$PWD/target}}
mkdir -p "$parent"
dir=$(mktemp -d -p "$parent" bench-dev.XXXXXX)
port=$(free_port)
export ORDERMESH_JWT_SECRET=bench-dev-secret-that-is-long-enough-0123456789
export ORDERMESH_LOG=${ORDERMESH_LOG:-warn}
"$bin" dev --http "127.0.0.1:$port" --data-dir "$dir/data" >"$dir/dev.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
wait_ready "$port" "$pid" "$dir/dev.log"
echo "ordermesh dev ready on 127.0.0.1:$port (pid $pid), data in $dir ($(stat -f -c %T "$dir")); load average $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "${LIMITS:-1}" != 0 ]; then
    if command -v wrk >/dev/null; then
        wrk -t2 -c64 -d5s --latency "http://127.0.0.1:$port/livez" |
            awk '/Requests\/sec/ {rps = $2} / 99%/ {p99 = $2} END {print "limit, HTTP: /livez " rps " requests/s, p99 " p99 " (wrk -t2 -c64 -d5s)"}' ||
            echo "limit, HTTP: not measured (wrk failed)"
    else
        echo "limit, HTTP: not measured (wrk is not installed)"
    fi
    python3 - "$dir" <<'PY'
import os, sys, time
block, n = b"\0" * 8192, 3000
def rate(path, preallocate):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    if preallocate:
        os.write(fd, block * n)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    start = time.perf_counter()
    for _ in range(n):
        os.write(fd, block)
        os.fdatasync(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    os.unlink(path)
    return n / elapsed
over = rate(os.path.join(sys.argv[1], "fsync-over"), True)
append = rate(os.path.join(sys.argv[1], "fsync-append"), False)
print(f"limit, disk: write 8 KiB + fdatasync {over:,.0f}/s over a preallocated file, {append:,.0f}/s appending")
PY
fi

# The warm-up's CPU is left out: the bench says on stderr when its measured window starts.
python3 - "$bin" "$port" "$dir" "$pid" "$(getconf CLK_TCK)" "${args[@]}" <<'PY'
import json, subprocess, sys
bin, port, dir, pid, hz, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:]
def cpu():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / hz, int(fields[12]) / hz
# The server's threads, grouped by what they do (by name; tokio's blocking threads share the
# workers' name), with their CPU seconds.
GROUPS = [("tokio-rt-worker", "workers"), ("storage-ckpt-", "checkpoints"), ("storage-sync-", "syncers")]
def cpu_by_thread():
    import glob, os
    seconds = {}
    for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            with open(stat) as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue  # a thread that ended meanwhile
        name = head.split("(", 1)[1]
        fields = tail.split()
        group = next((g for prefix, g in GROUPS if name.startswith(prefix)), "other")
        seconds[os.path.basename(os.path.dirname(stat))] = (group, (int(fields[11]) + int(fields[12])) / hz)
    return seconds
cmd = [bin, "bench", "--target", f"http://127.0.0.1:{port}", "--data-dir", f"{dir}/data", "--json", *args]
bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
start = None
for line in bench.stderr:
    if start is None and "measured window" in line:
        start, start_threads = cpu(), cpu_by_thread()
    sys.stderr.write(line)
out = bench.stdout.read()
if bench.wait() != 0:
    sys.stdout.write(out)
    sys.exit(f"bench failed (exit {bench.returncode})")
end, end_threads = cpu(), cpu_by_thread()
lines = out.rstrip("\n").split("\n")
print("\n".join(lines[:-1]))
result = json.loads(lines[-1])
if start is None:
    sys.exit("the bench printed no start of its measured window: no CPU figure")
confirmed = result["confirmed"]
if confirmed == 0:
    sys.exit("no order was confirmed: no CPU figure")
gen = result.get("generator_cpu_s")
gen_text = f", generator {gen * 1e3 / confirmed:.3f} ms" if gen is not None else ""
user, system = ((e - s) * 1e3 / confirmed for s, e in zip(start, end))
print(f"CPU per confirmed order: server {user + system:.3f} ms (user {user:.3f}, system {system:.3f}){gen_text}")
# Per thread, then by group: a thread that ended during the window (an idle blocking thread
# of tokio's) is left out, one that started counts from zero.
groups = {g: 0.0 for g in [g for _, g in GROUPS] + ["other"]}
for tid, (group, seconds) in end_threads.items():
    groups[group] += seconds - start_threads.get(tid, (group, 0.0))[1]
by_group = ", ".join(f"{g} {s * 1e3 / confirmed:.3f}" for g, s in groups.items())
print(f"server CPU per confirmed order by thread (ms): {by_group}")
print(lines[-1])
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
