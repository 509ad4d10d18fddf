#!/usr/bin/env python3
"""bench-durable.py: durable writes of dkvs beside redis-server and etcd, one run, same client.

Workloads (issue 8; every figure is a ratio against an anchor measured in the same run):
  fsync-set-50   SET, 50 connections: dkvs --fsync always vs Redis appendonly yes, appendfsync always
  get-under-set  GET p99 at 50 connections alone, then while 50 other connections write durably
                 (dkvs --fsync always, Redis appendfsync always)
  never-vs-nolog SET, 50 connections, pipeline 16: dkvs --fsync never vs a dkvs binary without a
                 log (--baseline BIN, e.g. built from the commit before the write-ahead log)
  repl-durable-1 one connection, master + 2 slaves, --fsync always on all: write p50 vs a 3-node
                 etcd (etcd-server) put p50 through its v3 HTTP gateway (Python http.client with
                 keep-alive, JSON bodies; the client is named in the output)
  restart-1m     restart time with 1M keys: dkvs (snapshot + log) vs redis-server from RDB and AOF
  failover-cost  SET at 1 and 50 connections on master + 2 slaves: fixed (-m) vs --etcd (one etcd);
                 etcd is on the path only when the in-sync set changes, so the ratio should be ~1
  slow-slave     SET, 50 connections, master + 2 slaves, --fsync never (issue 9): healthy, vs one slave frozen
                 250 ms in every 300 (kill -STOP/-CONT), measured once it was evicted as lagging,
                 vs the same with the lag bound off (--max-slave-lag-ms 0)

dkvs-load drives dkvs and Redis (--protocol resp) with identical flags. Servers run on free
loopback ports in a temporary directory and are killed on exit. Needs redis-server, and etcd for
repl-durable-1. Output: Markdown on stdout, progress on stderr.

  tools/bench-durable.py [--duration S] [--only a,b] [--baseline BIN]
"""

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.environ.get("DKVS_SERVER", os.path.join(ROOT, "target/release/dkvs-server"))
LOAD = os.path.join(ROOT, "target/release/dkvs-load")
CLIENT = os.path.join(ROOT, "target/release/dkvs-client")
PROCS = []


def note(msg):
    print(f"bench-durable: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    PROCS.append(p)
    return p


def kill(p):
    if p.poll() is None:
        p.kill()
        p.wait()


def start_dkvs(binary, data, args=()):
    p = spawn([binary, "-p", "0", "-l", "error", "-d", data, *args], stdout=subprocess.PIPE,
              stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if "ready" not in line:
        raise SystemExit(f"dkvs-server did not start: {line!r}")
    return p, int(line.rsplit(":", 1)[1])


def start_dkvs_nolog(binary, args=()):
    """A dkvs binary from before the write-ahead log (no -d flag)."""
    p = spawn([binary, "-p", "0", "-l", "error", *args], stdout=subprocess.PIPE,
              stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    return p, int(line.rsplit(":", 1)[1])


def resp(port, *cmd):
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        out = f"*{len(cmd)}\r\n" + "".join(f"${len(c)}\r\n{c}\r\n" for c in cmd)
        s.sendall(out.encode())
        return s.recv(65536).decode(errors="replace")


def start_redis(directory, *args):
    os.makedirs(directory, exist_ok=True)
    port = free_port()
    p = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--dir", directory, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if resp(port, "PING").startswith("+PONG"):
                return p, port
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def load(port, protocol, extra, duration, preload=True, keyspace=100000):
    cmd = [LOAD, "--port", str(port), "--protocol", protocol, "--keyspace", str(keyspace),
           "--key-size", "16", "--value-size", "100", "--seed", "42", *extra]
    if duration:
        cmd += ["--warmup", "1", "--duration", str(duration)]
    cmd += ["--json", "-q"]
    if preload:
        cmd.append("--preload")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[0])


def dkvs_stat(port, name):
    """One figure of dkvs's STATS (preload and run together), or "n/a"."""
    out = subprocess.run([CLIENT, "-s", "127.0.0.1", "-p", str(port), "stats"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.split(" ", 1)[0] == name:
            return line.split(" ", 1)[1].strip()
    return "n/a"


def ratio(a, b):
    return f"{a / b:.2f}×" if b else "n/a"


def table(title, rows, header):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


def fsync_set_50(tmp, args):
    rp, rport = start_redis(tmp + "/r1", "--appendonly", "yes", "--appendfsync", "always")
    dp, dport = start_dkvs(SERVER, tmp + "/d1", ["--fsync", "always"])
    w = ["--connections", "50", "--get-ratio", "0"]
    r = load(rport, "resp", w, args.duration)
    d = load(dport, "dkvs", w, args.duration)
    fsync_p50 = dkvs_stat(dport, "wal_fsync_p50_us")
    table("SET, 50 connections, durable (Redis appendfsync always vs dkvs --fsync always)",
          [[f"{r['ops_per_sec']:,.0f}", f"{d['ops_per_sec']:,.0f}",
            ratio(d["ops_per_sec"], r["ops_per_sec"]), ratio(d["p50_us"], r["p50_us"]),
            ratio(d["p99_us"], r["p99_us"]), fsync_p50, f"{os.getloadavg()[0]:.2f}"]],
          ["Redis ops/s", "dkvs ops/s", "ops/s", "p50", "p99", "dkvs fdatasync p50 µs",
           "load avg"])
    kill(rp)
    kill(dp)


def get_under_set(tmp, args):
    rows = []
    for name, start, proto in [
        ("Redis", lambda: start_redis(tmp + "/r2", "--appendonly", "yes", "--appendfsync",
                                      "always"), "resp"),
        ("dkvs", lambda: start_dkvs(SERVER, tmp + "/d2", ["--fsync", "always"]), "dkvs"),
    ]:
        p, port = start()
        reads = ["--connections", "50", "--get-ratio", "1"]
        alone = load(port, proto, reads, args.duration)
        writer = spawn([LOAD, "--port", str(port), "--protocol", proto, "--keyspace", "100000",
                        "--connections", "50", "--get-ratio", "0", "--seed", "7",
                        "--duration", str(args.duration + 2), "--json", "-q"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.5)
        busy = load(port, proto, reads, args.duration, preload=False)
        wout = json.loads(writer.communicate()[0].splitlines()[0])
        rows.append([name, f"{alone['p99_us']:.0f}", f"{busy['p99_us']:.0f}",
                     ratio(busy["p99_us"], alone["p99_us"]), f"{wout['ops_per_sec']:,.0f}"])
        kill(p)
    table("GET p99 at 50 connections, alone and while 50 other connections write durably",
          rows, ["server", "GET p99 alone µs", "GET p99 with writers µs", "ratio",
                 "writers ops/s"])


def never_vs_nolog(tmp, args):
    if not args.baseline:
        note("never-vs-nolog needs --baseline BIN (a dkvs-server without the log); skipped")
        return
    w = ["--connections", "50", "--pipeline", "16", "--get-ratio", "0"]
    rows = []
    for round_ in range(2):
        bp, bport = start_dkvs_nolog(args.baseline)
        b = load(bport, "dkvs", w, args.duration)
        kill(bp)
        dp, dport = start_dkvs(SERVER, f"{tmp}/d3-{round_}", ["--fsync", "never"])
        d = load(dport, "dkvs", w, args.duration)
        kill(dp)
        rows.append([round_ + 1, f"{b['ops_per_sec']:,.0f}", f"{d['ops_per_sec']:,.0f}",
                     ratio(d["ops_per_sec"], b["ops_per_sec"])])
    table("SET, 50 connections, pipeline 16: --fsync never vs no log at all", rows,
          ["round", "no log ops/s", "--fsync never ops/s", "ratio"])


def etcd_cluster(tmp):
    names = ["e0", "e1", "e2"]
    peers = {n: free_port() for n in names}
    clients = {n: free_port() for n in names}
    initial = ",".join(f"{n}=http://127.0.0.1:{peers[n]}" for n in names)
    for n in names:
        spawn(["etcd", "--name", n, "--data-dir", f"{tmp}/{n}",
               "--listen-peer-urls", f"http://127.0.0.1:{peers[n]}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[n]}",
               "--listen-client-urls", f"http://127.0.0.1:{clients[n]}",
               "--advertise-client-urls", f"http://127.0.0.1:{clients[n]}",
               "--initial-cluster", initial, "--initial-cluster-state", "new"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return clients


def etcd_put_latencies(port, count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    value = base64.b64encode(b"v" * 100).decode()
    lat = []
    for i in range(count):
        key = base64.b64encode(f"key:{i % 100000:012d}".encode()).decode()
        body = json.dumps({"key": key, "value": value})
        t = time.perf_counter()
        conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"etcd put failed: {r.status}")
        lat.append(time.perf_counter() - t)
    lat.sort()
    return lat


def repl_durable_1(tmp, args):
    if not shutil.which("etcd"):
        note("etcd not installed (apt-get install etcd-server); repl-durable-1 skipped")
        return
    clients = etcd_cluster(tmp)
    leader = None
    for _ in range(200):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", clients["e0"], timeout=2)
            conn.request("POST", "/v3/kv/put", json.dumps({"key": "eA==", "value": "eA=="}))
            if conn.getresponse().status == 200:
                leader = clients["e0"]
                break
        except OSError:
            pass
        time.sleep(0.1)
    if leader is None:
        raise SystemExit("etcd cluster did not come up")
    etcd_put_latencies(leader, 200)  # warm-up
    lat = etcd_put_latencies(leader, args.etcd_puts)
    e50, e99 = lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6
    mp, mport = start_dkvs(SERVER, tmp + "/m", ["--fsync", "always"])
    slaves = [start_dkvs(SERVER, f"{tmp}/s{i}", ["--fsync", "always", "-m", "127.0.0.1",
                                                  "-q", str(mport)]) for i in range(2)]
    for _ in range(100):
        st = subprocess.run([os.path.join(ROOT, "target/release/dkvs-client"), "-p", str(mport),
                             "stats"], capture_output=True, text=True).stdout
        if "slaves_in_sync 2" in st:
            break
        time.sleep(0.1)
    d = load(mport, "dkvs", ["--connections", "1", "--get-ratio", "0"], args.duration)
    table("Durable replicated write, one connection: dkvs master + 2 slaves (--fsync always) vs "
          "a 3-node etcd put (client: Python http.client, keep-alive, v3 JSON gateway)",
          [[f"{e50:.0f}", f"{e99:.0f}", f"{d['p50_us']:.0f}", f"{d['p99_us']:.0f}",
            ratio(d["p50_us"], e50)]],
          ["etcd put p50 µs", "etcd p99 µs", "dkvs p50 µs", "dkvs p99 µs", "p50 ratio"])
    kill(mp)
    for p, _ in slaves:
        kill(p)


def wait_stats(port, needle, limit=30):
    for _ in range(int(limit * 10)):
        st = subprocess.run([os.path.join(ROOT, "target/release/dkvs-client"), "-p", str(port),
                             "stats"], capture_output=True, text=True).stdout
        if needle(st):
            return st
        time.sleep(0.1)
    raise SystemExit(f"server on {port} never reached the state waited for")


def failover_cost(tmp, args):
    """Steady-state cost of failover through etcd: the same three servers, fixed master vs
    --etcd (etcd is on the write path only when the in-sync set changes)."""
    if not shutil.which("etcd"):
        note("etcd not installed (apt-get install etcd-server); failover-cost skipped")
        return
    rows = []
    results = {}
    for mode in ["fixed", "etcd"]:
        procs = []
        if mode == "fixed":
            mp, mport = start_dkvs(SERVER, f"{tmp}/fx-m", ["--fsync", "always"])
            procs.append(mp)
            for i in range(2):
                procs.append(start_dkvs(SERVER, f"{tmp}/fx-s{i}", ["--fsync", "always", "-m",
                                                                    "127.0.0.1", "-q",
                                                                    str(mport)])[0])
            wait_stats(mport, lambda st: "slaves_in_sync 2" in st)
        else:
            cport, pport = free_port(), free_port()
            procs.append(spawn(["etcd", "--name", "f0", "--data-dir", f"{tmp}/fo-etcd",
                                "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                                "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                                "--listen-client-urls", f"http://127.0.0.1:{cport}",
                                "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                                "--initial-cluster", f"f0=http://127.0.0.1:{pport}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports = []
            for i in range(3):
                p, port = start_dkvs(SERVER, f"{tmp}/fo-{i}", [
                    "--fsync", "always", "--etcd", f"http://127.0.0.1:{cport}",
                    "--cluster", "bench"])
                procs.append(p)
                ports.append(port)
            mport = None
            for _ in range(300):
                for port in ports:
                    st = subprocess.run([os.path.join(ROOT, "target/release/dkvs-client"), "-p",
                                         str(port), "stats"], capture_output=True,
                                        text=True).stdout
                    if "role master" in st:
                        mport = port
                if mport:
                    break
                time.sleep(0.1)
            if mport is None:
                raise SystemExit("no master elected")
            wait_stats(mport, lambda st: "slaves_in_sync 2" in st)
        one = load(mport, "dkvs", ["--connections", "1", "--get-ratio", "0"], args.duration)
        fifty = load(mport, "dkvs", ["--connections", "50", "--get-ratio", "0"], args.duration)
        results[mode] = (one, fifty)
        for p in procs:
            kill(p)
    (f1, f50), (e1, e50) = results["fixed"], results["etcd"]
    table("Failover through etcd, steady state: the same master + 2 slaves (--fsync always), "
          "fixed (-m) vs --etcd (client: dkvs-load)",
          [["SET 1 conn p50 µs", f"{f1['p50_us']:.0f}", f"{e1['p50_us']:.0f}",
            ratio(e1["p50_us"], f1["p50_us"])],
           ["SET 1 conn p99 µs", f"{f1['p99_us']:.0f}", f"{e1['p99_us']:.0f}",
            ratio(e1["p99_us"], f1["p99_us"])],
           ["SET 50 conns ops/s", f"{f50['ops_per_sec']:.0f}", f"{e50['ops_per_sec']:.0f}",
            ratio(e50["ops_per_sec"], f50["ops_per_sec"])]],
          ["measure", "fixed master", "with etcd", "etcd / fixed"])


def wait_ready_time(cmd, ready):
    t = time.perf_counter()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready(p)
    return p, time.perf_counter() - t


def restart_1m(tmp, args):
    keys = ["--connections", "50", "--pipeline", "16", "--get-ratio", "1", "--ops", "1"]
    d = tmp + "/d5"
    p, port = start_dkvs(SERVER, d, ["--fsync", "never"])
    load(port, "dkvs", keys, 0, keyspace=1_000_000)
    kill(p)
    # Once as it is (snapshots by log size plus the log after them), once more right after.
    p, t_dkvs = wait_ready_time([SERVER, "-p", "0", "-l", "error", "-d", d],
                                lambda p: p.stdout.readline())
    kill(p)
    results = [["dkvs (snapshot + log)", f"{t_dkvs:.2f}"]]
    for mode, extra in [("RDB", ["--appendonly", "no"]), ("AOF", ["--appendonly", "yes",
                                                                   "--appendfsync", "no"])]:
        rd = f"{tmp}/r5-{mode}"
        rp, rport = start_redis(rd, *extra)
        load(rport, "resp", keys, 0, keyspace=1_000_000)
        if mode == "RDB":
            resp(rport, "SAVE")
        else:
            time.sleep(1)
        kill(rp)
        port = free_port()

        def ready(_p, port=port):
            while True:
                try:
                    if resp(port, "PING").startswith("+PONG"):
                        return
                except OSError:
                    pass
                time.sleep(0.01)
        extra2 = extra + (["--dbfilename", "dump.rdb"] if mode == "RDB" else [])
        os.makedirs(rd, exist_ok=True)
        rp, t = wait_ready_time(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--dir", rd, *extra2], ready)
        keys_loaded = resp(port, "DBSIZE").strip()
        kill(rp)
        results.append([f"redis-server from {mode} ({keys_loaded})", f"{t:.2f}"])
    table("Restart time with 1,000,000 keys (16 B keys, 100 B values): process start to serving",
          results, ["server", "seconds"])


def slow_slave(tmp, args):
    """Write throughput with one slave that answers each vote just inside the 2PC timeout."""
    results = {}
    for mode in ["healthy", "slow", "slow-no-lag-bound"]:
        extra = ["--max-slave-lag-ms", "0"] if mode == "slow-no-lag-bound" else []
        # --fsync never: the disk would otherwise set the pace, not the slave.
        mp, mport = start_dkvs(SERVER, f"{tmp}/ss-{mode}-m", ["--fsync", "never", *extra])
        slaves = [start_dkvs(SERVER, f"{tmp}/ss-{mode}-s{i}",
                             ["--fsync", "never", "-m", "127.0.0.1", "-q", str(mport)])[0]
                  for i in range(2)]
        wait_stats(mport, lambda st: "slaves_in_sync 2" in st)
        pauser = None
        if mode != "healthy":
            pid = slaves[1].pid
            # Bounded: stops by itself after 120 cycles (36 s), and is killed after the run.
            pauser = spawn(["bash", "-c", f"for i in $(seq 120); do kill -STOP {pid}; "
                            f"sleep 0.25; kill -CONT {pid}; sleep 0.05; done; kill -CONT {pid}"])
            # Writes make it lag; with the bound on, measure once it was evicted.
            load(mport, "dkvs", ["--connections", "50", "--get-ratio", "0"], 2, preload=False)
            if mode == "slow":
                wait_stats(mport, lambda st: "lag_evictions 0" not in st, limit=10)
        # Writes only: no preload (it would run while the slave is slow, too).
        results[mode] = load(mport, "dkvs", ["--connections", "50", "--get-ratio", "0"],
                             args.duration, preload=False)
        st = wait_stats(mport, lambda st: True)
        evictions = next((l.split()[1] for l in st.splitlines()
                          if l.startswith("lag_evictions ")), "?")
        results[mode]["lag_evictions"] = evictions
        results[mode]["states"] = " ".join(l.split()[2].split("=")[1] for l in st.splitlines()
                                           if l.startswith("slave") and "state=" in l)
        if pauser:
            kill(pauser)
            os.kill(slaves[1].pid, signal.SIGCONT)
        for p in [mp, *slaves]:
            kill(p)
    base = results["healthy"]
    rows = []
    for mode in ["healthy", "slow", "slow-no-lag-bound"]:
        r = results[mode]
        rows.append([mode, f"{r['ops_per_sec']:.0f}", ratio(r["ops_per_sec"], base["ops_per_sec"]),
                     f"{r['p99_us']:.0f}", r["lag_evictions"], r["states"]])
    table("One slow slave (STOP 250 ms / CONT 50 ms): SET, 50 conns, master + 2 slaves, "
          "--fsync never (client: dkvs-load)", rows,
          ["run", "ops/s", "vs healthy", "p99 µs", "lag evictions", "slave states at the end"])


WORKLOADS = {
    "fsync-set-50": fsync_set_50,
    "get-under-set": get_under_set,
    "never-vs-nolog": never_vs_nolog,
    "repl-durable-1": repl_durable_1,
    "restart-1m": restart_1m,
    "failover-cost": failover_cost,
    "slow-slave": slow_slave,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--baseline", help="dkvs-server binary without the write-ahead log")
    ap.add_argument("--etcd-puts", type=int, default=2000)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not found: apt-get install redis-server")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="bench-durable-")
    try:
        for name in args.only.split(","):
            note(f"running {name}")
            WORKLOADS[name](tmp, args)
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
