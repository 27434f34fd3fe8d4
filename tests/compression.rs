//! permessage-deflate against the real binary, with hand-built frames:
//! the negotiated answer, compressed `msg` frames above the minimum size
//! (byte-identical for every subscriber), plain ones below it or past a
//! client's window, compressed client messages inflated, and the limits
//! (an inflate bomb closes 1009, garbage 1007). docs/PROTOCOL.md section 1.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{raw, TestServer};
use ringcast::client::Client;
use ringcast::ws::deflate::{Deflater, Inflater};
use serde_json::{json, Value};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Upgrades with `extensions` offered (one header line each); returns the
/// socket, after the `welcome` frame, and the response head.
fn upgrade(server: &TestServer, extensions: &[&str]) -> (TcpStream, String) {
    let mut req = String::from(
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    for e in extensions {
        req.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
    }
    req.push_str("\r\n");
    let mut s = raw::connect(server.addr, req.as_bytes());
    let head = raw::read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (b0, welcome) = read_frame(&mut s);
    assert_eq!(b0, 0x81, "welcome goes plain");
    assert_eq!(
        serde_json::from_slice::<Value>(&welcome).unwrap()["op"],
        "welcome"
    );
    (s, head)
}

fn extension_answer(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
}

/// One server frame: its first byte (FIN, RSV, opcode) and its payload.
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

/// Reads frames until a `msg`; returns whether it came compressed and its
/// JSON (inflated when it was).
fn read_msg(s: &mut TcpStream) -> (bool, Vec<u8>, Value) {
    loop {
        let (b0, payload) = read_frame(s);
        let compressed = b0 & 0x40 != 0;
        let text = if compressed {
            let mut out = Vec::new();
            Inflater::default()
                .inflate(&payload, 1 << 20, &mut out)
                .unwrap();
            out
        } else {
            payload.clone()
        };
        let v: Value = serde_json::from_slice(&text).unwrap();
        if v["op"] == "msg" {
            return (compressed, payload, v);
        }
    }
}

fn send_text(s: &mut TcpStream, text: &str) {
    s.write_all(&raw::frame(true, 1, text.as_bytes())).unwrap();
}

fn subscribe(s: &mut TcpStream, topic: &str) {
    send_text(
        s,
        &json!({"op": "sub", "id": 1, "topic": topic}).to_string(),
    );
    let ok = raw::read_op(s, "ok");
    assert_eq!(ok["topic"], topic);
}

#[test]
fn large_messages_go_compressed_and_identical_to_every_subscriber_small_ones_plain() {
    let server = TestServer::start(&[]);
    let (mut a, head) = upgrade(&server, &[OFFER]);
    assert_eq!(extension_answer(&head), Some(ANSWER));
    let (mut b, _) = upgrade(&server, &["x-unknown", OFFER]);
    // A client that takes a 256-byte window only.
    let (mut small_window, head) =
        upgrade(&server, &["permessage-deflate; server_max_window_bits=8"]);
    assert_eq!(
        extension_answer(&head),
        Some(&*format!("{ANSWER}; server_max_window_bits=8"))
    );
    let (mut plain, head) = upgrade(&server, &[]);
    assert_eq!(extension_answer(&head), None);
    for s in [&mut a, &mut b, &mut small_window, &mut plain] {
        subscribe(s, "news");
    }
    let mut publisher = Client::connect(&server.url()).unwrap();
    let big = json!({"text": "a notification that repeats itself ".repeat(60)});
    publisher.publish("news", &big).unwrap();
    let (ca, za, va) = read_msg(&mut a);
    let (cb, zb, _) = read_msg(&mut b);
    assert!(ca && cb, "a 2 KB msg is compressed");
    assert_eq!(
        za, zb,
        "compressed once, the same bytes for every subscriber"
    );
    assert!(za.len() < 500, "compressed to {} bytes", za.len());
    assert_eq!(va["data"], big);
    let (c, _, v) = read_msg(&mut small_window);
    assert!(!c, "past the client's window: plain");
    assert_eq!(v["data"], big);
    let (c, _, _) = read_msg(&mut plain);
    assert!(!c, "no extension: plain");
    // Under --compression-min-size (256 B): plain for everyone.
    publisher.publish("news", &json!("short")).unwrap();
    let (c, _, v) = read_msg(&mut a);
    assert!(!c);
    assert_eq!(v["data"], "short");
    assert!(server.metric("ringcast_messages_compressed_total") >= 1.0);
    assert!(
        server.metric("ringcast_compression_bytes_out_total")
            < server.metric("ringcast_compression_bytes_in_total")
    );
}

#[test]
fn compressed_client_messages_are_inflated_and_bounded() {
    let server = TestServer::start(&["--max-message-size", "64KiB"]);
    let (mut s, _) = upgrade(&server, &[OFFER]);
    // A compressed `sub`, fragmented: RSV1 on the first frame only.
    let sub = json!({"op": "sub", "id": 7, "topic": "zipped"}).to_string();
    let z = Deflater::new(6).compress(sub.as_bytes());
    let (first, rest) = z.split_at(z.len() / 2);
    let key = Some([1, 2, 3, 4]);
    s.write_all(&raw::frame_with(false, 4, 1, first, key))
        .unwrap();
    s.write_all(&raw::frame_with(true, 0, 0, rest, key))
        .unwrap();
    let ok = raw::read_op(&mut s, "ok");
    assert_eq!(
        (ok["id"].as_u64(), ok["topic"].as_str()),
        (Some(7), Some("zipped"))
    );
    // A bomb: 1 MiB of one byte, a few KB compressed, over the 64 KiB limit.
    let bomb = Deflater::new(9).compress(&vec![b' '; 1 << 20]);
    s.write_all(&raw::frame_with(true, 4, 1, &bomb, key))
        .unwrap();
    assert_eq!(raw::read_close_code(&mut s), Some(1009));
    // Garbage that does not inflate.
    let (mut g, _) = upgrade(&server, &[OFFER]);
    g.write_all(&raw::frame_with(
        true,
        4,
        1,
        &[0xff, 0xfe, 0xfd, 0x00, 0x01],
        key,
    ))
    .unwrap();
    assert_eq!(raw::read_close_code(&mut g), Some(1007));
    // RSV1 without the extension is still a protocol error.
    let (mut p, _) = upgrade(&server, &[]);
    p.write_all(&raw::frame_with(true, 4, 1, &z, key)).unwrap();
    assert_eq!(raw::read_close_code(&mut p), Some(1002));
}

/// Compressed frames written with the upgrade request (one packet, one
/// read on the server), and a compressed message cut mid-frame across two
/// writes a moment apart (its bytes carried from one read to the next):
/// both are inflated, since the extension was agreed before the frames
/// behind the request were decoded.
#[test]
fn compressed_frames_behind_the_upgrade_request_and_across_reads_are_taken() {
    let server = TestServer::start(&[]);
    let key = Some([9, 8, 7, 6]);
    let sub = |id: u64, topic: &str| {
        let text = json!({"op": "sub", "id": id, "topic": topic}).to_string();
        raw::frame_with(true, 4, 1, &Deflater::new(6).compress(text.as_bytes()), key)
    };
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: {OFFER}\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(&sub(1, "behind"));
    let mut s = raw::connect(server.addr, &bytes);
    let head = raw::read_head(&mut s);
    assert_eq!(extension_answer(&head), Some(ANSWER), "{head}");
    let ok = raw::read_op(&mut s, "ok");
    assert_eq!(
        (ok["id"].as_u64(), ok["topic"].as_str()),
        (Some(1), Some("behind"))
    );
    let frame = sub(2, "split");
    let (a, b) = frame.split_at(frame.len() / 2);
    s.write_all(a).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b).unwrap();
    let ok = raw::read_op(&mut s, "ok");
    assert_eq!(
        (ok["id"].as_u64(), ok["topic"].as_str()),
        (Some(2), Some("split"))
    );
}

#[test]
fn declined_offers_are_counted_and_the_upgrade_goes_on() {
    let server = TestServer::start(&[]);
    let (_s, head) = upgrade(&server, &["permessage-deflate; server_max_window_bits=99"]);
    assert_eq!(extension_answer(&head), None);
    let safari = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 \
                  (KHTML, like Gecko) Version/15.2 Safari/605.1.15";
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         User-Agent: {safari}\r\nSec-WebSocket-Extensions: {OFFER}\r\n\r\n"
    );
    let mut s = raw::connect(server.addr, req.as_bytes());
    let head = raw::read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 101") && extension_answer(&head).is_none(),
        "{head}"
    );
    assert_eq!(
        server.metric("ringcast_deflate_declined_total{reason=\"malformed\"}"),
        1.0
    );
    assert_eq!(
        server.metric("ringcast_deflate_declined_total{reason=\"broken_client\"}"),
        1.0
    );
    let off = TestServer::start(&["--compression", "false"]);
    let (_s, head) = upgrade(&off, &[OFFER]);
    assert_eq!(extension_answer(&head), None);
    assert_eq!(
        off.metric("ringcast_deflate_declined_total{reason=\"disabled\"}"),
        1.0
    );
}
