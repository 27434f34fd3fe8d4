// Graceful shutdown in real Chromium: the page reaches node A through a
// TCP forwarder (a load balancer's part); a second node B starts and the
// forwarder sends new connections to it; A gets SIGTERM, sends `drain` and
// closes with 1001; the page waits the drain delay, reconnects, lands on B,
// and resubscribes. A publish made while it is away is queued and acked by B.
// Each node runs the embedded broker, so B cannot know A's history: the
// page is told `recovered:false` ("unrecovered") and must refetch.
import test from "node:test";
import assert from "node:assert/strict";
import { Harness, openTestPage, until, within } from "./support.js";

const h = new Harness("client-drain");
test.after(() => h.close());

test("drain: reconnect after reconnect_in_ms to a new node; queued publish acked there; recovered:false surfaced", async () => {
  const a = await h.startRingcast({ args: ["--allow-anonymous", "--node-name", "node-a", "--drain-window", "1500ms"], name: "ringcast-a" });
  const lb = await h.tcpProxy(a.port);
  const { page } = await openTestPage(h);
  await page.evaluate((url) => t.start("c", url, { minReconnectDelay: 100, maxReconnectDelay: 1000 }), lb.wsUrl);
  await page.evaluate(() => t.subscribe("c", "news"));
  await until(h, page, () => t.count("c/news", "subscribed") === 1, null, { what: "subscribed on A" });
  assert.equal(await page.evaluate(() => t.lastEvent("c", "connected")[2].node), "node-a");
  // A message on A gives the subscription a position in A's history.
  await page.evaluate(() => t.publish("c", "news", { on: "a" }));
  await until(h, page, () => t.received["c/news"].length === 1, null, { what: "message on A" });

  const b = await h.startRingcast({ args: ["--allow-anonymous", "--node-name", "node-b"], name: "ringcast-b" });
  lb.setTarget(b.port);
  // Queue a publish as soon as the page loses A.
  await page.evaluate(() => {
    t.clients.c.on("disconnected", () => { if (!t.queued) t.queued = t.publish("c", "news", { on: "queued" }); });
  });
  a.terminate();
  await until(h, page, () => t.count("c", "disconnected") >= 1, null, { what: "drain close" });
  const gone = await page.evaluate(() => t.events.find((e) => e[0] === "c" && e[1] === "disconnected")[2]);
  assert.equal(gone.code, 1001, JSON.stringify(gone));
  assert.ok(gone.delay >= 0 && gone.delay < 1500, `waits reconnect_in_ms from drain, got ${gone.delay}`);

  await until(h, page, () => t.lastEvent("c", "connected")[2].node === "node-b", null, { what: "reconnected to node B", timeout: 15_000 });
  await until(h, page, () => t.count("c/news", "subscribed") >= 2, null, { what: "resubscribed on B" });
  const queued = await page.evaluate(() => t.queued);
  assert.match(queued.mid, /^\d+-\d+$/, `the queued publish is acked by B: ${JSON.stringify(queued)}`);
  await until(h, page, (mid) => t.received["c/news"].some((m) => m.id === mid), queued.mid, { what: "queued message delivered" });
  const sub = await page.evaluate(() => t.lastEvent("c/news", "subscribed")[2]);
  assert.equal(sub.recovered, false, "B has another epoch: recovery impossible, and said so");
  assert.equal(await page.evaluate(() => t.count("c/news", "unrecovered")), 1);

  const exit = await within(a.exited, 8000, "still running");
  assert.deepEqual(exit, { code: 0, signal: null }, "A exits once drained");
  await b.stop();
});
