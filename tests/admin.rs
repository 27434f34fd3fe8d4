//! The admin endpoint against the real binary: probes are never stalled by
//! other admin clients, `/healthz` names a stuck shard, `/readyz` follows
//! the drain and a real Redis going away and coming back, `POST /publish`
//! authenticates, checks and publishes, `/stats` describes the node.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::redis::TestRedis;
use common::{http_request, TestServer};
use ringcast::client::{Client, Event};
use serde_json::{json, Value};

const KEY: &str = "admin-key-0123456789";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Waits until `path` answers `status`, or panics after `within`.
fn wait_status(server: &TestServer, path: &str, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (got, body) = server.admin_request("GET", path, &[], "");
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed {got} ({body}), wanted {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn probes_answer_at_once_while_other_admin_clients_idle_or_trickle() {
    let server = TestServer::start(&[]);
    // Twenty connections that never send a byte, and one that sends its
    // request head a byte at a time: the old serial endpoint served one
    // connection at a time and stalled every probe behind them for 2 s.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(server.admin).unwrap())
        .collect();
    let mut trickle = TcpStream::connect(server.admin).unwrap();
    let trickler = std::thread::spawn(move || {
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" {
            if trickle.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = server.admin_request("GET", "/healthz", &[], "");
        let took = started.elapsed();
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
        fastest = fastest.min(took);
    }
    assert!(
        fastest < Duration::from_millis(100),
        "fastest /healthz took {fastest:?}"
    );
    drop(idle);
    trickler.join().unwrap();
}

#[cfg(debug_assertions)]
#[test]
fn healthz_names_a_stuck_shard_and_recovers_when_it_moves_again() {
    let server = TestServer::start_with_env(&[], &[("RINGCAST_DEBUG_STALL_SHARD", "1")]);
    let body = wait_status(&server, "/healthz", 503, Duration::from_secs(10));
    assert!(body.contains("shard 1: no tick for"), "{body}");
    assert!(!body.contains("shard 0"), "{body}");
    // The stall ends after 8 s: healthy again.
    wait_status(&server, "/healthz", 200, Duration::from_secs(15));
}

#[test]
fn readyz_follows_the_drain() {
    let server = TestServer::start(&["--drain-window", "5s"]);
    assert_eq!(
        server.admin_request("GET", "/readyz", &[], ""),
        (200, "ready\n".into())
    );
    // A client keeps the node in its drain window a while.
    let _client = Client::connect(&server.url()).unwrap();
    server.signal_term();
    let body = wait_status(&server, "/readyz", 503, Duration::from_secs(5));
    assert_eq!(body, "draining\n");
}

#[test]
fn readyz_follows_redis_going_away_and_coming_back() {
    let mut redis = TestRedis::start_persistent();
    let server = TestServer::start(&["--redis", &redis.url()]);
    assert_eq!(server.admin_request("GET", "/readyz", &[], "").0, 200);
    redis.kill();
    let body = wait_status(&server, "/readyz", 503, Duration::from_secs(15));
    assert!(body.contains("broker down"), "{body}");
    // Liveness is not readiness: the node itself is fine.
    assert_eq!(server.admin_request("GET", "/healthz", &[], "").0, 200);
    redis.restart();
    wait_status(&server, "/readyz", 200, Duration::from_secs(20));
}

#[test]
fn http_publish_is_refused_without_a_configured_key() {
    let server = TestServer::start(&[]);
    let body = json!({"topic": "news", "data": 1}).to_string();
    let (status, reason) = server.admin_request(
        "POST",
        "/publish",
        &[("Authorization", &bearer(KEY))],
        &body,
    );
    assert_eq!(status, 403, "{reason}");
    assert!(reason.contains("--admin-api-key"), "{reason}");
}

#[test]
fn http_publish_authenticates_checks_and_delivers() {
    let server = TestServer::start(&["--admin-api-key", KEY, "--max-publish-size", "1KiB"]);
    let mut sub = Client::connect(&server.url()).unwrap();
    sub.subscribe("news", None).unwrap();
    let post = |auth: Option<&str>, body: &str| {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        server.admin_request("POST", "/publish", &headers, body)
    };
    let one = json!({"topic": "news", "data": {"title": "hi"}, "event": "created"}).to_string();
    let right = bearer(KEY);
    // Who may publish.
    assert_eq!(post(None, &one).0, 401);
    assert_eq!(post(Some(&bearer("wrong-key-0123456789")), &one).0, 401);
    // One publish: its id, and the subscriber gets it with the event.
    let (status, body) = post(Some(&right), &one);
    assert_eq!(status, 200, "{body}");
    let mid = serde_json::from_str::<Value>(&body).unwrap()["mid"]
        .as_str()
        .unwrap()
        .to_string();
    match sub.recv(Duration::from_secs(5)).unwrap() {
        Event::Msg { id, data, .. } => {
            assert_eq!((id.as_str(), data), (mid.as_str(), json!({"title": "hi"})))
        }
        other => panic!("{other:?}"),
    }
    // A batch: results in order, delivered in order.
    let batch = json!([{"topic": "news", "data": 1}, {"topic": "news", "data": 2}]).to_string();
    let (status, body) = post(Some(&right), &batch);
    assert_eq!(status, 200, "{body}");
    let results: Value = serde_json::from_str(&body).unwrap();
    let mids: Vec<&str> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mid"].as_str().unwrap())
        .collect();
    for (want, data) in mids.iter().zip([1, 2]) {
        match sub.recv(Duration::from_secs(5)).unwrap() {
            Event::Msg { id, data: got, .. } => {
                assert_eq!((id.as_str(), got), (*want, json!(data)))
            }
            other => panic!("{other:?}"),
        }
    }
    // What is wrong is named, and nothing of a bad batch is published.
    let cases = [
        (
            json!({"topic": "bad topic", "data": 1}).to_string(),
            400,
            "topic",
        ),
        (json!({"topic": "news"}).to_string(), 400, "data"),
        (
            json!({"topic": "news", "data": 1, "extra": 1}).to_string(),
            400,
            "extra",
        ),
        (
            json!({"topic": "news", "data": "x".repeat(2000)}).to_string(),
            400,
            "over max_publish_size 1024",
        ),
        (
            json!({"topic": "news", "data": 1, "event": ""}).to_string(),
            400,
            "event must be",
        ),
        (
            json!([{"topic": "news", "data": 3}, {"topic": "", "data": 4}]).to_string(),
            400,
            "item 1: topic",
        ),
        ("[]".to_string(), 400, "empty batch"),
        ("not json".to_string(), 400, "body is not"),
        (
            format!("[{}]", vec![r#"{"topic":"n","data":1}"#; 1001].join(",")),
            400,
            "over 1000",
        ),
    ];
    for (body, status, says) in cases {
        let (got, reason) = post(Some(&right), &body);
        assert_eq!(got, status, "{body:.80}: {reason}");
        assert!(
            reason.contains(says),
            "{body:.80}: wanted {says:?} in {reason}"
        );
    }
    let huge = format!(r#"{{"topic":"news","data":"{}"}}"#, "x".repeat(2 << 20));
    assert_eq!(post(Some(&right), &huge).0, 413);
    match sub.recv(Duration::from_millis(300)) {
        Err(_) => {}
        Ok(e) => panic!("a refused publish was delivered: {e:?}"),
    }
    // Other paths and methods.
    assert_eq!(server.admin_request("GET", "/publish", &[], "").0, 405);
    assert_eq!(server.admin_request("POST", "/healthz", &[], "").0, 405);
    assert_eq!(server.admin_request("GET", "/nope", &[], "").0, 404);
}

#[test]
fn http_publish_with_redis_down_is_503() {
    let mut redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--admin-api-key", KEY]);
    let one = json!({"topic": "news", "data": 1}).to_string();
    let auth = bearer(KEY);
    let (status, body) =
        server.admin_request("POST", "/publish", &[("Authorization", &auth)], &one);
    assert_eq!(status, 200, "{body}");
    redis.kill();
    wait_status(&server, "/readyz", 503, Duration::from_secs(15));
    let (status, body) =
        server.admin_request("POST", "/publish", &[("Authorization", &auth)], &one);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker unavailable"), "{body}");
}

#[test]
fn stats_describe_the_node_per_shard() {
    let server = TestServer::start(&[]);
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe("t", None).unwrap();
    let (status, body) = server.admin_request("GET", "/stats", &[], "");
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).unwrap();
    let shards = stats["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let total = |f: &str| shards.iter().map(|s| s[f].as_i64().unwrap()).sum::<i64>();
    assert_eq!(total("connections"), 1);
    assert_eq!(total("subscriptions"), 1);
    assert_eq!(stats["broker"]["kind"], "embedded");
    assert_eq!(stats["broker"]["up"], true);
    assert_eq!(stats["draining"], false);
    assert!(shards
        .iter()
        .all(|s| s["last_tick_ms_ago"].as_u64().unwrap() < 5000));
    // A plain HTTP/1.1 client that does not close also gets its answer.
    let (status, _) = http_request(server.admin, "GET", "/healthz", &[], "");
    assert_eq!(status, 200);
}

#[test]
fn ringcast_publish_over_http_prints_the_id_or_the_refusal() {
    let server = TestServer::start(&["--admin-api-key", KEY]);
    let mut sub = Client::connect(&server.url()).unwrap();
    sub.subscribe("news", None).unwrap();
    let base = format!("http://{}", server.admin);
    let run = |key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args(["publish", "--http", &base, "--api-key", key])
            .args(["--topic", "news", "--data", r#"{"n":1}"#, "--event", "ping"])
            .env_remove("RINGCAST_ADMIN_API_KEY")
            .output()
            .unwrap()
    };
    let out = run(KEY);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(mid.parse::<ringcast::id::MsgId>().is_ok(), "{mid:?}");
    match sub.recv(Duration::from_secs(5)).unwrap() {
        Event::Msg { id, data, .. } => assert_eq!((id, data), (mid, json!({"n": 1}))),
        other => panic!("{other:?}"),
    }
    let out = run("wrong-key-0123456789");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("wrong API key"),
        "{stderr}"
    );
}
