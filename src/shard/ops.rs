//! The client's ops once it is welcome: one branch per op, and the token
//! rules (first `auth`, refresh, what a token lets a connection hold).

use std::rc::Rc;

use super::conn::Conn;
use super::Shard;
use crate::auth::Identity;
use crate::broker::SubscribeRequest;
use crate::id::ReplyTo;
use crate::protocol::{
    code, encode_error, encode_ok, encode_pong, encode_topic_error, ClientOp, Close, OkExtra,
};
use crate::topic::TopicName;

pub(super) fn on_op(shard: &Rc<Shard>, conn: &Rc<Conn>, text: &str) {
    let (id, op) = match ClientOp::parse(text) {
        Ok(parsed) => parsed,
        Err(e) => return shard.queue(conn, encode_error(e.id, e.code, &e.reason)),
    };
    let Some(identity) = conn.identity() else {
        return first_auth(shard, conn, op);
    };
    let reply = ReplyTo {
        shard: shard.id,
        conn: conn.id,
        req: id,
    };
    match op {
        ClientOp::Sub { topic, since } => {
            let refusal = if shard.namespaces.of(topic.as_str()).is_none() {
                let reason = format!("unknown namespace {:?}", topic.namespace());
                Some((code::UNKNOWN_NAMESPACE, reason))
            } else if topic.is_pattern()
                && shard
                    .namespaces
                    .of(topic.as_str())
                    .is_some_and(|ns| !ns.wildcards)
            {
                let reason = format!(
                    "namespace {:?} does not allow wildcard subscriptions",
                    topic.namespace()
                );
                Some((code::FORBIDDEN_TOPIC, reason))
            } else if !allows(shard, &identity, &topic) {
                Some((
                    code::FORBIDDEN_TOPIC,
                    format!("topic {topic} not allowed by token"),
                ))
            } else if conn.is_subscribed(&topic) {
                Some((code::BAD_REQUEST, format!("already subscribed to {topic}")))
            } else if conn.is_pending(&topic) {
                Some((
                    code::BAD_REQUEST,
                    format!("subscription to {topic} already in progress"),
                ))
            } else if conn.topic_count() >= shard.config.max_subscriptions {
                let max = shard.config.max_subscriptions;
                Some((
                    code::TOO_MANY_SUBSCRIPTIONS,
                    format!("too many subscriptions: max_subscriptions is {max}"),
                ))
            } else {
                None
            };
            match refusal {
                Some((c, reason)) => shard.queue(conn, encode_error(id, c, &reason)),
                None if topic.is_pattern() => {
                    // Live at once: the broker side sends this shard every
                    // topic before the `ok` goes out. Nothing is replayed:
                    // a pattern spans topics with positions of their own.
                    shard.add_pattern(conn, &topic);
                    let extra = OkExtra {
                        recovered: since.map(|_| false),
                        ..OkExtra::default()
                    };
                    shard.queue(conn, encode_ok(id, Some(&topic), extra));
                }
                None => {
                    // Indexed before the broker hears of it; the first
                    // `sub` of a topic here announces it.
                    let announce = shard.add_pending(conn, &topic);
                    shard.broker.subscribe(SubscribeRequest {
                        reply,
                        topic,
                        since,
                        announce,
                    });
                }
            }
        }
        ClientOp::Unsub { topic } => {
            shard.unsubscribe(conn, &topic);
            shard.queue(conn, encode_ok(id, Some(&topic), OkExtra::default()));
        }
        ClientOp::Pub { topic, data, key } => {
            match shard.namespaces.of(topic.as_str()) {
                None => {
                    let reason = format!("unknown namespace {:?}", topic.namespace());
                    return shard.queue(conn, encode_error(id, code::UNKNOWN_NAMESPACE, &reason));
                }
                Some(ns) if !ns.allow_publish => {
                    let reason =
                        format!("namespace {:?} does not allow client publishing", ns.name);
                    return shard.queue(conn, encode_error(id, code::FORBIDDEN_TOPIC, &reason));
                }
                Some(_) => {}
            }
            if !identity.may_publish(topic.as_str()) {
                let reason = format!("publishing to {topic} not allowed by token");
                return shard.queue(conn, encode_error(id, code::FORBIDDEN_TOPIC, &reason));
            }
            let len = data.get().len();
            let max = shard.config.max_publish_size;
            if len > max {
                let reason = format!("data is {len} bytes, over max_publish_size {max}");
                return shard.queue(conn, encode_error(id, code::PUBLISH_TOO_LARGE, &reason));
            }
            // Counted when the broker answers (inbox.rs): accepted ones only.
            let reply = Some(crate::broker::Replier::Shard(reply));
            shard
                .broker
                .publish_as(reply, topic, None, data.get(), key.as_deref());
        }
        ClientOp::Ping => shard.queue(conn, encode_pong(id)),
        ClientOp::Auth { token } => refresh_auth(shard, conn, id, &identity, &token),
        ClientOp::Presence { topic } => {
            let (c, reason) = match (shard.namespaces.of(topic.as_str()), &shard.presence) {
                (None, _) => {
                    let reason = format!("unknown namespace {:?}", topic.namespace());
                    (code::UNKNOWN_NAMESPACE, reason)
                }
                (Some(ns), _) if !ns.presence => {
                    let reason = format!("presence is off in namespace {:?}", ns.name);
                    (code::FORBIDDEN_TOPIC, reason)
                }
                // The token's `subs`, not an anonymous namespace, must allow it.
                (Some(_), _) if !identity.may_subscribe(topic.as_str()) => (
                    code::FORBIDDEN_TOPIC,
                    format!("presence of {topic} not allowed by token"),
                ),
                (Some(ns), Some(presence)) => {
                    return presence.query(reply, topic, ns.presence_max_users);
                }
                (Some(_), None) => (
                    code::UNAVAILABLE,
                    "presence is not running on this node".to_string(),
                ),
            };
            shard.queue(conn, encode_error(id, c, &reason));
        }
    }
}

/// The first frame of a client that came without `?token=`: it must be
/// `auth`; anything else closes with 4001.
pub(super) fn first_auth(shard: &Rc<Shard>, conn: &Rc<Conn>, op: ClientOp<'_>) {
    let ClientOp::Auth { token } = op else {
        return shard.close(conn, Close::AuthenticateFirst);
    };
    let Some(verifier) = &shard.auth else { return };
    match verifier.verify_shared(&token, &shard.grants) {
        Ok(identity) => {
            conn.set_identity(Some(Rc::new(identity)));
            super::upgrade::welcome(shard, conn);
        }
        Err(e) => shard.close(conn, Close::TokenRefused(e.reason())),
    }
}

/// A later `auth`: a fresh token for the same user replaces the old one.
pub(super) fn refresh_auth(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    id: Option<u64>,
    current: &Identity,
    token: &str,
) {
    let Some(verifier) = &shard.auth else {
        let reason = "this server accepts anonymous clients: there is no token to refresh";
        return shard.queue(conn, encode_error(id, code::BAD_REQUEST, reason));
    };
    match verifier.verify_shared(token, &shard.grants) {
        Ok(fresh) if fresh.user != current.user && !current.is_guest() => {
            shard.close(conn, Close::AnotherUser);
        }
        Ok(fresh) => {
            end_forbidden(shard, conn, &fresh);
            let was_guest = current.is_guest() && !fresh.is_guest();
            conn.set_identity(Some(Rc::new(fresh)));
            if was_guest {
                // A guest's subscriptions counted for nobody; now they count
                // for the token's user.
                for topic in conn.live_topics() {
                    let user = shard.presence_user(conn, &topic);
                    if let Some(local) = shard.topics.borrow_mut().get_mut(&topic) {
                        shard.count_in(local, &topic, user);
                    }
                }
            }
            shard.queue(conn, encode_ok(id, None, OkExtra::default()));
        }
        Err(e) => shard.queue(conn, encode_error(id, code::AUTH_REFUSED, e.reason())),
    }
}

/// Whether `identity` may hold a subscription to `topic`: its namespace
/// exists and admits anonymous subscribers, or the token's `subs` allow it.
/// A pattern also needs its namespace to allow wildcards, and one of the
/// token's `subs` to cover every topic it matches.
pub(super) fn allows(shard: &Shard, identity: &Identity, topic: &TopicName) -> bool {
    let Some(ns) = shard.namespaces.of(topic.as_str()) else {
        return false;
    };
    if !topic.is_pattern() {
        return ns.anonymous || identity.may_subscribe(topic.as_str());
    }
    ns.wildcards
        && (ns.anonymous
            || crate::auth::Pattern::parse(topic.as_str())
                .is_some_and(|p| identity.may_subscribe_pattern(&p)))
}

/// Whether the connection's current identity may hold a subscription to
/// `topic` (checked again when the broker answers a `sub`, since a token
/// refresh may have narrowed `subs` meanwhile).
pub(crate) fn may_subscribe(shard: &Shard, conn: &Conn, topic: &TopicName) -> bool {
    conn.read_identity(|id| id.is_some_and(|id| allows(shard, id, topic)))
}

/// A refreshed token may allow fewer topics: every subscription it does
/// not allow ends now (topic index and `subs`), each told to the client
/// with one `error` 4403 frame carrying the topic and no `id`. Pending
/// `sub`s are checked when the broker answers them ([`may_subscribe`]).
pub(super) fn end_forbidden(shard: &Rc<Shard>, conn: &Rc<Conn>, fresh: &Identity) {
    let ended: Vec<TopicName> = conn
        .live_topics()
        .into_iter()
        .filter(|t| !allows(shard, fresh, t))
        .collect();
    for topic in ended {
        shard.unsubscribe(conn, &topic);
        let reason = "subscription ended: topic not allowed by the refreshed token";
        let frame = encode_topic_error(None, code::FORBIDDEN_TOPIC, &topic, reason);
        shard.queue(conn, frame);
    }
}
