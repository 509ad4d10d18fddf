#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets (fuzz/corpus/TARGET/*): a few
valid encodings each, so the fuzzer starts from inputs that reach deep into
the decoders. Layouts: docs/PROTOCOL.md, src/wal/record.rs, src/wal/snapshot.rs;
the wal_record and snapshot inputs are recipes (see those targets' docs)."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def frame(opcode, key=b"", value=b"", status=0, request_id=1, version=0):
    return (
        struct.pack(">BBBBIQHHI", 0xDB, 1, opcode, status, request_id, version, len(key), 0, len(value))
        + key
        + value
    )


def ops(items):
    out = struct.pack(">I", len(items))
    for kind, key, value in items:
        out += struct.pack(">BHI", kind, len(key), len(value)) + key + value
    return out


def pstr(s):
    return struct.pack(">H", len(s)) + s


def txn(conditions, writes):
    """A TXN payload (docs/PROTOCOL.md 4.3): (kind, version, key) conditions,
    (kind, key, value) writes; kinds 4 and 5 carry their deadline in the value."""
    out = struct.pack(">H", len(conditions))
    for kind, version, key in conditions:
        out += struct.pack(">BQH", kind, version, len(key)) + key
    out += struct.pack(">H", len(writes))
    for kind, key, value in writes:
        out += struct.pack(">BHI", kind, len(key), len(value)) + key + value
    return out


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    write("frame", "get", frame(0x01, b"key"))
    write("frame", "put", frame(0x02, b"key", b"value", request_id=7))
    write("frame", "ping_stats", frame(0x05) + frame(0x06, request_id=2))
    write("frame", "response_ok", frame(0x81, value=b"value", version=42))
    write("txn", "example", txn([(1, 5, b"a")], [(1, b"a", b"1"), (2, b"b", b"")]))
    write("txn", "every_kind", txn(
        [(1, 7, b"a"), (2, 0, b"bb"), (3, 0, b"c")],
        [(1, b"a", b"x"), (2, b"c", b""), (3, b"a", b"y"),
         (4, b"d", struct.pack(">Q", 1700000000000) + b"v"),
         (5, b"d", struct.pack(">Q", 1800000000000)), (5, b"a", struct.pack(">Q", 0))]))
    write("txn", "empty", txn([], []))
    write("frame", "response_error", frame(0x82, value=b"bad key", status=5))

    some_ops = ops([(1, b"k1", b"v1"), (3, b"k2", b""), (4, b"", b"")])
    register = struct.pack(">HQQBQ", 4, 0x0123456789ABCDEF, 9, 1, 3) + pstr(b"127.0.0.1:9100")
    write("peer", "register", frame(0x40, value=register, request_id=0, version=42))
    registered = struct.pack(">QBQQ", 5, 2, 49, 3)
    write("peer", "registered", frame(0x41, value=registered, request_id=0, version=50))
    write("peer", "prepare", frame(0x42, value=some_ops, request_id=0, version=7))
    write("peer", "vote_no", frame(0x43, value=b"\x00" + pstr(b"disk full"), request_id=0, version=7))
    write("peer", "commit_ack", frame(0x44, request_id=0, version=7) + frame(0x46, request_id=0, version=7))
    chunk = b"\x01" + struct.pack(">I", 2)
    chunk += struct.pack(">HIQ", 1, 1, 3) + b"a1" + struct.pack(">HIQ", 1, 0, 9) + b"b"
    write("peer", "snapshot_chunk", frame(0x47, value=chunk, request_id=0, version=9))
    write("peer", "outcome", frame(0x4C, value=b"\x01", request_id=0, version=14))

    def body(kind, seq, payload=b""):
        return bytes([kind]) + struct.pack(">Q", seq) + payload

    def framed(b):
        return bytes([1, len(b)]) + b

    def record(b):
        return struct.pack(">II", len(b), crc32c(b)) + b

    write("wal_record", "record", record(body(1, 7, some_ops)))
    write("wal_record", "segment", b"".join(framed(b) for b in [
        body(1, 7, some_ops), body(2, 8), body(3, 9, some_ops), body(4, 9),
        body(6, 9, struct.pack(">Q", 77)), body(7, 77)]))
    write("wal_record", "segment_damaged", framed(body(5, 1, some_ops)) + b"\x00\x05garbage" + framed(body(4, 2)))

    entries = struct.pack(">HIQ", 2, 1, 3) + b"k1v" + struct.pack(">HIQ", 1, 0, 4) + b"k"
    header = struct.pack(">QQQ", 10, 77, 5)
    write("snapshot", "two_entries", b"\x01" + header + bytes([1, len(entries)]) + entries + b"\x02\x02")
    write("snapshot", "empty", b"\x01" + header + b"\x02\x00")

    write("failover_record", "leader", b"epoch=7 node=00000000000000ab addr=127.0.0.1:9000")
    write("failover_record", "sync", b"epoch=7 leader=0000000000000001 members=0000000000000002,0000000000000003")
    write("failover_record", "sync_empty", b"epoch=1 leader=0000000000000009 members=")

    write("etcd_json", "watch", b'{"result":{"header":{"revision":"3"},"created":true,"events":['
          b'{"kv":{"key":"aw==","mod_revision":"2","version":"1","value":"dg=="}},'
          b'{"type":"DELETE","kv":{"key":"aw==","mod_revision":"3"}}]}}\n'
          b'{"result":{"header":{},"canceled":true,"compact_revision":"4"}}')
    write("etcd_json", "error", b'{"error":{"grpc_code":14,"message":"unavailable"}}')
    write("etcd_json", "range", b'{"header":{"revision":"9","raft_term":"2"},"kvs":[{"key":"aw==",'
          b'"value":"dg==","create_revision":"5","mod_revision":"9","version":"2","lease":"7"}],"count":"1"}')
    write("etcd_json", "txn", b'{"header":{"revision":12},"succeeded":true,"responses":[{"response_put":{}}]}')


if __name__ == "__main__":
    main()
