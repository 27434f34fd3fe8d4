// Type declarations of ringcast-client (src/index.js). The wire protocol is
// docs/PROTOCOL.md in the ringcast repository.

/** A WebSocket constructor: the browser's, Node 22's global, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Timers the client uses; tests pass a fake one. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface RingcastOptions {
  /** A JWT sent in the first `auth` frame. Without it (and without getToken) the connection is anonymous. */
  token?: string;
  /** Called before each connect, after a 4001 close and before the token's `exp` (then sent in an `auth` frame). */
  getToken?: () => string | Promise<string>;
  /** The WebSocket constructor; default: the global one (browsers, Node 22+). On Node 20 pass the `ws` package's. */
  WebSocket?: WebSocketConstructor;
  /** First reconnect delay bound, ms; each failure doubles it (full jitter). Default 500. */
  minReconnectDelay?: number;
  /** Upper bound of the reconnect delay, ms. Default 20000. */
  maxReconnectDelay?: number;
  /** Extra delay after a close 4008 (rate limited), ms. Default 10000. */
  rateLimitedDelay?: number;
  /** Publishes that may wait for a connection; past it publish() rejects with code "queue_full". Default 100. */
  maxQueuedPublishes?: number;
  /** Time from opening the socket to `welcome`, ms. Default 10000. */
  connectTimeout?: number;
  /** Time a publish, presence, ping or auth request waits for its answer, ms. Default 10000. */
  requestTimeout?: number;
  /** Refresh the token this long before `exp` (or half way for shorter tokens), ms. Default 30000. */
  tokenRefreshMargin?: number;
  /** Frames sent at once before pacing; keep under the server's --inbound-burst. Default 100. */
  sendBurst?: number;
  /** Frames per second once the burst is spent; keep under --inbound-rate. Default 50. */
  sendRate?: number;
  /** Bytes sent at once before pacing; keep under --inbound-bytes-burst. Default 131072. */
  sendBytesBurst?: number;
  /** Bytes per second once that burst is spent; keep under --inbound-bytes-rate. Default 32768. */
  sendBytesRate?: number;
  /** For tests: the clock. Default: Date.now and the global timers. */
  clock?: Clock;
  /** For tests: the random source of the jitter. Default Math.random. */
  random?: () => number;
  /** For tests: where `online`, `offline` and `document.visibilitychange` come from. Default globalThis. */
  globals?: unknown;
}

export type ConnectionState = "idle" | "connecting" | "connected" | "disconnected" | "closed";

/** An error of the server (numeric code: 4001, 4403, 4503, ...) or of the client (string code). */
export class RingcastError extends Error {
  readonly code: number | "outcome_unknown" | "queue_full" | "closed" | "disconnected" | "timeout" | "already_subscribed" | "bad_frame";
  /** The topic the error is about, when there is one. */
  readonly topic?: string;
  /** On a subscription error: true when the client subscribes again later (4503, 4008). */
  readonly willRetry?: boolean;
}

export interface ClientEvents {
  connecting: { attempt: number };
  connected: { conn: string; node: string; heartbeat: number };
  /** The link is gone; the client reconnects after `delay` ms. `code` is undefined when no socket was opened. */
  disconnected: { code: number | undefined; reason: string; delay: number };
  /** Stopped for good: close() (1000), 4003, or 4001 without getToken. */
  closed: { code: number | undefined; reason: string };
  error: Error | RingcastError;
}

/** Options of `publish` (protocol v1.2). */
export interface PublishOptions {
  /**
   * Idempotency key, 1 to 128 bytes: the server delivers a publish with the
   * same topic and key within its `--idempotency-window` once and answers
   * every repeat with the first `mid`; a keyed publish in flight when the
   * connection drops is sent again after the reconnect, not rejected as
   * "outcome_unknown".
   */
  key?: string;
}

export interface SubscribedInfo {
  epoch: string;
  /** The position the subscription became live at (docs/PROTOCOL.md: `last`). */
  last: string;
  /** Present when the subscription was made with `since`. */
  recovered?: boolean;
}

export interface SubscriptionEvents {
  subscribed: SubscribedInfo;
  /** Everything after `since` was replayed. */
  recovered: SubscribedInfo;
  /** Nothing was replayed (history lost or too old): refetch the state from your backend. */
  unrecovered: SubscribedInfo;
  /** A refusal or an end by the server; `willRetry` tells whether the client tries again. */
  error: RingcastError;
  /** Presence namespaces: a user's first connection subscribed, or its last one left (never your own user). */
  join: { topic: string; user: string };
  leave: { topic: string; user: string };
  /** `slow_consumer = "drop_oldest"` namespaces: the server dropped this topic's messages `from`..`to` (ids) for this slow connection; fetch them from your backend, or resubscribe with `since` just before `from` while they are retained. */
  lost: { topic: string; from: string; to: string };
}

export interface MessageMeta {
  /** The message id, `MS-SEQ`. */
  id: string;
  topic: string;
  /** Present when the producer's Redis entry had one. */
  event?: string;
}

export interface Position {
  since: string | undefined;
  epoch: string | undefined;
}

export interface SubscribeOptions {
  /** Recover from here: a message id or the `last` of an earlier subscription. */
  since?: string;
  /** The epoch `since` belongs to. */
  epoch?: string;
}

export type MessageHandler<T = unknown> = (data: T, meta: MessageMeta) => void;

export class Subscription<T = unknown> {
  /** The topic, or a topic pattern (`user.42.*`, `chat:#`): then each message's `meta.topic` is its own topic. */
  readonly topic: string;
  /** Whether `topic` is a pattern: it has no position, and a resubscribe after a reconnect emits "unrecovered". */
  readonly pattern: boolean;
  readonly state: "pending" | "subscribing" | "subscribed" | "ended";
  /** Where to resume from: store it and pass it to subscribe() to recover after a page reload. */
  readonly position: Position;
  on<E extends keyof SubscriptionEvents>(event: E, fn: (arg: SubscriptionEvents[E]) => void): () => void;
  off<E extends keyof SubscriptionEvents>(event: E, fn: (arg: SubscriptionEvents[E]) => void): void;
  unsubscribe(): void;
}

export interface PresenceInfo {
  topic: string;
  users: string[];
  count: number;
  truncated: boolean;
}

export class Ringcast {
  constructor(url: string, options?: RingcastOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** Failed connects since the last `welcome`. */
  readonly attempt: number;
  /** The server's heartbeat in seconds, from `welcome`. */
  readonly heartbeat: number | undefined;
  on<E extends keyof ClientEvents>(event: E, fn: (arg: ClientEvents[E]) => void): () => void;
  off<E extends keyof ClientEvents>(event: E, fn: (arg: ClientEvents[E]) => void): void;
  /** Throws a RingcastError "already_subscribed" when the topic is subscribed. */
  subscribe<T = unknown>(topic: string, fn: MessageHandler<T>, options?: SubscribeOptions): Subscription<T>;
  /** Resolves with the new message's id (`mid`); rejects with the server's error, "queue_full", "outcome_unknown" or "closed". */
  publish(topic: string, data: unknown, options?: PublishOptions): Promise<string>;
  /** Who is subscribed to `topic` on every node (namespaces with presence); rejects with the server's error (4403, 4004, 4503). */
  presence(topic: string): Promise<PresenceInfo>;
  /** The `ping` op; resolves on `pong`. */
  ping(): Promise<void>;
  /** Calls getToken now and sends the token in an `auth` frame. */
  refreshToken(): Promise<void>;
  /** Connects now: after close(), or to skip a reconnect wait. */
  connect(): void;
  /** Stops for good (until connect()): the socket closes with 1000 and waiting publishes reject. */
  close(): void;
}

/** Compares two `MS-SEQ` message ids. */
export function compareIds(a: string, b: string): number;
/** Whether `topic` matches the topic pattern `pattern` as the server applies it (same namespace; `*` one segment, `#` one or more). */
export function matches(pattern: string, topic: string): boolean;
/** `exp` of a JWT in seconds, read without verifying it. */
export function tokenExpiry(token: string): number | undefined;
/** Full-jitter backoff: random in [0, min(max, min * 2^attempt)). */
export function backoff(attempt: number, min: number, max: number, random?: () => number): number;
