// Publishing: acks, server errors, the bounded queue of never-sent
// publishes, "outcome unknown" for one in flight, pacing under the server's
// inbound burst; presence and ping requests.
import test from "node:test";
import assert from "node:assert/strict";
import { setup, okSubs } from "./setup.js";

test("publish resolves with the mid; a server error rejects with its code and reason", async () => {
  const c = await setup();
  const ws = await c.connect();
  const p1 = c.rc.publish("news", { title: "hi" });
  const p2 = c.rc.publish("secret", 1);
  await c.clock.advance(0);
  const [a, b] = ws.ops("pub");
  assert.deepEqual(a, { op: "pub", id: a.id, topic: "news", data: { title: "hi" } });
  ws.receive({ op: "ok", id: a.id, topic: "news", mid: "1732240000000-0" });
  ws.receive({ op: "error", id: b.id, code: 4403, reason: "topic secret not allowed by token" });
  assert.equal(await p1, "1732240000000-0");
  await assert.rejects(p2, (e) => e.code === 4403 && e.message === "topic secret not allowed by token");
});

test("publishes made while disconnected wait and go out in order after the resubscriptions", async () => {
  const c = await setup();
  c.rc.subscribe("news", () => {});
  const ps = [1, 2, 3].map((n) => c.rc.publish("news", n));
  const ws = await c.connect();
  assert.deepEqual(ws.sent.map((f) => f.op + (f.data ?? "")), ["sub", "pub1", "pub2", "pub3"]);
  okSubs(ws);
  for (const f of ws.ops("pub")) ws.receive({ op: "ok", id: f.id, topic: "news", mid: `${f.data}-0` });
  assert.deepEqual(await Promise.all(ps), ["1-0", "2-0", "3-0"]);
});

test("the queue is bounded: past maxQueuedPublishes a publish rejects at once with a clear error", async () => {
  const c = await setup({ maxQueuedPublishes: 2 });
  const ok = [c.rc.publish("t", 1), c.rc.publish("t", 2)];
  await assert.rejects(c.rc.publish("t", 3), (e) => e.code === "queue_full" && /publish queue full/.test(e.message));
  const ws = await c.connect();
  assert.equal(ws.ops("pub").length, 2);
  for (const f of ws.ops("pub")) ws.receive({ op: "ok", id: f.id, mid: "1-0" });
  await Promise.all(ok);
});

test("a publish in flight when the link drops rejects as outcome unknown and is not resent", async () => {
  const c = await setup();
  let ws = await c.connect();
  const inflight = c.rc.publish("t", "sent");
  await c.clock.advance(0);
  assert.equal(ws.ops("pub").length, 1);
  ws.serverClose(1006);
  const queued = c.rc.publish("t", "queued");
  await assert.rejects(inflight, (e) => e.code === "outcome_unknown" && /outcome unknown/.test(e.message));
  await c.clock.advance(c.clock.nextDelay());
  ws = c.ws;
  ws.open();
  ws.welcome();
  await c.clock.advance(0);
  assert.deepEqual(ws.ops("pub").map((f) => f.data), ["queued"], "only the never-sent one");
  ws.receive({ op: "ok", id: ws.last("pub").id, mid: "2-0" });
  assert.equal(await queued, "2-0");
});

test("a publish not answered in requestTimeout rejects (outcome unknown)", async () => {
  const c = await setup({ requestTimeout: 5000 });
  await c.connect();
  const p = assert.rejects(c.rc.publish("t", 1), (e) => e.code === "outcome_unknown" && /outcome unknown/.test(e.message));
  await c.clock.advance(4999);
  assert.equal(c.ws.ops("pub").length, 1);
  await c.clock.advance(1);
  await p;
});

test("a long queue is flushed within the server's burst, then paced", async () => {
  const c = await setup({ sendBurst: 100, sendRate: 50, maxQueuedPublishes: 300 });
  const ps = Array.from({ length: 300 }, (_, i) => c.rc.publish("t", i));
  const ws = await c.connect();
  assert.equal(ws.ops("pub").length, 100, "a burst at once");
  await c.clock.advance(1000);
  const after1s = ws.ops("pub").length;
  assert.ok(after1s >= 145 && after1s <= 151, `about 50 more a second, got ${after1s}`);
  await c.clock.advance(3000);
  assert.equal(ws.ops("pub").length, 300);
  assert.deepEqual(ws.ops("pub").map((f) => f.data), Array.from({ length: 300 }, (_, i) => i), "in order");
  for (const f of ws.ops("pub")) ws.receive({ op: "ok", id: f.id, mid: "1-0" });
  await Promise.all(ps);
});

test("large publishes are paced by bytes too", async () => {
  const c = await setup({ sendBytesBurst: 100_000, sendBytesRate: 50_000 });
  const big = "x".repeat(40_000);
  for (let i = 0; i < 4; i++) c.rc.publish("t", big).catch(() => {});
  const ws = await c.connect();
  assert.equal(ws.ops("pub").length, 2);
  await c.clock.advance(2000);
  assert.equal(ws.ops("pub").length, 4);
});

test("close() rejects the publishes still waiting", async () => {
  const c = await setup();
  const p = c.rc.publish("t", 1);
  c.rc.close();
  await assert.rejects(p, (e) => e.code === "closed");
  await assert.rejects(c.rc.publish("t", 2), (e) => e.code === "closed");
});

test("presence rejects with the server's error while presence is not built", async () => {
  const c = await setup();
  const p = c.rc.presence("chat:1"); // asked before connecting: waits for the connection
  const ws = await c.connect();
  const f = ws.last("presence");
  assert.deepEqual(f, { op: "presence", id: f.id, topic: "chat:1" });
  ws.receive({ op: "error", id: f.id, code: 4403, reason: "presence is off in namespace chat" });
  await assert.rejects(p, (e) => e.code === 4403);
  const q = c.rc.presence("chat:1");
  await c.clock.advance(0);
  const g = ws.last("presence");
  ws.receive({ op: "presence", id: g.id, topic: "chat:1", users: ["u1"], count: 1, truncated: false });
  assert.deepEqual(await q, { topic: "chat:1", users: ["u1"], count: 1, truncated: false });
});

test("ping() resolves on pong", async () => {
  const c = await setup();
  const ws = await c.connect();
  const p = c.rc.ping();
  await c.clock.advance(0);
  ws.receive({ op: "pong", id: ws.last("ping").id });
  assert.equal(await p, undefined);
});

test("a keyed publish in flight when the link drops is sent again with its key, not rejected", async () => {
  const c = await setup();
  let ws = await c.connect();
  const keyed = c.rc.publish("t", "sent", { key: "order-7/shipped" });
  const plain = c.rc.publish("t", "plain");
  await c.clock.advance(0);
  assert.deepEqual(ws.ops("pub").map((f) => f.key), ["order-7/shipped", undefined]);
  ws.serverClose(1006);
  await assert.rejects(plain, (e) => e.code === "outcome_unknown");
  await c.clock.advance(c.clock.nextDelay());
  ws = c.ws;
  ws.open();
  ws.welcome();
  await c.clock.advance(0);
  const again = ws.ops("pub");
  assert.deepEqual(again.map((f) => [f.data, f.key]), [["sent", "order-7/shipped"]]);
  ws.receive({ op: "ok", id: again[0].id, topic: "t", mid: "1-0" });
  assert.equal(await keyed, "1-0");
});
