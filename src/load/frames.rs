//! What a load worker reads from the server: frame headers (server frames
//! are never masked), and the code of an `error` reply, parsed without
//! building a JSON value (a worker reads millions per second).

/// Largest server frame the tool accepts.
pub(super) const MAX_FRAME: u64 = 16 << 20;

/// A complete server frame at the front of a buffer.
pub(super) struct Frame {
    pub(super) opcode: u8,
    /// RSV1: a permessage-deflate message, to inflate.
    pub(super) compressed: bool,
    /// Payload offsets from the frame's start.
    pub(super) start: usize,
    pub(super) end: usize,
}

/// Parses the server frame at the front of `buf` (unmasked, RFC 6455 §5.2);
/// `Ok(None)` until it is complete.
pub(super) fn server_frame(buf: &[u8]) -> Result<Option<Frame>, &'static str> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        return Err("the server sent a masked frame");
    }
    if b0 & 0x80 == 0 {
        return Err("the server sent a fragmented frame (the load tool does not reassemble)");
    }
    let (len, head) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME {
        return Err("the server sent a frame over 16 MiB");
    }
    let end = head + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(Frame {
        opcode: b0 & 0x0f,
        compressed: b0 & 0x40 != 0,
        start: head,
        end,
    }))
}

/// Reads the `"t":NNN` stamp (monotonic µs) from a msg frame's payload.
pub(super) fn stamp(payload: &[u8]) -> Option<u64> {
    number(payload, b"\"t\":")
}

/// Reads the `"q":NNN` sequence number (per topic, from 0) from a msg
/// frame's payload.
pub(super) fn seq(payload: &[u8]) -> Option<u64> {
    number(payload, b"\"q\":")
}

/// The digits after the first `key` in `payload`.
fn number(payload: &[u8], key: &[u8]) -> Option<u64> {
    let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit());
    Some(digits.fold(0u64, |n, d| {
        n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'))
    }))
}

/// Whether a server frame's JSON says `"op":"<op>"` (key order may vary: the
/// baseline server sorts its keys).
pub(super) fn has_op(frame: &[u8], op: &str) -> bool {
    // Only replies and control messages get here, never a stamped `msg`.
    let needle = format!("\"op\":\"{op}\"");
    frame.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The `code` of an error reply (0 when absent).
pub(super) fn error_code(payload: &[u8]) -> u64 {
    let Some(at) = payload.windows(7).position(|w| w == b"\"code\":") else {
        return 0;
    };
    payload[at + 7..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        })
}

/// Longest `reconnect_in_ms` the tool will wait: a node's `--drain-window`
/// is seconds (default 10 s), so a longer wait is a broken frame, not a
/// drain to follow.
pub(super) const MAX_DRAIN_WAIT_MS: u64 = 3_600_000;

/// The `reconnect_in_ms` of a server's `drain` frame (docs/PROTOCOL.md §3:
/// `{"op":"drain","reconnect_in_ms":1800}`, then close 1001): `Ok(None)`
/// when the frame is not a `drain`; an error when it is one the tool cannot
/// follow. Parsed as JSON: it comes once per connection, not per message.
pub(super) fn drain_wait(payload: &[u8]) -> Result<Option<u64>, &'static str> {
    if !has_op(payload, "drain") {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|_| "a drain frame that is not JSON")?;
    if v["op"] != "drain" {
        // `"op":"drain"` nested somewhere else in the frame.
        return Ok(None);
    }
    match &v["reconnect_in_ms"] {
        serde_json::Value::Null => Err("a drain frame without reconnect_in_ms"),
        n => match n.as_u64() {
            Some(ms) if ms <= MAX_DRAIN_WAIT_MS => Ok(Some(ms)),
            Some(_) => Err("a drain frame whose reconnect_in_ms is over an hour"),
            None => Err("a drain frame whose reconnect_in_ms is not a whole number of ms"),
        },
    }
}
