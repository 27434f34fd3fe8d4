//! Fuzzing the upgrade parser, `ringcast::ws::handshake::parse_request`:
//! generated valid requests must parse to exactly what was generated, and
//! any bytes at all (random, or a valid request with flipped bytes, cut
//! short, duplicated or huge headers, non-UTF-8, injected line breaks) must
//! give a well-formed answer: never a panic, never "need more" once the
//! limit is reached, a consumed length inside the buffer that ends the
//! head, the same answer however the bytes arrive, and errors that are
//! 400/426/431 with a short single-line text. Replays `tests/corpus/handshake`.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast::ws::handshake::{error_response, parse_request, HandshakeError, UpgradeRequest};

/// The server's default `max_handshake_size`.
const MAX: usize = 8192;

/// Longest `Display` of a parse error: the longest fixed text plus a
/// client value cut to `ECHO_MAX` (64) bytes, which `Debug` escaping can
/// grow to 3x (`\u{80}` for a 2-byte C1 control) plus quotes.
const ERROR_TEXT_MAX: usize = 40 + 3 * 64 + 2;

type Parsed = Result<Option<(UpgradeRequest, usize)>, HandshakeError>;

// ---------------------------------------------------------------------------
// Generating valid requests.

/// A request built from parts, with the [`UpgradeRequest`] it must parse to.
#[derive(Clone)]
struct Built {
    bytes: Vec<u8>,
    want: UpgradeRequest,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.bytes))
    }
}

/// What a generated header line contributes to the expected request.
#[derive(Debug, Clone)]
enum Line {
    Protocols(Vec<String>),
    Extension(String),
    Other,
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A header name in random letter case.
fn cased(name: &'static str) -> impl Strategy<Value = String> {
    vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| {
                if u {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

/// Optional whitespace around a header value (HTTP OWS).
fn ows() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just(" "), Just("  "), Just("\t"), Just(" \t")]
}

fn header(
    name: &'static str,
    value: impl Strategy<Value = String> + 'static,
    line: Line,
) -> BoxedStrategy<(Line, String)> {
    (cased(name), ows(), value, ows())
        .prop_map(move |(n, before, v, after)| (line.clone(), format!("{n}:{before}{v}{after}")))
        .boxed()
}

/// A comma-separated list holding `token` among others, in any order.
fn token_list(token: &'static str) -> impl Strategy<Value = String> {
    (
        vec("[a-zA-Z0-9-]{1,12}", 0..3),
        any::<Index>(),
        prop_oneof![Just(","), Just(", "), Just(" ,  ")],
    )
        .prop_map(move |(mut others, at, sep)| {
            let i = at.index(others.len() + 1);
            others.insert(i, token.to_string());
            others.join(sep)
        })
}

/// Visible ASCII for free-text header values (no leading/trailing space).
fn visible(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[!-~]([ -~]{{0,{max}}}[!-~])?")).unwrap()
}

prop_compose! {
    fn valid_request()(
        path in "/[a-zA-Z0-9._~/-]{0,40}",
        query in proptest::option::of("[a-zA-Z0-9=&%._~?/-]{0,60}"),
        key in any::<[u8; 16]>(),
        origin in proptest::option::of("https?://[a-z0-9.-]{1,20}(:[0-9]{1,5})?"),
        protocol_lines in vec(vec("[a-zA-Z0-9.!#$%&'*+^_`|~-]{1,16}", 0..4), 0..3),
        extension_lines in vec("permessage-deflate(; [a-z_]{1,24}(=[0-9]{1,2})?){0,2}", 0..3),
        fillers in vec(("X-[A-Za-z0-9]{1,16}", visible(60)), 0..6),
        upgrade in token_list("websocket"),
        connection in token_list("Upgrade"),
        upper_ws in any::<bool>(),
        lf_only in any::<bool>(),
        minor in Just(1u8),
        host in proptest::option::of("[a-z0-9.-]{1,20}:[0-9]{1,5}"),
    )(
        lines in {
            let key = base64(&key);
            let upgrade = if upper_ws {
                upgrade.replace("websocket", "WebSocket")
            } else {
                upgrade.clone()
            };
            let mut lines: Vec<BoxedStrategy<(Line, String)>> = vec![
                header("Upgrade", Just(upgrade), Line::Other),
                header("Connection", Just(connection.clone()), Line::Other),
                header("Sec-WebSocket-Key", Just(key.clone()), Line::Other),
                header("Sec-WebSocket-Version", Just("13".to_string()), Line::Other),
            ];
            if let Some(o) = &origin {
                lines.push(header("Origin", Just(o.clone()), Line::Other));
            }
            if let Some(h) = &host {
                lines.push(header("Host", Just(h.clone()), Line::Other));
            }
            for tokens in &protocol_lines {
                let line = Line::Protocols(tokens.clone());
                lines.push(header("Sec-WebSocket-Protocol", Just(tokens.join(", ")), line));
            }
            for ext in &extension_lines {
                let line = Line::Extension(ext.clone());
                lines.push(header("Sec-WebSocket-Extensions", Just(ext.clone()), line));
            }
            for (name, value) in &fillers {
                lines.push(Just((Line::Other, format!("{name}: {value}"))).boxed());
            }
            lines.prop_shuffle()
        },
        path in Just(path),
        query in Just(query),
        key in Just(base64(&key)),
        origin in Just(origin),
        lf_only in Just(lf_only),
        minor in Just(minor),
    ) -> Built {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut text = format!("GET {target} HTTP/1.{minor}{eol}");
        let (mut protocols, mut extensions) = (Vec::new(), Vec::new());
        for (kind, line) in lines {
            text.push_str(&line);
            text.push_str(eol);
            match kind {
                Line::Protocols(tokens) => protocols.extend(tokens),
                Line::Extension(ext) => extensions.push(ext),
                Line::Other => {}
            }
        }
        text.push_str(eol);
        Built {
            bytes: text.into_bytes(),
            want: UpgradeRequest {
                path,
                query,
                key,
                origin,
                protocols,
                extensions,
                // The fillers are `X-` headers with no hyphen after it: no
                // User-Agent, no X-Forwarded-For.
                user_agent: None,
                forwarded_for: Vec::new(),
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Mutating requests.

#[derive(Debug, Clone)]
enum Mutation {
    /// Set the byte at an index to a value.
    Flip(Index, u8),
    /// Keep only a prefix.
    Truncate(Index),
    /// Repeat one line of the head.
    DuplicateLine(Index),
    /// Insert a header line with a value of `len` copies of `fill`.
    Huge(Index, usize, u8),
    /// Insert bytes (line breaks, NUL, high bytes) at an index.
    Insert(Index, Vec<u8>),
    /// Insert `n` short header lines.
    ManyHeaders(Index, usize),
    /// Replace a byte by one that is not UTF-8 on its own.
    NonUtf8(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let injected = prop_oneof![
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n\r\n".to_vec()),
        Just(b"\r\nX-Injected: 1".to_vec()),
        Just(b"\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==".to_vec()),
        Just(b"\r\n Sec-WebSocket-Version: 8".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"\x7f".to_vec()),
        Just(b"\xc2\x85".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just(b":".to_vec()),
        Just(b" ".to_vec()),
        Just(b",".to_vec()),
        vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        2 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (
            any::<Index>(),
            0..2 * MAX,
            prop_oneof![Just(b'a'), Just(b'\t'), Just(0x80u8), any::<u8>()],
        )
            .prop_map(|(i, n, f)| Mutation::Huge(i, n, f)),
        3 => (any::<Index>(), injected).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1..100usize).prop_map(|(i, n)| Mutation::ManyHeaders(i, n)),
        2 => (any::<Index>(), 0x80u8..=0xFF).prop_map(|(i, b)| Mutation::NonUtf8(i, b)),
    ]
}

/// Offsets just after each `\n` in `bytes` (line starts), never 0.
fn line_starts(bytes: &[u8]) -> Vec<usize> {
    bytes
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .collect()
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let pos = |i: &Index, len: usize| i.index(len + 1);
    match m {
        Mutation::Flip(i, b) if !bytes.is_empty() => {
            let at = i.index(bytes.len());
            bytes[at] = *b;
        }
        Mutation::NonUtf8(i, b) if !bytes.is_empty() => {
            let at = i.index(bytes.len());
            bytes[at] = *b;
        }
        Mutation::Flip(..) | Mutation::NonUtf8(..) => {}
        Mutation::Truncate(i) => bytes.truncate(pos(i, bytes.len())),
        Mutation::DuplicateLine(i) => {
            let starts = line_starts(bytes);
            if starts.len() >= 2 {
                let k = i.index(starts.len() - 1);
                let line = bytes[starts[k]..starts[k + 1]].to_vec();
                let at = starts[k + 1];
                bytes.splice(at..at, line);
            }
        }
        Mutation::Huge(i, n, fill) => {
            let at = line_starts(bytes).get(i.index(3)).copied().unwrap_or(0);
            let mut line = b"X-Huge: ".to_vec();
            line.extend(std::iter::repeat_n(*fill, *n));
            line.extend_from_slice(b"\r\n");
            bytes.splice(at..at, line);
        }
        Mutation::Insert(i, ins) => {
            let at = pos(i, bytes.len());
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::ManyHeaders(i, n) => {
            let starts = line_starts(bytes);
            let at = starts
                .get(i.index(starts.len().max(1)))
                .copied()
                .unwrap_or(0);
            let lines: Vec<u8> = (0..*n)
                .flat_map(|k| format!("X-N{k}: v\r\n").into_bytes())
                .collect();
            bytes.splice(at..at, lines);
        }
    }
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (valid_request(), vec(mutation(), 1..4)).prop_map(|(built, ms)| {
        let mut bytes = built.bytes;
        for m in &ms {
            apply(&mut bytes, m);
        }
        bytes
    })
}

/// Bytes that look like an HTTP head often enough to get past the request line.
fn http_ish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(&b"GET / HTTP/1.1\r\n"[..]),
        Just(&b"GET"[..]),
        Just(&b" "[..]),
        Just(&b"\r\n"[..]),
        Just(&b"\n"[..]),
        Just(&b":"[..]),
        Just(&b"Upgrade: websocket\r\n"[..]),
        Just(&b"Connection: upgrade\r\n"[..]),
        Just(&b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"[..]),
        Just(&b"Sec-WebSocket-Version: 13\r\n"[..]),
        Just(&b"Sec-WebSocket-Protocol: a,b\r\n"[..]),
        Just(&b"Origin: \xff\r\n"[..]),
        Just(&b"HTTP/1.0"[..]),
        Just(&b"x"[..]),
        Just(&b"\t"[..]),
        Just(&b"\0"[..]),
    ];
    vec(piece, 0..40).prop_map(|ps| ps.concat())
}

// ---------------------------------------------------------------------------
// Properties.

/// Everything that must hold for any input, given the parse result.
fn check_answer(buf: &[u8], max: usize, got: &Parsed) -> Result<(), TestCaseError> {
    match got {
        Ok(None) => prop_assert!(
            buf.len() < max,
            "need-more with {} bytes buffered, limit {max}: the connection would read forever",
            buf.len()
        ),
        Ok(Some((req, used))) => {
            let used = *used;
            prop_assert!(used <= buf.len() && used <= max, "used {used}");
            prop_assert!(
                used >= 2 && buf[used - 1] == b'\n',
                "head must end at {used}"
            );
            // The head alone parses the same; one byte less is incomplete.
            prop_assert_eq!(&parse_request(&buf[..used], max), got);
            prop_assert_eq!(parse_request(&buf[..used - 1], max), Ok(None));
            prop_assert_eq!(req.key.len(), 24);
            prop_assert!(req.path.len() + req.query.as_ref().map_or(0, |q| q.len() + 1) < used);
        }
        Err(e) => {
            let status = e.status();
            prop_assert!(
                matches!(status, 400 | 426 | 431),
                "status {status} from the parser: {e:?}"
            );
            let text = e.to_string();
            prop_assert!(fuzz_support::no_control(&text), "control char in {text:?}");
            prop_assert!(
                text.len() <= ERROR_TEXT_MAX,
                "{} bytes of error text: {text:?}",
                text.len()
            );
            // The HTTP answer: a head, then exactly the one-line body it announces.
            let response = String::from_utf8(error_response(e)).unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            let announced = format!("\r\nContent-Length: {}\r\n", body.len());
            prop_assert!(head.contains(&announced), "{response:?}");
            prop_assert!(
                body.ends_with('\n') && body.lines().count() == 1,
                "{body:?}"
            );
            let status_line = format!("HTTP/1.1 {status} ");
            prop_assert!(head.starts_with(&status_line), "{head:?}");
        }
    }
    Ok(())
}

/// The answer on every prefix is "need more" or the answer on the whole:
/// the first decision made while the bytes trickle in is final. Checks at
/// most ~80 prefix lengths: spread out, the last few, and those at the limit.
fn check_prefixes(buf: &[u8], max: usize, whole: &Parsed) -> Result<(), TestCaseError> {
    let step = (buf.len() / 64).max(1);
    let ends = (0..buf.len())
        .step_by(step)
        .chain(buf.len().saturating_sub(16)..buf.len())
        .chain([max.saturating_sub(1), max])
        .filter(|&end| end <= buf.len());
    for end in ends {
        let part = parse_request(&buf[..end], max);
        check_answer(&buf[..end], max, &part)?;
        if part != Ok(None) {
            prop_assert_eq!(&part, whole, "prefix of {} bytes decided early", end);
        }
    }
    Ok(())
}

fn limits() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => Just(MAX),
        1 => 0..64usize,
        1 => 64..4 * MAX,
    ]
}

proptest! {
    #![proptest_config(fuzz_support::config(256))]

    #[test]
    fn valid_requests_parse_to_their_parts(
        built in valid_request(),
        trailing in vec(any::<u8>(), 0..16),
    ) {
        let mut buf = built.bytes.clone();
        buf.extend_from_slice(&trailing);
        let got = parse_request(&buf, MAX);
        prop_assert_eq!(&got, &Ok(Some((built.want.clone(), built.bytes.len()))));
        check_answer(&buf, MAX, &got)?;
        // Every strict prefix of the head needs more; the head alone is enough.
        for end in 0..built.bytes.len() {
            prop_assert_eq!(parse_request(&buf[..end], MAX), Ok(None), "prefix {}", end);
        }
        // A limit of exactly the head's length still admits it; one less does not.
        let n = built.bytes.len();
        prop_assert_eq!(parse_request(&built.bytes, n), got);
        prop_assert_eq!(
            parse_request(&built.bytes, n - 1),
            Err(HandshakeError::HeadTooLarge { max: n - 1 })
        );
    }

    #[test]
    fn mutated_requests_get_a_well_formed_answer(buf in mutated(), max in limits()) {
        let got = parse_request(&buf, max);
        check_answer(&buf, max, &got)?;
        check_prefixes(&buf, max, &got)?;
    }

    #[test]
    fn random_bytes_get_a_well_formed_answer(
        buf in prop_oneof![vec(any::<u8>(), 0..600), http_ish()],
        max in limits(),
    ) {
        let got = parse_request(&buf, max);
        check_answer(&buf, max, &got)?;
        check_prefixes(&buf, max, &got)?;
    }

    #[test]
    fn huge_values_are_431_not_buffered(
        built in valid_request(),
        extra in MAX..4 * MAX,
        cut in any::<Index>(),
    ) {
        // A header too long for the limit, and the bytes arriving cut anywhere.
        let mut buf = built.bytes;
        let at = buf.len() - 2;
        let mut line = b"X-Pad: ".to_vec();
        line.resize(extra, b'p');
        line.extend_from_slice(b"\r\n");
        buf.splice(at..at, line);
        let end = MAX + cut.index(buf.len() - MAX + 1);
        prop_assert_eq!(
            parse_request(&buf[..end], MAX),
            Err(HandshakeError::HeadTooLarge { max: MAX })
        );
    }
}

// ---------------------------------------------------------------------------
// The corpus.

/// Replays `tests/corpus/handshake`: `ok-*` parses and consumes a head,
/// `partial-*` needs more, `400-*`/`426-*`/`431-*` are refused with that status.
#[test]
fn corpus_replays() {
    for seed in fuzz_support::corpus("handshake") {
        let got = parse_request(&seed.bytes, MAX);
        let name = &seed.name;
        check_answer(&seed.bytes, MAX, &got).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_prefixes(&seed.bytes, MAX, &got).unwrap_or_else(|e| panic!("{name}: {e}"));
        match (seed.class(), &got) {
            ("ok", Ok(Some(_))) | ("partial", Ok(None)) => {}
            (status @ ("400" | "426" | "431"), Err(e)) if e.status().to_string() == status => {}
            (class, _) => panic!("{name}: expected {class}, got {got:?}"),
        }
    }
}
