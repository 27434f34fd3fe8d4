//! What a readable socket brings: reads into the shard's scratch buffer
//! until one comes back short, each followed by the upgrade request or
//! WebSocket frames, decoded and answered; and the end of a connection.
//! Nothing here panics on input.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use tracing::debug;

use super::conn::{AfterFlush, Carry, Conn, OutQueue, Phase};
use super::Shard;
use crate::metrics::{Disconnect, Undelivered};
use crate::protocol::{close, code, encode_error, Close};
use crate::sys;
use crate::ws::frame::{encode_close, encode_frame, Message, OpCode};

/// What one read did.
enum Read {
    /// The connection is over.
    Over,
    /// Nothing to read (`EAGAIN`).
    Empty,
    /// The read came back short: what had arrived is read.
    Short,
    /// The read filled the scratch buffer: more may be waiting.
    More,
}

/// The socket is readable (or hung up: `hangup`, the poll's
/// `POLLRDHUP`/`POLLHUP`/`POLLERR`): read and act on what came until a read
/// comes back short, so nothing is left behind for a readiness request
/// that fires on new input only (the data ring's); after a hang-up, until
/// the end of stream, which a short read may have stopped just before.
/// Returns false when the connection is over and must be [`finish`]ed.
pub(crate) fn on_readable(shard: &Rc<Shard>, conn: &Rc<Conn>, hangup: bool) -> bool {
    loop {
        match read_once(shard, conn) {
            Read::Over => return false,
            Read::Empty => return true,
            Read::Short if !hangup => return true,
            _ if conn.phase() == Phase::Closed => return true,
            Read::Short | Read::More => {}
        }
    }
}

fn read_once(shard: &Rc<Shard>, conn: &Rc<Conn>) -> Read {
    let (mut carry, filled) = {
        let mut scratch = shard.scratch.borrow_mut();
        match sys::recv(conn.fd(), &mut scratch) {
            Ok(0) => return Read::Over,
            Ok(n) => {
                let mut carry = conn.take_carry(shard.config.max_message_size);
                carry.buf.extend_from_slice(&scratch[..n]);
                (carry, n == scratch.len())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Read::More,
            Err(_) => return Read::Over,
        }
    };
    conn.heard(shard.now_ms());
    if conn.phase() == Phase::Handshake {
        super::upgrade::handshake(shard, conn, &mut carry.buf);
    }
    if conn.was_open() {
        if matches!(conn.phase(), Phase::Open | Phase::Closing) {
            if conn.deflate.get() != 0 {
                // Agreed at the upgrade (maybe in this very read, with
                // frames behind the request): a decoder made before then,
                // or a new one, must take compressed messages.
                carry.decoder.allow_compressed();
            }
            process_input(shard, conn, &mut carry);
        }
    } else if conn.phase() != Phase::Handshake {
        // Refused: the HTTP answer is queued and the socket is shut once it
        // is written. What the client sends meanwhile is not WebSocket.
        carry.buf.clear();
    }
    // Only an incomplete frame or message is kept; an idle connection
    // holds no buffer.
    conn.keep_carry(carry);
    if filled {
        Read::More
    } else {
        Read::Short
    }
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
        shard.release(conn.peer.get());
    }
    let mut out = conn.out.borrow_mut();
    shard
        .metrics
        .dropped_n(Undelivered::ConnectionClosed, out.frames.len() as u64);
    *out = OutQueue::default();
    debug!(conn = conn.id.0, "connection closed");
}

/// Decodes and handles every complete message in the carried buffer.
fn process_input(shard: &Rc<Shard>, conn: &Rc<Conn>, carry: &mut Carry) {
    loop {
        if conn.phase() == Phase::Closed {
            return;
        }
        match carry.decoder.decode(&mut carry.buf) {
            Ok(None) => return,
            Ok(Some(msg)) => on_message(shard, conn, msg),
            Err(e) => {
                debug!(error = %e, "protocol error");
                carry.buf.clear();
                fail(shard, conn, Close::Protocol(e.close_code(), e.to_string()));
                return;
            }
        }
    }
}

pub(super) fn on_message(shard: &Rc<Shard>, conn: &Rc<Conn>, msg: Message) {
    let closing = conn.phase() != Phase::Open;
    // A compressed message is inflated first (bounded by
    // --max-message-size), so the limits charge what it really is.
    let msg = match msg {
        Message::Deflated(_, _) if closing => return,
        Message::Deflated(opcode, data) => match inflate(shard, opcode, &data) {
            Ok(msg) => msg,
            Err(why) => return fail(shard, conn, why),
        },
        msg => msg,
    };
    // Every data message, ping and pong is charged before any work is done
    // for it: unparsable text, unknown ops and binary frames are answered,
    // and pings are owed a pong, so none may bypass the limits.
    if !closing {
        let len = match &msg {
            Message::Text(b)
            | Message::Binary(b)
            | Message::Ping(b)
            | Message::Pong(b)
            | Message::Deflated(_, b) => b.len(),
            Message::Close(_) => 0,
        };
        if !matches!(msg, Message::Close(_)) {
            if let Err(over) = super::rate::charge(shard, conn, len) {
                return super::rate::over_rate(shard, conn, &msg, over);
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
        // Inflated above.
        Message::Deflated(..) => {}
        Message::Binary(_) => {
            let reason = "binary frames are not supported: ringcast.v1 is JSON text";
            shard.queue(conn, encode_error(None, code::BAD_REQUEST, reason));
        }
        Message::Text(t) => match std::str::from_utf8(&t) {
            Ok(text) => super::ops::on_op(shard, conn, text),
            Err(_) => fail(shard, conn, Close::InvalidUtf8),
        },
    }
}

/// Inflates a permessage-deflate message with the shard's inflater:
/// over `--max-message-size` once inflated is close 1009, corrupt data or
/// text that is not UTF-8 close 1007.
fn inflate(shard: &Shard, opcode: OpCode, data: &[u8]) -> Result<Message, Close> {
    use crate::ws::deflate::InflateError;
    let max = shard.config.max_message_size;
    let mut out = Vec::new();
    match shard.inflater.borrow_mut().inflate(data, max, &mut out) {
        Ok(()) => {}
        Err(InflateError::TooBig { max }) => {
            let why = format!("message over max_message_size {max} bytes once inflated");
            return Err(Close::Protocol(close::TOO_BIG, why));
        }
        Err(e) => return Err(Close::Protocol(close::INVALID_DATA, e.to_string())),
    }
    match opcode {
        OpCode::Text if std::str::from_utf8(&out).is_err() => Err(Close::InvalidUtf8),
        OpCode::Text => Ok(Message::Text(Bytes::from(out))),
        _ => Ok(Message::Binary(Bytes::from(out))),
    }
}

/// Fails the connection (RFC 6455 section 7.1.7): the close frame, then our
/// FIN right behind it. Reading goes on (and is discarded) until the peer
/// closes or the close timeout, so its unread data never turns into a reset
/// that could destroy the close frame before the peer reads it.
pub(super) fn fail(shard: &Rc<Shard>, conn: &Rc<Conn>, why: Close) {
    shard.close(conn, why);
    // Already shutting both ways (the close handshake completed): keep that.
    conn.after_flush
        .set(conn.after_flush.get().then(AfterFlush::Fin));
}

pub(super) fn on_close(shard: &Rc<Shard>, conn: &Rc<Conn>, close: Option<(u16, String)>) {
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
