//! Fuzzing permessage-deflate, `ringcast::ws::deflate` (RFC 7692;
//! docs/PROTOCOL.md section 1), against models written here:
//!
//! - the negotiation: any `Sec-WebSocket-Extensions` lines (well-formed,
//!   hostile, huge, non-ASCII) and `User-Agent` never panic and give what
//!   a model written from the protocol gives, offer by offer; an answer
//!   always carries both `no_context_takeover`s, never
//!   `client_max_window_bits`, and `server_max_window_bits` exactly when
//!   the taken offer named it, with its value; a malformed offer is
//!   declined with its reason and the next acceptable one is taken;
//! - the inflater: any bytes, and compressed messages with bytes flipped,
//!   inserted, removed or cut, inflate to what a DEFLATE decoder written
//!   from RFC 1951 (`fuzz_support::inflate`, the reference) makes of them,
//!   or fail as it does: past the limit "too
//!   big" (close 1009), invalid "corrupt" (close 1007); never a panic,
//!   never more than the limit handed back, a bounded allocation;
//!   `Deflater` -> `Inflater` gives the payload back at every level; and
//!   one reset per message makes a message inflate (and compress) the same
//!   whatever came before it.
//!
//! Replays `tests/corpus/deflate`: upgrade requests of real clients (`.http`)
//! and compressed messages (`.bin`), and checks the exact answer each real
//! client gets.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use flate2::{Compress, Compression, FlushCompress, Status};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast::ws::deflate::{negotiate, Decline, Deflater, InflateError, Inflater, Negotiation};
use ringcast::ws::handshake::parse_request;

use fuzz_support::inflate;

/// The server's default `max_message_size`: the inflate limit of the corpus.
const MAX: usize = 64 << 10;

/// The answer to an offer that does not limit the server's window.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// What a sync flush ends with, removed by the sender (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

// ---------------------------------------------------------------------------
// A model of the negotiation (docs/PROTOCOL.md section 1, RFC 7692 §7.1).

/// What the server must make of the offers.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    /// The `Sec-WebSocket-Extensions` answer, if an offer is taken.
    answer: Option<String>,
    /// Its window (`server_max_window_bits`, else 15).
    window: Option<u8>,
    /// The permessage-deflate offers declined before it (or all of them).
    declined: Vec<Decline>,
}

/// Splits `s` at `sep` where it is not inside double quotes (a quote opens
/// or closes a quoted run; an open quote runs to the end of the line).
fn pieces(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in s.chars() {
        if c == sep && !quoted {
            out.push(String::new());
            continue;
        }
        if c == '"' {
            quoted = !quoted;
        }
        out.last_mut().unwrap().push(c);
    }
    out
}

/// Whitespace around names, parameters and values is ignored. Like the
/// server, any Unicode whitespace: HTTP has only SP and HTAB there, but the
/// value is UTF-8 text by then and a wider trim only accepts more.
fn trim(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

/// A window size: exactly one of these spellings (RFC 7692 §7.1.2: 8 to
/// 15, no leading zero, no sign).
fn window(v: &str) -> Option<u8> {
    let spellings = ["8", "9", "10", "11", "12", "13", "14", "15"];
    spellings.iter().position(|s| *s == v).map(|i| i as u8 + 8)
}

/// The parameters of one offer: its window, or why it is declined. The
/// first bad parameter decides; a value is checked before its name.
fn model_params(params: &[String]) -> Result<Option<u8>, Decline> {
    let mut seen: Vec<String> = Vec::new();
    let mut server_window = None;
    for p in params {
        let (key, value) = match p.find('=') {
            None => (trim(p), None),
            Some(i) => {
                let v = trim(&p[i + 1..]);
                let inner = if let Some(rest) = v.strip_prefix('"') {
                    rest.strip_suffix('"').ok_or(Decline::Malformed)?
                } else if v.is_empty() {
                    return Err(Decline::Malformed);
                } else {
                    v
                };
                (trim(&p[..i]), Some(inner))
            }
        };
        let key = key.to_ascii_lowercase();
        match (key.as_str(), value) {
            ("", _) => return Err(Decline::Malformed),
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_no_context_takeover" | "client_no_context_takeover", Some(_)) => {
                return Err(Decline::Malformed)
            }
            ("server_max_window_bits", v) => {
                server_window = Some(v.and_then(window).ok_or(Decline::Malformed)?);
            }
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window(v).ok_or(Decline::Malformed)?;
            }
            _ => return Err(Decline::UnknownParameter),
        }
        if seen.contains(&key) {
            return Err(Decline::Malformed);
        }
        seen.push(key);
    }
    Ok(server_window)
}

/// WebKit 15.0 to 15.3: Safari by its `Version/` (not Chrome or
/// Chromium), and any browser on iOS or iPadOS 15.0-15.3 by the OS.
fn model_broken_client(ua: &str) -> bool {
    let minor_0_to_3 = |prefix: &str| {
        ua.match_indices(prefix).any(|(i, m)| {
            let mut rest = ua[i + m.len()..].chars();
            matches!(rest.next(), Some('0'..='3')) && !matches!(rest.next(), Some('0'..='9'))
        })
    };
    let safari = ua.contains("Safari/") && !ua.contains("Chrome/") && !ua.contains("Chromium/");
    let ios = ua.contains("AppleWebKit/")
        && (ua.contains("iPhone") || ua.contains("iPad") || ua.contains("iPod"));
    (safari && minor_0_to_3("Version/15.")) || (ios && minor_0_to_3(" OS 15_"))
}

fn model(headers: &[&str], user_agent: Option<&str>, enabled: bool) -> Expected {
    let mut declined = Vec::new();
    for line in headers {
        for offer in pieces(line, ',') {
            let params = pieces(&offer, ';');
            if !trim(&params[0]).eq_ignore_ascii_case("permessage-deflate") {
                continue;
            }
            let verdict = if !enabled {
                Err(Decline::Disabled)
            } else if user_agent.is_some_and(model_broken_client) {
                Err(Decline::BrokenClient)
            } else {
                model_params(&params[1..])
            };
            match verdict {
                Ok(w) => {
                    let suffix =
                        w.map_or(String::new(), |n| format!("; server_max_window_bits={n}"));
                    return Expected {
                        answer: Some(format!("{ANSWER}{suffix}")),
                        window: Some(w.unwrap_or(15)),
                        declined,
                    };
                }
                Err(why) => declined.push(why),
            }
        }
    }
    Expected {
        answer: None,
        window: None,
        declined,
    }
}

/// What the server made of the offers, in the model's terms.
fn got(n: &Negotiation) -> Expected {
    Expected {
        answer: n.agreed.map(|a| a.response()),
        window: n.agreed.map(|a| a.server_window_bits),
        declined: n.declined.clone(),
    }
}

/// The contract of any answer, read from the answer alone.
fn check_answer(n: &Negotiation) -> Result<(), TestCaseError> {
    let Some(agreed) = n.agreed else {
        return Ok(());
    };
    let answer = agreed.response();
    let params: Vec<&str> = answer.split(';').map(str::trim).collect();
    prop_assert_eq!(params[0], "permessage-deflate", "{}", answer);
    for p in &params[1..] {
        let name = p.split('=').next().unwrap();
        prop_assert_eq!(
            params
                .iter()
                .filter(|q| q.split('=').next() == Some(name))
                .count(),
            1,
            "{} repeated in {}",
            name,
            answer
        );
    }
    prop_assert!(params.contains(&"server_no_context_takeover"), "{answer}");
    prop_assert!(params.contains(&"client_no_context_takeover"), "{answer}");
    prop_assert!(
        !answer.contains("client_max_window_bits"),
        "the server inflates any window: {answer}"
    );
    let bits = agreed.server_window_bits;
    prop_assert!((8..=15).contains(&bits), "{answer}");
    for p in &params[1..] {
        if let Some(v) = p.strip_prefix("server_max_window_bits=") {
            prop_assert_eq!(v.parse::<u8>().ok(), Some(bits), "{}", answer);
        } else {
            prop_assert!(p.ends_with("no_context_takeover"), "{answer}");
        }
    }
    // Payloads up to the window go compressed, longer ones plain.
    prop_assert!(agreed.fits(1 << bits) && !agreed.fits((1 << bits) + 1));
    Ok(())
}

/// The server's answer equals the model's, and keeps the contract.
fn check_negotiation(
    headers: &[&str],
    user_agent: Option<&str>,
    enabled: bool,
) -> Result<(), TestCaseError> {
    let n = negotiate(headers, user_agent, enabled);
    check_answer(&n)?;
    prop_assert_eq!(got(&n), model(headers, user_agent, enabled));
    Ok(())
}

// ---------------------------------------------------------------------------
// Generating offers.

/// `name` in random letter case.
fn cased(name: &'static str) -> impl Strategy<Value = String> {
    vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// Whitespace, mostly none or a space; now and then what only a wide trim
/// takes, or a line break.
fn ows() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => Just(""),
        6 => Just(" "),
        1 => Just("  "),
        1 => Just("\t"),
        1 => Just("\u{a0}"),
        1 => Just("\u{2028}"),
        1 => Just("\r\n "),
    ]
}

const PARAMS: [&str; 4] = [
    "server_no_context_takeover",
    "client_no_context_takeover",
    "server_max_window_bits",
    "client_max_window_bits",
];

fn extension_name() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => cased("permessage-deflate"),
        1 => Just("x-webkit-deflate-frame".to_string()),
        1 => Just("permessage_deflate".to_string()),
        1 => Just("permessage-deflate-x".to_string()),
        1 => Just("\"permessage-deflate\"".to_string()),
        1 => Just("permessage-déflate".to_string()),
        1 => Just(String::new()),
        1 => "[a-z-]{1,12}",
    ]
}

fn param_name() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (0..4usize).prop_flat_map(|i| cased(PARAMS[i])),
        1 => Just("mystery".to_string()),
        1 => Just(String::new()),
        1 => Just("server_max_window_bits\u{e9}".to_string()),
        1 => Just("ｓerver_max_window_bits".to_string()),
        1 => Just("server max window bits".to_string()),
        1 => "[a-z_]{1,16}",
    ]
}

fn param_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u32..=20).prop_map(|n| n.to_string()),
        3 => (0u32..=20).prop_map(|n| format!("\"{n}\"")),
        4 => prop_oneof![
            Just("08"), Just("015"), Just("+9"), Just("-10"), Just("1e1"), Just("9.0"),
            Just("0x0f"), Just("١٠"), Just("１０"), Just(""), Just("\"\""), Just("\""),
            Just("\"12"), Just("12\""), Just("\"1\"2\""), Just("\" 12 \""), Just("12 13"),
            Just("\"10, permessage-deflate\""), Just("\"9; x\""), Just("\\\"10\\\""),
        ]
        .prop_map(String::from),
        2 => "[ -~]{0,8}",
        1 => (0usize..3000).prop_map(|n| "9".repeat(n)),
        1 => any::<String>(),
    ]
}

/// One parameter: a name, maybe `=` and a value, whitespace around.
fn param() -> impl Strategy<Value = String> {
    (
        ows(),
        param_name(),
        proptest::option::weighted(0.5, (ows(), ows(), param_value())),
        ows(),
    )
        .prop_map(|(a, name, value, z)| match value {
            None => format!("{a}{name}{z}"),
            Some((b, c, v)) => format!("{a}{name}{b}={c}{v}{z}"),
        })
}

/// One offer: a name and parameters, `;` between (now and then doubled).
fn offer() -> impl Strategy<Value = String> {
    (
        extension_name(),
        vec(
            (param(), prop_oneof![8 => Just(";"), 1 => Just(";;")]),
            0..6,
        ),
        prop_oneof![8 => Just(""), 1 => Just(";")],
    )
        .prop_map(|(name, params, end)| {
            let mut s = name;
            for (p, sep) in params {
                s.push_str(sep);
                s.push_str(&p);
            }
            s.push_str(end);
            s
        })
}

/// A header line: offers separated by commas, with empty entries now and then.
fn line() -> impl Strategy<Value = String> {
    (
        vec(
            (
                offer(),
                prop_oneof![8 => Just(", "), 2 => Just(","), 1 => Just(" ,"), 1 => Just(",,"), 1 => Just(", ,")],
            ),
            0..4,
        ),
        prop_oneof![8 => Just(""), 1 => Just(","), 1 => Just(" , ")],
    )
        .prop_map(|(offers, lead)| {
            let mut s = lead.to_string();
            let n = offers.len();
            for (i, (o, sep)) in offers.into_iter().enumerate() {
                s.push_str(&o);
                if i + 1 < n {
                    s.push_str(sep);
                }
            }
            s
        })
}

/// Characters that matter to the grammar, names, and some that do not.
fn hostile_line() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop_oneof![
            Just(";"), Just(","), Just("="), Just("\""), Just(" "), Just("\t"), Just("\\"),
            Just("é"), Just("\u{a0}"), Just("\u{2028}"), Just("😀"), Just("\0"), Just("\u{7f}"),
        ].prop_map(String::from),
        3 => prop_oneof![
            Just("permessage-deflate"),
            Just(PARAMS[0]), Just(PARAMS[1]), Just(PARAMS[2]), Just(PARAMS[3]),
        ].prop_map(String::from),
        2 => (0u32..=20).prop_map(|n| n.to_string()),
        1 => "[a-z]{1,4}",
    ];
    prop_oneof![
        6 => vec(piece, 0..60).prop_map(|p| p.concat()),
        2 => any::<String>(),
        1 => (0usize..2000, prop_oneof![
            Just("permessage-deflate; client_max_window_bits, "),
            Just("permessage-deflate; server_max_window_bits=16,"),
            Just(","),
            Just(";"),
            Just("\""),
            Just("permessage-deflate;"),
        ]).prop_map(|(n, s)| s.repeat(n)),
        1 => (0usize..20_000).prop_map(|n| {
            format!("permessage-deflate{}", "; server_no_context_takeover".repeat(n))
        }),
        1 => (0usize..200_000).prop_map(|n| {
            format!("permessage-deflate; server_max_window_bits=\"{}\"", "1".repeat(n))
        }),
    ]
}

/// Safari on macOS or iOS, any version, sometimes with Chrome (or, on
/// iOS, Chrome's `CriOS`) in it.
fn safari_ua() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        13u32..=19,
        0u32..=12,
        proptest::option::of(0u32..=3),
        prop_oneof![
            4 => Just(""),
            1 => Just(" Chrome/120.0.0.0"),
            1 => Just(" Chromium/120.0"),
            1 => Just(" CriOS/96.0.4664.53"),
        ],
    )
        .prop_map(|(ios, major, minor, patch, chrome)| {
            let version = match patch {
                Some(p) => format!("{major}.{minor}.{p}"),
                None => format!("{major}.{minor}"),
            };
            if ios {
                format!(
                    "Mozilla/5.0 (iPhone; CPU iPhone OS {major}_{minor} like Mac OS X) \
                     AppleWebKit/605.1.15 (KHTML, like Gecko){chrome} Version/{version} \
                     Mobile/15E148 Safari/604.1"
                )
            } else {
                format!(
                    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 \
                     (KHTML, like Gecko){chrome} Version/{version} Safari/605.1.15"
                )
            }
        })
}

/// No User-Agent, a real one, a generated Safari, or anything (with at most
/// one `Version/`, as browsers send).
fn user_agent() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(None),
        2 => prop_oneof![
            Just("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"),
            Just("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"),
            Just("Python/3.11 websockets/17.4"),
            Just("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/15.2 Safari/605.1.15"),
        ].prop_map(|s| Some(s.to_string())),
        4 => safari_ua().prop_map(Some),
        1 => any::<String>().prop_map(Some),
    ]
}

fn enabled() -> impl Strategy<Value = bool> {
    prop_oneof![9 => Just(true), 1 => Just(false)]
}

/// A well-formed offer: some of the four parameters in any order, any
/// case, quoted or not, and the window it asks for.
fn good_offer() -> impl Strategy<Value = (String, Option<u8>)> {
    (
        Just((0..4usize).collect::<Vec<_>>()).prop_shuffle(),
        vec(any::<bool>(), 4),
        8u8..=15,
        proptest::option::of(8u8..=15),
        any::<bool>(),
        vec(ows(), 8),
        cased("permessage-deflate"),
    )
        .prop_flat_map(|(order, present, server, client, quote, ws, name)| {
            let parts: Vec<BoxedStrategy<String>> = order
                .iter()
                .filter(|&&i| present[i])
                .map(|&i| {
                    let value = match i {
                        2 => Some(server.to_string()),
                        3 => client.map(|c| c.to_string()),
                        _ => None,
                    };
                    let ws = ws.clone();
                    cased(PARAMS[i])
                        .prop_map(move |key| match &value {
                            Some(v) if quote => format!("{}{key}={}\"{v}\"", ws[0], ws[1]),
                            Some(v) => format!("{}{key}{}={v}{}", ws[2], ws[3], ws[4]),
                            None => format!("{}{key}{}", ws[5], ws[6]),
                        })
                        .boxed()
                })
                .collect();
            let window = present[2].then_some(server);
            (parts, Just(name), Just(window))
        })
        .prop_map(|(parts, name, window)| {
            let mut s = name;
            for p in parts {
                s.push(';');
                s.push_str(&p);
            }
            (s, window)
        })
}

/// An offer that must be declined, and why.
fn bad_offer() -> impl Strategy<Value = (String, Decline)> {
    let bad_window = prop_oneof![
        (0u32..8).prop_map(|n| n.to_string()),
        (16u32..=20).prop_map(|n| n.to_string()),
        prop_oneof![
            Just("08"),
            Just("010"),
            Just("+9"),
            Just("1e1"),
            Just("x"),
            Just("\"\""),
            Just("\"12"),
            Just("12\"x"),
            Just("١٢"),
            Just("999999999999999999999"),
        ]
        .prop_map(String::from),
    ];
    let malformed = prop_oneof![
        (bad_window.clone(), any::<bool>()).prop_map(|(v, server)| {
            let key = if server { "server" } else { "client" };
            format!("permessage-deflate; {key}_max_window_bits={v}")
        }),
        Just("permessage-deflate; server_max_window_bits".to_string()),
        Just("permessage-deflate; server_max_window_bits=".to_string()),
        (0..2usize, "[0-9a-z\"]{0,4}")
            .prop_map(|(i, v)| format!("permessage-deflate; {}={v}", PARAMS[i])),
        (0..4usize).prop_map(|i| {
            let p = if i >= 2 {
                format!("{}=10", PARAMS[i])
            } else {
                PARAMS[i].to_string()
            };
            format!("permessage-deflate; {p}; {p}")
        }),
        Just("permessage-deflate; client_max_window_bits; client_max_window_bits=12".to_string()),
        Just("permessage-deflate;".to_string()),
        Just("permessage-deflate; ; server_no_context_takeover".to_string()),
        Just("permessage-deflate; =10".to_string()),
        Just("permessage-deflate; server_no_context_takeover; mystery=\"".to_string()),
    ]
    .prop_map(|s| (s, Decline::Malformed));
    let unknown = prop_oneof![
        "[a-z][a-z_]{0,15}".prop_filter("a known parameter", |k| { !PARAMS.contains(&k.as_str()) }),
        Just("server_max_window".to_string()),
        Just("x-webkit-deflate-frame".to_string()),
    ]
    .prop_map(|k| {
        (
            format!("permessage-deflate; client_max_window_bits; {k}"),
            Decline::UnknownParameter,
        )
    });
    prop_oneof![3 => malformed, 1 => unknown]
}

// ---------------------------------------------------------------------------
// Judging the inflater.

/// What `Inflater::inflate(payload, max)` must give.
#[derive(Debug, PartialEq)]
enum Want {
    Ok(Vec<u8>),
    /// Past the limit; `or_corrupt` when the data is also invalid within
    /// `room` bytes of output, which the inflater may see first (it fills
    /// its buffer before it looks at the limit).
    TooBig {
        or_corrupt: bool,
    },
    Corrupt,
}

/// What inflating `payload` must give, limited to `max` bytes, into a
/// buffer that may hold `room` bytes.
fn want(payload: &[u8], max: usize, room: usize) -> Want {
    let mut data = payload.to_vec();
    data.extend_from_slice(&TAIL);
    match inflate::inflate(&data, max) {
        (out, inflate::Stop::Final | inflate::Stop::OutOfInput) => Want::Ok(out),
        (_, inflate::Stop::Error(_)) => Want::Corrupt,
        (_, inflate::Stop::Limit) => {
            let further = inflate::inflate(&data, room).1;
            Want::TooBig {
                or_corrupt: matches!(further, inflate::Stop::Error(_)),
            }
        }
    }
}

/// Inflates `payload` with `inflater` into `out` and checks the result
/// against the reference; returns it.
fn check_inflate(
    inflater: &mut Inflater,
    payload: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<Result<Vec<u8>, InflateError>, TestCaseError> {
    // Growth stops one step past the limit: a bomb costs at most twice it.
    let bound = out.capacity().max(2 * max + 2).max(8);
    let got = inflater.inflate(payload, max, out);
    match (&got, want(payload, max, bound)) {
        (Ok(()), Want::Ok(w)) => {
            prop_assert!(out.len() <= max, "{} bytes out, limit {max}", out.len());
            prop_assert!(*out == w, "inflated {:?}, want {:?}", short(out), short(&w));
        }
        (Err(InflateError::TooBig { max: m }), Want::TooBig { .. }) => prop_assert_eq!(*m, max),
        (Err(InflateError::Corrupt(why)), Want::Corrupt | Want::TooBig { or_corrupt: true }) => {
            prop_assert!(
                !why.is_empty() && why.len() <= 100 && fuzz_support::no_control(why),
                "{why:?}"
            );
        }
        (got, w) => prop_assert!(false, "inflate gave {got:?}, the reference {w:?}"),
    }
    prop_assert!(
        out.capacity() <= bound,
        "capacity {} > {bound}",
        out.capacity()
    );
    Ok(got.map(|()| out.clone()))
}

fn short(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(60)]).into_owned();
    format!("{} bytes: {s:?}", b.len())
}

// ---------------------------------------------------------------------------
// Generating compressed messages.

/// Payloads: bytes, text, repetitive text (compresses well), long runs.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..400),
        3 => any::<String>().prop_map(String::into_bytes),
        3 => (vec("[a-z \":{},]{1,12}", 1..8), 1usize..400)
            .prop_map(|(words, n)| words.concat().repeat(n).into_bytes()),
        1 => (any::<u8>(), 0usize..200_000).prop_map(|(b, n)| vec![b; n]),
        1 => (vec(any::<u8>(), 1..64), 1usize..3000).prop_map(|(b, n)| b.repeat(n)),
    ]
}

fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(MAX), 2 => 0usize..300, 2 => 300usize..100_000]
}

/// A sender's messages with its context kept across them (no reset: what
/// a client that ignores `client_no_context_takeover` sends), each
/// sync-flushed, the tail removed.
fn with_context(messages: &[Vec<u8>], level: u32) -> Vec<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    messages
        .iter()
        .map(|m| {
            let mut out = Vec::with_capacity(m.len() + 1024);
            let mut consumed = 0;
            loop {
                if out.capacity() - out.len() < 64 {
                    out.reserve(out.capacity());
                }
                let before = c.total_in();
                let status = c
                    .compress_vec(&m[consumed..], &mut out, FlushCompress::Sync)
                    .unwrap();
                consumed += (c.total_in() - before) as usize;
                if consumed == m.len() && out.ends_with(&TAIL) && out.len() < out.capacity() {
                    out.truncate(out.len() - 4);
                    break;
                }
                // An empty message right after a flush: zlib has nothing
                // to write, and the message is empty (as Python
                // `websockets` sends it).
                if consumed == m.len() && status == Status::BufError {
                    break;
                }
            }
            out
        })
        .collect()
}

/// Edits to a valid stream.
#[derive(Debug, Clone)]
enum Edit {
    Flip(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
    /// The tail put back (some senders forget to remove it), or doubled.
    AppendTail,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => any::<Index>().prop_map(Edit::Remove),
        2 => any::<Index>().prop_map(Edit::Truncate),
        1 => Just(Edit::AppendTail),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    match e {
        Edit::Flip(i, b) if !bytes.is_empty() => {
            let at = i.index(bytes.len());
            bytes[at] ^= b | 1;
        }
        Edit::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Edit::Remove(i) if !bytes.is_empty() => {
            bytes.remove(i.index(bytes.len()));
        }
        Edit::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
        Edit::AppendTail => bytes.extend_from_slice(&TAIL),
        Edit::Flip(..) | Edit::Remove(..) => {}
    }
}

/// Compressed messages: the server's own, or a sender's that keeps its
/// context, edited or not.
fn compressed() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(payload(), 1..3),
        1u32..=9,
        any::<bool>(),
        vec(edit(), 0..4),
    )
        .prop_map(|(payloads, level, context, edits)| {
            let mut z = if context {
                with_context(&payloads, level).pop().unwrap()
            } else {
                Deflater::new(level).compress(&payloads[0])
            };
            for e in &edits {
                apply(&mut z, e);
            }
            z
        })
}

/// Bytes shaped like DEFLATE block headers often enough to reach the
/// table-building code, and plain noise.
fn deflate_ish() -> impl Strategy<Value = Vec<u8>> {
    let first = prop_oneof![
        // BFINAL 0/1, BTYPE 2 (dynamic), then HLIT/HDIST/HCLEN and lengths.
        any::<u8>().prop_map(|b| (b & !0x07) | 0x04),
        any::<u8>().prop_map(|b| (b & !0x07) | 0x05),
        // BTYPE 1 (fixed).
        any::<u8>().prop_map(|b| (b & !0x06) | 0x02),
        // BTYPE 0 (stored), header then LEN/NLEN.
        any::<u16>().prop_map(|n| (n % 3) as u8),
    ];
    (first, vec(any::<u8>(), 0..200)).prop_map(|(b, rest)| {
        let mut v = vec![b];
        v.extend(rest);
        v
    })
}

// ---------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(fuzz_support::config(256))]

    #[test]
    fn generated_offers_negotiate_as_the_model_says(
        lines in vec(line(), 0..4),
        ua in user_agent(),
        enabled in enabled(),
    ) {
        let headers: Vec<&str> = lines.iter().map(String::as_str).collect();
        check_negotiation(&headers, ua.as_deref(), enabled)?;
    }

    #[test]
    fn hostile_offers_never_panic_and_keep_the_contract(
        lines in vec(prop_oneof![hostile_line(), line()], 0..4),
        ua in user_agent(),
        enabled in enabled(),
    ) {
        let headers: Vec<&str> = lines.iter().map(String::as_str).collect();
        check_negotiation(&headers, ua.as_deref(), enabled)?;
    }

    #[test]
    fn well_formed_offers_are_taken_with_their_window(
        (offer, window) in good_offer(),
        ua in safari_ua(),
    ) {
        let n = negotiate(&[&offer], None, true);
        check_answer(&n)?;
        let suffix = window.map_or(String::new(), |w| format!("; server_max_window_bits={w}"));
        prop_assert_eq!(n.agreed.map(|a| a.response()), Some(format!("{ANSWER}{suffix}")));
        prop_assert_eq!(n.agreed.map(|a| a.server_window_bits), Some(window.unwrap_or(15)));
        prop_assert!(n.declined.is_empty());
        // WebKit 15.0-15.3 is declined whatever it offers; any other version takes it.
        let n = negotiate(&[&offer], Some(&ua), true);
        if model_broken_client(&ua) {
            prop_assert_eq!((n.agreed, n.declined), (None, vec![Decline::BrokenClient]), "{}", ua);
        } else {
            prop_assert!(n.agreed.is_some() && n.declined.is_empty(), "{ua}");
        }
    }

    #[test]
    fn a_malformed_offer_is_declined_and_the_next_acceptable_one_taken(
        (bad, why) in bad_offer(),
        (good, window) in good_offer(),
        others in vec(prop_oneof![Just("x-webkit-deflate-frame"), Just("foo; bar=1")], 0..2),
        same_line in any::<bool>(),
    ) {
        // Other extensions around them are ignored; so are empty entries.
        // An open quote takes the rest of its line: then the good offer
        // goes on the next line.
        let same_line = same_line && bad.matches('"').count() % 2 == 0;
        let mut first = others.join(", ");
        first.push_str(", ");
        first.push_str(&bad);
        let lines = if same_line {
            vec![format!("{first}, , {good}")]
        } else {
            vec![first, good.clone()]
        };
        let headers: Vec<&str> = lines.iter().map(String::as_str).collect();
        let n = negotiate(&headers, None, true);
        check_answer(&n)?;
        prop_assert_eq!(&n.declined, &vec![why], "{:?}", headers);
        let suffix = window.map_or(String::new(), |w| format!("; server_max_window_bits={w}"));
        prop_assert_eq!(n.agreed.map(|a| a.response()), Some(format!("{ANSWER}{suffix}")));
        // Alone, it is declined and nothing is taken.
        let alone = negotiate(&[&bad], None, true);
        prop_assert_eq!((alone.agreed, alone.declined), (None, vec![why]), "{}", bad);
        check_negotiation(&headers, None, true)?;
    }

    #[test]
    fn any_bytes_inflate_like_the_reference_or_fail_cleanly(
        payload in prop_oneof![vec(any::<u8>(), 0..300), deflate_ish()],
        max in limit(),
    ) {
        let _ = check_inflate(&mut Inflater::default(), &payload, max, &mut Vec::new())?;
    }

    #[test]
    fn edited_compressed_messages_inflate_like_the_reference(
        payload in compressed(),
        max in limit(),
        reused in proptest::option::of(0usize..200_000),
    ) {
        // A fresh output buffer, or one left large by an earlier message.
        let mut out = reused.map_or_else(Vec::new, Vec::with_capacity);
        let _ = check_inflate(&mut Inflater::default(), &payload, max, &mut out)?;
    }

    #[test]
    fn deflate_then_inflate_gives_the_payload_back_at_every_level(
        payload in payload(),
        level in 1u32..=9,
    ) {
        let z = Deflater::new(level).compress(&payload);
        prop_assert!(!payload.is_empty() || z.len() <= 2, "{} bytes for nothing", z.len());
        let mut out = Vec::new();
        let got = check_inflate(&mut Inflater::default(), &z, payload.len(), &mut out)?;
        prop_assert!(got.as_deref() == Ok(&payload[..]), "{:?}", got.map(|o| short(&o)));
        // One byte less is too big; the reference decodes the same bytes.
        if !payload.is_empty() {
            let over = Inflater::default().inflate(&z, payload.len() - 1, &mut out);
            prop_assert_eq!(over, Err(InflateError::TooBig { max: payload.len() - 1 }));
        }
        prop_assert_eq!(want(&z, payload.len(), 0), Want::Ok(payload));
    }

    #[test]
    fn one_reset_per_message_makes_history_irrelevant(
        before in vec(prop_oneof![compressed(), vec(any::<u8>(), 0..100)], 0..4),
        payloads in vec(payload(), 2..4),
        level in 1u32..=9,
        max in limit(),
    ) {
        // One inflater for every message, as a shard has, against a fresh
        // one per message; the last messages come from a sender that keeps
        // its context, so they point into the ones before them.
        let mut shared = Inflater::default();
        let mut out = Vec::new();
        let mut messages = before;
        messages.extend(with_context(&payloads, level));
        for m in &messages {
            // The same buffer size: past the limit, how much the inflater
            // wrote before looking decides between too big and corrupt.
            let mut fresh_out = Vec::with_capacity(out.capacity());
            let fresh = Inflater::default()
                .inflate(m, max, &mut fresh_out)
                .map(|()| fresh_out);
            let got = check_inflate(&mut shared, m, max, &mut out)?;
            prop_assert_eq!(got, fresh);
        }
        // A message that repeats the one before it is not readable alone.
        let repeated = with_context(&[payloads[0].clone(), payloads[0].clone()], 6);
        if payloads[0].len() >= 16 {
            let alone = shared.inflate(&repeated[1], usize::MAX >> 1, &mut out);
            prop_assert!(matches!(alone, Err(InflateError::Corrupt(_))), "{alone:?}");
        }
        // And the deflater: the same bytes whatever it compressed before.
        let mut d = Deflater::new(level);
        let last = payloads.last().unwrap();
        for p in &payloads {
            d.compress(p);
        }
        prop_assert_eq!(d.compress(last), Deflater::new(level).compress(last));
    }

    #[test]
    fn invalid_data_after_valid_blocks_is_corrupt(
        prefix in payload(),
        level in 1u32..=9,
        bad in prop_oneof![
            // BTYPE 3.
            Just(vec![0x06, 0x00]),
            // A stored block whose NLEN is not ~LEN.
            Just(vec![0x00, 0x05, 0x00, 0x05, 0x00, b'x']),
            // Fixed block, length 3 at a distance of 32768 (code 29, extra
            // 8191): past the start of any message under that size.
            Just(vec![0x02, 0xde, 0xff, 0x0f]),
            // Dynamic block, 287 length codes.
            Just(vec![0xf4, 0x00, 0x00]),
        ],
    ) {
        prop_assume!(prefix.len() < 32_000);
        let mut z = Deflater::new(level).compress(&prefix);
        z.extend_from_slice(&TAIL);
        z.extend_from_slice(&bad);
        let got = check_inflate(&mut Inflater::default(), &z, MAX, &mut Vec::new())?;
        prop_assert!(matches!(got, Err(InflateError::Corrupt(_))), "{got:?}");
    }
}

proptest! {
    // Fewer cases: each compresses up to 500 KB (unoptimised in tests).
    #![proptest_config(fuzz_support::config(48))]

    #[test]
    fn bombs_stop_at_the_limit(
        byte in any::<u8>(),
        len in 1usize..500_000,
        max in 0usize..100_000,
        level in 1u32..=9,
    ) {
        let z = Deflater::new(level).compress(&vec![byte; len]);
        let mut out = Vec::new();
        let got = check_inflate(&mut Inflater::default(), &z, max, &mut out)?;
        if len > max {
            prop_assert_eq!(got, Err(InflateError::TooBig { max }));
        } else {
            prop_assert_eq!(got.map(|o| o.len()), Ok(len));
        }
    }
}

// ---------------------------------------------------------------------------
// The corpus.

/// The requests of real clients (captured by `capture_offers.py`, or
/// `*-style`, written after them by `make_deflate.py`) and the exact
/// answer each gets, or the reasons its offers are declined.
const CLIENTS: &[(&str, Option<&str>, &[Decline])] = &[
    ("ok-chromium.http", Some(ANSWER), &[]),
    ("ok-firefox-style.http", Some(ANSWER), &[]),
    ("ok-node-ws-default.http", Some(ANSWER), &[]),
    (
        "ok-node-ws-server-window-15.http",
        Some(concat!(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "; server_max_window_bits=15"
        )),
        &[],
    ),
    (
        "ok-node-ws-all-options.http",
        Some(concat!(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "; server_max_window_bits=10"
        )),
        &[],
    ),
    ("ok-python-websockets-default.http", Some(ANSWER), &[]),
    (
        "ok-python-websockets-server-window-15.http",
        Some(concat!(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "; server_max_window_bits=15"
        )),
        &[],
    ),
    (
        "ok-python-websockets-all-options.http",
        Some(concat!(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "; server_max_window_bits=10"
        )),
        &[],
    ),
    ("ok-safari-15.4-macos-style.http", Some(ANSWER), &[]),
    ("ok-safari-17.4-macos-style.http", Some(ANSWER), &[]),
    ("ok-safari-17.4-ios-style.http", Some(ANSWER), &[]),
    (
        "declined-safari-15.0-macos-style.http",
        None,
        &[Decline::BrokenClient],
    ),
    (
        "declined-safari-15.1-macos-style.http",
        None,
        &[Decline::BrokenClient],
    ),
    (
        "declined-safari-15.2-macos-style.http",
        None,
        &[Decline::BrokenClient],
    ),
    (
        "declined-safari-15.3-macos-style.http",
        None,
        &[Decline::BrokenClient],
    ),
    (
        "declined-safari-15.2-ios-style.http",
        None,
        &[Decline::BrokenClient],
    ),
    (
        "ok-bad-offer-then-a-good-one.http",
        Some(ANSWER),
        &[Decline::Malformed],
    ),
    (
        "declined-unknown-parameter.http",
        None,
        &[Decline::UnknownParameter],
    ),
    ("plain-no-offer.http", None, &[]),
];

/// Each real client's offer, parsed from its whole request as the server
/// does, gets exactly the answer listed.
#[test]
fn real_clients_get_exact_answers() {
    let corpus = fuzz_support::corpus("deflate");
    for (file, answer, declined) in CLIENTS {
        let seed = corpus
            .iter()
            .find(|s| s.name == *file)
            .unwrap_or_else(|| panic!("{file} is not in tests/corpus/deflate"));
        let (req, _) = parse_request(&seed.bytes, 8192).unwrap().unwrap();
        let offers: Vec<&str> = req.extensions.iter().map(String::as_str).collect();
        let n = negotiate(&offers, req.user_agent.as_deref(), true);
        assert_eq!(n.agreed.map(|a| a.response()).as_deref(), *answer, "{file}");
        assert_eq!(&n.declined, declined, "{file}");
    }
}

/// Replays `tests/corpus/deflate`: `.http` requests through
/// `parse_request` and `negotiate` (`ok-*` takes an offer, `declined-*`
/// declines every offer, `plain-*` has none), equal to the model, and with
/// compression off every offer declined as `disabled`; `.bin` messages
/// through an `Inflater` with a 64 KiB limit (`ok-*`, `1009-*`, `1007-*`),
/// equal to the reference, twice with the same inflater.
#[test]
fn corpus_replays() {
    let mut inflater = Inflater::default();
    let mut out = Vec::new();
    for seed in fuzz_support::corpus("deflate") {
        let name = &seed.name;
        if name.ends_with(".http") {
            let (req, _) = parse_request(&seed.bytes, 8192)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name}: incomplete request"));
            let offers: Vec<&str> = req.extensions.iter().map(String::as_str).collect();
            let ua = req.user_agent.as_deref();
            let n = negotiate(&offers, ua, true);
            check_negotiation(&offers, ua, true).unwrap_or_else(|e| panic!("{name}: {e}"));
            match (seed.class(), &n.agreed) {
                ("ok", Some(_)) => {}
                ("declined", None) if !n.declined.is_empty() => {}
                ("plain", None) if n.declined.is_empty() => {}
                (class, _) => panic!("{name}: expected {class}, got {n:?}"),
            }
            let off = negotiate(&offers, ua, false);
            assert!(off.agreed.is_none(), "{name}");
            assert!(
                off.declined.iter().all(|d| *d == Decline::Disabled),
                "{name}"
            );
            check_negotiation(&offers, ua, false).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            let mut first = None;
            for _ in 0..2 {
                let got = check_inflate(&mut inflater, &seed.bytes, MAX, &mut out)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let class = match &got {
                    Ok(_) => "ok",
                    Err(InflateError::TooBig { .. }) => "1009",
                    Err(InflateError::Corrupt(_)) => "1007",
                };
                assert_eq!(seed.class(), class, "{name}: {got:?}");
                assert!(first.is_none_or(|f| f == got), "{name}: not the same twice");
                first = Some(got);
            }
        }
    }
}
