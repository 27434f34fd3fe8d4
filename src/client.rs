//! A blocking Rust client for `ringcast.v1`: connect, subscribe (with
//! `since` recovery), publish, receive, close; and [`Reconnecting`], which
//! reconnects with exponential backoff and full jitter and resubscribes
//! every topic from its position (the last id it saw, or the `last` of the
//! `sub`'s `ok`). Used by the CLI, the tests and the load tool (which
//! borrows [`new_key`] and [`check_accept`] for its own handshakes).
//!
//! Every connection sends a fresh random `Sec-WebSocket-Key` and checks the
//! server's `Sec-WebSocket-Accept` against it (RFC 6455 §4.1).
//!
//! [`Reconnecting`] follows docs/PROTOCOL.md section 4: after a `drain` it
//! reconnects when `reconnect_in_ms` has passed, not on its backoff; after
//! a close with 1000 (normal) or 4003 (forbidden) it does not reconnect at
//! all and reports the close as an error.
//!
//! It speaks plain `ws://` over a std `TcpStream` (TLS is terminated in
//! front of ringcast); frames are decoded with the crate's own codec in
//! client mode and sent masked as RFC 6455 requires.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::{json, Value};

use crate::id::MsgId;
use crate::ws::frame::{encode_masked, Decoder, Message, OpCode};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `ws://host:port/path`.
    #[error("bad url {0:?}: expected ws://host:port/path")]
    Url(String),
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The server refused the upgrade.
    #[error("upgrade refused: {0}")]
    Refused(String),
    /// The `101` answer's `Sec-WebSocket-Accept` is not the one derived
    /// from the key sent (RFC 6455 §4.1): the server did not read this
    /// request, or something in between rewrote the answer.
    #[error(
        "Sec-WebSocket-Accept {got:?} does not answer Sec-WebSocket-Key {key:?}: \
         expected {expected:?}"
    )]
    BadAccept {
        /// The `Sec-WebSocket-Key` sent.
        key: String,
        /// The accept value derived from it.
        expected: String,
        /// The value the server sent (empty when it sent none).
        got: String,
    },
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server answered a request with `error`.
    #[error("server error {code}: {reason}")]
    Server {
        /// The error code.
        code: u16,
        /// The reason.
        reason: String,
    },
    /// The connection closed (close code, reason).
    #[error("closed by server: {0} {1}")]
    Closed(u16, String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

/// Client result.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Something the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A `msg` frame.
    Msg {
        /// Topic.
        topic: String,
        /// Message id.
        id: String,
        /// Payload.
        data: Value,
    },
    /// Any other JSON frame (`ok`, `error`, `drain`, `pong`, ...).
    Frame(Value),
    /// A close frame: code and reason.
    Close(u16, String),
}

/// The `ok` of a `sub`.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    /// The topic's epoch.
    pub epoch: String,
    /// The topic's position when the subscription became live (`MS-SEQ`,
    /// `"0-0"` when it never had a message): resubscribing with `since` =
    /// `last` recovers what came after. Empty when the server does not
    /// send it (before protocol v1.1).
    pub last: String,
    /// Present when `since` was sent.
    pub recovered: Option<bool>,
    /// Messages replayed before the `ok`.
    pub replayed: Vec<Event>,
}

/// One connection to a ringcast server.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    inbuf: BytesMut,
    decoder: Decoder,
    pending: VecDeque<Event>,
    next_id: u64,
    /// The `welcome` frame.
    pub welcome: Value,
    /// How long a request waits for its answer.
    pub timeout: Duration,
}

fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(ClientError::Url(url.into()));
    }
    Ok((host.to_string(), path.to_string()))
}

impl Client {
    /// Connects, upgrades and reads `welcome`.
    pub fn connect(url: &str) -> Result<Client> {
        Self::connect_with(url, &[("Sec-WebSocket-Protocol", "ringcast.v1")])
    }

    /// Connects with extra request headers (tests: Origin, protocols).
    pub fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Client> {
        let (host, path) = parse_url(url)?;
        let addr = host
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::Url(url.into()))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let key = new_key();
        let key = std::str::from_utf8(&key).expect("base64 is ASCII");
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes())?;
        let mut inbuf = BytesMut::with_capacity(4096);
        let head_end = loop {
            if let Some(i) = inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if inbuf.len() > 16384 {
                return Err(ClientError::Protocol("response head too large".into()));
            }
            read_more(&mut stream, &mut inbuf)?;
        };
        let head = String::from_utf8_lossy(&inbuf[..head_end]).to_string();
        let _ = inbuf.split_to(head_end);
        if !head.starts_with("HTTP/1.1 101") {
            let mut body = String::from_utf8_lossy(&inbuf).to_string();
            // The body may still be arriving; read what is there.
            let mut more = [0u8; 1024];
            if let Ok(n) = stream.read(&mut more) {
                body.push_str(&String::from_utf8_lossy(&more[..n]));
            }
            let status = head.lines().next().unwrap_or_default();
            return Err(ClientError::Refused(format!("{status}: {}", body.trim())));
        }
        check_accept(head.as_bytes(), key.as_bytes())?;
        let mut c = Client {
            stream,
            inbuf,
            decoder: Decoder::new_client(64 << 20),
            pending: VecDeque::new(),
            next_id: 1,
            welcome: Value::Null,
            timeout: Duration::from_secs(5),
        };
        match c.next_frame(Instant::now() + c.timeout)? {
            Event::Frame(v) if v["op"] == "welcome" => c.welcome = v,
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )))
            }
        }
        Ok(c)
    }

    /// Sends one text frame as is.
    pub fn send_text(&mut self, text: &str) -> Result<()> {
        self.send_frame(OpCode::Text, text.as_bytes())
    }

    fn send_frame(&mut self, op: OpCode, payload: &[u8]) -> Result<()> {
        let mask = fastrand::u32(..).to_be_bytes();
        self.stream
            .write_all(&encode_masked(op, true, payload, mask))?;
        Ok(())
    }

    /// Sends a request with a fresh `id` and waits for the reply carrying
    /// it; frames received meanwhile are kept for [`Client::recv`].
    pub fn request(&mut self, mut req: Value) -> Result<(Value, Vec<Event>)> {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = json!(id);
        self.send_text(&req.to_string())?;
        let deadline = Instant::now() + self.timeout;
        let mut before = Vec::new();
        loop {
            match self.next_frame(deadline)? {
                Event::Frame(v) if v["id"] == json!(id) => {
                    if v["op"] == "error" {
                        return Err(ClientError::Server {
                            code: v["code"].as_u64().unwrap_or(0) as u16,
                            reason: v["reason"].as_str().unwrap_or_default().into(),
                        });
                    }
                    return Ok((v, before));
                }
                Event::Close(code, reason) => return Err(ClientError::Closed(code, reason)),
                other => before.push(other),
            }
        }
    }

    /// Subscribes; with `since` = (last id, epoch), the missed messages come
    /// back in `replayed`.
    pub fn subscribe(&mut self, topic: &str, since: Option<(&str, &str)>) -> Result<Subscribed> {
        let mut req = json!({"op": "sub", "topic": topic});
        if let Some((id, epoch)) = since {
            req["since"] = json!(id);
            req["epoch"] = json!(epoch);
        }
        let (ok, before) = self.request(req)?;
        let (replayed, other): (Vec<Event>, Vec<Event>) = before
            .into_iter()
            .partition(|e| matches!(e, Event::Msg { topic: t, .. } if t == topic));
        self.pending.extend(other);
        Ok(Subscribed {
            epoch: ok["epoch"].as_str().unwrap_or_default().to_string(),
            last: ok["last"].as_str().unwrap_or_default().to_string(),
            recovered: ok["recovered"].as_bool(),
            replayed,
        })
    }

    /// Unsubscribes.
    pub fn unsubscribe(&mut self, topic: &str) -> Result<()> {
        let (_, before) = self.request(json!({"op": "unsub", "topic": topic}))?;
        self.pending.extend(before);
        Ok(())
    }

    /// Publishes and returns the new message id.
    pub fn publish(&mut self, topic: &str, data: &Value) -> Result<String> {
        let (ok, before) = self.request(json!({"op": "pub", "topic": topic, "data": data}))?;
        self.pending.extend(before);
        Ok(ok["mid"].as_str().unwrap_or_default().to_string())
    }

    /// The next event, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Event> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        self.next_frame(Instant::now() + timeout)
    }

    /// Sends a close frame (1000) and waits briefly for the server's.
    pub fn close(mut self) {
        let _ = self.send_frame(OpCode::Close, &1000u16.to_be_bytes());
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(e) = self.next_frame(deadline) {
            if matches!(e, Event::Close(..)) {
                break;
            }
        }
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Event> {
        loop {
            match self.decoder.decode(&mut self.inbuf) {
                Ok(Some(Message::Text(t))) => {
                    let v: Value = serde_json::from_slice(&t)
                        .map_err(|e| ClientError::Protocol(format!("frame is not JSON: {e}")))?;
                    if v["op"] == "msg" {
                        return Ok(Event::Msg {
                            topic: v["topic"].as_str().unwrap_or_default().into(),
                            id: v["id"].as_str().unwrap_or_default().into(),
                            data: v["data"].clone(),
                        });
                    }
                    return Ok(Event::Frame(v));
                }
                Ok(Some(Message::Ping(p))) => self.send_frame(OpCode::Pong, &p)?,
                Ok(Some(Message::Close(c))) => {
                    let (code, reason) = c.unwrap_or((1005, String::new()));
                    return Ok(Event::Close(code, reason));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout);
                    }
                    self.stream.set_read_timeout(Some(left))?;
                    match read_more(&mut self.stream, &mut self.inbuf) {
                        Err(ClientError::Io(e))
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            return Err(ClientError::Timeout)
                        }
                        other => other?,
                    }
                }
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }
}

/// A fresh `Sec-WebSocket-Key` for one connection (RFC 6455 §4.1): a
/// random 16-byte nonce, base64-encoded. Never a fixed key: the RFC asks
/// for a new nonce per connection, and some servers and proxies refuse a
/// key they have seen before (the RFC's sample key above all). No
/// allocation: the load tool calls this for every one of its connections.
pub fn new_key() -> [u8; 24] {
    encode_nonce(fastrand::u128(..).to_ne_bytes())
}

/// Base64 (RFC 4648 §4, padded) of a 16-byte nonce: five 3-byte groups
/// make 20 characters, the last byte 2 more, then `==`.
fn encode_nonce(nonce: [u8; 16]) -> [u8; 24] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = [b'='; 24];
    for (group, bytes) in nonce.chunks(3).enumerate() {
        let bits = bytes
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        // n bytes carry n + 1 characters; the rest stays `=`.
        for i in 0..=bytes.len() {
            out[group * 4 + i] = ALPHABET[(bits >> (18 - 6 * i)) as usize & 63];
        }
    }
    out
}

/// Most response headers [`check_accept`] reads; a `101` has a handful.
const MAX_RESPONSE_HEADERS: usize = 32;

/// Checks that a `101` response `head` (status line through the blank
/// line) carries the `Sec-WebSocket-Accept` derived from `key`, the
/// `Sec-WebSocket-Key` sent (RFC 6455 §4.1, §4.2.2). The only allocation
/// on success is the derived value.
pub fn check_accept(head: &[u8], key: &[u8]) -> Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Protocol("incomplete response head".into()))
        }
        Err(e) => return Err(ClientError::Protocol(format!("bad response head: {e}"))),
    }
    let got = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Accept"))
        .map_or(&b""[..], |h| h.value.trim_ascii());
    let expected = tungstenite::handshake::derive_accept_key(key);
    if got == expected.as_bytes() {
        return Ok(());
    }
    Err(ClientError::BadAccept {
        key: String::from_utf8_lossy(key).into_owned(),
        expected,
        got: String::from_utf8_lossy(got).into_owned(),
    })
}

fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<()> {
    let mut chunk = [0u8; 16384];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err(ClientError::Closed(
            1006,
            "connection ended without a close frame".into(),
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Close codes after which the client must not reconnect (docs/PROTOCOL.md
/// section 4): 1000 normal, 4003 forbidden (e.g. the token was revoked).
pub const FINAL_CLOSE_CODES: [u16; 2] = [1000, 4003];

/// Error codes of a refused `sub` that [`Reconnecting`] retries with
/// backoff on the same connection (docs/PROTOCOL.md section 4): 4503
/// broker unavailable, 4008 rate limited. Any other refusal is final for
/// that topic.
pub const RETRY_SUB_CODES: [u16; 2] = [4008, 4503];

/// A client that survives disconnects: it reconnects with exponential
/// backoff and full jitter, and resubscribes every topic with `since` set
/// to its position, so nothing is missed or repeated while the server
/// still has the history. A `drain` sets when it reconnects; a close in
/// [`FINAL_CLOSE_CODES`] ends it.
///
/// A topic's position is the id of the last thing the client received
/// about it: a `msg`, or the `last` of a `sub`'s `ok` (docs/PROTOCOL.md
/// section 2), so a topic that was quiet while subscribed recovers what
/// was published while the client was away. After `recovered:false` the
/// position is the new `ok`'s `last`: the old one means nothing in the new
/// history.
///
/// A `sub` refused with a code in [`RETRY_SUB_CODES`] is retried with
/// backoff; refused with another code, or ended by the server (an `error`
/// without `id` that carries `topic`), the topic is dropped, never
/// resubscribed, and the `error` is returned by [`Reconnecting::recv`].
#[derive(Debug)]
pub struct Reconnecting {
    url: String,
    client: Option<Client>,
    positions: HashMap<String, Position>,
    /// Topics whose `sub` was refused with a retryable code.
    retries: Vec<Retry>,
    /// Backoff floor and ceiling.
    pub backoff: (Duration, Duration),
    attempt: u32,
    /// Reconnects made so far.
    pub reconnects: u32,
    /// Topics whose resubscription could not recover (`recovered:false`),
    /// one entry per resubscription.
    pub unrecovered: Vec<String>,
    /// Topics whose resubscription recovered what was missed
    /// (`recovered:true`), one entry per resubscription.
    pub recovered: Vec<String>,
    /// When to try to reconnect next: the server's `drain` delay, or the
    /// backoff after a lost connection or a failed attempt.
    reconnect_at: Option<Instant>,
    /// The final close (code, reason): no reconnecting after it.
    ended: Option<(u16, String)>,
    /// Events received but not yet returned: replays, dropped topics.
    queue: VecDeque<Event>,
}

/// Where a subscribed topic is: what its next `sub` sends as `since`.
#[derive(Debug, Clone, Default)]
struct Position {
    /// The last message id received, or the `last` of the newest `ok`;
    /// `None` until the server has given one (it always does since v1.1).
    id: Option<String>,
    /// The topic's epoch, from the newest `ok`.
    epoch: String,
}

/// A refused `sub` waiting for its next try.
#[derive(Debug)]
struct Retry {
    topic: String,
    at: Instant,
    /// Tries made so far: sets the next backoff.
    attempt: u32,
}

impl Reconnecting {
    /// Connects now (failing if the first connect fails).
    pub fn connect(url: &str) -> Result<Reconnecting> {
        Ok(Self::new(url, Some(Client::connect(url)?)))
    }

    fn new(url: &str, client: Option<Client>) -> Reconnecting {
        Reconnecting {
            url: url.to_string(),
            client,
            positions: HashMap::new(),
            retries: Vec::new(),
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            attempt: 0,
            reconnects: 0,
            unrecovered: Vec::new(),
            recovered: Vec::new(),
            reconnect_at: None,
            ended: None,
            queue: VecDeque::new(),
        }
    }

    /// Subscribes and remembers the topic for resubscription. A refusal
    /// with a code in [`RETRY_SUB_CODES`] is not an error: the `sub` is
    /// retried with backoff while [`Reconnecting::recv`] runs. Any other
    /// refusal is returned, and the topic is not kept.
    pub fn subscribe(&mut self, topic: &str) -> Result<()> {
        let client = self
            .client
            .as_mut()
            .ok_or(ClientError::Closed(1006, "not connected".into()))?;
        match client.subscribe(topic, None) {
            Ok(sub) => self.settle(topic, sub),
            Err(ClientError::Server { code, .. }) if RETRY_SUB_CODES.contains(&code) => {
                self.positions
                    .insert(topic.to_string(), Position::default());
                self.retry_later(topic, 0);
            }
            Err(e) => {
                if matches!(e, ClientError::Closed(..) | ClientError::Io(_)) {
                    self.lost();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Topics subscribed (or waiting to be), in no particular order.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.positions.keys().map(String::as_str)
    }

    /// A topic's position: (the id its next `sub` sends as `since`, if
    /// any; its epoch).
    pub fn position(&self, topic: &str) -> Option<(Option<&str>, &str)> {
        self.positions
            .get(topic)
            .map(|p| (p.id.as_deref(), p.epoch.as_str()))
    }

    /// The delay before reconnect attempt `attempt`: uniform in [0, min(cap, base * 2^attempt)).
    pub fn backoff_delay(&self, attempt: u32) -> Duration {
        let (base, cap) = self.backoff;
        let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
        ceiling.mul_f64(fastrand::f64())
    }

    /// The next event, reconnecting (and recovering) as needed, until
    /// `deadline`. After a close with a code in [`FINAL_CLOSE_CODES`] it
    /// does not reconnect: that close is returned as
    /// [`ClientError::Closed`], now and on every later call.
    pub fn recv(&mut self, deadline: Instant) -> Result<Event> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            if let Some((code, reason)) = &self.ended {
                return Err(ClientError::Closed(*code, reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout);
            }
            if self.client.is_none() {
                self.reconnect(deadline)?;
                continue;
            }
            if self.retry_due(now) {
                continue;
            }
            // Wake for the next retry, if it comes before the deadline.
            let wake = self
                .retries
                .iter()
                .map(|r| r.at)
                .min()
                .map_or(deadline, |at| at.min(deadline));
            let client = self.client.as_mut().expect("connected: checked above");
            match client.recv(wake.saturating_duration_since(now)) {
                Ok(Event::Close(code, reason)) if FINAL_CLOSE_CODES.contains(&code) => {
                    self.client = None;
                    self.ended = Some((code, reason));
                }
                Ok(Event::Close(..)) | Err(ClientError::Closed(..)) | Err(ClientError::Io(_)) => {
                    self.lost();
                }
                Ok(Event::Frame(v)) if v["op"] == "drain" => {
                    // The server spreads these delays so its clients do not
                    // all come back at once: honour it, not our backoff.
                    let ms = v["reconnect_in_ms"].as_u64().unwrap_or(0);
                    self.reconnect_at = Some(Instant::now() + Duration::from_millis(ms));
                }
                Ok(Event::Frame(v)) => {
                    if let Some(topic) = ended_subscription(&v) {
                        self.drop_topic(topic);
                    }
                    return Ok(Event::Frame(v));
                }
                Ok(Event::Msg { topic, id, data }) => {
                    if let Some(pos) = self.positions.get_mut(&topic) {
                        pos.id = Some(newer(pos.id.take(), &id));
                    }
                    return Ok(Event::Msg { topic, id, data });
                }
                // The wake for a retry, or the deadline: the loop tells.
                Err(ClientError::Timeout) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The connection is gone: reconnect after the backoff (unless a
    /// `drain` already set when). Every topic, those waiting for a retry
    /// included, is resubscribed on the next connection.
    fn lost(&mut self) {
        self.client = None;
        self.retries.clear();
        if self.reconnect_at.is_none() {
            self.reconnect_at = Some(Instant::now() + self.backoff_delay(self.attempt));
        }
    }

    fn reconnect(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(at) = self.reconnect_at {
                std::thread::sleep(at.min(deadline).saturating_duration_since(Instant::now()));
                if Instant::now() < at {
                    // The deadline came first; the next call goes on waiting.
                    return Err(ClientError::Timeout);
                }
                self.reconnect_at = None;
            }
            match self.resume() {
                Ok(client) => {
                    self.attempt = 0;
                    self.reconnects += 1;
                    self.client = Some(client);
                    return Ok(());
                }
                Err(_) => {
                    self.attempt += 1;
                    self.reconnect_at = Some(Instant::now() + self.backoff_delay(self.attempt));
                }
            }
        }
    }

    /// Connects and resubscribes every topic; an error only when the new
    /// connection failed. What the `sub`s received is settled at once, so
    /// a later attempt after a failure resubscribes from there.
    fn resume(&mut self) -> Result<Client> {
        self.retries.clear();
        let mut client = Client::connect(&self.url)?;
        let topics: Vec<String> = self.positions.keys().cloned().collect();
        for topic in topics {
            self.resubscribe(&mut client, &topic, 0)?;
        }
        Ok(client)
    }

    /// Runs the first retry that is due, if any; whether one was.
    fn retry_due(&mut self, now: Instant) -> bool {
        let Some(i) = self.retries.iter().position(|r| r.at <= now) else {
            return false;
        };
        let retry = self.retries.swap_remove(i);
        let mut client = self.client.take().expect("retries run connected");
        match self.resubscribe(&mut client, &retry.topic, retry.attempt) {
            Ok(()) => self.client = Some(client),
            Err(_) => self.lost(),
        }
        true
    }

    /// Sends `topic`'s `sub` on `client` from its position and settles the
    /// answer. A retryable refusal schedules try `attempt + 1`; another
    /// refusal drops the topic. An error only when the connection failed.
    fn resubscribe(&mut self, client: &mut Client, topic: &str, attempt: u32) -> Result<()> {
        let since = self
            .positions
            .get(topic)
            .and_then(|p| Some((p.id.as_deref()?, p.epoch.as_str())));
        match client.subscribe(topic, since) {
            Ok(sub) => self.settle(topic, sub),
            Err(ClientError::Server { code, .. }) if RETRY_SUB_CODES.contains(&code) => {
                self.retry_later(topic, attempt);
            }
            Err(ClientError::Server { code, reason }) => {
                // Surfaced as the server says a subscription ended.
                self.drop_topic(topic);
                let ended = json!({"op": "error", "code": code, "topic": topic, "reason": reason});
                self.queue.push_back(Event::Frame(ended));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn retry_later(&mut self, topic: &str, attempt: u32) {
        self.retries.push(Retry {
            topic: topic.to_string(),
            at: Instant::now() + self.backoff_delay(attempt),
            attempt: attempt + 1,
        });
    }

    fn drop_topic(&mut self, topic: &str) {
        self.positions.remove(topic);
        self.retries.retain(|r| r.topic != topic);
    }

    /// Takes in a `sub`'s answer: queues the replay and moves the topic's
    /// position to the newest id received, in the order received (the
    /// replay, then the `ok`'s `last`).
    fn settle(&mut self, topic: &str, sub: Subscribed) {
        let old = self.positions.remove(topic);
        let mut id = match sub.recovered {
            Some(true) => old.and_then(|p| p.id),
            // `recovered:false`: the old position is not in this history.
            Some(false) | None => None,
        };
        match sub.recovered {
            Some(true) => self.recovered.push(topic.to_string()),
            Some(false) => self.unrecovered.push(topic.to_string()),
            None => {}
        }
        for e in &sub.replayed {
            if let Event::Msg { id: m, .. } = e {
                id = Some(newer(id, m));
            }
        }
        if !sub.last.is_empty() {
            id = Some(newer(id, &sub.last));
        }
        let position = Position {
            id,
            epoch: sub.epoch,
        };
        self.positions.insert(topic.to_string(), position);
        self.queue.extend(sub.replayed);
    }
}

/// The topic of an `error` without `id` that carries `topic`: the server
/// ended that subscription (docs/PROTOCOL.md section 2).
fn ended_subscription(v: &Value) -> Option<&str> {
    if v["op"] != "error" || !v["id"].is_null() {
        return None;
    }
    v["topic"].as_str()
}

/// A topic's position after receiving `received`: that id, unless both
/// parse and it is older. Ids of one topic only grow, so an older one
/// would be a server's mistake; following it would replay duplicates.
fn newer(current: Option<String>, received: &str) -> String {
    let older = |c: &str| match (c.parse::<MsgId>(), received.parse::<MsgId>()) {
        (Ok(c), Ok(r)) => r < c,
        _ => false,
    };
    match current {
        Some(c) if older(&c) => c,
        _ => received.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("ws://127.0.0.1:80/ws?x=1").unwrap(),
            ("127.0.0.1:80".into(), "/ws?x=1".into())
        );
        assert!(parse_url("http://x/ws").is_err());
        assert!(parse_url("ws:///ws").is_err());
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut r = Reconnecting::new("", None);
        r.backoff = (Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..40 {
            let ceiling =
                Duration::from_millis(100 * (1u64 << attempt.min(16))).min(Duration::from_secs(1));
            // Full jitter: uniform in [0, ceiling). 200 draws all in one
            // half, or all equal, has odds of 2^-200 for a real jitter.
            let draws: Vec<Duration> = (0..200).map(|_| r.backoff_delay(attempt)).collect();
            for d in &draws {
                assert!(
                    *d < ceiling,
                    "attempt {attempt}: {d:?} not under {ceiling:?}"
                );
            }
            let low = draws.iter().filter(|d| **d < ceiling / 2).count();
            assert!(
                low > 0 && low < draws.len(),
                "attempt {attempt}: not spread over [0, {ceiling:?}): {draws:?}"
            );
            assert!(
                draws.iter().any(|d| *d != draws[0]),
                "attempt {attempt}: constant"
            );
        }
        // The ceiling grows with the attempt: by 4, draws reach past attempt 0's.
        assert!(
            (0..200).any(|_| r.backoff_delay(4) >= Duration::from_millis(100)),
            "no exponential growth"
        );
    }

    /// Base64 decoding (RFC 4648 §4), written apart from the encoder.
    fn decode_base64(s: &str) -> Option<Vec<u8>> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        };
        if !s.len().is_multiple_of(4) {
            return None;
        }
        let body = s.trim_end_matches('=');
        if s.len() - body.len() > 2 {
            return None;
        }
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in body.bytes() {
            bits = bits << 6 | u32::from(value(c)?);
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        Some(out)
    }

    #[test]
    fn keys_are_16_random_bytes_in_base64() {
        // RFC 6455 §1.3: the sample nonce encodes to the sample key.
        let sample = encode_nonce(*b"the sample nonce");
        assert_eq!(&sample, b"dGhlIHNhbXBsZSBub25jZQ==");
        for _ in 0..1000 {
            let nonce = fastrand::u128(..).to_ne_bytes();
            let key = encode_nonce(nonce);
            let text = std::str::from_utf8(&key).unwrap();
            assert_eq!(decode_base64(text).unwrap(), nonce, "{text}");
        }
        let keys: std::collections::HashSet<[u8; 24]> = (0..1000).map(|_| new_key()).collect();
        assert_eq!(keys.len(), 1000);
    }

    /// A one-shot upgrade server: answers each of `accepts.len()`
    /// connections with a 101 whose `Sec-WebSocket-Accept` is
    /// `accepts[n](key)` (no header when `None`), then `welcome`; sends each
    /// request head it read on the channel.
    fn upgrade_server(
        accepts: Vec<fn(&str) -> Option<String>>,
    ) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for accept in accepts {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap();
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap_or_default()
                    .to_string();
                let mut answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                                  Connection: Upgrade\r\n"
                    .to_string();
                if let Some(a) = accept(&key) {
                    answer.push_str(&format!("Sec-WebSocket-Accept: {a}\r\n"));
                }
                answer.push_str("\r\n");
                let welcome = br#"{"op":"welcome","conn":"c-0-1","node":"t","heartbeat":25}"#;
                let mut out = answer.into_bytes();
                out.extend_from_slice(&[0x81, welcome.len() as u8]);
                out.extend_from_slice(welcome);
                s.write_all(&out).unwrap();
                tx.send(head).unwrap();
                // The client may still be reading: keep the socket until it goes.
                std::thread::spawn(move || s.read(&mut byte));
            }
        });
        (url, rx)
    }

    fn right(key: &str) -> Option<String> {
        Some(tungstenite::handshake::derive_accept_key(key.as_bytes()))
    }

    fn sent_key(head: &str) -> String {
        let keys: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .collect();
        assert_eq!(keys.len(), 1, "{head}");
        keys[0].to_string()
    }

    #[test]
    fn every_connection_sends_a_fresh_key_and_checks_its_accept() {
        let (url, heads) = upgrade_server(vec![right, right]);
        let a = Client::connect(&url).unwrap();
        let b = Client::connect(&url).unwrap();
        assert_eq!(
            (a.welcome["op"].as_str(), b.welcome["op"].as_str()),
            (Some("welcome"), Some("welcome"))
        );
        let (ka, kb) = (
            sent_key(&heads.recv().unwrap()),
            sent_key(&heads.recv().unwrap()),
        );
        assert_ne!(ka, kb, "two connections sent the same key");
        for key in [&ka, &kb] {
            assert_ne!(key, "dGhlIHNhbXBsZSBub25jZQ==");
            assert_eq!(key.len(), 24, "{key}");
            assert_eq!(decode_base64(key).map(|n| n.len()), Some(16), "{key}");
        }
    }

    #[test]
    fn a_wrong_or_missing_accept_is_refused_naming_both_values() {
        // The RFC sample key's accept: right for no random key.
        let sample = |_: &str| Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string());
        let (url, heads) = upgrade_server(vec![sample, |_| None]);
        let err = Client::connect(&url).unwrap_err();
        let key = sent_key(&heads.recv().unwrap());
        let expected = right(&key).unwrap();
        let text = err.to_string();
        match err {
            ClientError::BadAccept {
                key: k,
                expected: e,
                got,
            } => assert_eq!(
                (k.as_str(), e.as_str(), got.as_str()),
                (
                    key.as_str(),
                    expected.as_str(),
                    "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                )
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            text.contains(&expected) && text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{text}"
        );
        match Client::connect(&url) {
            Err(ClientError::BadAccept { got, .. }) => assert_eq!(got, ""),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_accept_header_is_found_in_any_case_and_spacing() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let head = b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept:   \
                     s3pPLMBiTxaQ9kYGzzhZRbK+xOo=  \r\n\r\n";
        check_accept(head, key).unwrap();
        assert!(matches!(
            check_accept(b"HTTP/1.1 101 OK\r\n", key),
            Err(ClientError::Protocol(_))
        ));
    }

    fn msg(topic: &str, id: &str) -> Event {
        Event::Msg {
            topic: topic.into(),
            id: id.into(),
            data: Value::Null,
        }
    }

    fn ok(last: &str, recovered: Option<bool>, replayed: Vec<Event>) -> Subscribed {
        Subscribed {
            epoch: "ep".into(),
            last: last.into(),
            recovered,
            replayed,
        }
    }

    #[test]
    fn the_position_is_the_newest_id_received_msg_or_ok() {
        let mut r = Reconnecting::new("", None);
        // A quiet topic: the `ok`'s `last` is the position.
        r.settle("t", ok("0-0", None, vec![]));
        assert_eq!(r.position("t"), Some((Some("0-0"), "ep")));
        // Recovered: the replay, then the `ok` (whose `last` may be past
        // the topic's newest id: the broker's position).
        r.settle(
            "t",
            ok("9-0", Some(true), vec![msg("t", "5-0"), msg("t", "7-0")]),
        );
        assert_eq!(r.position("t"), Some((Some("9-0"), "ep")));
        assert_eq!(r.queue.len(), 2);
        assert_eq!(r.recovered, ["t"]);
        // A `last` older than what was replayed does not move it back.
        r.settle("t", ok("8-0", Some(true), vec![msg("t", "10-0")]));
        assert_eq!(r.position("t"), Some((Some("10-0"), "ep")));
        // Recovered, nothing replayed, no `last` (a server before v1.1).
        r.settle("t", ok("", Some(true), vec![]));
        assert_eq!(r.position("t"), Some((Some("10-0"), "ep")));
        // Not recovered: the new history's `last`, even if smaller.
        r.settle("t", ok("3-0", Some(false), vec![]));
        assert_eq!(r.position("t"), Some((Some("3-0"), "ep")));
        assert_eq!(r.unrecovered, ["t"]);
        // Without `last`, no position until a `msg`.
        r.settle("u", ok("", None, vec![]));
        assert_eq!(r.position("u"), Some((None, "ep")));
        assert_eq!(newer(None, "1-0"), "1-0");
        assert_eq!(newer(Some("2-0".into()), "1-5"), "2-0");
        assert_eq!(newer(Some("2-0".into()), "2-1"), "2-1");
        assert_eq!(newer(Some("x".into()), "1-0"), "1-0");
    }

    #[test]
    fn only_an_error_without_id_carrying_a_topic_ends_a_subscription() {
        let ended = json!({"op":"error","code":4403,"topic":"t","reason":"subscription ended"});
        assert_eq!(ended_subscription(&ended), Some("t"));
        let answer = json!({"op":"error","id":3,"code":4403,"topic":"t","reason":"no"});
        assert_eq!(ended_subscription(&answer), None);
        let other = json!({"op":"error","code":4000,"reason":"bad request"});
        assert_eq!(ended_subscription(&other), None);
        assert_eq!(ended_subscription(&json!({"op":"ok","topic":"t"})), None);
    }
}
