#!/usr/bin/env bash
# Instructions per request, counted by callgrind, of redis-server, dkvs-server
# and redis-benchmark itself, for the same redis-benchmark workloads: a ratio
# against Redis that does not depend on what else the machine is doing
# (user-space instructions only; the kernel's share is not counted).
#
#   tools/callgrind-resp.sh [-n REQUESTS] [-t TESTS] [-P PIPELINE]
# TESTS is a comma-separated list of redis-benchmark tests (default get,set).
# Each server runs under valgrind --tool=callgrind; the keys are loaded first
# (SETs with -P 16 over the same 100,000-key range), then the counters are
# zeroed, REQUESTS requests are sent (default 200,000) and the counters
# dumped. Takes about a minute per test and server. Needs valgrind,
# redis-server, redis-benchmark and target/release/dkvs-server.
set -euo pipefail
cd "$(dirname "$0")/.."

requests=200000
tests=get,set
pipeline=16
while getopts "n:t:P:" opt; do
    case $opt in
        n) requests=$OPTARG ;;
        t) tests=$OPTARG ;;
        P) pipeline=$OPTARG ;;
        *) echo "usage: $0 [-n REQUESTS] [-t TESTS] [-P PIPELINE]" >&2; exit 2 ;;
    esac
done

# shellcheck source=tools/bench-lib.sh
source tools/bench-lib.sh

# Wait until a RESP server answers PING on port $1 (valgrind starts slowly).
wait_ping() {
    for _ in $(seq 300); do
        redis-cli -p "$1" ping >/dev/null 2>&1 && return
        sleep 0.2
    done
}

bench() {
    redis-benchmark -p "$1" -t "$2" -c 50 -n "$3" -P "$4" -r 100000 -d 100 -q >/dev/null 2>&1
}

# The total of a callgrind output file.
total() {
    callgrind_annotate --threshold=100 "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
}

# Instructions per request of server "$1" (redis|dkvs) for test "$2".
server_cost() {
    local kind=$1 test=$2 port out pid
    port=$(free_port)
    out="$work/$kind-$test.cg"
    if [ "$kind" = redis ]; then
        valgrind --tool=callgrind --callgrind-out-file="$out" \
            redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
    else
        valgrind --tool=callgrind --callgrind-out-file="$out" \
            target/release/dkvs-server -p "$port" -l error -d "$work/data-$test" --fsync never >/dev/null 2>&1 &
    fi
    pid=$!
    pids+=("$pid")
    wait_ping "$port"
    bench "$port" set 200000 16
    callgrind_control -z "$pid" >/dev/null 2>&1
    bench "$port" "$test" "$requests" "$pipeline"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo $(($(total "$out.1") / requests))
}

# Instructions per request of redis-benchmark itself, against a plain dkvs-server.
client_cost() {
    local test=$1 port pid
    port=$(free_port)
    target/release/dkvs-server -p "$port" -l error -d "$work/client-$test" --fsync never >/dev/null 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_ping "$port"
    bench "$port" set 200000 16
    valgrind --tool=callgrind --callgrind-out-file="$work/client-$test.cg" \
        redis-benchmark -p "$port" -t "$test" -c 50 -n "$requests" -P "$pipeline" -r 100000 -d 100 -q >/dev/null 2>&1
    kill "$pid"
    echo $(($(total "$work/client-$test.cg") / requests))
}

echo "| test, -c 50 -P $pipeline | redis-server | dkvs-server | dkvs ÷ Redis | redis-benchmark |"
echo "|---|---:|---:|---:|---:|"
for test in ${tests//,/ }; do
    r=$(server_cost redis "$test")
    d=$(server_cost dkvs "$test")
    c=$(client_cost "$test")
    ratio=$(python3 -c "print(f'{$d / $r:.2f}')")
    echo "| ${test^^} | $r | $d | ${ratio}× | $c |"
done
