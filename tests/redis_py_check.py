"""Drive dkvs with the Python `redis` package; run by tests/resp.rs.

Usage:
  redis_py_check.py commands PORT PROTOCOL      every command, errors, binary values, a 10,000-command pipeline
  redis_py_check.py replicated MASTER SLAVE...  a write at the master is read at every slave
  redis_py_check.py auth PORT PROTOCOL PASSWORD  a server with --requirepass-file: AUTH, NOAUTH, WRONGPASS

PROTOCOL is 3 (redis-py's default: HELLO 3) or 2. Exits non-zero with a message on the first failure.
"""

import sys
import time

import redis


def expect(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def expect_error(what, fn, text, cls=redis.ResponseError):
    try:
        fn()
    except cls as e:
        if text not in str(e):
            raise AssertionError(f"{what}: error {e!r} does not contain {text!r}")
        return
    raise AssertionError(f"{what}: no error")


def client(port, protocol):
    if protocol == 3:
        # The default configuration: redis-py 8 opens with HELLO 3.
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    return redis.Redis(host="127.0.0.1", port=port, protocol=protocol, socket_timeout=30)


def commands(port, protocol):
    r = client(port, protocol)
    expect("ping", r.ping(), True)
    expect("echo", r.echo("hi"), b"hi")
    expect("flushdb", r.flushdb(), True)
    expect("set", r.set("k", "v"), True)
    expect("get", r.get("k"), b"v")
    expect("get missing", r.get("missing"), None)
    binary = bytes(range(256)) * 4 + b"\r\n$3\r\n*1\r\n"
    expect("set binary", r.set(b"bin\x00\r\nkey", binary), True)
    expect("get binary", r.get(b"bin\x00\r\nkey"), binary)
    huge = bytes(range(256)) * 4096  # exactly the default --max-value-size, 1 MiB
    expect("set 1 MiB", r.set("huge", huge), True)
    expect("get 1 MiB", r.get("huge"), huge)
    # Over the limit: refused from the bulk header, before the bytes, and the server closes,
    # so the client sees the error or, still writing the value, a broken pipe.
    try:
        r.set("huge", huge + b"x")
        raise AssertionError("set over the limit: no error")
    except redis.ResponseError as e:
        expect("over the limit", "Protocol error: invalid bulk length" in str(e), True)
    except redis.ConnectionError:
        pass
    r = client(port, protocol)
    pipe = r.pipeline(transaction=False)
    for i in range(20):
        pipe.set(f"huge{i}", huge)
    expect("pipelined 1 MiB values", pipe.execute(), [True] * 20)
    expect("read back", r.get("huge19"), huge)
    expect("del", r.delete(*[f"huge{i}" for i in range(20)], "huge"), 21)
    expect("set nx existing", r.set("k", "w", nx=True), None)
    expect("set nx new", r.set("k2", "w", nx=True), True)
    expect("set xx missing", r.set("k3", "w", xx=True), None)
    expect("set xx existing", r.set("k2", "x", xx=True), True)
    expect("set get", r.set("k2", "y", get=True), b"x")
    expect("set nx get", r.set("k2", "z", nx=True, get=True), b"y")
    expect("set ex", r.set("k", "v", ex=100), True)
    expect("ttl", r.ttl("k"), 100)
    expect("set px keeps nothing else", r.set("k", "v", px=200000), True)
    expect("set keepttl", r.set("k", "v", keepttl=True), True)
    expect("ttl kept", r.ttl("k"), 200)
    expect("persist", r.persist("k"), True)
    expect("ttl none", r.ttl("k"), -1)
    expect("getdel missing", r.getdel("nope"), None)
    # MULTI/EXEC through redis-py's transaction pipeline, and WATCH.
    with r.pipeline(transaction=True) as tx:
        tx.set("tx1", "a")
        tx.incr("tx2")
        tx.get("tx1")
        expect("multi/exec", tx.execute(), [True, 1, b"a"])
    with r.pipeline() as tx:
        tx.watch("tx1")
        r.set("tx1", "changed")
        tx.multi()
        tx.set("tx1", "b")
        try:
            tx.execute()
            raise AssertionError("exec after a watched key changed: no WatchError")
        except redis.WatchError:
            pass
    expect("watched key kept", r.get("tx1"), b"changed")
    expect("tx cleanup", r.delete("tx1", "tx2"), 2)
    expect("getset", r.getset("k", "v2"), b"v")
    expect("getset new", r.getset("gs", "1"), None)
    expect("setnx", r.setnx("k", "x"), False)
    expect("setnx new", r.setnx("nx1", "x"), True)
    expect("mset", r.mset({"m1": "1", "m2": "2", "m3": "3"}), True)
    expect("mget", r.mget("m1", "nope", "m3"), [b"1", None, b"3"])
    expect("msetnx clash", r.msetnx({"m1": "x", "m9": "y"}), False)
    expect("msetnx untouched", r.get("m9"), None)
    expect("msetnx", r.msetnx({"n1": "x", "n2": "y"}), True)
    expect("exists", r.exists("m1", "m1", "nope", "m2"), 3)
    expect("del", r.delete("m1", "m2", "nope"), 2)
    expect("exists after del", r.exists("m1", "m2"), 0)
    expect("incr new", r.incr("c"), 1)
    expect("incrby", r.incrby("c", 41), 42)
    expect("decr", r.decr("c"), 41)
    expect("decrby", r.decrby("c", 51), -10)
    expect("get counter", r.get("c"), b"-10")
    expect_error("incr text", lambda: r.incr("k"), "value is not an integer or out of range")
    r.set("big", str(2**63 - 1))
    expect_error("incr overflow", lambda: r.incr("big"), "increment or decrement would overflow")
    expect("append new", r.append("a", "hello"), 5)
    expect("append", r.append("a", " world"), 11)
    expect("strlen", r.strlen("a"), 11)
    expect("strlen missing", r.strlen("nope"), 0)
    expect("type", r.type("a"), b"string")
    expect("type missing", r.type("nope"), b"none")
    expect("keys", sorted(r.keys("n*")), [b"n1", b"n2", b"nx1"])
    size = r.dbsize()
    seen = set()
    cursor = 0
    for _ in range(10000):
        cursor, keys = r.scan(cursor, count=3)
        seen.update(keys)
        if cursor == 0:
            break
    expect("scan covers every key", len(seen), size)
    expect("scan match", sorted(r.scan_iter(match="m*")), [b"m3"])
    expect("dkvs.version", r.execute_command("DKVS.VERSION", "k") > 0, True)
    expect("dkvs.version missing", r.execute_command("DKVS.VERSION", "nope"), None)
    info = r.info()
    expect("info role", info["role"], "master")
    expect("info keys", info["db0"]["keys"], size)
    expect("info used_memory", info["used_memory"] > 0, True)
    expect("info replication", r.info("replication")["connected_slaves"], 0)
    expect("config get", r.config_get("save"), {"save": ""})
    expect("config get appendonly", r.config_get("appendonly"), {"appendonly": "yes"})
    expect("client setname", r.client_setname("tester"), True)
    expect("client getname", r.client_getname() in ("tester", b"tester"), True)
    expect("client id", r.client_id() > 0, True)
    expect("select 0", r.select(0), True)
    expect_error("select 1", lambda: r.select(1), "DB index is out of range")
    expect_error("auth", lambda: r.auth("pw"), "without any password configured",
                 (redis.ResponseError, redis.exceptions.AuthenticationError))
    expect("wait", r.wait(0, 0), 0)
    hello = r.execute_command("HELLO", protocol)
    if protocol == 2:
        hello = dict(zip(hello[::2], hello[1::2]))
    expect("hello proto", hello[b"proto"], protocol)
    expect("hello role", hello[b"role"], b"master")
    expect("command count", r.command_count() > 20, True)
    expect_error("unknown", lambda: r.execute_command("NOSUCH", "a", "b"),
                 "unknown command 'NOSUCH', with args beginning with: 'a' 'b'")
    expect("still open after an unknown command", r.ping(), True)
    expect_error("arity", lambda: r.execute_command("GET"),
                 "wrong number of arguments for 'get' command")
    # A pipeline of 10,000 commands, answered in order.
    pipe = r.pipeline(transaction=False)
    for i in range(5000):
        pipe.set(f"p{i}", i)
        pipe.get(f"p{i}")
    replies = pipe.execute()
    expect("pipeline length", len(replies), 10000)
    for i in range(5000):
        expect(f"pipeline set {i}", replies[2 * i], True)
        expect(f"pipeline get {i}", replies[2 * i + 1], str(i).encode())
    pipe = r.pipeline(transaction=False)
    for _ in range(10000):
        pipe.incr("pc")
    expect("pipelined incr", pipe.execute()[-1], 10000)
    expect("flushall", r.flushall(), True)
    expect("dbsize after flush", r.dbsize(), 0)


def replicated(master_port, slave_ports):
    for protocol in (3, 2):
        m = client(master_port, protocol)
        slaves = [client(p, protocol) for p in slave_ports]
        value = f"written at the master over RESP{protocol}".encode()
        expect("set at master", m.set(f"repl{protocol}", value), True)
        expect("mset at master", m.mset({f"a{protocol}": "1", f"b{protocol}": "2"}), True)
        expect("incr at master", m.incr(f"n{protocol}"), 1)
        for port, s in zip(slave_ports, slaves):
            deadline = time.time() + 30
            while s.get(f"repl{protocol}") != value or s.get(f"n{protocol}") != b"1":
                if time.time() > deadline:
                    raise AssertionError(f"slave {port} never showed the write")
                time.sleep(0.01)
            expect("mset at slave", s.mget(f"a{protocol}", f"b{protocol}"), [b"1", b"2"])
            expect_error("write at slave", lambda: s.set("x", "y"),
                         "You can't write against a read only replica.", redis.ReadOnlyError)
            info = s.info("replication")
            expect("slave role", info["role"], "slave")
            expect("slave link", info["master_link_status"], "up")
        expect("wait", m.wait(2, 0), 2)
        info = m.info("replication")
        expect("connected_slaves", info["connected_slaves"], 2)
        expect("slave0 state", info["slave0"]["state"], "online")
    expect("flushdb at master", m.flushdb(), True)
    for port, s in zip(slave_ports, slaves):
        deadline = time.time() + 30
        while s.dbsize() != 0:
            if time.time() > deadline:
                raise AssertionError(f"slave {port} never saw FLUSHDB")
            time.sleep(0.01)


def auth(port, protocol, password):
    # redis-py sends AUTH (RESP2) or HELLO 3 AUTH default PASSWORD (RESP3) first.
    r = redis.Redis(host="127.0.0.1", port=port, protocol=protocol, password=password, socket_timeout=30)
    expect("ping", r.ping(), True)
    expect("set", r.set("auth:k", b"v"), True)
    expect("get", r.get("auth:k"), b"v")
    r = redis.Redis(host="127.0.0.1", port=port, protocol=protocol, username="default",
                    password=password, socket_timeout=30)
    expect("get as default", r.get("auth:k"), b"v")
    wrong = redis.Redis(host="127.0.0.1", port=port, protocol=protocol, password=password + "x",
                        socket_timeout=30)
    expect_error("wrong password", wrong.ping, "invalid username-password pair",
                 redis.AuthenticationError)
    if protocol == 2:
        # Without a password, commands get NOAUTH (RESP3's HELLO 3 itself is refused).
        anonymous = redis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=30)
        expect_error("no password", lambda: anonymous.get("auth:k"), "Authentication required",
                     redis.AuthenticationError)
    else:
        anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        expect_error("no password, HELLO 3", anonymous.ping,
                     "HELLO must be called with the client already authenticated",
                     redis.AuthenticationError)


def main():
    mode = sys.argv[1]
    if mode == "commands":
        commands(int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "auth":
        auth(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif mode == "replicated":
        replicated(int(sys.argv[2]), [int(p) for p in sys.argv[3:]])
    else:
        sys.exit(f"unknown mode {mode}")
    print("ok")


if __name__ == "__main__":
    main()
