// Heartbeat (the `ping` op and dead-link detection), token refresh before
// `exp`, browser online/offline and visibility.
import test from "node:test";
import assert from "node:assert/strict";
import { setup, okSubs } from "./setup.js";
import { tokenWith } from "./fakes.js";

test("after heartbeat seconds of silence the ping op goes out; a pong keeps the link", async () => {
  const c = await setup();
  const ws = await c.connect(10);
  await c.clock.advance(9_999);
  assert.deepEqual(ws.ops("ping"), []);
  await c.clock.advance(1);
  assert.deepEqual(ws.ops("ping"), [{ op: "ping" }]);
  await c.clock.advance(5_000);
  ws.receive({ op: "pong" });
  await c.clock.advance(9_999);
  assert.equal(ws.ops("ping").length, 1, "silence counts from the pong");
  assert.equal(c.rc.state, "connected");
  await c.clock.advance(1);
  assert.equal(ws.ops("ping").length, 2);
});

test("any frame counts as life: no ping while messages flow", async () => {
  const c = await setup();
  c.rc.subscribe("news", () => {});
  const ws = await c.connect(10);
  okSubs(ws);
  for (let i = 1; i <= 10; i++) {
    await c.clock.advance(5_000);
    ws.receive({ op: "msg", topic: "news", id: `${i}-0`, data: i });
  }
  assert.deepEqual(ws.ops("ping"), []);
});

test("a ping unanswered for another heartbeat is a dead link: closed and reconnected", async () => {
  const c = await setup();
  const ws = await c.connect(10);
  await c.clock.advance(10_000);
  assert.equal(ws.ops("ping").length, 1);
  await c.clock.advance(9_999);
  assert.equal(c.rc.state, "connected");
  await c.clock.advance(1);
  assert.equal(c.rc.state, "disconnected");
  assert.equal(ws.closedWith.code, 4000);
  const d = c.events.at(-1);
  assert.equal(d[0], "disconnected");
  assert.match(d[1].reason, /dead link/);
  await c.clock.advance(c.clock.nextDelay());
  assert.equal(c.WS.sockets.length, 2);
});

test("the token is refreshed by an auth frame before exp; the connection stays", async () => {
  const c0 = await setup();
  const now = c0.clock.now();
  let n = 0;
  const tokens = [tokenWith({ sub: "u", exp: now / 1000 + 120 }), tokenWith({ sub: "u", exp: now / 1000 + 240 })];
  const c = await setup({ getToken: () => tokens[n++], tokenRefreshMargin: 30_000 });
  const ws = await c.connect(1000);
  assert.deepEqual(ws.sent[0], { op: "auth", token: tokens[0] });
  await c.clock.advance(89_999);
  assert.equal(ws.ops("auth").length, 1);
  await c.clock.advance(1);
  const refresh = ws.last("auth");
  assert.deepEqual(refresh, { op: "auth", id: refresh.id, token: tokens[1] });
  ws.receive({ op: "ok", id: refresh.id });
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 1);
  await c.clock.advance(119_999);
  assert.equal(ws.ops("auth").length, 2, "the next refresh is timed from the new exp");
  await c.clock.advance(1);
  assert.equal(ws.ops("auth").length, 3);
});

test("short tokens refresh half way; a refused refresh is surfaced and retried before exp", async () => {
  const probe = await setup();
  const exp = probe.clock.now() / 1000 + 8;
  const c = await setup({ getToken: () => tokenWith({ sub: "u", exp }) });
  const ws = await c.connect(1000);
  await c.clock.advance(4_000);
  const a = ws.last("auth");
  assert.ok(a.id, "refresh sent half way through an 8 s token");
  ws.receive({ op: "error", id: a.id, code: 4001, reason: "token refused" });
  await c.clock.advance(0);
  assert.ok(c.events.some(([e, x]) => e === "error" && x.code === 4001));
  assert.equal(c.rc.state, "connected");
  await c.clock.advance(2_000);
  assert.ok(ws.last("auth").id > a.id, "tried again");
});

test("refresh to another user: the server's 4003 stops the client", async () => {
  const c = await setup({ getToken: () => "x" });
  const ws = await c.connect();
  ws.serverClose(4003, "token for another user");
  assert.equal(c.rc.state, "closed");
});

test("offline drops the link at once, online reconnects at once", async () => {
  const c = await setup({ minReconnectDelay: 5000, random: () => 0.99 });
  const ws = await c.connect();
  const p = c.rc.publish("t", 1);
  await c.clock.advance(0);
  c.win.fire("offline");
  assert.equal(c.rc.state, "disconnected");
  await assert.rejects(p, (e) => e.code === "outcome_unknown");
  assert.ok(ws.closedWith);
  await c.clock.advance(100);
  assert.equal(c.WS.sockets.length, 1, "waits (backoff) while offline");
  c.win.fire("online");
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 2, "online: reconnect without waiting for the backoff");
});

test("becoming visible reconnects at once when disconnected, and probes a live link", async () => {
  const c = await setup({ minReconnectDelay: 5000, random: () => 0.99 });
  let ws = await c.connect(25);
  c.win.setVisibility("hidden");
  await c.clock.advance(3_000);
  c.win.setVisibility("visible");
  assert.deepEqual(ws.ops("ping"), [{ op: "ping" }], "probe: is the link still alive after a sleep?");
  await c.clock.advance(25_000);
  assert.equal(c.rc.state, "disconnected", "no pong: dead");
  c.win.setVisibility("visible");
  await c.clock.advance(0);
  assert.equal(c.WS.sockets.length, 2);
});
