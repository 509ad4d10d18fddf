#!/usr/bin/env bash
# The RESP path against the binary path of one dkvs-server (issue 11: RESP within
# 10% of binary), measured by the same client: dkvs-load, with only --protocol
# differing. GET and SET at 50 connections with -P 16, rounds alternating the
# protocols; prints one markdown row per run and a median row per workload.
#
#   tools/bench-resp-vs-binary.sh [-d SECS] [-r ROUNDS] [-R]
# -R runs the server and dkvs-load at real-time priority (chrt -f 10, needs
# root), so that other work on a shared machine cannot preempt them mid-run.
# Needs target/release/dkvs-server and dkvs-load (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=5
rounds=3
rt=()
while getopts "d:r:R" opt; do
    case $opt in
        d) secs=$OPTARG ;;
        r) rounds=$OPTARG ;;
        R) rt=(chrt -f 10) ;;
        *) echo "usage: $0 [-d SECS] [-r ROUNDS] [-R]" >&2; exit 2 ;;
    esac
done

# shellcheck source=tools/bench-lib.sh
source tools/bench-lib.sh

${rt[@]+"${rt[@]}"} target/release/dkvs-server -p 0 -l error -d "$work/dkvs-data" --fsync never >"$work/dkvs.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    grep -q ready "$work/dkvs.out" 2>/dev/null && break
    sleep 0.1
done
port=$(grep -o '[0-9]*$' "$work/dkvs.out" | head -1)

# One run: prints ops/s.
load() {
    local protocol=$1 get_ratio=$2
    ${rt[@]+"${rt[@]}"} target/release/dkvs-load --port "$port" --protocol "$protocol" -c 50 -P 16 \
        --get-ratio "$get_ratio" --keyspace 100000 --value-size 100 --preload \
        --warmup 1 --duration "$secs" --json -q 2>/dev/null \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["ops_per_sec"]))'
}

echo "| workload | binary ops/s | RESP ops/s | RESP ÷ binary |"
echo "|---|---:|---:|---:|"
results="$work/results"
for round in $(seq "$rounds"); do
    for op in get set; do
        ratio_arg=1
        [ "$op" = set ] && ratio_arg=0
        bin=$(load dkvs "$ratio_arg")
        resp=$(load resp "$ratio_arg")
        echo "$op|$bin|$resp" >>"$results"
        printf '| %s, 50 connections, -P 16 (round %s) | %s | %s | %.2f× |\n' "${op^^}" "$round" "$bin" "$resp" \
            "$(python3 -c "print($resp / $bin)")"
    done
done
python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    op, b, r = line.strip().split("|")
    rows.setdefault(op, []).append((float(b), float(r)))
for op, runs in rows.items():
    b = statistics.median(x for x, _ in runs)
    r = statistics.median(y for _, y in runs)
    ratio = statistics.median(y / x for x, y in runs)
    print(f"| {op.upper()}, 50 connections, -P 16 (median of {len(runs)}) | {b:.0f} | {r:.0f} | {ratio:.2f}× |")
PY
