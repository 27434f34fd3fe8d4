//! Resubscribing: what [`Reconnecting`] does with each topic after a
//! reconnect, a refused `sub` (retried later or dropped) and an `ok` (the
//! position, `recovered`).

use std::time::Instant;

use serde_json::{json, Value};

use super::{
    Client, ClientError, Event, Position, Reconnecting, Result, Retry, Subscribed, ABNORMAL,
    RETRY_SUB_CODES,
};
use crate::id::MsgId;

impl Reconnecting {
    /// Runs the first retry that is due, if any; whether one was.
    pub(super) fn retry_due(&mut self, now: Instant) -> bool {
        let Some(i) = self.retries.iter().position(|r| r.at <= now) else {
            return false;
        };
        let retry = self.retries.swap_remove(i);
        let mut client = self.client.take().expect("retries run connected");
        match self.resubscribe(&mut client, &retry.topic, retry.attempt) {
            Ok(()) => self.client = Some(client),
            Err(e @ (ClientError::Closed(..) | ClientError::Io(_))) => self.broken(&e),
            // No answer in time, or garbage: the link is no good either.
            Err(e) => self.closed(ABNORMAL, e.to_string()),
        }
        true
    }

    /// Sends `topic`'s `sub` on `client` from its position and settles the
    /// answer. A retryable refusal schedules try `attempt + 1`; another
    /// refusal drops the topic. An error only when the connection failed.
    pub(super) fn resubscribe(
        &mut self,
        client: &mut Client,
        topic: &str,
        attempt: u32,
    ) -> Result<()> {
        let since = self
            .positions
            .get(topic)
            .and_then(|p| Some((p.id.as_deref()?, p.epoch.as_str())));
        match client.subscribe(topic, since) {
            Ok(sub) => {
                self.settle(topic, sub);
                // A pattern has no position to recover from: what it
                // matched while disconnected is lost, and said so.
                if topic.contains(['*', '#']) && !self.unrecovered.iter().any(|t| t == topic) {
                    self.unrecovered.push(topic.to_string());
                }
            }
            Err(ClientError::Server { code, .. }) if RETRY_SUB_CODES.contains(&code) => {
                self.retry_later(topic, attempt);
            }
            Err(ClientError::Server { code, reason }) => {
                // Surfaced as the server says a subscription ended.
                self.drop_topic(topic);
                let ended = json!({"op": "error", "code": code, "topic": topic, "reason": reason});
                self.queue.push_back(Event::Frame(ended));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    pub(super) fn retry_later(&mut self, topic: &str, attempt: u32) {
        self.retries.push(Retry {
            topic: topic.to_string(),
            at: Instant::now() + self.backoff_delay(attempt),
            attempt: attempt + 1,
        });
    }

    pub(super) fn drop_topic(&mut self, topic: &str) {
        self.positions.remove(topic);
        self.retries.retain(|r| r.topic != topic);
    }

    /// Takes in a `sub`'s answer: queues the replay and moves the topic's
    /// position to the newest id received, in the order received (the
    /// replay, then the `ok`'s `last`).
    pub(super) fn settle(&mut self, topic: &str, sub: Subscribed) {
        let old = self.positions.remove(topic);
        let mut id = match sub.recovered {
            Some(true) => old.and_then(|p| p.id),
            // `recovered:false`: the old position is not in this history.
            Some(false) | None => None,
        };
        match sub.recovered {
            Some(true) => self.recovered.push(topic.to_string()),
            Some(false) => self.unrecovered.push(topic.to_string()),
            None => {}
        }
        for e in &sub.replayed {
            if let Event::Msg { id: m, .. } = e {
                id = Some(newer(id, m));
            }
        }
        if !sub.last.is_empty() {
            id = Some(newer(id, &sub.last));
        }
        let position = Position {
            id,
            epoch: sub.epoch,
        };
        self.positions.insert(topic.to_string(), position);
        self.queue.extend(sub.replayed);
    }
}

/// The topic of an `error` without `id` that carries `topic`: the server
/// ended that subscription (docs/PROTOCOL.md section 2).
pub(super) fn ended_subscription(v: &Value) -> Option<&str> {
    if v["op"] != "error" || !v["id"].is_null() {
        return None;
    }
    v["topic"].as_str()
}

/// A topic's position after receiving `received`: that id, unless both
/// parse and it is older. Ids of one topic only grow, so an older one
/// would be a server's mistake; following it would replay duplicates.
pub(super) fn newer(current: Option<String>, received: &str) -> String {
    let older = |c: &str| match (c.parse::<MsgId>(), received.parse::<MsgId>()) {
        (Ok(c), Ok(r)) => r < c,
        _ => false,
    };
    match current {
        Some(c) if older(&c) => c,
        _ => received.to_string(),
    }
}
