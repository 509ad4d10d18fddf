#!/usr/bin/env bash
# Compare-and-set and multi-key transactions, dkvs beside Redis, same clients,
# one run: CAS increments from 50 connections (dkvs GET + PUT with the expected
# version vs Redis WATCH/GET/MULTI/SET/EXEC vs, if etcd is installed, a 3-node
# etcd's range + txn on mod_revision, durable as etcd always is), on 1 hot
# counter and on 1000;
# and 4-key transactions (dkvs TXN of 4 PUTs vs Redis MULTI, 4 SETs, EXEC)
# with dkvs-load. Both servers run without fsync (Redis has no persistence
# here), dkvs as a lone master unless -s N starts N slaves.
#
#   tools/bench-data.sh [-d SECONDS] [-s SLAVES] [-f FSYNC]   (-f: dkvs's --fsync, default never)
# Needs redis-server (apt-get install redis-server) and cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=5
slaves=0
fsync=never
while getopts "d:s:f:" opt; do
    case $opt in
        d) secs=$OPTARG ;;
        s) slaves=$OPTARG ;;
        f) fsync=$OPTARG ;;
        *) echo "usage: $0 [-d SECONDS] [-s SLAVES] [-f always|batch|never]" >&2; exit 2 ;;
    esac
done

# shellcheck source=tools/bench-lib.sh
source tools/bench-lib.sh

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
target/release/dkvs-server -p 0 -l error -d "$work/m" --fsync "$fsync" >"$work/m.out" 2>&1 &
pids+=($!)
dkvs_port=$(ready_port "$work/m.out")
for i in $(seq "$slaves"); do
    target/release/dkvs-server -p 0 -l error -d "$work/s$i" --fsync "$fsync" \
        -m 127.0.0.1 -q "$dkvs_port" >"$work/s$i.out" 2>&1 &
    pids+=($!)
    ready_port "$work/s$i.out" >/dev/null
done
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
# A 3-node etcd cluster on loopback, when etcd is installed (its CAS is a txn on mod_revision).
etcd_port=""
if command -v etcd >/dev/null; then
    cluster=""
    declare -a cports pports
    for i in 1 2 3; do
        cports[$i]=$(free_port)
        pports[$i]=$(free_port)
        cluster+="${cluster:+,}e$i=http://127.0.0.1:${pports[$i]}"
    done
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$work/etcd$i" \
            --listen-client-urls "http://127.0.0.1:${cports[$i]}" \
            --advertise-client-urls "http://127.0.0.1:${cports[$i]}" \
            --listen-peer-urls "http://127.0.0.1:${pports[$i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${pports[$i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new >"$work/etcd$i.log" 2>&1 &
        pids+=($!)
    done
    etcd_port=${cports[1]}
    for _ in $(seq 100); do
        curl -s -X POST "http://127.0.0.1:$etcd_port/v3/kv/range" -d '{"key":"AA=="}' | grep -q header && break
        sleep 0.2
    done
fi
sleep 1 # slaves in sync

echo "## CAS increments, 50 connections, $secs s each (dkvs: $slaves slaves, --fsync $fsync)"
for counters in 1 1000; do
    redis-cli -p "$redis_port" flushall >/dev/null
    target/release/dkvs-cas-bench --protocol resp --port "$redis_port" -c 50 --counters "$counters" --duration "$secs"
    target/release/dkvs-cas-bench --protocol dkvs --port "$dkvs_port" -c 50 --counters "$counters" --duration "$secs"
    if [ -n "$etcd_port" ]; then
        target/release/dkvs-cas-bench --protocol etcd --port "$etcd_port" -c 50 --counters "$counters" --duration "$secs"
    fi
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
