//! Fuzzing what the Redis Streams broker reads from producers and Redis
//! (`ringcast::broker::redis`): the partition of a topic is CRC-32/ISO-HDLC
//! (zlib's crc32) mod the partition count, as docs/PROTOCOL.md section 6 tells
//! producers to compute it, checked against a bitwise CRC written from the
//! definition; keys have the documented shape. Reply and entry decoding
//! (`xread_streams`, `range_entries`, `parse_id`, `decode_entry`,
//! `Retained::from_xinfo`) take arbitrary `redis::Value` trees (nested
//! arrays, maps, wrong types, odd and huge ids, non-UTF-8 bulk strings)
//! without a panic; well-formed entries decode to exactly what was written,
//! and each kind of damage to one is classified with its skip reason. The
//! seed replies in `tests/corpus/redis-xread/` and `redis-xinfo/` (RESP
//! bytes, mostly captured from redis-server by
//! `tests/corpus/capture_redis.py`) are replayed with their expected class.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use proptest::prelude::*;
use redis::Value;
use ringcast::broker::redis::{
    decode_entry, epoch_key, parse_id, partition, range_entries, stream_key, xread_streams,
    Retained, MAX_EVENT_LEN,
};
use ringcast::id::MsgId;
use ringcast::metrics::Skip;

/// CRC-32/ISO-HDLC, one bit at a time: reflected polynomial 0xEDB88320,
/// initial value and final XOR 0xFFFFFFFF.
fn crc32_reference(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn reference_crc_matches_the_standard_check_value() {
    assert_eq!(crc32_reference(b"123456789"), 0xCBF4_3926);
    assert_eq!(partition("123456789", u32::MAX), 0xCBF4_3926);
    // README's producer example: "news" is in partition 0 of 16, as
    // Python's zlib.crc32(b"news") % 16 says.
    assert_eq!(partition("news", 16), 0);
}

proptest! {
    #![proptest_config(fuzz_support::config(512))]

    #[test]
    fn partition_is_zlib_crc32_mod_partitions(
        topic in prop_oneof!["[A-Za-z0-9_.:@/-]{1,255}", any::<String>()],
        partitions in prop_oneof![1u32..=1024, any::<u32>()],
    ) {
        let p = partition(&topic, partitions);
        prop_assert!(p < partitions.max(1));
        prop_assert_eq!(p, crc32_reference(topic.as_bytes()) % partitions.max(1));
    }

    #[test]
    fn keys_carry_the_partition_as_a_hash_tag(prefix in "[!-z|~]{1,64}", p in any::<u32>()) {
        prop_assert_eq!(stream_key(&prefix, p), format!("{prefix}:stream:{{{p}}}"));
        prop_assert_eq!(epoch_key(&prefix, p), format!("{prefix}:epoch:{{{p}}}"));
    }
}

/// Partitions the entry tests use.
const PARTS: u32 = 16;

/// Byte strings a reply may hold: field names, ids (good, odd, huge,
/// overflowing), topics, JSON, and arbitrary bytes (often not UTF-8).
fn some_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24),
        prop_oneof![
            Just("topic"),
            Just("data"),
            Just("event"),
            Just("length"),
            Just("first-entry"),
            Just("entries-added"),
            Just("max-deleted-entry-id"),
            Just("18446744073709551615-18446744073709551615"),
            Just("18446744073709551616-0"),
            Just("0-0"),
            Just("-"),
            Just("1-"),
            Just("-1"),
            Just("news"),
            Just("{\"a\":1}"),
        ]
        .prop_map(|s| s.as_bytes().to_vec()),
        "[0-9]{0,22}-[0-9]{0,22}".prop_map(String::into_bytes),
        "[A-Za-z0-9_.:@/ -]{0,20}".prop_map(String::into_bytes),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Nil),
        Just(Value::Okay),
        any::<i64>().prop_map(Value::Int),
        some_bytes().prop_map(Value::BulkString),
        some_bytes().prop_map(|b| Value::SimpleString(String::from_utf8_lossy(&b).into_owned())),
        any::<f64>().prop_map(Value::Double),
        any::<bool>().prop_map(Value::Boolean),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::BigNumber),
        ".{0,8}".prop_map(|text| Value::VerbatimString {
            format: redis::VerbatimFormat::Text,
            text
        }),
    ]
}

/// Any reply tree, nested a few levels.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 96, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Set),
            proptest::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(Value::Map),
            (
                inner.clone(),
                proptest::collection::vec((inner.clone(), inner.clone()), 0..2)
            )
                .prop_map(|(d, attributes)| Value::Attribute {
                    data: Box::new(d),
                    attributes
                }),
            proptest::collection::vec(inner, 0..4).prop_map(|data| Value::Push {
                kind: redis::PushKind::Message,
                data
            }),
        ]
    })
}

fn bulk(b: &[u8]) -> Value {
    Value::BulkString(b.to_vec())
}

/// An id parsed from text by the rule Redis uses: digits, `-`, digits,
/// each part a u64.
fn reference_id(text: &[u8]) -> Option<MsgId> {
    let text = std::str::from_utf8(text).ok()?;
    let (ms, seq) = text.split_once('-')?;
    let num = |p: &str| -> Option<u64> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    Some(MsgId {
        ms: num(ms)?,
        seq: num(seq)?,
    })
}

/// Runs every decoder on `v` the way the reader does; none may panic, and
/// an entry that decodes satisfies every documented rule.
fn decode_everything(v: &Value) {
    let check = |fields: Value| {
        for p in [0, 1, PARTS - 1, PARTS] {
            if let Ok(e) = decode_entry(fields.clone(), p, PARTS) {
                assert_eq!(partition(e.topic.as_str(), PARTS), p);
                // What subscribers' parsers (serde_json's Value here) read.
                serde_json::from_str::<serde_json::Value>(&e.data).unwrap();
                assert!(e
                    .event
                    .as_ref()
                    .is_none_or(|ev| !ev.is_empty() && ev.len() <= MAX_EVENT_LEN));
            }
        }
    };
    if let Some(streams) = xread_streams(v.clone()) {
        for (_, entries) in streams {
            for (id, fields) in entries {
                let _ = parse_id(id);
                check(fields);
            }
        }
    }
    if let Some(entries) = range_entries(v.clone()) {
        for (id, fields) in entries {
            let _ = parse_id(id);
            check(fields);
        }
    }
    check(v.clone());
    if let Some(r) = Retained::from_xinfo(v.clone()) {
        for since in [
            MsgId { ms: 0, seq: 0 },
            MsgId {
                ms: u64::MAX,
                seq: u64::MAX,
            },
        ] {
            let _ = r.covers(since);
        }
    }
}

/// A well-formed entry: topic, data, optional event, and noise fields.
#[derive(Debug, Clone)]
struct Good {
    topic: String,
    data: String,
    event: Option<String>,
    noise: Vec<(Vec<u8>, Vec<u8>)>,
    /// Fields as a RESP3 map rather than a flat array.
    map: bool,
    /// Values as simple strings rather than bulk strings.
    simple: bool,
    /// Where the three known fields go among the noise.
    order: Vec<usize>,
}

fn json_doc() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,10}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z]{0,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| v.to_string())
}

fn good() -> impl Strategy<Value = Good> {
    (
        "[A-Za-z0-9_.:@/-]{1,40}",
        json_doc(),
        proptest::option::of("[a-z_.:-]{1,64}"),
        proptest::collection::vec(("[a-z]{1,6}", some_bytes()), 0..3),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(0usize..8, 3),
    )
        .prop_map(|(topic, data, event, noise, map, simple, order)| Good {
            topic,
            data,
            event,
            noise: noise
                .into_iter()
                // Noise must not be a known field.
                .map(|(k, v)| (format!("x-{k}").into_bytes(), v))
                .collect(),
            map,
            simple,
            order,
        })
}

impl Good {
    fn pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = self.noise.clone();
        let mut known = vec![
            (b"topic".to_vec(), self.topic.clone().into_bytes()),
            (b"data".to_vec(), self.data.clone().into_bytes()),
        ];
        if let Some(e) = &self.event {
            known.push((b"event".to_vec(), e.clone().into_bytes()));
        }
        for (i, kv) in known.into_iter().enumerate() {
            let at = self.order[i] % (pairs.len() + 1);
            pairs.insert(at, kv);
        }
        pairs
    }

    fn value_of(&self, b: Vec<u8>) -> Value {
        match (self.simple, String::from_utf8(b)) {
            (true, Ok(s)) => Value::SimpleString(s),
            (_, Ok(s)) => Value::BulkString(s.into_bytes()),
            (_, Err(e)) => Value::BulkString(e.into_bytes()),
        }
    }

    /// The fields as Redis would return them, with `replace` applied to
    /// the value of the named field (`None` drops the field).
    fn fields_with(&self, name: &[u8], replace: Option<Value>) -> Value {
        let mut kvs: Vec<(Value, Value)> = Vec::new();
        for (k, v) in self.pairs() {
            if k == name {
                match &replace {
                    Some(r) => kvs.push((bulk(&k), r.clone())),
                    None => continue,
                }
            } else {
                kvs.push((bulk(&k), self.value_of(v)));
            }
        }
        if self.map {
            Value::Map(kvs)
        } else {
            Value::Array(kvs.into_iter().flat_map(|(k, v)| [k, v]).collect())
        }
    }

    fn fields(&self) -> Value {
        self.fields_with(b"", None)
    }

    fn partition(&self) -> u32 {
        partition(&self.topic, PARTS)
    }
}

/// Values that are not strings, for a field that must be one.
fn not_a_string() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Nil),
        Just(Value::Array(vec![bulk(b"news")])),
        Just(Value::Map(vec![])),
        any::<f64>().prop_map(Value::Double),
        any::<bool>().prop_map(Value::Boolean),
    ]
}

proptest! {
    #![proptest_config(fuzz_support::config(1024))]

    #[test]
    fn any_reply_tree_decodes_without_panic(v in value()) {
        decode_everything(&v);
    }

    #[test]
    fn ids_parse_exactly_when_redis_would_write_them(text in prop_oneof![
        some_bytes(),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| format!("{a}-{b}").into_bytes()),
        (any::<u128>(), any::<u64>()).prop_map(|(a, b)| format!("{a}-{b}").into_bytes()),
    ]) {
        prop_assert_eq!(parse_id(bulk(&text)), reference_id(&text));
        if let Ok(s) = String::from_utf8(text.clone()) {
            prop_assert_eq!(parse_id(Value::SimpleString(s)), reference_id(&text));
        }
    }

    #[test]
    fn good_entries_decode_to_what_was_written(g in good()) {
        let e = decode_entry(g.fields(), g.partition(), PARTS).unwrap();
        prop_assert_eq!(e.topic.as_str(), g.topic.as_str());
        prop_assert_eq!(&e.data, &g.data);
        prop_assert_eq!(&e.event, &g.event);
        // Found in any other partition's stream, it is skipped as such.
        let other = (g.partition() + 1) % PARTS;
        prop_assert_eq!(decode_entry(g.fields(), other, PARTS), Err(Skip::WrongPartition));
    }

    #[test]
    fn damaged_entries_are_skipped_with_the_right_reason(
        g in good(),
        damage in 0u8..10,
        junk in not_a_string(),
        bad_utf8 in proptest::collection::vec(0x80u8..=0xff, 1..4),
    ) {
        let p = g.partition();
        let (fields, why) = match damage {
            0 => (g.fields_with(b"topic", None), Skip::MissingTopic),
            1 => (g.fields_with(b"data", None), Skip::MissingData),
            2 => (g.fields_with(b"topic", Some(junk)), Skip::InvalidTopic),
            3 => (g.fields_with(b"topic", Some(Value::BulkString(bad_utf8))), Skip::InvalidTopic),
            4 => (g.fields_with(b"topic", Some(bulk(b"no spaces allowed"))), Skip::InvalidTopic),
            5 => (g.fields_with(b"data", Some(junk)), Skip::InvalidData),
            6 => (g.fields_with(b"data", Some(Value::BulkString(bad_utf8))), Skip::InvalidData),
            7 => (g.fields_with(b"data", Some(bulk(b"{\"unterminated\":"))), Skip::InvalidData),
            8 => (g.fields_with(b"data", Some(Value::BulkString(b"[".repeat(100_000)))), Skip::InvalidData),
            _ => {
                let mut with_event = g.clone();
                with_event.event = Some("e".into());
                let event = match bad_utf8.len() {
                    1 => bulk(b""),
                    2 => bulk(&[b'e'; MAX_EVENT_LEN + 1]),
                    // 0xff never occurs in UTF-8.
                    _ => Value::BulkString([&[0xff], &bad_utf8[..]].concat()),
                };
                (with_event.fields_with(b"event", Some(event)), Skip::InvalidEvent)
            }
        };
        prop_assert_eq!(decode_entry(fields, p, PARTS), Err(why));
    }

    #[test]
    fn xread_and_xrange_replies_carry_every_entry(
        streams in proptest::collection::vec(
            (0..PARTS, proptest::collection::vec((any::<u64>(), any::<u64>(), good()), 0..4)),
            0..4,
        ),
        resp3 in any::<bool>(),
    ) {
        let entry = |ms: u64, seq: u64, g: &Good| {
            Value::Array(vec![bulk(format!("{ms}-{seq}").as_bytes()), g.fields()])
        };
        let per_stream: Vec<(Value, Value)> = streams
            .iter()
            .map(|(p, entries)| {
                let list = Value::Array(entries.iter().map(|(ms, seq, g)| entry(*ms, *seq, g)).collect());
                (bulk(stream_key("ringcast", *p).as_bytes()), list)
            })
            .collect();
        let reply = if resp3 {
            Value::Map(per_stream.clone())
        } else {
            Value::Array(per_stream.iter().map(|(k, e)| Value::Array(vec![k.clone(), e.clone()])).collect())
        };
        let got = xread_streams(reply).unwrap();
        prop_assert_eq!(got.len(), streams.len());
        for ((key, entries), (p, want)) in got.into_iter().zip(&streams) {
            prop_assert_eq!(key, stream_key("ringcast", *p).into_bytes());
            prop_assert_eq!(entries.len(), want.len());
            for ((id, fields), (ms, seq, g)) in entries.into_iter().zip(want) {
                prop_assert_eq!(parse_id(id), Some(MsgId { ms: *ms, seq: *seq }));
                let e = decode_entry(fields, g.partition(), PARTS).unwrap();
                prop_assert_eq!(e.topic.as_str(), g.topic.as_str());
            }
        }
        // XRANGE replies are one stream's entry list.
        for (_, list) in &per_stream {
            prop_assert!(range_entries(list.clone()).is_some());
        }
    }

    #[test]
    fn xinfo_replies_give_back_what_they_say(
        length in any::<u64>(),
        added in proptest::option::of(any::<u64>()),
        first in proptest::option::of((any::<u64>(), any::<u64>())),
        max_deleted in proptest::option::of((any::<u64>(), any::<u64>())),
        resp3 in any::<bool>(),
        noise in proptest::collection::vec(("[a-z-]{1,12}", value()), 0..3),
    ) {
        let id = |(ms, seq): (u64, u64)| bulk(format!("{ms}-{seq}").as_bytes());
        let mut kvs = vec![(bulk(b"length"), Value::Int(length as i64))];
        if let Some(a) = added {
            kvs.push((bulk(b"entries-added"), Value::Int(a as i64)));
        }
        if let Some(d) = max_deleted {
            kvs.push((bulk(b"max-deleted-entry-id"), id(d)));
        }
        kvs.push((
            bulk(b"first-entry"),
            first.map_or(Value::Nil, |f| Value::Array(vec![id(f), Value::Array(vec![])])),
        ));
        for (k, v) in noise {
            if !["length", "entries-added", "max-deleted-entry-id", "first-entry"].contains(&k.as_str()) {
                kvs.insert(1, (bulk(k.as_bytes()), v));
            }
        }
        let reply = if resp3 {
            Value::Map(kvs)
        } else {
            Value::Array(kvs.into_iter().flat_map(|(k, v)| [k, v]).collect())
        };
        let got = Retained::from_xinfo(reply);
        // Redis sends integers as i64: what does not fit comes back negative
        // and is not a count.
        let as_count = |n: u64| (n <= i64::MAX as u64).then_some(n);
        match as_count(length) {
            None => prop_assert_eq!(got, None),
            Some(length) => {
                let r = got.unwrap();
                prop_assert_eq!(r.length, length);
                prop_assert_eq!(r.added, added.and_then(as_count));
                prop_assert_eq!(r.first, first.map(|(ms, seq)| MsgId { ms, seq }));
                prop_assert_eq!(r.max_deleted, max_deleted.map(|(ms, seq)| MsgId { ms, seq }));
            }
        }
    }
}

/// The class of one seed XREAD reply: `empty` (no stream), `unreadable`
/// (the reply's shape is refused as a whole), `malformed` (an entry id or
/// field list is not what Redis sends), `ok`, or the skip reason's label.
fn xread_class(v: Value) -> String {
    let Some(streams) = xread_streams(v) else {
        return "unreadable".into();
    };
    let Some((key, entries)) = streams.into_iter().next() else {
        return "empty".into();
    };
    assert_eq!(entries.len(), 1, "one entry per seed");
    let key = String::from_utf8(key).unwrap();
    let p: u32 = key
        .rsplit_once(":stream:{")
        .and_then(|(_, p)| p.strip_suffix('}'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("key {key:?}"));
    let (id, fields) = entries.into_iter().next().unwrap();
    if parse_id(id).is_none() {
        return "malformed".into();
    }
    match decode_entry(fields, p, PARTS) {
        Ok(_) => "ok".into(),
        Err(why) => why.label().into(),
    }
}

#[test]
fn corpus_replays() {
    for seed in fuzz_support::corpus("redis-xread") {
        let name = &seed.name;
        let v = redis::parse_redis_value(&seed.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        decode_everything(&v);
        assert_eq!(xread_class(v), seed.class(), "{name}");
    }
    for seed in fuzz_support::corpus("redis-xinfo") {
        let name = &seed.name;
        let v = redis::parse_redis_value(&seed.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        decode_everything(&v);
        let class = if Retained::from_xinfo(v).is_some() {
            "ok"
        } else {
            "unreadable"
        };
        assert_eq!(class, seed.class(), "{name}");
    }
}
