// Subscriptions: positions (since/epoch from the ok's `last` and from msgs),
// recovery outcomes, ended subscriptions and 4503 retries.
import test from "node:test";
import assert from "node:assert/strict";
import { setup, okSubs } from "./setup.js";

async function reconnect(c) {
  c.ws.serverClose(1006);
  await c.clock.advance(c.clock.nextDelay());
  c.ws.open();
  c.ws.welcome();
  await c.clock.advance(0);
  return c.ws;
}

test("subscribe sends sub once connected; messages reach the handler with meta", async () => {
  const c = await setup();
  const got = [];
  const sub = c.rc.subscribe("news", (data, meta) => got.push([data, meta]));
  const subscribed = [];
  sub.on("subscribed", (i) => subscribed.push(i));
  assert.equal(sub.state, "pending");
  const ws = await c.connect();
  assert.deepEqual(ws.ops("sub"), [{ op: "sub", id: 1, topic: "news" }]);
  assert.equal(sub.state, "subscribing");
  okSubs(ws, { epoch: "E1", last: "5-0" });
  assert.equal(sub.state, "subscribed");
  assert.deepEqual(subscribed, [{ epoch: "E1", last: "5-0", recovered: undefined }]);
  ws.receive({ op: "msg", topic: "news", id: "6-0", data: { title: "hi" } });
  ws.receive({ op: "msg", topic: "orders:7", id: "7-0", event: "shipped", data: 1 });
  ws.receive({ op: "msg", topic: "news", id: "8-0", event: "e", data: [1] });
  assert.deepEqual(got, [
    [{ title: "hi" }, { id: "6-0", topic: "news" }],
    [[1], { id: "8-0", topic: "news", event: "e" }],
  ]);
  assert.deepEqual(sub.position, { since: "8-0", epoch: "E1" });
});

test("a quiet topic resubscribes from the ok's last; a busy one from its last msg", async () => {
  const c = await setup();
  c.rc.subscribe("quiet", () => {});
  c.rc.subscribe("busy", () => {});
  let ws = await c.connect();
  okSubs(ws, { epoch: "E1", last: "10-0" });
  ws.receive({ op: "msg", topic: "busy", id: "12-3", data: 0 });
  ws = await reconnect(c);
  const subs = Object.fromEntries(ws.ops("sub").map((f) => [f.topic, f]));
  assert.deepEqual(subs.quiet, { op: "sub", id: subs.quiet.id, topic: "quiet", since: "10-0", epoch: "E1" });
  assert.deepEqual(subs.busy, { op: "sub", id: subs.busy.id, topic: "busy", since: "12-3", epoch: "E1" });
});

test("recovered:true keeps the position of the replay; recovered:false is surfaced and resets it", async () => {
  const c = await setup();
  const got = [];
  const sub = c.rc.subscribe("news", (d, m) => got.push(m.id), { since: "3-0", epoch: "E1" });
  const seen = [];
  for (const e of ["subscribed", "recovered", "unrecovered"]) sub.on(e, (i) => seen.push([e, i.recovered]));
  let ws = await c.connect();
  assert.deepEqual(ws.ops("sub")[0], { op: "sub", id: 1, topic: "news", since: "3-0", epoch: "E1" });
  ws.receive({ op: "msg", topic: "news", id: "4-0", data: 0 }); // replay comes before the ok
  ws.receive({ op: "msg", topic: "news", id: "5-0", data: 0 });
  ws.receive({ op: "ok", id: 1, topic: "news", epoch: "E1", last: "5-0", recovered: true });
  assert.deepEqual(got, ["4-0", "5-0"]);
  assert.deepEqual(seen, [["subscribed", true], ["recovered", true]]);
  assert.deepEqual(sub.position, { since: "5-0", epoch: "E1" });

  ws = await reconnect(c);
  const f = ws.last("sub");
  ws.receive({ op: "ok", id: f.id, topic: "news", epoch: "E2", last: "1-0", recovered: false });
  assert.deepEqual(seen.slice(2), [["subscribed", false], ["unrecovered", false]]);
  assert.deepEqual(sub.position, { since: "1-0", epoch: "E2" }, "the new history's position");
});

test("an ok whose last is behind a message already received keeps the message's id", async () => {
  const c = await setup();
  const sub = c.rc.subscribe("news", () => {}, { since: "3-0", epoch: "E1" });
  const ws = await c.connect();
  ws.receive({ op: "msg", topic: "news", id: "9-0", data: 0 });
  ws.receive({ op: "ok", id: 1, topic: "news", epoch: "E1", last: "8-0", recovered: true });
  assert.equal(sub.position.since, "9-0");
});

test("an error with topic and no id ends the subscription: surfaced, never resubscribed", async () => {
  const c = await setup();
  const got = [];
  const sub = c.rc.subscribe("chat:42", (d) => got.push(d));
  const errors = [];
  sub.on("error", (e) => errors.push(e));
  let ws = await c.connect();
  okSubs(ws);
  ws.receive({ op: "error", code: 4403, topic: "chat:42", reason: "subscription ended: topic not allowed by the refreshed token" });
  assert.equal(sub.state, "ended");
  assert.equal(errors[0].code, 4403);
  assert.equal(errors[0].topic, "chat:42");
  assert.ok(!errors[0].willRetry);
  ws.receive({ op: "msg", topic: "chat:42", id: "1-0", data: 1 });
  assert.deepEqual(got, []);
  ws = await reconnect(c);
  assert.deepEqual(ws.ops("sub"), []);
  assert.ok(!c.names().includes("error"), "not a client-level error");
  c.rc.subscribe("chat:42", () => {}); // may subscribe again explicitly
});

test("4503 on sub: not subscribed, retried later with backoff; other refusals end it", async () => {
  const c = await setup({ minReconnectDelay: 500 });
  const busy = c.rc.subscribe("news", () => {});
  const denied = c.rc.subscribe("secret", () => {});
  const errs = [];
  busy.on("error", (e) => errs.push(["news", e.code, e.willRetry]));
  denied.on("error", (e) => errs.push(["secret", e.code, e.willRetry]));
  const ws = await c.connect();
  const [a, b] = ws.ops("sub");
  ws.receive({ op: "error", id: a.id, code: 4503, topic: "news", reason: "broker unavailable: subscribe queue full, retry later" });
  ws.receive({ op: "error", id: b.id, code: 4403, topic: "secret", reason: "topic secret not allowed by token" });
  assert.deepEqual(errs, [["news", 4503, true], ["secret", 4403, undefined]]);
  assert.equal(busy.state, "pending");
  assert.equal(denied.state, "ended");
  await c.clock.advance(499);
  assert.equal(ws.ops("sub").length, 2);
  await c.clock.advance(c.clock.nextDelay());
  assert.equal(ws.ops("sub").length, 3);
  assert.equal(ws.last("sub").topic, "news");
  okSubs(ws);
  assert.equal(busy.state, "subscribed");
});

test("unsubscribe sends unsub and drops later messages; an ok for it is ignored", async () => {
  const c = await setup();
  const got = [];
  const sub = c.rc.subscribe("news", (d) => got.push(d));
  const ws = await c.connect();
  sub.unsubscribe();
  await c.clock.advance(0);
  assert.deepEqual(ws.last("unsub"), { op: "unsub", topic: "news" });
  okSubs(ws);
  ws.receive({ op: "msg", topic: "news", id: "1-0", data: 1 });
  assert.deepEqual(got, []);
  assert.equal(sub.state, "ended");
  sub.unsubscribe(); // twice is harmless
  assert.equal(ws.ops("unsub").length, 1);
});

test("unsubscribe before connecting sends nothing; subscribing twice throws", async () => {
  const c = await setup();
  const sub = c.rc.subscribe("news", () => {});
  assert.throws(() => c.rc.subscribe("news", () => {}), /already subscribed/);
  sub.unsubscribe();
  const ws = await c.connect();
  assert.deepEqual(ws.sent, []);
});

test("join and leave reach the subscription", async () => {
  const c = await setup();
  const sub = c.rc.subscribe("chat:1", () => {});
  const seen = [];
  sub.on("join", (p) => seen.push(["join", p.user]));
  sub.on("leave", (p) => seen.push(["leave", p.user]));
  const ws = await c.connect();
  okSubs(ws);
  ws.receive({ op: "join", topic: "chat:1", user: "u1" });
  ws.receive({ op: "leave", topic: "chat:1", user: "u1" });
  assert.deepEqual(seen, [["join", "u1"], ["leave", "u1"]]);
});

test("a lost notice reaches the topic's subscription and the patterns that match it", async () => {
  const c = await setup();
  const sub = c.rc.subscribe("feed:1", () => {});
  const pat = c.rc.subscribe("feed:*", () => {});
  const other = c.rc.subscribe("feed:2", () => {});
  const seen = [];
  sub.on("lost", (l) => seen.push(["sub", l.topic, l.from, l.to]));
  pat.on("lost", (l) => seen.push(["pattern", l.topic, l.from, l.to]));
  other.on("lost", () => seen.push(["other"]));
  const ws = await c.connect();
  okSubs(ws);
  ws.receive({ op: "lost", topic: "feed:1", from: "5-0", to: "9-0" });
  assert.deepEqual(seen, [
    ["sub", "feed:1", "5-0", "9-0"],
    ["pattern", "feed:1", "5-0", "9-0"],
  ]);
});

test("a pattern subscription gets every matching topic of its namespace; a resubscribe is unrecovered", async () => {
  const c = await setup();
  const got = { pattern: [], exact: [] };
  const wild = c.rc.subscribe("user.42.*", (d, m) => got.pattern.push(m.topic));
  c.rc.subscribe("user.42.a", (d, m) => got.exact.push(m.topic));
  c.rc.subscribe("chat:#", (d, m) => got.pattern.push(m.topic));
  const seen = [];
  wild.on("unrecovered", () => seen.push("unrecovered"));
  let ws = await c.connect();
  okSubs(ws, { epoch: "E1", last: "1-0" });
  for (const [i, topic] of ["user.42.a", "user.42.b", "user.43.a", "user.42", "chat:1.x", "chat.1", "other:1"].entries()) {
    ws.receive({ op: "msg", topic, id: `${i + 2}-0`, data: i });
  }
  assert.deepEqual(got.exact, ["user.42.a"]);
  assert.deepEqual(got.pattern, ["user.42.a", "user.42.b", "chat:1.x"]);
  assert.deepEqual(seen, []);
  ws = await reconnect(c);
  okSubs(ws, { epoch: "E1", last: "9-0" });
  assert.deepEqual(seen, ["unrecovered"]);
});
