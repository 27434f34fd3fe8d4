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
//! The drain signal does not travel through the channel: a full inbox must
//! not lose it, or that shard would never drain and the process would hang.
//! It is a flag beside the channel (like `lagged`), set by
//! [`ShardSender::drain`] and checked by the shard loop on every wake-up.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::broker::MsgId;
use crate::metrics::{Drop, ShardMetrics};
use crate::topic::TopicName;

/// Messages a shard's inbox can hold before it counts as lagged. At 100-byte
/// messages that is a few MiB per shard; a shard that falls this far behind
/// is better off making its clients recover than growing without bound.
pub const SHARD_INBOX_CAPACITY: usize = 65_536;

/// A connection's identity within its shard, never reused while the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Where a broker sends its answer to one request.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    /// The shard owning the connection.
    pub shard: usize,
    /// The connection.
    pub conn: ConnId,
    /// The request's `id`, copied into the reply.
    pub req: Option<u64>,
}

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
    /// The answer to a `pub`.
    Published {
        /// Who asked.
        reply: ReplyTo,
        /// The topic.
        topic: TopicName,
        /// The new message id, or why publishing failed.
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
                self.metrics.dropped(Drop::ShardInboxFull);
                self.lagged.store(true, Ordering::Release);
            }
            // The shard has exited (shutdown): nobody is left to deliver to.
            Err(TrySendError::Disconnected(_)) => self.metrics.dropped(Drop::ShardGone),
        }
        self.waker.wake();
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

/// Every shard's sender: the broker's view of the node.
#[derive(Debug, Clone, Default)]
pub struct Bus {
    shards: Vec<ShardSender>,
}

impl Bus {
    /// A bus over these shards, indexed by shard number.
    pub fn new(shards: Vec<ShardSender>) -> Self {
        Self { shards }
    }

    /// Sends a `Deliver` to every shard. The frame is shared, not copied.
    pub fn deliver(&self, topic: &TopicName, id: MsgId, frame: &Bytes) {
        for shard in &self.shards {
            shard.send(ShardMsg::Deliver {
                topic: topic.clone(),
                id,
                frame: frame.clone(),
            });
        }
    }

    /// Sends `msg` to one shard; an unknown shard number is ignored (counted).
    pub fn send_to(&self, shard: usize, msg: ShardMsg) {
        match self.shards.get(shard) {
            Some(s) => s.send(msg),
            None => tracing::error!(shard, "reply for a shard that does not exist"),
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
        assert_eq!(metrics.dropped_count(Drop::ShardInboxFull), 1);
        bus.drain(1800);
        assert_eq!(metrics.dropped_count(Drop::ShardInboxFull), 1);
        assert_eq!(inbox.take_drain(), Some(1800));
        assert_eq!(inbox.take_drain(), None, "taken once");
        assert!(inbox.take_lagged());
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
