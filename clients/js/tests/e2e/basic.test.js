// In real Chromium against the real server (embedded broker, HS256 tokens):
// connect, subscribe, receive; publish with ack and with a refusal; presence
// refused while not built; token refresh before expiry; a refresh to another
// user (4003) stops the client; browser offline/online; a frozen server is
// found dead by the `ping` op; Chromium's permessage-deflate offer is taken:
// a 2 KB message comes compressed, a 100 B one plain.
import test from "node:test";
import assert from "node:assert/strict";
import { Harness, openTestPage, until, mintToken, SECRET, sleep } from "./support.js";

const h = new Harness("client-basic");
let server;
let page;
const tokens = { ttl: {}, sub: {} }; // per client name: token lifetime and user

test.before(async () => {
  server = await h.startRingcast({ args: ["--auth-hmac-secret", SECRET, "--heartbeat", "5s"] });
  ({ page } = await openTestPage(h));
  // Each client asks the test for its tokens: minted here, as an app's backend would.
  await page.exposeFunction("getToken", (name) => {
    const ttl = tokens.ttl[name] ?? 3600;
    const sub = tokens.sub[name] ?? name;
    tokens.count = (tokens.count || 0) + 1;
    tokens[`count_${name}`] = (tokens[`count_${name}`] || 0) + 1;
    return mintToken({ secret: SECRET, sub, subs: ["news", "chat:*"], pubs: ["news"], ttl });
  });
});
test.after(() => h.close());

test("connect, subscribe, receive, publish with ack", async () => {
  await page.evaluate((url) => t.start("a", url, { getToken: true }), server.wsUrl);
  await page.evaluate(() => t.subscribe("a", "news"));
  await until(h, page, () => t.count("a/news", "subscribed") === 1, null, { what: "a/news subscribed" });
  const connected = await page.evaluate(() => t.lastEvent("a", "connected")[2]);
  assert.match(connected.conn, /^c-/);
  assert.equal(connected.heartbeat, 5);

  const res = await page.evaluate(() => t.publish("a", "news", { title: "hello", n: 1 }));
  assert.match(res.mid, /^\d+-\d+$/, JSON.stringify(res));
  await until(h, page, () => t.received["a/news"].length === 1, null, { what: "the message" });
  const got = await page.evaluate(() => t.received["a/news"]);
  assert.deepEqual(got, [{ data: { title: "hello", n: 1 }, id: res.mid, topic: "news" }]);
});

test("a refused publish rejects with the server's error; presence rejects while not built", async () => {
  const denied = await page.evaluate(() => t.publish("a", "chat:1", { x: 1 }));
  assert.equal(denied.isRingcastError, true);
  assert.equal(denied.error.code, 4403, JSON.stringify(denied));
  const pres = await page.evaluate(() => t.call("a", "presence", "chat:1"));
  assert.equal(pres.isRingcastError, true, JSON.stringify(pres));
  assert.equal(typeof pres.error.code, "number", JSON.stringify(pres));
  assert.ok([4000, 4004, 4403].includes(pres.error.code), JSON.stringify(pres));
  const ping = await page.evaluate(() => t.call("a", "ping"));
  assert.deepEqual(ping, { value: null });
});

/** The value of an unlabelled counter on the server's /metrics. */
async function counter(name) {
  const text = await (await fetch(`http://${server.admin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  assert.ok(line, `${name} is not in /metrics`);
  return Number(line.split(" ")[1]);
}

test("Chromium negotiates permessage-deflate: a 2 KB message arrives compressed, a 100 B one plain", async () => {
  // Chromium always offers the extension; the server takes it by default.
  const before = await counter("ringcast_messages_compressed_total");
  const words = "price update for your watched item in stock again ".repeat(40).slice(0, 2000);
  const big = await page.evaluate((w) => t.publish("a", "news", { big: w }), words);
  assert.match(big.mid, /^\d+-\d+$/, JSON.stringify(big));
  await until(h, page, () => t.received["a/news"].length === 2, null, { what: "the 2 KB message" });
  assert.equal(await counter("ringcast_messages_compressed_total"), before + 1, "compressed once");
  const small = await page.evaluate(() => t.publish("a", "news", { small: "x".repeat(80) }));
  assert.match(small.mid, /^\d+-\d+$/, JSON.stringify(small));
  await until(h, page, () => t.received["a/news"].length === 3, null, { what: "the 100 B message" });
  assert.equal(await counter("ringcast_messages_compressed_total"), before + 1, "below the minimum size: plain");
  const got = await page.evaluate(() => t.received["a/news"].slice(1).map((m) => m.data));
  assert.deepEqual(got, [{ big: words }, { small: "x".repeat(80) }], "both intact in the page");
  // What went on the wire for the 2 KB one was smaller than what it was.
  assert.ok((await counter("ringcast_compression_bytes_out_total")) < (await counter("ringcast_compression_bytes_in_total")));
});

test("the token is refreshed before it expires: same connection, no 4001", async () => {
  tokens.ttl.r = 3; // seconds: the server checks exp once a second
  await page.evaluate((url) => t.start("r", url, { getToken: true }), server.wsUrl);
  await page.evaluate(() => t.subscribe("r", "news"));
  await until(h, page, () => t.count("r/news", "subscribed") === 1, null, { what: "r subscribed" });
  const conn = await page.evaluate(() => t.lastEvent("r", "connected")[2].conn);
  await sleep(7000); // more than two lifetimes of a token
  const ev = await page.evaluate(() => t.events.filter((e) => e[0] === "r"));
  assert.deepEqual(ev.map((e) => e[1]), ["connecting", "connected"], JSON.stringify(ev));
  assert.equal(ev[1][2].conn, conn);
  assert.ok(tokens.count_r >= 4, `getToken called ${tokens.count_r} times: one connect + refreshes`);
  // And the connection still works past the first tokens' exp.
  const res = await page.evaluate(() => t.publish("a", "news", { late: true }));
  await until(h, page, (mid) => t.received["r/news"].some((m) => m.id === mid), res.mid, { what: "delivery after refreshes" });
});

test("a token for another user (close 4003) stops the client with the reason", async () => {
  await page.evaluate((url) => t.start("x", url, { getToken: true }), server.wsUrl);
  await until(h, page, () => t.count("x", "connected") === 1, null, { what: "x connected" });
  tokens.sub.x = "mallory";
  await page.evaluate(() => t.call("x", "refreshToken"));
  await until(h, page, () => t.count("x", "closed") === 1, null, { what: "x closed" });
  const closed = await page.evaluate(() => t.lastEvent("x", "closed")[2]);
  assert.equal(closed.code, 4003, JSON.stringify(closed));
  assert.ok(closed.reason.length > 0, "the reason is surfaced");
  const err = await page.evaluate(() => t.lastEvent("x", "error")[2]);
  assert.equal(err.code, 4003);
  await sleep(1500);
  assert.equal(await page.evaluate(() => t.count("x", "connecting")), 1, "no reconnect after 4003");
});

test("browser offline drops the link, online reconnects at once and recovers", async () => {
  const ctx = page.context();
  const before = await page.evaluate(() => t.count("a", "connected"));
  await ctx.setOffline(true);
  await until(h, page, () => t.lastEvent("a", "disconnected")?.[2].reason === "browser offline", null, { what: "offline seen" });
  await ctx.setOffline(false);
  await until(h, page, (n) => t.count("a", "connected") === n + 1, before, { what: "reconnect after online", timeout: 5000 });
  await until(h, page, () => t.count("a/news", "recovered") >= 1, null, { what: "resubscribed with since" });
});

test("a silent server (SIGSTOP) is found dead by the ping op; the page reconnects once it answers", async () => {
  const frozen = await h.startRingcast({ args: ["--allow-anonymous", "--heartbeat", "1s"], name: "ringcast-frozen" });
  await page.evaluate((url) => t.start("d", url, { minReconnectDelay: 200, maxReconnectDelay: 1000, connectTimeout: 1500 }), frozen.wsUrl);
  await page.evaluate(() => t.subscribe("d", "news"));
  await until(h, page, () => t.count("d/news", "subscribed") === 1, null, { what: "d subscribed" });
  frozen.kill("SIGSTOP"); // the socket stays open; nothing answers
  try {
    await until(h, page, () => t.count("d", "disconnected") >= 1, null, { what: "dead link detected", timeout: 6000 });
  } finally {
    frozen.kill("SIGCONT");
  }
  const lost = await page.evaluate(() => t.events.find((e) => e[0] === "d" && e[1] === "disconnected")[2]);
  assert.match(lost.reason, /dead link/, JSON.stringify(lost));
  await until(h, page, () => t.count("d/news", "subscribed") >= 2, null, { what: "resubscribed after SIGCONT", timeout: 10_000 });
});
