//! `--trusted-proxies` through the real server: from a trusted proxy's
//! address, a PROXY header (v2 or v1) or `X-Forwarded-For` names the
//! client, and the per-address caps count that client; from anywhere else
//! the same headers change nothing. One shard, so the per-address cap is
//! exact (each shard admits its share of it).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{raw, TestServer};

/// The trusted proxy's address; the tests' own clients use 127.0.0.1.
const PROXY: &str = "127.0.0.9";

fn server() -> TestServer {
    TestServer::start(&[
        "--shards",
        "1",
        "--max-connections-per-ip",
        "2",
        "--trusted-proxies",
        "127.0.0.9/32,10.0.0.0/8",
    ])
}

/// A TCP connection to `server` from source address `from`.
fn tcp_from(from: &str, server: &TestServer) -> TcpStream {
    raw::connect_from(from, server.addr)
}

/// The upgrade request with `extra` header lines (each ending in CRLF).
fn request(extra: &str) -> String {
    raw::UPGRADE.replacen("Host: t\r\n", &format!("Host: t\r\n{extra}"), 1)
}

/// Sends `preamble` then the upgrade request with `extra` headers from
/// `from`; the socket (kept open, so it counts) and the status line.
fn upgrade(server: &TestServer, from: &str, preamble: &[u8], extra: &str) -> (TcpStream, String) {
    let mut s = tcp_from(from, server);
    s.write_all(&[preamble, request(extra).as_bytes()].concat())
        .unwrap();
    let head = raw::read_head(&mut s);
    let status = head.lines().next().unwrap_or("").to_owned();
    let status = if status.starts_with("HTTP/1.1 101") {
        raw::read_op(&mut s, "welcome");
        status
    } else {
        format!(
            "{status} {}",
            String::from_utf8_lossy(&raw::read_to_end(&mut s))
        )
    };
    (s, status)
}

fn xff(entries: &str) -> String {
    format!("X-Forwarded-For: {entries}\r\n")
}

/// A PROXY v2 header (PROXY command, TCP over IPv4) naming `src`.
fn proxy_v2(src: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1, 0xc3, 0x50, 0x1f, 0x90]);
    h
}

/// Opens connections until one is refused; how many were admitted, and the
/// refusal. The sockets stay open until the returned vector is dropped.
fn fill(server: &TestServer, from: &str, preamble: &[u8], extra: &str) -> (Vec<TcpStream>, String) {
    let mut held = Vec::new();
    for _ in 0..5 {
        let (s, status) = upgrade(server, from, preamble, extra);
        if !status.starts_with("HTTP/1.1 101") {
            return (held, status);
        }
        held.push(s);
    }
    panic!("the per-address cap never applied: {} admitted", held.len());
}

#[test]
fn spoofed_headers_from_an_untrusted_address_change_nothing() {
    let server = server();
    // Each claims another client; all are 127.0.0.1 to the caps.
    let (a, ok) = upgrade(&server, "127.0.0.1", b"", &xff("203.0.113.1"));
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    let (b, ok) = upgrade(&server, "127.0.0.1", b"", &xff("203.0.113.2, 127.0.0.9"));
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    let (_c, refused) = upgrade(&server, "127.0.0.1", b"", &xff("203.0.113.3"));
    assert!(
        refused.contains("429") && refused.contains("max_connections_per_ip"),
        "{refused}"
    );
    // A PROXY header from an untrusted address is not read as one: the
    // bytes are a malformed HTTP request.
    drop((a, b));
    std::thread::sleep(Duration::from_millis(200));
    let (_d, refused) = upgrade(&server, "127.0.0.1", &proxy_v2([203, 0, 113, 4]), "");
    assert!(
        refused.contains("400") && refused.contains("malformed HTTP request"),
        "{refused}"
    );
    // Garbage in X-Forwarded-For from an untrusted address is not looked at.
    let (_e, ok) = upgrade(&server, "127.0.0.1", b"", &xff("not-an-address"));
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
}

#[test]
fn x_forwarded_for_from_a_trusted_proxy_names_the_client() {
    let server = server();
    // Five clients through one proxy address: five addresses to the caps.
    let mut held = Vec::new();
    for i in 1..=5 {
        let (s, ok) = upgrade(&server, PROXY, b"", &xff(&format!("203.0.113.{i}")));
        assert!(ok.starts_with("HTTP/1.1 101"), "client {i}: {ok}");
        held.push(s);
    }
    // One of them opening more is capped as itself.
    let (more, refused) = fill(&server, PROXY, b"", &xff("203.0.113.1"));
    assert_eq!(more.len(), 1, "203.0.113.1 had one connection of its two");
    assert!(refused.contains("429"), "{refused}");
    // The list is read from the right, past trusted proxies (10/8 here):
    // what the client wrote on the left is not believed.
    let chain = |spoof: &str| xff(&format!("{spoof}, 198.51.100.7, 10.1.2.3"));
    let (_one, ok) = upgrade(&server, PROXY, b"", &chain("203.0.113.200"));
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    let (_two, ok) = upgrade(&server, PROXY, b"", &chain("203.0.113.201"));
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    let (_three, refused) = upgrade(&server, PROXY, b"", &chain("203.0.113.202"));
    assert!(
        refused.contains("429"),
        "198.51.100.7 is the client: {refused}"
    );
    // Repeated headers are one list, in order.
    let (_four, refused) = upgrade(
        &server,
        PROXY,
        b"",
        &format!("{}{}", xff("203.0.113.9"), xff("198.51.100.7")),
    );
    assert!(refused.contains("429"), "{refused}");
    // Where the client should be there is no address: 400 names the entry.
    let (_bad, refused) = upgrade(&server, PROXY, b"", &xff("203.0.113.1, unknown"));
    assert!(
        refused.contains("400") && refused.contains("X-Forwarded-For entry \"unknown\""),
        "{refused}"
    );
    // The proxy's own connection (no header) is the proxy's address.
    let (_own, ok) = upgrade(&server, PROXY, b"", "");
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    let log = server.log();
    assert!(
        log.contains("client address from a trusted proxy") && log.contains("198.51.100.7"),
        "no log line names the client"
    );
}

#[test]
fn a_proxy_protocol_header_from_a_trusted_proxy_names_the_client() {
    let server = server();
    let v2 = proxy_v2([203, 0, 113, 50]);
    let (held, refused) = fill(&server, PROXY, &v2, "");
    assert_eq!(held.len(), 2, "203.0.113.50 gets two");
    assert!(refused.contains("429"), "{refused}");
    // Another client behind the same proxy is not affected, and the PROXY
    // header wins over a forwarded header behind it.
    let (_other, ok) = upgrade(
        &server,
        PROXY,
        &proxy_v2([203, 0, 113, 51]),
        &xff("203.0.113.50"),
    );
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    // v1, as nginx's stream module sends it.
    let v1 = b"PROXY TCP4 198.51.100.60 127.0.0.1 50000 8080\r\n";
    let (held_v1, refused) = fill(&server, PROXY, v1, "");
    assert_eq!(held_v1.len(), 2);
    assert!(refused.contains("429"), "{refused}");
    // LOCAL (a health check of the proxy's own): the proxy's address.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let (_l, ok) = upgrade(&server, PROXY, &local, "");
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    // A header split over several writes is waited for.
    let mut s = tcp_from(PROXY, &server);
    let whole = [&proxy_v2([203, 0, 113, 70])[..], request("").as_bytes()].concat();
    for part in [&whole[..5], &whole[5..14], &whole[14..22], &whole[22..]] {
        s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(raw::read_head(&mut s).starts_with("HTTP/1.1 101"));
    // A broken header is refused with what is wrong.
    let mut bad = proxy_v2([203, 0, 113, 80]);
    bad[12] = 0x11;
    let (_b, refused) = upgrade(&server, PROXY, &bad, "");
    assert!(
        refused.contains("400") && refused.contains("PROXY v2 header: version 1, expected 2"),
        "{refused}"
    );
    let (_b, refused) = upgrade(&server, PROXY, b"PROXY TCP4 nobody 127.0.0.1 1 2\r\n", "");
    assert!(
        refused.contains("400") && refused.contains("PROXY v1 header"),
        "{refused}"
    );
}

#[test]
fn a_bad_trusted_proxies_value_is_refused_at_start() {
    let err = TestServer::try_start(&["--trusted-proxies", "10.0.0.1/8"], &[])
        .err()
        .expect("a range with host bits started");
    assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
}
