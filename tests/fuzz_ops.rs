//! Fuzzing the `ringcast.v1` client ops, `ringcast::protocol::ClientOp::parse`,
//! and the names and ids inside them (`ringcast::topic::TopicName`,
//! `ringcast::id::MsgId`): arbitrary text, arbitrary JSON values, requests
//! with every field of every type, and deep nesting never panic; every error
//! is a 4000 with a short one-line reason; every `pub` accepted carries data
//! that any subscriber's JSON parser reads, also inside the `msg` frame; valid
//! requests come back with exactly the fields they were built from. Replays
//! `tests/corpus/ops`.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast::id::MsgId;
use ringcast::protocol::{encode_msg, ClientOp, OpError, MAX_DATA_DEPTH, MAX_REQUEST_ID};
use ringcast::topic::{TopicError, TopicName, MAX_TOPIC_LEN};
use serde_json::{Map, Value};

/// Longest error reason accepted in an `error` reply.
const REASON_MAX: usize = ringcast::protocol::MAX_REASON_LEN;

// ---------------------------------------------------------------------------
// Generators.

/// Strings that are hard to echo: control characters, quotes, backslashes,
/// C1 controls, unassigned and private code points, long runs.
fn nasty_string() -> BoxedStrategy<String> {
    let nasty_char = prop_oneof![
        any::<char>(),
        Just('"'),
        Just('\\'),
        Just('\n'),
        Just('\u{0}'),
        Just('\u{1b}'),
        Just('\u{85}'),
        Just('\u{200b}'),
        Just('\u{e0001}'),
        Just('\u{10ffff}'),
        Just('\u{fffd}'),
        Just('['),
        Just('{'),
    ];
    prop_oneof![
        4 => "[a-z0-9:._-]{0,12}",
        2 => any::<String>(),
        2 => vec(nasty_char, 0..48).prop_map(|cs| cs.into_iter().collect()),
        1 => (1usize..3000, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
    .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        nasty_string().prop_map(Value::String),
    ]
    .boxed()
}

/// Keys: the envelope's fields often, anything else sometimes.
fn json_key() -> BoxedStrategy<String> {
    prop_oneof![
        2 => prop_oneof![
            Just("op"), Just("id"), Just("topic"), Just("since"), Just("epoch"),
            Just("data"), Just("token"),
        ].prop_map(String::from),
        1 => nasty_string(),
    ]
    .boxed()
}

/// Any JSON value, nested at most a few levels.
fn json_value() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((json_key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
        .boxed()
}

/// A valid topic name.
fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z0-9_.:@/-]{1,24}",
        1 => "[A-Za-z0-9_.:@/-]{1,255}",
    ]
}

fn msg_id() -> impl Strategy<Value = MsgId> {
    (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| MsgId { ms, seq })
}

/// A JSON string literal for `s`, with some characters written as `\u`
/// escapes (exercising the parser's owned-string path).
fn escaped(s: &str, escape: &[bool]) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if escape
            .get(i % escape.len().max(1))
            .copied()
            .unwrap_or(false)
        {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
                c => out.push(c),
            }
        }
    }
    out.push('"');
    out
}

/// An object written by hand from (key, value text) pairs: keys may repeat.
fn object(fields: &[(String, String)], space: bool) -> String {
    let sep = if space { ", " } else { "," };
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
        .collect();
    format!("{{{}}}", body.join(sep))
}

/// A field value: well typed and valid, well typed and invalid, or any JSON.
fn field(valid: BoxedStrategy<String>) -> BoxedStrategy<Option<String>> {
    prop_oneof![
        3 => valid.prop_map(Some),
        1 => json_value().prop_map(|v| Some(v.to_string())),
        1 => Just(None),
    ]
    .boxed()
}

/// Requests with every envelope field present or not, of any type.
fn request() -> impl Strategy<Value = String> {
    let op = prop_oneof![
        prop_oneof![
            Just("sub"),
            Just("unsub"),
            Just("pub"),
            Just("ping"),
            Just("auth"),
            Just("presence"),
            Just("SUB"),
            Just(""),
        ]
        .prop_map(|s| format!("\"{s}\"")),
        nasty_string().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let id = prop_oneof![
        (0..=MAX_REQUEST_ID).prop_map(|n| n.to_string()),
        Just((MAX_REQUEST_ID + 1).to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("1e3".to_string()),
    ];
    let topic_text = prop_oneof![
        3 => topic().prop_map(|t| serde_json::to_string(&t).unwrap()),
        1 => nasty_string().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let since = prop_oneof![
        msg_id().prop_map(|m| format!("\"{m}\"")),
        nasty_string().prop_map(|s| serde_json::to_string(&s).unwrap()),
        "[0-9]{0,25}-[0-9]{0,25}".prop_map(|s| format!("\"{s}\"")),
    ];
    let string = nasty_string().prop_map(|s| serde_json::to_string(&s).unwrap());
    (
        (
            field(op.boxed()),
            field(id.boxed()),
            field(topic_text.boxed()),
            field(since.boxed()),
            field(string.clone().boxed()),
        ),
        (
            field(json_value().prop_map(|v| v.to_string()).boxed()),
            field(string.boxed()),
            vec((json_key(), json_value()), 0..3),
            any::<bool>(),
        ),
    )
        .prop_flat_map(
            |((op, id, topic, since, epoch), (data, token, extra, space))| {
                let mut fields: Vec<(String, String)> = Vec::new();
                for (k, v) in [
                    ("op", op),
                    ("id", id),
                    ("topic", topic),
                    ("since", since),
                    ("epoch", epoch),
                    ("data", data),
                    ("token", token),
                ] {
                    if let Some(v) = v {
                        fields.push((k.to_string(), v));
                    }
                }
                fields.extend(extra.into_iter().map(|(k, v)| (k, v.to_string())));
                (Just(fields).prop_shuffle(), Just(space))
            },
        )
        .prop_map(|(fields, space)| object(&fields, space))
}

/// Nested arrays and objects `depth` levels deep, with strings holding
/// brackets and escapes between the levels.
fn nested(depth: usize, shape: &[u8]) -> String {
    let mut open = String::new();
    let mut close = Vec::new();
    for i in 0..depth {
        match shape.get(i % shape.len().max(1)).copied().unwrap_or(0) % 4 {
            0 => {
                open.push('[');
                close.push("]");
            }
            1 => {
                open.push_str("{\"k\":");
                close.push("}");
            }
            2 => {
                open.push_str("[\"[{\\\"\",");
                close.push("]");
            }
            _ => {
                open.push_str("{\"}]\":1,\"v\":");
                close.push("}");
            }
        }
    }
    open.push_str("null");
    close.reverse();
    open + &close.concat()
}

/// The nesting depth of a JSON value.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// Properties.

/// What must hold for the answer to any text.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    match ClientOp::parse(text) {
        Err(OpError { code, reason, .. }) => {
            prop_assert_eq!(code, 4000);
            prop_assert!(
                reason.len() <= REASON_MAX,
                "{} bytes of reason: {:?}",
                reason.len(),
                reason.chars().take(200).collect::<String>()
            );
            prop_assert!(fuzz_support::no_control(&reason), "{reason:?}");
        }
        Ok((id, op)) => {
            prop_assert!(id.is_none_or(|i| i <= MAX_REQUEST_ID));
            // What a plain JSON parser sees agrees with what was accepted
            // (when it can read the request at all: deep `data` is past
            // its depth limit once wrapped in the request).
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                if let ClientOp::Pub { topic, data, .. } = op {
                    check_data(&topic, data.get())?;
                }
                return Ok(());
            };
            prop_assert_eq!(v.get("id").and_then(Value::as_u64), id);
            let topic = v.get("topic").and_then(Value::as_str);
            match op {
                ClientOp::Sub { topic: t, since } => {
                    prop_assert_eq!(Some(t.as_str()), topic);
                    let want = v.get("since").and_then(Value::as_str);
                    prop_assert_eq!(
                        since.as_ref().map(|s| s.id),
                        want.map(|s| s.parse().unwrap())
                    );
                    if let Some(s) = since {
                        prop_assert_eq!(s.epoch.as_deref(), v.get("epoch").and_then(Value::as_str));
                    }
                }
                ClientOp::Unsub { topic: t } | ClientOp::Presence { topic: t } => {
                    prop_assert_eq!(Some(t.as_str()), topic);
                }
                ClientOp::Pub { topic: t, data, .. } => {
                    prop_assert_eq!(Some(t.as_str()), topic);
                    check_data(&t, data.get())?;
                }
                ClientOp::Auth { token } => {
                    prop_assert_eq!(Some(&*token), v.get("token").and_then(Value::as_str));
                }
                ClientOp::Ping => {
                    prop_assert_eq!(v.get("op").and_then(Value::as_str), Some("ping"))
                }
            }
        }
    }
    Ok(())
}

/// Accepted `pub` data is one JSON document that a subscriber can read,
/// alone and inside the `msg` frame every subscriber gets (parsed here as
/// ringcast's own client does, with serde_json's default limits).
fn check_data(topic: &TopicName, data: &str) -> Result<(), TestCaseError> {
    let alone: Result<Value, _> = serde_json::from_str(data);
    prop_assert!(
        alone.is_ok(),
        "data is not readable JSON: {:?}",
        alone.err()
    );
    let frame = encode_msg(topic, MsgId { ms: 1, seq: 0 }, None, data);
    let skip = match frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let msg: Result<Value, _> = serde_json::from_slice(&frame[skip..]);
    prop_assert!(
        msg.is_ok(),
        "msg frame is not readable JSON: {:?}",
        msg.err()
    );
    prop_assert_eq!(&msg.unwrap()["data"], &alone.unwrap());
    Ok(())
}

/// The reference topic grammar: 1 to 255 bytes of `[A-Za-z0-9_.:@/-]`.
fn topic_reference(s: &str) -> Result<(), TopicError> {
    const ALLOWED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@/-";
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > 255 {
        return Err(TopicError::TooLong { len: s.len() });
    }
    match s.bytes().enumerate().find(|(_, b)| !ALLOWED.contains(b)) {
        Some((at, byte)) => Err(TopicError::InvalidByte { byte, at }),
        None => Ok(()),
    }
}

/// The reference id grammar: `DIGITS-DIGITS`, each a u64.
fn msg_id_reference(s: &str) -> Option<MsgId> {
    let (a, b) = s.split_once('-')?;
    let num = |p: &str| -> Option<u64> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = p.trim_start_matches('0');
        if digits.len() > 20 {
            return None;
        }
        u64::try_from(digits.parse::<u128>().unwrap_or(0)).ok()
    };
    Some(MsgId {
        ms: num(a)?,
        seq: num(b)?,
    })
}

proptest! {
    #![proptest_config(fuzz_support::config(256))]

    #[test]
    fn any_text_is_an_op_or_a_4000(text in prop_oneof![
        any::<String>(),
        "[\\[\\]{}\":,0-9a-z\\\\ .eE+-]{0,80}",
        nasty_string(),
    ]) {
        check_parse(&text)?;
    }

    #[test]
    fn any_json_value_is_an_op_or_a_4000(v in json_value()) {
        check_parse(&v.to_string())?;
    }

    #[test]
    fn any_request_is_an_op_or_a_4000(text in request()) {
        check_parse(&text)?;
    }

    #[test]
    fn pub_data_is_accepted_iff_its_depth_is_within_the_limit(
        deep in prop_oneof![
            0usize..300,
            (MAX_DATA_DEPTH - 1)..=(MAX_DATA_DEPTH + 1),
            1000usize..5000,
        ],
        shape in vec(any::<u8>(), 1..6),
        closed in prop_oneof![9 => Just(true), 1 => Just(false)],
    ) {
        let mut data = nested(deep, &shape);
        if !closed {
            data.pop();
        }
        let text = format!("{{\"op\":\"pub\",\"topic\":\"t\",\"data\":{data}}}");
        check_parse(&text)?;
        let got = ClientOp::parse(&text);
        if closed && deep <= MAX_DATA_DEPTH {
            prop_assert!(got.is_ok(), "depth {deep}: {:?}", got.err());
        } else {
            prop_assert!(got.is_err(), "depth {deep} accepted");
        }
    }

    #[test]
    fn pub_data_numbers_are_readable(
        int in "-?(0|[1-9][0-9]{0,40})",
        frac in proptest::option::of("[0-9]{1,30}"),
        exp in proptest::option::of(("[eE]", "[+-]?", "[0-9]{1,5}")),
    ) {
        let mut number = int;
        if let Some(f) = frac {
            number = format!("{number}.{f}");
        }
        if let Some((e, sign, digits)) = exp {
            number = format!("{number}{e}{sign}{digits}");
        }
        let text = format!("{{\"op\":\"pub\",\"topic\":\"t\",\"data\":[{number}]}}");
        check_parse(&text)?;
    }

    #[test]
    fn pub_data_string_escapes_are_readable(pieces in vec(prop_oneof![
        any::<u16>().prop_map(|u| format!("\\u{u:04x}")),
        (0xd800u16..0xe000).prop_map(|u| format!("\\u{u:04X}")),
        Just("\\\"".to_string()),
        Just("\\\\".to_string()),
        Just("\\n".to_string()),
        Just("\\/".to_string()),
        "[a-z]{0,3}",
    ], 0..8)) {
        let text = format!("{{\"op\":\"pub\",\"topic\":\"t\",\"data\":\"{}\"}}", pieces.concat());
        check_parse(&text)?;
    }

    #[test]
    fn pub_depth_is_counted_like_the_tree(v in json_value(), wrap in 0usize..=MAX_DATA_DEPTH + 2) {
        // `wrap` more levels of arrays around a random value.
        let data = format!("{}{}{}", "[".repeat(wrap), v, "]".repeat(wrap));
        let text = format!("{{\"op\":\"pub\",\"topic\":\"t\",\"data\":{data}}}");
        let d = wrap + depth(&v);
        prop_assert_eq!(ClientOp::parse(&text).is_ok(), d <= MAX_DATA_DEPTH, "depth {}", d);
        check_parse(&text)?;
    }

    #[test]
    fn valid_ops_round_trip(
        kind in 0u8..6,
        topic in topic(),
        id in proptest::option::of(0..=MAX_REQUEST_ID),
        since in proptest::option::of(msg_id()),
        epoch in proptest::option::of(nasty_string()),
        data in json_value(),
        token in nasty_string(),
        escape in vec(any::<bool>(), 1..8),
        extra in vec(("x[a-z]{0,6}", json_value()), 0..3),
        space in any::<bool>(),
    ) {
        let op = ["sub", "unsub", "pub", "ping", "auth", "presence"][usize::from(kind)];
        let mut fields = vec![("op".to_string(), escaped(op, &escape))];
        if let Some(id) = id {
            fields.push(("id".into(), id.to_string()));
        }
        match op {
            "sub" | "unsub" | "pub" | "presence" => {
                fields.push(("topic".into(), escaped(&topic, &escape)));
            }
            _ => {}
        }
        if op == "sub" {
            if let Some(s) = since {
                fields.push(("since".into(), escaped(&s.to_string(), &escape)));
            }
            if let Some(e) = &epoch {
                fields.push(("epoch".into(), escaped(e, &escape)));
            }
        }
        let data_text = data.to_string();
        if op == "pub" {
            fields.push(("data".into(), data_text.clone()));
        }
        if op == "auth" {
            fields.push(("token".into(), escaped(&token, &escape)));
        }
        fields.extend(extra.into_iter().map(|(k, v)| (k, v.to_string())));
        let text = object(&fields, space);
        let (got_id, got) = ClientOp::parse(&text)
            .map_err(|e| TestCaseError::fail(format!("{text}: {e:?}")))?;
        prop_assert_eq!(got_id, id);
        match got {
            ClientOp::Sub { topic: t, since: s } => {
                prop_assert_eq!(op, "sub");
                prop_assert_eq!(t.as_str(), topic.as_str());
                prop_assert_eq!(s.as_ref().map(|s| s.id), since);
                if let Some(s) = s {
                    prop_assert_eq!(s.epoch, epoch);
                }
            }
            ClientOp::Unsub { topic: t } => {
                prop_assert_eq!((op, t.as_str()), ("unsub", topic.as_str()));
            }
            ClientOp::Presence { topic: t } => {
                prop_assert_eq!((op, t.as_str()), ("presence", topic.as_str()));
            }
            ClientOp::Pub { topic: t, data: d, .. } => {
                prop_assert_eq!((op, t.as_str()), ("pub", topic.as_str()));
                prop_assert_eq!(d.get(), data_text.as_str());
            }
            ClientOp::Auth { token: t } => prop_assert_eq!((op, &*t), ("auth", token.as_str())),
            ClientOp::Ping => prop_assert_eq!(op, "ping"),
        }
        check_parse(&text)?;
    }

    #[test]
    fn topic_names_follow_the_grammar(s in prop_oneof![
        3 => "[A-Za-z0-9_.:@/-]{0,300}",
        1 => any::<String>(),
        1 => "[ -~]{1,20}",
        2 => (
            "[A-Za-z0-9_.:@/-]{0,40}",
            prop_oneof![any::<char>(), (0u8..0x80).prop_map(char::from)],
            "[A-Za-z0-9_.:@/-]{0,40}",
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        1 => (250usize..260).prop_map(|n| "t".repeat(n)),
    ]) {
        let got = TopicName::new(&s);
        prop_assert_eq!(got.as_ref().map(|_| ()).map_err(Clone::clone), topic_reference(&s));
        if let Ok(t) = got {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert_eq!(t.to_string(), s.clone());
            prop_assert!(t.as_str().len() <= MAX_TOPIC_LEN);
            let ns = s.split_once(':').map_or("", |(ns, _)| ns);
            prop_assert_eq!(t.namespace(), ns);
        } else if let Err(e) = got {
            let text = e.to_string();
            prop_assert!(fuzz_support::no_control(&text) && text.len() <= 120, "{text:?}");
        }
    }

    #[test]
    fn msg_ids_print_and_parse_back(id in msg_id()) {
        prop_assert_eq!(id.to_string().parse::<MsgId>(), Ok(id));
    }

    #[test]
    fn msg_ids_parse_like_the_grammar(s in prop_oneof![
        any::<String>(),
        "[0-9]{0,22}-[0-9]{0,22}",
        "[-+0-9 ]{0,12}",
        (any::<u64>(), any::<u64>(), "0{0,5}").prop_map(|(a, b, z)| format!("{z}{a}-{z}{b}")),
    ]) {
        let got = s.parse::<MsgId>();
        prop_assert_eq!(got.as_ref().ok().copied(), msg_id_reference(&s));
        if let Err(e) = got {
            prop_assert!(fuzz_support::no_control(&e.to_string()));
        }
    }

    #[test]
    fn ids_above_the_limit_are_refused_with_the_id(
        id in MAX_REQUEST_ID + 1..=u64::MAX,
        at in any::<Index>(),
    ) {
        let ops = ["ping", "sub", "pub"];
        let text = format!("{{\"op\":\"{}\",\"id\":{id}}}", ops[at.index(ops.len())]);
        let err = ClientOp::parse(&text).unwrap_err();
        prop_assert_eq!(err.code, 4000);
        prop_assert!(err.reason.starts_with("id:"), "{}", err.reason);
    }
}

proptest! {
    // Fewer cases: each input is up to a megabyte.
    #![proptest_config(fuzz_support::config(64))]

    #[test]
    fn deep_nesting_anywhere_is_a_4000_not_a_crash(
        deep in prop_oneof![3 => 100usize..200, 1 => 10_000usize..100_001],
        shape in vec(any::<u8>(), 1..4),
        place in 0u8..4,
    ) {
        let v = nested(deep, &shape);
        let text = match place {
            0 => v,
            1 => format!("{{\"op\":\"sub\",\"id\":{v},\"topic\":\"t\"}}"),
            2 => format!("{{\"op\":\"sub\",\"topic\":{v}}}"),
            _ => format!("{{\"op\":\"ping\",\"extra\":{v}}}"),
        };
        check_parse(&text)?;
    }
}

// ---------------------------------------------------------------------------
// The corpus.

/// Replays `tests/corpus/ops`: `ok-*` parses, `4000-*` is refused with
/// 4000; both satisfy every property above.
#[test]
fn corpus_replays() {
    for seed in fuzz_support::corpus("ops") {
        let name = &seed.name;
        let text = std::str::from_utf8(&seed.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Files end with a newline; JSON does not care.
        check_parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        match (seed.class(), ClientOp::parse(text)) {
            ("ok", Ok(_)) => {}
            ("4000", Err(e)) if e.code == 4000 => {}
            (class, got) => panic!("{name}: expected {class}, got {got:?}"),
        }
    }
}
