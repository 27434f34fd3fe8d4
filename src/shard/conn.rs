//! One connection's record on its shard: where it is in its life, its
//! subscriptions, its outbound queue and how that queue is written. The
//! shard drives it (`super::input`, `super::upgrade`, `super::ops`); this
//! file never names the shard.
//!
//! A connection owns no task and, while idle, no buffer: it is an entry in
//! the shard's registry and a readiness request in the shard's data ring
//! (or epoll set). Frames are queued as shared `Bytes` and written with one
//! vectored send per flush (`super::io`): a send of the data ring, or a
//! `sendmsg` on epoll, where a full socket also waits for EPOLLOUT.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use tracing::trace;

use crate::auth::Identity;
use crate::config::Config;
use crate::id::ConnId;
use crate::metrics::ShardMetrics;
use crate::sys;
use crate::topic::TopicName;
use crate::ws::frame::Decoder;

pub(crate) use super::queue::OutQueue;

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

/// `Sub::slot` of a subscription asked of the broker and not yet answered.
pub(super) const PENDING: u32 = u32::MAX;

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
pub(super) enum AfterFlush {
    /// Keep it open.
    Nothing,
    /// Send FIN (we failed the connection); keep reading until the peer closes.
    Fin,
    /// Shut both ways (HTTP error sent, or close handshake complete).
    Shut,
}

impl AfterFlush {
    /// The stronger of the two: never a downgrade.
    pub(super) fn then(self, next: AfterFlush) -> AfterFlush {
        self.max(next)
    }
}

/// What one read of a connection leaves for the next.
pub(super) struct Carry {
    /// Bytes of an incomplete frame or upgrade request.
    pub(super) buf: BytesMut,
    /// The frame decoder, holding a fragmented message's parts.
    pub(super) decoder: Decoder,
}

/// One connection's state, owned by its shard.
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    /// The socket; closed when the last `Rc<Conn>` goes.
    pub(super) socket: OwnedFd,
    pub(super) phase: Cell<Phase>,
    /// Handshake, auth or close deadline, and when the client last sent
    /// anything: the shard's milliseconds in 32 bits, compared wrapping
    /// (a deadline is at most ~12 days ahead, and the heartbeat ends a
    /// silence long before the count wraps).
    deadline: Cell<u32>,
    last_rx: Cell<u32>,
    pub(super) out: RefCell<OutQueue>,
    /// Queued since the last flush (already on the shard's dirty list).
    pub(super) dirty: Cell<bool>,
    /// Writing is under way: the socket is full and registered for
    /// EPOLLOUT until it drains (epoll), or a send is in flight (the ring).
    pub(super) write_blocked: Cell<bool>,
    /// What to do to the socket once the queue is written.
    pub(super) after_flush: Cell<AfterFlush>,
    /// The upgrade succeeded at some point (counted in connections_active).
    pub(super) opened: Cell<bool>,
    /// Counted toward the connection caps since accept ([`Shard::admit`]).
    pub(super) counted: Cell<bool>,
    /// What a read leaves for the next: the bytes of an incomplete frame
    /// (or upgrade request) and a fragmented message's parts. `None`
    /// between messages, so an idle connection holds one word for both
    /// ([`Conn::take_carry`], [`Conn::keep_carry`]).
    carry: Cell<Option<Box<Carry>>>,
    /// permessage-deflate: the window (in bits) the client takes for our
    /// messages; 0 when not negotiated. The compressor and inflater are
    /// the shard's: a connection holds nothing else for it.
    pub(super) deflate: Cell<u8>,
    /// Topics subscribed or pending (a short list: linear search beats a
    /// set's memory).
    /// A `Cell` (no borrow flag): used through [`Conn::with_topics`] and
    /// [`Conn::resize_topics`].
    topics: Cell<Box<[Sub]>>,
    /// Who the client is; `None` until its `auth` frame is accepted. A
    /// `Cell` (one word): read through [`Conn::identity`].
    identity: Cell<Option<Rc<Identity>>>,
    /// The client's address, for the per-address caps and log lines: the
    /// socket's peer, or, from a trusted proxy, the address its PROXY
    /// header or `X-Forwarded-For` names (set before [`Shard::admit`]).
    pub(crate) peer: Cell<IpAddr>,
    /// Inbound rate limits: frames and bytes left in the two buckets, and
    /// when both were last refilled (in [`centis`](super::rate::centis)).
    pub(super) tokens: Cell<f32>,
    pub(super) byte_tokens: Cell<f32>,
    pub(super) refilled: Cell<u32>,
    /// The shard's delivery stamp of the last message queued here through
    /// a wildcard match: a message several of the connection's
    /// subscriptions match is queued once (`patterns.rs`).
    pub(super) seen: Cell<u64>,
}

/// What a log line or a failed test shows of a connection (the `Cell`s
/// that hold a box or an `Rc` cannot be read through `&self` by a derive).
impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("fd", &self.fd())
            .field("phase", &self.phase.get())
            .field("peer", &self.peer.get())
            .field("queued_bytes", &self.out.try_borrow().map(|q| q.bytes).ok())
            .field("topics", &self.topic_count())
            .finish_non_exhaustive()
    }
}

/// `now + after` in the 32-bit wrapping milliseconds of [`Conn`]'s
/// times, `after` capped below half the range.
fn wrapping_ms(now: u64, after: std::time::Duration) -> u32 {
    let after = after.as_millis().min(i32::MAX as u128 / 2) as u32;
    (now as u32).wrapping_add(after)
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
            deadline: Cell::new(wrapping_ms(now, config.handshake_timeout)),
            last_rx: Cell::new(now as u32),
            out: RefCell::new(OutQueue::default()),
            dirty: Cell::new(false),
            write_blocked: Cell::new(false),
            after_flush: Cell::new(AfterFlush::Nothing),
            opened: Cell::new(false),
            counted: Cell::new(false),
            carry: Cell::new(None),
            deflate: Cell::new(0),
            topics: Cell::new(Box::default()),
            identity: Cell::new(None),
            peer: Cell::new(peer),
            tokens: Cell::new(config.inbound_burst as f32),
            byte_tokens: Cell::new(config.inbound_bytes_burst as f32),
            refilled: Cell::new(super::rate::centis(now)),
            seen: Cell::new(0),
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
    /// Whether the deadline (handshake, auth or close) is reached at `now`.
    pub(crate) fn deadline_passed(&self, now: u64) -> bool {
        (now as u32).wrapping_sub(self.deadline.get()) as i32 >= 0
    }
    /// The deadline is `after` from `now` (at most ~12 days: longer is
    /// taken as that).
    pub(crate) fn set_deadline(&self, now: u64, after: std::time::Duration) {
        self.deadline.set(wrapping_ms(now, after));
    }
    /// The client sent something at `now`.
    pub(crate) fn heard(&self, now: u64) {
        self.last_rx.set(now as u32);
    }
    /// Milliseconds since the client last sent anything.
    pub(crate) fn silent_ms(&self, now: u64) -> u64 {
        u64::from((now as u32).wrapping_sub(self.last_rx.get()))
    }
    pub(crate) fn set_closing(&self, now: u64, after: std::time::Duration) {
        self.phase.set(Phase::Closing);
        self.set_deadline(now, after);
    }
    /// Who the client is (`None` until its `auth` is accepted), to keep
    /// while handling something that may replace it.
    pub(crate) fn identity(&self) -> Option<Rc<Identity>> {
        let identity = self.identity.take();
        self.identity.set(identity.clone());
        identity
    }
    /// Runs `f` on who the client is, without a new reference (the
    /// sweep's and a presence event's look at every connection). `f` must
    /// not reach this connection's identity again (it is out of its cell).
    pub(crate) fn read_identity<R>(&self, f: impl FnOnce(Option<&Identity>) -> R) -> R {
        let identity = self.identity.take();
        let r = f(identity.as_deref());
        self.identity.set(identity);
        r
    }
    pub(crate) fn set_identity(&self, identity: Option<Rc<Identity>>) {
        self.identity.set(identity);
    }
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes as usize
    }

    /// What the last read left (see [`Carry`]), or an empty buffer and a
    /// new decoder. The caller hands it back with [`Conn::keep_carry`].
    pub(super) fn take_carry(&self, max_message_size: usize) -> Carry {
        self.carry.take().map_or_else(
            || Carry {
                buf: BytesMut::new(),
                decoder: Decoder::new(max_message_size),
            },
            |carry| *carry,
        )
    }

    /// Keeps what the next read needs: nothing (and no allocation) when
    /// the buffer is empty and no fragmented message is under way.
    pub(super) fn keep_carry(&self, mut carry: Carry) {
        if carry.buf.is_empty() {
            if !carry.decoder.in_message() {
                return;
            }
            // Between the frames of a message: no read buffer either.
            carry.buf = BytesMut::new();
        }
        self.carry.set(Some(Box::new(carry)));
    }

    /// Forgets what the last read left (a refused upgrade).
    pub(super) fn drop_carry(&self) {
        self.carry.set(None);
    }

    /// Runs `f` on the topic list (taken out of its cell meanwhile: `f`
    /// must not reach this connection's list again).
    fn with_topics<R>(&self, f: impl FnOnce(&mut [Sub]) -> R) -> R {
        let mut topics = self.topics.take();
        let r = f(&mut topics);
        self.topics.set(topics);
        r
    }

    /// Whether `topic` is subscribed (live in the topic index).
    pub(crate) fn is_subscribed(&self, topic: &TopicName) -> bool {
        self.with_topics(|t| t.iter().any(|s| s.slot != PENDING && s.topic == *topic))
    }

    /// Whether a `sub` of `topic` waits for the broker.
    pub(crate) fn is_pending(&self, topic: &TopicName) -> bool {
        self.with_topics(|t| t.iter().any(|s| s.slot == PENDING && s.topic == *topic))
    }

    /// Subscriptions, live and pending.
    pub(crate) fn topic_count(&self) -> usize {
        self.with_topics(|t| t.len())
    }

    /// Records a `sub` sent to the broker.
    pub(crate) fn add_pending(&self, topic: TopicName) {
        self.add_sub(Sub {
            topic,
            slot: PENDING,
        });
    }

    /// Appends to the topic list, which is exactly as long as it needs
    /// to be: most clients hold one subscription (24 bytes, where a
    /// `Vec`'s first push makes room for four), and a boxed slice is a
    /// word shorter than a `Vec`.
    fn add_sub(&self, sub: Sub) {
        self.resize_topics(|topics| {
            topics.reserve_exact(1);
            topics.push(sub);
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
        self.resize_topics(|topics| {
            let i = topics
                .iter()
                .position(|s| want(s.slot) && s.topic == *topic)?;
            Some(topics.swap_remove(i).slot)
        })
    }

    /// Runs `f` on the topic list as a `Vec` (taken out of its cell
    /// meanwhile), then keeps it exactly as long as it is.
    fn resize_topics<R>(&self, f: impl FnOnce(&mut Vec<Sub>) -> R) -> R {
        let mut topics = self.topics.take().into_vec();
        let r = f(&mut topics);
        self.topics.set(topics.into_boxed_slice());
        r
    }

    /// Records a live subscription at `slot` of the topic's subscriber list.
    pub(crate) fn add_live(&self, topic: TopicName, slot: u32) {
        self.add_sub(Sub { topic, slot });
    }

    /// The subscription to `topic` moved to `slot` (another one left the list).
    pub(crate) fn move_slot(&self, topic: &TopicName, slot: u32) {
        self.with_topics(|t| {
            if let Some(s) = t
                .iter_mut()
                .find(|s| s.slot != PENDING && s.topic == *topic)
            {
                s.slot = slot;
            }
        });
    }

    /// The live subscriptions' topics.
    pub(crate) fn live_topics(&self) -> Vec<TopicName> {
        self.with_topics(|t| {
            t.iter()
                .filter(|s| s.slot != PENDING)
                .map(|s| s.topic.clone())
                .collect()
        })
    }

    /// Takes every subscription away (the connection is over), live and
    /// pending.
    pub(crate) fn take_all(&self) -> Vec<Sub> {
        self.topics.take().into_vec()
    }

    /// Shuts the socket: the task sees end of stream and cleans up.
    pub(crate) fn shut(&self) {
        if self.phase.replace(Phase::Closed) != Phase::Closed {
            sys::shutdown(self.fd());
        }
    }

    /// Called when the queue has been written out completely.
    pub(super) fn flushed(&self) {
        // An idle connection keeps no queue storage either.
        let mut out = self.out.borrow_mut();
        if out.frames.capacity() > 0 {
            out.frames = Default::default();
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
        self.out.borrow_mut().push(frame);
        !self.dirty.replace(true)
    }

    /// Queues a `msg` frame under its topic's policy (see
    /// [`OutQueue::push_msg`]); with the verdict, whether the connection
    /// just became dirty.
    pub(crate) fn push_msg(
        &self,
        frame: Bytes,
        tag: Option<&Rc<super::queue::Tag>>,
        id: crate::id::MsgId,
        bound: usize,
    ) -> (super::queue::Pushed, bool) {
        let pushed = self.out.borrow_mut().push_msg(frame, tag, id, bound);
        let dirty = pushed != super::queue::Pushed::Full && !self.dirty.replace(true);
        (pushed, dirty)
    }

    /// Drops every frame not yet started (a slow consumer about to be
    /// closed); returns how many were dropped.
    pub(crate) fn discard_unsent(&self) -> u64 {
        self.out.borrow_mut().discard_unsent()
    }
}

/// How one write attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flushed {
    /// Everything queued was written.
    Done,
    /// The socket is full; wait until it is writable.
    Blocked,
    /// The socket failed; the connection is over.
    Failed,
}

/// Where an outbound queue is written: anything that takes a vectored
/// write, as a socket does (a short write and `WouldBlock` when full).
/// The connection's socket in production ([`write_queue`]); an in-memory
/// sink in the shard's tests.
pub(super) trait Sink {
    /// Writes some prefix of `bufs`; returns how many bytes.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// A connection's socket: one `sendmsg` per write, never waiting.
struct Socket(RawFd);

impl Sink for Socket {
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sys::send_vectored(self.0, bufs)
    }
}

/// Writes what the connection's queue holds to its socket, in as few
/// `sendmsg` calls as the socket allows.
pub(super) fn write_queue(metrics: &ShardMetrics, conn: &Conn) -> Flushed {
    conn.out
        .borrow_mut()
        .write_to(&mut Socket(conn.fd()), metrics)
}

impl OutQueue {
    /// Writes the queue to `sink`, up to [`sys::MAX_IOV`] frames per
    /// vectored write, until it is empty or the sink is full. Generic, so
    /// the socket path has no dynamic dispatch; the slices live on the
    /// stack, so a write allocates nothing.
    pub(super) fn write_to(&mut self, sink: &mut impl Sink, metrics: &ShardMetrics) -> Flushed {
        while !self.frames.is_empty() {
            let written = {
                let mut iov = [IoSlice::new(&[]); sys::MAX_IOV];
                let n = self.gather(&mut iov);
                sink.write_vectored(&iov[..n])
            };
            match written {
                Ok(n) => {
                    metrics.socket_writes.fetch_add(1, Relaxed);
                    metrics.bytes_sent.fetch_add(n as u64, Relaxed);
                    self.consume(n);
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

    /// Points `iov` at the unwritten frames, the front one from `offset`;
    /// returns how many slices it filled.
    fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, (i, frame)) in iov.iter_mut().zip(self.frames().enumerate()) {
            let part = if i == 0 {
                frame.get(self.offset as usize..).unwrap_or_default()
            } else {
                &frame[..]
            };
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
impl Conn {
    /// A connection on `/dev/null` (default settings, peer 127.0.0.1), for
    /// tests of the shard's bookkeeping that do no socket I/O.
    pub(super) fn detached(id: u64, now: u64) -> Conn {
        let fd = std::fs::File::open("/dev/null").expect("/dev/null").into();
        let peer = IpAddr::from([127, 0, 0, 1]);
        Conn::new(ConnId(id), fd, peer, now, &Config::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection is this struct in an `Rc` plus a registry entry:
    /// keep it small (issue #13 targets 400 B per authenticated idle
    /// subscriber). With the `Rc`'s two counts it must fit the allocator's
    /// 160-byte class (mimalloc's classes here: 128, 160, 192, 224).
    #[test]
    fn connection_state_stays_small() {
        let size = std::mem::size_of::<Conn>();
        assert!(size + 16 <= 160, "Conn grew to {size} bytes");
    }

    fn conn_at(now: u64) -> Conn {
        Conn::detached(1, now)
    }

    /// The 32-bit times compare right across the wrap of the count (a
    /// shard 49.7 days up) and at the u64 values either side of it.
    #[test]
    fn deadlines_and_silence_survive_the_wrap() {
        let second = std::time::Duration::from_secs(1);
        for start in [0, u64::from(u32::MAX) - 500, 1 << 32, (7 << 32) - 1] {
            let c = conn_at(start);
            c.set_deadline(start, second);
            assert!(!c.deadline_passed(start), "at {start}");
            assert!(!c.deadline_passed(start + 999), "at {start}");
            assert!(c.deadline_passed(start + 1000), "at {start}");
            assert!(c.deadline_passed(start + 3_600_000), "at {start}");
            c.heard(start);
            assert_eq!(c.silent_ms(start + 1234), 1234, "at {start}");
            c.set_closing(start, second);
            assert_eq!(c.phase(), Phase::Closing);
            assert!(c.deadline_passed(start + 1000), "at {start}");
        }
        // A timeout past half the range is capped, never read as passed.
        let c = conn_at(5);
        c.set_deadline(5, std::time::Duration::from_secs(100 * 24 * 3600));
        assert!(!c.deadline_passed(5 + 1000 * 3600 * 24));
    }

    /// The identity is read through the cell without being lost.
    #[test]
    fn identity_reads_leave_it_in_place() {
        let c = conn_at(0);
        assert!(c.identity().is_none());
        c.set_identity(Some(Rc::new(Identity::guest())));
        assert!(c.identity().is_some_and(|i| i.is_guest()));
        assert!(c.identity().is_some(), "a read took it away");
        assert!(c.read_identity(|i| i.is_some_and(Identity::is_guest)));
        assert!(c.identity().is_some(), "a look took it away");
        assert!(format!("{c:?}").contains("Conn"));
    }

    /// The topic list is as long as the subscriptions, growing and
    /// shrinking one at a time, and keeps them all.
    #[test]
    fn the_topic_list_is_exactly_as_long_as_needed() {
        let c = conn_at(0);
        let name = |i: u32| TopicName::new(&format!("ns:t{i}")).unwrap();
        for i in 0..5u32 {
            c.add_live(name(i), i);
            assert_eq!(c.topic_count(), i as usize + 1);
        }
        c.add_pending(name(9));
        assert_eq!(c.take_live(&name(1)), Some(1));
        assert_eq!(c.take_live(&name(1)), None);
        assert!(!c.take_pending(&name(1)), "live is not pending");
        assert!(c.take_pending(&name(9)));
        assert_eq!(c.topic_count(), 4);
        let mut left: Vec<String> = c.live_topics().iter().map(|t| t.to_string()).collect();
        left.sort();
        assert_eq!(left, ["ns:t0", "ns:t2", "ns:t3", "ns:t4"]);
        assert_eq!(c.take_all().len(), 4);
        assert_eq!(c.topic_count(), 0);
    }

    /// What a read leaves is kept only while something is left (a part
    /// of a frame, or a fragmented message under way), and comes back
    /// whole to the next read.
    #[test]
    fn the_carry_is_kept_only_while_something_is_left() {
        use crate::ws::frame::Message;
        // Client frames, masked with zeros: "hel" (text, not final), then
        // "lo" (continuation, final).
        let first = [0x01, 0x83, 0, 0, 0, 0, b'h', b'e', b'l'];
        let last = [0x80, 0x82, 0, 0, 0, 0, b'l', b'o'];
        let c = conn_at(0);
        c.keep_carry(c.take_carry(1 << 20));
        assert!(c.carry.take().is_none(), "nothing left, nothing kept");

        let mut carry = c.take_carry(1 << 20);
        carry.buf.extend_from_slice(&first);
        assert!(matches!(carry.decoder.decode(&mut carry.buf), Ok(None)));
        c.keep_carry(carry);
        let carry = c.carry.take().expect("a message under way is kept");
        assert!(carry.buf.is_empty() && carry.buf.capacity() == 0);
        c.keep_carry(*carry);

        let mut carry = c.take_carry(1 << 20);
        carry.buf.extend_from_slice(&last[..3]);
        assert!(matches!(carry.decoder.decode(&mut carry.buf), Ok(None)));
        c.keep_carry(carry);
        let mut carry = c.take_carry(1 << 20);
        assert_eq!(carry.buf.len(), 3, "the part of a frame came back");
        carry.buf.extend_from_slice(&last[3..]);
        match carry.decoder.decode(&mut carry.buf) {
            Ok(Some(Message::Text(t))) => assert_eq!(&t[..], b"hello"),
            other => panic!("{other:?}"),
        }
        c.keep_carry(carry);
        assert!(c.carry.take().is_none(), "the message is done");
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
