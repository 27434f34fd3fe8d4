//! Publishing to the partition streams: the commands (a plain `XADD`, or
//! the keyed script of an idempotent publish), the one-shot publish of
//! `ringcast publish --redis`, and the publisher thread, which pipelines
//! what the shards queued into one round trip per batch.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ::redis::Value;
use crossbeam_channel::Receiver;
use tracing::{info, warn};

use super::{connect, partition, Conn, Error, Settings};
use crate::broker::Replier;
use crate::bus::Bus;
use crate::id::MsgId;
use crate::metrics::BrokerMetrics;
use crate::topic::TopicName;

/// Publishes sent in one pipelined round trip at most.
const PUBLISH_BATCH: usize = 512;
/// A publisher connection idle this long is checked with PING before use.
const PUBLISH_IDLE_CHECK: Duration = Duration::from_secs(1);
/// After a failed connect, the publisher fails publishes at once for this long.
const PUBLISH_RETRY_AFTER: Duration = Duration::from_millis(200);

/// The `XADD` of one message: `MAXLEN ~ maxlen`, auto id.
pub fn xadd_cmd(settings: &Settings, topic: &str, event: Option<&str>, data: &str) -> ::redis::Cmd {
    let p = partition(topic, settings.partitions());
    let mut cmd = ::redis::cmd("XADD");
    cmd.arg(settings.keys.stream(p))
        .arg("MAXLEN")
        .arg("~")
        .arg(settings.maxlen)
        .arg("*")
        .arg("topic")
        .arg(topic)
        .arg("data")
        .arg(data);
    if let Some(e) = event {
        cmd.arg("event").arg(e);
    }
    cmd
}

/// Where the first id of a keyed publish is kept for the window:
/// `STREAM:idem:TOPIC KEY`, after the topic's stream key, so its hash tag
/// puts it in the stream's cluster slot whatever the key layout (a script
/// may touch only one slot); topics have no spaces, so the first space
/// ends the topic.
pub fn idempotency_key(settings: &Settings, topic: &str, key: &str) -> String {
    let p = partition(topic, settings.partitions());
    format!("{}:idem:{topic} {key}", settings.keys.stream(p))
}

/// A keyed publish, atomically in Redis: the first id of the topic and key
/// if Redis still holds it, else the `XADD` (with the `key` field, so every
/// reader also knows it) and that id kept for the window. Of any number of
/// concurrent duplicates from any nodes, one appends; all get its id.
const KEYED_XADD: &str = "local first = redis.call('GET', KEYS[2]) \
if first then return first end \
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3)) \
redis.call('SET', KEYS[2], id, 'PX', ARGV[2]) \
return id";

/// The publish of one message: a plain `XADD`, or with a `key` the
/// `KEYED_XADD` script. Both answer the entry id.
pub fn publish_cmd(
    settings: &Settings,
    topic: &str,
    event: Option<&str>,
    data: &str,
    key: Option<&str>,
) -> ::redis::Cmd {
    let Some(key) = key else {
        return xadd_cmd(settings, topic, event, data);
    };
    let p = partition(topic, settings.partitions());
    let mut cmd = ::redis::cmd("EVAL");
    cmd.arg(KEYED_XADD)
        .arg(2)
        .arg(settings.keys.stream(p))
        .arg(idempotency_key(settings, topic, key))
        .arg(settings.maxlen)
        .arg(settings.idempotency_window.as_millis().max(1) as u64)
        .arg("topic")
        .arg(topic)
        .arg("data")
        .arg(data)
        .arg("key")
        .arg(key);
    if let Some(e) = event {
        cmd.arg("event").arg(e);
    }
    cmd
}

/// Publishes one message with a fresh connection (`ringcast publish --redis`).
pub fn publish_once(
    settings: &Settings,
    topic: &str,
    event: Option<&str>,
    data: &str,
    key: Option<&str>,
) -> Result<MsgId, Error> {
    let mut conn = connect(&settings.url, Some(Duration::from_secs(5))).map_err(|source| {
        Error::Unreachable {
            url: settings.url.clone(),
            source,
        }
    })?;
    let v: Value = publish_cmd(settings, topic, event, data, key).query(&mut conn)?;
    xadd_id(v)
}

fn xadd_id(v: Value) -> Result<MsgId, Error> {
    let text = match &v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => return Err(Error::BadReply(format!("{other:?}"))),
    };
    text.parse().map_err(|_| Error::BadReply(text))
}

/// One queued publish.
#[derive(Debug)]
pub(super) struct PubReq {
    pub(super) reply: Option<Replier>,
    pub(super) topic: TopicName,
    pub(super) event: Option<Box<str>>,
    pub(super) data: String,
    /// (v1.2) The idempotency key, written as the entry's `key` field.
    pub(super) key: Option<Box<str>>,
}

pub(super) fn fail(bus: &Bus, req: PubReq, why: &str) {
    if let Some(reply) = req.reply {
        reply.answer(bus, req.topic, Err(why.to_string()));
    }
}

/// The publisher thread: takes everything queued (up to a batch), sends it
/// as one pipeline, answers each publisher.
pub(super) fn publisher(
    settings: &Settings,
    bus: &Bus,
    rx: &Receiver<PubReq>,
    metrics: &BrokerMetrics,
) {
    let mut conn: Option<Conn> = None;
    let mut failed_at: Option<Instant> = None;
    let mut last_used = Instant::now();
    let mut seen_disconnects = metrics.reader_disconnects.load(Ordering::Relaxed);
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // An idle connection may have died unnoticed (Redis restarted): check
        // it before sending, when resending could not duplicate anything.
        // The reader losing its connection is a strong hint ours is gone too.
        let disconnects = metrics.reader_disconnects.load(Ordering::Relaxed);
        if last_used.elapsed() >= PUBLISH_IDLE_CHECK || disconnects != seen_disconnects {
            seen_disconnects = disconnects;
            if let Some(c) = conn.as_mut() {
                if ::redis::cmd("PING").query::<String>(c).is_err() {
                    conn = None;
                    failed_at = None;
                }
            }
        }
        last_used = Instant::now();
        if conn.is_none() && failed_at.is_none_or(|t| t.elapsed() >= PUBLISH_RETRY_AFTER) {
            match connect(&settings.url, Some(Duration::from_secs(5))) {
                Ok(c) => {
                    if failed_at.take().is_some() {
                        info!("redis publisher reconnected");
                    }
                    conn = Some(c);
                }
                Err(e) => {
                    warn!(error = %e, "redis publisher cannot connect");
                    failed_at = Some(Instant::now());
                }
            }
        }
        let results = match conn.as_mut() {
            Some(c) => {
                metrics.publish_round_trips.fetch_add(1, Ordering::Relaxed);
                c.pipeline_each(
                    batch
                        .iter()
                        .map(|r| {
                            let (event, key) = (r.event.as_deref(), r.key.as_deref());
                            publish_cmd(settings, r.topic.as_str(), event, &r.data, key)
                        })
                        .collect(),
                )
            }
            None => {
                for r in batch.drain(..) {
                    fail(bus, r, "broker unavailable: cannot reach Redis");
                }
                continue;
            }
        };
        match results {
            Ok(values) if values.len() == batch.len() => {
                for (r, v) in batch.drain(..).zip(values) {
                    answer_publish(bus, r, v);
                }
            }
            Ok(_) | Err(_) => {
                if let Err(e) = &results {
                    warn!(error = %e, n = batch.len(), "redis publish failed; reconnecting");
                }
                conn = None;
                failed_at = Some(Instant::now());
                // Some of these may have been written: the publisher is told
                // it failed and may publish again (at-least-once).
                for r in batch.drain(..) {
                    fail(bus, r, "broker unavailable: Redis connection lost");
                }
            }
        }
    }
}

fn answer_publish(bus: &Bus, req: PubReq, v: Value) {
    let result = match v {
        Value::ServerError(e) => Err(format!("redis refused the publish: {e}")),
        v => xadd_id(v).map_err(|e| e.to_string()),
    };
    if let Some(reply) = req.reply {
        reply.answer(bus, req.topic, result);
    }
}
