//! Topic names. A topic is 1 to 255 bytes of `[A-Za-z0-9_.:@/-]`; the part
//! before the first `:` is its namespace. [`TopicName`] is validated on
//! construction, so every layer past the parser can trust it, and it is an
//! `Arc<str>` so the shard index and every queued message share one copy.
//!
//! A `sub` (and `unsub`) may name a topic pattern instead ([`TopicName::filter`]):
//! the claims' grammar (`*` one segment, `#` one or more trailing ones),
//! whose namespace, when it has one, is written out (`chat:*`, never
//! `*:x`), so a pattern never reaches into another namespace's policy.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest topic name accepted, in bytes (docs/PROTOCOL.md section 5).
pub const MAX_TOPIC_LEN: usize = 255;

/// Why a string is not a valid topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name was empty.
    #[error("topic is empty")]
    Empty,
    /// The name was longer than [`MAX_TOPIC_LEN`].
    #[error("topic is {len} bytes, longer than the limit of {MAX_TOPIC_LEN}")]
    TooLong {
        /// Length of the rejected name.
        len: usize,
    },
    /// A topic pattern that does not follow the grammar.
    #[error("topic pattern {0}")]
    BadPattern(&'static str),
    /// The name held a byte outside `[A-Za-z0-9_.:@/-]`.
    #[error(
        "topic has invalid byte 0x{byte:02x} at offset {at}; allowed: A-Z a-z 0-9 _ . : @ / -"
    )]
    InvalidByte {
        /// The offending byte.
        byte: u8,
        /// Its offset in the name.
        at: usize,
    },
}

/// A validated topic name, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

/// The partition of `topic`: CRC-32/ISO-HDLC (zlib's crc32) mod
/// `partitions`. Producers compute the same thing (docs/PROTOCOL.md
/// section 6); the Redis broker keeps each partition in its own stream.
pub fn partition(topic: &str, partitions: u32) -> u32 {
    crc32fast::hash(topic.as_bytes()) % partitions.max(1)
}

impl TopicName {
    /// This topic's partition of `partitions` ([`partition`]).
    pub fn partition(&self, partitions: u32) -> u32 {
        partition(self.as_str(), partitions)
    }

    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, TopicError> {
        validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// Validates a topic or a topic pattern (`user.42.*`, `chat:#`) and
    /// wraps it. A pattern must parse as a claims pattern, and its
    /// namespace (before the first `:`) must be literal.
    pub fn filter(name: &str) -> Result<Self, TopicError> {
        if !name.contains(['*', '#']) {
            return Self::new(name);
        }
        let plain = name.replace(['*', '#'], "x");
        validate(&plain)?;
        if crate::auth::Pattern::parse(name).is_none() {
            return Err(TopicError::BadPattern(
                "is malformed: `*` and `#` must be whole segments, `#` only the last",
            ));
        }
        if name
            .split_once(':')
            .is_some_and(|(ns, _)| ns.contains(['*', '#']))
        {
            return Err(TopicError::BadPattern(
                "must name its namespace (the part before the first `:`) without `*` or `#`",
            ));
        }
        Ok(Self(Arc::from(name)))
    }

    /// Whether this is a pattern (made by [`TopicName::filter`]) rather
    /// than one topic.
    pub fn is_pattern(&self) -> bool {
        self.0.contains(['*', '#'])
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the part before the first `:`, or `""` for the
    /// default namespace.
    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map_or("", |(ns, _)| ns)
    }
}

/// Checks a name against the topic grammar without allocating.
pub fn validate(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: name.len() });
    }
    match name.bytes().position(|b| !is_topic_byte(b)) {
        Some(at) => Err(TopicError::InvalidByte {
            byte: name.as_bytes()[at],
            at,
        }),
        None => Ok(()),
    }
}

fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
}

impl Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_whole_alphabet() {
        let t = TopicName::new("chat:42/a_b.c@d-e").unwrap();
        assert_eq!(t.namespace(), "chat");
        assert_eq!(TopicName::new("news").unwrap().namespace(), "");
        assert!(TopicName::new(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn patterns_are_accepted_only_where_asked_and_well_formed() {
        for ok in ["user.42.*", "chat:#", "#", "a.*.c", "chat:room.*"] {
            let p = TopicName::filter(ok).unwrap();
            assert!(p.is_pattern(), "{ok}");
            assert!(TopicName::new(ok).is_err(), "{ok}: not a topic");
        }
        let plain = TopicName::filter("news").unwrap();
        assert!(!plain.is_pattern());
        for (bad, why) in [
            ("user.4*", "malformed"),
            ("#.x", "malformed"),
            ("a..*", "malformed"),
            ("*:x", "namespace"),
            ("*.a:b", "namespace"),
            ("a b.*", "0x20"),
        ] {
            let err = TopicName::filter(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_bad_names_saying_why() {
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(
            TopicName::new(&"x".repeat(256)),
            Err(TopicError::TooLong { len: 256 })
        );
        let err = TopicName::new("a b").unwrap_err();
        assert_eq!(err, TopicError::InvalidByte { byte: b' ', at: 1 });
        assert!(err.to_string().contains("0x20 at offset 1"));
        assert!(TopicName::new("ü").is_err());
        assert!(TopicName::new("a\"b").is_err());
    }
}
