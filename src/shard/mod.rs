//! A shard: one thread, one monoio runtime (io_uring, or epoll where
//! io_uring is unavailable), one SO_REUSEPORT listener. It owns its
//! connections and its topic index; no other thread touches them. Other
//! threads reach it only through its inbox ([`crate::bus`]).
//!
//! The shard drives its connections one way: a connection (`conn.rs`) is a
//! record the shard's code reads and writes, never a caller of the shard.
//! Following one connection:
//!
//! - `runtime.rs`: the thread, and the loops that call everything else:
//!   accept, readiness (the data ring's completions or the epoll set's
//!   events, no task per connection),
//!   the sweep, and the inbox;
//! - `caps.rs`: the connection caps, counted from accept;
//! - `upgrade.rs`: the HTTP upgrade, checked in docs/PROTOCOL.md order;
//! - `input.rs`: reads and frame decoding, the close handshake, the end;
//! - `rate.rs`: the inbound token buckets and the 4008 policy;
//! - `ops.rs`: one branch per client op, and the token rules;
//! - `topics.rs`: the topic index and its announcement to the broker side;
//! - `patterns.rs`: wildcard subscriptions: a segment trie of the shard's
//!   patterns, and each message's recipients counted once;
//! - `inbox.rs`: what other threads send (deliveries, broker answers);
//! - `sweep.rs`: deadlines, heartbeats and the drain;
//! - `io.rs`: how sockets are watched and written: the shard's data ring
//!   (io_uring: one multishot poll per connection, a round's sends in one
//!   submission) or, as the fallback, an epoll set and plain calls;
//! - `queue.rs`: one connection's outbound queue, and the namespace's
//!   `slow_consumer` policy when it is full (close, conflate, drop_oldest);
//! - this file: the `Shard` itself and its outbound queues: every frame a
//!   connection gets is queued here, within the connection's bound, and
//!   written by `Shard::flush_dirty` with one vectored write each.

mod caps;
mod conn;
mod inbox;
mod input;
mod io;
mod ops;
mod patterns;
pub mod queue;
mod rate;
mod registry;
mod runtime;
mod sweep;
mod topics;
mod upgrade;

#[cfg(test)]
mod tests;

/// The wildcard trie, public only for `benches/patterns.rs`.
#[doc(hidden)]
pub use patterns::PatternTrie;
pub use runtime::{spawn, ShardFailure};
#[cfg(debug_assertions)]
pub use runtime::{
    DEBUG_FAIL_SHARD_ENV, DEBUG_PANIC_AFTER, DEBUG_PANIC_SHARD_ENV, DEBUG_STALL_FOR,
    DEBUG_STALL_SHARD_ENV,
};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::broker::Broker;
use crate::bus::Inbox;
use crate::config::Config;
use crate::id::{ConnId, ShardId};
use crate::metrics::{ShardMetrics, Undelivered};
use crate::protocol::Close;
use crate::topic::TopicName;
use conn::{Conn, Phase};
use topics::Local;

/// Bytes read from a socket per `recv`, into the shard's one scratch buffer.
pub const SCRATCH_SIZE: usize = 64 << 10;

/// What a shard thread needs to start.
#[derive(Debug)]
pub struct ShardSetup {
    /// Shard number, 0-based.
    pub id: ShardId,
    /// Validated settings.
    pub config: Arc<Config>,
    /// Where publishes and subscribes go.
    pub broker: Arc<dyn Broker>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// This shard's inbox.
    pub inbox: Inbox,
    /// This shard's listener (SO_REUSEPORT, non-blocking).
    pub listener: std::net::TcpListener,
    /// Token verification; `None` when anonymous clients are allowed everything.
    pub auth: Option<Arc<crate::auth::Verifier>>,
    /// Connections of the whole node, from accept to close (every shard
    /// counts here).
    pub node_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Policy per namespace, validated from `config.namespaces`.
    pub namespaces: crate::namespace::Namespaces,
    /// The node's presence, when some namespace has it on.
    pub presence: Option<Arc<crate::presence::Presence>>,
}

/// Shard-local state, shared by the shard's tasks through `Rc`.
pub(crate) struct Shard {
    pub(crate) id: ShardId,
    pub(crate) config: Arc<Config>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Token verification; `None`: anonymous clients may do everything.
    pub(crate) auth: Option<Arc<crate::auth::Verifier>>,
    /// The grants (patterns) of this shard's verified tokens, shared by
    /// every connection whose token carries the same ones.
    pub(crate) grants: crate::auth::GrantsCache,
    /// The identity every anonymous client shares.
    pub(crate) anonymous: Rc<crate::auth::Identity>,
    /// The identity of clients without a token in anonymous namespaces.
    pub(crate) guest: Rc<crate::auth::Identity>,
    /// Policy per namespace.
    pub(crate) namespaces: crate::namespace::Namespaces,
    /// The node's presence, when some namespace has it on.
    pub(crate) presence: Option<Arc<crate::presence::Presence>>,
    /// Connections of the whole node, from accept to close.
    node_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections of this shard, from accept to close (upgrade requests
    /// still being sent included).
    shard_connections: Cell<usize>,
    /// Connections per client address on this shard, from accept to close.
    per_ip: RefCell<HashMap<std::net::IpAddr, u32>>,
    /// This shard's share of `max_connections_per_ip`.
    per_ip_limit: u32,
    /// Upgrade budget per client address: (tokens, last refill ms).
    handshakes: RefCell<HashMap<std::net::IpAddr, (f32, u64)>>,
    /// Clients over an inbound rate limit in the last second: when their
    /// run of refused frames began (`rate.rs`). Nobody else has an entry.
    refusing: RefCell<rate::Runs>,
    pub(crate) conns: RefCell<registry::Registry>,
    /// The topic index: every topic with a live or pending subscription here.
    pub(crate) topics: RefCell<HashMap<TopicName, Local>>,
    /// The wildcard subscriptions: their trie and subscribers (`patterns.rs`).
    pub(crate) wild: RefCell<patterns::Wildcards>,
    /// Deliveries that went through a wildcard match, for [`Conn::seen`].
    stamp: Cell<u64>,
    /// Connections with frames queued since the last flush.
    dirty: RefCell<Vec<Rc<Conn>>>,
    /// Readiness and writes of every connection of this shard: the data
    /// ring or an epoll set (`io.rs`).
    pub(crate) io: io::Io,
    /// The one read buffer every connection of this shard reads into.
    pub(crate) scratch: RefCell<Vec<u8>>,
    next_conn: Cell<u64>,
    /// Sweeps done: which connections the next one pings.
    sweeps: Cell<u64>,
    started: Instant,
    now_ms: Cell<u64>,
    draining: Cell<bool>,
    listener_fd: Cell<RawFd>,
    /// Pre-encoded ping frame, shared by every connection.
    ping: Bytes,
    /// permessage-deflate: one compressor and one inflater for every
    /// connection of the shard, reset per message.
    deflater: RefCell<crate::ws::deflate::Deflater>,
    inflater: RefCell<crate::ws::deflate::Inflater>,
    /// [`Shard::flush_dirty`] left work that no readiness will show
    /// ([`Shard::io_left`]); the poll loop, woken through `io_waker`,
    /// goes on with it.
    io_more: Cell<bool>,
    io_waker: Cell<Option<std::task::Waker>>,
    /// Set by a task that cannot go on; the shard loop then ends and the
    /// shard thread returns it to its supervisor.
    failure: RefCell<Option<ShardFailure>>,
    /// The shard loop, waiting for [`Shard::failed`].
    failure_waker: RefCell<Option<std::task::Waker>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Whether the drain has started (new upgrades get 503).
    /// Whether `ip` is a trusted proxy (`--trusted-proxies`), whose PROXY
    /// header or `X-Forwarded-For` names the client.
    pub(crate) fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.config.trusted_proxies.iter().any(|r| r.contains(ip))
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Milliseconds since the shard started, as of the last tick.
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    /// Refreshes the coarse clock.
    pub(crate) fn tick(&self) {
        self.now_ms.set(self.started.elapsed().as_millis() as u64);
    }

    /// The `conn` string sent in `welcome`.
    pub(crate) fn conn_name(&self, id: ConnId) -> String {
        format!("c-{}-{}", self.id, id.0)
    }

    pub(super) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Queues a `msg` frame: counted as delivered, or as dropped with its reason.
    pub(crate) fn queue_msg(&self, conn: &Rc<Conn>, frame: Bytes) {
        if conn.phase() != Phase::Open {
            self.metrics.dropped(Undelivered::ConnectionClosed);
        } else if self.try_queue(conn, frame) {
            self.metrics
                .messages_delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.metrics.dropped(Undelivered::SlowConsumer);
        }
    }

    /// [`Shard::queue_msg`] for a delivery loop that holds the topic
    /// index, under the topic's `slow_consumer` policy (`tag`; `None`:
    /// `close`). What the policy drops is counted under its reason; a
    /// subscriber past its bound that the policy cannot help is counted
    /// here and left for the caller to [`Shard::overflow`] once the index
    /// is released. Returns false for such a subscriber.
    pub(super) fn queue_msg_or_defer(
        &self,
        conn: &Rc<Conn>,
        frame: &Bytes,
        tag: Option<&Rc<queue::Tag>>,
        id: crate::id::MsgId,
    ) -> bool {
        use queue::Pushed;
        if conn.phase() != Phase::Open {
            self.metrics.dropped(Undelivered::ConnectionClosed);
            return true;
        }
        let (pushed, dirty) = conn.push_msg(frame.clone(), tag, id, self.config.outbound_queue);
        if dirty {
            self.dirty.borrow_mut().push(conn.clone());
        }
        match pushed {
            Pushed::Full => {
                self.metrics.dropped(Undelivered::SlowConsumer);
                return false;
            }
            Pushed::Queued => {}
            Pushed::Conflated => self.metrics.dropped(Undelivered::Conflated),
            Pushed::DroppedOldest(n) => self
                .metrics
                .dropped_n(Undelivered::DroppedOldest, u64::from(n)),
        }
        self.metrics
            .messages_delivered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Whether `frame` fits the connection's `outbound_queue` bound.
    fn fits(&self, conn: &Conn, frame: &Bytes) -> bool {
        conn.queued_bytes() + frame.len() <= self.config.outbound_queue
    }

    /// A connection went past its queue bound: the client is not reading.
    /// What is unsent is dropped (counted) and it is closed with 4009.
    pub(super) fn overflow(&self, conn: &Rc<Conn>) {
        if conn.phase() == Phase::Open {
            let discarded = conn.discard_unsent();
            self.metrics
                .dropped_n(Undelivered::ConnectionClosed, discarded);
            self.close(conn, Close::SlowConsumer);
        }
    }

    /// Queues a frame (a message, reply or pong) within the connection's
    /// `outbound_queue` bound and marks it for the next flush; past the
    /// bound, [`Shard::overflow`]. Returns whether it was queued.
    pub(crate) fn try_queue(&self, conn: &Rc<Conn>, frame: Bytes) -> bool {
        if !self.fits(conn, &frame) {
            self.overflow(conn);
            return false;
        }
        self.queue_unbounded(conn, frame);
        true
    }

    /// [`Shard::try_queue`] for replies and control frames.
    pub(crate) fn queue(&self, conn: &Rc<Conn>, frame: Bytes) {
        let _ = self.try_queue(conn, frame);
    }

    /// Queues a frame whatever the bound: close frames and HTTP responses,
    /// which are small and end the connection.
    pub(crate) fn queue_unbounded(&self, conn: &Rc<Conn>, frame: Bytes) {
        if conn.push(frame) {
            self.dirty.borrow_mut().push(conn.clone());
        }
    }

    /// Writes every dirty connection's queue, one vectored write each (on
    /// the data ring: one send each, all submitted together). On the ring,
    /// what the submission completed at once (most sends: the socket had
    /// room) is handled right after it, so those connections take their
    /// next frames at once instead of after another wake-up; a few rounds
    /// at most, then the readiness loop takes over.
    pub(crate) fn flush_dirty(self: &Rc<Self>) {
        self.flush_rounds(io::RING_ROUNDS);
    }

    /// [`Shard::flush_dirty`] with at most `rounds` rounds of
    /// submit-then-reap on the ring (a test leaves work with one).
    pub(super) fn flush_rounds(self: &Rc<Self>, rounds: usize) {
        for _ in 0..rounds {
            let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
            for conn in dirty {
                self.flush(&conn);
            }
            self.submit();
            if self.reap() == 0 {
                break;
            }
        }
        if self.io_left() {
            // The poll loop goes on with it after the other tasks' turn;
            // waiting for readiness, it would sleep until the next event
            // (up to the sweep, a second later).
            self.io_more.set(true);
            if let Some(w) = self.io_waker.take() {
                w.wake();
            }
        }
    }

    /// Starts a server-initiated close: the close frame goes after what is
    /// queued, and the socket is shut when the client answers or at the close timeout.
    pub(crate) fn close(&self, conn: &Rc<Conn>, why: Close) {
        if matches!(conn.phase(), Phase::Closing | Phase::Closed) {
            return;
        }
        self.metrics.disconnect(why.metric());
        conn.set_closing(self.now_ms(), self.config.close_timeout);
        self.queue_unbounded(conn, crate::ws::frame::encode_close(why.code(), why.text()));
    }
}
