//! Fuzzing JWT handling, `ringcast::auth`: any string offered as a token is
//! refused or accepted without a panic, and a refusal's reason is one of a
//! few fixed strings (it never echoes the token); any change to a valid
//! token (a flipped, dropped or inserted byte, a swapped segment) is
//! refused; tokens signed with other secrets or algorithms are refused;
//! patterns parse or are refused, and a parsed pattern matches exactly what
//! a reference matcher written here says; arbitrary claims documents and
//! headers (wrong types, missing or extra fields, `crit`) are classified as
//! a reference says. The seed tokens in `tests/corpus/jwt/` (written by
//! `tests/corpus/make_jwt.py`) are replayed with their expected class.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use proptest::prelude::*;
use ringcast::auth::{mint_hmac, now_secs, AuthError, Claims, Pattern, Verifier};
use serde_json::{json, Value};

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef012345";

fn valid_token(sub: &str) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: now_secs() + 3600,
        subs: vec!["a.#".into()],
        pubs: vec![],
    };
    mint_hmac(SECRET, &claims)
}

/// The reference: segments split on '.' or ':'; `*` one; `#` (last) one or more.
fn reference_match(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split(['.', ':']).collect();
    let t: Vec<&str> = topic.split(['.', ':']).collect();
    if p.last() == Some(&"#") {
        let head = &p[..p.len() - 1];
        return t.len() > head.len() && head.iter().zip(&t).all(|(a, b)| *a == "*" || a == b);
    }
    p.len() == t.len() && p.iter().zip(&t).all(|(a, b)| *a == "*" || a == b)
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![Just("*".to_string()), "[a-c]{1,2}"]
}

/// Every topic of 1 to `max` segments over `a`, `b`, `c` (a segment no
/// pattern below names) and the empty segment, joined by `.`.
fn topics_up_to(max: usize) -> Vec<String> {
    let mut all: Vec<Vec<&str>> = vec![vec![]];
    let mut out = Vec::new();
    for _ in 0..max {
        all = all
            .iter()
            .flat_map(|t| {
                ["a", "b", "c", ""].into_iter().map(move |s| {
                    let mut t = t.clone();
                    t.push(s);
                    t
                })
            })
            .collect();
        out.extend(all.iter().map(|t| t.join(".")));
    }
    out
}

/// A pattern of 1 to 4 segments over `a`, `b`, `*`, ending with `#` or not.
fn small_pattern() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("*")], 1..=4),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(segs, rest, colon)| {
            let mut segs: Vec<&str> = segs;
            if rest {
                *segs.last_mut().unwrap() = "#";
            }
            // Either separator: they are the same to a pattern.
            segs.join(if colon { ":" } else { "." })
        })
}

proptest! {
    #![proptest_config(fuzz_support::config(512))]

    /// `covers` is exactly "every topic the inner pattern matches, the
    /// outer matches": checked by brute force over every topic of up to 6
    /// segments (patterns here have at most 4, so a topic that tells them
    /// apart, if any, has at most 5).
    #[test]
    fn covers_agrees_with_enumerating_every_topic(outer in small_pattern(), inner in small_pattern()) {
        thread_local! {
            static TOPICS: Vec<String> = topics_up_to(6);
        }
        let (p, q) = (Pattern::parse(&outer).unwrap(), Pattern::parse(&inner).unwrap());
        let brute = TOPICS.with(|all| {
            all.iter().all(|t| !reference_match(&inner, t) || reference_match(&outer, t))
        });
        prop_assert_eq!(p.covers(&q), brute, "{} covers {}?", outer, inner);
    }

    #[test]
    fn any_string_is_refused_or_accepted_without_panic(token in ".{0,300}") {
        let v = Verifier::hmac(SECRET, None, None);
        if let Err(e) = v.verify(&token) {
            prop_assert!(e.reason().len() <= 64);
            // Reasons are fixed strings: a token never comes back in one.
            prop_assert!(token.len() < 8 || !e.reason().contains(&token));
        }
    }

    #[test]
    fn token_shaped_garbage_is_refused(parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 3)) {
        let v = Verifier::hmac(SECRET, None, None);
        prop_assert!(v.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn any_change_to_a_valid_token_is_refused(at in 0usize..400, byte in 0u8..128, op in 0u8..3) {
        let v = Verifier::hmac(SECRET, None, None);
        let good = valid_token("u1");
        prop_assert!(v.verify(&good).is_ok());
        let mut bytes = good.clone().into_bytes();
        let at = at % bytes.len();
        match op {
            0 => bytes[at] = byte,
            1 => { bytes.remove(at); }
            _ => bytes.insert(at, byte),
        }
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        // Base64url has padding bits: a change there decodes the same.
        // Then the token is byte-different but semantically equal.
        if changed != good && v.verify(&changed).is_ok() {
            let seg = changed.split('.').map(str::len).collect::<Vec<_>>();
            prop_assert_eq!(seg, good.split('.').map(str::len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn other_secrets_never_verify(secret in proptest::collection::vec(any::<u8>(), 32..64)) {
        prop_assume!(secret != SECRET);
        let v = Verifier::hmac(SECRET, None, None);
        let claims = Claims { sub: "u".into(), exp: now_secs() + 60, subs: vec![], pubs: vec![] };
        prop_assert!(v.verify(&mint_hmac(&secret, &claims)).is_err());
    }

    #[test]
    fn patterns_match_like_the_reference(segs in proptest::collection::vec(segment(), 1..5), hash in any::<bool>(),
                                          topic in proptest::collection::vec("[a-c]{1,2}", 1..7), colon in any::<bool>()) {
        let mut pattern = segs.join(".");
        if hash {
            pattern.push_str(".#");
        }
        let topic = topic.join(if colon { ":" } else { "." });
        let parsed = Pattern::parse(&pattern).unwrap();
        prop_assert_eq!(parsed.matches(&topic), reference_match(&pattern, &topic), "{} vs {}", pattern, topic);
    }

    #[test]
    fn any_pattern_text_parses_or_is_refused(text in "[a-z.:*#]{0,20}", topic in "[a-z.:]{1,20}") {
        if let Some(p) = Pattern::parse(&text) {
            prop_assert!(!text.is_empty() && !text.contains("..") && !text.ends_with('.'));
            prop_assert_eq!(p.matches(&topic), reference_match(&text, &topic), "{} vs {}", text, topic);
        }
    }
}

/// The secret, issuer and audience the corpus tokens were made for.
const CORPUS_SECRET: &[u8] = b"corpus-secret-0123456789abcdef0123";
const CORPUS_ISS: &str = "https://id.example";
const CORPUS_AUD: &str = "clients";

/// The corpus class of a verification result.
fn class_of(result: &Result<ringcast::auth::Identity, AuthError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(AuthError::Expired) => "expired",
        Err(AuthError::NotYetValid) => "nbf",
        Err(AuthError::Claim("iss")) => "iss",
        Err(AuthError::Claim(_)) => "aud",
        Err(AuthError::Pattern(_)) => "pattern",
        Err(AuthError::Invalid(_)) => "invalid",
    }
}

#[test]
fn corpus_replays() {
    let v = Verifier::hmac(CORPUS_SECRET, Some(CORPUS_ISS), Some(CORPUS_AUD));
    for seed in fuzz_support::corpus("jwt") {
        let name = &seed.name;
        let token = std::str::from_utf8(&seed.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = v.verify(token);
        assert_eq!(class_of(&got), seed.class(), "{name}: {got:?}");
        if let Err(e) = got {
            assert!(fuzz_support::no_control(e.reason()), "{name}");
        }
    }
}

/// One claim of a generated token: what is put there.
#[derive(Debug, Clone)]
enum Field {
    Absent,
    Null,
    /// A value of the wrong JSON type.
    Wrong(Value),
    Set(Value),
}

/// A generated claims document and header, with what each field holds.
#[derive(Debug, Clone)]
struct Case {
    sub: Field,
    exp: Field,
    nbf: Field,
    iss: Field,
    aud: Field,
    subs: Field,
    pubs: Field,
    crit: bool,
    kid: Option<String>,
    extra: Option<Value>,
}

/// A time well away from now, so a run never straddles it.
fn past() -> impl Strategy<Value = u64> {
    0..now_secs() - 3600
}
fn future() -> impl Strategy<Value = u64> {
    prop_oneof![now_secs() + 3600..now_secs() + 100_000_000, Just(u64::MAX)]
}

fn wrong() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!([])),
        Just(json!({"a": 1})),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!("text")),
    ]
}

fn time_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        Just(Field::Absent),
        Just(Field::Null),
        past().prop_map(|t| Field::Set(json!(t))),
        future().prop_map(|t| Field::Set(json!(t))),
        // jsonwebtoken takes a float time; ringcast's claims want an integer.
        future().prop_map(|t| Field::Set(json!(t.min(1 << 50) as f64 + 0.5))),
        prop_oneof![Just(json!("soon")), Just(json!(-5)), Just(json!([1]))].prop_map(Field::Wrong),
    ]
}

fn string_claim(good: &'static str) -> impl Strategy<Value = Field> {
    prop_oneof![
        Just(Field::Absent),
        Just(Field::Null),
        Just(Field::Set(json!(good))),
        Just(Field::Set(json!([good, "other"]))),
        "[a-z:/.]{0,12}".prop_map(|s| Field::Set(json!(s))),
        Just(Field::Set(json!([]))),
        prop_oneof![Just(json!(7)), Just(json!({"x": good})), Just(json!([1]))]
            .prop_map(Field::Wrong),
    ]
}

fn pattern() -> impl Strategy<Value = String> {
    (proptest::collection::vec(segment(), 1..4), any::<bool>()).prop_map(|(segs, hash)| {
        let mut p = segs.join(".");
        if hash {
            p.push_str(".#");
        }
        p
    })
}

fn patterns_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        Just(Field::Absent),
        Just(Field::Null),
        proptest::collection::vec(pattern(), 0..3).prop_map(|v| Field::Set(json!(v))),
        proptest::collection::vec(
            prop_oneof![pattern(), Just("a..b".to_string()), Just("#.a".to_string())],
            1..3
        )
        .prop_map(|v| Field::Set(json!(v))),
        prop_oneof![
            Just(json!("news")),
            Just(json!([1])),
            Just(json!({"a": []}))
        ]
        .prop_map(Field::Wrong),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            prop_oneof![
                3 => ".{1,16}".prop_map(|s| Field::Set(json!(s))),
                1 => Just(Field::Absent),
                1 => Just(Field::Null),
                1 => wrong().prop_filter("not a string", |v| !v.is_string()).prop_map(Field::Wrong),
            ],
            time_field(),
            time_field(),
            string_claim(CORPUS_ISS),
            string_claim(CORPUS_AUD),
        ),
        (
            patterns_field(),
            patterns_field(),
            proptest::bool::weighted(0.1),
            proptest::option::of("[a-z]{0,8}"),
            proptest::option::of(wrong()),
        ),
    )
        .prop_map(
            |((sub, exp, nbf, iss, aud), (subs, pubs, crit, kid, extra))| Case {
                sub,
                exp,
                nbf,
                iss,
                aud,
                subs,
                pubs,
                crit,
                kid,
                extra,
            },
        )
}

impl Case {
    fn token(&self) -> String {
        let mut claims = serde_json::Map::new();
        for (name, f) in [
            ("sub", &self.sub),
            ("exp", &self.exp),
            ("nbf", &self.nbf),
            ("iss", &self.iss),
            ("aud", &self.aud),
            ("subs", &self.subs),
            ("pubs", &self.pubs),
        ] {
            match f {
                Field::Absent => {}
                Field::Null => {
                    claims.insert(name.into(), Value::Null);
                }
                Field::Wrong(v) | Field::Set(v) => {
                    claims.insert(name.into(), v.clone());
                }
            }
        }
        if let Some(x) = &self.extra {
            claims.insert("x".into(), x.clone());
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = self.kid.clone();
        if self.crit {
            header.crit = Some(vec!["exp".into()]);
        }
        jsonwebtoken::encode(
            &header,
            &Value::Object(claims),
            &jsonwebtoken::EncodingKey::from_secret(CORPUS_SECRET),
        )
        .unwrap()
    }

    /// The class a verifier with issuer and audience configured must give:
    /// the header; then jsonwebtoken's order: ringcast's claims type first
    /// (string `sub`, integer `exp`, `subs`/`pubs` absent or lists of
    /// strings), then its validation (`iss`/`aud` present, `nbf` a number,
    /// exp, nbf, iss, aud); then the patterns.
    fn expected(&self) -> &'static str {
        let now = now_secs();
        let strings = |f: &Field| match f {
            Field::Set(Value::String(s)) => Some(vec![s.clone()]),
            Field::Set(Value::Array(a)) if a.iter().all(Value::is_string) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
            ),
            _ => None,
        };
        if self.crit {
            return "invalid";
        }
        let Field::Set(Value::String(_)) = &self.sub else {
            return "invalid";
        };
        let Some(exp) = (match &self.exp {
            Field::Set(v) => v.as_u64(),
            _ => None,
        }) else {
            return "invalid";
        };
        let mut patterns = Vec::new();
        for f in [&self.subs, &self.pubs] {
            match f {
                Field::Absent => {}
                Field::Set(Value::Array(a)) if a.iter().all(Value::is_string) => {
                    patterns.extend(a.iter().filter_map(Value::as_str));
                }
                _ => return "invalid",
            }
        }
        let (Some(iss), Some(aud)) = (strings(&self.iss), strings(&self.aud)) else {
            return "invalid";
        };
        // jsonwebtoken reads a float time, rounded.
        let nbf = match &self.nbf {
            Field::Absent => None,
            Field::Set(v) if v.is_u64() || v.as_f64().is_some_and(|x| x >= 0.0) => {
                v.as_f64().map(|x| x.round() as u64)
            }
            _ => return "invalid",
        };
        if exp < now {
            return "expired";
        }
        if nbf.is_some_and(|n| n > now) {
            return "nbf";
        }
        if !iss.iter().any(|i| i == CORPUS_ISS) {
            return "iss";
        }
        if !aud.iter().any(|a| a == CORPUS_AUD) {
            return "aud";
        }
        if patterns.iter().any(|p| Pattern::parse(p).is_none()) {
            return "pattern";
        }
        "ok"
    }
}

proptest! {
    #![proptest_config(fuzz_support::config(1024))]

    #[test]
    fn claims_and_headers_are_classified_like_the_reference(c in case()) {
        let v = Verifier::hmac(CORPUS_SECRET, Some(CORPUS_ISS), Some(CORPUS_AUD));
        let got = v.verify(&c.token());
        prop_assert_eq!(class_of(&got), c.expected(), "{:?} -> {:?}", c, got);
        if let Ok(id) = got {
            // What the token allows is exactly its patterns.
            let allowed = |f: &Field, topic: &str| match f {
                Field::Set(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|p| reference_match(p, topic)),
                _ => false,
            };
            for topic in ["a", "a.b", "b.c.a", "c:a"] {
                prop_assert_eq!(id.may_subscribe(topic), allowed(&c.subs, topic));
                prop_assert_eq!(id.may_publish(topic), allowed(&c.pubs, topic));
            }
        }
    }
}
