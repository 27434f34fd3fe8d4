//! The Rust client's reconnect rules (docs/PROTOCOL.md sections 1 to 4):
//! `drain` sets when it comes back, 1000 and 4003 end it, 4009 comes back
//! at once and 4008 later, and a connection cut while the same server runs
//! is recovered with `since` + `epoch`, with no gap and no duplicate, from
//! the last `msg` or, on a quiet topic, from the `last` of the `sub`'s `ok`
//! (`ringcast subscribe` included). A `sub` refused with 4503 is retried;
//! one refused for good, or ended by the server, is dropped and surfaced.
//! A token provider's tokens are refreshed by `auth` before `exp`, and a
//! 4001 brings a fresh one; the `ping` op finds a dead link (a server
//! SIGSTOPped). The server side is either a hand-built fake (every byte
//! written here; it answers the key the client sent) or the real binary,
//! sometimes behind an in-test TCP proxy that the test can cut.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestServer;
use ringcast::auth::{mint_hmac, now_secs, Claims};
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
    upgrade_with_heartbeat(s, 25)
}

/// [`upgrade`], with `heartbeat` (seconds) in the `welcome`.
fn upgrade_with_heartbeat(s: &mut TcpStream, heartbeat: u64) -> Option<BufReader<TcpStream>> {
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
    let welcome = json!({"op": "welcome", "conn": "c-0-1", "node": "fake", "heartbeat": heartbeat});
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

#[test]
fn a_pattern_resubscribed_after_a_cut_is_reported_unrecovered_and_goes_live() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(server.addr);
    let mut client = Reconnecting::connect(&proxy.url()).unwrap();
    client.backoff = (Duration::from_millis(20), Duration::from_millis(100));
    client.subscribe("user.*").unwrap();
    let mut publisher = Client::connect(&server.url()).unwrap();
    publisher.publish("user.1", &json!(0)).unwrap();
    let next = |client: &mut Reconnecting| loop {
        match client.recv(Instant::now() + Duration::from_secs(10)) {
            Ok(Event::Msg { topic, data, .. }) => return (topic, data),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(next(&mut client), ("user.1".to_string(), json!(0)));
    assert!(client.unrecovered.is_empty());
    proxy.cut(0);
    server.wait_for("the cut connection closed", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 1.0
    });
    // Lost while away: a pattern cannot be recovered, and the client says so.
    publisher.publish("user.2", &json!(1)).unwrap();
    // `recv` reconnects and resubscribes; user.2 is not among what it gets.
    match client.recv(Instant::now() + Duration::from_millis(1500)) {
        Err(ClientError::Timeout) => {}
        other => panic!("expected nothing while reconnecting, got {other:?}"),
    }
    server.wait_for("the pattern back", Duration::from_secs(10), |s| {
        s.metric("ringcast_wildcard_subscriptions_active") == 1.0
    });
    publisher.publish("user.3", &json!(2)).unwrap();
    assert_eq!(next(&mut client), ("user.3".to_string(), json!(2)));
    assert_eq!(client.unrecovered, vec!["user.*".to_string()]);
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

#[test]
fn close_4009_reconnects_at_once_and_4008_waits_the_rate_limited_delay() {
    // 4009: back at once, though the backoff alone would wait up to 30 s.
    let (addr, accepts) = fake_server(vec![
        vec![close(4009, "too slow")],
        vec![msg("1-0", "back")],
    ]);
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    client.backoff = (Duration::from_secs(30), Duration::from_secs(30));
    let closed_at = accepts.recv().unwrap();
    let event = client
        .recv(Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert!(
        matches!(&event, Event::Msg { data, .. } if data == "back"),
        "{event:?}"
    );
    let back_after = accepts.recv().unwrap() - closed_at;
    assert!(
        back_after < Duration::from_millis(500),
        "4009: back after {back_after:?}"
    );
    assert_eq!(client.last_disconnect.as_ref().map(|d| d.code), Some(4009));
    // 4008: the backoff (10 ms at most) plus the rate-limited delay.
    let (addr, accepts) = fake_server(vec![
        vec![close(4008, "rate limited")],
        vec![msg("1-0", "later")],
    ]);
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    client.backoff = (Duration::from_millis(10), Duration::from_millis(10));
    client.rate_limited_delay = Duration::from_millis(700);
    let closed_at = accepts.recv().unwrap();
    let event = client
        .recv(Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert!(
        matches!(&event, Event::Msg { data, .. } if data == "later"),
        "{event:?}"
    );
    let back_after = accepts.recv().unwrap() - closed_at;
    assert!(
        back_after >= Duration::from_millis(700) && back_after < Duration::from_millis(1700),
        "4008: back after {back_after:?}, asked for 700 ms more than the backoff"
    );
    assert_eq!(client.reconnects, 1);
}

#[test]
fn the_ping_op_goes_out_after_a_heartbeat_of_silence_and_an_unanswered_one_is_a_dead_link() {
    // A fake server with a 1 s heartbeat that sends nothing by itself (no
    // WebSocket pings) and answers the first three `ping` ops with `pong`.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (pings, pinged) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let pings = pings.clone();
            std::thread::spawn(move || {
                let Some(mut reader) = upgrade_with_heartbeat(&mut s, 1) else {
                    return;
                };
                let mut answered = 0;
                while let Some((opcode, payload)) = client_frame(&mut reader) {
                    if opcode != 1 {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    if v != json!({"op": "ping"}) {
                        continue;
                    }
                    let _ = pings.send((n, Instant::now()));
                    if n == 0 && answered < 3 {
                        answered += 1;
                        let _ = s.write_all(&text(&json!({"op": "pong"})));
                    }
                }
            });
        }
    });
    let mut client = Reconnecting::connect(&format!("ws://{addr}/ws")).unwrap();
    client.backoff = (Duration::from_millis(10), Duration::from_millis(50));
    let connected = Instant::now();
    // The pongs are not events; nothing else comes while the link lives.
    while client.reconnects == 0 {
        assert!(connected.elapsed() < Duration::from_secs(8), "no reconnect");
        match client.recv(Instant::now() + Duration::from_millis(100)) {
            Err(ClientError::Timeout) => {}
            other => panic!("{other:?}"),
        }
    }
    let sent: Vec<(usize, Instant)> = pinged.try_iter().collect();
    let first: Vec<Instant> = sent.iter().filter(|(n, _)| *n == 0).map(|p| p.1).collect();
    // A ping a heartbeat after welcome, then one a heartbeat after each pong.
    assert_eq!(first.len(), 4, "{sent:?}");
    let mut previous = connected;
    for at in &first {
        let gap = *at - previous;
        assert!(
            gap >= Duration::from_millis(900) && gap < Duration::from_millis(1500),
            "a ping {gap:?} after the last frame"
        );
        previous = *at;
    }
    // The fourth went unanswered: dead a heartbeat later, reconnected.
    let lost = client.last_disconnect.clone().unwrap();
    assert_eq!(lost.code, 1006, "{lost:?}");
    assert!(lost.reason.contains("ping op"), "{lost:?}");
    let dead_after = lost.at - first[3];
    assert!(
        dead_after >= Duration::from_millis(950) && dead_after < Duration::from_millis(1500),
        "declared dead {dead_after:?} after the unanswered ping"
    );
    assert_eq!(client.welcome().unwrap()["heartbeat"], 1);
}

/// The HS256 secret of the servers that check tokens here.
const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// A server that checks tokens (1 s to send the first `auth`).
fn auth_server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--auth-hmac-secret", SECRET, "--auth-timeout", "1s"];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

/// A token for user `u1` on `news`, valid for `ttl` seconds, signed with
/// `secret`.
fn token_for(secret: &str, ttl: u64) -> String {
    let claims = Claims {
        sub: "u1".into(),
        exp: now_secs() + ttl,
        subs: vec!["news".into()],
        pubs: vec!["news".into()],
    };
    mint_hmac(secret.as_bytes(), &claims)
}

/// A publisher on `server` with a 10-minute token in the query.
fn publisher(server: &TestServer) -> Client {
    Client::connect(&format!(
        "{}?token={}",
        server.url(),
        token_for(SECRET, 600)
    ))
    .unwrap()
}

/// Publishes `data` to `news` and receives it on `client`, on whatever
/// connection it has; fails on any other event. Then lets the client idle
/// (heartbeat, refresh) for `idle`.
fn round_trip(client: &mut Reconnecting, publisher: &mut Client, data: i64, idle: Duration) {
    let mid = publisher.publish("news", &json!(data)).unwrap();
    match client.recv(Instant::now() + Duration::from_secs(3)) {
        Ok(Event::Msg { topic, id, data: d }) => {
            assert_eq!(
                (topic.as_str(), id.as_str(), d),
                ("news", mid.as_str(), json!(data))
            )
        }
        other => panic!("waiting for {data}: {other:?}"),
    }
    match client.recv(Instant::now() + idle) {
        Err(ClientError::Timeout) => {}
        other => panic!("after {data}: {other:?}"),
    }
}

#[test]
fn a_token_refreshed_before_exp_keeps_the_same_connection_receiving_for_7_s() {
    let server = auth_server(&[]);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    // Every token lives 3 s: without a refresh the server closes at its exp.
    let mut client = Reconnecting::with_token(&server.url(), move || {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(token_for(SECRET, 3))
    })
    .unwrap();
    let conn = client.welcome().unwrap()["conn"].clone();
    assert!(conn.is_string(), "{conn}");
    client.subscribe("news").unwrap();
    let mut publisher = publisher(&server);
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(7) {
        round_trip(
            &mut client,
            &mut publisher,
            sent,
            Duration::from_millis(250),
        );
        assert_eq!(client.welcome().unwrap()["conn"], conn, "after {sent}");
        sent += 1;
    }
    assert!(sent >= 20, "only {sent} messages in 7 s");
    assert_eq!(client.reconnects, 0, "{:?}", client.last_disconnect);
    assert!(
        client.last_disconnect.is_none(),
        "{:?}",
        client.last_disconnect
    );
    // A 3 s token refreshes every 1 to 1.5 s: at least 4 in 7 s, each a
    // provider call, plus the one before connecting (and maybe one in flight).
    let (refreshes, calls) = (client.refreshes, calls.load(Ordering::SeqCst));
    assert!(refreshes >= 4, "{refreshes} refreshes in 7 s");
    assert!(
        calls == refreshes + 1 || calls == refreshes + 2,
        "{calls} provider calls for {refreshes} refreshes"
    );
}

#[test]
fn a_refused_refresh_is_surfaced_and_the_4001_at_exp_brings_a_fresh_token_and_a_reconnect() {
    let server = auth_server(&[]);
    // The first token lives 3 s. Until it expires the provider hands out
    // tokens the server refuses (a wrong secret): the refreshes fail. Once
    // it has expired: one more refused token (the first reconnect fails
    // with 4001 too), then a good one.
    let first_exp = now_secs() + 3;
    let handed = Arc::new(Mutex::new(Vec::new()));
    let log = handed.clone();
    let forged = "not-the-secret-not-the-secret-not-it";
    let mut client = Reconnecting::with_token(&server.url(), move || {
        let mut log = log.lock().unwrap();
        let kind = match (log.len(), now_secs() >= first_exp) {
            (0, _) => "first",
            (_, false) => "refused refresh",
            (_, true) if !log.contains(&"refused connect") => "refused connect",
            (_, true) => "good connect",
        };
        log.push(kind);
        Ok(match kind {
            "first" => mint_hmac(
                SECRET.as_bytes(),
                &Claims {
                    sub: "u1".into(),
                    exp: first_exp,
                    subs: vec!["news".into()],
                    pubs: vec![],
                },
            ),
            "good connect" => token_for(SECRET, 600),
            _ => token_for(forged, 600),
        })
    })
    .unwrap();
    client.backoff = (Duration::from_millis(20), Duration::from_millis(100));
    let first_conn = client.welcome().unwrap()["conn"].clone();
    client.subscribe("news").unwrap();
    let mut publisher = publisher(&server);
    // Refused: surfaced as the server's error 4001 (with the `auth`'s id),
    // and the connection stays.
    match client.recv(Instant::now() + Duration::from_secs(3)) {
        Ok(Event::Frame(v)) => {
            assert_eq!(
                (v["op"].as_str(), v["code"].as_u64()),
                (Some("error"), Some(4001)),
                "{v}"
            );
            assert!(v["id"].is_u64(), "{v}");
        }
        other => panic!("{other:?}"),
    }
    assert!(now_secs() < first_exp, "the refresh came after exp");
    round_trip(&mut client, &mut publisher, 0, Duration::ZERO);
    assert_eq!(client.welcome().unwrap()["conn"], first_conn);
    // At exp the server closes with 4001; the client asks for a token
    // (refused at connect: 4001 again), then another, and comes back.
    let mut surfaced = 1;
    let deadline = Instant::now() + Duration::from_secs(8);
    while client.reconnects == 0 {
        match client.recv(deadline.min(Instant::now() + Duration::from_millis(200))) {
            Ok(Event::Frame(v)) if v["code"] == 4001 && v["id"].is_u64() => surfaced += 1,
            Err(ClientError::Timeout) if Instant::now() < deadline => {}
            other => panic!("waiting for the reconnect: {other:?}"),
        }
    }
    let lost = client.last_disconnect.clone().unwrap();
    assert_eq!((lost.code, lost.reason.as_str()), (4001, "token expired"));
    assert_ne!(client.welcome().unwrap()["conn"], first_conn);
    let handed = handed.lock().unwrap().clone();
    let refreshes = handed.iter().filter(|k| **k == "refused refresh").count();
    assert!(refreshes >= 1, "{handed:?}");
    assert_eq!(
        surfaced, refreshes,
        "every refused refresh surfaced: {handed:?}"
    );
    assert_eq!(
        &handed[refreshes + 1..],
        ["refused connect", "good connect"]
    );
    assert_eq!(client.refreshes, 0);
    // Resubscribed from the last message, on the new connection.
    assert_eq!(client.recovered, vec!["news".to_string()]);
    round_trip(&mut client, &mut publisher, 1, Duration::ZERO);
}

/// A server stopped with SIGSTOP until this is dropped (SIGCONT, also when
/// the test fails): its sockets stay open and silent, a dead link.
struct Stopped(u32);

impl Stopped {
    fn new(server: &TestServer) -> Stopped {
        let pid = server.child.id();
        signal("-STOP", pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}: {status}");
}

#[test]
fn a_dead_link_is_found_by_the_ping_op_within_two_heartbeats_and_recovered_with_since() {
    let server = TestServer::start(&["--heartbeat", "1s"]);
    let mut client = Reconnecting::connect(&server.url()).unwrap();
    client.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    // Attempts at the stopped server (its kernel still accepts) fail fast.
    client.connect_timeout = Duration::from_millis(500);
    assert_eq!(client.welcome().unwrap()["heartbeat"], 1);
    let first_conn = client.welcome().unwrap()["conn"].clone();
    client.subscribe("news").unwrap();
    let mut publisher = Client::connect(&server.url()).unwrap();
    for i in 0..3 {
        publisher.publish("news", &json!(i)).unwrap();
    }
    let mut got = Vec::new();
    take_msgs(&mut client, 3, &mut got);
    let stopped = Stopped::new(&server);
    let stopped_at = Instant::now();
    while client.last_disconnect.is_none() {
        assert!(
            stopped_at.elapsed() < Duration::from_secs(6),
            "the dead link went unnoticed"
        );
        match client.recv(Instant::now() + Duration::from_millis(100)) {
            Err(ClientError::Timeout) => {}
            other => panic!("while the server is stopped: {other:?}"),
        }
    }
    let lost = client.last_disconnect.clone().unwrap();
    assert_eq!(lost.code, 1006, "{lost:?}");
    assert!(lost.reason.contains("ping op"), "{lost:?}");
    // Two heartbeats after the last frame, which came within one before the stop.
    let noticed = lost.at - stopped_at;
    assert!(
        noticed >= Duration::from_millis(900) && noticed <= Duration::from_millis(2500),
        "noticed {noticed:?} after the stop (heartbeat 1 s)"
    );
    assert_eq!(client.reconnects, 0, "reconnected to a stopped server");
    // Alive again; what is published before the client's next call can
    // only come back through recovery. (The old publisher was silent for
    // two heartbeats: the server may drop it now; use a fresh one.)
    drop(stopped);
    let mut publisher = Client::connect(&server.url()).unwrap();
    for i in 3..6 {
        publisher.publish("news", &json!(i)).unwrap();
    }
    take_msgs(&mut client, 3, &mut got);
    let data: Vec<i64> = got.iter().map(|(_, d)| *d).collect();
    assert_eq!(data, (0..6).collect::<Vec<i64>>(), "no gap, no duplicate");
    assert_eq!(client.reconnects, 1);
    assert_eq!(client.recovered, vec!["news".to_string()], "recovered:true");
    assert_ne!(client.welcome().unwrap()["conn"], first_conn);
    match client.recv(Instant::now() + Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("after the six: {other:?}"),
    }
}

#[test]
fn ringcast_subscribe_with_a_token_receives_then_stops_with_an_error_when_it_expires() {
    use std::process::{Command, Stdio};
    let server = auth_server(&[]);
    let token = token_for(SECRET, 3);
    let started = Instant::now();
    let cli = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["subscribe", "--url", &server.url(), "--topic", "news"])
        .env("RINGCAST_TOKEN", &token)
        .env_remove("RINGCAST_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server.wait_for("the CLI subscribed", Duration::from_secs(3), |s| {
        s.metric("ringcast_subscriptions_active") == 1.0
    });
    let mid = publisher(&server).publish("news", &json!("hi")).unwrap();
    let out = cli.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    // Stopped at exp (within 1 to 3 s), not later by a reconnect loop.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ran {:?}",
        started.elapsed()
    );
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line, json!({"topic": "news", "id": mid, "data": "hi"}));
    assert!(
        stderr.contains("--token expired") && !stderr.contains(&token),
        "{stderr}"
    );
}
