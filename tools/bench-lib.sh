# Shared by the benchmark scripts (source it): a scratch directory and the
# processes started, both cleaned up on exit, a free loopback port, and the
# port a dkvs-server announced.
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The port in a dkvs-server ready line written to file $1, once it is there.
ready_port() {
    for _ in $(seq 100); do
        grep -q ready "$1" 2>/dev/null && break
        sleep 0.1
    done
    grep -o '[0-9]*$' "$1" | head -1
}
