#!/usr/bin/env python3
"""Writes the compressed-message seeds of tests/corpus/deflate/: one
message payload per `.bin` file, as a client puts it in a frame with RSV1
(RFC 7692 section 7.2.1: the sync flush's `00 00 ff ff` removed), replayed
by tests/fuzz_deflate.rs through `Inflater::inflate` with a 64 KiB limit.
File names start with the expected class: `ok`, `1009` (inflates past the
limit), `1007` (not DEFLATE). The streams come from Python's zlib (an
implementation independent of the server's zlib-rs), from RFC 7692's
examples, or are written bit by bit here for the errors zlib never makes;
each class is checked against zlib before the file is written.

Also writes the `.http` requests written after what browsers send
(`*-style`); `capture_offers.py` captures the others from real clients.
Run: python3 tests/corpus/make_deflate.py
"""
import os
import zlib

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deflate")
LIMIT = 64 << 10  # tests/fuzz_deflate.rs MAX
TAIL = b"\x00\x00\xff\xff"

JSON = (
    b'{"op":"pub","id":7,"topic":"news.eu","data":{"title":"a notification",'
    b'"body":"' + b"that repeats itself, " * 40 + b'"}}'
)


def message(data, level=6, wbits=-15, strategy=zlib.Z_DEFAULT_STRATEGY, pieces=1):
    """One message compressed as a permessage-deflate sender does: raw
    deflate, sync flush (after each of `pieces` parts), tail removed."""
    c = zlib.compressobj(level, zlib.DEFLATED, wbits, 8, strategy)
    out = b""
    step = max(1, -(-len(data) // pieces))
    for i in range(0, max(len(data), 1), step):
        out += c.compress(data[i : i + step]) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


class Bits:
    """An LSB-first bit writer (RFC 1951 section 3.1.1)."""

    def __init__(self):
        self.bits = []

    def put(self, value, n):
        """`n` bits of `value`, least significant first (header fields, extra bits)."""
        self.bits += [(value >> i) & 1 for i in range(n)]
        return self

    def code(self, code, n):
        """A Huffman code of `n` bits, most significant first."""
        self.bits += [(code >> (n - 1 - i)) & 1 for i in range(n)]
        return self

    def bytes(self):
        padded = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(
            sum(b << i for i, b in enumerate(padded[k : k + 8])) for k in range(0, len(padded), 8)
        )


def fixed_symbol(bits, sym):
    """A literal/length symbol in the fixed code (RFC 1951 section 3.2.6)."""
    if sym < 144:
        return bits.code(0x30 + sym, 8)
    if sym < 256:
        return bits.code(0x190 + sym - 144, 9)
    if sym < 280:
        return bits.code(sym - 256, 7)
    return bits.code(0xC0 + sym - 280, 8)


def fixed_block(build):
    """A non-final fixed-Huffman block whose symbols `build` writes."""
    bits = Bits().put(0, 1).put(1, 2)
    build(bits)
    return bits.bytes()


def zlib_class(payload):
    """What zlib makes of a payload: the class and the output it gives."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(payload + TAIL, LIMIT + 1)
    except zlib.error:
        return "1007", None
    return ("1009" if len(out) > LIMIT else "ok"), out


def seeds():
    text = b"".join(b"line %d of a long message\n" % i for i in range(3000))
    yield "ok-rfc7692-hello", bytes.fromhex("f248cdc9c90700"), b"Hello"
    yield "ok-rfc7692-hello-stored", bytes.fromhex("000500faff48656c6c6f00"), b"Hello"
    yield "ok-rfc7692-hello-two-blocks", bytes.fromhex("f248050000" "00ffffcac9c90700"), b"Hello"
    yield "ok-rfc7692-hello-bfinal", bytes.fromhex("f348cdc9c9070000"), b"Hello"
    yield "ok-rfc7692-empty", b"\x00", b""
    yield "ok-no-bytes", b"", b""
    for level in (1, 6, 9):
        yield f"ok-zlib-level-{level}", message(JSON, level), JSON
    yield "ok-zlib-stored", message(JSON, 0), JSON
    yield "ok-zlib-fixed-huffman", message(JSON, strategy=zlib.Z_FIXED), JSON
    yield "ok-zlib-huffman-only", message(JSON, strategy=zlib.Z_HUFFMAN_ONLY), JSON
    yield "ok-zlib-rle", message(JSON, strategy=zlib.Z_RLE), JSON
    yield "ok-zlib-window-9", message(text[:20000], wbits=-9), text[:20000]
    yield "ok-zlib-flushed-in-5-pieces", message(JSON, pieces=5), JSON
    exact = (text * 2)[:LIMIT]
    yield "ok-exactly-64kib", message(exact, 9), exact
    over = (text * 2)[: LIMIT + 1]
    yield "1009-64kib-and-1-byte", message(over, 9), None
    yield "1009-bomb-4mib-of-spaces", message(b" " * (4 << 20), 9), None
    yield "1009-80k-of-ab-at-level-1", message(b"ab" * 40000, 1), None
    yield "1007-reserved-block-type", b"\x06\x00", None
    yield "1007-stored-length-not-complemented", bytes.fromhex("0005000000") + b"Hello", None
    yield "1007-distance-before-the-start", fixed_block(
        lambda b: fixed_symbol(b, 257).code(0, 5)
    ), None
    yield "1007-distance-past-the-output", fixed_block(
        lambda b: fixed_symbol(fixed_symbol(b, ord("a")), 257).code(1, 5)
    ), None
    yield "1007-fixed-length-code-286", fixed_block(lambda b: fixed_symbol(b, 286)), None
    yield "1007-fixed-distance-code-30", fixed_block(
        lambda b: fixed_symbol(fixed_symbol(b, ord("a")), 257).code(30, 5)
    ), None
    # Dynamic blocks (RFC 1951 section 3.2.7): BFINAL 0, BTYPE 2, then
    # HLIT, HDIST, HCLEN and the code length code's lengths, in the order
    # 16, 17, 18, 0, 8, ...
    yield "1007-dynamic-287-length-codes", Bits().put(0, 1).put(2, 2).put(30, 5).put(
        0, 5
    ).put(0, 4).bytes() + b"\x00" * 4, None
    over_subscribed = Bits().put(0, 1).put(2, 2).put(0, 5).put(0, 5).put(0, 4)
    for _ in range(4):
        over_subscribed.put(1, 3)
    yield "1007-dynamic-code-lengths-over-subscribed", over_subscribed.bytes(), None
    # Symbols 18 and 0 of one bit each (18 is code 1): 258 zero lengths,
    # so no end-of-block code.
    no_eob = Bits().put(0, 1).put(2, 2).put(0, 5).put(0, 5).put(0, 4)
    no_eob.put(0, 3).put(0, 3).put(1, 3).put(1, 3)
    no_eob.code(1, 1).put(138 - 11, 7).code(1, 1).put(120 - 11, 7)
    yield "1007-dynamic-no-end-of-block-code", no_eob.bytes(), None
    # Symbols 16 and 0 of one bit each (16 is code 1): a repeat first.
    repeat = Bits().put(0, 1).put(2, 2).put(0, 5).put(0, 5).put(0, 4)
    repeat.put(1, 3).put(0, 3).put(0, 3).put(1, 3)
    repeat.code(1, 1).put(0, 2)
    yield "1007-dynamic-repeat-with-nothing-to-repeat", repeat.bytes(), None
    # A code length code with no codes at all: zlib reads every length as
    # 0 (one bit each), then finds no end-of-block code.
    all_zero = Bits().put(0, 1).put(2, 2).put(0, 5).put(0, 5).put(0, 4).put(0, 12)
    yield "1007-dynamic-code-length-code-empty", all_zero.bytes() + b"\x00" * 33, None
    yield "1007-after-a-valid-block", message(b"hello, ") + TAIL + b"\x06", None
    # The second message of a sender that keeps its context (ignores
    # client_no_context_takeover): it points into the first message.
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = b"the same notification, twice"
    c.compress(first)
    c.flush(zlib.Z_SYNC_FLUSH)
    second = c.compress(first) + c.flush(zlib.Z_SYNC_FLUSH)
    yield "1007-context-taken-over-from-the-last-message", second[:-4], None


BROWSER_STYLE = {
    "ok-firefox-style": (
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        ["permessage-deflate"],
    ),
    "ok-safari-15.4-macos-style": (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/15.4 Safari/605.1.15",
        ["permessage-deflate"],
    ),
    "ok-safari-17.4-macos-style": (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Safari/605.1.15",
        ["permessage-deflate"],
    ),
    "ok-safari-17.4-ios-style": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        ["permessage-deflate"],
    ),
    "ok-bad-offer-then-a-good-one": (
        None,
        ["permessage-deflate; server_max_window_bits=16, permessage-deflate; client_max_window_bits"],
    ),
    "ok-other-extension-then-offer-on-a-second-line": (
        None,
        ["x-webkit-deflate-frame", "permessage-deflate; server_max_window_bits=12"],
    ),
    "declined-window-without-value": (None, ["permessage-deflate; server_max_window_bits"]),
    "declined-unknown-parameter": (None, ["permessage-deflate; mystery=1"]),
    "declined-open-quote-takes-the-line": (
        None,
        ['permessage-deflate; server_max_window_bits="10, permessage-deflate'],
    ),
    "plain-no-offer": (None, []),
    "plain-other-extension-only": (None, ["x-webkit-deflate-frame"]),
}
for minor in range(4):
    BROWSER_STYLE[f"declined-safari-15.{minor}-macos-style"] = (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        f"(KHTML, like Gecko) Version/15.{minor} Safari/605.1.15",
        ["permessage-deflate"],
    )
BROWSER_STYLE["declined-safari-15.2-ios-style"] = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 15_2 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/15.2 Mobile/15E148 Safari/604.1",
    ["permessage-deflate"],
)


def request(user_agent, extensions):
    lines = [
        "GET /ws HTTP/1.1",
        "Host: 127.0.0.1:8080",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    if user_agent:
        lines.append(f"User-Agent: {user_agent}")
    lines += [f"Sec-WebSocket-Extensions: {e}" for e in extensions]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def main():
    os.makedirs(DIR, exist_ok=True)
    for name, payload, want in seeds():
        cls, out = zlib_class(payload)
        assert name.startswith(cls + "-"), f"{name}: zlib says {cls}"
        assert want is None or out == want, f"{name}: zlib inflates {out[:40]!r}"
        with open(os.path.join(DIR, name + ".bin"), "wb") as f:
            f.write(payload)
    for name, (user_agent, extensions) in BROWSER_STYLE.items():
        with open(os.path.join(DIR, name + ".http"), "wb") as f:
            f.write(request(user_agent, extensions))


if __name__ == "__main__":
    main()
