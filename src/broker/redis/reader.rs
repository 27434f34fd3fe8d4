//! The reader thread: one `XREAD BLOCK` over its partitions (all of them on
//! one server, a single one per reader on a cluster, where each partition
//! is its own hash slot), delivering each entry to the shards, and the only
//! place `sub` requests for those partitions are answered. Because every
//! `Subscribed` is sent from this one thread, between two batches of
//! deliveries, it follows the `Deliver`s of the ids it replayed through and
//! precedes those of later ids: the ordering contract of [`crate::broker`]
//! holds by construction.
//!
//! Recovery reads the per-partition cache of recent entries when it
//! reaches back far enough; the cache is warmed from each partition's tail
//! at boot, so a reconnect storm after a restart is answered without Redis
//! (`sub`s that need the part still being read wait for it). Older `since`
//! ids are read by a recovery worker (`worker.rs`) on its own connection:
//! `XRANGE (since, upto]` where `upto` is the last id this thread had
//! processed when it asked. Meanwhile this thread keeps delivering and keeps
//! the topic's frames after `upto` aside (the *tail*); when the worker
//! answers, replay is the range followed by the tail, and `Subscribed` goes
//! out right then, so replay and live join without gap or duplicate. A tail
//! over its budget is dropped and made up from the cache, or by reading the
//! rest of the range again. Identical recoveries in flight share one read.
//! Answering `sub`s is in `reader/recover.rs`.

mod recover;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{RedisError, Value};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use tracing::{info, trace, warn};

use super::entry::{decode_entry, epoch_key, parse_id, range_entries, stream_key, xread_streams};
use super::worker::{Done, Task};
use super::{connect, Blocker, Conn, Settings};
use crate::broker::memory::mint_epoch;
use crate::broker::{MsgId, SubscribeRequest};
use crate::bus::Bus;
use crate::metrics::{BrokerMetrics, Skip};
use crate::protocol::encode_msg;
use crate::topic::TopicName;

/// How long one `XREAD` blocks. Subscriptions do not wait for it (the
/// waker unblocks the call), so it only bounds how soon a dead connection
/// without traffic is noticed (it + the read timeout margin).
pub(crate) const BLOCK: Duration = Duration::from_secs(2);
/// On a cluster, how often a busy reader re-reads its client id: the
/// cluster connection may have followed `MOVED` to another node, and the
/// waker must unblock the connection that blocks now.
const ID_RECHECK: Duration = Duration::from_millis(100);
/// Entries per partition per `XREAD`.
const READ_COUNT: usize = 1000;
/// How long a `sub` whose `since` the reader has not reached yet waits.
const DEFER_LIMIT: Duration = Duration::from_secs(2);
/// Bookkeeping bytes counted per cached entry besides frame and topic.
const CACHE_ENTRY_OVERHEAD: usize = 48;

/// One partition as the reader sees it.
#[derive(Debug)]
struct Part {
    key: String,
    epoch: Arc<str>,
    /// The last id processed (delivered or skipped): where `XREAD` resumes.
    last: MsgId,
    /// Every valid entry after this id is in `cache`.
    floor: MsgId,
    cache: VecDeque<Cached>,
    cache_bytes: usize,
    /// While a page of the tail is being read to warm the cache: the
    /// page's upper bound (the floor when it was asked for).
    warming: Option<MsgId>,
    /// `sub`s below the floor waiting for the warm-up to finish.
    parked: Vec<SubscribeRequest>,
}

/// One recent entry, encoded.
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) id: MsgId,
    pub(crate) topic: TopicName,
    pub(crate) frame: Bytes,
}

impl Cached {
    fn size(&self) -> usize {
        self.frame.len() + self.topic.as_str().len() + CACHE_ENTRY_OVERHEAD
    }
}

/// A reader's channels: `sub`s in, tasks out to the recovery workers, and
/// their answers back.
#[derive(Debug)]
pub(crate) struct Links {
    /// The reader's number (for the waker).
    pub(crate) index: usize,
    pub(crate) subs: Receiver<SubscribeRequest>,
    pub(crate) tasks: Sender<Task>,
    pub(crate) done: (Sender<Done>, Receiver<Done>),
    /// Where the reader publishes its connection for the waker.
    pub(crate) blocker: Arc<Blocker>,
}

/// The reader thread's state.
#[derive(Debug)]
pub(crate) struct Reader {
    settings: Arc<Settings>,
    bus: Bus,
    /// The first partition this reader reads; `parts[i]` is `base + i`.
    base: u32,
    parts: Vec<Part>,
    key_index: HashMap<Vec<u8>, usize>,
    links: Links,
    deferred: Vec<(SubscribeRequest, Instant)>,
    /// Recoveries from Redis in flight, by topic.
    recoveries: HashMap<TopicName, Vec<recover::Recovery>>,
    /// Recoveries in `recoveries`.
    in_flight: usize,
    /// Bytes in every recovery's tail.
    tail_bytes: usize,
    /// `sub`s whose `since` is ahead of this reader, while a worker reads
    /// the stream's newest id.
    probes: HashMap<u64, SubscribeRequest>,
    /// Numbers worker jobs.
    next_job: u64,
    metrics: Arc<BrokerMetrics>,
    /// Readers without a connection; `ringcast_broker_up` is 1 at zero.
    down: Arc<AtomicUsize>,
    /// Whether this reader counts itself in `down`.
    is_down: bool,
    /// When the client id was last published.
    id_checked: Instant,
    cache_budget: usize,
}

impl Reader {
    /// Connects, learns every partition's epoch and newest id (the start
    /// position), and returns the reader with its connection. Fails when
    /// Redis cannot be reached, so a misconfigured node does not start.
    /// `group` is (first partition, count); `down` counts readers without a
    /// connection and starts at the number of readers.
    pub(crate) fn boot(
        settings: Arc<Settings>,
        group: (u32, u32),
        bus: Bus,
        links: Links,
        metrics: Arc<BrokerMetrics>,
        down: Arc<AtomicUsize>,
    ) -> Result<(Reader, Conn), RedisError> {
        let (base, len) = group;
        let parts = (base..base + len)
            .map(|p| Part {
                key: stream_key(&settings.key_prefix, p),
                epoch: Arc::from(""),
                last: MsgId::default(),
                floor: MsgId::default(),
                cache: VecDeque::new(),
                cache_bytes: 0,
                warming: None,
                parked: Vec::new(),
            })
            .collect::<Vec<_>>();
        let key_index = parts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key.as_bytes().to_vec(), i))
            .collect();
        let mut reader = Reader {
            cache_budget: settings.cache_size / settings.partitions.max(1) as usize,
            settings,
            bus,
            base,
            parts,
            key_index,
            links,
            deferred: Vec::new(),
            recoveries: HashMap::new(),
            in_flight: 0,
            tail_bytes: 0,
            probes: HashMap::new(),
            next_job: 0,
            metrics,
            down,
            is_down: true,
            id_checked: Instant::now(),
        };
        let mut conn = reader.connect()?;
        // `$` resolved to concrete ids once, so a reconnect resumes exactly.
        let mut pipe = ::redis::pipe();
        for p in &reader.parts {
            pipe.cmd("XREVRANGE")
                .arg(&p.key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
        }
        let newest: Vec<Value> = pipe.query(&mut conn)?;
        for (part, v) in reader.parts.iter_mut().zip(newest) {
            let id = range_entries(v)
                .and_then(|e| e.into_iter().next())
                .and_then(|(id, _)| parse_id(id))
                .unwrap_or_default();
            part.last = id;
            part.floor = id;
        }
        Ok((reader, conn))
    }

    /// Opens the reader's connection, publishes its client id for the
    /// waker, and (re)reads the epochs.
    fn connect(&mut self) -> Result<Conn, RedisError> {
        let mut conn = connect(&self.settings.url, Some(BLOCK + Duration::from_secs(5)))?;
        self.sync_epochs(&mut conn)?;
        self.publish_client_id(&mut conn)?;
        Ok(conn)
    }

    /// Tells the waker the id of the connection that blocks in `XREAD` (on
    /// a cluster: the connection to the node serving this partition).
    fn publish_client_id(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let (id, node) = conn.whoami(&self.parts[0].key)?;
        trace!(id, node = ?node, "reader connection");
        self.links.blocker.set(Some((id, node)));
        self.id_checked = Instant::now();
        Ok(())
    }

    /// Creates missing epochs (`SET NX`) and reads them all. A changed epoch
    /// means Redis lost that partition's history: the cache goes with it.
    fn sync_epochs(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let mut pipe = ::redis::pipe();
        for i in 0..self.parts.len() as u32 {
            let key = epoch_key(&self.settings.key_prefix, self.base + i);
            pipe.cmd("SET")
                .arg(&key)
                .arg(&*mint_epoch())
                .arg("NX")
                .ignore();
            pipe.cmd("GET").arg(&key);
        }
        let epochs: Vec<String> = pipe.query(conn)?;
        for (i, (part, epoch)) in self.parts.iter_mut().zip(epochs).enumerate() {
            if *part.epoch != *epoch {
                if !part.epoch.is_empty() {
                    warn!(
                        partition = self.base as usize + i,
                        "partition epoch changed: Redis lost its history"
                    );
                    part.cache.clear();
                    part.cache_bytes = 0;
                    part.floor = part.last;
                }
                part.epoch = Arc::from(epoch);
            }
        }
        Ok(())
    }

    /// Runs until the broker is dropped: serve, and on failure retry with
    /// backoff, resuming from the last id processed.
    pub(crate) fn run(mut self, conn: Conn) {
        self.start_warming();
        let mut next = Some(conn);
        let mut attempt: u32 = 0;
        loop {
            let conn = match next.take() {
                Some(c) => Ok(c),
                None => self.connect(),
            };
            let err = match conn {
                Ok(c) => {
                    if attempt > 0 {
                        info!(attempts = attempt, "redis reader reconnected");
                    }
                    attempt = 0;
                    self.set_up(true);
                    match self.serve(c) {
                        Ok(()) => return,
                        Err(e) => {
                            self.metrics
                                .reader_disconnects
                                .fetch_add(1, Ordering::Relaxed);
                            e
                        }
                    }
                }
                Err(e) => e,
            };
            self.links.blocker.set(None);
            self.set_up(false);
            attempt = attempt.saturating_add(1);
            warn!(attempt, error = %err, "redis reader: connection failed, retrying");
            if !self.idle(backoff(attempt)) {
                return;
            }
        }
    }

    /// Counts this reader in or out of `down`; the broker is up when no
    /// reader is down.
    fn set_up(&mut self, up: bool) {
        if up && self.is_down {
            self.is_down = false;
            if self.down.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.metrics.up.store(1, Ordering::Relaxed);
            }
        } else if !up && !self.is_down {
            self.is_down = true;
            self.down.fetch_add(1, Ordering::AcqRel);
            self.metrics.up.store(0, Ordering::Relaxed);
        }
    }

    /// Reads and delivers until an error. `Ok` only when the broker is gone.
    fn serve(&mut self, mut conn: Conn) -> Result<(), RedisError> {
        loop {
            loop {
                match self.links.subs.try_recv() {
                    Ok(req) => self.answer(req),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            while let Ok(done) = self.links.done.1.try_recv() {
                self.on_done(done);
            }
            if conn.is_cluster() && self.id_checked.elapsed() >= ID_RECHECK {
                self.publish_client_id(&mut conn)?;
            }
            let mut cmd = ::redis::cmd("XREAD");
            cmd.arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("STREAMS");
            for p in &self.parts {
                cmd.arg(&p.key);
            }
            for p in &self.parts {
                cmd.arg(p.last.to_string());
            }
            let reply: Value = cmd.query(&mut conn)?;
            // A cluster connection follows MOVED to another node by itself:
            // after a timeout or an unblock, make sure the waker targets the
            // connection that blocks now.
            if conn.is_cluster() && matches!(reply, Value::Nil) {
                self.publish_client_id(&mut conn)?;
            }
            self.handle_batch(reply);
            self.retry_deferred();
        }
    }

    /// While the reader has no connection: answer `sub`s (recoveries still
    /// go to the workers) and workers' answers, for `wait`. Returns false
    /// when the broker is gone.
    fn idle(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let (subs, done) = (self.links.subs.clone(), self.links.done.1.clone());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            crossbeam_channel::select! {
                recv(subs) -> req => match req {
                    Ok(req) => self.answer(req),
                    Err(_) => return false,
                },
                recv(done) -> d => {
                    if let Ok(d) = d {
                        self.on_done(d);
                    }
                }
                default(left) => break,
            }
        }
        self.retry_deferred();
        true
    }

    fn handle_batch(&mut self, reply: Value) {
        let Some(streams) = xread_streams(reply) else {
            warn!("unexpected XREAD reply shape; ignored");
            return;
        };
        for (key, entries) in streams {
            let Some(&p) = self.key_index.get(&key) else {
                warn!(key = %String::from_utf8_lossy(&key), "XREAD returned an unknown stream");
                continue;
            };
            for (id, fields) in entries {
                let Some(id) = parse_id(id) else {
                    self.metrics.skipped(Skip::Malformed);
                    warn!(stream = %self.parts[p].key, "skipping entry with an unreadable id");
                    continue;
                };
                self.deliver(p, id, fields);
            }
        }
    }

    fn deliver(&mut self, p: usize, id: MsgId, fields: Value) {
        let partitions = self.settings.partitions;
        let global = self.base + p as u32;
        let part = &mut self.parts[p];
        part.last = id;
        let entry = match decode_entry(fields, global, partitions) {
            Ok(e) => e,
            Err(why) => {
                self.metrics.skipped(why);
                warn!(stream = %part.key, id = %id, reason = why.label(), "skipping malformed stream entry");
                return;
            }
        };
        let frame = encode_msg(&entry.topic, id, entry.event.as_deref(), &entry.data);
        trace!(topic = %entry.topic, id = %id, "deliver");
        self.bus.deliver(&entry.topic, id, &frame);
        self.metrics.entries_read.fetch_add(1, Ordering::Relaxed);
        // The topic's recoveries in flight keep what they will replay after
        // their range (a map lookup only while some are in flight).
        if !self.recoveries.is_empty() {
            if let Some(rs) = self.recoveries.get_mut(&entry.topic) {
                for r in rs {
                    r.keep(&frame, &mut self.tail_bytes);
                }
            }
        }
        let cached = Cached {
            id,
            topic: entry.topic,
            frame,
        };
        part.cache_bytes += cached.size();
        part.cache.push_back(cached);
        while part.cache_bytes > self.cache_budget {
            let Some(old) = part.cache.pop_front() else {
                break;
            };
            part.cache_bytes -= old.size();
            part.floor = old.id;
        }
    }
}

/// 100 ms doubling up to 5 s, with up to 25 % jitter so nodes spread out.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    Duration::from_millis(base + fastrand::u64(0..=base / 4))
}
