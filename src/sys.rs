//! The few system calls the shards make directly on a socket's fd, outside
//! the runtime's owned-buffer ops: non-blocking `recv` into a shared scratch
//! buffer (so an idle connection owns no read buffer), vectored `sendmsg` of
//! shared frames on the epoll data path (so a frame is never copied per
//! subscriber), `shutdown`, CPU pinning, and the process's allocator
//! (mimalloc, [`Allocator`]). Every socket call passes
//! `MSG_DONTWAIT`, so it never blocks a shard whatever mode the runtime left
//! the fd in. With `crate::ring` (the io_uring data path's entries), this
//! is the crate's only `unsafe`; each block says why it is sound.
#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Hands what this thread's mimalloc heap holds freed back to the system
/// (free pages are otherwise kept a while for reuse, and an idle server's
/// RSS counts them). Forced, so pages whose purge waits for the heap's next
/// use go too: 0.2-0.9 ms once a second during a 1,000 x 1,000 fan-out.
/// Without mimalloc as the global allocator (the library's tests) it
/// touches an unused heap.
pub fn heap_collect() {
    // SAFETY: mi_collect takes no pointer and may be called from any
    // thread at any time; `true` forces the purge of every free page.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// The process's allocator (the binary's `#[global_allocator]`): mimalloc,
/// asked for plain blocks whenever the alignment allows. mimalloc's aligned
/// entry points (what the `mimalloc` crate's allocator calls for every
/// request) put a block above 128 bytes in the next size class even for
/// an alignment of 8: a 192-byte connection record took a 224-byte block,
/// a 160-byte one 192. A plain `mi_malloc` block is aligned to 16 bytes
/// (`MI_MAX_ALIGN_SIZE` on 64-bit targets) once it is at least 16 bytes,
/// the rule `std`'s own allocator uses for `malloc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// The alignment every `mi_malloc` block of at least this size has.
const PLAIN_ALIGN: usize = 16;

/// Whether a plain block of `size` bytes is aligned enough for `align`.
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free`
// takes blocks of either entry point); a plain block is used only where its
// guaranteed alignment covers the layout's (see `plain`), otherwise the
// aligned entry points are called with the layout's alignment.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        if plain(layout.size(), layout.align()) {
            mi_malloc(layout.size()).cast()
        } else {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        if plain(layout.size(), layout.align()) {
            mi_zalloc(layout.size()).cast()
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        if plain(new_size, layout.align()) {
            mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// Most iovecs passed to one `sendmsg` (Linux `IOV_MAX` is 1024).
pub const MAX_IOV: usize = 256;

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Reads what the socket has, without waiting. `Ok(0)` is end of stream;
/// `WouldBlock` means nothing is there yet.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the
    // duration of the call; recv writes at most that many bytes into it.
    let ret = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    check(ret)
}

/// Writes as much of `bufs` as the socket takes, in one `sendmsg` (at most
/// [`MAX_IOV`] slices: Linux refuses more than `IOV_MAX`). Returns bytes
/// written; `WouldBlock` when the socket is full.
pub fn send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    if bufs.is_empty() {
        return Ok(0);
    }
    // SAFETY: a zeroed msghdr is a valid "no address, no control data" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // std guarantees `IoSlice` is ABI-compatible with `iovec` on Unix, so
    // the slices are passed as they are, not copied.
    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: every iovec points into memory borrowed for the whole call
    // (`bufs` and what its slices point to), and the kernel only reads
    // from them. MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
    let ret = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    check(ret)
}

/// Reads from any fd (a pipe, say) into `buf`; in non-blocking mode
/// `WouldBlock` means nothing is there yet. `Ok(0)` is end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: as for `recv`: `buf` is valid and writable for its length.
    let ret = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    check(ret)
}

/// Turns transparent huge pages off for this process and its children
/// (`PR_SET_THP_DISABLE`): the allocator madvises its memory for them, and
/// then RSS grows in 2 MiB steps per heap, which outweighs a small
/// connection's state many times over.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integers only, no pointers.
    let ret = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts any fd (a pipe, say) in non-blocking mode.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes no pointers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes `buf` without waiting; returns how much the socket took.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, readable region of `buf.len()` bytes for the
    // duration of the call; the kernel only reads from it.
    let ret = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    check(ret)
}

/// Microseconds of CLOCK_MONOTONIC: one clock for every process on this
/// machine, so a load generator's processes can stamp and measure latency
/// across each other without clock synchronisation.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to write; the call
    // cannot fail for CLOCK_MONOTONIC on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000) + (ts.tv_nsec as u64) / 1_000
}

/// Raises this process's soft open-file limit to its hard limit (a node
/// and a load generator hold one fd per connection); returns the new soft
/// limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill, then to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Shuts both directions of a socket: pending reads see end of stream and
/// pending writes fail, so the connection's task ends and its state is freed.
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown takes no pointers; on a stale fd it fails harmlessly
    // (the fd is owned by the connection, which calls this before closing it).
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Sends FIN: no more data from us, while the peer may still send.
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: as for `shutdown`.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu is
    // bounded by the set's size first), and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpu index out of range",
            ));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lets a socket bound to an address with port 0 pick its port at
/// `connect` time (IP_BIND_ADDRESS_NO_PORT), so a load generator binding
/// source addresses can reuse ports across destinations as plain connects do.
pub fn bind_address_no_port(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option value is a c_int living for the whole call, and its
    // size is passed alongside.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An epoll instance owned by one shard: the readiness of every connection
/// of the shard, so that an idle connection costs a registration in the
/// kernel and no pending operation, task or buffer in user space. The shard
/// waits on the epoll fd itself through its runtime (it is pollable), then
/// harvests ready connections with [`Epoll::wait`] without blocking.
#[derive(Debug)]
pub struct Epoll {
    fd: std::os::fd::OwnedFd,
}

/// Readiness for reading (and hang-up / error, always reported).
pub const EPOLLIN: u32 = libc::EPOLLIN as u32;
/// Readiness for writing.
pub const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
/// The peer shut its side (the data ring's poll mask has the same bits).
pub const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;
/// Hung up.
pub const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
/// An error is pending on the socket.
pub const EPOLLERR: u32 = libc::EPOLLERR as u32;

/// One readiness event: the token given at registration, and the events.
pub type EpollEvent = libc::epoll_event;

/// An empty event, to size the buffer given to [`Epoll::wait`].
pub fn empty_event() -> EpollEvent {
    libc::epoll_event { events: 0, u64: 0 }
}

impl Epoll {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is
        // a fresh fd that nothing else owns, so OwnedFd may take it.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above.
        Ok(Epoll {
            fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
        })
    }

    /// A second fd for the same epoll instance, for the runtime to poll
    /// (see [`FdWaiter`]).
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.fd.try_clone()
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        let ret =
            unsafe { libc::epoll_ctl(std::os::fd::AsRawFd::as_raw_fd(&self.fd), op, fd, &mut ev) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` for `events` (level-triggered), reported with `token`.
    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    /// Changes the events `fd` is registered for.
    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Forgets `fd` (closing the fd forgets it too).
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Fills `events` with what is ready now, without waiting.
    pub fn wait(&self, events: &mut [EpollEvent]) -> io::Result<usize> {
        self.wait_timeout(events, 0)
    }

    /// Fills `events` with what is ready, waiting up to `timeout_ms` for
    /// the first event (for a thread that owns nothing else to wait on).
    pub fn wait_timeout(&self, events: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        let max = events.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: the kernel writes at most `max` events into `events`,
        // which has at least that many slots.
        let n = unsafe {
            libc::epoll_wait(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                events.as_mut_ptr(),
                max,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}

/// Waits, through the shard's runtime, until an fd is readable: the
/// shard's [`Epoll`] set has ready events, or its data ring
/// ([`crate::ring::DataRing`]) has completions.
///
/// monoio 0.2.4 has no public type for "any pollable fd" (an `AsyncFd` is
/// proposed upstream, not released): every readiness wait it offers
/// belongs to a socket type, and each does the same for any fd, a one-shot
/// `IORING_OP_POLL_ADD` on io_uring, a registration and a zero-timeout
/// `poll(2)` on the epoll driver. This type is the one place that relies on
/// it, wrapping a second fd of the epoll set or ring as a `UnixStream`,
/// which holds nothing but the fd (a `TcpStream` would also set socket
/// options on it). monoio is pinned to that version in Cargo.toml, so an
/// upgrade that changes this is a deliberate step, and tests wait on both
/// drivers. Create and drop it on the shard's thread, inside its runtime.
#[derive(Debug)]
pub struct FdWaiter(monoio::net::UnixStream);

impl FdWaiter {
    /// A waiter for `fd`'s readability (a second fd of an epoll set or a
    /// ring: the waiter closes it when dropped).
    pub fn new(fd: std::os::fd::OwnedFd) -> io::Result<Self> {
        monoio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)).map(Self)
    }

    /// Resolves once the fd is readable. (`readable(false)`: the runtime
    /// checks readiness again and clears it when stale, so the loop never
    /// spins.)
    pub async fn ready(&self) -> io::Result<()> {
        self.0.readable(false).await
    }
}

/// Takes an accepted stream away from the runtime: from here on the shard
/// drives it through its own [`Epoll`].
pub fn into_owned_fd(stream: monoio::net::TcpStream) -> std::os::fd::OwnedFd {
    let fd = std::os::fd::IntoRawFd::into_raw_fd(stream);
    // SAFETY: `into_raw_fd` gave up the runtime's ownership (and, on the
    // epoll driver, its registration), so this is the fd's only owner.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use super::*;

    /// Every layout gets a block aligned as asked, of the size class its
    /// size needs (a 192-byte record in a 192-byte block, not 224), whose
    /// bytes survive a realloc up and down, over the plain and the aligned
    /// entry points.
    #[test]
    fn the_allocator_aligns_every_layout_and_keeps_size_classes() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = Allocator;
        for size in [1, 4, 8, 12, 16, 24, 100, 176, 192, 4096, 1 << 20] {
            for align in [1, 2, 8, 16, 32, 64, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero layouts; each block is written within its
                // size, reallocated with its layout and freed once.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{size}/{align}");
                    std::ptr::write_bytes(p, 0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert_eq!(q as usize % align, 0, "{size}/{align} grown");
                    assert!((0..size).all(|i| *q.add(i) == 0xab), "{size}/{align}");
                    let grown = Layout::from_size_align(size * 3, align).unwrap();
                    let r = a.realloc(q, grown, size);
                    assert_eq!(r as usize % align, 0, "{size}/{align} shrunk");
                    assert!((0..size).all(|i| *r.add(i) == 0xab), "{size}/{align}");
                    a.dealloc(r, layout);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0), "{size}/{align}");
                    a.dealloc(z, layout);
                }
            }
        }
        for (size, class) in [(24, 32), (160, 160), (176, 192), (192, 192), (200, 224)] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: a block of `layout`, measured and freed once.
            let usable = unsafe {
                let p = a.alloc(layout);
                let usable = libmimalloc_sys::mi_usable_size(p.cast());
                a.dealloc(p, layout);
                usable
            };
            assert_eq!(usable, class, "a {size}-byte request");
        }
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; a negative result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn signal(fd: &OwnedFd) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer.
        let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        assert_eq!(n, 8);
    }

    /// Three rounds: the waiter does not wake before the registered fd is
    /// ready, wakes once it is, and `Epoll::wait` then finds the event.
    async fn wakes_only_when_ready() {
        let epoll = Epoll::new().unwrap();
        let event = std::rc::Rc::new(eventfd());
        epoll.add(event.as_raw_fd(), EPOLLIN, 42).unwrap();
        let waiter = FdWaiter::new(epoll.try_clone_fd().unwrap()).unwrap();
        let mut events = vec![empty_event(); 4];
        for round in 0..3 {
            let early = monoio::time::timeout(Duration::from_millis(50), waiter.ready()).await;
            assert!(early.is_err(), "round {round}: woke with nothing ready");
            let writer = event.clone();
            monoio::spawn(async move {
                monoio::time::sleep(Duration::from_millis(20)).await;
                signal(&writer);
            });
            let started = Instant::now();
            monoio::time::timeout(Duration::from_secs(5), waiter.ready())
                .await
                .expect("the waiter never woke")
                .unwrap();
            assert!(
                started.elapsed() >= Duration::from_millis(15),
                "round {round}"
            );
            let n = epoll.wait(&mut events).unwrap();
            assert_eq!((n, events[0].u64), (1, 42), "round {round}");
            // Consume the count so the next round starts quiet.
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live local buffer.
            let read = unsafe { libc::read(event.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
            assert_eq!(read, 8);
        }
    }

    #[test]
    fn the_epoll_waiter_wakes_on_the_io_uring_driver() {
        if !monoio::utils::detect_uring() {
            eprintln!("no io_uring here: the epoll driver test covers this host");
            return;
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(wakes_only_when_ready());
    }

    #[test]
    fn the_epoll_waiter_wakes_on_the_epoll_driver() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(wakes_only_when_ready());
    }
}
