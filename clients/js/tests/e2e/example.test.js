// The example page (examples/index.html) as a user sees it: opened in
// Chromium against a real server, a notification published with the
// `ringcast publish` command shows up on it; a screenshot is kept in
// target/browser/client-example/example.png.
import test from "node:test";
import assert from "node:assert/strict";
import { Harness, until, runRingcast, CLIENT_ROOT } from "./support.js";

const h = new Harness("client-example");
test.after(() => h.close());

test("the example page shows a live notification", async () => {
  const server = await h.startRingcast({ args: ["--allow-anonymous", "--node-name", "edge-1"] });
  const site = await h.serve({ "/": CLIENT_ROOT });
  const page = await h.newPage("example", { viewport: { width: 760, height: 520 } });
  await page.goto(`${site.url}/examples/?url=${encodeURIComponent(server.wsUrl)}&topic=news`);
  await until(h, page, () => document.body.dataset.subscribed === "yes", null, { what: "the page subscribed" });
  assert.equal(await page.textContent("#status"), "connected");

  await runRingcast(["publish", "--url", server.wsUrl, "--topic", "news", "--data", JSON.stringify({ title: "Deploy finished", body: "ringcast is live on edge-1" })]);
  await until(h, page, () => document.querySelectorAll("li.note").length === 1, null, { what: "the notification on the page" });
  // And one published from the page's own form.
  await page.fill("#text", "Hello from the browser");
  await page.click("button");
  await until(h, page, () => document.querySelectorAll("li.note").length === 2, null, { what: "the page's own publish" });

  const notes = await page.$$eval("li.note", (els) => els.map((e) => ({ title: e.querySelector(".title").textContent, body: e.querySelector(".body")?.textContent, id: e.dataset.id })));
  assert.equal(notes[1].title, "Deploy finished");
  assert.equal(notes[1].body, "ringcast is live on edge-1");
  assert.equal(notes[0].title, "Hello from the browser");
  assert.match(notes[1].id, /^\d+-\d+$/);
  const shot = await h.screenshot(page, "example");
  console.log(`screenshot: ${shot}`);
  assert.ok(await page.isVisible("text=Deploy finished"), "visible, not only in the DOM");
});
