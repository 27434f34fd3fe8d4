import test from "node:test";
import assert from "node:assert/strict";
import { backoff, compareIds, tokenExpiry } from "../../src/index.js";
import { tokenWith } from "./fakes.js";

test("backoff is full jitter: uniform in [0, min * 2^attempt), capped at max", () => {
  assert.equal(backoff(0, 500, 20000, () => 0), 0);
  assert.equal(backoff(0, 500, 20000, () => 0.999), 499);
  assert.equal(backoff(3, 500, 20000, () => 0.5), 2000);
  assert.equal(backoff(10, 500, 20000, () => 0.5), 10000, "capped at max");
  assert.equal(backoff(5000, 500, 20000, () => 0.5), 10000, "huge attempts do not overflow");
});

test("backoff spreads over its whole range with a real random source", () => {
  const delays = Array.from({ length: 2000 }, () => backoff(2, 100, 10000));
  assert.ok(delays.every((d) => d >= 0 && d < 400));
  assert.ok(Math.min(...delays) < 40 && Math.max(...delays) > 360, "covers the range");
});

test("message ids compare as MS-SEQ numbers, not as strings", () => {
  assert.ok(compareIds("1732240000000-9", "1732240000000-10") < 0);
  assert.ok(compareIds("999-0", "1000-0") < 0);
  assert.equal(compareIds("5-5", "5-5"), 0);
  assert.ok(compareIds("0-0", "1-0") < 0);
});

test("tokenExpiry reads exp from a JWT and tolerates garbage", () => {
  assert.equal(tokenExpiry(tokenWith({ sub: "u", exp: 1234 })), 1234);
  assert.equal(tokenExpiry("not a jwt"), undefined);
  assert.equal(tokenExpiry(tokenWith({ sub: "u" })), undefined);
});
