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

use crate::bus::{Bus, ShardMsg};
use crate::id::{MsgId, ReplyTo, ShardId, Since};
use crate::topic::TopicName;

/// A callback that takes the outcome of one publish (the admin endpoint's
/// `POST /publish` waits on it). Called on a broker or shard thread: it must not
/// block.
pub type Answer = Box<dyn FnOnce(Result<MsgId, String>) + Send>;

/// Where the outcome of a publish goes: the publishing connection's shard
/// (as `ShardMsg::Published`), or a callback.
pub enum Replier {
    /// A client `pub` with an `id`.
    Shard(ReplyTo),
    /// Any other publisher that waits for the id.
    Call(Answer),
}

impl fmt::Debug for Replier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replier::Shard(r) => f.debug_tuple("Shard").field(r).finish(),
            Replier::Call(_) => f.write_str("Call"),
        }
    }
}

impl Replier {
    /// Delivers the outcome of the publish of `topic`.
    pub fn answer(self, bus: &Bus, topic: TopicName, result: Result<MsgId, String>) {
        match self {
            Replier::Shard(reply) => bus.send_to(
                reply.shard,
                ShardMsg::Published {
                    reply,
                    topic,
                    result,
                },
            ),
            Replier::Call(f) => f(result),
        }
    }
}

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
    fn publish(&self, reply: Option<ReplyTo>, topic: TopicName, data: &str) {
        self.publish_as(reply.map(Replier::Shard), topic, None, data, None);
    }

    /// Publishes `data` (validated) to `topic`, with an optional `event`
    /// name (checked: at most `MAX_EVENT_LEN` bytes), answering `reply`.
    /// A publish the broker cannot take is answered with an error (4503 to
    /// a client), never queued without bound.
    ///
    /// With an idempotency `key` (checked: [`crate::protocol::check_key`]),
    /// a publish of the same topic and key within `--idempotency-window`
    /// of the first is not delivered again and is answered with the first
    /// one's id (each broker says how far that promise goes).
    fn publish_as(
        &self,
        reply: Option<Replier>,
        topic: TopicName,
        event: Option<&str>,
        data: &str,
        key: Option<&str>,
    );

    /// Subscribes: answers with `ShardMsg::Subscribed` under the ordering
    /// contract in the module docs, or `ShardMsg::SubscribeFailed`.
    fn subscribe(&self, req: SubscribeRequest);

    /// `shard` has no subscriber (live or pending) for `topic` any more:
    /// stop delivering it there. Sent after the shard's `sub`s of the topic,
    /// in the same order. Dropped when the broker's queue is full, which
    /// costs only deliveries the shard ignores until the next withdrawal.
    fn withdraw(&self, topic: TopicName, shard: ShardId);

    /// `shard` holds a pattern subscription (`on`), or no longer does:
    /// deliver it every topic from now on, or only the ones it announced
    /// (see [`Bus::want_every_topic`]).
    fn want_every_topic(&self, shard: ShardId, on: bool);

    /// Sends a presence event (`join` or `leave` of `user` on `topic`) to
    /// the topic's subscribers, in order with its messages. The embedded
    /// broker does; the Redis broker's events are stream entries that the
    /// presence thread writes and the readers deliver, so it ignores this.
    fn presence_event(&self, _topic: TopicName, _user: std::sync::Arc<str>, _join: bool) {}

    /// Called on each shard's thread before it serves: the embedded broker
    /// hands the thread its part (the topics it keeps).
    fn attach(&self, _shard: ShardId) {}
}
