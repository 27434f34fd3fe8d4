//! Recovery with `since` through Redis Streams: from the node's recent-entry
//! cache and from XRANGE, with concurrent publishing (no gap, no duplicate
//! between replay and live), after a node restart, and refused (all or
//! nothing) past MAXLEN, with a wrong epoch, or past anything the stream had.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::TestRedis;
use common::TestServer;
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

fn recv_msgs(c: &mut Client, n: usize) -> Vec<(String, serde_json::Value)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { id, data, .. }) => got.push((id, data)),
            Ok(_) => {}
            Err(e) => panic!("after {} of {n} messages: {e}", got.len()),
        }
    }
    got
}

/// Subscribes with `since` while another thread publishes 10..200, and
/// checks the client sees exactly 5..200 (it last saw message 4).
fn replay_joins_live_exactly(server: &TestServer) {
    let mut p = Client::connect(&server.url()).unwrap();
    let mut s = Client::connect(&server.url()).unwrap();
    let first = s.subscribe("feed", None).unwrap();
    for i in 0..10 {
        p.publish("feed", &json!(i)).unwrap();
    }
    let got = recv_msgs(&mut s, 10);
    let last_seen = got[4].0.clone();
    drop(s);
    let url = server.url();
    let publisher = std::thread::spawn(move || {
        let mut p = Client::connect(&url).unwrap();
        for i in 10..200 {
            p.publish("feed", &json!(i)).unwrap();
        }
    });
    let mut s = Client::connect(&server.url()).unwrap();
    let sub = s
        .subscribe("feed", Some((&last_seen, &first.epoch)))
        .unwrap();
    assert_eq!(sub.recovered, Some(true));
    assert_eq!(sub.epoch, first.epoch);
    let mut seen: Vec<i64> = sub
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { data, .. } => data.as_i64().unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seen.first(), Some(&5), "replay starts right after since");
    publisher.join().unwrap();
    let rest = 200 - 5 - seen.len();
    seen.extend(
        recv_msgs(&mut s, rest)
            .iter()
            .map(|(_, d)| d.as_i64().unwrap()),
    );
    assert_eq!(
        seen,
        (5..200).collect::<Vec<_>>(),
        "gap or duplicate between replay and live"
    );
    assert!(matches!(
        s.recv(Duration::from_millis(200)),
        Err(ClientError::Timeout)
    ));
}

#[test]
fn recovery_from_the_cache_joins_live_without_gap_or_duplicate() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    replay_joins_live_exactly(&server);
    assert_eq!(
        server.metric("ringcast_broker_recoveries_cached_total"),
        1.0
    );
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 0.0);
}

#[test]
fn recovery_from_xrange_joins_live_without_gap_or_duplicate() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-cache-size", "0"]);
    replay_joins_live_exactly(&server);
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 1.0);
}

#[test]
fn a_restarted_node_recovers_from_redis() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("t", None).unwrap().epoch;
    let mids: Vec<String> = (0..50)
        .map(|i| c.publish("t", &json!(i)).unwrap())
        .collect();
    // Another topic in between must not leak into the replay.
    for i in 0..20 {
        c.publish("other", &json!(i)).unwrap();
    }
    drop(c);
    drop(server);
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let r = c.subscribe("t", Some((&mids[19], &epoch))).unwrap();
    assert_eq!(r.recovered, Some(true));
    assert_eq!(r.epoch, epoch, "the epoch lives in Redis, not in the node");
    let data: Vec<i64> = r
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { topic, data, .. } => {
                assert_eq!(topic, "t");
                data.as_i64().unwrap()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(data, (20..50).collect::<Vec<_>>());
}

#[test]
fn recovery_is_refused_past_maxlen_with_a_wrong_epoch_or_past_the_stream() {
    let redis = TestRedis::start();
    let server = TestServer::start(&[
        "--redis",
        &redis.url(),
        "--redis-maxlen",
        "10",
        "--redis-cache-size",
        "0",
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("h", None).unwrap().epoch;
    let mut p = Client::connect(&server.url()).unwrap();
    // MAXLEN ~ trims whole stream nodes (100 entries): publish well past it.
    let mids: Vec<String> = (0..400)
        .map(|i| p.publish("h", &json!(i)).unwrap())
        .collect();
    recv_msgs(&mut c, 400);
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe("h", Some((&mids[1], &epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(false), 0));
    r.unsubscribe("h").unwrap();
    // Recent enough: still in the stream.
    let sub = r.subscribe("h", Some((&mids[395], &epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(true), 4));
    r.unsubscribe("h").unwrap();
    let sub = r
        .subscribe("h", Some((&mids[395], "not-the-epoch")))
        .unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(false), 0));
    r.unsubscribe("h").unwrap();
    let sub = r
        .subscribe("h", Some(("99999999999999-0", &epoch)))
        .unwrap();
    assert_eq!(sub.recovered, Some(false));
}

#[test]
fn subscribing_does_not_wait_for_the_blocked_read() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let mut times = Vec::new();
    for i in 0..40 {
        let t = format!("lat{i}");
        let start = Instant::now();
        c.subscribe(&t, None).unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
    eprintln!("sub round trip on an idle node: p50 {p50:?} max {max:?}");
    // The reader blocks 2 s per XREAD: without the waker a sub would take ~1 s on average.
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
    assert!(max < Duration::from_millis(1000), "max {max:?}");
}
