// The connection state machine and the close-code table (docs/PROTOCOL.md §4).
import test from "node:test";
import assert from "node:assert/strict";
import { Ringcast } from "../../src/index.js";
import { fakeWebSocket } from "./fakes.js";
import { setup, okSubs } from "./setup.js";

test("connects on its own, offers ringcast.v1, sends the token in the first frame", async () => {
  const c = await setup({ token: "T1" });
  assert.deepEqual(c.names(), []);
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 1);
  assert.equal(c.ws.url, "ws://test/ws");
  assert.equal(c.ws.protocol, "ringcast.v1");
  assert.deepEqual(c.names(), ["connecting"]);
  c.ws.open();
  assert.deepEqual(c.ws.sent, [{ op: "auth", token: "T1" }]);
  c.ws.welcome(25);
  assert.equal(c.rc.state, "connected");
  assert.deepEqual(c.events[1], ["connected", { conn: "c-0-0", node: "n1", heartbeat: 25 }]);
});

test("without a token nothing is sent before welcome (anonymous)", async () => {
  const c = await setup();
  await c.clock.advance(0);
  c.ws.open();
  assert.deepEqual(c.ws.sent, []);
});

test("without a WebSocket (Node 20) the constructor says what to pass", () => {
  const saved = globalThis.WebSocket;
  delete globalThis.WebSocket;
  try {
    assert.throws(() => new Ringcast("ws://x/ws"), /options\.WebSocket/);
  } finally {
    if (saved) globalThis.WebSocket = saved;
  }
});

test("getToken is called before each connect", async () => {
  let n = 0;
  const c = await setup({ getToken: async () => `T${++n}` });
  await c.connect();
  assert.deepEqual(c.ws.sent[0], { op: "auth", token: "T1" });
  c.ws.serverClose(1006);
  await c.clock.advance(c.clock.nextDelay());
  c.ws.open();
  assert.deepEqual(c.ws.sent[0], { op: "auth", token: "T2" });
});

test("a failing getToken is surfaced and retried with backoff", async () => {
  let fail = true;
  const c = await setup({ getToken: async () => { if (fail) throw new Error("backend down"); return "T"; } });
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 0);
  assert.equal(c.rc.state, "disconnected");
  assert.ok(c.events.some(([e, a]) => e === "error" && /backend down/.test(a.message)));
  fail = false;
  await c.clock.advance(c.clock.nextDelay());
  assert.equal(c.WS.sockets.length, 1);
});

test("1000 and 4003 stop with the reason surfaced", async () => {
  for (const [code, reason] of [[1000, ""], [4003, "token for another user"]]) {
    const c = await setup();
    await c.connect();
    c.ws.serverClose(code, reason);
    assert.equal(c.rc.state, "closed");
    assert.deepEqual(c.events.at(-1), ["closed", { code, reason }]);
    if (code === 4003) {
      const err = c.events.find(([e]) => e === "error")[1];
      assert.equal(err.code, 4003);
      assert.equal(err.message, reason);
    }
    await c.clock.advance(60_000);
    assert.equal(c.WS.sockets.length, 1, `no reconnect after ${code}`);
  }
});

test("1001 after drain waits reconnect_in_ms, then reconnects", async () => {
  const c = await setup();
  await c.connect();
  c.ws.receive({ op: "drain", reconnect_in_ms: 1800 });
  c.ws.serverClose(1001, "server shutting down");
  assert.deepEqual(c.events.at(-1), ["disconnected", { code: 1001, reason: "server shutting down", delay: 1800 }]);
  await c.clock.advance(1799);
  assert.equal(c.WS.sockets.length, 1);
  await c.clock.advance(1);
  assert.equal(c.WS.sockets.length, 2);
});

test("4009 reconnects at once and resubscribes with since; a second 4009 soon after backs off", async () => {
  const c = await setup();
  await c.connect();
  c.rc.subscribe("news", () => {});
  await c.clock.advance(0);
  okSubs(c.ws, { last: "100-0" });
  c.ws.receive({ op: "msg", topic: "news", id: "101-0", data: 1 });
  c.ws.serverClose(4009, "slow");
  assert.equal(c.events.at(-1)[1].delay, 0);
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 2);
  c.ws.open();
  c.ws.welcome();
  await c.clock.advance(0);
  assert.deepEqual(c.ws.last("sub"), { op: "sub", id: c.ws.last("sub").id, topic: "news", since: "101-0", epoch: "E1" });
  c.ws.serverClose(4009, "slow");
  assert.ok(c.events.at(-1)[1].delay > 0, "no tight 4009 loop");
});

test("4008 backs off longer than other codes", async () => {
  const c = await setup({ rateLimitedDelay: 10000 });
  await c.connect();
  c.ws.serverClose(4008, "rate limited");
  const delay = c.events.at(-1)[1].delay;
  assert.ok(delay >= 10000, `4008 delay ${delay}`);
});

test("other codes reconnect with exponential backoff and full jitter", async () => {
  const c = await setup({ minReconnectDelay: 500, maxReconnectDelay: 4000, random: () => 0.99 });
  await c.clock.advance(0);
  const delays = [];
  for (let i = 0; i < 6; i++) {
    c.ws.serverClose(1006);
    delays.push(c.events.at(-1)[1].delay);
    await c.clock.advance(c.clock.nextDelay());
  }
  assert.deepEqual(delays, [495, 990, 1980, 3960, 3960, 3960]);
  c.ws.open();
  c.ws.welcome();
  c.ws.serverClose(1002, "protocol error");
  assert.equal(c.events.at(-1)[1].delay, 495, "welcome resets the backoff");
});

test("4001 gets a new token and reconnects; without getToken it stops", async () => {
  let n = 0;
  const c = await setup({ getToken: () => `T${++n}` });
  await c.connect();
  c.ws.serverClose(4001, "token expired");
  assert.equal(c.rc.state, "disconnected");
  assert.ok(c.events.some(([e, a]) => e === "error" && a.code === 4001));
  await c.clock.advance(c.clock.nextDelay());
  c.ws.open();
  assert.deepEqual(c.ws.sent[0], { op: "auth", token: "T2" });

  const s = await setup({ token: "static" });
  await s.connect();
  s.ws.serverClose(4001, "token expired");
  assert.equal(s.rc.state, "closed");
});

test("a connect that gets no welcome in time is abandoned and retried", async () => {
  const c = await setup({ connectTimeout: 3000 });
  await c.clock.advance(0);
  c.ws.open();
  await c.clock.advance(3000);
  assert.deepEqual(c.ws.closedWith, { code: 4000, reason: "connect timed out" });
  assert.equal(c.rc.state, "disconnected");
  await c.clock.advance(c.clock.nextDelay());
  assert.equal(c.WS.sockets.length, 2);
});

test("close() stops for good; connect() starts again", async () => {
  const c = await setup();
  await c.connect();
  const ws = c.ws;
  c.rc.close();
  assert.deepEqual(ws.closedWith, { code: 1000, reason: undefined });
  assert.equal(c.rc.state, "closed");
  assert.deepEqual(c.events.at(-1), ["closed", { code: 1000, reason: "closed by the client" }]);
  assert.ok(!c.names().includes("error"));
  ws.serverClose(1000); // the echo changes nothing
  await c.clock.advance(60_000);
  assert.equal(c.WS.sockets.length, 1);
  c.rc.connect();
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 2);
});

test("close() during getToken opens no socket", async () => {
  let release;
  const c = await setup({ getToken: () => new Promise((r) => (release = r)) });
  await c.clock.advance(0);
  c.rc.close();
  release("T");
  await c.clock.advance(1000);
  assert.equal(c.WS.sockets.length, 0);
});

test("an error frame with neither id nor topic is surfaced on the client", async () => {
  const c = await setup();
  await c.connect();
  c.ws.receive({ op: "error", code: 4000, reason: "binary frames are not supported" });
  const err = c.events.at(-1);
  assert.equal(err[0], "error");
  assert.equal(err[1].code, 4000);
  c.ws.receive("not json");
  assert.equal(c.events.at(-1)[1].code, "bad_frame");
  assert.equal(c.rc.state, "connected");
});

test("a throwing handler does not break the client", async (t) => {
  const c = await setup();
  const thrown = [];
  const saved = globalThis.reportError;
  globalThis.reportError = (e) => thrown.push(e);
  t.after(() => (globalThis.reportError = saved));
  c.rc.on("connected", () => { throw new Error("app bug"); });
  await c.connect();
  assert.equal(c.rc.state, "connected");
  assert.equal(thrown[0].message, "app bug");
  assert.ok(c.names().includes("connected"), "later handlers still ran");
});

test("the constructor wants a WebSocket constructor that opens URLs", () => {
  const WS = fakeWebSocket();
  const rc = new Ringcast("ws://h/ws", { WebSocket: WS, clock: { now: () => 0, setTimeout: () => 0, clearTimeout: () => {} } });
  assert.equal(rc.state, "idle");
});
