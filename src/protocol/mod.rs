//! The `ringcast.v1` JSON protocol (docs/PROTOCOL.md sections 2 and 3): client ops
//! parsed from text frames here, and the server's frames encoded to bytes
//! (`encode.rs`).
//!
//! Parsing is two steps so every error names what was wrong: serde reads the
//! envelope (every field optional), then [`ClientOp::parse`] checks the op
//! and its required fields. Server frames are written by hand into one
//! buffer: topics and ids need no escaping, and `data` is copied verbatim.

use std::borrow::Cow;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

mod encode;
pub use encode::*;

use crate::id::Since;
use crate::topic::{TopicError, TopicName};

/// Error codes of `error` replies (docs/PROTOCOL.md section 4). Every code
/// the server puts in an `error` frame is one of these; a test checks that
/// each appears in the contract.
pub mod code {
    /// Bad request: unparsable JSON, unknown op, missing field, binary frame.
    pub const BAD_REQUEST: u16 = 4000;
    /// A refreshing `auth` was refused; the connection and its current
    /// token stay until that token's `exp`.
    pub const AUTH_REFUSED: u16 = 4001;
    /// Topic not allowed by token or namespace policy.
    pub const FORBIDDEN_TOPIC: u16 = 4403;
    /// The topic's namespace is not configured.
    pub const UNKNOWN_NAMESPACE: u16 = 4004;
    /// Rate limited.
    pub const RATE_LIMITED: u16 = 4008;
    /// Too many subscriptions on this connection.
    pub const TOO_MANY_SUBSCRIPTIONS: u16 = 4013;
    /// `data` of a `pub` larger than `max_publish_size`.
    pub const PUBLISH_TOO_LARGE: u16 = 4029;
    /// The broker is unavailable (Redis unreachable, or its queue full):
    /// the `pub` or `sub` was not done; retry later.
    pub const UNAVAILABLE: u16 = 4503;

    /// Every error code, for the contract test.
    pub const ALL: [u16; 8] = [
        BAD_REQUEST,
        AUTH_REFUSED,
        FORBIDDEN_TOPIC,
        UNKNOWN_NAMESPACE,
        RATE_LIMITED,
        TOO_MANY_SUBSCRIPTIONS,
        PUBLISH_TOO_LARGE,
        UNAVAILABLE,
    ];
}

/// Close codes the server sends (docs/PROTOCOL.md section 4), besides a
/// client's own code echoed back when it closes first.
pub mod close {
    /// Normal closure (the echo of a client's own 1000).
    pub const NORMAL: u16 = 1000;
    /// Server going away: the drain.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error (bad frame, unmasked client frame, bad opcode).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid UTF-8 in a text frame or close reason.
    pub const INVALID_DATA: u16 = 1007;
    /// Message larger than `max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// Not authenticated, or the token expired and was not refreshed.
    pub const NOT_AUTHENTICATED: u16 = 4001;
    /// Forbidden: a refreshing token for another user.
    pub const FORBIDDEN: u16 = 4003;
    /// Rate limited for too long.
    pub const RATE_LIMITED: u16 = 4008;
    /// Slow consumer, or the server fell behind: resubscribe with `since`.
    pub const SLOW: u16 = 4009;

    /// Every close code the server chooses, for the contract test.
    pub const ALL: [u16; 9] = [
        NORMAL,
        GOING_AWAY,
        PROTOCOL_ERROR,
        INVALID_DATA,
        TOO_BIG,
        NOT_AUTHENTICATED,
        FORBIDDEN,
        RATE_LIMITED,
        SLOW,
    ];
}

/// Why the server closes a connection: the one table from a reason to the
/// close code and text the client sees and the metric label it is counted
/// under. Call sites name the reason, never a code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The outbound queue went over `--outbound-queue`.
    SlowConsumer,
    /// The node missed messages (an overflowed shard inbox, a Redis
    /// partition gap): the client must recover with `since`.
    FellBehind,
    /// No `auth` frame within `--auth-timeout`.
    AuthTimeout,
    /// The token reached its `exp` without a refresh.
    TokenExpired,
    /// Another op came before `auth`.
    AuthenticateFirst,
    /// The first `auth` frame carried a token that was refused.
    TokenRefused(&'static str),
    /// A refreshing token is for another user.
    AnotherUser,
    /// Over `--inbound-rate` for the grace period.
    FramesRateLimited,
    /// Over `--inbound-bytes-rate` for the grace period.
    BytesRateLimited,
    /// The graceful drain.
    GoingAway,
    /// Text that is not UTF-8.
    InvalidUtf8,
    /// An RFC 6455 violation: the decoder's close code and its description.
    Protocol(u16, String),
}

impl Close {
    /// The close code (section 4 of docs/PROTOCOL.md).
    pub fn code(&self) -> u16 {
        match self {
            Close::SlowConsumer | Close::FellBehind => close::SLOW,
            Close::AuthTimeout
            | Close::TokenExpired
            | Close::AuthenticateFirst
            | Close::TokenRefused(_) => close::NOT_AUTHENTICATED,
            Close::AnotherUser => close::FORBIDDEN,
            Close::FramesRateLimited | Close::BytesRateLimited => close::RATE_LIMITED,
            Close::GoingAway => close::GOING_AWAY,
            Close::InvalidUtf8 => close::INVALID_DATA,
            Close::Protocol(code, _) => *code,
        }
    }

    /// The close frame's reason text (at most 123 bytes).
    pub fn text(&self) -> &str {
        match self {
            Close::SlowConsumer => "slow consumer: outbound queue over its bound",
            Close::FellBehind => "server fell behind: resubscribe with since",
            Close::AuthTimeout => "authentication timed out",
            Close::TokenExpired => "token expired",
            Close::AuthenticateFirst => "authenticate first",
            Close::TokenRefused(why) => why,
            Close::AnotherUser => "refreshed token is for another user",
            Close::FramesRateLimited => "rate limited: over inbound_rate for 5 s",
            Close::BytesRateLimited => "rate limited: over inbound_bytes_rate for 5 s",
            Close::GoingAway => "server going away",
            Close::InvalidUtf8 => "invalid UTF-8",
            Close::Protocol(_, text) => text,
        }
    }

    /// The `reason` label of `ringcast_client_disconnects_total`.
    pub fn metric(&self) -> crate::metrics::Disconnect {
        use crate::metrics::Disconnect;
        match self {
            Close::SlowConsumer | Close::FellBehind => Disconnect::Slow,
            Close::AuthTimeout
            | Close::TokenExpired
            | Close::AuthenticateFirst
            | Close::TokenRefused(_)
            | Close::AnotherUser => Disconnect::Auth,
            Close::FramesRateLimited | Close::BytesRateLimited => Disconnect::RateLimited,
            Close::GoingAway => Disconnect::Drain,
            Close::InvalidUtf8 | Close::Protocol(..) => Disconnect::Protocol,
        }
    }
}

/// A client request, validated.
#[derive(Debug)]
pub enum ClientOp<'a> {
    /// `sub`: subscribe, optionally recovering from `since`.
    Sub {
        /// The topic, or a topic pattern ([`TopicName::is_pattern`]).
        topic: TopicName,
        /// Where to recover from.
        since: Option<Since>,
    },
    /// `unsub`.
    Unsub {
        /// The topic, or a pattern subscribed before.
        topic: TopicName,
    },
    /// `pub`: `data` is the raw JSON text, already validated.
    Pub {
        /// The topic.
        topic: TopicName,
        /// The payload, as the client wrote it.
        data: &'a RawValue,
        /// (v1.2) The producer's idempotency key, checked ([`check_key`]).
        key: Option<Cow<'a, str>>,
    },
    /// `ping`: answered with `pong`.
    Ping,
    /// `auth`: a token (JWT auth is its own issue).
    Auth {
        /// The token as sent.
        token: Cow<'a, str>,
    },
    /// `presence`: who is subscribed (its own issue).
    Presence {
        /// The topic.
        topic: TopicName,
    },
}

/// A request that could not be served, with the `id` to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// The request's `id`, when it could be read.
    pub id: Option<u64>,
    /// One of [`code`].
    pub code: u16,
    /// A one-line reason naming the field or limit.
    pub reason: String,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    id: Option<u64>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    since: Option<Cow<'a, str>>,
    epoch: Option<String>,
    // Not a plain `Option`: that would read `"data":null` as absent.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
}

/// Reads a field that is present, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Longest `reason` of an error reply, in bytes. A reason may quote the
/// client's input (serde quotes a mistyped string whole); a longer one
/// keeps its start and its end (where serde puts the position).
pub const MAX_REASON_LEN: usize = 256;

/// `reason` cut to [`MAX_REASON_LEN`] bytes, keeping both ends.
fn shorten(reason: String) -> String {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    const GAP: &str = " ... ";
    let keep = (MAX_REASON_LEN - GAP.len()) / 2;
    let head = reason.floor_char_boundary(keep);
    let tail = reason.ceil_char_boundary(reason.len() - keep);
    format!("{}{GAP}{}", &reason[..head], &reason[tail..])
}

/// Largest `id` a client may send: ids are echoed as JSON numbers, and
/// JavaScript clients lose precision past 2^53.
pub const MAX_REQUEST_ID: u64 = (1 << 53) - 1;

/// The `id` of a request, read without parsing the rest of it (ignored
/// fields are skipped, not built): for answering a request that is refused
/// before it is parsed (over the inbound rate). `None` when the text is not
/// a JSON object or its `id` is missing, not a number, or too large.
pub fn request_id(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<u64>,
    }
    // serde would also read a struct from an array (`[7]`).
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let id = serde_json::from_str::<IdOnly>(text).ok()?.id?;
    (id <= MAX_REQUEST_ID).then_some(id)
}

impl<'a> ClientOp<'a> {
    /// Parses one text frame. On error, the `id` is recovered when possible.
    pub fn parse(text: &'a str) -> Result<(Option<u64>, ClientOp<'a>), OpError> {
        let env: Envelope<'a> = serde_json::from_str(text).map_err(|e| OpError {
            id: None,
            code: code::BAD_REQUEST,
            reason: shorten(format!("invalid JSON request: {e}")),
        })?;
        let id = env.id;
        let bad = |reason: String| OpError {
            id,
            code: code::BAD_REQUEST,
            reason: shorten(reason),
        };
        if id.is_some_and(|i| i > MAX_REQUEST_ID) {
            return Err(bad(format!("id: larger than {MAX_REQUEST_ID}")));
        }
        let op = env
            .op
            .as_deref()
            .ok_or_else(|| bad("missing field: op".into()))?;
        // `sub` and `unsub` take a topic or a pattern; the other ops one topic.
        let named = |pattern: bool| -> Result<TopicName, OpError> {
            let t = env
                .topic
                .as_deref()
                .ok_or_else(|| bad("missing field: topic".into()))?;
            let parsed = match pattern {
                true => TopicName::filter(t),
                false => TopicName::new(t),
            };
            parsed.map_err(|e: TopicError| bad(format!("topic: {e}")))
        };
        let topic = || named(false);
        let op = match op {
            "sub" => ClientOp::Sub {
                topic: named(true)?,
                since: match env.since.as_deref() {
                    None => None,
                    Some(s) => Some(Since {
                        id: s.parse().map_err(|e| bad(format!("since: {e}")))?,
                        epoch: env.epoch.clone(),
                    }),
                },
            },
            "unsub" => ClientOp::Unsub {
                topic: named(true)?,
            },
            "pub" => {
                let data = env.data.ok_or_else(|| bad("missing field: data".into()))?;
                check_data(data.get()).map_err(|e| bad(format!("data: {e}")))?;
                if let Some(k) = &env.key {
                    check_key(k).map_err(|e| bad(format!("key: {e}")))?;
                }
                ClientOp::Pub {
                    topic: topic()?,
                    data,
                    key: env.key.clone(),
                }
            }
            "ping" => ClientOp::Ping,
            "auth" => ClientOp::Auth {
                token: env
                    .token
                    .clone()
                    .ok_or_else(|| bad("missing field: token".into()))?,
            },
            "presence" => ClientOp::Presence { topic: topic()? },
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(bad(format!("unknown op {shown:?}")));
            }
        };
        Ok((id, op))
    }
}

/// Longest idempotency `key` of a publish, in bytes (v1.2).
pub const MAX_KEY_LEN: usize = 128;

/// Checks an idempotency key: 1 to [`MAX_KEY_LEN`] bytes of UTF-8 (any
/// characters: it is compared byte for byte, never shown). The error says
/// which limit and the length.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "must be 1 to {MAX_KEY_LEN} bytes, is {}",
            key.len()
        ));
    }
    Ok(())
}

/// Deepest nesting of arrays and objects accepted in `data`, so every
/// subscriber's parser copes with the `msg` frame that wraps it in one more
/// object: serde_json (ringcast's own client) reads at most 127 levels.
pub const MAX_DATA_DEPTH: usize = 126;

/// Checks that `data`, one syntactically valid JSON document, can be sent
/// to subscribers in a `msg` frame: nested at most [`MAX_DATA_DEPTH`] levels,
/// and with every number within f64 range (serde_json refuses `1e400`, so
/// such a frame would break ringcast's own client). The error says which.
pub fn check_data(data: &str) -> Result<(), String> {
    if nesting_depth(data) > MAX_DATA_DEPTH {
        return Err(format!("nesting deeper than {MAX_DATA_DEPTH} levels"));
    }
    serde_json::from_str::<Readable>(data)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Reads any JSON value the way serde_json's `Value` does (numbers
/// included), building nothing.
struct Readable;

impl<'de> Deserialize<'de> for Readable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Readable)
    }
}

impl<'de> Visitor<'de> for Readable {
    type Value = Readable;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_str<E>(self, _: &str) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_unit<E>(self) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Readable, A::Error> {
        while seq.next_element::<Readable>()?.is_some() {}
        Ok(Readable)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Readable, A::Error> {
        while map.next_entry::<IgnoredAny, Readable>()?.is_some() {}
        Ok(Readable)
    }
}

/// The deepest nesting of `[` / `{` in valid JSON text, skipping strings.
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::MsgId;
    use bytes::Bytes;

    fn payload(frame: &Bytes) -> serde_json::Value {
        // Server text frames under 126 bytes have a 2-byte header.
        let skip = if frame[1] == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[skip..]).unwrap()
    }

    #[test]
    fn parses_every_op() {
        let (id, op) =
            ClientOp::parse(r#"{"op":"sub","id":7,"topic":"news","since":"5-1","epoch":"e"}"#)
                .unwrap();
        assert_eq!(id, Some(7));
        match op {
            ClientOp::Sub {
                topic,
                since: Some(s),
            } => {
                assert_eq!(topic.as_str(), "news");
                assert_eq!(s.id, MsgId { ms: 5, seq: 1 });
                assert_eq!(s.epoch.as_deref(), Some("e"));
            }
            other => panic!("{other:?}"),
        }
        let (_, op) =
            ClientOp::parse(r#"{"op":"pub","topic":"chat:1","data":{"a":[1,2]}}"#).unwrap();
        match op {
            ClientOp::Pub { data, .. } => assert_eq!(data.get(), r#"{"a":[1,2]}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ClientOp::parse(r#"{"op":"ping"}"#),
            Ok((None, ClientOp::Ping))
        ));
        assert!(matches!(
            ClientOp::parse(r#"{"op":"unsub","topic":"x"}"#),
            Ok((_, ClientOp::Unsub { .. }))
        ));
        // Escapes in strings are decoded (Cow::Owned).
        assert!(matches!(
            ClientOp::parse(r#"{"op":"unsub","topic":"\u0078"}"#),
            Ok((_, ClientOp::Unsub { .. }))
        ));
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_id() {
        let cases = [
            ("{", "invalid JSON"),
            ("[]", "invalid JSON"),
            ("\"x\"", "invalid JSON"),
            (r#"{"id":3}"#, "missing field: op"),
            (r#"{"id":3,"op":"fly"}"#, "unknown op \"fly\""),
            (r#"{"id":3,"op":"sub"}"#, "missing field: topic"),
            (
                r#"{"id":3,"op":"sub","topic":"a b"}"#,
                "topic: topic has invalid byte",
            ),
            (
                r#"{"id":3,"op":"sub","topic":"a","since":"x"}"#,
                "since: invalid message id",
            ),
            (r#"{"id":3,"op":"pub","topic":"a"}"#, "missing field: data"),
            (r#"{"id":3,"op":"auth"}"#, "missing field: token"),
            (r#"{"id":9007199254740992,"op":"ping"}"#, "id: larger than"),
            (r#"{"id":-1,"op":"ping"}"#, "invalid JSON"),
            (r#"{"id":"1","op":"ping"}"#, "invalid JSON"),
            (r#"{"op":5}"#, "invalid JSON"),
        ];
        for (text, want) in cases {
            let err = ClientOp::parse(text).unwrap_err();
            assert_eq!(err.code, code::BAD_REQUEST);
            assert!(err.reason.contains(want), "{text}: {}", err.reason);
            if text.contains("\"id\":3") {
                assert_eq!(err.id, Some(3), "{text}");
            }
        }
    }

    #[test]
    fn hostile_json_is_an_error_not_a_crash() {
        let data = format!(
            "{}\"[{{\\\"\"{}",
            "[".repeat(MAX_DATA_DEPTH),
            "]".repeat(MAX_DATA_DEPTH)
        );
        let ok = format!(r#"{{"op":"pub","topic":"a","data":{data}}}"#);
        assert!(ClientOp::parse(&ok).is_ok(), "{ok}");
        let deep = format!(
            "{{\"op\":\"pub\",\"topic\":\"a\",\"data\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(ClientOp::parse(&deep).is_err());
        let huge_key = format!("{{\"{}\":1}}", "k".repeat(1 << 16));
        assert!(matches!(ClientOp::parse(&huge_key), Err(OpError { .. })));
    }

    #[test]
    fn data_numbers_must_fit_an_f64() {
        let err = ClientOp::parse(r#"{"op":"pub","topic":"a","data":{"x":[1e400]}}"#).unwrap_err();
        assert!(
            err.reason.starts_with("data: number out of range"),
            "{}",
            err.reason
        );
        for ok in [
            "1e308",
            "-1e-400",
            "123456789012345678901234567890",
            "[0.5,\"1e400\"]",
        ] {
            assert_eq!(check_data(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_publish_key_is_1_to_128_bytes_of_a_string() {
        let (_, op) =
            ClientOp::parse(r#"{"op":"pub","topic":"a","data":1,"key":"order-7:shipped"}"#)
                .unwrap();
        assert!(matches!(op, ClientOp::Pub { key: Some(k), .. } if k == "order-7:shipped"));
        let (_, op) = ClientOp::parse(r#"{"op":"pub","topic":"a","data":1}"#).unwrap();
        assert!(matches!(op, ClientOp::Pub { key: None, .. }));
        // Escapes count as the bytes they decode to.
        let escaped = format!(
            r#"{{"op":"pub","topic":"a","data":1,"key":"{}"}}"#,
            "\\u00e9".repeat(64)
        );
        let (_, op) = ClientOp::parse(&escaped).unwrap();
        assert!(matches!(op, ClientOp::Pub { key: Some(k), .. } if k.len() == 128));
        let k129 = "k".repeat(129);
        let huge = "k".repeat(1 << 20);
        let cases = [
            (
                r#"{"id":3,"op":"pub","topic":"a","data":1,"key":""}"#.to_string(),
                "key: must be 1 to 128 bytes, is 0",
            ),
            (
                format!(r#"{{"id":3,"op":"pub","topic":"a","data":1,"key":"{k129}"}}"#),
                "key: must be 1 to 128 bytes, is 129",
            ),
            (
                format!(r#"{{"id":3,"op":"pub","topic":"a","data":1,"key":"{huge}"}}"#),
                "key: must be 1 to 128 bytes, is 1048576",
            ),
            (
                r#"{"id":3,"op":"pub","topic":"a","data":1,"key":7}"#.to_string(),
                "invalid JSON request: invalid type: integer `7`",
            ),
            (
                r#"{"id":3,"op":"pub","topic":"a","data":1,"key":null}"#.to_string(),
                "",
            ),
            (
                r#"{"id":3,"op":"pub","topic":"a","data":1,"key":["k"]}"#.to_string(),
                "invalid JSON request: invalid type: sequence",
            ),
            (
                r#"{"id":3,"op":"pub","topic":"a","data":1,"key":"\ud800"}"#.to_string(),
                "invalid JSON request",
            ),
        ];
        for (text, want) in cases {
            match ClientOp::parse(&text) {
                // `null` is no key, as for every optional field.
                Ok((_, ClientOp::Pub { key: None, .. })) if want.is_empty() => {}
                Ok(other) => panic!("{text:.80}: accepted {other:?}"),
                Err(e) => {
                    assert_eq!(e.code, code::BAD_REQUEST);
                    assert!(e.reason.starts_with(want), "{text:.80}: {}", e.reason);
                    assert!(e.reason.len() <= MAX_REASON_LEN);
                }
            }
        }
    }

    #[test]
    fn null_data_is_data() {
        let (_, op) = ClientOp::parse(r#"{"op":"pub","topic":"a","data":null}"#).unwrap();
        assert!(matches!(op, ClientOp::Pub { data, .. } if data.get() == "null"));
    }

    #[test]
    fn reasons_are_short_and_keep_both_ends() {
        let long = "x".repeat(10_000);
        for text in [
            format!(r#"{{"op":"ping","id":"{long}"}}"#),
            format!(r#"{{"op":"{long}"}}"#),
            format!(r#"{{"op":"{}"}}"#, "\\u0085".repeat(64)),
        ] {
            let err = ClientOp::parse(&text).unwrap_err();
            assert!(err.reason.len() <= MAX_REASON_LEN, "{}", err.reason);
        }
        let err = ClientOp::parse(&format!(r#"{{"op":"ping","id":"{long}"}}"#)).unwrap_err();
        assert!(err
            .reason
            .starts_with("invalid JSON request: invalid type: string \"xxx"));
        assert!(
            err.reason.ends_with("expected u64 at line 1 column 10020"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn server_frames_are_valid_json() {
        let t = TopicName::new("news").unwrap();
        let m = encode_msg(&t, MsgId { ms: 1, seq: 2 }, Some("e\"v"), r#"{"x":1}"#);
        let v = payload(&m);
        assert_eq!(v["op"], "msg");
        assert_eq!(v["id"], "1-2");
        assert_eq!(v["event"], "e\"v");
        assert_eq!(v["data"]["x"], 1);
        let ok = payload(&encode_ok(
            Some(7),
            Some(&t),
            OkExtra {
                epoch: Some("ep"),
                last: Some(MsgId { ms: 5, seq: 1 }),
                recovered: Some(false),
                mid: None,
            },
        ));
        assert_eq!(
            ok,
            serde_json::json!({"op":"ok","id":7,"topic":"news","epoch":"ep","last":"5-1","recovered":false})
        );
        let e = payload(&encode_error(None, 4000, "bad \"x\""));
        assert_eq!(
            e,
            serde_json::json!({"op":"error","code":4000,"reason":"bad \"x\""})
        );
        assert_eq!(
            payload(&encode_pong(Some(1))),
            serde_json::json!({"op":"pong","id":1})
        );
        assert_eq!(payload(&encode_drain(5))["reconnect_in_ms"], 5);
        assert_eq!(payload(&encode_welcome("c-1-2", "n", 25))["heartbeat"], 25);
        let ended = payload(&encode_topic_error(None, 4403, &t, "gone"));
        assert_eq!(
            ended,
            serde_json::json!({"op":"error","code":4403,"topic":"news","reason":"gone"})
        );
        let refused = payload(&encode_topic_error(Some(3), 4403, &t, "no"));
        assert_eq!(refused["id"], 3);
    }

    #[test]
    fn a_lost_notice_names_the_topic_and_both_ids_and_fits_its_reserve() {
        let t = TopicName::new("ticks:eur").unwrap();
        let f = encode_lost(&t, MsgId { ms: 5, seq: 0 }, MsgId { ms: 9, seq: 2 });
        assert_eq!(
            payload(&f),
            serde_json::json!({"op":"lost","topic":"ticks:eur","from":"5-0","to":"9-2"})
        );
        let max = MsgId {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        for len in [1, 40, 60, 255] {
            let t = TopicName::new(&"t".repeat(len)).unwrap();
            assert_eq!(encode_lost(&t, max, max).len(), lost_frame_max(&t), "{len}");
            assert!(encode_lost(&t, MsgId { ms: 1, seq: 0 }, max).len() <= lost_frame_max(&t));
        }
    }

    #[test]
    fn request_ids_are_read_without_the_rest() {
        assert_eq!(request_id(r#"{"op":"ping","id":7}"#), Some(7));
        assert_eq!(
            request_id(r#"{"id":7,"data":{"deep":[1,2,{"x":null}]}}"#),
            Some(7)
        );
        assert_eq!(request_id(r#"{"op":"nope"}"#), None);
        assert_eq!(request_id(r#"{"id":"7"}"#), None);
        assert_eq!(request_id(r#"{"id":9007199254740992}"#), None);
        assert_eq!(request_id("not json"), None);
        assert_eq!(request_id("[1]"), None);
    }
}
