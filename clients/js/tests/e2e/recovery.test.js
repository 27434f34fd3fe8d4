// Recovery across a crash, in real Chromium: ringcast on Redis is killed
// with SIGKILL and restarted on the same port while producers keep writing
// to Redis. The page must end up with every message of a busy topic (no gap,
// no duplicate, in order) and of a quiet one, which it had received nothing
// on before the crash (so only the `ok`'s `last` tells it where to resume).
import test from "node:test";
import assert from "node:assert/strict";
import { Harness, openTestPage, until, sleep, streamKey } from "./support.js";

const h = new Harness("client-recovery");
test.after(() => h.close());

test("after SIGKILL and restart the page recovers every message of a busy and a quiet topic", async () => {
  const redis = await h.startRedis();
  const args = ["--allow-anonymous", "--redis", redis.url];
  let server = await h.startRingcast({ args, name: "ringcast-a" });
  const { page } = await openTestPage(h);
  await page.evaluate((url) => t.start("c", url, { minReconnectDelay: 200, maxReconnectDelay: 1500 }), server.wsUrl);
  await page.evaluate(() => { t.subscribe("c", "feed.busy"); t.subscribe("c", "feed.quiet"); });
  await until(h, page, () => t.count("c/feed.busy", "subscribed") === 1 && t.count("c/feed.quiet", "subscribed") === 1, null, { what: "both subscribed" });

  // A producer writes straight to Redis, as any backend would (docs/PROTOCOL.md §6).
  const producer = await redis.client();
  const published = { "feed.busy": [], "feed.quiet": [] };
  const xadd = async (topic, data) => {
    const id = await producer.command("XADD", streamKey(topic), "MAXLEN", "~", "100000", "*", "topic", topic, "data", JSON.stringify(data));
    published[topic].push(id);
  };
  let n = 0;
  let running = true;
  const busy = (async () => {
    while (running) {
      await xadd("feed.busy", { n: n++ });
      await sleep(15);
    }
  })();

  await until(h, page, () => t.received["c/feed.busy"].length >= 20, null, { what: "live busy messages" });
  server.kill("SIGKILL");
  await server.exited;
  await until(h, page, () => t.count("c", "disconnected") >= 1, null, { what: "the page saw the crash" });
  await xadd("feed.quiet", { q: 1 });
  await sleep(700);
  await xadd("feed.quiet", { q: 2 });
  const downCount = published["feed.busy"].length;

  server = await h.startRingcast({ args, listen: `127.0.0.1:${server.port}`, name: "ringcast-b" });
  await until(h, page, () => t.count("c/feed.busy", "subscribed") === 2 && t.count("c/feed.quiet", "subscribed") === 2, null, { what: "both resubscribed", timeout: 15_000 });
  await sleep(500);
  running = false;
  await busy;
  producer.close();
  assert.ok(published["feed.busy"].length > downCount + 10, "the producer kept writing after the restart");

  await until(h, page, (want) => t.received["c/feed.busy"].length >= want, published["feed.busy"].length, { what: `all ${published["feed.busy"].length} busy messages` });
  await until(h, page, () => t.received["c/feed.quiet"].length >= 2, null, { what: "both quiet messages" });
  await sleep(200); // a duplicate would arrive now
  const got = await page.evaluate(() => ({ busy: t.received["c/feed.busy"], quiet: t.received["c/feed.quiet"], events: t.events }));
  assert.deepEqual(got.busy.map((m) => m.id), published["feed.busy"], "busy: every id once, in order");
  assert.deepEqual(got.busy.map((m) => m.data.n), published["feed.busy"].map((_, i) => i));
  assert.deepEqual(got.quiet.map((m) => m.id), published["feed.quiet"], "quiet: recovered from the ok's last");
  const outcome = (key) => got.events.filter((e) => e[0] === key && e[1] === "subscribed").map((e) => e[2].recovered);
  assert.deepEqual(outcome("c/feed.busy"), [undefined, true]);
  assert.deepEqual(outcome("c/feed.quiet"), [undefined, true]);
  await h.screenshot(page, "recovered");
});
