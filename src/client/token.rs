//! Tokens for [`Reconnecting`](super::Reconnecting): the provider it asks
//! for one, the `exp` it reads from a JWT (without verifying: the server
//! does that), and the refresh schedule of one connection (docs/PROTOCOL.md
//! section 2, "Refreshing the token").
//!
//! A token refreshes `margin` before its `exp`, or half way through a
//! shorter token, never sooner than [`MIN_REFRESH_DELAY`]; a refused
//! refresh tries again half way through what is left, while that is more
//! than [`MIN_REFRESH_DELAY`]. The clock here is the wall clock (`exp` is
//! Unix seconds), turned into an [`Instant`] once per schedule. Nothing
//! here does IO: the caller sends the `auth` frames.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{ClientError, Result};

/// How long before `exp` a token is refreshed when it lives long enough
/// (a shorter token refreshes half way). 30 s leaves room for a slow
/// provider and a retry before the server's 4001 at `exp`, which it checks
/// once a second with no leeway. The same as the JS client's
/// `tokenRefreshMargin`.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// The soonest a refresh is scheduled: a client clock ahead of the
/// server's, or a provider that hands out tokens already expired, must not
/// turn the refresh into a busy loop.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);

/// What [`Reconnecting::with_token`](super::Reconnecting::with_token)
/// calls for a token: `Ok(jwt)`, or `Err(why)` when no token will come
/// (the user signed out). An `Err` is final: the client gives up.
pub(super) struct TokenSource(Box<dyn FnMut() -> std::result::Result<String, String> + Send>);

impl TokenSource {
    pub(super) fn new(
        provider: impl FnMut() -> std::result::Result<String, String> + Send + 'static,
    ) -> TokenSource {
        TokenSource(Box::new(provider))
    }

    /// A token from the provider, or [`ClientError::Token`] with its reason.
    pub(super) fn fetch(&mut self) -> Result<String> {
        (self.0)().map_err(ClientError::Token)
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token: it is a credential (STYLE.md section 4).
        f.write_str("TokenSource(..)")
    }
}

/// The `exp` claim (Unix seconds) of a JWT, read without verifying the
/// signature; `None` when the token is not a JWT or has no numeric `exp`.
/// Used only to schedule the refresh: the server decides what is valid.
pub fn token_expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&decode_base64url(payload)?).ok()?;
    let exp = &claims["exp"];
    // RFC 7519 §2: a NumericDate may have a fraction.
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|e| *e >= 0.0).map(|e| e as u64))
}

/// Base64url without padding (RFC 7515 §2), as JWT segments are; trailing
/// `=` are tolerated. `None` on any other character.
fn decode_base64url(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut bits, mut n) = (0u32, 0);
    for c in s.trim_end_matches('=').bytes() {
        bits = (bits << 6 | u32::from(value(c)?)) & 0xff_ffff;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}

/// Time left until `exp` at `now` (zero once it passed).
fn left(exp: u64, now: SystemTime) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(exp))
        .duration_since(now)
        .unwrap_or_default()
}

/// How long after `now` a token expiring at `exp` is refreshed: `margin`
/// before `exp`, or half way when less than twice `margin` is left, and
/// never sooner than [`MIN_REFRESH_DELAY`].
pub fn refresh_delay(exp: u64, now: SystemTime, margin: Duration) -> Duration {
    let left = left(exp, now);
    left.saturating_sub(margin.min(left / 2))
        .max(MIN_REFRESH_DELAY)
}

/// After a refused refresh of a token expiring at `exp`: try again half
/// way through what is left, or `None` when under [`MIN_REFRESH_DELAY`] is
/// left (the server's 4001 at `exp` comes first; the client then
/// reconnects with a fresh token).
pub fn retry_delay(exp: u64, now: SystemTime) -> Option<Duration> {
    let left = left(exp, now);
    (left > MIN_REFRESH_DELAY).then_some(left / 2)
}

/// How a reply answers the connection's `auth` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AuthReply {
    /// The reply to the first `auth` (sent when connecting): only a server
    /// that welcomed the client as a guest, or runs anonymous, sends one.
    First,
    /// The refresh in flight was accepted: its token holds now.
    Accepted,
    /// The refresh in flight was refused (error 4001, or 4000 on an
    /// anonymous server): the current token holds until its `exp`.
    Refused,
}

/// One connection's token refresh: when the next is due, which `auth`
/// is in flight. Made anew with each connection.
#[derive(Debug)]
pub(super) struct Refresh {
    margin: Duration,
    /// The current token's `exp`, when it has one.
    exp: Option<u64>,
    /// When the next refresh is due; `None` while one is in flight, or when
    /// the token has no `exp`.
    at: Option<Instant>,
    /// The `id` of the refreshing `auth` in flight and its token.
    in_flight: Option<(u64, String)>,
    /// The `id` of the first `auth`, until its (rare) reply comes.
    first: Option<u64>,
}

impl Refresh {
    /// The schedule of a connection authenticated with `token` (none:
    /// anonymous, nothing to refresh), whose first `auth` carried `first`.
    pub(super) fn new(token: Option<&str>, first: Option<u64>, margin: Duration) -> Refresh {
        let mut r = Refresh {
            margin,
            exp: None,
            at: None,
            in_flight: None,
            first,
        };
        if let Some(token) = token {
            r.holds(token);
        }
        r
    }

    /// When a refresh is due next (`None`: none is).
    pub(super) fn due(&self) -> Option<Instant> {
        self.at
    }

    /// A refresh was sent as `auth` with `id`, carrying `token`.
    pub(super) fn sent(&mut self, id: u64, token: String) {
        self.at = None;
        self.in_flight = Some((id, token));
    }

    /// What a reply with `id` (an `ok` when `ok`, else an `error`) means to
    /// the token; `None` when it answers something else.
    pub(super) fn answer(&mut self, id: u64, ok: bool) -> Option<AuthReply> {
        if self.first == Some(id) {
            self.first = None;
            return Some(AuthReply::First);
        }
        if self.in_flight.as_ref().is_none_or(|(sent, _)| *sent != id) {
            return None;
        }
        let (_, token) = self.in_flight.take().expect("in flight: checked above");
        if ok {
            self.holds(&token);
            return Some(AuthReply::Accepted);
        }
        let now = SystemTime::now();
        self.at = self
            .exp
            .and_then(|exp| retry_delay(exp, now))
            .map(|d| Instant::now() + d);
        Some(AuthReply::Refused)
    }

    /// `token` holds now: schedule its refresh.
    fn holds(&mut self, token: &str) {
        self.exp = token_expiry(token);
        let now = SystemTime::now();
        self.at = self
            .exp
            .map(|exp| Instant::now() + refresh_delay(exp, now, self.margin));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JWT-shaped token with this payload (header and signature are not read).
    fn jwt(payload: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut body = String::new();
        for chunk in payload.as_bytes().chunks(3) {
            let n =
                chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                body.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        format!("eyJhbGciOiJIUzI1NiJ9.{body}.c2ln")
    }

    #[test]
    fn exp_is_read_from_the_payload_without_verifying() {
        assert_eq!(
            token_expiry(&jwt(r#"{"sub":"u1","exp":1732240000}"#)),
            Some(1_732_240_000)
        );
        // Every payload length (padding cases), and URL-safe characters.
        for pad in ["", "x", "xx", "xxx"] {
            let t = jwt(&format!(r#"{{"sub":"{pad}??>>","exp":42}}"#));
            assert_eq!(token_expiry(&t), Some(42), "{t}");
        }
        assert_eq!(
            token_expiry(&jwt(r#"{"exp":1700000000.75}"#)),
            Some(1_700_000_000)
        );
        // A token minted by the server's own code.
        let claims = crate::auth::Claims {
            sub: "u1".into(),
            exp: 1_900_000_000,
            subs: vec!["news".into()],
            pubs: vec![],
        };
        let minted = crate::auth::mint_hmac(b"0123456789abcdef0123456789abcdef", &claims);
        assert_eq!(token_expiry(&minted), Some(1_900_000_000));
        // Nothing to schedule from: no exp, a string exp, not a JWT, bad base64.
        for t in [
            jwt(r#"{"sub":"u1"}"#),
            jwt(r#"{"exp":"soon"}"#),
            jwt(r#"{"exp":-5}"#),
            jwt("not json"),
            "opaque-api-key".to_string(),
            "a.b*c.d".to_string(),
            String::new(),
        ] {
            assert_eq!(token_expiry(&t), None, "{t}");
        }
    }

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn a_token_refreshes_a_margin_before_exp_or_half_way_never_within_a_second() {
        let margin = TOKEN_REFRESH_MARGIN;
        let s = Duration::from_secs;
        // An hour: 30 s before exp.
        assert_eq!(refresh_delay(4600, at(1000, 0), margin), s(3570));
        // Exactly twice the margin: the margin and half way agree.
        assert_eq!(refresh_delay(1060, at(1000, 0), margin), s(30));
        // Shorter: half way (3 s left: at 1.5 s; 2.4 s left: at 1.2 s).
        assert_eq!(
            refresh_delay(1003, at(1000, 0), margin),
            Duration::from_millis(1500)
        );
        assert_eq!(
            refresh_delay(1003, at(1000, 600), margin),
            Duration::from_millis(1200)
        );
        // Under 2 s left, expired, or far in the past: a second, not a loop.
        assert_eq!(refresh_delay(1001, at(1000, 0), margin), MIN_REFRESH_DELAY);
        assert_eq!(refresh_delay(1000, at(1000, 0), margin), MIN_REFRESH_DELAY);
        assert_eq!(refresh_delay(5, at(1000, 0), margin), MIN_REFRESH_DELAY);
        // A smaller margin is honoured.
        assert_eq!(refresh_delay(1100, at(1000, 0), s(10)), s(90));
    }

    #[test]
    fn a_refused_refresh_retries_half_way_through_what_is_left() {
        assert_eq!(retry_delay(1010, at(1000, 0)), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_delay(1003, at(1001, 500)),
            Some(Duration::from_millis(750))
        );
        // A second or less left: the server's 4001 at exp comes first.
        assert_eq!(retry_delay(1001, at(1000, 0)), None);
        assert_eq!(retry_delay(1000, at(1000, 200)), None);
    }

    fn exp_in(secs: u64) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + secs;
        jwt(&format!(r#"{{"sub":"u1","exp":{exp}}}"#))
    }

    #[test]
    fn the_refresh_is_scheduled_sent_and_answered() {
        let start = Instant::now();
        // Anonymous, or a token without exp: nothing is ever due.
        assert_eq!(Refresh::new(None, None, TOKEN_REFRESH_MARGIN).due(), None);
        let opaque = Refresh::new(Some("api-key"), Some(1), TOKEN_REFRESH_MARGIN);
        assert_eq!(opaque.due(), None);
        // An hour: due in about 59.5 minutes.
        let mut r = Refresh::new(Some(&exp_in(3600)), Some(1), TOKEN_REFRESH_MARGIN);
        let due = r.due().unwrap() - start;
        assert!(
            due > Duration::from_secs(3568) && due <= Duration::from_secs(3571),
            "{due:?}"
        );
        // The first auth's reply (a guest's ok) is told apart, once.
        assert_eq!(r.answer(1, true), Some(AuthReply::First));
        assert_eq!(r.answer(1, true), None);
        // In flight: nothing due; other replies are not the refresh's.
        r.sent(7, exp_in(3));
        assert_eq!(r.due(), None);
        assert_eq!(r.answer(6, true), None);
        // Accepted: the new token's schedule (3 s: half way, 1 to 1.5 s).
        assert_eq!(r.answer(7, true), Some(AuthReply::Accepted));
        let due = r.due().unwrap() - start;
        assert!(
            due >= Duration::from_secs(1) && due <= Duration::from_millis(1600),
            "{due:?}"
        );
        assert_eq!(r.answer(7, true), None, "answered once");
        // Refused: the old token (3 s) holds; retry half way through what is left.
        r.sent(8, exp_in(3600));
        assert_eq!(r.answer(8, false), Some(AuthReply::Refused));
        let due = r.due().unwrap() - start;
        assert!(
            due >= Duration::from_millis(500) && due <= Duration::from_millis(1600),
            "{due:?}"
        );
        // Refused with under a second left: no retry.
        let mut r = Refresh::new(Some(&exp_in(1)), None, TOKEN_REFRESH_MARGIN);
        r.sent(2, exp_in(3600));
        assert_eq!(r.answer(2, false), Some(AuthReply::Refused));
        assert_eq!(r.due(), None);
    }
}
