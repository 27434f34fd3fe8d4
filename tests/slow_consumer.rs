//! What a subscriber that stops reading loses, per namespace
//! `slow_consumer` policy (docs/PROTOCOL.md section 3, v1.2): the real
//! binary, a subscriber socket with a small receive buffer that stops
//! reading while a publisher sends megabytes, and a subscriber beside it
//! that reads everything. `close` (4009) has its test in lifecycle.rs.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{raw, TestServer};
use ringcast::client::{Client, Event};
use serde_json::{json, Value};

const POLICIES: &str = r#"
[[namespaces]]
name = "px"
slow_consumer = "conflate"
history_size = 10

[[namespaces]]
name = "feed"
slow_consumer = "drop_oldest"
history_size = 10
"#;

fn server() -> TestServer {
    let path = std::env::temp_dir().join(format!(
        "ringcast-slow-{}-{}.toml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, POLICIES).unwrap();
    // The close handshake and the test's reads may wait on a busy machine.
    TestServer::start(&["--config", path.to_str().unwrap(), "--close-timeout", "60s"])
}

/// A subscriber whose socket holds little (a 4 KiB receive buffer), so
/// its outbound queue fills soon after it stops reading; with `deflate`,
/// it takes permessage-deflate, so what is queued is the compressed frame.
fn slow_subscriber(addr: SocketAddr, topics: &[&str], deflate: bool) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let upgrade = if deflate {
        raw::UPGRADE.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        )
    } else {
        raw::UPGRADE.to_string()
    };
    s.write_all(upgrade.as_bytes()).unwrap();
    let head = raw::read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(head.contains("permessage-deflate"), deflate, "{head}");
    raw::read_op(&mut s, "welcome");
    for t in topics {
        let sub = json!({"op": "sub", "id": 1, "topic": t}).to_string();
        s.write_all(&raw::frame(true, 1, sub.as_bytes())).unwrap();
        raw::read_op(&mut s, "ok");
    }
    s
}

/// A subscriber that reads all the time: the `msg` ids it got, once it
/// has the one whose `data.n` is `last`.
fn fast_subscriber(server: &TestServer, topic: &str, last: usize) -> JoinHandle<Vec<String>> {
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe(topic, None).unwrap();
    std::thread::spawn(move || {
        let mut ids = Vec::new();
        loop {
            match c.recv(Duration::from_secs(30)) {
                Ok(Event::Msg { id, data, .. }) => {
                    ids.push(id);
                    if data["n"] == last {
                        return ids;
                    }
                }
                Ok(Event::Close(code, why)) => panic!("fast one closed: {code} {why}"),
                Ok(Event::Frame(f)) => panic!("fast one got {f}"),
                Err(e) => panic!("fast one failed after {}: {e}", ids.len()),
            }
        }
    })
}

/// Publishes `n` messages of about 8 KB round-robin over `topics` (random
/// letters of 16: compressed, they shrink, and still fill a socket);
/// their ids in order, per topic.
fn publish(server: &TestServer, topics: &[&str], n: usize) -> Vec<Vec<String>> {
    let mut publisher = Client::connect(&server.url()).unwrap();
    let mut ids = vec![Vec::new(); topics.len()];
    for i in 0..n {
        let pad: String = std::iter::repeat_with(|| fastrand::char('a'..'q'))
            .take(8000)
            .collect();
        let k = i % topics.len();
        let mid = publisher
            .publish(topics[k], &json!({"n": i, "pad": pad}))
            .unwrap_or_else(|e| panic!("publish {i}: {e}\n{}", server.log()));
        ids[k].push(mid);
    }
    ids
}

/// One server frame: (first byte, payload), inflated when RSV1 says it is
/// compressed; the count of compressed frames goes up by one then.
fn read_frame(s: &mut TcpStream, compressed: &mut usize) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("a frame");
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
    if h[0] & 0x40 != 0 {
        *compressed += 1;

        let mut out = Vec::new();
        ringcast::ws::deflate::Inflater::default()
            .inflate(&p, 1 << 20, &mut out)
            .unwrap();
        p = out;
    }
    (h[0] & 0x0f, p)
}

/// Everything the slow subscriber reads once it reads again, until the
/// last message of every topic has come: text frames as JSON, and how
/// many came compressed. A close frame fails the test.
fn read_until_last(s: &mut TcpStream, last: &[&String]) -> (Vec<Value>, usize) {
    let mut got = Vec::new();
    let mut compressed = 0;
    let mut missing: Vec<&String> = last.to_vec();
    while !missing.is_empty() {
        let (op, payload) = read_frame(s, &mut compressed);
        assert_ne!(
            op,
            8,
            "closed: {:?}",
            String::from_utf8_lossy(payload.get(2..).unwrap_or_default())
        );
        if op != 1 {
            continue;
        }
        let v: Value = serde_json::from_slice(&payload).unwrap();
        if v["op"] == "msg" {
            missing.retain(|id| v["id"] != ***id);
        }
        got.push(v);
    }
    (got, compressed)
}

/// Whether `part` is `all` with some left out, in the same order.
fn is_subsequence(part: &[String], all: &[String]) -> bool {
    let mut rest = all.iter();
    part.iter().all(|p| rest.any(|a| a == p))
}

fn rss(server: &TestServer) -> f64 {
    server.metric("process_resident_memory_bytes")
}

#[test]
fn conflate_gives_a_slow_subscriber_the_newest_of_each_topic_and_never_closes_it() {
    let server = server();
    let topics = ["px:a", "px:b"];
    let mut slow = slow_subscriber(server.addr, &topics, true);
    const N: usize = 1500;
    let fast = fast_subscriber(&server, "px:a", N - 2);
    let before = rss(&server);
    let ids = publish(&server, &topics, N);
    // The one that reads gets the newest too, in order; it may lose some
    // to conflation itself when its socket is full for a moment.
    let fast_ids = fast.join().expect("the fast subscriber got the newest");
    assert!(
        is_subsequence(&fast_ids, &ids[0]),
        "fast: in order, no duplicate"
    );
    let grown = rss(&server) - before;
    // 12 MB went to a subscriber that read nothing: it holds at most its
    // 1 MiB queue (one frame per topic here) and what the kernel took.
    assert!(grown < 8e6, "resident memory grew by {grown} bytes");

    let (got, compressed) =
        read_until_last(&mut slow, &[ids[0].last().unwrap(), ids[1].last().unwrap()]);
    // Compressed frames are replaced like plain ones.
    assert_eq!(compressed, got.len(), "every message came compressed");
    let mut received = 0;
    for (t, topic) in topics.iter().enumerate() {
        let seen: Vec<&str> = got
            .iter()
            .filter(|v| v["op"] == "msg" && v["topic"] == *topic)
            .map(|v| v["id"].as_str().unwrap())
            .collect();
        // In order, none twice, each one published, ending at the newest.
        let at: Vec<usize> = seen
            .iter()
            .map(|id| ids[t].iter().position(|p| p == id).expect("a published id"))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{topic}: {at:?}");
        assert_eq!(at.last(), Some(&(ids[t].len() - 1)), "{topic}");
        assert!(seen.len() < ids[t].len(), "{topic}: nothing was conflated");
        received += seen.len();
    }
    assert!(got.iter().all(|v| v["op"] == "msg"), "only messages");
    // Every message either subscriber did not get is counted, and nothing else.
    let counted = server.metric(r#"ringcast_messages_dropped_total{reason="conflated"}"#);
    assert_eq!(
        counted as usize,
        N - received + ids[0].len() - fast_ids.len()
    );
    assert_eq!(
        server.metric(r#"ringcast_client_disconnects_total{reason="slow"}"#),
        0.0
    );
    // And it goes on: live again, it gets the next one.
    let mut publisher = Client::connect(&server.url()).unwrap();
    let next = publisher.publish("px:b", &json!("after")).unwrap();
    assert_eq!(raw::read_op(&mut slow, "msg")["id"], next.as_str());
}

#[test]
fn drop_oldest_tells_a_slow_subscriber_what_it_lost_and_keeps_the_rest_in_order() {
    let server = server();
    let mut slow = slow_subscriber(server.addr, &["feed:a"], false);
    const N: usize = 1500;
    let fast = fast_subscriber(&server, "feed:a", N - 1);
    let before = rss(&server);
    let ids = publish(&server, &["feed:a"], N).remove(0);
    assert_eq!(fast.join().expect("the fast subscriber"), ids, "unaffected");
    let grown = rss(&server) - before;
    assert!(grown < 8e6, "resident memory grew by {grown} bytes");

    let (got, _) = read_until_last(&mut slow, &[ids.last().unwrap()]);
    // Walk the published ids: each is either received, in order, or
    // inside the one `lost` range that came in its place.
    let mut next = 0;
    let mut lost = 0;
    let mut notices = 0;
    for v in &got {
        match v["op"].as_str() {
            Some("msg") => {
                assert_eq!(v["id"], ids[next].as_str(), "message {next}");
                next += 1;
            }
            Some("lost") => {
                assert_eq!(v["topic"], "feed:a");
                assert_eq!(v["from"], ids[next].as_str(), "lost from {next}: {v}");
                let to = ids.iter().position(|p| v["to"] == p.as_str()).unwrap();
                assert!(to >= next, "{v}");
                lost += to + 1 - next;
                next = to + 1;
                notices += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(next, N, "every id accounted for");
    assert!(notices >= 1 && lost > 0, "nothing was dropped");
    assert!(notices < lost, "one notice per episode, not per message");
    let counted = server.metric(r#"ringcast_messages_dropped_total{reason="dropped_oldest"}"#);
    assert_eq!(counted as usize, lost, "every lost message is counted");
    assert_eq!(
        server.metric(r#"ringcast_client_disconnects_total{reason="slow"}"#),
        0.0
    );
    // What it lost is still there to recover (within the history).
    let mut again = Client::connect(&server.url()).unwrap();
    let epoch = again.subscribe("feed:a", None).unwrap().epoch;
    let tail = &ids[N - 5];
    let replay = Client::connect(&server.url())
        .unwrap()
        .subscribe("feed:a", Some((tail, &epoch)))
        .unwrap();
    assert_eq!(replay.recovered, Some(true));
    assert_eq!(replay.replayed.len(), 4);
}
