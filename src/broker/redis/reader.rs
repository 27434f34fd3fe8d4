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
//!
//! `XREAD` resumes after the last id whatever `MAXLEN` trimmed meanwhile, so
//! a reader that falls behind by more than the retention would skip entries
//! silently. It counts instead (`reader/gap.rs`) and looks at the streams
//! when it may have fallen behind (`reader/check.rs`); a gap is counted,
//! logged, closes the partition's subscribers before anything read after
//! it is delivered, and refuses recoveries that span it.
//!
//! Where the reader starts (each partition's position, its epoch, the
//! idempotency keys of the window before it) is in `reader/start.rs`.

mod check;
mod dedup;
mod gap;
mod recover;
mod start;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{RedisError, Value};
use crossbeam_channel::{Receiver, Sender};
use tracing::{info, trace, warn};

use super::entry::{decode_entry, parse_id, xread_streams, Cached};
use super::worker::{Done, Task};
use super::{connect, Blocker, Conn, Settings};
use crate::broker::SubscribeRequest;
use crate::bus::Bus;
use crate::bus::Interest;
use crate::id::MsgId;
use crate::id::ShardId;
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
pub(crate) const READ_COUNT: usize = 1000;
/// How long a `sub` whose `since` the reader has not reached yet waits.
const DEFER_LIMIT: Duration = Duration::from_secs(2);

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
    /// The ordinal of `last`: how many entries the stream had ever had up
    /// to it, as this reader counted (from Redis's `entries-added` at boot,
    /// one more per entry read); `None` while unknown. Gap checks compare
    /// it with Redis's own numbering (`reader/gap.rs`).
    count: Option<u64>,
    /// Entries older than this were lost before this reader read them: a
    /// recovery from an older `since` is refused.
    cut: MsgId,
    /// Whether the stream exists (it is only looked at then).
    exists: bool,
    /// The retention to assume, in entries: this node's `MAXLEN`, or what
    /// the stream shows when someone trims it shorter.
    retention: u64,
    /// When it was last looked at.
    checked: Instant,
    /// The last read returned a full [`READ_COUNT`] of it.
    full: bool,
    /// What Redis said about it with the current read, and after it.
    snap: Option<gap::Snapshot>,
    after: Option<gap::Snapshot>,
    /// Idempotency keys of its recent entries (`dedup.rs`).
    keys: dedup::Keys,
}

/// What a reader takes from the shards, in order: `sub`s of its topics,
/// and withdrawals of a shard's interest in one.
#[derive(Debug)]
pub(crate) enum ReaderMsg {
    /// A `sub`; with `announce`, the shard is added to the topic's
    /// delivery set first.
    Sub(SubscribeRequest),
    /// The shard has no subscriber for the topic any more.
    Withdraw(TopicName, ShardId),
}

/// A reader's channels: `sub`s in, tasks out to the recovery workers, and
/// their answers back.
#[derive(Debug)]
pub(crate) struct Links {
    /// The reader's number (for the waker).
    pub(crate) index: usize,
    pub(crate) subs: Receiver<ReaderMsg>,
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
    /// Which shards get which of this reader's topics (kept from the
    /// shards' messages, in order with their `sub`s).
    interest: Interest,
    /// Readers without a connection; `ringcast_broker_up` is 1 at zero.
    down: Arc<AtomicUsize>,
    /// Whether this reader counts itself in `down`.
    is_down: bool,
    /// When the client id was last published.
    id_checked: Instant,
    cache_budget: usize,
    /// Replay bytes past which a recovery read stops (the outbound queue
    /// bound: no subscriber could take more).
    pub(crate) replay_limit: usize,
    /// Whether gaps can be detected (Redis 7+).
    detect: bool,
    /// When the previous `XREAD` was sent.
    sent: Instant,
    /// No read yet on this connection.
    fresh: bool,
    /// Partitions looked at with the current read (kept for its capacity).
    checking: Vec<usize>,
    /// Per-read scratch of the gap checks (kept for its capacity).
    verdicts: Vec<check::Verdict>,
    /// Test-only: see [`super::DEBUG_READER_HOLD_ENV`].
    #[cfg(debug_assertions)]
    hold: Option<String>,
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
                key: settings.keys.stream(p).to_string(),
                epoch: Arc::from(""),
                last: MsgId::default(),
                floor: MsgId::default(),
                cache: VecDeque::new(),
                cache_bytes: 0,
                warming: None,
                parked: Vec::new(),
                count: None,
                cut: MsgId::default(),
                exists: false,
                retention: settings.maxlen,
                checked: Instant::now(),
                full: false,
                snap: None,
                after: None,
                keys: dedup::Keys::default(),
            })
            .collect::<Vec<_>>();
        let key_index = parts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key.as_bytes().to_vec(), i))
            .collect();
        let mut reader = Reader {
            cache_budget: settings.cache_size / settings.partitions().max(1) as usize,
            replay_limit: usize::MAX,
            settings,
            interest: bus.interest(),
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
            detect: true,
            sent: Instant::now(),
            fresh: true,
            checking: Vec::new(),
            verdicts: Vec::new(),
            #[cfg(debug_assertions)]
            hold: check::debug_hold_key(),
        };
        let mut conn = reader.connect()?;
        reader.start_position(&mut conn)?;
        reader.learn_recent_keys(&mut conn)?;
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

    /// Takes one message from the shards.
    fn take(&mut self, msg: ReaderMsg) {
        match msg {
            ReaderMsg::Sub(req) => {
                if req.announce {
                    self.interest.add(&req.topic, req.reply.shard);
                }
                self.answer(req);
            }
            ReaderMsg::Withdraw(topic, shard) => self.interest.remove(&topic, shard),
        }
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
        self.fresh = true;
        loop {
            loop {
                match self.links.subs.try_recv() {
                    Ok(msg) => self.take(msg),
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
            let started = Instant::now();
            self.plan_checks(started);
            let Some(reply) = self.read(&mut conn, &cmd)? else {
                continue;
            };
            self.fresh = false;
            // A cluster connection follows MOVED to another node by itself:
            // after a timeout or an unblock, make sure the waker targets the
            // connection that blocks now.
            if conn.is_cluster() && matches!(reply, Value::Nil) {
                self.publish_client_id(&mut conn)?;
            }
            let delivered = self.handle_batch(&mut conn, reply)?;
            self.sent = started;
            self.retry_deferred();
            #[cfg(debug_assertions)]
            if delivered {
                self.debug_hold(&mut conn)?;
            }
            #[cfg(not(debug_assertions))]
            let _ = delivered;
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
                recv(subs) -> msg => match msg {
                    Ok(msg) => self.take(msg),
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

    /// Delivers one `XREAD` reply, after looking for gaps in it (which may
    /// take one more round trip). Returns whether it had any entry.
    fn handle_batch(&mut self, conn: &mut Conn, reply: Value) -> Result<bool, RedisError> {
        let Some(streams) = xread_streams(reply) else {
            warn!("unexpected XREAD reply shape; ignored");
            return Ok(false);
        };
        if self.detect {
            self.look_for_gaps(conn, &streams)?;
        }
        let any = !streams.is_empty();
        for (key, entries) in streams {
            let Some(&p) = self.key_index.get(&key) else {
                warn!(key = %String::from_utf8_lossy(&key), "XREAD returned an unknown stream");
                continue;
            };
            let mut newest = None;
            for (id, fields) in entries {
                let Some(id) = parse_id(id) else {
                    self.metrics.skipped(Skip::Malformed);
                    warn!(stream = %self.parts[p].key, "skipping entry with an unreadable id");
                    continue;
                };
                newest = Some(id);
                self.deliver(p, id, fields);
            }
            // ringcast_broker_read_lag_seconds: how old the newest entry
            // of this read was, once per partition per batch.
            if let Some(id) = newest {
                let partitions = self.settings.partitions();
                self.metrics
                    .read_up_to(self.base + p as u32, partitions, id.ms);
            }
        }
        Ok(any)
    }

    fn deliver(&mut self, p: usize, id: MsgId, fields: Value) {
        let partitions = self.settings.partitions();
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
        if let Some(p) = entry.presence {
            // Delivered in order with the topic's messages; never cached,
            // so never replayed by a recovery.
            let frame = crate::protocol::encode_presence_event(&entry.topic, p.join, &p.user);
            let user: std::sync::Arc<str> = p.user.into();
            self.bus
                .presence(&entry.topic, &user, &frame, &self.interest);
            self.metrics.entries_read.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(key) = &entry.key {
            let window = self.settings.idempotency_window.as_millis() as u64;
            if part.keys.repeats(&entry.topic, key, id, window) {
                self.metrics.skipped(Skip::Duplicate);
                trace!(topic = %entry.topic, id = %id, "duplicate key: not delivered");
                return;
            }
        }
        let frame = encode_msg(&entry.topic, id, entry.event.as_deref(), &entry.data);
        trace!(topic = %entry.topic, id = %id, "deliver");
        self.bus.deliver(&entry.topic, id, &frame, &self.interest);
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
