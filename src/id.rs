//! The words every layer uses: message ids and recovery positions, epochs,
//! and who a message or an answer is for (a shard, a connection, a
//! request). They live here, below everything else, so no two modules
//! import each other to share them.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A message id in the Redis stream entry format `MS-SEQ`: milliseconds
/// since the epoch and a sequence number within that millisecond. Ordered
/// as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MsgId {
    /// Milliseconds since the Unix epoch.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a string is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected MS-SEQ, two decimal u64 numbers")]
pub struct MsgIdError(pub String);

impl FromStr for MsgId {
    type Err = MsgIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MsgIdError(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(err)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(err());
        }
        Ok(MsgId {
            ms: ms.parse().map_err(|_| err())?,
            seq: seq.parse().map_err(|_| err())?,
        })
    }
}

/// The position a client asks to recover from.
#[derive(Debug, Clone)]
pub struct Since {
    /// The last message id the client saw.
    pub id: MsgId,
    /// The epoch that id came from; `None` means the client sent none, which
    /// can never be recovered.
    pub epoch: Option<String>,
}

/// A shard's number on its node, 0-based. Shard numbers index the bus's
/// inboxes and the topic interest bits; they never travel as a bare
/// `usize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    /// The shard's position in per-shard tables.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A connection's identity within its shard, never reused while the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Where a broker sends its answer to one request.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    /// The shard owning the connection.
    pub shard: ShardId,
    /// The connection.
    pub conn: ConnId,
    /// The request's `id`, copied into the reply.
    pub req: Option<u64>,
}

/// A fresh random epoch: 12 lowercase alphanumerics.
pub fn mint_epoch() -> Arc<str> {
    let s: String = (0..12)
        .map(|_| fastrand::alphanumeric().to_ascii_lowercase())
        .collect();
    Arc::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_order_like_redis() {
        let a: MsgId = "1732240000000-0".parse().unwrap();
        let b: MsgId = "1732240000000-1".parse().unwrap();
        let c: MsgId = "1732240000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1732240000000-0");
    }

    #[test]
    fn bad_ids_are_rejected() {
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "+1-2",
            "1- 2",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<MsgId>().is_err(), "{bad:?} parsed");
        }
    }
}
