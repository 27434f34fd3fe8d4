#!/usr/bin/env node
// Interop check with compression on: Node's `ws` (the version pinned in
// clients/js/package.json, loaded from clients/js/node_modules) against
// ringcast.
//
// Usage: node ws_deflate_client.mjs ws://HOST:PORT/ws
//
// A subscriber and a publisher connect with permessage-deflate and must get
// exactly the answer docs/PROTOCOL.md section 1 gives (both
// no_context_takeovers). The publisher sends three `pub` requests, each
// compressed by `ws` (RSV1): a large one, a small one, and one cut into
// three compressed fragments (RSV1 on the first only). The subscriber must
// get each `data` back intact: the large and the fragmented ones compressed
// on the wire (RSV1), the small one (under --compression-min-size) plain.
// Whether a frame was compressed is read from `ws`'s own extension state:
// its PerMessageDeflate instance inflates every RSV1 message it receives
// and deflates every frame it sends compressed, and both are counted here.
// Then both close with 1000, answered by the server.
//
// Exits 0 on success; otherwise prints what went wrong and exits 1.
// Run by tests/interop.rs, which runs `npm ci` in clients/js when needed.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const JS = new URL("../../clients/js/", import.meta.url);
const WebSocket = createRequire(new URL("package.json", JS))("ws");
const WS_VERSION = JSON.parse(readFileSync(new URL("node_modules/ws/package.json", JS))).version;

const SUBPROTOCOL = "ringcast.v1";
const ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
// Per wait; the whole run is bounded by RUN_TIMEOUT.
const RECV_TIMEOUT = 5_000;
const RUN_TIMEOUT = 25_000;

class Failed extends Error {}

function check(cond, what) {
  if (!cond) throw new Failed(what);
}

/** Opens a client with compression; counts what its extension inflates and deflates. */
async function open(url, who) {
  const ws = new WebSocket(url, SUBPROTOCOL, {
    // Compress every message we send, however small.
    perMessageDeflate: { threshold: 0 },
    handshakeTimeout: RECV_TIMEOUT,
  });
  const client = { ws, who, answer: undefined, inflated: 0, deflated: 0, seen: 0, inbox: [], waiting: null };
  ws.on("upgrade", (res) => {
    client.answer = res.headers["sec-websocket-extensions"];
  });
  ws.on("message", (data, isBinary) => {
    // `ws` inflates an RSV1 message before it emits it.
    const compressed = client.inflated > client.seen;
    client.seen = client.inflated;
    client.inbox.push({ text: data.toString(), isBinary, compressed });
    client.waiting?.();
  });
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", (e) => reject(new Failed(`${who}: ${e.message}`)));
  });
  check(client.answer === ANSWER, `${who}: extension answer ${JSON.stringify(client.answer)}, want ${JSON.stringify(ANSWER)}`);
  check(ws.extensions === "permessage-deflate", `${who}: ws negotiated ${JSON.stringify(ws.extensions)}`);
  const pmd = ws._extensions["permessage-deflate"];
  check(
    pmd.params.server_no_context_takeover === true && pmd.params.client_no_context_takeover === true,
    `${who}: ws accepted parameters ${JSON.stringify(pmd.params)}`,
  );
  const { decompress, compress } = pmd;
  pmd.decompress = function (data, fin, cb) {
    client.inflated += 1;
    return decompress.call(this, data, fin, cb);
  };
  pmd.compress = function (data, fin, cb) {
    client.deflated += 1;
    return compress.call(this, data, fin, cb);
  };
  ws.on("error", (e) => console.log(`FAIL: ${who}: ${e.message}`));
  const welcome = await next(client);
  check(welcome.json.op === "welcome", `${who}: first frame is not welcome: ${welcome.text}`);
  check(!welcome.compressed, `${who}: welcome came compressed`);
  return client;
}

/** The next text message, parsed. */
async function next(client) {
  if (client.inbox.length === 0) {
    let timer;
    await new Promise((resolve, reject) => {
      client.waiting = resolve;
      timer = setTimeout(() => reject(new Failed(`${client.who}: no message within ${RECV_TIMEOUT} ms`)), RECV_TIMEOUT);
    }).finally(() => {
      clearTimeout(timer);
      client.waiting = null;
    });
  }
  const m = client.inbox.shift();
  check(!m.isBinary, `${client.who}: got a binary message`);
  try {
    return { ...m, json: JSON.parse(m.text) };
  } catch (e) {
    throw new Failed(`${client.who}: not JSON (${e.message}): ${m.text.slice(0, 200)}`);
  }
}

/** Sends `frame` whole, or in `fragments` compressed fragments, and waits for the reply to its id. */
async function request(client, frame, wantOp, fragments = 1) {
  const text = JSON.stringify(frame);
  const before = client.deflated;
  const step = Math.ceil(text.length / fragments);
  for (let i = 0; i < fragments; i++) {
    const part = text.slice(i * step, (i + 1) * step);
    client.ws.send(part, { compress: true, fin: i === fragments - 1 });
  }
  const reply = await next(client);
  check(
    reply.json.op === wantOp && reply.json.id === frame.id,
    `${client.who}: ${text.slice(0, 80)} answered with ${reply.text}, want op ${wantOp} id ${frame.id}`,
  );
  check(
    client.deflated - before === fragments,
    `${client.who}: ws compressed ${client.deflated - before} of ${fragments} frames`,
  );
  return reply.json;
}

/** The subscriber's next `msg`: its data must be `data`, compressed on the wire or not. */
async function expectMsg(client, topic, data, compressed, what) {
  const m = await next(client);
  check(m.json.op === "msg" && m.json.topic === topic, `${client.who}: ${what}: expected a msg on ${topic}, got ${m.text.slice(0, 200)}`);
  check(JSON.stringify(m.json.data) === JSON.stringify(data), `${client.who}: ${what}: data altered: ${m.text.slice(0, 200)}`);
  check(
    m.compressed === compressed,
    `${client.who}: ${what} (${m.text.length} B) came ${m.compressed ? "compressed" : "plain"}, want ${compressed ? "compressed" : "plain"}`,
  );
}

async function close(client) {
  const closed = new Promise((resolve) => client.ws.once("close", (code) => resolve(code)));
  client.ws.close(1000);
  const code = await closed;
  check(code === 1000, `${client.who}: close answered with ${code}, want 1000`);
}

async function run(url) {
  const topic = `interop.node${process.pid}`;
  const sub = await open(url, "subscriber");
  const pub = await open(url, "publisher");
  const ok = await request(sub, { op: "sub", id: 1, topic }, "ok");
  check(ok.topic === topic, `subscriber: sub ok names another topic: ${JSON.stringify(ok)}`);

  const large = { text: "a notification that repeats itself, ".repeat(80), n: 1 };
  await request(pub, { op: "pub", id: 10, topic, data: large }, "ok");
  await expectMsg(sub, topic, large, true, "the large message");

  const small = { n: 2 };
  await request(pub, { op: "pub", id: 11, topic, data: small }, "ok");
  await expectMsg(sub, topic, small, false, "the small message");

  const fragmented = { text: "sent in three compressed fragments, ".repeat(40), n: 3 };
  await request(pub, { op: "pub", id: 12, topic, data: fragmented }, "ok", 3);
  await expectMsg(sub, topic, fragmented, true, "the fragmented message");

  await close(sub);
  await close(pub);
  return { sub, pub };
}

async function main() {
  if (process.argv.length !== 3) {
    console.error("usage: node ws_deflate_client.mjs ws://HOST:PORT/ws");
    return 2;
  }
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Failed(`the run took longer than ${RUN_TIMEOUT} ms`)), RUN_TIMEOUT);
  });
  try {
    const { sub, pub } = await Promise.race([run(process.argv[2]), deadline]);
    console.log(
      `ok: ws ${WS_VERSION} on Node ${process.versions.node}: answer as documented; ` +
        `subscriber inflated ${sub.inflated} messages (large, fragmented; small plain), ` +
        `publisher deflated ${pub.deflated} frames; closed with 1000`,
    );
    return 0;
  } catch (e) {
    console.log(`FAIL: ${e instanceof Failed ? e.message : e.stack}`);
    return 1;
  } finally {
    clearTimeout(timer);
  }
}

process.exit(await main());
