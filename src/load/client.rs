//! One client connection of a load worker: where it is (connect, upgrade,
//! welcome, sub, open, or waiting to reconnect), and what its server's
//! frames mean: deliveries (timed by their stamp, checked in order by their
//! sequence number), replies, a `drain`, closes. No IO but the `sub` it
//! sends and the pongs; the worker owns the loop and decides, from what
//! this module reports, when a subscriber reconnects.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use super::frames::{drain_wait, error_code, has_op, seq, server_frame, stamp};
use super::tally::Tally;
use crate::client::check_accept;
use crate::sys;
use crate::ws::frame::{encode_masked, OpCode};

/// Where one client connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// `connect` issued, waiting for writability.
    Connecting,
    /// Upgrade request sent, waiting for the 101 response.
    Upgrading,
    /// Upgraded, waiting for `welcome`.
    Welcome,
    /// `sub` sent, waiting for its `ok`.
    Subscribing,
    /// Ready; counting messages.
    Open,
    /// Between two connections of a subscriber that follows the server:
    /// its next socket is made (not connected) and it reconnects when its
    /// timer fires (a `drain`'s `reconnect_in_ms`, or a backoff).
    Waiting,
}

impl State {
    /// A connection attempt under way: connected or not, no `ok` yet.
    pub(super) fn attempting(self) -> bool {
        matches!(
            self,
            State::Connecting | State::Upgrading | State::Welcome | State::Subscribing
        )
    }
}

/// One client connection of the worker.
pub(super) struct Client {
    pub(super) fd: OwnedFd,
    pub(super) state: State,
    /// Bytes of an incomplete frame (or response head) carried to the next read.
    pub(super) pending: Vec<u8>,
    /// This connection's `Sec-WebSocket-Key` (RFC 6455 §4.1: a fresh
    /// nonce per connection), kept to check the server's accept.
    pub(super) key: [u8; 24],
    /// The topic this client subscribes to, if any.
    pub(super) topic: Option<usize>,
    /// The sequence number (`"q"`) the next message of its topic should
    /// carry: one publisher per topic numbers them from 0.
    pub(super) next_seq: u64,
    /// Its position in the topic: the id of the last message it took, or
    /// the `last` of its `ok` (bytes of `ms-seq`; `pos_len` 0: none yet).
    pub(super) pos: [u8; 40],
    pub(super) pos_len: u8,
    /// The epoch of its `ok`, sent back with `since` when it resubscribes.
    pub(super) epoch: Option<Box<str>>,
    /// When its reconnect started (churn drop, a close, the end of a
    /// drain's wait), µs, until its `ok`; 0 otherwise.
    pub(super) churned_at: u64,
    /// A `drain` received on this connection: when (µs) and its
    /// `reconnect_in_ms`, kept until the reconnect starts.
    pub(super) drain: Option<(u64, u64)>,
    /// Whether its last `sub` carried `since` (its `ok` must then say
    /// `recovered:true`).
    pub(super) since_sent: bool,
    /// The `node` of the `welcome` of its current (or last) connection.
    pub(super) node: Option<Box<str>>,
    /// Bumped at every change of connection or wait: a timer set for an
    /// earlier one is stale.
    pub(super) attempt: u32,
    /// Failed attempts in a row (the backoff doubles with each).
    pub(super) failures: u8,
}

impl Client {
    /// A client about to connect, for topic `topic`.
    pub(super) fn new(fd: OwnedFd, topic: Option<usize>) -> Client {
        Client {
            fd,
            state: State::Connecting,
            pending: Vec::new(),
            key: crate::client::new_key(),
            topic,
            next_seq: 0,
            pos: [0; 40],
            pos_len: 0,
            epoch: None,
            churned_at: 0,
            drain: None,
            since_sent: false,
            node: None,
            attempt: 0,
            failures: 0,
        }
    }

    /// Whether its next `sub` carries `since` and `epoch`.
    fn resumes(&self) -> bool {
        self.pos_len > 0 && self.epoch.is_some()
    }

    /// Takes `id` (the bytes of a message id) as its position.
    fn set_pos(&mut self, id: &[u8]) {
        let n = id.len().min(self.pos.len());
        self.pos[..n].copy_from_slice(&id[..n]);
        self.pos_len = n as u8;
    }

    /// The `sub` it sends: with `since` and `epoch` once it has a position.
    fn sub_frame(&self, topic: &str) -> bytes::Bytes {
        let mut sub = format!("{{\"op\":\"sub\",\"id\":1,\"topic\":\"{topic}\"");
        if let (n @ 1.., Some(epoch)) = (self.pos_len, &self.epoch) {
            let since = String::from_utf8_lossy(&self.pos[..usize::from(n)]);
            sub.push_str(&format!(",\"since\":\"{since}\",\"epoch\":\"{epoch}\""));
        }
        sub.push('}');
        encode_masked(OpCode::Text, true, sub.as_bytes(), [7, 7, 7, 7])
    }
}

/// The string value of `"key":"..."` in a JSON payload, as bytes.
fn str_field<'p>(payload: &'p [u8], key: &[u8]) -> Option<&'p [u8]> {
    let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &payload[at..];
    Some(&rest[..rest.iter().position(|&b| b == b'"')?])
}

/// The upgrade request every connection sends, and the offset of its
/// `Sec-WebSocket-Key` value: built once, each connection writes its own
/// key there before sending (no allocation per connection).
pub(super) fn upgrade_request(
    target: SocketAddr,
    token: Option<&str>,
    deflate: bool,
) -> (Vec<u8>, usize) {
    let path = match token {
        Some(t) => format!("/ws?token={t}"),
        None => "/ws".to_string(),
    };
    // The offer Chromium sends.
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ringcast.v1\r\n{offer}\
         Sec-WebSocket-Key: "
    );
    let key_at = head.len();
    let mut request = head.into_bytes();
    request.extend_from_slice(&[b'='; 24]);
    request.extend_from_slice(b"\r\n\r\n");
    (request, key_at)
}

/// A worker's one inflater and its output buffer: permessage-deflate
/// messages are inflated one at a time (the server takes no context over).
#[derive(Default)]
pub(super) struct Codec {
    inflater: crate::ws::deflate::Inflater,
    out: Vec<u8>,
}

/// What processing a read led to.
pub(super) enum Outcome {
    Nothing,
    /// The connection moved from one state to another.
    Progress(State, State),
    /// The server sent a close frame with this code. The state is left as
    /// it was: the worker decides what comes next.
    Closed(u16),
    /// The upgrade was answered with something other than 101 (the status
    /// line, then the body): this attempt failed.
    Refused(String, String),
    /// The run cannot go on.
    Fatal(String),
}

/// Handles every complete frame (or the response head) in `data`; returns
/// the bytes used and what happened.
pub(super) fn process(
    c: &mut Client,
    data: &[u8],
    now: u64,
    tally: &mut Tally,
    total: &mut u64,
    topics: &[String],
    codec: &mut Codec,
) -> (usize, Outcome) {
    let before = c.state;
    let mut at = 0;
    if c.state == State::Upgrading {
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (0, Outcome::Nothing);
        };
        if !data.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&data[..end]);
            let first = head.lines().next().unwrap_or_default().to_string();
            let body = String::from_utf8_lossy(data.get(end + 4..).unwrap_or_default());
            return (data.len(), Outcome::Refused(first, body.trim().to_string()));
        }
        at = end + 4;
        if let Err(e) = check_accept(&data[..at], &c.key) {
            return (data.len(), Outcome::Fatal(e.to_string()));
        }
        c.state = State::Welcome;
    }
    loop {
        let frame = match server_frame(&data[at..]) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(why) => return (data.len(), Outcome::Fatal(why.to_string())),
        };
        let payload = &data[at + frame.start..at + frame.end];
        at += frame.end;
        match frame.opcode {
            0x1 if frame.compressed => {
                let Codec { inflater, out } = codec;
                if let Err(e) = inflater.inflate(payload, super::frames::MAX_FRAME as usize, out) {
                    return (at, Outcome::Fatal(format!("inflating a message: {e}")));
                }
                if let Some(outcome) = on_text(c, out, now, tally, total, topics) {
                    return (at, outcome);
                }
            }
            0x1 => {
                if let Some(outcome) = on_text(c, payload, now, tally, total, topics) {
                    return (at, outcome);
                }
            }
            0x8 => {
                let code = payload
                    .get(..2)
                    .map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                return (at, Outcome::Closed(code));
            }
            0x9 => {
                let pong = encode_masked(OpCode::Pong, true, payload, [1, 2, 3, 4]);
                let _ = sys::send(c.fd.as_raw_fd(), &pong);
            }
            _ => {}
        }
    }
    let outcome = if c.state != before {
        Outcome::Progress(before, c.state)
    } else {
        Outcome::Nothing
    };
    (at, outcome)
}

/// Checks a message's sequence number against the one its subscriber
/// expects: the next one, or a later one (the gap counted missing), is
/// taken; an earlier one is a duplicate or reordered (counted, not taken).
/// A message without a number (another publisher) is taken as it is.
fn in_order(next: &mut u64, q: Option<u64>, tally: &mut Tally) -> bool {
    let Some(q) = q else { return true };
    if q < *next {
        tally.out_of_order += 1;
        return false;
    }
    tally.missing += q - *next;
    *next = q + 1;
    true
}

/// Handles one text frame; `Some` when it ends processing.
fn on_text(
    c: &mut Client,
    payload: &[u8],
    now: u64,
    tally: &mut Tally,
    total: &mut u64,
    topics: &[String],
) -> Option<Outcome> {
    // Read once: every delivery comes through here.
    let stamped = stamp(payload);
    if stamped.is_none() {
        match drain_wait(payload) {
            Ok(None) => {}
            Ok(Some(ms)) => {
                // Close 1001 follows at once; the worker waits `ms` from now.
                c.drain = Some((now, ms));
                tally.drains += 1;
                let _ = tally.drain_wait_ms.record(ms.max(1));
                return None;
            }
            Err(why) => {
                return Some(Outcome::Fatal(format!(
                    "the server sent {why}: {}",
                    String::from_utf8_lossy(&payload[..payload.len().min(200)])
                )))
            }
        }
    }
    match (c.state, stamped) {
        // A message, live or (before the `ok`) replayed.
        (State::Open | State::Subscribing, Some(sent)) => {
            if in_order(&mut c.next_seq, seq(payload), tally) {
                let _ = tally.latency_us.record(now.saturating_sub(sent).max(1));
                tally.received += 1;
                *total += 1;
            }
            if let Some(id) = str_field(payload, b"\"id\":\"") {
                c.set_pos(id);
            }
            None
        }
        (State::Open, _) => {
            if has_op(payload, "error") {
                *tally
                    .errors
                    .entry(error_code(payload).to_string())
                    .or_default() += 1;
            } else if !has_op(payload, "ok") && !has_op(payload, "pong") {
                tally.unstamped += 1;
            }
            None
        }
        (State::Welcome, _) if has_op(payload, "welcome") => {
            if let Some(node) = str_field(payload, b"\"node\":\"") {
                let node = String::from_utf8_lossy(node);
                *tally.landed.entry(node.to_string()).or_default() += 1;
                if c.node.as_deref() != Some(&*node) {
                    c.node = Some(node.into());
                }
            }
            match c.topic.and_then(|t| topics.get(t)) {
                Some(topic) => {
                    let frame = c.sub_frame(topic);
                    if sys::send(c.fd.as_raw_fd(), &frame).is_err() {
                        return Some(Outcome::Fatal("sending sub failed".into()));
                    }
                    c.since_sent = c.resumes();
                    c.state = State::Subscribing;
                }
                None => c.state = State::Open,
            }
            None
        }
        (State::Subscribing, _) if has_op(payload, "ok") => {
            if let Some(last) = str_field(payload, b"\"last\":\"") {
                c.set_pos(last);
            }
            if let Some(epoch) = str_field(payload, b"\"epoch\":\"") {
                if c.epoch.as_deref().map(str::as_bytes) != Some(epoch) {
                    c.epoch = Some(String::from_utf8_lossy(epoch).into());
                }
            }
            if c.churned_at != 0 {
                tally.reconnects += 1;
                let _ = tally
                    .recovery_us
                    .record(now.saturating_sub(c.churned_at).max(1));
                c.churned_at = 0;
            }
            // docs/PROTOCOL.md: `recovered` answers a `since`; anything but
            // `true` means the subscriber may have missed messages.
            let recovered = b"\"recovered\":true";
            if c.since_sent && !payload.windows(recovered.len()).any(|w| w == recovered) {
                tally.unrecovered += 1;
            }
            c.failures = 0;
            c.state = State::Open;
            None
        }
        _ => Some(Outcome::Fatal(format!(
            "unexpected frame while {:?}: {}",
            c.state,
            String::from_utf8_lossy(&payload[..payload.len().min(200)])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::new_key;

    #[test]
    fn server_frames_of_every_length_form_parse() {
        assert!(server_frame(&[0x81]).unwrap().is_none());
        let f = server_frame(&[0x81, 2, b'h', b'i']).unwrap().unwrap();
        assert_eq!((f.opcode, f.start, f.end), (1, 2, 4));
        let mut long = vec![0x81, 126, 1, 0];
        long.resize(4 + 256, b'x');
        let f = server_frame(&long).unwrap().unwrap();
        assert_eq!((f.start, f.end), (4, 260));
        assert!(server_frame(&long[..100]).unwrap().is_none());
        let huge = [0x81, 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert!(server_frame(&huge).is_err());
        assert!(server_frame(&[0x81, 0x82, 0, 0, 0, 0]).is_err());
        assert!(server_frame(&[0x01, 1, b'x']).is_err());
    }

    #[test]
    fn stamps_ops_and_codes_are_read_from_payloads() {
        assert_eq!(
            stamp(br#"{"op":"msg","data":{"t":12345,"p":"x"}}"#),
            Some(12345)
        );
        assert_eq!(stamp(b"{}"), None);
        assert_eq!(
            seq(br#"{"op":"msg","data":{"t":1,"q":77,"p":"x"}}"#),
            Some(77)
        );
        assert_eq!(seq(br#"{"t":1}"#), None);
        assert!(has_op(br#"{"code":4008,"op":"error"}"#, "error"));
        assert!(!has_op(br#"{"op":"ok"}"#, "error"));
        assert_eq!(error_code(br#"{"op":"error","code":4008}"#), 4008);
        assert_eq!(error_code(br#"{"op":"error"}"#), 0);
    }

    #[test]
    fn a_loss_and_a_duplicate_no_longer_cancel_out() {
        let mut tally = Tally::new().unwrap();
        let mut next = 0;
        // 0, 1, then 1 again (duplicate), 3 (2 lost), 2 (late), 4.
        let taken: Vec<bool> = [0, 1, 1, 3, 2, 4]
            .into_iter()
            .map(|q| in_order(&mut next, Some(q), &mut tally))
            .collect();
        assert_eq!(taken, [true, true, false, true, false, true]);
        assert_eq!((tally.out_of_order, tally.missing), (2, 1));
        assert_eq!(next, 5);
        // Unnumbered messages are taken and change nothing.
        assert!(in_order(&mut next, None, &mut tally));
        assert_eq!((tally.out_of_order, tally.missing, next), (2, 1, 5));
    }

    /// A connection in `Upgrading` with a fresh key; its fd is never
    /// written while the response head is read.
    fn upgrading() -> Client {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut c = Client::new(fd, None);
        c.state = State::Upgrading;
        c
    }

    #[test]
    fn a_client_resubscribes_from_its_position_and_times_its_recovery() {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut c = Client::new(fd, Some(0));
        // The sub's text: after the header (2 or 4 bytes) and the mask.
        let text = |c: &Client| {
            let f = c.sub_frame("load");
            let at = if f[1] & 0x7f == 126 { 4 } else { 2 };
            let (mask, body) = f[at..].split_at(4);
            let plain: Vec<u8> = body
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            String::from_utf8(plain).unwrap()
        };
        let plain = text(&c);
        assert!(!plain.contains("since"), "no position yet");
        let (mut tally, mut total) = (Tally::new().unwrap(), 0);
        let frame = |json: &str| {
            let mut f = vec![0x81, json.len() as u8];
            f.extend_from_slice(json.as_bytes());
            f
        };
        // Subscribing: a replayed message, then the ok with its position.
        c.state = State::Subscribing;
        c.churned_at = 1_000;
        let replay = frame(r#"{"op":"msg","topic":"load","id":"17-3","data":{"t":900,"q":0}}"#);
        let ok = frame(
            r#"{"op":"ok","id":1,"topic":"load","epoch":"ep1","last":"17-4","recovered":true}"#,
        );
        let data = [replay, ok].concat();
        let (used, _) = process(
            &mut c,
            &data,
            5_000,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        assert_eq!(used, data.len());
        assert_eq!((c.state, total, c.next_seq), (State::Open, 1, 1));
        assert_eq!((tally.reconnects, tally.unrecovered), (1, 0));
        assert!(
            (3_990..=4_010).contains(&tally.recovery_us.max()),
            "4 ms, to 3 digits"
        );
        assert_eq!(&c.pos[..usize::from(c.pos_len)], b"17-4");
        // A live message moves the position; the next sub starts there.
        let live = frame(r#"{"op":"msg","topic":"load","id":"18-0","data":{"t":900,"q":1}}"#);
        process(
            &mut c,
            &live,
            6_000,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        let sub = text(&c);
        assert!(sub.contains(r#""since":"18-0","epoch":"ep1""#), "{sub}");
        // An unrecovered comeback is counted.
        c.state = State::Subscribing;
        c.since_sent = true;
        c.churned_at = 6_000;
        let ok = frame(
            r#"{"op":"ok","id":1,"topic":"load","epoch":"ep2","last":"19-0","recovered":false}"#,
        );
        process(
            &mut c,
            &ok,
            7_000,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        assert_eq!((tally.reconnects, tally.unrecovered), (2, 1));
        assert_eq!(c.epoch.as_deref(), Some("ep2"));
    }

    #[test]
    fn a_drain_frame_gives_its_wait_and_a_malformed_one_a_reason() {
        use super::super::frames::drain_wait;
        assert_eq!(
            drain_wait(br#"{"op":"drain","reconnect_in_ms":1800}"#),
            Ok(Some(1800))
        );
        assert_eq!(
            drain_wait(br#"{"reconnect_in_ms":0,"op":"drain"}"#),
            Ok(Some(0))
        );
        // Not a drain: other ops, and "op":"drain" inside a message's data.
        assert_eq!(drain_wait(br#"{"op":"ok","id":1}"#), Ok(None));
        assert_eq!(
            drain_wait(br#"{"op":"msg","topic":"t","id":"1-0","data":{"op":"drain"}}"#),
            Ok(None)
        );
        for (frame, why) in [
            (&br#"{"op":"drain"}"#[..], "without reconnect_in_ms"),
            (br#"{"op":"drain","reconnect_in_ms":null}"#, "without"),
            (
                br#"{"op":"drain","reconnect_in_ms":-5}"#,
                "not a whole number",
            ),
            (
                br#"{"op":"drain","reconnect_in_ms":1.5}"#,
                "not a whole number",
            ),
            (
                br#"{"op":"drain","reconnect_in_ms":"1800"}"#,
                "not a whole number",
            ),
            (
                br#"{"op":"drain","reconnect_in_ms":99999999999}"#,
                "over an hour",
            ),
            (br#"{"op":"drain","reconnect_in_ms":"#, "not JSON"),
        ] {
            let got = drain_wait(frame);
            assert!(
                got.is_err_and(|e| e.contains(why)),
                "{}: {got:?}",
                String::from_utf8_lossy(frame)
            );
        }
    }

    /// A text frame from the server carrying `json`.
    fn text(json: &str) -> Vec<u8> {
        let mut f = vec![0x81, json.len() as u8];
        f.extend_from_slice(json.as_bytes());
        f
    }

    #[test]
    fn a_drain_then_1001_leaves_the_client_to_the_worker_with_its_wait() {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut c = Client::new(fd, Some(0));
        c.state = State::Open;
        let (mut tally, mut total) = (Tally::new().unwrap(), 0);
        let mut close = vec![0x88, 2];
        close.extend_from_slice(&1001u16.to_be_bytes());
        let data = [text(r#"{"op":"drain","reconnect_in_ms":1800}"#), close].concat();
        let (used, outcome) = process(
            &mut c,
            &data,
            42,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        assert_eq!(used, data.len());
        assert!(matches!(outcome, Outcome::Closed(1001)));
        assert_eq!((c.state, c.drain), (State::Open, Some((42, 1800))));
        assert_eq!((tally.drains, tally.drain_wait_ms.max()), (1, 1800));
        // A malformed drain is a clear error, not a panic and not a wait.
        let mut c = Client::new(
            OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            Some(0),
        );
        c.state = State::Subscribing;
        let (_, outcome) = process(
            &mut c,
            &text(r#"{"op":"drain","reconnect_in_ms":"soon"}"#),
            0,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        let Outcome::Fatal(why) = outcome else {
            panic!("a malformed drain was taken")
        };
        assert!(
            why.contains("not a whole number") && why.contains("soon"),
            "{why}"
        );
        assert_eq!((c.drain, tally.drains), (None, 1));
    }

    #[test]
    fn welcome_names_the_node_and_a_resumed_sub_must_be_recovered() {
        let (mut tally, mut total) = (Tally::new().unwrap(), 0);
        let mut c = Client::new(
            OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            None,
        );
        c.state = State::Welcome;
        let welcome = text(r#"{"op":"welcome","conn":"c-1-2","node":"b","heartbeat":25}"#);
        let run = |c: &mut Client, data: &[u8], tally: &mut Tally, total: &mut u64| {
            process(c, data, 0, tally, total, &[], &mut Codec::default()).1
        };
        run(&mut c, &welcome, &mut tally, &mut total);
        assert_eq!((c.state, c.node.as_deref()), (State::Open, Some("b")));
        assert_eq!(tally.landed["b"], 1);
        // A `sub` with `since` answered without `recovered` (or false) may
        // have missed messages; without `since`, no `recovered` is due.
        for (since, ok, unrecovered) in [
            (true, r#"{"op":"ok","id":1,"epoch":"e","last":"1-0"}"#, 1),
            (
                true,
                r#"{"op":"ok","id":1,"epoch":"e","last":"1-0","recovered":true}"#,
                1,
            ),
            (false, r#"{"op":"ok","id":1,"epoch":"e","last":"1-0"}"#, 1),
            (
                true,
                r#"{"op":"ok","id":1,"epoch":"e","last":"1-0","recovered":false}"#,
                2,
            ),
        ] {
            c.state = State::Subscribing;
            c.since_sent = since;
            c.failures = 3;
            run(&mut c, &text(ok), &mut tally, &mut total);
            assert_eq!((c.state, c.failures), (State::Open, 0), "{ok}");
            assert_eq!(tally.unrecovered, unrecovered, "{ok}");
        }
    }

    #[test]
    fn a_refused_upgrade_is_an_attempt_that_failed() {
        let (mut tally, mut total) = (Tally::new().unwrap(), 0);
        let mut c = upgrading();
        let data = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\ndraining\n";
        let (used, outcome) = process(
            &mut c,
            data,
            0,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        assert_eq!(used, data.len());
        let Outcome::Refused(status, body) = outcome else {
            panic!("a 503 was taken")
        };
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 503 Service Unavailable", "draining")
        );
    }

    fn answer(accept: &str) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        head.extend_from_slice(b"\x81\x10{\"op\":\"welcome\"}");
        head
    }

    #[test]
    fn the_upgrade_answer_must_carry_the_accept_of_this_connections_key() {
        let (mut tally, mut total) = (Tally::new().unwrap(), 0);
        let mut c = upgrading();
        let good = tungstenite::handshake::derive_accept_key(&c.key);
        let data = answer(&good);
        let (used, outcome) = process(
            &mut c,
            &data,
            0,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        assert_eq!(used, data.len());
        assert!(
            matches!(outcome, Outcome::Progress(State::Upgrading, State::Open)),
            "{:?}",
            c.state
        );
        // Another connection's accept (here: the RFC sample key's) is refused.
        let mut c = upgrading();
        let (_, outcome) = process(
            &mut c,
            &answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            0,
            &mut tally,
            &mut total,
            &[],
            &mut Codec::default(),
        );
        let Outcome::Fatal(why) = outcome else {
            panic!("a wrong accept was taken")
        };
        let expected = tungstenite::handshake::derive_accept_key(&c.key);
        assert!(
            why.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") && why.contains(&expected),
            "{why}"
        );
    }

    #[test]
    fn each_connection_sends_its_own_key_in_the_shared_request() {
        let target = "127.0.0.1:8080".parse().unwrap();
        let (mut request, key_at) = upgrade_request(target, Some("tok"), false);
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        for key in [a, b] {
            request[key_at..key_at + key.len()].copy_from_slice(&key);
            // The server's own parser reads it as this key, 16 bytes in base64.
            let (req, used) = crate::ws::handshake::parse_request(&request, 8192)
                .unwrap()
                .unwrap();
            assert_eq!(req.key.as_bytes(), key);
            assert_eq!(
                (used, req.query.as_deref()),
                (request.len(), Some("token=tok"))
            );
        }
    }
}
