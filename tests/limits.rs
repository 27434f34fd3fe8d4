//! Abuse limits through the real server: inbound frame and byte rates
//! (4008) charged on every frame, connection caps per node and per shard
//! (503) and per address (429) counted from accept, upgrades per second
//! (429), and their order; everyone else keeps being served.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{raw, TestServer};
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

static HEALTH_TOPIC: AtomicU64 = AtomicU64::new(0);

/// A TCP connection to `server` from source address `from`, sending nothing yet.
fn tcp_from(from: &str, server: &TestServer) -> TcpStream {
    raw::connect_from(from, server.addr)
}

/// Sends the upgrade request on `s` and reads the welcome; on refusal,
/// the whole HTTP response.
fn upgrade(s: &mut TcpStream) -> Result<(), String> {
    s.write_all(raw::UPGRADE.as_bytes()).unwrap();
    let head = raw::read_head(s);
    if !head.starts_with("HTTP/1.1 101") {
        let body = raw::read_to_end(s);
        return Err(head + &String::from_utf8_lossy(&body));
    }
    raw::read_op(s, "welcome");
    Ok(())
}

/// An upgraded raw connection is served end to end: sub, pub, its own message.
fn assert_served_on(s: &mut TcpStream) {
    let n = HEALTH_TOPIC.fetch_add(1, Ordering::Relaxed);
    let topic = format!("health.{n}");
    let sub = format!(r#"{{"op":"sub","id":1,"topic":"{topic}"}}"#);
    s.write_all(&raw::frame(true, 1, sub.as_bytes())).unwrap();
    assert_eq!(raw::read_op(s, "ok")["topic"], topic.as_str());
    let publish = format!(r#"{{"op":"pub","id":2,"topic":"{topic}","data":{{"n":{n}}}}}"#);
    s.write_all(&raw::frame(true, 1, publish.as_bytes()))
        .unwrap();
    assert_eq!(raw::read_op(s, "msg")["data"]["n"], n);
}

/// A new client from address `from` is admitted and served.
fn assert_served_from(server: &TestServer, from: &str) {
    let mut s = tcp_from(from, server);
    if let Err(why) = upgrade(&mut s) {
        panic!("a client from {from} was refused: {why}");
    }
    assert_served_on(&mut s);
}

/// A connected client is still served: ping, and its own message back.
fn assert_client_served(c: &mut Client) {
    assert_eq!(c.request(json!({"op": "ping"})).unwrap().0["op"], "pong");
    let n = HEALTH_TOPIC.fetch_add(1, Ordering::Relaxed);
    let topic = format!("health.{n}");
    c.subscribe(&topic, None).unwrap();
    c.publish(&topic, &json!(n)).unwrap();
    loop {
        match c.recv(Duration::from_secs(5)).unwrap() {
            Event::Msg { topic: t, data, .. } if t == topic => {
                assert_eq!(data, json!(n));
                return;
            }
            Event::Close(code, why) => panic!("closed {code} {why}"),
            _ => {}
        }
    }
}

/// Opens `n` connections from `from` that never send a request. Returns
/// those still open a moment later, and the responses of those refused at
/// once.
fn idle_sockets(server: &TestServer, from: &str, n: usize) -> (Vec<TcpStream>, Vec<String>) {
    let socks: Vec<TcpStream> = (0..n).map(|_| tcp_from(from, server)).collect();
    let (mut held, mut refused) = (Vec::new(), Vec::new());
    for mut s in socks {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let head = raw::read_head(&mut s);
        if head.is_empty() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            held.push(s);
        } else {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let body = raw::read_to_end(&mut s);
            refused.push(head + &String::from_utf8_lossy(&body));
        }
    }
    (held, refused)
}

/// Keeps sending `frame` (20 at a time) until the server closes; returns
/// the close code and reason.
fn flood_until_closed(c: &mut TcpStream, frame: &[u8]) -> (u16, String) {
    let started = Instant::now();
    let batch = frame.repeat(20);
    loop {
        let _ = c.write_all(&batch);
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        while let Some((op, p)) = raw::read_frame(c) {
            if op == 8 {
                let code = u16::from_be_bytes([p[0], p[1]]);
                return (code, String::from_utf8_lossy(&p[2..]).into_owned());
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    }
}

/// One reply: `Ok(kind)` for a normal answer ("pong" for a pong frame,
/// else the JSON `op` and `code`), `Err(reason)` for error 4008.
fn reply(c: &mut TcpStream) -> Result<String, (Option<u64>, String)> {
    loop {
        let (op, payload) = raw::read_frame(c).expect("a reply");
        match op {
            0xA => return Ok("pong".into()),
            1 => {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                if v["op"] == "error" && v["code"] == 4008 {
                    let reason = v["reason"].as_str().unwrap().to_string();
                    return Err((v["id"].as_u64(), reason));
                }
                return Ok(format!("{} {}", v["op"].as_str().unwrap(), v["code"]));
            }
            _ => {}
        }
    }
}

#[test]
fn a_client_over_its_rate_gets_4008_errors_then_is_closed() {
    let server = TestServer::start(&["--inbound-rate", "10", "--inbound-burst", "20"]);
    let mut c = raw::open(server.addr);
    // 50 pings at once: the burst (20) is answered, the rest get 4008.
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend(raw::frame(
            true,
            1,
            format!(r#"{{"op":"ping","id":{i}}}"#).as_bytes(),
        ));
    }
    c.write_all(&batch).unwrap();
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 50 {
        match reply(&mut c) {
            Ok(kind) => {
                assert_eq!(kind, "pong null");
                pongs += 1;
            }
            Err((id, reason)) => {
                assert!(id.is_some(), "the error keeps the request id: {reason}");
                assert!(reason.contains("inbound_rate 10 frames/s"), "{reason}");
                limited += 1;
            }
        }
    }
    assert!((20..=22).contains(&pongs), "pongs {pongs}");
    // A polite client on the same server is unaffected.
    let mut polite = Client::connect(&server.url()).unwrap();
    assert_client_served(&mut polite);
    // Staying over the rate for 5 s closes the connection with 4008.
    let started = Instant::now();
    let (code, reason) = flood_until_closed(&mut c, &raw::frame(true, 1, br#"{"op":"ping"}"#));
    assert_eq!(
        (code, reason.as_str()),
        (4008, "rate limited: over inbound_rate for 5 s")
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    server.wait_for("rate_limited disconnect", Duration::from_secs(3), |s| {
        s.metric("ringcast_client_disconnects_total{reason=\"rate_limited\"}") >= 1.0
    });
    assert_client_served(&mut polite);
}

#[test]
fn every_inbound_frame_counts_toward_the_rate_pings_and_garbage_too() {
    let server = TestServer::start(&["--inbound-rate", "10", "--inbound-burst", "20"]);
    let mut c = raw::open(server.addr);
    // Unparsable text, an unknown op, a binary frame and a WebSocket ping,
    // 15 of each: every one is answered (pong, 4000) or refused (4008).
    let mut batch = Vec::new();
    for i in 0..15 {
        batch.extend(raw::frame(true, 1, b"not json"));
        batch.extend(raw::frame(
            true,
            1,
            format!(r#"{{"op":"nope","id":{i}}}"#).as_bytes(),
        ));
        batch.extend(raw::frame(true, 2, b"\x00\x01"));
        batch.extend(raw::frame(true, 9, format!("p{i}").as_bytes()));
    }
    c.write_all(&batch).unwrap();
    let (mut served, mut limited) = (0, 0);
    for _ in 0..60 {
        match reply(&mut c) {
            Ok(kind) => {
                assert!(kind == "pong" || kind == "error 4000", "{kind}");
                served += 1;
            }
            Err((_, reason)) => {
                assert!(reason.contains("inbound_rate"), "{reason}");
                limited += 1;
            }
        }
    }
    assert!(
        (20..=22).contains(&served),
        "{served} served, {limited} refused"
    );
    // Refused unknown ops keep their id.
    c.write_all(&raw::frame(true, 1, br#"{"op":"nope","id":99}"#))
        .unwrap();
    assert_eq!(reply(&mut c).unwrap_err().0, Some(99));
    let mut polite = Client::connect(&server.url()).unwrap();
    assert_client_served(&mut polite);
    // A flood of WebSocket pings is closed like any other flood.
    let (code, _) = flood_until_closed(&mut c, &raw::frame(true, 9, b"ping"));
    assert_eq!(code, 4008);
    assert_client_served(&mut polite);
}

#[test]
fn the_bytes_rate_limits_large_messages() {
    let server = TestServer::start(&[
        "--inbound-bytes-rate",
        "1KiB",
        "--inbound-bytes-burst",
        "4KiB",
        "--max-message-size",
        "4KiB",
    ]);
    let mut c = raw::open(server.addr);
    // Ten publishes of about 1 KiB: the 4 KiB burst takes three of them.
    let data = "x".repeat(1000);
    let mut batch = Vec::new();
    for i in 0..10 {
        let publish = format!(r#"{{"op":"pub","id":{i},"topic":"big","data":"{data}"}}"#);
        batch.extend(raw::frame(true, 1, publish.as_bytes()));
    }
    c.write_all(&batch).unwrap();
    let (mut published, mut limited) = (0, 0);
    for _ in 0..10 {
        match reply(&mut c) {
            Ok(kind) => {
                assert_eq!(kind, "ok null");
                published += 1;
            }
            Err((id, reason)) => {
                assert!(id.is_some(), "{reason}");
                assert!(
                    reason.contains("inbound_bytes_rate 1024 bytes/s (burst 4096)"),
                    "{reason}"
                );
                limited += 1;
            }
        }
    }
    assert!((3..=4).contains(&published), "{published} published");
    assert_eq!(published + limited, 10);
    // Small frames still pass the byte bucket once it has refilled a little.
    std::thread::sleep(Duration::from_millis(300));
    c.write_all(&raw::frame(true, 1, br#"{"op":"ping","id":1}"#))
        .unwrap();
    assert_eq!(reply(&mut c).unwrap(), "pong null");
    let mut polite = Client::connect(&server.url()).unwrap();
    assert_client_served(&mut polite);
    // Persistently over the byte rate: closed with 4008, naming it.
    let (code, reason) = flood_until_closed(&mut c, &raw::frame(true, 2, &[0u8; 1000]));
    assert_eq!(
        (code, reason.as_str()),
        (4008, "rate limited: over inbound_bytes_rate for 5 s")
    );
    assert_client_served(&mut polite);
}

fn status_of(server: &TestServer) -> String {
    match Client::connect(&server.url()) {
        Err(ClientError::Refused(why)) => why,
        Ok(_) => "accepted".into(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_node_connection_cap_answers_503_and_frees_up() {
    let server = TestServer::start(&["--max-connections", "3"]);
    let mut held: Vec<Client> = (0..3)
        .map(|_| Client::connect(&server.url()).unwrap())
        .collect();
    let why = status_of(&server);
    assert!(
        why.contains("503") && why.contains("max_connections"),
        "{why}"
    );
    // Those already in are still served.
    for c in &mut held {
        assert_client_served(c);
    }
    drop(held);
    server.wait_for("connections released", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
    let mut c = Client::connect(&server.url()).unwrap();
    assert_client_served(&mut c);
}

#[test]
fn the_per_address_cap_answers_429() {
    // 2 shards: each admits its share, ceil(4 / 2) = 2 per shard.
    let server = TestServer::start(&["--max-connections-per-ip", "4"]);
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..12 {
        match Client::connect(&server.url()) {
            Ok(c) => held.push(c),
            Err(ClientError::Refused(why)) => {
                refused = Some(why);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let why = refused.expect("the cap never applied");
    assert!(
        why.contains("429") && why.contains("max_connections_per_ip"),
        "{why}"
    );
    assert!(
        held.len() >= 2 && held.len() <= 4,
        "{} admitted",
        held.len()
    );
    assert!(server.metric("ringcast_handshake_failures_total{status=\"429\"}") >= 1.0);
    // Another address is served, and so are the connections already in.
    assert_served_from(&server, "127.0.0.2");
    for c in &mut held {
        assert_client_served(c);
    }
}

#[test]
fn upgrades_per_address_are_rate_limited_with_429() {
    // 2 shards: each admits 5 per second.
    let server = TestServer::start(&["--max-handshakes-per-ip", "10"]);
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..40 {
        match Client::connect(&server.url()) {
            Ok(c) => {
                admitted += 1;
                drop(c);
            }
            Err(ClientError::Refused(why)) => {
                refused = Some(why);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let why = refused.expect("never limited");
    assert!(
        why.contains("429") && why.contains("max_handshakes_per_ip"),
        "{why}"
    );
    assert!((5..=12).contains(&admitted), "{admitted} admitted");
    // Another address has its own budget: it is served at once.
    assert_served_from(&server, "127.0.0.2");
    // The budget refills: a second later, upgrades pass again.
    std::thread::sleep(Duration::from_millis(1200));
    let mut c = Client::connect(&server.url()).unwrap();
    assert_client_served(&mut c);
}

#[test]
fn sockets_that_never_upgrade_count_toward_the_per_address_cap() {
    // 2 per shard. Twenty sockets that send nothing: four are held (two per
    // shard), the rest are answered 429 at once instead of lingering until
    // the handshake timeout.
    let server = TestServer::start(&["--max-connections-per-ip", "4"]);
    let (mut held, refused) = idle_sockets(&server, "127.0.0.1", 20);
    assert_eq!(held.len(), 4, "refused: {refused:?}");
    for r in &refused {
        assert!(
            r.starts_with("HTTP/1.1 429") && r.contains("max_connections_per_ip"),
            "{r}"
        );
    }
    // While they are held the address gets 429; another address is served.
    assert!(status_of(&server).contains("429"));
    assert_served_from(&server, "127.0.0.2");
    // A held socket that finally sends its request is served.
    upgrade(&mut held[0]).unwrap();
    assert_served_on(&mut held[0]);
    // Once they go, the address is admitted again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_of(&server) != "accepted" {
        assert!(Instant::now() < deadline, "the address stayed refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_served_from(&server, "127.0.0.1");
}

#[test]
fn sockets_that_never_upgrade_count_toward_the_node_cap() {
    let server = TestServer::start(&["--max-connections", "3"]);
    let (mut held, refused) = idle_sockets(&server, "127.0.0.1", 3);
    assert_eq!((held.len(), refused.len()), (3, 0), "{refused:?}");
    let why = status_of(&server);
    assert!(
        why.contains("503") && why.contains("max_connections"),
        "{why}"
    );
    let (more, refused) = idle_sockets(&server, "127.0.0.2", 2);
    assert!(more.is_empty(), "{refused:?}");
    assert!(
        refused.iter().all(|r| r.starts_with("HTTP/1.1 503")),
        "{refused:?}"
    );
    // The held sockets may still upgrade, and are served.
    for s in &mut held {
        upgrade(s).unwrap();
    }
    assert_served_on(&mut held[2]);
    drop(held);
    server.wait_for("connections released", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
    assert_served_from(&server, "127.0.0.1");
}

#[test]
fn the_shard_connection_cap_answers_503() {
    // 2 shards, 2 connections each, counted from accept.
    let server = TestServer::start(&["--max-connections-per-shard", "2"]);
    let (mut held, refused) = idle_sockets(&server, "127.0.0.1", 20);
    assert_eq!(held.len(), 4, "refused: {refused:?}");
    for r in &refused {
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("max_connections_per_shard"),
            "{r}"
        );
    }
    upgrade(&mut held[0]).unwrap();
    assert_served_on(&mut held[0]);
    // One place frees up: a new client lands on that shard within a few tries.
    held.truncate(3);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = tcp_from("127.0.0.2", &server);
        match upgrade(&mut s) {
            Ok(()) => {
                assert_served_on(&mut s);
                break;
            }
            Err(why) => assert!(why.starts_with("HTTP/1.1 503"), "{why}"),
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
    }
}

#[test]
fn too_many_from_one_address_is_429_before_the_node_is_full_503() {
    // docs/PROTOCOL.md section 1 orders 429 before 503. One shard, one
    // connection, one upgrade per second.
    let server = TestServer::start(&[
        "--shards",
        "1",
        "--max-connections",
        "1",
        "--max-handshakes-per-ip",
        "1",
    ]);
    let mut first = Client::connect(&server.url()).unwrap();
    // Full and out of upgrades: 429.
    let why = status_of(&server);
    assert!(
        why.contains("429") && why.contains("max_handshakes_per_ip"),
        "{why}"
    );
    // A second later the budget is back; only the node is full: 503.
    std::thread::sleep(Duration::from_millis(1100));
    let why = status_of(&server);
    assert!(
        why.contains("503") && why.contains("max_connections"),
        "{why}"
    );
    assert_client_served(&mut first);
    drop(first);
    server.wait_for("connection released", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
    let mut c = Client::connect(&server.url()).unwrap();
    assert_client_served(&mut c);
}
