//! One client connection on its shard: the upgrade, then frames in and out.
//!
//! A connection owns no task. It is an entry in the shard's registry and a
//! registration in the shard's epoll instance; when its socket is readable
//! the shard calls `on_readable`, which reads into the shard's scratch
//! buffer (an idle connection holds no read buffer; only a partial frame is
//! kept, in `inbuf`), decodes, and answers. Writes are inline: frames are
//! queued (each a shared `Bytes`) and the shard writes every dirty
//! connection's whole queue with one vectored `sendmsg` after each batch;
//! only when a socket is full does the connection also wait for EPOLLOUT.
//! Ending a connection is always the same path: shut the socket, the shard
//! sees it readable, reads end of stream, and `finish`es it. Nothing here
//! panics on input.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Buf, Bytes, BytesMut};
use tracing::{debug, trace};

use crate::auth::Identity;
use crate::broker::SubscribeRequest;
use crate::bus::{ConnId, ReplyTo};
use crate::config::Config;
use crate::metrics::{Disconnect, Drop, ShardMetrics};
use crate::protocol::{
    close, code, encode_error, encode_ok, encode_pong, encode_topic_error, encode_welcome,
    request_id, ClientOp, OkExtra,
};
use crate::shard::Shard;
use crate::sys;
use crate::topic::TopicName;
use crate::ws::frame::{encode_close, encode_frame, Decoder, Message, OpCode};
use crate::ws::handshake::{self, HandshakeError, UpgradeRequest};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the upgrade request.
    Handshake,
    /// Upgraded: frames flow.
    Open,
    /// A close frame is queued or sent; waiting for the peer or the deadline.
    Closing,
    /// The socket is shut; the shard is about to forget the connection.
    Closed,
}

/// The outbound queue: shared frames waiting for the socket. The counts
/// are 32-bit (`outbound_queue` is at most 1 GiB; a frame is far smaller).
#[derive(Debug, Default)]
struct OutQueue {
    frames: VecDeque<Bytes>,
    /// Bytes of the front frame already written.
    offset: u32,
    /// Unwritten bytes in the queue.
    bytes: u32,
}

/// `Sub::slot` of a subscription asked of the broker and not yet answered.
const PENDING: u32 = u32::MAX;

/// One topic of a connection: live, at `slot` in the shard's subscriber
/// list of the topic (so leaving it is O(1), not a search through what may
/// be every connection of the shard), or [`PENDING`].
#[derive(Debug)]
pub(crate) struct Sub {
    pub(crate) topic: TopicName,
    slot: u32,
}

impl Sub {
    /// Where it is in the topic's subscriber list (live subscriptions).
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// Whether it is live (in the topic index), not pending.
    pub(crate) fn is_live(&self) -> bool {
        self.slot != PENDING
    }
}

/// What happens to the socket once the outbound queue is written. The
/// variants are ordered: a connection only ever moves to a later one
/// ([`AfterFlush::then`]), so failing a connection whose HTTP refusal or
/// close handshake is under way never keeps its socket open longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum AfterFlush {
    /// Keep it open.
    Nothing,
    /// Send FIN (we failed the connection); keep reading until the peer closes.
    Fin,
    /// Shut both ways (HTTP error sent, or close handshake complete).
    Shut,
}

impl AfterFlush {
    /// The stronger of the two: never a downgrade.
    fn then(self, next: AfterFlush) -> AfterFlush {
        self.max(next)
    }
}

/// One connection's state, owned by its shard.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    /// The socket; closed when the last `Rc<Conn>` goes.
    socket: OwnedFd,
    phase: Cell<Phase>,
    /// Handshake or close deadline, shard milliseconds.
    deadline: Cell<u64>,
    last_rx: Cell<u64>,
    out: RefCell<OutQueue>,
    /// Queued since the last flush (already on the shard's dirty list).
    dirty: Cell<bool>,
    /// The socket is full: registered for EPOLLOUT until it drains.
    write_blocked: Cell<bool>,
    /// What to do to the socket once the queue is written.
    after_flush: Cell<AfterFlush>,
    /// The upgrade succeeded at some point (counted in connections_active).
    opened: Cell<bool>,
    /// Counted toward the connection caps since accept ([`Shard::admit`]).
    counted: Cell<bool>,
    /// Bytes of an incomplete frame (or upgrade request) carried to the
    /// next read; `None` between messages, so an idle connection holds one
    /// word here, not a buffer.
    inbuf: RefCell<Option<Box<BytesMut>>>,
    decoder: RefCell<Decoder>,
    /// Topics subscribed or pending (a short list: linear search beats a
    /// set's memory).
    topics: RefCell<Vec<Sub>>,
    /// Who the client is; `None` until its `auth` frame is accepted.
    pub(crate) identity: RefCell<Option<Rc<Identity>>>,
    /// The client's address, for the per-address connection cap.
    pub(crate) peer: IpAddr,
    /// Inbound rate limits: frames and bytes left in the two buckets, and
    /// when both were last refilled (ms).
    tokens: Cell<f32>,
    byte_tokens: Cell<f32>,
    refilled: Cell<u64>,
    /// When the client's current run of refused frames began (0 = none),
    /// and when its last frame was refused: a run ends after a quiet
    /// second. In [`centis`] (wrapping: only spans of seconds are compared).
    over_since: Cell<u32>,
    last_refused: Cell<u32>,
}

/// Shard time in hundredths of a second, plus one so that 0 can mean
/// "none": for timestamps compared only over short spans, in half the
/// space. Wraps every 497 days (and is 0 for 10 ms then, read as "none").
fn centis(now_ms: u64) -> u32 {
    ((now_ms / 10) as u32).wrapping_add(1)
}

/// Milliseconds from centisecond stamp `then` to `now` (wrapping).
fn centis_since(now_ms: u64, then: u32) -> u64 {
    u64::from(centis(now_ms).wrapping_sub(then)) * 10
}

impl Conn {
    pub(crate) fn new(
        id: ConnId,
        socket: OwnedFd,
        peer: IpAddr,
        now: u64,
        config: &Config,
    ) -> Self {
        Self {
            id,
            socket,
            phase: Cell::new(Phase::Handshake),
            deadline: Cell::new(now.saturating_add(config.handshake_timeout.as_millis() as u64)),
            last_rx: Cell::new(now),
            out: RefCell::new(OutQueue::default()),
            dirty: Cell::new(false),
            write_blocked: Cell::new(false),
            after_flush: Cell::new(AfterFlush::Nothing),
            opened: Cell::new(false),
            counted: Cell::new(false),
            inbuf: RefCell::new(None),
            decoder: RefCell::new(Decoder::new(config.max_message_size)),
            topics: RefCell::new(Vec::new()),
            identity: RefCell::new(None),
            peer,
            tokens: Cell::new(config.inbound_burst as f32),
            byte_tokens: Cell::new(config.inbound_bytes_burst as f32),
            refilled: Cell::new(now),
            over_since: Cell::new(0),
            last_refused: Cell::new(0),
        }
    }

    /// Whether the upgrade succeeded.
    pub(crate) fn was_open(&self) -> bool {
        self.opened.get()
    }

    /// The socket's fd.
    pub(crate) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase.get()
    }
    pub(crate) fn deadline(&self) -> u64 {
        self.deadline.get()
    }
    pub(crate) fn last_rx(&self) -> u64 {
        self.last_rx.get()
    }
    pub(crate) fn set_closing(&self, deadline: u64) {
        self.phase.set(Phase::Closing);
        self.deadline.set(deadline);
    }
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes as usize
    }

    /// Whether `topic` is subscribed (live in the topic index).
    pub(crate) fn is_subscribed(&self, topic: &TopicName) -> bool {
        self.topics
            .borrow()
            .iter()
            .any(|s| s.slot != PENDING && s.topic == *topic)
    }

    /// Whether a `sub` of `topic` waits for the broker.
    pub(crate) fn is_pending(&self, topic: &TopicName) -> bool {
        self.topics
            .borrow()
            .iter()
            .any(|s| s.slot == PENDING && s.topic == *topic)
    }

    /// Subscriptions, live and pending.
    pub(crate) fn topic_count(&self) -> usize {
        self.topics.borrow().len()
    }

    /// Records a `sub` sent to the broker.
    pub(crate) fn add_pending(&self, topic: TopicName) {
        self.topics.borrow_mut().push(Sub {
            topic,
            slot: PENDING,
        });
    }

    /// Forgets a pending `sub`; whether there was one.
    pub(crate) fn take_pending(&self, topic: &TopicName) -> bool {
        self.take_where(topic, |slot| slot == PENDING).is_some()
    }

    /// Forgets a live subscription; its slot in the topic index if there was one.
    pub(crate) fn take_live(&self, topic: &TopicName) -> Option<u32> {
        self.take_where(topic, |slot| slot != PENDING)
    }

    fn take_where(&self, topic: &TopicName, want: impl Fn(u32) -> bool) -> Option<u32> {
        let mut topics = self.topics.borrow_mut();
        let i = topics
            .iter()
            .position(|s| want(s.slot) && s.topic == *topic)?;
        Some(topics.swap_remove(i).slot)
    }

    /// Records a live subscription at `slot` of the topic's subscriber list.
    pub(crate) fn add_live(&self, topic: TopicName, slot: u32) {
        self.topics.borrow_mut().push(Sub { topic, slot });
    }

    /// The subscription to `topic` moved to `slot` (another one left the list).
    pub(crate) fn move_slot(&self, topic: &TopicName, slot: u32) {
        if let Some(s) = self
            .topics
            .borrow_mut()
            .iter_mut()
            .find(|s| s.slot != PENDING && s.topic == *topic)
        {
            s.slot = slot;
        }
    }

    /// The live subscriptions' topics.
    pub(crate) fn live_topics(&self) -> Vec<TopicName> {
        self.topics
            .borrow()
            .iter()
            .filter(|s| s.slot != PENDING)
            .map(|s| s.topic.clone())
            .collect()
    }

    /// Takes every subscription away (the connection is over), live and
    /// pending.
    pub(crate) fn take_all(&self) -> Vec<Sub> {
        std::mem::take(&mut *self.topics.borrow_mut())
    }

    /// Shuts the socket: the task sees end of stream and cleans up.
    pub(crate) fn shut(&self) {
        if self.phase.replace(Phase::Closed) != Phase::Closed {
            sys::shutdown(self.fd());
        }
    }

    /// Called when the queue has been written out completely.
    fn flushed(&self) {
        // An idle connection keeps no queue storage either.
        let mut out = self.out.borrow_mut();
        if out.frames.capacity() > 0 {
            out.frames = VecDeque::new();
        }
        drop(out);
        match self.after_flush.get() {
            AfterFlush::Nothing => {}
            AfterFlush::Fin => sys::shutdown_write(self.fd()),
            AfterFlush::Shut => self.shut(),
        }
    }

    /// Appends a frame; true when the connection just became dirty.
    pub(crate) fn push(&self, frame: Bytes) -> bool {
        if self.phase.get() == Phase::Closed {
            return false;
        }
        let mut out = self.out.borrow_mut();
        out.bytes = out
            .bytes
            .saturating_add(u32::try_from(frame.len()).unwrap_or(u32::MAX));
        out.frames.push_back(frame);
        !self.dirty.replace(true)
    }

    /// Drops every frame not yet started (a slow consumer about to be
    /// closed); a half-written front frame stays so the stream stays valid.
    /// Returns how many were dropped.
    pub(crate) fn discard_unsent(&self) -> u64 {
        let mut out = self.out.borrow_mut();
        let keep = usize::from(out.offset > 0);
        let dropped = out.frames.len().saturating_sub(keep);
        out.frames.truncate(keep);
        let left = out
            .frames
            .front()
            .map_or(0, |f| f.len() - out.offset as usize);
        out.bytes = left as u32;
        dropped as u64
    }
}

/// How one write attempt ended.
enum Flushed {
    /// Everything queued was written.
    Done,
    /// The socket is full; wait until it is writable.
    Blocked,
    /// The socket failed; the connection is over.
    Failed,
}

/// Writes what the queue holds, as few `sendmsg` calls as the socket allows.
fn write_queue(metrics: &ShardMetrics, conn: &Conn) -> Flushed {
    let mut out = conn.out.borrow_mut();
    while !out.frames.is_empty() {
        match sys::send_frames(conn.fd(), out.frames.iter(), out.offset as usize) {
            Ok(n) => {
                metrics.socket_writes.fetch_add(1, Relaxed);
                metrics.bytes_sent.fetch_add(n as u64, Relaxed);
                out.consume(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                trace!(error = %e, "write failed");
                return Flushed::Failed;
            }
        }
    }
    Flushed::Done
}

impl OutQueue {
    /// Forgets `n` written bytes from the front.
    fn consume(&mut self, mut n: usize) {
        // The kernel wrote at most what was queued, which fits 32 bits.
        self.bytes = self.bytes.saturating_sub(n as u32);
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.offset as usize;
            if n < left {
                self.offset += n as u32;
                return;
            }
            n -= left;
            self.offset = 0;
            self.frames.pop_front();
        }
    }
}

/// Writes a dirty connection's queue now; when the socket is full, waits
/// for EPOLLOUT (`on_writable`).
pub(crate) fn flush(shard: &Shard, conn: &Rc<Conn>) {
    conn.dirty.set(false);
    if conn.write_blocked.get() {
        return;
    }
    match write_queue(&shard.metrics, conn) {
        Flushed::Done => conn.flushed(),
        Flushed::Blocked => {
            conn.write_blocked.set(true);
            shard.watch_writable(conn, true);
        }
        Flushed::Failed => conn.shut(),
    }
}

/// The socket takes data again: write what waits.
pub(crate) fn on_writable(shard: &Shard, conn: &Rc<Conn>) {
    if !conn.write_blocked.get() {
        return;
    }
    match write_queue(&shard.metrics, conn) {
        Flushed::Blocked => return,
        Flushed::Done => conn.flushed(),
        Flushed::Failed => conn.shut(),
    }
    conn.write_blocked.set(false);
    shard.watch_writable(conn, false);
}

/// The socket is readable (or hung up): read once, then act on what came.
/// Returns false when the connection is over and must be [`finish`]ed.
pub(crate) fn on_readable(shard: &Rc<Shard>, conn: &Rc<Conn>) -> bool {
    let mut buf = {
        let mut scratch = shard.scratch.borrow_mut();
        match sys::recv(conn.fd(), &mut scratch) {
            Ok(0) => return false,
            Ok(n) => {
                let held = conn.inbuf.borrow_mut().take();
                let mut buf = held.map_or_else(BytesMut::new, |b| *b);
                buf.extend_from_slice(&scratch[..n]);
                buf
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return true
            }
            Err(_) => return false,
        }
    };
    conn.last_rx.set(shard.now_ms());
    if conn.phase() == Phase::Handshake {
        handshake(shard, conn, &mut buf);
    }
    if conn.was_open() {
        if matches!(conn.phase(), Phase::Open | Phase::Closing) {
            process_input(shard, conn, &mut buf);
        }
    } else if conn.phase() != Phase::Handshake {
        // Refused: the HTTP answer is queued and the socket is shut once it
        // is written. What the client sends meanwhile is not WebSocket.
        buf.clear();
    }
    // Only an incomplete frame is kept; an idle connection holds no buffer.
    if !buf.is_empty() {
        *conn.inbuf.borrow_mut() = Some(Box::new(buf));
    }
    true
}

/// The connection is over: the shard forgets it and counts what was lost.
pub(crate) fn finish(shard: &Shard, conn: &Rc<Conn>) {
    match conn.phase() {
        Phase::Open => shard.metrics.disconnect(Disconnect::Client),
        Phase::Handshake => shard.metrics.disconnect(Disconnect::Handshake),
        // Closing or Closed: the reason was counted when that started.
        Phase::Closing | Phase::Closed => {}
    }
    conn.shut();
    shard.remove(conn);
    if conn.was_open() {
        shard.metrics.connections_active.fetch_sub(1, Relaxed);
    }
    if conn.counted.replace(false) {
        shard.release(conn.peer);
    }
    let mut out = conn.out.borrow_mut();
    shard
        .metrics
        .dropped_n(Drop::ConnectionClosed, out.frames.len() as u64);
    *out = OutQueue::default();
    debug!(conn = conn.id.0, "connection closed");
}

/// Counts a just-accepted connection toward the connection caps, or refuses
/// it at once with 429/503 (before its request is read: a socket that never
/// sends one would otherwise escape every cap until `handshake_timeout`).
pub(crate) fn admit(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    match shard.admit(conn.peer) {
        Ok(()) => conn.counted.set(true),
        Err(e) => refuse(shard, conn, &e),
    }
}

/// Parses the upgrade request once it is complete, and answers it.
fn handshake(shard: &Rc<Shard>, conn: &Rc<Conn>, buf: &mut BytesMut) {
    let parsed = handshake::parse_request(buf, shard.config.max_handshake_size);
    match parsed {
        Ok(None) => {}
        Ok(Some((req, used))) => {
            buf.advance(used);
            match accept(shard, &req, conn.peer) {
                Ok((protocol, identity)) => {
                    let resp = handshake::accept_response(&req.key, protocol);
                    shard.queue_unbounded(conn, Bytes::from(resp));
                    *conn.identity.borrow_mut() = identity;
                    open(shard, conn);
                }
                Err(e) => refuse(shard, conn, &e),
            }
        }
        Err(e) => refuse(shard, conn, &e),
    }
}

/// The checks after parsing, in docs/PROTOCOL.md order: path (404), origin
/// (403), the upgrade budget of the address (429), draining (503),
/// subprotocol, then the token (401). The connection caps were applied at
/// accept ([`admit`]). Returns the subprotocol to echo and the identity,
/// when the client is authenticated already.
type Accepted = (Option<&'static str>, Option<Rc<Identity>>);

fn accept(shard: &Shard, req: &UpgradeRequest, peer: IpAddr) -> Result<Accepted, HandshakeError> {
    let cfg = &shard.config;
    if !cfg.echo && req.path != "/ws" {
        return Err(HandshakeError::NotFound {
            path: req.path.chars().take(64).collect(),
        });
    }
    // No Origin: not a browser, so nothing for the allowlist to protect
    // (see Config::allowed_origins).
    if let (Some(origin), false) = (&req.origin, cfg.allowed_origins.is_empty()) {
        if !cfg.allowed_origins.iter().any(|o| o == origin) {
            return Err(HandshakeError::OriginNotAllowed {
                origin: origin.chars().take(handshake::ECHO_MAX).collect(),
            });
        }
    }
    if !shard.handshake_allowed(peer) {
        return Err(HandshakeError::TooManyConnections {
            reason: "max_handshakes_per_ip: too many upgrades per second from this address",
        });
    }
    if shard.draining() {
        return Err(HandshakeError::Unavailable {
            reason: "server is draining",
        });
    }
    if cfg.echo {
        return Ok((None, Some(shard.anonymous.clone())));
    }
    let protocol = handshake::choose_protocol(&req.protocols)?;
    let Some(verifier) = &shard.auth else {
        return Ok((protocol, Some(shard.anonymous.clone())));
    };
    match query_token(req.query.as_deref()) {
        // Checked before the upgrade: a bad token never gets a WebSocket.
        Some(token) => match verifier.verify(token) {
            Ok(id) => Ok((protocol, Some(Rc::new(id)))),
            Err(e) => Err(HandshakeError::Unauthorized { reason: e.reason() }),
        },
        None => Ok((protocol, None)),
    }
}

/// The `token` parameter of a query string (JWTs need no URL decoding).
fn query_token(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// Refuses the upgrade (or ends a handshake that took too long, with 408):
/// the plain HTTP answer with its one-line reason, then the socket is shut
/// once it is written, or at the close timeout if the client never reads it.
pub(crate) fn refuse(shard: &Shard, conn: &Rc<Conn>, err: &HandshakeError) {
    debug!(status = err.status(), reason = %err, "upgrade refused");
    shard.metrics.handshake_failed(err.status());
    shard.metrics.disconnect(Disconnect::Handshake);
    let deadline = shard
        .now_ms()
        .saturating_add(shard.config.close_timeout.as_millis() as u64);
    conn.set_closing(deadline);
    conn.after_flush
        .set(conn.after_flush.get().then(AfterFlush::Shut));
    *conn.inbuf.borrow_mut() = None;
    shard.queue_unbounded(conn, Bytes::from(handshake::error_response(err)));
}

fn open(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    conn.phase.set(Phase::Open);
    conn.opened.set(true);
    conn.refilled.set(shard.now_ms());
    shard.metrics.connections_active.fetch_add(1, Relaxed);
    if conn.identity.borrow().is_none() && shard.namespaces.any_anonymous() {
        // Some namespace admits clients without a token: serve it now; an
        // `auth` frame may still come later.
        *conn.identity.borrow_mut() = Some(shard.guest.clone());
    }
    if conn.identity.borrow().is_some() {
        welcome(shard, conn);
    } else {
        // The first frame must be `auth`, within auth_timeout (the sweep checks).
        conn.deadline.set(
            shard
                .now_ms()
                .saturating_add(shard.config.auth_timeout.as_millis() as u64),
        );
    }
}

fn welcome(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    if !shard.config.echo {
        let hb = shard.config.heartbeat.as_secs();
        let welcome = encode_welcome(&shard.conn_name(conn.id), &shard.config.node_name, hb);
        shard.queue(conn, welcome);
    }
}

/// Decodes and handles every complete message in `buf`.
fn process_input(shard: &Rc<Shard>, conn: &Rc<Conn>, buf: &mut BytesMut) {
    loop {
        if conn.phase() == Phase::Closed {
            return;
        }
        let decoded = conn.decoder.borrow_mut().decode(buf);
        match decoded {
            Ok(None) => return,
            Ok(Some(msg)) => on_message(shard, conn, msg),
            Err(e) => {
                debug!(error = %e, "protocol error");
                buf.clear();
                fail(shard, conn, e.close_code(), &e.to_string());
                return;
            }
        }
    }
}

fn on_message(shard: &Rc<Shard>, conn: &Rc<Conn>, msg: Message) {
    let closing = conn.phase() != Phase::Open;
    // Every data message, ping and pong is charged before any work is done
    // for it: unparsable text, unknown ops and binary frames are answered,
    // and pings are owed a pong, so none may bypass the limits.
    if !closing {
        let len = match &msg {
            Message::Text(b) | Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
            Message::Close(_) => 0,
        };
        if !matches!(msg, Message::Close(_)) {
            if let Err(over) = charge(shard, conn, len) {
                return over_rate(shard, conn, &msg, over);
            }
        }
    }
    match msg {
        Message::Ping(p) if !closing => shard.queue(conn, encode_frame(OpCode::Pong, &p)),
        Message::Ping(_) | Message::Pong(_) => {}
        Message::Close(c) => on_close(shard, conn, c),
        _ if closing => {} // after our close frame, data is read and ignored
        Message::Text(t) if shard.config.echo => shard.queue(conn, encode_frame(OpCode::Text, &t)),
        Message::Binary(b) if shard.config.echo => {
            shard.queue(conn, encode_frame(OpCode::Binary, &b))
        }
        Message::Binary(_) => {
            let reason = "binary frames are not supported: ringcast.v1 is JSON text";
            shard.queue(conn, encode_error(None, code::BAD_REQUEST, reason));
        }
        Message::Text(t) => match std::str::from_utf8(&t) {
            Ok(text) => on_op(shard, conn, text),
            Err(_) => fail(shard, conn, close::INVALID_DATA, "invalid UTF-8"),
        },
    }
}

/// Fails the connection (RFC 6455 section 7.1.7): the close frame, then our
/// FIN right behind it. Reading goes on (and is discarded) until the peer
/// closes or the close timeout, so its unread data never turns into a reset
/// that could destroy the close frame before the peer reads it.
fn fail(shard: &Rc<Shard>, conn: &Rc<Conn>, code: u16, reason: &str) {
    shard.close(conn, code, reason, Disconnect::Protocol);
    // Already shutting both ways (the close handshake completed): keep that.
    conn.after_flush
        .set(conn.after_flush.get().then(AfterFlush::Fin));
}

fn on_close(shard: &Rc<Shard>, conn: &Rc<Conn>, close: Option<(u16, String)>) {
    if conn.phase() == Phase::Closing {
        // The peer answered our close: the handshake is complete.
        conn.after_flush.set(AfterFlush::Shut);
        if conn.queued_bytes() == 0 {
            conn.shut();
        }
        return;
    }
    // Echo the peer's code (RFC 6455 section 5.5.1), then shut once written.
    shard.metrics.disconnect(Disconnect::Client);
    conn.phase.set(Phase::Closing);
    conn.after_flush.set(AfterFlush::Shut);
    let frame = match close {
        Some((code, _)) => encode_close(code, ""),
        None => encode_frame(OpCode::Close, b""),
    };
    shard.queue_unbounded(conn, frame);
}

fn on_op(shard: &Rc<Shard>, conn: &Rc<Conn>, text: &str) {
    let (id, op) = match ClientOp::parse(text) {
        Ok(parsed) => parsed,
        Err(e) => return shard.queue(conn, encode_error(e.id, e.code, &e.reason)),
    };
    let identity = conn.identity.borrow().clone();
    let Some(identity) = identity else {
        return first_auth(shard, conn, op);
    };
    let reply = ReplyTo {
        shard: shard.id,
        conn: conn.id,
        req: id,
    };
    match op {
        ClientOp::Sub { topic, since } => {
            let refusal = if shard.namespaces.of(topic.as_str()).is_none() {
                let reason = format!("unknown namespace {:?}", topic.namespace());
                Some((code::UNKNOWN_NAMESPACE, reason))
            } else if !allows(shard, &identity, &topic) {
                Some((
                    code::FORBIDDEN_TOPIC,
                    format!("topic {topic} not allowed by token"),
                ))
            } else if conn.is_subscribed(&topic) {
                Some((code::BAD_REQUEST, format!("already subscribed to {topic}")))
            } else if conn.is_pending(&topic) {
                Some((
                    code::BAD_REQUEST,
                    format!("subscription to {topic} already in progress"),
                ))
            } else if conn.topic_count() >= shard.config.max_subscriptions {
                let max = shard.config.max_subscriptions;
                Some((
                    code::TOO_MANY_SUBSCRIPTIONS,
                    format!("too many subscriptions: max_subscriptions is {max}"),
                ))
            } else {
                None
            };
            match refusal {
                Some((c, reason)) => shard.queue(conn, encode_error(id, c, &reason)),
                None => {
                    // Indexed (and announced) before the broker hears of it.
                    shard.add_pending(conn, &topic);
                    shard.broker.subscribe(SubscribeRequest {
                        reply,
                        topic,
                        since,
                    });
                }
            }
        }
        ClientOp::Unsub { topic } => {
            shard.unsubscribe(conn, &topic);
            shard.queue(conn, encode_ok(id, Some(&topic), OkExtra::default()));
        }
        ClientOp::Pub { topic, data } => {
            match shard.namespaces.of(topic.as_str()) {
                None => {
                    let reason = format!("unknown namespace {:?}", topic.namespace());
                    return shard.queue(conn, encode_error(id, code::UNKNOWN_NAMESPACE, &reason));
                }
                Some(ns) if !ns.allow_publish => {
                    let reason =
                        format!("namespace {:?} does not allow client publishing", ns.name);
                    return shard.queue(conn, encode_error(id, code::FORBIDDEN_TOPIC, &reason));
                }
                Some(_) => {}
            }
            if !identity.may_publish(topic.as_str()) {
                let reason = format!("publishing to {topic} not allowed by token");
                return shard.queue(conn, encode_error(id, code::FORBIDDEN_TOPIC, &reason));
            }
            let len = data.get().len();
            let max = shard.config.max_publish_size;
            if len > max {
                let reason = format!("data is {len} bytes, over max_publish_size {max}");
                return shard.queue(conn, encode_error(id, code::PUBLISH_TOO_LARGE, &reason));
            }
            shard.metrics.messages_published.fetch_add(1, Relaxed);
            shard.broker.publish(Some(reply), topic, data.get());
        }
        ClientOp::Ping => shard.queue(conn, encode_pong(id)),
        ClientOp::Auth { token } => refresh_auth(shard, conn, id, &identity, &token),
        ClientOp::Presence { topic } => {
            let (c, reason) = match shard.namespaces.of(topic.as_str()) {
                None => {
                    let reason = format!("unknown namespace {:?}", topic.namespace());
                    (code::UNKNOWN_NAMESPACE, reason)
                }
                Some(ns) if !ns.presence => {
                    let reason = format!("presence is off in namespace {:?}", ns.name);
                    (code::FORBIDDEN_TOPIC, reason)
                }
                Some(_) => (
                    code::BAD_REQUEST,
                    "presence is not implemented yet".to_string(),
                ),
            };
            shard.queue(conn, encode_error(id, c, &reason));
        }
    }
}

/// How long a client may stay over its inbound rate before it is closed.
const RATE_GRACE_MS: u64 = 5_000;
/// A run of refused messages ends after this long without one.
const RATE_QUIET_MS: u64 = 1_000;

/// Which inbound bucket is empty.
#[derive(Debug, Clone, Copy)]
enum Over {
    /// `inbound_rate` (frames/s).
    Frames,
    /// `inbound_bytes_rate` (bytes/s).
    Bytes,
}

/// Charges one inbound message of `len` payload bytes: one token from the
/// frame bucket (`inbound_rate`/s up to `inbound_burst`) and `len` from
/// the bytes bucket (`inbound_bytes_rate`/s up to `inbound_bytes_burst`).
/// Nothing is taken when either is short; a limit of 0 is off.
fn charge(shard: &Shard, conn: &Conn, len: usize) -> Result<(), Over> {
    let cfg = &shard.config;
    if cfg.echo || (cfg.inbound_rate == 0 && cfg.inbound_bytes_rate == 0) {
        return Ok(());
    }
    let now = shard.now_ms();
    let elapsed = now.saturating_sub(conn.refilled.replace(now)) as f32 / 1000.0;
    let frames =
        (conn.tokens.get() + elapsed * cfg.inbound_rate as f32).min(cfg.inbound_burst as f32);
    let bytes = (conn.byte_tokens.get() + elapsed * cfg.inbound_bytes_rate as f32)
        .min(cfg.inbound_bytes_burst as f32);
    let cost = len as f32;
    let result = if cfg.inbound_rate > 0 && frames < 1.0 {
        Err(Over::Frames)
    } else if cfg.inbound_bytes_rate > 0 && bytes < cost {
        Err(Over::Bytes)
    } else {
        Ok(())
    };
    let (frames, bytes) = match result {
        Ok(()) => (frames - 1.0, bytes - cost),
        Err(_) => (frames, bytes),
    };
    conn.tokens.set(frames);
    conn.byte_tokens.set(bytes);
    result
}

/// A message over an inbound limit: error 4008 (with the request's `id`
/// when it has one; a pong gets no answer), or close 4008 once the client
/// has been over a limit for [`RATE_GRACE_MS`].
fn over_rate(shard: &Rc<Shard>, conn: &Rc<Conn>, msg: &Message, over: Over) {
    let now = shard.now_ms();
    if conn.over_since.get() == 0 || centis_since(now, conn.last_refused.get()) >= RATE_QUIET_MS {
        conn.over_since.set(centis(now));
    }
    conn.last_refused.set(centis(now));
    let cfg = &shard.config;
    if centis_since(now, conn.over_since.get()) >= RATE_GRACE_MS {
        let reason = match over {
            Over::Frames => "rate limited: over inbound_rate for 5 s",
            Over::Bytes => "rate limited: over inbound_bytes_rate for 5 s",
        };
        return shard.close(conn, close::RATE_LIMITED, reason, Disconnect::RateLimited);
    }
    let id = match msg {
        Message::Pong(_) => return,
        // Only the id is read: the request itself is not served.
        Message::Text(t) => std::str::from_utf8(t).ok().and_then(request_id),
        _ => None,
    };
    let reason = match over {
        Over::Frames => format!(
            "rate limited: over inbound_rate {} frames/s (burst {})",
            cfg.inbound_rate, cfg.inbound_burst
        ),
        Over::Bytes => format!(
            "rate limited: over inbound_bytes_rate {} bytes/s (burst {})",
            cfg.inbound_bytes_rate, cfg.inbound_bytes_burst
        ),
    };
    shard.queue(conn, encode_error(id, code::RATE_LIMITED, &reason));
}

/// The first frame of a client that came without `?token=`: it must be
/// `auth`; anything else closes with 4001.
fn first_auth(shard: &Rc<Shard>, conn: &Rc<Conn>, op: ClientOp<'_>) {
    let ClientOp::Auth { token } = op else {
        return shard.close(
            conn,
            close::NOT_AUTHENTICATED,
            "authenticate first",
            Disconnect::Auth,
        );
    };
    let Some(verifier) = &shard.auth else { return };
    match verifier.verify(&token) {
        Ok(identity) => {
            *conn.identity.borrow_mut() = Some(Rc::new(identity));
            welcome(shard, conn);
        }
        Err(e) => shard.close(conn, close::NOT_AUTHENTICATED, e.reason(), Disconnect::Auth),
    }
}

/// A later `auth`: a fresh token for the same user replaces the old one.
fn refresh_auth(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    id: Option<u64>,
    current: &Identity,
    token: &str,
) {
    let Some(verifier) = &shard.auth else {
        let reason = "this server accepts anonymous clients: there is no token to refresh";
        return shard.queue(conn, encode_error(id, code::BAD_REQUEST, reason));
    };
    match verifier.verify(token) {
        Ok(fresh) if fresh.user != current.user && !current.is_guest() => {
            shard.close(
                conn,
                close::FORBIDDEN,
                "refreshed token is for another user",
                Disconnect::Auth,
            );
        }
        Ok(fresh) => {
            end_forbidden(shard, conn, &fresh);
            *conn.identity.borrow_mut() = Some(Rc::new(fresh));
            shard.queue(conn, encode_ok(id, None, OkExtra::default()));
        }
        Err(e) => shard.queue(conn, encode_error(id, code::AUTH_REFUSED, e.reason())),
    }
}

/// Whether `identity` may hold a subscription to `topic`: its namespace
/// exists and admits anonymous subscribers, or the token's `subs` allow it.
fn allows(shard: &Shard, identity: &Identity, topic: &TopicName) -> bool {
    shard
        .namespaces
        .of(topic.as_str())
        .is_some_and(|ns| ns.anonymous || identity.may_subscribe(topic.as_str()))
}

/// Whether the connection's current identity may hold a subscription to
/// `topic` (checked again when the broker answers a `sub`, since a token
/// refresh may have narrowed `subs` meanwhile).
pub(crate) fn may_subscribe(shard: &Shard, conn: &Conn, topic: &TopicName) -> bool {
    conn.identity
        .borrow()
        .as_deref()
        .is_some_and(|id| allows(shard, id, topic))
}

/// A refreshed token may allow fewer topics: every subscription it does
/// not allow ends now (topic index and `subs`), each told to the client
/// with one `error` 4403 frame carrying the topic and no `id`. Pending
/// `sub`s are checked when the broker answers them ([`may_subscribe`]).
fn end_forbidden(shard: &Rc<Shard>, conn: &Rc<Conn>, fresh: &Identity) {
    let ended: Vec<TopicName> = conn
        .live_topics()
        .into_iter()
        .filter(|t| !allows(shard, fresh, t))
        .collect();
    for topic in ended {
        shard.unsubscribe(conn, &topic);
        let reason = "subscription ended: topic not allowed by the refreshed token";
        let frame = encode_topic_error(None, code::FORBIDDEN_TOPIC, &topic, reason);
        shard.queue(conn, frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centisecond_stamps_measure_spans_from_the_first_millisecond() {
        assert_ne!(centis(0), 0, "0 means no stamp");
        assert_eq!(centis_since(0, centis(0)), 0);
        assert_eq!(centis_since(5_000, centis(0)), 5_000);
        assert_eq!(centis_since(1_234, centis(1_200)), 30);
        // Across the wrap, spans stay right.
        let wrap = u64::from(u32::MAX) * 10;
        assert_eq!(centis_since(wrap + 2_000, centis(wrap - 1_000)), 3_000);
    }

    /// An idle connection is this struct in an `Rc` plus a registry entry:
    /// keep it small (issue #3 targets under 400 B per idle connection).
    /// With the `Rc`'s two counts it must fit the allocator's 256-byte class.
    #[test]
    fn connection_state_stays_small() {
        let size = std::mem::size_of::<Conn>();
        assert!(size + 16 <= 256, "Conn grew to {size} bytes");
    }

    #[test]
    fn after_flush_never_downgrades() {
        use AfterFlush::{Fin, Nothing, Shut};
        // fail() after an HTTP refusal or a completed close handshake.
        assert_eq!(Shut.then(Fin), Shut);
        assert_eq!(Shut.then(Nothing), Shut);
        assert_eq!(Fin.then(Nothing), Fin);
        assert_eq!(Nothing.then(Fin), Fin);
        assert_eq!(Fin.then(Shut), Shut);
    }
}
