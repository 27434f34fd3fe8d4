//! Idempotent publish (docs/PROTOCOL.md sections 2 and 6, v1.2): a publish
//! with a `key` repeated within `--idempotency-window` is not delivered
//! again and is answered with the first one's id, on the embedded broker
//! and through real Redis across two nodes, over WebSocket, `POST
//! /publish`, `ringcast publish` and a producer's plain `XADD`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::{xadd, TestRedis};
use common::{ringcast, TestServer};
use ringcast::client::{Client, ClientError, Event};
use serde_json::{json, Value};

const API_KEY: &str = "admin-key-0123456789";

/// The `msg` ids a subscriber gets until it has been quiet for `quiet`.
fn drain(c: &mut Client, quiet: Duration) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        match c.recv(quiet) {
            Ok(Event::Msg { id, .. }) => ids.push(id),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(ClientError::Timeout) => return ids,
            Err(e) => panic!("{e}"),
        }
    }
}

fn subscriber(server: &TestServer, topic: &str) -> Client {
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe(topic, None).unwrap();
    c
}

fn http_publish(server: &TestServer, body: &Value) -> (u16, String) {
    let auth = format!("Bearer {API_KEY}");
    server.admin_request(
        "POST",
        "/publish",
        &[("Authorization", &auth)],
        &body.to_string(),
    )
}

fn mid_of(body: &str) -> String {
    serde_json::from_str::<Value>(body).unwrap()["mid"]
        .as_str()
        .unwrap_or_else(|| panic!("no mid in {body}"))
        .to_string()
}

/// Retries over every publish path of one node answer the first id and
/// deliver once; another key, another topic or no key is a new message.
fn retries_are_delivered_once(server: &TestServer, extra_cli: &[&str]) {
    let mut sub = subscriber(server, "orders:1");
    let mut other = subscriber(server, "orders:2");
    let mut p = Client::connect(&server.url()).unwrap();
    let first = p
        .publish_keyed("orders:1", &json!({"v": 1}), Some("order-1/shipped"))
        .unwrap();
    for _ in 0..3 {
        let again = p
            .publish_keyed("orders:1", &json!({"v": "retry"}), Some("order-1/shipped"))
            .unwrap();
        assert_eq!(again, first, "a retry is answered with the first id");
    }
    let (status, body) = http_publish(
        server,
        &json!({"topic": "orders:1", "data": 1, "key": "order-1/shipped"}),
    );
    assert_eq!((status, mid_of(&body)), (200, first.clone()), "{body}");
    let url = server.url();
    let mut args = vec![
        "publish",
        "--url",
        &url,
        "--topic",
        "orders:1",
        "--data",
        "1",
        "--key",
        "order-1/shipped",
    ];
    args.extend_from_slice(extra_cli);
    let out = ringcast(&args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first, "cli");
    // Not repeats: another key, the same key on another topic, no key.
    let second = p
        .publish_keyed("orders:1", &json!(2), Some("order-1/delivered"))
        .unwrap();
    let elsewhere = p
        .publish_keyed("orders:2", &json!(3), Some("order-1/shipped"))
        .unwrap();
    let plain = p.publish("orders:1", &json!(4)).unwrap();
    assert!(second != first && plain != second);
    assert_eq!(
        drain(&mut sub, Duration::from_millis(500)),
        [first, second, plain]
    );
    assert_eq!(drain(&mut other, Duration::from_millis(100)), [elsewhere]);
}

#[test]
fn embedded_retries_over_ws_http_and_cli_are_delivered_once() {
    let server = TestServer::start(&["--admin-api-key", API_KEY]);
    retries_are_delivered_once(&server, &[]);
}

#[test]
fn a_bad_key_is_refused_naming_the_field_and_the_limit() {
    let server = TestServer::start(&["--admin-api-key", API_KEY]);
    let mut p = Client::connect(&server.url()).unwrap();
    let long = "k".repeat(129);
    for (key, len) in [("", 0), (long.as_str(), 129)] {
        match p.publish_keyed("orders:1", &json!(1), Some(key)) {
            Err(ClientError::Server { code, reason }) => {
                assert_eq!(code, 4000);
                assert_eq!(reason, format!("key: must be 1 to 128 bytes, is {len}"));
            }
            other => panic!("{other:?}"),
        }
        let (status, body) = http_publish(&server, &json!({"topic": "t", "data": 1, "key": key}));
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("key: must be 1 to 128 bytes"), "{body}");
        let out = ringcast(
            &[
                "publish",
                "--url",
                &server.url(),
                "--topic",
                "t",
                "--data",
                "1",
                "--key",
                key,
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--key: must be 1 to 128 bytes"), "{err}");
    }
    let (status, body) = http_publish(&server, &json!({"topic": "t", "data": 1, "key": 7}));
    assert_eq!(status, 400, "{body}");
}

/// Publishes `data: i` with `key` to `topic` from one client per URL,
/// all released at once; the `mid` each was answered with.
fn publish_at_once(urls: &[String], topic: &'static str, key: &'static str) -> Vec<String> {
    let start = std::sync::Arc::new(std::sync::Barrier::new(urls.len()));
    let threads: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let mut c = Client::connect(url).unwrap();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                c.publish_keyed(topic, &json!(i), Some(key)).unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn embedded_concurrent_duplicates_deliver_exactly_one() {
    let server = TestServer::start(&[]);
    let mut sub = subscriber(&server, "jobs:9");
    // Publishers on both shards, released together.
    let mids = publish_at_once(&vec![server.url(); 8], "jobs:9", "once");
    assert!(mids.iter().all(|m| *m == mids[0]), "{mids:?}");
    assert_eq!(
        drain(&mut sub, Duration::from_millis(500)),
        [mids[0].clone()]
    );
}

#[test]
fn after_the_window_the_same_key_is_a_new_message() {
    let server = TestServer::start(&["--idempotency-window", "1s"]);
    let mut sub = subscriber(&server, "jobs:1");
    let mut p = Client::connect(&server.url()).unwrap();
    let first = p.publish_keyed("jobs:1", &json!(1), Some("k")).unwrap();
    assert_eq!(
        p.publish_keyed("jobs:1", &json!(1), Some("k")).unwrap(),
        first
    );
    std::thread::sleep(Duration::from_millis(1100));
    let later = p.publish_keyed("jobs:1", &json!(1), Some("k")).unwrap();
    assert_ne!(later, first);
    assert_eq!(drain(&mut sub, Duration::from_millis(300)), [first, later]);
}

#[test]
fn the_window_is_a_setting_with_a_default_of_two_minutes() {
    let (help, _) = common::serve_help();
    assert!(help.contains("--idempotency-window"), "{help}");
    assert!(help.contains("[default: 2m]"), "{help}");
    for bad in ["soon", "0s"] {
        let out = ringcast(&["serve", "--idempotency-window", bad], &[]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("idempotency"), "{bad}: {err}");
    }
    // The environment variable, as for every setting.
    let out = ringcast(&["serve"], &[("RINGCAST_IDEMPOTENCY_WINDOW", "48h")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idempotency_window: must be 1s to 24h"),
        "{err}"
    );
}

#[test]
fn embedded_restart_forgets_keys_with_the_history() {
    // The promise without Redis: the table is in memory, like the history;
    // a restart mints a new epoch (clients recover with recovered:false)
    // and a retry after it is a new message.
    let server = TestServer::start(&[]);
    let mut p = Client::connect(&server.url()).unwrap();
    let first = p.publish_keyed("jobs:1", &json!(1), Some("k")).unwrap();
    drop(p);
    drop(server);
    let server = TestServer::start(&[]);
    let mut p = Client::connect(&server.url()).unwrap();
    assert_ne!(
        p.publish_keyed("jobs:1", &json!(1), Some("k")).unwrap(),
        first
    );
}

#[test]
fn redis_retries_across_two_nodes_are_delivered_once_by_each() {
    let redis = TestRedis::start();
    let url = redis.url();
    let a = TestServer::start(&["--redis", &url, "--admin-api-key", API_KEY]);
    let b = TestServer::start(&["--redis", &url, "--admin-api-key", API_KEY]);
    let mut on_a = subscriber(&a, "orders:1");
    let mut on_b = subscriber(&b, "orders:1");
    // Every path of one node, and `ringcast publish --redis` beside it.
    retries_are_delivered_once(&a, &[]);
    let out = ringcast(
        &[
            "publish",
            "--redis",
            &url,
            "--topic",
            "orders:1",
            "--data",
            "1",
            "--key",
            "order-1/shipped",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_redis = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The other node answers a retry with the first id too.
    let mut p = Client::connect(&b.url()).unwrap();
    let again = p
        .publish_keyed("orders:1", &json!(1), Some("order-1/shipped"))
        .unwrap();
    assert_eq!(again, via_redis);
    let seen_a = drain(&mut on_a, Duration::from_millis(500));
    let seen_b = drain(&mut on_b, Duration::from_millis(100));
    assert_eq!(seen_a, seen_b, "both nodes deliver the same");
    assert_eq!(seen_a.len(), 3, "{seen_a:?}");
    assert_eq!(seen_a[0], again);
}

#[test]
fn redis_concurrent_duplicates_on_two_nodes_deliver_exactly_one() {
    let redis = TestRedis::start();
    let url = redis.url();
    let a = TestServer::start(&["--redis", &url]);
    let b = TestServer::start(&["--redis", &url]);
    let mut on_a = subscriber(&a, "jobs:9");
    let mut on_b = subscriber(&b, "jobs:9");
    let urls: Vec<String> = (0..10)
        .map(|i| if i % 2 == 0 { a.url() } else { b.url() })
        .collect();
    let mids = publish_at_once(&urls, "jobs:9", "once");
    assert!(mids.iter().all(|m| *m == mids[0]), "{mids:?}");
    assert_eq!(
        drain(&mut on_a, Duration::from_millis(500)),
        [mids[0].clone()]
    );
    assert_eq!(
        drain(&mut on_b, Duration::from_millis(100)),
        [mids[0].clone()]
    );
}

#[test]
fn plain_xadd_duplicates_are_skipped_by_every_node_alike() {
    let redis = TestRedis::start();
    let url = redis.url();
    let a = TestServer::start(&["--redis", &url, "--idempotency-window", "1s"]);
    let b = TestServer::start(&["--redis", &url, "--idempotency-window", "1s"]);
    let mut on_a = subscriber(&a, "feed:3");
    let mut on_b = subscriber(&b, "feed:3");
    let mut conn = redis.conn();
    let first = xadd(
        &mut conn,
        "feed:3",
        &[("topic", "feed:3"), ("data", "1"), ("key", "k1")],
    );
    let _dup = xadd(
        &mut conn,
        "feed:3",
        &[("topic", "feed:3"), ("data", "1"), ("key", "k1")],
    );
    let other = xadd(
        &mut conn,
        "feed:3",
        &[("topic", "feed:3"), ("data", "2"), ("key", "k2")],
    );
    // A bad key is a bad entry, skipped and counted like a bad event.
    let _bad = xadd(
        &mut conn,
        "feed:3",
        &[("topic", "feed:3"), ("data", "3"), ("key", "")],
    );
    std::thread::sleep(Duration::from_millis(1100));
    let after = xadd(
        &mut conn,
        "feed:3",
        &[("topic", "feed:3"), ("data", "1"), ("key", "k1")],
    );
    let want = [first, other, after];
    assert_eq!(drain(&mut on_a, Duration::from_millis(500)), want);
    assert_eq!(drain(&mut on_b, Duration::from_millis(100)), want);
    for node in [&a, &b] {
        let skipped = |r: &str| {
            node.metric(&format!(
                "ringcast_broker_entries_skipped_total{{reason=\"{r}\"}}"
            ))
        };
        assert_eq!(skipped("duplicate"), 1.0);
        assert_eq!(skipped("invalid_key"), 1.0);
    }
}

#[test]
fn redis_node_restart_inside_the_window_keeps_the_promise_for_ringcast_publishers() {
    let redis = TestRedis::start();
    let url = redis.url();
    let b = TestServer::start(&["--redis", &url]);
    let mut on_b = subscriber(&b, "jobs:4");
    let a = TestServer::start(&["--redis", &url]);
    let mut p = Client::connect(&a.url()).unwrap();
    let first = p.publish_keyed("jobs:4", &json!(1), Some("k")).unwrap();
    drop(p);
    drop(a);
    // The key is in Redis, not in the node: the restarted node answers
    // the retry with the first id and nobody gets it twice.
    let a = TestServer::start(&["--redis", &url]);
    let mut on_a = subscriber(&a, "jobs:4");
    let mut p = Client::connect(&a.url()).unwrap();
    let started = Instant::now();
    assert_eq!(
        p.publish_keyed("jobs:4", &json!(1), Some("k")).unwrap(),
        first
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(drain(&mut on_b, Duration::from_millis(500)), [first]);
    assert_eq!(
        drain(&mut on_a, Duration::from_millis(100)),
        Vec::<String>::new()
    );
}

#[test]
fn a_recovery_leaves_out_the_duplicates_the_live_path_skipped() {
    let redis = TestRedis::start();
    let url = redis.url();
    // From the recent-entry cache, and from XRANGE (no cache).
    let cached = TestServer::start(&["--redis", &url]);
    let uncached = TestServer::start(&["--redis", &url, "--redis-cache-size", "0"]);
    let mut on_cached = subscriber(&cached, "feed:5");
    let mut on_uncached = subscriber(&uncached, "feed:5");
    let mut conn = redis.conn();
    let first = xadd(
        &mut conn,
        "feed:5",
        &[("topic", "feed:5"), ("data", "1"), ("key", "k")],
    );
    assert_eq!(
        drain(&mut on_cached, Duration::from_millis(500)),
        std::slice::from_ref(&first)
    );
    assert_eq!(
        drain(&mut on_uncached, Duration::from_millis(100)),
        std::slice::from_ref(&first)
    );
    // Disconnected meanwhile: a retry of the producer, then a new message.
    let _dup = xadd(
        &mut conn,
        "feed:5",
        &[("topic", "feed:5"), ("data", "1"), ("key", "k")],
    );
    let next = xadd(
        &mut conn,
        "feed:5",
        &[("topic", "feed:5"), ("data", "2"), ("key", "k2")],
    );
    for node in [&cached, &uncached] {
        node.wait_for("both entries read", Duration::from_secs(5), |s| {
            s.metric(r#"ringcast_broker_entries_skipped_total{reason="duplicate"}"#) == 1.0
        });
        let mut c = Client::connect(&node.url()).unwrap();
        let epoch = c.subscribe("feed:5", None).unwrap().epoch;
        let mut again = Client::connect(&node.url()).unwrap();
        let ok = again.subscribe("feed:5", Some((&first, &epoch))).unwrap();
        assert_eq!(ok.recovered, Some(true));
        let replayed: Vec<String> = ok
            .replayed
            .iter()
            .map(|e| match e {
                Event::Msg { id, .. } => id.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            replayed,
            std::slice::from_ref(&next),
            "the duplicate is not replayed"
        );
    }
}

#[test]
fn a_node_started_between_an_entry_and_its_repeat_skips_the_repeat_too() {
    let redis = TestRedis::start();
    let url = redis.url();
    let a = TestServer::start(&["--redis", &url]);
    let mut on_a = subscriber(&a, "feed:6");
    let mut conn = redis.conn();
    let first = xadd(
        &mut conn,
        "feed:6",
        &[("topic", "feed:6"), ("data", "1"), ("key", "k")],
    );
    // Other topics with the same key, in the same and other partitions.
    for i in 0..50 {
        let t = format!("other:{i}");
        xadd(&mut conn, &t, &[("topic", &t), ("data", "0"), ("key", "k")]);
    }
    // Started after the first entry: it learns the window's keys at boot.
    let b = TestServer::start(&["--redis", &url]);
    let mut on_b = subscriber(&b, "feed:6");
    let _dup = xadd(
        &mut conn,
        "feed:6",
        &[("topic", "feed:6"), ("data", "1"), ("key", "k")],
    );
    let next = xadd(&mut conn, "feed:6", &[("topic", "feed:6"), ("data", "2")]);
    assert_eq!(
        drain(&mut on_a, Duration::from_millis(500)),
        [first, next.clone()]
    );
    assert_eq!(drain(&mut on_b, Duration::from_millis(100)), [next]);
    for node in [&a, &b] {
        assert_eq!(
            node.metric(r#"ringcast_broker_entries_skipped_total{reason="duplicate"}"#),
            1.0
        );
    }
}

#[test]
fn keyed_publishes_follow_the_even_key_layout() {
    let redis = TestRedis::start();
    let url = redis.url();
    let a = TestServer::start(&["--redis", &url, "--redis-key-layout", "even"]);
    let mut sub = subscriber(&a, "orders:3");
    let mut p = Client::connect(&a.url()).unwrap();
    let first = p.publish_keyed("orders:3", &json!(1), Some("k")).unwrap();
    assert_eq!(
        p.publish_keyed("orders:3", &json!(1), Some("k")).unwrap(),
        first
    );
    assert_eq!(drain(&mut sub, Duration::from_millis(500)), [first]);
}
