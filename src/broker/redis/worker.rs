//! Recovery workers: the Redis reads that recovery needs, done on threads of
//! their own, each on its own connection, so a reader never stops
//! delivering while a `sub` pages through a partition.
//!
//! A worker owns no state of a reader. It takes a [`Task`] (a range of one
//! partition filtered by topic, the newest id of a stream, or one page of a
//! partition's tail to warm the cache), answers on the reader's `done`
//! channel and wakes the reader through the waker. The reader alone decides
//! what an answer means: it joins a range with what it delivered since the
//! range's upper bound, so replay and live meet without gap or duplicate
//! (see `reader.rs`). A worker never talks to the shards.

use std::sync::Arc;
use std::time::Duration;

use ::redis::{RedisError, Value};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use tracing::{debug, warn};

use super::entry::{decode_entry, has_topic, parse_id, range_entries, Cached, Retained};
use super::{connect, Conn, Wakes};
use crate::id::MsgId;
use crate::protocol::encode_msg;
use crate::topic::TopicName;

/// Entries per `XRANGE` page during recovery.
const RANGE_PAGE: usize = 1000;
/// Entries per `XREVRANGE` page when warming the cache.
pub(crate) const WARM_PAGE: usize = 1000;
/// Read timeout of a worker's connection: one page, not a blocking read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A read a reader asks a worker to do.
#[derive(Debug)]
pub(crate) enum Job {
    /// `XRANGE key (from upto`, the entries of `topic` only, then whether
    /// the stream still holds everything after `from` (`XINFO STREAM`).
    Range {
        /// The reader's number for this recovery.
        id: u64,
        /// The partition stream.
        key: String,
        /// Its partition number (entries of other partitions are skipped).
        p: u32,
        /// The topic recovered.
        topic: TopicName,
        /// Exclusive lower bound: the client's `since`.
        from: MsgId,
        /// Inclusive upper bound: the last id the reader had processed.
        upto: MsgId,
        /// Bytes of frames past which reading stops: the subscriber's
        /// outbound queue could not take the replay (see `range`).
        limit: usize,
    },
    /// The newest id of a stream (`XREVRANGE key + - COUNT 1`), for a
    /// `since` ahead of what the reader has read.
    Probe {
        /// The reader's number for this probe.
        id: u64,
        /// The partition stream.
        key: String,
    },
    /// Up to [`WARM_PAGE`] entries at or before `cursor`, newest first.
    Warm {
        /// The partition's index in its reader.
        local: usize,
        /// The partition stream.
        key: String,
        /// Its partition number.
        p: u32,
        /// Inclusive upper bound.
        cursor: MsgId,
    },
}

/// A job with where to answer.
#[derive(Debug)]
pub(crate) struct Task {
    pub(crate) job: Job,
    /// The asking reader's answer channel.
    pub(crate) back: Sender<Done>,
    /// The asking reader, for the waker.
    pub(crate) reader: usize,
}

/// A worker's answer.
#[derive(Debug)]
pub(crate) enum Done {
    /// The topic's frames in the range, or `None` when some of it is no
    /// longer retained.
    Range {
        /// As in the job.
        id: u64,
        /// As in the job.
        topic: TopicName,
        /// What was read.
        result: Result<Option<Vec<Bytes>>, RedisError>,
    },
    /// The stream's newest id (`None`: the stream is empty or missing).
    Probe {
        /// As in the job.
        id: u64,
        /// What was read.
        result: Result<Option<MsgId>, RedisError>,
    },
    /// One page of a partition's tail.
    Warm {
        /// As in the job.
        local: usize,
        /// As in the job.
        cursor: MsgId,
        /// What was read.
        result: Result<WarmPage, RedisError>,
    },
}

/// One page of a partition's tail, for the cache.
#[derive(Debug, Default)]
pub(crate) struct WarmPage {
    /// The valid entries, newest first.
    pub(crate) entries: Vec<Cached>,
    /// The oldest id read (valid or not).
    pub(crate) oldest: Option<MsgId>,
    /// Whether the page was full (older entries may remain).
    pub(crate) full: bool,
}

/// A worker thread: runs tasks until every reader is gone. Connects lazily
/// and again after an error; a failed read is answered as an error, which
/// the reader turns into `recovered:false`.
pub(crate) fn run(url: &str, partitions: u32, tasks: &Receiver<Task>, wakes: &Wakes) {
    let mut conn: Option<Conn> = None;
    while let Ok(task) = tasks.recv() {
        if conn.is_none() {
            match connect(url, Some(READ_TIMEOUT)) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if task.back.send(failed(task.job, e)).is_ok() {
                        wakes.wake(task.reader);
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let done = execute(c, partitions, task.job);
        if done.failed() {
            conn = None;
        }
        // The reader may be gone (broker dropped): nothing left to do.
        if task.back.send(done).is_ok() {
            wakes.wake(task.reader);
        }
    }
}

/// Runs one job on `conn`.
fn execute(conn: &mut Conn, partitions: u32, job: Job) -> Done {
    match job {
        Job::Range {
            id,
            key,
            p,
            topic,
            from,
            upto,
            limit,
        } => {
            let result = range(conn, &key, (p, partitions), &topic, (from, upto), limit);
            if let Err(e) = &result {
                warn!(stream = %key, error = %e, "recovery read failed");
            }
            Done::Range { id, topic, result }
        }
        Job::Probe { id, key } => Done::Probe {
            id,
            result: newest(conn, &key),
        },
        Job::Warm {
            local,
            key,
            p,
            cursor,
        } => Done::Warm {
            local,
            cursor,
            result: warm_page(conn, &key, (p, partitions), cursor),
        },
    }
}

/// The answer to `job` when no connection could be made.
fn failed(job: Job, e: RedisError) -> Done {
    warn!(error = %e, "recovery worker cannot connect");
    match job {
        Job::Range { id, topic, .. } => Done::Range {
            id,
            topic,
            result: Err(e),
        },
        Job::Probe { id, .. } => Done::Probe { id, result: Err(e) },
        Job::Warm { local, cursor, .. } => Done::Warm {
            local,
            cursor,
            result: Err(e),
        },
    }
}

impl Done {
    fn failed(&self) -> bool {
        match self {
            Done::Range { result, .. } => result.is_err(),
            Done::Probe { result, .. } => result.is_err(),
            Done::Warm { result, .. } => result.is_err(),
        }
    }
}

/// `topic`'s frames in `(from, upto]` of `key`, or `None` when some of that
/// range is no longer retained. `part` is (partition, partitions).
///
/// Reading stops once the frames exceed `limit` bytes: the subscriber's
/// outbound queue, which such a replay cannot fit, so its shard answers
/// `recovered:false` (and counts the frames as dropped) whatever follows.
/// A recovery too large for the client never pages through a whole
/// partition into memory.
fn range(
    conn: &mut Conn,
    key: &str,
    part: (u32, u32),
    topic: &TopicName,
    (from, upto): (MsgId, MsgId),
    limit: usize,
) -> Result<Option<Vec<Bytes>>, RedisError> {
    let end = upto.to_string();
    let mut start = from;
    let mut frames = Vec::new();
    let mut bytes = 0usize;
    let mut read = 0usize;
    loop {
        let v: Value = ::redis::cmd("XRANGE")
            .arg(key)
            .arg(format!("({start}"))
            .arg(&end)
            .arg("COUNT")
            .arg(RANGE_PAGE)
            .query(conn)?;
        let Some(entries) = range_entries(v) else {
            return Ok(None);
        };
        let n = entries.len();
        read += n;
        for (id, fields) in entries {
            let Some(id) = parse_id(id) else { continue };
            start = id;
            // Most entries of a partition belong to other topics: look at
            // the topic before decoding the whole entry.
            if !has_topic(&fields, topic.as_str()) {
                continue;
            }
            match decode_entry(fields, part.0, part.1) {
                // Presence entries are never replayed.
                Ok(e) if e.topic == *topic && e.presence.is_none() => {
                    let frame = encode_msg(&e.topic, id, e.event.as_deref(), &e.data);
                    bytes += frame.len();
                    frames.push(frame);
                }
                _ => {}
            }
        }
        if bytes > limit {
            debug!(stream = %key, read, bytes, limit, "recovery range over the replay limit");
            return Ok(Some(frames));
        }
        if n < RANGE_PAGE {
            break;
        }
    }
    debug!(stream = %key, read, frames = frames.len(), "recovery range read");
    // Checked after reading: trimming only moves forward, so if nothing
    // after `from` is gone now, nothing was gone while we read.
    let info = match ::redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query::<Value>(conn)
    {
        Ok(v) => Retained::from_xinfo(v),
        // The stream no longer exists.
        Err(e) if e.code() == Some("ERR") => None,
        Err(e) => return Err(e),
    };
    Ok(info.filter(|r| r.covers(from)).map(|_| frames))
}

/// The newest id of `key`.
pub(crate) fn newest(conn: &mut Conn, key: &str) -> Result<Option<MsgId>, RedisError> {
    let v: Value = ::redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(conn)?;
    Ok(range_entries(v)
        .and_then(|e| e.into_iter().next())
        .and_then(|(id, _)| parse_id(id)))
}

/// Up to [`WARM_PAGE`] entries of `key` at or before `cursor`, decoded and
/// encoded once, as the reader would have cached them.
fn warm_page(
    conn: &mut Conn,
    key: &str,
    part: (u32, u32),
    cursor: MsgId,
) -> Result<WarmPage, RedisError> {
    let v: Value = ::redis::cmd("XREVRANGE")
        .arg(key)
        .arg(cursor.to_string())
        .arg("-")
        .arg("COUNT")
        .arg(WARM_PAGE)
        .query(conn)?;
    let Some(entries) = range_entries(v) else {
        return Ok(WarmPage::default());
    };
    let mut page = WarmPage {
        full: entries.len() >= WARM_PAGE,
        entries: Vec::with_capacity(entries.len()),
        oldest: None,
    };
    for (id, fields) in entries {
        let Some(id) = parse_id(id) else { continue };
        page.oldest = Some(id);
        // Invalid entries were (or will be) counted by whichever reader
        // delivered them live; here they are only left out.
        // Presence entries are never replayed, so never cached.
        if let Ok(e) =
            decode_entry(fields, part.0, part.1).map(|e| e.presence.is_none().then_some(e))
        {
            let Some(e) = e else { continue };
            let frame = encode_msg(&e.topic, id, e.event.as_deref(), &e.data);
            page.entries.push(Cached {
                id,
                topic: e.topic,
                frame,
            });
        }
    }
    Ok(page)
}

/// Starts `n` workers over one task queue.
pub(crate) fn spawn(
    n: usize,
    url: &str,
    partitions: u32,
    tasks: &Receiver<Task>,
    wakes: &Arc<Wakes>,
) -> std::io::Result<()> {
    for i in 0..n {
        let (url, tasks, wakes) = (url.to_owned(), tasks.clone(), wakes.clone());
        std::thread::Builder::new()
            .name(format!("redis-recovery-{i}"))
            .spawn(move || run(&url, partitions, &tasks, &wakes))?;
    }
    Ok(())
}
