// ringcast-client: the browser and Node client of ringcast's `ringcast.v1`
// protocol (docs/PROTOCOL.md in the server's repository).
//
// What it owns: one WebSocket at a time, the subscriptions and their
// positions (`since` + `epoch`), the publishes waiting for a connection, the
// token and its refresh. What it keeps true:
// - every subscription resubscribes after a reconnect with the id of the
//   last `msg` it received, or the `last` of its `ok` when none came since,
//   so a quiet topic recovers as well as a busy one;
// - a publish is sent at most once: one in flight when the link drops is
//   rejected as "outcome unknown", only publishes never sent are queued;
// - everything waiting is bounded (publish queue, request timeouts), and
//   frames are paced below the server's inbound rate limit.
// It does no IO of its own beyond the injected WebSocket, timers and window:
// tests drive it with a fake clock and a fake socket.

const PROTOCOL = "ringcast.v1";

/** An error of the server (numeric `code`) or of the client (string `code`). */
export class RingcastError extends Error {
  constructor(code, message, topic) {
    super(message);
    this.name = "RingcastError";
    this.code = code;
    if (topic !== undefined) this.topic = topic;
  }
}

/** Compares two `MS-SEQ` message ids: negative, zero or positive. */
export function compareIds(a, b) {
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am - bm || as - bs;
}

/** Reads `exp` (seconds) from a JWT without verifying it; undefined if unreadable. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part)).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** "Full jitter": a random delay in [0, min(max, min * 2^attempt)). */
export function backoff(attempt, min, max, random = Math.random) {
  return Math.floor(random() * Math.min(max, min * 2 ** Math.min(attempt, 30)));
}

// Calls a user's handler; its exception must not break the client's state.
function safely(fn, ...args) {
  try {
    fn(...args);
  } catch (e) {
    (globalThis.reportError || ((x) => setTimeout(() => { throw x; })))(e);
  }
}

class Emitter {
  constructor() {
    this._handlers = {};
  }
  /** Adds a handler; returns a function that removes it. */
  on(event, fn) {
    (this._handlers[event] ||= []).push(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    const list = this._handlers[event];
    if (list) this._handlers[event] = list.filter((f) => f !== fn);
  }
  _emit(event, ...args) {
    for (const fn of this._handlers[event] || []) safely(fn, ...args);
  }
}

/** One topic's subscription: survives reconnects until unsubscribed or ended. */
/**
 * Whether `topic` matches the topic pattern `pattern` as the server applies
 * it (docs/PROTOCOL.md section 2): the same namespace (before the first
 * ":"), then segments split on "." or ":", "*" one, "#" one or more.
 */
export function matches(pattern, topic) {
  const ns = (s) => s.slice(0, Math.max(s.indexOf(":"), 0));
  if (ns(pattern) !== ns(topic)) return false;
  const p = pattern.split(/[.:]/);
  const t = topic.split(/[.:]/);
  for (let i = 0; i < p.length; i++) {
    if (p[i] === "#") return t.length > i;
    if (i >= t.length || (p[i] !== "*" && p[i] !== t[i])) return false;
  }
  return t.length === p.length;
}

export class Subscription extends Emitter {
  constructor(client, topic, fn, opts) {
    super();
    this._client = client;
    this.topic = topic;
    /** A wildcard subscription (`user.*`, `chat:#`): its messages carry their own topics. */
    this.pattern = /[*#]/.test(topic);
    this._fn = fn;
    /** "pending" | "subscribing" | "subscribed" | "ended" */
    this.state = "pending";
    this.since = opts.since;
    this.epoch = opts.epoch;
    this._retries = 0; // 4503 / 4008 answers in a row
    this._retryTimer = undefined;
  }

  /** Where to resume from: pass it back to subscribe() to recover later. */
  get position() {
    return { since: this.since, epoch: this.epoch };
  }

  unsubscribe() {
    this._client._unsubscribe(this);
  }

  _frame(id) {
    const f = { op: "sub", id, topic: this.topic };
    if (this.since !== undefined) {
      f.since = this.since;
      if (this.epoch !== undefined) f.epoch = this.epoch;
    }
    return f;
  }

  _ok(m) {
    // A pattern has no position: resubscribed after a reconnect, what it
    // matched meanwhile is lost, and said so with "unrecovered".
    const again = this._okOnce;
    this._okOnce = true;
    const fresh = m.recovered === false || m.epoch !== this.epoch || this.since === undefined;
    this.epoch = m.epoch;
    // Replayed messages came before this ok and are at or before `last`;
    // a message after it is newer. Keep whichever is further.
    if (m.last !== undefined && (fresh || compareIds(m.last, this.since) > 0)) this.since = m.last;
    this.state = "subscribed";
    this._retries = 0;
    const info = { epoch: m.epoch, last: m.last, recovered: m.recovered };
    this._emit("subscribed", info);
    if (m.recovered === true) this._emit("recovered", info);
    if (m.recovered === false || (this.pattern && again)) this._emit("unrecovered", info);
  }

  _msg(m) {
    this.since = m.id;
    const meta = { id: m.id, topic: m.topic };
    if (m.event !== undefined) meta.event = m.event;
    safely(this._fn, m.data, meta);
  }
}

const CLIENT_DEFAULTS = {
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  rateLimitedDelay: 10000,
  maxQueuedPublishes: 100,
  connectTimeout: 10000,
  requestTimeout: 10000,
  tokenRefreshMargin: 30000,
  sendBurst: 100,
  sendRate: 50,
  sendBytesBurst: 131072,
  sendBytesRate: 32768,
};

/** A connection to ringcast that reconnects, resubscribes and recovers on its own. */
export class Ringcast extends Emitter {
  constructor(url, options = {}) {
    super();
    const o = (this.options = { ...CLIENT_DEFAULTS, ...options });
    this.url = url;
    this._WebSocket = o.WebSocket || globalThis.WebSocket;
    if (!this._WebSocket) {
      throw new TypeError("no WebSocket here: pass options.WebSocket (e.g. the ws package's) on Node before 22");
    }
    this._clock = o.clock || { now: () => Date.now(), setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) };
    this._random = o.random || Math.random;
    this._token = o.token;
    /** "idle" | "connecting" | "connected" | "disconnected" | "closed" */
    this.state = "idle";
    this.attempt = 0; // failed connects since the last welcome
    this._subs = new Map(); // topic -> Subscription
    this._pending = new Map(); // request id -> { resolve, reject, kind, sub, timer }
    this._nextId = 1;
    this._queue = []; // publishes never sent, in order
    this._outbox = []; // subs/unsubs/requests waiting for send capacity
    this._ws = undefined;
    this._timers = {};
    this._drainDelay = undefined;
    this._gen = 0;
    this._last4009 = -Infinity;
    this._bucket = {};
    this._listen(o.globals || globalThis);
    this._clock.setTimeout(() => this.state === "idle" && this.connect(), 0);
  }

  /** Connects now (after close(), or to skip a backoff wait). */
  connect() {
    if (this.state === "connecting" || this.state === "connected") return;
    this._clear("reconnect");
    this._open();
  }

  /** Subscribes; `fn(data, meta)` gets each message. Throws if `topic` is already subscribed. */
  subscribe(topic, fn, opts = {}) {
    if (this._subs.has(topic)) throw new RingcastError("already_subscribed", `already subscribed to ${topic}`, topic);
    const sub = new Subscription(this, topic, fn, opts);
    this._subs.set(topic, sub);
    if (this.state === "connected") this._queueSub(sub);
    return sub;
  }

  /**
   * Publishes `data`; resolves with the message id (`mid`). With
   * `options.key` (v1.2, 1 to 128 bytes) the server delivers a repeat of
   * the topic and key within its idempotency window only once and answers
   * it with the first `mid`, so a keyed publish in flight when the link
   * drops is sent again after the reconnect instead of rejecting as
   * "outcome unknown".
   */
  publish(topic, data, options = {}) {
    const key = options.key;
    return new Promise((resolve, reject) => {
      if (this.state === "closed") return reject(new RingcastError("closed", "client closed"));
      if (this._queue.length >= this.options.maxQueuedPublishes) {
        return reject(new RingcastError("queue_full", `publish queue full: ${this._queue.length} publishes wait for a connection`, topic));
      }
      this._queue.push({ topic, data, key, resolve, reject });
      this._pump();
    });
  }

  /** Asks who is subscribed to `topic` (namespaces with presence): `{ topic, users, count, truncated }`. */
  presence(topic) {
    return this._request({ op: "presence", topic }).then(({ op, id, ...rest }) => rest);
  }

  /** Sends the `ping` op; resolves when the `pong` arrives. */
  ping() {
    return this._request({ op: "ping" }).then(() => undefined);
  }

  /** Gets a token from `getToken` now and sends it in an `auth` frame. */
  async refreshToken() {
    const token = await this._fetchToken();
    if (this.state !== "connected") return;
    await this._request({ op: "auth", token }, true);
    this._token = token;
    this._scheduleRefresh();
  }

  /** Closes for good (until connect()); publishes still waiting reject. */
  close() {
    this._shutdown(1000, "closed by the client");
  }

  // ---- connection -------------------------------------------------------

  async _open() {
    this.state = "connecting";
    const gen = ++this._gen;
    this._emit("connecting", { attempt: this.attempt });
    let token = this._token;
    if (this.options.getToken) {
      try {
        token = this._token = await this._fetchToken();
      } catch (e) {
        this._emit("error", e);
        return this._lost(undefined, "getToken failed");
      }
      if (gen !== this._gen) return; // closed or reopened meanwhile
    }
    let ws;
    try {
      ws = this._ws = new this._WebSocket(this.url, PROTOCOL);
    } catch (e) {
      this._emit("error", e);
      return this._lost(undefined, String(e && e.message));
    }
    this._drainDelay = undefined;
    this._lastRx = this._clock.now();
    this._pingAt = undefined;
    this._set("connect", this.options.connectTimeout, () => this._abort(4000, "connect timed out"));
    ws.onopen = () => {
      if (token) this._raw({ op: "auth", token });
    };
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onerror = () => {}; // the close event follows with the code
    ws.onclose = (ev) => this._lost(ev.code, ev.reason);
  }

  _fetchToken() {
    const get = this.options.getToken;
    return get ? Promise.resolve(get()) : Promise.resolve(this._token);
  }

  _onMessage(text) {
    this._lastRx = this._clock.now();
    this._pingAt = undefined;
    if (typeof text !== "string") return;
    let m;
    try {
      m = JSON.parse(text);
    } catch {
      return this._emit("error", new RingcastError("bad_frame", "unparsable frame from the server"));
    }
    const sub = m.topic !== undefined ? this._subs.get(m.topic) : undefined;
    switch (m.op) {
      case "msg":
        if (sub && sub.state !== "ended") sub._msg(m);
        // The server sends a message once per connection; every
        // subscription it matches gets it here.
        for (const p of this._subs.values()) {
          if (p.pattern && p !== sub && p.state !== "ended" && matches(p.topic, m.topic)) p._msg(m);
        }
        return;
      case "welcome":
        return this._welcome(m);
      case "drain":
        this._drainDelay = m.reconnect_in_ms;
        return;
      case "join":
      case "leave":
        if (sub) sub._emit(m.op, { user: m.user, topic: m.topic });
        return;
      case "lost": {
        // drop_oldest namespaces: messages from..to of the topic were
        // dropped for this slow connection (docs/PROTOCOL.md, v1.2).
        const lost = { topic: m.topic, from: m.from, to: m.to };
        if (sub && sub.state !== "ended") sub._emit("lost", lost);
        for (const p of this._subs.values()) {
          if (p.pattern && p !== sub && p.state !== "ended" && matches(p.topic, m.topic)) p._emit("lost", lost);
        }
        return;
      }
    }
    if (m.id !== undefined) return this._reply(m);
    if (m.op === "error") {
      const err = new RingcastError(m.code, m.reason, m.topic);
      // An error with a topic and no id: the server ended that subscription.
      if (sub) this._end(sub, err);
      else this._emit("error", err);
    }
  }

  _welcome(m) {
    this._clear("connect");
    this.state = "connected";
    this.attempt = 0;
    this.heartbeat = m.heartbeat;
    this._armHeartbeat();
    this._scheduleRefresh();
    // The server's rate limit starts afresh with each connection; so does ours.
    const o = this.options;
    this._bucket = { frames: o.sendBurst, bytes: o.sendBytesBurst, at: this._clock.now() };
    // Requests that waited, the subscriptions in their order, then the publishes.
    for (const sub of this._subs.values()) if (sub.state !== "ended") this._queueSub(sub);
    this._pump();
    this._emit("connected", { conn: m.conn, node: m.node, heartbeat: m.heartbeat });
  }

  _reply(m) {
    const p = this._pending.get(m.id);
    if (!p) return;
    this._pending.delete(m.id);
    this._clock.clearTimeout(p.timer);
    if (p.sub) return this._subReply(p.sub, m);
    if (m.op === "error") p.reject(new RingcastError(m.code, m.reason, m.topic));
    else p.resolve(p.kind === "pub" ? m.mid : m);
  }

  _subReply(sub, m) {
    if (this._subs.get(sub.topic) !== sub) return; // unsubscribed meanwhile
    if (m.op !== "error") return sub._ok(m);
    const err = new RingcastError(m.code, m.reason, sub.topic);
    if (m.code === 4503 || m.code === 4008) {
      // Not subscribed: try again later with backoff.
      sub.state = "pending";
      err.willRetry = true;
      sub._emit("error", err);
      const delay = this.options.minReconnectDelay + backoff(sub._retries++, this.options.minReconnectDelay, this.options.maxReconnectDelay, this._random);
      sub._retryTimer = this._clock.setTimeout(() => {
        sub._retryTimer = undefined;
        if (this.state === "connected" && sub.state === "pending" && this._subs.get(sub.topic) === sub) this._queueSub(sub);
      }, delay);
    } else {
      this._end(sub, err);
    }
  }

  _end(sub, err) {
    sub.state = "ended";
    this._subs.delete(sub.topic);
    this._clock.clearTimeout(sub._retryTimer);
    sub._emit("error", err);
  }

  _unsubscribe(sub) {
    if (this._subs.get(sub.topic) !== sub) return;
    const wasSent = sub.state === "subscribing" || sub.state === "subscribed";
    this._subs.delete(sub.topic);
    sub.state = "ended";
    this._clock.clearTimeout(sub._retryTimer);
    this._outbox = this._outbox.filter((it) => it.sub !== sub);
    if (wasSent && this.state === "connected") {
      this._outbox.push({ frame: { op: "unsub", topic: sub.topic } });
      this._pump();
    }
  }

  _queueSub(sub) {
    sub.state = "subscribing";
    this._outbox.push({ sub });
    this._pump();
  }

  // A request other than pub/sub: sent when connected, rejected on a drop.
  _request(frame, now) {
    return new Promise((resolve, reject) => {
      if (this.state === "closed") return reject(new RingcastError("closed", "client closed"));
      const item = { frame, resolve, reject };
      item.timer = this._clock.setTimeout(() => {
        this._outbox = this._outbox.filter((it) => it !== item);
        this._pending.delete(item.id);
        reject(new RingcastError("timeout", `no answer to ${frame.op} in ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      if (now && this.state === "connected") this._sendItem(item);
      else {
        this._outbox.push(item);
        this._pump();
      }
    });
  }

  // Sends what waits, within the send budget (the server's inbound limit).
  _pump() {
    this._clear("pump");
    if (this.state !== "connected") return;
    for (;;) {
      const item = this._outbox[0] || this._queue[0];
      if (!item) return;
      const wait = this._take(item);
      if (wait > 0) return this._set("pump", wait, () => this._pump());
      if (this._outbox[0] === item) this._outbox.shift();
      else {
        this._queue.shift();
        item.frame = { op: "pub", topic: item.topic, data: item.data };
        if (item.key !== undefined) item.frame.key = item.key;
        item.kind = "pub";
        item.timer = this._clock.setTimeout(() => {
          this._pending.delete(item.id);
          item.reject(new RingcastError("outcome_unknown", `publish outcome unknown: no answer in ${this.options.requestTimeout} ms`, item.topic));
        }, this.options.requestTimeout);
      }
      this._sendItem(item);
    }
  }

  _sendItem(item) {
    const id = this._nextId++;
    const frame = item.sub ? item.sub._frame(id) : item.frame;
    if (item.resolve || item.sub) {
      frame.id = item.id = id;
      this._pending.set(id, item);
    }
    this._raw(frame);
  }

  // Token bucket over frames and bytes; returns ms to wait, or 0 after taking.
  _take(item) {
    const o = this.options;
    const b = this._bucket;
    const now = this._clock.now();
    const dt = (now - b.at) / 1000;
    b.at = now;
    b.frames = Math.min(o.sendBurst, b.frames + dt * o.sendRate);
    b.bytes = Math.min(o.sendBytesBurst, b.bytes + dt * o.sendBytesRate);
    const size = item.sub ? 64 : JSON.stringify(item.frame || item.data).length + 64;
    const need = Math.min(size, o.sendBytesBurst);
    if (b.frames >= 1 && b.bytes >= need) {
      b.frames -= 1;
      b.bytes -= size;
      return 0;
    }
    return Math.max(1, Math.ceil(Math.max((1 - b.frames) / o.sendRate, (need - b.bytes) / o.sendBytesRate) * 1000));
  }

  _raw(frame) {
    const ws = this._ws;
    if (ws && ws.readyState === 1) ws.send(JSON.stringify(frame));
  }

  // ---- heartbeat, token refresh, timers ---------------------------------

  // After `heartbeat` s without a frame send the `ping` op; a ping with
  // nothing back for another heartbeat means a dead link.
  _armHeartbeat() {
    const hb = (this.heartbeat || 25) * 1000;
    const now = this._clock.now();
    let due;
    if (this._pingAt !== undefined) {
      if (now - this._pingAt >= hb) return this._abort(4000, "no answer to ping: dead link");
      due = this._pingAt + hb;
    } else if (now - this._lastRx >= hb) {
      this._probe();
      due = now + hb;
    } else {
      due = this._lastRx + hb;
    }
    this._set("heartbeat", due - now, () => this._armHeartbeat());
  }

  _probe() {
    if (this.state !== "connected" || this._pingAt !== undefined) return;
    this._pingAt = this._clock.now();
    this._raw({ op: "ping" });
  }

  _scheduleRefresh() {
    this._clear("refresh");
    const exp = this._token && this.options.getToken && tokenExpiry(this._token);
    if (!exp) return;
    // At `tokenRefreshMargin` before `exp`, or half way for short tokens;
    // never sooner than a second (a clock ahead of the server's must not
    // turn this into a loop).
    const left = exp * 1000 - this._clock.now();
    const delay = Math.max(1000, left - Math.min(this.options.tokenRefreshMargin, left / 2));
    this._set("refresh", delay, () => this._refreshNow(exp));
  }

  _refreshNow(exp) {
    this.refreshToken().catch((e) => {
      this._emit("error", e);
      // Refused or failed: try again before the server's 4001 at `exp`.
      const left = exp * 1000 - this._clock.now();
      if (left > 1000 && this.state === "connected") this._set("refresh", left / 2, () => this._refreshNow(exp));
    });
  }

  _set(name, ms, fn) {
    this._clear(name);
    this._timers[name] = this._clock.setTimeout(() => {
      this._timers[name] = undefined;
      fn();
    }, ms);
  }

  _clear(name) {
    if (this._timers[name] !== undefined) this._clock.clearTimeout(this._timers[name]);
    this._timers[name] = undefined;
  }

  // ---- losing the link ----------------------------------------------------

  // Our side gives up on the socket (timeout, dead link, offline).
  _abort(code, reason) {
    const ws = this._ws;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    this._lost(1006, reason);
  }

  // The socket is gone: settle what was in flight, then apply the close-code table.
  _lost(code, reason = "") {
    if (this.state === "closed" || this.state === "disconnected") return;
    const ws = this._ws;
    if (ws) ws.onclose = ws.onmessage = ws.onopen = null;
    this._ws = undefined;
    for (const name of ["connect", "heartbeat", "refresh", "pump"]) this._clear(name);
    this._settle(code, reason);
    const o = this.options;
    const jitter = () => backoff(this.attempt++, o.minReconnectDelay, o.maxReconnectDelay, this._random);
    let delay;
    if (code === 1000 || code === 4003 || (code === 4001 && !o.getToken)) {
      return this._shutdown(code, reason);
    } else if (code === 1001 && this._drainDelay !== undefined) {
      delay = this._drainDelay;
    } else if (code === 4009 && this._clock.now() - this._last4009 > o.maxReconnectDelay) {
      this._last4009 = this._clock.now();
      delay = 0;
    } else if (code === 4008) {
      delay = o.rateLimitedDelay + jitter();
    } else {
      delay = jitter();
    }
    if (code === 4001) this._emit("error", new RingcastError(4001, reason));
    this.state = "disconnected";
    this._emit("disconnected", { code, reason, delay });
    this._set("reconnect", delay, () => this._open());
  }

  // Rejects what can no longer be answered; subscriptions wait to resubscribe.
  _settle(code, reason) {
    // Keyed publishes in flight are safe to send again (the server answers
    // a repeat with the first mid): ahead of the never-sent ones, in order.
    const again = [];
    for (const [id, p] of this._pending) {
      this._clock.clearTimeout(p.timer);
      if (p.sub) continue;
      if (p.kind === "pub" && p.key !== undefined) {
        again.push(p);
        this._pending.delete(id);
        continue;
      }
      const what = p.kind === "pub" ? `publish outcome unknown: the connection closed (${code}) before the server answered` : `connection closed (${code}) before the ${p.frame.op} was answered`;
      p.reject(new RingcastError(p.kind === "pub" ? "outcome_unknown" : "disconnected", what, p.topic));
      this._pending.delete(id);
    }
    this._pending.clear();
    this._queue.unshift(...again);
    // Requests never sent wait for the next connection (or their timeout).
    this._outbox = this._outbox.filter((it) => it.resolve);
    for (const sub of this._subs.values()) {
      sub.state = "pending";
      this._clock.clearTimeout(sub._retryTimer);
    }
  }

  _shutdown(code, reason) {
    if (this.state === "closed") return;
    this._gen++; // an _open() waiting for getToken stops there
    const ws = this._ws;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    this._ws = undefined;
    for (const name of Object.keys(this._timers)) this._clear(name);
    this._settle(code, reason);
    for (const it of this._outbox) {
      this._clock.clearTimeout(it.timer);
      it.reject(new RingcastError("closed", `client closed before the ${it.frame.op} was sent`));
    }
    this._outbox = [];
    for (const q of this._queue) q.reject(new RingcastError("closed", `client closed (${code}${reason ? ": " + reason : ""}) before the publish was sent`, q.topic));
    this._queue = [];
    this.state = "closed";
    if (code !== 1000) this._emit("error", new RingcastError(code, reason || "connection closed"));
    this._emit("closed", { code, reason });
  }

  // ---- browser: online/offline, visibility ---------------------------------

  _listen(g) {
    if (!g || typeof g.addEventListener !== "function") return;
    const wake = () => {
      if (this.state === "disconnected") {
        this.attempt = 0;
        this.connect();
      } else if (this.state === "connected") this._probe();
    };
    g.addEventListener("online", wake);
    g.addEventListener("offline", () => {
      if (this.state === "connected" || this.state === "connecting") this._abort(4000, "browser offline");
    });
    const doc = g.document;
    if (doc && typeof doc.addEventListener === "function") {
      doc.addEventListener("visibilitychange", () => doc.visibilityState === "visible" && wake());
    }
  }
}
