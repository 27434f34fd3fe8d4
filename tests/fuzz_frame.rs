//! Fuzzing the RFC 6455 frame codec, `ringcast::ws::frame`: any byte stream
//! fed to a `Decoder` in any chunks never panics, never waits on more than
//! one frame header plus `max_message_size` of buffered bytes, and decodes
//! the same whatever the chunking; messages encoded (masked, fragmented at
//! any point, control frames in between, any length form) come back as sent;
//! invalid UTF-8 anywhere in a text message is always 1007, a message over
//! the limit always 1009, announced by the header that crosses it. The frames
//! here are built by a small encoder written from RFC 6455 section 5.2,
//! independent of the codec, which is also checked against it. Replays
//! `tests/corpus/frame`.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast::ws::frame::{
    encode_close, encode_frame, encode_masked, unmask, write_header, Decoder, Message, OpCode,
    ProtocolError, MAX_CLOSE_REASON,
};

/// Longest frame header: 2 bytes, a 64-bit length, a masking key.
const MAX_HEADER: usize = 14;

/// The server's default `max_message_size`.
const MAX: usize = 64 << 10;

// ---------------------------------------------------------------------------
// A reference encoder (RFC 6455 section 5.2).

/// How the payload length is written: the shortest form, or a longer one
/// (legal, if wasteful).
#[derive(Debug, Clone, Copy)]
enum LenForm {
    Shortest,
    Two,
    Eight,
}

#[derive(Debug, Clone)]
struct RawFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
    mask: Option<[u8; 4]>,
    form: LenForm,
}

impl RawFrame {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.fin) << 7 | self.opcode];
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len();
        let form = match self.form {
            LenForm::Shortest if len < 126 => None,
            LenForm::Shortest if len < 65536 => Some(LenForm::Two),
            LenForm::Shortest => Some(LenForm::Eight),
            LenForm::Two if len < 65536 => Some(LenForm::Two),
            LenForm::Two | LenForm::Eight => Some(LenForm::Eight),
        };
        match form {
            None => out.push(mask_bit | len as u8),
            Some(LenForm::Two) => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            Some(_) => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match self.mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
        out
    }

    /// Header bytes of the encoded frame.
    fn header_len(&self) -> usize {
        self.encode().len() - self.payload.len()
    }
}

// ---------------------------------------------------------------------------
// Messages and how they are framed.

/// A control message, always a single frame.
#[derive(Debug, Clone)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl Control {
    fn opcode_payload(&self) -> (u8, Vec<u8>) {
        match self {
            Control::Ping(p) => (0x9, p.clone()),
            Control::Pong(p) => (0xA, p.clone()),
            Control::Close(None) => (0x8, Vec::new()),
            Control::Close(Some((code, reason))) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                (0x8, p)
            }
        }
    }

    fn message(&self) -> Message {
        match self {
            Control::Ping(p) => Message::Ping(Bytes::from(p.clone())),
            Control::Pong(p) => Message::Pong(Bytes::from(p.clone())),
            Control::Close(c) => Message::Close(c.clone()),
        }
    }
}

/// Codes a peer may send (RFC 6455 section 7.4.1 and 7.4.2).
fn close_code() -> impl Strategy<Value = u16> {
    prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]
}

/// A UTF-8 string of at most `max` bytes.
fn utf8_upto(max: usize) -> impl Strategy<Value = String> {
    any::<String>().prop_map(move |s| {
        let end = s.floor_char_boundary(max);
        s[..end].to_string()
    })
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        vec(any::<u8>(), 0..=125).prop_map(Control::Ping),
        vec(any::<u8>(), 0..=125).prop_map(Control::Pong),
        Just(Control::Close(None)),
        (close_code(), utf8_upto(MAX_CLOSE_REASON)).prop_map(|c| Control::Close(Some(c))),
    ]
}

/// A data message: text (valid UTF-8) or binary.
#[derive(Debug, Clone)]
enum Data {
    Text(String),
    Binary(Vec<u8>),
}

impl Data {
    fn opcode_payload(&self) -> (u8, Vec<u8>) {
        match self {
            Data::Text(s) => (0x1, s.as_bytes().to_vec()),
            Data::Binary(b) => (0x2, b.clone()),
        }
    }

    fn message(&self) -> Message {
        match self {
            Data::Text(s) => Message::Text(Bytes::from(s.clone())),
            Data::Binary(b) => Message::Binary(Bytes::from(b.clone())),
        }
    }
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        8 => any::<String>().prop_map(Data::Text),
        8 => vec(any::<u8>(), 0..300).prop_map(Data::Binary),
        // Past the 16-bit length form.
        1 => (65_536usize..70_000, any::<u8>()).prop_map(|(n, b)| Data::Binary(vec![b; n])),
        1 => (126usize..2000).prop_map(|n| Data::Text("é".repeat(n / 2))),
    ]
}

fn len_form() -> impl Strategy<Value = LenForm> {
    prop_oneof![6 => Just(LenForm::Shortest), 1 => Just(LenForm::Two), 1 => Just(LenForm::Eight)]
}

/// One item of a stream: a data message cut into fragments with control
/// frames between them, or a lone control frame.
#[derive(Debug, Clone)]
enum Item {
    Data {
        data: Data,
        /// Where the payload is cut (deduplicated, sorted).
        cuts: Vec<Index>,
        /// Control frames to send after fragment `i` (only between fragments).
        between: Vec<(Index, Control)>,
    },
    Control(Control),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        3 => (data(), vec(any::<Index>(), 0..5), vec((any::<Index>(), control()), 0..3))
            .prop_map(|(data, cuts, between)| Item::Data { data, cuts, between }),
        1 => control().prop_map(Item::Control),
    ]
}

/// A frame plus how to write it.
#[derive(Debug, Clone)]
struct Wire {
    /// Masked frames: the key; also whether to encode with the codec's own
    /// `encode_masked` / `encode_frame` instead of the reference encoder.
    mask: [u8; 4],
    use_codec: bool,
    form: LenForm,
}

fn wire() -> impl Strategy<Value = Wire> {
    (any::<[u8; 4]>(), any::<bool>(), len_form()).prop_map(|(mask, use_codec, form)| Wire {
        mask,
        use_codec,
        form,
    })
}

/// The frames of `items` and the messages they must decode to, in order.
/// Masked for a server decoder, unmasked for a client decoder.
fn frames(items: &[Item], wires: &[Wire], masked: bool) -> (Vec<RawFrame>, Vec<Message>) {
    let mut out = Vec::new();
    let mut expect = Vec::new();
    let mut wires = wires.iter().cycle();
    let mut push = |fin: bool, opcode: u8, payload: Vec<u8>, out: &mut Vec<RawFrame>| {
        let w = wires.next().unwrap();
        out.push(RawFrame {
            fin,
            opcode,
            payload,
            mask: masked.then_some(w.mask),
            form: if w.use_codec {
                LenForm::Shortest
            } else {
                w.form
            },
        });
    };
    for item in items {
        match item {
            Item::Control(c) => {
                let (op, p) = c.opcode_payload();
                push(true, op, p, &mut out);
                expect.push(c.message());
            }
            Item::Data {
                data,
                cuts,
                between,
            } => {
                let (op, payload) = data.opcode_payload();
                let mut at: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
                at.sort_unstable();
                at.dedup();
                at.push(payload.len());
                let n = at.len();
                let mut start = 0;
                for (k, &end) in at.iter().enumerate() {
                    let last = k + 1 == n;
                    let opcode = if k == 0 { op } else { 0x0 };
                    push(last, opcode, payload[start..end].to_vec(), &mut out);
                    start = end;
                    if !last {
                        for (_, c) in between.iter().filter(|(i, _)| i.index(n - 1) == k) {
                            let (cop, cp) = c.opcode_payload();
                            push(true, cop, cp, &mut out);
                            expect.push(c.message());
                        }
                    }
                }
                expect.push(data.message());
            }
        }
    }
    (out, expect)
}

/// Encodes a frame with the codec when asked (only the shortest form
/// exists there; `encode_frame` only writes final frames), else with the
/// reference encoder.
fn encode(frame: &RawFrame, use_codec: bool) -> Vec<u8> {
    let opcode = match frame.opcode {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        _ => OpCode::Pong,
    };
    match (use_codec, frame.mask) {
        (true, Some(key)) => encode_masked(opcode, frame.fin, &frame.payload, key).to_vec(),
        (true, None) if frame.fin => encode_frame(opcode, &frame.payload).to_vec(),
        _ => frame.encode(),
    }
}

// ---------------------------------------------------------------------------
// Feeding a decoder.

/// What a decoder made of a stream.
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Message>,
    error: Option<ProtocolError>,
    /// Bytes fed when the error was returned.
    error_at: Option<usize>,
    /// Bytes left in the buffer at the end.
    left: usize,
    in_message: bool,
}

/// Feeds `stream` in chunks of the given sizes (cycled; all at once when
/// empty), decoding after each; checks the invariants that hold at every
/// step for any input, and stops at the first error.
fn feed(
    decoder: &mut Decoder,
    max: usize,
    stream: &[u8],
    chunks: &[usize],
) -> Result<Outcome, TestCaseError> {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut sizes = chunks.iter().copied().cycle();
    let mut out = Outcome {
        messages: Vec::new(),
        error: None,
        error_at: None,
        left: 0,
        in_message: false,
    };
    while fed < stream.len() {
        let n = sizes.next().unwrap_or(stream.len()).max(1);
        let end = (fed + n).min(stream.len());
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(m)) => {
                    check_message(&m, max)?;
                    out.messages.push(m);
                }
                Ok(None) => break,
                Err(e) => {
                    check_error(&e)?;
                    out.error = Some(e);
                    out.error_at = Some(fed);
                    out.left = buf.len();
                    return Ok(out);
                }
            }
        }
        // Waiting for more: at most one frame (header and payload) buffered,
        // and the fragments held stay under the limit.
        let frame_max = max.max(125) + MAX_HEADER;
        prop_assert!(
            buf.len() < frame_max,
            "{} bytes buffered waiting for a frame, limit {max}",
            buf.len()
        );
        prop_assert!(decoder.buffered_len() <= max);
        // Asking again without new bytes changes nothing.
        let before = buf.len();
        prop_assert_eq!(decoder.decode(&mut buf), Ok(None));
        prop_assert_eq!(buf.len(), before);
    }
    out.left = buf.len();
    out.in_message = decoder.in_message();
    Ok(out)
}

fn check_message(m: &Message, max: usize) -> Result<(), TestCaseError> {
    match m {
        Message::Text(t) => {
            prop_assert!(std::str::from_utf8(t).is_ok(), "text is not UTF-8");
            prop_assert!(t.len() <= max);
        }
        Message::Binary(b) => prop_assert!(b.len() <= max),
        Message::Ping(p) | Message::Pong(p) => prop_assert!(p.len() <= 125),
        Message::Close(None) => {}
        Message::Close(Some((code, reason))) => {
            prop_assert!(
                matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
                "close code {code}"
            );
            prop_assert!(reason.len() <= MAX_CLOSE_REASON);
        }
        // The fuzzed decoders never negotiate compression.
        Message::Deflated(..) => prop_assert!(false, "compressed message without the extension"),
    }
    Ok(())
}

fn check_error(e: &ProtocolError) -> Result<(), TestCaseError> {
    prop_assert!(matches!(e.close_code(), 1002 | 1007 | 1009), "{e:?}");
    let text = e.to_string();
    prop_assert!(
        fuzz_support::no_control(&text) && text.len() <= 120,
        "{text:?}"
    );
    Ok(())
}

fn chunking() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![1]),
        vec(1usize..16, 1..8),
        vec(1usize..5000, 1..8),
    ]
}

fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![Just(MAX), 0usize..300, 300usize..100_000]
}

// ---------------------------------------------------------------------------
// Arbitrary streams.

/// Bytes shaped like frames often enough to reach deep decoder states:
/// plausible first bytes, every length form (including the absurd), masks,
/// payloads shorter or longer than announced, and plain noise.
fn frame_ish() -> impl Strategy<Value = Vec<u8>> {
    let b0 = prop_oneof![
        4 => (any::<bool>(), prop_oneof![Just(0u8), Just(1), Just(2), Just(8), Just(9), Just(10)])
            .prop_map(|(fin, op)| u8::from(fin) << 7 | op),
        1 => any::<u8>(),
    ];
    let len = prop_oneof![
        4 => (0u8..=125).prop_map(|n| vec![n]),
        1 => any::<u16>().prop_map(|n| { let mut v = vec![126]; v.extend(n.to_be_bytes()); v }),
        1 => any::<u64>().prop_map(|n| { let mut v = vec![127]; v.extend(n.to_be_bytes()); v }),
        1 => (0u64..70_000).prop_map(|n| { let mut v = vec![127]; v.extend(n.to_be_bytes()); v }),
    ];
    let piece = (
        b0,
        any::<bool>(),
        len,
        any::<[u8; 4]>(),
        vec(any::<u8>(), 0..200),
    )
        .prop_map(|(b0, masked, len, key, payload)| {
            let mut out = vec![b0, len[0] | if masked { 0x80 } else { 0 }];
            out.extend_from_slice(&len[1..]);
            if masked {
                out.extend_from_slice(&key);
            }
            // Often exactly the announced length, else whatever was drawn.
            let announced = match len.len() {
                1 => usize::from(len[0]),
                3 => usize::from(u16::from_be_bytes([len[1], len[2]])),
                _ => usize::MAX,
            };
            let take = if announced <= payload.len() {
                announced
            } else {
                payload.len()
            };
            out.extend_from_slice(&payload[..take]);
            out
        });
    vec(prop_oneof![4 => piece, 1 => vec(any::<u8>(), 0..32)], 0..12)
        .prop_map(|pieces| pieces.concat())
}

/// A valid masked stream with bytes flipped, inserted or removed.
fn mutated_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(item(), 1..4),
        vec(wire(), 1..4),
        vec((any::<Index>(), any::<u8>(), 0u8..3), 1..4),
    )
        .prop_map(|(items, wires, edits)| {
            let (frames, _) = frames(&items, &wires, true);
            let mut bytes: Vec<u8> = frames.iter().flat_map(RawFrame::encode).collect();
            for (at, b, kind) in edits {
                let i = at.index(bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] = b,
                    1 => bytes.insert(i, b),
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            bytes
        })
}

fn any_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..600), frame_ish(), mutated_stream()]
}

proptest! {
    #![proptest_config(fuzz_support::config(256))]

    #[test]
    fn any_stream_is_decoded_safely_and_chunking_does_not_matter(
        stream in any_stream(),
        chunks in chunking(),
        max in limit(),
        server in any::<bool>(),
    ) {
        let new = |max| if server { Decoder::new(max) } else { Decoder::new_client(max) };
        let whole = feed(&mut new(max), max, &stream, &[])?;
        let chunked = feed(&mut new(max), max, &stream, &chunks)?;
        // Same messages, same error; only the moment it is seen may differ.
        prop_assert_eq!(&chunked.messages, &whole.messages);
        prop_assert_eq!(&chunked.error, &whole.error);
        if whole.error.is_none() {
            prop_assert_eq!(chunked.left, whole.left);
            prop_assert_eq!(chunked.in_message, whole.in_message);
        }
    }

    #[test]
    fn messages_round_trip_through_the_server_decoder(
        items in vec(item(), 1..6),
        wires in vec(wire(), 1..6),
        chunks in chunking(),
    ) {
        let (frames, expect) = frames(&items, &wires, true);
        let stream: Vec<u8> = frames
            .iter()
            .zip(wires.iter().cycle())
            .flat_map(|(f, w)| encode(f, w.use_codec))
            .collect();
        let got = feed(&mut Decoder::new(MAX * 2), MAX * 2, &stream, &chunks)?;
        prop_assert_eq!(got.error, None);
        prop_assert_eq!(got.messages, expect);
        prop_assert_eq!(got.left, 0);
        prop_assert!(!got.in_message);
    }

    #[test]
    fn messages_round_trip_through_the_client_decoder(
        items in vec(item(), 1..6),
        wires in vec(wire(), 1..6),
        chunks in chunking(),
    ) {
        let (frames, expect) = frames(&items, &wires, false);
        let stream: Vec<u8> = frames
            .iter()
            .zip(wires.iter().cycle())
            .flat_map(|(f, w)| encode(f, w.use_codec))
            .collect();
        let got = feed(&mut Decoder::new_client(MAX * 2), MAX * 2, &stream, &chunks)?;
        prop_assert_eq!(got.error, None);
        prop_assert_eq!(got.messages, expect);
        prop_assert_eq!(got.left, 0);
    }

    #[test]
    fn invalid_utf8_anywhere_in_text_is_1007(
        text in any::<String>(),
        at in any::<Index>(),
        bad in invalid_utf8(),
        cuts in vec(any::<Index>(), 0..5),
        between in vec((any::<Index>(), control()), 0..2),
        before in vec(item(), 0..2),
        wires in vec(wire(), 1..4),
        chunks in chunking(),
    ) {
        // `bad` spliced in at a char boundary: invalid whatever follows.
        let i = char_boundary(&text, at);
        let mut payload = text.as_bytes()[..i].to_vec();
        payload.extend_from_slice(&bad);
        payload.extend_from_slice(&text.as_bytes()[i..]);
        prop_assert!(std::str::from_utf8(&payload).is_err());
        // Framed as binary, then relabelled text: `Data::Text` needs a String.
        let mut items = before;
        items.push(Item::Data { data: Data::Binary(payload), cuts, between });
        let (mut frames, expect) = frames(&items, &wires, true);
        let first = frames.iter().rposition(|f| f.opcode == 0x2).unwrap();
        frames[first].opcode = 0x1;
        let stream: Vec<u8> = frames.iter().flat_map(RawFrame::encode).collect();
        let got = feed(&mut Decoder::new(2 * MAX), 2 * MAX, &stream, &chunks)?;
        let close = got.error.as_ref().map(ProtocolError::close_code);
        prop_assert_eq!(close, Some(1007), "{:?}", got.error);
        // Nothing of the bad message was delivered; what came before was.
        prop_assert!(got.messages.len() < expect.len());
        prop_assert_eq!(&got.messages[..], &expect[..got.messages.len()]);
    }

    #[test]
    fn invalid_utf8_in_a_close_reason_is_1007(
        code in close_code(),
        reason in utf8_upto(60),
        at in any::<Index>(),
        bad in invalid_utf8(),
        key in any::<[u8; 4]>(),
    ) {
        let i = char_boundary(&reason, at);
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.as_bytes()[..i]);
        payload.extend_from_slice(&bad);
        payload.extend_from_slice(&reason.as_bytes()[i..]);
        let frame = encode_masked(OpCode::Close, true, &payload, key);
        let got = Decoder::new(MAX).decode(&mut BytesMut::from(&frame[..]));
        prop_assert_eq!(got.map_err(|e| e.close_code()), Err(1007));
    }

    #[test]
    fn a_message_over_the_limit_is_1009_at_the_header_crossing_it(
        max in 0usize..3000,
        over in 1usize..3000,
        text in any::<bool>(),
        cuts in vec(any::<Index>(), 0..6),
        between in vec((any::<Index>(), control()), 0..3),
        before in vec(item(), 0..3),
        wires in vec(wire(), 1..4),
        chunks in chunking(),
    ) {
        let size = max + over;
        let data = if text { Data::Text("a".repeat(size)) } else { Data::Binary(vec![7; size]) };
        // Messages before it fit (or are left out).
        let before: Vec<Item> = before.into_iter().filter(|it| match it {
            Item::Data { data, .. } => data.opcode_payload().1.len() <= max,
            Item::Control(_) => true,
        }).collect();
        let (mut frames, mut expect) = frames(&before, &wires, true);
        let (big, big_expect) = self::frames(&[Item::Data { data, cuts, between }], &wires, true);
        // The control frames between its fragments may come out; it may not.
        expect.extend_from_slice(&big_expect[..big_expect.len() - 1]);
        // Where the header of the first frame that takes the message past
        // the limit ends: the error must be known by then.
        let mut offset: usize = frames.iter().map(|f| f.encode().len()).sum();
        let mut total = 0;
        let mut deadline = None;
        for f in &big {
            if f.opcode < 0x8 {
                total += f.payload.len();
                if total > max && deadline.is_none() {
                    deadline = Some(offset + f.header_len());
                }
            }
            offset += f.encode().len();
        }
        let deadline = deadline.unwrap();
        frames.extend(big);
        let stream: Vec<u8> = frames.iter().flat_map(RawFrame::encode).collect();
        let got = feed(&mut Decoder::new(max), max, &stream, &chunks)?;
        let close = got.error.as_ref().map(ProtocolError::close_code);
        prop_assert_eq!(close, Some(1009), "{:?}", got.error);
        let at = got.error_at.unwrap();
        // Fed in chunks, the error shows in the chunk that completes that header.
        let chunk_max = chunks.iter().copied().max().unwrap_or(stream.len());
        prop_assert!(
            at < deadline + chunk_max,
            "error after {at} bytes, header ends at {deadline}"
        );
        prop_assert!(got.messages.len() <= expect.len());
        prop_assert_eq!(&got.messages[..], &expect[..got.messages.len()]);
    }

    #[test]
    fn codec_encoders_match_the_reference(
        opcode in prop_oneof![
            Just(OpCode::Text),
            Just(OpCode::Binary),
            Just(OpCode::Continuation),
            Just(OpCode::Ping),
        ],
        fin in any::<bool>(),
        payload in prop_oneof![
            vec(any::<u8>(), 0..300),
            (65_530usize..65_545).prop_map(|n| vec![1; n]),
        ],
        key in any::<[u8; 4]>(),
        rsv1 in any::<bool>(),
    ) {
        let reference = |mask| RawFrame {
            fin,
            opcode: opcode.bits(),
            payload: payload.clone(),
            mask,
            form: LenForm::Shortest,
        };
        let masked = encode_masked(opcode, fin, &payload, key);
        prop_assert_eq!(masked.to_vec(), reference(Some(key)).encode());
        let unmasked = RawFrame { fin: true, ..reference(None) }.encode();
        prop_assert_eq!(encode_frame(opcode, &payload).to_vec(), unmasked.clone());
        let mut header = BytesMut::new();
        let n = write_header(&mut header, opcode, rsv1, payload.len());
        let mut want = unmasked[..n].to_vec();
        want[0] |= u8::from(rsv1) << 6;
        prop_assert_eq!(&header[..], &want[..]);
    }

    #[test]
    fn encode_close_cuts_the_reason_at_a_char_boundary(
        code in close_code(),
        reason in any::<String>(),
    ) {
        let frame = encode_close(code, &reason);
        let got = Decoder::new_client(MAX).decode(&mut BytesMut::from(&frame[..])).unwrap();
        let Some(Message::Close(Some((c, r)))) = got else { panic!("{got:?}") };
        prop_assert_eq!(c, code);
        prop_assert!(r.len() <= MAX_CLOSE_REASON && reason.starts_with(&r));
        prop_assert!(r.len() == reason.len() || r.len() + 4 > MAX_CLOSE_REASON);
    }

    #[test]
    fn unmask_is_bytewise_xor_and_its_own_inverse(
        data in vec(any::<u8>(), 0..200),
        key in any::<[u8; 4]>(),
    ) {
        let mut buf = data.clone();
        unmask(&mut buf, key);
        let want: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
        prop_assert_eq!(&buf, &want);
        unmask(&mut buf, key);
        prop_assert_eq!(buf, data);
    }
}

/// A char boundary of `s`, picked by `at`.
fn char_boundary(s: &str, at: Index) -> usize {
    let boundaries: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
    boundaries[at.index(boundaries.len())]
}

/// Byte sequences that are never valid UTF-8 whatever comes after them (the
/// next byte is a char start, or the end).
fn invalid_utf8() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![0x80]), // lone continuation
        Just(vec![0xBF]),
        Just(vec![0xC0, 0x80]), // overlong NUL
        Just(vec![0xC1, 0xBF]),
        Just(vec![0xE0, 0x80, 0x80]),       // overlong
        Just(vec![0xED, 0xA0, 0x80]),       // surrogate U+D800
        Just(vec![0xED, 0xBF, 0xBF]),       // surrogate U+DFFF
        Just(vec![0xF4, 0x90, 0x80, 0x80]), // past U+10FFFF
        Just(vec![0xF5]),
        Just(vec![0xFF]),
        Just(vec![0xFE, 0xFF]),
        Just(vec![0xE2, 0x82]),       // truncated 3-byte
        Just(vec![0xF0, 0x9F, 0x98]), // truncated 4-byte
        Just(vec![0xC3]),             // truncated 2-byte
    ]
}

// ---------------------------------------------------------------------------
// The corpus.

/// Replays `tests/corpus/frame` through a server decoder (limit 64 KiB):
/// `ok-*` decodes fully with nothing left, `partial-*` decodes without error
/// but waits for more, `1002-*`/`1007-*`/`1009-*` fail with that close code.
/// Every file is also fed byte by byte, with the same result.
#[test]
fn corpus_replays() {
    for seed in fuzz_support::corpus("frame") {
        let name = &seed.name;
        let whole = feed(&mut Decoder::new(MAX), MAX, &seed.bytes, &[])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytewise = feed(&mut Decoder::new(MAX), MAX, &seed.bytes, &[1])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(whole.messages, bytewise.messages, "{name}");
        assert_eq!(whole.error, bytewise.error, "{name}");
        let code = whole.error.as_ref().map(|e| e.close_code().to_string());
        match (seed.class(), code.as_deref()) {
            ("ok", None) if whole.left == 0 && !whole.in_message => {}
            ("partial", None) if whole.left > 0 || whole.in_message => {}
            (class @ ("1002" | "1007" | "1009"), Some(code)) if class == code => {}
            (class, _) => panic!("{name}: expected {class}, got {whole:?}"),
        }
    }
}
