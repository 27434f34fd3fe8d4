//! The embedded broker: one node, no Redis. It assigns ids in the Redis
//! `MS-SEQ` format, keeps a bounded history per topic (by count and by age)
//! for recovery, and hands each message to every shard.
//!
//! It is split by topic over the shards, thread per core like everything
//! else: each topic belongs to one shard (its partition of the shard
//! count), and that shard's thread keeps the topic's history, assigns its
//! ids and knows which shards want it ([`Interest`]). A request for a topic
//! of the calling shard is handled at once, on that thread; any other
//! travels to the owning shard's inbox, and a full inbox refuses it (4503)
//! rather than blocking anyone. Nothing is locked on the way.
//!
//! One owner per topic takes every request of that topic in order: a
//! publish assigns its id, appends to the history and sends `Deliver`
//! before the next request, and a subscribe reads the history and sends
//! `Subscribed` in between; inboxes are FIFO, so the ordering contract of
//! [`crate::broker`] holds. Ids increase per owner, which is all a topic's
//! `since` and `last` compare against (the Redis broker's ids are per
//! partition the same way).
//!
//! Why not a thread of its own: that design (one broker thread behind a
//! bounded queue) was measured against the shared mutex it replaced and
//! was slower on two cores, because every message then waits for two
//! thread wake-ups (benches/RESULTS.md, 2026-12-04). Here a publish whose
//! topic the publisher's shard owns, which is every publish on one shard,
//! costs no hand-off at all.
//!
//! A part's data (each topic's history and idempotency keys, the id
//! sequence) is in `memory/history.rs`; this file routes requests to their
//! owner and answers them.

mod history;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::{Broker, Replier, SubscribeRequest};
use crate::bus::{Bus, Interest, ShardMsg};
use crate::id::{mint_epoch, MsgId, ShardId, Since};
use crate::protocol::encode_msg;
use crate::topic::TopicName;

use history::{Entry, Inner};

/// Retention of the embedded broker, per topic.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Messages kept per topic (`--history-size`).
    pub size: usize,
    /// How long a message is kept (`--history-ttl`).
    pub ttl: Duration,
    /// How long a publish's idempotency key is kept (`--idempotency-window`).
    pub idempotency_window: Duration,
}

/// Idempotency keys kept per topic: past it the oldest key is forgotten
/// before its window ends (a retry of it would be delivered again). Bounds
/// the table at about 10,000 x (128 + 80) bytes per topic at worst.
pub const MAX_KEYS_PER_TOPIC: usize = 10_000;

/// Why a request for another shard's topic was refused (4503).
const BUSY: &str = "broker unavailable: the shard that keeps this topic is overloaded, retry later";

/// The embedded broker, as every thread sees it: which shard owns which
/// topic, and the way to its inbox.
#[derive(Debug)]
pub struct MemoryBroker {
    bus: Bus,
    epoch: Arc<str>,
    /// Tells this broker's parts from another's (tests run several on one
    /// thread).
    id: u64,
    shards: u32,
    /// Each shard's part, until its thread takes it ([`Broker::attach`]);
    /// touched once per shard at start, never on the delivery path.
    parts: Mutex<Vec<Option<Log>>>,
}

/// The part of the broker a shard thread owns.
#[derive(Debug)]
struct Local {
    broker: u64,
    shard: ShardId,
    log: Log,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Handles `req` here when this thread owns `owner`'s part of broker
/// `broker`; gives it back otherwise.
fn handle_here(broker: u64, owner: ShardId, req: Request) -> Option<Request> {
    LOCAL.with(|local| match local.borrow_mut().as_mut() {
        Some(l) if l.broker == broker && l.shard == owner => {
            l.log.handle(req);
            None
        }
        _ => Some(req),
    })
}

/// What a shard asks of a topic's owner.
#[derive(Debug)]
enum Request {
    Publish {
        reply: Option<Replier>,
        topic: TopicName,
        event: Option<Box<str>>,
        data: Box<str>,
        key: Option<Box<str>>,
    },
    Subscribe(SubscribeRequest),
    Withdraw(TopicName, ShardId),
    /// A presence event, sent in order with the topic's messages.
    Presence {
        topic: TopicName,
        user: Arc<str>,
        join: bool,
    },
}

/// One shard's part of the broker: the history of the topics it owns, their
/// id sequence, and which shards each goes to.
#[derive(Debug)]
struct Log {
    bus: Bus,
    epoch: Arc<str>,
    retention: Retention,
    /// Per-namespace overrides of `retention`.
    by_namespace: HashMap<String, Retention>,
    interest: Interest,
    inner: Inner,
}

/// Every this many publishes, topics whose whole history has expired are removed.
const SWEEP_EVERY: u32 = 4096;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl MemoryBroker {
    /// Makes the broker for the shards of `bus`, with a new epoch,
    /// `retention` per topic and the namespaces' overrides of it. Each
    /// shard thread takes its part with [`Broker::attach`] before serving.
    pub fn start(
        bus: Bus,
        retention: Retention,
        namespaces: &crate::namespace::Namespaces,
    ) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let epoch: Arc<str> = mint_epoch();
        let shards = bus.len();
        let parts = (0..shards)
            .map(|_| Some(Log::new(bus.clone(), epoch.clone(), retention, namespaces)))
            .collect();
        Ok(Self {
            bus,
            epoch,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            shards: shards as u32,
            parts: Mutex::new(parts),
        })
    }

    /// This run's epoch (the embedded broker mints one per start).
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The shard that keeps `topic`.
    fn owner(&self, topic: &TopicName) -> ShardId {
        if self.shards <= 1 {
            return ShardId(0);
        }
        ShardId(topic.partition(self.shards) as u16)
    }

    /// Hands `req` to the owner of `topic`: at once on its thread, else
    /// through its inbox; a full inbox gives the request back.
    fn route(&self, topic: &TopicName, req: Request) -> Result<(), Request> {
        let owner = self.owner(topic);
        let Some(req) = handle_here(self.id, owner, req) else {
            return Ok(());
        };
        let job = Job {
            broker: self.id,
            owner,
            req,
        };
        let msg = ShardMsg::Run {
            job: Box::new(job),
            run: run_job,
        };
        match self.bus.try_send_to(owner, msg) {
            Ok(()) => Ok(()),
            Err(ShardMsg::Run { job, .. }) => match job.downcast::<Job>() {
                Ok(job) => Err(job.req),
                Err(_) => Ok(()),
            },
            Err(_) => Ok(()),
        }
    }
}

/// A request travelling to the shard that owns its topic.
#[derive(Debug)]
struct Job {
    broker: u64,
    owner: ShardId,
    req: Request,
}

/// Runs a [`Job`] on the owning shard's thread.
fn run_job(job: Box<dyn std::any::Any + Send>) {
    let Ok(job) = job.downcast::<Job>() else {
        return;
    };
    if let Some(req) = handle_here(job.broker, job.owner, job.req) {
        tracing::error!(owner = %job.owner, ?req, "embedded broker request on a shard without its part");
    }
}

impl Log {
    fn new(
        bus: Bus,
        epoch: Arc<str>,
        retention: Retention,
        namespaces: &crate::namespace::Namespaces,
    ) -> Self {
        let by_namespace = namespaces
            .iter()
            .map(|ns| {
                let r = Retention {
                    size: ns.history_size.unwrap_or(retention.size),
                    ttl: ns.history_ttl.unwrap_or(retention.ttl),
                    idempotency_window: retention.idempotency_window,
                };
                (ns.name.clone(), r)
            })
            .collect();
        Self {
            interest: bus.interest(),
            bus,
            epoch,
            retention,
            by_namespace,
            inner: Inner::default(),
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Publish {
                reply,
                topic,
                event,
                data,
                key,
            } => {
                if let Some(first) = self.repeated(&topic, key.as_deref()) {
                    if let Some(reply) = reply {
                        reply.answer(&self.bus, topic, Ok(first));
                    }
                    return;
                }
                let id = self.publish(reply, topic.clone(), event.as_deref(), &data);
                if let Some(key) = key {
                    let log = self.inner.topics.entry(topic).or_default();
                    log.keys.get_or_insert_default().insert(&key, id);
                }
            }
            Request::Subscribe(req) => self.subscribe(req),
            Request::Withdraw(topic, shard) => self.interest.remove(&topic, shard),
            Request::Presence { topic, user, join } => {
                let frame = crate::protocol::encode_presence_event(&topic, join, &user);
                self.bus.presence(&topic, &user, &frame, &self.interest);
            }
        }
    }

    /// The id of the first publish of `topic` with `key` within the
    /// window, when this one repeats it. Requests of a topic are handled
    /// in order on its owner's thread, so of concurrent duplicates exactly
    /// one is delivered.
    fn repeated(&mut self, topic: &TopicName, key: Option<&str>) -> Option<MsgId> {
        let oldest = now_ms().saturating_sub(self.retention.idempotency_window.as_millis() as u64);
        let keys = self.inner.topics.get_mut(topic)?.keys.as_mut()?;
        keys.expire(oldest);
        keys.index.get(key?).copied()
    }

    fn retention_for(&self, topic: &TopicName) -> Retention {
        self.by_namespace
            .get(topic.namespace())
            .copied()
            .unwrap_or(self.retention)
    }
}

impl Log {
    fn publish(
        &mut self,
        reply: Option<Replier>,
        topic: TopicName,
        event: Option<&str>,
        data: &str,
    ) -> MsgId {
        let now = now_ms();
        let retention = self.retention_for(&topic);
        let oldest_kept = now.saturating_sub(retention.ttl.as_millis() as u64);
        let id = self.inner.next_id(now);
        let frame = encode_msg(&topic, id, event, data);
        self.bus.deliver(&topic, id, &frame, &self.interest);
        if let Some(reply) = reply {
            reply.answer(&self.bus, topic.clone(), Ok(id));
        }
        let inner = &mut self.inner;
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
            let (retention, by_namespace) = (self.retention, &self.by_namespace);
            let keys_from = now.saturating_sub(retention.idempotency_window.as_millis() as u64);
            inner.sweep(
                |t| {
                    let ttl = by_namespace.get(t.namespace()).unwrap_or(&retention).ttl;
                    now.saturating_sub(ttl.as_millis() as u64)
                },
                keys_from,
            );
        }
        id
    }

    fn subscribe(&mut self, req: SubscribeRequest) {
        let ttl = self.retention_for(&req.topic).ttl;
        let oldest_kept = now_ms().saturating_sub(ttl.as_millis() as u64);
        if req.announce {
            self.interest.add(&req.topic, req.reply.shard);
        }
        let inner = &mut self.inner;
        // Taken in order: every later `Deliver` of the topic has a greater id.
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

impl Broker for MemoryBroker {
    /// With a `key`: the topic's owner checks its table before it assigns
    /// an id, in the order requests reach it, so of any number of
    /// concurrent duplicates within the window exactly one is delivered.
    /// The table is in memory: a restart forgets it (and mints a new epoch).
    fn publish_as(
        &self,
        reply: Option<Replier>,
        topic: TopicName,
        event: Option<&str>,
        data: &str,
        key: Option<&str>,
    ) {
        let req = Request::Publish {
            reply,
            topic: topic.clone(),
            event: event.map(Into::into),
            data: data.into(),
            key: key.map(Into::into),
        };
        if let Err(Request::Publish {
            reply: Some(reply),
            topic,
            ..
        }) = self.route(&topic, req)
        {
            reply.answer(&self.bus, topic, Err(BUSY.to_string()));
        }
    }

    fn subscribe(&self, req: SubscribeRequest) {
        let topic = req.topic.clone();
        if let Err(Request::Subscribe(req)) = self.route(&topic, Request::Subscribe(req)) {
            self.bus.subscribe_failed(req.reply, req.topic, BUSY);
        }
    }

    fn want_every_topic(&self, shard: ShardId, on: bool) {
        self.bus.want_every_topic(shard, on);
    }

    fn withdraw(&self, topic: TopicName, shard: ShardId) {
        // Dropped when the owner's inbox is full: see `Broker::withdraw`.
        let _ = self.route(&topic.clone(), Request::Withdraw(topic, shard));
    }

    fn presence_event(&self, topic: TopicName, user: Arc<str>, join: bool) {
        let req = Request::Presence {
            topic: topic.clone(),
            user,
            join,
        };
        if let Err(req) = self.route(&topic, req) {
            // The owner's inbox is full: `send_to` counts it as dropped and
            // flags the shard lagged, so its subscribers recover.
            let job = Job {
                broker: self.id,
                owner: self.owner(&topic),
                req,
            };
            let msg = ShardMsg::Run {
                job: Box::new(job),
                run: run_job,
            };
            self.bus.send_to(self.owner(&topic), msg);
        }
    }

    fn attach(&self, shard: ShardId) {
        let part = self
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(shard.index())
            .and_then(Option::take);
        if let Some(log) = part {
            LOCAL.with(|local| {
                *local.borrow_mut() = Some(Local {
                    broker: self.id,
                    shard,
                    log,
                })
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bus::{inbox, Inbox, ShardMsg};
    use crate::id::ConnId;
    use crate::id::ReplyTo;
    use crate::metrics::ShardMetrics;
    use crate::namespace::Namespaces;

    /// One shard's part, driven directly.
    fn broker(size: usize, ttl: Duration) -> (Log, Inbox) {
        let (tx, rx) = inbox(Arc::new(ShardMetrics::default()));
        let none = crate::namespace::Namespaces::from_config(&[]).unwrap();
        let bus = Bus::new(vec![tx]);
        (
            Log::new(
                bus,
                mint_epoch(),
                Retention {
                    size,
                    ttl,
                    idempotency_window: Duration::from_secs(120),
                },
                &none,
            ),
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
    fn publish_n(b: &mut Log, rx: &Inbox, t: &str, n: usize) -> Vec<MsgId> {
        let mut ids = Vec::new();
        for i in 0..n {
            b.publish(None, topic(t), None, &format!("{{\"n\":{i}}}"));
            match rx.try_recv() {
                Some(ShardMsg::Deliver { id, .. }) => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        ids
    }

    fn subscribe(b: &mut Log, rx: &Inbox, t: &str, since: Option<Since>) -> (usize, Option<bool>) {
        b.subscribe(SubscribeRequest {
            reply: reply(),
            topic: topic(t),
            since,
            announce: false,
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
        let (mut b, rx) = broker(100, Duration::from_secs(600));
        let ids = publish_n(&mut b, &rx, "news", 5);
        let epoch = Some(b.epoch.to_string());
        let since = |id| {
            Some(Since {
                id,
                epoch: epoch.clone(),
            })
        };
        assert_eq!(
            subscribe(&mut b, &rx, "news", since(ids[1])),
            (3, Some(true))
        );
        assert_eq!(
            subscribe(&mut b, &rx, "news", since(ids[4])),
            (0, Some(true))
        );
        assert_eq!(subscribe(&mut b, &rx, "news", None), (0, None));
    }

    #[test]
    fn recovery_fails_whole_when_not_everything_is_kept() {
        let (mut b, rx) = broker(3, Duration::from_secs(600));
        let ids = publish_n(&mut b, &rx, "news", 6);
        let e = Some(b.epoch.to_string());
        // ids[0..3] were trimmed; since ids[2] needs ids[3..] which are kept.
        assert_eq!(
            subscribe(
                &mut b,
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
                &mut b,
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
                &mut b,
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
                &mut b,
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
                &mut b,
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
                &mut b,
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
    fn last_of(b: &mut Log, rx: &Inbox, t: &str) -> MsgId {
        b.subscribe(SubscribeRequest {
            reply: reply(),
            topic: topic(t),
            since: None,
            announce: false,
        });
        match rx.try_recv() {
            Some(ShardMsg::Subscribed { last, .. }) => last,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_of_a_quiet_topic_recovers_what_came_after_it() {
        let (mut b, rx) = broker(100, Duration::from_secs(600));
        assert_eq!(
            last_of(&mut b, &rx, "quiet"),
            MsgId::default(),
            "nothing yet: 0-0"
        );
        publish_n(&mut b, &rx, "other", 2);
        let last = last_of(&mut b, &rx, "quiet");
        assert!(last > MsgId::default());
        publish_n(&mut b, &rx, "other", 3);
        publish_n(&mut b, &rx, "quiet", 2);
        publish_n(&mut b, &rx, "other", 1);
        let epoch = b.epoch.to_string();
        let since = |id| {
            Some(Since {
                id,
                epoch: Some(epoch.clone()),
            })
        };
        assert_eq!(
            subscribe(&mut b, &rx, "quiet", since(last)),
            (2, Some(true))
        );
        // The position moved on with every topic's publishes.
        let now = last_of(&mut b, &rx, "quiet");
        assert!(now > last);
        assert_eq!(subscribe(&mut b, &rx, "quiet", since(now)), (0, Some(true)));
        // Past the node's position: not from this history.
        let ahead = MsgId {
            ms: now.ms,
            seq: now.seq + 1,
        };
        assert_eq!(
            subscribe(&mut b, &rx, "quiet", since(ahead)),
            (0, Some(false))
        );
    }

    #[test]
    fn a_topic_whose_history_was_swept_recovers_only_from_after_it() {
        let (mut b, rx) = broker(100, Duration::ZERO);
        let ids = publish_n(&mut b, &rx, "gone", 2);
        std::thread::sleep(Duration::from_millis(3));
        b.inner.sweep(|_| now_ms(), now_ms());
        assert!(b.inner.topics.is_empty(), "swept");
        let epoch = b.epoch.to_string();
        let since = |id| {
            Some(Since {
                id,
                epoch: Some(epoch.clone()),
            })
        };
        assert_eq!(
            subscribe(&mut b, &rx, "gone", since(ids[0])),
            (0, Some(false))
        );
        assert_eq!(
            subscribe(&mut b, &rx, "gone", since(ids[1])),
            (0, Some(true))
        );
    }

    #[test]
    fn expired_history_cannot_be_recovered() {
        let (mut b, rx) = broker(100, Duration::ZERO);
        let ids = publish_n(&mut b, &rx, "news", 2);
        std::thread::sleep(Duration::from_millis(3));
        let e = Some(b.epoch.to_string());
        assert_eq!(
            subscribe(
                &mut b,
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
        let (mut b, rx) = broker(10, Duration::from_secs(60));
        b.publish(Some(Replier::Shard(reply())), topic("a"), None, "1");
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

    /// The bus of two shards, their inboxes, no namespaces, and a
    /// retention of 10 messages for a minute.
    fn two_inboxes() -> (Bus, [Inbox; 2], Namespaces, Retention) {
        let (tx0, rx0) = inbox(Arc::new(ShardMetrics::default()));
        let (tx1, rx1) = inbox(Arc::new(ShardMetrics::default()));
        let none = Namespaces::from_config(&[]).unwrap();
        let retention = Retention {
            size: 10,
            ttl: Duration::from_secs(60),
            idempotency_window: Duration::from_secs(120),
        };
        (Bus::new(vec![tx0, tx1]), [rx0, rx1], none, retention)
    }

    #[test]
    fn a_topic_goes_only_to_the_shards_that_announced_it_until_they_withdraw() {
        let (bus, [rx0, rx1], none, retention) = two_inboxes();
        let mut b = Log::new(bus, mint_epoch(), retention, &none);
        let on_shard_1 = ReplyTo {
            shard: ShardId(1),
            conn: ConnId(7),
            req: None,
        };
        let publish = |b: &mut Log| {
            b.handle(Request::Publish {
                reply: None,
                topic: topic("t"),
                event: None,
                data: "1".into(),
                key: None,
            })
        };
        let count = |rx: &Inbox| std::iter::from_fn(|| rx.try_recv()).count();
        publish(&mut b);
        assert_eq!((count(&rx0), count(&rx1)), (0, 0), "nobody announced it");
        b.handle(Request::Subscribe(SubscribeRequest {
            reply: on_shard_1,
            topic: topic("t"),
            since: None,
            announce: true,
        }));
        assert!(matches!(rx1.try_recv(), Some(ShardMsg::Subscribed { .. })));
        publish(&mut b);
        assert_eq!(
            (count(&rx0), count(&rx1)),
            (0, 1),
            "only the announcing shard"
        );
        b.handle(Request::Withdraw(topic("t"), ShardId(1)));
        publish(&mut b);
        assert_eq!((count(&rx0), count(&rx1)), (0, 0), "withdrawn");
    }

    /// A broker over two shards (inboxes `rx`), a topic each shard keeps.
    fn two_shards() -> (MemoryBroker, [Inbox; 2], [TopicName; 2]) {
        let (bus, [rx0, rx1], none, retention) = two_inboxes();
        let b = MemoryBroker::start(bus, retention, &none).unwrap();
        let kept_by = |shard: u16| {
            (0..)
                .map(|i| topic(&format!("t{i}")))
                .find(|t| b.owner(t) == ShardId(shard))
                .unwrap()
        };
        let topics = [kept_by(0), kept_by(1)];
        (b, [rx0, rx1], topics)
    }

    /// The answer a `Replier::Call` got, once it came.
    fn call() -> (Replier, std::sync::mpsc::Receiver<Result<MsgId, String>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let reply = Replier::Call(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        (reply, rx)
    }

    #[test]
    fn a_topic_of_this_shard_is_published_at_once_any_other_through_its_owner() {
        let (b, [rx0, rx1], [mine, theirs]) = two_shards();
        // This thread is shard 0; shard 1's part runs on another thread.
        b.attach(ShardId(0));
        let b = Arc::new(b);
        let announce = |t: &TopicName, shard: u16| SubscribeRequest {
            reply: ReplyTo {
                shard: ShardId(shard),
                conn: ConnId(1),
                req: None,
            },
            topic: t.clone(),
            since: None,
            announce: true,
        };
        b.subscribe(announce(&mine, 0));
        assert!(
            matches!(rx0.try_recv(), Some(ShardMsg::Subscribed { .. })),
            "handled here, at once"
        );
        let (reply, answer) = call();
        b.publish_as(Some(reply), mine.clone(), None, "1", None);
        assert!(matches!(rx0.try_recv(), Some(ShardMsg::Deliver { .. })));
        assert!(answer.try_recv().unwrap().is_ok());

        // Shard 1's topic: the request waits in shard 1's inbox as a job,
        // and is done when shard 1's thread runs it.
        b.subscribe(announce(&theirs, 0));
        let (reply, answer) = call();
        b.publish_as(Some(reply), theirs.clone(), None, "2", None);
        assert!(rx0.try_recv().is_none(), "nothing yet");
        let other = {
            let b = b.clone();
            std::thread::spawn(move || {
                b.attach(ShardId(1));
                let mut ran = 0;
                while let Some(msg) = rx1.try_recv() {
                    match msg {
                        ShardMsg::Run { job, run } => run(job),
                        other => panic!("{other:?}"),
                    }
                    ran += 1;
                }
                ran
            })
        };
        assert_eq!(other.join().unwrap(), 2, "the sub and the pub");
        assert!(matches!(rx0.try_recv(), Some(ShardMsg::Subscribed { .. })));
        assert!(matches!(rx0.try_recv(), Some(ShardMsg::Deliver { .. })));
        assert!(answer.try_recv().unwrap().is_ok());
    }

    #[test]
    fn a_full_owner_inbox_refuses_the_request_with_4503() {
        let (b, [rx0, rx1], [_, theirs]) = two_shards();
        let mut filled = 0;
        loop {
            let (reply, answer) = call();
            b.publish_as(Some(reply), theirs.clone(), None, "1", None);
            match answer.try_recv() {
                Err(_) => filled += 1,
                Ok(Err(why)) => {
                    assert_eq!(why, BUSY);
                    break;
                }
                Ok(Ok(id)) => panic!("published {id} without its owner"),
            }
        }
        assert_eq!(filled, crate::bus::SHARD_INBOX_CAPACITY);
        // A `sub` is refused the same way, answered to the asking shard.
        b.subscribe(SubscribeRequest {
            reply: reply(),
            topic: theirs.clone(),
            since: None,
            announce: true,
        });
        assert!(matches!(
            rx0.try_recv(),
            Some(ShardMsg::SubscribeFailed { reason: BUSY, .. })
        ));
        assert_eq!(rx1.try_recv().map(|_| ()), Some(()), "the queued ones wait");
    }

    #[test]
    fn another_brokers_part_on_this_thread_is_not_used() {
        let (first, [rx0, _rx1], [mine, _]) = two_shards();
        first.attach(ShardId(0));
        let (second, [other0, _o1], _) = two_shards();
        // `second` has no part here: its request waits for its owner,
        // never touching `first`'s history.
        second.publish_as(None, mine.clone(), None, "1", None);
        assert!(rx0.try_recv().is_none());
        assert!(matches!(other0.try_recv(), Some(ShardMsg::Run { .. })));
    }

    fn publish_keyed(b: &mut Log, t: &TopicName, key: &str) {
        b.handle(Request::Publish {
            reply: None,
            topic: t.clone(),
            event: None,
            data: "1".into(),
            key: Some(key.into()),
        });
    }

    #[test]
    fn a_topic_keeps_at_most_its_bound_of_keys_forgetting_the_oldest() {
        let (mut b, _rx) = broker(10, Duration::from_secs(60));
        let t = topic("orders:1");
        for i in 0..=MAX_KEYS_PER_TOPIC {
            publish_keyed(&mut b, &t, &format!("k{i}"));
        }
        assert!(
            b.repeated(&t, Some("k0")).is_none(),
            "the oldest is forgotten"
        );
        assert!(b.repeated(&t, Some("k1")).is_some());
        let keys = b.inner.topics[&t].keys.as_ref().unwrap();
        assert_eq!(
            (keys.order.len(), keys.index.len()),
            (MAX_KEYS_PER_TOPIC, MAX_KEYS_PER_TOPIC)
        );
        // A repeat is answered, not published: the id sequence stays.
        let before = b.inner.last;
        publish_keyed(&mut b, &t, "k1");
        assert_eq!(b.inner.last, before);
        assert!(b.repeated(&topic("orders:2"), Some("k1")).is_none());
    }

    #[test]
    fn keys_outlive_the_history_for_their_window_only() {
        let (mut b, _rx) = broker(10, Duration::from_secs(60));
        let t = topic("jobs:1");
        publish_keyed(&mut b, &t, "k");
        // The history is gone; the key is within its window: kept.
        b.inner.sweep(|_| now_ms() + 1, 0);
        assert!(b.inner.topics[&t].entries.is_empty());
        assert!(b.repeated(&t, Some("k")).is_some());
        // Past its window too: the topic goes.
        b.inner.sweep(|_| now_ms() + 1, now_ms() + 1);
        assert!(!b.inner.topics.contains_key(&t));
        assert!(b.repeated(&t, Some("k")).is_none());
    }
}
