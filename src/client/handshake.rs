//! The client side of the upgrade (RFC 6455 §4.1): a fresh random
//! `Sec-WebSocket-Key` per connection, and the server's
//! `Sec-WebSocket-Accept` checked against it. The load tool uses both for
//! its own connections.

use super::{ClientError, Result};

/// A fresh `Sec-WebSocket-Key` for one connection (RFC 6455 §4.1): a
/// random 16-byte nonce, base64-encoded. Never a fixed key: the RFC asks
/// for a new nonce per connection, and some servers and proxies refuse a
/// key they have seen before (the RFC's sample key above all). No
/// allocation: the load tool calls this for every one of its connections.
pub fn new_key() -> [u8; 24] {
    encode_nonce(fastrand::u128(..).to_ne_bytes())
}

/// Base64 (RFC 4648 §4, padded) of a 16-byte nonce: five 3-byte groups
/// make 20 characters, the last byte 2 more, then `==`.
fn encode_nonce(nonce: [u8; 16]) -> [u8; 24] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = [b'='; 24];
    for (group, bytes) in nonce.chunks(3).enumerate() {
        let bits = bytes
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        // n bytes carry n + 1 characters; the rest stays `=`.
        for i in 0..=bytes.len() {
            out[group * 4 + i] = ALPHABET[(bits >> (18 - 6 * i)) as usize & 63];
        }
    }
    out
}

/// Most response headers [`check_accept`] reads; a `101` has a handful.
const MAX_RESPONSE_HEADERS: usize = 32;

/// Checks that a `101` response `head` (status line through the blank
/// line) carries the `Sec-WebSocket-Accept` derived from `key`, the
/// `Sec-WebSocket-Key` sent (RFC 6455 §4.1, §4.2.2). The only allocation
/// on success is the derived value.
pub fn check_accept(head: &[u8], key: &[u8]) -> Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Protocol("incomplete response head".into()))
        }
        Err(e) => return Err(ClientError::Protocol(format!("bad response head: {e}"))),
    }
    let got = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Accept"))
        .map_or(&b""[..], |h| h.value.trim_ascii());
    let expected = tungstenite::handshake::derive_accept_key(key);
    if got == expected.as_bytes() {
        return Ok(());
    }
    Err(ClientError::BadAccept {
        key: String::from_utf8_lossy(key).into_owned(),
        expected,
        got: String::from_utf8_lossy(got).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::client::Client;

    /// Base64 decoding (RFC 4648 §4), written apart from the encoder.
    fn decode_base64(s: &str) -> Option<Vec<u8>> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        };
        if !s.len().is_multiple_of(4) {
            return None;
        }
        let body = s.trim_end_matches('=');
        if s.len() - body.len() > 2 {
            return None;
        }
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in body.bytes() {
            bits = bits << 6 | u32::from(value(c)?);
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        Some(out)
    }

    #[test]
    fn keys_are_16_random_bytes_in_base64() {
        // RFC 6455 §1.3: the sample nonce encodes to the sample key.
        let sample = encode_nonce(*b"the sample nonce");
        assert_eq!(&sample, b"dGhlIHNhbXBsZSBub25jZQ==");
        for _ in 0..1000 {
            let nonce = fastrand::u128(..).to_ne_bytes();
            let key = encode_nonce(nonce);
            let text = std::str::from_utf8(&key).unwrap();
            assert_eq!(decode_base64(text).unwrap(), nonce, "{text}");
        }
        let keys: std::collections::HashSet<[u8; 24]> = (0..1000).map(|_| new_key()).collect();
        assert_eq!(keys.len(), 1000);
    }

    /// A one-shot upgrade server: answers each of `accepts.len()`
    /// connections with a 101 whose `Sec-WebSocket-Accept` is
    /// `accepts[n](key)` (no header when `None`), then `welcome`; sends each
    /// request head it read on the channel.
    fn upgrade_server(
        accepts: Vec<fn(&str) -> Option<String>>,
    ) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for accept in accepts {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap();
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap_or_default()
                    .to_string();
                let mut answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                                  Connection: Upgrade\r\n"
                    .to_string();
                if let Some(a) = accept(&key) {
                    answer.push_str(&format!("Sec-WebSocket-Accept: {a}\r\n"));
                }
                answer.push_str("\r\n");
                let welcome = br#"{"op":"welcome","conn":"c-0-1","node":"t","heartbeat":25}"#;
                let mut out = answer.into_bytes();
                out.extend_from_slice(&[0x81, welcome.len() as u8]);
                out.extend_from_slice(welcome);
                s.write_all(&out).unwrap();
                tx.send(head).unwrap();
                // The client may still be reading: keep the socket until it goes.
                std::thread::spawn(move || s.read(&mut byte));
            }
        });
        (url, rx)
    }

    fn right(key: &str) -> Option<String> {
        Some(tungstenite::handshake::derive_accept_key(key.as_bytes()))
    }

    fn sent_key(head: &str) -> String {
        let keys: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .collect();
        assert_eq!(keys.len(), 1, "{head}");
        keys[0].to_string()
    }

    #[test]
    fn every_connection_sends_a_fresh_key_and_checks_its_accept() {
        let (url, heads) = upgrade_server(vec![right, right]);
        let a = Client::connect(&url).unwrap();
        let b = Client::connect(&url).unwrap();
        assert_eq!(
            (a.welcome["op"].as_str(), b.welcome["op"].as_str()),
            (Some("welcome"), Some("welcome"))
        );
        let (ka, kb) = (
            sent_key(&heads.recv().unwrap()),
            sent_key(&heads.recv().unwrap()),
        );
        assert_ne!(ka, kb, "two connections sent the same key");
        for key in [&ka, &kb] {
            assert_ne!(key, "dGhlIHNhbXBsZSBub25jZQ==");
            assert_eq!(key.len(), 24, "{key}");
            assert_eq!(decode_base64(key).map(|n| n.len()), Some(16), "{key}");
        }
    }

    #[test]
    fn a_wrong_or_missing_accept_is_refused_naming_both_values() {
        // The RFC sample key's accept: right for no random key.
        let sample = |_: &str| Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string());
        let (url, heads) = upgrade_server(vec![sample, |_| None]);
        let err = Client::connect(&url).unwrap_err();
        let key = sent_key(&heads.recv().unwrap());
        let expected = right(&key).unwrap();
        let text = err.to_string();
        match err {
            ClientError::BadAccept {
                key: k,
                expected: e,
                got,
            } => assert_eq!(
                (k.as_str(), e.as_str(), got.as_str()),
                (
                    key.as_str(),
                    expected.as_str(),
                    "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                )
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            text.contains(&expected) && text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{text}"
        );
        match Client::connect(&url) {
            Err(ClientError::BadAccept { got, .. }) => assert_eq!(got, ""),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_accept_header_is_found_in_any_case_and_spacing() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let head = b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept:   \
                     s3pPLMBiTxaQ9kYGzzhZRbK+xOo=  \r\n\r\n";
        check_accept(head, key).unwrap();
        assert!(matches!(
            check_accept(b"HTTP/1.1 101 OK\r\n", key),
            Err(ClientError::Protocol(_))
        ));
    }
}
