//! How a shard watches and writes its connections' sockets: through its
//! data ring (io_uring, the default where the kernel has it) or through an
//! epoll set and plain non-blocking calls (the fallback: old kernels,
//! `MONOIO_FORCE_LEGACY_DRIVER`, `--data-path epoll`).
//!
//! On the ring, every connection has one standing multishot poll (no task,
//! no buffer); a flush round pushes one send per dirty connection (its
//! queued frames, vectored) and submits them all with one
//! `io_uring_enter`; the completions come back to the readiness loop
//! (`runtime.rs`), which puts back what a send did not write and sends
//! again. A connection has at most one send in flight: its frames leave the
//! queue for the ring (still counted against the bound,
//! `OutQueue::sending`), so none is replaced, dropped or sent twice, and
//! the ring owns them and holds the connection until the completion
//! (`crate::ring`), so nothing the kernel may still read is freed and the
//! connection's fd stays open.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{trace, warn};

use super::conn::{self, Conn, Flushed, Phase};
use super::Shard;
use crate::id::ConnId;
use crate::ring::{Completion, DataRing, Op};

/// The data ring's submission entries per shard (a power of two; four
/// times as many completion entries): 64 + 64 KiB. A round with more
/// pushes submits more than once, which costs one system call per 1,024
/// sends.
pub(super) const RING_ENTRIES: u32 = 1024;

/// Rounds of submit-then-reap per [`Shard::flush_dirty`].
pub(super) const RING_ROUNDS: usize = 8;

/// Which way the shard's sockets are watched and written.
pub(crate) enum Io {
    /// An epoll set; reads and writes are plain non-blocking calls.
    Epoll(crate::sys::Epoll),
    /// The shard's own io_uring.
    Ring(Box<RefCell<Ring>>),
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Io {
    /// `io_uring` or `epoll`, as logged.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Io::Epoll(_) => "epoll",
            Io::Ring(_) => "io_uring",
        }
    }

    /// The data ring, when `io_uring` is wanted and the kernel has what it
    /// needs; else an epoll set (and why, when the ring was wanted).
    pub(crate) fn open(ring: bool) -> io::Result<(Io, Option<io::Error>)> {
        if ring {
            match DataRing::new(RING_ENTRIES) {
                Ok(r) => return Ok((Io::Ring(Box::new(RefCell::new(Ring::new(r)))), None)),
                Err(e) => return Ok((Io::Epoll(crate::sys::Epoll::new()?), Some(e))),
            }
        }
        Ok((Io::Epoll(crate::sys::Epoll::new()?), None))
    }

    /// A second fd to wait on: readable when there is something to reap.
    pub(crate) fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        match self {
            Io::Epoll(e) => e.try_clone_fd(),
            Io::Ring(r) => r.borrow().ring.try_clone_fd(),
        }
    }
}

/// The ring, and the connections whose readiness request is being
/// removed.
pub(crate) struct Ring {
    /// Each send holds its connection (so its fd stays open) until done.
    ring: DataRing<Rc<Conn>>,
    /// Held (their fd open, so its number cannot be reused under an entry
    /// not yet submitted) until the removal completes.
    unwatching: HashMap<ConnId, Rc<Conn>>,
    /// Completions being handled (kept for its capacity).
    reaped: Vec<Completion>,
    /// Submits already added to `ringcast_io_uring_submits_total`.
    counted: u64,
}

impl Ring {
    fn new(ring: DataRing<Rc<Conn>>) -> Ring {
        Ring {
            ring,
            unwatching: HashMap::new(),
            reaped: Vec::new(),
            counted: 0,
        }
    }
}

impl Shard {
    /// Starts watching a new connection's socket for input.
    pub(super) fn watch(&self, conn: &Conn) -> io::Result<()> {
        match &self.io {
            Io::Epoll(e) => e.add(conn.fd(), crate::sys::EPOLLIN, conn.id.0),
            Io::Ring(r) => r.borrow_mut().ring.watch(conn.fd(), conn.id.0),
        }
    }

    /// Stops watching a finished connection's socket.
    pub(super) fn unwatch(&self, conn: &Rc<Conn>) {
        match &self.io {
            Io::Epoll(e) => {
                let _ = e.delete(conn.fd());
            }
            Io::Ring(r) => {
                let mut r = r.borrow_mut();
                match r.ring.unwatch(conn.id.0) {
                    Ok(()) => {
                        r.unwatching.insert(conn.id, conn.clone());
                    }
                    Err(e) => {
                        drop(r);
                        self.fail_ring(e);
                    }
                }
            }
        }
    }

    /// Writes a dirty connection's queue: now (epoll), or as a send of
    /// this round's submission (the ring). A connection whose writing is
    /// under way (a send in flight, or a full socket) is left to it.
    pub(super) fn flush(&self, conn: &Rc<Conn>) {
        conn.dirty.set(false);
        if conn.write_blocked.get() {
            return;
        }
        match &self.io {
            Io::Epoll(_) => match conn::write_queue(&self.metrics, conn) {
                Flushed::Done => conn.flushed(),
                Flushed::Blocked => {
                    conn.write_blocked.set(true);
                    self.watch_writable(conn, true);
                }
                Flushed::Failed => conn.shut(),
            },
            Io::Ring(r) => {
                if conn.out.borrow().frames.is_empty() {
                    return conn.flushed();
                }
                if conn.phase() == Phase::Closed {
                    return;
                }
                if let Err(e) = start_send(&mut r.borrow_mut(), conn) {
                    self.fail_ring(e);
                }
            }
        }
    }

    /// Hands what the ring pushed this round to the kernel.
    pub(super) fn submit(&self) {
        if let Io::Ring(r) = &self.io {
            let mut r = r.borrow_mut();
            let done = r.ring.submit();
            // Every submit since the last count: this one, and those a
            // full queue made while the round pushed.
            let total = r.ring.submits();
            self.metrics
                .ring_submits
                .fetch_add(total - std::mem::replace(&mut r.counted, total), Relaxed);
            drop(r);
            if let Err(e) = done {
                self.fail_ring(e);
            }
        }
    }

    /// Adds or removes EPOLLOUT for a connection whose socket is full
    /// (the epoll path; on the ring the kernel waits for room itself).
    pub(crate) fn watch_writable(&self, conn: &Conn, on: bool) {
        let Io::Epoll(epoll) = &self.io else { return };
        let events = if on {
            crate::sys::EPOLLIN | crate::sys::EPOLLOUT
        } else {
            crate::sys::EPOLLIN
        };
        if epoll.modify(conn.fd(), events, conn.id.0).is_err() {
            conn.shut();
        }
    }

    /// The socket takes data again (EPOLLOUT): write what waits.
    pub(super) fn on_writable(&self, conn: &Rc<Conn>) {
        if !conn.write_blocked.get() {
            return;
        }
        match conn::write_queue(&self.metrics, conn) {
            Flushed::Blocked => return,
            Flushed::Done => conn.flushed(),
            Flushed::Failed => conn.shut(),
        }
        conn.write_blocked.set(false);
        self.watch_writable(conn, false);
    }

    /// Handles the ring's waiting completions, up to a batch; returns how
    /// many (0 on the epoll path). The caller flushes after.
    pub(super) fn reap(self: &Rc<Self>) -> usize {
        let Io::Ring(r) = &self.io else { return 0 };
        let mut done = {
            let mut r = r.borrow_mut();
            let mut done = std::mem::take(&mut r.reaped);
            r.ring.reap(&mut done);
            done
        };
        let n = done.len();
        for c in done.drain(..) {
            match c.op {
                Op::Watch => self.on_watch(r, c),
                Op::Send => self.on_sent(r, c),
                Op::Writable => self.on_room(r, c),
                Op::Unwatch => {
                    r.borrow_mut().unwatching.remove(&ConnId(c.token));
                }
            }
        }
        r.borrow_mut().reaped = done;
        n
    }

    /// A connection's readiness: act on it; re-arm a request the kernel
    /// ended (a multishot poll can end on its own, e.g. out of memory).
    fn on_watch(self: &Rc<Self>, r: &RefCell<Ring>, c: Completion) {
        let id = ConnId(c.token);
        if c.result >= 0 {
            self.on_ready(id, c.result as u32);
        }
        if c.more {
            return;
        }
        let Some(conn) = self.conn(id) else { return };
        if c.result == -libc::ECANCELED || conn.phase() == Phase::Closed {
            return;
        }
        if c.result < 0 {
            trace!(
                conn = id.0,
                errno = -c.result,
                "readiness request failed; re-arming"
            );
        }
        if let Err(e) = r.borrow_mut().ring.watch(conn.fd(), id.0) {
            self.fail_ring(e);
        }
    }

    /// A send completed: what it did not write goes back to the front of
    /// the queue, and the queue is sent again.
    fn on_sent(&self, r: &RefCell<Ring>, c: Completion) {
        if c.result == -libc::EAGAIN {
            // The kernel did not wait for room (a socket set up so): wait
            // here, holding the slot (and the connection) until there is.
            let waited = r.borrow_mut().ring.wait_writable(c.token);
            if let Err(e) = waited {
                self.fail_ring(e);
            }
            return;
        }
        let written = usize::try_from(c.result).unwrap_or(0);
        let Some(conn) = self.finish_send(r, c.token, written) else {
            return;
        };
        match c.result {
            n if n >= 0 => {
                self.metrics.socket_writes.fetch_add(1, Relaxed);
                self.metrics.bytes_sent.fetch_add(n as u64, Relaxed);
                self.flush(&conn);
            }
            e if e == -libc::EINTR => self.flush(&conn),
            e => {
                trace!(conn = conn.id.0, errno = -e, "send failed");
                conn.shut();
            }
        }
    }

    /// A full socket takes data again: send once more.
    fn on_room(&self, r: &RefCell<Ring>, c: Completion) {
        let Some(conn) = self.finish_send(r, c.token, 0) else {
            return;
        };
        if c.result < 0 && c.result != -libc::EINTR {
            return conn.shut();
        }
        self.flush(&conn);
    }

    /// Ends send `slot` (`written` bytes went): its connection, when it is
    /// still the shard's, with the unwritten frames back in its queue;
    /// for a finished connection they are counted as not delivered.
    fn finish_send(&self, r: &RefCell<Ring>, slot: u64, written: usize) -> Option<Rc<Conn>> {
        let mut back = Vec::new();
        let mut ring = r.borrow_mut();
        let len = ring.ring.send_len(slot);
        let conn = ring
            .ring
            .finish_send(slot, written, |frame, sent| back.push((frame, sent)))?;
        drop(ring);
        conn.write_blocked.set(false);
        if !self.conns.borrow().contains_key(&conn.id) {
            self.metrics.dropped_n(
                crate::metrics::Undelivered::ConnectionClosed,
                back.len() as u64,
            );
            return None;
        }
        let mut out = conn.out.borrow_mut();
        out.send_done(len);
        for (frame, sent) in back {
            out.put_back(frame, sent);
        }
        drop(out);
        Some(conn)
    }

    /// Work that a wait for readiness would not show: connections still
    /// dirty after a bounded [`Shard::flush_dirty`] (on the ring, queued
    /// by its last round's completions), and completions in the ring's
    /// backlog (out of its completion queue, so its fd is not readable
    /// for them).
    pub(super) fn io_left(&self) -> bool {
        !self.dirty.borrow().is_empty()
            || matches!(&self.io, Io::Ring(r) if r.borrow().ring.has_backlog())
    }

    /// Gives back what a burst of sends or closes left allocated on the
    /// ring's side (the sweep, before the allocator's collection).
    pub(super) fn trim_io(&self) {
        if let Io::Ring(r) = &self.io {
            let mut r = r.borrow_mut();
            r.ring.trim();
            r.reaped = Vec::new();
            if r.unwatching.is_empty() && r.unwatching.capacity() > 0 {
                r.unwatching = HashMap::new();
            }
        }
    }

    /// The ring cannot take entries: this shard cannot go on.
    fn fail_ring(&self, e: io::Error) {
        warn!(error = %e, "the data ring failed");
        self.fail(super::ShardFailure::new("the data ring failed", e));
    }
}

/// Hands the connection's queued frames (up to [`crate::sys::MAX_IOV`])
/// to the ring as one send.
fn start_send(r: &mut Ring, conn: &Rc<Conn>) -> io::Result<()> {
    let mut out = conn.out.borrow_mut();
    let (offset, frames) = out.take_for_send(crate::sys::MAX_IOV);
    r.ring.send(conn.fd(), conn.clone(), offset, frames)?;
    conn.write_blocked.set(true);
    Ok(())
}
