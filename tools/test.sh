#!/usr/bin/env bash
# test.sh — the original project's replication demo, for dkvs.
#
# Builds dkvs, starts a master and a slave on free loopback ports, runs N random
# put/update/delete/get operations through `dkvs-client` (the original `-o OP -k KEY -v VALUE`
# form) with random values against the master, and after each one checks that the slave answers
# that key exactly as the master does (briefly retrying, since a slave's reads may lag the master
# by the transactions in flight). It also checks the master's answers against a model of what they
# should be. First in UDP mode, then in TCP mode with fresh servers. Prints a summary, exits
# non-zero on any mismatch or error, and stops the servers it started on exit, Ctrl-C and errors.
#
# UDP mode: the clients use `-u` and the slave serves UDP only (`-u`). The master serves TCP and
# UDP: a slave's replication link is a TCP connection to the master's port, so a master started
# with `-u` can never take a slave (see the report of issue 5). TCP mode: everything `-t`.
#
# Needs: bash 4+, cargo (unless --no-build), Linux.

set -euo pipefail

usage() {
    cat <<EOF
Usage: tools/test.sh [OPTIONS]

Options:
  -n, --ops N      random operations per mode (default 200)
  --seed N         seed of the random operations (default: random; printed)
  --keys N         size of the keyspace, small so updates and deletes hit (default 20)
  --only MODE      run only one mode: udp or tcp
  --no-build       do not run 'cargo build' first
  -h, --help       this help
EOF
}

die() {
    echo "test.sh: error: $*" >&2
    exit 2
}

OPS=200
SEED=$((RANDOM * 32768 + RANDOM))
KEYS=20
MODES=(udp tcp)
BUILD=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n | --ops) OPS="${2:?--ops needs a number}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a number}"; shift 2 ;;
        --keys) KEYS="${2:?--keys needs a number}"; shift 2 ;;
        --only) MODES=("${2:?--only needs udp or tcp}"); shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done
[[ "$OPS" =~ ^[0-9]+$ ]] || die "--ops must be a number, not '$OPS'"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be a number, not '$SEED'"
[[ "$KEYS" =~ ^[1-9][0-9]*$ ]] || die "--keys must be a positive number, not '$KEYS'"
for mode in "${MODES[@]}"; do
    [[ "$mode" == udp || "$mode" == tcp ]] || die "--only takes udp or tcp, not '$mode'"
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ $BUILD == 1 ]]; then
    cargo build --quiet --bin dkvs-server --bin dkvs-client || die "cargo build failed"
fi
SERVER="$ROOT/target/debug/dkvs-server"
CLIENT="$ROOT/target/debug/dkvs-client"
[[ -x "$SERVER" && -x "$CLIENT" ]] || die "build dkvs first (cargo build)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dkvs-test.XXXXXX")"
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME ARGS... — start dkvs-server on a free port (-p 0), wait for its ready line,
# and set PORT to the port it reports.
start_server() {
    local name="$1"
    shift
    "$SERVER" -p 0 -l info --logfile "$WORK/$name.log" "$@" >"$WORK/$name.out" 2>&1 &
    PIDS+=("$!")
    local pid=$! i
    for ((i = 0; i < 200; i++)); do
        if grep -q 'ready' "$WORK/$name.out" 2>/dev/null; then
            PORT="$(sed -n 's/^dkvs-server ready: .*:\([0-9][0-9]*\)$/\1/p' "$WORK/$name.out")"
            [[ -n "$PORT" ]] || die "$name: no port in $(cat "$WORK/$name.out")"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$name exited: $(cat "$WORK/$name.out")"
        sleep 0.05
    done
    die "$name printed no ready line within 10 s"
}

# stop_servers — stop every server started so far.
stop_servers() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

# stat_of PORT NAME — the value of one STATS line of the server at PORT.
stat_of() {
    "$CLIENT" "$CFLAG" -p "$1" stats 2>/dev/null | sed -n "s/^$2 //p"
}

# ask PORT KEY — sets RC (0 found, 1 not found, 3 error) and OUT (the value) for GET KEY.
ask() {
    RC=0
    OUT="$("$CLIENT" "$CFLAG" -p "$1" -o 1 -k "$2" 2>"$WORK/client.err")" || RC=$?
}

# random_value — a value of 1 to 40 random characters (letters, digits, a few symbols; it may
# start with "-", hence `-v=VALUE` below).
CHARS='abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:=+'
random_value() {
    local len=$((RANDOM % 40 + 1)) v="" i
    for ((i = 0; i < len; i++)); do
        v+="${CHARS:RANDOM % ${#CHARS}:1}"
    done
    VALUE="$v"
}

TOTAL_OPS=0
TOTAL_MISMATCHES=0
TOTAL_ERRORS=0
SUMMARY=()

note() {
    echo "test.sh: $*" >&2
}

# check_key KEY WHAT — compare the slave's answer for KEY with the master's; retry while they
# differ, for up to ~2 s (a slave may lag by the transactions in flight).
check_key() {
    local key="$1" what="$2" m_rc m_out i
    ask "$MPORT" "$key"
    m_rc=$RC m_out=$OUT
    for ((i = 0; i < 40; i++)); do
        ask "$SPORT" "$key"
        if [[ $RC == "$m_rc" && "$OUT" == "$m_out" ]]; then
            ((i > 0)) && RETRIES=$((RETRIES + 1))
            return 0
        fi
        sleep 0.05
    done
    MISMATCHES=$((MISMATCHES + 1))
    note "MISMATCH after $what: key '$key': master rc=$m_rc '$m_out', slave rc=$RC '$OUT'"
}

run_mode() {
    local mode="$1" master_flags slave_flags
    if [[ $mode == udp ]]; then
        CFLAG=-u
        master_flags=()
        slave_flags=(-u)
    else
        CFLAG=-t
        master_flags=(-t)
        slave_flags=(-t)
    fi
    start_server "master-$mode" "${master_flags[@]}"
    MPORT=$PORT
    start_server "slave-$mode" "${slave_flags[@]}" -m 127.0.0.1 -q "$MPORT"
    SPORT=$PORT
    local i link=""
    for ((i = 0; i < 200; i++)); do
        link="$(stat_of "$SPORT" master_link)"
        [[ "$link" == following ]] && break
        sleep 0.05
    done
    [[ "$link" == following ]] || die "$mode: the slave did not join its master (link '$link')"
    note "$mode: master on 127.0.0.1:$MPORT, slave on 127.0.0.1:$SPORT, $OPS operations"

    declare -A model=()
    MISMATCHES=0 RETRIES=0
    local errors=0 puts=0 updates=0 deletes=0 gets=0 op key rc out want_rc
    for ((i = 0; i < OPS; i++)); do
        key="key$((RANDOM % KEYS))"
        op=$((RANDOM % 4)) # 0 update, 1 get, 2 delete, 3 put: the original -o codes
        rc=0
        case $op in
            0 | 3)
                random_value
                out="$("$CLIENT" "$CFLAG" -p "$MPORT" -o "$op" -k "$key" -v="$VALUE" 2>"$WORK/client.err")" || rc=$?
                ;;
            *)
                out="$("$CLIENT" "$CFLAG" -p "$MPORT" -o "$op" -k "$key" 2>"$WORK/client.err")" || rc=$?
                ;;
        esac
        # What the master must have answered, from the model.
        want_rc=0
        if [[ $op != 3 && -z "${model[$key]+set}" ]]; then
            want_rc=1
        fi
        if [[ $rc != "$want_rc" ]]; then
            errors=$((errors + 1))
            note "$mode: op $i (-o $op -k $key): exit $rc, expected $want_rc: $out $(cat "$WORK/client.err")"
        fi
        case $op in
            0) updates=$((updates + 1)); [[ $rc == 0 ]] && model[$key]="$VALUE" ;;
            3) puts=$((puts + 1)); [[ $rc == 0 ]] && model[$key]="$VALUE" ;;
            2) deletes=$((deletes + 1)); [[ $rc == 0 ]] && unset "model[$key]" ;;
            1)
                gets=$((gets + 1))
                if [[ $rc == 0 && "$out" != "${model[$key]-}" ]]; then
                    errors=$((errors + 1))
                    note "$mode: op $i: GET $key = '$out', expected '${model[$key]-}'"
                fi
                ;;
        esac
        case $op in
            1) check_key "$key" "get (op $i)" ;;
            *) check_key "$key" "write -o $op (op $i)" ;;
        esac
    done
    # The whole keyspace, and the counters, must agree at the end.
    for ((i = 0; i < KEYS; i++)); do
        check_key "key$i" "the run (final check)"
    done
    local m_keys s_keys m_seq s_seq
    for ((i = 0; i < 40; i++)); do
        m_keys="$(stat_of "$MPORT" keys)" s_keys="$(stat_of "$SPORT" keys)"
        m_seq="$(stat_of "$MPORT" commit_seq)" s_seq="$(stat_of "$SPORT" commit_seq)"
        [[ "$m_keys" == "$s_keys" && "$m_seq" == "$s_seq" ]] && break
        sleep 0.05
    done
    if [[ "$m_keys" != "$s_keys" || "$m_seq" != "$s_seq" ]]; then
        MISMATCHES=$((MISMATCHES + 1))
        note "$mode: master keys=$m_keys commit_seq=$m_seq, slave keys=$s_keys commit_seq=$s_seq"
    fi
    if [[ "$m_keys" != "${#model[@]}" ]]; then
        errors=$((errors + 1))
        note "$mode: master holds $m_keys keys, the model ${#model[@]}"
    fi
    if ((MISMATCHES + errors > 0)); then
        note "$mode: last lines of the server logs:"
        tail -n 20 "$WORK/master-$mode.log" "$WORK/slave-$mode.log" >&2 || true
    fi
    stop_servers
    SUMMARY+=("$(printf '%-4s ops %d (put %d, update %d, delete %d, get %d), keys %s, commit_seq %s, slave retries %d, mismatches %d, errors %d' \
        "$mode" "$OPS" "$puts" "$updates" "$deletes" "$gets" "$m_keys" "$m_seq" "$RETRIES" "$MISMATCHES" "$errors")")
    TOTAL_OPS=$((TOTAL_OPS + OPS))
    TOTAL_MISMATCHES=$((TOTAL_MISMATCHES + MISMATCHES))
    TOTAL_ERRORS=$((TOTAL_ERRORS + errors))
}

RANDOM=$SEED
note "seed $SEED (rerun with --seed $SEED)"
for mode in "${MODES[@]}"; do
    run_mode "$mode"
done

echo "dkvs replication demo, seed $SEED"
for line in "${SUMMARY[@]}"; do
    echo "  $line"
done
echo "total: $TOTAL_OPS operations, $TOTAL_MISMATCHES mismatches, $TOTAL_ERRORS errors"
if ((TOTAL_MISMATCHES + TOTAL_ERRORS > 0)); then
    echo "FAIL"
    exit 1
fi
echo "PASS"
