//! The broker seam: publishing and subscribing with recovery, whatever
//! carries the messages between producers and this node's shards.
//!
//! A broker answers into the shards' inboxes ([`crate::bus`]), never by
//! return value, so a broker that waits on the network (Redis) and the
//! embedded one look the same to a shard. The ordering contract that makes
//! recovery exact: for one topic, a broker puts [`ShardMsg::Subscribed`] into
//! a shard's inbox after every `Deliver` of an id at or below the last id it
//! replayed and before every `Deliver` of a later id. The shard then adds
//! the subscriber when it handles `Subscribed`, and the client sees replay,
//! `ok`, live, with no gap and no duplicate.
//!
//! Brokers run on threads of their own and take the shards' requests
//! through bounded queues: nothing a shard calls here takes a lock or
//! waits. A request that does not fit its queue is refused (error 4503 for
//! `pub` and `sub`). Which shards a topic's messages go to travels in the
//! same queue as `sub`: a shard's first `sub` of a topic announces it
//! ([`SubscribeRequest::announce`]), and [`Broker::withdraw`] takes it
//! back after the shard's last local subscriber left.
//!
//! [`ShardMsg::Subscribed`]: crate::bus::ShardMsg::Subscribed

pub mod memory;
pub mod redis;

use std::fmt;

use crate::id::{ReplyTo, ShardId, Since};
use crate::topic::TopicName;

/// A subscription request: where to answer, and what the client last saw.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    /// The connection (and its request id) to answer.
    pub reply: ReplyTo,
    /// The topic to subscribe to.
    pub topic: TopicName,
    /// `since` and `epoch` from the client, when it asks for recovery.
    pub since: Option<Since>,
    /// The asking shard has no other subscription (live or pending) to the
    /// topic: from this request on, deliver the topic to that shard too.
    pub announce: bool,
}

/// Publishing and subscribing, implemented by the embedded broker
/// ([`memory`]) and the Redis Streams broker ([`redis`]).
pub trait Broker: Send + Sync + fmt::Debug {
    /// Publishes `data` (a JSON document, already validated) to `topic`.
    /// When `reply` is set, the broker answers the publisher with
    /// `ShardMsg::Published`.
    fn publish(&self, reply: Option<ReplyTo>, topic: TopicName, data: &str);

    /// Subscribes: answers with `ShardMsg::Subscribed` under the ordering
    /// contract in the module docs, or `ShardMsg::SubscribeFailed`.
    fn subscribe(&self, req: SubscribeRequest);

    /// `shard` has no subscriber (live or pending) for `topic` any more:
    /// stop delivering it there. Sent after the shard's `sub`s of the topic,
    /// in the same order. Dropped when the broker's queue is full, which
    /// costs only deliveries the shard ignores until the next withdrawal.
    fn withdraw(&self, topic: TopicName, shard: ShardId);
}
