//! permessage-deflate (RFC 7692) without IO: the negotiation of the
//! `Sec-WebSocket-Extensions` offer, and the two codecs a shard keeps (one
//! of each per shard, never one per connection).
//!
//! The server always answers `server_no_context_takeover` and
//! `client_no_context_takeover`: every message is compressed and inflated
//! on its own, from an empty window, so one [`Deflater`] reset per message
//! gives byte-identical output for every subscriber and every shard, and
//! one [`Inflater`] reset per message serves every connection of a shard.
//! It never answers `client_max_window_bits` (our inflater takes any
//! window), so never a value below 9. A client that limits
//! `server_max_window_bits` to N gets a compressed frame only for payloads
//! of at most 2^N bytes, where no back-reference can reach further.
//!
//! A malformed or unsupported offer is declined, not refused: the next offer
//! is tried, and with none left the upgrade goes on uncompressed; each
//! declined offer has a reason for the metrics.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name (RFC 7692 §7).
pub const EXTENSION: &str = "permessage-deflate";
/// The tail a sync flush ends with, removed from every message (RFC 7692
/// §7.2.1) and put back before inflating (§7.2.2).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Why an offer was not taken: the `reason` label of
/// `ringcast_deflate_declined_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decline {
    /// `--compression false`.
    Disabled,
    /// Not the grammar of RFC 6455 §9.1 / RFC 7692 §7.1 (a bad or repeated
    /// parameter, a value where none belongs, a window out of 8..=15).
    Malformed,
    /// A parameter this server does not know.
    UnknownParameter,
    /// A client known to break `no_context_takeover` (Safari 15.0-15.3).
    BrokenClient,
}

impl Decline {
    /// Every reason, for the metrics.
    pub const ALL: [Decline; 4] = [
        Decline::Disabled,
        Decline::Malformed,
        Decline::UnknownParameter,
        Decline::BrokenClient,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Decline::Disabled => "disabled",
            Decline::Malformed => "malformed",
            Decline::UnknownParameter => "unknown_parameter",
            Decline::BrokenClient => "broken_client",
        }
    }
}

/// What was agreed with a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The largest window the client takes for our messages (its
    /// `server_max_window_bits`, else 15).
    pub server_window_bits: u8,
    /// Whether the offer named `server_max_window_bits`: the answer must
    /// then carry it, even at 15 (RFC 7692 §7.1.2.1; Python `websockets`
    /// fails the handshake without it).
    pub server_window_offered: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` answer.
    pub fn response(&self) -> String {
        let mut s = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
        if self.server_window_offered || self.server_window_bits < 15 {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        s
    }

    /// Whether a compressed payload of `len` uncompressed bytes is valid
    /// for this client: only its window limits it.
    pub fn fits(&self, len: usize) -> bool {
        len <= 1 << self.server_window_bits
    }
}

/// The outcome of a negotiation: what was agreed (if anything), and why
/// each offer before it was declined.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Negotiation {
    /// The offer taken.
    pub agreed: Option<Agreed>,
    /// The offers declined, in order.
    pub declined: Vec<Decline>,
}

/// Negotiates over the request's `Sec-WebSocket-Extensions` values (each
/// header line as sent; several lines are one list). Extensions other than
/// permessage-deflate are ignored.
pub fn negotiate(headers: &[&str], user_agent: Option<&str>, enabled: bool) -> Negotiation {
    let mut out = Negotiation::default();
    for ext in headers.iter().flat_map(|h| split_unquoted(h, ',')) {
        let mut parts = split_unquoted(ext, ';').into_iter();
        let name = parts.next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case(EXTENSION) {
            continue;
        }
        if !enabled {
            out.declined.push(Decline::Disabled);
            continue;
        }
        if user_agent.is_some_and(broken_safari) {
            out.declined.push(Decline::BrokenClient);
            continue;
        }
        match parse_params(parts) {
            Ok(agreed) => {
                out.agreed = Some(agreed);
                return out;
            }
            Err(why) => out.declined.push(why),
        }
    }
    out
}

/// The parameters of one offer, checked (RFC 7692 §7.1).
fn parse_params<'a>(params: impl Iterator<Item = &'a str>) -> Result<Agreed, Decline> {
    let mut seen = [false; 4];
    let mut server_window_bits = 15;
    let mut server_window_offered = false;
    for p in params {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (p.trim(), None),
        };
        let slot = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" if value.is_some() => {
                return Err(Decline::Malformed)
            }
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => {
                server_window_bits = window_bits(value.ok_or(Decline::Malformed)?)?;
                server_window_offered = true;
                2
            }
            "client_max_window_bits" => {
                // Optional value; our inflater takes any window, so only
                // its validity matters.
                if let Some(v) = value {
                    window_bits(v)?;
                }
                3
            }
            "" => return Err(Decline::Malformed),
            _ => return Err(Decline::UnknownParameter),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(Decline::Malformed);
        }
    }
    Ok(Agreed {
        server_window_bits,
        server_window_offered,
    })
}

/// A window size: 1*DIGIT in 8..=15, no leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Result<u8, Decline> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Decline::Malformed);
    }
    match v.parse::<u8>() {
        Ok(n @ 8..=15) => Ok(n),
        _ => Err(Decline::Malformed),
    }
}

/// A token or a quoted-string's content (RFC 6455 §9.1 allows both).
fn unquote(v: &str) -> Result<&str, Decline> {
    match v.strip_prefix('"') {
        None if !v.is_empty() => Ok(v),
        None => Err(Decline::Malformed),
        Some(rest) => rest.strip_suffix('"').ok_or(Decline::Malformed),
    }
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// WebKit 15.0 to 15.3 offers the extension and then mishandles
/// `no_context_takeover`: decline it by its User-Agent. That is Safari
/// 15.0-15.3 on macOS (`Version/15.x`), and on iOS and iPadOS 15.0-15.3
/// every browser, since all of them run the system's WebKit (Chrome's
/// `CriOS`, Firefox's `FxiOS`, ... carry no `Version/`, only the OS's).
fn broken_safari(ua: &str) -> bool {
    let webkit = ua.contains("AppleWebKit/");
    let safari = ua.contains("Safari/") && !ua.contains("Chrome/") && !ua.contains("Chromium/");
    let ios = webkit && ["iPhone", "iPad", "iPod"].iter().any(|d| ua.contains(d));
    let minor = ["0", "1", "2", "3"];
    (safari
        && minor
            .iter()
            .any(|m| version_is(ua, &format!("Version/15.{m}"))))
        || (ios && minor.iter().any(|m| version_is(ua, &format!(" OS 15_{m}"))))
}

/// Whether `ua` holds `v` not followed by another digit (`15.1` is not `15.10`).
fn version_is(ua: &str, v: &str) -> bool {
    ua.match_indices(v)
        .any(|(i, _)| !ua[i + v.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// One shard's compressor: raw deflate at a fixed level, reset for every
/// message, so the same payload always gives the same bytes.
#[derive(Debug)]
pub struct Deflater {
    c: Compress,
}

impl Deflater {
    /// A compressor at `level` (1 fastest .. 9 smallest).
    pub fn new(level: u32) -> Self {
        Self {
            c: Compress::new(Compression::new(level.clamp(1, 9)), false),
        }
    }

    /// The compressed payload of one message, the sync flush's tail
    /// removed.
    pub fn compress(&mut self, input: &[u8]) -> Vec<u8> {
        self.c.reset();
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(1024));
            }
            let before = self.c.total_in();
            // In-memory deflate has no failure mode but a full buffer,
            // which the loop handles by growing it.
            let _ = self
                .c
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync);
            consumed += (self.c.total_in() - before) as usize;
            if consumed == input.len() && out.ends_with(&TAIL) && out.len() < out.capacity() {
                break;
            }
        }
        out.truncate(out.len() - TAIL.len());
        out
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The output passed the message limit (close 1009).
    #[error("inflated message over {max} bytes")]
    TooBig {
        /// The limit (`--max-message-size`).
        max: usize,
    },
    /// Not a valid deflate stream (close 1007).
    #[error("invalid compressed data: {0}")]
    Corrupt(String),
}

/// One shard's decompressor, reset for every message.
#[derive(Debug)]
pub struct Inflater {
    d: Decompress,
}

impl Default for Inflater {
    fn default() -> Self {
        Self {
            d: Decompress::new(false),
        }
    }
}

impl Inflater {
    /// Inflates one message's payload into `out` (cleared first), never
    /// writing more than `max` bytes: past it, [`InflateError::TooBig`].
    pub fn inflate(
        &mut self,
        input: &[u8],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        self.d.reset(false);
        out.clear();
        for chunk in [input, &TAIL[..]] {
            let mut consumed = 0;
            while consumed < chunk.len() {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(InflateError::TooBig { max });
                    }
                    // Grow in steps, one byte past the limit at most, so
                    // a bomb is caught before it allocates more.
                    let room = (out.capacity().max(4096)).min(max + 1 - out.len().min(max));
                    out.reserve(room.max(1));
                }
                let before = self.d.total_in();
                let status = self
                    .d
                    .decompress_vec(&chunk[consumed..], out, FlushDecompress::Sync)
                    .map_err(|e| InflateError::Corrupt(e.to_string()))?;
                consumed += (self.d.total_in() - before) as usize;
                if out.len() > max {
                    return Err(InflateError::TooBig { max });
                }
                if status == Status::StreamEnd {
                    break;
                }
                if status == Status::BufError && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt("truncated or stuck stream".into()));
                }
            }
        }
        // Output may still be pending after all input (a full buffer).
        loop {
            if out.len() > max {
                return Err(InflateError::TooBig { max });
            }
            if out.len() < out.capacity() {
                break;
            }
            out.reserve(4096.min(max + 1 - out.len().min(max)).max(1));
            let before = out.len();
            self.d
                .decompress_vec(&[], out, FlushDecompress::Sync)
                .map_err(|e| InflateError::Corrupt(e.to_string()))?;
            if out.len() == before {
                break;
            }
        }
        if out.len() > max {
            return Err(InflateError::TooBig { max });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(offers: &[&str]) -> Negotiation {
        negotiate(offers, None, true)
    }

    #[test]
    fn browsers_offers_are_taken_with_both_no_context_takeovers() {
        // Chromium and Firefox send these.
        for offer in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate",
            "PerMessage-Deflate ; Client_Max_Window_Bits=15",
        ] {
            let n = agreed(&[offer]);
            let a = n.agreed.unwrap_or_else(|| panic!("{offer}: {n:?}"));
            assert_eq!(a.server_window_bits, 15);
            assert_eq!(
                a.response(),
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
            );
        }
    }

    #[test]
    fn a_small_server_window_is_honoured_by_size() {
        let a = agreed(&["permessage-deflate; server_max_window_bits=10"])
            .agreed
            .unwrap();
        assert_eq!(a.server_window_bits, 10);
        assert!(a.response().ends_with("; server_max_window_bits=10"));
        assert!(a.fits(1024) && !a.fits(1025));
    }

    #[test]
    fn an_offered_server_window_is_always_answered_even_at_15() {
        // RFC 7692 §7.1.2.1: the server accepts the parameter by answering
        // it; Python `websockets` refuses an answer that leaves it out.
        for (offer, answer) in [
            ("permessage-deflate; server_max_window_bits=15", Some(15)),
            (
                "permessage-deflate; server_max_window_bits=\"15\"",
                Some(15),
            ),
            ("permessage-deflate; server_max_window_bits=9", Some(9)),
            ("permessage-deflate", None),
        ] {
            let a = agreed(&[offer]).agreed.unwrap();
            let want = answer.map_or(String::new(), |n| format!("; server_max_window_bits={n}"));
            assert_eq!(
                a.response(),
                format!(
                    "{EXTENSION}; server_no_context_takeover; client_no_context_takeover{want}"
                ),
                "{offer}"
            );
        }
    }

    #[test]
    fn a_bad_offer_is_declined_and_the_next_one_tried() {
        let cases = [
            (
                "permessage-deflate; server_max_window_bits",
                Decline::Malformed,
            ),
            (
                "permessage-deflate; server_max_window_bits=7",
                Decline::Malformed,
            ),
            (
                "permessage-deflate; server_max_window_bits=16",
                Decline::Malformed,
            ),
            (
                "permessage-deflate; server_max_window_bits=010",
                Decline::Malformed,
            ),
            (
                "permessage-deflate; client_max_window_bits=x",
                Decline::Malformed,
            ),
            (
                "permessage-deflate; server_no_context_takeover=1",
                Decline::Malformed,
            ),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                Decline::Malformed,
            ),
            ("permessage-deflate; ;", Decline::Malformed),
            ("permessage-deflate; mystery", Decline::UnknownParameter),
        ];
        for (bad, why) in cases {
            let n = agreed(&[&format!("{bad}, permessage-deflate")]);
            assert_eq!(n.declined, vec![why], "{bad}");
            assert!(n.agreed.is_some(), "{bad}: the second offer is taken");
            let only = agreed(&[bad]);
            assert_eq!((only.agreed, only.declined), (None, vec![why]), "{bad}");
        }
        // An open quote takes the rest of its header line with it; the
        // next line's offer is still taken.
        let n = agreed(&[
            "permessage-deflate; server_max_window_bits=\"10, permessage-deflate",
            "permessage-deflate",
        ]);
        assert_eq!(n.declined, vec![Decline::Malformed]);
        assert!(n.agreed.is_some());
        // Quoted values are tokens too; other extensions are ignored.
        let n = agreed(&[
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=\"12\"",
        ]);
        assert_eq!(n.agreed.map(|a| a.server_window_bits), Some(12));
        assert!(n.declined.is_empty());
    }

    #[test]
    fn off_or_broken_clients_are_declined_with_a_reason() {
        let off = negotiate(&["permessage-deflate"], None, false);
        assert_eq!((off.agreed, off.declined), (None, vec![Decline::Disabled]));
        let safari_15_2 = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 \
                           (KHTML, like Gecko) Version/15.2 Safari/605.1.15";
        let n = negotiate(&["permessage-deflate"], Some(safari_15_2), true);
        assert_eq!((n.agreed, n.declined), (None, vec![Decline::BrokenClient]));
        for ok in [
            safari_15_2.replace("Version/15.2", "Version/15.4"),
            safari_15_2.replace("Version/15.2", "Version/15.10"),
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36 Version/15.2".into(),
            "Mozilla/5.0 (iPhone; CPU iPhone OS 15_4 like Mac OS X) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) CriOS/100.0.4896.85 Mobile/15E148 Safari/604.1"
                .into(),
            "Mozilla/5.0 (iPhone; CPU iPhone OS 15_10 like Mac OS X) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) FxiOS/40.0 Mobile/15E148 Safari/605.1.15"
                .into(),
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) Version/16.0 Safari/605.1.15"
                .into(),
        ] {
            assert!(negotiate(&["permessage-deflate"], Some(&ok), true).agreed.is_some(), "{ok}");
        }
        // iOS 15.0-15.3: every browser is the system's WebKit.
        for broken in [
            "Mozilla/5.0 (iPhone; CPU iPhone OS 15_2 like Mac OS X) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) CriOS/96.0.4664.53 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 15_3_1 like Mac OS X) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) FxiOS/39.0 Mobile/15E148 Safari/605.1.15",
            "Mozilla/5.0 (iPad; CPU OS 15_0 like Mac OS X) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) Version/15.0 Mobile/15E148 Safari/604.1",
        ] {
            let n = negotiate(&["permessage-deflate"], Some(broken), true);
            assert_eq!(n.declined, vec![Decline::BrokenClient], "{broken}");
        }
    }

    #[test]
    fn compression_is_deterministic_and_inflates_back() {
        let input =
            br#"{"op":"msg","topic":"news","id":"1-0","data":{"text":"hello hello hello hello"}}"#
                .repeat(20);
        let (mut a, mut b) = (Deflater::new(1), Deflater::new(1));
        let once = a.compress(&input);
        assert_eq!(
            once,
            a.compress(&input),
            "reset per message: same bytes again"
        );
        assert_eq!(once, b.compress(&input), "and on another shard");
        assert!(once.len() < input.len() / 4);
        assert!(!once.ends_with(&TAIL));
        let mut out = Vec::new();
        Inflater::default()
            .inflate(&once, 1 << 20, &mut out)
            .unwrap();
        assert_eq!(out, input);
        // Empty and incompressible payloads too.
        for data in [
            Vec::new(),
            (0..5000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ] {
            let z = a.compress(&data);
            Inflater::default().inflate(&z, 1 << 20, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn inflating_stops_at_the_limit_and_rejects_garbage() {
        let bomb = Deflater::new(9).compress(&vec![b'a'; 10 << 20]);
        assert!(bomb.len() < 20_000);
        let mut out = Vec::new();
        let err = Inflater::default()
            .inflate(&bomb, 64 << 10, &mut out)
            .unwrap_err();
        assert_eq!(err, InflateError::TooBig { max: 64 << 10 });
        assert!(
            out.capacity() <= 2 * (64 << 10) + 4096,
            "allocated {}",
            out.capacity()
        );
        let mut inf = Inflater::default();
        assert!(matches!(
            inf.inflate(&[0xff, 0xff, 0xff, 0x00, 0x12], 1 << 20, &mut out),
            Err(InflateError::Corrupt(_))
        ));
        // The same inflater serves the next message after an error.
        let ok = Deflater::new(1).compress(b"fine");
        inf.inflate(&ok, 1 << 20, &mut out).unwrap();
        assert_eq!(out, b"fine");
    }
}
