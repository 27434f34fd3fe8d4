// The package as published: index.d.ts declares exactly the runtime
// exports, package.json points at files that exist, the module imports
// nothing.
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import * as mod from "../../src/index.js";

const root = new URL("../../", import.meta.url);
const read = (p) => readFileSync(new URL(p, root), "utf8");

test("index.d.ts declares every runtime export, and nothing that is not one", () => {
  const dts = read("index.d.ts");
  const declared = [...dts.matchAll(/^export (?:declare )?(?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  assert.deepEqual(declared, Object.keys(mod).sort());
});

test("package.json: name, exports, types and files point at what exists", () => {
  const pkg = JSON.parse(read("package.json"));
  assert.equal(pkg.name, "ringcast-client");
  assert.equal(pkg.type, "module");
  assert.equal(pkg.exports["."].default, "./src/index.js");
  assert.equal(pkg.exports["."].types, pkg.types);
  for (const f of [pkg.exports["."].default, pkg.types, ...pkg.files]) assert.ok(existsSync(new URL(f, root)), f);
  assert.equal(pkg.dependencies, undefined, "dependency-free");
});

test("src/index.js imports nothing", () => {
  assert.doesNotMatch(read("src/index.js"), /^\s*import\s/m);
});
