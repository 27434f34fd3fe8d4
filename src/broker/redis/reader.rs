//! The reader thread: one `XREAD BLOCK` over its partitions (all of them on
//! one server, a single one per reader on a cluster, where each partition
//! is its own hash slot), delivering each entry to the shards, and the only
//! place `sub` requests for those partitions are answered. Because
//! subscriptions are handled between two `XREAD` calls on this one thread,
//! every `Subscribed` it sends follows the `Deliver`s of the ids it
//! replayed through and precedes those of later ids: the ordering contract
//! of [`crate::broker`] holds by construction.
//!
//! Recovery reads the per-partition cache of recent entries when it
//! reaches back far enough, and `XRANGE` otherwise, up to the last id this
//! thread delivered, so replay and live join without gap or duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{RedisError, Value};
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use tracing::{debug, info, trace, warn};

use super::entry::{
    decode_entry, epoch_key, parse_id, partition, range_entries, stream_key, xread_streams,
    Retained,
};
use super::{connect, Blocker, Conn, Settings};
use crate::broker::memory::mint_epoch;
use crate::broker::{MsgId, Since, SubscribeRequest};
use crate::bus::{Bus, ShardMsg};
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
/// Entries per `XRANGE` page during recovery.
const RANGE_PAGE: usize = 1000;
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
}

#[derive(Debug)]
struct Cached {
    id: MsgId,
    topic: TopicName,
    frame: Bytes,
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
    subs: Receiver<SubscribeRequest>,
    deferred: Vec<(SubscribeRequest, Instant)>,
    blocker: Arc<Blocker>,
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
        subs: Receiver<SubscribeRequest>,
        blocker: Arc<Blocker>,
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
            subs,
            deferred: Vec::new(),
            blocker,
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
        self.blocker.set(Some((id, node)));
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
            self.blocker.set(None);
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
                match self.subs.try_recv() {
                    Ok(req) => self.answer(Some(&mut conn), req)?,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
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
            self.retry_deferred(Some(&mut conn))?;
        }
    }

    /// While Redis is away: answer what needs no Redis, for `wait`. Returns
    /// false when the broker is gone.
    fn idle(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.subs.recv_timeout(left) {
                Ok(req) => {
                    // Without a connection `answer` cannot fail.
                    let _ = self.answer(None, req);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        let _ = self.retry_deferred(None);
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
        part.cache_bytes += frame.len() + entry.topic.as_str().len() + CACHE_ENTRY_OVERHEAD;
        part.cache.push_back(Cached {
            id,
            topic: entry.topic,
            frame,
        });
        while part.cache_bytes > self.cache_budget {
            let Some(old) = part.cache.pop_front() else {
                break;
            };
            part.cache_bytes -= old.frame.len() + old.topic.as_str().len() + CACHE_ENTRY_OVERHEAD;
            part.floor = old.id;
        }
    }

    /// Answers one `sub`, or defers it when `since` is past what this
    /// reader delivered but within what the stream holds.
    fn answer(&mut self, conn: Option<&mut Conn>, req: SubscribeRequest) -> Result<(), RedisError> {
        let p = self.local(&req.topic);
        let (replay, recovered) = match &req.since {
            None => (Vec::new(), None),
            Some(Since { epoch, .. }) if epoch.as_deref() != Some(&*self.parts[p].epoch) => {
                (Vec::new(), Some(false))
            }
            Some(Since { id, .. }) if *id > self.parts[p].last => {
                let reaches = match conn {
                    Some(c) => self.stream_reaches(c, p, *id)?,
                    None => false,
                };
                if reaches {
                    debug!(topic = %req.topic, since = %id, "sub waits for the reader to reach since");
                    self.deferred.push((req, Instant::now() + DEFER_LIMIT));
                    return Ok(());
                }
                (Vec::new(), Some(false))
            }
            Some(Since { id, .. }) if *id >= self.parts[p].floor => {
                self.metrics
                    .recoveries_cached
                    .fetch_add(1, Ordering::Relaxed);
                (self.replay_cached(p, *id, &req.topic), Some(true))
            }
            Some(Since { id, .. }) => match conn {
                Some(c) => {
                    self.metrics
                        .recoveries_redis
                        .fetch_add(1, Ordering::Relaxed);
                    match self.replay_redis(c, p, *id, &req.topic)? {
                        Some(frames) => (frames, Some(true)),
                        None => (Vec::new(), Some(false)),
                    }
                }
                None => (Vec::new(), Some(false)),
            },
        };
        self.bus.send_to(
            req.reply.shard,
            ShardMsg::Subscribed {
                reply: req.reply,
                topic: req.topic,
                replay,
                recovered,
                epoch: self.parts[p].epoch.clone(),
            },
        );
        Ok(())
    }

    /// The index in `parts` of `topic`'s partition, which this reader
    /// reads (the broker routes each `sub` to its partition's reader).
    fn local(&self, topic: &TopicName) -> usize {
        (partition(topic.as_str(), self.settings.partitions) - self.base) as usize
    }

    fn retry_deferred(&mut self, mut conn: Option<&mut Conn>) -> Result<(), RedisError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        for (req, deadline) in std::mem::take(&mut self.deferred) {
            let p = self.local(&req.topic);
            let reached = req
                .since
                .as_ref()
                .is_some_and(|s| s.id <= self.parts[p].last);
            if reached {
                self.answer(conn.as_deref_mut(), req)?;
            } else if now >= deadline || conn.is_none() {
                let epoch = self.parts[p].epoch.clone();
                self.bus.send_to(
                    req.reply.shard,
                    ShardMsg::Subscribed {
                        reply: req.reply,
                        topic: req.topic,
                        replay: Vec::new(),
                        recovered: Some(false),
                        epoch,
                    },
                );
            } else {
                self.deferred.push((req, deadline));
            }
        }
        Ok(())
    }

    /// Whether the partition's newest entry is at or past `id`.
    fn stream_reaches(&self, conn: &mut Conn, p: usize, id: MsgId) -> Result<bool, RedisError> {
        let v: Value = ::redis::cmd("XREVRANGE")
            .arg(&self.parts[p].key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(conn)?;
        let newest = range_entries(v)
            .and_then(|e| e.into_iter().next())
            .and_then(|(id, _)| parse_id(id));
        Ok(newest.is_some_and(|n| n >= id))
    }

    fn replay_cached(&self, p: usize, since: MsgId, topic: &TopicName) -> Vec<Bytes> {
        let cache = &self.parts[p].cache;
        let start = cache.partition_point(|c| c.id <= since);
        cache
            .range(start..)
            .filter(|c| c.topic == *topic)
            .map(|c| c.frame.clone())
            .collect()
    }

    /// The topic's frames in `(since, last]` read from Redis, or `None` when
    /// some of that range is no longer retained.
    fn replay_redis(
        &self,
        conn: &mut Conn,
        p: usize,
        since: MsgId,
        topic: &TopicName,
    ) -> Result<Option<Vec<Bytes>>, RedisError> {
        let part = &self.parts[p];
        let end = part.last.to_string();
        let mut start = since;
        let mut frames = Vec::new();
        loop {
            let v: Value = ::redis::cmd("XRANGE")
                .arg(&part.key)
                .arg(format!("({start}"))
                .arg(&end)
                .arg("COUNT")
                .arg(RANGE_PAGE)
                .query(conn)?;
            let Some(entries) = range_entries(v) else {
                return Ok(None);
            };
            let n = entries.len();
            for (id, fields) in entries {
                let Some(id) = parse_id(id) else { continue };
                start = id;
                match decode_entry(fields, self.base + p as u32, self.settings.partitions) {
                    Ok(e) if e.topic == *topic => {
                        frames.push(encode_msg(&e.topic, id, e.event.as_deref(), &e.data));
                    }
                    _ => {}
                }
            }
            if n < RANGE_PAGE {
                break;
            }
        }
        // Checked after reading: trimming only moves forward, so if nothing
        // after `since` is gone now, nothing was gone while we read.
        let info = match ::redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&part.key)
            .query::<Value>(conn)
        {
            Ok(v) => Retained::from_xinfo(v),
            // The stream no longer exists.
            Err(e) if e.code() == Some("ERR") => None,
            Err(e) => return Err(e),
        };
        Ok(info.filter(|r| r.covers(since)).map(|_| frames))
    }
}

/// 100 ms doubling up to 5 s, with up to 25 % jitter so nodes spread out.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    Duration::from_millis(base + fastrand::u64(0..=base / 4))
}
