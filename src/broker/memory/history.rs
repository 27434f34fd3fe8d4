//! A shard's part of the embedded broker, as data: each topic's bounded
//! history (by count and age) with the ids it replays from, the
//! idempotency keys of its recent publishes, and the part's id sequence.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::MAX_KEYS_PER_TOPIC;
use crate::id::MsgId;
use crate::topic::TopicName;

#[derive(Debug, Default)]
pub(super) struct Inner {
    /// The newest id of any topic this part keeps: its position, sent as `last` in
    /// the `ok` of every `sub`.
    pub(super) last: MsgId,
    pub(super) topics: HashMap<TopicName, TopicLog>,
    /// The newest id of every topic whose whole history expired and was
    /// removed: a `since` at or past it lost nothing of such a topic.
    pub(super) swept_through: MsgId,
    pub(super) publishes_since_sweep: u32,
}

#[derive(Debug, Default)]
pub(super) struct TopicLog {
    pub(super) entries: VecDeque<Entry>,
    /// The newest id this topic ever had.
    pub(super) last: MsgId,
    /// The newest id dropped from history: recovery from before it is impossible.
    pub(super) trimmed_through: Option<MsgId>,
    /// Idempotency keys of the topic's recent publishes; `None` until the
    /// first keyed one, so a topic without keys pays one word.
    pub(super) keys: Option<Box<Keys>>,
}

/// A topic's idempotency keys within the window, oldest first, each with
/// the id of the publish that first carried it.
#[derive(Debug, Default)]
pub(super) struct Keys {
    pub(super) order: VecDeque<(Arc<str>, MsgId)>,
    pub(super) index: HashMap<Arc<str>, MsgId>,
}

impl Keys {
    /// Forgets the keys of publishes before `oldest_ms`.
    pub(super) fn expire(&mut self, oldest_ms: u64) {
        while self.order.front().is_some_and(|(_, id)| id.ms < oldest_ms) {
            if let Some((key, _)) = self.order.pop_front() {
                self.index.remove(&key);
            }
        }
    }

    /// Remembers `key` for the publish `id`, forgetting the oldest past
    /// [`MAX_KEYS_PER_TOPIC`].
    pub(super) fn insert(&mut self, key: &str, id: MsgId) {
        if self.order.len() >= MAX_KEYS_PER_TOPIC {
            if let Some((old, _)) = self.order.pop_front() {
                self.index.remove(&old);
            }
        }
        let key: Arc<str> = key.into();
        self.index.insert(key.clone(), id);
        self.order.push_back((key, id));
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: MsgId,
    pub(super) frame: Bytes,
}

impl Inner {
    /// The next id: Redis semantics, time-based and strictly increasing even
    /// if the clock steps back.
    pub(super) fn next_id(&mut self, now: u64) -> MsgId {
        self.last = if now > self.last.ms {
            MsgId { ms: now, seq: 0 }
        } else {
            MsgId {
                ms: self.last.ms,
                seq: self.last.seq + 1,
            }
        };
        self.last
    }

    /// Drops expired history everywhere; `oldest_kept` gives each topic's
    /// cut-off (retention differs by namespace). A topic whose history is
    /// gone stays while it has idempotency keys from `keys_from` on.
    pub(super) fn sweep(&mut self, oldest_kept: impl Fn(&TopicName) -> u64, keys_from: u64) {
        let mut swept = self.swept_through;
        self.topics.retain(|topic, log| {
            log.expire(oldest_kept(topic));
            if let Some(keys) = log.keys.as_mut() {
                keys.expire(keys_from);
                if keys.order.is_empty() {
                    log.keys = None;
                }
            }
            let keep = !log.entries.is_empty() || log.keys.is_some();
            if !keep {
                swept = swept.max(log.last);
            }
            keep
        });
        self.swept_through = swept;
    }

    /// The replay of `topic` after the position `since` (at most the
    /// node's `last`), or `None` when some of it is no longer retained.
    pub(super) fn replay_after(
        &mut self,
        topic: &TopicName,
        since: MsgId,
        oldest_kept: u64,
    ) -> Option<Vec<Bytes>> {
        match self.topics.get_mut(topic) {
            Some(log) => {
                log.expire(oldest_kept);
                log.replay_after(since)
            }
            // Never published, or its whole history expired and was
            // swept: complete (empty) only if `since` is past all of it.
            None => (since >= self.swept_through).then(Vec::new),
        }
    }
}

impl TopicLog {
    pub(super) fn trim_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.trimmed_through = Some(e.id);
        }
    }

    pub(super) fn expire(&mut self, oldest_kept_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.id.ms < oldest_kept_ms)
        {
            self.trim_front();
        }
    }

    /// The frames after the position `since`, or `None` when they are not
    /// all retained.
    pub(super) fn replay_after(&self, since: MsgId) -> Option<Vec<Bytes>> {
        if self.trimmed_through.is_some_and(|t| since < t) {
            return None;
        }
        let start = self.entries.partition_point(|e| e.id <= since);
        Some(
            self.entries
                .range(start..)
                .map(|e| e.frame.clone())
                .collect(),
        )
    }
}
