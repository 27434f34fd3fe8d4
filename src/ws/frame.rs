//! The RFC 6455 frame codec (§5), with no IO.
//!
//! Owns: turning inbound bytes into whole [`Message`]s (unmasking, fragment
//! assembly, UTF-8 and close-frame validation, size limits) and encoding
//! outbound frames. Every RFC violation is a [`ProtocolError`] that names its
//! close code; the caller closes the connection with it.
//!
//! Invariants: no panic on any input; a payload is never buffered before its
//! header has passed every check, so a 2^63-byte length costs nothing; a
//! [`Message::Text`] is always valid UTF-8. Server frames are unmasked with
//! FIN set; extensions are not negotiated yet, so any RSV bit is an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest close reason: a control payload minus the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

const FIN: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const RSV1: u8 = 0x40;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN_BITS: u8 = 0x7F;

/// A frame's opcode (RFC 6455 §5.2); the reserved values are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: a later fragment of a Text or Binary message.
    Continuation,
    /// 0x1: UTF-8 text.
    Text,
    /// 0x2: binary data.
    Binary,
    /// 0x8: close handshake.
    Close,
    /// 0x9: ping, answered with a pong carrying the same payload.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// The 4-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong: at most 125 B and never fragmented (§5.5).
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// One complete inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; the bytes are guaranteed valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping; the caller owes a pong with the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close, with its code (valid on the wire) and UTF-8 reason when the
    /// peer sent one.
    Close(Option<(u16, String)>),
    /// A permessage-deflate message (RSV1 on its first frame, RFC 7692
    /// §6): the compressed payload, assembled, still to be inflated and
    /// (text) checked for UTF-8 by the caller. Only from a decoder that
    /// [`Decoder::allow_compressed`].
    Deflated(OpCode, Bytes),
}

/// A violation of RFC 6455 by the peer. The connection must be closed with
/// [`ProtocolError::close_code`]; the [`Decoder`] is unusable afterwards.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// §5.1: every client-to-server frame is masked.
    #[error("client frame is not masked")]
    Unmasked,
    /// §5.1: a client must fail on a masked server frame.
    #[error("server frame is masked")]
    UnexpectedMask,
    /// §5.2: RSV1–3 need a negotiated extension; none is.
    #[error("reserved bits {bits:#05b} set with no extension negotiated")]
    ReservedBits {
        /// RSV1–3 as a 3-bit number (RSV1 is the high bit).
        bits: u8,
    },
    /// §5.2: opcodes 0x3–0x7 and 0xB–0xF are reserved.
    #[error("unknown opcode {opcode:#x}")]
    UnknownOpcode {
        /// The 4-bit opcode sent.
        opcode: u8,
    },
    /// §5.5: a control frame carries at most 125 B.
    #[error("{opcode:?} frame payload {len} B exceeds 125 B")]
    ControlTooLarge {
        /// The control frame's opcode.
        opcode: OpCode,
        /// Its declared payload length.
        len: u64,
    },
    /// §5.5: control frames are never fragmented.
    #[error("fragmented {opcode:?} control frame (FIN not set)")]
    FragmentedControl {
        /// The control frame's opcode.
        opcode: OpCode,
    },
    /// §5.4: a continuation frame needs a message in progress.
    #[error("continuation frame with no message in progress")]
    UnexpectedContinuation,
    /// §5.4: fragments of one message are not interleaved with another.
    #[error("{opcode:?} frame while a fragmented message is in progress")]
    ExpectedContinuation {
        /// The new data frame's opcode.
        opcode: OpCode,
    },
    /// §5.2: the most significant bit of a 64-bit length must be 0.
    #[error("64-bit payload length {len:#x} has its most significant bit set")]
    LengthMsbSet {
        /// The length as sent.
        len: u64,
    },
    /// The message (all fragments so far plus this frame) is over the limit.
    #[error("message of at least {len} B exceeds limit {max} B")]
    MessageTooLarge {
        /// Bytes the message would hold with this frame.
        len: u64,
        /// The decoder's `max_message_size`.
        max: usize,
    },
    /// §8.1: a text message is not valid UTF-8.
    #[error("text message is not valid UTF-8 after byte {valid_up_to}")]
    InvalidUtf8 {
        /// Length of the valid prefix of the message.
        valid_up_to: usize,
    },
    /// §5.5.1: a close payload is empty or starts with a 2-byte code.
    #[error("close frame payload of 1 byte (needs 0 or at least 2)")]
    CloseTooShort,
    /// §7.4: the code is reserved or unassigned, not for the wire.
    #[error("close code {code} is not allowed on the wire")]
    InvalidCloseCode {
        /// The code sent.
        code: u16,
    },
    /// §5.5.1: the close reason is UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code to send: 1007 for bad UTF-8, 1009 for an oversized
    /// message, 1002 for every other violation.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::InvalidUtf8 { .. } | Self::InvalidCloseReason => 1007,
            Self::MessageTooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

/// Incremental decoder for one connection's inbound stream: feed it the read
/// buffer, get whole messages back. Holds the fragments of a message in
/// progress.
#[derive(Debug)]
pub struct Decoder {
    /// 32 bits: every connection holds a decoder (at most 4 GiB, clamped).
    max_message_size: u32,
    /// Server side: inbound frames must be masked; client side: must not be.
    expect_masked: bool,
    /// permessage-deflate was negotiated: RSV1 may mark a data message as
    /// compressed (and nothing else).
    compressed_ok: bool,
    /// Boxed: fragmented messages are rare, and an idle connection's
    /// decoder should stay a few words.
    partial: Option<Box<Partial>>,
}

/// A fragmented data message being assembled.
#[derive(Debug)]
struct Partial {
    opcode: OpCode,
    /// RSV1 was set on the first frame: the data is compressed, so UTF-8
    /// is checked after inflating, not here.
    compressed: bool,
    data: BytesMut,
    /// Text only: `data[..valid_up_to]` is known-good UTF-8.
    valid_up_to: usize,
}

/// A frame header that passed the stateless checks.
#[derive(Debug)]
struct Header {
    fin: bool,
    /// RSV1 (only where the decoder allows it).
    rsv1: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

impl Decoder {
    /// A server-side decoder: client frames must be masked. Messages larger
    /// than `max_message_size` bytes (after assembly) are refused with 1009
    /// as soon as a frame header announces them.
    pub fn new(max_message_size: usize) -> Self {
        Self {
            max_message_size: u32::try_from(max_message_size).unwrap_or(u32::MAX),
            expect_masked: true,
            compressed_ok: false,
            partial: None,
        }
    }

    /// A client-side decoder (our Rust client, tests): server frames must be
    /// unmasked. Same limit as [`Decoder::new`].
    pub fn new_client(max_message_size: usize) -> Self {
        Self {
            expect_masked: false,
            ..Self::new(max_message_size)
        }
    }

    /// permessage-deflate was negotiated: from now on RSV1 on the first
    /// frame of a data message marks it compressed ([`Message::Deflated`]);
    /// on a continuation or control frame it is still an error (1002).
    pub fn allow_compressed(&mut self) {
        self.compressed_ok = true;
    }

    /// Decodes at most one complete message from the front of `buf`,
    /// consuming the bytes of every frame it used. Control frames are
    /// returned as soon as they are complete, even between the fragments of
    /// a message. `Ok(None)`: need more bytes (a partial frame stays in
    /// `buf`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let Some(header) = parse_header(buf, self.expect_masked, self.compressed_ok)? else {
                return Ok(None);
            };
            let len = self.check(&header)?;
            if buf.len() < header.header_len.saturating_add(len) {
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(len);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            if let Some(message) = self.on_frame(&header, payload)? {
                return Ok(Some(message));
            }
            // A non-final fragment was taken in; the next frame may be here.
        }
    }

    /// True while a fragmented message is partially assembled.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Bytes held for the message in progress (0 when none), for memory
    /// accounting.
    pub fn buffered_len(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.data.len())
    }

    /// The checks that need decoder state; returns the payload length.
    fn check(&self, header: &Header) -> Result<usize, ProtocolError> {
        let opcode = header.opcode;
        if opcode.is_control() {
            if header.len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlTooLarge {
                    opcode,
                    len: header.len,
                });
            }
        } else {
            let so_far = match (opcode, &self.partial) {
                (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
                (OpCode::Continuation, Some(p)) => p.data.len(),
                (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation { opcode }),
                (_, None) => 0,
            };
            let total = (so_far as u64).saturating_add(header.len);
            if total > u64::from(self.max_message_size) {
                return Err(ProtocolError::MessageTooLarge {
                    len: total,
                    max: self.max_message_size as usize,
                });
            }
        }
        Ok(usize::try_from(header.len).expect("len is at most 125 or max_message_size"))
    }

    /// Turns one complete, unmasked frame into a message, or stores it as a
    /// fragment.
    fn on_frame(
        &mut self,
        header: &Header,
        payload: BytesMut,
    ) -> Result<Option<Message>, ProtocolError> {
        let message = match header.opcode {
            OpCode::Ping => Message::Ping(payload.freeze()),
            OpCode::Pong => Message::Pong(payload.freeze()),
            OpCode::Close => Message::Close(parse_close(&payload)?),
            OpCode::Text | OpCode::Binary if header.fin && header.rsv1 => {
                Message::Deflated(header.opcode, payload.freeze())
            }
            OpCode::Binary if header.fin => Message::Binary(payload.freeze()),
            OpCode::Text if header.fin => {
                std::str::from_utf8(&payload).map_err(|e| ProtocolError::InvalidUtf8 {
                    valid_up_to: e.valid_up_to(),
                })?;
                Message::Text(payload.freeze())
            }
            OpCode::Text | OpCode::Binary => {
                self.partial = Some(Box::new(Partial::start(
                    header.opcode,
                    header.rsv1,
                    &payload,
                )?));
                return Ok(None);
            }
            OpCode::Continuation => {
                let mut partial = self
                    .partial
                    .take()
                    .ok_or(ProtocolError::UnexpectedContinuation)?;
                partial.push(&payload)?;
                if !header.fin {
                    self.partial = Some(partial);
                    return Ok(None);
                }
                partial.finish()?
            }
        };
        Ok(Some(message))
    }
}

impl Partial {
    fn start(opcode: OpCode, compressed: bool, first: &[u8]) -> Result<Self, ProtocolError> {
        // A copy, so the read buffer's allocation is not pinned by a
        // long-lived fragment.
        let mut partial = Self {
            opcode,
            compressed,
            data: BytesMut::with_capacity(first.len()),
            valid_up_to: 0,
        };
        partial.push(first)?;
        Ok(partial)
    }

    fn push(&mut self, fragment: &[u8]) -> Result<(), ProtocolError> {
        self.data.extend_from_slice(fragment);
        if self.opcode == OpCode::Text && !self.compressed {
            self.check_utf8(false)?;
        }
        Ok(())
    }

    /// Validates the bytes after `valid_up_to`. A sequence cut by the end of
    /// a fragment is fine until the final one; anything else fails at once
    /// (Autobahn 6.x "fail fast").
    fn check_utf8(&mut self, last: bool) -> Result<(), ProtocolError> {
        let tail = self.data.get(self.valid_up_to..).unwrap_or_default();
        match std::str::from_utf8(tail) {
            Ok(_) => self.valid_up_to = self.data.len(),
            Err(e) if e.error_len().is_none() && !last => self.valid_up_to += e.valid_up_to(),
            Err(e) => {
                return Err(ProtocolError::InvalidUtf8 {
                    valid_up_to: self.valid_up_to + e.valid_up_to(),
                })
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Message, ProtocolError> {
        if self.compressed {
            return Ok(Message::Deflated(self.opcode, self.data.freeze()));
        }
        if self.opcode == OpCode::Text {
            self.check_utf8(true)?;
            return Ok(Message::Text(self.data.freeze()));
        }
        Ok(Message::Binary(self.data.freeze()))
    }
}

/// Parses and checks the stateless parts of a frame header (RSV, opcode,
/// mask, control FIN, 64-bit MSB). `Ok(None)`: the header is incomplete.
fn parse_header(
    buf: &[u8],
    expect_masked: bool,
    compressed_ok: bool,
) -> Result<Option<Header>, ProtocolError> {
    let &[b0, b1, ref rest @ ..] = buf else {
        return Ok(None);
    };
    let opcode = check_first_bytes(b0, b1, expect_masked, compressed_ok)?;
    let (len, len_bytes) = match b1 & LEN_BITS {
        126 => match array_at::<2>(rest, 0) {
            Some(bytes) => (u64::from(u16::from_be_bytes(bytes)), 2),
            None => return Ok(None),
        },
        127 => match array_at::<8>(rest, 0) {
            Some(bytes) => (u64::from_be_bytes(bytes), 8),
            None => return Ok(None),
        },
        short => (u64::from(short), 0),
    };
    if len >> 63 != 0 {
        return Err(ProtocolError::LengthMsbSet { len });
    }
    let (mask, mask_bytes) = if expect_masked {
        match array_at::<4>(rest, len_bytes) {
            Some(mask) => (Some(mask), 4),
            None => return Ok(None),
        }
    } else {
        (None, 0)
    };
    Ok(Some(Header {
        fin: b0 & FIN != 0,
        rsv1: b0 & RSV1 != 0,
        opcode,
        mask,
        len,
        header_len: 2 + len_bytes + mask_bytes,
    }))
}

/// The checks that need only the first two bytes.
fn check_first_bytes(
    b0: u8,
    b1: u8,
    expect_masked: bool,
    compressed_ok: bool,
) -> Result<OpCode, ProtocolError> {
    let bits = b0 & OPCODE_BITS;
    // RFC 7692 §6: RSV1 only on the first frame of a data message, and
    // only once the extension is negotiated; RSV2/RSV3 never.
    let rsv1_ok = compressed_ok && matches!(bits, 0x1 | 0x2);
    let forbidden = if rsv1_ok { RSV_BITS & !RSV1 } else { RSV_BITS };
    if b0 & forbidden != 0 {
        return Err(ProtocolError::ReservedBits {
            bits: (b0 & RSV_BITS) >> 4,
        });
    }
    let opcode = OpCode::from_bits(bits).ok_or(ProtocolError::UnknownOpcode { opcode: bits })?;
    match (b1 & MASK_BIT != 0, expect_masked) {
        (false, true) => return Err(ProtocolError::Unmasked),
        (true, false) => return Err(ProtocolError::UnexpectedMask),
        _ => {}
    }
    if opcode.is_control() && b0 & FIN == 0 {
        return Err(ProtocolError::FragmentedControl { opcode });
    }
    Ok(opcode)
}

/// `N` bytes of `buf` starting at `at`, if present.
fn array_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Parses a close payload (§5.5.1): empty, or a valid code plus UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, ProtocolError> {
    let (code, reason) = match payload {
        [] => return Ok(None),
        [_] => return Err(ProtocolError::CloseTooShort),
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
    };
    if !close_code_allowed(code) {
        return Err(ProtocolError::InvalidCloseCode { code });
    }
    let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidCloseReason)?;
    Ok(Some((code, reason.to_owned())))
}

/// Codes a peer may send (RFC 6455 §7.4): the assigned 1000–1003 and
/// 1007–1014, and the registered/private 3000–4999. 1004–1006 and 1015 are
/// reserved or local-only; the rest is unassigned.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `buf` with the 4-byte masking key (§5.3), 8 bytes at a time.
/// Masking and unmasking are the same operation.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    let wide = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let (chunks, rest) = buf.as_chunks_mut::<8>();
    for chunk in chunks {
        *chunk = (u64::from_ne_bytes(*chunk) ^ wide).to_ne_bytes();
    }
    // The tail starts at a multiple of 8, so the key phase restarts at 0.
    for (byte, m) in rest.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
}

/// Header length of a server (unmasked) frame with `payload_len` bytes: 2,
/// 4 or 10. Lets callers size one buffer for header and payload.
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Writes the first byte, the length in its shortest form and the key.
fn put_header(out: &mut BytesMut, b0: u8, mask: Option<[u8; 4]>, len: usize) -> usize {
    let start = out.len();
    let mask_bit = if mask.is_some() { MASK_BIT } else { 0 };
    out.put_u8(b0);
    match len {
        // Each arm's range makes its cast lossless.
        0..=125 => out.put_u8(mask_bit | len as u8),
        126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(len as u64);
        }
    }
    if let Some(key) = mask {
        out.put_slice(&key);
    }
    out.len() - start
}

/// Writes the header of a FIN, unmasked frame of `len` payload bytes into
/// `out`, for callers that build header and payload in one buffer; returns
/// the header length. `rsv1` sets RSV1 (permessage-deflate, RFC 7692).
pub fn write_header(out: &mut BytesMut, opcode: OpCode, rsv1: bool, len: usize) -> usize {
    let rsv = if rsv1 { RSV1 } else { 0 };
    put_header(out, FIN | rsv | opcode.bits(), None, len)
}

/// A complete server frame (FIN, unmasked): header and payload in one
/// allocation, ready to be shared by refcount.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, false, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A data frame of a permessage-deflate message (RSV1 set, RFC 7692 §6):
/// `payload` is already compressed, its sync-flush tail removed.
pub fn encode_compressed(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, true, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// The payload of a complete, unmasked (server) frame made by this module,
/// or `None` when `frame` is not one.
pub fn server_payload(frame: &[u8]) -> Option<&[u8]> {
    let (&b1, rest) = frame.get(1..)?.split_first()?;
    if b1 & MASK_BIT != 0 {
        return None;
    }
    let (len, at) = match b1 & LEN_BITS {
        126 => (usize::from(u16::from_be_bytes(array_at::<2>(rest, 0)?)), 2),
        127 => (
            usize::try_from(u64::from_be_bytes(array_at::<8>(rest, 0)?)).ok()?,
            8,
        ),
        short => (usize::from(short), 0),
    };
    rest.get(at..)?.get(..len)
}

/// A text frame; `payload` must be UTF-8 (the caller's JSON).
pub fn encode_text(payload: &[u8]) -> Bytes {
    encode_frame(OpCode::Text, payload)
}

/// A close frame with `code` and `reason`, the reason cut at a char boundary
/// to [`MAX_CLOSE_REASON`] bytes. The caller picks a code valid on the wire.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let end = reason.floor_char_boundary(MAX_CLOSE_REASON);
    let reason = reason.get(..end).unwrap_or_default().as_bytes();
    let len = 2 + reason.len();
    let mut out = BytesMut::with_capacity(header_len(len) + len);
    write_header(&mut out, OpCode::Close, false, len);
    out.put_u16(code);
    out.put_slice(reason);
    out.freeze()
}

/// A client frame masked with `mask` (our Rust client and tests); `fin`
/// false makes a non-final fragment.
pub fn encode_masked(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Bytes {
    let b0 = if fin { FIN } else { 0 } | opcode.bits();
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + 4 + payload.len());
    let start = put_header(&mut out, b0, Some(mask), payload.len());
    out.put_slice(payload);
    if let Some(body) = out.get_mut(start..) {
        unmask(body, mask);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;
    const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        encode_masked(opcode, fin, payload, KEY).to_vec()
    }

    /// Decodes every message in `bytes`, which must all be consumed.
    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(message) = decoder.decode(&mut buf)? {
            out.push(message);
        }
        assert!(buf.is_empty(), "{} bytes left", buf.len());
        Ok(out)
    }

    fn decode_one(bytes: &[u8]) -> Result<Message, ProtocolError> {
        let mut all = decode_all(&mut Decoder::new(MAX), bytes)?;
        assert_eq!(all.len(), 1);
        Ok(all.remove(0))
    }

    /// `masked` with RSV1 set on the first byte.
    fn with_rsv1(mut frame: Vec<u8>) -> Vec<u8> {
        frame[0] |= RSV1;
        frame
    }

    #[test]
    fn server_payload_reads_back_every_length_form() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frame = encode_frame(OpCode::Text, &payload);
            assert_eq!(server_payload(&frame), Some(&payload[..]), "{len}");
            let z = encode_compressed(OpCode::Text, &payload);
            assert_eq!(z[0], FIN | RSV1 | 0x1);
            assert_eq!(server_payload(&z), Some(&payload[..]), "{len}");
            if len > 0 {
                assert_eq!(server_payload(&frame[..frame.len() - 1]), None, "truncated");
            }
        }
        assert_eq!(
            server_payload(&masked(OpCode::Text, true, b"x")),
            None,
            "masked"
        );
    }

    #[test]
    fn rsv1_marks_a_compressed_data_message_only_once_negotiated() {
        let mut d = Decoder::new(MAX);
        d.allow_compressed();
        // Not UTF-8: compressed bytes are checked only after inflating.
        let z = [0xf2, 0x48, 0xcd, 0xc9];
        let one = decode_all(&mut d, &with_rsv1(masked(OpCode::Text, true, &z))).unwrap();
        assert_eq!(
            one,
            vec![Message::Deflated(OpCode::Text, Bytes::copy_from_slice(&z))]
        );
        // Fragmented: RSV1 on the first frame only; the parts are joined.
        let mut frames = with_rsv1(masked(OpCode::Binary, false, &z[..2]));
        frames.extend(masked(OpCode::Continuation, true, &z[2..]));
        let joined = decode_all(&mut d, &frames).unwrap();
        assert_eq!(
            joined,
            vec![Message::Deflated(
                OpCode::Binary,
                Bytes::copy_from_slice(&z)
            )]
        );
        // RSV1 on a continuation or a control frame, or RSV2/RSV3: 1002.
        let mut bad = masked(OpCode::Text, false, b"a");
        bad.extend(with_rsv1(masked(OpCode::Continuation, true, b"b")));
        for frames in [bad, with_rsv1(masked(OpCode::Ping, true, b"")), {
            let mut f = masked(OpCode::Text, true, b"x");
            f[0] |= 0x20;
            f
        }] {
            let mut d = Decoder::new(MAX);
            d.allow_compressed();
            let err = decode_all(&mut d, &frames).unwrap_err();
            assert_eq!(err.close_code(), 1002, "{err}");
        }
        // Without the extension, RSV1 is an error as before.
        let err = decode_one(&with_rsv1(masked(OpCode::Text, true, b"x"))).unwrap_err();
        assert!(
            matches!(err, ProtocolError::ReservedBits { bits: 4 }),
            "{err}"
        );
    }

    fn raw_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = masked(OpCode::Binary, true, payload);
        bytes[0] = b0;
        bytes
    }

    #[test]
    fn round_trips_every_length_form() {
        for (len, header) in [
            (0, 2),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
            (100_000, 10),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = encode_frame(OpCode::Binary, &payload);
            assert_eq!(frame.len(), header + len, "len {len}");
            assert_eq!(header_len(len), header);
            let mut client = Decoder::new_client(200_000);
            let got = decode_all(&mut client, &frame).unwrap();
            assert_eq!(got, [Message::Binary(Bytes::from(payload.clone()))]);
            let mut server = Decoder::new(200_000);
            let got = decode_all(&mut server, &masked(OpCode::Binary, true, &payload)).unwrap();
            assert_eq!(got, [Message::Binary(Bytes::from(payload))]);
        }
    }

    #[test]
    fn header_bytes() {
        assert_eq!(&encode_text(b"hi")[..], b"\x81\x02hi");
        let frame = encode_frame(OpCode::Pong, &[7; 126]);
        assert_eq!(&frame[..4], &[0x8A, 126, 0, 126]);
        let mut out = BytesMut::new();
        assert_eq!(write_header(&mut out, OpCode::Text, true, 70_000), 10);
        assert_eq!(&out[..], &[0xC1, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        let frame = encode_masked(OpCode::Text, false, b"", [1, 2, 3, 4]);
        assert_eq!(&frame[..], &[0x01, 0x80, 1, 2, 3, 4]);
    }

    #[test]
    fn unmask_matches_bytewise_xor_for_lengths_0_to_40() {
        for len in 0..=40 {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut buf = plain.clone();
            unmask(&mut buf, KEY);
            let expected: Vec<u8> = plain
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ KEY[i % 4])
                .collect();
            assert_eq!(buf, expected, "len {len}");
            assert_eq!(
                decode_one(&masked(OpCode::Binary, true, &plain)),
                Ok(Message::Binary(plain.into()))
            );
        }
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut bytes = masked(OpCode::Text, false, b"hel");
        bytes.extend(masked(OpCode::Ping, true, b"p"));
        bytes.extend(masked(OpCode::Continuation, false, b"lo "));
        bytes.extend(masked(OpCode::Continuation, true, b"world"));
        bytes.extend(masked(OpCode::Binary, true, b"\x00"));
        let mut decoder = Decoder::new(MAX);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Message::Ping(Bytes::from_static(b"p"))))
        );
        assert!(decoder.in_message());
        assert_eq!(decoder.buffered_len(), 3);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Message::Text(Bytes::from_static(b"hello world"))))
        );
        assert!(!decoder.in_message());
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Message::Binary(Bytes::from_static(b"\x00"))))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(None));
    }

    #[test]
    fn byte_by_byte_feeding() {
        let mut bytes = masked(OpCode::Binary, false, &[9; 300]);
        bytes.extend(masked(OpCode::Pong, true, b""));
        bytes.extend(masked(OpCode::Continuation, true, "é".as_bytes()));
        bytes.extend(masked(OpCode::Text, true, "né".as_bytes()));
        let mut decoder = Decoder::new(MAX);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in &bytes {
            buf.put_u8(byte);
            if let Some(message) = decoder.decode(&mut buf).unwrap() {
                got.push(message);
            }
        }
        let mut binary = vec![9; 300];
        binary.extend("é".as_bytes());
        let expected = [
            Message::Pong(Bytes::new()),
            Message::Binary(binary.into()),
            Message::Text(Bytes::from("né")),
        ];
        assert_eq!(got, expected);
        assert!(buf.is_empty());
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let text = "a€b".as_bytes(); // € is E2 82 AC
        let mut bytes = masked(OpCode::Text, false, &text[..2]);
        bytes.extend(masked(OpCode::Continuation, false, &text[2..3]));
        bytes.extend(masked(OpCode::Continuation, true, &text[3..]));
        assert_eq!(decode_one(&bytes), Ok(Message::Text(Bytes::from("a€b"))));
    }

    #[test]
    fn utf8_fails_fast_on_first_fragment() {
        let mut decoder = Decoder::new(MAX);
        let first = masked(OpCode::Text, false, b"ok\xC0\xAF");
        let err = decode_all(&mut decoder, &first).unwrap_err();
        assert_eq!(err, ProtocolError::InvalidUtf8 { valid_up_to: 2 });
        assert_eq!(err.close_code(), 1007);
        // A sequence cut by the end of the last fragment is invalid.
        let mut bytes = masked(OpCode::Text, false, b"x\xE2\x82");
        bytes.extend(masked(OpCode::Continuation, true, b""));
        assert_eq!(
            decode_one(&bytes),
            Err(ProtocolError::InvalidUtf8 { valid_up_to: 1 })
        );
        // And in a single frame.
        let single = masked(OpCode::Text, true, b"\xFFabc");
        assert_eq!(
            decode_one(&single),
            Err(ProtocolError::InvalidUtf8 { valid_up_to: 0 })
        );
    }

    #[test]
    fn error_rules() {
        let cases: Vec<(Vec<u8>, ProtocolError, u16)> = vec![
            (
                encode_frame(OpCode::Text, b"x").to_vec(),
                ProtocolError::Unmasked,
                1002,
            ),
            (
                raw_frame(0xC2, b""),
                ProtocolError::ReservedBits { bits: 0b100 },
                1002,
            ),
            (
                raw_frame(0x92, b""),
                ProtocolError::ReservedBits { bits: 0b001 },
                1002,
            ),
            (
                raw_frame(0x83, b""),
                ProtocolError::UnknownOpcode { opcode: 3 },
                1002,
            ),
            (
                raw_frame(0x87, b""),
                ProtocolError::UnknownOpcode { opcode: 7 },
                1002,
            ),
            (
                raw_frame(0x8B, b""),
                ProtocolError::UnknownOpcode { opcode: 0xB },
                1002,
            ),
            (
                raw_frame(0x8F, b""),
                ProtocolError::UnknownOpcode { opcode: 0xF },
                1002,
            ),
            (
                masked(OpCode::Ping, true, &[0; 126]),
                ProtocolError::ControlTooLarge {
                    opcode: OpCode::Ping,
                    len: 126,
                },
                1002,
            ),
            (
                masked(OpCode::Pong, false, b""),
                ProtocolError::FragmentedControl {
                    opcode: OpCode::Pong,
                },
                1002,
            ),
            (
                masked(OpCode::Continuation, true, b"x"),
                ProtocolError::UnexpectedContinuation,
                1002,
            ),
            (
                masked(OpCode::Close, true, b"\x03"),
                ProtocolError::CloseTooShort,
                1002,
            ),
            (
                masked(OpCode::Close, true, b"\x03\xe8\xff"),
                ProtocolError::InvalidCloseReason,
                1007,
            ),
            (
                masked(OpCode::Binary, true, &vec![0; MAX + 1]),
                ProtocolError::MessageTooLarge {
                    len: MAX as u64 + 1,
                    max: MAX,
                },
                1009,
            ),
        ];
        for (bytes, expected, code) in cases {
            let err = decode_one(&bytes).unwrap_err();
            assert_eq!(err, expected);
            assert_eq!(err.close_code(), code, "{err}");
        }
        let masked_from_server = masked(OpCode::Text, true, b"x");
        let err = decode_all(&mut Decoder::new_client(MAX), &masked_from_server).unwrap_err();
        assert_eq!(err, ProtocolError::UnexpectedMask);
    }

    #[test]
    fn new_data_frame_inside_fragmented_message() {
        for opcode in [OpCode::Text, OpCode::Binary] {
            let mut bytes = masked(OpCode::Binary, false, b"a");
            bytes.extend(masked(opcode, true, b"b"));
            assert_eq!(
                decode_one(&bytes),
                Err(ProtocolError::ExpectedContinuation { opcode })
            );
        }
    }

    #[test]
    fn size_limit_counts_all_fragments_before_buffering() {
        let mut decoder = Decoder::new(10);
        let mut buf = BytesMut::from(&masked(OpCode::Text, false, b"123456")[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        // Only the header of the oversized continuation is present.
        let next = masked(OpCode::Continuation, true, b"12345");
        buf.extend_from_slice(&next[..6]);
        let err = decoder.decode(&mut buf).unwrap_err();
        assert_eq!(err, ProtocolError::MessageTooLarge { len: 11, max: 10 });
    }

    #[test]
    fn huge_length_headers_fail_without_payload() {
        let msb = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        let err = Decoder::new(MAX)
            .decode(&mut BytesMut::from(&msb[..]))
            .unwrap_err();
        assert_eq!(err, ProtocolError::LengthMsbSet { len: 1 << 63 });
        assert_eq!(err.close_code(), 1002);
        let mut max_len = vec![0x82, 0xFF];
        max_len.extend((u64::MAX >> 1).to_be_bytes());
        max_len.extend(KEY);
        let err = Decoder::new(MAX)
            .decode(&mut BytesMut::from(&max_len[..]))
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::MessageTooLarge {
                len: u64::MAX >> 1,
                max: MAX
            }
        );
        // The limit is held in 32 bits: larger ones clamp, so a 2^63 frame
        // is refused whatever the setting.
        let mut buf = BytesMut::from(&max_len[..]);
        assert!(Decoder::new(usize::MAX).decode(&mut buf).is_err());
        // Even with the largest limit nothing is allocated for a frame
        // under it: it waits for the bytes.
        let mut under = vec![0x82, 0xFF];
        under.extend(u64::from(u32::MAX - 1).to_be_bytes());
        under.extend(KEY);
        let mut buf = BytesMut::from(&under[..]);
        assert_eq!(Decoder::new(usize::MAX).decode(&mut buf), Ok(None));
        assert_eq!(buf.len(), 14);
    }

    #[test]
    fn non_minimal_length_is_accepted() {
        let mut bytes = vec![0x82, 0xFE, 0, 3];
        bytes.extend(KEY);
        let mut body = b"abc".to_vec();
        unmask(&mut body, KEY);
        bytes.extend(body);
        assert_eq!(
            decode_one(&bytes),
            Ok(Message::Binary(Bytes::from_static(b"abc")))
        );
    }

    #[test]
    fn close_frames() {
        let close = |payload: &[u8]| decode_one(&masked(OpCode::Close, true, payload));
        assert_eq!(close(b""), Ok(Message::Close(None)));
        assert_eq!(
            close(b"\x03\xe8"),
            Ok(Message::Close(Some((1000, String::new()))))
        );
        let mut payload = 4001u16.to_be_bytes().to_vec();
        payload.extend("bye ✓".as_bytes());
        assert_eq!(
            close(&payload),
            Ok(Message::Close(Some((4001, "bye ✓".into()))))
        );
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            let err = close(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err, ProtocolError::InvalidCloseCode { code });
            assert_eq!(err.close_code(), 1002);
        }
        for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(close(&code.to_be_bytes()).is_ok(), "{code}");
        }
    }

    #[test]
    fn encode_close_truncates_at_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let frame = encode_close(4009, &reason);
        assert_eq!(frame[1] as usize, 2 + 122); // 61 whole "é"s
        let mut decoder = Decoder::new_client(MAX);
        let got = decode_all(&mut decoder, &frame).unwrap();
        assert_eq!(got, [Message::Close(Some((4009, "é".repeat(61))))]);
        let frame = encode_close(1000, "a".repeat(200).as_str());
        assert_eq!(frame.len(), 2 + 2 + MAX_CLOSE_REASON);
        assert_eq!(&encode_close(1001, "")[..], &[0x88, 2, 0x03, 0xE9]);
    }
}
