// Shared by the Chromium tests: the harness (tests/browser) plus the test
// page (page.html) served with the client as shipped.
import { fileURLToPath } from "node:url";
export { Harness, waitFor, sleep, within, mintToken, runRingcast, streamKey } from "../../../../tests/browser/index.js";

/** clients/js, served as the site root: /src/index.js, /examples/, /tests/e2e/page.html. */
export const CLIENT_ROOT = fileURLToPath(new URL("../../", import.meta.url));

export const SECRET = "browser-tests-secret-0123456789abcdef";

/** Serves clients/js and opens the test page; returns { page, site }. */
export async function openTestPage(h, name = "page") {
  const site = h.site || (h.site = await h.serve({ "/": CLIENT_ROOT }));
  const page = await h.newPage(name);
  await page.goto(`${site.url}/tests/e2e/page.html`);
  await page.waitForFunction(() => window.t && window.t.ready);
  return { page, site };
}

/** Waits until the page's `t` satisfies `fn(t, arg)`; the page log is in the error. */
export async function until(h, page, fn, arg, { timeout = 10_000, what = String(fn) } = {}) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 25 });
  } catch (e) {
    const events = await page.evaluate(() => JSON.stringify(window.t.events.slice(-30))).catch(() => "?");
    throw new Error(`timed out (${timeout} ms) waiting for ${what}\nlast events: ${events}\npage log:\n${h.pageLog(page)}`);
  }
}
