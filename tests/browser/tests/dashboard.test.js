// The admin dashboard in real headless Chromium: the page loads from the
// node itself, its charts update every second while `ringcast load`
// delivers, its numbers agree with /metrics, and its screenshot is not
// blank.
import test from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { statSync } from "node:fs";

import { Harness, ringcastBin, waitFor } from "../index.js";

const h = new Harness("dashboard");
test.after(() => h.close());

async function scrape(admin, path) {
  const res = await fetch(`http://${admin}${path}`);
  assert.equal(res.status, 200, `${path}: ${res.status}`);
  return res.text();
}

function sum(metricsText, name) {
  let total = 0;
  let seen = false;
  for (const line of metricsText.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m && m[1] === name) {
      total += Number(m[3]);
      seen = true;
    }
  }
  assert.ok(seen, `${name} is not in /metrics`);
  return total;
}

test("the dashboard charts a node under load, in agreement with /metrics", async () => {
  const server = await h.startRingcast({
    args: ["--allow-anonymous", "--shards", "2", "--inbound-rate", "0", "--inbound-bytes-rate", "0", "--max-handshakes-per-ip", "0"],
  });
  // 100 subscribers, 100 msg/s for 20 s: steady connections, moving rates.
  const load = spawn(ringcastBin(), ["load", "fanout", "--target", server.addr, "--connections", "100", "--rate", "100", "--duration", "20s"], { stdio: "ignore" });
  test.after(() => load.kill("SIGKILL"));
  await waitFor(async () => sum(await scrape(server.admin, "/metrics"), "ringcast_connections_active") >= 101, {
    timeout: 15_000,
    what: "the load tool's connections",
  });
  const page = await h.newPage("dashboard", { viewport: { width: 1400, height: 900 } });
  await page.goto(`http://${server.admin}/dashboard`);
  await waitFor(async () => Number(await page.evaluate(() => document.body.dataset.ticks ?? 0)) >= 6, {
    timeout: 20_000,
    what: "six dashboard updates",
  });
  const shown = await page.evaluate(() => ({
    connections: Number(document.body.dataset.connections),
    delivered: Number(document.body.dataset.delivered),
    rate: document.getElementById("rate-now").textContent,
    broker: document.getElementById("broker").textContent,
    ready: document.getElementById("ready").textContent,
    error: document.getElementById("error").textContent,
  }));
  const metrics = await scrape(server.admin, "/metrics");
  assert.equal(shown.error, "", "the page could read the admin endpoint");
  assert.equal(shown.connections, sum(metrics, "ringcast_connections_active"), "connections agree with /metrics");
  assert.ok(shown.delivered > 0 && shown.delivered <= sum(metrics, "ringcast_messages_delivered_total"), `delivered ${shown.delivered}`);
  assert.notEqual(shown.rate, "0", "deliveries per second moved");
  assert.equal(shown.broker, "embedded up");
  assert.equal(shown.ready, "ready");
  // Every chart drew something beyond its grid: count the pixels of the
  // series colours on each canvas.
  const drawn = await page.evaluate(() =>
    [...document.querySelectorAll("canvas")].map((c) => {
      const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let coloured = 0;
      for (let i = 0; i < data.length; i += 4) {
        const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
        if (Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
      }
      return [c.id, coloured];
    }),
  );
  for (const id of ["conns", "rate"]) {
    // A line a few points long is tens of pixels; the grid has none.
    assert.ok(Object.fromEntries(drawn)[id] > 10, `chart ${id} is empty: ${JSON.stringify(drawn)}`);
  }
  const png = await h.screenshot(page, "dashboard");
  assert.ok(statSync(png).size > 20_000, "the screenshot is not blank");
  assert.deepEqual(h.pageLog(page).split("\n").filter((l) => l.includes(" pageerror: ")), [], "no page errors");
});
