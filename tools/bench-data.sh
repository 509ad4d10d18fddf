#!/usr/bin/env bash
# Compare-and-set and multi-key transactions, dkvs beside Redis, same clients,
# one run: CAS increments from 50 connections (dkvs GET + PUT with the expected
# version vs Redis WATCH/GET/MULTI/SET/EXEC), on 1 hot counter and on 1000;
# and 4-key transactions (dkvs TXN of 4 PUTs vs Redis MULTI, 4 SETs, EXEC)
# with dkvs-load. Both servers run without fsync (Redis has no persistence
# here), dkvs as a lone master unless -s N starts N slaves.
#
#   tools/bench-data.sh [-d SECONDS] [-s SLAVES]
# Needs redis-server (apt-get install redis-server) and cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=5
slaves=0
while getopts "d:s:" opt; do
    case $opt in
        d) secs=$OPTARG ;;
        s) slaves=$OPTARG ;;
        *) echo "usage: $0 [-d SECONDS] [-s SLAVES]" >&2; exit 2 ;;
    esac
done

# shellcheck source=tools/bench-lib.sh
source tools/bench-lib.sh
ready_port() { # the port in a dkvs ready line, once it is there
    for _ in $(seq 100); do
        grep -q ready "$1" 2>/dev/null && break
        sleep 0.1
    done
    grep -o '[0-9]*$' "$1" | head -1
}

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
target/release/dkvs-server -p 0 -l error -d "$work/m" --fsync never >"$work/m.out" 2>&1 &
pids+=($!)
dkvs_port=$(ready_port "$work/m.out")
for i in $(seq "$slaves"); do
    target/release/dkvs-server -p 0 -l error -d "$work/s$i" --fsync never \
        -m 127.0.0.1 -q "$dkvs_port" >"$work/s$i.out" 2>&1 &
    pids+=($!)
    ready_port "$work/s$i.out" >/dev/null
done
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1 # slaves in sync

echo "## CAS increments, 50 connections, $secs s each ($slaves slaves)"
for counters in 1 1000; do
    redis-cli -p "$redis_port" flushall >/dev/null
    target/release/dkvs-cas-bench --protocol resp --port "$redis_port" -c 50 --counters "$counters" --duration "$secs"
    target/release/dkvs-cas-bench --protocol dkvs --port "$dkvs_port" -c 50 --counters "$counters" --duration "$secs"
done

echo "## 4-key transactions, 50 connections, $secs s each"
load() { target/release/dkvs-load -q --connections 50 --get-ratio 0 --keyspace 100000 --duration "$secs" "$@" | grep -E 'throughput|latency'; }
echo "Redis MULTI + 4 SET + EXEC:"
load --protocol resp --port "$redis_port" --txn-keys 4
echo "dkvs TXN of 4 PUTs:"
load --port "$dkvs_port" --txn-keys 4
echo "for reference, Redis SET and dkvs PUT of one key:"
load --protocol resp --port "$redis_port"
load --port "$dkvs_port"
