//! docs/PROTOCOL.md section 4's close-code table, as the Rust client
//! follows it: [`after_close`] maps a close code to what [`Reconnecting`]
//! does next, in one place (STYLE.md section 12: a reason is mapped once,
//! never with literals at the call site). [`Disconnect`] records a loss.
//!
//! [`Reconnecting`]: super::Reconnecting

use std::time::Instant;

use super::ClientError;

/// Close codes after which the client must not reconnect (docs/PROTOCOL.md
/// section 4): 1000 normal, 4003 forbidden (e.g. the token was revoked).
pub const FINAL_CLOSE_CODES: [u16; 2] = [1000, 4003];

/// The close code recorded for a connection that ended without a close
/// frame: the socket ended, or the `ping` op found the link dead (RFC 6455
/// §7.1.5).
pub(super) const ABNORMAL: u16 = 1006;

/// A connection lost (docs/PROTOCOL.md section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// The server's close code; 1006 when none came (the socket ended, or
    /// the `ping` op found the link dead).
    pub code: u16,
    /// The close reason, or what happened.
    pub reason: String,
    /// When the client noticed.
    pub at: Instant,
}

/// What docs/PROTOCOL.md section 4's close-code table asks of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClose {
    /// Do not reconnect; surface the reason (1000, 4003, and 4001 without
    /// a token provider: the same token would be refused again).
    Stop,
    /// Reconnect after the `drain` frame's `reconnect_in_ms` (1001), or
    /// with backoff if none came.
    Drain,
    /// Reconnect at once and resubscribe with `since` (4009); a second
    /// 4009 within the backoff ceiling backs off instead.
    Now,
    /// Reconnect after the backoff plus `rate_limited_delay` (4008).
    RateLimited,
    /// Reconnect after the backoff with full jitter (everything else; 4001
    /// with a fresh token from the provider).
    Backoff,
}

/// docs/PROTOCOL.md section 4's table: what to do after a close `code`,
/// for a client that has a token provider or not.
pub fn after_close(code: u16, token_provider: bool) -> AfterClose {
    match code {
        c if FINAL_CLOSE_CODES.contains(&c) => AfterClose::Stop,
        4001 if !token_provider => AfterClose::Stop,
        1001 => AfterClose::Drain,
        4009 => AfterClose::Now,
        4008 => AfterClose::RateLimited,
        _ => AfterClose::Backoff,
    }
}

/// Why a [`Reconnecting`] stopped.
#[derive(Debug, Clone)]
pub(super) enum Ended {
    /// A close that must not be reconnected (code, reason).
    Closed(u16, String),
    /// The token provider failed (its reason).
    Token(String),
}

impl Ended {
    pub(super) fn error(&self) -> ClientError {
        match self {
            Ended::Closed(code, reason) => ClientError::Closed(*code, reason.clone()),
            Ended::Token(reason) => ClientError::Token(reason.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_of_the_protocol_table_gets_its_action() {
        use AfterClose::*;
        // (code, without a token provider, with one): docs/PROTOCOL.md §4.
        let table = [
            (1000, Stop, Stop),
            (1001, Drain, Drain),
            (1002, Backoff, Backoff),
            (1006, Backoff, Backoff),
            (1007, Backoff, Backoff),
            (1009, Backoff, Backoff),
            (1011, Backoff, Backoff),
            (4001, Stop, Backoff),
            (4003, Stop, Stop),
            (4008, RateLimited, RateLimited),
            (4009, Now, Now),
        ];
        for (code, anonymous, with_token) in table {
            assert_eq!(
                after_close(code, false),
                anonymous,
                "{code} without a provider"
            );
            assert_eq!(
                after_close(code, true),
                with_token,
                "{code} with a provider"
            );
        }
        let end = Ended::Closed(4003, "token for another user".into()).error();
        assert!(matches!(end, ClientError::Closed(4003, ref r) if r == "token for another user"));
        let end = Ended::Token("signed out".into()).error();
        assert_eq!(end.to_string(), "token provider failed: signed out");
    }
}
