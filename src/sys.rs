//! The few system calls the shards make directly on a socket's fd, outside
//! the runtime's owned-buffer ops: non-blocking `recv` into a shared scratch
//! buffer (so an idle connection owns no read buffer), vectored `sendmsg` of
//! shared frames (so a frame is never copied per subscriber), `shutdown`, and
//! CPU pinning. Every call passes `MSG_DONTWAIT`, so it never blocks a shard
//! whatever mode the runtime left the fd in. This is the crate's only
//! `unsafe`; each block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;

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

/// Writes as many of `frames` as the socket takes, in one system call, the
/// first one starting at byte `offset`. Returns bytes written.
pub fn send_frames<'a>(
    fd: RawFd,
    frames: impl Iterator<Item = &'a Bytes>,
    offset: usize,
) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOV];
    let mut n = 0;
    for (i, f) in frames.take(MAX_IOV).enumerate() {
        let part = if i == 0 {
            f.get(offset..).unwrap_or_default()
        } else {
            &f[..]
        };
        iov[n] = libc::iovec {
            iov_base: part.as_ptr() as *mut libc::c_void,
            iov_len: part.len(),
        };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: a zeroed msghdr is a valid "no address, no control data" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    // SAFETY: every iovec points into a `Bytes` borrowed for the whole call
    // (the iterator's items outlive this function's body), and the kernel
    // only reads from them. MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
    let ret = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    check(ret)
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
