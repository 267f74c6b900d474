# Helpers shared by the example scripts (sourced, not run).

# The ordermesh binary to run: $ORDERMESH_BIN, else the release build of this checkout (built
# first). Call before changing directory (a relative $ORDERMESH_BIN is taken from the caller's);
# sets `bin` and unsets ORDERMESH_BIN (the server refuses ORDERMESH_* variables that are not
# settings).
resolve_bin() {
    local root
    root=$(dirname "${BASH_SOURCE[0]}")/..
    bin=${ORDERMESH_BIN:+$(realpath "$ORDERMESH_BIN")}
    unset ORDERMESH_BIN
    if [ -z "$bin" ]; then
        (cd "$root" && cargo build --release --bin ordermesh)
        bin=$(cd "$root" && realpath "${CARGO_TARGET_DIR:-target}/release/ordermesh")
    fi
}

# A free TCP port on 127.0.0.1 (a server left on a fixed one would answer the readiness check).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready PORT PID LOG: until the server on PORT answers /readyz; fails with its LOG if it
# exits or does not answer within two minutes (a server under valgrind starts slowly).
wait_ready() {
    local port=$1 pid=$2 log=$3
    for _ in $(seq 1200); do
        kill -0 "$pid" 2>/dev/null || break
        curl -sf --max-time 2 "127.0.0.1:$port/readyz" >/dev/null && return 0
        sleep 0.1
    done
    curl -sf --max-time 2 "127.0.0.1:$port/readyz" >/dev/null && return 0
    echo "the server did not start:" >&2
    cat "$log" >&2
    return 1
}
