//! Several nodes sharing one Redis, and Redis going away: every subscriber
//! on every node receives every entry exactly once, in one order.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{xadd, TestRedis};
use common::TestServer;
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

fn recv_ids(c: &mut Client, n: usize, within: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { id, .. }) => got.push(id),
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

/// Every entry id of `topic`'s partition stream, in stream order.
fn stream_ids(redis: &TestRedis, topic: &str) -> Vec<String> {
    let key = ringcast::broker::redis::stream_key(
        "ringcast",
        ringcast::broker::redis::partition(topic, 16),
    );
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut redis.conn())
        .unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

#[test]
fn two_nodes_deliver_every_message_from_either_node_or_redis_once_in_one_order() {
    let redis = TestRedis::start();
    let a = TestServer::start(&["--redis", &redis.url()]);
    let b = TestServer::start(&["--redis", &redis.url()]);
    let mut subs: Vec<Client> = [&a, &a, &b, &b]
        .iter()
        .map(|s| Client::connect(&s.url()).unwrap())
        .collect();
    let epochs: Vec<String> = subs
        .iter_mut()
        .map(|c| c.subscribe("room", None).unwrap().epoch)
        .collect();
    assert!(
        epochs.windows(2).all(|w| w[0] == w[1]),
        "one epoch per partition: {epochs:?}"
    );
    // Three producers at once: a client of each node and a plain XADD.
    let producers: Vec<_> = [a.url(), b.url()]
        .into_iter()
        .enumerate()
        .map(|(n, url)| {
            std::thread::spawn(move || {
                let mut p = Client::connect(&url).unwrap();
                for i in 0..150 {
                    p.publish("room", &json!({"node": n, "i": i})).unwrap();
                }
            })
        })
        .collect();
    let mut producer = redis.conn();
    for i in 0..150 {
        xadd(
            &mut producer,
            "room",
            &[
                ("topic", "room"),
                ("data", &json!({"node": "redis", "i": i}).to_string()),
            ],
        );
    }
    for p in producers {
        p.join().unwrap();
    }
    let expected = stream_ids(&redis, "room");
    assert_eq!(expected.len(), 450);
    for s in &mut subs {
        assert_eq!(recv_ids(s, 450, Duration::from_secs(20)), expected);
        assert_quiet(s);
    }
}

#[test]
fn a_redis_restart_mid_stream_loses_and_repeats_nothing() {
    let mut redis = TestRedis::start_persistent();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut subs: Vec<Client> = (0..2)
        .map(|_| Client::connect(&server.url()).unwrap())
        .collect();
    for s in &mut subs {
        s.subscribe("live", None).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let url = redis.url();
    let producer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let (mut n, mut failures) = (0u64, 0u64);
            let mut conn = None;
            while !stop.load(Ordering::Acquire) {
                if conn.is_none() {
                    conn = client
                        .get_connection_with_timeout(Duration::from_millis(200))
                        .ok();
                }
                let Some(c) = conn.as_mut() else {
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let data = n.to_string();
                let fields = [("topic", "live"), ("data", data.as_str())];
                let key = ringcast::broker::redis::stream_key(
                    "ringcast",
                    ringcast::broker::redis::partition("live", 16),
                );
                let r: redis::RedisResult<String> = redis::cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg(&fields[..])
                    .query(c);
                match r {
                    Ok(_) => n += 1,
                    Err(_) => {
                        failures += 1;
                        conn = None;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (n, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    redis.kill();
    std::thread::sleep(Duration::from_millis(500));
    redis.restart();
    // Let the reader come back and the producer write on.
    server.wait_for("the reader to reconnect", Duration::from_secs(15), |s| {
        s.metric("ringcast_broker_up") == 1.0
            && s.metric("ringcast_broker_reader_disconnects_total") >= 1.0
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let (acked, failures) = producer.join().unwrap();
    assert!(failures > 0, "the producer never saw Redis go away");
    let expected = stream_ids(&redis, "live");
    assert!(
        expected.len() as u64 >= acked,
        "redis lost acked entries: {} < {acked}",
        expected.len()
    );
    for s in &mut subs {
        assert_eq!(
            recv_ids(s, expected.len(), Duration::from_secs(20)),
            expected
        );
        assert_quiet(s);
    }
    let log = server.log();
    assert!(
        log.contains("redis reader: connection failed, retrying"),
        "{log}"
    );
    assert!(
        log.contains("attempt="),
        "retries are logged with the attempt count"
    );
}

#[test]
fn history_lost_with_redis_means_a_new_epoch_and_no_recovery() {
    let mut redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let old = c.subscribe("e", None).unwrap().epoch;
    let mid = c.publish("e", &json!(1)).unwrap();
    recv_ids(&mut c, 1, Duration::from_secs(5));
    // No persistence: the restart loses the streams and the epochs.
    redis.restart();
    server.wait_for("the reader to reconnect", Duration::from_secs(15), |s| {
        s.metric("ringcast_broker_reader_disconnects_total") >= 1.0
            && s.metric("ringcast_broker_up") == 1.0
    });
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe("e", Some((&mid, &old))).unwrap();
    assert_eq!(sub.recovered, Some(false));
    assert_ne!(
        sub.epoch, old,
        "a new epoch is minted when Redis lost the history"
    );
    // Live delivery carries on in the new epoch.
    let mid2 = r.publish("e", &json!(2)).unwrap();
    assert_eq!(recv_ids(&mut c, 1, Duration::from_secs(5)), vec![mid2]);
}
