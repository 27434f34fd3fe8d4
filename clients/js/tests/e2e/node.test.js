// The same module in Node 20 (no global WebSocket), with the `ws` package's
// constructor injected, against the real server: subscribe, publish with
// ack, receive; the server killed and restarted on its port: the client
// reconnects by itself, and the embedded broker's new epoch is reported as
// recovered:false.
import test from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Ringcast } from "../../src/index.js";
import { Harness, waitFor } from "./support.js";

const h = new Harness("client-node");
test.after(() => h.close());

test("Node with the ws package: publish, receive, reconnect after a crash", async (t) => {
  let server = await h.startRingcast({ args: ["--allow-anonymous"] });
  const rc = new Ringcast(server.wsUrl, { WebSocket, minReconnectDelay: 100, maxReconnectDelay: 500 });
  t.after(() => rc.close());
  const events = [];
  for (const e of ["connected", "disconnected", "closed"]) rc.on(e, (x) => events.push([e, x]));
  const got = [];
  const sub = rc.subscribe("jobs", (data, meta) => got.push([data, meta.id]));
  const outcomes = [];
  sub.on("subscribed", (i) => outcomes.push(i.recovered));
  await waitFor(() => sub.state === "subscribed", { what: "subscribed" });

  const mid = await rc.publish("jobs", { job: 1 });
  await waitFor(() => got.length === 1, { what: "delivery" });
  assert.deepEqual(got, [[{ job: 1 }, mid]]);

  server.kill("SIGKILL");
  await server.exited;
  await waitFor(() => events.some(([e]) => e === "disconnected"), { what: "disconnected" });
  const queued = rc.publish("jobs", { job: 2 }); // waits for the new server
  server = await h.startRingcast({ args: ["--allow-anonymous"], listen: `127.0.0.1:${server.port}` });
  const mid2 = await queued;
  await waitFor(() => got.length === 2, { what: "delivery after restart" });
  assert.deepEqual(got[1], [{ job: 2 }, mid2]);
  assert.deepEqual(outcomes, [undefined, false], "new embedded broker: new epoch, recovered:false");
  assert.equal(events.filter(([e]) => e === "connected").length, 2);
  rc.close();
  assert.deepEqual(events.at(-1), ["closed", { code: 1000, reason: "closed by the client" }]);
});
