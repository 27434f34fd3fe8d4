//! Recovery holes a user can fall into (docs/PROTOCOL.md section 2), on the
//! embedded broker and with Redis: a quiet topic recovers from the `last`
//! of its `ok` (on another node too), a replay that cannot fit the
//! outbound queue is answered `recovered:false` at once instead of closing
//! the connection with 4009 again and again, and a broker that cannot take
//! a publish answers 4503.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::TestRedis;
use common::TestServer;
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

/// The per-client limits a publisher of hundreds of messages would hit.
const UNLIMITED: [&str; 4] = ["--inbound-rate", "0", "--inbound-bytes-rate", "0"];

/// Receives `n` messages of `topic`, in order: their (id, data).
fn recv_msgs(c: &mut Client, n: usize) -> Vec<(String, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { id, data, .. }) => got.push((id, data)),
            Ok(Event::Close(code, reason)) => panic!("closed {code} {reason} after {got:?}"),
            Ok(_) => {}
            Err(e) => panic!("{e} after {} of {n}", got.len()),
        }
    }
    got
}

/// Nothing more arrives for a while.
fn assert_quiet(c: &mut Client) {
    match c.recv(Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("expected nothing, got {other:?}"),
    }
}

fn ids(msgs: &[(String, serde_json::Value)]) -> Vec<String> {
    msgs.iter().map(|(id, _)| id.clone()).collect()
}

/// Subscribes to a topic nobody publishes to, goes away, three messages are
/// published (on `publish_on`), and resubscribes on `back_on` with `since`
/// = the `last` of the first `ok`: exactly those three, then
/// `recovered:true`, then live.
fn quiet_topic_recovers_from_last(
    first_on: &TestServer,
    publish_on: &TestServer,
    back_on: &TestServer,
) {
    let mut first = Client::connect(&first_on.url()).unwrap();
    let sub = first.subscribe("quiet", None).unwrap();
    assert!(sub.last.parse::<ringcast::id::MsgId>().is_ok(), "{sub:?}");
    first.close();
    let mut publisher = Client::connect(&publish_on.url()).unwrap();
    // Other topics move the position on too: they must not be replayed.
    publisher.publish("noise", &json!("n")).unwrap();
    let mut published = Vec::new();
    for i in 0..3 {
        published.push(publisher.publish("quiet", &json!(i)).unwrap());
        publisher.publish("noise", &json!(i)).unwrap();
    }
    let mut back = Client::connect(&back_on.url()).unwrap();
    let again = back
        .subscribe("quiet", Some((&sub.last, &sub.epoch)))
        .unwrap();
    assert_eq!(again.recovered, Some(true), "{again:?}");
    let replayed: Vec<String> = again
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { topic, id, .. } => {
                assert_eq!(topic, "quiet");
                id.clone()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replayed, published, "exactly what was published meanwhile");
    assert!(
        again.last.parse::<ringcast::id::MsgId>().unwrap()
            >= published[2].parse::<ringcast::id::MsgId>().unwrap(),
        "{again:?}"
    );
    let live = publisher.publish("quiet", &json!("live")).unwrap();
    assert_eq!(ids(&recv_msgs(&mut back, 1)), vec![live]);
    assert_quiet(&mut back);
}

#[test]
fn a_quiet_topic_recovers_from_the_last_of_its_ok() {
    let server = TestServer::start(&[]);
    quiet_topic_recovers_from_last(&server, &server, &server);
}

#[test]
fn a_quiet_topic_recovers_from_last_on_another_node_with_redis() {
    let redis = TestRedis::start();
    let a = TestServer::start(&["--redis", &redis.url()]);
    let b = TestServer::start(&["--redis", &redis.url()]);
    // Subscribed on one node, published and recovered on the other.
    quiet_topic_recovers_from_last(&a, &b, &b);
}

#[test]
fn a_fresh_node_answers_last_0_0() {
    let server = TestServer::start(&[]);
    let mut c = Client::connect(&server.url()).unwrap();
    assert_eq!(c.subscribe("t", None).unwrap().last, "0-0");
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    assert_eq!(c.subscribe("t", None).unwrap().last, "0-0");
}

/// The outbound queue in these tests, and the messages that make a replay
/// ten times larger than it.
const QUEUE: usize = 64 << 10;
const DATA: usize = 1000;
const MESSAGES: usize = 10 * QUEUE / DATA + 1;

/// Publishes [`MESSAGES`] of [`DATA`] bytes after a position taken from a
/// `sub` `ok`, then resubscribes with it: the replay would be ten times the
/// queue bound, so the answer is `recovered:false` at once, nothing
/// replayed, the connection open and live; resubscribing from near the end
/// (a replay that fits) still recovers.
fn a_replay_ten_times_the_queue(server: &TestServer) {
    let mut watcher = Client::connect(&server.url()).unwrap();
    let start = watcher.subscribe("big", None).unwrap();
    let mut publisher = Client::connect(&server.url()).unwrap();
    let blob = "x".repeat(DATA);
    let mut published = Vec::new();
    for _ in 0..MESSAGES {
        published.push(publisher.publish("big", &json!(blob)).unwrap());
    }
    // Everything was retained: a subscriber that kept up got it all.
    assert_eq!(ids(&recv_msgs(&mut watcher, MESSAGES)), published);
    for attempt in 0..3 {
        // The same `since` again and again: never a 4009 loop.
        let mut c = Client::connect(&server.url()).unwrap();
        let sub = c
            .subscribe("big", Some((&start.last, &start.epoch)))
            .unwrap();
        assert_eq!(sub.recovered, Some(false), "attempt {attempt}: {sub:?}");
        assert!(sub.replayed.is_empty(), "attempt {attempt}");
        let live = publisher.publish("big", &json!("after")).unwrap();
        published.push(live.clone());
        assert_eq!(ids(&recv_msgs(&mut c, 1)), vec![live], "attempt {attempt}");
        assert_quiet(&mut c);
    }
    assert!(server.metric("ringcast_messages_dropped_total{reason=\"replay_too_large\"}") > 0.0);
    assert_eq!(
        server.metric("ringcast_client_disconnects_total{reason=\"slow\"}"),
        0.0,
        "no connection was closed for a replay"
    );
    // A replay that fits the queue is still sent whole.
    let since = &published[published.len() - 20];
    let mut c = Client::connect(&server.url()).unwrap();
    let sub = c.subscribe("big", Some((since, &start.epoch))).unwrap();
    assert_eq!(sub.recovered, Some(true), "{sub:?}");
    let replayed: Vec<String> = sub
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { id, .. } => id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replayed, published[published.len() - 19..]);
}

#[test]
fn a_replay_ten_times_the_queue_bound_is_refused_at_once_not_looped() {
    let queue = QUEUE.to_string();
    let mut args = vec!["--outbound-queue", &queue, "--history-size", "2000"];
    args.extend(UNLIMITED);
    let server = TestServer::start(&args);
    a_replay_ten_times_the_queue(&server);
}

#[test]
fn a_replay_ten_times_the_queue_bound_is_refused_with_redis_from_the_cache_or_redis() {
    let redis = TestRedis::start();
    let queue = QUEUE.to_string();
    // From the node's recent-entry cache (the default, large enough) ...
    let mut args = vec!["--redis", "", "--outbound-queue", &queue];
    let url = redis.url();
    args[1] = &url;
    args.extend(UNLIMITED);
    let cached = TestServer::start(&args);
    a_replay_ten_times_the_queue(&cached);
    drop(cached);
    // ... and, with no cache, read from Redis, where the read stops once
    // it is past the queue bound.
    let other_prefix = ["--redis-key-prefix", "nocache", "--redis-cache-size", "0"];
    args.extend(other_prefix);
    let uncached = TestServer::start(&args);
    a_replay_ten_times_the_queue(&uncached);
    assert!(uncached.metric("ringcast_broker_recovery_ranges_total") >= 3.0);
}

#[test]
fn a_publish_while_redis_is_down_is_answered_4503() {
    let mut redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    c.publish("t", &json!(1)).unwrap();
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        match c.publish("t", &json!(2)) {
            Err(ClientError::Server { code, reason }) => {
                assert!(reason.contains("broker unavailable"), "{reason}");
                break code;
            }
            // Written before the publisher noticed: try again.
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 4503, "retryable, never the close code 1011");
}
