//! The Rust client's reconnect rules (PROTOCOL.md sections 3 and 4):
//! `drain` sets when it comes back, 1000 and 4003 end it, and a connection
//! cut while the same server runs is recovered with `since` + `epoch`, with
//! no gap and no duplicate. The server side is either a hand-built fake
//! (every byte written here) or the real binary behind an in-test TCP proxy
//! that the test can cut.

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

/// `Sec-WebSocket-Accept` for the key the client sends (RFC 6455 section 1.3).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

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
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
                );
                let welcome =
                    json!({"op": "welcome", "conn": "c-0-1", "node": "fake", "heartbeat": 25});
                let mut out = head.into_bytes();
                out.extend(text(&welcome));
                out.extend(script.concat());
                if s.write_all(&out).is_err() {
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
    let ids: Vec<ringcast::broker::MsgId> = got.iter().map(|(id, _)| id.parse().unwrap()).collect();
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
