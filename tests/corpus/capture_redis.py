#!/usr/bin/env python3
"""Writes the Redis seed corpus (tests/corpus/redis-xread/, redis-xinfo/).

Entries a producer can write are captured from a real redis-server (XADD,
then the raw bytes of the XREAD / XINFO STREAM reply, in RESP2 and, after
HELLO 3, RESP3); shapes Redis never sends (wrong types, bad ids, nil
entries) are written by hand. Run from the repository root with
redis-server on PATH:  python3 tests/corpus/capture_redis.py
File names start with the class the replay in tests/fuzz_redis.rs expects.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)))
XREAD = os.path.join(ROOT, "redis-xread")
XINFO = os.path.join(ROOT, "redis-xinfo")
PARTITIONS = 16


def part(topic: bytes) -> int:
    return zlib.crc32(topic) % PARTITIONS


def key(p: int, prefix: str = "ringcast") -> bytes:
    return f"{prefix}:stream:{{{p}}}".encode()


def command(*args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class Redis:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))

    def raw(self, *args) -> bytes:
        """Sends one command; returns its reply's bytes exactly (the reply
        ends when the socket goes quiet: fine for these small replies)."""
        self.s.sendall(command(*args))
        self.s.settimeout(1.0)
        data = b""
        while True:
            try:
                chunk = self.s.recv(65536)
                self.s.settimeout(0.05)
            except socket.timeout:
                if data:
                    return data
                continue
            if not chunk:
                return data
            data += chunk


def write(directory, name, data: bytes):
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def main():
    for d in (XREAD, XINFO):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    tmp = tempfile.mkdtemp()
    port = 16379 + os.getpid() % 1000
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                r = Redis(port)
                break
            except OSError:
                time.sleep(0.05)
        seq = [0]

        def entry(name, fields, topic=None, p=None, prefix="ringcast", id_=None):
            """XADD one entry, then capture XREAD of just it in RESP2 and RESP3."""
            if p is None:
                p = part(topic if topic is not None else dict(zip(fields[::2], fields[1::2]))[b"topic"])
            k = key(p, prefix)
            seq[0] += 1
            new_id = id_ or f"1732240000000-{seq[0]}"
            before = "0-0" if id_ else f"1732240000000-{seq[0] - 1}"
            r.raw("XADD", k, new_id, *fields)
            for proto in (2, 3):
                r.raw("HELLO", proto)
                reply = r.raw("XREAD", "COUNT", 1, "STREAMS", k, before)
                write(XREAD, f"{name}-resp{proto}.resp", reply)

        entry("ok-news", [b"topic", b"news", b"data", b'{"title":"hi"}'])
        entry("ok-with-event", [b"topic", b"chat:42", b"event", b"created", b"data", b"[1,2]"])
        entry("ok-extra-fields", [b"x", b"y", b"topic", b"t", b"data", b"1", b"z", b"w"])
        entry("ok-unicode-data", [b"topic", b"news", b"data", '"h\u00e9llo \u2713"'.encode()])
        entry("ok-repeated-topic-last-wins", [b"topic", b"a b", b"data", b"1", b"topic", b"news"],
              topic=b"news")
        entry("ok-max-id", [b"topic", b"news", b"data", b"null"], prefix="max",
              id_="18446744073709551615-18446744073709551615")
        entry("missing_topic", [b"data", b"1"], p=3)
        entry("missing_data", [b"topic", b"news"])
        entry("missing_topic-topic-in-another-case", [b"Topic", b"news", b"data", b"1"], p=part(b"news"))
        entry("invalid_topic-space", [b"topic", b"bad topic", b"data", b"1"])
        entry("invalid_topic-non-utf8", [b"topic", b"\xff\xfe", b"data", b"1"])
        entry("invalid_topic-256-bytes", [b"topic", b"t" * 256, b"data", b"1"])
        entry("invalid_topic-empty", [b"topic", b"", b"data", b"1"])
        entry("wrong_partition", [b"topic", b"news", b"data", b"1"], p=(part(b"news") + 1) % PARTITIONS)
        entry("invalid_data-not-json", [b"topic", b"news", b"data", b"{nope"])
        entry("invalid_data-non-utf8", [b"topic", b"news", b"data", b"\"\xff\""])
        entry("invalid_data-nested-1000-deep", [b"topic", b"news", b"data", b"[" * 1000 + b"]" * 1000])
        entry("ok-data-nested-126-deep", [b"topic", b"news", b"data", b"[" * 126 + b"]" * 126])
        entry("invalid_data-nested-127-deep", [b"topic", b"news", b"data", b"[" * 127 + b"]" * 127])
        entry("invalid_data-number-1e400", [b"topic", b"news", b"data", b'{"n":1e400}'])
        entry("invalid_data-trailing-garbage", [b"topic", b"news", b"data", b'{"a":1} x'])
        entry("invalid_data-empty", [b"topic", b"news", b"data", b""])
        entry("invalid_event-empty", [b"topic", b"news", b"data", b"1", b"event", b""])
        entry("invalid_event-65-bytes", [b"topic", b"news", b"data", b"1", b"event", b"e" * 65])
        entry("invalid_event-non-utf8", [b"topic", b"news", b"data", b"1", b"event", b"\xc3"])

        # XINFO STREAM of a stream with entries, and of one trimmed empty.
        for proto in (2, 3):
            r.raw("HELLO", proto)
            write(XINFO, f"ok-stream-resp{proto}.resp", r.raw("XINFO", "STREAM", key(part(b"news"))))
        r.raw("XADD", b"trimmed", "1-1", b"topic", b"t", b"data", b"1")
        r.raw("XTRIM", b"trimmed", "MAXLEN", 0)
        for proto in (2, 3):
            r.raw("HELLO", proto)
            write(XINFO, f"ok-trimmed-empty-resp{proto}.resp", r.raw("XINFO", "STREAM", b"trimmed"))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    # Shapes Redis does not send, written by hand.
    k = key(part(b"news"))
    kb = b"$%d\r\n%s\r\n" % (len(k), k)

    def bulk(b):
        return b"$%d\r\n%s\r\n" % (len(b), b)

    def one(entry_bytes, key_bytes=kb):
        return b"*1\r\n*2\r\n" + key_bytes + b"*1\r\n" + entry_bytes

    good_fields = b"*4\r\n" + bulk(b"topic") + bulk(b"news") + bulk(b"data") + bulk(b"1")
    hand = {
        "empty-timeout-nil.resp": b"*-1\r\n",
        "empty-resp3-null.resp": b"_\r\n",
        "unreadable-integer-reply.resp": b":1\r\n",
        "unreadable-stream-not-a-pair.resp": b"*1\r\n*1\r\n" + kb,
        "unreadable-entries-integer.resp": b"*1\r\n*2\r\n" + kb + b":5\r\n",
        "unreadable-entry-nil.resp": one(b"*-1\r\n"),
        "unreadable-entry-empty-array.resp": one(b"*0\r\n"),
        "unreadable-key-array.resp": one(b"*2\r\n" + bulk(b"1-1") + good_fields, b"*0\r\n"),
        "malformed-fields-nil-deleted-entry.resp": one(b"*2\r\n" + bulk(b"1-1") + b"*-1\r\n"),
        "malformed-fields-missing.resp": one(b"*1\r\n" + bulk(b"1-1")),
        "malformed-fields-integer.resp": one(b"*2\r\n" + bulk(b"1-1") + b":5\r\n"),
        "malformed-id-overflow.resp": one(b"*2\r\n" + bulk(b"18446744073709551616-0") + good_fields),
        "malformed-id-no-dash.resp": one(b"*2\r\n" + bulk(b"12345") + good_fields),
        "malformed-id-negative.resp": one(b"*2\r\n" + bulk(b"-1-0") + good_fields),
        "malformed-id-plus-sign.resp": one(b"*2\r\n" + bulk(b"+1-0") + good_fields),
        "malformed-id-non-utf8.resp": one(b"*2\r\n" + bulk(b"\xff-1") + good_fields),
        "malformed-id-array.resp": one(b"*2\r\n*0\r\n" + good_fields),
        "malformed-id-integer.resp": one(b"*2\r\n:17\r\n" + good_fields),
        "ok-simple-strings.resp": one(b"*2\r\n+1-1\r\n*4\r\n+topic\r\n+news\r\n+data\r\n+1\r\n"),
        "ok-resp3-map-fields.resp": one(b"*2\r\n" + bulk(b"1-1") + b"%2\r\n" + bulk(b"topic") + bulk(b"news")
                                       + bulk(b"data") + bulk(b"1")),
        "ok-resp3-map-reply.resp": b"%1\r\n" + kb + b"*1\r\n*2\r\n" + bulk(b"1-1") + good_fields,
        "missing_data-odd-field-count.resp": one(b"*2\r\n" + bulk(b"1-1") + b"*3\r\n" + bulk(b"topic")
                                                 + bulk(b"news") + bulk(b"data")),
        "invalid_topic-array-value.resp": one(b"*2\r\n" + bulk(b"1-1") + b"*4\r\n" + bulk(b"topic")
                                              + b"*1\r\n" + bulk(b"news") + bulk(b"data") + bulk(b"1")),
        "invalid_data-double-value.resp": one(b"*2\r\n" + bulk(b"1-1") + b"*4\r\n" + bulk(b"topic")
                                              + bulk(b"news") + bulk(b"data") + b",1.5\r\n"),
        "invalid_event-nil-value.resp": one(b"*2\r\n" + bulk(b"1-1") + b"*6\r\n" + bulk(b"topic")
                                            + bulk(b"news") + bulk(b"data") + bulk(b"1") + bulk(b"event")
                                            + b"$-1\r\n"),
    }
    for name, data in hand.items():
        write(XREAD, name, data)
    write(XINFO, "unreadable-integer.resp", b":1\r\n")
    write(XINFO, "unreadable-length-not-a-number.resp", b"*2\r\n" + bulk(b"length") + bulk(b"many"))
    write(XINFO, "ok-first-entry-garbage.resp", b"*4\r\n" + bulk(b"length") + b":1\r\n"
          + bulk(b"first-entry") + b":7\r\n")
    write(XINFO, "ok-empty.resp", b"*0\r\n")


if __name__ == "__main__":
    main()
