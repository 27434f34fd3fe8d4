//! Hostile input never crashes or stalls the server, and everyone else keeps
//! being served. Every test checks a well-behaved client (upgrade, sub, pub,
//! receive its own message) and that the process still runs, before and
//! after the hostile action. All bytes are built by hand (`common::raw`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::raw::{self, frame, read_close_code, read_frame, read_op};
use common::TestServer;

/// Longest the server may take to end TCP after a hostile client's offence
/// when the client never answers. It should be at once (RFC 6455 section
/// 7.1.7, checked in ws_conformance.rs); here only "never a hang" is
/// asserted: the default close timeout (5 s), the sweep period (1 s), slack.
const CLOSE_WITHIN: Duration = Duration::from_secs(8);

/// Ceiling for the server's resident memory while it is attacked.
const RSS_LIMIT_KIB: u64 = 200 << 10;

static HEALTH_TOPIC: AtomicU64 = AtomicU64::new(0);

/// The server still runs, and a well-behaved client is served end to end:
/// upgrade, subscribe, publish, receive its own message, clean close.
fn assert_served(server: &mut TestServer) {
    assert_running(server);
    let n = HEALTH_TOPIC.fetch_add(1, Ordering::Relaxed);
    let topic = format!("health.{n}");
    if let Err(e) = TcpStream::connect(server.addr) {
        panic!(
            "the server refuses connections ({e}) while running:\n{}",
            server.log()
        );
    }
    let mut s = raw::open(server.addr);
    send(
        &mut s,
        &[text(&format!(r#"{{"op":"sub","id":1,"topic":"{topic}"}}"#))],
    );
    let ok = read_op(&mut s, "ok");
    assert_eq!(
        (ok["id"].as_u64(), ok["topic"].as_str()),
        (Some(1), Some(topic.as_str()))
    );
    let publish = format!(r#"{{"op":"pub","id":2,"topic":"{topic}","data":{{"n":{n}}}}}"#);
    send(&mut s, &[text(&publish)]);
    let msg = read_op(&mut s, "msg");
    assert_eq!(msg["topic"], topic.as_str());
    assert_eq!(msg["data"]["n"], n);
    send(&mut s, &[frame(true, 8, &1000u16.to_be_bytes())]);
    assert_eq!(read_close_code(&mut s), Some(1000));
    assert_eq!(raw::wait_eof(&mut s, Duration::from_secs(2)), Ok(true));
    assert_running(server);
}

fn assert_running(server: &mut TestServer) {
    if let Some(status) = server.child.try_wait().expect("wait on the server") {
        panic!("the server exited: {status:?}\n{}", server.log());
    }
}

/// No connection is left: none upgraded, and none in the shards' registry
/// in any phase (handshake and closing included).
fn assert_no_connections(server: &TestServer) {
    server.wait_for("no connection left", Duration::from_secs(10), |s| {
        let m = s.metrics();
        m.get("ringcast_connections_active") == Some(&0.0)
            && m.get("ringcast_registry_connections") == Some(&0.0)
    });
}

/// Nothing is left in the shards' topic indexes, and no subscription.
fn assert_no_topics(server: &TestServer) {
    server.wait_for("topic index empty", Duration::from_secs(5), |s| {
        let m = s.metrics();
        m.get("ringcast_topic_index_entries") == Some(&0.0)
            && m.get("ringcast_topics_announced") == Some(&0.0)
            && m.get("ringcast_subscriptions_active") == Some(&0.0)
    });
}

/// The server's resident set, from /proc/PID/status.
fn rss_kib(server: &TestServer) -> u64 {
    let path = format!("/proc/{}/status", server.child.id());
    let status = std::fs::read_to_string(&path).expect("the server's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn assert_rss_bounded(server: &TestServer) {
    let rss = rss_kib(server);
    assert!(rss < RSS_LIMIT_KIB, "server RSS {} MiB", rss >> 10);
}

/// Sends frames in one write. The server may already have closed (hostile
/// input), so a failed write is fine: what it answered is still readable.
fn send(s: &mut TcpStream, frames: &[Vec<u8>]) {
    let _ = s.write_all(&frames.concat());
}

fn text(json: &str) -> Vec<u8> {
    frame(true, 1, json.as_bytes())
}

/// `n` bytes from a generator seeded with `seed`: the same bytes every run.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u8(..)).collect()
}

/// Reads frames until the server's close frame and then the end of TCP,
/// all within `within`. Returns the close code (None: TCP ended first).
fn wait_closed(s: &mut TcpStream, within: Duration) -> Option<u16> {
    let start = Instant::now();
    s.set_read_timeout(Some(within))
        .expect("set a read timeout");
    let mut code = None;
    while let Some((op, payload)) = read_frame(s) {
        assert!(start.elapsed() < within, "still open after {within:?}");
        if op == 8 {
            code = Some(
                payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
            );
            break;
        }
    }
    let left = within.saturating_sub(start.elapsed());
    if code.is_some() {
        raw::wait_eof(s, left).unwrap_or_else(|e| panic!("after the close frame: {e}"));
    }
    assert!(
        start.elapsed() < within,
        "the server did not end TCP within {within:?}"
    );
    code
}

#[test]
fn random_bytes_instead_of_a_handshake() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let prefixes: [&[u8]; 3] = [
        b"",
        b"GET /ws HTTP/1.1\r\n",
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n",
    ];
    for (seed, prefix) in (1..).zip(prefixes.iter().cycle().take(6)) {
        let mut bytes = prefix.to_vec();
        bytes.extend(random_bytes(seed, 64 << 10));
        let mut s = TcpStream::connect(server.addr).unwrap();
        let _ = s.write_all(&bytes);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        let end = s.read_to_end(&mut answer);
        assert!(
            end.is_ok()
                || end
                    .as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "seed {seed}: the server neither answered nor closed: {end:?}"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 400 ")
                || answer.starts_with("HTTP/1.1 431 "),
            "seed {seed}: {answer:?}"
        );
        assert!(
            !answer.contains(" 101 "),
            "seed {seed}: upgraded on garbage"
        );
    }
    assert!(server.metric("ringcast_handshake_failures_total{status=\"400\"}") >= 1.0);
    assert_no_connections(&server);
    assert_served(&mut server);
}

#[test]
fn random_bytes_after_the_upgrade() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    // 192 KiB: more than any frame the 64 KiB limit lets the server wait for,
    // so no seed can leave it legitimately waiting for the rest of a frame.
    let mut conns: Vec<(u64, TcpStream)> = (1..=12)
        .map(|seed| (seed, raw::open(server.addr)))
        .collect();
    for (seed, s) in &mut conns {
        let _ = s.write_all(&random_bytes(*seed, 192 << 10));
    }
    let mut codes = Vec::new();
    for (seed, s) in &mut conns {
        let code = wait_closed(s, CLOSE_WITHIN);
        assert!(
            code.is_none_or(|c| [1000, 1002, 1007, 1009].contains(&c) || (3000..5000).contains(&c)),
            "seed {seed}: close {code:?}"
        );
        codes.push(code);
    }
    assert!(
        codes.iter().any(|c| matches!(c, Some(1002 | 1007 | 1009))),
        "{codes:?}"
    );
    drop(conns);
    assert_no_connections(&server);
    assert_served(&mut server);
}

#[test]
fn truncated_frames_then_eof_are_cleaned_up() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let mut fragment_then_half = frame(false, 1, br#"{"op":"#);
    fragment_then_half.extend(&frame(true, 0, br#""ping"}"#)[..8]);
    let cases: Vec<Vec<u8>> = vec![
        vec![0x81],
        vec![0x81, 0xFE, 0x01],
        vec![0x82, 0xFF, 0, 0, 0, 0],
        vec![0x81, 0x85, 1, 2],
        frame(true, 1, br#"{"op":"ping","id":1}"#)[..9].to_vec(),
        frame(true, 8, &1000u16.to_be_bytes())[..7].to_vec(),
        fragment_then_half,
    ];
    let accepted = server.metric("ringcast_connections_accepted_total");
    // Half-closed: the server must see EOF and end the connection itself.
    for bytes in &cases {
        let mut s = raw::open(server.addr);
        send(&mut s, std::slice::from_ref(bytes));
        s.shutdown(Shutdown::Write).unwrap();
        let end = raw::wait_eof(&mut s, Duration::from_secs(2));
        assert!(end.is_ok(), "{bytes:02x?}: {end:?}");
    }
    // Dropped outright, all at once.
    let dropped: Vec<TcpStream> = cases
        .iter()
        .map(|bytes| {
            let mut s = raw::open(server.addr);
            send(&mut s, std::slice::from_ref(bytes));
            s
        })
        .collect();
    server.wait_for(
        "all truncated connections accepted",
        Duration::from_secs(5),
        |s| s.metric("ringcast_connections_accepted_total") >= accepted + 2.0 * cases.len() as f64,
    );
    drop(dropped);
    assert_no_connections(&server);
    assert_served(&mut server);
}

#[test]
fn length_of_2_pow_63_minus_1_is_1009_without_allocating() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let mut header = vec![0x82, 0xFF];
    header.extend((u64::MAX >> 1).to_be_bytes());
    header.extend([0x37, 0xfa, 0x21, 0x3d]);
    let mut continued = frame(false, 1, b"[");
    let at = continued.len();
    continued.extend(&header);
    continued[at] = 0x80; // a final continuation, not binary
    for bytes in [&header, &continued] {
        let mut conns: Vec<TcpStream> = (0..8).map(|_| raw::open(server.addr)).collect();
        for s in &mut conns {
            send(s, std::slice::from_ref(bytes));
        }
        for s in &mut conns {
            let sent = Instant::now();
            assert_eq!(read_close_code(s), Some(1009));
            assert!(
                sent.elapsed() < Duration::from_secs(2),
                "1009 after {:?}",
                sent.elapsed()
            );
            send(s, &[frame(true, 8, &1009u16.to_be_bytes())]);
            assert!(raw::wait_eof(s, Duration::from_secs(2)).is_ok());
        }
        assert_rss_bounded(&server);
    }
    assert_no_connections(&server);
    assert_rss_bounded(&server);
    assert_served(&mut server);
}

#[test]
fn length_with_its_most_significant_bit_set_is_refused() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    for len in [1u64 << 63, u64::MAX] {
        let mut s = raw::open(server.addr);
        let mut bytes = vec![0x82, 0xFF];
        bytes.extend(len.to_be_bytes());
        bytes.extend([0x37, 0xfa, 0x21, 0x3d]);
        send(&mut s, &[bytes]);
        let code = read_close_code(&mut s);
        assert!(
            matches!(code, Some(1002 | 1009)),
            "length {len:#x}: close {code:?}"
        );
        send(&mut s, &[frame(true, 8, &1002u16.to_be_bytes())]);
        assert!(raw::wait_eof(&mut s, Duration::from_secs(2)).is_ok());
    }
    assert_no_connections(&server);
    assert_rss_bounded(&server);
    assert_served(&mut server);
}

#[test]
fn slowloris_handshakes_are_closed_by_the_handshake_timeout() {
    let mut server = TestServer::start(&["--handshake-timeout", "1s"]);
    assert_served(&mut server);
    let upgrade = raw::UPGRADE.as_bytes();
    let started = Instant::now();
    let mut slow: Vec<Option<TcpStream>> = (0..50)
        .map(|_| {
            let s = TcpStream::connect(server.addr).unwrap();
            s.set_nonblocking(true).unwrap();
            Some(s)
        })
        .collect();
    let mut closed_after = Vec::new();
    let mut answers: Vec<Vec<u8>> = vec![Vec::new(); slow.len()];
    let mut served_meanwhile = false;
    let mut next = 0;
    while closed_after.len() < slow.len() && started.elapsed() < Duration::from_secs(5) {
        for (slot, answer) in slow.iter_mut().zip(&mut answers) {
            let Some(s) = slot else { continue };
            // The answer, then EOF (or a reset: the client kept writing).
            let ended = read_available(s, answer);
            let gone = ended || s.write(&upgrade[next % upgrade.len()..][..1]).is_err();
            if gone && !ended {
                // The write failed: what came before the reset is still readable.
                read_available(s, answer);
            }
            if gone {
                closed_after.push(started.elapsed());
                *slot = None;
            }
        }
        next += 1;
        if next == 3 {
            // The registry holds connections still in the handshake.
            let m = server.metrics();
            assert!(m["ringcast_registry_connections"] >= 50.0, "{m:?}");
            assert_eq!(m["ringcast_connections_active"], 0.0);
            // While 50 connections trickle, a normal client gets through.
            assert_served(&mut server);
            served_meanwhile = true;
        }
        std::thread::sleep(Duration::from_millis(200)); // the slowloris pace
    }
    assert_running(&mut server);
    assert_eq!(
        closed_after.len(),
        50,
        "still open after 5 s: {}",
        50 - closed_after.len()
    );
    let last = closed_after.iter().max().unwrap();
    assert!(*last < Duration::from_secs(3), "last closed after {last:?}");
    assert!(
        served_meanwhile,
        "no normal client was served during the attack"
    );
    assert!(next < upgrade.len(), "the slow upgrade must never complete");
    // Every handshake error is an HTTP answer with a one-line reason.
    for (i, answer) in answers.iter().enumerate() {
        let answer = String::from_utf8_lossy(answer);
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "connection {i}: {answer:?}"
        );
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_eq!(
            body, "request head not received in time\n",
            "connection {i}"
        );
    }
    assert_eq!(
        server.metric("ringcast_handshake_failures_total{status=\"408\"}"),
        50.0
    );
    assert_no_connections(&server);
    assert_served(&mut server);
}

/// Reads what a non-blocking socket has into `into`; true once the server
/// has ended the connection (EOF or reset).
fn read_available(s: &mut TcpStream, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

#[test]
fn deeply_nested_json_is_4000_and_the_connection_stays_open() {
    let mut server = TestServer::start(&[
        "--max-message-size",
        "512KiB",
        "--max-publish-size",
        "512KiB",
    ]);
    assert_served(&mut server);
    let mut s = raw::open(server.addr);
    send(&mut s, &[text(r#"{"op":"sub","id":1,"topic":"deep"}"#)]);
    read_op(&mut s, "ok");
    let open = "[".repeat(100_000);
    let balanced = format!("{open}{}", "]".repeat(100_000));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(50_000), "}".repeat(50_000));
    let bombs = [
        format!(r#"{{"op":"pub","id":2,"topic":"deep","data":{open}"#),
        format!(r#"{{"op":"pub","id":3,"topic":"deep","data":{balanced}}}"#),
        format!(r#"{{"op":"pub","id":4,"topic":"deep","data":{objects}}}"#),
        open.clone(),
        format!(r#"{{"op":"ping","id":5,"x":{open}"#),
    ];
    for (i, bomb) in bombs.iter().enumerate() {
        send(&mut s, &[text(bomb)]);
        let err = read_op(&mut s, "error");
        assert_eq!(err["code"], 4000, "bomb {i}: {err}");
        send(&mut s, &[text(r#"{"op":"ping","id":99}"#)]);
        let (op, payload) = read_frame(&mut s).expect("the connection stays open");
        let pong: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            (op, pong["op"].as_str()),
            (1, Some("pong")),
            "bomb {i}: no message published"
        );
    }
    assert_running(&mut server);
    assert_eq!(
        server.metric("ringcast_messages_published_total"),
        1.0,
        "only the health check's"
    );
    drop(s);
    assert_served(&mut server);
}

#[test]
fn one_mib_string_is_1009() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let mut s = raw::open(server.addr);
    let big = format!(
        r#"{{"op":"pub","id":1,"topic":"big","data":"{}"}}"#,
        "a".repeat(1 << 20)
    );
    let bytes = text(&big);
    let mut writer = s.try_clone().unwrap();
    let write = std::thread::spawn(move || {
        let _ = writer.write_all(&bytes);
    });
    let sent = Instant::now();
    assert_eq!(read_close_code(&mut s), Some(1009));
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "1009 after {:?}",
        sent.elapsed()
    );
    write.join().unwrap();
    assert!(raw::wait_eof(&mut s, CLOSE_WITHIN).is_ok());
    drop(s);
    assert_no_connections(&server);
    assert_rss_bounded(&server);
    assert_served(&mut server);
}

#[test]
fn invalid_json_of_every_kind_is_4000_and_the_connection_stays_open() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let long_topic = format!(r#"{{"op":"sub","topic":"{}"}}"#, "a".repeat(300));
    let cases: Vec<&str> = vec![
        "",
        "   ",
        "{",
        "}",
        "[]",
        "null",
        "42",
        r#""ping""#,
        r#"{"op":}"#,
        r#"{"op":"ping",}"#,
        "{'op':'ping'}",
        r#"{"op":"ping"} trailing"#,
        r#"{"op":"ping"}{"op":"ping"}"#,
        "\u{feff}{\"op\":\"ping\"}",
        "{\"op\":\"ping\"\u{0}}",
        r#"{}"#,
        r#"{"op":null}"#,
        r#"{"op":1}"#,
        r#"{"op":["ping"]}"#,
        r#"{"op":"nope"}"#,
        r#"{"op":"\ud800"}"#,
        r#"{"op":"\x"}"#,
        r#"{"op":"ping","op":"sub"}"#,
        r#"{"op":"ping","id":-1}"#,
        r#"{"op":"ping","id":1.5}"#,
        r#"{"op":"ping","id":1e400}"#,
        r#"{"op":"ping","id":"7"}"#,
        r#"{"op":"ping","id":9007199254740992}"#,
        r#"{"op":"ping","id":18446744073709551616}"#,
        r#"{"op":"sub"}"#,
        r#"{"op":"sub","topic":""}"#,
        r#"{"op":"sub","topic":"a b"}"#,
        r#"{"op":"sub","topic":7}"#,
        &long_topic,
        r#"{"op":"sub","topic":"t","since":"yesterday"}"#,
        r#"{"op":"pub","topic":"t"}"#,
        r#"{"op":"pub","topic":"t","data":}"#,
        r#"{"op":"pub","topic":"t","data":NaN}"#,
        r#"{"op":"pub","topic":"t","data":[1,]}"#,
        r#"{"op":"pub","topic":"t","data":"unterminated}"#,
    ];
    // All pipelined in one write; the replies come back in order.
    let frames: Vec<Vec<u8>> = cases.iter().map(|c| text(c)).collect();
    let mut s = raw::open(server.addr);
    send(&mut s, &frames);
    send(&mut s, &[text(r#"{"op":"ping","id":1}"#)]);
    for case in &cases {
        let (op, payload) = read_frame(&mut s).unwrap_or_else(|| panic!("closed after {case:?}"));
        assert_eq!(op, 1, "{case:?}");
        let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            (reply["op"].as_str(), reply["code"].as_u64()),
            (Some("error"), Some(4000)),
            "{case:?} -> {reply}"
        );
    }
    assert_eq!(
        read_op(&mut s, "pong")["id"],
        1,
        "the connection stays open"
    );
    assert_eq!(
        server.metric("ringcast_client_disconnects_total{reason=\"protocol\"}"),
        0.0
    );
    assert_served(&mut server);
}

#[test]
fn ten_thousand_subscriptions_stop_at_max_subscriptions() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let mut s = raw::open(server.addr);
    let mut bytes = Vec::new();
    for id in 1..=10_000u32 {
        bytes.extend(text(&format!(
            r#"{{"op":"sub","id":{id},"topic":"many.{id}"}}"#
        )));
    }
    let mut writer = s.try_clone().unwrap();
    let write = std::thread::spawn(move || writer.write_all(&bytes));
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    while ok.len() + refused.len() < 10_000 {
        let (op, payload) = read_buffered_frame(&mut reader)
            .unwrap_or_else(|| panic!("closed after {} ok, {} errors", ok.len(), refused.len()));
        assert_eq!(op, 1);
        let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let id = reply["id"].as_u64().unwrap_or_else(|| panic!("{reply}"));
        match reply["op"].as_str() {
            Some("ok") => ok.push(id),
            Some("error") => {
                assert_eq!(reply["code"], 4013, "{reply}");
                refused.push(id);
            }
            _ => panic!("{reply}"),
        }
    }
    write.join().unwrap().unwrap();
    ok.sort_unstable();
    refused.sort_unstable();
    assert_eq!(
        ok,
        (1..=1024).collect::<Vec<u64>>(),
        "exactly the first 1024 succeed"
    );
    assert_eq!(refused, (1025..=10_000).collect::<Vec<u64>>());
    assert_eq!(server.metric("ringcast_subscriptions_active"), 1024.0);
    send(&mut s, &[text(r#"{"op":"ping","id":1}"#)]);
    assert_eq!(
        read_op(&mut s, "pong")["id"],
        1,
        "the connection stays open"
    );
    assert_eq!(server.metric("ringcast_topic_index_entries"), 1024.0);
    drop((s, reader));
    assert_no_topics(&server);
    assert_served(&mut server);
}

/// `raw::read_frame` over a buffered reader, for long reply streams.
fn read_buffered_frame(r: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).ok()?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            r.read_exact(&mut l).ok()?;
            u64::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            r.read_exact(&mut l).ok()?;
            u64::from_be_bytes(l)
        }
        n => u64::from(n),
    };
    let mut p = vec![0u8; usize::try_from(len).ok()?];
    r.read_exact(&mut p).ok()?;
    Some((h[0] & 0x0f, p))
}

#[test]
fn five_thousand_connect_subscribe_leave_cycles_leak_nothing() {
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let addr = server.addr;
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..1250u32 {
                    let mut s = raw::open(addr);
                    let sub = format!(r#"{{"op":"sub","id":{i},"topic":"cycle.{}"}}"#, i % 16);
                    send(&mut s, &[text(&sub)]);
                    assert_eq!(read_op(&mut s, "ok")["id"], i, "thread {t} cycle {i}");
                    match i % 3 {
                        0 => {
                            send(&mut s, &[frame(true, 8, &1000u16.to_be_bytes())]);
                            assert_eq!(read_close_code(&mut s), Some(1000));
                            assert_eq!(raw::wait_eof(&mut s, Duration::from_secs(2)), Ok(true));
                        }
                        1 => drop(s), // FIN without a close frame
                        _ => {
                            // RST: linger 0 discards the socket at once.
                            socket2::SockRef::from(&s)
                                .set_linger(Some(Duration::ZERO))
                                .unwrap();
                            drop(s);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_no_connections(&server);
    assert_no_topics(&server);
    assert!(server.metric("ringcast_connections_accepted_total") >= 5000.0);
    assert_rss_bounded(&server);
    assert_served(&mut server);
}

#[test]
fn ping_flood_from_a_client_that_never_reads_stays_bounded() {
    // A regression test (it failed at 142f7cb): every pong was queued,
    // however many. 64 MiB of pings from one client that never reads left
    // 516,096 pongs (~66 MB) in its outbound queue, RSS grew by ~75 MB, and
    // no 4009 came: Shard::queue() (src/shard/mod.rs) appended replies and
    // control frames without the --outbound-queue check that only
    // Shard::queue_msg() made, so one connection could take all the memory.
    let mut server = TestServer::start(&[]);
    assert_served(&mut server);
    let before = rss_kib(&server);
    let s = raw::open(server.addr);
    let batch = frame(true, 9, &[b'p'; 125]).repeat(4096);
    let mut writer = s.try_clone().unwrap();
    // A server that stops reading instead (backpressure) must not hang the test.
    writer
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let flood = std::thread::spawn(move || {
        for _ in 0..(64 << 20) / batch.len() {
            if writer.write_all(&batch).is_err() {
                break; // closed by the server: what this test hopes for
            }
        }
    });
    let start = Instant::now();
    let mut peak = before;
    while !flood.is_finished() && start.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_kib(&server));
        std::thread::sleep(Duration::from_millis(20));
    }
    flood.join().unwrap();
    peak = peak.max(rss_kib(&server));
    assert_running(&mut server);
    // --outbound-queue (1 MiB) plus socket buffers, with room to spare.
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 32 << 10,
        "RSS grew by {} MiB for one client's pongs",
        grown >> 10
    );
    let mut reader = std::io::BufReader::new(s);
    let mut pongs = 0u64;
    let end = loop {
        match read_buffered_frame(&mut reader) {
            Some((0xA, _)) => pongs += 1,
            Some((8, p)) => break p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
            Some((op, _)) => panic!("opcode {op} in a pong flood"),
            None => break None,
        }
    };
    assert_eq!(
        end,
        Some(4009),
        "after {pongs} pongs: outbound queue over its bound"
    );
    drop(reader);
    assert_no_connections(&server);
    assert_served(&mut server);
}
