//! The cross-shard hand-off. Each shard has one bounded inbox (a crossbeam
//! channel) and one [`AtomicWaker`]; anyone on any thread may send a
//! [`ShardMsg`] and wake the shard. A shard drains its inbox in batches, so a
//! busy shard is not woken per message: the waker fires only after the shard
//! registered it, i.e. when it went idle.
//!
//! Overflow policy: an inbox that is full drops the message, counts it in
//! `ringcast_messages_dropped_total{reason="shard_inbox_full"}`, and flags the
//! shard as lagged; the shard then closes every connection with 4009 so the
//! clients recover with `since`. Nothing is lost silently.
//!
//! Interest: with more than one shard, a `Deliver` goes only to the shards
//! that announced a subscriber (live or pending) for its topic, so a
//! notification for one user's topic wakes one shard, not all of them. The
//! announcement is part of the shard's `sub` (and the withdrawal a message
//! of its own, after its last local subscriber left), and the topic's owner
//! (the embedded broker's shard for that topic, or the Redis reader)
//! keeps the [`Interest`] map as it takes them, in order with everything
//! else: nothing is shared or locked between shards and brokers.
//!
//! Wildcards: a shard with a pattern subscription must see every topic,
//! since any topic may match (a pattern spans topics of every owner and
//! every partition). Such a shard sets its bit in the bus's
//! `every_topic` set before it answers the pattern's `sub`, and every
//! `Deliver` goes to the shards of that set as well as to the topic's
//! announced ones, once per shard. It is the one thing the delivery path
//! reads from shared memory: one atomic word per 64 shards, written only
//! when a shard's first pattern comes or its last goes, so it stays in
//! every core's cache. Announcing to each topic owner instead would need
//! every owner (each embedded broker part, each Redis reader) to answer
//! before the `ok`, for a gain only when patterns are rare on a shard.
//!
//! The drain signal does not travel through the channel: a full inbox must
//! not lose it, or that shard would never drain and the process would hang.
//! It is a flag beside the channel (like `lagged`), set by
//! [`ShardSender::drain`] and checked by the shard loop on every wake-up.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::id::{MsgId, ReplyTo, ShardId};
use crate::metrics::{ShardMetrics, Undelivered};
use crate::topic::TopicName;

/// Messages a shard's inbox can hold before it counts as lagged. At 100-byte
/// messages that is a few MiB per shard; a shard that falls this far behind
/// is better off making its clients recover than growing without bound.
pub const SHARD_INBOX_CAPACITY: usize = 65_536;

/// What travels between threads to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// A message for the topic's local subscribers: `frame` is the encoded
    /// WebSocket frame, shared by every subscriber.
    Deliver {
        /// The topic.
        topic: TopicName,
        /// The message id.
        id: MsgId,
        /// The `msg` frame, header included.
        frame: Bytes,
    },
    /// The answer to a `sub`: replay these frames, reply `ok`, then add the
    /// connection to the topic's subscribers.
    Subscribed {
        /// Who asked.
        reply: ReplyTo,
        /// The topic.
        topic: TopicName,
        /// Frames to send before the `ok`, oldest first.
        replay: Vec<Bytes>,
        /// `Some` when the client asked for recovery: whether it succeeded.
        recovered: Option<bool>,
        /// The topic's current epoch.
        epoch: Arc<str>,
        /// The broker's position in the topic's id sequence when it
        /// answered: every later `Deliver` of the topic has a greater id.
        last: MsgId,
    },
    /// The broker could not take a `sub` (Redis unreachable, its queue
    /// full): answer error 4503, the subscription is not made.
    SubscribeFailed {
        /// Who asked.
        reply: ReplyTo,
        /// The topic.
        topic: TopicName,
        /// Why, for the client.
        reason: &'static str,
    },
    /// Work for the shard's own thread: `run(job)` there. The embedded
    /// broker sends the requests for the topics a shard keeps this way
    /// (the bus knows nothing of what they are).
    Run {
        /// What to work on.
        job: Box<dyn std::any::Any + Send>,
        /// How.
        run: fn(Box<dyn std::any::Any + Send>),
    },
    /// Partition `partition` of `partitions` (Redis broker) lost entries
    /// before this node read them: close every subscriber of a topic in it
    /// with 4009, so it recovers with `since` and learns (from
    /// `recovered:false`) that it missed something. Sent before the
    /// `Deliver`s of what was read after the gap.
    PartitionGap {
        /// The partition, as `broker::redis::partition` numbers it.
        partition: u32,
        /// The node's partition count.
        partitions: u32,
    },
    /// A presence event (`join` or `leave`) for the topic's local
    /// subscribers, in order with its messages; never to a connection of
    /// `user` itself.
    Presence {
        /// The topic.
        topic: TopicName,
        /// Whose event it is.
        user: Arc<str>,
        /// The `join`/`leave` frame, shared.
        frame: Bytes,
    },
    /// A reply made off the shard (a `presence` answer): queue `frame` to
    /// the connection, if it is still there.
    Answer {
        /// Who asked.
        reply: ReplyTo,
        /// The reply frame.
        frame: Bytes,
    },
    /// The answer to a `pub`.
    Published {
        /// Who asked.
        reply: ReplyTo,
        /// The topic.
        topic: TopicName,
        /// The new message id, or why publishing failed (answered 4503).
        result: Result<MsgId, String>,
    },
}

/// The value of [`Inbox`]'s drain flag while no drain was asked for.
const NO_DRAIN: u64 = u64::MAX;

/// The sending side of one shard's inbox.
#[derive(Debug, Clone)]
pub struct ShardSender {
    tx: Sender<ShardMsg>,
    waker: Arc<AtomicWaker>,
    lagged: Arc<AtomicBool>,
    drain: Arc<AtomicU64>,
    metrics: Arc<ShardMetrics>,
}

impl ShardSender {
    /// Queues `msg` and wakes the shard. A full inbox drops it (counted) and
    /// flags the shard as lagged; see the module docs.
    pub fn send(&self, msg: ShardMsg) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.dropped(Undelivered::ShardInboxFull);
                self.lagged.store(true, Ordering::Release);
            }
            // The shard has exited (shutdown): nobody is left to deliver to.
            Err(TrySendError::Disconnected(_)) => self.metrics.dropped(Undelivered::ShardGone),
        }
        self.waker.wake();
    }

    /// Queues `msg` and wakes the shard, or gives `msg` back when the inbox
    /// is full (or the shard gone): for requests the sender answers itself.
    pub fn try_send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => Err(msg),
        }
    }

    /// Asks the shard to start the graceful drain (send `drain`, close with
    /// 1001), with `reconnect_in_ms` spread over `window_ms`. Never dropped,
    /// however full the inbox: it sets a flag, then wakes the shard. A
    /// second call before the shard looked replaces the window.
    pub fn drain(&self, window_ms: u64) {
        // NO_DRAIN is the one value a window cannot take; a year is the
        // longest setting, far below it.
        self.drain
            .store(window_ms.min(NO_DRAIN - 1), Ordering::Release);
        self.waker.wake();
    }
}

/// The receiving side of one shard's inbox; lives on the shard thread.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<ShardMsg>,
    waker: Arc<AtomicWaker>,
    lagged: Arc<AtomicBool>,
    drain: Arc<AtomicU64>,
}

impl Inbox {
    /// Waits until the inbox has something, or the lagged or drain flag is up.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if !self.rx.is_empty()
                || self.lagged.load(Ordering::Acquire)
                || self.drain.load(Ordering::Acquire) != NO_DRAIN
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Takes one message without waiting.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }

    /// Returns and clears the lagged flag.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    /// Returns and clears a drain request: its window in milliseconds.
    pub fn take_drain(&self) -> Option<u64> {
        match self.drain.swap(NO_DRAIN, Ordering::AcqRel) {
            NO_DRAIN => None,
            window_ms => Some(window_ms),
        }
    }
}

/// Creates one shard's inbox pair.
pub fn inbox(metrics: Arc<ShardMetrics>) -> (ShardSender, Inbox) {
    let (tx, rx) = crossbeam_channel::bounded(SHARD_INBOX_CAPACITY);
    let waker = Arc::new(AtomicWaker::new());
    let lagged = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(AtomicU64::new(NO_DRAIN));
    let sender = ShardSender {
        tx,
        waker: waker.clone(),
        lagged: lagged.clone(),
        drain: drain.clone(),
        metrics,
    };
    let inbox = Inbox {
        rx,
        waker,
        lagged,
        drain,
    };
    (sender, inbox)
}

/// Which shards have a subscriber (live or pending) for which topic: one
/// bit per shard. Owned by the thread that delivers the topic (the
/// embedded broker's shard that keeps the topic, or the Redis reader of its partition), which
/// changes it only as it takes the shards' messages: a `sub` that
/// announces the topic, a withdrawal after the shard's last local
/// subscriber left. Both travel in the same FIFO as every other `sub`, so
/// no lock is needed and every message published after a subscription's
/// position reaches its shard. With one shard nothing is tracked.
#[derive(Debug, Default)]
pub struct Interest {
    shards: usize,
    map: HashMap<TopicName, Box<[u64]>>,
}

impl Interest {
    /// An empty map for a node of `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self {
            shards,
            map: HashMap::new(),
        }
    }

    /// Whether deliveries are steered (more than one shard).
    pub fn tracked(&self) -> bool {
        self.shards > 1
    }

    /// Shard `shard` has a subscriber for `topic` from now on.
    pub fn add(&mut self, topic: &TopicName, shard: ShardId) {
        let shard = shard.index();
        if !self.tracked() || shard >= self.shards {
            return;
        }
        let words = self
            .map
            .entry(topic.clone())
            .or_insert_with(|| vec![0; self.shards.div_ceil(64)].into_boxed_slice());
        words[shard / 64] |= 1 << (shard % 64);
    }

    /// Shard `shard` has no subscriber for `topic` any more.
    pub fn remove(&mut self, topic: &TopicName, shard: ShardId) {
        let shard = shard.index();
        if !self.tracked() || shard >= self.shards {
            return;
        }
        if let Some(words) = self.map.get_mut(topic) {
            words[shard / 64] &= !(1 << (shard % 64));
            if words.iter().all(|w| *w == 0) {
                self.map.remove(topic);
            }
        }
    }

    /// Topics some shard has a subscriber for.
    pub fn topics(&self) -> usize {
        self.map.len()
    }
}

/// Every shard's sender: the broker's view of the node.
#[derive(Debug, Clone, Default)]
pub struct Bus {
    shards: Vec<ShardSender>,
    /// Shards that hold a pattern subscription, one bit each: they get
    /// every topic (module docs).
    every_topic: Arc<[AtomicU64]>,
}

impl Bus {
    /// A bus over these shards, indexed by shard number.
    pub fn new(shards: Vec<ShardSender>) -> Self {
        let words = shards.len().div_ceil(64);
        Self {
            shards,
            every_topic: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// From now on `shard` gets every topic (`on`), or only those it
    /// announced. Set before a pattern's `sub` is answered, so every
    /// message published after the `ok` reaches the shard.
    pub fn want_every_topic(&self, shard: ShardId, on: bool) {
        let i = shard.index();
        let Some(word) = self.every_topic.get(i / 64) else {
            return;
        };
        let bit = 1u64 << (i % 64);
        match on {
            true => word.fetch_or(bit, Ordering::SeqCst),
            false => word.fetch_and(!bit, Ordering::SeqCst),
        };
    }

    /// An empty [`Interest`] map for this bus's shards, for a topic's owner.
    pub fn interest(&self) -> Interest {
        Interest::new(self.shards.len())
    }

    /// Sends a `Deliver` to every shard `interest` has a subscriber for
    /// `topic` on (to the only shard, with one). The frame is shared, not
    /// copied.
    pub fn deliver(&self, topic: &TopicName, id: MsgId, frame: &Bytes, interest: &Interest) {
        self.each_interested(topic, interest, |shard| {
            shard.send(ShardMsg::Deliver {
                topic: topic.clone(),
                id,
                frame: frame.clone(),
            })
        });
    }

    /// Sends a presence event of `user` on `topic` the way [`Bus::deliver`]
    /// sends a message: to the shards with a subscriber of the topic.
    pub fn presence(&self, topic: &TopicName, user: &Arc<str>, frame: &Bytes, interest: &Interest) {
        self.each_interested(topic, interest, |shard| {
            shard.send(ShardMsg::Presence {
                topic: topic.clone(),
                user: user.clone(),
                frame: frame.clone(),
            })
        });
    }

    /// Calls `send` with every shard `interest` has a subscriber for
    /// `topic` on (every shard, with one).
    fn each_interested(
        &self,
        topic: &TopicName,
        interest: &Interest,
        mut send: impl FnMut(&ShardSender),
    ) {
        if !interest.tracked() {
            return self.shards.iter().for_each(send);
        }
        let announced = interest.map.get(topic);
        for (w, every) in self.every_topic.iter().enumerate() {
            let mut bits = every.load(Ordering::SeqCst) | announced.map_or(0, |a| a[w]);
            while bits != 0 {
                let shard = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(s) = self.shards.get(shard) {
                    send(s);
                }
            }
        }
    }

    /// Answers a `sub` to the shard that asked: replay `replay`, then `ok`
    /// with `recovered`, `epoch` and `last`.
    pub fn subscribed(
        &self,
        (reply, topic): (ReplyTo, TopicName),
        replay: Vec<Bytes>,
        recovered: Option<bool>,
        (epoch, last): (Arc<str>, MsgId),
    ) {
        self.send_to(
            reply.shard,
            ShardMsg::Subscribed {
                reply,
                topic,
                replay,
                recovered,
                epoch,
                last,
            },
        );
    }

    /// Refuses a `sub` the broker could not take (error 4503).
    pub fn subscribe_failed(&self, reply: ReplyTo, topic: TopicName, reason: &'static str) {
        self.send_to(
            reply.shard,
            ShardMsg::SubscribeFailed {
                reply,
                topic,
                reason,
            },
        );
    }

    /// Queues `msg` for one shard unless its inbox is full
    /// ([`ShardSender::try_send`]); `msg` comes back when it was not taken.
    pub fn try_send_to(&self, shard: ShardId, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.shards.get(shard.index()) {
            Some(s) => s.try_send(msg),
            None => Err(msg),
        }
    }

    /// Sends `msg` to one shard; an unknown shard number is ignored (counted).
    pub fn send_to(&self, shard: ShardId, msg: ShardMsg) {
        match self.shards.get(shard.index()) {
            Some(s) => s.send(msg),
            None => tracing::error!(%shard, "reply for a shard that does not exist"),
        }
    }

    /// Sends a [`ShardMsg::PartitionGap`] to every shard.
    pub fn partition_gap(&self, partition: u32, partitions: u32) {
        for shard in &self.shards {
            shard.send(ShardMsg::PartitionGap {
                partition,
                partitions,
            });
        }
    }

    /// Asks every shard to drain ([`ShardSender::drain`]: never dropped).
    pub fn drain(&self, window_ms: u64) {
        for shard in &self.shards {
            shard.drain(window_ms);
        }
    }

    /// Messages waiting in each shard's inbox, by shard number.
    pub fn depths(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.tx.len()).collect()
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// True when the bus has no shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future as _;

    use super::*;

    fn deliver(topic: &TopicName) -> ShardMsg {
        ShardMsg::Deliver {
            topic: topic.clone(),
            id: MsgId { ms: 1, seq: 0 },
            frame: Bytes::from_static(b"x"),
        }
    }

    /// Polls `ready()` once: whether it would resolve now.
    fn is_ready(inbox: &Inbox) -> bool {
        let fut = std::pin::pin!(inbox.ready());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        fut.poll(&mut cx).is_ready()
    }

    #[test]
    fn drain_reaches_a_shard_whose_inbox_is_full() {
        let metrics = Arc::new(ShardMetrics::default());
        let (tx, inbox) = inbox(metrics.clone());
        let bus = Bus::new(vec![tx.clone()]);
        let topic = TopicName::new("t").expect("a valid topic");
        for _ in 0..SHARD_INBOX_CAPACITY {
            tx.send(deliver(&topic));
        }
        // Full: the next message is dropped and counted, the drain is not.
        tx.send(deliver(&topic));
        assert_eq!(metrics.dropped_count(Undelivered::ShardInboxFull), 1);
        bus.drain(1800);
        assert_eq!(metrics.dropped_count(Undelivered::ShardInboxFull), 1);
        assert_eq!(inbox.take_drain(), Some(1800));
        assert_eq!(inbox.take_drain(), None, "taken once");
        assert!(inbox.take_lagged());
    }

    fn inboxes(n: usize) -> (Bus, Vec<Inbox>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| inbox(Arc::new(ShardMetrics::default())))
            .unzip();
        (Bus::new(tx), rx)
    }

    fn delivered(inbox: &Inbox) -> usize {
        std::iter::from_fn(|| inbox.try_recv()).count()
    }

    #[test]
    fn messages_go_only_to_shards_that_announced_the_topic() {
        for shards in [2usize, 3, 64, 65, 130] {
            let (bus, rx) = inboxes(shards);
            let mut interest = bus.interest();
            let a = TopicName::new("user.a").expect("a valid topic");
            let b = TopicName::new("user.b").expect("a valid topic");
            let last = shards - 1;
            interest.add(&a, ShardId(last as u16));
            interest.add(&a, ShardId(last as u16)); // twice is once
            interest.add(&b, ShardId(0));
            interest.add(&b, ShardId(last as u16));
            interest.add(&b, ShardId(shards as u16)); // no such shard: ignored
            bus.deliver(
                &a,
                MsgId { ms: 1, seq: 0 },
                &Bytes::from_static(b"x"),
                &interest,
            );
            bus.deliver(
                &b,
                MsgId { ms: 1, seq: 1 },
                &Bytes::from_static(b"y"),
                &interest,
            );
            let got: Vec<usize> = rx.iter().map(delivered).collect();
            let mut want = vec![0; shards];
            want[0] = 1;
            want[last] = 2;
            assert_eq!(got, want, "{shards} shards");
            assert_eq!(interest.topics(), 2);
            // Withdrawn: nothing more goes there, and empty entries are forgotten.
            interest.remove(&a, ShardId(last as u16));
            interest.remove(&b, ShardId(last as u16));
            bus.deliver(
                &a,
                MsgId { ms: 2, seq: 0 },
                &Bytes::from_static(b"x"),
                &interest,
            );
            bus.deliver(
                &b,
                MsgId { ms: 2, seq: 1 },
                &Bytes::from_static(b"y"),
                &interest,
            );
            let got: Vec<usize> = rx.iter().map(delivered).collect();
            let mut want = vec![0; shards];
            want[0] = 1;
            assert_eq!(got, want, "{shards} shards, after removal");
            assert_eq!(interest.topics(), 1);
            interest.remove(&b, ShardId(0));
            interest.remove(&b, ShardId(0)); // twice is once
            assert_eq!(interest.topics(), 0);
        }
    }

    #[test]
    fn a_shard_that_wants_every_topic_gets_each_message_once() {
        for shards in [2usize, 65, 130] {
            let (bus, rx) = inboxes(shards);
            let mut interest = bus.interest();
            let a = TopicName::new("user.a").expect("a valid topic");
            let last = ShardId((shards - 1) as u16);
            interest.add(&a, last);
            // A clone, as a broker thread holds: the same set.
            bus.clone().want_every_topic(last, true);
            bus.want_every_topic(ShardId(0), true);
            bus.want_every_topic(ShardId(shards as u16), true); // no such shard
            let b = TopicName::new("nobody.asked").expect("a valid topic");
            for t in [&a, &b] {
                bus.deliver(
                    t,
                    MsgId { ms: 1, seq: 0 },
                    &Bytes::from_static(b"x"),
                    &interest,
                );
            }
            let got: Vec<usize> = rx.iter().map(delivered).collect();
            let mut want = vec![0; shards];
            want[0] = 2;
            want[shards - 1] = 2; // announced and every topic: once per message
            assert_eq!(got, want, "{shards} shards");
            bus.want_every_topic(ShardId(0), false);
            bus.deliver(
                &b,
                MsgId { ms: 2, seq: 0 },
                &Bytes::from_static(b"x"),
                &interest,
            );
            let got: Vec<usize> = rx.iter().map(delivered).collect();
            let mut want = vec![0; shards];
            want[shards - 1] = 1;
            assert_eq!(got, want, "{shards} shards, shard 0 withdrew");
        }
    }

    #[test]
    fn one_shard_gets_everything_without_announcing() {
        let (bus, rx) = inboxes(1);
        let t = TopicName::new("t").expect("a valid topic");
        let mut interest = bus.interest();
        interest.add(&t, ShardId(0));
        assert_eq!(interest.topics(), 0, "nothing tracked with one shard");
        bus.deliver(
            &t,
            MsgId { ms: 1, seq: 0 },
            &Bytes::from_static(b"x"),
            &interest,
        );
        assert_eq!(delivered(&rx[0]), 1);
    }

    #[test]
    fn a_drain_request_wakes_an_idle_shard() {
        let (tx, inbox) = inbox(Arc::new(ShardMetrics::default()));
        assert!(!is_ready(&inbox), "nothing to do yet");
        tx.drain(0);
        assert!(is_ready(&inbox));
        assert_eq!(inbox.take_drain(), Some(0), "a zero window is a drain too");
        assert!(!is_ready(&inbox));
    }
}
