//! When and how the reader looks for gaps (`gap.rs` judges what it sees),
//! and what it does about one. A look is an `XINFO STREAM` of a partition:
//! in the same pipeline as the `XREAD`, so Redis answers it at the instant
//! the read starts, or, for a batch that snapshot cannot vouch for, in one
//! more round trip after the read and before the batch is delivered. On a
//! Redis Cluster a reader has one partition, so its pipeline stays within
//! that partition's slot.
//!
//! # When (the check policy) and what it costs
//!
//! Measured with `INFO commandstats` on Redis 7.0.15 here (100-byte
//! entries): `XINFO STREAM` costs 3.9 µs, an `XREAD` over 16 streams that
//! finds nothing 3.3 µs, one returning 10 entries 12 µs. Looking at all 16
//! partitions on every read adds ~63 µs of Redis CPU per read; a busy
//! reader reads up to ~10 000 times a second (a few entries each), so that
//! would be most of a Redis core. A partition is looked at before a read
//! only when:
//!
//! - the connection is new (the reader may have been away for long);
//! - its retention is at most one read batch ([`READ_COUNT`]): a tiny
//!   `MAXLEN` can be outrun between any two reads;
//! - the previous read returned a full batch of it: the reader is behind,
//!   by an unknown amount (one look per 1000 entries read: 0.3 %);
//! - the previous read was sent more than [`gap::stall_after`] ago: without
//!   being behind, entries are lost only if more than the retention is
//!   appended between two reads, which [`gap::MAX_APPEND_RATE`] does not
//!   allow in less (100 ms for the default `MAXLEN` 100 000). This catches
//!   a stalled or descheduled reader, and an idle one woken up. It fires on
//!   at most one read per window: 10 a second at the default;
//! - it was not looked at for [`gap::CHECK_EVERY`] (1 s): the safety net,
//!   and how a retention another producer set lower than this node's
//!   `MAXLEN` is learned (the retention assumed is the smaller).
//!
//! At the default that is at most ~11 looks at all partitions a second,
//! ~0.7 ms of Redis CPU per node (0.07 % of a core), however busy; with
//! `MAXLEN` ≤ 1000 every read is looked at.
//!
//! After the read, before delivering, a batch (or its part newer than the
//! snapshot: a blocked `XREAD` is woken by the command that appended) that
//! a snapshot before the read cannot vouch for gets a look when it has two
//! entries or more and either the read covered more than `stall_after`
//! (the thread may have stalled between deciding and sending) or it came
//! after the snapshot (one command, a `MULTI` or a script, appended several
//! entries and may have trimmed some: a single `XADD` wakes the reader with
//! its one entry), or when its first id cannot follow the last one read
//! ([`gap::follows`]). Normal traffic meets none of these; a producer that
//! picks its own ids (not `*`) may make every batch look odd, and pays one
//! `XINFO` round trip per read for it.
//!
//! What is left, a gap inside an unlooked read that beats the rate bound,
//! or one in the instant between look and read when the network split the
//! pipeline, is found by the next look that pins the reader's count: late
//! (what followed was delivered), but counted, logged, and recoveries
//! across it refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ::redis::{Cmd, RedisError, Value};
use tracing::{debug, warn};

use super::gap::{self, Gap, Judgement, Snapshot};
use super::{Reader, READ_COUNT};
use crate::broker::redis::entry::{peek_id, RawEntries, Retained};
use crate::broker::redis::Conn;
use crate::id::MsgId;

/// Set once some reader found gap detection unavailable (Redis < 7.0), so
/// the warning is logged once per process, not once per reader.
static UNAVAILABLE_LOGGED: AtomicBool = AtomicBool::new(false);

/// What the reader decided about one partition of one read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Verdict {
    /// The partition.
    p: usize,
    /// Its entries in the reply (index into the streams), if any.
    stream: Option<usize>,
    /// From the snapshot taken with the read.
    before: Option<Judgement>,
    /// Whether it needs a look after the read.
    look: bool,
}

/// Whether a Redis error says the key does not exist (`XINFO STREAM` of a
/// partition nobody wrote to yet).
fn no_such_key(detail: Option<&str>) -> bool {
    detail.is_some_and(|d| d.contains("no such key"))
}

impl Reader {
    /// Chooses the partitions to look at with the next read (module docs).
    pub(super) fn plan_checks(&mut self, now: Instant) {
        self.checking.clear();
        if !self.detect {
            return;
        }
        let idle = now.saturating_duration_since(self.sent);
        for (i, part) in self.parts.iter().enumerate() {
            let due = self.fresh
                || part.full
                || part.retention <= READ_COUNT as u64
                || idle >= gap::stall_after(part.retention)
                || now.saturating_duration_since(part.checked) >= gap::CHECK_EVERY;
            if part.exists && due {
                self.checking.push(i);
            }
        }
    }

    /// Sends `xread`, after an `XINFO STREAM` of each partition planned,
    /// in one pipeline. `None`: on a cluster, the stream looked at does not
    /// exist, which fails the whole pipeline there; nothing was consumed
    /// (the reader's position did not move), so the caller reads again.
    pub(super) fn read(
        &mut self,
        conn: &mut Conn,
        xread: &Cmd,
    ) -> Result<Option<Value>, RedisError> {
        for part in &mut self.parts {
            part.snap = None;
        }
        if self.checking.is_empty() {
            return xread.query(conn).map(Some);
        }
        let mut pipe = ::redis::pipe();
        // One server answers a missing stream in place; see `None` above.
        pipe.ignore_errors();
        for &p in &self.checking {
            pipe.cmd("XINFO").arg("STREAM").arg(&self.parts[p].key);
        }
        pipe.add_command(xread.clone());
        let replies: Vec<Value> = match pipe.query(conn) {
            Ok(r) => r,
            Err(e) if no_such_key(e.detail()) => {
                for p in std::mem::take(&mut self.checking) {
                    self.missing(p);
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut replies = replies.into_iter();
        let checking = std::mem::take(&mut self.checking);
        for &p in &checking {
            self.take_snapshot(p, replies.next());
        }
        self.checking = checking;
        match replies.next() {
            Some(Value::ServerError(e)) => Err(e.into()),
            Some(v) => Ok(Some(v)),
            None => Ok(Some(Value::Nil)),
        }
    }

    /// Records one `XINFO STREAM` answer as partition `p`'s snapshot.
    fn take_snapshot(&mut self, p: usize, v: Option<Value>) {
        self.metrics.gap_checks.fetch_add(1, Ordering::Relaxed);
        let retained = match v {
            Some(Value::ServerError(e)) if no_such_key(e.details()) => return self.missing(p),
            Some(Value::ServerError(e)) => {
                debug!(stream = %self.parts[p].key, error = %RedisError::from(e), "XINFO STREAM failed");
                return;
            }
            Some(v) => Retained::from_xinfo(v),
            None => None,
        };
        let Some(retained) = retained else {
            debug!(stream = %self.parts[p].key, "unreadable XINFO STREAM reply");
            return;
        };
        let Some(snap) = Snapshot::from_retained(&retained) else {
            return self.unavailable();
        };
        let maxlen = self.settings.maxlen;
        let part = &mut self.parts[p];
        part.checked = Instant::now();
        part.retention = snap.retention().map_or(maxlen, |r| r.min(maxlen));
        part.snap = Some(snap);
    }

    /// Partition `p`'s stream does not exist (never written, or deleted):
    /// nothing to look at until an entry shows up, and a new stream counts
    /// from zero.
    fn missing(&mut self, p: usize) {
        let part = &mut self.parts[p];
        if part.exists {
            debug!(stream = %part.key, "partition stream does not exist");
        }
        part.exists = false;
        part.count = Some(0);
        part.checked = Instant::now();
    }

    /// Redis reports no `entries-added` (before 7.0): gaps cannot be
    /// detected, so this reader stops looking.
    pub(super) fn unavailable(&mut self) {
        self.detect = false;
        if !UNAVAILABLE_LOGGED.swap(true, Ordering::Relaxed) {
            warn!(
                "Redis before 7.0 reports no entries-added: entries trimmed before this node \
                 read them cannot be detected (upgrade Redis, or keep MAXLEN far above what \
                 one node can fall behind)"
            );
        }
    }

    /// Judges every partition of this read against what Redis says, looks
    /// again where needed, and reports gaps, all before anything of the
    /// batch is delivered.
    pub(super) fn look_for_gaps(
        &mut self,
        conn: &mut Conn,
        streams: &[(Vec<u8>, RawEntries)],
    ) -> Result<(), RedisError> {
        // How long the read may have covered: from the previous one's send.
        let covered = Instant::now().saturating_duration_since(self.sent);
        let mut verdicts = std::mem::take(&mut self.verdicts);
        verdicts.clear();
        for part in &mut self.parts {
            part.full = false;
        }
        for (i, (key, entries)) in streams.iter().enumerate() {
            if let Some(&p) = self.key_index.get(key) {
                verdicts.push(self.before(p, Some(i), entries, covered));
            }
        }
        for &p in &self.checking {
            if !verdicts.iter().any(|v| v.p == p) {
                verdicts.push(self.before(p, None, &[], covered));
            }
        }
        let looks: Vec<usize> = verdicts.iter().filter(|v| v.look).map(|v| v.p).collect();
        if !looks.is_empty() {
            self.look_after(conn, &looks)?;
        }
        for v in &verdicts {
            let entries = v.stream.map_or(&[][..], |i| &streams[i].1[..]);
            self.conclude(v, entries);
        }
        self.verdicts = verdicts;
        Ok(())
    }

    /// What the snapshot taken with the read says about partition `p`'s
    /// batch, and whether the batch needs a look after the read.
    fn before(
        &self,
        p: usize,
        stream: Option<usize>,
        entries: &[(Value, Value)],
        covered: Duration,
    ) -> Verdict {
        let part = &self.parts[p];
        let before = part
            .snap
            .as_ref()
            .map(|s| gap::judge(part.count, part.last, entries, |e| peek_id(&e.0), s));
        // The part of the batch the snapshot cannot vouch for: all of it
        // without one, what is newer than the snapshot with one.
        let vouched = part.snap.map(|s| s.generated).unwrap_or(part.last);
        let fresh_from = match part.snap {
            Some(_) => entries
                .iter()
                .position(|e| peek_id(&e.0).is_some_and(|id| id > vouched))
                .unwrap_or(entries.len()),
            None => 0,
        };
        let unvouched = &entries[fresh_from..];
        let prev = match fresh_from {
            0 => part.last,
            i => peek_id(&entries[i - 1].0).unwrap_or(part.last),
        };
        let stalled = covered >= gap::stall_after(part.retention);
        let several = unvouched.len() >= 2 && (part.snap.is_some() || stalled);
        let odd = unvouched
            .first()
            .and_then(|e| peek_id(&e.0))
            .is_some_and(|first| !gap::follows(prev, first));
        Verdict {
            p,
            stream,
            before,
            look: self.detect && (several || odd),
        }
    }

    /// Looks at `parts` after the read, in one round trip.
    fn look_after(&mut self, conn: &mut Conn, parts: &[usize]) -> Result<(), RedisError> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for &p in parts {
            pipe.cmd("XINFO").arg("STREAM").arg(&self.parts[p].key);
        }
        let replies: Vec<Value> = match pipe.query(conn) {
            Ok(r) => r,
            // A cluster reader looks at its one partition only: gone again.
            Err(e) if no_such_key(e.detail()) => Vec::new(),
            Err(e) => return Err(e),
        };
        for part in &mut self.parts {
            part.after = None;
        }
        let mut replies = replies.into_iter();
        for &p in parts {
            let before = self.parts[p].snap.take();
            self.take_snapshot(p, replies.next());
            let part = &mut self.parts[p];
            part.after = part.snap.take();
            part.snap = before;
        }
        Ok(())
    }

    /// Applies one partition's verdict: reports a gap, moves its count on.
    fn conclude(&mut self, v: &Verdict, entries: &[(Value, Value)]) {
        let part = &mut self.parts[v.p];
        let after = part
            .after
            .take()
            .filter(|_| v.look)
            .map(|s| gap::judge(part.count, part.last, entries, |e| peek_id(&e.0), &s));
        let k = entries.len() as u64;
        let gap = Gap::merge(v.before.and_then(|j| j.gap), after.and_then(|j| j.gap));
        if v.before.is_some_and(|j| j.reset) || after.is_some_and(|j| j.reset) {
            warn!(
                stream = %part.key,
                "partition stream was deleted and written again: counting its entries afresh"
            );
        }
        part.count = match (after, v.before) {
            (Some(j), _) | (None, Some(j)) => j.count,
            (None, None) => part.count.map(|c| c + k),
        };
        part.full = entries.len() >= READ_COUNT;
        part.exists |= k > 0;
        if let Some(gap) = gap {
            self.report(v.p, gap);
        }
    }

    /// Partition `p` lost entries before this reader read them: count it,
    /// log it, close its subscribers on every shard (before anything read
    /// after the gap is delivered: the shards take their inbox in order),
    /// and refuse recoveries that span it.
    fn report(&mut self, p: usize, gap: Gap) {
        self.metrics.gaps.fetch_add(1, Ordering::Relaxed);
        let partitions = self.settings.partitions();
        let global = self.base + p as u32;
        let part = &mut self.parts[p];
        warn!(
            partition = global,
            stream = %part.key,
            read_up_to = %part.last,
            lost_before = %gap.cut,
            lost = gap.lost,
            "stream entries were trimmed or deleted before this node read them; \
             closing the partition's subscribers so they recover"
        );
        self.bus.partition_gap(global, partitions);
        self.cut(p, gap.cut);
    }

    /// Refuses recoveries from a `since` older than `cut` (they would skip
    /// the gap), and drops the cache below it, which can no longer serve a
    /// recovery.
    fn cut(&mut self, p: usize, cut: MsgId) {
        let part = &mut self.parts[p];
        part.cut = part.cut.max(cut);
        while let Some(old) = part.cache.front() {
            if old.id >= part.cut {
                break;
            }
            part.cache_bytes -= old.size();
            part.cache.pop_front();
        }
        // Every entry after the floor is cached: true from the cut on, as
        // only what is read after the gap is cached from now.
        part.floor = part.floor.max(part.cut);
    }

    /// Test-only fault injection (debug builds): see
    /// [`crate::broker::redis::DEBUG_READER_HOLD_ENV`]. Stops reading, once, until the key
    /// exists (at most [`DEBUG_HOLD_LIMIT`]).
    #[cfg(debug_assertions)]
    pub(super) fn debug_hold(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let Some(key) = self.hold.take() else {
            return Ok(());
        };
        warn!(key = %key, "test-only fault injection: the reader holds until the key exists");
        let deadline = Instant::now() + DEBUG_HOLD_LIMIT;
        while Instant::now() < deadline {
            let n: i64 = ::redis::cmd("EXISTS").arg(&key).query(conn)?;
            if n > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// The longest a reader holds for [`crate::broker::redis::DEBUG_READER_HOLD_ENV`].
#[cfg(debug_assertions)]
const DEBUG_HOLD_LIMIT: Duration = Duration::from_secs(30);

/// The hold key named by [`crate::broker::redis::DEBUG_READER_HOLD_ENV`], if set.
#[cfg(debug_assertions)]
pub(super) fn debug_hold_key() -> Option<String> {
    let key = std::env::var(crate::broker::redis::DEBUG_READER_HOLD_ENV).ok()?;
    warn!(
        env = crate::broker::redis::DEBUG_READER_HOLD_ENV,
        key = %key,
        "test-only fault injection: each reader will hold after its first delivery"
    );
    Some(key)
}
