// A fake clock and a fake WebSocket for the unit tests: the client under test
// does no real IO and waits no real time.

/** Timers that fire only when the test advances the clock. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map(); // handle -> { at, fn }
    this.nextHandle = 1;
  }
  now = () => this.t;
  setTimeout = (fn, ms) => {
    const h = this.nextHandle++;
    this.timers.set(h, { at: this.t + Math.max(0, ms || 0), fn, seq: h });
    return h;
  };
  clearTimeout = (h) => {
    this.timers.delete(h);
  };
  /** Runs every timer due within `ms`, in time order, letting promises settle in between. */
  async advance(ms = 0) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next;
      for (const [h, tm] of this.timers) {
        if (tm.at <= end && (!next || tm.at < next[1].at || (tm.at === next[1].at && tm.seq < next[1].seq))) next = [h, tm];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fn();
      await flush();
    }
    this.t = end;
    await flush();
  }
  /** When the earliest timer fires, relative to now (Infinity if none). */
  nextDelay() {
    let min = Infinity;
    for (const tm of this.timers.values()) min = Math.min(min, tm.at - this.t);
    return min;
  }
}

/** Lets pending promise callbacks run. */
export function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** A WebSocket constructor whose instances the test drives by hand. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    static sockets = sockets;
    constructor(url, protocol) {
      this.url = url;
      this.protocol = protocol;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = undefined;
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 2;
    }
    // ---- the server's side ----
    open() {
      this.readyState = 1;
      this.onopen && this.onopen({});
    }
    receive(frame) {
      this.onmessage && this.onmessage({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }
    welcome(heartbeat = 25) {
      this.receive({ op: "welcome", conn: `c-0-${sockets.indexOf(this)}`, node: "n1", heartbeat });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose && this.onclose({ code, reason });
    }
    /** Frames sent with this op. */
    ops(op) {
      return this.sent.filter((f) => f.op === op);
    }
    /** The last frame sent with this op. */
    last(op) {
      const f = this.ops(op);
      return f[f.length - 1];
    }
  }
  return FakeSocket;
}

/** A fake `window` with online/offline and visibility events. */
export function fakeWindow() {
  const handlers = {};
  const docHandlers = {};
  const win = {
    navigator: { onLine: true },
    addEventListener: (e, fn) => (handlers[e] ||= []).push(fn),
    document: {
      visibilityState: "visible",
      addEventListener: (e, fn) => (docHandlers[e] ||= []).push(fn),
    },
    fire(e) {
      if (e === "online" || e === "offline") win.navigator.onLine = e === "online";
      (handlers[e] || []).forEach((fn) => fn({}));
    },
    setVisibility(v) {
      win.document.visibilityState = v;
      (docHandlers.visibilitychange || []).forEach((fn) => fn({}));
    },
  };
  return win;
}

/** An unsigned JWT-shaped token with `exp` (seconds), as the client reads it. */
export function tokenWith(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
}
