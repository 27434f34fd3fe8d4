//! The embedded broker: one node, no Redis. It assigns ids in the Redis
//! `MS-SEQ` format, keeps a bounded history per topic (by count and by age)
//! for recovery, and hands each message to every shard.
//!
//! One mutex orders everything: a publish assigns its id, appends to the
//! history and sends `Deliver` to every shard inside the lock, and a
//! subscribe reads the history and sends `Subscribed` inside the same lock.
//! Inboxes are FIFO, so the ordering contract of [`crate::broker`] holds.
//! The lock is taken once per publish or subscribe, never per subscriber.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::broker::{Broker, SubscribeRequest};
use crate::bus::{Bus, ShardMsg};
use crate::id::ReplyTo;
use crate::id::{mint_epoch, MsgId, Since};
use crate::protocol::encode_msg;
use crate::topic::TopicName;

/// Retention of the embedded broker, per topic.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Messages kept per topic (`--history-size`).
    pub size: usize,
    /// How long a message is kept (`--history-ttl`).
    pub ttl: Duration,
}

/// The embedded broker.
#[derive(Debug)]
pub struct MemoryBroker {
    bus: Bus,
    epoch: Arc<str>,
    retention: Retention,
    /// Per-namespace overrides of `retention`.
    by_namespace: HashMap<String, Retention>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The newest id of any topic: the node's position, sent as `last` in
    /// the `ok` of every `sub`.
    last: MsgId,
    topics: HashMap<TopicName, TopicLog>,
    /// The newest id of every topic whose whole history expired and was
    /// removed: a `since` at or past it lost nothing of such a topic.
    swept_through: MsgId,
    publishes_since_sweep: u32,
}

#[derive(Debug, Default)]
struct TopicLog {
    entries: VecDeque<Entry>,
    /// The newest id this topic ever had.
    last: MsgId,
    /// The newest id dropped from history: recovery from before it is impossible.
    trimmed_through: Option<MsgId>,
}

#[derive(Debug)]
struct Entry {
    id: MsgId,
    frame: Bytes,
}

/// Every this many publishes, topics whose whole history has expired are removed.
const SWEEP_EVERY: u32 = 4096;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl MemoryBroker {
    /// A broker delivering to the shards of `bus`, with a new epoch.
    pub fn new(bus: Bus, retention: Retention) -> Self {
        Self {
            bus,
            epoch: mint_epoch(),
            retention,
            by_namespace: HashMap::new(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Applies the namespaces' `history_size` / `history_ttl` overrides.
    pub fn with_namespaces(mut self, namespaces: &crate::namespace::Namespaces) -> Self {
        for ns in namespaces.iter() {
            let r = Retention {
                size: ns.history_size.unwrap_or(self.retention.size),
                ttl: ns.history_ttl.unwrap_or(self.retention.ttl),
            };
            self.by_namespace.insert(ns.name.clone(), r);
        }
        self
    }

    fn retention_for(&self, topic: &TopicName) -> Retention {
        self.by_namespace
            .get(topic.namespace())
            .copied()
            .unwrap_or(self.retention)
    }

    /// This run's epoch (the embedded broker mints one per start).
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the history half
        // written in a way later calls rely on, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// The next id: Redis semantics, time-based and strictly increasing even
    /// if the clock steps back.
    fn next_id(&mut self, now: u64) -> MsgId {
        self.last = if now > self.last.ms {
            MsgId { ms: now, seq: 0 }
        } else {
            MsgId {
                ms: self.last.ms,
                seq: self.last.seq + 1,
            }
        };
        self.last
    }

    /// Drops expired history everywhere; `oldest_kept` gives each topic's
    /// cut-off (retention differs by namespace).
    fn sweep(&mut self, oldest_kept: impl Fn(&TopicName) -> u64) {
        let mut swept = self.swept_through;
        self.topics.retain(|topic, log| {
            log.expire(oldest_kept(topic));
            let keep = !log.entries.is_empty();
            if !keep {
                swept = swept.max(log.last);
            }
            keep
        });
        self.swept_through = swept;
    }

    /// The replay of `topic` after the position `since` (at most the
    /// node's `last`), or `None` when some of it is no longer retained.
    fn replay_after(
        &mut self,
        topic: &TopicName,
        since: MsgId,
        oldest_kept: u64,
    ) -> Option<Vec<Bytes>> {
        match self.topics.get_mut(topic) {
            Some(log) => {
                log.expire(oldest_kept);
                log.replay_after(since)
            }
            // Never published, or its whole history expired and was
            // swept: complete (empty) only if `since` is past all of it.
            None => (since >= self.swept_through).then(Vec::new),
        }
    }
}

impl TopicLog {
    fn trim_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.trimmed_through = Some(e.id);
        }
    }

    fn expire(&mut self, oldest_kept_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.id.ms < oldest_kept_ms)
        {
            self.trim_front();
        }
    }

    /// The frames after the position `since`, or `None` when they are not
    /// all retained.
    fn replay_after(&self, since: MsgId) -> Option<Vec<Bytes>> {
        if self.trimmed_through.is_some_and(|t| since < t) {
            return None;
        }
        let start = self.entries.partition_point(|e| e.id <= since);
        Some(
            self.entries
                .range(start..)
                .map(|e| e.frame.clone())
                .collect(),
        )
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, reply: Option<ReplyTo>, topic: TopicName, data: &str) {
        let now = now_ms();
        let retention = self.retention_for(&topic);
        let oldest_kept = now.saturating_sub(retention.ttl.as_millis() as u64);
        let mut inner = self.lock();
        let id = inner.next_id(now);
        let frame = encode_msg(&topic, id, None, data);
        self.bus.deliver(&topic, id, &frame);
        if let Some(reply) = reply {
            self.bus.send_to(
                reply.shard,
                ShardMsg::Published {
                    reply,
                    topic: topic.clone(),
                    result: Ok(id),
                },
            );
        }
        let log = inner.topics.entry(topic).or_default();
        log.last = id;
        log.entries.push_back(Entry { id, frame });
        while log.entries.len() > retention.size {
            log.trim_front();
        }
        log.expire(oldest_kept);
        inner.publishes_since_sweep += 1;
        if inner.publishes_since_sweep >= SWEEP_EVERY {
            inner.publishes_since_sweep = 0;
            inner.sweep(|t| now.saturating_sub(self.retention_for(t).ttl.as_millis() as u64));
        }
    }

    fn subscribe(&self, req: SubscribeRequest) {
        let ttl = self.retention_for(&req.topic).ttl;
        let oldest_kept = now_ms().saturating_sub(ttl.as_millis() as u64);
        let mut inner = self.lock();
        // Under the lock: every later `Deliver` of the topic has a greater id.
        let position = inner.last;
        let (replay, recovered) = match &req.since {
            None => (Vec::new(), None),
            // Ahead of every id this node gave: not from this history.
            Some(Since { id, .. }) if *id > position => (Vec::new(), Some(false)),
            Some(Since { id, epoch }) if epoch.as_deref() == Some(&*self.epoch) => {
                match inner.replay_after(&req.topic, *id, oldest_kept) {
                    Some(r) => (r, Some(true)),
                    None => (Vec::new(), Some(false)),
                }
            }
            Some(_) => (Vec::new(), Some(false)),
        };
        self.bus.subscribed(
            (req.reply, req.topic),
            replay,
            recovered,
            (self.epoch.clone(), position),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bus::{inbox, Inbox};
    use crate::id::ConnId;
    use crate::metrics::ShardMetrics;

    fn broker(size: usize, ttl: Duration) -> (MemoryBroker, Inbox) {
        let (tx, rx) = inbox(Arc::new(ShardMetrics::default()));
        (
            MemoryBroker::new(Bus::new(vec![tx]), Retention { size, ttl }),
            rx,
        )
    }

    fn reply() -> ReplyTo {
        ReplyTo {
            shard: crate::id::ShardId(0),
            conn: ConnId(1),
            req: Some(1),
        }
    }

    fn topic(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    /// Publishes n messages and returns their ids, draining the inbox.
    fn publish_n(b: &MemoryBroker, rx: &Inbox, t: &str, n: usize) -> Vec<MsgId> {
        let mut ids = Vec::new();
        for i in 0..n {
            b.publish(None, topic(t), &format!("{{\"n\":{i}}}"));
            match rx.try_recv() {
                Some(ShardMsg::Deliver { id, .. }) => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        ids
    }

    fn subscribe(
        b: &MemoryBroker,
        rx: &Inbox,
        t: &str,
        since: Option<Since>,
    ) -> (usize, Option<bool>) {
        b.subscribe(SubscribeRequest {
            reply: reply(),
            topic: topic(t),
            since,
        });
        match rx.try_recv() {
            Some(ShardMsg::Subscribed {
                replay, recovered, ..
            }) => (replay.len(), recovered),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_strictly_increase_even_within_a_millisecond() {
        let mut inner = Inner::default();
        let a = inner.next_id(100);
        let b = inner.next_id(100);
        let c = inner.next_id(99); // clock stepped back
        let d = inner.next_id(101);
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
    }

    #[test]
    fn recovery_replays_exactly_what_was_missed() {
        let (b, rx) = broker(100, Duration::from_secs(600));
        let ids = publish_n(&b, &rx, "news", 5);
        let epoch = Some(b.epoch().to_string());
        let since = |id| {
            Some(Since {
                id,
                epoch: epoch.clone(),
            })
        };
        assert_eq!(subscribe(&b, &rx, "news", since(ids[1])), (3, Some(true)));
        assert_eq!(subscribe(&b, &rx, "news", since(ids[4])), (0, Some(true)));
        assert_eq!(subscribe(&b, &rx, "news", None), (0, None));
    }

    #[test]
    fn recovery_fails_whole_when_not_everything_is_kept() {
        let (b, rx) = broker(3, Duration::from_secs(600));
        let ids = publish_n(&b, &rx, "news", 6);
        let e = Some(b.epoch().to_string());
        // ids[0..3] were trimmed; since ids[2] needs ids[3..] which are kept.
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "news",
                Some(Since {
                    id: ids[2],
                    epoch: e.clone()
                })
            ),
            (3, Some(true))
        );
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "news",
                Some(Since {
                    id: ids[1],
                    epoch: e.clone()
                })
            ),
            (0, Some(false))
        );
        // Wrong or missing epoch.
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "news",
                Some(Since {
                    id: ids[4],
                    epoch: Some("other".into())
                })
            ),
            (0, Some(false))
        );
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "news",
                Some(Since {
                    id: ids[4],
                    epoch: None
                })
            ),
            (0, Some(false))
        );
        // Newer than anything the topic had, or a topic that never had anything.
        let future = MsgId {
            ms: u64::MAX,
            seq: 0,
        };
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "news",
                Some(Since {
                    id: future,
                    epoch: e.clone()
                })
            ),
            (0, Some(false))
        );
        // A topic that never had anything lost nothing after any position
        // this node gave.
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "empty",
                Some(Since {
                    id: ids[0],
                    epoch: e
                })
            ),
            (0, Some(true))
        );
    }

    /// Subscribes without `since` and returns the `last` of the answer.
    fn last_of(b: &MemoryBroker, rx: &Inbox, t: &str) -> MsgId {
        b.subscribe(SubscribeRequest {
            reply: reply(),
            topic: topic(t),
            since: None,
        });
        match rx.try_recv() {
            Some(ShardMsg::Subscribed { last, .. }) => last,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_of_a_quiet_topic_recovers_what_came_after_it() {
        let (b, rx) = broker(100, Duration::from_secs(600));
        assert_eq!(
            last_of(&b, &rx, "quiet"),
            MsgId::default(),
            "nothing yet: 0-0"
        );
        publish_n(&b, &rx, "other", 2);
        let last = last_of(&b, &rx, "quiet");
        assert!(last > MsgId::default());
        publish_n(&b, &rx, "other", 3);
        publish_n(&b, &rx, "quiet", 2);
        publish_n(&b, &rx, "other", 1);
        let since = |id| {
            Some(Since {
                id,
                epoch: Some(b.epoch().to_string()),
            })
        };
        assert_eq!(subscribe(&b, &rx, "quiet", since(last)), (2, Some(true)));
        // The position moved on with every topic's publishes.
        let now = last_of(&b, &rx, "quiet");
        assert!(now > last);
        assert_eq!(subscribe(&b, &rx, "quiet", since(now)), (0, Some(true)));
        // Past the node's position: not from this history.
        let ahead = MsgId {
            ms: now.ms,
            seq: now.seq + 1,
        };
        assert_eq!(subscribe(&b, &rx, "quiet", since(ahead)), (0, Some(false)));
    }

    #[test]
    fn a_topic_whose_history_was_swept_recovers_only_from_after_it() {
        let (b, rx) = broker(100, Duration::ZERO);
        let ids = publish_n(&b, &rx, "gone", 2);
        std::thread::sleep(Duration::from_millis(3));
        b.lock().sweep(|_| now_ms());
        assert!(b.lock().topics.is_empty(), "swept");
        let since = |id| {
            Some(Since {
                id,
                epoch: Some(b.epoch().to_string()),
            })
        };
        assert_eq!(subscribe(&b, &rx, "gone", since(ids[0])), (0, Some(false)));
        assert_eq!(subscribe(&b, &rx, "gone", since(ids[1])), (0, Some(true)));
    }

    #[test]
    fn expired_history_cannot_be_recovered() {
        let (b, rx) = broker(100, Duration::ZERO);
        let ids = publish_n(&b, &rx, "news", 2);
        std::thread::sleep(Duration::from_millis(3));
        let e = Some(b.epoch().to_string());
        assert_eq!(
            subscribe(
                &b,
                &rx,
                "news",
                Some(Since {
                    id: ids[0],
                    epoch: e
                })
            ),
            (0, Some(false))
        );
    }

    #[test]
    fn publish_answers_the_publisher_with_the_id() {
        let (b, rx) = broker(10, Duration::from_secs(60));
        b.publish(Some(reply()), topic("a"), "1");
        let delivered = match rx.try_recv() {
            Some(ShardMsg::Deliver { id, frame, .. }) => {
                assert!(frame.ends_with(b"\"data\":1}"));
                id
            }
            other => panic!("{other:?}"),
        };
        match rx.try_recv() {
            Some(ShardMsg::Published { result: Ok(id), .. }) => assert_eq!(id, delivered),
            other => panic!("{other:?}"),
        }
    }
}
