//! Idempotency at read time: a partition's entries that carry a `key`
//! field, remembered for `--idempotency-window` of entry-id time, so a
//! later entry with the same topic and key is skipped, not delivered.
//!
//! Deterministic across nodes: the table is per partition, fed in stream
//! order and aged by the ids of that stream alone (never by a clock), and
//! every node reads every partition in the same order, so every node skips
//! the same entries, and a recovery (an `XRANGE` of the stream, where the
//! skipped entries still are) leaves out the ones this node skipped. A
//! node that starts reads the newest [`BOOT_ENTRIES`] of each partition's
//! window first, so it knows the keys written just before it started; a
//! first entry older than those, or trimmed from the stream, it cannot
//! know, and it delivers that one's repeat. Keyed
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

/// Entries of a partition read at boot to learn the keys of the window
/// before it (`Reader::learn_recent_keys`): past it, the oldest of the
/// window stay unknown to a restarted node. Bounds the boot's read.
pub(crate) const BOOT_ENTRIES: usize = 1000;

/// Ids of skipped duplicates a partition remembers, so a recovery (which
/// reads the stream, where they still are) leaves them out as well.
pub(crate) const MAX_SKIPPED_PER_PARTITION: usize = 100_000;

/// One partition's keyed entries within the window, oldest first, and the
/// ids of the entries skipped as repeats.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    order: VecDeque<(TopicKey, MsgId)>,
    index: HashMap<TopicKey, MsgId>,
    /// In stream order, so sorted.
    skipped: VecDeque<MsgId>,
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
            if self.skipped.len() >= MAX_SKIPPED_PER_PARTITION {
                self.skipped.pop_front();
            }
            self.skipped.push_back(id);
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

    /// `frames` (a recovery's range, with ids) without the entries this
    /// partition skipped as repeats.
    pub(crate) fn without_skipped<T>(&self, frames: Vec<(MsgId, T)>) -> Vec<T> {
        frames
            .into_iter()
            .filter(|(id, _)| self.skipped.binary_search(id).is_err())
            .map(|(_, f)| f)
            .collect()
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
        // The two repeats are left out of a range that holds them.
        let range: Vec<(MsgId, u64)> = [1000, 1100, 1101, 1150]
            .iter()
            .map(|&m| (id(m), m))
            .collect();
        assert_eq!(k.without_skipped(range), [1000, 1101]);
    }
}
