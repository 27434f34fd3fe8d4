// Builds a client on the fakes and records what it emits.
import { Ringcast } from "../../src/index.js";
import { FakeClock, fakeWebSocket, fakeWindow, flush } from "./fakes.js";

export async function setup(options = {}, { url = "ws://test/ws" } = {}) {
  const clock = new FakeClock();
  const WS = fakeWebSocket();
  const win = fakeWindow();
  const events = [];
  const rc = new Ringcast(url, {
    WebSocket: WS,
    clock,
    globals: win,
    random: () => 0.5,
    ...options,
  });
  for (const e of ["connecting", "connected", "disconnected", "closed", "error"]) {
    rc.on(e, (arg) => events.push([e, arg]));
  }
  const ctx = {
    clock,
    WS,
    win,
    rc,
    events,
    /** The socket the client opened last. */
    get ws() {
      return WS.sockets[WS.sockets.length - 1];
    },
    /** Lets the client open its socket, then opens it and sends `welcome`. */
    async connect(heartbeat = 25) {
      await clock.advance(0);
      ctx.ws.open();
      ctx.ws.welcome(heartbeat);
      await flush();
      return ctx.ws;
    },
    names() {
      return events.map(([e]) => e);
    },
  };
  return ctx;
}

/** Answers every `sub` sent so far on `ws` that has no answer yet. */
export function okSubs(ws, { epoch = "E1", last = "0-0" } = {}) {
  ws.answered ||= new Set();
  for (const f of ws.ops("sub")) {
    if (ws.answered.has(f.id)) continue;
    ws.answered.add(f.id);
    const ok = { op: "ok", id: f.id, topic: f.topic, epoch, last };
    if (f.since !== undefined) ok.recovered = f.epoch === epoch;
    ws.receive(ok);
  }
}
