#!/usr/bin/env python3
"""What many connections cost the server: idle ones, and slowloris ones.

Issue 10's figures. Starts the real dkvs-server (target/release, --fsync never,
under `chrt -f 10` when allowed) on a free loopback port, once per phase:

- idle: opens --idle connections (10,000) that send nothing, and reports the
  server's RSS (VmRSS in /proc/PID/status) before and after.
- slowloris: opens --slowloris connections (2,000); each sends the header of a
  PUT declaring a --declare-bytes value (1 MiB, the default value limit), the
  key and --send-kib KiB of the value (16), and then nothing, or one more byte
  every --trickle-ms per connection. The server runs with --frame-timeout-ms
  600000, so that its frame timeout does not close them during the run. Reports
  RSS growth (and peak, VmHWM) and the latency of PINGs sent meanwhile, one at a
  time, by another client in its own process (so that this one's GIL is not
  measured), from the first connection opened to --hold-s seconds after the last.

The server's cap, --max-connections, is 10000 by default; the phases pass
--max-connections N + 16 so that the STATS and PING connections fit beside N.
This script raises its own RLIMIT_NOFILE to its hard limit; the server raises
its own to what --max-connections needs.

    tools/bench-conns.py [--idle N] [--slowloris N] [--send-kib K] [--trickle-ms MS]
                         [--hold-s S] [--only idle|slowloris] [--json]
"""

import argparse
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DKVS_BIN_DIR points at other builds (e.g. of an older commit, to compare).
BIN_DIR = os.environ.get("DKVS_BIN_DIR", os.path.join(ROOT, "target", "release"))
SERVER = os.path.join(BIN_DIR, "dkvs-server")
HEADER = struct.Struct(">BBBBIQHHI")  # PROTOCOL.md §2.1: 24 bytes
OP_PUT, OP_PING, OP_STATS = 0x02, 0x05, 0x06


def frame(opcode, request_id, key=b"", value=b"", value_len=None):
    """A request frame; value_len declares more than `value` holds (a partial frame)."""
    declared = len(value) if value_len is None else value_len
    return HEADER.pack(0xDB, 1, opcode, 0, request_id, 0, len(key), 0, declared) + key + value


def read_reply(sock):
    """One response: (status, value bytes)."""
    head = recv_exact(sock, HEADER.size)
    fields = HEADER.unpack(head)
    return fields[3], recv_exact(sock, fields[6] + fields[8])[fields[6] :]


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            sys.exit("the server closed the connection")
        data += chunk
    return data


def raise_own_descriptor_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def realtime_allowed():
    try:
        return subprocess.run(["chrt", "-f", "10", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def start_server(data_dir, extra, realtime):
    cmd = [SERVER, "-p", "0", "-l", "error", "-d", data_dir, "--fsync", "never"] + extra
    if realtime:
        cmd = ["chrt", "-f", "10"] + cmd  # chrt execs the server: the pid is the server's
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r":(\d+)\s*$", line)
    if not match:
        proc.kill()
        sys.exit(f"no ready line from dkvs-server: {line!r}")
    return proc, int(match.group(1))


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def stats(sock):
    sock.sendall(frame(OP_STATS, 1))
    _, text = read_reply(sock)
    return dict(
        line.split(" ", 1) for line in text.decode().splitlines() if " " in line
    )


def wait_open(stats_sock, want, limit_s=120):
    deadline = time.monotonic() + limit_s
    while True:
        open_now = int(stats(stats_sock)["connections_open"])
        if open_now >= want:
            return open_now
        if time.monotonic() > deadline:
            sys.exit(f"only {open_now} of {want} connections open after {limit_s} s")
        time.sleep(0.1)


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


def pinger(port, stop_file):
    """Child process: PING one at a time until stop_file exists; print latencies (µs) as JSON."""
    sock = connect(port)
    latencies = []
    while not os.path.exists(stop_file):
        start = time.perf_counter()
        sock.sendall(frame(OP_PING, len(latencies)))
        status, _ = read_reply(sock)
        latencies.append((time.perf_counter() - start) * 1e6)
        if status != 0:
            sys.exit(f"PING answered status {status}")
        time.sleep(0.001)
    print(json.dumps(latencies))


def start_pinger(port, scratch, realtime):
    stop_file = os.path.join(scratch, "stop-pinger")
    cmd = [sys.executable, os.path.abspath(__file__), "--pinger", str(port), stop_file]
    if realtime:
        cmd = ["chrt", "-f", "10"] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), stop_file


def stop_pinger(proc, stop_file):
    open(stop_file, "w").close()
    out, _ = proc.communicate(timeout=60)
    latencies = sorted(json.loads(out))
    return {
        "pings": len(latencies),
        "p50_ms": round(percentile(latencies, 50) / 1000, 3),
        "p99_ms": round(percentile(latencies, 99) / 1000, 3),
        "max_ms": round(latencies[-1] / 1000, 3) if latencies else None,
    }


def phase(name, n, args, realtime, open_one, hold):
    """Start a server, open n connections with open_one(port), hold them, measure."""
    with tempfile.TemporaryDirectory(prefix="dkvs-bench-conns-") as scratch:
        extra = ["--max-connections", str(n + 16)]
        if name == "slowloris":
            extra += ["--frame-timeout-ms", "600000"]
        server, port = start_server(os.path.join(scratch, "data"), extra, realtime)
        held = []
        try:
            stats_sock = connect(port)
            time.sleep(0.5)  # let start-up allocations settle
            before_kib = status_kib(server.pid, "VmRSS")
            ping_proc, stop_file = start_pinger(port, scratch, realtime)
            started = time.monotonic()
            for _ in range(n):
                held.append(open_one(port))
            open_now = wait_open(stats_sock, n + 2)
            opened_s = time.monotonic() - started
            hold(held)
            after_kib = status_kib(server.pid, "VmRSS")
            peak_kib = status_kib(server.pid, "VmHWM")
            ping = stop_pinger(ping_proc, stop_file)
            server_stats = stats(stats_sock)
        finally:
            for sock in held:
                sock.close()
            server.kill()
            server.wait()
    return {
        "phase": name,
        "connections": n,
        "connections_open": open_now,
        "open_s": round(opened_s, 2),
        "rss_before_mib": round(before_kib / 1024, 1),
        "rss_after_mib": round(after_kib / 1024, 1),
        "rss_growth_mib": round((after_kib - before_kib) / 1024, 1),
        "rss_peak_mib": round(peak_kib / 1024, 1),
        "partial_frame_bytes": int(server_stats.get("partial_frame_bytes", 0)),
        "connections_refused": int(server_stats.get("connections_refused", 0)),
        "ping": ping,
        "realtime": realtime,
    }


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--pinger":
        pinger(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--slowloris", type=int, default=2_000)
    parser.add_argument("--declare-bytes", type=int, default=1 << 20)
    parser.add_argument("--send-kib", type=int, default=16)
    parser.add_argument("--trickle-ms", type=int, default=0, help="0: send nothing more")
    parser.add_argument("--hold-s", type=float, default=5.0)
    parser.add_argument("--only", choices=["idle", "slowloris"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    limit = raise_own_descriptor_limit()
    need = max(args.idle, args.slowloris) + 64
    if limit < need:
        sys.exit(f"RLIMIT_NOFILE is {limit}; {need} needed (raise the hard limit)")
    realtime = realtime_allowed()
    results = []

    def hold_quietly(_held):
        time.sleep(args.hold_s)

    if args.only in (None, "idle"):
        results.append(phase("idle", args.idle, args, realtime, connect, hold_quietly))

    head = frame(OP_PUT, 1, b"k", b"v" * (args.send_kib << 10), value_len=args.declare_bytes)

    def open_slowloris(port):
        sock = connect(port)
        sock.sendall(head)
        return sock

    def hold_trickling(held):
        if args.trickle_ms <= 0:
            time.sleep(args.hold_s)
            return
        end = time.monotonic() + args.hold_s
        while time.monotonic() < end:
            for sock in held:
                sock.send(b"v")
            time.sleep(args.trickle_ms / 1000)

    if args.only in (None, "slowloris"):
        results.append(
            phase("slowloris", args.slowloris, args, realtime, open_slowloris, hold_trickling)
        )
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        p = r["ping"]
        print(
            f"{r['phase']}: {r['connections']} connections ({r['connections_open']} open with "
            f"STATS and PING, {r['open_s']} s to open); RSS {r['rss_before_mib']} -> "
            f"{r['rss_after_mib']} MiB (+{r['rss_growth_mib']}, peak {r['rss_peak_mib']}); "
            f"partial_frame_bytes {r['partial_frame_bytes']}; PING from another client "
            f"p50/p99/max {p['p50_ms']}/{p['p99_ms']}/{p['max_ms']} ms over {p['pings']} "
            f"(realtime: {r['realtime']})"
        )


if __name__ == "__main__":
    main()
