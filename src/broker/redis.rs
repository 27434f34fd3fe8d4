//! The Redis Streams broker: Redis is the backbone between producers and
//! every node (docs/PROTOCOL.md section 6). Topics hash to partition streams
//! `{prefix}:stream:{P}`; every node reads every partition with plain
//! `XREAD BLOCK` (not a consumer group: all nodes see all entries) and
//! delivers to its own shards; a client `pub` is an `XADD`, so every node
//! sees one order per topic.
//!
//! Redis never runs on a shard thread. Plain threads use the redis crate's
//! blocking API, each on its own connection, and answer only through the
//! [`Bus`]:
//!
//! - the reader (`reader.rs`): `XREAD BLOCK` over all partitions, delivery,
//!   and every `sub` answer (so the ordering contract holds), with a cache
//!   of recent entries for recovery, warmed from the partitions' tails at
//!   boot. On a Redis Cluster (`redis+cluster://`, `link.rs`) every
//!   partition is its own hash slot and a multi-key `XREAD` must stay
//!   within one slot, so there is one reader per partition, each answering
//!   the `sub`s of its own topics;
//! - the recovery workers (`worker.rs`): the reads recovery needs beyond
//!   the cache (`XRANGE` + `XINFO`, the newest id for a `since` ahead of the
//!   reader, pages of the tail to warm the cache), on their own connections,
//!   so a long recovery never stops a reader's deliveries. The reader joins
//!   what a worker read with what it delivered meanwhile;
//! - the publisher (`publish.rs`): queued publishes pipelined into one round trip of
//!   `XADD ... MAXLEN ~` per batch, answering each publisher with its id;
//! - the waker: a queued `sub` should not wait for `XREAD BLOCK` to time
//!   out, so the waker sends `CLIENT UNBLOCK <reader id>` until the reader
//!   has taken the queue.
//!
//! When Redis goes away the reader retries with backoff and resumes from
//! the last id it processed; `ringcast_broker_up` is 0 meanwhile. When the
//! reader falls behind by more than the retention, so entries are trimmed
//! before it reads them, it notices (Redis 7+), counts the gap and makes
//! the partition's subscribers recover (`reader/check.rs`).

mod entry;
mod keys;
mod link;
mod publish;
mod reader;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ::redis::RedisError;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing::{info, warn};

/// Reply and entry decoding, public only for `tests/fuzz_redis.rs`.
#[doc(hidden)]
pub use entry::{
    decode_entry, parse_id, range_entries, xread_streams, Entry, PresenceEvent, RawEntries,
    Retained, MAX_EVENT_LEN, MAX_USER_LEN,
};
pub use entry::{epoch_key, partition, stream_key};
pub use keys::{key_slot, target_slot, KeyLayout, Keys, SLOTS};
pub use link::{check_url, cluster_seeds, CLUSTER_SCHEME};

use crate::broker::{Broker, Replier, SubscribeRequest};
use crate::bus::Bus;
use crate::id::ShardId;
use crate::metrics::BrokerMetrics;
use crate::topic::TopicName;

/// Test-only fault injection, in debug builds only (release builds do not
/// read it): with `RINGCAST_DEBUG_READER_HOLD_KEY=KEY`, each reader, after
/// the first read that delivered something, stops reading until the Redis
/// key `KEY` exists (polling every 10 ms, for at most 30 s), as if its
/// thread were descheduled. The tests write past the retention meanwhile
/// and then `SET` the key, to force a gap deterministically. Never set it
/// in production; a release build ignores it.
#[cfg(debug_assertions)]
pub const DEBUG_READER_HOLD_ENV: &str = "RINGCAST_DEBUG_READER_HOLD_KEY";

/// Publishes that may wait for the publisher thread; past it a `pub` is
/// answered with an error rather than queued without bound.
const PUBLISH_QUEUE: usize = 65_536;
/// `sub` requests that may wait for the reader; past it see [`RedisBroker::subscribe`].
const SUBSCRIBE_QUEUE: usize = 65_536;
/// Recovery reads (tasks for the workers) that may wait; past it a
/// recovery that needs Redis is refused (`recovered:false`, counted).
const RECOVERY_QUEUE: usize = 4096;
/// Recovery worker threads, each with its own connection.
const RECOVERY_WORKERS: usize = 2;
/// Worker answers that may wait for one reader.
const DONE_QUEUE: usize = 4096;

/// What the Redis broker needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `redis://HOST:PORT/DB`, or `redis+cluster://HOST:PORT,HOST:PORT`.
    pub url: String,
    /// Every partition's stream and epoch key (prefix, partition count,
    /// layout).
    pub keys: Keys,
    /// Approximate `MAXLEN ~` per stream.
    pub maxlen: u64,
    /// Recent-entry cache budget in bytes, over all partitions.
    pub cache_size: usize,
    /// How long a publish's idempotency key is remembered
    /// (`--idempotency-window`): in Redis for keyed publishes of ringcast's
    /// own publishers, in each reader for entries carrying a `key` field.
    pub idempotency_window: Duration,
}

impl Settings {
    /// Partition streams (as many as [`Settings::keys`] names).
    pub fn partitions(&self) -> u32 {
        self.keys.partitions()
    }
}

/// Why the Redis broker could not start or publish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis did not answer at startup.
    #[error("cannot reach Redis at {url}: {source}")]
    Unreachable {
        /// The configured URL.
        url: String,
        /// What failed.
        source: RedisError,
    },
    /// A thread could not be spawned.
    #[error("cannot start the {thread} thread: {source}")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// What failed.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// `XADD` answered something other than an id.
    #[error("XADD returned {0:?} instead of an entry id")]
    BadReply(String),
}

pub(crate) use link::{open as connect, Blocker, Conn};
use publish::{fail, publisher, PubReq};
pub use publish::{idempotency_key, publish_cmd, publish_once, xadd_cmd};

/// The Redis Streams broker. Dropping it stops its threads (the readers
/// after their current `XREAD`).
#[derive(Debug)]
pub struct RedisBroker {
    bus: Bus,
    publishes: Sender<PubReq>,
    /// One queue per reader: all partitions on one server, one partition
    /// per reader on a cluster.
    subs: Vec<Sender<reader::ReaderMsg>>,
    partitions: u32,
    wakes: Arc<Wakes>,
}

/// What the waker needs to reach every reader.
#[derive(Debug)]
struct Wakes {
    /// Signals the waker that some reader has work waiting.
    signal: Sender<()>,
    readers: Vec<ReaderHandle>,
}

impl Wakes {
    /// Asks the waker to unblock reader `g`, which has work queued.
    fn wake(&self, g: usize) {
        self.readers[g].wanted.store(true, Ordering::Release);
        let _ = self.signal.try_send(());
    }
}

/// One reader as the waker sees it.
#[derive(Debug)]
struct ReaderHandle {
    /// Set by `subscribe`, taken by the waker.
    wanted: AtomicBool,
    /// The reader's connection; `None` while it has none.
    blocker: Arc<Blocker>,
    /// A key the reader reads, to route `CLIENT UNBLOCK` on a cluster.
    key: String,
    /// The reader's queues, to see whether it has taken its work
    /// (receivers, so they keep nothing alive).
    pending: Receiver<reader::ReaderMsg>,
    done: Receiver<worker::Done>,
}

impl ReaderHandle {
    fn has_work(&self) -> bool {
        !self.pending.is_empty() || !self.done.is_empty()
    }
}

impl RedisBroker {
    /// Connects (failing when Redis is unreachable, so a misconfigured node
    /// does not start), resolves the start position, and starts the
    /// reader(s), publisher and waker threads. `replay_limit` is the
    /// subscribers' outbound queue bound: a recovery read stops past it.
    pub fn start(
        settings: Settings,
        replay_limit: usize,
        bus: Bus,
        metrics: Arc<BrokerMetrics>,
    ) -> Result<RedisBroker, Error> {
        let settings = Arc::new(settings);
        let spawn = |thread: String, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(thread)
                .spawn(f)
                .map(drop)
                .map_err(|source| Error::Spawn {
                    thread: "redis",
                    source,
                })
        };
        let n = settings.partitions();
        // One server: one reader over every partition. A cluster: one per
        // partition, since each partition is its own slot.
        let groups: Vec<(u32, u32)> = if cluster_seeds(&settings.url).is_some() {
            (0..n).map(|p| (p, 1)).collect()
        } else {
            vec![(0, n)]
        };
        let down = Arc::new(AtomicUsize::new(groups.len()));
        let (task_tx, task_rx) = crossbeam_channel::bounded(RECOVERY_QUEUE);
        let mut readers = Vec::with_capacity(groups.len());
        let mut booted = Vec::with_capacity(groups.len());
        let mut subs = Vec::with_capacity(groups.len());
        for (index, (base, len)) in groups.into_iter().enumerate() {
            let (sub_tx, sub_rx) = crossbeam_channel::bounded(SUBSCRIBE_QUEUE);
            let (done_tx, done_rx) = crossbeam_channel::bounded(DONE_QUEUE);
            let blocker = Arc::new(Blocker::default());
            readers.push(ReaderHandle {
                wanted: AtomicBool::new(false),
                blocker: blocker.clone(),
                key: settings.keys.stream(base).to_string(),
                pending: sub_rx.clone(),
                done: done_rx.clone(),
            });
            let links = reader::Links {
                index,
                subs: sub_rx,
                tasks: task_tx.clone(),
                done: (done_tx, done_rx),
                blocker,
            };
            let (reader, conn) = reader::Reader::boot(
                settings.clone(),
                (base, len),
                bus.clone(),
                links,
                metrics.clone(),
                down.clone(),
            )
            .map_err(|source| Error::Unreachable {
                url: settings.url.clone(),
                source,
            })?;
            let mut reader = reader;
            reader.replay_limit = replay_limit;
            subs.push(sub_tx);
            let name = if len == n {
                "redis-reader".to_string()
            } else {
                format!("redis-reader-{base}")
            };
            booted.push((name, reader, conn));
        }
        // Only the readers hold the task queue: the workers stop with them.
        drop(task_tx);
        let (signal, wake_rx) = crossbeam_channel::bounded(1);
        let wakes = Arc::new(Wakes { signal, readers });
        worker::spawn(
            RECOVERY_WORKERS,
            &settings.url,
            settings.partitions(),
            &task_rx,
            &wakes,
        )
        .map_err(|source| Error::Spawn {
            thread: "redis-recovery",
            source,
        })?;
        for (name, reader, conn) in booted {
            spawn(name, Box::new(move || reader.run(conn)))?;
        }
        let (s, b, m) = (settings.clone(), bus.clone(), metrics.clone());
        let (pub_tx, pub_rx) = crossbeam_channel::bounded(PUBLISH_QUEUE);
        spawn(
            "redis-publisher".into(),
            Box::new(move || publisher(&s, &b, &pub_rx, &m)),
        )?;
        let (s, w) = (settings.clone(), wakes.clone());
        spawn(
            "redis-waker".into(),
            Box::new(move || waker(&s.url, &wake_rx, &w)),
        )?;
        info!(
            url = %settings.url,
            partitions = settings.partitions(),
            readers = subs.len(),
            prefix = %settings.keys.prefix(),
            layout = %settings.keys.layout(),
            maxlen = settings.maxlen,
            "redis streams broker started"
        );
        Ok(RedisBroker {
            bus,
            publishes: pub_tx,
            subs,
            partitions: n,
            wakes,
        })
    }
}

impl Broker for RedisBroker {
    fn publish_as(
        &self,
        reply: Option<Replier>,
        topic: TopicName,
        event: Option<&str>,
        data: &str,
        key: Option<&str>,
    ) {
        let req = PubReq {
            reply,
            topic,
            event: event.map(Into::into),
            data: data.to_owned(),
            key: key.map(Into::into),
        };
        if let Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) =
            self.publishes.try_send(req)
        {
            fail(&self.bus, r, "publish queue full: the broker is behind");
        }
    }

    fn subscribe(&self, req: SubscribeRequest) {
        // The reader of the topic's partition answers, so the `sub` is
        // ordered with that partition's deliveries.
        let g = self.reader_of(&req.topic);
        match self.subs[g].try_send(reader::ReaderMsg::Sub(req)) {
            Ok(()) => self.wakes.wake(g),
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                let reader::ReaderMsg::Sub(req) = msg else {
                    return;
                };
                // The reader is stuck: only it can order a subscription
                // with its deliveries, so the `sub` is refused (4503) and
                // the client retries, rather than subscribed out of order.
                warn!(topic = %req.topic, "subscribe queue full: refusing the sub");
                self.bus.subscribe_failed(
                    req.reply,
                    req.topic,
                    "broker unavailable: subscribe queue full, retry later",
                );
            }
        }
    }

    fn want_every_topic(&self, shard: ShardId, on: bool) {
        self.bus.want_every_topic(shard, on);
    }

    fn withdraw(&self, topic: TopicName, shard: ShardId) {
        // Not urgent: the reader takes it before its next read. Dropped
        // when full (see `Broker::withdraw`).
        let g = self.reader_of(&topic);
        let _ = self.subs[g].try_send(reader::ReaderMsg::Withdraw(topic, shard));
    }
}

impl RedisBroker {
    /// The reader of `topic`'s partition (the only one, on one server).
    fn reader_of(&self, topic: &TopicName) -> usize {
        match self.subs.len() {
            1 => 0,
            _ => topic.partition(self.partitions) as usize,
        }
    }
}

/// The waker thread: while `sub` requests (or workers' answers) wait,
/// unblock their reader's `XREAD`. `CLIENT UNBLOCK` answers 0 when the
/// reader is not blocked yet (busy, or between its queue check and
/// `XREAD`), so it retries with a short pause until the queues are taken. On a cluster the command goes to
/// the node the reader published with its id (see [`Blocker`]).
fn waker(url: &str, signal: &Receiver<()>, wakes: &Wakes) {
    let mut conn: Option<Conn> = None;
    let mut waiting: Vec<usize> = Vec::new();
    while signal.recv().is_ok() {
        let mut pause = Duration::from_micros(500);
        loop {
            for (g, r) in wakes.readers.iter().enumerate() {
                if r.wanted.swap(false, Ordering::AcqRel) && !waiting.contains(&g) {
                    waiting.push(g);
                }
            }
            waiting.retain(|&g| wakes.readers[g].has_work());
            if waiting.is_empty() {
                break;
            }
            if conn.is_none() {
                conn = connect(url, Some(Duration::from_secs(2))).ok();
            }
            let mut i = 0;
            while i < waiting.len() {
                let r = &wakes.readers[waiting[i]];
                let unblocked = match (r.blocker.get(), conn.as_mut()) {
                    (Some((id, node)), Some(c)) => match c.unblock(id, node.as_ref(), &r.key) {
                        Ok(done) => done,
                        Err(_) => {
                            conn = None;
                            false
                        }
                    },
                    _ => false,
                };
                if unblocked {
                    waiting.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if waiting.is_empty() {
                continue;
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}
