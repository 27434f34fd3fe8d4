//! A blocking Rust client for `ringcast.v1`: connect, subscribe (with
//! `since` recovery), publish, receive, close; and [`Reconnecting`], which
//! reconnects with exponential backoff and full jitter and resubscribes
//! every topic from the last id it saw. Used by the CLI and the tests.
//!
//! [`Reconnecting`] follows PROTOCOL.md section 4: after a `drain` it
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
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
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
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if !head.contains(&accept) {
            return Err(ClientError::Protocol("bad Sec-WebSocket-Accept".into()));
        }
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

/// Close codes after which the client must not reconnect (PROTOCOL.md
/// section 4): 1000 normal, 4003 forbidden (e.g. the token was revoked).
pub const FINAL_CLOSE_CODES: [u16; 2] = [1000, 4003];

/// A client that survives disconnects: it reconnects with exponential
/// backoff and full jitter, and resubscribes every topic with `since` set to
/// the last id it delivered, so nothing is missed or repeated while the
/// server still has the history. A `drain` sets when it reconnects; a
/// close in [`FINAL_CLOSE_CODES`] ends it.
#[derive(Debug)]
pub struct Reconnecting {
    url: String,
    client: Option<Client>,
    /// topic -> (last id, epoch)
    positions: HashMap<String, (Option<String>, String)>,
    /// Backoff floor and ceiling.
    pub backoff: (Duration, Duration),
    attempt: u32,
    /// Reconnects made so far.
    pub reconnects: u32,
    /// Topics whose last resubscription could not recover (`recovered:false`).
    pub unrecovered: Vec<String>,
    /// Topics whose resubscription recovered what was missed (`recovered:true`).
    pub recovered: Vec<String>,
    /// When to reconnect, as the server's `drain` asked (instead of backoff).
    reconnect_at: Option<Instant>,
    /// The final close (code, reason): no reconnecting after it.
    ended: Option<(u16, String)>,
    queue: VecDeque<Event>,
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

    /// Subscribes and remembers the topic for resubscription.
    pub fn subscribe(&mut self, topic: &str) -> Result<()> {
        let client = self
            .client
            .as_mut()
            .ok_or(ClientError::Closed(1006, "not connected".into()))?;
        let sub = client.subscribe(topic, None)?;
        self.positions.insert(topic.to_string(), (None, sub.epoch));
        Ok(())
    }

    /// The delay before reconnect attempt `attempt`: uniform in [0, min(cap, base * 2^attempt)).
    pub fn backoff_delay(&self, attempt: u32) -> Duration {
        let (base, cap) = self.backoff;
        let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
        ceiling.mul_f64(fastrand::f64())
    }

    /// The next message, reconnecting (and recovering) as needed, until
    /// `deadline`. After a close with a code in [`FINAL_CLOSE_CODES`] it
    /// does not reconnect: that close is returned as
    /// [`ClientError::Closed`], now and on every later call.
    pub fn recv(&mut self, deadline: Instant) -> Result<Event> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(self.track(e));
            }
            if let Some((code, reason)) = &self.ended {
                return Err(ClientError::Closed(*code, reason.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            let Some(client) = self.client.as_mut() else {
                self.reconnect(deadline)?;
                continue;
            };
            match client.recv(left) {
                Ok(Event::Close(code, reason)) if FINAL_CLOSE_CODES.contains(&code) => {
                    self.client = None;
                    self.ended = Some((code, reason));
                }
                Ok(Event::Close(..)) | Err(ClientError::Closed(..)) | Err(ClientError::Io(_)) => {
                    self.client = None;
                }
                Ok(Event::Frame(v)) if v["op"] == "drain" => {
                    // The server spreads these delays so its clients do not
                    // all come back at once: honour it, not our backoff.
                    let ms = v["reconnect_in_ms"].as_u64().unwrap_or(0);
                    self.reconnect_at = Some(Instant::now() + Duration::from_millis(ms));
                }
                Ok(e) => return Ok(self.track(e)),
                Err(e) => return Err(e),
            }
        }
    }

    fn track(&mut self, e: Event) -> Event {
        if let Event::Msg { topic, id, .. } = &e {
            if let Some(pos) = self.positions.get_mut(topic) {
                pos.0 = Some(id.clone());
            }
        }
        e
    }

    fn reconnect(&mut self, deadline: Instant) -> Result<()> {
        loop {
            match self.reconnect_at {
                // Drained: the first attempt waits for the server's delay.
                Some(at) => {
                    std::thread::sleep(at.min(deadline).saturating_duration_since(Instant::now()));
                    if Instant::now() < at {
                        // Timed out first; the next call goes on waiting.
                        return Err(ClientError::Timeout);
                    }
                    self.reconnect_at = None;
                }
                None => {
                    std::thread::sleep(self.backoff_delay(self.attempt));
                    self.attempt += 1;
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout);
                    }
                }
            }
            let Ok(mut client) = Client::connect(&self.url) else {
                continue;
            };
            let topics: Vec<(String, Option<String>, String)> = self
                .positions
                .iter()
                .map(|(t, (id, ep))| (t.clone(), id.clone(), ep.clone()))
                .collect();
            let mut ok = true;
            for (topic, last, epoch) in topics {
                let since = last.as_deref().map(|id| (id, epoch.as_str()));
                match client.subscribe(&topic, since) {
                    Ok(sub) => {
                        match sub.recovered {
                            Some(true) => self.recovered.push(topic.clone()),
                            Some(false) => self.unrecovered.push(topic.clone()),
                            None => {}
                        }
                        self.queue.extend(sub.replayed);
                        if let Some(pos) = self.positions.get_mut(&topic) {
                            pos.1 = sub.epoch;
                        }
                    }
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                self.attempt = 0;
                self.reconnects += 1;
                self.client = Some(client);
                return Ok(());
            }
        }
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
}
