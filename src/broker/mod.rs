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
//! [`ShardMsg::Subscribed`]: crate::bus::ShardMsg::Subscribed

pub mod memory;
pub mod redis;

use std::fmt;

use crate::id::{ReplyTo, Since};
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
}

/// Publishing and subscribing, implemented by the embedded broker
/// ([`memory`]) and the Redis Streams broker ([`redis`]).
pub trait Broker: Send + Sync + fmt::Debug {
    /// Publishes `data` (a JSON document, already validated) to `topic`.
    /// When `reply` is set, the broker answers the publisher with
    /// `ShardMsg::Published`.
    fn publish(&self, reply: Option<ReplyTo>, topic: TopicName, data: &str);

    /// Subscribes: answers with `ShardMsg::Subscribed` under the ordering
    /// contract in the module docs.
    fn subscribe(&self, req: SubscribeRequest);
}
