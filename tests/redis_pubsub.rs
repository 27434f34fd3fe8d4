//! Pub/sub through Redis Streams on one node: client `pub` is an XADD that
//! every subscriber receives once, in order; a plain producer's XADD
//! reaches subscribers; malformed entries are skipped and counted while
//! good ones keep flowing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::{xadd, TestRedis};
use common::{raw, TestServer};
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

fn recv_msgs(c: &mut Client, n: usize) -> Vec<(String, String, serde_json::Value)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { topic, id, data }) => got.push((topic, id, data)),
            Ok(_) => {}
            Err(e) => panic!("after {} of {n} messages: {e}", got.len()),
        }
    }
    got
}

fn assert_quiet(c: &mut Client) {
    match c.recv(Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

#[test]
fn client_publishes_go_through_redis_to_every_subscriber_once_in_order() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut subs: Vec<Client> = (0..6)
        .map(|_| Client::connect(&server.url()).unwrap())
        .collect();
    for s in &mut subs {
        let ok = s.subscribe("news", None).unwrap();
        assert!(!ok.epoch.is_empty(), "sub ok carries the partition epoch");
    }
    let mut p = Client::connect(&server.url()).unwrap();
    let mids: Vec<String> = (0..300)
        .map(|i| p.publish("news", &json!({ "n": i })).unwrap())
        .collect();
    for s in &mut subs {
        let got = recv_msgs(s, 300);
        let ids: Vec<&str> = got.iter().map(|(_, id, _)| id.as_str()).collect();
        assert_eq!(ids, mids, "ids differ from publish acks");
        for (i, (_, _, data)) in got.iter().enumerate() {
            assert_eq!(data["n"], i, "out of order");
        }
        assert_quiet(s);
    }
    // The entries are in the topic's partition stream, with the acked ids.
    let key = ringcast::broker::redis::stream_key(
        "ringcast",
        ringcast::broker::redis::partition("news", 16),
    );
    let len: usize = redis::cmd("XLEN")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(len, 300);
    let metrics = server.metrics();
    assert_eq!(metrics["ringcast_broker_up"], 1.0);
    assert_eq!(metrics["ringcast_broker_entries_read_total"], 300.0);
}

#[test]
fn a_plain_xadd_reaches_subscribers_with_its_event() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut s = raw::open(server.addr);
    std::io::Write::write_all(
        &mut s,
        &raw::frame(true, 1, br#"{"op":"sub","id":1,"topic":"orders:7"}"#),
    )
    .unwrap();
    let ok = raw::read_op(&mut s, "ok");
    assert_eq!(ok["id"], 1);
    let mut producer = redis.conn();
    let id = xadd(
        &mut producer,
        "orders:7",
        &[
            ("topic", "orders:7"),
            ("event", "shipped"),
            ("data", r#"{"box":[1,2]}"#),
        ],
    );
    let msg = raw::read_op(&mut s, "msg");
    assert_eq!(
        msg,
        json!({"op":"msg","topic":"orders:7","id":id,"event":"shipped","data":{"box":[1,2]}})
    );
}

#[test]
fn malformed_entries_are_skipped_and_counted_and_good_ones_keep_flowing() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe("feed", None).unwrap();
    let mut producer = redis.conn();
    // A topic that belongs to another partition than "feed"'s stream.
    let p = ringcast::broker::redis::partition("feed", 16);
    let other = (0..100)
        .map(|i| format!("t{i}"))
        .find(|t| ringcast::broker::redis::partition(t, 16) != p)
        .unwrap();
    let bad: [Vec<(&str, &str)>; 6] = [
        vec![("data", "1")],
        vec![("topic", "feed")],
        vec![("topic", "feed"), ("data", "{not json")],
        vec![("topic", "bad topic!"), ("data", "1")],
        vec![("topic", &other), ("data", "1")],
        vec![("topic", "feed"), ("data", "1"), ("event", "")],
    ];
    let mut good = Vec::new();
    for (i, fields) in bad.iter().enumerate() {
        good.push(xadd(
            &mut producer,
            "feed",
            &[("topic", "feed"), ("data", &i.to_string())],
        ));
        // All in "feed"'s stream, whatever the topic field says.
        let key = ringcast::broker::redis::stream_key("ringcast", p);
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg(
                fields
                    .iter()
                    .flat_map(|(k, v)| [*k, *v])
                    .collect::<Vec<_>>(),
            )
            .query(&mut producer)
            .unwrap();
    }
    good.push(xadd(
        &mut producer,
        "feed",
        &[("topic", "feed"), ("data", "\"last\"")],
    ));
    let got = recv_msgs(&mut c, good.len());
    let ids: Vec<String> = got.into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids, good);
    assert_quiet(&mut c);
    let m = server.metrics();
    let skipped = |r: &str| m[&format!("ringcast_broker_entries_skipped_total{{reason=\"{r}\"}}")];
    assert_eq!(skipped("missing_topic"), 1.0);
    assert_eq!(skipped("missing_data"), 1.0);
    assert_eq!(skipped("invalid_data"), 1.0);
    assert_eq!(skipped("invalid_topic"), 1.0);
    assert_eq!(skipped("wrong_partition"), 1.0);
    assert_eq!(skipped("invalid_event"), 1.0);
    assert!(server.log().contains("skipping malformed stream entry"));
}

#[test]
fn an_unreachable_redis_stops_startup_with_the_reason() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let err = match TestServer::try_start(&["--redis", &url], &[]) {
        Ok(_) => panic!("started without Redis"),
        Err(log) => log,
    };
    assert!(err.contains("cannot reach Redis"), "{err}");
}

#[test]
fn ringcast_publish_with_redis_xadds_to_the_right_partition() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe("alerts:eu", None).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["publish", "--redis", &redis.url(), "--topic", "alerts:eu"])
        .args(["--data", r#"{"level":"red"}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let got = recv_msgs(&mut c, 1);
    assert_eq!(got[0].1, mid);
    assert_eq!(got[0].2, json!({"level": "red"}));
}

#[test]
fn a_burst_of_concurrent_publishes_shares_pipelined_round_trips() {
    const CONNS: usize = 4;
    const EACH: usize = 250;
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    // Each connection writes all its publishes at once, as a burst.
    let bursts: Vec<_> = (0..CONNS)
        .map(|n| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut s = raw::open(addr);
                let topic = format!("burst{n}");
                let frames: Vec<u8> = (0..EACH)
                    .flat_map(|i| {
                        let op = json!({"op": "pub", "id": i, "topic": topic, "data": i});
                        raw::frame(true, 1, op.to_string().as_bytes())
                    })
                    .collect();
                std::io::Write::write_all(&mut s, &frames).unwrap();
                let mut mids = vec![String::new(); EACH];
                for _ in 0..EACH {
                    let ok = raw::read_op(&mut s, "ok");
                    let i = ok["id"].as_u64().unwrap() as usize;
                    mids[i] = ok["mid"].as_str().unwrap().to_string();
                }
                (topic, mids)
            })
        })
        .collect();
    for b in bursts {
        let (topic, mids) = b.join().unwrap();
        let parsed: Vec<ringcast::id::MsgId> = mids.iter().map(|m| m.parse().unwrap()).collect();
        assert!(
            parsed.windows(2).all(|w| w[0] < w[1]),
            "{topic}: one connection's publishes keep their order"
        );
    }
    let m = server.metrics();
    let (published, trips) = (
        m[r#"ringcast_messages_published_total{source="client"}"#],
        m["ringcast_broker_publish_round_trips_total"],
    );
    eprintln!("{published} publishes in {trips} round trips");
    assert_eq!(published, (CONNS * EACH) as f64);
    assert!(
        trips * 10.0 <= published,
        "{trips} round trips for {published} publishes: not pipelined"
    );
}

#[test]
fn partitions_and_key_prefix_are_settings_producers_must_match() {
    use ringcast::broker::redis::{epoch_key, partition, stream_key};
    let redis = TestRedis::start();
    let server = TestServer::start(&[
        "--redis",
        &redis.url(),
        "--redis-partitions",
        "4",
        "--redis-key-prefix",
        "app",
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("news", None).unwrap().epoch;
    let p = partition("news", 4);
    let mut producer = redis.conn();
    let mut want = vec![common::redis::xadd_to(
        &mut producer,
        "app",
        4,
        "news",
        &[("topic", "news"), ("data", "1")],
    )];
    // In another of the 4 partitions' streams: skipped.
    let _: String = redis::cmd("XADD")
        .arg(stream_key("app", (p + 1) % 4))
        .arg("*")
        .arg(&["topic", "news", "data", "2"])
        .query(&mut producer)
        .unwrap();
    // Where a producer with the defaults would write: not read at all.
    xadd(&mut producer, "news", &[("topic", "news"), ("data", "3")]);
    // A client publish goes to the prefixed stream of its partition of 4.
    want.push(c.publish("news", &json!(4)).unwrap());
    let got = recv_msgs(&mut c, 2);
    assert_eq!(
        got.iter().map(|(_, id, _)| id.clone()).collect::<Vec<_>>(),
        want
    );
    assert_eq!(got[1].2, json!(4));
    assert_quiet(&mut c);
    let m = server.metrics();
    assert_eq!(
        m["ringcast_broker_entries_skipped_total{reason=\"wrong_partition\"}"],
        1.0
    );
    assert_eq!(m["ringcast_broker_entries_read_total"], 2.0);
    let len: usize = redis::cmd("XLEN")
        .arg(stream_key("app", p))
        .query(&mut producer)
        .unwrap();
    assert_eq!(len, 2);
    let stored: String = redis::cmd("GET")
        .arg(epoch_key("app", p))
        .query(&mut producer)
        .unwrap();
    assert_eq!(stored, epoch);
    // Recovery reads the same prefixed stream.
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe("news", Some((&want[0], &epoch))).unwrap();
    assert_eq!(sub.recovered, Some(true));
    assert_eq!(sub.replayed.len(), 1);
}

#[test]
fn the_even_key_layout_is_what_the_node_reads_publish_writes_and_recovery_replays() {
    use ringcast::broker::redis::{partition, stream_key, KeyLayout, Keys};
    let redis = TestRedis::start();
    let layout = ["--redis-key-layout", "even"];
    let server = TestServer::start(&["--redis", &redis.url(), layout[0], layout[1]]);
    let keys = Keys::new("ringcast", 16, KeyLayout::Even);
    let p = partition("news", 16);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("news", None).unwrap().epoch;
    // `ringcast publish --redis` with the same layout XADDs to the even key.
    let out = common::ringcast(
        &[
            "publish",
            "--redis",
            &redis.url(),
            layout[0],
            layout[1],
            "--topic",
            "news",
            "--data",
            "1",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let first = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // The legacy key is not read any more.
    let mut producer = redis.conn();
    xadd(&mut producer, "news", &[("topic", "news"), ("data", "2")]);
    let second = c.publish("news", &json!(3)).unwrap();
    let got = recv_msgs(&mut c, 2);
    assert_eq!(
        got.iter().map(|(_, id, _)| id.clone()).collect::<Vec<_>>(),
        [first.clone(), second]
    );
    assert_quiet(&mut c);
    let len: usize = redis::cmd("XLEN")
        .arg(keys.stream(p))
        .query(&mut producer)
        .unwrap();
    assert_eq!(len, 2);
    let stored: String = redis::cmd("GET")
        .arg(keys.epoch(p))
        .query(&mut producer)
        .unwrap();
    assert_eq!(stored, epoch);
    assert_ne!(keys.stream(p), stream_key("ringcast", p));
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe("news", Some((&first, &epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(true), 1));
}

#[test]
fn a_freshly_booted_node_does_not_deliver_entries_written_before_it_booted() {
    let redis = TestRedis::start();
    let mut producer = redis.conn();
    for i in 0..5 {
        xadd(
            &mut producer,
            "early",
            &[("topic", "early"), ("data", &i.to_string())],
        );
    }
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe("early", None).unwrap();
    assert_quiet(&mut c);
    let id = xadd(
        &mut producer,
        "early",
        &[("topic", "early"), ("data", "\"new\"")],
    );
    let got = recv_msgs(&mut c, 1);
    assert_eq!((got[0].1.as_str(), &got[0].2), (id.as_str(), &json!("new")));
    assert_quiet(&mut c);
    assert_eq!(server.metric("ringcast_broker_entries_read_total"), 1.0);
}

#[test]
fn namespace_history_settings_with_redis_are_warned_about_at_start() {
    let redis = TestRedis::start();
    let file = std::env::temp_dir().join(format!(
        "ringcast-ns-redis-{}-{}.toml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(
        &file,
        "[[namespaces]]\nname = \"chat\"\nhistory_size = 10\n\n\
         [[namespaces]]\nname = \"feed\"\nhistory_ttl = \"1m\"\n\n\
         [[namespaces]]\nname = \"\"\n",
    )
    .unwrap();
    let server = TestServer::start(&["--redis", &redis.url(), "--config", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("history_size / history_ttl are ignored with --redis"))
        .unwrap_or_else(|| panic!("no warning in the log: {log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("chat") && line.contains("feed"),
        "names them: {line}"
    );
    // Everything else works as configured.
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe("chat:1", None).unwrap();
    let mid = c.publish("chat:1", &json!(1)).unwrap();
    assert_eq!(recv_msgs(&mut c, 1)[0].1, mid);
    // The embedded broker uses them: no warning there.
    let file = std::env::temp_dir().join(format!("ringcast-ns-mem-{}.toml", fastrand::u64(..)));
    std::fs::write(
        &file,
        "[[namespaces]]\nname = \"chat\"\nhistory_size = 10\n",
    )
    .unwrap();
    let embedded = TestServer::start(&["--config", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(!embedded.log().contains("are ignored with --redis"));
}
