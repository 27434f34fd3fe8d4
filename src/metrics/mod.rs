//! Metrics: one [`ShardMetrics`] per shard, written only by its shard (and by
//! senders into its inbox), and one [`BrokerMetrics`] written by the broker's
//! threads. Writes are relaxed atomics on shard-local cache lines, so counting
//! costs no lock and no contention on the delivery path; no `prometheus` type
//! is touched on a shard thread. At scrape time a [`prometheus`] collector
//! (`expose.rs`) reads them all and the crate's encoder writes the text
//! format. Labels are bounded (`shard`, `partition`, `reason`, `status`,
//! `source`), never a topic, user or peer.
//!
//! - `histogram.rs`: the publish-to-deliver histogram, fixed buckets of atomics;
//! - [`names`]: every metric's name, help and labels;
//! - `expose.rs`: the collector and the text.

mod expose;
mod histogram;
pub mod names;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use expose::{render, scrape};
pub use histogram::{LatencyHistogram, Snapshot, BOUNDS_US, MAX_OBSERVATION_US};

/// Why a message was not delivered. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undelivered {
    /// The subscriber's outbound queue was over its bound (it is closed 4009).
    SlowConsumer,
    /// Frames still queued when a connection closed.
    ConnectionClosed,
    /// A shard's inbox was full.
    ShardInboxFull,
    /// The shard had already exited.
    ShardGone,
    /// A replay that would not fit the subscriber's outbound queue: none of
    /// it is sent, the `sub` is answered `recovered:false`.
    ReplayTooLarge,
    /// Replaced in a subscriber's queue by its topic's newer message
    /// (`slow_consumer = "conflate"`).
    Conflated,
    /// Dropped from a full queue to make room for newer messages
    /// (`slow_consumer = "drop_oldest"`); the subscriber is told (`lost`).
    DroppedOldest,
}

impl Undelivered {
    pub(crate) const ALL: [Undelivered; 7] = [
        Undelivered::SlowConsumer,
        Undelivered::ConnectionClosed,
        Undelivered::ShardInboxFull,
        Undelivered::ShardGone,
        Undelivered::ReplayTooLarge,
        Undelivered::Conflated,
        Undelivered::DroppedOldest,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Undelivered::SlowConsumer => "slow_consumer",
            Undelivered::ConnectionClosed => "connection_closed",
            Undelivered::ShardInboxFull => "shard_inbox_full",
            Undelivered::ShardGone => "shard_gone",
            Undelivered::ReplayTooLarge => "replay_too_large",
            Undelivered::Conflated => "conflated",
            Undelivered::DroppedOldest => "dropped_oldest",
        }
    }
}

/// Why the server ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client closed (close frame or EOF).
    Client,
    /// The outbound queue overflowed (4009).
    Slow,
    /// No frame for 2 x heartbeat.
    Heartbeat,
    /// A protocol violation (1002, 1007, 1009).
    Protocol,
    /// The graceful drain (1001).
    Drain,
    /// The handshake failed or timed out.
    Handshake,
    /// A socket error.
    Io,
    /// Not authenticated, token expired or refused (4001, 4003).
    Auth,
    /// Over the inbound rate for too long (4008).
    RateLimited,
}

impl Disconnect {
    pub(crate) const ALL: [Disconnect; 9] = [
        Disconnect::Client,
        Disconnect::Slow,
        Disconnect::Heartbeat,
        Disconnect::Protocol,
        Disconnect::Drain,
        Disconnect::Handshake,
        Disconnect::Io,
        Disconnect::Auth,
        Disconnect::RateLimited,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Disconnect::Client => "client",
            Disconnect::Slow => "slow",
            Disconnect::Heartbeat => "heartbeat",
            Disconnect::Protocol => "protocol",
            Disconnect::Drain => "drain",
            Disconnect::Handshake => "handshake",
            Disconnect::Io => "io",
            Disconnect::Auth => "auth",
            Disconnect::RateLimited => "rate_limited",
        }
    }
}

/// HTTP statuses a handshake can fail with, for the `status` label.
pub(crate) const HANDSHAKE_STATUSES: [u16; 9] = [400, 401, 403, 404, 408, 426, 429, 431, 503];

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// When the shard's loop last ticked ([`uptime_ms`]): its sweep runs
    /// every second, so a stamp older than a few seconds means a stuck
    /// shard (`/healthz`).
    pub ticked_ms: AtomicU64,
    /// Open WebSocket connections (after the upgrade).
    pub connections_active: AtomicI64,
    /// TCP connections accepted.
    pub connections_accepted: AtomicU64,
    /// Active subscriptions (connection x topic or pattern).
    pub subscriptions_active: AtomicI64,
    /// Active wildcard subscriptions (connection x pattern), also in
    /// `subscriptions_active`.
    pub wildcard_subscriptions_active: AtomicI64,
    /// Connections in the shard's registry, in any phase: handshake,
    /// open, closing. Written by the shard from the registry's own size,
    /// so a connection that is never forgotten shows here (a leak).
    pub registry_connections: AtomicI64,
    /// Topics in the shard's topic index (each has a local subscriber, live
    /// or waiting for the broker); written from the index's own size, like
    /// `registry_connections`.
    pub topic_index_entries: AtomicI64,
    /// Topics this shard announced to the broker side: its topic index,
    /// when deliveries are steered (more than one shard), else 0.
    pub topics_announced: AtomicI64,
    /// `msg` frames queued to subscribers (one per subscriber per message).
    pub messages_delivered: AtomicU64,
    /// Client `pub`s on this shard the broker accepted (answered with an
    /// id): `ringcast_messages_published_total{source="client"}`.
    pub messages_published: AtomicU64,
    /// Socket writes (each a vectored write of every queued frame).
    pub socket_writes: AtomicU64,
    /// Bytes written to sockets.
    pub bytes_sent: AtomicU64,
    /// `io_uring_enter` calls that submitted the data ring's entries
    /// (sends, readiness requests): writes per submit is the batching.
    pub ring_submits: AtomicU64,
    /// Nanoseconds the shard's loops spent working (between their waits),
    /// since start: `ringcast_shard_busy_seconds_total`.
    pub busy_ns: AtomicU64,
    /// Share of the last sweep period (about a second) the loops spent
    /// working, in millionths: `ringcast_shard_busy_ratio`. Written by the
    /// shard's sweep ([`BusyWindow`]).
    pub busy_ppm: AtomicU64,
    /// From a message id's time to the moment this shard queued it to its
    /// subscribers, once per message: `ringcast_publish_to_deliver_seconds`.
    pub publish_to_deliver: LatencyHistogram,
    /// `msg` frames compressed (permessage-deflate).
    pub messages_compressed: AtomicU64,
    /// Payload bytes into the compressor.
    pub compression_bytes_in: AtomicU64,
    /// Compressed bytes out of it.
    pub compression_bytes_out: AtomicU64,
    /// Declined permessage-deflate offers, by `ws::deflate::Decline`.
    pub(crate) deflate_declined: [AtomicU64; 4],
    pub(crate) dropped: [AtomicU64; Undelivered::ALL.len()],
    pub(crate) disconnects: [AtomicU64; 9],
    pub(crate) handshake_failures: [AtomicU64; 9],
}

/// Milliseconds since the process first asked (the server asks at start):
/// one monotonic clock for stamps written on one thread and read on
/// another.
pub fn uptime_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ShardMetrics {
    /// Counts one undelivered message.
    pub fn dropped(&self, why: Undelivered) {
        self.dropped_n(why, 1);
    }

    /// Counts `n` undelivered messages.
    pub fn dropped_n(&self, why: Undelivered, n: u64) {
        let i = Undelivered::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.dropped[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one declined permessage-deflate offer.
    pub fn deflate_declined(&self, why: crate::ws::deflate::Decline) {
        let all = crate::ws::deflate::Decline::ALL;
        let i = all.iter().position(|d| *d == why).unwrap_or(0);
        inc(&self.deflate_declined[i]);
    }

    /// Counts one disconnect.
    pub fn disconnect(&self, why: Disconnect) {
        let i = Disconnect::ALL.iter().position(|d| *d == why).unwrap_or(0);
        inc(&self.disconnects[i]);
    }

    /// Counts one failed handshake by HTTP status.
    pub fn handshake_failed(&self, status: u16) {
        if let Some(i) = HANDSHAKE_STATUSES.iter().position(|s| *s == status) {
            inc(&self.handshake_failures[i]);
        }
    }

    /// Reads one drop counter (tests, stats).
    pub fn dropped_count(&self, why: Undelivered) -> u64 {
        let i = Undelivered::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.dropped[i].load(Ordering::Relaxed)
    }

    /// Undelivered messages, every reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    /// Reads one disconnect counter.
    pub fn disconnect_count(&self, why: Disconnect) -> u64 {
        let i = Disconnect::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.disconnects[i].load(Ordering::Relaxed)
    }

    /// Refused upgrades, every status.
    pub fn handshake_failures_total(&self) -> u64 {
        let all = self.handshake_failures.iter();
        all.map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Adds the time since `started` to the shard's busy time. Called by
    /// the shard's loops around their work, never across a wait.
    pub fn add_busy(&self, started: Instant) {
        let ns = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records that message `id` was queued to this shard's subscribers
    /// now: the wall clock minus the id's milliseconds (the time Redis or
    /// the embedded broker gave it), into `publish_to_deliver`.
    pub fn delivered_after(&self, id_ms: u64) {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros().min(u64::MAX as u128) as u64);
        let lag_us = now_us.saturating_sub(id_ms.saturating_mul(1000));
        self.publish_to_deliver.observe_us(lag_us);
    }
}

/// The shard's busy ratio over windows of its sweep period: the sweep
/// rolls it once per period, on the shard's own thread.
#[derive(Debug)]
pub struct BusyWindow {
    at: Instant,
    busy_ns: u64,
}

impl BusyWindow {
    /// A window starting now.
    pub fn start(m: &ShardMetrics) -> Self {
        Self {
            at: Instant::now(),
            busy_ns: m.busy_ns.load(Ordering::Relaxed),
        }
    }

    /// Ends the window at `now`: stores the share of it that was busy in
    /// `busy_ppm` and starts the next one.
    pub fn roll(&mut self, m: &ShardMetrics, now: Instant) {
        let busy = m.busy_ns.load(Ordering::Relaxed);
        let wall = now.saturating_duration_since(self.at).as_nanos() as u64;
        let worked = busy.saturating_sub(self.busy_ns);
        if wall > 0 {
            let ppm = (worked as u128 * 1_000_000 / wall as u128).min(1_000_000) as u64;
            m.busy_ppm.store(ppm, Ordering::Relaxed);
        }
        *self = Self {
            at: now,
            busy_ns: busy,
        };
    }
}

/// Why the Redis reader skipped a stream entry (producers' mistakes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No `topic` field.
    MissingTopic,
    /// No `data` field.
    MissingData,
    /// `topic` is not a valid topic name.
    InvalidTopic,
    /// `topic` hashes to another partition than the stream it was found in.
    WrongPartition,
    /// `data` is not UTF-8 JSON.
    InvalidData,
    /// `event` is not a short UTF-8 string.
    InvalidEvent,
    /// The entry id or layout is not what Redis streams return.
    Malformed,
    /// A presence entry (`presence` field) whose `presence` is not `join`
    /// or `leave`, or whose `user` is missing, empty, too long or not UTF-8.
    InvalidPresence,
    /// (v1.2) `key` is not 1 to 128 bytes of UTF-8.
    InvalidKey,
    /// (v1.2) An earlier entry of the partition had the same topic and
    /// `key` within `--idempotency-window`: a producer's retry, not
    /// delivered again.
    Duplicate,
}

impl Skip {
    pub(crate) const ALL: [Skip; 10] = [
        Skip::MissingTopic,
        Skip::MissingData,
        Skip::InvalidTopic,
        Skip::WrongPartition,
        Skip::InvalidData,
        Skip::InvalidEvent,
        Skip::Malformed,
        Skip::InvalidPresence,
        Skip::InvalidKey,
        Skip::Duplicate,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Skip::MissingTopic => "missing_topic",
            Skip::MissingData => "missing_data",
            Skip::InvalidTopic => "invalid_topic",
            Skip::WrongPartition => "wrong_partition",
            Skip::InvalidData => "invalid_data",
            Skip::InvalidEvent => "invalid_event",
            Skip::Malformed => "malformed",
            Skip::InvalidPresence => "invalid_presence",
            Skip::InvalidKey => "invalid_key",
            Skip::Duplicate => "duplicate",
        }
    }
}

/// The broker's counters, written by its own threads (not shards).
#[derive(Debug)]
pub struct BrokerMetrics {
    /// 1 while the broker can deliver (always for the embedded one), 0
    /// while the Redis reader is reconnecting.
    pub up: AtomicI64,
    /// Entries read from Redis and handed to the shards.
    pub entries_read: AtomicU64,
    /// Recoveries (`sub` with `since`) answered from the recent-entry cache.
    pub recoveries_cached: AtomicU64,
    /// Recoveries that had to read Redis (XRANGE).
    pub recoveries_redis: AtomicU64,
    /// Times the Redis reader lost its connection.
    pub reader_disconnects: AtomicU64,
    /// `XRANGE` reads run for recoveries; identical recoveries in flight
    /// at once share one.
    pub recovery_ranges: AtomicU64,
    /// Recoveries answered `recovered:false` at once because too many
    /// Redis reads for recovery were already waiting.
    pub recoveries_shed: AtomicU64,
    /// Pipelined round trips that carried client publishes (`XADD`s).
    pub publish_round_trips: AtomicU64,
    /// Times a partition stream lost entries before the reader read them
    /// (trimmed past it, or deleted): events, not entries.
    pub gaps: AtomicU64,
    /// `XINFO STREAM` reads the readers made to look for such gaps.
    pub gap_checks: AtomicU64,
    /// Messages published through the admin endpoint's `POST /publish`.
    pub published_http: AtomicU64,
    /// Presence: (topic, user) pairs this node holds (gauge).
    pub presence_users: AtomicI64,
    /// Presence: `join`s this node sent (or wrote to Redis).
    pub presence_joins: AtomicU64,
    /// Presence: `leave`s this node sent (or wrote to Redis), dead nodes'
    /// included.
    pub presence_leaves: AtomicU64,
    /// Presence: members of dead nodes this node removed.
    pub presence_ghosts: AtomicU64,
    /// Presence: round trips to Redis (scripts and commands).
    pub presence_redis_calls: AtomicU64,
    pub(crate) skipped: [AtomicU64; Skip::ALL.len()],
    /// Per partition (the Redis reader's): how old the newest entry of the
    /// reader's last `XREAD` batch of the partition was when it was read,
    /// in ms; [`NOT_READ`] until then. Sized on the first write.
    read_lag_ms: OnceLock<Box<[AtomicU64]>>,
}

/// [`BrokerMetrics`]' read lag of a partition the reader has not read yet.
const NOT_READ: u64 = u64::MAX;

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            up: AtomicI64::new(1),
            entries_read: AtomicU64::new(0),
            recoveries_cached: AtomicU64::new(0),
            recoveries_redis: AtomicU64::new(0),
            reader_disconnects: AtomicU64::new(0),
            recovery_ranges: AtomicU64::new(0),
            recoveries_shed: AtomicU64::new(0),
            publish_round_trips: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            gap_checks: AtomicU64::new(0),
            published_http: AtomicU64::new(0),
            presence_users: AtomicI64::new(0),
            presence_joins: AtomicU64::new(0),
            presence_leaves: AtomicU64::new(0),
            presence_ghosts: AtomicU64::new(0),
            presence_redis_calls: AtomicU64::new(0),
            skipped: Default::default(),
            read_lag_ms: OnceLock::new(),
        }
    }
}

impl BrokerMetrics {
    /// Counts one skipped entry.
    pub fn skipped(&self, why: Skip) {
        let i = Skip::ALL.iter().position(|d| *d == why).unwrap_or(0);
        inc(&self.skipped[i]);
    }

    /// Skipped entries, every reason.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The Redis reader read entries of `partition` (of `partitions`) up to
    /// one with milliseconds `newest_ms`: records how old it was, by the
    /// wall clock, now.
    pub fn read_up_to(&self, partition: u32, partitions: u32, newest_ms: u64) {
        let lags = self
            .read_lag_ms
            .get_or_init(|| (0..partitions).map(|_| AtomicU64::new(NOT_READ)).collect());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Some(lag) = lags.get(partition as usize) {
            lag.store(now_ms.saturating_sub(newest_ms), Ordering::Relaxed);
        }
    }

    /// Each read partition's lag in ms, by partition number.
    pub fn read_lags(&self) -> Vec<(u32, u64)> {
        let Some(lags) = self.read_lag_ms.get() else {
            return Vec::new();
        };
        let read = lags.iter().enumerate();
        read.filter_map(|(p, l)| {
            let ms = l.load(Ordering::Relaxed);
            (ms != NOT_READ).then_some((p as u32, ms))
        })
        .collect()
    }
}

/// The node's totals at one moment, for the stats log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Open WebSocket connections.
    pub connections: i64,
    /// Active subscriptions.
    pub subscriptions: i64,
    /// `msg` frames queued to subscribers since start.
    pub delivered: u64,
    /// Messages not delivered since start, every reason.
    pub dropped: u64,
    /// Errors since start: refused upgrades, connections ended by a
    /// protocol violation or a socket error, Redis reader disconnects and
    /// skipped stream entries.
    pub errors: u64,
}

impl Totals {
    /// Sums the shards' and the broker's counters now.
    pub fn read(shards: &[std::sync::Arc<ShardMetrics>], broker: &BrokerMetrics) -> Totals {
        let mut t = Totals {
            errors: broker.reader_disconnects.load(Ordering::Relaxed) + broker.skipped_total(),
            ..Totals::default()
        };
        for m in shards {
            t.connections += m.connections_active.load(Ordering::Relaxed);
            t.subscriptions += m.subscriptions_active.load(Ordering::Relaxed);
            t.delivered += m.messages_delivered.load(Ordering::Relaxed);
            t.dropped += m.dropped_total();
            t.errors += m.handshake_failures_total()
                + m.disconnect_count(Disconnect::Protocol)
                + m.disconnect_count(Disconnect::Io);
        }
        t
    }
}
