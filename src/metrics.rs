//! Metrics: one [`ShardMetrics`] per shard, written only by its shard (and by
//! senders into its inbox), summed over shards at scrape time and rendered
//! as Prometheus text. Writes are relaxed atomics on shard-local cache lines,
//! so counting costs no contention on the delivery path. Labels are bounded
//! enums (`reason`, `status`), never a topic, user or peer.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
}

impl Undelivered {
    const ALL: [Undelivered; 5] = [
        Undelivered::SlowConsumer,
        Undelivered::ConnectionClosed,
        Undelivered::ShardInboxFull,
        Undelivered::ShardGone,
        Undelivered::ReplayTooLarge,
    ];

    fn label(self) -> &'static str {
        match self {
            Undelivered::SlowConsumer => "slow_consumer",
            Undelivered::ConnectionClosed => "connection_closed",
            Undelivered::ShardInboxFull => "shard_inbox_full",
            Undelivered::ShardGone => "shard_gone",
            Undelivered::ReplayTooLarge => "replay_too_large",
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
    const ALL: [Disconnect; 9] = [
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

    fn label(self) -> &'static str {
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
const HANDSHAKE_STATUSES: [u16; 9] = [400, 401, 403, 404, 408, 426, 429, 431, 503];

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
    /// Active subscriptions (connection x topic).
    pub subscriptions_active: AtomicI64,
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
    /// Messages handed to the broker by clients on this shard.
    pub messages_published: AtomicU64,
    /// Socket writes (each a vectored write of every queued frame).
    pub socket_writes: AtomicU64,
    /// Bytes written to sockets.
    pub bytes_sent: AtomicU64,
    dropped: [AtomicU64; 5],
    disconnects: [AtomicU64; 9],
    handshake_failures: [AtomicU64; 9],
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
}

/// Reads one counter of a shard.
type CounterOf = fn(&ShardMetrics) -> &AtomicU64;
/// Reads one gauge of a shard.
type GaugeOf = fn(&ShardMetrics) -> &AtomicI64;

fn sum_u(shards: &[&ShardMetrics], f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
}

fn sum_i(shards: &[&ShardMetrics], f: impl Fn(&ShardMetrics) -> &AtomicI64) -> i64 {
    shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every shard's counters, summed, in the Prometheus text format.
pub fn render(shards: &[&ShardMetrics]) -> String {
    let mut out = String::with_capacity(4096);
    let gauges: [(&str, &str, GaugeOf); 5] = [
        (
            "ringcast_connections_active",
            "Open WebSocket connections.",
            |m| &m.connections_active,
        ),
        (
            "ringcast_subscriptions_active",
            "Active subscriptions.",
            |m| &m.subscriptions_active,
        ),
        (
            "ringcast_registry_connections",
            "Connections the shards hold, in any phase (handshake included).",
            |m| &m.registry_connections,
        ),
        (
            "ringcast_topic_index_entries",
            "Topics in the shards' topic indexes (summed: a topic counts once per shard).",
            |m| &m.topic_index_entries,
        ),
        (
            "ringcast_topics_announced",
            "Topics the shards announced for delivery (a live or pending subscription each; summed over shards, 0 with one shard).",
            |m| &m.topics_announced,
        ),
    ];
    for (name, help, f) in gauges {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {}", sum_i(shards, f));
    }
    let counters: [(&str, &str, CounterOf); 5] = [
        (
            "ringcast_connections_accepted_total",
            "TCP connections accepted.",
            |m| &m.connections_accepted,
        ),
        (
            "ringcast_messages_delivered_total",
            "Messages queued to subscribers.",
            |m| &m.messages_delivered,
        ),
        (
            "ringcast_messages_published_total",
            "Messages published by clients.",
            |m| &m.messages_published,
        ),
        (
            "ringcast_socket_writes_total",
            "Vectored socket writes.",
            |m| &m.socket_writes,
        ),
        (
            "ringcast_bytes_sent_total",
            "Bytes written to client sockets.",
            |m| &m.bytes_sent,
        ),
    ];
    for (name, help, f) in counters {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", sum_u(shards, f));
    }
    let name = "ringcast_messages_dropped_total";
    header(
        &mut out,
        name,
        "counter",
        "Messages not delivered, by reason.",
    );
    for (i, d) in Undelivered::ALL.iter().enumerate() {
        let v = sum_u(shards, |m| &m.dropped[i]);
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {v}", d.label());
    }
    let name = "ringcast_client_disconnects_total";
    header(
        &mut out,
        name,
        "counter",
        "Connections ended by the server or client, by reason.",
    );
    for (i, d) in Disconnect::ALL.iter().enumerate() {
        let v = sum_u(shards, |m| &m.disconnects[i]);
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {v}", d.label());
    }
    let name = "ringcast_handshake_failures_total";
    header(
        &mut out,
        name,
        "counter",
        "Refused upgrades, by HTTP status.",
    );
    for (i, s) in HANDSHAKE_STATUSES.iter().enumerate() {
        let v = sum_u(shards, |m| &m.handshake_failures[i]);
        let _ = writeln!(out, "{name}{{status=\"{s}\"}} {v}");
    }
    out
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
}

impl Skip {
    const ALL: [Skip; 7] = [
        Skip::MissingTopic,
        Skip::MissingData,
        Skip::InvalidTopic,
        Skip::WrongPartition,
        Skip::InvalidData,
        Skip::InvalidEvent,
        Skip::Malformed,
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
    skipped: [AtomicU64; 7],
}

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
            skipped: Default::default(),
        }
    }
}

impl BrokerMetrics {
    /// Counts one skipped entry.
    pub fn skipped(&self, why: Skip) {
        let i = Skip::ALL.iter().position(|d| *d == why).unwrap_or(0);
        inc(&self.skipped[i]);
    }

    /// Appends the broker's metrics in the Prometheus text format.
    pub fn render_into(&self, out: &mut String) {
        let name = "ringcast_broker_up";
        header(
            out,
            name,
            "gauge",
            "1 when the broker delivers, 0 while it reconnects.",
        );
        let _ = writeln!(out, "{name} {}", self.up.load(Ordering::Relaxed));
        let counters: [(&str, &str, &AtomicU64); 9] = [
            (
                "ringcast_broker_entries_read_total",
                "Stream entries read from Redis and delivered to the shards.",
                &self.entries_read,
            ),
            (
                "ringcast_broker_recoveries_cached_total",
                "Recoveries answered from the recent-entry cache.",
                &self.recoveries_cached,
            ),
            (
                "ringcast_broker_recoveries_redis_total",
                "Recoveries that read Redis.",
                &self.recoveries_redis,
            ),
            (
                "ringcast_broker_reader_disconnects_total",
                "Times the Redis reader lost its connection.",
                &self.reader_disconnects,
            ),
            (
                "ringcast_broker_recovery_ranges_total",
                "XRANGE reads run for recoveries (identical concurrent recoveries share one).",
                &self.recovery_ranges,
            ),
            (
                "ringcast_broker_recoveries_shed_total",
                "Recoveries refused because too many Redis reads for recovery were waiting.",
                &self.recoveries_shed,
            ),
            (
                "ringcast_broker_publish_round_trips_total",
                "Pipelined round trips to Redis that carried client publishes.",
                &self.publish_round_trips,
            ),
            (
                "ringcast_broker_gaps_total",
                "Times a partition stream lost entries before this node read them (events, not entries).",
                &self.gaps,
            ),
            (
                "ringcast_broker_gap_checks_total",
                "XINFO STREAM reads made to look for entries lost before this node read them.",
                &self.gap_checks,
            ),
        ];
        for (name, help, c) in counters {
            header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", c.load(Ordering::Relaxed));
        }
        let name = "ringcast_broker_entries_skipped_total";
        header(
            out,
            name,
            "counter",
            "Malformed stream entries skipped, by reason.",
        );
        for (i, d) in Skip::ALL.iter().enumerate() {
            let v = self.skipped[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {v}", d.label());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_shards_and_labels_reasons() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.connections_active.fetch_add(2, Ordering::Relaxed);
        b.connections_active.fetch_add(3, Ordering::Relaxed);
        a.registry_connections.store(4, Ordering::Relaxed);
        b.registry_connections.store(1, Ordering::Relaxed);
        b.topic_index_entries.store(7, Ordering::Relaxed);
        a.dropped(Undelivered::SlowConsumer);
        b.dropped_n(Undelivered::SlowConsumer, 4);
        b.handshake_failed(404);
        let text = render(&[&a, &b]);
        assert!(text.contains("ringcast_connections_active 5\n"), "{text}");
        assert!(text.contains("ringcast_registry_connections 5\n"), "{text}");
        assert!(text.contains("ringcast_topic_index_entries 7\n"), "{text}");
        assert!(text.contains("ringcast_messages_dropped_total{reason=\"slow_consumer\"} 5\n"));
        assert!(text.contains("ringcast_handshake_failures_total{status=\"404\"} 1\n"));
    }
}
