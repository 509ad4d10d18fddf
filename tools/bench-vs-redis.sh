#!/usr/bin/env bash
# bench-vs-redis.sh — measure dkvs-server side by side with redis-server (SPEC §6, issue 4).
#
# Starts redis-server (no persistence) and dkvs-server (--fsync never) on free loopback ports, drives both with the
# same dkvs-load command (only --protocol and --port differ), and prints, per workload, a Markdown
# table of throughput, latency p50/p99 and server CPU time per operation, with the ratio
# dkvs ÷ redis. Then loads ~1M keys (16 B keys, 100 B values) into fresh instances of both and
# compares their resident memory. Both servers are stopped on exit, Ctrl-C and errors.
#
# With --replicated (SPEC §6 row "replicated write, 2 replicas acknowledged", issue 5) it instead
# starts a redis-server master with 2 replicas (--replicaof) and a dkvs-server master with 2 slaves
# (-m/-q), waits until both are fully in sync, and measures replicated SETs with the same dkvs-load
# command: Redis with --resp-wait 2 (every SET followed by WAIT 2 1000, the pair one operation),
# dkvs plain (a write is acknowledged only once both slaves voted). Afterwards it checks that the
# replicas hold what the master holds. --all runs the single-node workloads and memory as well.
#
# Results go to stdout (Markdown); build output and progress go to stderr, so
#   tools/bench-vs-redis.sh --quick > bench.md
# leaves a pasteable report in bench.md.
#
# Server CPU per op = (utime + stime of the server process, /proc/PID/stat fields 14 and 15, in
# clock ticks of `getconf CLK_TCK`) sampled when dkvs-load reports the end of its warmup and again
# when it exits, × 1e6 / measured ops. Preload and warmup are therefore not charged to the run.
#
# Needs: bash, python3 (JSON and arithmetic), cargo (unless --no-build), redis-server, Linux /proc.

set -euo pipefail

readonly WORKLOADS=(get-50 set-50 get-50-p16 set-50-p16 get-1 set-1)
readonly REPL_WORKLOADS=(repl-set-50 repl-set-1)

usage() {
    cat <<EOF
Usage: tools/bench-vs-redis.sh [OPTIONS]

Compare dkvs-server with redis-server using the same dkvs-load workloads.

Options:
  --duration SECS   seconds measured per run (default 10)
  --quick           short runs: --duration 3
  --warmup SECS     unmeasured load before each run (default 1)
  --only NAMES      run only these workloads (comma-separated, option may repeat):
                    ${WORKLOADS[*]}
                    ${REPL_WORKLOADS[*]} (with --replicated)
  --keyspace N      keys in the workloads' keyspace, preloaded by every run (default 100000)
  --threads N       dkvs-load reactor threads (default 1)
  --seed N          dkvs-load key/op seed, the same for both servers (default 42)
  --no-memory       skip the memory comparison (1M keys)
  --replicated      replicated writes instead: redis-server + 2 replicas (SET + WAIT 2) against
                    dkvs-server master + 2 slaves; skips the single-node workloads and memory
  --all             single-node workloads, memory and the replicated workloads (implies
                    --replicated)
  --no-build        do not run 'cargo build --release' first
  -h, --help        this help

Workloads (all: 16-byte keys, 100-byte values, uniform keys, preloaded keyspace):
  get-50       GET, 50 connections, no pipelining
  set-50       SET, 50 connections, no pipelining
  get-50-p16   GET, 50 connections, pipeline depth 16
  set-50-p16   SET, 50 connections, pipeline depth 16
  get-1        GET, 1 connection (round-trip latency)
  set-1        SET, 1 connection (round-trip latency)

Replicated workloads (--replicated; same keys and values; Redis: --resp-wait 2):
  repl-set-50  SET, 50 connections, no pipelining, 2 replicas acknowledged
  repl-set-1   SET, 1 connection, 2 replicas acknowledged
EOF
}

die() {
    echo "bench-vs-redis: error: $*" >&2
    exit 1
}

note() {
    echo "bench-vs-redis: $*" >&2
}

# ---------------------------------------------------------------------------------------------
# Options

duration=10
warmup=1
keyspace=100000
threads=1
seed=42
memory=1
build=1
replicated=0
all=0
only=()

is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# Bounded: every iteration consumes at least one argument.
while (($# > 0)); do
    case $1 in
        --duration)
            (($# >= 2)) || die "--duration needs a value"
            is_number "$2" && [[ ! $2 =~ ^0+([.]0+)?$ ]] || die "--duration: positive seconds expected, got '$2'"
            duration=$2
            shift 2
            ;;
        --quick)
            duration=3
            shift
            ;;
        --warmup)
            (($# >= 2)) || die "--warmup needs a value"
            is_number "$2" || die "--warmup: seconds expected, got '$2'"
            warmup=$2
            shift 2
            ;;
        --only)
            (($# >= 2)) || die "--only needs a workload name"
            IFS=',' read -ra names <<<"$2"
            for name in "${names[@]}"; do
                [[ " ${WORKLOADS[*]} ${REPL_WORKLOADS[*]} " == *" $name "* ]] ||
                    die "--only: unknown workload '$name' (known: ${WORKLOADS[*]} ${REPL_WORKLOADS[*]})"
                only+=("$name")
            done
            shift 2
            ;;
        --keyspace)
            (($# >= 2)) || die "--keyspace needs a value"
            is_count "$2" || die "--keyspace: positive integer expected, got '$2'"
            keyspace=$2
            shift 2
            ;;
        --threads)
            (($# >= 2)) || die "--threads needs a value"
            is_count "$2" || die "--threads: positive integer expected, got '$2'"
            threads=$2
            shift 2
            ;;
        --seed)
            (($# >= 2)) || die "--seed needs a value"
            [[ $2 =~ ^[0-9]+$ ]] || die "--seed: integer expected, got '$2'"
            seed=$2
            shift 2
            ;;
        --no-memory)
            memory=0
            shift
            ;;
        --no-build)
            build=0
            shift
            ;;
        --replicated)
            replicated=1
            shift
            ;;
        --all)
            all=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown option '$1'"
            ;;
    esac
done

((all)) && replicated=1
run_single=1 # single-node workloads and memory
((replicated && !all)) && run_single=0
((run_single)) || memory=0

selected=()
repl_selected=()
for name in "${only[@]}"; do
    if [[ " ${WORKLOADS[*]} " == *" $name "* ]] && ((!run_single)); then
        die "--only $name: single-node workloads are skipped with --replicated (add --all)"
    elif [[ " ${REPL_WORKLOADS[*]} " == *" $name "* ]] && ((!replicated)); then
        die "--only $name: replicated workloads need --replicated"
    fi
done
if ((run_single)); then
    for name in "${WORKLOADS[@]}"; do
        if ((${#only[@]} == 0)) || [[ " ${only[*]} " == *" $name "* ]]; then
            selected+=("$name")
        fi
    done
fi
if ((replicated)); then
    for name in "${REPL_WORKLOADS[@]}"; do
        if ((${#only[@]} == 0)) || [[ " ${only[*]} " == *" $name "* ]]; then
            repl_selected+=("$name")
        fi
    done
fi

# ---------------------------------------------------------------------------------------------
# Prerequisites

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

[[ -r /proc/self/stat ]] || die "this script reads /proc/PID/stat and /proc/PID/status (Linux only)"
command -v python3 >/dev/null || die "python3 is required (JSON parsing); install it with: sudo apt-get install python3"

redis_bin=$(command -v redis-server || true)
if [[ -z $redis_bin && -x /usr/bin/redis-server ]]; then
    redis_bin=/usr/bin/redis-server
fi
if [[ -z $redis_bin ]]; then
    echo "bench-vs-redis: redis-server not found." >&2
    echo "Install it with:  sudo apt-get install redis-server   (Debian/Ubuntu), then run this again." >&2
    exit 1
fi

if ((build)); then
    note "cargo build --release"
    cargo build --release >&2 || die "cargo build --release failed"
fi

readonly server_bin=target/release/dkvs-server
readonly load_bin=target/release/dkvs-load
readonly client_bin=target/release/dkvs-client
for bin in "$server_bin" "$load_bin" "$client_bin"; do
    [[ -x $bin ]] || die "$bin not found: run 'cargo build --release' (or drop --no-build)"
done

clk_tck=$(getconf CLK_TCK)
is_count "$clk_tck" || die "getconf CLK_TCK gave '$clk_tck'"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: everything started is stopped on exit, Ctrl-C, TERM and errors.

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-redis.XXXXXX")
started=() # PIDs of processes this script started and has not reaped yet

# True while PID is a live (not zombie) process.
alive() {
    local stat
    [[ -r /proc/$1/stat ]] || return 1
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Stop one of our children: TERM, up to 5 s to exit, then KILL; reap it.
stop_pid() {
    local pid=$1 i
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            note "process $pid ignored SIGTERM for 5 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

forget_pid() {
    local keep=() p
    for p in "${started[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    started=("${keep[@]}")
}

cleanup() {
    local rc=$? pid
    trap - EXIT
    trap '' INT TERM HUP # a second Ctrl-C must not cut the cleanup short
    for pid in "${started[@]}"; do
        stop_pid "$pid"
    done
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'note "interrupted"; exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# CPU time (utime + stime, clock ticks) of PID into the variable `ticks`, without forking.
cpu_ticks() {
    local stat fields
    read -r stat <"/proc/$1/stat" || return 1
    # Field 2 (comm) may contain spaces: count fields from after its closing parenthesis, where
    # field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    read -ra fields <<<"${stat##*) }"
    ticks=$((fields[11] + fields[12]))
}

# VmRSS of PID in kB.
rss_kb() {
    local key value _
    while read -r key value _; do
        if [[ $key == VmRSS: ]]; then
            echo "$value"
            return 0
        fi
    done <"/proc/$1/status"
    return 1
}

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Send RESP commands (one inline command per argument) to 127.0.0.1:PORT, print the raw replies.
resp_query() {
    python3 - "$@" <<'PY'
import socket, sys
port, cmds = int(sys.argv[1]), sys.argv[2:]
s = socket.create_connection(("127.0.0.1", port), timeout=2)
s.sendall("".join(c + "\r\n" for c in cmds).encode())
data = b""
while len(data) < 1 << 20:  # bounded: 2 s timeout per recv, 1 MiB in all
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    if not chunk:
        break
    data += chunk
    if cmds[-1] == "QUIT" and data.endswith(b"+OK\r\n"):
        break
sys.stdout.write(data.decode(errors="replace"))
PY
}

redis_pid=""
redis_port=""
redis_cmd=""
# Start redis-server on a free loopback port in directory $1; further arguments are passed on
# (e.g. --replicaof HOST PORT).
start_redis() {
    local dir=$1 attempt port pid i
    shift
    mkdir -p "$dir"
    for ((attempt = 1; attempt <= 5; attempt++)); do
        port=$(free_port)
        redis_cmd="redis-server --save '' --appendonly no --port $port --bind 127.0.0.1 --daemonize no --dir $dir${*:+ $*}"
        "$redis_bin" --save '' --appendonly no --port "$port" --bind 127.0.0.1 --daemonize no \
            --dir "$dir" "$@" >"$dir/redis.log" 2>&1 &
        pid=$!
        started+=("$pid")
        for ((i = 0; i < 100; i++)); do
            alive "$pid" || break
            if [[ $(resp_query "$port" PING QUIT 2>/dev/null || true) == +PONG* ]]; then
                redis_pid=$pid
                redis_port=$port
                return 0
            fi
            sleep 0.1
        done
        note "redis-server did not start on port $port (attempt $attempt); its log:"
        sed 's/^/    /' "$dir/redis.log" >&2 || true
        stop_pid "$pid"
    done
    die "could not start redis-server"
}

dkvs_pid=""
dkvs_port=""
dkvs_cmd=""
# Start dkvs-server on a free loopback port (-p 0) in directory $1; further arguments are passed
# on (e.g. -m HOST -q PORT).
start_dkvs() {
    local dir=$1 pid i line=""
    shift
    mkdir -p "$dir"
    # Redis runs without persistence here, so dkvs writes its log without fsync (--fsync never);
    # durable writes are compared by tools/bench-durable.py.
    (cd "$dir" && exec "$root/$server_bin" -p 0 -l error --fsync never "$@" >"$dir/dkvs.out" 2>"$dir/dkvs.err") &
    pid=$!
    started+=("$pid")
    for ((i = 0; i < 100; i++)); do
        line=""
        [[ -f $dir/dkvs.out ]] && read -r line <"$dir/dkvs.out" || true
        if [[ $line =~ ready:.*:([0-9]+)[[:space:]]*$ ]]; then
            dkvs_pid=$pid
            dkvs_port=${BASH_REMATCH[1]}
            dkvs_cmd="$server_bin -p 0 -l error --fsync never${*:+ $*}   # -> $line"
            return 0
        fi
        alive "$pid" || break
        sleep 0.1
    done
    note "dkvs-server did not report ready; its output:"
    sed 's/^/    /' "$dir/dkvs.out" "$dir/dkvs.err" >&2 || true
    die "could not start dkvs-server"
}

stop_servers() {
    [[ -n $redis_pid ]] && stop_pid "$redis_pid"
    [[ -n $dkvs_pid ]] && stop_pid "$dkvs_pid"
    redis_pid=""
    dkvs_pid=""
}

# ---------------------------------------------------------------------------------------------
# Replication helpers (--replicated)

# INFO section $2 of redis-server on port $1, without carriage returns (empty if unreachable).
redis_info() {
    { resp_query "$1" "INFO $2" QUIT 2>/dev/null || true; } | tr -d '\r'
}

# Value of FIELD ($2) in INFO text $1 ("field:value" lines), or empty.
info_field() {
    sed -n "s/^$2:\\(.*\\)\$/\\1/p" <<<"$1" | sed -n '1p'
}

# DBSIZE of redis-server on port $1, or "?".
redis_dbsize() {
    local n
    n=$({ resp_query "$1" DBSIZE QUIT 2>/dev/null || true; } | tr -d '\r' | sed -n 's/^:\([0-9]*\)$/\1/p')
    echo "${n:-?}"
}

# Replication state of a Redis master ($1) and its replicas ($2...): prints
# "connected_slaves online_replicas replicas_with_link_up".
redis_repl_state() {
    local master=$1 info connected online up=0 port
    shift
    info=$(redis_info "$master" replication)
    connected=$(info_field "$info" connected_slaves)
    online=$(grep -c '^slave[0-9]*:.*state=online' <<<"$info" || true)
    for port in "$@"; do
        [[ $(info_field "$(redis_info "$port" replication)" master_link_status) == up ]] && up=$((up + 1))
    done
    echo "${connected:-?} ${online:-0} $up"
}

# Wait (up to 60 s) until the Redis master on port $1 has every replica ($2...) connected and
# online, and every replica reports master_link_status:up.
wait_redis_replicas() {
    local master=$1 n=$(($# - 1)) i state="" start=$SECONDS
    for ((i = 0; i < 600; i++)); do
        state=$(redis_repl_state "$@")
        if [[ $state == "$n $n $n" ]]; then
            note "redis: master has connected_slaves:$n, replicas master_link_status:up (after $((SECONDS - start)) s)"
            return 0
        fi
        sleep 0.1
    done
    note "redis replicas did not sync within 60 s (connected_slaves, online, link up: $state); master INFO replication:"
    redis_info "$master" replication | sed 's/^/    /' >&2
    die "redis replication did not come up"
}

# `dkvs-client stats` of the server on port $1 (empty if unreachable).
dkvs_stats() {
    "$root/$client_bin" -p "$1" --timeout-ms 2000 stats 2>/dev/null || true
}

# Value of FIELD ($2) in STATS text $1 ("field value" lines), or empty.
stat_field() {
    sed -n "s/^$2 \\(.*\\)\$/\\1/p" <<<"$1" | sed -n '1p'
}

# Wait (up to 60 s) until the dkvs master on port $1 reports slaves_in_sync $2.
wait_dkvs_slaves() {
    local master=$1 n=$2 i stats="" start=$SECONDS
    for ((i = 0; i < 600; i++)); do
        stats=$(dkvs_stats "$master")
        if [[ $(stat_field "$stats" slaves_in_sync) == "$n" ]]; then
            note "dkvs: master reports slaves_in_sync $n (after $((SECONDS - start)) s)"
            return 0
        fi
        sleep 0.1
    done
    note "dkvs slaves did not get in sync within 60 s; master stats:"
    sed 's/^/    /' <<<"$stats" >&2
    die "dkvs replication did not come up"
}

# Markdown table for one replicated workload; appends ratios to the summary file and returns 1
# when a run failed or counted errors.
# repl_table NAME TITLE REDIS_OUT DKVS_OUT SUMMARY
repl_table() {
    python3 - "$clk_tck" "$@" <<'PY'
import json, os, re, sys

clk_tck = int(sys.argv[1])
name, title, outs = sys.argv[2], sys.argv[3], sys.argv[4:6]
summary = open(sys.argv[6], "a")

def phase_errors(out):
    text = open(out + ".err").read() if os.path.exists(out + ".err") else ""
    found = {}
    for phase in ("preload", "warmup"):
        m = re.search(phase + r": .*?([\d,]+) errors", text)
        if m:
            found[phase] = int(m.group(1).replace(",", ""))
    return found

def load(out):
    rc = int(open(out + ".rc").read().strip() or 1)
    c0, c1 = (int(x) for x in open(out + ".cpu").read().split())
    extra = None
    if os.path.exists(out + ".cpu_extra"):
        e0, e1, live0, live1 = (int(x) for x in open(out + ".cpu_extra").read().split())
        extra = (e1 - e0, live0, live1)
    state = open(out + ".state").read().strip() if os.path.exists(out + ".state") else None
    lines = [l for l in open(out + ".json").read().splitlines() if l.strip()]
    try:
        j = json.loads(lines[-1])
    except (IndexError, ValueError):
        j = None
    if rc != 0 or j is None or not j.get("ops"):
        return None
    return {
        "ops_per_sec": j["ops_per_sec"],
        "p50": j["p50_us"],
        "p99": j["p99_us"],
        "cpu": (c1 - c0) / clk_tck * 1e6 / j["ops"],
        "rcpu": None if extra is None else extra[0] / clk_tck * 1e6 / j["ops"],
        "live": None if extra is None else extra[1:],
        "errors": j["errors"],
        "by_kind": j.get("errors_by_kind", {}),
        "ops": j["ops"],
        "ticks": c1 - c0,
        "state": state,
        "phase_errors": phase_errors(out),
    }

labels = ("redis+WAIT 2", "dkvs 2 slaves")
redis, dkvs = load(outs[0]), load(outs[1])

def fmt_row(label, r):
    if r is None:
        return f"| {label} | FAILED | | | | | |"
    rcpu = "–" if r["rcpu"] is None else f"{r['rcpu']:.2f}"
    return (f"| {label} | {r['ops_per_sec']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['cpu']:.2f} | {rcpu} | {r['errors']:,} |")

def ratio(key):
    if redis is None or dkvs is None or not redis[key] or dkvs[key] is None:
        return None
    return dkvs[key] / redis[key]

print(f"### {name}: {title}")
print()
print("| server | ops/s | p50 µs | p99 µs | master CPU µs/op | replicas CPU µs/op | errors |")
print("|---|---:|---:|---:|---:|---:|---:|")
print(fmt_row(labels[0], redis))
print(fmt_row(labels[1], dkvs))
ratios = [ratio(k) for k in ("ops_per_sec", "p50", "p99", "cpu", "rcpu")]
cells = ["–" if r is None else f"{r:.2f}×" for r in ratios]
print(f"| ratio dkvs÷redis | {' | '.join(cells)} | |")
print()
bad = False
notes = []
checks = []
for label, r in zip(labels, (redis, dkvs)):
    if r is None:
        notes.append(f"{label} run failed (see stderr)")
        bad = True
        continue
    kinds = ", ".join(f"{k} {v:,}" for k, v in r["by_kind"].items() if v)
    wait_short = r["by_kind"].get("wait_short", 0)
    check = f"{label} {r['errors']:,}"
    if label.startswith("redis"):
        check += f" (wait_short {wait_short:,})"
    checks.append(check)
    if r["errors"]:
        bad = True
        notes.append(f"{label}: {r['errors']:,} errors counted by dkvs-load ({kinds})")
    for phase, n in r["phase_errors"].items():
        if n:
            notes.append(f"{label}: {n:,} errors during {phase} (not measured)")
    if r["state"] is not None:
        notes.append(f"{label}: after the run, {r['state']}")
    if r["live"] is not None and (r["live"][0] != 2 or r["live"][1] != 2):
        bad = True
        notes.append(f"{label}: replicas alive at start/end of the measured phase: "
                     f"{r['live'][0]}/{r['live'][1]} (expected 2/2)")
    if r["ticks"] < 50:
        notes.append(f"{label}: only {r['ticks']} clock ticks of master CPU measured "
                     f"(1 tick = {1e6 / clk_tck:.0f} µs): CPU/op is coarse")
print(f"- errors: {', '.join(checks)}: {'CHECK FAILED' if bad else 'OK (0 errors)'}")
for n in notes:
    print(f"- note: {n}")
print()
summary.write("\t".join([name] + ["" if r is None else f"{r:.4f}" for r in ratios]) + "\n")
sys.exit(1 if bad else 0)
PY
}

# ---------------------------------------------------------------------------------------------
# One measured run.
#
# run_load OUT SERVER_PID SERVER_LOG ARGS...: runs dkvs-load ARGS (which must include --json -q --preload),
# writes OUT.json (its stdout), OUT.err (its stderr), OUT.cpu ("ticks_at_start ticks_at_end"),
# OUT.rc. Server CPU is sampled when dkvs-load prints the line that ends its last unmeasured
# phase ("warmup: ...", or "preload: ..." without warmup), and after dkvs-load exits.
#
# Set the array `extra_cpu_pids` to also sample those processes (replicas) at the same moments:
# OUT.cpu_extra gets "sum_at_start sum_at_end live_at_start live_at_end".
extra_cpu_pids=()
extra_cpu_sample() {
    local p sum=0 live=0
    for p in "${extra_cpu_pids[@]}"; do
        if cpu_ticks "$p" 2>/dev/null; then
            sum=$((sum + ticks))
            live=$((live + 1))
        fi
    done
    extra_sum=$sum
    extra_live=$live
}
run_load() {
    local out=$1 server=$2 server_log=$3 marker line fd load_pid st t rc=0 cpu0="" cpu1="" n=0 limit deadline
    local extra0="0 0" extra_sum extra_live extra_sum_0 extra_live_0
    shift 3
    marker="warmup:"
    [[ $warmup =~ ^0+([.]0+)?$ ]] && marker="preload:"
    # Bounds: a line may take the whole run; the run as a whole may not exceed `limit` seconds.
    limit=$((${warmup%.*} + ${duration%.*} + 300))
    deadline=$((SECONDS + limit))
    rm -f "$tmp/stderr.fifo"
    mkfifo "$tmp/stderr.fifo"
    "$load_bin" "$@" >"$out.json" 2>"$tmp/stderr.fifo" &
    load_pid=$!
    started+=("$load_pid")
    exec {fd}<"$tmp/stderr.fifo"
    : >"$out.err"
    while ((n < 10000 && SECONDS < deadline)); do
        st=0
        t=$((deadline - SECONDS))
        ((t >= 1)) || t=1 # never -t 0, which only polls
        IFS= read -r -t "$t" line <&"$fd" || st=$?
        if ((st > 128)); then
            rc=124 # timed out
            break
        elif ((st != 0)); then
            break # end of file: dkvs-load exited
        fi
        n=$((n + 1))
        if [[ -z $cpu0 && $line == "$marker"* ]]; then
            cpu_ticks "$server"
            cpu0=$ticks
            if ((${#extra_cpu_pids[@]} > 0)); then
                extra_cpu_sample
                extra0="$extra_sum $extra_live"
            fi
        fi
        printf '%s\n' "$line" >>"$out.err"
    done
    exec {fd}<&-
    if ((rc == 0)) && alive "$load_pid" && ((SECONDS >= deadline)); then
        rc=124
    fi
    if ((rc == 124)); then
        note "dkvs-load ran past its ${limit} s bound; stopping it"
        stop_pid "$load_pid"
    else
        wait "$load_pid" || rc=$?
        forget_pid "$load_pid"
    fi
    if ((${#extra_cpu_pids[@]} > 0)); then
        extra_cpu_sample
        read -r extra_sum_0 extra_live_0 <<<"$extra0"
        echo "$extra_sum_0 $extra_sum $extra_live_0 $extra_live" >"$out.cpu_extra"
    fi
    if alive "$server"; then
        cpu_ticks "$server"
        cpu1=$ticks
    else
        st=0
        wait "$server" 2>/dev/null || st=$?
        forget_pid "$server"
        {
            if ((st == 127)); then
                echo "server process $server is not running (it died earlier)"
            elif ((st > 128)); then
                echo "server process $server was killed by signal $((st - 128)) during the run; its log:"
            else
                echo "server process $server exited with status $st during the run; its log:"
            fi
            ((st == 127)) || tail -n 20 "$server_log" 2>/dev/null | sed 's/^/    /'
        } >>"$out.err"
        ((rc != 0)) || rc=1
    fi
    if [[ -z $cpu0 ]]; then
        echo "no '$marker' line from dkvs-load: no CPU baseline" >>"$out.err"
        ((rc != 0)) || rc=1
    fi
    echo "${cpu0:-0} ${cpu1:-0}" >"$out.cpu"
    echo "$rc" >"$out.rc"
    if ((rc != 0)); then
        note "dkvs-load failed (status $rc):"
        sed 's/^/    /' "$out.err" >&2
    fi
    return 0
}

# Printable form of a command (arguments shell-quoted).
shell_line() {
    local out="" arg
    for arg in "$@"; do
        out+="$(printf '%q' "$arg") "
    done
    echo "${out% }"
}

# Print the Markdown table for one workload and append its ratios to $tmp/summary.tsv.
# table NAME TITLE REDIS_OUT DKVS_OUT
table() {
    python3 - "$clk_tck" "$@" <<'PY'
import json, sys

clk_tck = int(sys.argv[1])
name, title, outs = sys.argv[2], sys.argv[3], sys.argv[4:6]
summary = open(sys.argv[6], "a")

def load(out):
    rc = int(open(out + ".rc").read().strip() or 1)
    c0, c1 = (int(x) for x in open(out + ".cpu").read().split())
    lines = [l for l in open(out + ".json").read().splitlines() if l.strip()]
    try:
        j = json.loads(lines[-1])
    except (IndexError, ValueError):
        j = None
    if rc != 0 or j is None or not j.get("ops"):
        return None
    cpu_s = (c1 - c0) / clk_tck
    return {
        "ops_per_sec": j["ops_per_sec"],
        "p50": j["p50_us"],
        "p99": j["p99_us"],
        "cpu": cpu_s * 1e6 / j["ops"],
        "errors": j["errors"],
        "ops": j["ops"],
        "ticks": c1 - c0,
    }

redis, dkvs = load(outs[0]), load(outs[1])

def fmt_row(label, r):
    if r is None:
        return f"| {label} | FAILED | | | | |"
    return (f"| {label} | {r['ops_per_sec']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['cpu']:.2f} | {r['errors']:,} |")

def ratio(key):
    if redis is None or dkvs is None or not redis[key]:
        return None
    return dkvs[key] / redis[key]

print(f"### {name}: {title}")
print()
print("| server | ops/s | p50 µs | p99 µs | server CPU µs/op | errors |")
print("|---|---:|---:|---:|---:|---:|")
print(fmt_row("redis", redis))
print(fmt_row("dkvs", dkvs))
ratios = [ratio(k) for k in ("ops_per_sec", "p50", "p99", "cpu")]
cells = ["–" if r is None else f"{r:.2f}×" for r in ratios]
print(f"| ratio dkvs÷redis | {' | '.join(cells)} | |")
print()
notes = []
for label, r in (("redis", redis), ("dkvs", dkvs)):
    if r is None:
        notes.append(f"{label} run failed (see stderr)")
        continue
    if r["errors"]:
        notes.append(f"{label}: {r['errors']:,} errors counted by dkvs-load")
    if r["ticks"] < 50:
        notes.append(f"{label}: only {r['ticks']} clock ticks of server CPU measured "
                     f"(1 tick = {1e6 / clk_tck:.0f} µs): CPU/op is coarse")
for n in notes:
    print(f"- note: {n}")
if notes:
    print()
summary.write("\t".join([name] + ["" if r is None else f"{r:.4f}" for r in ratios]) + "\n")
PY
}

# ---------------------------------------------------------------------------------------------
# Report header

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null || true) ]]; then
    git_rev+=" (with uncommitted changes)"
fi
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1 || true)

echo "# dkvs vs redis-server"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: nproc $(nproc), Linux $(uname -r) ($(uname -m))${cpu_model:+, $cpu_model}"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- redis: $("$redis_bin" --version)"
if ((build)); then
    built="built by this run"
else
    built="not rebuilt (--no-build), binary from $(date -u -r "$server_bin" '+%Y-%m-%d %H:%M UTC')"
fi
echo "- dkvs: $("$server_bin" --version 2>/dev/null || echo dkvs-server), git $git_rev, $built"
if ((replicated)); then
    echo "- client: $("$load_bin" --version 2>/dev/null || echo dkvs-load), $threads thread(s), same command for both servers (only --protocol and --port differ; replicated runs add --resp-wait 2 for Redis)"
else
    echo "- client: $("$load_bin" --version 2>/dev/null || echo dkvs-load), $threads thread(s), same command for both servers (only --protocol and --port differ)"
fi
echo "- per run: --preload of $keyspace keys, ${warmup} s warmup, ${duration} s measured; 16 B keys, 100 B values, uniform keys, --seed $seed"
echo "- server CPU µs/op: utime+stime from /proc/PID/stat over the measured phase only (CLK_TCK $clk_tck), × 1e6 ÷ ops"
echo "- ratio row: dkvs ÷ redis (ops/s: higher is better; latency and CPU: lower is better)"
echo

# ---------------------------------------------------------------------------------------------
# Workloads

declare -A title args
title[get-50]="GET, 50 connections, no pipelining"
args[get-50]="--connections 50 --pipeline 1 --get-ratio 1"
title[set-50]="SET, 50 connections, no pipelining"
args[set-50]="--connections 50 --pipeline 1 --get-ratio 0"
title[get-50-p16]="GET, 50 connections, pipeline 16"
args[get-50-p16]="--connections 50 --pipeline 16 --get-ratio 1"
title[set-50-p16]="SET, 50 connections, pipeline 16"
args[set-50-p16]="--connections 50 --pipeline 16 --get-ratio 0"
title[get-1]="GET, 1 connection"
args[get-1]="--connections 1 --pipeline 1 --get-ratio 1"
title[set-1]="SET, 1 connection"
args[set-1]="--connections 1 --pipeline 1 --get-ratio 0"

failed=0
: >"$tmp/summary.tsv"
if ((${#selected[@]} > 0)); then
    start_redis "$tmp/redis"
    start_dkvs "$tmp/dkvs"
    echo "Servers (fresh, started by the script):"
    echo
    echo '```sh'
    echo "$redis_cmd"
    echo "$dkvs_cmd"
    echo '```'
    echo
    echo "## Workloads"
    echo
    for name in "${selected[@]}"; do
        read -ra wl <<<"${args[$name]}"
        common=(--keyspace "$keyspace" --key-size 16 --value-size 100 --distribution uniform
            "${wl[@]}" --threads "$threads" --seed "$seed"
            --preload --warmup "$warmup" --duration "$duration" --json -q)
        redis_args=(--protocol resp --port "$redis_port" "${common[@]}")
        dkvs_args=(--protocol dkvs --port "$dkvs_port" "${common[@]}")
        note "$name: redis-server"
        run_load "$tmp/$name.redis" "$redis_pid" "$tmp/redis/redis.log" "${redis_args[@]}"
        note "$name: dkvs-server"
        run_load "$tmp/$name.dkvs" "$dkvs_pid" "$tmp/dkvs/dkvs.err" "${dkvs_args[@]}"
        for s in redis dkvs; do
            [[ $(<"$tmp/$name.$s.rc") == 0 ]] || failed=1
        done
        table "$name" "${title[$name]}" "$tmp/$name.redis" "$tmp/$name.dkvs" "$tmp/summary.tsv"
        echo '```sh'
        shell_line "$load_bin" "${redis_args[@]}"
        shell_line "$load_bin" "${dkvs_args[@]}"
        echo '```'
        echo
    done
    stop_servers

    echo "## Summary (dkvs ÷ redis)"
    echo
    echo "| workload | ops/s | p50 | p99 | server CPU/op |"
    echo "|---|---:|---:|---:|---:|"
    while IFS=$'\t' read -r name r_ops r_p50 r_p99 r_cpu; do
        printf '| %s |' "$name"
        for r in "$r_ops" "$r_p50" "$r_p99" "$r_cpu"; do
            if [[ -n $r ]]; then printf ' %.2f× |' "$r"; else printf ' – |'; fi
        done
        printf '\n'
    done <"$tmp/summary.tsv"
    echo
fi

# ---------------------------------------------------------------------------------------------
# Memory

if ((memory)); then
    note "memory: loading 1,000,000 keys into fresh servers"
    start_redis "$tmp/mem-redis"
    start_dkvs "$tmp/mem-dkvs"
    redis_empty=$(rss_kb "$redis_pid")
    dkvs_empty=$(rss_kb "$dkvs_pid")
    mem_common=(--keyspace 1000000 --key-size 16 --value-size 100 --connections 50 --pipeline 16
        --get-ratio 1 --preload --ops 1 --seed "$seed" --json -q)
    mem_redis_args=(--protocol resp --port "$redis_port" "${mem_common[@]}")
    mem_dkvs_args=(--protocol dkvs --port "$dkvs_port" "${mem_common[@]}")
    mem_ok=1
    for s in redis dkvs; do
        if [[ $s == redis ]]; then a=("${mem_redis_args[@]}"); else a=("${mem_dkvs_args[@]}"); fi
        if ! "$load_bin" "${a[@]}" >"$tmp/mem.$s.json" 2>"$tmp/mem.$s.err"; then
            note "memory: dkvs-load against $s failed:"
            sed 's/^/    /' "$tmp/mem.$s.err" >&2
            mem_ok=0
            failed=1
        fi
    done
    sleep 1 # let both servers settle (allocator background work, incremental rehash)
    redis_rss=$(rss_kb "$redis_pid")
    dkvs_rss=$(rss_kb "$dkvs_pid")
    redis_used=$(resp_query "$redis_port" "INFO memory" QUIT | sed -n 's/^used_memory:\([0-9]*\).*/\1/p' || true)
    redis_keys=$(resp_query "$redis_port" DBSIZE QUIT | sed -n 's/^:\([0-9]*\).*/\1/p' || true)
    stop_servers
    echo "## Memory: 1,000,000 keys, 16-byte keys, 100-byte values"
    echo
    python3 - "$redis_empty" "$redis_rss" "$dkvs_empty" "$dkvs_rss" "${redis_used:-0}" "${redis_keys:-?}" \
        "$tmp/mem.redis.err" "$tmp/mem.dkvs.err" "$mem_ok" <<'PY'
import re, sys
r0, r1, d0, d1 = (int(x) for x in sys.argv[1:5])
used, keys = int(sys.argv[5]), sys.argv[6]
mem_ok = sys.argv[9] == "1"

def preload(path):
    m = re.search(r"preload: ([\d,]+) keys written in ([\d.]+) s, ([\d,]+) errors", open(path).read())
    return m.groups() if m else ("?", "?", "?")

mb = lambda kb: kb / 1024
print("| server | RSS empty MB | RSS loaded MB | keys written | preload errors |")
print("|---|---:|---:|---:|---:|")
for label, a, b, path in (("redis", r0, r1, sys.argv[7]), ("dkvs", d0, d1, sys.argv[8])):
    written, secs, errors = preload(path)
    print(f"| {label} | {mb(a):.1f} | {mb(b):.1f} | {written} | {errors} |")
ratio = f"{d1 / r1:.2f}×" if r1 else "–"
print(f"| ratio dkvs÷redis | | {ratio} | | |")
print()
print(f"- redis INFO: used_memory {used / 2**20:.1f} MB, DBSIZE {keys}")
if not mem_ok:
    print("- note: a load failed (see stderr); the figures above are not comparable")
PY
    echo
    echo '```sh'
    shell_line "$load_bin" "${mem_redis_args[@]}"
    shell_line "$load_bin" "${mem_dkvs_args[@]}"
    echo '```'
    echo
fi

# ---------------------------------------------------------------------------------------------
# Replicated writes (--replicated): redis-server + 2 replicas (SET + WAIT 2) against dkvs-server
# master + 2 slaves (2PC: a write is acknowledged once both slaves voted).

if ((${#repl_selected[@]} > 0)); then
    note "replicated: starting redis-server master + 2 replicas, dkvs-server master + 2 slaves"
    start_redis "$tmp/repl-redis-master"
    rm_pid=$redis_pid rm_port=$redis_port
    repl_cmds=("$redis_cmd")
    rr_pids=() rr_ports=()
    for i in 1 2; do
        start_redis "$tmp/repl-redis-replica$i" --replicaof 127.0.0.1 "$rm_port"
        rr_pids+=("$redis_pid")
        rr_ports+=("$redis_port")
        repl_cmds+=("$redis_cmd")
    done
    start_dkvs "$tmp/repl-dkvs-master"
    dm_pid=$dkvs_pid dm_port=$dkvs_port
    repl_cmds+=("$dkvs_cmd")
    ds_pids=() ds_ports=()
    for i in 1 2; do
        start_dkvs "$tmp/repl-dkvs-slave$i" -m 127.0.0.1 -q "$dm_port"
        ds_pids+=("$dkvs_pid")
        ds_ports+=("$dkvs_port")
        repl_cmds+=("$dkvs_cmd")
    done
    redis_pid="" dkvs_pid="" # stopped below (and by the exit trap), not by stop_servers
    wait_redis_replicas "$rm_port" "${rr_ports[@]}"
    wait_dkvs_slaves "$dm_port" 2

    echo "## Replicated writes: 2 replicas acknowledged (Redis SET + WAIT 2 vs dkvs 2PC with 2 slaves)"
    echo
    echo "Servers (fresh, started by the script; each in its own temporary directory):"
    echo
    echo '```sh'
    printf '%s\n' "${repl_cmds[@]}"
    echo '```'
    echo
    echo "- in sync before the runs: redis master connected_slaves:2, both replicas master_link_status:up;" \
        "dkvs master slaves_in_sync 2"
    echo "- redis+WAIT 2: every SET is followed by \`WAIT 2 1000\` on the same connection, the pair counted as one op;" \
        "a WAIT answering fewer than 2 replicas counts as a \`wait_short\` error"
    echo "- dkvs 2 slaves: plain SETs to the master, each acknowledged only after both slaves voted"
    echo "- master CPU µs/op: the master process only, as above; replicas CPU µs/op: both replicas together, same window"
    echo

    title[repl-set-50]="SET, 50 connections, no pipelining, 2 replicas acknowledged"
    args[repl-set-50]="--connections 50 --pipeline 1 --get-ratio 0"
    title[repl-set-1]="SET, 1 connection, 2 replicas acknowledged"
    args[repl-set-1]="--connections 1 --pipeline 1 --get-ratio 0"
    : >"$tmp/repl-summary.tsv"
    for name in "${repl_selected[@]}"; do
        read -ra wl <<<"${args[$name]}"
        common=(--keyspace "$keyspace" --key-size 16 --value-size 100 --distribution uniform
            "${wl[@]}" --threads "$threads" --seed "$seed"
            --preload --warmup "$warmup" --duration "$duration" --json -q)
        redis_args=(--protocol resp --resp-wait 2 --port "$rm_port" "${common[@]}")
        dkvs_args=(--protocol dkvs --port "$dm_port" "${common[@]}")

        note "$name: redis-server + 2 replicas (SET + WAIT 2)"
        extra_cpu_pids=("${rr_pids[@]}")
        run_load "$tmp/$name.redis" "$rm_pid" "$tmp/repl-redis-master/redis.log" "${redis_args[@]}"
        read -r connected online up <<<"$(redis_repl_state "$rm_port" "${rr_ports[@]}")"
        echo "connected_slaves:$connected, $online online, $up replicas with master_link_status:up" \
            >"$tmp/$name.redis.state"

        note "$name: dkvs-server + 2 slaves"
        extra_cpu_pids=("${ds_pids[@]}")
        run_load "$tmp/$name.dkvs" "$dm_pid" "$tmp/repl-dkvs-master/dkvs.err" "${dkvs_args[@]}"
        extra_cpu_pids=()
        st=$(dkvs_stats "$dm_port")
        echo "slaves_in_sync $(stat_field "$st" slaves_in_sync), writes_failed $(stat_field "$st" writes_failed)" \
            >"$tmp/$name.dkvs.state"

        for s in redis dkvs; do
            [[ $(<"$tmp/$name.$s.rc") == 0 ]] || failed=1
        done
        repl_table "$name" "${title[$name]}" "$tmp/$name.redis" "$tmp/$name.dkvs" "$tmp/repl-summary.tsv" ||
            failed=1
        echo '```sh'
        shell_line "$load_bin" "${redis_args[@]}"
        shell_line "$load_bin" "${dkvs_args[@]}"
        echo '```'
        echo
    done

    echo "### Replicated summary (dkvs ÷ redis+WAIT 2)"
    echo
    echo "| workload | ops/s | p50 | p99 | master CPU/op | replicas CPU/op |"
    echo "|---|---:|---:|---:|---:|---:|"
    while IFS=$'\t' read -r name r_ops r_p50 r_p99 r_cpu r_rcpu; do
        printf '| %s |' "$name"
        for r in "$r_ops" "$r_p50" "$r_p99" "$r_cpu" "$r_rcpu"; do
            if [[ -n $r ]]; then printf ' %.2f× |' "$r"; else printf ' – |'; fi
        done
        printf '\n'
        if [[ $name == repl-set-1 && -n $r_p50 ]]; then
            target_line="- SPEC §6 (replicated write, one client, p50 ≤ Redis): dkvs÷redis p50 $(printf '%.2f' "$r_p50")×: "
            if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 1.0 else 1)" "$r_p50"; then
                target_line+="met"
            else
                target_line+="missed"
            fi
        fi
    done <"$tmp/repl-summary.tsv"
    echo
    [[ -n ${target_line:-} ]] && echo "$target_line" && echo

    # Replicas must hold what their master holds. Commits reach the slaves after the client's
    # acknowledgement (the acknowledgement follows the votes), so allow them a moment.
    note "replicated: checking the replicas against their masters"
    for ((i = 0; i < 100; i++)); do
        m=$(dkvs_stats "$dm_port")
        same=1
        for port in "${ds_ports[@]}"; do
            sl=$(dkvs_stats "$port")
            [[ -n $(stat_field "$m" commit_seq) &&
                $(stat_field "$sl" commit_seq) == "$(stat_field "$m" commit_seq)" &&
                $(stat_field "$sl" keys) == "$(stat_field "$m" keys)" ]] || same=0
        done
        ((same)) && break
        sleep 0.1
    done
    echo "### Replicas after the runs"
    echo
    echo "dkvs (\`$client_bin -p PORT stats\`):"
    echo
    echo "| node | port | role | commit_seq | applied_seq | keys | slaves_in_sync / master_link |"
    echo "|---|---:|---|---:|---:|---:|---|"
    m=$(dkvs_stats "$dm_port")
    printf '| master | %s | %s | %s | – | %s | %s |\n' "$dm_port" "$(stat_field "$m" role)" \
        "$(stat_field "$m" commit_seq)" "$(stat_field "$m" keys)" "$(stat_field "$m" slaves_in_sync)"
    dkvs_same=1
    for i in 0 1; do
        sl=$(dkvs_stats "${ds_ports[$i]}")
        printf '| slave%d | %s | %s | %s | %s | %s | %s |\n' "$((i + 1))" "${ds_ports[$i]}" \
            "$(stat_field "$sl" role)" "$(stat_field "$sl" commit_seq)" "$(stat_field "$sl" applied_seq)" \
            "$(stat_field "$sl" keys)" "$(stat_field "$sl" master_link)"
        [[ -n $(stat_field "$m" commit_seq) &&
            $(stat_field "$sl" commit_seq) == "$(stat_field "$m" commit_seq)" &&
            $(stat_field "$sl" keys) == "$(stat_field "$m" keys)" ]] || dkvs_same=0
    done
    echo
    if ((dkvs_same)); then
        echo "- dkvs: both slaves hold the master's commit_seq and key count: OK"
    else
        echo "- dkvs: MISMATCH: a slave's commit_seq or key count differs from the master's"
        failed=1
    fi
    echo
    for ((i = 0; i < 100; i++)); do
        off=$(info_field "$(redis_info "$rm_port" replication)" master_repl_offset)
        same=1
        for port in "${rr_ports[@]}"; do
            [[ -n $off && $(info_field "$(redis_info "$port" replication)" master_repl_offset) == "$off" ]] || same=0
        done
        ((same)) && break
        sleep 0.1
    done
    echo "redis (\`INFO replication\`, \`DBSIZE\`):"
    echo
    echo "| node | port | role | master_repl_offset | keys | connected_slaves / master_link_status |"
    echo "|---|---:|---|---:|---:|---|"
    info=$(redis_info "$rm_port" replication)
    m_keys=$(redis_dbsize "$rm_port")
    printf '| master | %s | %s | %s | %s | %s |\n' "$rm_port" "$(info_field "$info" role)" \
        "$(info_field "$info" master_repl_offset)" "$m_keys" "$(info_field "$info" connected_slaves)"
    m_off=$(info_field "$info" master_repl_offset)
    redis_same=1
    for i in 0 1; do
        info=$(redis_info "${rr_ports[$i]}" replication)
        r_keys=$(redis_dbsize "${rr_ports[$i]}")
        printf '| replica%d | %s | %s | %s | %s | %s |\n' "$((i + 1))" "${rr_ports[$i]}" \
            "$(info_field "$info" role)" "$(info_field "$info" master_repl_offset)" "$r_keys" \
            "$(info_field "$info" master_link_status)"
        [[ -n $m_off && $(info_field "$info" master_repl_offset) == "$m_off" && $r_keys == "$m_keys" ]] ||
            redis_same=0
    done
    echo
    if ((redis_same)); then
        echo "- redis: both replicas at the master's replication offset and key count: OK"
    else
        echo "- redis: a replica's offset or key count differs from the master's"
    fi
    echo

    for pid in "${ds_pids[@]}" "$dm_pid" "${rr_pids[@]}" "$rm_pid"; do
        stop_pid "$pid"
    done
fi

echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
if ((failed)); then
    note "some runs failed (see above)"
    exit 1
fi
