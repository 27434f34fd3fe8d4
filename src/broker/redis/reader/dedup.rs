//! Idempotency at read time: a partition's entries that carry a `key`
//! field, remembered for `--idempotency-window` of entry-id time, so a
//! later entry with the same topic and key is skipped, not delivered.
//!
//! Deterministic across nodes: the table is per partition, fed in stream
//! order and aged by the ids of that stream alone (never by a clock), and
//! every node reads every partition in the same order, so every node skips
//! the same entries. What a node cannot know is an entry from before it
//! started reading (it starts at each stream's newest entry): a duplicate
//! of one is delivered by a node that restarted between the two. Keyed
//! publishes through ringcast itself never append a duplicate (the check
//! is in Redis, `KEYED_XADD`), so this only concerns plain `XADD`s.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::id::MsgId;
use crate::topic::TopicName;

/// Keys a partition remembers at most; past it the oldest is forgotten
/// before its window ends. Entries are counted in stream order, so every
/// node forgets the same ones.
pub(crate) const MAX_KEYS_PER_PARTITION: usize = 100_000;

/// A topic and a key, shared by the table's order and its index.
type TopicKey = Arc<(TopicName, Box<str>)>;

/// One partition's keyed entries within the window, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    order: VecDeque<(TopicKey, MsgId)>,
    index: HashMap<TopicKey, MsgId>,
}

impl Keys {
    /// Whether the entry `id` of `topic` with `key` repeats one within
    /// `window_ms` before it; when it does not, it is remembered.
    pub(crate) fn repeats(
        &mut self,
        topic: &TopicName,
        key: &str,
        id: MsgId,
        window_ms: u64,
    ) -> bool {
        let oldest = id.ms.saturating_sub(window_ms);
        while self
            .order
            .front()
            .is_some_and(|(_, first)| first.ms < oldest)
        {
            self.forget_oldest();
        }
        let probe = (topic.clone(), Box::<str>::from(key));
        if self.index.contains_key(&probe) {
            return true;
        }
        if self.order.len() >= MAX_KEYS_PER_PARTITION {
            self.forget_oldest();
        }
        let k = Arc::new(probe);
        self.index.insert(k.clone(), id);
        self.order.push_back((k, id));
        false
    }

    fn forget_oldest(&mut self) {
        if let Some((k, _)) = self.order.pop_front() {
            self.index.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> MsgId {
        MsgId { ms, seq: 0 }
    }

    #[test]
    fn a_key_repeats_within_the_window_of_entry_time_only() {
        let t = TopicName::new("orders:7").unwrap();
        let u = TopicName::new("orders:8").unwrap();
        let mut k = Keys::default();
        assert!(!k.repeats(&t, "a", id(1000), 100));
        assert!(k.repeats(&t, "a", id(1100), 100), "at the window's edge");
        assert!(!k.repeats(&u, "a", id(1100), 100), "another topic");
        assert!(!k.repeats(&t, "b", id(1100), 100), "another key");
        assert!(!k.repeats(&t, "a", id(1101), 100), "past the window");
        assert!(k.repeats(&t, "a", id(1150), 100), "the new first one");
    }
}
