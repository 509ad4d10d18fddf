#!/usr/bin/env python3
"""The cost of keys with a deadline: memory per key, and how the expiry sweep
holds the reactor.

Starts two dkvs-servers (target/release, --fsync never) on free ports, writes N
keys (16-byte keys, 100-byte values) with plain SETs into one and with
`SET ... PX` into the other over RESP, compares their resident memory, then
lets every deadline pass and reports how long the master took to delete them
all (replicated DELETE transactions) and the longest reactor turn meanwhile
(STATS longest_turn_us, reset with CONFIG RESETSTAT before the deadline).

With --together every key gets the same absolute deadline (SET ... PXAT), so
all of them expire in the same millisecond: the sweep's worst case. While the
keys are deleted, a sampler resets the statistics every --sample-ms and reads
longest_turn_us back, and prints p50/p99/max of those per-window maxima.

    tools/bench-expiry.py [--keys N] [--ttl-ms MS] [--together] [--sample-ms MS]
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DKVS_BIN_DIR points at other builds (e.g. of an older commit, to compare).
BIN_DIR = os.environ.get("DKVS_BIN_DIR", os.path.join(ROOT, "target", "release"))
SERVER = os.path.join(BIN_DIR, "dkvs-server")
CHUNK = 5000


def start(data_dir):
    proc = subprocess.Popen(
        [SERVER, "-p", "0", "-l", "error", "-d", data_dir, "--fsync", "never"]
        + os.environ.get("DKVS_ARGS", "").split(),
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r":(\d+)\s*$", line)
    if not match:
        proc.kill()
        sys.exit(f"no ready line from dkvs-server: {line!r}")
    return proc, int(match.group(1))


def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_replies(sock, buf, n):
    """Read n simple replies (+OK, :n, $len...) and return the last one's text and the rest."""
    last = b""
    while n > 0:
        end = buf.find(b"\r\n")
        if end < 0:
            data = sock.recv(1 << 20)
            if not data:
                sys.exit("server closed the connection")
            buf += data
            continue
        line, buf = buf[:end], buf[end + 2 :]
        if line.startswith(b"$") and line != b"$-1":
            size = int(line[1:])
            while len(buf) < size + 2:
                buf += sock.recv(1 << 20)
            line, buf = buf[:size], buf[size + 2 :]
        if line.startswith(b"-"):
            sys.exit(f"error reply: {line!r}")
        last = line
        n -= 1
    return last, buf


def call(sock, *args):
    sock.sendall(command(*args))
    reply, _ = read_replies(sock, b"", 1)
    return reply.decode()


def stats(sock, name):
    info = call(sock, "INFO", "memory") if name == "used_memory_rss" else None
    if info is not None:
        return int(re.search(r"used_memory_rss:(\d+)", info).group(1))
    raise ValueError(name)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def fill(port, keys, ttl_ms, at_ms=None):
    sock = socket.create_connection(("127.0.0.1", port))
    value = b"v" * 100
    if at_ms is not None:
        deadline_extra = ["PXAT", at_ms]
    else:
        deadline_extra = [] if ttl_ms is None else ["PX", ttl_ms]
    for start in range(0, keys, CHUNK):
        batch = b"".join(
            command("SET", b"key:%012d" % i, value, *deadline_extra)
            for i in range(start, min(keys, start + CHUNK))
        )
        sock.sendall(batch)
        read_replies(sock, b"", min(keys, start + CHUNK) - start)
    return sock


def stat(port, name):
    out = subprocess.run(
        [os.path.join(BIN_DIR, "dkvs-client"), "-p", str(port), "stats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(rf"^{name} (\d+)", out, re.M)
    return int(match.group(1)) if match else None


def keys_held(port):
    """Keys still in memory: STATS keys_held where the server has it (keys
    past their deadline no longer count in `keys` or INFO), else `keys`."""
    held = stat(port, "keys_held")
    return stat(port, "keys") if held is None else held


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--ttl-ms", type=int, default=60_000)
    parser.add_argument("--together", action="store_true", help="one deadline for every key (PXAT)")
    parser.add_argument("--sample-ms", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        plain, plain_port = start(os.path.join(work, "plain"))
        timed, timed_port = start(os.path.join(work, "timed"))
        try:
            base_plain, base_timed = rss_kib(plain.pid), rss_kib(timed.pid)
            fill(plain_port, args.keys, None).close()
            first = time.time()
            at_ms = int(first * 1000) + args.ttl_ms if args.together else None
            sock = fill(timed_port, args.keys, args.ttl_ms, at_ms)
            last = time.time()
            print(f"wrote {args.keys} keys into each ({last - first:.1f} s for the ones with a TTL)")
            if at_ms is not None:
                if last * 1000 > at_ms - 1000:
                    sys.exit(f"filling took {last - first:.1f} s: raise --ttl-ms")
                first = last = at_ms / 1000 - args.ttl_ms / 1000
            plain_kib = rss_kib(plain.pid) - base_plain
            timed_kib = rss_kib(timed.pid) - base_timed
            plain.kill()  # it would compete for the CPU with what is measured next
            print(f"RSS growth, plain keys:    {plain_kib / 1024:.1f} MiB ({plain_kib * 1024 / args.keys:.0f} B/key)")
            print(f"RSS growth, keys with TTL: {timed_kib / 1024:.1f} MiB ({timed_kib * 1024 / args.keys:.0f} B/key)")
            print(f"a deadline costs {(timed_kib - plain_kib) * 1024 / args.keys:.0f} B/key more")
            call(sock, "CONFIG", "RESETSTAT")
            time.sleep(max(0.0, first + args.ttl_ms / 1000 - time.time() - 0.5))
            # Before any deadline: the idle turns (and a snapshot of the log, if one runs).
            print(f"longest reactor turn before the first deadline: {stat(timed_port, 'longest_turn_us')} us")
            call(sock, "CONFIG", "RESETSTAT")
            time.sleep(max(0.0, first + args.ttl_ms / 1000 - time.time() - 0.05))
            longest = stat(timed_port, "longest_turn_us")
            call(sock, "CONFIG", "RESETSTAT")
            limit = time.time() + 600
            windows = []
            sweeps = []
            while time.time() < limit:
                time.sleep(args.sample_ms / 1000)
                windows.append(stat(timed_port, "longest_turn_us"))
                sweeps.append(stat(timed_port, "longest_sweep_us"))
                longest = max(longest, windows[-1])
                call(sock, "CONFIG", "RESETSTAT")
                if keys_held(timed_port) == 0:
                    break
            done = time.time()
            print(
                f"deadlines passed over {last - first:.1f} s; the master had deleted all "
                f"{args.keys} keys {done - (last + args.ttl_ms / 1000):.1f} s after the last one"
            )
            print(
                f"from the first deadline to the last deletion: longest reactor turn "
                f"{longest} us; per {args.sample_ms} ms window ({len(windows)} windows) the "
                f"longest turn was p50 {percentile(windows, 0.5)} us, p99 "
                f"{percentile(windows, 0.99)} us, max {max(windows)} us"
            )
            print(
                f"the sweep step alone (STATS longest_sweep_us, without applying its deletions): "
                f"per window p50 {percentile(sweeps, 0.5)} us, p99 {percentile(sweeps, 0.99)} us, "
                f"max {max(sweeps)} us"
            )
            print(f"load average: {os.getloadavg()}")
            print("(a turn is wall time between two polls: on a busy 2-core machine it includes preemption)")
        finally:
            plain.kill()
            timed.kill()


if __name__ == "__main__":
    main()
