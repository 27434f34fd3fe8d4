#!/usr/bin/env python3
"""Interop check: a strict, independent WebSocket client against ringcast.

Usage: websockets_client.py ws://HOST:PORT/ws

Uses the Python `websockets` package (asyncio API), which validates every
frame and the closing handshake itself. Two clients subscribe to a fresh
topic, a third publishes 100 messages; both subscribers must get all 100 in
order, with strictly increasing ids and byte-identical frames (docs/PROTOCOL.md
section 3). Then app-level and WebSocket pings are answered and every
client closes with 1000, answered by the server.

Exits 0 on success; otherwise prints what went wrong and exits 1.
Run by tests/interop.rs; tests/run installs `websockets`.
"""

import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

SUBPROTOCOL = "ringcast.v1"
MESSAGES = 100
# Per receive; the whole run is bounded by RUN_TIMEOUT.
RECV_TIMEOUT = 5.0
RUN_TIMEOUT = 25.0


class Failed(Exception):
    """A check did not hold; the message says which and what was seen."""


def check(cond, what):
    if not cond:
        raise Failed(what)


async def recv_json(ws, who):
    """Next text frame as (raw text, parsed JSON)."""
    try:
        raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    except asyncio.TimeoutError:
        raise Failed(f"{who}: no frame within {RECV_TIMEOUT} s") from None
    check(isinstance(raw, str), f"{who}: expected a text frame, got binary {raw!r:.80}")
    try:
        return raw, json.loads(raw)
    except ValueError as e:
        raise Failed(f"{who}: frame is not JSON ({e}): {raw!r:.200}") from None


async def open_client(url, who):
    ws = await connect(
        url,
        subprotocols=[SUBPROTOCOL],
        open_timeout=RECV_TIMEOUT,
        close_timeout=RECV_TIMEOUT,
    )
    check(
        ws.subprotocol == SUBPROTOCOL,
        f"{who}: server chose subprotocol {ws.subprotocol!r}, want {SUBPROTOCOL!r}",
    )
    _, welcome = await recv_json(ws, who)
    check(welcome.get("op") == "welcome", f"{who}: first frame is not welcome: {welcome}")
    check(
        isinstance(welcome.get("conn"), str) and welcome["conn"],
        f"{who}: welcome has no conn: {welcome}",
    )
    check(isinstance(welcome.get("node"), str), f"{who}: welcome has no node: {welcome}")
    hb = welcome.get("heartbeat")
    check(
        isinstance(hb, int) and not isinstance(hb, bool) and hb > 0,
        f"{who}: welcome heartbeat is not a positive integer: {welcome}",
    )
    return ws


async def request(ws, who, frame, want_op):
    """Sends `frame` (which carries an id) and returns the reply to it."""
    await ws.send(json.dumps(frame))
    _, reply = await recv_json(ws, who)
    check(
        reply.get("op") == want_op and reply.get("id") == frame["id"],
        f"{who}: {frame} answered with {reply}, want op {want_op!r} id {frame['id']}",
    )
    return reply


def parse_id(who, value):
    """A message id `MS-SEQ` as a comparable (ms, seq) pair."""
    parts = value.split("-") if isinstance(value, str) else []
    check(
        len(parts) == 2 and all(p.isdigit() for p in parts),
        f"{who}: message id {value!r} is not MS-SEQ",
    )
    return int(parts[0]), int(parts[1])


async def subscribe(ws, who, topic):
    ok = await request(ws, who, {"op": "sub", "id": 1, "topic": topic}, "ok")
    check(ok.get("topic") == topic, f"{who}: sub ok names another topic: {ok}")
    check(isinstance(ok.get("epoch"), str), f"{who}: sub ok has no epoch: {ok}")
    check("recovered" not in ok, f"{who}: recovered sent without since: {ok}")


async def collect(ws, who, topic):
    """Receives the MESSAGES published; returns their raw frames."""
    frames, last = [], None
    for n in range(MESSAGES):
        raw, msg = await recv_json(ws, f"{who} (after {n} messages)")
        check(msg.get("op") == "msg", f"{who}: expected msg #{n}, got {msg}")
        check(msg.get("topic") == topic, f"{who}: msg on wrong topic: {msg}")
        check(msg.get("data") == {"n": n}, f"{who}: msg #{n} out of order or altered: {msg}")
        mid = parse_id(who, msg.get("id"))
        check(last is None or mid > last, f"{who}: id {msg['id']} not after {last}")
        last = mid
        frames.append(raw)
    return frames


async def close_cleanly(ws, who):
    await ws.close(1000)
    check(
        ws.protocol.close_rcvd is not None,
        f"{who}: server did not answer our close frame (code {ws.close_code})",
    )
    check(ws.close_code == 1000, f"{who}: close answered with {ws.close_code}, want 1000")
    check(
        ws.protocol.close_rcvd_then_sent is False,
        f"{who}: close order wrong (server closed first?)",
    )


async def run(url):
    topic = f"interop.py{os.getpid()}"
    a = await open_client(url, "subscriber A")
    b = await open_client(url, "subscriber B")
    p = await open_client(url, "publisher")
    await subscribe(a, "subscriber A", topic)
    await subscribe(b, "subscriber B", topic)

    receivers = [
        asyncio.ensure_future(collect(a, "subscriber A", topic)),
        asyncio.ensure_future(collect(b, "subscriber B", topic)),
    ]
    mids = []
    for n in range(MESSAGES):
        frame = {"op": "pub", "id": 100 + n, "topic": topic, "data": {"n": n}}
        ok = await request(p, "publisher", frame, "ok")
        mids.append(parse_id("publisher", ok.get("mid")))
    check(mids == sorted(set(mids)), f"publisher: mids not strictly increasing: {mids}")
    frames_a, frames_b = await asyncio.gather(*receivers)
    check(frames_a == frames_b, "subscribers got different bytes for the same messages")
    got = [parse_id("subscriber A", json.loads(f)["id"]) for f in frames_a]
    check(got == mids, f"delivered ids {got[:3]}... differ from published mids {mids[:3]}...")

    for who, ws in (("subscriber A", a), ("subscriber B", b), ("publisher", p)):
        await request(ws, who, {"op": "ping", "id": 9}, "pong")
        pong = await ws.ping(b"interop")
        try:
            await asyncio.wait_for(pong, RECV_TIMEOUT)
        except asyncio.TimeoutError:
            raise Failed(f"{who}: no pong frame for a WebSocket ping") from None
        await close_cleanly(ws, who)


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} ws://HOST:PORT/ws", file=sys.stderr)
        return 2
    url = sys.argv[1]
    try:
        asyncio.run(asyncio.wait_for(run(url), RUN_TIMEOUT))
    except Failed as e:
        print(f"FAIL: {e}")
        return 1
    except asyncio.TimeoutError:
        print(f"FAIL: the run took longer than {RUN_TIMEOUT} s")
        return 1
    except (WebSocketException, OSError) as e:
        print(f"FAIL: {type(e).__name__}: {e}")
        return 1
    print(f"ok: 2 subscribers got {MESSAGES} messages in order; pings answered; closed with 1000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
