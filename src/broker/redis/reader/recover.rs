//! How the reader answers `sub`s: from the cache, by parking them while the
//! cache warms, or by asking a recovery worker to read Redis and joining its
//! answer with the tail kept meanwhile (the reader's module docs give the
//! whole picture). Everything here runs on the reader thread and never
//! waits on Redis.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{Reader, DEFER_LIMIT};
use crate::broker::redis::entry::partition;
use crate::broker::redis::worker::{Done, Job, Task, WarmPage};
use crate::broker::SubscribeRequest;
use crate::id::{MsgId, Since};
use crate::topic::TopicName;

/// Distinct recoveries (and probes) one reader keeps in flight at most;
/// past it a recovery that needs Redis is refused (`recovered:false`) and
/// counted, rather than queueing reads without bound.
const MAX_IN_FLIGHT: usize = 1024;
/// Bytes of frames one reader keeps aside for recoveries in flight (their
/// tails). A recovery whose tail does not fit is made up from the cache or
/// by reading the rest of its range again.
const TAIL_BUDGET: usize = 16 << 20;
/// Times a recovery reads the rest of its range again before giving up
/// (`recovered:false`); only a tail over its budget needs it.
const MAX_ATTEMPTS: u32 = 3;
/// `sub`s that may wait for a partition's cache to warm; past it they are
/// recovered from Redis at once.
const PARK_LIMIT: usize = 65_536;

/// A recovery from Redis in flight: a worker reads `(from, upto]`, this
/// thread keeps the topic's frames delivered after `upto` in `tail`.
#[derive(Debug)]
pub(super) struct Recovery {
    /// The worker job reading the range now.
    job: u64,
    /// The clients' `since` (identical recoveries join one).
    since: MsgId,
    /// The epoch the range belongs to.
    epoch: Arc<str>,
    /// The upper bound of the range being read.
    upto: MsgId,
    waiters: Vec<SubscribeRequest>,
    /// Frames of earlier reads of this recovery (after a dropped tail).
    frames: Vec<Bytes>,
    tail: Vec<Bytes>,
    tail_bytes: usize,
    /// The tail went over [`TAIL_BUDGET`] and was dropped.
    overflowed: bool,
    attempts: u32,
}

impl Recovery {
    /// A recovery of `(since, upto]` in `epoch`, read by worker job `job`,
    /// with nothing read or kept yet.
    fn new(job: u64, since: MsgId, epoch: Arc<str>, upto: MsgId) -> Recovery {
        Recovery {
            job,
            since,
            epoch,
            upto,
            waiters: Vec::new(),
            frames: Vec::new(),
            tail: Vec::new(),
            tail_bytes: 0,
            overflowed: false,
            attempts: 0,
        }
    }

    /// Keeps a frame delivered while the range is read, within the budget
    /// `total` shared by the reader's recoveries.
    pub(super) fn keep(&mut self, frame: &Bytes, total: &mut usize) {
        if self.overflowed {
            return;
        }
        if *total + frame.len() > TAIL_BUDGET {
            *total -= self.tail_bytes;
            self.tail = Vec::new();
            self.tail_bytes = 0;
            self.overflowed = true;
            return;
        }
        *total += frame.len();
        self.tail_bytes += frame.len();
        self.tail.push(frame.clone());
    }
}

impl Reader {
    /// Answers one `sub` now from what this thread has, or starts what it
    /// needs: a warm-up to finish, a worker read, or the reader to reach
    /// `since`.
    pub(super) fn answer(&mut self, req: SubscribeRequest) {
        let p = self.local(&req.topic);
        let part = &self.parts[p];
        let since = match &req.since {
            None => return self.reply(req, p, Vec::new(), None),
            Some(Since { epoch, .. }) if epoch.as_deref() != Some(&*part.epoch) => {
                return self.reply(req, p, Vec::new(), Some(false));
            }
            Some(Since { id, .. }) => *id,
        };
        if since < part.cut {
            // Entries after `since` were lost before this reader read them
            // (`check.rs`): no replay can be complete.
            return self.reply(req, p, Vec::new(), Some(false));
        }
        if since > part.last {
            // Past what this reader has read: it waits for the reader if
            // the stream has reached `since` (a worker asks Redis).
            if self.is_down {
                return self.reply(req, p, Vec::new(), Some(false));
            }
            return self.probe(req, p);
        }
        if since >= part.floor {
            self.metrics
                .recoveries_cached
                .fetch_add(1, Ordering::Relaxed);
            let replay = self.replay_cached(p, since, &req.topic);
            return self.reply(req, p, replay, Some(true));
        }
        if part.warming.is_some() && part.parked.len() < PARK_LIMIT {
            self.parts[p].parked.push(req);
            return;
        }
        self.recover(p, since, req);
    }

    /// Sends the `Subscribed` answer for `req`, with the partition's
    /// epoch and this reader's position in it: every later `Deliver` of
    /// the partition has a greater id, and every node reads the same
    /// stream, so that `last` recovers on any node.
    fn reply(&self, req: SubscribeRequest, p: usize, replay: Vec<Bytes>, recovered: Option<bool>) {
        let part = &self.parts[p];
        self.bus.subscribed(
            (req.reply, req.topic),
            replay,
            recovered,
            (part.epoch.clone(), part.last),
        );
    }

    /// The index in `parts` of `topic`'s partition, which this reader
    /// reads (the broker routes each `sub` to its partition's reader).
    pub(super) fn local(&self, topic: &TopicName) -> usize {
        (partition(topic.as_str(), self.settings.partitions()) - self.base) as usize
    }

    /// Hands `job` to the workers; false when their queue is full.
    fn dispatch(&mut self, job: Job) -> bool {
        let task = Task {
            job,
            back: self.links.done.0.clone(),
            reader: self.links.index,
        };
        self.links.tasks.try_send(task).is_ok()
    }

    fn job_id(&mut self) -> u64 {
        self.next_job += 1;
        self.next_job
    }

    /// Refuses a recovery that would wait for a read without bound.
    fn shed(&self, req: SubscribeRequest, p: usize) {
        self.metrics.recoveries_shed.fetch_add(1, Ordering::Relaxed);
        warn!(topic = %req.topic, "too many recoveries in flight: answering recovered:false");
        self.reply(req, p, Vec::new(), Some(false));
    }

    /// Asks a worker for the stream's newest id, for a `since` ahead of
    /// this reader.
    fn probe(&mut self, req: SubscribeRequest, p: usize) {
        let id = self.job_id();
        let job = Job::Probe {
            id,
            key: self.parts[p].key.clone(),
        };
        if self.probes.len() >= MAX_IN_FLIGHT || !self.dispatch(job) {
            return self.shed(req, p);
        }
        self.probes.insert(id, req);
    }

    /// Recovers from Redis: joins an identical recovery in flight, or asks a
    /// worker for `(since, last]`.
    fn recover(&mut self, p: usize, since: MsgId, req: SubscribeRequest) {
        if let Some(r) = self
            .recoveries
            .get_mut(&req.topic)
            .and_then(|rs| rs.iter_mut().find(|r| r.since == since))
        {
            self.metrics
                .recoveries_redis
                .fetch_add(1, Ordering::Relaxed);
            r.waiters.push(req);
            return;
        }
        let upto = self.parts[p].last;
        let id = self.job_id();
        let job = Job::Range {
            id,
            key: self.parts[p].key.clone(),
            p: self.base + p as u32,
            topic: req.topic.clone(),
            from: since,
            upto,
            limit: self.replay_limit,
        };
        if self.in_flight >= MAX_IN_FLIGHT || !self.dispatch(job) {
            return self.shed(req, p);
        }
        self.metrics
            .recoveries_redis
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.recovery_ranges.fetch_add(1, Ordering::Relaxed);
        self.in_flight += 1;
        let recovery = Recovery::new(id, since, self.parts[p].epoch.clone(), upto);
        let topic = req.topic.clone();
        let rs = self.recoveries.entry(topic).or_default();
        rs.push(recovery);
        if let Some(r) = rs.last_mut() {
            r.waiters.push(req);
        }
    }

    /// Handles a worker's answer.
    pub(super) fn on_done(&mut self, done: Done) {
        match done {
            Done::Range { id, topic, result } => {
                // A failed read was logged by the worker; the clients refetch.
                self.range_done(id, &topic, result.unwrap_or_default());
            }
            Done::Probe { id, result } => self.probe_done(id, result.ok().flatten()),
            Done::Warm {
                local,
                cursor,
                result,
            } => {
                let page = result
                    .map_err(|e| warn!(error = %e, "cannot warm the recent-entry cache"))
                    .ok();
                self.warm_done(local, cursor, page);
            }
        }
    }

    /// A range was read (`None`: not all of it is retained, or the read
    /// failed): replay it and the tail, or read on.
    fn range_done(&mut self, id: u64, topic: &TopicName, frames: Option<Vec<(MsgId, Bytes)>>) {
        let Some(rs) = self.recoveries.get_mut(topic) else {
            return;
        };
        let Some(i) = rs.iter().position(|r| r.job == id) else {
            return;
        };
        let mut r = rs.swap_remove(i);
        if rs.is_empty() {
            self.recoveries.remove(topic);
        }
        self.in_flight -= 1;
        self.tail_bytes -= r.tail_bytes;
        let p = self.local(topic);
        let part = &self.parts[p];
        // What the live path skipped as a repeated key is not replayed
        // either: a recovering client sees what a connected one saw.
        let frames = frames.map(|f| part.keys.without_skipped(f));
        let replay = match frames {
            // Redis lost the history meanwhile: the range is of another epoch.
            _ if *part.epoch != *r.epoch => None,
            // The stream lost entries after `since` meanwhile: the tail
            // kept since has a hole.
            _ if r.since < part.cut => None,
            None => None,
            Some(frames) if !r.overflowed => {
                r.frames.extend(frames);
                r.frames.append(&mut r.tail);
                Some(r.frames)
            }
            // The tail was dropped; the cache still has what followed.
            Some(frames) if part.floor <= r.upto => {
                r.frames.extend(frames);
                r.frames.extend(self.replay_cached(p, r.upto, topic));
                Some(r.frames)
            }
            Some(frames) if r.attempts < MAX_ATTEMPTS => {
                r.frames.extend(frames);
                return self.read_on(p, r);
            }
            Some(_) => {
                warn!(topic = %topic, "recovery gave up: the topic outran its tail budget");
                None
            }
        };
        let recovered = replay.is_some();
        self.reply_all(r.waiters, p, replay.unwrap_or_default(), recovered);
    }

    /// Reads the rest of a recovery whose tail was dropped: `(upto, last]`.
    fn read_on(&mut self, p: usize, mut r: Recovery) {
        let id = self.job_id();
        let upto = self.parts[p].last;
        let topic = r.waiters.first().map(|w| w.topic.clone());
        let Some(topic) = topic else { return };
        let job = Job::Range {
            id,
            key: self.parts[p].key.clone(),
            p: self.base + p as u32,
            topic: topic.clone(),
            from: r.upto,
            upto,
            limit: self.replay_limit,
        };
        if !self.dispatch(job) {
            self.metrics
                .recoveries_shed
                .fetch_add(r.waiters.len() as u64, Ordering::Relaxed);
            return self.reply_all(r.waiters, p, Vec::new(), false);
        }
        debug!(topic = %topic, attempt = r.attempts + 1, "recovery reads on past a dropped tail");
        self.metrics.recovery_ranges.fetch_add(1, Ordering::Relaxed);
        r.job = id;
        r.upto = upto;
        r.overflowed = false;
        r.attempts += 1;
        self.in_flight += 1;
        self.recoveries.entry(topic).or_default().push(r);
    }

    fn reply_all(&self, waiters: Vec<SubscribeRequest>, p: usize, replay: Vec<Bytes>, ok: bool) {
        let n = waiters.len();
        let mut replay = Some(replay);
        for (i, req) in waiters.into_iter().enumerate() {
            let frames = if i + 1 == n {
                replay.take().unwrap_or_default()
            } else {
                replay.clone().unwrap_or_default()
            };
            self.reply(req, p, frames, Some(ok));
        }
    }

    /// The stream's newest id arrived for a `since` ahead of this reader.
    fn probe_done(&mut self, id: u64, newest: Option<MsgId>) {
        let Some(req) = self.probes.remove(&id) else {
            return;
        };
        let p = self.local(&req.topic);
        let since = req.since.as_ref().map_or(MsgId::default(), |s| s.id);
        if since <= self.parts[p].last {
            // Reached meanwhile.
            self.answer(req);
        } else if newest.is_some_and(|n| n >= since) {
            debug!(topic = %req.topic, since = %since, "sub waits for the reader to reach since");
            self.deferred.push((req, Instant::now() + DEFER_LIMIT));
        } else {
            self.reply(req, p, Vec::new(), Some(false));
        }
    }

    /// Answers deferred `sub`s the reader has reached, and refuses those
    /// past their deadline (or while the reader has no connection).
    pub(super) fn retry_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let now = Instant::now();
        for (req, deadline) in std::mem::take(&mut self.deferred) {
            let p = self.local(&req.topic);
            let reached = req
                .since
                .as_ref()
                .is_some_and(|s| s.id <= self.parts[p].last);
            if reached {
                self.answer(req);
            } else if now >= deadline || self.is_down {
                self.reply(req, p, Vec::new(), Some(false));
            } else {
                self.deferred.push((req, deadline));
            }
        }
    }

    pub(super) fn replay_cached(&self, p: usize, since: MsgId, topic: &TopicName) -> Vec<Bytes> {
        let cache = &self.parts[p].cache;
        let start = cache.partition_point(|c| c.id <= since);
        cache
            .range(start..)
            .filter(|c| c.topic == *topic)
            .map(|c| c.frame.clone())
            .collect()
    }

    /// Starts warming every partition's cache from the stream's tail, back
    /// from where this reader starts, within the cache budget.
    pub(super) fn start_warming(&mut self) {
        if self.cache_budget == 0 {
            return;
        }
        for local in 0..self.parts.len() {
            let part = &self.parts[local];
            // An empty stream has nothing to warm from.
            if part.warming.is_none() && part.last != MsgId::default() {
                self.warm(local, part.floor);
            }
        }
    }

    /// Asks a worker for the page of the tail at or before `cursor`.
    fn warm(&mut self, local: usize, cursor: MsgId) -> bool {
        let job = Job::Warm {
            local,
            key: self.parts[local].key.clone(),
            p: self.base + local as u32,
            cursor,
        };
        let asked = self.dispatch(job);
        if asked {
            self.parts[local].warming = Some(cursor);
        }
        asked
    }

    /// A page of the tail arrived (`None`: it could not be read): put it in
    /// front of the cache, then read the next one or release the `sub`s
    /// that waited.
    fn warm_done(&mut self, local: usize, cursor: MsgId, page: Option<WarmPage>) {
        let budget = self.cache_budget;
        let part = &mut self.parts[local];
        if part.warming != Some(cursor) {
            return;
        }
        part.warming = None;
        let next = match page {
            // The cache moved on meanwhile (evicted, or cleared with a new
            // epoch): this page no longer joins it.
            Some(_) if part.floor != cursor => None,
            None => None,
            Some(page) => {
                let mut room = true;
                for c in page.entries {
                    // The page starts at the floor, which may be cached.
                    if part.cache.front().is_some_and(|f| c.id >= f.id) {
                        continue;
                    }
                    // Older than a gap: no recovery may use it.
                    if c.id < part.cut {
                        room = false;
                        break;
                    }
                    if part.cache_bytes + c.size() > budget {
                        room = false;
                        break;
                    }
                    part.cache_bytes += c.size();
                    part.floor = c.id;
                    part.cache.push_front(c);
                }
                // Every valid entry from the page's oldest on is cached now.
                if room {
                    if let Some(oldest) = page.oldest {
                        part.floor = part.floor.min(oldest);
                    }
                }
                (room && page.full).then_some(part.floor)
            }
        };
        if let Some(cursor) = next {
            if self.warm(local, cursor) {
                return;
            }
        }
        let part = &mut self.parts[local];
        debug!(stream = %part.key, entries = part.cache.len(), bytes = part.cache_bytes, "partition cache warmed");
        let parked = std::mem::take(&mut part.parked);
        if self.parts.iter().all(|p| p.warming.is_none()) {
            let entries: usize = self.parts.iter().map(|p| p.cache.len()).sum();
            let bytes: usize = self.parts.iter().map(|p| p.cache_bytes).sum();
            info!(entries, bytes, "recent-entry cache warmed");
        }
        for req in parked {
            self.answer(req);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recovery() -> Recovery {
        Recovery::new(1, MsgId::default(), Arc::from("e"), MsgId::default())
    }

    #[test]
    fn tails_share_one_budget_and_an_overflowing_one_is_dropped() {
        let (mut a, mut b) = (recovery(), recovery());
        let mut total = 0;
        let half = Bytes::from(vec![0u8; TAIL_BUDGET / 2]);
        a.keep(&half, &mut total);
        b.keep(&half, &mut total);
        assert_eq!((a.tail.len(), b.tail.len(), total), (1, 1, TAIL_BUDGET));
        // Past the budget: b drops its tail (and gives its bytes back).
        b.keep(&Bytes::from_static(b"x"), &mut total);
        assert!(b.overflowed && b.tail.is_empty() && b.tail_bytes == 0);
        assert_eq!(total, a.tail_bytes);
        b.keep(&Bytes::from_static(b"y"), &mut total);
        assert!(b.tail.is_empty(), "a dropped tail stays dropped");
        a.keep(&Bytes::from_static(b"z"), &mut total);
        assert_eq!((a.tail.len(), a.overflowed), (2, false));
    }
}
