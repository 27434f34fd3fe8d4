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

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The answer to a `pub`.
    Published {
        /// Who asked.
        reply: ReplyTo,
        /// The topic.
        topic: TopicName,
        /// The new message id, or why publishing failed.
        result: Result<MsgId, String>,
    },
    /// Start the graceful drain: send `drain`, close with 1001.
    Drain {
        /// Delays for `reconnect_in_ms` are spread over this window.
        window_ms: u64,
    },
}

/// The sending side of one shard's inbox.
#[derive(Debug, Clone)]
pub struct ShardSender {
    tx: Sender<ShardMsg>,
    waker: Arc<AtomicWaker>,
    lagged: Arc<AtomicBool>,
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
}

/// The receiving side of one shard's inbox; lives on the shard thread.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<ShardMsg>,
    waker: Arc<AtomicWaker>,
    lagged: Arc<AtomicBool>,
}

impl Inbox {
    /// Waits until the inbox has something or the lagged flag is up.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if !self.rx.is_empty() || self.lagged.load(Ordering::Acquire) {
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
}

/// Creates one shard's inbox pair.
pub fn inbox(metrics: Arc<ShardMetrics>) -> (ShardSender, Inbox) {
    let (tx, rx) = crossbeam_channel::bounded(SHARD_INBOX_CAPACITY);
    let waker = Arc::new(AtomicWaker::new());
    let lagged = Arc::new(AtomicBool::new(false));
    let sender = ShardSender {
        tx,
        waker: waker.clone(),
        lagged: lagged.clone(),
        metrics,
    };
    (sender, Inbox { rx, waker, lagged })
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

    /// Sends `Drain` to every shard.
    pub fn drain(&self, window_ms: u64) {
        for shard in &self.shards {
            shard.send(ShardMsg::Drain { window_ms });
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
