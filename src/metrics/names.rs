//! Every metric name ringcast exports, as consts (`process_*` are the
//! `prometheus` crate's), and `DEFS`: each family's name, help, type and
//! labels, from which the collector makes its descriptors and families.

/// Open WebSocket connections, per shard (gauge, `shard`).
pub const CONNECTIONS_ACTIVE: &str = "ringcast_connections_active";
/// Active subscriptions, per shard (gauge, `shard`).
pub const SUBSCRIPTIONS_ACTIVE: &str = "ringcast_subscriptions_active";
/// Active wildcard (pattern) subscriptions, per shard (gauge, `shard`);
/// also counted in [`SUBSCRIPTIONS_ACTIVE`].
pub const WILDCARD_SUBSCRIPTIONS_ACTIVE: &str = "ringcast_wildcard_subscriptions_active";
/// Connections a shard holds in any phase (gauge, `shard`).
pub const REGISTRY_CONNECTIONS: &str = "ringcast_registry_connections";
/// Topics in a shard's topic index (gauge, `shard`).
pub const TOPIC_INDEX_ENTRIES: &str = "ringcast_topic_index_entries";
/// Topics a shard announced to the broker side (gauge, `shard`).
pub const TOPICS_ANNOUNCED: &str = "ringcast_topics_announced";
/// Messages waiting in a shard's inbox (gauge, `shard`).
pub const SHARD_INBOX_DEPTH: &str = "ringcast_shard_inbox_depth";
/// Share of the last second a shard's loop worked (gauge, `shard`).
pub const SHARD_BUSY_RATIO: &str = "ringcast_shard_busy_ratio";
/// Time a shard's loop worked (counter, `shard`).
pub const SHARD_BUSY_SECONDS: &str = "ringcast_shard_busy_seconds_total";
/// TCP connections accepted (counter).
pub const CONNECTIONS_ACCEPTED: &str = "ringcast_connections_accepted_total";
/// `msg` frames queued to subscribers (counter).
pub const MESSAGES_DELIVERED: &str = "ringcast_messages_delivered_total";
/// Publishes by source (counter, `source`).
pub const MESSAGES_PUBLISHED: &str = "ringcast_messages_published_total";
/// Vectored socket writes (counter).
pub const SOCKET_WRITES: &str = "ringcast_socket_writes_total";
/// Bytes written to client sockets (counter).
pub const BYTES_SENT: &str = "ringcast_bytes_sent_total";
/// Submissions (`io_uring_enter`) of the shards' data rings (counter).
pub const RING_SUBMITS: &str = "ringcast_io_uring_submits_total";
/// `msg` frames compressed (once per shard per message).
pub const MESSAGES_COMPRESSED: &str = "ringcast_messages_compressed_total";
/// Payload bytes that went into the compressor.
pub const COMPRESSION_BYTES_IN: &str = "ringcast_compression_bytes_in_total";
/// Payload bytes that came out of it.
pub const COMPRESSION_BYTES_OUT: &str = "ringcast_compression_bytes_out_total";
/// permessage-deflate offers declined, by reason.
pub const DEFLATE_DECLINED: &str = "ringcast_deflate_declined_total";
/// Messages not delivered (counter, `reason`).
pub const MESSAGES_DROPPED: &str = "ringcast_messages_dropped_total";
/// Connections ended (counter, `reason`).
pub const CLIENT_DISCONNECTS: &str = "ringcast_client_disconnects_total";
/// Refused upgrades (counter, `status`).
pub const HANDSHAKE_FAILURES: &str = "ringcast_handshake_failures_total";
/// From a message id's time to the shard queueing it (histogram, `shard`).
pub const PUBLISH_TO_DELIVER: &str = "ringcast_publish_to_deliver_seconds";
/// 1 while the broker delivers (gauge).
pub const BROKER_UP: &str = "ringcast_broker_up";
/// How old the newest entry of the last read was (gauge, `partition`).
pub const BROKER_READ_LAG: &str = "ringcast_broker_read_lag_seconds";
/// Malformed stream entries skipped (counter, `reason`).
pub const BROKER_ENTRIES_SKIPPED: &str = "ringcast_broker_entries_skipped_total";
/// Stream entries read from Redis and delivered (counter).
pub const BROKER_ENTRIES_READ: &str = "ringcast_broker_entries_read_total";
/// Recoveries answered from the recent-entry cache (counter).
pub const BROKER_RECOVERIES_CACHED: &str = "ringcast_broker_recoveries_cached_total";
/// Recoveries that read Redis (counter).
pub const BROKER_RECOVERIES_REDIS: &str = "ringcast_broker_recoveries_redis_total";
/// Times the Redis reader lost its connection (counter).
pub const BROKER_READER_DISCONNECTS: &str = "ringcast_broker_reader_disconnects_total";
/// XRANGE reads run for recoveries (counter).
pub const BROKER_RECOVERY_RANGES: &str = "ringcast_broker_recovery_ranges_total";
/// Recoveries refused, too many waiting (counter).
pub const BROKER_RECOVERIES_SHED: &str = "ringcast_broker_recoveries_shed_total";
/// Round trips that carried client publishes (counter).
pub const BROKER_PUBLISH_ROUND_TRIPS: &str = "ringcast_broker_publish_round_trips_total";
/// Partition gaps (counter).
pub const BROKER_GAPS: &str = "ringcast_broker_gaps_total";
/// XINFO STREAM reads looking for gaps (counter).
pub const BROKER_GAP_CHECKS: &str = "ringcast_broker_gap_checks_total";
/// Presence: (topic, user) pairs this node holds (gauge).
pub const PRESENCE_USERS: &str = "ringcast_presence_users";
/// Presence: `join`/`leave` this node sent (counter, `kind`).
pub const PRESENCE_EVENTS: &str = "ringcast_presence_events_total";
/// Presence: dead nodes' members this node removed (counter).
pub const PRESENCE_GHOSTS: &str = "ringcast_presence_ghosts_total";
/// Presence: round trips to Redis (counter).
pub const PRESENCE_REDIS_CALLS: &str = "ringcast_presence_redis_calls_total";

/// The kind of a metric family.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Gauge,
    Counter,
    Histogram,
}

/// One metric family as exported: name, help, kind, variable labels.
#[derive(Debug)]
pub(super) struct Def {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) kind: Kind,
    pub(super) labels: &'static [&'static str],
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Def {
    Def {
        name,
        help,
        kind,
        labels,
    }
}

use Kind::{Counter, Gauge, Histogram};

const SHARD: &[&str] = &["shard"];
const REASON: &[&str] = &["reason"];

/// Every family the node collector exports, in the order written.
pub(super) const DEFS: &[Def] = &[
    def(CONNECTIONS_ACTIVE, Gauge, SHARD, "Open WebSocket connections."),
    def(SUBSCRIPTIONS_ACTIVE, Gauge, SHARD, "Active subscriptions."),
    def(
        WILDCARD_SUBSCRIPTIONS_ACTIVE,
        Gauge,
        SHARD,
        "Active wildcard (topic pattern) subscriptions, also counted in ringcast_subscriptions_active.",
    ),
    def(
        REGISTRY_CONNECTIONS,
        Gauge,
        SHARD,
        "Connections the shard holds, in any phase (handshake included).",
    ),
    def(
        TOPIC_INDEX_ENTRIES,
        Gauge,
        SHARD,
        "Topics in the shard's topic index (a topic with subscribers on two shards counts on each).",
    ),
    def(
        TOPICS_ANNOUNCED,
        Gauge,
        SHARD,
        "Topics the shard announced for delivery (a live or pending subscription each; 0 with one shard).",
    ),
    def(
        SHARD_INBOX_DEPTH,
        Gauge,
        SHARD,
        "Messages waiting in the shard's inbox.",
    ),
    def(
        SHARD_BUSY_RATIO,
        Gauge,
        SHARD,
        "Share of the last second (the shard's sweep period) its loop spent working rather than waiting.",
    ),
    def(
        SHARD_BUSY_SECONDS,
        Counter,
        SHARD,
        "Time the shard's loop spent working rather than waiting.",
    ),
    def(CONNECTIONS_ACCEPTED, Counter, &[], "TCP connections accepted."),
    def(MESSAGES_DELIVERED, Counter, &[], "Messages queued to subscribers."),
    def(
        MESSAGES_PUBLISHED,
        Counter,
        &["source"],
        "Publishes accepted by the broker, by where this node saw them: client (a WebSocket pub on this node), http (POST /publish on this node), redis (stream entries this node's Redis reader read and delivered: every publish through Redis, this node's own included).",
    ),
    def(
        SOCKET_WRITES,
        Counter,
        &[],
        "Vectored socket writes (sendmsg calls, or sends completed by the data ring).",
    ),
    def(BYTES_SENT, Counter, &[], "Bytes written to client sockets."),
    def(
        RING_SUBMITS,
        Counter,
        &[],
        "io_uring_enter calls that submitted the shards' data rings (sends and readiness requests of a flush round together); 0 on the epoll data path.",
    ),
    def(
        MESSAGES_COMPRESSED,
        Counter,
        &[],
        "msg frames compressed with permessage-deflate, once per shard per message.",
    ),
    def(
        COMPRESSION_BYTES_IN,
        Counter,
        &[],
        "Payload bytes given to the compressor.",
    ),
    def(
        COMPRESSION_BYTES_OUT,
        Counter,
        &[],
        "Compressed payload bytes it made (shared by every subscriber that takes them).",
    ),
    def(
        DEFLATE_DECLINED,
        Counter,
        REASON,
        "permessage-deflate offers declined at the upgrade, by reason.",
    ),
    def(
        MESSAGES_DROPPED,
        Counter,
        REASON,
        "Messages not delivered, by reason.",
    ),
    def(
        CLIENT_DISCONNECTS,
        Counter,
        REASON,
        "Connections ended by the server or client, by reason.",
    ),
    def(
        HANDSHAKE_FAILURES,
        Counter,
        &["status"],
        "Refused upgrades, by HTTP status.",
    ),
    def(
        PUBLISH_TO_DELIVER,
        Histogram,
        SHARD,
        "From a message id's time (given by Redis or the embedded broker) to the moment the shard queued it to its subscribers; once per message per shard.",
    ),
    def(
        BROKER_UP,
        Gauge,
        &[],
        "1 when the broker delivers, 0 while it reconnects.",
    ),
    def(
        BROKER_ENTRIES_READ,
        Counter,
        &[],
        "Stream entries read from Redis and delivered to the shards.",
    ),
    def(
        BROKER_RECOVERIES_CACHED,
        Counter,
        &[],
        "Recoveries answered from the recent-entry cache.",
    ),
    def(
        BROKER_RECOVERIES_REDIS,
        Counter,
        &[],
        "Recoveries that read Redis.",
    ),
    def(
        BROKER_READER_DISCONNECTS,
        Counter,
        &[],
        "Times the Redis reader lost its connection.",
    ),
    def(
        BROKER_RECOVERY_RANGES,
        Counter,
        &[],
        "XRANGE reads run for recoveries (identical concurrent recoveries share one).",
    ),
    def(
        BROKER_RECOVERIES_SHED,
        Counter,
        &[],
        "Recoveries refused because too many Redis reads for recovery were waiting.",
    ),
    def(
        BROKER_PUBLISH_ROUND_TRIPS,
        Counter,
        &[],
        "Pipelined round trips to Redis that carried client publishes.",
    ),
    def(
        BROKER_GAPS,
        Counter,
        &[],
        "Times a partition stream lost entries before this node read them (events, not entries).",
    ),
    def(
        BROKER_GAP_CHECKS,
        Counter,
        &[],
        "XINFO STREAM reads made to look for entries lost before this node read them.",
    ),
    def(
        BROKER_ENTRIES_SKIPPED,
        Counter,
        REASON,
        "Malformed stream entries skipped, by reason.",
    ),
    def(
        PRESENCE_USERS,
        Gauge,
        &[],
        "Presence: (topic, user) pairs this node holds, leaves waiting for --presence-leave-delay included.",
    ),
    def(
        PRESENCE_EVENTS,
        Counter,
        &["kind"],
        "Presence: join and leave events this node sent (embedded broker) or wrote to Redis, dead nodes' leaves included.",
    ),
    def(
        PRESENCE_GHOSTS,
        Counter,
        &[],
        "Presence: members of nodes that stopped renewing their liveness (killed, or drained with leaves held), removed by this node.",
    ),
    def(
        PRESENCE_REDIS_CALLS,
        Counter,
        &[],
        "Presence: round trips to Redis (one per node-level join or leave, liveness, the look for dead nodes).",
    ),
    def(
        BROKER_READ_LAG,
        Gauge,
        &["partition"],
        "Redis reader: how old (by this node's clock) the newest entry of its last read of the partition was when read. Absent with the embedded broker.",
    ),
];
