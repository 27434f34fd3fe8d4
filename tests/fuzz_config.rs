//! Fuzzing the settings file, `ringcast::config::Layer::from_toml` and
//! `Config::from_layer`, and the value parsers `HumanDuration` / `ByteSize`:
//! any text never panics and a refusal names the setting at fault or the
//! TOML problem; a file of real settings with values of every type either
//! loads or every problem starts with the name of a setting; a valid config
//! never holds a duration that overflows the millisecond arithmetic the
//! shards do with it; durations and sizes written with any unit read back
//! as the value they were written from. Replays `tests/corpus/config`.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use std::sync::OnceLock;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use ringcast::config::{ByteSize, Config, HumanDuration, Layer};

/// Every setting name, as the parser itself lists them when refusing an
/// unknown one (so settings added later are fuzzed too).
fn settings() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let err = Layer::from_toml("zz_not_a_setting = 1").unwrap_err();
        let list = err.split("expected one of").nth(1).expect(&err);
        let names: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(
            names.len() > 10 && names.contains(&"heartbeat".to_string()),
            "{err}"
        );
        names
    })
}

/// The type of a setting's value, as found by probing the parser.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Duration,
    Size,
    Int,
    Bool,
    Str,
    StrList,
    /// A table or array of tables (`[[namespaces]]`): fuzzed by the untyped files only.
    Other,
}

/// Every setting with the kind of value it takes.
fn kinds() -> &'static [(String, Kind)] {
    static KINDS: OnceLock<Vec<(String, Kind)>> = OnceLock::new();
    KINDS.get_or_init(|| {
        let takes =
            |name: &str, value: &str| Layer::from_toml(&format!("{name} = {value}")).is_ok();
        settings()
            .iter()
            .map(|name| {
                let kind = if takes(name, "\"x\"") {
                    Kind::Str
                } else if takes(name, "\"1s\"") {
                    Kind::Duration
                } else if takes(name, "\"1KiB\"") {
                    Kind::Size
                } else if takes(name, "1") {
                    Kind::Int
                } else if takes(name, "true") {
                    Kind::Bool
                } else if takes(name, "[\"x\"]") {
                    Kind::StrList
                } else {
                    Kind::Other
                };
                (name.clone(), kind)
            })
            .collect()
    })
}

/// How a valid config exposes a setting.
type Getter<T> = fn(&Config) -> T;

/// Settings read as durations.
const DURATIONS: &[(&str, Getter<Duration>)] = &[
    ("heartbeat", |c| c.heartbeat),
    ("handshake_timeout", |c| c.handshake_timeout),
    ("close_timeout", |c| c.close_timeout),
    ("drain_window", |c| c.drain_window),
    ("history_ttl", |c| c.history_ttl),
];

/// Settings read as byte sizes.
const SIZES: &[(&str, Getter<usize>)] = &[
    ("max_handshake_size", |c| c.max_handshake_size),
    ("max_message_size", |c| c.max_message_size),
    ("max_publish_size", |c| c.max_publish_size),
    ("outbound_queue", |c| c.outbound_queue),
];

/// Milliseconds since the Unix epoch in 2100: a deadline `now + 2 * d` computed
/// by a shard must fit a u64 until then.
const NOW_MS_BOUND: u64 = 4_102_444_800_000;

// ---------------------------------------------------------------------------
// Generators.

/// A TOML string literal.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn duration_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![0u64..100_000, any::<u64>(), Just(u64::MAX)],
        prop_oneof![
            Just(""),
            Just("ms"),
            Just("s"),
            Just("m"),
            Just("h"),
            Just("d"),
            Just(" s")
        ],
    )
        .prop_map(|(n, unit)| format!("{n}{unit}"))
}

fn size_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![0u64..100_000, any::<u64>()],
        prop_oneof![
            Just(""),
            Just("b"),
            Just("KiB"),
            Just("kb"),
            Just("k"),
            Just("MiB"),
            Just("M"),
            Just("GiB"),
            Just("gb"),
            Just("TiB"),
            Just("x"),
        ],
    )
        .prop_map(|(n, unit)| format!("{n}{unit}"))
}

/// A TOML value of any type, biased to what settings take.
fn toml_value() -> BoxedStrategy<String> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(1023),
            Just(1024),
            Just(4096)
        ]
        .prop_map(|n| n.to_string()),
        Just("18446744073709551615".to_string()),
        Just("1.5".to_string()),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        Just("1e400".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        duration_text().prop_map(|s| toml_str(&s)),
        size_text().prop_map(|s| toml_str(&s)),
        prop_oneof![
            Just("127.0.0.1:0"),
            Just("[::1]:8080"),
            Just("off"),
            Just(""),
            Just("text"),
            Just("json"),
            Just("redis://127.0.0.1:6379/0"),
            Just("RS256"),
            Just("localhost"),
        ]
        .prop_map(toml_str),
        any::<String>().prop_map(|s| toml_str(&s)),
        Just("1979-05-27T07:32:00Z".to_string()),
        Just("'literal'".to_string()),
        Just("\"\"\"multi-line syntax, one line\"\"\"".to_string()),
    ];
    scalar
        .prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
                vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                    let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", body.join(", "))
                }),
            ]
        })
        .boxed()
}

/// A plausible string for a string setting.
fn some_str() -> BoxedStrategy<String> {
    prop_oneof![
        prop_oneof![
            Just("127.0.0.1:0"),
            Just("0.0.0.0:8080"),
            Just("[::1]:0"),
            Just("localhost:80"),
            Just("off"),
            Just(""),
            Just("text"),
            Just("json"),
            Just("RS256"),
            Just("ES256"),
            Just("HS256"),
            Just("redis://127.0.0.1:6379/0"),
            Just("redis://:pw@h:1/99"),
            Just("rediss://x"),
            Just("unix:///tmp/r.sock"),
            Just("ringcast"),
            Just("a{b}"),
            Just("/nonexistent/key.pem"),
            Just("http://localhost:3000"),
        ]
        .prop_map(String::from),
        "[a-z0-9:/.@_-]{0,70}",
        any::<String>(),
    ]
    .boxed()
}

/// A value of the right type for `kind` (out of range or unparsable inside it).
fn typed_value(kind: Kind) -> BoxedStrategy<String> {
    match kind {
        Kind::Duration => prop_oneof![
            duration_text().prop_map(|s| toml_str(&s)),
            (0u64..100_000).prop_map(|n| n.to_string()),
        ]
        .boxed(),
        Kind::Size => prop_oneof![
            size_text().prop_map(|s| toml_str(&s)),
            (0u64..10_000_000).prop_map(|n| n.to_string()),
        ]
        .boxed(),
        Kind::Int => prop_oneof![
            0i64..3000,
            prop_oneof![
                Just(0i64),
                Just(1),
                Just(1024),
                Just(1025),
                Just(i64::from(u32::MAX) + 1)
            ],
            any::<i64>(),
        ]
        .prop_map(|n| n.to_string())
        .boxed(),
        Kind::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Kind::Str => some_str().prop_map(|s| toml_str(&s)).boxed(),
        Kind::StrList => vec(some_str(), 0..4)
            .prop_map(|v| {
                let items: Vec<String> = v.iter().map(|s| toml_str(s)).collect();
                format!("[{}]", items.join(", "))
            })
            .boxed(),
        Kind::Other => toml_value(),
    }
}

/// A settings file with values of the right types, each setting at most once.
fn typed_settings_file() -> impl Strategy<Value = String> {
    let typed: Vec<(String, Kind)> = kinds()
        .iter()
        .filter(|(_, k)| *k != Kind::Other)
        .cloned()
        .collect();
    vec(proptest::sample::select(typed), 0..12)
        .prop_flat_map(|mut chosen| {
            chosen.sort_by(|a, b| a.0.cmp(&b.0));
            chosen.dedup_by(|a, b| a.0 == b.0);
            chosen
                .into_iter()
                .map(|(name, kind)| typed_value(kind).prop_map(move |v| format!("{name} = {v}")))
                .collect::<Vec<_>>()
        })
        .prop_map(|lines| lines.join("\n"))
}

/// A settings file: real setting names (and a few others) with values of
/// any type, one per line, with comments, blank lines, repeats and tables.
fn settings_file() -> impl Strategy<Value = (String, Vec<String>)> {
    let line = prop_oneof![
        8 => (proptest::sample::select(settings().to_vec()), toml_value())
            .prop_map(|(k, v)| (Some(k.clone()), format!("{k} = {v}"))),
        1 => ("zz_[a-z_]{1,10}", toml_value())
            .prop_map(|(k, v)| (Some(k.clone()), format!("{k} = {v}"))),
        1 => Just((None, "# a comment".to_string())),
        1 => Just((None, String::new())),
        1 => proptest::sample::select(settings().to_vec())
            .prop_map(|k| (Some(k.clone()), format!("[{k}]"))),
    ];
    vec(line, 0..10).prop_map(|lines| {
        let keys = lines.iter().filter_map(|(k, _)| k.clone()).collect();
        let text = lines
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>()
            .join("\n");
        (text, keys)
    })
}

// ---------------------------------------------------------------------------
// Properties.

/// What must hold for the answer to any text.
fn check_file(text: &str) -> Result<(), TestCaseError> {
    match Layer::from_toml(text) {
        Err(msg) => {
            prop_assert!(msg.starts_with("TOML parse error at line "), "{msg}");
            prop_assert!(!msg.contains('\n'), "{msg}");
        }
        Ok(layer) => check_layer(layer)?,
    }
    Ok(())
}

/// A parsed layer (with anonymous access allowed, so that the only
/// problems are the file's): valid settings, or problems that each start
/// with the name of a setting.
fn check_layer(layer: Layer) -> Result<(), TestCaseError> {
    let mut anon = Layer::from_toml("allow_anonymous = true").unwrap();
    anon = layer.over(anon);
    match Config::from_layer(anon) {
        Err(e) => {
            prop_assert!(!e.0.is_empty());
            for problem in &e.0 {
                let name = problem.split(':').next().unwrap_or("");
                prop_assert!(
                    settings().iter().any(|s| s == name),
                    "problem does not start with a setting name: {problem:?}"
                );
            }
        }
        Ok(c) => check_config(&c)?,
    }
    Ok(())
}

/// Invariants of a valid config that other modules rely on.
fn check_config(c: &Config) -> Result<(), TestCaseError> {
    for (name, get) in DURATIONS {
        let ms = u64::try_from(get(c).as_millis()).ok();
        let deadline = ms
            .and_then(|ms| ms.checked_mul(2))
            .and_then(|ms| ms.checked_add(NOW_MS_BOUND));
        prop_assert!(
            deadline.is_some(),
            "{name} = {:?} overflows a millisecond deadline",
            get(c)
        );
    }
    prop_assert!(c.shards >= 1);
    prop_assert!(!c.node_name.is_empty());
    Ok(())
}

/// Reference: what a duration text means, or None when it is not one.
fn duration_reference(text: &str) -> Option<Duration> {
    let t = text.trim();
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let n: u64 = t[..digits].parse().ok()?;
    Some(match t[digits..].trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return None,
    })
}

/// Reference: what a size text means; Err(true) when it is too large.
fn size_reference(text: &str) -> Result<usize, bool> {
    let t = text.trim();
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let n: usize = t[..digits].parse().map_err(|_| false)?;
    let shift = match t[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(false),
    };
    n.checked_mul(1 << shift).ok_or(true)
}

proptest! {
    #![proptest_config(fuzz_support::config(256))]

    #[test]
    fn any_text_is_settings_or_a_toml_error(text in prop_oneof![
        any::<String>(),
        "[a-z_ =\"\\[\\]{},.0-9#\n-]{0,120}",
    ]) {
        check_file(&text)?;
    }

    #[test]
    fn settings_files_load_or_name_the_problem((text, keys) in settings_file()) {
        check_file(&text)?;
        if let Err(msg) = Layer::from_toml(&text) {
            // Every line is well-formed TOML: the error is about one of
            // its keys, which the message names or quotes the line of.
            prop_assert!(keys.iter().any(|k| msg.contains(k.as_str())), "{msg}");
        }
    }

    #[test]
    fn typed_settings_files_load_or_name_the_problem(text in typed_settings_file()) {
        check_file(&text)?;
    }

    #[test]
    fn durations_read_as_written(
        setting in 0..DURATIONS.len(),
        text in prop_oneof![duration_text(), "[0-9]{1,3}[a-z ]{0,3}", any::<String>()],
        quoted in prop_oneof![3 => Just(true), 1 => Just(false)],
    ) {
        let got = text.parse::<HumanDuration>();
        prop_assert_eq!(got.as_ref().ok().map(|d| d.0), duration_reference(&text));
        if let Err(e) = &got {
            prop_assert!(e.to_string().contains(&format!("{text:?}")), "{e}");
        }
        // The same in a file (bare numbers are seconds).
        let (name, get) = DURATIONS[setting];
        let value = if quoted { toml_str(&text) } else { text.clone() };
        let file = format!("{name} = {value}\nallow_anonymous = true");
        check_file(&file)?;
        if let (true, Ok(want), Ok(layer)) = (quoted, &got, Layer::from_toml(&file)) {
            if let Ok(c) = Config::from_layer(layer) {
                prop_assert_eq!(get(&c), want.0);
            }
        }
    }

    #[test]
    fn sizes_read_as_written(
        setting in 0..SIZES.len(),
        text in prop_oneof![size_text(), "[0-9]{1,3}[a-zA-Z ]{0,4}", any::<String>()],
    ) {
        let got = text.parse::<ByteSize>();
        match size_reference(&text) {
            Ok(n) => prop_assert_eq!(got.as_ref().map(|b| b.0).ok(), Some(n)),
            Err(too_large) => {
                let msg = got.as_ref().map(|b| b.0).unwrap_err().to_string();
                prop_assert_eq!(msg.contains("too large"), too_large, "{}", msg);
            }
        }
        let (name, get) = SIZES[setting];
        let file = format!("{name} = {}\nallow_anonymous = true", toml_str(&text));
        check_file(&file)?;
        if let (Ok(want), Ok(layer)) = (&got, Layer::from_toml(&file)) {
            if let Ok(c) = Config::from_layer(layer) {
                prop_assert_eq!(get(&c), want.0);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The corpus.

/// Replays `tests/corpus/config`: `ok-*` loads into a valid config (with
/// anonymous access allowed), `invalid-*` parses but is refused by
/// validation, `malformed-*` is refused by the TOML reader.
#[test]
fn corpus_replays() {
    for seed in fuzz_support::corpus("config") {
        let name = &seed.name;
        let text = std::str::from_utf8(&seed.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_file(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let anon = Layer::from_toml("allow_anonymous = true").unwrap();
        let got = Layer::from_toml(text).map(|l| Config::from_layer(l.over(anon)));
        match (seed.class(), &got) {
            ("ok", Ok(Ok(_))) | ("invalid", Ok(Err(_))) | ("malformed", Err(_)) => {}
            (class, _) => panic!("{name}: expected {class}, got {got:?}"),
        }
    }
}
