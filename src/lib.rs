//! ringcast: a real-time notification server. Producers publish to a broker
//! (embedded, or Redis Streams); ringcast delivers each message over
//! WebSocket, in order, to every subscriber of its topic, and lets a client
//! that reconnects recover what it missed.
//!
//! Architecture map, in the order a message travels:
//!
//! - [`id`]: the shared words: message ids, recovery positions, epochs,
//!   shard and connection numbers, where an answer goes.
//! - [`config`] / [`cli`]: settings from defaults < TOML file < environment < flags,
//!   validated once; the server only ever sees a valid [`config::Config`].
//! - [`server`]: binds the listeners, starts the shards, the admin endpoint and
//!   the signal watcher, and runs the graceful drain.
//! - [`shard`]: one thread, one monoio runtime, one SO_REUSEPORT listener. A
//!   shard owns its connections (handshake, frame decoding, client ops, the
//!   outbound queue and its vectored writes) and its topic index; nothing
//!   else touches them.
//! - [`ws`]: RFC 6455 with no IO: upgrade parsing and the frame codec.
//! - [`protocol`]: the `ringcast.v1` JSON ops and server frames.
//! - [`topic`]: topic names and their validation; [`namespace`]: policy per topic family.
//! - [`broker`]: the seam between publishing and delivery; [`broker::memory`]
//!   is the embedded, single-node broker with per-topic history.
//! - [`presence`]: who is subscribed to presence topics, counted per shard,
//!   then per node, then (with Redis) across nodes; `join`/`leave`.
//! - [`bus`]: the cross-shard hand-off: a bounded inbox per shard plus a waker.
//! - [`metrics`]: shard-local counters summed at scrape time, Prometheus text.
//! - [`admin`]: the admin HTTP endpoint on a thread of its own (`/metrics`,
//!   `/healthz`, `/readyz`, `/stats`, `POST /publish`).
//! - [`auth`]: JWT verification and topic patterns.
//! - [`client`]: a blocking Rust client with reconnect and recovery.
//! - [`load`]: the load generator behind `ringcast load`.
//! - [`doctor`]: `ringcast doctor`, which checks a host's limits and
//!   sysctls for N connections (reads `/proc` and `/sys` only).
//!
//! Dependencies point one way: `ws` knows nothing of topics, `topic` nothing
//! of sockets; `shard` glues them, and drives each connection one way.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod doctor;
pub mod id;
pub mod load;
pub mod metrics;
pub mod namespace;
pub mod presence;
pub mod protocol;
pub mod ring;
pub mod server;
pub mod shard;
pub mod sys;
pub mod topic;
pub mod ws;
