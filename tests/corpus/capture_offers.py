#!/usr/bin/env python3
"""Captures the upgrade requests real clients send, for tests/corpus/deflate.

Usage: tests/corpus/capture_offers.py   (from the repository root)

Listens on a free loopback port, serves a page that opens a WebSocket back
(for Chromium), records the head of every `GET /ws` and closes the socket
without answering. Each client below connects once: Chromium (headless,
Debian's /usr/bin/chromium), Node `ws` from clients/js/node_modules (run
`npm ci` there first) and Python `websockets`, with their default offer and
with the window and context options set. The files are written as
`ok-<client>.http`; the Host, Origin and key are left as captured.
"""

import os
import socket
import subprocess
import sys
import threading
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deflate")
JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "js")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=3000", "--dump-dom",
]

received = []
got = threading.Condition()


def serve(srv, port):
    while True:
        c, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(65536)
            if not d:
                break
            data += d
        head = data.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        if head.startswith(b"GET /ws"):
            with got:
                received.append(head)
                got.notify_all()
        else:
            page = f"<script>new WebSocket('ws://127.0.0.1:{port}/ws')</script>".encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n" % len(page) + page)
        c.close()


def node(port, options):
    script = (f"const W = require('ws'); const ws = new W('ws://127.0.0.1:{port}/ws', "
              f"{{ perMessageDeflate: {options} }}); ws.on('error', () => process.exit(0));")
    subprocess.run(["node", "-e", script], cwd=JS, timeout=10, check=True)


def python(port, factory):
    script = (
        "import asyncio\n"
        "from websockets.asyncio.client import connect\n"
        "from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory as F\n"
        "async def main():\n"
        "    try:\n"
        f"        await connect('ws://127.0.0.1:{port}/ws', open_timeout=2{factory})\n"
        "    except Exception:\n"
        "        pass\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], timeout=10, check=True)


def main():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    threading.Thread(target=serve, args=(srv, port), daemon=True).start()
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    clients = [
        ("chromium", lambda: subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"http://127.0.0.1:{port}/"],
            timeout=30, capture_output=True)),
        ("node-ws-default", lambda: node(port, "true")),
        ("node-ws-server-window-15", lambda: node(port, "{ serverMaxWindowBits: 15 }")),
        ("node-ws-all-options", lambda: node(
            port, "{ serverNoContextTakeover: true, clientNoContextTakeover: true, "
                  "serverMaxWindowBits: 10, clientMaxWindowBits: 11 }")),
        ("python-websockets-default", lambda: python(port, "")),
        ("python-websockets-server-window-15", lambda: python(
            port, ", compression=None, extensions=[F(server_max_window_bits=15)]")),
        ("python-websockets-all-options", lambda: python(
            port, ", compression=None, extensions=[F(server_no_context_takeover=True, "
                  "client_no_context_takeover=True, server_max_window_bits=10, "
                  "client_max_window_bits=12)]")),
    ]
    for name, run in clients:
        with got:
            before = len(received)
        run()
        deadline = time.monotonic() + 10
        with got:
            while len(received) == before and time.monotonic() < deadline:
                got.wait(0.1)
            if len(received) == before:
                sys.exit(f"{name}: no request captured")
            head = received[before]
        with open(os.path.join(OUT, f"ok-{name}.http"), "wb") as f:
            f.write(head)
        lines = head.count(b"\n") - 2
        print(f"ok-{name}.http: {lines} header lines")


if __name__ == "__main__":
    main()
