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
use std::str::FromStr;

use crate::bus::ReplyTo;
use crate::topic::TopicName;

/// A message id in the Redis stream entry format `MS-SEQ`: milliseconds
/// since the epoch and a sequence number within that millisecond. Ordered
/// as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MsgId {
    /// Milliseconds since the Unix epoch.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a string is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected MS-SEQ, two decimal u64 numbers")]
pub struct MsgIdError(pub String);

impl FromStr for MsgId {
    type Err = MsgIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MsgIdError(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(err)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(err());
        }
        Ok(MsgId {
            ms: ms.parse().map_err(|_| err())?,
            seq: seq.parse().map_err(|_| err())?,
        })
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
}

/// The position a client asks to recover from.
#[derive(Debug, Clone)]
pub struct Since {
    /// The last message id the client saw.
    pub id: MsgId,
    /// The epoch that id came from; `None` means the client sent none, which
    /// can never be recovered.
    pub epoch: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_order_like_redis() {
        let a: MsgId = "1732240000000-0".parse().unwrap();
        let b: MsgId = "1732240000000-1".parse().unwrap();
        let c: MsgId = "1732240000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1732240000000-0");
    }

    #[test]
    fn bad_ids_are_rejected() {
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "+1-2",
            "1- 2",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<MsgId>().is_err(), "{bad:?} parsed");
        }
    }
}
