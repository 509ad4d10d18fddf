#!/usr/bin/env bash
# redis-benchmark against redis-server and dkvs-server, started here on free
# ports, in one run: GET and SET at 50 connections, with and without -P 16.
# Prints one markdown table row per workload (requests per second, p50).
#
#   tools/bench-resp.sh [-n REQUESTS] [-r ROUNDS]
# Needs redis-server and redis-benchmark (apt-get install redis-server) and
# target/release/dkvs-server (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

requests=200000
rounds=1
while getopts "n:r:" opt; do
    case $opt in
        n) requests=$OPTARG ;;
        r) rounds=$OPTARG ;;
        *) echo "usage: $0 [-n REQUESTS] [-r ROUNDS]" >&2; exit 2 ;;
    esac
done

# shellcheck source=tools/bench-lib.sh
source tools/bench-lib.sh

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
# Redis runs without persistence, so dkvs logs without fsync (--fsync never).
target/release/dkvs-server -p 0 -l error -d "$work/dkvs-data" --fsync never >"$work/dkvs.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    grep -q ready "$work/dkvs.out" 2>/dev/null && redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
dkvs_port=$(grep -o '[0-9]*$' "$work/dkvs.out" | head -1)

# One redis-benchmark run: prints "rps p50".
bench() {
    local port=$1 test=$2 pipeline=$3
    redis-benchmark -p "$port" -t "$test" -c 50 -n "$requests" -P "$pipeline" -r 100000 -d 100 -q 2>&1 \
        | tr '\r' '\n' | grep 'requests per second' | tail -1 \
        | sed -E 's/.*: ([0-9.]+) requests per second, p50=([0-9.]+) msec/\1 \2/'
}

echo "| workload | Redis req/s | dkvs req/s | dkvs ÷ Redis | Redis p50 ms | dkvs p50 ms |"
echo "|---|---:|---:|---:|---:|---:|"
for round in $(seq "$rounds"); do
    for pipeline in 1 16; do
        for test in get set; do
            read -r r_rps r_p50 < <(bench "$redis_port" "$test" "$pipeline")
            read -r d_rps d_p50 < <(bench "$dkvs_port" "$test" "$pipeline")
            ratio=$(python3 -c "print(f'{$d_rps / $r_rps:.2f}')")
            label="${test^^}, 50 connections"
            [ "$pipeline" != 1 ] && label="$label, -P $pipeline"
            [ "$rounds" != 1 ] && label="$label (round $round)"
            printf '| %s | %.0f | %.0f | %s× | %s | %s |\n' "$label" "$r_rps" "$d_rps" "$ratio" "$r_p50" "$d_p50"
        done
    done
done
