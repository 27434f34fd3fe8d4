//! Stream entries and replies, with no IO: the partition rule, key names,
//! decoding and validating one entry, and taking apart `XREAD` / `XRANGE` /
//! `XINFO STREAM` replies. Everything here is a pure function of its input
//! so it is tested without a Redis server. The decoders are `pub` (hidden
//! from the docs) only so `tests/fuzz_redis.rs` can feed them arbitrary
//! `redis::Value` trees; they are not a stable API.

use ::redis::Value;
use bytes::Bytes;

use crate::id::MsgId;
use crate::metrics::Skip;
use crate::topic::TopicName;

/// Longest `event` name copied into a `msg` frame.
pub const MAX_EVENT_LEN: usize = 64;

pub use crate::topic::partition;

/// `{prefix}:stream:{P}`, the legacy layout's stream key: the braces are a
/// Redis Cluster hash tag. Every layout's keys: [`super::Keys`].
pub fn stream_key(prefix: &str, p: u32) -> String {
    format!("{prefix}:stream:{{{p}}}")
}

/// `{prefix}:epoch:{P}`, the legacy layout's epoch key, in the same hash
/// slot as its stream.
pub fn epoch_key(prefix: &str, p: u32) -> String {
    format!("{prefix}:epoch:{{{p}}}")
}

/// One valid entry, ready to encode.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    /// The `topic` field, a valid topic of the partition it was found in.
    pub topic: TopicName,
    /// The `event` field: 1 to [`MAX_EVENT_LEN`] bytes of UTF-8.
    pub event: Option<String>,
    /// The `data` field: one JSON document (empty in a presence entry).
    pub data: String,
    /// (v1.2) The `key` field: the producer's idempotency key, 1 to
    /// [`crate::protocol::MAX_KEY_LEN`] bytes of UTF-8.
    pub key: Option<String>,
    /// A presence entry (`presence` and `user` fields; docs/PROTOCOL.md
    /// section 6): delivered as `join`/`leave`, never replayed.
    pub presence: Option<PresenceEvent>,
}

/// A presence entry's event.
#[derive(Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    /// `join` (true) or `leave`.
    pub join: bool,
    /// The `user` field: 1 to [`MAX_USER_LEN`] bytes of UTF-8.
    pub user: String,
}

/// Longest `user` of a presence entry (user ids are JWT `sub` claims).
pub const MAX_USER_LEN: usize = 1024;

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

fn items(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        Value::Map(m) => Some(m.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        _ => None,
    }
}

/// Parses an entry id as Redis returns it.
pub fn parse_id(v: Value) -> Option<MsgId> {
    std::str::from_utf8(&bytes(v)?).ok()?.parse().ok()
}

/// [`parse_id`] without taking the value: the gap checks look at a batch's
/// ids before it is delivered.
pub(crate) fn peek_id(v: &Value) -> Option<MsgId> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// Validates one entry's flat field list (`topic`, `data`, optional
/// `event`; other fields are ignored; of a repeated field the last counts)
/// found in partition `p`. A field whose value is not a string (an array,
/// say) is invalid, not missing.
pub fn decode_entry(fields: Value, p: u32, partitions: u32) -> Result<Entry, Skip> {
    let fields = items(fields).ok_or(Skip::Malformed)?;
    let (mut topic, mut data, mut event, mut key) = (None, None, None, None);
    let (mut presence, mut user) = (None, None);
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match bytes(k).as_deref() {
            Some(b"topic") => topic = Some(bytes(v).ok_or(Skip::InvalidTopic)),
            Some(b"data") => data = Some(bytes(v).ok_or(Skip::InvalidData)),
            Some(b"event") => event = Some(bytes(v).ok_or(Skip::InvalidEvent)),
            Some(b"key") => key = Some(bytes(v).ok_or(Skip::InvalidKey)),
            Some(b"presence") => presence = Some(bytes(v)),
            Some(b"user") => user = Some(bytes(v)),
            _ => {}
        }
    }
    // Precedence: missing topic, missing data (not in a presence entry),
    // then each field in turn.
    let topic = topic.ok_or(Skip::MissingTopic)?;
    if let Some(kind) = presence {
        let topic = entry_topic(topic?, p, partitions)?;
        let join = match kind.as_deref() {
            Some(b"join") => true,
            Some(b"leave") => false,
            _ => return Err(Skip::InvalidPresence),
        };
        let user = user.flatten().ok_or(Skip::InvalidPresence)?;
        if user.is_empty() || user.len() > MAX_USER_LEN {
            return Err(Skip::InvalidPresence);
        }
        let user = String::from_utf8(user).map_err(|_| Skip::InvalidPresence)?;
        return Ok(Entry {
            topic,
            event: None,
            data: String::new(),
            key: None,
            presence: Some(PresenceEvent { join, user }),
        });
    }
    let data = data.ok_or(Skip::MissingData)?;
    let topic = entry_topic(topic?, p, partitions)?;
    let data = String::from_utf8(data?).map_err(|_| Skip::InvalidData)?;
    // The rules a client `pub` meets: one JSON document, not nested deeper
    // than subscribers' parsers go, numbers in range (found by
    // tests/fuzz_redis.rs: a 1000-deep document passed and reached
    // subscribers that cannot read it, ringcast's own client among them).
    crate::protocol::check_data(&data).map_err(|_| Skip::InvalidData)?;
    let event = match event.transpose()? {
        None => None,
        Some(e) if e.is_empty() || e.len() > MAX_EVENT_LEN => return Err(Skip::InvalidEvent),
        Some(e) => Some(String::from_utf8(e).map_err(|_| Skip::InvalidEvent)?),
    };
    let key = match key.transpose()? {
        None => None,
        Some(k) => {
            let k = String::from_utf8(k).map_err(|_| Skip::InvalidKey)?;
            crate::protocol::check_key(&k).map_err(|_| Skip::InvalidKey)?;
            Some(k)
        }
    };
    Ok(Entry {
        topic,
        event,
        data,
        key,
        presence: None,
    })
}

/// The `topic` field of an entry found in partition `p`, checked.
fn entry_topic(topic: Vec<u8>, p: u32, partitions: u32) -> Result<TopicName, Skip> {
    let topic = std::str::from_utf8(&topic).map_err(|_| Skip::InvalidTopic)?;
    let topic = TopicName::new(topic).map_err(|_| Skip::InvalidTopic)?;
    if partition(topic.as_str(), partitions) != p {
        return Err(Skip::WrongPartition);
    }
    Ok(topic)
}

/// Whether an entry's field list has a `topic` field equal to `topic`: a
/// cheap look before [`decode_entry`] when most entries are of other topics.
/// (When `topic` repeats, decoding keeps the last one, so this is a
/// necessary condition, not a sufficient one.)
pub(crate) fn has_topic(fields: &Value, topic: &str) -> bool {
    let is = |v: &Value, want: &[u8]| match v {
        Value::BulkString(b) => b.as_slice() == want,
        Value::SimpleString(s) => s.as_bytes() == want,
        _ => false,
    };
    match fields {
        Value::Array(a) => a
            .chunks_exact(2)
            .any(|kv| is(&kv[0], b"topic") && is(&kv[1], topic.as_bytes())),
        Value::Map(m) => m
            .iter()
            .any(|(k, v)| is(k, b"topic") && is(v, topic.as_bytes())),
        _ => false,
    }
}

/// One stream's entries in a reply: (id, fields) pairs, ids unparsed.
pub type RawEntries = Vec<(Value, Value)>;

/// The entries of an `XRANGE` reply (or of one stream in `XREAD`).
pub fn range_entries(v: Value) -> Option<RawEntries> {
    if matches!(v, Value::Nil) {
        return Some(Vec::new());
    }
    items(v)?
        .into_iter()
        .map(|e| {
            let mut e = items(e)?.into_iter();
            Some((e.next()?, e.next().unwrap_or(Value::Nil)))
        })
        .collect()
}

/// The streams of an `XREAD` reply: (key, entries); nil (timeout or
/// `CLIENT UNBLOCK`) is no stream.
pub fn xread_streams(v: Value) -> Option<Vec<(Vec<u8>, RawEntries)>> {
    if matches!(v, Value::Nil) {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    match v {
        // RESP3: key => entries.
        Value::Map(m) => {
            for (k, e) in m {
                out.push((bytes(k)?, range_entries(e)?));
            }
        }
        // RESP2: [[key, entries], ...].
        other => {
            for s in items(other)? {
                let mut s = items(s)?.into_iter();
                let key = bytes(s.next()?)?;
                out.push((key, range_entries(s.next()?)?));
            }
        }
    }
    Some(out)
}

/// The id of an `[id, fields]` entry, as in `XINFO STREAM`'s `first-entry`.
fn entry_id(v: Value) -> Option<MsgId> {
    items(v)
        .and_then(|e| e.into_iter().next())
        .and_then(parse_id)
}

/// What `XINFO STREAM` says about what a partition still holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retained {
    /// The oldest entry still in the stream.
    pub first: Option<MsgId>,
    /// Entries in the stream.
    pub length: u64,
    /// Entries ever added (Redis 7+).
    pub added: Option<u64>,
    /// The newest id removed by XDEL (Redis 7+; trimming leaves it alone).
    pub max_deleted: Option<MsgId>,
    /// `last-generated-id`: the id of the newest entry ever added, even
    /// if it was deleted since.
    pub last_generated: Option<MsgId>,
    /// The newest entry still in the stream.
    pub last: Option<MsgId>,
}

impl Retained {
    /// Reads an `XINFO STREAM` reply.
    pub fn from_xinfo(v: Value) -> Option<Retained> {
        let mut r = Retained::default();
        let mut it = items(v)?.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let int =
                |v: Value| -> Option<u64> { std::str::from_utf8(&bytes(v)?).ok()?.parse().ok() };
            match bytes(k).as_deref() {
                Some(b"length") => r.length = int(v)?,
                Some(b"entries-added") => r.added = int(v),
                Some(b"max-deleted-entry-id") => r.max_deleted = parse_id(v),
                Some(b"last-generated-id") => r.last_generated = parse_id(v),
                Some(b"first-entry") => r.first = entry_id(v),
                Some(b"last-entry") => r.last = entry_id(v),
                _ => {}
            }
        }
        Some(r)
    }

    /// Whether every entry after `since` is still in the stream. Trimming
    /// removes from the front, so after a trim only ids at or past the first
    /// retained entry are known complete; XDEL shows in `max_deleted`.
    /// Without `entries-added` (Redis < 7) a trim cannot be told apart from
    /// an id older than the stream, and recovery is refused.
    pub fn covers(&self, since: MsgId) -> bool {
        if self.max_deleted.is_some_and(|d| since < d) {
            return false;
        }
        let trimmed = self.added.is_none_or(|a| a > self.length);
        match self.first {
            Some(first) => since >= first || !trimmed,
            None => !trimmed,
        }
    }
}

/// Bookkeeping bytes counted per cached entry besides frame and topic.
const CACHE_ENTRY_OVERHEAD: usize = 48;

/// One recent entry, encoded.
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) id: MsgId,
    pub(crate) topic: TopicName,
    pub(crate) frame: Bytes,
}

impl Cached {
    pub(crate) fn size(&self) -> usize {
        self.frame.len() + self.topic.as_str().len() + CACHE_ENTRY_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn fields(kv: &[(&str, &[u8])]) -> Value {
        Value::Array(
            kv.iter()
                .flat_map(|(k, v)| [bulk(k), Value::BulkString(v.to_vec())])
                .collect(),
        )
    }

    #[test]
    fn partition_is_zlib_crc32() {
        // The CRC-32/ISO-HDLC check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition("123456789", 16), 0xCBF4_3926 % 16);
        assert_eq!(stream_key("ringcast", 5), "ringcast:stream:{5}");
        assert_eq!(epoch_key("rc", 0), "rc:epoch:{0}");
    }

    #[test]
    fn good_entries_decode() {
        let p = partition("news", 16);
        let e = decode_entry(
            fields(&[("topic", b"news"), ("data", b"{\"a\":1}"), ("x", b"y")]),
            p,
            16,
        )
        .unwrap();
        assert_eq!((e.topic.as_str(), e.data.as_str()), ("news", "{\"a\":1}"));
        assert_eq!(e.event, None);
        let e = decode_entry(
            fields(&[("event", b"created"), ("data", b"1"), ("topic", b"news")]),
            p,
            16,
        )
        .unwrap();
        assert_eq!(e.event.as_deref(), Some("created"));
        assert_eq!(e.key, None);
    }

    #[test]
    fn a_key_field_is_1_to_128_bytes_of_utf8_or_the_entry_is_skipped() {
        let p = partition("news", 16);
        let with = |key: &[u8]| fields(&[("topic", b"news"), ("data", b"1"), ("key", key)]);
        let e = decode_entry(with("order-7 shipped é".as_bytes()), p, 16).unwrap();
        assert_eq!(e.key.as_deref(), Some("order-7 shipped é"));
        assert_eq!(
            decode_entry(with(&[b'k'; 128]), p, 16)
                .unwrap()
                .key
                .map(|k| k.len()),
            Some(128)
        );
        for bad in [
            &b""[..],
            &[b'k'; 129][..],
            &[b'k'; 1 << 20][..],
            b"\xff\xfe",
        ] {
            assert_eq!(
                decode_entry(with(bad), p, 16),
                Err(Skip::InvalidKey),
                "{} bytes",
                bad.len()
            );
        }
        let not_a_string = Value::Array(vec![
            bulk("topic"),
            bulk("news"),
            bulk("data"),
            bulk("1"),
            bulk("key"),
            Value::Array(vec![bulk("k")]),
        ]);
        assert_eq!(decode_entry(not_a_string, p, 16), Err(Skip::InvalidKey));
    }

    #[test]
    fn presence_entries_decode_without_data_and_bad_ones_are_named() {
        let p = partition("chat:1", 16);
        let e = decode_entry(
            fields(&[
                ("topic", b"chat:1"),
                ("presence", b"join"),
                ("user", b"u\xc3\xa9"),
                ("node", b"n-1"),
            ]),
            p,
            16,
        )
        .unwrap();
        let want = PresenceEvent {
            join: true,
            user: "u\u{e9}".into(),
        };
        assert_eq!((e.topic.as_str(), e.presence), ("chat:1", Some(want)));
        let leave = decode_entry(
            fields(&[("presence", b"leave"), ("user", b"u"), ("topic", b"chat:1")]),
            p,
            16,
        )
        .unwrap();
        assert_eq!(leave.presence.map(|e| e.join), Some(false));
        let long = vec![b'u'; MAX_USER_LEN + 1];
        type Fields<'a> = &'a [(&'a str, &'a [u8])];
        let cases: [(Fields, Skip); 8] = [
            (&[("presence", b"join"), ("user", b"u")], Skip::MissingTopic),
            (
                &[
                    ("topic", b"chat:1"),
                    ("presence", b"joined"),
                    ("user", b"u"),
                ],
                Skip::InvalidPresence,
            ),
            (
                &[("topic", b"chat:1"), ("presence", b"join")],
                Skip::InvalidPresence,
            ),
            (
                &[("topic", b"chat:1"), ("presence", b"join"), ("user", b"")],
                Skip::InvalidPresence,
            ),
            (
                &[("topic", b"chat:1"), ("presence", b"join"), ("user", &long)],
                Skip::InvalidPresence,
            ),
            (
                &[
                    ("topic", b"chat:1"),
                    ("presence", b"join"),
                    ("user", b"\xff"),
                ],
                Skip::InvalidPresence,
            ),
            (
                &[
                    ("topic", b"bad topic"),
                    ("presence", b"join"),
                    ("user", b"u"),
                ],
                Skip::InvalidTopic,
            ),
            (
                &[("topic", b"other"), ("presence", b"join"), ("user", b"u")],
                Skip::WrongPartition,
            ),
        ];
        for (kv, why) in cases {
            let got = decode_entry(fields(kv), p, 16);
            // "other" may share chat:1's partition; then it is valid.
            if why == Skip::WrongPartition && partition("other", 16) == p {
                continue;
            }
            assert_eq!(got, Err(why), "{kv:?}");
        }
        // A `presence` field that is not a string is invalid, not missing.
        let nested = Value::Array(vec![
            bulk("topic"),
            bulk("chat:1"),
            bulk("presence"),
            Value::Array(vec![]),
            bulk("user"),
            bulk("u"),
        ]);
        assert_eq!(decode_entry(nested, p, 16), Err(Skip::InvalidPresence));
    }

    #[test]
    fn bad_entries_are_skipped_with_a_reason() {
        let p = partition("news", 16);
        let cases: [(Value, Skip); 14] = [
            (fields(&[("data", b"1")]), Skip::MissingTopic),
            (fields(&[("topic", b"news")]), Skip::MissingData),
            (
                fields(&[("topic", b"bad topic"), ("data", b"1")]),
                Skip::InvalidTopic,
            ),
            (
                fields(&[("topic", b"\xff"), ("data", b"1")]),
                Skip::InvalidTopic,
            ),
            (
                fields(&[("topic", b"news"), ("data", b"{nope")]),
                Skip::InvalidData,
            ),
            (
                fields(&[("topic", b"news"), ("data", b"\xff")]),
                Skip::InvalidData,
            ),
            (
                fields(&[
                    ("topic", b"news"),
                    ("data", &[b"[".repeat(127), b"]".repeat(127)].concat()),
                ]),
                Skip::InvalidData,
            ),
            (
                fields(&[("topic", b"news"), ("data", b"1e400")]),
                Skip::InvalidData,
            ),
            (
                fields(&[("topic", b"news"), ("data", b"1"), ("event", b"")]),
                Skip::InvalidEvent,
            ),
            (
                fields(&[("topic", b"news"), ("data", b"1"), ("event", &[b'e'; 65])]),
                Skip::InvalidEvent,
            ),
            (Value::Int(3), Skip::Malformed),
            // Found writing tests/fuzz_redis.rs: a field holding a
            // non-string (an array, a double) was reported as missing.
            (
                Value::Array(vec![
                    bulk("topic"),
                    Value::Array(vec![]),
                    bulk("data"),
                    bulk("1"),
                ]),
                Skip::InvalidTopic,
            ),
            (
                Value::Array(vec![
                    bulk("topic"),
                    bulk("news"),
                    bulk("data"),
                    Value::Double(1.0),
                ]),
                Skip::InvalidData,
            ),
            (
                Value::Array(vec![
                    bulk("topic"),
                    bulk("news"),
                    bulk("data"),
                    bulk("1"),
                    bulk("event"),
                    Value::Nil,
                ]),
                Skip::InvalidEvent,
            ),
        ];
        for (f, why) in cases {
            assert_eq!(decode_entry(f.clone(), p, 16), Err(why), "{f:?}");
        }
        assert_eq!(
            decode_entry(
                fields(&[("topic", b"news"), ("data", b"1")]),
                (p + 1) % 16,
                16
            ),
            Err(Skip::WrongPartition)
        );
    }

    #[test]
    fn the_topic_is_found_before_decoding() {
        let f = fields(&[("data", b"1"), ("topic", b"news")]);
        assert!(has_topic(&f, "news"));
        assert!(!has_topic(&f, "new"));
        assert!(!has_topic(&fields(&[("data", b"news")]), "news"));
        let map = Value::Map(vec![(bulk("topic"), bulk("news"))]);
        assert!(has_topic(&map, "news"));
        assert!(!has_topic(&Value::Int(1), "news"));
    }

    #[test]
    fn xread_replies_come_apart_in_both_resp_versions() {
        let entry = Value::Array(vec![bulk("5-1"), fields(&[("topic", b"t")])]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("k"),
            Value::Array(vec![entry.clone()]),
        ])]);
        let resp3 = Value::Map(vec![(bulk("k"), Value::Array(vec![entry]))]);
        for v in [resp2, resp3] {
            let s = xread_streams(v).unwrap();
            assert_eq!(s.len(), 1);
            assert_eq!(s[0].0, b"k");
            assert_eq!(parse_id(s[0].1[0].0.clone()), Some(MsgId { ms: 5, seq: 1 }));
        }
        assert_eq!(xread_streams(Value::Nil), Some(Vec::new()));
        assert_eq!(xread_streams(Value::Int(1)), None);
    }

    #[test]
    fn retention_is_judged_conservatively() {
        let id = |ms| MsgId { ms, seq: 0 };
        let never_trimmed = Retained {
            first: Some(id(10)),
            length: 5,
            added: Some(5),
            ..Retained::default()
        };
        assert!(never_trimmed.covers(id(1)));
        let trimmed = Retained {
            added: Some(9),
            ..never_trimmed
        };
        assert!(!trimmed.covers(id(9)));
        assert!(trimmed.covers(id(10)) && trimmed.covers(id(20)));
        let xdel = Retained {
            max_deleted: Some(id(15)),
            ..trimmed
        };
        assert!(!xdel.covers(id(12)) && xdel.covers(id(15)));
        let old_redis = Retained {
            added: None,
            ..never_trimmed
        };
        assert!(!old_redis.covers(id(9)) && old_redis.covers(id(10)));
        let emptied = Retained {
            first: None,
            length: 0,
            added: Some(3),
            ..Retained::default()
        };
        assert!(!emptied.covers(id(1)));
        let info = Value::Array(vec![
            bulk("length"),
            Value::Int(2),
            bulk("max-deleted-entry-id"),
            bulk("0-0"),
            bulk("entries-added"),
            Value::Int(7),
            bulk("first-entry"),
            Value::Array(vec![bulk("10-0"), Value::Array(vec![])]),
            bulk("last-generated-id"),
            bulk("12-0"),
            bulk("last-entry"),
            Value::Array(vec![bulk("11-0"), Value::Array(vec![])]),
        ]);
        let r = Retained::from_xinfo(info).unwrap();
        assert_eq!(
            r,
            Retained {
                first: Some(id(10)),
                length: 2,
                added: Some(7),
                max_deleted: Some(id(0)),
                last_generated: Some(id(12)),
                last: Some(id(11)),
            }
        );
    }
}
