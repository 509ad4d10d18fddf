#!/usr/bin/env bash
# redis-benchmark against redis-server and dkvs-server, started here on free
# ports, in one run: GET and SET at 50 connections, with and without -P 16.
# Prints one markdown table row per workload (requests per second, p50).
#
#   tools/bench-resp.sh [-n REQUESTS] [-r ROUNDS] [-R]
# -R runs both servers and redis-benchmark at the same real-time priority
# (chrt -f 10, needs root), so that other work on a shared machine cannot
# preempt them mid-run; without it, figures on a busy machine swing by 2x.
# Each row is one redis-benchmark run; with -r, a median row per workload
# follows. Needs redis-server and redis-benchmark (apt-get install
# redis-server) and target/release/dkvs-server (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

requests=200000
rounds=1
rt=()
while getopts "n:r:R" opt; do
    case $opt in
        n) requests=$OPTARG ;;
        r) rounds=$OPTARG ;;
        R) rt=(chrt -f 10) ;;
        *) echo "usage: $0 [-n REQUESTS] [-r ROUNDS] [-R]" >&2; exit 2 ;;
    esac
done

# shellcheck source=tools/bench-lib.sh
source tools/bench-lib.sh

redis_port=$(free_port)
${rt[@]+"${rt[@]}"} redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
# Redis runs without persistence, so dkvs logs without fsync (--fsync never).
${rt[@]+"${rt[@]}"} target/release/dkvs-server -p 0 -l error -d "$work/dkvs-data" --fsync never >"$work/dkvs.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    grep -q ready "$work/dkvs.out" 2>/dev/null && redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
dkvs_port=$(grep -o '[0-9]*$' "$work/dkvs.out" | head -1)

# One redis-benchmark run: prints "rps p50".
bench() {
    local port=$1 test=$2 pipeline=$3
    # A first short run warms the server (keys created, buffers grown).
    redis-benchmark -p "$port" -t "$test" -c 50 -n 100000 -P "$pipeline" -r 100000 -d 100 -q >/dev/null 2>&1
    ${rt[@]+"${rt[@]}"} redis-benchmark -p "$port" -t "$test" -c 50 -n "$requests" -P "$pipeline" -r 100000 -d 100 -q 2>&1 \
        | tr '\r' '\n' | grep 'requests per second' | tail -1 \
        | sed -E 's/.*: ([0-9.]+) requests per second, p50=([0-9.]+) msec/\1 \2/'
}

# GET reads keys that exist: fill the key range redis-benchmark draws from.
for port in "$redis_port" "$dkvs_port"; do
    redis-benchmark -p "$port" -t set -c 50 -n 1000000 -P 16 -r 100000 -d 100 -q >/dev/null 2>&1
done

echo "| workload | Redis req/s | dkvs req/s | dkvs ÷ Redis | Redis p50 ms | dkvs p50 ms |"
echo "|---|---:|---:|---:|---:|---:|"
results="$work/results"
for round in $(seq "$rounds"); do
    for pipeline in 1 16; do
        for test in get set; do
            read -r r_rps r_p50 < <(bench "$redis_port" "$test" "$pipeline")
            read -r d_rps d_p50 < <(bench "$dkvs_port" "$test" "$pipeline")
            ratio=$(python3 -c "print(f'{$d_rps / $r_rps:.2f}')")
            label="${test^^}, 50 connections"
            [ "$pipeline" != 1 ] && label="$label, -P $pipeline"
            echo "$label|$r_rps|$d_rps|$r_p50|$d_p50" >>"$results"
            [ "$rounds" != 1 ] && label="$label (round $round)"
            printf '| %s | %.0f | %.0f | %s× | %s | %s |\n' "$label" "$r_rps" "$d_rps" "$ratio" "$r_p50" "$d_p50"
        done
    done
done
if [ "$rounds" != 1 ]; then
    # The median of each column over the rounds; the ratio is the median of the rounds' ratios.
    python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, *nums = line.strip().split("|")
    rows.setdefault(label, []).append([float(x) for x in nums])
for label, runs in rows.items():
    med = [statistics.median(col) for col in zip(*runs)]
    ratio = statistics.median(d / r for r, d, _, _ in runs)
    print(f"| {label} (median of {len(runs)}) | {med[0]:.0f} | {med[1]:.0f} | {ratio:.2f}× | {med[2]:.3f} | {med[3]:.3f} |")
PY
fi
