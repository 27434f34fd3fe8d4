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
//! all and reports the close as an error. With a token provider
//! ([`Reconnecting::with_token`]) it authenticates every connection in its
//! first `auth` frame, refreshes the token by `auth` before its `exp`, and
//! reconnects with a fresh token after 4001; it detects a dead link with
//! the `ping` op (heartbeat.rs).
//!
//! It speaks plain `ws://` over a std `TcpStream` (TLS is terminated in
//! front of ringcast); frames are decoded with the crate's own codec in
//! client mode and sent masked as RFC 6455 requires.

mod close;
mod handshake;
mod heartbeat;
mod http;
mod reconnecting;
mod token;

pub use close::{after_close, AfterClose, Disconnect, FINAL_CLOSE_CODES};
pub use handshake::{check_accept, new_key};
pub use http::http_publish;
pub use reconnecting::{Reconnecting, RETRY_SUB_CODES};
pub use token::{
    refresh_delay, retry_delay, token_expiry, MIN_REFRESH_DELAY, TOKEN_REFRESH_MARGIN,
};

use std::collections::VecDeque;
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
    /// The token provider of [`Reconnecting::with_token`] gave no token
    /// (its reason): the client gave up.
    #[error("token provider failed: {0}")]
    Token(String),
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
    /// When bytes from the server last arrived (the heartbeat's clock).
    last_rx: Instant,
    /// The `id` of the first `auth` frame, when the connection sent one.
    auth_id: Option<u64>,
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

/// The request headers of a plain connect: our subprotocol.
const SUBPROTOCOL: [(&str, &str); 1] = [("Sec-WebSocket-Protocol", "ringcast.v1")];

/// How long [`Client::connect`] may take, from the TCP connect to `welcome`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// Connects, upgrades and reads `welcome`.
    pub fn connect(url: &str) -> Result<Client> {
        Self::connect_with(url, &SUBPROTOCOL)
    }

    /// Connects with extra request headers (tests: Origin, protocols).
    pub fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Client> {
        Self::open(url, headers, None, CONNECT_TIMEOUT)
    }

    /// Connects and authenticates with `token` in the first frame,
    /// `{"op":"auth"}` (docs/PROTOCOL.md section 1), then reads `welcome`.
    /// A refused token is [`ClientError::Closed`] with 4001 and the
    /// server's reason.
    pub fn connect_with_token(url: &str, token: &str) -> Result<Client> {
        Self::open(url, &SUBPROTOCOL, Some(token), CONNECT_TIMEOUT)
    }

    /// Connects within `timeout` (TCP connect, upgrade and `welcome`),
    /// sending `token` in an `auth` frame (with an `id`) right after the
    /// upgrade when there is one.
    fn open(
        url: &str,
        headers: &[(&str, &str)],
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        let (host, path) = parse_url(url)?;
        let addr = host
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::Url(url.into()))?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            stream.set_read_timeout(Some(left))?;
            read_more(&mut stream, &mut inbuf).map_err(timed_out)?;
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
            last_rx: Instant::now(),
            auth_id: None,
            welcome: Value::Null,
            timeout: Duration::from_secs(5),
        };
        if let Some(token) = token {
            // Not `?token=`: a token in the URL lands in proxies' access
            // logs, and this way a refused token is a 4001 close with the
            // server's reason, as when it expires later.
            c.auth_id = Some(c.send_request(json!({"op": "auth", "token": token}))?);
        }
        match c.next_frame(deadline)? {
            Event::Frame(v) if v["op"] == "welcome" => c.welcome = v,
            Event::Close(code, reason) => return Err(ClientError::Closed(code, reason)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )))
            }
        }
        // The bound was for the handshake; later writes block as before.
        c.stream.set_write_timeout(None)?;
        Ok(c)
    }

    /// The connection's heartbeat, from `welcome` (the server's default of
    /// 25 s when it does not say).
    pub fn heartbeat(&self) -> Duration {
        match self.welcome["heartbeat"].as_u64() {
            Some(secs) if secs > 0 => Duration::from_secs(secs),
            _ => heartbeat::DEFAULT_HEARTBEAT,
        }
    }

    /// When bytes from the server last arrived (any frame, pings included).
    pub fn last_received(&self) -> Instant {
        self.last_rx
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

    /// Sends `req` with a fresh `id`, without waiting; returns the `id`.
    fn send_request(&mut self, mut req: Value) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = json!(id);
        self.send_text(&req.to_string())?;
        Ok(id)
    }

    /// Sends a request with a fresh `id` and waits for the reply carrying
    /// it; frames received meanwhile are returned with the reply, or kept
    /// for [`Client::recv`] when the request fails.
    pub fn request(&mut self, req: Value) -> Result<(Value, Vec<Event>)> {
        let id = self.send_request(req)?;
        let deadline = Instant::now() + self.timeout;
        let mut before = Vec::new();
        let answer = loop {
            match self.next_frame(deadline) {
                Ok(Event::Frame(v)) if v["id"] == json!(id) => {
                    if v["op"] == "error" {
                        break Err(ClientError::Server {
                            code: v["code"].as_u64().unwrap_or(0) as u16,
                            reason: v["reason"].as_str().unwrap_or_default().into(),
                        });
                    }
                    return Ok((v, before));
                }
                Ok(Event::Close(code, reason)) => break Err(ClientError::Closed(code, reason)),
                Ok(other) => before.push(other),
                Err(e) => break Err(e),
            }
        };
        self.pending.extend(before);
        answer
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
        self.publish_keyed(topic, data, None)
    }

    /// [`Client::publish`] with an idempotency `key` (v1.2): a repeat of
    /// the same topic and key within the server's `--idempotency-window`
    /// is not delivered again and answers the first one's id, so a
    /// producer may retry a publish whose answer it never got.
    pub fn publish_keyed(
        &mut self,
        topic: &str,
        data: &Value,
        key: Option<&str>,
    ) -> Result<String> {
        let mut req = json!({"op": "pub", "topic": topic, "data": data});
        if let Some(k) = key {
            req["key"] = json!(k);
        }
        let (ok, before) = self.request(req)?;
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
                    read_more(&mut self.stream, &mut self.inbuf).map_err(timed_out)?;
                    self.last_rx = Instant::now();
                }
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }
}

/// A read that ran into its timeout is [`ClientError::Timeout`].
fn timed_out(e: ClientError) -> ClientError {
    match e {
        ClientError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ClientError::Timeout
        }
        other => other,
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
}
