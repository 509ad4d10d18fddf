#!/usr/bin/env bash
# bench-vs-redis.sh — measure dkvs-server side by side with redis-server (SPEC §6, issue 4).
#
# Starts redis-server (no persistence) and dkvs-server on free loopback ports, drives both with the
# same dkvs-load command (only --protocol and --port differ), and prints, per workload, a Markdown
# table of throughput, latency p50/p99 and server CPU time per operation, with the ratio
# dkvs ÷ redis. Then loads ~1M keys (16 B keys, 100 B values) into fresh instances of both and
# compares their resident memory. Both servers are stopped on exit, Ctrl-C and errors.
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
  --keyspace N      keys in the workloads' keyspace, preloaded by every run (default 100000)
  --threads N       dkvs-load reactor threads (default 1)
  --seed N          dkvs-load key/op seed, the same for both servers (default 42)
  --no-memory       skip the memory comparison (1M keys)
  --no-build        do not run 'cargo build --release' first
  -h, --help        this help

Workloads (all: 16-byte keys, 100-byte values, uniform keys, preloaded keyspace):
  get-50       GET, 50 connections, no pipelining
  set-50       SET, 50 connections, no pipelining
  get-50-p16   GET, 50 connections, pipeline depth 16
  set-50-p16   SET, 50 connections, pipeline depth 16
  get-1        GET, 1 connection (round-trip latency)
  set-1        SET, 1 connection (round-trip latency)
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
                [[ " ${WORKLOADS[*]} " == *" $name "* ]] ||
                    die "--only: unknown workload '$name' (known: ${WORKLOADS[*]})"
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

selected=()
for name in "${WORKLOADS[@]}"; do
    if ((${#only[@]} == 0)) || [[ " ${only[*]} " == *" $name "* ]]; then
        selected+=("$name")
    fi
done

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
for bin in "$server_bin" "$load_bin"; do
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
# Start redis-server on a free loopback port in directory $1.
start_redis() {
    local dir=$1 attempt port pid i
    mkdir -p "$dir"
    for ((attempt = 1; attempt <= 5; attempt++)); do
        port=$(free_port)
        redis_cmd="redis-server --save '' --appendonly no --port $port --bind 127.0.0.1 --daemonize no --dir $dir"
        "$redis_bin" --save '' --appendonly no --port "$port" --bind 127.0.0.1 --daemonize no \
            --dir "$dir" >"$dir/redis.log" 2>&1 &
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
# Start dkvs-server on a free loopback port (-p 0) in directory $1.
start_dkvs() {
    local dir=$1 pid i line=""
    mkdir -p "$dir"
    (cd "$dir" && exec "$root/$server_bin" -p 0 -l error >"$dir/dkvs.out" 2>"$dir/dkvs.err") &
    pid=$!
    started+=("$pid")
    for ((i = 0; i < 100; i++)); do
        line=""
        [[ -f $dir/dkvs.out ]] && read -r line <"$dir/dkvs.out" || true
        if [[ $line =~ ready:.*:([0-9]+)[[:space:]]*$ ]]; then
            dkvs_pid=$pid
            dkvs_port=${BASH_REMATCH[1]}
            dkvs_cmd="$server_bin -p 0 -l error   # -> $line"
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
# One measured run.
#
# run_load OUT SERVER_PID SERVER_LOG ARGS...: runs dkvs-load ARGS (which must include --json -q --preload),
# writes OUT.json (its stdout), OUT.err (its stderr), OUT.cpu ("ticks_at_start ticks_at_end"),
# OUT.rc. Server CPU is sampled when dkvs-load prints the line that ends its last unmeasured
# phase ("warmup: ...", or "preload: ..." without warmup), and after dkvs-load exits.
run_load() {
    local out=$1 server=$2 server_log=$3 marker line fd load_pid st t rc=0 cpu0="" cpu1="" n=0 limit deadline
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
echo "- client: $("$load_bin" --version 2>/dev/null || echo dkvs-load), $threads thread(s), same command for both servers (only --protocol and --port differ)"
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

echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
if ((failed)); then
    note "some runs failed (see above)"
    exit 1
fi
