//! Redis key names of the partitions, and where they land on a Redis
//! Cluster (docs/PROTOCOL.md section 6). Pure: no IO.
//!
//! A partition's stream and epoch key share one hash tag (the part in
//! braces), so they live in one slot and any multi-key command over them
//! stays on one master. Two layouts choose the tags:
//!
//! - [`KeyLayout::Legacy`] (the default, what producers have always used):
//!   the tag is the partition number, `{0}` .. `{P-1}`. Those tags hash to
//!   slots unrelated to each other, so 16 partitions land 6/6/4 on three
//!   masters and leave half of eight masters empty.
//! - [`KeyLayout::Even`]: partition `i` of `N` gets the tag whose slot is
//!   `(2i + 1) * 16384 / 2N` (integer division): the middle of the i-th of
//!   N equal slot ranges. The N slots are evenly spaced, away from the
//!   edges where masters' ranges meet, so any number of masters holding
//!   even slot ranges gets its share (16 on 3 masters: 5/6/5; on 8: 2
//!   each; on 16: 1 each). The tag is the
//!   shortest string of lowercase letters whose slot that is, the first in
//!   alphabetical order among equals: deterministic, so every node and
//!   every producer computes the same keys (`ringcast keys` prints them).
//!   Letters only, so an even key can never be a legacy key.

use std::fmt;
use std::sync::OnceLock;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// Longest even-layout tag: every slot has a tag of at most 4 letters
/// (checked by a test over all 16384 slots).
const MAX_TAG_LEN: usize = 4;

/// How partitions are named in Redis: which hash tag each one gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyLayout {
    /// `{P}`: the partition number as the tag (the default, and what
    /// existing producers write to).
    #[default]
    Legacy,
    /// A tag per partition chosen so that the partitions' slots are evenly
    /// spaced over the cluster (see the module doc).
    Even,
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyLayout::Legacy => "legacy",
            KeyLayout::Even => "even",
        })
    }
}

/// Every partition's key names for one prefix, partition count and
/// layout, computed once (at start) and then only read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    layout: KeyLayout,
    streams: Vec<String>,
    epochs: Vec<String>,
}

impl Keys {
    /// The keys of `partitions` partitions (at least 1) under `prefix`.
    pub fn new(prefix: &str, partitions: u32, layout: KeyLayout) -> Keys {
        let n = partitions.max(1);
        let tags: Vec<String> = (0..n).map(|p| tag(layout, p, n)).collect();
        Keys {
            prefix: prefix.to_string(),
            layout,
            streams: tags
                .iter()
                .map(|t| format!("{prefix}:stream:{{{t}}}"))
                .collect(),
            epochs: tags
                .iter()
                .map(|t| format!("{prefix}:epoch:{{{t}}}"))
                .collect(),
        }
    }

    /// How many partitions.
    pub fn partitions(&self) -> u32 {
        self.streams.len() as u32
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The layout.
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// Partition `p`'s stream key.
    ///
    /// # Panics
    /// When `p` is not a partition (a bug: partitions come from
    /// [`crate::topic::partition`] with the same count).
    pub fn stream(&self, p: u32) -> &str {
        &self.streams[p as usize]
    }

    /// Partition `p`'s epoch key, in the same slot as its stream.
    ///
    /// # Panics
    /// As [`Keys::stream`].
    pub fn epoch(&self, p: u32) -> &str {
        &self.epochs[p as usize]
    }
}

/// Partition `p` of `n`'s hash tag under `layout`.
fn tag(layout: KeyLayout, p: u32, n: u32) -> String {
    match layout {
        KeyLayout::Legacy => p.to_string(),
        KeyLayout::Even => even_tags()[target_slot(p, n) as usize].clone(),
    }
}

/// The slot the even layout puts partition `p` of `n` on: the middle of
/// the p-th of n equal ranges.
pub fn target_slot(p: u32, n: u32) -> u16 {
    ((2 * u64::from(p) + 1) * u64::from(SLOTS) / (2 * u64::from(n.max(1)))) as u16
}

/// For every slot, the first tag of lowercase letters (shortest, then
/// alphabetical) that hashes to it. Computed once per process, in a few
/// milliseconds (under 500,000 CRC16s of at most 4 bytes).
fn even_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS as usize];
        let mut left = SLOTS as usize;
        let mut word = Vec::with_capacity(MAX_TAG_LEN);
        'lengths: for len in 1..=MAX_TAG_LEN {
            word.clear();
            word.resize(len, b'a');
            loop {
                let slot = key_slot(&word) as usize;
                if tags[slot].is_empty() {
                    tags[slot] = String::from_utf8_lossy(&word).into_owned();
                    left -= 1;
                    if left == 0 {
                        break 'lengths;
                    }
                }
                if !next_word(&mut word) {
                    break;
                }
            }
        }
        tags
    })
}

/// Steps `word` to the next string of its length in alphabetical order;
/// false after `zz..z`.
fn next_word(word: &mut [u8]) -> bool {
    for b in word.iter_mut().rev() {
        if *b < b'z' {
            *b += 1;
            return true;
        }
        *b = b'a';
    }
    false
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag, or of
/// the whole key when it has none, mod 16384 (the Redis Cluster spec).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(0) | None => key,
            Some(len) => &key[open + 1..open + 1 + len],
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

/// CRC-16/XMODEM (poly 0x1021, init 0), the one Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partitions per master when `masters` masters hold even slot ranges,
    /// split as `redis-cli --cluster create` splits them: 16384 / M slots
    /// each as a float, each range ending at the rounded running sum.
    fn spread(keys: &Keys, masters: u32) -> Vec<u32> {
        let each = f64::from(SLOTS) / f64::from(masters);
        let mut last = Vec::new();
        for m in 0..masters {
            let end = (f64::from(m) * each + each - 1.0).round() as u16;
            last.push(if m + 1 == masters { SLOTS - 1 } else { end });
        }
        let mut per = vec![0; masters as usize];
        for p in 0..keys.partitions() {
            let slot = key_slot(keys.stream(p).as_bytes());
            per[last.iter().position(|&l| slot <= l).unwrap()] += 1;
        }
        per
    }

    #[test]
    fn crc16_and_slots_match_redis() {
        // The Redis Cluster spec's check value, and slots `CLUSTER KEYSLOT`
        // answers (redis-cli on 7.0).
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"ringcast:stream:{5}"), key_slot(b"5"));
    }

    #[test]
    fn legacy_keys_are_the_partition_number_in_braces() {
        let k = Keys::new("ringcast", 16, KeyLayout::Legacy);
        assert_eq!(k.stream(5), "ringcast:stream:{5}");
        assert_eq!(k.epoch(0), "ringcast:epoch:{0}");
        assert_eq!(k.partitions(), 16);
    }

    #[test]
    fn every_slot_has_a_short_letter_tag() {
        let tags = even_tags();
        for (slot, t) in tags.iter().enumerate() {
            assert!(
                (1..=MAX_TAG_LEN).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_lowercase()),
                "slot {slot}: {t:?}"
            );
            assert_eq!(usize::from(key_slot(t.as_bytes())), slot, "{t}");
        }
    }

    #[test]
    fn even_keys_put_partitions_on_evenly_spaced_slots_sharing_stream_and_epoch() {
        for n in [1, 2, 3, 7, 16, 64, 1024] {
            let k = Keys::new("rc", n, KeyLayout::Even);
            for p in 0..n {
                let slot = key_slot(k.stream(p).as_bytes());
                assert_eq!(slot, target_slot(p, n), "partition {p} of {n}");
                assert_eq!(slot, key_slot(k.epoch(p).as_bytes()));
            }
        }
        // Deterministic (docs/PROTOCOL.md shows partition 0's key), and
        // the same slots whatever the prefix.
        let k = Keys::new("ringcast", 16, KeyLayout::Even);
        assert_eq!(k.stream(0), "ringcast:stream:{agbr}");
        assert_eq!(k, Keys::new("ringcast", 16, KeyLayout::Even));
        assert_eq!(
            key_slot(k.stream(3).as_bytes()),
            key_slot(Keys::new("x", 16, KeyLayout::Even).stream(3).as_bytes())
        );
    }

    #[test]
    fn even_layout_gives_every_master_its_share_where_legacy_does_not() {
        let even = Keys::new("ringcast", 16, KeyLayout::Even);
        let legacy = Keys::new("ringcast", 16, KeyLayout::Legacy);
        assert_eq!(spread(&even, 3), [5, 6, 5]);
        assert_eq!(spread(&even, 8), [2; 8]);
        assert_eq!(spread(&even, 16), [1; 16]);
        // Why the layout exists: 16 numbered tags leave masters empty.
        assert_eq!(spread(&legacy, 3), [6, 6, 4]);
        assert!(spread(&legacy, 8).iter().filter(|&&c| c == 0).count() >= 3);
        assert!(spread(&legacy, 16).iter().filter(|&&c| c == 0).count() >= 6);
        // Any partition count: the shares differ by at most one.
        for n in [5, 16, 24, 100, 1024] {
            let k = Keys::new("p", n, KeyLayout::Even);
            for m in [2, 3, 5, 8, 16] {
                let per = spread(&k, m);
                let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
                assert!(hi - lo <= 1, "{n} partitions on {m} masters: {per:?}");
            }
        }
    }
}
