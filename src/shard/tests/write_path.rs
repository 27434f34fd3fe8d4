//! The write path (`OutQueue::write_to`) against `Pipe`, an in-memory
//! socket that fills up: every cut of a frame, the iovec bound, errors.

use std::io::IoSlice;

use bytes::Bytes;

use super::*;
use crate::shard::conn::{Flushed, OutQueue, Sink};
use crate::ws::frame::encode_text;

/// An in-memory socket: takes up to `room` bytes, then answers
/// `WouldBlock` like a full socket; `fail` makes the next write fail.
#[derive(Debug, Default)]
struct Pipe {
    room: usize,
    got: Vec<u8>,
    /// Slices passed to each write.
    slices: Vec<usize>,
    /// Writes answered `WouldBlock`.
    blocked: usize,
    fail: Option<io::ErrorKind>,
}

impl Sink for Pipe {
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.slices.push(bufs.len());
        if let Some(kind) = self.fail.take() {
            return Err(kind.into());
        }
        if self.room == 0 {
            self.blocked += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let start = self.got.len();
        for buf in bufs {
            let take = buf.len().min(self.room - (self.got.len() - start));
            self.got.extend_from_slice(&buf[..take]);
        }
        let n = self.got.len() - start;
        self.room -= n;
        Ok(n)
    }
}

/// A queue holding `frames`, as `Conn::push` leaves it.
fn queue_of(frames: &[Bytes]) -> OutQueue {
    let mut q = OutQueue::default();
    for f in frames {
        q.push(f.clone());
    }
    q
}

#[test]
fn the_write_path_resumes_a_frame_cut_anywhere_by_a_full_socket() {
    // Every header form (2, 4 and 10 bytes) and distinct contents, so a
    // byte resent, skipped or reordered shows in the comparison.
    let frames: Vec<Bytes> = [0usize, 1, 125, 126, 300, 70_000]
        .iter()
        .enumerate()
        .map(|(i, &len)| encode_text(&vec![b'a' + i as u8; len]))
        .collect();
    let all: Vec<u8> = frames.concat();
    // Every cut within the first frames, then a sample across the rest.
    let cuts = (0..700).chain((700..all.len()).step_by(997));
    for cut in cuts {
        let metrics = ShardMetrics::default();
        let mut out = queue_of(&frames);
        let mut pipe = Pipe {
            room: cut,
            ..Pipe::default()
        };
        let mut flushed = out.write_to(&mut pipe, &metrics);
        assert_eq!(flushed, Flushed::Blocked, "cut at {cut}");
        // Then the socket takes a little at a time, as a slow reader does.
        for _ in 0..100 {
            assert_eq!(
                out.bytes as usize,
                all.len() - pipe.got.len(),
                "cut at {cut}"
            );
            if flushed == Flushed::Done {
                break;
            }
            pipe.room = 4093;
            flushed = out.write_to(&mut pipe, &metrics);
        }
        assert_eq!(flushed, Flushed::Done, "cut at {cut}");
        assert!(pipe.got == all, "cut at {cut}: the stream differs");
        assert_eq!((out.frames.len(), out.offset), (0, 0));
        assert_eq!(metrics.bytes_sent.load(Relaxed), all.len() as u64);
        // Counted per write the socket took, not per attempt.
        let taken = pipe.slices.len() - pipe.blocked;
        assert_eq!(metrics.socket_writes.load(Relaxed), taken as u64);
    }
}

#[test]
fn the_write_path_writes_at_most_max_iov_frames_per_call_and_all_of_them() {
    let frames: Vec<Bytes> = (0..600u16).map(|i| encode_text(&i.to_be_bytes())).collect();
    let metrics = ShardMetrics::default();
    let mut out = queue_of(&frames);
    let mut pipe = Pipe {
        room: usize::MAX,
        ..Pipe::default()
    };
    assert_eq!(out.write_to(&mut pipe, &metrics), Flushed::Done);
    let max = crate::sys::MAX_IOV;
    assert_eq!(pipe.slices, [max, max, 600 - 2 * max]);
    assert_eq!(metrics.socket_writes.load(Relaxed), 3);
    assert!(pipe.got == frames.concat());
}

#[test]
fn the_write_path_retries_an_interrupted_write_and_stops_at_an_error() {
    let frames = [encode_text(b"one"), encode_text(b"two")];
    let metrics = ShardMetrics::default();
    let mut out = queue_of(&frames);
    let mut pipe = Pipe {
        room: usize::MAX,
        fail: Some(io::ErrorKind::Interrupted),
        ..Pipe::default()
    };
    assert_eq!(out.write_to(&mut pipe, &metrics), Flushed::Done);
    assert!(pipe.got == frames.concat());

    let mut out = queue_of(&frames);
    pipe.fail = Some(io::ErrorKind::BrokenPipe);
    assert_eq!(out.write_to(&mut pipe, &metrics), Flushed::Failed);
    assert_eq!(out.frames.len(), 2, "nothing written is nothing consumed");
}

/// Work a bounded flush leaves that the data ring's fd does not show (here
/// a pong queued by the last round's input, one round allowed) is not left
/// for the next event, up to a second away: the flush tells the poll loop
/// (`Shard::io_more`), which goes on with it, whether the flush came
/// before the loop ran or while it waited.
#[test]
fn the_poll_loop_goes_on_with_what_a_bounded_flush_left() {
    on_both_drivers(|| async {
        let h = Harness::new(config());
        let mut c = h.open(A);
        h.subscribe(&mut c, "t").await;
        let ping = encode_masked(OpCode::Ping, true, b"there?", MASK);
        c.write(&ping);
        // On epoll, input is read by the poll loop itself, not a flush.
        h.shard.flush_rounds(1);
        if matches!(h.shard.io, super::super::io::Io::Ring(_)) {
            assert!(h.shard.io_left(), "the pong waits in the dirty list");
            assert!(h.shard.io_more.get(), "and the poll loop was told");
        }
        let waiter = h
            .shard
            .io
            .try_clone_fd()
            .and_then(crate::sys::FdWaiter::new)
            .expect("a waiter");
        monoio::spawn(super::super::runtime::poll_loop(h.shard.clone(), waiter));
        assert_eq!(read_within(&mut c, Duration::from_secs(3)).await, ["pong"]);
        // The loop waits now, and nothing will come on the ring: the
        // inbox's flush ran out of rounds before this connection.
        monoio::time::sleep(Duration::from_millis(20)).await;
        h.shard.handle(deliver("t", 1));
        h.shard.flush_rounds(0);
        assert_eq!(read_within(&mut c, Duration::from_secs(3)).await, ["msg 1"]);
    });
}

/// What the client got within `limit`, letting the shard's tasks run.
async fn read_within(c: &mut Client, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let got = c.read();
        if !got.is_empty() || Instant::now() >= deadline {
            return got;
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}
