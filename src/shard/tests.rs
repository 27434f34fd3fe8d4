//! The shard's connection logic tested without processes or a network,
//! against the real [`Shard`] code with a real [`Config`], embedded broker
//! ([`MemoryBroker`], its one part on this thread), [`Bus`] inbox and [`ShardMetrics`]:
//! the outbound queue's bound and 4009 (`queue`), the close handshake both
//! ways (`close`), replay then live (`replay`), the connection caps and the
//! upgrade budget (`caps`), and the write path (`write_path`).
//!
//! Two stand-ins for a TCP socket, whichever keeps a test simplest:
//!
//! - the write path alone (`OutQueue::write_to`) writes to `Pipe`, an
//!   in-memory `Sink` that takes a set number of bytes and then answers
//!   `WouldBlock`, as a full socket does, so every cut of a frame is tried;
//! - whole connections run over `socketpair(AF_UNIX, SOCK_STREAM)` (a
//!   kernel socket, but no process and no network), because the shard
//!   reads (`recv`) and polls (its epoll set) the connection's fd, not only
//!   writes it: the shard drives its end as it does a TCP socket, and the
//!   test is the client at the other end (`Client`), writing the upgrade
//!   request and masked frames and reading what the shard wrote.
//!
//! A `Harness` builds the shard without its thread or listener and drives
//! it by calling what the shard's loops call, in their order: `on_accept`
//! then `flush_dirty` (the accept loop), `on_ready` for each epoll event
//! then `flush_dirty` (the readiness loop), `handle` for each inbox message
//! then `flush_dirty` (the inbox loop), `sweep` and `start_drain`. Its
//! clock is set by the test, not read from the system, so deadlines and
//! budgets are exact. Each test runs on a fresh runtime of each monoio
//! driver the host has (the inbox is awaited: the broker answers from its
//! own thread).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::Value;

use super::conn::{Conn, Phase};
use super::Shard;
use crate::broker::memory::{MemoryBroker, Retention};
use crate::broker::Broker;
use crate::bus::{Bus, Inbox, ShardMsg};
use crate::config::Config;
use crate::id::{ConnId, MsgId, ShardId};
use crate::metrics::{ShardMetrics, Undelivered};
use crate::namespace::Namespaces;
use crate::protocol::encode_msg;
use crate::topic::TopicName;
use crate::ws::frame::{encode_frame, encode_masked, Decoder, Message, OpCode};

mod caps;
mod close;
mod queue;
mod replay;
mod write_path;

/// Client frames are masked (RFC 6455 section 5.3); any key will do.
const MASK: [u8; 4] = [0x0b, 0xad, 0xf0, 0x0d];

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: ringcast.test\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Version: 13\r\n\r\n";

/// A shard as its thread would build it, with its inbox and its broker.
struct Harness {
    shard: Rc<Shard>,
    inbox: Inbox,
    broker: Arc<MemoryBroker>,
}

impl Harness {
    /// The shard `runtime::run` builds from `config`, without its thread
    /// or listener (`config()` sets one shard, so the per-address cap is
    /// whole).
    fn new(config: Config) -> Self {
        let config = Arc::new(config);
        let metrics = Arc::new(ShardMetrics::default());
        let (sender, inbox) = crate::bus::inbox(metrics.clone());
        let bus = Bus::new(vec![sender]);
        let namespaces = Namespaces::from_config(&config.namespaces).expect("valid namespaces");
        let retention = Retention {
            size: config.history_size,
            ttl: config.history_ttl,
            idempotency_window: config.idempotency_window,
        };
        let broker = MemoryBroker::start(bus, retention, &namespaces).expect("the broker");
        // This thread is shard 0: it keeps every topic.
        broker.attach(ShardId(0));
        let broker = Arc::new(broker);
        // As in runtime::run.
        let per_ip_limit = config.max_connections_per_ip.div_ceil(config.shards).max(1) as u32;
        let compression_level = config.compression_level;
        let shard = Rc::new(Shard {
            io: super::io::Io::open(ON_RING.get()).expect("a data path").0,
            id: ShardId(0),
            config,
            broker: broker.clone(),
            metrics,
            auth: None,
            grants: crate::auth::GrantsCache::default(),
            anonymous: Rc::new(crate::auth::Identity::anonymous()),
            guest: Rc::new(crate::auth::Identity::guest()),
            namespaces,
            presence: None,
            node_connections: Arc::default(),
            shard_connections: Cell::new(0),
            per_ip: RefCell::new(HashMap::new()),
            per_ip_limit,
            handshakes: RefCell::new(HashMap::new()),
            refusing: RefCell::default(),
            conns: RefCell::default(),
            topics: RefCell::new(HashMap::new()),
            wild: RefCell::new(super::patterns::Wildcards::default()),
            stamp: Cell::new(0),
            dirty: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0; super::SCRATCH_SIZE]),
            next_conn: Cell::new(0),
            sweeps: Cell::new(0),
            started: Instant::now(),
            now_ms: Cell::new(1_000),
            draining: Cell::new(false),
            // No listener: the drain's shutdown of it fails harmlessly.
            listener_fd: Cell::new(-1),
            ping: encode_frame(OpCode::Ping, b""),
            deflater: RefCell::new(crate::ws::deflate::Deflater::new(compression_level)),
            inflater: RefCell::default(),
            failure: RefCell::new(None),
            failure_waker: RefCell::new(None),
            io_more: Cell::new(false),
            io_waker: Cell::new(None),
        });
        Harness {
            shard,
            inbox,
            broker,
        }
    }

    /// The accept loop takes in a connection from `ip`.
    fn accept(&self, ip: [u8; 4]) -> Client {
        self.accept_with(ip, None)
    }

    /// [`Harness::accept`], with the server side's send buffer set to
    /// `sndbuf` bytes (the kernel doubles it, and keeps a minimum).
    fn accept_with(&self, ip: [u8; 4], sndbuf: Option<usize>) -> Client {
        let (server, client) = UnixStream::pair().expect("a socketpair");
        client.set_nonblocking(true).expect("non-blocking");
        if let Some(size) = sndbuf {
            socket2::SockRef::from(&server)
                .set_send_buffer_size(size)
                .expect("SO_SNDBUF");
        }
        let id = ConnId(self.shard.next_conn.get());
        let peer = SocketAddr::new(IpAddr::from(ip), 40_000 + id.0 as u16);
        self.shard.on_accept(OwnedFd::from(server), peer);
        self.shard.flush_dirty();
        Client::new(client, id)
    }

    /// A connection from `ip`, upgraded and welcomed.
    fn open(&self, ip: [u8; 4]) -> Client {
        let mut c = self.accept(ip);
        c.write(UPGRADE.as_bytes());
        self.poll();
        assert_eq!(c.read(), ["http 101", "welcome"]);
        c
    }

    /// The readiness loop's pass: every ready connection, then the flush.
    fn poll(&self) {
        let mut events = vec![crate::sys::empty_event(); 64];
        let super::io::Io::Epoll(epoll) = &self.shard.io else {
            // The ring's completions (readiness, sends) are in its queue:
            // the client's last system call ran what posts them.
            return self.shard.flush_dirty();
        };
        loop {
            let n = epoll.wait(&mut events).expect("epoll_wait");
            for ev in &events[..n] {
                let (token, bits) = (ev.u64, ev.events);
                self.shard.on_ready(ConnId(token), bits);
            }
            self.shard.flush_dirty();
            if n < events.len() {
                break;
            }
        }
    }

    /// The next `n` messages of the shard's inbox (the broker answers on
    /// its own time), without handling them.
    async fn take(&self, n: usize) -> Vec<ShardMsg> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.inbox.try_recv() {
                Some(msg) => got.push(msg),
                None => monoio::time::timeout(Duration::from_secs(5), self.inbox.ready())
                    .await
                    .expect("the inbox got nothing for 5 s"),
            }
        }
        got
    }

    /// The inbox loop's pass over one batch: handle each, then the flush.
    fn handle(&self, batch: Vec<ShardMsg>) {
        for msg in batch {
            self.shard.handle(msg);
        }
        self.shard.flush_dirty();
    }

    /// Subscribes `c` to `topic` with the broker's answer, as a client does.
    async fn subscribe(&self, c: &mut Client, topic: &str) {
        c.send_text(&format!(r#"{{"op":"sub","id":1,"topic":"{topic}"}}"#));
        self.poll();
        let answer = self.take(1).await;
        self.handle(answer);
        let got = c.read();
        assert!(got.len() == 1 && got[0].starts_with("ok "), "{got:?}");
    }

    fn conn(&self, c: &Client) -> Rc<Conn> {
        self.shard.conn(c.id).expect("the connection is registered")
    }

    /// Moves the shard's clock (the loops `tick` it before they act).
    fn advance(&self, ms: u64) {
        self.shard.now_ms.set(self.shard.now_ms() + ms);
    }

    /// A counter as `/metrics` shows it, e.g.
    /// `ringcast_client_disconnects_total{reason="slow"}`.
    fn metric(&self, series: &str) -> u64 {
        let text = crate::metrics::render(&[&self.shard.metrics]);
        let line = text
            .lines()
            .find(|l| l.strip_prefix(series).is_some_and(|v| v.starts_with(' ')))
            .unwrap_or_else(|| panic!("no {series} in /metrics"));
        line[series.len()..].trim().parse().expect("a count")
    }

    fn dropped(&self, why: Undelivered) -> u64 {
        self.shard.metrics.dropped_count(why)
    }
}

/// A `Deliver` of message `n` of `topic` (id `n-0`, data `n`), as a broker sends it.
fn deliver(topic: &str, n: u64) -> ShardMsg {
    deliver_data(topic, n, &n.to_string())
}

fn deliver_data(topic: &str, n: u64, data: &str) -> ShardMsg {
    let topic = TopicName::new(topic).expect("a valid topic");
    let id = MsgId { ms: n, seq: 0 };
    let frame = encode_msg(&topic, id, None, data);
    ShardMsg::Deliver { topic, id, frame }
}

/// [`deliver`] with a string padded so that the frame is `len` bytes.
fn deliver_sized(topic: &str, n: u64, len: usize) -> ShardMsg {
    let mut pad = 0;
    // Converges in two steps away from a header size's edge (125, 65535).
    for _ in 0..4 {
        let msg = deliver_data(topic, n, &format!("\"{}\"", "x".repeat(pad)));
        let ShardMsg::Deliver { frame, .. } = &msg else {
            unreachable!()
        };
        match len.checked_sub(frame.len()) {
            Some(0) => return msg,
            Some(short) => pad += short,
            None => pad -= frame.len() - len,
        }
    }
    panic!("no {len}-byte frame");
}

thread_local! {
    /// Whether the harness builds its shard on the data ring (the
    /// io_uring runtime's run) or on an epoll set (the epoll runtime's).
    static ON_RING: Cell<bool> = const { Cell::new(false) };
}

/// Runs a test on a fresh runtime of each driver this host has, with the
/// data path that goes with it: epoll, then the io_uring data ring.
fn on_both_drivers<F: std::future::Future<Output = ()>>(test: impl Fn() -> F) {
    ON_RING.set(false);
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("an epoll runtime")
        .block_on(test());
    if monoio::utils::detect_uring() {
        ON_RING.set(true);
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("an io_uring runtime")
            .block_on(test());
        ON_RING.set(false);
    }
}

/// The client's end of a connection: writes what a WebSocket client
/// writes, and reads what the shard wrote as a transcript of short lines.
struct Client {
    sock: UnixStream,
    /// The shard's number for this connection.
    id: ConnId,
    input: BytesMut,
    /// `None` until the HTTP answer came; then whether it was 101.
    upgraded: Option<bool>,
    decoder: Decoder,
    eof: bool,
    /// Bytes read from the server in all.
    received: usize,
}

impl Client {
    fn new(sock: UnixStream, id: ConnId) -> Self {
        Self {
            sock,
            id,
            input: BytesMut::new(),
            upgraded: None,
            decoder: Decoder::new_client(16 << 20),
            eof: false,
            received: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.sock
            .write_all(bytes)
            .expect("the shard's socket takes it");
    }

    fn send_text(&mut self, text: &str) {
        self.write(&encode_masked(OpCode::Text, true, text.as_bytes(), MASK));
    }

    /// A close frame with `code` (and a reason), or with no payload.
    fn send_close(&mut self, code: Option<u16>) {
        let payload = code.map_or_else(Vec::new, |c| [&c.to_be_bytes()[..], b"bye"].concat());
        self.write(&encode_masked(OpCode::Close, true, &payload, MASK));
    }

    /// What the shard wrote since the last call: `http STATUS[ BODY]`, one
    /// line per frame (`welcome`, `ok last=.. recovered=..`, `msg DATA`,
    /// `error CODE`, `close CODE`, ...), and `eof` once the shard shut
    /// the socket.
    fn read(&mut self) -> Vec<String> {
        let mut buf = vec![0u8; 64 << 10];
        let mut eof = false;
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    eof = !self.eof;
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.received += n;
                    self.input.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read: {e}"),
            }
        }
        let mut got = Vec::new();
        if self.upgraded.is_none() {
            if let Some(end) = self.input.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = self.input.split_to(end + 4);
                let head = String::from_utf8_lossy(&head);
                let status = head.split(' ').nth(1).unwrap_or("?").to_string();
                self.upgraded = Some(status == "101");
                if status == "101" {
                    got.push("http 101".to_string());
                } else {
                    let body = String::from_utf8_lossy(&self.input).trim().to_string();
                    got.push(format!("http {status} {body}"));
                    self.input.clear();
                }
            }
        }
        if self.upgraded == Some(true) {
            loop {
                match self.decoder.decode(&mut self.input) {
                    Ok(Some(msg)) => got.push(describe(&msg)),
                    Ok(None) => break,
                    Err(e) => panic!("the shard wrote an invalid frame: {e}"),
                }
            }
        }
        if eof {
            got.push("eof".to_string());
        }
        got
    }
}

/// One line of a transcript for one frame.
fn describe(msg: &Message) -> String {
    match msg {
        Message::Text(t) => {
            let v: Value = serde_json::from_slice(t).expect("JSON text");
            let op = v["op"].as_str().unwrap_or("?");
            match op {
                "msg" => format!("msg {}", v["data"]),
                "error" => format!("error {}", v["code"]),
                "ok" => {
                    let mut line = format!("ok {}", v["topic"].as_str().unwrap_or("-"));
                    if let Some(last) = v["last"].as_str() {
                        line += &format!(" last={last}");
                    }
                    if let Some(r) = v["recovered"].as_bool() {
                        line += &format!(" recovered={r}");
                    }
                    line
                }
                _ => op.to_string(),
            }
        }
        Message::Close(Some((code, _))) => format!("close {code}"),
        Message::Close(None) => "close".to_string(),
        Message::Ping(_) => "ping".to_string(),
        Message::Pong(_) => "pong".to_string(),
        Message::Binary(_) => "binary".to_string(),
        Message::Deflated(..) => "deflated".to_string(),
    }
}

fn config() -> Config {
    Config {
        shards: 1,
        ..Config::default()
    }
}

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];
const C: [u8; 4] = [10, 0, 0, 3];
