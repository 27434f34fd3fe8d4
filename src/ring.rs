//! The data ring: a shard's own io_uring, beside its monoio runtime's,
//! carrying its connections' readiness and writes.
//!
//! Why a ring of ringcast's own: monoio 0.2.4 gives every operation a
//! future (one task, or one await, per connection and per write) and has
//! no multishot poll; a shard wants the opposite, thousands of sends
//! pushed in one flush round and submitted with one `io_uring_enter`, and
//! one standing readiness request per connection with no task behind it.
//! So the shard pushes entries here and submits them at the end of each
//! round; monoio only waits until this ring's fd is readable (completions
//! are waiting), as it waits for the epoll set on the fallback path
//! ([`crate::sys::FdWaiter`]).
//!
//! What a completion is for travels in its user data: the low two bits are
//! the [`Op`], the rest a token (a connection id, or a send's slot).
//!
//! This file is the one place that builds submission entries, and it keeps
//! alive what they point to: a send's slot owns its frames (moved in: a
//! `Bytes` never moves its bytes) and the caller's owner (for the shard,
//! the connection, so its fd stays open) until [`DataRing::finish_send`]
//! after the completion, which hands back the frames the kernel did not
//! take. The vectors and message headers of vectored sends live in
//! per-submission arenas: the kernel copies them when it takes the entry
//! (`IORING_FEAT_SUBMIT_STABLE`, required), so they are reused after each
//! submit and a connection holds none between sends.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

mod chunks;
use chunks::{Chunks, CHUNK};

/// Completions harvested per [`DataRing::reap`].
pub const REAP_BATCH: usize = 1024;

/// The oldest kernel whose io_uring has what the data path needs:
/// `IORING_SETUP_SUBMIT_ALL` (5.18), multishot poll (5.13) and
/// `IORING_OP_SEND` (5.6).
const MIN_KERNEL: (u32, u32) = (5, 18);

/// What an entry does; its completion carries it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A connection's standing readiness request (multishot poll for
    /// input, hang-up and errors); token: the connection id.
    Watch,
    /// A write; token: the send's slot.
    Send,
    /// A one-shot wait until a full socket takes data again; token: the
    /// send's slot.
    Writable,
    /// The end of a connection's readiness request; token: the connection id.
    Unwatch,
}

impl Op {
    fn bits(self) -> u64 {
        match self {
            Op::Watch => 0,
            Op::Send => 1,
            Op::Writable => 2,
            Op::Unwatch => 3,
        }
    }

    fn from_bits(bits: u64) -> Op {
        match bits & 3 {
            0 => Op::Watch,
            1 => Op::Send,
            2 => Op::Writable,
            _ => Op::Unwatch,
        }
    }
}

/// The user data of an entry: `op` in the low two bits, `token` above.
fn user_data(op: Op, token: u64) -> u64 {
    (token << 2) | op.bits()
}

/// One harvested completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// What the entry did.
    pub op: Op,
    /// Its connection id or send slot.
    pub token: u64,
    /// The operation's result: bytes written, a poll mask, or `-errno`.
    pub result: i32,
    /// A multishot request stays armed (`IORING_CQE_F_MORE`).
    pub more: bool,
}

/// A shard's data ring; `T` is what a send holds on to until it completes.
pub struct DataRing<T> {
    ring: IoUring,
    /// Entries pushed since the last submit.
    unsubmitted: usize,
    /// `io_uring_enter` calls made to submit.
    submits: u64,
    /// Completions moved out of a completion queue more than half full
    /// (by [`DataRing::submit`], between reaps), handed out first.
    backlog: Chunks<Completion>,
    /// Sends in flight (and their waits for room), by slot.
    slots: Chunks<Slot<T>>,
    /// Slots free for the next send.
    free: Vec<u32>,
    /// The unsubmitted vectored sends' vectors and headers: never grown
    /// past their capacity (a push that would is preceded by a submit), so
    /// the addresses in queued entries stay valid until the kernel copies
    /// them.
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
}

/// One send in flight: its owner and fd, its frames (the first sent from
/// `offset`), and how many bytes it carries.
struct Slot<T> {
    owner: Option<T>,
    fd: RawFd,
    offset: usize,
    frames: Frames,
    len: usize,
}

/// A send's frames: most sends carry one (what came since the last send),
/// kept inline; a list only for more.
#[derive(Default)]
enum Frames {
    #[default]
    Empty,
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Frames {
    fn from_iter(mut frames: impl Iterator<Item = Bytes>) -> Frames {
        let Some(first) = frames.next() else {
            return Frames::Empty;
        };
        let Some(second) = frames.next() else {
            return Frames::One(first);
        };
        let mut all = Vec::with_capacity(2 + frames.size_hint().0);
        all.push(first);
        all.push(second);
        all.extend(frames);
        Frames::Many(all)
    }

    fn as_slice(&self) -> &[Bytes] {
        match self {
            Frames::Empty => &[],
            Frames::One(frame) => std::slice::from_ref(frame),
            Frames::Many(all) => all,
        }
    }
}

/// Room in the per-submission arenas: vectors (at least one send's worth,
/// [`crate::sys::MAX_IOV`]) and headers.
const ARENA_IOVS: usize = 4 * crate::sys::MAX_IOV;
const ARENA_MSGS: usize = 512;

impl<T> std::fmt::Debug for DataRing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataRing")
            .field("fd", &self.ring.as_raw_fd())
            .field("unsubmitted", &self.unsubmitted)
            .finish()
    }
}

impl<T> DataRing<T> {
    /// A ring of `entries` submission entries (a power of two) and four
    /// times as many completion entries; fails where the kernel lacks what
    /// the data path needs, so the caller can fall back to epoll.
    pub fn new(entries: u32) -> io::Result<DataRing<T>> {
        let kernel = kernel_version();
        if kernel.is_some_and(|k| k < MIN_KERNEL) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "kernel {kernel:?} is older than {MIN_KERNEL:?} (submit-all, multishot poll)"
                ),
            ));
        }
        // Submit-all: an entry the kernel refuses gets its error completion
        // and the rest are still taken (so the arenas can be reused).
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_submit_all()
            .build(entries)?;
        // Completions beyond the queue are kept by the kernel, never lost;
        // what an entry points to is copied when the kernel takes it.
        if !ring.params().is_feature_nodrop() || !ring.params().is_feature_submit_stable() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without IORING_FEAT_NODROP or IORING_FEAT_SUBMIT_STABLE",
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::PollRemove::CODE, "POLL_REMOVE"),
            (opcode::Send::CODE, "SEND"),
            (opcode::SendMsg::CODE, "SENDMSG"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring without IORING_OP_{name}"),
                ));
            }
        }
        Ok(DataRing {
            ring,
            unsubmitted: 0,
            submits: 0,
            backlog: Chunks::default(),
            slots: Chunks::default(),
            free: Vec::new(),
            iovs: Vec::new(),
            msgs: Vec::new(),
        })
    }

    /// The ring's fd: readable while completions wait.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// A second fd of the ring, for the runtime to wait on.
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        // SAFETY: the fd is the ring's, open for as long as `self`.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd()) };
        fd.try_clone_to_owned()
    }

    /// `io_uring_enter` calls made so far to submit.
    pub fn submits(&self) -> u64 {
        self.submits
    }

    /// Queues one entry, submitting first when the queue is full.
    ///
    /// # Safety
    /// Whatever memory `sqe` points to stays valid until its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: as the caller promises.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Queues an entry that points to no memory (a poll, a poll's removal).
    fn push_plain(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: there is nothing for the kernel to read or write.
        unsafe { self.push(sqe) }
    }

    /// Hands every queued entry to the kernel: one `io_uring_enter`
    /// (another only if the kernel took fewer).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(taken) => {
                    self.submits += 1;
                    if !self.ring.submission().is_empty() {
                        if taken == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::WouldBlock,
                                "the kernel took no submission entry",
                            ));
                        }
                        continue;
                    }
                    self.unsubmitted = 0;
                    // The kernel has copied every queued entry's vectors.
                    self.iovs.clear();
                    self.msgs.clear();
                    self.spill();
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps the completion queue from overflowing while a round submits
    /// more than it holds (the kernel would keep the rest, but on a slow
    /// path): past half full, its completions move to the backlog.
    fn spill(&mut self) {
        let mut cq = self.ring.completion();
        if cq.len() * 2 < cq.capacity() {
            return;
        }
        for cqe in cq.by_ref() {
            self.backlog.push(completion(&cqe));
        }
    }

    /// Arms the standing readiness request of connection `token` on `fd`:
    /// a completion each time it has input, hangs up or fails.
    pub fn watch(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
        let sqe = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(true)
            .build()
            .user_data(user_data(Op::Watch, token));
        self.push_plain(&sqe)
    }

    /// Ends connection `token`'s readiness request; an [`Op::Unwatch`]
    /// completion follows (`-ENOENT` when it had ended already).
    pub fn unwatch(&mut self, token: u64) -> io::Result<()> {
        let sqe = opcode::PollRemove::new(user_data(Op::Watch, token))
            .build()
            .user_data(user_data(Op::Unwatch, token));
        self.push_plain(&sqe)
    }

    /// Writes `frames` to `fd`, the first from byte `offset` (one
    /// `IORING_OP_SEND` for one frame, else a vectored `IORING_OP_SENDMSG`);
    /// the slot owns them until the completion ([`Op::Send`], token: the
    /// slot) says how many bytes went, and [`DataRing::finish_send`] then
    /// hands `owner` and the rest back. Without `MSG_DONTWAIT`: on a full
    /// socket the kernel waits for room itself. How many bytes it carries:
    /// [`DataRing::send_len`].
    pub fn send(
        &mut self,
        fd: RawFd,
        owner: T,
        offset: usize,
        frames: impl Iterator<Item = Bytes>,
    ) -> io::Result<()> {
        let i = self.take_slot();
        let slot = self.slot_mut(i);
        slot.frames = Frames::from_iter(frames);
        slot.owner = Some(owner);
        slot.fd = fd;
        slot.offset = offset;
        let n = slot.frames.as_slice().len().min(crate::sys::MAX_IOV);
        // Room first, so that pushing the entry never submits (which
        // would reuse the arenas under it).
        if self.ring.submission().is_full()
            || self.iovs.len() + n > self.iovs.capacity()
            || self.msgs.len() == self.msgs.capacity()
        {
            self.submit()?;
        }
        if self.iovs.capacity() == 0 {
            // Given back by `trim`: empty, so no queued entry points here.
            self.iovs.reserve_exact(ARENA_IOVS);
            self.msgs.reserve_exact(ARENA_MSGS);
        }
        let slot = self.slots.get(i).expect("taken just now");
        let start = self.iovs.len();
        let mut total = 0;
        for (k, frame) in slot.frames.as_slice().iter().take(n).enumerate() {
            let part = frame
                .get(if k == 0 { offset } else { 0 }..)
                .unwrap_or_default();
            self.iovs.push(libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            });
            total += part.len();
        }
        let sqe = if let [one] = self.iovs[start..] {
            opcode::Send::new(types::Fd(fd), one.iov_base as *const u8, one.iov_len as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            // SAFETY: an all-zero msghdr is a valid empty one.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iovs[start..].as_ptr().cast_mut();
            msg.msg_iovlen = n as _;
            self.msgs.push(msg);
            opcode::SendMsg::new(types::Fd(fd), &self.msgs[self.msgs.len() - 1])
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        self.slot_mut(i).len = total;
        // SAFETY: the slot owns every frame the vectors point into (their
        // bytes never move) until `finish_send` after the completion; the
        // vectors and header stay where they are until the next submit
        // (the arenas never grow past their capacity), when the kernel has
        // copied them; the queue has room, so this push does not submit.
        unsafe { self.push(&sqe.user_data(user_data(Op::Send, i as u64))) }?;
        Ok(())
    }

    /// Waits once until the fd of send `slot` takes data again
    /// ([`Op::Writable`]), keeping the slot.
    pub fn wait_writable(&mut self, slot: u64) -> io::Result<()> {
        let Some(fd) = self.slots.get(slot as usize).map(|s| s.fd) else {
            return Ok(());
        };
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(user_data(Op::Writable, slot));
        self.push_plain(&sqe)
    }

    /// The bytes send `slot` carries (from its first frame's offset to
    /// its last frame's end; 0 for an unknown slot).
    pub fn send_len(&self, slot: u64) -> usize {
        self.slots.get(slot as usize).map_or(0, |s| s.len)
    }

    /// Ends send `slot` once its completion came, `written` bytes of it
    /// sent: frees the slot, drops the frames sent whole, and hands each
    /// other frame to `rest`, **last first**, with how much of it was
    /// sent (so the caller can put them back at the front of its queue).
    /// Returns the owner (`None` for an unknown or finished slot).
    pub fn finish_send(
        &mut self,
        slot: u64,
        written: usize,
        mut rest: impl FnMut(Bytes, usize),
    ) -> Option<T> {
        let i = slot as usize;
        let s = self.slots.get_mut(i)?;
        let owner = s.owner.take()?;
        // Frames sent whole, and how much of the next one went.
        let mut left = written;
        let mut whole = 0;
        let mut into = s.offset;
        for frame in s.frames.as_slice() {
            let part = frame.len() - into;
            if left < part {
                into += left;
                break;
            }
            left -= part;
            whole += 1;
            into = 0;
        }
        match std::mem::take(&mut s.frames) {
            Frames::Empty => {}
            Frames::One(frame) if whole == 0 => rest(frame, into),
            Frames::One(_) => {}
            Frames::Many(mut all) => {
                for (k, frame) in all.drain(whole..).enumerate().rev() {
                    rest(frame, if k == 0 { into } else { 0 });
                }
            }
        }
        self.free.push(i as u32);
        Some(owner)
    }

    /// Gives back the memory of the slots once none is in flight, and of
    /// the arenas and backlog when empty (after a burst of sends to every
    /// connection, an idle shard keeps none of it).
    pub fn trim(&mut self) {
        if self.free.len() == self.slots.len() {
            self.slots = Chunks::default();
            self.free = Vec::new();
        }
        if self.unsubmitted == 0 {
            self.iovs = Vec::new();
            self.msgs = Vec::new();
        }
    }

    fn take_slot(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i as usize;
        }
        self.slots.push(Slot {
            owner: None,
            fd: -1,
            offset: 0,
            frames: Frames::Empty,
            len: 0,
        });
        self.slots.len() - 1
    }

    /// Slot `i`, taken by [`DataRing::take_slot`].
    fn slot_mut(&mut self, i: usize) -> &mut Slot<T> {
        self.slots.get_mut(i).expect("a taken slot")
    }

    /// Completions wait in the backlog: the ring's fd does not show them
    /// (they left its completion queue), so whoever waits on it must be
    /// told.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Moves up to [`REAP_BATCH`] completions into `into` (cleared first);
    /// returns how many.
    pub fn reap(&mut self, into: &mut Vec<Completion>) -> usize {
        into.clear();
        // Oldest first: the backlog's blocks (CHUNK entries, a whole
        // number of them per batch), and the queue only once it is empty.
        while into.len() + CHUNK <= REAP_BATCH {
            let Some(block) = self.backlog.take_front() else {
                break;
            };
            into.extend(block);
        }
        if self.has_backlog() {
            return into.len();
        }
        let mut cq = self.ring.completion();
        for cqe in cq.by_ref().take(REAP_BATCH - into.len()) {
            into.push(completion(&cqe));
        }
        into.len()
    }
}

fn completion(cqe: &cqueue::Entry) -> Completion {
    let data = cqe.user_data();
    Completion {
        op: Op::from_bits(data),
        token: data >> 2,
        result: cqe.result(),
        more: cqueue::more(cqe.flags()),
    }
}

/// The running kernel's (major, minor), if `uname` can tell.
fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: `uname` fills the zeroed struct it is given.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    // SAFETY: the kernel NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
    parse_version(release.to_str().ok()?)
}

/// `"6.18.44-fc"` → `(6, 18)`.
fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(parse_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_version("5.13"), Some((5, 13)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(parse_version(""), None);
        assert!(parse_version("5.4").unwrap() < MIN_KERNEL);
    }

    #[test]
    fn user_data_round_trips() {
        for op in [Op::Watch, Op::Send, Op::Writable, Op::Unwatch] {
            for token in [0, 1, 12_345, u64::MAX >> 2] {
                let d = user_data(op, token);
                assert_eq!((Op::from_bits(d), d >> 2), (op, token));
            }
        }
    }

    /// Waits until `n` completions came (the ring's own blocking wait).
    fn reap_n(ring: &mut DataRing<u32>, n: usize) -> Vec<Completion> {
        let mut all = Vec::new();
        let mut some = Vec::new();
        while all.len() < n {
            ring.submit().expect("submit");
            ring.ring.submit_and_wait(1).expect("wait");
            ring.reap(&mut some);
            all.extend_from_slice(&some);
        }
        all
    }

    /// The ring against a real kernel socket pair: a standing watch fires
    /// on input, a vectored send (the first frame from an offset) and a
    /// single one arrive whole and in order and hand their owners back,
    /// and removing the watch ends it.
    #[test]
    fn watch_send_and_unwatch_on_a_socket_pair() {
        let Ok(mut ring) = DataRing::<u32>::new(64) else {
            eprintln!("no io_uring here: nothing to test");
            return;
        };
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        ring.watch(ours.as_raw_fd(), 7).expect("watch");
        ring.submit().expect("submit");
        theirs.write_all(b"hello").expect("write");
        let got = reap_n(&mut ring, 1);
        assert_eq!((got[0].op, got[0].token, got[0].more), (Op::Watch, 7, true));
        assert_ne!(got[0].result as i16 & libc::POLLIN, 0);

        let parts = [
            Bytes::from_static(b"--one "),
            Bytes::from_static(b"two "),
            Bytes::from_static(b"three"),
        ];
        ring.send(ours.as_raw_fd(), 10, 2, parts.into_iter())
            .expect("send");
        assert_eq!(ring.send_len(0), 13);
        let one = [Bytes::from_static(b"!")];
        ring.send(ours.as_raw_fd(), 20, 0, one.into_iter())
            .expect("send");
        let got = reap_n(&mut ring, 2);
        let sends: Vec<_> = got.iter().map(|c| (c.op, c.token, c.result)).collect();
        assert_eq!(sends, [(Op::Send, 0, 13), (Op::Send, 1, 1)]);
        assert_eq!(
            (ring.send_len(0), ring.send_len(1), ring.send_len(9)),
            (13, 1, 0)
        );
        let mut back = Vec::new();
        assert_eq!(ring.finish_send(0, 13, |f, n| back.push((f, n))), Some(10));
        assert_eq!(ring.finish_send(1, 1, |f, n| back.push((f, n))), Some(20));
        assert!(back.is_empty(), "everything went: {back:?}");
        assert_eq!(
            ring.finish_send(1, 0, |_, _| {}),
            None,
            "a slot is finished once"
        );
        let mut buf = [0u8; 14];
        theirs.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"one two three!");

        ring.unwatch(7).expect("unwatch");
        let got = reap_n(&mut ring, 2);
        let mut ops: Vec<_> = got.iter().map(|c| (c.op, c.more)).collect();
        ops.sort_by_key(|(op, _)| op.bits());
        assert_eq!(ops, [(Op::Watch, false), (Op::Unwatch, false)]);
    }

    /// What a short write leaves: frames sent whole are dropped, the cut
    /// one comes back with how much of it went, the rest whole, last first.
    #[test]
    fn a_short_write_hands_back_what_was_not_sent() {
        let Ok(mut ring) = DataRing::<u32>::new(8) else {
            eprintln!("no io_uring here: nothing to test");
            return;
        };
        // A socket nobody reads, with room for all of it: only the
        // bookkeeping is under test (`written` is what a completion says).
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        let frames = || ["aaaa", "bbbb", "cccc"].map(|s| Bytes::from_static(s.as_bytes()));
        for (offset, written, want) in [
            (0, 0, vec![("cccc", 0), ("bbbb", 0), ("aaaa", 0)]),
            (0, 5, vec![("cccc", 0), ("bbbb", 1)]),
            (2, 2, vec![("cccc", 0), ("bbbb", 0)]),
            (2, 3, vec![("cccc", 0), ("bbbb", 1)]),
            (1, 10, vec![("cccc", 3)]),
            (1, 11, vec![]),
        ] {
            ring.send(ours.as_raw_fd(), 5, offset, frames().into_iter())
                .expect("send");
            let done = reap_n(&mut ring, 1);
            let mut back = Vec::new();
            let owner = ring.finish_send(done[0].token, written, |f, n| {
                back.push((std::str::from_utf8(&f).unwrap().to_owned(), n));
            });
            assert_eq!(owner, Some(5));
            let want: Vec<_> = want.into_iter().map(|(s, n)| (s.to_owned(), n)).collect();
            assert_eq!(back, want, "offset {offset}, {written} written");
            // Nothing in flight: the arenas and slots go, and come back.
            ring.trim();
            assert_eq!((ring.iovs.capacity(), ring.slots.len()), (0, 0));
        }
    }

    /// More sends than the submission queue, the header arena, half the
    /// completion queue and two reap batches hold, pushed before any
    /// reap, one per socket (as the shard has at most one in flight per
    /// connection: io_uring does not order two sends on one socket):
    /// every one is taken (submits in between), completes once, in the
    /// order they went (the backlog's oldest first, before the queue's),
    /// and its bytes arrive.
    #[test]
    fn a_round_bigger_than_the_queues_submits_in_between_and_loses_nothing() {
        let Ok(mut ring) = DataRing::<usize>::new(8) else {
            eprintln!("no io_uring here: nothing to test");
            return;
        };
        const SENDS: usize = 2 * REAP_BATCH + ARENA_MSGS + 88;
        let pairs: Vec<(UnixStream, UnixStream)> = (0..SENDS)
            .map(|_| UnixStream::pair().expect("socketpair"))
            .collect();
        for (i, (ours, _)) in pairs.iter().enumerate() {
            let frames = [Bytes::from(format!("{i:04}")), Bytes::from_static(b";")];
            ring.send(ours.as_raw_fd(), i, 0, frames.into_iter())
                .expect("send");
        }
        ring.submit().expect("submit");
        let mut done = vec![false; SENDS];
        let mut some = Vec::new();
        let mut seen = 0;
        while seen < SENDS {
            if ring.reap(&mut some) == 0 {
                ring.ring.submit_and_wait(1).expect("wait");
                continue;
            }
            for c in &some {
                assert_eq!((c.op, c.result), (Op::Send, 5));
                // Slots were taken in order: 0, 1, 2, ...
                assert_eq!(c.token as usize, seen, "out of order");
                let owner = ring.finish_send(c.token, 5, |_, _| panic!("all of it went"));
                let i = owner.expect("a send in flight");
                assert!(
                    !std::mem::replace(&mut done[i], true),
                    "send {i} completed twice"
                );
                seen += 1;
            }
        }
        assert!(
            ring.submits() >= (SENDS / 8) as u64,
            "{} submits",
            ring.submits()
        );
        for (i, (_, mut theirs)) in pairs.into_iter().enumerate() {
            let mut got = [0u8; 5];
            theirs.read_exact(&mut got).expect("read");
            assert_eq!(got, *format!("{i:04};").as_bytes());
        }
        ring.trim();
        assert!(
            ring.slots.is_empty() && ring.free.is_empty(),
            "trim kept the slots"
        );
    }

    /// A send bigger than the socket takes, to a peer that starts reading
    /// late: each completion reports what went, the rest is sent from
    /// that offset, and the peer gets every byte once.
    #[test]
    fn a_send_to_a_full_socket_completes_when_the_peer_reads() {
        let Ok(mut ring) = DataRing::<u32>::new(64) else {
            eprintln!("no io_uring here: nothing to test");
            return;
        };
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("non-blocking");
        const LEN: usize = 4 << 20;
        let big = [Bytes::from((0..LEN).map(|i| i as u8).collect::<Vec<u8>>())];
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut got = Vec::with_capacity(LEN);
            let mut buf = vec![0u8; 1 << 16];
            while got.len() < LEN {
                let n = theirs.read(&mut buf).expect("read");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let mut sent = 0usize;
        let mut rounds = 0;
        while sent < LEN {
            ring.send(ours.as_raw_fd(), 1, sent, big.iter().cloned())
                .expect("send");
            let got = reap_n(&mut ring, 1);
            assert_eq!(got[0].op, Op::Send);
            let mut written = 0;
            if got[0].result == -libc::EAGAIN {
                ring.wait_writable(got[0].token).expect("wait");
                let room = reap_n(&mut ring, 1);
                assert_eq!(room[0].op, Op::Writable);
            } else {
                assert!(got[0].result > 0, "send failed: {}", got[0].result);
                written = got[0].result as usize;
            }
            let mut back = Vec::new();
            let owner = ring.finish_send(got[0].token, written, |f, n| back.push((f.len(), n)));
            assert_eq!(owner, Some(1));
            sent += written;
            if sent < LEN {
                assert_eq!(back, [(LEN, sent)], "the frame comes back with what went");
            }
            rounds += 1;
        }
        assert!(
            rounds > 1,
            "4 MiB went in one send: the socket was never full"
        );
        let got = reader.join().expect("reader");
        assert!(got == big[0], "the peer got other bytes than were sent");
    }
}
