//! The Rust client's reconnect rules (docs/PROTOCOL.md sections 2 to 4):
//! `drain` sets when it comes back, 1000 and 4003 end it, and a connection
//! cut while the same server runs is recovered with `since` + `epoch`, with
//! no gap and no duplicate, from the last `msg` or, on a quiet topic, from
//! the `last` of the `sub`'s `ok` (`ringcast subscribe` included). A `sub`
//! refused with 4503 is retried; one refused for good, or ended by the
//! server, is dropped and surfaced. The server side is either a hand-built
//! fake (every byte written here; it answers the key the client sent) or
//! the real binary behind an in-test TCP proxy that the test can cut.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestServer;
use ringcast::client::{Client, ClientError, Event, Reconnecting};
use serde_json::json;

/// A server frame (unmasked, FIN, payload under 126 bytes).
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

fn text(json: &serde_json::Value) -> Vec<u8> {
    server_frame(1, json.to_string().as_bytes())
}

fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    server_frame(8, &p)
}

/// Reads an upgrade request and answers it: 101 with the accept of the key
/// the client sent (RFC 6455 section 4.2.2), then `welcome`. Returns the
/// reader, positioned at the client's first frame.
fn upgrade(s: &mut TcpStream) -> Option<BufReader<TcpStream>> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let (mut line, mut key) = (String::new(), String::new());
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        if let Some(k) = line.strip_prefix("Sec-WebSocket-Key: ") {
            key = k.trim().to_string();
        }
        line.clear();
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    let welcome = json!({"op": "welcome", "conn": "c-0-1", "node": "fake", "heartbeat": 25});
    let mut out = head.into_bytes();
    out.extend(text(&welcome));
    s.write_all(&out).ok()?;
    Some(reader)
}

/// A fake ringcast server: the n-th connection is upgraded, welcomed, sent
/// `scripts[n]` (connections past the scripts get nothing more) and kept
/// open until the client leaves. Each accept is reported on the channel.
fn fake_server(scripts: Vec<Vec<Vec<u8>>>) -> (SocketAddr, mpsc::Receiver<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut scripts = scripts.into_iter();
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = tx.send(Instant::now());
            let script = scripts.next().unwrap_or_default();
            std::thread::spawn(move || {
                let Some(mut reader) = upgrade(&mut s) else {
                    return;
                };
                if s.write_all(&script.concat()).is_err() {
                    return;
                }
                // Hold the connection until the client goes.
                let mut sink = [0u8; 1024];
                while reader.get_mut().read(&mut sink).is_ok_and(|n| n > 0) {}
            });
        }
    });
    (addr, rx)
}

/// The next frame a client sends: (opcode, unmasked payload); `None` once
/// it is gone.
fn client_frame(r: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).ok()?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).ok()?;
            usize::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).ok()?;
            usize::try_from(u64::from_be_bytes(b)).ok()?
        }
        n => usize::from(n),
    };
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask).ok()?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).ok()?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some((head[0] & 0x0f, payload))
}

/// A fake server that answers requests: on the n-th connection, the i-th
/// text frame the client sends is reported as (n, its JSON), then answered
/// with `replies[n][i]` (nothing past the list).
fn replying_server(
    replies: Vec<Vec<Vec<u8>>>,
) -> (SocketAddr, mpsc::Receiver<(usize, serde_json::Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut replies = replies.into_iter().enumerate();
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let (n, answers) = replies.next().unwrap_or((usize::MAX, Vec::new()));
            let tx = tx.clone();
            std::thread::spawn(move || {
                let Some(mut reader) = upgrade(&mut s) else {
                    return;
                };
                let mut answers = answers.into_iter();
                while let Some((opcode, payload)) = client_frame(&mut reader) {
                    match opcode {
                        1 => {
                            let _ = tx.send((n, serde_json::from_slice(&payload).unwrap()));
                            if let Some(a) = answers.next() {
                                let _ = s.write_all(&a);
                            }
                        }
                        8 => return,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn msg(id: &str, data: &str) -> Vec<u8> {
    text(&json!({"op": "msg", "topic": "t", "id": id, "data": data}))
}

#[test]
fn after_drain_the_client_reconnects_when_reconnect_in_ms_has_passed() {
    let drain = json!({"op": "drain", "reconnect_in_ms": 400});
    let (addr, accepts) = fake_server(vec![
        vec![text(&drain), close(1001, "server going away")],
        vec![msg("1-0", "back")],
    ]);
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    let drained_at = accepts.recv().unwrap();
    // The backoff alone would wait anywhere in [0, 30 s).
    client.backoff = (Duration::from_secs(30), Duration::from_secs(30));
    let event = client
        .recv(Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert!(
        matches!(&event, Event::Msg { data, .. } if data == "back"),
        "{event:?}"
    );
    let back_after = accepts.recv().unwrap() - drained_at;
    assert!(
        back_after >= Duration::from_millis(400) && back_after < Duration::from_millis(1400),
        "reconnected {back_after:?} after the drain, asked for 400 ms"
    );
    assert_eq!(client.reconnects, 1);
}

#[test]
fn close_1000_or_4003_ends_the_client_without_reconnecting() {
    for (code, reason) in [(1000, "bye"), (4003, "token revoked")] {
        let (addr, accepts) = fake_server(vec![vec![close(code, reason)]]);
        let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
        client.backoff = (Duration::from_millis(10), Duration::from_millis(10));
        accepts.recv().unwrap();
        for _ in 0..2 {
            // Every call reports the close, at once: nothing to wait for.
            let started = Instant::now();
            match client.recv(Instant::now() + Duration::from_secs(3)) {
                Err(ClientError::Closed(c, r)) => assert_eq!((c, r.as_str()), (code, reason)),
                other => panic!("close {code}: {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        // A reconnect would have come within the 10 ms backoff.
        assert!(
            accepts.recv_timeout(Duration::from_millis(500)).is_err(),
            "close {code}: the client reconnected"
        );
        assert_eq!(client.reconnects, 0);
    }
}

#[test]
fn close_1011_is_reconnected_with_backoff() {
    // The counterpart: an internal error is not final.
    let (addr, accepts) = fake_server(vec![
        vec![close(1011, "internal error")],
        vec![msg("1-0", "again")],
    ]);
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    client.backoff = (Duration::from_millis(10), Duration::from_millis(50));
    let event = client
        .recv(Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert!(
        matches!(&event, Event::Msg { data, .. } if data == "again"),
        "{event:?}"
    );
    assert_eq!(client.reconnects, 1);
    assert_eq!(accepts.try_iter().count(), 2);
}

/// A TCP proxy between the client and the real server. `cut` ends every
/// proxied connection; then the next `refuse` connections are closed at
/// once (the client's reconnect attempts fail), and after them it proxies
/// again.
struct Proxy {
    addr: SocketAddr,
    live: Arc<Mutex<Vec<TcpStream>>>,
    refuse: Arc<AtomicU32>,
    refused: Arc<AtomicU32>,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            live: Arc::default(),
            refuse: Arc::default(),
            refused: Arc::default(),
            cut: Arc::default(),
        };
        let (live, refuse, refused, cut) = (
            proxy.live.clone(),
            proxy.refuse.clone(),
            proxy.refused.clone(),
            proxy.cut.clone(),
        );
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                if cut.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    if refuse.fetch_sub(1, Ordering::SeqCst) <= 1 {
                        cut.store(false, Ordering::SeqCst);
                    }
                    drop(down);
                    continue;
                }
                let up = TcpStream::connect(upstream).unwrap();
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                live.lock()
                    .unwrap()
                    .extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
                pump(down.try_clone().unwrap(), up.try_clone().unwrap());
                pump(up, down);
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Ends every proxied connection, both ways, and refuses the next `n`.
    fn cut(&self, n: u32) {
        self.refuse.store(n, Ordering::SeqCst);
        self.cut.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Proxies again from the next connection, however many were refused.
    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` on its own thread until either side ends.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Receives `n` messages: (id, data).
fn take_msgs(client: &mut Reconnecting, n: usize, got: &mut Vec<(String, i64)>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = got.len() + n;
    while got.len() < want {
        match client.recv(deadline) {
            Ok(Event::Msg { topic, id, data }) => {
                assert_eq!(topic, "news");
                got.push((id, data.as_i64().unwrap()));
            }
            Ok(_) => {}
            Err(e) => panic!("after {} messages: {e}", got.len()),
        }
    }
}

#[test]
fn a_connection_cut_while_the_server_runs_is_recovered_without_gap_or_duplicate() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(server.addr);
    let mut client = Reconnecting::connect(&proxy.url()).unwrap();
    client.backoff = (Duration::from_millis(20), Duration::from_millis(100));
    client.subscribe("news").unwrap();
    let mut publisher = Client::connect(&server.url()).unwrap();
    let mut got = Vec::new();
    for i in 0..5 {
        publisher.publish("news", &json!(i)).unwrap();
    }
    take_msgs(&mut client, 5, &mut got);
    // Cut; the server sees its end of the connection go (only the
    // publisher is left), and the next two reconnect attempts fail.
    proxy.cut(2);
    server.wait_for("the cut connection closed", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 1.0
    });
    // Published while the client is away: only recovery can bring them.
    for i in 5..10 {
        publisher.publish("news", &json!(i)).unwrap();
    }
    take_msgs(&mut client, 5, &mut got);
    assert_eq!(proxy.refused.load(Ordering::SeqCst), 2);
    assert_eq!(client.reconnects, 1);
    assert_eq!(client.recovered, vec!["news".to_string()], "recovered:true");
    assert!(client.unrecovered.is_empty(), "{:?}", client.unrecovered);
    // Live again after the replay.
    for i in 10..15 {
        publisher.publish("news", &json!(i)).unwrap();
    }
    take_msgs(&mut client, 5, &mut got);
    let data: Vec<i64> = got.iter().map(|(_, d)| *d).collect();
    assert_eq!(data, (0..15).collect::<Vec<i64>>(), "no gap, no duplicate");
    let ids: Vec<ringcast::id::MsgId> = got.iter().map(|(id, _)| id.parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids strictly increase: {got:?}"
    );
    // Nothing more came (a duplicate would be here).
    match client.recv(Instant::now() + Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("after the 15 messages: {other:?}"),
    }
}

fn sub(id: u64, topic: &str, since: Option<(&str, &str)>) -> serde_json::Value {
    let mut v = json!({"op": "sub", "id": id, "topic": topic});
    if let Some((since, epoch)) = since {
        v["since"] = json!(since);
        v["epoch"] = json!(epoch);
    }
    v
}

fn ok(id: u64, topic: &str, last: &str, recovered: Option<bool>) -> Vec<u8> {
    let mut v = json!({"op": "ok", "id": id, "topic": topic, "epoch": "e", "last": last});
    if let Some(r) = recovered {
        v["recovered"] = json!(r);
    }
    text(&v)
}

fn refused(id: Option<u64>, code: u16, topic: &str, reason: &str) -> Vec<u8> {
    let mut v = json!({"op": "error", "code": code, "topic": topic, "reason": reason});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    text(&v)
}

#[test]
fn a_sub_refused_with_4503_is_retried_with_backoff_and_resumed_from_last() {
    let unavailable = |id| refused(Some(id), 4503, "t", "broker unavailable");
    let (addr, frames) = replying_server(vec![
        // Refused, then taken: a quiet topic, `last` 5-0; then the cut.
        vec![
            unavailable(1),
            [ok(2, "t", "5-0", None), close(1011, "internal error")].concat(),
        ],
        // The resubscription from 5-0 is refused once, then recovers 6-0.
        vec![
            unavailable(1),
            [msg("6-0", "missed"), ok(2, "t", "6-0", Some(true))].concat(),
        ],
    ]);
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    client.backoff = (Duration::from_millis(10), Duration::from_millis(50));
    // Not an error: the sub is retried.
    client.subscribe("t").unwrap();
    let event = client
        .recv(Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert!(
        matches!(&event, Event::Msg { id, data, .. } if id == "6-0" && data == "missed"),
        "{event:?}"
    );
    let sent: Vec<(usize, serde_json::Value)> = frames.try_iter().collect();
    assert_eq!(
        sent,
        vec![
            (0, sub(1, "t", None)),
            (0, sub(2, "t", None)),
            (1, sub(1, "t", Some(("5-0", "e")))),
            (1, sub(2, "t", Some(("5-0", "e")))),
        ]
    );
    assert_eq!(client.reconnects, 1);
    assert_eq!(client.recovered, vec!["t".to_string()]);
    assert_eq!(client.position("t"), Some((Some("6-0"), "e")));
}

#[test]
fn a_subscription_ended_or_refused_for_good_is_dropped_surfaced_and_not_resubscribed() {
    let (addr, frames) = replying_server(vec![
        vec![
            ok(1, "a", "0-0", None),
            // The server ends `a` (a narrowed token), then the connection drops.
            [
                ok(2, "b", "0-0", None),
                refused(None, 4403, "a", "subscription ended: topic not allowed"),
                close(1011, "internal error"),
            ]
            .concat(),
        ],
        // `b` is refused on the new connection: final, not 4503.
        vec![refused(Some(1), 4403, "b", "topic not allowed")],
    ]);
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    client.backoff = (Duration::from_millis(10), Duration::from_millis(50));
    client.subscribe("a").unwrap();
    client.subscribe("b").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut surfaced = Vec::new();
    for _ in 0..2 {
        match client.recv(deadline).unwrap() {
            Event::Frame(v) if v["op"] == "error" => {
                surfaced.push((v["topic"].clone(), v["code"].clone()))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        surfaced,
        vec![(json!("a"), json!(4403)), (json!("b"), json!(4403))]
    );
    assert_eq!(client.topics().count(), 0);
    // Nothing left to resubscribe, on this connection or another.
    match client.recv(Instant::now() + Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("{other:?}"),
    }
    let sent: Vec<(usize, serde_json::Value)> = frames.try_iter().collect();
    assert_eq!(
        sent,
        vec![
            (0, sub(1, "a", None)),
            (0, sub(2, "b", None)),
            (1, sub(1, "b", Some(("0-0", "e")))),
        ]
    );
    assert_eq!(client.reconnects, 1);
}

#[test]
fn a_quiet_topic_recovers_what_was_published_while_the_client_was_away() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(server.addr);
    let mut client = Reconnecting::connect(&proxy.url()).unwrap();
    client.backoff = (Duration::from_millis(20), Duration::from_millis(100));
    client.subscribe("quiet").unwrap();
    // Nothing was ever published: the position is the `ok`'s `last`.
    let epoch = match client.position("quiet") {
        Some((Some("0-0"), epoch)) if !epoch.is_empty() => epoch.to_string(),
        other => panic!("position after the sub: {other:?}"),
    };
    let mut publisher = Client::connect(&server.url()).unwrap();
    proxy.cut(1);
    server.wait_for("the cut connection closed", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 1.0
    });
    let mids: Vec<String> = (0..3)
        .map(|i| publisher.publish("quiet", &json!(i)).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 3 {
        match client.recv(deadline) {
            Ok(Event::Msg { topic, id, data }) => got.push((topic, id, data)),
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    let want: Vec<(String, String, serde_json::Value)> = (0..3)
        .map(|i| ("quiet".to_string(), mids[i].clone(), json!(i)))
        .collect();
    assert_eq!(got, want, "exactly the three, in order");
    assert_eq!(
        client.recovered,
        vec!["quiet".to_string()],
        "recovered:true"
    );
    assert!(client.unrecovered.is_empty(), "{:?}", client.unrecovered);
    assert_eq!(client.reconnects, 1);
    assert_eq!(proxy.refused.load(Ordering::SeqCst), 1);
    assert_eq!(
        client.position("quiet"),
        Some((Some(mids[2].as_str()), epoch.as_str()))
    );
    // Nothing else: no duplicate, no stray frame.
    match client.recv(Instant::now() + Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("after the three: {other:?}"),
    }
}

#[test]
fn ringcast_subscribe_prints_what_a_quiet_topic_got_while_it_was_cut() {
    use std::process::{Command, Stdio};
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(server.addr);
    let mut cli = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["subscribe", "--url", &proxy.url(), "--topic", "quiet"])
        .args(["--count", "3"])
        .env_remove("RINGCAST_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server.wait_for("the CLI subscribed", Duration::from_secs(5), |s| {
        s.metric("ringcast_subscriptions_active") == 1.0
    });
    let mut publisher = Client::connect(&server.url()).unwrap();
    // Away until the three are published: only recovery can bring them.
    proxy.cut(u32::MAX);
    server.wait_for("the cut connection closed", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 1.0
    });
    let mids: Vec<String> = (0..3)
        .map(|i| publisher.publish("quiet", &json!(i)).unwrap())
        .collect();
    proxy.heal();
    let started = Instant::now();
    while cli.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(15) {
            let _ = cli.kill();
            panic!("ringcast subscribe did not print three messages");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = cli.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<serde_json::Value> = (0..3)
        .map(|i| json!({"topic": "quiet", "id": mids[i], "data": i}))
        .collect();
    assert_eq!(lines, want, "stderr: {stderr}");
    assert!(!stderr.contains("recovered:false"), "{stderr}");
}
