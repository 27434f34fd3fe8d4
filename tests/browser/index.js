// The browser-test harness: starts the real `ringcast` binary and a real
// `redis-server` on free loopback ports, serves pages from a local static
// server, drives Debian's Chromium with playwright-core, and collects the
// pages' logs and screenshots. README.md beside this file shows how to use it.
//
// Invariants:
// - no fixed ports: every process binds 127.0.0.1 port 0 (or a port it was
//   handed back), and a Redis is ready only when the server answering on
//   its port says it is our child (INFO server process_id);
// - every process it starts is stopped by `close()`, by its pid, and also
//   when the test process exits or is told to stop (SIGTERM/SIGINT);
// - never downloads a browser: Chromium is /usr/bin/chromium (or $CHROMIUM).

import { spawn } from "node:child_process";
import { createReadStream, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, closeSync } from "node:fs";
import { createServer } from "node:http";
import { connect as tcpConnect, createServer as tcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, extname, join, resolve, sep } from "node:path";
import { createInterface } from "node:readline";
import { createHmac } from "node:crypto";
import { fileURLToPath } from "node:url";

/** The repository's root directory. */
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** Chromium flags for this machine (../shared/TOOLCHAIN.md); headless is set by playwright. */
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** How long a process gets to start before the harness gives up, ms. */
const START_TIMEOUT = 20_000;

// Every live child of every harness, for the exit-time safety net.
const live = new Set();
let netInstalled = false;
function installSafetyNet() {
  if (netInstalled) return;
  netInstalled = true;
  const killAll = () => {
    for (const child of live) {
      try {
        process.kill(child.pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    live.clear();
  };
  process.on("exit", killAll);
  for (const sig of ["SIGTERM", "SIGINT"]) {
    process.once(sig, () => {
      killAll();
      process.exit(128 + (sig === "SIGTERM" ? 15 : 2));
    });
  }
}

/** A loopback port that was free a moment ago (another process may take it before use). */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const srv = tcpServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
  });
}

/** Polls `cond` until it returns a truthy value (returned) or `timeout` ms pass (throws `what`). */
export async function waitFor(cond, { timeout = 10_000, interval = 25, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await cond();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await sleep(interval);
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** `promise`'s value, or `fallback` after `ms` (the timer does not outlive it). */
export async function within(promise, ms, fallback = "timed out") {
  let timer;
  const t = new Promise((r) => (timer = setTimeout(() => r(fallback), ms)));
  try {
    return await Promise.race([promise, t]);
  } finally {
    clearTimeout(timer);
  }
}

/** An HS256 JWT as ringcast verifies it (docs/PROTOCOL.md §5); `ttl` in seconds. */
export function mintToken({ secret, sub, subs = ["#"], pubs = [], ttl = 3600, exp, ...extra }) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const claims = { sub, exp: exp ?? Math.floor(Date.now() / 1000) + ttl, subs, pubs, ...extra };
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

// ---- Redis ------------------------------------------------------------------

/** A minimal RESP client: enough for INFO, XADD, XRANGE and friends. */
export class RedisClient {
  static connect(port, host = "127.0.0.1") {
    return new Promise((res, rej) => {
      const sock = tcpConnect(port, host, () => res(new RedisClient(sock)));
      sock.once("error", rej);
    });
  }
  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.waiting = [];
    sock.on("data", (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this._drain();
    });
    sock.on("error", (e) => this._failAll(e));
    sock.on("close", () => this._failAll(new Error("redis connection closed")));
  }
  /** Sends one command; resolves with its reply (an Error reply rejects). */
  command(...args) {
    const parts = args.map((a) => Buffer.from(String(a)));
    const head = `*${parts.length}\r\n`;
    const body = parts.map((p) => Buffer.concat([Buffer.from(`$${p.length}\r\n`), p, Buffer.from("\r\n")]));
    return new Promise((res, rej) => {
      this.waiting.push({ res, rej });
      this.sock.write(Buffer.concat([Buffer.from(head), ...body]));
    });
  }
  close() {
    this.sock.destroy();
  }
  _failAll(e) {
    for (const w of this.waiting.splice(0)) w.rej(e);
  }
  _drain() {
    while (this.waiting.length) {
      const parsed = parseResp(this.buf, 0);
      if (!parsed) return;
      this.buf = this.buf.subarray(parsed.end);
      const w = this.waiting.shift();
      if (parsed.value instanceof Error) w.rej(parsed.value);
      else w.res(parsed.value);
    }
  }
}

// Parses one RESP2 value at `at`; undefined when incomplete.
function parseResp(buf, at) {
  const nl = buf.indexOf("\r\n", at);
  if (nl < 0) return undefined;
  const line = buf.toString("utf8", at + 1, nl);
  const next = nl + 2;
  switch (String.fromCharCode(buf[at])) {
    case "+":
      return { value: line, end: next };
    case "-":
      return { value: new Error(line), end: next };
    case ":":
      return { value: Number(line), end: next };
    case "$": {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      if (buf.length < next + n + 2) return undefined;
      return { value: buf.toString("utf8", next, next + n), end: next + n + 2 };
    }
    case "*": {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      const out = [];
      let pos = next;
      for (let i = 0; i < n; i++) {
        const item = parseResp(buf, pos);
        if (!item) return undefined;
        out.push(item.value);
        pos = item.end;
      }
      return { value: out, end: pos };
    }
    default:
      throw new Error(`unexpected RESP byte ${buf[at]}`);
  }
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

/** CRC-32/ISO-HDLC (zlib's) of a string's UTF-8 bytes. */
export function crc32(text) {
  let c = 0xffffffff;
  for (const b of Buffer.from(text)) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** The partition stream of a topic (docs/PROTOCOL.md §6). */
export function streamKey(topic, { prefix = "ringcast", partitions = 16 } = {}) {
  return `${prefix}:stream:{${crc32(topic) % partitions}}`;
}

// ---- the harness -------------------------------------------------------------

/**
 * One test file's (or one test's) processes, pages and artifacts.
 * `new Harness("name")`, start what you need, and `await h.close()` in an after hook.
 */
export class Harness {
  constructor(name, { artifacts } = {}) {
    installSafetyNet();
    this.name = name;
    this.artifacts = artifacts || join(process.env.RINGCAST_BROWSER_ARTIFACTS || join(REPO, "target", "browser"), name);
    rmSync(this.artifacts, { recursive: true, force: true }); // only this run's
    mkdirSync(this.artifacts, { recursive: true });
    this.tmp = mkdtempSync(join(tmpdir(), `ringcast-browser-${name}-`));
    this._closers = [];
    this._browser = undefined;
    this.pageLogs = new Map(); // page -> lines
  }

  /** Stops everything this harness started, newest first. */
  async close() {
    for (const c of this._closers.splice(0).reverse()) {
      try {
        await c();
      } catch (e) {
        console.error(`harness ${this.name}: cleanup: ${e.message}`);
      }
    }
    rmSync(this.tmp, { recursive: true, force: true });
  }

  _spawn(cmd, args, { env, logName }) {
    const log = join(this.artifacts, `${logName}.log`);
    const fd = openSync(log, "a");
    const child = spawn(cmd, args, { env, stdio: ["ignore", "pipe", fd] });
    closeSync(fd);
    child.logPath = log;
    child.exited = new Promise((res) => child.once("exit", (code, signal) => res({ code, signal })));
    child.on("error", () => {}); // reported by the start timeout / exit
    live.add(child);
    child.exited.then(() => live.delete(child));
    this._closers.push(() => stopChild(child));
    return child;
  }

  /**
   * Starts `redis-server` on a free port, without persistence unless
   * `persistent`. Returns { port, url, pid, client(), kill(signal), stop() }.
   */
  async startRedis({ persistent = false } = {}) {
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      const dir = join(this.tmp, `redis-${port}`);
      mkdirSync(dir, { recursive: true });
      const log = join(this.artifacts, `redis-${port}.log`);
      const args = ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "", "--appendonly", persistent ? "yes" : "no", "--logfile", log];
      let child;
      try {
        child = this._spawn("redis-server", args, { env: process.env, logName: `redis-${port}` });
      } catch (e) {
        throw new Error(`cannot run redis-server (${e.message}): install it (tests/run does: apt-get install redis-server)`);
      }
      child.stdout.resume();
      const ready = await this._redisReady(child, port);
      if (ready === true) {
        return {
          port,
          url: `redis://127.0.0.1:${port}/0`,
          pid: child.pid,
          child,
          client: () => RedisClient.connect(port),
          kill: (signal = "SIGKILL") => child.kill(signal),
          stop: () => stopChild(child),
        };
      }
      if (!(ready.portTaken && attempt < 5)) throw new Error(ready.message);
    }
  }

  async _redisReady(child, port) {
    const deadline = Date.now() + START_TIMEOUT;
    let exited;
    child.exited.then((x) => (exited = x));
    let last = "no answer";
    while (Date.now() < deadline) {
      if (exited) {
        const log = tail(child.logPath);
        return { portTaken: /Address already in use/.test(log), message: `redis-server on port ${port} exited (${JSON.stringify(exited)}): ${log}` };
      }
      try {
        const c = await RedisClient.connect(port);
        try {
          const info = await c.command("INFO", "server");
          const pid = Number(/process_id:(\d+)/.exec(info)?.[1]);
          if (pid === child.pid) return true;
          last = `another redis-server (pid ${pid}) answers on port ${port}`;
        } finally {
          c.close();
        }
      } catch (e) {
        last = e.message;
      }
      await sleep(20);
    }
    await stopChild(child);
    return { portTaken: false, message: `redis-server on port ${port} not ready in ${START_TIMEOUT} ms: ${last}` };
  }

  /**
   * Starts `ringcast serve` with `args`. Adds `--listen 127.0.0.1:0` (unless
   * `listen` is given: pass the port of a killed server to restart on it),
   * `--admin-listen 127.0.0.1:0` and `--shards 1` unless `args` sets them.
   * Returns { addr, port, wsUrl, admin, pid, kill(signal), terminate(), exited, log(), stop() }.
   */
  async startRingcast({ args = [], listen = "127.0.0.1:0", env = {}, name = "ringcast" } = {}) {
    const bin = ringcastBin();
    const full = ["serve"];
    if (!args.includes("--listen")) full.push("--listen", listen);
    if (!args.includes("--admin-listen")) full.push("--admin-listen", "127.0.0.1:0");
    if (!args.includes("--shards")) full.push("--shards", "1");
    full.push(...args);
    const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("RINGCAST_")));
    Object.assign(childEnv, { RUST_LOG: process.env.RUST_LOG || "info" }, env);
    // A restart on the port of a killed server may race the kernel: retry.
    for (let attempt = 1; ; attempt++) {
      const child = this._spawn(bin, full, { env: childEnv, logName: `${name}-${Date.now()}` });
      const line = await readFirstLine(child, START_TIMEOUT);
      const ws = /\bws=(\S+)/.exec(line || "")?.[1];
      const admin = /\badmin=(\S+)/.exec(line || "")?.[1];
      if (ws) {
        child.stdout.resume(); // never let the pipe fill
        const port = Number(ws.split(":").pop());
        return {
          addr: ws,
          port,
          wsUrl: `ws://${ws}/ws`,
          admin,
          pid: child.pid,
          child,
          exited: child.exited,
          kill: (signal = "SIGKILL") => child.kill(signal),
          terminate: () => child.kill("SIGTERM"),
          log: () => readFileSync(child.logPath, "utf8"),
          stop: () => stopChild(child),
        };
      }
      await stopChild(child);
      const log = tail(child.logPath);
      if (attempt < 5 && /in use|AddrInUse/i.test(log)) {
        await sleep(200);
        continue;
      }
      throw new Error(`ringcast did not start (ready line ${JSON.stringify(line)}): ${log}`);
    }
  }

  /**
   * Serves files on 127.0.0.1: `routes` maps a URL prefix to a directory
   * (`{"/": dir}`) or to a function (req, res) => void. Returns { url, close() }.
   */
  async serve(routes) {
    const table = Object.entries(routes).sort((a, b) => b[0].length - a[0].length);
    const server = createServer((req, res) => {
      const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
      const hit = table.find(([prefix]) => path.startsWith(prefix));
      if (!hit) return notFound(res);
      const [prefix, target] = hit;
      if (typeof target === "function") return target(req, res);
      let file = resolve(target, "." + sep + path.slice(prefix.length));
      if (!file.startsWith(resolve(target))) return notFound(res);
      if (existsSync(file) && statSync(file).isDirectory()) file = join(file, "index.html");
      if (!existsSync(file)) {
        if (path === "/favicon.ico") return res.writeHead(204).end(); // keeps page consoles clean
        return notFound(res);
      }
      res.writeHead(200, { "Content-Type": MIME[extname(file)] || "application/octet-stream", "Cache-Control": "no-store" });
      createReadStream(file).pipe(res);
    });
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    this._closers.push(() => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }));
    return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(() => r())) };
  }

  /**
   * A TCP forwarder on a free loopback port, standing in for a load
   * balancer: new connections go to the current `target` port, existing
   * ones stay where they are. Returns { port, wsUrl, setTarget(port), close() }.
   */
  async tcpProxy(target) {
    const sockets = new Set();
    const server = tcpServer((down) => {
      const up = tcpConnect(state.target, "127.0.0.1");
      for (const s of [down, up]) {
        sockets.add(s);
        s.on("close", () => sockets.delete(s));
        s.on("error", () => {});
      }
      down.pipe(up);
      up.pipe(down);
      down.on("close", () => up.destroy());
      up.on("close", () => down.destroy());
    });
    const state = { target };
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    const close = () => new Promise((r) => {
      for (const s of sockets) s.destroy();
      server.close(() => r());
    });
    this._closers.push(close);
    const port = server.address().port;
    return { port, wsUrl: `ws://127.0.0.1:${port}/ws`, setTarget: (p) => (state.target = p), close };
  }

  /** The harness's Chromium (launched on first use). */
  async browser() {
    if (this._browser) return this._browser;
    let chromium;
    try {
      ({ chromium } = await import("playwright-core"));
    } catch {
      throw new Error("playwright-core is missing: run `npm ci` in tests/browser (tests/run does)");
    }
    const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
    if (!existsSync(executablePath)) throw new Error(`no Chromium at ${executablePath}: apt-get install chromium (tests/run does)`);
    this._browser = await chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS, timeout: START_TIMEOUT });
    this._closers.push(() => this._browser.close());
    return this._browser;
  }

  /**
   * A new page in its own context, its console and errors recorded
   * (`pageLog(page)`, and written to the artifacts when the harness closes).
   */
  async newPage(name = "page", { viewport = { width: 900, height: 640 } } = {}) {
    const browser = await this.browser();
    const context = await browser.newContext({ viewport });
    const page = await context.newPage();
    const lines = [];
    this.pageLogs.set(page, lines);
    const at = () => new Date().toISOString().slice(11, 23);
    page.on("console", (m) => lines.push(`${at()} console.${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => lines.push(`${at()} pageerror: ${e.stack || e.message}`));
    page.on("requestfailed", (r) => lines.push(`${at()} requestfailed: ${r.url()} ${r.failure()?.errorText}`));
    page.setDefaultTimeout(15_000);
    this._closers.push(async () => {
      const { writeFileSync } = await import("node:fs");
      writeFileSync(join(this.artifacts, `${name}.console.log`), lines.join("\n") + "\n");
      await context.close();
    });
    return page;
  }

  /** What a page logged so far, one line per entry. */
  pageLog(page) {
    return (this.pageLogs.get(page) || []).join("\n");
  }

  /** Saves a PNG of `page` as <artifacts>/<name>.png; returns the path. */
  async screenshot(page, name) {
    const path = join(this.artifacts, `${name}.png`);
    await page.screenshot({ path, fullPage: true, animations: "disabled" });
    return path;
  }
}

/** The ringcast binary: $RINGCAST_BIN, else target/debug/ringcast (`cargo build` makes it). */
export function ringcastBin() {
  const bin = process.env.RINGCAST_BIN || join(REPO, "target", "debug", "ringcast");
  if (!existsSync(bin)) throw new Error(`no ringcast binary at ${bin}: run \`cargo build\` first (or set RINGCAST_BIN)`);
  return bin;
}

/** Runs the ringcast binary with `args` (e.g. `publish`) to completion; resolves with stdout. */
export function runRingcast(args, { timeout = 10_000 } = {}) {
  return new Promise((res, rej) => {
    const child = spawn(ringcastBin(), args, { stdio: ["ignore", "pipe", "pipe"], timeout, killSignal: "SIGKILL" });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    child.on("error", rej);
    child.on("exit", (code, signal) => (code === 0 ? res(out) : rej(new Error(`ringcast ${args[0]} exited ${code ?? signal}: ${err}`))));
  });
}

const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".map": "application/json",
  ".ts": "text/plain; charset=utf-8",
};

function notFound(res) {
  res.writeHead(404, { "Content-Type": "text/plain" });
  res.end("not found\n");
}

function tail(path, lines = 20) {
  try {
    return readFileSync(path, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

function readFirstLine(child, timeout) {
  return new Promise((res) => {
    const rl = createInterface({ input: child.stdout });
    const timer = setTimeout(() => done(undefined), timeout);
    const done = (line) => {
      clearTimeout(timer);
      rl.removeAllListeners();
      rl.close();
      res(line);
    };
    rl.once("line", done);
    child.exited.then(() => done(undefined));
  });
}

/** SIGTERM, then SIGKILL after `grace` ms; resolves when the child is gone. */
async function stopChild(child, grace = 3000) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const t = setTimeout(() => child.kill("SIGKILL"), grace);
  await child.exited;
  clearTimeout(t);
}
