// The size budget: what a browser downloads, minified (esbuild, pinned in
// package-lock.json) and gzipped, stays under 6 KB. Needs `npm ci` first.
import test from "node:test";
import assert from "node:assert/strict";
import { gzipSync } from "node:zlib";
import { fileURLToPath } from "node:url";

const BUDGET = 6 * 1024;

test(`src/index.js minified + gzip is under ${BUDGET} bytes`, async () => {
  let esbuild;
  try {
    esbuild = await import("esbuild");
  } catch {
    assert.fail("esbuild is missing: run `npm ci` in clients/js first");
  }
  const out = await esbuild.build({
    entryPoints: [fileURLToPath(new URL("../src/index.js", import.meta.url))],
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2020",
    write: false,
    logLevel: "silent",
  });
  const min = out.outputFiles[0].contents;
  const gz = gzipSync(min, { level: 9 }).length;
  console.log(`ringcast-client: ${min.length} B minified, ${gz} B gzip (budget ${BUDGET} B)`);
  assert.ok(gz < BUDGET, `${gz} B gzip is over the ${BUDGET} B budget`);
  // The module must stay dependency-free: nothing left to import.
  assert.doesNotMatch(new TextDecoder().decode(min), /\bimport\s*[{("']/);
});
