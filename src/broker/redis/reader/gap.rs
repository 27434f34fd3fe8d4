//! Gap detection: noticing that a partition stream lost entries (trimmed by
//! `MAXLEN`, or deleted) before this reader read them. `XREAD` resumes
//! after its last id whatever happened in between, so without this a reader
//! that falls behind by more than the retention skips the trimmed entries
//! silently. Pure functions of what Redis reported; the reader does the IO
//! (`check.rs`).
//!
//! # Why counting, and not `max-deleted-entry-id`
//!
//! Trimming removes entries from the head and does not touch
//! `max-deleted-entry-id` (only `XDEL` does; checked on Redis 7.0.15: 295
//! entries trimmed, still `0-0`). Ids alone cannot tell "everything up to
//! my last id was trimmed" (harmless) from "more was trimmed" (a gap). Redis
//! 7 counts instead: `entries-added` is how many entries the stream ever
//! had, so the entry with id `last-generated-id` is the `added`-th ever,
//! and when nothing after `first-entry` was deleted by `XDEL`
//! (`max-deleted-entry-id < first-entry`), every entry from the first on is
//! in the stream, so `first-entry` is number `added - length + 1`. The
//! reader keeps the ordinal of its own position (`count`): set from
//! `entries-added` at boot, one more per entry read. Whenever a snapshot
//! pins the ordinal of an entry the reader has read or is about to read,
//! the two must agree; when Redis's is larger, entries between were never
//! read: a gap, of exactly that many entries. These are facts about the
//! snapshot whenever it was taken, so no verdict is a false positive,
//! whether the snapshot was taken just before the `XREAD` (the normal case:
//! one pipeline, which Redis runs back to back unless the network splits
//! it) or after it. A snapshot before the read also sees a gap before any
//! of it is delivered; see `check.rs` for when the reader takes one.

use std::time::Duration;

use crate::broker::redis::entry::Retained;
use crate::id::MsgId;

/// A partition stream as `XINFO STREAM` reports it (Redis 7+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Snapshot {
    /// `entries-added`: entries the stream ever had.
    pub(super) added: u64,
    /// `length`: entries it has now.
    pub(super) length: u64,
    /// The oldest entry in the stream.
    pub(super) first: Option<MsgId>,
    /// The newest entry in the stream.
    pub(super) last: Option<MsgId>,
    /// `last-generated-id`: the `added`-th entry's id (perhaps deleted).
    pub(super) generated: MsgId,
    /// `max-deleted-entry-id`: the newest id `XDEL` removed (`0-0`: none).
    pub(super) max_deleted: MsgId,
}

impl Snapshot {
    /// The snapshot in an `XINFO STREAM` reply; `None` before Redis 7.0,
    /// which reports no `entries-added` (gaps cannot be detected there).
    pub(super) fn from_retained(r: &Retained) -> Option<Snapshot> {
        Some(Snapshot {
            added: r.added?,
            length: r.length,
            first: r.first,
            last: r.last,
            generated: r.last_generated.unwrap_or_default(),
            max_deleted: r.max_deleted.unwrap_or_default(),
        })
    }

    /// Entries gone from the stream (trimmed or deleted).
    fn removed(&self) -> u64 {
        self.added.saturating_sub(self.length)
    }

    /// The retention this snapshot shows: its length once the stream has
    /// been trimmed, `None` while it never was.
    pub(super) fn retention(&self) -> Option<u64> {
        (self.added > self.length).then_some(self.length)
    }
}

/// Entries lost before the reader read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gap {
    /// Every lost entry is older than this id, so a recovery from a
    /// `since` before it cannot be complete.
    pub(super) cut: MsgId,
    /// How many, when the counts tell.
    pub(super) lost: Option<u64>,
}

impl Gap {
    /// One gap covering both (a partition reports one event per read).
    pub(super) fn merge(a: Option<Gap>, b: Option<Gap>) -> Option<Gap> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Gap {
                cut: a.cut.max(b.cut),
                lost: a.lost.max(b.lost),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// What one snapshot says about one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Judgement {
    /// Entries lost before the reader read them.
    pub(super) gap: Option<Gap>,
    /// The ordinal of the reader's position after the batch (what its
    /// count becomes), `None` when unknown.
    pub(super) count: Option<u64>,
    /// The reader counted more entries than Redis ever had up to some
    /// point: the stream was deleted and written again. Not a gap the
    /// counts can prove (everything may have been read first); the count
    /// starts over from the snapshot.
    pub(super) reset: bool,
}

/// The next possible entry id after `id`.
pub(super) fn succ(id: MsgId) -> MsgId {
    match id.seq.checked_add(1) {
        Some(seq) => MsgId { ms: id.ms, seq },
        None => MsgId {
            ms: id.ms.saturating_add(1),
            seq: 0,
        },
    }
}

/// Whether `next` can be the entry right after `prev` when producers let
/// Redis pick ids (`XADD ... *`): the next sequence number in the same
/// millisecond, or sequence 0 of a later one. Anything else means entries
/// between were removed, or the producer picks its own ids: a hint to look
/// (a cheap test on the first entry of a batch), never a verdict.
pub(super) fn follows(prev: MsgId, next: MsgId) -> bool {
    (next.ms == prev.ms && Some(next.seq) == prev.seq.checked_add(1))
        || (next.ms > prev.ms && next.seq == 0)
}

/// Judges a batch the reader read after `last` (where its count was
/// `count`) against a snapshot `s` taken before or after the read.
/// `batch` holds the batch's entries in order; `id_of` reads an entry's id
/// (`None` for an unreadable one, which still counts as read).
pub(super) fn judge<T>(
    count: Option<u64>,
    last: MsgId,
    batch: &[T],
    id_of: impl Fn(&T) -> Option<MsgId>,
    s: &Snapshot,
) -> Judgement {
    let k = batch.len() as u64;
    let end = batch.iter().rev().find_map(&id_of).unwrap_or(last);
    // 1-based position of `id` in the batch.
    let pos = |id: MsgId| {
        batch
            .iter()
            .position(|e| id_of(e) == Some(id))
            .map(|i| i as u64 + 1)
    };
    // The first id of the batch after `id` (there is one when `id < end`).
    let after = |id: MsgId| {
        batch
            .iter()
            .find_map(|e| id_of(e).filter(|b| *b > id))
            .unwrap_or(end)
    };
    let mut reset = false;
    // The reader's count at an entry Redis numbers `ord`: fewer means that
    // many entries before it were never read (all older than `cut`).
    let mut pinned = |counted: Option<u64>, ord: u64, cut: MsgId| match counted {
        Some(c) if c < ord => Some(Gap {
            cut,
            lost: Some(ord - c),
        }),
        Some(c) if c > ord => {
            reset = true;
            None
        }
        _ => None,
    };
    let plus = |n: u64| count.map(|c| c + n);
    // An entry the snapshot showed after `last`, before the batch's end,
    // that the read did not return: removed in between, never read.
    let skipped = |id: MsgId| {
        (id > last && id < end && pos(id).is_none()).then(|| Gap {
            cut: after(id),
            lost: None,
        })
    };

    // The newest generated entry is number `added`.
    let g = s.generated;
    let (newest, newest_sync) = if g == last {
        (pinned(count, s.added, succ(last)), Some(s.added + k))
    } else if let Some(at) = pos(g) {
        (pinned(plus(at), s.added, g), Some(s.added + k - at))
    } else if s.last == Some(g) {
        (skipped(g), None)
    } else {
        (None, None)
    };

    // The first entry is number `removed + 1` when XDEL left no hole after
    // it (an empty stream: its next entry is number `added + 1`).
    let (oldest, oldest_sync) = match s.first {
        Some(f) if s.max_deleted < f && f > last => {
            let ord = s.removed() + 1;
            match pos(f) {
                Some(at) => (pinned(plus(at), ord, f), Some(ord + k - at)),
                None if f < end => (skipped(f), None),
                // Not reached yet: the reader's next entry is `f` at best.
                None => (pinned(plus(k + 1), ord, f), Some(ord - 1)),
            }
        }
        None if s.length == 0 && g > end => {
            (pinned(plus(k + 1), s.added + 1, succ(g)), Some(s.added))
        }
        _ => (None, None),
    };

    // `XDEL` of an entry after `last` that the batch does not have: it was
    // deleted before this reader could read it.
    let xdel = (s.max_deleted > last && pos(s.max_deleted).is_none()).then_some(Gap {
        cut: s.max_deleted,
        lost: None,
    });

    // When both counts pin a gap they agree on its size (the entries
    // between are all in the batch); the oldest entry places it closer.
    let counted = match (oldest, newest) {
        (Some(o), Some(n)) => Some(Gap {
            cut: o.cut,
            lost: o.lost.max(n.lost),
        }),
        (o, n) => o.or(n),
    };
    let sync = newest_sync.or(oldest_sync);
    Judgement {
        gap: Gap::merge(counted, xdel),
        reset,
        count: match sync {
            Some(n) => Some(n),
            // A deleted entry the reader skipped leaves its count short of
            // Redis's numbering, by an unknown number.
            None if xdel.is_some() || reset => None,
            None => plus(k),
        },
    }
}

/// Upper bound on the entries one Redis server appends to one stream per
/// second. `XADD ... MAXLEN ~` costs 2.9 µs of Redis CPU here (`INFO
/// commandstats`, 100-byte entries, Redis 7.0.15), so one single-threaded
/// server appends about 350 000 a second at best; this leaves room for
/// faster hardware.
pub(super) const MAX_APPEND_RATE: u64 = 1_000_000;

/// Every partition is checked at least this often, whatever else happens:
/// the safety net under the rules in `check.rs`, and how soon a retention
/// smaller than the node's own `MAXLEN` (set by another producer) is
/// learned.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long between two reads a partition of `retention` entries can go
/// unchecked: a gap needs more than `retention` entries appended in
/// between, which [`MAX_APPEND_RATE`] does not allow in less.
pub(super) fn stall_after(retention: u64) -> Duration {
    let micros = retention.saturating_mul(1_000_000) / MAX_APPEND_RATE;
    Duration::from_micros(micros).min(CHECK_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> MsgId {
        MsgId { ms, seq }
    }

    fn judge_ids(count: Option<u64>, last: MsgId, batch: &[MsgId], s: &Snapshot) -> Judgement {
        judge(count, last, batch, |m| Some(*m), s)
    }

    /// A stream of entries `1-0 ..= n-0` (entry i is number i), of which
    /// the first `removed` were trimmed.
    fn stream(n: u64, removed: u64) -> Snapshot {
        Snapshot {
            added: n,
            length: n - removed,
            first: (removed < n).then(|| id(removed + 1, 0)),
            last: (n > 0).then(|| id(n, 0)),
            generated: id(n, 0),
            max_deleted: MsgId::default(),
        }
    }

    fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<MsgId> {
        range.map(|i| id(i, 0)).collect()
    }

    #[test]
    fn a_reader_in_step_sees_no_gap_before_or_after_reading() {
        // Read up to 5 (count 5); 10 entries, 3 trimmed (already read).
        let s = stream(10, 3);
        let before = judge_ids(Some(5), id(5, 0), &ids(6..=10), &s);
        assert_eq!(
            before,
            Judgement {
                count: Some(10),
                ..Judgement::default()
            }
        );
        // The same batch judged after more was added and trimmed.
        let later = stream(30, 8);
        assert_eq!(judge_ids(Some(5), id(5, 0), &ids(6..=10), &later).gap, None);
        // Caught up and idle.
        assert_eq!(
            judge_ids(Some(10), id(10, 0), &[], &s),
            Judgement {
                count: Some(10),
                ..Judgement::default()
            }
        );
        // Behind, not reaching the end: counted on.
        let j = judge_ids(Some(5), id(5, 0), &ids(6..=7), &stream(10, 5));
        assert_eq!((j.gap, j.count), (None, Some(7)));
    }

    #[test]
    fn entries_trimmed_before_the_read_are_a_gap_of_that_many() {
        // Read up to 5; 300 added, the first 200 trimmed: 6..=200 are lost.
        let s = stream(300, 200);
        let j = judge_ids(Some(5), id(5, 0), &ids(201..=300), &s);
        assert_eq!(
            j.gap,
            Some(Gap {
                cut: id(201, 0),
                lost: Some(195),
            })
        );
        assert_eq!(j.count, Some(300));
        // Judged before reading, with a batch that stops short (COUNT).
        let j = judge_ids(Some(5), id(5, 0), &ids(201..=210), &s);
        assert_eq!(j.gap.map(|g| g.lost), Some(Some(195)));
        assert_eq!(j.count, Some(210));
        // The same, everything gone: the stream is empty, nothing read.
        let empty = Snapshot {
            first: None,
            last: None,
            length: 0,
            ..s
        };
        let j = judge_ids(Some(5), id(5, 0), &[], &empty);
        assert_eq!(
            j.gap,
            Some(Gap {
                cut: id(300, 1),
                lost: Some(295),
            })
        );
        assert_eq!(j.count, Some(300));
    }

    #[test]
    fn a_burst_trimmed_inside_one_command_is_seen_after_the_read() {
        // Blocked at 1 (count 1); one MULTI adds 300 and trims to 101: the
        // read returns 201..=301. Judged by a snapshot taken after it.
        let s = stream(301, 200);
        let j = judge_ids(Some(1), id(1, 0), &ids(201..=301), &s);
        assert_eq!(
            j.gap,
            Some(Gap {
                cut: id(201, 0),
                lost: Some(199),
            })
        );
        assert_eq!(j.count, Some(301));
        // The snapshot after the read may already show more trimmed: the
        // first entry is then inside the batch.
        let s = stream(320, 250);
        let j = judge_ids(Some(1), id(1, 0), &ids(201..=301), &s);
        assert_eq!(j.gap.map(|g| g.lost), Some(Some(199)));
        // Or past it: everything read is trimmed too; the counts still
        // show entries the reader will never get.
        let s = stream(400, 350);
        let j = judge_ids(Some(1), id(1, 0), &ids(201..=301), &s);
        assert_eq!(
            j.gap,
            Some(Gap {
                cut: id(351, 0),
                lost: Some(248),
            })
        );
        assert_eq!(j.count, Some(350));
        // Had the reader read 2..=200 too, nothing was lost before 302.
        let s = stream(400, 301);
        let j = judge_ids(Some(200), id(200, 0), &ids(201..=301), &s);
        assert_eq!((j.gap, j.count), (None, Some(301)));
    }

    #[test]
    fn a_late_look_finds_what_an_unchecked_read_skipped() {
        // The reader counted 2 entries fewer than Redis numbers its position.
        let s = stream(50, 40);
        let j = judge_ids(Some(48), id(50, 0), &[], &s);
        assert_eq!(
            j.gap,
            Some(Gap {
                cut: id(50, 1),
                lost: Some(2),
            })
        );
        assert_eq!(j.count, Some(50), "counted as Redis does from now on");
        // Reaching the newest entry inside the batch tells the same.
        let j = judge_ids(Some(40), id(42, 0), &ids(43..=50), &s);
        assert_eq!(j.gap.map(|g| (g.cut, g.lost)), Some((id(50, 0), Some(2))));
    }

    #[test]
    fn an_entry_seen_in_the_snapshot_but_skipped_by_the_read_is_a_gap() {
        // The snapshot (before the read) showed 6..=10; the read, run after
        // another client's trim, returned 9 and 10 only.
        let s = stream(10, 5);
        let j = judge_ids(Some(5), id(5, 0), &ids(9..=10), &s);
        assert_eq!(j.gap.map(|g| g.cut), Some(id(9, 0)));
    }

    #[test]
    fn xdel_of_an_unread_entry_is_a_gap_and_of_a_read_one_is_not() {
        let mut s = stream(10, 0);
        s.max_deleted = id(7, 0);
        s.length = 9;
        let j = judge_ids(Some(5), id(5, 0), &[id(6, 0), id(8, 0)], &s);
        assert_eq!(
            j.gap,
            Some(Gap {
                cut: id(7, 0),
                lost: None
            })
        );
        // Deleted after this reader had read it: nothing lost.
        assert_eq!(judge_ids(Some(8), id(8, 0), &ids(9..=10), &s).gap, None);
        // And deleted after the read, when judged from a later snapshot.
        s.max_deleted = id(9, 0);
        assert_eq!(judge_ids(Some(8), id(8, 0), &ids(9..=10), &s).gap, None);
    }

    #[test]
    fn an_unknown_count_is_learned_without_a_verdict() {
        let s = stream(300, 200);
        let j = judge_ids(None, id(5, 0), &ids(201..=300), &s);
        assert_eq!((j.gap, j.count), (None, Some(300)));
        let j = judge_ids(None, id(5, 0), &ids(201..=210), &s);
        assert_eq!((j.gap, j.count), (None, Some(210)));
    }

    #[test]
    fn a_recreated_stream_resets_the_count_instead_of_crying_gap() {
        // The reader counted 500; the stream was deleted and has 3 entries.
        let s = Snapshot {
            added: 3,
            length: 3,
            first: Some(id(601, 0)),
            last: Some(id(603, 0)),
            generated: id(603, 0),
            max_deleted: MsgId::default(),
        };
        let j = judge_ids(Some(500), id(500, 0), &ids(601..=603), &s);
        assert_eq!((j.gap, j.reset, j.count), (None, true, Some(3)));
    }

    #[test]
    fn successors_and_stall_windows() {
        assert!(follows(id(5, 3), id(5, 4)));
        assert!(follows(id(5, 3), id(9, 0)));
        assert!(!follows(id(5, 3), id(5, 5)));
        assert!(!follows(id(5, 3), id(9, 199)));
        assert!(follows(id(5, u64::MAX), id(6, 0)));
        assert_eq!(succ(id(5, 3)), id(5, 4));
        assert_eq!(succ(id(5, u64::MAX)), id(6, 0));
        assert_eq!(stall_after(100_000), Duration::from_millis(100));
        assert_eq!(stall_after(10), Duration::from_micros(10));
        assert_eq!(stall_after(u64::MAX), CHECK_EVERY);
    }
}
